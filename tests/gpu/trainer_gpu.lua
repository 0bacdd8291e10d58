-- GPU check (tests/gpu/run.sh): the trainer's device paths end to end.
--   1. A step whose loss is not finite, in bf16 mixed precision with the update
--      queued behind the device's norm and guard (no gradient hook): the update
--      is skipped on the device (no parameter or moment changes), the run goes
--      on, and the next finite step updates again; with f32 and bf16 moments.
--   2. LoRA fine-tuning over several steps on the GPU: the base weights stay
--      as they were, the adapters move, and the loss curve follows the CPU's.
--   3. Out of memory inside a training step: a clear error, nothing changed,
--      nothing leaked, and the same trainer trains on.
--   4. recompute = "norms" and "norms_qkv" (bf16, the step in a CUDA graph
--      where it captures): the same losses and parameters bit for bit as
--      without, and a lower peak each.
-- Prints TAP. Without a GPU: "1..0 # SKIP no CUDA device".
--   build/cuda/moelab tests/gpu/trainer_gpu.lua
local moe = require "moelab"
local tap = dofile((arg[0]:match("^(.*/)") or "./") .. "tap.lua")
if tap.skip_without_cuda() then return end
local ok = tap.ok

local corpus = moe.data.corpus{seed = 5, num_bytes = 200000}
local function make(device)
  return moe.arch.OLMoE{vocab_size = 256, hidden_size = 64, num_layers = 2, num_heads = 4, num_experts = 8,
                        experts_per_token = 2, expert_intermediate_size = 64, seed = 13, device = device}
end
local host = tap.host

-- 1. a non-finite step, skipped on the device
for _, state in ipairs{"f32", "bf16"} do
  local m = make("cuda")
  local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", optimizer_state = state}
  local w = m.net:param("lm_head.weight")
  local row, before, m_before, same_params, same_moments
  local function batch(i)
    if i == 1 then   -- before step 2: poison one weight row (the loss turns NaN)
      before = host(m.net:flat_parameters())
      m_before = host(tr.optimizer:state())
      row = w:narrow(1, 1, 1):clone()
      w:narrow(1, 1, 1):fill(0 / 0)
      m:refresh()
    elseif i == 2 then   -- before step 3: step 2 changed nothing; restore the row
      w:narrow(1, 1, 1):copy(row)
      m:refresh()
      local now = host(m.net:flat_parameters())
      same_params = (now - before):abs():max():item() == 0
      same_moments = (host(tr.optimizer:state()) - m_before):abs():max():item() == 0
    end
    return corpus:batch{batch_size = 4, seq_len = 32, seed = 1, step = i}
  end
  local res = tr:train{batch_fn = batch, batch_size = 4, seq_len = 32, max_steps = 4, learning_rate = 1e-3,
                       lr_schedule = "constant"}
  local h = res.history or tr.history
  ok(res.skipped_steps == 1 and h[2].skipped and h[3].skipped == nil,
    "cuda bf16, " .. state .. " moments: a NaN loss skips exactly that step's update",
    string.format("skipped %s; step 2 skipped=%s, step 3 skipped=%s", tostring(res.skipped_steps),
                  tostring(h[2].skipped), tostring(h[3].skipped)))
  ok(same_params and same_moments, "cuda bf16, " .. state .. " moments: the skipped step left parameters and moments alone",
    string.format("params %s, moments %s", tostring(same_params), tostring(same_moments)))
  ok(h[3].loss == h[3].loss and h[4].loss == h[4].loss and h[4].grad_norm ~= nil,
    "cuda bf16, " .. state .. " moments: the run goes on with finite steps after it",
    string.format("losses %.4f, %.4f", h[3].loss, h[4].loss))
end

-- 2. LoRA over several steps, GPU against CPU (f32 both: the same arithmetic up to
-- summation order), and in bf16 on the GPU
local function lora_run(device, precision)
  local m = make(device)
  local lora = moe.peft.MoELoRA{base_model = m, r = 4, lora_alpha = 8,
                                target_modules = {"expert_fc1", "expert_fc2", "q_proj", "v_proj"}}
  local base = {}
  for _, p in ipairs(m:parameters()) do
    if not moe.peft.is_lora_param(p.name) then base[p.name] = host(p.value) end
  end
  local tr = moe.MoETrainer{model = m, progress = false, precision = precision, trainable = moe.peft.is_lora_param}
  local res = tr:train{train_data = corpus, batch_size = 4, seq_len = 32, max_steps = 6, learning_rate = 3e-3,
                       lr_schedule = "constant", seed = 2}
  local base_same, moved = true, 0
  for _, p in ipairs(m:parameters()) do
    if base[p.name] then
      if (host(p.value) - base[p.name]):abs():max():item() ~= 0 then base_same = false end
    elseif p.name:match("lora_B$") then
      moved = math.max(moved, host(p.value):abs():max():item())
    end
  end
  assert(#lora:parameters() > 0)
  return res.history or tr.history, base_same, moved
end
local hc = lora_run("cpu", "f32")
local hg, same_g, moved_g = lora_run("cuda", "f32")
local hb, same_b, moved_b = lora_run("cuda", "bf16")
local d, db = 0, 0
for s = 1, 6 do
  d = math.max(d, math.abs(hg[s].loss - hc[s].loss))
  db = math.max(db, math.abs(hb[s].loss - hc[s].loss))
end
ok(same_g and same_b, "LoRA on the GPU (f32 and bf16): the base weights are unchanged after 6 steps")
ok(moved_g > 0 and moved_b > 0, "LoRA on the GPU: the B matrices moved from zero",
  string.format("max |B| f32 %.3g, bf16 %.3g", moved_g, moved_b))
-- step 1 is the base model's loss (B starts at zero); then the adapters move
ok(math.abs(hg[1].loss - hc[1].loss) < 1e-4 and d < 2e-2 and db < 5e-2,
  "LoRA: the GPU's loss curve follows the CPU's over 6 steps",
  string.format("step 1 |diff| %.2g; max |diff| f32 %.2g, bf16 %.2g; final cpu %.4f", math.abs(hg[1].loss - hc[1].loss),
                d, db, hc[6].loss))
ok(hg[6].loss < hg[1].loss, "LoRA on the GPU lowers the loss", string.format("%.4f -> %.4f", hg[1].loss, hg[6].loss))

-- 3. Out of memory inside a training step: the device is filled but for a
-- quarter of what a step takes beyond the model and optimizer. The step fails
-- with the allocator's error (the sizes in it) after its reclaim and retry; the
-- parameters and moments are as before; once the filler is gone and the failed
-- step's tensors collected, the bytes in use are what they were before it, and
-- the same trainer goes on training.
do
  local core = require "moelab.core"
  local m = moe.arch.OLMoE{vocab_size = 256, hidden_size = 256, num_layers = 2, num_heads = 4, num_experts = 8,
                           experts_per_token = 2, expert_intermediate_size = 256, seed = 13, device = "cuda"}
  local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16"}
  local function batch(i) return corpus:batch{batch_size = 16, seq_len = 256, seed = 1, step = i} end
  local run = {batch_fn = batch, batch_size = 16, seq_len = 256, learning_rate = 1e-3, lr_schedule = "constant"}
  local function train_to(steps)
    run.max_steps = steps
    return tr:train(run)
  end
  train_to(1)
  moe.synchronize("cuda")
  collectgarbage(); collectgarbage()
  local s0 = core.cuda_memory_stats(0)
  core.cuda_reset_peak_memory(0)
  train_to(2)
  moe.synchronize("cuda")
  collectgarbage(); collectgarbage()
  local need = core.cuda_memory_stats(0).peak - s0.in_use   -- a step's own bytes
  local params0, moments0 = host(m.net:flat_parameters()), host(tr.optimizer:state())
  -- (reading the values joined the split master; split it again, as the next step does first,
  -- so that the bytes compared below are those of the same form)
  tr.optimizer:prepare()
  local in_use0 = core.cuda_memory_stats(0).in_use
  core.cuda_empty_cache(0)
  -- the driver may not hand out all it reports free: step down until it does
  local free, filler = core.cuda_memory_stats(0).device_free, nil
  local want = free - math.floor(need / 4)
  while not filler and want > free - need / 2 do
    local okf, t = pcall(moe.empty, {want}, {dtype = "u8", device = "cuda"})
    if okf then filler = t else want = want - 8 * 2 ^ 20 end
  end
  assert(filler, "could not fill the device to within half a step of its end")
  local okrun, err = pcall(train_to, 3)
  local msg = tostring(err)
  ok(not okrun and msg:find("out of memory", 1, true) ~= nil and msg:find("bytes", 1, true) ~= nil,
    "cuda: out of memory inside a step is a clear error with the sizes",
    string.format("step needs %.1f MB; %s", need / 1e6, msg:sub(1, 200)))
  filler:free()
  filler = nil
  collectgarbage(); collectgarbage()
  moe.synchronize("cuda")
  local after = core.cuda_memory_stats(0).in_use
  local same = (host(m.net:flat_parameters()) - params0):abs():max():item() == 0 and
               (host(tr.optimizer:state()) - moments0):abs():max():item() == 0
  ok(same, "cuda: the failed step left the parameters and moments alone")
  ok(after == in_use0, "cuda: after the failed step is collected, the bytes in use are as before it",
    string.format("%d before, %d after", in_use0, after))
  local steps0 = tr.step
  local okrun2, res = pcall(train_to, 4)
  local h = okrun2 and (res.history or tr.history)
  ok(okrun2 and tr.step == steps0 + 2 and h[#h].loss == h[#h].loss and
       (host(m.net:flat_parameters()) - params0):abs():max():item() > 0,
    "cuda: the same trainer trains on after the out-of-memory step",
    okrun2 and string.format("steps %d -> %d, last loss %.4f", steps0, tr.step, h[#h].loss) or tostring(res))
end

-- 4. the norms' outputs recomputed in the backward: the same bytes, less memory
do
  local core = require "moelab.core"
  local function run(mode)
    local m = moe.arch.OLMoE{vocab_size = 256, hidden_size = 256, num_layers = 2, num_heads = 4, num_experts = 8,
                             experts_per_token = 2, expert_intermediate_size = 256, seed = 17, device = "cuda"}
    local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", recompute = mode}
    local function batch(i) return corpus:batch{batch_size = 8, seq_len = 256, seed = 2, step = i} end
    local o = {batch_fn = batch, batch_size = 8, seq_len = 256, learning_rate = 1e-3, lr_schedule = "constant",
               max_steps = 2}
    tr:train(o)
    moe.synchronize("cuda")
    collectgarbage(); collectgarbage()
    local in0 = core.cuda_memory_stats(0).in_use
    core.cuda_reset_peak_memory(0)
    o.max_steps = 5
    local res = tr:train(o)
    moe.synchronize("cuda")
    local peak = core.cuda_memory_stats(0).peak - in0
    local losses = {}
    for i, r in ipairs(res.history or tr.history) do losses[i] = r.loss end
    return losses, host(m.net:flat_parameters()), peak
  end
  local l0, p0, peak0 = run("none")
  local prev = peak0
  -- per layer the two norms' outputs and the rotated q and k (norms), then q, k and v
  -- (norms_qkv): 4, then 3 more of 2048 x 256 bf16 (1 MB each)
  for _, c in ipairs({{"norms", 4}, {"norms_qkv", 3}}) do
    local l1, p1, peak1 = run(c[1])
    local same = #l0 == 5 and #l1 == 5
    for i = 1, 5 do same = same and l0[i] == l1[i] end
    ok(same and (p1 - p0):abs():max():item() == 0,
      "cuda bf16, recompute = \"" .. c[1] .. "\": the same losses and parameters bit for bit after 5 steps",
      string.format("losses %s / %s", table.concat(l0, ", "), table.concat(l1, ", ")))
    ok(peak1 <= prev - c[2] * 2 ^ 20, "cuda bf16, recompute = \"" .. c[1] .. "\": the step's peak is lower",
      string.format("%.2f MB before, %.2f MB with", prev / 1e6, peak1 / 1e6))
    prev = peak1
  end
end

tap.done()
