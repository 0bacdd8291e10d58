--- The data side of moelab.report: reading a run (metrics.jsonl, checkpoint,
-- model), running the analyses (M.collect) and deriving what the pages
-- draw. report.lua renders; report_pages.lua lays out the pages.
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

-- shared with report_pages.lua and report.lua (not public API)
M._data = {floor = floor, ceil = ceil, max = max, min = min, abs = abs, PAGE_W = PAGE_W, PAGE_H = PAGE_H, PER_PAGE = PER_PAGE, fail = fail, finite = finite, file_exists = file_exists, si = si, count_str = count_str, bytes_str = bytes_str, html_escape = html_escape, median = median, ema = ema, downsample = downsample, hline = hline, Progress = Progress, progress = progress, read_metrics = read_metrics, from_history = from_history, read_json = read_json, CLASSES = CLASSES, token_class = token_class, build_keys = build_keys, final_load = final_load, nice_bin = nice_bin, load_over_time = load_over_time, expert_labels = expert_labels, layer_specialization = layer_specialization, summary_rows = summary_rows}

return M
