// Host cost of one cuBLAS bf16 GEMM call under different handle settings, to
// find where moelab's ~50 us per GEMM goes. Standalone:
//   nvcc -O2 -std=c++17 -o build/cublas_overhead bench/cublas_overhead.cu -lcublas -lcublasLt
//   build/cublas_overhead
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <chrono>
#include <cstdio>

static double now_us() {
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int main() {
    const int M = 4096, N = 512, K = 1024, iters = 300;
    void *A, *B, *C, *ws;
    cudaMalloc(&A, (size_t)M * K * 2);
    cudaMalloc(&B, (size_t)N * K * 2);
    cudaMalloc(&C, (size_t)M * N * 2);
    cudaMalloc(&ws, 32 << 20);
    cudaMemset(A, 0, (size_t)M * K * 2);
    cudaMemset(B, 0, (size_t)N * K * 2);
    cudaStream_t st;
    cudaStreamCreateWithFlags(&st, cudaStreamNonBlocking);
    cublasHandle_t h;
    cublasCreate(&h);
    cublasSetStream(h, st);
    float alpha = 1, beta = 0;
    auto run = [&](const char *name, auto fn) {
        fn(0);
        cudaStreamSynchronize(st);
        double t0 = now_us();
        for (int i = 0; i < iters; i++) fn(i);
        double t1 = now_us();
        cudaStreamSynchronize(st);
        double t2 = now_us();
        printf("%-62s host %7.1f us/call  wall %7.1f us/call\n", name, (t1 - t0) / iters, (t2 - t0) / iters);
    };
    auto gemm = [&](int m) {
        return cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, m, K, &alpha, B, CUDA_R_16BF, K, A, CUDA_R_16BF, K, &beta, C,
                            CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    };
    run("cublasGemmEx, default math", [&](int) { gemm(M); });
    run("cublasGemmEx_64", [&](int) {
        cublasGemmEx_64(h, CUBLAS_OP_T, CUBLAS_OP_N, N, M, K, &alpha, B, CUDA_R_16BF, K, A, CUDA_R_16BF, K, &beta, C,
                        CUDA_R_16BF, N, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    });
    run("SetMathMode(DISALLOW_REDUCED_PRECISION_REDUCTION) + GemmEx", [&](int) {
        cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
        gemm(M);
    });
    run("SetMathMode(PEDANTIC) then (DEFAULT|DISALLOW) + GemmEx", [&](int) {
        cublasSetMathMode(h, CUBLAS_PEDANTIC_MATH);
        cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
        gemm(M);
    });
    cublasSetMathMode(h, CUBLAS_DEFAULT_MATH);
    run("GemmEx, m varies (3000 + i)", [&](int i) { gemm(3000 + i); });
    cublasSetWorkspace(h, ws, 32 << 20);
    run("after cublasSetWorkspace(32 MiB): GemmEx", [&](int) { gemm(M); });
    run("after cublasSetWorkspace: m varies", [&](int i) { gemm(3000 + i); });
    run("after cublasSetWorkspace: SetMathMode(DISALLOW) + GemmEx", [&](int) {
        cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION));
        gemm(M);
    });
    // cublasLt with one algorithm picked once, reused for any m
    cublasLtHandle_t lt;
    cublasLtCreate(&lt);
    cublasLtMatmulDesc_t op;
    cublasLtMatmulDescCreate(&op, CUBLAS_COMPUTE_32F, CUDA_R_32F);
    cublasOperation_t ta = CUBLAS_OP_T, tb = CUBLAS_OP_N;
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSA, &ta, sizeof ta);
    cublasLtMatmulDescSetAttribute(op, CUBLASLT_MATMUL_DESC_TRANSB, &tb, sizeof tb);
    cublasLtMatrixLayout_t la, lb, lc;
    cublasLtMatrixLayoutCreate(&la, CUDA_R_16BF, K, N, K);
    cublasLtMatrixLayoutCreate(&lb, CUDA_R_16BF, K, M, K);
    cublasLtMatrixLayoutCreate(&lc, CUDA_R_16BF, N, M, N);
    cublasLtMatmulPreference_t pref;
    cublasLtMatmulPreferenceCreate(&pref);
    size_t wss = 32 << 20;
    cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &wss, sizeof wss);
    cublasLtMatmulHeuristicResult_t res;
    int got = 0;
    double t0 = now_us();
    cublasLtMatmulAlgoGetHeuristic(lt, op, la, lb, lc, lc, pref, 1, &res, &got);
    printf("cublasLt heuristic: %d result(s), %.1f us\n", got, now_us() - t0);
    run("cublasLtMatmul, cached algo", [&](int) {
        cublasLtMatmul(lt, op, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &res.algo, ws, wss, st);
    });
    run("cublasLtMatmul, cached algo, m varies (layout set per call)", [&](int i) {
        uint64_t rows = 3000 + i;
        cublasLtMatrixLayoutSetAttribute(lb, CUBLASLT_MATRIX_LAYOUT_COLS, &rows, sizeof rows);
        cublasLtMatrixLayoutSetAttribute(lc, CUBLASLT_MATRIX_LAYOUT_COLS, &rows, sizeof rows);
        cublasLtMatmul(lt, op, &alpha, B, la, A, lb, &beta, C, lc, C, lc, &res.algo, ws, wss, st);
    });
    printf("last error: %s\n", cudaGetErrorString(cudaGetLastError()));
    return 0;
}
