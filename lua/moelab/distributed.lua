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
--
-- The parts: dist_config.lua (the DeepSpeed config, Megatron-style names, the
-- option checks), dist_shard.lua (sharded experts), dist_zero.lua (ZeRO 1 and
-- 2); the last two add their methods to DistributedMoETrainer's class below.
local core = require "moelab.core"
local trainer_mod = require "moelab.trainer"
local model_mod = require "moelab.model"
local checkpoint = require "moelab.checkpoint"
local config = require "moelab.dist_config"

local M = {}
local dist = {}
for k, v in pairs(core.dist) do dist[k] = v end
M.dist = dist

local fail, sorted_keys, is_int, put = config.fail, config.sorted_keys, config.is_int, config.put

--- from_deepspeed(config, world_size): see dist_config.lua.
M.from_deepspeed = config.from_deepspeed

------------------------------------------------------------------ the trainer

-- Megatron-style names -> {where, canonical name} (dist_config.lua)
local megatron = config.megatron
M.megatron_aliases = megatron

local own_keys = {model = true, world_size = true, data_parallel_size = true, expert_parallel_size = true,
                  zero_stage = true, bucket_mb = true, config = true, deepspeed_config = true, timeout = true,
                  global_aux_loss = true, shard_experts = true, expert_parallel_dispatch = true,
                  tensor_model_parallel_size = true, pipeline_model_parallel_size = true,
                  adam_beta1 = true, adam_beta2 = true}

local D = {}
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
--  expert_parallel_dispatch = "auto" | "alltoall" | "allgather" (how tokens reach the experts' ranks
--  in train(): all-to-all of each token to the ranks it chose, or all_gather of every token before
--  routing, overlapped with it, and reduce_scatter back; allgather needs the same tokens per rank in
--  every step (batch_size x seq_len); auto: allgather for expert_parallel_size 2, where nearly every
--  token has a choice on both ranks; Megatron's moe_token_dispatcher_type),
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
  local dispatch = own.expert_parallel_dispatch or "auto"
  if dispatch ~= "auto" and dispatch ~= "alltoall" and dispatch ~= "allgather" then
    fail(f, "expert_parallel_dispatch must be \"auto\", \"alltoall\" or \"allgather\", got %s", tostring(dispatch))
  end
  if dispatch == "auto" then dispatch = ep == 2 and "allgather" or "alltoall" end

  local self = setmetatable({model = model, rank = rank, world_size = world, data_parallel_size = dp,
                             expert_parallel_size = ep, expert_parallel_rank = rank % ep,
                             data_parallel_rank = math.floor(rank / ep), zero_stage = zs, bucket_mb = bucket_mb,
                             run_dir = topts.run_dir, train_defaults = train_defaults, _micro = 0,
                             expert_parallel_dispatch = ep > 1 and dispatch or nil}, D)
  local user_hook = topts.grad_hook
  if user_hook ~= nil and type(user_hook) ~= "function" then fail(f, "grad_hook must be a function(trainer)") end
  topts.grad_hook = function(tr)
    if zs == 2 then
      self:_zero_reduce_scatter()
    elseif self._sharded then
      -- the non-expert blocks were summed during backward; the rest now, then
      -- wait; then the experts over their replicas
      dist.finish_grad_allreduce(model.net)
      self:_sum_replica_experts()
    elseif world > 1 and self._overlap then
      -- most blocks were queued during backward; the rest now, then wait
      dist.finish_grad_allreduce(model.net)
    elseif world > 1 then
      local _, grads = model.net:flat_parameters()
      dist.all_reduce(grads, "avg", {bucket_mb = bucket_mb})
    end
    if user_hook then user_hook(tr) end
  end
  -- the trainer's saves are collective (sharded experts, ZeRO): every rank must
  -- know whether there is a run_dir, or the ones without it would never join
  if world > 1 then
    local given = core.tensor({topts.run_dir and 1 or 0}, {dtype = "f64"})
    dist.all_reduce(given, "sum")
    local n = given:item()
    if n > 0 and n < world then
      fail(f, "run_dir was given on %d of the %d ranks: give it on every rank (the checkpoints are written by "
        .. "rank 0, but every rank takes part in saving them)", n, world)
    end
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

-- Runs fn with the per-run distributed switches on: expert parallelism and
-- the global aux loss, which make every MoE forward a collective (and under
-- expert parallelism every backward), so every rank must call it. They are
-- off again after, so the model works in one process between calls. Leaves no
-- gradient all-reduce armed or queued behind (a last step skipped for a
-- non-finite loss never reached the finishing hook).
function D:_with_ep(fn, ...)
  local net = self.model.net
  if self.expert_parallel_size > 1 then dist.set_expert_parallel(net, self._ep_comm or true) end
  if self.global_aux_loss then dist.set_global_aux(net, true) end
  local ok, res = pcall(fn, ...)
  if self.global_aux_loss then dist.set_global_aux(net, false) end
  if self.expert_parallel_size > 1 then dist.set_expert_parallel(net, false) end
  if self._overlap then pcall(dist.arm_grad_allreduce, net, false) end
  -- token exchanges may still be queued on the GPU (NCCL): a collective here
  -- reports a rank lost during them, before results computed from buffers
  -- that were never filled are returned (evaluate has no collective after
  -- its last forward)
  if ok and self.expert_parallel_size > 1 and self.world_size > 1 then
    local bok, berr = pcall(dist.barrier)
    if not bok then ok, res = false, berr end
  end
  return ok, res
end

-- the sharded experts (dist_shard.lua) and ZeRO 1 and 2 (dist_zero.lua)
require("moelab.dist_shard")(D, dist, group_comm)
require("moelab.dist_zero")(D, dist)

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
  -- all_gather dispatch: every forward of this run routes batch_size x seq_len tokens on every rank
  local gather = self.expert_parallel_dispatch == "allgather"
  if gather and o.batch_fn and o.seq_len == nil and o.train_data == nil then
    fail(f, "expert_parallel_dispatch = \"allgather\" with a batch_fn needs seq_len (tokens per rank = batch_size x "
      .. "seq_len in every step), or use \"alltoall\"")
  end
  if gather then dist.set_ep_gather(self.model.net, bs * (o.seq_len or 64)) end
  local ok, res = self:_with_ep(self.inner.train, self.inner, o)
  if gather then dist.set_ep_gather(self.model.net, false) end
  self._accum = nil
  if not ok then error((tostring(res):gsub("MoETrainer:train:", f .. ":", 1)), 2) end
  if W > 1 and self.inner.aux_free then self:_sync_buffers(W - 1) end
  res.world_size = W
  res.data_parallel_size, res.expert_parallel_size = self.data_parallel_size, self.expert_parallel_size
  res.global_batch_size = bs * accum * W
  return res
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
  if self._sharded then
    dir = dir or (self.run_dir and self.run_dir .. "/checkpoint")
    if type(dir) ~= "string" then error("DistributedMoETrainer:save_checkpoint: give a directory (the trainer has no run_dir)", 2) end
    return self:_save_sharded(dir)
  end
  if self._zero then
    return self:_zero_with_state(function() if self.rank == 0 then return self.inner:save_checkpoint(dir) end end)
  end
  if self.rank == 0 then return self.inner:save_checkpoint(dir) end
end
-- runs one process (expert parallelism off), so it needs the whole experts;
-- under ZeRO, a run_dir whose checkpoint is not of the current step makes it
-- save one, which needs the sharded optimizer state: it fails (before writing)
-- unless save_checkpoint() ran on every rank first
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
