-- The MoE block's one-pass token movement (ops.h: gather_sum,
-- combine_backward) on the CPU: against the index_add formulation it
-- replaces, finite-difference gradients, range errors, and the MoE block
-- with the router's slot map against the same block on its fallback path
-- (MOELAB_MOE_GATHER=0) under top-k with capacity drops.
local moe = require "moelab"
local gc = require "helpers.gradcheck"

local function max_diff(a, b)
  assert.are.same(a:shape(), b:shape())
  local m = 0
  for i = 1, a:numel() do m = math.max(m, math.abs(a:get_flat(i) - b:get_flat(i))) end
  return m
end

-- A hand-made routing of N tokens, k choices each, some dropped: slots
-- [N, k] (i32, -1 = dropped) and token_idx [A] (i64) in a scrambled
-- (expert-like) order, so tokens have unequal numbers of kept rows.
local function routing(n, k, seed)
  local kept = {}
  local r = seed
  local function rnd() r = (r * 1103515245 + 12345) % 2147483648; return r end
  for t = 0, n - 1 do
    for q = 0, k - 1 do
      -- token 0 keeps everything, token 1 nothing, the others at random
      local keep = t == 0 or (t ~= 1 and rnd() % 3 ~= 0)
      if keep then kept[#kept + 1] = {t = t, q = q, key = rnd()} end
    end
  end
  table.sort(kept, function(a, b) return a.key < b.key end)
  local slots = {}
  for t = 1, n do slots[t] = {}; for q = 1, k do slots[t][q] = -1 end end
  local tok = {}
  for a, e in ipairs(kept) do
    slots[e.t + 1][e.q + 1] = a - 1
    tok[a] = e.t
  end
  return moe.tensor(slots, {dtype = "i32"}), moe.tensor(tok, {dtype = "i64"}), #kept
end

describe("gather_sum and combine_backward (cpu)", function()
  local N, K, H = 7, 3, 5
  local slots, tok, A = routing(N, K, 17)
  local src = moe.randn({A, H}, {seed = 1})
  local w = moe.randn({A}, {seed = 2})

  it("gather_sum equals index_add of the weighted rows", function()
    local y = moe.ops.gather_sum(src, w, slots)
    local ref = moe.ops.index_add({N, H}, tok, src * w:unsqueeze(2))
    assert.is_true(max_diff(y, ref) < 1e-6)
    for c = 1, H do assert.are.equal(0, y:get(2, c)) end   -- token 1 kept nothing
    local y1 = moe.ops.gather_sum(src, nil, slots)
    assert.is_true(max_diff(y1, moe.ops.index_add({N, H}, tok, src)) < 1e-6)
  end)

  it("combine_backward equals index_select, products and a row sum", function()
    local dy = moe.randn({N, H}, {seed = 3})
    local dsrc, dw = moe.ops.combine_backward(dy, src, w, tok)
    local g = moe.ops.index_select(dy, tok)
    assert.is_true(max_diff(dsrc, g * w:unsqueeze(2)) < 1e-6)
    assert.is_true(max_diff(dw, (g * src):sum(2)) < 1e-5)
  end)

  it("gradients of gather_sum by finite differences", function()
    local r = gc.upstream(moe.ops.gather_sum(src, w, slots), 7)
    local dsrc, dw = moe.ops.combine_backward(r, src, w, tok)
    local function loss() return gc.dot(moe.ops.gather_sum(src, w, slots), r) end
    gc.check("gather_sum d/dsrc", src, dsrc, loss)
    gc.check("gather_sum d/dw", w, dw, loss)
    -- unweighted (the dispatch backward): d/dsrc[a] = r[token[a]]
    local function loss1() return gc.dot(moe.ops.gather_sum(src, nil, slots), r) end
    gc.check("gather_sum (no w) d/dsrc", src, moe.ops.index_select(r, tok), loss1)
  end)

  it("bf16 data: the f32 sums rounded once", function()
    local sb, wb = src:to("bf16"), w:to("bf16")
    local y = moe.ops.gather_sum(sb, wb, slots)
    assert.are.equal("bf16", y:dtype())
    local ref = moe.ops.gather_sum(sb:to("f32"), wb:to("f32"), slots):to("bf16")
    assert.are.equal(0, max_diff(y:to("f32"), ref:to("f32")))
    local dy = moe.randn({N, H}, {seed = 4}):to("bf16")
    local dsrc, dw = moe.ops.combine_backward(dy, sb, wb, tok)
    local rs, rw = moe.ops.combine_backward(dy:to("f32"), sb:to("f32"), wb:to("f32"), tok)
    assert.are.equal(0, max_diff(dsrc:to("f32"), rs:to("bf16"):to("f32")))
    assert.is_true(max_diff(dw:to("f32"), rw) < 2e-2 * (1 + rw:abs():max():item()))
  end)

  it("empty rows, k = 0 and no assignments", function()
    local y = moe.ops.gather_sum(moe.zeros({0, H}), nil, moe.tensor({{-1, -1}, {-1, -1}}, {dtype = "i32"}))
    assert.are.same({2, H}, y:shape())
    assert.are.equal(0, y:abs():sum():item())
    local e = moe.empty({3, 0}, {dtype = "i32"})
    assert.are.equal(0, moe.ops.gather_sum(src, w, e):abs():sum():item())
  end)

  it("combine_backward given the slots gives the same bytes", function()
    local dy = moe.randn({N, H}, {seed = 4})
    local d1, w1 = moe.ops.combine_backward(dy, src, w, tok)
    local d2, w2 = moe.ops.combine_backward(dy, src, w, tok, slots)
    assert.are.equal(0, max_diff(d1, d2))
    assert.are.equal(0, max_diff(w1, w2))
  end)

  it("index_select given the slot map: the rows of index_select", function()
    local x = moe.randn({N, H}, {seed = 4})
    assert.are.equal(0, max_diff(moe.ops.index_select(x, tok, slots), moe.ops.index_select(x, tok)))
    local ok, msg = pcall(moe.ops.index_select, x, tok, moe.tensor({{0}}, {dtype = "i32"}))
    assert.is_false(ok)
    assert.is_truthy(tostring(msg):find("index_select_slots: slots has shape [1, 1], expected [" .. N .. ", k]", 1, true),
      tostring(msg))
    ok, msg = pcall(moe.ops.index_select, moe.randn({N, 2, H}), tok, slots)
    assert.is_false(ok)
    assert.is_truthy(tostring(msg):find("index_select_slots: x has shape", 1, true), tostring(msg))
  end)

  it("reports bad indices, dtypes and shapes", function()
    local function err(f, pat)
      local ok, msg = pcall(f)
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find(pat, 1, true), tostring(msg))
    end
    local bad = moe.tensor({{0, A}}, {dtype = "i32"})
    err(function() moe.ops.gather_sum(src, w, bad) end, "slot " .. A .. " at position 1 (token 0, choice 1) is out of range, expected [-1, " .. A .. ")")
    err(function() moe.ops.gather_sum(src, w, moe.tensor({{-2}}, {dtype = "i32"})) end, "slot -2 at position 0")
    err(function() moe.ops.gather_sum(src, w, moe.tensor({{0}}, {dtype = "i64"})) end, "slots has dtype i64, expected i32")
    err(function() moe.ops.gather_sum(src, moe.randn({A + 1}), slots) end, "w has shape")
    local t2 = moe.tensor({0, N}, {dtype = "i64"})
    err(function() moe.ops.combine_backward(moe.randn({N, H}), moe.randn({2, H}), moe.randn({2}), t2) end,
        "token_idx " .. N .. " at position 1 is out of range, expected [0, " .. N .. ")")
    local dy = moe.randn({N, H})
    err(function() moe.ops.combine_backward(dy, src, w, tok, moe.tensor({{0}}, {dtype = "i32"})) end,
        "combine_backward_slots: slots has shape [1, 1], expected [" .. N .. ", k]")
    err(function() moe.ops.combine_backward(dy, src, w, tok, slots:to("i64")) end,
        "combine_backward_slots: slots has dtype i64, expected i32")
  end)
end)

-- the MoE block with and without the slot map
local ffi = require "ffi"
pcall(ffi.cdef, "int setenv(const char *name, const char *value, int overwrite); int unsetenv(const char *name);")

local function run_block(m, x, r)
  m:zero_grad()
  local tape = moe.Tape()
  local y = m:forward(x, tape)
  tape:backward(tape:add(tape:add(tape:sum(tape:mul(y, r)), tape:scale(m:aux_loss(), 0.3)), tape:scale(m:z_loss(), 0.2)))
  local grads = {}
  for _, p in ipairs(m:parameters()) do grads[p.name] = p.grad:to("f32") end
  return y, tape:grad(x):to("f32"), grads
end

describe("MoE block: gather path against the index_add fallback", function()
  local function compare(what, opts)
    local o = {hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
    for k, v in pairs(opts) do o[k] = v end
    local m = moe.nn.MoE(o)
    local x = moe.randn({2, 8, 6}, {seed = 3})
    local r = gc.upstream(m:forward(x), 5)
    local y1, dx1, g1 = run_block(m, x, r)
    local stats = m:routing_stats()
    ffi.C.setenv("MOELAB_MOE_GATHER", "0", 1)
    local ok, y0, dx0, g0 = pcall(run_block, m, x, r)
    ffi.C.unsetenv("MOELAB_MOE_GATHER")
    assert(ok, y0)
    assert.is_true(max_diff(y1, y0) < 1e-5, what .. ": forward")
    assert.is_true(max_diff(dx1, dx0) < 1e-5, what .. ": d/dx")
    for name, g in pairs(g1) do assert.is_true(max_diff(g, g0[name]) < 1e-5, what .. ": d/d" .. name) end
    return stats
  end
  it("top-2 with capacity drops (tokens keep 0, 1 or 2 choices)", function()
    local s = compare("top2/capacity", {capacity_factor = 0.6})
    assert.is_true(s.dropped > 0)
  end)
  it("top-3 sigmoid scores, renormalized, shared expert", function()
    compare("top3/sigmoid", {experts_per_token = 3, router_score = "sigmoid", num_shared_experts = 1, capacity_factor = 0.8})
  end)
  it("expert choice has no slot map and takes the fallback", function()
    compare("expert_choice", {router = "expert_choice"})
  end)
  it("finite-difference gradients with capacity drops (top-2)", function()
    local m = moe.nn.MoE{hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5,
                         seed = 11, capacity_factor = 0.6}
    local x = moe.randn({2, 3, 6}, {seed = 3})
    local r = gc.upstream(m:forward(x), 5)
    local _, dx, grads = run_block(m, x, r)
    local function loss()
      local y = m:forward(x)
      return gc.dot(y, r) + 0.3 * m:aux_loss():item() + 0.2 * m:z_loss():item()
    end
    assert.is_true(m:routing_stats().dropped > 0)
    local go = {eps = 1e-3, atol = 3e-3, rtol = 3e-2}
    gc.check("capacity top-2 d/dx", x, dx, loss, go)
    for _, p in ipairs(m:parameters()) do gc.check("capacity top-2 d/d" .. p.name, p.value, grads[p.name], loss, go) end
  end)
end)

-- MOELAB_MOE_FOLD=1: the combine folded into experts that keep their gathered
-- rows (the GPU's default where its GEMMs cannot gather the rows in their
-- loads) against the default CPU fold over token rows (set_keep_expert_rows(false)):
-- the same ops on the same rows, so the same bits; the tape holds the rows
-- in the experts' entry instead of a dispatch entry
describe("MoE block: the combine folded into experts that keep their rows", function()
  local function run(o, fold, residual)
    local m = moe.nn.MoE(o)
    m:set_keep_expert_rows(false)
    local x = moe.randn({2, 8, 6}, {seed = 3})
    local r = moe.randn({2, 8, 6}, {seed = 9})
    local up = moe.randn({2, 8, 6}, {seed = 5})
    if fold then ffi.C.setenv("MOELAB_MOE_FOLD", fold, 1) end
    local ok, res = pcall(function()
      m:zero_grad()
      local tape = moe.Tape()
      local y = residual and m:forward_residual(x, r, tape) or m:forward(x, tape)
      local kinds, held = {}, 0
      for _, e in ipairs(tape:memory()) do
        kinds[e.name] = true
        if e.name == "experts" then held = held + e.bytes end
      end
      tape:backward(tape:add(tape:sum(tape:mul(y, up)), tape:scale(m:aux_loss(), 0.3)))
      local out = {y = y:clone(), dx = tape:grad(x):clone(), kinds = kinds, held = held}
      if residual then out.dr = tape:grad(r):clone() end
      for _, p in ipairs(m:parameters()) do out[p.name] = p.grad:clone() end
      return out
    end)
    ffi.C.unsetenv("MOELAB_MOE_FOLD")
    assert(ok, res)
    return res, m
  end
  for _, case in ipairs{{"top-2", {}}, {"top-2 with capacity drops", {capacity_factor = 0.6}},
                        {"top-3 sigmoid, renormalized", {experts_per_token = 3, router_score = "sigmoid"}}} do
    for _, residual in ipairs{false, true} do
      it(case[1] .. (residual and ", the residual added in the combine" or ""), function()
        local o = {hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
        for k, v in pairs(case[2]) do o[k] = v end
        local a, m = run(o, nil, residual)
        local b = run(o, "1", residual)
        assert.are.equal(0, max_diff(a.y, b.y))
        assert.are.equal(0, max_diff(a.dx, b.dx))
        if residual then assert.are.equal(0, max_diff(a.dr, b.dr)) end
        for _, p in ipairs(m:parameters()) do assert.are.equal(0, max_diff(a[p.name], b[p.name]), p.name) end
        assert.is_nil(a.kinds.dispatch)
        assert.is_nil(b.kinds.dispatch)
        assert.is_nil(b.kinds.combine)
        -- the kept rows: N k rows of 6 f32 (fewer where capacity drops them)
        assert.is_true(b.held >= a.held + 4 * 6 * 16, b.held .. " against " .. a.held)
        -- MOELAB_MOE_FOLD=0 changes nothing here (the rows are not kept)
        local c = run(o, "0", residual)
        assert.are.equal(0, max_diff(a.dx, c.dx))
      end)
    end
  end
  it("refuses a MOELAB_MOE_FOLD it does not know", function()
    local o = {hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
    local ok, msg = pcall(run, o, "yes")
    assert.is_false(ok)
    assert.is_truthy(tostring(msg):find("MOELAB_MOE_FOLD=yes: expected 0, 1 or unset", 1, true), tostring(msg))
    assert.is_nil(os.getenv("MOELAB_MOE_FOLD"))   -- run unset it
  end)
end)
