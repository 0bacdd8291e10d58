-- Tokenizers from tokenizer.json (moelab.tokenizer, src/train/tokenizer*.c):
-- ids identical to the Hugging Face `tokenizers` library for the two
-- reference files (fixture: tests/fixtures/tokenizer_refs.json, made by
-- tests/fixtures/make_tokenizer_refs.py), round trips, lookups, and the errors
-- bad files and bad ids raise. The parity part needs ../shared/data/tokenizers
-- and is pending without it; the rest runs on small hand-made files.
local moe = require "moelab"
local tokenizer = require "moelab.tokenizer"
local files = require "tests.helpers.files"

local SHARED = "../shared/data/tokenizers/"
local NEOX = SHARED .. "gpt-neox-20b-pii-special.json"
local DOLMA2 = SHARED .. "dolma2.json"

local function errmsg(f, ...)
  local ok, msg = pcall(f, ...)
  assert.is_false(ok)
  return tostring(msg)
end

local function write(path, s)
  local f = assert(io.open(path, "wb"))
  f:write(s)
  f:close()
end

local dir = files.tmpdir()
teardown(files.cleanup)
local n_written = 0
local function json_file(t)
  n_written = n_written + 1
  local p = dir .. "/tok" .. n_written .. ".json"
  write(p, type(t) == "string" and t or moe.io.json.encode(t))
  return p
end

-- a tiny char-level BPE: a b c, "ab", "abc", unk
local function tiny(over)
  local t = {
    version = "1.0",
    model = {type = "BPE", vocab = {a = 0, b = 1, c = 2, ab = 3, abc = 4, ["<unk>"] = 5},
             merges = {"a b", {"ab", "c"}}, unk_token = "<unk>"},
    added_tokens = {
      {id = 6, content = "<x>", special = true, normalized = false, lstrip = false, rstrip = true, single_word = false},
      {id = 7, content = "<xy>", special = false, normalized = false, lstrip = true, rstrip = false, single_word = false},
    },
  }
  for k, v in pairs(over or {}) do t[k] = v end
  return tokenizer.from_file(json_file(t))
end

describe("tokenizer: small hand-made files", function()
  it("applies merges by rank and maps unknown characters to unk", function()
    local tok = tiny()
    assert.same({4}, tok:encode("abc"))
    assert.same({3, 4}, tok:encode("ababc"))
    assert.same({0, 5, 1}, tok:encode("azb"))
    assert.same({}, tok:encode(""))
    assert.equal(8, tok:vocab_size())
    assert.equal("ab", tok:id_to_token(3))
    assert.equal(3, tok:token_to_id("ab"))
    assert.is_nil(tok:token_to_id("zzz"))
    assert.matches("BPE", tostring(tok))
    assert.is_true(tokenizer.is_tokenizer(tok))
    assert.is_false(tokenizer.is_tokenizer({}))
  end)

  it("matches added tokens first, with rstrip / lstrip, and decodes without a decoder by joining with spaces", function()
    local tok = tiny()
    assert.same({0, 6, 1}, tok:encode("a<x>   b"))     -- rstrip takes the spaces after <x>
    assert.same({0, 7, 1}, tok:encode("a  <xy>b"))     -- lstrip the ones before <xy>
    assert.same({6, 6}, tok:encode("<x><x>"))
    assert.equal("ab c", tok:decode({3, 2}))
    assert.equal("a <x> b", tok:decode({0, 6, 1}))
    assert.equal("a b", tok:decode({0, 6, 1}, {skip_special_tokens = true}))
    assert.is_true(tok:is_special(6))
    assert.is_false(tok:is_special(7))
  end)

  -- expected ids checked against the HF tokenizers library 0.23.3 on the same files
  it("splits with a Split pre-tokenizer in each behaviour", function()
    local function split(behavior, invert)
      return tiny{pre_tokenizer = {type = "Split", pattern = {String = "c"}, behavior = behavior, invert = invert or false}}
    end
    assert.same({3, 2, 3}, split("Isolated"):encode("abcab"))
    assert.same({3, 3}, split("Removed"):encode("abcab"))
    assert.same({4, 3}, split("MergedWithPrevious"):encode("abcab"))
    assert.same({3, 2, 3}, split("MergedWithNext"):encode("abcab"))       -- "ab" "cab"
    assert.same({4, 2, 3}, split("MergedWithPrevious"):encode("abccab"))  -- "abc" "c" "ab"
    assert.same({3, 2, 2, 3}, split("MergedWithNext"):encode("abccab"))   -- "ab" "c" "cab"
    assert.same({3, 2, 2, 3}, split("Contiguous"):encode("abccab"))
    assert.same({2, 2}, split("Removed", true):encode("abccab"))   -- inverted: keep the matches
    local re = tiny{pre_tokenizer = {type = "Sequence", pretokenizers = {
      {type = "Split", pattern = {Regex = "\\s+"}, behavior = "Removed", invert = false}}}}
    assert.same({4, 3, 0}, re:encode("abc \t ab\na"))
  end)

  it("replaces invalid UTF-8 in the text by U+FFFD and keeps NUL bytes", function()
    local tok = tiny()
    assert.same(tok:encode("a\239\191\189b"), tok:encode("a\255b"))
    assert.same({0, 5, 1}, tok:encode("a\0b"))
  end)

  it("normalizes with NFC before matching normalized added tokens", function()
    local tok = tiny{normalizer = {type = "NFC"}, added_tokens = {
      {id = 6, content = "é", special = false, normalized = true}}}
    assert.same({0, 6, 1}, tok:encode("ae\204\129b"))   -- "e" + U+0301 composes to é
  end)

  it("raises clear errors for bad files", function()
    assert.matches("tokenizer.from_file: .*no_such_file.json", errmsg(tokenizer.from_file, dir .. "/no_such_file.json"))
    assert.matches("path must be a string", errmsg(tokenizer.from_file, 42))
    assert.matches("malformed JSON", errmsg(tokenizer.from_file, json_file("{\"model\": {")))
    assert.matches("unsupported model type 'WordPiece'",
      errmsg(tokenizer.from_file, json_file{model = {type = "WordPiece", vocab = {a = 0}}}))
    assert.matches("unsupported normalizer type 'Lowercase'", errmsg(tiny, {normalizer = {type = "Lowercase"}}))
    assert.matches("unsupported pre_tokenizer type 'Whitespace'", errmsg(tiny, {pre_tokenizer = {type = "Whitespace"}}))
    assert.matches("unsupported decoder type 'WordPiece'", errmsg(tiny, {decoder = {type = "WordPiece"}}))
    assert.matches("single_word", errmsg(tiny, {added_tokens = {{id = 6, content = "<x>", single_word = true}}}))
    assert.matches("does not compile", errmsg(tiny, {pre_tokenizer = {type = "Split", pattern = {Regex = "(a"},
      behavior = "Isolated"}}))
    assert.matches("merge 0: token 'q' is not in the vocab",
      errmsg(tokenizer.from_file, json_file{model = {type = "BPE", vocab = {a = 0}, merges = {"a q"}}}))
    assert.matches("no 'model' object", errmsg(tokenizer.from_file, json_file{version = "1.0"}))
  end)

  it("raises clear errors for bad ids and arguments", function()
    local tok = tiny()
    assert.matches("id 8 at position 2 is out of range %[0, 8%)", errmsg(tok.decode, tok, {0, 8}))
    assert.matches("id %-1 at position 1 is out of range", errmsg(tok.decode, tok, {-1}))
    assert.matches("ids%[2%] must be an integer, got 1.5", errmsg(tok.decode, tok, {0, 1.5}))
    assert.matches("ids must be a table of integers or a tensor", errmsg(tok.decode, tok, "ab"))
    assert.matches("unknown option 'skip'", errmsg(tok.decode, tok, {0}, {skip = true}))
    assert.matches("id 99 is out of range", errmsg(tok.id_to_token, tok, 99))
    assert.matches("text must be a string, got table", errmsg(tok.encode, tok, {}))
    assert.matches("expected a tokenizer as self", errmsg(tok.encode, "abc"))
    assert.matches("id 9 at position 1 is out of range", errmsg(tok.decode, tok, moe.tensor({9}, {dtype = "i64"})))
  end)
end)

local function have_shared()
  return files.exists(NEOX) and files.exists(DOLMA2)
end

describe("tokenizer: parity with the HF tokenizers library", function()
  local refs, toks
  local function setup()
    if not have_shared() then return false end
    if not refs then
      refs = moe.io.json.decode(files.read("tests/fixtures/tokenizer_refs.json"))
      toks = {neox = tokenizer.from_file(NEOX), dolma2 = tokenizer.from_file(DOLMA2)}
    end
    return true
  end

  it("gives the same ids for every text with both files", function()
    if not setup() then pending("needs ../shared/data/tokenizers"); return end
    assert.is_true(#refs.cases >= 30)
    for _, c in ipairs(refs.cases) do
      for name, tok in pairs(toks) do
        local ids = tok:encode(c.text)
        if #ids ~= #c[name] then
          error(string.format("%s / %s: %d ids, expected %d", name, c.name, #ids, #c[name]))
        end
        for i = 1, #ids do
          if ids[i] ~= c[name][i] then
            error(string.format("%s / %s: id %d is %d, expected %d", name, c.name, i, ids[i], c[name][i]))
          end
        end
      end
    end
  end)

  it("decodes as the HF library does: decode(encode(s)) == NFC(s) for NeoX, s for dolma2", function()
    if not setup() then pending("needs ../shared/data/tokenizers"); return end
    for _, c in ipairs(refs.cases) do
      assert.equal(c.neox_decoded, toks.neox:decode(c.neox), c.name)
      assert.equal(c.dolma2_decoded, toks.dolma2:decode(c.dolma2), c.name)
      assert.equal(c.nfc, toks.neox:decode(toks.neox:encode(c.text)), c.name)
      assert.equal(c.text, toks.dolma2:decode(toks.dolma2:encode(c.text)), c.name)
    end
  end)

  it("encode_tensor gives the ids as an i64 tensor, and decode takes it", function()
    if not setup() then pending("needs ../shared/data/tokenizers"); return end
    local s = "Hello <|endoftext|> wörld 123456"
    for _, tok in pairs(toks) do
      local t = tok:encode_tensor(s)
      assert.equal("i64", t:dtype())
      assert.same(tok:encode(s), t:to_table())
      assert.equal(s, tok:decode(t))
    end
  end)

  it("knows the vocab sizes, special tokens and lookups", function()
    if not setup() then pending("needs ../shared/data/tokenizers"); return end
    assert.equal(50280, toks.neox:vocab_size())
    assert.equal(100278, toks.dolma2:vocab_size())
    assert.equal(0, toks.neox:token_to_id("<|endoftext|>"))
    assert.equal(100257, toks.dolma2:token_to_id("<|endoftext|>"))
    assert.equal(50277, toks.neox:token_to_id("|||EMAIL_ADDRESS|||"))
    assert.equal("Ġthe", toks.neox:id_to_token(toks.neox:token_to_id("Ġthe")))
    assert.is_true(toks.neox:is_special(0))
    assert.is_false(toks.neox:is_special(50277))
    assert.equal("a b", toks.neox:decode(toks.neox:encode("a<|endoftext|> b"), {skip_special_tokens = true}))
    -- bytes that are not UTF-8 decode to U+FFFD, as in the HF library
    assert.equal("\11\239\191\189", toks.neox:decode({188, 99}))
    assert.matches("vocab_size 50280", tostring(toks.neox))
    assert.matches("id 50280 at position 1 is out of range %[0, 50280%)", errmsg(toks.neox.decode, toks.neox, {50280}))
  end)

  it("encodes all of tinyshakespeare (when present) like its first 20 KB", function()
    if not setup() then pending("needs ../shared/data/tokenizers"); return end
    local path = "../shared/data/text/tinyshakespeare.txt"
    if not files.exists(path) then pending("needs ../shared/data/text/tinyshakespeare.txt"); return end
    local text = files.read(path)
    local ids = toks.neox:encode(text)
    assert.equal(340240, #ids)   -- the HF library's count (bench/tokenizer_hf.py)
    assert.equal(301829, toks.dolma2:encode_tensor(text):shape()[1])
    assert.equal(text, toks.neox:decode(ids))
  end)
end)
