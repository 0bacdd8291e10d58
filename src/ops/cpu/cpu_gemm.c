/* GEMMs through OpenBLAS: plain, batched, grouped by row offsets (one sgemm
 * per non-empty group) and the grouped weight gradient. */
#include "cpu.h"

#include <cblas.h>

/* One BLAS call on a block of c; ldc lets a block be a column slice. */
static void sgemm_block(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *a, int64_t lda,
                        const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
                alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

typedef struct {
    int ta, tb;
    int64_t M, N, K, lda, ldb;
    float alpha, beta;
    const float *a, *b;
    float *c;
    int by_rows;
    int64_t tile;
} gemm_job;

/* Each pool thread runs a single-threaded BLAS call on its own rows (or
 * columns) of c. OpenBLAS's own threads are switched off (see cpu_backend.c):
 * between calls they spin in sched_yield and starve this pool's threads. */
static void gemm_range(void *arg, int64_t t0, int64_t t1) {
    const gemm_job *j = arg;
    int64_t dim = j->by_rows ? j->M : j->N;
    int64_t s = t0 * j->tile, e = t1 * j->tile;
    if (e > dim) e = dim;
    if (s >= e) return;
    if (j->by_rows) {
        const float *a = j->ta ? j->a + s : j->a + s * j->lda;
        sgemm_block(j->ta, j->tb, e - s, j->N, j->K, j->alpha, a, j->lda, j->b, j->ldb, j->beta, j->c + s * j->N, j->N);
    } else {
        const float *b = j->tb ? j->b + s * j->ldb : j->b + s;
        sgemm_block(j->ta, j->tb, j->M, e - s, j->K, j->alpha, j->a, j->lda, b, j->ldb, j->beta, j->c + s, j->N);
    }
}

/* c[M,N] = alpha op(a) op(b) + beta c, row-major, contiguous operands */
static void sgemm(moe_ctx *ctx, int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *a,
                  const float *b, float beta, float *c) {
    if (M == 0 || N == 0) return;
    if (K == 0 || alpha == 0.0f) {
        /* BLAS semantics: beta == 0 overwrites without reading c */
        int64_t n = M * N;
        if (beta == 0.0f) memset(c, 0, (size_t)n * sizeof(float));
        else if (beta != 1.0f) for (int64_t i = 0; i < n; i++) c[i] *= beta;
        return;
    }
    gemm_job j = {ta, tb, M, N, K, ta ? M : K, tb ? K : N, alpha, beta, a, b, c, M >= N, 0};
    int threads = moe_threadpool_size(ctx ? ctx->pool : NULL);
    double flops = 2.0 * (double)M * (double)N * (double)K;
    int64_t dim = j.by_rows ? M : N;
    /* split only work big enough to repay a wake-up, in tiles of at least 16 */
    int parts = flops < 2e6 ? 1 : threads;
    if (dim / 16 < parts) parts = (int)(dim / 16 > 0 ? dim / 16 : 1);
    j.tile = (dim + parts - 1) / parts;
    moe_parallel_for(parts > 1 ? ctx->pool : NULL, parts, 1, gemm_range, &j);
}

static moe_status check_int(const char *op, int64_t v) {
    if (v > 0x7fffffff)
        return moe_error(MOE_ERR_SHAPE, "%s: dimension %lld exceeds the BLAS limit of 2^31-1", op, (long long)v);
    return MOE_OK;
}

moe_status moe_cpu_gemm(moe_ctx *ctx, int transa, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                        float beta, moe_tensor *c) {
    CPU_F32("gemm", c);
    int an = a->ndim, bn = b->ndim;
    int64_t M = transa ? a->shape[an - 1] : a->shape[an - 2];
    int64_t K = transa ? a->shape[an - 2] : a->shape[an - 1];
    int64_t N = transb ? b->shape[bn - 2] : b->shape[bn - 1];
    MOE_TRY(check_int("gemm", M)); MOE_TRY(check_int("gemm", N)); MOE_TRY(check_int("gemm", K));
    int64_t batch = c->ndim == 3 ? c->shape[0] : 1;
    int64_t sa = an == 3 ? M * K : 0, sb = bn == 3 ? K * N : 0;
    const float *pa = moe_f32(a), *pb = moe_f32(b);
    float *pc = moe_f32(c);
    for (int64_t i = 0; i < batch; i++)
        sgemm(ctx, transa, transb, M, N, K, alpha, pa + i * sa, pb + i * sb, beta, pc + i * M * N);
    return MOE_OK;
}

moe_status moe_cpu_gemm_grouped(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                float beta, moe_tensor *c, const int64_t *offsets, int groups) {
    CPU_F32("gemm_grouped", c);
    int64_t K = a->shape[1], N = c->shape[1];
    MOE_TRY(check_int("gemm_grouped", N)); MOE_TRY(check_int("gemm_grouped", K));
    const float *pa = moe_f32(a), *pb = moe_f32(b);
    float *pc = moe_f32(c);
    for (int g = 0; g < groups; g++) {
        int64_t r0 = offsets[g], rows = offsets[g + 1] - offsets[g];
        if (rows == 0) continue;
        MOE_TRY(check_int("gemm_grouped", rows));
        sgemm(ctx, 0, transb, rows, N, K, alpha, pa + r0 * K, pb + (int64_t)g * K * N, beta, pc + r0 * N);
    }
    return MOE_OK;
}

moe_status moe_cpu_gemm_grouped_wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                      moe_tensor *c, const int64_t *offsets, int groups) {
    CPU_F32("gemm_grouped_wgrad", c);
    int64_t P = a->shape[1], Q = b->shape[1];
    MOE_TRY(check_int("gemm_grouped_wgrad", P)); MOE_TRY(check_int("gemm_grouped_wgrad", Q));
    const float *pa = moe_f32(a), *pb = moe_f32(b);
    float *pc = moe_f32(c);
    for (int g = 0; g < groups; g++) {
        int64_t r0 = offsets[g], rows = offsets[g + 1] - offsets[g];
        MOE_TRY(check_int("gemm_grouped_wgrad", rows));
        /* an empty group still applies beta to its block of c */
        sgemm(ctx, 1, 0, P, Q, rows, alpha, pa + r0 * P, pb + r0 * Q, beta, pc + (int64_t)g * P * Q);
    }
    return MOE_OK;
}
