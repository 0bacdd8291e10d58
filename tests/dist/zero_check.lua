-- Run by tests/dist_spec.lua under `mpirun -np 2 ./moelab tests/dist/zero_check.lua`.
-- ZeRO-1 and ZeRO-2 (sharded optimizer state; stage 2 also sharded gradients)
-- against plain data parallel, with clipping active: the same losses and final
-- parameters; then a checkpoint saved under ZeRO-2 resumes in one process on
-- the same loss curve. Prints "ZERO_OK <rank>".
local d = moe.dist
d.init{timeout = 30}
local rank, world = d.rank(), d.world_size()
assert(world == 2, "run with 2 ranks")

local close, close_t = dofile("tests/dist/common.lua")(rank)

local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local function model(seed)
  -- odd sizes so the flat buffer is not a multiple of the world size (padding)
  return moe.MoEModel{vocab_size = 257, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
                      experts_per_token = 2, expert_intermediate_size = 16, seed = seed}
end
local function batch(g) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = g} end
local steps = 4
-- grad_clip small enough to clip every step; a router lr scale and the decay-free norms/biases exercise the per-parameter groups
local topts = {progress = false, aux_loss_coef = 0.01, grad_clip = 0.05, router_learning_rate = 5e-3}
local function train_opts(extra)
  local o = {max_steps = steps, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1,
             lr_schedule = "constant", batch_fn = batch}   -- constant: resumed runs share one schedule
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end
local function trainer(zs, run_dir)
  local o = {model = model(rank == 0 and 11 or 99), zero_stage = zs, run_dir = run_dir}
  for k, v in pairs(topts) do o[k] = v end
  return moe.distributed.DistributedMoETrainer(o)
end

local base = trainer(0)
local bres = base:train(train_opts())
for s = 1, steps do assert(bres.history[s].grad_norm > topts.grad_clip, "clipping must be active") end
local bparams = base.model.net:flat_parameters()

-- a run directory both ranks name (rank 0 writes it)
local dir_t = moe.tensor({os.time() % 100000, math.random(1, 99999)}, {dtype = "f64"})
d.broadcast(dir_t, 0)
local dv = dir_t:to_table()
local run_dir = string.format("/tmp/moelab_zero_%d_%d", dv[1], dv[2])

for _, zs in ipairs{1, 2} do
  local tr = trainer(zs, zs == 2 and run_dir or nil)
  local res = tr:train(train_opts())
  for s = 1, steps do
    close(res.history[s].loss, bres.history[s].loss, 1e-5, "ZeRO-" .. zs .. " loss at step " .. s)
    close(res.history[s].grad_norm, bres.history[s].grad_norm, 1e-5, "ZeRO-" .. zs .. " grad norm at step " .. s)
  end
  close_t(tr.model.net:flat_parameters(), bparams, 1e-5, "ZeRO-" .. zs .. " final parameters")
  -- the state is sharded: S = ceil(N / 2) elements per rank
  local m = tr.inner.optimizer._real:state()
  assert(m:numel() == math.ceil(bparams:numel() / 2), "m is not sharded")
end
d.barrier()

-- resume the ZeRO-2 checkpoint (step 4) in one process, and also under ZeRO-2,
-- for 2 more steps: both must follow plain DP run for 6 steps
local long = trainer(0)
local lres = long:train(train_opts{max_steps = steps + 2})
local z2 = trainer(2)
local zres = z2:train(train_opts{max_steps = steps + 2, resume = run_dir .. "/checkpoint"})
for s = steps + 1, steps + 2 do
  close(zres.history[s].loss, lres.history[s].loss, 1e-5, "ZeRO-2 resumed loss at step " .. s)
end
close_t(z2.model.net:flat_parameters(), long.model.net:flat_parameters(), 1e-5, "ZeRO-2 resumed parameters")
if rank == 0 then
  local ck = moe.io.safetensors.load(run_dir .. "/checkpoint/optimizer.safetensors")
  assert(ck.exp_avg:numel() == bparams:numel(), "checkpoint m is not full-size")
  -- one process with twice the accumulation, from the checkpoint
  local one = moe.MoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01, grad_clip = 0.05,
                             router_learning_rate = 5e-3}
  local ores = one:train(train_opts{max_steps = steps + 2, gradient_accumulation_steps = 2,
                                    resume = run_dir .. "/checkpoint"})
  for s = steps + 1, steps + 2 do
    close(ores.history[s].loss, lres.history[s].loss, 1e-5, "single-process resumed loss at step " .. s)
  end
  close_t(one.model.net:flat_parameters(), long.model.net:flat_parameters(), 1e-5, "single-process resumed parameters")
  os.execute("rm -rf '" .. run_dir .. "'")
end
d.barrier()
print("ZERO_OK " .. rank)
