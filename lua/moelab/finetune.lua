--- moe.FineTuner: supervised fine-tuning of a moelab / Hugging Face MoE model on
-- plain text or prompt/completion pairs, on top of moe.MoETrainer: batches go
-- through its batch_fn hook, and its AdamW groups, router/expert learning rates
-- and freezing, schedules, clipping, NaN guard, progress line, metrics.jsonl and
-- checkpoints are used as they are.
--
--   local ft = moe.FineTuner{model = model, freeze_router = true, run_dir = "runs/sft"}
--   local r = ft:train{dataset = "data/pairs.jsonl", num_epochs = 2, batch_size = 8, seq_len = 256,
--                      learning_rate = 1e-4, tokenizer = moe.tokenizer.from_file("tokenizer.json")}
--   print(ft:evaluate("data/heldout.jsonl").loss)
--
-- Datasets (train{dataset=}, eval_dataset=, evaluate(ds)):
--   * a path to a .jsonl file: one JSON object per line, {"prompt": ..., "completion": ...}
--     (loss on the completion only) or {"text": ...} (loss on every token); blank lines
--     are skipped; a malformed line or a missing / non-string field is an error naming
--     the file and line number;
--   * a path to any other file (.txt): plain text, causal LM on all of it. Byte-level
--     (no tokenizer) it is read with moe.data.from_file (memory-mapped, random windows,
--     exactly as MoETrainer samples); with a tokenizer it is encoded and cut into
--     windows of seq_len + 1 tokens (consecutive windows share one token);
--   * a list of {prompt=, completion=} (or {text=}) tables;
--   * a moe.data dataset (passed to MoETrainer unchanged);
--   * a source from moe.finetune.dataset{...} (below).
--
-- Encoding: ids = prompt ids .. completion ids .. EOS (when the tokenizer has one:
-- train{eos_id=} | tokenizer.eos_id | the first of <|endoftext|>, </s>, <|im_end|>,
-- <eos> the tokenizer knows; eos_id = false for none). The byte-level default
-- tokenizer has no EOS. Rows are [seq_len] inputs and targets (inputs shifted by
-- one); targets are -100 (ignored by the cross-entropy) on prompt positions and on
-- padding, so the loss is on completion tokens (and EOS) only.
--   * packing = false (default): one example per row, padded with pad_id (0) to
--     seq_len. An example longer than seq_len + 1 tokens is truncated from the LEFT of
--     its prompt (the oldest prompt tokens go; at least one prompt token stays, so the
--     first completion token is still predicted); a completion (+ EOS) that alone does
--     not fit in seq_len tokens is an error naming the example. Text examples longer
--     than a row are split into several rows.
--   * packing = true: every example is appended to one stream, which is cut into rows
--     of seq_len + 1 tokens (consecutive rows share one token); no padding, no
--     truncation; attention crosses example boundaries inside a row (moelab has no
--     document mask). Rows without a single completion token are dropped.
-- Row order is shuffled per epoch from the seed (a pure function of seed, epoch and
-- step, so a batch can be regenerated and resume = true continues bit for bit);
-- shuffle = false keeps file order.
local core = require "moelab.core"
local mio = require "moelab.io"
local cdata = core.data
local trainer_mod = require "moelab.trainer"

local M = {}

local IGNORE = -100

local function fail(fname, fmt, ...) error(fname .. ": " .. string.format(fmt, ...), 3) end

local function check_keys(fname, opts, allowed)
  for k in pairs(opts) do
    if not allowed[k] then
      local names = {}
      for n in pairs(allowed) do names[#names + 1] = n end
      table.sort(names)
      fail(fname, "unknown option '%s' (known: %s)", tostring(k), table.concat(names, ", "))
    end
  end
end

local function int_opt(fname, opts, key, default, lo)
  local v = opts[key]
  if v == nil then return default end
  if type(v) ~= "number" or v ~= math.floor(v) then fail(fname, "%s must be an integer, got %s", key, tostring(v)) end
  if lo and v < lo then fail(fname, "%s must be >= %d, got %d", key, lo, v) end
  return v
end

local function is_native_dataset(x)
  return type(x) == "userdata" and pcall(function() return x:num_tokens() end) and true or false
end

---------------------------------------------------------------------------
-- Deterministic shuffling: Park-Miller minimal standard generator (exact in doubles)

local MOD = 2147483647

local function rng(seed, epoch)
  local s = (seed * 7919 + epoch * 104729 + 12345) % MOD
  if s == 0 then s = 1 end
  for _ = 1, 4 do s = (s * 48271) % MOD end
  return function(n)                 -- uniform integer in 1..n
    s = (s * 48271) % MOD
    return 1 + math.floor((s - 1) / (MOD - 1) * n)
  end
end

--- permutation(n, seed, epoch) -> {1-based indices}: Fisher-Yates from the seed.
function M.permutation(n, seed, epoch)
  local p = {}
  for i = 1, n do p[i] = i end
  local r = rng(seed or 0, epoch or 0)
  for i = n, 2, -1 do
    local j = r(i)
    p[i], p[j] = p[j], p[i]
  end
  return p
end

---------------------------------------------------------------------------
-- Tokenizers: the byte-level default, moe.tokenizer, or any object with
-- encode(self, text) -> {ids} | i64 tensor (and optionally vocab_size, eos_id)

local function is_moe_tokenizer(tok)
  local ok, t = pcall(require, "moelab.tokenizer")
  return ok and t.is_tokenizer and t.is_tokenizer(tok) or false
end

local function encode(tok, text)
  if tok == nil then return cdata.encode(text):to_table() end
  local ids = tok:encode(text)
  if core.is_tensor(ids) then ids = ids:to_table() end
  if type(ids) ~= "table" then error("tokenizer:encode returned " .. type(ids) .. ", expected a list of ids", 0) end
  return ids
end

local EOS_NAMES = {"<|endoftext|>", "</s>", "<|im_end|>", "<eos>"}

local function find_eos(tok, given)
  if given == false then return nil end
  if given ~= nil then return given end
  if tok == nil then return nil end
  local ok, e = pcall(function() return tok.eos_id end)
  if ok and type(e) == "function" then ok, e = pcall(e, tok) end
  if ok and type(e) == "number" then return e end
  local ok2, lookup = pcall(function() return tok.token_to_id end)
  if ok2 and type(lookup) == "function" then
    for _, name in ipairs(EOS_NAMES) do
      local ok3, id = pcall(lookup, tok, name)
      if ok3 and type(id) == "number" then return id end
    end
  end
  return nil
end

---------------------------------------------------------------------------
-- Examples

local function check_example(where, ex)
  if type(ex) ~= "table" then error(where .. ": expected an object, got " .. type(ex), 0) end
  if ex.prompt ~= nil or ex.completion ~= nil then
    for _, k in ipairs{"prompt", "completion"} do
      if ex[k] == nil then error(where .. ": missing field '" .. k .. "'", 0) end
      if type(ex[k]) ~= "string" then error(where .. ": field '" .. k .. "' must be a string, got " .. type(ex[k]), 0) end
    end
    return {prompt = ex.prompt, completion = ex.completion}
  end
  if ex.text ~= nil then
    if type(ex.text) ~= "string" then error(where .. ": field 'text' must be a string, got " .. type(ex.text), 0) end
    return {text = ex.text}
  end
  error(where .. ": missing fields 'prompt' and 'completion' (or 'text')", 0)
end

--- read_jsonl(path) -> list of {prompt=, completion=} | {text=}. Errors name the
-- file and the 1-based line: malformed JSON, a non-object, missing or non-string fields.
function M.read_jsonl(path)
  local fh, err = io.open(path, "rb")
  if not fh then error("finetune: cannot open " .. tostring(path) .. " (" .. tostring(err) .. ")", 2) end
  local list, n = {}, 0
  for line in fh:lines() do
    n = n + 1
    line = line:gsub("\r$", "")
    if line:find("%S") then
      local ok, obj = pcall(mio.json.decode, line)
      if not ok then
        fh:close()
        local msg = tostring(obj):gsub("^json%.decode: ", ""):gsub(" at line 1,", " at")
        error(string.format("finetune: %s:%d: malformed JSON (%s)", path, n, msg), 2)
      end
      local ok2, ex = pcall(check_example, string.format("finetune: %s:%d", path, n), obj)
      if not ok2 then fh:close(); error(ex, 2) end
      ex.line = n
      list[#list + 1] = ex
    end
  end
  fh:close()
  if #list == 0 then error("finetune: " .. path .. " holds no examples", 2) end
  return list
end

local function read_all(path)
  local fh, err = io.open(path, "rb")
  if not fh then error("finetune: cannot open " .. tostring(path) .. " (" .. tostring(err) .. ")", 0) end
  local s = fh:read("*a")
  fh:close()
  return s
end

local function is_jsonl(path) return path:match("%.jsonl$") or path:match("%.json$") or path:match("%.ndjson$") end

---------------------------------------------------------------------------
-- The batch source

local Source = {}
Source.__index = Source
Source.__tostring = function(s)
  return string.format("finetune.Source(%d rows of %d tokens, %s, %d target tokens)", #s.rows, s.seq_len,
    s.packing and "packed" or "padded", s.target_tokens)
end

local source_keys = {examples = true, path = true, text = true, tokenizer = true, seq_len = true, packing = true,
                     eos_id = true, pad_id = true, shuffle = true}

--- moe.finetune.dataset{examples = {...} | path = "x.jsonl"|"x.txt" | text = "...", seq_len=,
--  tokenizer=, packing=false, eos_id=, pad_id=0, shuffle=true} -> a batch source:
--  src:batch{batch_size=, seq_len=, seed=, step=} -> ids, targets (i64 [B, seq_len]);
--  src:num_rows(), src:row(i) -> ids, targets (Lua lists), src.truncated (examples cut),
--  src.target_tokens, src.vocab (max id + 1), src:as_dataset() (what MoETrainer takes).
function M.dataset(opts)
  local f = "finetune.dataset"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  check_keys(f, opts, source_keys)
  local T = int_opt(f, opts, "seq_len", nil, 1)
  if not T then fail(f, "seq_len is required") end
  local tok = opts.tokenizer
  if tok ~= nil and type(tok) ~= "table" and not is_moe_tokenizer(tok) then
    fail(f, "tokenizer must be a moe.tokenizer or an object with encode(), got %s", type(tok))
  end
  if tok ~= nil and getmetatable(tok) == getmetatable(require("moelab.data").ByteTokenizer()) then tok = nil end
  local eos = find_eos(tok, opts.eos_id)
  if eos ~= nil and (type(eos) ~= "number" or eos < 0 or eos % 1 ~= 0) then fail(f, "eos_id must be a token id or false") end
  local pad = int_opt(f, opts, "pad_id", 0, 0)
  local examples
  local sources = (opts.examples ~= nil and 1 or 0) + (opts.path ~= nil and 1 or 0) + (opts.text ~= nil and 1 or 0)
  if sources ~= 1 then fail(f, "give exactly one of examples, path, text") end
  if opts.path then
    if type(opts.path) ~= "string" then fail(f, "path must be a string") end
    if is_jsonl(opts.path) then
      local ok, list = pcall(M.read_jsonl, opts.path)
      if not ok then error(list, 2) end
      examples = list
    else
      local ok, s = pcall(read_all, opts.path)
      if not ok then error(s, 2) end
      examples = {{text = s, plain = true}}
    end
  elseif opts.text then
    if type(opts.text) ~= "string" then fail(f, "text must be a string") end
    examples = {{text = opts.text, plain = true}}
  else
    if type(opts.examples) ~= "table" then fail(f, "examples must be a list of {prompt=, completion=} tables") end
    examples = {}
    for i, ex in ipairs(opts.examples) do
      local ok, e = pcall(check_example, string.format("finetune: dataset[%d]", i), ex)
      if not ok then error(e, 2) end
      examples[i] = e
    end
    if #examples == 0 then fail(f, "examples is empty") end
  end

  local self = setmetatable({seq_len = T, packing = opts.packing == true, eos_id = eos, pad_id = pad,
                             shuffle = opts.shuffle ~= false, rows = {}, truncated = 0, target_tokens = 0,
                             num_examples = #examples, vocab = 0}, Source)
  local rows = self.rows
  local maxid = -1
  local function label(i, ex)
    return ex.line and string.format("line %d", ex.line) or string.format("example %d", i)
  end
  -- encode every example into ids and a target mask (mask[j] = true: token j is predicted)
  local stream_ids, stream_mask = {}, {}
  for i, ex in ipairs(examples) do
    local ids, mask = {}, {}
    local ok, err = pcall(function()
      if ex.text then
        for _, id in ipairs(encode(tok, ex.text)) do ids[#ids + 1] = id; mask[#mask + 1] = true end
        if eos and not ex.plain then ids[#ids + 1] = eos; mask[#mask + 1] = true end
      else
        for _, id in ipairs(encode(tok, ex.prompt)) do ids[#ids + 1] = id; mask[#mask + 1] = false end
        for _, id in ipairs(encode(tok, ex.completion)) do ids[#ids + 1] = id; mask[#mask + 1] = true end
        if eos then ids[#ids + 1] = eos; mask[#mask + 1] = true end
      end
    end)
    if not ok then fail(f, "%s: cannot encode: %s", label(i, ex), tostring(err)) end
    local ntarget = 0
    for j = 1, #ids do
      local id = ids[j]
      if type(id) ~= "number" or id < 0 or id % 1 ~= 0 then fail(f, "%s: tokenizer gave a bad id %s", label(i, ex), tostring(id)) end
      if id > maxid then maxid = id end
      if mask[j] and j > 1 then ntarget = ntarget + 1 end
    end
    if ntarget == 0 and not self.packing then
      fail(f, "%s has no token to learn (empty completion%s)", label(i, ex), eos and "" or " and no EOS")
    end
    if self.packing then
      for j = 1, #ids do stream_ids[#stream_ids + 1] = ids[j]; stream_mask[#stream_mask + 1] = mask[j] end
    elseif ex.text then
      -- long text: consecutive windows of T + 1 tokens sharing one token
      local start = 1
      repeat
        local stop = math.min(#ids, start + T)
        local r_ids, r_mask = {}, {}
        for j = start, stop do r_ids[#r_ids + 1] = ids[j]; r_mask[#r_mask + 1] = mask[j] end
        if #r_ids >= 2 then rows[#rows + 1] = {ids = r_ids, mask = r_mask} end
        start = stop
      until stop >= #ids
    else
      if #ids > T + 1 then
        local first = 1
        while not mask[first] do first = first + 1 end     -- first completion token
        local comp = #ids - first + 1
        if comp > T then
          fail(f, "%s: the completion%s has %d tokens, more than seq_len (%d); raise seq_len or shorten it",
            label(i, ex), eos and " + EOS" or "", comp, T)
        end
        local drop = #ids - (T + 1)                            -- oldest prompt tokens to drop
        local r_ids, r_mask = {}, {}
        for j = drop + 1, #ids do r_ids[#r_ids + 1] = ids[j]; r_mask[#r_mask + 1] = mask[j] end
        ids, mask = r_ids, r_mask
        self.truncated = self.truncated + 1
      end
      rows[#rows + 1] = {ids = ids, mask = mask}
    end
  end
  if self.packing then
    local n = #stream_ids
    local start = 1
    while start < n do
      local stop = math.min(n, start + T)
      local r_ids, r_mask, any = {}, {}, false
      for j = start, stop do
        r_ids[#r_ids + 1] = stream_ids[j]; r_mask[#r_mask + 1] = stream_mask[j]
        if j > start and stream_mask[j] then any = true end
      end
      if any then rows[#rows + 1] = {ids = r_ids, mask = r_mask} end
      start = stop
    end
  end
  if #rows == 0 then fail(f, "the dataset gives no row with a token to learn (fewer than 2 tokens?)") end
  for _, r in ipairs(rows) do
    for j = 2, #r.ids do if r.mask[j] then self.target_tokens = self.target_tokens + 1 end end
  end
  self.vocab = math.max(maxid, pad) + 1
  return self
end

function Source:num_rows() return #self.rows end

--- row(i) -> ids, targets: Lua lists of seq_len (1-based row number, file order).
function Source:row(i)
  local r = self.rows[i]
  if not r then error("finetune.Source:row: no row " .. tostring(i), 2) end
  local ids, tg = {}, {}
  local n = #r.ids
  for j = 1, self.seq_len do
    if j < n then
      ids[j] = r.ids[j]
      tg[j] = r.mask[j + 1] and r.ids[j + 1] or IGNORE
    else
      ids[j] = j == n and r.ids[j] or self.pad_id
      tg[j] = IGNORE
    end
  end
  return ids, tg
end

local function tensors(self, list)
  local ids, tg = {}, {}
  for b, i in ipairs(list) do ids[b], tg[b] = self:row(i) end
  return core.tensor(ids, {dtype = "i64"}), core.tensor(tg, {dtype = "i64"})
end

--- batch{batch_size=, seq_len=, seed=0, step=} -> ids, targets. Row k of step s is
-- global position p = s * batch_size + k - 1: epoch p // num_rows, shuffled by (seed, epoch).
function Source:batch(spec)
  local f = "finetune.Source:batch"
  if type(spec) ~= "table" then fail(f, "expected a table {batch_size=, seq_len=, seed=, step=}") end
  local B = int_opt(f, spec, "batch_size", nil, 1)
  local T = int_opt(f, spec, "seq_len", self.seq_len, 1)
  local step = int_opt(f, spec, "step", 0, 0)
  local seed = int_opt(f, spec, "seed", 0, 0)
  if not B then fail(f, "batch_size is required") end
  if T ~= self.seq_len then fail(f, "seq_len %d differs from the %d the rows were built for", T, self.seq_len) end
  local N = #self.rows
  self._perm = self._perm or {}
  local list = {}
  for k = 0, B - 1 do
    local p = step * B + k
    local epoch, at = math.floor(p / N), p % N
    local idx = at + 1
    if self.shuffle then
      local key = seed .. ":" .. epoch
      local perm = self._perm[key]
      if not perm then
        self._perm = {[key] = M.permutation(N, seed, epoch)}   -- keep one epoch's order
        perm = self._perm[key]
      end
      idx = perm[at + 1]
    end
    list[#list + 1] = idx
  end
  return tensors(self, list)
end

--- window_batch(seq_len, first, n) -> the rows first .. first + n - 1 (0-based, file order).
function Source:window_batch(T, first, n)
  if T ~= self.seq_len then error("finetune.Source:window_batch: seq_len differs from the rows'", 2) end
  local list = {}
  for i = first + 1, math.min(first + n, #self.rows) do list[#list + 1] = i end
  return tensors(self, list)
end

--- as_dataset(): a userdata view with the moe.data dataset methods MoETrainer uses
-- (num_tokens, vocab_size, batch, num_windows, window_batch): FineTuner trains
-- through MoETrainer's batch_fn and gives this view as eval_data (eval_every).
function Source:as_dataset()
  if self._proxy then return self._proxy end
  local src = self
  local p = newproxy(true)
  local mt = getmetatable(p)
  mt.__index = {
    num_tokens = function() return #src.rows * src.seq_len + 1 end,
    vocab_size = function() return src.vocab end,
    batch = function(_, spec) return src:batch(spec) end,
    num_windows = function(_, T)
      if T ~= src.seq_len then error("finetune dataset: seq_len " .. tostring(T) .. " differs from the rows' " .. src.seq_len, 2) end
      return #src.rows
    end,
    window_batch = function(_, T, first, n) return src:window_batch(T, first, n) end,
    source = function() return src end,
  }
  mt.__tostring = function() return tostring(src) end
  self._proxy = p
  return p
end

M.Source = Source

---------------------------------------------------------------------------
-- FineTuner

local FineTuner = {}
FineTuner.__index = FineTuner
FineTuner.__tostring = function(s)
  return string.format("FineTuner(%s, freeze_router=%s, freeze_experts=%s)", s.model.config.name or "MoEModel",
    tostring(s.trainer.freeze_router), tostring(s.trainer.freeze_experts))
end

--- moe.FineTuner{model, freeze_router=false, freeze_experts=false, freeze_rest=false,
--  router_learning_rate=, expert_learning_rate=, run_dir=, weight_decay=0, aux_loss_coef=
--  (the checkpoint's router_aux_loss_coef when loaded from Hugging Face, else the
--  balancer's), and every other MoETrainer option} -> a fine-tuner; ft.trainer is its
--  MoETrainer.
function M.FineTuner(opts)
  local f = "FineTuner"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  local model = opts.model
  if type(model) ~= "table" or not model.net then fail(f, "model must be a moe.MoEModel, got %s", type(model)) end
  local topts = {}
  for k, v in pairs(opts) do topts[k] = v end
  if topts.weight_decay == nil then topts.weight_decay = 0 end
  if topts.aux_loss_coef == nil and model.hf and type(model.hf.router_aux_loss_coef) == "number" then
    topts.aux_loss_coef = model.hf.router_aux_loss_coef
  end
  local ok, tr = pcall(trainer_mod.MoETrainer, topts)
  if not ok then error((tostring(tr):gsub("MoETrainer", "FineTuner", 1)), 2) end
  return setmetatable({model = model, trainer = tr, run_dir = opts.run_dir}, FineTuner)
end

local train_keys = {
  dataset = true, eval_dataset = true, task = true, tokenizer = true, eos_id = true, pad_id = true, packing = true,
  shuffle = true, num_epochs = true, max_steps = true, batch_size = true, seq_len = true, learning_rate = true,
  warmup_steps = true, lr_schedule = true, min_lr_ratio = true, gradient_accumulation_steps = true,
  eval_every = true, eval_batches = true, save_every = true, seed = true, resume = true, max_skipped_steps = true, save_final = true,
}

local TASKS = {text_generation = true, causal_lm = true}

-- dataset spec -> a native moe.data dataset or a Source
local function prepare(f, spec, o)
  if is_native_dataset(spec) then
    local ok, src = pcall(function() return spec:source() end)
    if ok and getmetatable(src) == Source then return src end
    return spec
  end
  if getmetatable(spec) == Source then
    if not o.any_seq_len and spec.seq_len ~= o.seq_len then fail(f, "the dataset's rows are %d tokens, seq_len is %d", spec.seq_len, o.seq_len) end
    return spec
  end
  local so = {seq_len = o.seq_len, tokenizer = o.tokenizer, packing = o.packing, eos_id = o.eos_id, pad_id = o.pad_id,
              shuffle = o.shuffle}
  if type(spec) == "string" then
    if not is_jsonl(spec) and o.tokenizer == nil then
      local ok, ds = pcall(cdata.from_file, spec)
      if not ok then fail(f, "cannot read %s: %s", spec, tostring(ds)) end
      return ds
    end
    so.path = spec
  elseif type(spec) == "table" then
    so.examples = spec
  else
    fail(f, "dataset must be a path (.jsonl or .txt), a list of {prompt=, completion=} tables or a moe.data dataset, got %s", type(spec))
  end
  local ok, src = pcall(M.dataset, so)
  if not ok then error((tostring(src):gsub("^finetune%.dataset: ", "")), 0) end
  return src
end

local function vocab_of(ds) return getmetatable(ds) == Source and ds.vocab or ds:vocab_size() end

--- train{dataset=, eval_dataset=, task="text_generation", tokenizer= (byte-level by default),
--  eos_id=, packing=false, shuffle=true, num_epochs= | max_steps=, batch_size=8, seq_len=256,
--  learning_rate=1e-4, warmup_steps=, lr_schedule=, min_lr_ratio=, gradient_accumulation_steps=,
--  eval_every=, eval_batches=, save_every=, seed=0, resume=} -> MoETrainer's result table
--  plus result.data = {rows=, examples=, truncated=, target_tokens=} and result.eval
--  (FineTuner:evaluate of eval_dataset, when given).
function FineTuner:train(opts)
  local f = "FineTuner:train"
  if type(opts) ~= "table" then fail(f, "expected a table of options, got %s", type(opts)) end
  check_keys(f, opts, train_keys)
  local task = opts.task or "text_generation"
  if not TASKS[task] then fail(f, "task must be \"text_generation\", got %s", tostring(task)) end
  if opts.dataset == nil then fail(f, "dataset is required") end
  local o = {
    seq_len = int_opt(f, opts, "seq_len", 256, 2),
    batch_size = int_opt(f, opts, "batch_size", 8, 1),
    tokenizer = opts.tokenizer, packing = opts.packing, eos_id = opts.eos_id, pad_id = opts.pad_id,
    shuffle = opts.shuffle,
  }
  local accum = int_opt(f, opts, "gradient_accumulation_steps", 1, 1)
  local train_ds = prepare(f, opts.dataset, o)
  local eval_ds = opts.eval_dataset ~= nil and prepare(f, opts.eval_dataset, o) or nil
  local V = self.model.config.vocab_size
  for _, d in ipairs{{train_ds, "dataset"}, {eval_ds, "eval_dataset"}} do
    if d[1] and vocab_of(d[1]) > V then
      if getmetatable(d[1]) == Source then
        fail(f, "%s has token id %d but the model's vocab_size is %d (wrong tokenizer?)", d[2], vocab_of(d[1]) - 1, V)
      end
      fail(f, "%s has vocabulary %d but the model's vocab_size is %d (wrong tokenizer?)", d[2], vocab_of(d[1]), V)
    end
  end
  local topts = {}
  for _, k in ipairs{"learning_rate", "warmup_steps", "lr_schedule", "min_lr_ratio", "eval_every", "eval_batches",
                     "save_every", "seed", "resume", "max_skipped_steps", "max_steps", "save_final"} do
    topts[k] = opts[k]
  end
  if topts.learning_rate == nil then topts.learning_rate = 1e-4 end
  topts.batch_size, topts.seq_len, topts.gradient_accumulation_steps = o.batch_size, o.seq_len, accum
  local info
  if getmetatable(train_ds) == Source then
    if opts.max_steps == nil then
      if opts.num_epochs == nil then fail(f, "give num_epochs or max_steps") end
      if type(opts.num_epochs) ~= "number" or opts.num_epochs <= 0 then fail(f, "num_epochs must be a positive number") end
      topts.max_steps = math.max(1, math.ceil(opts.num_epochs * #train_ds.rows / (o.batch_size * accum)))
    end
    info = {rows = #train_ds.rows, examples = train_ds.num_examples, truncated = train_ds.truncated,
            target_tokens = train_ds.target_tokens}
    local src, B, T, seed = train_ds, o.batch_size, o.seq_len, opts.seed or 0
    topts.batch_fn = function(index) return src:batch{batch_size = B, seq_len = T, seed = seed, step = index} end
    if self.trainer.progress then
      print(string.format("finetune: %d example%s -> %d row%s of %d tokens (%s)%s, %d target tokens, %d steps of %d row%s",
        info.examples, info.examples == 1 and "" or "s", info.rows, info.rows == 1 and "" or "s", o.seq_len,
        train_ds.packing and "packed" or "padded",
        info.truncated > 0 and string.format(", %d truncated from the left of the prompt", info.truncated) or "",
        info.target_tokens, topts.max_steps, o.batch_size * accum, o.batch_size * accum == 1 and "" or "s"))
    end
  else
    topts.train_data = train_ds
    topts.num_epochs = opts.max_steps == nil and opts.num_epochs or nil
    if topts.max_steps == nil and topts.num_epochs == nil then fail(f, "give num_epochs or max_steps") end
  end
  if eval_ds then topts.eval_data = getmetatable(eval_ds) == Source and eval_ds:as_dataset() or eval_ds end
  local ok, result = pcall(self.trainer.train, self.trainer, topts)
  if not ok then error((tostring(result):gsub("^MoETrainer:train: ", f .. ": ")), 2) end
  result.data = info
  self.train_options = o
  if eval_ds then result.eval = self:evaluate(eval_ds) end
  return result
end

--- evaluate(dataset[, {batch_size=, seq_len=, tokenizer=, eos_id=, packing=}]) ->
-- {loss=, perplexity=, tokens=}: the mean cross-entropy over every target token
-- (completion tokens for prompt/completion data), weighted by token, all rows.
-- Options default to the last train{}'s.
function FineTuner:evaluate(ds, opts)
  local f = "FineTuner:evaluate"
  opts = opts or {}
  if type(opts) ~= "table" then fail(f, "options must be a table") end
  local last = self.train_options or {}
  local o = {seq_len = opts.seq_len or last.seq_len or 256, batch_size = opts.batch_size or last.batch_size or 8,
             tokenizer = opts.tokenizer or last.tokenizer, packing = opts.packing, eos_id = opts.eos_id,
             pad_id = opts.pad_id, shuffle = false, any_seq_len = opts.seq_len == nil}
  if o.packing == nil then o.packing = last.packing end
  if o.eos_id == nil then o.eos_id = last.eos_id end
  local src = prepare(f, ds, o)
  if getmetatable(src) ~= Source then
    return self.trainer:evaluate(src, {batch_size = o.batch_size, seq_len = o.seq_len})
  end
  if src.vocab > self.model.config.vocab_size then
    fail(f, "the dataset has token id %d but the model's vocab_size is %d", src.vocab - 1, self.model.config.vocab_size)
  end
  local net = self.model.net
  local was = net:is_training()
  self.model:train(false)
  local total, count = 0, 0
  local N = #src.rows
  for first = 0, N - 1, o.batch_size do
    local n = math.min(o.batch_size, N - first)
    local ids, targets = src:window_batch(src.seq_len, first, n)
    local k = 0
    for _, row in ipairs(targets:to_table()) do
      for _, t in ipairs(row) do if t ~= IGNORE then k = k + 1 end end
    end
    if k > 0 then
      local dev = net:device()
      if dev ~= "cpu" then ids, targets = ids:to(dev), targets:to(dev) end
      local logits = net:forward(ids)
      total = total + core.Tape():cross_entropy(logits, targets, {ignore_index = IGNORE, grad_in_forward = false}):item() * k
      count = count + k
      logits:free()
    end
  end
  self.model:train(was)
  local mean = total / math.max(count, 1)
  return {loss = mean, perplexity = math.exp(mean), tokens = count}
end

--- generate(prompt[, {max_new_tokens=32, tokenizer=, eos_id=}]) -> text, ids: greedy
-- decoding (the whole sequence is re-run per token: for checks, not for serving).
function FineTuner:generate(prompt, opts)
  local f = "FineTuner:generate"
  if type(prompt) ~= "string" then fail(f, "prompt must be a string, got %s", type(prompt)) end
  opts = opts or {}
  local last = self.train_options or {}
  local tok = opts.tokenizer or last.tokenizer
  if tok ~= nil and getmetatable(tok) == getmetatable(require("moelab.data").ByteTokenizer()) then tok = nil end
  local eos = find_eos(tok, opts.eos_id == nil and last.eos_id or opts.eos_id)
  local ids = encode(tok, prompt)
  if #ids == 0 then fail(f, "the prompt encodes to no tokens") end
  local net = self.model.net
  local was = net:is_training()
  self.model:train(false)
  local new = {}
  for _ = 1, opts.max_new_tokens or 32 do
    local x = core.tensor({ids}, {dtype = "i64"})
    if net:device() ~= "cpu" then x = x:to(net:device()) end
    local logits = net:forward(x)
    local lastrow = logits:select(2, #ids):select(1, 1)
    if lastrow:device() ~= "cpu" then lastrow = lastrow:to("cpu") end
    local v = lastrow:to_table()
    local best, bi = -math.huge, 0
    for i = 1, #v do if v[i] > best then best, bi = v[i], i - 1 end end
    logits:free()
    if eos and bi == eos then break end
    ids[#ids + 1] = bi
    new[#new + 1] = bi
  end
  self.model:train(was)
  local text = ""
  if #new > 0 then text = tok == nil and cdata.decode(core.tensor(new, {dtype = "i64"})) or tok:decode(new) end
  return text, new
end

function FineTuner:save_model(dir) return self.trainer:save_model(dir) end
--- save_pretrained(dir[, {model_type=}]): transformers layout (moe.save_pretrained).
function FineTuner:save_pretrained(dir, opts) return require("moelab.hf").save_pretrained(self.model, dir, opts) end

M.FineTunerClass = FineTuner
return M
