/* ops_grouped.c: the grouped (expert) GEMMs - rows grouped by per-expert
 * offsets, their fused SwiGLU forms and weight gradients, and the variants
 * over gathered rows: argument checks, then dispatch to the backend (or the
 * parts where the backend has no fused form). */
#include "ops_internal.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

static moe_status check_offsets(const char *op, const int64_t *offsets, int groups, int64_t M) {
    if (groups < 0) return moe_error(MOE_ERR_ARG, "%s: groups is %d, expected >= 0", op, groups);
    if (!offsets) return moe_error(MOE_ERR_ARG, "%s: offsets is NULL, expected %d + 1 row offsets", op, groups);
    if (offsets[0] != 0) return moe_error(MOE_ERR_ARG, "%s: offsets[0] is %lld, expected 0", op, (long long)offsets[0]);
    for (int g = 0; g < groups; g++)
        if (offsets[g + 1] < offsets[g])
            return moe_error(MOE_ERR_ARG, "%s: offsets decrease at group %d (%lld then %lld); expected nondecreasing",
                             op, g, (long long)offsets[g], (long long)offsets[g + 1]);
    if (offsets[groups] != M)
        return moe_error(MOE_ERR_ARG, "%s: offsets[%d] is %lld, expected %lld (the number of rows)", op, groups,
                         (long long)offsets[groups], (long long)M);
    return MOE_OK;
}

/* contiguous copies (or references) of n inputs into t; the caller releases them */
static moe_status contig_all(moe_ctx *ctx, const moe_tensor *const *in, moe_tensor **t, int n) {
    moe_status s = MOE_OK;
    for (int i = 0; i < n; i++) t[i] = NULL;
    for (int i = 0; i < n && s == MOE_OK; i++) s = in[i] ? ops_contig(ctx, in[i], &t[i]) : MOE_OK;
    return s;
}
static void release_all(moe_tensor **t, int n) {
    for (int i = 0; i < n; i++) moe_tensor_release(t[i]);
}

/* stands for offsets on the device (gemm_grouped_dev), which the shape checks leave alone */
static const int64_t offsets_on_device[1];

/* the shapes of one (a, b) pair of a grouped GEMM into c: a [M, K], b [G, K, N] (transb: [G, N, K]) */
static moe_status check_grouped_pair(const char *op, const char *an, const moe_tensor *a, const char *bn,
                                     const moe_tensor *b, const moe_tensor *c, int transb, const int64_t *offsets,
                                     int groups) {
    char s1[128], want[96];
    if (a->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected [M, K]", op, an, OPS_SHAPE(a, s1));
    if (b->ndim != 3) return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected [G, K, N]%s", op, bn,
                                       OPS_SHAPE(b, s1), transb ? " (transposed: [G, N, K])" : "");
    int64_t M = a->shape[0], K = a->shape[1];
    int64_t N = transb ? b->shape[1] : b->shape[2];
    int64_t bs[3] = {groups, transb ? N : K, transb ? K : N};
    if (offsets != offsets_on_device) MOE_TRY(check_offsets(op, offsets, groups, M));
    snprintf(want, sizeof want, transb ? "[groups, N, K] with K from %s" : "[groups, K, N] with K from %s", an);
    MOE_TRY(ops_shape_is(op, bn, b, 3, bs, want));
    int64_t cs[2] = {M, N};
    return ops_shape_is(op, "c", c, 2, cs, "[M, N]");
}

/* the shapes of a weight gradient: a [M, P], b [M, Q], c [G, P, Q] */
static moe_status check_wgrad(const char *op, const moe_tensor *a, const moe_tensor *b, const moe_tensor *c,
                              const int64_t *offsets, int groups) {
    char s1[128];
    if (a->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: a has shape %s, expected [M, P]", op, OPS_SHAPE(a, s1));
    if (b->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: b has shape %s, expected [M, Q]", op, OPS_SHAPE(b, s1));
    if (b->shape[0] != a->shape[0])
        return moe_error(MOE_ERR_SHAPE, "%s: b has %lld rows, expected %lld (the rows of a)", op,
                         (long long)b->shape[0], (long long)a->shape[0]);
    if (offsets != offsets_on_device) MOE_TRY(check_offsets(op, offsets, groups, a->shape[0]));
    int64_t cs[3] = {groups, a->shape[1], b->shape[1]};
    return ops_shape_is(op, "c", c, 3, cs, "[groups, P, Q]");
}

moe_status moe_op_gemm_grouped(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                               float beta, moe_tensor *c, const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped";
    ops_arg f[] = {{"a", a}, {"b", b}, {"c", c}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    MOE_TRY(check_grouped_pair(op, "a", a, "b", b, c, transb, offsets, groups));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, c->device, gemm_grouped, be);
    moe_tensor *ac, *bc = NULL;
    MOE_TRY(ops_contig(ctx, a, &ac));
    moe_status s = ops_contig(ctx, b, &bc);
    if (s == MOE_OK) s = be->gemm_grouped(ctx, transb, alpha, ac, bc, beta, c, offsets, groups);
    moe_tensor_release(ac);
    moe_tensor_release(bc);
    return s;
}

moe_status moe_op_gemm_grouped_pair(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a1, const moe_tensor *b1,
                                    const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                    const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_pair";
    ops_arg f[] = {{"a1", a1}, {"b1", b1}, {"a2", a2}, {"b2", b2}, {"c", c}};
    MOE_TRY(ops_check(op, f, 5, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    MOE_TRY(check_grouped_pair(op, "a1", a1, "b1", b1, c, transb, offsets, groups));
    MOE_TRY(check_grouped_pair(op, "a2", a2, "b2", b2, c, transb, offsets, groups));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, c->device, gemm_grouped, be);
    moe_tensor *t[4];
    const moe_tensor *in[4] = {a1, b1, a2, b2};
    moe_status s = contig_all(ctx, in, t, 4);
    if (s == MOE_OK && be->gemm_grouped_pair)
        s = be->gemm_grouped_pair(ctx, transb, alpha, t[0], t[1], t[2], t[3], beta, c, offsets, groups);
    else if (s == MOE_OK) {
        s = be->gemm_grouped(ctx, transb, alpha, t[0], t[1], beta, c, offsets, groups);
        if (s == MOE_OK) s = be->gemm_grouped(ctx, transb, alpha, t[2], t[3], 1.0f, c, offsets, groups);
    }
    release_all(t, 4);
    return s;
}

moe_status moe_op_gemm_grouped_swiglu(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *wg, const moe_tensor *wu,
                                      moe_tensor *g, moe_tensor *u, moe_tensor *h, const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_swiglu";
    ops_arg f[] = {{"x", x}, {"wg", wg}, {"wu", wu}, {"g", g}, {"u", u}, {"h", h}};
    MOE_TRY(ops_check(op, f, 6, NULL, 0));
    MOE_TRY(ops_out(op, "g", g));
    MOE_TRY(ops_out(op, "u", u));
    MOE_TRY(ops_out(op, "h", h));
    MOE_TRY(check_grouped_pair(op, "x", x, "wg", wg, g, 1, offsets, groups));
    MOE_TRY(check_grouped_pair(op, "x", x, "wu", wu, u, 1, offsets, groups));
    MOE_TRY(ops_same_shape(op, "h", h, "g", g));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, h->device, gemm_grouped, be);
    moe_tensor *t[3];
    const moe_tensor *in[3] = {x, wg, wu};
    moe_status s = contig_all(ctx, in, t, 3);
    if (s == MOE_OK && be->gemm_grouped_swiglu) {
        s = be->gemm_grouped_swiglu(ctx, t[0], t[1], t[2], g, u, h, offsets, groups);
    } else if (s == MOE_OK) {
        s = be->gemm_grouped(ctx, 1, 1.0f, t[0], t[1], 0.0f, g, offsets, groups);
        if (s == MOE_OK) s = be->gemm_grouped(ctx, 1, 1.0f, t[0], t[2], 0.0f, u, offsets, groups);
        if (s == MOE_OK && moe_tensor_numel(h) > 0) s = be->swiglu(ctx, h, g, u);
    }
    release_all(t, 3);
    return s;
}

moe_status moe_op_gemm_grouped_swiglu_backward(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                               const moe_tensor *g, const moe_tensor *u, moe_tensor *dg, moe_tensor *du,
                                               moe_tensor *h, const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_swiglu_backward";
    ops_arg f[] = {{"dy", dy}, {"w", w}, {"g", g}, {"u", u}, {"dg", dg}, {"du", du}, {"h", h}};
    MOE_TRY(ops_check(op, f, h ? 7 : 6, NULL, 0));
    MOE_TRY(ops_out(op, "dg", dg));
    MOE_TRY(ops_out(op, "du", du));
    if (h) MOE_TRY(ops_out(op, "h", h));
    if (h) MOE_TRY(ops_same_shape(op, "h", h, "dg", dg));
    MOE_TRY(check_grouped_pair(op, "dy", dy, "w", w, dg, 0, offsets, groups));
    MOE_TRY(ops_same_shape(op, "du", du, "dg", dg));
    MOE_TRY(ops_same_shape(op, "g", g, "dg", dg));
    MOE_TRY(ops_same_shape(op, "u", u, "dg", dg));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dg->device, gemm_grouped, be);
    moe_tensor *t[4];
    const moe_tensor *in[4] = {dy, w, g, u};
    moe_status s = contig_all(ctx, in, t, 4);
    if (s == MOE_OK && be->gemm_grouped_swiglu_backward) {
        s = be->gemm_grouped_swiglu_backward(ctx, alpha, t[0], t[1], t[2], t[3], dg, du, h, offsets, groups);
    } else if (s == MOE_OK) {
        moe_tensor *dh = moe_tensor_new(ctx, g->dtype, 2, dg->shape, dg->device);
        s = dh ? be->gemm_grouped(ctx, 0, alpha, t[0], t[1], 0.0f, dh, offsets, groups) : moe_last_status();
        if (s == MOE_OK && moe_tensor_numel(dh) > 0) s = be->swiglu_backward(ctx, dg, du, dh, t[2], t[3]);
        if (s == MOE_OK && h && moe_tensor_numel(h) > 0) s = be->swiglu(ctx, h, t[2], t[3]);
        moe_tensor_release(dh);
    }
    release_all(t, 4);
    return s;
}

int moe_op_gemm_grouped_rows_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int64_t rows,
                                   const int64_t *offsets, int groups) {
    const moe_backend *be;
    return ops_backend(ctx, "gemm_grouped_rows_fuses", dev, &be) == MOE_OK && be->gemm_grouped_rows_fuses &&
           be->gemm_grouped_rows_fuses(ctx, dev, dt, K, N, rows, offsets, groups);
}

int moe_op_gemm_grouped_swiglu_backward_w_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t de,
                                                int64_t rows, const int64_t *offsets, int groups) {
    const moe_backend *be;
    return ops_backend(ctx, "gemm_grouped_swiglu_backward_w_fuses", dev, &be) == MOE_OK &&
           be->gemm_grouped_swiglu_backward_w_fuses &&
           be->gemm_grouped_swiglu_backward_w_fuses(ctx, dev, dt, K, de, rows, offsets, groups);
}

static moe_status check_swiglu_backward_w(const char *op, const moe_tensor *dy, const moe_tensor *w,
                                          const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                          const moe_tensor *dg, const moe_tensor *du, const moe_tensor *hw,
                                          const moe_tensor *dw, const int64_t *offsets, int groups) {
    ops_arg f[] = {{"dy", dy}, {"w", w}, {"g", g}, {"u", u}, {"rw", rw}, {"dg", dg}, {"du", du}, {"hw", hw}, {"dw", dw}};
    MOE_TRY(ops_check(op, f, 9, NULL, 0));
    MOE_TRY(ops_out(op, "dg", dg));
    MOE_TRY(ops_out(op, "du", du));
    MOE_TRY(ops_out(op, "hw", hw));
    MOE_TRY(ops_out(op, "dw", dw));
    MOE_TRY(check_grouped_pair(op, "dy", dy, "w", w, dg, 0, offsets, groups));
    MOE_TRY(ops_same_shape(op, "du", du, "dg", dg));
    MOE_TRY(ops_same_shape(op, "hw", hw, "dg", dg));
    MOE_TRY(ops_same_shape(op, "g", g, "dg", dg));
    MOE_TRY(ops_same_shape(op, "u", u, "dg", dg));
    MOE_TRY(ops_shape_is(op, "rw", rw, 1, dg->shape, "one weight per row"));
    return ops_shape_is(op, "dw", dw, 1, dg->shape, "one per row");
}

moe_status moe_op_gemm_grouped_swiglu_backward_w(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                                 const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                                 moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                                 const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_swiglu_backward_w";
    MOE_TRY(check_swiglu_backward_w(op, dy, w, g, u, rw, dg, du, hw, dw, offsets, groups));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dg->device, gemm_grouped, be);
    moe_tensor *t[5];
    const moe_tensor *in[5] = {dy, w, g, u, rw};
    moe_status s = contig_all(ctx, in, t, 5);
    int served = 0;
    if (s == MOE_OK && be->gemm_grouped_swiglu_backward_w)
        s = be->gemm_grouped_swiglu_backward_w(ctx, alpha, t[0], t[1], t[2], t[3], t[4], dg, du, hw, dw, offsets, groups,
                                               &served);
    if (s == MOE_OK && !served) {
        /* the parts: dh = dy w_e, h = swiglu(g, u), dw = rowsum(dh * h), then dh and h scaled by the rows' weights */
        moe_tensor *dh = moe_tensor_like(ctx, dg), *h = moe_tensor_like(ctx, dg), *prod = moe_tensor_like(ctx, dg);
        int64_t cs[2] = {dg->shape[0], 1};
        moe_tensor *col = moe_tensor_view(t[4], 2, cs);
        s = dh && h && prod && col ? moe_op_gemm_grouped(ctx, 0, alpha, t[0], t[1], 0.0f, dh, offsets, groups)
                                   : moe_last_status();
        if (s == MOE_OK) s = moe_op_swiglu(ctx, h, t[2], t[3]);
        if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, prod, dh, h);
        if (s == MOE_OK) s = moe_op_reduce(ctx, MOE_RED_SUM, dw, prod, 1);
        if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, dh, dh, col);
        if (s == MOE_OK) s = moe_op_swiglu_backward(ctx, dg, du, dh, t[2], t[3]);
        if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, hw, h, col);
        moe_tensor_release(dh); moe_tensor_release(h); moe_tensor_release(prod); moe_tensor_release(col);
    }
    release_all(t, 5);
    return s;
}

moe_status moe_op_gemm_grouped_wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                     moe_tensor *c, const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_wgrad";
    ops_arg f[] = {{"a", a}, {"b", b}, {"c", c}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    MOE_TRY(check_wgrad(op, a, b, c, offsets, groups));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, c->device, gemm_grouped_wgrad, be);
    moe_tensor *ac, *bc = NULL;
    MOE_TRY(ops_contig(ctx, a, &ac));
    moe_status s = ops_contig(ctx, b, &bc);
    if (s == MOE_OK) s = be->gemm_grouped_wgrad(ctx, alpha, ac, bc, beta, c, offsets, groups);
    moe_tensor_release(ac);
    moe_tensor_release(bc);
    return s;
}

/* ---- grouped GEMMs over gathered rows ---- */

/* rows: i64 [A] indexing the rows of x [N, ...], A the offsets' total: the
 * backend's loads may gather them when it has the call and the router made
 * the index (its bound is trusted, so no device check); otherwise the rows
 * are gathered (and checked) into a tensor first. Returns 1 for "the backend
 * may gather", 0 for "gather first", and sets *st on bad arguments. */
static int rows_direct(const char *op, const moe_tensor *x, const moe_tensor *rows, const int64_t *offsets, int groups,
                       int has_entry, moe_status *st) {
    char s1[128];
    *st = MOE_OK;
    if (!rows) { *st = moe_error(MOE_ERR_ARG, "%s: rows is NULL, expected an i64 tensor", op); return 0; }
    if (rows->dtype != MOE_I64 || rows->ndim != 1) {
        *st = moe_error(MOE_ERR_SHAPE, "%s: rows is %s %s, expected i64 [A]", op, moe_dtype_name(rows->dtype),
                        OPS_SHAPE(rows, s1));
        return 0;
    }
    if (!moe_device_eq(rows->device, x->device)) {
        *st = moe_error(MOE_ERR_DEVICE, "%s: rows is on another device than the data", op);
        return 0;
    }
    if (x->ndim != 2) { *st = moe_error(MOE_ERR_SHAPE, "%s: x has shape %s, expected [N, K]", op, OPS_SHAPE(x, s1)); return 0; }
    if (offsets != offsets_on_device) *st = check_offsets(op, offsets, groups, rows->shape[0]);
    if (*st != MOE_OK) return 0;
    return has_entry && moe_tensor_is_contiguous(x) && moe_tensor_is_contiguous(rows) &&
           moe_tensor_index_trusted(rows, x->shape[0]);
}

static moe_tensor *gather_rows(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows) {
    int64_t shape[2] = {rows->shape[0], x->shape[1]};
    moe_tensor *xp = moe_tensor_new(ctx, x->dtype, 2, shape, x->device);
    if (xp && moe_op_index_select(ctx, xp, x, rows) != MOE_OK) { moe_tensor_release(xp); return NULL; }
    return xp;
}

/* the checks of a gathered SwiGLU call, on x's header with the gathered row count */
static moe_status check_swiglu_rows(const char *op, const moe_tensor *x, const moe_tensor *rows, const moe_tensor *wg,
                                    const moe_tensor *wu, const moe_tensor *g, const moe_tensor *u, const moe_tensor *h,
                                    const int64_t *offsets, int groups) {
    moe_tensor xa = *x;
    xa.shape[0] = rows->shape[0];
    MOE_TRY(ops_out(op, "g", g));
    MOE_TRY(ops_out(op, "u", u));
    MOE_TRY(ops_out(op, "h", h));
    MOE_TRY(check_grouped_pair(op, "x", &xa, "wg", wg, g, 1, offsets, groups));
    MOE_TRY(check_grouped_pair(op, "x", &xa, "wu", wu, u, 1, offsets, groups));
    return ops_same_shape(op, "h", h, "g", g);
}

moe_status moe_op_gemm_grouped_swiglu_rows(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows,
                                           const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                           moe_tensor *h, const int64_t *offsets, int groups) {
    static const char *op = "gemm_grouped_swiglu_rows";
    ops_arg f[] = {{"x", x}, {"wg", wg}, {"wu", wu}, {"g", g}, {"u", u}, {"h", h}};
    MOE_TRY(ops_check(op, f, 6, NULL, 0));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, h->device, gemm_grouped, be);
    moe_status st;
    int direct = rows_direct(op, x, rows, offsets, groups, be->gemm_grouped_swiglu_rows != NULL, &st);
    if (st != MOE_OK) return st;
    if (!direct) {
        moe_tensor *xp = gather_rows(ctx, x, rows);
        if (!xp) return moe_last_status();
        st = moe_op_gemm_grouped_swiglu(ctx, xp, wg, wu, g, u, h, offsets, groups);
        moe_tensor_release(xp);
        return st;
    }
    MOE_TRY(check_swiglu_rows(op, x, rows, wg, wu, g, u, h, offsets, groups));
    moe_tensor *t[2];
    const moe_tensor *in[2] = {wg, wu};
    st = contig_all(ctx, in, t, 2);
    if (st == MOE_OK) st = be->gemm_grouped_swiglu_rows(ctx, x, rows, t[0], t[1], g, u, h, offsets, groups);
    release_all(t, 2);
    return st;
}

moe_status moe_op_gemm_grouped_wgrad_rows(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                          const moe_tensor *b_rows, float beta, moe_tensor *c, const int64_t *offsets,
                                          int groups) {
    static const char *op = "gemm_grouped_wgrad_rows";
    ops_arg f[] = {{"a", a}, {"b", b}, {"c", c}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, c->device, gemm_grouped_wgrad, be);
    moe_status st;
    int direct = rows_direct(op, b, b_rows, offsets, groups, be->gemm_grouped_wgrad_rows != NULL, &st);
    if (st != MOE_OK) return st;
    if (!direct) {
        moe_tensor *bp = gather_rows(ctx, b, b_rows);
        if (!bp) return moe_last_status();
        st = moe_op_gemm_grouped_wgrad(ctx, alpha, a, bp, beta, c, offsets, groups);
        moe_tensor_release(bp);
        return st;
    }
    char s1[128];
    MOE_TRY(ops_out(op, "c", c));
    if (a->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: a has shape %s, expected [M, P]", op, OPS_SHAPE(a, s1));
    if (a->shape[0] != b_rows->shape[0])
        return moe_error(MOE_ERR_SHAPE, "%s: a has %lld rows, expected %lld (the gathered rows)", op,
                         (long long)a->shape[0], (long long)b_rows->shape[0]);
    int64_t cs[3] = {groups, a->shape[1], b->shape[1]};
    MOE_TRY(ops_shape_is(op, "c", c, 3, cs, "[groups, P, Q]"));
    moe_tensor *ac;
    MOE_TRY(ops_contig(ctx, a, &ac));
    st = be->gemm_grouped_wgrad_rows(ctx, alpha, ac, b, b_rows, beta, c, offsets, groups);
    moe_tensor_release(ac);
    return st;
}

/* ---- grouped GEMMs with the row offsets in a tensor ---- */

/* offsets: i64 [G + 1], contiguous, on dev or on the CPU; *groups = G */
static moe_status check_offsets_tensor(const char *op, const moe_tensor *offsets, moe_device dev, int *groups) {
    char s1[128], b1[16], b2[16];
    if (!offsets) return moe_error(MOE_ERR_ARG, "%s: offsets is NULL, expected an i64 tensor of G + 1 row offsets", op);
    if (offsets->dtype != MOE_I64)
        return moe_error(MOE_ERR_DTYPE, "%s: offsets has dtype %s, expected i64", op, moe_dtype_name(offsets->dtype));
    if (offsets->ndim != 1 || offsets->shape[0] < 2 || offsets->shape[0] > (int64_t)INT32_MAX)
        return moe_error(MOE_ERR_SHAPE, "%s: offsets has shape %s, expected [G + 1] with G >= 1", op,
                         OPS_SHAPE(offsets, s1));
    if (!moe_device_eq(offsets->device, dev) && offsets->device.type != MOE_CPU)
        return moe_error(MOE_ERR_DEVICE, "%s: offsets is on %s, expected %s (the outputs' device) or the CPU", op,
                         moe_device_str(offsets->device, b1, sizeof b1), moe_device_str(dev, b2, sizeof b2));
    if (!moe_tensor_is_contiguous(offsets))
        return moe_error(MOE_ERR_ARG, "%s: offsets must be contiguous", op);
    *groups = (int)(offsets->shape[0] - 1);
    return MOE_OK;
}

/* The backend's device-offset entry may serve the call: the offsets are on a device, not the CPU */
static int offsets_on_dev(const moe_tensor *offsets) { return offsets->device.type != MOE_CPU; }

/* The offsets as host values: the CPU tensor itself, or a copy read back
 * from the device (which waits for it); *host to release. */
static moe_status offsets_on_host(moe_ctx *ctx, const moe_tensor *offsets, moe_tensor **host) {
    if (!offsets_on_dev(offsets)) {
        moe_tensor_retain((moe_tensor *)offsets);
        *host = (moe_tensor *)offsets;
        return MOE_OK;
    }
    *host = moe_op_to(ctx, (moe_tensor *)offsets, MOE_DEVICE_CPU, MOE_I64);
    return *host ? MOE_OK : moe_last_status();
}

/* gemm_grouped (a2 NULL) or gemm_grouped_pair with the offsets in a tensor */
static moe_status grouped_dev(moe_ctx *ctx, const char *op, int transb, float alpha, const moe_tensor *a1,
                              const moe_tensor *b1, const moe_tensor *a2, const moe_tensor *b2, float beta,
                              moe_tensor *c, const moe_tensor *offsets) {
    ops_arg f[] = {{"c", c}, {"a", a1}, {"b", b1}, {"a2", a2}, {"b2", b2}};
    MOE_TRY(ops_check(op, f, a2 || b2 ? 5 : 3, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    int groups = 0;
    MOE_TRY(check_offsets_tensor(op, offsets, c->device, &groups));
    MOE_TRY(check_grouped_pair(op, "a", a1, "b", b1, c, transb, offsets_on_device, groups));
    if (a2) MOE_TRY(check_grouped_pair(op, "a2", a2, "b2", b2, c, transb, offsets_on_device, groups));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, c->device, &be));
    if (be->gemm_grouped_dev && offsets_on_dev(offsets)) {
        moe_tensor *t[4];
        const moe_tensor *in[4] = {a1, b1, a2, b2};
        int served = 0;
        moe_status s = contig_all(ctx, in, t, 4);
        if (s == MOE_OK) s = be->gemm_grouped_dev(ctx, transb, alpha, t[0], t[1], t[2], t[3], beta, c, offsets, groups,
                                                  &served);
        release_all(t, 4);
        if (s != MOE_OK || served) return s;
    }
    moe_tensor *h;
    MOE_TRY(offsets_on_host(ctx, offsets, &h));
    moe_status s = a2 ? moe_op_gemm_grouped_pair(ctx, transb, alpha, a1, b1, a2, b2, beta, c, moe_tensor_data(h), groups)
                      : moe_op_gemm_grouped(ctx, transb, alpha, a1, b1, beta, c, moe_tensor_data(h), groups);
    moe_tensor_release(h);
    return s;
}

moe_status moe_op_gemm_grouped_dev(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                   float beta, moe_tensor *c, const moe_tensor *offsets) {
    return grouped_dev(ctx, "gemm_grouped_dev", transb, alpha, a, b, NULL, NULL, beta, c, offsets);
}

moe_status moe_op_gemm_grouped_pair_dev(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a1,
                                        const moe_tensor *b1, const moe_tensor *a2, const moe_tensor *b2, float beta,
                                        moe_tensor *c, const moe_tensor *offsets) {
    static const char *op = "gemm_grouped_pair_dev";
    if (!a2) return moe_error(MOE_ERR_ARG, "%s: a2 is NULL, expected a tensor", op);
    return grouped_dev(ctx, op, transb, alpha, a1, b1, a2, b2, beta, c, offsets);
}

/* gemm_grouped_wgrad (b_rows NULL) or gemm_grouped_wgrad_rows with the offsets in a tensor */
static moe_status wgrad_dev(moe_ctx *ctx, const char *op, float alpha, const moe_tensor *a, const moe_tensor *b,
                            const moe_tensor *b_rows, float beta, moe_tensor *c, const moe_tensor *offsets) {
    ops_arg f[] = {{"a", a}, {"b", b}, {"c", c}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    int groups = 0;
    MOE_TRY(check_offsets_tensor(op, offsets, c->device, &groups));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, c->device, &be));
    int direct = !b_rows;
    if (b_rows) {
        moe_status st;
        direct = rows_direct(op, b, b_rows, offsets_on_device, groups, 1, &st);
        if (st != MOE_OK) return st;
        if (direct) {
            moe_tensor bh = *b;   /* the checks of the gathered call, on b's header with the gathered row count */
            bh.shape[0] = b_rows->shape[0];
            MOE_TRY(check_wgrad(op, a, &bh, c, offsets_on_device, groups));
        }
    } else {
        MOE_TRY(check_wgrad(op, a, b, c, offsets_on_device, groups));
    }
    if (be->gemm_grouped_wgrad_dev && direct && offsets_on_dev(offsets)) {
        moe_tensor *t[2];
        const moe_tensor *in[2] = {a, b_rows ? NULL : b};
        int served = 0;
        moe_status s = contig_all(ctx, in, t, 2);
        if (s == MOE_OK) s = be->gemm_grouped_wgrad_dev(ctx, alpha, t[0], t[1] ? t[1] : b, b_rows, beta, c, offsets,
                                                        groups, &served);
        release_all(t, 2);
        if (s != MOE_OK || served) return s;
    }
    moe_tensor *h;
    MOE_TRY(offsets_on_host(ctx, offsets, &h));
    moe_status s = b_rows ? moe_op_gemm_grouped_wgrad_rows(ctx, alpha, a, b, b_rows, beta, c, moe_tensor_data(h), groups)
                          : moe_op_gemm_grouped_wgrad(ctx, alpha, a, b, beta, c, moe_tensor_data(h), groups);
    moe_tensor_release(h);
    return s;
}

moe_status moe_op_gemm_grouped_wgrad_dev(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                         float beta, moe_tensor *c, const moe_tensor *offsets) {
    return wgrad_dev(ctx, "gemm_grouped_wgrad_dev", alpha, a, b, NULL, beta, c, offsets);
}

moe_status moe_op_gemm_grouped_wgrad_rows_dev(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                              const moe_tensor *b_rows, float beta, moe_tensor *c,
                                              const moe_tensor *offsets) {
    static const char *op = "gemm_grouped_wgrad_rows_dev";
    if (!b_rows) return moe_error(MOE_ERR_ARG, "%s: b_rows is NULL, expected an i64 tensor", op);
    return wgrad_dev(ctx, op, alpha, a, b, b_rows, beta, c, offsets);
}

moe_status moe_op_gemm_grouped_swiglu_rows_dev(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows,
                                               const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                               moe_tensor *h, const moe_tensor *offsets) {
    static const char *op = "gemm_grouped_swiglu_rows_dev";
    ops_arg f[] = {{"x", x}, {"wg", wg}, {"wu", wu}, {"g", g}, {"u", u}, {"h", h}};
    MOE_TRY(ops_check(op, f, 6, NULL, 0));
    int groups = 0;
    MOE_TRY(check_offsets_tensor(op, offsets, h->device, &groups));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, h->device, &be));
    moe_status st;
    const int direct = rows_direct(op, x, rows, offsets_on_device, groups, 1, &st);
    if (st != MOE_OK) return st;
    if (be->gemm_grouped_swiglu_dev && direct && offsets_on_dev(offsets)) {
        MOE_TRY(check_swiglu_rows(op, x, rows, wg, wu, g, u, h, offsets_on_device, groups));
        moe_tensor *t[2];
        const moe_tensor *in[2] = {wg, wu};
        int served = 0;
        st = contig_all(ctx, in, t, 2);
        if (st == MOE_OK) st = be->gemm_grouped_swiglu_dev(ctx, x, rows, t[0], t[1], g, u, h, offsets, groups, &served);
        release_all(t, 2);
        if (st != MOE_OK || served) return st;
    }
    moe_tensor *hs;
    MOE_TRY(offsets_on_host(ctx, offsets, &hs));
    st = moe_op_gemm_grouped_swiglu_rows(ctx, x, rows, wg, wu, g, u, h, moe_tensor_data(hs), groups);
    moe_tensor_release(hs);
    return st;
}

moe_status moe_op_gemm_grouped_swiglu_backward_w_dev(moe_ctx *ctx, float alpha, const moe_tensor *dy,
                                                     const moe_tensor *w, const moe_tensor *g, const moe_tensor *u,
                                                     const moe_tensor *rw, moe_tensor *dg, moe_tensor *du,
                                                     moe_tensor *hw, moe_tensor *dw, const moe_tensor *offsets) {
    static const char *op = "gemm_grouped_swiglu_backward_w_dev";
    int groups = 0;
    if (!dg) return moe_error(MOE_ERR_ARG, "%s: dg is NULL, expected a tensor", op);
    MOE_TRY(check_offsets_tensor(op, offsets, dg->device, &groups));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, dg->device, &be));
    if (be->gemm_grouped_swiglu_backward_w_dev && offsets_on_dev(offsets)) {
        MOE_TRY(check_swiglu_backward_w(op, dy, w, g, u, rw, dg, du, hw, dw, offsets_on_device, groups));
        moe_tensor *t[5];
        const moe_tensor *in[5] = {dy, w, g, u, rw};
        int served = 0;
        moe_status s = contig_all(ctx, in, t, 5);
        if (s == MOE_OK)
            s = be->gemm_grouped_swiglu_backward_w_dev(ctx, alpha, t[0], t[1], t[2], t[3], t[4], dg, du, hw, dw, offsets,
                                                       groups, &served);
        release_all(t, 5);
        if (s != MOE_OK || served) return s;
    }
    moe_tensor *h;
    MOE_TRY(offsets_on_host(ctx, offsets, &h));
    moe_status s = moe_op_gemm_grouped_swiglu_backward_w(ctx, alpha, dy, w, g, u, rw, dg, du, hw, dw,
                                                         moe_tensor_data(h), groups);
    moe_tensor_release(h);
    return s;
}
