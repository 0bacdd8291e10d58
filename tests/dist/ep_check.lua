-- Run by tests/dist_spec.lua under `mpirun -np 2 ./moelab tests/dist/ep_check.lua`.
-- Expert parallelism (EP = 2 = world size): each rank computes half the
-- experts of every MoE layer for the rows both ranks route to them. Checks
-- (1) a forward with EP gives each rank the loss of the plain forward on its
-- own batch, with tokens routed to both ranks' experts, and the gradients
-- summed over the ranks equal the plain ones (top-k and expert choice), and (2) EP training
-- reproduces one process with twice the accumulation (losses, aux losses,
-- final parameters to 1e-5 relative), also with ZeRO-2 (sharded over the
-- world). Prints "EP_OK <rank>".
local d = moe.dist
d.init{timeout = 20}
local rank, world = d.rank(), d.world_size()
assert(world == 2, "run with 2 ranks")

local close, close_t, close_n = dofile("tests/dist/common.lua")(rank)

local corpus = moe.data.corpus{seed = 7, num_bytes = 40000}
local function model(seed, extra)
  local cfg = {vocab_size = 256, hidden_size = 16, num_layers = 2, num_heads = 2, num_experts = 4,
               experts_per_token = 2, expert_intermediate_size = 16, seed = seed}
  for k, v in pairs(extra or {}) do cfg[k] = v end
  return moe.MoEModel(cfg)
end
local function batch(g) return corpus:batch{batch_size = 2, seq_len = 8, seed = 3, step = g} end

-- (1) forward and backward of one batch per rank, EP against the plain model:
-- each rank's loss is its plain loss, and the gradients summed over the ranks
-- are the plain gradients summed over the ranks (every token's contribution
-- reaches every parameter once, wherever its expert ran). Top-k moves token
-- rows; expert choice (no slot map) moves one row per choice.
local function loss_and_grads(m, ids, targets)
  m:zero_grad()
  local out = m:forward(ids, {targets = targets})
  out.tape:backward(out.loss)
  local loss = out.loss:item()
  out.tape:reset()
  local _, g = m.net:flat_parameters()
  return loss, d.all_reduce(g:clone(), "sum")
end
for _, cfg in ipairs{{name = "top-k"}, {name = "top-k, all_gather", gather = true},
                     {name = "expert choice", extra = {router = "expert_choice", capacity_factor = 1}}} do
  local m = model(11, cfg.extra)
  m:train(true)   -- the gathered path serves training-mode forwards
  local ids, targets = batch(rank)
  local want, want_g = loss_and_grads(m, ids, targets)
  assert(d.set_expert_parallel(m.net, true) == 2, "two MoE layers")
  if cfg.gather then
    local sh = ids:shape()
    assert(d.set_ep_gather(m.net, sh[1] * sh[2]) == 2, "two MoE layers gather")
  end
  local got, got_g = loss_and_grads(m, ids, targets)
  close(got, want, 1e-5, cfg.name .. ": EP forward loss")
  close_n(got_g, want_g, 1e-5, cfg.name .. ": EP gradients summed over the ranks")
  -- tokens of both ranks reach the experts of both ranks
  for i, s in ipairs(m:routing_stats()) do
    local lo, hi = s.counts[1] + s.counts[2], s.counts[3] + s.counts[4]
    local all = d.all_reduce(moe.tensor({lo, hi}, {dtype = "f64"}), "sum"):to_table()
    assert(all[1] > 0 and all[2] > 0, string.format("%s layer %d: rank 0's experts get %d rows, rank 1's %d", cfg.name,
                                                    i, all[1], all[2]))
  end
  if not cfg.extra then
    -- the data-parallel reduction during backward (block markers) with expert parallelism:
    -- weight-gradient work deferred into a reduced range runs before the range is read
    local function summed_during_backward(skip)
      d.set_grad_allreduce(m.net, true, {op = "sum", skip = skip})
      m:zero_grad()
      d.arm_grad_allreduce(m.net, true)
      local out = m:forward(ids, {targets = targets})
      out.tape:backward(out.loss)
      out.tape:reset()
      d.finish_grad_allreduce(m.net)
      local _, g = m.net:flat_parameters()
      return g
    end
    close_n(summed_during_backward(nil), want_g, 1e-5, cfg.name .. ": EP with the gradients summed during backward")
    -- each deferred job declares exactly the gradients it writes: reduce one expert projection
    -- at a time during backward (everything else skipped) and compare that projection
    local layout, total = m.net:param_layout(), m.net:flat_parameters():numel()
    for _, proj in ipairs{"gate_proj", "up_proj", "down_proj"} do
      local skip, at, mine = {}, 0, {}
      for _, p in ipairs(layout) do
        if p.expert_total and p.name:find(proj, 1, true) then
          skip[#skip + 1] = {at, p.offset}
          at = p.offset + p.numel
          mine[#mine + 1] = p
        end
      end
      skip[#skip + 1] = {at, total}
      assert(#mine == 2, proj .. ": one per MoE layer")
      local gp = summed_during_backward(skip)
      for _, p in ipairs(mine) do
        close_n(gp:narrow(1, p.offset + 1, p.numel), want_g:narrow(1, p.offset + 1, p.numel), 1e-5,
                cfg.name .. ": " .. p.name .. " reduced during backward alone")
      end
    end
    d.set_grad_allreduce(m.net, false)
  end
  if cfg.gather and not os.getenv("MOELAB_EP_EXCHANGE") then
    -- another token count than the one set is refused before anything is exchanged
    local sh = ids:shape()
    d.set_ep_gather(m.net, sh[1] * sh[2] + 1)
    local ok, err = pcall(m.forward, m, ids, {targets = targets})
    assert(not ok and tostring(err):find("set for " .. (sh[1] * sh[2] + 1) .. " tokens per rank", 1, true), tostring(err))
  end
  if cfg.gather then d.set_ep_gather(m.net, false) end
  d.set_expert_parallel(m.net, false)
end

-- (2) training: EP over 2 ranks == one process with gradient_accumulation_steps 2
-- (full-size experts on every rank; epshard_check covers the sharded default)
local train = {max_steps = 3, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1}
local dt = moe.distributed.DistributedMoETrainer{model = model(rank == 0 and 11 or 99), progress = false,
                                                 aux_loss_coef = 0.01, expert_parallel_size = 2, shard_experts = false}
assert(dt.expert_parallel_size == 2 and dt.data_parallel_size == 1)
local o = {}
for k, v in pairs(train) do o[k] = v end
o.batch_fn = batch
local res = dt:train(o)
assert(res.world_size == 2 and res.global_batch_size == 4)
-- evaluation inside a run whose dispatch gathers batch_size x seq_len tokens:
-- 3 windows of 8 in batches of 2 end with a batch of 8 tokens (evaluation moves token rows)
local ev_dt = moe.distributed.DistributedMoETrainer{model = model(11), progress = false, aux_loss_coef = 0.01,
                                                    expert_parallel_size = 2}
assert(ev_dt.expert_parallel_dispatch == "allgather", tostring(ev_dt.expert_parallel_dispatch))
local ev_data = moe.data.from_text("an evaluation of 25 bytes")   -- 25 byte tokens: 3 windows of 8
local eo = {max_steps = 2, batch_size = 2, seq_len = 8, learning_rate = 1e-2, warmup_steps = 1, batch_fn = batch,
            eval_data = ev_data, eval_every = 1}
local ev_res = ev_dt:train(eo)
assert(ev_res.eval and ev_res.eval.tokens == 24, "evaluation inside the gathered run")
local z2 = moe.distributed.DistributedMoETrainer{model = model(rank == 0 and 11 or 99), progress = false,
                                                 aux_loss_coef = 0.01, expert_parallel_size = 2, zero_stage = 2}
local zres = z2:train(o)

if rank == 0 then
  local ref_model = model(11)
  local ref = moe.MoETrainer{model = ref_model, progress = false, aux_loss_coef = 0.01}
  local ro = {}
  for k, v in pairs(train) do ro[k] = v end
  ro.batch_fn, ro.gradient_accumulation_steps = batch, 2
  local rres = ref:train(ro)
  for s = 1, train.max_steps do
    close(res.history[s].loss, rres.history[s].loss, 1e-5, "loss at step " .. s)
    close(res.history[s].aux_loss, rres.history[s].aux_loss, 1e-5, "aux loss at step " .. s)
    close(zres.history[s].loss, rres.history[s].loss, 1e-5, "ZeRO-2 loss at step " .. s)
  end
  close_t(dt.model.net:flat_parameters(), ref_model.net:flat_parameters(), 1e-5, "final parameters")
  close_t(z2.model.net:flat_parameters(), ref_model.net:flat_parameters(), 1e-5, "ZeRO-2 final parameters")
end
-- both ranks end with the same (full-size) parameters, so rank 0 saves the usual layout
local mine = dt.model.net:flat_parameters()
close_t(mine, d.broadcast(mine * 1, 0), 0, "parameters equal across ranks")
d.barrier()
print("EP_OK " .. rank)
