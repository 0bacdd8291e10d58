-- Where the memory of issue #6's training step goes. Runs the OLMoE-style model
-- of bench/step_setup.lua through two trainer steps (so the optimizer state
-- exists), then one forward and backward by hand, printing:
--   - what the tape holds after the forward (the trainer's: keep_logits = false), by entry name (tape:memory: each
--     storage once, for the first entry holding it; the parameters' flat
--     buffers and the model's buffers left out);
--   - on CUDA, the allocator's bytes in use before the forward (the static
--     part), after it, and its peaks during the forward and the backward.
--   build/cuda/moelab bench/step_memory.lua [precision=bf16] [batch=8]
-- (MOELAB_STEP_OPTIM_STATE, MOELAB_STEP_RECOMPUTE: as for bench/gpu_step.lua)
-- A CPU build runs f32 only (bf16 compute needs CUDA); a smaller batch keeps
-- that quick, and the activation bytes scale with it.
local moe = require "moelab"
local core = require "moelab.core"
local device = moe.cuda_available() and "cuda" or "cpu"
local precision = arg[1] or (device == "cuda" and "bf16" or "f32")
local batch = tonumber(arg[2])
local setup = dofile((arg[0]:match("^(.*/)") or "./") .. "step_setup.lua")
local st = setup(device, precision)
local function batch_fn(i)
  local ids, targets = st.batch(i)
  if batch and batch < st.B then ids, targets = ids:narrow(1, 1, batch):contiguous(), targets:narrow(1, 1, batch):contiguous() end
  return ids, targets
end
local cuda = device == "cuda"
local function stats()
  moe.synchronize(device)
  return cuda and core.cuda_memory_stats(0) or {in_use = 0, peak = 0, cached = 0}
end
local s_setup = stats()
st.trainer:train{batch_fn = batch_fn, batch_size = batch or st.B, seq_len = st.S, learning_rate = 3e-4,
                 lr_schedule = "constant", max_steps = 2}
collectgarbage(); collectgarbage()
local s0 = stats()
if cuda then core.cuda_reset_peak_memory(0) end
local ids, targets = batch_fn(2)
st.model:train(true)
-- as the trainer calls it: the loss's gradient over the logits
local out = st.model:forward(ids, {targets = targets, aux_loss_coef = 0.01, router_z_loss_coef = 0, keep_logits = false,
                                     loss_grad = 1, recompute = st.trainer.recompute})
local s1 = stats()
local skip = {st.model.net:flat_parameters()}   -- values, gradients and the bf16 compute copy
for _, b in ipairs(st.model.net:buffers()) do skip[#skip + 1] = b.value end
local rows = out.tape:memory(skip)   -- before the backward, which lets go of some
if cuda then core.cuda_reset_peak_memory(0) end
out.tape:set_one_backward(true)   -- as the trainer runs it
out.tape:backward(out.total_loss)
local s2 = stats()
local total = 0
print(string.format("# %s %s, %d sequences of %d tokens, tape of %d entries, recompute %s", device, precision,
  ids:size(1), ids:size(2), out.tape:size(), out.tape:recompute()))
print(string.format("%-28s %8s %12s", "entry", "tensors", "MB"))
for _, r in ipairs(rows) do
  total = total + r.bytes
  print(string.format("%-28s %8d %12.1f", r.name, r.tensors, r.bytes / 1e6))
end
print(string.format("%-28s %8s %12.1f", "total held by the tape", "", total / 1e6))
if cuda then
  local function gb(x) return x / 1e9 end
  local v, g, c = st.model.net:flat_parameters()
  print(string.format("# GB in use after the model and trainer were made %.2f; flat buffers: values %.2f, gradients %.2f, compute copy %.2f; AdamW m and v %.2f",
    gb(s_setup.in_use), gb(v:numel() * 4), gb(g:numel() * (g:dtype() == "f32" and 4 or 2)), gb(c and c:numel() * 2 or 0),
    gb(v:numel() * (st.trainer.optimizer_state == "bf16" and 4 or 8))))
  print(string.format("# GB in use: before the forward %.2f, after it %.2f (peak during it %.2f); peak during the backward %.2f, after it %.2f",
    gb(s0.in_use), gb(s1.in_use), gb(s1.peak), gb(s2.peak), gb(s2.in_use)))
  print(string.format("# GB reserved from the driver (in use + cached): before the forward %.2f, peak during the forward %.2f, during the backward %.2f",
    gb(s0.reserved), gb(s1.peak_reserved), gb(s2.peak_reserved)))
end
