--- moe.MoECostAnalyzer: parameters, FLOPs, memory and roofline throughput of
-- an MoE transformer, from its configuration alone.
--
--   local cost = moe.MoECostAnalyzer{model = model, hardware_profile = "h100_80gb"}
--   cost.total_params, cost.active_params                  -- exact for moelab models
--   cost:flops_per_token(2048)                             -- forward; training is 3x
--   cost:memory{batch_size = 8, sequence_length = 2048}    -- weights, grads, AdamW, activations
--   cost:analyze{batch_size = 16, sequence_length = 2048}  -- decode-step roofline
--   cost:compare_with_dense{sequence_length = 2048}
--   moe.MoECostAnalyzer{model = {model_type = "olmoe", hidden_size = 2048, ...}}   -- a Hugging Face config
--
-- The model is a moe.MoEModel, a moelab config table (the keys of
-- moe.MoEModel, with its defaults), a Hugging Face config table
-- (model_type "olmoe", "mixtral", "qwen2_moe" or "qwen3_moe"; keys
-- hidden_size, intermediate_size, moe_intermediate_size, num_hidden_layers,
-- num_attention_heads, num_key_value_heads, head_dim, num_experts /
-- num_local_experts, num_experts_per_tok, vocab_size, tie_word_embeddings,
-- shared_expert_intermediate_size, decoder_sparse_step, mlp_only_layers), or
-- the path of a config.json (or of the directory holding one).
--
-- The architecture assumed is moelab's (and these families'): pre-norm
-- blocks with RMSNorm (one weight vector, no bias), grouped-query attention
-- with RoPE (no parameters), optional QK-norm, a bias-free linear router,
-- experts and dense FFNs that are SwiGLU (3 matrices) or GELU (2 matrices).
local U = require "moelab.analytics.util"

local M = {}
local Cost = {}
Cost.__index = Cost

--- Hardware profiles: peak dense bf16 tensor FLOP/s (no sparsity), memory
-- bandwidth in bytes/s, device memory in bytes, and the storage dtype of
-- weights. Vendor datasheet numbers:
--   A100 SXM 80GB: 312 TFLOP/s bf16, 2.0 TB/s HBM2e (2.039 on the datasheet; 2.0 here)
--   H100 SXM 80GB: 989 TFLOP/s bf16 dense, 3.35 TB/s HBM3
--   H200 SXM 141GB: 989 TFLOP/s bf16 dense, 4.8 TB/s HBM3e
--   cpu: a documented default for a current 16-core server computing in f32
--        (AVX2/AVX-512 FMA, about 1 TFLOP/s; about 100 GB/s of DRAM bandwidth);
--        measure yours with moe.MoECostAnalyzer.measure_cpu() and pass
--        {peak_flops=, bandwidth=}.
M.PROFILES = {
  cpu = {name = "cpu", peak_flops = 1.0e12, bandwidth = 1.0e11, memory = nil, dtype = "f32"},
  a100_80gb = {name = "a100_80gb", peak_flops = 312e12, bandwidth = 2.0e12, memory = 80e9, dtype = "bf16"},
  h100_80gb = {name = "h100_80gb", peak_flops = 989e12, bandwidth = 3.35e12, memory = 80e9, dtype = "bf16"},
  h200 = {name = "h200", peak_flops = 989e12, bandwidth = 4.8e12, memory = 141e9, dtype = "bf16"},
}
local aliases = {a100 = "a100_80gb", h100 = "h100_80gb", h100_sxm = "h100_80gb", h200_141gb = "h200"}

local dtype_bytes = {f32 = 4, fp32 = 4, float32 = 4, bf16 = 2, bfloat16 = 2, f16 = 2, fp16 = 2, float16 = 2,
                     fp8 = 1, int8 = 1, i8 = 1, u8 = 1}

-- ------------------------------------------------------------ configs --

local function num(f, cfg, key, default, required)
  local v = cfg[key]
  if v == nil then
    if required then U.fail(f, "the config has no '%s'", key) end
    return default
  end
  if type(v) ~= "number" or v ~= v or v < 0 then U.fail(f, "config key '%s' must be a non-negative number, got %s", key, U.describe(v)) end
  return v
end

local function bool(v, default)
  if v == nil then return default end
  return v == true or v == 1
end

-- The canonical description every computation reads.
--   vocab, hidden, layers, heads, kv_heads, head_dim
--   qk_norm ("full": q and k norms over heads*head_dim and kv_heads*head_dim,
--            "head": over head_dim, or false); qkv_bias, o_bias
--   activation ("swiglu" | "gelu"); dense_inner
--   is_moe[i] for block i = 0..layers-1; num_experts, top_k, expert_inner
--   router (params per MoE layer of the router: E*H, 2*E*H with a noise linear, 0 for dense)
--   shared_inner (0: none), shared_gate (a Linear(H, 1) gating the shared expert)
--   expert_params (per expert, per MoE layer, when experts are custom layers)
--   tie (lm_head shares the embedding)
local function moe_layer_rule(freq, first)
  return function(i) return freq > 0 and i >= first and (freq == 1 or i % freq == freq - 1) end
end

-- moelab config (moe.MoEModel's keys and defaults).
local function from_moelab(f, cfg)
  local c = {}
  c.vocab = num(f, cfg, "vocab_size", 256)
  c.hidden = num(f, cfg, "hidden_size", 256)
  c.layers = num(f, cfg, "num_layers", 4)
  local heads = cfg.num_heads
  if heads == nil then
    heads = math.max(1, math.floor(c.hidden / 64))
    while c.hidden % heads ~= 0 do heads = heads - 1 end
  end
  c.heads = heads
  c.kv_heads = num(f, cfg, "num_kv_heads", heads)
  local hd = num(f, cfg, "head_dim", 0)
  c.head_dim = hd > 0 and hd or c.hidden / heads
  c.qk_norm = bool(cfg.qk_norm, false) and "full" or false
  c.o_bias = bool(cfg.attention_bias, false)
  c.qkv_bias = c.o_bias or bool(cfg.qkv_bias, false)
  c.activation = cfg.activation or "swiglu"
  c.dense_inner = num(f, cfg, "intermediate_size", 4 * c.hidden)
  c.num_experts = num(f, cfg, "num_experts", 8)
  c.top_k = num(f, cfg, "experts_per_token", 2)
  c.expert_inner = num(f, cfg, "expert_intermediate_size", 4 * c.hidden)
  local rule = moe_layer_rule(num(f, cfg, "moe_layer_frequency", 1), num(f, cfg, "first_dense_layers", 0))
  c.is_moe = {}
  local dense_only = {}
  for _, i in ipairs(cfg.mlp_only_layers or {}) do dense_only[i] = true end
  for i = 0, c.layers - 1 do c.is_moe[i] = rule(i) and not dense_only[i] end
  local router = cfg.router
  if type(router) == "table" then router = router.options and router.options.router end
  c.router_mult = router == "noisy_topk" and 2 or 1
  local ns = num(f, cfg, "num_shared_experts", 0)
  local si = num(f, cfg, "shared_intermediate_size", 0)
  c.shared_inner = ns > 0 and (si > 0 and si or c.expert_inner * ns) or 0
  c.shared_gate = c.shared_inner > 0 and bool(cfg.shared_expert_gate, false)
  c.tie = bool(cfg.tie_word_embeddings, false)
  c.family = "moelab"
  return c
end

-- Hugging Face configs.
local function from_hf(f, cfg)
  local mt = cfg.model_type
  local c = {}
  c.vocab = num(f, cfg, "vocab_size", nil, true)
  c.hidden = num(f, cfg, "hidden_size", nil, true)
  c.layers = num(f, cfg, "num_hidden_layers", nil, true)
  c.heads = num(f, cfg, "num_attention_heads", nil, true)
  c.kv_heads = num(f, cfg, "num_key_value_heads", c.heads)
  local hd = cfg.head_dim
  c.head_dim = (type(hd) == "number" and hd > 0) and hd or c.hidden / c.heads
  c.activation = (cfg.hidden_act == "gelu" or cfg.hidden_act == "gelu_new") and "gelu" or "swiglu"
  c.num_experts = num(f, cfg, "num_experts", nil) or num(f, cfg, "num_local_experts", nil) or
    U.fail(f, "the config has neither 'num_experts' nor 'num_local_experts'")
  c.top_k = num(f, cfg, "num_experts_per_tok", nil, true)
  c.router_mult = 1
  c.shared_inner, c.shared_gate = 0, false
  c.is_moe = {}
  c.tie = bool(cfg.tie_word_embeddings, false)
  c.family = mt
  if mt == "olmoe" then
    -- OLMoE: experts of intermediate_size, QK-norm over the full q and k projections
    c.expert_inner = num(f, cfg, "intermediate_size", nil, true)
    c.dense_inner = c.expert_inner
    c.qk_norm = "full"
    c.qkv_bias = bool(cfg.attention_bias, false)
    c.o_bias = c.qkv_bias
    for i = 0, c.layers - 1 do c.is_moe[i] = true end
  elseif mt == "mixtral" then
    c.expert_inner = num(f, cfg, "intermediate_size", nil, true)
    c.dense_inner = c.expert_inner
    c.qk_norm = false
    c.qkv_bias, c.o_bias = false, false
    for i = 0, c.layers - 1 do c.is_moe[i] = true end
  elseif mt == "qwen2_moe" or mt == "qwen3_moe" then
    -- Qwen-MoE: experts of moe_intermediate_size, dense blocks of intermediate_size;
    -- qwen2_moe: q, k, v biases, a shared expert with a sigmoid gate Linear(H, 1);
    -- qwen3_moe: per-head QK-norm, no biases, no shared expert
    c.expert_inner = num(f, cfg, "moe_intermediate_size", nil, true)
    c.dense_inner = num(f, cfg, "intermediate_size", c.expert_inner)
    if mt == "qwen2_moe" then
      c.qk_norm, c.qkv_bias, c.o_bias = false, true, false
      c.shared_inner = num(f, cfg, "shared_expert_intermediate_size", 0)
      c.shared_gate = c.shared_inner > 0
    else
      c.qk_norm, c.qkv_bias, c.o_bias = "head", bool(cfg.attention_bias, false), bool(cfg.attention_bias, false)
    end
    local step = num(f, cfg, "decoder_sparse_step", 1)
    local dense_only = {}
    for _, i in ipairs(cfg.mlp_only_layers or {}) do dense_only[i] = true end
    for i = 0, c.layers - 1 do
      c.is_moe[i] = not dense_only[i] and c.num_experts > 0 and step > 0 and (i + 1) % step == 0
    end
  else
    U.fail(f, "model_type %s is not supported (olmoe, mixtral, qwen2_moe, qwen3_moe, or a moelab config)",
      U.describe(mt))
  end
  return c
end

local function load_config(f, path)
  local mio = require "moelab.io"
  local file = path:match("%.json$") and path or (path .. "/config.json")
  local ok, text = pcall(mio.read_file, file)
  if not ok then U.fail(f, "model: cannot read %s", file) end
  local ok2, cfg = pcall(mio.json.decode, text)
  if not ok2 or type(cfg) ~= "table" then U.fail(f, "model: %s is not a JSON object", file) end
  return cfg
end

-- Resolves the `model` option into the canonical description.
local function describe_model(f, model)
  if type(model) == "string" then model = load_config(f, model) end
  if U.is_model(model) then
    local c = from_moelab(f, model.config)
    if model.options and model.options.expert ~= nil then
      -- custom experts: their size is whatever the layers are; count it
      c.expert_params = {}
      for l, layer in ipairs(model:moe_layers()) do
        local n = 0
        for _, p in ipairs(layer:parameters()) do
          if p.name:find("^experts%.") then n = n + p.value:numel() end
        end
        c.expert_params[l] = n / c.num_experts
      end
    end
    return c, model.config
  end
  if U.is_net(model) then return from_moelab(f, model:config()), model:config() end
  if type(model) ~= "table" then
    U.fail(f, "model must be a moe.MoEModel, a config table or a config.json path, got %s", type(model))
  end
  if model.model_type ~= nil and model.model_type ~= "moelab" then return from_hf(f, model), model end
  return from_moelab(f, model), model
end

-- ------------------------------------------------------------ counting --

local function ffn_params(act, h, inner)
  return (act == "gelu" and 2 or 3) * h * inner
end

-- Parameters by part; `which` = "total" or "active".
local function count(c)
  local h, hd = c.hidden, c.head_dim
  local qd, kvd = c.heads * hd, c.kv_heads * hd
  local attn_matmul = h * qd + 2 * h * kvd + qd * h
  local attn = attn_matmul
  if c.qkv_bias then attn = attn + qd + 2 * kvd end
  if c.o_bias then attn = attn + h end
  if c.qk_norm == "full" then attn = attn + qd + kvd elseif c.qk_norm == "head" then attn = attn + 2 * hd end
  local p = {embedding = c.vocab * h, lm_head = c.tie and 0 or c.vocab * h, final_norm = h,
             attention = 0, norms = 0, router = 0, experts = 0, experts_active = 0, shared_experts = 0,
             dense_ffn = 0, moe_layers = 0}
  local moe_index = 0
  for i = 0, c.layers - 1 do
    p.attention = p.attention + attn
    p.norms = p.norms + 2 * h
    if c.is_moe[i] then
      moe_index = moe_index + 1
      p.moe_layers = p.moe_layers + 1
      p.router = p.router + c.router_mult * c.num_experts * h
      local per_expert = c.expert_params and c.expert_params[moe_index] or ffn_params(c.activation, h, c.expert_inner)
      p.experts = p.experts + c.num_experts * per_expert
      p.experts_active = p.experts_active + c.top_k * per_expert
      if c.shared_inner > 0 then
        p.shared_experts = p.shared_experts + ffn_params(c.activation, h, c.shared_inner) + (c.shared_gate and h or 0)
      end
    else
      p.dense_ffn = p.dense_ffn + ffn_params(c.activation, h, c.dense_inner)
    end
  end
  local common = p.embedding + p.lm_head + p.final_norm + p.attention + p.norms + p.router + p.shared_experts + p.dense_ffn
  p.total = common + p.experts
  p.active = common + p.experts_active
  -- weights a token multiplies by (2 FLOPs each): the attention projections,
  -- routers, its experts, shared experts, dense FFNs and the head (V*H even
  -- when tied to the embedding); not the embedding lookup, norms or biases
  p.matmul_active = c.layers * attn_matmul + p.router + p.experts_active + p.shared_experts + p.dense_ffn
    + c.vocab * h
  return p
end

local function per_expert_params(c, l)
  return c.expert_params and c.expert_params[l] or ffn_params(c.activation, c.hidden, c.expert_inner)
end

-- -------------------------------------------------------- constructor --

local cost_keys = {model = true, hardware_profile = true, peak_flops = true, bandwidth = true, memory = true,
                   dtype = true}

--- moe.MoECostAnalyzer{model=, hardware_profile="h100_80gb"|"a100_80gb"|"h200"|"cpu",
--   peak_flops=, bandwidth=, memory=, dtype=}
-- peak_flops (FLOP/s), bandwidth (bytes/s), memory (bytes) override the
-- profile's; dtype ("bf16", "f32", ...) is the storage type of weights,
-- activations and the KV cache (default: the profile's, bf16 on GPUs).
-- Fields: total_params, active_params, params (the breakdown), config (the
-- canonical description), hardware {name, peak_flops, bandwidth, memory, dtype}.
local function new_cost(opts)
  local f = "MoECostAnalyzer"
  if type(opts) ~= "table" then U.fail(f, "expected a table {model=, hardware_profile=}, got %s", type(opts)) end
  U.check_opts(f, opts, cost_keys)
  if opts.model == nil then U.fail(f, "option 'model' is required (a moe.MoEModel or a config table)") end
  local c, raw = describe_model(f, opts.model)
  if c.top_k > c.num_experts then U.fail(f, "experts_per_token (%d) exceeds num_experts (%d)", c.top_k, c.num_experts) end
  local pname = opts.hardware_profile or "h100_80gb"
  if type(pname) ~= "string" then U.fail(f, "option 'hardware_profile' must be a profile name, got %s", type(pname)) end
  pname = aliases[pname] or pname
  local prof = M.PROFILES[pname]
  if not prof then
    local names = {}
    for n in pairs(M.PROFILES) do names[#names + 1] = n end
    table.sort(names)
    U.fail(f, "unknown hardware_profile %q (expected %s)", pname, table.concat(names, ", "))
  end
  local hw = {}
  for k, v in pairs(prof) do hw[k] = v end
  hw.peak_flops = U.opt_num(f, opts, "peak_flops", hw.peak_flops, 0)
  hw.bandwidth = U.opt_num(f, opts, "bandwidth", hw.bandwidth, 0)
  hw.memory = U.opt_num(f, opts, "memory", hw.memory, 0)
  if hw.peak_flops <= 0 or hw.bandwidth <= 0 then U.fail(f, "peak_flops and bandwidth must be > 0") end
  hw.dtype = opts.dtype or hw.dtype
  if not dtype_bytes[hw.dtype] then U.fail(f, "option 'dtype' must be one of bf16, f16, f32, fp8, got %s", U.describe(hw.dtype)) end
  local p = count(c)
  return setmetatable({config = c, source_config = raw, params = p, total_params = p.total, active_params = p.active,
                       hardware = hw, bytes = dtype_bytes[hw.dtype]}, Cost)
end

local function check_self(fname, self)
  if getmetatable(self) ~= Cost then error(fname .. ": call it on a MoECostAnalyzer with ':'", 3) end
end

local function check_len(fname, s, argname)
  if type(s) ~= "number" or s < 1 or s ~= math.floor(s) then
    error(string.format("%s: %s must be a positive integer, got %s", fname, argname or "sequence_length", U.describe(s)), 3)
  end
  return s
end

--- num_params() and num_active_params(): the exact counts (as the C model's).
function Cost:num_params() check_self("MoECostAnalyzer:num_params", self); return self.total_params end
function Cost:num_active_params() check_self("MoECostAnalyzer:num_active_params", self); return self.active_params end

--- Expected number of distinct experts a batch of B tokens touches in one
-- MoE layer under uniform routing: U(B) = E (1 - (1 - k/E)^B).
function Cost:experts_touched(b)
  check_self("MoECostAnalyzer:experts_touched", self)
  check_len("MoECostAnalyzer:experts_touched", b, "batch_size")
  local e, k = self.config.num_experts, self.config.top_k
  return e * (1 - (1 - k / e) ^ b)
end

--- Attention FLOPs of one token attending to `context` positions, all layers:
-- QK^T and AV, 2 * heads * head_dim * context each, per layer.
function Cost:attention_flops(context)
  check_self("MoECostAnalyzer:attention_flops", self)
  local c = self.config
  return 4 * c.layers * c.heads * c.head_dim * context
end

--- flops_per_token(sequence_length[, {mode = "train"|"forward"|"decode"}])
-- Forward FLOPs of one token: 2 per multiply-accumulate over the weights it
-- uses (attention projections, the router, its k experts and shared experts,
-- dense FFNs, the LM head) plus attention over its context. In a causal
-- sequence of length S (forward, train) a token attends to (S + 1)/2
-- positions on average; a decode step at context S attends to S. Training
-- is 3x forward (backward = 2x forward). Norms, activations, softmax and
-- the router's top-k are elementwise and not counted.
function Cost:flops_per_token(s, opts)
  local f = "MoECostAnalyzer:flops_per_token"
  check_self(f, self)
  check_len(f, s)
  opts = U.check_opts(f, opts, {mode = true})
  local mode = opts.mode or "forward"
  local ctx
  if mode == "decode" then ctx = s elseif mode == "forward" or mode == "train" then ctx = (s + 1) / 2
  else U.fail(f, "option 'mode' must be \"forward\", \"train\" or \"decode\", got %s", U.describe(mode)) end
  local fwd = 2 * self.params.matmul_active + self:attention_flops(ctx)
  return mode == "train" and 3 * fwd or fwd
end

--- activation_bytes(batch_size, sequence_length): an estimate of the
-- activations a training step keeps for backward (no recomputation, no
-- flash-attention score matrices), in the storage dtype, per token:
--   embedding output H; per block: the attention norm's input and output 2H,
--   q, k, v (heads + 2 kv_heads) * head_dim, the attention output heads * head_dim,
--   the residual H, the MLP norm's input and output 2H; per MoE block also the
--   router logits E (f32) and per chosen expert its input copy H, SwiGLU's gate,
--   up and product 3I (GELU: 2I) and its output H, and the combined output H
--   (plus the same per shared expert); per dense block its FFN's 3I (2I) + H;
--   the final norm 2H and the logits V (f32, for the loss).
function Cost:activation_bytes(b, s)
  local f = "MoECostAnalyzer:activation_bytes"
  check_self(f, self)
  check_len(f, b, "batch_size")
  check_len(f, s)
  local c, w = self.config, self.bytes
  local h = c.hidden
  local ffn_mult = c.activation == "gelu" and 2 or 3
  local per_tok = h * w + 2 * h * w + c.vocab * 4
  for i = 0, c.layers - 1 do
    per_tok = per_tok + (2 * h + (c.heads + 2 * c.kv_heads) * c.head_dim + c.heads * c.head_dim + h + 2 * h) * w
    if c.is_moe[i] then
      per_tok = per_tok + c.num_experts * 4 + c.top_k * (2 * h + ffn_mult * c.expert_inner) * w + h * w
      if c.shared_inner > 0 then per_tok = per_tok + (ffn_mult * c.shared_inner + h) * w end
    else
      per_tok = per_tok + (ffn_mult * c.dense_inner + h) * w
    end
  end
  return per_tok * b * s
end

--- kv_cache_bytes(batch_size, context): keys and values of every layer.
function Cost:kv_cache_bytes(b, s)
  local f = "MoECostAnalyzer:kv_cache_bytes"
  check_self(f, self)
  check_len(f, b, "batch_size")
  check_len(f, s, "context")
  local c = self.config
  return 2 * c.layers * c.kv_heads * c.head_dim * b * s * self.bytes
end

--- memory{batch_size=1, sequence_length=2048[, training = true]} -> bytes and GB:
--   weights     total_params x the storage dtype
--   gradients   total_params x the storage dtype
--   optimizer   AdamW m and v in f32 (8 bytes a parameter), plus f32 master
--               weights (4 bytes) when the storage dtype is not f32
--   activations activation_bytes(batch_size, sequence_length) (training)
--   kv_cache    kv_cache_bytes(batch_size, sequence_length) (inference)
-- training = true (default) counts weights + gradients + optimizer +
-- activations; false counts weights + KV cache. fits: total <= the
-- profile's memory (nil when the profile has none).
function Cost:memory(opts)
  local f = "MoECostAnalyzer:memory"
  check_self(f, self)
  opts = U.check_opts(f, opts, {batch_size = true, sequence_length = true, training = true})
  local b = U.opt_int(f, opts, "batch_size", 1, 1)
  local s = U.opt_int(f, opts, "sequence_length", 2048, 1)
  local training = opts.training ~= false
  local P, w = self.total_params, self.bytes
  local m = {weights = P * w}
  if training then
    m.gradients = P * w
    m.optimizer = P * 8
    m.master_weights = w ~= 4 and P * 4 or 0
    m.activations = self:activation_bytes(b, s)
    m.total = m.weights + m.gradients + m.optimizer + m.master_weights + m.activations
  else
    m.kv_cache = self:kv_cache_bytes(b, s)
    m.total = m.weights + m.kv_cache
  end
  local gb = {}
  for k, v in pairs(m) do gb[k .. "_gb"] = v / 1e9 end
  for k, v in pairs(gb) do m[k] = v end
  if self.hardware.memory then m.fits = m.total <= self.hardware.memory end
  return m
end

-- Bytes of weights a step reads when `tokens` tokens pass each MoE layer:
-- every non-expert weight except the embedding table (tokens rows of it),
-- and U(tokens) experts per MoE layer.
local function weight_bytes_touched(self, tokens)
  local c, p = self.config, self.params
  local e, k = c.num_experts, c.top_k
  local u = e * (1 - (1 - k / e) ^ tokens)
  local experts = 0
  for l = 1, p.moe_layers do experts = experts + u * per_expert_params(c, l) end
  local head = c.vocab * c.hidden   -- read as the head even when tied
  local rest = p.total - p.experts - p.embedding - p.lm_head + head + math.min(tokens, c.vocab) * c.hidden
  return (rest + experts) * self.bytes, u
end

local analyze_keys = {batch_size = true, sequence_length = true, mode = true}

--- analyze{batch_size=1, sequence_length=2048, mode="decode"|"prefill"|"train"}
-- A roofline estimate of one step on the hardware profile.
--   decode:  batch_size sequences each generate one token at context
--            sequence_length. Bytes: the weights touched (all non-expert
--            weights, U(B) experts per MoE layer, B embedding rows) plus the
--            KV cache read (and the new entries written).
--   prefill: batch_size x sequence_length tokens in one forward; weights
--            touched with U(B S) experts, the KV cache written.
--   train:   one training step on batch_size x sequence_length tokens (3x
--            forward FLOPs); bytes: weights read twice (forward, backward),
--            gradients written and read, AdamW's m, v (and f32 master
--            weights) read and written, weights written, activations
--            written and read once.
-- step time = max(FLOPs / peak_flops, bytes / bandwidth); bound is
-- "compute" when the FLOP term is larger, else "memory".
-- Returns {mode=, batch_size=, sequence_length=, tokens=, flops_per_token=,
-- flops=, bytes=, memory_bandwidth_gb (GB moved per step), arithmetic_intensity
-- (FLOP/byte), ridge_point (the profile's peak_flops / bandwidth),
-- compute_time_s=, memory_time_s=, step_time_s=, throughput (tokens/s bound),
-- bound=, experts_touched (U per MoE layer), memory = memory{...}, hardware=}.
function Cost:analyze(opts)
  local f = "MoECostAnalyzer:analyze"
  check_self(f, self)
  opts = U.check_opts(f, opts, analyze_keys)
  local b = U.opt_int(f, opts, "batch_size", 1, 1)
  local s = U.opt_int(f, opts, "sequence_length", 2048, 1)
  local mode = opts.mode or "decode"
  local c, hw = self.config, self.hardware
  local tokens, fpt, bytes, u
  if mode == "decode" then
    tokens = b
    fpt = self:flops_per_token(s, {mode = "decode"})
    local wb
    wb, u = weight_bytes_touched(self, b)
    bytes = wb + self:kv_cache_bytes(b, s) + 2 * c.layers * c.kv_heads * c.head_dim * b * self.bytes
  elseif mode == "prefill" then
    tokens = b * s
    fpt = self:flops_per_token(s, {mode = "forward"})
    local wb
    wb, u = weight_bytes_touched(self, tokens)
    bytes = wb + self:kv_cache_bytes(b, s)
  elseif mode == "train" then
    tokens = b * s
    fpt = self:flops_per_token(s, {mode = "train"})
    local P, w = self.total_params, self.bytes
    local master = w ~= 4 and 4 or 0
    bytes = P * (2 * w + w) + P * (w + 2 * 8 + 2 * master + w) + 2 * self:activation_bytes(b, s)
    u = c.num_experts * (1 - (1 - c.top_k / c.num_experts) ^ tokens)
  else
    U.fail(f, "option 'mode' must be \"decode\", \"prefill\" or \"train\", got %s", U.describe(mode))
  end
  local flops = fpt * tokens
  local tc, tm = flops / hw.peak_flops, bytes / hw.bandwidth
  local step = math.max(tc, tm)
  return {
    mode = mode, batch_size = b, sequence_length = s, tokens = tokens,
    flops_per_token = fpt, flops = flops, bytes = bytes, memory_bandwidth_gb = bytes / 1e9,
    arithmetic_intensity = flops / bytes, ridge_point = hw.peak_flops / hw.bandwidth,
    compute_time_s = tc, memory_time_s = tm, step_time_s = step, throughput = tokens / step,
    bound = tc >= tm and "compute" or "memory", experts_touched = u,
    memory = self:memory{batch_size = b, sequence_length = s, training = mode == "train"},
    hardware = hw,
  }
end

-- The dense model that replaces every MoE layer's router, experts and
-- shared experts by one FFN of `inner` (same activation).
local function dense_twin(self, inner)
  local c = {}
  for k, v in pairs(self.config) do c[k] = v end
  c.is_moe = {}
  for i = 0, c.layers - 1 do c.is_moe[i] = false end
  local twin = setmetatable({config = c, bytes = self.bytes, hardware = self.hardware}, Cost)
  -- count every block dense at dense_inner, then resize the former MoE blocks' FFNs
  local p = count(c)
  local swap = 0
  for i = 0, c.layers - 1 do
    if self.config.is_moe[i] then
      swap = swap + ffn_params(c.activation, c.hidden, inner) - ffn_params(c.activation, c.hidden, c.dense_inner)
    end
  end
  p.dense_ffn, p.total, p.active, p.matmul_active = p.dense_ffn + swap, p.total + swap, p.active + swap,
    p.matmul_active + swap
  twin.params, twin.total_params, twin.active_params = p, p.total, p.active
  return twin
end

--- compare_with_dense{sequence_length=2048, batch_size=1}
-- Two dense twins: every MoE layer (router, experts, shared experts) becomes
-- one FFN of the same activation, with intermediate size
--   equal_active: k * I + shared (the same active parameters, up to the router), and
--   equal_total:  E * I + shared (the same total parameters, up to the router).
-- Returns {moe = {...}, equal_active = {...}, equal_total = {...},
--   compute_reduction = equal_total FLOPs / MoE FLOPs per token (training),
--   capacity_ratio = MoE total / active params (what the MoE holds per FLOP spent),
--   flops_overhead = MoE FLOPs / equal_active FLOPs - 1 (the router's cost),
--   decode_bytes_ratio = MoE decode-step bytes / equal_active's at batch_size},
-- each entry {total_params=, active_params=, ffn_intermediate_size=,
--   flops_per_token (training), forward_flops_per_token=, decode_bytes=}.
function Cost:compare_with_dense(opts)
  local f = "MoECostAnalyzer:compare_with_dense"
  check_self(f, self)
  opts = U.check_opts(f, opts, {sequence_length = true, batch_size = true})
  local s = U.opt_int(f, opts, "sequence_length", 2048, 1)
  local b = U.opt_int(f, opts, "batch_size", 1, 1)
  local c = self.config
  if c.expert_params then U.fail(f, "the model has custom experts; a dense twin is not defined") end
  local function entry(model, inner)
    return {
      total_params = model.total_params, active_params = model.active_params, ffn_intermediate_size = inner,
      flops_per_token = model:flops_per_token(s, {mode = "train"}),
      forward_flops_per_token = model:flops_per_token(s),
      decode_bytes = model:analyze{batch_size = b, sequence_length = s, mode = "decode"}.bytes,
    }
  end
  local ea = dense_twin(self, c.top_k * c.expert_inner + c.shared_inner)
  local et = dense_twin(self, c.num_experts * c.expert_inner + c.shared_inner)
  local out = {
    moe = entry(self, nil),
    equal_active = entry(ea, c.top_k * c.expert_inner + c.shared_inner),
    equal_total = entry(et, c.num_experts * c.expert_inner + c.shared_inner),
    sequence_length = s, batch_size = b,
  }
  out.compute_reduction = out.equal_total.flops_per_token / out.moe.flops_per_token
  out.capacity_ratio = out.moe.total_params / out.moe.active_params
  out.flops_overhead = out.moe.flops_per_token / out.equal_active.flops_per_token - 1
  out.decode_bytes_ratio = out.moe.decode_bytes / out.equal_active.decode_bytes
  return out
end

--- summary() -> a few lines of text: parameters, FLOPs per token, memory, decode roofline.
function Cost:summary(opts)
  check_self("MoECostAnalyzer:summary", self)
  opts = U.check_opts("MoECostAnalyzer:summary", opts, {batch_size = true, sequence_length = true})
  local a = self:analyze{batch_size = opts.batch_size or 1, sequence_length = opts.sequence_length or 2048}
  local mem = self:memory{batch_size = opts.batch_size or 1, sequence_length = opts.sequence_length or 2048}
  return table.concat({
    string.format("params: %.3fB total, %.3fB active (%.1f%%)", self.total_params / 1e9, self.active_params / 1e9,
      100 * self.active_params / self.total_params),
    string.format("forward FLOPs/token at %d: %.3g (training %.3g)", a.sequence_length,
      self:flops_per_token(a.sequence_length), self:flops_per_token(a.sequence_length, {mode = "train"})),
    string.format("training memory: %.1f GB (weights %.1f, grads %.1f, AdamW %.1f, master %.1f, activations %.1f)",
      mem.total_gb, mem.weights_gb, mem.gradients_gb, mem.optimizer_gb, mem.master_weights_gb, mem.activations_gb),
    string.format("decode on %s at batch %d: %.3g GB/step, %.0f tokens/s, %s-bound (%.1f experts/layer touched)",
      self.hardware.name, a.batch_size, a.memory_bandwidth_gb, a.throughput, a.bound, a.experts_touched),
  }, "\n")
end

Cost.__tostring = function(self)
  return string.format("MoECostAnalyzer(%.3gB params, %.3gB active, %s)", self.total_params / 1e9,
    self.active_params / 1e9, self.hardware.name)
end

--- MoECostAnalyzer.measure_cpu{size=1024, bytes=2^27}: times an f32 GEMM of
-- size^3 and a copy of `bytes` on this machine's CPU -> {peak_flops=,
-- bandwidth=} to pass to MoECostAnalyzer{hardware_profile = "cpu", ...}.
-- The GEMM rate is an achieved, not a theoretical, peak.
function M.measure_cpu(opts)
  local f = "MoECostAnalyzer.measure_cpu"
  opts = U.check_opts(f, opts, {size = true, bytes = true})
  local n = U.opt_int(f, opts, "size", 1024, 16)
  local nbytes = U.opt_int(f, opts, "bytes", 2 ^ 27, 4096)
  local core = require "moelab.core"
  local a, b = core.randn({n, n}, {seed = 1}), core.randn({n, n}, {seed = 2})
  core.matmul(a, b)   -- warm up
  local reps, t0 = 3, core.clock()
  for _ = 1, reps do core.matmul(a, b) end
  local flops = reps * 2 * n ^ 3 / math.max(core.clock() - t0, 1e-9)
  local m = math.floor(nbytes / 4)
  local src, dst = core.ones({m}), core.zeros({m})
  dst:copy(src)
  t0 = core.clock()
  for _ = 1, reps do dst:copy(src) end
  local bw = reps * 2 * m * 4 / math.max(core.clock() - t0, 1e-9)
  src:free(); dst:free()
  return {peak_flops = flops, bandwidth = bw}
end

--- moe.MoECostAnalyzer{...} (see new_cost above); also
-- moe.MoECostAnalyzer.measure_cpu{...} and moe.MoECostAnalyzer.PROFILES.
M.MoECostAnalyzer = setmetatable({measure_cpu = M.measure_cpu, PROFILES = M.PROFILES},
  {__call = function(_, opts) return new_cost(opts) end})

M.Cost = Cost
M.count = count
M.describe_model = describe_model
return M
