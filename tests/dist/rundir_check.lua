-- Two ranks (mpirun -np 2): run_dir given on rank 0 only must fail on both
-- ranks at construction with a clear error, instead of hanging at the first
-- collective save. Prints "RUNDIR_OK <rank>".
local moe = require "moelab"
local d = moe.dist
d.init{}
local rank = d.rank()
local function tmpdir()
  local p = os.tmpname()
  os.remove(p)
  moe.io.mkdir_p(p)
  return p
end
local model = moe.arch.Mixtral{vocab_size = 256, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 4,
                               experts_per_token = 2, expert_intermediate_size = 32, seed = 1}
local dir = rank == 0 and tmpdir() or nil
local ok, err = pcall(moe.distributed.DistributedMoETrainer,
                      {model = model, progress = false, expert_parallel_size = 2, run_dir = dir})
assert(not ok, "a run_dir on one rank only must be refused")
assert(tostring(err):find("run_dir was given on 1 of the 2 ranks", 1, true), tostring(err))
-- and on every rank it is accepted
local all = tmpdir()
local tr = moe.distributed.DistributedMoETrainer{model = model, progress = false, expert_parallel_size = 2,
                                                 run_dir = all .. "/r" .. rank}
assert(tr)
os.execute("rm -rf '" .. all .. "'")
if dir then os.execute("rm -rf '" .. dir .. "'") end
print("RUNDIR_OK " .. rank)
