/* Private to src/train/dataset.c and src/train/sampler.c: the shared token
 * storage and the view over it. */
#ifndef MOE_DATASET_INTERNAL_H
#define MOE_DATASET_INTERNAL_H

#include <stddef.h>
#include <stdint.h>

#include "dataset.h"

/* Token storage shared by a dataset and its splits. Exactly one of owned /
 * map holds the ids. Document offsets count tokens from the storage start. */
typedef struct {
    int refcount;
    const void *tokens;
    int width;                /* 1, 2 or 4 bytes per id */
    int64_t n;
    int64_t vocab;
    int byte_level;
    void *owned;              /* malloc'd ids, or NULL */
    void *map;                /* mmap'd file, or NULL */
    size_t map_len;
    int64_t num_docs;         /* 0: no boundaries */
    int64_t *doc_off;         /* num_docs + 1 */
    int32_t *doc_dom;         /* num_docs, or NULL */
    int num_domains;
    const char *const *domain_names;   /* static strings */
} moe_token_store;

struct moe_dataset {
    moe_token_store *store;
    int64_t begin, end;       /* the view, in storage positions */
    /* cache of the last shuffled window order (see moe_dataset_window_batch) */
    int64_t *perm;
    int64_t perm_n, perm_seq_len;
    uint64_t perm_seed, perm_epoch;
};

/* Copies tokens [begin, begin + n) of the storage into out as int64. */
void moe_store_read(const moe_token_store *s, int64_t begin, int64_t n, int64_t *out);
/* Index of the document holding storage position pos (num_docs > 0). */
int64_t moe_store_doc_of(const moe_token_store *s, int64_t pos);
/* Domain labels of tokens [begin, begin + n) into out (-1 when unknown). */
void moe_store_domains(const moe_token_store *s, int64_t begin, int64_t n, int64_t *out);

#endif
