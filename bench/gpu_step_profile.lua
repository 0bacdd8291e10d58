-- Where the time of one training step goes (the model of bench/gpu_step.lua):
-- per phase, the host time to queue it (no sync) and the wall time until the
-- GPU has finished it (sync after the phase). Phases run back to back with a
-- sync between them, so "wall" adds no overlap with the next phase.
--   build/cuda/moelab bench/gpu_step_profile.lua [precision=bf16] [steps=8]
local moe = require "moelab"
local core = require "moelab.core"
local device = moe.cuda_available() and "cuda" or "cpu"
local precision = arg[1] or "bf16"
local steps = tonumber(arg[2]) or 8
local warm = tonumber(arg[3]) or 2
local B, S, V, D, L = 8, 1024, 50304, 1024, 8
if os.getenv("MOELAB_STEP_TINY") then B, S, V, D, L = 2, 64, 512, 64, 2 end

local model = moe.arch.OLMoE{
  vocab_size = V, hidden_size = D, num_layers = L, num_heads = 16, num_experts = 32, experts_per_token = 4,
  expert_intermediate_size = 512, seed = 1, device = device,
}
local trainer = moe.MoETrainer{model = model, precision = precision ~= "f32" and precision or nil, progress = false}
trainer:_make_optimizer(3e-4)
local ids = core.randint and core.randint({B, S + 1}, 0, V) or nil
if not ids then
  local t, rng = {}, 7
  for r = 1, B do
    t[r] = {}
    for c = 1, S + 1 do rng = (rng * 1103515245 + 12345) % 2147483648; t[r][c] = rng % V end
  end
  ids = moe.tensor(t, {dtype = "i64"})
end
local x, y = ids:narrow(2, 1, S):contiguous(), ids:narrow(2, 2, S):contiguous()
local net = model.net
model:train(true)

local phases = {"upload", "forward", "loss read", "backward", "clip", "optimizer"}
local host, wall = {}, {}
for _, p in ipairs(phases) do host[p], wall[p] = 0, 0 end
local function phase(name, fn, count)
  moe.synchronize(device)
  local t0 = moe.clock()
  local r = fn()
  local t1 = moe.clock()
  moe.synchronize(device)
  local t2 = moe.clock()
  if count then host[name] = host[name] + (t1 - t0); wall[name] = wall[name] + (t2 - t0) end
  return r
end

for step = 1, steps + warm do
  local count = step > warm
  net:zero_grad()
  local up = phase("upload", function() return {x:to(device), y:to(device)} end, count)
  local xd, yd = up[1], up[2]
  local out = phase("forward", function()
    return model:forward(xd, {targets = yd, aux_loss_coef = 0.01, router_z_loss_coef = 0})
  end, count)
  phase("loss read", function() return out.loss:item() end, count)
  phase("backward", function() out.tape:backward(out.total_loss) end, count)
  out.tape:reset()
  out.logits:free()
  phase("clip", function() return core.clip_grad_norm(net, 1.0) end, count)
  phase("optimizer", function() trainer.optimizer:step(3e-4) end, count)
end
local th, tw = 0, 0
print(string.format("# %s, %d steps of batch %d x %d (host: time to queue; wall: until the GPU is done)", precision, steps, B, S))
print("phase        host ms   wall ms")
for _, p in ipairs(phases) do
  print(string.format("%-10s %9.2f %9.2f", p, host[p] / steps * 1e3, wall[p] / steps * 1e3))
  th, tw = th + host[p], tw + wall[p]
end
print(string.format("%-10s %9.2f %9.2f  (%.0f tokens/s with syncs between phases)", "total", th / steps * 1e3,
  tw / steps * 1e3, B * S * steps / tw))

-- backward by tape entry: "host" = time to queue each entry's work, "sync" =
-- with a device sync after each entry (its GPU time plus the queueing)
for _, mode in ipairs{"host", "sync"} do
  local tape = moe.Tape():set_profile(mode)
  local n = 3
  for _ = 1, n do
    net:zero_grad()
    local out = model:forward(x:to(device), {targets = y:to(device), aux_loss_coef = 0.01, router_z_loss_coef = 0,
                                             tape = tape})
    moe.synchronize(device)
    out.tape:backward(out.total_loss)
    moe.synchronize(device)
    out.tape:reset()
    out.logits:free()
  end
  print(string.format("# backward by tape entry, %s timing (per step)", mode))
  local tot = 0
  for _, r in ipairs(tape:profile()) do tot = tot + r.ms end
  for i, r in ipairs(tape:profile()) do
    if i <= 14 then print(string.format("  %-26s %6.1f calls %8.2f ms", r.name, r.calls / n, r.ms / n)) end
  end
  print(string.format("  %-26s %15.2f ms", "total", tot / n))
end
