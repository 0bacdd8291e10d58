--- The pages of moelab.report: panels and page layouts drawn from the data
-- report_data.lua collects. make_pages(D) returns the list of pages.
local M = require "moelab.report_data"
local R = M._data
local floor, ceil, max, min, abs, PAGE_W, PAGE_H = R.floor, R.ceil, R.max, R.min, R.abs, R.PAGE_W, R.PAGE_H
local PER_PAGE, fail, finite, file_exists, si, count_str, bytes_str = R.PER_PAGE, R.fail, R.finite, R.file_exists, R.si, R.count_str, R.bytes_str
local html_escape, median, ema, downsample, hline, Progress, progress = R.html_escape, R.median, R.ema, R.downsample, R.hline, R.Progress, R.progress
local read_metrics, from_history, read_json, CLASSES, token_class, build_keys, final_load = R.read_metrics, R.from_history, R.read_json, R.CLASSES, R.token_class, R.build_keys, R.final_load
local nice_bin, load_over_time, expert_labels, layer_specialization, summary_rows = R.nice_bin, R.load_over_time, R.expert_labels, R.layer_specialization, R.summary_rows

-- ------------------------------------------------------------ panels

local function panel_loss(ch, c, a, D, compact)
  local xs, ys = {}, {}
  for i, r in ipairs(D.metrics) do xs[i], ys[i] = r.step, r.loss end
  local sm = ema(ys, #ys > 50 and 0.95 or 0.8)
  local rx, ry = downsample(xs, ys, 600)
  local sx, sy = downsample(xs, sm, 600)
  local colors = ch._colors
  local series = {
    {name = "train (per step)", xs = rx, ys = ry, color = colors.lighten(colors.palette[1], 0.65)},
    {name = "train (EMA)", xs = sx, ys = sy, color = colors.palette[1]},
  }
  if D.eval then
    local ex, ey = {}, {}
    for i, e in ipairs(D.eval) do ex[i], ey[i] = e.step, e.loss end
    series[#series + 1] = {name = "eval", xs = ex, ys = ey, color = colors.palette[4]}
  end
  ch.lines(c, {x = a.x, y = a.y, w = a.w, h = a.h, series = series, title = "Training loss",
               xlabel = "step", ylabel = compact and nil or "cross-entropy (nats)", line_width = 1.4})
end

local function panel_final_load(ch, c, a, D, compact)
  local mat, how = final_load(D)
  if not mat then return end
  local pct = {}
  local center = 100 / D.E
  local dev = 0
  for l, row in ipairs(mat) do
    pct[l] = {}
    for e = 1, D.E do
      pct[l][e] = (row[e] or 0 / 0) * 100
      if finite(pct[l][e]) then dev = max(dev, abs(pct[l][e] - center)) end
    end
  end
  -- white at uniform 1/E; symmetric around it, never below 0 % (values beyond are clipped)
  dev = math.min(math.max(dev, center * 0.05), center)
  ch.heatmap(c, {x = a.x, y = a.y, w = a.w, h = a.h, matrix = pct, row_labels = D.layer_names,
                 col_labels = expert_labels(D.E), colormap = "diverging", range = {center - dev, center + dev},
                 title = compact and "Expert load, end of training" or "Load at the end of training",
                 xlabel = "expert", colorbar_label = "% of assignments",
                 annotate = D.E <= 16 and #mat <= 16, format = "%.0f"})
  return how
end

local function panel_sankey(ch, c, a, D, compact)
  ch.sankey(c, {x = a.x, y = a.y, w = a.w, h = a.h, columns = D.layer_names, flows = D.flows,
                max_nodes = math.min(D.E, 8),
                title = compact and "Top-1 expert flow across layers" or
                  string.format("Top-1 expert of each held-out token (%s tokens)", count_str(#D.flows))})
end

local function spec_bars(ch, c, a, D, l, title, compact)
  local lay = D.spec.layers[l]
  local series = {}
  for i, name in ipairs(D.spec.domains) do
    local d = lay.domains[name]
    if d then series[#series + 1] = {name = name, values = d.share, color = ch._colors.categorical(i)} end
  end
  if #series == 0 then return end
  if D.E > 16 then   -- too many experts for grouped bars: domain x expert heatmap
    local rows, names = {}, {}
    for i, se in ipairs(series) do rows[i], names[i] = se.values, se.name end
    ch.heatmap(c, {x = a.x, y = a.y, w = a.w, h = a.h, matrix = rows, row_labels = names,
                   col_labels = expert_labels(D.E), colormap = "sequential", range = {0, 1},
                   title = title, xlabel = "expert", colorbar_label = string.format("share (uniform %.3g)", D.spec.baseline)})
    return
  end
  ch.bars(c, {x = a.x, y = a.y, w = a.w, h = a.h, categories = expert_labels(D.E), series = series,
              reference = D.spec.baseline, reference_label = string.format("uniform k/E = %.3g", D.spec.baseline),
              title = title, xlabel = "expert", ylabel = compact and "share of tokens" or "share of the domain's tokens",
              legend = true})
end

local function draw_summary(ch, c, a, D)
  local T = ch.theme
  local rows = summary_rows(D)
  local y = a.y + 4
  c:text(a.x, y, "Run summary", {size = T.title, bold = true, valign = "top", color = T.text})
  y = y + 22
  local kw = 0
  for _, r in ipairs(rows) do kw = max(kw, (c:text_extent(r[1], {size = 9}))) end
  kw = math.min(kw, a.w * 0.42)
  for _, r in ipairs(rows) do
    c:text(a.x, y, r[1], {size = 9, color = T.muted, valign = "top", width = kw + 2})
    local _, h = c:text_extent(r[2], {size = 9, width = a.w - kw - 10})
    c:text(a.x + kw + 8, y, r[2], {size = 9, color = T.text, valign = "top", width = a.w - kw - 10})
    y = y + max(h, 12) + 4
    if y > a.y + a.h - 12 then break end
  end
  if #D.notes > 0 and y < a.y + a.h - 24 then
    y = y + 6
    for _, n in ipairs(D.notes) do
      local _, h = c:text_extent("note: " .. n, {size = 9, width = a.w})
      if y + h > a.y + a.h then break end
      c:text(a.x, y, "note: " .. n, {size = 9, italic = true, color = T.muted, valign = "top", width = a.w})
      y = y + h + 3
    end
  end
  return y
end

-- ------------------------------------------------------------ pages

-- Each page: {id=, title=, subtitle=, draw = function(ch, c, area)}
local function make_pages(D)
  local pages = {}
  local function add(p) pages[#pages + 1] = p end
  local has_routing = D.spec ~= nil
  local sample_desc = D.sample and string.format("%d held-out sequences × %d tokens", D.sample.sequences,
    D.sample.seq_len) or ""

  -- 1. overview
  add{id = "overview", title = "Routing report: " .. D.name,
      subtitle = table.concat({D.run_dir and ("run " .. D.run_dir) or "in-memory model",
        os.date("%Y-%m-%d %H:%M"), "moelab " .. tostring(require("moelab.core").version)}, "  ·  "),
      draw = function(ch, c, a)
        local left_w = 262
        local bottom = draw_summary(ch, c, {x = a.x, y = a.y, w = left_w - 18, h = a.h * 0.62}, D)
        local sh = math.max(bottom - a.y + 6, a.h * 0.4)
        local rx = a.x + left_w
        local rw = a.w - left_w
        local top_h = a.h * 0.46
        local g = {
          {x = a.x - 4, y = a.y + sh + 4, w = left_w - 10, h = a.h - sh - 4},
          {x = rx, y = a.y, w = rw * 0.45, h = top_h},
          {x = rx, y = a.y + top_h + 12, w = rw, h = a.h - top_h - 12},
          {x = rx + rw * 0.45 + 12, y = a.y, w = rw * 0.55 - 12, h = top_h},
        }
        if D.metrics then panel_loss(ch, c, g[1], D, true) end
        if D.E > 0 and (D.metrics or D.heldout_load) then panel_final_load(ch, c, g[2], D, true) end
        if has_routing and D.L >= 2 then panel_sankey(ch, c, g[3], D, true) end
        if has_routing then
          local best, bv = 1, -1
          for l = 1, D.L do
            local v = layer_specialization(D, l)
            if v > bv then best, bv = l, v end
          end
          spec_bars(ch, c, g[4], D, best, string.format("Domain share per expert, %s", D.layer_names[best]), true)
        end
      end}

  -- 2. training curves
  if D.metrics then
    add{id = "training", title = "Training curves", subtitle = string.format("%d steps from metrics.jsonl%s",
        #D.metrics, D.eval and "; eval points from checkpoint/trainer_state.json" or ""),
        draw = function(ch, c, a)
          local g = ch.grid(a, 2, 3, 16)
          local colors = ch._colors
          panel_loss(ch, c, g[1], D, true)
          local function metric(area, key, title, ylabel, extra, smooth)
            local xs, ys = {}, {}
            for _, r in ipairs(D.metrics) do
              if finite(r[key]) then xs[#xs + 1], ys[#ys + 1] = r.step, r[key] end
            end
            if #xs == 0 then return end
            local series = {}
            if smooth then
              local rx, ry = downsample(xs, ys, 600)
              local sx, sy = downsample(xs, ema(ys, #ys > 50 and 0.95 or 0.8), 600)
              series[1] = {name = "per step", xs = rx, ys = ry, color = colors.lighten(colors.palette[1], 0.65)}
              series[2] = {name = "EMA", xs = sx, ys = sy, color = colors.palette[1]}
            else
              local rx, ry = downsample(xs, ys, 600)
              series[1] = {name = title, xs = rx, ys = ry, color = colors.palette[1]}
            end
            if extra then series[#series + 1] = hline(extra[1], xs[1], xs[#xs], extra[2]) end
            ch.lines(c, {x = area.x, y = area.y, w = area.w, h = area.h, series = series, title = title,
                         xlabel = "step", ylabel = ylabel, legend = #series > 1, line_width = 1.2})
          end
          local base = require "moelab.analytics.baselines"
          local o = D.train_options
          metric(g[2], "aux_loss", "Auxiliary (balance) loss", nil, nil, true)
          metric(g[3], "z_loss", "Router z-loss", nil, nil, true)
          local mv_base
          if o.batch_size and o.seq_len and D.E > 0 then
            local ok, v = pcall(base.max_vio, o.batch_size * o.seq_len, D.E, D.k)
            if ok and finite(v) then mv_base = {"random routing", v} end
          end
          metric(g[4], "max_vio", "MaxVio (worst layer)", nil, mv_base, true)
          metric(g[5], "router_entropy", "Router entropy (mean over layers)", "nats",
                 D.E > 1 and {"uniform (ln E)", math.log(D.E)} or nil, false)
          metric(g[6], "tokens_per_s", "Throughput", "tokens/s", nil, true)
        end}
  end

  -- 3. expert load
  if D.E > 0 and (D.metrics or D.heldout_load) then
    local _, how = final_load(D)
    local function over_time(ch, c, r, l, title)
      local mat, labels = load_over_time(D, l, 80)
      ch.heatmap(c, {x = r.x, y = r.y, w = r.w, h = r.h, matrix = mat, row_labels = expert_labels(D.E),
                     col_labels = labels, colormap = "diverging", range = {0, 200 / D.E},
                     title = title, xlabel = "step", colorbar_label = "% of assignments"})
    end
    local first = D.metrics and math.min(D.L, PER_PAGE) or 0
    add{id = "load", title = "Expert load", subtitle = D.metrics and string.format(
          "left: per layer, %s; right: per layer over training, mean per bin of steps (white = uniform 1/E = %.1f%%; colour clipped at 2/E)",
          how, 100 / D.E) or "load on the held-out sample",
        draw = function(ch, c, a)
          local lw = D.metrics and math.min(a.w * 0.34, 270) or a.w
          local hh = math.min(a.h * 0.55, 70 + 30 * D.L)
          panel_final_load(ch, c, {x = a.x, y = a.y, w = lw, h = hh}, D, false)
          if D.metrics then
            -- per-layer imbalance over training: max load / mean load - 1 (MaxVio) from the load arrays
            local series = {}
            for l = 1, D.L do
              local xs, ys = {}, {}
              for _, r in ipairs(D.metrics) do
                local ld = r.load and r.load[l]
                if ld then
                  local mx = 0
                  for e = 1, D.E do if (ld[e] or 0) > mx then mx = ld[e] end end
                  xs[#xs + 1], ys[#ys + 1] = r.step, mx * D.E - 1
                end
              end
              local sx, sy = downsample(xs, ema(ys, #ys > 50 and 0.9 or 0.6), 400)
              series[#series + 1] = {name = D.layer_names[l], xs = sx, ys = sy}
            end
            if a.h - hh - 12 >= 120 then
              ch.lines(c, {x = a.x, y = a.y + hh + 12, w = lw, h = a.h - hh - 12, series = series,
                           title = "Imbalance per layer (MaxVio, EMA)", xlabel = "step", line_width = 1.3})
            end
            local n = first
            local g = ch.grid({x = a.x + lw + 18, y = a.y, w = a.w - lw - 18, h = a.h}, n > 2 and 2 or n, n > 2 and 2 or 1, 14)
            for l = 1, n do over_time(ch, c, g[l], l, D.layer_names[l] .. " over training") end
          end
        end}
    if D.metrics and D.L > first then
      for p0 = first + 1, D.L, 6 do
        local p1 = math.min(D.L, p0 + 5)
        add{id = "load-" .. p0, title = "Expert load over training", subtitle = string.format(
              "%s to %s; mean per bin of steps (white = uniform 1/E = %.1f%%; colour clipped at 2/E)",
              D.layer_names[p0], D.layer_names[p1], 100 / D.E),
            draw = function(ch, c, a)
              local g = ch.grid(a, 3, 2, 14)
              for l = p0, p1 do over_time(ch, c, g[l - p0 + 1], l, D.layer_names[l]) end
            end}
      end
    end
  end

  if has_routing then
    -- 4. Sankey
    if D.L >= 2 then
      add{id = "flow", title = "Routing flow", subtitle = "a band: tokens whose top-1 (largest-weight) expert is the left node in one layer and the right node in the next; " .. sample_desc,
          draw = function(ch, c, a) panel_sankey(ch, c, a, D, false) end}
    end
    -- 5. specialization
    for p0 = 1, D.L, PER_PAGE do
      local p1 = math.min(D.L, p0 + PER_PAGE - 1)
      add{id = "specialization-" .. p0, title = "Domain specialization",
          subtitle = string.format("share of each domain's tokens routed to each expert (counted once per chosen expert; uniform: k/E = %.3g); %s",
            D.spec.baseline, sample_desc),
          draw = function(ch, c, a)
            local n = p1 - p0 + 1
            local g = ch.grid(a, n > 2 and 2 or 1, n > 1 and 2 or 1, 16)
            for l = p0, p1 do spec_bars(ch, c, g[l - p0 + 1], D, l, D.layer_names[l]) end
          end}
    end
    -- 6. co-activation
    for p0 = 1, D.L, PER_PAGE do
      local p1 = math.min(D.L, p0 + PER_PAGE - 1)
      add{id = "coactivation-" .. p0, title = "Expert co-activation",
          subtitle = string.format("row i, column j: share of expert i's tokens that also go to expert j, N(Ei, Ej) / N(Ei); random top-%d routing gives %.3g off the diagonal",
            D.k, D.co.baseline),
          draw = function(ch, c, a)
            local n = p1 - p0 + 1
            local g = ch.grid(a, n > 2 and 2 or 1, n > 1 and 2 or 1, 16)
            for l = p0, p1 do
              local m = {}
              for i = 1, D.E do
                m[i] = {}
                for j = 1, D.E do m[i][j] = i == j and 0 / 0 or D.co.layers[l].matrix[i][j] end
              end
              local r = g[l - p0 + 1]
              ch.heatmap(c, {x = r.x, y = r.y, w = r.w, h = r.h, matrix = m, row_labels = expert_labels(D.E),
                             col_labels = expert_labels(D.E), colormap = "sequential", range = {0, 1},
                             title = D.layer_names[l], xlabel = "expert j", ylabel = "expert i",
                             annotate = D.E <= 10, format = "%.2f"})
            end
          end}
    end
    -- 7. affinity
    for p0 = 1, D.L, PER_PAGE do
      local p1 = math.min(D.L, p0 + PER_PAGE - 1)
      add{id = "affinity-" .. p0, title = "Domain and token affinity",
          subtitle = "rows: the tokens of a domain or a byte class; colour: log₂ of the share routed to an expert over uniform k/E; numbers: that ratio",
          draw = function(ch, c, a)
            local n = p1 - p0 + 1
            local g = ch.grid(a, n > 2 and 2 or 1, n > 1 and 2 or 1, 16)
            local base = D.spec.baseline
            for l = p0, p1 do
              local rows, labels = {}, {}
              for _, name in ipairs(D.spec.domains) do
                local d = D.spec.layers[l].domains[name]
                if d then
                  local row = {}
                  for e = 1, D.E do row[e] = math.log(math.max(d.share[e] / base, 1 / 16)) / math.log(2) end
                  rows[#rows + 1], labels[#labels + 1] = row, "domain: " .. name
                end
              end
              for ci, cname in ipairs(CLASSES) do
                local t = D.classes[l][ci]
                if t.n >= 20 then
                  local row = {}
                  for e = 1, D.E do
                    row[e] = math.log(math.max((t.counts[e] or 0) / t.n / base, 1 / 16)) / math.log(2)
                  end
                  rows[#rows + 1], labels[#labels + 1] = row, cname
                end
              end
              local r = g[l - p0 + 1]
              ch.heatmap(c, {x = r.x, y = r.y, w = r.w, h = r.h, matrix = rows, row_labels = labels,
                             col_labels = expert_labels(D.E), colormap = "diverging", range = {-3, 3},
                             title = D.layer_names[l], xlabel = "expert",
                             annotate = D.E <= 12 and n <= 4,
                             format = function(v) return string.format("%.1f", 2 ^ v) end})
            end
          end}
    end
    -- 8. locality
    add{id = "locality", title = "Routing locality",
        subtitle = "how often the next token of a sequence goes to the same expert(s); dashed: random routing",
        draw = function(ch, c, a)
          local g = ch.grid({x = a.x, y = a.y, w = a.w, h = a.h * 0.78}, 1, 2, 24)
          local t1, tk = {}, {}
          for l = 1, D.L do t1[l], tk[l] = D.consec.layers[l].top1, D.consec.layers[l].topk end
          local colors = ch._colors
          ch.bars(c, {x = g[1].x, y = g[1].y, w = g[1].w, h = g[1].h, categories = D.layer_names,
                      series = {{name = "same top-1 expert", values = t1, color = colors.palette[1]}},
                      reference = D.consec.baseline.top1,
                      reference_label = string.format("random 1/E = %.3g", D.consec.baseline.top1),
                      title = "Same top-1 expert at the next token", ylabel = "share of adjacent token pairs",
                      yrange = {0, 1}})
          ch.bars(c, {x = g[2].x, y = g[2].y, w = g[2].w, h = g[2].h, categories = D.layer_names,
                      series = {{name = "top-k overlap", values = tk, color = colors.palette[3]}},
                      reference = D.consec.baseline.topk,
                      reference_label = string.format("random k/E = %.3g", D.consec.baseline.topk),
                      title = string.format("Overlap of the top-%d sets, |S(t) ∩ S(t+1)| / k", D.k),
                      ylabel = "mean over adjacent pairs", yrange = {0, 1}})
          local T = ch.theme
          local y = a.y + a.h * 0.78 + 14
          local lift1 = D.consec.top1 / D.consec.baseline.top1
          c:text(a.x, y, string.format(
            "Averaged over layers, the next token keeps its top-1 expert %.0f%% of the time, %.1f× what random routing gives (%.0f%%). " ..
            "High values mean experts see runs of neighbouring tokens (local, syntax-like routing); values near the line mean routing that ignores position.",
            100 * D.consec.top1, lift1, 100 * D.consec.baseline.top1), {size = 10, color = T.text, valign = "top", width = a.w})
        end}
  end

  -- 9. cost and architecture
  if D.cost then
    add{id = "cost", title = "Cost and architecture",
        subtitle = string.format("MoECostAnalyzer on the configuration (%s profile, %s weights); FLOPs per token of a forward pass at sequence length %d",
          D.cost.hardware.name, D.cost.hardware.dtype, D.train_options.seq_len or 128),
        draw = function(ch, c, a)
          local cost = D.cost
          local p = cost.params
          local cc = cost.config
          local s = D.train_options.seq_len or 128
          local ctx = (s + 1) / 2
          local flops = {
            attention = 2 * cc.layers * (cc.hidden * cc.heads * cc.head_dim + 2 * cc.hidden * cc.kv_heads * cc.head_dim
              + cc.heads * cc.head_dim * cc.hidden) + cost:attention_flops(ctx),
            router = 2 * p.router,
            experts = 2 * (p.experts_active + p.shared_experts),
            ffn = p.dense_ffn > 0 and 2 * p.dense_ffn or nil,
            head = 2 * cc.vocab * cc.hidden,
          }
          local aw = math.min(a.w * 0.58, 470)
          local cfg = D.config
          if cfg.hidden_size then
            ch.architecture(c, {x = a.x, y = a.y, w = aw, h = a.h, config = cfg, flops = flops,
                                title = (cfg.name and tostring(cfg.name) or "Model") .. " architecture"})
          end
          local rx = a.x + aw + 18
          local rw = a.x + a.w - rx
          local g = ch.grid({x = rx, y = a.y, w = rw, h = a.h * 0.72}, 2, 1, 12)
          local colors = ch._colors
          local cats, tot, act = {}, {}, {}
          local function part(name, t, ac)
            if t and t > 0 then cats[#cats + 1], tot[#tot + 1], act[#act + 1] = name, t, ac end
          end
          part("embed", p.embedding, p.embedding)
          part("attn", p.attention, p.attention)
          part("router", p.router, p.router)
          part("experts", p.experts, p.experts_active)
          part("shared", p.shared_experts, p.shared_experts)
          part("FFN", p.dense_ffn, p.dense_ffn)
          part("norms", p.norms + p.final_norm, p.norms + p.final_norm)
          part("head", p.lm_head, p.lm_head)
          ch.bars(c, {x = g[1].x, y = g[1].y, w = g[1].w, h = g[1].h, categories = cats,
                      series = {{name = "total", values = tot, color = colors.palette[1]},
                                {name = "active per token", values = act, color = colors.palette[2]}},
                      title = "Parameters by component", ylabel = "parameters"})
          local b = D.train_options.batch_size or 8
          local mem = cost:memory{batch_size = b, sequence_length = s}
          local mcats = {"weights", "grads", "AdamW", "master", "activ."}
          local mvals = {mem.weights / 1e6, mem.gradients / 1e6, mem.optimizer / 1e6, mem.master_weights / 1e6,
                         mem.activations / 1e6}
          ch.bars(c, {x = g[2].x, y = g[2].y, w = g[2].w, h = g[2].h, categories = mcats,
                      series = {{name = "MB", values = mvals, color = colors.palette[3]}},
                      title = string.format("Training memory, batch %d × %d", b, s), ylabel = "MB"})
          local T = ch.theme
          local ty = a.y + a.h * 0.72 + 12
          local dec = cost:analyze{batch_size = 1, sequence_length = s, mode = "decode"}
          local lines = {
            string.format("parameters: %s total, %s active per token (%.0f%%)", count_str(cost.total_params),
              count_str(cost.active_params), 100 * cost.active_params / cost.total_params),
            string.format("forward FLOPs per token: %s (training %s)", si(cost:flops_per_token(s)),
              si(cost:flops_per_token(s, {mode = "train"}))),
            string.format("training memory: %s (weights %s, AdamW %s, activations %s)", bytes_str(mem.total),
              bytes_str(mem.weights), bytes_str(mem.optimizer), bytes_str(mem.activations)),
            string.format("decode at batch 1 on %s: %s per step, %s tokens/s, %s-bound", cost.hardware.name,
              bytes_str(dec.bytes), count_str(dec.throughput), dec.bound),
          }
          c:text(rx, ty, table.concat(lines, "\n"), {size = 9, color = T.text, valign = "top", width = rw})
        end}
  end
  return pages
end

return {make_pages = make_pages}
