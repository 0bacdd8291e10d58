/* The large-block pool of the CUDA allocator (src/core/block_pool.c), on the
 * host with made-up segment addresses: best fit, splitting, merging with
 * both neighbours, segments given back only when wholly free, a failing
 * segment source, and a random run checked against a model (no two live
 * blocks overlap; live + free bytes = segment bytes). Prints TAP. */
#include "../../src/core/block_pool.h"
#include "tap.h"

#include <stdlib.h>

#define MB ((size_t)1 << 20)

typedef struct {
    uintptr_t next;
    size_t live_segments, allocs, frees;
    int fail;
} segsrc;

static uintptr_t seg_alloc(void *arg, size_t n) {
    segsrc *s = arg;
    if (s->fail) return 0;
    uintptr_t a = s->next;
    s->next += n + 64 * MB;   /* segments never touch: a merge across them would show */
    s->live_segments++;
    s->allocs++;
    return a;
}

static void seg_free(void *arg, uintptr_t addr, size_t n) {
    (void)addr; (void)n;
    segsrc *s = arg;
    s->live_segments--;
    s->frees++;
}

int main(void) {
    segsrc src = {1ull << 32, 0, 0, 0, 0};
    moe_block_pool *p = moe_block_pool_new(2 * MB, 0, seg_alloc, seg_free, &src);
    report(p != NULL, "pool made", "NULL");

    /* a new segment, then a split of its free space, then the rest */
    moe_pool_block *a = moe_block_pool_alloc(p, 10 * MB);
    uintptr_t base = a->addr;
    moe_block_pool_free(p, a);
    report(moe_block_pool_free_bytes(p) == 10 * MB && moe_block_pool_segments(p) == 1, "a freed block stays cached",
           "free %zu, segments %zu", moe_block_pool_free_bytes(p), moe_block_pool_segments(p));
    moe_pool_block *b = moe_block_pool_alloc(p, 4 * MB);
    moe_pool_block *c = moe_block_pool_alloc(p, 6 * MB);
    report(b->addr == base && c->addr == base + 4 * MB && src.allocs == 1 && b->size == 4 * MB && c->size == 6 * MB,
           "a cached block is split: 4 + 6 MB from the 10 MB segment, no new segment",
           "b %zx c %zx base %zx, %zu segment allocations", (size_t)b->addr, (size_t)c->addr, (size_t)base, src.allocs);
    report(moe_block_pool_release(p) == 0 && src.frees == 0, "a segment in use is not given back", "%zu frees",
           src.frees);
    /* merging: free b then c -> one 10 MB block, which serves 10 MB again */
    moe_block_pool_free(p, b);
    moe_block_pool_free(p, c);
    a = moe_block_pool_alloc(p, 10 * MB);
    report(a->addr == base && a->size == 10 * MB && src.allocs == 1, "freed neighbours merge back into one block",
           "addr %zx size %zu allocs %zu", (size_t)a->addr, a->size, src.allocs);
    moe_block_pool_free(p, a);

    /* three blocks: free the outer two, then the middle: one block again */
    moe_pool_block *x = moe_block_pool_alloc(p, 2 * MB), *y = moe_block_pool_alloc(p, 2 * MB),
                   *z = moe_block_pool_alloc(p, 6 * MB);
    moe_block_pool_free(p, x);
    moe_block_pool_free(p, z);
    moe_block_pool_free(p, y);
    report(moe_block_pool_free_bytes(p) == 10 * MB, "a block freed between two free ones merges with both",
           "free %zu", moe_block_pool_free_bytes(p));
    a = moe_block_pool_alloc(p, 10 * MB);
    report(a->addr == base && src.allocs == 1, "... and serves the whole segment", "allocs %zu", src.allocs);
    moe_block_pool_free(p, a);

    /* best fit: a second segment of 16 MB; 7 MB comes from the 10 MB block, and
     * keeps the 3 MB rest as a free block; 1 MB under split_min stays with a block */
    moe_pool_block *big = moe_block_pool_alloc(p, 16 * MB);
    moe_block_pool_free(p, big);
    moe_pool_block *s7 = moe_block_pool_alloc(p, 7 * MB);
    report(s7->addr == base && src.allocs == 2, "best fit: the smallest free block that holds the request",
           "addr %zx", (size_t)s7->addr);
    moe_pool_block *s2 = moe_block_pool_alloc(p, 2 * MB);
    report(s2->addr == base + 7 * MB && s2->size == 3 * MB, "a rest under split_min stays with the block",
           "addr %zx size %zu", (size_t)s2->addr, s2->size);
    size_t rel = moe_block_pool_release(p);
    report(rel == 16 * MB && moe_block_pool_segments(p) == 1 && src.frees == 1,
           "release gives back the wholly free segment only", "released %zu, segments %zu", rel,
           moe_block_pool_segments(p));
    moe_block_pool_free(p, s7);
    moe_block_pool_free(p, s2);
    rel = moe_block_pool_release(p);
    report(rel == 10 * MB && moe_block_pool_segments(p) == 0 && src.live_segments == 0 &&
               moe_block_pool_free_bytes(p) == 0,
           "once all of it is free, the first segment goes back too", "released %zu", rel);

    /* no segment to be had */
    src.fail = 1;
    report(moe_block_pool_alloc(p, 4 * MB) == NULL, "a failing segment source gives NULL", "got a block");
    src.fail = 0;

    /* a random run against a model */
    enum { SLOTS = 64, ROUNDS = 20000 };
    moe_pool_block *live[SLOTS] = {0};
    uint64_t r = 88172645463325252ull;
    int overlap = 0, balance = 0;
    for (int it = 0; it < ROUNDS; it++) {
        r ^= r << 13; r ^= r >> 7; r ^= r << 17;
        int k = (int)(r % SLOTS);
        if (live[k]) {
            moe_block_pool_free(p, live[k]);
            live[k] = NULL;
        } else {
            size_t n = (size_t)(1 + (r >> 20) % 24) * MB;
            live[k] = moe_block_pool_alloc(p, n);
            if (!live[k] || live[k]->size < n) { overlap++; continue; }
            for (int j = 0; j < SLOTS; j++) {
                if (j == k || !live[j]) continue;
                if (live[j]->addr < live[k]->addr + live[k]->size && live[k]->addr < live[j]->addr + live[j]->size)
                    overlap++;
            }
        }
        size_t used = 0;
        for (int j = 0; j < SLOTS; j++) used += live[j] ? live[j]->size : 0;
        if (used + moe_block_pool_free_bytes(p) != moe_block_pool_segment_bytes(p)) balance++;
    }
    report(overlap == 0, "random run: every block holds its request and no two live blocks overlap", "%d overlaps",
           overlap);
    report(balance == 0, "random run: live + free bytes = segment bytes after every step", "%d mismatches", balance);
    size_t segs = src.allocs;
    for (int j = 0; j < SLOTS; j++) moe_block_pool_free(p, live[j]);
    moe_block_pool_release(p);
    report(src.live_segments == 0 && moe_block_pool_segment_bytes(p) == 0,
           "random run: everything freed, every segment given back", "%zu segments live", src.live_segments);
    report(segs < ROUNDS / 20, "random run: segments are reused rather than made per request", "%zu segments made",
           segs);
    moe_block_pool_destroy(p);

    /* small blocks from 2 MB segments (seg_min): many requests, one segment */
    segsrc src2 = {1ull << 40, 0, 0, 0, 0};
    moe_block_pool *q = moe_block_pool_new(512, 2 * MB, seg_alloc, seg_free, &src2);
    moe_pool_block *sm[100];
    int apart = 1;
    for (int i = 0; i < 100; i++) {
        sm[i] = moe_block_pool_alloc(q, 512 * (size_t)(1 + i % 7));
        if (i && sm[i]->addr < sm[i - 1]->addr + sm[i - 1]->size) apart = 0;
    }
    report(src2.allocs == 1 && moe_block_pool_segment_bytes(q) == 2 * MB && apart,
           "small requests are cut from one seg_min segment, one after another", "%zu segments", src2.allocs);
    for (int i = 0; i < 100; i++) moe_block_pool_free(q, sm[i]);
    report(moe_block_pool_free_bytes(q) == 2 * MB && moe_block_pool_release(q) == 2 * MB && src2.live_segments == 0,
           "... and merge back into it, which goes back whole", "free %zu", moe_block_pool_free_bytes(q));
    moe_pool_block *large = moe_block_pool_alloc(q, 3 * MB);
    report(large && large->size == 3 * MB && moe_block_pool_segment_bytes(q) == 3 * MB,
           "a request above seg_min gets a segment of its own size", "size %zu", large ? large->size : 0);
    moe_block_pool_destroy(q);
    report(src2.live_segments == 0, "destroy gives back every segment, in use or not", "%zu live", src2.live_segments);
    return tap_done();
}
