--- moe.repr(v): how the REPL shows a value. Tensors, layers and models use
-- their own tostring; plain tables print as Lua constructors (sorted keys,
-- nested up to a depth, long ones cut with "..."), so `=x:shape()` shows
-- {2, 3} rather than a table address.
local MAX_ITEMS, MAX_DEPTH = 24, 3

local function is_identifier(k)
  return type(k) == "string" and k:match("^[%a_][%w_]*$") ~= nil
end

local function key_order(a, b)
  local ta, tb = type(a), type(b)
  if ta ~= tb then return ta < tb end
  if ta == "number" or ta == "string" then return a < b end
  return tostring(a) < tostring(b)
end

local repr

local function table_repr(t, depth, seen)
  if seen[t] then return "<cycle>" end
  local mt = getmetatable(t)
  if mt and mt.__tostring then return tostring(t) end
  if depth >= MAX_DEPTH then return "{...}" end
  seen[t] = true
  local parts, n = {}, #t
  for i = 1, math.min(n, MAX_ITEMS) do parts[#parts + 1] = repr(t[i], depth + 1, seen) end
  local keys = {}
  for k in pairs(t) do
    if not (type(k) == "number" and k >= 1 and k <= n and k % 1 == 0) then keys[#keys + 1] = k end
  end
  table.sort(keys, key_order)
  for _, k in ipairs(keys) do
    if #parts >= MAX_ITEMS then break end
    local ks = is_identifier(k) and k or ("[" .. repr(k, depth + 1, seen) .. "]")
    parts[#parts + 1] = ks .. " = " .. repr(t[k], depth + 1, seen)
  end
  seen[t] = nil
  local more = (n + #keys) > #parts and ", ..." or ""
  return "{" .. table.concat(parts, ", ") .. more .. "}"
end

repr = function(v, depth, seen)
  depth, seen = depth or 0, seen or {}
  local tv = type(v)
  if tv == "string" then return depth == 0 and v or string.format("%q", v) end
  if tv == "table" then return table_repr(v, depth, seen) end
  if tv == "number" and v == math.floor(v) and math.abs(v) < 2^53 then return string.format("%d", v) end
  return tostring(v)
end

return function(v) return repr(v) end
