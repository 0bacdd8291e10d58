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
//
// Grouped (expert) GEMMs have two strategies, chosen per device
// (cuda_dev::grouped_gemm, see moe_cuda.h):
//  loop     one cuBLAS GEMM per non-empty expert;
//  kernel   bf16 only: moelab's own grouped kernel (cuda_grouped_mma.cu),
//           one launch for all experts;
//  batched  one cublasGemmGroupedBatchedEx over all non-empty experts. Its
//           per-group sizes, leading dims and scalars are host arrays; its
//           A/B/C pointer arrays must be in device memory: a small kernel
//           writes them into scratch from the base pointers and the experts'
//           row offsets, which travel as kernel parameters (no host-to-device
//           copy). Experts with equal row counts share one cuBLAS group.
// The batched strategy falls back to the loop for a call whose operands or
// row pitches are not 16-byte aligned (cuBLAS cannot see pointers that live in
// device memory, so it assumes aligned ones for its fast kernels) and for a
// type combination that cuBLAS reports as unsupported.
#include "cuda_common.cuh"
#include "cuda_gemm_batched.h"
#include "cuda_grouped_mma.h"
#include "cuda_grouped_tma.h"
#include "moe_cuda.h"

#include <algorithm>
#include <stdlib.h>
#include <string.h>
#include <vector>


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
// h: the cuBLAS handle (and so the stream) to run on; K == 0 scales on the device's stream.
static moe_status gemm_rm_on(cuda_dev *d, cublasHandle_t h, moe_dtype dt, int transa, int transb, int64_t M,
                             int64_t N, int64_t K, float alpha, const void *A, int64_t sA, const void *B, int64_t sB,
                             float beta, void *C, int64_t sC, int64_t batch, const char *what) {
    if (M == 0 || N == 0 || batch == 0) return MOE_OK;
    if (K == 0) return scale_c(d, dt, C, batch * M * N, beta);   // c is [batch, M, N], packed
    cudaDataType ty = dt == MOE_F32 ? CUDA_R_32F : CUDA_R_16BF;
    cublasMath_t mode = dt == MOE_F32 ? CUBLAS_PEDANTIC_MATH
                                      : (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION);
    cublasStatus_t s = cublasSetMathMode(h, mode);
    if (s != CUBLAS_STATUS_SUCCESS) return cuda_blas_err(s, what);
    int64_t lda = transa ? M : K, ldb = transb ? K : N, ldc = N;
    cublasOperation_t opA = transa ? CUBLAS_OP_T : CUBLAS_OP_N, opB = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
    if (batch == 1)
        s = cublasGemmEx_64(h, opB, opA, N, M, K, &alpha, B, ty, ldb, A, ty, lda, &beta, C, ty, ldc,
                            CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    else
        s = cublasGemmStridedBatchedEx_64(h, opB, opA, N, M, K, &alpha, B, ty, ldb, sB, A, ty, lda, sA, &beta,
                                          C, ty, ldc, sC, batch, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (s != CUBLAS_STATUS_SUCCESS) return cuda_blas_err(s, what);
    return MOE_OK;
}

static moe_status gemm_rm(cuda_dev *d, moe_dtype dt, int transa, int transb, int64_t M, int64_t N, int64_t K,
                          float alpha, const void *A, int64_t sA, const void *B, int64_t sB, float beta, void *C,
                          int64_t sC, int64_t batch, const char *what) {
    return gemm_rm_on(d, d->blas, dt, transa, transb, M, N, K, alpha, A, sA, B, sB, beta, C, sC, batch, what);
}

static int busy_groups(const int64_t *offsets, int groups) {
    int busy = 0;
    for (int g = 0; g < groups; g++) busy += offsets[g + 1] > offsets[g];
    return busy;
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

static void count_call(cuda_dev *d, bool batched) {
    if (batched) d->n_grouped_batched++;
    else d->n_grouped_loop++;
}

static bool aligned16(const void *p) { return ((uintptr_t)p & 15) == 0; }

// The own kernel (cuda_grouped_mma.cu) serves bf16 calls under the kernel
// strategy, and under auto those whose experts are small (where the loop's
// launches dominate; moe_cuda.h); calls it cannot take go on as before.
static bool want_batched(int mode, double flops, const int64_t *offsets, int groups);
static bool use_kernel(int mode, double flops, const int64_t *offsets, int groups, moe_dtype c, moe_dtype a,
                       moe_dtype b) {
    if (c != MOE_BF16 || a != MOE_BF16 || b != MOE_BF16) return false;
    if (mode == MOE_CUDA_GROUPED_KERNEL) return true;
    // small calls: one launch with no per-shape host work, even for a few large experts (moe_cuda.h)
    return mode == MOE_CUDA_GROUPED_AUTO && (flops < 1e11 || want_batched(mode, flops, offsets, groups));
}
static void count_kernel(cuda_dev *d) {
    d->n_grouped_batched++;   // one launch for all experts
    d->n_grouped_kernel++;
}
// The TMA kernel (cuda_grouped_tma.cu) for bf16 gemm_grouped, pair and wgrad
// calls: forced on or off, or under the call's auto strategy (grouped_gemm,
// or grouped_wgrad for the weight gradient) where one expert's weights
// (b_bytes) take at most a quarter of L2. Measured on an H100: 1.19-1.25x
// the own kernel at the step model's experts, the OLMoE layer 1.07x with it
// than with cuBLAS per expert; at the Mixtral layer's experts (117 MB each)
// the tiles running at once stream their weights from memory and cuBLAS is
// faster (674 against 559 TFLOP/s). The weight gradient alone on an H200:
// 1.04-1.06x cuBLAS per expert (OLMoE), 1.24-1.28x the own kernel (step);
// in use on an H100 the layer 1.016x, the step 1.015x. fills: the call's tiles
// keep the device busy (auto requires it; see wgrad).
static bool use_tma(const cuda_dev *d, int strategy, double b_bytes, bool fills, moe_dtype c, moe_dtype a,
                    moe_dtype b) {
    if (c != MOE_BF16 || a != MOE_BF16 || b != MOE_BF16 || d->grouped_tma == 0) return false;
    return d->grouped_tma == 1 ||
           (strategy == MOE_CUDA_GROUPED_AUTO && fills && b_bytes * 4 <= (double)d->l2_bytes);
}
static void count_tma(cuda_dev *d) {
    d->n_grouped_tma++;
    count_kernel(d);
}

// Whether a grouped call of `flops` in total over `groups` experts takes the
// batched path (moe_cuda.h: the strategies and the auto rule).
static bool want_batched(int mode, double flops, const int64_t *offsets, int groups) {
    if (mode == MOE_CUDA_GROUPED_BATCHED || mode == MOE_CUDA_GROUPED_PADDED || mode == MOE_CUDA_GROUPED_KERNEL)
        return true;
    if (mode == MOE_CUDA_GROUPED_LOOP) return false;
    int busy = offsets ? busy_groups(offsets, groups) : groups;   // offsets on the device: taken as all busy
    return busy > 0 && flops / busy < 6e9;
}

// ---- padded strategy ----
// Every expert's rows are copied into a zero-padded [E, m_max, cols] buffer,
// so one strided-batched GEMM (a single cuBLAS launch of its Hopper kernels)
// serves all experts; outputs come back to the compact rows by a second copy
// that also applies beta. Costs m_max/mean - 1 extra FLOPs and two row copies;
// saves the per-expert launches (cuBLAS's grouped call launches per distinct
// row count). Offsets travel as kernel parameters (at most PAD_CAP experts).
constexpr int PAD_CAP = 256;
struct pad_offsets { int64_t off[PAD_CAP + 1]; };

// dst[e, i, :] = src[off[e] + i, :] for i < count(e), else 0; rows of `cols` elements
template <typename T>
__global__ void k_pad_rows(T *dst, const T *src, pad_offsets o, int64_t m_max, int64_t cols) {
    const int e = blockIdx.y;
    const int64_t cnt = o.off[e + 1] - o.off[e];
    for (int64_t i = blockIdx.x; i < m_max; i += gridDim.x) {
        T *d = dst + ((int64_t)e * m_max + i) * cols;
        if (i < cnt) {
            const T *s = src + (o.off[e] + i) * cols;
            for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) d[c] = s[c];
        } else {
            for (int64_t c = threadIdx.x; c < cols; c += blockDim.x) d[c] = from_f32<T>(0.0f);
        }
    }
}

// c[off[e] + i, :] = pad[e, i, :] (+ beta * c[off[e] + i, :]) for i < count(e)
template <typename T>
__global__ void k_unpad_rows(T *c, const T *pad, pad_offsets o, int64_t m_max, int64_t cols, float beta) {
    const int e = blockIdx.y;
    const int64_t cnt = o.off[e + 1] - o.off[e];
    for (int64_t i = blockIdx.x; i < cnt; i += gridDim.x) {
        const T *s = pad + ((int64_t)e * m_max + i) * cols;
        T *d = c + (o.off[e] + i) * cols;
        for (int64_t col = threadIdx.x; col < cols; col += blockDim.x) {
            float v = to_f32(s[col]);
            if (beta != 0.0f) v += beta * to_f32(d[col]);
            d[col] = from_f32<T>(v);
        }
    }
}

static int64_t max_rows(const int64_t *offsets, int groups) {
    int64_t m = 0;
    for (int g = 0; g < groups; g++) m = std::max(m, offsets[g + 1] - offsets[g]);
    return m;
}

static unsigned pad_blocks(int64_t rows) { return (unsigned)std::min<int64_t>(std::max<int64_t>(rows, 1), 1024); }

template <typename T>
static void launch_pad(cuda_dev *d, T *dst, const T *src, const pad_offsets &o, int groups, int64_t m_max,
                       int64_t cols) {
    dim3 grid(pad_blocks(m_max), (unsigned)groups);
    k_pad_rows<T><<<grid, 128, 0, d->stream>>>(dst, src, o, m_max, cols);
}

// Row-major c[rows of g] = alpha a[rows of g] op(b[g]) + beta c[rows of g].
static moe_status padded_fwd(cuda_dev *d, moe_dtype dt, int transb, float alpha, const void *A, const void *B,
                             float beta, void *C, const int64_t *offsets, int groups, int64_t K, int64_t N,
                             bool *ran) {
    *ran = false;
    if (groups > PAD_CAP || offsets[0] != 0) return MOE_OK;
    int64_t m_max = max_rows(offsets, groups);
    if (m_max == 0) { *ran = true; return MOE_OK; }
    size_t es = moe_dtype_size(dt);
    pad_offsets o;
    for (int g = 0; g <= groups; g++) o.off[g] = offsets[g];
    cuda_scratch ap(d, (size_t)groups * m_max * K * es), cp(d, (size_t)groups * m_max * N * es);
    if (!ap.p || !cp.p) return MOE_OK;   /* no room for the padded copies: the caller takes another path */
    if (dt == MOE_F32) launch_pad<float>(d, (float *)ap.p, (const float *)A, o, groups, m_max, K);
    else launch_pad<bf16>(d, (bf16 *)ap.p, (const bf16 *)A, o, groups, m_max, K);
    CU_LAUNCHED("gemm_grouped (pad)");
    MOE_TRY(gemm_rm(d, dt, 0, transb, m_max, N, K, alpha, ap.p, m_max * K, B, K * N, 0.0f, cp.p, m_max * N,
                    groups, "gemm_grouped (padded)"));
    dim3 grid(pad_blocks(m_max), (unsigned)groups);
    if (dt == MOE_F32) k_unpad_rows<float><<<grid, 128, 0, d->stream>>>((float *)C, (const float *)cp.p, o, m_max, N, beta);
    else k_unpad_rows<bf16><<<grid, 128, 0, d->stream>>>((bf16 *)C, (const bf16 *)cp.p, o, m_max, N, beta);
    CU_LAUNCHED("gemm_grouped (unpad)");
    *ran = true;
    return MOE_OK;
}

// Row-major c[g] = alpha a[rows of g]^T b[rows of g] + beta c[g] (zero rows add nothing).
static moe_status padded_wgrad(cuda_dev *d, moe_dtype dt, float alpha, const void *A, const void *B, float beta,
                               void *C, const int64_t *offsets, int groups, int64_t P, int64_t Q, bool *ran) {
    *ran = false;
    if (groups > PAD_CAP || offsets[0] != 0) return MOE_OK;
    int64_t m_max = max_rows(offsets, groups);
    if (m_max == 0) return MOE_OK;   // the loop handles all-empty (c = beta c)
    size_t es = moe_dtype_size(dt);
    pad_offsets o;
    for (int g = 0; g <= groups; g++) o.off[g] = offsets[g];
    cuda_scratch ap(d, (size_t)groups * m_max * P * es), bp(d, (size_t)groups * m_max * Q * es);
    if (!ap.p || !bp.p) return MOE_OK;   /* no room for the padded copies: the caller takes another path */
    if (dt == MOE_F32) {
        launch_pad<float>(d, (float *)ap.p, (const float *)A, o, groups, m_max, P);
        launch_pad<float>(d, (float *)bp.p, (const float *)B, o, groups, m_max, Q);
    } else {
        launch_pad<bf16>(d, (bf16 *)ap.p, (const bf16 *)A, o, groups, m_max, P);
        launch_pad<bf16>(d, (bf16 *)bp.p, (const bf16 *)B, o, groups, m_max, Q);
    }
    CU_LAUNCHED("gemm_grouped_wgrad (pad)");
    MOE_TRY(gemm_rm(d, dt, 1, 0, P, Q, m_max, alpha, ap.p, m_max * P, bp.p, m_max * Q, beta, C, P * Q, groups,
                    "gemm_grouped_wgrad (padded)"));
    *ran = true;
    return MOE_OK;
}

// ---- entry points ----

moe_status cuda_gemm_grouped(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                             float beta, moe_tensor *c, const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm_grouped"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t K = a->shape[1], N = c->shape[1];
    size_t es = moe_dtype_size(c->dtype);
    const char *A = (const char *)moe_tensor_data(a), *B = (const char *)moe_tensor_data(b);
    char *C = (char *)moe_tensor_data(c);
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)K * (double)N;
    if (use_tma(d, d->grouped_gemm, 2.0 * (double)K * (double)N, true, c->dtype, a->dtype, b->dtype)) {
        bool ran = false;
        MOE_TRY(cuda_tma_grouped(d, transb, alpha, A, B, beta, C, offsets, groups, K, N, &ran));
        if (ran) { count_tma(d); return MOE_OK; }
    }
    if (use_kernel(d->grouped_gemm, flops, offsets, groups, c->dtype, a->dtype, b->dtype)) {
        bool ran = false;
        MOE_TRY(cuda_mma_grouped(d, transb, alpha, A, B, beta, C, offsets, nullptr, groups, 0, K, N, &ran));
        if (ran) { count_kernel(d); return MOE_OK; }
    }
    if (want_batched(d->grouped_gemm, flops, offsets, groups) && K > 0 && N > 0 && aligned16(A) && aligned16(B) &&
        aligned16(C) && (K * (int64_t)es) % 16 == 0 && (N * (int64_t)es) % 16 == 0) {
        if (d->grouped_gemm == MOE_CUDA_GROUPED_PADDED) {
            bool ran = false;
            MOE_TRY(padded_fwd(d, c->dtype, transb, alpha, A, B, beta, C, offsets, groups, K, N, &ran));
            if (ran) { count_call(d, true); return MOE_OK; }
        }
        // row-major c_g = a_g op(b_g) is column-major c_g^T = op(b_g)^T a_g^T:
        // cuBLAS A = b[g] (expert stride K*N), B = a rows, C = c rows
        gg_desc g;
        g.opA = transb ? CUBLAS_OP_T : CUBLAS_OP_N;
        g.opB = CUBLAS_OP_N;
        g.mc = N; g.n = 0; g.k = K; g.vary_k = false;
        g.lda = transb ? K : N; g.ldb = K; g.ldc = N;
        g.base[0] = (uintptr_t)B; g.row_bytes[0] = 0;                g.grp_bytes[0] = K * N * (int64_t)es;
        g.base[1] = (uintptr_t)A; g.row_bytes[1] = K * (int64_t)es;  g.grp_bytes[1] = 0;
        g.base[2] = (uintptr_t)C; g.row_bytes[2] = N * (int64_t)es;  g.grp_bytes[2] = 0;
        bool ran = false;
        MOE_TRY(cuda_gg_run(d, c->dtype, g, alpha, beta, offsets, groups, &ran, "gemm_grouped"));
        if (ran) {
            count_call(d, true);
            return MOE_OK;
        }
    }
    count_call(d, false);
    int lanes = 1, lane = 0;
    if (K > 0) MOE_TRY(cuda_lanes_fork(d, busy_groups(offsets, groups), flops, &lanes));
    moe_status st = MOE_OK;
    for (int g = 0; g < groups && st == MOE_OK; g++) {
        int64_t r0 = offsets[g], m = offsets[g + 1] - r0;
        if (m <= 0) continue;
        st = gemm_rm_on(d, cuda_lane_blas(d, lane), c->dtype, 0, transb, m, N, K, alpha, A + (size_t)(r0 * K) * es, 0,
                        B + (size_t)(g * K * N) * es, 0, beta, C + (size_t)(r0 * N) * es, 0, 1, "gemm_grouped");
        lane = (lane + 1) % lanes;
    }
    return cuda_lanes_join(d, lanes, st);
}

// One launch of the own kernel over K1 + K2 where it takes the call (the
// strategy would pick it for the pair's FLOPs); else two grouped GEMMs.
moe_status cuda_gemm_grouped_pair(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a1, const moe_tensor *b1,
                                  const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                  const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm_grouped_pair"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t K1 = a1->shape[1], K2 = a2->shape[1], N = c->shape[1];
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)(K1 + K2) * (double)N;
    if (use_tma(d, d->grouped_gemm, 2.0 * (double)(K1 + K2) * (double)N, true, c->dtype, a1->dtype, b1->dtype)) {
        bool ran = false;
        MOE_TRY(cuda_tma_grouped_pair(d, transb, alpha, moe_tensor_data(a1), moe_tensor_data(b1), moe_tensor_data(a2),
                                      moe_tensor_data(b2), K2, beta, moe_tensor_data(c), offsets, groups, K1, N,
                                      &ran));
        if (ran) { count_tma(d); return MOE_OK; }
    }
    if (use_kernel(d->grouped_gemm, flops, offsets, groups, c->dtype, a1->dtype, b1->dtype)) {   // a2, b2: a1's dtype
        bool ran = false;
        MOE_TRY(cuda_mma_grouped_pair(d, transb, alpha, moe_tensor_data(a1), moe_tensor_data(b1), moe_tensor_data(a2),
                                      moe_tensor_data(b2), K2, beta, moe_tensor_data(c), offsets, nullptr, groups, 0,
                                      K1, N, &ran));
        if (ran) { count_kernel(d); return MOE_OK; }
    }
    MOE_TRY(cuda_gemm_grouped(ctx, transb, alpha, a1, b1, beta, c, offsets, groups));
    return cuda_gemm_grouped(ctx, transb, alpha, a2, b2, 1.0f, c, offsets, groups);
}

// The rows variants' fallback: where the own kernel would not gather the rows
// as it loads them, they are gathered into a scratch tensor and the plain call
// runs (the same bytes either way: the kernel reads the same values in the
// same order).
static moe_tensor *gathered(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows) {
    int64_t shape[2] = {rows->shape[0], x->shape[1]};
    moe_tensor *xp = moe_tensor_new(ctx, x->dtype, 2, shape, x->device);
    if (xp && cuda_index_select(ctx, xp, x, rows) != MOE_OK) { moe_tensor_release(xp); return NULL; }
    return xp;
}

// The SwiGLU epilogues of the TMA kernel: where the plain GEMM of these
// shapes (K, N = the experts' hidden size) would take the TMA kernel, with
// bf16 tensors throughout (the checks of the call it makes do the rest);
// bit: 1 the forward's, 2 the backward's (cuda_dev.tma_swiglu)
static bool tma_swiglu_takes(const cuda_dev *d, int bit, int64_t K, int64_t N, const moe_tensor *a,
                             const moe_tensor *b, const moe_tensor *t1, const moe_tensor *t2) {
    return (d->tma_swiglu & bit) && t1->dtype == MOE_BF16 && t2->dtype == MOE_BF16 &&
           use_tma(d, d->grouped_gemm, 2.0 * (double)K * (double)N, true, MOE_BF16, a->dtype, b->dtype);
}

// The fused SwiGLU calls: the own kernel where the plain calls would take it
// (decided on one GEMM's FLOPs, as for each of them), else the parts. rows
// (may be NULL): x's rows in the grouped order (cuda_gemm_grouped_swiglu_rows).
static moe_status swiglu_forward(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows, const moe_tensor *wg,
                                 const moe_tensor *wu, moe_tensor *g, moe_tensor *u, moe_tensor *h,
                                 const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(h->dtype, "gemm_grouped_swiglu"));
    CUDA_ENTER(d, ctx, h->device);
    const int64_t K = x->shape[1], de = g->shape[1];
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)K * (double)de;
    if (use_kernel(d->grouped_gemm, flops, offsets, groups, h->dtype, x->dtype, wg->dtype) && wu->dtype == MOE_BF16 &&
        g->dtype == MOE_BF16 && u->dtype == MOE_BF16) {
        bool ran = false;
        MOE_TRY(cuda_mma_grouped_swiglu(d, moe_tensor_data(x), rows ? (const int64_t *)moe_tensor_data(rows) : nullptr,
                                        moe_tensor_data(wg), moe_tensor_data(wu), moe_tensor_data(g),
                                        moe_tensor_data(u), moe_tensor_data(h), offsets, nullptr, groups, 0, K, de,
                                        &ran));
        if (ran) { count_kernel(d); return MOE_OK; }
    }
    if (rows) {
        moe_tensor *xp = gathered(ctx, x, rows);
        if (!xp) return moe_last_status();
        moe_status s = swiglu_forward(ctx, xp, NULL, wg, wu, g, u, h, offsets, groups);
        moe_tensor_release(xp);
        return s;
    }
    MOE_TRY(cuda_gemm_grouped(ctx, 1, 1.0f, x, wg, 0.0f, g, offsets, groups));
    if (tma_swiglu_takes(d, 1, K, de, x, wu, u, h)) {   // up's GEMM with the activation in its epilogue
        bool ran = false;
        MOE_TRY(cuda_tma_grouped_swiglu(d, moe_tensor_data(x), moe_tensor_data(wu), moe_tensor_data(g),
                                        moe_tensor_data(u), moe_tensor_data(h), offsets, groups, K, de, &ran));
        if (ran) { count_tma(d); d->n_tma_swiglu++; return MOE_OK; }
    }
    MOE_TRY(cuda_gemm_grouped(ctx, 1, 1.0f, x, wu, 0.0f, u, offsets, groups));
    return moe_tensor_numel(h) ? cuda_swiglu(ctx, h, g, u) : MOE_OK;
}

moe_status cuda_gemm_grouped_swiglu(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *wg, const moe_tensor *wu,
                                    moe_tensor *g, moe_tensor *u, moe_tensor *h, const int64_t *offsets, int groups) {
    return swiglu_forward(ctx, x, NULL, wg, wu, g, u, h, offsets, groups);
}

moe_status cuda_gemm_grouped_swiglu_rows(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows, const moe_tensor *wg,
                                         const moe_tensor *wu, moe_tensor *g, moe_tensor *u, moe_tensor *h,
                                         const int64_t *offsets, int groups) {
    return swiglu_forward(ctx, x, rows, wg, wu, g, u, h, offsets, groups);
}

moe_status cuda_gemm_grouped_swiglu_backward(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                             const moe_tensor *g, const moe_tensor *u, moe_tensor *dg, moe_tensor *du,
                                             moe_tensor *h, const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(dg->dtype, "gemm_grouped_swiglu_backward"));
    CUDA_ENTER(d, ctx, dg->device);
    const int64_t K = dy->shape[1], de = dg->shape[1];
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)K * (double)de;
    if (use_kernel(d->grouped_gemm, flops, offsets, groups, dg->dtype, dy->dtype, w->dtype) && g->dtype == MOE_BF16 &&
        u->dtype == MOE_BF16 && du->dtype == MOE_BF16 && (!h || h->dtype == MOE_BF16)) {
        bool ran = false;
        MOE_TRY(cuda_mma_grouped_swiglu_bwd(d, alpha, moe_tensor_data(dy), moe_tensor_data(w), moe_tensor_data(g),
                                            moe_tensor_data(u), moe_tensor_data(dg), moe_tensor_data(du),
                                            h ? moe_tensor_data(h) : nullptr, offsets, nullptr, groups, 0, K, de, &ran));
        if (ran) { count_kernel(d); return MOE_OK; }
    }
    if (tma_swiglu_takes(d, 2, K, de, dy, w, g, u) && dg->dtype == MOE_BF16 && du->dtype == MOE_BF16 &&
        (!h || h->dtype == MOE_BF16)) {   // dh's GEMM with the activation's backward in its epilogue
        bool ran = false;
        MOE_TRY(cuda_tma_grouped_swiglu_bwd(d, alpha, moe_tensor_data(dy), moe_tensor_data(w), moe_tensor_data(g),
                                            moe_tensor_data(u), moe_tensor_data(dg), moe_tensor_data(du),
                                            h ? moe_tensor_data(h) : nullptr, offsets, groups, K, de, &ran));
        if (ran) { count_tma(d); d->n_tma_swiglu++; return MOE_OK; }
    }
    moe_tensor *dh = moe_tensor_new(ctx, g->dtype, 2, dg->shape, dg->device);
    if (!dh) return moe_last_status();
    moe_status s = cuda_gemm_grouped(ctx, 0, alpha, dy, w, 0.0f, dh, offsets, groups);
    // the activation again in the same pass over g and u (one write instead of a second pass)
    if (s == MOE_OK && moe_tensor_numel(dh)) s = cuda_swiglu_backward_h(ctx, dg, du, h, dh, g, u);
    moe_tensor_release(dh);
    return s;
}

// Whether the own kernel would serve a grouped call over these rows, K and N
// (N a multiple of n_mult) under the strategies given (the wgrad's too when
// asked); offsets NULL: the rows on the device, taken as spread over every group.
static int kernel_would_serve(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int n_mult,
                              int64_t rows, const int64_t *offsets, int groups, bool wgrad_too) {
    cuda_dev *d = cuda_dev_get(ctx, dev);
    if (offsets && groups >= 1) rows = offsets[groups] - offsets[0];
    if (!d || dt != MOE_BF16 || K <= 0 || N <= 0 || K % 8 || N % n_mult || groups < 1 ||
        groups > MOE_MMA_GROUPED_MAX_GROUPS || rows < 0 || rows >= (int64_t)INT32_MAX - 128)
        return 0;
    double flops = 2.0 * (double)rows * (double)K * (double)N;
    return use_kernel(d->grouped_gemm, flops, offsets, groups, dt, dt, dt) &&
           (!wgrad_too || use_kernel(d->grouped_wgrad, flops, offsets, groups, dt, dt, dt));
}

// the rows calls' forward (the SwiGLU kernel: N a multiple of 64) and weight gradient
int cuda_gemm_grouped_rows_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int64_t rows,
                                 const int64_t *offsets, int groups) {
    return kernel_would_serve(ctx, dev, dt, K, N, 64, rows, offsets, groups, true);
}

// the own kernel in one pass, or (bf16, de a multiple of 8) a grouped GEMM and one row pass
int cuda_gemm_grouped_swiglu_backward_w_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t de,
                                              int64_t rows, const int64_t *offsets, int groups) {
    if (kernel_would_serve(ctx, dev, dt, K, de, 8, rows, offsets, groups, false)) return 1;
    return cuda_dev_get(ctx, dev) && dt == MOE_BF16 && K > 0 && de > 0 && de % 8 == 0 && groups >= 1;
}

// Where the own kernel does not take the weighted SwiGLU backward (the TMA
// kernel's shapes, the OLMoE layer's): the plain grouped GEMM dh = alpha dy W
// (whichever path serves it) into a scratch tensor, then one row pass
// (cuda_swiglu.cu) for dgate, dup, w h and dw. Against keeping the experts'
// outputs for the combine's backward (an [M, K] tensor, read again there),
// dh is [M, de] and lives for this call only. dev_offs: the offsets on the
// device (nothing served, *served 0, when no path takes them there).
static moe_status swiglu_bwd_w_parts(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                     const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw, moe_tensor *dg,
                                     moe_tensor *du, moe_tensor *hw, moe_tensor *dw, const int64_t *offsets,
                                     const moe_tensor *dev_offs, int groups, int *served) {
    *served = 0;
    if (!cuda_swiglu_backward_w_rows_fit(dg, du, hw, dw, g, u, rw)) return MOE_OK;
    moe_tensor *dh = moe_tensor_new(ctx, MOE_BF16, 2, dg->shape, dg->device);
    if (!dh) return moe_last_status();
    int ran = 1;
    moe_status s = dev_offs ? cuda_gemm_grouped_dev(ctx, 0, alpha, dy, w, nullptr, nullptr, 0.0f, dh, dev_offs, groups, &ran)
                            : cuda_gemm_grouped(ctx, 0, alpha, dy, w, 0.0f, dh, offsets, groups);
    if (s == MOE_OK && ran) s = cuda_swiglu_backward_w_rows(ctx, dg, du, hw, dw, dh, g, u, rw);
    moe_tensor_release(dh);
    if (s == MOE_OK && ran) *served = 1;
    return s;
}

// The weighted SwiGLU backward (the MoE combine folded in): the own kernel, or
// (bf16 rows the row pass takes) the grouped GEMM and the row pass above;
// otherwise the ops layer composes it from the parts.
moe_status cuda_gemm_grouped_swiglu_backward_w(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                               const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                               moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                               const int64_t *offsets, int groups, int *served) {
    *served = 0;
    CUDA_ENTER(d, ctx, dg->device);
    const int64_t K = dy->shape[1], de = dg->shape[1];
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)K * (double)de;
    const moe_tensor *all[] = {dy, w, g, u, rw, dg, du, hw};
    for (const moe_tensor *t : all)
        if (t->dtype != MOE_BF16) return MOE_OK;
    if (!use_kernel(d->grouped_gemm, flops, offsets, groups, dg->dtype, dy->dtype, w->dtype))
        return swiglu_bwd_w_parts(ctx, alpha, dy, w, g, u, rw, dg, du, hw, dw, offsets, nullptr, groups, served);
    bool ran = false;
    MOE_TRY(cuda_mma_grouped_swiglu_bwd_w(d, alpha, moe_tensor_data(dy), moe_tensor_data(w), moe_tensor_data(g),
                                          moe_tensor_data(u), moe_tensor_data(rw), moe_tensor_data(dg),
                                          moe_tensor_data(du), moe_tensor_data(hw), moe_tensor_data(dw),
                                          dw->dtype == MOE_BF16, offsets, nullptr, groups, 0, K, de, &ran));
    if (ran) { count_kernel(d); *served = 1; }
    else return swiglu_bwd_w_parts(ctx, alpha, dy, w, g, u, rw, dg, du, hw, dw, offsets, nullptr, groups, served);
    return MOE_OK;
}

// The TMA kernel takes a weight gradient under auto where each expert's c (an
// expert's weights) fills whole 128 x 256 tiles and the call has a tile for
// every SM: it does not split an expert's rows, so a few small c_g (LoRA's
// factors) over many rows would idle SMs.
static bool wgrad_fills(const cuda_dev *d, int groups, int64_t P, int64_t Q) {
    const double tiles = (double)groups * (double)((P + 127) / 128) * (double)((Q + 255) / 256);
    return P >= 128 && Q >= 256 && tiles >= (double)d->sm_count;
}

// b_rows (may be NULL): b's rows in the grouped order (cuda_gemm_grouped_wgrad_rows)
static moe_status wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b, const moe_tensor *b_rows,
                        float beta, moe_tensor *c, const int64_t *offsets, int groups) {
    MOE_TRY(cuda_check_float(c->dtype, "gemm_grouped_wgrad"));
    CUDA_ENTER(d, ctx, c->device);
    int64_t P = a->shape[1], Q = b->shape[1];
    size_t es = moe_dtype_size(c->dtype);
    const char *A = (const char *)moe_tensor_data(a), *B = (const char *)moe_tensor_data(b);
    char *C = (char *)moe_tensor_data(c);
    double flops = 2.0 * (double)(offsets[groups] - offsets[0]) * (double)P * (double)Q;
    if (!b_rows && use_tma(d, d->grouped_wgrad, 2.0 * (double)P * (double)Q, wgrad_fills(d, groups, P, Q), c->dtype,
                           a->dtype, b->dtype)) {
        bool ran = false;
        MOE_TRY(cuda_tma_grouped_wgrad(d, alpha, A, B, beta, C, offsets, groups, P, Q, &ran));
        if (ran) { count_tma(d); return MOE_OK; }
    }
    if (use_kernel(d->grouped_wgrad, flops, offsets, groups, c->dtype, a->dtype, b->dtype)) {
        bool ran = false;
        MOE_TRY(cuda_mma_grouped_wgrad(d, alpha, A, B, b_rows ? (const int64_t *)moe_tensor_data(b_rows) : nullptr,
                                       beta, C, offsets, nullptr, groups, 0, P, Q, &ran));
        if (ran) { count_kernel(d); return MOE_OK; }
    }
    if (b_rows) {
        moe_tensor *bp = gathered(ctx, b, b_rows);
        if (!bp) return moe_last_status();
        moe_status s = wgrad(ctx, alpha, a, bp, NULL, beta, c, offsets, groups);
        moe_tensor_release(bp);
        return s;
    }
    if (want_batched(d->grouped_wgrad, flops, offsets, groups) && P > 0 && Q > 0 && aligned16(A) && aligned16(B) &&
        aligned16(C) && (P * (int64_t)es) % 16 == 0 && (Q * (int64_t)es) % 16 == 0) {
        if (d->grouped_wgrad == MOE_CUDA_GROUPED_PADDED) {
            bool ran = false;
            MOE_TRY(padded_wgrad(d, c->dtype, alpha, A, B, beta, C, offsets, groups, P, Q, &ran));
            if (ran) { count_call(d, true); return MOE_OK; }
        }
        // row-major c[g] = a_g^T b_g is column-major c[g]^T = b_g^T a_g:
        // cuBLAS A = b rows (N), B = a rows (T), C = c[g] (expert stride P*Q), k = the expert's rows
        gg_desc g;
        g.opA = CUBLAS_OP_N;
        g.opB = CUBLAS_OP_T;
        g.mc = Q; g.n = P; g.k = 0; g.vary_k = true;
        g.lda = Q; g.ldb = P; g.ldc = Q;
        g.base[0] = (uintptr_t)B; g.row_bytes[0] = Q * (int64_t)es;  g.grp_bytes[0] = 0;
        g.base[1] = (uintptr_t)A; g.row_bytes[1] = P * (int64_t)es;  g.grp_bytes[1] = 0;
        g.base[2] = (uintptr_t)C; g.row_bytes[2] = 0;                g.grp_bytes[2] = P * Q * (int64_t)es;
        bool ran = false;
        MOE_TRY(cuda_gg_run(d, c->dtype, g, alpha, beta, offsets, groups, &ran, "gemm_grouped_wgrad"));
        if (ran) {
            std::vector<int32_t> empty;   // no rows: c[g] = beta * c[g], one launch for all
            for (int e = 0; e < groups; e++)
                if (offsets[e + 1] <= offsets[e]) empty.push_back(e);
            MOE_TRY(cuda_scale_groups(d, c->dtype, C, P * Q, beta, empty));
            count_call(d, true);
            return MOE_OK;
        }
    }
    count_call(d, false);
    int lanes = 1, lane = 0;
    MOE_TRY(cuda_lanes_fork(d, busy_groups(offsets, groups), flops, &lanes));
    moe_status st = MOE_OK;
    for (int g = 0; g < groups && st == MOE_OK; g++) {
        int64_t r0 = offsets[g], m = offsets[g + 1] - r0;
        char *Cg = C + (size_t)(g * P * Q) * es;
        if (m <= 0) {   // no rows: c[g] = beta * c[g] (on the device's stream; no lane writes c[g])
            st = scale_c(d, c->dtype, Cg, P * Q, beta);
            continue;
        }
        st = gemm_rm_on(d, cuda_lane_blas(d, lane), c->dtype, 1, 0, P, Q, m, alpha, A + (size_t)(r0 * P) * es, 0,
                        B + (size_t)(r0 * Q) * es, 0, beta, Cg, 0, 1, "gemm_grouped_wgrad");
        lane = (lane + 1) % lanes;
    }
    return cuda_lanes_join(d, lanes, st);
}

moe_status cuda_gemm_grouped_wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                   moe_tensor *c, const int64_t *offsets, int groups) {
    return wgrad(ctx, alpha, a, b, NULL, beta, c, offsets, groups);
}

moe_status cuda_gemm_grouped_wgrad_rows(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                        const moe_tensor *b_rows, float beta, moe_tensor *c, const int64_t *offsets,
                                        int groups) {
    return wgrad(ctx, alpha, a, b, b_rows, beta, c, offsets, groups);
}

// ---- the row offsets on the device ----
// The TMA kernel where the call's policy gives it the call, else the own
// kernel where it would take it (the data-dependent parts of the policy take
// the rows as spread over every group); a call neither takes is left to the
// ops layer (*served 0), which reads the offsets back.

static const int64_t *dev_offsets(const moe_tensor *offsets) { return (const int64_t *)moe_tensor_data(offsets); }

// For one entry's own-kernel calls: the routing's plan tables of these offsets
// (tensor.h grouped_plan), which the kernel takes instead of planning the call
// (cuda_grouped_mma.cu launch) when its rows are the plan's.
struct plan_scope {
    cuda_dev *d;
    plan_scope(cuda_dev *d_, const moe_tensor *offsets) : d(d_) {
        d->plan_off = offsets->grouped_plan_rows > 0 ? dev_offsets(offsets) : nullptr;
        d->plan_rows = offsets->grouped_plan_rows;
        d->plan_at = offsets->grouped_plan_at;
    }
    ~plan_scope() { d->plan_off = nullptr; }
    plan_scope(const plan_scope &) = delete;
    plan_scope &operator=(const plan_scope &) = delete;
};
static void count_dev(cuda_dev *d, bool tma, int *served) {
    if (tma) count_tma(d);
    else count_kernel(d);
    d->n_grouped_dev++;
    *served = 1;
}

moe_status cuda_gemm_grouped_dev(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                 const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                 const moe_tensor *offsets, int groups, int *served) {
    *served = 0;
    CUDA_ENTER(d, ctx, c->device);
    plan_scope plan(d, offsets);
    const int64_t M = a->shape[0], K = a->shape[1], K2 = a2 ? a2->shape[1] : 0, N = c->shape[1];
    const void *A2 = a2 ? moe_tensor_data(a2) : nullptr, *B2 = b2 ? moe_tensor_data(b2) : nullptr;
    const int64_t *off = dev_offsets(offsets);
    bool ran = false;
    if (use_tma(d, d->grouped_gemm, 2.0 * (double)(K + K2) * (double)N, true, c->dtype, a->dtype, b->dtype)) {
        MOE_TRY(cuda_tma_grouped_dev(d, transb, alpha, moe_tensor_data(a), moe_tensor_data(b), A2, B2, K2, beta,
                                     moe_tensor_data(c), off, groups, M, K, N, &ran));
        if (ran) { count_dev(d, true, served); return MOE_OK; }
    }
    const double flops = 2.0 * (double)M * (double)(K + K2) * (double)N;
    if (!use_kernel(d->grouped_gemm, flops, nullptr, groups, c->dtype, a->dtype, b->dtype)) return MOE_OK;
    MOE_TRY(cuda_mma_grouped_pair(d, transb, alpha, moe_tensor_data(a), moe_tensor_data(b), A2, B2, K2, beta,
                                  moe_tensor_data(c), nullptr, off, groups, M, K, N, &ran));
    if (ran) count_dev(d, false, served);
    return MOE_OK;
}

moe_status cuda_gemm_grouped_wgrad_dev(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                       const moe_tensor *b_rows, float beta, moe_tensor *c, const moe_tensor *offsets,
                                       int groups, int *served) {
    *served = 0;
    CUDA_ENTER(d, ctx, c->device);
    plan_scope plan(d, offsets);
    const int64_t M = a->shape[0], P = a->shape[1], Q = b->shape[1];
    const int64_t *off = dev_offsets(offsets);
    bool ran = false;
    if (!b_rows && use_tma(d, d->grouped_wgrad, 2.0 * (double)P * (double)Q, wgrad_fills(d, groups, P, Q), c->dtype,
                           a->dtype, b->dtype)) {
        MOE_TRY(cuda_tma_grouped_wgrad_dev(d, alpha, moe_tensor_data(a), moe_tensor_data(b), beta, moe_tensor_data(c),
                                           off, groups, M, P, Q, &ran));
        if (ran) { count_dev(d, true, served); return MOE_OK; }
    }
    const double flops = 2.0 * (double)M * (double)P * (double)Q;
    if (!use_kernel(d->grouped_wgrad, flops, nullptr, groups, c->dtype, a->dtype, b->dtype)) return MOE_OK;
    MOE_TRY(cuda_mma_grouped_wgrad(d, alpha, moe_tensor_data(a), moe_tensor_data(b),
                                   b_rows ? (const int64_t *)moe_tensor_data(b_rows) : nullptr, beta,
                                   moe_tensor_data(c), nullptr, off, groups, M, P, Q, &ran));
    if (ran) count_dev(d, false, served);
    return MOE_OK;
}

moe_status cuda_gemm_grouped_swiglu_dev(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *x_rows,
                                        const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                        moe_tensor *h, const moe_tensor *offsets, int groups, int *served) {
    *served = 0;
    CUDA_ENTER(d, ctx, h->device);
    plan_scope plan(d, offsets);
    const int64_t M = g->shape[0], K = x->shape[1], de = g->shape[1];
    const double flops = 2.0 * (double)M * (double)K * (double)de;
    const moe_tensor *all[] = {x, wg, wu, g, u, h};
    for (const moe_tensor *t : all)
        if (t->dtype != MOE_BF16) return MOE_OK;
    if (!use_kernel(d->grouped_gemm, flops, nullptr, groups, h->dtype, x->dtype, wg->dtype)) return MOE_OK;
    bool ran = false;
    MOE_TRY(cuda_mma_grouped_swiglu(d, moe_tensor_data(x), x_rows ? (const int64_t *)moe_tensor_data(x_rows) : nullptr,
                                    moe_tensor_data(wg), moe_tensor_data(wu), moe_tensor_data(g), moe_tensor_data(u),
                                    moe_tensor_data(h), nullptr, dev_offsets(offsets), groups, M, K, de, &ran));
    if (ran) count_dev(d, false, served);
    return MOE_OK;
}

moe_status cuda_gemm_grouped_swiglu_backward_w_dev(moe_ctx *ctx, float alpha, const moe_tensor *dy,
                                                   const moe_tensor *w, const moe_tensor *g, const moe_tensor *u,
                                                   const moe_tensor *rw, moe_tensor *dg, moe_tensor *du, moe_tensor *hw,
                                                   moe_tensor *dw, const moe_tensor *offsets, int groups, int *served) {
    *served = 0;
    CUDA_ENTER(d, ctx, dg->device);
    plan_scope plan(d, offsets);
    const int64_t M = dg->shape[0], K = dy->shape[1], de = dg->shape[1];
    const double flops = 2.0 * (double)M * (double)K * (double)de;
    const moe_tensor *all[] = {dy, w, g, u, rw, dg, du, hw};
    for (const moe_tensor *t : all)
        if (t->dtype != MOE_BF16) return MOE_OK;
    if (!use_kernel(d->grouped_gemm, flops, nullptr, groups, dg->dtype, dy->dtype, w->dtype))
        return swiglu_bwd_w_parts(ctx, alpha, dy, w, g, u, rw, dg, du, hw, dw, nullptr, offsets, groups, served);
    bool ran = false;
    MOE_TRY(cuda_mma_grouped_swiglu_bwd_w(d, alpha, moe_tensor_data(dy), moe_tensor_data(w), moe_tensor_data(g),
                                          moe_tensor_data(u), moe_tensor_data(rw), moe_tensor_data(dg),
                                          moe_tensor_data(du), moe_tensor_data(hw), moe_tensor_data(dw),
                                          dw->dtype == MOE_BF16, nullptr, dev_offsets(offsets), groups, M, K, de, &ran));
    if (ran) count_dev(d, false, served);
    return MOE_OK;
}
