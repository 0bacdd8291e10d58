--- moe.arch: architecture presets over one pre-norm transformer with RoPE,
-- grouped-query attention and RMSNorm. Each takes the usual MoEModel options
-- and fills in what defines the architecture; small defaults suit a CPU.
local model = require "moelab.model"

local arch = {}

local function preset(name, base)
  return function(opts)
    if opts ~= nil and type(opts) ~= "table" then
      error(name .. ": expected a table of options, got " .. type(opts), 2)
    end
    local cfg = {name = name}
    for k, v in pairs(base) do cfg[k] = v end
    for k, v in pairs(opts or {}) do cfg[k] = v end
    -- the original API's name for the capacity factor
    if cfg.expert_capacity_factor then cfg.capacity_factor, cfg.expert_capacity_factor = cfg.expert_capacity_factor, nil end
    local ok, m = pcall(model.MoEModel, cfg)
    if not ok then error((tostring(m):gsub("^MoEModel", name)), 2) end
    return m
  end
end

--- Switch Transformer: top-1, capacity factor, multiplicative jitter, GELU experts.
arch.SwitchTransformer = preset("SwitchTransformer", {
  num_experts = 16, experts_per_token = 1, capacity_factor = 1.25, jitter_noise = 0.1,
  renormalize = false, activation = "gelu", hidden_size = 256, num_layers = 4,
})

--- Mixtral: top-2 of 8, renormalized, SwiGLU experts, grouped-query attention.
arch.Mixtral = preset("Mixtral", {
  num_experts = 8, experts_per_token = 2, renormalize = true, activation = "swiglu",
  hidden_size = 256, num_layers = 4, num_heads = 8, num_kv_heads = 2, rope_theta = 1e6,
})

--- GLaM: MoE every other layer, top-2, GELU.
arch.GLaM = preset("GLaM", {
  num_experts = 16, experts_per_token = 2, moe_layer_frequency = 2, activation = "gelu",
  renormalize = true, hidden_size = 256, num_layers = 4,
})

--- OLMoE: many small experts (top-8 of 64), QK-norm, no renormalization.
arch.OLMoE = preset("OLMoE", {
  num_experts = 64, experts_per_token = 8, renormalize = false, qk_norm = true,
  hidden_size = 256, num_layers = 4, expert_intermediate_size = 128, aux_loss_type = "batch",
})

--- DeepSeek (V3 style): shared expert + fine-grained routed experts, sigmoid
-- scores, auxiliary-loss-free bias balancing, the first layer dense.
arch.DeepSeek = preset("DeepSeek", {
  num_experts = 32, experts_per_token = 4, num_shared_experts = 1, router_score = "sigmoid",
  renormalize = true, routed_scaling_factor = 2.5, aux_free = true, aux_free_rate = 1e-3,
  aux_loss_type = "sequence", first_dense_layers = 1, hidden_size = 256, num_layers = 4,
  expert_intermediate_size = 128,
})

--- Custom: expert = function(i) returns a layer built from moe.nn layers
-- (e.g. moe.experts.ExpertPool's factories).
function arch.Custom(opts)
  if type(opts) ~= "table" or type(opts.expert) ~= "function" then
    error("Custom: expected {expert = function(i) return layer end, ...}", 2)
  end
  return preset("Custom", {num_experts = 8, experts_per_token = 2})(opts)
end

return arch
