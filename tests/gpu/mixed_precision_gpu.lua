-- GPU check (tests/gpu/run.sh): bf16 mixed precision against f32 on the same
-- CUDA model. Prints TAP. Without a GPU: "1..0 # SKIP no CUDA device".
--   build/cuda/moelab tests/gpu/mixed_precision_gpu.lua
local moe = require "moelab"
local core = require "moelab.core"
local tap = dofile((arg[0]:match("^(.*/)") or "./") .. "tap.lua")
if tap.skip_without_cuda() then return end
local ok, rel_l2 = tap.ok, tap.rel_l2

local corpus = moe.data.corpus{seed = 3, num_bytes = 400000}
local function make()
  return moe.arch.OLMoE{vocab_size = 256, hidden_size = 128, num_layers = 2, num_heads = 4, num_experts = 8,
                        experts_per_token = 2, expert_intermediate_size = 128, seed = 7, device = "cuda"}
end

-- forward and gradients of one batch
local ids, targets = corpus:batch{batch_size = 8, seq_len = 64, seed = 1, step = 0}
local ref, mp = make(), make()
mp:set_precision("bf16")
ok(mp:precision() == "bf16" and ref:precision() == "f32", "precision() reports the compute dtype")
local pv, pg, pc = mp.net:flat_parameters()
ok(pv:dtype() == "f32" and pg:dtype() == "bf16" and pc ~= nil and pc:dtype() == "bf16",
  "bf16 precision: f32 values, bf16 gradients and compute copy",
  string.format("%s/%s/%s", pv:dtype(), pg:dtype(), pc and pc:dtype() or "nil"))
local o1 = ref:forward(ids, {targets = targets, aux_loss_coef = 0.01})
local o2 = mp:forward(ids, {targets = targets, aux_loss_coef = 0.01})
ok(o2.loss:dtype() == "f32" and o2.logits:dtype() == "bf16", "loss is f32, logits bf16 under bf16 precision",
  o2.loss:dtype() .. "/" .. o2.logits:dtype())
local l1, l2 = o1.loss:item(), o2.loss:item()
ok(math.abs(l1 - l2) / l1 < 2e-2, "bf16 loss matches f32", string.format("%.5f vs %.5f", l2, l1))
o1.tape:backward(o1.total_loss)
o2.tape:backward(o2.total_loss)
local worst, worst_name = 0, ""
local p1, p2 = ref:parameters(), mp:parameters()
for i = 1, #p1 do
  local e = rel_l2(p2[i].grad, p1[i].grad)
  if e > worst then worst, worst_name = e, p1[i].name end
end
ok(worst < 0.1, "bf16 gradients match f32 per parameter (relative L2)", string.format("worst %.3g at %s", worst, worst_name))
local _, g1 = ref.net:flat_parameters()
local _, g2 = mp.net:flat_parameters()
local e = rel_l2(g2, g1)
ok(e < 3e-2, "bf16 flat gradient matches f32 (relative L2)", string.format("%.3g", e))
local n1, n2 = core.grad_norm(ref.net), core.grad_norm(mp.net)
ok(math.abs(n1 - n2) / n1 < 3e-2, "gradient norm of bf16 gradients (f32 sum of squares)", string.format("%.4f vs %.4f", n2, n1))

-- training: loss curves of f32 and bf16 stay close; the compute copy tracks the master weights
local function train(precision, steps)
  local m = make()
  local tr = moe.MoETrainer{model = m, progress = false, precision = precision}
  local r = tr:train{train_data = corpus, batch_size = 16, seq_len = 64, learning_rate = 2e-3, max_steps = steps,
                     lr_schedule = "constant", seed = 1}
  return m, r
end
local steps = 40
local mf, rf = train("f32", steps)
local mb, rb = train("bf16", steps)
local maxd = 0
for s = 1, steps do maxd = math.max(maxd, math.abs(rf.history[s].loss - rb.history[s].loss)) end
ok(maxd < 0.1, "bf16 and f32 loss curves agree over 40 steps",
  string.format("max |diff| %.4f; final %.4f vs %.4f", maxd, rb.history[steps].loss, rf.history[steps].loss))
ok(rb.history[steps].loss < rb.history[1].loss - 0.5, "bf16 training lowers the loss",
  string.format("%.3f -> %.3f", rb.history[1].loss, rb.history[steps].loss))
-- (the trainer's default splits the master: its compute copy rounds ties away from zero, so it
-- equals round-to-nearest-even but where a value lies halfway between two bf16s)
local function rounding_of(v, c)
  local vt, ct, rt = tap.host(v):to_table(), tap.host(c):to_table(), tap.host(v:to("bf16")):to_table()
  local differ, not_ties = 0, 0
  for i = 1, #vt do
    if ct[i] ~= rt[i] then
      differ = differ + 1
      if (ct[i] + rt[i]) / 2 ~= vt[i] or math.abs(ct[i]) < math.abs(rt[i]) then not_ties = not_ties + 1 end
    end
  end
  return differ, not_ties, #vt
end
local v, _, c = mb.net:flat_parameters()
local differ, not_ties, nv = rounding_of(v, c)
ok(not_ties == 0 and differ < nv / 1000 and rel_l2(c, v:to("bf16")) < 1e-4,
  "after AdamW steps the compute copy is the master weights rounded to bf16 (ties away from zero)",
  string.format("%d of %d differ from round-to-nearest-even, %d of them not ties", differ, nv, not_ties))

-- checkpoints hold the f32 master weights; a reload into an f32 model is exact
local dir = os.tmpname()
os.remove(dir)
require("moelab.checkpoint").save_model(mb, dir)
local back = moe.load(dir)
local pa, pb = mb:parameters(), back:parameters()
local exact = #pa == #pb
for i = 1, #pa do
  if exact and rel_l2(pb[i].value, pa[i].value) ~= 0 then exact = false end
end
ok(exact, "save under bf16 precision, load: f32 master weights round-trip exactly")
os.execute("rm -rf '" .. dir .. "'")

-- The split master (MoETrainer's master_weights = "split", its default under bf16): while the
-- optimizer trains, the f32 master weights are the compute copy plus a 16-bit low plane, and the
-- f32 buffer's memory is given back; reading or writing the values brings them back (a join),
-- and the next step splits what is there then.
do
  local function run(master, steps, hook, graph)
    local m = make()
    local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", master_weights = master,
                              cuda_graph = graph or false}
    local function batch(i)
      if hook then hook(i, m) end
      return corpus:batch{batch_size = 16, seq_len = 64, seed = 1, step = i}
    end
    local r = tr:train{batch_fn = batch, batch_size = 16, seq_len = 64, learning_rate = 2e-3, max_steps = steps,
                       lr_schedule = "constant"}
    return m, r, tr
  end
  local function same(a, b) return (tap.host(a) - tap.host(b)):abs():max():item() == 0 end
  -- one step: the gradients came from the same compute copy, so the master's bits are the f32 run's
  local ms = run("split", 1)
  local mf = run("f32", 1)
  local st = ms.net:master_state()
  ok(st.split and st.splits == 1 and st.joins == 0, "split master: split by the first step, not joined by training",
    string.format("split %s, %d splits, %d joins", tostring(st.split), st.splits, st.joins))
  ok(not mf.net:master_state().split and mf.net:master_state().splits == 0, "master_weights = \"f32\" never splits")
  local n = ms.net:flat_parameters():numel()
  local before = core.cuda_memory_stats(0).in_use
  local vs = ms.net:flat_parameters()
  local grown = core.cuda_memory_stats(0).in_use - before
  ok(grown == 0, "split master: handing the values to Lua does not join them", string.format("%d bytes", grown))
  local vf = mf.net:flat_parameters()
  local exact = same(vs, vf)
  st = ms.net:master_state()
  grown = core.cuda_memory_stats(0).in_use - before
  ok(exact, "split master: after a step the f32 values are the f32 master's bits")
  ok(not st.split and st.joins == 1 and grown >= 4 * n and grown < 4 * n + 2 ^ 21,
    "split master: reading the values joins them once, into the 4 bytes a parameter given back",
    string.format("%d joins, %d bytes for %d parameters", st.joins, grown, n))

  -- six steps, a norm's weight written before step 4 (refresh, as after any write): the write trains on,
  -- the split is made again, and the run is the f32 master's bit for bit (the compute copy rounds
  -- alike either way)
  local function poke(i, m)
    if i == 3 then
      m.net:param("norm.weight"):fill(0.25)
      m:refresh()
    end
  end
  local m6s, r6s = run("split", 6, poke)
  local m6f, r6f = run("f32", 6, poke)
  st = m6s.net:master_state()
  ok(st.split and st.splits == 2 and st.joins == 1, "split master: a write between steps joins once and the next step splits",
    string.format("split %s, %d splits, %d joins", tostring(st.split), st.splits, st.joins))
  local maxd = 0
  for i = 1, 6 do maxd = math.max(maxd, math.abs(r6s.history[i].loss - r6f.history[i].loss)) end
  local w = tap.host(m6s.net:param("norm.weight"))
  local wmax, wmin = w:max():item(), w:min():item()
  ok(maxd == 0 and wmax < 0.27 and wmin > 0.23, "split master: six steps give the f32 master's losses, with the write",
    string.format("max |loss diff| %.2g; the written weight now in [%.4f, %.4f]", maxd, wmin, wmax))
  ok(same(m6s.net:flat_parameters(), m6f.net:flat_parameters()),
    "split master: six steps give the f32 master's weights, bit for bit", string.format("rel %.2g",
      rel_l2(m6s.net:flat_parameters(), m6f.net:flat_parameters())))

  -- the step as a CUDA graph: values read between replays are joined, and the next replay is
  -- preceded by a split (the optimizer's prepare); the same bits as the f32 master's graph doing
  -- the same. (Not as eager steps: with the offsets on the host the expert weight gradients may
  -- be cut into chunks, which sums them in another order.)
  local sums = {}
  local function peek(i, m)
    if i == 2 then sums[#sums + 1] = tap.host(m.net:param("norm.weight")):sum():item() end
  end
  local mg, _, tg = run("split", 5, peek, true)
  local me = run("f32", 5, peek, true)
  st = mg.net:master_state()
  ok(tg.graph_info ~= nil and st.splits == 2 and st.joins == 1,
    "split master, CUDA graph: a read between replays joins, the next replay splits first",
    string.format("graph %s, %d splits, %d joins", tostring(tg.graph_info ~= nil), st.splits, st.joins))
  ok(same(mg.net:flat_parameters(), me.net:flat_parameters()) and sums[1] == sums[2],
    "split master, CUDA graph: the f32 master's bits, read included",
    string.format("sums %s / %s", tostring(sums[1]), tostring(sums[2])))
end

-- back to f32: gradients f32 again, training continues
mb:set_precision("f32")
local _, g3, c3 = mb.net:flat_parameters()
ok(g3:dtype() == "f32" and c3 == nil and mb:precision() == "f32", "set_precision('f32') drops the compute copy")

-- a taped cross-entropy on the GPU with grad_in_forward = false (the trainer's
-- evaluations): the same loss as with the gradient written in the forward, and
-- a backward still gives the gradient (against that one and the CPU's)
do
  local N, V = 64, 1000
  local tt = {}
  for i = 1, N do tt[i] = (i * 37) % V end
  tt[5] = -100
  local tg = moe.tensor(tt, {dtype = "i64"})
  local lg, tgd = moe.randn({N, V}, {seed = 41}):to("cuda"):to("bf16"), tg:to("cuda")
  local t1 = moe.Tape()
  local l1 = t1:cross_entropy(lg, tgd)
  t1:backward(l1)
  local g1 = t1:grad(lg):clone()
  local t2 = moe.Tape()
  local l2 = t2:cross_entropy(lg, tgd, {grad_in_forward = false})
  ok(l1:item() == l2:item(), "cuda cross-entropy with grad_in_forward = false: the same loss",
    string.format("%.6f / %.6f", l1:item(), l2:item()))
  t2:backward(l2)
  local g2 = t2:grad(lg)
  local e12 = rel_l2(g2, g1)
  ok(e12 < 1e-2, "cuda cross-entropy with grad_in_forward = false: backward gives the gradient", string.format("rel %.2g", e12))
  local lc = lg:to("cpu"):to("f32")
  local t3 = moe.Tape()
  local l3 = t3:cross_entropy(lc, tg)
  t3:backward(l3)
  local e3 = rel_l2(g2, t3:grad(lc))
  ok(math.abs(l3:item() - l2:item()) < 1e-2 * math.abs(l3:item()) and e3 < 2e-2,
    "cuda cross-entropy with grad_in_forward = false: loss and gradient match the CPU",
    string.format("%.5f / %.5f, rel %.2g", l2:item(), l3:item(), e3))
end

-- the loss's gradient written over the logits (overwrite_logits, the
-- trainer's way): the same loss and gradient bytes as into a new tensor, in
-- bf16 and f32, the gradient in the logits' own memory; a row wider than
-- shared memory (the kernel re-reads it from global memory) too
do
  for _, case in ipairs{{"bf16", 1000}, {"f32", 1000}, {"bf16", 150000}} do
    local dt, V = case[1], case[2]
    local N = 16
    local tt = {}
    for i = 1, N do tt[i] = (i * 7919) % V end
    tt[3] = -100
    local tgd = moe.tensor(tt, {dtype = "i64"}):to("cuda")
    local base = moe.randn({N, V}, {seed = 43}):to("cuda"):to(dt)
    local t1 = moe.Tape()
    local l1 = t1:cross_entropy(base, tgd)
    t1:backward(l1)
    local g1 = t1:grad(base):clone()
    local lg = base:clone()
    local t2 = moe.Tape()
    local l2 = t2:cross_entropy(lg, tgd, {overwrite_logits = true})
    t2:backward(l2)
    local g2 = t2:grad(lg)
    local d = (g2:to("f32") - g1:to("f32")):abs():max():item()
    local same_mem = (lg:to("f32") - g1:to("f32")):abs():max():item()
    ok(l1:item() == l2:item() and d == 0 and same_mem == 0,
      string.format("cuda cross-entropy over the logits [%s, V %d]: the same loss and gradient bytes, in the logits' memory", dt, V),
      string.format("loss %.6f / %.6f, max diff %g, logits vs gradient %g", l1:item(), l2:item(), d, same_mem))
    -- the logits are gone: a second backward is refused rather than computed from the gradient
    local ok2, err2 = pcall(function() t2:backward(l2) end)
    ok(not ok2 and tostring(err2):find("one backward only", 1, true) ~= nil,
      string.format("cuda cross-entropy over the logits [%s, V %d]: a second backward is refused", dt, V), tostring(err2))
  end
end

-- the model's forward with keep_logits = false (the trainer's): no [tokens,
-- vocab] gradient tensor besides the logits, the same loss and gradient bytes
do
  local m = moe.arch.OLMoE{vocab_size = 8192, hidden_size = 128, num_layers = 2, num_heads = 4, num_experts = 8,
                           experts_per_token = 2, expert_intermediate_size = 128, seed = 9, device = "cuda"}
  m:set_precision("bf16")
  m:train(true)
  local ids2, tg2 = corpus:batch{batch_size = 8, seq_len = 64, seed = 2, step = 0}
  local function run(keep)
    m.net:zero_grad()
    collectgarbage(); collectgarbage()
    moe.synchronize("cuda")
    local before = core.cuda_memory_stats(0).in_use
    local out = m:forward(ids2, {targets = tg2, aux_loss_coef = 0.01, keep_logits = keep})
    moe.synchronize("cuda")
    local held = core.cuda_memory_stats(0).in_use - before
    out.tape:backward(out.total_loss)
    local _, g = m.net:flat_parameters()
    local loss = out.loss:item()
    out.tape:reset()
    return loss, g:to("f32"), held, out.logits
  end
  local la, ga, ha, lga = run(true)
  lga:free()
  local lb, gb, hb, lgb = run(false)
  -- keep_logits = false takes the chunked head and loss: the head weight's
  -- gradient is summed over chunks in bf16, so the gradients agree to rounding
  local e = rel_l2(gb, ga)
  local logit_bytes = 8 * 64 * 8192 * 2
  ok(math.abs(la - lb) <= 1e-3 * la and e < 2e-2 and lgb == nil and ha - hb >= logit_bytes,
    "cuda model forward with keep_logits = false: the same loss and gradients to rounding, no [tokens, vocab] tensor held",
    string.format("loss %.6f / %.6f, relative L2 %.3g, held after the forward %.1f / %.1f MB", la, lb, e, ha / 1e6,
                  hb / 1e6))
end

-- the MoE layers without their experts' rows and outputs on the tape
-- (set_keep_expert_rows(false), the default: the SwiGLU GEMMs gather the rows in
-- their loads, and the combine's weights get their gradient in the down
-- projection's backward epilogue, in bf16; f32 keeps a separate combine): the
-- same loss, the gradients of keeping them to rounding, in bf16 and f32
do
  for _, precision in ipairs{"bf16", "f32"} do
    local m = moe.arch.OLMoE{vocab_size = 512, hidden_size = 256, num_layers = 2, num_heads = 4, num_experts = 8,
                             experts_per_token = 2, expert_intermediate_size = 128, seed = 11, device = "cuda"}
    m:set_precision(precision)
    m:train(true)
    local ids3, tg3 = corpus:batch{batch_size = 8, seq_len = 64, seed = 5, step = 0}
    local function run(keep)
      m:set_keep_expert_rows(keep)
      m.net:zero_grad()
      local out = m:forward(ids3, {targets = tg3, aux_loss_coef = 0.01, keep_logits = false})
      local names = {}
      for _, r in ipairs(out.tape:memory()) do names[r.name] = true end
      out.tape:backward(out.total_loss)
      local _, g = m.net:flat_parameters()
      local loss = out.loss:item()
      out.tape:reset()
      return loss, g:to("f32"), names
    end
    local la, ga, na = run(true)
    local lb, gb, nb = run(false)
    local e = rel_l2(gb, ga)
    local tol = precision == "bf16" and 1e-2 or 1e-5
    -- the combine folds in only where one fused kernel does its backward (bf16)
    local folded = precision == "bf16"
    ok(la == lb and e < tol and na.dispatch and na.combine and not nb.dispatch and (not nb.combine) == folded,
      "cuda " .. precision .. ": the experts' rows and outputs not kept: the same loss, the gradients to rounding",
      string.format("loss %.6f / %.6f, rel l2 %.3g (tol %g)", la, lb, e, tol))
    -- "auto" (the default): not kept where the GEMMs gather (bf16), kept elsewhere (f32)
    local lc, gc2, nc = run("auto")
    local same = precision == "bf16" and (gc2 - gb):abs():max():item() == 0 or (gc2 - ga):abs():max():item() == 0
    ok(lc == la and same and (not nc.dispatch) == folded and (not nc.combine) == folded,
      "cuda " .. precision .. ": set_keep_expert_rows(\"auto\") " .. (folded and "gathers in the GEMMs" or "keeps the rows"),
      string.format("dispatch entry %s, combine entry %s", tostring(nc.dispatch), tostring(nc.combine)))
  end
end

-- the combine folded into experts that keep their rows (the default where
-- the own kernel does not take the GEMMs and so cannot gather the rows: the
-- TMA kernel's shapes; MOELAB_MOE_FOLD=1 forces it elsewhere): against the
-- unfolded layer (set_keep_expert_rows(true): a dispatch and a combine entry,
-- the experts' outputs kept) the same output bytes, the gradients to bf16
-- rounding (dw from the down projection's GEMM, in another order), and the
-- tape holds neither entry
do
  local ffi = require "ffi"
  pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")
  -- 32768 rows over 8 experts, d = 2048: the TMA kernel's calls; then a small
  -- layer the own kernel serves, where only MOELAB_MOE_FOLD=1 keeps the rows
  for _, c in ipairs{{T = 8192, d = 2048, de = 1024, E = 8, k = 4, fold = nil},
                     {T = 1024, d = 256, de = 128, E = 8, k = 2, fold = "1"}} do
    local layer = moe.nn.MoE{hidden_size = c.d, num_experts = c.E, experts_per_token = c.k,
                             expert_intermediate_size = c.de, seed = 3}
    layer:train(true)
    layer:to("cuda")
    layer:set_precision("bf16")
    local x = moe.randn({c.T, c.d}, {seed = 4, device = "cuda"}):to("bf16")
    local dy = moe.randn({c.T, c.d}, {seed = 5, device = "cuda"}):to("bf16")
    local function run(keep, fold)
      layer:set_keep_expert_rows(keep)
      if fold then ffi.C.setenv("MOELAB_MOE_FOLD", fold, 1) end
      layer:zero_grad()
      local tape = moe.Tape()
      local okr, y = pcall(layer.forward, layer, x, tape)
      ffi.C.unsetenv("MOELAB_MOE_FOLD")
      assert(okr, y)
      local names = {}
      for _, r in ipairs(tape:memory()) do names[r.name] = true end
      tape:backward(y, dy)
      local g = {dx = tape:grad(x):to("f32")}
      for _, p in ipairs(layer:parameters()) do g[p.name] = p.grad:to("f32") end
      tape:reset()
      return y:to("f32"), g, names
    end
    local ya, ga, na = run(true)   -- rows and outputs kept, no fold
    local yb, gb, nb = run("auto", c.fold)
    local worst, at = 0, ""
    for name, g in pairs(ga) do
      local e = rel_l2(gb[name], g)
      if e > worst then worst, at = e, name end
    end
    local what = string.format("T=%d d=%d d_e=%d E=%d top-%d%s", c.T, c.d, c.de, c.E, c.k,
                               c.fold and " (MOELAB_MOE_FOLD=1)" or " (default)")
    ok((ya - yb):abs():max():item() == 0 and worst < 1e-2 and na.dispatch and na.combine and not nb.dispatch and
       not nb.combine,
      "cuda bf16 MoE layer, the combine folded into experts that keep their rows, " .. what ..
        ": the unfolded layer's output, its gradients to rounding, no dispatch or combine entry",
      string.format("worst rel l2 %.3g at %s; entries: dispatch %s/%s, combine %s/%s", worst, at,
                    tostring(na.dispatch), tostring(nb.dispatch), tostring(na.combine), tostring(nb.combine)))
  end
end

-- the trainer's update queued on the device (norm, clip factor and NaN guard in
-- the AdamW kernels, values read after queuing it) against the host path (a
-- no-op gradient hook takes it): the same norms, losses, step count and bytes,
-- with clipping active and two micro-batches a step
do
  local function run(host)
    local m = make()
    m:set_precision("bf16")
    local tr = moe.MoETrainer{model = m, progress = false, grad_clip = 0.05, grad_hook = host and function() end or nil}
    local r = tr:train{train_data = corpus, batch_size = 4, seq_len = 32, learning_rate = 2e-3, max_steps = 3,
                       gradient_accumulation_steps = 2, seed = 2}
    return r, m.net:flat_parameters(), tr.optimizer:step_count()
  end
  local rd, pd, cd = run(false)
  local rh, ph, ch = run(true)
  local same = cd == ch and cd == 3
  for s = 1, 3 do
    same = same and rd.history[s].grad_norm == rh.history[s].grad_norm and rd.history[s].loss == rh.history[s].loss
           and rd.history[s].grad_norm > 0.05
  end
  ok(same and (pd - ph):abs():max():item() == 0,
    "cuda: the update clipped on the device equals the host path's (norms, losses, steps, params)",
    string.format("norm %.6g / %.6g, steps %d / %d", rd.history[3].grad_norm, rh.history[3].grad_norm, cd, ch))
end

-- AdamW over one run of every parameter (the plain kernel, across the zero
-- padding) against a run a parameter (alternating decay flags without weight
-- decay: the same arithmetic; the runs kernel, ops.h cfg.runs), one call a
-- step each: the same bytes in f32 and in bf16 (the compute copy too), on a
-- model whose sizes leave padding; in a run a parameter its partial last group
-- goes through the runs kernel's element loop, in one run through the vector one
do
  local function model_and_grads(precision)
    local m = moe.arch.Mixtral{vocab_size = 259, hidden_size = 28, num_layers = 2, num_heads = 2, num_experts = 3,
                               experts_per_token = 2, expert_intermediate_size = 20, seed = 5, device = "cuda"}
    if precision == "bf16" then m:set_precision("bf16") end
    local bi, bt = corpus:batch{batch_size = 2, seq_len = 8, seed = 1, step = 0}
    local out = m:forward(bi, {targets = bt})
    out.tape:backward(out.total_loss)
    return m
  end
  for _, precision in ipairs{"f32", "bf16"} do
    local a, b = model_and_grads(precision), model_and_grads(precision)
    local all, alt = {}, {}
    for i = 1, #a:parameters() do all[i], alt[i] = true, i % 2 == 0 end
    local oa = core.adamw(a.net, {weight_decay = 0, decay = all})
    local ob = core.adamw(b.net, {weight_decay = 0, decay = alt})
    for _ = 1, 2 do oa:step(1e-2); ob:step(1e-2) end
    local va, _, ca = a.net:flat_parameters()
    local vb, _, cb = b.net:flat_parameters()
    local ma, sa = oa:state()
    local mb, sb = ob:state()
    local d = math.max((va - vb):abs():max():item(), (ma - mb):abs():max():item(), (sa - sb):abs():max():item())
    if ca then d = math.max(d, (ca:to("f32") - cb:to("f32")):abs():max():item()) end
    ok(d == 0 and oa:launches() == 2 and ob:launches() == 2,
      "cuda " .. precision .. ": AdamW in runs of one setting equals runs of alternating settings, bit for bit, "
        .. "one call a step each",
      string.format("max diff %g, calls %d / %d", d, oa:launches(), ob:launches()))
  end
end

-- the head and the loss in chunks (model:forward_loss, the trainer's path) on the
-- GPU in bf16: the plain path's loss and gradients up to bf16 rounding (the
-- chunks' head-weight gradients are summed in bf16), no logits on the tape,
-- one backward only
do
  local m = make()
  m:set_precision("bf16")
  local function grads_of(fn)
    m.net:zero_grad()
    local tape = moe.core.Tape()
    local loss = fn(tape)
    tape:backward(loss)
    local _, g = m.net:flat_parameters()
    return loss:item(), g:to("f32"):clone(), tape
  end
  local l0, g0 = grads_of(function(tape)
    return tape:cross_entropy(m.net:forward(ids:to("cuda"), tape), targets:to("cuda"), {ignore_index = -100})
  end)
  local l1, g1, tape = grads_of(function(tape)
    return m.net:forward_loss(ids:to("cuda"), targets:to("cuda"), tape, {chunk_rows = 100})
  end)
  ok(math.abs(l1 - l0) <= 2e-3 * l0, "forward_loss in chunks of 100 rows: the plain loss (bf16)",
    string.format("%.5f vs %.5f", l1, l0))
  local e = rel_l2(g1, g0)
  ok(e < 2e-2, "forward_loss in chunks: the plain path's gradients (relative L2, bf16)", string.format("%.3g", e))
  local tape2 = moe.core.Tape()
  local loss = m.net:forward_loss(ids:to("cuda"), targets:to("cuda"), tape2)
  local names = {}
  for _, r in ipairs(tape2:memory()) do names[r.name] = r.bytes end
  ok(names.linear_cross_entropy ~= nil and names.cross_entropy == nil, "the tape holds the chunked head's entry, no logits")
  tape2:backward(loss)
  local okb, err = pcall(tape2.backward, tape2, loss)
  ok(not okb and tostring(err):find("one backward only", 1, true) ~= nil, "forward_loss: a second backward is refused",
    tostring(err))
end

-- bf16 AdamW moments on the GPU: the loss curve of bf16 precision with them stays
-- with the f32-moment one; the moments are bf16 on the GPU, the master weights f32
do
  local m = make()
  local tr = moe.MoETrainer{model = m, progress = false, precision = "bf16", optimizer_state = "bf16"}
  local r = tr:train{train_data = corpus, batch_size = 16, seq_len = 64, learning_rate = 2e-3, max_steps = steps,
                     lr_schedule = "constant", seed = 1}
  local d = 0
  for s = 1, steps do d = math.max(d, math.abs(r.history[s].loss - rb.history[s].loss)) end
  ok(d < 0.1, "bf16 moments: the loss curve stays with f32 moments' over 40 steps",
    string.format("max |diff| %.4f; final %.4f vs %.4f", d, r.history[steps].loss, rb.history[steps].loss))
  local sm, sv = tr.optimizer:state()
  ok(sm:dtype() == "bf16" and sv:dtype() == "bf16" and sm:device() == "cuda:0",
    "MoETrainer{optimizer_state = \"bf16\"} keeps bf16 moments on the GPU", sm:dtype() .. " " .. sm:device())
  ok(m.net:flat_parameters():dtype() == "f32", "the master weights stay f32 with bf16 moments")
end

-- speed: tokens/s of both on a larger model (informational)
local function rate(r)
  local xs = {}
  for s = 6, #r.history do xs[#xs + 1] = r.history[s].tokens_per_s end
  table.sort(xs)
  return xs[math.ceil(#xs / 2)]
end
print(string.format("# small model: f32 %.0f tokens/s, bf16 %.0f tokens/s", rate(rf), rate(rb)))
tap.done()
