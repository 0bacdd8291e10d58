--- moe.dist and moe.distributed: collectives, data-parallel and expert-parallel training.
--
-- moe.dist (the C communicators of src/dist): init{backend = "auto"|"single"|"mpi"|"nccl",
-- timeout = seconds, device =}, rank(), world_size(), local_rank(), local_world_size(),
-- backend(), barrier(), all_reduce(t, "sum"|"avg"[, {bucket_mb=}]), broadcast(t, root),
-- all_gather(t) -> {world, ...}, reduce_scatter(t, op) -> first dim / world,
-- all_to_all_v(t, send_rows, recv_rows), set_expert_parallel(layer[, on | comm]) (every MoE
-- layer of the tree computes its share of the experts; see below). "auto" picks MPI when the program was
-- launched by mpirun (or `moelab --nproc N`), else the single-process communicator.
-- Communicator objects: dist.comm(), dist.host_comm() (for CPU tensors under NCCL),
-- dist.split(color[, key]) / comm:split(color[, key]) -> the ranks with the same color,
-- ranked by key (default: rank); collective. Objects have the collectives as methods
-- (comm:all_reduce(t, op), comm:rank(), comm:world_size(), ...).
--
-- moe.distributed.DistributedMoETrainer{model, ...}: data parallel. Every rank
-- holds the whole model (under expert parallelism, see below, only its own
-- experts by default); parameters (and aux-free router biases) are broadcast
-- from rank 0 at the start; each step's gradients are averaged over the ranks
-- (flat gradient buffer, in buckets) before clipping, so every rank takes the
-- same optimizer step.
--
-- Which micro-batches a rank trains on, and the exact single-process equivalent:
-- the trainer asks for micro-batch i (i = (step - 1) * A + micro - 1, with A =
-- gradient_accumulation_steps); rank r of W trains on global micro-batch
-- g = i * W + r. A step of W ranks therefore covers global micro-batches
-- (step - 1) * A * W .. step * A * W - 1, exactly those of ONE process run with
-- gradient_accumulation_steps = A * W and the same batch_size (and the same
-- train_data/seed, or the same batch_fn over global indices): the gradient is
-- the mean over the same micro-batches, the losses reported are the means over
-- all ranks (averaged each micro-batch, so a non-finite loss on any rank skips
-- the step on every rank), and the aux-free bias update uses the last global
-- micro-batch (that of rank W - 1), as the single process does. The results
-- agree to floating-point rounding (summation order differs), not bit for bit.
-- Not covered: routers with noise (noisy_topk, jitter) draw from per-rank noise
-- streams; router statistics and the monitor describe the local micro-batches.
--
-- Expert parallelism (expert_parallel_size = E_p, data_parallel_size = W / E_p):
-- the W ranks form W / E_p expert-parallel groups of E_p consecutive ranks,
-- group g = ranks [g*E_p, (g+1)*E_p) (the Megatron-LM / DeepSpeed convention:
-- expert-parallel peers are neighbours, e.g. on one node, and the replicas of
-- an expert are E_p ranks apart); with E_p = W there is one group, the world.
-- Inside train() and evaluate(), every MoE layer of a rank with group rank q
-- runs experts [q*E/E_p, (q+1)*E/E_p) for the rows its group's ranks route to
-- them (dist.set_expert_parallel with the group's communicator, a
-- dist.split of the world; src/nn/moe_ep.c: an all_to_all of per-expert
-- counts, all_to_all_v of the rows there and back, taped so backward does the
-- opposite exchanges). Each rank still routes and trains on its own
-- micro-batches (sharded by world rank, as in data parallel), so the
-- single-process equivalent is the same (accumulation A * W). The balancing
-- losses and router statistics are computed on the local micro-batch, which is
-- exactly what that single-process run does per micro-batch.
--
-- Sharded experts (shard_experts, the default with E_p > 1 and no ZeRO): at
-- construction, after the broadcast from rank 0, each rank's expert banks keep
-- only its E/E_p experts, so its flat parameter, gradient and AdamW buffers
-- hold the non-expert parameters plus E/E_p experts per MoE layer
-- (trainer:parameter_counts(); a line at the first train() with progress on).
-- Gradients: the non-expert part is averaged over the world; the expert part
-- is summed over the ranks that hold the same experts (same rank % E_p, a
-- dist.split; none when E_p = W) and scaled by 1/W, the same mean the world
-- average of full-size buffers gives; clipping uses the global norm (the
-- non-expert part once plus the expert parts of every shard, summed over the
-- expert-parallel group). Checkpoints keep the single-process layout: the
-- trainer's saves (save_every, the end of train(), with run_dir), save_checkpoint
-- and save_model gather the expert shards over the expert-parallel group
-- (every rank must call the last two; rank 0 writes, to temporary files that are
-- renamed); resume (train{resume=}) slices a single-process checkpoint's
-- experts and AdamW m, v. Between train/evaluate calls the sharded model
-- cannot run in one process: its forward fails with an error saying what to
-- do, as do saving it directly, LoRA on its experts and visualize_routing;
-- trainer:gather_experts() (every rank) restores full-size experts and
-- optimizer state on every rank, and the next train()/evaluate() shards them
-- again. Not supported with sharding: ZeRO (refused when shard_experts = true
-- is given with zero_stage > 0), custom experts and E % E_p ~= 0 (refused for
-- expert parallelism as a whole).
--
-- shard_experts = false keeps full-size expert weights on every rank (only the
-- owned slice is used; the others get zero gradient) and averages the whole
-- flat gradient buffer over the WORLD: an expert's gradient summed over the
-- ranks is the sum of its owners' gradients, one owner per group, each from
-- its group's tokens, i.e. from every rank's tokens, so the average is the
-- exact mean gradient, every rank takes the same step, and rank 0 saves the
-- usual layout alone. ZeRO-1/2 combine with that: they shard the optimizer
-- state (and stage 2 the reduced gradients) over the world, not over the
-- expert- or data-parallel groups. Between train/evaluate calls that model
-- runs in one process.
local core = require "moelab.core"
local trainer_mod = require "moelab.trainer"
local model_mod = require "moelab.model"
local checkpoint = require "moelab.checkpoint"
local mio = require "moelab.io"

local M = {}
local dist = {}
for k, v in pairs(core.dist) do dist[k] = v end
M.dist = dist

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

------------------------------------------------------------------ the trainer

-- Megatron-style names -> {where, canonical name[, convert]}
local megatron = {
  expert_model_parallel_size = {"ctor", "expert_parallel_size"},
  clip_grad = {"trainer", "grad_clip"},
  adam_eps = {"trainer", "eps"},
  micro_batch_size = {"train", "batch_size"},
  seq_length = {"train", "seq_len"},
  train_iters = {"train", "max_steps"},
  lr = {"train", "learning_rate"},
  lr_warmup_iters = {"train", "warmup_steps"},
  lr_decay_style = {"train", "lr_schedule"},
}
M.megatron_aliases = megatron

local own_keys = {model = true, world_size = true, data_parallel_size = true, expert_parallel_size = true,
                  zero_stage = true, bucket_mb = true, config = true, deepspeed_config = true, timeout = true,
                  global_aux_loss = true, shard_experts = true,
                  tensor_model_parallel_size = true, pipeline_model_parallel_size = true,
                  adam_beta1 = true, adam_beta2 = true}

local D = {}
D.__index = D
-- Sub-communicators (expert-parallel groups, their replica groups) by
-- "<parent>/<what>/<ep>". Kept for the program's life and shared by later
-- trainers: freeing a communicator from the garbage collector would happen at
-- different times on different ranks (NCCL's destroy may wait for the peers).
local group_comms = {}

-- The communicator the groups split: the world, or under NCCL the host one for CPU models.
local function parent_comm(model)
  local base = dist.comm()
  if base:backend() == "nccl" and tostring(model:device()):match("^cpu") then base = dist.host_comm() end
  return base
end

-- The ranks with the same color, ranked by world rank (collective: every rank calls it with the same what).
local function group_comm(model, what, ep, color, rank)
  local base = parent_comm(model)
  local key = tostring(base) .. "/" .. what .. "/" .. ep
  group_comms[key] = group_comms[key] or base:split(color, rank)
  return group_comms[key]
end

--- DistributedMoETrainer{model, world_size=, data_parallel_size=, expert_parallel_size = 1 (a divisor of
--  the world size; data_parallel_size = world size / expert_parallel_size),
--  zero_stage = 0, bucket_mb = 25, config = <DeepSpeed JSON path or table>, timeout = seconds,
--  global_aux_loss = false (true: the batch aux loss over every rank's tokens),
--  shard_experts = (expert_parallel_size > 1 and zero_stage == 0) (each rank keeps only its own
--  experts' weights and optimizer state; false: full-size experts on every rank; true with ZeRO: an error),
--  ...MoETrainer options (run_dir and progress apply to rank 0 only), Megatron-style aliases}
function M.DistributedMoETrainer(opts)
  local f = "DistributedMoETrainer"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  local own, topts, train_defaults = {}, {}, {}
  for k, v in pairs(opts) do
    local alias = megatron[k]
    if own_keys[k] then own[k] = v
    elseif alias and alias[1] == "ctor" then put(f, own, alias[2], v, k)
    elseif alias and alias[1] == "trainer" then put(f, topts, alias[2], v, k)
    elseif alias then put(f, train_defaults, alias[2], v, k)
    else put(f, topts, k, v, k) end   -- MoETrainer checks these (and reports unknown ones)
  end
  if own.adam_beta1 or own.adam_beta2 then
    put(f, topts, "betas", {own.adam_beta1 or 0.9, own.adam_beta2 or 0.95}, "adam_beta1/adam_beta2")
  end
  local model = own.model
  if type(model) ~= "table" or not model.net then fail(f, "model must be a moe.MoEModel, got %s", type(model)) end
  for _, k in ipairs{"tensor_model_parallel_size", "pipeline_model_parallel_size"} do
    if own[k] ~= nil and own[k] ~= 1 then fail(f, "%s = %s: only data and expert parallelism exist; it must be 1", k, tostring(own[k])) end
  end
  local cfg = own.config or own.deepspeed_config
  if own.config and own.deepspeed_config then fail(f, "give config or deepspeed_config, not both") end
  if own.timeout ~= nil and (type(own.timeout) ~= "number" or own.timeout <= 0) then fail(f, "timeout must be a positive number of seconds") end
  if not dist.is_initialized() then dist.init(own.timeout and {timeout = own.timeout} or nil) end
  local world, rank = dist.world_size(), dist.rank()

  local ds = cfg and M.from_deepspeed(cfg, world)
  if ds then
    for k, v in pairs(ds.trainer) do put(f, topts, k, v, "the DeepSpeed config's " .. k) end
    for k, v in pairs(ds.train) do put(f, train_defaults, k, v, "the DeepSpeed config's " .. k) end
    if own.zero_stage ~= nil and own.zero_stage ~= ds.zero_stage then
      fail(f, "zero_stage = %s conflicts with the DeepSpeed config's zero_optimization.stage = %d", tostring(own.zero_stage), ds.zero_stage)
    end
    own.zero_stage = ds.zero_stage
    if own.bucket_mb == nil then own.bucket_mb = ds.bucket_mb end
  end

  if own.world_size ~= nil and own.world_size ~= world then
    fail(f, "world_size = %s but this job has %d rank(s) (launch with `mpirun -np %s moelab ...` or `moelab --nproc %s ...`)",
      tostring(own.world_size), world, tostring(own.world_size), tostring(own.world_size))
  end
  local ep = own.expert_parallel_size or 1
  if not is_int(ep) or ep < 1 then fail(f, "expert_parallel_size must be a positive integer, got %s", tostring(ep)) end
  if world % ep ~= 0 then
    fail(f, "expert_parallel_size = %d must divide the world size %d (data_parallel_size = world size / expert_parallel_size)",
      ep, world)
  end
  local dp = own.data_parallel_size or world / ep
  if not is_int(dp) or dp < 1 then fail(f, "data_parallel_size must be a positive integer, got %s", tostring(dp)) end
  if dp * ep ~= world then
    fail(f, "data_parallel_size %s x expert_parallel_size %d must equal the world size %d", tostring(dp), ep, world)
  end
  local zs = own.zero_stage or 0
  if not is_int(zs) or zs < 0 or zs > 3 then fail(f, "zero_stage must be 0, 1 or 2, got %s", tostring(zs)) end
  if zs == 3 then
    fail(f, "zero_stage = 3: ZeRO-3 (sharded parameters) is not implemented; use zero_stage 0, 1 or 2")
  end
  if zs > 0 and (topts.precision == "bf16" or model:precision() ~= "f32") then
    fail(f, "zero_stage = %d with precision = \"bf16\" is not supported yet (ZeRO shards f32 gradients); use zero_stage = 0", zs)
  end
  -- ZeRO (1, 2) with expert parallelism (full-size experts): the gradient reduction
  -- and the state shards stay over the world (see the header), exact with EP x DP too
  if own.shard_experts ~= nil and type(own.shard_experts) ~= "boolean" then fail(f, "shard_experts must be true or false") end
  -- nothing to shard without expert parallelism; by default not under ZeRO,
  -- which does not combine with it (a ZeRO run keeps full-size experts)
  local shard = ep > 1 and own.shard_experts ~= false and (zs == 0 or own.shard_experts == true)
  if shard and zs > 0 then
    fail(f, "zero_stage = %d with sharded experts is not supported (ZeRO shards the flat buffers over the world, "
      .. "whose expert parts differ between the %d expert-parallel ranks); pass shard_experts = false to combine "
      .. "ZeRO with expert parallelism (full-size experts on every rank)", zs, ep)
  end
  local bucket_mb = own.bucket_mb or 25
  if type(bucket_mb) ~= "number" or bucket_mb <= 0 then fail(f, "bucket_mb must be a positive number") end

  local self = setmetatable({model = model, rank = rank, world_size = world, data_parallel_size = dp,
                             expert_parallel_size = ep, expert_parallel_rank = rank % ep,
                             data_parallel_rank = math.floor(rank / ep), zero_stage = zs, bucket_mb = bucket_mb,
                             run_dir = topts.run_dir, train_defaults = train_defaults, _micro = 0}, D)
  local user_hook = topts.grad_hook
  if user_hook ~= nil and type(user_hook) ~= "function" then fail(f, "grad_hook must be a function(trainer)") end
  topts.grad_hook = function(tr)
    if zs == 2 then
      self:_zero_reduce_scatter()
    elseif self._sharded then
      self:_reduce_sharded_grads()
    elseif world > 1 and self._overlap then
      -- most blocks were queued during backward; the rest now, then wait
      dist.finish_grad_allreduce(model.net)
    elseif world > 1 then
      local _, grads = model.net:flat_parameters()
      dist.all_reduce(grads, "avg", {bucket_mb = bucket_mb})
    end
    if user_hook then user_hook(tr) end
  end
  if rank ~= 0 then topts.run_dir, topts.progress = nil, false end

  -- the model the inner trainer sees: the same model, with forward averaging the
  -- reported losses over the ranks (and syncing aux-free biases at each step's start)
  local proxy = setmetatable({}, {__index = model})
  proxy.forward = function(_, ids, o)
    if self._accum and world > 1 then
      if self.inner.aux_free and self._micro % self._accum == 0 then self:_sync_buffers(world - 1) end
      self._micro = self._micro + 1
      -- the last micro-batch's backward queues the gradient all-reduce block by block
      if self._overlap then dist.arm_grad_allreduce(model.net, self._micro % self._accum == 0) end
    end
    local out = model:forward(ids, o)
    if self._accum and world > 1 and out.routing then out.routing = self:_global_routing(out.routing) end
    if self._accum and world > 1 and out.loss then
      -- averaged over the ranks when first read (after backward has been queued:
      -- reading them here would make the host wait for the forward); every rank
      -- reads them in the same order, so the collectives pair up
      local loss, aux, z = out.loss, out.aux_loss, out.z_loss
      local t
      local function avg()
        if not t then
          local v = core.tensor({loss:item(), aux:item(), z:item()}, {dtype = "f64"})
          dist.all_reduce(v, "avg")
          t = v:to_table()
        end
        return t
      end
      out.loss = {item = function() return avg()[1] end}
      out.aux_loss = {item = function() return avg()[2] end}
      out.z_loss = {item = function() return avg()[3] end}
    end
    return out
  end
  topts.model = proxy
  local ok, inner = pcall(trainer_mod.MoETrainer, topts)
  if not ok then
    inner = tostring(inner):gsub("^.-MoETrainer: ", f .. ": ", 1)
    error(inner .. (inner:find("unknown option", 1, true) and "; and DistributedMoETrainer's own: "
      .. sorted_keys(own_keys) .. "; Megatron-style aliases: " .. sorted_keys(megatron) or ""), 2)
  end
  self.inner = inner
  if zs > 0 then self:_zero_setup() end
  -- global_aux_loss: the batch auxiliary loss over every rank's tokens (f and P
  -- averaged over the world before aux = E sum f P), so the run equals one
  -- process on the whole global batch; otherwise each rank's micro-batch
  if own.global_aux_loss ~= nil and type(own.global_aux_loss) ~= "boolean" then
    fail(f, "global_aux_loss must be true or false")
  end
  if own.global_aux_loss and model.config.aux_loss_type ~= "batch" then
    fail(f, "global_aux_loss needs the batch auxiliary loss (the model's aux_loss_type is %s)",
      tostring(model.config.aux_loss_type))
  end
  -- switched on around training only (D:_with_ep): the routers' averaging is a collective
  self.global_aux_loss = own.global_aux_loss == true and world > 1
  -- data parallel without ZeRO or expert parallelism: the gradient all-reduce
  -- overlaps backward (queued per block over NCCL; blocking per block elsewhere)
  if world > 1 and zs == 0 and ep == 1 then
    dist.set_grad_allreduce(model.net, true)
    self._overlap = true
  end

  -- every rank starts from rank 0's parameters (and biases)
  if world > 1 then
    local values = model.net:flat_parameters()
    dist.broadcast(values, 0)
    model.net:refresh_compute()   -- bf16 precision: the compute copy follows rank 0's values
    self:_sync_buffers(0)
  end
  if ep > 1 and ep < world then
    -- the expert-parallel group of this rank: consecutive ranks [g*ep, (g+1)*ep), g = floor(rank / ep)
    -- (every rank takes part in the split); CPU models under NCCL use the host communicator
    self._ep_comm = group_comm(model, "ep", ep, math.floor(rank / ep), rank)
  end
  if ep > 1 then
    -- check the model can be split now (custom experts, E % ep); switched on only inside train/evaluate
    dist.set_expert_parallel(model.net, self._ep_comm or true)
    dist.set_expert_parallel(model.net, false)
  end
  if shard then self:_setup_sharding() end
  return self
end

-- Runs fn with expert parallelism switched on (every rank must call it: the
-- MoE layers' forwards and backwards are collectives), and off again after,
-- so the model works in one process between calls.
-- Runs fn with the per-run distributed switches on: expert parallelism and
-- the global aux loss (both make every MoE forward a collective), and leaves
-- no gradient all-reduce armed or queued behind (a last step skipped for a
-- non-finite loss never reached the finishing hook).
function D:_with_ep(fn, ...)
  local net = self.model.net
  if self.expert_parallel_size > 1 then dist.set_expert_parallel(net, self._ep_comm or true) end
  if self.global_aux_loss then dist.set_global_aux(net, true) end
  local ok, res = pcall(fn, ...)
  if self.global_aux_loss then dist.set_global_aux(net, false) end
  if self.expert_parallel_size > 1 then dist.set_expert_parallel(net, false) end
  if self._overlap then pcall(dist.arm_grad_allreduce, net, false) end
  return ok, res
end

------------------------------------------------------------------ sharded experts
-- With expert parallelism (E_p > 1) and shard_experts (the default), rank r's
-- expert banks keep only its group rank q's experts [q*E/E_p, (q+1)*E/E_p)
-- (dist: layer:set_expert_shard, after the initial broadcast, so every rank
-- slices the same weights), and the flat buffers, hence the AdamW state, hold
-- the non-expert parameters plus those E/E_p experts. Two layouts are kept:
-- the single-process one (_full_layout, recorded before slicing) and this
-- rank's (_layout); both list the same parameters in the same order with
-- their flat-buffer offsets, so moving between them is a loop of copies.
--
-- Gradients: the non-expert part is averaged over the world as in data
-- parallel; the expert part is summed over the replicas of the same experts
-- (the ranks with the same rank % E_p, _dp_comm; none when E_p = W) and
-- scaled by 1/W: an expert's gradient is the sum of its owners' gradients,
-- one owner per group, so this is the mean over every rank's tokens, the same
-- value the world average of full-size buffers gives. Clipping takes the
-- global norm: the non-expert part once plus every shard's expert part
-- (summed over the expert-parallel group).
--
-- Checkpoints stay in the single-process layout: saves gather the shards over
-- the expert-parallel group (every rank calls them; rank 0 writes) and resumes
-- slice the owned experts out of a single-process checkpoint (parameters and
-- AdamW m, v). gather_experts() restores full-size experts on every rank (and
-- full-size optimizer state) so the model runs in one process; the next
-- train() or evaluate() shards it again.

local function is_expert(entry) return entry.expert_total ~= nil end

-- [lo, hi) element ranges (0-based) of the flat buffer, expert and not,
-- each parameter's padding included; adjacent ranges of one kind merged.
local function segments(layout, numel)
  local seg = {expert = {}, rest = {}, expert_n = 0, rest_n = 0}
  for i, e in ipairs(layout) do
    local hi = layout[i + 1] and layout[i + 1].offset or numel
    local kind = is_expert(e) and "expert" or "rest"
    local list = seg[kind]
    local last = list[#list]
    if last and last[2] == e.offset then last[2] = hi else list[#list + 1] = {e.offset, hi} end
    seg[kind .. "_n"] = seg[kind .. "_n"] + (hi - e.offset)
  end
  return seg
end

local function like(buf, n) return core.zeros({n}, {dtype = buf:dtype(), device = buf:device()}) end

-- the ranges of buf, one after another in a new buffer of n elements
local function pack(buf, ranges, n)
  local out, pos = like(buf, n), 0
  for _, r in ipairs(ranges) do
    local len = r[2] - r[1]
    out:narrow(1, pos + 1, len):copy(buf:narrow(1, r[1] + 1, len))
    pos = pos + len
  end
  return out
end

local function unpack(packed, ranges, buf)
  local pos = 0
  for _, r in ipairs(ranges) do
    local len = r[2] - r[1]
    buf:narrow(1, r[1] + 1, len):copy(packed:narrow(1, pos + 1, len))
    pos = pos + len
  end
end

local function sum_squares(buf, ranges)
  local sq = 0
  for _, r in ipairs(ranges) do
    local v = buf:narrow(1, r[1] + 1, r[2] - r[1])
    if v:dtype() ~= "f32" then v = v:to("f32") end   -- bf16 gradients: square and sum in f32
    sq = sq + (v * v):sum():item()
  end
  return sq
end

-- a collective over the expert-parallel group (the world when E_p = W)
function D:_ep(name, ...)
  local c = self._ep_comm
  if c then return c[name](c, ...) end
  return dist[name](...)
end

function D:_setup_sharding()
  local net = self.model.net
  local layout = net:param_layout()
  local values = net:flat_parameters()
  for i, p in ipairs(net:parameters()) do layout[i].shape = p.value:shape() end
  local total
  for _, e in ipairs(layout) do if is_expert(e) then total = e.expert_total; break end end
  if not total then fail("DistributedMoETrainer", "shard_experts: the model has no expert bank to shard") end
  local ep, q = self.expert_parallel_size, self.expert_parallel_rank
  self._full_layout, self._full_numel = layout, values:numel()
  self._shard = {first = q * total / ep, count = total / ep, total = total}
  -- the replicas of this rank's experts: the ranks with the same rank % ep (collective split)
  if self.data_parallel_size > 1 then
    self._dp_comm = group_comm(self.model, "dp", ep, q, self.rank)
  end
  local inner = self.inner
  inner.clip_fn = function(n, max_norm) return self:_clip_sharded(n, max_norm) end
  inner.load_fn = function(tr, dir) return self:_load_sharded(tr, dir) end
  -- the trainer's own checkpoints (save_every, end of train) gather on every rank
  if self.run_dir then inner.save_fn = function(_, dir) return self:_save_sharded(dir) end end
  self:_shard_now()
end

-- Slices the full-size experts (and AdamW state, when there is one) down to this rank's.
function D:_shard_now()
  local net, sh, inner = self.model.net, self._shard, self.inner
  local opt = inner.optimizer
  local m_full, v_full, steps
  if opt then
    m_full, v_full = opt:state()
    steps = opt:step_count()
  end
  net:set_expert_shard(sh.first, sh.count)
  self._layout = net:param_layout()
  self._segments = segments(self._layout, net:flat_parameters():numel())
  self._sharded = true
  if opt then
    inner:_make_optimizer(inner.base_lr)
    local m, v = inner.optimizer:state()
    self:_slice_into(m_full, m)
    self:_slice_into(v_full, v)
    inner.optimizer:step_count(steps)
  end
end

-- full: a flat buffer in the single-process layout -> dst, one in this rank's
function D:_slice_into(full, dst)
  for i, e in ipairs(self._layout) do
    local fe = self._full_layout[i]
    local skip = is_expert(e) and e.expert_first * (fe.numel / fe.expert_total) or 0
    dst:narrow(1, e.offset + 1, e.numel):copy(full:narrow(1, fe.offset + skip + 1, e.numel))
  end
end

-- buf: a flat buffer in this rank's layout -> a new one in the single-process
-- layout, the expert parts gathered over the expert-parallel group (collective)
function D:_to_full(buf)
  local full = like(buf, self._full_numel)
  local experts, n = {}, 0
  for i, e in ipairs(self._layout) do
    local fe = self._full_layout[i]
    if is_expert(e) then
      experts[#experts + 1] = {e, fe}
      n = n + e.numel
    else
      full:narrow(1, fe.offset + 1, e.numel):copy(buf:narrow(1, e.offset + 1, e.numel))
    end
  end
  local mine, pos = like(buf, n), 0
  for _, x in ipairs(experts) do
    mine:narrow(1, pos + 1, x[1].numel):copy(buf:narrow(1, x[1].offset + 1, x[1].numel))
    pos = pos + x[1].numel
  end
  -- group rank q holds rows [q*count, (q+1)*count) of each expert weight: its q-th slice
  local all = self:_ep("all_gather", mine)
  for q = 0, self.expert_parallel_size - 1 do
    local row = all:select(1, q + 1)
    pos = 0
    for _, x in ipairs(experts) do
      local len = x[1].numel
      full:narrow(1, x[2].offset + q * len + 1, len):copy(row:narrow(1, pos + 1, len))
      pos = pos + len
    end
  end
  return full
end

function D:_reduce_sharded_grads()
  local _, grads = self.model.net:flat_parameters()
  local seg = self._segments
  local rest = pack(grads, seg.rest, seg.rest_n)
  dist.all_reduce(rest, "avg", {bucket_mb = self.bucket_mb})
  unpack(rest, seg.rest, grads)
  if seg.expert_n > 0 then
    local ex = pack(grads, seg.expert, seg.expert_n)
    if self._dp_comm then self._dp_comm:all_reduce(ex, "sum", {bucket_mb = self.bucket_mb}) end
    unpack(ex * (1 / self.world_size), seg.expert, grads)
  end
end

-- global-norm clipping (core.clip_grad_norm's rule) over the sharded gradients
function D:_clip_sharded(net, max_norm)
  if not self._sharded then return core.clip_grad_norm(net, max_norm) end
  local _, grads = net:flat_parameters()
  local seg = self._segments
  -- on the gradients' device, which the group's communicator moves (f64 where it is the host)
  local dev = grads:device()
  local ex = core.tensor({sum_squares(grads, seg.expert)}, {dtype = dev == "cpu" and "f64" or "f32", device = dev})
  self:_ep("all_reduce", ex, "sum")
  local norm = math.sqrt(sum_squares(grads, seg.rest) + ex:to("cpu"):to_table()[1])
  if norm == norm and norm ~= math.huge and max_norm > 0 and norm > max_norm then
    grads:copy(grads * (max_norm / (norm + 1e-6)))
  end
  return norm
end

-- the model's tensors in the single-process layout ({name, tensor} pairs, as checkpoints list them; collective)
function D:_full_tensors()
  local values = self:_to_full(self.model.net:flat_parameters())
  local list = {}
  for _, fe in ipairs(self._full_layout) do
    list[#list + 1] = {fe.name, values:narrow(1, fe.offset + 1, fe.numel):view(fe.shape)}
  end
  for _, b in ipairs(self.model:buffers()) do list[#list + 1] = {b.name, b.value} end
  return list, values
end

-- a training checkpoint in the single-process layout (every rank calls it; rank 0 writes to dir)
function D:_save_sharded(dir)
  local opt = self.inner.optimizer
  if not opt then
    error("DistributedMoETrainer:save_checkpoint: nothing trained yet (no optimizer state); use save_model", 3)
  end
  local tensors = self:_full_tensors()
  local m, v = opt:state()
  local full = {tensors = tensors, exp_avg = self:_to_full(m), exp_avg_sq = self:_to_full(v)}
  if self.rank == 0 and dir then return checkpoint.save_training(self.inner, dir, full) end
end

-- resume: a single-process checkpoint's experts and AdamW state sliced to this rank's
function D:_load_sharded(tr, dir)
  if not self._sharded then return checkpoint.load_training(tr, dir) end
  local sh = self._shard
  local adapt = {}
  function adapt.tensors(tensors, where)
    for _, fe in ipairs(self._full_layout) do
      local src = tensors[fe.name]
      if src and is_expert(fe) then
        local got = src:shape()
        if #got ~= #fe.shape or got[1] ~= fe.shape[1] then
          error(string.format("%s: tensor %s has shape [%s], the model expects [%s] (the single-process layout)",
            where, fe.name, table.concat(got, ", "), table.concat(fe.shape, ", ")), 0)
        end
        tensors[fe.name] = src:narrow(1, sh.first + 1, sh.count)
      end
    end
    return tensors
  end
  function adapt.state(exp_avg, exp_avg_sq, m, v, where)
    if exp_avg:numel() ~= self._full_numel or exp_avg_sq:numel() ~= self._full_numel then
      error(where .. ": optimizer state does not match the model", 0)
    end
    self:_slice_into(exp_avg, m)
    self:_slice_into(exp_avg_sq, v)
  end
  return checkpoint.load_training(tr, dir, adapt)
end

--- gather_experts(): full-size experts (and AdamW state) on every rank again,
-- so the model runs in one process (forward, generate, save it yourself).
-- Collective: every rank calls it. The next train() or evaluate() shards
-- them again. A no-op when the experts are not sharded.
function D:gather_experts()
  if not self._sharded then return self end
  local net, inner = self.model.net, self.inner
  local opt = inner.optimizer
  local m_full, v_full, steps
  if opt then
    local m, v = opt:state()
    m_full, v_full, steps = self:_to_full(m), self:_to_full(v), opt:step_count()
  end
  local _, values = self:_full_tensors()
  local experts = {}
  for _, fe in ipairs(self._full_layout) do
    if is_expert(fe) then experts[#experts + 1] = values:narrow(1, fe.offset + 1, fe.numel):view(fe.shape) end
  end
  net:set_expert_shard(0, self._shard.total, experts)
  self._sharded = false
  self._layout, self._segments = nil, nil
  if opt then
    inner:_make_optimizer(inner.base_lr)
    local m, v = inner.optimizer:state()
    m:copy(m_full)
    v:copy(v_full)
    inner.optimizer:step_count(steps)
  end
  return self
end

--- parameter_counts() -> {per_rank =, total =, experts_per_rank =, experts_total =, non_expert =, sharded =}:
-- the parameters this rank holds (flat buffer, so also AdamW state) and the whole model's.
function D:parameter_counts()
  local function count(layout)
    local ex, rest = 0, 0
    for _, e in ipairs(layout) do
      if is_expert(e) then ex = ex + e.numel else rest = rest + e.numel end
    end
    return ex, rest
  end
  local here = self.model.net:param_layout()
  local ex, rest = count(here)
  local ex_all = self._full_layout and (count(self._full_layout)) or ex
  return {per_rank = ex + rest, total = ex_all + rest, experts_per_rank = ex, experts_total = ex_all,
          non_expert = rest, sharded = self._sharded == true}
end

------------------------------------------------------------------ ZeRO 1 and 2
-- The flat parameter buffer (N elements) is padded to W * S (S = ceil(N / W));
-- rank r owns the elements [r*S, (r+1)*S) (the padding is nobody's). The
-- optimizer (core.adamw with range = {lo, hi}) keeps m and v for its S elements
-- only and steps only the owned elements of each parameter (with its lr scale
-- and decay flag). Stage 1: gradients all-reduced (averaged) as in plain DP.
-- Stage 2: the gradients are reduce-scattered (averaged), each rank keeps its
-- slice (the rest of its gradient buffer is zeroed) and clipping uses the global
-- norm (squared local norms summed over the ranks). After each step the updated
-- slices are all-gathered into every rank's full parameter buffer. Checkpoints
-- keep the single-process layout: m and v are gathered into full exp_avg /
-- exp_avg_sq (for the saves the trainer makes: every save_every steps and at the
-- end of train(), and in save_checkpoint, which every rank must call), and on
-- resume each rank takes its slice. Limits: the gradient buffer stays full-size
-- (stage 2 saves optimizer memory and communication, not gradient memory); a
-- trainer save after a skipped last step, or visualize_routing's save, sees
-- stale optimizer state.

function D:_zero_setup()
  local W, r = self.world_size, self.rank
  local values = self.model.net:flat_parameters()
  local N = values:numel()
  local S = math.ceil(N / W)
  local lo, hi = r * S, (r + 1) * S
  self._zero = {N = N, S = S, lo = lo, own = math.max(0, math.min(hi, N) - lo)}
  local inner = self.inner
  inner.optimizer_range = {lo, hi}
  local base = trainer_mod.Trainer._make_optimizer
  inner._make_optimizer = function(tr, lr)
    base(tr, lr)
    tr.optimizer = self:_zero_optimizer(tr.optimizer)
  end
  if self.zero_stage == 2 then
    inner.clip_fn = function(net, max_norm)
      local local_norm = core.grad_norm(net)
      local sq = core.tensor({local_norm * local_norm}, {dtype = "f64"})
      dist.all_reduce(sq, "sum")
      local norm = math.sqrt(sq:to_table()[1])
      if norm == norm and norm ~= math.huge and max_norm > 0 and norm > max_norm then
        local _, grads = net:flat_parameters()
        grads:copy(grads * (max_norm / (norm + 1e-6)))
      end
      return norm
    end
  end
end

-- stage 2: average the gradients into this rank's slice; zero the rest
function D:_zero_reduce_scatter()
  local z = self._zero
  local _, grads = self.model.net:flat_parameters()
  local padded = core.zeros({z.S * self.world_size})
  padded:narrow(1, 1, z.N):copy(grads)
  local shard = dist.reduce_scatter(padded, "avg")
  grads:zero()
  if z.own > 0 then grads:narrow(1, z.lo + 1, z.own):copy(shard:narrow(1, 1, z.own)) end
end

-- all_gather of an S-element slice (padded) -> its first N elements, a full buffer
function D:_zero_gather(slice)
  local z = self._zero
  return dist.all_gather(slice):view(-1):narrow(1, 1, z.N):clone()
end

-- gathers m and v into full buffers (collective: every rank calls it)
function D:_zero_gather_state()
  local zo = self.inner.optimizer
  if not zo or not zo._real then return end
  local m, v = zo._real:state()
  zo._full = {self:_zero_gather(m), self:_zero_gather(v)}
  zo._full_step = zo._real:step_count()
end

function D:_zero_optimizer(real)
  local d = self
  local z = self._zero
  local zo = {_real = real}
  function zo.step(o, lr)
    o._real:step(lr)
    -- every rank's updated slice into every rank's full parameter buffer
    local values = d.model.net:flat_parameters()
    local slice = core.zeros({z.S})
    if z.own > 0 then slice:narrow(1, 1, z.own):copy(values:narrow(1, z.lo + 1, z.own)) end
    values:copy(d:_zero_gather(slice))
    d.model.net:refresh_compute()
    -- the trainer saves a checkpoint (rank 0 only) after this step: gather m, v now
    local t = d.inner.train_options or {}
    local s = d.inner.step + 1
    if d.run_dir and ((t.save_every or 0) > 0 and s % t.save_every == 0 or s == t.max_steps) then
      d:_zero_gather_state()
    end
  end
  -- full-size m, v (checkpoint layout): the gathered ones when current, else new
  -- zero buffers a resume fills (then step_count(n) hands each rank its slice)
  function zo.state(o)
    if not (o._full and o._full_step == o._real:step_count()) then
      o._full = {core.zeros({z.N}), core.zeros({z.N})}
      o._full_step = nil
    end
    return o._full[1], o._full[2]
  end
  function zo.step_count(o, n)
    if n ~= nil and o._full then
      local m, v = o._real:state()
      if z.own > 0 then
        m:narrow(1, 1, z.own):copy(o._full[1]:narrow(1, z.lo + 1, z.own))
        v:narrow(1, 1, z.own):copy(o._full[2]:narrow(1, z.lo + 1, z.own))
      end
      o._full = nil
    end
    if n ~= nil then return o._real:step_count(n) end
    return o._real:step_count()
  end
  return zo
end

-- Routing statistics of the global micro-batch (every rank's tokens): counts,
-- tokens, assignments and drops summed over the world, the per-token means
-- (entropy, z, top-1 probability) weighted by tokens, the aux value averaged;
-- then the derived fields (load, max_vio, drop_rate) recomputed. One f64
-- all_reduce per micro-batch.
function D:_global_routing(stats)
  -- layers in index order (pairs() order may differ between ranks)
  local layout = {}
  for i, s in pairs(stats) do if s then layout[#layout + 1] = i end end
  if #layout == 0 then return stats end
  table.sort(layout)
  local flat = {}
  for _, i in ipairs(layout) do
    local s = stats[i]
    for _, c in ipairs(s.counts) do flat[#flat + 1] = c end
    for _, v in ipairs{s.tokens, s.assignments, s.dropped, s.entropy * s.tokens, s.z * s.tokens,
                       s.top1_prob * s.tokens, s.aux} do flat[#flat + 1] = v end
  end
  local g = dist.all_reduce(core.tensor(flat, {dtype = "f64"}), "sum"):to_table()
  local out, k = {}, 0
  for i, s in pairs(stats) do out[i] = s end
  for _, i in ipairs(layout) do
    local s = stats[i]
    local t = {counts = {}}
    for j = 1, #s.counts do k = k + 1; t.counts[j] = math.floor(g[k] + 0.5) end
    t.tokens, t.assignments, t.dropped = g[k + 1], g[k + 2], g[k + 3]
    local n = t.tokens > 0 and t.tokens or 1
    t.entropy, t.z, t.top1_prob, t.aux = g[k + 4] / n, g[k + 5] / n, g[k + 6] / n, g[k + 7] / self.world_size
    k = k + 7
    t.global = true
    out[i] = model_mod.derive_routing_stats(t, i)
  end
  return out
end

function D:_sync_buffers(root)
  for _, b in ipairs(self.model:buffers()) do
    local t = b.value or b
    if core.is_tensor(t) then dist.broadcast(t, root) end
  end
end

local train_aliases = {global_batch_size = true, min_lr = true}

--- train{...}: MoETrainer:train's options (batch_size is per rank), with the
-- DeepSpeed config's values as defaults and Megatron-style aliases
-- (micro_batch_size, global_batch_size, train_iters, lr, min_lr, lr_warmup_iters,
-- lr_decay_style, seq_length). Returns MoETrainer:train's result plus world_size
-- and global_batch_size.
function D:train(opts)
  local f = "DistributedMoETrainer:train"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  local o, extra = {}, {}
  for k, v in pairs(opts) do
    local alias = megatron[k]
    if alias and alias[1] == "train" then put(f, o, alias[2], v, k)
    elseif alias then fail(f, "%s is a trainer option: give it to DistributedMoETrainer{...}", k)
    elseif train_aliases[k] then extra[k] = v
    else put(f, o, k, v, k) end
  end
  for k, v in pairs(self.train_defaults) do
    if o[k] == nil then o[k] = v
    elseif o[k] ~= v then fail(f, "%s = %s conflicts with the DeepSpeed config (%s)", k, tostring(o[k]), tostring(v)) end
  end
  local W, r = self.world_size, self.rank
  local bs, accum = o.batch_size or 8, o.gradient_accumulation_steps or 1
  if extra.global_batch_size ~= nil then
    local g = extra.global_batch_size
    if not is_int(g) or g % (bs * W) ~= 0 then
      fail(f, "global_batch_size %s is not a multiple of batch_size %d x world size %d", tostring(g), bs, W)
    end
    if o.gradient_accumulation_steps ~= nil and o.gradient_accumulation_steps ~= g / (bs * W) then
      fail(f, "global_batch_size %d != batch_size %d x gradient_accumulation_steps %d x world size %d", g, bs, accum, W)
    end
    accum = g / (bs * W)
    o.gradient_accumulation_steps = accum
  end
  if extra.min_lr ~= nil then
    if type(o.learning_rate) ~= "number" or o.learning_rate <= 0 then fail(f, "min_lr needs lr / learning_rate") end
    put(f, o, "min_lr_ratio", extra.min_lr / o.learning_rate, "min_lr")
  end
  if W > 1 then
    local user_fn, data = o.batch_fn, o.train_data
    if user_fn ~= nil and type(user_fn) ~= "function" then fail(f, "batch_fn must be a function(index) returning ids, targets") end
    if user_fn then
      o.batch_fn = function(i) return user_fn(i * W + r) end
    elseif data ~= nil then
      local seq, seed = o.seq_len or 64, o.seed or 0
      local ok = pcall(function() return data:num_tokens() end)
      if not ok then fail(f, "train_data must be a dataset") end
      o.batch_fn = function(i) return data:batch{batch_size = bs, seq_len = seq, seed = seed, step = i * W + r} end
    end
    if o.max_steps == nil and o.num_epochs ~= nil and data ~= nil then
      o.max_steps = math.max(1, math.ceil(o.num_epochs * data:num_tokens() / (bs * (o.seq_len or 64) * accum * W)))
      o.num_epochs = nil
    end
    if o.resume == true then
      if not self.run_dir then fail(f, "resume = true needs the trainer's run_dir") end
      o.resume = self.run_dir .. "/checkpoint"   -- every rank reads rank 0's checkpoint (a shared filesystem)
    end
  end
  self:_reshard()
  if r == 0 and self.inner.progress and self._sharded and not self._announced then
    local c = self:parameter_counts()
    print(string.format("experts sharded over %d expert-parallel ranks: %d of %d parameters on each rank "
      .. "(%d of the %d experts of each MoE layer; AdamW state alike)", self.expert_parallel_size, c.per_rank, c.total,
      self._shard.count, self._shard.total))
    self._announced = true
  end
  self._accum, self._micro = accum, 0
  local ok, res = self:_with_ep(self.inner.train, self.inner, o)
  self._accum = nil
  if not ok then error((tostring(res):gsub("MoETrainer:train:", f .. ":", 1)), 2) end
  if W > 1 and self.inner.aux_free then self:_sync_buffers(W - 1) end
  res.world_size = W
  res.data_parallel_size, res.expert_parallel_size = self.data_parallel_size, self.expert_parallel_size
  res.global_batch_size = bs * accum * W
  return res
end

-- shards the experts again after gather_experts() (every rank runs train/evaluate)
function D:_reshard()
  if self._shard and not self._sharded then self:_shard_now() end
end

function D:evaluate(ds, opts)
  self:_reshard()
  local ok, res = self:_with_ep(self.inner.evaluate, self.inner, ds, opts)
  if not ok then error(res, 2) end
  return res
end
-- with sharded experts every rank must call it (the experts are gathered; rank 0 writes)
function D:save_model(dir)
  if self._sharded then
    if type(dir) ~= "string" then error("save_model: dir must be a path string, got " .. type(dir), 2) end
    local tensors = self:_full_tensors()
    if self.rank == 0 then return checkpoint.save_model(self.model, dir, tensors) end
    return
  end
  if self.rank == 0 then return self.inner:save_model(dir) end
end
-- with ZeRO or sharded experts every rank must call it (m, v and the experts are gathered)
function D:save_checkpoint(dir)
  if self._zero then self:_zero_gather_state() end
  if self._sharded then
    dir = dir or (self.run_dir and self.run_dir .. "/checkpoint")
    if type(dir) ~= "string" then error("DistributedMoETrainer:save_checkpoint: give a directory (the trainer has no run_dir)", 2) end
    return self:_save_sharded(dir)
  end
  if self.rank == 0 then return self.inner:save_checkpoint(dir) end
end
-- runs one process (expert parallelism off), so it needs the whole experts
function D:visualize_routing(opts)
  if self._sharded then
    error("DistributedMoETrainer:visualize_routing: the experts are sharded over the expert-parallel ranks and the "
      .. "report runs the model in one process; call trainer:gather_experts() on every rank first", 2)
  end
  if self.rank == 0 then return self.inner:visualize_routing(opts) end
end
function D:__index(k)
  local m = rawget(D, k)
  if m ~= nil then return m end
  local inner = rawget(self, "inner")
  return inner and inner[k]
end

M.DistributedTrainer = D
return M
