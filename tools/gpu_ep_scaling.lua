-- Issue 8: expert-parallel scaling of the OLMoE-style 64-expert (top-8) model.
-- One process of tools/gpu_ep_scaling.sh:
--   ./moelab-cuda tools/gpu_ep_scaling.lua ep    (one of 4 ranks: RANK/WORLD_SIZE/..., NCCL,
--                                                 DistributedMoETrainer{expert_parallel_size = world})
--   ./moelab-cuda tools/gpu_ep_scaling.lua one   (one GPU, MoETrainer, same per-GPU batch)
-- Each process trains two configurations one after the other, each from a fresh
-- model: "aux" (the trainer's default auxiliary loss) and "auxfree" (the same
-- plus aux_free = true, aux_free_rate = 1e-3; softmax router scores kept).
-- Steps run in chunks with a constant learning rate (after a short warm-up), so a
-- wall-clock budget per configuration (MOELAB_EP_PHASE_S) can stop a run early;
-- every rank takes rank 0's decision. Per step the routing counts of every MoE
-- layer (model:routing_stats() in the gradient hook; the local micro-batch) are
-- kept; after training they are summed over the ranks (moe.dist.all_reduce) and
-- grouped into the 4 ranks' contiguous expert blocks: imbalance = max/mean
-- tokens per rank, averaged over steps and layers.
-- Prints "RESULT key=value ..." lines (rank 0 / the single process).
-- Environment: MOELAB_EP_PHASE_S (training seconds per configuration, 60),
-- MOELAB_EP_MAX_STEPS (200), MOELAB_EP_SEQ (1024), MOELAB_EP_BATCH (8),
-- MOELAB_EP_WARMUP (steps left out of the medians, 5), MOELAB_EP_CHUNK (5),
-- MOELAB_EP_DEVICE (cuda), MOELAB_EP_BACKEND (nccl), MOELAB_EP_GROUPS (4),
-- MOELAB_EP_TINY=1 (a tiny model, for a CPU check of the script),
-- MOELAB_EP_CONFIGS ("aux,auxfree"), MOELAB_EP_EXPERTS (64), MOELAB_EP_TOPK (8),
-- MOELAB_EP_PRECISION ("f32"; "bf16": mixed precision), MOELAB_EP_SIZE (expert
-- parallel size in "ep" mode, default the world size; 1 = pure data parallel,
-- ranks / MOELAB_EP_SIZE = data parallel size), MOELAB_EP_SHARD (1: each rank keeps
-- only its experts, the trainer's default; 0: full-size experts on every rank).
local moe = require "moelab"
local d = moe.dist
local mode = arg and arg[1] or "one"
assert(mode == "ep" or mode == "one", "usage: gpu_ep_scaling.lua ep|one")
local function env(k, default) local v = os.getenv(k); if v == nil or v == "" then return default end; return v end
local phase_s = tonumber(env("MOELAB_EP_PHASE_S", 60))
local max_steps = tonumber(env("MOELAB_EP_MAX_STEPS", 200))
local seq = tonumber(env("MOELAB_EP_SEQ", 1024))
local bs = tonumber(env("MOELAB_EP_BATCH", 8))
local warm = tonumber(env("MOELAB_EP_WARMUP", 5))
local chunk = tonumber(env("MOELAB_EP_CHUNK", 5))
local device = env("MOELAB_EP_DEVICE", "cuda")
local groups = tonumber(env("MOELAB_EP_GROUPS", 4))
local tiny = env("MOELAB_EP_TINY", "0") == "1"
local n_experts = tonumber(env("MOELAB_EP_EXPERTS", 64))
local top_k = tonumber(env("MOELAB_EP_TOPK", 8))
local precision = env("MOELAB_EP_PRECISION", "f32")
local configs = {}
for c in env("MOELAB_EP_CONFIGS", "aux,auxfree"):gmatch("[^,]+") do configs[#configs + 1] = c end

local rank, world = 0, 1
if mode == "ep" then
  local info = d.init{backend = env("MOELAB_EP_BACKEND", "nccl"), timeout = tonumber(env("MOELAB_DIST_TIMEOUT", 120))}
  rank, world = d.rank(), d.world_size()
  io.stderr:write(string.format("rank %d of %d, backend %s\n", rank, world, tostring(info.backend)))
end
local function say(fmt, ...)
  if rank == 0 then print(string.format(fmt, ...)); io.stdout:flush() end
end
local function bcast_num(x)   -- rank 0's number on every rank
  if mode ~= "ep" then return x end
  return d.broadcast(moe.tensor({x}, {dtype = "f64"}), 0):to_table()[1]
end

local function model_opts(aux_free)
  local o
  if tiny then
    o = {vocab_size = 256, hidden_size = 32, num_layers = 2, num_heads = 4, num_experts = 16,
         expert_intermediate_size = 16, experts_per_token = 4, renormalize = false, seed = 1}
  else
    o = {vocab_size = 50304, hidden_size = 1024, num_layers = 8, num_heads = 16, num_experts = n_experts,
         expert_intermediate_size = 512, experts_per_token = top_k, renormalize = false, seed = 1}
  end
  if aux_free then o.aux_free, o.aux_free_rate = true, 1e-3 end
  return o
end

local corpus = moe.data.corpus{seed = 1, num_bytes = tiny and 200000 or 4000000}

local function median(xs)
  local t = {}
  for i, v in ipairs(xs) do t[i] = v end
  table.sort(t)
  if #t == 0 then return 0 / 0 end
  if #t % 2 == 1 then return t[(#t + 1) / 2] end
  return 0.5 * (t[#t / 2] + t[#t / 2 + 1])
end

local function run_config(name)
  local aux_free = name == "auxfree"
  collectgarbage()
  local t_build = moe.clock()
  local model = moe.arch.OLMoE(model_opts(aux_free))
  model:to(device)
  t_build = moe.clock() - t_build
  local L = #model.net:moe_layers()
  local E = model.config.num_experts
  local counts = {}   -- counts[step] = flat {L * E} local routing counts
  local function hook()
    local st = model:routing_stats()
    local row = {}
    for i = 1, L do
      local s = st[i]
      for e = 1, E do row[(i - 1) * E + e] = s and s.counts[e] or 0 end
    end
    counts[#counts + 1] = row
  end
  local topts = {model = model, progress = false, grad_hook = hook,
                 precision = precision ~= "f32" and precision or nil}
  local tr
  if mode == "ep" then
    topts.expert_parallel_size = tonumber(env("MOELAB_EP_SIZE", world))
    topts.shard_experts = env("MOELAB_EP_SHARD", "1") ~= "0"   -- 0: full-size experts on every rank
    tr = moe.distributed.DistributedMoETrainer(topts)
  else
    tr = moe.MoETrainer(topts)
  end
  say("INFO %s: %.1fM parameters (%.1fM active), %d MoE layers x %d experts, build+to(%s) %.1f s, aux_free=%s, aux_loss_coef=%s",
    name, model:num_params() / 1e6, model:num_active_params() / 1e6, L, E, device, t_build, tostring(aux_free),
    tostring(tr.aux_loss_coef or (tr.inner and tr.inner.aux_loss_coef)))
  local topt = {train_data = corpus, batch_size = bs, seq_len = seq, learning_rate = 3e-4, warmup_steps = 5,
                lr_schedule = "constant", seed = 1}
  if mode == "ep" then d.barrier() end
  local t0 = moe.clock()
  local done, res, stop_reason = 0, nil, "max_steps"
  while done < max_steps do
    topt.max_steps = math.min(max_steps, done + chunk)
    local tc = moe.clock()
    res = tr:train(topt)
    done = topt.max_steps
    local el, dc = moe.clock() - t0, moe.clock() - tc
    local go = bcast_num((el + dc <= phase_s) and 1 or 0)
    if go == 0 and done < max_steps then stop_reason = string.format("time budget %.0f s", phase_s); break end
  end
  local wall = moe.clock() - t0
  local hist = res.history
  -- per-step seconds; in EP the ranks' step times are averaged (they run in lockstep)
  local dts = {}
  for s = 1, #hist do dts[s] = bs * seq / hist[s].tokens_per_s end
  if mode == "ep" then
    dts = d.all_reduce(moe.tensor(dts, {dtype = "f64"}), "avg"):to_table()
  end
  local post = {}
  for s = warm + 1, #dts do post[#post + 1] = dts[s] end
  local step_s = median(post)
  local tokens_per_s = world * bs * seq / step_s
  -- global routing counts
  local n = #counts
  local flat = {}
  for s = 1, n do for j = 1, L * E do flat[#flat + 1] = counts[s][j] end end
  if mode == "ep" then
    assert(bcast_num(n) == n, "ranks recorded different numbers of steps")
    flat = d.all_reduce(moe.tensor(flat, {dtype = "f64"}), "sum"):to_table()
  end
  local per = E / groups
  local function imb(from)
    local sum, cnt, worst = 0, 0, 0
    for s = from, n do
      for i = 1, L do
        local loads, tot, mx = {}, 0, 0
        for g = 1, groups do
          local c = 0
          for e = (g - 1) * per + 1, g * per do c = c + flat[((s - 1) * L + (i - 1)) * E + e] end
          tot, mx = tot + c, math.max(mx, c)
        end
        if tot > 0 then
          local r = mx / (tot / groups)
          sum, cnt, worst = sum + r, cnt + 1, math.max(worst, r)
        end
      end
    end
    return cnt > 0 and sum / cnt or 0 / 0, worst
  end
  local imb_all, imb_worst = imb(1)
  local imb_last = imb(math.max(1, n - math.floor(n / 4) + 1))
  local tokens_step_layer = 0
  for j = 1, E do tokens_step_layer = tokens_step_layer + flat[j] end
  say("RESULT precision=%s ep=%s experts=%d top_k=%d", precision, env("MOELAB_EP_SIZE", tostring(world)), E,
    model.config.experts_per_token)
  say("RESULT mode=%s config=%s world=%d steps=%d stop=%q step_s_median=%.4f tokens_per_s=%.1f wall_s=%.1f "
    .. "loss_first=%.4f loss_last=%.4f imbalance_mean=%.4f imbalance_last_quarter=%.4f imbalance_worst=%.4f "
    .. "assignments_per_layer_step=%d groups=%d",
    mode, name, world, #hist, stop_reason, step_s, tokens_per_s, wall, hist[1].loss, hist[#hist].loss,
    imb_all, imb_last, imb_worst, tokens_step_layer, groups)

  if env("MOELAB_EP_PROFILE", "0") == "1" then
    -- phase times of a few more steps, with a device sync (and a barrier) between phases
    local ids, targets = corpus:batch{batch_size = bs, seq_len = seq, seed = 99, step = rank}
    local ph = {forward = 0, backward = 0, allreduce = 0, forward_host = 0, backward_host = 0}
    local reps = 5
    local function sync() moe.synchronize(device); if mode == "ep" then d.barrier() end end
    local _, grads = model.net:flat_parameters()
    -- DistributedMoETrainer turns expert parallelism on only inside train()
    local ep_on = mode == "ep" and tr.expert_parallel_size and tr.expert_parallel_size > 1
    if ep_on then d.set_expert_parallel(model.net, tr._ep_comm or true) end
    local gather = ep_on and tr.expert_parallel_dispatch == "allgather" and (os.getenv("MOELAB_EP_EXCHANGE") or "") == ""
    if gather then d.set_ep_gather(model.net, bs * seq) end
    local ep_comm = mode == "ep" and (tr._ep_comm or d.comm()) or nil
    local a0
    for i = 1, reps + 1 do
      if i == 2 and ep_comm then a0 = ep_comm:info() end
      sync()
      local t0 = moe.clock()
      local out = model:forward(ids, {targets = targets, aux_loss_coef = 0.01})
      local tf = moe.clock()   -- host done queueing (it waited inside for every sync the forward needs)
      sync()
      local t1 = moe.clock()
      out.tape:backward(out.total_loss)
      local tb = moe.clock()
      sync()
      local t2 = moe.clock()
      if mode == "ep" and world > 1 then d.all_reduce(grads, "avg", {bucket_mb = 25}) end
      sync()
      local t3 = moe.clock()
      out.tape:reset()
      if i > 1 then
        ph.forward, ph.backward, ph.allreduce = ph.forward + t1 - t0, ph.backward + t2 - t1, ph.allreduce + t3 - t2
        ph.forward_host, ph.backward_host = ph.forward_host + tf - t0, ph.backward_host + tb - t1
      end
      model:zero_grad()
    end
    if gather then d.set_ep_gather(model.net, false) end
    if ep_on then d.set_expert_parallel(model.net, false) end
    say("RESULT mode=profile config=%s forward_ms=%.2f backward_ms=%.2f grad_allreduce_ms=%.2f forward_host_ms=%.2f "
      .. "backward_host_ms=%.2f (synced phases, %d steps; host: until the call returned, before the final sync)",
      name, ph.forward / reps * 1e3, ph.backward / reps * 1e3, ph.allreduce / reps * 1e3,
      ph.forward_host / reps * 1e3, ph.backward_host / reps * 1e3, reps)
    if ep_comm and a0 then
      local a1 = ep_comm:info()
      say("RESULT mode=a2a config=%s calls_per_step=%.1f wait_ms_per_step=%.2f exchange_ms_per_step=%.2f "
        .. "(host clock: waiting for queued GPU work before each all_to_all_v, then the exchange itself)",
        name, (a1.a2a_calls - a0.a2a_calls) / reps, (a1.a2a_wait_s - a0.a2a_wait_s) / reps * 1e3,
        (a1.a2a_s - a0.a2a_s) / reps * 1e3)
    end
  end

  if mode == "ep" and world > 1 then
    -- (a) the whole-buffer gradient all-reduce the EP trainer does every step (same call, same buckets)
    local _, grads = model.net:flat_parameters()
    local function timed(fn, reps)
      fn(); d.barrier()
      local t = {}
      for i = 1, reps do
        d.barrier()
        local a = moe.clock()
        fn(); d.barrier()
        t[i] = moe.clock() - a
      end
      return median(t)
    end
    local ar = timed(function() d.all_reduce(grads, "avg", {bucket_mb = 25}) end, 3)
    -- (b) synthetic all_to_all_v: the rows one MoE layer exchanges, evenly split
    -- (bs*seq*k rows of hidden f32 per rank, 1/world to each rank)
    local H, k = model.config.hidden_size, model.config.experts_per_token
    local rows = bs * seq * k
    local x = moe.randn({rows, H}, {seed = 5 + rank}):to(device):to(precision)
    local split = {}
    for r = 1, world do split[r] = math.floor(rows / world) end
    split[world] = rows - (world - 1) * math.floor(rows / world)
    local recv = {}
    for r = 1, world do recv[r] = split[rank + 1] end
    local a2a = timed(function() local y = d.all_to_all_v(x, split, recv); y = nil end, 5)
    x = nil
    say("RESULT mode=comm config=%s grad_allreduce_s=%.4f grad_numel=%d a2a_one_exchange_s=%.4f a2a_rows=%d hidden=%d "
      .. "a2a_per_step_est_s=%.4f (4 exchanges x %d layers, even split, synthetic; %s rows)",
      name, ar, grads:numel(), a2a, rows, H, 4 * L * a2a, L, precision)
  end
  tr, model, res, counts, flat = nil, nil, nil, nil, nil
  collectgarbage(); collectgarbage()
  if mode == "ep" then d.barrier() end
end

for _, c in ipairs(configs) do
  local ok, err = pcall(run_config, c)
  if not ok then
    io.stderr:write(string.format("rank %d: config %s failed: %s\n", rank, c, tostring(err)))
    say("RESULT mode=%s config=%s error=%q", mode, c, tostring(err))
  end
end
if mode == "ep" then pcall(d.barrier) end
print("DONE " .. rank)
