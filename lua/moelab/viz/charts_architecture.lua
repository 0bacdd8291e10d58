--- The architecture diagram of a model. Part of moelab.viz.charts (see charts.lua).
local M = require "moelab.viz.charts_base"
local B = M._base
local colors, floor, ceil, max, min, abs, log10, huge = B.colors, B.floor, B.ceil, B.max, B.min, B.abs, B.log10, B.huge
local T, fail, finite, is_canvas, check_canvas, check_keys, keyset, AREA = B.T, B.fail, B.finite, B.is_canvas, B.check_canvas, B.check_keys, B.keyset, B.AREA
local check_area, opt_bool, opt_range, maxn, text, extent, fit, draw_title = B.check_area, B.opt_bool, B.opt_range, B.maxn, B.text, B.extent, B.fit, B.draw_title
local clean, nice_step, SUP, sci, fixed, decimals_for, format_log_tick, LEGEND_KEYS = B.clean, B.nice_step, B.SUP, B.sci, B.fixed, B.decimals_for, B.format_log_tick, B.LEGEND_KEYS
local DASHES, series_style, place_legend, NICE_STEPS, nice_count, plan_labels, draw_x_labels, fit_x_ticks = B.DASHES, B.series_style, B.place_legend, B.NICE_STEPS, B.nice_count, B.plan_labels, B.draw_x_labels, B.fit_x_ticks
local draw_ylabel, draw_y_axis = B.draw_ylabel, B.draw_y_axis

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

return M
