--- Shared pieces of the charts: theme, argument checks, text, ticks and
-- number formats, legends and axes. The chart modules (charts_*.lua) add
-- their functions to this table; charts.lua assembles the public module.
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


-- the helpers the chart modules share (not part of the public API)
M._base = {colors = colors, floor = floor, ceil = ceil, max = max, min = min, abs = abs, log10 = log10, huge = huge, T = T, fail = fail, finite = finite, is_canvas = is_canvas, check_canvas = check_canvas, check_keys = check_keys, keyset = keyset, AREA = AREA, check_area = check_area, opt_bool = opt_bool, opt_range = opt_range, maxn = maxn, text = text, extent = extent, fit = fit, draw_title = draw_title, clean = clean, nice_step = nice_step, SUP = SUP, sci = sci, fixed = fixed, decimals_for = decimals_for, format_log_tick = format_log_tick, LEGEND_KEYS = LEGEND_KEYS, DASHES = DASHES, series_style = series_style, place_legend = place_legend, NICE_STEPS = NICE_STEPS, nice_count = nice_count, plan_labels = plan_labels, draw_x_labels = draw_x_labels, fit_x_ticks = fit_x_ticks, draw_ylabel = draw_ylabel, draw_y_axis = draw_y_axis}

return M
