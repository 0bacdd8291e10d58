-- The data layer from Lua: the built-in corpus, datasets from text, files and
-- token files, held-out splits, deterministic batches and evaluation windows,
-- the byte tokenizer, and the errors bad arguments raise.
local moe = require "moelab"
local data = require "moelab.data"
local files = require "helpers.files"
teardown(files.cleanup)

local function errmsg(f, ...)
  local ok, msg = pcall(f, ...)
  assert.is_false(ok)
  return tostring(msg)
end

local tmpname = files.tmpname

local function write_binary(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- little-endian uint16 ids into a byte string
local function u16(ids)
  local out = {}
  for i, v in ipairs(ids) do out[i] = string.char(v % 256, math.floor(v / 256)) end
  return table.concat(out)
end

local function u32(ids)
  local out = {}
  for i, v in ipairs(ids) do
    out[i] = string.char(v % 256, math.floor(v / 256) % 256, math.floor(v / 65536) % 256, math.floor(v / 16777216))
  end
  return table.concat(out)
end

local function same_tensor(a, b)
  assert.same(a:shape(), b:shape())
  assert.same(a:to_table(), b:to_table())
end

describe("the built-in corpus", function()
  it("is deterministic from its seed", function()
    local a = data.corpus{seed = 5, num_bytes = 20000}
    local b = data.corpus{seed = 5, num_bytes = 20000}
    local c = data.corpus{seed = 6, num_bytes = 20000}
    assert.equal(20000, a:num_tokens())
    assert.equal(a:text(0), b:text(0))
    assert.are_not.equal(a:text(0), c:text(0))
    assert.equal(256, a:vocab_size())
    assert.is_true(a:is_byte_level())
  end)

  it("counts documents and names its four domains", function()
    local ds = data.corpus{seed = 1, num_documents = 200}
    assert.equal(200, ds:num_documents())
    assert.same({"arithmetic", "code", "records", "prose"}, ds:domains())
    assert.same(data.DOMAINS, ds:domains())
    assert.equal("Dataset(" .. ds:num_tokens() .. " tokens, vocab 256, 4 domains)", tostring(ds))
  end)

  it("labels every domain, and the text matches its label", function()
    local ds = data.corpus{seed = 2, num_documents = 400}
    local n = ds:num_windows(64)
    local seen = {}
    local ids, _, domains = ds:window_batch(64, 0, n)
    local names = ds:domains()
    local idt, dt = ids:to_table(), domains:to_table()
    for r = 1, #dt do
      local d = dt[r][1]
      if dt[r][64] == d then   -- a window inside one document
        local text = data.decode(idt[r])
        local name = names[d + 1]
        seen[name] = (seen[name] or 0) + 1
        -- each domain has its own alphabet
        if name == "arithmetic" then assert.truthy(text:find("^[%d%s%+%-%*%(%)=%.]+$"), text) end
        if name == "prose" then assert.truthy(text:find("^[%a%s,%.]+$"), text) end
        if name == "code" then assert.truthy(text:find("[=%(%){}<>]") or text:find("\n  "), text) end
        if name == "records" then assert.truthy(text:find("%d") and text:find("[=,\"]"), text) end
      end
    end
    for _, name in ipairs(data.DOMAINS) do assert.truthy((seen[name] or 0) > 10, name) end
  end)

  it("writes arithmetic that is correct", function()
    local ds = data.corpus{seed = 3, num_documents = 300}
    local checked = 0
    for line in ds:text(0):gmatch("[^\n]+") do
      local lhs, rhs = line:match("^([%d%s%+%-%*%(%)]+) = (%-?%d+)%.$")
      if lhs then
        local f = assert(loadstring("return " .. lhs))
        assert.equal(tonumber(rhs), f(), line)
        checked = checked + 1
      end
    end
    assert.truthy(checked > 500, "checked " .. checked)
  end)

  it("is plain ASCII", function()
    local s = data.corpus{seed = 4, num_bytes = 50000}:text(0)
    assert.is_nil(s:find("[^\n\32-\126]"))
  end)

  it("reports a label per position", function()
    local ds = data.corpus{seed = 1, num_documents = 10}
    local name = ds:domain_at(0)
    assert.truthy(({arithmetic = 1, code = 1, records = 1, prose = 1})[name])
    assert.is_nil(data.from_text("abc"):domain_at(1))
  end)
end)

describe("batches", function()
  local ds = data.corpus{seed = 1, num_bytes = 65536}

  it("are a function of (seed, step)", function()
    local a1, t1, d1 = ds:batch{batch_size = 4, seq_len = 32, seed = 7, step = 3}
    local a2, t2, d2 = ds:batch{batch_size = 4, seq_len = 32, seed = 7, step = 3}
    same_tensor(a1, a2); same_tensor(t1, t2); same_tensor(d1, d2)
    assert.same({4, 32}, a1:shape())
    assert.equal("i64", a1:dtype())
    assert.equal("i64", d1:dtype())
    local b = ds:batch{batch_size = 4, seq_len = 32, seed = 7, step = 4}
    assert.are_not.same(a1:to_table(), b:to_table())
    local c = ds:batch{batch_size = 4, seq_len = 32, seed = 8, step = 3}
    assert.are_not.same(a1:to_table(), c:to_table())
    local e = ds:batch{batch_size = 4, seq_len = 32, seed = 7, step = 3, epoch = 1}
    assert.are_not.same(a1:to_table(), e:to_table())
  end)

  it("have targets that are the ids shifted by one", function()
    local ids, targets = ds:batch{batch_size = 8, seq_len = 16, seed = 1, step = 0}
    local it, tt = ids:to_table(), targets:to_table()
    for r = 1, 8 do
      for t = 1, 15 do assert.equal(it[r][t + 1], tt[r][t]) end
      -- the row is a real window: its text occurs in the dataset
      local window = data.decode(it[r]) .. string.char(tt[r][16])
      assert.truthy(ds:text(0):find(window, 1, true))
    end
  end)

  it("resume: the iterator from step k equals an unbroken run", function()
    local full, resumed = {}, {}
    for step, ids in data.batches(ds, {batch_size = 2, seq_len = 8, seed = 3, steps = 6}) do full[step] = ids:to_table() end
    for step, ids in data.batches(ds, {batch_size = 2, seq_len = 8, seed = 3, start = 4, steps = 2}) do
      resumed[step] = ids:to_table()
    end
    assert.same(full[4], resumed[4])
    assert.same(full[5], resumed[5])
    assert.is_nil(resumed[3])
  end)

  it("windows cover the held-out split once, in a seeded order", function()
    local _, ho = ds:split(0.2)
    local n = ho:num_windows(32)
    assert.equal(math.floor((ho:num_tokens() - 1) / 32), n)
    local rows, seen = 0, {}
    for first, ids, targets in data.windows(ho, {seq_len = 32, batch_size = 5}) do
      rows = rows + ids:shape()[1]
      assert.equal(ho:text(first * 32, first * 32 + 32), data.decode(ids:select(1, 1)))
    end
    assert.equal(n, rows)
    local starts = {}
    for _, ids in data.windows(ho, {seq_len = 32, batch_size = 7, seed = 9, epoch = 2}) do
      for r = 1, ids:shape()[1] do
        local s = data.decode(ids:select(1, r))
        seen[s] = (seen[s] or 0) + 1
        starts[#starts + 1] = s
      end
    end
    assert.equal(n, #starts)
    local again = ho:window_batch(32, 0, 3, {seed = 9, epoch = 2})
    assert.equal(starts[2], data.decode(again:select(1, 2)))
    local natural = ho:window_batch(32, 0, 3)
    assert.are_not.same(natural:to_table(), again:to_table())
  end)
end)

describe("held-out split", function()
  it("is disjoint and covers the data", function()
    local ds = data.corpus{seed = 11, num_documents = 50}
    local train, heldout = ds:split(0.1)
    assert.equal(ds:num_tokens(), train:num_tokens() + heldout:num_tokens())
    assert.equal(ds:text(0), train:text(0) .. heldout:text(0))
    assert.equal(50, train:num_documents() + heldout:num_documents())
    -- at a document boundary: the training part ends with a blank line
    assert.equal("\n\n", train:text(train:num_tokens() - 2))
    local frac = heldout:num_tokens() / ds:num_tokens()
    assert.truthy(frac > 0.03 and frac < 0.2, frac)
  end)

  it("splits text without documents at a token position", function()
    local tr, ho = data.from_text(string.rep("x", 100)):split(0.3)
    assert.equal(70, tr:num_tokens())
    assert.equal(30, ho:num_tokens())
    assert.equal(0, tr:num_documents())
  end)
end)

describe("files and tokens", function()
  it("round-trips a uint16 token file", function()
    local path = tmpname()
    local ids = {0, 1, 513, 65535, 42, 7, 300, 9}
    write_binary(path, u16(ids))
    local ds = data.from_tokens(path, {dtype = "u16"})
    assert.equal(8, ds:num_tokens())
    assert.equal(65536, ds:vocab_size())
    assert.same(ids, ds:tokens(0):to_table())
    assert.same({513, 65535}, ds:tokens(2, 4):to_table())
    assert.is_false(ds:is_byte_level())
    local ds2 = data.from_tokens(path, {dtype = "u16", vocab_size = 70000})
    assert.equal(70000, ds2:vocab_size())
    local i, t = ds:batch{batch_size = 2, seq_len = 3, seed = 1, step = 0}
    assert.same({2, 3}, i:shape())
    assert.same({0, 1, 513, 65535, 42, 7, 300}, ds:window_batch(7, 0, 1):view(7):to_table())
    os.remove(path)
  end)

  it("reads uint32 token files", function()
    local path = tmpname()
    write_binary(path, u32{100000, 5, 70000})
    local ds = data.from_tokens(path, {dtype = "u32"})
    assert.equal(100001, ds:vocab_size())
    assert.same({100000, 5, 70000}, ds:tokens(0, 3):to_table())
    assert.matches("vocab_size 100000", errmsg(data.from_tokens, path, {dtype = "u32", vocab_size = 100000}))
    os.remove(path)
  end)

  it("reads text files byte by byte", function()
    local path = tmpname()
    write_binary(path, "hello\nworld\n")
    local ds = data.from_file(path)
    assert.equal(12, ds:num_tokens())
    assert.equal("world", ds:text(6, 11))
    assert.equal("Dataset(12 tokens, vocab 256)", tostring(ds))
    os.remove(path)
  end)

  it("raises clear errors for bad files", function()
    assert.matches("data.from_tokens: .*nonexistent.*No such file",
      errmsg(data.from_tokens, "/nonexistent/tokens.bin", {dtype = "u16"}))
    assert.matches("data.from_file: .*No such file", errmsg(data.from_file, "/nonexistent/t.txt"))
    local path = tmpname()
    write_binary(path, "abc")
    assert.matches("not a multiple of 2", errmsg(data.from_tokens, path, {dtype = "u16"}))
    assert.matches("not a multiple of 4", errmsg(data.from_tokens, path, {dtype = "u32"}))
    write_binary(path, "")
    assert.matches("empty", errmsg(data.from_tokens, path, {dtype = "u16"}))
    assert.matches("empty", errmsg(data.from_file, path))
    write_binary(path, u16{1, 2, 999})
    assert.matches("id 999 at position 2 is not below vocab_size 500",
      errmsg(data.from_tokens, path, {dtype = "u16", vocab_size = 500}))
    os.remove(path)
  end)
end)

describe("the byte tokenizer", function()
  it("decode(encode(s)) == s for every byte", function()
    local bytes = {}
    for i = 0, 255 do bytes[#bytes + 1] = string.char(i) end
    local s = table.concat(bytes) .. "hello, world\n"
    local tok = data.ByteTokenizer()
    assert.equal(256, tok.vocab_size)
    local ids = tok:encode(s)
    assert.equal("i64", ids:dtype())
    assert.same({#s}, ids:shape())
    assert.equal(s, tok:decode(ids))
    assert.equal(s, data.decode(data.encode(s)))
    assert.equal("hi", tok:decode({104, 105}))
    assert.equal("", tok:decode(tok:encode("")))
    assert.equal("ByteTokenizer(vocab 256)", tostring(tok))
    local ds = data.from_text("abc")
    assert.equal("xyz", ds:decode(ds:encode("xyz")))
  end)

  it("rejects ids that are not bytes", function()
    assert.matches("ids%[2%] is 256", errmsg(data.decode, {1, 256}))
    assert.matches("ids%[1%] is %-1", errmsg(data.decode, {-1}))
    assert.matches("element 2 is 1.5", errmsg(data.decode, moe.tensor({1, 1.5})))
    assert.matches("ids must be a tensor or a table", errmsg(data.decode, "abc"))
    assert.matches("text must be a string", errmsg(data.encode, 5))
  end)
end)

describe("bad arguments", function()
  local ds = data.from_text(string.rep("abcdefgh", 10))

  it("name the option or argument", function()
    assert.matches("exactly one of num_bytes and num_documents", errmsg(data.corpus, {seed = 1}))
    assert.matches("exactly one", errmsg(data.corpus, {num_bytes = 10, num_documents = 2}))
    assert.matches("unknown option 'num_byte'", errmsg(data.corpus, {num_byte = 10}))
    assert.matches("option 'num_bytes' must be >= 1", errmsg(data.corpus, {num_bytes = 0}))
    assert.matches("option 'seed' must be an integer", errmsg(data.corpus, {num_bytes = 10, seed = "x"}))
    assert.matches("option 'seed' must be a non%-negative", errmsg(data.corpus, {num_bytes = 10, seed = -1}))
    assert.matches("expected a table", errmsg(data.corpus, 5))
    assert.matches("option 'dtype' is required", errmsg(data.from_tokens, "x", {}))
    assert.matches("option 'dtype' must be \"u16\" or \"u32\"", errmsg(data.from_tokens, "x", {dtype = "f32"}))
    assert.matches("options must be a table", errmsg(data.from_tokens, "x"))
    assert.matches("path must be a string", errmsg(data.from_file, nil))
    assert.matches("text must be a string", errmsg(data.from_text, {}))
    assert.matches("option 'batch_size' is required", errmsg(ds.batch, ds, {seq_len = 4}))
    assert.matches("option 'seq_len' must be >= 1", errmsg(ds.batch, ds, {batch_size = 2, seq_len = 0}))
    assert.matches("unknown option 'seqlen'", errmsg(ds.batch, ds, {batch_size = 2, seqlen = 4}))
    assert.matches("needs at least 81", errmsg(ds.batch, ds, {batch_size = 2, seq_len = 80}))
    assert.matches("option 'step' must be a non%-negative", errmsg(ds.batch, ds, {batch_size = 2, seq_len = 4, step = -1}))
    assert.matches("fraction must be between 0 and 1", errmsg(ds.split, ds, 1.5))
    assert.matches("fraction must be a number", errmsg(ds.split, ds, "half"))
    assert.matches("self must be a dataset", errmsg(ds.num_tokens, 5))
    assert.matches("seq_len must be >= 1", errmsg(ds.num_windows, ds, 0))
    assert.matches("first is 99 but there are", errmsg(ds.window_batch, ds, 4, 99, 1))
    assert.matches("count must be >= 1", errmsg(ds.window_batch, ds, 4, 0, 0))
    assert.matches("j must be in", errmsg(ds.text, ds, 0, 81))
    assert.matches("i must be in", errmsg(ds.text, ds, -1))
    assert.matches("batch_size must be an integer", errmsg(data.windows, ds, {seq_len = 4}))
    assert.matches("unknown option 'size'", errmsg(data.batches, ds, {size = 4}))
    assert.matches("dataset must be a dataset", errmsg(data.batches, {}, {}))
  end)

  it("refuse byte operations on pre-tokenized data", function()
    local path = tmpname()
    write_binary(path, u16{1, 2, 3})
    local tk = data.from_tokens(path, {dtype = "u16"})
    assert.matches("pre%-tokenized", errmsg(tk.text, tk, 0, 1))
    assert.matches("pre%-tokenized", errmsg(tk.decode, tk, {1}))
    os.remove(path)
  end)
end)
