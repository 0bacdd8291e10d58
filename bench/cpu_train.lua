-- Training throughput of moelab on the CPU: a Mixtral-style MoE built with
-- moe.arch.Mixtral, trained with moe.MoETrainer on the built-in corpus.
-- Warmup steps are excluded; tokens/s is the median (and mean) of the
-- per-step rates of the timed steps, as MoETrainer records them (each step:
-- batch, forward, backward, gradient clipping, AdamW).
--
--   ./moelab bench/cpu_train.lua [--steps N] [--warmup N] [--config quickstart|mixtral20m] [--json out.json]
--   ./moelab bench/cpu_train.lua --config C --dump DIR
--
-- --dump DIR saves the initial weights, one batch, and the losses, gradients
-- and gradient norm of one forward/backward on it (DIR/reference.safetensors, .json), then
-- exits: `python bench/torch_moe.py --check DIR` replays it in PyTorch.
--
-- Threads: MOELAB_NUM_THREADS (or ./moelab --threads N). bench/cpu_train.sh
-- runs both configurations against PyTorch (bench/torch_moe.py).
local moe = require "moelab"

local configs = {
  -- exactly recipes/quickstart.lua's model and batch
  quickstart = {
    model = {vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4, num_kv_heads = 2,
             num_experts = 8, experts_per_token = 2, expert_intermediate_size = 256},
    batch_size = 16, seq_len = 128,
  },
  -- ~20M parameters: 6 layers of 8 SwiGLU experts (512 inner) over hidden 256
  mixtral20m = {
    model = {vocab_size = 256, hidden_size = 256, num_layers = 6, num_heads = 8, num_kv_heads = 2,
             num_experts = 8, experts_per_token = 2, expert_intermediate_size = 512},
    batch_size = 8, seq_len = 256,
  },
}

local function usage(msg)
  io.stderr:write("cpu_train.lua: ", msg, "\n",
    "usage: ./moelab bench/cpu_train.lua [--steps N] [--warmup N] [--config quickstart|mixtral20m] [--json out.json]\n")
  os.exit(2)
end

local opts = {steps = 30, warmup = 5, config = "quickstart"}
local args = arg or {}
local i = 1
while i <= #args do
  local a = args[i]
  local v = args[i + 1]
  if a == "--steps" or a == "--warmup" then
    local n = tonumber(v)
    if not n or n % 1 ~= 0 or n < (a == "--steps" and 1 or 0) then usage(a .. " needs a whole number") end
    opts[a:sub(3)] = n
  elseif a == "--config" then
    if not configs[v] then usage("unknown config '" .. tostring(v) .. "'") end
    opts.config = v
  elseif a == "--dump" then
    if not v then usage("--dump needs a directory") end
    opts.dump = v
  elseif a == "--json" then
    if not v then usage("--json needs a path") end
    opts.json = v
  else
    usage("unknown argument '" .. tostring(a) .. "'")
  end
  i = i + 2
end

local cfg = configs[opts.config]
local mopts = {seed = 42}
for k, v in pairs(cfg.model) do mopts[k] = v end
local model = moe.arch.Mixtral(mopts)
local params = model:num_params()

local corpus = moe.data.corpus{seed = 1, num_bytes = 2000000}

if opts.dump then
  local ids, targets = corpus:batch{batch_size = cfg.batch_size, seq_len = cfg.seq_len, seed = 1, step = 0}
  model:train(true)
  model:zero_grad()
  local out = model:forward(ids, {targets = targets, aux_loss_coef = 0.01, router_z_loss_coef = 0.001})
  local ref = {config = opts.config, params = params, loss = out.loss:item(), aux_loss = out.aux_loss:item(),
               z_loss = out.z_loss:item()}
  out.tape:backward(out.total_loss)
  ref.grad_norm = moe.core.clip_grad_norm(model.net, math.huge)
  local list = {{"ids", ids}, {"targets", targets}}
  for _, p in ipairs(model:parameters()) do
    list[#list + 1] = {"p." .. p.name, p.value}
    list[#list + 1] = {"g." .. p.name, p.grad}
  end
  moe.io.mkdir_p(opts.dump)
  moe.io.safetensors.save(opts.dump .. "/reference.safetensors", list)
  model:zero_grad()
  moe.io.write_file_atomic(opts.dump .. "/reference.json", moe.io.json.encode(ref, {indent = true}))
  print(string.format("dumped %s to %s: loss %.6f aux %.6f z %.6f grad_norm %.6f", opts.config, opts.dump,
    ref.loss, ref.aux_loss, ref.z_loss, ref.grad_norm))
  return
end
local trainer = moe.MoETrainer{
  model = model, load_balancing = "auxiliary_loss", aux_loss_coef = 0.01, router_z_loss_coef = 0.001,
  weight_decay = 0.1, betas = {0.9, 0.95}, grad_clip = 1.0, progress = false,
}
local total_steps = opts.warmup + opts.steps
local result = trainer:train{
  train_data = corpus, batch_size = cfg.batch_size, seq_len = cfg.seq_len, learning_rate = 2e-3,
  lr_schedule = "constant", max_steps = total_steps, seed = 1,
}

local rates = {}
for s = opts.warmup + 1, total_steps do rates[#rates + 1] = result.history[s].tokens_per_s end
local sum = 0
for _, r in ipairs(rates) do sum = sum + r end
local mean = sum / #rates
table.sort(rates)
local n = #rates
local median = n % 2 == 1 and rates[(n + 1) / 2] or (rates[n / 2] + rates[n / 2 + 1]) / 2

print(string.format("moelab %s: %s", opts.config, tostring(model)))
print(string.format("params %d (%.2fM), active per token %d", params, params / 1e6, model:num_active_params()))
print(string.format("batch %d x seq %d = %d tokens/step, threads %d, %d warmup + %d timed steps",
  cfg.batch_size, cfg.seq_len, cfg.batch_size * cfg.seq_len, moe.num_threads(), opts.warmup, opts.steps))
print(string.format("loss %.4f -> %.4f", result.history[1].loss, result.final_loss))
print(string.format("tokens/s median %.1f mean %.1f (min %.1f max %.1f)", median, mean, rates[1], rates[n]))

if opts.json then
  local out = {
    impl = "moelab", config = opts.config, params = params, batch_size = cfg.batch_size, seq_len = cfg.seq_len,
    threads = moe.num_threads(), warmup = opts.warmup, steps = opts.steps,
    tokens_per_s_median = median, tokens_per_s_mean = mean, tokens_per_s_min = rates[1], tokens_per_s_max = rates[n],
    first_loss = result.history[1].loss, final_loss = result.final_loss,
  }
  moe.io.write_file_atomic(opts.json, moe.io.json.encode(out, {indent = true}))
end
