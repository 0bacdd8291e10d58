--- moelab: Mixture-of-Experts training and analysis lab.
-- `local moe = require "moelab"` (preloaded as the global `moe` in the moelab
-- program). This module is a thin Lua face over the C core (moelab.core):
-- tensors, layers, the tape, optimisers. Named arguments come in tables,
-- names are snake_case, and every bad argument raises an error naming it.
local core = require "moelab.core"

local moe = {
  core = core,
  version = core.version,
  built_with_cuda = core.built_with_cuda,
}

require("moelab.tensor").install(core)

-- tensors
for _, name in ipairs{"tensor", "zeros", "ones", "full", "empty", "randn", "rand", "arange",
                      "is_tensor", "matmul"} do
  moe[name] = core[name]
end
moe.ops = core.ops

-- layers and autograd
moe.nn = core.nn
moe.Tape = core.Tape

--- Devices.
function moe.cuda_available() return core.cuda_available() end
function moe.cuda_device_count() return core.cuda_device_count() end
--- Wall-clock seconds (monotonic), for timing.
moe.clock = core.clock
function moe.num_threads() return core.num_threads() end
function moe.synchronize(device) return core.synchronize(device) end
--- The device recipes should use by default: $MOELAB_DEVICE (set by
-- `moelab --device`), else "cuda" when a GPU is usable, else "cpu".
function moe.default_device()
  local env = os.getenv("MOELAB_DEVICE")
  if env and env ~= "" then return env end
  return core.cuda_available() and "cuda" or "cpu"
end

moe.optim = require "moelab.optim"

return moe
