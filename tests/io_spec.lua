-- moe.io: safetensors round trips, zero-copy loading, sharded checkpoints,
-- atomic writes, corrupted files, JSON, and files written by Python's
-- safetensors (tests/fixtures/tiny.safetensors, made by make_safetensors.py).
local moe = require "moelab"
local mio = moe.io
local st = mio.safetensors

local function tmpdir()
  local d = os.tmpname()
  os.remove(d)
  mio.mkdir_p(d)
  return d
end

local function ls(dir)
  local names = {}
  local p = io.popen("ls -A '" .. dir .. "'")
  for line in p:lines() do names[#names + 1] = line end
  p:close()
  table.sort(names)
  return names
end

local function fails(pattern, f, ...)
  local ok, msg = pcall(f, ...)
  assert(not ok, "expected an error matching '" .. pattern .. "', the call succeeded")
  msg = tostring(msg)
  assert(msg:find(pattern, 1, true), "error '" .. msg .. "' does not contain '" .. pattern .. "'")
  return msg
end

local function values(t)
  if t:dim() == 0 then return t:item() end
  return t:to_table()
end

local function same_tensor(a, b)
  assert.are.equal(a:dtype(), b:dtype())
  assert.are.same(a:shape(), b:shape())
  assert.are.same(values(a), values(b))
end

local function read_bytes(path)
  local f = assert(io.open(path, "rb"))
  local s = f:read("*a")
  f:close()
  return s
end

local function write_bytes(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

-- an 8-byte little-endian length, the header, then the data
local function raw_file(path, header, data)
  local n, len = #header, {}
  for i = 1, 8 do len[i] = string.char(n % 256); n = math.floor(n / 256) end
  write_bytes(path, table.concat(len) .. header .. (data or ""))
end

describe("moe.io.safetensors", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() os.execute("rm -rf '" .. dir .. "'") end)

  local function sample()
    return {
      {"f32", moe.randn({2, 3, 4}, {seed = 3})},
      {"f64", moe.tensor({1 / 3, -2, 1e300}, {dtype = "f64"})},
      {"bf16", moe.tensor({{1.5, -2.25}, {3, 1024}}, {dtype = "bf16"})},
      {"f16", moe.tensor({0.5, -65504, 1e-3}, {dtype = "f16"})},
      {"i64", moe.tensor({-2 ^ 40, 0, 2 ^ 50 + 3}, {dtype = "i64"})},
      {"i32", moe.tensor({-7, 2 ^ 31 - 1}, {dtype = "i32"})},
      {"u8", moe.tensor({0, 1, 255}, {dtype = "u8"})},
      {"i8", moe.tensor({-128, 127}, {dtype = "i8"})},
      {"scalar", moe.full({}, 3.5)},
      {"scalar_i64", moe.full({}, 7, {dtype = "i64"})},
      {"empty", moe.zeros({0, 3})},
      {"empty_bf16", moe.zeros({4, 0}, {dtype = "bf16"})},
    }
  end

  it("round-trips every dtype, 0-dim and empty tensors", function()
    local path = dir .. "/all.safetensors"
    local pairs_ = sample()
    st.save(path, pairs_)
    local loaded = st.load(path)
    local n = 0
    for _ in pairs(loaded) do n = n + 1 end
    assert.are.equal(#pairs_, n)
    for _, p in ipairs(pairs_) do same_tensor(p[2], loaded[p[1]]) end
  end)

  it("round-trips metadata, numbers as their text", function()
    local path = dir .. "/meta.safetensors"
    st.save(path, {{"w", moe.ones({2})}}, {format = "pt", step = 100, lr = 0.5, note = ""})
    local _, meta = st.load(path)
    assert.are.same({format = "pt", step = "100", lr = "0.5", note = ""}, meta)
    local _, meta2 = st.info(path)
    assert.are.same(meta, meta2)
    st.save(path, {{"w", moe.ones({2})}})
    local _, none = st.load(path)
    assert.are.same({}, none)
  end)

  it("keeps the order of a list and sorts a map", function()
    local path = dir .. "/order.safetensors"
    local names = {"zeta", "alpha", "mid.1", "mid.0", "b"}
    local list = {}
    for i, name in ipairs(names) do
      list[i] = {name, moe.full({i}, i, {dtype = i % 2 == 0 and "u8" or "f64"})}
    end
    st.save(path, list)
    local got = {}
    for i, e in ipairs(st.info(path)) do got[i] = e.name end
    assert.are.same(names, got)

    local map = {}
    for i, name in ipairs(names) do map[name] = list[i][2] end
    st.save(path, map)
    got = {}
    for i, e in ipairs(st.info(path)) do got[i] = e.name end
    local sorted = {unpack(names)}
    table.sort(sorted)
    assert.are.same(sorted, got)
  end)

  it("info describes tensors without loading them", function()
    local path = dir .. "/info.safetensors"
    st.save(path, {{"w", moe.zeros({3, 4}, {dtype = "bf16"})}, {"s", moe.full({}, 1)}})
    local info = st.info(path)
    assert.are.equal(2, #info)
    assert.are.same({name = "w", dtype = "bf16", file_dtype = "BF16", shape = {3, 4}, nbytes = 24, file = path},
                    info[1])
    assert.are.same({}, info[2].shape)
  end)

  it("loads zero-copy views that outlive the loader and a replaced file", function()
    local path = dir .. "/zc.safetensors"
    local w = moe.randn({64, 8}, {seed = 5})
    st.save(path, {{"w", w}})
    local t = st.load(path).w
    collectgarbage(); collectgarbage()   -- the loader's handle is gone; t holds the mapping
    same_tensor(w, t)
    -- an atomic save replaces the file by rename: the old mapping still reads the old data
    st.save(path, {{"w", moe.zeros({64, 8})}})
    same_tensor(w, t)
    assert.are.equal(0, st.load(path).w:sum():item())
    -- writing into a loaded tensor stays private to this process
    t:set(1, 1, 123)
    assert.are.equal(123, t:get(1, 1))
    assert.are.equal(0, st.load(path).w:get(1, 1))
    -- and views and math work on it as on any tensor
    assert.is_true(math.abs((t * 2):sum():item() - 2 * t:sum():item()) < 1e-3)
  end)

  it("converts on request and loads only the named tensors", function()
    local path = dir .. "/conv.safetensors"
    local b = moe.tensor({1.5, -2.25, 3, 1024}, {dtype = "bf16"})
    st.save(path, {{"b", b}, {"i", moe.tensor({-3, 9}, {dtype = "i64"})}, {"f", moe.ones({2})}})
    local all = st.load(path, {dtype = "f32"})
    assert.are.equal("f32", all.b:dtype())
    assert.are.same({1.5, -2.25, 3, 1024}, all.b:to_table())
    assert.are.equal("f32", all.i:dtype())
    assert.are.same({-3, 9}, all.i:to_table())
    local some = st.load(path, {names = {"i"}, dtype = "f64"})
    assert.are.same({"i"}, (function() local k = {} for n in pairs(some) do k[#k + 1] = n end return k end)())
    assert.are.equal("f64", some.i:dtype())
    fails("has no tensor 'nope'", st.load, path, {names = {"b", "nope"}})
    fails("names[1] must be a string", st.load, path, {names = {1}})
    fails("unknown dtype 'f42'", st.load, path, {dtype = "f42"})
  end)

  it("loads a sharded checkpoint through its index, each shard once", function()
    st.save(dir .. "/model-00001-of-00002.safetensors",
             {{"embed", moe.full({4, 2}, 1)}, {"layers.0.w", moe.full({2, 2}, 2)}})
    st.save(dir .. "/model-00002-of-00002.safetensors",
             {{"layers.1.w", moe.full({2, 2}, 3, {dtype = "bf16"})}, {"head", moe.full({2, 4}, 4)},
              {"unlisted", moe.zeros({1})}})
    local index = {
      metadata = {total_size = 96},
      weight_map = {
        embed = "model-00001-of-00002.safetensors",
        ["layers.0.w"] = "model-00001-of-00002.safetensors",
        ["layers.1.w"] = "model-00002-of-00002.safetensors",
        head = "model-00002-of-00002.safetensors",
      },
    }
    local ipath = dir .. "/model.safetensors.index.json"
    mio.write_file_atomic(ipath, mio.json.encode(index, {indent = true}))
    local t, meta = st.load(ipath)
    assert.are.same({total_size = 96}, meta)
    assert.are.same({"embed", "head", "layers.0.w", "layers.1.w"},
                    (function() local k = {} for n in pairs(t) do k[#k + 1] = n end table.sort(k) return k end)())
    assert.are.equal(4 * 8, t.head:sum():item())
    assert.are.equal("bf16", t["layers.1.w"]:dtype())
    local f32 = st.load(ipath, {dtype = "f32", names = {"layers.1.w"}})
    assert.are.equal("f32", f32["layers.1.w"]:dtype())
    local info = st.info(ipath)
    assert.are.equal(4, #info)
    for _, e in ipairs(info) do assert.truthy(e.file:find("model%-0000[12]%-of%-00002%.safetensors$")) end

    -- a tensor mapped to a shard that lacks it, a missing shard, a shard outside the directory
    index.weight_map.ghost = "model-00001-of-00002.safetensors"
    mio.write_file_atomic(ipath, mio.json.encode(index))
    fails("tensor 'ghost' is mapped to model-00001-of-00002.safetensors, which does not contain it", st.load, ipath)
    index.weight_map.ghost = "model-00003-of-00002.safetensors"
    mio.write_file_atomic(ipath, mio.json.encode(index))
    fails("model-00003-of-00002.safetensors: cannot open", st.load, ipath)
    index.weight_map.ghost = "../elsewhere.safetensors"
    mio.write_file_atomic(ipath, mio.json.encode(index))
    fails("must be a path relative to the index's directory", st.load, ipath)
    mio.write_file_atomic(ipath, '{"metadata": {}}')
    fails('with a "weight_map" object', st.load, ipath)
  end)

  it("leaves the old file when a save fails after valid tensors", function()
    local path = dir .. "/keep.safetensors"
    st.save(path, {{"a", moe.full({3}, 1)}})
    local before = read_bytes(path)
    fails("safetensors.save: tensors[3][2] must be a tensor, got string", st.save, path,
          {{"a", moe.full({3}, 2)}, {"b", moe.full({3}, 3)}, {"c", "not a tensor"}})
    local freed = moe.zeros({2})
    freed:free()
    fails("tensor was freed (argument tensors['z'])", st.save, path, {a = moe.full({3}, 2), z = freed})
    fails("'b' is given twice", st.save, path, {{"a", moe.ones({1})}, {"b", moe.ones({1})}, {"b", moe.ones({1})}})
    fails("'__metadata__' is reserved", st.save, path, {{"__metadata__", moe.ones({1})}})
    -- a directory where the path should be: the rename fails after the data is written
    local blocked = dir .. "/blocked.safetensors"
    mio.mkdir_p(blocked .. "/inside")
    fails("cannot rename temp file over it", st.save, blocked, {{"a", moe.full({1000}, 1)}})
    assert.are.equal(before, read_bytes(path))
    assert.are.same({"blocked.safetensors", "keep.safetensors"}, ls(dir))   -- no temp files left
    assert.are.same({1, 1, 1}, st.load(path).a:to_table())
  end)

  it("checks save arguments", function()
    local path = dir .. "/args.safetensors"
    fails("safetensors.save: path must be a string, got nil", st.save, nil, {})
    fails("safetensors.save: path must not be empty", st.save, "", {})
    fails("safetensors.save: tensors must be a list of {name, tensor} pairs or a map name -> tensor, got tensor",
          st.save, path, moe.ones({1}))
    fails("tensors[1] must be a {name, tensor} pair, got tensor", st.save, path, {moe.ones({1})})
    fails("tensors[1][1] (the name) must be a string, got number", st.save, path, {{1, moe.ones({1})}})
    fails("mixes list entries and named entries", st.save, path, {{"a", moe.ones({1})}, b = moe.ones({1})})
    fails("metadata['k'] must be a string", st.save, path, {}, {k = true})
    fails("metadata keys must be strings", st.save, path, {}, {"positional"})
    fails("metadata must be a table of strings, got string", st.save, path, {}, "x")
    fails("cannot create temp file", st.save, dir .. "/no/such/dir/x.safetensors", {})
    -- an empty checkpoint is valid
    st.save(path, {})
    assert.are.same({}, st.info(path))
  end)

  describe("refuses broken files with a clear error", function()
    local good
    before_each(function()
      good = dir .. "/good.safetensors"
      st.save(good, {{"w", moe.randn({4, 4}, {seed = 1})}, {"b", moe.zeros({4})}})
    end)

    it("nonexistent path", function()
      local msg = fails("safetensors.load", st.load, dir .. "/missing.safetensors")
      assert.truthy(msg:find("missing.safetensors: cannot open: No such file", 1, true), msg)
      fails("cannot open", st.info, dir .. "/missing.safetensors")
      fails("path must be a string, got number", st.load, 42)
    end)

    it("truncated file", function()
      local bytes = read_bytes(good)
      local path = dir .. "/trunc.safetensors"
      write_bytes(path, bytes:sub(1, #bytes - 10))
      fails("tensor 'b': data_offsets [64, 80] reach past the data (70 bytes)", st.load, path)
      write_bytes(path, bytes .. "extra")
      fails("the data has 85 bytes but the tensors cover only 80", st.load, path)
      write_bytes(path, bytes:sub(1, 40))
      local msg = fails("exceeds the", st.load, path)
      assert.truthy(msg:find(path, 1, true), "message names the file: " .. msg)
      write_bytes(path, bytes:sub(1, 5))
      fails("too small for the 8-byte header length", st.load, path)
      write_bytes(path, "")
      fails("too small", st.info, path)
    end)

    it("corrupted header", function()
      local bytes = read_bytes(good)
      local path = dir .. "/corrupt.safetensors"
      write_bytes(path, bytes:sub(1, 12) .. "#" .. bytes:sub(14))
      fails("header is not valid JSON", st.load, path)
      raw_file(path, "not json", "")
      fails("header is not a JSON object", st.load, path)
      raw_file(path, '{"w": 5}', "")
      fails("tensor 'w': entry must be an object", st.load, path)
      raw_file(path, '{"w": {"dtype": "F32", "data_offsets": [0, 4]}}', "abcd")
      fails("tensor 'w': missing or non-array shape", st.load, path)
    end)

    it("offsets out of range", function()
      local path = dir .. "/range.safetensors"
      raw_file(path, '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}', "abcd")
      local msg = fails("tensor 'w': data_offsets [0, 8] reach past the data (4 bytes)", st.load, path)
      assert.truthy(msg:find(path, 1, true))
      raw_file(path, '{"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4]}}', "abcd")
      fails("tensor 'w': F32 with 2 elements needs 8.0 bytes, data_offsets hold 4", st.load, path)
      raw_file(path, '{"w": {"dtype": "U8", "shape": [2], "data_offsets": [-1, 1]}}', "ab")
      fails("data_offsets must be [begin, end] with non-negative integers", st.load, path)
    end)

    it("bad dtype", function()
      local path = dir .. "/dtype.safetensors"
      raw_file(path, '{"w": {"dtype": "Q7", "shape": [1], "data_offsets": [0, 1]}}', "a")
      fails("tensor 'w': unknown dtype 'Q7'", st.load, path)
      -- a valid safetensors dtype moelab cannot hold: listed, not loaded
      raw_file(path, '{"w": {"dtype": "F8_E4M3", "shape": [1], "data_offsets": [0, 1]}}', "a")
      assert.are.equal("F8_E4M3", st.info(path)[1].dtype)
      fails("tensor 'w' has dtype F8_E4M3, which moelab cannot load", st.load, path)
    end)
  end)

  describe("reads a file written by Python's safetensors", function()
    local path = "tests/fixtures/tiny.safetensors"

    it("with the values make_safetensors.py wrote", function()
      local t, meta = st.load(path)
      assert.are.same({format = "np", producer = "make_safetensors.py"}, meta)
      assert.are.same({2, 3, 4}, t.f32:shape())
      for i = 0, 1 do for j = 0, 2 do for k = 0, 3 do
        assert.are.equal(0.5 * (12 * i + 4 * j + k) - 3, t.f32:get(i + 1, j + 1, k + 1))
      end end end
      for i = 1, 5 do assert.are.equal(1 / i, t.f64:get(i)) end
      assert.are.equal("f16", t.f16:dtype())
      assert.are.same({{-1, -0.75}, {-0.5, -0.25}, {0, 0.25}}, t.f16:to_table())
      assert.are.same({-2 ^ 40, -1, 0, 2 ^ 40 + 7}, t.i64:to_table())
      assert.are.same({{-7, 8}, {9, -10}}, t.i32:to_table())
      assert.are.same({-128, -1, 0, 127}, t.i8:to_table())
      for i = 0, 6 do assert.are.equal(i * 37 % 256, t.u8:get(i + 1)) end
      assert.are.equal("u8", t.bool:dtype())
      assert.are.same({1, 0, 1}, t.bool:to_table())
      assert.are.equal(0, t.scalar:dim())
      assert.are.equal(2.25, t.scalar:item())
      assert.are.same({0, 3}, t.empty:shape())
      assert.are.equal(28, t["layers.0.mlp.experts.3.w1"]:sum():item())
      local bf = st.load(path, {dtype = "bf16", names = {"f32"}}).f32
      assert.are.equal(8.5, bf:get(2, 3, 4))
    end)

    it("and Python reads what moelab writes", function()
      local ok = os.execute("python3 -c 'import safetensors, numpy' >/dev/null 2>&1")
      if ok ~= 0 and ok ~= true then
        pending("python3 with safetensors and numpy is not installed")
        return
      end
      local out = dir .. "/for_python.safetensors"
      st.save(out, {{"b", moe.tensor({1, 2, 3}, {dtype = "u8"})}, {"a", moe.arange(6):view(2, 3)},
                    {"c", moe.tensor({-5}, {dtype = "i64"})}, {"s", moe.full({}, 0.25, {dtype = "f16"})}},
              {note = "from moelab"})
      local script = dir .. "/check.py"
      write_bytes(script, table.concat({
        "import sys",
        "from safetensors import safe_open",
        "with safe_open(sys.argv[1], 'np') as f:",
        "    m = f.metadata()",
        "    t = {k: f.get_tensor(k) for k in f.keys()}",
        "assert m == {'note': 'from moelab'}, m",
        "assert t['a'].tolist() == [[0, 1, 2], [3, 4, 5]], t['a']",
        "assert t['b'].tolist() == [1, 2, 3] and t['b'].dtype.name == 'uint8'",
        "assert t['c'].tolist() == [-5] and t['c'].dtype.name == 'int64'",
        "assert t['s'].shape == () and float(t['s']) == 0.25 and t['s'].dtype.name == 'float16'",
        "print('python ok')",
      }, "\n"))
      local p = io.popen("python3 '" .. script .. "' '" .. out .. "' 2>&1")
      local res = p:read("*a")
      p:close()
      assert.are.equal("python ok\n", res)
    end)
  end)
end)

describe("moe.io files", function()
  local dir
  before_each(function() dir = tmpdir() end)
  after_each(function() os.execute("rm -rf '" .. dir .. "'") end)

  it("writes atomically, reads back, makes directories", function()
    local sub = dir .. "/a/b//c"
    mio.mkdir_p(sub)
    mio.mkdir_p(sub)   -- existing is fine
    local path = sub .. "/config.json"
    local data = "line 1\n\0binary\255"
    mio.write_file_atomic(path, data)
    assert.are.equal(data, mio.read_file(path))
    mio.write_file_atomic(path, "")
    assert.are.equal("", mio.read_file(path))
    assert.are.same({"config.json"}, ls(sub))
  end)

  it("reports errors naming the function and the path", function()
    fails("io.read_file: " .. dir .. "/nope: cannot open", mio.read_file, dir .. "/nope")
    fails("io.read_file: " .. dir .. ": not a regular file", mio.read_file, dir)
    fails("io.write_file_atomic: data must be a string, got nil", mio.write_file_atomic, dir .. "/x", nil)
    fails("io.write_file_atomic: path must be a string", mio.write_file_atomic, nil, "x")
    mio.write_file_atomic(dir .. "/file", "x")
    fails("exists and is not a directory", mio.mkdir_p, dir .. "/file/sub")
    fails("io.mkdir_p: path must not be empty", mio.mkdir_p, "")
  end)
end)

describe("moe.io.json", function()
  local json = mio.json

  it("round-trips nested values", function()
    local v = {
      name = "moe", layers = 4, ratio = 0.125, neg = -3, flag = true, off = false,
      experts = {1, 2, 3}, nested = {a = {b = {c = "deep"}}}, empty = {},
      text = 'quotes " and \\ and \n newline and ünïcödé',
    }
    for _, opts in ipairs({{}, {indent = true}}) do
      local s = json.encode(v, opts)
      assert.are.same(v, json.decode(s))
    end
    assert.are.equal('{"a":1,"b":[true,false],"c":"x"}', json.encode({c = "x", a = 1, b = {true, false}}))
    assert.are.equal("[1,2,3]", json.encode({1, 2, 3}))
    assert.are.equal("{}", json.encode({}))
    assert.are.equal("null", json.encode(nil))
    assert.are.equal("3", json.encode(3))
    assert.are.equal('"s"', json.encode("s"))
    assert.are.equal('{\n  "a": [1, 2],\n  "b": {\n    "c": null\n  }\n}', json.encode({a = {1, 2}, b = {c = json.null}}, {indent = true}))
  end)

  it("decodes null as nil, and as json.null inside arrays", function()
    assert.are.same({a = 1}, json.decode('{"a": 1, "b": null}'))
    local arr = json.decode("[1, null, 3]")
    assert.are.equal(3, #arr)
    assert.are.equal(json.null, arr[2])
    assert.are.equal("[1,null,3]", json.encode(arr))
    assert.is_nil(json.decode(" null "))
    assert.are.equal(2 ^ 40, json.decode("1099511627776"))
  end)

  it("refuses values JSON cannot hold", function()
    fails("json.encode: cannot encode a function (at $.f)", json.encode, {f = print})
    fails("json.encode: cannot encode a tensor (at $.w[2])", json.encode, {w = {1, moe.ones({1})}})
    local cyc = {a = {}}
    cyc.a.back = cyc
    fails("table contains itself (a cycle) (at $.a.back)", json.encode, cyc)
    local shared = {1}
    assert.are.equal('{"x":[1],"y":[1]}', json.encode({x = shared, y = shared}))   -- shared is not a cycle
    fails("NaN and infinity have no JSON form (at $.x)", json.encode, {x = 0 / 0})
    fails("NaN and infinity", json.encode, math.huge)
    fails("object keys must be strings, got a number key", json.encode, {1, 2, [4] = 4})
    fails("object keys must be strings, got a boolean key", json.encode, {[true] = 1})
    fails("json.encode: options must be a table", json.encode, {}, "indent")
    fails("option 'indent' must be a boolean", json.encode, {}, {indent = 2})
    local deep = {}
    local cur = deep
    for _ = 1, 1100 do cur.x = {}; cur = cur.x end
    fails("nesting deeper than 1000 levels", json.encode, deep)
  end)

  it("refuses invalid JSON with its position", function()
    fails("json.decode: invalid JSON at line 2", json.decode, '{"a": 1,\n "b": }')
    fails("invalid JSON", json.decode, '{"a": 1} extra')
    fails("invalid JSON", json.decode, "[1, 2")
    fails("json.decode: empty string is not JSON", json.decode, "")
    fails("json.decode: text must be a string, got no value", json.decode)
    fails("json.decode: text must be a string, got table", json.decode, {})
  end)
end)
