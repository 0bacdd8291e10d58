-- The OLMoE-style model, batches and trainer of issue #6's whole-step benchmark,
-- shared by bench/gpu_step.lua and bench/gpu_step_kernels.lua so that the kernel
-- profile measures the very step the throughput table reports:
-- vocab 50304, d 1024, 8 layers, 16 heads, 32 experts of hidden 512, top-4,
-- sequence 1024, batch 8, aux loss 0.01, no z-loss, weight decay 0.1, clipping 1.0.
-- MOELAB_STEP_TINY=1 shrinks it to a smoke test of the scripts.
--   local setup = dofile(<bench dir> .. "step_setup.lua")
--   local s = setup(device, precision)   -- s.model, s.trainer, s.batch(i), s.B, s.S, s.V, s.D, s.L
local moe = require "moelab"

return function(device, precision)
  local B, S, V, D, L = 8, 1024, 50304, 1024, 8
  if os.getenv("MOELAB_STEP_TINY") then B, S, V, D, L = 2, 64, 512, 64, 2 end
  -- MOELAB_STEP_SHAPE="B,S,V,D,L": another size (e.g. a small model, where the host's launches bound the step)
  local shape = os.getenv("MOELAB_STEP_SHAPE")
  if shape then
    local v = {}
    for x in shape:gmatch("%d+") do v[#v + 1] = tonumber(x) end
    assert(#v == 5, "MOELAB_STEP_SHAPE must be five numbers: batch, sequence, vocab, hidden, layers")
    B, S, V, D, L = v[1], v[2], v[3], v[4], v[5]
  end
  local model = moe.arch.OLMoE{
    vocab_size = V, hidden_size = D, num_layers = L, num_heads = 16, num_experts = 32, experts_per_token = 4,
    expert_intermediate_size = 512, seed = 1, device = device,
  }
  -- fixed random batches, made once on the host (the trainer uploads each)
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
  -- MOELAB_STEP_KEEP_ROWS=1: the MoE layers keep their experts' gathered rows for the backward
  -- (model:set_keep_expert_rows(true); by default the GEMMs gather them here), to compare speed and memory
  if os.getenv("MOELAB_STEP_KEEP_ROWS") == "1" then model:set_keep_expert_rows(true) end
  -- MOELAB_STEP_OPTIM_STATE=bf16: AdamW's moments in bf16 (MoETrainer{optimizer_state = "bf16"})
  local trainer = moe.MoETrainer{model = model, precision = precision, progress = false, aux_loss_coef = 0.01,
                                 router_z_loss_coef = 0, weight_decay = 0.1, grad_clip = 1.0,
                                 optimizer_state = os.getenv("MOELAB_STEP_OPTIM_STATE") or "f32",
                                 -- MOELAB_STEP_MASTER=f32: the f32 master weights kept whole (default split)
                                 master_weights = os.getenv("MOELAB_STEP_MASTER") or "split",
                                 -- MOELAB_STEP_RECOMPUTE=norms: the norms' outputs made again in the backward
                                 recompute = os.getenv("MOELAB_STEP_RECOMPUTE") or "none",
                                 -- the trainer's default captures the step into a CUDA graph and
                                 -- replays it; MOELAB_STEP_GRAPH=0: eager steps
                                 cuda_graph = os.getenv("MOELAB_STEP_GRAPH") ~= "0" and "auto" or false}
  local function batch(i) local b = batches[i % #batches + 1]; return b[1], b[2] end
  return {model = model, trainer = trainer, batch = batch, B = B, S = S, V = V, D = D, L = L}
end
