-- Switch Transformer: top-1 routing with a capacity factor (overflow tokens
-- are dropped and ride the residual), multiplicative jitter, auxiliary loss.
--   ./moelab recipes/switch_transformer.lua [max_steps]
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 200

local train, eval = moe.data.corpus{seed = 2, num_bytes = 1000000}:split(0.05)
local model = moe.arch.SwitchTransformer{
  vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4,
  num_experts = 16, expert_capacity_factor = 1.25, jitter_noise = 0.1, expert_intermediate_size = 256, seed = 1,
}
print(model)
local trainer = moe.MoETrainer{model = model, load_balancing = "switch", run_dir = "runs/switch"}
local r = trainer:train{train_data = train, eval_data = eval, batch_size = 16, seq_len = 128,
                        learning_rate = 2e-3, warmup_steps = 20, max_steps = steps}
for i, s in ipairs(model:routing_stats()) do
  print(string.format("layer %d: drop rate %.3f, max_vio %.2f", i, s.drop_rate, s.max_vio))
end
print(string.format("held-out perplexity %.2f; outputs in runs/switch/", r.eval.perplexity))
