--- Sparse upcycling (Komatsuzaki et al., 2022): turn a dense model into an MoE
-- model whose experts all start as copies of the dense feed-forward block.
--
--   local dense = moe.MoEModel{..., moe_layer_frequency = 0, intermediate_size = 512}
--   local model = moe.upcycle{dense = dense, num_experts = 8, experts_per_token = 2}
--   local model = moe.upcycle{dense = "path/to/llama_dir", num_experts = 8}   -- llama / mistral / qwen2
--
-- Every MoE layer of the new model gets the dense layer's gate_proj / up_proj /
-- down_proj copied into each expert slice of its [E, ...] banks; its router
-- (mlp.gate) is fresh: N(0, router_init_std^2) from `seed` (router_init_std = 0
-- gives a zero router: uniform scores). Attention, norms, embeddings and the head
-- are copied; layers that stay dense (moe_layer_frequency, first_dense_layers,
-- mlp_only_layers) keep their FFN. With renormalize = true (the default) the
-- chosen weights sum to one and the experts are identical, so the upcycled model
-- computes exactly the dense model's function until training moves them apart
-- (expert_noise_std > 0 perturbs each copy to break the symmetry at once).
local core = require "moelab.core"
local mio = require "moelab.io"

local M = {}

local function fail(fmt, ...) error("upcycle: " .. string.format(fmt, ...), 3) end

-- options that describe the MoE layers (passed to moe.MoEModel)
local MOE_KEYS = {
  num_experts = true, experts_per_token = true, renormalize = true, router = true, router_score = true,
  capacity_factor = true, jitter_noise = true, aux_loss_type = true, aux_free = true, aux_free_rate = true,
  moe_layer_frequency = true, first_dense_layers = true, mlp_only_layers = true, routed_scaling_factor = true,
  sinkhorn_iterations = true,
}
local OWN_KEYS = {dense = true, router_init_std = true, seed = true, expert_noise_std = true, name = true}

---------------------------------------------------------------------------
-- Dense Hugging Face checkpoints (Llama-like: llama, mistral, qwen2)

local DENSE_TYPES = {llama = true, mistral = true, qwen2 = true}

local function exists(path)
  local fh = io.open(path, "rb")
  if fh then fh:close(); return true end
  return false
end

--- dense_from_pretrained(dir) -> a dense moe.MoEModel (moe_layer_frequency = 0) from a
-- transformers llama / mistral / qwen2 checkpoint (config.json + model.safetensors or a
-- sharded index). Refused: rope scaling, activations other than silu, mlp_bias.
-- Mistral's / Qwen2's sliding window is ignored (exact up to the window length).
function M.dense_from_pretrained(dir)
  local f = "upcycle.dense_from_pretrained"
  local function bad(fmt, ...) error(f .. ": " .. string.format(fmt, ...), 0) end
  if type(dir) ~= "string" then bad("dir must be a path string, got %s", type(dir)) end
  local ok, text = pcall(mio.read_file, dir .. "/config.json")
  if not ok then bad("cannot read %s/config.json", dir) end
  local cfg = mio.json.decode(text)
  if type(cfg) ~= "table" then bad("%s/config.json is not a JSON object", dir) end
  local mt = cfg.model_type
  if not DENSE_TYPES[mt] then
    bad("model_type '%s' is not a supported dense model (llama, mistral, qwen2)", tostring(mt))
  end
  if (cfg.hidden_act or "silu") ~= "silu" then bad("hidden_act '%s' is not supported", tostring(cfg.hidden_act)) end
  if cfg.mlp_bias == true then bad("mlp_bias = true is not supported") end
  local rs = cfg.rope_scaling or (type(cfg.rope_parameters) == "table" and cfg.rope_parameters) or nil
  if type(rs) == "table" then
    local t = rs.rope_type or rs.type
    if t ~= nil and t ~= "default" then bad("rope scaling '%s' is not supported", tostring(t)) end
  end
  local theta = (type(cfg.rope_parameters) == "table" and cfg.rope_parameters.rope_theta) or cfg.rope_theta or 10000
  local heads = cfg.num_attention_heads
  local o = {
    name = mt, vocab_size = cfg.vocab_size, hidden_size = cfg.hidden_size, num_layers = cfg.num_hidden_layers,
    num_heads = heads, num_kv_heads = cfg.num_key_value_heads or heads, intermediate_size = cfg.intermediate_size,
    moe_layer_frequency = 0, norm_eps = cfg.rms_norm_eps or 1e-6, rope_theta = theta,
    tie_word_embeddings = cfg.tie_word_embeddings == true, activation = "swiglu",
  }
  if type(cfg.head_dim) == "number" and cfg.head_dim > 0 then o.head_dim = cfg.head_dim end
  if mt == "qwen2" then o.qkv_bias = true else o.attention_bias = cfg.attention_bias == true end
  local model = require("moelab.model").MoEModel(o)
  local path = dir .. "/model.safetensors"
  if exists(dir .. "/model.safetensors.index.json") then path = dir .. "/model.safetensors.index.json" end
  local ok2, tensors = pcall(mio.safetensors.load, path, {dtype = "f32"})
  if not ok2 then bad("%s", tostring(tensors)) end
  local by = {}
  for name, t in pairs(tensors) do
    if not name:match("rotary_emb%.inv_freq$") then by[(name:gsub("^model%.", ""))] = t end
  end
  local ok3, err = pcall(require("moelab.checkpoint").load_into, model, by, f)
  if not ok3 then error(err, 0) end
  model.hf = {model_type = mt, config = cfg, dense = true}
  return model
end

---------------------------------------------------------------------------

local function is_moe_layer(c, i)
  local freq, first = c.moe_layer_frequency or 1, c.first_dense_layers or 0
  if freq <= 0 or i < first then return false end
  for _, d in ipairs(c.mlp_only_layers or {}) do if d == i then return false end end
  return freq == 1 or i % freq == freq - 1
end

--- moe.upcycle{dense = model | dir, num_experts=, experts_per_token=2, renormalize=true,
--  router_init_std=0.02, seed=0, expert_noise_std=0, moe_layer_frequency=1,
--  first_dense_layers=, mlp_only_layers=, and other MoE options (router, router_score,
--  capacity_factor, jitter_noise, aux_loss_type, ...)} -> moe.MoEModel
function M.upcycle(opts)
  if type(opts) ~= "table" then fail("expected a table of options, got %s", type(opts)) end
  for k in pairs(opts) do
    if not MOE_KEYS[k] and not OWN_KEYS[k] then
      local names = {}
      for n in pairs(MOE_KEYS) do names[#names + 1] = n end
      for n in pairs(OWN_KEYS) do names[#names + 1] = n end
      table.sort(names)
      fail("unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
  local dense = opts.dense
  if type(dense) == "string" then
    local ok, m = pcall(M.dense_from_pretrained, dense)
    if not ok then error(m, 2) end
    dense = m
  end
  if type(dense) ~= "table" or not dense.net or not dense.config then
    fail("dense must be a moe.MoEModel or a checkpoint directory, got %s", type(dense))
  end
  if #dense:moe_layers() > 0 then
    fail("dense has %d MoE layer(s); give a dense model (moe_layer_frequency = 0)", #dense:moe_layers())
  end
  local E = opts.num_experts
  if type(E) ~= "number" or E < 1 or E % 1 ~= 0 then fail("num_experts must be a positive integer, got %s", tostring(E)) end
  local std = opts.router_init_std == nil and 0.02 or opts.router_init_std
  if type(std) ~= "number" or std < 0 then fail("router_init_std must be a number >= 0") end
  local noise = opts.expert_noise_std or 0
  if type(noise) ~= "number" or noise < 0 then fail("expert_noise_std must be a number >= 0") end
  local seed = opts.seed or 0

  local dc = dense.config
  local cfg = {}
  for k, v in pairs(dc) do cfg[k] = v end
  cfg.name = opts.name or ((dc.name and dc.name ~= "" and (dc.name .. "-upcycled")) or "upcycled")
  cfg.moe_layer_frequency, cfg.first_dense_layers, cfg.mlp_only_layers = 1, 0, {}
  cfg.experts_per_token, cfg.renormalize = 2, true
  cfg.router, cfg.router_score, cfg.capacity_factor, cfg.jitter_noise = "topk", "softmax", 0, 0
  cfg.aux_free, cfg.num_shared_experts, cfg.shared_intermediate_size, cfg.shared_expert_gate = false, 0, 0, false
  cfg.routed_scaling_factor = 1
  for k in pairs(MOE_KEYS) do if opts[k] ~= nil then cfg[k] = opts[k] end end
  cfg.num_experts = E
  cfg.expert_intermediate_size = dc.intermediate_size
  cfg.seed = seed
  if cfg.experts_per_token > E then fail("experts_per_token (%d) exceeds num_experts (%d)", cfg.experts_per_token, E) end
  local ok, model = pcall(require("moelab.model").MoEModel, cfg)
  if not ok then error((tostring(model):gsub("^MoEModel", "upcycle")), 2) end

  local src = {}
  for _, p in ipairs(dense:parameters()) do src[p.name] = p.value end
  local upcycled = 0
  for _, p in ipairs(model:parameters()) do
    local name, dst = p.name, p.value
    local layer = tonumber(name:match("^layers%.(%d+)%."))
    local part = name:match("^layers%.%d+%.mlp%.experts%.([%w_]+)$")
    if name:match("^layers%.%d+%.mlp%.gate%.weight$") then
      if std > 0 then
        dst:copy(core.randn(dst:shape(), {seed = seed * 1000 + layer + 1, std = std}))
      else
        dst:copy(core.zeros(dst:shape()))
      end
    elseif part then
      local from = src["layers." .. layer .. ".mlp." .. part .. ".weight"]
      if not from then fail("the dense model has no layers.%d.mlp.%s.weight for %s", layer, part, name) end
      local shape = dst:shape()
      for e = 1, shape[1] do
        local slice = dst:select(1, e)
        slice:copy(from)
        if noise > 0 then
          slice:copy(slice + core.randn(from:shape(), {seed = seed * 100000 + layer * 1000 + e, std = noise}))
        end
      end
      if part == "gate_proj" or (part == "up_proj" and not src["layers." .. layer .. ".mlp.gate_proj.weight"]) then
        upcycled = upcycled + 1
      end
    elseif name:match("^layers%.%d+%.mlp%.") and is_moe_layer(model.config, layer) then
      fail("cannot initialise %s from a dense model", name)
    else
      local from = src[name]
      if not from then fail("the dense model has no tensor %s", name) end
      local a, b = dst:shape(), from:shape()
      if table.concat(a, ",") ~= table.concat(b, ",") then
        fail("%s has shape [%s] in the dense model, [%s] in the MoE model", name, table.concat(b, ", "), table.concat(a, ", "))
      end
      dst:copy(from)
    end
  end
  model.upcycled_from = {name = dc.name, layers = upcycled, num_experts = E}
  if dense.hf and dense.hf.config then
    model.hf = {config = dense.hf.config, router_aux_loss_coef = 0.01}
    -- a Llama / Mistral upcycle is a Mixtral (renormalized top-k, no biases)
    if (dense.hf.model_type == "llama" or dense.hf.model_type == "mistral") and model.config.renormalize
       and not model.config.attention_bias then
      model.hf.model_type = "mixtral"
    end
  end
  return model
end

return M
