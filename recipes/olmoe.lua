-- OLMoE: many small experts (top-8 of 64), QK-norm, no renormalisation of the
-- chosen weights, load-balancing and router z-losses.
--   ./moelab recipes/olmoe.lua [max_steps]
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 200

local train, eval = moe.data.corpus{seed = 4, num_bytes = 1000000}:split(0.05)
local model = moe.arch.OLMoE{
  vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4,
  num_experts = 64, experts_per_token = 8, expert_intermediate_size = 64, seed = 1,
}
print(model)
print(string.format("%.2fM parameters, %.2fM active", model:num_params() / 1e6, model:num_active_params() / 1e6))
local trainer = moe.MoETrainer{model = model, load_balancing = "auxiliary_loss", aux_loss_coef = 0.01,
                               router_z_loss_coef = 0.001, run_dir = "runs/olmoe"}
local r = trainer:train{train_data = train, eval_data = eval, batch_size = 16, seq_len = 128,
                        learning_rate = 2e-3, warmup_steps = 20, max_steps = steps}
for i, s in ipairs(model:routing_stats()) do
  print(string.format("layer %d: max_vio %.2f, mean router entropy %.2f nats", i, s.max_vio, s.entropy))
end
print(string.format("held-out perplexity %.2f; outputs in runs/olmoe/", r.eval.perplexity))
