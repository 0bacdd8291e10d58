--- moelab.viz.charts: figure-quality charts drawn into a rectangle of a canvas.
--
--   charts.heatmap(c, {x, y, w, h, matrix, row_labels, col_labels, title, xlabel, ylabel,
--                      colormap = "sequential"|"diverging", range = {lo, hi}, center,
--                      colorbar = true, colorbar_label, annotate = false, format})
--   charts.lines(c, {x, y, w, h, series = {{name=, xs=, ys=, color=, dash=}, ...}, title,
--                    xlabel, ylabel, log_y, log_x, legend = true, xrange, yrange, markers})
--   charts.bars(c, {x, y, w, h, categories, series = {{name=, values=, color=}, ...},
--                   reference, reference_label, title, xlabel, ylabel, stacked, legend, yrange})
--   charts.sankey(c, {x, y, w, h, columns, flows = {{e1, e2, ...} | {path=, count=}, ...},
--                     max_nodes = 8, title, node_label = function(id, column)})
--   charts.architecture(c, {x, y, w, h, config, flops, title})
--   charts.legend(c, {x, y, items = {{name, color, kind = "line"|"box"|"marker"}},
--                     orientation, max_width, measure}) -> w, h
--   charts.page(c, {title, subtitle, margin}) -> area {x, y, w, h}
--   charts.figure(path, {width, height, title, subtitle, scale, draw = function(c, area)}) -> path
--   charts.grid(area, rows, cols[, gap]) -> list of areas, row by row
--   charts.ticks(lo, hi, n), charts.log_ticks(lo, hi, n), charts.format_tick(v, step)
--
-- A chart draws everything (title, axes, labels, legend) inside its rectangle.
-- Type is 9 pt or larger; crowded category labels are rotated or thinned,
-- never overlapped; colours come from moelab.viz.colors (colour-blind-safe).
local colors = require "moelab.viz.colors"

local M = {}
local floor, ceil, max, min, abs = math.floor, math.ceil, math.max, math.min, math.abs
local log10 = math.log10 or function(v) return math.log(v) / math.log(10) end
local huge = math.huge

M.theme = {
  font = "Sans", title = 12, label = 10, tick = 9, legend = 9, note = 9, page_title = 16,
  text = "#1f1f1f", muted = "#595959", axis = "#404040", grid = "#e4e4e4", frame = "#9a9a9a",
}
local T = M.theme

-- ---------------------------------------------------------------- checks

local function fail(fn, fmt, ...)
  error(fn .. ": " .. string.format(fmt, ...), 0)
end

local function finite(v) return type(v) == "number" and v == v and v ~= huge and v ~= -huge end

local function is_canvas(c)
  if type(c) ~= "userdata" then return false end
  local ok, s = pcall(tostring, c)
  return ok and type(s) == "string" and s:match("^viz%.canvas%(") ~= nil
end

local function check_canvas(fn, c)
  if not is_canvas(c) then fail(fn, "argument 'c' must be a canvas (viz.canvas{...}), got %s", type(c)) end
  if c:is_finished() then fail(fn, "the canvas is finished") end
end

local function check_keys(fn, o, allowed)
  for k in pairs(o) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      fail(fn, "unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
end

local function keyset(list)
  local s = {}
  for _, k in ipairs(list) do s[k] = true end
  return s
end

local AREA = {"x", "y", "w", "h", "title"}

local function check_area(fn, c, o, allowed, minw, minh)
  check_canvas(fn, c)
  if type(o) ~= "table" then fail(fn, "expected an options table {x=, y=, w=, h=, ...}, got %s", type(o)) end
  check_keys(fn, o, allowed)
  for _, k in ipairs{"x", "y", "w", "h"} do
    if not finite(o[k]) then fail(fn, "option '%s' must be a finite number, got %s", k, tostring(o[k])) end
  end
  if o.w < minw or o.h < minh then
    fail(fn, "the area %gx%g is too small for this chart (at least %dx%d units)", o.w, o.h, minw, minh)
  end
  for _, k in ipairs{"title", "xlabel", "ylabel"} do
    if o[k] ~= nil and type(o[k]) ~= "string" and type(o[k]) ~= "number" then
      fail(fn, "option '%s' must be a string, got %s", k, type(o[k]))
    end
  end
end

local function opt_bool(fn, o, k, def)
  local v = o[k]
  if v == nil then return def end
  if type(v) ~= "boolean" then fail(fn, "option '%s' must be a boolean, got %s", k, type(v)) end
  return v
end

local function opt_range(fn, o, k)
  local r = o[k]
  if r == nil then return nil end
  if type(r) ~= "table" or not finite(r[1]) or not finite(r[2]) or not (r[1] < r[2]) then
    fail(fn, "option '%s' must be {lo, hi} with finite lo < hi", k)
  end
  return r[1], r[2]
end

-- the largest integer key of a list that may have holes (nil gaps)
local function maxn(t)
  local n = 0
  for k in pairs(t) do if type(k) == "number" and k > n and k == floor(k) then n = k end end
  return n
end

-- ------------------------------------------------------------------ text

local function text(c, x, y, s, o)
  o = o or {}
  o.font = o.font or T.font
  o.color = o.color or T.text
  o.size = o.size or T.label
  c:text(x, y, tostring(s), o)
end

local function extent(c, s, size, bold)
  local w, h = c:text_extent(tostring(s), {size = size, bold = bold or false, font = T.font})
  return w, h
end

-- s shortened with an ellipsis until it fits maxw
local function fit(c, s, size, maxw, bold)
  s = tostring(s)
  if extent(c, s, size, bold) <= maxw then return s end
  local chars = {}
  for ch in s:gmatch("[%z\1-\127\194-\244][\128-\191]*") do chars[#chars + 1] = ch end
  local lo, hi = 0, #chars
  while lo < hi do
    local mid = ceil((lo + hi) / 2)
    if extent(c, table.concat(chars, "", 1, mid) .. "…", size, bold) <= maxw then lo = mid else hi = mid - 1 end
  end
  return table.concat(chars, "", 1, lo) .. "…"
end

-- a title across the top of a box; returns the height used
local function draw_title(c, x, y, w, s)
  if not s then return 0 end
  local size = T.title
  local t = fit(c, s, size, w, true)
  local _, h = extent(c, t, size, true)
  text(c, x + w / 2, y, t, {size = size, bold = true, align = "center", valign = "top"})
  return h + 6
end

-- ----------------------------------------------------------------- ticks

local function clean(v) return tonumber(string.format("%.12g", v)) end

local function nice_step(range, n)
  local raw = range / max(1, n)
  local mag = 10 ^ floor(log10(raw))
  local f = raw / mag
  local nf = f <= 1 and 1 or f <= 2 and 2 or f <= 2.5 and 2.5 or f <= 5 and 5 or 10
  return nf * mag
end

--- ticks(lo, hi, n) -> ticks, step, nice_lo, nice_hi: about n round numbers covering [lo, hi]
function M.ticks(lo, hi, n)
  if not (finite(lo) and finite(hi)) then error("charts.ticks: lo and hi must be finite numbers", 2) end
  if hi < lo then lo, hi = hi, lo end
  if hi == lo then
    local d = lo == 0 and 1 or abs(lo) * 0.1
    lo, hi = lo - d, hi + d
  end
  local step = nice_step(hi - lo, n or 5)
  local k0, k1 = floor(lo / step + 1e-9), ceil(hi / step - 1e-9)
  local t = {}
  for k = k0, k1 do t[#t + 1] = clean(k * step) end
  return t, step, clean(k0 * step), clean(k1 * step)
end

local SUP = {["0"] = "⁰", ["1"] = "¹", ["2"] = "²", ["3"] = "³", ["4"] = "⁴", ["5"] = "⁵",
             ["6"] = "⁶", ["7"] = "⁷", ["8"] = "⁸", ["9"] = "⁹", ["-"] = "⁻"}

local function sci(v)
  local e = floor(log10(abs(v)) + 1e-9)
  local m = clean(v / 10 ^ e)
  local sup = tostring(e):gsub(".", SUP)
  if m == 1 then return "10" .. sup end
  if m == -1 then return "−10" .. sup end
  return string.format("%g×10%s", m, sup)
end

local function fixed(v, decimals)
  local s = string.format("%." .. decimals .. "f", v)
  if s:match("^%-0%.?0*$") then s = s:sub(2) end
  return (s:gsub("^%-", "−"))
end

-- the fewest decimals that write every multiple of step exactly
local function decimals_for(step)
  if not step or step <= 0 then return 0 end
  for d = 0, 8 do
    local v = step * 10 ^ d
    if abs(v - floor(v + 0.5)) < 1e-6 * max(1, v) then return d end
  end
  return 8
end

--- format_tick(v, step) -> label: SI suffixes from 10k, powers of ten below 0.001
function M.format_tick(v, step)
  if v == 0 then return "0" end
  local a = abs(v)
  if a >= 1e4 then
    for _, u in ipairs{{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}} do
      if a >= u[1] then return fixed(v / u[1], decimals_for(step and step / u[1])) .. u[2] end
    end
  end
  if a < 1e-3 then return sci(v) end
  if not step then
    local s = string.format("%.3g", v)
    return (s:gsub("^%-", "−"))
  end
  return fixed(v, decimals_for(step))
end

local function format_log_tick(v)
  if v >= 1e-3 and v < 1e4 then return (string.format("%g", clean(v)):gsub("^%-", "−")) end
  return sci(v)
end

--- log_ticks(lo, hi, n) -> ticks (positive lo < hi), at most about n of them
function M.log_ticks(lo, hi, n)
  n = n or 6
  local e0, e1 = floor(log10(lo) + 1e-9), ceil(log10(hi) - 1e-9)
  local sets = {{1, 2, 3, 4, 5, 6, 7, 8, 9}, {1, 2, 5}, {1, 3}, {1}}
  local best
  for _, set in ipairs(sets) do
    local t = {}
    for e = e0, e1 do
      for _, m in ipairs(set) do
        local v = clean(m * 10 ^ e)
        if v >= lo * (1 - 1e-9) and v <= hi * (1 + 1e-9) then t[#t + 1] = v end
      end
    end
    best = t
    if #t <= n then break end
  end
  if #best > n then       -- many decades: every k-th power of ten
    local k = ceil(#best / n)
    local t = {}
    for i = 1, #best, k do t[#t + 1] = best[i] end
    best = t
  end
  if #best < 2 then       -- a narrow range: round numbers placed on the log axis
    local t = M.ticks(lo, hi, 4)
    best = {}
    for _, v in ipairs(t) do if v >= lo and v <= hi and v > 0 then best[#best + 1] = v end end
  end
  return best
end

-- ---------------------------------------------------------------- legend

local LEGEND_KEYS = keyset{"x", "y", "items", "orientation", "max_width", "size", "measure"}

--- legend(c, {x, y, items = {{name=, color=, kind="line"|"box"|"marker", dash=}}, orientation =
-- "vertical"|"horizontal", max_width, size = 9, measure = false}) -> w, h
function M.legend(c, o)
  local fn = "charts.legend"
  check_canvas(fn, c)
  if type(o) ~= "table" then fail(fn, "expected an options table, got %s", type(o)) end
  check_keys(fn, o, LEGEND_KEYS)
  if type(o.items) ~= "table" then fail(fn, "option 'items' must be a list of {name=, color=}") end
  local size = o.size or T.legend
  if not finite(size) or size < 9 then fail(fn, "option 'size' must be a number >= 9") end
  local horizontal = o.orientation == "horizontal"
  if o.orientation ~= nil and o.orientation ~= "horizontal" and o.orientation ~= "vertical" then
    fail(fn, "option 'orientation' must be \"vertical\" or \"horizontal\", got %s", tostring(o.orientation))
  end
  local measure = o.measure == true
  if not measure and not (finite(o.x) and finite(o.y)) then fail(fn, "options 'x' and 'y' must be finite numbers") end
  local sw, gap = 18, 5
  local items = {}
  for i, it in ipairs(o.items) do
    if type(it) ~= "table" then fail(fn, "items[%d] must be a table {name=, color=}", i) end
    local name = it.name or it[1]
    if name == nil then fail(fn, "items[%d].name is missing", i) end
    local w, h = extent(c, name, size)
    items[#items + 1] = {name = tostring(name), color = it.color or it[2] or colors.categorical(i),
                         kind = it.kind or "line", dash = it.dash, w = w, h = h}
  end
  local rowh = 0
  for _, it in ipairs(items) do rowh = max(rowh, it.h) end
  rowh = rowh * 1.3
  local maxw = o.max_width or huge
  -- positions
  local pos, W, H = {}, 0, 0
  if horizontal then
    local cx, cy, roww = 0, 0, 0
    for i, it in ipairs(items) do
      local iw = sw + gap + it.w
      if cx > 0 and cx + iw > maxw then cx, cy = 0, cy + rowh end
      pos[i] = {cx, cy}
      cx = cx + iw + 14
      roww = max(roww, cx - 14)
    end
    W, H = roww, (#items > 0 and cy + rowh or 0)
  else
    for i, it in ipairs(items) do
      pos[i] = {0, (i - 1) * rowh}
      W = max(W, sw + gap + it.w)
    end
    H = #items * rowh
  end
  if measure then return W, H end
  for i, it in ipairs(items) do
    local ix, iy = o.x + pos[i][1], o.y + pos[i][2]
    local my = iy + rowh / 2
    if it.kind == "box" then
      c:rect(ix + 3, my - 5, sw - 6, 10, {color = it.color})
    elseif it.kind == "marker" then
      c:circle(ix + sw / 2, my, 3.5, {color = it.color})
    else
      c:line(ix, my, ix + sw, my, {width = 2, color = it.color, dash = it.dash})
    end
    text(c, ix + sw + gap, my, it.name, {size = size, valign = "middle"})
  end
  return W, H
end

-- --------------------------------------------------------------- helpers

-- the default series styles: a colour per series, dashes after the palette wraps
local DASHES = {false, {6, 3}, {2, 2}, {8, 3, 2, 3}}
local function series_style(i, s)
  local color = s.color or colors.categorical(i)
  local dash = s.dash
  if dash == nil then dash = DASHES[floor((i - 1) / #colors.palette) % #DASHES + 1] end
  if dash == false then dash = nil end
  return color, dash
end

-- room for a legend: on the right when the chart is wide, else on top; returns
-- {side=, w=, h=} or nil
local function place_legend(c, items, w)
  if #items == 0 then return nil end
  local vw, vh = M.legend(c, {items = items, measure = true})
  if w >= 380 and vw <= w * 0.28 then return {side = "right", w = vw, h = vh} end
  local hw, hh = M.legend(c, {items = items, measure = true, orientation = "horizontal", max_width = w})
  return {side = "top", w = hw, h = hh}
end

-- Which category labels to show along a horizontal axis of slots, and how:
-- {rotate = 0|45|90, step = k, height = room needed below the axis, labels = shown text}
local NICE_STEPS = {1, 2, 4, 5, 8, 10, 16, 20, 25, 32, 50, 64, 100, 128, 200, 250, 500, 1000}
local function nice_count(k)
  for _, s in ipairs(NICE_STEPS) do if s >= k then return s end end
  return ceil(k / 1000) * 1000
end

local function plan_labels(c, labels, slot, size, max_len)
  local shown, maxw, lh = {}, 0, 0
  for i, s in ipairs(labels) do
    shown[i] = fit(c, s, size, max_len)
    local w, h = extent(c, shown[i], size)
    maxw, lh = max(maxw, w), max(lh, h)
  end
  local gap = size * 0.8
  if maxw + gap <= slot then return {rotate = 0, step = 1, height = lh + 4, labels = shown} end
  if maxw <= 3.5 * size then   -- short labels (numbers): keep them level, show every k-th
    return {rotate = 0, step = nice_count(ceil((maxw + gap) / slot)), height = lh + 4, labels = shown}
  end
  -- 45 degrees: neighbours sit slot * sin(45) apart, perpendicular to the text
  local step = nice_count(ceil(lh * 1.1 / (slot * 0.7071)))
  return {rotate = 45, step = step, height = (maxw + lh) * 0.7071 + 4, labels = shown}
end

local function draw_x_labels(c, plan, centers, y, size)
  for i = 1, #centers, plan.step do
    local s = plan.labels[i]
    if plan.rotate == 0 then
      text(c, centers[i], y + 3, s, {size = size, align = "center", valign = "top"})
    else
      text(c, centers[i] + 2, y + 4, s, {size = size, align = "right", valign = "middle", rotate = plan.rotate})
    end
  end
end

-- numeric ticks for a horizontal axis that fit without overlapping
local function fit_x_ticks(c, lo, hi, width, log, size)
  local n = max(2, floor(width / 70))
  while true do
    local t, step
    if log then t = M.log_ticks(lo, hi, n) else t, step = M.ticks(lo, hi, n) end
    local labels, widest, inside = {}, 0, {}
    for _, v in ipairs(t) do
      if v >= lo - 1e-9 * abs(hi - lo) and v <= hi + 1e-9 * abs(hi - lo) then
        inside[#inside + 1] = v
        labels[#inside] = log and format_log_tick(v) or M.format_tick(v, step)
        widest = max(widest, (extent(c, labels[#inside], size)))
      end
    end
    if n <= 2 or (#inside <= 1) or widest * 1.4 * #inside <= width then return inside, labels end
    n = n - 1
  end
end

local function draw_ylabel(c, x, cy, s)
  text(c, x, cy, s, {size = T.label, rotate = 90, align = "center", valign = "top"})
end

-- Cartesian axes: y ticks (with grid), x ticks; returns nothing. ax = {px, py, pw, ph, ...}
local function draw_y_axis(c, ax, yt, ylabels, ysc)
  for i, v in ipairs(yt) do
    local yy = ysc(v)
    c:line(ax.px, yy, ax.px + ax.pw, yy, {width = 0.6, color = T.grid})
    c:line(ax.px - 3, yy, ax.px, yy, {width = 0.8, color = T.axis})
    text(c, ax.px - 5, yy, ylabels[i], {size = T.tick, align = "right", valign = "middle", color = T.muted})
  end
end

-- ----------------------------------------------------------------- lines

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

local SANKEY_KEYS = keyset{"x", "y", "w", "h", "columns", "flows", "max_nodes", "title", "node_label"}
local OTHER = {}   -- the merged node's key

--- sankey(c, {x, y, w, h, columns = {"layer 1", ...}, flows = list of per-token paths {e1, e2, ...}
-- or {path = {...}, count = n}, max_nodes = 8 (the rest merged into "other"), title,
-- node_label = function(id, column) -> string})
function M.sankey(c, o)
  local fn = "charts.sankey"
  check_area(fn, c, o, SANKEY_KEYS, 160, 100)
  local cols = o.columns
  if type(cols) ~= "table" or #cols < 2 then fail(fn, "option 'columns' must list at least 2 column names") end
  local L = #cols
  for i, s in ipairs(cols) do
    if type(s) ~= "string" and type(s) ~= "number" then fail(fn, "columns[%d] must be a string, got %s", i, type(s)) end
  end
  if type(o.flows) ~= "table" or #o.flows == 0 then fail(fn, "option 'flows' must be a non-empty list of paths") end
  local max_nodes = o.max_nodes or 8
  if not finite(max_nodes) or max_nodes < 2 or max_nodes ~= floor(max_nodes) then
    fail(fn, "option 'max_nodes' must be an integer >= 2, got %s", tostring(max_nodes))
  end
  if o.node_label ~= nil and type(o.node_label) ~= "function" then fail(fn, "option 'node_label' must be a function(id, column)") end
  -- totals per column
  local totals, paths = {}, {}
  for l = 1, L do totals[l] = {} end
  for i, f in ipairs(o.flows) do
    if type(f) ~= "table" then fail(fn, "flows[%d] must be a path {e1, e2, ...} or {path=, count=}, got %s", i, type(f)) end
    local path, count = f, 1
    if f.path ~= nil then
      path, count = f.path, f.count or f.value or 1
      if type(path) ~= "table" then fail(fn, "flows[%d].path must be a list of node ids", i) end
    end
    if not finite(count) or count < 0 then fail(fn, "flows[%d].count must be a non-negative number", i) end
    if maxn(path) > L then fail(fn, "flows[%d] has %d steps for %d columns", i, maxn(path), L) end
    for l = 1, L do
      local id = path[l]
      if id ~= nil and id ~= false and type(id) ~= "number" and type(id) ~= "string" then
        fail(fn, "flows[%d][%d] must be a node id (number or string), got %s", i, l, type(id))
      end
      if id ~= nil and id ~= false then totals[l][id] = (totals[l][id] or 0) + count end
    end
    paths[i] = {path, count}
  end
  -- nodes: the largest max_nodes per column (or max_nodes - 1 and "other")
  local nodes, index = {}, {}
  local grand = 0
  for l = 1, L do
    local ids = {}
    for id, v in pairs(totals[l]) do ids[#ids + 1] = {id = id, v = v} end
    table.sort(ids, function(a, b)
      if a.v ~= b.v then return a.v > b.v end
      if type(a.id) == type(b.id) then return a.id < b.id end
      return type(a.id) == "number"
    end)
    local keep = #ids <= max_nodes and #ids or max_nodes - 1
    local list, map, sum = {}, {}, 0
    for k = 1, keep do list[k] = {id = ids[k].id, v = ids[k].v}; map[ids[k].id] = k; sum = sum + ids[k].v end
    if keep < #ids then
      local other = {id = OTHER, v = 0, merged = #ids - keep}
      for k = keep + 1, #ids do other.v = other.v + ids[k].v; map[ids[k].id] = keep + 1 end
      list[keep + 1] = other
      sum = sum + other.v
    end
    nodes[l], index[l] = list, map
    nodes[l].total = sum
    grand = max(grand, sum)
  end
  if grand <= 0 then fail(fn, "option 'flows' carries no weight (all counts are zero)") end
  -- links between adjacent columns: links[l][a][b] = weight
  local links = {}
  for l = 1, L - 1 do links[l] = {} end
  for _, pc in ipairs(paths) do
    local path, count = pc[1], pc[2]
    for l = 1, L - 1 do
      local a, b = path[l], path[l + 1]
      if a ~= nil and a ~= false and b ~= nil and b ~= false and count > 0 then
        local na, nb = index[l][a], index[l + 1][b]
        links[l][na] = links[l][na] or {}
        links[l][na][nb] = (links[l][na][nb] or 0) + count
      end
    end
  end

  -- layout
  local x0, y0, W, H = o.x + 4, o.y + 4, o.w - 8, o.h - 8
  local top = y0 + draw_title(c, x0, y0, W, o.title)
  local _, lh = extent(c, "Ag", T.label)
  local _, th = extent(c, "Ag", T.tick)
  local nw = 12
  -- column names on top, thinned if they would touch
  local spacing = (W - nw) / (L - 1)
  local cw_max = 0
  local cnames = {}
  for l = 1, L do cnames[l] = fit(c, cols[l], T.label, max(60, spacing * 1.8)); cw_max = max(cw_max, (extent(c, cnames[l], T.label))) end
  local cstep = nice_count(ceil((cw_max + 10) / spacing))
  local head = lh + 6
  local py, ph = top + head, y0 + H - top - head
  local most = 0
  for l = 1, L do most = max(most, #nodes[l]) end
  local gap = most > 1 and min(10, ph * 0.25 / (most - 1)) or 0
  local k = (ph - gap * (most - 1)) / grand
  if k <= 0 then fail(fn, "the area %gx%g is too small for %d nodes a column", o.w, o.h, most) end
  local function colx(l) return x0 + (l - 1) * spacing end
  for l = 1, L do
    local used = nodes[l].total * k + gap * (#nodes[l] - 1)
    local yy = py + (ph - used) / 2
    for r, nd in ipairs(nodes[l]) do
      nd.y, nd.h = yy, nd.v * k
      nd.color = nd.id == OTHER and colors.other or colors.categorical(r)
      nd.out, nd.inn = nd.y, nd.y
      yy = yy + nd.h + gap
    end
  end
  -- ribbons: outgoing in target order, incoming in source order
  for l = 1, L - 1 do
    local src, dst = nodes[l], nodes[l + 1]
    local start_in = {}
    for b = 1, #dst do
      local off = dst[b].y
      for a = 1, #src do
        local v = links[l][a] and links[l][a][b]
        if v then start_in[a * 100000 + b] = off; off = off + v * k end
      end
    end
    for a = 1, #src do
      local off = src[a].y
      for b = 1, #dst do
        local v = links[l][a] and links[l][a][b]
        if v then
          local hgt = v * k
          local yi = start_in[a * 100000 + b]
          c:ribbon(colx(l) + nw, off, off + hgt, colx(l + 1), yi, yi + hgt,
                   {color = colors.rgba(src[a].color, 0.42)})
          off = off + hgt
        end
      end
    end
  end
  -- nodes and labels
  local label_fn = o.node_label or function(id)
    if type(id) == "number" then return "E" .. id end
    return tostring(id)
  end
  local show_labels = spacing >= 70
  for l = 1, L do
    local x = colx(l)
    if (l - 1) % cstep == 0 or l == L then
      local align = l == 1 and "left" or l == L and "right" or "center"
      local ax = l == 1 and x or l == L and x + nw or x + nw / 2
      if l == L and (L - 1) % cstep ~= 0 and (L - 1) - floor((L - 1) / cstep) * cstep < cstep * 0.99 then
        -- the last name would crowd the previous one: only draw it if there is room
        local prev = colx(floor((L - 1) / cstep) * cstep + 1)
        if x + nw - cw_max < prev + nw / 2 + cw_max / 2 + 8 then align = nil end
      end
      if align then text(c, ax, top, cnames[l], {size = T.label, bold = true, align = align, valign = "top"}) end
    end
    local last_bottom = -huge
    for _, nd in ipairs(nodes[l]) do
      c:rect(x, nd.y, nw, max(nd.h, 0.6), {color = nd.color})
      if show_labels or l == 1 or l == L then
        local name = nd.id == OTHER and string.format("other (%d)", nd.merged) or tostring(label_fn(nd.id, l))
        local pct = nodes[l].total > 0 and nd.v / nodes[l].total * 100 or 0
        local s = string.format("%s  %s%%", name, pct >= 10 and string.format("%.0f", pct) or string.format("%.1f", pct))
        s = fit(c, s, T.tick, max(40, spacing - nw - 10))
        local tw, tth = extent(c, s, T.tick)
        local cy = nd.y + nd.h / 2
        if nd.h >= tth * 0.45 and cy - tth / 2 >= last_bottom + 1 then
          local right_side = l < L
          local tx = right_side and x + nw + 3 or x - 3
          c:rect(right_side and tx - 1 or tx - tw - 2, cy - tth / 2, tw + 3, tth, {color = {1, 1, 1, 0.78}, radius = 2})
          text(c, tx + (right_side and 0.5 or -0.5), cy, s,
               {size = T.tick, align = right_side and "left" or "right", valign = "middle"})
          last_bottom = cy + tth / 2
        end
      end
    end
  end
  return {px = x0, py = py, pw = W, ph = ph}
end

-- ---------------------------------------------------------- architecture

local ARCH_KEYS = keyset{"x", "y", "w", "h", "config", "flops", "title"}

local function si(v, unit)
  local a = abs(v)
  for _, u in ipairs{{1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}} do
    if a >= u[1] then return string.format("%.3g %s%s", v / u[1], u[2], unit or "") end
  end
  return string.format("%.3g %s", v, unit or "")
end

local function cfg_int(fn, cfg, k, def, lo)
  local v = cfg[k]
  if v == nil then return def end
  if not finite(v) or v ~= floor(v) or v < (lo or 0) then
    fail(fn, "config.%s must be an integer >= %d, got %s", k, lo or 0, tostring(v))
  end
  return v
end

--- architecture(c, {x, y, w, h, config = model.config (or a model), flops = {embedding=,
-- attention=, router=, experts=, ffn=, head=} (optional, per token), title})
function M.architecture(c, o)
  local fn = "charts.architecture"
  check_area(fn, c, o, ARCH_KEYS, 260, 300)
  local cfg = o.config
  if type(cfg) == "table" and type(cfg.config) == "table" then cfg = cfg.config end
  if type(cfg) ~= "table" then fail(fn, "option 'config' must be a model config table (model.config), got %s", type(cfg)) end
  if o.flops ~= nil and type(o.flops) ~= "table" then fail(fn, "option 'flops' must be a table of per-component numbers") end
  local flops = o.flops or {}
  for k2, v in pairs(flops) do
    if not finite(v) or v < 0 then fail(fn, "flops.%s must be a non-negative number, got %s", tostring(k2), tostring(v)) end
  end
  local d = cfg_int(fn, cfg, "hidden_size", nil, 1)
  if not d then fail(fn, "config.hidden_size is required") end
  local nl = cfg_int(fn, cfg, "num_layers", 1, 1)
  local nh = cfg_int(fn, cfg, "num_heads", max(1, floor(d / 64)), 1)
  local nkv = cfg_int(fn, cfg, "num_kv_heads", nh, 1)
  local hd = cfg_int(fn, cfg, "head_dim", floor(d / nh), 1)
  local E = cfg_int(fn, cfg, "num_experts", 1, 1)
  local topk = cfg_int(fn, cfg, "experts_per_token", min(2, E), 1)
  local V = cfg_int(fn, cfg, "vocab_size", nil, 1)
  local eff = cfg_int(fn, cfg, "expert_intermediate_size", cfg.intermediate_size or 4 * d, 1)
  local dff = cfg_int(fn, cfg, "intermediate_size", 4 * d, 1)
  local nshared = cfg_int(fn, cfg, "num_shared_experts", 0, 0)
  local sff = cfg_int(fn, cfg, "shared_intermediate_size", 0, 0)
  if sff == 0 then sff = eff end
  local freq = cfg_int(fn, cfg, "moe_layer_frequency", 1, 0)
  local first = cfg_int(fn, cfg, "first_dense_layers", 0, 0)
  local act = tostring(cfg.activation or "swiglu")
  local score = tostring(cfg.router_score or "softmax")
  local router = tostring(cfg.router or "topk")
  topk = min(topk, E)
  local moe_layers, dense_layers = {}, {}
  for i = 0, nl - 1 do
    if E > 1 and freq > 0 and i >= first and (freq == 1 or i % freq == freq - 1) then moe_layers[#moe_layers + 1] = i + 1
    else dense_layers[#dense_layers + 1] = i + 1 end
  end
  local mats = act:find("glu") and 3 or 2
  local expert_params = mats * d * eff

  local x0, y0, W, H = o.x + 4, o.y + 4, o.w - 8, o.h - 8
  local top = y0 + draw_title(c, x0, y0, W, o.title or (cfg.name and tostring(cfg.name) .. " architecture"))
  local _, lh = extent(c, "Ag", T.label)
  local _, th = extent(c, "Ag", T.tick)
  -- columns: the "N x" margin | the stack | notes (dimensions, FLOPs)
  local has_flops = next(flops) ~= nil
  local notes_w = min(W * 0.42, 260)
  local mx = x0 + 36
  local sw = W - 36 - notes_w - 14
  if sw < 220 then notes_w = W - 36 - 14 - 220; sw = 220 end
  if notes_w < 120 then sw = W - 36 - 4; notes_w = 0 end
  local nx = mx + sw + 14
  local cx = mx + sw / 2
  -- the stack, top-down, in units u of box height; gaps are 0.3 u
  local items = {{"out", 0.6}, {"head", 1}, {"fnorm", 0.8}, {"pad_top", 0.15}, {"add2", 0.55}, {"moe", 3.6},
                 {"norm2", 0.8}, {"add1", 0.55}, {"attn", 1.1}, {"norm1", 0.8}, {"pad_bottom", 0.15},
                 {"embed", 1}, {"in", 0.6}}
  local sum = 0
  for _, it in ipairs(items) do sum = sum + it[2] end
  local avail = y0 + H - top
  local u = min(avail / (sum + 0.3 * (#items - 1)), 2 * lh + 12)
  if u < lh + 4 then
    fail(fn, "the area %gx%g is too small for the diagram (needs about %.0f units of height)", o.w, o.h,
         (lh + 4) * (sum + 0.3 * (#items - 1)) + (top - o.y) + 4)
  end
  local used = u * (sum + 0.3 * (#items - 1))
  local at, yy = {}, top + (avail - used) / 2
  for _, it in ipairs(items) do
    at[it[1]] = {y = yy, h = it[2] * u}
    yy = yy + it[2] * u + 0.3 * u
  end
  local fills = {
    embed = colors.lighten(colors.palette[5], 0.55), attn = colors.lighten(colors.palette[1], 0.62),
    norm = "#eeeeee", head = colors.lighten(colors.palette[3], 0.6), router = colors.lighten(colors.palette[2], 0.55),
    expert = "#f4f4f4", active = colors.palette[2], shared = colors.lighten(colors.palette[3], 0.35),
  }
  local function box(e, fill, title, sub, narrow)
    local x, w = mx + sw * (narrow and 0.2 or 0.1), sw * (narrow and 0.6 or 0.8)
    c:rect(x, e.y, w, e.h, {color = fill, stroke = true, stroke_color = T.frame, line_width = 0.8, radius = 4})
    if sub and e.h >= lh + th + 4 then
      text(c, cx, e.y + e.h / 2 - 1, fit(c, title, T.label, w - 8, true), {size = T.label, bold = true, align = "center", valign = "bottom"})
      text(c, cx, e.y + e.h / 2 + 1, fit(c, sub, T.tick, w - 8), {size = T.tick, align = "center", valign = "top", color = T.muted})
    else
      text(c, cx, e.y + e.h / 2, fit(c, title, T.label, w - 8, true), {size = T.label, bold = true, align = "center", valign = "middle"})
    end
  end
  local function arrow(x, ya, yb)   -- upward, from ya (below) to yb (above)
    if ya - yb < 4 then return end
    c:line(x, ya, x, yb + 3, {width = 1, color = T.axis})
    c:polyline({x - 3, yb + 4.5, x, yb, x + 3, yb + 4.5}, {fill = true, color = T.axis})
  end
  local r_add = min(at.add1.h / 2, 7)
  local function add_node(e)
    local ccy = e.y + e.h / 2
    c:circle(cx, ccy, r_add, {fill = true, color = "#ffffff"})
    c:circle(cx, ccy, r_add, {fill = false, stroke = true, width = 0.9, color = T.axis})
    c:line(cx - r_add * 0.6, ccy, cx + r_add * 0.6, ccy, {width = 1, color = T.axis})
    c:line(cx, ccy - r_add * 0.6, cx, ccy + r_add * 0.6, {width = 1, color = T.axis})
  end
  local total_flops = 0
  for _, v in pairs(flops) do total_flops = total_flops + v end
  -- a note beside a box: a line of text and, when flops has the key, a bar of its FLOPs share
  local function note(e, s, flop_key)
    if notes_w <= 0 then return end
    local fv = flop_key and flops[flop_key]
    local cy = e.y + e.h / 2
    local ty, by = cy, cy
    if s and fv then ty, by = cy - th * 0.6, cy + th * 0.6 end
    if s then text(c, nx, ty, fit(c, s, T.tick, notes_w), {size = T.tick, valign = "middle", color = T.muted}) end
    if fv then
      local share = total_flops > 0 and fv / total_flops or 0
      local label = si(fv, "FLOPs") .. string.format(" (%.0f%%)", share * 100)
      local lw = extent(c, label, T.tick)
      local bw = max(0.8, (notes_w - lw - 6) * share)
      c:rect(nx, by - 2.5, bw, 5, {color = colors.palette[1]})
      text(c, nx + bw + 4, by, label, {size = T.tick, valign = "middle", color = T.text})
    end
  end
  local norm_name = "RMSNorm"
  local ffn_name = act == "swiglu" and "SwiGLU" or act:upper()
  -- the block frame and its repeat count
  local ftop, fbottom = at.pad_top.y, at.pad_bottom.y + at.pad_bottom.h
  c:rect(mx, ftop, sw, fbottom - ftop, {color = "#f9f9f9", stroke = true, stroke_color = T.frame, line_width = 0.8, radius = 6})
  text(c, mx - 5, (ftop + fbottom) / 2, string.format("%d×", nl), {size = T.title, bold = true, align = "right", valign = "middle"})
  if #moe_layers > 0 and #dense_layers > 0 then   -- some layers have a dense FFN in place of the MoE
    text(c, mx - 4, (ftop + fbottom) / 2 + lh, string.format("%d MoE\n%d dense", #moe_layers, #dense_layers),
         {size = T.tick, align = "right", valign = "top", color = T.muted})
  end
  -- bottom: ids and the embedding
  text(c, cx, at["in"].y + at["in"].h / 2, "token ids", {size = T.tick, align = "center", valign = "middle", color = T.muted})
  box(at.embed, fills.embed, "Token embedding", V and string.format("%d × %d", V, d) or string.format("d = %d", d))
  note(at.embed, V and string.format("vocabulary %d → d_model %d", V, d) or string.format("d_model %d", d), "embedding")
  arrow(cx, at["in"].y + at["in"].h / 2 - th / 2 - 1, at.embed.y + at.embed.h)
  arrow(cx, at.embed.y, at.norm1.y + at.norm1.h)
  -- attention sub-layer
  box(at.norm1, fills.norm, norm_name, nil, true)
  arrow(cx, at.norm1.y, at.attn.y + at.attn.h)
  box(at.attn, fills.attn, nkv < nh and "Grouped-query attention" or "Multi-head attention",
      string.format("%d heads, %d KV heads, d_head %d", nh, nkv, hd))
  note(at.attn, string.format("Q %d→%d, K/V %d→%d each%s", d, nh * hd, d, nkv * hd, cfg.qk_norm and ", QK-norm" or ", RoPE"), "attention")
  local a1c = at.add1.y + at.add1.h / 2
  arrow(cx, at.attn.y, a1c + r_add)
  add_node(at.add1)
  arrow(cx, a1c - r_add, at.norm2.y + at.norm2.h)
  box(at.norm2, fills.norm, norm_name, nil, true)
  -- the MoE sub-layer: a router, a row of experts, a token's top-k highlighted
  local mo = at.moe
  local moe_x, moe_w = mx + sw * 0.06, sw * 0.88
  arrow(cx, at.norm2.y, mo.y + mo.h)
  c:rect(moe_x, mo.y, moe_w, mo.h, {color = "#ffffff", stroke = true, stroke_color = T.frame, line_width = 0.8, radius = 4})
  local is_moe = #moe_layers > 0
  local title = is_moe and string.format("MoE: top-%d of %d experts", topk, E) or "Feed-forward"
  text(c, cx, mo.y + 3, fit(c, title, T.label, moe_w - 8, true), {size = T.label, bold = true, align = "center", valign = "top"})
  if is_moe then
    local rh = th + 6
    local router_y = mo.y + mo.h - rh - 5
    c:rect(moe_x + moe_w * 0.28, router_y, moe_w * 0.44, rh, {color = fills.router, stroke = true, stroke_color = T.frame, line_width = 0.6, radius = 3})
    text(c, cx, router_y + rh / 2, fit(c, string.format("router (%s)", score), T.tick, moe_w * 0.44 - 4),
         {size = T.tick, align = "center", valign = "middle"})
    local sub = string.format("%s experts %d→%d→%d%s", ffn_name, d, eff, d, nshared > 0 and string.format(", %d shared", nshared) or "")
    local sub_y = mo.y + 3 + lh + 1
    text(c, cx, sub_y, fit(c, sub, T.tick, moe_w - 8), {size = T.tick, align = "center", valign = "top", color = T.muted})
    local row_top = sub_y + th + 4
    local row_bottom = router_y - max(8, (router_y - row_top) * 0.35)
    local eh = row_bottom - row_top
    local shown = min(E, 16)
    local nsh = min(nshared, 2)
    local nslots = shown + (nsh > 0 and nsh + 0.5 or 0)
    local ew_slot = (moe_w - 12) / nslots
    local ew = ew_slot * 0.8
    local ex = moe_x + 6 + (ew_slot - ew) / 2
    if eh >= 6 then
      for s = 1, nsh do
        local bx = ex + (s - 1) * ew_slot
        c:rect(bx, row_top, ew, eh, {color = fills.shared, stroke = true, stroke_color = T.frame, line_width = 0.5, radius = 2})
        if ew >= extent(c, "S", T.tick) + 2 and eh >= th then
          text(c, bx + ew / 2, row_top + eh / 2, "S", {size = T.tick, align = "center", valign = "middle"})
        end
      end
      if nsh > 0 then ex = ex + (nsh + 0.5) * ew_slot end
      local targets = {}
      local widest = extent(c, tostring(E), T.tick)
      local label_all = widest <= ew - 1 and eh >= th
      for s = 1, shown do
        local bx = ex + (s - 1) * ew_slot
        local id = (E > 16 and s == shown) and E or s
        if E > 16 and s == shown - 1 then
          text(c, bx + ew / 2, row_top + eh / 2, "…", {size = T.label, align = "center", valign = "middle"})
        else
          local active = s <= topk and s < shown - 1 or (E <= 16 and s <= topk)
          c:rect(bx, row_top, ew, eh, {color = active and fills.active or fills.expert, stroke = true,
                                       stroke_color = active and colors.palette[4] or T.frame,
                                       line_width = active and 0.9 or 0.5, radius = 2})
          local lbl = tostring(id)
          if (label_all or (active and extent(c, lbl, T.tick) <= ew - 1)) and eh >= th then
            text(c, bx + ew / 2, row_top + eh / 2, lbl, {size = T.tick, align = "center", valign = "middle",
                                                     color = active and "#ffffff" or T.text})
          end
          if active then targets[#targets + 1] = bx + ew / 2 end
        end
      end
      for _, tx in ipairs(targets) do
        c:line(cx, router_y, tx, row_top + eh + 0.5, {width = 0.9, color = colors.palette[4]})
      end
    end
  else
    local e = {y = mo.y + lh + 8, h = mo.h - lh - 14}
    local x, w = moe_x + moe_w * 0.15, moe_w * 0.7
    c:rect(x, e.y, w, e.h, {color = fills.expert, stroke = true, stroke_color = T.frame, line_width = 0.6, radius = 3})
    text(c, cx, e.y + e.h / 2, string.format("%s %d→%d→%d", ffn_name, d, dff, d), {size = T.tick, align = "center", valign = "middle"})
  end
  -- the caption beside the top of the block (drawn below, counted here)
  local caption = {string.format("d_model %d, %d layers", d, nl)}
  if is_moe then
    caption[#caption + 1] = string.format("expert params: %s total, %s active",
      si(#moe_layers * E * expert_params), si(#moe_layers * topk * expert_params))
  end
  if has_flops then caption[#caption + 1] = "bars: share of FLOPs per token" end
  local caption_bottom = ftop + 2
  if notes_w > 0 then
    for i, s in ipairs(caption) do
      local _, hh = c:text_extent(s, {size = T.tick, width = notes_w})
      text(c, nx, caption_bottom, s, {size = T.tick, valign = "top", color = T.text, width = notes_w})
      caption_bottom = caption_bottom + hh + 2
    end
  end
  if notes_w > 0 then
    local lines = {}
    if is_moe then
      local rname = ({topk = "top-k", noisy_topk = "noisy top-k", expert_choice = "expert choice",
                      sinkhorn = "Sinkhorn"})[router] or router
      lines[#lines + 1] = string.format("%d of %d experts per token (%s)", topk, E, rname)
      lines[#lines + 1] = string.format("%s params per expert", si(expert_params))
      if #dense_layers > 0 then
        local which = #moe_layers <= 6 and table.concat(moe_layers, ", ") or string.format("%d of %d", #moe_layers, nl)
        lines[#lines + 1] = string.format("MoE in layers %s; dense FFN %d elsewhere", which, dff)
      end
    else
      lines[#lines + 1] = string.format("dense FFN, %s params", si(mats * d * dff))
    end
    local ly = max(mo.y + 4, caption_bottom + 8)
    for _, s in ipairs(lines) do
      local _, hh = c:text_extent(s, {size = T.tick, width = notes_w})
      text(c, nx, ly, s, {size = T.tick, valign = "top", color = T.muted, width = notes_w})
      ly = ly + hh + 2
    end
    ly = ly + 4
    local key = flops.experts and "experts" or flops.moe and "moe" or flops.ffn and "ffn"
    if key then
      note({y = ly, h = 2.4 * th}, is_moe and string.format("experts (top-%d)", topk) or "feed-forward", key)
      ly = ly + 2.4 * th + 2
    end
    if flops.router and is_moe and ly + 2.4 * th <= mo.y + mo.h + 0.3 * u then note({y = ly, h = 2.4 * th}, "router", "router") end
  end
  local a2c = at.add2.y + at.add2.h / 2
  arrow(cx, mo.y, a2c + r_add)
  add_node(at.add2)
  -- residual connections, on the left inside the frame
  local rx = mx + sw * 0.035
  local function residual(from_y, to_y)
    c:polyline({cx, from_y, rx, from_y, rx, to_y, cx - r_add - 1, to_y}, {width = 0.9, color = T.axis})
    c:polyline({cx - r_add - 5, to_y - 3, cx - r_add - 1, to_y, cx - r_add - 5, to_y + 3}, {width = 0.9, color = T.axis})
  end
  residual((at.norm1.y + at.norm1.h + fbottom) / 2, a1c)
  residual((a1c + r_add + at.norm2.y + at.norm2.h) / 2 - 0.5, a2c)
  -- top: final norm, head, logits
  arrow(cx, a2c - r_add, at.fnorm.y + at.fnorm.h)
  box(at.fnorm, fills.norm, "Final " .. norm_name, nil, true)
  arrow(cx, at.fnorm.y, at.head.y + at.head.h)
  box(at.head, fills.head, "LM head", V and string.format("%d → %d%s", d, V, cfg.tie_word_embeddings and " (tied)" or "") or nil)
  note(at.head, V and string.format("d_model %d → vocabulary %d", d, V) or nil, "head")
  arrow(cx, at.head.y, at.out.y + at.out.h / 2 + th / 2 + 1)
  text(c, cx, at.out.y + at.out.h / 2, "next-token logits", {size = T.tick, align = "center", valign = "middle", color = T.muted})
  return {px = mx, py = top, pw = sw, ph = y0 + H - top}
end

-- ------------------------------------------------------- pages, figures

--- page(c, {title, subtitle, margin = 36}) -> area {x, y, w, h} below the heading
function M.page(c, o)
  local fn = "charts.page"
  check_canvas(fn, c)
  o = o or {}
  if type(o) ~= "table" then fail(fn, "expected an options table {title=, subtitle=}, got %s", type(o)) end
  check_keys(fn, o, keyset{"title", "subtitle", "margin"})
  local m = o.margin or 36
  if not finite(m) or m < 0 then fail(fn, "option 'margin' must be a non-negative number") end
  local W, H = c:size()
  local x, y, w = m, m, W - 2 * m
  if w < 50 then fail(fn, "the margin %g leaves no room on a %gx%g page", m, W, H) end
  if o.title then
    local s = fit(c, o.title, T.page_title, w, true)
    local _, h = extent(c, s, T.page_title, true)
    text(c, x, y, s, {size = T.page_title, bold = true, valign = "top"})
    y = y + h + 2
  end
  if o.subtitle then
    local s = fit(c, o.subtitle, T.label, w)
    local _, h = extent(c, s, T.label)
    text(c, x, y, s, {size = T.label, valign = "top", color = T.muted})
    y = y + h + 2
  end
  if o.title or o.subtitle then y = y + 10 end
  return {x = x, y = y, w = w, h = H - m - y}
end

--- grid(area, rows, cols[, gap = 16]) -> list of areas, row by row
function M.grid(area, rows, cols, gap)
  local fn = "charts.grid"
  if type(area) ~= "table" or not (finite(area.x) and finite(area.y) and finite(area.w) and finite(area.h)) then
    fail(fn, "argument 'area' must be {x=, y=, w=, h=}")
  end
  if not finite(rows) or rows < 1 or rows ~= floor(rows) then fail(fn, "argument 'rows' must be a positive integer") end
  if not finite(cols) or cols < 1 or cols ~= floor(cols) then fail(fn, "argument 'cols' must be a positive integer") end
  gap = gap or 16
  if not finite(gap) or gap < 0 then fail(fn, "argument 'gap' must be a non-negative number") end
  local cw, ch = (area.w - gap * (cols - 1)) / cols, (area.h - gap * (rows - 1)) / rows
  local out = {}
  for r = 1, rows do
    for k = 1, cols do
      out[#out + 1] = {x = area.x + (k - 1) * (cw + gap), y = area.y + (r - 1) * (ch + gap), w = cw, h = ch}
    end
  end
  return out
end

--- figure(path, {width = 480, height = 320, title, subtitle, scale = 2, margin = 16,
-- draw = function(c, area) end}) -> path: one figure in its own file (PNG, PDF or SVG)
function M.figure(path, o)
  local fn = "charts.figure"
  if type(path) ~= "string" then fail(fn, "argument 'path' must be a file name, got %s", type(path)) end
  if type(o) ~= "table" then fail(fn, "expected an options table {width=, height=, draw=}, got %s", type(o)) end
  check_keys(fn, o, keyset{"width", "height", "title", "subtitle", "scale", "margin", "draw"})
  if type(o.draw) ~= "function" then fail(fn, "option 'draw' must be a function(c, area)") end
  local viz = require "moelab.viz"
  local ok, c = pcall(viz.canvas, {path = path, width = o.width or 480, height = o.height or 320, scale = o.scale})
  if not ok then fail(fn, "%s", tostring(c)) end
  local ok2, err = pcall(function()
    local area = M.page(c, {title = o.title, subtitle = o.subtitle, margin = o.margin or 16})
    o.draw(c, area)
  end)
  if not ok2 then
    pcall(c.finish, c)
    error(err, 0)
  end
  c:finish()
  return path
end

return M
