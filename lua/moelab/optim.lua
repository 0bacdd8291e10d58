--- Optimisers over a layer's flat parameter buffer: one fused kernel call per
-- step, whatever the number of parameter tensors.
local core = require "moelab.core"

local optim = {}

local function check_number(fname, name, v, lo)
  if type(v) ~= "number" then
    error(string.format("%s: %s must be a number, got %s", fname, name, type(v)), 3)
  end
  if lo and v < lo then
    error(string.format("%s: %s must be >= %g, got %g", fname, name, lo, v), 3)
  end
  return v
end

local AdamW = {}
AdamW.__index = AdamW

--- moe.optim.AdamW{params = layer, lr = 1e-3, betas = {0.9, 0.999}, eps = 1e-8, weight_decay = 0.01}
function optim.AdamW(opts)
  local f = "optim.AdamW"
  if type(opts) ~= "table" then error(f .. ": expected a table of options, got " .. type(opts), 2) end
  local layer = opts.params
  if type(layer) ~= "userdata" or not pcall(function() return layer:kind() end) then
    error(f .. ": params must be a layer (its flat parameter buffer is optimised), got " .. type(layer), 2)
  end
  local betas = opts.betas or {0.9, 0.999}
  if type(betas) ~= "table" then error(f .. ": betas must be a table {beta1, beta2}", 2) end
  local self = setmetatable({
    layer = layer,
    lr = check_number(f, "lr", opts.lr or 1e-3, 0),
    beta1 = check_number(f, "betas[1]", betas[1], 0),
    beta2 = check_number(f, "betas[2]", betas[2], 0),
    eps = check_number(f, "eps", opts.eps or 1e-8, 0),
    weight_decay = check_number(f, "weight_decay", opts.weight_decay or 0.01, 0),
    step_count = 0,
  }, AdamW)
  if self.beta1 >= 1 or self.beta2 >= 1 then error(f .. ": betas must be < 1", 2) end
  local values = layer:flat_parameters()
  self.m = core.zeros(values:shape(), {device = values:device()})
  self.v = core.zeros(values:shape(), {device = values:device()})
  return self
end

--- One update from the gradients accumulated in the layer.
function AdamW:step()
  local values, grads = self.layer:flat_parameters()
  if values:numel() ~= self.m:numel() then
    error("AdamW:step: the layer's parameters changed size since the optimiser was made", 2)
  end
  self.step_count = self.step_count + 1
  core.ops.adamw(values, grads, self.m, self.v, {
    lr = self.lr, beta1 = self.beta1, beta2 = self.beta2, eps = self.eps,
    weight_decay = self.weight_decay, step = self.step_count,
  })
end

function AdamW:zero_grad() self.layer:zero_grad() end

return optim
