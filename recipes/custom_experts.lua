-- Custom experts: each expert is built in Lua from built-in layers (here a
-- two-layer tanh MLP with a LayerNorm); backward comes from the layers.
--   ./moelab recipes/custom_experts.lua [max_steps]
local moe = require "moelab"
local steps = tonumber(arg and arg[1]) or 100

local train, eval = moe.data.corpus{seed = 6, num_bytes = 500000}:split(0.05)
local hidden = 64
local pool = moe.experts.ExpertPool{num_experts = 4, make_expert = function(i)
  return moe.nn.Sequential(moe.nn.LayerNorm(hidden), moe.nn.Linear(hidden, 128, {seed = i}), moe.nn.Tanh(),
                           moe.nn.Linear(128, hidden, {seed = 100 + i}))
end}
local model = moe.arch.Custom{vocab_size = 256, hidden_size = hidden, num_layers = 2, num_heads = 4,
                              num_experts = 4, experts_per_token = 2, expert = pool.factory(), seed = 1}
print(model)
local trainer = moe.MoETrainer{model = model, run_dir = "runs/custom_experts"}
local r = trainer:train{train_data = train, eval_data = eval, batch_size = 8, seq_len = 64,
                        learning_rate = 3e-3, max_steps = steps}
print(string.format("held-out perplexity %.2f; outputs in runs/custom_experts/", r.eval.perplexity))
