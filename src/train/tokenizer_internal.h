/* Internals shared by tokenizer.c (loading, lookups, decode) and
 * tokenizer_encode.c (normalize, added tokens, pre-tokenize, BPE). */
#ifndef MOE_TRAIN_TOKENIZER_INTERNAL_H
#define MOE_TRAIN_TOKENIZER_INTERNAL_H

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <stdint.h>
#include <stddef.h>

#include "tokenizer.h"

#define TK_MAX_NORM 8
#define TK_MAX_PRE 8

typedef struct { uint32_t off, len; } tk_str;   /* a string in tk->strs */

/* string -> id: open addressing over ids, keys are tk->tok[id] */
typedef struct { int32_t *slot; uint32_t mask; } tk_strmap;

/* (left id, right id) -> (rank, merged id) */
typedef struct {
    uint64_t *key;      /* ((a << 32) | b) + 1; 0 = empty */
    int32_t *rank, *merged;
    uint64_t mask;
} tk_pairmap;

/* byte trie of added-token contents; the root is a 256-way table */
typedef struct { int32_t first, next, tok; uint8_t c; } tk_trie_node;
typedef struct {
    int32_t root[256];          /* node index or -1 */
    tk_trie_node *nodes;
    int32_t n, cap;
    int count;                  /* tokens in it */
} tk_trie;

typedef struct {
    int32_t id;
    tk_str content;             /* as matched: normalized when "normalized" */
    uint8_t special, normalized, lstrip, rstrip;
} tk_added;

enum { TK_NORM_NFC, TK_NORM_NFD, TK_NORM_NFKC, TK_NORM_NFKD };
enum { TK_SPLIT_REMOVED, TK_SPLIT_ISOLATED, TK_SPLIT_PREV, TK_SPLIT_NEXT, TK_SPLIT_CONTIGUOUS };

typedef struct {
    pcre2_code *re;
    pcre2_match_data *md;
    int behavior, invert;
} tk_split;

/* word cache: word bytes -> ids, cleared when full */
typedef struct {
    uint64_t *hash;             /* 0 = empty slot */
    uint32_t *koff, *klen, *voff, *vlen;
    uint32_t mask, count;
    char *keys; size_t keys_n, keys_cap;
    int32_t *vals; size_t vals_n, vals_cap;
} tk_cache;

struct moe_tokenizer {
    char *origin;
    /* strings */
    char *strs; size_t strs_n, strs_cap;
    tk_str *tok;                /* id -> token string; len UINT32_MAX = unassigned */
    int64_t ntok;               /* vocab_size: max id + 1 */
    tk_strmap vocab;            /* model vocab + added tokens (added win) */
    tk_strmap model_vocab;      /* model vocab only, for merges and chars */
    tk_pairmap merges;
    int64_t nmerges, model_size;
    int32_t unk_id;             /* -1: none */
    int fuse_unk;
    int ignore_merges;          /* a word that is a token is not split */
    /* added tokens */
    tk_added *added; int nadded;
    uint8_t *special;           /* id -> special flag (ntok bytes) */
    tk_trie trie_raw, trie_norm;
    /* normalizer */
    int norm[TK_MAX_NORM]; int nnorm;
    /* pre-tokenizer */
    tk_split split[TK_MAX_PRE]; int nsplit;
    int byte_level;             /* a ByteLevel step: bytes -> mapped chars */
    int add_prefix_space;
    int32_t byte_id[256];       /* byte-level: id of each byte's char, -1 none */
    /* decoder */
    int decoder_byte_level;
    char desc[512];
    /* scratch (encode is not reentrant) */
    tk_cache cache;
    uint32_t *pieces; size_t pieces_cap;      /* (off, len) pairs */
    uint32_t *pieces2; size_t pieces2_cap;
    int32_t *sym; int32_t *nxt, *prv, *rnk; size_t sym_cap;
    uint64_t *heap; size_t heap_cap;
    char *buf; size_t buf_cap;                /* prefix-space copy */
    char *wbuf; size_t wbuf_cap;              /* a word spelled byte-level */
};

/* GPT-2 byte <-> unicode code point mapping */
extern uint16_t moe_tk_byte_to_cp[256];
int moe_tk_cp_to_byte(uint32_t cp);           /* -1 when not a mapped char */

/* UTF-8: length of the valid character at s[0..n) (1..4), or 0 when invalid,
 * with *bad set to the maximal invalid subpart (>= 1). */
int moe_tk_utf8_char(const unsigned char *s, size_t n, uint32_t *cp, int *bad);
/* Copies s, replacing invalid sequences by U+FFFD; malloc'd. */
char *moe_tk_utf8_lossy(const char *s, size_t n, size_t *out_n);
/* 1 when s[0..n) is valid UTF-8 */
int moe_tk_utf8_valid(const char *s, size_t n);

int32_t moe_tk_strmap_get(const moe_tokenizer *tk, const tk_strmap *m, const char *s, size_t n);
uint64_t moe_tk_hash(const void *p, size_t n);
int moe_tk_pair_get(const tk_pairmap *m, int32_t a, int32_t b, int32_t *merged);   /* rank or -1 */

void moe_tk_scratch_free(moe_tokenizer *tk);

#endif
