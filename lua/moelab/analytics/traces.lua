--- Routing traces: which experts every token asked for, in decode order, as
-- a file that expert-cache and offloading simulators replay.
--
-- Records are ordered by sequence, then position, then MoE layer: the order
-- in which a token-by-token decoder would request experts. All numbers in
-- the file are 0-based: sequence (the dataset window number), position
-- (within the sequence), token (the input token id at that position), layer
-- (the index among the model's MoE layers, 0..L-1; meta.moe_layers maps it
-- to the transformer block index), experts (the experts the token was sent
-- to, largest weight first; dropped assignments are absent) and weights
-- (their combine weights, same order; omitted when written without weights).
--
-- JSONL (default; one JSON object per line):
--   line 1, the meta record:
--     {"moelab_trace":1,"num_experts":8,"experts_per_token":2,"num_layers":4,
--      "moe_layers":[0,1,2,3],"seq_len":128,"vocab_size":256,"num_sequences":16,"first_window":0}
--   then one record per line:
--     {"seq":0,"pos":5,"token":104,"layer":1,"experts":[3,6],"weights":[0.612,0.388]}
-- TSV (compact; a path ending in .tsv, or format = "tsv"):
--   line 1: "# moelab_trace 1 " followed by the meta record as JSON
--   line 2: the header "seq<TAB>pos<TAB>token<TAB>layer<TAB>experts<TAB>weights"
--   then one record per line, experts and weights comma-separated:
--     0<TAB>5<TAB>104<TAB>1<TAB>3,6<TAB>0.612,0.388
-- Weights are written with 6 significant digits.
--
-- read(path) returns {meta = {...}, records = {{seq=, pos=, token=, layer=,
-- experts = {...}, weights = {...}}, ...}} with the file's 0-based numbers.
local json = require("moelab.io").json

local T = {}

--- Transformer block index of each MoE layer (0-based), from a model config:
-- MoE every moe_layer_frequency blocks after first_dense_layers (the C
-- model's rule). Without a config: 0..n-1.
function T.moe_layer_indices(cfg, n)
  local out = {}
  if not cfg or not cfg.num_layers then
    for i = 1, n do out[i] = i - 1 end
    return out
  end
  local freq, first = cfg.moe_layer_frequency or 1, cfg.first_dense_layers or 0
  local dense = {}
  for _, i in ipairs(cfg.mlp_only_layers or {}) do dense[i] = true end
  for i = 0, cfg.num_layers - 1 do
    if freq > 0 and i >= first and (freq == 1 or i % freq == freq - 1) and not dense[i] then out[#out + 1] = i end
  end
  return out
end

local function list(t, fmt)
  local parts = {}
  for i, v in ipairs(t) do parts[i] = string.format(fmt, v) end
  return parts
end

--- A streaming writer: w:write(seq, pos, token, layer, experts, weights),
-- w:close() -> records written (renames path.tmp to path), w:abort().
function T.writer(path, format, meta, with_weights)
  local tmp = path .. ".tmp"
  local fh, err = io.open(tmp, "w")
  if not fh then error("write_traces: cannot open " .. tmp .. ": " .. tostring(err), 3) end
  local m = {moelab_trace = 1}
  for k, v in pairs(meta) do m[k] = v end
  m.weights = with_weights
  if format == "tsv" then
    fh:write("# moelab_trace 1 ", json.encode(m), "\n")
    fh:write(with_weights and "seq\tpos\ttoken\tlayer\texperts\tweights\n" or "seq\tpos\ttoken\tlayer\texperts\n")
  else
    fh:write(json.encode(m), "\n")
  end
  local n = 0
  local w = {}
  function w.write(_, seq, pos, token, layer, experts, weights)
    local e = table.concat(list(experts, "%d"), ",")
    if format == "tsv" then
      if with_weights then
        fh:write(string.format("%d\t%d\t%d\t%d\t%s\t%s\n", seq, pos, token, layer, e,
          table.concat(list(weights, "%.6g"), ",")))
      else
        fh:write(string.format("%d\t%d\t%d\t%d\t%s\n", seq, pos, token, layer, e))
      end
    else
      if with_weights then
        fh:write(string.format('{"seq":%d,"pos":%d,"token":%d,"layer":%d,"experts":[%s],"weights":[%s]}\n',
          seq, pos, token, layer, e, table.concat(list(weights, "%.6g"), ",")))
      else
        fh:write(string.format('{"seq":%d,"pos":%d,"token":%d,"layer":%d,"experts":[%s]}\n', seq, pos, token, layer, e))
      end
    end
    n = n + 1
  end
  function w.close()
    fh:close()
    local ok, rerr = os.rename(tmp, path)
    if not ok then error("write_traces: cannot rename " .. tmp .. " to " .. path .. ": " .. tostring(rerr), 3) end
    return n
  end
  function w.abort()
    fh:close()
    os.remove(tmp)
  end
  return w
end

local function numbers(s, fname, lineno)
  local out = {}
  if s == nil or s == "" then return out end
  for item in s:gmatch("[^,]+") do
    local v = tonumber(item)
    if not v then error(string.format("%s: line %d: %q is not a number", fname, lineno, item), 4) end
    out[#out + 1] = v
  end
  return out
end

--- read(path) -> {meta=, records=}; errors name fname and the bad line.
function T.read(path, fname)
  if type(path) ~= "string" then error(string.format("%s: path must be a string, got %s", fname, type(path)), 3) end
  local fh, err = io.open(path, "r")
  if not fh then error(string.format("%s: cannot open %s: %s", fname, path, tostring(err)), 3) end
  local first = fh:read("*l")
  if not first then fh:close(); error(string.format("%s: %s is empty", fname, path), 3) end
  local out = {records = {}}
  local recs = out.records
  local lineno = 1
  if first:sub(1, 16) == "# moelab_trace 1" then
    local ok, meta = pcall(json.decode, first:sub(18))
    if not ok or type(meta) ~= "table" then fh:close(); error(string.format("%s: %s: bad meta line", fname, path), 3) end
    out.meta = meta
    fh:read("*l")   -- the column header
    lineno = 2
    for line in fh:lines() do
      lineno = lineno + 1
      if line ~= "" then
        local seq, pos, token, layer, e, w = line:match("^(%d+)\t(%d+)\t(%d+)\t(%d+)\t([^\t]*)\t?([^\t]*)$")
        if not seq then fh:close(); error(string.format("%s: %s line %d is not a trace record", fname, path, lineno), 3) end
        recs[#recs + 1] = {seq = tonumber(seq), pos = tonumber(pos), token = tonumber(token), layer = tonumber(layer),
                           experts = numbers(e, fname, lineno), weights = numbers(w, fname, lineno)}
      end
    end
  else
    local ok, meta = pcall(json.decode, first)
    if not ok or type(meta) ~= "table" or meta.moelab_trace == nil then
      fh:close()
      error(string.format("%s: %s is not a moelab trace (no meta record on line 1)", fname, path), 3)
    end
    out.meta = meta
    for line in fh:lines() do
      lineno = lineno + 1
      if line ~= "" then
        local okr, r = pcall(json.decode, line)
        if not okr or type(r) ~= "table" or r.seq == nil then
          fh:close()
          error(string.format("%s: %s line %d is not a trace record", fname, path, lineno), 3)
        end
        r.experts = r.experts or {}
        r.weights = r.weights or {}
        recs[#recs + 1] = r
      end
    end
  end
  fh:close()
  return out
end

return T
