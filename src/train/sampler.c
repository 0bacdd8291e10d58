/* Deterministic batch sampling over a dataset: random windows for training
 * and non-overlapping (optionally shuffled) windows for evaluation. Every
 * draw is Philox(counter, key) with the key a function of (seed, stream,
 * epoch), so a batch depends on nothing but its arguments. */
#include "dataset_internal.h"

#include "../core/rng.h"

#include <stdlib.h>

/* Streams under one seed: the corpus uses moe_rng_key(seed, MOE_RNG_DATA)
 * itself, so the sampler's streams are derived from it with a tag, keeping a
 * corpus seed and a sampling seed that happen to be equal uncorrelated. */
enum { STREAM_WINDOWS = 1, STREAM_SHUFFLE = 2 };

static uint64_t stream_key(uint64_t seed, int stream, uint64_t epoch) {
    uint64_t base = moe_rng_key(seed, MOE_RNG_DATA);
    return moe_rng_key(base ^ ((uint64_t)stream << 56) ^ (epoch * 0x9E3779B97F4A7C15ull), MOE_RNG_DATA);
}

/* 64 random bits: positions in datasets past 2^24 tokens need more than the
 * 24 bits moe_rng_uniform_at carries. The modulo bias (n / 2^64) is nil. */
static uint64_t draw_below(uint64_t key, uint64_t counter, uint64_t n) {
    moe_philox_block b = moe_philox4x32(counter, key);
    uint64_t x = (uint64_t)b.v[0] | ((uint64_t)b.v[1] << 32);
    return x % n;
}

#define MAX_ROWS ((int64_t)1 << 24)    /* rows per batch: the counter's low bits */
#define MAX_STEP ((uint64_t)1 << 40)   /* steps per epoch: its high bits */

static void fill_window(const moe_token_store *s, int64_t start, int64_t seq_len,
                        int64_t *ids, int64_t *targets, int64_t *domains) {
    moe_store_read(s, start, seq_len, ids);
    /* targets are the same tokens one further: reuse the read, fetch one */
    for (int64_t t = 0; t + 1 < seq_len; t++) targets[t] = ids[t + 1];
    moe_store_read(s, start + seq_len, 1, targets + seq_len - 1);
    if (domains) moe_store_domains(s, start, seq_len, domains);
}

static moe_status check_shape(const moe_dataset *ds, int64_t rows, int64_t seq_len, const char *what) {
    if (rows < 1 || rows > MAX_ROWS)
        return moe_error(MOE_ERR_ARG, "%s: batch_size must be in 1..%lld, got %lld", what, (long long)MAX_ROWS,
                         (long long)rows);
    if (seq_len < 1) return moe_error(MOE_ERR_ARG, "%s: seq_len must be >= 1, got %lld", what, (long long)seq_len);
    int64_t n = moe_dataset_num_tokens(ds);
    if (n < seq_len + 1)
        return moe_error(MOE_ERR_ARG, "%s: the dataset has %lld tokens; seq_len %lld needs at least %lld (inputs plus "
                                      "the shifted target)", what, (long long)n, (long long)seq_len,
                         (long long)seq_len + 1);
    return MOE_OK;
}

moe_status moe_dataset_batch(const moe_dataset *ds, uint64_t seed, uint64_t epoch, uint64_t step,
                             int64_t batch_size, int64_t seq_len,
                             int64_t *ids, int64_t *targets, int64_t *domains) {
    MOE_TRY(check_shape(ds, batch_size, seq_len, "batch"));
    if (step >= MAX_STEP)
        return moe_error(MOE_ERR_ARG, "batch: step must be below 2^40, got %llu", (unsigned long long)step);
    uint64_t key = stream_key(seed, STREAM_WINDOWS, epoch);
    uint64_t starts = (uint64_t)(moe_dataset_num_tokens(ds) - seq_len);   /* valid starts: 0 .. n-seq_len-1 */
    for (int64_t r = 0; r < batch_size; r++) {
        /* the counter names (step, row), not a running position: any batch
         * can be regenerated alone, whatever came before it */
        int64_t start = (int64_t)draw_below(key, (step << 24) | (uint64_t)r, starts);
        int64_t o = r * seq_len;
        fill_window(ds->store, ds->begin + start, seq_len, ids + o, targets + o, domains ? domains + o : NULL);
    }
    return MOE_OK;
}

int64_t moe_dataset_num_windows(const moe_dataset *ds, int64_t seq_len) {
    if (seq_len < 1) return 0;
    int64_t n = moe_dataset_num_tokens(ds);
    return n < 1 ? 0 : (n - 1) / seq_len;
}

/* Fisher-Yates from the back; swap partner of position i is counter i. */
static moe_status shuffled_order(moe_dataset *ds, int64_t seq_len, int64_t nw, uint64_t seed, uint64_t epoch) {
    if (ds->perm && ds->perm_n == nw && ds->perm_seq_len == seq_len && ds->perm_seed == seed &&
        ds->perm_epoch == epoch)
        return MOE_OK;
    int64_t *p = realloc(ds->perm, sizeof(int64_t) * (size_t)nw);
    if (!p) return moe_error(MOE_ERR_OOM, "window_batch: out of memory for the order of %lld windows", (long long)nw);
    ds->perm = p;
    ds->perm_n = 0;   /* invalid until filled */
    for (int64_t i = 0; i < nw; i++) p[i] = i;
    uint64_t key = stream_key(seed, STREAM_SHUFFLE, epoch);
    for (int64_t i = nw - 1; i > 0; i--) {
        int64_t j = (int64_t)draw_below(key, (uint64_t)i, (uint64_t)i + 1);
        int64_t t = p[i]; p[i] = p[j]; p[j] = t;
    }
    ds->perm_n = nw;
    ds->perm_seq_len = seq_len;
    ds->perm_seed = seed;
    ds->perm_epoch = epoch;
    return MOE_OK;
}

moe_status moe_dataset_window_batch(moe_dataset *ds, int64_t seq_len, int64_t first, int64_t count,
                                    int shuffle, uint64_t seed, uint64_t epoch,
                                    int64_t *ids, int64_t *targets, int64_t *domains) {
    MOE_TRY(check_shape(ds, count, seq_len, "window_batch"));
    int64_t nw = moe_dataset_num_windows(ds, seq_len);
    if (first < 0 || first > nw - count)
        return moe_error(MOE_ERR_RANGE, "window_batch: windows %lld..%lld are out of range: there are %lld windows "
                                        "of seq_len %lld (0-based)", (long long)first, (long long)(first + count - 1),
                         (long long)nw, (long long)seq_len);
    if (shuffle) MOE_TRY(shuffled_order(ds, seq_len, nw, seed, epoch));
    for (int64_t r = 0; r < count; r++) {
        int64_t w = shuffle ? ds->perm[first + r] : first + r;
        int64_t o = r * seq_len;
        fill_window(ds->store, ds->begin + w * seq_len, seq_len, ids + o, targets + o, domains ? domains + o : NULL);
    }
    return MOE_OK;
}
