/* The grouped GEMMs with their row offsets in a tensor (ops.h
 * moe_op_gemm_grouped_pair_dev, _wgrad_rows_dev, _swiglu_rows_dev,
 * _swiglu_backward_w_dev): on the CPU they give the host-offset ops' bytes,
 * and they refuse malformed arguments with a clear error. The expert bank
 * takes such a tensor in place of host offsets with the same results. The
 * device side (offsets read by the kernels, nothing copied back) is checked
 * by tests/gpu/check_tma.c on a GPU. Prints TAP. */
#include "../../src/nn/moe_block.h"
#include "../../src/nn/layer.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/ops.h"
#include "tap.h"

#include <math.h>
#include <string.h>

static moe_ctx *ctx;

static moe_tensor *filled(int nd, const int64_t *shape, float phase) {
    moe_tensor *t = moe_tensor_new_cpu(MOE_F32, nd, shape);
    for (int64_t i = 0; i < moe_tensor_numel(t); i++) moe_f32(t)[i] = sinf(0.37f * (float)i + phase);
    return t;
}
static moe_tensor *i64s(int64_t n, const int64_t *v) {
    int64_t s[1] = {n};
    moe_tensor *t = moe_tensor_new_cpu(MOE_I64, 1, s);
    memcpy(moe_tensor_data(t), v, (size_t)n * sizeof *v);
    return t;
}
static int same(const moe_tensor *a, const moe_tensor *b) {
    return moe_tensor_numel(a) == moe_tensor_numel(b) &&
           memcmp(moe_tensor_data(a), moe_tensor_data(b), (size_t)moe_tensor_numel(a) * sizeof(float)) == 0;
}
static void errs(moe_status st, moe_status want, const char *needle, const char *name) {
    report(st == want && strstr(moe_last_error(), needle), name, "status %d, error '%s'", st, moe_last_error());
}

int main(void) {
    ctx = moe_ctx_new(1);
    moe_cpu_backend_install(ctx);
    /* 3 experts over 9 rows, one empty; 5 token rows gathered by index */
    const int64_t G = 3, M = 9, T = 5, K = 6, N = 4, K2 = 3;
    const int64_t off[4] = {0, 4, 4, 9}, rows_v[9] = {0, 2, 4, 1, 3, 0, 1, 2, 4};
    moe_tensor *ot = i64s(4, off), *rows = i64s(9, rows_v);
    moe_tensor_set_index_bound(rows, T);

    {   /* pair: c = 0.7 (a1 b1[g]^T + a2 b2[g]^T) + 0.25 c */
        int64_t sa1[2] = {M, K}, sa2[2] = {M, K2}, sb1[3] = {G, N, K}, sb2[3] = {G, N, K2}, sc[2] = {M, N};
        moe_tensor *a1 = filled(2, sa1, 0), *a2 = filled(2, sa2, 1), *b1 = filled(3, sb1, 2), *b2 = filled(3, sb2, 3);
        moe_tensor *c = filled(2, sc, 4), *c0 = filled(2, sc, 4);
        moe_status s1 = moe_op_gemm_grouped_pair(ctx, 1, 0.7f, a1, b1, a2, b2, 0.25f, c, off, (int)G);
        moe_status s2 = moe_op_gemm_grouped_pair_dev(ctx, 1, 0.7f, a1, b1, a2, b2, 0.25f, c0, ot);
        report(s1 == MOE_OK && s2 == MOE_OK && same(c, c0), "gemm_grouped_pair_dev: the pair's bytes", "%s",
               moe_last_error());
        errs(moe_op_gemm_grouped_pair_dev(ctx, 1, 0.7f, a1, b1, NULL, b2, 0.25f, c0, ot), MOE_ERR_ARG, "a2 is NULL",
             "gemm_grouped_pair_dev: a2 NULL");
        errs(moe_op_gemm_grouped_pair_dev(ctx, 1, 0.7f, a1, b1, a2, b1, 0.25f, c0, ot), MOE_ERR_SHAPE, "b2",
             "gemm_grouped_pair_dev: b2 of the wrong K is named");
        moe_tensor *o2 = i64s(3, (int64_t[]){0, 4, 9});
        errs(moe_op_gemm_grouped_pair_dev(ctx, 1, 0.7f, a1, b1, a2, b2, 0.25f, c0, o2), MOE_ERR_SHAPE, "[groups, N, K]",
             "gemm_grouped_pair_dev: G from the offsets must match b");
        moe_tensor *obad = i64s(4, (int64_t[]){0, 5, 4, 9});
        errs(moe_op_gemm_grouped_pair_dev(ctx, 1, 0.7f, a1, b1, a2, b2, 0.25f, c0, obad), MOE_ERR_ARG, "decrease",
             "gemm_grouped_pair_dev: offsets read on the host are checked");
        moe_tensor_release(o2); moe_tensor_release(obad);
        moe_tensor_release(a1); moe_tensor_release(a2); moe_tensor_release(b1); moe_tensor_release(b2);
        moe_tensor_release(c); moe_tensor_release(c0);
    }
    {   /* weight gradient over gathered rows: c[g] = a_g^T x[rows_g] + 0.5 c[g] */
        int64_t sa[2] = {M, N}, sx[2] = {T, K}, sc[3] = {G, N, K};
        moe_tensor *a = filled(2, sa, 5), *x = filled(2, sx, 6), *c = filled(3, sc, 7), *c0 = filled(3, sc, 7);
        moe_status s1 = moe_op_gemm_grouped_wgrad_rows(ctx, 1.0f, a, x, rows, 0.5f, c, off, (int)G);
        moe_status s2 = moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, a, x, rows, 0.5f, c0, ot);
        report(s1 == MOE_OK && s2 == MOE_OK && same(c, c0), "gemm_grouped_wgrad_rows_dev: the rows call's bytes",
               "%s", moe_last_error());
        errs(moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, a, x, NULL, 0.5f, c0, ot), MOE_ERR_ARG, "b_rows is NULL",
             "gemm_grouped_wgrad_rows_dev: b_rows NULL");
        moe_tensor *o32 = moe_tensor_new_cpu(MOE_I32, 1, (int64_t[]){4});
        errs(moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, a, x, rows, 0.5f, c0, o32), MOE_ERR_DTYPE, "expected i64",
             "gemm_grouped_wgrad_rows_dev: i32 offsets");
        moe_tensor_release(o32);
        moe_tensor_release(a); moe_tensor_release(x); moe_tensor_release(c); moe_tensor_release(c0);
    }
    /* the SwiGLU forward over gathered rows, and the weighted backward */
    const int64_t de = 4;
    int64_t sx[2] = {T, K}, sw[3] = {G, de, K}, sg[2] = {M, de};
    moe_tensor *x = filled(2, sx, 8), *wg = filled(3, sw, 9), *wu = filled(3, sw, 10);
    moe_tensor *g[2], *u[2], *h[2];
    for (int i = 0; i < 2; i++) { g[i] = filled(2, sg, 0); u[i] = filled(2, sg, 0); h[i] = filled(2, sg, 0); }
    moe_status s1 = moe_op_gemm_grouped_swiglu_rows(ctx, x, rows, wg, wu, g[0], u[0], h[0], off, (int)G);
    moe_status s2 = moe_op_gemm_grouped_swiglu_rows_dev(ctx, x, rows, wg, wu, g[1], u[1], h[1], ot);
    report(s1 == MOE_OK && s2 == MOE_OK && same(g[0], g[1]) && same(u[0], u[1]) && same(h[0], h[1]),
           "gemm_grouped_swiglu_rows_dev: the rows call's bytes", "%s", moe_last_error());
    errs(moe_op_gemm_grouped_swiglu_rows_dev(ctx, x, NULL, wg, wu, g[1], u[1], h[1], ot), MOE_ERR_ARG, "rows is NULL",
         "gemm_grouped_swiglu_rows_dev: rows NULL");
    errs(moe_op_gemm_grouped_swiglu_rows_dev(ctx, x, rows, wg, wu, g[1], u[1], h[1], NULL), MOE_ERR_ARG,
         "offsets is NULL", "gemm_grouped_swiglu_rows_dev: offsets NULL");
    {
        int64_t sdy[2] = {M, K}, swd[3] = {G, K, de}, sr[1] = {M};
        moe_tensor *dy = filled(2, sdy, 11), *wd = filled(3, swd, 12), *rw = filled(1, sr, 13);
        moe_tensor *dg[2], *du[2], *hw[2], *dw[2];
        for (int i = 0; i < 2; i++) {
            dg[i] = filled(2, sg, 0); du[i] = filled(2, sg, 0); hw[i] = filled(2, sg, 0); dw[i] = filled(1, sr, 0);
        }
        s1 = moe_op_gemm_grouped_swiglu_backward_w(ctx, 0.9f, dy, wd, g[0], u[0], rw, dg[0], du[0], hw[0], dw[0], off,
                                                   (int)G);
        s2 = moe_op_gemm_grouped_swiglu_backward_w_dev(ctx, 0.9f, dy, wd, g[0], u[0], rw, dg[1], du[1], hw[1], dw[1], ot);
        report(s1 == MOE_OK && s2 == MOE_OK && same(dg[0], dg[1]) && same(du[0], du[1]) && same(hw[0], hw[1]) &&
                   same(dw[0], dw[1]),
               "gemm_grouped_swiglu_backward_w_dev: the weighted backward's bytes", "%s", moe_last_error());
        errs(moe_op_gemm_grouped_swiglu_backward_w_dev(ctx, 0.9f, dy, wd, g[0], u[0], rw, NULL, du[1], hw[1], dw[1], ot),
             MOE_ERR_ARG, "dg is NULL", "gemm_grouped_swiglu_backward_w_dev: dg NULL");
        moe_tensor *o2 = i64s(3, (int64_t[]){0, 4, 9});
        errs(moe_op_gemm_grouped_swiglu_backward_w_dev(ctx, 0.9f, dy, wd, g[0], u[0], rw, dg[1], du[1], hw[1], dw[1], o2),
             MOE_ERR_SHAPE, "[groups, K, N]", "gemm_grouped_swiglu_backward_w_dev: G from the offsets must match w");
        moe_tensor_release(o2);
        for (int i = 0; i < 2; i++) {
            moe_tensor_release(dg[i]); moe_tensor_release(du[i]); moe_tensor_release(hw[i]); moe_tensor_release(dw[i]);
        }
        moe_tensor_release(dy); moe_tensor_release(wd); moe_tensor_release(rw);
    }
    for (int i = 0; i < 2; i++) { moe_tensor_release(g[i]); moe_tensor_release(u[i]); moe_tensor_release(h[i]); }
    moe_tensor_release(x); moe_tensor_release(wg); moe_tensor_release(wu);
    moe_tensor_release(ot); moe_tensor_release(rows);
    moe_ctx_free(ctx);
    return tap_done();
}
