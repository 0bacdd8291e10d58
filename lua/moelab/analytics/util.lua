--- Shared helpers of the router analytics (moelab.analytics.*): argument
-- checking that names the function and the argument, resolving "a model"
-- (moe.MoEModel, nn.Model, an MoE layer or a list of MoE layers), reading a
-- layer's last routing, and iterating over the batches of a dataset.
--
-- Conventions used by every analytics module:
--   * expert ids are 0-based (as in the assignment tensors and checkpoints);
--     per-expert arrays are Lua lists where element e + 1 is expert e;
--   * MoE layers are numbered 1..L in model order (the order of
--     model:moe_layers() and model:routing_stats());
--   * token ids are 0-based as in the id tensors.
local core = require "moelab.core"

local U = {}

--- Raises "<fname>: <message>" at the caller of the public function.
function U.fail(fname, fmt, ...)
  error(fname .. ": " .. string.format(fmt, ...), 3)
end

local function describe(v)
  if type(v) == "number" then return tostring(v) end
  if type(v) == "string" then return string.format("%q", v) end
  return type(v)
end
U.describe = describe

--- opts must be nil or a table whose keys are all in `allowed` (a set).
function U.check_opts(fname, opts, allowed, argname)
  argname = argname or "options"
  if opts == nil then return {} end
  if type(opts) ~= "table" then
    error(string.format("%s: %s must be a table, got %s", fname, argname, type(opts)), 3)
  end
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      error(string.format("%s: unknown option '%s' (expected %s)", fname, tostring(k), table.concat(names, ", ")), 3)
    end
  end
  return opts
end

--- An integer option (nil -> default); errors name the option.
function U.opt_int(fname, opts, key, default, lo)
  local v = opts[key]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= math.floor(v) then
    error(string.format("%s: option '%s' must be an integer, got %s", fname, key, describe(v)), 3)
  end
  if lo and v < lo then error(string.format("%s: option '%s' must be >= %d, got %d", fname, key, lo, v), 3) end
  return v
end

--- A number option (nil -> default); errors name the option.
function U.opt_num(fname, opts, key, default, lo)
  local v = opts[key]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= v then
    error(string.format("%s: option '%s' must be a number, got %s", fname, key, describe(v)), 3)
  end
  if lo and v < lo then error(string.format("%s: option '%s' must be >= %g, got %g", fname, key, lo, v), 3) end
  return v
end

--- True for a moelab dataset.
function U.is_dataset(x)
  return type(x) == "userdata" and pcall(function() return x:num_tokens() end) and true or false
end

local function is_layer(x)
  return type(x) == "userdata" and pcall(function() return x:num_params() end) and true or false
end

--- True for an MoE layer (an nn.MoE block, alone or inside a model).
function U.is_moe_layer(x)
  return is_layer(x) and pcall(function() return x:routing_stats() end) and true or false
end

--- True for an nn.Model (the C MoE transformer).
function U.is_net(x)
  return is_layer(x) and pcall(function() return x:config() end) and true or false
end

--- True for a moe.MoEModel (the Lua face, with .net).
function U.is_model(x)
  return type(x) == "table" and U.is_net(rawget(x, "net"))
end

--- Resolves what a monitor or analyzer was given.
-- Returns {model = <MoEModel table or nil>, net = <nn.Model or nil>,
--          layers = {MoE layers}, config = <config table or nil>}.
-- `need_net`: the caller runs forwards over token ids, so a bare layer will not do.
function U.resolve(fname, x, need_net)
  local r = {}
  if U.is_model(x) then
    r.model, r.net = x, x.net
    r.config = x.config or x.net:config()
  elseif U.is_net(x) then
    r.net = x
    r.config = x:config()
  elseif not need_net and U.is_moe_layer(x) then
    r.layers = {x}
  elseif not need_net and type(x) == "table" and #x > 0 then
    for i, l in ipairs(x) do
      if not U.is_moe_layer(l) then
        error(string.format("%s: model[%d] must be an MoE layer (nn.MoE), got %s", fname, i, type(l)), 3)
      end
    end
    r.layers = {}
    for i, l in ipairs(x) do r.layers[i] = l end
  else
    error(string.format("%s: model must be a moe.MoEModel%s, got %s", fname,
      need_net and " or nn.Model" or ", nn.Model, an MoE layer or a list of MoE layers", type(x)), 3)
  end
  if r.net then r.layers = r.net:moe_layers() end
  if #r.layers == 0 then error(fname .. ": the model has no MoE layers", 3) end
  return r
end

--- The elements of a tensor (any shape, any device) as a flat Lua list.
function U.flat(t)
  local n = t:numel()
  if n == 0 then return {} end
  local c = t
  if t:device() ~= "cpu" then c = t:to("cpu") end
  return c:contiguous():view({n}):to_table()
end

--- A token-id tensor's shape as (batch, seq): [B, S] or [S] (one sequence).
function U.check_ids(fname, ids, argname)
  argname = argname or "ids"
  if not core.is_tensor(ids) then
    error(string.format("%s: %s must be an i64 tensor [batch, seq], got %s", fname, argname, type(ids)), 3)
  end
  local shape = ids:shape()
  if ids:dtype() ~= "i64" then
    error(string.format("%s: %s must have dtype i64, got %s", fname, argname, ids:dtype()), 3)
  end
  if #shape == 1 then return ids:view({1, shape[1]}), 1, shape[1] end
  if #shape ~= 2 then
    error(string.format("%s: %s must be [batch, seq] (or [seq]), got %d dims", fname, argname, #shape), 3)
  end
  return ids, shape[1], shape[2]
end

--- Runs the network over ids in evaluation mode (no tape), restoring the
-- training flag afterwards. Returns the logits tensor.
function U.eval_forward(net, ids)
  local was = net:is_training()
  net:train(false)
  local ok, logits = pcall(net.forward, net, ids)
  net:train(was)
  if not ok then error(logits, 0) end
  return logits
end

--- The last routing of an MoE layer regrouped per token:
-- experts[n], weights[n] for n = 1..tokens (the layer's flattened input
-- rows, 1-based), each a list ordered by weight (largest first; ties by
-- expert id). Dropped assignments are absent. Returns experts, weights.
function U.per_token(layer, tokens)
  local tidx, eidx, w = layer:assignments()
  local experts, weights = {}, {}
  for n = 1, tokens do experts[n], weights[n] = {}, {} end
  if not tidx then return experts, weights end
  local t, e, wt = U.flat(tidx), U.flat(eidx), U.flat(w)
  for a = 1, #t do
    local n = t[a] + 1
    local list = experts[n]
    if list then
      list[#list + 1] = e[a]
      weights[n][#weights[n] + 1] = wt[a]
    end
  end
  for n = 1, tokens do
    local ex, ws = experts[n], weights[n]
    if #ex > 1 then
      local order = {}
      for i = 1, #ex do order[i] = i end
      table.sort(order, function(a, b)
        if ws[a] ~= ws[b] then return ws[a] > ws[b] end
        return ex[a] < ex[b]
      end)
      local e2, w2 = {}, {}
      for i, j in ipairs(order) do e2[i], w2[i] = ex[j], ws[j] end
      experts[n], weights[n] = e2, w2
    end
  end
  return experts, weights
end

--- Number of experts of an MoE layer (from its router weight).
function U.num_experts(layer)
  return layer:param("gate.weight"):shape()[1]
end

--- Sampling options shared by the analyzers: where the token batches come from.
U.source_keys = {dataset = true, ids = true, num_samples = true, batch_size = true, seq_len = true, seed = true}

--- Iterates the batches a source option table describes and calls
-- fn(ids, domains_or_nil, batch_index). Either ids = <tensor [B, S]> (one
-- batch) or dataset = <dataset> with num_samples (sequences, default 64),
-- batch_size (default 8), seq_len (default 128), seed (default 0): the
-- dataset's deterministic random windows ds:batch{seed, step}, which carry
-- domain labels.
function U.each_batch(fname, opts, fn)
  if opts.ids ~= nil then
    local ids = U.check_ids(fname, opts.ids, "option 'ids'")
    fn(ids, nil, 1)
    return
  end
  local ds = opts.dataset
  if not U.is_dataset(ds) then
    error(string.format("%s: give dataset = <dataset> or ids = <tensor>, got dataset = %s", fname, type(ds)), 3)
  end
  local n = U.opt_int(fname, opts, "num_samples", 64, 1)
  local bs = U.opt_int(fname, opts, "batch_size", 8, 1)
  local sl = U.opt_int(fname, opts, "seq_len", 128, 1)
  local seed = U.opt_int(fname, opts, "seed", 0, 0)
  if ds:num_tokens() < sl + 1 then
    error(string.format("%s: the dataset has %d tokens, fewer than seq_len + 1 = %d", fname, ds:num_tokens(), sl + 1), 3)
  end
  local done, step = 0, 0
  while done < n do
    local b = math.min(bs, n - done)
    local ids, _, domains = ds:batch{batch_size = b, seq_len = sl, seed = seed, step = step}
    fn(ids, domains, step + 1)
    done, step = done + b, step + 1
  end
end

--- Sum of a list.
function U.sum(t)
  local s = 0
  for i = 1, #t do s = s + t[i] end
  return s
end

--- Mean of a list (0 for an empty list).
function U.mean(t)
  if #t == 0 then return 0 end
  return U.sum(t) / #t
end

--- Maximum of a list (nil for an empty list).
function U.max(t)
  local m
  for i = 1, #t do if m == nil or t[i] > m then m = t[i] end end
  return m
end

--- A list of n copies of v.
function U.filled(n, v)
  local t = {}
  for i = 1, n do t[i] = v end
  return t
end

return U
