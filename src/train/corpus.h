/* The built-in synthetic corpus: documents from four domains with clearly
 * different statistics (arithmetic, code, records, prose), so a model trained
 * on it shows routing specialisation without any download. Document i is a
 * pure function of (seed, i): the same seed gives the same bytes on every
 * platform, and a longer corpus extends a shorter one. All text is ASCII. */
#ifndef MOE_CORPUS_H
#define MOE_CORPUS_H

#include <stdint.h>

#include "../core/status.h"

typedef enum {
    MOE_DOMAIN_ARITHMETIC = 0,   /* "37 + 58 = 95." lines, always correct */
    MOE_DOMAIN_CODE,             /* small C- and Lua-like functions */
    MOE_DOMAIN_RECORDS,          /* key=value, JSON-ish and CSV records */
    MOE_DOMAIN_PROSE,            /* sentences from a small grammar */
    MOE_CORPUS_NUM_DOMAINS
} moe_corpus_domain;

typedef struct {
    char *text;            /* all documents back to back, NUL-terminated (malloc) */
    int64_t num_bytes;     /* excluding the NUL */
    int64_t num_docs;
    int64_t *doc_offsets;  /* num_docs + 1 entries: doc i is text[off[i], off[i+1]) */
    int32_t *doc_domains;  /* num_docs entries, moe_corpus_domain values */
} moe_corpus;

/* "arithmetic", "code", "records", "prose"; NULL for an unknown id. */
const char *moe_corpus_domain_name(int domain);

/* Exactly one of num_docs, num_bytes is > 0 (the other 0). With num_docs the
 * corpus holds that many whole documents; with num_bytes it holds exactly that
 * many bytes, the last document cut short. Each document ends with a blank
 * line, so documents are visibly separated in the concatenated text. On
 * failure *out is left empty. */
moe_status moe_corpus_generate(uint64_t seed, int64_t num_docs, int64_t num_bytes, moe_corpus *out);
void moe_corpus_free(moe_corpus *c);

/* Writes document `index` of the corpus with this seed into buf (at most cap
 * bytes, NUL-terminated when cap > 0) and returns its full length and domain,
 * like snprintf: regenerates one document without building the corpus. */
int64_t moe_corpus_document(uint64_t seed, int64_t index, char *buf, int64_t cap, int *domain);

#endif
