-- Host cost of queuing work on the GPU: microseconds per call for small ops
-- (where the kernel is shorter than its launch) and for GEMMs whose shape
-- repeats or changes from call to call (cuBLAS picks an algorithm per shape).
--   build/cuda/moelab bench/gpu_overhead.lua
local moe = require "moelab"
local ops = moe.ops
assert(moe.cuda_available(), "no CUDA device")
local dev = "cuda"

local function per_call(name, n, fn)
  fn(1)
  moe.synchronize(dev)
  local t0 = moe.clock()
  for i = 1, n do fn(i) end
  local host = moe.clock() - t0
  moe.synchronize(dev)
  local wall = moe.clock() - t0
  print(string.format("%-58s host %8.1f us/call   wall %8.1f us/call", name, host / n * 1e6, wall / n * 1e6))
end

local a = moe.randn({1024}, {seed = 1, device = dev})
local b = moe.randn({1024}, {seed = 2, device = dev})
per_call("a + b, 1024 elements (Lua binding + op + launch)", 2000, function() local _ = a + b end)
local big = moe.randn({16777216}, {seed = 3, device = dev}):to("bf16")
per_call("bf16 -> f32 of 16M elements", 50, function() local _ = big:to("f32") end)
local x = moe.randn({4096, 1024}, {seed = 4, device = dev}):to("bf16")
local w = moe.randn({512, 1024}, {seed = 5, device = dev}):to("bf16")
per_call("gemm bf16 [4096,1024] x [1024,512]^T, same shape", 200,
  function() local _ = ops.gemm(x, w, {transb = true}) end)
per_call("gemm bf16 [m,1024] x [1024,512]^T, m = 3000 + i (new shapes)", 200,
  function(i) local _ = ops.gemm(x:narrow(1, 1, 3000 + i), w, {transb = true}) end)
per_call("gemm bf16, m cycling over 8 shapes", 200,
  function(i) local _ = ops.gemm(x:narrow(1, 1, 3000 + i % 8), w, {transb = true}) end)

-- grouped: 32 experts, 32768 rows, [*, 1024] x [512, 1024]^T per expert
local E, rows = 32, 32768
local xp = moe.randn({rows, 1024}, {seed = 6, device = dev}):to("bf16")
local we = moe.randn({E, 512, 1024}, {seed = 7, device = dev}):to("bf16")
local function offsets(jitter)
  local off, acc = {0}, 0
  for e = 1, E do
    local c = math.floor(rows / E) + (e % 2 == 1 and jitter or -jitter)
    acc = acc + c
    off[e + 1] = acc
  end
  return off
end
local fixed = offsets(0)
per_call("gemm_grouped 32 experts, same offsets every call", 50,
  function() local _ = ops.gemm_grouped(xp, we, fixed, {transb = true}) end)
per_call("gemm_grouped 32 experts, offsets change every call", 50,
  function(i) local _ = ops.gemm_grouped(xp, we, offsets(i % 97), {transb = true}) end)
print("# grouped-GEMM strategy: " .. (os.getenv("MOELAB_GROUPED_GEMM") or "default"))
