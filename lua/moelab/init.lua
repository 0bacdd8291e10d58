--- moelab: Mixture-of-Experts training and analysis lab.
-- `local moe = require "moelab"` (preloaded as the global `moe` in the moelab
-- program). This module is a thin Lua face over the C core (moelab.core):
-- tensors, layers, the tape, MoE models, the trainer and data.
local core = require "moelab.core"

local moe = {
  core = core,
  version = core.version,
  built_with_cuda = core.built_with_cuda,
}

require("moelab.tensor").install(core)

-- tensors
for _, name in ipairs{"tensor", "zeros", "ones", "full", "empty", "randn", "rand", "arange",
                      "is_tensor", "matmul", "manual_seed"} do
  moe[name] = core[name]
end
moe.ops = core.ops

-- layers and autograd
moe.nn = core.nn
moe.Tape = core.Tape

--- Devices.
function moe.cuda_available() return core.cuda_available() end
function moe.cuda_device_count() return core.cuda_device_count() end
function moe.num_threads() return core.num_threads() end
function moe.synchronize(device) return core.synchronize(device) end
--- Wall-clock seconds (monotonic), for timing.
moe.clock = core.clock
--- How the REPL prints a value (tables as constructors).
moe.repr = require "moelab.repr"
--- The device recipes should use by default: $MOELAB_DEVICE (set by
-- `moelab --device`), else "cuda" when a GPU is usable, else "cpu".
function moe.default_device()
  local env = os.getenv("MOELAB_DEVICE")
  if env and env ~= "" then return env end
  return core.cuda_available() and "cuda" or "cpu"
end

moe.optim = require "moelab.optim"
moe.io = require "moelab.io"
moe.data = require "moelab.data"
moe.routing = require "moelab.routing"
moe.experts = require "moelab.experts"
moe.arch = require "moelab.arch"
local model = require "moelab.model"
moe.MoEModel = model.MoEModel
local trainer = require "moelab.trainer"
moe.MoETrainer = trainer.MoETrainer
moe.load = require("moelab.checkpoint").load
moe.tokenizer = require "moelab.tokenizer"
local hf = require "moelab.hf"
moe.hf = hf
moe.from_pretrained = hf.from_pretrained
moe.save_pretrained = hf.save_pretrained
moe.models = hf.models
local finetune = require "moelab.finetune"
moe.finetune = finetune
moe.FineTuner = finetune.FineTuner
moe.upcycle = require("moelab.upcycle").upcycle
local analytics = require "moelab.analytics"
moe.analytics = analytics
moe.RouterMonitor = analytics.RouterMonitor
moe.RouterAnalyzer = analytics.RouterAnalyzer
moe.MoECostAnalyzer = require("moelab.cost").MoECostAnalyzer
moe.report = require "moelab.report"
moe.distributed = require "moelab.distributed"
moe.dist = moe.distributed.dist
moe.peft = require "moelab.peft"
moe.finetuning = moe.finetuning or {}
moe.finetuning.TaskAdaptiveMoE = require("moelab.task_adaptive").TaskAdaptiveMoE

return moe
