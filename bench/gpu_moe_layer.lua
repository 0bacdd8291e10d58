-- MoE layer forward+backward throughput of moelab on one device, at the
-- OLMoE and Mixtral layer shapes (bench/gpu_moe_layer.sh runs it next to the
-- PyTorch baselines of bench/gpu_moe_layer_torch.py and merges the tables).
--
--   ./moelab-cuda bench/gpu_moe_layer.lua                 # both shapes on cuda
--   ./moelab bench/gpu_moe_layer.lua cpu tiny             # a small smoke run on the CPU
--   ./moelab-cuda bench/gpu_moe_layer.lua cuda full olmoe # one shape
--   ./moelab-cuda bench/gpu_moe_layer.lua cuda full all bf16   # bf16 mixed precision (layer:set_precision)
--
-- Per shape, timed with moe.synchronize around each iteration, 3 warm-up and
-- 10 timed iterations, median:
--   layer fwd      nn.MoE forward with a moe.Tape (training mode)
--   layer fwd+bwd  the same, then tape:backward(y, dy) with a random dy; the
--                  gradients are cleared before each run, outside the timed
--                  region (layer:zero_grad{lazy = true}, as a training step
--                  does; the PyTorch baseline sets p.grad = None the same way),
--                  so the backward writes them; "accumulating" keeps them, so
--                  the backward adds into them (gradient accumulation)
--   experts only   the expert bank's work alone through moe.ops, on the same
--                  per-expert row counts as the layer's routing: 3 grouped
--                  GEMMs + swiglu forward, 6 grouped GEMMs + swiglu backward
--   gate GEMM      the router's linear map alone (forward)
--   dense GEMM     one moe.ops.gemm of the same FLOPs as the layer's expert
--                  GEMMs forward+backward (moelab's own cuBLAS ceiling)
-- The layer minus the experts is routing, dispatch, combine and
-- the tape. Expert-GEMM FLOPs: 3 x 2*T*k*d*d_e forward, 3x that fwd+bwd.
-- Machine-readable lines start with "ROW|" (see bench/gpu_moe_layer.sh);
-- with OUT set, they are also written to $OUT/moelab_rows.txt.
local moe = require "moelab"

local dev = arg[1] or "cuda"
local size = arg[2] or "full"
local only = arg[3] ~= "all" and arg[3] or nil
local DT = arg[4] or "f32"   -- "bf16": the layer in bf16 precision, activations and GEMM operands bf16
local WARMUP, ITERS = 3, 10
if dev == "cuda" then assert(moe.cuda_available(), "no CUDA device: run the CUDA build on a GPU machine") end

local SHAPES = {
  {name = "OLMoE", T = 16384, d = 2048, de = 1024, E = 64, k = 8, renorm = false},
  {name = "Mixtral", T = 8192, d = 4096, de = 14336, E = 8, k = 2, renorm = true},
}
if size == "tiny" then
  SHAPES = {
    {name = "OLMoE", T = 256, d = 64, de = 32, E = 16, k = 4, renorm = false},
    {name = "Mixtral", T = 128, d = 64, de = 224, E = 8, k = 2, renorm = true},
  }
  WARMUP, ITERS = 1, 3
end

local out_dir = os.getenv("OUT")
local rows_file = out_dir and io.open(out_dir .. "/moelab_rows.txt", "a")

local function median(ts)
  table.sort(ts)
  local n = #ts
  return n % 2 == 1 and ts[(n + 1) / 2] or 0.5 * (ts[n / 2] + ts[n / 2 + 1])
end

-- median seconds of fn() over ITERS runs after WARMUP; garbage is collected
-- and before() (if any) runs outside the timed region, so freed tensors go
-- back before each run
local function time(fn, before)
  for _ = 1, WARMUP do
    if before then before() end
    fn(); collectgarbage("collect")
  end
  local ts = {}
  for i = 1, ITERS do
    collectgarbage("collect")
    if before then before() end
    moe.synchronize(dev)
    local t0 = moe.clock()
    fn()
    moe.synchronize(dev)
    ts[i] = moe.clock() - t0
  end
  local lo, hi = math.huge, 0
  for _, t in ipairs(ts) do lo = math.min(lo, t); hi = math.max(hi, t) end
  return median(ts), lo, hi
end

local function row(shape, impl, dtype, fwd_s, fb_s, fwd_flops, fb_flops, note)
  local function f(s, fl)
    if not s then return "", "" end
    return string.format("%.2f", s * 1e3), fl and string.format("%.1f", fl / s / 1e12) or ""
  end
  local a, b = f(fwd_s, fwd_flops)
  local c, d = f(fb_s, fb_flops)
  local line = table.concat({"ROW", shape, impl, dtype, a, b, c, d, note or ""}, "|")
  print(line)
  if rows_file then rows_file:write(line, "\n"); rows_file:flush() end
end

local function log(fmt, ...) io.stdout:write(string.format(fmt, ...), "\n"); io.stdout:flush() end

for _, s in ipairs(SHAPES) do
  if not only or only:lower() == s.name:lower() then
    local T, d, de, E, k = s.T, s.d, s.de, s.E, s.k
    local fwd_flops = 3 * 2 * T * k * d * de
    local fb_flops = 3 * fwd_flops
    log("== %s: T=%d d=%d d_e=%d E=%d top-%d renormalize=%s, %s %s; expert GEMM %.3f TFLOP fwd, %.3f fwd+bwd",
        s.name, T, d, de, E, k, tostring(s.renorm), dev, DT, fwd_flops / 1e12, fb_flops / 1e12)
    local t0 = moe.clock()
    local layer = moe.nn.MoE{hidden_size = d, num_experts = E, experts_per_token = k, expert_intermediate_size = de,
                             renormalize = s.renorm, seed = 1}
    layer:train(true)
    if dev ~= "cpu" then layer:to(dev) end
    if DT ~= "f32" then layer:set_precision(DT) end
    local x = moe.randn({T, d}, {seed = 2, device = dev}):to(DT)
    local dy = moe.randn({T, d}, {seed = 3, device = dev}):to(DT)
    moe.synchronize(dev)
    log("   built %s, %.0fM parameters, in %.1f s", tostring(layer), layer:num_params() / 1e6, moe.clock() - t0)

    local tape = moe.Tape()
    local function fwd()
      local y = layer:forward(x, tape)
      tape:reset()
      return y
    end
    local function fwd_bwd()
      local y = layer:forward(x, tape)
      tape:backward(y, dy)
      tape:reset()
    end
    local fwd_s, fwd_lo, fwd_hi = time(fwd)
    local fb_s, fb_lo, fb_hi = time(fwd_bwd, function() layer:zero_grad{lazy = true} end)
    local acc_s, acc_lo, acc_hi = time(fwd_bwd)
    log("   layer fwd     %9.2f ms (min %.2f, max %.2f)", fwd_s * 1e3, fwd_lo * 1e3, fwd_hi * 1e3)
    log("   layer fwd+bwd %9.2f ms (min %.2f, max %.2f)", fb_s * 1e3, fb_lo * 1e3, fb_hi * 1e3)
    log("   accumulating  %9.2f ms (min %.2f, max %.2f)", acc_s * 1e3, acc_lo * 1e3, acc_hi * 1e3)
    row(s.name, "moelab nn.MoE", DT, fwd_s, fb_s, fwd_flops, fb_flops)
    row(s.name, "moelab nn.MoE, accumulating gradients", DT, nil, acc_s, fwd_flops, fb_flops,
        "backward adds into the last run's gradients")

    -- the same per-expert row counts as the layer's last routing
    local counts = layer:routing_stats().counts
    local off, total, maxc, minc = {0}, 0, 0, math.huge
    for j = 1, E do
      total = total + counts[j]
      off[j + 1] = total
      maxc, minc = math.max(maxc, counts[j]), math.min(minc, counts[j])
    end
    assert(total == T * k, "routing assigned " .. total .. " rows, expected " .. T * k)
    log("   rows per expert: min %d, max %d, mean %.0f", minc, maxc, total / E)
    local wg, wu, wd = layer:param("experts.gate_proj"):to(DT), layer:param("experts.up_proj"):to(DT),
                       layer:param("experts.down_proj"):to(DT)
    local xp = moe.randn({T * k, d}, {seed = 4, device = dev}):to(DT)
    local dyp = moe.randn({T * k, d}, {seed = 5, device = dev}):to(DT)
    local ex_fwd_s = time(function()
      local g = moe.ops.gemm_grouped(xp, wg, off, {transb = true})
      local u = moe.ops.gemm_grouped(xp, wu, off, {transb = true})
      local h = moe.ops.swiglu(g, u)
      local _ = moe.ops.gemm_grouped(h, wd, off, {transb = true})
    end)
    local ex_fb_s = time(function()
      local g = moe.ops.gemm_grouped(xp, wg, off, {transb = true})
      local u = moe.ops.gemm_grouped(xp, wu, off, {transb = true})
      local h = moe.ops.swiglu(g, u)
      local _ = moe.ops.gemm_grouped(h, wd, off, {transb = true})
      local dh = moe.ops.gemm_grouped(dyp, wd, off)
      local _dwd = moe.ops.gemm_grouped_wgrad(dyp, h, off)
      local dg, du = moe.ops.swiglu_backward(dh, g, u)
      local _dx1 = moe.ops.gemm_grouped(du, wu, off)
      local _dwu = moe.ops.gemm_grouped_wgrad(du, xp, off)
      local _dx2 = moe.ops.gemm_grouped(dg, wg, off)
      local _dwg = moe.ops.gemm_grouped_wgrad(dg, xp, off)
    end)
    log("   experts only (moe.ops) fwd %9.2f ms, fwd+bwd %9.2f ms", ex_fwd_s * 1e3, ex_fb_s * 1e3)
    row(s.name, "moelab experts only (moe.ops)", DT, ex_fwd_s, ex_fb_s, fwd_flops, fb_flops,
        "sub-phase")
    xp, dyp = nil, nil
    collectgarbage("collect")

    local gate = layer:children()[1]
    local gate_s = time(function() local _ = gate:forward(x) end)
    log("   gate GEMM fwd %.2f ms; layer minus experts: fwd %.2f ms, fwd+bwd %.2f ms (routing, dispatch, combine, tape)",
        gate_s * 1e3, (fwd_s - ex_fwd_s) * 1e3, (fb_s - ex_fb_s) * 1e3)
    row(s.name, "moelab layer minus experts", DT, fwd_s - ex_fwd_s, fb_s - ex_fb_s,
        nil, nil, "sub-phase: routing, dispatch, combine, tape")

    -- one dense GEMM of the expert FLOPs forward+backward: [T*k, d] @ [d, 9*d_e]
    local a = moe.randn({T * k, d}, {seed = 6, device = dev}):to(DT)
    local b = moe.randn({d, 9 * de}, {seed = 7, device = dev}):to(DT)
    local dense_s = time(function() local _ = moe.ops.gemm(a, b) end)
    log("   dense GEMM %dx%dx%d: %.2f ms, %.1f TFLOP/s", T * k, d, 9 * de, dense_s * 1e3, fb_flops / dense_s / 1e12)
    row(s.name, "moelab dense GEMM (moe.ops.gemm)", DT, nil, dense_s, nil, fb_flops, "ceiling: one GEMM of the fwd+bwd FLOPs")
    a, b, layer, x, dy, tape, wg, wu, wd, gate = nil, nil, nil, nil, nil, nil, nil, nil, nil, nil
    collectgarbage("collect")
  end
end
if rows_file then rows_file:close() end
