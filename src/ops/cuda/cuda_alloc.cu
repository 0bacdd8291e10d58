// The caching, stream-aware device allocator (one per GPU).
//
// Every block comes from one of two best-fit pools (src/core/block_pool.c): a
// request takes the smallest free block that holds it and leaves the rest free
// when the rest is big enough to serve another; freed blocks merge with free
// neighbours of their segment (a cudaMalloc'd region). Small requests (up to 1
// MiB) are rounded to 512 B and cut from 2 MiB segments; large ones are
// rounded to 2 MiB (the driver's granularity) and get segments of their own
// size, which later requests split. Tensors whose sizes move from step to step
// (expert rows and index arrays follow the routing) so reuse the memory of
// others instead of adding segments. (Before the pools, a large request took a
// cached block at most an eighth larger, a small one a block of exactly its
// class, else a new cudaMalloc: about 8 a step in the whole-step benchmark.
// Rounding up to four classes per power of two, as the first version did,
// left a quarter of a large block unused.) Bytes in use count whole blocks;
// bytes reserved count the segments (cuBLAS's and the lanes' workspaces and
// the split-K counters are cudaMalloc'd apart, about 64 MiB with two lanes).
//
// Stream awareness: every kernel, copy and cuBLAS call of a device is issued on
// that device's one stream (cuda_dev.stream), or on lanes that fork from it and
// join back before the call returns (cuda_lanes.cu). A block freed on the host
// may still be read by queued work, but whoever gets it next also queues its
// work on the same stream, after that work, so reuse without events is safe.
//
// Out of memory: ctx->reclaim (a full Lua GC, which frees blocks back into the
// pools), then every wholly free segment is cudaFree'd, then one retry; after
// that MOE_ERR_OOM with the requested size, bytes in use and bytes cached.
//
// CUDA graphs (cuda_graph.cu): each graph has a pair of pools of its own, and
// while it is captured every block comes from that pair. A block goes back to
// the pair it came from whenever it is freed, so the shared pools never hand
// out an address a graph writes; the pair goes to the driver once its graph is
// freed and its last block is back. Bytes cached count the free blocks of
// every pair, though only the shared ones serve eager work.
#include "cuda_common.cuh"

#include "../../core/block_pool.h"

#include <new>

static const size_t SMALL_LIMIT = (size_t)1 << 20;
static const size_t LARGE_STEP = (size_t)2 << 20;

static size_t size_class(size_t n) {
    if (n == 0) n = 1;
    if (n <= SMALL_LIMIT) return (n + 511) & ~(size_t)511;
    return (n + LARGE_STEP - 1) & ~(LARGE_STEP - 1);
}

// The pool's segments: cudaMalloc'd regions (counted as the allocator's mallocs)
static uintptr_t seg_alloc(void *arg, size_t n) {
    cuda_dev *d = (cuda_dev *)arg;
    void *p = NULL;
    cudaSetDevice(d->index);
    if (cudaMalloc(&p, n) != cudaSuccess) {
        cudaGetLastError();   // an allocation failure must not surface at the next launch check
        return 0;
    }
    d->n_malloc++;
    return (uintptr_t)p;
}
static void seg_free(void *arg, uintptr_t addr, size_t n) {
    (void)n;
    cudaSetDevice(((cuda_dev *)arg)->index);
    cudaFree((void *)addr);
}

static size_t pools_free_bytes(const cuda_dev::pools &ps) {
    return (ps.small ? moe_block_pool_free_bytes(ps.small) : 0) + (ps.large ? moe_block_pool_free_bytes(ps.large) : 0);
}
size_t cuda_pools_segment_bytes(const cuda_dev::pools &ps) {
    return (ps.small ? moe_block_pool_segment_bytes(ps.small) : 0) +
           (ps.large ? moe_block_pool_segment_bytes(ps.large) : 0);
}

// Bytes in the pools' free blocks (the graphs' pairs included). Caller holds d->mu.
size_t cuda_alloc_cached_locked(const cuda_dev *d) {
    size_t n = pools_free_bytes(d->shared);
    for (const cuda_dev::pools *ps : d->graph_pools) n += pools_free_bytes(*ps);
    return n;
}

// Bytes of the pools' segments: what the allocator holds from the driver. Caller holds d->mu.
size_t cuda_alloc_reserved_locked(const cuda_dev *d) {
    size_t n = cuda_pools_segment_bytes(d->shared);
    for (const cuda_dev::pools *ps : d->graph_pools) n += cuda_pools_segment_bytes(*ps);
    return n;
}

// A block of class cls from a pool's free blocks, else where grow from a new
// segment; NULL when none is had (no error set). While a graph is captured the
// block comes from the graph's own pair: its address is baked into the graph,
// so no work outside the graph may ever be given it. Caller holds d->mu.
static void *take_locked(cuda_dev *d, size_t cls, bool grow) {
    bool small = cls <= SMALL_LIMIT;
    cuda_dev::pools *owner = d->capture ? d->capture : &d->shared;
    moe_block_pool *&pool = small ? owner->small : owner->large;
    if (!pool) pool = small ? moe_block_pool_new(512, LARGE_STEP, seg_alloc, seg_free, d)
                            : moe_block_pool_new(LARGE_STEP, 0, seg_alloc, seg_free, d);
    if (!pool) return NULL;
    moe_pool_block *blk = moe_block_pool_alloc_free(pool, cls);
    if (blk) {
        d->n_hits++;
    } else if (grow && (blk = moe_block_pool_alloc(pool, cls))) {
        size_t r = cuda_alloc_reserved_locked(d);   // only a new segment raises it
        if (r > d->peak_reserved) d->peak_reserved = r;
    }
    if (!blk) return NULL;
    void *p = (void *)blk->addr;
    d->live[p] = cuda_dev::live_block{blk, small, owner};
    owner->live++;
    d->bytes_in_use += blk->size;
    if (d->bytes_in_use > d->peak_in_use) d->peak_in_use = d->bytes_in_use;
    return p;
}

// A graph's pair whose graph is gone and whose blocks are all back: its segments
// go to the driver, after the queued work (a replay may still run). Not while a
// capture runs (no synchronisation then): the next end of a capture reaps it.
// Caller holds d->mu.
void cuda_alloc_reap_locked(cuda_dev *d) {
    if (d->capture) return;
    for (size_t i = 0; i < d->graph_pools.size();) {
        cuda_dev::pools *ps = d->graph_pools[i];
        if (!ps->retired || ps->live) { i++; continue; }
        cudaSetDevice(d->index);
        if (d->stream) cudaStreamSynchronize(d->stream);
        moe_block_pool_destroy(ps->small);
        moe_block_pool_destroy(ps->large);
        cudaGetLastError();
        delete ps;
        d->graph_pools.erase(d->graph_pools.begin() + (ptrdiff_t)i);
    }
}

static void *cuda_alloc_fn(moe_allocator *self, size_t nbytes);
static void cuda_free_fn(moe_allocator *self, void *ptr, size_t nbytes);

// cudaFree every wholly free segment of the shared pools (a graph's stay with it).
// Never while a graph is captured: it waits for the stream. Caller holds d->mu.
static void release_cache_locked(cuda_dev *d) {
    if (d->capture || !pools_free_bytes(d->shared)) return;
    cudaSetDevice(d->index);
    cudaStreamSynchronize(d->stream);   // queued work may still use blocks freed to the cache
    if (d->shared.small) moe_block_pool_release(d->shared.small);
    if (d->shared.large) moe_block_pool_release(d->shared.large);
    cudaGetLastError();
}

void cuda_alloc_release_cache(cuda_dev *d) {
    std::lock_guard<std::mutex> g(d->mu);
    release_cache_locked(d);
}

moe_allocator *cuda_alloc_create(int index, moe_ctx *ctx) {
    cuda_dev *d = new (std::nothrow) cuda_dev();
    if (!d) { moe_error(MOE_ERR_OOM, "out of host memory for the cuda:%d state", index); return NULL; }
    d->alloc.name = "cuda";
    d->alloc.device = moe_device{MOE_CUDA, index};
    d->alloc.alloc = cuda_alloc_fn;
    d->alloc.free = cuda_free_fn;
    d->alloc.state = d;
    d->index = index;
    d->ctx = ctx;
    d->bytes_in_use = d->peak_in_use = 0;
    d->peak_reserved = 0;
    d->shared = cuda_dev::pools{NULL, NULL, 0, false};
    d->capture = NULL;
    d->n_graphs = 0;
    d->n_malloc = d->n_hits = 0;
    d->closing = false;
    d->stream = NULL;
    d->blas = NULL;
    return &d->alloc;
}

void cuda_dev_destroy(cuda_dev *d) {
    if (!d) return;
    {
        std::lock_guard<std::mutex> g(d->mu);
        release_cache_locked(d);
    }
    cudaSetDevice(d->index);
    if (d->stream) cudaStreamSynchronize(d->stream);
    // every segment: nothing is live and no graph is left when the device goes
    moe_block_pool_destroy(d->shared.small);
    moe_block_pool_destroy(d->shared.large);
    d->shared.small = d->shared.large = NULL;
    for (cuda_dev::pools *ps : d->graph_pools) {
        moe_block_pool_destroy(ps->small);
        moe_block_pool_destroy(ps->large);
        delete ps;
    }
    d->graph_pools.clear();
    cuda_lanes_free(d);
    if (d->blas) cublasDestroy(d->blas);
    if (d->blas_ws) cudaFree(d->blas_ws);
    if (d->split_counters) cudaFree(d->split_counters);
    cuda_pinned_slots_free(d);
    if (d->stream) cudaStreamDestroy(d->stream);
    cudaGetLastError();
    delete d;
}

// A cached block for the class, else new memory; NULL when neither gives one
// (nothing reclaimed, no error set).
static void *alloc_cached_or_new(cuda_dev *d, size_t cls) {
    std::lock_guard<std::mutex> g(d->mu);
    return take_locked(d, cls, true);
}

static void *cuda_alloc_fn(moe_allocator *self, size_t nbytes) {
    cuda_dev *d = (cuda_dev *)self->state;
    size_t cls = size_class(nbytes);
    void *p = alloc_cached_or_new(d, cls);
    if (p) return p;
    bool capturing;
    {
        std::lock_guard<std::mutex> g(d->mu);
        capturing = d->capture != NULL;
    }
    // Out of memory: let the embedder drop garbage (it frees into our cache, so
    // the lock must not be held), then return the whole cache to the driver.
    // Not while a graph is captured: the collection's finalizers may wait for
    // the device or free pinned memory, and the release waits for the stream,
    // none of which a capture allows.
    moe_ctx *ctx = d->ctx;
    if (!capturing && ctx && ctx->reclaim) ctx->reclaim(ctx->reclaim_arg);
    std::lock_guard<std::mutex> g(d->mu);
    p = take_locked(d, cls, false);   // reclaim freed a block that fits
    if (!p) {
        release_cache_locked(d);
        p = take_locked(d, cls, true);
    }
    if (!p) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        cudaGetLastError();
        moe_error(MOE_ERR_OOM,
                  "cuda:%d: out of memory allocating %zu bytes (%.1f MiB)%s; %zu bytes in use by tensors, "
                  "%zu bytes free in segments still partly in use (not returned to the driver), device has %zu of "
                  "%zu bytes free",
                  d->index, nbytes, nbytes / 1048576.0, capturing ? " while capturing a CUDA graph" : "",
                  d->bytes_in_use, cuda_alloc_cached_locked(d), free_b, total_b);
        return NULL;
    }
    return p;
}

static void cuda_free_fn(moe_allocator *self, void *ptr, size_t nbytes) {
    (void)nbytes;
    if (!ptr) return;
    cuda_dev *d = (cuda_dev *)self->state;
    bool destroy = false;
    {
        std::lock_guard<std::mutex> g(d->mu);
        auto it = d->live.find(ptr);
        if (it == d->live.end()) return;   // not ours or freed twice: ignore rather than corrupt the cache
        cuda_dev::live_block lb = it->second;
        d->live.erase(it);
        d->bytes_in_use -= lb.blk->size;
        // back to the pair it came from: a graph's block never serves work outside the graph
        moe_block_pool_free(lb.small ? lb.owner->small : lb.owner->large, lb.blk);
        lb.owner->live--;
        if (lb.owner->retired && !lb.owner->live) cuda_alloc_reap_locked(d);
        destroy = d->closing && d->live.empty() && !d->n_graphs;
    }
    if (destroy) cuda_dev_destroy(d);
}

void *cuda_scratch_alloc(cuda_dev *d, size_t nbytes) { return cuda_alloc_fn(&d->alloc, nbytes); }
void *cuda_scratch_try_alloc(cuda_dev *d, size_t nbytes) { return alloc_cached_or_new(d, size_class(nbytes)); }
void cuda_scratch_free(cuda_dev *d, void *p, size_t nbytes) { cuda_free_fn(&d->alloc, p, nbytes); }
