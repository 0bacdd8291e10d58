-- The overlapped gradient reduce over lazily zeroed expert gradients, shared
-- by tests/dist/dp_check.lua (MPI, CPU) and tools/gpu_dist_check.lua (NCCL):
--   local res = dofile("tests/dist/lazy_zero.lua")(m, ids_a, ids_b, targets_b)
-- m is an MoEModel (2 or more MoE layers) on this rank's device, ids_a this
-- rank's batch for the aux-only steps, ids_b / targets_b for a full step.
-- A step whose loss is the aux loss alone never runs the last layer's expert
-- bank's backward, so its gradients, marked by zero_grad{lazy = true} and
-- still holding the previous step's values in memory, must be zeroed when the
-- reduce reaches their range, before it averages them. Gradients are read raw,
-- through tensors fetched before (a read through the layer clears marked
-- gradients itself).
-- Returns {got =, want = (the flat gradients after the aux-only step under the
-- reduce, and this rank's aux-only gradients averaged over the ranks by hand),
-- bank = elements of the last expert bank, stale = how many of them held a
-- value before the aux-only step, left = how many are not zero after it}.
return function(m, ids_a, ids_b, targets_b)
  local d = moe.dist
  local net = m.net
  m:train(true)
  local function flat(t) return t:to("cpu"):to("f64"):contiguous():view(-1):to_table() end
  local _, gflat = net:flat_parameters()
  -- the last MoE layer's expert bank: its gradient tensors, fetched now
  local last, bank = -1, {}
  for _, p in ipairs(net:parameters()) do
    local l = tonumber(p.name:match("^layers%.(%d+)%.mlp%.experts%."))
    if l and l > last then last, bank = l, {} end
    if l and l == last then bank[#bank + 1] = p.grad end
  end
  assert(#bank > 0, "lazy_zero: the model has no expert bank")
  local function count(pred)
    local n, total = 0, 0
    for _, g in ipairs(bank) do
      for _, v in ipairs(flat(g)) do
        total = total + 1
        if pred(v) then n = n + 1 end
      end
    end
    return n, total
  end
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
  local stale, n = count(function(v) return v ~= 0 end)
  net:zero_grad{lazy = true}
  d.arm_grad_allreduce(net, true)
  aux_only()
  d.finish_grad_allreduce(net)
  local left = count(function(v) return v ~= 0 end)
  local got = flat(gflat)
  d.set_grad_allreduce(net, false)
  return {got = got, want = want, bank = n, stale = stale, left = left}
end
