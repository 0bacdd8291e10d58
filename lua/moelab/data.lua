--- Training data: token datasets, the built-in synthetic corpus and the
-- byte-level tokenizer (moe.data). A thin face over moelab.core's data
-- binding (src/lua/data.c, src/train/dataset.h).
--
-- Conventions: token positions and window numbers are 0-based and ranges
-- are end-exclusive, like the ids they index. Batches are i64 CPU tensors
-- [batch_size, seq_len]: ids, targets (ids shifted by one) and domains (the
-- domain id of each input token, -1 when unknown). A batch is a pure
-- function of (seed, epoch, step): that pair is the sampler's whole state.
--
--   local ds = moe.data.corpus{seed = 1, num_bytes = 2^20}
--   local train, heldout = ds:split(0.1)
--   local ids, targets, domains = train:batch{batch_size = 16, seq_len = 256, seed = 1, step = 0}
--   for first, ids, targets in moe.data.windows(heldout, {seq_len = 256, batch_size = 16}) do ... end
local core = require "moelab.core"
local cdata = core.data

local data = {}

--- The built-in corpus's domains, in id order (domain id d is DOMAINS[d + 1]).
data.DOMAINS = {"arithmetic", "code", "records", "prose"}

--- moe.data.corpus{seed = 0, num_bytes = N | num_documents = N}: the built-in
-- synthetic multi-domain corpus, deterministic from the seed (byte-level).
data.corpus = cdata.corpus
--- moe.data.from_text(string): a byte-level dataset of the string's bytes.
data.from_text = cdata.from_text
--- moe.data.from_file(path): a byte-level dataset of a text file (memory-mapped).
data.from_file = cdata.from_file
--- moe.data.from_tokens(path, {dtype = "u16" | "u32", vocab_size = N}): a file of
-- raw little-endian ids, memory-mapped; vocab_size defaults to max id + 1.
data.from_tokens = cdata.from_tokens
--- moe.data.encode(string) -> i64 tensor of byte ids; moe.data.decode(ids) -> string.
data.encode = cdata.encode
data.decode = cdata.decode

--- True for a dataset made by this module.
function data.is_dataset(x)
  return type(x) == "userdata" and pcall(function() return x:num_tokens() end) and true or false
end

local function check_dataset(fname, ds)
  if not data.is_dataset(ds) then
    error(string.format("%s: dataset must be a dataset, got %s", fname, type(ds)), 3)
  end
end

local function check_opts(fname, opts, allowed)
  if type(opts) ~= "table" then
    error(string.format("%s: expected a table of options, got %s", fname, type(opts)), 3)
  end
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      error(string.format("%s: unknown option '%s' (expected %s)", fname, tostring(k), table.concat(names, ", ")), 3)
    end
  end
end

local function check_int(fname, name, v, lo)
  if type(v) ~= "number" or v ~= math.floor(v) then
    error(string.format("%s: %s must be an integer, got %s", fname, name, tostring(v)), 3)
  end
  if v < lo then error(string.format("%s: %s must be >= %d, got %d", fname, name, lo, v), 3) end
  return v
end

--- Training batches, step after step:
--   for step, ids, targets, domains in moe.data.batches(ds, {batch_size =, seq_len =,
--       seed = 0, epoch = 0, start = 0, steps = N}) do ... end
-- Steps run start .. start + steps - 1 (forever when steps is nil); resuming
-- at step k gives exactly the batches an unbroken run would have.
function data.batches(ds, opts)
  local f = "data.batches"
  check_dataset(f, ds)
  check_opts(f, opts, {batch_size = true, seq_len = true, seed = true, epoch = true, start = true, steps = true})
  local start = check_int(f, "start", opts.start or 0, 0)
  local stop = opts.steps and start + check_int(f, "steps", opts.steps, 0) or math.huge
  local spec = {batch_size = opts.batch_size, seq_len = opts.seq_len, seed = opts.seed or 0, epoch = opts.epoch or 0}
  local step = start - 1
  return function()
    step = step + 1
    if step >= stop then return nil end
    spec.step = step
    return step, ds:batch(spec)
  end
end

--- Every non-overlapping window once, for evaluation over a whole split:
--   for first, ids, targets, domains in moe.data.windows(heldout, {seq_len =, batch_size =,
--       seed =, epoch =}) do ... end
-- `first` is the 0-based number of the batch's first window; the last batch
-- may be shorter. With a seed the windows come in that epoch's shuffled order.
function data.windows(ds, opts)
  local f = "data.windows"
  check_dataset(f, ds)
  check_opts(f, opts, {batch_size = true, seq_len = true, seed = true, epoch = true})
  local seq_len = check_int(f, "seq_len", opts.seq_len, 1)
  local bs = check_int(f, "batch_size", opts.batch_size, 1)
  local order = opts.seed and {seed = opts.seed, epoch = opts.epoch or 0} or nil
  if not order and opts.epoch then error(f .. ": epoch needs a seed (it picks the shuffled order)", 2) end
  local n, first = ds:num_windows(seq_len), 0
  return function()
    if first >= n then return nil end
    local at = first
    first = first + bs
    return at, ds:window_batch(seq_len, at, bs, order)
  end
end

--- The byte-level tokenizer: each byte is one token, ids 0..255.
--   local tok = moe.data.ByteTokenizer()
--   tok:encode("hi") -> i64 tensor {104, 105};  tok:decode(ids) -> "hi";  tok.vocab_size == 256
local ByteTokenizer = {}
ByteTokenizer.__index = ByteTokenizer
ByteTokenizer.__tostring = function() return "ByteTokenizer(vocab 256)" end

function ByteTokenizer:encode(text)
  if getmetatable(self) ~= ByteTokenizer then error("ByteTokenizer:encode: call it with ':'", 2) end
  return cdata.encode(text)
end

function ByteTokenizer:decode(ids)
  if getmetatable(self) ~= ByteTokenizer then error("ByteTokenizer:decode: call it with ':'", 2) end
  return cdata.decode(ids)
end

function data.ByteTokenizer()
  return setmetatable({vocab_size = 256}, ByteTokenizer)
end

return data
