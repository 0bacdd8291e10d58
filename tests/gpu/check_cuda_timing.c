/* check_cuda_timing: kernel timings printed as TAP comments ("# attention fwd
 * ...: X ms, Y TFLOP/s"): attention, grouped GEMMs and weight gradients
 * (skewed too), the grouped-GEMM strategies at MoE-layer shapes, and the
 * memory-bound kernels' bandwidth. No checks ("1..0"); nothing runs with
 * MOELAB_CHECK_NO_TIMING set. MOELAB_CHECK_ONLY=time_attention,... runs only
 * those (gpucheck.h). Timings here are for work on a kernel; the benchmarks
 * with their baselines are in bench/. */
#include "gpucheck.h"

/* ---- timing (TAP comments) ---- */

typedef struct {
    int what;   /* 0 attention fwd, 1 attention bwd, 2 grouped gemm, 3 grouped wgrad */
    moe_tensor *q, *k, *v, *o, *l, *go, *dq, *dk, *dv;
    moe_tensor *a, *b, *c;
    const int64_t *off;
    int groups, causal;
    float scale;
} tjob;

static moe_status tjob_run(void *arg) {
    tjob *j = arg;
    switch (j->what) {
    case 0: return moe_op_attention(ctx, j->o, j->l, j->q, j->k, j->v, j->scale, j->causal);
    case 1:
        return moe_op_attention_backward(ctx, j->dq, j->dk, j->dv, j->go, j->q, j->k, j->v, j->o, j->l, j->scale,
                                         j->causal);
    case 2: return moe_op_gemm_grouped(ctx, 0, 1.0f, j->a, j->b, 0.0f, j->c, j->off, j->groups);
    default: return moe_op_gemm_grouped_wgrad(ctx, 1.0f, j->a, j->b, 0.0f, j->c, j->off, j->groups);
    }
}

static moe_tensor *dev_randn(moe_dtype dt, int nd, const int64_t *shape) {
    moe_tensor *t = moe_tensor_new(ctx, dt, nd, shape, GPU);
    die_if(!t || moe_op_fill_randn(ctx, t, seed++, 0, 0.0f, 1.0f) != MOE_OK, "timing input");
    return t;
}

static void time_attention(moe_dtype dt, int64_t B, int64_t T, int64_t H, int64_t Hkv, int64_t D, int causal) {
    tjob j = {0};
    j.q = dev_randn(dt, SH(B, T, H, D));
    j.k = dev_randn(dt, SH(B, T, Hkv, D));
    j.v = dev_randn(dt, SH(B, T, Hkv, D));
    j.go = dev_randn(dt, SH(B, T, H, D));
    j.o = moe_tensor_new(ctx, dt, SH(B, T, H, D), GPU);
    j.l = moe_tensor_new(ctx, MOE_F32, SH(B, H, T), GPU);
    j.dq = moe_tensor_new(ctx, dt, SH(B, T, H, D), GPU);
    j.dk = moe_tensor_new(ctx, dt, SH(B, T, Hkv, D), GPU);
    j.dv = moe_tensor_new(ctx, dt, SH(B, T, Hkv, D), GPU);
    die_if(!j.o || !j.l || !j.dq || !j.dk || !j.dv, "timing outputs");
    j.scale = 1.0f / sqrtf((float)D);
    j.causal = causal;
    /* matmul FLOPs: forward 4 B H T S D (halved when causal); backward counted as 2.5x forward
     * (the usual convention; these kernels do 3.5x: scores and dP are recomputed for dQ) */
    double f = 4.0 * B * H * T * T * D * (causal ? 0.5 : 1.0);
    for (int w = 0; w < 2; w++) {
        j.what = w;
        double ms = 0;
        moe_status st = moe_cuda_time_ms(ctx, 0, tjob_run, &j, 3, 20, &ms);
        if (st != MOE_OK) { printf("# attention %s: failed: %s\n", w ? "bwd" : "fwd", moe_last_error()); continue; }
        double fl = w ? 2.5 * f : f;
        printf("# attention %s B=%lld T=S=%lld Hq=%lld Hkv=%lld D=%lld %s%s: %.3f ms, %.1f TFLOP/s\n",
               w ? "bwd" : "fwd", (long long)B, (long long)T, (long long)H, (long long)Hkv, (long long)D, dtn(dt),
               causal ? " causal" : "", ms, fl / (ms * 1e-3) / 1e12);
        fflush(stdout);
    }
    moe_tensor *all[] = {j.q, j.k, j.v, j.go, j.o, j.l, j.dq, j.dk, j.dv};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

static void time_grouped(moe_dtype dt, int64_t M, int64_t K, int64_t N, int G) {
    int64_t off[257];
    for (int g = 0; g <= G; g++) off[g] = M * g / G;   /* balanced experts */
    tjob j = {0};
    j.off = off;
    j.groups = G;
    j.a = dev_randn(dt, SH(M, K));
    j.b = dev_randn(dt, SH(G, K, N));
    j.c = moe_tensor_new(ctx, dt, SH(M, N), GPU);
    die_if(!j.c, "timing output");
    j.what = 2;
    double ms = 0, fl = 2.0 * M * K * N;
    if (moe_cuda_time_ms(ctx, 0, tjob_run, &j, 3, 20, &ms) == MOE_OK)
        printf("# gemm_grouped M=%lld K=%lld N=%lld G=%d %s: %.3f ms, %.1f TFLOP/s\n", (long long)M, (long long)K,
               (long long)N, G, dtn(dt), ms, fl / (ms * 1e-3) / 1e12);
    else printf("# gemm_grouped: failed: %s\n", moe_last_error());
    moe_tensor_release(j.b);
    moe_tensor_release(j.c);
    /* weight gradient: a [M, K], b = dY [M, N], c [G, K, N] */
    j.b = dev_randn(dt, SH(M, N));
    j.c = moe_tensor_new(ctx, dt, SH(G, K, N), GPU);
    die_if(!j.c, "timing output");
    j.what = 3;
    if (moe_cuda_time_ms(ctx, 0, tjob_run, &j, 3, 20, &ms) == MOE_OK)
        printf("# gemm_grouped_wgrad M=%lld P=%lld Q=%lld G=%d %s: %.3f ms, %.1f TFLOP/s\n", (long long)M, (long long)K,
               (long long)N, G, dtn(dt), ms, fl / (ms * 1e-3) / 1e12);
    else printf("# gemm_grouped_wgrad: failed: %s\n", moe_last_error());
    moe_tensor_release(j.a); moe_tensor_release(j.b); moe_tensor_release(j.c);
    fflush(stdout);
}

/* The step model's expert weight gradient (8192 tokens x top-4 = 32768 rows, 32
 * experts) under four routings: balanced, one expert with a quarter of the
 * rows (the rest shared, every fourth expert empty), four experts with an
 * eighth each, and four experts with every row (collapsed routing, as the
 * benchmark model's layers show); per call, the time and whether the own kernel
 * split rows (under MOELAB_GROUPED_GEMM=batched or loop this times cuBLAS) */
static void time_wgrad_skew(int64_t P, int64_t Q) {
    const int G = 32;
    const int64_t M = 32768;
    static const char *name[4] = {"balanced", "one expert 1/4 of the rows", "four experts 1/8 each",
                                  "four experts 1/4 each (collapsed)"};
    for (int v = 0; v < 4; v++) {
        int64_t off[33], heavy = v == 1 || v == 3 ? M / 4 : v == 2 ? M / 8 : 0, nheavy = v == 1 ? 1 : v > 1 ? 4 : 0;
        int kind[32], light = 0;   /* 0 light, 1 heavy, 2 empty */
        for (int g = 0; g < G; g++) {
            kind[g] = v > 0 && g % 8 == 3 && g / 8 < nheavy ? 1 : v > 0 && g % 4 == 1 ? 2 : 0;
            light += kind[g] == 0;
        }
        int64_t rest = M - heavy * nheavy;
        off[0] = 0;
        for (int g = 0, li = 0; g < G; g++) {
            int64_t n = kind[g] == 1 ? heavy : 0;
            if (kind[g] == 0 && rest > 0) { n = rest * (li + 1) / light - rest * li / light; li++; }
            off[g + 1] = off[g] + n;
        }
        die_if(off[G] != M, "skewed offsets");
        tjob j = {0};
        j.off = off;
        j.groups = G;
        j.a = dev_randn(MOE_BF16, SH(M, P));
        j.b = dev_randn(MOE_BF16, SH(M, Q));
        j.c = moe_tensor_new(ctx, MOE_BF16, SH(G, P, Q), GPU);
        die_if(!j.c, "timing output");
        j.what = 3;
        double ms = 0, fl = 2.0 * M * P * Q;
        uint64_t s0 = 0, s1 = 0;
        moe_cuda_grouped_split_calls(ctx, 0, &s0);
        if (moe_cuda_time_ms(ctx, 0, tjob_run, &j, 3, 20, &ms) == MOE_OK) {
            moe_cuda_grouped_split_calls(ctx, 0, &s1);
            printf("# gemm_grouped_wgrad M=%lld P=%lld Q=%lld G=%d bf16, %s: %.3f ms, %.1f TFLOP/s (%s)\n",
                   (long long)M, (long long)P, (long long)Q, G, name[v], ms, fl / (ms * 1e-3) / 1e12,
                   s1 > s0 ? "rows split" : "not split");
        }
        else printf("# gemm_grouped_wgrad (%s): failed: %s\n", name[v], moe_last_error());
        moe_tensor_release(j.a); moe_tensor_release(j.b); moe_tensor_release(j.c);
        fflush(stdout);
    }
}

/* ---- grouped-GEMM strategies at MoE-layer shapes ----
 * loop (one cuBLAS GEMM per expert) against batched (one
 * cublasGemmGroupedBatchedEx), both timed in one run through
 * moe_cuda_set_grouped_gemm. */
typedef struct {
    int wgrad, transb;
    moe_tensor *a, *b, *c;
    const int64_t *off;
    int groups;
} gjob;

static moe_status gjob_run(void *arg) {
    gjob *j = arg;
    /* as in training: the forward and dgrad overwrite, the weight gradient accumulates */
    if (j->wgrad) return moe_op_gemm_grouped_wgrad(ctx, 1.0f, j->a, j->b, 1.0f, j->c, j->off, j->groups);
    return moe_op_gemm_grouped(ctx, j->transb, 1.0f, j->a, j->b, 0.0f, j->c, j->off, j->groups);
}

/* Offsets of M rows over G experts, expert e getting a share proportional to
 * 1 / (e + 1)^s (s = 0: balanced; s = 1: Zipf), remainders to the first
 * experts. Returns the largest expert's rows over the mean. */
static double expert_offsets(int64_t *off, int64_t M, int G, double s) {
    double w[256], tot = 0;
    int64_t cnt[256], sum = 0, mx = 0;
    for (int e = 0; e < G; e++) tot += (w[e] = pow(e + 1.0, -s));
    for (int e = 0; e < G; e++) sum += (cnt[e] = (int64_t)floor((double)M * w[e] / tot));
    for (int e = 0; sum < M; e = (e + 1) % G, sum++) cnt[e]++;
    off[0] = 0;
    for (int e = 0; e < G; e++) {
        off[e + 1] = off[e] + cnt[e];
        if (cnt[e] > mx) mx = cnt[e];
    }
    return (double)mx * G / (double)M;
}

/* Times one grouped call under each strategy: ms[k] for NSTRAT strategies (< 0: failed). */
enum { NSTRAT = 6 };
static const moe_cuda_grouped_gemm strat_mode[NSTRAT] = {MOE_CUDA_GROUPED_LOOP, MOE_CUDA_GROUPED_LOOP,
                                                        MOE_CUDA_GROUPED_LOOP, MOE_CUDA_GROUPED_BATCHED,
                                                        MOE_CUDA_GROUPED_PADDED, MOE_CUDA_GROUPED_KERNEL};
static const int strat_lanes[NSTRAT] = {1, 2, 4, 1, 1, 1};   /* the loop over 1, 2 and 4 streams */
static const char *const strat_name[NSTRAT] = {"loop", "loop x2", "loop x4", "batched", "padded", "kernel"};

static void time_gjob_strategies(gjob *j, const char *label, double flops, double ms[NSTRAT]) {
    char txt[NSTRAT][160];
    int fell_back = 0;
    for (int k = 0; k < NSTRAT; k++) {
        uint64_t b0 = 0, b1 = 0;
        ms[k] = -1;
        if (moe_cuda_set_grouped_gemm(ctx, 0, strat_mode[k]) != MOE_OK ||
            moe_cuda_set_grouped_lanes(ctx, 0, strat_lanes[k]) != MOE_OK ||
            moe_cuda_grouped_gemm_info(ctx, 0, NULL, &b0, NULL) != MOE_OK ||
            moe_cuda_time_ms(ctx, 0, gjob_run, j, 3, 20, &ms[k]) != MOE_OK ||
            moe_cuda_grouped_gemm_info(ctx, 0, NULL, &b1, NULL) != MOE_OK) {
            ms[k] = -1;
            snprintf(txt[k], sizeof txt[k], "failed: %s", moe_last_error());
            continue;
        }
        if (strat_mode[k] != MOE_CUDA_GROUPED_LOOP && b1 - b0 != 23) fell_back = 1;
        snprintf(txt[k], sizeof txt[k], "%.3f ms %.1f TFLOP/s", ms[k], flops / (ms[k] * 1e-3) / 1e12);
    }
    moe_cuda_set_grouped_lanes(ctx, 0, 1);
    printf("# %s:", label);
    for (int k = 0; k < NSTRAT; k++) printf("%s %s %s", k ? " |" : "", strat_name[k], txt[k]);
    if (fell_back) printf(" [a one-call strategy fell back to the loop]");
    printf("\n");
    fflush(stdout);
}

/* The 9 grouped GEMMs of one SwiGLU MoE layer step, rows = tokens * top-k,
 * hidden H, expert hidden I, G experts, balanced and Zipf-skewed experts:
 * forward gate/up (x @ W^T, [M,H] -> [M,I], twice) and down ([M,I] -> [M,H]);
 * backward dgrad down, dgrad up (twice), wgrad down, wgrad up (twice). */
static void time_moe_layer(const char *model, moe_dtype dt, int64_t M, int64_t H, int64_t I, int G) {
    moe_tensor *x = dev_randn(dt, SH(M, H)), *dy = dev_randn(dt, SH(M, H)), *h = dev_randn(dt, SH(M, I));
    moe_tensor *wup = dev_randn(dt, SH(G, I, H)), *wdn = dev_randn(dt, SH(G, H, I));
    moe_tensor *gup = dev_randn(dt, SH(G, I, H)), *gdn = dev_randn(dt, SH(G, H, I));
    moe_tensor *oi = moe_tensor_new(ctx, dt, SH(M, I), GPU), *oh = moe_tensor_new(ctx, dt, SH(M, H), GPU);
    die_if(!oi || !oh, "timing outputs");
    struct {
        const char *what;
        int wgrad, transb, times;
        moe_tensor *a, *b, *c;
        int64_t k, n;
    } ops[] = {
        {"fwd gate/up x@W^T", 0, 1, 2, x, wup, oi, H, I},
        {"fwd down h@W^T", 0, 1, 1, h, wdn, oh, I, H},
        {"bwd dgrad down dy@W", 0, 0, 1, dy, wdn, oi, H, I},
        {"bwd dgrad gate/up du@W", 0, 0, 2, h, wup, oh, I, H},
        {"bwd wgrad down dy^T h", 1, 0, 1, dy, h, gdn, H, I},
        {"bwd wgrad gate/up du^T x", 1, 0, 2, h, x, gup, I, H},
    };
    const double skew[2] = {0.0, 1.0};
    int64_t off[257];
    for (int v = 0; v < 2; v++) {
        double ratio = expert_offsets(off, M, G, skew[v]);
        char bal[64];
        if (v) snprintf(bal, sizeof bal, "zipf s=1 (max/mean %.1f)", ratio);
        else snprintf(bal, sizeof bal, "balanced");
        double tot[NSTRAT] = {0};
        int all = 1;
        for (size_t o = 0; o < sizeof ops / sizeof ops[0]; o++) {
            gjob j = {ops[o].wgrad, ops[o].transb, ops[o].a, ops[o].b, ops[o].c, off, G};
            char label[256];
            snprintf(label, sizeof label, "grouped %s %s %s, %s: M=%lld K=%lld N=%lld G=%d", model, dtn(dt),
                     ops[o].what, bal, (long long)M, (long long)ops[o].k, (long long)ops[o].n, G);
            double ms[NSTRAT];
            time_gjob_strategies(&j, label, 2.0 * (double)M * (double)H * (double)I, ms);
            for (int k = 0; k < NSTRAT; k++) {
                if (ms[k] < 0) all = 0;
                tot[k] += ops[o].times * ms[k];
            }
        }
        if (all) {
            double fl = 9 * 2.0 * (double)M * (double)H * (double)I;
            printf("# grouped %s %s layer step (9 grouped GEMMs), %s:", model, dtn(dt), bal);
            for (int k = 0; k < NSTRAT; k++)
                printf("%s %s %.3f ms %.1f TFLOP/s", k ? " |" : "", strat_name[k], tot[k], fl / (tot[k] * 1e-3) / 1e12);
            printf("\n");
            fflush(stdout);
        }
    }
    moe_tensor *all_t[] = {x, dy, h, wup, wdn, gup, gdn, oi, oh};
    for (size_t i = 0; i < sizeof all_t / sizeof all_t[0]; i++) moe_tensor_release(all_t[i]);
}

/* ---- memory-bound kernels: time per call and bandwidth (the fewest bytes the
 * op must move: each input read once, each output written once) ----
 * Inputs that fit in L2 (50 MB) rotate over MB_SETS sets, and such ops run
 * reps times per timed call (the time is per op) so launch gaps do not count. */
#define MB_SETS 4
typedef struct {
    int what;   /* 0 xent fwd, 1 xent bwd, 2 axpy, 3 rope, 4 rmsnorm fwd, 5 rmsnorm bwd, 6 xent fused,
                   7 rmsnorm + rope fwd, 8 rmsnorm + rope bwd */
    int reps, sets, cur;
    moe_tensor *x[MB_SETS], *y[MB_SETS], *z[MB_SETS];
    moe_tensor *w, *s1, *s2, *tg, *dw;
    float alpha;
} mbjob;

static moe_status mbjob_run(void *arg) {
    mbjob *j = arg;
    for (int r = 0; r < j->reps; r++) {
        int k = j->cur;
        j->cur = (j->cur + 1) % j->sets;
        moe_status st;
        switch (j->what) {
        case 0: st = moe_op_cross_entropy(ctx, j->s1, j->s2, j->x[k], j->tg, -100); break;
        case 1: st = moe_op_cross_entropy_backward(ctx, j->y[k], j->x[k], j->s2, j->tg, -100, j->alpha); break;
        case 6: st = moe_op_cross_entropy_fused(ctx, j->s1, j->s2, j->y[k], j->x[k], j->tg, -100, j->alpha); break;
        case 2: st = moe_op_axpy(ctx, j->y[k], j->alpha, j->x[k]); break;
        case 3: st = moe_op_rope(ctx, j->y[k], j->x[k], 0, 10000.0f, 0); break;
        case 4: st = moe_op_rmsnorm(ctx, j->y[k], j->s1, j->x[k], j->w, 1e-5f); break;
        case 5: st = moe_op_rmsnorm_backward(ctx, j->z[k], j->dw, j->y[k], j->x[k], j->w, j->s1); break;
        case 7: st = moe_op_rmsnorm_rope(ctx, j->y[k], j->s1, j->x[k], j->w, 1e-5f, 16, 0, 10000.0f); break;
        case 8:
            st = moe_op_rmsnorm_rope_backward(ctx, j->z[k], j->dw, j->y[k], j->x[k], j->w, j->s1, 16, 0, 10000.0f, 0.0f);
            break;
        default: st = moe_error(MOE_ERR_INTERNAL, "mbjob: unknown job %d", j->what); break;
        }
        if (st != MOE_OK) return st;
    }
    return MOE_OK;
}

static void mbjob_time(mbjob *j, const char *label, double bytes) {
    double ms = 0;
    if (moe_cuda_time_ms(ctx, 0, mbjob_run, j, 3, 20, &ms) == MOE_OK) {
        ms /= j->reps;
        printf("# %s: %.1f us, %.0f GB/s\n", label, ms * 1e3, bytes / (ms * 1e-3) / 1e9);
    } else {
        printf("# %s: failed: %s\n", label, moe_last_error());
    }
    fflush(stdout);
}

static void mbjob_free(mbjob *j) {
    for (int k = 0; k < MB_SETS; k++) {
        moe_tensor_release(j->x[k]); moe_tensor_release(j->y[k]); moe_tensor_release(j->z[k]);
    }
    moe_tensor_release(j->w); moe_tensor_release(j->s1); moe_tensor_release(j->s2);
    moe_tensor_release(j->tg); moe_tensor_release(j->dw);
}

/* cross entropy over [N, V] bf16 logits with f32 loss and lse; every 16th row ignored */
static void time_cross_entropy(int64_t N, int64_t V) {
    mbjob j = {0};
    j.reps = j.sets = 1;
    j.x[0] = dev_randn(MOE_BF16, SH(N, V));
    j.y[0] = moe_tensor_new(ctx, MOE_BF16, SH(N, V), GPU);
    j.s1 = moe_tensor_new(ctx, MOE_F32, SH(N), GPU);
    j.s2 = moe_tensor_new(ctx, MOE_F32, SH(N), GPU);
    moe_tensor *th = moe_tensor_new_cpu(MOE_I64, SH(N));
    die_if(!j.y[0] || !j.s1 || !j.s2 || !th, "timing tensors");
    int64_t *t = moe_tensor_data(th);
    for (int64_t i = 0; i < N; i++) t[i] = i % 16 == 5 ? -100 : (i * 7919 + 13) % V;
    j.tg = moe_op_to(ctx, th, GPU, MOE_I64);
    moe_tensor_release(th);
    die_if(!j.tg, "targets upload");
    j.alpha = 1.0f / (float)N;
    char label[160];
    double nv = (double)N * (double)V;
    j.what = 0;
    snprintf(label, sizeof label, "cross_entropy fwd [%lld, %lld] bf16 (f32 loss/lse)", (long long)N, (long long)V);
    mbjob_time(&j, label, nv * 2 + N * 16.0);
    j.what = 1;
    snprintf(label, sizeof label, "cross_entropy bwd [%lld, %lld] bf16", (long long)N, (long long)V);
    mbjob_time(&j, label, nv * 4 + N * 12.0);
    j.what = 6;   /* bytes counted as device memory needs them: the logits read once */
    snprintf(label, sizeof label, "cross_entropy fused fwd+bwd [%lld, %lld] bf16", (long long)N, (long long)V);
    mbjob_time(&j, label, nv * 4 + N * 16.0);
    mbjob_free(&j);
}

static void time_axpy(int64_t n) {
    mbjob j = {0};
    j.reps = j.sets = 1;
    j.what = 2;
    j.alpha = 1e-3f;
    j.x[0] = dev_randn(MOE_BF16, SH(n));
    j.y[0] = dev_randn(MOE_BF16, SH(n));
    char label[160];
    snprintf(label, sizeof label, "axpy n=%lld bf16", (long long)n);
    mbjob_time(&j, label, 6.0 * (double)n);
    mbjob_free(&j);
}

static void time_rope(int64_t B, int64_t T, int64_t H, int64_t D) {
    mbjob j = {0};
    j.reps = 8;
    j.sets = MB_SETS;
    j.what = 3;
    for (int k = 0; k < MB_SETS; k++) {
        j.x[k] = dev_randn(MOE_BF16, SH(B, T, H, D));
        j.y[k] = moe_tensor_new(ctx, MOE_BF16, SH(B, T, H, D), GPU);
        die_if(!j.y[k], "timing output");
    }
    char label[160];
    snprintf(label, sizeof label, "rope [%lld,%lld,%lld,%lld] bf16", (long long)B, (long long)T, (long long)H,
             (long long)D);
    mbjob_time(&j, label, 4.0 * (double)(B * T * H * D));
    mbjob_free(&j);
}

/* rmsnorm over [rows, n] bf16 with f32 rstd; the backward with dw */
static void time_rmsnorm(int64_t rows, int64_t n) {
    mbjob j = {0};
    j.reps = 8;
    j.sets = MB_SETS;
    for (int k = 0; k < MB_SETS; k++) {
        j.x[k] = dev_randn(MOE_BF16, SH(rows, n));
        j.y[k] = dev_randn(MOE_BF16, SH(rows, n));   /* forward output, backward dy */
        j.z[k] = moe_tensor_new(ctx, MOE_BF16, SH(rows, n), GPU);
        die_if(!j.z[k], "timing output");
    }
    j.w = dev_randn(MOE_BF16, SH(n));
    j.dw = dev_randn(MOE_BF16, SH(n));
    j.s1 = moe_tensor_new(ctx, MOE_F32, SH(rows), GPU);
    die_if(!j.s1, "timing rstd");
    char label[160];
    double e = (double)rows * (double)n;
    j.what = 4;
    snprintf(label, sizeof label, "rmsnorm fwd [%lld, %lld] bf16 (f32 rstd)", (long long)rows, (long long)n);
    mbjob_time(&j, label, 4.0 * e + 2.0 * n + 4.0 * rows);
    /* the backward reads rstd from the forward just timed (f32, realistic values) */
    die_if(moe_op_rmsnorm(ctx, j.y[0], j.s1, j.x[0], j.w, 1e-5f) != MOE_OK, "rmsnorm");
    for (int k = 0; k < MB_SETS; k++) die_if(moe_op_fill_randn(ctx, j.y[k], seed++, 0, 0.0f, 1.0f) != MOE_OK, "dy");
    j.what = 5;
    snprintf(label, sizeof label, "rmsnorm bwd [%lld, %lld] bf16 (dx and dw)", (long long)rows, (long long)n);
    mbjob_time(&j, label, 6.0 * e + 6.0 * n + 4.0 * rows);
    mbjob_free(&j);
}

/* QK-norm + rope as the step runs it: [B, T, 16 heads x 64] bf16, f32 rstd; the backward with dw */
static void time_rmsnorm_rope(int64_t B, int64_t T) {
    const int64_t n = 16 * 64, rows = B * T;
    mbjob j = {0};
    j.reps = 8;
    j.sets = MB_SETS;
    for (int k = 0; k < MB_SETS; k++) {
        j.x[k] = dev_randn(MOE_BF16, SH(B, T, n));
        j.y[k] = dev_randn(MOE_BF16, SH(B, T, n));   /* forward output, backward dy */
        j.z[k] = moe_tensor_new(ctx, MOE_BF16, SH(B, T, n), GPU);
        die_if(!j.z[k], "timing output");
    }
    j.w = dev_randn(MOE_BF16, SH(n));
    j.dw = dev_randn(MOE_BF16, SH(n));
    j.s1 = moe_tensor_new(ctx, MOE_F32, SH(B, T), GPU);
    die_if(!j.s1, "timing rstd");
    char label[160];
    const double e = (double)rows * (double)n;
    j.what = 7;
    snprintf(label, sizeof label, "rmsnorm + rope fwd [%lld, %lld, %lld] bf16", (long long)B, (long long)T, (long long)n);
    mbjob_time(&j, label, 4.0 * e + 4.0 * rows);
    die_if(moe_op_rmsnorm_rope(ctx, j.y[0], j.s1, j.x[0], j.w, 1e-5f, 16, 0, 10000.0f) != MOE_OK, "rmsnorm_rope");
    for (int k = 0; k < MB_SETS; k++) die_if(moe_op_fill_randn(ctx, j.y[k], seed++, 0, 0.0f, 1.0f) != MOE_OK, "dy");
    j.what = 8;
    snprintf(label, sizeof label, "rmsnorm + rope bwd [%lld, %lld, %lld] bf16 (dx and dw)", (long long)B, (long long)T,
             (long long)n);
    mbjob_time(&j, label, 6.0 * e + 4.0 * rows);
    mbjob_free(&j);
}

static void timings(void) {
    printf("# timings (CUDA events, median of 20 after 3 warm-up runs; set MOELAB_CHECK_NO_TIMING=1 to skip)\n");
    moe_cuda_grouped_gemm gm = MOE_CUDA_GROUPED_BATCHED;
    moe_cuda_grouped_gemm_info(ctx, 0, &gm, NULL, NULL);
    printf("# grouped-GEMM strategy by default (MOELAB_GROUPED_GEMM): %s\n",
           gm == MOE_CUDA_GROUPED_LOOP ? "loop" : gm == MOE_CUDA_GROUPED_AUTO ? "auto" : "batched");
    if (want("time_attention")) {
        time_attention(MOE_BF16, 4, 2048, 16, 16, 128, 1);
        time_attention(MOE_BF16, 4, 2048, 16, 16, 128, 0);
        time_attention(MOE_BF16, 4, 2048, 16, 4, 128, 1);
        time_attention(MOE_BF16, 2, 4096, 16, 16, 128, 1);
        time_attention(MOE_BF16, 4, 2048, 16, 16, 64, 1);
        time_attention(MOE_F32, 1, 2048, 16, 16, 128, 1);
    }
    /* bench/gpu_step.lua's attention (alone: a short run to profile) */
    if (want("time_attention") || want("time_attention_step")) time_attention(MOE_BF16, 8, 1024, 16, 16, 64, 1);
    if (want("time_grouped")) {
        time_grouped(MOE_BF16, 32768, 1024, 2816, 8);
        time_grouped(MOE_BF16, 32768, 2816, 1024, 8);
        time_grouped(MOE_BF16, 65536, 2048, 1024, 64);
    }
    if (want("time_grouped") || want("time_wgrad_skew")) {
        time_wgrad_skew(1024, 512);
        time_wgrad_skew(512, 1024);
    }
    /* memory-bound ops at the OLMoE-style step's shapes (8192 tokens, d 1024, vocab 50304, 16 heads of 64) */
    if (want("time_cross_entropy")) {
        time_cross_entropy(8192, 50304);
        time_cross_entropy(2048, 50304);   /* a chunk of bench/gpu_step.lua's head */
    }
    if (want("time_axpy")) time_axpy((int64_t)64 << 20);
    if (want("time_rope")) time_rope(8, 1024, 16, 64);
    if (want("time_rmsnorm")) time_rmsnorm(8192, 1024);
    if (want("time_rmsnorm_rope")) time_rmsnorm_rope(8, 1024);
    /* both grouped-GEMM strategies in one run; the default one is restored after */
    if (want("time_moe_layer")) {
        time_moe_layer("OLMoE", MOE_BF16, 16384 * 8, 2048, 1024, 64);
        time_moe_layer("Mixtral", MOE_BF16, 8192 * 2, 4096, 14336, 8);
        time_moe_layer("step-model", MOE_BF16, 8192 * 4, 1024, 512, 32);   /* bench/gpu_step.lua's experts */
    }
    moe_cuda_set_grouped_gemm(ctx, 0, gm);
}

int main(void) {
    gpucheck_begin();
    if (!getenv("MOELAB_CHECK_NO_TIMING")) timings();
    return gpucheck_end();
}
