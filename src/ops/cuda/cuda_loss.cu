// Cross entropy over rows of logits [N, V] with i64 targets [N]; reads the
// logits in their own dtype (no f32 copy), f32 accumulation, one block per row.
// loss and lse may be f32 or the logits' dtype (S below).
// A target outside [0, V) that is not ignore_index gives a NaN loss for its row
// (and NaN gradients): reporting it would need a host sync.
//
// Forward: one pass over each row. Every thread keeps an online (max, sum of
// exp(x - max)) pair over its elements, read as 16-byte vectors four at a time
// (the row's unaligned head and its tail element by element); the block then
// merges the pairs (warp shuffles, then one warp over the warps) in a fixed
// order, so the result is deterministic. exp is exp2 of x*log2(e) - max*log2(e).
// Backward: one pass per row writing dlogits = scale * (exp(x - lse) - [j == t])
// from the saved lse (rows with ignore_index are written as zeros without
// reading their logits); vectorised when logits and dlogits have the same
// 16-byte alignment, element by element otherwise.
// Fused (training: the scale is known before backward): per row the forward
// pass, then the backward pass over the same row, so device memory is read
// once instead of twice; the values are those of the two kernels. The
// forward keeps the row in shared memory (at the row's own 16-byte phase, so
// the vector paths line up) where it fits; else the backward re-reads it and
// hopes for L2 (measured on an H100 at [8192, 50304] bf16: 714 us from L2
// and device memory, against 274 + 562 for the two kernels).
#include "cuda_common.cuh"
#include "cuda_mbarrier.cuh"
#include "cuda_vec.cuh"
#include "moe_cuda.h"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define L2E 1.4426950408889634f   /* log2(e) */
#define XENT_THREADS 256
#define XENT_UNROLL 4             /* vectors per thread in flight */

// N elements of T at p as f32: one 16-byte load (N > 1, p aligned) or one element.
// CS: evict-first (the data is read once); else cached for a second read.
template <typename T, int N, bool CS = true>
__device__ __forceinline__ void load_n(const T *p, float *f) {
    if constexpr (N == 1) f[0] = to_f32(*p);
    else unpack(CS ? ld16_cs(p) : ld16(p), *reinterpret_cast<float (*)[N]>(f));
}
template <typename T, int N>
__device__ __forceinline__ void store_n(T *p, const float *f) {
    if constexpr (N == 1) *p = from_f32<T>(f[0]);
    else st16_cs(p, pack(*reinterpret_cast<const float (*)[N]>(f)));
}

// Online softmax statistics: m the running max (-inf while empty), s the sum
// of exp(x - m) (with m taken as 0 while it is -inf, as the two-pass version
// did for all -inf rows). NaN logits make s NaN; +inf ones give NaN as before.
template <int K>
__device__ __forceinline__ void os_absorb(float &m, float &s, const float *v) {
    float cm = v[0];
#pragma unroll
    for (int k = 1; k < K; k++) cm = fmaxf(cm, v[k]);
    if (cm > m) {
        s *= exp2f((m - cm) * L2E);
        m = cm;
    }
    float ml = (m == -INFINITY ? 0.0f : m) * L2E, acc = 0.0f;
#pragma unroll
    for (int k = 0; k < K; k++) acc += exp2f(fmaf(v[k], L2E, -ml));
    s += acc;
}
__device__ __forceinline__ void os_merge(float &m, float &s, float m2, float s2) {
    float M = fmaxf(m, m2);
    if (M == -INFINITY) {   // both empty (or only NaNs): nothing to rescale
        s += s2;
        return;
    }
    s = s * exp2f((m - M) * L2E) + s2 * exp2f((m2 - M) * L2E);
    m = M;
}

// Elements of a row of n before its first 16-byte boundary (all of them if
// fewer). The row pointer is aligned to its element size.
template <typename T>
__device__ __forceinline__ int64_t head_len(const T *p, int64_t n) {
    int64_t h = (int64_t)(((16u - ((unsigned)(uintptr_t)p & 15u)) & 15u) / sizeof(T));
    return h < n ? h : n;
}

// The forward of row r (xr its logits, t its target): lse[r], loss[r]. BCAST:
// returns the row's lse, as stored in S, to every thread (the fused kernel's
// backward needs it); else only a meaningless value. CS: see load_n.
// keep (not NULL): the row is copied there as it is read (keep + j for element j).
template <typename T, typename S, bool BCAST, bool CS>
__device__ __forceinline__ float xent_row(S *loss, S *lse, const T *xr, int64_t t, int64_t r, int64_t n,
                                          int64_t ignore, T *keep = nullptr) {
    constexpr int N = VEC<T>::N, U = XENT_UNROLL;
    __shared__ float shm[32], shs[32], shl;
    const int bs = blockDim.x;
    float m = -INFINITY, s = 0.0f;
    const int64_t head = head_len(xr, n);
    const T *xv = xr + head;
    const int64_t nv = (n - head) / N;
    T *kv = keep ? keep + head : nullptr;
    if ((int64_t)threadIdx.x < head) {
        float v = to_f32(xr[threadIdx.x]);
        if (keep) keep[threadIdx.x] = xr[threadIdx.x];
        os_absorb<1>(m, s, &v);
    }
    int64_t i = threadIdx.x;
    for (; i + (U - 1) * bs < nv; i += U * bs) {
        float v[U * N];
#pragma unroll
        for (int u = 0; u < U; u++) load_n<T, N, CS>(xv + (i + u * bs) * N, v + u * N);
        if (kv)
#pragma unroll
            for (int u = 0; u < U; u++) st16(kv + (i + u * bs) * N, pack(*reinterpret_cast<float (*)[N]>(v + u * N)));
        os_absorb<U * N>(m, s, v);
    }
    for (; i < nv; i += bs) {
        float v[N];
        load_n<T, N, CS>(xv + i * N, v);
        if (kv) st16(kv + i * N, pack(v));
        os_absorb<N>(m, s, v);
    }
    const int64_t e = head + nv * N + threadIdx.x;   // the tail: fewer than N elements
    if (e < n) {
        float v = to_f32(xr[e]);
        if (keep) keep[e] = xr[e];
        os_absorb<1>(m, s, &v);
    }
    // merge: within each warp, then warp 0 over the warps
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
        os_merge(m, s, m2, s2);
    }
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = bs >> 5;
    __syncthreads();   // the previous row's reads of shm/shs are done
    if (lane == 0) { shm[w] = m; shs[w] = s; }
    __syncthreads();
    if (w == 0) {
        m = lane < nw ? shm[lane] : -INFINITY;
        s = lane < nw ? shs[lane] : 0.0f;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            float m2 = __shfl_xor_sync(0xffffffffu, m, o), s2 = __shfl_xor_sync(0xffffffffu, s, o);
            os_merge(m, s, m2, s2);
        }
        if (lane == 0) {
            float l = (m == -INFINITY ? 0.0f : m) + logf(s);
            float v = t == ignore ? 0.0f : (t < 0 || t >= n) ? NAN : l - to_f32(xr[t]);
            lse[r] = from_f32<S>(l);
            loss[r] = from_f32<S>(v);
            if (BCAST) shl = to_f32(from_f32<S>(l));
        }
    }
    if (!BCAST) return 0.0f;
    __syncthreads();   // shl is rewritten only after the next row's two barriers: all have read it by then
    return shl;
}

template <typename T, typename S>
__global__ void __launch_bounds__(XENT_THREADS)
k_xent(S *loss, S *lse, const T *x, const int64_t *tgt, int64_t rows, int64_t n, int64_t ignore) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        xent_row<T, S, false, true>(loss, lse, x + r * n, tgt[r], r, n, ignore);
}

// dlogits of one row: scale * exp(x - lse) - (j == t ? scale : 0), 0 for an
// ignored row. N > 1: xr and dr share their alignment (the caller checks), so
// one head length serves both; N == 1: element by element.
// CS false: xr may be shared memory (streaming loads are global only).
template <typename T, int N, bool CS = true>
__device__ __forceinline__ void xent_bwd_row(T *dr, const T *xr, float lse, int64_t t, int64_t n, int64_t ignore,
                                             float scale) {
    constexpr int U = XENT_UNROLL;
    const int bs = blockDim.x;
    const int mode = t == ignore ? 1 : (t < 0 || t >= n) ? 2 : 0;   // 1: zeros, 2: NaN
    const float ll = mode == 0 ? lse * L2E : 0.0f, fill = mode == 1 ? 0.0f : NAN;
    const int64_t head = N > 1 ? head_len(dr, n) : 0;
    const int64_t nv = (n - head) / N;
    const T *xv = xr + head;
    T *dv = dr + head;
    // element j of the row from its logit (scalar head and tail)
    auto grad1 = [&](int64_t j) -> float {
        return mode ? fill : scale * exp2f(fmaf(to_f32(xr[j]), L2E, -ll)) - (j == t ? scale : 0.0f);
    };
    // N elements from j0 on, in place
    auto gradn = [&](float *v, int64_t j0) {
        const int kt = (uint64_t)(t - j0) < (uint64_t)N ? (int)(t - j0) : -1;
#pragma unroll
        for (int k = 0; k < N; k++) v[k] = scale * exp2f(fmaf(v[k], L2E, -ll)) - (k == kt ? scale : 0.0f);
    };
    if ((int64_t)threadIdx.x < head) dr[threadIdx.x] = from_f32<T>(grad1(threadIdx.x));
    int64_t i = threadIdx.x;
    if (mode) {
        float g[N];
#pragma unroll
        for (int k = 0; k < N; k++) g[k] = fill;
        for (; i < nv; i += bs) store_n<T, N>(dv + i * N, g);
    } else {
        for (; i + (U - 1) * bs < nv; i += U * bs) {
            float v[U * N];
#pragma unroll
            for (int u = 0; u < U; u++) load_n<T, N, CS>(xv + (i + u * bs) * N, v + u * N);
#pragma unroll
            for (int u = 0; u < U; u++) {
                gradn(v + u * N, head + (i + u * bs) * N);
                store_n<T, N>(dv + (i + u * bs) * N, v + u * N);
            }
        }
        for (; i < nv; i += bs) {
            float v[N];
            load_n<T, N, CS>(xv + i * N, v);
            gradn(v, head + i * N);
            store_n<T, N>(dv + i * N, v);
        }
    }
    const int64_t e = head + nv * N + threadIdx.x;   // the tail
    if (e < n) dr[e] = from_f32<T>(grad1(e));
}

template <typename T, typename S, int N>
__global__ void __launch_bounds__(XENT_THREADS)
k_xent_bwd(T *dx, const T *x, const S *lse, const int64_t *tgt, int64_t rows, int64_t n, int64_t ignore, float scale) {
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x)
        xent_bwd_row<T, N>(dx + r * n, x + r * n, to_f32(lse[r]), tgt[r], n, ignore, scale);
}

// Forward and backward of each row in one block; KEEP: the second pass from
// shared memory (n * sizeof(T) + 16 bytes of it), else from L2 or device memory.
template <typename T, typename S, int N, bool KEEP>
__global__ void __launch_bounds__(XENT_THREADS)
k_xent_fused(S *loss, S *lse, T *dx, const T *x, const int64_t *tgt, int64_t rows, int64_t n, int64_t ignore,
             float scale) {
    extern __shared__ __align__(16) unsigned char xs_raw[];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const int64_t t = tgt[r];
        const T *xr = x + r * n;
        T *keep = KEEP ? reinterpret_cast<T *>(xs_raw + ((uintptr_t)xr & 15u)) : nullptr;
        float l = xent_row<T, S, true, false>(loss, lse, xr, t, r, n, ignore, keep);   // ends with a barrier
        if (KEEP) {
            xent_bwd_row<T, N, false>(dx + r * n, keep, l, t, n, ignore, scale);
            __syncthreads();   // the next row overwrites keep
        } else {
            xent_bwd_row<T, N>(dx + r * n, xr, l, t, n, ignore, scale);
        }
    }
}

// The fused kernel with the rows streamed in by the copy engine: one block an
// SM holds two rows in shared memory, and while it reduces and writes one, one
// bulk copy brings in its next (bf16 rows of a multiple of 8 elements, 16-byte
// aligned, two of which fit the block's shared memory). The kernel above
// reads a row with its threads' loads, then writes it, so an SM's two blocks
// left device memory idle in turns (60% of its peak at [2048, 50304], ncu).
// The values are those of k_xent_fused: the same row functions, reading shared memory.
#define XENT_PIPE_THREADS 512
template <typename S>
__global__ void __launch_bounds__(XENT_PIPE_THREADS, 1)
k_xent_fused_pipe(S *loss, S *lse, bf16 *dx, const bf16 *x, const int64_t *tgt, int64_t rows, int64_t n,
                  int64_t ignore, float scale) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
    extern __shared__ __align__(16) unsigned char xs_raw[];
    __shared__ __align__(8) uint64_t full[2];
    bf16 *buf[2] = {reinterpret_cast<bf16 *>(xs_raw), reinterpret_cast<bf16 *>(xs_raw) + n};
    const unsigned bytes = (unsigned)(n * (int64_t)sizeof(bf16));
    // row r into buffer b, counted on its barrier (thread 0 only)
    auto fetch = [&](int64_t r, int b) {
        bar_expect(&full[b], bytes);
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n"
                     ::"r"(smem_u32(buf[b])), "l"(x + r * n), "r"(bytes), "r"(smem_u32(&full[b]))
                     : "memory");
    };
    if (threadIdx.x == 0) {
        bar_init(&full[0], 1);
        bar_init(&full[1], 1);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
        if ((int64_t)blockIdx.x < rows) fetch(blockIdx.x, 0);
    }
    __syncthreads();
    unsigned it = 0;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x, it++) {
        const int b = it & 1;
        // the other buffer was last read in the turn before, which ended with a barrier
        if (threadIdx.x == 0 && r + gridDim.x < rows) fetch(r + gridDim.x, b ^ 1);
        bar_wait(&full[b], (it >> 1) & 1);
        const int64_t t = tgt[r];
        const float l = xent_row<bf16, S, true, false>(loss, lse, buf[b], t, r, n, ignore);   // ends with a barrier
        xent_bwd_row<bf16, VEC<bf16>::N, false>(dx + r * n, buf[b], l, t, n, ignore, scale);
        __syncthreads();   // every read of buf[b] is done before the turn after next refills it
    }
#endif
}

static moe_status check_stat(const moe_tensor *x, const moe_tensor *s, const char *what) {
    if (s->dtype == x->dtype || s->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: loss and lse must be f32 or %s, got %s", what,
                     moe_dtype_name(x->dtype), moe_dtype_name(s->dtype));
}

// Threads per row: enough vectors for every thread on short rows, XENT_THREADS on long ones.
static int xent_threads(int64_t n, int per) {
    int th = cuda_row_threads((n + per - 1) / per);
    return th < XENT_THREADS ? th : XENT_THREADS;
}

template <typename T, typename S>
static void xent_bwd_launch(cuda_dev *d, moe_tensor *dlogits, const moe_tensor *logits, const moe_tensor *lse,
                            const int64_t *t, int64_t rows, int64_t n, int64_t ignore, float scale) {
    T *dx = PTR(T, dlogits);
    const T *x = PTR(const T, logits);
    unsigned g = cuda_row_grid(rows);
    if ((((uintptr_t)dx ^ (uintptr_t)x) & 15u) == 0)
        k_xent_bwd<T, S, VEC<T>::N><<<g, xent_threads(n, VEC<T>::N), 0, d->stream>>>(dx, x, PTR(const S, lse), t, rows,
                                                                                   n, ignore, scale);
    else
        k_xent_bwd<T, S, 1><<<g, xent_threads(n, 1), 0, d->stream>>>(dx, x, PTR(const S, lse), t, rows, n, ignore,
                                                                     scale);
}

template <typename T, typename S, int N>
static moe_status xent_fused_run(cuda_dev *d, S *loss, S *lse, T *dx, const T *x, const int64_t *t, int64_t rows,
                                 int64_t n, int64_t ignore, float scale) {
    unsigned g = cuda_row_grid(rows);
    int th = xent_threads(n, VEC<T>::N);
    int optin = 0;
    CU_TRY(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, d->index), "cross_entropy_fused");
    if constexpr (sizeof(T) == 2 && N > 1) {
        // two rows in shared memory and more rows than SMs: the streamed kernel
        const int64_t two = 2 * n * (int64_t)sizeof(T);
        if (d->xent_pipe && n % 8 == 0 && n >= 8 * XENT_PIPE_THREADS && cuda_aligned16(x) &&
            cuda_aligned16(dx) && rows >= d->sm_count) {
            cudaFuncAttributes pa;
            CU_TRY(cudaFuncGetAttributes(&pa, k_xent_fused_pipe<S>), "cross_entropy_fused");
            if (two + (int64_t)pa.sharedSizeBytes <= optin &&
                cudaFuncSetAttribute(k_xent_fused_pipe<S>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)two) ==
                    cudaSuccess) {
                k_xent_fused_pipe<S><<<(unsigned)d->sm_count, XENT_PIPE_THREADS, (size_t)two, d->stream>>>(
                    loss, lse, dx, x, t, rows, n, ignore, scale);
                d->n_xent_pipe++;
                return MOE_OK;
            }
            (void)cudaGetLastError();
        }
    }
    // the kept row and the kernel's own static shared memory must fit the block's limit together
    cudaFuncAttributes fa;
    CU_TRY(cudaFuncGetAttributes(&fa, k_xent_fused<T, S, N, true>), "cross_entropy_fused");
    const int64_t keep = n * (int64_t)sizeof(T) + 16;
    bool kept = keep + (int64_t)fa.sharedSizeBytes <= optin &&
                cudaFuncSetAttribute(k_xent_fused<T, S, N, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                     (int)keep) == cudaSuccess;
    if (kept) {
        k_xent_fused<T, S, N, true><<<g, th, (size_t)keep, d->stream>>>(loss, lse, dx, x, t, rows, n, ignore, scale);
    } else {
        (void)cudaGetLastError();   // a refused attribute is not this op's error: re-read the row instead
        k_xent_fused<T, S, N, false><<<g, th, 0, d->stream>>>(loss, lse, dx, x, t, rows, n, ignore, scale);
    }
    return MOE_OK;
}

template <typename T, typename S>
static moe_status xent_fused_launch(cuda_dev *d, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                    const moe_tensor *logits, const int64_t *t, int64_t rows, int64_t n,
                                    int64_t ignore, float scale) {
    T *dx = PTR(T, dlogits);
    const T *x = PTR(const T, logits);
    if ((((uintptr_t)dx ^ (uintptr_t)x) & 15u) == 0)
        return xent_fused_run<T, S, VEC<T>::N>(d, PTR(S, loss), PTR(S, lse), dx, x, t, rows, n, ignore, scale);
    return xent_fused_run<T, S, 1>(d, PTR(S, loss), PTR(S, lse), dx, x, t, rows, n, ignore, scale);
}

}  // namespace

moe_status cuda_cross_entropy(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                              const moe_tensor *targets, int64_t ignore_index) {
    MOE_TRY(cuda_check_float(logits->dtype, "cross_entropy"));
    MOE_TRY(check_stat(logits, loss, "cross_entropy"));
    if (lse->dtype != loss->dtype)
        return moe_error(MOE_ERR_DTYPE, "cross_entropy on cuda: loss (%s) and lse (%s) must share a dtype",
                         moe_dtype_name(loss->dtype), moe_dtype_name(lse->dtype));
    int64_t n = cuda_last_dim(logits), rows = cuda_rows(logits);
    if (rows == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, logits->device);
    unsigned g = cuda_row_grid(rows);
    const int64_t *t = PTR(const int64_t, targets);
    if (logits->dtype == MOE_F32)
        k_xent<float, float><<<g, xent_threads(n, 4), 0, d->stream>>>(PTR(float, loss), PTR(float, lse),
                                                                     PTR(const float, logits), t, rows, n, ignore_index);
    else if (loss->dtype == MOE_F32)
        k_xent<bf16, float><<<g, xent_threads(n, 8), 0, d->stream>>>(PTR(float, loss), PTR(float, lse),
                                                                    PTR(const bf16, logits), t, rows, n, ignore_index);
    else
        k_xent<bf16, bf16><<<g, xent_threads(n, 8), 0, d->stream>>>(PTR(bf16, loss), PTR(bf16, lse),
                                                                   PTR(const bf16, logits), t, rows, n, ignore_index);
    CU_LAUNCHED("cross_entropy");
    return MOE_OK;
}

moe_status cuda_cross_entropy_backward(moe_ctx *ctx, moe_tensor *dlogits, const moe_tensor *logits,
                                       const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                       float scale) {
    MOE_TRY(cuda_check_float(logits->dtype, "cross_entropy_backward"));
    MOE_TRY(check_stat(logits, lse, "cross_entropy_backward"));
    int64_t n = cuda_last_dim(logits), rows = cuda_rows(logits);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, logits->device);
    const int64_t *t = PTR(const int64_t, targets);
    if (logits->dtype == MOE_F32)
        xent_bwd_launch<float, float>(d, dlogits, logits, lse, t, rows, n, ignore_index, scale);
    else if (lse->dtype == MOE_F32)
        xent_bwd_launch<bf16, float>(d, dlogits, logits, lse, t, rows, n, ignore_index, scale);
    else
        xent_bwd_launch<bf16, bf16>(d, dlogits, logits, lse, t, rows, n, ignore_index, scale);
    CU_LAUNCHED("cross_entropy_backward");
    return MOE_OK;
}

moe_status cuda_cross_entropy_fused(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                    const moe_tensor *logits, const moe_tensor *targets, int64_t ignore_index,
                                    float scale) {
    MOE_TRY(cuda_check_float(logits->dtype, "cross_entropy_fused"));
    MOE_TRY(check_stat(logits, loss, "cross_entropy_fused"));
    if (lse->dtype != loss->dtype)
        return moe_error(MOE_ERR_DTYPE, "cross_entropy_fused on cuda: loss (%s) and lse (%s) must share a dtype",
                         moe_dtype_name(loss->dtype), moe_dtype_name(lse->dtype));
    int64_t n = cuda_last_dim(logits), rows = cuda_rows(logits);
    if (rows == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, logits->device);
    const int64_t *t = PTR(const int64_t, targets);
    moe_status st;
    if (logits->dtype == MOE_F32)
        st = xent_fused_launch<float, float>(d, loss, lse, dlogits, logits, t, rows, n, ignore_index, scale);
    else if (loss->dtype == MOE_F32)
        st = xent_fused_launch<bf16, float>(d, loss, lse, dlogits, logits, t, rows, n, ignore_index, scale);
    else
        st = xent_fused_launch<bf16, bf16>(d, loss, lse, dlogits, logits, t, rows, n, ignore_index, scale);
    MOE_TRY(st);
    CU_LAUNCHED("cross_entropy_fused");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_xent_pipe_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_xent_pipe, "moe_cuda_xent_pipe_calls");
}
