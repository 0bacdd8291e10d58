-- Activation recompute (tape:set_recompute, src/nn/remat.c): with "norms" the
-- RMSNorms' outputs (the blocks' two norms, the QK-norms with their rotation,
-- the final norm) give their memory back after the forward and the backward
-- makes them again; with "norms_qkv" also the q, k and v projections (and
-- without QK-norm q and k under either mode: nothing reads them again). Against the same step without it: the same loss and the
-- same gradients bit for bit, less memory on the tape, the same training
-- through the trainer, and bad modes refused. (tests/c/test_tape.c parks and
-- recomputes single tensors.)
local moe = require "moelab"
local core = require "moelab.core"

local tiny_olmoe = require("helpers.models").tiny_olmoe
local function model(over)
  local o = {vocab_size = 97, seed = 3}
  for k, v in pairs(over or {}) do o[k] = v end
  return tiny_olmoe(o)
end

local ids = moe.tensor({{1, 2, 3, 4, 5, 6, 7, 8}, {9, 10, 11, 12, 13, 14, 15, 16}}, {dtype = "i64"})
local targets = moe.tensor({{2, 3, 4, 5, 6, 7, 8, 9}, {10, 11, 12, 13, 14, 15, 16, 96}}, {dtype = "i64"})

local function bytes(rows)
  local n = 0
  for _, r in ipairs(rows) do n = n + r.bytes end
  return n
end

-- one forward and backward as the trainer runs it; returns the loss, a copy of
-- the flat gradients and the tape's bytes after the forward (parameters left out)
local function step(m, recompute, opts)
  opts = opts or {}
  m.net:zero_grad()
  local out = m:forward(ids, {targets = targets, aux_loss_coef = 0.01, keep_logits = opts.keep_logits,
                              loss_grad = opts.loss_grad, recompute = recompute})
  local held = bytes(out.tape:memory({m.net:flat_parameters()}))
  out.tape:backward(out.total_loss)
  local _, g = m.net:flat_parameters()
  local loss = out.loss:item()
  out.tape:reset()
  return loss, g:clone(), held
end

local function same_bits(a, b)
  assert.are.equal(a:numel(), b:numel())
  local x, y = a:to_table(), b:to_table()
  for i = 1, #x do
    if x[i] ~= y[i] and not (x[i] ~= x[i] and y[i] ~= y[i]) then
      error(string.format("gradient element %d: %.9g without recompute, %.9g with", i, x[i], y[i]), 2)
    end
  end
end

describe("activation recompute (tape:set_recompute)", function()
  it("gives the same loss and gradients bit for bit, holding less on the tape", function()
    for _, cfg in ipairs({
      {keep_logits = false, loss_grad = 1},   -- the trainer's way: the head's gradients in the forward
      {keep_logits = nil},                    -- logits kept, the plain head and loss
    }) do
      local m = model()
      m:train(true)
      local l0, g0, held0 = step(m, "none", cfg)
      local l1, g1, held1 = step(m, "norms", cfg)
      local l2, g2, held2 = step(m, "norms_qkv", cfg)
      assert.are.equal(l0, l1)
      assert.are.equal(l0, l2)
      same_bits(g0, g1)
      same_bits(g0, g2)
      -- per layer: the two norms' outputs and the rotated q and k, [2, 8, 32] f32 each; then q, k and v
      local per = 2 * 8 * 32 * 4
      assert.is_true(held0 - held1 >= 2 * 4 * per,
                     string.format("the tape held %d bytes without recompute, %d with", held0, held1))
      assert.is_true(held1 - held2 >= 2 * 3 * per,
                     string.format("the tape held %d bytes with norms recomputed, %d with q, k and v too", held1, held2))
    end
  end)

  it("gives back q and k of a model without QK-norm at no cost (Mixtral)", function()
    local function mixtral()
      return moe.arch.Mixtral{vocab_size = 97, hidden_size = 32, num_layers = 2, num_heads = 4, num_kv_heads = 2,
                              num_experts = 4, experts_per_token = 2, expert_intermediate_size = 16, seed = 4}
    end
    local m = mixtral()
    m:train(true)
    local cfg = {keep_logits = false, loss_grad = 1}
    local l0, g0, held0 = step(m, "none", cfg)
    local l1, g1, held1 = step(m, "norms", cfg)
    assert.are.equal(l0, l1)
    same_bits(g0, g1)
    -- per layer the two norms' outputs, then q [2, 8, 32] and k [2, 8, 16] (two kv heads), f32
    local per = 2 * 8 * 32 * 4
    assert.is_true(held0 - held1 >= 2 * (2 * per + per + per / 2),
                   string.format("the tape held %d bytes without recompute, %d with", held0, held1))
  end)

  it("is off by default and refuses unknown modes", function()
    local t = core.Tape()
    assert.are.equal("none", t:recompute())
    assert.are.equal("norms", t:set_recompute("norms"):recompute())
    assert.are.equal("none", t:set_recompute("none"):recompute())
    assert.are.equal("norms_qkv", t:set_recompute("norms_qkv"):recompute())
    assert.has_error(function() t:set_recompute("all") end,
                     'tape:set_recompute: mode must be "none", "norms" or "norms_qkv", got "all"')
    local m = model()
    assert.has_error(function() m:forward(ids, {recompute = "yes"}) end,
                     'MoEModel:forward: recompute must be "none", "norms" or "norms_qkv", got yes')
    assert.has_error(function() moe.MoETrainer{model = m, recompute = true} end)
  end)

  it("trains the same through the trainer", function()
    local function run(mode)
      local m = model({seed = 5})
      local tr = moe.MoETrainer{model = m, progress = false, aux_loss_coef = 0.01, recompute = mode}
      tr:train{batch_fn = function() return ids, targets end, batch_size = 2, seq_len = 8, learning_rate = 1e-3,
               lr_schedule = "constant", max_steps = 3}
      local losses = {}
      for i, rec in ipairs(tr.history) do losses[i] = rec.loss end
      assert.are.equal(3, #losses)
      local v = m.net:flat_parameters()
      return losses, v:clone()
    end
    local la, va = run("none")
    for _, mode in ipairs({"norms", "norms_qkv"}) do
      local lb, vb = run(mode)
      assert.are.same(la, lb)
      same_bits(va, vb)
    end
  end)
end)

describe("one backward a tape (tape:set_one_backward)", function()
  it("gives the same gradients, lets go of the activations, and refuses a second backward", function()
    local m = model()
    m:train(true)
    local l0, g0 = step(m, "none", {keep_logits = false, loss_grad = 1})
    for _, recompute in ipairs({"none", "norms", "norms_qkv"}) do
      m.net:zero_grad()
      local out = m:forward(ids, {targets = targets, aux_loss_coef = 0.01, keep_logits = false, loss_grad = 1,
                                  recompute = recompute})
      assert.is_true(bytes(out.tape:memory({m.net:flat_parameters()})) > 0)
      out.tape:set_one_backward(true)
      out.tape:backward(out.total_loss)
      local _, g = m.net:flat_parameters()
      assert.are.equal(l0, out.loss:item())
      same_bits(g0, g)
      -- what stays is leaves only the tape holds (here a 4-byte scalar): their
      -- gradient slots are keyed by their headers' addresses
      assert.is_true(bytes(out.tape:memory()) <= 16, recompute)
      local ok, err = pcall(function() out.tape:backward(out.total_loss) end)
      assert.is_false(ok)
      assert.truthy(tostring(err):find("reset it and record the forward again", 1, true),
                    tostring(err))
      -- after a reset the tape records and runs a backward again
      out.tape:reset()
      local out2 = m:forward(ids, {tape = out.tape, targets = targets, keep_logits = false})
      out.tape:backward(out2.total_loss)
      out.tape:reset()
    end
  end)

  it("keeps everything while gradients are retained", function()
    local x = moe.randn({3, 4}, {seed = 2})
    local tape = core.Tape():set_one_backward(true)
    tape:retain_grads(true)
    local y = tape:sum(tape:scale(x, 2))
    tape:backward(y)
    assert.is_true(bytes(tape:memory()) > 0)
    tape:backward(y)   -- a second backward is allowed: nothing was let go of
    assert.are.equal(2, tape:grad(x):get(1, 1))
  end)
end)
