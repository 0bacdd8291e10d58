--- moe.RouterMonitor: router health accumulated over forward passes.
--
--   local mon = moe.RouterMonitor(model)
--   model:forward(ids); mon:record()                 -- after any forward
--   mon:track(function() trainer:train{...} end)     -- records every model:forward inside
--   mon:run_dataset(heldout, {batches = 8, batch_size = 8, seq_len = 128})
--   local s = mon:get_stats()     -- s.max_vio, s.cv, s.per_layer[l].counts, s.baseline.max_vio ...
--   mon:reset()
--
-- record() reads what every MoE layer already computed during its last
-- forward (layer:routing_stats(): per-expert kept counts, dropped
-- assignments, mean router entropy, z and top-1 probability), so it costs
-- no extra pass and no device sync beyond those statistics. A layer whose
-- forward count (layer:noise_step()) has not moved since the last record is
-- skipped when its statistics are also unchanged, so calling record() twice
-- after one forward counts it once.
--
-- Metrics, per MoE layer, over all recorded batches (N tokens, E experts,
-- k = assignments chosen per token, c_e kept tokens of expert e, A = sum c_e):
--   counts         c_e (list, element e + 1 is expert e); load = c_e / A
--   load_variance  population variance of the load fractions, (1/E) sum (c_e/A - 1/E)^2
--   cv             coefficient of variation of the counts, std(c) / mean(c)
--   max_vio        max_e c_e / mean(c) - 1 over the accumulated counts (global MaxVio)
--   max_vio_batch  the same per recorded batch, averaged over batches (batch MaxVio)
--   usage_entropy  entropy of the load distribution / log E (1 = perfectly even)
--   entropy        mean per-token router entropy (nats) of the normalised scores
--   entropy_normalized  entropy / log E
--   dead_experts   experts with no token at all
--   drop_rate      dropped / (kept + dropped) assignments (capacity overflow)
--   z              mean logsumexp(logits)^2
--   top1_prob      mean of each token's largest normalised score
-- Each has its random-routing baseline in per_layer[l].baseline (see
-- moelab.analytics.baselines for the formulas); batch-level baselines use
-- each batch's own token count.
local U = require "moelab.analytics.util"
local baselines = require "moelab.analytics.baselines"

local M = {}
local Monitor = {}
Monitor.__index = Monitor
Monitor.__tostring = function(self)
  return string.format("RouterMonitor(%d MoE layers, %d batches recorded)", #self.layers, self.records)
end

local function pack(...) return {n = select("#", ...), ...} end

local function is_monitor(x) return getmetatable(x) == Monitor end

local function check_self(fname, self)
  if not is_monitor(self) then error(fname .. ": call it on a RouterMonitor with ':'", 3) end
end

local monitor_keys = {capacity_factor = true, router = true, keep_history = true}

--- moe.RouterMonitor(model[, {capacity_factor=, router=, keep_history=true}])
-- model: a moe.MoEModel, an nn.Model, one MoE layer (nn.MoE) or a list of
-- MoE layers. capacity_factor and router (the selection method) are read
-- from the model's config; give them for bare layers so the drop-rate
-- baseline knows the capacity. keep_history (default true) keeps one small
-- summary per record in monitor.history.
function M.RouterMonitor(model, opts)
  local f = "RouterMonitor"
  local r = U.resolve(f, model, false)
  opts = U.check_opts(f, opts, monitor_keys)
  local cfg = r.config or {}
  local cf = U.opt_num(f, opts, "capacity_factor", cfg.capacity_factor or 0, 0)
  local router = opts.router or cfg.router or "topk"
  if type(router) ~= "string" then
    U.fail(f, "option 'router' must be a selection name (\"topk\", \"expert_choice\", ...), got %s", type(router))
  end
  local self = setmetatable({
    model = r.model, net = r.net, layers = r.layers, config = r.config,
    capacity_factor = cf, router = router,
    keep_history = opts.keep_history ~= false,
  }, Monitor)
  self:reset()
  return self
end

--- reset(): forgets everything recorded.
function Monitor:reset()
  check_self("RouterMonitor:reset", self)
  self.records = 0
  self.history = {}
  self.acc = {}
  self.seen = {}
  for i = 1, #self.layers do
    self.acc[i] = {
      counts = nil, tokens = 0, assignments = 0, dropped = 0, batches = 0,
      entropy_sum = 0, z_sum = 0, top1_sum = 0, aux_sum = 0,
      batch_max_vio_sum = 0, batch_sizes = {},   -- token count of a batch -> number of such batches
    }
  end
  return self
end

local function batch_max_vio(counts)
  local total, mx = 0, 0
  for _, c in ipairs(counts) do total = total + c; if c > mx then mx = c end end
  if total == 0 then return 0 end
  return mx / (total / #counts) - 1
end

--- record(): adds every MoE layer's last routing to the totals. Returns the
-- number of layers recorded (0 when no layer ran since the last record).
function Monitor:record()
  check_self("RouterMonitor:record", self)
  local recorded = 0
  local summary = {max_vio = 0, drop_rate = 0, entropy = 0, layers = 0}
  for i, layer in ipairs(self.layers) do
    local s = layer:routing_stats()
    -- what identifies one forward: the layer's forward count and its statistics
    local key = s and string.format("%d:%d:%d:%.17g:%.17g", layer:noise_step(), s.tokens, s.assignments, s.z,
      s.entropy)
    if s and self.seen[i] ~= key then
      self.seen[i] = key
      local a = self.acc[i]
      if not a.counts then a.counts = U.filled(#s.counts, 0) end
      for j, c in ipairs(s.counts) do a.counts[j] = a.counts[j] + c end
      a.tokens = a.tokens + s.tokens
      a.assignments = a.assignments + s.assignments
      a.dropped = a.dropped + s.dropped
      a.batches = a.batches + 1
      a.entropy_sum = a.entropy_sum + s.entropy * s.tokens
      a.z_sum = a.z_sum + s.z * s.tokens
      a.top1_sum = a.top1_sum + s.top1_prob * s.tokens
      a.aux_sum = a.aux_sum + s.aux
      local bmv = batch_max_vio(s.counts)
      a.batch_max_vio_sum = a.batch_max_vio_sum + bmv
      a.batch_sizes[s.tokens] = (a.batch_sizes[s.tokens] or 0) + 1
      recorded = recorded + 1
      local chosen = s.assignments + s.dropped
      summary.max_vio = math.max(summary.max_vio, bmv)
      summary.drop_rate = summary.drop_rate + (chosen > 0 and s.dropped / chosen or 0)
      summary.entropy = summary.entropy + s.entropy
      summary.layers = summary.layers + 1
    end
  end
  if recorded > 0 then
    self.records = self.records + 1
    if self.keep_history then
      self.history[#self.history + 1] = {
        max_vio = summary.max_vio, drop_rate = summary.drop_rate / summary.layers,
        entropy = summary.entropy / summary.layers, layers = summary.layers,
      }
    end
  end
  return recorded
end

--- track(fn, ...): calls fn(record, ...) and returns what it returns. While
-- fn runs, every model:forward of a moe.MoEModel records automatically
-- (the instance's forward is wrapped and restored afterwards, also on
-- error); code that calls the C network directly (model.net:forward) should
-- call the `record` function it is handed after each forward.
function Monitor:track(fn, ...)
  local f = "RouterMonitor:track"
  check_self(f, self)
  if type(fn) ~= "function" then U.fail(f, "fn must be a function, got %s", type(fn)) end
  local record = function() return self:record() end
  local model = self.model
  local saved
  if model then
    saved = rawget(model, "forward")
    local inner = model.forward
    rawset(model, "forward", function(m, ...)
      local out = inner(m, ...)
      self:record()
      return out
    end)
  end
  local res = pack(pcall(fn, record, ...))
  if model then rawset(model, "forward", saved) end
  if not res[1] then error(res[2], 0) end
  return unpack(res, 2, res.n)
end

local run_keys = {batches = true, batch_size = true, seq_len = true, first = true}

--- run_dataset(dataset[, {batches=, batch_size=8, seq_len=128, first=0}]):
-- runs the model in evaluation mode over consecutive windows of the dataset
-- (ds:window_batch, starting at window `first`; all windows unless batches
-- limits the count) and records after each batch. The training flag is
-- restored afterwards. Returns the monitor.
function Monitor:run_dataset(ds, opts)
  local f = "RouterMonitor:run_dataset"
  check_self(f, self)
  if not self.net then U.fail(f, "the monitor watches bare MoE layers; it needs a model to run a dataset") end
  if not U.is_dataset(ds) then U.fail(f, "dataset must be a dataset, got %s", type(ds)) end
  opts = U.check_opts(f, opts, run_keys)
  local bs = U.opt_int(f, opts, "batch_size", 8, 1)
  local sl = U.opt_int(f, opts, "seq_len", 128, 1)
  local first = U.opt_int(f, opts, "first", 0, 0)
  local windows = ds:num_windows(sl)
  if windows <= first then U.fail(f, "the dataset has %d windows of seq_len %d; first is %d", windows, sl, first) end
  local nb = math.ceil((windows - first) / bs)
  if opts.batches then nb = math.min(nb, U.opt_int(f, opts, "batches", nil, 1)) end
  if self.config and ds:vocab_size() > self.config.vocab_size then
    U.fail(f, "the dataset has vocabulary %d but the model's vocab_size is %d", ds:vocab_size(), self.config.vocab_size)
  end
  for b = 0, nb - 1 do
    local at = first + b * bs
    local ids = ds:window_batch(sl, at, math.min(bs, windows - at))
    local logits = U.eval_forward(self.net, ids)
    logits:free()
    self:record()
  end
  return self
end

-- Metrics of one layer's accumulator, with baselines.
local function layer_stats(a, cf, router)
  if not a.counts or a.tokens == 0 then return nil end
  local e = #a.counts
  local total = U.sum(a.counts)
  local mean = total / e
  local load, var, mx, h, dead = {}, 0, 0, 0, 0
  local sq = 0
  for j, c in ipairs(a.counts) do
    local fr = total > 0 and c / total or 0
    load[j] = fr
    var = var + (fr - 1 / e) ^ 2
    sq = sq + (c - mean) ^ 2
    if c > mx then mx = c end
    if c == 0 then dead = dead + 1 elseif total > 0 then h = h - fr * math.log(fr) end
  end
  local loge = math.log(e)
  local chosen = a.assignments + a.dropped
  local k = chosen / a.tokens          -- assignments chosen per token (k for top-k routers)
  local s = {
    num_experts = e, tokens = a.tokens, assignments = a.assignments, dropped = a.dropped, batches = a.batches,
    experts_per_token = k,
    counts = a.counts, load = load,
    load_variance = var / e,
    cv = mean > 0 and math.sqrt(sq / e) / mean or 0,
    max_vio = mean > 0 and mx / mean - 1 or 0,
    max_vio_batch = a.batch_max_vio_sum / a.batches,
    usage_entropy = e > 1 and (total > 0 and h / loge or 0) or 1,
    entropy = a.entropy_sum / a.tokens,
    entropy_normalized = e > 1 and a.entropy_sum / a.tokens / loge or 0,
    dead_experts = dead,
    drop_rate = chosen > 0 and a.dropped / chosen or 0,
    z = a.z_sum / a.tokens,
    top1_prob = a.top1_sum / a.tokens,
    aux_loss = a.aux_sum / a.batches,
  }
  -- baselines: uniform random top-k over the same token counts
  local n = a.tokens
  local kb = math.max(1e-9, math.min(k, e))
  local bmv, bdrop, btok = 0, 0, 0
  local has_capacity = (router == "topk" or router == "noisy_topk") and cf > 0
  for nb, count in pairs(a.batch_sizes) do
    bmv = bmv + baselines.max_vio(nb, e, kb) * count
    if has_capacity then bdrop = bdrop + baselines.drop_rate(nb, e, kb, cf) * nb * count end
    btok = btok + nb * count
  end
  s.baseline = {
    load_variance = baselines.load_variance(n, e, kb),
    cv = baselines.cv(n, e, kb),
    max_vio = baselines.max_vio(n, e, kb),
    max_vio_batch = bmv / a.batches,
    usage_entropy = baselines.usage_entropy(n, e, kb),
    entropy = baselines.router_entropy(e),
    entropy_normalized = 1,
    dead_experts = baselines.dead_experts(n, e, kb),
    drop_rate = has_capacity and bdrop / btok or 0,
    z = baselines.z(e),
    top1_prob = baselines.top1_prob(e),
  }
  return s
end

-- Aggregation over layers: max for MaxVio, sum for dead experts, mean otherwise.
local aggregate_max = {max_vio = true, max_vio_batch = true}
local aggregate_sum = {dead_experts = true}
local metric_names = {"load_variance", "cv", "max_vio", "max_vio_batch", "usage_entropy", "entropy",
                      "entropy_normalized", "dead_experts", "drop_rate", "z", "top1_prob"}

local function aggregate(list, key)
  local vals = {}
  for _, v in ipairs(list) do vals[#vals + 1] = v[key] end
  if #vals == 0 then return nil end
  if aggregate_max[key] then return U.max(vals) end
  if aggregate_sum[key] then return U.sum(vals) end
  return U.mean(vals)
end

--- get_stats() -> {load_variance=, cv=, max_vio=, max_vio_batch=, entropy=,
-- entropy_normalized=, usage_entropy=, drop_rate=, z=, top1_prob=,
-- dead_experts=, tokens=, batches=, load = {[l] = per-expert fractions}, per_layer = {[l] = {... counts, load,
-- baseline = {...}}}, baseline = {...}}.
-- Aggregates over layers: max_vio and max_vio_batch are the worst layer's,
-- dead_experts the sum over layers, everything else the mean over layers;
-- baseline aggregates the same way. A layer that never ran is absent from
-- per_layer (its slot is nil) and from the aggregates; with nothing
-- recorded the aggregates are nil.
function Monitor:get_stats()
  check_self("RouterMonitor:get_stats", self)
  local per, present, bases = {}, {}, {}
  for i, a in ipairs(self.acc) do
    local s = layer_stats(a, self.capacity_factor, self.router)
    if s then
      s.layer = i
      per[i] = s
      present[#present + 1] = s
      bases[#bases + 1] = s.baseline
    end
  end
  local out = {per_layer = per, baseline = {}, batches = self.records, num_layers = #self.layers}
  for _, k in ipairs(metric_names) do
    out[k] = aggregate(present, k)
    out.baseline[k] = aggregate(bases, k)
  end
  if #present > 0 then out.tokens = present[1].tokens end
  out.load = {}
  for i, s in pairs(per) do out.load[i] = s.load end
  return out
end

--- stats(): the same as get_stats() (DESIGN.md's name).
function Monitor:stats() return self:get_stats() end

M.Monitor = Monitor
M.is_monitor = is_monitor
return M
