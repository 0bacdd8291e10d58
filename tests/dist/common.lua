-- Comparison helpers shared by the multi-rank checks (tests/dist/*_check.lua):
--   local close, close_t = dofile("tests/dist/common.lua")(rank)
return function(rank)
  -- relative comparison, with an absolute floor for values near zero
  local function close(a, b, tol, what)
    local err = math.abs(a - b) / math.max(math.abs(a), math.abs(b), 1e-30)
    if err > tol and math.abs(a - b) > 1e-7 then
      error(string.format("rank %d: %s: %.9g vs %.9g (relative %.3g)", rank, what, a, b, err), 2)
    end
  end
  local function close_t(a, b, tol, what)
    local x, y = a:view(-1):to_table(), b:view(-1):to_table()
    assert(#x == #y, what .. ": sizes differ")
    for i = 1, #x do close(x[i], y[i], tol, what .. "[" .. i .. "]") end
  end
  return close, close_t
end
