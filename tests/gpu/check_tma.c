/* The TMA kernel of the grouped GEMM (src/ops/cuda/cuda_grouped_tma.cu)
 * against the CPU backend on fresh random bf16 data: partial tiles in every
 * direction (row counts, K and N not multiples of its 128 x 256 x 64 tile),
 * empty experts first, in the middle and last (whose boxes read the next
 * expert's rows), an N below one tile and one just above it (whose B boxes
 * read the next expert's rows), beta 0 over NaN (c must not be read) and 0.5,
 * the largest expert count it takes (256), more tiles than SMs (the
 * persistent loop), and the shapes of the layer and step; each with b
 * [G, N, K] (the forward) and [G, K, N] (data gradients). Each check
 * asserts from the device's counter that the TMA kernel served the call, and
 * a call it must refuse (K not a multiple of 8) still gives the right result.
 * The pair form (two GEMMs summed along K: the SwiGLU input gradient) in both
 * layouts, and which calls the setting and strategy send to it; Inf in an
 * empty expert's weights next to a partial box must stay out of the results.
 * The weight gradient (c_g = a_g^T b_g, K the group's rows): groups of no
 * rows, one row, a partial last k-tile, P and Q not multiples of the tile,
 * the shapes, beta 1 with every second expert empty, Inf in the rows
 * after a group's partial last k-tile (which the kernel zeroes) kept out of
 * that group's result, and which weight gradients auto leaves to other paths.
 * Groups with an odd count of M tiles, whose last pair of CTAs each take 64
 * rows of the last tile, and warpgroups with no rows to compute. The offsets
 * on the device (gemm_grouped_dev, gemm_grouped_wgrad_dev: each block builds
 * the schedule from them) for the forward, the data gradient and the weight
 * gradient, and offsets there that break the contract (no fault).
 * The SwiGLU epilogues (the activation after up's GEMM, its backward after
 * dh's, run by the producer warpgroup's idle warps): against the CPU and byte
 * for byte against the plain TMA GEMMs followed by the elementwise kernels.
 * Every kernel check runs with clusters of two CTAs (the default) and of one. */
#include "gpucheck.h"

static const moe_dtype BF = MOE_BF16;

static uint64_t tma_calls(void) {
    uint64_t n = 0;
    die_if(moe_cuda_grouped_tma_calls(ctx, 0, &n) != MOE_OK, "TMA counter");
    return n;
}

/* The offsets on the device (moe_op_gemm_grouped_dev / _wgrad_dev): the TMA
 * kernel reads them there and builds its schedule in each block; the results
 * against the CPU with the same offsets on the host. */
/* which path served a call: n TMA launches, nd of them reading the offsets on the device */
static void served(const char *name, uint64_t n, uint64_t nd, int want_tma, int dev) {
    if (dev)
        ok(n == 1 && nd == 1, "%s: served by the TMA kernel reading the offsets on the device (%llu, %llu calls)", name,
           (unsigned long long)n, (unsigned long long)nd);
    else
        ok(n == (uint64_t)want_tma, "%s: %s the TMA kernel (%llu calls)", name, want_tma ? "served by" : "not taken by",
           (unsigned long long)n);
}

/* dev: the offsets in a device tensor (gemm_grouped_dev), which the kernel must read there */
static void fwd_run(int tb, const char *what, float beta, const int64_t *off, int G, int64_t K, int64_t N,
                    int want_tma, int dev) {
    int64_t M = off[G];
    pair a = in_randn(BF, SH(M, K)), c = in_randn(BF, SH(M, N));
    pair b = tb ? in_randn(BF, SH(G, N, K)) : in_randn(BF, SH(G, K, N));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    moe_tensor *od = dev ? upload_offsets(off, G) : NULL;
    char name[200];
    snprintf(name, sizeof name, "TMA %s%s %s: beta=%g G=%d M=%lld K=%lld N=%lld", tb ? "fwd" : "dgrad",
             dev ? ", offsets on the device," : "", what, beta, G, (long long)M, (long long)K, (long long)N);
    uint64_t t0 = tma_calls(), d0 = dev_calls();
    if (RUN(name, BF, moe_op_gemm_grouped(ctx, tb, 0.9f, a.h, b.h, beta, c.h, off, G),
            dev ? moe_op_gemm_grouped_dev(ctx, tb, 0.9f, a.d, b.d, beta, c.d, od)
                : moe_op_gemm_grouped(ctx, tb, 0.9f, a.d, b.d, beta, c.d, off, G))) {
        check2(name, BF, c.d, c.h, tol_of(BF, 0), 1e-2);
        served(name, tma_calls() - t0, dev_calls() - d0, want_tma, dev);
    }
    moe_tensor_release(od);
    pfree(&a); pfree(&b); pfree(&c);
}
static void fwd_tb(int tb, const char *what, float beta, const int64_t *off, int G, int64_t K, int64_t N,
                   int want_tma) {
    fwd_run(tb, what, beta, off, G, K, N, want_tma, 0);
}
static void fwd_dev(int tb, const char *what, float beta, const int64_t *off, int G, int64_t K, int64_t N) {
    fwd_run(tb, what, beta, off, G, K, N, 1, 1);
}

/* both layouts of b: [G, N, K] (the forward) and [G, K, N] (the data gradient) */
static void fwd(const char *what, float beta, const int64_t *off, int G, int64_t K, int64_t N, int want_tma) {
    for (int tb = 1; tb >= 0; tb--) fwd_tb(tb, what, beta, off, G, K, N, want_tma);
}

static void pair_tb(int tb, const char *what, float beta, const int64_t *off, int G, int64_t K1, int64_t K2,
                    int64_t N) {
    int64_t M = off[G];
    pair a1 = in_randn(BF, SH(M, K1)), a2 = in_randn(BF, SH(M, K2)), c = in_randn(BF, SH(M, N));
    pair b1 = tb ? in_randn(BF, SH(G, N, K1)) : in_randn(BF, SH(G, K1, N));
    pair b2 = tb ? in_randn(BF, SH(G, N, K2)) : in_randn(BF, SH(G, K2, N));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "TMA pair %s %s: beta=%g G=%d M=%lld K1=%lld K2=%lld N=%lld", tb ? "fwd" : "dgrad", what,
             beta, G, (long long)M, (long long)K1, (long long)K2, (long long)N);
    uint64_t t0 = tma_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_pair(ctx, tb, 0.9f, a1.h, b1.h, a2.h, b2.h, beta, c.h, off, G),
            moe_op_gemm_grouped_pair(ctx, tb, 0.9f, a1.d, b1.d, a2.d, b2.d, beta, c.d, off, G))) {
        check2(name, BF, c.d, c.h, tol_of(BF, 0), 1e-2);
        uint64_t n = tma_calls() - t0;
        ok(n == 1, "%s: one launch of the TMA kernel (%llu)", name, (unsigned long long)n);
    }
    pfree(&a1); pfree(&a2); pfree(&b1); pfree(&b2); pfree(&c);
}

static void cut_offsets(int64_t *off);

static uint64_t swiglu_calls(void) {
    uint64_t n = 0;
    die_if(moe_cuda_tma_swiglu_calls(ctx, 0, &n) != MOE_OK, "SwiGLU epilogue counter");
    return n;
}
/* since the counts t0 (TMA launches) and e0 (of them with a SwiGLU epilogue) */
static void swiglu_launches(const char *name, uint64_t t0, uint64_t e0, uint64_t want_tma, uint64_t want_epi) {
    uint64_t n = tma_calls() - t0, ne = swiglu_calls() - e0;
    ok(n == want_tma && ne == want_epi, "%s: %llu TMA launches, %llu with the epilogue (want %llu, %llu)", name,
       (unsigned long long)n, (unsigned long long)ne, (unsigned long long)want_tma, (unsigned long long)want_epi);
}

/* The SwiGLU forward through the TMA kernel: gate's GEMM, then up's with the
 * activation in its epilogue (epi: the setting has it on), two launches;
 * against the CPU's and byte for byte against the device's plain GEMMs and
 * swiglu. Under the loop strategy the own kernel does not take the fused call
 * first. */
static void swiglu_fwd(const char *what, const int64_t *off, int G, int64_t K, int64_t I, int epi) {
    int64_t M = off[G];
    pair x = in_randn(BF, SH(M, K)), wg = in_randn(BF, SH(G, I, K)), wu = in_randn(BF, SH(G, I, K));
    pair g = out_pair(BF, SH(M, I)), u = out_pair(BF, SH(M, I)), h = out_pair(BF, SH(M, I));
    die_if(moe_op_fill(ctx, u.d, NAN) != MOE_OK || moe_op_fill(ctx, h.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "TMA swiglu %s: G=%d M=%lld K=%lld I=%lld", what, G, (long long)M, (long long)K,
             (long long)I);
    uint64_t t0 = tma_calls(), e0 = swiglu_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_swiglu(ctx, x.h, wg.h, wu.h, g.h, u.h, h.h, off, G),
            moe_op_gemm_grouped_swiglu(ctx, x.d, wg.d, wu.d, g.d, u.d, h.d, off, G))) {
        swiglu_launches(name, t0, e0, 2, epi != 0);
        char n2[260];
        snprintf(n2, sizeof n2, "%s: up", name); check(n2, BF, u.d, u.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: activation", name); check(n2, BF, h.d, h.h, tol_of(BF, 0));
        moe_tensor *u2 = moe_tensor_new(ctx, BF, SH(M, I), GPU), *h2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!u2 || !h2 || moe_op_gemm_grouped(ctx, 1, 1.0f, x.d, wu.d, 0.0f, u2, off, G) != MOE_OK ||
               moe_op_swiglu(ctx, h2, g.d, u2) != MOE_OK, "unfused calls");
        ok(same_bytes(u.d, u2) && same_bytes(h.d, h2), "%s: up and the activation = the plain GEMM's and swiglu's bytes",
           name);
        moe_tensor_release(u2); moe_tensor_release(h2);
    }
    pfree(&x); pfree(&wg); pfree(&wu); pfree(&g); pfree(&u); pfree(&h);
}

/* Its backward: dh = 0.9 dy w_g (w [G, K, I]) met with gate and up in the
 * epilogue (epi: the setting has it on), dh never stored; dgate, dup and the
 * activation again (with_h) against the CPU's, and byte for byte against the
 * plain GEMM and swiglu_backward (and swiglu) on the device; one launch. */
static void swiglu_bwd(const char *what, const int64_t *off, int G, int64_t K, int64_t I, int with_h, int epi) {
    int64_t M = off[G];
    pair dy = in_randn(BF, SH(M, K)), w = in_randn(BF, SH(G, K, I));
    pair g = in_randn(BF, SH(M, I)), u = in_randn(BF, SH(M, I));
    pair dg = out_pair(BF, SH(M, I)), du = out_pair(BF, SH(M, I)), h = out_pair(BF, SH(M, I));
    die_if(moe_op_fill(ctx, dg.d, NAN) != MOE_OK || moe_op_fill(ctx, du.d, NAN) != MOE_OK ||
           moe_op_fill(ctx, h.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "TMA swiglu backward %s%s: G=%d M=%lld K=%lld I=%lld", what, with_h ? "" : ", no h", G,
             (long long)M, (long long)K, (long long)I);
    uint64_t t0 = tma_calls(), e0 = swiglu_calls();
    if (RUN(name, BF,
            moe_op_gemm_grouped_swiglu_backward(ctx, 0.9f, dy.h, w.h, g.h, u.h, dg.h, du.h, with_h ? h.h : NULL, off, G),
            moe_op_gemm_grouped_swiglu_backward(ctx, 0.9f, dy.d, w.d, g.d, u.d, dg.d, du.d, with_h ? h.d : NULL, off, G))) {
        swiglu_launches(name, t0, e0, 1, epi != 0);
        char n2[260];
        snprintf(n2, sizeof n2, "%s: dgate", name); check(n2, BF, dg.d, dg.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: dup", name); check(n2, BF, du.d, du.h, tol_of(BF, 0));
        moe_tensor *dh = moe_tensor_new(ctx, BF, SH(M, I), GPU), *dg2 = moe_tensor_new(ctx, BF, SH(M, I), GPU),
                   *du2 = moe_tensor_new(ctx, BF, SH(M, I), GPU), *h2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!dh || !dg2 || !du2 || !h2 || moe_op_gemm_grouped(ctx, 0, 0.9f, dy.d, w.d, 0.0f, dh, off, G) != MOE_OK ||
               moe_op_swiglu_backward(ctx, dg2, du2, dh, g.d, u.d) != MOE_OK || moe_op_swiglu(ctx, h2, g.d, u.d) != MOE_OK,
               "unfused calls");
        ok(same_bytes(dg.d, dg2) && same_bytes(du.d, du2), "%s: dgate and dup = the plain calls' bytes", name);
        if (with_h) ok(same_bytes(h.d, h2), "%s: the activation = swiglu's bytes", name);
        else {   /* h untouched: still the poison */
            moe_tensor *hh = moe_op_to(ctx, h.d, MOE_DEVICE_CPU, MOE_F32);
            die_if(!hh, "download");
            int untouched = 1;
            for (int64_t i = 0; i < moe_tensor_numel(hh); i++) untouched &= isnan(moe_f32(hh)[i]) != 0;
            ok(untouched, "%s: no activation asked, none written", name);
            moe_tensor_release(hh);
        }
        moe_tensor_release(dh); moe_tensor_release(dg2); moe_tensor_release(du2); moe_tensor_release(h2);
    }
    pfree(&dy); pfree(&w); pfree(&g); pfree(&u); pfree(&dg); pfree(&du); pfree(&h);
}

/* the epilogues' cases: partial tiles in rows and columns, cut last tiles,
 * empty experts, N past one tile, the OLMoE layer's experts (fewer rows),
 * more tiles than SMs (each staging reused many times) */
static void swiglu_checks(void) {
    static int64_t off[80];
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_LOOP) != MOE_OK, "loop strategy");
    make_offsets(off, 8, 300, 3);
    if (!getenv("MOELAB_TMA_SWIGLU")) {   /* the default: the forward's epilogue, not the backward's */
        swiglu_fwd("the default", off, 8, 72, 200, 1);
        swiglu_bwd("the default", off, 8, 72, 200, 0, 0);
    }
    die_if(moe_cuda_set_tma_swiglu(ctx, 0, 3) != MOE_OK, "both epilogues");
    swiglu_fwd("partial tiles", off, 8, 72, 200, 1);
    swiglu_bwd("partial tiles", off, 8, 72, 200, 1, 1);
    swiglu_bwd("partial tiles", off, 8, 72, 200, 0, 1);
    cut_offsets(off);
    swiglu_fwd("cut last tiles", off, 10, 136, 264, 1);
    swiglu_bwd("cut last tiles", off, 10, 136, 264, 1, 1);
    make_offsets(off, 64, 600, 7);
    swiglu_fwd("OLMoE experts", off, 64, 2048, 1024, 1);
    swiglu_bwd("OLMoE experts", off, 64, 2048, 1024, 1, 1);
    make_offsets(off, 32, 1400, 0);
    swiglu_bwd("step model", off, 32, 1024, 512, 1, 1);
    /* the forward's epilogue alone; neither */
    die_if(moe_cuda_set_tma_swiglu(ctx, 0, 1) != MOE_OK, "forward epilogue only");
    make_offsets(off, 8, 300, 3);
    swiglu_bwd("forward epilogue only", off, 8, 72, 200, 0, 0);
    swiglu_fwd("forward epilogue only", off, 8, 72, 200, 1);
    die_if(moe_cuda_set_tma_swiglu(ctx, 0, 0) != MOE_OK, "no epilogues");
    swiglu_fwd("no epilogues", off, 8, 72, 200, 0);
    ok(moe_cuda_set_tma_swiglu(ctx, 0, 4) != MOE_OK, "a SwiGLU epilogue mask of 4 is refused");
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_AUTO) != MOE_OK ||
           moe_cuda_set_tma_swiglu(ctx, 0, 1) != MOE_OK, "defaults");
}

static void wgrad_run(const char *what, float beta, const int64_t *off, int G, int64_t P, int64_t Q, int want_tma,
                      int dev) {
    int64_t M = off[G];
    pair a = in_randn(BF, SH(M, P)), b = in_randn(BF, SH(M, Q)), c = in_randn(BF, SH(G, P, Q));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    moe_tensor *od = dev ? upload_offsets(off, G) : NULL;
    char name[200];
    snprintf(name, sizeof name, "TMA wgrad%s %s: beta=%g G=%d M=%lld P=%lld Q=%lld", dev ? ", offsets on the device," : "",
             what, beta, G, (long long)M, (long long)P, (long long)Q);
    uint64_t t0 = tma_calls(), d0 = dev_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_wgrad(ctx, 0.9f, a.h, b.h, beta, c.h, off, G),
            dev ? moe_op_gemm_grouped_wgrad_dev(ctx, 0.9f, a.d, b.d, beta, c.d, od)
                : moe_op_gemm_grouped_wgrad(ctx, 0.9f, a.d, b.d, beta, c.d, off, G))) {
        check2(name, BF, c.d, c.h, tol_of(BF, 0), 1e-2);
        served(name, tma_calls() - t0, dev_calls() - d0, want_tma, dev);
    }
    moe_tensor_release(od);
    pfree(&a); pfree(&b); pfree(&c);
}
static void wgrad(const char *what, float beta, const int64_t *off, int G, int64_t P, int64_t Q, int want_tma) {
    wgrad_run(what, beta, off, G, P, Q, want_tma, 0);
}
static void wgrad_dev(const char *what, float beta, const int64_t *off, int G, int64_t P, int64_t Q) {
    wgrad_run(what, beta, off, G, P, Q, 1, 1);
}

/* Offsets on the device that break the contract (decreasing, past M, below 0)
 * are not checked there: the call returns (read back to the host, the same
 * offsets would be refused, so MOE_OK shows the device read them), and a
 * call after it is right. */
static void dev_bad_offsets(void) {
    const int G = 4;
    const int64_t K = 64, N = 128, M = 300, bad[5] = {0, 200, 100, 900, -5};
    pair a = in_randn(BF, SH(M, K)), b = in_randn(BF, SH(G, N, K)), c = in_randn(BF, SH(M, N));
    moe_tensor *od = upload_offsets(bad, G);
    const uint64_t d0 = dev_calls();
    moe_status s = moe_op_gemm_grouped_dev(ctx, 1, 1.0f, a.d, b.d, 0.0f, c.d, od);
    moe_tensor *back = s == MOE_OK ? moe_op_to(ctx, c.d, MOE_DEVICE_CPU, MOE_F32) : NULL;   /* waits: a fault shows */
    ok(s == MOE_OK && back && dev_calls() - d0 == 1, "TMA, offsets on the device out of order: no check, no fault (%s)",
       back ? "ok" : moe_last_error());
    moe_tensor_release(back);
    moe_tensor_release(od);
    /* the first offset past 0, the last short of M (rows no group covers), and the weight gradient's */
    const int64_t shifted[5] = {50, 60, 70, 80, 90};
    od = upload_offsets(shifted, G);
    s = moe_op_gemm_grouped_dev(ctx, 1, 1.0f, a.d, b.d, 0.5f, c.d, od);
    back = s == MOE_OK ? moe_op_to(ctx, c.d, MOE_DEVICE_CPU, MOE_F32) : NULL;
    ok(s == MOE_OK && back, "TMA, offsets on the device from 50 to 90 of 300 rows: no fault (%s)",
       back ? "ok" : moe_last_error());
    moe_tensor_release(back);
    moe_tensor_release(od);
    pair wa = in_randn(BF, SH(M, 128)), wb = in_randn(BF, SH(M, 256)), wc = in_randn(BF, SH(G, 128, 256));
    od = upload_offsets(bad, G);
    const uint64_t d1 = dev_calls();
    s = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, wa.d, wb.d, 0.0f, wc.d, od);
    back = s == MOE_OK ? moe_op_to(ctx, wc.d, MOE_DEVICE_CPU, MOE_F32) : NULL;
    ok(s == MOE_OK && back && dev_calls() - d1 == 1, "TMA wgrad, offsets on the device out of order: no fault (%s)",
       back ? "ok" : moe_last_error());
    moe_tensor_release(back);
    moe_tensor_release(od);
    pfree(&wa); pfree(&wb); pfree(&wc);
    pfree(&a); pfree(&b); pfree(&c);
    int64_t off[5] = {0, 100, 100, 250, 300};
    fwd_dev(1, "after bad offsets", 0.0f, off, G, 64, 128);
    wgrad_dev("after bad offsets", 0.0f, off, G, 128, 256);
}

/* The weight gradient's last k-tile of group 0 (r0 rows: 100 ends 36 into
 * the second k-tile, 40 inside the first) reads rows of group 1, whose a and
 * b hold Inf: group 0's result must stay finite and equal the CPU's (group
 * 1's is not compared). */
static void wgrad_inf_neighbour(int64_t r0, float beta) {
    const int G = 2;
    const int64_t P = 136, Q = 264, off[3] = {0, r0, 300};
    pair a = in_randn(BF, SH(300, P)), b = in_randn(BF, SH(300, Q)), c = in_randn(BF, SH(G, P, Q));
    float *ha = moe_f32(a.h), *hb = moe_f32(b.h);
    for (int64_t i = r0 * P; i < 300 * P; i++) ha[i] = INFINITY;
    for (int64_t i = r0 * Q; i < 300 * Q; i++) hb[i] = -INFINITY;
    moe_tensor_release(a.d); moe_tensor_release(b.d);
    a.d = to_gpu(a.h, BF); b.d = to_gpu(b.h, BF);
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[160];
    snprintf(name, sizeof name, "TMA wgrad: Inf in the next group's rows stays out of a partial last k-tile (%lld rows, beta %g)",
             (long long)r0, beta);
    uint64_t t0 = tma_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_wgrad(ctx, 1.0f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped_wgrad(ctx, 1.0f, a.d, b.d, beta, c.d, off, G))) {
        moe_tensor *gd = moe_tensor_select(c.d, 0, 0), *gh = moe_tensor_select(c.h, 0, 0);
        die_if(!gd || !gh, "select");
        check2(name, BF, gd, gh, tol_of(BF, 0), 1e-2);
        moe_tensor_release(gd); moe_tensor_release(gh);
        ok(tma_calls() - t0 == 1, "%s: served by the TMA kernel", name);
    }
    pfree(&a); pfree(&b); pfree(&c);
}

/* whether a call of the step model's gate/up shape goes to the TMA kernel under a setting */
static void policy(const char *what, int tma, moe_cuda_grouped_gemm strategy, int want) {
    die_if(moe_cuda_set_grouped_tma(ctx, 0, tma) != MOE_OK, "TMA setting");
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, strategy) != MOE_OK, "strategy");
    static int64_t off[33];
    make_offsets(off, 32, 1000, 0);
    fwd_tb(1, what, 0.0f, off, 32, 1024, 512, want);
}

/* Values outside a group never reach a stored result: the weights of an empty
 * last expert hold Inf, so a box that took them into a sum (K rows past the
 * middle expert's for untransposed b, with K under one k-tile; N rows past
 * its N for transposed b, whose columns are not stored) would leave NaN or
 * Inf where the CPU has finite values. */
static void inf_neighbour(int tb) {
    const int G = 3;
    const int64_t K = 40, N = 136, off[4] = {0, 300, 500, 500};
    pair a = in_randn(BF, SH(500, K)), c = in_randn(BF, SH(500, N));
    pair b = tb ? in_randn(BF, SH(G, N, K)) : in_randn(BF, SH(G, K, N));
    float *hb = moe_f32(b.h);
    for (int64_t i = 2 * K * N; i < 3 * K * N; i++) hb[i] = INFINITY;
    moe_tensor_release(b.d);
    b.d = to_gpu(b.h, BF);
    die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[160];
    snprintf(name, sizeof name, "TMA %s: Inf in the empty last expert's weights stays out", tb ? "fwd" : "dgrad");
    uint64_t t0 = tma_calls();
    if (RUN(name, BF, moe_op_gemm_grouped(ctx, tb, 1.0f, a.h, b.h, 0.0f, c.h, off, G),
            moe_op_gemm_grouped(ctx, tb, 1.0f, a.d, b.d, 0.0f, c.d, off, G))) {
        check2(name, BF, c.d, c.h, tol_of(BF, 0), 1e-2);
        ok(tma_calls() - t0 == 1, "%s: served by the TMA kernel", name);
    }
    pfree(&a); pfree(&b); pfree(&c);
}

/* 10 groups of 1-3 M tiles: odd counts whose last pair is cut in halves of 64 rows
 * (100, 257, 320, 321, 384, 65 rows) or whole, and a warpgroup with no rows of its
 * own (129, 320, 64, 192) */
static void cut_offsets(int64_t *off) {
    static const int rows[] = {100, 129, 257, 320, 321, 384, 0, 64, 65, 192};
    off[0] = 0;
    for (int g = 0; g < 10; g++) off[g + 1] = off[g] + rows[g];
}

/* every check with the TMA kernel forced on, clusters of `ctas` CTAs */
static void checks(int ctas) {
    die_if(moe_cuda_set_tma_cluster(ctx, 0, ctas) != MOE_OK, "cluster size");
    die_if(moe_cuda_set_grouped_tma(ctx, 0, 1) != MOE_OK || moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_AUTO),
           "TMA on");
    printf("# clusters of %d\n", ctas);
    static int64_t off[300];

    /* partial tiles: rows up to 300 (0-3 M tiles), K 72 (1.1 k-tiles), N 200 (under one N tile) */
    make_offsets(off, 8, 300, 3);
    fwd("partial tiles", 0.0f, off, 8, 72, 200, 1);
    make_offsets(off, 8, 300, 3);
    fwd("partial tiles", 0.5f, off, 8, 72, 200, 1);
    cut_offsets(off);
    fwd("cut last tiles", 0.0f, off, 10, 136, 264, 1);
    fwd("cut last tiles", 0.5f, off, 10, 136, 264, 1);
    pair_tb(1, "cut last tiles", 0.0f, off, 10, 72, 64, 256);
    pair_tb(0, "cut last tiles", 0.5f, off, 10, 72, 64, 256);
    /* N just past one tile, K past several, rows past the tensor's end in the last box */
    make_offsets(off, 6, 500, 0);
    fwd("N 264, K 1000", 0.0f, off, 6, 1000, 264, 1);
    /* one expert; the largest expert count it takes */
    off[0] = 0; off[1] = 1000;
    fwd("one expert", 0.5f, off, 1, 136, 520, 1);
    make_offsets(off, 256, 40, 5);
    fwd("256 experts", 0.0f, off, 256, 64, 48, 1);
    /* the step model's gate/up and down shapes (32 experts, H 1024, I 512): more tiles than SMs */
    make_offsets(off, 32, 1400, 0);
    fwd("step model gate/up", 0.0f, off, 32, 1024, 512, 1);
    make_offsets(off, 32, 1400, 0);
    fwd("step model down", 0.0f, off, 32, 512, 1024, 1);
    /* the OLMoE layer's gate/up (64 experts, d 2048, I 1024), fewer rows */
    make_offsets(off, 64, 600, 7);
    fwd("OLMoE gate", 0.0f, off, 64, 2048, 1024, 1);
    /* K under one k-tile */
    make_offsets(off, 5, 400, 0);
    fwd("K 40", 0.0f, off, 5, 40, 136, 1);
    /* every expert empty; K not a multiple of 8 (refused: another path, same result) */
    for (int g = 0; g <= 4; g++) off[g] = 0;
    fwd("no rows", 0.5f, off, 4, 64, 64, 1);
    make_offsets(off, 4, 200, 0);
    fwd("K 100 (refused)", 0.0f, off, 4, 100, 64, 0);
    /* the pair: dx = dg Wg + du Wu of the step model, partial k-tiles in each half */
    for (int tb = 1; tb >= 0; tb--) {
        make_offsets(off, 8, 300, 3);
        pair_tb(tb, "partial tiles", 0.0f, off, 8, 72, 40, 200);
        make_offsets(off, 8, 300, 3);
        pair_tb(tb, "partial tiles", 0.5f, off, 8, 72, 40, 264);
        make_offsets(off, 32, 1400, 0);
        pair_tb(tb, "step model dx", 0.0f, off, 32, 512, 512, 1024);
    }
    inf_neighbour(1);
    inf_neighbour(0);
    /* offsets on the device: partial tiles, cut last tiles, empty groups, 256 experts, the step's shapes */
    cut_offsets(off);
    for (int tb = 1; tb >= 0; tb--) {
        fwd_dev(tb, "cut last tiles", 0.0f, off, 10, 136, 264);
        fwd_dev(tb, "cut last tiles", 0.5f, off, 10, 136, 264);
    }
    wgrad_dev("cut last tiles", 0.0f, off, 10, 200, 136);
    wgrad_dev("cut last tiles", 0.5f, off, 10, 72, 520);
    make_offsets(off, 256, 40, 5);
    fwd_dev(1, "256 experts", 0.0f, off, 256, 64, 48);
    make_offsets(off, 256, 40, 5);
    wgrad_dev("256 experts", 0.0f, off, 256, 64, 48);
    make_offsets(off, 32, 1400, 0);
    fwd_dev(1, "step model down", 0.0f, off, 32, 512, 1024);
    make_offsets(off, 32, 1400, 0);
    wgrad_dev("step model down", 1.0f, off, 32, 1024, 512);
    for (int g = 0; g <= 4; g++) off[g] = 0;
    fwd_dev(0, "no rows", 0.5f, off, 4, 64, 64);
    wgrad_dev("no rows", 0.5f, off, 4, 64, 64);
    dev_bad_offsets();
    /* the weight gradient: rows 0 to 300 a group (several k-tiles, partial last ones,
     * empty groups), P and Q under, at and past a tile (odd M-tile counts leave the
     * second CTA of a pair past P) */
    make_offsets(off, 8, 300, 3);
    wgrad("partial tiles", 0.0f, off, 8, 200, 136, 1);
    make_offsets(off, 8, 300, 3);
    wgrad("partial tiles", 0.5f, off, 8, 72, 520, 1);
    make_offsets(off, 6, 500, 0);
    wgrad("P 384, Q 264", 0.0f, off, 6, 384, 264, 1);
    off[0] = 0; off[1] = 1; off[2] = 64; off[3] = 65; off[4] = 129;
    wgrad("1, 63, 1, 64 rows", 0.0f, off, 4, 128, 256, 1);
    for (int g = 0; g <= 4; g++) off[g] = 0;
    wgrad("no rows", 0.5f, off, 4, 64, 64, 1);
    for (int g = 0; g <= 4; g++) off[g] = 0;
    wgrad("no rows", 0.0f, off, 4, 64, 64, 1);
    make_offsets(off, 256, 40, 5);
    wgrad("256 experts", 0.0f, off, 256, 64, 48, 1);
    /* the step model's down and gate/up, the OLMoE layer's (fewer rows) */
    make_offsets(off, 32, 1400, 0);
    wgrad("step model down", 0.0f, off, 32, 1024, 512, 1);
    make_offsets(off, 32, 1400, 0);
    wgrad("step model up", 1.0f, off, 32, 512, 1024, 1);
    make_offsets(off, 64, 600, 7);
    wgrad("OLMoE down", 0.0f, off, 64, 2048, 1024, 1);
    make_offsets(off, 4, 200, 0);
    wgrad("P 100 (refused)", 0.0f, off, 4, 100, 64, 0);
    /* beta != 0 with every second expert empty: tiles with no k-tiles load c at their
     * start, several tiles a CTA (the staging's reuse between a store and the next load) */
    make_offsets(off, 64, 300, 2);
    wgrad("every second expert empty", 1.0f, off, 64, 512, 512, 1);
    wgrad_inf_neighbour(100, 0.0f);
    wgrad_inf_neighbour(40, 0.5f);
    swiglu_checks();
}

int main(void) {
    gpucheck_begin();
    checks(2);
    checks(1);
    static int64_t off[300];
    /* who takes the step model's calls: auto (the default) under the auto
     * strategy, never when off, never under the explicit own-kernel strategy */
    policy("auto", -1, MOE_CUDA_GROUPED_AUTO, 1);
    policy("off", 0, MOE_CUDA_GROUPED_AUTO, 0);
    policy("own-kernel strategy", -1, MOE_CUDA_GROUPED_KERNEL, 0);
    policy("forced under the loop strategy", 1, MOE_CUDA_GROUPED_LOOP, 1);
    /* auto: not where one expert's weights take over a quarter of L2 (4096 x 4096: 32 MB) */
    die_if(moe_cuda_set_grouped_tma(ctx, 0, -1) != MOE_OK || moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_AUTO),
           "auto");
    off[0] = 0; off[1] = 100; off[2] = 300;
    fwd_tb(1, "auto, 32 MB experts", 0.0f, off, 2, 4096, 4096, 0);
    wgrad("auto, 32 MB experts", 0.0f, off, 2, 4096, 4096, 0);
    make_offsets(off, 32, 1000, 0);
    wgrad("auto, step model down", 0.0f, off, 32, 1024, 512, 1);
    /* auto: not where the experts' c leave SMs idle (the kernel does not split rows):
     * LoRA-like factors (P 16), or one expert of 512 x 512 over many rows */
    make_offsets(off, 32, 1000, 0);
    wgrad("auto, P 16", 0.0f, off, 32, 16, 1024, 0);
    off[0] = 0; off[1] = 4000;
    wgrad("auto, one 512 x 512 expert", 0.0f, off, 1, 512, 512, 0);
    /* the weight gradient follows its own strategy: loop keeps cuBLAS for it while the
     * forward stays on the TMA kernel */
    die_if(moe_cuda_set_grouped_wgrad(ctx, 0, MOE_CUDA_GROUPED_LOOP) != MOE_OK, "wgrad strategy");
    make_offsets(off, 32, 1000, 0);
    wgrad("auto, weight gradient strategy loop", 0.0f, off, 32, 1024, 512, 0);
    make_offsets(off, 32, 1000, 0);
    fwd_tb(1, "auto, weight gradient strategy loop", 0.0f, off, 32, 1024, 512, 1);
    ok(moe_cuda_set_grouped_wgrad(ctx, 0, (moe_cuda_grouped_gemm)9) != MOE_OK, "an unknown weight gradient strategy is refused");
    die_if(moe_cuda_set_grouped_wgrad(ctx, 0, MOE_CUDA_GROUPED_AUTO) != MOE_OK, "wgrad strategy");
    die_if(moe_cuda_set_grouped_tma(ctx, 0, 0) != MOE_OK, "off");
    make_offsets(off, 32, 1000, 0);
    wgrad("off, step model down", 0.0f, off, 32, 1024, 512, 0);
    ok(moe_cuda_set_grouped_tma(ctx, 0, 2) != MOE_OK, "a TMA setting of 2 is refused");
    ok(moe_cuda_set_tma_cluster(ctx, 0, 3) != MOE_OK, "a cluster of 3 CTAs is refused");
    return gpucheck_end();
}
