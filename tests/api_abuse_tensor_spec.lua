-- Wrong arguments at every tensor function, Tensor method and moe.ops function
-- must raise a Lua error that names the function (never crash the process).
local moe = require "moelab"
local ops = moe.ops

local methods = debug.getregistry()["moelab.Tensor"].__index

local function fails(name, f, ...)
  local ok, msg = pcall(f, ...)
  assert(not ok, name .. ": expected an error, the call succeeded")
  msg = tostring(msg)
  assert(msg:find(name, 1, true), name .. ": message does not name the function: " .. msg)
  return msg
end

local function freed()
  local t = moe.zeros(2, 3)
  t:free()
  return t
end

local GARBAGE = {
  function() return nil end,
  function() return "x" end,
  function() return {} end,
  function() return {1, "a"} end,
  function() return -1 end,
  function() return 0.5 end,
  function() return true end,
  function() return print end,
  function() return io.stdout end,
  function() return freed() end,
}

local CONSTRUCTORS = {"tensor", "zeros", "ones", "full", "empty", "randn", "rand", "arange", "matmul"}

describe("module functions", function()
  it("fail with no arguments and with garbage, naming the function", function()
    for _, name in ipairs(CONSTRUCTORS) do
      fails(name, moe[name])
      for _, g in ipairs(GARBAGE) do
        local v = g()
        -- arange(0.5) and arange(-1) are valid (empty or one element)
        -- valid on their own: arange(-1), arange(0.5), tensor(0.5), zeros({}) (0-dim), tensor({}) (empty)
        local valid = (type(v) == "number" and (name == "arange" or name == "tensor"))
          or (type(v) == "table" and #v == 0 and name ~= "matmul" and name ~= "full")
        if not valid then
          fails(name, moe[name], v)
          fails(name, moe[name], v, v)
        end
      end
    end
  end)

  it("reject negative sizes, bad shapes and bad options", function()
    for _, name in ipairs{"zeros", "ones", "empty", "randn", "rand"} do
      assert.matches("non%-negative", fails(name, moe[name], {2, -1}))
      assert.matches("non%-negative", fails(name, moe[name], 2, -3))
      fails(name, moe[name], {2.5})
      fails(name, moe[name], {1, 1, 1, 1, 1, 1, 1, 1, 1})
      fails(name, moe[name], {1e300})
      fails(name, moe[name], {0 / 0})
      fails(name, moe[name], {2}, "f32")
      fails(name, moe[name], {2}, {dtype = 5})
      assert.matches("unknown dtype", fails(name, moe[name], {2}, {dtype = "f128"}))
      assert.matches("unknown device", fails(name, moe[name], {2}, {device = "tpu"}))
      fails(name, moe[name], {2}, {device = "cuda:99"})
      fails(name, moe[name], {2}, {}, "extra")
    end
    fails("full", moe.full, {2}, "x")
    fails("full", moe.full, 2, 3)
    fails("randn", moe.randn, {2}, {seed = "x"})
    fails("randn", moe.randn, {2}, {seed = 1.5})
    fails("randn", moe.randn, {2}, {std = -1})
    fails("rand", moe.rand, {2}, {low = 1, high = 0})
    fails("arange", moe.arange, 0, 1, 0)
    fails("arange", moe.arange, 0, math.huge)
    fails("arange", moe.arange, 0, 1e300, 1e-300)
    fails("arange", moe.arange, 3, {dtype = "nope"})
    fails("tensor", moe.tensor, {{1}, {2, 3}})
    fails("tensor", moe.tensor, {{{{{{{{{1}}}}}}}}})
    fails("tensor", moe.tensor, {1, 2}, {dtype = "x"})
    fails("tensor", moe.tensor, moe.zeros(2))
    fails("matmul", moe.matmul, moe.zeros(2, 3), moe.zeros(2, 3))
    fails("matmul", moe.matmul, moe.zeros(2, 3, 4), moe.zeros(3, 4, 5))
    fails("matmul", moe.matmul, moe.zeros({}), moe.zeros(2))
    fails("matmul", moe.matmul, moe.zeros(2, 3), 5)
  end)

  it("manual_seed checks its argument", function()
    fails("manual_seed", moe.core.manual_seed)
    fails("manual_seed", moe.core.manual_seed, "x")
    fails("manual_seed", moe.core.manual_seed, 1.5)
  end)

  it("cuda_profiler wants a boolean (and a CUDA build)", function()
    fails("cuda_profiler", moe.core.cuda_profiler)
    fails("cuda_profiler", moe.core.cuda_profiler, "on")
    if not moe.core.built_with_cuda then
      assert(fails("cuda_profiler", moe.core.cuda_profiler, true):find("without CUDA", 1, true))
    end
  end)

  it("the CUDA memory functions say when the build has no CUDA", function()
    if moe.core.built_with_cuda then return end
    for _, name in ipairs{"cuda_memory_stats", "cuda_reset_peak_memory", "cuda_empty_cache"} do
      assert(fails(name, moe.core[name]):find("without CUDA", 1, true), name)
    end
  end)
end)

describe("Tensor methods", function()
  local names = {}
  for name in pairs(methods) do names[#names + 1] = name end
  table.sort(names)

  it("fail on a missing, non-tensor or freed self, naming the method", function()
    assert.is_true(#names > 50)
    for _, name in ipairs(names) do
      local f = methods[name]
      fails(name, f)
      fails(name, f, 5)
      fails(name, f, "x")
      fails(name, f, {})
      if name ~= "free" and name ~= "is_freed" then
        assert.matches("tensor was freed", fails(name, f, freed()))
      end
    end
  end)

  it("survive garbage arguments on a valid tensor", function()
    for _, name in ipairs(names) do
      if name ~= "free" then
        for _, g in ipairs(GARBAGE) do
          local t = moe.randn({2, 3}, {seed = 1})
          pcall(methods[name], t, g())
          pcall(methods[name], t, g(), g())
          pcall(methods[name], t, 1, g(), g())
        end
      end
    end
  end)

  it("reject out-of-range indices and dims, naming dim and size", function()
    local t = moe.zeros(2, 3)
    assert.matches("dim 2 of size 3", fails("get", t.get, t, 1, 4))
    assert.matches("dim 1 of size 2", fails("get", t.get, t, 0, 1))
    assert.matches("dim 1 of size 2", fails("set", t.set, t, -1, 1, 0))
    fails("get", t.get, t, 1, 2, 3)
    fails("set", t.set, t, 1, 1)
    fails("set", t.set, t, 1, 1, "x")
    fails("get_flat", t.get_flat, t, 7)
    fails("get_flat", t.get_flat, t, 0)
    fails("set_flat", t.set_flat, t, 1e300, 1)
    fails("item", t.item, t)
    fails("size", t.size, t, 3)
    fails("size", t.size, t, 0)
    fails("size", t.size, t, -3)
    fails("transpose", t.transpose, t, 1, 3)
    fails("transpose", t.transpose, t, 0, 1)
    fails("permute", t.permute, t, 1, 1)
    fails("permute", t.permute, t, 1)
    fails("permute", t.permute, t, {2, 3})
    fails("narrow", t.narrow, t, 2, 3, 2)
    fails("narrow", t.narrow, t, 2, 0, 1)
    fails("narrow", t.narrow, t, 2, 1, -1)
    fails("narrow", t.narrow, t, 3, 1, 1)
    fails("select", t.select, t, 1, 3)
    fails("select", t.select, t, 3, 1)
    fails("unsqueeze", t.unsqueeze, t, 4)
    fails("unsqueeze", t.unsqueeze, t, 0)
    fails("squeeze", t.squeeze, t, 5)
    fails("view", t.view, t, 4, 2)
    fails("view", t.view, t, -1, -1)
    fails("view", t.view, t, -2, 3)
    fails("view", t.view, t)
    fails("view", t.view, t:t(), 6)
    fails("reshape", t.reshape, t, 5)
    fails("expand", t.expand, t, 4, 3)
    fails("expand", t.expand, t, 3)
    fails("expand", t.expand, t, -1, 2, 3)
    fails("t", moe.zeros(2, 2, 2).t, moe.zeros(2, 2, 2))
    fails("softmax", t.softmax, t, 1)
    fails("softmax", moe.zeros({}).softmax, moe.zeros({}))
    fails("topk", t.topk, t, 4)
    fails("topk", t.topk, t, 0)
    fails("topk", t.topk, t, "x")
    fails("sum", t.sum, t, 3)
    fails("mean", t.mean, t, 0)
    fails("max", t.max, t, 1, "yes")
    fails("pow", t.pow, t, "x")
    fails("pow", t.pow, t, t)
    fails("allclose", t.allclose, t, moe.zeros(3, 2))
    fails("allclose", t.allclose, t, t, "x")
  end)

  it("reject unknown dtypes and devices in to()", function()
    local t = moe.zeros(2)
    fails("to", t.to, t, "f128")
    fails("to", t.to, t, "tpu")
    fails("to", t.to, t)
    fails("to", t.to, t, 5)
    fails("to", t.to, t, "cuda:99")
    fails("to", t.to, t, "cpu", "nope")
  end)

  it("report mismatched shapes in arithmetic and copy", function()
    local a, b = moe.zeros(2, 3), moe.zeros(4)
    assert.matches("broadcast", fails("add", function() return a + b end))
    fails("sub", function() return a - b end)
    fails("mul", function() return a * "x" end)
    fails("div", function() return {} / a end)
    fails("pow", function() return 2 ^ a end)
    fails("pow", function() return a ^ "x" end)
    fails("copy", a.copy, a, b)
    fails("copy", a.copy, a, 5)
    fails("matmul", a.matmul, a, a)
    fails("__len", function() return #moe.zeros({}) end)
  end)

  it("report freed operands in metamethods", function()
    local a = moe.zeros(2)
    local f = freed()
    assert.matches("tensor was freed", fails("add", function() return a + f end))
    assert.matches("tensor was freed", fails("add", function() return 1 + f end))
    assert.matches("tensor was freed", fails("neg", function() return -f end))
    assert.matches("tensor was freed", fails("__len", function() return #f end))
    assert.equal("tensor(<freed>)", tostring(f))
  end)
end)

describe("moe.ops", function()
  local names = {}
  for name in pairs(ops) do names[#names + 1] = name end
  table.sort(names)

  it("every function fails with no arguments and with garbage, naming itself", function()
    assert.is_true(#names >= 33)
    for _, name in ipairs(names) do
      local f = ops[name]
      fails("ops." .. name, f)
      for _, g in ipairs(GARBAGE) do
        fails("ops." .. name, f, g())
        fails("ops." .. name, f, g(), g(), g())
      end
      -- a freed tensor in every position (after the op name, where there is one)
      local first = ({unary = "exp", unary_backward = "exp", binary = "add", reduce = "sum"})[name]
      for pos = first and 2 or 1, 7 do
        local args = {first}
        for i = #args + 1, 7 do args[i] = moe.zeros(2, 3) end
        args[pos] = freed()
        local ok, msg = pcall(f, unpack(args, 1, 7))
        if not ok then assert(tostring(msg):find("ops." .. name, 1, true), msg) end
      end
    end
  end)

  it("reject wrong shapes, dtypes and names with messages naming the function", function()
    local x23, x34, x4 = moe.zeros(2, 3), moe.zeros(3, 4), moe.zeros(4)
    local i64 = moe.tensor({0, 1}, {dtype = "i64"})
    fails("ops.gemm", ops.gemm, x23, x23)
    fails("ops.gemm", ops.gemm, x4, x34)
    fails("ops.gemm", ops.gemm, x23, x34, {transa = 1})
    fails("ops.gemm", ops.gemm, x23, x34, {alpha = "x"})
    fails("ops.gemm", ops.gemm, x23, x34, 5)
    fails("ops.gemm", ops.gemm, i64, x34)
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 3, 4), {0, 1})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 3, 4), {0, 3, 2})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 3, 4), {0, 1, 5})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 3, 4), {0, "a", 2})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 3, 4), {0})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, x34, {0, 2})
    fails("ops.gemm_grouped_wgrad", ops.gemm_grouped_wgrad, x23, x23, {0, 1, 2}, 3)
    fails("ops.gemm_grouped_wgrad", ops.gemm_grouped_wgrad, x23, x34, {0, 1, 2})
    fails("ops.gemm_grouped", ops.gemm_grouped, x23, moe.zeros(2, 4, 3), {0, 1, 2}, {transb = true, out = 5})
    fails("ops.gemm_grouped_wgrad", ops.gemm_grouped_wgrad, x23, x23, {0, 1, 2}, 2, {out = x23})
    fails("ops.gemm_grouped_swiglu", ops.gemm_grouped_swiglu, x23, moe.zeros(2, 5, 3), moe.zeros(2, 5, 4), {0, 1, 2})
    fails("ops.gemm_grouped_swiglu", ops.gemm_grouped_swiglu, x23, moe.zeros(2, 5, 3), nil, {0, 1, 2})
    fails("ops.gemm_grouped_swiglu", ops.gemm_grouped_swiglu, x23, moe.zeros(2, 5, 3), moe.zeros(2, 5, 3), {0, 3})
    fails("ops.unary", ops.unary, "nope", x23)
    fails("ops.unary", ops.unary, "pow", x23)
    fails("ops.unary", ops.unary, "exp", x23, "x")
    fails("ops.unary_backward", ops.unary_backward, "exp", x23, x34)
    fails("ops.binary", ops.binary, "pow", x23, x23)
    fails("ops.binary", ops.binary, "add", x23, x34)
    fails("ops.sum_to", ops.sum_to, x23, {4})
    fails("ops.sum_to", ops.sum_to, x23, {-1})
    fails("ops.reduce", ops.reduce, "median", x23)
    fails("ops.reduce", ops.reduce, "sum", x23, 3)
    fails("ops.axpy", ops.axpy, x23, 1, x34)
    fails("ops.softmax_backward", ops.softmax_backward, x23, x34)
    fails("ops.logsumexp", ops.logsumexp, moe.zeros({}))
    fails("ops.topk", ops.topk, x23, 4)
    fails("ops.topk", ops.topk, x23, 0)
    fails("ops.gather", ops.gather, x23, moe.tensor({{5}, {0}}, {dtype = "i64"}))
    fails("ops.gather", ops.gather, x23, moe.tensor({{-1}, {0}}, {dtype = "i64"}))
    fails("ops.gather", ops.gather, x23, x23)
    fails("ops.scatter_add", ops.scatter_add, {2, 3}, moe.tensor({{9}, {0}}, {dtype = "i64"}), moe.zeros(2, 1))
    fails("ops.scatter_add", ops.scatter_add, "x", i64, x23)
    fails("ops.index_select", ops.index_select, x23, moe.tensor({7}, {dtype = "i64"}))
    fails("ops.index_select", ops.index_select, x23, moe.tensor({{0}}, {dtype = "i64"}))
    fails("ops.index_add", ops.index_add, {2, 3}, moe.tensor({0, 2}, {dtype = "i64"}), x23)
    fails("ops.embedding", ops.embedding, x23, moe.tensor({2}, {dtype = "i64"}))
    fails("ops.embedding", ops.embedding, x4, i64)
    fails("ops.embedding_backward", ops.embedding_backward, x23, i64, 0)
    fails("ops.embedding_backward", ops.embedding_backward, x23, i64, 1)
    fails("ops.rmsnorm", ops.rmsnorm, x23, x4)
    fails("ops.rmsnorm", ops.rmsnorm, x23, moe.zeros(3), -1)
    fails("ops.rmsnorm_backward", ops.rmsnorm_backward, x23, x23, moe.zeros(3), moe.zeros(5))
    fails("ops.layernorm", ops.layernorm, x23, moe.zeros(3), x4)
    fails("ops.layernorm_backward", ops.layernorm_backward, x23, x23, moe.zeros(3), moe.zeros(2), moe.zeros(1))
    fails("ops.rope", ops.rope, x23)
    fails("ops.rope", ops.rope, moe.zeros(1, 2, 1, 3))
    fails("ops.rope", ops.rope, moe.zeros(1, 2, 1, 4), {theta = 0})
    fails("ops.rope", ops.rope, moe.zeros(1, 2, 1, 4), {pos_offset = -1})
    local q, kv = moe.zeros(1, 2, 3, 4), moe.zeros(1, 2, 2, 4)
    fails("ops.attention", ops.attention, q, kv, kv)               -- Hq % Hkv ~= 0
    fails("ops.attention", ops.attention, x23, x23, x23)
    fails("ops.attention", ops.attention, moe.zeros(1, 2, 2, 4), kv, moe.zeros(1, 3, 2, 4))
    fails("ops.attention", ops.attention, moe.zeros(1, 2, 2, 4), kv, kv, {causal = "yes"})
    fails("ops.attention_backward", ops.attention_backward, q, q, kv, kv, q, x23)
    fails("ops.swiglu", ops.swiglu, x23, x34)
    fails("ops.swiglu_backward", ops.swiglu_backward, x23, x23, x34)
    fails("ops.cross_entropy", ops.cross_entropy, x23, moe.tensor({0, 3}, {dtype = "i64"}))
    fails("ops.cross_entropy", ops.cross_entropy, x23, moe.tensor({0, 1, 2}, {dtype = "i64"}))
    fails("ops.cross_entropy", ops.cross_entropy, x23, moe.zeros(2))
    fails("ops.cross_entropy", ops.cross_entropy, x23, i64, {ignore_index = 0.5})
    fails("ops.cross_entropy_backward", ops.cross_entropy_backward, x23, moe.zeros(3), i64)
    fails("ops.adamw", ops.adamw, x23, x34, x23, x23)
    fails("ops.adamw", ops.adamw, x23, x23, x23, x23, {step = 0})
    fails("ops.adamw", ops.adamw, x23, x23, x23, x23, {lr = "x"})
    fails("ops.adamw", ops.adamw, moe.zeros(2, 3, {dtype = "i32"}), x23, x23, x23)
  end)

  it("survives random argument combinations", function()
    local pool = {
      function() return moe.zeros({}) end,
      function() return moe.zeros(0) end,
      function() return moe.zeros(0, 4) end,
      function() return moe.randn({3}, {seed = 1}) end,
      function() return moe.randn({2, 3}, {seed = 2}) end,
      function() return moe.randn({2, 3, 4}, {seed = 3}) end,
      function() return moe.randn({1, 2, 2, 4}, {seed = 4}) end,
      function() return moe.randn({2, 3}, {seed = 5}):t() end,
      function() return moe.randn({3}, {seed = 6}):expand(2, 3) end,
      function() return moe.randn({2, 3}, {seed = 7, dtype = "bf16"}) end,
      function() return moe.zeros(2, 3, {dtype = "i32"}) end,
      function() return moe.tensor({0, 1}, {dtype = "i64"}) end,
      function() return moe.tensor({{100}, {-5}}, {dtype = "i64"}) end,
      function() return moe.tensor({-9e18, 9e18}, {dtype = "i64"}) end,
      function() return {0, 1, 2} end,
      function() return {2, 3} end,
      function() return {0, 5, 1} end,
      function() return {} end,
      function() return {causal = true, transa = true, transb = true, inverse = true} end,
      function() return 0 end,
      function() return 1 end,
      function() return 3 end,
      function() return -1 end,
      function() return 1e300 end,
      function() return 0 / 0 end,
      function() return "exp" end,
      function() return "add" end,
      function() return "sum" end,
      function() return "pow" end,
      function() return nil end,
    }
    -- a small deterministic generator (the same calls on every run)
    local state = 12345
    local function pick()
      state = (state * 1103515245 + 12345) % 2147483648
      return pool[state % #pool + 1]()
    end
    local calls = 0
    for _, name in ipairs(names) do
      for _ = 1, 150 do
        local a = {pick(), pick(), pick(), pick(), pick(), pick(), pick()}
        local ok, msg = pcall(ops[name], unpack(a, 1, 7))
        if not ok then assert(tostring(msg):find("ops." .. name, 1, true), msg) end
        calls = calls + 1
      end
    end
    for _, name in ipairs(CONSTRUCTORS) do
      for _ = 1, 100 do pcall(moe[name], pick(), pick(), pick()) end
    end
    collectgarbage()
    assert.is_true(calls > 4000)
  end)

  it("leaves the process working", function()
    local a = moe.randn({3, 3}, {seed = 9})
    local b = moe.matmul(a, moe.tensor({{1, 0, 0}, {0, 1, 0}, {0, 0, 1}}))
    assert.is_true(a:allclose(b))
    assert.equal(3, #ops.softmax(a))
  end)
end)
