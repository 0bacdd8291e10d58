-- Whole training step of the OLMoE-style model of issue #6 on one GPU, through
-- MoETrainer (forward, backward, gradient-norm clipping, AdamW), the way a
-- recipe trains: vocab 50304, d 1024, 8 layers, 16 heads, 32 experts of
-- hidden 512, top-4, sequence 1024, batch 8, aux loss 0.01, no z-loss.
--   build/cuda/moelab bench/gpu_step.lua [precision=bf16|f32] [steps=30] [warmup=5]
-- Prints one table row: tokens/s (timed steps' tokens / their time), step ms, peak GPU memory held
-- by the allocator (in use, and reserved: in use plus the freed blocks it keeps for reuse, the most
-- held from the driver at once, as torch.cuda.max_memory_reserved) and MFU.
-- MFU counts 6 x (active parameters without the input embedding) + the
-- attention term 12 x layers x seq x d per token, against 989 TFLOP/s bf16
-- dense (H100 SXM and H200); the same formula as bench/gpu_step_torch.py.
local moe = require "moelab"
local core = require "moelab.core"
local device = moe.cuda_available() and "cuda" or "cpu"   -- cpu: a smoke test of the script only
local precision = arg[1] or "bf16"
local steps = tonumber(arg[2]) or 30
local warmup = tonumber(arg[3]) or 5
local setup = dofile((arg[0]:match("^(.*/)") or "./") .. "step_setup.lua")
local st = setup(device, precision)
local model, trainer, B, S, V, D, L = st.model, st.trainer, st.B, st.S, st.V, st.D, st.L
local function run(n)
  return trainer:train{batch_fn = st.batch, batch_size = B, seq_len = S, learning_rate = 3e-4,
                       lr_schedule = "constant", max_steps = n}
end
run(warmup)
moe.synchronize(device)
if device == "cuda" then core.cuda_reset_peak_memory(0) end
local mallocs0 = device == "cuda" and core.cuda_memory_stats(0).cuda_mallocs or 0
if os.getenv("MOELAB_STEP_NOGC") then collectgarbage("stop") end   -- diagnosis: do GC pauses make the slow steps?
if os.getenv("MOELAB_STEP_NOJIT") then jit.off(); jit.flush() end   -- diagnosis: LuaJIT trace compiles?
local r = run(warmup + steps)
moe.synchronize(device)
collectgarbage("restart")
local mem = device == "cuda" and core.cuda_memory_stats(0) or {peak = 0, peak_reserved = 0, cuda_mallocs = 0}
print(string.format("# cudaMalloc calls during the timed run: %d", mem.cuda_mallocs - mallocs0))
if trainer.cuda_graph and trainer.graph_info then
  local gi = trainer.graph_info
  print(string.format("# cuda graph: %d nodes, %d launches, its pool %.2f GB", gi.nodes, gi.launches, gi.pool_bytes / 1e9))
elseif trainer.optimizer.launches then
  print(string.format("# AdamW calls a step: %.0f (%d parameter tensors)", trainer.optimizer:launches() /
    trainer.optimizer:step_count(), #model:parameters()))
end

-- tokens over the whole timed loop / its time, as bench/gpu_step_torch.py measures. With the
-- step as a CUDA graph (the default; MOELAB_STEP_GRAPH=0: eager) each train() call captures its first step (or, should that fail, runs it
-- eagerly and captures the second): the timed run's first two steps are reported apart, left out
local first = warmup + 1
if trainer.cuda_graph and trainer.graph_info then
  local h = r.history
  print(string.format("# cuda graph: the timed run's first two steps (a capture among them) %.2f and %.2f ms, not timed",
    B * S / h[first].tokens_per_s * 1e3, B * S / h[first + 1].tokens_per_s * 1e3))
  first = first + 2
end
local total_s, nsteps = 0, 0
for s = first, #r.history do total_s, nsteps = total_s + B * S / r.history[s].tokens_per_s, nsteps + 1 end
local tps = nsteps * B * S / total_s
local ms, seq = {}, {}
for s = first, #r.history do ms[#ms + 1] = B * S / r.history[s].tokens_per_s * 1e3; seq[#seq + 1] = string.format("%.1f", ms[#ms]) end
if os.getenv("MOELAB_STEP_LIST") then
  print("# step ms in order: " .. table.concat(seq, " "))
  local mv = {}
  for s = first, #r.history do mv[#mv + 1] = string.format("%.2f", r.history[s].max_vio or 0) end
  print("# max_vio in order:  " .. table.concat(mv, " "))
end
table.sort(ms)

local embed = V * D
local active = model:num_active_params() - embed
local flops_per_token = 6 * active + 12 * L * S * D
local mfu = flops_per_token * tps / 989e12
print(string.format("# moelab %s, OLMoE-style step: %.1fM params, %.1fM active (%.1fM without the input embedding)",
  precision, model:num_params() / 1e6, model:num_active_params() / 1e6, active / 1e6))
print(string.format("# loss %.4f -> %.4f over %d steps", r.history[1].loss, r.history[#r.history].loss, #r.history))
print(string.format("# step ms over the %d timed steps: min %.2f, median %.2f, max %.2f", #ms, ms[1],
  ms[math.floor((#ms + 1) / 2)], ms[#ms]))
print("mode            tokens/s   step ms   peak GB (in use)   peak reserved GB   MFU")
print(string.format("moelab-%-8s %9.0f %9.2f %18.2f %18.2f %6.1f%%", precision, tps, B * S / tps * 1e3,
  mem.peak / 1e9, mem.peak_reserved / 1e9, 100 * mfu))
