--- moe.finetuning.TaskAdaptiveMoE: task-conditioned routing.
--
--   local tam = moe.finetuning.TaskAdaptiveMoE{base_model = model, num_tasks = 4}
--   tam:adapt_to_task(2, dataset, {steps = 50, learning_rate = 1e-3})
--   local ids = tam:generate({72, 105}, {task = 2, max_new_tokens = 20})
--
-- A task embedding (nn.Embedding(num_tasks, task_embedding_dim), followed by
-- a bias-free Linear to hidden_size when the two differ) is added to the
-- router input of every MoE layer (layer:set_router_input_bias): the routers
-- see x + e_task, the experts still see x. The addition is taped, so the
-- embedding gets gradients. Task ids are 0-based, as token ids are.
-- adapt_to_task trains the task embedding and the routers; the rest of the
-- model stays as it was (bit for bit).
local core = require "moelab.core"

local M = {}
local TAM = {}
TAM.__index = TAM

local function fail(f, fmt, ...) error(f .. ": " .. string.format(fmt, ...), 0) end

local function is_moe_model(m)
  if type(m) ~= "table" or m.net == nil then return false end
  local ok, cfg = pcall(function() return m.net:config() end)
  return ok and type(cfg) == "table"
end

local function pos_int(f, v, what, default)
  if v == nil then v = default end
  if type(v) ~= "number" or v % 1 ~= 0 or v <= 0 then fail(f, "%s must be a positive integer, got %s", what, tostring(v)) end
  return v
end

local keys = {base_model = true, num_tasks = true, task_embedding_dim = true, init_std = true, seed = true}

--- TaskAdaptiveMoE{base_model=, num_tasks=, task_embedding_dim = hidden_size, init_std = 0.02, seed = 0}
function M.TaskAdaptiveMoE(opts)
  local f = "TaskAdaptiveMoE"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  for k in pairs(opts) do
    if not keys[k] then fail(f, "unknown option '%s' (known: base_model, init_std, num_tasks, seed, task_embedding_dim)", tostring(k)) end
  end
  local base = opts.base_model
  if not is_moe_model(base) then fail(f, "base_model must be a moe.MoEModel, got %s", base == nil and "nil" or type(base)) end
  if #base:moe_layers() == 0 then fail(f, "base_model has no MoE layers to condition") end
  local hidden = base.config.hidden_size
  local n = pos_int(f, opts.num_tasks, "num_tasks")
  local dim = pos_int(f, opts.task_embedding_dim, "task_embedding_dim", hidden)
  local std = opts.init_std == nil and 0.02 or opts.init_std
  if type(std) ~= "number" or std < 0 then fail(f, "init_std must be a number >= 0, got %s", tostring(std)) end
  local seed = opts.seed or 0
  local emb = core.nn.Embedding(n, dim, {seed = seed})
  local w = emb:param("weight")
  w:copy(core.randn({n, dim}, {seed = seed + 1, std = std}))
  local net = emb
  if dim ~= hidden then net = core.nn.Sequential(emb, core.nn.Linear(dim, hidden, {bias = false, seed = seed + 2})) end
  if base:device() ~= "cpu" then net:to(base:device()) end
  return setmetatable({base_model = base, num_tasks = n, task_embedding_dim = dim, task_net = net}, TAM)
end

-- task: an id, or a list of ids (one per sequence of the batch) -> i64 [B or 1, 1]
function TAM:_task_ids(task, f)
  local list = type(task) == "table" and task or {task}
  if #list == 0 then fail(f, "task must be a task id or a list of ids") end
  local rows = {}
  for i, t in ipairs(list) do
    if type(t) ~= "number" or t % 1 ~= 0 or t < 0 or t >= self.num_tasks then
      fail(f, "task id %s is out of range (0-based, %d tasks)", tostring(t), self.num_tasks)
    end
    rows[i] = {t}
  end
  local ids = core.tensor(rows, {dtype = "i64"})
  if self.base_model:device() ~= "cpu" then ids = ids:to(self.base_model:device()) end
  return ids
end

--- The router-input bias of a task: [B or 1, 1, hidden] (taped when a tape is given).
function TAM:task_bias(task, tape)
  return self.task_net:forward(self:_task_ids(task, "TaskAdaptiveMoE:task_bias"), tape)
end

-- runs fn with every MoE layer routing on x + bias; always clears the biases
function TAM:_with_bias(bias, fn)
  local layers = self.base_model:moe_layers()
  for _, l in ipairs(layers) do l:set_router_input_bias(bias) end
  local ok, a, b = pcall(fn)
  for _, l in ipairs(layers) do l:set_router_input_bias(nil) end
  if not ok then error(a, 0) end
  return a, b
end

--- forward(ids, {task=, targets=, tape=, aux_loss_coef=, router_z_loss_coef=}): the base
-- model's forward with task-conditioned routing (same result table).
function TAM:forward(ids, opts)
  local f = "TaskAdaptiveMoE:forward"
  if type(opts) ~= "table" or opts.task == nil then fail(f, "options must give task = <id>") end
  local o = {}
  for k, v in pairs(opts) do if k ~= "task" then o[k] = v end end
  o.tape = o.tape or core.Tape()
  local bias = self.task_net:forward(self:_task_ids(opts.task, f), o.tape)
  return self:_with_bias(bias, function() return self.base_model:forward(ids, o) end)
end

--- Router logits per MoE layer for ids under a task (no tape): a list of [tokens, E] tensors.
function TAM:router_logits(ids, task)
  local f = "TaskAdaptiveMoE:router_logits"
  local bias = self.task_net:forward(self:_task_ids(task, f))
  return self:_with_bias(bias, function()
    self.base_model.net:forward(ids:device() == self.base_model:device() and ids or ids:to(self.base_model:device()))
    local out = {}
    for i, l in ipairs(self.base_model:moe_layers()) do out[i] = l:router_logits() end
    return out
  end)
end

function TAM:parameters()
  local out = {}
  for _, p in ipairs(self.task_net:parameters()) do
    out[#out + 1] = {name = "task_embedding." .. p.name, value = p.value, grad = p.grad}
  end
  return out
end

local adapt_keys = {steps = true, learning_rate = true, batch_size = true, seq_len = true, seed = true,
                    aux_loss_coef = true, router_z_loss_coef = true, weight_decay = true, grad_clip = true}

--- adapt_to_task(task_id, dataset, {steps=100, learning_rate=1e-3, batch_size=8, seq_len=64, seed=0,
--  aux_loss_coef=0.01, router_z_loss_coef=0.001, grad_clip=1.0}): trains the task embedding and the
-- routers (AdamW, constant rate) on batches of the dataset; everything else stays frozen.
-- Returns {losses = {...}, final_loss=}.
function TAM:adapt_to_task(task, ds, opts)
  local f = "TaskAdaptiveMoE:adapt_to_task"
  self:_task_ids(task, f)
  if type(task) ~= "number" then fail(f, "task must be one task id") end
  if type(ds) ~= "userdata" or not pcall(function() return ds:num_tokens() end) then
    fail(f, "dataset must be a moe.data dataset, got %s", type(ds))
  end
  opts = opts or {}
  if type(opts) ~= "table" then fail(f, "options must be a table") end
  for k in pairs(opts) do if not adapt_keys[k] then fail(f, "unknown option '%s'", tostring(k)) end end
  local steps = pos_int(f, opts.steps, "steps", 100)
  local lr = opts.learning_rate or 1e-3
  if type(lr) ~= "number" or lr < 0 then fail(f, "learning_rate must be a number >= 0") end
  local bs = pos_int(f, opts.batch_size, "batch_size", 8)
  local seq = pos_int(f, opts.seq_len, "seq_len", 64)
  if ds:vocab_size() > self.base_model.config.vocab_size then
    fail(f, "the dataset's vocabulary (%d) exceeds the model's vocab_size (%d)", ds:vocab_size(), self.base_model.config.vocab_size)
  end
  if ds:num_tokens() <= seq + 1 then fail(f, "the dataset has fewer than seq_len + 1 tokens") end
  local group_of = require("moelab.trainer").group_of
  local net = self.base_model.net
  local scales = {}
  for i, p in ipairs(net:parameters()) do scales[i] = group_of(p.name) == "router" and 1 or 0 end
  local wd = opts.weight_decay or 0
  local clip = opts.grad_clip or 1.0
  local opt_model = core.adamw(net, {beta1 = 0.9, beta2 = 0.95, weight_decay = wd, lr_scale = scales})
  local opt_task = core.adamw(self.task_net, {beta1 = 0.9, beta2 = 0.95, weight_decay = 0})
  local was_training = net:is_training()
  self.base_model:train(true)
  local losses = {}
  local ok, err = pcall(function()
    for step = 1, steps do
      net:zero_grad()
      self.task_net:zero_grad()
      local ids, targets = ds:batch{batch_size = bs, seq_len = seq, seed = opts.seed or 0, step = step - 1}
      local out = self:forward(ids, {task = task, targets = targets, aux_loss_coef = opts.aux_loss_coef or 0.01,
                                     router_z_loss_coef = opts.router_z_loss_coef or 0.001})
      local l = out.loss:item()
      losses[step] = l
      if l == l and l ~= math.huge then
        out.tape:backward(out.total_loss)
        if clip > 0 then
          core.clip_grad_norm(net, clip)
          core.clip_grad_norm(self.task_net, clip)
        end
        opt_model:step(lr)
        opt_task:step(lr)
      end
      out.tape:reset()
    end
  end)
  self.base_model:train(was_training)
  if not ok then error(err, 0) end
  return {losses = losses, final_loss = losses[#losses]}
end

--- generate(prompt_ids, {task=, max_new_tokens=16}): greedy decoding under a task.
-- prompt_ids: a list of 0-based token ids or an i64 tensor [T] / [1, T]. Returns the list of
-- ids (prompt followed by the new tokens).
function TAM:generate(prompt, opts)
  local f = "TaskAdaptiveMoE:generate"
  if type(opts) ~= "table" or opts.task == nil then fail(f, "options must give task = <id>") end
  local n = opts.max_new_tokens == nil and 16 or opts.max_new_tokens
  if type(n) ~= "number" or n % 1 ~= 0 or n < 0 then fail(f, "max_new_tokens must be an integer >= 0") end
  local ids = {}
  if core.is_tensor(prompt) then
    local t = prompt:to_table()
    if type(t[1]) == "table" then
      if #t ~= 1 then fail(f, "prompt tensor must hold one sequence") end
      t = t[1]
    end
    ids = t
  elseif type(prompt) == "table" then
    for i, v in ipairs(prompt) do ids[i] = v end
  else
    fail(f, "prompt_ids must be a list of token ids or a tensor, got %s", type(prompt))
  end
  if #ids == 0 then fail(f, "prompt_ids is empty") end
  local V = self.base_model.config.vocab_size
  for i, v in ipairs(ids) do
    if type(v) ~= "number" or v % 1 ~= 0 or v < 0 or v >= V then
      fail(f, "prompt_ids[%d] = %s is not a token id below vocab_size %d", i, tostring(v), V)
    end
  end
  local net = self.base_model.net
  local dev = self.base_model:device()
  local was_training = net:is_training()
  self.base_model:train(false)
  local bias = self.task_net:forward(self:_task_ids(opts.task, f))
  local ok, err = pcall(function()
    self:_with_bias(bias, function()
      for _ = 1, n do
        local x = core.tensor({ids}, {dtype = "i64"})
        if dev ~= "cpu" then x = x:to(dev) end
        local logits = net:forward(x)
        local last = logits:select(1, 1):select(1, #ids)
        ids[#ids + 1] = last:argmax():item()
      end
    end)
  end)
  self.base_model:train(was_training)
  if not ok then error(err, 0) end
  return ids
end

M.TAM = TAM
return M
