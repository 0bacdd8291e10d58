// The CUDA backend: device discovery, per-device state, the dispatch table.
#include "cuda_common.cuh"
#include "moe_cuda.h"
#include <cuda_profiler_api.h>

#include <algorithm>

// Every entry is implemented; one left NULL would be reported by ops.c as
// "<op> is not supported on cuda".
static const moe_backend cuda_backend = {
    /* name */ "cuda",
    /* device_type */ MOE_CUDA,
    /* synchronize */ cuda_synchronize,
    /* copy */ cuda_copy,
    /* fill */ cuda_fill,
    /* fill_randn */ cuda_fill_randn,
    /* fill_rand */ cuda_fill_rand,
    /* gemm */ cuda_gemm,
    /* gemm_grouped */ cuda_gemm_grouped,
    /* gemm_grouped_wgrad */ cuda_gemm_grouped_wgrad,
    /* binary */ cuda_binary,
    /* unary */ cuda_unary,
    /* unary_backward */ cuda_unary_backward,
    /* axpy */ cuda_axpy,
    /* reduce */ cuda_reduce,
    /* softmax */ cuda_softmax,
    /* softmax_backward */ cuda_softmax_backward,
    /* log_softmax */ cuda_log_softmax,
    /* log_softmax_backward */ cuda_log_softmax_backward,
    /* logsumexp */ cuda_logsumexp,
    /* topk */ cuda_topk,
    /* gather */ cuda_gather,
    /* scatter_add */ cuda_scatter_add,
    /* index_select */ cuda_index_select,
    /* index_add */ cuda_index_add,
    /* rmsnorm */ cuda_rmsnorm,
    /* rmsnorm_backward */ cuda_rmsnorm_backward,
    /* layernorm */ cuda_layernorm,
    /* layernorm_backward */ cuda_layernorm_backward,
    /* rope */ cuda_rope,
    /* attention */ cuda_attention,
    /* attention_backward */ cuda_attention_backward,
    /* swiglu */ cuda_swiglu,
    /* swiglu_backward */ cuda_swiglu_backward,
    /* cross_entropy */ cuda_cross_entropy,
    /* cross_entropy_backward */ cuda_cross_entropy_backward,
    /* adamw */ cuda_adamw,
    /* sumsq */ cuda_sumsq,
    /* gather_sum */ cuda_gather_sum,
    /* combine_backward */ cuda_combine_backward,
    /* ep_token_slots */ cuda_ep_token_slots,
    /* slot_tokens */ cuda_slot_tokens,
    /* ep_pack */ cuda_ep_pack,
    /* ep_unpack */ cuda_ep_unpack,
    /* ep_regroup */ cuda_ep_regroup,
    /* gemm_grouped_pair */ cuda_gemm_grouped_pair,
    /* cross_entropy_fused */ cuda_cross_entropy_fused,
    /* rmsnorm_rope */ cuda_rmsnorm_rope,
    /* rmsnorm_rope_backward */ cuda_rmsnorm_rope_backward,
    /* gemm_grouped_swiglu */ cuda_gemm_grouped_swiglu,
    /* gemm_grouped_swiglu_backward */ cuda_gemm_grouped_swiglu_backward,
    /* read_start */ cuda_read_start,
    /* read_finish */ cuda_read_finish,
    /* gemm_grouped_swiglu_rows */ cuda_gemm_grouped_swiglu_rows,
    /* gemm_grouped_wgrad_rows */ cuda_gemm_grouped_wgrad_rows,
    /* gemm_grouped_swiglu_backward_w */ cuda_gemm_grouped_swiglu_backward_w,
    /* gemm_grouped_rows_fuses */ cuda_gemm_grouped_rows_fuses,
    /* gemm_grouped_swiglu_backward_w_fuses */ cuda_gemm_grouped_swiglu_backward_w_fuses,
    /* gemm_grouped_dev */ cuda_gemm_grouped_dev,
    /* gemm_grouped_wgrad_dev */ cuda_gemm_grouped_wgrad_dev,
    /* gemm_grouped_swiglu_dev */ cuda_gemm_grouped_swiglu_dev,
    /* gemm_grouped_swiglu_backward_w_dev */ cuda_gemm_grouped_swiglu_backward_w_dev,
    /* adamw_advance */ cuda_adamw_advance,
    /* master_split */ cuda_master_split,
    /* master_join */ cuda_master_join,
    /* index_select_slots */ cuda_index_select_slots,
};

extern "C" int moe_cuda_device_count(void) {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();
        return 0;
    }
    if (n < 0) n = 0;
    if (n > MOE_MAX_DEVICES) n = MOE_MAX_DEVICES;
    return n;
}

static cuda_dev *dev_of(moe_ctx *ctx, int i) {
    moe_allocator *a = ctx->allocators[MOE_CUDA][i];
    return a ? (cuda_dev *)a->state : NULL;
}

cuda_dev *cuda_dev_get(moe_ctx *ctx, moe_device dev) {
    if (dev.type != MOE_CUDA || dev.index < 0 || dev.index >= MOE_MAX_DEVICES || !dev_of(ctx, dev.index)) {
        moe_error(MOE_ERR_DEVICE, "cuda:%d is not available (backend not installed or no such GPU)", dev.index);
        return NULL;
    }
    cuda_dev *d = dev_of(ctx, dev.index);
    cudaError_t e = cudaSetDevice(d->index);
    if (e != cudaSuccess) {
        moe_error(MOE_ERR_DEVICE, "cuda:%d: cudaSetDevice: %s", d->index, cudaGetErrorString(e));
        return NULL;
    }
    return d;
}

static moe_status init_dev(cuda_dev *d) {
    CU_TRY(cudaSetDevice(d->index), "cudaSetDevice");
    CU_TRY(cudaDeviceGetAttribute(&d->sm_count, cudaDevAttrMultiProcessorCount, d->index), "device attributes");
    CU_TRY(cudaDeviceGetAttribute(&d->l2_bytes, cudaDevAttrL2CacheSize, d->index), "device attributes");
    CU_TRY(cudaStreamCreateWithFlags(&d->stream, cudaStreamNonBlocking), "cudaStreamCreate");
    cublasStatus_t s = cublasCreate(&d->blas);
    if (s != CUBLAS_STATUS_SUCCESS) {
        d->blas = NULL;
        return moe_error(MOE_ERR_DEVICE, "cuda:%d: cublasCreate: %s", d->index, cublasGetStatusString(s));
    }
    s = cublasSetStream(d->blas, d->stream);
    if (s != CUBLAS_STATUS_SUCCESS)
        return moe_error(MOE_ERR_DEVICE, "cuda:%d: cublasSetStream: %s", d->index, cublasGetStatusString(s));
    // A workspace of our own: without one, cuBLAS takes a fresh one from its
    // pool per call, and a GEMM of a shape it has not seen costs ~130 us of
    // host time instead of ~7 (measured on an H100: bench/cublas_overhead.cu).
    // Expert GEMMs change shape every step, so this matters.
    const size_t ws = (size_t)32 << 20;
    CU_TRY(cudaMalloc(&d->blas_ws, ws), "cuBLAS workspace");
    s = cublasSetWorkspace(d->blas, d->blas_ws, ws);
    if (s != CUBLAS_STATUS_SUCCESS)
        return moe_error(MOE_ERR_DEVICE, "cuda:%d: cublasSetWorkspace: %s", d->index, cublasGetStatusString(s));
    return MOE_OK;
}

extern "C" moe_status moe_cuda_backend_install(moe_ctx *ctx) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_backend_install: no context");
    if (ctx->backends[MOE_CUDA]) return MOE_OK;   // already installed
    int grouped_gemm = 0, grouped_wgrad = 0;   // read once, copied into every device
    MOE_TRY(cuda_grouped_gemm_from_env(&grouped_gemm));
    grouped_wgrad = grouped_gemm;
    MOE_TRY(cuda_grouped_wgrad_from_env(&grouped_wgrad));
    int lanes = 1;
    MOE_TRY(cuda_grouped_lanes_from_env(&lanes));
    int tma = -1, tma_cluster = 2;
    MOE_TRY(cuda_grouped_tma_from_env(&tma, &tma_cluster));
    int tma_swiglu = 1;   // the forward's epilogue (cuda_grouped_config.cu)
    MOE_TRY(cuda_tma_swiglu_from_env(&tma_swiglu));
    int n = moe_cuda_device_count();
    if (n == 0) return moe_error(MOE_ERR_DEVICE, "no CUDA device is visible (or the driver is missing)");
    for (int i = 0; i < n; i++) {
        moe_allocator *a = cuda_alloc_create(i, ctx);
        moe_status st = a ? init_dev((cuda_dev *)a->state) : MOE_ERR_OOM;
        if (st != MOE_OK) {
            if (a) cuda_dev_destroy((cuda_dev *)a->state);
            for (int j = 0; j < i; j++) {
                cuda_dev_destroy(dev_of(ctx, j));
                ctx->allocators[MOE_CUDA][j] = NULL;
            }
            return st;
        }
        ((cuda_dev *)a->state)->grouped_gemm = grouped_gemm;
        ((cuda_dev *)a->state)->grouped_wgrad = grouped_wgrad;
        ((cuda_dev *)a->state)->loop_lanes = lanes;
        ((cuda_dev *)a->state)->grouped_tma = tma;
        ((cuda_dev *)a->state)->tma_cluster = tma_cluster;
        ((cuda_dev *)a->state)->att_ds_cap = (size_t)256 << 20;
        ((cuda_dev *)a->state)->tma_swiglu = tma_swiglu;
        const char *xent = getenv("MOELAB_XENT_PIPE");   // "0": the fused cross entropy without the copy engine
        ((cuda_dev *)a->state)->xent_pipe = !(xent && xent[0] == '0');
        ctx->allocators[MOE_CUDA][i] = a;
    }
    ctx->backends[MOE_CUDA] = &cuda_backend;
    return MOE_OK;
}

extern "C" void moe_cuda_backend_uninstall(moe_ctx *ctx) {
    if (!ctx) return;
    for (int i = 0; i < MOE_MAX_DEVICES; i++) {
        cuda_dev *d = dev_of(ctx, i);
        if (!d) continue;
        ctx->allocators[MOE_CUDA][i] = NULL;
        bool now;
        {
            std::lock_guard<std::mutex> g(d->mu);
            d->ctx = NULL;
            d->closing = true;
            now = d->live.empty() && !d->n_graphs;
        }
        if (now) cuda_dev_destroy(d);   // else the last cuda_free_fn destroys it
    }
    ctx->backends[MOE_CUDA] = NULL;
}

extern "C" moe_status moe_cuda_memory_stats(moe_ctx *ctx, int device, moe_cuda_mem_stats *out) {
    if (!ctx || device < 0 || device >= MOE_MAX_DEVICES || !dev_of(ctx, device))
        return moe_error(MOE_ERR_DEVICE, "cuda:%d is not available", device);
    cuda_dev *d = dev_of(ctx, device);
    size_t fr = 0, tot = 0;
    CU_TRY(cudaSetDevice(d->index), "cudaSetDevice");
    CU_TRY(cudaMemGetInfo(&fr, &tot), "cudaMemGetInfo");
    std::lock_guard<std::mutex> g(d->mu);
    out->device_free = fr;
    out->device_total = tot;
    out->bytes_in_use = d->bytes_in_use;
    out->bytes_cached = cuda_alloc_cached_locked(d);
    out->peak_bytes_in_use = d->peak_in_use;
    out->bytes_reserved = cuda_alloc_reserved_locked(d);
    out->peak_bytes_reserved = d->peak_reserved;
    out->num_cuda_malloc = d->n_malloc;
    out->num_cache_hits = d->n_hits;
    return MOE_OK;
}

extern "C" void *moe_cuda_stream(moe_ctx *ctx, int device) {
    if (!ctx || device < 0 || device >= MOE_MAX_DEVICES || !dev_of(ctx, device)) {
        moe_error(MOE_ERR_DEVICE, "cuda:%d is not available", device);
        return NULL;
    }
    return (void *)dev_of(ctx, device)->stream;
}

extern "C" moe_status moe_cuda_reset_peak_memory(moe_ctx *ctx, int device) {
    if (!ctx || device < 0 || device >= MOE_MAX_DEVICES || !dev_of(ctx, device))
        return moe_error(MOE_ERR_DEVICE, "cuda:%d is not available", device);
    cuda_dev *d = dev_of(ctx, device);
    std::lock_guard<std::mutex> g(d->mu);
    d->peak_in_use = d->bytes_in_use;
    d->peak_reserved = cuda_alloc_reserved_locked(d);
    return MOE_OK;
}

extern "C" moe_status moe_cuda_profiler_range(int on) {
    cudaError_t e = on ? cudaProfilerStart() : cudaProfilerStop();
    if (e != cudaSuccess) return moe_error(MOE_ERR_DEVICE, "cuda profiler range: %s", cudaGetErrorString(e));
    return MOE_OK;
}

extern "C" moe_status moe_cuda_empty_cache(moe_ctx *ctx, int device) {
    if (!ctx || device < 0 || device >= MOE_MAX_DEVICES || !dev_of(ctx, device))
        return moe_error(MOE_ERR_DEVICE, "cuda:%d is not available", device);
    cuda_alloc_release_cache(dev_of(ctx, device));
    return MOE_OK;
}

extern "C" moe_status moe_cuda_time_ms(moe_ctx *ctx, int device, moe_status (*fn)(void *arg), void *arg, int warmup,
                                       int iters, double *median_ms) {
    if (!ctx || device < 0 || device >= MOE_MAX_DEVICES || !dev_of(ctx, device))
        return moe_error(MOE_ERR_DEVICE, "cuda:%d is not available", device);
    if (!fn || !median_ms || iters < 1 || warmup < 0)
        return moe_error(MOE_ERR_ARG, "moe_cuda_time_ms: expected fn, median_ms, iters >= 1 and warmup >= 0");
    cuda_dev *d = dev_of(ctx, device);
    CU_TRY(cudaSetDevice(d->index), "cudaSetDevice");
    for (int i = 0; i < warmup; i++) MOE_TRY(fn(arg));
    std::vector<cudaEvent_t> ev(2 * (size_t)iters, nullptr);
    moe_status st = MOE_OK;
    for (auto &e : ev)
        if (st == MOE_OK && cudaEventCreate(&e) != cudaSuccess)
            st = moe_error(MOE_ERR_DEVICE, "cuda timing: cudaEventCreate failed");
    for (int i = 0; i < iters && st == MOE_OK; i++) {
        if (cudaEventRecord(ev[2 * i], d->stream) != cudaSuccess) st = moe_error(MOE_ERR_DEVICE, "cuda timing: record");
        if (st == MOE_OK) st = fn(arg);
        if (st == MOE_OK && cudaEventRecord(ev[2 * i + 1], d->stream) != cudaSuccess)
            st = moe_error(MOE_ERR_DEVICE, "cuda timing: record");
    }
    std::vector<double> ms;
    if (st == MOE_OK && cudaStreamSynchronize(d->stream) != cudaSuccess)
        st = moe_error(MOE_ERR_DEVICE, "cuda timing: synchronize: %s", cudaGetErrorString(cudaGetLastError()));
    for (int i = 0; i < iters && st == MOE_OK; i++) {
        float t = 0;
        if (cudaEventElapsedTime(&t, ev[2 * i], ev[2 * i + 1]) != cudaSuccess)
            st = moe_error(MOE_ERR_DEVICE, "cuda timing: cudaEventElapsedTime failed");
        ms.push_back(t);
    }
    for (auto &e : ev)
        if (e) cudaEventDestroy(e);
    if (st != MOE_OK) return st;
    std::sort(ms.begin(), ms.end());
    *median_ms = ms.size() % 2 ? ms[ms.size() / 2] : 0.5 * (ms[ms.size() / 2 - 1] + ms[ms.size() / 2]);
    return MOE_OK;
}

moe_status cuda_synchronize(moe_ctx *ctx, moe_device dev) {
    CUDA_ENTER(d, ctx, dev);
    CUDA_NOT_IN_CAPTURE(d, "synchronize");
    CU_TRY(cudaStreamSynchronize(d->stream), "synchronize");
    return MOE_OK;
}
