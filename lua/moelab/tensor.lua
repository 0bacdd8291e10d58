-- Lua-side additions to the Tensor type of moelab.core: printing.
--
--   tensor([[ 0.1234, -1.5000,  2.0000],
--           [ 3.0000,  4.0000,  5.0000]], dtype=f32)
--
-- Floats print with `precision` decimals (scientific notation when the shown
-- values are very large or very small), integer dtypes without decimals. A
-- tensor with more than `threshold` elements is summarised: every dim longer
-- than 2 * edgeitems shows its first and last `edgeitems` entries around "...".
-- A 0-dim tensor prints as tensor(3.5000) (its dtype only when not f32).
-- Non-cpu tensors are copied to the cpu to print and add ", device=cuda:0".
local M = {}

M.print_options = {threshold = 100, edgeitems = 3, precision = 4}

local INT_DTYPES = {i32 = true, i64 = true, u8 = true, i8 = true}

local function shown_indices(size, summarise, edge)
  if summarise and size > 2 * edge then
    local idx = {}
    for i = 1, edge do idx[#idx + 1] = i end
    idx[#idx + 1] = false                       -- the "..." marker
    for i = size - edge + 1, size do idx[#idx + 1] = i end
    return idx
  end
  local idx = {}
  for i = 1, size do idx[i] = i end
  return idx
end

-- number formatter for the values that will be shown
local function make_formatter(values, is_int, precision)
  if is_int then
    return function(v) return string.format("%.0f", v) end
  end
  local maxabs, minabs = 0, math.huge
  for _, v in ipairs(values) do
    if v == v and v ~= math.huge and v ~= -math.huge then
      local a = math.abs(v)
      if a > maxabs then maxabs = a end
      if a > 0 and a < minabs then minabs = a end
    end
  end
  local sci = maxabs >= 1e8 or (minabs < 10 ^ -precision and minabs ~= math.huge)
  local fmt = sci and ("%." .. precision .. "e") or ("%." .. precision .. "f")
  return function(v)
    if v ~= v then return "nan" end
    if v == math.huge then return "inf" end
    if v == -math.huge then return "-inf" end
    return string.format(fmt, v)
  end
end

local function format_tensor(t)
  local opts = M.print_options
  local dtype, device = t:dtype(), t:device()
  if device ~= "cpu" then t = t:to("cpu") end
  local suffix = ""
  local shape, ndim = t:shape(), t:dim()
  if ndim == 0 or t:numel() > 0 then
    if ndim > 0 or dtype ~= "f32" then suffix = ", dtype=" .. dtype end
  else
    suffix = ", size=[" .. table.concat(shape, ", ") .. "], dtype=" .. dtype
  end
  if device ~= "cpu" then suffix = suffix .. ", device=" .. device end
  local is_int = INT_DTYPES[dtype]

  if ndim == 0 then
    local v = t:item()
    return "tensor(" .. make_formatter({v}, is_int, opts.precision)(v) .. suffix .. ")"
  end
  if t:numel() == 0 then return "tensor([]" .. suffix .. ")" end

  local summarise = t:numel() > opts.threshold
  local shown = {}
  for d = 1, ndim do shown[d] = shown_indices(shape[d], summarise, opts.edgeitems) end

  -- collect the shown values in print order
  local values, idx = {}, {}
  local function collect(d)
    for _, i in ipairs(shown[d]) do
      if i then
        idx[d] = i
        if d == ndim then values[#values + 1] = t:get(unpack(idx, 1, ndim))
        else collect(d + 1) end
      end
    end
  end
  collect(1)

  local fmt = make_formatter(values, is_int, opts.precision)
  local width = 0
  local strs = {}
  for k, v in ipairs(values) do
    strs[k] = fmt(v)
    if #strs[k] > width then width = #strs[k] end
  end
  local pos = 0
  local function next_str()
    pos = pos + 1
    local s = strs[pos]
    return string.rep(" ", width - #s) .. s
  end

  local prefix = "tensor("
  local function render(d)
    local parts = {}
    for _, i in ipairs(shown[d]) do
      if not i then parts[#parts + 1] = "..."
      elseif d == ndim then parts[#parts + 1] = next_str()
      else parts[#parts + 1] = render(d + 1) end
    end
    if d == ndim then return "[" .. table.concat(parts, ", ") .. "]" end
    local indent = string.rep(" ", #prefix + d)
    return "[" .. table.concat(parts, "," .. string.rep("\n", ndim - d) .. indent) .. "]"
  end
  return prefix .. render(1) .. suffix .. ")"
end

M.format = format_tensor

function M.install(core)
  local mt = debug.getregistry()["moelab.Tensor"]
  assert(mt, "moelab.tensor: the Tensor metatable is missing (load moelab.core first)")
  mt.__tostring = function(t)
    if t:is_freed() then return "tensor(<freed>)" end
    return format_tensor(t)
  end
  core.print_options = M.print_options
end

return M
