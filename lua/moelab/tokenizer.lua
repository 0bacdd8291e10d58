--- Tokenizers from Hugging Face tokenizer.json files (moe.tokenizer): byte-level
-- BPE as in GPT-2 / GPT-NeoX / OLMoE and cl100k-style files such as OLMo 2's
-- dolma2, with their normalizers, pre-tokenizer regexes and added tokens.
-- A thin face over moelab.core (src/lua/tokenizer.c, src/train/tokenizer.h,
-- which lists what a file may hold).
--
--   local tok = moe.tokenizer.from_file("tokenizer.json")
--   local ids = tok:encode("Hello world")          -- {id, ...}, 0-based ids as in the file
--   local t = tok:encode_tensor("Hello world")     -- i64 tensor [n]
--   tok:decode(ids)                                 -- "Hello world" (also takes a tensor)
--   tok:decode(ids, {skip_special_tokens = true})   -- drops <|endoftext|> and the like
--   tok:vocab_size()                                -- max id + 1 (embedding rows needed)
--   tok:token_to_id("<|endoftext|>"), tok:id_to_token(0), tok:is_special(0)
--
-- encode never adds BOS/EOS (post_processor is not applied); add them
-- yourself: {tok:token_to_id("<|endoftext|>"), ...}. Invalid UTF-8 in the
-- text becomes U+FFFD first; decode replaces invalid byte sequences by
-- U+FFFD, as the HF library does. Ids match the HF `tokenizers` library's
-- encode(text, add_special_tokens=False) (tests/tokenizer_spec.lua). One
-- tokenizer must not encode on two threads at once (its word cache).
local core = require "moelab.core"

local M = {}

--- moe.tokenizer.from_file(path) -> tokenizer. Errors name the file and the
-- problem: a missing file, malformed JSON, an unsupported model type,
-- normalizer, pre-tokenizer or decoder.
function M.from_file(path)
  if type(path) ~= "string" then
    error(string.format("tokenizer.from_file: path must be a string, got %s", type(path)), 2)
  end
  return core.tokenizer_from_file(path)
end

--- True for a tokenizer made by this module.
M.is_tokenizer = core.is_tokenizer

return M
