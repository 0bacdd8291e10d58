-- The grouped expert GEMMs on their own, bf16, at the issue's shapes: the
-- forward (c = a b_g^T, the expert bank's projections), the data gradients
-- (c = a b_g), the weight gradients (c_g = a_g^T b_g; their strategy is
-- MOELAB_GROUPED_WGRAD) and gate + up + SwiGLU fused or in parts; timed with the
-- device synchronised around ITERS calls (median of REPEATS). The strategy
-- comes from the environment, so run it once per setting:
--   build/cuda/moelab bench/gpu_grouped.lua                      (auto)
--   MOELAB_GROUPED_GEMM=kernel build/cuda/moelab bench/gpu_grouped.lua
--   MOELAB_GROUPED_TMA=1 build/cuda/moelab bench/gpu_grouped.lua
--   build/cuda/moelab bench/gpu_grouped.lua 20 5 "olmoe down" dev   (offsets on the device)
-- Routing is balanced with +-25% noise per expert (seeded), so every expert
-- has rows. Prints one line per shape: ms per call and TFLOP/s.
local moe = require "moelab"
local core = require "moelab.core"
if not moe.cuda_available() then error("bench/gpu_grouped.lua needs a CUDA GPU") end
local iters, repeats = tonumber(arg[1]) or 20, tonumber(arg[2]) or 5
local only = arg[3] ~= "" and arg[3] or nil   -- a shape's name: time only that one ("" or none: all)
-- "dev": the forward and weight-gradient shapes with their offsets in a device
-- tensor (ops.gemm_grouped_dev: the TMA kernel reads them itself, no copy back)
local dev_offsets = arg[4] == "dev"
-- {name, rows, experts, K, N, transb}: transb = b [G, N, K] (the forward), else
-- b [G, K, N] (the data gradients dh = dy W_down, dx = dg W_gate)
local shapes = {
  {"olmoe gate/up", 131072, 64, 2048, 2048, true},
  {"olmoe gate", 131072, 64, 2048, 1024, true},
  {"olmoe down", 131072, 64, 1024, 2048, true},
  {"olmoe dh", 131072, 64, 2048, 1024, false},
  {"olmoe dx", 131072, 64, 1024, 2048, false},
  {"step gate/up", 32768, 32, 1024, 1024, true},
  {"step down", 32768, 32, 512, 1024, true},
  {"step dx", 32768, 32, 512, 1024, false},
  {"mixtral gate", 16384, 8, 4096, 14336, true},
  -- weight gradients c_g = a_g^T b_g (K: a's columns P, N: b's columns Q)
  {"olmoe wgrad dn", 131072, 64, 2048, 1024, "wgrad"},
  {"olmoe wgrad up", 131072, 64, 1024, 2048, "wgrad"},
  {"step wgrad dn", 32768, 32, 1024, 512, "wgrad"},
  {"step wgrad up", 32768, 32, 512, 1024, "wgrad"},
  -- gate, up and the SwiGLU activation: one fused call, and the parts (N: the hidden width)
  {"olmoe swiglu", 131072, 64, 2048, 1024, "swiglu"},
  {"olmoe parts", 131072, 64, 2048, 1024, "parts"},
  {"step swiglu", 32768, 32, 1024, 512, "swiglu"},
  {"step parts", 32768, 32, 1024, 512, "parts"},
}
local function offsets(rows, G, seed)
  local w, s = {}, 0
  local x = seed
  for g = 1, G do
    x = (x * 1103515245 + 12345) % 2147483648
    w[g] = 0.75 + 0.5 * (x / 2147483648)
    s = s + w[g]
  end
  local off, acc = {0}, 0
  for g = 1, G - 1 do acc = acc + w[g]; off[g + 1] = math.floor(rows * acc / s) end
  off[G + 1] = rows
  return off
end
print(string.format("# grouped GEMM forward, bf16; strategy %s, TMA %s, offsets on the %s",
                    os.getenv("MOELAB_GROUPED_GEMM") or "auto", os.getenv("MOELAB_GROUPED_TMA") or "auto",
                    dev_offsets and "device" or "host"))
print(string.format("%-14s %8s %4s %6s %6s %9s %9s", "shape", "rows", "G", "K", "N", "ms", "TFLOP/s"))
for _, sh in ipairs(shapes) do
  if only and sh[1] ~= only then goto continue end
  local name, M, G, K, N, tb = sh[1], sh[2], sh[3], sh[4], sh[5], sh[6]
  local a = moe.randn({M, K}, {seed = 1, device = "cuda"}):to("bf16")
  local b = tb == false and moe.randn({G, K, N}, {seed = 2, device = "cuda"}):to("bf16") or nil
  if tb == true then b = moe.randn({G, N, K}, {seed = 2, device = "cuda"}):to("bf16") end
  local off = offsets(M, G, 7)
  local offs = dev_offsets and moe.tensor(off, {dtype = "i64", device = "cuda"}) or off
  local c, run, flops
  if tb == "wgrad" then
    b = moe.randn({M, N}, {seed = 2, device = "cuda"}):to("bf16")
    c = core.ops.gemm_grouped_wgrad(a, b, off)
    local opts = {out = c}
    run = function() return core.ops.gemm_grouped_wgrad(a, b, offs, G, opts) end
    flops = 2 * M * K * N
  elseif tb == "swiglu" or tb == "parts" then
    -- b is the gate weights [G, N, K]; bu the up weights
    local bu = moe.randn({G, N, K}, {seed = 3, device = "cuda"}):to("bf16")
    b = moe.randn({G, N, K}, {seed = 2, device = "cuda"}):to("bf16")
    flops = 2 * 2 * M * K * N
    if tb == "swiglu" then
      run = function() return core.ops.gemm_grouped_swiglu(a, b, bu, off) end
    else
      local g = core.ops.gemm_grouped(a, b, off, {transb = true})
      local u = core.ops.gemm_grouped(a, bu, off, {transb = true})
      local go, uo = {transb = true, out = g}, {transb = true, out = u}
      run = function()
        core.ops.gemm_grouped(a, b, off, go)
        core.ops.gemm_grouped(a, bu, off, uo)
        return core.ops.swiglu(g, u)
      end
    end
  else
    c = core.ops.gemm_grouped(a, b, off, {transb = tb})
    local opts = {transb = tb, out = c}   -- written in place: the timing is the GEMM's alone
    run = function() return core.ops.gemm_grouped(a, b, offs, opts) end
    flops = 2 * M * K * N
  end
  run(); moe.synchronize("cuda")
  local times = {}
  for r = 1, repeats do
    local t0 = moe.clock()
    for _ = 1, iters do run() end
    moe.synchronize("cuda")
    times[r] = (moe.clock() - t0) / iters
    collectgarbage("collect")
  end
  table.sort(times)
  local t = times[math.floor((repeats + 1) / 2)]
  print(string.format("%-14s %8d %4d %6d %6d %9.3f %9.1f", name, M, G, K, N, t * 1e3, flops / t / 1e12))
  a, b, c = nil, nil, nil
  collectgarbage("collect")
  ::continue::
end
