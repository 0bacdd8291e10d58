--- Heatmaps. Part of moelab.viz.charts (see charts.lua).
local M = require "moelab.viz.charts_base"
local B = M._base
local colors, floor, ceil, max, min, abs, log10, huge = B.colors, B.floor, B.ceil, B.max, B.min, B.abs, B.log10, B.huge
local T, fail, finite, is_canvas, check_canvas, check_keys, keyset, AREA = B.T, B.fail, B.finite, B.is_canvas, B.check_canvas, B.check_keys, B.keyset, B.AREA
local check_area, opt_bool, opt_range, maxn, text, extent, fit, draw_title = B.check_area, B.opt_bool, B.opt_range, B.maxn, B.text, B.extent, B.fit, B.draw_title
local clean, nice_step, SUP, sci, fixed, decimals_for, format_log_tick, LEGEND_KEYS = B.clean, B.nice_step, B.SUP, B.sci, B.fixed, B.decimals_for, B.format_log_tick, B.LEGEND_KEYS
local DASHES, series_style, place_legend, NICE_STEPS, nice_count, plan_labels, draw_x_labels, fit_x_ticks = B.DASHES, B.series_style, B.place_legend, B.NICE_STEPS, B.nice_count, B.plan_labels, B.draw_x_labels, B.fit_x_ticks
local draw_ylabel, draw_y_axis = B.draw_ylabel, B.draw_y_axis

local HEAT_KEYS = keyset{"x", "y", "w", "h", "matrix", "row_labels", "col_labels", "title", "xlabel", "ylabel",
                         "colormap", "range", "center", "colorbar", "colorbar_label", "annotate", "format"}

local function fmt_value(v, spec)
  if type(spec) == "function" then return tostring(spec(v)) end
  if type(spec) == "string" then return string.format(spec, v) end
  local a = abs(v)
  if a == 0 then return "0" end
  if a >= 1000 then return M.format_tick(v) end
  if a >= 100 then return string.format("%.0f", v) end
  if a >= 10 then return string.format("%.1f", v) end
  if a >= 0.01 then return string.format("%.2f", v) end
  return string.format("%.0e", v)
end

--- heatmap(c, {x, y, w, h, matrix = {{...}, ...} (rows top to bottom), row_labels, col_labels,
-- title, xlabel, ylabel, colormap = "sequential"|"diverging", range = {lo, hi}, center = 0,
-- colorbar = true, colorbar_label, annotate = false, format})
function M.heatmap(c, o)
  local fn = "charts.heatmap"
  check_area(fn, c, o, HEAT_KEYS, 120, 90)
  local mat = o.matrix
  if type(mat) ~= "table" or #mat == 0 then fail(fn, "option 'matrix' must be a non-empty list of rows") end
  local nr, nc = #mat, 0
  local lo, hi = huge, -huge
  for i = 1, nr do
    local row = mat[i]
    if type(row) ~= "table" then fail(fn, "matrix[%d] must be a list of numbers, got %s", i, type(row)) end
    nc = max(nc, maxn(row))
    for j, v in pairs(row) do
      if type(v) ~= "number" then fail(fn, "matrix[%d][%s] must be a number, got %s", i, tostring(j), type(v)) end
      if finite(v) then lo, hi = min(lo, v), max(hi, v) end
    end
  end
  if nc == 0 then fail(fn, "option 'matrix' has no columns") end
  local cmap = o.colormap or "sequential"
  if cmap ~= "sequential" and cmap ~= "diverging" then
    fail(fn, "option 'colormap' must be \"sequential\" or \"diverging\", got %s", tostring(cmap))
  end
  local function labels(k, n, what)
    local l = o[k]
    if l == nil then
      local t = {}
      for i = 1, n do t[i] = tostring(i) end
      return t
    end
    if type(l) ~= "table" or #l ~= n then
      fail(fn, "option '%s' must list %d labels (one per %s), got %s", k, n, what,
           type(l) == "table" and tostring(#l) or type(l))
    end
    local t = {}
    for i = 1, n do t[i] = tostring(l[i]) end
    return t
  end
  local rlab, clab = labels("row_labels", nr, "row"), labels("col_labels", nc, "column")
  local rlo, rhi = opt_range(fn, o, "range")
  if rlo then lo, hi = rlo, rhi end
  if lo > hi then lo, hi = 0, 1 end
  if cmap == "diverging" and not rlo then
    local center = o.center or 0
    if not finite(center) then fail(fn, "option 'center' must be a finite number") end
    local m = max(abs(lo - center), abs(hi - center))
    if m == 0 then m = 1 end
    lo, hi = center - m, center + m
  end
  if lo == hi then lo, hi = lo - 0.5, hi + 0.5 end
  local show_cb = opt_bool(fn, o, "colorbar", true)
  local annotate = opt_bool(fn, o, "annotate", false)
  if o.format ~= nil and type(o.format) ~= "string" and type(o.format) ~= "function" then
    fail(fn, "option 'format' must be a format string or a function(v)")
  end
  if type(o.format) == "string" and not pcall(string.format, o.format, 1.5) then
    fail(fn, "option 'format' is not a valid format for a number: %s", o.format)
  end

  local x0, y0, W, H = o.x + 4, o.y + 4, o.w - 8, o.h - 8
  local top = y0 + draw_title(c, x0, y0, W, o.title)
  local _, lh = extent(c, "Ag", T.label)
  local _, th = extent(c, "Ag", T.tick)
  -- right: the colour bar and its ticks
  local cbw, cb_ticks, cb_labels, cb_room = 11, {}, {}, 0
  if show_cb then
    local t, step = M.ticks(lo, hi, max(2, floor((y0 + H - top) / 45)))
    local tw = 0
    for _, v in ipairs(t) do
      if v >= lo - 1e-9 * (hi - lo) and v <= hi + 1e-9 * (hi - lo) then
        cb_ticks[#cb_ticks + 1] = v
        cb_labels[#cb_ticks] = M.format_tick(v, step)
        tw = max(tw, (extent(c, cb_labels[#cb_ticks], T.tick)))
      end
    end
    cb_room = 12 + cbw + 5 + tw + (o.colorbar_label and lh + 8 or 0)
  end
  -- left: the y label and the row labels
  local rmax = max(40, W * 0.28)
  local rshown, rw = {}, 0
  for i = 1, nr do rshown[i] = fit(c, rlab[i], T.tick, rmax); rw = max(rw, (extent(c, rshown[i], T.tick))) end
  local left = x0 + (o.ylabel and lh + 6 or 0) + rw + 6
  local pw = x0 + W - cb_room - left
  if pw < 30 then fail(fn, "the area %gx%g leaves no room for the matrix", o.w, o.h) end
  local cw = pw / nc
  local plan = plan_labels(c, clab, cw, T.tick, max(40, H * 0.25))
  local bottom = y0 + H - plan.height - 2 - (o.xlabel and lh + 4 or 0)
  local ph = bottom - top
  if ph < 30 then fail(fn, "the area %gx%g leaves no room for the matrix", o.w, o.h) end
  local ch = ph / nr

  -- cells (a hair of overlap so that vector viewers show no seams)
  local span = hi - lo
  for i = 1, nr do
    local row = mat[i]
    local cy = top + (i - 1) * ch
    for j = 1, nc do
      local v = row[j]
      local cx = left + (j - 1) * cw
      local ew, eh = (j < nc) and 0.3 or 0, (i < nr) and 0.3 or 0
      if finite(v) then
        local r, g, b = colors.map(cmap, (v - lo) / span)
        c:rect(cx, cy, cw + ew, ch + eh, {color = {r, g, b}})
      else
        c:rect(cx, cy, cw + ew, ch + eh, {color = colors.missing})
      end
    end
  end
  c:rect(left, top, pw, ph, {fill = false, stroke = true, line_width = 0.6, stroke_color = T.frame})
  if annotate then
    local size = T.note
    for i = 1, nr do
      for j = 1, nc do
        local v = mat[i][j]
        if finite(v) then
          local s = fmt_value(v, o.format)
          local tw, tth = extent(c, s, size)
          if tw <= cw - 2 and tth <= ch then
            local r, g, b = colors.map(cmap, (v - lo) / span)
            text(c, left + (j - 0.5) * cw, top + (i - 0.5) * ch, s,
                 {size = size, align = "center", valign = "middle", color = colors.text_on(r, g, b)})
          end
        end
      end
    end
  end
  -- row labels (thinned when rows are thinner than a line of text)
  local rstep = nice_count(ceil(th * 1.05 / ch))
  for i = 1, nr, rstep do
    text(c, left - 4, top + (i - 0.5) * ch, rshown[i], {size = T.tick, align = "right", valign = "middle", color = T.text})
  end
  local centers = {}
  for j = 1, nc do centers[j] = left + (j - 0.5) * cw end
  draw_x_labels(c, plan, centers, top + ph, T.tick)
  if o.xlabel then text(c, left + pw / 2, y0 + H, fit(c, o.xlabel, T.label, pw), {align = "center", valign = "bottom"}) end
  if o.ylabel then draw_ylabel(c, x0, top + ph / 2, fit(c, o.ylabel, T.label, ph)) end
  -- colour bar
  if show_cb then
    local bx = left + pw + 12
    local n = 96
    for k = 0, n - 1 do
      local r, g, b = colors.map(cmap, 1 - (k + 0.5) / n)
      c:rect(bx, top + k * ph / n, cbw, ph / n + (k < n - 1 and 0.3 or 0), {color = {r, g, b}})
    end
    c:rect(bx, top, cbw, ph, {fill = false, stroke = true, line_width = 0.6, stroke_color = T.frame})
    for k, v in ipairs(cb_ticks) do
      local yy = top + ph - (v - lo) / span * ph
      c:line(bx + cbw, yy, bx + cbw + 3, yy, {width = 0.8, color = T.axis})
      text(c, bx + cbw + 5, yy, cb_labels[k], {size = T.tick, valign = "middle", color = T.muted})
    end
    if o.colorbar_label then
      text(c, x0 + W, top + ph / 2, fit(c, o.colorbar_label, T.label, ph),
           {size = T.label, rotate = 90, align = "center", valign = "bottom"})
    end
  end
  return {px = left, py = top, pw = pw, ph = ph}
end

-- ---------------------------------------------------------------- sankey

return M
