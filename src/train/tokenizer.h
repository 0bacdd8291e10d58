/* Tokenizers from Hugging Face tokenizer.json files (byte-level BPE as used by
 * GPT-2/GPT-NeoX/OLMoE and cl100k-style files such as dolma2).
 *
 * What a file may hold (anything else fails to load with a message naming it):
 *   model          BPE: vocab, merges ("a b" strings or ["a", "b"] pairs),
 *                  unk_token/fuse_unk; dropout must be null or 0,
 *                  continuing_subword_prefix / end_of_word_suffix empty or null,
 *                  byte_fallback false
 *   normalizer     null, NFC, NFD, NFKC, NFKD, or a Sequence of these (utf8proc)
 *   pre_tokenizer  null, ByteLevel {add_prefix_space, use_regex (the GPT-2
 *                  regex)}, Split {pattern {Regex|String}, behavior Removed |
 *                  Isolated | MergedWithPrevious | MergedWithNext | Contiguous,
 *                  invert}, or a Sequence of these (ByteLevel last, its
 *                  add_prefix_space only as the first step); regexes run on
 *                  PCRE2 (UTF + UCP, JIT when available)
 *   added_tokens   matched first, exactly and leftmost-longest: those with
 *                  "normalized": false on the raw text, the others on the
 *                  normalized text; lstrip/rstrip honoured; single_word: true
 *                  is refused
 *   decoder        null (tokens joined by spaces) or ByteLevel
 *   post_processor ignored: encode never adds BOS/EOS or other template tokens
 *                  (the two reference files have none to add)
 *
 * Encode: invalid UTF-8 in the input is first replaced by U+FFFD (one per
 * maximal invalid subsequence, as Python's errors="replace"), then
 * added tokens → normalize → pre-tokenize → BPE per word (merge ranks, cached
 * per word) → ids. Decode: ids → token strings → bytes (ByteLevel) → UTF-8
 * with invalid sequences replaced by U+FFFD, as the HF library does.
 *
 * A tokenizer is immutable after loading except for its word cache and
 * scratch buffers: encode on one tokenizer must not run on two threads at once
 * (use one tokenizer per thread). Every function returns a status or NULL
 * with the message set (status.h). */
#ifndef MOE_TRAIN_TOKENIZER_H
#define MOE_TRAIN_TOKENIZER_H

#include <stddef.h>
#include <stdint.h>

#include "../core/status.h"

typedef struct moe_tokenizer moe_tokenizer;

/* Loads a tokenizer.json file. */
moe_tokenizer *moe_tokenizer_from_file(const char *path);
/* From JSON text; `origin` names it in messages (a path, or "<string>"). */
moe_tokenizer *moe_tokenizer_from_json(const char *json, size_t len, const char *origin);
void moe_tokenizer_free(moe_tokenizer *tk);

/* A growable list of ids. */
typedef struct {
    int32_t *ids;
    size_t n, cap;
} moe_token_ids;
void moe_token_ids_free(moe_token_ids *v);

/* Appends the ids of text[0..len) to out (which may start zeroed). */
moe_status moe_tokenizer_encode(moe_tokenizer *tk, const char *text, size_t len, moe_token_ids *out);

/* ids -> malloc'd NUL-terminated UTF-8 string (*out_len excludes the NUL).
 * skip_special drops added tokens marked "special". An id outside
 * [0, vocab_size) or without a token is MOE_ERR_RANGE, naming its position. */
moe_status moe_tokenizer_decode(const moe_tokenizer *tk, const int64_t *ids, size_t n, int skip_special,
                                char **out, size_t *out_len);

/* max id + 1 over the model's vocab and the added tokens: the number of rows
 * an embedding needs (50280 for GPT-NeoX-20B, 100278 for dolma2). */
int64_t moe_tokenizer_vocab_size(const moe_tokenizer *tk);
/* The id of a token string (added tokens first, then the vocab); -1 when none. */
int64_t moe_tokenizer_token_to_id(const moe_tokenizer *tk, const char *s, size_t len);
/* The token string of an id (as stored: byte-level tokens in their mapped
 * form, e.g. "Ġthe"); NULL when out of range or unassigned (no message set). */
const char *moe_tokenizer_id_to_token(const moe_tokenizer *tk, int64_t id, size_t *len);
/* 1 when the id is an added token marked special. */
int moe_tokenizer_is_special(const moe_tokenizer *tk, int64_t id);
/* One line describing it: "Tokenizer(BPE, vocab 50280, normalizer NFC, ...)". */
const char *moe_tokenizer_describe(const moe_tokenizer *tk);

#endif
