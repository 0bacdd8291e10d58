-- Finite-difference gradient checks of every op in src/ops/ops.h that has a
-- backward, through the functional moe.ops bindings. Each check uses the loss
-- L = sum(y .* R) for a fixed random R (tests/helpers/gradcheck.lua), so the
-- analytic gradient is the backward op applied to R. Shapes are small so the
-- suite stays fast; inputs stay away from kinks and domain edges.
local moe = require "moelab"
local G = require "helpers.gradcheck"
local ops = moe.ops

local seed = 100
local function randn(shape, opts)
  seed = seed + 1
  opts = opts or {}
  opts.seed = seed
  return moe.randn(shape, opts)
end
local function rand(shape, low, high)
  seed = seed + 1
  return moe.rand(shape, {seed = seed, low = low, high = high})
end

-- values with |v| in [lo, hi] and random signs (away from 0)
local function away_from_zero(shape, lo, hi)
  local x = rand(shape, lo, hi)
  local s = randn(shape)
  for i = 1, x:numel() do
    if s:get_flat(i) < 0 then x:set_flat(i, -x:get_flat(i)) end
  end
  return x
end

local function ids(values, shape)
  local t = moe.tensor(values, {dtype = "i64"})
  if shape then t = t:view(shape) end
  return t
end

-- check d(sum(f() .* R))/dx == analytic for each (name, x, analytic) triple
local function check_all(what, f, R, pairs_, opts)
  for _, p in ipairs(pairs_) do
    G.check(what .. " d" .. p[1], p[2], p[3], function() return G.dot(f(), R) end, opts)
  end
end

describe("unary ops", function()
  local cases = {
    {"neg"}, {"exp"}, {"tanh"}, {"sigmoid"}, {"silu"}, {"gelu"}, {"gelu_erf"}, {"square"},
    {"log", "pos"}, {"sqrt", "pos"}, {"rsqrt", "pos"},
    {"abs", "nz"}, {"relu", "nz"},
    {"scale", nil, 1.7}, {"add_scalar", nil, 0.3}, {"pow", "pos", 2.5}, {"pow", "pos", 3},
  }
  for _, c in ipairs(cases) do
    local name, domain, alpha = c[1], c[2], c[3]
    it(name .. (alpha and ("(" .. alpha .. ")") or ""), function()
      local x
      if domain == "pos" then x = rand({3, 4}, 0.5, 2)
      elseif domain == "nz" then x = away_from_zero({3, 4}, 0.2, 1.5)
      else x = randn({3, 4}) end
      local y = ops.unary(name, x, alpha)
      local R = G.upstream(y)
      local dx = ops.unary_backward(name, R, x, alpha)
      G.check(name, x, dx, function() return G.dot(ops.unary(name, x, alpha), R) end)
    end)
  end
end)

describe("binary ops with broadcasting (backward through sum_to)", function()
  local shapes = {
    {{3, 4}, {3, 4}},
    {{3, 4}, {4}},
    {{3, 1}, {1, 4}},
    {{2, 3, 4}, {3, 1}},
  }
  for _, sh in ipairs(shapes) do
    local tag = "[" .. table.concat(sh[1], ",") .. "] op [" .. table.concat(sh[2], ",") .. "]"
    it("add, sub, mul, div " .. tag, function()
      local a = randn(sh[1])
      local b = away_from_zero(sh[2], 0.5, 1.5)
      for _, name in ipairs{"add", "sub", "mul", "div"} do
        local y = ops.binary(name, a, b)
        local R = G.upstream(y)
        local ga, gb
        if name == "add" then
          ga, gb = R, R
        elseif name == "sub" then
          ga, gb = R, -R
        elseif name == "mul" then
          ga, gb = ops.binary("mul", R, b), ops.binary("mul", R, a)
        else
          ga = ops.binary("div", R, b)
          gb = -ops.binary("div", ops.binary("mul", R, a), ops.binary("mul", b, b))
        end
        local da, db = ops.sum_to(ga, a:shape()), ops.sum_to(gb, b)
        assert.same(a:shape(), da:shape())
        assert.same(b:shape(), db:shape())
        local f = function() return ops.binary(name, a, b) end
        check_all(name .. " " .. tag, f, R, {{"a", a, da}, {"b", b, db}})
      end
    end)
  end
end)

describe("gemm", function()
  for _, tr in ipairs{{false, false}, {true, false}, {false, true}, {true, true}} do
    local ta, tb = tr[1], tr[2]
    it(string.format("transa=%s transb=%s", tostring(ta), tostring(tb)), function()
      local M, K, N = 3, 4, 5
      local a = randn(ta and {K, M} or {M, K})
      local b = randn(tb and {N, K} or {K, N})
      local opts = {transa = ta, transb = tb, alpha = 0.7}
      local c = ops.gemm(a, b, opts)
      assert.same({M, N}, c:shape())
      local R = G.upstream(c)
      local da, db
      -- c = alpha op(a) op(b): d op(a) = alpha R op(b)^T, d op(b) = alpha op(a)^T R
      if not ta then da = ops.gemm(R, b, {transb = not tb, alpha = 0.7})
      else da = ops.gemm(b, R, {transa = tb, transb = true, alpha = 0.7}) end
      if not tb then db = ops.gemm(a, R, {transa = not ta, alpha = 0.7})
      else db = ops.gemm(R, a, {transa = true, transb = ta, alpha = 0.7}) end
      check_all("gemm", function() return ops.gemm(a, b, opts) end, R, {{"a", a, da}, {"b", b, db}})
    end)
  end

  it("batched, with a shared 2-D operand", function()
    local a, b = randn({2, 3, 4}), randn({4, 5})
    local c = ops.gemm(a, b)
    assert.same({2, 3, 5}, c:shape())
    local R = G.upstream(c)
    local da = ops.gemm(R, b, {transb = true})
    local db = ops.gemm(a, R, {transa = true}):sum(1)
    check_all("batched gemm", function() return ops.gemm(a, b) end, R, {{"a", a, da}, {"b", b, db}})
  end)
end)

describe("grouped gemm and its weight gradient", function()
  local offsets = {0, 2, 2, 6}   -- three experts, the middle one empty
  for _, tb in ipairs{false, true} do
    it("transb=" .. tostring(tb), function()
      local M, K, N = 6, 3, 4
      local a = randn({M, K})
      local b = randn(tb and {3, N, K} or {3, K, N})
      local c = ops.gemm_grouped(a, b, offsets, {transb = tb})
      assert.same({M, N}, c:shape())
      local R = G.upstream(c)
      local da = ops.gemm_grouped(R, b, offsets, {transb = not tb})
      local db = tb and ops.gemm_grouped_wgrad(R, a, offsets, 3) or ops.gemm_grouped_wgrad(a, R, offsets, 3)
      assert.same(b:shape(), db:shape())
      -- the offsets as an i64 tensor (moe_op_gemm_grouped_dev): the same results
      local ot = moe.tensor(offsets, {dtype = "i64"})
      assert.is_true(ops.gemm_grouped(a, b, ot, {transb = tb}):equal(c))
      assert.is_true((tb and ops.gemm_grouped_wgrad(R, a, ot) or ops.gemm_grouped_wgrad(a, R, ot)):equal(db))
      -- the defaults: no options, groups taken from the offsets
      if not tb then
        assert.is_true(ops.gemm_grouped(a, b, offsets):equal(c))
        assert.is_true(ops.gemm_grouped_wgrad(a, R, offsets):equal(db))
      end
      local dbo = moe.full(db:shape(), 7)
      assert.equal(dbo, tb and ops.gemm_grouped_wgrad(R, a, offsets, 3, {out = dbo}) or
                        ops.gemm_grouped_wgrad(a, R, offsets, 3, {out = dbo}))
      assert.is_true(dbo:equal(db))
      -- out: written in place over whatever it held, and returned
      local out = moe.full({M, N}, 7)
      assert.equal(out, ops.gemm_grouped(a, b, offsets, {transb = tb, out = out}))
      assert.is_true(out:equal(c))
      assert.has_error(function() ops.gemm_grouped(a, b, offsets, {transb = tb, out = moe.zeros({M, N + 1})}) end)
      -- an out that is an input would be read as it is written
      local sq = randn({M, M})
      assert.has_error(function() ops.gemm_grouped(sq, randn({3, M, M}), offsets, {out = sq}) end,
        "ops.gemm_grouped: out shares storage with an input (the GEMM would read what it writes)")
      -- gate, up and the activation in one call: the two GEMMs and swiglu
      if tb then
        local bu = randn({3, N, K})
        local g, u, h = ops.gemm_grouped_swiglu(a, b, bu, offsets)
        assert.is_true(g:equal(c))
        assert.is_true(u:equal(ops.gemm_grouped(a, bu, offsets, {transb = true})))
        assert.is_true(h:equal(ops.swiglu(g, u)))
      end
      -- the empty expert gets no gradient
      for i = 1, db:select(1, 2):numel() do assert.equal(0, db:select(1, 2):get_flat(i)) end
      check_all("gemm_grouped", function() return ops.gemm_grouped(a, b, offsets, {transb = tb}) end, R,
        {{"a", a, da}, {"b", b, db}})
    end)
  end
end)

describe("softmax family", function()
  it("softmax", function()
    local x = randn({3, 5})
    local y = ops.softmax(x)
    local R = G.upstream(y)
    local dx = ops.softmax_backward(R, y)
    G.check("softmax", x, dx, function() return G.dot(ops.softmax(x), R) end)
  end)

  it("log_softmax", function()
    local x = randn({3, 5})
    local y = ops.log_softmax(x)
    local R = G.upstream(y)
    local dx = ops.log_softmax_backward(R, y)
    G.check("log_softmax", x, dx, function() return G.dot(ops.log_softmax(x), R) end)
  end)
end)

describe("indexing", function()
  it("gather / scatter_add", function()
    local x = randn({3, 5})
    local index = ids({{0, 4}, {2, 2}, {1, 3}})
    local y = ops.gather(x, index)
    assert.same({3, 2}, y:shape())
    assert.equal(x:get(2, 3), y:get(2, 1))
    local R = G.upstream(y)
    local dx = ops.scatter_add({3, 5}, index, R)
    G.check("gather", x, dx, function() return G.dot(ops.gather(x, index), R) end)
  end)

  it("index_select / index_add", function()
    local x = randn({5, 3})
    local index = ids({0, 3, 3, 1})
    local y = ops.index_select(x, index)
    assert.same({4, 3}, y:shape())
    local R = G.upstream(y)
    local dx = ops.index_add({5, 3}, index, R)
    G.check("index_select", x, dx, function() return G.dot(ops.index_select(x, index), R) end)
    -- a tensor destination is the starting value and is not modified
    local base = moe.ones(5, 3)
    local acc = ops.index_add(base, index, R)
    assert.is_true(acc:allclose(dx + 1, 1e-6, 1e-6))
    assert.equal(1, base:get(1, 1))
  end)

  it("embedding", function()
    local table_ = randn({6, 4})
    local tok = ids({{1, 5, 1}, {0, 2, 5}})
    local y = ops.embedding(table_, tok)
    assert.same({2, 3, 4}, y:shape())
    local R = G.upstream(y)
    local dt = ops.embedding_backward(R, tok, 6)
    assert.same({6, 4}, dt:shape())
    G.check("embedding", table_, dt, function() return G.dot(ops.embedding(table_, tok), R) end)
  end)
end)

describe("normalisation", function()
  it("rmsnorm", function()
    local x, w = randn({3, 6}), rand({6}, 0.5, 1.5)
    local y, rstd = ops.rmsnorm(x, w, 1e-5)
    assert.same({3}, rstd:shape())
    local R = G.upstream(y)
    local dx, dw = ops.rmsnorm_backward(R, x, w, rstd)
    check_all("rmsnorm", function() return (ops.rmsnorm(x, w, 1e-5)) end, R, {{"x", x, dx}, {"w", w, dw}})
  end)

  it("layernorm", function()
    local x, w, b = randn({3, 6}), rand({6}, 0.5, 1.5), randn({6})
    local y, mean, rstd = ops.layernorm(x, w, b, 1e-5)
    local R = G.upstream(y)
    local dx, dw, db = ops.layernorm_backward(R, x, w, mean, rstd)
    check_all("layernorm", function() return (ops.layernorm(x, w, b, 1e-5)) end, R,
      {{"x", x, dx}, {"w", w, dw}, {"b", b, db}})
  end)
end)

describe("rope", function()
  it("backward is the inverse rotation", function()
    local x = randn({2, 3, 2, 4})   -- [B, T, H, D]
    local opts = {pos_offset = 2, theta = 100}
    local y = ops.rope(x, opts)
    local R = G.upstream(y)
    local dx = ops.rope(R, {pos_offset = 2, theta = 100, inverse = true})
    G.check("rope", x, dx, function() return G.dot(ops.rope(x, opts), R) end)
    -- and inverse undoes forward
    assert.is_true(ops.rope(y, {pos_offset = 2, theta = 100, inverse = true}):allclose(x, 1e-5, 1e-5))
  end)
end)

describe("attention (grouped-query, Hq=4, Hkv=2)", function()
  for _, c in ipairs{{causal = true, T = 3, S = 3}, {causal = false, T = 3, S = 5}, {causal = true, T = 2, S = 4}} do
    it(string.format("causal=%s T=%d S=%d", tostring(c.causal), c.T, c.S), function()
      local B, Hq, Hkv, D = 1, 4, 2, 4
      local q = randn({B, c.T, Hq, D})
      local k = randn({B, c.S, Hkv, D})
      local v = randn({B, c.S, Hkv, D})
      local opts = {causal = c.causal, scale = 0.6}
      local out, lse = ops.attention(q, k, v, opts)
      assert.same({B, c.T, Hq, D}, out:shape())
      assert.same({B, Hq, c.T}, lse:shape())
      local R = G.upstream(out)
      local dq, dk, dv = ops.attention_backward(R, q, k, v, out, lse, opts)
      check_all("attention", function() return (ops.attention(q, k, v, opts)) end, R,
        {{"q", q, dq}, {"k", k, dk}, {"v", v, dv}})
    end)
  end
end)

describe("swiglu", function()
  it("gate and up", function()
    local gate, up = randn({3, 4}), randn({3, 4})
    local y = ops.swiglu(gate, up)
    local R = G.upstream(y)
    local dg, du = ops.swiglu_backward(R, gate, up)
    check_all("swiglu", function() return ops.swiglu(gate, up) end, R, {{"gate", gate, dg}, {"up", up, du}})
  end)
end)

describe("cross entropy", function()
  it("with an ignored row", function()
    local logits = randn({4, 5})
    local targets = ids({1, 0, -100, 4})
    local loss, lse = ops.cross_entropy(logits, targets)
    assert.same({4}, loss:shape())
    assert.equal(0, loss:get(3))
    local scale = 1 / 3                -- mean over the 3 counted rows
    local dl = ops.cross_entropy_backward(logits, lse, targets, {scale = scale})
    for j = 1, 5 do assert.equal(0, dl:get(3, j)) end
    G.check("cross_entropy", logits, dl, function()
      local l = ops.cross_entropy(logits, targets)
      return l:sum():item() * scale
    end)
  end)

  it("with a custom ignore_index", function()
    local logits = randn({3, 4})
    local targets = ids({2, 7, 0})
    local loss, lse = ops.cross_entropy(logits, targets, {ignore_index = 7})
    assert.equal(0, loss:get(2))
    local dl = ops.cross_entropy_backward(logits, lse, targets, {ignore_index = 7, scale = 0.5})
    G.check("cross_entropy(ignore_index=7)", logits, dl, function()
      return ops.cross_entropy(logits, targets, {ignore_index = 7}):sum():item() * 0.5
    end)
  end)
end)

describe("sumsq", function()
  it("is the sum of squares, on the tensor's device, as a 0-dim f32 tensor", function()
    local x = moe.randn({1001}, {seed = 11})
    local s = ops.sumsq(x)
    assert.are.same({}, s:shape())
    assert.are.equal("f32", s:dtype())
    local want = 0
    for _, v in ipairs(x:to_table()) do want = want + v * v end
    assert.is_true(math.abs(s:item() - want) <= 1e-6 * want)
    -- bf16 input: its values squared as f32
    local xb = x:to("bf16")
    local wb = ops.sumsq(xb:to("f32")):item()
    assert.is_true(math.abs(ops.sumsq(xb):item() - wb) <= 1e-6 * wb)
    assert.has_error(function() ops.sumsq(nil) end, "ops.sumsq: x must be a tensor, got nil")
  end)
end)

describe("adamw", function()
  it("matches the formula for one step", function()
    local p, g = moe.tensor({1, -2, 3}), moe.tensor({0.5, 0.1, -1})
    local m, v = moe.zeros(3), moe.zeros(3)
    local cfg = {lr = 0.1, beta1 = 0.9, beta2 = 0.99, eps = 1e-8, weight_decay = 0.01, step = 1}
    ops.adamw(p, g, m, v, cfg)
    local p0, g0 = {1, -2, 3}, {0.5, 0.1, -1}
    for i = 1, 3 do
      local mi = 0.1 * g0[i]
      local vi = 0.01 * g0[i] ^ 2
      local mhat, vhat = mi / (1 - 0.9), vi / (1 - 0.99)
      local want = p0[i] - 0.1 * (mhat / (math.sqrt(vhat) + 1e-8) + 0.01 * p0[i])
      assert.is_true(math.abs(p:get(i) - want) < 1e-5, "param " .. i)
      assert.is_true(math.abs(m:get(i) - mi) < 1e-6)
      assert.is_true(math.abs(v:get(i) - vi) < 1e-6)
    end
  end)

  it("mixed precision: bf16 gradients, f32 state, the bf16 compute copy written in the same pass", function()
    local n = 1000
    local p1 = moe.randn({n}, {seed = 5})
    local g = moe.randn({n}, {seed = 6}):to("bf16")
    local m1, v1 = moe.randn({n}, {seed = 7}) * 0.1, (moe.randn({n}, {seed = 8}) * 0.1):abs()
    local p2, m2, v2 = p1:clone(), m1:clone(), v1:clone()
    local cfg = {lr = 1e-2, beta1 = 0.9, beta2 = 0.95, eps = 1e-8, weight_decay = 0.1, step = 4}
    -- reference: the same bf16 gradient values given as f32
    ops.adamw(p1, g:to("f32"), m1, v1, cfg)
    local copy = moe.zeros(n, {dtype = "bf16"})
    cfg.compute = copy
    ops.adamw(p2, g, m2, v2, cfg)
    assert.is_true(p2:equal(p1) and m2:equal(m1) and v2:equal(v1), "bf16 gradients read exactly as f32")
    assert.is_true(copy:to("f32"):equal(p2:to("bf16"):to("f32")), "compute copy = updated params rounded to bf16")
    assert.has_error(function() ops.adamw(p1:to("bf16"), g, m1, v1, {step = 1}) end)
  end)
end)
