/* CPU kernel benchmark: prints a markdown table (op, shape, ms, rate).
 * Build (after `make build/cpu/libmoelab.a`), from the repository root:
 *   gcc -std=c11 -D_GNU_SOURCE -O3 -march=x86-64-v3 -Wall -Wextra -o build/cpu/bench_cpu_ops \
 *       bench/cpu_ops.c build/cpu/libmoelab.a -lopenblas -lm -lpthread
 * Run: build/cpu/bench_cpu_ops            (MOELAB_NUM_THREADS sets the pool size) */
#include "../src/ops/backend.h"
#include "../src/core/context.h"

#include <cblas.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

static moe_ctx *ctx;

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec * 1e-9;
}

static moe_tensor *T(int nd, const int64_t *s, uint64_t seed) {
    moe_tensor *t = moe_tensor_new(ctx, MOE_F32, nd, s, MOE_DEVICE_CPU);
    if (!t) { fprintf(stderr, "alloc: %s\n", moe_last_error()); exit(1); }
    moe_op_fill_randn(ctx, t, seed, 0, 0.0f, 1.0f);
    return t;
}
#define S(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

typedef void (*bench_fn)(void *);

/* median-free simple timing: one warm-up, then repeat for >= 0.3 s (>= 3 runs) */
static double time_ms(bench_fn fn, void *arg) {
    fn(arg);
    int n = 0;
    double t0 = now(), t;
    do { fn(arg); n++; t = now() - t0; } while ((t < 0.3 || n < 3) && n < 1000);
    return t / n * 1e3;
}

static void row(const char *op, const char *shape, double ms, double flops, double bytes) {
    if (flops > 0) printf("| %s | %s | %.3f | %.1f GFLOP/s |\n", op, shape, ms, flops / ms * 1e-6);
    else printf("| %s | %s | %.3f | %.1f GB/s |\n", op, shape, ms, bytes / ms * 1e-6);
}

static void check(moe_status s) {
    if (s != MOE_OK) { fprintf(stderr, "error: %s\n", moe_last_error()); exit(1); }
}

typedef struct { moe_tensor *a, *b, *c, *d, *e, *f, *g, *h, *i; const int64_t *off; int groups, reps; } args;

static void b_gemm(void *p) { args *A = p; for (int r = 0; r < A->reps; r++) check(moe_op_gemm(ctx, 0, 0, 1.0f, A->a, A->b, 0.0f, A->c)); }
static void b_gemm_loop(void *p) {
    args *A = p;
    for (int g = 0; g < A->groups; g++) {
        moe_tensor *ag = moe_tensor_narrow(A->a, 0, A->off[g], A->off[g + 1] - A->off[g]);
        moe_tensor *bg = moe_tensor_select(A->b, 0, g);
        moe_tensor *cg = moe_tensor_narrow(A->c, 0, A->off[g], A->off[g + 1] - A->off[g]);
        check(moe_op_gemm(ctx, 0, 0, 1.0f, ag, bg, 0.0f, cg));
        moe_tensor_release(ag); moe_tensor_release(bg); moe_tensor_release(cg);
    }
}
static void b_grouped(void *p) { args *A = p; check(moe_op_gemm_grouped(ctx, 0, 1.0f, A->a, A->b, 0.0f, A->c, A->off, A->groups)); }
static void b_wgrad(void *p) { args *A = p; check(moe_op_gemm_grouped_wgrad(ctx, 1.0f, A->a, A->c, 0.0f, A->b, A->off, A->groups)); }
static void b_att_fwd(void *p) { args *A = p; check(moe_op_attention(ctx, A->d, A->e, A->a, A->b, A->c, 0.125f, 0)); }
static void b_att_bwd(void *p) {
    args *A = p;
    check(moe_op_attention_backward(ctx, A->g, A->h, A->i, A->f, A->a, A->b, A->c, A->d, A->e, 0.125f, 0));
}
static void b_softmax(void *p) { args *A = p; check(moe_op_softmax(ctx, A->b, A->a)); }
static void b_rmsnorm(void *p) { args *A = p; check(moe_op_rmsnorm(ctx, A->b, A->d, A->a, A->c, 1e-6f)); }
static void b_layernorm(void *p) { args *A = p; check(moe_op_layernorm(ctx, A->b, A->e, A->d, A->a, A->c, A->c, 1e-5f)); }
static void b_ce(void *p) { args *A = p; check(moe_op_cross_entropy(ctx, A->f, A->c, A->a, A->d, -100)); }
static void b_ce_bwd(void *p) { args *A = p; check(moe_op_cross_entropy_backward(ctx, A->e, A->a, A->c, A->d, -100, 1.0f / 2048)); }

int main(void) {
    ctx = moe_ctx_new(0);
    moe_cpu_backend_install(ctx);
    printf("CPUs online: %ld, moelab pool threads: %d, OpenBLAS threads: %d\n\n", sysconf(_SC_NPROCESSORS_ONLN),
           moe_ctx_num_threads(ctx), openblas_get_num_threads());
    printf("| op | shape | time ms | rate |\n|---|---|---|---|\n");
    char sh[128];
    for (int n = 512; n <= 2048; n *= 2) {
        args A = {.a = T(S(n, n), 1), .b = T(S(n, n), 2), .c = T(S(n, n), 3)};
        A.reps = 1;
        snprintf(sh, sizeof sh, "%dx%dx%d", n, n, n);
        row("gemm", sh, time_ms(b_gemm, &A), 2.0 * n * n * n, 0);
        moe_tensor_release(A.a); moe_tensor_release(A.b); moe_tensor_release(A.c);
    }
    {   /* expert shapes: 4096 tokens x 1024 hidden -> 4096 ffn, 8 experts */
        int64_t M = 4096, K = 1024, N = 4096, G = 8, off[9];
        for (int g = 0; g <= G; g++) off[g] = M * g / G;
        double fl = 2.0 * M * K * N;
        args A = {.a = T(S(M, K), 4), .b = T(S(K, N), 5), .c = T(S(M, N), 6)};
        A.reps = 1;
        row("gemm (one call)", "4096x1024x4096", time_ms(b_gemm, &A), fl, 0);
        moe_tensor_release(A.b);
        A.b = T(S(G, K, N), 7);
        A.off = off;
        A.groups = (int)G;
        row("gemm x8 (one call per expert)", "8 x 512x1024x4096", time_ms(b_gemm_loop, &A), fl, 0);
        row("gemm_grouped (8 experts)", "4096x1024 @ [8,1024,4096]", time_ms(b_grouped, &A), fl, 0);
        row("gemm_grouped_wgrad (8 experts)", "[8,1024,4096] from 4096 rows", time_ms(b_wgrad, &A), fl, 0);
        moe_tensor_release(A.a); moe_tensor_release(A.b); moe_tensor_release(A.c);
    }
    {
        int64_t B = 4, Tn = 256, H = 8, D = 64;
        args A = {T(S(B, Tn, H, D), 8), T(S(B, Tn, H, D), 9), T(S(B, Tn, H, D), 10), T(S(B, Tn, H, D), 11),
                  T(S(B, H, Tn), 12), T(S(B, Tn, H, D), 13), T(S(B, Tn, H, D), 14), T(S(B, Tn, H, D), 15),
                  T(S(B, Tn, H, D), 16), NULL, 0, 0};
        double fl = 4.0 * B * H * Tn * Tn * D;
        row("attention forward", "B=4 T=256 H=8 D=64", time_ms(b_att_fwd, &A), fl, 0);
        row("attention backward", "B=4 T=256 H=8 D=64", time_ms(b_att_bwd, &A), 2.5 * fl, 0);
        moe_tensor *ts[] = {A.a, A.b, A.c, A.d, A.e, A.f, A.g, A.h, A.i};
        for (int i = 0; i < 9; i++) moe_tensor_release(ts[i]);
    }
    {
        int64_t N = 2048, V = 32000;
        args A = {.a = T(S(N, V), 17), .b = T(S(N, V), 18), .c = T(S(N), 19), .e = T(S(N, V), 20), .f = T(S(N), 26)};
        A.d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){N}, MOE_DEVICE_CPU);
        for (int64_t i = 0; i < N; i++) ((int64_t *)moe_tensor_data(A.d))[i] = (i * 7919) % V;
        double bytes = 2.0 * N * V * 4;
        row("softmax", "2048x32000", time_ms(b_softmax, &A), 0, bytes);
        row("cross_entropy", "N=2048 V=32000", time_ms(b_ce, &A), 0, N * V * 4.0);
        row("cross_entropy_backward", "N=2048 V=32000", time_ms(b_ce_bwd, &A), 0, bytes);
        moe_tensor_release(A.a); moe_tensor_release(A.b); moe_tensor_release(A.c); moe_tensor_release(A.d);
        moe_tensor_release(A.e);
    }
    {
        int64_t R = 8192, D = 1024;
        args A = {.a = T(S(R, D), 21), .b = T(S(R, D), 22), .c = T(S(D), 23), .d = T(S(R), 24), .e = T(S(R), 25)};
        double bytes = 2.0 * R * D * 4;
        row("rmsnorm", "8192x1024", time_ms(b_rmsnorm, &A), 0, bytes);
        row("layernorm", "8192x1024", time_ms(b_layernorm, &A), 0, bytes);
        moe_tensor_release(A.a); moe_tensor_release(A.b); moe_tensor_release(A.c); moe_tensor_release(A.d);
        moe_tensor_release(A.e);
    }
    moe_ctx_free(ctx);
    return 0;
}
