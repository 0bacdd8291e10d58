--- Sankey flows of per-token expert paths. Part of moelab.viz.charts (see charts.lua).
local M = require "moelab.viz.charts_base"
local B = M._base
local colors, floor, ceil, max, min, abs, log10, huge = B.colors, B.floor, B.ceil, B.max, B.min, B.abs, B.log10, B.huge
local T, fail, finite, is_canvas, check_canvas, check_keys, keyset, AREA = B.T, B.fail, B.finite, B.is_canvas, B.check_canvas, B.check_keys, B.keyset, B.AREA
local check_area, opt_bool, opt_range, maxn, text, extent, fit, draw_title = B.check_area, B.opt_bool, B.opt_range, B.maxn, B.text, B.extent, B.fit, B.draw_title
local clean, nice_step, SUP, sci, fixed, decimals_for, format_log_tick, LEGEND_KEYS = B.clean, B.nice_step, B.SUP, B.sci, B.fixed, B.decimals_for, B.format_log_tick, B.LEGEND_KEYS
local DASHES, series_style, place_legend, NICE_STEPS, nice_count, plan_labels, draw_x_labels, fit_x_ticks = B.DASHES, B.series_style, B.place_legend, B.NICE_STEPS, B.nice_count, B.plan_labels, B.draw_x_labels, B.fit_x_ticks
local draw_ylabel, draw_y_axis = B.draw_ylabel, B.draw_y_axis

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

return M
