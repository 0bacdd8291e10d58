// The batched strategy of the grouped GEMMs (cuda_gemm_batched.h): the
// pointer-array fill and the one cuBLAS grouped call, and the beta scaling of
// the weight gradient's empty experts.
#include "cuda_gemm_batched.h"

#include <algorithm>
#include <string.h>

// Kernel parameters of the pointer fill: the three pointer arrays of a call
// with `total` problems are ptrs[0:total] (A), ptrs[total:2 total] (B),
// ptrs[2 total:3 total] (C); one launch writes problems [first, first + n).
// CAP 64 stays under the classic 4 KB parameter limit; the large variant
// (about 24.6 KB) needs the 32 KB limit of CUDA 12.1+ on Volta and newer.
template <int CAP>
struct gg_ptr_args {
    uintptr_t base[3];
    int64_t row_bytes[3], grp_bytes[3];
    int64_t total;
    int first, n;
    int64_t row0[CAP];
    int32_t expert[CAP];
};
static_assert(sizeof(gg_ptr_args<2048>) < 32000, "pointer-fill parameters exceed the kernel parameter limit");

template <int CAP>
__global__ void k_gg_ptrs(const __grid_constant__ gg_ptr_args<CAP> a, void **ptrs) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= a.n) return;
    int64_t p = (int64_t)a.first + i;
#pragma unroll
    for (int j = 0; j < 3; j++)
        ptrs[j * a.total + p] = (void *)(a.base[j] + (uintptr_t)(a.row0[i] * a.row_bytes[j] +
                                                                   (int64_t)a.expert[i] * a.grp_bytes[j]));
}

template <int CAP>
static moe_status gg_fill(cuda_dev *d, const gg_desc &g, const std::vector<int32_t> &expert,
                          const std::vector<int64_t> &row0, void **ptrs) {
    gg_ptr_args<CAP> a{};
    for (int j = 0; j < 3; j++) {
        a.base[j] = g.base[j];
        a.row_bytes[j] = g.row_bytes[j];
        a.grp_bytes[j] = g.grp_bytes[j];
    }
    int64_t total = (int64_t)expert.size();
    a.total = total;
    for (int64_t first = 0; first < total; first += CAP) {
        int n = (int)std::min<int64_t>(CAP, total - first);
        a.first = (int)first;
        a.n = n;
        memcpy(a.row0, row0.data() + first, (size_t)n * sizeof(int64_t));
        memcpy(a.expert, expert.data() + first, (size_t)n * sizeof(int32_t));
        int threads = n < 128 ? (n + 31) / 32 * 32 : 128;
        k_gg_ptrs<CAP><<<(n + threads - 1) / threads, threads, 0, d->stream>>>(a, ptrs);
        CU_LAUNCHED("gemm_grouped (pointer arrays)");
    }
    return MOE_OK;
}

moe_status cuda_gg_run(cuda_dev *d, moe_dtype dt, const gg_desc &g, float alpha, float beta,
                       const int64_t *offsets, int groups, bool *ran, const char *what) {
    *ran = true;
    std::vector<int32_t> expert;   // non-empty experts, by row count (stable: then by index)
    for (int e = 0; e < groups; e++)
        if (offsets[e + 1] > offsets[e]) expert.push_back(e);
    size_t np = expert.size();
    if (np == 0) return MOE_OK;
    std::stable_sort(expert.begin(), expert.end(), [offsets](int32_t x, int32_t y) {
        return offsets[x + 1] - offsets[x] < offsets[y + 1] - offsets[y];
    });
    std::vector<int64_t> row0(np);
    // cuBLAS groups: runs of equal row counts
    std::vector<int64_t> m_a, n_a, k_a, lda_a, ldb_a, ldc_a, size_a;
    std::vector<float> alpha_a, beta_a;
    std::vector<cublasOperation_t> opa_a, opb_a;
    int64_t prev = -1;
    for (size_t p = 0; p < np; p++) {
        int32_t e = expert[p];
        int64_t rows = offsets[e + 1] - offsets[e];
        row0[p] = offsets[e];
        if (rows == prev) {
            size_a.back()++;
            continue;
        }
        prev = rows;
        opa_a.push_back(g.opA);
        opb_a.push_back(g.opB);
        m_a.push_back(g.mc);
        n_a.push_back(g.vary_k ? g.n : rows);
        k_a.push_back(g.vary_k ? rows : g.k);
        lda_a.push_back(g.lda);
        ldb_a.push_back(g.ldb);
        ldc_a.push_back(g.ldc);
        alpha_a.push_back(alpha);
        beta_a.push_back(beta);
        size_a.push_back(1);
    }
    // Returned to the cache when this scope ends, after the GEMM is queued:
    // a later user of the block runs after it on the same stream.
    cuda_scratch scr(d, 3 * np * sizeof(void *));
    if (!scr.p) return moe_last_status();
    void **ptrs = (void **)scr.p;
    if (np <= 64) MOE_TRY(gg_fill<64>(d, g, expert, row0, ptrs));
    else MOE_TRY(gg_fill<2048>(d, g, expert, row0, ptrs));
    cudaDataType ty = dt == MOE_F32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasMath_t mode = dt == MOE_F32 ? CUBLAS_PEDANTIC_MATH
                                      : (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    cublasStatus_t s = cublasSetMathMode(d->blas, mode);
    if (s != CUBLAS_STATUS_SUCCESS) return cuda_blas_err(s, what);
    s = cublasGemmGroupedBatchedEx_64(d->blas, opa_a.data(), opb_a.data(), m_a.data(), n_a.data(), k_a.data(),
                                      alpha_a.data(), (const void *const *)ptrs, ty, lda_a.data(),
                                      (const void *const *)(ptrs + np), ty, ldb_a.data(), beta_a.data(),
                                      ptrs + 2 * np, ty, ldc_a.data(), (int64_t)size_a.size(), size_a.data(),
                                      CUBLAS_COMPUTE_32F);
    if (s == CUBLAS_STATUS_NOT_SUPPORTED) {
        *ran = false;
        return MOE_OK;
    }
    if (s != CUBLAS_STATUS_SUCCESS) return cuda_blas_err(s, what);
    return MOE_OK;
}

// the experts of one k_scale_groups launch
struct gg_list {
    int n;
    int32_t e[512];
};

template <typename T>
__global__ void k_scale_groups(T *c, int64_t per, float beta, const __grid_constant__ gg_list l) {
    T *cg = c + (int64_t)l.e[blockIdx.y] * per;
    GRID_STRIDE(i, per) cg[i] = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(cg[i]));
}

moe_status cuda_scale_groups(cuda_dev *d, moe_dtype dt, void *c, int64_t per, float beta,
                             const std::vector<int32_t> &experts) {
    if (beta == 1.0f || per == 0 || experts.empty()) return MOE_OK;
    gg_list l{};
    const int cap = (int)(sizeof l.e / sizeof l.e[0]);
    for (size_t first = 0; first < experts.size(); first += cap) {
        l.n = (int)std::min<size_t>(cap, experts.size() - first);
        memcpy(l.e, experts.data() + first, (size_t)l.n * sizeof(int32_t));
        unsigned gx = cuda_grid_1d(d, per, 256) / (unsigned)l.n;
        dim3 grid(gx ? gx : 1, (unsigned)l.n);
        if (dt == MOE_F32) k_scale_groups<float><<<grid, 256, 0, d->stream>>>((float *)c, per, beta, l);
        else k_scale_groups<bf16><<<grid, 256, 0, d->stream>>>((bf16 *)c, per, beta, l);
        CU_LAUNCHED("gemm_grouped_wgrad (beta scale)");
    }
    return MOE_OK;
}
