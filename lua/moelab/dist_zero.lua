--- ZeRO stages 1 and 2 for DistributedMoETrainer: the optimizer state (and in
-- stage 2 the reduced gradients) sharded over the world. Separate from
-- distributed.lua because it is one self-contained mechanism: the trainer
-- calls _zero_setup at construction (it wraps the inner trainer's optimizer
-- and, for stage 2, its clipping, and installs its checkpoint load and save),
-- _zero_reduce_scatter from the gradient hook and _zero_with_state around a
-- checkpoint write.
--   require("moelab.dist_zero")(D, dist)
-- adds these methods to the trainer class D (dist: moe.dist).
local core = require "moelab.core"
local trainer_mod = require "moelab.trainer"
local checkpoint = require "moelab.checkpoint"

local D = {}   -- the methods, copied into the trainer class on install
local dist     -- set on install

-- The flat parameter buffer (N elements) is padded to W * S (S = ceil(N / W));
-- rank r owns the elements [r*S, (r+1)*S) (the padding is nobody's). The
-- optimizer (core.adamw with range = {lo, hi}) keeps m and v for its S elements
-- only and steps only the owned elements of each parameter (with its lr scale
-- and decay flag). Stage 1: gradients all-reduced (averaged) as in plain DP.
-- Stage 2: the gradients are reduce-scattered (averaged), each rank keeps its
-- slice (the rest of its gradient buffer is zeroed) and clipping uses the global
-- norm (squared local norms summed over the ranks). After each step the updated
-- slices are all-gathered into every rank's full parameter buffer. The padding
-- and slice buffers live on the flat buffers' device, so a CUDA model's
-- exchanges stay on the GPU (NCCL) rather than going through host memory.
-- Checkpoints keep the single-process layout: m and v are gathered into full
-- exp_avg / exp_avg_sq only while a checkpoint is written (the trainer's saves,
-- every save_every steps and at the end of train() unless save_final = false,
-- run on every rank through save_fn; save_checkpoint, which every rank must
-- call), then dropped, so the full-size copies never outlive the write; a
-- resume slices each rank's part out of the checkpoint straight into its shard.
-- Limits: the gradient buffer stays full-size (stage 2 saves optimizer memory
-- and communication, not gradient memory); a save that only rank 0 makes
-- (visualize_routing's, when the run's checkpoint is not of the current step)
-- cannot gather the state and fails before writing anything.

-- a zeroed 1-d buffer of n elements with buf's dtype and device
local function like(buf, n) return core.zeros({n}, {dtype = buf:dtype(), device = buf:device()}) end

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
      -- a host scalar: f64 on every backend (under NCCL it goes through the host communicator or staging)
      local sq = core.tensor({local_norm * local_norm}, {dtype = "f64"})
      dist.all_reduce(sq, "sum")
      local norm = math.sqrt(sq:to_table()[1])
      trainer_mod.apply_clip(net, self.inner.optimizer, norm, max_norm)
      return norm
    end
  end
  inner.load_fn = function(tr, dir) return self:_zero_load(tr, dir) end
  -- The trainer's own saves gather m and v exactly when they happen (every rank
  -- reaches them at the same steps with the same options), not when a step
  -- guesses one will follow: a skipped last step, a resume with nothing left
  -- to train or save_final = false would make that guess wrong.
  if self.run_dir then
    inner.save_fn = function(tr, dir)
      return self:_zero_with_state(function() if dir then return checkpoint.save_training(tr, dir) end end)
    end
  end
end

-- stage 2: average the gradients into this rank's slice; zero the rest
function D:_zero_reduce_scatter()
  local z = self._zero
  local _, grads = self.model.net:flat_parameters()
  local padded = like(grads, z.S * self.world_size)
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

-- Runs fn (a checkpoint write) with m and v gathered into full-size buffers,
-- which the optimizer's state() hands out meanwhile; freed after, whatever
-- fn did. Collective: every rank calls it, whether it writes or not.
function D:_zero_with_state(fn)
  local zo = self.inner.optimizer
  if not (zo and zo._real) then return fn() end
  local m, v = zo._real:state()
  zo._full = {self:_zero_gather(m), self:_zero_gather(v)}
  local ok, res = pcall(fn)
  for _, t in ipairs(zo._full) do t:free() end
  zo._full = nil
  if not ok then error(res, 0) end
  return res
end

-- resume: each rank copies its slice of the checkpoint's full-size m and v
-- into its shard (the real optimizer stands in while the checkpoint loads)
function D:_zero_load(tr, dir)
  local z, zo = self._zero, tr.optimizer
  local adapt = {tensors = function(tensors) return tensors end}
  function adapt.state(exp_avg, exp_avg_sq, m, v, where)
    if exp_avg:numel() ~= z.N or exp_avg_sq:numel() ~= z.N then
      error(where .. ": optimizer state does not match the model", 0)
    end
    if z.own > 0 then
      m:narrow(1, 1, z.own):copy(exp_avg:narrow(1, z.lo + 1, z.own))
      v:narrow(1, 1, z.own):copy(exp_avg_sq:narrow(1, z.lo + 1, z.own))
    end
  end
  tr.optimizer = zo._real
  local ok, err = pcall(checkpoint.load_training, tr, dir, adapt)
  tr.optimizer = zo
  if not ok then error(err, 0) end
end

function D:_zero_optimizer(real)
  local d = self
  local z = self._zero
  local zo = {_real = real}
  function zo.step(o, lr)
    o._real:step(lr)
    -- every rank's updated slice into every rank's full parameter buffer
    local values = d.model.net:flat_parameters()
    local slice = like(values, z.S)
    if z.own > 0 then slice:narrow(1, 1, z.own):copy(values:narrow(1, z.lo + 1, z.own)) end
    values:copy(d:_zero_gather(slice))
    d.model.net:refresh_compute()
  end
  -- full-size m, v (checkpoint layout): only inside _zero_with_state; anywhere
  -- else the state exists only as shards, and zeros in their place would be
  -- written to a checkpoint as if they were the state
  function zo.state(o)
    if not o._full then
      error("DistributedMoETrainer (ZeRO): the optimizer state is sharded over the ranks and a checkpoint needs it "
        .. "gathered, which every rank must take part in: call trainer:save_checkpoint() on every rank", 2)
    end
    return o._full[1], o._full[2]
  end
  -- clipping's factor (trainer.apply_clip): the real step reads its range of the gradients scaled
  function zo.scale_next_step(o, s) o._real:scale_next_step(s) end
  function zo.step_count(o, n)
    if n ~= nil then return o._real:step_count(n) end
    return o._real:step_count()
  end
  return zo
end

return function(class, dist_)
  dist = dist_
  for k, v in pairs(D) do class[k] = v end
end
