--- ZeRO stages 1 and 2 for DistributedMoETrainer: the optimizer state (and in
-- stage 2 the reduced gradients) sharded over the world. Separate from
-- distributed.lua because it is one self-contained mechanism: the trainer
-- calls _zero_setup at construction (it wraps the inner trainer's optimizer
-- and, for stage 2, its clipping), _zero_reduce_scatter from the gradient
-- hook and _zero_gather_state before a checkpoint.
--   require("moelab.dist_zero")(D, dist)
-- adds these methods to the trainer class D (dist: moe.dist).
local core = require "moelab.core"
local trainer_mod = require "moelab.trainer"

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

return function(class, dist_)
  dist = dist_
  for k, v in pairs(D) do class[k] = v end
end
