-- The overlapped gradient reduce over lazily zeroed expert gradients, shared
-- by tests/dist/dp_check.lua (MPI, CPU) and tools/gpu_dist_check.lua (NCCL):
--   local res = dofile("tests/dist/lazy_zero.lua")(m, ids_a, ids_b, targets_b)
-- m is an MoEModel (2 or more MoE layers) on this rank's device, ids_a this
-- rank's batch for the aux-only steps, ids_b / targets_b for a full step.
-- A step whose loss is the aux loss alone never runs the last layer's expert
-- bank's backward, so its gradients, marked by zero_grad{lazy = true} and
-- still holding the previous step's values in memory, must be zeroed when the
-- reduce reaches their range, before it averages them. The flat gradients are
-- read raw, through a tensor fetched before (a read through the layer clears
-- marked gradients itself), against this rank's aux-only gradients averaged
-- over the ranks by hand.
-- Returns {got =, want = (flat tables), cleared = elements that held a value
-- and must read zero}.
return function(m, ids_a, ids_b, targets_b)
  local d = moe.dist
  local net = m.net
  m:train(true)
  local function flat(t) return t:to("cpu"):to("f64"):contiguous():view(-1):to_table() end
  local _, gflat = net:flat_parameters()
  local function aux_only()
    local out = m:forward(ids_a)
    out.tape:backward(out.aux_loss)
    out.tape:reset()
  end
  net:zero_grad()
  aux_only()
  local want = flat(d.all_reduce(gflat:clone(), "avg"))
  d.set_grad_allreduce(net, true)
  -- a full step: every expert gradient non-zero in memory
  net:zero_grad{lazy = true}
  d.arm_grad_allreduce(net, true)
  local out = m:forward(ids_b, {targets = targets_b, aux_loss_coef = 0.01, keep_logits = false})
  out.tape:backward(out.total_loss)
  out.tape:reset()
  d.finish_grad_allreduce(net)
  local stale = flat(gflat)
  net:zero_grad{lazy = true}
  d.arm_grad_allreduce(net, true)
  aux_only()
  d.finish_grad_allreduce(net)
  local got = flat(gflat)
  d.set_grad_allreduce(net, false)
  local cleared = 0
  for i = 1, #want do if want[i] == 0 and stale[i] ~= 0 then cleared = cleared + 1 end end
  return {got = got, want = want, cleared = cleared}
end
