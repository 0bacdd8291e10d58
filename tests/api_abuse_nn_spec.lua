-- Throws wrong types, shapes and nils at every layer constructor, layer
-- method, tape method and optimiser, and checks each raises a Lua error that
-- names the function, and that the process survives.
local moe = require "moelab"

local garbage = {nil, false, true, -1, 0, 0.5, 1e300, 0 / 0, "x", {}, {1, "a"}, function() end}

local function fails(f, ...)
  local ok, msg = pcall(f, ...)
  return not ok, tostring(msg)
end

local function layers()
  return {
    moe.nn.Linear(4, 3, {seed = 1}), moe.nn.Embedding(5, 4, {seed = 2}), moe.nn.RMSNorm(4),
    moe.nn.LayerNorm(4), moe.nn.Attention{hidden_size = 4, num_heads = 2, seed = 3},
    moe.nn.FeedForward{hidden_size = 4, intermediate_size = 6, seed = 4},
    moe.nn.Sequential(moe.nn.Linear(4, 4, {seed = 5}), moe.nn.SiLU()), moe.nn.SiLU(),
    moe.nn.ModuleList{a = moe.nn.Linear(2, 2, {seed = 6})},
  }
end

describe("layer constructors reject bad arguments", function()
  it("every constructor, with no arguments and with garbage", function()
    local ctors = {"Linear", "Embedding", "RMSNorm", "LayerNorm", "Attention", "FeedForward"}
    for _, name in ipairs(ctors) do
      local bad, msg = fails(moe.nn[name])
      assert.is_true(bad, name .. "() did not fail")
      assert.is_truthy(msg:find("nn." .. name, 1, true) or msg:find(name, 1, true), name .. ": " .. msg)
      for _, g in ipairs(garbage) do
        local b1 = fails(moe.nn[name], g)
        local b2 = fails(moe.nn[name], g, g)
        assert.is_true(b1 and b2, name .. " accepted " .. tostring(g))
      end
    end
    assert.is_true((fails(moe.nn.Sequential, 1)))
    assert.is_true((fails(moe.nn.Sequential, {moe.nn.SiLU(), "x"})))
    assert.is_true((fails(moe.nn.ModuleList, {a = 3})))
    assert.is_true((fails(moe.nn.Attention, {hidden_size = 6, num_heads = 4})))  -- 6 % 4: head_dim 1, rope needs even
    assert.is_true((fails(moe.nn.RMSNorm, 4, {eps = -1})))
    assert.is_true((fails(moe.nn.Linear, 2, 3, {bias = "yes"})))
  end)
end)

describe("layer methods reject bad arguments", function()
  it("forward with nil, garbage, wrong shapes, wrong dtypes", function()
    for _, l in ipairs(layers()) do
      for _, g in ipairs(garbage) do
        local bad, msg = fails(l.forward, l, g)
        assert.is_true(bad, tostring(l) .. ":forward accepted " .. tostring(g))
        assert.is_truthy(msg:find("forward", 1, true), msg)
      end
      if l:kind() ~= "Activation" then   -- activations take any shape
        assert.is_true((fails(l.forward, l, moe.randn({2, 7}))), tostring(l))
      end
      assert.is_true((fails(l.forward, l, moe.randn({4}), "not a tape")), tostring(l))
      -- calling a method on something that is not a layer
      assert.is_true((fails(l.forward, moe.randn({4}), moe.randn({4}))))
      assert.is_true((fails(l.parameters, 5)))
      assert.is_true((fails(l.param, l, "no_such_param")))
      assert.is_true((fails(l.param, l)))
      assert.is_true((fails(l.grad, l, {})))
      assert.is_true((fails(l.to, l, "tpu:0")))
      assert.is_true((fails(l.to, l)))
    end
  end)

  it("a failed forward leaves the layer usable", function()
    local l = moe.nn.Linear(4, 3, {seed = 7})
    local x = moe.randn({2, 4}, {seed = 8})
    local before = l:forward(x)
    assert.is_true((fails(l.forward, l, moe.randn({2, 5}))))
    assert.is_true(l:forward(x):allclose(before, 0, 0))
  end)
end)

describe("tape methods reject bad arguments", function()
  it("every method, with no arguments and with garbage", function()
    local t = moe.Tape()
    local methods = {"backward", "grad", "add", "sub", "mul", "div", "silu", "gelu", "relu", "tanh",
                     "sigmoid", "exp", "log", "square", "scale", "neg", "swiglu", "view",
                     "cross_entropy", "sum", "mean", "forward"}
    for _, m in ipairs(methods) do
      local f = t[m]
      assert.is_function(f, m)
      local bad, msg = fails(f, t)
      assert.is_true(bad, "tape:" .. m .. "() did not fail")
      assert.is_truthy(msg:find(m, 1, true), m .. ": " .. msg)
      for _, g in ipairs(garbage) do
        assert.is_true((fails(f, t, g, g)), "tape:" .. m .. " accepted " .. tostring(g))
      end
      assert.is_true((fails(f, "not a tape", moe.randn({2}))), m)
    end
    assert.is_true((fails(t.add, t, moe.randn({2, 3}), moe.randn({4}))))
    assert.is_true((fails(t.view, t, moe.randn({2, 3}), {4, 2})))
    assert.is_true((fails(t.cross_entropy, t, moe.randn({2, 3}), moe.tensor({1, 2}))))       -- f32 targets
    assert.is_true((fails(t.cross_entropy, t, moe.randn({2, 3}), moe.tensor({1, 2, 0}, {dtype = "i64"}))))
    assert.is_true((fails(t.cross_entropy, t, moe.randn({2, 3}), moe.tensor({1, 5}, {dtype = "i64"}))))
    local y = t:sum(moe.randn({3}))
    assert.is_true((fails(t.backward, t, y, moe.randn({2}))))   -- wrong gradient shape
  end)
end)

describe("optimiser rejects bad arguments", function()
  it("AdamW", function()
    local l = moe.nn.Linear(2, 2, {seed = 9})
    for _, opts in ipairs{{}, {params = l, lr = "fast"}, {params = l, betas = 0.9},
                          {params = l, betas = {1.5, 0.9}}, {params = l, lr = -1}, {params = moe.randn({2})}} do
      local bad, msg = fails(moe.optim.AdamW, opts)
      assert.is_true(bad)
      assert.is_truthy(msg:find("AdamW", 1, true), msg)
    end
    assert.is_true((fails(moe.optim.AdamW, nil)))
  end)
end)

describe("MoE constructors and methods reject bad arguments", function()
  it("nn.MoE, nn.Model, MoEModel, presets, MoETrainer with garbage", function()
    local ctors = {moe.nn.MoE, moe.nn.Model, moe.MoEModel, moe.arch.Mixtral, moe.arch.SwitchTransformer,
                   moe.arch.GLaM, moe.arch.OLMoE, moe.arch.DeepSeek, moe.arch.Custom, moe.MoETrainer,
                   moe.routing.TopKRouter, moe.routing.ExpertChoice, moe.routing.LoadBalancer, moe.experts.ExpertPool}
    for i, c in ipairs(ctors) do
      for _, g in ipairs{5, "x", true, function() end} do
        assert.is_true((fails(c, g)), "constructor " .. i .. " accepted " .. tostring(g))
      end
    end
    local bad_opts = {
      {hidden_size = 8, num_experts = 0}, {hidden_size = 8, num_experts = 4, experts_per_token = 0},
      {hidden_size = 8, num_experts = 4, router = 3}, {hidden_size = 8, capacity_factor = "big"},
      {hidden_size = 8, activation = "tanh"}, {hidden_size = -8}, {hidden_size = 8, jitter_noise = 2},
      {hidden_size = 8, num_shared_experts = -1}, {hidden_size = 8, renormalize = "yes"},
      {hidden_size = 8, num_experts = 2, experts = {moe.nn.SiLU(), "x"}},
    }
    for _, o in ipairs(bad_opts) do
      assert.is_true((fails(moe.nn.MoE, o)), "nn.MoE accepted a bad option set")
    end
    assert.is_true((fails(moe.nn.Model, {vocab_size = 0, hidden_size = 8, num_layers = 1, num_heads = 2})))
    assert.is_true((fails(moe.nn.Model, {vocab_size = 8, hidden_size = 8, num_layers = 1, num_heads = 2,
                                         custom_experts = {{}}})))
  end)

  it("MoE-only methods on other layers, and model methods on non-models", function()
    local lin = moe.nn.Linear(2, 2, {seed = 1})
    for _, m in ipairs{"routing_stats", "aux_loss", "z_loss", "expert_bias", "assignments", "update_bias",
                       "set_noise_step", "noise_step"} do
      local bad, msg = fails(lin[m], lin)
      assert.is_true(bad, m)
      assert.is_truthy(msg:find("not an MoE layer", 1, true), msg)
    end
    for _, m in ipairs{"balance_losses", "moe_layers", "num_active_params", "config"} do
      assert.is_true((fails(lin[m], lin)), m)
    end
    local blk = moe.nn.MoE{hidden_size = 4, num_experts = 2, experts_per_token = 1, seed = 2}
    assert.is_nil(blk:routing_stats())               -- before any forward
    assert.is_true((fails(blk.set_noise_step, blk, -1)))
    assert.is_true((fails(blk.set_noise_step, blk, "x")))
    assert.is_true((fails(blk.forward, blk, moe.randn({3, 5}))))
    local model = moe.MoEModel{vocab_size = 16, hidden_size = 8, num_layers = 1, num_heads = 2, num_experts = 2,
                               experts_per_token = 1, seed = 3}
    for _, g in ipairs{nil, 5, moe.randn({2, 3}), moe.tensor({1, 2}, {dtype = "i64"}),
                       moe.tensor({{1, 99}}, {dtype = "i64"})} do
      assert.is_true((fails(model.forward, model, g)))
    end
    assert.is_true((fails(model.forward, model, moe.tensor({{1, 2}}, {dtype = "i64"}), 5)))
  end)

  it("the optimiser binding and gradient helpers", function()
    local l = moe.nn.Linear(2, 2, {seed = 4})
    for _, g in ipairs{nil, 5, "x", moe.randn({2})} do
      assert.is_true((fails(moe.core.adamw, g)))
      assert.is_true((fails(moe.core.grad_norm, g)))
      assert.is_true((fails(moe.core.clip_grad_norm, g, 1)))
    end
    assert.is_true((fails(moe.core.adamw, l, {lr_scale = {1}})))          -- wrong length
    assert.is_true((fails(moe.core.adamw, l, {decay = {1, 2}})))          -- not booleans
    assert.is_true((fails(moe.core.adamw, l, {beta1 = 1.5})))
    local opt = moe.core.adamw(l, {})
    assert.is_true((fails(opt.step, opt)))
    assert.is_true((fails(opt.step, opt, -1)))
    assert.is_true((fails(opt.step, 5, 0.1)))
    assert.is_true((fails(moe.core.clip_grad_norm, l, "x")))
  end)
end)
