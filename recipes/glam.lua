-- GLaM: MoE in every other layer (dense FFNs between), top-2 gating, GELU experts.
--   ./moelab recipes/glam.lua [max_steps]
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 200

local train, eval = moe.data.corpus{seed = 3, num_bytes = 1000000}:split(0.05)
local model = moe.arch.GLaM{
  vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4,
  num_experts = 16, experts_per_token = 2, expert_intermediate_size = 256, intermediate_size = 512, seed = 1,
}
print(model)
print(string.format("%d of %d layers are MoE", #model:moe_layers(), model.config.num_layers))
local trainer = moe.MoETrainer{model = model, load_balancing = "auxiliary_loss", run_dir = "runs/glam"}
local r = trainer:train{train_data = train, eval_data = eval, batch_size = 16, seq_len = 128,
                        learning_rate = 2e-3, warmup_steps = 20, max_steps = steps}
print(string.format("held-out perplexity %.2f; outputs in runs/glam/", r.eval.perplexity))
