// The batched strategy of the grouped GEMMs (cuda_gemm_batched.cu): one
// cublasGemmGroupedBatchedEx over every non-empty expert, its device pointer
// arrays written by a small kernel from the experts' row offsets (kernel
// parameters, no host-to-device copy). Used by cuda_gemm.cu.
#ifndef MOE_CUDA_GEMM_BATCHED_H
#define MOE_CUDA_GEMM_BATCHED_H

#include "cuda_common.cuh"

#include <vector>

static inline moe_status cuda_blas_err(cublasStatus_t s, const char *what) {
    return moe_error(MOE_ERR_DEVICE, "cuda %s: cuBLAS %s", what, cublasGetStatusString(s));
}

// One grouped call in cuBLAS (column-major) terms. Problem p, for a non-empty
// expert e with rows [r0, r0 + m), computes C_p = alpha opA(A_p) opB(B_p) +
// beta C_p with dims (mc, n, k), where n (or k when vary_k) is m, and the
// pointer of operand j (0: A, 1: B, 2: C) is
//   base[j] + r0 * row_bytes[j] + e * grp_bytes[j].
struct gg_desc {
    cublasOperation_t opA, opB;
    int64_t mc, n, k;
    bool vary_k;
    int64_t lda, ldb, ldc;
    uintptr_t base[3];
    int64_t row_bytes[3], grp_bytes[3];
};

// One cublasGemmGroupedBatchedEx over the non-empty experts of offsets.
// *ran = false (nothing queued but the pointer fill) when cuBLAS reports the
// combination unsupported: the caller then loops.
moe_status cuda_gg_run(cuda_dev *d, moe_dtype dt, const gg_desc &g, float alpha, float beta,
                       const int64_t *offsets, int groups, bool *ran, const char *what);
// c[e] *= beta (beta == 0: zeros) for the experts listed, each block `per` elements.
moe_status cuda_scale_groups(cuda_dev *d, moe_dtype dt, void *c, int64_t per, float beta,
                             const std::vector<int32_t> &experts);

#endif
