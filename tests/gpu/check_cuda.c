/* check_cuda: the CUDA kernels of memory, GEMMs (plain and grouped, every
 * strategy), elementwise and row-wise ops (softmax, norms, SwiGLU, cross
 * entropy) and AdamW (the host's step and the device's) against the CPU
 * backend, through the public moe_op_* API; check_cuda_nn.c has the rest,
 * check_cuda_timing.c the timings. Fresh normal inputs per check (never
 * zeros), outputs poisoned with NaN before each run so unwritten elements
 * fail. bf16 checks feed the CPU the same bf16-rounded
 * inputs (the CPU computes in f32) and compare the GPU's bf16 result with
 * tolerance 2e-2.
 * Error measure: max |gpu - cpu| / (1 + |cpu|) (printed on every line as
 * "max err").
 * Prints TAP; exit 1 on failure; "1..0 # SKIP no CUDA device" and exit 0
 * without a GPU. MOELAB_CHECK_ONLY=name,... runs only those groups (gpucheck.h). */
#include "gpucheck.h"

/* ---- memory ---- */

static void test_random(moe_dtype dt) {
    int64_t n = 1237;
    pair a = out_pair(dt, SH(n)), b = out_pair(dt, SH(n));
    uint64_t key = moe_rng_key(seed++, MOE_RNG_INIT);
    if (RUN("fill_rand", dt, moe_op_fill_rand(ctx, a.h, key, 77, -0.5f, 2.0f),
            moe_op_fill_rand(ctx, a.d, key, 77, -0.5f, 2.0f))) {
        round_through(a.h, dt);
        check("fill_rand (bit-identical)", dt, a.d, a.h, 0.0);
    }
    if (RUN("fill_randn", dt, moe_op_fill_randn(ctx, b.h, key, 5, 0.25f, 1.5f),
            moe_op_fill_randn(ctx, b.d, key, 5, 0.25f, 1.5f))) {
        round_through(b.h, dt);
        /* logf/sinf/cosf may differ by a few ulp between CUDA and glibc */
        check("fill_randn (few ulp)", dt, b.d, b.h, dt == MOE_F32 ? 4e-6 : 8e-3);
    }
    pfree(&a);
    pfree(&b);
}

static void test_fill(moe_dtype dt) {
    pair a = out_pair(dt, SH(3, 129));
    if (RUN("fill", dt, moe_op_fill(ctx, a.h, 0.37), moe_op_fill(ctx, a.d, 0.37))) {
        round_through(a.h, dt);
        check("fill", dt, a.d, a.h, 0.0);
    }
    pfree(&a);
}

static void test_copy(void) {
    /* round trip f32 and i64 */
    moe_tensor *h = host_randn(SH(37, 53), 1, 0, 0);
    moe_tensor *d = to_gpu(h, MOE_F32);
    check("copy h2d/d2h round trip", MOE_F32, d, h, 0.0);
    moe_tensor *hi = moe_tensor_new_cpu(MOE_I64, SH(1000));
    int64_t *ip = moe_tensor_data(hi);
    for (int i = 0; i < 1000; i++) ip[i] = (int64_t)(i * 2654435761u) - 1000000000;
    moe_tensor *di = moe_op_to(ctx, hi, GPU, MOE_I64);
    moe_tensor *bi = di ? moe_op_to(ctx, di, MOE_DEVICE_CPU, MOE_I64) : NULL;
    ok(bi && !memcmp(moe_tensor_data(bi), ip, 1000 * sizeof(int64_t)), "copy i64 round trip");
    moe_tensor_release(hi);
    moe_tensor_release(di);
    moe_tensor_release(bi);
    /* strided host source -> device */
    moe_tensor *ht = moe_tensor_transpose(h, 0, 1);
    moe_tensor *dt_ = to_gpu(ht, MOE_F32);
    check("copy h2d from a transposed view", MOE_F32, dt_, ht, 0.0);
    /* strided device source -> device, and -> host */
    moe_tensor *dv = moe_tensor_transpose(d, 0, 1);
    moe_tensor *dc = moe_op_contiguous(ctx, dv);
    die_if(!dc, "contiguous on device");
    check("copy d2d from a transposed view", MOE_F32, dc, ht, 0.0);
    check("copy d2h from a transposed view", MOE_F32, dv, ht, 0.0);
    /* expanded (stride-0) source */
    moe_tensor *row = moe_tensor_narrow(d, 0, 3, 1);
    moe_tensor *ex = moe_tensor_expand(row, SH(5, 53));
    moe_tensor *hrow = moe_tensor_narrow(h, 0, 3, 1);
    moe_tensor *hex = moe_tensor_expand(hrow, SH(5, 53));
    moe_tensor *exc = moe_op_contiguous(ctx, ex);
    die_if(!exc, "contiguous of an expanded view");
    check("copy d2d from an expanded view", MOE_F32, exc, hex, 0.0);
    /* dtype conversion on the device, flat and strided */
    moe_tensor *db = moe_op_to(ctx, d, GPU, MOE_BF16);
    moe_tensor *dbt = moe_op_to(ctx, dv, GPU, MOE_BF16);
    die_if(!db || !dbt, "f32->bf16 on device");
    moe_tensor *hr = moe_tensor_contiguous_cpu(h), *hrt = moe_tensor_contiguous_cpu(ht);
    round_through(hr, MOE_BF16);
    round_through(hrt, MOE_BF16);
    check("copy f32->bf16 on device (bit-identical)", MOE_BF16, db, hr, 0.0);
    check("copy strided f32->bf16 on device", MOE_BF16, dbt, hrt, 0.0);
    moe_tensor *back = moe_op_to(ctx, db, GPU, MOE_F32);
    check("copy bf16->f32 on device", MOE_BF16, back, hr, 0.0);
    /* host f32 -> device bf16 (converted on the device) */
    moe_tensor *hb = moe_op_to(ctx, h, GPU, MOE_BF16);
    check("copy host f32 -> device bf16", MOE_BF16, hb, hr, 0.0);
    moe_tensor *all[] = {h, d, ht, dt_, dv, dc, row, ex, hrow, hex, exc, db, dbt, hr, hrt, back, hb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

/* ---- GEMM ---- */

static void test_gemm(moe_dtype dt) {
    const int64_t M = 37, N = 45, K = 96, B = 3;
    char name[96];
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            pair a = ta ? in_randn(dt, SH(K, M)) : in_randn(dt, SH(M, K));
            pair b = tb ? in_randn(dt, SH(N, K)) : in_randn(dt, SH(K, N));
            pair c = in_randn(dt, SH(M, N));
            snprintf(name, sizeof name, "gemm transa=%d transb=%d", ta, tb);
            if (RUN(name, dt, moe_op_gemm(ctx, ta, tb, 0.7f, a.h, b.h, 0.3f, c.h),
                    moe_op_gemm(ctx, ta, tb, 0.7f, a.d, b.d, 0.3f, c.d)))
                check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
            pfree(&a); pfree(&b); pfree(&c);
        }
    /* batched: [B,M,K]@[K,N], [B,M,K]@[B,K,N], [M,K]@[B,K,N], transposed batched */
    for (int v = 0; v < 4; v++) {
        pair a = v == 2 ? in_randn(dt, SH(M, K)) : v == 3 ? in_randn(dt, SH(B, K, M)) : in_randn(dt, SH(B, M, K));
        pair b = v == 0 ? in_randn(dt, SH(K, N)) : v == 3 ? in_randn(dt, SH(B, N, K)) : in_randn(dt, SH(B, K, N));
        pair c = in_randn(dt, SH(B, M, N));
        int t = v == 3;
        snprintf(name, sizeof name, "gemm batched variant %d", v);
        if (RUN(name, dt, moe_op_gemm(ctx, t, t, 1.0f, a.h, b.h, 0.0f, c.h),
                moe_op_gemm(ctx, t, t, 1.0f, a.d, b.d, 0.0f, c.d)))
            check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
        pfree(&a); pfree(&b); pfree(&c);
    }
}

/* An input pair whose GPU side is poisoned with NaN (for beta = 0 outputs:
 * the GPU must not read them; the host side stays finite, so the reference
 * holds whether or not the CPU reads it). */
static pair poisoned_out(moe_dtype dt, int nd, const int64_t *shape) {
    pair p = in_randn(dt, nd, shape);
    die_if(moe_op_fill(ctx, p.d, NAN) != MOE_OK, "poison");
    return p;
}


/* Row offsets of G groups with pseudo-random sizes in [0, maxrows] (fresh per call). */
static int64_t random_offsets(int64_t *off, int G, int maxrows) {
    uint64_t x = seed++ * 0x9E3779B97F4A7C15ull + 1;
    off[0] = 0;
    for (int g = 0; g < G; g++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        off[g + 1] = off[g] + (int64_t)(x % (uint64_t)(maxrows + 1));
    }
    return off[G];
}

/* One forward grouped check: c = alpha a @ op(b[g]) + beta c on fresh data. */
static void grouped_fwd_check(moe_dtype dt, const char *sn, const char *what, int tb, float beta,
                              const int64_t *off, int G, int64_t K, int64_t N) {
    int64_t M = off[G];
    pair a = in_randn(dt, SH(M, K));
    pair b = tb ? in_randn(dt, SH(G, N, K)) : in_randn(dt, SH(G, K, N));
    pair c = beta == 0.0f ? poisoned_out(dt, SH(M, N)) : in_randn(dt, SH(M, N));
    char name[160];
    snprintf(name, sizeof name, "gemm_grouped %s: %s transb=%d beta=%g G=%d M=%lld K=%lld N=%lld", sn, what, tb, beta,
             G, (long long)M, (long long)K, (long long)N);
    if (RUN(name, dt, moe_op_gemm_grouped(ctx, tb, 0.9f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped(ctx, tb, 0.9f, a.d, b.d, beta, c.d, off, G)))
        check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
    pfree(&a); pfree(&b); pfree(&c);
}

/* One weight-gradient check: c[g] = alpha a_g^T b_g + beta c[g] (empty groups: beta c[g]). */
static void grouped_wgrad_check(moe_dtype dt, const char *sn, const char *what, float beta, const int64_t *off, int G,
                                int64_t P, int64_t Q) {
    int64_t M = off[G];
    pair a = in_randn(dt, SH(M, P)), b = in_randn(dt, SH(M, Q));
    pair c = beta == 0.0f ? poisoned_out(dt, SH(G, P, Q)) : in_randn(dt, SH(G, P, Q));
    char name[160];
    snprintf(name, sizeof name, "gemm_grouped_wgrad %s: %s beta=%g G=%d M=%lld P=%lld Q=%lld", sn, what, beta, G,
             (long long)M, (long long)P, (long long)Q);
    if (RUN(name, dt, moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.h, b.h, beta, c.h, off, G),
            moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, beta, c.d, off, G)))
        check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
    pfree(&a); pfree(&b); pfree(&c);
}

/* The grouped checks under one strategy. Odd sizes (row pitches not 16-byte
 * aligned) take the loop under either strategy; aligned ones take
 * cublasGemmGroupedBatchedEx under the batched strategy; the device's
 * counters must say so. Empty groups first, in the middle and last, repeated
 * row counts (one cuBLAS group of several experts), and 3000 groups of 0 to 3
 * rows (about 2250 non-empty: two pointer-fill launches of up to 2048; about
 * 750 empty: two empty-group scale launches of up to 512). */
static void grouped_checks(moe_dtype dt, moe_cuda_grouped_gemm mode) {
    const char *sn = mode == MOE_CUDA_GROUPED_LOOP ? "loop" : mode == MOE_CUDA_GROUPED_PADDED ? "padded"
                   : mode == MOE_CUDA_GROUPED_KERNEL ? "kernel" : "batched";
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, mode) != MOE_OK, "set the grouped-GEMM strategy");
    uint64_t b0 = 0, l0 = 0, b1 = 0, l1 = 0;
    die_if(moe_cuda_grouped_gemm_info(ctx, 0, NULL, &b0, &l0) != MOE_OK, "grouped-GEMM counters");
    int n_odd = 0, n_al = 0;
    /* odd sizes, group 1 empty */
    const int64_t off1[] = {0, 5, 5, 17, 24};
    for (int tb = 0; tb < 2; tb++, n_odd++) grouped_fwd_check(dt, sn, "odd sizes", tb, 0.5f, off1, 4, 40, 33);
    for (int v = 0; v < 2; v++, n_odd++) grouped_wgrad_check(dt, sn, "odd sizes", v ? 0.5f : 0.0f, off1, 4, 29, 31);
    /* aligned sizes: groups 0, 2 and 7 empty, three groups of 9 rows */
    const int64_t off2[] = {0, 0, 9, 9, 18, 31, 40, 71, 71};
    for (int tb = 0; tb < 2; tb++, n_al++) grouped_fwd_check(dt, sn, "aligned", tb, 0.5f, off2, 8, 64, 48);
    grouped_fwd_check(dt, sn, "aligned", 1, 0.0f, off2, 8, 64, 48); n_al++;
    for (int v = 0; v < 2; v++, n_al++) grouped_wgrad_check(dt, sn, "aligned", v ? 0.5f : 0.0f, off2, 8, 48, 40);
    /* many small groups, about a quarter of them empty */
    enum { GM = 3000 };
    static int64_t off3[GM + 1];
    random_offsets(off3, GM, 3);
    grouped_fwd_check(dt, sn, "3000 groups", 1, 0.0f, off3, GM, 16, 8); n_al++;
    random_offsets(off3, GM, 3);
    grouped_fwd_check(dt, sn, "3000 groups", 0, 0.5f, off3, GM, 16, 8); n_al++;
    random_offsets(off3, GM, 3);
    grouped_wgrad_check(dt, sn, "3000 groups", 0.5f, off3, GM, 8, 16); n_al++;
    random_offsets(off3, GM, 3);
    grouped_wgrad_check(dt, sn, "3000 groups", 0.0f, off3, GM, 8, 16); n_al++;
    die_if(moe_cuda_grouped_gemm_info(ctx, 0, NULL, &b1, &l1) != MOE_OK, "grouped-GEMM counters");
    /* padded and kernel calls count as one-call ("batched") calls; over 256 experts they run as batched */
    int one_call = mode == MOE_CUDA_GROUPED_BATCHED || mode == MOE_CUDA_GROUPED_PADDED || mode == MOE_CUDA_GROUPED_KERNEL;
    uint64_t want_b = one_call ? (uint64_t)n_al : 0;
    uint64_t want_l = one_call ? (uint64_t)n_odd : (uint64_t)(n_odd + n_al);
    ok(b1 - b0 == want_b && l1 - l0 == want_l,
       "gemm_grouped %s [%s]: %llu calls through one cuBLAS call (want %llu), %llu through the loop "
       "(want %llu)%s", sn, dtn(dt), (unsigned long long)(b1 - b0), (unsigned long long)want_b,
       (unsigned long long)(l1 - l0), (unsigned long long)want_l,
       b1 - b0 < want_b ? "; fewer batched: cuBLAS rejected the type combination?" : "");
}

/* gemm_grouped_pair (two GEMMs summed into c) under the current strategy */
static void grouped_pair_check(moe_dtype dt, const char *sn, int tb, float beta) {
    const int64_t off[] = {0, 0, 9, 9, 18, 31, 40, 71, 71};
    const int G = 8;
    const int64_t M = 71, K1 = 64, K2 = 40, N = 48;
    pair a1 = in_randn(dt, SH(M, K1)), a2 = in_randn(dt, SH(M, K2));
    pair b1 = tb ? in_randn(dt, SH(G, N, K1)) : in_randn(dt, SH(G, K1, N));
    pair b2 = tb ? in_randn(dt, SH(G, N, K2)) : in_randn(dt, SH(G, K2, N));
    pair c = in_randn(dt, SH(M, N));
    char name[160];
    snprintf(name, sizeof name, "gemm_grouped_pair %s transb=%d beta=%g", sn, tb, beta);
    if (RUN(name, dt, moe_op_gemm_grouped_pair(ctx, tb, 0.8f, a1.h, b1.h, a2.h, b2.h, beta, c.h, off, G),
            moe_op_gemm_grouped_pair(ctx, tb, 0.8f, a1.d, b1.d, a2.d, b2.d, beta, c.d, off, G)))
        /* outside the kernel, two calls: the first product is rounded to bf16 before the second is added */
        check(name, dt, c.d, c.h, dt == MOE_BF16 && strcmp(sn, "kernel") ? 6e-2 : tol_of(dt, 1e-4));
    pfree(&a1); pfree(&a2); pfree(&b1); pfree(&b2); pfree(&c);
}

/* The loop strategy over several streams: each expert's GEMM is the same
 * cuBLAS call whichever lane runs it, so 4 lanes give the bytes of 1 (forward
 * with beta 0.5, and weight gradients accumulating into c with empty experts),
 * and both match the CPU. Then the lanes setting's argument checks. */
static void lanes_check(moe_dtype dt) {
    enum { G = 24 };
    int64_t off[G + 1];
    random_offsets(off, G, 400);
    off[G] = off[G - 1];   /* the last expert empty, beside the random ones */
    const int64_t M = off[G], K = 136, N = 72;
    moe_cuda_grouped_gemm mode0;
    die_if(moe_cuda_grouped_gemm_info(ctx, 0, &mode0, NULL, NULL) != MOE_OK, "grouped-GEMM strategy");
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_LOOP) != MOE_OK, "loop strategy");
    for (int wg = 0; wg < 2; wg++) {
        pair a = in_randn(dt, SH(M, K));
        pair b = wg ? in_randn(dt, SH(M, N)) : in_randn(dt, SH(G, N, K));
        pair c = wg ? in_randn(dt, SH(G, K, N)) : in_randn(dt, SH(M, N));
        moe_tensor *c4 = to_gpu(c.h, dt);
        float beta = wg ? 1.0f : 0.5f;
        moe_status s1, s4, sh;
        die_if(moe_cuda_set_grouped_lanes(ctx, 0, 1) != MOE_OK, "1 lane");
        s1 = wg ? moe_op_gemm_grouped_wgrad(ctx, 0.7f, a.d, b.d, beta, c.d, off, G)
                : moe_op_gemm_grouped(ctx, 1, 0.7f, a.d, b.d, beta, c.d, off, G);
        die_if(moe_cuda_set_grouped_lanes(ctx, 0, 4) != MOE_OK, "4 lanes");
        s4 = wg ? moe_op_gemm_grouped_wgrad(ctx, 0.7f, a.d, b.d, beta, c4, off, G)
                : moe_op_gemm_grouped(ctx, 1, 0.7f, a.d, b.d, beta, c4, off, G);
        sh = wg ? moe_op_gemm_grouped_wgrad(ctx, 0.7f, a.h, b.h, beta, c.h, off, G)
                : moe_op_gemm_grouped(ctx, 1, 0.7f, a.h, b.h, beta, c.h, off, G);
        const char *what = wg ? "gemm_grouped_wgrad" : "gemm_grouped";
        ok(s1 == MOE_OK && s4 == MOE_OK && same_bytes(c.d, c4), "%s loop over 4 lanes: the bytes of 1 lane [%s]",
           what, dtn(dt));
        if (sh == MOE_OK && s4 == MOE_OK) {
            char name[96];
            snprintf(name, sizeof name, "%s loop over 4 lanes against the CPU", what);
            check(name, dt, c4, c.h, tol_of(dt, 1e-4));
        } else {
            ok(0, "%s loop over 4 lanes: %s", what, moe_last_error());
        }
        moe_tensor_release(c4);
        pfree(&a); pfree(&b); pfree(&c);
    }
    ok(moe_cuda_set_grouped_lanes(ctx, 0, 0) == MOE_ERR_ARG && moe_cuda_set_grouped_lanes(ctx, 0, 5) == MOE_ERR_ARG,
       "moe_cuda_set_grouped_lanes refuses 0 and 5 lanes");
    die_if(moe_cuda_set_grouped_lanes(ctx, 0, 1) != MOE_OK, "1 lane");
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, mode0) != MOE_OK, "restore the grouped-GEMM strategy");
}

static void test_gemm_grouped(moe_dtype dt) {
    moe_cuda_grouped_gemm mode0;
    die_if(moe_cuda_grouped_gemm_info(ctx, 0, &mode0, NULL, NULL) != MOE_OK, "grouped-GEMM strategy");
    grouped_checks(dt, MOE_CUDA_GROUPED_LOOP);
    grouped_checks(dt, MOE_CUDA_GROUPED_BATCHED);
    grouped_checks(dt, MOE_CUDA_GROUPED_PADDED);
    grouped_checks(dt, MOE_CUDA_GROUPED_KERNEL);
    grouped_pair_check(dt, "kernel", 0, 0.0f);
    grouped_pair_check(dt, "kernel", 1, 0.5f);
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, MOE_CUDA_GROUPED_LOOP) != MOE_OK, "loop strategy");
    grouped_pair_check(dt, "loop", 0, 0.5f);
    die_if(moe_cuda_set_grouped_gemm(ctx, 0, mode0) != MOE_OK, "restore the grouped-GEMM strategy");
    lanes_check(dt);
}

/* ---- elementwise ---- */

static const char *bin_names[] = {"add", "sub", "mul", "div", "max", "min"};
static const char *un_names[] = {"neg", "exp", "log", "sqrt", "rsqrt", "abs", "tanh", "sigmoid", "relu", "silu",
                                 "gelu", "gelu_erf", "square", "scale", "add_scalar", "pow_scalar"};

static void test_binary(moe_dtype dt) {
    for (int op = 0; op < MOE_NUM_BINARY; op++) {
        char name[96];
        /* contiguous */
        pair a = in_randn(dt, SH(7, 65)), b = in_pair(dt, SH(7, 65), 0.5f, 0.3f, op == MOE_BIN_DIV);
        pair o = out_pair(dt, SH(7, 65));
        snprintf(name, sizeof name, "binary %s", bin_names[op]);
        if (RUN(name, dt, moe_op_binary(ctx, op, o.h, a.h, b.h), moe_op_binary(ctx, op, o.d, a.d, b.d)))
            check(name, dt, o.d, o.h, tol_of(dt, 1e-5));
        pfree(&a); pfree(&b); pfree(&o);
        /* contiguous, long enough for the vector loop (two vectors per thread), odd length for the tail */
        a = in_randn(dt, SH(37, 1001));
        b = in_pair(dt, SH(37, 1001), 0.5f, 0.3f, op == MOE_BIN_DIV);
        o = out_pair(dt, SH(37, 1001));
        snprintf(name, sizeof name, "binary %s n=37037", bin_names[op]);
        if (RUN(name, dt, moe_op_binary(ctx, op, o.h, a.h, b.h), moe_op_binary(ctx, op, o.d, a.d, b.d)))
            check(name, dt, o.d, o.h, tol_of(dt, 1e-5));
        pfree(&a); pfree(&b); pfree(&o);
        /* broadcast [4,1,6] x [5,1] -> [4,5,6] */
        a = in_randn(dt, SH(4, 1, 6));
        b = in_pair(dt, SH(5, 1), 0.5f, 0.3f, op == MOE_BIN_DIV);
        o = out_pair(dt, SH(4, 5, 6));
        snprintf(name, sizeof name, "binary %s broadcast", bin_names[op]);
        if (RUN(name, dt, moe_op_binary(ctx, op, o.h, a.h, b.h), moe_op_binary(ctx, op, o.d, a.d, b.d)))
            check(name, dt, o.d, o.h, tol_of(dt, 1e-5));
        pfree(&a); pfree(&b); pfree(&o);
    }
    /* a transposed operand */
    pair a = in_randn(dt, SH(33, 9)), b = in_randn(dt, SH(9, 33)), o = out_pair(dt, SH(9, 33));
    moe_tensor *ath = moe_tensor_transpose(a.h, 0, 1), *atd = moe_tensor_transpose(a.d, 0, 1);
    if (RUN("binary mul strided", dt, moe_op_binary(ctx, MOE_BIN_MUL, o.h, ath, b.h),
            moe_op_binary(ctx, MOE_BIN_MUL, o.d, atd, b.d)))
        check("binary mul strided", dt, o.d, o.h, tol_of(dt, 1e-5));
    moe_tensor_release(ath); moe_tensor_release(atd);
    pfree(&a); pfree(&b); pfree(&o);
}

static int un_positive(int op) {
    return op == MOE_UN_LOG || op == MOE_UN_SQRT || op == MOE_UN_RSQRT || op == MOE_UN_POW_SCALAR;
}

static void test_unary(moe_dtype dt) {
    for (int op = 0; op < MOE_NUM_UNARY; op++) {
        char name[96];
        float alpha = op == MOE_UN_POW_SCALAR ? 1.7f : -0.6f;
        int pos = un_positive(op);
        int strided = op % 3 == 0;   /* every third op reads a transposed view */
        pair x = pos ? in_pair(dt, SH(41, 19), 1.0f, 0.2f, 1) : in_randn(dt, SH(41, 19));
        pair g = in_randn(dt, SH(19, 41)), o = out_pair(dt, SH(19, 41)), dx = out_pair(dt, SH(19, 41));
        moe_tensor *xh = strided ? moe_tensor_transpose(x.h, 0, 1) : moe_tensor_view(x.h, SH(19, 41));
        moe_tensor *xd = strided ? moe_tensor_transpose(x.d, 0, 1) : moe_tensor_view(x.d, SH(19, 41));
        die_if(!xh || !xd, "view");
        snprintf(name, sizeof name, "unary %s%s", un_names[op], strided ? " strided" : "");
        if (RUN(name, dt, moe_op_unary(ctx, op, o.h, xh, alpha), moe_op_unary(ctx, op, o.d, xd, alpha)))
            check(name, dt, o.d, o.h, tol_of(dt, 2e-5));
        snprintf(name, sizeof name, "unary_backward %s%s", un_names[op], strided ? " strided" : "");
        if (RUN(name, dt, moe_op_unary_backward(ctx, op, dx.h, g.h, xh, alpha),
                moe_op_unary_backward(ctx, op, dx.d, g.d, xd, alpha)))
            check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
        moe_tensor_release(xh); moe_tensor_release(xd);
        pfree(&x); pfree(&g); pfree(&o); pfree(&dx);
        /* contiguous and long: the vector loop, its single-vector step and the scalar tail */
        x = pos ? in_pair(dt, SH(37, 1001), 1.0f, 0.2f, 1) : in_randn(dt, SH(37, 1001));
        g = in_randn(dt, SH(37, 1001));
        o = out_pair(dt, SH(37, 1001));
        dx = out_pair(dt, SH(37, 1001));
        snprintf(name, sizeof name, "unary %s n=37037", un_names[op]);
        if (RUN(name, dt, moe_op_unary(ctx, op, o.h, x.h, alpha), moe_op_unary(ctx, op, o.d, x.d, alpha)))
            check(name, dt, o.d, o.h, tol_of(dt, 2e-5));
        snprintf(name, sizeof name, "unary_backward %s n=37037", un_names[op]);
        if (RUN(name, dt, moe_op_unary_backward(ctx, op, dx.h, g.h, x.h, alpha),
                moe_op_unary_backward(ctx, op, dx.d, g.d, x.d, alpha)))
            check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
        pfree(&x); pfree(&g); pfree(&o); pfree(&dx);
    }
}

static void test_axpy(moe_dtype dt) {
    pair y = in_randn(dt, SH(5, 301)), x = in_randn(dt, SH(5, 301));
    if (RUN("axpy", dt, moe_op_axpy(ctx, y.h, -0.35f, x.h), moe_op_axpy(ctx, y.d, -0.35f, x.d)))
        check("axpy", dt, y.d, y.h, tol_of(dt, 1e-5));
    pfree(&y); pfree(&x);
    /* long (the vector loop with two vectors per thread, then the scalar tail) */
    y = in_randn(dt, SH(70001));
    x = in_randn(dt, SH(70001));
    if (RUN("axpy n=70001", dt, moe_op_axpy(ctx, y.h, 0.7f, x.h), moe_op_axpy(ctx, y.d, 0.7f, x.d)))
        check("axpy n=70001", dt, y.d, y.h, tol_of(dt, 1e-5));
    pfree(&y); pfree(&x);
    /* x one element into its storage: not 16-byte aligned, the scalar path */
    y = in_randn(dt, SH(3001));
    x = in_randn(dt, SH(3002));
    moe_tensor *xh = moe_tensor_narrow(x.h, 0, 1, 3001), *xd = moe_tensor_narrow(x.d, 0, 1, 3001);
    die_if(!xh || !xd, "narrow");
    if (RUN("axpy unaligned x", dt, moe_op_axpy(ctx, y.h, -1.3f, xh), moe_op_axpy(ctx, y.d, -1.3f, xd)))
        check("axpy unaligned x", dt, y.d, y.h, tol_of(dt, 1e-5));
    moe_tensor_release(xh); moe_tensor_release(xd);
    pfree(&y); pfree(&x);
}

/* ---- row-wise ---- */

static void test_softmax(moe_dtype dt) {
    const int64_t ns[] = {17, 1000};
    for (int k = 0; k < 2; k++) {
        int64_t n = ns[k];
        char name[96];
        pair x = in_pair(dt, SH(3, 7, n), 2.0f, 0.0f, 0), y = out_pair(dt, SH(3, 7, n));
        pair ly = out_pair(dt, SH(3, 7, n)), lse = out_pair(dt, SH(3, 7));
        snprintf(name, sizeof name, "softmax n=%lld", (long long)n);
        if (RUN(name, dt, moe_op_softmax(ctx, y.h, x.h), moe_op_softmax(ctx, y.d, x.d)))
            check(name, dt, y.d, y.h, tol_of(dt, 1e-5));
        snprintf(name, sizeof name, "log_softmax n=%lld", (long long)n);
        if (RUN(name, dt, moe_op_log_softmax(ctx, ly.h, x.h), moe_op_log_softmax(ctx, ly.d, x.d)))
            check(name, dt, ly.d, ly.h, tol_of(dt, 1e-5));
        snprintf(name, sizeof name, "logsumexp n=%lld", (long long)n);
        if (RUN(name, dt, moe_op_logsumexp(ctx, lse.h, x.h), moe_op_logsumexp(ctx, lse.d, x.d)))
            check(name, dt, lse.d, lse.h, tol_of(dt, 1e-5));
        /* backward: same y on both sides (the CPU's, rounded for bf16) */
        pair dy = in_randn(dt, SH(3, 7, n)), dx = out_pair(dt, SH(3, 7, n));
        round_through(y.h, dt);
        round_through(ly.h, dt);
        moe_tensor *yd = to_gpu(y.h, dt), *lyd = to_gpu(ly.h, dt);
        snprintf(name, sizeof name, "softmax_backward n=%lld", (long long)n);
        if (RUN(name, dt, moe_op_softmax_backward(ctx, dx.h, dy.h, y.h), moe_op_softmax_backward(ctx, dx.d, dy.d, yd)))
            check(name, dt, dx.d, dx.h, tol_of(dt, 1e-5));
        snprintf(name, sizeof name, "log_softmax_backward n=%lld", (long long)n);
        if (RUN(name, dt, moe_op_log_softmax_backward(ctx, dx.h, dy.h, ly.h),
                moe_op_log_softmax_backward(ctx, dx.d, dy.d, lyd)))
            check(name, dt, dx.d, dx.h, tol_of(dt, 1e-5));
        moe_tensor_release(yd); moe_tensor_release(lyd);
        pfree(&x); pfree(&y); pfree(&ly); pfree(&lse); pfree(&dy); pfree(&dx);
    }
}

/* Shapes for each path of cuda_norm.cu: D=333 scalar (one block per row); D=64
 * a lane group of 8 (bf16) or 16 (f32) per row; D=1000 a warp per row with 4
 * (bf16) or 8 (f32) vectors per lane; D=4104 the vectorised block-per-row
 * path; [3, 700, 256] more rows than one pass of the dw blocks (each block
 * takes several rows per warp, the last pass partial). */
static void test_rmsnorm(moe_dtype dt) {
    static const int64_t cfg[][3] = {{2, 9, 333}, {2, 37, 64}, {2, 37, 1000}, {2, 9, 4104}, {3, 700, 256}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t R = cfg[c][0], T = cfg[c][1], D = cfg[c][2];
        char name[128];
        pair x = in_randn(dt, SH(R, T, D)), w = in_pair(dt, SH(D), 0.2f, 1.0f, 0);
        pair y = out_pair(dt, SH(R, T, D)), rstd = out_pair(dt, SH(R, T));
        if (RUN("rmsnorm", dt, moe_op_rmsnorm(ctx, y.h, rstd.h, x.h, w.h, 1e-5f),
                moe_op_rmsnorm(ctx, y.d, rstd.d, x.d, w.d, 1e-5f))) {
            snprintf(name, sizeof name, "rmsnorm y [%lld,%lld,%lld]", (long long)R, (long long)T, (long long)D);
            check(name, dt, y.d, y.h, tol_of(dt, 1e-5));
            snprintf(name, sizeof name, "rmsnorm rstd [%lld,%lld,%lld]", (long long)R, (long long)T, (long long)D);
            check(name, dt, rstd.d, rstd.h, tol_of(dt, 1e-5));
        }
        round_through(rstd.h, dt);
        moe_tensor *rd = to_gpu(rstd.h, dt);
        pair dy = in_randn(dt, SH(R, T, D)), dx = out_pair(dt, SH(R, T, D)), dw = in_randn(dt, SH(D));
        if (RUN("rmsnorm_backward", dt, moe_op_rmsnorm_backward(ctx, dx.h, dw.h, dy.h, x.h, w.h, rstd.h),
                moe_op_rmsnorm_backward(ctx, dx.d, dw.d, dy.d, x.d, w.d, rd))) {
            snprintf(name, sizeof name, "rmsnorm_backward dx [%lld,%lld,%lld]", (long long)R, (long long)T,
                     (long long)D);
            check(name, dt, dx.d, dx.h, tol_of(dt, 1e-5));
            snprintf(name, sizeof name, "rmsnorm_backward dw (accumulated) [%lld,%lld,%lld]", (long long)R,
                     (long long)T, (long long)D);
            /* dw sums R*T rows: the CPU adds them one by one in f32, the GPU in
             * fixed-order partials; 2100 rows measured 2.2e-5 apart (H100) */
            check(name, dt, dw.d, dw.h, tol_of(dt, R * T > 1000 ? 1e-4 : 1e-5));
        }
        /* without dw (its own launch configuration) */
        pair dx2 = out_pair(dt, SH(R, T, D));
        if (RUN("rmsnorm_backward", dt, moe_op_rmsnorm_backward(ctx, dx2.h, NULL, dy.h, x.h, w.h, rstd.h),
                moe_op_rmsnorm_backward(ctx, dx2.d, NULL, dy.d, x.d, w.d, rd))) {
            snprintf(name, sizeof name, "rmsnorm_backward dx, no dw [%lld,%lld,%lld]", (long long)R, (long long)T,
                     (long long)D);
            check(name, dt, dx2.d, dx2.h, tol_of(dt, 1e-5));
        }
        /* added into a gradient already there (beta 1), with dw and without: the residual stream's case */
        for (int withdw = 0; withdw < 2; withdw++) {
            pair dx3 = in_randn(dt, SH(R, T, D)), dw3 = in_randn(dt, SH(D));
            round_through(dx3.h, dt);
            if (RUN("rmsnorm_backward beta 1", dt,
                    moe_op_rmsnorm_backward_beta(ctx, dx3.h, withdw ? dw3.h : NULL, dy.h, x.h, w.h, rstd.h, 1.0f),
                    moe_op_rmsnorm_backward_beta(ctx, dx3.d, withdw ? dw3.d : NULL, dy.d, x.d, w.d, rd, 1.0f))) {
                snprintf(name, sizeof name, "rmsnorm_backward dx += (beta 1)%s [%lld,%lld,%lld]",
                         withdw ? ", with dw" : "", (long long)R, (long long)T, (long long)D);
                check(name, dt, dx3.d, dx3.h, tol_of(dt, 1e-5));
            }
            pfree(&dx3); pfree(&dw3);
        }
        /* dw from fixed-order partials: the same bytes twice */
        moe_tensor *wa = moe_op_to(ctx, w.d, GPU, dt), *wb = moe_op_to(ctx, w.d, GPU, dt);
        die_if(!wa || !wb, "copies");
        moe_status s1 = moe_op_rmsnorm_backward(ctx, dx2.d, wa, dy.d, x.d, w.d, rd);
        moe_status s2 = moe_op_rmsnorm_backward(ctx, dx2.d, wb, dy.d, x.d, w.d, rd);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(wa, wb),
           "rmsnorm_backward dw twice: bit-identical [%lld,%lld,%lld] [%s]", (long long)R, (long long)T, (long long)D,
           dtn(dt));
        moe_tensor_release(wa); moe_tensor_release(wb);
        moe_tensor_release(rd);
        pfree(&x); pfree(&w); pfree(&y); pfree(&rstd); pfree(&dy); pfree(&dx); pfree(&dw); pfree(&dx2);
    }
}

static void test_swiglu(moe_dtype dt) {
    pair g = in_randn(dt, SH(6, 257)), u = in_randn(dt, SH(6, 257)), o = out_pair(dt, SH(6, 257));
    if (RUN("swiglu", dt, moe_op_swiglu(ctx, o.h, g.h, u.h), moe_op_swiglu(ctx, o.d, g.d, u.d)))
        check("swiglu", dt, o.d, o.h, tol_of(dt, 1e-5));
    pair go = in_randn(dt, SH(6, 257)), dg = out_pair(dt, SH(6, 257)), du = out_pair(dt, SH(6, 257));
    if (RUN("swiglu_backward", dt, moe_op_swiglu_backward(ctx, dg.h, du.h, go.h, g.h, u.h),
            moe_op_swiglu_backward(ctx, dg.d, du.d, go.d, g.d, u.d))) {
        check("swiglu_backward dgate", dt, dg.d, dg.h, tol_of(dt, 1e-5));
        check("swiglu_backward dup", dt, du.d, du.h, tol_of(dt, 1e-5));
    }
    pfree(&g); pfree(&u); pfree(&o); pfree(&go); pfree(&dg); pfree(&du);
}

/* V=1031 (not a multiple of 8: rows start unaligned, so heads and tails) and
 * V=20011 (long rows: the four-vectors-per-thread loop as well); every fifth
 * row ignored. Then logits one element into their storage (dlogits and logits
 * aligned differently: the element-by-element backward); then V=120011, a row
 * too long for the fused kernel to keep in shared memory; then more rows than
 * SMs (up to 132) of V=8192 and V=50304, which bf16 streams through the copy
 * engine (k_xent_fused_pipe: each block its rows in turn, two at a time). */
static void test_cross_entropy(moe_dtype dt) {
    static const int64_t cfg[][2] = {{13, 1031}, {9, 20011}, {7, 1029}, {3, 120011}, {301, 8192}, {270, 50304}};
    const int64_t IGN = -100;
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t N = cfg[c][0], V = cfg[c][1];
        const int shifted = c == 2;
        char name[128];
        pair x0 = in_pair(dt, SH(N * V + shifted), 3.0f, 0.0f, 0);
        moe_tensor *nh = moe_tensor_narrow(x0.h, 0, shifted, N * V), *nd = moe_tensor_narrow(x0.d, 0, shifted, N * V);
        die_if(!nh || !nd, "narrow");
        moe_tensor *xh = moe_tensor_view(nh, SH(N, V)), *xd = moe_tensor_view(nd, SH(N, V));
        die_if(!xh || !xd, "logits view");
        moe_tensor_release(nh); moe_tensor_release(nd);
        moe_tensor *th = moe_tensor_new_cpu(MOE_I64, SH(N));
        int64_t *t = moe_tensor_data(th);
        int counted = 0;
        for (int64_t i = 0; i < N; i++) {
            t[i] = i % 5 == 2 ? IGN : i == 0 ? V - 1 : i == 1 ? 0 : (int64_t)((i * 7919 + seed) % V);
            counted += t[i] != IGN;
        }
        seed++;
        moe_tensor *td = moe_op_to(ctx, th, GPU, MOE_I64);
        die_if(!td, "targets upload");
        pair loss = out_pair(dt, SH(N)), lse = out_pair(dt, SH(N));
        if (RUN("cross_entropy", dt, moe_op_cross_entropy(ctx, loss.h, lse.h, xh, th, IGN),
                moe_op_cross_entropy(ctx, loss.d, lse.d, xd, td, IGN))) {
            snprintf(name, sizeof name, "cross_entropy loss [%lld, %lld]%s", (long long)N, (long long)V,
                     shifted ? " unaligned logits" : "");
            check(name, dt, loss.d, loss.h, tol_of(dt, 1e-5));
            snprintf(name, sizeof name, "cross_entropy lse [%lld, %lld]%s", (long long)N, (long long)V,
                     shifted ? " unaligned logits" : "");
            check(name, dt, lse.d, lse.h, tol_of(dt, 1e-5));
        }
        round_through(lse.h, dt);
        moe_tensor *lsed = to_gpu(lse.h, dt);
        pair dx = out_pair(dt, SH(N, V));
        float scale = 1.0f / (float)counted;
        if (RUN("cross_entropy_backward", dt, moe_op_cross_entropy_backward(ctx, dx.h, xh, lse.h, th, IGN, scale),
                moe_op_cross_entropy_backward(ctx, dx.d, xd, lsed, td, IGN, scale))) {
            snprintf(name, sizeof name, "cross_entropy_backward [%lld, %lld]%s", (long long)N, (long long)V,
                     shifted ? " unaligned logits" : "");
            check(name, dt, dx.d, dx.h, dt == MOE_F32 ? 1e-6 : 2e-3);
        }
        /* the fused kernel against the CPU's two ops (out_pair poisons: every element must be written) */
        pair floss = out_pair(dt, SH(N)), flse = out_pair(dt, SH(N)), fdx = out_pair(dt, SH(N, V));
        uint64_t piped0 = 0, piped1 = 0;
        die_if(moe_cuda_xent_pipe_calls(ctx, 0, &piped0) != MOE_OK, "cross-entropy counter");
        if (RUN("cross_entropy_fused", dt, moe_op_cross_entropy_fused(ctx, floss.h, flse.h, fdx.h, xh, th, IGN, scale),
                moe_op_cross_entropy_fused(ctx, floss.d, flse.d, fdx.d, xd, td, IGN, scale))) {
            const char *un = shifted ? " unaligned logits" : "";
            /* the streamed kernel serves bf16 rows of a multiple of 8 elements, at least
             * 4096 of them, where there are more rows than SMs (the sm_90 cards this
             * build runs on have at most 132: the last two configurations) */
            die_if(moe_cuda_xent_pipe_calls(ctx, 0, &piped1) != MOE_OK, "cross-entropy counter");
            const char *off = getenv("MOELAB_XENT_PIPE");
            const int streamed = dt == MOE_BF16 && V % 8 == 0 && V >= 4096 && N >= 270 && !(off && off[0] == '0');
            ok(piped1 - piped0 == (uint64_t)streamed, "cross_entropy_fused [%lld, %lld]%s %s the streamed kernel",
               (long long)N, (long long)V, un, streamed ? "took" : "did not take");
            snprintf(name, sizeof name, "cross_entropy_fused loss [%lld, %lld]%s", (long long)N, (long long)V, un);
            check(name, dt, floss.d, floss.h, tol_of(dt, 1e-5));
            snprintf(name, sizeof name, "cross_entropy_fused lse [%lld, %lld]%s", (long long)N, (long long)V, un);
            check(name, dt, flse.d, flse.h, tol_of(dt, 1e-5));
            /* dlogits against the CPU backward fed the lse the kernel stored: in bf16 the
             * two sides' lse may round one ulp apart (0.06 at lse ~ 8), which moves every
             * probability of the row by ~6%; the separate backward check feeds both sides
             * one lse for the same reason */
            moe_tensor *glse = moe_op_to(ctx, flse.d, MOE_DEVICE_CPU, MOE_F32), *ref = moe_tensor_new_cpu(MOE_F32, SH(N, V));
            die_if(!glse || !ref, "fused lse download");
            die_if(moe_op_cross_entropy_backward(ctx, ref, xh, glse, th, IGN, scale) != MOE_OK, "cpu backward");
            snprintf(name, sizeof name, "cross_entropy_fused dlogits [%lld, %lld]%s", (long long)N, (long long)V, un);
            check(name, dt, fdx.d, ref, dt == MOE_F32 ? 1e-6 : 2e-3);
            moe_tensor_release(glse); moe_tensor_release(ref);
            /* the same bytes as the two device kernels (same lse rounding, same formula) */
            snprintf(name, sizeof name, "cross_entropy_fused dlogits = the two kernels' [%lld, %lld]%s", (long long)N,
                     (long long)V, un);
            pair tl = out_pair(dt, SH(N)), tls = out_pair(dt, SH(N)), tdx = out_pair(dt, SH(N, V));
            die_if(moe_op_cross_entropy(ctx, tl.d, tls.d, xd, td, IGN) != MOE_OK ||
                   moe_op_cross_entropy_backward(ctx, tdx.d, xd, tls.d, td, IGN, scale) != MOE_OK, "two kernels");
            moe_tensor *two = moe_op_to(ctx, tdx.d, MOE_DEVICE_CPU, MOE_F32);
            die_if(!two, "download");
            check(name, dt, fdx.d, two, 0.0);
            moe_tensor_release(two);
            pfree(&tl); pfree(&tls); pfree(&tdx);
        }
        moe_tensor_release(th); moe_tensor_release(td); moe_tensor_release(lsed);
        moe_tensor_release(xh); moe_tensor_release(xd);
        pfree(&x0); pfree(&loss); pfree(&lse); pfree(&dx);
        pfree(&floss); pfree(&flse); pfree(&fdx);
    }
}

/* grad_scale 0: the plain update; 0.37: gradients read scaled (clipping folded into the step) */
static void test_adamw(void) {
    const int64_t n = 4099;
    const float scales[2] = {0.0f, 0.37f};
    for (int k = 0; k < 2; k++) {
        pair p = in_randn(MOE_F32, SH(n)), g = in_randn(MOE_F32, SH(n));
        pair m = in_pair(MOE_F32, SH(n), 0.1f, 0.0f, 0), v = in_pair(MOE_F32, SH(n), 0.1f, 0.01f, 1);
        moe_adamw_cfg cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .step = 3,
                             .grad_scale = scales[k]};
        char name[64];
        snprintf(name, sizeof name, "adamw grad_scale=%g", scales[k]);
        if (RUN(name, MOE_F32, moe_op_adamw(ctx, p.h, g.h, m.h, v.h, &cfg), moe_op_adamw(ctx, p.d, g.d, m.d, v.d, &cfg))) {
            check("adamw params", MOE_F32, p.d, p.h, 1e-5);
            check("adamw m", MOE_F32, m.d, m.h, 1e-5);
            check("adamw v", MOE_F32, v.d, v.h, 1e-5);
        }
        pfree(&p); pfree(&g); pfree(&m); pfree(&v);
    }
    /* bf16 m and v (stochastically rounded with the hash both backends share), f32
     * and bf16 gradients, from element index0 = 1000 of a larger buffer at step 7:
     * the kernels round each operation as the CPU does (no fused multiply-adds),
     * so the params and the moments' bytes equal the CPU's everywhere */
    for (int gi = 0; gi < 2; gi++) {
        moe_dtype gdt = gi ? MOE_BF16 : MOE_F32;
        pair p = in_randn(MOE_F32, SH(n)), g = in_randn(gdt, SH(n));
        pair m = in_pair(MOE_BF16, SH(n), 0.1f, 0.0f, 0), v = in_pair(MOE_BF16, SH(n), 0.1f, 0.01f, 1);
        moe_tensor *gh = moe_op_to(ctx, g.h, MOE_DEVICE_CPU, gdt), *mh = moe_op_to(ctx, m.h, MOE_DEVICE_CPU, MOE_BF16),
                   *vh = moe_op_to(ctx, v.h, MOE_DEVICE_CPU, MOE_BF16);
        die_if(!gh || !mh || !vh, "bf16 host state");
        moe_adamw_cfg cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f,
                             .step = 7, .index0 = 1000};
        char name[96];
        snprintf(name, sizeof name, "adamw bf16 m and v, %s gradients", dtn(gdt));
        if (RUN(name, MOE_F32, moe_op_adamw(ctx, p.h, gh, mh, vh, &cfg), moe_op_adamw(ctx, p.d, g.d, m.d, v.d, &cfg))) {
            check(name, MOE_F32, p.d, p.h, 0.0);
            moe_tensor *mo[2] = {mh, vh}, *md[2] = {m.d, v.d};
            for (int k = 0; k < 2; k++) {
                moe_tensor *a = moe_op_to(ctx, mo[k], MOE_DEVICE_CPU, MOE_F32), *b = moe_op_to(ctx, md[k], MOE_DEVICE_CPU, MOE_F32);
                die_if(!a || !b, "moments back");
                int64_t same = 0, near = 0;
                for (int64_t i = 0; i < n; i++) {
                    float x = moe_f32(a)[i], y = moe_f32(b)[i];
                    same += x == y;
                    near += fabsf(x - y) <= fabsf(x) * (1.0f / 64);
                }
                ok(same == n && near == n, "%s: %s equals the CPU's bytes at %lld of %lld elements, "
                   "within a bf16 step at %lld", name, k ? "v" : "m", (long long)same, (long long)n, (long long)near);
                moe_tensor_release(a); moe_tensor_release(b);
            }
        }
        moe_tensor_release(gh); moe_tensor_release(mh); moe_tensor_release(vh);
        pfree(&p); pfree(&g); pfree(&m); pfree(&v);
    }
}

/* a one-element tensor of dt with value x, written on the host and uploaded */

static moe_tensor *upload_scalar(moe_dtype dt, double x) {
    moe_tensor *h = moe_tensor_new_cpu(dt, 0, NULL);
    die_if(!h || moe_tensor_fill_cpu(h, x) != MOE_OK, "host scalar");
    moe_tensor *d = to_gpu(h, dt);
    moe_tensor_release(h);
    return d;
}

static int64_t step_of(const moe_tensor *step_dev) {
    moe_tensor *h = moe_op_to(ctx, (moe_tensor *)step_dev, MOE_DEVICE_CPU, MOE_I64);
    die_if(!h, "counter download");
    int64_t v = ((const int64_t *)moe_tensor_data(h))[0];
    moe_tensor_release(h);
    return v;
}

/* Runs with their own lr and weight decay in one update (ops.h: cfg.runs)
 * against the CPU's run-by-run loop: gaps between runs (a 5-element run, 11
 * untouched elements before the next) and runs ending off the groups of 8,
 * the last at the buffer's end (4999 elements). f32 state and gradients; then
 * bf16 state, gradients and compute copy with the device's step and lr. The
 * same bytes everywhere, the gaps as they were. */
static void test_adamw_runs(void) {
    const int64_t n = 4999;
    const moe_adamw_run runs[4] = {{0, 1003, 1e-2f, 0.1f}, {1008, 1013, 2e-2f, 0.0f}, {1024, 3001, 5e-3f, 0.2f},
                                   {3008, 4999, 1e-2f, 0.0f}};
    moe_tensor *step_dev = upload_scalar(MOE_I64, 6), *lr_dev = upload_scalar(MOE_F32, 0.5);
    for (int k = 0; k < 2; k++) {
        moe_dtype sdt = k ? MOE_BF16 : MOE_F32;
        pair p = in_randn(MOE_F32, SH(n)), g = in_randn(sdt, SH(n)), c = in_randn(MOE_BF16, SH(n));
        pair m = in_pair(sdt, SH(n), 0.1f, 0.0f, 0), v = in_pair(sdt, SH(n), 0.1f, 0.01f, 1);
        moe_tensor *gh = moe_op_to(ctx, g.h, MOE_DEVICE_CPU, sdt), *mh = moe_op_to(ctx, m.h, MOE_DEVICE_CPU, sdt),
                   *vh = moe_op_to(ctx, v.h, MOE_DEVICE_CPU, sdt), *chh = moe_op_to(ctx, c.h, MOE_DEVICE_CPU, MOE_BF16);
        moe_tensor *p0 = moe_tensor_new_cpu(MOE_F32, SH(n));   /* the params before: a copy, not an alias */
        die_if(!gh || !mh || !vh || !chh || !p0, "adamw runs host copies");
        memcpy(moe_f32(p0), moe_f32(p.h), (size_t)n * sizeof(float));
        moe_adamw_cfg hc = {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .step = 7, .index0 = 96, .n_runs = 4,
                            .runs = runs, .compute = k ? chh : NULL};
        moe_adamw_cfg dc = hc;
        dc.compute = k ? c.d : NULL;
        moe_adamw_run druns[4];
        memcpy(druns, runs, sizeof druns);
        if (k) {   /* the device's step (6 + 1) and lr (0.5 x twice the runs' lr) */
            for (int r = 0; r < 4; r++) druns[r].lr = 2 * runs[r].lr;
            dc.runs = druns;
            dc.step = 0;
            dc.step_dev = step_dev;
            dc.lr_dev = lr_dev;
        }
        char name[96];
        snprintf(name, sizeof name, "adamw runs, %s state and gradients%s", dtn(sdt), k ? ", compute copy, device step" : "");
        if (RUN(name, MOE_F32, moe_op_adamw(ctx, p.h, gh, mh, vh, &hc), moe_op_adamw(ctx, p.d, g.d, m.d, v.d, &dc))) {
            ok(same_bytes(p.d, p.h) && same_bytes(m.d, mh) && same_bytes(v.d, vh), "%s: the CPU's bytes", name);
            if (k) ok(same_bytes(c.d, chh), "%s: the compute copy is the CPU's bytes", name);
            int64_t gap_same = 0, gap_n = 0, run_moved = 0;
            for (int64_t i = 0; i < n; i++) {
                int in = 0;
                for (int r = 0; r < 4; r++) in |= i >= runs[r].lo && i < runs[r].hi;
                float now = moe_f32(p.h)[i], was = moe_f32(p0)[i];
                if (in) run_moved += now != was;
                else { gap_n++; gap_same += now == was; }
            }
            ok(gap_n == 23 && gap_same == gap_n && run_moved > n - 32,
               "%s: the %lld elements between runs untouched (%lld), the runs' updated (%lld)", name, (long long)gap_n,
               (long long)gap_same, (long long)run_moved);
        }
        moe_tensor_release(gh); moe_tensor_release(mh); moe_tensor_release(vh); moe_tensor_release(chh);
        moe_tensor_release(p0);
        pfree(&p); pfree(&g); pfree(&c); pfree(&m); pfree(&v);
    }
    moe_tensor_release(step_dev); moe_tensor_release(lr_dev);
}

/* The split master (ops.h, moe_master_hi) against the CPU: the planes of
 * random values and of the edges (ties below even and odd bf16s, the largest
 * finite values, infinities, NaNs), through the vector kernels and, one
 * element off the 16-byte grid, the element ones; the join back; then AdamW
 * on the planes with runs (gaps, partial groups), f32 and bf16 moments: the
 * CPU's bytes in both planes and in m and v. */
static moe_tensor *new_dev(moe_dtype dt, int64_t n) {
    moe_tensor *t = moe_tensor_new(ctx, dt, 1, &n, GPU);
    die_if(!t, "device tensor");
    return t;
}

static void test_master_split(void) {
    const int64_t n = 4999;
    moe_tensor *src = host_randn(SH(n), 3.0f, 0.0f, 0);
    uint32_t *u = moe_tensor_data(src);
    const uint32_t edge[] = {0x3f808000u, 0x3f818000u, 0xbf808000u, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u,
                             0x7fc00000u, 0xffc00001u, 0x00000001u, 0x80000000u, 0x3fffffffu};
    for (size_t i = 0; i < sizeof edge / sizeof edge[0]; i++) { u[i] = edge[i]; u[n - 1 - i] = edge[i]; }
    moe_tensor *hh = moe_tensor_new_cpu(MOE_BF16, SH(n)), *lh = moe_tensor_new_cpu(MOE_I16, SH(n));
    moe_tensor *jh = moe_tensor_new_cpu(MOE_F32, SH(n));
    die_if(!hh || !lh || !jh || moe_op_master_split(ctx, hh, lh, src) != MOE_OK ||
           moe_op_master_join(ctx, jh, hh, lh) != MOE_OK, "cpu planes");
    moe_tensor *sd = to_gpu(src, MOE_F32), *hd = new_dev(MOE_BF16, n), *ld = new_dev(MOE_I16, n), *jd = new_dev(MOE_F32, n);
    moe_status s = moe_op_master_split(ctx, hd, ld, sd);
    if (s == MOE_OK) s = moe_op_master_join(ctx, jd, hd, ld);
    ok(s == MOE_OK && same_bytes(hd, hh) && same_bytes(ld, lh) && same_bytes(jd, jh),
       "master split and join [%lld], 16-byte kernels: the CPU's bytes in both planes and back (%s)", (long long)n,
       moe_last_error());
    /* one element in: no 16-byte accesses */
    moe_tensor *so = moe_tensor_narrow(sd, 0, 1, n - 1), *ho = moe_tensor_narrow(hd, 0, 1, n - 1),
               *lo = moe_tensor_narrow(ld, 0, 1, n - 1), *jo = moe_tensor_narrow(jd, 0, 1, n - 1);
    die_if(!so || !ho || !lo || !jo, "views");
    die_if(moe_op_fill(ctx, hd, 0.0) != MOE_OK || moe_op_fill(ctx, ld, 0.0) != MOE_OK || moe_op_fill(ctx, jd, 0.0),
           "clear");
    s = moe_op_master_split(ctx, ho, lo, so);
    if (s == MOE_OK) s = moe_op_master_join(ctx, jo, ho, lo);
    moe_tensor *hho = moe_tensor_narrow(hh, 0, 1, n - 1), *lho = moe_tensor_narrow(lh, 0, 1, n - 1),
               *jho = moe_tensor_narrow(jh, 0, 1, n - 1);
    ok(s == MOE_OK && same_bytes(ho, hho) && same_bytes(lo, lho) && same_bytes(jo, jho),
       "master split and join [%lld] one element off the grid: the CPU's bytes (%s)", (long long)(n - 1),
       moe_last_error());
    moe_tensor *views[] = {so, ho, lo, jo, hho, lho, jho};
    for (size_t i = 0; i < sizeof views / sizeof views[0]; i++) moe_tensor_release(views[i]);
    /* AdamW on the planes */
    const moe_adamw_run runs[3] = {{0, 1003, 1e-2f, 0.1f}, {1008, 1013, 2e-2f, 0.0f}, {1024, 4999, 5e-3f, 0.2f}};
    for (int k = 0; k < 2; k++) {
        moe_dtype sdt = k ? MOE_BF16 : MOE_F32;
        moe_tensor *p = host_randn(SH(n), 1.0f, 0.0f, 0);
        die_if(moe_op_master_split(ctx, hh, lh, p) != MOE_OK, "cpu split");
        moe_tensor *hd2 = to_gpu(hh, MOE_BF16), *ld2 = to_gpu(lh, MOE_I16);
        pair g = in_randn(MOE_BF16, SH(n));
        pair m = in_pair(sdt, SH(n), 0.1f, 0.0f, 0), v = in_pair(sdt, SH(n), 0.1f, 0.01f, 1);
        moe_tensor *gh = moe_op_to(ctx, g.h, MOE_DEVICE_CPU, MOE_BF16), *mh = moe_op_to(ctx, m.h, MOE_DEVICE_CPU, sdt),
                   *vh = moe_op_to(ctx, v.h, MOE_DEVICE_CPU, sdt);
        die_if(!gh || !mh || !vh, "host state");
        moe_adamw_cfg hc = {.beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .step = 5, .index0 = 64, .n_runs = 3,
                            .runs = runs, .grad_scale = 0.75f, .lo = lh};
        moe_adamw_cfg dc = hc;
        dc.lo = ld2;
        s = moe_op_adamw(ctx, hh, gh, mh, vh, &hc);
        moe_status sdv = moe_op_adamw(ctx, hd2, g.d, m.d, v.d, &dc);
        ok(s == MOE_OK && sdv == MOE_OK && same_bytes(hd2, hh) && same_bytes(ld2, lh) && same_bytes(m.d, mh) &&
               same_bytes(v.d, vh),
           "adamw on the split master, runs, %s moments: the CPU's bytes in both planes, m and v (%s)", dtn(sdt),
           moe_last_error());
        moe_tensor_release(p); moe_tensor_release(hd2); moe_tensor_release(ld2);
        moe_tensor_release(gh); moe_tensor_release(mh); moe_tensor_release(vh);
        pfree(&g); pfree(&m); pfree(&v);
    }
    moe_tensor *all[] = {src, hh, lh, jh, sd, hd, ld, jd};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

/* The step and learning rate held by the device (ops.h: step_dev = 6, so step
 * 7; lr_dev = 0.5 times cfg.lr = 2e-2) against the CPU's host step 7 and lr
 * 1e-2, and against the GPU's own host-step kernels: f32 and bf16 moments,
 * 1003 elements (the vector kernel's 1000 and a tail of 3) from index0 = 40,
 * the same bytes everywhere (bias corrections in double from the same
 * formula). Then the counter's advance with a finite and a non-finite guard. */
static void test_adamw_device(void) {
    const int64_t n = 1003;
    moe_tensor *step_dev = upload_scalar(MOE_I64, 6), *lr_dev = upload_scalar(MOE_F32, 0.5);
    const moe_dtype sdts[2] = {MOE_F32, MOE_BF16};
    for (int k = 0; k < 2; k++) {
        moe_dtype sdt = sdts[k];
        pair p = in_randn(MOE_F32, SH(n)), g = in_randn(MOE_F32, SH(n));
        pair m = in_pair(sdt, SH(n), 0.1f, 0.0f, 0), v = in_pair(sdt, SH(n), 0.1f, 0.01f, 1);
        moe_tensor *mh = moe_op_to(ctx, m.h, MOE_DEVICE_CPU, sdt), *vh = moe_op_to(ctx, v.h, MOE_DEVICE_CPU, sdt);
        moe_tensor *p2 = moe_op_to(ctx, p.d, GPU, MOE_F32), *m2 = moe_op_to(ctx, m.d, GPU, sdt),
                   *v2 = moe_op_to(ctx, v.d, GPU, sdt);
        die_if(!mh || !vh || !p2 || !m2 || !v2, "adamw state copies");
        moe_adamw_cfg hc = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.999f, .eps = 1e-8f, .weight_decay = 0.1f,
                            .step = 7, .index0 = 40};
        moe_adamw_cfg dc = hc;
        dc.lr = 2e-2f;
        dc.step = 0;   /* not read */
        dc.step_dev = step_dev;
        dc.lr_dev = lr_dev;
        char name[96];
        snprintf(name, sizeof name, "adamw step_dev/lr_dev, %s moments, %lld elements", dtn(sdt), (long long)n);
        if (RUN(name, MOE_F32, moe_op_adamw(ctx, p.h, g.h, mh, vh, &hc), moe_op_adamw(ctx, p.d, g.d, m.d, v.d, &dc))) {
            check(name, MOE_F32, p.d, p.h, 0.0);
            ok(same_bytes(m.d, mh) && same_bytes(v.d, vh), "%s: m and v are the CPU's bytes", name);
            die_if(moe_op_adamw(ctx, p2, g.d, m2, v2, &hc) != MOE_OK, "adamw with the host's step on the GPU");
            ok(same_bytes(p.d, p2) && same_bytes(m.d, m2) && same_bytes(v.d, v2),
               "%s: the GPU's host-step update gives the same bytes", name);
            ok(step_of(step_dev) == 6, "%s: the update leaves step_dev as it was", name);
        }
        moe_tensor_release(mh); moe_tensor_release(vh);
        moe_tensor_release(p2); moe_tensor_release(m2); moe_tensor_release(v2);
        pfree(&p); pfree(&g); pfree(&m); pfree(&v);
    }
    moe_tensor *sumsq = upload_scalar(MOE_F32, 4.0), *fine = upload_scalar(MOE_F32, 1.5);
    moe_tensor *bad = upload_scalar(MOE_F32, NAN);
    moe_adamw_cfg pass = {.clip_sumsq = sumsq, .guard = fine, .clip_max = 1.0};
    moe_adamw_cfg skip = {.clip_sumsq = sumsq, .guard = bad, .clip_max = 1.0}, plain = {0};
    moe_status s = moe_op_adamw_advance(ctx, step_dev, &pass);
    int64_t v1 = s == MOE_OK ? step_of(step_dev) : -1;
    if (s == MOE_OK) s = moe_op_adamw_advance(ctx, step_dev, &skip);
    int64_t v2 = s == MOE_OK ? step_of(step_dev) : -1;
    if (s == MOE_OK) s = moe_op_adamw_advance(ctx, step_dev, &plain);
    int64_t v3 = s == MOE_OK ? step_of(step_dev) : -1;
    ok(s == MOE_OK && v1 == 7 && v2 == 7 && v3 == 8,
       "adamw_advance on cuda: +1 with a finite guard, +0 with a NaN guard, +1 without clipping (%lld %lld %lld; %s)",
       (long long)v1, (long long)v2, (long long)v3, s == MOE_OK ? "ok" : moe_last_error());
    moe_tensor *all[] = {step_dev, lr_dev, sumsq, fine, bad};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

int main(void) {
    gpucheck_begin();

    if (want("copy")) test_copy();
    const moe_dtype dts[] = {MOE_F32, MOE_BF16};
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = dts[k];
        if (want("random")) test_random(dt);
        if (want("fill")) test_fill(dt);
        if (want("gemm")) test_gemm(dt);
        if (want("gemm_grouped")) test_gemm_grouped(dt);
        if (want("binary")) test_binary(dt);
        if (want("unary")) test_unary(dt);
        if (want("axpy")) test_axpy(dt);
        if (want("softmax")) test_softmax(dt);
        if (want("rmsnorm")) test_rmsnorm(dt);
        if (want("swiglu")) test_swiglu(dt);
        if (want("cross_entropy")) test_cross_entropy(dt);
    }
    if (want("adamw")) test_adamw();
    if (want("adamw_device")) test_adamw_device();
    if (want("adamw_runs")) test_adamw_runs();
    if (want("master_split")) test_master_split();
    return gpucheck_end();
}
