--- moe.routing: routers and load balancers as option bundles that MoEModel
-- and MoETrainer understand (the C router does the work).
local routing = {}

local function check(fname, opts)
  if opts ~= nil and type(opts) ~= "table" then
    error(fname .. ": expected a table of options, got " .. type(opts), 3)
  end
  return opts or {}
end

--- TopKRouter{top_k=2, renormalize=true, score="softmax"|"sigmoid", noisy=false, capacity_factor=0}
function routing.TopKRouter(opts)
  opts = check("TopKRouter", opts)
  return {kind = "TopKRouter", options = {
    router = opts.noisy and "noisy_topk" or "topk",
    experts_per_token = opts.top_k or opts.k or 2,
    renormalize = opts.renormalize ~= false,
    router_score = opts.score or "softmax",
    capacity_factor = opts.capacity_factor or 0,
    num_experts = opts.num_experts,
  }}
end

--- ExpertChoice{capacity_factor=1}: each expert takes its top-C tokens.
function routing.ExpertChoice(opts)
  opts = check("ExpertChoice", opts)
  return {kind = "ExpertChoice", options = {
    router = "expert_choice", capacity_factor = opts.capacity_factor or 1,
    experts_per_token = opts.top_k or 2, renormalize = false, num_experts = opts.num_experts,
  }}
end

local methods = {
  auxiliary_loss = {model = {aux_loss_type = "batch"}, aux_loss_coef = 0.01},
  sequence_aux_loss = {model = {aux_loss_type = "sequence"}, aux_loss_coef = 0.001},
  switch = {model = {aux_loss_type = "batch", experts_per_token = 1, capacity_factor = 1.25,
                     renormalize = false}, aux_loss_coef = 0.01},
  base_layers = {model = {router = "sinkhorn", aux_loss_type = "none"}, aux_loss_coef = 0},
  aux_free = {model = {aux_free = true, aux_loss_type = "sequence"}, aux_loss_coef = 0.0001},
  none = {model = {aux_loss_type = "none"}, aux_loss_coef = 0},
}

--- LoadBalancer{method = "auxiliary_loss"|"sequence_aux_loss"|"switch"|"base_layers"|"aux_free"|"none",
--  aux_loss_coef=, bias_update_rate=}
function routing.LoadBalancer(opts)
  opts = check("LoadBalancer", opts)
  local name = opts.method or "auxiliary_loss"
  local m = methods[name]
  if not m then
    local names = {}
    for k in pairs(methods) do names[#names + 1] = k end
    table.sort(names)
    error("LoadBalancer: unknown method '" .. tostring(name) .. "' (expected one of " .. table.concat(names, ", ") .. ")", 2)
  end
  local model = {}
  for k, v in pairs(m.model) do model[k] = v end
  if opts.bias_update_rate then model.aux_free_rate = opts.bias_update_rate end
  return {kind = "LoadBalancer", method = name, model_options = model,
          aux_loss_coef = opts.aux_loss_coef or m.aux_loss_coef}
end

routing.methods = methods
return routing
