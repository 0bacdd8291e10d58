-- DeepSeek-V3 style: a shared expert plus fine-grained routed experts,
-- sigmoid router scores, auxiliary-loss-free balancing (a per-expert bias used
-- only for selection, nudged after every step), the first layer dense.
--   ./moelab recipes/deepseek.lua [max_steps]
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 200

local train, eval = moe.data.corpus{seed = 5, num_bytes = 1000000}:split(0.05)
local model = moe.arch.DeepSeek{
  vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4, intermediate_size = 384,
  num_experts = 32, experts_per_token = 4, num_shared_experts = 1, expert_intermediate_size = 64,
  aux_free_rate = 1e-3, seed = 1,
}
print(model)
local trainer = moe.MoETrainer{model = model, load_balancing = "aux_free", run_dir = "runs/deepseek"}
local r = trainer:train{train_data = train, eval_data = eval, batch_size = 16, seq_len = 128,
                        learning_rate = 2e-3, warmup_steps = 20, max_steps = steps}
for i, l in ipairs(model:moe_layers()) do
  local b = l:expert_bias()
  local lo, hi = math.huge, -math.huge
  for j = 1, b:numel() do lo = math.min(lo, b:get_flat(j)); hi = math.max(hi, b:get_flat(j)) end
  print(string.format("MoE layer %d: max_vio %.2f, expert bias in [%.3f, %.3f]", i,
    model:routing_stats()[i].max_vio, lo, hi))
end
print(string.format("held-out perplexity %.2f; outputs in runs/deepseek/", r.eval.perplexity))
