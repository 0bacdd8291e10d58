-- One forward+backward of the OLMoE-shape MoE layer (bench/gpu_moe_layer.lua's
-- first shape, bf16) with the CUDA profiler range open around it, for a
-- kernel-by-kernel breakdown under Nsight Compute:
--   ncu --profile-from-start off --clock-control none --cache-control none \
--       --metrics gpu__time_duration.sum --csv --print-units base \
--       build/cuda/moelab bench/gpu_moe_layer_kernels.lua [warmup=3] [iters=1] > ncu.csv
--   python3 bench/ncu_kernels.py ncu.csv [iters]
-- Without a profiler it just runs (and prints the wall time per iteration).
local moe = require "moelab"
local core = require "moelab.core"
if not moe.cuda_available() then error("bench/gpu_moe_layer_kernels.lua needs a CUDA GPU") end
local warmup = tonumber(arg[1]) or 3
local iters = tonumber(arg[2]) or 1
local T, d, de, E, k = 16384, 2048, 1024, 64, 8
local layer = moe.nn.MoE{hidden_size = d, num_experts = E, experts_per_token = k, expert_intermediate_size = de,
                         renormalize = false, seed = 1}
layer:train(true)
layer:to("cuda")
layer:set_precision("bf16")
local x = moe.randn({T, d}, {seed = 2, device = "cuda"}):to("bf16")
local dy = moe.randn({T, d}, {seed = 3, device = "cuda"}):to("bf16")
local tape = moe.Tape()
local function step()
  layer:zero_grad{lazy = true}   -- as bench/gpu_moe_layer.lua's timed runs: the backward writes the gradients
  local y = layer:forward(x, tape)
  tape:backward(y, dy)
  tape:reset()
  collectgarbage("collect")
end
for _ = 1, warmup do step() end
moe.synchronize("cuda")
core.cuda_profiler(true)
local t0 = moe.clock()
for _ = 1, iters do step() end
moe.synchronize("cuda")
core.cuda_profiler(false)
print(string.format("profiled %d forward+backward(s): %.2f ms each (wall, under the profiler)", iters,
                    (moe.clock() - t0) / iters * 1e3))
