-- Layers and the tape: finite-difference gradient checks of every layer (its
-- input and each of its parameters), tape functional ops, flat buffers, AdamW.
local moe = require "moelab"
local gc = require "helpers.gradcheck"

-- Checks d(sum(layer(x) .* R))/dx and /dparam for every parameter.
local function check_layer(what, layer, x, opts)
  opts = opts or {}
  local y = layer:forward(x)
  local r = gc.upstream(y, 77)
  local function loss() return gc.dot(layer:forward(x), r) end
  layer:zero_grad()
  local tape = moe.Tape()
  local yt = layer:forward(x, tape)
  assert.are.same(y:shape(), yt:shape())
  tape:backward(yt, r)
  if not opts.no_input_grad then
    local dx = tape:grad(x)
    assert.is_not_nil(dx, what .. ": no input gradient")
    gc.check(what .. " d/dx", x, dx, loss, opts)
  end
  local params = layer:parameters()
  assert.is_true(#params > 0 or opts.no_params, what .. ": has no parameters")
  for _, p in ipairs(params) do
    gc.check(what .. " d/d" .. p.name, p.value, p.grad, loss, opts)
  end
  return tape
end

-- forward_residual: y = r + layer(x), the add folded into the layer's last op.
-- Checks the values against forward + add and d/dx, d/dr, d/dparam by finite differences.
local function check_residual(what, layer, x, opts)
  local r0 = moe.randn(layer:forward(x):shape(), {seed = 91})
  local ref = layer:forward(x) + r0
  local y = layer:forward_residual(x, r0)
  assert.is_true((y - ref):abs():max():item() < 1e-5, what .. ": forward_residual differs from forward + add")
  local up = gc.upstream(y, 92)
  local function loss() return gc.dot(layer:forward_residual(x, r0), up) end
  layer:zero_grad()
  local tape = moe.Tape()
  tape:backward(layer:forward_residual(x, r0, tape), up)
  gc.check(what .. " (residual) d/dx", x, tape:grad(x), loss, opts)
  gc.check(what .. " (residual) d/dresidual", r0, tape:grad(r0), loss, opts)
  for _, p in ipairs(layer:parameters()) do
    gc.check(what .. " (residual) d/d" .. p.name, p.value, p.grad, loss, opts)
  end
end

describe("residual adds folded into a layer's last op", function()
  it("Linear, with and without bias", function()
    check_residual("Linear", moe.nn.Linear(5, 4, {seed = 81}), moe.randn({2, 3, 5}, {seed = 82}))
    check_residual("Linear(no bias)", moe.nn.Linear(5, 4, {bias = false, seed = 83}), moe.randn({3, 5}, {seed = 84}))
  end)

  it("Attention (o_proj) and FeedForward (down_proj)", function()
    check_residual("Attention", moe.nn.Attention{hidden_size = 8, num_heads = 2, qk_norm = true, seed = 85},
      moe.randn({1, 4, 8}, {seed = 86}))
    check_residual("FFN(swiglu)", moe.nn.FeedForward{hidden_size = 6, intermediate_size = 10, seed = 87},
      moe.randn({2, 3, 6}, {seed = 88}))
  end)

  it("a layer without a folded path adds separately; bad residuals are refused", function()
    check_residual("RMSNorm", moe.nn.RMSNorm(6), moe.randn({3, 6}, {seed = 89}))
    local l = moe.nn.Linear(5, 4, {seed = 81})
    assert.has_error(function() l:forward_residual(moe.randn({3, 5}), moe.randn({3, 5})) end,
      "layer:forward_residual: Linear.forward: linear: the residual is f32 [3, 5], expected f32 [3, 4] (the output's)")
    assert.has_error(function() l:forward_residual(moe.randn({3, 5})) end)
  end)
end)

describe("layer gradients (finite differences)", function()
  it("Linear with bias, 3-d input", function()
    check_layer("Linear", moe.nn.Linear(5, 4, {seed = 1}), moe.randn({2, 3, 5}, {seed = 2}))
  end)

  it("Linear without bias", function()
    local l = moe.nn.Linear(6, 3, {bias = false, seed = 3})
    assert.are.equal(1, #l:parameters())
    check_layer("Linear(nobias)", l, moe.randn({4, 6}, {seed = 4}))
  end)

  it("Embedding (weights; ids have no gradient)", function()
    local e = moe.nn.Embedding(7, 4, {seed = 5})
    local ids = moe.tensor({{1, 3, 3}, {6, 0, 1}}, {dtype = "i64"})
    check_layer("Embedding", e, ids, {no_input_grad = true})
  end)

  it("RMSNorm", function()
    local n = moe.nn.RMSNorm(6, {eps = 1e-5})
    -- non-trivial weights, so the weight gradient is not the identity case
    local w = n:param("weight")
    for i = 1, 6 do w:set_flat(i, 0.5 + 0.1 * i) end
    check_layer("RMSNorm", n, moe.randn({3, 6}, {seed = 6}))
  end)

  it("LayerNorm with bias", function()
    local n = moe.nn.LayerNorm(5)
    local w = n:param("weight")
    for i = 1, 5 do w:set_flat(i, 1 + 0.2 * i) end
    check_layer("LayerNorm", n, moe.randn({4, 5}, {seed = 7}))
  end)

  it("Attention: grouped-query, causal, rotary", function()
    local a = moe.nn.Attention{hidden_size = 8, num_heads = 4, num_kv_heads = 2, seed = 8}
    check_layer("Attention", a, moe.randn({2, 5, 8}, {seed = 9}))
  end)

  it("Attention: QK-norm, bias, not causal", function()
    local a = moe.nn.Attention{hidden_size = 8, num_heads = 2, qk_norm = true, bias = true,
                               causal = false, seed = 10}
    check_layer("Attention(qk_norm)", a, moe.randn({1, 4, 8}, {seed = 11}))
  end)

  it("FeedForward: SwiGLU and GELU", function()
    check_layer("FFN(swiglu)", moe.nn.FeedForward{hidden_size = 6, intermediate_size = 10, seed = 12},
      moe.randn({2, 3, 6}, {seed = 13}))
    check_layer("FFN(gelu)", moe.nn.FeedForward{hidden_size = 6, intermediate_size = 8,
                                                activation = "gelu", bias = true, seed = 14},
      moe.randn({5, 6}, {seed = 15}))
  end)

  it("Sequential of Linear and every activation", function()
    for _, act in ipairs{"SiLU", "GELU", "GELUTanh", "Tanh", "Sigmoid"} do
      local s = moe.nn.Sequential(moe.nn.Linear(4, 6, {seed = 16}), moe.nn[act](), moe.nn.Linear(6, 3, {seed = 17}))
      check_layer("Sequential/" .. act, s, moe.randn({3, 4}, {seed = 18}))
    end
  end)
end)

describe("tape functional ops", function()
  it("residual add with broadcasting, mul, div, view, sum", function()
    local a = moe.randn({3, 4}, {seed = 20})
    local b = moe.randn({4}, {seed = 21})
    local c = moe.rand({3, 4}, {seed = 22, low = 0.5, high = 1.5})
    local function fwd(tape)
      local t = tape or moe.Tape()
      local s = t:add(a, b)
      local m = t:mul(s, c)
      local d = t:div(m, t:add(c, moe.ones({1})))   -- c reaches the loss along two taped paths
      local v = t:view(d, {12})
      return t:sum(t:silu(v)), t
    end
    local loss, tape = fwd()
    tape:backward(loss)
    local function lossf() return fwd():item() end
    gc.check("add/mul/div a", a, tape:grad(a), lossf)
    gc.check("add broadcast b", b, tape:grad(b), lossf)
    gc.check("mul/div c", c, tape:grad(c), lossf)
  end)

  it("tape:memory counts each storage once, for the first entry holding it", function()
    local x = moe.randn({64, 32}, {seed = 30})
    local w = moe.nn.Linear(32, 16, {seed = 31})
    local tape = moe.Tape()
    local y = w:forward(x, tape)
    local v = tape:view(y, {64 * 16})        -- a view: the same storage as y
    local s = tape:sum(tape:silu(v))
    local params = {w:flat_parameters()}   -- values and gradients: they live anyway
    local rows = tape:memory(params)
    local by = {}
    for _, r in ipairs(rows) do by[r.name] = r end
    -- linear holds x and y; the view's input and output are y's storage, already counted
    assert.are.equal((64 * 32 + 64 * 16) * 4, by.linear.bytes)
    assert.are.equal(2, by.linear.tensors)
    assert.is_nil(by.view)
    assert.are.equal(64 * 16 * 4, by.unary.bytes)   -- silu's output
    assert.are.equal(4, by.sum.bytes)
    for i = 2, #rows do assert.is_true(rows[i - 1].bytes >= rows[i].bytes) end
    -- leaving x out
    local by2 = {}
    params[#params + 1] = x
    for _, r in ipairs(tape:memory(params)) do by2[r.name] = r end
    assert.are.equal(64 * 16 * 4, by2.linear.bytes)
    -- without a list, the parameters' buffers count too (the linear entry holds them)
    local by3 = {}
    for _, r in ipairs(tape:memory()) do by3[r.name] = r end
    assert.is_true(by3.linear.bytes > by.linear.bytes)
    assert.are.same({}, moe.Tape():memory())
    assert.has_error(function() tape:memory({1}) end, "tape:memory: tensors[i] must be a tensor, got number")
    assert.has_error(function() tape:memory(5) end)
    assert.is_not_nil(s)
  end)

  it("cross-entropy's overwrite_logits needs grad_in_forward; on a CPU it changes nothing", function()
    local logits = moe.randn({4, 7}, {seed = 24})
    local before = logits:clone()
    local targets = moe.tensor({1, 0, 6, 3}, {dtype = "i64"})
    assert.has_error(function()
      moe.Tape():cross_entropy(logits, targets, {grad_in_forward = false, overwrite_logits = true})
    end, "tape:cross_entropy: overwrite_logits needs grad_in_forward")
    local t1, t2 = moe.Tape(), moe.Tape()
    local l1 = t1:cross_entropy(logits, targets, {overwrite_logits = true})
    t1:backward(l1)
    local l2 = t2:cross_entropy(before, targets)
    t2:backward(l2)
    assert.are.equal(l2:item(), l1:item())
    assert.are.equal(0, (t1:grad(logits) - t2:grad(before)):abs():max():item())
    -- the CPU does not fuse the loss: the logits stay as they were
    assert.are.equal(0, (logits - before):abs():max():item())
  end)

  it("cross-entropy mean over counted rows, with an ignored row", function()
    local logits = moe.randn({2, 3, 5}, {seed = 23})
    local targets = moe.tensor({{1, 4, -100}, {0, 2, 3}}, {dtype = "i64"})
    local tape = moe.Tape()
    local loss = tape:cross_entropy(logits, targets)
    assert.are.same({}, loss:shape())
    -- the mean over the 5 counted rows, by hand
    local total = 0
    for b = 1, 2 do for t = 1, 3 do
      local tgt = targets:get(b, t)
      if tgt ~= -100 then
        local mx, se = -math.huge, 0
        for v = 1, 5 do mx = math.max(mx, logits:get(b, t, v)) end
        for v = 1, 5 do se = se + math.exp(logits:get(b, t, v) - mx) end
        total = total + (math.log(se) + mx - logits:get(b, t, tgt + 1))
      end
    end end
    assert.is_true(math.abs(loss:item() - total / 5) < 1e-5)
    tape:backward(loss)
    gc.check("cross_entropy", logits, tape:grad(logits),
      function() return moe.Tape():cross_entropy(logits, targets):item() end)
  end)

  -- The second and third linears on one input add their input gradient into
  -- the first's in their GEMM (beta 1) instead of a new tensor and a sum.
  it("linears sharing an input: the input gradient sums all three", function()
    local x = moe.randn({2, 3, 4}, {seed = 25})
    local l1, l2, l3 = moe.nn.Linear(4, 5, {seed = 26}), moe.nn.Linear(4, 2, {seed = 27}), moe.nn.Linear(4, 5, {seed = 28})
    local function lossf(tape)
      local a, b, c = l1:forward(x, tape), l2:forward(x, tape), l3:forward(x, tape)
      return tape:add(tape:add(tape:sum(tape:mul(a, c)), tape:sum(tape:square(b))), tape:sum(a))
    end
    local tape = moe.Tape()
    tape:backward(lossf(tape))
    gc.check("x through three linears", x, tape:grad(x), function() return lossf(moe.Tape()):item() end)
  end)

  -- An add hands its output gradient to both inputs without a copy, a view its
  -- output gradient's memory: whatever then sums into one of those shared
  -- gradients (a second use of the input, a linear adding with beta 1) must not
  -- change the other's.
  it("shared gradients of adds and views: sums into one leave the other intact", function()
    local a = moe.randn({3, 4}, {seed = 40})
    local b = moe.randn({3, 4}, {seed = 41})
    local l = moe.nn.Linear(4, 4, {seed = 42})
    local function lossf(tape)
      local y = tape:add(a, b)                    -- a and b get y's gradient itself
      local z = tape:add(y, a)                    -- a again: summed into its shared gradient
      local v = tape:view(tape:add(z, z), {12})   -- z twice; the view's gradient is its output's memory
      local w = tape:view(v, {3, 4})
      local lin = l:forward(tape:add(w, b), tape) -- the linear adds its input gradient with beta 1
      return tape:add(tape:sum(tape:mul(lin, w)), tape:sum(tape:mul(b, b)))
    end
    local tape = moe.Tape()
    tape:backward(lossf(tape))
    local function lf() return lossf(moe.Tape()):item() end
    gc.check("a (shared with b, then summed into)", a, tape:grad(a), lf)
    gc.check("b (shared with a)", b, tape:grad(b), lf)
    -- x + x: both gradients land on one tensor
    local x = moe.randn({5}, {seed = 43})
    local t2 = moe.Tape()
    t2:backward(t2:sum(t2:mul(t2:add(x, x), x)))
    gc.check("x + x", x, t2:grad(x), function() local t = moe.Tape(); return t:sum(t:mul(t:add(x, x), x)):item() end)
  end)

  -- A linear adds its input gradient into the one already there (beta 1) only
  -- when nothing else holds it: here w's gradient, or w's view's memory, is x's
  -- gradient itself when x's linear runs its backward.
  it("a linear adding into an input gradient shared with another tensor leaves that one intact", function()
    local x = moe.randn({3, 4}, {seed = 60})
    local w = moe.randn({3, 4}, {seed = 61})
    local l = moe.nn.Linear(4, 4, {seed = 62})
    local r, r12 = moe.randn({3, 4}, {seed = 63}), moe.randn({12}, {seed = 64})
    local function plain(tape)
      local y = l:forward(x, tape)
      return tape:sum(tape:mul(tape:add(tape:add(x, w), y), r))
    end
    local function viewed(tape)
      local y = l:forward(x, tape)
      local u = tape:add(tape:view(x, {12}), tape:view(w, {12}))
      return tape:sum(tape:mul(tape:add(u, tape:view(y, {12})), r12))
    end
    local function residual(tape) return tape:sum(tape:mul(tape:add(x, l:forward(x, tape)), r)) end
    for name, f in pairs{plain = plain, viewed = viewed, residual = residual} do
      local tape = moe.Tape()
      tape:backward(f(tape))
      local function lf() return f(moe.Tape()):item() end
      gc.check(name .. ": x", x, tape:grad(x), lf)
      if name ~= "residual" then gc.check(name .. ": w", w, tape:grad(w), lf) end
    end
  end)

  -- Under a tape, where the backend fuses the pass (CUDA), the forward also
  -- computes the gradient for an upstream 1; it is handed over once (scaled for
  -- another upstream gradient). Whatever the path, another upstream gradient, a
  -- second backward or a second gradient into the logits must give the plain
  -- backward's values.
  it("cross-entropy gradient: precomputed for the training loss, recomputed otherwise", function()
    local logits = moe.randn({4, 7}, {seed = 24})
    local targets = moe.tensor({1, 6, -100, 0}, {dtype = "i64"})
    local function max_diff(a, b, scale)
      local m = 0
      for i = 1, 4 do for j = 1, 7 do m = math.max(m, math.abs(a:get(i, j) - scale * b:get(i, j))) end end
      return m
    end
    -- the reference: the plain backward (the tape's loss scaled by 1 through the recompute path)
    local tape = moe.Tape()
    local loss = tape:cross_entropy(logits, targets)
    tape:backward(loss)
    local g1 = tape:grad(logits):clone()
    gc.check("cross_entropy (handed over)", logits, g1,
      function() return moe.Tape():cross_entropy(logits, targets):item() end)
    tape:backward(loss)   -- the precomputed gradient is gone: recomputed from the logits
    assert.is_true(max_diff(tape:grad(logits), g1, 1) == 0)
    -- another upstream gradient
    local t2 = moe.Tape()
    t2:backward(t2:scale(t2:cross_entropy(logits, targets), 3))
    assert.is_true(max_diff(t2:grad(logits), g1, 3) < 1e-6)
    -- a second gradient into the logits adds to the handed-over one; a second backward agrees
    local t3 = moe.Tape()
    local both = t3:add(t3:cross_entropy(logits, targets), t3:scale(t3:sum(logits), 0.1))
    t3:backward(both)
    local g3 = t3:grad(logits):clone()
    for i = 1, 4 do for j = 1, 7 do assert.is_true(math.abs(g3:get(i, j) - g1:get(i, j) - 0.1) < 1e-6) end end
    t3:backward(both)
    assert.is_true(max_diff(t3:grad(logits), g3, 1) < 1e-7)
    -- grad_in_forward = false (a taped evaluation): same loss, and a backward still recomputes the same gradient
    local t4 = moe.Tape()
    local l4 = t4:cross_entropy(logits, targets, {grad_in_forward = false})
    assert.are.equal(loss:item(), l4:item())
    t4:backward(l4)
    assert.is_true(max_diff(t4:grad(logits), g1, 1) == 0)
    assert.has_error(function() moe.Tape():cross_entropy(logits, targets, {grad_in_forward = "no"}) end)
  end)

  it("a tiny transformer block trains: loss goes down with AdamW", function()
    local emb = moe.nn.Embedding(16, 8, {seed = 30})
    local block = moe.nn.Sequential(moe.nn.RMSNorm(8), moe.nn.FeedForward{hidden_size = 8, intermediate_size = 16, seed = 31})
    local head = moe.nn.Linear(8, 16, {seed = 32})
    local model = moe.nn.Sequential(emb, block, head)
    local opt = moe.optim.AdamW{params = model, lr = 1e-2, weight_decay = 0}
    local ids = moe.tensor({{1, 2, 3, 4, 5, 6}}, {dtype = "i64"})
    local targets = moe.tensor({{2, 3, 4, 5, 6, 7}}, {dtype = "i64"})
    local first, last
    for step = 1, 30 do
      local tape = moe.Tape()
      local loss = tape:cross_entropy(model:forward(ids, tape), targets)
      opt:zero_grad()
      tape:backward(loss)
      opt:step()
      if step == 1 then first = loss:item() end
      last = loss:item()
    end
    assert.is_true(last < first * 0.5, string.format("loss %g -> %g", first, last))
  end)
end)

describe("parameters in flat buffers", function()
  it("a Sequential puts every parameter in one buffer and views stay live", function()
    local l1, l2 = moe.nn.Linear(3, 4, {seed = 40}), moe.nn.Linear(4, 2, {seed = 41})
    local w_before = l1:param("weight"):clone()
    local s = moe.nn.Sequential(l1, l2)
    local values, grads = s:flat_parameters()
    assert.is_true(values:numel() >= s:num_params())
    assert.are.equal(3 * 4 + 4 + 4 * 2 + 2, s:num_params())
    assert.is_true(l1:param("weight"):allclose(w_before, 0, 0))
    -- writing through the flat buffer is visible through the parameter view
    values:fill(0.25)
    assert.are.equal(0.25, s:param("1.bias"):get(2))
    assert.are.equal(0.25, l2:param("bias"):get(2))
    assert.are.equal(grads:numel(), values:numel())
    local names = {}
    for _, p in ipairs(s:parameters()) do names[#names + 1] = p.name end
    assert.are.same({"0.weight", "0.bias", "1.weight", "1.bias"}, names)
  end)

  it("zero_grad clears accumulated gradients; gradients accumulate across backwards", function()
    local l = moe.nn.Linear(3, 2, {seed = 42})
    local x = moe.randn({4, 3}, {seed = 43})
    local function run()
      local t = moe.Tape()
      t:backward(t:sum(l:forward(x, t)))
    end
    run()
    local g1 = l:grad("weight"):clone()
    run()
    assert.is_true(l:grad("weight"):allclose(g1 * 2, 1e-6, 1e-6))
    l:zero_grad()
    assert.are.equal(0, l:grad("weight"):abs():sum():item())
  end)

  it("AdamW matches the update written out by hand", function()
    local l = moe.nn.Linear(2, 1, {bias = false, seed = 44})
    local w0 = l:param("weight"):clone()
    local opt = moe.optim.AdamW{params = l, lr = 0.1, betas = {0.9, 0.99}, eps = 1e-8, weight_decay = 0.1}
    local g = l:grad("weight")
    g:set(1, 1, 0.5); g:set(1, 2, -2.0)
    opt:step()
    for j, gj in ipairs{0.5, -2.0} do
      local m = 0.1 * gj
      local v = 0.01 * gj * gj
      local mhat, vhat = m / (1 - 0.9), v / (1 - 0.99)
      local p = w0:get(1, j)
      local expect = p - 0.1 * (mhat / (math.sqrt(vhat) + 1e-8) + 0.1 * p)
      assert.is_true(math.abs(l:param("weight"):get(1, j) - expect) < 1e-6)
    end
  end)
end)

describe("layer errors", function()
  it("rejects bad configurations and inputs with messages naming the problem", function()
    local function err(f, pat)
      local ok, msg = pcall(f)
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find(pat, 1, true), "message was: " .. tostring(msg))
    end
    err(function() moe.nn.Linear(0, 3) end, "in_features")
    err(function() moe.nn.Linear("a", 3) end, "in_features must be an integer")
    err(function() moe.nn.Linear(3, 4):forward(moe.randn({2, 5})) end, "expected last dim 3")
    err(function() moe.nn.Linear(3, 4):forward(nil) end, "input")
    err(function() moe.nn.Attention{hidden_size = 8, num_heads = 3, num_kv_heads = 2} end, "multiple of num_kv_heads")
    err(function() moe.nn.Attention{num_heads = 2} end, "hidden_size")
    err(function() moe.nn.Attention{hidden_size = 8, num_heads = 2}:forward(moe.randn({2, 8})) end, "[batch, seq, 8]")
    err(function() moe.nn.FeedForward{hidden_size = 4, activation = "tanh"} end, "activation")
    err(function() moe.nn.Embedding(5, 2):forward(moe.tensor({1, 7}, {dtype = "i64"})) end, "7")
    err(function() moe.nn.Embedding(5, 2):forward(moe.randn({3})) end, "i64")
    err(function() moe.nn.Sequential(moe.nn.Linear(2, 2), 5) end, "child 2 must be a layer")
    err(function() moe.nn.RMSNorm(4):param("nope") end, "no parameter named 'nope'")
    err(function() moe.Tape():backward(moe.randn({2})) end, "not produced")
    err(function() local t = moe.Tape(); t:backward(t:add(moe.randn({2}), moe.randn({2}))) end, "non-scalar")
    err(function() moe.optim.AdamW{params = 3} end, "params must be a layer")
    err(function() moe.nn.Linear(2, 2):to("tpu") end, "unknown device")
  end)
end)
