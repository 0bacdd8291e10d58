-- One rank of the 2-GPU NCCL check (launched by tools/gpu_dist_check.sh with
-- RANK/WORLD_SIZE/LOCAL_RANK, one visible GPU per rank and
-- MOELAB_DIST_RENDEZVOUS): (1) collectives on random CUDA tensors (and CPU
-- scalars, staged) against host-computed values; (2) DP=2 training of a small
-- Mixtral on CUDA vs one GPU with gradient_accumulation_steps = 2; (3) EP=2
-- (experts sharded) the same way; DP=2 with global_aux_loss vs one GPU on both
-- ranks' micro-batches as one batch; EP=2 in bf16 vs one GPU in bf16 (to 3e-2:
-- rounding orders differ); DP=2 with ZeRO-1 and with ZeRO-2 (f32: sharded
-- AdamW state, stage 2 reduce-scattered gradients, all on the GPUs) vs the
-- same one-GPU run as DP, and again with bf16 AdamW moments; DP=2 with two
-- micro-batches a rank vs one GPU with four; the lazily zeroed gradients of a
-- bank whose backward never ran, under the overlapped reduce
-- (tests/dist/lazy_zero.lua); (4) throughput, DP=2 vs one GPU, a small
-- model. Each run's final parameters must match too, and be equal on both
-- ranks. The single-GPU references run in rank 0 at the end.
-- Prints "RESULT <name> <PASS|FAIL|SKIP|value> <detail>" lines.
--   ./moelab-cuda tools/gpu_dist_check.lua [throughput_steps]
local moe = require "moelab"
local d = moe.dist
local tp_steps = tonumber(arg and arg[1]) or 20
assert(moe.cuda_available(), "no CUDA device")
local info = d.init{backend = "nccl", timeout = tonumber(os.getenv("MOELAB_DIST_TIMEOUT")) or 60}
local rank, world = d.rank(), d.world_size()
assert(world == 2, "run with 2 ranks")
assert(info.backend == "nccl", "backend " .. tostring(info.backend))
local function result(name, status, detail)
  if rank == 0 then print(string.format("RESULT %s %s %s", name, status, detail or "")) end
  io.stdout:flush()
end

-- a tensor (any device) or a flat table of numbers -> a flat table
local function flat(t)
  if type(t) == "table" then return t end
  return t:to("cpu"):to("f64"):contiguous():view(-1):to_table()
end
local function cat(...)
  local out = {}
  for _, t in ipairs{...} do for _, v in ipairs(flat(t)) do out[#out + 1] = v end end
  return out
end
-- relative max difference of two tensors or flat tables
local function maxrel(a, b)
  local x, y = flat(a), flat(b)
  assert(#x == #y, "sizes differ")
  local worst, scale = 0, 1e-30
  for i = 1, #x do scale = math.max(scale, math.abs(x[i]), math.abs(y[i])) end
  for i = 1, #x do worst = math.max(worst, math.abs(x[i] - y[i])) end
  return worst / scale
end

------------------------------------------------------------------ (1) collectives
do
  local fails, n = {}, 0
  local function check(what, got, want, tol)
    n = n + 1
    local ok, e = pcall(maxrel, got, want)
    if not ok or e > tol then fails[#fails + 1] = what .. (ok and string.format(" (%.2e)", e) or " (" .. e .. ")") end
  end
  local function host(r, shape, seed) return moe.randn(shape, {seed = (seed or 100) + r}) end
  local function dev(r, shape, dt, seed) return host(r, shape, seed):to(dt or "f32"):to("cuda") end
  local ok, err = pcall(function()
    for _, dt in ipairs{"f32", "f64"} do
      check("all_reduce sum " .. dt, d.all_reduce(dev(rank, {33, 7}, dt), "sum"), host(0, {33, 7}) + host(1, {33, 7}), 1e-6)
      check("all_reduce avg " .. dt, d.all_reduce(dev(rank, {1000}, dt), "avg"), (host(0, {1000}) + host(1, {1000})) * 0.5, 1e-6)
    end
    -- large, bucketed (4 MB buckets over 3M floats)
    local N = 3000000
    check("all_reduce bucketed 12 MB", d.all_reduce(dev(rank, {N}, "f32", 7), "sum", {bucket_mb = 4}),
      host(0, {N}, 7) + host(1, {N}, 7), 1e-6)
    -- CPU tensors go through a device staging buffer
    check("all_reduce avg cpu f64", d.all_reduce(host(rank, {3}):to("f64"), "avg"), (host(0, {3}) + host(1, {3})) * 0.5, 1e-6)
    check("broadcast root 1", d.broadcast(dev(rank, {4, 9}), 1), host(1, {4, 9}), 0)
    check("broadcast root 0 cpu", d.broadcast(host(rank, {5}), 0), host(0, {5}), 0)
    local g = d.all_gather(dev(rank, {3, 5}))
    assert(g:shape()[1] == 2 and g:shape()[2] == 3 and g:shape()[3] == 5, "all_gather shape")
    check("all_gather", g, cat(host(0, {3, 5}), host(1, {3, 5})), 0)
    local rs = d.reduce_scatter(dev(rank, {6, 4}), "sum")
    check("reduce_scatter sum", rs, (host(0, {6, 4}) + host(1, {6, 4})):narrow(1, 3 * rank + 1, 3), 1e-6)
    rs = d.reduce_scatter(dev(rank, {6, 4}), "avg")
    check("reduce_scatter avg", rs, ((host(0, {6, 4}) + host(1, {6, 4})) * 0.5):narrow(1, 3 * rank + 1, 3), 1e-6)
    -- all_to_all_v: rank r has 2 + 3r rows; sends (1 + r) rows to rank 0, the rest to rank 1
    local function rows(r) return host(r, {2 + 3 * r, 5}, 200) end
    local function send(r) return {1 + r, 1 + 2 * r} end
    local mine = d.all_to_all_v(rows(rank):to("cuda"), send(rank), {send(0)[rank + 1], send(1)[rank + 1]})
    local a = rows(0):narrow(1, rank == 0 and 1 or 2, send(0)[rank + 1])
    local b = rows(1):narrow(1, rank == 0 and 1 or 3, send(1)[rank + 1])
    check("all_to_all_v", mine, cat(a, b), 0)
    -- the same with an empty block (rank 0 sends nothing to rank 1)
    local e = d.all_to_all_v(rows(rank):to("cuda"), rank == 0 and {2, 0} or {1, 4}, rank == 0 and {2, 1} or {0, 4})
    check("all_to_all_v empty block", e, rank == 0 and cat(rows(0):narrow(1, 1, 2), rows(1):narrow(1, 1, 1))
      or rows(1):narrow(1, 2, 4), 0)
    d.barrier()
  end)
  if not ok then fails[#fails + 1] = "error: " .. tostring(err) end
  -- both ranks' verdicts
  local nf = d.all_reduce(moe.tensor({#fails}, {dtype = "f64"}), "sum"):to_table()[1]
  if #fails > 0 then io.stderr:write("rank " .. rank .. " collective failures: " .. table.concat(fails, "; ") .. "\n") end
  result("collectives", nf == 0 and "PASS" or "FAIL", string.format("%d checks per rank, %d failures over both ranks%s",
    n, nf, #fails > 0 and (": " .. table.concat(fails, "; ")) or ""))
end

------------------------------------------------------------------ (2)/(3) training vs one GPU
local corpus = moe.data.corpus{seed = 7, num_bytes = 200000}
local function small(seed)
  local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = 32, num_layers = 2, num_heads = 4, num_kv_heads = 2,
                             num_experts = 4, experts_per_token = 2, expert_intermediate_size = 32, seed = seed}
  m:to("cuda")
  return m
end
local function batch(g) return corpus:batch{batch_size = 4, seq_len = 32, seed = 3, step = g} end
local train = {max_steps = 3, batch_size = 4, seq_len = 32, learning_rate = 1e-2, warmup_steps = 1}
local function opts(extra)
  local o = {}
  for k, v in pairs(train) do o[k] = v end
  o.batch_fn = batch
  for k, v in pairs(extra or {}) do o[k] = v end
  return o
end

local runs = {}
-- extra: more trainer options; train_extra: more train{} options
local function dist_run(name, ep, extra, train_extra)
  local ok, res = pcall(function()
    local o = {model = small(rank == 0 and 11 or 99), progress = false, aux_loss_coef = 0.01, expert_parallel_size = ep}
    for k, v in pairs(extra or {}) do o[k] = v end
    local dt = moe.distributed.DistributedMoETrainer(o)
    local r = dt:train(opts(train_extra))
    local accum = (train_extra or {}).gradient_accumulation_steps or 1
    assert(r.world_size == 2 and r.global_batch_size == 8 * accum, "world_size/global_batch_size")
    dt:gather_experts()   -- EP shards the experts by default: full-size on both ranks to compare
    local p = dt.model.net:flat_parameters()
    -- rank 0 reports: against rank 1's parameters
    local same = maxrel(p, d.broadcast(p * 1, 1))
    return {history = r.history, params = p:to("cpu"), same = same}
  end)
  runs[name] = ok and res or {error = tostring(res)}
  if not ok then io.stderr:write(string.format("rank %d: %s failed: %s\n", rank, name, tostring(res))) end
end

dist_run("dp", 1)
-- ZeRO shards the f32 state only (it refuses bf16); before the EP runs, whose
-- failure may leave the communicator broken
dist_run("zero1", 1, {zero_stage = 1})
dist_run("zero2", 1, {zero_stage = 2})
-- AdamW moments kept in bf16 (stochastic rounding keyed by the element's index
-- in the whole flat buffer, so a ZeRO shard rounds as one GPU does)
dist_run("zero1_bf16m", 1, {zero_stage = 1, optimizer_state = "bf16"})
dist_run("zero2_bf16m", 1, {zero_stage = 2, optimizer_state = "bf16"})
-- two micro-batches a rank: the overlapped all-reduce armed for the second
-- only, over gradients that the first micro-batch's backward wrote lazily
-- (the expert banks' beta-0 writes) and the second summed into
dist_run("dp_accum2", 1, nil, {gradient_accumulation_steps = 2})

------------------------------------------------------------------ lazy zeroing under the armed reduce
-- an aux-only step after a full one: the last layer's expert gradients, never
-- written by their backward, must be zeroed before the overlapped reduce
-- averages them (tests/dist/lazy_zero.lua)
do
  local ok, res = pcall(function()
    local ids_a = batch(20 + rank)
    local ids_b, tg_b = batch(30 + rank)
    return dofile("tests/dist/lazy_zero.lua")(small(11), ids_a, ids_b, tg_b)
  end)
  local err = ok and maxrel(res.got, res.want) or math.huge
  local bad = (not ok or err > 1e-6 or res.stale == 0 or res.left ~= 0) and 1 or 0
  if not ok then io.stderr:write("rank " .. rank .. " lazy zeroing check: " .. tostring(res) .. "\n") end
  local nbad = d.all_reduce(moe.tensor({bad}, {dtype = "f64"}), "sum"):to_table()[1]
  result("lazy_zero_armed_reduce", nbad == 0 and "PASS" or "FAIL", ok and string.format(
    "aux loss alone after a full step: flat gradients vs the ranks' average by hand max rel %.2e; of the last " ..
    "expert bank's %d gradient elements (its backward did not run) %d held the last step's values, %d still do (rank 0)",
    err, res.bank, res.stale, res.left) or ("error: " .. tostring(res):gsub("\n", " | ")))
end

------------------------------------------------------------------ (4) throughput, DP=2
local big_corpus = moe.data.corpus{seed = 1, num_bytes = 2000000}
local function quick()
  local m = moe.arch.Mixtral{vocab_size = 256, hidden_size = 128, num_layers = 4, num_heads = 4, num_kv_heads = 2,
                             num_experts = 8, experts_per_token = 2, expert_intermediate_size = 256, seed = 42}
  m:to("cuda")
  return m
end
local function median_rate(history, scale)
  local rates = {}
  for s = math.min(6, #history), #history do rates[#rates + 1] = history[s].tokens_per_s * scale end
  table.sort(rates)
  return rates[math.ceil(#rates / 2)]
end
local tp = {}
do
  local ok, err = pcall(function()
    local dt = moe.distributed.DistributedMoETrainer{model = quick(), progress = false}
    d.barrier()
    local t0 = moe.clock()
    local r = dt:train{train_data = big_corpus, batch_size = 16, seq_len = 128, learning_rate = 2e-3,
                       max_steps = tp_steps, lr_schedule = "constant", seed = 1}
    tp.dp_wall = moe.clock() - t0
    -- every rank steps in lockstep: the global rate is world x the per-rank rate
    tp.dp = median_rate(r.history, world)
    tp.dp_loss = r.history[#r.history].loss
  end)
  if not ok then tp.dp_error = tostring(err); io.stderr:write("rank " .. rank .. " DP throughput: " .. tp.dp_error .. "\n") end
end

dist_run("ep", 2)
-- the global-batch aux loss (routers average f and P over both GPUs, device path)
dist_run("dp_gaux", 1, {aux_loss_coef = 0.5, global_aux_loss = true})
-- sharded experts in bf16 mixed precision (compute copy rebuilt at sharding)
dist_run("ep_bf16", 2, {precision = "bf16"})

------------------------------------------------------------------ references (rank 0, one GPU)
if rank == 0 then
  local ref_model = small(11)
  local ref = moe.MoETrainer{model = ref_model, progress = false, aux_loss_coef = 0.01}
  local rres = ref:train(opts{gradient_accumulation_steps = 2})
  local rparams = ref_model.net:flat_parameters():to("cpu")
  -- one GPU's view of DP=2 step g (0-based): both ranks' micro-batches as one batch of 8 rows
  local function both_at(g)
    local a1, t1 = batch(2 * g)
    local a2, t2 = batch(2 * g + 1)
    local ids, tg = a1:to("cpu"):to_table(), t1:to("cpu"):to_table()
    for _, r in ipairs(a2:to("cpu"):to_table()) do ids[#ids + 1] = r end
    for _, r in ipairs(t2:to("cpu"):to_table()) do tg[#tg + 1] = r end
    return moe.tensor(ids, {dtype = "i64"}), moe.tensor(tg, {dtype = "i64"})
  end
  local function reference(trainer_extra, train_extra)
    local m = small(11)
    local o = {model = m, progress = false, aux_loss_coef = 0.01}
    for k, v in pairs(trainer_extra) do o[k] = v end
    local res = moe.MoETrainer(o):train(opts(train_extra))
    return res, m.net:flat_parameters():to("cpu")
  end
  local refs = {
    dp = {rres, rparams, "dp2_vs_1gpu_accum2", 1e-5},
    ep = {rres, rparams, "ep2_vs_1gpu_accum2", 1e-5},
    zero1 = {rres, rparams, "zero1_dp2_vs_1gpu_accum2", 1e-5},
    zero2 = {rres, rparams, "zero2_dp2_vs_1gpu_accum2", 1e-5},
  }
  do
    local r, p = reference({aux_loss_coef = 0.5}, {batch_fn = both_at, batch_size = 8})
    -- parameters to 5e-5: the global aux sums f and P over the ranks in another
    -- order, and AdamW's normalised step turns last-bit differences of a
    -- near-zero gradient into differences of up to the learning rate
    refs.dp_gaux = {r, p, "dp2_global_aux_vs_1gpu_batch8", 1e-5, 5e-5}
    r, p = reference({precision = "bf16"}, {gradient_accumulation_steps = 2})
    -- bf16: the two runs round in different orders, so only close
    refs.ep_bf16 = {r, p, "ep2_bf16_vs_1gpu_bf16", 3e-2}
    r, p = reference({}, {gradient_accumulation_steps = 4})
    refs.dp_accum2 = {r, p, "dp2_accum2_vs_1gpu_accum4", 1e-5}
    -- the moments' rounding is the same on both sides, but the gradients
    -- differ in their last bits (sum orders), which can move a rounding
    r, p = reference({optimizer_state = "bf16"}, {gradient_accumulation_steps = 2})
    refs.zero1_bf16m = {r, p, "zero1_bf16_moments_vs_1gpu", 1e-4}
    refs.zero2_bf16m = {r, p, "zero2_bf16_moments_vs_1gpu", 1e-4}
  end
  for _, name in ipairs{"dp", "zero1", "zero2", "zero1_bf16m", "zero2_bf16m", "dp_accum2", "ep", "dp_gaux", "ep_bf16"} do
    local r = runs[name]
    local rres, rparams, label, tol = refs[name][1], refs[name][2], refs[name][3], refs[name][4]
    local ptol = refs[name][5] or tol
    if r.error then
      result(label, "FAIL", "error: " .. r.error:gsub("\n", " | "))
    else
      local worst, aux, rows = 0, 0, {}
      for s = 1, train.max_steps do
        local a, b = r.history[s].loss, rres.history[s].loss
        local e = math.abs(a - b) / math.abs(b)
        worst = math.max(worst, e)
        aux = math.max(aux, math.abs(r.history[s].aux_loss - rres.history[s].aux_loss) / math.abs(rres.history[s].aux_loss))
        rows[#rows + 1] = string.format("%.6f/%.6f", a, b)
      end
      local pe = maxrel(r.params, rparams)
      -- the final parameters too, and both ranks must hold the same ones
      result(label, (worst <= tol and aux <= tol and pe <= ptol and r.same == 0) and "PASS" or "FAIL",
        string.format("losses (%s) max rel %.2e, aux max rel %.2e, final params max rel %.2e, ranks equal %.1e",
          table.concat(rows, " "), worst, aux, pe, r.same))
    end
  end
  -- single-GPU throughput, same model and batches per step per GPU
  local ok, err = pcall(function()
    local tr = moe.MoETrainer{model = quick(), progress = false}
    local t0 = moe.clock()
    local r = tr:train{train_data = big_corpus, batch_size = 16, seq_len = 128, learning_rate = 2e-3,
                       max_steps = tp_steps, lr_schedule = "constant", seed = 1}
    tp.one_wall = moe.clock() - t0
    tp.one = median_rate(r.history, 1)
  end)
  if not ok then tp.one_error = tostring(err) end
  if tp.dp_error or tp.one_error then
    result("throughput", "FAIL", (tp.dp_error or "") .. " " .. (tp.one_error or ""))
  else
    result("throughput_1gpu", string.format("%.0f", tp.one),
      string.format("tokens/s median steps 6-%d, batch 16x128 (%d steps in %.2f s)", tp_steps, tp_steps, tp.one_wall))
    result("throughput_dp2", string.format("%.0f", tp.dp),
      string.format("tokens/s global (2 x per-rank median), 2 x 16x128 per step (%d steps in %.2f s); speed-up %.2fx, scaling efficiency %.0f%%",
        tp_steps, tp.dp_wall, tp.dp / tp.one, 100 * tp.dp / (2 * tp.one)))
  end
end
-- rank 1 waits for rank 0's references (the communicator may be broken after an EP failure)
pcall(d.barrier)
print("DONE " .. rank)
