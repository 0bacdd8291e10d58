-- Run by tests/dist_spec.lua under `mpirun -np 4 ./moelab tests/dist/epdp_check.lua`.
-- Expert parallel x data parallel (EP = 2, DP = 2 on 4 ranks; EP groups are
-- consecutive ranks {0, 1} and {2, 3}). Checks
--   (1) dist.split: the groups, their ranks and collectives within a group;
--   (2) a forward with the group communicator gives each rank the plain
--       forward's loss, with rows reaching both experts' owners of its group;
--   (3) EP x DP training (also with ZeRO-1 and ZeRO-2) reproduces one process with 4x the
--       accumulation for the same global batch: losses, aux losses and
--       gradient norms to 1e-5 relative, the first step's mean gradient and
--       the final parameters to 1e-5 relative in 2-norm (element by element a
--       few parameters differ by up to ~3e-5 relative: AdamW amplifies the
--       rounding of near-zero gradient elements; plain DP over 4 ranks with
--       ZeRO-2 shows the same difference at the same elements);
--   (4) the checkpoint saved under EP x DP loads in one process (parameters
--       equal bit for bit) and resumes there on the reference loss curve.
-- Prints "EPDP_OK <rank>".
local d = moe.dist
d.init{timeout = 30}
local rank, world = d.rank(), d.world_size()
assert(world == 4, "run with 4 ranks")

local close, close_t, close_n = dofile("tests/dist/common.lua")(rank)

-- (1) the split: colour = group, key = rank
local group = math.floor(rank / 2)
local g = d.split(group, rank)
assert(g:world_size() == 2 and g:rank() == rank % 2, string.format("rank %d: group rank %d of %d", rank, g:rank(), g:world_size()))
local members = g:all_gather(moe.tensor({rank})):view(-1):to_table()
assert(members[1] == 2 * group and members[2] == 2 * group + 1, "group members " .. table.concat(members, ","))
close_t(g:all_reduce(moe.tensor({rank + 1, 1}), "sum"), moe.tensor({4 * group + 3, 2}), 0, "group all_reduce")
local rev = g:split(0, -g:rank())   -- a split of a split, ranks reversed by key
assert(rev:world_size() == 2 and rev:rank() == 1 - g:rank(), "split of a split")
rev = nil
assert(d.comm():world_size() == 4 and d.comm():rank() == rank)

local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local function model(seed)
  return moe.MoEModel{vocab_size = 256, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
                      experts_per_token = 2, expert_intermediate_size = 16, seed = seed}
end
local function batch(i) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = i} end

-- (2) forward over the group communicator against the plain model
do
  local m = model(11)
  local ids, targets = batch(rank)
  local want = m:forward(ids, {targets = targets}).loss:item()
  assert(d.set_expert_parallel(m.net, g) == 2, "two MoE layers")
  assert(d.expert_parallel_size(m.net) == 2)
  close(m:forward(ids, {targets = targets}).loss:item(), want, 1e-5, "EP forward loss")
  for i, s in ipairs(m:routing_stats()) do
    local all = g:all_reduce(moe.tensor({s.counts[1] + s.counts[2], s.counts[3] + s.counts[4]}, {dtype = "f64"}), "sum")
    local t = all:to_table()
    assert(t[1] > 0 and t[2] > 0, string.format("layer %d: group %d's owners get %d and %d rows", i, group, t[1], t[2]))
  end
  d.set_expert_parallel(m.net, false)
end
collectgarbage()   -- the dropped communicators go (children before parents)

-- (3) training: EP = 2 x DP = 2 == one process with gradient_accumulation_steps 4
local steps = 3
local topts = {progress = false, aux_loss_coef = 0.01, grad_clip = 0.05}
local function train_opts(extra)
  local o = {max_steps = steps, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1,
             lr_schedule = "constant", batch_fn = batch}
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end
local function trainer(extra)
  local o = {model = model(rank == 0 and 11 or 99 + rank)}
  for k, v in pairs(topts) do o[k] = v end
  for k, v in pairs(extra) do o[k] = v end
  return moe.distributed.DistributedMoETrainer(o)
end

-- a run directory every rank names (rank 0 writes it)
local dir_t = moe.tensor({os.time() % 100000, math.random(1, 99999)}, {dtype = "f64"})
d.broadcast(dir_t, 0)
local dv = dir_t:to_table()
local run_dir = string.format("/tmp/moelab_epdp_%d_%d", dv[1], dv[2])

local grad1 = {}   -- the first step's averaged gradient (the hooks run after the all-reduce)
local function grab(key)
  return function(tr)
    if key == "epdp" then assert(d.expert_parallel_size(tr.model.net) == 2, "expert parallelism is off in training") end
    if not grad1[key] then grad1[key] = select(2, tr.model.net:flat_parameters()):clone() end
  end
end
-- full-size experts on every rank (epshard_check covers the sharded default)
local dt = trainer{expert_parallel_size = 2, data_parallel_size = 2, run_dir = run_dir, grad_hook = grab("epdp"),
                   shard_experts = false}
assert(dt.expert_parallel_size == 2 and dt.data_parallel_size == 2)
assert(dt.expert_parallel_rank == rank % 2 and dt.data_parallel_rank == group)
local res = dt:train(train_opts())
assert(d.expert_parallel_size(dt.model.net) == 1, "expert parallelism stays on after train()")
assert(res.world_size == 4 and res.global_batch_size == 8 and res.expert_parallel_size == 2)
local z2 = trainer{expert_model_parallel_size = 2, zero_stage = 2}   -- the Megatron name; ZeRO-2 over the world
assert(z2.expert_parallel_size == 2 and z2.data_parallel_size == 2)
local zres = z2:train(train_opts())
local z1 = trainer{expert_parallel_size = 2, zero_stage = 1}
local z1res = z1:train(train_opts())

local mine = dt.model.net:flat_parameters()
close_t(mine, d.broadcast(mine * 1, 0), 0, "parameters equal across ranks")
d.barrier()

local ref_model = model(11)
local ref = moe.MoETrainer{model = ref_model, progress = false, aux_loss_coef = 0.01, grad_clip = 0.05,
                           grad_hook = grab("ref")}
local rres = ref:train(train_opts{gradient_accumulation_steps = 4})
for s = 1, steps do
  for name, r in pairs{["EPxDP"] = res, ["EPxDP ZeRO-1"] = z1res, ["EPxDP ZeRO-2"] = zres} do
    close(r.history[s].loss, rres.history[s].loss, 1e-5, name .. " loss at step " .. s)
    close(r.history[s].aux_loss, rres.history[s].aux_loss, 1e-5, name .. " aux loss at step " .. s)
    close(r.history[s].grad_norm, rres.history[s].grad_norm, 1e-5, name .. " grad norm at step " .. s)
  end
end
local gerr = close_n(grad1.epdp, grad1.ref, 1e-5, "EPxDP first-step gradient")
local perr = close_n(mine, ref_model.net:flat_parameters(), 1e-5, "EPxDP final parameters")
local z1err = close_n(z1.model.net:flat_parameters(), ref_model.net:flat_parameters(), 1e-5, "EPxDP ZeRO-1 final parameters")
local zerr = close_n(z2.model.net:flat_parameters(), ref_model.net:flat_parameters(), 1e-5, "EPxDP ZeRO-2 final parameters")
if rank == 0 then
  print(string.format("EPxDP vs one process: gradient %.2g, parameters %.2g, with ZeRO-1 %.2g, ZeRO-2 %.2g (relative, 2-norm)",
                      gerr, perr, z1err, zerr))
end

-- (4) the checkpoint (rank 0 saved it at the end of train) in one process
if rank == 0 then
  local loaded = moe.load(run_dir .. "/checkpoint")
  close_t(loaded.net:flat_parameters(), mine, 0, "loaded parameters")
  local one = moe.MoETrainer{model = model(5), progress = false, aux_loss_coef = 0.01, grad_clip = 0.05}
  local ores = one:train(train_opts{max_steps = steps + 2, gradient_accumulation_steps = 4,
                                    resume = run_dir .. "/checkpoint"})
  local long = moe.MoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01, grad_clip = 0.05}
  local lres = long:train(train_opts{max_steps = steps + 2, gradient_accumulation_steps = 4})
  for s = steps + 1, steps + 2 do
    close(ores.history[s].loss, lres.history[s].loss, 1e-5, "resumed loss at step " .. s)
  end
  close_n(one.model.net:flat_parameters(), long.model.net:flat_parameters(), 1e-5, "resumed parameters")
  os.execute("rm -rf '" .. run_dir .. "'")
end
d.barrier()
print("EPDP_OK " .. rank)
