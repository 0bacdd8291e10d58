-- GPU check (tests/gpu/run.sh): CUDA graphs (core.cuda_graph_begin, the
-- allocator's capture pool) and the trainer's captured step (cuda_graph)
-- against eager steps. Prints TAP. Without a GPU: "1..0 # SKIP no CUDA device".
--   build/cuda/moelab tests/gpu/graph_gpu.lua
local moe = require "moelab"
local core = require "moelab.core"
local tap = dofile((arg[0]:match("^(.*/)") or "./") .. "tap.lua")
if tap.skip_without_cuda() then return end
local ok, max_abs = tap.ok, tap.max_abs

-- ---- the graph and its pool ----
do
  core.manual_seed(11)
  local x = core.randn({1000, 257}, {device = "cuda"})
  local g = core.cuda_graph_begin(0)
  ok(core.cuda_capturing(0), "cuda_capturing is true during a capture")
  local t = x * 3          -- a temporary: its block goes back to the graph's pool within the capture
  local y = t + 1
  t:free()
  local z = y * y
  -- a read cannot be held by a graph: refused with the reason, the capture goes on
  local okr, err = pcall(function() return y:to("cpu") end)
  ok(not okr and tostring(err):find("cannot be captured into a CUDA graph", 1, true),
    "a copy to the host inside a capture is refused, naming why", tostring(err))
  local okf, ferr = pcall(g.finish, g)
  ok(okf, "the capture closes and instantiates after a refused op", tostring(ferr))
  ok(not core.cuda_capturing(0), "cuda_capturing is false after finish")
  local info = g:info()
  ok(info.nodes >= 3 and info.launches == 0 and info.pool_bytes > 0, "info: nodes, no launch yet, the pool's bytes",
    string.format("%d nodes, %d launches, %d pool bytes", info.nodes, info.launches, info.pool_bytes))
  -- eager tensors made after the capture, the temporary's size among them: none may
  -- get a block the graph writes
  local keep = {}
  for i = 1, 8 do keep[i] = core.full({1000, 257}, i, {device = "cuda"}) end
  for rep = 1, 3 do
    local xh = core.randn({1000, 257})
    x:copy(xh)
    g:launch()
    local want = (xh * 3 + 1)
    local e1 = max_abs(y, want)
    local e2 = max_abs(z, want * want)
    ok(e1 < 1e-5 and e2 < 1e-3, "replay " .. rep .. " computes from the new input", string.format("%.2g, %.2g", e1, e2))
  end
  local intact = true
  for i = 1, 8 do
    local v = keep[i]:to("cpu")
    if v:min():item() ~= i or v:max():item() ~= i then intact = false end
  end
  ok(intact, "eager tensors made after the capture are never written by its replays")
  ok(g:info().launches == 3, "info counts the launches")
  local before = core.cuda_memory_stats(0).reserved
  g:free()
  y, z = nil, nil
  collectgarbage(); collectgarbage()
  local after = core.cuda_memory_stats(0).reserved
  ok(after < before, "the pool goes back to the driver once the graph and its tensors are freed",
    string.format("%d -> %d bytes reserved", before, after))
  local okl = pcall(g.launch, g)
  ok(not okl, "a freed graph cannot be launched")
  -- a second capture while one runs is refused
  local g1 = core.cuda_graph_begin(0)
  local ok2, e2 = pcall(core.cuda_graph_begin, 0)
  ok(not ok2 and tostring(e2):find("already capturing", 1, true), "one capture at a time per device", tostring(e2))
  g1:free()
  ok(not core.cuda_capturing(0), "freeing a graph mid-capture ends the capture")
end

-- ---- the trainer's captured step against eager steps ----
local corpus = moe.data.corpus{seed = 5, num_bytes = 400000}
local function make()
  return moe.arch.OLMoE{vocab_size = 256, hidden_size = 256, num_layers = 2, num_heads = 4, num_experts = 8,
                        experts_per_token = 2, expert_intermediate_size = 128, seed = 7, device = "cuda"}
end
local B, S = 4, 128
local function batch_fn(bad_at)
  return function(index)
    local ids, targets = corpus:batch{batch_size = B, seq_len = S, seed = 2, step = index}
    if bad_at and index == bad_at then
      local t = targets:to_table()
      t[1][1] = -100   -- an ignored position: the captured loss counted every target
      targets = core.tensor(t, {dtype = "i64"})
    end
    return ids, targets
  end
end
local function train(cg, steps, bad_at, state)
  local m = make()
  local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", optimizer_state = state or "f32",
                            cuda_graph = cg, aux_loss_coef = 0.01}
  local r = tr:train{batch_fn = batch_fn(bad_at), batch_size = B, seq_len = S, learning_rate = 1e-3,
                     warmup_steps = 3, lr_schedule = "cosine", max_steps = steps, save_final = false}
  return r, m, tr
end

for _, state in ipairs{"f32", "bf16"} do
  local steps = 7
  local re, me = train(false, steps, nil, state)
  local rg, mg, tg = train(true, steps, nil, state)
  local same, worst = true, 0
  for s = 1, steps do
    local a, b = rg.history[s].loss, re.history[s].loss
    worst = math.max(worst, math.abs(a - b))
    if a ~= b then same = false end
  end
  ok(same, state .. " moments: the captured step gives the eager losses at every step (warmup and cosine lr)",
    string.format("worst |diff| %.3g; last %.6f vs %.6f", worst, rg.history[steps].loss, re.history[steps].loss))
  local pe, pgv = me.net:flat_parameters(), mg.net:flat_parameters()
  local d = max_abs(pgv, pe)
  ok(d == 0, state .. " moments: the same parameters after the run", string.format("max |diff| %.3g", d))
  ok(tg.optimizer:step_count() == steps, state .. " moments: the step count the device kept",
    tostring(tg.optimizer:step_count()))
  local r1, r2 = rg.history[steps].routing[1], re.history[steps].routing[1]
  local same_load = r1 and r2 and #r1.load == #r2.load
  if same_load then for j = 1, #r1.load do if r1.load[j] ~= r2.load[j] then same_load = false end end end
  ok(same_load and r1.entropy == r2.entropy, state .. " moments: routing statistics read after the replay",
    r1 and string.format("entropy %.5f vs %.5f", r1.entropy, r2.entropy) or "none")
  local rs = mg:routing_stats()
  ok(rs[1] and rs[1].entropy == r1.entropy and mg:moe_layers()[1]:assignments() == nil,
    state .. " moments: after the run the model keeps the last replay's statistics, not its tensors",
    rs[1] and string.format("entropy %.5f", rs[1].entropy) or "none")
end

-- a batch the graph cannot take: the trainer says so and goes on eagerly, with the same result
do
  local steps = 6
  local re = train(false, steps, 3)
  local rg, _, tg = train("auto", steps, 3)
  local same = true
  for s = 1, steps do if rg.history[s].loss ~= re.history[s].loss then same = false end end
  ok(same and tg.step_graph == nil, "an ignored target ends the graph; the steps go on eagerly with the eager losses",
    string.format("last %.6f vs %.6f", rg.history[steps].loss, re.history[steps].loss))
  local okt, err = pcall(train, true, 5, 3)
  ok(not okt and tostring(err):find("targets outside", 1, true), "cuda_graph = true stops on such a batch, saying why",
    tostring(err))
end

-- gradient accumulation, evaluation and checkpoints between steps, and a resume
do
  local function run(cg, dir, steps, resume, accum)
    local m = make()
    local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", cuda_graph = cg, run_dir = dir}
    local r = tr:train{batch_fn = batch_fn(), batch_size = B, seq_len = S, learning_rate = 1e-3, max_steps = steps,
                       lr_schedule = "constant",
                       gradient_accumulation_steps = accum or 1, save_every = dir and 2 or 0, resume = resume,
                       eval_data = dir and corpus or nil, eval_every = dir and 2 or 0, eval_batches = 2,
                       save_final = false}
    return r, m
  end
  local function same_losses(a, b, from, to)
    for s = from, to do if a.history[s].loss ~= b.history[s].loss then return false end end
    return true
  end
  local ra, ma = run(false, nil, 4, nil, 2)
  local rb, mb = run(true, nil, 4, nil, 2)
  ok(same_losses(ra, rb, 1, 4) and max_abs(ma.net:flat_parameters(), mb.net:flat_parameters()) == 0,
    "two micro-batches a step: the captured step gives the eager losses and parameters",
    string.format("last %.6f vs %.6f", rb.history[4].loss, ra.history[4].loss))
  local d1, d2 = os.tmpname(), os.tmpname()
  os.remove(d1); os.remove(d2)
  local re = run(false, d1, 6)
  local rg = run(true, d2, 6)
  local evals = true
  for s = 2, 6, 2 do if re.history[s].eval_loss ~= rg.history[s].eval_loss then evals = false end end
  ok(same_losses(re, rg, 1, 6) and evals, "evaluations and checkpoints every 2 steps: the same losses and evaluations",
    string.format("eval at 6: %.6f vs %.6f", rg.history[6].eval_loss or -1, re.history[6].eval_loss or -1))
  -- resumed from the graph run's step-4 checkpoint... (save_every 2 wrote steps 2, 4, 6: keep 4)
  local d3 = os.tmpname()
  os.remove(d3)
  run(true, d3, 4)
  local rr = run(true, d3, 6, true)
  ok(rr.history[#rr.history].loss == re.history[6].loss and rr.steps == 6,
    "a graph run resumed from its checkpoint continues the eager loss curve",
    string.format("step 6: %.6f vs %.6f", rr.history[#rr.history].loss, re.history[6].loss))
  os.execute("rm -rf '" .. d1 .. "' '" .. d2 .. "' '" .. d3 .. "'")
end

tap.done()
