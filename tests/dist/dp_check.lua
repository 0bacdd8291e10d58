-- Run by tests/dist_spec.lua under `mpirun -np 2 ./moelab tests/dist/dp_check.lua MODE`.
-- MODE "check" (default): collectives on random tensors, then data-parallel
-- training against the single-process equivalent; prints "DP_OK <rank>".
-- MODE "exit_early": rank 1 leaves at once, rank 0 runs a collective, which
-- must fail naming rank 1 (well within the timeout).
local mode = arg and arg[1] or "check"
local d = moe.dist
d.init{timeout = 20}
local rank, world = d.rank(), d.world_size()
assert(world == 2, "run with 2 ranks")

local close, close_t, close_n = dofile("tests/dist/common.lua")(rank)

if mode == "exit_early" then
  if rank == 1 then return end
  local t0 = moe.clock()
  local ok, err = pcall(d.all_reduce, moe.ones({8}), "sum")
  assert(not ok, "the all_reduce should fail")
  io.stderr:write(string.format("EXIT_EARLY_ERROR after %.1fs: %s\n", moe.clock() - t0, tostring(err)))
  error(err, 0)
end

-- collectives: every rank can make every rank's input from its seed
local function input(r, shape, dtype) return moe.randn(shape, {seed = 100 + r}):to(dtype or "f32") end
for _, dt in ipairs{"f32", "f64"} do
  local t = input(rank, {5, 3}, dt)
  local want = input(0, {5, 3}) + input(1, {5, 3})   -- expected values in f32 (f64 has no arithmetic)
  close_t(d.all_reduce(t, "sum"), want, 1e-6, "all_reduce sum " .. dt)
  t = input(rank, {7}, dt)
  close_t(d.all_reduce(t, "avg"), (input(0, {7}) + input(1, {7})) * 0.5, 1e-6, "all_reduce avg " .. dt)
end
-- bucketed: 1000 elements in buckets of 1 KB (256 f32s)
local big = input(rank, {1000})
close_t(d.all_reduce(big, "sum", {bucket_mb = 1 / 1024}), input(0, {1000}) + input(1, {1000}), 1e-6, "bucketed")
local b = input(rank, {4, 2})
close_t(d.broadcast(b, 1), input(1, {4, 2}), 0, "broadcast")
local g = d.all_gather(input(rank, {3}))
assert(g:shape()[1] == 2 and g:shape()[2] == 3)
close_t(g:select(1, 1), input(0, {3}), 0, "all_gather 0")
close_t(g:select(1, 2), input(1, {3}), 0, "all_gather 1")
local rs = d.reduce_scatter(input(rank, {4, 2}), "sum")
close_t(rs, (input(0, {4, 2}) + input(1, {4, 2})):narrow(1, 2 * rank + 1, 2), 1e-6, "reduce_scatter")
-- all_to_all_v: rank r sends r + 1 rows to each rank
local src = moe.full({2 * (rank + 1), 2}, rank)
local got = d.all_to_all_v(src, {rank + 1, rank + 1}, {1, 2})
assert(got:shape()[1] == 3, "all_to_all_v rows")
assert(got:get(1, 1) == 0 and got:get(2, 1) == 1 and got:get(3, 2) == 1, "all_to_all_v values")

-- data parallel against one process with twice the accumulation
local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local function model(seed)
  return moe.MoEModel{vocab_size = 256, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
                      experts_per_token = 2, expert_intermediate_size = 16, seed = seed}
end
local function batch(g) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = g} end
local train = {max_steps = 3, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1}

-- rank 1 starts from other weights: the broadcast from rank 0 must fix that
local dt = moe.distributed.DistributedMoETrainer{model = model(rank == 0 and 11 or 99), progress = false,
                                                 aux_loss_coef = 0.01}
-- the train{} options: `train` plus extra
local function opts(extra)
  local o = {}
  for k, v in pairs(train) do o[k] = v end
  for k, v in pairs(extra) do o[k] = v end
  return o
end
local o = opts{batch_fn = batch}
local res = dt:train(o)
assert(res.world_size == 2 and res.global_batch_size == 4)
assert(dt._overlap, "data parallel should all-reduce gradients during backward (block by block)")

-- with gradient accumulation only the last micro-batch's backward queues the all-reduce
local dt2 = moe.distributed.DistributedMoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01}
local o2 = opts{batch_fn = batch, gradient_accumulation_steps = 2}
local res2 = dt2:train(o2)

-- routing statistics describe the global batch: step 1 of DP=2 routes the two
-- ranks' micro-batches, which one process sees as one batch of both
local dt3 = moe.distributed.DistributedMoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01}
local res3 = dt3:train{max_steps = 1, batch_size = 2, seq_len = 8, learning_rate = 1e-2, batch_fn = batch}

-- global_aux_loss: the aux loss over both ranks' tokens, so DP=2 equals one
-- process on the two micro-batches as one batch (not two accumulated ones)
local dt4 = moe.distributed.DistributedMoETrainer{model = model(11), progress = false, aux_loss_coef = 0.5,
                                                  global_aux_loss = true}
local o4 = opts{batch_fn = batch}
local res4 = dt4:train(o4)

-- one process's view of DP=2 step g (0-based): both ranks' micro-batches as one batch of 4 rows
local function both_at(g)
  local a1, t1 = batch(2 * g)
  local a2, t2 = batch(2 * g + 1)
  local ids, tg = a1:to_table(), t1:to_table()
  for _, r in ipairs(a2:to_table()) do ids[#ids + 1] = r end
  for _, r in ipairs(t2:to_table()) do tg[#tg + 1] = r end
  return moe.tensor(ids, {dtype = "i64"}), moe.tensor(tg, {dtype = "i64"})
end

if rank == 0 then
  local ref_model = model(11)
  local ref = moe.MoETrainer{model = ref_model, progress = false, aux_loss_coef = 0.01}
  local ro = opts{batch_fn = batch, gradient_accumulation_steps = 2}
  local rres = ref:train(ro)
  for s = 1, train.max_steps do
    close(res.history[s].loss, rres.history[s].loss, 1e-5, "loss at step " .. s)
    close(res.history[s].aux_loss, rres.history[s].aux_loss, 1e-5, "aux loss at step " .. s)
  end
  local p = dt.model.net:flat_parameters()
  close_t(p, ref_model.net:flat_parameters(), 1e-5, "final parameters")
  -- accumulation 2 on 2 ranks = accumulation 4 in one process
  local ref2_model = model(11)
  local ref2 = moe.MoETrainer{model = ref2_model, progress = false, aux_loss_coef = 0.01}
  local ro2 = opts{batch_fn = batch, gradient_accumulation_steps = 4}
  local rres2 = ref2:train(ro2)
  for s = 1, train.max_steps do close(res2.history[s].loss, rres2.history[s].loss, 1e-5, "accum 2: loss at step " .. s) end
  close_t(dt2.model.net:flat_parameters(), ref2_model.net:flat_parameters(), 1e-5, "accum 2: final parameters")
  local ref3 = moe.MoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01}
  local rres3 = ref3:train{max_steps = 1, batch_size = 4, seq_len = 8, learning_rate = 1e-2, batch_fn = both_at}
  local g, l = res3.history[1].routing, rres3.history[1].routing
  local nl = 0
  for i, r in pairs(l) do
    nl = nl + 1
    for j, v in ipairs(r.load) do close(g[i].load[j], v, 1e-6, "global routing load, layer " .. i .. " expert " .. j) end
    close(g[i].entropy, r.entropy, 1e-5, "global routing entropy, layer " .. i)
  end
  assert(nl > 0, "no routing statistics recorded")

  -- global aux: one process, both micro-batches of each step as one batch
  local ref4_model = model(11)
  local ref4 = moe.MoETrainer{model = ref4_model, progress = false, aux_loss_coef = 0.5}
  local ro4 = opts{batch_fn = both_at, batch_size = 4}
  local rres4 = ref4:train(ro4)
  for s = 1, train.max_steps do
    close(res4.history[s].loss, rres4.history[s].loss, 1e-5, "global aux: loss at step " .. s)
    close(res4.history[s].aux_loss, rres4.history[s].aux_loss, 1e-5, "global aux: aux loss at step " .. s)
  end
  -- as vectors: AdamW magnifies the rounding of near-zero gradients (the batch of 4
  -- sums its rows in another order than two batches of 2)
  close_n(dt4.model.net:flat_parameters(), ref4_model.net:flat_parameters(), 1e-5, "global aux: final parameters")
end
-- an aux-only step after a full one: the last layer's expert gradients, never
-- written by their backward, are zeroed before the overlapped reduce averages them
do
  local ids_b, tg_b = batch(30 + rank)
  local lz = dofile("tests/dist/lazy_zero.lua")(model(11), batch(20 + rank), ids_b, tg_b)
  assert(lz.stale > 0, "lazy zeroing: the full step left no expert gradient for the aux-only step to clear")
  assert(lz.left == 0, string.format("lazy zeroing: %d of the last bank's %d gradient elements kept the last step's values",
    lz.left, lz.bank))
  for i = 1, #lz.want do close(lz.got[i], lz.want[i], 1e-6, "lazy zeroing: flat gradient [" .. i .. "]") end
end
-- both ranks end with the same parameters
local mine = dt.model.net:flat_parameters()
local other = d.broadcast(mine * 1, 0)
close_t(mine, other, 0, "parameters equal across ranks")
d.barrier()
print("DP_OK " .. rank)
