-- Small models the specs share.
local moe = require "moelab"

local M = {}

--- A two-layer OLMoE of hidden 32 (4 heads, 4 experts of 16, top-2); `over`
-- replaces or adds preset options (vocab_size, seed, ...).
function M.tiny_olmoe(over)
  local o = {vocab_size = 301, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 4, experts_per_token = 2,
             expert_intermediate_size = 16, seed = 1}
  for k, v in pairs(over or {}) do o[k] = v end
  return moe.arch.OLMoE(o)
end

return M
