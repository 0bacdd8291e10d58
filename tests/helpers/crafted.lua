--- Models whose routing is known exactly, for the analytics specs.
--
-- crafted.model{vocab_size=, num_experts=, experts_per_token=, num_layers=, route = function(token, layer) ... end}
-- builds a small moe.MoEModel in which token id t is sent, in MoE layer l,
-- to the experts route(t, l) returns (a list of k distinct 0-based ids,
-- largest weight first), whatever its context. How: attention outputs and
-- expert outputs are zeroed (o_proj = 0, down_proj = 0), so the residual
-- stream stays the token embedding; embedding row t holds k, k-1, .., 1 in
-- the hidden dims of its layer-1 experts, and each layer's router maps those
-- dims to its own experts with a large gain.
local moe = require "moelab"

local C = {}

function C.model(o)
  local V, E, k, L = o.vocab_size or 16, o.num_experts or 4, o.experts_per_token or 1, o.num_layers or 2
  local H = o.hidden_size or math.max(8, E)
  local m = moe.MoEModel{vocab_size = V, hidden_size = H, num_layers = L, num_heads = 2, num_experts = E,
                         experts_per_token = k, expert_intermediate_size = 4, seed = o.seed or 5,
                         capacity_factor = o.capacity_factor, renormalize = o.renormalize,
                         router = o.router}
  local net = m.net
  local emb = net:param("embed_tokens.weight")
  emb:zero()
  -- layer 1's choices define the embedding; layer l's router permutes them
  local base = {}
  for t = 0, V - 1 do
    base[t] = o.route(t, 1)
    assert(#base[t] == k, "route must give k experts")
    for r, e in ipairs(base[t]) do emb:set(t + 1, e + 1, k - r + 1) end
  end
  for l = 1, L do
    local pre = "layers." .. (l - 1) .. "."
    net:param(pre .. "self_attn.o_proj.weight"):zero()
    net:param(pre .. "mlp.experts.down_proj"):zero()
    local g = net:param(pre .. "mlp.gate.weight")
    g:zero()
    -- dim d (layer-1 expert d) -> the expert route(., l) puts at the same rank:
    -- we require route(t, l) = perm_l(route(t, 1)) for a fixed permutation per layer
    local perm = o.layer_perm and o.layer_perm(l) or nil
    for d = 0, E - 1 do
      local e = perm and perm[d + 1] or d
      g:set(e + 1, d + 1, 3)
    end
  end
  return m
end

return C
