-- One training step of the OLMoE-style model (bench/gpu_step.lua's model and
-- trainer settings), with the CUDA profiler range open around `steps` steps
-- after `warmup`, for a kernel-by-kernel breakdown under Nsight Compute:
--   ncu --profile-from-start off ... build/cuda/moelab bench/gpu_step_kernels.lua [warmup=3] [steps=1]
-- bench/gpu_step_kernels.sh runs it under ncu and sums the kernels' times.
-- Without a profiler it just trains (and prints the step's wall time).
local moe = require "moelab"
local core = require "moelab.core"
if not moe.cuda_available() then error("bench/gpu_step_kernels.lua needs a CUDA GPU") end
local warmup = tonumber(arg[1]) or 3
local steps = tonumber(arg[2]) or 1
local B, S, V, D, L = 8, 1024, 50304, 1024, 8
local model = moe.arch.OLMoE{
  vocab_size = V, hidden_size = D, num_layers = L, num_heads = 16, num_experts = 32, experts_per_token = 4,
  expert_intermediate_size = 512, seed = 1, device = "cuda",
}
local batches, rng = {}, 12345
for i = 1, 4 do
  local t = {}
  for r = 1, B do
    local row = {}
    for c = 1, S + 1 do rng = (rng * 1103515245 + 12345) % 2147483648; row[c] = rng % V end
    t[r] = row
  end
  local all = moe.tensor(t, {dtype = "i64"})
  batches[i] = {all:narrow(2, 1, S):contiguous(), all:narrow(2, 2, S):contiguous()}
end
local trainer = moe.MoETrainer{model = model, precision = "bf16", progress = false, aux_loss_coef = 0.01,
                               router_z_loss_coef = 0, weight_decay = 0.1, grad_clip = 1.0}
local t0
-- batch_fn(i) runs at the start of step i: the range covers steps warmup+1 .. warmup+steps
local function batch(i)
  if i == warmup + 1 then moe.synchronize("cuda"); core.cuda_profiler(true); t0 = moe.clock() end
  if i == warmup + steps + 1 then moe.synchronize("cuda"); core.cuda_profiler(false)
    print(string.format("profiled %d step(s): %.2f ms each (wall, under the profiler)", steps, (moe.clock() - t0) / steps * 1e3))
  end
  local b = batches[i % #batches + 1]
  return b[1], b[2]
end
trainer:train{batch_fn = batch, batch_size = B, seq_len = S, learning_rate = 3e-4, lr_schedule = "constant",
              max_steps = warmup + steps + 1}
