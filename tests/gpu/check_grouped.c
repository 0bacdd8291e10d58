/* The own grouped-GEMM kernel (src/ops/cuda/cuda_grouped_mma.cu) against the
 * CPU backend, on fresh random bf16 data: partial tiles in every direction
 * (row counts, K and N not multiples of the 128 x 128 x 64 tile), empty
 * experts first, in the middle and last, the largest expert count the kernel
 * takes (256), the weight gradient with beta 0 (output poisoned with NaN: it
 * must not be read), 0.5 and 1 (accumulation, as in training), and calls the
 * kernel must refuse (a contiguous extent not a multiple of 8, more than 256
 * experts), which still give the right result through cuBLAS; weight gradients
 * of skewed routing, whose heavy experts' rows are split into chunks; the
 * cuBLAS strategies' weight gradients over NaN with empty experts and the
 * fused SwiGLU ops under the auto and batched strategies; the pair call
 * (two GEMMs summed along K in one launch); the SwiGLU experts' gate + up +
 * activation and dh + activation backward with fused epilogues. Each check also
 * asserts, from the device's counter, whether the kernel served the call. */
#include "gpucheck.h"

static const moe_dtype BF = MOE_BF16;

static uint64_t kernel_calls(void) {
    uint64_t n = 0;
    die_if(moe_cuda_grouped_kernel_calls(ctx, 0, &n) != MOE_OK, "kernel counter");
    return n;
}

static void served(const char *name, uint64_t before, int want) {
    uint64_t d = kernel_calls() - before;
    ok(d == (uint64_t)want, "%s: %s the kernel (%llu calls)", name, want ? "served by" : "not taken by",
       (unsigned long long)d);
}

static void fwd_check(const char *what, int tb, float beta, const int64_t *off, int G, int64_t K, int64_t N,
                      int want_kernel) {
    int64_t M = off[G];
    pair a = in_randn(BF, SH(M, K));
    pair b = tb ? in_randn(BF, SH(G, N, K)) : in_randn(BF, SH(G, K, N));
    pair c = in_randn(BF, SH(M, N));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "grouped kernel fwd %s: transb=%d beta=%g G=%d M=%lld K=%lld N=%lld", what, tb, beta,
             G, (long long)M, (long long)K, (long long)N);
    uint64_t k0 = kernel_calls();
    if (RUN(name, BF, moe_op_gemm_grouped(ctx, tb, 0.9f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped(ctx, tb, 0.9f, a.d, b.d, beta, c.d, off, G))) {
        check(name, BF, c.d, c.h, tol_of(BF, 0));
        served(name, k0, want_kernel);
    }
    pfree(&a); pfree(&b); pfree(&c);
}

static void wgrad_check_dt(moe_dtype dt, const char *what, float beta, const int64_t *off, int G, int64_t P,
                           int64_t Q, int want_kernel) {
    int64_t M = off[G];
    pair a = in_randn(dt, SH(M, P)), b = in_randn(dt, SH(M, Q));
    pair c = in_randn(dt, SH(G, P, Q));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "grouped wgrad %s: beta=%g G=%d M=%lld P=%lld Q=%lld", what, beta, G, (long long)M,
             (long long)P, (long long)Q);
    uint64_t k0 = kernel_calls();
    if (RUN(name, dt, moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, beta, c.d, off, G))) {
        check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
        served(name, k0, want_kernel);
    }
    pfree(&a); pfree(&b); pfree(&c);
}

static void wgrad_check(const char *what, float beta, const int64_t *off, int G, int64_t P, int64_t Q,
                        int want_kernel) {
    char w[160];
    snprintf(w, sizeof w, "kernel %s", what);
    wgrad_check_dt(BF, w, beta, off, G, P, Q, want_kernel);
}

/* device tensor -> host f32 (for byte comparisons between two device results) */
static moe_tensor *host_of(const moe_tensor *d) {
    moe_tensor *h = moe_op_to(ctx, (moe_tensor *)d, MOE_DEVICE_CPU, MOE_F32);
    die_if(!h, "download");
    return h;
}

static uint64_t split_calls(void) {
    uint64_t n = 0;
    die_if(moe_cuda_grouped_split_calls(ctx, 0, &n) != MOE_OK, "split counter");
    return n;
}

/* A weight gradient whose heavy experts' rows are cut into chunks (split-K, the
 * tile's last chunk adds them in chunk order): against the CPU, whether the
 * call split (the device's counter), and the same bytes from a second run of
 * the call (whichever block arrives last; the tiles' counters must be zero again) */
static void wgrad_split_check(const char *what, float beta, const int64_t *off, int G, int64_t P, int64_t Q,
                              int want_split) {
    int64_t M = off[G];
    pair a = in_randn(BF, SH(M, P)), b = in_randn(BF, SH(M, Q));
    pair c = in_randn(BF, SH(G, P, Q));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    moe_tensor *c2 = moe_tensor_new(ctx, BF, SH(G, P, Q), GPU);
    die_if(!c2 || moe_op_copy(ctx, c2, c.d) != MOE_OK, "second output");
    char name[200];
    snprintf(name, sizeof name, "grouped kernel wgrad split %s: beta=%g G=%d M=%lld P=%lld Q=%lld", what, beta, G,
             (long long)M, (long long)P, (long long)Q);
    uint64_t k0 = kernel_calls(), s0 = split_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, beta, c.d, off, G))) {
        check(name, BF, c.d, c.h, tol_of(BF, 0));
        served(name, k0, 1);
        uint64_t ns = split_calls() - s0;
        ok(ns == (uint64_t)want_split, "%s: %s (%llu split calls)", name, want_split ? "split" : "not split",
           (unsigned long long)ns);
        die_if(moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, beta, c2, off, G) != MOE_OK, "second run");
        moe_tensor *r = host_of(c.d);
        char n2[240];
        snprintf(n2, sizeof n2, "%s: a second run gives the same bytes", name);
        check(n2, BF, c2, r, 0.0);
        moe_tensor_release(r);
    }
    moe_tensor_release(c2);
    pfree(&a); pfree(&b); pfree(&c);
}

/* The split's scratch cannot be had: the device is filled but for 1 MiB after
 * its cache went back, and the free blocks left inside segments still partly
 * in use are taken in 2 MiB pieces, so the call that would split runs whole
 * instead (its scratch is optional and taken without a reclaim), against the
 * CPU, and a second run gives the same bytes. */
static void wgrad_split_starved(const int64_t *off, int G, int64_t P, int64_t Q) {
    int64_t M = off[G];
    pair a = in_randn(BF, SH(M, P)), b = in_randn(BF, SH(M, Q)), c = in_randn(BF, SH(G, P, Q));
    moe_tensor *c2 = moe_tensor_new(ctx, BF, SH(G, P, Q), GPU);
    die_if(!c2 || moe_op_fill(ctx, c.d, NAN) != MOE_OK || moe_op_fill(ctx, c2, NAN) != MOE_OK, "outputs");
    die_if(moe_cuda_empty_cache(ctx, 0) != MOE_OK, "empty cache");
    moe_cuda_mem_stats st;
    die_if(moe_cuda_memory_stats(ctx, 0, &st) != MOE_OK, "stats");
    /* the driver may not hand out all it reports free: step down to within 64 MiB */
    moe_tensor *fill = NULL;
    const size_t mib = (size_t)1 << 20;
    for (size_t want = st.device_free - mib; !fill && want + 64 * mib > st.device_free; want -= 2 * mib) {
        fill = moe_tensor_new(ctx, MOE_U8, SH((int64_t)want), GPU);
        if (!fill) moe_clear_error();
    }
    enum { MAX_PLUGS = 8192 };
    static moe_tensor *plug[MAX_PLUGS];
    int nplug = 0;
    while (fill && nplug < MAX_PLUGS && (plug[nplug] = moe_tensor_new(ctx, MOE_U8, SH((int64_t)(2 * mib)), GPU)))
        nplug++;
    moe_clear_error();
    const char *name = "grouped kernel wgrad split, its scratch not to be had (device full)";
    if (!fill || nplug == MAX_PLUGS) {
        printf("ok %d - %s # SKIP the device could not be filled to within 64 MiB\n", ++ntest, name);
    } else {
        /* both device runs while the device is full; the checks after, as they
         * may convert on the device */
        uint64_t s0 = split_calls();
        moe_status sc = moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.h, b.h, 0.0f, c.h, off, G);
        moe_status sg = moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, 0.0f, c.d, off, G);
        if (sg == MOE_OK) sg = moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, 0.0f, c2, off, G);
        if (sg == MOE_OK) sg = ctx->backends[MOE_CUDA]->synchronize(ctx, GPU);
        uint64_t splits = split_calls() - s0;
        for (int i = 0; i < nplug; i++) moe_tensor_release(plug[i]);
        moe_tensor_release(fill);
        if (RUN(name, BF, sc, sg)) {
            check(name, BF, c.d, c.h, tol_of(BF, 0));
            ok(splits == 0, "%s: ran whole (%llu split calls)", name, (unsigned long long)splits);
            moe_tensor *r = host_of(c.d);
            check("grouped kernel wgrad, scratch not to be had: a second run gives the same bytes", BF, c2, r, 0.0);
            moe_tensor_release(r);
        }
    }
    moe_tensor_release(c2);
    pfree(&a); pfree(&b); pfree(&c);
}

/* c = alpha (a1 op(b1) + a2 op(b2)) + beta c: one launch over K1 + K2 (each
 * half zero-filled past its own K), against the CPU's two grouped GEMMs */
/* want_kernel: 1 = one launch of the pair kernel; 2 = refused, two calls (the first served by the kernel) */
static void pair_check(const char *what, int tb, float beta, const int64_t *off, int G, int64_t K1, int64_t K2,
                       int64_t N, int want_kernel) {
    int64_t M = off[G];
    pair a1 = in_randn(BF, SH(M, K1)), a2 = in_randn(BF, SH(M, K2));
    pair b1 = tb ? in_randn(BF, SH(G, N, K1)) : in_randn(BF, SH(G, K1, N));
    pair b2 = tb ? in_randn(BF, SH(G, N, K2)) : in_randn(BF, SH(G, K2, N));
    pair c = in_randn(BF, SH(M, N));
    if (beta == 0.0f) die_if(moe_op_fill(ctx, c.d, NAN) != MOE_OK, "poison");
    char name[200];
    snprintf(name, sizeof name, "grouped kernel pair %s: transb=%d beta=%g G=%d M=%lld K1=%lld K2=%lld N=%lld", what,
             tb, beta, G, (long long)M, (long long)K1, (long long)K2, (long long)N);
    /* grouped calls: one-call (kernel, batched) plus looped ones */
    uint64_t k0 = kernel_calls(), n0 = 0, m0 = 0, n1 = 0, m1 = 0;
    die_if(moe_cuda_grouped_gemm_info(ctx, 0, NULL, &n0, &m0) != MOE_OK, "grouped counters");
    if (RUN(name, BF, moe_op_gemm_grouped_pair(ctx, tb, 0.9f, a1.h, b1.h, a2.h, b2.h, beta, c.h, off, G),
            moe_op_gemm_grouped_pair(ctx, tb, 0.9f, a1.d, b1.d, a2.d, b2.d, beta, c.d, off, G))) {
        /* two calls (the kernel refused) round the first product to bf16 before the second is added */
        check(name, BF, c.d, c.h, want_kernel == 1 ? tol_of(BF, 0) : 6e-2);
        served(name, k0, 1);
        die_if(moe_cuda_grouped_gemm_info(ctx, 0, NULL, &n1, &m1) != MOE_OK, "grouped counters");
        int calls = (int)((n1 - n0) + (m1 - m0));
        ok(calls == want_kernel, "%s: %d grouped call(s) (want %d)", name, calls, want_kernel);
    }
    pfree(&a1); pfree(&a2); pfree(&b1); pfree(&b2); pfree(&c);
}

/* gate, up and the SwiGLU in one launch (the gate and up tiles side by side):
 * against the CPU's two GEMMs + swiglu, and byte for byte against the
 * device's three unfused calls. want_kernel: kernel launches (1 fused; 2 when
 * refused and the plain kernel serves both GEMMs) */
static void swiglu_check(const char *what, const int64_t *off, int G, int64_t K, int64_t I, int want_kernel) {
    int64_t M = off[G];
    pair x = in_randn(BF, SH(M, K)), wg = in_randn(BF, SH(G, I, K)), wu = in_randn(BF, SH(G, I, K));
    pair g = out_pair(BF, SH(M, I)), u = out_pair(BF, SH(M, I)), h = out_pair(BF, SH(M, I));
    char name[200];
    snprintf(name, sizeof name, "grouped swiglu %s: G=%d M=%lld K=%lld I=%lld", what, G, (long long)M, (long long)K,
             (long long)I);
    uint64_t k0 = kernel_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_swiglu(ctx, x.h, wg.h, wu.h, g.h, u.h, h.h, off, G),
            moe_op_gemm_grouped_swiglu(ctx, x.d, wg.d, wu.d, g.d, u.d, h.d, off, G))) {
        char n2[240];
        snprintf(n2, sizeof n2, "%s: gate", name); check(n2, BF, g.d, g.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: up", name); check(n2, BF, u.d, u.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: activation", name); check(n2, BF, h.d, h.h, tol_of(BF, 0));
        served(name, k0, want_kernel);
        moe_tensor *g2 = moe_tensor_new(ctx, BF, SH(M, I), GPU), *u2 = moe_tensor_new(ctx, BF, SH(M, I), GPU),
                   *h2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!g2 || !u2 || !h2, "unfused outputs");
        die_if(moe_op_gemm_grouped(ctx, 1, 1.0f, x.d, wg.d, 0.0f, g2, off, G) != MOE_OK ||
               moe_op_gemm_grouped(ctx, 1, 1.0f, x.d, wu.d, 0.0f, u2, off, G) != MOE_OK ||
               moe_op_swiglu(ctx, h2, g2, u2) != MOE_OK, "unfused calls");
        moe_tensor *r[3] = {host_of(g2), host_of(u2), host_of(h2)};
        const moe_tensor *f[3] = {g.d, u.d, h.d};
        static const char *nm[3] = {"gate", "up", "activation"};
        for (int i = 0; i < 3; i++) {
            snprintf(n2, sizeof n2, "%s: %s = the unfused calls' bytes", name, nm[i]);
            check(n2, BF, f[i], r[i], 0.0);
            moe_tensor_release(r[i]);
        }
        moe_tensor_release(g2); moe_tensor_release(u2); moe_tensor_release(h2);
    }
    pfree(&x); pfree(&wg); pfree(&wu); pfree(&g); pfree(&u); pfree(&h);
}

/* dh = alpha dy w_e met with the saved gate and up in the epilogue: dgate and
 * dup written, dh never stored; against the CPU and byte for byte against
 * gemm_grouped + swiglu_backward on the device */
static void swiglu_bwd_check(const char *what, const int64_t *off, int G, int64_t K, int64_t I, int want_kernel) {
    int64_t M = off[G];
    pair dy = in_randn(BF, SH(M, K)), w = in_randn(BF, SH(G, K, I));
    pair g = in_randn(BF, SH(M, I)), u = in_randn(BF, SH(M, I));
    pair dg = out_pair(BF, SH(M, I)), du = out_pair(BF, SH(M, I)), h = out_pair(BF, SH(M, I));
    char name[200];
    snprintf(name, sizeof name, "grouped swiglu backward %s: G=%d M=%lld K=%lld I=%lld", what, G, (long long)M,
             (long long)K, (long long)I);
    uint64_t k0 = kernel_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_swiglu_backward(ctx, 0.9f, dy.h, w.h, g.h, u.h, dg.h, du.h, h.h, off, G),
            moe_op_gemm_grouped_swiglu_backward(ctx, 0.9f, dy.d, w.d, g.d, u.d, dg.d, du.d, h.d, off, G))) {
        char n2[240];
        snprintf(n2, sizeof n2, "%s: dgate", name); check(n2, BF, dg.d, dg.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: dup", name); check(n2, BF, du.d, du.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%s: the activation again", name); check(n2, BF, h.d, h.h, tol_of(BF, 0));
        moe_tensor *h2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!h2 || moe_op_swiglu(ctx, h2, g.d, u.d) != MOE_OK, "swiglu");
        moe_tensor *rh = host_of(h2);
        snprintf(n2, sizeof n2, "%.180s: the activation = the swiglu bytes", name); check(n2, BF, h.d, rh, 0.0);
        moe_tensor_release(rh); moe_tensor_release(h2);
        served(name, k0, want_kernel);
        moe_tensor *dh = moe_tensor_new(ctx, BF, SH(M, I), GPU), *dg2 = moe_tensor_new(ctx, BF, SH(M, I), GPU),
                   *du2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!dh || !dg2 || !du2, "unfused outputs");
        die_if(moe_op_gemm_grouped(ctx, 0, 0.9f, dy.d, w.d, 0.0f, dh, off, G) != MOE_OK ||
               moe_op_swiglu_backward(ctx, dg2, du2, dh, g.d, u.d) != MOE_OK, "unfused calls");
        moe_tensor *r1 = host_of(dg2), *r2 = host_of(du2);
        snprintf(n2, sizeof n2, "%s: dgate = the unfused calls' bytes", name); check(n2, BF, dg.d, r1, 0.0);
        snprintf(n2, sizeof n2, "%s: dup = the unfused calls' bytes", name); check(n2, BF, du.d, r2, 0.0);
        moe_tensor_release(r1); moe_tensor_release(r2);
        moe_tensor_release(dh); moe_tensor_release(dg2); moe_tensor_release(du2);
    }
    pfree(&dy); pfree(&w); pfree(&g); pfree(&u); pfree(&dg); pfree(&du); pfree(&h);
}

/* The experts' rows gathered by the GEMMs' loads (the MoE dispatch folded into
 * them): the SwiGLU forward over rows of x and the weight gradient over rows
 * of b give the same bytes as the plain calls over the gathered rows (and the
 * CPU's), served by the kernel; with a heavy expert the weight gradient's
 * split chunks gather too. Rows without a trusted bound take the gathering
 * path, which checks them: an index past the end is MOE_ERR_RANGE. */
static void rows_check(const char *what, const int64_t *off, int G, int64_t N, int64_t K, int64_t I, int want_split) {
    int64_t M = off[G];
    moe_tensor *rh = moe_tensor_new_cpu(MOE_I64, SH(M));
    die_if(!rh, "rows");
    uint64_t x = seed++ * 0x2545F4914F6CDD1Dull + 3;
    for (int64_t i = 0; i < M; i++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        ((int64_t *)moe_tensor_data(rh))[i] = (int64_t)(x % (uint64_t)N);
    }
    moe_tensor *rd = moe_op_to(ctx, rh, GPU, MOE_I64);
    die_if(!rd, "rows upload");
    ok(moe_tensor_index_trusted(rd, N), "%s: uploaded rows carry their bound", what);
    pair xs = in_randn(BF, SH(N, K)), wg = in_randn(BF, SH(G, I, K)), wu = in_randn(BF, SH(G, I, K));
    pair g = out_pair(BF, SH(M, I)), u = out_pair(BF, SH(M, I)), h = out_pair(BF, SH(M, I));
    char name[200];
    snprintf(name, sizeof name, "grouped swiglu over gathered rows %s: G=%d N=%lld M=%lld K=%lld I=%lld", what, G,
             (long long)N, (long long)M, (long long)K, (long long)I);
    uint64_t k0 = kernel_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_swiglu_rows(ctx, xs.h, rh, wg.h, wu.h, g.h, u.h, h.h, off, G),
            moe_op_gemm_grouped_swiglu_rows(ctx, xs.d, rd, wg.d, wu.d, g.d, u.d, h.d, off, G))) {
        char n2[240];
        snprintf(n2, sizeof n2, "%.180s: activation", name); check(n2, BF, h.d, h.h, tol_of(BF, 0));
        served(name, k0, 1);
        moe_tensor *xp = moe_tensor_new(ctx, BF, SH(M, K), GPU), *g2 = moe_tensor_new(ctx, BF, SH(M, I), GPU),
                   *u2 = moe_tensor_new(ctx, BF, SH(M, I), GPU), *h2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!xp || !g2 || !u2 || !h2, "plain outputs");
        die_if(moe_op_index_select(ctx, xp, xs.d, rd) != MOE_OK ||
               moe_op_gemm_grouped_swiglu(ctx, xp, wg.d, wu.d, g2, u2, h2, off, G) != MOE_OK, "plain call");
        const moe_tensor *f[3] = {g.d, u.d, h.d}, *r0[3] = {g2, u2, h2};
        static const char *nm[3] = {"gate", "up", "activation"};
        for (int i = 0; i < 3; i++) {
            moe_tensor *r = host_of(r0[i]);
            snprintf(n2, sizeof n2, "%.180s: %s = the plain call's bytes", name, nm[i]);
            check(n2, BF, f[i], r, 0.0);
            moe_tensor_release(r);
        }
        /* the weight gradient over the same rows (beta 0 over NaN, then 1) */
        pair a = in_randn(BF, SH(M, I)), c = in_randn(BF, SH(G, I, K));
        moe_tensor *c2 = moe_tensor_new(ctx, BF, SH(G, I, K), GPU);
        die_if(!c2 || moe_op_fill(ctx, c.d, NAN) != MOE_OK || moe_op_fill(ctx, c2, NAN) != MOE_OK, "wgrad outputs");
        snprintf(n2, sizeof n2, "grouped wgrad over gathered rows %s: G=%d M=%lld P=%lld Q=%lld", what, G,
                 (long long)M, (long long)I, (long long)K);
        uint64_t k1 = kernel_calls(), s1 = split_calls();
        if (RUN(n2, BF, moe_op_gemm_grouped_wgrad_rows(ctx, 1.1f, a.h, xs.h, rh, 0.0f, c.h, off, G),
                moe_op_gemm_grouped_wgrad_rows(ctx, 1.1f, a.d, xs.d, rd, 0.0f, c.d, off, G))) {
            check(n2, BF, c.d, c.h, tol_of(BF, 0));
            served(n2, k1, 1);
            uint64_t ns = split_calls() - s1;
            ok(ns == (uint64_t)want_split, "%s: %s (%llu split calls)", n2, want_split ? "split" : "not split",
               (unsigned long long)ns);
            die_if(moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, xp, 0.0f, c2, off, G) != MOE_OK, "plain wgrad");
            moe_tensor *r = host_of(c2);
            char n3[300];
            snprintf(n3, sizeof n3, "%.200s: = the plain call's bytes", n2);
            check(n3, BF, c.d, r, 0.0);
            moe_tensor_release(r);
            die_if(moe_op_gemm_grouped_wgrad_rows(ctx, 0.7f, a.d, xs.d, rd, 1.0f, c.d, off, G) != MOE_OK ||
                   moe_op_gemm_grouped_wgrad(ctx, 0.7f, a.d, xp, 1.0f, c2, off, G) != MOE_OK, "beta 1");
            r = host_of(c2);
            snprintf(n3, sizeof n3, "%.200s: accumulating (beta 1) = the plain call's bytes", n2);
            check(n3, BF, c.d, r, 0.0);
            moe_tensor_release(r);
        }
        /* rows without a trusted bound: gathered (and checked) first; a bad one is refused */
        if (M > 0) {
            moe_tensor_set_index_bound(rd, 0);
            ((int64_t *)moe_tensor_data(rh))[M / 2] = N;
            moe_tensor *bad = moe_op_to(ctx, rh, GPU, MOE_I64);
            die_if(!bad, "bad rows");
            moe_tensor_set_index_bound(bad, 0);
            moe_status s = moe_op_gemm_grouped_swiglu_rows(ctx, xs.d, bad, wg.d, wu.d, g.d, u.d, h.d, off, G);
            ok(s == MOE_ERR_RANGE, "%s: an untrusted row past the end is refused (%s: %s)", what, moe_status_name(s),
               moe_last_error());
            moe_clear_error();
            moe_tensor_release(bad);
        }
        moe_tensor_release(c2);
        pfree(&a); pfree(&c);
        moe_tensor_release(xp); moe_tensor_release(g2); moe_tensor_release(u2); moe_tensor_release(h2);
    }
    moe_tensor_release(rh); moe_tensor_release(rd);
    pfree(&xs); pfree(&wg); pfree(&wu); pfree(&g); pfree(&u); pfree(&h);
}

/* The SwiGLU backward with the MoE combine's weights folded in: dh = rw (dy
 * w_e), dgate and dup from it, hw = rw h, dw = rowdot(dy w_e, h); against the
 * CPU's composed parts and the device's composed parts (the kernel declined
 * under the batched strategy), and the same bytes from a second run */
static void swiglu_bwd_w_check(const char *what, const int64_t *off, int G, int64_t K, int64_t I) {
    int64_t M = off[G];
    pair dy = in_randn(BF, SH(M, K)), w = in_randn(BF, SH(G, K, I));
    pair g = in_randn(BF, SH(M, I)), u = in_randn(BF, SH(M, I)), rw = in_pair(BF, SH(M), 0.5f, 0.5f, 1);
    pair dg = out_pair(BF, SH(M, I)), du = out_pair(BF, SH(M, I)), hw = out_pair(BF, SH(M, I)), dw = out_pair(BF, SH(M));
    char name[200];
    snprintf(name, sizeof name, "grouped swiglu backward, combine weights folded in, %s: G=%d M=%lld K=%lld I=%lld",
             what, G, (long long)M, (long long)K, (long long)I);
    uint64_t k0 = kernel_calls();
    if (RUN(name, BF, moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy.h, w.h, g.h, u.h, rw.h, dg.h, du.h, hw.h, dw.h, off, G),
            moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy.d, w.d, g.d, u.d, rw.d, dg.d, du.d, hw.d, dw.d, off, G))) {
        char n2[260];
        snprintf(n2, sizeof n2, "%.190s: dgate", name); check(n2, BF, dg.d, dg.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%.190s: dup", name); check(n2, BF, du.d, du.h, tol_of(BF, 0));
        snprintf(n2, sizeof n2, "%.190s: w h", name); check(n2, BF, hw.d, hw.h, tol_of(BF, 0));
        /* dw sums 512 or more products of either sign: its elements' errors scale
         * with the terms, not with the (possibly small) sum - a relative L2 bound */
        snprintf(n2, sizeof n2, "%.190s: dw", name); check2(n2, BF, dw.d, dw.h, INFINITY, 1e-2);
        served(name, k0, 1);
        /* the device's composed parts */
        moe_tensor *o[4] = {moe_tensor_new(ctx, BF, SH(M, I), GPU), moe_tensor_new(ctx, BF, SH(M, I), GPU),
                            moe_tensor_new(ctx, BF, SH(M, I), GPU), moe_tensor_new(ctx, BF, SH(M), GPU)};
        die_if(!o[0] || !o[1] || !o[2] || !o[3], "composed outputs");
        die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_BATCHED) != MOE_OK, "batched");
        uint64_t k1 = kernel_calls();
        die_if(moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy.d, w.d, g.d, u.d, rw.d, o[0], o[1], o[2], o[3], off, G) !=
                   MOE_OK, "composed");
        die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_KERNEL) != MOE_OK, "kernel strategy");
        ok(kernel_calls() == k1, "%.190s: the batched strategy composes it from the parts", name);
        const moe_tensor *f[4] = {dg.d, du.d, hw.d, dw.d}, *cpu[4] = {dg.h, du.h, hw.h, dw.h};
        static const char *nm[4] = {"dgate", "dup", "w h", "dw"};
        for (int i = 0; i < 4; i++) {
            moe_tensor *r = host_of(o[i]);
            snprintf(n2, sizeof n2, "%.180s: %s against the composed parts", name, nm[i]);
            check2(n2, BF, f[i], r, i == 3 ? INFINITY : tol_of(BF, 0), 1e-2);
            /* the parts on the device (a plain GEMM, then cuda_swiglu.cu's row pass) against the CPU */
            snprintf(n2, sizeof n2, "%.180s: %s of the GEMM and the row pass against the cpu", name, nm[i]);
            check2(n2, BF, o[i], cpu[i], i == 3 ? INFINITY : tol_of(BF, 0), 1e-2);
            moe_tensor_release(r);
            moe_tensor_release(o[i]);
        }
        /* deterministic: dw's partial sums are added in a fixed order */
        moe_tensor *dw2 = moe_tensor_new(ctx, BF, SH(M), GPU), *dg2 = moe_tensor_new(ctx, BF, SH(M, I), GPU),
                   *du2 = moe_tensor_new(ctx, BF, SH(M, I), GPU), *hw2 = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        die_if(!dw2 || !dg2 || !du2 || !hw2, "second outputs");
        die_if(moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy.d, w.d, g.d, u.d, rw.d, dg2, du2, hw2, dw2, off, G) !=
                   MOE_OK, "second run");
        moe_tensor *r = host_of(dw.d);
        snprintf(n2, sizeof n2, "%.190s: a second run gives the same dw", name);
        check(n2, BF, dw2, r, 0.0);
        moe_tensor_release(r);
        moe_tensor_release(dw2); moe_tensor_release(dg2); moe_tensor_release(du2); moe_tensor_release(hw2);
    }
    pfree(&dy); pfree(&w); pfree(&g); pfree(&u); pfree(&rw); pfree(&dg); pfree(&du); pfree(&hw); pfree(&dw);
}

/* the device result d against the device result r of the host-offset call:
 * the same bytes, or (a weight gradient, whose rows the host call may split
 * into chunks summed in another order) within a relative L2 error of 1e-2 */
static void same_as(const char *name, const char *part, const moe_tensor *d, const moe_tensor *r, int exact) {
    moe_tensor *rh = host_of(r);
    char n[300];
    snprintf(n, sizeof n, "%.220s: %s %s the host offsets'", name, part, exact ? "= (bytes)" : "close to");
    if (exact) check(n, BF, d, rh, 0.0);
    else check2(n, BF, d, rh, INFINITY, 1e-2);
    moe_tensor_release(rh);
}

/* The own kernel with the offsets on the device (the _dev ops; each block
 * builds its schedule, the grid is sized for the most tiles the rows can
 * make): the MoE step's calls - the SwiGLU forward over gathered rows, the
 * weighted SwiGLU backward, the dx pair, the down projection and the weight
 * gradient over gathered rows - each served on the device, with the bytes of
 * the same calls with host offsets (the weight gradient within bf16: with host
 * offsets a heavy expert's rows may split). Then offsets that break the
 * contract: no check, no fault. */
static void dev_offsets_check(const char *what, const int64_t *off, int G, int64_t N, int64_t K, int64_t I) {
    const int64_t M = off[G];
    moe_tensor *od = upload_offsets(off, G);
    moe_tensor *rh = moe_tensor_new_cpu(MOE_I64, SH(M));
    die_if(!rh, "rows");
    for (int64_t i = 0; i < M; i++) ((int64_t *)moe_tensor_data(rh))[i] = (i * 7919 + 13) % N;
    moe_tensor *rd = moe_op_to(ctx, rh, GPU, MOE_I64);
    die_if(!rd, "rows upload");
    char name[220];
    snprintf(name, sizeof name, "kernel, offsets on the device, %s: G=%d N=%lld M=%lld K=%lld I=%lld", what, G,
             (long long)N, (long long)M, (long long)K, (long long)I);
    pair xs = in_randn(BF, SH(N, K)), wg = in_randn(BF, SH(G, I, K)), wu = in_randn(BF, SH(G, I, K));
    pair wd = in_randn(BF, SH(G, K, I)), dy = in_randn(BF, SH(M, K)), rw = in_pair(BF, SH(M), 0.5f, 0.5f, 1);
    moe_tensor *o[2][8];   /* g, u, h, dg, du, hw, dw, y: [0] device offsets, [1] host offsets */
    for (int v = 0; v < 2; v++) {
        for (int i = 0; i < 6; i++) o[v][i] = moe_tensor_new(ctx, BF, SH(M, I), GPU);
        o[v][6] = moe_tensor_new(ctx, BF, SH(M), GPU);
        o[v][7] = moe_tensor_new(ctx, BF, SH(M, K), GPU);
        for (int i = 0; i < 8; i++) die_if(!o[v][i] || moe_op_fill(ctx, o[v][i], NAN) != MOE_OK, "outputs");
    }
    uint64_t d0 = dev_calls();
    moe_status s = moe_op_gemm_grouped_swiglu_rows_dev(ctx, xs.d, rd, wg.d, wu.d, o[0][0], o[0][1], o[0][2], od);
    if (s == MOE_OK)
        s = moe_op_gemm_grouped_swiglu_backward_w_dev(ctx, 0.9f, dy.d, wd.d, o[0][0], o[0][1], rw.d, o[0][3], o[0][4],
                                                      o[0][5], o[0][6], od);
    if (s == MOE_OK) s = moe_op_gemm_grouped_pair_dev(ctx, 0, 1.0f, o[0][4], wu.d, o[0][3], wg.d, 0.0f, o[0][7], od);
    const uint64_t nd = dev_calls() - d0;
    moe_status s2 = moe_op_gemm_grouped_swiglu_rows(ctx, xs.d, rd, wg.d, wu.d, o[1][0], o[1][1], o[1][2], off, G);
    if (s2 == MOE_OK)
        s2 = moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy.d, wd.d, o[1][0], o[1][1], rw.d, o[1][3], o[1][4],
                                                   o[1][5], o[1][6], off, G);
    if (s2 == MOE_OK) s2 = moe_op_gemm_grouped_pair(ctx, 0, 1.0f, o[1][4], wu.d, o[1][3], wg.d, 0.0f, o[1][7], off, G);
    if (s != MOE_OK || s2 != MOE_OK) {
        ok(0, "%s: a call failed: %s", name, moe_last_error());
    } else {
        ok(nd == 3, "%s: three calls served on the device (%llu)", name, (unsigned long long)nd);
        static const char *nm[8] = {"gate", "up", "activation", "dgate", "dup", "w h", "dw", "dx pair"};
        for (int i = 0; i < 8; i++) same_as(name, nm[i], o[0][i], o[1][i], 1);
        /* the down projection (plain forward) and the weight gradient over gathered rows */
        pair c = out_pair(BF, SH(M, K));
        moe_tensor *c2 = moe_tensor_new(ctx, BF, SH(M, K), GPU);
        die_if(!c2, "down outputs");
        d0 = dev_calls();
        s = moe_op_gemm_grouped_dev(ctx, 1, 1.0f, o[0][2], wd.d, 0.0f, c.d, od);
        ok(s == MOE_OK && dev_calls() - d0 == 1, "%s: down projection served on the device (%s)", name, moe_last_error());
        die_if(moe_op_gemm_grouped(ctx, 1, 1.0f, o[1][2], wd.d, 0.0f, c2, off, G) != MOE_OK, "down, host offsets");
        if (s == MOE_OK) same_as(name, "down projection", c.d, c2, 1);
        pair gw = out_pair(BF, SH(G, I, K));
        moe_tensor *gw2 = moe_tensor_new(ctx, BF, SH(G, I, K), GPU);
        die_if(!gw2 || moe_op_fill(ctx, gw.d, NAN) != MOE_OK, "wgrad outputs");
        d0 = dev_calls();
        s = moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, o[0][3], xs.d, rd, 0.0f, gw.d, od);
        ok(s == MOE_OK && dev_calls() - d0 == 1, "%s: weight gradient over gathered rows served on the device (%s)",
           name, moe_last_error());
        die_if(moe_op_gemm_grouped_wgrad_rows(ctx, 1.0f, o[1][3], xs.d, rd, 0.0f, gw2, off, G) != MOE_OK,
               "wgrad, host offsets");
        if (s == MOE_OK) same_as(name, "weight gradient", gw.d, gw2, 0);
        /* accumulating (beta 1) on the device's own result, against the host call doing the same */
        s = moe_op_gemm_grouped_wgrad_rows_dev(ctx, 0.5f, o[0][4], xs.d, rd, 1.0f, gw.d, od);
        die_if(moe_op_gemm_grouped_wgrad_rows(ctx, 0.5f, o[1][4], xs.d, rd, 1.0f, gw2, off, G) != MOE_OK, "beta 1");
        if (s == MOE_OK) same_as(name, "weight gradient, accumulating", gw.d, gw2, 0);
        /* contract-breaking offsets: out of order, past M, below 0; then a good call again */
        int64_t bad[257];
        for (int g = 0; g <= G; g++) bad[g] = (g * 7 % (G + 1)) * (M / 3 + 5) - (g == 1 ? 50 : 0);
        moe_tensor *ob = upload_offsets(bad, G);
        d0 = dev_calls();
        s = moe_op_gemm_grouped_swiglu_rows_dev(ctx, xs.d, rd, wg.d, wu.d, o[0][0], o[0][1], o[0][2], ob);
        if (s == MOE_OK)
            s = moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, o[0][3], xs.d, rd, 0.0f, gw2, ob);
        moe_tensor *back = s == MOE_OK ? host_of(o[0][2]) : NULL;
        ok(s == MOE_OK && back && dev_calls() - d0 == 2, "%s: contract-breaking offsets on the device, no fault (%s)",
           name, moe_last_error());
        moe_tensor_release(back);
        moe_tensor_release(ob);
        s = moe_op_gemm_grouped_swiglu_rows_dev(ctx, xs.d, rd, wg.d, wu.d, o[0][0], o[0][1], o[0][2], od);
        if (s == MOE_OK) same_as(name, "activation after bad offsets", o[0][2], o[1][2], 1);
        pfree(&c); pfree(&gw); moe_tensor_release(c2); moe_tensor_release(gw2);
    }
    for (int v = 0; v < 2; v++)
        for (int i = 0; i < 8; i++) moe_tensor_release(o[v][i]);
    pfree(&xs); pfree(&wg); pfree(&wu); pfree(&wd); pfree(&dy); pfree(&rw);
    moe_tensor_release(od); moe_tensor_release(rh); moe_tensor_release(rd);
}

int main(void) {
    gpucheck_begin();
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_KERNEL) != MOE_OK, "kernel strategy");
    static int64_t off[1100];

    /* partial tiles everywhere: rows up to 300 (0-3 tiles), K 72 (2.25 k-tiles), N 200 (1.6 n-tiles) */
    for (int tb = 0; tb < 2; tb++) {
        make_offsets(off, 8, 300, 3);
        fwd_check("partial tiles", tb, 0.0f, off, 8, 72, 200, 1);
        make_offsets(off, 8, 300, 3);
        fwd_check("partial tiles", tb, 0.5f, off, 8, 72, 200, 1);
    }
    /* the step model's shapes: 32 experts, H 1024, I 512 */
    make_offsets(off, 32, 700, 0);
    fwd_check("step model gate/up", 1, 0.0f, off, 32, 1024, 512, 1);
    make_offsets(off, 32, 700, 0);
    fwd_check("step model dgrad", 0, 0.0f, off, 32, 1024, 512, 1);
    /* one expert of many rows; the largest expert count the kernel takes */
    off[0] = 0; off[1] = 1000;
    fwd_check("one expert", 1, 0.5f, off, 1, 136, 264, 1);
    make_offsets(off, 256, 40, 5);
    fwd_check("256 experts", 1, 0.0f, off, 256, 64, 48, 1);
    make_offsets(off, 256, 40, 5);
    fwd_check("256 experts", 0, 0.5f, off, 256, 64, 48, 1);
    /* every expert empty: nothing to compute, nothing written */
    for (int g = 0; g <= 4; g++) off[g] = 0;
    fwd_check("no rows", 1, 0.5f, off, 4, 64, 64, 1);

    /* pairs summed along K: partial k-tiles in each half, the step model's dx = du Wu + dg Wg */
    for (int tb = 0; tb < 2; tb++) {
        make_offsets(off, 8, 300, 3);
        pair_check("partial tiles", tb, 0.0f, off, 8, 72, 40, 200, 1);
        make_offsets(off, 8, 300, 3);
        pair_check("partial tiles", tb, 0.5f, off, 8, 64, 136, 200, 1);
    }
    make_offsets(off, 32, 700, 0);
    pair_check("step model dgrad", 0, 0.0f, off, 32, 512, 512, 1024, 1);
    /* refused (K2 not a multiple of 8): two grouped calls, the first (K1 64) through the kernel */
    make_offsets(off, 8, 100, 3);
    pair_check("K2 not a multiple of 8 (two calls)", 0, 0.5f, off, 8, 64, 36, 64, 2);

    /* weight gradients: P 72, Q 200; empty experts get beta c[g] */
    float betas[3] = {0.0f, 0.5f, 1.0f};
    for (int v = 0; v < 3; v++) {
        make_offsets(off, 8, 300, 3);
        wgrad_check("partial tiles", betas[v], off, 8, 72, 200, 1);
    }
    make_offsets(off, 16, 900, 4);
    wgrad_check("step model down", 1.0f, off, 16, 1024, 512, 1);
    make_offsets(off, 16, 900, 4);
    wgrad_check("step model up", 0.0f, off, 16, 512, 1024, 1);
    make_offsets(off, 256, 40, 5);
    wgrad_check("256 experts", 0.5f, off, 256, 16, 24, 1);

    /* skewed routing: heavy experts' rows split into chunks. The step model's
     * down projection with one expert holding a quarter of the rows (beta 0
     * over NaN, and 1); partial tiles with one expert of 5000 rows (10 chunks of
     * 512); eight heavy experts, more chunks than a call takes (the last ones
     * stay whole); and balanced routing, which must not split */
    float sbetas[2] = {0.0f, 1.0f};
    for (int v = 0; v < 2; v++) {
        make_offsets(off, 32, 700, 0);
        for (int g = 5; g < 32; g++) off[g + 1] += 8000;   /* expert 5: 8000 more rows */
        wgrad_split_check("one heavy expert", sbetas[v], off, 32, 1024, 512, 1);
    }
    make_offsets(off, 8, 300, 3);
    for (int g = 3; g < 8; g++) off[g + 1] += 5000;
    wgrad_split_check("partial tiles, 5000 rows", 0.5f, off, 8, 72, 200, 1);
    make_offsets(off, 16, 200, 0);
    for (int h = 0; h < 8; h++)
        for (int g = 2 * h + 1; g < 16; g++) off[g + 1] += 6000;   /* experts 1, 3, .., 15: 6000 more rows each */
    wgrad_split_check("eight heavy experts", 0.0f, off, 16, 72, 200, 1);
    for (int g = 0; g <= 32; g++) off[g] = 1024 * g;
    wgrad_split_check("balanced", 0.0f, off, 32, 1024, 512, 0);
    make_offsets(off, 32, 700, 0);   /* "one heavy expert" again: it split above */
    for (int g = 5; g < 32; g++) off[g + 1] += 8000;
    wgrad_split_starved(off, 32, 1024, 512);

    /* the SwiGLU experts fused: partial tiles and empty experts, the step model, and refusals */
    make_offsets(off, 8, 300, 3);
    swiglu_check("partial tiles", off, 8, 72, 128, 1);
    make_offsets(off, 32, 700, 0);
    swiglu_check("step model", off, 32, 1024, 512, 1);
    make_offsets(off, 8, 100, 3);
    swiglu_check("I not a multiple of 64 (two GEMM calls)", off, 8, 64, 200, 2);
    /* the dispatch folded into the loads: partial tiles; the step model (8192
     * tokens, top-4); one heavy expert, whose weight-gradient rows split */
    make_offsets(off, 8, 300, 3);
    rows_check("partial tiles", off, 8, 500, 72, 128, 0);
    make_offsets(off, 32, 1700, 0);
    rows_check("step model", off, 32, 8192, 1024, 512, 0);
    make_offsets(off, 32, 200, 0);
    for (int g = 5; g <= 32; g++) off[g] += 6000;   /* expert 4 holds 6000 more rows */
    rows_check("one heavy expert", off, 32, 8192, 1024, 512, 1);
    make_offsets(off, 8, 300, 3);
    swiglu_bwd_w_check("partial tiles", off, 8, 72, 200);
    make_offsets(off, 32, 1700, 0);
    swiglu_bwd_w_check("step model", off, 32, 1024, 512);
    /* offsets on the device: partial tiles and empty experts; the step model; one heavy expert; 256 experts */
    make_offsets(off, 8, 300, 3);
    dev_offsets_check("partial tiles", off, 8, 500, 72, 128);
    make_offsets(off, 32, 1700, 0);
    dev_offsets_check("step model", off, 32, 8192, 1024, 512);
    make_offsets(off, 32, 200, 0);
    for (int g = 5; g <= 32; g++) off[g] += 6000;
    dev_offsets_check("one heavy expert", off, 32, 8192, 1024, 512);
    make_offsets(off, 256, 40, 0);
    dev_offsets_check("256 experts", off, 256, 4096, 64, 64);
    make_offsets(off, 8, 300, 3);
    swiglu_bwd_check("partial tiles", off, 8, 72, 200, 1);
    make_offsets(off, 32, 700, 0);
    swiglu_bwd_check("step model", off, 32, 1024, 512, 1);
    make_offsets(off, 8, 100, 3);
    swiglu_bwd_check("K not a multiple of 8 (cuBLAS)", off, 8, 36, 64, 0);

    /* the other strategies: the cuBLAS weight gradients write zeros (NaN must not
     * survive) for empty experts under beta 0, in bf16 and f32 (f32 training with
     * a lazy zero_grad takes them); the fused SwiGLU ops under `auto` (its
     * FLOPs rule takes the kernel) and composed from cuBLAS calls (batched) */
    static const struct { moe_cuda_grouped_gemm mode; const char *name; } strat[] = {
        {MOE_CUDA_GROUPED_BATCHED, "cuBLAS batched"}, {MOE_CUDA_GROUPED_PADDED, "cuBLAS padded"},
        {MOE_CUDA_GROUPED_LOOP, "cuBLAS loop"}};
    for (size_t i = 0; i < sizeof strat / sizeof strat[0]; i++) {
        die_if(moe_cuda_set_grouped_gemm(ctx, 0, strat[i].mode) != MOE_OK, "strategy");
        for (int dti = 0; dti < 2; dti++) {
            make_offsets(off, 8, 300, 3);
            wgrad_check_dt(dti ? MOE_F32 : BF, strat[i].name, 0.0f, off, 8, 64, 128, 0);
        }
    }
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_AUTO) != MOE_OK, "auto strategy");
    make_offsets(off, 32, 700, 0);
    swiglu_check("auto strategy, step model", off, 32, 1024, 512, 1);
    make_offsets(off, 32, 700, 0);
    swiglu_bwd_check("auto strategy, step model", off, 32, 1024, 512, 1);
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_BATCHED) != MOE_OK, "batched strategy");
    make_offsets(off, 8, 300, 3);
    swiglu_check("cuBLAS batched (composed)", off, 8, 128, 128, 0);
    make_offsets(off, 8, 300, 3);
    swiglu_bwd_check("cuBLAS batched (composed)", off, 8, 128, 128, 0);
    make_offsets(off, 8, 101, 3);
    if (off[8] % 2 == 0) off[8]++;   /* odd rows: M * 36 elements leave a tail of 4 past the 8-wide vectors */
    swiglu_bwd_check("cuBLAS, I not a multiple of 8 (the activation's scalar tail)", off, 8, 64, 36, 0);
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_KERNEL) != MOE_OK, "kernel strategy");

    /* calls the kernel refuses go through cuBLAS, still right */
    make_offsets(off, 8, 100, 3);
    fwd_check("K not a multiple of 8", 1, 0.5f, off, 8, 36, 64, 0);
    make_offsets(off, 8, 100, 3);
    fwd_check("N not a multiple of 8", 0, 0.0f, off, 8, 64, 60, 0);
    make_offsets(off, 8, 100, 3);
    wgrad_check("P not a multiple of 8", 0.5f, off, 8, 20, 64, 0);
    make_offsets(off, 1000, 4, 5);
    fwd_check("1000 experts", 1, 0.5f, off, 1000, 16, 16, 0);
    return gpucheck_end();
}
