/* check_alloc: the CUDA caching allocator (cuda_alloc.cu over src/core/block_pool.c):
 * small blocks reused, large blocks rounded to 2 MiB and cut from the pool's free
 * space (split, merged again when freed), a live block surviving empty_cache with
 * its data, small blocks cut from shared segments, and out of memory (a clean
 * MOE_ERR_OOM after one reclaim, the allocator still working after it).
 * Prints TAP; "1..0 # SKIP no CUDA device" without a GPU. */
#include "gpucheck.h"

static int reclaim_calls;
static void count_reclaim(void *arg) { (void)arg; reclaim_calls++; }

static void test_allocator(void) {
    moe_cuda_mem_stats s0, s1;
    moe_tensor *a = moe_tensor_new(ctx, MOE_F32, SH(1000, 1000), GPU);
    die_if(!a, "alloc");
    moe_tensor_release(a);
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_F32, SH(999, 1001), GPU);   /* same size class */
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(a && s1.num_cache_hits == s0.num_cache_hits + 1 && s1.num_cuda_malloc == s0.num_cuda_malloc,
       "allocator reuses a cached block of the same class");
    moe_tensor_release(a);

    /* Large blocks: rounded to 2 MiB, not to a quarter of a power of two (a
     * 2.16 GB buffer took 2.68), and cut from the pool's free space (best fit,
     * split, merged again when freed): a smaller request, even half the size,
     * takes part of the cached block without cudaMalloc and is counted at its own
     * size; the two halves freed merge back into the whole block. */
    die_if(moe_cuda_empty_cache(ctx, 0) != MOE_OK, "empty cache");
    const int64_t big_n = (int64_t)(300 << 20) + 12345;     /* bytes, as u8 elements */
    const size_t mib2 = (size_t)2 << 20;
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_U8, SH(big_n), GPU);
    moe_cuda_memory_stats(ctx, 0, &s1);
    size_t took = s1.bytes_in_use - s0.bytes_in_use;
    ok(a && took >= (size_t)big_n && took < (size_t)big_n + mib2 && took % mib2 == 0,
       "allocator: a %lld-byte tensor takes a block rounded to 2 MiB (%zu bytes)", (long long)big_n, took);
    moe_tensor_release(a);
    const int64_t half_n = big_n / 2 - (int64_t)(3 << 20);
    const size_t half_cls = ((size_t)half_n + mib2 - 1) / mib2 * mib2;
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_U8, SH(half_n), GPU);
    moe_tensor *a2 = moe_tensor_new(ctx, MOE_U8, SH(half_n), GPU);
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(a && a2 && s1.num_cuda_malloc == s0.num_cuda_malloc && s1.num_cache_hits == s0.num_cache_hits + 2 &&
           s1.bytes_in_use - s0.bytes_in_use == 2 * half_cls && s0.bytes_cached - s1.bytes_cached == 2 * half_cls,
       "allocator: two requests of under half the size split the cached block: no cudaMalloc, %zu bytes in use, "
       "%zu cached", (size_t)(s1.bytes_in_use - s0.bytes_in_use), (size_t)s1.bytes_cached);
    /* a live block survives emptying the cache: its segment is not wholly free */
    moe_tensor *hh = host_randn(SH(1000), 1, 0, 0);
    moe_tensor *part = moe_tensor_from_storage(a2->storage, 0, MOE_F32, 1, (int64_t[]){1000}, NULL);
    die_if(!part || moe_op_copy(ctx, part, hh) != MOE_OK, "write into the second half");
    die_if(moe_cuda_empty_cache(ctx, 0) != MOE_OK, "empty cache");
    moe_tensor *back = moe_op_to(ctx, part, MOE_DEVICE_CPU, MOE_F32);
    ok(back && max_err(back, hh) == 0, "allocator: emptying the cache keeps a segment with a live block, and its data");
    moe_tensor_release(back); moe_tensor_release(part); moe_tensor_release(hh);
    moe_tensor_release(a);
    moe_tensor_release(a2);
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_U8, SH(big_n), GPU);
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(a && s1.num_cuda_malloc == s0.num_cuda_malloc && s1.bytes_in_use - s0.bytes_in_use == took,
       "allocator: the freed halves merged back: the whole block again without cudaMalloc");
    moe_tensor_release(a);
    moe_cuda_memory_stats(ctx, 0, &s0);
    die_if(moe_cuda_empty_cache(ctx, 0) != MOE_OK, "empty cache");
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(s1.bytes_cached + took <= s0.bytes_cached,
       "allocator: emptying the cache gives the wholly free segments back (%zu -> %zu cached)",
       (size_t)s0.bytes_cached, (size_t)s1.bytes_cached);
    ok(s0.bytes_reserved == s0.bytes_in_use + s0.bytes_cached && s1.bytes_reserved == s1.bytes_in_use + s1.bytes_cached &&
           s0.bytes_reserved - s1.bytes_reserved == s0.bytes_cached - s1.bytes_cached &&
           s1.peak_bytes_reserved == s0.peak_bytes_reserved,
       "allocator: reserved is in use + cached and falls by what emptying the cache gave back (%zu -> %zu), "
       "its peak stays (%zu)", (size_t)s0.bytes_reserved, (size_t)s1.bytes_reserved, (size_t)s1.peak_bytes_reserved);
    /* the peak of reserved bytes: a new segment raises it, freeing keeps it, a reset starts from now */
    die_if(moe_cuda_reset_peak_memory(ctx, 0) != MOE_OK, "reset peak");
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_U8, SH(big_n), GPU);
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(a && s0.peak_bytes_reserved == s0.bytes_reserved && s1.num_cuda_malloc == s0.num_cuda_malloc + 1 &&
           s1.bytes_reserved == s0.bytes_reserved + took && s1.peak_bytes_reserved == s1.bytes_reserved,
       "allocator: a new segment adds its %zu bytes to reserved and to the peak", took);
    moe_tensor_release(a);
    die_if(moe_cuda_empty_cache(ctx, 0) != MOE_OK, "empty cache");
    moe_cuda_memory_stats(ctx, 0, &s0);
    die_if(moe_cuda_reset_peak_memory(ctx, 0) != MOE_OK, "reset peak");
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(s0.peak_bytes_reserved == s0.bytes_reserved + took && s1.peak_bytes_reserved == s1.bytes_reserved &&
           s1.bytes_reserved == s0.bytes_reserved,
       "allocator: after the segment went back the peak keeps it (%zu) until a reset (%zu)",
       (size_t)s0.peak_bytes_reserved, (size_t)s1.peak_bytes_reserved);

    /* Small blocks (up to 1 MiB) are cut from 2 MiB segments: 200 tensors of
     * 1 to 8 KB take a segment or two, keep their own data, and once freed
     * serve 200 others of new sizes without cudaMalloc. */
    enum { NS = 200 };
    moe_tensor *sm[NS];
    moe_cuda_memory_stats(ctx, 0, &s0);
    for (int i = 0; i < NS; i++) {
        sm[i] = moe_tensor_new(ctx, MOE_F32, SH(256 + 7 * i), GPU);
        die_if(!sm[i] || moe_op_fill(ctx, sm[i], (double)i) != MOE_OK, "small tensor");
    }
    moe_cuda_memory_stats(ctx, 0, &s1);
    int intact = 1;
    for (int i = 0; i < NS; i++) {
        moe_tensor *hb = moe_op_to(ctx, sm[i], MOE_DEVICE_CPU, MOE_F32);
        for (int64_t j = 0; hb && j < moe_tensor_numel(hb); j++) intact &= moe_f32(hb)[j] == (float)i;
        moe_tensor_release(hb);
    }
    ok(intact && s1.num_cuda_malloc - s0.num_cuda_malloc <= 2,
       "allocator: %d small tensors from %llu new segments, each with its own data", NS,
       (unsigned long long)(s1.num_cuda_malloc - s0.num_cuda_malloc));
    for (int i = 0; i < NS; i++) moe_tensor_release(sm[i]);
    moe_cuda_memory_stats(ctx, 0, &s0);
    for (int i = 0; i < NS; i++) {
        sm[i] = moe_tensor_new(ctx, MOE_F32, SH(300 + 11 * (NS - i)), GPU);
        die_if(!sm[i], "small tensor");
    }
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(s1.num_cuda_malloc == s0.num_cuda_malloc, "allocator: freed small blocks serve new sizes without cudaMalloc");
    for (int i = 0; i < NS; i++) moe_tensor_release(sm[i]);

    /* out of memory: more than the device has */
    moe_cuda_memory_stats(ctx, 0, &s0);
    size_t total = s0.device_total;
    int64_t huge = (int64_t)(total / 4) * 2 + 1;     /* 2x the device in f32 elements */
    ctx->reclaim = count_reclaim;
    ctx->reclaim_arg = NULL;
    moe_clear_error();
    moe_tensor *big = moe_tensor_new(ctx, MOE_F32, SH(huge), GPU);
    moe_status st = moe_last_status();
    const char *msg = moe_last_error();
    int good = !big && st == MOE_ERR_OOM && msg && strstr(msg, "out of memory") && strstr(msg, "in use");
    ok(good, "oom: clean MOE_ERR_OOM with a message (%s)", msg ? msg : "no message");
    ok(reclaim_calls == 1, "oom: ctx->reclaim called once before the retry (called %d times)", reclaim_calls);
    moe_tensor_release(big);
    ctx->reclaim = NULL;
    /* and the allocator still works */
    moe_tensor *h = host_randn(SH(4096), 1, 0, 0);
    moe_tensor *d = moe_op_to(ctx, h, GPU, MOE_F32);
    ok(d != NULL, "allocator works after oom");
    if (d) check("copy after oom", MOE_F32, d, h, 0.0);
    moe_tensor_release(h);
    moe_tensor_release(d);
}

int main(void) {
    gpucheck_begin();
    test_allocator();
    return gpucheck_end();
}
