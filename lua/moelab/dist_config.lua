--- Option parsing for moelab.distributed: the DeepSpeed JSON config
-- (from_deepspeed), the Megatron-style option names and the checks both the
-- constructor and train() use. Separate from distributed.lua because it is
-- pure table work, with no communicator or model in it; distributed.lua
-- re-exports from_deepspeed (and megatron as megatron_aliases).
local mio = require "moelab.io"

local M = {}

local function fail(fname, fmt, ...) error(fname .. ": " .. string.format(fmt, ...), 3) end

local function sorted_keys(t)
  local names = {}
  for k in pairs(t) do names[#names + 1] = tostring(k) end
  table.sort(names)
  return table.concat(names, ", ")
end

local function check_keys(fname, where, t, allowed)
  if type(t) ~= "table" then fail(fname, "%s must be a table, got %s", where, type(t)) end
  for k in pairs(t) do
    if not allowed[k] then
      fail(fname, "%s: unknown or unsupported key '%s' (supported: %s)", where, tostring(k), sorted_keys(allowed))
    end
  end
end

local function is_int(v) return type(v) == "number" and v == v and v % 1 == 0 end

-- Set dst[key] = v, failing when dst already holds a different value (two names for one option).
local function put(fname, dst, key, v, from)
  if v == nil then return end
  local old = dst[key]
  if old ~= nil then
    local same = old == v
    if type(old) == "table" and type(v) == "table" then
      same = #old == #v
      for i = 1, #old do same = same and old[i] == v[i] end
    end
    if not same then fail(fname, "%s conflicts with %s given elsewhere (%s vs %s)", from, key, tostring(v), tostring(old)) end
  end
  dst[key] = v
end

------------------------------------------------------------------ DeepSpeed config

local ds_top = {train_batch_size = true, train_micro_batch_size_per_gpu = true, gradient_accumulation_steps = true,
                zero_optimization = true, bf16 = true, fp16 = true, optimizer = true, scheduler = true,
                gradient_clipping = true, steps_per_print = true}
local ds_zero = {stage = true, reduce_bucket_size = true, contiguous_gradients = true}
local ds_adamw = {lr = true, betas = true, eps = true, weight_decay = true}
local ds_sched = {
  WarmupLR = {warmup_min_lr = true, warmup_max_lr = true, warmup_num_steps = true, warmup_type = true},
  WarmupDecayLR = {warmup_min_lr = true, warmup_max_lr = true, warmup_num_steps = true, warmup_type = true,
                   total_num_steps = true},
  WarmupCosineLR = {warmup_min_ratio = true, warmup_num_steps = true, warmup_type = true, total_num_steps = true,
                    cos_min_ratio = true},
}

--- from_deepspeed(config (table or path to a JSON file), world_size) ->
-- {trainer = {MoETrainer options}, train = {train{} options}, zero_stage =, bucket_mb =}.
-- Every key must be understood: an unknown or unsupported key is an error.
function M.from_deepspeed(cfg, world)
  local f = "DeepSpeed config"
  if type(cfg) == "string" then
    local ok, obj = pcall(function() return mio.json.decode(mio.read_file(cfg)) end)
    if not ok then fail(f, "cannot read %s: %s", cfg, tostring(obj)) end
    cfg = obj
  end
  world = world or 1
  check_keys(f, "top level", cfg, ds_top)
  local tr, tn = {}, {}
  local out = {trainer = tr, train = tn, zero_stage = 0}
  -- batch sizes: train_batch_size = micro * accumulation * world (DeepSpeed's rule)
  local tbs, micro, acc = cfg.train_batch_size, cfg.train_micro_batch_size_per_gpu, cfg.gradient_accumulation_steps
  for k, v in pairs{train_batch_size = tbs, train_micro_batch_size_per_gpu = micro, gradient_accumulation_steps = acc} do
    if not is_int(v) or v < 1 then fail(f, "%s must be a positive integer, got %s", k, tostring(v)) end
  end
  if tbs and micro and acc then
    if micro * acc * world ~= tbs then
      fail(f, "train_batch_size %d != train_micro_batch_size_per_gpu %d x gradient_accumulation_steps %d x world size %d",
        tbs, micro, acc, world)
    end
  elseif tbs and micro then
    if tbs % (micro * world) ~= 0 then fail(f, "train_batch_size %d is not a multiple of micro batch %d x world size %d", tbs, micro, world) end
    acc = tbs / (micro * world)
  elseif tbs and acc then
    if tbs % (acc * world) ~= 0 then fail(f, "train_batch_size %d is not a multiple of gradient_accumulation_steps %d x world size %d", tbs, acc, world) end
    micro = tbs / (acc * world)
  elseif tbs then
    if tbs % world ~= 0 then fail(f, "train_batch_size %d is not a multiple of the world size %d", tbs, world) end
    micro, acc = tbs / world, 1
  elseif micro then
    acc = acc or 1
  elseif acc then
    fail(f, "gradient_accumulation_steps needs train_batch_size or train_micro_batch_size_per_gpu")
  end
  tn.batch_size, tn.gradient_accumulation_steps = micro, acc
  if cfg.zero_optimization ~= nil then
    local z = cfg.zero_optimization
    check_keys(f, "zero_optimization", z, ds_zero)
    if z.stage ~= nil then
      if not is_int(z.stage) or z.stage < 0 or z.stage > 3 then fail(f, "zero_optimization.stage must be 0, 1, 2 or 3, got %s", tostring(z.stage)) end
      out.zero_stage = z.stage
    end
    if z.reduce_bucket_size ~= nil then   -- elements, as DeepSpeed counts it (f32 gradients here)
      if type(z.reduce_bucket_size) ~= "number" or z.reduce_bucket_size <= 0 then fail(f, "zero_optimization.reduce_bucket_size must be a positive number") end
      out.bucket_mb = z.reduce_bucket_size * 4 / 2 ^ 20
    end
    if z.contiguous_gradients == false then
      fail(f, "zero_optimization.contiguous_gradients = false is not supported (gradients always live in one flat buffer)")
    end
  end
  for _, k in ipairs{"bf16", "fp16"} do
    local p = cfg[k]
    if p ~= nil then
      check_keys(f, k, p, {enabled = true})
      if p.enabled ~= nil and p.enabled ~= true and p.enabled ~= false then fail(f, "%s.enabled must be true or false", k) end
      if p.enabled == true and k == "fp16" then
        fail(f, "fp16.enabled = true is not supported (no loss scaling); use bf16.enabled = true")
      end
      -- bf16: mixed precision, bf16 compute and gradients with f32 master weights and state
      if p.enabled == true then tr.precision = "bf16" end
    end
  end
  local lr
  if cfg.optimizer ~= nil then
    local o = cfg.optimizer
    check_keys(f, "optimizer", o, {type = true, params = true})
    if type(o.type) ~= "string" or o.type:lower() ~= "adamw" then
      fail(f, "optimizer.type %s is not supported (only AdamW)", tostring(o.type))
    end
    local p = o.params or {}
    check_keys(f, "optimizer.params", p, ds_adamw)
    lr = p.lr
    if p.betas ~= nil then
      if type(p.betas) ~= "table" or #p.betas ~= 2 then fail(f, "optimizer.params.betas must be [beta1, beta2]") end
      tr.betas = {p.betas[1], p.betas[2]}
    end
    tr.eps, tr.weight_decay = p.eps, p.weight_decay
  end
  if cfg.scheduler ~= nil then
    local s = cfg.scheduler
    check_keys(f, "scheduler", s, {type = true, params = true})
    local allowed = ds_sched[s.type]
    if not allowed then fail(f, "scheduler.type %s is not supported (supported: %s)", tostring(s.type), sorted_keys(ds_sched)) end
    local p = s.params or {}
    check_keys(f, "scheduler.params (" .. s.type .. ")", p, allowed)
    if p.warmup_type ~= "linear" then
      fail(f, "scheduler.params.warmup_type must be \"linear\" (the only warmup moelab has; DeepSpeed's default is \"log\"), got %s",
        tostring(p.warmup_type))
    end
    if (p.warmup_min_lr or 0) ~= 0 or (p.warmup_min_ratio or 0) ~= 0 then
      fail(f, "scheduler warmup must start from 0 (warmup_min_lr / warmup_min_ratio = 0)")
    end
    tn.warmup_steps = p.warmup_num_steps
    if p.warmup_max_lr ~= nil then
      if lr ~= nil and lr ~= p.warmup_max_lr then
        fail(f, "optimizer.params.lr %g and scheduler.params.warmup_max_lr %g disagree", lr, p.warmup_max_lr)
      end
      lr = p.warmup_max_lr
    end
    if s.type == "WarmupLR" then tn.lr_schedule = "constant"
    elseif s.type == "WarmupDecayLR" then tn.lr_schedule, tn.min_lr_ratio = "linear", 0
    else tn.lr_schedule, tn.min_lr_ratio = "cosine", p.cos_min_ratio or 0.0001 end
    tn.max_steps = p.total_num_steps
  end
  tn.learning_rate = lr
  tr.grad_clip = cfg.gradient_clipping
  tr.log_every = cfg.steps_per_print
  return out
end

-- Megatron-style names -> {where: "ctor" | "trainer" | "train", canonical name}
local megatron = {
  expert_model_parallel_size = {"ctor", "expert_parallel_size"},
  moe_token_dispatcher_type = {"ctor", "expert_parallel_dispatch"},
  clip_grad = {"trainer", "grad_clip"},
  adam_eps = {"trainer", "eps"},
  micro_batch_size = {"train", "batch_size"},
  seq_length = {"train", "seq_len"},
  train_iters = {"train", "max_steps"},
  lr = {"train", "learning_rate"},
  lr_warmup_iters = {"train", "warmup_steps"},
  lr_decay_style = {"train", "lr_schedule"},
}

M.megatron = megatron
M.fail, M.sorted_keys, M.check_keys, M.is_int, M.put = fail, sorted_keys, check_keys, is_int, put
return M
