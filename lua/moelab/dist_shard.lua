--- Sharded experts for DistributedMoETrainer (expert parallelism with
-- shard_experts): the two flat-buffer layouts and the copies between them,
-- the gradient reduction and the clipping over shards, checkpoints in the
-- single-process layout, gather_experts and parameter_counts. Separate from
-- distributed.lua because it is one self-contained mechanism: the trainer
-- calls _setup_sharding at construction and _reshard before each run, and
-- the rest hangs off the hooks _setup_sharding installs.
--   require("moelab.dist_shard")(D, dist, group_comm)
-- adds these methods to the trainer class D (dist: moe.dist; group_comm:
-- distributed.lua's (model, what, ep, color, rank) -> sub-communicator).
local core = require "moelab.core"
local ops = core.ops
local trainer_mod = require "moelab.trainer"
local checkpoint = require "moelab.checkpoint"
local fail = require("moelab.dist_config").fail

local D = {}            -- the methods, copied into the trainer class on install
local dist, group_comm  -- set on install

-- With expert parallelism (E_p > 1) and shard_experts (the default), rank r's
-- expert banks keep only its group rank q's experts [q*E/E_p, (q+1)*E/E_p)
-- (dist: layer:set_expert_shard, after the initial broadcast, so every rank
-- slices the same weights), and the flat buffers, hence the AdamW state, hold
-- the non-expert parameters plus those E/E_p experts. Two layouts are kept:
-- the single-process one (_full_layout, recorded before slicing) and this
-- rank's (_layout); both list the same parameters in the same order with
-- their flat-buffer offsets, so moving between them is a loop of copies.
--
-- Gradients: the non-expert part is summed over the world during backward,
-- the expert part summed over the replicas of the same experts after it (the
-- ranks with the same rank % E_p, _dp_comm; none when E_p = W), and 1/W goes
-- into the optimizer step (_set_sum_overlap): an expert's gradient is the sum
-- of its owners' gradients, one owner per group, so this is the mean over
-- every rank's tokens, the value the world average of full-size buffers
-- gives. Clipping takes the global norm: the non-expert part once plus every
-- shard's expert part (summed over the expert-parallel group), computed on
-- the device; its factor goes into the optimizer step too.
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

-- the sum of squares over the ranges, as a 0-dim f32 tensor on buf's device
-- (one pass per range, summed in f64 inside each, nothing read back here)
local function sum_squares(buf, ranges)
  local sq = core.zeros({}, {dtype = "f32", device = buf:device()})
  for _, r in ipairs(ranges) do sq = sq + ops.sumsq(buf:narrow(1, r[1] + 1, r[2] - r[1])) end
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
  self:_set_sum_overlap(true)
  if opt then
    inner:_make_optimizer(inner.base_lr)
    local m, v = inner.optimizer:state()
    self:_slice_into(m_full, m)
    self:_slice_into(v_full, v)
    inner.optimizer:step_count(steps)
  end
end

-- The non-expert gradients are summed over the ranks while backward runs,
-- block by block as in data parallel, with this rank's expert ranges left
-- out (dist.set_grad_allreduce's skip); with replicas (E_p < W) the expert
-- ranges are then summed over them (_sum_replica_experts). Every gradient is
-- then W times the mean gradient (an expert's is the sum of its tokens'
-- contributions from every rank), and the factor 1/W goes into the optimizer
-- step with the clipping factor (_clip_sharded). On while the experts are
-- sharded (always over more than one rank).
function D:_set_sum_overlap(on)
  if on then
    local skip = {}
    for _, r in ipairs(self._segments.expert) do skip[#skip + 1] = {r[1], r[2]} end
    dist.set_grad_allreduce(self.model.net, true, {op = "sum", skip = skip})
  elseif self._overlap then
    dist.set_grad_allreduce(self.model.net, false)
  end
  self._overlap = on or nil
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

-- after a backward with the non-expert blocks summed (_set_sum_overlap): the
-- expert ranges summed over the replicas of the same experts (W times the
-- mean, like the rest)
function D:_sum_replica_experts()
  local seg = self._segments
  if not self._dp_comm or seg.expert_n == 0 then return end
  local _, grads = self.model.net:flat_parameters()
  local ex = pack(grads, seg.expert, seg.expert_n)
  self._dp_comm:all_reduce(ex, "sum", {bucket_mb = self.bucket_mb})
  unpack(ex, seg.expert, grads)
end

-- global-norm clipping (core.clip_grad_norm's rule) over the sharded gradients
function D:_clip_sharded(net, max_norm)
  if not self._sharded then return core.clip_grad_norm(net, max_norm) end
  local _, grads = net:flat_parameters()
  local seg = self._segments
  -- the expert part summed over the expert-parallel group on the gradients'
  -- device (f64 on the host, where the communicator reduces in f64)
  local dev = grads:device()
  local ex = sum_squares(grads, seg.expert)
  if dev == "cpu" then ex = ex:to("f64") end
  self:_ep("all_reduce", ex, "sum")
  local total = ex:to("f32") + sum_squares(grads, seg.rest)
  local norm = math.sqrt(total:to("cpu"):item())
  -- summed gradients (_set_sum_overlap) are W times the mean
  norm = norm / self.world_size
  trainer_mod.apply_clip(net, self.inner.optimizer, norm, max_norm, 1 / self.world_size)
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
  self:_set_sum_overlap(false)
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

-- shards the experts again after gather_experts() (every rank runs train/evaluate)
function D:_reshard()
  if self._shard and not self._sharded then self:_shard_now() end
end

return function(class, dist_, group_comm_)
  dist, group_comm = dist_, group_comm_
  for k, v in pairs(D) do class[k] = v end
end
