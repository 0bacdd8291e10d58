-- model:forward_loss / MoEModel:forward{keep_logits = false}: the head and the
-- cross-entropy in chunks of rows, each chunk's gradient taken in the forward
-- (src/nn/head_loss.c). Against the plain head + loss: the same loss and
-- gradients whatever the chunks, ignored rows, tied embeddings, a frozen head,
-- an upstream gradient other than 1, a head with adapters; finite differences;
-- one backward only; bad arguments. With loss_grad (the trainer's promise of
-- the upstream gradient) the head's weight gradient is written in the forward,
-- over a lazily zeroed (pending) gradient buffer whose memory holds garbage.
local moe = require "moelab"
local core = require "moelab.core"
local gc = require "helpers.gradcheck"

local model = require("helpers.models").tiny_olmoe

local ids = moe.tensor({{1, 2, 3, 4, 5, 6, 7}, {8, 9, 10, 11, 12, 13, 14}}, {dtype = "i64"})
local targets = moe.tensor({{2, 3, 4, 5, 6, -100, 8}, {9, 10, 11, -100, 13, 14, 300}}, {dtype = "i64"})

-- the loss (from loss_fn(tape)) and a copy of the flat gradients after one
-- backward of scale * loss + 0.01 * aux. poisoned: the gradients are first
-- filled with NaN and zeroed with zero_grad{lazy = true}, which only marks the
-- head's weight gradient pending: its memory keeps the NaNs
local function run(m, scale, loss_fn, poisoned)
  if poisoned then
    local _, g = m.net:flat_parameters()
    g:fill(0 / 0)
    m.net:zero_grad{lazy = true}
  else
    m.net:zero_grad()
  end
  local tape = core.Tape()
  local loss = loss_fn(tape)
  local aux = m.net:balance_losses(tape)
  tape:backward(tape:add(tape:scale(loss, scale or 1), tape:scale(aux, 0.01)))
  local _, g = m.net:flat_parameters()
  return loss:item(), g:clone()
end

local function plain(m, scale)
  return run(m, scale, function(tape)
    return tape:cross_entropy(m.net:forward(ids, tape), targets, {ignore_index = -100})
  end)
end

local function chunked(m, chunk, scale)
  return run(m, scale, function(tape) return m.net:forward_loss(ids, targets, tape, {chunk_rows = chunk}) end)
end

local function run_poisoned(m, scale, loss_fn) return run(m, scale, loss_fn, true) end

local function close(a, b, what)
  local d, s = (a - b):abs():max():item(), b:abs():max():item()
  assert.is_true(d <= 1e-5 * math.max(s, 1), ("%s: gradients differ by %g (max %g)"):format(what, d, s))
end

describe("model:forward_loss (the head and the loss in chunks)", function()
  it("gives the plain path's loss and gradients whatever the chunks, with ignored rows", function()
    local m = model()
    local l0, g0 = plain(m)
    for _, chunk in ipairs{0, 1, 3, 5, 13, 14, 100} do
      local l1, g1 = chunked(m, chunk)
      assert.is_true(math.abs(l1 - l0) <= 1e-6 * l0, ("chunk %d: loss %.9g vs %.9g"):format(chunk, l1, l0))
      close(g1, g0, "chunk " .. chunk)
    end
  end)

  it("scales by the upstream gradient, ties the head to the embedding, and leaves a frozen head alone", function()
    local m = model()
    local _, g0 = plain(m, 0.25)
    local _, g1 = chunked(m, 4, 0.25)
    close(g1, g0, "upstream 0.25")
    local t = model({tie_word_embeddings = true})
    local _, t0 = plain(t)
    local _, t1 = chunked(t, 6)
    close(t1, t0, "tied embeddings")
    assert.is_true(t1:abs():max():item() > 0)
  end)

  it("matches finite differences of the loss in the head and the embedding", function()
    local m = model({num_layers = 1})
    local tape = core.Tape()
    m.net:zero_grad()
    tape:backward(m.net:forward_loss(ids, targets, tape, {chunk_rows = 4}))
    local function loss() return m.net:forward_loss(ids, targets, nil, {chunk_rows = 4}):item() end
    for _, name in ipairs{"lm_head.weight", "embed_tokens.weight", "norm.weight"} do
      local p = m.net:param(name)
      gc.check("forward_loss d/d" .. name, p, m.net:grad(name), loss, {eps = 1e-2, max_checks = 24})
    end
  end)

  it("goes through a head with adapters as logits and the fused loss, still right", function()
    local m = model()
    core.lora_attach(m.net, "lm_head", {r = 2, alpha = 4, targets = {}})
    m.net:to(m.net:device())   -- the adapters join the flat buffers (as moe.peft does)
    local l0, g0 = plain(m)
    local l1, g1 = chunked(m, 5)
    assert.is_true(math.abs(l1 - l0) <= 1e-6 * l0)
    close(g1, g0, "LoRA head")
  end)

  it("without a tape gives the loss only; one backward only; MoEModel:forward{keep_logits = false} uses it", function()
    local m = model()
    local l0 = plain(m)
    assert.is_true(math.abs(m.net:forward_loss(ids, targets):item() - l0) <= 1e-6 * l0)
    local tape = core.Tape()
    local loss = m.net:forward_loss(ids, targets, tape)
    tape:backward(loss)
    local ok, e = pcall(tape.backward, tape, loss)
    assert.is_false(ok)
    assert.truthy(tostring(e):find("one backward only", 1, true), tostring(e))
    m:train(true)
    local out = m:forward(ids, {targets = targets, keep_logits = false})
    assert.is_nil(out.logits)
    assert.is_true(math.abs(out.loss:item() - l0) <= 1e-6 * l0)
    local names = {}
    for _, r in ipairs(out.tape:memory()) do names[r.name] = true end
    assert.is_true(names.linear_cross_entropy ~= nil, "the tape holds the chunked head's entry")
    assert.is_nil(names.cross_entropy)
  end)

  it("with loss_grad writes the head's gradient in the forward, over a pending one, and gives the same gradients",
     function()
    local m = model()
    for _, sc in ipairs{1, 0.25} do
      local l0, g0 = chunked(m, 5, sc)
      local l1, g1 = run_poisoned(m, sc, function(tape)
        return m.net:forward_loss(ids, targets, tape, {chunk_rows = 5, loss_grad = sc})
      end)
      assert.is_true(math.abs(l1 - l0) <= 1e-6 * l0, ("loss %.9g vs %.9g"):format(l1, l0))
      close(g1, g0, "loss_grad " .. sc)
      -- the head's gradient is there before the backward: written by the forward
      m.net:zero_grad()
      local tape = core.Tape()
      m.net:forward_loss(ids, targets, tape, {chunk_rows = 5, loss_grad = sc})
      assert.is_true(m.net:grad("lm_head.weight"):abs():max():item() > 0)
    end
    -- without loss_grad a pending head gradient is cleared before it is added to,
    -- through the chunked loss and through the plain head alike
    local _, g2 = run_poisoned(m, 0.25, function(tape) return m.net:forward_loss(ids, targets, tape, {chunk_rows = 3}) end)
    close(g2, select(2, chunked(m, 3, 0.25)), "pending head, no loss_grad")
    local _, g3 = run_poisoned(m, 1, function(tape)
      return tape:cross_entropy(m.net:forward(ids, tape), targets, {ignore_index = -100})
    end)
    close(g3, select(2, plain(m)), "pending head, plain path")
    -- tied embeddings (not lazily zeroed) take their dW in the forward as well
    local t = model({tie_word_embeddings = true})
    local _, t0 = plain(t, 0.5)
    local _, t1 = run(t, 0.5, function(tape) return t.net:forward_loss(ids, targets, tape, {loss_grad = 0.5}) end)
    close(t1, t0, "tied embeddings, loss_grad")
  end)

  it("refuses a backward with another upstream gradient than loss_grad promised, and bad loss_grad values", function()
    local m = model()
    m.net:zero_grad()
    local tape = core.Tape()
    local loss = m.net:forward_loss(ids, targets, tape, {loss_grad = 0.5})
    local ok, e = pcall(tape.backward, tape, tape:scale(loss, 0.25))
    assert.is_false(ok)
    assert.truthy(tostring(e):find("upstream gradient of 0.5", 1, true), tostring(e))
    assert.truthy(tostring(e):find("brings 0.25", 1, true), tostring(e))
    for _, v in ipairs{-1, 0 / 0, 1 / 0, 1e-300, "x"} do
      local ok2, e2 = pcall(m.net.forward_loss, m.net, ids, targets, core.Tape(), {loss_grad = v})
      assert.is_false(ok2, tostring(v))
      assert.truthy(tostring(e2):find("loss_grad", 1, true), tostring(e2))
    end
  end)

  it("refuses mismatched targets, other dtypes and negative chunks", function()
    local m = model()
    local cases = {
      {moe.tensor({{1, 2}}, {dtype = "i64"}), nil, "must match ids"},
      {moe.tensor({1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14}, {dtype = "i64"}), nil, "must match ids"},
      {moe.zeros({2, 7}), nil, "i64"},
      {targets, {chunk_rows = -1}, "chunk_rows"},
    }
    for _, c in ipairs(cases) do
      local ok, e = pcall(m.net.forward_loss, m.net, ids, c[1], nil, c[2])
      assert.is_false(ok)
      assert.truthy(tostring(e):find(c[3], 1, true), tostring(e))
    end
  end)
end)
