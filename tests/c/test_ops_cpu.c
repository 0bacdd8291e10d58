/* CPU backend tests: every kernel against a naive reference written here, on
 * random normal data; error cases; thread-count independence. Prints TAP. */
#include "../../src/ops/backend.h"
#include "../../src/core/context.h"
#include "../../src/core/rng.h"
#include "tap.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moe_ctx *ctx;
static uint64_t seed_ctr = 1;


static moe_tensor *tnew(moe_dtype dt, int nd, const int64_t *shape) {
    moe_tensor *t = moe_tensor_new(ctx, dt, nd, shape, MOE_DEVICE_CPU);
    if (!t) { fprintf(stderr, "alloc failed: %s\n", moe_last_error()); exit(2); }
    return t;
}
#define SHAPE(...) ((int64_t[]){__VA_ARGS__}), (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t))
static moe_tensor *zeros_(const int64_t *s, int nd) { moe_tensor *t = tnew(MOE_F32, nd, s); moe_tensor_fill_cpu(t, 0); return t; }
static moe_tensor *randn_(const int64_t *s, int nd) {
    moe_tensor *t = tnew(MOE_F32, nd, s);
    moe_rng_normal(moe_f32(t), moe_tensor_numel(t), moe_rng_key(seed_ctr++, MOE_RNG_USER), 0);
    return t;
}
#define ZEROS(...) zeros_(SHAPE(__VA_ARGS__))
#define RANDN(...) randn_(SHAPE(__VA_ARGS__))
static moe_tensor *idx_(const int64_t *s, int nd, const int64_t *vals) {
    moe_tensor *t = tnew(MOE_I64, nd, s);
    memcpy(moe_tensor_data(t), vals, (size_t)moe_tensor_numel(t) * 8);
    return t;
}
static void rel(moe_tensor *t) { moe_tensor_release(t); }
static moe_tensor *clone_(const moe_tensor *t) {
    moe_tensor *c = moe_tensor_like(ctx, t);
    if (!c || moe_op_copy(ctx, c, t) != MOE_OK) { fprintf(stderr, "clone: %s\n", moe_last_error()); exit(1); }
    return c;
}
static moe_tensor *i32_(const int64_t *s, int nd, const int32_t *vals);

/* max |a - b| / (atol + rtol |b|) over n values; <= 1 passes */
static double cmp(const float *a, const double *b, int64_t n, double atol, double rtol) {
    double w = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (atol + rtol * fabs(b[i]));
        if (!(e <= w)) w = e;   /* NaN counts as failure */
    }
    return w;
}
static double cmpf(const float *a, const float *b, int64_t n, double atol, double rtol) {
    double w = 0;
    for (int64_t i = 0; i < n; i++) {
        double e = fabs((double)a[i] - b[i]) / (atol + rtol * fabs((double)b[i]));
        if (!(e <= w)) w = e;
    }
    return w;
}
#define CHECK_CLOSE(name, got, ref, n, atol, rtol)                                       \
    do { double _e = cmp((got), (ref), (n), (atol), (rtol));                             \
         report(_e <= 1.0, (name), "error ratio %.3g (tolerance 1)", _e); } while (0)
#define CHECK_OK(name, expr)                                                             \
    do { moe_status _s = (expr);                                                         \
         if (_s != MOE_OK) report(0, (name), "status %s: %s", moe_status_name(_s), moe_last_error()); } while (0)

/* ---- GEMM ---- */

static void ref_gemm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *a, const float *b,
                     float beta, const float *c0, double *out) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            double s = 0;
            for (int64_t k = 0; k < K; k++)
                s += (double)(ta ? a[k * M + i] : a[i * K + k]) * (tb ? b[j * K + k] : b[k * N + j]);
            out[i * N + j] = alpha * s + beta * (double)c0[i * N + j];
        }
}

static void test_gemm(void) {
    int64_t M = 5, K = 7, N = 3;
    for (int ta = 0; ta < 2; ta++)
        for (int tb = 0; tb < 2; tb++) {
            moe_tensor *a = ta ? RANDN(K, M) : RANDN(M, K), *b = tb ? RANDN(N, K) : RANDN(K, N), *c = RANDN(M, N);
            double ref[15];
            ref_gemm(ta, tb, M, N, K, 1.5f, moe_f32(a), moe_f32(b), 0.5f, moe_f32(c), ref);
            char name[64];
            snprintf(name, sizeof name, "gemm transa=%d transb=%d", ta, tb);
            CHECK_OK(name, moe_op_gemm(ctx, ta, tb, 1.5f, a, b, 0.5f, c));
            CHECK_CLOSE(name, moe_f32(c), ref, M * N, 1e-5, 1e-5);
            rel(a); rel(b); rel(c);
        }
    /* a transposed view as operand (flag flip path) */
    {
        moe_tensor *at = RANDN(K, M), *b = RANDN(K, N), *c = ZEROS(M, N);
        moe_tensor *a = moe_tensor_transpose(at, 0, 1);
        double ref[15];
        ref_gemm(1, 0, M, N, K, 1.0f, moe_f32(at), moe_f32(b), 0.0f, moe_f32(c), ref);
        CHECK_OK("gemm strided operand", moe_op_gemm(ctx, 0, 0, 1.0f, a, b, 0.0f, c));
        CHECK_CLOSE("gemm strided operand", moe_f32(c), ref, M * N, 1e-5, 1e-5);
        rel(a); rel(at); rel(b); rel(c);
    }
    /* batched: 3-D a with shared 2-D b, and 3-D a and b with transb */
    {
        int64_t B = 3;
        moe_tensor *a = RANDN(B, M, K), *b = RANDN(K, N), *c = RANDN(B, M, N), *b3 = RANDN(B, N, K);
        double ref[45];
        for (int64_t i = 0; i < B; i++)
            ref_gemm(0, 0, M, N, K, 1.0f, moe_f32(a) + i * M * K, moe_f32(b), 1.0f, moe_f32(c) + i * M * N, ref + i * M * N);
        CHECK_OK("gemm batched shared b", moe_op_gemm(ctx, 0, 0, 1.0f, a, b, 1.0f, c));
        CHECK_CLOSE("gemm batched shared b", moe_f32(c), ref, B * M * N, 1e-5, 1e-5);
        for (int64_t i = 0; i < B; i++)
            ref_gemm(0, 1, M, N, K, 2.0f, moe_f32(a) + i * M * K, moe_f32(b3) + i * N * K, 0.0f, moe_f32(c) + i * M * N, ref + i * M * N);
        CHECK_OK("gemm batched transb", moe_op_gemm(ctx, 0, 1, 2.0f, a, b3, 0.0f, c));
        CHECK_CLOSE("gemm batched transb", moe_f32(c), ref, B * M * N, 1e-5, 1e-5);
        rel(a); rel(b); rel(c); rel(b3);
    }
    /* grouped, with an empty group */
    for (int tb = 0; tb < 2; tb++) {
        int64_t Mg = 10, off[4] = {0, 4, 4, 10};
        moe_tensor *a = RANDN(Mg, K), *b = tb ? RANDN(3, N, K) : RANDN(3, K, N), *c = RANDN(Mg, N);
        double ref[30];
        for (int g = 0; g < 3; g++)
            ref_gemm(0, tb, off[g + 1] - off[g], N, K, 1.0f, moe_f32(a) + off[g] * K, moe_f32(b) + g * K * N, 0.25f,
                     moe_f32(c) + off[g] * N, ref + off[g] * N);
        const char *name = tb ? "gemm_grouped transb, empty group" : "gemm_grouped, empty group";
        moe_tensor *c0 = clone_(c);
        CHECK_OK(name, moe_op_gemm_grouped(ctx, tb, 1.0f, a, b, 0.25f, c, off, 3));
        CHECK_CLOSE(name, moe_f32(c), ref, Mg * N, 1e-5, 1e-5);
        /* the offsets in a tensor (on the CPU: read where they are, then as above) */
        moe_tensor *ot = idx_(SHAPE(4), off);
        CHECK_OK("gemm_grouped_dev", moe_op_gemm_grouped_dev(ctx, tb, 1.0f, a, b, 0.25f, c0, ot));
        CHECK_CLOSE("gemm_grouped_dev: as gemm_grouped", moe_f32(c0), ref, Mg * N, 1e-5, 1e-5);
        rel(a); rel(b); rel(c); rel(c0); rel(ot);
    }
    {
        int64_t Mg = 9, P = 4, Q = 6, off[4] = {0, 5, 5, 9};
        moe_tensor *a = RANDN(Mg, P), *b = RANDN(Mg, Q), *c = RANDN(3, P, Q);
        double ref[72];
        for (int g = 0; g < 3; g++)
            ref_gemm(1, 0, P, Q, off[g + 1] - off[g], 1.0f, moe_f32(a) + off[g] * P, moe_f32(b) + off[g] * Q, 0.5f,
                     moe_f32(c) + g * P * Q, ref + g * P * Q);
        moe_tensor *c0 = clone_(c);
        CHECK_OK("gemm_grouped_wgrad", moe_op_gemm_grouped_wgrad(ctx, 1.0f, a, b, 0.5f, c, off, 3));
        CHECK_CLOSE("gemm_grouped_wgrad (empty group scaled by beta)", moe_f32(c), ref, 3 * P * Q, 1e-5, 1e-5);
        moe_tensor *ot = idx_(SHAPE(4), off);
        CHECK_OK("gemm_grouped_wgrad_dev", moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, a, b, 0.5f, c0, ot));
        CHECK_CLOSE("gemm_grouped_wgrad_dev: as gemm_grouped_wgrad", moe_f32(c0), ref, 3 * P * Q, 1e-5, 1e-5);
        /* what a tensor of offsets must be; the host path still checks their values */
        moe_tensor *o32 = i32_(SHAPE(4), (int32_t[]){0, 5, 5, 9}), *o1 = idx_(SHAPE(1), (int64_t[]){0});
        moe_tensor *obad = idx_(SHAPE(4), (int64_t[]){0, 6, 5, 9}), *o2 = idx_(SHAPE(3), (int64_t[]){0, 5, 9});
        moe_status st = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, a, b, 0.5f, c0, o32);
        report(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "offsets has dtype i32, expected i64"),
               "gemm_grouped_wgrad_dev: i32 offsets are refused", "%d %s", st, moe_last_error());
        st = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, a, b, 0.5f, c0, o1);
        report(st == MOE_ERR_SHAPE && strstr(moe_last_error(), "expected [G + 1] with G >= 1"),
               "gemm_grouped_wgrad_dev: one offset (no group) is refused", "%d %s", st, moe_last_error());
        st = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, a, b, 0.5f, c0, o2);
        report(st == MOE_ERR_SHAPE && strstr(moe_last_error(), "[groups, P, Q]"),
               "gemm_grouped_wgrad_dev: G from the offsets must match c", "%d %s", st, moe_last_error());
        st = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, a, b, 0.5f, c0, obad);
        report(st == MOE_ERR_ARG && strstr(moe_last_error(), "decrease at group 1"),
               "gemm_grouped_wgrad_dev: decreasing offsets read on the host are refused", "%d %s", st,
               moe_last_error());
        moe_tensor *bt = RANDN(3, 4, P), *cm = RANDN(Mg, 4);
        st = moe_op_gemm_grouped_dev(ctx, 1, 1.0f, a, bt, 0.0f, cm, NULL);
        report(st == MOE_ERR_ARG && strstr(moe_last_error(), "offsets is NULL"), "gemm_grouped_dev: NULL offsets",
               "%d %s", st, moe_last_error());
        rel(bt); rel(cm);
        rel(a); rel(b); rel(c); rel(c0); rel(ot); rel(o32); rel(o1); rel(obad); rel(o2);
    }
    {   /* the pair: c = 0.7 (a1 b1[g] + a2 b2[g]^T) + 0.25 c, with K1 != K2 */
        int64_t Mg = 7, K1 = 5, K2 = 3, N = 4, off[4] = {0, 3, 3, 7};
        moe_tensor *a1 = RANDN(Mg, K1), *a2 = RANDN(Mg, K2), *b1 = RANDN(3, N, K1), *b2 = RANDN(3, N, K2);
        moe_tensor *c = RANDN(Mg, N);
        double ref[28], part[28];
        for (int g = 0; g < 3; g++) {
            int64_t r0 = off[g], m = off[g + 1] - r0;
            ref_gemm(0, 1, m, N, K1, 0.7f, moe_f32(a1) + r0 * K1, moe_f32(b1) + g * K1 * N, 0.25f,
                     moe_f32(c) + r0 * N, ref + r0 * N);
            ref_gemm(0, 1, m, N, K2, 0.7f, moe_f32(a2) + r0 * K2, moe_f32(b2) + g * K2 * N, 0.0f,
                     moe_f32(c) + r0 * N, part + r0 * N);
        }
        for (int i = 0; i < Mg * N; i++) ref[i] += part[i];
        CHECK_OK("gemm_grouped_pair", moe_op_gemm_grouped_pair(ctx, 1, 0.7f, a1, b1, a2, b2, 0.25f, c, off, 3));
        CHECK_CLOSE("gemm_grouped_pair (sum of two grouped GEMMs)", moe_f32(c), ref, Mg * N, 1e-5, 1e-5);
        moe_status s = moe_op_gemm_grouped_pair(ctx, 1, 1.0f, a1, b1, a2, b1, 0.0f, c, off, 3);
        report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "b2"), "gemm_grouped_pair: b2 of the wrong K is named",
               "status %s: %s", moe_status_name(s), moe_last_error());
        rel(a1); rel(a2); rel(b1); rel(b2); rel(c);
    }
    {   /* SwiGLU experts: g = x wg[e]^T, u = x wu[e]^T, h = silu(g) u; then the backward
         * through the down projection: dh = 0.6 dy w[e], dg = dh u s (1 + g (1 - s)), du = dh g s */
        int64_t Mg = 7, K = 5, I = 4, off[4] = {0, 3, 3, 7};
        moe_tensor *x = RANDN(Mg, K), *wg = RANDN(3, I, K), *wu = RANDN(3, I, K);
        moe_tensor *g = ZEROS(Mg, I), *u = ZEROS(Mg, I), *h = ZEROS(Mg, I);
        double rg[28], ru[28], rh[28];
        for (int e = 0; e < 3; e++) {
            int64_t r0 = off[e], m = off[e + 1] - r0;
            ref_gemm(0, 1, m, I, K, 1.0f, moe_f32(x) + r0 * K, moe_f32(wg) + e * I * K, 0.0f, moe_f32(g) + r0 * I, rg + r0 * I);
            ref_gemm(0, 1, m, I, K, 1.0f, moe_f32(x) + r0 * K, moe_f32(wu) + e * I * K, 0.0f, moe_f32(u) + r0 * I, ru + r0 * I);
        }
        for (int i = 0; i < Mg * I; i++) rh[i] = rg[i] / (1.0 + exp(-rg[i])) * ru[i];
        CHECK_OK("gemm_grouped_swiglu", moe_op_gemm_grouped_swiglu(ctx, x, wg, wu, g, u, h, off, 3));
        CHECK_CLOSE("gemm_grouped_swiglu gate", moe_f32(g), rg, Mg * I, 1e-5, 1e-5);
        CHECK_CLOSE("gemm_grouped_swiglu up", moe_f32(u), ru, Mg * I, 1e-5, 1e-5);
        CHECK_CLOSE("gemm_grouped_swiglu activation", moe_f32(h), rh, Mg * I, 1e-5, 1e-5);
        moe_status s = moe_op_gemm_grouped_swiglu(ctx, x, wg, wg, g, u, x, off, 3);
        report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "h"), "gemm_grouped_swiglu: an h of the wrong shape is named",
               "status %s: %s", moe_status_name(s), moe_last_error());

        moe_tensor *dy = RANDN(Mg, K), *w = RANDN(3, K, I), *dg = ZEROS(Mg, I), *du = ZEROS(Mg, I);
        double dh[28], rdg[28], rdu[28];
        for (int e = 0; e < 3; e++) {
            int64_t r0 = off[e], m = off[e + 1] - r0;
            ref_gemm(0, 0, m, I, K, 0.6f, moe_f32(dy) + r0 * K, moe_f32(w) + e * K * I, 0.0f, moe_f32(dg) + r0 * I, dh + r0 * I);
        }
        for (int i = 0; i < Mg * I; i++) {
            double gv = moe_f32(g)[i], uv = moe_f32(u)[i], sg = 1.0 / (1.0 + exp(-gv));
            rdg[i] = dh[i] * uv * sg * (1.0 + gv * (1.0 - sg));
            rdu[i] = dh[i] * gv * sg;
        }
        CHECK_OK("gemm_grouped_swiglu_backward",
                 moe_op_gemm_grouped_swiglu_backward(ctx, 0.6f, dy, w, g, u, dg, du, NULL, off, 3));
        CHECK_CLOSE("gemm_grouped_swiglu_backward dgate", moe_f32(dg), rdg, Mg * I, 1e-5, 1e-4);
        CHECK_CLOSE("gemm_grouped_swiglu_backward dup", moe_f32(du), rdu, Mg * I, 1e-5, 1e-4);
        s = moe_op_gemm_grouped_swiglu_backward(ctx, 1.0f, dy, wg, g, u, dg, du, NULL, off, 3);
        report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "w"), "gemm_grouped_swiglu_backward: a w of the wrong shape is named",
               "status %s: %s", moe_status_name(s), moe_last_error());
        rel(x); rel(wg); rel(wu); rel(g); rel(u); rel(h); rel(dy); rel(w); rel(dg); rel(du);
    }
}

/* ---- elementwise ---- */

static double ref_bin(int op, double x, double y) {
    switch (op) {
    case MOE_BIN_ADD: return x + y;
    case MOE_BIN_SUB: return x - y;
    case MOE_BIN_MUL: return x * y;
    case MOE_BIN_DIV: return x / y;
    case MOE_BIN_MAX: return x > y ? x : y;
    default: return x < y ? x : y;
    }
}

static void test_binary(void) {
    moe_tensor *a = RANDN(4, 1, 3), *b = RANDN(5, 1), *out = ZEROS(4, 5, 3);
    const float *pa = moe_f32(a), *pb = moe_f32(b);
    for (int op = 0; op < MOE_NUM_BINARY; op++) {
        double ref[60];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 5; j++)
                for (int k = 0; k < 3; k++) ref[(i * 5 + j) * 3 + k] = ref_bin(op, pa[i * 3 + k], pb[j]);
        char name[64];
        snprintf(name, sizeof name, "binary op %d broadcast [4,1,3] with [5,1]", op);
        CHECK_OK(name, moe_op_binary(ctx, op, out, a, b));
        CHECK_CLOSE(name, moe_f32(out), ref, 60, 1e-6, 1e-6);
    }
    /* out aliases a; b a transposed (strided) view */
    moe_tensor *x = RANDN(6, 4), *yt = RANDN(4, 6), *y = moe_tensor_transpose(yt, 0, 1);
    double ref[24];
    for (int i = 0; i < 6; i++)
        for (int j = 0; j < 4; j++) ref[i * 4 + j] = (double)moe_f32(x)[i * 4 + j] * moe_f32(yt)[j * 6 + i];
    CHECK_OK("binary in place with strided operand", moe_op_binary(ctx, MOE_BIN_MUL, x, x, y));
    CHECK_CLOSE("binary in place with strided operand", moe_f32(x), ref, 24, 1e-6, 1e-6);
    rel(a); rel(b); rel(out); rel(x); rel(y); rel(yt);
}

static double ref_un(int op, double x, double al) {
    switch (op) {
    case MOE_UN_NEG: return -x;
    case MOE_UN_EXP: return exp(x);
    case MOE_UN_LOG: return log(x);
    case MOE_UN_SQRT: return sqrt(x);
    case MOE_UN_RSQRT: return 1 / sqrt(x);
    case MOE_UN_ABS: return fabs(x);
    case MOE_UN_TANH: return tanh(x);
    case MOE_UN_SIGMOID: return 1 / (1 + exp(-x));
    case MOE_UN_RELU: return x > 0 ? x : 0;
    case MOE_UN_SILU: return x / (1 + exp(-x));
    case MOE_UN_GELU: return 0.5 * x * (1 + tanh(sqrt(2 / M_PI) * (x + 0.044715 * x * x * x)));
    case MOE_UN_GELU_ERF: return 0.5 * x * (1 + erf(x / sqrt(2.0)));
    case MOE_UN_SQUARE: return x * x;
    case MOE_UN_SCALE: return x * al;
    case MOE_UN_ADD_SCALAR: return x + al;
    default: return pow(x, al);
    }
}

static int positive_domain(int op) { return op == MOE_UN_LOG || op == MOE_UN_SQRT || op == MOE_UN_RSQRT || op == MOE_UN_POW_SCALAR; }

static void test_unary(void) {
    int64_t n = 64;
    moe_tensor *x = RANDN(8, 8), *xp = ZEROS(8, 8), *out = ZEROS(8, 8), *dy = RANDN(8, 8), *dx = ZEROS(8, 8);
    for (int64_t i = 0; i < n; i++) {
        float v = moe_f32(x)[i];
        if (fabsf(v) < 0.05f) moe_f32(x)[i] = v < 0 ? -0.05f : 0.05f;   /* keep away from kinks */
        moe_f32(xp)[i] = fabsf(v) + 0.2f;
    }
    float al = 1.7f;
    for (int op = 0; op < MOE_NUM_UNARY; op++) {
        moe_tensor *in = positive_domain(op) ? xp : x;
        double ref[64], dref[64];
        for (int64_t i = 0; i < n; i++) {
            double v = moe_f32(in)[i], h = 1e-4;
            ref[i] = ref_un(op, v, al);
            dref[i] = moe_f32(dy)[i] * (ref_un(op, v + h, al) - ref_un(op, v - h, al)) / (2 * h);
        }
        char name[64];
        snprintf(name, sizeof name, "unary op %d", op);
        CHECK_OK(name, moe_op_unary(ctx, op, out, in, al));
        CHECK_CLOSE(name, moe_f32(out), ref, n, 1e-6, 1e-5);
        snprintf(name, sizeof name, "unary_backward op %d", op);
        CHECK_OK(name, moe_op_unary_backward(ctx, op, dx, dy, in, al));
        CHECK_CLOSE(name, moe_f32(dx), dref, n, 1e-4, 1e-4);
    }
    /* strided input */
    moe_tensor *xt = moe_tensor_transpose(x, 0, 1);
    double ref[64];
    for (int i = 0; i < 8; i++)
        for (int j = 0; j < 8; j++) ref[i * 8 + j] = tanh(moe_f32(x)[j * 8 + i]);
    CHECK_OK("unary strided input", moe_op_unary(ctx, MOE_UN_TANH, out, xt, 0));
    CHECK_CLOSE("unary strided input", moe_f32(out), ref, 64, 1e-6, 1e-5);
    /* axpy */
    moe_tensor *y = RANDN(8, 8);
    for (int i = 0; i < 64; i++) ref[i] = moe_f32(y)[i] + 0.3 * moe_f32(dy)[i];
    CHECK_OK("axpy", moe_op_axpy(ctx, y, 0.3f, dy));
    CHECK_CLOSE("axpy", moe_f32(y), ref, 64, 1e-6, 1e-6);
    rel(x); rel(xp); rel(out); rel(dy); rel(dx); rel(xt); rel(y);
}

/* ---- reductions ---- */

static void test_reduce(void) {
    moe_tensor *x = RANDN(3, 4, 5);
    const float *p = moe_f32(x);
    int64_t sh[3] = {3, 4, 5};
    for (int op = 0; op < MOE_NUM_REDUCE; op++)
        for (int d = 0; d < 3; d++) {
            int64_t os[2];
            for (int i = 0, j = 0; i < 3; i++) if (i != d) os[j++] = sh[i];
            moe_tensor *out = zeros_(os, 2);
            double ref[20];
            for (int i = 0; i < os[0]; i++)
                for (int j = 0; j < os[1]; j++) {
                    double acc = op == MOE_RED_MAX ? -1e30 : op == MOE_RED_MIN ? 1e30 : 0;
                    for (int r = 0; r < sh[d]; r++) {
                        int64_t ix[3], k = 0;
                        for (int q = 0; q < 3; q++) ix[q] = q == d ? r : (k++ == 0 ? i : j);
                        double v = p[(ix[0] * 4 + ix[1]) * 5 + ix[2]];
                        acc = op == MOE_RED_MAX ? fmax(acc, v) : op == MOE_RED_MIN ? fmin(acc, v) : acc + v;
                    }
                    ref[i * os[1] + j] = op == MOE_RED_MEAN ? acc / sh[d] : acc;
                }
            char name[64];
            snprintf(name, sizeof name, "reduce op %d over dim %d", op, d);
            CHECK_OK(name, moe_op_reduce(ctx, op, out, x, d - 3 * (d == 2)));   /* dim 2 passed as -1 */
            CHECK_CLOSE(name, moe_f32(out), ref, os[0] * os[1], 1e-5, 1e-5);
            rel(out);
        }
    moe_tensor *s = ZEROS(1);
    double tot = 0;
    for (int i = 0; i < 60; i++) tot += p[i];
    CHECK_OK("reduce_all sum", moe_op_reduce_all(ctx, MOE_RED_SUM, s, x));
    CHECK_CLOSE("reduce_all sum", moe_f32(s), &tot, 1, 1e-5, 1e-5);
    /* sum_to: [4,5,3] back to [5,1] */
    moe_tensor *g = RANDN(4, 5, 3), *o = ZEROS(5, 1);
    double ref[5] = {0};
    for (int i = 0; i < 4; i++)
        for (int j = 0; j < 5; j++)
            for (int k = 0; k < 3; k++) ref[j] += moe_f32(g)[(i * 5 + j) * 3 + k];
    CHECK_OK("sum_to [4,5,3] -> [5,1]", moe_op_sum_to(ctx, o, g));
    CHECK_CLOSE("sum_to [4,5,3] -> [5,1]", moe_f32(o), ref, 5, 1e-5, 1e-5);
    rel(x); rel(s); rel(g); rel(o);
}

/* ---- softmax family ---- */

static void test_softmax(void) {
    int64_t R = 6, n = 37;
    moe_tensor *x = RANDN(2, 3, 37), *y = ZEROS(2, 3, 37), *ly = ZEROS(2, 3, 37), *lse = ZEROS(2, 3);
    moe_tensor *dy = RANDN(2, 3, 37), *dx = ZEROS(2, 3, 37);
    for (int i = 0; i < R * n; i++) moe_f32(x)[i] *= 4;
    double ref[222], lref[222], lsr[6], dref[222];
    for (int r = 0; r < R; r++) {
        const float *xr = moe_f32(x) + r * n;
        double m = -1e30, s = 0;
        for (int i = 0; i < n; i++) m = fmax(m, xr[i]);
        for (int i = 0; i < n; i++) s += exp(xr[i] - m);
        lsr[r] = m + log(s);
        for (int i = 0; i < n; i++) { ref[r * n + i] = exp(xr[i] - lsr[r]); lref[r * n + i] = xr[i] - lsr[r]; }
    }
    CHECK_OK("softmax", moe_op_softmax(ctx, y, x));
    CHECK_CLOSE("softmax", moe_f32(y), ref, R * n, 1e-7, 1e-5);
    CHECK_OK("log_softmax", moe_op_log_softmax(ctx, ly, x));
    CHECK_CLOSE("log_softmax", moe_f32(ly), lref, R * n, 1e-5, 1e-5);
    CHECK_OK("logsumexp", moe_op_logsumexp(ctx, lse, x));
    CHECK_CLOSE("logsumexp", moe_f32(lse), lsr, R, 1e-5, 1e-5);
    for (int r = 0; r < R; r++) {
        double d = 0;
        for (int i = 0; i < n; i++) d += (double)moe_f32(dy)[r * n + i] * moe_f32(y)[r * n + i];
        for (int i = 0; i < n; i++) dref[r * n + i] = moe_f32(y)[r * n + i] * (moe_f32(dy)[r * n + i] - d);
    }
    CHECK_OK("softmax_backward", moe_op_softmax_backward(ctx, dx, dy, y));
    CHECK_CLOSE("softmax_backward", moe_f32(dx), dref, R * n, 1e-6, 1e-4);
    for (int r = 0; r < R; r++) {
        double s = 0;
        for (int i = 0; i < n; i++) s += moe_f32(dy)[r * n + i];
        for (int i = 0; i < n; i++) dref[r * n + i] = moe_f32(dy)[r * n + i] - exp(moe_f32(ly)[r * n + i]) * s;
    }
    CHECK_OK("log_softmax_backward", moe_op_log_softmax_backward(ctx, dx, dy, ly));
    CHECK_CLOSE("log_softmax_backward", moe_f32(dx), dref, R * n, 1e-5, 1e-4);
    rel(x); rel(y); rel(ly); rel(lse); rel(dy); rel(dx);
}

/* ---- selection and indexing ---- */

static void test_index(void) {
    /* topk with ties: lower index first */
    for (int big = 0; big < 2; big++) {
        int64_t n = 40, k = big ? 20 : 3;
        moe_tensor *x = RANDN(2, 40), *v = ZEROS(2, k), *ix = tnew(MOE_I64, 2, (int64_t[]){2, k});
        float *px = moe_f32(x);
        px[5] = px[9] = px[30] = 10.0f;   /* a three-way tie at the top of row 0 */
        px[40 + 7] = px[40 + 2] = 5.0f;
        CHECK_OK("topk", moe_op_topk(ctx, v, ix, x, (int)k));
        int ok = 1;
        const int64_t *pi = moe_tensor_data(ix);
        for (int r = 0; r < 2 && ok; r++) {
            char used[40] = {0};
            for (int j = 0; j < k && ok; j++) {
                /* the j-th best by (value desc, index asc), found naively */
                int64_t best = -1;
                for (int i = 0; i < n; i++)
                    if (!used[i] && (best < 0 || px[r * n + i] > px[r * n + best])) best = i;
                used[best] = 1;
                ok = pi[r * k + j] == best && moe_f32(v)[r * k + j] == px[r * n + best];
            }
        }
        report(ok, big ? "topk k=20 (sort path) ties by lower index" : "topk k=3 ties by lower index",
               "order differs from the reference");
        rel(x); rel(v); rel(ix);
    }
    /* gather / scatter_add */
    {
        moe_tensor *x = RANDN(3, 6), *out = ZEROS(3, 4), *dst = RANDN(3, 6), *src = RANDN(3, 4);
        int64_t iv[12] = {0, 5, 5, 2, 1, 1, 3, 4, 5, 0, 2, 2};
        moe_tensor *ix = idx_((int64_t[]){3, 4}, 2, iv);
        double ref[18];
        for (int r = 0; r < 3; r++)
            for (int j = 0; j < 4; j++) ref[r * 4 + j] = moe_f32(x)[r * 6 + iv[r * 4 + j]];
        CHECK_OK("gather", moe_op_gather(ctx, out, x, ix));
        CHECK_CLOSE("gather", moe_f32(out), ref, 12, 0, 1e-7);
        for (int i = 0; i < 18; i++) ref[i] = moe_f32(dst)[i];
        for (int r = 0; r < 3; r++)
            for (int j = 0; j < 4; j++) ref[r * 6 + iv[r * 4 + j]] += moe_f32(src)[r * 4 + j];
        CHECK_OK("scatter_add", moe_op_scatter_add(ctx, dst, ix, src));
        CHECK_CLOSE("scatter_add", moe_f32(dst), ref, 18, 1e-6, 1e-6);
        iv[7] = 6;
        moe_tensor *bad = idx_((int64_t[]){3, 4}, 2, iv);
        moe_status s = moe_op_gather(ctx, out, x, bad);
        report(s == MOE_ERR_RANGE && strstr(moe_last_error(), "[0, 6)"), "gather out-of-range index -> MOE_ERR_RANGE",
               "status %s, message '%s'", moe_status_name(s), moe_last_error());
        rel(x); rel(out); rel(dst); rel(src); rel(ix); rel(bad);
    }
    /* index_select / index_add (repeated rows), embedding */
    {
        moe_tensor *x = RANDN(5, 2, 3), *out = ZEROS(4, 2, 3), *dst = RANDN(5, 2, 3), *src = RANDN(4, 2, 3);
        int64_t iv[4] = {4, 0, 4, 2};
        moe_tensor *ix = idx_((int64_t[]){4}, 1, iv);
        double ref[30];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 6; j++) ref[i * 6 + j] = moe_f32(x)[iv[i] * 6 + j];
        CHECK_OK("index_select", moe_op_index_select(ctx, out, x, ix));
        CHECK_CLOSE("index_select", moe_f32(out), ref, 24, 0, 1e-7);
        for (int i = 0; i < 30; i++) ref[i] = moe_f32(dst)[i];
        for (int i = 0; i < 4; i++)
            for (int j = 0; j < 6; j++) ref[iv[i] * 6 + j] += moe_f32(src)[i * 6 + j];
        CHECK_OK("index_add", moe_op_index_add(ctx, dst, ix, src));
        CHECK_CLOSE("index_add", moe_f32(dst), ref, 30, 1e-6, 1e-6);
        rel(x); rel(out); rel(dst); rel(src); rel(ix);

        moe_tensor *table = RANDN(7, 4), *eo = ZEROS(2, 3, 4), *dt = RANDN(7, 4), *dout = RANDN(2, 3, 4);
        int64_t ids[6] = {6, 0, 3, 3, 1, 6};
        moe_tensor *it = idx_((int64_t[]){2, 3}, 2, ids);
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) ref[i * 4 + j] = moe_f32(table)[ids[i] * 4 + j];
        CHECK_OK("embedding", moe_op_embedding(ctx, eo, table, it));
        CHECK_CLOSE("embedding", moe_f32(eo), ref, 24, 0, 1e-7);
        for (int i = 0; i < 28; i++) ref[i] = moe_f32(dt)[i];
        for (int i = 0; i < 6; i++)
            for (int j = 0; j < 4; j++) ref[ids[i] * 4 + j] += moe_f32(dout)[i * 4 + j];
        CHECK_OK("embedding_backward", moe_op_embedding_backward(ctx, dt, dout, it));
        CHECK_CLOSE("embedding_backward", moe_f32(dt), ref, 28, 1e-6, 1e-6);
        ids[2] = -1;
        moe_tensor *bad = idx_((int64_t[]){2, 3}, 2, ids);
        moe_status s = moe_op_embedding(ctx, eo, table, bad);
        report(s == MOE_ERR_RANGE && strstr(moe_last_error(), "-1"), "embedding negative id -> MOE_ERR_RANGE",
               "status %s, message '%s'", moe_status_name(s), moe_last_error());
        rel(table); rel(eo); rel(dt); rel(dout); rel(it); rel(bad);
    }
}

/* ---- norms ---- */

static void test_norms(void) {
    int64_t R = 6, D = 19;
    moe_tensor *x = RANDN(2, 3, 19), *w = RANDN(19), *b = RANDN(19), *y = ZEROS(2, 3, 19);
    moe_tensor *rstd = ZEROS(6), *mean = ZEROS(6);
    double ref[114], rref[6], mref[6];
    const float *px = moe_f32(x), *pw = moe_f32(w), *pb = moe_f32(b);
    for (int r = 0; r < R; r++) {
        double ss = 0;
        for (int i = 0; i < D; i++) ss += (double)px[r * D + i] * px[r * D + i];
        rref[r] = 1 / sqrt(ss / D + 1e-5);
        for (int i = 0; i < D; i++) ref[r * D + i] = px[r * D + i] * rref[r] * pw[i];
    }
    CHECK_OK("rmsnorm", moe_op_rmsnorm(ctx, y, rstd, x, w, 1e-5f));
    CHECK_CLOSE("rmsnorm", moe_f32(y), ref, R * D, 1e-6, 1e-5);
    CHECK_CLOSE("rmsnorm rstd", moe_f32(rstd), rref, R, 1e-6, 1e-5);
    for (int r = 0; r < R; r++) {
        double mu = 0, var = 0;
        for (int i = 0; i < D; i++) mu += px[r * D + i];
        mu /= D;
        for (int i = 0; i < D; i++) var += (px[r * D + i] - mu) * (px[r * D + i] - mu);
        mref[r] = mu;
        rref[r] = 1 / sqrt(var / D + 1e-5);
        for (int i = 0; i < D; i++) ref[r * D + i] = (px[r * D + i] - mu) * rref[r] * pw[i] + pb[i];
    }
    CHECK_OK("layernorm", moe_op_layernorm(ctx, y, mean, rstd, x, w, b, 1e-5f));
    CHECK_CLOSE("layernorm", moe_f32(y), ref, R * D, 1e-6, 1e-5);
    CHECK_CLOSE("layernorm mean", moe_f32(mean), mref, R, 1e-6, 1e-5);
    /* rmsnorm dw accumulates: dw += sum_r dy * x * rstd */
    moe_tensor *dy = RANDN(2, 3, 19), *dx = ZEROS(2, 3, 19), *dw = RANDN(19);
    CHECK_OK("rmsnorm forward again", moe_op_rmsnorm(ctx, y, rstd, x, w, 1e-5f));
    double dwref[19];
    for (int i = 0; i < D; i++) {
        dwref[i] = moe_f32(dw)[i];
        for (int r = 0; r < R; r++) dwref[i] += (double)moe_f32(dy)[r * D + i] * px[r * D + i] * moe_f32(rstd)[r];
    }
    CHECK_OK("rmsnorm_backward", moe_op_rmsnorm_backward(ctx, dx, dw, dy, x, w, rstd));
    CHECK_CLOSE("rmsnorm_backward dw accumulates", moe_f32(dw), dwref, D, 1e-5, 1e-5);
    /* beta 1 adds dx to what the tensor held; beta 0 never reads it (NaN there stays out) */
    moe_tensor *dxa = RANDN(2, 3, 19), *dxn = ZEROS(2, 3, 19);
    double dxref[2 * 3 * 19];
    for (int i = 0; i < 2 * 3 * 19; i++) dxref[i] = moe_f32(dxa)[i] + moe_f32(dx)[i];
    CHECK_OK("rmsnorm_backward_beta 1", moe_op_rmsnorm_backward_beta(ctx, dxa, NULL, dy, x, w, rstd, 1.0f));
    CHECK_CLOSE("rmsnorm_backward_beta 1 adds", moe_f32(dxa), dxref, 2 * 3 * 19, 1e-6, 1e-5);
    for (int i = 0; i < 2 * 3 * 19; i++) { moe_f32(dxn)[i] = NAN; dxref[i] = moe_f32(dx)[i]; }
    CHECK_OK("rmsnorm_backward_beta 0", moe_op_rmsnorm_backward_beta(ctx, dxn, NULL, dy, x, w, rstd, 0.0f));
    CHECK_CLOSE("rmsnorm_backward_beta 0 ignores the old values", moe_f32(dxn), dxref, 2 * 3 * 19, 1e-6, 1e-5);
    rel(dxa); rel(dxn);
    /* rmsnorm then rope per head in one op (the CPU runs the two): the same values as the two ops */
    {
        moe_tensor *qx = RANDN(2, 3, 8), *qw = RANDN(8), *qy = ZEROS(2, 3, 8), *qr = ZEROS(2, 3);
        moe_tensor *ry = ZEROS(2, 3, 8), *rr = ZEROS(2, 3);
        CHECK_OK("rmsnorm_rope", moe_op_rmsnorm_rope(ctx, qy, qr, qx, qw, 1e-5f, 2, 0, 10000.0f));
        CHECK_OK("rmsnorm for rmsnorm_rope", moe_op_rmsnorm(ctx, ry, rr, qx, qw, 1e-5f));
        moe_tensor *ry4 = moe_tensor_view(ry, 4, (int64_t[]){2, 3, 2, 4});
        CHECK_OK("rope for rmsnorm_rope", moe_op_rope(ctx, ry4, ry4, 0, 10000.0f, 0));
        double ref[48];
        for (int i = 0; i < 48; i++) ref[i] = moe_f32(ry)[i];
        CHECK_CLOSE("rmsnorm_rope = rmsnorm then rope", moe_f32(qy), ref, 48, 1e-7, 1e-6);
        moe_status sr = moe_op_rmsnorm_rope(ctx, qy, qr, qx, qw, 1e-5f, 3, 0, 10000.0f);
        report(sr == MOE_ERR_SHAPE && strstr(moe_last_error(), "heads"), "rmsnorm_rope: 3 heads do not divide 8",
               "status %s: %s", moe_status_name(sr), moe_last_error());
        rel(qx); rel(qw); rel(qy); rel(qr); rel(ry); rel(rr); rel(ry4);
    }
    /* error message names expected vs got */
    moe_tensor *w8 = RANDN(8);
    moe_status s = moe_op_rmsnorm(ctx, y, rstd, x, w8, 1e-5f);
    report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "[8]") && strstr(moe_last_error(), "[19]"),
           "rmsnorm wrong weight shape -> MOE_ERR_SHAPE with expected vs got", "status %s, message '%s'",
           moe_status_name(s), moe_last_error());
    rel(x); rel(w); rel(b); rel(y); rel(rstd); rel(mean); rel(dy); rel(dx); rel(dw); rel(w8);
}

/* ---- rope ---- */

static void test_rope(void) {
    int64_t B = 2, T = 5, H = 3, D = 8, n = B * T * H * D;
    moe_tensor *x = RANDN(2, 5, 3, 8), *y = ZEROS(2, 5, 3, 8), *z = ZEROS(2, 5, 3, 8);
    double *ref = malloc((size_t)n * sizeof(double));
    const float *px = moe_f32(x);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++)
            for (int h = 0; h < H; h++)
                for (int i = 0; i < D / 2; i++) {
                    int64_t o = ((b * T + t) * H + h) * D;
                    double ang = (3 + t) * pow(10000.0, -2.0 * i / D);
                    ref[o + i] = px[o + i] * cos(ang) - px[o + i + D / 2] * sin(ang);
                    ref[o + i + D / 2] = px[o + i + D / 2] * cos(ang) + px[o + i] * sin(ang);
                }
    CHECK_OK("rope", moe_op_rope(ctx, y, x, 3, 10000.0f, 0));
    CHECK_CLOSE("rope", moe_f32(y), ref, n, 1e-6, 1e-5);
    CHECK_OK("rope inverse", moe_op_rope(ctx, z, y, 3, 10000.0f, 1));
    report(cmpf(moe_f32(z), px, n, 1e-6, 1e-5) <= 1, "rope then inverse rope restores x", "mismatch");
    free(ref);
    rel(x); rel(y); rel(z);
}

/* ---- attention ---- */

/* naive O(T S) reference, forward and backward, in double */
static void ref_attention(int64_t B, int64_t T, int64_t S, int64_t Hq, int64_t Hkv, int64_t D, const float *q,
                          const float *k, const float *v, const float *dout, float scale, int causal, double *out,
                          double *lse, double *dq, double *dk, double *dv) {
    int64_t G = Hq / Hkv;
    memset(dk, 0, (size_t)(B * S * Hkv * D) * sizeof(double));
    memset(dv, 0, (size_t)(B * S * Hkv * D) * sizeof(double));
    double *p = malloc((size_t)S * sizeof(double)), *dp = malloc((size_t)S * sizeof(double));
    for (int64_t b = 0; b < B; b++)
        for (int64_t h = 0; h < Hq; h++)
            for (int64_t t = 0; t < T; t++) {
                int64_t hk = h / G, qo = ((b * T + t) * Hq + h) * D;
                double m = -INFINITY, l = 0;
                for (int64_t s = 0; s < S; s++) {
                    if (causal && s > t + S - T) { p[s] = -INFINITY; continue; }
                    double sc = 0;
                    for (int64_t d = 0; d < D; d++) sc += (double)q[qo + d] * k[((b * S + s) * Hkv + hk) * D + d];
                    p[s] = sc * scale;
                    m = fmax(m, p[s]);
                }
                for (int64_t s = 0; s < S; s++) l += p[s] == -INFINITY ? 0 : exp(p[s] - m);
                lse[(b * Hq + h) * T + t] = m + log(l);
                for (int64_t s = 0; s < S; s++) p[s] = p[s] == -INFINITY ? 0 : exp(p[s] - m) / l;
                double di = 0;
                for (int64_t d = 0; d < D; d++) {
                    double o = 0;
                    for (int64_t s = 0; s < S; s++) o += p[s] * v[((b * S + s) * Hkv + hk) * D + d];
                    out[qo + d] = o;
                    di += o * dout[qo + d];
                }
                for (int64_t s = 0; s < S; s++) {
                    dp[s] = 0;
                    for (int64_t d = 0; d < D; d++) dp[s] += (double)dout[qo + d] * v[((b * S + s) * Hkv + hk) * D + d];
                    dp[s] = p[s] * (dp[s] - di);   /* now dS */
                }
                for (int64_t d = 0; d < D; d++) {
                    double g = 0;
                    for (int64_t s = 0; s < S; s++) {
                        int64_t ko = ((b * S + s) * Hkv + hk) * D + d;
                        g += dp[s] * k[ko];
                        dk[ko] += scale * dp[s] * q[qo + d];
                        dv[ko] += p[s] * dout[qo + d];
                    }
                    dq[qo + d] = scale * g;
                }
            }
    free(p);
    free(dp);
}

static void test_attention(void) {
    int64_t B = 2, T = 5, S = 7, Hq = 4, Hkv = 2, D = 8;
    int64_t nq = B * T * Hq * D, nk = B * S * Hkv * D;
    for (int causal = 0; causal < 2; causal++) {
        moe_tensor *q = RANDN(2, 5, 4, 8), *k = RANDN(2, 7, 2, 8), *v = RANDN(2, 7, 2, 8), *dout = RANDN(2, 5, 4, 8);
        moe_tensor *out = ZEROS(2, 5, 4, 8), *lse = ZEROS(2, 4, 5);
        moe_tensor *dq = ZEROS(2, 5, 4, 8), *dk = ZEROS(2, 7, 2, 8), *dv = ZEROS(2, 7, 2, 8);
        double ro[320], rl[40], rdq[320], rdk[224], rdv[224];
        float scale = 1.0f / sqrtf((float)D);
        ref_attention(B, T, S, Hq, Hkv, D, moe_f32(q), moe_f32(k), moe_f32(v), moe_f32(dout), scale, causal, ro, rl,
                      rdq, rdk, rdv);
        char name[96];
        snprintf(name, sizeof name, "attention GQA 4/2 T=5 S=7 causal=%d", causal);
        CHECK_OK(name, moe_op_attention(ctx, out, lse, q, k, v, scale, causal));
        CHECK_CLOSE(name, moe_f32(out), ro, nq, 1e-5, 1e-4);
        snprintf(name, sizeof name, "attention lse causal=%d", causal);
        CHECK_CLOSE(name, moe_f32(lse), rl, B * Hq * T, 1e-5, 1e-5);
        snprintf(name, sizeof name, "attention_backward causal=%d", causal);
        CHECK_OK(name, moe_op_attention_backward(ctx, dq, dk, dv, dout, q, k, v, out, lse, scale, causal));
        double e = cmp(moe_f32(dq), rdq, nq, 1e-4, 1e-3);
        double e2 = cmp(moe_f32(dk), rdk, nk, 1e-4, 1e-3), e3 = cmp(moe_f32(dv), rdv, nk, 1e-4, 1e-3);
        report(e <= 1 && e2 <= 1 && e3 <= 1, name, "error ratios dq %.3g dk %.3g dv %.3g", e, e2, e3);
        rel(q); rel(k); rel(v); rel(dout); rel(out); rel(lse); rel(dq); rel(dk); rel(dv);
    }
}

/* ---- swiglu, cross-entropy, adamw ---- */

static void test_misc(void) {
    moe_tensor *g = RANDN(3, 11), *u = RANDN(3, 11), *o = ZEROS(3, 11), *d = RANDN(3, 11);
    moe_tensor *dg = ZEROS(3, 11), *du = ZEROS(3, 11);
    double ref[33], rg[33], ru[33];
    for (int i = 0; i < 33; i++) {
        double x = moe_f32(g)[i], y = moe_f32(u)[i], dd = moe_f32(d)[i], s = 1 / (1 + exp(-x));
        ref[i] = x * s * y;
        rg[i] = dd * y * s * (1 + x * (1 - s));
        ru[i] = dd * x * s;
    }
    CHECK_OK("swiglu", moe_op_swiglu(ctx, o, g, u));
    CHECK_CLOSE("swiglu", moe_f32(o), ref, 33, 1e-6, 1e-5);
    CHECK_OK("swiglu_backward", moe_op_swiglu_backward(ctx, dg, du, d, g, u));
    report(cmp(moe_f32(dg), rg, 33, 1e-6, 1e-5) <= 1 && cmp(moe_f32(du), ru, 33, 1e-6, 1e-5) <= 1, "swiglu_backward",
           "mismatch");
    rel(g); rel(u); rel(o); rel(d); rel(dg); rel(du);

    /* cross-entropy with an ignored row */
    int64_t N = 4, V = 13, tg[4] = {3, -100, 12, 0};
    moe_tensor *lg = RANDN(4, 13), *loss = ZEROS(4), *lse = ZEROS(4), *t = idx_((int64_t[]){4}, 1, tg);
    moe_tensor *dl = ZEROS(4, 13);
    double lr[4], lsr[4], dr[52];
    for (int r = 0; r < N; r++) {
        const float *x = moe_f32(lg) + r * V;
        double m = -1e30, s = 0;
        for (int i = 0; i < V; i++) m = fmax(m, x[i]);
        for (int i = 0; i < V; i++) s += exp(x[i] - m);
        lsr[r] = m + log(s);
        lr[r] = tg[r] == -100 ? 0 : lsr[r] - x[tg[r]];
        for (int i = 0; i < V; i++)
            dr[r * V + i] = tg[r] == -100 ? 0 : 0.25 * (exp(x[i] - lsr[r]) - (i == tg[r]));
    }
    CHECK_OK("cross_entropy", moe_op_cross_entropy(ctx, loss, lse, lg, t, -100));
    CHECK_CLOSE("cross_entropy (ignored row has loss 0)", moe_f32(loss), lr, N, 1e-6, 1e-5);
    CHECK_CLOSE("cross_entropy lse", moe_f32(lse), lsr, N, 1e-6, 1e-5);
    CHECK_OK("cross_entropy_backward", moe_op_cross_entropy_backward(ctx, dl, lg, lse, t, -100, 0.25f));
    CHECK_CLOSE("cross_entropy_backward", moe_f32(dl), dr, N * V, 1e-7, 1e-5);
    /* both at once (the CPU composes the two ops) */
    moe_tensor *floss = ZEROS(4), *flse = ZEROS(4), *fdl = ZEROS(4, 13), *bad = ZEROS(4, 12);
    CHECK_OK("cross_entropy_fused", moe_op_cross_entropy_fused(ctx, floss, flse, fdl, lg, t, -100, 0.25f));
    CHECK_CLOSE("cross_entropy_fused loss", moe_f32(floss), lr, N, 1e-6, 1e-5);
    CHECK_CLOSE("cross_entropy_fused lse", moe_f32(flse), lsr, N, 1e-6, 1e-5);
    CHECK_CLOSE("cross_entropy_fused dlogits", moe_f32(fdl), dr, N * V, 1e-7, 1e-5);
    moe_status sf = moe_op_cross_entropy_fused(ctx, floss, flse, bad, lg, t, -100, 0.25f);
    report(sf == MOE_ERR_SHAPE && strstr(moe_last_error(), "dlogits"), "cross_entropy_fused: dlogits of another shape",
           "status %s: %s", moe_status_name(sf), moe_last_error());
    rel(floss); rel(flse); rel(fdl); rel(bad);
    tg[2] = 13;
    moe_tensor *tb = idx_((int64_t[]){4}, 1, tg);
    moe_status s = moe_op_cross_entropy(ctx, loss, lse, lg, tb, -100);
    report(s == MOE_ERR_RANGE, "cross_entropy target out of range -> MOE_ERR_RANGE", "status %s", moe_status_name(s));
    rel(lg); rel(loss); rel(lse); rel(t); rel(dl); rel(tb);

    /* adamw, two steps by hand (step 2 exercises the bias corrections) */
    moe_tensor *p = RANDN(50), *gr = RANDN(50), *m = ZEROS(50), *v = ZEROS(50);
    double rp[50], rm[50] = {0}, rv[50] = {0};
    moe_adamw_cfg cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .step = 1};
    for (int i = 0; i < 50; i++) rp[i] = moe_f32(p)[i];
    for (int step = 1; step <= 2; step++) {
        cfg.step = step;
        for (int i = 0; i < 50; i++) {
            double gi = moe_f32(gr)[i];
            rm[i] = 0.9 * rm[i] + 0.1 * gi;
            rv[i] = 0.95 * rv[i] + 0.05 * gi * gi;
            double mh = rm[i] / (1 - pow(0.9, step)), vh = rv[i] / (1 - pow(0.95, step));
            rp[i] -= 1e-2 * (mh / (sqrt(vh) + 1e-8) + 0.1 * rp[i]);
        }
        CHECK_OK("adamw", moe_op_adamw(ctx, p, gr, m, v, &cfg));
    }
    CHECK_CLOSE("adamw two steps by hand", moe_f32(p), rp, 50, 1e-6, 1e-5);
    rel(p); rel(gr); rel(m); rel(v);
}

/* ---- memory ops and errors ---- */

static void test_memory_and_errors(void) {
    moe_tensor *x = RANDN(4, 6), *xt = moe_tensor_transpose(x, 0, 1);
    moe_tensor *c = moe_op_contiguous(ctx, xt);
    int ok = c && moe_tensor_is_contiguous(c);
    for (int i = 0; ok && i < 6; i++)
        for (int j = 0; j < 4; j++) ok &= moe_f32(c)[i * 4 + j] == moe_f32(x)[j * 6 + i];
    report(ok, "contiguous of a transposed view", "values differ");
    moe_tensor *hb = moe_op_to(ctx, x, MOE_DEVICE_CPU, MOE_BF16), *back = hb ? moe_op_to(ctx, hb, MOE_DEVICE_CPU, MOE_F32) : NULL;
    report(back && cmpf(moe_f32(back), moe_f32(x), 24, 0, 1.0 / 128) <= 1, "to bf16 and back", "%s", moe_last_error());
    moe_tensor *col = moe_tensor_narrow(x, 1, 2, 1);
    CHECK_OK("fill strided view", moe_op_fill(ctx, col, 7.0));
    ok = 1;
    for (int i = 0; i < 4; i++) ok &= moe_f32(x)[i * 6 + 2] == 7.0f && moe_f32(x)[i * 6 + 3] != 7.0f;
    report(ok, "fill strided view writes only the view", "wrong values");
    moe_tensor *r1 = ZEROS(1000), *r2 = ZEROS(1000);
    CHECK_OK("fill_randn", moe_op_fill_randn(ctx, r1, 42, 100, 1.0f, 2.0f));
    float ref[1000];
    moe_rng_normal(ref, 1000, 42, 100);
    for (int i = 0; i < 1000; i++) ref[i] = 1.0f + 2.0f * ref[i];
    report(cmpf(moe_f32(r1), ref, 1000, 0, 1e-6) <= 1, "fill_randn matches the counter stream", "mismatch");
    CHECK_OK("fill_rand", moe_op_fill_rand(ctx, r2, 7, 0, -1.0f, 1.0f));
    ok = 1;
    for (int i = 0; i < 1000; i++) ok &= moe_f32(r2)[i] > -1.0f && moe_f32(r2)[i] < 1.0f;
    report(ok, "fill_rand in range", "out of range");

    moe_clear_error();
    moe_tensor *a = RANDN(3, 4), *b = RANDN(5), *o = ZEROS(3, 4);
    moe_status s = moe_op_binary(ctx, MOE_BIN_ADD, o, a, b);
    report(s == MOE_ERR_SHAPE && moe_last_error()[0], "binary mismatched shapes -> MOE_ERR_SHAPE with a message",
           "status %s, message '%s'", moe_status_name(s), moe_last_error());
    moe_tensor *g2 = RANDN(3, 5);
    s = moe_op_gemm(ctx, 0, 0, 1.0f, a, g2, 0.0f, o);
    report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "inner"), "gemm inner-dim mismatch -> MOE_ERR_SHAPE",
           "status %s, message '%s'", moe_status_name(s), moe_last_error());
    moe_tensor *hb2 = tnew(MOE_BF16, 2, (int64_t[]){3, 4});
    s = moe_op_binary(ctx, MOE_BIN_ADD, o, a, hb2);
    report(s == MOE_ERR_DTYPE, "binary mixed dtypes -> MOE_ERR_DTYPE", "status %s", moe_status_name(s));
    moe_tensor *hb3 = tnew(MOE_BF16, 2, (int64_t[]){3, 4});
    s = moe_op_softmax(ctx, hb3, hb2);
    report(s == MOE_ERR_DTYPE && strstr(moe_last_error(), "f32"), "cpu softmax on bf16 -> MOE_ERR_DTYPE",
           "status %s '%s'", moe_status_name(s), moe_last_error());
    s = moe_op_reduce(ctx, MOE_RED_SUM, o, a, 5);
    report(s == MOE_ERR_RANGE, "reduce bad dim -> MOE_ERR_RANGE", "status %s", moe_status_name(s));
    s = moe_op_softmax(ctx, NULL, a);
    report(s == MOE_ERR_ARG, "NULL tensor -> MOE_ERR_ARG", "status %s", moe_status_name(s));
    int64_t off[3] = {0, 5, 2};
    moe_tensor *w3 = RANDN(2, 4, 4), *a5 = RANDN(2, 4), *c5 = ZEROS(2, 4);
    s = moe_op_gemm_grouped(ctx, 0, 1.0f, a5, w3, 0.0f, c5, off, 2);
    report(s == MOE_ERR_ARG, "gemm_grouped decreasing offsets -> MOE_ERR_ARG", "status %s", moe_status_name(s));
    moe_tensor *q = ZEROS(1, 2, 3, 4), *kv = ZEROS(1, 2, 2, 4), *lse = ZEROS(1, 3, 2), *ao = ZEROS(1, 2, 3, 4);
    s = moe_op_attention(ctx, ao, lse, q, kv, kv, 1.0f, 0);
    report(s == MOE_ERR_SHAPE, "attention Hq not a multiple of Hkv -> MOE_ERR_SHAPE", "status %s", moe_status_name(s));
    moe_status cs = moe_cuda_backend_install(ctx);
    report(cs == MOE_ERR_DEVICE || cs == MOE_OK, "cuda install without CUDA reports MOE_ERR_DEVICE", "status %s",
           moe_status_name(cs));
    rel(x); rel(xt); rel(c); rel(hb); rel(back); rel(col); rel(r1); rel(r2); rel(a); rel(b); rel(o); rel(g2);
    rel(hb2); rel(hb3); rel(w3); rel(a5); rel(c5); rel(q); rel(kv); rel(lse); rel(ao);
}

/* ---- thread-count independence ---- */

static void test_threads(void) {
    moe_ctx *c1 = moe_ctx_new(1), *c2 = moe_ctx_new(2);
    moe_cpu_backend_install(c1);
    moe_cpu_backend_install(c2);
    moe_tensor *q = RANDN(2, 33, 4, 16), *k = RANDN(2, 40, 2, 16), *v = RANDN(2, 40, 2, 16), *dout = RANDN(2, 33, 4, 16);
    moe_tensor *x = RANDN(300, 257), *w = RANDN(257);
    moe_tensor *res[2][8];
    moe_ctx *cs[2] = {c1, c2};
    for (int i = 0; i < 2; i++) {
        moe_tensor **r = res[i];
        r[0] = ZEROS(2, 33, 4, 16); r[1] = ZEROS(2, 4, 33);
        r[2] = ZEROS(2, 33, 4, 16); r[3] = ZEROS(2, 40, 2, 16); r[4] = ZEROS(2, 40, 2, 16);
        r[5] = ZEROS(300, 257); r[6] = ZEROS(300, 257); r[7] = ZEROS(257);
        moe_tensor *rstd = ZEROS(300);
        CHECK_OK("threads attention", moe_op_attention(cs[i], r[0], r[1], q, k, v, 0.25f, 1));
        CHECK_OK("threads attention_backward",
                 moe_op_attention_backward(cs[i], r[2], r[3], r[4], dout, q, k, v, r[0], r[1], 0.25f, 1));
        CHECK_OK("threads softmax", moe_op_softmax(cs[i], r[5], x));
        CHECK_OK("threads rmsnorm", moe_op_rmsnorm(cs[i], r[6], rstd, x, w, 1e-6f));
        CHECK_OK("threads rmsnorm_backward", moe_op_rmsnorm_backward(cs[i], r[6], r[7], x, x, w, rstd));
        rel(rstd);
    }
    int same = 1;
    for (int j = 0; j < 8; j++) same &= !memcmp(moe_f32(res[0][j]), moe_f32(res[1][j]), moe_tensor_nbytes(res[0][j]));
    report(same, "1 thread and 2 threads give bit-identical attention/softmax/rmsnorm", "outputs differ");
    for (int i = 0; i < 2; i++) for (int j = 0; j < 8; j++) rel(res[i][j]);
    rel(q); rel(k); rel(v); rel(dout); rel(x); rel(w);
    moe_ctx_free(c1);
    moe_ctx_free(c2);
}

/* expert-parallel routing maps on a worked example (4 tokens, top-2 of 4
 * experts over 2 ranks, one choice dropped), values derived by hand */
static moe_tensor *i32_(const int64_t *s, int nd, const int32_t *vals) {
    moe_tensor *t = tnew(MOE_I32, nd, s);
    memcpy(moe_tensor_data(t), vals, (size_t)moe_tensor_numel(t) * 4);
    return t;
}
static int same_i64(const moe_tensor *t, const int64_t *v) {
    return !memcmp(moe_tensor_data((moe_tensor *)t), v, (size_t)moe_tensor_numel(t) * 8);
}
static int same_i32(const moe_tensor *t, const int32_t *v) {
    return !memcmp(moe_tensor_data((moe_tensor *)t), v, (size_t)moe_tensor_numel(t) * 4);
}
static void test_ep_maps(void) {
    /* choices: t0 {3, 0}, t1 {1, 2 dropped}, t2 {2, 3}, t3 {0, 1}; rows expert-major */
    moe_tensor *slots = i32_(SHAPE(4, 2), (int32_t[]){5, 0, 2, -1, 4, 6, 1, 3});
    moe_tensor *tok = idx_(SHAPE(7), (int64_t[]){0, 3, 1, 3, 2, 0, 2});
    moe_tensor *ex = idx_(SHAPE(7), (int64_t[]){0, 0, 1, 1, 2, 3, 3});
    moe_tensor *ts = tnew(MOE_I32, 2, (int64_t[]){4, 2});
    moe_tensor *counts = idx_(SHAPE(2), (int64_t[]){-1, -1});
    moe_status s = moe_op_ep_token_slots(ctx, ts, counts, slots, ex, 2);
    report(s == MOE_OK && same_i64(counts, (int64_t[]){3, 2}) && same_i32(ts, (int32_t[]){0, 3, 1, -1, -1, 4, 2, -1}) &&
           ts->index_bound == 5,
           "ep_token_slots: one row per (token, rank), rank-major, bound = the rows", "%s", moe_last_error());
    moe_tensor *st = tnew(MOE_I64, 1, (int64_t[]){5});
    s = moe_op_slot_tokens(ctx, st, ts);
    report(s == MOE_OK && same_i64(st, (int64_t[]){0, 1, 3, 0, 2}) && st->index_bound == 4,
           "slot_tokens: the token of every row, bound N", "%s", moe_last_error());
    moe_tensor *pk = tnew(MOE_I64, 1, (int64_t[]){7});
    s = moe_op_ep_pack(ctx, pk, tok, ex, slots, ts, 2, 2, (int64_t[]){0, -3});
    report(s == MOE_OK && same_i64(pk, (int64_t[]){0, 4, 2, 5, 2, 0, 3}),
           "ep_pack: (receiver row) * width + position among the token's choices on that rank", "%s", moe_last_error());
    /* rank 0 receives a0..a3 (3 token rows), rank 1 a4..a6 (2), here regrouped in reverse */
    moe_tensor *p0 = idx_(SHAPE(4), (int64_t[]){0, 4, 2, 5}), *perm = idx_(SHAPE(4), (int64_t[]){3, 2, 1, 0});
    moe_tensor *tl = tnew(MOE_I64, 1, (int64_t[]){4}), *sl = tnew(MOE_I32, 2, (int64_t[]){3, 2});
    s = moe_op_ep_unpack(ctx, tl, sl, p0, NULL);
    report(s == MOE_OK && same_i64(tl, (int64_t[]){0, 2, 1, 2}) && same_i32(sl, (int32_t[]){0, -1, 2, -1, 1, 3}) &&
           tl->index_bound == 3 && sl->index_bound == 4,
           "ep_unpack: the owner's token rows and slot map", "%s", moe_last_error());
    s = moe_op_ep_unpack(ctx, tl, sl, p0, perm);
    report(s == MOE_OK && same_i64(tl, (int64_t[]){2, 1, 2, 0}) && same_i32(sl, (int32_t[]){3, -1, 1, -1, 2, 0}),
           "ep_unpack: through a regrouping permutation", "%s", moe_last_error());
    /* errors: nothing silently wrong */
    s = moe_op_ep_pack(ctx, pk, tok, ex, slots, ts, 2, 1, (int64_t[]){0, 0});
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "width"), "ep_pack: a width below min(k, group) is refused",
           "%d %s", s, moe_last_error());
    s = moe_op_ep_token_slots(ctx, ts, counts, slots, ex, 1);   /* 4 experts, 2 ranks of 1 */
    report(s == MOE_ERR_RANGE && strstr(moe_last_error(), "expert 3"), "ep_token_slots: experts beyond the ranks are refused",
           "%d %s", s, moe_last_error());
    moe_tensor *dup = i32_(SHAPE(2, 2), (int32_t[]){0, 1, 1, -1}), *st3 = tnew(MOE_I64, 1, (int64_t[]){3});
    s = moe_op_slot_tokens(ctx, st3, dup);
    report(s == MOE_ERR_RANGE && strstr(moe_last_error(), "twice"), "slot_tokens: a row named twice is refused", "%d %s",
           s, moe_last_error());
    moe_tensor *p6 = idx_(SHAPE(4), (int64_t[]){0, 6, 2, 5});
    s = moe_op_ep_unpack(ctx, tl, sl, p6, NULL);
    report(s == MOE_ERR_RANGE && strstr(moe_last_error(), "packed 6"), "ep_unpack: a packed value beyond U * width is refused",
           "%d %s", s, moe_last_error());
    s = moe_op_ep_token_slots(ctx, ts, NULL, slots, ex, 2);
    report(s == MOE_ERR_ARG, "ep_token_slots: NULL counts is refused", "%d %s", s, moe_last_error());
    moe_tensor *c3 = tnew(MOE_I64, 1, (int64_t[]){3});
    s = moe_op_ep_token_slots(ctx, ts, c3, slots, ex, 2);
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "[2]"), "ep_token_slots: counts of the wrong length are refused",
           "%d %s", s, moe_last_error());
    /* regrouping: 2 ranks x 2 local experts, counts (src, j): (0,0)=2 (0,1)=1 (1,0)=0 (1,1)=3; received
     * rows 0-1 are (0,0), 2 (0,1), 3-5 (1,1); expert-major: 0, 1, 2, 3, 4, 5 -> (0,0) (0,0) (0,1) (1,1)... */
    moe_tensor *rp = tnew(MOE_I64, 1, (int64_t[]){6}), *ri = tnew(MOE_I64, 1, (int64_t[]){6});
    s = moe_op_ep_regroup(ctx, rp, ri, (int64_t[]){2, 1, 0, 3}, 2, 2);
    report(s == MOE_OK && same_i64(rp, (int64_t[]){0, 1, 2, 3, 4, 5}) && same_i64(ri, (int64_t[]){0, 1, 2, 3, 4, 5}),
           "ep_regroup: an expert owned by one sender keeps its order", "%s", moe_last_error());
    /* counts (0,0)=1 (0,1)=2 (1,0)=2 (1,1)=1: received 0 | 1 2 | 3 4 | 5 -> expert 0: 0, 3, 4; expert 1: 1, 2, 5 */
    s = moe_op_ep_regroup(ctx, rp, ri, (int64_t[]){1, 2, 2, 1}, 2, 2);
    report(s == MOE_OK && same_i64(rp, (int64_t[]){0, 3, 4, 1, 2, 5}) && same_i64(ri, (int64_t[]){0, 3, 4, 1, 2, 5}) &&
           rp->index_bound == 6, "ep_regroup: expert-major, source rank within; the inverse", "%s", moe_last_error());
    s = moe_op_ep_regroup(ctx, rp, ri, (int64_t[]){1, 2, 2, 2}, 2, 2);
    report(s == MOE_ERR_SHAPE && strstr(moe_last_error(), "7 rows"), "ep_regroup: counts that do not sum to R are refused",
           "%d %s", s, moe_last_error());
    moe_tensor *all[] = {slots, tok, ex, ts, st, pk, p0, perm, tl, sl, dup, st3, p6, rp, ri, counts, c3};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) rel(all[i]);
}

/* the slot-map mark (tensor.h): only on a bounded i32 [N, k] tensor, trusted for
 * exactly its bound's rows, cleared by a bound set anew (an upload's max + 1), by a
 * write through the ops and (with the bound) by a view */
static void test_slot_map_mark(void) {
    moe_tensor *sl = i32_(SHAPE(3, 2), (int32_t[]){0, 2, -1, 1, 3, -1});
    moe_tensor_mark_slot_map(sl);
    report(!moe_tensor_slot_map_trusted(sl, 4), "slot map: no mark without a bound", "marked");
    moe_tensor_set_index_bound(sl, 4);
    moe_tensor_mark_slot_map(sl);
    report(moe_tensor_slot_map_trusted(sl, 4) && !moe_tensor_slot_map_trusted(sl, 5) &&
           moe_tensor_index_trusted(sl, 5),
           "slot map: trusted for exactly its rows (the range alone for more)", "bound %lld", (long long)sl->index_bound);
    moe_tensor_set_index_bound(sl, 4);
    report(!moe_tensor_slot_map_trusted(sl, 4) && moe_tensor_index_trusted(sl, 4),
           "slot map: a bound set anew carries no mark", "still marked");
    moe_tensor_mark_slot_map(sl);
    report(moe_op_fill(ctx, sl, 1.0) == MOE_OK && !moe_tensor_slot_map_trusted(sl, 4), "slot map: a write voids it",
           "still trusted");
    moe_tensor *ids = idx_(SHAPE(4), (int64_t[]){0, 1, 2, 3});
    moe_tensor_set_index_bound(ids, 4);
    moe_tensor_mark_slot_map(ids);
    report(!moe_tensor_slot_map_trusted(ids, 4), "slot map: not on i64 or 1-D indices", "marked");
    /* a view voids the bound while it lives; once it is gone a bound set anew
     * (the refill of a fixed input buffer) holds again */
    int64_t flat[1] = {4};
    moe_tensor *v = moe_tensor_view(ids, 1, flat);
    moe_tensor_set_index_bound(ids, 4);
    report(v && !moe_tensor_index_trusted(ids, 4), "index bound: not taken while a view of the memory lives", "taken");
    rel(v);
    moe_tensor_set_index_bound(ids, 4);
    report(moe_tensor_index_trusted(ids, 4), "index bound: taken again once the view is gone", "bound %lld",
           (long long)ids->index_bound);
    /* the grouped plan mark (tensor.h): not inherited by a view, voided by a write */
    ids->grouped_plan_rows = 4;
    ids->grouped_plan_at = 48;
    moe_tensor *v2 = moe_tensor_view(ids, 1, flat);
    report(v2 && v2->grouped_plan_rows == 0 && ids->grouped_plan_rows == 4, "grouped plan: a view does not carry it",
           "carried");
    rel(v2);
    report(moe_op_fill(ctx, ids, 1.0) == MOE_OK && ids->grouped_plan_rows == 0, "grouped plan: a write voids it",
           "still set");
    rel(sl); rel(ids);
}

int main(void) {
    ctx = moe_ctx_new(2);
    moe_cpu_backend_install(ctx);
    test_gemm();
    test_binary();
    test_unary();
    test_reduce();
    test_softmax();
    test_index();
    test_norms();
    test_rope();
    test_attention();
    test_misc();
    test_ep_maps();
    test_slot_map_mark();
    test_memory_and_errors();
    test_threads();
    moe_ctx_free(ctx);
    return tap_done();
}
