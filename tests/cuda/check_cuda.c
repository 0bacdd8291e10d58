/* check_cuda: every CUDA kernel against the CPU backend, through the public
 * moe_op_* API. Fresh normal inputs per check (never zeros), outputs poisoned
 * with NaN before each run so unwritten elements fail. bf16 checks feed the
 * CPU the same bf16-rounded inputs (the CPU computes in f32) and compare the
 * GPU's bf16 result with tolerance 2e-2.
 * Error measure: max |gpu - cpu| / (1 + |cpu|). Prints TAP; exit 1 on failure;
 * "1..0 # SKIP no CUDA device" and exit 0 without a GPU. */
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/core/rng.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/cuda/moe_cuda.h"

static moe_ctx *ctx;
static int ntest, nfail;
static uint64_t seed = 20240611;
static const moe_device GPU = {MOE_CUDA, 0};

#define SH(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

static void ok(int pass, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    ntest++;
    if (!pass) nfail++;
    printf("%s %d - %s\n", pass ? "ok" : "not ok", ntest, name);
    fflush(stdout);
}

static const char *dtn(moe_dtype dt) { return moe_dtype_name(dt); }

/* ---- host/device pairs: h is the CPU f32 reference side, d the GPU side ---- */
typedef struct { moe_tensor *h, *d; } pair;

static void die_if(int cond, const char *what) {
    if (cond) {
        printf("Bail out! %s: %s\n", what, moe_last_error());
        exit(1);
    }
}

/* bf16: round a host f32 tensor's values through bf16 */
static void round_through(moe_tensor *h, moe_dtype dt) {
    if (dt == MOE_F32) return;
    float *p = moe_f32(h);
    for (int64_t i = 0; i < moe_tensor_numel(h); i++) p[i] = moe_bf16_to_f32(moe_f32_to_bf16(p[i]));
}

static moe_tensor *host_randn(int nd, const int64_t *shape, float scale, float shift, int positive) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_F32, nd, shape);
    die_if(!h, "host tensor");
    float *p = moe_f32(h);
    int64_t n = moe_tensor_numel(h);
    moe_rng_normal(p, n, moe_rng_key(seed++, MOE_RNG_USER), 0);
    for (int64_t i = 0; i < n; i++) {
        float v = p[i] * scale;
        p[i] = (positive ? fabsf(v) : v) + shift;
    }
    return h;
}

static moe_tensor *to_gpu(moe_tensor *h, moe_dtype dt) {
    moe_tensor *d = moe_op_to(ctx, h, GPU, dt);
    die_if(!d, "upload");
    return d;
}

static pair in_pair(moe_dtype dt, int nd, const int64_t *shape, float scale, float shift, int positive) {
    pair p;
    p.h = host_randn(nd, shape, scale, shift, positive);
    round_through(p.h, dt);
    p.d = to_gpu(p.h, dt);
    return p;
}
static pair in_randn(moe_dtype dt, int nd, const int64_t *shape) { return in_pair(dt, nd, shape, 1.0f, 0.0f, 0); }

/* outputs: NaN on both sides */
static pair out_pair(moe_dtype dt, int nd, const int64_t *shape) {
    pair p;
    p.h = moe_tensor_new_cpu(MOE_F32, nd, shape);
    p.d = moe_tensor_new(ctx, dt, nd, shape, GPU);
    die_if(!p.h || !p.d, "output tensor");
    die_if(moe_op_fill(ctx, p.h, NAN) != MOE_OK || moe_op_fill(ctx, p.d, NAN) != MOE_OK, "poison");
    return p;
}

static void pfree(pair *p) {
    moe_tensor_release(p->h);
    moe_tensor_release(p->d);
    p->h = p->d = NULL;
}

/* max |g - r| / (1 + |r|); NaN anywhere gives INFINITY */
static double max_err(const moe_tensor *gpu, const moe_tensor *ref) {
    moe_tensor *g = moe_op_to(ctx, (moe_tensor *)gpu, MOE_DEVICE_CPU, MOE_F32);
    die_if(!g, "download");
    moe_tensor *r = moe_tensor_contiguous_cpu((moe_tensor *)ref);
    die_if(!r, "contiguous");
    const float *a = moe_f32(g), *b = moe_f32(r);
    double m = 0;
    for (int64_t i = 0; i < moe_tensor_numel(r); i++) {
        double x = a[i], y = b[i], e;
        if (isnan(x) || isnan(y)) e = INFINITY;
        else if (isinf(x) || isinf(y)) e = x == y ? 0.0 : INFINITY;
        else e = fabs(x - y) / (1.0 + fabs(y));
        if (e > m) m = e;
    }
    moe_tensor_release(g);
    moe_tensor_release(r);
    return m;
}

static void check(const char *name, moe_dtype dt, const moe_tensor *gpu, const moe_tensor *ref, double tol) {
    double e = max_err(gpu, ref);
    if (e <= tol) ok(1, "%s [%s]", name, dtn(dt));
    else ok(0, "%s [%s]: max err %.3g > tol %.3g", name, dtn(dt), e, tol);
}

/* both calls must succeed; otherwise a failed test with the message */
static int ran(const char *name, moe_dtype dt, moe_status sc, moe_status sg) {
    if (sc == MOE_OK && sg == MOE_OK) return 1;
    ok(0, "%s [%s]: %s failed: %s", name, dtn(dt), sc != MOE_OK ? "cpu" : "cuda", moe_last_error());
    return 0;
}
#define RUN(name, dt, CALL_CPU, CALL_GPU) ran((name), (dt), (CALL_CPU), (CALL_GPU))

static double tol_of(moe_dtype dt, double f32tol) { return dt == MOE_F32 ? f32tol : 2e-2; }

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

static void test_gemm_grouped(moe_dtype dt) {
    const int64_t off[] = {0, 5, 5, 17, 24};   /* group 1 is empty */
    const int G = 4;
    const int64_t M = 24, K = 40, N = 33;
    for (int tb = 0; tb < 2; tb++) {
        pair a = in_randn(dt, SH(M, K));
        pair b = tb ? in_randn(dt, SH(G, N, K)) : in_randn(dt, SH(G, K, N));
        pair c = in_randn(dt, SH(M, N));
        char name[64];
        snprintf(name, sizeof name, "gemm_grouped transb=%d", tb);
        if (RUN(name, dt, moe_op_gemm_grouped(ctx, tb, 0.9f, a.h, b.h, 0.5f, c.h, off, G),
                moe_op_gemm_grouped(ctx, tb, 0.9f, a.d, b.d, 0.5f, c.d, off, G)))
            check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
        pfree(&a); pfree(&b); pfree(&c);
    }
    const int64_t P = 29, Q = 31;
    for (int v = 0; v < 2; v++) {
        float beta = v ? 0.5f : 0.0f;
        pair a = in_randn(dt, SH(M, P)), b = in_randn(dt, SH(M, Q)), c = in_randn(dt, SH(G, P, Q));
        char name[64];
        snprintf(name, sizeof name, "gemm_grouped_wgrad beta=%g (one empty group)", beta);
        if (RUN(name, dt, moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.h, b.h, beta, c.h, off, G),
                moe_op_gemm_grouped_wgrad(ctx, 1.1f, a.d, b.d, beta, c.d, off, G)))
            check(name, dt, c.d, c.h, tol_of(dt, 1e-4));
        pfree(&a); pfree(&b); pfree(&c);
    }
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
    }
}

static void test_axpy(moe_dtype dt) {
    pair y = in_randn(dt, SH(5, 301)), x = in_randn(dt, SH(5, 301));
    if (RUN("axpy", dt, moe_op_axpy(ctx, y.h, -0.35f, x.h), moe_op_axpy(ctx, y.d, -0.35f, x.d)))
        check("axpy", dt, y.d, y.h, tol_of(dt, 1e-5));
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

static void test_rmsnorm(moe_dtype dt) {
    const int64_t R = 2, T = 9, D = 333;
    pair x = in_randn(dt, SH(R, T, D)), w = in_pair(dt, SH(D), 0.2f, 1.0f, 0);
    pair y = out_pair(dt, SH(R, T, D)), rstd = out_pair(dt, SH(R, T));
    if (RUN("rmsnorm", dt, moe_op_rmsnorm(ctx, y.h, rstd.h, x.h, w.h, 1e-5f),
            moe_op_rmsnorm(ctx, y.d, rstd.d, x.d, w.d, 1e-5f))) {
        check("rmsnorm y", dt, y.d, y.h, tol_of(dt, 1e-5));
        check("rmsnorm rstd", dt, rstd.d, rstd.h, tol_of(dt, 1e-5));
    }
    round_through(rstd.h, dt);
    moe_tensor *rd = to_gpu(rstd.h, dt);
    pair dy = in_randn(dt, SH(R, T, D)), dx = out_pair(dt, SH(R, T, D)), dw = in_randn(dt, SH(D));
    if (RUN("rmsnorm_backward", dt, moe_op_rmsnorm_backward(ctx, dx.h, dw.h, dy.h, x.h, w.h, rstd.h),
            moe_op_rmsnorm_backward(ctx, dx.d, dw.d, dy.d, x.d, w.d, rd))) {
        check("rmsnorm_backward dx", dt, dx.d, dx.h, tol_of(dt, 1e-5));
        check("rmsnorm_backward dw (accumulated)", dt, dw.d, dw.h, tol_of(dt, 1e-5));
    }
    moe_tensor_release(rd);
    pfree(&x); pfree(&w); pfree(&y); pfree(&rstd); pfree(&dy); pfree(&dx); pfree(&dw);
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

static void test_cross_entropy(moe_dtype dt) {
    const int64_t N = 13, V = 1031, IGN = -100;
    pair x = in_pair(dt, SH(N, V), 3.0f, 0.0f, 0);
    moe_tensor *th = moe_tensor_new_cpu(MOE_I64, SH(N));
    int64_t *t = moe_tensor_data(th);
    int counted = 0;
    for (int64_t i = 0; i < N; i++) {
        t[i] = i % 5 == 2 ? IGN : (int64_t)((i * 7919 + seed) % V);
        counted += t[i] != IGN;
    }
    seed++;
    moe_tensor *td = moe_op_to(ctx, th, GPU, MOE_I64);
    die_if(!td, "targets upload");
    pair loss = out_pair(dt, SH(N)), lse = out_pair(dt, SH(N));
    if (RUN("cross_entropy", dt, moe_op_cross_entropy(ctx, loss.h, lse.h, x.h, th, IGN),
            moe_op_cross_entropy(ctx, loss.d, lse.d, x.d, td, IGN))) {
        check("cross_entropy loss", dt, loss.d, loss.h, tol_of(dt, 1e-5));
        check("cross_entropy lse", dt, lse.d, lse.h, tol_of(dt, 1e-5));
    }
    round_through(lse.h, dt);
    moe_tensor *lsed = to_gpu(lse.h, dt);
    pair dx = out_pair(dt, SH(N, V));
    float scale = 1.0f / (float)counted;
    if (RUN("cross_entropy_backward", dt, moe_op_cross_entropy_backward(ctx, dx.h, x.h, lse.h, th, IGN, scale),
            moe_op_cross_entropy_backward(ctx, dx.d, x.d, lsed, td, IGN, scale)))
        check("cross_entropy_backward", dt, dx.d, dx.h, dt == MOE_F32 ? 1e-6 : 2e-3);
    moe_tensor_release(th); moe_tensor_release(td); moe_tensor_release(lsed);
    pfree(&x); pfree(&loss); pfree(&lse); pfree(&dx);
}

static void test_adamw(void) {
    const int64_t n = 4099;
    pair p = in_randn(MOE_F32, SH(n)), g = in_randn(MOE_F32, SH(n));
    pair m = in_pair(MOE_F32, SH(n), 0.1f, 0.0f, 0), v = in_pair(MOE_F32, SH(n), 0.1f, 0.01f, 1);
    moe_adamw_cfg cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .step = 3};
    if (RUN("adamw", MOE_F32, moe_op_adamw(ctx, p.h, g.h, m.h, v.h, &cfg), moe_op_adamw(ctx, p.d, g.d, m.d, v.d, &cfg))) {
        check("adamw params", MOE_F32, p.d, p.h, 1e-5);
        check("adamw m", MOE_F32, m.d, m.h, 1e-5);
        check("adamw v", MOE_F32, v.d, v.h, 1e-5);
    }
    pfree(&p); pfree(&g); pfree(&m); pfree(&v);
}

/* ---- allocator ---- */

static int reclaim_calls;
static void count_reclaim(void *arg) { (void)arg; reclaim_calls++; }

static void test_allocator(void) {
    moe_cuda_mem_stats s0, s1;
    moe_tensor *a = moe_tensor_new(ctx, MOE_F32, SH(1000, 1000), GPU);
    die_if(!a, "alloc");
    moe_tensor_release(a);
    moe_cuda_memory_stats(ctx, 0, &s0);
    a = moe_tensor_new(ctx, MOE_F32, SH(999, 1001), GPU);   /* same size class */
    moe_cuda_memory_stats(ctx, 0, &s1);
    ok(a && s1.num_cache_hits == s0.num_cache_hits + 1 && s1.num_cuda_malloc == s0.num_cuda_malloc,
       "allocator reuses a cached block of the same class");
    moe_tensor_release(a);

    /* out of memory: more than the device has */
    moe_cuda_memory_stats(ctx, 0, &s0);
    size_t total = s0.device_total;
    int64_t huge = (int64_t)(total / 4) * 2 + 1;     /* 2x the device in f32 elements */
    ctx->reclaim = count_reclaim;
    ctx->reclaim_arg = NULL;
    moe_clear_error();
    moe_tensor *big = moe_tensor_new(ctx, MOE_F32, SH(huge), GPU);
    moe_status st = moe_last_status();
    const char *msg = moe_last_error();
    int good = !big && st == MOE_ERR_OOM && msg && strstr(msg, "out of memory") && strstr(msg, "in use");
    ok(good, "oom: clean MOE_ERR_OOM with a message (%s)", msg ? msg : "no message");
    ok(reclaim_calls == 1, "oom: ctx->reclaim called once before the retry (called %d times)", reclaim_calls);
    moe_tensor_release(big);
    ctx->reclaim = NULL;
    /* and the allocator still works */
    moe_tensor *h = host_randn(SH(4096), 1, 0, 0);
    moe_tensor *d = moe_op_to(ctx, h, GPU, MOE_F32);
    ok(d != NULL, "allocator works after oom");
    if (d) check("copy after oom", MOE_F32, d, h, 0.0);
    moe_tensor_release(h);
    moe_tensor_release(d);
}

static void test_unsupported(void) {
    moe_tensor *x = moe_tensor_new(ctx, MOE_F32, SH(4, 8), GPU);
    moe_tensor *v = moe_tensor_new(ctx, MOE_F32, SH(4, 2), GPU);
    moe_tensor *i = moe_tensor_new(ctx, MOE_I64, SH(4, 2), GPU);
    moe_op_fill_randn(ctx, x, 1, 0, 0, 1);
    moe_status st = moe_op_topk(ctx, v, i, x, 2);
    ok(st == MOE_ERR_DEVICE && strstr(moe_last_error(), "not supported on cuda"),
       "a NULL entry reports 'not supported on cuda' (%s)", moe_last_error());
    moe_tensor_release(x); moe_tensor_release(v); moe_tensor_release(i);
}

int main(void) {
    if (moe_cuda_device_count() == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        return 0;
    }
    ctx = moe_ctx_new(0);
    die_if(!ctx, "context");
    moe_cpu_backend_install(ctx);
    die_if(moe_cuda_backend_install(ctx) != MOE_OK, "cuda backend install");

    test_copy();
    const moe_dtype dts[] = {MOE_F32, MOE_BF16};
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = dts[k];
        test_random(dt);
        test_fill(dt);
        test_gemm(dt);
        test_gemm_grouped(dt);
        test_binary(dt);
        test_unary(dt);
        test_axpy(dt);
        test_softmax(dt);
        test_rmsnorm(dt);
        test_swiglu(dt);
        test_cross_entropy(dt);
    }
    test_adamw();
    test_unsupported();
    test_allocator();
    printf("1..%d\n", ntest);
    moe_cuda_backend_uninstall(ctx);
    moe_ctx_free(ctx);
    return nfail ? 1 : 0;
}
