-- Run by tests/dist_spec.lua under `mpirun -np 2 ./moelab tests/dist/epshard_check.lua`
-- (EP = 2) and with -np 4 (EP = 2 x DP = 2). Sharded experts (the default
-- under expert parallelism): each rank keeps only its 2 of the 4 experts of
-- every MoE layer, and their AdamW state. Checks
--   (1) each rank's parameters: the non-expert ones plus its own experts'
--       rows of rank 0's initial model (counts asserted, values bit for bit);
--   (2) training reproduces one process with W x the accumulation for the
--       same global batch (losses, aux losses, clipped global gradient norms
--       to 1e-5 relative; final parameters gathered, to 1e-5 relative in
--       2-norm) and equals the unsharded run (shard_experts = false); also
--       with gradient accumulation 2;
--   (3) the sharded model refuses to run or save in one process, with errors
--       that say what to do; ZeRO with shard_experts = true, E % ep != 0 are refused;
--   (4) the checkpoint saved under sharding is the single-process layout: it
--       loads in one process (bit for bit) and resumes there on the
--       reference curve;
--   (5) a single-process checkpoint resumes in a sharded trainer on the
--       reference curve, and a loaded single-process model shards on construction;
--   (6) gather_experts() restores full-size experts on every rank (the plain
--       forward works and equals the reference); train() shards again.
-- Prints "EPSHARD_OK <rank>".
local d = moe.dist
d.init{timeout = 30}
local rank, world = d.rank(), d.world_size()
assert(world == 2 or world == 4, "run with 2 or 4 ranks")
local ep = 2
local q = rank % ep   -- the rank within its expert-parallel group

local close, close_t, close_n = dofile("tests/dist/common.lua")(rank)

local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local E, H, I, L = 4, 16, 16, 2
local function model(seed)
  return moe.MoEModel{vocab_size = 256, hidden_size = H, num_layers = L, num_heads = 2, num_experts = E,
                      experts_per_token = 2, expert_intermediate_size = I, seed = seed}
end
local function batch(g) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = g} end
local steps = 3
local topts = {progress = false, aux_loss_coef = 0.01, grad_clip = 0.05}
local function train_opts(extra)
  local o = {max_steps = steps, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1,
             lr_schedule = "constant", batch_fn = batch}   -- constant: resumed runs share one schedule
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end
local function trainer(extra, m)
  local o = {model = m or model(rank == 0 and 11 or 99 + rank), expert_parallel_size = ep}
  for k, v in pairs(topts) do o[k] = v end
  for k, v in pairs(extra or {}) do o[k] = v end
  return moe.distributed.DistributedMoETrainer(o)
end
local function err(fn, pat)
  local ok, e = pcall(fn)
  assert(not ok, "expected an error matching " .. pat)
  assert(tostring(e):find(pat, 1, true), "error '" .. tostring(e) .. "' lacks '" .. pat .. "'")
end
-- the single-process reference: one process, W x the accumulation
local function reference(extra, m)
  local o = {model = m or model(11), progress = false}
  for k, v in pairs(topts) do o[k] = v end
  local tr = moe.MoETrainer(o)
  return tr, tr:train(train_opts(extra))
end
local function full_params(t)   -- the flat parameters of the full-size (gathered) model
  return t.model.net:flat_parameters()
end

-- run directories every rank names (rank 0 writes them)
local dir_t = moe.tensor({os.time() % 100000, math.random(1, 99999)}, {dtype = "f64"})
d.broadcast(dir_t, 0)
local dv = dir_t:to_table()
local base_dir = string.format("/tmp/moelab_epshard_%d_%d_%d", world, dv[1], dv[2])
local run_dir, one_dir = base_dir .. "/sharded", base_dir .. "/one"

-- (1) construction: rank 0's weights, this rank's experts only
local init = model(11)
local expert_numel, all_numel = 0, init.net:num_params()
for _, p in ipairs(init.net:parameters()) do
  if p.name:find("%.experts%.") then expert_numel = expert_numel + p.value:numel() end
end
assert(expert_numel == L * 3 * E * I * H, "expert parameter count")
local dt = trainer{run_dir = run_dir}
assert(dt.expert_parallel_size == ep and dt.data_parallel_size == world / ep)
local counts = dt:parameter_counts()
assert(counts.sharded and counts.total == all_numel, "total count")
assert(counts.non_expert == all_numel - expert_numel, "non-expert count")
assert(counts.experts_per_rank == expert_numel / ep and counts.experts_total == expert_numel, "expert counts")
assert(counts.per_rank == counts.non_expert + expert_numel / ep, "per-rank count")
assert(dt.model.net:num_params() == counts.per_rank, "the model holds the per-rank count")
local sh = dt.model.net:expert_shard()
assert(sh and sh.first == q * E / ep and sh.count == E / ep and sh.total == E, "expert range")
for _, p in ipairs(dt.model.net:parameters()) do
  local want = init.net:param(p.name)
  if p.name:find("%.experts%.") then want = want:narrow(1, sh.first + 1, sh.count) end
  close_t(p.value, want, 0, "initial " .. p.name)
end
for _, c in ipairs(dt.model:moe_layers()[1]:children()) do
  if c:kind() == "ExpertBank" then
    assert(tostring(c):find("experts [" .. sh.first .. ", " .. sh.first + sh.count .. ") of 4", 1, true),
           "the bank describes its shard: " .. tostring(c))
  end
end

-- (2) training against one process and against unsharded expert parallelism
local grad1 = {}
local function grab(key)
  return function(tr)
    if not grad1[key] then grad1[key] = select(2, tr.model.net:flat_parameters()):clone() end
  end
end
local res = dt:train(train_opts())
local full = trainer{shard_experts = false, grad_hook = grab("full")}
assert(full:parameter_counts().per_rank == all_numel and not full:parameter_counts().sharded)
local fres = full:train(train_opts())
local ref, rres = reference{gradient_accumulation_steps = world}
for s = 1, steps do
  assert(rres.history[s].grad_norm > topts.grad_clip, "clipping must be active")
  for name, r in pairs{sharded = res, unsharded = fres} do
    close(r.history[s].loss, rres.history[s].loss, 1e-5, name .. " loss at step " .. s)
    close(r.history[s].aux_loss, rres.history[s].aux_loss, 1e-5, name .. " aux loss at step " .. s)
    close(r.history[s].grad_norm, rres.history[s].grad_norm, 1e-5, name .. " grad norm at step " .. s)
  end
  close(res.history[s].grad_norm, fres.history[s].grad_norm, 1e-5, "sharded vs unsharded grad norm at step " .. s)
end

-- (2b) gradient accumulation: with E_p = W the non-expert gradients are summed
-- during the last micro-batch's backward only (earlier ones accumulate
-- locally); the result must still be one process with W x the accumulation
local acc = trainer{}
local ares = acc:train(train_opts{gradient_accumulation_steps = 2})
local aref, arres = reference{gradient_accumulation_steps = 2 * world}
for s = 1, steps do
  close(ares.history[s].loss, arres.history[s].loss, 1e-5, "accumulation 2: loss at step " .. s)
  close(ares.history[s].grad_norm, arres.history[s].grad_norm, 1e-5, "accumulation 2: grad norm at step " .. s)
end
acc:gather_experts()
close_n(full_params(acc), full_params(aref), 1e-5, "accumulation 2: final parameters vs one process")

-- (3) the sharded model between train() calls
local ids, targets = batch(0)
err(function() dt.model:forward(ids, {targets = targets}) end, "holds only experts [" .. sh.first)
err(function() dt.model:forward(ids) end, "trainer:gather_experts()")
err(function() require("moelab.checkpoint").save_model(dt.model, base_dir .. "/nope") end, "sharded under expert parallelism")
err(function() moe.save_pretrained(dt.model, base_dir .. "/nope", {model_type = "olmoe"}) end, "trainer:gather_experts()")
err(function() dt:visualize_routing{save_to = base_dir .. "/r.pdf"} end, "gather_experts()")
err(function() moe.peft.MoELoRA{base_model = dt.model, r = 2} end, "the expert bank is sharded")
err(function() trainer{zero_stage = 1, shard_experts = true} end, "pass shard_experts = false")
err(function() trainer{shard_experts = "yes"} end, "shard_experts must be true or false")
err(function() trainer({}, moe.MoEModel{vocab_size = 256, hidden_size = H, num_layers = 1, num_heads = 2,
                                        num_experts = 3, experts_per_token = 2, expert_intermediate_size = I})
end, "do not split evenly")
assert(trainer{zero_stage = 1}:parameter_counts().sharded == false, "ZeRO keeps full-size experts by default")

-- (4) the checkpoint rank 0 wrote at the end of train() (gathered on every rank)
d.barrier()
local loaded = moe.load(run_dir .. "/checkpoint")
local ck = moe.io.safetensors.load(run_dir .. "/checkpoint/optimizer.safetensors")
assert(ck.exp_avg:numel() == loaded.net:flat_parameters():numel(), "optimizer state in the single-process layout")
-- sharded == its checkpoint's slice, bit for bit
for _, p in ipairs(dt.model.net:parameters()) do
  local want = loaded.net:param(p.name)
  if p.name:find("%.experts%.") then want = want:narrow(1, sh.first + 1, sh.count) end
  close_t(p.value, want, 0, "saved " .. p.name)
end
close_n(loaded.net:flat_parameters(), full_params(ref), 1e-5, "sharded final parameters vs one process")
close_n(loaded.net:flat_parameters(), full_params(full), 1e-5, "sharded vs unsharded final parameters")
-- resumed in one process: the reference curve
local long, lres = reference{max_steps = steps + 2, gradient_accumulation_steps = world}
local one = moe.MoETrainer{model = model(5), progress = false, aux_loss_coef = 0.01, grad_clip = 0.05}
local ores = one:train(train_opts{max_steps = steps + 2, gradient_accumulation_steps = world,
                                  resume = run_dir .. "/checkpoint"})
for s = steps + 1, steps + 2 do close(ores.history[s].loss, lres.history[s].loss, 1e-5, "resumed loss at step " .. s) end
close_n(full_params(one), full_params(long), 1e-5, "resumed in one process: parameters")

-- (5) a single-process checkpoint (rank 0 writes it) resumed in a sharded trainer
if rank == 0 then
  local o = {model = model(11), progress = false, run_dir = one_dir}
  for k, v in pairs(topts) do o[k] = v end
  moe.MoETrainer(o):train(train_opts{gradient_accumulation_steps = world})
end
d.barrier()
local rs = trainer{}
assert(rs:parameter_counts().sharded)
local rsres = rs:train(train_opts{max_steps = steps + 2, resume = one_dir .. "/checkpoint"})
assert(#rsres.history == steps + 2)
for s = steps + 1, steps + 2 do close(rsres.history[s].loss, lres.history[s].loss, 1e-5, "sharded resumed loss at step " .. s) end
-- explicit save on every rank, then compare in one process
rs:save_checkpoint(base_dir .. "/resumed")
d.barrier()
close_n(moe.load(base_dir .. "/resumed").net:flat_parameters(), full_params(long), 1e-5, "sharded resumed parameters")
-- a loaded single-process model shards on construction (after the broadcast)
local from_one = trainer({}, rank == 0 and moe.load(one_dir .. "/checkpoint") or model(77))
local one_model = moe.load(one_dir .. "/checkpoint")
for _, p in ipairs(from_one.model.net:parameters()) do
  local want = one_model.net:param(p.name)
  if p.name:find("%.experts%.") then want = want:narrow(1, sh.first + 1, sh.count) end
  close_t(p.value, want, 0, "loaded and sharded " .. p.name)
end

-- (6) gather_experts: full-size experts everywhere, a plain forward works; train() shards again
rs:gather_experts()
assert(rs.model.net:expert_shard() == nil and not rs:parameter_counts().sharded)
assert(rs.model.net:num_params() == all_numel)
close_n(full_params(rs), full_params(long), 1e-5, "gathered parameters")
local m_state = rs.inner.optimizer:state()
local m_long = long.optimizer:state()
close_n(m_state, m_long, 1e-4, "gathered AdamW m")
close(rs.model:forward(ids, {targets = targets}).loss:item(), long.model:forward(ids, {targets = targets}).loss:item(),
      1e-5, "forward after gather_experts")
-- continue both for one more step: sharded again, still on the reference curve
local more = rs:train(train_opts{max_steps = steps + 3})
local lmore = long:train(train_opts{max_steps = steps + 3, gradient_accumulation_steps = world})
assert(rs.model.net:expert_shard() ~= nil, "train() shards the experts again")
close(more.history[steps + 3].loss, lmore.history[steps + 3].loss, 1e-5, "loss after re-sharding")
rs:gather_experts()
close_n(full_params(rs), full_params(long), 1e-5, "parameters after re-sharding")

d.barrier()
if rank == 0 then os.execute("rm -rf '" .. base_dir .. "'") end
print("EPSHARD_OK " .. rank)
