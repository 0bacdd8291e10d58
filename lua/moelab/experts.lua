--- moe.experts: building experts from layers.
local core = require "moelab.core"

local experts = {}

--- ExpertPool{num_experts=, make_expert = function(i) return layer end}
-- or ExpertPool{num_experts=, hidden_size=, intermediate_size=, activation="gelu"|"silu"|...}
-- -> a list of num_experts layers, usable as nn.MoE{experts = pool} or as
-- the expert factory of moe.arch.Custom (pool:factory()).
function experts.ExpertPool(opts)
  if type(opts) ~= "table" then error("ExpertPool: expected a table of options, got " .. type(opts), 2) end
  local n = opts.num_experts
  if type(n) ~= "number" or n < 1 or n % 1 ~= 0 then
    error("ExpertPool: num_experts must be a positive integer, got " .. tostring(n), 2)
  end
  local make = opts.make_expert
  if make == nil then
    local h, inner = opts.hidden_size, opts.intermediate_size
    if type(h) ~= "number" or type(inner) ~= "number" then
      error("ExpertPool: give make_expert, or hidden_size and intermediate_size", 2)
    end
    local acts = {gelu = "GELU", silu = "SiLU", relu = "ReLU", tanh = "Tanh", sigmoid = "Sigmoid"}
    local act = acts[opts.activation or "gelu"]
    if not act then error("ExpertPool: unknown activation '" .. tostring(opts.activation) .. "'", 2) end
    make = function()
      return core.nn.Sequential(core.nn.Linear(h, inner, {bias = false}), core.nn[act](),
                                core.nn.Linear(inner, h, {bias = false}))
    end
  elseif type(make) ~= "function" then
    error("ExpertPool: make_expert must be a function(i) returning a layer", 2)
  end
  local pool = {}
  for i = 1, n do
    local layer = make(i)
    if type(layer) ~= "userdata" then error("ExpertPool: make_expert(" .. i .. ") did not return a layer", 2) end
    pool[i] = layer
  end
  --- a factory for arch.Custom that builds fresh experts of the same kind
  function pool.factory() return function(i) return make(i) end end
  return pool
end

return experts
