/* Token datasets: storage, constructors, accessors and the held-out split
 * (sampling is in sampler.c). */
#include "dataset_internal.h"

#include "corpus.h"

#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

/* ---------------------------------------------------------------- store -- */

static void store_release(moe_token_store *s) {
    if (!s || --s->refcount > 0) return;
    if (s->map) munmap(s->map, s->map_len);
    free(s->owned);
    free(s->doc_off);
    free(s->doc_dom);
    free(s);
}

static moe_token_store *store_new(void) {
    moe_token_store *s = calloc(1, sizeof *s);
    if (!s) moe_error(MOE_ERR_OOM, "dataset: out of memory");
    else s->refcount = 1;
    return s;
}

/* Takes over one reference to s (released on failure). */
static moe_dataset *view_new(moe_token_store *s, int64_t begin, int64_t end) {
    moe_dataset *ds = calloc(1, sizeof *ds);
    if (!ds) {
        store_release(s);
        moe_error(MOE_ERR_OOM, "dataset: out of memory");
        return NULL;
    }
    ds->store = s;
    ds->begin = begin;
    ds->end = end;
    return ds;
}

void moe_dataset_free(moe_dataset *ds) {
    if (!ds) return;
    store_release(ds->store);
    free(ds->perm);
    free(ds);
}

void moe_store_read(const moe_token_store *s, int64_t begin, int64_t n, int64_t *out) {
    /* one loop per width, so each is a plain widening copy the compiler vectorises */
    switch (s->width) {
    case 1: { const uint8_t *p = (const uint8_t *)s->tokens + begin; for (int64_t i = 0; i < n; i++) out[i] = p[i]; break; }
    case 2: { const uint16_t *p = (const uint16_t *)s->tokens + begin; for (int64_t i = 0; i < n; i++) out[i] = p[i]; break; }
    default: { const uint32_t *p = (const uint32_t *)s->tokens + begin; for (int64_t i = 0; i < n; i++) out[i] = p[i]; break; }
    }
}

int64_t moe_store_doc_of(const moe_token_store *s, int64_t pos) {
    /* the last document whose start is <= pos */
    int64_t lo = 0, hi = s->num_docs - 1;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo + 1) / 2;
        if (s->doc_off[mid] <= pos) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

void moe_store_domains(const moe_token_store *s, int64_t begin, int64_t n, int64_t *out) {
    if (!s->doc_dom || s->num_docs == 0) {
        for (int64_t i = 0; i < n; i++) out[i] = -1;
        return;
    }
    int64_t d = moe_store_doc_of(s, begin);
    for (int64_t i = 0; i < n; i++) {
        while (d + 1 < s->num_docs && begin + i >= s->doc_off[d + 1]) d++;
        out[i] = s->doc_dom[d];
    }
}

/* --------------------------------------------------------- constructors -- */

moe_dataset *moe_dataset_from_bytes(const void *text, int64_t n) {
    if (n < 0 || (n > 0 && !text)) {
        moe_error(MOE_ERR_ARG, "dataset from bytes: invalid text (%lld bytes)", (long long)n);
        return NULL;
    }
    moe_token_store *s = store_new();
    if (!s) return NULL;
    s->owned = malloc(n ? (size_t)n : 1);
    if (!s->owned) {
        store_release(s);
        moe_error(MOE_ERR_OOM, "dataset from bytes: out of memory for %lld bytes", (long long)n);
        return NULL;
    }
    if (n) memcpy(s->owned, text, (size_t)n);
    s->tokens = s->owned;
    s->width = 1;
    s->n = n;
    s->vocab = MOE_BYTE_VOCAB;
    s->byte_level = 1;
    return view_new(s, 0, n);
}

moe_dataset *moe_dataset_from_corpus(uint64_t seed, int64_t num_docs, int64_t num_bytes) {
    moe_corpus c;
    if (moe_corpus_generate(seed, num_docs, num_bytes, &c) != MOE_OK) return NULL;
    moe_token_store *s = store_new();
    if (!s) { moe_corpus_free(&c); return NULL; }
    /* the corpus text is already one byte per token: take it over, no copy */
    static const char *const names[MOE_CORPUS_NUM_DOMAINS] = {"arithmetic", "code", "records", "prose"};
    s->owned = c.text;
    s->tokens = c.text;
    s->width = 1;
    s->n = c.num_bytes;
    s->vocab = MOE_BYTE_VOCAB;
    s->byte_level = 1;
    s->num_docs = c.num_docs;
    s->doc_off = c.doc_offsets;
    s->doc_dom = c.doc_domains;
    s->num_domains = MOE_CORPUS_NUM_DOMAINS;
    s->domain_names = names;
    return view_new(s, 0, s->n);
}

static int host_is_little_endian(void) {
    const uint16_t one = 1;
    return *(const uint8_t *)&one == 1;
}

/* Maps a whole file read-only into s; checks it is a non-empty regular file
 * whose size is a multiple of width. */
static moe_status map_file(moe_token_store *s, const char *path, int width, const char *what) {
    if (!path || !*path) return moe_error(MOE_ERR_ARG, "%s: path is empty", what);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe_error(MOE_ERR_IO, "%s '%s': cannot open: %s", what, path, strerror(errno));
    struct stat st;
    if (fstat(fd, &st) != 0) {
        int e = errno;
        close(fd);
        return moe_error(MOE_ERR_IO, "%s '%s': cannot stat: %s", what, path, strerror(e));
    }
    if (!S_ISREG(st.st_mode)) {
        close(fd);
        return moe_error(MOE_ERR_IO, "%s '%s': not a regular file", what, path);
    }
    if (st.st_size == 0) {
        close(fd);
        return moe_error(MOE_ERR_IO, "%s '%s': file is empty", what, path);
    }
    if (st.st_size % width != 0) {
        close(fd);
        return moe_error(MOE_ERR_IO, "%s '%s': size %lld bytes is not a multiple of %d (uint%d ids)", what, path,
                         (long long)st.st_size, width, width * 8);
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_PRIVATE, fd, 0);
    int e = errno;
    close(fd);   /* the mapping keeps the file open */
    if (p == MAP_FAILED) return moe_error(MOE_ERR_IO, "%s '%s': mmap failed: %s", what, path, strerror(e));
    s->map = p;
    s->map_len = (size_t)st.st_size;
    s->tokens = p;
    s->width = width;
    s->n = (int64_t)st.st_size / width;
    return MOE_OK;
}

moe_dataset *moe_dataset_from_text_file(const char *path) {
    moe_token_store *s = store_new();
    if (!s) return NULL;
    if (map_file(s, path, 1, "text file") != MOE_OK) { store_release(s); return NULL; }
    s->vocab = MOE_BYTE_VOCAB;
    s->byte_level = 1;
    return view_new(s, 0, s->n);
}

static uint32_t max_id(const moe_token_store *s, int64_t *at) {
    uint32_t m = 0;
    int64_t where = 0;
    if (s->width == 2) {
        const uint16_t *p = s->tokens;
        for (int64_t i = 0; i < s->n; i++) if (p[i] > m) { m = p[i]; where = i; }
    } else {
        const uint32_t *p = s->tokens;
        for (int64_t i = 0; i < s->n; i++) if (p[i] > m) { m = p[i]; where = i; }
    }
    *at = where;
    return m;
}

moe_dataset *moe_dataset_from_token_file(const char *path, int width, int64_t vocab_size) {
    if (width != 2 && width != 4) {
        moe_error(MOE_ERR_ARG, "token file: element width must be 2 (uint16) or 4 (uint32) bytes, got %d", width);
        return NULL;
    }
    if (vocab_size < 0) {
        moe_error(MOE_ERR_ARG, "token file: vocab_size must be positive (or 0 to infer), got %lld", (long long)vocab_size);
        return NULL;
    }
    if (!host_is_little_endian()) {
        moe_error(MOE_ERR_IO, "token file: ids are little-endian and this host is big-endian (unsupported)");
        return NULL;
    }
    moe_token_store *s = store_new();
    if (!s) return NULL;
    if (map_file(s, path, width, "token file") != MOE_OK) { store_release(s); return NULL; }
    int64_t at;
    uint32_t m = max_id(s, &at);
    if (vocab_size > 0 && (int64_t)m >= vocab_size) {
        moe_error(MOE_ERR_RANGE, "token file '%s': id %u at position %lld is not below vocab_size %lld", path, m,
                  (long long)at, (long long)vocab_size);
        store_release(s);
        return NULL;
    }
    s->vocab = vocab_size > 0 ? vocab_size : (int64_t)m + 1;
    return view_new(s, 0, s->n);
}

/* ------------------------------------------------------------ accessors -- */

int64_t moe_dataset_num_tokens(const moe_dataset *ds) { return ds->end - ds->begin; }
int64_t moe_dataset_vocab_size(const moe_dataset *ds) { return ds->store->vocab; }
int moe_dataset_token_width(const moe_dataset *ds) { return ds->store->width; }
int moe_dataset_is_byte_level(const moe_dataset *ds) { return ds->store->byte_level; }
int moe_dataset_num_domains(const moe_dataset *ds) { return ds->store->num_domains; }

const char *moe_dataset_domain_name(const moe_dataset *ds, int domain) {
    if (domain < 0 || domain >= ds->store->num_domains) return NULL;
    return ds->store->domain_names[domain];
}

int64_t moe_dataset_num_documents(const moe_dataset *ds) {
    const moe_token_store *s = ds->store;
    if (s->num_docs == 0 || ds->end <= ds->begin) return 0;
    return moe_store_doc_of(s, ds->end - 1) - moe_store_doc_of(s, ds->begin) + 1;
}

int moe_dataset_domain_at(const moe_dataset *ds, int64_t pos) {
    if (pos < 0 || pos >= moe_dataset_num_tokens(ds)) return -1;
    int64_t d;
    moe_store_domains(ds->store, ds->begin + pos, 1, &d);
    return (int)d;
}

static moe_status check_range(const moe_dataset *ds, int64_t i, int64_t j, const char *what) {
    int64_t n = moe_dataset_num_tokens(ds);
    if (i < 0 || j < i || j > n)
        return moe_error(MOE_ERR_RANGE, "%s: range [%lld, %lld) is not within the dataset's %lld tokens "
                                        "(positions are 0-based, end exclusive)", what, (long long)i, (long long)j,
                         (long long)n);
    return MOE_OK;
}

moe_status moe_dataset_tokens(const moe_dataset *ds, int64_t i, int64_t j, int64_t *out) {
    MOE_TRY(check_range(ds, i, j, "tokens"));
    moe_store_read(ds->store, ds->begin + i, j - i, out);
    return MOE_OK;
}

moe_status moe_dataset_bytes(const moe_dataset *ds, int64_t i, int64_t j, char *out) {
    if (!ds->store->byte_level)
        return moe_error(MOE_ERR_STATE, "text: the dataset holds pre-tokenized ids, not bytes");
    MOE_TRY(check_range(ds, i, j, "text"));
    if (j > i) memcpy(out, (const char *)ds->store->tokens + ds->begin + i, (size_t)(j - i));
    return MOE_OK;
}

/* ---------------------------------------------------------------- split -- */

moe_status moe_dataset_split(const moe_dataset *ds, double fraction, moe_dataset **train, moe_dataset **heldout) {
    *train = *heldout = NULL;
    if (!(fraction > 0.0 && fraction < 1.0))
        return moe_error(MOE_ERR_ARG, "split: fraction must be between 0 and 1 (exclusive), got %g", fraction);
    const moe_token_store *s = ds->store;
    int64_t n = moe_dataset_num_tokens(ds);
    if (n < 2) return moe_error(MOE_ERR_ARG, "split: the dataset has %lld token(s); need at least 2", (long long)n);
    int64_t target = ds->begin + (int64_t)((1.0 - fraction) * (double)n + 0.5);
    int64_t cut;
    if (moe_dataset_num_documents(ds) >= 2) {
        /* the interior document starts are the candidates: d0 holds begin, d1 holds end - 1 */
        int64_t d0 = moe_store_doc_of(s, ds->begin), d1 = moe_store_doc_of(s, ds->end - 1);
        int64_t k = moe_store_doc_of(s, target < ds->end ? target : ds->end - 1);
        if (k + 1 <= d1 && s->doc_off[k + 1] - target < target - s->doc_off[k]) k++;
        if (k <= d0) k = d0 + 1;
        cut = s->doc_off[k];
    } else {
        cut = target;
        if (cut <= ds->begin) cut = ds->begin + 1;
        if (cut >= ds->end) cut = ds->end - 1;
    }
    moe_token_store *st = (moe_token_store *)s;   /* the views share it: only its refcount changes */
    st->refcount++;
    *train = view_new(st, ds->begin, cut);
    if (!*train) return moe_last_status();
    st->refcount++;
    *heldout = view_new(st, cut, ds->end);
    if (!*heldout) {
        moe_dataset_free(*train);
        *train = NULL;
        return moe_last_status();
    }
    return MOE_OK;
}
