-- The GPU Lua checks' shared parts (tests/gpu/*_gpu.lua): TAP lines and the
-- comparisons they make. Loaded by path, next to the check:
--   local tap = dofile((arg[0]:match("^(.*/)") or "./") .. "tap.lua")
--   if tap.skip_without_cuda() then return end
--   tap.ok(cond, name[, detail]) ... tap.done()   -- the plan; exit 1 when a check failed
local moe = require "moelab"

local M = {}
local n, failed = 0, 0

-- "1..0 # SKIP" and true without a CUDA device
function M.skip_without_cuda()
  if moe.cuda_available() then return false end
  print("1..0 # SKIP no CUDA device")
  return true
end

function M.ok(cond, name, detail)
  n = n + 1
  if not cond then failed = failed + 1 end
  print(string.format("%s %d - %s%s", cond and "ok" or "not ok", n, name, detail and (" (" .. detail .. ")") or ""))
end

function M.done()
  print("1.." .. n)
  os.exit(failed == 0 and 0 or 1)
end

-- a tensor as f32 on the cpu
function M.host(t) return t:to("cpu"):to("f32") end

-- max |a - b| over the elements
function M.max_abs(a, b)
  local d = M.host(a) - M.host(b)
  return math.max(d:max():item(), (-d):max():item())
end

-- ||a - b|| / ||b||
function M.rel_l2(a, b)
  a, b = M.host(a), M.host(b)
  local d = a - b
  return math.sqrt((d * d):sum():item()) / math.max(math.sqrt((b * b):sum():item()), 1e-30)
end

return M
