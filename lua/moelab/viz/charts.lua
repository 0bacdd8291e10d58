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
local M = require "moelab.viz.charts_base"
require "moelab.viz.charts_lines"
require "moelab.viz.charts_heatmap"
require "moelab.viz.charts_sankey"
require "moelab.viz.charts_architecture"
local B = M._base
local colors, floor, ceil, max, min, abs, log10, huge = B.colors, B.floor, B.ceil, B.max, B.min, B.abs, B.log10, B.huge
local T, fail, finite, is_canvas, check_canvas, check_keys, keyset, AREA = B.T, B.fail, B.finite, B.is_canvas, B.check_canvas, B.check_keys, B.keyset, B.AREA
local check_area, opt_bool, opt_range, maxn, text, extent, fit, draw_title = B.check_area, B.opt_bool, B.opt_range, B.maxn, B.text, B.extent, B.fit, B.draw_title
local clean, nice_step, SUP, sci, fixed, decimals_for, format_log_tick, LEGEND_KEYS = B.clean, B.nice_step, B.SUP, B.sci, B.fixed, B.decimals_for, B.format_log_tick, B.LEGEND_KEYS
local DASHES, series_style, place_legend, NICE_STEPS, nice_count, plan_labels, draw_x_labels, fit_x_ticks = B.DASHES, B.series_style, B.place_legend, B.NICE_STEPS, B.nice_count, B.plan_labels, B.draw_x_labels, B.fit_x_ticks
local draw_ylabel, draw_y_axis = B.draw_ylabel, B.draw_y_axis

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
