-- Issue 7: the token exchange alone, as expert parallelism does it (one
-- all_to_all_v of bf16 rows of width 1024 per rank), two ranks over NCCL
-- (file rendezvous). Rows: the token rows of one step-model layer (about
-- 1.9 x 8192 with top-4 over 2 ranks) and the assignment rows (4 x 8192).
-- "even": half the rows to each rank (one half is the rank's own);
-- "cross": the same bytes across, nothing to itself. Median of 20 exchanges,
-- each between barriers. Run by tools/gpu_a2a_bench.sh (NCCL settings vary there).
local moe = require "moelab"
local d = moe.dist
d.init{backend = "nccl", timeout = 120}
local rank, world = d.rank(), d.world_size()
local H = 1024
local function median(t) table.sort(t); return t[math.ceil(#t / 2)] end
local function timed(fn, reps)
  fn(); fn()
  local t = {}
  for i = 1, reps do
    collectgarbage()   -- the last output back to the cache: no allocation inside the timing
    d.barrier()
    local a = moe.clock()
    fn()
    t[i] = moe.clock() - a
  end
  return median(t)
end
for _, rows in ipairs{15600, 32768} do
  local x = moe.randn({rows, H}, {seed = 3 + rank}):to("cuda"):to("bf16")
  local even, cross, recv_even, recv_cross = {}, {}, {}, {}
  for r = 1, world do
    even[r] = math.floor(rows / world)
    recv_even[r] = math.floor(rows / world)
    cross[r] = (r - 1 == rank) and 0 or math.floor(rows / world)
    recv_cross[r] = (r - 1 == rank) and 0 or math.floor(rows / world)
  end
  local te = timed(function() local y = d.all_to_all_v(x, even, recv_even); y = nil end, 20)
  local tc = timed(function() local y = d.all_to_all_v(x, cross, recv_cross); y = nil end, 20)
  local cross_gb = rows / world * (world - 1) * H * 2 / 1e9
  if rank == 0 then
    print(string.format("A2A rows=%d even_ms=%.3f cross_only_ms=%.3f cross_GB=%.4f even_GBps=%.0f cross_GBps=%.0f",
      rows, te * 1e3, tc * 1e3, cross_gb, cross_gb / te, cross_gb / tc))
  end
  x = nil
  collectgarbage()
end
d.barrier()
