// The step's dense bf16 GEMMs (the LM head in four chunks of 2048 rows, the
// attention projections, the router) through cublasGemmEx with its default
// algorithm, as src/ops/cuda/cuda_gemm.cu calls them, against every algorithm
// cuBLASLt's heuristic offers for the same call (up to 32, the same 32 MiB of
// workspace, no reduction in bf16), each timed back to back: an upper bound
// on what a per-shape choice by timing could give (bench/RESULTS.md,
// nineteenth pass: 0.14 ms a step here, but inside the step only the head's
// forward kept its gain and the step did not move, so moelab has no tuner).
// Row-major C[M, N] = op(A) op(B) (+ beta C), operands swapped into
// column-major as gemm_rm_on passes them; each best result is checked against
// the default's.
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o build/gpu_gemm_autotune \
//        bench/gpu_gemm_autotune.cu -lcublasLt -lcublas
//   build/gpu_gemm_autotune [repeats, default 20]
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define CK(x)                                                                                          \
    do {                                                                                               \
        cudaError_t e_ = (x);                                                                          \
        if (e_ != cudaSuccess) { fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); }    \
    } while (0)
#define CB(x)                                                                                          \
    do {                                                                                               \
        int s_ = (int)(x);                                                                             \
        if (s_ != 0) { fprintf(stderr, "%s: cuBLAS status %d\n", #x, s_); exit(1); }                    \
    } while (0)

struct shape { const char *what; int transa, transb; int64_t M, N, K; float beta; int calls; };

// calls: how many a step makes (bench/gpu_step_kernels.sh's order.txt)
static const shape SHAPES[] = {
    {"head forward, x W^T", 0, 1, 2048, 50304, 1024, 0.0f, 4},
    {"head dx, dlogits W", 0, 0, 2048, 1024, 50304, 0.0f, 4},
    {"head dW, dlogits^T x (accumulating)", 1, 0, 50304, 1024, 2048, 1.0f, 3},
    {"q/k/v forward, x W^T", 0, 1, 8192, 1024, 1024, 0.0f, 24},
    {"o_proj forward + residual", 0, 1, 8192, 1024, 1024, 1.0f, 8},
    {"projection dx, dy W (first)", 0, 0, 8192, 1024, 1024, 0.0f, 16},
    {"projection dx, dy W (adding)", 0, 0, 8192, 1024, 1024, 1.0f, 16},
    {"projection dW, dy^T x (accumulating)", 1, 0, 1024, 1024, 8192, 1.0f, 32},
    {"router forward, x Wr^T", 0, 1, 8192, 32, 1024, 0.0f, 8},
};

static __global__ void k_fill(__nv_bfloat16 *p, int64_t n, uint32_t seed) {
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x) {
        uint32_t h = (uint32_t)i * 2654435761u ^ seed;
        h ^= h >> 15; h *= 2246822519u; h ^= h >> 13;
        p[i] = __float2bfloat16(((h & 0xffff) / 65536.0f - 0.5f) * 0.1f);
    }
}

static float time_it(cudaStream_t st, int reps, cudaEvent_t a, cudaEvent_t b, void (*fn)(void *), void *arg) {
    for (int i = 0; i < 3; i++) fn(arg);
    CK(cudaEventRecord(a, st));
    for (int i = 0; i < reps; i++) fn(arg);
    CK(cudaEventRecord(b, st));
    CK(cudaEventSynchronize(b));
    float ms = 0;
    CK(cudaEventElapsedTime(&ms, a, b));
    return ms * 1000.0f / reps;
}

struct call {
    const shape *s;
    cublasHandle_t h;
    cublasLtHandle_t lt;
    cublasLtMatmulDesc_t desc;
    cublasLtMatrixLayout_t la, lb, lc;
    const cublasLtMatmulAlgo_t *algo;
    void *A, *B, *C, *ws;
    size_t ws_size;
    cudaStream_t st;
};

static void run_default(void *p) {
    call *c = (call *)p;
    const shape *s = c->s;
    float alpha = 1.0f, beta = s->beta;
    int64_t lda = s->transa ? s->M : s->K, ldb = s->transb ? s->K : s->N, ldc = s->N;
    CB(cublasGemmEx_64(c->h, s->transb ? CUBLAS_OP_T : CUBLAS_OP_N, s->transa ? CUBLAS_OP_T : CUBLAS_OP_N, s->N, s->M,
                       s->K, &alpha, c->B, CUDA_R_16BF, ldb, c->A, CUDA_R_16BF, lda, &beta, c->C, CUDA_R_16BF, ldc,
                       CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

static void run_lt(void *p) {
    call *c = (call *)p;
    float alpha = 1.0f, beta = c->s->beta;
    CB(cublasLtMatmul(c->lt, c->desc, &alpha, c->B, c->lb, c->A, c->la, &beta, c->C, c->lc, c->C, c->lc, c->algo, c->ws,
                      c->ws_size, c->st));
}

int main(int argc, char **argv) {
    const int reps = argc > 1 ? atoi(argv[1]) : 20;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("device: %s\n", prop.name);
    cudaStream_t st;
    CK(cudaStreamCreate(&st));
    cublasHandle_t h;
    cublasLtHandle_t lt;
    CB(cublasCreate(&h));
    CB(cublasSetStream(h, st));
    CB(cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    CB(cublasLtCreate(&lt));
    const size_t ws_size = 32u << 20;
    void *ws;
    CK(cudaMalloc(&ws, ws_size));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf("%-40s %6s %6s %6s %5s %10s %10s %9s %6s %9s\n", "GEMM (row-major M x N, K)", "M", "N", "K", "calls",
           "default us", "best Lt us", "TFLOP/s", "algos", "saved us");
    double saved_total = 0, default_total = 0;
    for (const shape &s : SHAPES) {
        const int64_t na = s.M * s.K, nb = s.K * s.N, nc = s.M * s.N;
        void *A, *B, *C;
        CK(cudaMalloc(&A, na * 2));
        CK(cudaMalloc(&B, nb * 2));
        CK(cudaMalloc(&C, nc * 2));
        k_fill<<<1024, 256, 0, st>>>((__nv_bfloat16 *)A, na, 1);
        k_fill<<<1024, 256, 0, st>>>((__nv_bfloat16 *)B, nb, 2);
        k_fill<<<1024, 256, 0, st>>>((__nv_bfloat16 *)C, nc, 3);
        call c = {&s, h, lt, nullptr, nullptr, nullptr, nullptr, nullptr, A, B, C, ws, ws_size, st};
        const float t_def = time_it(st, reps, e0, e1, run_default, &c);
        // the same call through cuBLASLt: C^T (N x M) = op(B)^T op(A)^T in column-major
        CB(cublasLtMatmulDescCreate(&c.desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
        cublasOperation_t ta = s.transb ? CUBLAS_OP_T : CUBLAS_OP_N, tb = s.transa ? CUBLAS_OP_T : CUBLAS_OP_N;
        CB(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta));
        CB(cublasLtMatmulDescSetAttribute(c.desc, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb));
        // la: our A, lb: our B, as column-major matrices (rows x cols as stored);
        // the column-major call takes lb as its first operand and la as its second
        CB(cublasLtMatrixLayoutCreate(&c.la, CUDA_R_16BF, s.transa ? s.M : s.K, s.transa ? s.K : s.M,
                                      s.transa ? s.M : s.K));
        CB(cublasLtMatrixLayoutCreate(&c.lb, CUDA_R_16BF, s.transb ? s.K : s.N, s.transb ? s.N : s.K,
                                      s.transb ? s.K : s.N));
        CB(cublasLtMatrixLayoutCreate(&c.lc, CUDA_R_16BF, s.N, s.M, s.N));
        cublasLtMatmulPreference_t pref;
        CB(cublasLtMatmulPreferenceCreate(&pref));
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws_size, sizeof ws_size));
        uint32_t mask = CUBLASLT_REDUCTION_SCHEME_INPLACE | CUBLASLT_REDUCTION_SCHEME_COMPUTE_TYPE;
        CB(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_REDUCTION_SCHEME_MASK, &mask, sizeof mask));
        cublasLtMatmulHeuristicResult_t res[32];
        int got = 0;
        CB(cublasLtMatmulAlgoGetHeuristic(lt, c.desc, c.lb, c.la, c.lc, c.lc, pref, 32, res, &got));
        float best = 1e30f;
        int best_i = -1;
        for (int i = 0; i < got; i++) {
            if (res[i].state != CUBLAS_STATUS_SUCCESS) continue;
            c.algo = &res[i].algo;
            float t = time_it(st, reps, e0, e1, run_lt, &c);
            if (t < best) { best = t; best_i = i; }
        }
        // the best algorithm's result against the default's (beta 0 for both)
        float maxd = 0;
        if (best_i >= 0) {
            shape s0 = s;
            s0.beta = 0.0f;
            call c0 = c;
            c0.s = &s0;
            run_default(&c0);
            __nv_bfloat16 *h1 = (__nv_bfloat16 *)malloc(nc * 2), *h2 = (__nv_bfloat16 *)malloc(nc * 2);
            CK(cudaMemcpyAsync(h1, C, nc * 2, cudaMemcpyDeviceToHost, st));
            CK(cudaStreamSynchronize(st));
            c0.algo = &res[best_i].algo;
            run_lt(&c0);
            CK(cudaMemcpyAsync(h2, C, nc * 2, cudaMemcpyDeviceToHost, st));
            CK(cudaStreamSynchronize(st));
            for (int64_t i = 0; i < nc; i++) {
                float d = fabsf(__bfloat162float(h1[i]) - __bfloat162float(h2[i]));
                if (d > maxd) maxd = d;
            }
            free(h1);
            free(h2);
        }
        const double flop = 2.0 * s.M * s.N * s.K;
        const float tb_ = best < t_def ? best : t_def;
        const double saved = (t_def - tb_) * s.calls;
        saved_total += saved;
        default_total += t_def * s.calls;
        printf("%-40s %6lld %6lld %6lld %5d %10.1f %10.1f %9.1f %3d/%-2d %9.1f  (max diff %.3g)\n", s.what,
               (long long)s.M, (long long)s.N, (long long)s.K, s.calls, t_def, best, flop / (tb_ * 1e-6) / 1e12, best_i,
               got, saved, maxd);
        CB(cublasLtMatmulPreferenceDestroy(pref));
        CB(cublasLtMatrixLayoutDestroy(c.la));
        CB(cublasLtMatrixLayoutDestroy(c.lb));
        CB(cublasLtMatrixLayoutDestroy(c.lc));
        CB(cublasLtMatmulDescDestroy(c.desc));
        CK(cudaFree(A));
        CK(cudaFree(B));
        CK(cudaFree(C));
    }
    printf("a step's calls: default %.1f us, the best of each shape would save %.1f us\n", default_total, saved_total);
    return 0;
}
