-- AdamW with bf16 moments (core.adamw{state_dtype = "bf16"}, MoETrainer{optimizer_state = "bf16"}):
-- stochastic rounding that keeps v following g^2 where rounding to nearest
-- stalls, the f32 update it approximates, the same bytes run after run and
-- under a ZeRO range, checkpoints, and the argument checks. Then AdamW with its
-- step count and learning rate held by the device (optimizer:set_device_state,
-- set_lr, device_state; what a step captured into a CUDA graph reads): the same
-- bytes as host values, step_count's meaning kept, a guarded skip not counted.
local moe = require "moelab"
local core = require "moelab.core"
local files = require "helpers.files"
teardown(files.cleanup)

local corpus = moe.data.corpus{seed = 11, num_bytes = 40000}
local train_ds = corpus:split(0.1)

local function small(seed)
  return moe.arch.Mixtral{vocab_size = 259, hidden_size = 28, num_layers = 2, num_heads = 2, num_experts = 3,
                          experts_per_token = 2, expert_intermediate_size = 20, seed = seed or 5}
end

-- model after one forward and backward: gradients in its flat buffer
local function with_grads(m)
  local ids, targets = train_ds:batch{batch_size = 2, seq_len = 8, seed = 1, step = 0}
  local out = m:forward(ids, {targets = targets})
  out.tape:backward(out.total_loss)
  return m
end

local function max_abs(t) return t:abs():max():item() end

describe("AdamW with bf16 moments", function()
  it("keeps v following g^2 where rounding to nearest would stall it (stochastic rounding)", function()
    -- v starts at 1, g^2 = 2, beta2 = 0.999: f32 gives v_t = 2 - 0.999^t. Each step's
    -- increment (0.001) is under an eighth of bf16's step at 1 (2^-7): rounded to
    -- nearest, v would stay 1 for ever; rounded stochastically, its mean follows.
    local n, steps = 8192, 300
    local p = moe.zeros({n})
    local g = moe.full({n}, math.sqrt(2))
    local m = moe.full({n}, math.sqrt(2)):to("bf16")
    local v = moe.ones({n}):to("bf16")
    for s = 1, steps do core.ops.adamw(p, g, m, v, {lr = 0, beta2 = 0.999, step = s}) end
    local want = 2 - 0.999 ^ steps
    local mean = v:to("f32"):sum():item() / n
    assert.is_true(math.abs(mean - want) < 0.01 * want, ("mean v %.5f, f32 gives %.5f"):format(mean, want))
    assert.is_true(max_abs(v:to("f32") - 1) > 0, "v must have moved")
    -- m was already at g: its rounding must not drift it
    assert.is_true(max_abs(m:to("f32") - math.sqrt(2)) <= 2 ^ -7 * 1.5)
  end)

  it("steps close to the f32-state optimizer, and holds bf16 m and v", function()
    local a, b = with_grads(small()), with_grads(small())
    local oa = core.adamw(a.net, {weight_decay = 0.1})
    local ob = core.adamw(b.net, {weight_decay = 0.1, state_dtype = "bf16"})
    local p0 = a.net:flat_parameters():clone()
    for _ = 1, 3 do oa:step(1e-2); ob:step(1e-2) end
    local ma, va = oa:state()
    local mb, vb = ob:state()
    assert.are.equal("bf16", mb:dtype())
    assert.are.equal("bf16", vb:dtype())
    assert.are.equal("f32", ma:dtype())
    assert.are.equal(ma:numel(), mb:numel())
    local da = a.net:flat_parameters() - p0
    local db = b.net:flat_parameters() - p0
    -- each moment is within a bf16 step of its f32 value, so the updates agree to ~1%
    assert.is_true(max_abs(da - db) <= 0.02 * max_abs(da), ("update differs by %g of %g"):format(max_abs(da - db), max_abs(da)))
    assert.is_true(max_abs(ma - mb:to("f32")) <= 0.01 * max_abs(ma))
    assert.is_true(max_abs(va - vb:to("f32")) <= 0.01 * max_abs(va))
  end)

  it("gives the same bytes run after run, and under a ZeRO range as in the whole buffer", function()
    local function run(range)
      local m = with_grads(small())
      local o = core.adamw(m.net, {state_dtype = "bf16", range = range})
      for _ = 1, 3 do o:step(1e-2) end
      local mm, vv = o:state()
      return m.net:flat_parameters(), mm, vv
    end
    local p1, m1, v1 = run()
    local p2, m2, v2 = run()
    assert.is_true(p1:equal(p2) and m1:equal(m2) and v1:equal(v2))
    -- the rounding's random bits follow each element's place in the whole buffer,
    -- so an owned range rounds its elements as the whole buffer does
    local total = p1:numel()
    local lo, hi = 37, total - 45
    local p3, m3, v3 = run({lo, hi})
    local n = hi - lo
    assert.is_true(p3:narrow(1, lo + 1, n):equal(p1:narrow(1, lo + 1, n)))
    assert.is_true(m3:equal(m1:narrow(1, lo + 1, n)))
    assert.is_true(v3:equal(v1:narrow(1, lo + 1, n)))
  end)

  it("trains through MoETrainer{optimizer_state = \"bf16\"} and resumes from its checkpoint bit for bit", function()
    local opts = {batch_size = 2, seq_len = 16, learning_rate = 3e-3, warmup_steps = 2, seed = 5,
                  lr_schedule = "constant"}
    local function run(steps, resume_dir, run_dir)
      local tr = moe.MoETrainer{model = small(3), progress = false, run_dir = run_dir, optimizer_state = "bf16"}
      local o = {train_data = train_ds, max_steps = steps, resume = resume_dir}
      for k, v in pairs(opts) do o[k] = v end
      tr:train(o)
      return tr
    end
    local full = run(10)
    assert.are.equal("bf16", full.optimizer:state():dtype())
    assert.is_true(full.history[10].loss < full.history[1].loss - 0.3,
                   ("loss %g -> %g"):format(full.history[1].loss, full.history[10].loss))
    local dir = files.tmpdir()
    run(5, nil, dir)
    local resumed = run(10, dir .. "/checkpoint")
    for s = 6, 10 do assert.are.equal(full.history[s].loss, resumed.history[s].loss, "step " .. s) end
    local ma = full.optimizer:state()
    local mb = resumed.optimizer:state()
    assert.is_true(ma:equal(mb))
    -- the checkpoint keeps the moments in bf16
    local saved = moe.io.safetensors.load(dir .. "/checkpoint/optimizer.safetensors")
    assert.are.equal("bf16", saved.exp_avg:dtype())
  end)

  it("resumes an f32-state checkpoint into bf16 moments (rounded), and the other way", function()
    local dir = files.tmpdir()
    local function trainer(state, run_dir)
      return moe.MoETrainer{model = small(3), progress = false, run_dir = run_dir, optimizer_state = state}
    end
    local o = {train_data = train_ds, batch_size = 2, seq_len = 16, learning_rate = 3e-3, lr_schedule = "constant"}
    o.max_steps = 3
    trainer("f32", dir):train(o)
    o.max_steps, o.resume = 4, dir .. "/checkpoint"
    local tb = trainer("bf16")
    tb:train(o)
    assert.are.equal(4, tb.step)
    assert.are.equal("bf16", tb.optimizer:state():dtype())
    local dir2 = files.tmpdir()
    o.max_steps, o.resume = 3, nil
    trainer("bf16", dir2):train(o)
    o.max_steps, o.resume = 4, dir2 .. "/checkpoint"
    local ta = trainer("f32")
    ta:train(o)
    assert.are.equal(4, ta.step)
  end)

  it("ZeRO-1 and ZeRO-2 (one rank) with bf16 moments train like MoETrainer, save and resume", function()
    local distributed = require "moelab.distributed"
    local o = {train_data = train_ds, batch_size = 2, seq_len = 8, max_steps = 3, learning_rate = 1e-3}
    local want = moe.MoETrainer{model = small(3), progress = false, grad_clip = 0.05, optimizer_state = "bf16"}
      :train(o).history
    for _, zs in ipairs{1, 2} do
      local dir = files.tmpdir()
      local function trainer()
        return distributed.DistributedMoETrainer{model = small(3), progress = false, zero_stage = zs, grad_clip = 0.05,
                                                 optimizer_state = "bf16", run_dir = dir}
      end
      local got = trainer():train(o).history
      for s = 1, 3 do assert.are.equal(want[s].loss, got[s].loss, "ZeRO-" .. zs .. " step " .. s) end
      local saved = moe.io.safetensors.load(dir .. "/checkpoint/optimizer.safetensors")
      assert.are.equal("bf16", saved.exp_avg:dtype())
      local o2 = {}
      for k, v in pairs(o) do o2[k] = v end
      o2.max_steps, o2.resume = 4, true
      assert.are.equal(4, trainer():train(o2).steps)
    end
  end)

  it("refuses other state dtypes and mixed m and v", function()
    local m = small()
    for _, bad in ipairs{"f16", "f64", 3} do
      local ok, e = pcall(core.adamw, m.net, {state_dtype = bad})
      assert.is_false(ok)
      assert.truthy(tostring(e):find("state_dtype", 1, true), tostring(e))
    end
    local ok, e = pcall(moe.MoETrainer, {model = m, optimizer_state = "f16"})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("optimizer_state", 1, true), tostring(e))
    local p, g = moe.zeros({8}), moe.ones({8})
    ok, e = pcall(core.ops.adamw, p, g, moe.zeros({8}):to("bf16"), moe.zeros({8}), {})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("both f32 or both bf16", 1, true), tostring(e))
    ok, e = pcall(core.ops.adamw, p, g, moe.zeros({8}), moe.zeros({8}), {index0 = -1})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("index0", 1, true), tostring(e))
  end)

  -- the split master (bf16 precision on a GPU; tests/gpu/mixed_precision_gpu.lua): its options here
  it("takes master = \"split\" or \"f32\" and refuses anything else; f32 precision never splits", function()
    local m = small()
    for _, bad in ipairs{"bf16", 2, true} do
      local ok, e = pcall(core.adamw, m.net, {master = bad})
      assert.is_false(ok)
      assert.truthy(tostring(e):find("'master' must be", 1, true), tostring(e))
    end
    local ok, e = pcall(moe.MoETrainer, {model = m, master_weights = "half"})
    assert.is_false(ok)
    assert.truthy(tostring(e):find("master_weights must be", 1, true), tostring(e))
    for _, master in ipairs{"split", "f32"} do
      local mm = with_grads(small())
      local before = mm.net:flat_parameters():clone()
      local o = core.adamw(mm.net, {master = master})
      o:prepare()
      o:step(1e-2)
      local st = mm.net:master_state()
      assert.is_false(st.split, master)   -- no bf16 compute copy to split into
      assert.are.equal(0, st.splits)
      assert.are.equal(0, st.joins)
      assert.is_false(mm.net:flat_parameters():equal(before), master)   -- the step still updated the values
    end
  end)
end)

describe("AdamW with device state", function()
  it("steps to the same bytes as host values, for f32 and bf16 moments", function()
    for _, state in ipairs{"f32", "bf16"} do
      local a, b = with_grads(small()), with_grads(small())
      local oa = core.adamw(a.net, {weight_decay = 0.1, state_dtype = state})
      local ob = core.adamw(b.net, {weight_decay = 0.1, state_dtype = state})
      assert.is_false(ob:device_state())
      ob:set_device_state(true)
      assert.is_true(ob:device_state())
      for _, lr in ipairs{1e-2, 3e-3, 5e-3} do
        oa:step(lr)
        ob:set_lr(lr)
        ob:step()   -- the lr argument may be left out: the device's is used
      end
      assert.is_true(a.net:flat_parameters():equal(b.net:flat_parameters()), state)
      local ma, va = oa:state()
      local mb, vb = ob:state()
      assert.is_true(ma:equal(mb) and va:equal(vb), state)
      assert.are.equal(3, oa:step_count())
      assert.are.equal(3, ob:step_count())
    end
  end)

  it("keeps step_count's meaning: set, read, and back to the host when turned off", function()
    local m = with_grads(small())
    local o = core.adamw(m.net)
    o:step(1e-3)
    o:set_device_state(true)
    assert.are.equal(1, o:step_count())
    assert.are.equal(17, o:step_count(17))
    assert.are.equal(17, o:step_count())
    o:set_lr(1e-3)
    o:step()
    assert.are.equal(18, o:step_count())
    o:set_device_state(true)   -- again: nothing changes
    assert.are.equal(18, o:step_count())
    o:set_device_state(false)
    assert.is_false(o:device_state())
    assert.are.equal(18, o:step_count())
    o:step(1e-3)
    assert.are.equal(19, o:step_count())
  end)

  it("does not count a step its non-finite guard skipped", function()
    local m = with_grads(small())
    local o = core.adamw(m.net)
    o:set_device_state(true)
    o:set_lr(1e-2)
    o:step()
    local before = m.net:flat_parameters():clone()
    o:clip_next_step(core.grad_sumsq(m.net), 1.0, moe.full({1}, 0 / 0))
    o:step()
    assert.are.equal(1, o:step_count())
    assert.is_true(m.net:flat_parameters():equal(before))
  end)

  it("refuses set_lr without device state, and bad arguments", function()
    local o = core.adamw(small().net)
    local ok, e = pcall(o.set_lr, o, 1e-3)
    assert.is_false(ok)
    assert.truthy(tostring(e):find("set_device_state", 1, true), tostring(e))
    ok, e = pcall(o.set_device_state, o, 1)
    assert.is_false(ok)
    assert.truthy(tostring(e):find("boolean", 1, true), tostring(e))
    o:set_device_state(true)
    ok, e = pcall(o.set_lr, o, -1)
    assert.is_false(ok)
    assert.truthy(tostring(e):find(">= 0", 1, true), tostring(e))
    ok, e = pcall(o.step_count, o, -2)
    assert.is_false(ok)
    assert.truthy(tostring(e):find(">= 0", 1, true), tostring(e))
  end)
end)
