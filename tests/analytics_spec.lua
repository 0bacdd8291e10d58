-- Router analytics: every metric on routings whose answer is known exactly
-- (hand-set router weights and crafted inputs), the random-routing
-- baselines against exact enumeration and simulation, traces round-trips,
-- and argument errors.
local moe = require "moelab"
local analytics = require "moelab.analytics"
local baselines = analytics.baselines
local crafted = require "helpers.crafted"
local files = require "helpers.files"
teardown(files.cleanup)

local RouterMonitor = moe.RouterMonitor or analytics.RouterMonitor
local RouterAnalyzer = moe.RouterAnalyzer or analytics.RouterAnalyzer

local function near(a, b, tol, what)
  tol = tol or 1e-9
  if math.abs(a - b) > tol * math.max(1, math.abs(b)) then
    error(string.format("%s: expected %.12g, got %.12g", what or "value", b, a), 2)
  end
end

local tmpdir = files.tmpdir

-- A bare MoE layer with E experts whose router is gain * identity: an input
-- row one-hot at j gives logit `gain` to expert j and 0 to the others.
local function onehot_layer(E, k, extra)
  local o = {hidden_size = E, num_experts = E, experts_per_token = k or 1, expert_intermediate_size = 3, seed = 1}
  for key, v in pairs(extra or {}) do o[key] = v end
  local l = moe.nn.MoE(o)
  local g = l:param("gate.weight")
  g:zero()
  for i = 1, E do g:set(i, i, 1) end
  return l
end

-- Rows one-hot at experts[n] (0-based) scaled by gain.
local function onehot_rows(E, experts, gain)
  local x = moe.zeros({#experts, E})
  for n, e in ipairs(experts) do x:set(n, e + 1, gain or 4) end
  return x
end

local function ids_tensor(rows) return moe.tensor(rows, {dtype = "i64"}) end

describe("random-routing baselines", function()
  it("match exact enumeration for N = 2 tokens, E = 2, k = 1", function()
    -- outcomes: counts (2,0), (0,2) each with probability 1/4, (1,1) with 1/2
    near(baselines.load_variance(2, 2, 1), 0.5 * 0.25, 1e-12, "load variance")
    near(baselines.cv(2, 2, 1), math.sqrt(0.5), 1e-12, "cv (root of E[CV^2])")
    near(baselines.dead_experts(2, 2, 1), 0.5, 1e-12, "dead experts")
    near(baselines.max_vio(2, 2, 1), 0.5, 0.04, "MaxVio (simulated)")
    near(baselines.usage_entropy(2, 2, 1), 0.5, 0.04, "usage entropy (simulated)")
    -- capacity ceil(1 * 1 * 2 / 2) = 1: (2,0) drops one of two assignments
    near(baselines.drop_rate(2, 2, 1, 1.0), 0.25, 1e-9, "drop rate")
    assert.are.equal(0, baselines.drop_rate(2, 2, 1, 0))
  end)

  it("per-token and pairwise baselines", function()
    near(baselines.router_entropy(8), math.log(8))
    near(baselines.top1_prob(8), 1 / 8)
    near(baselines.z(8), math.log(8) ^ 2)
    near(baselines.co_activation(8, 2), 1 / 7)
    near(baselines.specialization(64, 8), 1 / 8)
    assert.are.same({topk = 2 / 8, top1 = 1 / 8}, baselines.consecutive(8, 2))
    near(baselines.expected_max_normal(2), 1 / math.sqrt(math.pi), 1e-6, "E[max of 2 normals]")
    near(baselines.expected_max_normal(1), 0, 1e-6, "E[max of 1 normal]")
  end)

  it("the normal approximations agree with simulation for large token counts", function()
    local sim = baselines.simulate(2000, 8, 2, 300, 7)
    near(baselines.max_vio(2000, 8, 2), sim.max_vio, 0.1, "MaxVio")
    near(baselines.usage_entropy(2000, 8, 2), sim.usage_entropy, 1e-3, "usage entropy")
  end)

  it("the binomial drop-rate tail agrees with a direct computation", function()
    -- N = 6, E = 3, k = 1, cf = 1: C = 2; X ~ Binomial(6, 1/3)
    local function choose(n, r) local c = 1; for i = 1, r do c = c * (n - r + i) / i end; return c end
    local ex = 0
    for x = 3, 6 do ex = ex + (x - 2) * choose(6, x) * (1 / 3) ^ x * (2 / 3) ^ (6 - x) end
    near(baselines.drop_rate(6, 3, 1, 1.0), 3 * ex / 6, 1e-6, "drop rate")
  end)

  it("reject bad arguments, naming the function", function()
    assert.has_error(function() baselines.cv(-1, 4, 1) end, "baselines.cv: tokens must be a non-negative integer, got -1")
    assert.has_error(function() baselines.max_vio(10, 4, 5) end)
  end)
end)

describe("RouterMonitor", function()
  local E = 4

  it("all tokens to one expert: variance, CV, MaxVio, entropies, dead experts", function()
    local l = onehot_layer(E, 1)
    l:forward(onehot_rows(E, {0, 0, 0, 0, 0, 0, 0, 0}))
    local mon = RouterMonitor(l)
    assert.are.equal(1, mon:record())
    local s = mon:get_stats()
    local p = s.per_layer[1]
    assert.are.same({8, 0, 0, 0}, p.counts)
    near(s.load_variance, ((1 - 0.25) ^ 2 + 3 * 0.25 ^ 2) / 4, 1e-12, "load variance")
    near(s.cv, math.sqrt(3), 1e-12, "cv")
    near(s.max_vio, 3, 1e-12, "max_vio")
    near(s.max_vio_batch, 3, 1e-12, "max_vio_batch")
    near(s.usage_entropy, 0, 1e-12, "usage entropy")
    assert.are.equal(3, s.dead_experts)
    assert.are.equal(0, s.drop_rate)
    assert.are.equal(8, s.tokens)
  end)

  it("per-token router entropy, top-1 probability and z from known logits", function()
    local gain = 2
    local l = onehot_layer(E, 1)
    l:forward(onehot_rows(E, {0, 1, 2, 3, 0, 1}, gain))
    local mon = RouterMonitor(l)
    mon:record()
    local s = mon:get_stats()
    local zsum = math.exp(gain) + (E - 1)
    local p, q = math.exp(gain) / zsum, 1 / zsum
    near(s.top1_prob, p, 1e-5, "top1_prob")
    near(s.entropy, -p * math.log(p) - (E - 1) * q * math.log(q), 1e-5, "entropy")
    near(s.entropy_normalized, s.entropy / math.log(E), 1e-12, "entropy_normalized")
    near(s.z, math.log(zsum) ^ 2, 1e-5, "z")
  end)

  it("a perfectly balanced round-robin", function()
    local l = onehot_layer(E, 1)
    l:forward(onehot_rows(E, {0, 1, 2, 3, 0, 1, 2, 3}))
    local mon = RouterMonitor(l)
    mon:record()
    local s = mon:get_stats()
    assert.are.same({2, 2, 2, 2}, s.per_layer[1].counts)
    near(s.load_variance, 0, 1e-15)
    near(s.cv, 0, 1e-15)
    near(s.max_vio, 0, 1e-15)
    near(s.usage_entropy, 1, 1e-12)
    assert.are.equal(0, s.dead_experts)
  end)

  it("counts top-k assignments and the drop rate under a capacity", function()
    -- top-2 without capacity: every token to experts {0, 1} (row one-hot at 0, 1 at 1)
    local l2 = onehot_layer(E, 2)
    local x = moe.zeros({6, E})
    for n = 1, 6 do x:set(n, 1, 4); x:set(n, 2, 2) end
    l2:forward(x)
    local m2 = RouterMonitor(l2)
    m2:record()
    assert.are.same({6, 6, 0, 0}, m2:get_stats().per_layer[1].counts)
    assert.are.equal(2, m2:get_stats().per_layer[1].experts_per_token)
    -- top-1 with capacity ceil(1 * 1 * 8 / 4) = 2: six of eight assignments dropped
    local l = onehot_layer(E, 1, {capacity_factor = 1, renormalize = false})
    l:forward(onehot_rows(E, {0, 0, 0, 0, 0, 0, 0, 0}))
    local mon = RouterMonitor(l, {capacity_factor = 1})
    mon:record()
    local s = mon:get_stats()
    assert.are.same({2, 0, 0, 0}, s.per_layer[1].counts)
    near(s.drop_rate, 6 / 8, 1e-12, "drop rate")
    near(s.baseline.drop_rate, baselines.drop_rate(8, E, 1, 1), 1e-12, "drop-rate baseline")
    assert.is_true(s.baseline.drop_rate > 0)
  end)

  it("accumulates over batches, counts one forward once, resets", function()
    local l = onehot_layer(E, 1)
    local mon = RouterMonitor(l)
    assert.is_nil(mon:get_stats().max_vio)    -- nothing recorded yet
    l:forward(onehot_rows(E, {0, 0, 1, 1}))
    assert.are.equal(1, mon:record())
    assert.are.equal(0, mon:record())          -- the same forward again: skipped
    l:forward(onehot_rows(E, {2, 2, 3, 3}))
    mon:record()
    local s = mon:get_stats()
    assert.are.same({2, 2, 2, 2}, s.per_layer[1].counts)
    near(s.max_vio, 0, 1e-15, "global MaxVio over both batches")
    near(s.max_vio_batch, 1, 1e-12, "each batch alone has MaxVio 1")
    assert.are.equal(2, s.batches)
    assert.are.equal(2, #mon.history)
    mon:reset()
    assert.are.equal(0, mon:get_stats().batches)
    assert.is_nil(mon:get_stats().per_layer[1])
  end)

  it("gives each metric its random-routing baseline", function()
    local l = onehot_layer(E, 1)
    l:forward(onehot_rows(E, {0, 1, 2, 3, 0, 1, 2, 3, 0, 1}))
    local mon = RouterMonitor(l)
    mon:record()
    local b = mon:get_stats().baseline
    near(b.entropy, math.log(E))
    near(b.top1_prob, 1 / E)
    near(b.z, math.log(E) ^ 2)
    near(b.load_variance, baselines.load_variance(10, E, 1))
    near(b.cv, baselines.cv(10, E, 1))
    near(b.dead_experts, E * (1 - 1 / E) ^ 10)
    near(b.max_vio, baselines.max_vio(10, E, 1))
    near(b.usage_entropy, baselines.usage_entropy(10, E, 1))
    assert.are.equal(0, b.drop_rate)
  end)

  it("tracks a model's forwards, and aggregates over layers", function()
    -- token t goes to expert t % 4 in layer 1 and (t + 1) % 4 in layer 2
    local m = crafted.model{vocab_size = 16, num_experts = E, experts_per_token = 1, num_layers = 2,
      route = function(t) return {t % E} end, layer_perm = function(l) return l == 1 and {0, 1, 2, 3} or {1, 2, 3, 0} end}
    local mon = RouterMonitor(m)
    local ids = ids_tensor{{0, 0, 0, 1, 2, 3}, {0, 4, 8, 12, 1, 5}}
    local n = mon:track(function(record)
      assert.is_function(record)
      m:forward(ids)
      m:forward(ids)
      return 42
    end)
    assert.are.equal(42, n)
    assert.is_nil(rawget(m, "forward"))          -- the wrapper is gone
    local s = mon:get_stats()
    assert.are.equal(2, s.batches)
    assert.are.same({14, 6, 2, 2}, s.per_layer[1].counts)
    assert.are.same({2, 14, 6, 2}, s.per_layer[2].counts)
    near(s.max_vio, 14 / 6 - 1, 1e-12, "worst layer")
    near(s.cv, s.per_layer[1].cv, 1e-12, "mean over equal layers")
    assert.are.equal(0, s.dead_experts)
    -- an error inside track propagates and restores forward
    assert.has_error(function() mon:track(function() error("boom") end) end)
    assert.is_nil(rawget(m, "forward"))
  end)

  it("follows a trainer's steps through track", function()
    local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = 16, num_layers = 2, num_heads = 2, num_kv_heads = 1,
                               expert_intermediate_size = 8, seed = 2}
    local ds = moe.data.from_text(string.rep("some text to train on. ", 20))
    local trainer = moe.MoETrainer{model = m, progress = false}
    local mon = RouterMonitor(m)
    mon:track(function()
      trainer:train{train_data = ds, eval_data = ds, batch_size = 2, seq_len = 8, max_steps = 3,
                    gradient_accumulation_steps = 2}
    end)
    local s = mon:get_stats()
    assert.are.equal(6, s.batches)                -- every micro-batch; evaluation is not recorded
    assert.are.equal(6 * 16, s.tokens)
    assert.are.equal(6 * 16 * 2, s.per_layer[2].assignments)
  end)

  it("runs a dataset offline in evaluation mode", function()
    local m = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 1, num_layers = 2,
      route = function(t) return {t % E} end}
    m:train(true)
    local ds = moe.data.from_text(string.rep("hello, routing world! 0123456789\n", 20))
    local mon = RouterMonitor(m)
    mon:run_dataset(ds, {batches = 3, batch_size = 4, seq_len = 16})
    assert.is_true(m.net:is_training())          -- restored
    local want = {0, 0, 0, 0}
    for b = 0, 2 do
      local ids = ds:window_batch(16, b * 4, 4)
      for _, t in ipairs(ids:contiguous():view({ids:numel()}):to_table()) do want[t % E + 1] = want[t % E + 1] + 1 end
    end
    local s = mon:get_stats()
    assert.are.same(want, s.per_layer[1].counts)
    assert.are.equal(3, s.batches)
  end)

  it("rejects bad arguments, naming the function and the argument", function()
    assert.has_error(function() RouterMonitor(42) end,
      "RouterMonitor: model must be a moe.MoEModel, nn.Model, an MoE layer or a list of MoE layers, got number")
    assert.has_error(function() RouterMonitor(moe.nn.Linear(2, 2)) end)
    local l = onehot_layer(E, 1)
    assert.has_error(function() RouterMonitor(l, {capacity = 1}) end)
    local mon = RouterMonitor(l)
    assert.has_error(function() mon.record() end, "RouterMonitor:record: call it on a RouterMonitor with ':'")
    assert.has_error(function() mon:track(3) end, "RouterMonitor:track: fn must be a function, got number")
    assert.has_error(function() mon:run_dataset(moe.data.from_text("abc")) end,
      "RouterMonitor:run_dataset: the monitor watches bare MoE layers; it needs a model to run a dataset")
    local m = crafted.model{vocab_size = 16, num_experts = E, route = function(t) return {t % E} end}
    local mm = RouterMonitor(m)
    assert.has_error(function() mm:run_dataset("data") end, "RouterMonitor:run_dataset: dataset must be a dataset, got string")
    assert.has_error(function() mm:run_dataset(moe.data.from_text(string.rep("a", 100)), {batch = 2}) end)
  end)
end)

describe("RouterAnalyzer", function()
  local E = 4
  -- top-2: token t goes to {t % 4, (t + 1) % 4}, largest weight first
  local m2 = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 2, num_layers = 2,
    route = function(t) return {t % E, (t + 1) % E} end}
  local an = RouterAnalyzer(m2)

  it("regroups each token's experts and weights per layer", function()
    local ids = ids_tensor{{0, 1, 2, 3, 4, 5}, {7, 7, 7, 9, 9, 9}}
    local r = an:analyze_batch(ids, {predictions = true})
    assert.are.equal(2, r.batch_size)
    assert.are.equal(6, r.seq_len)
    assert.are.equal(2, r.num_layers)
    for n, t in ipairs(r.ids) do
      for l = 1, 2 do
        assert.are.same({t % E, (t + 1) % E}, r.layers[l].experts[n])
        local w = r.layers[l].weights[n]
        assert.is_true(w[1] > w[2])
        near(w[1] + w[2], 1, 1e-5, "renormalized weights")
      end
    end
    assert.are.equal(12, #r.predicted)
    assert.has_error(function() an:analyze_batch("abc") end,
      "RouterAnalyzer:analyze_batch: ids must be an i64 tensor [batch, seq], got string")
  end)

  it("co-activation N(Ei, Ej) / N(Ei) over a token's pairs", function()
    local ids = ids_tensor{{0, 1, 2, 3, 4, 5}, {7, 7, 7, 7, 7, 7}}
    -- expert sets: {0,1} {1,2} {2,3} {3,0} {0,1} {1,2} and six {3,0}
    local co = an:co_activation{ids = ids}
    local c = co.layers[1].counts
    assert.are.same({9, 2, 0, 7}, c[1])
    assert.are.same({2, 4, 2, 0}, c[2])
    local mx = co.layers[1].matrix
    near(mx[1][2], 2 / 9)
    near(mx[1][4], 7 / 9)
    near(mx[2][3], 2 / 4)
    near(mx[3][3], 1)
    near(co.baseline, 1 / 3)
    assert.are.equal(12, co.tokens)
  end)

  it("consecutive-token same-expert rate", function()
    local ids = ids_tensor{{0, 1, 2, 3, 4, 5}, {7, 7, 7, 7, 7, 7}}
    local c = an:consecutive_rate{ids = ids}
    -- row 1: each adjacent pair shares one of two experts; row 2: both
    near(c.layers[1].topk, (5 * 0.5 + 5 * 1) / 10, 1e-12, "topk")
    near(c.layers[1].top1, 5 / 10, 1e-12, "top1")
    assert.are.equal(10, c.layers[1].pairs)
    near(c.topk, 0.75)
    assert.are.same({topk = 0.5, top1 = 0.25}, c.baseline)
  end)

  it("router saturation: the same model is 1, a permuted router 0, a checkpoint directory works", function()
    local ds = moe.data.from_text(string.rep("the quick brown fox jumps over the lazy dog. ", 30))
    local same = an:router_saturation(m2, ds, {num_samples = 4, batch_size = 2, seq_len = 16})
    near(same.topk, 1)
    near(same.top1, 1)
    assert.are.equal(64, same.tokens)
    -- top-1 models: t -> t % 4 versus t -> (t + 1) % 4 never agree
    local a = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 1, num_layers = 2,
      route = function(t) return {t % E} end}
    local b = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 1, num_layers = 2,
      route = function(t) return {t % E} end, layer_perm = function() return {1, 2, 3, 0} end}
    local s = RouterAnalyzer(a):router_saturation(b, ds, {num_samples = 4, batch_size = 2, seq_len = 16})
    near(s.top1, 0)
    near(s.topk, 0)
    assert.are.same({topk = 0.25, top1 = 0.25}, s.baseline)
    local dir = tmpdir()
    moe.io.mkdir_p(dir .. "/m")
    require("moelab.checkpoint").save_model(m2, dir .. "/m")
    local fromdir = an:router_saturation(dir .. "/m", nil, {ids = ids_tensor{{1, 2, 3, 4}}})
    near(fromdir.topk, 1)
    os.execute("rm -rf '" .. dir .. "'")
    assert.has_error(function() an:router_saturation(42, ds) end,
      "RouterAnalyzer:router_saturation: other must be a moe.MoEModel, an nn.Model or a checkpoint directory, got number")
    local three = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 2, num_layers = 3,
      route = function(t) return {t % E, (t + 1) % E} end}
    assert.has_error(function() an:router_saturation(three, ds) end,
      "RouterAnalyzer:router_saturation: other has 3 MoE layers of 4 experts, this model 2 of 4")
  end)

  it("domain and vocabulary specialization on the built-in corpus", function()
    local corpus = moe.data.corpus{seed = 3, num_bytes = 40000}
    local m1 = crafted.model{vocab_size = 256, num_experts = E, experts_per_token = 1, num_layers = 2,
      route = function(t) return {t % E} end}
    local a1 = RouterAnalyzer(m1)
    local opts = {dataset = corpus, num_samples = 12, batch_size = 4, seq_len = 32, seed = 5}
    local spec = a1:compute_expert_specialization(opts)
    -- the expected counts, from the same batches
    local want, tokens = {}, {}
    local names = corpus:domains()
    for step = 0, 2 do
      local ids, _, dom = corpus:batch{batch_size = 4, seq_len = 32, seed = 5, step = step}
      local it, dt = ids:contiguous():view({128}):to_table(), dom:contiguous():view({128}):to_table()
      for n = 1, 128 do
        if dt[n] >= 0 then
          local d = names[dt[n] + 1]
          want[d] = want[d] or {0, 0, 0, 0}
          want[d][it[n] % E + 1] = want[d][it[n] % E + 1] + 1
          tokens[d] = (tokens[d] or 0) + 1
        end
      end
    end
    assert.are.same(names, spec.domains)
    near(spec.baseline, 1 / 4)
    assert.are.equal(384, spec.tokens)
    local seen = 0
    for d, row in pairs(want) do
      local got = spec.layers[1].domains[d]
      assert.is_not_nil(got, d)
      assert.are.equal(tokens[d], got.tokens)
      assert.are.same(row, got.counts)
      local total = 0
      for e = 1, E do
        near(got.share[e], row[e] / tokens[d], 1e-12, d .. " share")
        near(got.specialization[e], row[e] / tokens[d] / 0.25, 1e-12, d .. " specialization")
        total = total + got.share[e]
      end
      near(total, 1, 1e-12, "shares sum to k")
      seen = seen + 1
    end
    assert.is_true(seen >= 2)
    -- vocabulary: each expert only ever sees ids with id % 4 == its number
    for e = 1, E do
      local ex = spec.layers[1].experts[e]
      for _, t in ipairs(ex.input_tokens) do
        assert.are.equal(e - 1, t.id % E)
        near(t.affinity, 1, 1e-12, "a token always goes to its expert")
        assert.are.equal(string.char(t.id), t.text)
      end
      local domain_total = 0
      for _, v in pairs(ex.domain_share) do domain_total = domain_total + v end
      if ex.tokens > 0 then near(domain_total, 1, 1e-12, "domain shares of an expert") end
    end
    -- explicit ids with domain labels
    local s2 = a1:compute_expert_specialization{ids = ids_tensor{{0, 1, 4, 5}}, domains = ids_tensor{{0, 1, 0, 1}},
                                               domain_names = {"even", "odd"}}
    assert.are.same({1, 0, 0, 0}, s2.layers[2].domains.even.share)
    assert.are.same({0, 1, 0, 0}, s2.layers[2].domains.odd.share)
    assert.are.equal(0, s2.layers[2].domains.even.top_expert)
    assert.has_error(function() a1:compute_expert_specialization{} end,
      "RouterAnalyzer:compute_expert_specialization: give dataset = <dataset> or ids = <tensor>, got dataset = nil")
    assert.has_error(function() a1:compute_expert_specialization{dataset = corpus, rank_by = "size"} end,
      'RouterAnalyzer:compute_expert_specialization: option \'rank_by\' must be "share" or "affinity", got "size"')
  end)

  it("token affinity in isolation and in context", function()
    local aff, base = an:affinity{tokens = {"\1\2", "\7"}}
    near(base, 0.5)
    -- "\1\2": token 1 -> {1, 2}, token 2 -> {2, 3}
    assert.are.same({0, 0.5, 1, 0.5}, aff["\1\2"].layers[1].share)
    assert.are.equal(2, aff["\1\2"].layers[1].top_expert)
    assert.are.same({0.5 * 2, 0, 0, 0.5 * 2}, aff["\7"].layers[2].share)
    local ctx = an:affinity{tokens = {"\1\2", "\9"}, context = "\1\2\3\1\2"}
    assert.are.equal(2, ctx["\1\2"].occurrences)
    assert.are.equal(4, ctx["\1\2"].positions)
    assert.are.same({0, 0.5, 1, 0.5}, ctx["\1\2"].layers[1].share)
    assert.are.equal(0, ctx["\9"].occurrences)
    assert.is_nil(ctx["\9"].layers[1].top_expert)
    assert.has_error(function() an:affinity{tokens = {}} end,
      "RouterAnalyzer:affinity: option 'tokens' must be a non-empty list of strings")
    assert.has_error(function() an:affinity{tokens = {"a", 3}} end,
      "RouterAnalyzer:affinity: tokens[2] must be a non-empty string, got 3")
  end)

  it("writes routing traces and reads them back (JSONL and TSV)", function()
    local ds = moe.data.from_text(string.rep("abcdefgh", 40))
    local dir = tmpdir()
    for _, name in ipairs{"t.jsonl", "t.tsv"} do
      local path = dir .. "/" .. name
      local n = an:write_traces(path, ds, {num_sequences = 3, seq_len = 5, batch_size = 2, first = 1})
      assert.are.equal(3 * 5 * 2, n)
      local tr = RouterAnalyzer.read_traces(path)
      assert.are.equal(n, #tr.records)
      assert.are.equal(E, tr.meta.num_experts)
      assert.are.equal(2, tr.meta.experts_per_token)
      assert.are.same({0, 1}, tr.meta.moe_layers)
      local ids = ds:window_batch(5, 1, 3)
      local r = an:analyze_batch(ids)
      local i = 0
      for seq = 0, 2 do
        for pos = 0, 4 do
          for layer = 0, 1 do
            i = i + 1
            local rec = tr.records[i]
            local nidx = seq * 5 + pos + 1
            assert.are.same({seq + 1, pos, r.ids[nidx], layer}, {rec.seq, rec.pos, rec.token, rec.layer})
            assert.are.same(r.layers[layer + 1].experts[nidx], rec.experts)
            near(rec.weights[1], r.layers[layer + 1].weights[nidx][1], 1e-5, "weight")
          end
        end
      end
      assert.are.same(tr, an:read_traces(path))
    end
    os.execute("rm -rf '" .. dir .. "'")
    assert.has_error(function() an:write_traces(nil, ds) end,
      "RouterAnalyzer:write_traces: path must be a file path string, got nil")
    assert.has_error(function() an:write_traces("/tmp/x.jsonl", ds, {format = "csv"}) end)
    assert.has_error(function() RouterAnalyzer.read_traces("/nonexistent/trace.jsonl") end)
  end)

  it("rejects what is not a model", function()
    assert.has_error(function() RouterAnalyzer(nil) end,
      "RouterAnalyzer: model must be a moe.MoEModel or nn.Model, got nil")
    assert.has_error(function() RouterAnalyzer(onehot_layer(E, 1)) end)
    assert.has_error(function() an.co_activation({ids = ids_tensor{{1}}}) end,
      "RouterAnalyzer:co_activation: call it on a RouterAnalyzer with ':'")
    assert.has_error(function() an:co_activation{ids = ids_tensor{{1}}, batches = 3} end)
  end)
end)

describe("plot_expert_token_affinity", function()
  it("writes one heatmap panel per MoE layer, not blank", function()
    local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 8,
                               expert_intermediate_size = 32, seed = 1}
    local an = moe.RouterAnalyzer(m)
    local ok_viz, viz = pcall(require, "moelab.viz")
    if not ok_viz or not pcall(function() return viz.canvas end) then pending("moelab.viz is not built"); return end
    local path = files.tmpname(".png")
    assert.are.equal(path, an:plot_expert_token_affinity{tokens = {"def", "the", "+", "\n"}, save_to = path})
    local st = viz.png_stats(path)
    assert.is_true(st.width > 400 and st.distinct_colors > 10 and st.drawn_fraction > 0.02)
    os.remove(path)
    assert.has_error(function() an:plot_expert_token_affinity{tokens = {"a"}, save_to = 3} end)
    assert.has_error(function() an:plot_expert_token_affinity{tokens = {"a"}, save_to = path, layers = {5}} end)
  end)
end)
