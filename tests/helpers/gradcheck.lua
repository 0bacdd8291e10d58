-- Finite-difference gradient checks for f32 CPU tensors.
--
-- The loss is L = sum(y .* R) for a fixed random R, so dL/dy = R: the caller's
-- backward gets R as the upstream gradient, and the numeric gradient perturbs
-- one input element at a time with central differences. Sums run in Lua
-- doubles; the tolerance allows for f32 rounding in the forward pass, which is
-- far below the O(1) errors a wrong backward produces.
local moe = require "moelab"

local M = {}

-- sum(y .* r) in double precision
function M.dot(y, r)
  local s = 0
  for i = 1, y:numel() do s = s + y:get_flat(i) * r:get_flat(i) end
  return s
end

-- Compares `analytic` (a tensor shaped like x) with the numeric gradient of
-- loss_fn() (a function returning a Lua number computed from x's current
-- values) with respect to x. Returns the worst error and the index it was at;
-- raises an error naming `what` if it exceeds the tolerance.
function M.check(what, x, analytic, loss_fn, opts)
  opts = opts or {}
  local eps = opts.eps or 1e-2
  local atol, rtol = opts.atol or 5e-3, opts.rtol or 2e-2
  local n = x:numel()
  assert(analytic:numel() == n, what .. ": analytic gradient has the wrong size")
  local stride = math.max(1, math.floor(n / (opts.max_checks or 64)))
  local worst, worst_i = 0, 0
  local checked = 0
  for i = 1, n, stride do
    local orig = x:get_flat(i)
    x:set_flat(i, orig + eps)
    local lp = loss_fn()
    x:set_flat(i, orig - eps)
    local lm = loss_fn()
    x:set_flat(i, orig)
    local num = (lp - lm) / (2 * eps)
    local ana = analytic:get_flat(i)
    local err = math.abs(num - ana) - (atol + rtol * math.max(math.abs(num), math.abs(ana)))
    checked = checked + 1
    if err > worst or worst_i == 0 then worst, worst_i = err, i end
    if err > 0 then
      error(string.format("%s: gradient mismatch at element %d: analytic %.6g, numeric %.6g",
        what, i, ana, num), 2)
    end
  end
  assert(checked > 0, what .. ": nothing was checked")
  return worst, worst_i
end

-- A random upstream gradient shaped like y, from a fixed seed.
function M.upstream(y, seed)
  return moe.randn(y:shape(), {seed = seed or 1234})
end

return M
