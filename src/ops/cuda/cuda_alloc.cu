// The caching, stream-aware device allocator (one per GPU).
//
// Sizes are rounded to a class: multiples of 512 B up to 1 MiB, multiples of
// 2 MiB (the driver's own granularity) above. Freed blocks go to a cache
// ordered by size and are handed out again without cudaMalloc: a request takes
// a cached block of its own class or, above 1 MiB, the smallest cached block
// at most an eighth larger, so tensors whose sizes move a little from step to
// step still reuse blocks. (Rounding up to four classes per power of two, as
// the first version did, left a quarter of a large block unused: 2.1 GB of the
// 10.7 GB that the whole-step benchmark's parameters and AdamW state took.)
// Bytes in use count whole blocks.
//
// Stream awareness: every kernel, copy and cuBLAS call of a device is issued on
// that device's one stream (cuda_dev.stream). A block freed on the host may
// still be read by queued work, but whoever gets it next also queues its work
// on the same stream, after that work, so reuse without events is safe. Work on
// any other stream would need an event per block; nothing does that today.
//
// Out of memory: ctx->reclaim (a full Lua GC, which frees blocks back into this
// cache), then every cached block is cudaFree'd, then one retry; after that
// MOE_ERR_OOM with the requested size, bytes in use and bytes cached.
#include "cuda_common.cuh"

#include <new>

static const size_t SMALL_LIMIT = (size_t)1 << 20;
static const size_t LARGE_STEP = (size_t)2 << 20;

static size_t size_class(size_t n) {
    if (n == 0) n = 1;
    if (n <= SMALL_LIMIT) return (n + 511) & ~(size_t)511;
    return (n + LARGE_STEP - 1) & ~(LARGE_STEP - 1);
}

// The cached block for a request of class cls, removed from the cache; NULL
// when none fits. Caller holds d->mu.
static void *take_cached_locked(cuda_dev *d, size_t cls, size_t *got) {
    auto it = d->cache.lower_bound(cls);
    size_t limit = cls > SMALL_LIMIT ? cls + cls / 8 : cls;
    if (it == d->cache.end() || it->first > limit) return NULL;
    void *p = it->second.back();
    it->second.pop_back();
    *got = it->first;
    if (it->second.empty()) d->cache.erase(it);
    d->bytes_cached -= *got;
    return p;
}

static void *cuda_alloc_fn(moe_allocator *self, size_t nbytes);
static void cuda_free_fn(moe_allocator *self, void *ptr, size_t nbytes);

// cudaFree every cached block. Caller holds d->mu.
static void release_cache_locked(cuda_dev *d) {
    if (d->cache.empty()) return;
    cudaSetDevice(d->index);
    cudaStreamSynchronize(d->stream);   // queued work may still use blocks freed to the cache
    for (auto &kv : d->cache)
        for (void *p : kv.second) cudaFree(p);
    d->cache.clear();
    d->bytes_cached = 0;
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
    d->bytes_in_use = d->bytes_cached = d->peak_in_use = 0;
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
    cuda_lanes_free(d);
    if (d->blas) cublasDestroy(d->blas);
    if (d->blas_ws) cudaFree(d->blas_ws);
    if (d->split_counters) cudaFree(d->split_counters);
    cuda_pinned_slots_free(d);
    if (d->stream) cudaStreamDestroy(d->stream);
    cudaGetLastError();
    delete d;
}

static void *try_malloc(cuda_dev *d, size_t cls) {
    void *p = NULL;
    cudaSetDevice(d->index);
    cudaError_t e = cudaMalloc(&p, cls);
    if (e != cudaSuccess) {
        cudaGetLastError();   // an allocation failure must not surface at the next launch check
        return NULL;
    }
    return p;
}

// A cached block for the class, else one cudaMalloc; NULL when neither gives
// one (nothing reclaimed, no error set).
static void *alloc_cached_or_new(cuda_dev *d, size_t cls) {
    std::lock_guard<std::mutex> g(d->mu);
    size_t got = cls;
    void *p = take_cached_locked(d, cls, &got);
    if (p) {
        d->n_hits++;
    } else {
        p = try_malloc(d, cls);
        if (p) d->n_malloc++;
    }
    if (p) {
        d->live[p] = got;
        d->bytes_in_use += got;
        if (d->bytes_in_use > d->peak_in_use) d->peak_in_use = d->bytes_in_use;
    }
    return p;
}

static void *cuda_alloc_fn(moe_allocator *self, size_t nbytes) {
    cuda_dev *d = (cuda_dev *)self->state;
    size_t cls = size_class(nbytes);
    void *p = alloc_cached_or_new(d, cls);
    if (p) return p;
    // Out of memory: let the embedder drop garbage (it frees into our cache, so
    // the lock must not be held), then return the whole cache to the driver.
    moe_ctx *ctx = d->ctx;
    if (ctx && ctx->reclaim) ctx->reclaim(ctx->reclaim_arg);
    std::lock_guard<std::mutex> g(d->mu);
    size_t got = cls;
    p = take_cached_locked(d, cls, &got);   // reclaim freed a block that fits
    if (!p) {
        release_cache_locked(d);
        p = try_malloc(d, cls);
        if (p) d->n_malloc++;
    }
    if (!p) {
        size_t free_b = 0, total_b = 0;
        cudaMemGetInfo(&free_b, &total_b);
        cudaGetLastError();
        moe_error(MOE_ERR_OOM,
                  "cuda:%d: out of memory allocating %zu bytes (%.1f MiB); %zu bytes in use by tensors, "
                  "%zu bytes cached, device has %zu of %zu bytes free",
                  d->index, nbytes, nbytes / 1048576.0, d->bytes_in_use, d->bytes_cached, free_b, total_b);
        return NULL;
    }
    d->live[p] = got;
    d->bytes_in_use += got;
    if (d->bytes_in_use > d->peak_in_use) d->peak_in_use = d->bytes_in_use;
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
        size_t size = it->second;
        d->live.erase(it);
        d->bytes_in_use -= size;
        d->cache[size].push_back(ptr);
        d->bytes_cached += size;
        destroy = d->closing && d->live.empty();
    }
    if (destroy) cuda_dev_destroy(d);
}

void *cuda_scratch_alloc(cuda_dev *d, size_t nbytes) { return cuda_alloc_fn(&d->alloc, nbytes); }
void *cuda_scratch_try_alloc(cuda_dev *d, size_t nbytes) { return alloc_cached_or_new(d, size_class(nbytes)); }
void cuda_scratch_free(cuda_dev *d, void *p, size_t nbytes) { cuda_free_fn(&d->alloc, p, nbytes); }
