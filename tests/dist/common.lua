-- Comparison helpers shared by the multi-rank checks (tests/dist/*_check.lua):
--   local close, close_t, close_n = dofile("tests/dist/common.lua")(rank)
-- close: two numbers; close_t: two tensors element by element; close_n: two
-- tensors as vectors, |a - b| / |b| (2-norms), for results where a few
-- elements amplify rounding (AdamW's m / sqrt(v) of near-zero gradients).
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
  local function close_n(a, b, tol, what)
    local x, y = a:view(-1):to_table(), b:view(-1):to_table()
    assert(#x == #y, what .. ": sizes differ")
    local dd, bb, worst, wi = 0, 0, 0, 0
    for i = 1, #x do
      local e = x[i] - y[i]
      dd, bb = dd + e * e, bb + y[i] * y[i]
      if math.abs(e) > worst then worst, wi = math.abs(e), i end
    end
    local err = math.sqrt(dd) / math.max(math.sqrt(bb), 1e-30)
    if err > tol then
      error(string.format("rank %d: %s: relative difference %.3g (2-norm); largest at [%d]: %.9g vs %.9g", rank, what,
                          err, wi, x[wi], y[wi]), 2)
    end
    return err
  end
  return close, close_t, close_n
end
