--- Hugging Face checkpoints: load OLMoE, Mixtral and Qwen2-MoE models saved by
-- transformers (config.json + model.safetensors, or a sharded
-- model.safetensors.index.json) into moelab models, and save moelab models back
-- in the layout transformers loads.
--
--   local model = moe.from_pretrained("path/to/olmoe")      -- picks by config.json model_type
--   local model = moe.models.Mixtral.from_pretrained(dir)     -- insists on model_type "mixtral"
--   moe.save_pretrained(model, "out", {model_type = "qwen2_moe"})
--
-- Loading maps the config (both rope_theta and rope_parameters.rope_theta;
-- num_experts / num_local_experts; norm_topk_prob; moe_intermediate_size;
-- shared_expert_intermediate_size; decoder_sparse_step and mlp_only_layers;
-- qkv_bias / attention_bias; head_dim; tie_word_embeddings ...) onto
-- moe.MoEModel options, and the tensors onto the model's parameters: the
-- "model." prefix is dropped, Mixtral's block_sparse_moe.* becomes mlp.*, and
-- per-expert matrices (experts.E.{gate_proj,up_proj,down_proj} or
-- experts.E.{w1,w3,w2}) are stacked into the [E, ...] expert banks. Fused 3-D
-- layouts (experts.gate_up_proj [E, 2I, H] or [E, H, 2I] with the gate half
-- first, experts.down_proj [E, H, I] or [E, I, H]) are accepted too; where
-- both readings fit (H = 2I, or H = I), transformers' own layout ([E, 2I, H],
-- [E, H, I]) is taken. bf16, f16 and f32 tensors load as f32.
--
-- Not representable, so refused with an error: rope scaling other than the
-- default, OLMoE's clip_qkv, Qwen2-MoE's use_sliding_window, activations other
-- than silu. Mixtral's sliding_window is ignored (moelab attends to the whole
-- sequence): exact for sequences no longer than the window.
--
-- The loaded model carries model.hf = {model_type=, config=, router_aux_loss_coef=}.
-- Saving writes config.json and model.safetensors with transformers' names
-- (experts unstacked as experts.E.* / Mixtral's block_sparse_moe.experts.E.w1..3).
local mio = require "moelab.io"

local M = {}

local ARCH = {olmoe = "OlmoeForCausalLM", mixtral = "MixtralForCausalLM", qwen2_moe = "Qwen2MoeForCausalLM"}
local NAMES = {olmoe = "OLMoE", mixtral = "Mixtral", qwen2_moe = "QwenMoE"}

local function fail(f, fmt, ...) error(f .. ": " .. string.format(fmt, ...), 0) end

local function exists(path)
  local fh = io.open(path, "rb")
  if fh then fh:close(); return true end
  return false
end

local function shape_str(s) return "[" .. table.concat(s, ", ") .. "]" end

local function same_shape(a, b)
  if #a ~= #b then return false end
  for i = 1, #a do if a[i] ~= b[i] then return false end end
  return true
end

-- f32 values read back from the C config print as 9.99999974737875e-06; JSON wants 1e-06
local function clean(x) return tonumber(string.format("%.7g", x)) end

local function read_config(f, dir)
  if type(dir) ~= "string" then fail(f, "dir must be a path string, got %s", type(dir)) end
  local path = dir .. "/config.json"
  local ok, text = pcall(mio.read_file, path)
  if not ok then fail(f, "cannot read %s (is %s a checkpoint directory?)", path, dir) end
  local ok2, cfg = pcall(mio.json.decode, text)
  if not ok2 or type(cfg) ~= "table" then fail(f, "%s is not a JSON object", path) end
  return cfg
end

---------------------------------------------------------------------------
-- Configs

local function int_field(f, cfg, key, default)
  local v = cfg[key]
  if v == nil then
    if default == nil then fail(f, "config.json has no '%s'", key) end
    return default
  end
  if type(v) ~= "number" or v ~= math.floor(v) or v < 0 then
    fail(f, "config.json: '%s' must be a non-negative integer, got %s", key, tostring(v))
  end
  return v
end

local function rope_theta(f, cfg, default)
  local rp = cfg.rope_parameters
  if type(rp) == "table" then
    if rp.rope_type ~= nil and rp.rope_type ~= "default" then
      fail(f, "rope_parameters.rope_type '%s' is not supported (only the default rotary embedding)", tostring(rp.rope_type))
    end
    if rp.rope_theta ~= nil then return rp.rope_theta end
  end
  local rs = cfg.rope_scaling
  if type(rs) == "table" then
    local t = rs.rope_type or rs.type
    if t ~= nil and t ~= "default" then
      fail(f, "rope_scaling type '%s' is not supported (only the default rotary embedding)", tostring(t))
    end
  end
  return cfg.rope_theta or default
end

--- config_from_hf(cfg) -> moe.MoEModel options, model_type. Errors name what
-- cannot be represented.
function M.config_from_hf(cfg, f)
  f = f or "from_pretrained"
  local mt = cfg.model_type
  if not ARCH[mt] then
    fail(f, "unknown model_type %s (supported: olmoe, mixtral, qwen2_moe, moelab)",
      mt == nil and "(none in config.json)" or ("'" .. tostring(mt) .. "'"))
  end
  local act = cfg.hidden_act or "silu"
  if act ~= "silu" then fail(f, "hidden_act '%s' is not supported (SwiGLU experts use silu)", tostring(act)) end
  local heads = int_field(f, cfg, "num_attention_heads")
  local hidden = int_field(f, cfg, "hidden_size")
  local o = {
    name = NAMES[mt],
    vocab_size = int_field(f, cfg, "vocab_size"),
    hidden_size = hidden,
    num_layers = int_field(f, cfg, "num_hidden_layers"),
    num_heads = heads,
    num_kv_heads = int_field(f, cfg, "num_key_value_heads", heads),
    norm_eps = cfg.rms_norm_eps or 1e-6,
    tie_word_embeddings = cfg.tie_word_embeddings == true,
    activation = "swiglu",
    router = "topk", router_score = "softmax", capacity_factor = 0, aux_loss_type = "batch",
    experts_per_token = int_field(f, cfg, "num_experts_per_tok"),
  }
  if type(cfg.head_dim) == "number" and cfg.head_dim > 0 then o.head_dim = cfg.head_dim end
  if mt == "olmoe" then
    if cfg.clip_qkv ~= nil then fail(f, "clip_qkv = %s is not supported", tostring(cfg.clip_qkv)) end
    o.num_experts = int_field(f, cfg, "num_experts")
    o.expert_intermediate_size = int_field(f, cfg, "intermediate_size")
    o.intermediate_size = o.expert_intermediate_size
    o.renormalize = cfg.norm_topk_prob == true
    o.qk_norm = true
    o.attention_bias = cfg.attention_bias == true
    o.rope_theta = rope_theta(f, cfg, 10000)
    o.head_dim = nil   -- OLMoE's attention always uses hidden_size / num_attention_heads
  elseif mt == "mixtral" then
    o.num_experts = int_field(f, cfg, "num_local_experts", cfg.num_experts)
    o.expert_intermediate_size = int_field(f, cfg, "intermediate_size")
    o.intermediate_size = o.expert_intermediate_size
    o.renormalize = true
    o.jitter_noise = cfg.router_jitter_noise or 0
    o.rope_theta = rope_theta(f, cfg, 1e6)
  else -- qwen2_moe
    if cfg.use_sliding_window == true then fail(f, "use_sliding_window = true is not supported") end
    o.num_experts = int_field(f, cfg, "num_experts")
    o.expert_intermediate_size = int_field(f, cfg, "moe_intermediate_size")
    o.intermediate_size = int_field(f, cfg, "intermediate_size")
    o.renormalize = cfg.norm_topk_prob == true
    -- transformers 4.x always put biases on q, k, v; 5.x made it the qkv_bias option
    o.qkv_bias = cfg.qkv_bias ~= false
    o.attention_bias = false
    local shared = int_field(f, cfg, "shared_expert_intermediate_size", 0)
    if shared > 0 then
      o.num_shared_experts, o.shared_intermediate_size, o.shared_expert_gate = 1, shared, true
    end
    local step = int_field(f, cfg, "decoder_sparse_step", 1)
    o.moe_layer_frequency = (o.num_experts > 0 and step > 0) and step or 0
    local dense = {}
    for i, v in ipairs(cfg.mlp_only_layers or {}) do
      if type(v) ~= "number" then fail(f, "config.json: mlp_only_layers[%d] must be a layer id", i) end
      if v < o.num_layers then dense[#dense + 1] = v end
    end
    o.mlp_only_layers = dense
    o.rope_theta = rope_theta(f, cfg, 10000)
  end
  if o.num_experts == 0 then o.moe_layer_frequency, o.num_experts = 0, 1; o.experts_per_token = 1 end
  if o.experts_per_token > o.num_experts then
    fail(f, "num_experts_per_tok (%d) exceeds the number of experts (%d)", o.experts_per_token, o.num_experts)
  end
  return o, mt
end

-- Is layer i an MoE layer under moelab config c (the C model's rule)?
local function is_moe_layer(c, i)
  local freq, first = c.moe_layer_frequency or 1, c.first_dense_layers or 0
  if freq <= 0 or i < first then return false end
  for _, d in ipairs(c.mlp_only_layers or {}) do if d == i then return false end end
  return freq == 1 or i % freq == freq - 1
end

--- config_to_hf(model, model_type) -> the config.json table transformers reads.
function M.config_to_hf(model, mt, f)
  f = f or "save_pretrained"
  local c = model.config
  local bad = {}
  local function need(ok, what) if not ok then bad[#bad + 1] = what end end
  need(c.router == "topk", "router '" .. tostring(c.router) .. "' (only top-k)")
  need(c.router_score == "softmax", "router_score '" .. tostring(c.router_score) .. "' (only softmax)")
  need((c.capacity_factor or 0) == 0, "capacity_factor")
  need(math.abs((c.routed_scaling_factor or 1) - 1) < 1e-6, "routed_scaling_factor ~= 1")
  need(c.activation == "swiglu", "activation '" .. tostring(c.activation) .. "' (only swiglu)")
  need(not c.aux_free, "aux_free bias balancing")
  need(not (model.options and model.options.expert), "custom experts")
  local all_moe = true
  local dense = {}
  for i = 0, c.num_layers - 1 do
    if not is_moe_layer(c, i) then all_moe = false; dense[#dense + 1] = i end
  end
  local hd = c.head_dim
  local hf = {
    architectures = {ARCH[mt]}, model_type = mt,
    vocab_size = c.vocab_size, hidden_size = c.hidden_size, num_hidden_layers = c.num_layers,
    num_attention_heads = c.num_heads, num_key_value_heads = c.num_kv_heads,
    hidden_act = "silu", rms_norm_eps = clean(c.norm_eps), tie_word_embeddings = c.tie_word_embeddings,
    num_experts_per_tok = c.experts_per_token,
    rope_theta = clean(c.rope_theta),
    rope_parameters = {rope_type = "default", rope_theta = clean(c.rope_theta)},
    router_aux_loss_coef = (model.hf and model.hf.router_aux_loss_coef) or 0.01,
    output_router_logits = false, initializer_range = 0.02, use_cache = true,
    max_position_embeddings = (model.hf and model.hf.config.max_position_embeddings) or 4096,
    dtype = "float32", torch_dtype = "float32", moelab_version = require("moelab.core").version,
  }
  need(c.rope_theta > 0, "no rotary embedding (rope_theta = 0)")
  if mt == "olmoe" then
    need(c.qk_norm, "qk_norm off (OLMoE always normalises q and k)")
    need(not c.qkv_bias, "biases on q, k, v only (OLMoE's attention_bias covers all four)")
    need(c.num_shared_experts == 0, "a shared expert")
    need(all_moe, "dense layers")
    need(hd * c.num_heads == c.hidden_size, "head_dim ~= hidden_size / num_heads")
    hf.num_experts = c.num_experts
    hf.intermediate_size = c.expert_intermediate_size
    hf.norm_topk_prob = c.renormalize
    hf.attention_bias = c.attention_bias
  elseif mt == "mixtral" then
    need(not c.qk_norm, "qk_norm")
    need(not c.attention_bias and not c.qkv_bias, "attention biases")
    need(c.renormalize, "renormalize off (Mixtral always renormalises)")
    need(c.num_shared_experts == 0, "a shared expert")
    need(all_moe, "dense layers")
    hf.num_local_experts = c.num_experts
    hf.intermediate_size = c.expert_intermediate_size
    hf.head_dim = hd
    hf.router_jitter_noise = c.jitter_noise or 0
  elseif mt == "qwen2_moe" then
    need(not c.qk_norm, "qk_norm")
    need(not c.attention_bias, "a bias on o_proj (Qwen2-MoE has q, k, v biases only)")
    need(c.num_shared_experts == 1 and c.shared_expert_gate,
      "a shared expert setup other than one gated shared expert (Qwen2-MoE has exactly one, with shared_expert_gate)")
    hf.num_experts = c.num_experts
    hf.moe_intermediate_size = c.expert_intermediate_size
    hf.intermediate_size = c.intermediate_size
    hf.shared_expert_intermediate_size = c.shared_intermediate_size > 0 and c.shared_intermediate_size or
      c.expert_intermediate_size
    hf.norm_topk_prob = c.renormalize
    hf.qkv_bias = c.qkv_bias
    hf.head_dim = hd
    local freq = c.moe_layer_frequency
    hf.decoder_sparse_step = freq > 0 and freq or 1
    -- leading dense layers (first_dense_layers) and a dense model become mlp_only_layers
    local listed = {}
    for i = 0, c.num_layers - 1 do
      local by_step = freq > 0 and (i + 1) % freq == 0
      if by_step and not is_moe_layer(c, i) then listed[#listed + 1] = i end
    end
    if #listed > 0 then hf.mlp_only_layers = listed end
    hf.use_sliding_window = false
  else
    fail(f, "unknown model_type '%s' (olmoe, mixtral or qwen2_moe)", tostring(mt))
  end
  if #bad > 0 then
    fail(f, "the model cannot be written as %s: it has %s", mt, table.concat(bad, ", "))
  end
  return hf
end

---------------------------------------------------------------------------
-- Tensor names

local EXPERT_PART = {w1 = "gate_proj", gate_proj = "gate_proj", w3 = "up_proj", up_proj = "up_proj",
                     w2 = "down_proj", down_proj = "down_proj"}
local MIXTRAL_PART = {gate_proj = "w1", up_proj = "w3", down_proj = "w2"}

-- HF name -> {kind=, target=, expert=, part=}; nil for tensors to ignore.
local function classify(hf_name)
  local n = hf_name:gsub("^model%.", "")
  n = n:gsub("^(layers%.%d+%.)block_sparse_moe%.", "%1mlp.")
  if n:match("%.rotary_emb%.inv_freq$") then return nil end
  local pre, e, part = n:match("^(layers%.%d+%.mlp%.experts)%.(%d+)%.([%w_]+)%.weight$")
  if pre then
    if not EXPERT_PART[part] then return {kind = "direct", target = n} end
    return {kind = "expert", target = pre .. "." .. EXPERT_PART[part], expert = tonumber(e), part = EXPERT_PART[part]}
  end
  pre = n:match("^(layers%.%d+%.mlp%.experts)%.gate_up_proj$")
  if pre then return {kind = "fused_gate_up", target = pre} end
  pre, part = n:match("^(layers%.%d+%.mlp%.experts)%.([%w_]+)$")
  if pre and EXPERT_PART[part] then return {kind = "stacked", target = pre .. "." .. EXPERT_PART[part], part = EXPERT_PART[part]} end
  return {kind = "direct", target = n}
end

-- moelab name (and expert index for banks) -> the name transformers saves.
local function hf_name(mt, name, e)
  local pre, part = name:match("^(layers%.%d+%.mlp%.experts)%.([%w_]+)$")
  if pre and e then
    if mt == "mixtral" then
      return "model." .. pre:gsub("%.mlp%.", ".block_sparse_moe.") .. "." .. e .. "." .. MIXTRAL_PART[part] .. ".weight"
    end
    return "model." .. pre .. "." .. e .. "." .. part .. ".weight"
  end
  if name == "lm_head.weight" then return name end
  if mt == "mixtral" then name = name:gsub("^(layers%.%d+%.)mlp%.gate%.", "%1block_sparse_moe.gate.") end
  return "model." .. name
end
M.hf_name = hf_name

-- LoRA adapter parameters (moelab.peft) are not part of a transformers checkpoint.
local function is_adapter(name) return name:match("lora_[AB]$") ~= nil end

---------------------------------------------------------------------------
-- Loading

local function weight_files(f, dir)
  local index = dir .. "/model.safetensors.index.json"
  if exists(index) then return index end
  local single = dir .. "/model.safetensors"
  if exists(single) then return single end
  fail(f, "%s has neither model.safetensors nor model.safetensors.index.json", dir)
end

local function copy_checked(f, dst, src, label)
  local a, b = dst:shape(), src:shape()
  if not same_shape(a, b) then
    fail(f, "tensor %s has shape %s, expected %s", label, shape_str(b), shape_str(a))
  end
  dst:copy(src)
end

--- Copies a transformers state dict (name -> tensor) into a model built from its config.
function M.load_state(model, tensors, mt, f)
  f = f or "from_pretrained"
  local by_target, experts, fused, unexpected = {}, {}, {}, {}
  local params = {}
  for _, p in ipairs(model:parameters()) do
    if not is_adapter(p.name) then params[p.name] = p.value end
  end
  local tied = model.config.tie_word_embeddings
  for name, t in pairs(tensors) do
    local c = classify(name)
    if c == nil or (tied and c.target == "lm_head.weight") then
      -- ignored: rotary caches, a tied head written out anyway
    elseif c.kind == "expert" then
      experts[c.target] = experts[c.target] or {}
      experts[c.target][c.expert] = {t, name}
    elseif c.kind == "fused_gate_up" then
      fused[c.target .. ".gate_proj"] = {t, name, "gate"}
      fused[c.target .. ".up_proj"] = {t, name, "up"}
    elseif params[c.target] then
      by_target[c.target] = {t, name}
    else
      unexpected[#unexpected + 1] = name
    end
  end
  if #unexpected > 0 then
    table.sort(unexpected)
    local shown = {}
    for i = 1, math.min(#unexpected, 6) do shown[i] = unexpected[i] end
    fail(f, "the checkpoint has tensor%s the %s model does not use: %s%s", #unexpected > 1 and "s" or "", mt,
      table.concat(shown, ", "), #unexpected > 6 and string.format(" (and %d more)", #unexpected - 6) or "")
  end
  local missing = {}
  for _, p in ipairs(model:parameters()) do
    local name, dst = p.name, p.value
    if is_adapter(name) then goto continue end
    local direct = by_target[name]
    local bank = name:match("^layers%.%d+%.mlp%.experts%.([%w_]+)$")
    if direct and bank then
      -- a 3-D tensor for the whole bank: [E, out, in] as ours, or [E, in, out]
      local s, d = direct[1]:shape(), dst:shape()
      if #s == 3 and s[1] == d[1] and s[2] == d[3] and s[3] == d[2] and not same_shape(s, d) then
        dst:copy(direct[1]:transpose(2, 3))
      else
        copy_checked(f, dst, direct[1], direct[2])
      end
    elseif direct then
      copy_checked(f, dst, direct[1], direct[2])
    elseif bank and fused[name] then
      local src, label, half = fused[name][1], fused[name][2], fused[name][3]
      local d, s = dst:shape(), src:shape()     -- d = [E, I, H]
      local E, I, H = d[1], d[2], d[3]
      if #s == 3 and s[1] == E and s[2] == 2 * I and s[3] == H then
        dst:copy(src:narrow(2, half == "gate" and 1 or I + 1, I))
      elseif #s == 3 and s[1] == E and s[2] == H and s[3] == 2 * I then
        dst:copy(src:narrow(3, half == "gate" and 1 or I + 1, I):transpose(2, 3))
      else
        fail(f, "tensor %s has shape %s, expected [%d, %d, %d] (or [%d, %d, %d])", label, shape_str(s),
          E, 2 * I, H, E, H, 2 * I)
      end
    elseif bank and experts[name] then
      local list = experts[name]
      local E = dst:shape()[1]
      for e = 0, E - 1 do
        local src = list[e]
        if not src then
          missing[#missing + 1] = hf_name(mt, name, e)
        else
          copy_checked(f, dst:select(1, e + 1), src[1], src[2])
        end
      end
      for e in pairs(list) do
        if e >= E then fail(f, "tensor %s is for expert %d, but the config has %d experts", list[e][2], e, E) end
      end
    else
      missing[#missing + 1] = hf_name(mt, name, bank and 0 or nil)
    end
    ::continue::
  end
  if #missing > 0 then
    local shown = {}
    for i = 1, math.min(#missing, 6) do shown[i] = missing[i] end
    fail(f, "missing tensor%s %s%s", #missing > 1 and "s" or "", table.concat(shown, ", "),
      #missing > 6 and string.format(" (and %d more)", #missing - 6) or "")
  end
  model.net:refresh_compute()   -- bf16 precision: the compute copy follows the loaded values
end

local function load_hf(f, dir, cfg, want)
  local opts, mt = M.config_from_hf(cfg, f)
  if want and mt ~= want then
    fail(f, "%s holds a '%s' checkpoint, not %s", dir, tostring(mt), want)
  end
  local path = weight_files(f, dir)
  local ok, tensors = pcall(mio.safetensors.load, path, {dtype = "f32"})
  if not ok then fail(f, "%s", tostring(tensors)) end
  local model = require("moelab.model").MoEModel(opts)
  M.load_state(model, tensors, mt, f)
  model.hf = {model_type = mt, config = cfg, router_aux_loss_coef = cfg.router_aux_loss_coef, name_or_path = dir}
  return model
end

--- moe.from_pretrained(dir): a Hugging Face MoE checkpoint (olmoe, mixtral,
-- qwen2_moe) or a moelab one (moe.load).
function M.from_pretrained(dir)
  local f = "from_pretrained"
  local cfg = read_config(f, dir)
  if cfg.model_type == "moelab" then return require("moelab.checkpoint").load(dir) end
  return load_hf(f, dir, cfg)
end

---------------------------------------------------------------------------
-- Saving

--- The transformers state dict of a model: a list of {name, tensor} (experts unstacked).
function M.state_dict(model, mt)
  -- a tied model has no lm_head parameter: transformers re-ties it on load
  local list = {}
  for _, p in ipairs(model:parameters()) do
    local name, t = p.name, p.value
    if is_adapter(name) then goto continue end   -- adapters: merge them first, or save them with lora:save_pretrained
    if t:device() ~= "cpu" then t = t:to("cpu") end
    if name:match("^layers%.%d+%.mlp%.experts%.[%w_]+$") then
      for e = 0, t:shape()[1] - 1 do
        list[#list + 1] = {hf_name(mt, name, e), t:select(1, e + 1):contiguous()}
      end
    else
      list[#list + 1] = {hf_name(mt, name), t}
    end
    ::continue::
  end
  table.sort(list, function(a, b) return a[1] < b[1] end)
  return list
end

-- transformers 5 validates config fields by type: a float field written as 0 or
-- 10000 (how the JSON encoder writes whole numbers) is rejected, so give them a ".0"
local FLOAT_KEYS = {"rope_theta", "rms_norm_eps", "router_jitter_noise", "router_aux_loss_coef", "initializer_range"}
local function float_fields(text)
  for _, k in ipairs(FLOAT_KEYS) do
    text = text:gsub('("' .. k .. '"%s*:%s*)(%-?%d+)(%s*[,}\n])', '%1%2.0%3')
  end
  return text
end

--- moe.save_pretrained(model, dir, {model_type = "olmoe"|"mixtral"|"qwen2_moe"}):
-- config.json + model.safetensors in transformers' layout. model_type defaults
-- to the one the model was loaded from.
function M.save_pretrained(model, dir, opts)
  local f = "save_pretrained"
  if type(model) ~= "table" or not model.net or not model.config then
    fail(f, "model must be a moe.MoEModel, got %s", type(model))
  end
  if type(dir) ~= "string" then fail(f, "dir must be a path string, got %s", type(dir)) end
  if opts ~= nil and type(opts) ~= "table" then fail(f, "options must be a table, got %s", type(opts)) end
  require("moelab.checkpoint").check_whole(model, f)
  opts = opts or {}
  local mt = opts.model_type or (model.hf and model.hf.model_type)
  if mt == nil then fail(f, "model_type is required (olmoe, mixtral or qwen2_moe)") end
  if mt == "moelab" then return require("moelab.checkpoint").save_model(model, dir) end
  if not ARCH[mt] then fail(f, "unknown model_type '%s' (olmoe, mixtral, qwen2_moe or moelab)", tostring(mt)) end
  local cfg = M.config_to_hf(model, mt, f)
  mio.mkdir_p(dir)
  mio.safetensors.save(dir .. "/model.safetensors", M.state_dict(model, mt), {format = "pt"})
  mio.write_file_atomic(dir .. "/config.json", float_fields(mio.json.encode(cfg, {indent = true})) .. "\n")
  -- a stale index from an earlier sharded save would shadow the new file
  if exists(dir .. "/model.safetensors.index.json") then os.remove(dir .. "/model.safetensors.index.json") end
  return dir
end

---------------------------------------------------------------------------
-- moe.models.OLMoE / Mixtral / QwenMoE

M.models = {}
for mt, name in pairs(NAMES) do
  M.models[name] = {
    model_type = mt,
    from_pretrained = function(dir)
      local f = "models." .. name .. ".from_pretrained"
      return load_hf(f, dir, read_config(f, dir), mt)
    end,
    save_pretrained = function(model, dir) return M.save_pretrained(model, dir, {model_type = mt}) end,
  }
end
M.models.Qwen2MoE = M.models.QwenMoE

return M
