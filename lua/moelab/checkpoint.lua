--- Checkpoints in one layout: safetensors for tensors, JSON for the rest.
--   <dir>/config.json          the model's configuration (moe.load rebuilds from it)
--   <dir>/model.safetensors    parameters and buffers by name
--   <dir>/optimizer.safetensors  AdamW state m, v (training checkpoints)
--   <dir>/trainer_state.json   step, data position, noise streams, history (written last)
-- Every file is written to a temporary name and renamed, so an interrupted
-- save never leaves a truncated file where a good one was.
local core = require "moelab.core"
local mio = require "moelab.io"

local M = {}

local function model_tensors(model)
  local list = {}
  for _, p in ipairs(model:parameters()) do list[#list + 1] = {p.name, p.value} end
  for _, b in ipairs(model:buffers()) do list[#list + 1] = {b.name, b.value} end
  return list
end

-- A model whose experts are sharded over expert-parallel ranks holds only
-- part of them: saving it as a model would write a file no model loads.
local function check_whole(model, where)   -- error level 3: the caller of the function that calls it
  local sh = model.net:expert_shard()
  if sh then
    error(string.format("%s: this model holds only experts [%d, %d) of %d (sharded under expert parallelism); "
      .. "save through the DistributedMoETrainer (trainer:save_model / save_checkpoint on every rank) or call "
      .. "trainer:gather_experts() first", where, sh.first, sh.first + sh.count, sh.total), 3)
  end
end

M.check_whole = check_whole

--- save_model(model, dir[, tensors]): tensors ({name, tensor} pairs, the
-- single-process layout) replaces the model's own (dist_shard.lua gathers
-- sharded experts into it).
function M.save_model(model, dir, tensors)
  if type(dir) ~= "string" then error("save_model: dir must be a path string, got " .. type(dir), 2) end
  if not tensors then check_whole(model, "save_model") end
  mio.mkdir_p(dir)
  local cfg = {}
  for k, v in pairs(model.config) do cfg[k] = v end
  cfg.model_type = "moelab"
  cfg.moelab_version = core.version
  mio.safetensors.save(dir .. "/model.safetensors", tensors or model_tensors(model), {format = "pt", producer = "moelab"})
  mio.write_file_atomic(dir .. "/config.json", mio.json.encode(cfg, {indent = true}) .. "\n")
  return dir
end

--- Copies tensors by name into the model; every parameter must be present with its shape.
function M.load_into(model, tensors, where)
  local missing = {}
  local function put(name, dst)
    local src = tensors[name]
    if not src then missing[#missing + 1] = name; return end
    local a, b = dst:shape(), src:shape()
    if #a ~= #b then error(string.format("%s: tensor %s has %d dims, the model expects %d", where, name, #b, #a), 3) end
    for i = 1, #a do
      if a[i] ~= b[i] then
        local sh = model.net:expert_shard()
        error(string.format("%s: tensor %s has shape [%s], the model expects [%s]%s", where, name,
          table.concat(b, ", "), table.concat(a, ", "), sh and string.format(
            " (the model holds only experts [%d, %d) of %d, sharded under expert parallelism: resume through "
            .. "the DistributedMoETrainer, which slices them)", sh.first, sh.first + sh.count, sh.total) or ""), 3)
      end
    end
    dst:copy(src)
  end
  for _, p in ipairs(model:parameters()) do put(p.name, p.value) end
  for _, bf in ipairs(model:buffers()) do put(bf.name, bf.value) end
  if #missing > 0 then
    error(string.format("%s: missing tensor%s %s", where, #missing > 1 and "s" or "", table.concat(missing, ", ")), 3)
  end
  model.net:refresh_compute()   -- bf16 precision: the compute copy follows the loaded values
end

--- moe.load(dir): rebuild a model from config.json and model.safetensors.
function M.load(dir)
  if type(dir) ~= "string" then error("load: dir must be a path string, got " .. type(dir), 2) end
  local text = mio.read_file(dir .. "/config.json")
  local cfg = mio.json.decode(text)
  if type(cfg) ~= "table" then error("load: " .. dir .. "/config.json is not a JSON object", 2) end
  if cfg.model_type and cfg.model_type ~= "moelab" then
    error("load: " .. dir .. " holds a '" .. tostring(cfg.model_type) ..
      "' checkpoint; use moe.from_pretrained for Hugging Face models", 2)
  end
  cfg.model_type, cfg.moelab_version = nil, nil
  local model = require("moelab.model").MoEModel(cfg)
  local tensors = mio.safetensors.load(dir .. "/model.safetensors")
  M.load_into(model, tensors, "load")
  return model
end

-- A copy of v without NaN and infinities, which have no JSON form: a step
-- skipped for a non-finite loss or gradient norm keeps its record, as in
-- metrics.jsonl, without those numbers (null inside lists, so positions hold).
local function finite_only(v)
  if type(v) == "number" then
    if v ~= v or v == math.huge or v == -math.huge then return nil end
    return v
  end
  if type(v) ~= "table" then return v end
  local out = {}
  for k, x in pairs(v) do
    local y = finite_only(x)
    if y == nil and type(k) == "number" then y = mio.json.null end
    out[k] = y
  end
  return out
end

--- save_training(trainer, dir[, full]): full = {tensors =, exp_avg =, exp_avg_sq =}
-- in the single-process layout replaces the model's tensors and the optimizer
-- state (dist_shard.lua gathers sharded experts into it).
function M.save_training(trainer, dir, full)
  -- the state first: an optimizer that cannot give it (ZeRO's shards, not
  -- gathered) fails before the directory's model is overwritten
  local m, v
  if full then m, v = full.exp_avg, full.exp_avg_sq else m, v = trainer.optimizer:state() end
  M.save_model(trainer.model, dir, full and full.tensors)
  mio.safetensors.save(dir .. "/optimizer.safetensors", {{"exp_avg", m}, {"exp_avg_sq", v}}, {})
  local noise = {}
  for i, l in ipairs(trainer.model:moe_layers()) do noise[i] = l:noise_step() end
  local state = {
    step = trainer.step,
    optimizer_step = trainer.optimizer:step_count(),
    base_lr = trainer.base_lr,
    noise_steps = noise,
    train_options = trainer.train_options,
    history = finite_only(trainer.history),
  }
  -- written last: its presence marks a complete checkpoint
  mio.write_file_atomic(dir .. "/trainer_state.json", mio.json.encode(state) .. "\n")
  return dir
end

--- load_training(trainer, dir[, adapt]): adapt maps the single-process layout
-- onto a trainer whose model holds another (dist_shard.lua, sharded experts):
-- adapt.tensors(tensors, where) -> the tensors load_into takes, and
-- adapt.state(exp_avg, exp_avg_sq, m, v, where) fills the optimizer state.
function M.load_training(trainer, dir, adapt)
  local where = "resume from " .. dir
  local ok, text = pcall(mio.read_file, dir .. "/trainer_state.json")
  if not ok then error(where .. ": no complete checkpoint (trainer_state.json is missing)", 3) end
  local state = mio.json.decode(text)
  local tensors = mio.safetensors.load(dir .. "/model.safetensors")
  if adapt then tensors = adapt.tensors(tensors, where) end
  M.load_into(trainer.model, tensors, where)
  local opt = mio.safetensors.load(dir .. "/optimizer.safetensors")
  local m, v = trainer.optimizer:state()
  if not opt.exp_avg or not opt.exp_avg_sq or (not adapt and opt.exp_avg:numel() ~= m:numel()) then
    error(where .. ": optimizer state does not match the model", 3)
  end
  if adapt then
    adapt.state(opt.exp_avg, opt.exp_avg_sq, m, v, where)
  else
    m:copy(opt.exp_avg)
    v:copy(opt.exp_avg_sq)
  end
  trainer.optimizer:step_count(state.optimizer_step or state.step)
  for i, l in ipairs(trainer.model:moe_layers()) do
    if state.noise_steps and state.noise_steps[i] then l:set_noise_step(state.noise_steps[i]) end
  end
  trainer.step = state.step
  trainer.history = state.history or {}
end

return M
