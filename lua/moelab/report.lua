--- moelab.report: routing reports of a training run (PDF, HTML, PNG).
--
--   local report = require "moelab.report"
--   report.build{run_dir = "runs/quickstart", save_to = "runs/quickstart/report.pdf"}
--   report.build{run_dir = "runs/x", save_to = {"x.pdf", "x.html", "x.png"}}   -- one analysis, three files
--   report.build{model = model, history = trainer.history, save_to = "r.html"}  -- no run directory
--   moelab report RUN_DIR [-o out.pdf|.html|.png] [--format pdf,html,png]     -- report.main(arg)
--
-- What it reads from a run directory: metrics.jsonl (one JSON object per
-- step: loss, aux_loss, z_loss, lr, grad_norm, tokens_per_s, max_vio,
-- drop_rate, router_entropy, load = per-MoE-layer expert load fractions),
-- checkpoint/ (config.json, model.safetensors, trainer_state.json with the
-- evaluation points and the training options) or model/ (config.json +
-- model.safetensors). What it runs: the model in evaluation mode over a
-- held-out sample (default: num_samples sequences of a fresh built-in
-- corpus, generated with a seed the training corpus does not use, so every
-- token carries a domain label) through moe.RouterAnalyzer, and
-- moe.MoECostAnalyzer on the configuration.
--
-- Pages (the PDF; the HTML has the same figures as inline SVG, the PNG is
-- the first page):
--   1 overview      run summary, loss curve, expert load, top-1 flow, specialization
--   2 training      loss (train, EMA, eval), aux loss, z-loss, MaxVio, router entropy, tokens/s
--   3 expert load   layer x expert at the end of training; load over training per layer
--   4 routing flow  Sankey of each token's top-1 expert across the MoE layers
--   5 specialization  per layer, share of each domain's tokens per expert vs uniform k/E
--   6 co-activation per layer, N(Ei, Ej) / N(Ei) with the random baseline
--   7 affinity      domain and token class x expert, relative to uniform routing
--   8 locality      consecutive-token same-expert rate vs random routing
--   9 cost          parameters, FLOPs per token, memory, and the architecture diagram
-- A layer-by-layer page continues on further pages when there are more
-- than four MoE layers; a page whose inputs are missing (no checkpoint, no
-- metrics) is left out and the overview says why.
local mio = require "moelab.io"

local M = {}

local floor, ceil, max, min, abs = math.floor, math.ceil, math.max, math.min, math.abs
local PAGE_W, PAGE_H = 842, 595        -- A4 landscape, in points
local PER_PAGE = 4                     -- per-layer panels on a page

-- ------------------------------------------------------------- helpers

local function fail(fmt, ...) error("report: " .. string.format(fmt, ...), 0) end

local function finite(v) return type(v) == "number" and v == v and v ~= math.huge and v ~= -math.huge end

local function file_exists(path)
  local f = io.open(path, "rb")
  if f then f:close(); return true end
  return false
end

local function si(v, unit)
  unit = unit or ""
  if not finite(v) then return "–" end
  local a = abs(v)
  for _, u in ipairs{{1e15, "P"}, {1e12, "T"}, {1e9, "G"}, {1e6, "M"}, {1e3, "k"}} do
    if a >= u[1] then return string.format("%.3g %s%s", v / u[1], u[2], unit) end
  end
  return string.format("%.3g %s", v, unit)
end

local function count_str(v)
  if not finite(v) then return "–" end
  if v >= 1e9 then return string.format("%.2fB", v / 1e9) end
  if v >= 1e6 then return string.format("%.2fM", v / 1e6) end
  if v >= 1e3 then return string.format("%.1fk", v / 1e3) end
  return string.format("%d", v)
end

local function bytes_str(v)
  if not finite(v) then return "–" end
  if v >= 1e9 then return string.format("%.2f GB", v / 1e9) end
  if v >= 1e6 then return string.format("%.1f MB", v / 1e6) end
  if v >= 1e3 then return string.format("%.1f kB", v / 1e3) end
  return string.format("%d B", v)
end

local function html_escape(s)
  return (tostring(s):gsub("[&<>\"]", {["&"] = "&amp;", ["<"] = "&lt;", [">"] = "&gt;", ['"'] = "&quot;"}))
end

local function median(t)
  local s = {}
  for _, v in ipairs(t) do if finite(v) then s[#s + 1] = v end end
  if #s == 0 then return nil end
  table.sort(s)
  local m = (#s + 1) / 2
  return (s[floor(m)] + s[ceil(m)]) / 2
end

-- exponential moving average, debiased (as TensorBoard's smoothing)
local function ema(ys, alpha)
  local out, m, w = {}, 0, 0
  for i, v in ipairs(ys) do
    if finite(v) then
      m = alpha * m + (1 - alpha) * v
      w = alpha * w + (1 - alpha)
      out[i] = m / w
    end
  end
  return out
end

-- at most n points: means over equal runs of consecutive points
local function downsample(xs, ys, n)
  if #xs <= n then return xs, ys end
  local ox, oy = {}, {}
  local per = #xs / n
  for b = 1, n do
    local i0, i1 = floor((b - 1) * per) + 1, floor(b * per)
    local sx, sy, cnt = 0, 0, 0
    for i = i0, i1 do
      if finite(ys[i]) then sx, sy, cnt = sx + xs[i], sy + ys[i], cnt + 1 end
    end
    if cnt > 0 then ox[#ox + 1], oy[#oy + 1] = sx / cnt, sy / cnt end
  end
  return ox, oy
end

-- a flat line series with enough points that charts.lines draws no markers on it
local function hline(name, x0, x1, y, color)
  local xs, ys = {}, {}
  for i = 0, 40 do xs[i + 1] = x0 + (x1 - x0) * i / 40; ys[i + 1] = y end
  return {name = name, xs = xs, ys = ys, color = color or "#404040", dash = {5, 3}}
end

local Progress = {}
Progress.__index = Progress
local function progress(on)
  local clock = os.clock
  local ok, core = pcall(require, "moelab.core")
  if ok and core.clock then clock = core.clock end
  return setmetatable({on = on, clock = clock, t0 = clock()}, Progress)
end
function Progress:say(fmt, ...)
  if not self.on then return end
  io.write(string.format("report: %-44s %6.1f s\n", string.format(fmt, ...), self.clock() - self.t0))
  io.flush()
end

-- ------------------------------------------------------------ reading a run

local function read_metrics(path)
  local f = io.open(path, "r")
  if not f then return nil end
  local by_step, order = {}, {}
  local n = 0
  for line in f:lines() do
    n = n + 1
    if line:match("%S") then
      local ok, rec = pcall(mio.json.decode, line)
      if ok and type(rec) == "table" and type(rec.step) == "number" then
        if not by_step[rec.step] then order[#order + 1] = rec.step end
        by_step[rec.step] = rec          -- a resumed run may repeat steps: the last record wins
      end
    end
  end
  f:close()
  table.sort(order)
  local list = {}
  for _, s in ipairs(order) do list[#list + 1] = by_step[s] end
  return list
end

-- trainer.history records (in memory) in the metrics.jsonl shape
local function from_history(history)
  local list = {}
  for _, r in ipairs(history) do
    local rec = {}
    for k, v in pairs(r) do if k ~= "routing" then rec[k] = v end end
    if r.routing then
      rec.load = {}
      for i, s in pairs(r.routing) do rec.load[i] = s.load end
    end
    list[#list + 1] = rec
  end
  return list
end

local function read_json(path)
  local ok, text = pcall(mio.read_file, path)
  if not ok then return nil end
  local ok2, v = pcall(mio.json.decode, text)
  if ok2 and type(v) == "table" then return v end
  return nil
end

-- ------------------------------------------------------------ token classes

local CLASSES = {"digits 0–9", "+ − * / =", "letters a–z", "letters A–Z", "space", "newline",
                 "brackets ( ) [ ] { }", "punctuation"}
local function token_class(id)
  if id >= 48 and id <= 57 then return 1 end
  if id == 43 or id == 45 or id == 42 or id == 47 or id == 61 then return 2 end
  if id >= 97 and id <= 122 then return 3 end
  if id >= 65 and id <= 90 then return 4 end
  if id == 32 then return 5 end
  if id == 10 or id == 13 then return 6 end
  if id == 40 or id == 41 or id == 91 or id == 93 or id == 123 or id == 125 then return 7 end
  return 8
end

-- ------------------------------------------------------------ collecting

local build_keys = {run_dir = true, save_to = true, dataset = true, num_samples = true, seq_len = true,
                    batch_size = true, seed = true, model = true, history = true, train_options = true,
                    title = true, progress = true, hardware_profile = true, png_scale = true}

--- collect(opts) -> the report's data (everything the renderers draw).
function M.collect(opts)
  local P = opts._progress or progress(opts.progress ~= false)
  local D = {notes = {}, run_dir = opts.run_dir, png_scale = opts.png_scale}
  local run = opts.run_dir
  if run ~= nil and (type(run) ~= "string" or run == "") then fail("run_dir must be a directory path, got %s", type(run)) end
  if run then run = run:gsub("/+$", ""); D.run_dir = run end

  -- metrics
  if opts.history then
    if type(opts.history) ~= "table" then fail("history must be a list of step records (trainer.history)") end
    D.metrics = from_history(opts.history)
  elseif run then
    D.metrics = read_metrics(run .. "/metrics.jsonl")
    if D.metrics then P:say("read %d steps of metrics.jsonl", #D.metrics) end
  end
  if D.metrics and #D.metrics == 0 then D.metrics = nil end
  if not D.metrics then D.notes[#D.notes + 1] = "no metrics.jsonl: training curves and load over training left out" end

  -- the model and trainer state
  local model = opts.model
  local state
  if run then
    for _, sub in ipairs{"checkpoint", "model"} do
      local d = run .. "/" .. sub
      if not model and file_exists(d .. "/config.json") and file_exists(d .. "/model.safetensors") then
        local ok, m = pcall(require("moelab.checkpoint").load, d)
        if ok then
          model = m
          D.model_dir = d
          P:say("loaded the model from %s", d)
        else
          D.notes[#D.notes + 1] = "could not load " .. d .. ": " .. tostring(m)
        end
      end
    end
    state = read_json(run .. "/checkpoint/trainer_state.json")
  end
  if model ~= nil and (type(model) ~= "table" or not model.net) then fail("model must be a moe.MoEModel") end
  if not model and not D.metrics then
    fail("%s has neither metrics.jsonl nor a loadable checkpoint/ or model/ directory", run or "the input")
  end
  D.model = model
  D.train_options = opts.train_options or (state and state.train_options) or {}
  if state and type(state.history) == "table" then
    D.eval = {}
    for _, r in ipairs(state.history) do
      if finite(r.eval_loss) then D.eval[#D.eval + 1] = {step = r.step, loss = r.eval_loss} end
    end
  elseif opts.history then
    D.eval = {}
    for _, r in ipairs(opts.history) do
      if finite(r.eval_loss) then D.eval[#D.eval + 1] = {step = r.step, loss = r.eval_loss} end
    end
  end
  if D.eval and #D.eval == 0 then D.eval = nil end
  D.config = model and model.config or (run and (read_json(run .. "/checkpoint/config.json") or
    read_json(run .. "/model/config.json"))) or {}
  D.name = opts.title or (run and run:match("([^/]+)$")) or D.config.name or "model"

  -- the layer structure: load arrays (metrics) or the model's MoE layers
  local E = D.config.num_experts
  local L
  if model then L = #model:moe_layers() end
  if D.metrics then
    local last = D.metrics[#D.metrics]
    if type(last.load) == "table" then
      L = L or #last.load
      for _, row in pairs(last.load) do E = E or #row end
    end
  end
  D.L, D.E = L or 0, E or 0
  D.k = D.config.experts_per_token or 1
  local layer_ids = require("moelab.analytics.traces").moe_layer_indices(D.config.num_layers and D.config or nil, D.L)
  D.layer_names = {}
  local all_moe = (D.config.num_layers == nil) or (#layer_ids == D.config.num_layers)
  for l = 1, D.L do
    D.layer_names[l] = all_moe and string.format("layer %d", l) or
      string.format("layer %d", (layer_ids[l] or (l - 1)) + 1)
  end

  -- params and cost
  local okc, cost = pcall(require("moelab.cost").MoECostAnalyzer,
    {model = model or D.config, hardware_profile = opts.hardware_profile})
  if okc then D.cost = cost else D.notes[#D.notes + 1] = "cost analysis unavailable: " .. tostring(cost) end
  if model then
    D.total_params, D.active_params = model:num_params(), model:num_active_params()
  elseif D.cost then
    D.total_params, D.active_params = D.cost.total_params, D.cost.active_params
  end

  -- routing analyses on a held-out sample
  if model and D.L > 0 then
    local ds = opts.dataset
    local seed = opts.seed or 0
    if ds == nil then
      if (D.config.vocab_size or 256) < 256 then
        D.notes[#D.notes + 1] = "the model's vocabulary is smaller than bytes: pass dataset= for routing analyses"
      else
        -- a fresh corpus: the training recipes use seeds 1..9, this one is not among them
        ds = require("moelab.data").corpus{seed = 8191, num_bytes = 262144}
        D.sample_source = "fresh built-in corpus (seed 8191)"
      end
    else
      D.sample_source = tostring(ds)
    end
    if ds ~= nil then
      local an = require("moelab.analytics").RouterAnalyzer(model)
      local ns = opts.num_samples or 32
      local sl = opts.seq_len or math.min(D.train_options.seq_len or 128, 256)
      local bs = opts.batch_size or 8
      local src = {dataset = ds, num_samples = ns, seq_len = sl, batch_size = bs, seed = seed}
      D.sample = {sequences = ns, seq_len = sl, tokens = ns * sl}
      local function with(extra)
        local t = {}
        for k2, v in pairs(src) do t[k2] = v end
        for k2, v in pairs(extra or {}) do t[k2] = v end
        return t
      end
      D.spec = an:compute_expert_specialization(with{top_tokens = 5})
      P:say("domain specialization (%d tokens)", D.spec.tokens)
      D.co = an:co_activation(with())
      P:say("co-activation")
      D.consec = an:consecutive_rate(with())
      P:say("consecutive-token rate")
      -- top-1 flows, token classes and the held-out loss, from the same batches
      local flows, cls = {}, {}
      for l = 1, D.L do
        cls[l] = {}
        for c = 1, #CLASSES do cls[l][c] = {n = 0, counts = {}} end
      end
      local was = model.net:is_training()
      model:train(false)
      local loss_sum, loss_n = 0, 0
      local done, step = 0, 0
      while done < ns do
        local b = math.min(bs, ns - done)
        local ids, targets = ds:batch{batch_size = b, seq_len = sl, seed = seed, step = step}
        local r = an:analyze_batch(ids)
        for n = 1, #r.ids do
          local path = {}
          for l = 1, D.L do path[l] = r.layers[l].experts[n][1] or false end
          flows[#flows + 1] = path
          local c = token_class(r.ids[n])
          for l = 1, D.L do
            local t = cls[l][c]
            t.n = t.n + 1
            for _, e in ipairs(r.layers[l].experts[n]) do t.counts[e + 1] = (t.counts[e + 1] or 0) + 1 end
          end
        end
        local out = model:forward(ids, {targets = targets})
        loss_sum = loss_sum + out.loss:item() * b
        loss_n = loss_n + b
        out.tape:reset()
        out.logits:free()
        done, step = done + b, step + 1
      end
      model:train(was)
      D.flows, D.classes = flows, cls
      D.sample.loss = loss_sum / math.max(loss_n, 1)
      P:say("top-1 flows, token classes, held-out loss")
      -- held-out load, for runs without metrics
      if not D.metrics then
        local mon = require("moelab.analytics").RouterMonitor(model)
        mon:run_dataset(ds, {batches = math.max(1, floor(ns / bs)), batch_size = bs, seq_len = sl})
        D.heldout_load = mon:get_stats().load
      end
    end
  elseif D.L == 0 then
    D.notes[#D.notes + 1] = "no MoE layers found"
  else
    D.notes[#D.notes + 1] = "no loadable checkpoint/ or model/: routing analyses on held-out text left out"
  end
  return D
end

-- ------------------------------------------------------------ derived data

-- final load matrix (layer x expert): mean over the last steps of training
local function final_load(D)
  if D.metrics then
    local n = #D.metrics
    local last = math.max(1, math.min(20, floor(n * 0.05)))
    local mat = {}
    for l = 1, D.L do
      mat[l] = {}
      for e = 1, D.E do
        local s, cnt = 0, 0
        for i = n - last + 1, n do
          local ld = D.metrics[i].load
          local v = ld and ld[l] and ld[l][e]
          if finite(v) then s, cnt = s + v, cnt + 1 end
        end
        mat[l][e] = cnt > 0 and s / cnt or 0 / 0
      end
    end
    return mat, last == 1 and "last step" or string.format("mean of the last %d steps", last)
  end
  if D.heldout_load then
    local mat = {}
    for l = 1, D.L do mat[l] = D.heldout_load[l] or {} end
    return mat, "held-out sample"
  end
end

-- layer x step-bin matrix of one layer's load over training: rows experts
local function nice_bin(n, most)
  local want = n / most
  for _, m in ipairs{1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000, 2000, 2500, 5000, 10000} do
    if m >= want then return m end
  end
  return ceil(want / 10000) * 10000
end

local function load_over_time(D, l, most)
  local n = #D.metrics
  local bin = nice_bin(n, most)
  local nbins = ceil(n / bin)
  local mat, labels = {}, {}
  for e = 1, D.E do mat[e] = {} end
  for b = 1, nbins do
    local i0, i1 = (b - 1) * bin + 1, math.min(n, b * bin)
    for e = 1, D.E do
      local s, cnt = 0, 0
      for i = i0, i1 do
        local ld = D.metrics[i].load
        local v = ld and ld[l] and ld[l][e]
        if finite(v) then s, cnt = s + v, cnt + 1 end
      end
      mat[e][b] = cnt > 0 and 100 * s / cnt or 0 / 0
    end
    labels[b] = tostring(D.metrics[i0].step - 1)
  end
  return mat, labels
end

local function expert_labels(E)
  local t = {}
  for e = 1, E do t[e] = "E" .. (e - 1) end
  return t
end

-- how strongly a layer separates domains: mean over domains of KL(share/k || uniform)
local function layer_specialization(D, l)
  local lay = D.spec and D.spec.layers[l]
  if not lay then return 0 end
  local total, nd = 0, 0
  for _, d in pairs(lay.domains) do
    local kl = 0
    local ssum = 0
    for e = 1, D.E do ssum = ssum + d.share[e] end
    for e = 1, D.E do
      local p = ssum > 0 and d.share[e] / ssum or 0
      if p > 0 then kl = kl + p * math.log(p * D.E) end
    end
    total, nd = total + kl, nd + 1
  end
  return nd > 0 and total / nd or 0
end

local function summary_rows(D)
  local c = D.config
  local rows = {}
  local function add(k, v) rows[#rows + 1] = {k, v} end
  local arch = c.name and tostring(c.name) or "MoE"
  add("model", string.format("%s, %d layers, d_model %s", arch, c.num_layers or D.L, tostring(c.hidden_size or "?")))
  if D.E > 0 then
    local router = ({topk = "top", noisy_topk = "noisy top", expert_choice = "expert choice, ~",
                     sinkhorn = "Sinkhorn top"})[c.router or "topk"] or (tostring(c.router) .. " ")
    add("experts", string.format("%d per layer, %s-%d, %s", D.E, router, D.k, c.router_score or "softmax"))
  end
  if c.num_heads then
    add("attention", string.format("%d heads, %d KV heads%s", c.num_heads, c.num_kv_heads or c.num_heads,
      c.qk_norm and ", QK-norm" or ""))
  end
  if D.total_params then
    add("parameters", string.format("%s total, %s active (%.0f%%)", count_str(D.total_params),
      count_str(D.active_params), 100 * D.active_params / D.total_params))
  end
  local o = D.train_options
  if D.metrics then
    local last = D.metrics[#D.metrics]
    local tok = (o.batch_size and o.seq_len) and o.batch_size * o.seq_len * (o.accum or 1) or nil
    add("training", string.format("%d steps%s", last.step, tok and string.format(", %s tokens", count_str(tok * last.step)) or ""))
    if o.batch_size then
      add("batch, lr", string.format("%d × %d, %.3g %s", o.batch_size, o.seq_len or 0, o.learning_rate or 0,
        o.lr_schedule or ""))
    end
    local tail = {}
    for i = math.max(1, #D.metrics - 9), #D.metrics do tail[#tail + 1] = D.metrics[i].loss end
    local s = 0
    for _, v in ipairs(tail) do s = s + (v or 0) end
    add("train loss", string.format("%.3f (last %d steps)", s / #tail, #tail))
  end
  if D.eval then
    local e = D.eval[#D.eval]
    add("eval loss", string.format("%.3f at step %d (ppl %.2f)", e.loss, e.step, math.exp(e.loss)))
  end
  if D.sample and D.sample.loss then
    add("held-out loss", string.format("%.3f (%s report-sample tokens)", D.sample.loss, count_str(D.sample.tokens)))
  end
  if D.metrics then
    local tps = {}
    for i, r in ipairs(D.metrics) do tps[i] = r.tokens_per_s end
    local m = median(tps)
    if m then add("throughput", string.format("%s tokens/s (median)", count_str(m))) end
    local last = D.metrics[#D.metrics]
    if finite(last.max_vio) then
      add("final routing", string.format("MaxVio %.2f, drop %.1f%%", last.max_vio, 100 * (last.drop_rate or 0)))
    end
  end
  if D.consec then
    add("next token", string.format("same top-1 %.0f%% (random %.0f%%)", 100 * D.consec.top1,
      100 * D.consec.baseline.top1))
  end
  return rows
end

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

-- ------------------------------------------------------------ rendering

local function need_viz()
  local ok, viz = pcall(require, "moelab.viz")
  if not ok then fail("%s", tostring(viz)) end
  local ch = viz.charts
  ch._colors = viz.colors
  return viz, ch
end

local function draw_page(ch, c, page, index, total, D)
  local area = ch.page(c, {title = page.title, subtitle = page.subtitle, margin = 30})
  area.h = area.h - 10                      -- room for the footer
  page.draw(ch, c, area)
  local T = ch.theme
  local W, H = c:size()
  c:line(30, H - 26, W - 30, H - 26, {width = 0.5, color = T.grid})
  c:text(30, H - 22, "moelab routing report · " .. D.name, {size = 9, color = T.muted, valign = "top"})
  if total > 1 then
    c:text(W - 30, H - 22, string.format("%d / %d", index, total), {size = 9, color = T.muted, valign = "top", align = "right"})
  end
end

local function render_pdf(D, pages, path)
  local viz, ch = need_viz()
  local c = viz.canvas{path = path, width = PAGE_W, height = PAGE_H}
  local ok, err = pcall(function()
    for i, p in ipairs(pages) do
      if i > 1 then c:new_page() end
      draw_page(ch, c, p, i, #pages, D)
    end
  end)
  if not ok then pcall(c.finish, c); error(err, 0) end
  c:finish()
end

local function render_png(D, pages, path, scale)
  scale = scale or D.png_scale
  local viz, ch = need_viz()
  local c = viz.canvas{path = path, width = PAGE_W, height = PAGE_H, scale = scale or 2}
  local ok, err = pcall(draw_page, ch, c, pages[1], 1, 1, D)
  if not ok then pcall(c.finish, c); error(err, 0) end
  c:finish()
end

-- An SVG document from cairo made fit to sit inline in HTML next to others:
-- no XML prolog, no namespace declarations (the HTML parser knows SVG and
-- xlink:href), and every id prefixed so that two figures' glyph and clip
-- definitions never collide.
local function inline_svg(svg, prefix)
  svg = svg:gsub("^%s*<%?xml[^>]*%?>%s*", "")
  svg = svg:gsub('%s+xmlns:xlink="[^"]*"', ""):gsub('%s+xmlns="[^"]*"', "")
  svg = svg:gsub('(%sid=")', "%1" .. prefix)
  svg = svg:gsub('(href=")#', "%1#" .. prefix)
  svg = svg:gsub("url%(#", "url(#" .. prefix)
  svg = svg:gsub('<svg%s+width="[^"]*"%s+height="[^"]*"', '<svg role="img" class="fig"', 1)
  return svg
end

local CSS = [[
:root { --fg: #1f1f1f; --muted: #595959; --rule: #e4e4e4; --accent: #2c6fbb; }
* { box-sizing: border-box; }
body { margin: 0; font: 15px/1.5 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif;
       color: var(--fg); background: #f6f6f4; }
main { max-width: 1100px; margin: 0 auto; padding: 24px 20px 60px; }
header h1 { font-size: 26px; margin: 8px 0 2px; }
header p { margin: 0; color: var(--muted); }
nav { margin: 16px 0 8px; display: flex; flex-wrap: wrap; gap: 6px 14px; font-size: 14px; }
nav a { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
section { background: #fff; border: 1px solid var(--rule); border-radius: 6px; padding: 14px 18px 10px; margin: 18px 0; }
section h2 { font-size: 18px; margin: 0 0 2px; }
section p.sub { margin: 0 0 8px; color: var(--muted); font-size: 13px; }
svg.fig { display: block; width: 100%; height: auto; }
table.summary { border-collapse: collapse; font-size: 14px; }
table.summary th { text-align: left; font-weight: normal; color: var(--muted); padding: 2px 18px 2px 0; vertical-align: top; }
table.summary td { padding: 2px 0; }
ul.notes { color: var(--muted); font-size: 13px; }
footer { color: var(--muted); font-size: 12px; text-align: center; }
@media print { body { background: #fff; } section { break-inside: avoid; border: none; } nav { display: none; } }
]]

local function render_html(D, pages, path)
  local viz, ch = need_viz()
  local out = {}
  local function w(s) out[#out + 1] = s end
  local ov = pages[1]
  w("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n")
  w("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n")
  w("<title>" .. html_escape(ov.title) .. "</title>\n<style>" .. CSS .. "</style>\n</head>\n<body>\n<main>\n")
  w("<header><h1>" .. html_escape(ov.title) .. "</h1><p>" .. html_escape(ov.subtitle or "") .. "</p></header>\n")
  w("<nav>")
  w("<a href=\"#summary\">Summary</a>")
  for _, p in ipairs(pages) do w("<a href=\"#" .. p.id .. "\">" .. html_escape(p.id == "overview" and "Overview" or p.title) .. "</a>") end
  w("</nav>\n")
  w("<section id=\"summary\"><h2>Summary</h2>\n<table class=\"summary\">\n")
  for _, r in ipairs(summary_rows(D)) do
    w("<tr><th>" .. html_escape(r[1]) .. "</th><td>" .. html_escape(r[2]) .. "</td></tr>\n")
  end
  w("</table>\n")
  if #D.notes > 0 then
    w("<ul class=\"notes\">")
    for _, n in ipairs(D.notes) do w("<li>" .. html_escape(n) .. "</li>") end
    w("</ul>\n")
  end
  w("</section>\n")
  for i, p in ipairs(pages) do
    local svg = viz.svg_string(PAGE_W, PAGE_H, function(c)
      c:rect(0, 0, PAGE_W, PAGE_H, {color = "#ffffff"})
      local area = ch.page(c, {margin = 20})
      p.draw(ch, c, area)
    end)
    w(string.format("<section id=\"%s\"><h2>%s</h2>", p.id, html_escape(i == 1 and "Overview" or p.title)))
    if p.subtitle and i > 1 then w("<p class=\"sub\">" .. html_escape(p.subtitle) .. "</p>") end
    w("\n" .. inline_svg(svg, string.format("f%d-", i)) .. "\n</section>\n")
  end
  w("<footer>moelab routing report · generated " .. html_escape(os.date("%Y-%m-%d %H:%M")) .. "</footer>\n")
  w("</main>\n</body>\n</html>\n")
  mio.write_file_atomic(path, table.concat(out))
end

local function format_of(path)
  local ext = type(path) == "string" and path:match("%.([%w]+)$")
  ext = ext and ext:lower()
  if ext == "htm" then ext = "html" end
  if ext == "pdf" or ext == "html" or ext == "png" then return ext end
  return nil
end

--- render(D, path): writes the report collected in D to path (.pdf, .html, .png).
function M.render(D, path, P)
  local fmt = format_of(path)
  if not fmt then fail("save_to must end in .pdf, .html or .png, got %s", tostring(path)) end
  local dir = path:match("^(.*)/[^/]*$")
  if dir and dir ~= "" then mio.mkdir_p(dir) end
  local pages = D._pages or make_pages(D)
  D._pages = pages
  if fmt == "pdf" then render_pdf(D, pages, path)
  elseif fmt == "html" then render_html(D, pages, path)
  else render_png(D, pages, path) end
  if P then P:say("wrote %s (%s%s)", path, fmt:upper(), fmt == "pdf" and string.format(", %d pages", #pages) or "") end
  return path
end

--- build{run_dir=, save_to = "x.pdf" | "x.html" | "x.png" | {list}, dataset=, num_samples=32,
--   seq_len=, batch_size=8, seed=0, model=, history=, train_options=, title=, progress=true,
--   hardware_profile=}
-- -> the path written (or the list of paths when save_to is a list), and the collected data.
-- run_dir: a run directory (metrics.jsonl, checkpoint/ or model/); or model = a moe.MoEModel
-- with history = trainer.history (and train_options) for a model in memory.
function M.build(opts)
  if type(opts) ~= "table" then fail("expected a table {run_dir=, save_to=}, got %s", type(opts)) end
  for k in pairs(opts) do
    if not build_keys[k] then
      local names = {}
      for n in pairs(build_keys) do names[#names + 1] = n end
      table.sort(names)
      fail("unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
  if opts.run_dir == nil and opts.model == nil then fail("give run_dir = <run directory> or model = <moe.MoEModel>") end
  local targets = opts.save_to
  if targets == nil then
    if not opts.run_dir then fail("save_to is required without run_dir") end
    targets = opts.run_dir:gsub("/+$", "") .. "/report.pdf"
  end
  local list = type(targets) == "table" and targets or {targets}
  if #list == 0 then fail("save_to is an empty list") end
  for _, t in ipairs(list) do
    if not format_of(t) then fail("save_to must end in .pdf, .html or .png, got %s", tostring(t)) end
  end
  if opts.num_samples ~= nil and (type(opts.num_samples) ~= "number" or opts.num_samples < 1 or opts.num_samples % 1 ~= 0) then
    fail("num_samples must be a positive integer, got %s", tostring(opts.num_samples))
  end
  need_viz()
  local P = progress(opts.progress ~= false)
  local copt = {}
  for k, v in pairs(opts) do copt[k] = v end
  copt._progress = P
  local D = M.collect(copt)
  local written = {}
  for _, t in ipairs(list) do written[#written + 1] = M.render(D, t, P) end
  if type(targets) == "table" then return written, D end
  return written[1], D
end

-- ------------------------------------------------------------ command line

local USAGE = [[
usage: moelab report RUN_DIR [-o OUT] [--format pdf,html,png] [--samples N] [--quiet]

Writes a routing report of a training run: training curves, expert load,
top-1 routing flow, domain specialization, co-activation, token affinity,
routing locality, cost and the architecture. RUN_DIR holds metrics.jsonl and
checkpoint/ (or model/), as MoETrainer{run_dir = ...} writes them.

  -o OUT          output file; its extension (.pdf, .html, .png) picks the format
                  (default: RUN_DIR/report.pdf and RUN_DIR/report.html)
  --format LIST   formats to write, comma-separated, from pdf, html, png; with -o,
                  OUT's extension is replaced for each
  --samples N     held-out sequences the routing analyses run on (default 32)
  --quiet         no progress lines
  -h, --help      this help
]]

--- main(args): the `moelab report` subcommand; args is the program's `arg`
-- (args[1] = RUN_DIR, ...). Returns the exit status (0, 1 on failure, 2 on a usage error).
function M.main(args)
  args = args or {}
  local run_dir, out, formats, samples, quiet
  local i = 1
  local function usage_error(msg)
    io.stderr:write("moelab report: ", msg, "\n", USAGE)
    return 2
  end
  while args[i] ~= nil do
    local a = args[i]
    if a == "-h" or a == "--help" then io.write(USAGE); return 0
    elseif a == "-o" or a == "--output" then
      out = args[i + 1]; i = i + 1
      if not out then return usage_error("-o needs a file name") end
    elseif a:match("^%-%-output=") then out = a:sub(10)
    elseif a == "--format" then
      formats = args[i + 1]; i = i + 1
      if not formats then return usage_error("--format needs a list such as pdf,html") end
    elseif a:match("^%-%-format=") then formats = a:sub(10)
    elseif a == "--samples" then
      samples = tonumber(args[i + 1]); i = i + 1
      if not samples or samples < 1 or samples % 1 ~= 0 then return usage_error("--samples needs a positive integer") end
    elseif a == "--quiet" or a == "-q" then quiet = true
    elseif a:sub(1, 1) == "-" and a ~= "-" then return usage_error("unknown option '" .. a .. "'")
    elseif run_dir then return usage_error("one RUN_DIR only (got '" .. run_dir .. "' and '" .. a .. "')")
    else run_dir = a end
    i = i + 1
  end
  if not run_dir then return usage_error("RUN_DIR is missing") end
  local fmts = {}
  if formats then
    for f in formats:gmatch("[^,%s]+") do
      f = f:lower()
      if f == "htm" then f = "html" end
      if f ~= "pdf" and f ~= "html" and f ~= "png" then return usage_error("unknown format '" .. f .. "' (pdf, html, png)") end
      fmts[#fmts + 1] = f
    end
    if #fmts == 0 then return usage_error("--format lists no format") end
  end
  local targets = {}
  local base = run_dir:gsub("/+$", "") .. "/report"
  if out then
    local f = format_of(out)
    if #fmts == 0 then
      if not f then return usage_error("cannot tell the format of '" .. out .. "' (use .pdf, .html or .png)") end
      targets[1] = out
    else
      local stem = f and out:gsub("%.[%w]+$", "") or out
      for _, x in ipairs(fmts) do targets[#targets + 1] = stem .. "." .. x end
    end
  else
    if #fmts == 0 then fmts = {"pdf", "html"} end
    for _, x in ipairs(fmts) do targets[#targets + 1] = base .. "." .. x end
  end
  local ok, res = pcall(M.build, {run_dir = run_dir, save_to = targets, num_samples = samples, progress = not quiet})
  if not ok then
    io.stderr:write("moelab ", tostring(res), "\n")
    return 1
  end
  for _, p in ipairs(res) do print(p) end
  return 0
end

return M
