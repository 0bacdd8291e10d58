-- One training step of the OLMoE-style model (bench/step_setup.lua, the model and
-- trainer of bench/gpu_step.lua), with the CUDA profiler range open around `steps` steps
-- after `warmup`, for a kernel-by-kernel breakdown under Nsight Compute:
--   ncu --profile-from-start off ... build/cuda/moelab bench/gpu_step_kernels.lua [warmup=3] [steps=1]
-- bench/gpu_step_kernels.sh runs it under ncu and sums the kernels' times.
-- Without a profiler it just trains (and prints the step's wall time).
local moe = require "moelab"
local core = require "moelab.core"
if not moe.cuda_available() then error("bench/gpu_step_kernels.lua needs a CUDA GPU") end
local warmup = tonumber(arg[1]) or 3
local steps = tonumber(arg[2]) or 1
local setup = dofile((arg[0]:match("^(.*/)") or "./") .. "step_setup.lua")
local st = setup("cuda", "bf16")
local trainer, B, S = st.trainer, st.B, st.S
local t0
-- batch_fn(i) runs at the start of step i + 1 (i counts batches from 0): the
-- range covers steps warmup + 1 .. warmup + steps and closes when the next begins
local function batch(i)
  if i == warmup then moe.synchronize("cuda"); core.cuda_profiler(true); t0 = moe.clock() end
  if i == warmup + steps then moe.synchronize("cuda"); core.cuda_profiler(false)
    print(string.format("profiled %d step(s): %.2f ms each (wall, under the profiler)", steps, (moe.clock() - t0) / steps * 1e3))
  end
  return st.batch(i)
end
trainer:train{batch_fn = batch, batch_size = B, seq_len = S, learning_rate = 3e-4, lr_schedule = "constant",
              max_steps = warmup + steps + 1}
