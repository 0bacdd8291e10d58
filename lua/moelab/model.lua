--- moe.MoEModel: a decoder-only MoE transformer with a Lua face over the C
-- model (nn.Model). forward returns logits, the language-modelling loss, the
-- balancing losses and per-layer routing statistics in one table.
local core = require "moelab.core"

local M = {}
local Model = {}
Model.__index = Model

local defaults = {
  vocab_size = 256, hidden_size = 256, num_layers = 4, num_experts = 8, experts_per_token = 2,
}

-- Options this module understands on top of nn.Model's (consumed here).
local lua_only = {router = true, load_balancer = true, device = true, expert = true, name = true, precision = true}

local function merge(into, from)
  for k, v in pairs(from or {}) do into[k] = v end
  return into
end

--- moe.MoEModel{hidden_size=, num_experts=, experts_per_token=, num_layers=, vocab_size=, ...}
-- Routing and balancing may also come as objects: router = moe.routing.TopKRouter{...},
-- load_balancer = moe.routing.LoadBalancer{...}; expert = function(i) return layer end
-- builds custom experts from built-in layers.
function M.MoEModel(opts)
  if opts ~= nil and type(opts) ~= "table" then
    error("MoEModel: expected a table of options, got " .. type(opts), 2)
  end
  local cfg = merge(merge({}, defaults), opts)
  if type(cfg.router) == "table" then merge(cfg, cfg.router.options) end
  if type(cfg.load_balancer) == "table" then merge(cfg, cfg.load_balancer.model_options) end
  if type(cfg.router) == "string" then cfg.router_name = cfg.router end
  if cfg.hidden_size and not cfg.num_heads then
    cfg.num_heads = math.max(1, math.floor(cfg.hidden_size / 64))
    while cfg.hidden_size % cfg.num_heads ~= 0 do cfg.num_heads = cfg.num_heads - 1 end
  end
  if cfg.experts_per_token and cfg.num_experts and cfg.experts_per_token > cfg.num_experts then
    error(string.format("MoEModel: experts_per_token (%d) cannot exceed num_experts (%d)",
      cfg.experts_per_token, cfg.num_experts), 2)
  end
  local native = {}
  for k, v in pairs(cfg) do if not lua_only[k] then native[k] = v end end
  if type(cfg.router) == "string" then native.router = cfg.router end
  if cfg.expert ~= nil then
    if type(cfg.expert) ~= "function" then error("MoEModel: expert must be a function(i) returning a layer", 2) end
    -- count MoE layers the way the C model does
    local freq, first = cfg.moe_layer_frequency or 1, cfg.first_dense_layers or 0
    local dense = {}
    for _, i in ipairs(cfg.mlp_only_layers or {}) do dense[i] = true end
    local lists = {}
    for i = 0, cfg.num_layers - 1 do
      if freq > 0 and i >= first and (freq == 1 or i % freq == freq - 1) and not dense[i] then
        local list = {}
        for j = 1, cfg.num_experts do list[j] = cfg.expert(j, #lists + 1) end
        lists[#lists + 1] = list
      end
    end
    native.custom_experts = lists
  end
  local ok, net = pcall(core.nn.Model, native)
  if not ok then error((tostring(net):gsub("^nn%.Model", "MoEModel")), 2) end
  local self = setmetatable({net = net, options = cfg}, Model)
  self.config = net:config()
  self.config.name = cfg.name
  if cfg.device and cfg.device ~= "cpu" then self:to(cfg.device) end
  if cfg.precision and cfg.precision ~= "f32" then self:set_precision(cfg.precision) end
  return self
end

--- forward(ids[, {tape=, targets=, aux_loss_coef=, router_z_loss_coef=, keep_logits=, loss_chunk_rows=,
--  loss_grad=, routing_stats=, recompute=}])
-- -> {logits=, loss=, aux_loss=, z_loss=, total_loss=, routing=}
-- loss is the mean cross-entropy against targets (when given); total_loss
-- adds the balancing losses with their coefficients (on the tape when given).
-- keep_logits = false (training with targets only): no logits are made or
-- returned; the head and the loss go through loss_chunk_rows rows at a time
-- (default: chunks of at most 256 MB of logits), each chunk's loss gradient
-- taken at once (model:forward_loss), so the [tokens, vocab] logits (824 MB
-- in bf16 at 8192 tokens of a 50k vocabulary) never exist; the trainer trains
-- this way. In eval mode it keeps the plain path. loss_grad (with keep_logits =
-- false) promises the upstream gradient the loss will get in the backward
-- (the trainer's 1 / accumulation steps): the head's weight gradient is then
-- added during the forward, with no [vocab, hidden] tensor of its own; a
-- backward with another upstream gradient is refused.
-- routing_stats = false leaves routing nil: statistics a routing left on the
-- device are not read (a forward captured into a CUDA graph must not wait).
-- recompute = "norms" | "norms_qkv" sets the tape's recompute
-- (tape:set_recompute): the RMSNorms' outputs (and with "norms_qkv" the
-- attention's q, k and v projections) are given back after the forward and
-- made again in the backward, the same bytes in less activation memory.
function Model:forward(ids, opts)
  if opts ~= nil and type(opts) ~= "table" then error("MoEModel:forward: options must be a table", 2) end
  opts = opts or {}
  if not core.is_tensor(ids) then
    error("MoEModel:forward: ids must be an i64 tensor [batch, seq], got " .. type(ids), 2)
  end
  -- batches come from the data layer on the cpu: follow the model to its device
  local dev = self.net:device()
  if ids:device() ~= dev then ids = ids:to(dev) end
  local targets = opts.targets
  if targets and targets:device() ~= dev then targets = targets:to(dev) end
  local tape = opts.tape or core.Tape()
  if opts.recompute ~= nil then
    if opts.recompute ~= "none" and opts.recompute ~= "norms" and opts.recompute ~= "norms_qkv" then
      error("MoEModel:forward: recompute must be \"none\", \"norms\" or \"norms_qkv\", got " ..
            tostring(opts.recompute), 2)
    end
    tape:set_recompute(opts.recompute)
  end
  local ignore = opts.ignore_index or -100
  local training = self.net:is_training()
  local out, loss = {}, nil
  if targets and opts.keep_logits == false and training then
    -- no logits at all: the head and the loss go through in chunks of rows, each
    -- chunk's gradient taken at once (model:forward_loss)
    loss = self.net:forward_loss(ids, targets, tape, {ignore_index = ignore, chunk_rows = opts.loss_chunk_rows,
                                                      loss_grad = opts.loss_grad})
  else
    out.logits = self.net:forward(ids, tape)
    -- in eval mode no backward is expected: a GPU that fuses the loss's forward and
    -- backward would otherwise write the [tokens, vocab] gradient for nothing
    if targets then loss = tape:cross_entropy(out.logits, targets, {ignore_index = ignore, grad_in_forward = training}) end
  end
  out.aux_loss, out.z_loss = self.net:balance_losses(tape)
  if opts.routing_stats ~= false then out.routing = self:routing_stats() end
  if loss then
    out.loss = loss
    local total = loss
    local ac, zc = opts.aux_loss_coef or 0, opts.router_z_loss_coef or 0
    if ac ~= 0 then total = tape:add(total, tape:scale(out.aux_loss, ac)) end
    if zc ~= 0 then total = tape:add(total, tape:scale(out.z_loss, zc)) end
    out.total_loss = total
  end
  if opts.keep_logits == false and targets and out.logits then
    -- the tape holds them until its reset; this handle would hold them until a collection
    out.logits:free()
    out.logits = nil
  end
  out.tape = tape
  return out
end

--- Per MoE layer: {tokens, assignments, dropped, counts, entropy, z, top1_prob, aux,
-- load (counts as fractions), max_vio, drop_rate}.
--- Adds the derived fields (load, max_vio, drop_rate, layer) to one layer's
-- statistics {tokens, assignments, dropped, counts, ...}; returns s.
function M.derive_routing_stats(s, layer)
  local total, mx = 0, 0
  for _, c in ipairs(s.counts) do total = total + c; mx = math.max(mx, c) end
  local mean = total / #s.counts
  s.load = {}
  for j, c in ipairs(s.counts) do s.load[j] = total > 0 and c / total or 0 end
  s.max_vio = mean > 0 and mx / mean - 1 or 0
  s.drop_rate = (s.assignments + s.dropped) > 0 and s.dropped / (s.assignments + s.dropped) or 0
  s.layer = layer
  return s
end

function Model:routing_stats()
  local per = {}
  for i, l in ipairs(self.net:moe_layers()) do
    local s = l:routing_stats()
    if s then M.derive_routing_stats(s, i) end
    per[i] = s
  end
  return per
end

function Model:num_params() return self.net:num_params() end
function Model:num_active_params() return self.net:num_active_params() end
function Model:parameters() return self.net:parameters() end
function Model:buffers() return self.net:buffers() end
function Model:moe_layers() return self.net:moe_layers() end

--- set_keep_expert_rows(keep): whether the MoE layers keep their experts'
-- gathered rows [tokens * k, hidden] (and outputs) between the forward and
-- the backward. true: a dispatch and a combine step, as before. false: never
-- (SwiGLU experts' GEMMs gather the rows in their loads and take the combine
-- in; other experts gather the rows again in the backward, which costs a
-- gather a layer). "auto", the default: not kept where the GEMMs gather in
-- their loads (bf16 SwiGLU experts on a GPU, at row counts the own kernel
-- serves: 1.1 GB less over the issue #6 step, and no slower), kept elsewhere.
function Model:set_keep_expert_rows(keep)
  if type(keep) ~= "boolean" and keep ~= "auto" then
    error("MoEModel:set_keep_expert_rows: expected true, false or \"auto\", got " .. tostring(keep), 2)
  end
  for _, l in ipairs(self.net:moe_layers()) do l:set_keep_expert_rows(keep) end
  return self
end
function Model:zero_grad() self.net:zero_grad(); return self end
function Model:train(on) self.net:train(on == nil or on); return self end
function Model:eval() self.net:train(false); return self end
function Model:device() return self.net:device() end
function Model:to(device) self.net:to(device); return self end
--- "bf16": mixed precision (bf16 compute and gradients, f32 master weights; CUDA only); "f32": off.
function Model:set_precision(p) self.net:set_precision(p); return self end
function Model:precision() return self.net:precision() end
--- After writing parameters yourself under bf16 precision: copies them into the bf16 compute copy.
function Model:refresh() self.net:refresh_compute(); return self end
function Model:__tostring() return tostring(self.net) end

--- Auxiliary-loss-free balancing: nudge each MoE layer's expert bias.
function Model:update_router_bias()
  for _, l in ipairs(self.net:moe_layers()) do l:update_bias() end
end

M.Model = Model
return M
