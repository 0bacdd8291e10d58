--- Line and bar charts. Part of moelab.viz.charts (see charts.lua).
local M = require "moelab.viz.charts_base"
local B = M._base
local colors, floor, ceil, max, min, abs, log10, huge = B.colors, B.floor, B.ceil, B.max, B.min, B.abs, B.log10, B.huge
local T, fail, finite, is_canvas, check_canvas, check_keys, keyset, AREA = B.T, B.fail, B.finite, B.is_canvas, B.check_canvas, B.check_keys, B.keyset, B.AREA
local check_area, opt_bool, opt_range, maxn, text, extent, fit, draw_title = B.check_area, B.opt_bool, B.opt_range, B.maxn, B.text, B.extent, B.fit, B.draw_title
local clean, nice_step, SUP, sci, fixed, decimals_for, format_log_tick, LEGEND_KEYS = B.clean, B.nice_step, B.SUP, B.sci, B.fixed, B.decimals_for, B.format_log_tick, B.LEGEND_KEYS
local DASHES, series_style, place_legend, NICE_STEPS, nice_count, plan_labels, draw_x_labels, fit_x_ticks = B.DASHES, B.series_style, B.place_legend, B.NICE_STEPS, B.nice_count, B.plan_labels, B.draw_x_labels, B.fit_x_ticks
local draw_ylabel, draw_y_axis = B.draw_ylabel, B.draw_y_axis

local LINES_KEYS = keyset{"x", "y", "w", "h", "series", "title", "xlabel", "ylabel", "log_y", "log_x",
                          "legend", "xrange", "yrange", "markers", "line_width"}

--- lines(c, {x, y, w, h, series = {{name=, xs=, ys=, color=, dash=}, ...} (or {name, xs, ys}),
-- title, xlabel, ylabel, log_y, log_x, legend = true, xrange, yrange, markers, line_width = 1.5})
function M.lines(c, o)
  local fn = "charts.lines"
  check_area(fn, c, o, LINES_KEYS, 140, 100)
  if type(o.series) ~= "table" or #o.series == 0 then fail(fn, "option 'series' must be a non-empty list of {name=, xs=, ys=}") end
  local log_y, log_x = opt_bool(fn, o, "log_y", false), opt_bool(fn, o, "log_x", false)
  local show_legend = opt_bool(fn, o, "legend", true)
  local lw = o.line_width or 1.5
  if not finite(lw) or lw <= 0 then fail(fn, "option 'line_width' must be a positive number") end
  local series = {}
  local xlo, xhi, ylo, yhi = huge, -huge, huge, -huge
  for i, s in ipairs(o.series) do
    if type(s) ~= "table" then fail(fn, "series[%d] must be a table {name=, xs=, ys=}", i) end
    local name, xs, ys = s.name or s[1], s.xs or s[2], s.ys or s[3]
    if type(ys) ~= "table" then fail(fn, "series[%d].ys must be a list of numbers, got %s", i, type(ys)) end
    if xs ~= nil and type(xs) ~= "table" then fail(fn, "series[%d].xs must be a list of numbers, got %s", i, type(xs)) end
    local n = max(maxn(ys), xs and maxn(xs) or 0)
    local pts = {}
    for k = 1, n do
      local xv, yv = xs and xs[k] or (not xs and k or nil), ys[k]
      if xv ~= nil and not (type(xv) == "number") then fail(fn, "series[%d].xs[%d] must be a number, got %s", i, k, type(xv)) end
      if yv ~= nil and not (type(yv) == "number") then fail(fn, "series[%d].ys[%d] must be a number, got %s", i, k, type(yv)) end
      local ok = finite(xv) and finite(yv) and (not log_y or yv > 0) and (not log_x or xv > 0)
      if ok then
        pts[k] = {xv, yv}
        xlo, xhi, ylo, yhi = min(xlo, xv), max(xhi, xv), min(ylo, yv), max(yhi, yv)
      end
    end
    local color, dash = series_style(i, s)
    series[i] = {name = name ~= nil and tostring(name) or ("series " .. i), pts = pts, n = n, color = color, dash = dash}
  end
  local has_data = xlo <= xhi
  local rxl, rxh = opt_range(fn, o, "xrange")
  local ryl, ryh = opt_range(fn, o, "yrange")
  if rxl then xlo, xhi = rxl, rxh end
  if ryl then ylo, yhi = ryl, ryh end
  if not has_data and not rxl then xlo, xhi = 0, 1 end
  if not has_data and not ryl then ylo, yhi = log_y and 1 or 0, log_y and 10 or 1 end
  if (log_y and ylo <= 0) or (log_x and xlo <= 0) then fail(fn, "a log axis needs a positive range") end
  if xlo == xhi then
    local d = xlo == 0 and 1 or abs(xlo) * 0.1
    if log_x then xlo, xhi = xlo / 2, xhi * 2 else xlo, xhi = xlo - d, xhi + d end
  end
  if ylo == yhi then
    local d = ylo == 0 and 1 or abs(ylo) * 0.1
    if log_y then ylo, yhi = ylo / 2, yhi * 2 else ylo, yhi = ylo - d, yhi + d end
  end

  -- layout
  local x0, y0, W, H = o.x + 4, o.y + 4, o.w - 8, o.h - 8
  local top = y0 + draw_title(c, x0, y0, W, o.title)
  local items = {}
  if show_legend and (#series > 1 or (o.series[1].name or o.series[1][1])) then
    for i, s in ipairs(series) do items[i] = {name = s.name, color = s.color, dash = s.dash} end
  end
  local legend = place_legend(c, items, W)
  local right = x0 + W
  if legend and legend.side == "right" then right = right - legend.w - 14 end
  if legend and legend.side == "top" then top = top + legend.h + 6 end
  local _, lh = extent(c, "Ag", T.label)
  local _, th = extent(c, "0", T.tick)
  local bottom = y0 + H - th - 6 - (o.xlabel and lh + 4 or 0)
  local ph_est = bottom - top
  -- y ticks
  local yt, ylabels, ydl, ydh
  local ny = max(2, floor(ph_est / 36))
  if log_y then
    local pad = (log10(yhi) - log10(ylo)) * 0.04
    if not ryl then ylo, yhi = 10 ^ (log10(ylo) - pad), 10 ^ (log10(yhi) + pad) end
    yt = M.log_ticks(ylo, yhi, ny)
    ydl, ydh = ylo, yhi
    ylabels = {}
    for i, v in ipairs(yt) do ylabels[i] = format_log_tick(v) end
  else
    local step
    yt, step, ydl, ydh = M.ticks(ylo, yhi, ny)
    if ryl then
      ydl, ydh = ylo, yhi
      local keep = {}
      for _, v in ipairs(yt) do if v >= ylo - 1e-9 * (yhi - ylo) and v <= yhi + 1e-9 * (yhi - ylo) then keep[#keep + 1] = v end end
      yt = keep
    end
    ylabels = {}
    for i, v in ipairs(yt) do ylabels[i] = M.format_tick(v, step) end
  end
  local yw = 0
  for _, s in ipairs(ylabels) do yw = max(yw, (extent(c, s, T.tick))) end
  local left = x0 + (o.ylabel and lh + 6 or 0) + yw + 8
  local ax = {px = left, py = top + th / 2, pw = right - left, ph = bottom - top - th / 2}
  if ax.pw < 40 or ax.ph < 30 then fail(fn, "the area %gx%g leaves no room for the plot", o.w, o.h) end
  local function sc(v, lo, hi, a, b, lg)
    if lg then v, lo, hi = log10(v), log10(lo), log10(hi) end
    return a + (v - lo) / (hi - lo) * (b - a)
  end
  local function xs(v) return sc(v, xlo, xhi, ax.px, ax.px + ax.pw, log_x) end
  local function ys(v) return sc(v, ydl, ydh, ax.py + ax.ph, ax.py, log_y) end

  draw_y_axis(c, ax, yt, ylabels, ys)
  local xt, xlabels = fit_x_ticks(c, xlo, xhi, ax.pw, log_x, T.tick)
  for i, v in ipairs(xt) do
    local xx = xs(v)
    c:line(xx, ax.py + ax.ph, xx, ax.py + ax.ph + 3, {width = 0.8, color = T.axis})
    local align = "center"
    text(c, xx, ax.py + ax.ph + 5, xlabels[i], {size = T.tick, align = align, valign = "top", color = T.muted})
  end
  c:line(ax.px, ax.py + ax.ph, ax.px + ax.pw, ax.py + ax.ph, {width = 0.8, color = T.axis})
  c:line(ax.px, ax.py, ax.px, ax.py + ax.ph, {width = 0.8, color = T.axis})
  if o.xlabel then
    text(c, ax.px + ax.pw / 2, y0 + H, fit(c, o.xlabel, T.label, ax.pw), {align = "center", valign = "bottom"})
  end
  if o.ylabel then draw_ylabel(c, x0, ax.py + ax.ph / 2, fit(c, o.ylabel, T.label, ax.ph)) end

  -- series, clipped to the plot
  c:clip(ax.px - 2, ax.py - 2, ax.pw + 4, ax.ph + 4)
  for _, s in ipairs(series) do
    local count = 0
    for _ in pairs(s.pts) do count = count + 1 end
    local markers = o.markers
    if markers == nil then markers = count <= 30 end
    local run = {}
    local function flush()
      if #run >= 4 then
        c:polyline(run, {width = lw, color = s.color, dash = s.dash, cap = "round"})
      elseif #run == 2 and not markers then
        c:circle(run[1], run[2], lw * 1.2, {color = s.color})
      end
      run = {}
    end
    for k = 1, s.n do
      local p = s.pts[k]
      if p then
        run[#run + 1] = xs(p[1]); run[#run + 1] = ys(p[2])
        if markers then c:circle(xs(p[1]), ys(p[2]), lw + 1, {color = s.color}) end
      else
        flush()
      end
    end
    flush()
  end
  c:unclip()
  if not has_data then
    text(c, ax.px + ax.pw / 2, ax.py + ax.ph / 2, "no data", {align = "center", valign = "middle", color = T.muted})
  end
  if legend then
    if legend.side == "right" then
      M.legend(c, {x = right + 14, y = ax.py, items = items})
    else
      M.legend(c, {x = x0 + (W - legend.w) / 2, y = top - legend.h - 6, items = items,
                   orientation = "horizontal", max_width = W})
    end
  end
  return ax
end

-- ------------------------------------------------------------------ bars

local BARS_KEYS = keyset{"x", "y", "w", "h", "categories", "series", "reference", "reference_label", "title",
                         "xlabel", "ylabel", "stacked", "legend", "yrange"}

--- bars(c, {x, y, w, h, categories = {...}, series = {{name=, values=, color=}, ...}, reference =,
-- reference_label =, title, xlabel, ylabel, stacked = false, legend, yrange})
function M.bars(c, o)
  local fn = "charts.bars"
  check_area(fn, c, o, BARS_KEYS, 140, 100)
  local cats = o.categories
  if type(cats) ~= "table" or #cats == 0 then fail(fn, "option 'categories' must be a non-empty list of names") end
  for i, v in ipairs(cats) do
    if type(v) ~= "string" and type(v) ~= "number" then fail(fn, "categories[%d] must be a string or number, got %s", i, type(v)) end
  end
  if type(o.series) ~= "table" or #o.series == 0 then fail(fn, "option 'series' must be a non-empty list of {name=, values=}") end
  local stacked = opt_bool(fn, o, "stacked", false)
  if o.reference ~= nil and not finite(o.reference) then fail(fn, "option 'reference' must be a finite number, got %s", tostring(o.reference)) end
  if o.reference_label ~= nil and type(o.reference_label) ~= "string" then fail(fn, "option 'reference_label' must be a string") end
  local nc, ns = #cats, #o.series
  local series = {}
  local lo, hi = 0, 0
  local pos_sum, neg_sum = {}, {}
  for i, s in ipairs(o.series) do
    if type(s) ~= "table" then fail(fn, "series[%d] must be a table {name=, values=}", i) end
    local name, values = s.name or s[1], s.values or s[2]
    if type(values) ~= "table" then fail(fn, "series[%d].values must be a list of numbers, got %s", i, type(values)) end
    if maxn(values) > nc then fail(fn, "series[%d].values has %d entries for %d categories", i, maxn(values), nc) end
    for k = 1, nc do
      local v = values[k]
      if v ~= nil and type(v) ~= "number" then fail(fn, "series[%d].values[%d] must be a number, got %s", i, k, type(v)) end
      if finite(v) then
        if stacked then
          if v >= 0 then pos_sum[k] = (pos_sum[k] or 0) + v else neg_sum[k] = (neg_sum[k] or 0) + v end
          lo, hi = min(lo, neg_sum[k] or 0), max(hi, pos_sum[k] or 0)
        else
          lo, hi = min(lo, v), max(hi, v)
        end
      end
    end
    local color = series_style(i, s)
    series[i] = {name = name ~= nil and tostring(name) or ("series " .. i), values = values, color = color}
  end
  if o.reference then lo, hi = min(lo, o.reference), max(hi, o.reference) end
  local ryl, ryh = opt_range(fn, o, "yrange")
  local show_legend = opt_bool(fn, o, "legend", ns > 1)

  local x0, y0, W, H = o.x + 4, o.y + 4, o.w - 8, o.h - 8
  local top = y0 + draw_title(c, x0, y0, W, o.title)
  local items = {}
  if show_legend then for i, s in ipairs(series) do items[i] = {name = s.name, color = s.color, kind = "box"} end end
  local legend = place_legend(c, items, W)
  local right = x0 + W
  if legend and legend.side == "right" then right = right - legend.w - 14 end
  if legend and legend.side == "top" then top = top + legend.h + 6 end
  local _, lh = extent(c, "Ag", T.label)
  local _, th = extent(c, "0", T.tick)
  -- y ticks from an estimated plot height
  local ph_est = y0 + H - top - 3 * lh
  local yt, step, ydl, ydh = M.ticks(ryl or lo, ryh or hi, max(2, floor(ph_est / 36)))
  if ryl then
    ydl, ydh = ryl, ryh
    local keep = {}
    for _, v in ipairs(yt) do if v >= ryl and v <= ryh then keep[#keep + 1] = v end end
    yt = keep
  end
  local ylabels, yw = {}, 0
  for i, v in ipairs(yt) do ylabels[i] = M.format_tick(v, step); yw = max(yw, (extent(c, ylabels[i], T.tick))) end
  local left = x0 + (o.ylabel and lh + 6 or 0) + yw + 8
  local pw = right - left
  if pw < 40 then fail(fn, "the area %gx%g leaves no room for the plot", o.w, o.h) end
  local slot = pw / nc
  local plan = plan_labels(c, cats, slot, T.tick, max(40, H * 0.3))
  local bottom = y0 + H - plan.height - 3 - (o.xlabel and lh + 4 or 0)
  local ax = {px = left, py = top + th / 2, pw = pw, ph = bottom - top - th / 2}
  if ax.ph < 30 then fail(fn, "the area %gx%g leaves no room for the plot", o.w, o.h) end
  local function ys(v) return ax.py + ax.ph - (v - ydl) / (ydh - ydl) * ax.ph end
  draw_y_axis(c, ax, yt, ylabels, ys)

  c:clip(ax.px, ax.py - 1, ax.pw, ax.ph + 2)
  local y_zero = ys(min(max(0, ydl), ydh))
  local inner = slot * (nc > 1 and 0.8 or 0.6)
  local bw = stacked and inner or inner / ns
  local gap = (bw > 6 and not stacked) and min(1.5, bw * 0.1) or 0
  local pos_acc, neg_acc = {}, {}
  for j, s in ipairs(series) do
    for k = 1, nc do
      local v = s.values[k]
      if finite(v) then
        local bx = ax.px + (k - 1) * slot + (slot - inner) / 2 + (stacked and 0 or (j - 1) * bw)
        local base = 0
        if stacked then
          if v >= 0 then base = pos_acc[k] or 0; pos_acc[k] = base + v
          else base = neg_acc[k] or 0; neg_acc[k] = base + v end
        end
        local ya, yb = ys(base), ys(base + v)
        if not stacked then ya = y_zero end
        c:rect(bx + gap / 2, min(ya, yb), bw - gap, abs(yb - ya), {color = s.color})
        if stacked and bw > 8 and abs(yb - ya) > 1.5 then   -- a hairline between stacked parts
          c:line(bx, yb, bx + bw, yb, {width = 0.5, color = "#ffffff"})
        end
      end
    end
  end
  c:unclip()
  -- axes
  c:line(ax.px, y_zero, ax.px + ax.pw, y_zero, {width = 0.8, color = T.axis})
  c:line(ax.px, ax.py, ax.px, ax.py + ax.ph, {width = 0.8, color = T.axis})
  local centers = {}
  for k = 1, nc do centers[k] = ax.px + (k - 0.5) * slot end
  for k = 1, nc, plan.step do
    c:line(centers[k], ax.py + ax.ph, centers[k], ax.py + ax.ph + 3, {width = 0.8, color = T.axis})
  end
  draw_x_labels(c, plan, centers, ax.py + ax.ph + 1, T.tick)
  if o.reference then
    local yr = ys(o.reference)
    c:line(ax.px, yr, ax.px + ax.pw, yr, {width = 1.2, color = T.text, dash = {5, 3}})
    if o.reference_label then
      local s = fit(c, o.reference_label, T.tick, ax.pw * 0.6)
      local tw, tth = extent(c, s, T.tick)
      local above = yr - tth - 2 > ax.py
      local ty = above and yr - 2 or yr + 2
      c:rect(ax.px + ax.pw - tw - 6, above and ty - tth or ty, tw + 4, tth, {color = {1, 1, 1, 0.85}})
      text(c, ax.px + ax.pw - 4, ty, s, {size = T.tick, align = "right", valign = above and "bottom" or "top"})
    end
  end
  if o.xlabel then text(c, ax.px + ax.pw / 2, y0 + H, fit(c, o.xlabel, T.label, ax.pw), {align = "center", valign = "bottom"}) end
  if o.ylabel then draw_ylabel(c, x0, ax.py + ax.ph / 2, fit(c, o.ylabel, T.label, ax.ph)) end
  if legend then
    if legend.side == "right" then
      M.legend(c, {x = right + 14, y = ax.py, items = items})
    else
      M.legend(c, {x = x0 + (W - legend.w) / 2, y = top - legend.h - 6, items = items, orientation = "horizontal", max_width = W})
    end
  end
  return ax
end

-- --------------------------------------------------------------- heatmap

return M
