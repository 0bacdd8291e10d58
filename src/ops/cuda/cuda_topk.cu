// Top k over the last dim, sorted descending, ties broken by the lower index
// (the CPU's order: a ranks before b when a.v > b.v, or a.v == b.v and a.i < b.i).
//
// One block per row (32..256 threads). The row is staged in shared memory as
// f32 when it has at most 8192 elements (else read from global memory / L2 on
// every round). Selection is k rounds of a block-wide arg-best: round j picks
// the best element that ranks strictly after the element picked in round j-1.
// Ranking is a strict total order, so no element is picked twice and no
// "taken" marks are needed. Cost O(k * n / threads) per row plus k block
// reductions: made for routing (n = experts, k <= 16) and moderate k; a large
// k over a long row is correct but slow. Rows containing NaN: the order among
// NaNs is unspecified (the CPU's is too).
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define TOPK_SMEM_N 8192

// does (va, ia) rank before (vb, ib)?
__device__ __forceinline__ bool ranks_before(float va, int64_t ia, float vb, int64_t ib) {
    return va > vb || (va == vb && ia < ib);
}

__device__ __forceinline__ void best_pair(float &v, int64_t &i, float v2, int64_t i2) {
    if (i2 >= 0 && (i < 0 || ranks_before(v2, i2, v, i))) { v = v2; i = i2; }
}

template <typename T>
__global__ void k_topk(T *vals, int64_t *idx, const T *x, int64_t rows, int64_t n, int k, int staged) {
    extern __shared__ float row_sh[];
    __shared__ float wv[32];
    __shared__ int64_t wi[32];
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        if (staged) {
            __syncthreads();   // the previous row's readers are done
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x) row_sh[j] = to_f32(xr[j]);
            __syncthreads();
        }
        float pv = INFINITY;   // the previous pick; nothing ranks before (+inf, -1)
        int64_t pi = -1;
        for (int round = 0; round < k; round++) {
            float bv = 0.0f;
            int64_t bi = -1;
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
                float v = staged ? row_sh[j] : to_f32(xr[j]);
                if (round > 0 && !ranks_before(pv, pi, v, j)) continue;   // must rank after the previous pick
                best_pair(bv, bi, v, j);
            }
            for (int o = 16; o > 0; o >>= 1) {
                float v2 = __shfl_xor_sync(0xffffffffu, bv, o);
                int64_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
                best_pair(bv, bi, v2, i2);
            }
            if (nw > 1) {
                __syncthreads();
                if (lane == 0) { wv[w] = bv; wi[w] = bi; }
                __syncthreads();
                bv = lane < nw ? wv[lane] : 0.0f;
                bi = lane < nw ? wi[lane] : -1;
                for (int o = 16; o > 0; o >>= 1) {
                    float v2 = __shfl_xor_sync(0xffffffffu, bv, o);
                    int64_t i2 = __shfl_xor_sync(0xffffffffu, bi, o);
                    best_pair(bv, bi, v2, i2);
                }
            }
            if (threadIdx.x == 0) {
                vals[r * k + round] = bi >= 0 ? xr[bi] : from_f32<T>(NAN);
                idx[r * k + round] = bi;
            }
            pv = bv;
            pi = bi;
        }
    }
}

}  // namespace

moe_status cuda_topk(moe_ctx *ctx, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k) {
    MOE_TRY(cuda_check_float(x->dtype, "topk"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (k == 0 || n == 0 || rows == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    int staged = n <= TOPK_SMEM_N;
    size_t smem = staged ? (size_t)n * sizeof(float) : 0;
    int th = cuda_row_threads(n);
    unsigned g = cuda_row_grid(rows);
    if (x->dtype == MOE_F32)
        k_topk<float><<<g, th, smem, d->stream>>>(PTR(float, values), PTR(int64_t, indices), PTR(const float, x), rows,
                                                  n, k, staged);
    else
        k_topk<bf16><<<g, th, smem, d->stream>>>(PTR(bf16, values), PTR(int64_t, indices), PTR(const bf16, x), rows, n,
                                                 k, staged);
    CU_LAUNCHED("topk");
    return MOE_OK;
}
