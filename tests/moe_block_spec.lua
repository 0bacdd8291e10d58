-- The MoE block: gradient checks under every selection method and scoring,
-- router semantics (capacity, expert choice, renormalisation, balancing).
local moe = require "moelab"
local gc = require "helpers.gradcheck"

local function block(opts)
  local o = {hidden_size = 6, num_experts = 4, experts_per_token = 2, expert_intermediate_size = 5, seed = 11}
  for k, v in pairs(opts or {}) do o[k] = v end
  return moe.nn.MoE(o)
end

-- loss = sum(y .* R) + a * aux + b * z, so the balancing losses' gradients are checked too
local function check_block(what, m, x, opts)
  opts = opts or {}
  local a, b = opts.aux_coef or 0.3, opts.z_coef or 0.2
  local y0 = m:forward(x)
  local r = gc.upstream(y0, 5)
  local function loss()
    if opts.fixed_noise then m:set_noise_step(0) end
    local y = m:forward(x)
    return gc.dot(y, r) + a * m:aux_loss():item() + b * m:z_loss():item()
  end
  m:zero_grad()
  if opts.fixed_noise then m:set_noise_step(0) end
  local tape = moe.Tape()
  local y = m:forward(x, tape)
  local total = tape:add(tape:add(tape:sum(tape:mul(y, r)), tape:scale(m:aux_loss(), a)), tape:scale(m:z_loss(), b))
  tape:backward(total)
  -- finite differences must not flip a routing decision: use a small step
  local go = {eps = opts.eps or 1e-3, atol = opts.atol or 3e-3, rtol = 3e-2}
  gc.check(what .. " d/dx", x, tape:grad(x), loss, go)
  for _, p in ipairs(m:parameters()) do gc.check(what .. " d/d" .. p.name, p.value, p.grad, loss, go) end
end

describe("MoE block gradients", function()
  local x = moe.randn({2, 3, 6}, {seed = 3})
  it("the experts' rows and outputs not kept: the gradients of keeping them, to rounding", function()
    local cases = {{}, {capacity_factor = 1.0}, {expert_intermediate_size = 7, activation = "gelu"},
                   {router = "expert_choice"}, {num_shared_experts = 1}, {num_shared_experts = 1, shared_expert_gate = true},
                   {router_score = "sigmoid", routed_scaling_factor = 2.5}}
    for _, o in ipairs(cases) do
      local function grads(keep)
        local m = block(o)
        m:set_keep_expert_rows(keep)
        if o.router == "noisy_topk" then m:set_noise_step(0) end
        local xx = x:clone()
        local tape = moe.Tape()
        local y = m:forward(xx, tape)
        local up = gc.upstream(y, 8)
        local total = tape:add(tape:sum(tape:mul(y, up)), tape:scale(m:aux_loss(), 0.3))
        tape:backward(total)
        local out = {tape:grad(xx):clone()}
        for _, p in ipairs(m:parameters()) do out[#out + 1] = p.grad:clone() end
        -- the tape holds a dispatch entry only when the rows are kept
        local kinds = {}
        for _, r in ipairs(tape:memory()) do kinds[r.name] = true end
        return out, kinds
      end
      local a, ka = grads(false)
      local b, kb = grads(true)
      -- expert choice has no slot map: its rows are dispatched (and kept) either way
      if o.router ~= "expert_choice" then assert.is_nil(ka.dispatch) end
      assert.is_true(kb.dispatch)
      -- SwiGLU experts also fold the combine: the weights' gradient comes from the
      -- down projection's, in another order of f32 sums
      for i = 1, #a do
        local scale = math.max(b[i]:abs():max():item(), 1e-6)
        assert.is_true((a[i] - b[i]):abs():max():item() <= 1e-5 * scale, "gradient " .. i)
      end
    end
    assert.has_error(function() block{}:set_keep_expert_rows(1) end,
      "layer:set_keep_expert_rows: expected true, false or \"auto\", got number")
  end)

  it("edge cases of the folded experts: one token, no tokens, the mode switched between the passes", function()
    local x1, r1 = moe.randn({1, 6}, {seed = 41}), moe.randn({1, 6}, {seed = 42})
    local function run(switch)
      local m = block{}
      local tape = moe.Tape()
      local y = m:forward_residual(x1, r1, tape)
      if switch then m:set_keep_expert_rows(true) end   -- the entry keeps the mode it recorded
      tape:backward(tape:sum(y))
      return tape:grad(x1):clone(), tape:grad(r1):clone(), y
    end
    local gx, gr, y = run(true)
    local gx2, gr2, y2 = run(false)
    assert.are.equal(0, (y - y2):abs():max():item())
    assert.are.equal(0, (gx - gx2):abs():max():item())
    assert.are.equal(1, gr:min():item())   -- d sum / d residual
    assert.are.equal(0, (gr - gr2):abs():max():item())
    assert.is_true(gx:abs():max():item() > 0)
    -- no tokens at all: an empty output and a backward that does nothing
    local m = block{}
    local t0 = moe.Tape()
    local x0 = moe.randn({0, 6}, {seed = 43})
    local y0 = m:forward(x0, t0)
    assert.are.same({0, 6}, y0:shape())
    t0:backward(t0:sum(y0))
  end)

  it("with the residual added in the combine (and by an add beside shared experts)", function()
    for _, o in ipairs{{}, {num_shared_experts = 1}, {capacity_factor = 1.0}} do
      local m = block(o)
      local r0 = moe.randn({2, 3, 6}, {seed = 4})
      local ref = m:forward(x) + r0
      local y = m:forward_residual(x, r0)
      assert.is_true((y - ref):abs():max():item() < 1e-5)
      local up = gc.upstream(y, 6)
      local function loss() return gc.dot(m:forward_residual(x, r0), up) end
      m:zero_grad()
      local tape = moe.Tape()
      tape:backward(m:forward_residual(x, r0, tape), up)
      local go = {eps = 1e-3, atol = 3e-3, rtol = 3e-2}
      gc.check("residual d/dx", x, tape:grad(x), loss, go)
      gc.check("residual d/dresidual", r0, tape:grad(r0), loss, go)
      for _, p in ipairs(m:parameters()) do gc.check("residual d/d" .. p.name, p.value, p.grad, loss, go) end
    end
    assert.has_error(function() block{}:forward_residual(x, moe.randn({2, 6})) end)
  end)

  it("top-k softmax, renormalized (Mixtral)", function() check_block("topk/renorm", block{}, x) end)
  it("top-k softmax, not renormalized (OLMoE)", function() check_block("topk", block{renormalize = false}, x) end)
  it("top-k sigmoid scores, renormalized, scaled (DeepSeek-V3)", function()
    check_block("sigmoid", block{router_score = "sigmoid", routed_scaling_factor = 2.5}, x)
  end)
  it("sequence-level auxiliary loss", function() check_block("seq-aux", block{aux_loss_type = "sequence"}, x) end)
  it("Switch: top-1 with capacity and dropped tokens", function()
    check_block("switch", block{experts_per_token = 1, capacity_factor = 0.6, renormalize = false}, x)
  end)
  it("noisy top-k in training (the same noise for every evaluation) and in eval", function()
    local m = block{router = "noisy_topk"}
    m:train(true)
    check_block("noisy(train)", m, x, {fixed_noise = true})
    m:train(false)
    check_block("noisy(eval)", m, x)
  end)
  it("Switch jitter in training", function()
    local m = block{experts_per_token = 1, jitter_noise = 0.1, renormalize = false}
    m:train(true)
    check_block("jitter", m, x, {fixed_noise = true})
  end)
  it("expert choice", function() check_block("expert_choice", block{router = "expert_choice"}, x) end)
  it("Sinkhorn (BASE layers)", function() check_block("sinkhorn", block{router = "sinkhorn", experts_per_token = 1}, x) end)
  it("shared experts and GELU experts", function()
    check_block("shared+gelu", block{num_shared_experts = 1, activation = "gelu"}, x)
  end)
  it("custom experts built from layers", function()
    local experts = {}
    for i = 1, 4 do
      experts[i] = moe.nn.Sequential(moe.nn.Linear(6, 4, {seed = 20 + i}), moe.nn.Tanh(), moe.nn.Linear(4, 6, {seed = 30 + i}))
    end
    check_block("custom", block{experts = experts}, x)
  end)
end)

-- zero_grad{lazy=true} only marks the expert bank's gradients (its backward
-- overwrites them, every reader through the layer clears what is still marked);
-- plain zero_grad clears the memory, so tensors fetched before it read zero
describe("expert gradients after zero_grad", function()
  local x = moe.randn({2, 3, 6}, {seed = 5})
  local function grads(m)
    local out = {}
    for _, p in ipairs(m:parameters()) do out[p.name] = p.grad:clone() end
    return out
  end
  local function backward(m, scale)
    local tape = moe.Tape()
    local y = m:forward(x, tape)
    tape:backward(tape:scale(tape:sum(tape:square(y)), scale or 1))
  end
  local function max_diff(a, b, s)
    local m = 0
    local fa, fb = a:reshape({a:numel()}), b:reshape({b:numel()})
    for i = 1, a:numel() do m = math.max(m, math.abs(fa:get(i) - s * fb:get(i))) end
    return m
  end
  it("are overwritten by the next backward, accumulate after it, and read as zero when unused", function()
    local m = block{}
    m:zero_grad{lazy = true}
    backward(m)
    local g1 = grads(m)
    assert.is_true(g1["experts.up_proj"]:abs():sum():item() > 0)
    -- a second step: the old values must not leak into the new ones
    m:zero_grad{lazy = true}
    backward(m)
    for name, g in pairs(grads(m)) do assert.are.equal(0, max_diff(g, g1[name], 1), name) end
    -- gradient accumulation: a second backward adds
    backward(m, 0.5)
    for name, g in pairs(grads(m)) do assert.is_true(max_diff(g, g1[name], 1.5) < 1e-5, name) end
    -- zero_grad and no backward: every reader sees zeros
    m:zero_grad{lazy = true}
    assert.are.equal(0, m:grad("experts.down_proj"):abs():sum():item())
    local _, flat = m:flat_parameters()
    assert.are.equal(0, flat:abs():sum():item())
    m:zero_grad{lazy = true}
    for name, g in pairs(grads(m)) do assert.are.equal(0, g:abs():sum():item(), name) end
  end)
  it("zero_grad clears tensors fetched before it; zero_grad{lazy=true} only what is read through the layer", function()
    local m = block{}
    backward(m)
    local _, flat = m:flat_parameters()
    assert.is_true(flat:abs():sum():item() > 0)
    m:zero_grad()
    assert.are.equal(0, flat:abs():sum():item())   -- eager: the memory itself
    backward(m)
    m:zero_grad{lazy = true}
    backward(m, 0)   -- a backward that writes zeros everywhere: the expert gradients are overwritten, not added to
    assert.are.equal(0, require("moelab.core").grad_norm(m))   -- no accessor in between: grad_norm clears what is still marked
    backward(m)
    local g1 = grads(m)
    m:zero_grad{lazy = true}
    assert.are.equal(0, require("moelab.core").grad_norm(m))
    backward(m)
    for name, g in pairs(grads(m)) do assert.are.equal(0, max_diff(g, g1[name], 1), name) end
    assert.has_error(function() m:zero_grad(true) end)
  end)
end)

describe("router semantics", function()
  local x = moe.randn({4, 16, 6}, {seed = 9})

  it("expert choice gives every expert exactly C tokens", function()
    local m = block{router = "expert_choice", capacity_factor = 1}
    m:forward(x)
    local s = m:routing_stats()
    local c = math.ceil(1 * 2 * 64 / 4)
    for e = 1, 4 do assert.are.equal(c, s.counts[e]) end
  end)

  it("drop rate is 0 at a large capacity factor and above 0 at 0.5", function()
    local m = block{experts_per_token = 1, capacity_factor = 4}
    m:forward(x)
    assert.are.equal(0, m:routing_stats().dropped)
    local m2 = block{experts_per_token = 1, capacity_factor = 0.5}
    m2:forward(x)
    local s = m2:routing_stats()
    assert.is_true(s.dropped > 0)
    for e = 1, 4 do assert.is_true(s.counts[e] <= math.ceil(0.5 * 64 / 4)) end
    assert.are.equal(64, s.assignments + s.dropped)
  end)

  it("renormalized weights of each token sum to 1", function()
    local m = block{}
    m:forward(x)
    local tok, _, w = m:assignments()
    local sums = {}
    for a = 1, tok:numel() do
      local t = tok:get_flat(a)
      sums[t] = (sums[t] or 0) + w:get_flat(a)
    end
    for _, v in pairs(sums) do assert.is_true(math.abs(v - 1) < 1e-5) end
  end)

  it("assignments are expert-contiguous", function()
    local m = block{}
    m:forward(x)
    local _, ex = m:assignments()
    for a = 2, ex:numel() do assert.is_true(ex:get_flat(a) >= ex:get_flat(a - 1)) end
  end)

  it("the auxiliary loss is near 1 under uniform routing", function()
    -- a zero router gives uniform probabilities; ties pick the lowest experts,
    -- so f is not uniform, but sum f_i P_i with P uniform is exactly 1/E
    local m = block{}
    m:param("gate.weight"):zero()
    m:forward(x)
    assert.is_true(math.abs(m:aux_loss():item() - 1) < 1e-5)
  end)

  it("aux-free bias balancing lowers MaxVio against no balancing", function()
    -- a router skewed towards expert 1, the same data and seed for both runs
    local function maxvio(m)
      local s = m:routing_stats()
      local mean, mx = 0, 0
      for _, c in ipairs(s.counts) do mean = mean + c; mx = math.max(mx, c) end
      mean = mean / #s.counts
      return mx / mean - 1
    end
    local function run(aux_free)
      local m = block{aux_free = aux_free, aux_free_rate = 0.01, router_score = "sigmoid", seed = 5}
      local g = m:param("gate.weight")
      for j = 1, 6 do g:set(1, j, g:get(1, j) + 3) end   -- expert 1 wins almost every token
      local sum, n = 0, 0
      for step = 1, 80 do
        m:forward(moe.randn({4, 16, 6}, {seed = 100 + step}))
        if aux_free then m:update_bias() end
        if step > 60 then sum, n = sum + maxvio(m), n + 1 end
      end
      return sum / n
    end
    local plain, balanced = run(false), run(true)
    assert.is_true(balanced < plain, string.format("aux-free %.3f vs none %.3f", balanced, plain))
  end)

  it("noisy top-k routes differently in training and identically in eval", function()
    local m = block{router = "noisy_topk"}
    m:forward(x)
    local _, e1 = m:assignments()
    e1 = e1:clone()
    m:forward(x)
    local _, e2 = m:assignments()
    assert.is_true(e1:equal(e2))
    m:train(true)
    local differs = false
    for _ = 1, 3 do
      m:forward(x)
      local _, e3 = m:assignments()
      if e3:numel() ~= e1:numel() or not e3:equal(e1) then differs = true end
    end
    assert.is_true(differs)
  end)

  it("bad configurations raise clear errors", function()
    local function err(opts, pat)
      local ok, msg = pcall(block, opts)
      assert.is_false(ok)
      assert.is_truthy(tostring(msg):find(pat, 1, true), tostring(msg))
    end
    err({experts_per_token = 5}, "experts_per_token")
    err({capacity_factor = -1}, "capacity_factor")
    err({router = "magic"}, "router")
    err({router_score = "tanh"}, "router_score")
    err({experts = {moe.nn.SiLU()}}, "expected num_experts")
    local ok, msg = pcall(moe.nn.Model, {vocab_size = 10, hidden_size = 10, num_layers = 1, num_heads = 3})
    assert.is_false(ok)
    assert.is_truthy(tostring(msg):find("divisible", 1, true))
  end)
end)
