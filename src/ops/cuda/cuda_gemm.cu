// GEMM through cuBLAS: plain, batched, grouped (experts) and grouped weight
// gradient.
//
// Row-major storage: a row-major X is the column-major X^T, so
// C = op(A) op(B) is computed as C^T = op(B)^T op(A)^T, i.e. cuBLAS gets the
// operands swapped and m = N, n = M.
// f32 runs with CUBLAS_COMPUTE_32F in pedantic math mode (no TF32, whatever
// NVIDIA_TF32_OVERRIDE says), so it matches the CPU to f32 rounding; bf16 uses
// CUBLAS_COMPUTE_32F (tensor cores, f32 accumulation) and forbids
// reduced-precision split-K reductions.
#include "cuda_common.cuh"

static moe_status blas_err(cublasStatus_t s, const char *what) {
    return moe_error(MOE_ERR_DEVICE, "cuda %s: cuBLAS %s", what, cublasGetStatusString(s));
}

template <typename T>
__global__ void k_scale(T *c, int64_t n, float beta) {
    GRID_STRIDE(i, n) c[i] = from_f32<T>(beta == 0.0f ? 0.0f : beta * to_f32(c[i]));
}

// c[0:n] *= beta (beta == 0 writes zeros without reading c, as BLAS does).
static moe_status scale_c(cuda_dev *d, moe_dtype dt, void *c, int64_t n, float beta) {
    if (beta == 1.0f || n == 0) return MOE_OK;
    unsigned grid = cuda_grid_1d(d, n, 256);
    if (dt == MOE_F32) k_scale<float><<<grid, 256, 0, d->stream>>>((float *)c, n, beta);
    else k_scale<bf16><<<grid, 256, 0, d->stream>>>((bf16 *)c, n, beta);
    CU_LAUNCHED("gemm (beta scale)");
    return MOE_OK;
}

// Row-major C[M,N] (ldc N) = alpha op(A) op(B) + beta C over `batch` matrices
// with element strides sA, sB, sC (0: shared). A is [M,K] (or [K,M] if transa),
// B is [K,N] (or [N,K] if transb), both densely packed.
static moe_status gemm_rm(cuda_dev *d, moe_dtype dt, int transa, int transb, int64_t M, int64_t N, int64_t K,
                          float alpha, const void *A, int64_t sA, const void *B, int64_t sB, float beta, void *C,
                          int64_t sC, int64_t batch, const char *what) {
    if (M == 0 || N == 0 || batch == 0) return MOE_OK;
    if (K == 0) return scale_c(d, dt, C, batch * M * N, beta);   // c is [batch, M, N], packed
    cudaDataType ty = dt == MOE_F32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasMath_t mode = dt == MOE_F32 ? CUBLAS_PEDANTIC_MATH
                                      : (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    cublasStatus_t s = cublasSetMathMode(d->blas, mode);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_err(s, what);
    int64_t lda = transa ? M : K, ldb = transb ? K : N, ldc = N;
    cublasOperation_t opA = transa ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batch == 1)
        s = cublasGemmEx_64(d->blas, opB, opA, N, M, K, &alpha, B, ty, ldb, A, ty, lda, &beta, C, ty, ldc,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    else
        s = cublasGemmStridedBatchedEx_64(d->blas, opB, opA, N, M, K, &alpha, B, ty, ldb, sB, A, ty, lda, sA, &beta,
                                          C, ty, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return blas_err(s, what);
    return MOE_OK;
}

moe_status cuda_gemm(moe_ctx *ctx, int transa, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                     float beta, moe_tensor *c) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t M = c->shape[c->ndim - 2], N = c->shape[c->ndim - 1];
    int64_t K = transa ? a->shape[a->ndim - 2] : a->shape[a->ndim - 1];
    int64_t batch = c->ndim == 3 ? c->shape[0] : 1;
    const void *A = moe_tensor_data(a), *B = moe_tensor_data(b);
    void *C = moe_tensor_data(c);
    if (batch > 1 && a->ndim == 3 && b->ndim == 2 && !transa)   // [batch*M, K] @ shared B: one GEMM
        return gemm_rm(d, c->dtype, 0, transb, batch * M, N, K, alpha, A, 0, B, 0, beta, C, 0, 1, "gemm");
    int64_t sA = a->ndim == 3 ? M * K : 0, sB = b->ndim == 3 ? K * N : 0;
    return gemm_rm(d, c->dtype, transa, transb, M, N, K, alpha, A, sA, B, sB, beta, C, M * N, batch, "gemm");
}

moe_status cuda_gemm_grouped(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                             float beta, moe_tensor *c, const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm_grouped"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t K = a->shape[1], N = c->shape[1];
    size_t es = moe_dtype_size(c->dtype);
    const char *A = (const char *)moe_tensor_data(a), *B = (const char *)moe_tensor_data(b);
    char *C = (char *)moe_tensor_data(c);
    for (int g = 0; g < groups; g++) {
        int64_t r0 = offsets[g], m = offsets[g + 1] - r0;
        if (m <= 0) continue;
        MOE_TRY(gemm_rm(d, c->dtype, 0, transb, m, N, K, alpha, A + (size_t)(r0 * K) * es, 0,
                        B + (size_t)(g * K * N) * es, 0, beta, C + (size_t)(r0 * N) * es, 0, 1, "gemm_grouped"));
    }
    return MOE_OK;
}

moe_status cuda_gemm_grouped_wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                   moe_tensor *c, const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm_grouped_wgrad"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t P = a->shape[1], Q = b->shape[1];
    size_t es = moe_dtype_size(c->dtype);
    const char *A = (const char *)moe_tensor_data(a), *B = (const char *)moe_tensor_data(b);
    char *C = (char *)moe_tensor_data(c);
    for (int g = 0; g < groups; g++) {
        int64_t r0 = offsets[g], m = offsets[g + 1] - r0;
        char *Cg = C + (size_t)(g * P * Q) * es;
        if (m <= 0) {   // no rows: c[g] = beta * c[g]
            MOE_TRY(scale_c(d, c->dtype, Cg, P * Q, beta));
            continue;
        }
        MOE_TRY(gemm_rm(d, c->dtype, 1, 0, P, Q, m, alpha, A + (size_t)(r0 * P) * es, 0, B + (size_t)(r0 * Q) * es, 0,
                        beta, Cg, 0, 1, "gemm_grouped_wgrad"));
    }
    return MOE_OK;
}
