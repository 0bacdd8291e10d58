--- moe.peft: LoRA adapters for MoE models, per expert.
--
--   local lora = moe.peft.MoELoRA{base_model = model, r = 8, lora_alpha = 16,
--     target_modules = {"expert_fc1", "expert_fc2"}, expert_wise_adaptation = true}
--   local trainer = lora:trainer{aux_loss_coef = 0.01}        -- only the adapters learn
--   trainer:train{train_data = ds, max_steps = 100, learning_rate = 1e-3}
--   lora:save_pretrained("out/adapter")                       -- PEFT's layout
--   lora:merge()                                              -- W += (alpha / r) B A, adapters gone
--   local again = moe.peft.from_pretrained(base, "out/adapter")
--
-- The adapters live in the C layers (src/nn/lora.c): an adapted expert bank
-- adds (alpha / r) * B_e (A_e x) to each adapted projection of the rows
-- routed to expert e, with A_e [r, in] and B_e [out, r] one pair per expert
-- (expert_wise_adaptation = true) or one pair shared by every expert. The
-- adapter tensors are parameters of the model (named <bank>.<proj>_lora_A /
-- _lora_B, <linear>.lora_A / lora_B), so they live in its flat buffer;
-- trainers freeze everything else with trainable = moe.peft.is_lora_param.
--
-- target_modules: "expert_fc1" (the experts' gate_proj and up_proj, Mixtral's
-- w1 and w3), "expert_fc2" (down_proj, w2), "gate_proj"/"w1", "up_proj"/"w3",
-- "down_proj"/"w2" (the experts' projection and any Linear of that name: dense
-- MLPs, shared experts), and the attention projections "q_proj", "k_proj",
-- "v_proj", "o_proj" (plain LoRA on those Linear layers).
local core = require "moelab.core"
local mio = require "moelab.io"

local M = {}
local LoRA = {}
LoRA.__index = LoRA

local function fail(f, fmt, ...) error(f .. ": " .. string.format(fmt, ...), 0) end

-- target name -> projections of expert banks, and the name of Linear layers it adapts
local TARGETS = {
  expert_fc1 = {bank = {"gate_proj", "up_proj"}},
  expert_fc2 = {bank = {"down_proj"}},
  gate_proj = {bank = {"gate_proj"}, linear = "gate_proj"},
  up_proj = {bank = {"up_proj"}, linear = "up_proj"},
  down_proj = {bank = {"down_proj"}, linear = "down_proj"},
  w1 = {bank = {"gate_proj"}}, w3 = {bank = {"up_proj"}}, w2 = {bank = {"down_proj"}},
  q_proj = {linear = "q_proj"}, k_proj = {linear = "k_proj"}, v_proj = {linear = "v_proj"}, o_proj = {linear = "o_proj"},
}
local TARGET_LIST = {}
for k in pairs(TARGETS) do TARGET_LIST[#TARGET_LIST + 1] = k end
table.sort(TARGET_LIST)

local MIXTRAL_PART = {gate_proj = "w1", up_proj = "w3", down_proj = "w2"}
local PROJ_ORDER = {gate_proj = 1, up_proj = 2, down_proj = 3}

--- Is this parameter name an adapter's?
function M.is_lora_param(name) return type(name) == "string" and name:match("lora_[AB]$") ~= nil end

local function is_moe_model(m)
  if type(m) ~= "table" or m.net == nil then return false end
  local ok, cfg = pcall(function() return m.net:config() end)
  return ok and type(cfg) == "table"
end

local function check_keys(f, opts, allowed)
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      fail(f, "unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
end

-- The modules the targets select: a list of {path=, kind="bank"|"linear", projs={...}, name=} in model order.
local function plan(f, net, targets)
  local params = net:parameters()
  local banks, bank_order, linears, linear_order = {}, {}, {}, {}
  local kind_cache = {}
  local function kind_at(path)
    if kind_cache[path] == nil then kind_cache[path] = core.layer_kind_at(net, path) or false end
    return kind_cache[path]
  end
  local matched = {}
  for _, p in ipairs(params) do
    local name = p.name
    if M.is_lora_param(name) then fail(f, "the model already has LoRA adapters (%s); merge or unload them first", name) end
    local path, proj = name:match("^(.+)%.([%w_]+_proj)$")
    if path and kind_at(path) == "ExpertBank" then
      for _, t in ipairs(targets) do
        for _, want in ipairs(TARGETS[t].bank or {}) do
          if want == proj then
            if not banks[path] then banks[path] = {}; bank_order[#bank_order + 1] = path end
            banks[path][proj] = true
            matched[t] = true
          end
        end
      end
    end
    local lpath = name:match("^(.+)%.weight$")
    if lpath and kind_at(lpath) == "Linear" then
      local leaf = lpath:match("([^%.]+)$")
      for _, t in ipairs(targets) do
        if TARGETS[t].linear == leaf then
          if not linears[lpath] then linears[lpath] = true; linear_order[#linear_order + 1] = lpath end
          matched[t] = true
        end
      end
    end
  end
  for _, t in ipairs(targets) do
    if not matched[t] then fail(f, "target module '%s' matches no layer of this model", t) end
  end
  local out = {}
  for _, path in ipairs(bank_order) do
    local projs = {}
    for proj in pairs(banks[path]) do projs[#projs + 1] = proj end
    table.sort(projs, function(a, b) return PROJ_ORDER[a] < PROJ_ORDER[b] end)
    out[#out + 1] = {path = path, kind = "bank", projs = projs}
  end
  for _, path in ipairs(linear_order) do out[#out + 1] = {path = path, kind = "linear"} end
  return out
end

local function reflatten(net) net:to(net:device()) end

local lora_keys = {
  base_model = true, r = true, lora_alpha = true, target_modules = true, expert_wise_adaptation = true,
  seed = true, lora_dropout = true, bias = true, task_type = true, base_model_name_or_path = true,
}

--- moe.peft.MoELoRA{base_model=, r=8, lora_alpha=16, target_modules={"expert_fc1", "expert_fc2"},
--  expert_wise_adaptation=true, seed=0, base_model_name_or_path=}
function M.MoELoRA(opts)
  local f = "MoELoRA"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  check_keys(f, opts, lora_keys)
  local base = opts.base_model
  if not is_moe_model(base) then
    fail(f, "base_model must be a moe.MoEModel, got %s", base == nil and "nil" or type(base))
  end
  local r = opts.r == nil and 8 or opts.r
  if type(r) ~= "number" or r % 1 ~= 0 or r <= 0 then fail(f, "r must be a positive integer, got %s", tostring(r)) end
  local alpha = opts.lora_alpha == nil and 16 or opts.lora_alpha
  if type(alpha) ~= "number" or not (alpha > 0) or alpha == math.huge then
    fail(f, "lora_alpha must be a positive number, got %s", tostring(alpha))
  end
  if opts.lora_dropout ~= nil and opts.lora_dropout ~= 0 then fail(f, "lora_dropout is not supported (only 0)") end
  if opts.bias ~= nil and opts.bias ~= "none" then fail(f, "bias must be \"none\" (adapters have no bias)") end
  if opts.task_type ~= nil and opts.task_type ~= "CAUSAL_LM" then fail(f, "task_type must be \"CAUSAL_LM\"") end
  local targets = opts.target_modules == nil and {"expert_fc1", "expert_fc2"} or opts.target_modules
  if type(targets) == "string" then targets = {targets} end
  if type(targets) ~= "table" or #targets == 0 then fail(f, "target_modules must be a non-empty list of module names") end
  local list, seen = {}, {}
  for i, t in ipairs(targets) do
    if type(t) ~= "string" then fail(f, "target_modules[%d] must be a string, got %s", i, type(t)) end
    if not TARGETS[t] then
      fail(f, "unknown target module '%s' (known: %s)", t, table.concat(TARGET_LIST, ", "))
    end
    if not seen[t] then seen[t] = true; list[#list + 1] = t end
  end
  local expert_wise = opts.expert_wise_adaptation ~= false
  local seed = opts.seed or 0
  if type(seed) ~= "number" or seed < 0 or seed % 1 ~= 0 then fail(f, "seed must be a non-negative integer") end
  local net = base.net
  local modules = plan(f, net, list)
  local done = {}
  local ok, err = pcall(function()
    for i, m in ipairs(modules) do
      core.lora_attach(net, m.path, {r = r, alpha = alpha, expert_wise = expert_wise, targets = m.projs,
                                     seed = seed * 7919 + i})
      done[#done + 1] = m
    end
  end)
  if not ok then
    for _, m in ipairs(done) do core.lora_remove(net, m.path) end
    reflatten(net)
    fail(f, "%s", tostring(err))
  end
  reflatten(net)
  local self = setmetatable({
    base_model = base, r = r, lora_alpha = alpha, scaling = alpha / r, target_modules = list,
    expert_wise_adaptation = expert_wise, modules = modules, seed = seed,
    base_model_name_or_path = opts.base_model_name_or_path,
  }, LoRA)
  return self
end

local function check_live(self, f)
  if self.merged then fail(f, "the adapters were merged into the base model") end
  if self.unloaded then fail(f, "the adapters were unloaded") end
end

--- The adapter parameters: {name=, value=, grad=} like model:parameters().
function LoRA:parameters()
  local out = {}
  if self.merged or self.unloaded then return out end
  for _, p in ipairs(self.base_model:parameters()) do
    if M.is_lora_param(p.name) then out[#out + 1] = p end
  end
  return out
end

function LoRA:num_params()
  local n = 0
  for _, p in ipairs(self:parameters()) do n = n + p.value:numel() end
  return n
end

--- A predicate for MoETrainer{trainable = ...}: true for adapter parameters only.
function LoRA.trainable(name) return M.is_lora_param(name) end

--- MoETrainer over the base model with only the adapters trainable.
function LoRA:trainer(opts)
  check_live(self, "MoELoRA:trainer")
  local o = {}
  for k, v in pairs(opts or {}) do o[k] = v end
  if o.model ~= nil and o.model ~= self.base_model then fail("MoELoRA:trainer", "model is the adapter's base model; do not pass another") end
  o.model = self.base_model
  o.trainable = M.is_lora_param
  return require("moelab.trainer").MoETrainer(o)
end

function LoRA:forward(ids, opts) return self.base_model:forward(ids, opts) end

--- W += (alpha / r) B A in every adapted layer (per expert), adapters removed. Returns the base model.
function LoRA:merge()
  check_live(self, "MoELoRA:merge")
  local net = self.base_model.net
  for _, m in ipairs(self.modules) do core.lora_merge(net, m.path) end
  reflatten(net)
  self.merged = true
  return self.base_model
end

--- Removes the adapters without folding them in. Returns the base model.
function LoRA:unload()
  check_live(self, "MoELoRA:unload")
  local net = self.base_model.net
  for _, m in ipairs(self.modules) do core.lora_remove(net, m.path) end
  reflatten(net)
  self.unloaded = true
  return self.base_model
end

function LoRA:__tostring()
  return string.format("MoELoRA(r=%d, alpha=%g, %s, %d modules, %d parameters%s)", self.r, self.lora_alpha,
    self.expert_wise_adaptation and "per expert" or "shared across experts", #self.modules, self:num_params(),
    self.merged and ", merged" or "")
end

---------------------------------------------------------------------------
-- PEFT layout

local function naming(self, opts, f)
  local mt = opts and opts.model_type or (self.base_model.hf and self.base_model.hf.model_type) or "olmoe"
  if mt ~= "olmoe" and mt ~= "mixtral" and mt ~= "qwen2_moe" then
    fail(f, "model_type must be olmoe, mixtral or qwen2_moe (it picks the module names), got %s", tostring(mt))
  end
  return mt
end

-- {peft_name, moelab_param_name, expert index (0-based, banks), "A"|"B"} for every adapter tensor
local function tensor_map(self, mt)
  local hf = require "moelab.hf"
  local E = self.base_model.config.num_experts
  local list = {}
  for _, m in ipairs(self.modules) do
    if m.kind == "bank" then
      for _, proj in ipairs(m.projs) do
        for e = 0, E - 1 do
          local module = hf.hf_name(mt, m.path .. "." .. proj, e):gsub("%.weight$", "")
          for _, ab in ipairs{"A", "B"} do
            list[#list + 1] = {"base_model.model." .. module .. ".lora_" .. ab .. ".weight",
                               m.path .. "." .. proj .. "_lora_" .. ab, e, ab}
          end
        end
      end
    else
      local module = hf.hf_name(mt, m.path .. ".weight"):gsub("%.weight$", "")
      for _, ab in ipairs{"A", "B"} do
        list[#list + 1] = {"base_model.model." .. module .. ".lora_" .. ab .. ".weight", m.path .. ".lora_" .. ab, nil, ab}
      end
    end
  end
  return list
end

local function hf_targets(self, mt)
  local set = {}
  for _, m in ipairs(self.modules) do
    if m.kind == "bank" then
      for _, proj in ipairs(m.projs) do set[mt == "mixtral" and MIXTRAL_PART[proj] or proj] = true end
    else
      set[m.path:match("([^%.]+)$")] = true
    end
  end
  local out = {}
  for k in pairs(set) do out[#out + 1] = k end
  table.sort(out)
  return out
end

local function param_table(self)
  local by = {}
  for _, p in ipairs(self.base_model:parameters()) do by[p.name] = p.value end
  return by
end

--- save_pretrained(dir[, {model_type=}]): adapter_config.json + adapter_model.safetensors
-- under PEFT's names (experts unstacked: ...mlp.experts.E.gate_proj.lora_A.weight [r, in],
-- ...lora_B.weight [out, r]; shared adapters are written once per expert).
function LoRA:save_pretrained(dir, opts)
  local f = "MoELoRA:save_pretrained"
  check_live(self, f)
  if type(dir) ~= "string" then fail(f, "dir must be a path string, got %s", type(dir)) end
  local mt = naming(self, opts, f)
  local params = param_table(self)
  local tensors = {}
  for _, t in ipairs(tensor_map(self, mt)) do
    local v = params[t[2]]
    if v:device() ~= "cpu" then v = v:to("cpu") end
    if t[3] then v = v:select(1, (self.expert_wise_adaptation and t[3] or 0) + 1) end
    tensors[#tensors + 1] = {t[1], v:contiguous()}
  end
  table.sort(tensors, function(a, b) return a[1] < b[1] end)
  local base_hf = self.base_model.hf
  local cfg = {
    peft_type = "LORA", task_type = "CAUSAL_LM", r = self.r, lora_alpha = self.lora_alpha, lora_dropout = 0.0,
    bias = "none", fan_in_fan_out = false, inference_mode = true, init_lora_weights = true,
    use_rslora = false, use_dora = false, target_modules = hf_targets(self, mt),
    base_model_name_or_path = self.base_model_name_or_path or (base_hf and base_hf.name_or_path) or nil,
    moelab = {
      note = "per-expert LoRA: every routed expert has its own lora_A/lora_B pair" ..
        (self.expert_wise_adaptation and "" or " (here one pair shared by all experts, written once per expert)"),
      expert_wise_adaptation = self.expert_wise_adaptation,
      target_modules = self.target_modules,
      model_type = mt,
      num_experts = self.base_model.config.num_experts,
      version = core.version,
    },
  }
  mio.mkdir_p(dir)
  mio.safetensors.save(dir .. "/adapter_model.safetensors", tensors, {format = "pt"})
  mio.write_file_atomic(dir .. "/adapter_config.json", mio.json.encode(cfg, {indent = true}) .. "\n")
  return dir
end

local function read_adapter_config(f, dir)
  if type(dir) ~= "string" then fail(f, "dir must be a path string, got %s", type(dir)) end
  local ok, text = pcall(mio.read_file, dir .. "/adapter_config.json")
  if not ok then fail(f, "cannot read %s/adapter_config.json", dir) end
  local ok2, cfg = pcall(mio.json.decode, text)
  if not ok2 or type(cfg) ~= "table" then fail(f, "%s/adapter_config.json is not a JSON object", dir) end
  if cfg.peft_type ~= "LORA" then fail(f, "%s holds a '%s' adapter, not LORA", dir, tostring(cfg.peft_type)) end
  return cfg
end

--- load(dir): reads adapter weights saved by save_pretrained (or PEFT) into these adapters.
function LoRA:load(dir, opts)
  local f = "MoELoRA:load"
  check_live(self, f)
  local cfg = read_adapter_config(f, dir)
  if cfg.r ~= self.r then fail(f, "%s has r = %s, these adapters have r = %d", dir, tostring(cfg.r), self.r) end
  local mt = opts and opts.model_type or (type(cfg.moelab) == "table" and cfg.moelab.model_type) or naming(self, nil, f)
  local ok, tensors = pcall(mio.safetensors.load, dir .. "/adapter_model.safetensors", {dtype = "f32"})
  if not ok then fail(f, "%s", tostring(tensors)) end
  local params = param_table(self)
  local used, missing = {}, {}
  for _, t in ipairs(tensor_map(self, mt)) do
    local src = tensors[t[1]]
    if not src then
      missing[#missing + 1] = t[1]
    else
      used[t[1]] = true
      local dst = params[t[2]]
      if t[3] then
        if not self.expert_wise_adaptation and t[3] > 0 then goto continue end   -- shared: expert 0's copy
        dst = dst:select(1, (self.expert_wise_adaptation and t[3] or 0) + 1)
      end
      local a, b = dst:shape(), src:shape()
      if #a ~= #b or a[1] ~= b[1] or a[2] ~= b[2] then
        fail(f, "tensor %s has shape [%s], expected [%s]", t[1], table.concat(b, ", "), table.concat(a, ", "))
      end
      dst:copy(src)
    end
    ::continue::
  end
  if #missing > 0 then
    fail(f, "%s lacks tensor%s %s%s", dir, #missing > 1 and "s" or "", missing[1],
      #missing > 1 and string.format(" (and %d more)", #missing - 1) or "")
  end
  local extra = {}
  for name in pairs(tensors) do if not used[name] then extra[#extra + 1] = name end end
  if #extra > 0 then
    table.sort(extra)
    fail(f, "%s has tensor%s these adapters do not use: %s%s", dir, #extra > 1 and "s" or "", extra[1],
      #extra > 1 and string.format(" (and %d more)", #extra - 1) or "")
  end
  return self
end

--- moe.peft.from_pretrained(base_model, dir): adapters as adapter_config.json describes, weights loaded.
function M.from_pretrained(base_model, dir)
  local f = "peft.from_pretrained"
  local cfg = read_adapter_config(f, dir)
  local note = type(cfg.moelab) == "table" and cfg.moelab or {}
  local targets = note.target_modules or cfg.target_modules
  if type(targets) == "string" then fail(f, "target_modules given as a pattern (%s) are not supported", targets) end
  local lora = M.MoELoRA{base_model = base_model, r = cfg.r, lora_alpha = cfg.lora_alpha, target_modules = targets,
                         expert_wise_adaptation = note.expert_wise_adaptation ~= false,
                         base_model_name_or_path = cfg.base_model_name_or_path}
  local ok, err = pcall(lora.load, lora, dir)
  if not ok then lora:unload(); error(err, 0) end
  return lora
end

M.LoRA = LoRA
return M
