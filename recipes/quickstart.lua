-- Quickstart: a small Mixtral-style MoE (8 experts, top-2, SwiGLU, GQA, RoPE)
-- trained on the built-in multi-domain corpus, with live progress,
-- evaluation, routing health, a checkpoint and metrics in runs/quickstart/,
-- and a routing report (report.pdf, report.html) of the run.
--   ./moelab recipes/quickstart.lua [max_steps [run_dir]]
local moe = require "moelab"

local max_steps = tonumber(arg and arg[1]) or 400
local run_dir = arg and arg[2] or "runs/quickstart"

-- data: the built-in synthetic corpus (arithmetic, code, records, prose), byte-level
local corpus = moe.data.corpus{seed = 1, num_bytes = 2000000}
local train_data, eval_data = corpus:split(0.05)
print(string.format("data: %s (domains: %s)", tostring(corpus), table.concat(corpus:domains(), ", ")))

local model = moe.arch.Mixtral{
  vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4, num_kv_heads = 2,
  num_experts = 8, experts_per_token = 2, expert_intermediate_size = 256, seed = 42,
  device = moe.default_device(),   -- a GPU when this build has CUDA and one is present
}
print(string.format("model: %s\n       %.2fM parameters, %.2fM active per token",
  tostring(model), model:num_params() / 1e6, model:num_active_params() / 1e6))

local trainer = moe.MoETrainer{
  model = model, load_balancing = "auxiliary_loss", aux_loss_coef = 0.01, router_z_loss_coef = 0.001,
  run_dir = run_dir,
  -- on a GPU: bf16 compute with f32 master weights and optimizer state
  precision = model:device() ~= "cpu" and "bf16" or "f32",
}
local result = trainer:train{
  train_data = train_data, eval_data = eval_data,
  batch_size = 16, seq_len = 128, learning_rate = 2e-3, warmup_steps = 30,
  max_steps = max_steps, eval_every = 100, eval_batches = 8, seed = 1,
}

print(string.format("trained %d steps in %.1f s (%.0f tokens/s); final train loss %.3f",
  result.steps, result.seconds, result.tokens_per_s, result.final_loss))
print(string.format("held-out: loss %.3f, perplexity %.2f", result.eval.loss, result.eval.perplexity))

-- routing health of the last batch, per layer
for i, s in ipairs(model:routing_stats()) do
  local loads = {}
  for j, l in ipairs(s.load) do loads[j] = string.format("%.2f", l) end
  print(string.format("layer %d: load [%s]  max_vio %.2f  entropy %.2f", i, table.concat(loads, " "),
    s.max_vio, s.entropy))
end

-- greedy continuation of a prompt from each domain
model:eval()
for _, prompt in ipairs{"12 + 35 = ", "function add(", "name="} do
  local ids = moe.data.encode(prompt):to_table()
  for _ = 1, 24 do
    local ctx = moe.tensor({ids}, {dtype = "i64"})
    local logits = model:forward(ctx).logits   -- moves ids to the model's device
    local _, idx = logits:select(2, #ids):to("cpu"):to("f32"):topk(1)
    ids[#ids + 1] = idx:get_flat(1)
  end
  print(string.format("sample: %q", moe.data.decode(ids)))
end

trainer:save_model(run_dir .. "/model")

-- the routing report: training curves, expert load, top-1 routing flow, domain
-- specialization, co-activation, affinity, locality, cost and the architecture
-- (`moelab report runs/quickstart` writes the same from the run directory)
local ok, err = pcall(require("moelab.report").build, {run_dir = run_dir, model = model,
  save_to = {run_dir .. "/report.pdf", run_dir .. "/report.html"}})
if not ok then print("report: not written (" .. tostring(err) .. ")") end
print("outputs: " .. run_dir .. "/ (model/ for moe.load, checkpoint/ to resume, metrics.jsonl)" ..
  (ok and ("; routing report: " .. run_dir .. "/report.pdf and report.html") or ""))
