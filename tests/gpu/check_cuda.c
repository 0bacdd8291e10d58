/* check_cuda: every CUDA kernel against the CPU backend, through the public
 * moe_op_* API. Fresh normal inputs per check (never zeros), outputs poisoned
 * with NaN before each run so unwritten elements fail. bf16 checks feed the
 * CPU the same bf16-rounded inputs (the CPU computes in f32) and compare the
 * GPU's bf16 result with tolerance 2e-2.
 * Error measure: max |gpu - cpu| / (1 + |cpu|) (printed on every line as
 * "max err"); attention also prints ||gpu - cpu|| / ||cpu|| ("rel l2").
 * Accumulating index ops (scatter_add, index_add, embedding_backward) must
 * match the CPU bit for bit (same order of f32 additions); determinism checks
 * run a kernel twice on the same inputs and compare the bytes.
 * Prints TAP; exit 1 on failure; "1..0 # SKIP no CUDA device" and exit 0
 * without a GPU. Then, unless MOELAB_CHECK_NO_TIMING is set, a short timing
 * section printed as TAP comments ("# attention fwd ...: X ms, Y TFLOP/s"). */
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

static int same_bytes(const moe_tensor *a, const moe_tensor *b);

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
 * too long for the fused kernel to keep in shared memory. */
static void test_cross_entropy(moe_dtype dt) {
    static const int64_t cfg[][2] = {{13, 1031}, {9, 20011}, {7, 1029}, {3, 120011}};
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
        if (RUN("cross_entropy_fused", dt, moe_op_cross_entropy_fused(ctx, floss.h, flse.h, fdx.h, xh, th, IGN, scale),
                moe_op_cross_entropy_fused(ctx, floss.d, flse.d, fdx.d, xd, td, IGN, scale))) {
            const char *un = shifted ? " unaligned logits" : "";
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


/* ---- helpers for the new checks ---- */

/* a host copy of the bytes of any tensor (caller frees) */
static void *bytes_of(const moe_tensor *t, size_t *n) {
    moe_tensor *h = moe_op_to(ctx, (moe_tensor *)t, MOE_DEVICE_CPU, t->dtype);
    die_if(!h, "download");
    *n = (size_t)moe_tensor_numel(h) * moe_dtype_size(h->dtype);
    void *p = malloc(*n ? *n : 1);
    die_if(!p, "host memory");
    memcpy(p, moe_tensor_data(h), *n);
    moe_tensor_release(h);
    return p;
}

static int same_bytes(const moe_tensor *a, const moe_tensor *b) {
    size_t na, nb;
    void *pa = bytes_of(a, &na), *pb = bytes_of(b, &nb);
    int same = na == nb && !memcmp(pa, pb, na);
    free(pa);
    free(pb);
    return same;
}

/* i64 index pair with values in [0, n) (host and device) */
typedef struct { moe_tensor *h, *d; } ipair;
static ipair idx_pair(int nd, const int64_t *shape, int64_t n) {
    ipair p;
    p.h = moe_tensor_new_cpu(MOE_I64, nd, shape);
    die_if(!p.h, "index tensor");
    int64_t *v = moe_tensor_data(p.h);
    uint64_t st = seed++ * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t i = 0; i < moe_tensor_numel(p.h); i++) {
        st ^= st << 13; st ^= st >> 7; st ^= st << 17;
        v[i] = (int64_t)(st % (uint64_t)n);
    }
    p.d = moe_op_to(ctx, p.h, GPU, MOE_I64);
    die_if(!p.d, "index upload");
    return p;
}
static void ifree(ipair *p) {
    moe_tensor_release(p->h);
    moe_tensor_release(p->d);
    p->h = p->d = NULL;
}

/* GPU result equals the CPU's rounded to dt, bit for bit */
static void check_exact(const char *name, moe_dtype dt, const moe_tensor *gpu, moe_tensor *ref) {
    moe_tensor *r = moe_tensor_contiguous_cpu(ref);
    die_if(!r, "contiguous");
    round_through(r, dt);
    check(name, dt, gpu, r, 0.0);
    moe_tensor_release(r);
}

/* ---- reductions ---- */

/* float64 sum of x [R, C] over dim (0 or 1), as an f32 host tensor */
static moe_tensor *sum64(const moe_tensor *x, int dim) {
    int64_t R = x->shape[0], C = x->shape[1], n = dim ? R : C;
    moe_tensor *r = moe_tensor_new_cpu(MOE_F32, 1, &n);
    die_if(!r, "host tensor");
    const float *p = moe_f32(x);
    for (int64_t o = 0; o < n; o++) {
        double acc = 0;
        if (dim) for (int64_t j = 0; j < C; j++) acc += p[o * C + j];
        else for (int64_t j = 0; j < R; j++) acc += p[j * C + o];
        moe_f32(r)[o] = (float)acc;
    }
    return r;
}

static const char *red_names[] = {"sum", "mean", "max", "min"};

static void test_reduce(moe_dtype dt) {
    char name[128];
    /* every op over every dim of a small 3-d tensor (rows, columns, keepdim) */
    pair x = in_randn(dt, SH(5, 37, 11));
    for (int op = 0; op < MOE_NUM_REDUCE; op++)
        for (int dim = -1; dim < 3; dim++) {
            int d = dim < 0 ? 2 : dim;
            int64_t os[2], k = 0;
            for (int i = 0; i < 3; i++) if (i != d) os[k++] = x.h->shape[i];
            pair o = out_pair(dt, 2, os);
            snprintf(name, sizeof name, "reduce %s dim=%d of [5,37,11]", red_names[op], dim);
            if (RUN(name, dt, moe_op_reduce(ctx, op, o.h, x.h, dim), moe_op_reduce(ctx, op, o.d, x.d, dim)))
                check(name, dt, o.d, o.h, tol_of(dt, 2e-6));
            pfree(&o);
        }
    pfree(&x);
    /* long rows, few of them (chunked row path); few columns, long n (chunked column path) */
    const int64_t shapes[3][2] = {{3, 50001}, {20001, 3}, {4000, 300}};
    for (int v = 0; v < 3; v++) {
        pair y = in_randn(dt, 2, shapes[v]);
        for (int op = 0; op < MOE_NUM_REDUCE; op++)
            for (int dim = 0; dim < 2; dim++) {
                int64_t os[1] = {shapes[v][1 - dim]};
                pair o = out_pair(dt, 1, os);
                snprintf(name, sizeof name, "reduce %s dim=%d of [%lld,%lld]", red_names[op], dim,
                         (long long)shapes[v][0], (long long)shapes[v][1]);
                /* the CPU sums a column sequentially in f32 (error growing with n), the GPU in chunks
                 * whose partials are then summed in order: against the CPU allow 5e-4, against a
                 * float64 reference 5e-5 */
                int sum = op == MOE_RED_SUM || op == MOE_RED_MEAN;
                if (RUN(name, dt, moe_op_reduce(ctx, op, o.h, y.h, dim), moe_op_reduce(ctx, op, o.d, y.d, dim)))
                    check(name, dt, o.d, o.h, tol_of(dt, sum ? 5e-4 : 0.0));
                if (op == MOE_RED_SUM) {
                    moe_tensor *r64 = sum64(y.h, dim);
                    snprintf(name, sizeof name, "reduce sum dim=%d of [%lld,%lld] vs float64", dim,
                             (long long)shapes[v][0], (long long)shapes[v][1]);
                    check(name, dt, o.d, r64, tol_of(dt, 5e-5));
                    moe_tensor_release(r64);
                }
                pfree(&o);
            }
        pfree(&y);
    }
    /* reduce_all over 1e6 elements (two-pass), every op */
    pair z = in_randn(dt, SH(1000, 1000));
    for (int op = 0; op < MOE_NUM_REDUCE; op++) {
        pair o = out_pair(dt, 0, NULL);
        snprintf(name, sizeof name, "reduce_all %s of 1e6", red_names[op]);
        if (RUN(name, dt, moe_op_reduce_all(ctx, op, o.h, z.h), moe_op_reduce_all(ctx, op, o.d, z.d)))
            check(name, dt, o.d, o.h, tol_of(dt, 1e-5));
        pfree(&o);
    }
    pfree(&z);
    /* sum_to (the backward of broadcasting) goes through reduce */
    pair g = in_randn(dt, SH(6, 5, 7)), st = out_pair(dt, SH(5, 1));
    if (RUN("sum_to [6,5,7] -> [5,1]", dt, moe_op_sum_to(ctx, st.h, g.h), moe_op_sum_to(ctx, st.d, g.d)))
        check("sum_to [6,5,7] -> [5,1]", dt, st.d, st.h, tol_of(dt, 1e-5));
    pfree(&g); pfree(&st);
}

/* ---- topk ---- */

static void test_topk(moe_dtype dt) {
    const struct { int64_t rows, n; int k; int ties; } cs[] = {
        {257, 8, 2, 0}, {100, 64, 8, 0}, {33, 64, 6, 1}, {5, 1000, 16, 1}, {3, 10000, 5, 1}, {4, 37, 37, 1}};
    char name[128];
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        pair x = in_randn(dt, SH(cs[c].rows, cs[c].n));
        if (cs[c].ties) {   /* few distinct values: ties must go to the lower index */
            float *p = moe_f32(x.h);
            for (int64_t i = 0; i < moe_tensor_numel(x.h); i++) p[i] = floorf(p[i] * 2.0f) * 0.5f;
            moe_tensor_release(x.d);
            x.d = to_gpu(x.h, dt);
        }
        pair v = out_pair(dt, SH(cs[c].rows, cs[c].k));
        moe_tensor *ih = moe_tensor_new_cpu(MOE_I64, SH(cs[c].rows, cs[c].k));
        moe_tensor *id = moe_tensor_new(ctx, MOE_I64, SH(cs[c].rows, cs[c].k), GPU);
        die_if(!ih || !id, "topk indices");
        snprintf(name, sizeof name, "topk rows=%lld n=%lld k=%d%s", (long long)cs[c].rows, (long long)cs[c].n, cs[c].k,
                 cs[c].ties ? " (ties)" : "");
        if (RUN(name, dt, moe_op_topk(ctx, v.h, ih, x.h, cs[c].k), moe_op_topk(ctx, v.d, id, x.d, cs[c].k))) {
            check(name, dt, v.d, v.h, 0.0);
            moe_tensor *ib = moe_op_to(ctx, id, MOE_DEVICE_CPU, MOE_I64);
            die_if(!ib, "download");
            int same = !memcmp(moe_tensor_data(ib), moe_tensor_data(ih), (size_t)moe_tensor_numel(ih) * 8);
            ok(same, "%s indices identical to the cpu's [%s]", name, dtn(dt));
            moe_tensor_release(ib);
        }
        moe_tensor_release(ih); moe_tensor_release(id);
        pfree(&x); pfree(&v);
    }
}

/* ---- gather / scatter_add ---- */

static void test_gather_scatter(moe_dtype dt) {
    const int64_t R = 6, N = 50;
    const int64_t ms[] = {7, 100};   /* scan path (m <= 32) and sort path, both with duplicates */
    char name[128];
    for (int v = 0; v < 2; v++) {
        int64_t M = ms[v];
        pair x = in_randn(dt, SH(R, N)), o = out_pair(dt, SH(R, M));
        ipair ix = idx_pair(SH(R, M), N);
        snprintf(name, sizeof name, "gather m=%lld", (long long)M);
        if (RUN(name, dt, moe_op_gather(ctx, o.h, x.h, ix.h), moe_op_gather(ctx, o.d, x.d, ix.d)))
            check(name, dt, o.d, o.h, 0.0);
        pair dst = in_randn(dt, SH(R, N)), src = in_randn(dt, SH(R, M));
        snprintf(name, sizeof name, "scatter_add m=%lld (bit-exact: same order of f32 adds)", (long long)M);
        if (RUN(name, dt, moe_op_scatter_add(ctx, dst.h, ix.h, src.h), moe_op_scatter_add(ctx, dst.d, ix.d, src.d)))
            check_exact(name, dt, dst.d, dst.h);
        pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
    }
}

/* ---- index_select / index_add ---- */

static void test_index_select_add(moe_dtype dt) {
    const int64_t widths[] = {33, 64, 1};   /* unaligned rows, 16-byte rows, scalars */
    char name[128];
    for (int v = 0; v < 3; v++) {
        int64_t N = 40, M = 300, W = widths[v];
        pair x = in_randn(dt, SH(N, W)), o = out_pair(dt, SH(M, W));
        ipair ix = idx_pair(SH(M), N);
        snprintf(name, sizeof name, "index_select [%lld,%lld] m=%lld", (long long)N, (long long)W, (long long)M);
        if (RUN(name, dt, moe_op_index_select(ctx, o.h, x.h, ix.h), moe_op_index_select(ctx, o.d, x.d, ix.d)))
            check(name, dt, o.d, o.h, 0.0);
        pair dst = in_randn(dt, SH(N, W)), src = in_randn(dt, SH(M, W));
        snprintf(name, sizeof name, "index_add [%lld,%lld] m=%lld (bit-exact)", (long long)N, (long long)W, (long long)M);
        if (RUN(name, dt, moe_op_index_add(ctx, dst.h, ix.h, src.h), moe_op_index_add(ctx, dst.d, ix.d, src.d)))
            check_exact(name, dt, dst.d, dst.h);
        pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
    }
    /* 3-d rows: x [N, 3, 5] */
    pair x = in_randn(dt, SH(9, 3, 5)), o = out_pair(dt, SH(20, 3, 5));
    pair dst = in_randn(dt, SH(9, 3, 5)), src = in_randn(dt, SH(20, 3, 5));
    ipair ix = idx_pair(SH(20), 9);
    if (RUN("index_select 3-d", dt, moe_op_index_select(ctx, o.h, x.h, ix.h), moe_op_index_select(ctx, o.d, x.d, ix.d)))
        check("index_select 3-d", dt, o.d, o.h, 0.0);
    if (RUN("index_add 3-d", dt, moe_op_index_add(ctx, dst.h, ix.h, src.h), moe_op_index_add(ctx, dst.d, ix.d, src.d)))
        check_exact("index_add 3-d (bit-exact)", dt, dst.d, dst.h);
    pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
}

static void test_embedding(moe_dtype dt) {
    const int64_t V = 97, D = 64;
    pair tab = in_randn(dt, SH(V, D)), o = out_pair(dt, SH(4, 33, D));
    ipair ids = idx_pair(SH(4, 33), V);
    if (RUN("embedding", dt, moe_op_embedding(ctx, o.h, tab.h, ids.h), moe_op_embedding(ctx, o.d, tab.d, ids.d)))
        check("embedding", dt, o.d, o.h, 0.0);
    pair dtab = in_randn(dt, SH(V, D)), g = in_randn(dt, SH(4, 33, D));
    if (RUN("embedding_backward", dt, moe_op_embedding_backward(ctx, dtab.h, g.h, ids.h),
            moe_op_embedding_backward(ctx, dtab.d, g.d, ids.d)))
        check_exact("embedding_backward (accumulated, bit-exact)", dt, dtab.d, dtab.h);
    pfree(&tab); pfree(&o); pfree(&dtab); pfree(&g); ifree(&ids);
}

/* ---- layernorm ---- */

static void test_layernorm(moe_dtype dt) {
    const int64_t R = 3, T = 7, D = 301;
    /* bf16 data with f32 statistics, and (bf16 only) with bf16 statistics */
    for (int sv = 0; sv < (dt == MOE_F32 ? 1 : 2); sv++) {
        moe_dtype sdt = sv ? dt : MOE_F32;
        for (int bias = 0; bias < 2; bias++) {
            char name[128], tag[64];
            snprintf(tag, sizeof tag, "%s, stats %s", bias ? "bias" : "no bias", dtn(sdt));
            pair x = in_pair(dt, SH(R, T, D), 1.5f, 0.7f, 0), w = in_pair(dt, SH(D), 0.2f, 1.0f, 0);
            pair b = in_randn(dt, SH(D));
            pair y = out_pair(dt, SH(R, T, D)), mean = out_pair(sdt, SH(R, T)), rstd = out_pair(sdt, SH(R * T));
            snprintf(name, sizeof name, "layernorm (%s)", tag);
            if (RUN(name, dt, moe_op_layernorm(ctx, y.h, mean.h, rstd.h, x.h, w.h, bias ? b.h : NULL, 1e-5f),
                    moe_op_layernorm(ctx, y.d, mean.d, rstd.d, x.d, w.d, bias ? b.d : NULL, 1e-5f))) {
                snprintf(name, sizeof name, "layernorm y (%s)", tag);
                check(name, dt, y.d, y.h, tol_of(dt, 1e-5));
                snprintf(name, sizeof name, "layernorm mean (%s)", tag);
                check(name, sdt, mean.d, mean.h, tol_of(sdt, 1e-6));
                snprintf(name, sizeof name, "layernorm rstd (%s)", tag);
                check(name, sdt, rstd.d, rstd.h, tol_of(sdt, 1e-5));
            }
            round_through(mean.h, sdt);
            round_through(rstd.h, sdt);
            moe_tensor *md = to_gpu(mean.h, sdt), *rd = to_gpu(rstd.h, sdt);
            pair dy = in_randn(dt, SH(R, T, D)), dx = out_pair(dt, SH(R, T, D));
            pair dw = in_randn(dt, SH(D)), db = in_randn(dt, SH(D));
            snprintf(name, sizeof name, "layernorm_backward (%s)", tag);
            if (RUN(name, dt, moe_op_layernorm_backward(ctx, dx.h, dw.h, bias ? db.h : NULL, dy.h, x.h, w.h, mean.h, rstd.h),
                    moe_op_layernorm_backward(ctx, dx.d, dw.d, bias ? db.d : NULL, dy.d, x.d, w.d, md, rd))) {
                snprintf(name, sizeof name, "layernorm_backward dx (%s)", tag);
                check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
                snprintf(name, sizeof name, "layernorm_backward dw accumulated (%s)", tag);
                check(name, dt, dw.d, dw.h, tol_of(dt, 2e-5));
                snprintf(name, sizeof name, "layernorm_backward db accumulated (%s)", tag);
                check(name, dt, db.d, db.h, tol_of(dt, 2e-5));
            }
            moe_tensor_release(md); moe_tensor_release(rd);
            pfree(&x); pfree(&w); pfree(&b); pfree(&y); pfree(&mean); pfree(&rstd);
            pfree(&dy); pfree(&dx); pfree(&dw); pfree(&db);
        }
    }
}

/* ---- rope ---- */

static void test_rope(moe_dtype dt) {
    const int64_t pos[] = {0, 5, 100000};
    char name[128];
    for (int v = 0; v < 3; v++) {
        pair x = in_randn(dt, SH(2, 9, 3, 64)), o = out_pair(dt, SH(2, 9, 3, 64)), back = out_pair(dt, SH(2, 9, 3, 64));
        snprintf(name, sizeof name, "rope pos_offset=%lld", (long long)pos[v]);
        if (RUN(name, dt, moe_op_rope(ctx, o.h, x.h, pos[v], 10000.0f, 0), moe_op_rope(ctx, o.d, x.d, pos[v], 10000.0f, 0)))
            check(name, dt, o.d, o.h, tol_of(dt, 2e-6));
        snprintf(name, sizeof name, "rope inverse pos_offset=%lld", (long long)pos[v]);
        if (RUN(name, dt, moe_op_rope(ctx, back.h, o.h, pos[v], 10000.0f, 1),
                moe_op_rope(ctx, back.d, o.d, pos[v], 10000.0f, 1))) {
            check(name, dt, back.d, back.h, tol_of(dt, 2e-6));
            snprintf(name, sizeof name, "rope then inverse gives x back, pos_offset=%lld", (long long)pos[v]);
            check(name, dt, back.d, x.h, tol_of(dt, 1e-5) * (dt == MOE_F32 ? 1 : 1.5));
        }
        pfree(&x); pfree(&o); pfree(&back);
    }
    /* in place (out aliases x), odd head dim and theta */
    pair x = in_randn(dt, SH(1, 5, 2, 30));
    if (RUN("rope in place D=30 theta=500", dt, moe_op_rope(ctx, x.h, x.h, 3, 500.0f, 0), moe_op_rope(ctx, x.d, x.d, 3, 500.0f, 0)))
        check("rope in place D=30 theta=500", dt, x.d, x.h, tol_of(dt, 2e-6));
    pfree(&x);
    /* the vector path's shapes: D/2 = 16, 24 (vectors for both dtypes), 20 (f32 vectors, bf16 pairs);
     * B=7, T=200: several batch rows per block, the last chunk partial; [8,300,16,64] in place:
     * several vectors per thread (the next one loaded before this one is written) */
    static const int64_t cfg[][5] = {{7, 200, 1, 32, 0}, {2, 9, 3, 48, 0}, {2, 9, 2, 40, 0}, {8, 300, 16, 64, 1}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t B = cfg[c][0], T = cfg[c][1], H = cfg[c][2], D = cfg[c][3];
        const int inplace = (int)cfg[c][4];
        pair xx = in_randn(dt, SH(B, T, H, D)), o = out_pair(dt, SH(B, T, H, D));
        moe_tensor *oh = inplace ? xx.h : o.h, *od = inplace ? xx.d : o.d;
        snprintf(name, sizeof name, "rope [%lld,%lld,%lld,%lld]%s pos_offset=7", (long long)B, (long long)T,
                 (long long)H, (long long)D, inplace ? " in place" : "");
        if (RUN(name, dt, moe_op_rope(ctx, oh, xx.h, 7, 10000.0f, 0), moe_op_rope(ctx, od, xx.d, 7, 10000.0f, 0)))
            check(name, dt, od, oh, tol_of(dt, 2e-6));
        pfree(&xx); pfree(&o);
    }
}

/* RMSNorm over [B, T, H*D] then rope per head, forward and backward, against the
 * CPU's two ops: the fused kernel's shapes (bf16 D=64 with 4 vectors a lane as in
 * the step model, D=128, one vector a lane, B=11 > the 8 warps of a block), and
 * shapes it leaves to the two ops (D=48: D/N does not divide 32; 3 heads of 64:
 * not whole vectors per lane). The backward also with beta 1 (adding into dx)
 * and without dw. */
/* The CPU reference of the backward with the GPU's rounding: the inverse-rotated
 * gradient is stored in dt before the norm's backward reads it (as the two ops
 * store it on the GPU; f32 on the CPU would drift from it over many rows of dw). */
static moe_status ref_norm_rope_bwd(moe_dtype dt, moe_tensor *dx, moe_tensor *dw, moe_tensor *dy, moe_tensor *x,
                                    moe_tensor *w, moe_tensor *rstd, int64_t H, int64_t pos, float beta) {
    int64_t B = x->shape[0], T = x->shape[1], D = x->shape[2] / H;
    moe_tensor *g = moe_tensor_new_cpu(MOE_F32, SH(B, T, H * D));
    moe_tensor *g4 = moe_tensor_view(g, SH(B, T, H, D)), *dy4 = moe_tensor_view(dy, SH(B, T, H, D));
    die_if(!g || !g4 || !dy4, "reference tensors");
    moe_status s = moe_op_rope(ctx, g4, dy4, pos, 10000.0f, 1);
    round_through(g, dt);
    if (s == MOE_OK) s = moe_op_rmsnorm_backward_beta(ctx, dx, dw, g, x, w, rstd, beta);
    moe_tensor_release(g4); moe_tensor_release(dy4); moe_tensor_release(g);
    return s;
}

static uint64_t norm_rope_fused(void) {
    uint64_t n = 0;
    die_if(moe_cuda_norm_rope_fused_calls(ctx, 0, &n) != MOE_OK, "fused counter");
    return n;
}

/* B, T, heads, D, the first position, and whether the fused kernels take the
 * shape (1) or run the two ops (-1: D 48 does not split a warp evenly, 3 heads
 * of 64 are not a whole number of 16-byte vectors per lane), in both dtypes */
static void test_rmsnorm_rope(moe_dtype dt) {
    static const int64_t cfg[][6] = {{8, 33, 16, 64, 0, 1}, {2, 17, 8, 128, 5, 1}, {11, 5, 4, 64, 1000, 1},
                                     {2, 9, 4, 48, 3, -1}, {2, 7, 3, 64, 0, -1}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t B = cfg[c][0], T = cfg[c][1], H = cfg[c][2], D = cfg[c][3], n = H * D, P = cfg[c][4];
        char name[160], shp[96];
        snprintf(shp, sizeof shp, "[%lld,%lld,%lld x %lld] from position %lld", (long long)B, (long long)T, (long long)H,
                 (long long)D, (long long)P);
        const uint64_t f0 = norm_rope_fused();
        pair x = in_randn(dt, SH(B, T, n)), w = in_pair(dt, SH(n), 0.2f, 1.0f, 0);
        pair y = out_pair(dt, SH(B, T, n)), rstd = out_pair(dt, SH(B, T));
        snprintf(name, sizeof name, "rmsnorm_rope %s", shp);
        if (RUN(name, dt, moe_op_rmsnorm_rope(ctx, y.h, rstd.h, x.h, w.h, 1e-5f, H, P, 10000.0f),
                moe_op_rmsnorm_rope(ctx, y.d, rstd.d, x.d, w.d, 1e-5f, H, P, 10000.0f))) {
            check(name, dt, y.d, y.h, tol_of(dt, 2e-5));
            snprintf(name, sizeof name, "rmsnorm_rope rstd %s", shp);
            check(name, dt, rstd.d, rstd.h, tol_of(dt, 1e-5));
        }
        round_through(rstd.h, dt);
        moe_tensor *rd = to_gpu(rstd.h, dt);
        for (int mode = 0; mode < 3; mode++) {   /* 0: with dw; 1: beta 1 with dw; 2: no dw */
            pair dy = in_randn(dt, SH(B, T, n)), dw = in_randn(dt, SH(n));
            pair dx = mode == 1 ? in_randn(dt, SH(B, T, n)) : out_pair(dt, SH(B, T, n));
            float beta = mode == 1 ? 1.0f : 0.0f;
            snprintf(name, sizeof name, "rmsnorm_rope_backward %s%s", shp,
                     mode == 1 ? " beta 1" : mode == 2 ? " no dw" : "");
            if (RUN(name, dt, ref_norm_rope_bwd(dt, dx.h, mode == 2 ? NULL : dw.h, dy.h, x.h, w.h, rstd.h, H, P, beta),
                    moe_op_rmsnorm_rope_backward(ctx, dx.d, mode == 2 ? NULL : dw.d, dy.d, x.d, w.d, rd, H, P, 10000.0f,
                                                 beta))) {
                check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
                if (mode != 2) {
                    snprintf(name, sizeof name, "rmsnorm_rope_backward dw (accumulated) %s%s", shp,
                             mode == 1 ? " beta 1" : "");
                    check(name, dt, dw.d, dw.h, tol_of(dt, B * T > 1000 ? 1e-4 : 2e-5));
                }
            }
            pfree(&dy); pfree(&dw); pfree(&dx);
        }
        moe_tensor_release(rd);
        /* the forward and three backwards: all four fused where the shape allows, none elsewhere */
        const uint64_t used = norm_rope_fused() - f0;
        const int want = cfg[c][5] > 0;
        ok(used == (uint64_t)(want ? 4 : 0), "rmsnorm_rope %s [%s]: %llu of 4 calls fused (want %d)", shp, dtn(dt),
           (unsigned long long)used, want ? 4 : 0);
        pfree(&x); pfree(&w); pfree(&y); pfree(&rstd);
    }
}

/* ---- attention ---- */

typedef struct { int64_t B, T, S, Hq, Hkv, D; int causal; } att_cfg;

static void att_name(char *buf, size_t n, const char *what, const att_cfg *c) {
    snprintf(buf, n, "%s B=%lld T=%lld S=%lld Hq=%lld Hkv=%lld D=%lld%s", what, (long long)c->B, (long long)c->T,
             (long long)c->S, (long long)c->Hq, (long long)c->Hkv, (long long)c->D, c->causal ? " causal" : "");
}

static void test_attention_cfg(moe_dtype dt, const att_cfg *c, moe_dtype lse_dt) {
    char name[192];
    float scale = 1.0f / sqrtf((float)c->D);
    pair q = in_randn(dt, SH(c->B, c->T, c->Hq, c->D));
    pair k = in_randn(dt, SH(c->B, c->S, c->Hkv, c->D)), v = in_randn(dt, SH(c->B, c->S, c->Hkv, c->D));
    pair o = out_pair(dt, SH(c->B, c->T, c->Hq, c->D)), lse = out_pair(lse_dt, SH(c->B, c->Hq, c->T));
    double tol = dt == MOE_F32 ? 1e-4 : 3e-2, l2 = dt == MOE_F32 ? 2e-5 : 1e-2;
    att_name(name, sizeof name, "attention", c);
    if (RUN(name, dt, moe_op_attention(ctx, o.h, lse.h, q.h, k.h, v.h, scale, c->causal),
            moe_op_attention(ctx, o.d, lse.d, q.d, k.d, v.d, scale, c->causal))) {
        att_name(name, sizeof name, "attention out", c);
        check2(name, dt, o.d, o.h, tol, l2);
        att_name(name, sizeof name, "attention lse", c);
        check2(name, lse_dt, lse.d, lse.h, lse_dt == MOE_F32 ? 1e-5 : 2e-2, lse_dt == MOE_F32 ? 1e-5 : 1e-2);
    }
    /* backward from the same out and lse on both sides (the CPU's, rounded to the device dtypes) */
    round_through(o.h, dt);
    round_through(lse.h, lse_dt);
    moe_tensor *od = to_gpu(o.h, dt), *ld = to_gpu(lse.h, lse_dt);
    pair go = in_randn(dt, SH(c->B, c->T, c->Hq, c->D));
    pair dq = out_pair(dt, SH(c->B, c->T, c->Hq, c->D));
    pair dk = out_pair(dt, SH(c->B, c->S, c->Hkv, c->D)), dv = out_pair(dt, SH(c->B, c->S, c->Hkv, c->D));
    att_name(name, sizeof name, "attention_backward", c);
    if (RUN(name, dt, moe_op_attention_backward(ctx, dq.h, dk.h, dv.h, go.h, q.h, k.h, v.h, o.h, lse.h, scale, c->causal),
            moe_op_attention_backward(ctx, dq.d, dk.d, dv.d, go.d, q.d, k.d, v.d, od, ld, scale, c->causal))) {
        att_name(name, sizeof name, "attention_backward dq", c);
        check2(name, dt, dq.d, dq.h, tol, l2);
        att_name(name, sizeof name, "attention_backward dk", c);
        check2(name, dt, dk.d, dk.h, tol, l2);
        att_name(name, sizeof name, "attention_backward dv", c);
        check2(name, dt, dv.d, dv.h, tol, l2);
    }
    moe_tensor_release(od); moe_tensor_release(ld);
    pfree(&q); pfree(&k); pfree(&v); pfree(&o); pfree(&lse); pfree(&go); pfree(&dq); pfree(&dk); pfree(&dv);
}

static void test_attention(moe_dtype dt) {
    /* D 64 and 128 take the tensor-core kernels in bf16; the others (and f32) the SIMT ones */
    const att_cfg cs[] = {
        {2, 37, 37, 4, 2, 64, 1},      /* GQA, causal, one partial tile */
        {1, 45, 77, 6, 2, 128, 1},     /* S > T: causal offset S - T (a KV cache) */
        {2, 70, 50, 2, 1, 64, 1},      /* T > S: the first 20 queries see no key (out 0, lse -inf) */
        {1, 33, 65, 4, 4, 128, 0},     /* not causal, S != T */
        {1, 130, 130, 2, 2, 64, 1},    /* several tiles each way */
        {1, 200, 200, 4, 1, 128, 1},   /* GQA 4:1, several tiles */
        {1, 300, 170, 2, 2, 128, 1},   /* T > S at D 128: 130 queries see no key; three 128-query tiles */
        {1, 20, 29, 2, 1, 40, 1},      /* another head dim: SIMT path for bf16 too */
        {1, 19, 19, 3, 3, 256, 0},     /* the largest head dim */
        {1, 37, 37, 3, 3, 64, 1},      /* 111 rows: the backward prep's last warp only partly full */
        {1, 21, 21, 2, 1, 32, 1},      /* D 32: the prep with 4 threads a row (bf16), 42 rows */
    };
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) test_attention_cfg(dt, &cs[i], MOE_F32);
    if (dt != MOE_F32) {   /* statistics in the data dtype too */
        att_cfg c = {1, 40, 40, 2, 1, 64, 1};
        test_attention_cfg(dt, &c, dt);
        /* a negative scale: the tensor-core forward needs a positive one (it takes
         * row maxima on unscaled scores), so this takes the SIMT kernel */
        pair q = in_randn(dt, SH(1, 70, 2, 64)), k = in_randn(dt, SH(1, 70, 2, 64)), v = in_randn(dt, SH(1, 70, 2, 64));
        pair o = out_pair(dt, SH(1, 70, 2, 64)), l = out_pair(MOE_F32, SH(1, 2, 70));
        if (RUN("attention scale -0.125 D=64 causal", dt, moe_op_attention(ctx, o.h, l.h, q.h, k.h, v.h, -0.125f, 1),
                moe_op_attention(ctx, o.d, l.d, q.d, k.d, v.d, -0.125f, 1))) {
            check("attention scale -0.125 D=64 causal: out", dt, o.d, o.h, tol_of(dt, 1e-5));
            check("attention scale -0.125 D=64 causal: lse", MOE_F32, l.d, l.h, 1e-2);
        }
        pfree(&q); pfree(&k); pfree(&v); pfree(&o); pfree(&l);
    }
}

/* ---- statistics dtypes (ops validation) ---- */

static void test_stat_dtypes(void) {
    /* bf16 data with f32 statistics is accepted (checked by the runs above); f32 data with bf16 statistics is not */
    moe_tensor *x = moe_tensor_new(ctx, MOE_F32, SH(4, 16), GPU), *y = moe_tensor_new(ctx, MOE_F32, SH(4, 16), GPU);
    moe_tensor *w = moe_tensor_new(ctx, MOE_F32, SH(16), GPU), *r = moe_tensor_new(ctx, MOE_BF16, SH(4), GPU);
    moe_tensor *r16 = moe_tensor_new(ctx, MOE_F16, SH(4), GPU), *xb = moe_tensor_new(ctx, MOE_BF16, SH(4, 16), GPU);
    moe_tensor *yb = moe_tensor_new(ctx, MOE_BF16, SH(4, 16), GPU), *wb = moe_tensor_new(ctx, MOE_BF16, SH(16), GPU);
    die_if(!x || !y || !w || !r || !r16 || !xb || !yb || !wb, "tensors");
    moe_status st = moe_op_rmsnorm(ctx, y, r, x, w, 1e-5f);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "expected f32"), "f32 data with bf16 rstd is a dtype error (%s)",
       moe_last_error());
    st = moe_op_rmsnorm(ctx, yb, r16, xb, wb, 1e-5f);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "or f32"), "bf16 data with f16 rstd is a dtype error (%s)",
       moe_last_error());
    moe_tensor *all[] = {x, y, w, r, r16, xb, yb, wb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    /* bf16 rmsnorm and cross entropy with f32 statistics against the cpu */
    const int64_t N = 9, D = 200;
    pair xx = in_randn(MOE_BF16, SH(N, D)), ww = in_pair(MOE_BF16, SH(D), 0.2f, 1.0f, 0);
    pair yy = out_pair(MOE_BF16, SH(N, D)), rs = out_pair(MOE_F32, SH(N));
    if (RUN("rmsnorm bf16 data, f32 rstd", MOE_BF16, moe_op_rmsnorm(ctx, yy.h, rs.h, xx.h, ww.h, 1e-5f),
            moe_op_rmsnorm(ctx, yy.d, rs.d, xx.d, ww.d, 1e-5f))) {
        check("rmsnorm y (f32 rstd)", MOE_BF16, yy.d, yy.h, 2e-2);
        check("rmsnorm rstd kept in f32", MOE_F32, rs.d, rs.h, 1e-5);
    }
    pair dy = in_randn(MOE_BF16, SH(N, D)), dx = out_pair(MOE_BF16, SH(N, D)), dw = in_randn(MOE_BF16, SH(D));
    moe_tensor *rsd = to_gpu(rs.h, MOE_F32);
    if (RUN("rmsnorm_backward bf16 data, f32 rstd", MOE_BF16,
            moe_op_rmsnorm_backward(ctx, dx.h, dw.h, dy.h, xx.h, ww.h, rs.h),
            moe_op_rmsnorm_backward(ctx, dx.d, dw.d, dy.d, xx.d, ww.d, rsd))) {
        check("rmsnorm_backward dx (f32 rstd)", MOE_BF16, dx.d, dx.h, 2e-2);
        check("rmsnorm_backward dw (f32 rstd)", MOE_BF16, dw.d, dw.h, 2e-2);
    }
    moe_tensor_release(rsd);
    pfree(&xx); pfree(&ww); pfree(&yy); pfree(&rs); pfree(&dy); pfree(&dx); pfree(&dw);
    const int64_t V = 517;
    pair lg = in_pair(MOE_BF16, SH(N, V), 3.0f, 0.0f, 0), loss = out_pair(MOE_F32, SH(N)), lse = out_pair(MOE_F32, SH(N));
    ipair tg = idx_pair(SH(N), V);
    if (RUN("cross_entropy bf16 logits, f32 loss and lse", MOE_BF16,
            moe_op_cross_entropy(ctx, loss.h, lse.h, lg.h, tg.h, -100),
            moe_op_cross_entropy(ctx, loss.d, lse.d, lg.d, tg.d, -100))) {
        check("cross_entropy loss kept in f32", MOE_F32, loss.d, loss.h, 1e-5);
        check("cross_entropy lse kept in f32", MOE_F32, lse.d, lse.h, 1e-5);
    }
    moe_tensor *lsed = to_gpu(lse.h, MOE_F32);
    pair dl = out_pair(MOE_BF16, SH(N, V));
    if (RUN("cross_entropy_backward bf16 logits, f32 lse", MOE_BF16,
            moe_op_cross_entropy_backward(ctx, dl.h, lg.h, lse.h, tg.h, -100, 0.1f),
            moe_op_cross_entropy_backward(ctx, dl.d, lg.d, lsed, tg.d, -100, 0.1f)))
        check("cross_entropy_backward (f32 lse)", MOE_BF16, dl.d, dl.h, 2e-3);
    /* the fused pass with the types training uses (bf16 logits, f32 loss and lse) */
    pair floss = out_pair(MOE_F32, SH(N)), flse = out_pair(MOE_F32, SH(N)), fdl = out_pair(MOE_BF16, SH(N, V));
    if (RUN("cross_entropy_fused bf16 logits, f32 loss and lse", MOE_BF16,
            moe_op_cross_entropy_fused(ctx, floss.h, flse.h, fdl.h, lg.h, tg.h, -100, 0.1f),
            moe_op_cross_entropy_fused(ctx, floss.d, flse.d, fdl.d, lg.d, tg.d, -100, 0.1f))) {
        check("cross_entropy_fused loss kept in f32", MOE_F32, floss.d, floss.h, 1e-5);
        check("cross_entropy_fused lse kept in f32", MOE_F32, flse.d, flse.h, 1e-5);
        check("cross_entropy_fused dlogits (f32 lse)", MOE_BF16, fdl.d, fdl.h, 2e-3);
    }
    pfree(&floss); pfree(&flse); pfree(&fdl);
    moe_tensor_release(lsed);
    pfree(&lg); pfree(&loss); pfree(&lse); pfree(&dl); ifree(&tg);
}

/* ---- index errors: MOE_ERR_RANGE, nothing written ---- */

static void test_index_errors(void) {
    const int64_t N = 10, W = 8, M = 12;
    pair x = in_randn(MOE_F32, SH(N, W)), dst = in_randn(MOE_F32, SH(N, W)), src = in_randn(MOE_F32, SH(M, W));
    pair o = out_pair(MOE_F32, SH(M, W));
    const int64_t bad_vals[] = {N, -1, 1000000};
    for (int v = 0; v < 3; v++) {
        ipair ix = idx_pair(SH(M), N);
        int64_t *p = moe_tensor_data(ix.h);
        p[7] = bad_vals[v];
        p[9] = bad_vals[v];   /* the first bad position (7) is the one reported */
        moe_tensor_release(ix.d);
        ix.d = moe_op_to(ctx, ix.h, GPU, MOE_I64);
        die_if(!ix.d, "upload");
        char want[64];
        snprintf(want, sizeof want, "index %lld at position 7", (long long)bad_vals[v]);
        moe_status st = moe_op_index_select(ctx, o.d, x.d, ix.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), want), "index_select index %lld -> MOE_ERR_RANGE (%s)",
           (long long)bad_vals[v], moe_last_error());
        moe_tensor *before = moe_op_to(ctx, dst.d, MOE_DEVICE_CPU, MOE_F32);
        st = moe_op_index_add(ctx, dst.d, ix.d, src.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), want), "index_add index %lld -> MOE_ERR_RANGE (%s)",
           (long long)bad_vals[v], moe_last_error());
        check("index_add with a bad index leaves dst unchanged", MOE_F32, dst.d, before, 0.0);
        moe_tensor_release(before);
        pair eo = out_pair(MOE_F32, SH(M, W));
        st = moe_op_embedding(ctx, eo.d, x.d, ix.d);
        ok(st == MOE_ERR_RANGE, "embedding id %lld -> MOE_ERR_RANGE (%s)", (long long)bad_vals[v], moe_last_error());
        st = moe_op_embedding_backward(ctx, dst.d, src.d, ix.d);
        ok(st == MOE_ERR_RANGE, "embedding_backward id %lld -> MOE_ERR_RANGE (%s)", (long long)bad_vals[v],
           moe_last_error());
        pfree(&eo);
        ifree(&ix);
    }
    /* gather / scatter_add over the last dim; both scatter paths (m <= 32 and m > 32) */
    const int64_t ms[] = {5, 40};
    for (int v = 0; v < 2; v++) {
        int64_t m = ms[v];
        ipair ix = idx_pair(SH(3, m), W);
        int64_t *p = moe_tensor_data(ix.h);
        p[m + 2] = W;   /* row 1 */
        moe_tensor_release(ix.d);
        ix.d = moe_op_to(ctx, ix.h, GPU, MOE_I64);
        die_if(!ix.d, "upload");
        pair gx = in_randn(MOE_F32, SH(3, W)), go = out_pair(MOE_F32, SH(3, m)), gs = in_randn(MOE_F32, SH(3, m));
        moe_status st = moe_op_gather(ctx, go.d, gx.d, ix.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), "out of range"), "gather m=%lld bad index -> MOE_ERR_RANGE (%s)",
           (long long)m, moe_last_error());
        moe_tensor *before = moe_op_to(ctx, gx.d, MOE_DEVICE_CPU, MOE_F32);
        st = moe_op_scatter_add(ctx, gx.d, ix.d, gs.d);
        ok(st == MOE_ERR_RANGE, "scatter_add m=%lld bad index -> MOE_ERR_RANGE (%s)", (long long)m, moe_last_error());
        check("scatter_add with a bad index leaves dst unchanged", MOE_F32, gx.d, before, 0.0);
        moe_tensor_release(before);
        pfree(&gx); pfree(&go); pfree(&gs); ifree(&ix);
    }
    /* and the device still works */
    ipair ix = idx_pair(SH(M), N);
    if (RUN("index_select after range errors", MOE_F32, moe_op_index_select(ctx, o.h, x.h, ix.h),
            moe_op_index_select(ctx, o.d, x.d, ix.d)))
        check("index_select after range errors", MOE_F32, o.d, o.h, 0.0);
    ifree(&ix);
    pfree(&x); pfree(&dst); pfree(&src); pfree(&o);
}

/* ---- determinism: the same inputs twice give the same bytes ---- */

static void test_determinism(void) {
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = k ? MOE_BF16 : MOE_F32;
        /* index_add with many duplicates (an embedding gradient: 20000 tokens, 100 rows) */
        pair src = in_randn(dt, SH(20000, 64)), d0 = in_randn(dt, SH(100, 64));
        ipair ix = idx_pair(SH(20000), 100);
        moe_tensor *a = moe_op_to(ctx, d0.d, GPU, dt), *b = moe_op_to(ctx, d0.d, GPU, dt);
        die_if(!a || !b, "copies");
        moe_status s1 = moe_op_index_add(ctx, a, ix.d, src.d), s2 = moe_op_index_add(ctx, b, ix.d, src.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(a, b), "index_add 20000 -> 100 rows twice: bit-identical [%s]",
           dtn(dt));
        if (RUN("index_add 20000 -> 100 rows", dt, moe_op_index_add(ctx, d0.h, ix.h, src.h), MOE_OK))
            check_exact("index_add 20000 -> 100 rows vs cpu (bit-exact)", dt, a, d0.h);
        moe_tensor_release(a); moe_tensor_release(b);
        pfree(&src); pfree(&d0); ifree(&ix);
        /* scatter_add, sort path */
        pair ss = in_randn(dt, SH(50, 300)), sd = in_randn(dt, SH(50, 20));
        ipair si = idx_pair(SH(50, 300), 20);
        a = moe_op_to(ctx, sd.d, GPU, dt); b = moe_op_to(ctx, sd.d, GPU, dt);
        die_if(!a || !b, "copies");
        s1 = moe_op_scatter_add(ctx, a, si.d, ss.d); s2 = moe_op_scatter_add(ctx, b, si.d, ss.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(a, b), "scatter_add m=300 twice: bit-identical [%s]", dtn(dt));
        moe_tensor_release(a); moe_tensor_release(b);
        pfree(&ss); pfree(&sd); ifree(&si);
        /* reductions */
        pair x = in_randn(dt, SH(3000, 700));
        pair r1 = out_pair(dt, SH(700)), r2 = out_pair(dt, SH(700)), t1 = out_pair(dt, 0, NULL), t2 = out_pair(dt, 0, NULL);
        s1 = moe_op_reduce(ctx, MOE_RED_SUM, r1.d, x.d, 0); s2 = moe_op_reduce(ctx, MOE_RED_SUM, r2.d, x.d, 0);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(r1.d, r2.d), "reduce sum over dim 0 twice: bit-identical [%s]", dtn(dt));
        s1 = moe_op_reduce_all(ctx, MOE_RED_SUM, t1.d, x.d); s2 = moe_op_reduce_all(ctx, MOE_RED_SUM, t2.d, x.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(t1.d, t2.d), "reduce_all sum twice: bit-identical [%s]", dtn(dt));
        pfree(&x); pfree(&r1); pfree(&r2); pfree(&t1); pfree(&t2);
        /* attention forward and backward (GQA, causal): tensor cores in bf16 */
        const int64_t B = 2, T = 300, S = 300, Hq = 4, Hkv = 2, D = 128;
        moe_tensor *q = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU), *kk = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
        moe_tensor *v = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU), *go = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
        moe_tensor *o[2], *l[2], *dq[2], *dk[2], *dv[2];
        die_if(!q || !kk || !v || !go, "attention tensors");
        moe_op_fill_randn(ctx, q, 11, 0, 0, 1); moe_op_fill_randn(ctx, kk, 12, 0, 0, 1);
        moe_op_fill_randn(ctx, v, 13, 0, 0, 1); moe_op_fill_randn(ctx, go, 14, 0, 0, 1);
        moe_status st = MOE_OK;
        for (int r = 0; r < 2; r++) {
            o[r] = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
            l[r] = moe_tensor_new(ctx, MOE_F32, SH(B, Hq, T), GPU);
            dq[r] = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
            dk[r] = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
            dv[r] = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
            die_if(!o[r] || !l[r] || !dq[r] || !dk[r] || !dv[r], "attention outputs");
            if (st == MOE_OK) st = moe_op_attention(ctx, o[r], l[r], q, kk, v, 0.088f, 1);
            if (st == MOE_OK) st = moe_op_attention_backward(ctx, dq[r], dk[r], dv[r], go, q, kk, v, o[0], l[0], 0.088f, 1);
        }
        ok(st == MOE_OK && same_bytes(o[0], o[1]) && same_bytes(l[0], l[1]),
           "attention forward twice: bit-identical out and lse [%s]%s", dtn(dt), st ? moe_last_error() : "");
        ok(st == MOE_OK && same_bytes(dq[0], dq[1]) && same_bytes(dk[0], dk[1]) && same_bytes(dv[0], dv[1]),
           "attention backward twice: bit-identical dq, dk, dv [%s]", dtn(dt));
        moe_tensor_release(q); moe_tensor_release(kk); moe_tensor_release(v); moe_tensor_release(go);
        for (int r = 0; r < 2; r++) {
            moe_tensor_release(o[r]); moe_tensor_release(l[r]); moe_tensor_release(dq[r]);
            moe_tensor_release(dk[r]); moe_tensor_release(dv[r]);
        }
    }
}

static void test_dtype_error(void) {
    moe_tensor *x = moe_tensor_new(ctx, MOE_F16, SH(4, 8), GPU), *y = moe_tensor_new(ctx, MOE_F16, SH(4, 8), GPU);
    die_if(!x || !y, "f16 tensors");
    moe_status st = moe_op_softmax(ctx, y, x);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "f32 and bf16"), "an f16 op on cuda reports a dtype error (%s)",
       moe_last_error());
    moe_tensor_release(x); moe_tensor_release(y);
}

/* MOELAB_CHECK_ONLY=name,name,...: run only these test groups (test_<name>)
 * and timings (time_attention, time_attention_step, time_grouped, time_wgrad_skew, time_cross_entropy, time_axpy,
 * time_rope, time_rmsnorm, time_moe_layer), for quick runs while working on
 * one kernel. */
static int want(const char *name) {
    const char *only = getenv("MOELAB_CHECK_ONLY");
    if (!only || !*only) return 1;
    size_t n = strlen(name);
    for (const char *p = only; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

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
    int what;   /* 0 xent fwd, 1 xent bwd, 2 axpy, 3 rope, 4 rmsnorm fwd, 5 rmsnorm bwd, 6 xent fused */
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
    if (want("time_cross_entropy")) time_cross_entropy(8192, 50304);
    if (want("time_axpy")) time_axpy((int64_t)64 << 20);
    if (want("time_rope")) time_rope(8, 1024, 16, 64);
    if (want("time_rmsnorm")) time_rmsnorm(8192, 1024);
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
        if (want("reduce")) test_reduce(dt);
        if (want("topk")) test_topk(dt);
        if (want("gather_scatter")) test_gather_scatter(dt);
        if (want("index_select_add")) test_index_select_add(dt);
        if (want("embedding")) test_embedding(dt);
        if (want("layernorm")) test_layernorm(dt);
        if (want("rope")) test_rope(dt);
        if (want("rmsnorm_rope")) test_rmsnorm_rope(dt);
        if (want("attention")) test_attention(dt);
    }
    if (want("adamw")) test_adamw();
    if (want("stat_dtypes")) test_stat_dtypes();
    if (want("index_errors")) test_index_errors();
    if (want("determinism")) test_determinism();
    if (want("dtype_error")) test_dtype_error();
    if (!getenv("MOELAB_CHECK_NO_TIMING")) timings();
    return gpucheck_end();
}
