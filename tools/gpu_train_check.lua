-- On a GPU machine (see tools/gpu_check.sh): trains the same small MoE for a
-- few steps on the CPU and on CUDA from the same initial weights and batches,
-- prints both loss curves, then times CUDA training.
--   ./moelab-cuda tools/gpu_train_check.lua [steps] [hidden] [layers]
local moe = require "moelab"
assert(moe.cuda_available(), "no CUDA device")
local steps = tonumber(arg[1]) or 10
local hidden = tonumber(arg[2]) or 128
local layers = tonumber(arg[3]) or 4

local corpus = moe.data.corpus{seed = 1, num_bytes = 2000000}
local function make(device)
  local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = hidden, num_layers = layers, num_heads = 4, num_kv_heads = 2,
                             num_experts = 8, experts_per_token = 2, expert_intermediate_size = 2 * hidden, seed = 42}
  if device ~= "cpu" then m:to(device) end
  return m
end
local function run(device, n, bs, seq)
  local tr = moe.MoETrainer{model = make(device), progress = false}
  local r = tr:train{train_data = corpus, batch_size = bs, seq_len = seq, learning_rate = 2e-3, max_steps = n,
                     lr_schedule = "constant", seed = 1}
  return r
end
local cpu = run("cpu", steps, 16, 128)
local gpu = run("cuda", steps, 16, 128)
print("step  cpu_loss     cuda_loss    rel_diff")
local worst = 0
for s = 1, steps do
  local a, b = cpu.history[s].loss, gpu.history[s].loss
  local d = math.abs(a - b) / math.abs(a)
  worst = math.max(worst, d)
  print(string.format("%4d  %.6f  %.6f  %.2e", s, a, b, d))
end
print(string.format("worst relative loss difference over %d steps: %.2e", steps, worst))
for _, cfg in ipairs{{16, 128}, {32, 512}} do
  local r = run("cuda", 30, cfg[1], cfg[2])
  local rates = {}
  for s = 6, #r.history do rates[#rates + 1] = r.history[s].tokens_per_s end
  table.sort(rates)
  print(string.format("cuda f32 training, hidden %d, %d layers, batch %d x %d: median %.0f tokens/s", hidden, layers,
    cfg[1], cfg[2], rates[math.ceil(#rates / 2)]))
end
