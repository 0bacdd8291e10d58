-- MoEModel, the architecture presets and MoETrainer: training lowers the loss,
-- resuming continues the same loss curve bit for bit, checkpoints round-trip,
-- bad configurations are rejected.
local moe = require "moelab"
local files = require "helpers.files"
local tmpdir = files.tmpdir
teardown(files.cleanup)

local corpus = moe.data.corpus{seed = 7, num_bytes = 60000}
local train_ds, held_ds = corpus:split(0.1)

local function small(arch, extra)
  local o = {vocab_size = 256, hidden_size = 32, num_layers = 2, num_heads = 4, expert_intermediate_size = 32,
             seed = 3}
  for k, v in pairs(extra or {}) do o[k] = v end
  return moe.arch[arch](o)
end

-- model (default: a small Mixtral) after one forward and backward: gradients in its flat buffer
local function model_and_grads(m)
  m = m or small("Mixtral")
  local ids, targets = train_ds:batch{batch_size = 2, seq_len = 8, seed = 1, step = 0}
  local out = m:forward(ids, {targets = targets})
  out.tape:backward(out.total_loss)
  return m
end

describe("MoEModel", function()
  it("counts total and active parameters", function()
    local m = moe.MoEModel{vocab_size = 100, hidden_size = 32, num_layers = 2, num_experts = 4,
                           experts_per_token = 1, expert_intermediate_size = 16, seed = 1}
    -- per layer: attention 4*32*32, norms 2*32, router 4*32, experts 4 * 3*32*16; plus embed, head, final norm
    local per_layer = 4 * 32 * 32 + 2 * 32 + 4 * 32 + 4 * 3 * 32 * 16
    local total = 2 * per_layer + 2 * 100 * 32 + 32
    assert.are.equal(total, m:num_params())
    assert.are.equal(total - 2 * 3 * (3 * 32 * 16), m:num_active_params())
  end)

  it("forward returns logits, losses and routing statistics", function()
    local m = small("Mixtral")
    local ids, targets = train_ds:batch{batch_size = 2, seq_len = 8, seed = 1, step = 0}
    local out = m:forward(ids, {targets = targets})
    assert.are.same({2, 8, 256}, out.logits:shape())
    assert.is_true(out.loss:item() > 0)
    assert.is_true(out.aux_loss:item() > 0)
    assert.are.equal(2, #out.routing)
    assert.are.equal(16, out.routing[1].tokens)
    assert.are.equal(32, out.routing[1].assignments)
  end)

  -- The CPU computes the loss's gradient in the backward (it has no fused kernel),
  -- so here only the returned values and the plumbing are checked; the gradient
  -- written over the logits is checked on a GPU (tests/gpu/mixed_precision_gpu.lua).
  it("keep_logits = false returns no logits and the same loss and gradients", function()
    local m = small("OLMoE")
    m:train(true)
    local ids, targets = train_ds:batch{batch_size = 2, seq_len = 8, seed = 3, step = 0}
    local function run(keep)
      m.net:zero_grad()
      local out = m:forward(ids, {targets = targets, aux_loss_coef = 0.01, keep_logits = keep})
      out.tape:backward(out.total_loss)
      local _, g = m.net:flat_parameters()
      return out, g:clone()
    end
    local a, ga = run(true)
    local b, gb = run(false)
    assert.is_not_nil(a.logits)
    assert.is_nil(b.logits)
    assert.are.equal(a.loss:item(), b.loss:item())
    assert.are.equal(0, (ga - gb):abs():max():item())
    assert.is_true(ga:abs():max():item() > 0)
    -- without targets there is no loss to fuse: the logits come back
    assert.is_not_nil(m:forward(ids, {keep_logits = false}).logits)
  end)

  it("set_keep_expert_rows: the same loss, the gradients to rounding, a dispatch entry only when kept", function()
    local m = small("OLMoE")
    m:train(true)
    local ids, targets = train_ds:batch{batch_size = 2, seq_len = 8, seed = 4, step = 0}
    local function run(keep)
      m:set_keep_expert_rows(keep)
      m.net:zero_grad()
      local out = m:forward(ids, {targets = targets, aux_loss_coef = 0.01})
      local names = {}
      for _, r in ipairs(out.tape:memory()) do names[r.name] = true end
      out.tape:backward(out.total_loss)
      local _, g = m.net:flat_parameters()
      return out.loss:item(), g:clone(), names
    end
    local la, ga, na = run(true)
    local lb, gb, nb = run(false)
    assert.are.equal(la, lb)
    assert.is_true((ga - gb):abs():max():item() <= 1e-5 * ga:abs():max():item())
    assert.is_true(na.dispatch and na.combine)
    assert.is_nil(nb.dispatch)
    assert.is_nil(nb.combine)   -- folded into the experts' entry
    assert.has_error(function() m:set_keep_expert_rows("no") end,
      "MoEModel:set_keep_expert_rows: expected true, false or \"auto\", got no")
    -- the default: "auto", which on a CPU keeps the rows (no GEMM gathers there)
    local fresh = small("OLMoE")
    assert.are.equal("auto", fresh:moe_layers()[1]:keep_expert_rows())
    fresh:train(true)
    fresh.net:zero_grad()
    local names = {}
    for _, r in ipairs(fresh:forward(ids, {targets = targets}).tape:memory()) do names[r.name] = true end
    assert.is_true(names.dispatch and names.combine)
    m:set_keep_expert_rows("auto")
    assert.are.equal("auto", m:moe_layers()[1]:keep_expert_rows())
  end)

  it("every preset builds and runs", function()
    for _, name in ipairs{"SwitchTransformer", "Mixtral", "GLaM", "OLMoE", "DeepSeek"} do
      local m = small(name, {num_experts = 8, experts_per_token = name == "SwitchTransformer" and 1 or 2})
      local ids = train_ds:batch{batch_size = 1, seq_len = 8, seed = 1, step = 0}
      local out = m:forward(ids)
      assert.are.same({1, 8, 256}, out.logits:shape(), name)
      assert.are.equal(name, m.config.name)
    end
    local glam = small("GLaM", {num_layers = 4})
    assert.are.equal(2, #glam:moe_layers())
    local ds = small("DeepSeek", {num_layers = 3})
    assert.are.equal(2, #ds:moe_layers())
    assert.is_true(#ds:buffers() == 2)   -- the aux-free expert bias of each MoE layer
  end)

  it("custom experts from an ExpertPool factory", function()
    local m = moe.arch.Custom{vocab_size = 256, hidden_size = 16, num_layers = 1, num_heads = 2, num_experts = 3,
      experts_per_token = 1, expert = function(i)
        return moe.nn.Sequential(moe.nn.Linear(16, 8, {seed = i}), moe.nn.GELU(), moe.nn.Linear(8, 16, {seed = 10 + i}))
      end}
    local ids, targets = train_ds:batch{batch_size = 2, seq_len = 4, seed = 1, step = 0}
    local out = m:forward(ids, {targets = targets})
    out.tape:backward(out.loss)
    assert.is_true(m.net:grad("layers.0.mlp.experts.0.0.weight"):abs():sum():item() >= 0)
  end)
end)

describe("MoETrainer", function()
  it("precision: f32 is the default; bf16 needs a CUDA model and says so", function()
    local m = small("Mixtral")
    assert.equal("f32", m:precision())
    moe.MoETrainer{model = m, progress = false, precision = "f32"}
    local ok, err = pcall(moe.MoETrainer, {model = m, progress = false, precision = "bf16"})
    assert.is_false(ok)
    assert.truthy(tostring(err):find("bf16 compute needs a CUDA device", 1, true), tostring(err))
    ok, err = pcall(moe.MoETrainer, {model = m, progress = false, precision = "fp8"})
    assert.truthy(tostring(err):find('precision must be "bf16" or "f32"', 1, true), tostring(err))
    assert.equal("f32", m:precision())
  end)

  it("lowers the loss on the built-in corpus", function()
    local m = small("Mixtral")
    local tr = moe.MoETrainer{model = m, progress = false}
    local before = tr:evaluate(held_ds, {batch_size = 4, seq_len = 32, batches = 4})
    local res = tr:train{train_data = train_ds, batch_size = 4, seq_len = 32, learning_rate = 5e-3, max_steps = 40}
    local after = tr:evaluate(held_ds, {batch_size = 4, seq_len = 32, batches = 4})
    assert.is_true(after.loss < before.loss - 1.0, string.format("eval loss %.3f -> %.3f", before.loss, after.loss))
    assert.are.equal(40, #res.history)
    assert.is_true(res.history[40].loss < res.history[1].loss)
    for _, k in ipairs{"loss", "aux_loss", "z_loss", "lr", "grad_norm", "tokens_per_s", "max_vio", "drop_rate"} do
      assert.is_number(res.history[1][k], k)
    end
    assert.is_table(res.history[1].routing[1].load)
  end)

  it("resumes from a checkpoint on the same loss curve, bit for bit", function()
    for _, name in ipairs{"SwitchTransformer", "DeepSeek"} do   -- jitter noise streams; aux-free bias buffers
      -- a schedule that does not depend on max_steps, so the 6-step run matches the 12-step one
      local opts = {batch_size = 2, seq_len = 16, learning_rate = 3e-3, warmup_steps = 2, seed = 5,
                    lr_schedule = "constant"}
      local function run(steps, resume_dir, run_dir)
        local m = small(name, {num_experts = 4, experts_per_token = name == "DeepSeek" and 2 or 1})
        local tr = moe.MoETrainer{model = m, progress = false, run_dir = run_dir}
        local o = {train_data = train_ds}
        for k, v in pairs(opts) do o[k] = v end
        o.max_steps = steps
        o.resume = resume_dir
        tr:train(o)
        return tr
      end
      local full = run(12)
      local dir = tmpdir()
      run(6, nil, dir)
      local resumed = run(12, dir .. "/checkpoint")
      for s = 7, 12 do
        assert.are.equal(full.history[s].loss, resumed.history[s].loss, name .. " step " .. s)
      end
      local pa, pb = full.model:parameters(), resumed.model:parameters()
      for i = 1, #pa do assert.is_true(pa[i].value:equal(pb[i].value), name .. " " .. pa[i].name) end
    end
  end)

  it("saves and loads a model: same logits", function()
    local m = small("OLMoE", {num_experts = 8, experts_per_token = 2})
    local tr = moe.MoETrainer{model = m, progress = false}
    tr:train{train_data = train_ds, batch_size = 2, seq_len = 16, max_steps = 3}
    local dir = tmpdir()
    tr:save_model(dir)
    local m2 = moe.load(dir)
    local ids = held_ds:batch{batch_size = 2, seq_len = 16, seed = 9, step = 0}
    assert.is_true(m:forward(ids).logits:equal(m2:forward(ids).logits))
    assert.are.equal("OLMoE", m2.config.name)
  end)

  it("writes metrics JSONL and a checkpoint into the run directory", function()
    local dir = tmpdir()
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false, run_dir = dir}
    tr:train{train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 5}
    local lines = 0
    for line in io.lines(dir .. "/metrics.jsonl") do
      local rec = moe.io.json.decode(line)
      assert.is_number(rec.loss)
      lines = lines + 1
    end
    assert.are.equal(5, lines)
    for _, f in ipairs{"config.json", "model.safetensors", "optimizer.safetensors", "trainer_state.json"} do
      assert.is_truthy(io.open(dir .. "/checkpoint/" .. f), f)
    end
  end)

  it("freezes the router and experts when asked; separate router learning rate", function()
    local m = small("Mixtral")
    local before = m.net:param("layers.0.mlp.gate.weight"):clone()
    local before_e = m.net:param("layers.0.mlp.experts.up_proj"):clone()
    local before_a = m.net:param("layers.0.self_attn.q_proj.weight"):clone()
    local tr = moe.MoETrainer{model = m, progress = false, freeze_router = true, freeze_experts = true}
    tr:train{train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 3, learning_rate = 1e-2}
    assert.is_true(m.net:param("layers.0.mlp.gate.weight"):equal(before))
    assert.is_true(m.net:param("layers.0.mlp.experts.up_proj"):equal(before_e))
    assert.is_false(m.net:param("layers.0.self_attn.q_proj.weight"):equal(before_a))
    -- and the other way round: only the MoE parts train
    local m2 = small("Mixtral")
    local a2, g2 = m2.net:param("layers.0.self_attn.q_proj.weight"):clone(), m2.net:param("layers.0.mlp.gate.weight"):clone()
    local tr2 = moe.MoETrainer{model = m2, progress = false, freeze_rest = true, router_learning_rate = 1e-3}
    tr2:train{train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 3, learning_rate = 1e-2}
    assert.is_true(m2.net:param("layers.0.self_attn.q_proj.weight"):equal(a2))
    assert.is_false(m2.net:param("layers.0.mlp.gate.weight"):equal(g2))
  end)

  it("save_final = false keeps the metrics but writes no closing checkpoint", function()
    local dir = tmpdir()
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false, run_dir = dir}
    tr:train{train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 2, save_final = false}
    assert.is_truthy(io.open(dir .. "/metrics.jsonl"))
    assert.is_nil(io.open(dir .. "/checkpoint/trainer_state.json"))
  end)

  it("takes batches from batch_fn and calls grad_hook once per step", function()
    local calls, seen = 0, {}
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false,
                              grad_hook = function(t) calls = calls + 1; assert.are.equal(calls - 1, t.step) end}
    local res = tr:train{max_steps = 3, gradient_accumulation_steps = 2, batch_size = 2, seq_len = 8,
                         batch_fn = function(i)
                           seen[#seen + 1] = i
                           return train_ds:batch{batch_size = 2, seq_len = 8, seed = 3, step = i}
                         end}
    assert.are.equal(3, calls)
    assert.are.same({0, 1, 2, 3, 4, 5}, seen)
    assert.are.equal(3, #res.history)
  end)

  it("the learning-rate schedule warms up, then decays", function()
    local o = {learning_rate = 1, warmup_steps = 10, max_steps = 110, min_lr_ratio = 0.1, lr_schedule = "cosine"}
    local lr = require("moelab.trainer").lr_at
    assert.are.equal(0.5, lr(5, o))
    assert.are.equal(1, lr(10, o))
    assert.is_true(math.abs(lr(60, o) - 0.55) < 1e-9)
    assert.is_true(math.abs(lr(110, o) - 0.1) < 1e-9)
    o.lr_schedule = "linear"
    assert.is_true(math.abs(lr(60, o) - 0.55) < 1e-9)
  end)

  it("skips a step with a non-finite loss and goes on", function()
    local m = small("Mixtral")
    local tr = moe.MoETrainer{model = m, progress = false}
    -- poison one parameter: every loss becomes NaN, so every step is skipped, then training stops
    m.net:param("norm.weight"):fill(0 / 0)
    local ok, msg = pcall(tr.train, tr, {train_data = train_ds, batch_size = 1, seq_len = 8, max_steps = 20,
                                         max_skipped_steps = 3})
    assert.is_false(ok)
    assert.is_truthy(tostring(msg):find("non-finite", 1, true))
    assert.are.equal(4, #tr.history)
    assert.is_true(tr.history[1].skipped)
    -- the update was queued with the device's guard and took itself back: no step counted
    assert.are.equal(0, tr.optimizer:step_count())
  end)

  it("a step skipped for a non-finite gradient norm still lets the run save and resume", function()
    local dir = tmpdir()
    -- NaN gradients at step 2: the norm is NaN, the update is skipped
    local function poison(t)
      if t.step == 1 then
        local _, g = t.model.net:flat_parameters()
        g:fill(0 / 0)
      end
    end
    local o = {train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 3}
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false, run_dir = dir, grad_hook = poison}
    local res = tr:train(o)
    assert.are.equal(1, res.skipped_steps)
    local state = moe.io.json.decode(moe.io.read_file(dir .. "/checkpoint/trainer_state.json"))
    assert.are.equal(3, state.step)
    assert.is_true(state.history[2].skipped)
    assert.is_nil(state.history[2].grad_norm)
    assert.is_number(state.history[2].loss)
    o.max_steps, o.resume = 4, true
    local again = moe.MoETrainer{model = small("Mixtral"), progress = false, run_dir = dir}
    assert.are.equal(4, again:train(o).steps)
    assert.are.equal(4, #again.history)
  end)

  it("clipping goes into the optimizer step: the same parameters as scaling the gradients first", function()
    local core = require "moelab.core"
    local function run(old_path)
      local m = small("Mixtral")
      local tr = moe.MoETrainer{model = m, progress = false, grad_clip = 0.05}
      -- the former path: a pass that scales the gradients, then the plain step
      if old_path then tr.clip_fn = core.clip_grad_norm end
      local res = tr:train{train_data = train_ds, batch_size = 2, seq_len = 16, max_steps = 3, learning_rate = 1e-2}
      return res, m.net:flat_parameters()
    end
    local r1, p1 = run(false)
    local r2, p2 = run(true)
    for s = 1, 3 do
      assert.is_true(r1.history[s].grad_norm > 0.05, "clipping must be active for this test")
      assert.are.equal(r2.history[s].loss, r1.history[s].loss)
    end
    assert.are.equal(0, (p1 - p2):abs():max():item())
  end)

  it("optimizer:scale_next_step scales one step's gradients, then forgets", function()
    local core = require "moelab.core"
    local a, b = model_and_grads(), model_and_grads()
    local oa, ob = core.adamw(a.net, {}), core.adamw(b.net, {})
    oa:scale_next_step(0.25)
    oa:step(1e-2)
    local _, gb = b.net:flat_parameters()
    gb:copy(gb * 0.25)
    ob:step(1e-2)
    assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
    -- the next step is unscaled: same gradients in, same parameters out
    local _, ga = a.net:flat_parameters()
    ga:copy(gb)
    oa:step(1e-2)
    ob:step(1e-2)
    assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
    for _, bad in ipairs{0, -1, 0 / 0, math.huge} do
      local ok, e = pcall(oa.scale_next_step, oa, bad)
      assert.is_false(ok)
      assert.truthy(tostring(e):find("optimizer:scale_next_step", 1, true))
    end
  end)

  it("optimizer:clip_next_step clips by a norm it reads itself, skips a non-finite step, then forgets", function()
    local core = require "moelab.core"
    local a, b = model_and_grads(), model_and_grads()
    local oa, ob = core.adamw(a.net, {}), core.adamw(b.net, {})
    local ss = core.grad_sumsq(a.net)
    local norm = core.grad_norm(b.net)
    assert.is_true(math.abs(math.sqrt(ss:item()) - norm) <= 1e-6 * norm)
    local max_norm = norm / 3
    -- clipped: the same parameters as the factor the trainer's host path computes
    oa:clip_next_step(ss, max_norm)
    oa:step(1e-2)
    ob:scale_next_step(max_norm / (norm + 1e-6))
    ob:step(1e-2)
    assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
    -- then forgotten: the next step is unclipped on both
    oa:step(1e-2)
    ob:step(1e-2)
    assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
    -- a norm under max_norm changes nothing (inf: no clipping)
    oa:clip_next_step(core.grad_sumsq(a.net), math.huge)
    oa:step(1e-2)
    ob:step(1e-2)
    assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
    -- a non-finite sum or guard: nothing changes but the step count
    local before, count = a.net:flat_parameters():clone(), oa:step_count()
    local m_before = oa:state():clone()
    for _, bad in ipairs{{moe.tensor(0 / 0)}, {core.grad_sumsq(a.net), moe.tensor(math.huge)}} do
      oa:clip_next_step(bad[1], 1.0, bad[2])
      oa:step(1e-2)
      assert.are.equal(0, (a.net:flat_parameters() - before):abs():max():item())
      assert.are.equal(0, (oa:state() - m_before):abs():max():item())
    end
    assert.are.equal(count + 2, oa:step_count())
    for _, args in ipairs{{moe.tensor({1, 2}), 1.0}, {ss, 0}, {ss, -1}, {moe.tensor(1, {dtype = "f64"}), 1.0},
                          {ss, 1.0, moe.tensor({1, 2})}} do
      local ok, e = pcall(oa.clip_next_step, oa, args[1], args[2], args[3])
      assert.is_false(ok)
      assert.truthy(tostring(e):find("optimizer:clip_next_step", 1, true), tostring(e))
    end
  end)

  it("the update queued with the device's norm and guard equals the host path, with two micro-batches", function()
    local function run(host)
      local m = small("Mixtral")
      -- a no-op gradient hook takes the host path (norm read, then the step)
      local tr = moe.MoETrainer{model = m, progress = false, grad_clip = 0.05, aux_loss_coef = 0.01,
                                grad_hook = host and function() end or nil}
      local res = tr:train{train_data = train_ds, batch_size = 2, seq_len = 16, max_steps = 3, learning_rate = 1e-2,
                           gradient_accumulation_steps = 2}
      return res, m.net:flat_parameters(), tr.optimizer:step_count()
    end
    local r1, p1, c1 = run(false)
    local r2, p2, c2 = run(true)
    for s = 1, 3 do
      assert.is_true(r1.history[s].grad_norm > 0.05, "clipping must be active for this test")
      assert.are.equal(r2.history[s].grad_norm, r1.history[s].grad_norm)
      assert.are.equal(r2.history[s].loss, r1.history[s].loss)
    end
    assert.are.equal(3, c1)
    assert.are.equal(c2, c1)
    assert.are.equal(0, (p1 - p2):abs():max():item())
  end)

  -- Adjacent parameters with the same settings share one run across the zero
  -- alignment padding between them, and the runs of one flat buffer one update
  -- call. Without weight decay the decay flag changes nothing but the runs:
  -- every flag the same (long runs) against alternating flags (a run a
  -- parameter) must give the same bytes, on a model whose sizes leave padding,
  -- with frozen parameters and lr groups, and for an owned range cut inside
  -- parameters (ZeRO); with weight decay each run keeps its own.
  it("AdamW updates runs of parameters with their own settings in one call: the same bytes", function()
    local core = require "moelab.core"
    local function odd_model_and_grads()
      return model_and_grads(moe.arch.Mixtral{vocab_size = 259, hidden_size = 28, num_layers = 2, num_heads = 2,
                                              num_experts = 3, experts_per_token = 2, expert_intermediate_size = 20,
                                              seed = 5})
    end
    local probe = odd_model_and_grads()
    local params, odd = probe:parameters(), 0
    for _, p in ipairs(params) do if p.value:numel() % 16 ~= 0 then odd = odd + 1 end end
    assert.is_true(odd >= 5, "the model must leave padding between parameters")
    local n, total = #params, probe.net:flat_parameters():numel()
    for _, case in ipairs{{}, {frozen = true}, {range = {37, total - 45}}} do
      local a, b = odd_model_and_grads(), odd_model_and_grads()
      local all, alt, scale = {}, {}, {}
      for i = 1, n do
        all[i], alt[i] = true, i % 2 == 0
        scale[i] = case.frozen and (i % 5 == 0 and 0 or (i % 3 == 0 and 0.5 or 1)) or 1
      end
      local oa = core.adamw(a.net, {weight_decay = 0, decay = all, lr_scale = scale, range = case.range})
      local ob = core.adamw(b.net, {weight_decay = 0, decay = alt, lr_scale = scale, range = case.range})
      for _ = 1, 2 do oa:step(1e-2); ob:step(1e-2) end
      assert.are.equal(0, (a.net:flat_parameters() - b.net:flat_parameters()):abs():max():item())
      local ma, va = oa:state()
      local mb, vb = ob:state()
      assert.are.equal(0, (ma - mb):abs():max():item())
      assert.are.equal(0, (va - vb):abs():max():item())
      -- runs with other settings share the launch too (ops.h: cfg.runs), frozen ones skipped
      assert.are.equal(oa:launches(), ob:launches())
      if not case.range then assert.are.equal(2, ob:launches()) end
    end
    -- with weight decay, each run keeps its own: alternating flags against all on and all off
    local a, on, off = odd_model_and_grads(), odd_model_and_grads(), odd_model_and_grads()
    local alt, all_on, all_off = {}, {}, {}
    for i = 1, n do alt[i], all_on[i], all_off[i] = i % 2 == 0, true, false end
    local oa = core.adamw(a.net, {weight_decay = 0.3, decay = alt})
    local o1 = core.adamw(on.net, {weight_decay = 0.3, decay = all_on})
    local o0 = core.adamw(off.net, {weight_decay = 0.3, decay = all_off})
    for _ = 1, 2 do oa:step(1e-1); o1:step(1e-1); o0:step(1e-1) end
    local pa, p1, p0 = a:parameters(), on:parameters(), off:parameters()
    for i = 1, n do
      local want = alt[i] and p1[i].value or p0[i].value
      assert.are.equal(0, (pa[i].value - want):abs():max():item(), pa[i].name)
      if alt[i] then assert.is_true((p1[i].value - p0[i].value):abs():max():item() > 0, "decay must change " .. pa[i].name) end
    end
    assert.are.equal(2, oa:launches())
  end)

  it("read_async reads one-element tensors; wait gives their values", function()
    local core = require "moelab.core"
    local r = core.read_async(moe.tensor(1.5), moe.tensor(-2, {dtype = "i64"}), moe.tensor({{0.25}}))
    local a, b, c = r:wait()
    assert.are.same({1.5, -2, 0.25}, {a, b, c})
    assert.are.same({1.5, -2, 0.25}, {r:wait()})
    for _, args in ipairs{{}, {moe.tensor({1, 2})}, {42}} do
      local ok, e = pcall(core.read_async, unpack(args))
      assert.is_false(ok)
      assert.truthy(tostring(e):find("read_async", 1, true), tostring(e))
    end
    local many = {}
    for i = 1, 17 do many[i] = moe.tensor(i) end
    local ok, e = pcall(core.read_async, unpack(many))
    assert.is_false(ok)
    assert.truthy(tostring(e):find("expected 1 to 16", 1, true), tostring(e))
  end)

  it("save_checkpoint before any training, or without a directory, fails saying why", function()
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false}
    local ok, e = pcall(tr.save_checkpoint, tr)
    assert.is_false(ok)
    assert.truthy(tostring(e):find("give a directory (the trainer has no run_dir)", 1, true), tostring(e))
    ok, e = pcall(tr.save_checkpoint, tr, tmpdir())
    assert.is_false(ok)
    assert.truthy(tostring(e):find("nothing to resume from yet", 1, true), tostring(e))
    ok, e = pcall(tr.save_checkpoint, tr, 42)
    assert.is_false(ok)
    assert.truthy(tostring(e):find("the directory must be a string, got number", 1, true), tostring(e))
  end)

  it("rejects bad configurations with clear errors", function()
    local function err(f, pat)
      local ok, msg = pcall(f)
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find(pat, 1, true), tostring(msg))
    end
    err(function() moe.MoEModel{num_experts = 4, experts_per_token = 5} end, "experts_per_token")
    err(function() moe.MoEModel{hidden_size = 30, num_heads = 4} end, "divisible")
    err(function() moe.MoEModel{capacity_factor = 0 - 1} end, "capacity_factor")
    err(function() moe.MoEModel{router = "psychic"} end, "router")
    err(function() moe.MoETrainer{model = 3} end, "model must be")
    err(function() moe.MoETrainer{model = small("Mixtral"), load_balancing = "vibes"} end, "unknown method")
    err(function() moe.MoETrainer{model = small("Mixtral"), lr = 1} end, "unknown option 'lr'")
    local tr = moe.MoETrainer{model = small("Mixtral"), progress = false}
    err(function() tr:train{train_data = "text", max_steps = 1} end, "train_data must be a dataset")
    err(function() tr:train{train_data = train_ds} end, "max_steps or num_epochs")
    err(function() tr:train{train_data = train_ds, max_steps = 1, lr_schedule = "zigzag"} end, "lr_schedule")
    err(function() tr:train{train_data = train_ds, max_steps = 1, resume = "/nonexistent/ckpt"} end, "no complete checkpoint")
    err(function() moe.load("/nonexistent/dir") end, "nonexistent")
    err(function() moe.MoETrainer{model = small("Mixtral"), cuda_graph = "yes"} end, "cuda_graph must be")
    -- a CPU model has no graph to capture: true says so before any step, "auto" trains eagerly
    local g = moe.MoETrainer{model = small("Mixtral"), progress = false, cuda_graph = true}
    err(function() g:train{train_data = train_ds, max_steps = 1, save_final = false} end, "not on a CUDA device")
    assert.are.equal(0, g.step)
  end)

  it("cuda_graph is \"auto\" by default, which on the CPU trains exactly as cuda_graph = false", function()
    local function run(cg)
      local tr = moe.MoETrainer{model = small("OLMoE"), progress = false, cuda_graph = cg}
      assert.are.equal(cg == nil and "auto" or cg, tr.cuda_graph)
      return tr:train{train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 3, save_final = false}
    end
    local a, b = run(nil), run(false)
    for s = 1, 3 do assert.are.equal(b.history[s].loss, a.history[s].loss) end
  end)
end)
