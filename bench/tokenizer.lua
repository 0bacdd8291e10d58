-- Tokenizer throughput: encodes the whole of tinyshakespeare (1.1 MB) with the
-- two reference tokenizer.json files, single-threaded, in two splits:
--   whole  one encode call on the whole text
--   lines  one encode call per line (each line with its "\n"), 40k calls
-- "first" is the first pass on a freshly loaded tokenizer (cold word cache);
-- "best" the best of N passes after it. Then runs bench/tokenizer_hf.py (the
-- HF `tokenizers` library: same text, same splits, encode() not encode_batch,
-- TOKENIZERS_PARALLELISM=false) when python3 has it: one table.
--
--   ./moelab bench/tokenizer.lua [runs]
local core = require "moelab.core"
local tokenizer = require "moelab.tokenizer"

local runs = tonumber(arg and arg[1]) or 5
local DATA = "../shared/data/"
local FILES = {
  {"gpt-neox-20b-pii-special", DATA .. "tokenizers/gpt-neox-20b-pii-special.json"},
  {"dolma2", DATA .. "tokenizers/dolma2.json"},
}

local f = io.open(DATA .. "text/tinyshakespeare.txt", "rb")
if not f then
  print("bench/tokenizer.lua: needs ../shared/data (text/tinyshakespeare.txt and tokenizers/)")
  os.exit(0)
end
local text = f:read("*a")
f:close()
local lines = {}
for l in text:gmatch("[^\n]*\n?") do if l ~= "" then lines[#lines + 1] = l end end

local function pass(tok, split)
  local t0 = core.clock()
  local n = 0
  if split == "whole" then
    n = tok:encode_tensor(text):shape()[1]
  else
    for i = 1, #lines do n = n + #tok:encode(lines[i]) end
  end
  return core.clock() - t0, n
end

local mb = #text / 1e6
print(string.format("%d bytes, %d lines; single-threaded; MB/s = input bytes / time", #text, #lines))
print("| library | tokenizer | split | tokens | load ms | first MB/s | best MB/s |")
print("|---|---|---|---|---|---|---|")
for _, split in ipairs{"whole", "lines"} do
  for _, e in ipairs(FILES) do
    local t0 = core.clock()
    local tok = tokenizer.from_file(e[2])
    local load_s = core.clock() - t0
    local first, n = pass(tok, split)
    local best = math.huge
    for _ = 1, runs do best = math.min(best, (pass(tok, split))) end
    print(string.format("| moelab %s | %s | %s | %d | %.0f | %.2f | %.2f |", core.version, e[1], split, n,
                        load_s * 1e3, mb / first, mb / best))
    tok = nil
    collectgarbage()
  end
end
io.stdout:flush()
local hf = "bench/tokenizer_hf.py"
if os.execute("python3 -c 'import tokenizers' 2>/dev/null") == 0 then
  os.execute("python3 " .. hf .. " " .. runs)
else
  print("(python3 has no `tokenizers`: pip install tokenizers, then python3 " .. hf .. ")")
end
