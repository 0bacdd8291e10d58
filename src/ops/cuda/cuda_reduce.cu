// Reductions over one dim of x viewed as [outer, n, inner] (sum, mean, max,
// min), f32 accumulation, output in x's dtype.
//
// Determinism: every output is produced by one fixed tree of f32 operations
// that depends only on the shape (never on timing, the SM count or atomics),
// so two runs give bit-identical results.
//   inner == 1 (contiguous rows): one block per (row, chunk); each thread sums a
//     strided slice of the chunk, then a fixed warp-shuffle tree. Short or many
//     rows use one chunk (a single pass); few long rows (reduce_all: outer 1,
//     n = numel) are split into up to 512 chunks whose f32 partials a second
//     pass of the same kernel combines.
//   inner > 1 (columns): one thread per (outer, inner) column walks n in order.
//     When there are few columns and n is long, n is split into chunks (grid.y)
//     whose f32 partials a second kernel sums in chunk order.
// NaN: max/min ignore NaN as the CPU's row path does (v > acc ? v : acc).
#include "cuda_common.cuh"
#include "cuda_vec.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))

__device__ __forceinline__ float red_init(int op) {
    return op == MOE_RED_MAX ? -INFINITY : op == MOE_RED_MIN ? INFINITY : 0.0f;
}
__device__ __forceinline__ float red_step(int op, float acc, float v) {
    if (op == MOE_RED_MAX) return v > acc ? v : acc;
    if (op == MOE_RED_MIN) return v < acc ? v : acc;
    return acc + v;
}
__device__ __forceinline__ float red_warp(int op, float v) {
    for (int o = 16; o > 0; o >>= 1) v = red_step(op, v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// block-wide combine over blockDim.x threads (multiple of 32); sh: 32 floats
__device__ __forceinline__ float red_block(int op, float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = red_warp(op, v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : red_init(op);
    return red_warp(op, v);
}

// Rows of length n split into nchunks chunks of `chunk` elements: block b
// reduces chunk (b % nchunks) of row (b / nchunks) into out[b]. `div` > 0
// divides the result (the mean, applied only by the final pass).
template <typename TI, typename TO>
__global__ void k_red_rows(TO *out, const TI *x, int64_t nblocks, int64_t n, int64_t chunk, int64_t nchunks, int op,
                           float div) {
    __shared__ float sh[32];
    for (int64_t b = blockIdx.x; b < nblocks; b += gridDim.x) {
        int64_t r = b / nchunks, c = b - r * nchunks;
        int64_t j0 = c * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
        const TI *xr = x + r * n;
        float acc = red_init(op);
        for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) acc = red_step(op, acc, to_f32(xr[j]));
        acc = red_block(op, acc, sh);
        if (threadIdx.x == 0) out[b] = from_f32<TO>(div > 0.0f ? acc / div : acc);
    }
}

// Columns: thread (o, c) of chunk blockIdx.y reduces x[o, j, c] over the
// chunk's j in order into part[chunk][o * inner + c] (or out when one chunk).
template <typename TI, typename TO>
__global__ void k_red_cols(TO *out, const TI *x, int64_t outer, int64_t n, int64_t inner, int64_t chunk, int op,
                           float div) {
    int64_t cols = outer * inner;
    int64_t j0 = (int64_t)blockIdx.y * chunk, j1 = j0 + chunk < n ? j0 + chunk : n;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < cols; i += (int64_t)gridDim.x * blockDim.x) {
        int64_t o = i / inner, c = i - o * inner;
        const TI *base = x + o * n * inner + c;
        float acc = red_init(op);
        for (int64_t j = j0; j < j1; j++) acc = red_step(op, acc, to_f32(base[j * inner]));
        out[(int64_t)blockIdx.y * cols + i] = from_f32<TO>(div > 0.0f ? acc / div : acc);
    }
}

// out[i] = combine over chunks c (in order) of part[c][i]
template <typename TO>
__global__ void k_red_chunks(TO *out, const float *part, int64_t cols, int64_t nchunks, int op, float div) {
    GRID_STRIDE(i, cols) {
        float acc = red_init(op);
        for (int64_t c = 0; c < nchunks; c++) acc = red_step(op, acc, part[c * cols + i]);
        out[i] = from_f32<TO>(div > 0.0f ? acc / div : acc);
    }
}

template <typename T>
__global__ void k_red_empty(T *out, int64_t cnt, float v) {
    GRID_STRIDE(i, cnt) out[i] = from_f32<T>(v);
}

template <typename T>
moe_status reduce_impl(cuda_dev *d, int op, T *out, const T *x, int64_t outer, int64_t n, int64_t inner) {
    int64_t cols = outer * inner;
    float div = op == MOE_RED_MEAN ? (float)n : 0.0f;
    if (n == 0) {   // sum of nothing is 0, mean is 0/0 (max/min were rejected by ops.c)
        k_red_empty<T><<<cuda_grid_1d(d, cols, 256), 256, 0, d->stream>>>(out, cols, op == MOE_RED_MEAN ? NAN : 0.0f);
        CU_LAUNCHED("reduce");
        return MOE_OK;
    }
    if (inner == 1) {
        // one chunk unless there are few rows and they are long
        int64_t nchunks = 1;
        if (outer < 256 && n > 16384) {
            nchunks = (n + 8191) / 8192;
            if (nchunks > 512) nchunks = 512;
        }
        int64_t chunk = (n + nchunks - 1) / nchunks;
        nchunks = (n + chunk - 1) / chunk;
        int th = cuda_row_threads(chunk);
        if (nchunks == 1) {
            k_red_rows<T, T><<<cuda_row_grid(outer), th, 0, d->stream>>>(out, x, outer, n, n, 1, op, div);
            CU_LAUNCHED("reduce (rows)");
            return MOE_OK;
        }
        cuda_scratch part(d, (size_t)(outer * nchunks) * sizeof(float));
        if (!part.p) return moe_last_status();
        k_red_rows<T, float><<<cuda_row_grid(outer * nchunks), th, 0, d->stream>>>((float *)part.p, x, outer * nchunks,
                                                                               n, chunk, nchunks, op, 0.0f);
        CU_LAUNCHED("reduce (row chunks)");
        k_red_rows<float, T><<<cuda_row_grid(outer), cuda_row_threads(nchunks), 0, d->stream>>>(
            out, (const float *)part.p, outer, nchunks, nchunks, 1, op, div);
        CU_LAUNCHED("reduce (row chunk sums)");
        return MOE_OK;
    }
    // columns: aim for at least ~128k (column, chunk) threads, chunks of >= 32 rows
    int64_t nchunks = 1;
    if (cols < 131072 && n > 64) {
        nchunks = (131072 + cols - 1) / cols;
        int64_t maxc = (n + 31) / 32;
        if (nchunks > maxc) nchunks = maxc;
        if (nchunks > 1024) nchunks = 1024;
    }
    int64_t chunk = (n + nchunks - 1) / nchunks;
    nchunks = (n + chunk - 1) / chunk;
    unsigned gx = (unsigned)((cols + 255) / 256 < 65535 ? (cols + 255) / 256 : 65535);
    if (nchunks == 1) {
        k_red_cols<T, T><<<dim3(gx, 1), 256, 0, d->stream>>>(out, x, outer, n, inner, n, op, div);
        CU_LAUNCHED("reduce (columns)");
        return MOE_OK;
    }
    cuda_scratch part(d, (size_t)(cols * nchunks) * sizeof(float));
    if (!part.p) return moe_last_status();
    k_red_cols<T, float><<<dim3(gx, (unsigned)nchunks), 256, 0, d->stream>>>((float *)part.p, x, outer, n, inner, chunk,
                                                                             op, 0.0f);
    CU_LAUNCHED("reduce (column chunks)");
    k_red_chunks<T><<<cuda_grid_1d(d, cols, 256), 256, 0, d->stream>>>(out, (const float *)part.p, cols, nchunks, op,
                                                                        div);
    CU_LAUNCHED("reduce (column chunk sums)");
    return MOE_OK;
}

}  // namespace

moe_status cuda_reduce(moe_ctx *ctx, moe_reduce_op op, moe_tensor *out, const moe_tensor *x, int64_t outer, int64_t n,
                       int64_t inner) {
    MOE_TRY(cuda_check_float(out->dtype, "reduce"));
    if (outer * inner == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    if (out->dtype == MOE_F32) return reduce_impl<float>(d, (int)op, PTR(float, out), PTR(const float, x), outer, n, inner);
    return reduce_impl<bf16>(d, (int)op, PTR(bf16, out), PTR(const bf16, x), outer, n, inner);
}

// ---- sum of squares (gradient norms) ----
// A fixed grid: each block sums its grid-stride share and writes one f64
// partial; one block then adds the partials in order. Deterministic, one
// read of x, no f32 copy of bf16 data. Aligned data is read 16 bytes at a
// time, the squares of one vector summed in f32 (at most 8 terms) before the
// f64 accumulator: scalar 2-byte loads made the gradient norm of the step
// benchmark take 1.6 ms for 1.08 GB, about a fifth of the bandwidth.
namespace {
constexpr int SUMSQ_BLOCKS = 1024, SUMSQ_THREADS = 256;

__device__ double block_sum_f64(double v, double *sh) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    int w = threadIdx.x >> 5, l = threadIdx.x & 31;
    if (l == 0) sh[w] = v;
    __syncthreads();
    v = threadIdx.x < (blockDim.x >> 5) ? sh[threadIdx.x] : 0.0;
    if (w == 0)
        for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename T>
__global__ void k_sumsq_part(const T *x, int64_t n, double *part) {
    __shared__ double sh[32];
    double acc = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        double v = to_f32(x[i]);
        acc += v * v;
    }
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

template <typename T>
__global__ void k_sumsq_part_vec(const T *x, int64_t nv, double *part) {
    constexpr int N = VEC<T>::N;
    __shared__ double sh[32];
    double acc = 0;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += (int64_t)gridDim.x * blockDim.x) {
        float f[N];
        vload(x + i * N, f);
        float s = 0.0f;
#pragma unroll
        for (int k = 0; k < N; k++) s += f[k] * f[k];
        acc += s;
    }
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) part[blockIdx.x] = acc;
}

__global__ void k_sumsq_final(const double *part, int nparts, float *out) {
    __shared__ double sh[32];
    double acc = 0;
    for (int i = threadIdx.x; i < nparts; i += blockDim.x) acc += part[i];
    acc = block_sum_f64(acc, sh);
    if (threadIdx.x == 0) *out = (float)acc;
}
}  // namespace

moe_status cuda_sumsq(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    CUDA_ENTER(d, ctx, out->device);
    int64_t n = moe_tensor_numel(x);
    cuda_scratch part(d, (SUMSQ_BLOCKS + 1) * sizeof(double));
    if (!part.p) return moe_last_status();
    double *p = (double *)part.p;
    const void *xp = moe_tensor_data((moe_tensor *)x);
    bool b16 = x->dtype == MOE_BF16;
    // vectors where aligned, the scalar kernel for the tail (one more partial, maybe 0)
    int64_t per = b16 ? VEC<bf16>::N : VEC<float>::N, nv = cuda_aligned16(xp) ? n / per : 0, done = nv * per;
    if (b16) k_sumsq_part_vec<bf16><<<SUMSQ_BLOCKS, SUMSQ_THREADS, 0, d->stream>>>((const bf16 *)xp, nv, p);
    else k_sumsq_part_vec<float><<<SUMSQ_BLOCKS, SUMSQ_THREADS, 0, d->stream>>>((const float *)xp, nv, p);
    CU_LAUNCHED("sumsq");
    if (b16) k_sumsq_part<bf16><<<1, SUMSQ_THREADS, 0, d->stream>>>((const bf16 *)xp + done, n - done, p + SUMSQ_BLOCKS);
    else k_sumsq_part<float><<<1, SUMSQ_THREADS, 0, d->stream>>>((const float *)xp + done, n - done, p + SUMSQ_BLOCKS);
    CU_LAUNCHED("sumsq");
    k_sumsq_final<<<1, SUMSQ_THREADS, 0, d->stream>>>(p, SUMSQ_BLOCKS + 1, moe_f32(out));
    CU_LAUNCHED("sumsq");
    return MOE_OK;
}
