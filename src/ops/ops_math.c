/* ops_math.c: GEMMs, elementwise ops, reductions, the softmax family and
 * indexing: argument checks, then dispatch to the backend. The grouped
 * (expert) GEMMs are in ops_grouped.c. */
#include "ops_internal.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

/* ---- GEMM ---- */

/* Gives the backend a contiguous operand: a transposed view of a contiguous
 * matrix becomes the contiguous matrix with the transpose flag flipped; any
 * other strided operand is copied. */
static moe_status gemm_operand(moe_ctx *ctx, const moe_tensor *x, int *trans, moe_tensor **out) {
    *out = NULL;
    int nd = x->ndim;
    if (!moe_tensor_is_contiguous(x)) {
        int64_t r = x->shape[nd - 2], c = x->shape[nd - 1];
        int tview = x->stride[nd - 1] == r && x->stride[nd - 2] == 1 &&
                    (nd == 2 || x->shape[0] == 1 || x->stride[0] == r * c);
        if (tview) {
            int64_t shape[3];
            for (int i = 0; i < nd; i++) shape[i] = x->shape[i];
            shape[nd - 2] = c;
            shape[nd - 1] = r;
            moe_tensor *v = moe_tensor_from_storage(x->storage, x->offset, x->dtype, nd, shape, NULL);
            if (!v) return moe_last_status();
            *trans = !*trans;
            *out = v;
            return MOE_OK;
        }
    }
    return ops_contig(ctx, x, out);
}

moe_status moe_op_gemm(moe_ctx *ctx, int transa, int transb, float alpha, const moe_tensor *a,
                       const moe_tensor *b, float beta, moe_tensor *c) {
    static const char *op = "gemm";
    ops_arg f[] = {{"a", a}, {"b", b}, {"c", c}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "c", c));
    char s1[128], s2[128];
    if (a->ndim < 2 || a->ndim > 3) return moe_error(MOE_ERR_SHAPE, "gemm: a has shape %s, expected 2 or 3 dims", OPS_SHAPE(a, s1));
    if (b->ndim < 2 || b->ndim > 3) return moe_error(MOE_ERR_SHAPE, "gemm: b has shape %s, expected 2 or 3 dims", OPS_SHAPE(b, s1));
    int an = a->ndim, bn = b->ndim;
    int64_t M = transa ? a->shape[an - 1] : a->shape[an - 2];
    int64_t Ka = transa ? a->shape[an - 2] : a->shape[an - 1];
    int64_t Kb = transb ? b->shape[bn - 1] : b->shape[bn - 2];
    int64_t N = transb ? b->shape[bn - 2] : b->shape[bn - 1];
    if (Ka != Kb)
        return moe_error(MOE_ERR_SHAPE, "gemm: op(a) is %lldx%lld (a %s%s) but op(b) is %lldx%lld (b %s%s); "
                         "expected the inner dims to agree", (long long)M, (long long)Ka, OPS_SHAPE(a, s1),
                         transa ? ", transposed" : "", (long long)Kb, (long long)N, OPS_SHAPE(b, s2),
                         transb ? ", transposed" : "");
    int batched = an == 3 || bn == 3;
    int64_t batch = an == 3 ? a->shape[0] : bn == 3 ? b->shape[0] : 1;
    if (an == 3 && bn == 3 && a->shape[0] != b->shape[0])
        return moe_error(MOE_ERR_SHAPE, "gemm: a has batch %lld but b has batch %lld; expected equal batches",
                         (long long)a->shape[0], (long long)b->shape[0]);
    int64_t cs[3] = {batch, M, N};
    if (batched) MOE_TRY(ops_shape_is(op, "c", c, 3, cs, "[batch, M, N]"));
    else MOE_TRY(ops_shape_is(op, "c", c, 2, cs + 1, "[M, N]"));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, c->device, gemm, be);
    moe_tensor *ac = NULL, *bc = NULL;
    moe_status s = gemm_operand(ctx, a, &transa, &ac);
    if (s == MOE_OK) s = gemm_operand(ctx, b, &transb, &bc);
    if (s == MOE_OK) s = be->gemm(ctx, transa, transb, alpha, ac, bc, beta, c);
    moe_tensor_release(ac);
    moe_tensor_release(bc);
    return s;
}

/* ---- elementwise ---- */

moe_status moe_broadcast_shape(const moe_tensor *a, const moe_tensor *b, int *ndim, int64_t *shape) {
    MOE_TRY(ops_nonnull("broadcast", "a", a));
    MOE_TRY(ops_nonnull("broadcast", "b", b));
    int nd = a->ndim > b->ndim ? a->ndim : b->ndim;
    for (int i = 0; i < nd; i++) {
        int ia = i - (nd - a->ndim), ib = i - (nd - b->ndim);
        int64_t da = ia >= 0 ? a->shape[ia] : 1, db = ib >= 0 ? b->shape[ib] : 1;
        if (da != db && da != 1 && db != 1) {
            char s1[128], s2[128];
            return moe_error(MOE_ERR_SHAPE, "shapes %s and %s do not broadcast (dim %d: %lld vs %lld; expected "
                             "equal sizes or 1)", OPS_SHAPE(a, s1), OPS_SHAPE(b, s2), i, (long long)da, (long long)db);
        }
        shape[i] = da == 1 ? db : da;
    }
    *ndim = nd;
    return MOE_OK;
}

moe_status moe_op_binary(moe_ctx *ctx, moe_binary_op bop, moe_tensor *out, const moe_tensor *a, const moe_tensor *b) {
    static const char *op = "binary";
    if ((unsigned)bop >= MOE_NUM_BINARY) return moe_error(MOE_ERR_ARG, "binary: unknown op %d", (int)bop);
    ops_arg f[] = {{"out", out}, {"a", a}, {"b", b}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    int nd;
    int64_t shape[MOE_MAX_DIMS];
    MOE_TRY(moe_error_context(moe_broadcast_shape(a, b, &nd, shape), "binary"));
    MOE_TRY(ops_shape_is(op, "out", out, nd, shape, "the broadcast shape of a and b"));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, binary, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    moe_tensor *ea = moe_tensor_expand((moe_tensor *)a, nd, shape);
    if (!ea) return moe_last_status();
    moe_tensor *eb = moe_tensor_expand((moe_tensor *)b, nd, shape);
    if (!eb) { moe_tensor_release(ea); return moe_last_status(); }
    moe_status s = be->binary(ctx, bop, out, ea, eb);
    moe_tensor_release(ea);
    moe_tensor_release(eb);
    return s;
}

moe_status moe_op_unary(moe_ctx *ctx, moe_unary_op uop, moe_tensor *out, const moe_tensor *x, float alpha) {
    static const char *op = "unary";
    if ((unsigned)uop >= MOE_NUM_UNARY) return moe_error(MOE_ERR_ARG, "unary: unknown op %d", (int)uop);
    ops_arg f[] = {{"out", out}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(ops_same_shape(op, "out", out, "x", x));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, unary, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    return be->unary(ctx, uop, out, x, alpha);
}

moe_status moe_op_unary_backward(moe_ctx *ctx, moe_unary_op uop, moe_tensor *dx, const moe_tensor *dy,
                                 const moe_tensor *x, float alpha) {
    static const char *op = "unary_backward";
    if ((unsigned)uop >= MOE_NUM_UNARY) return moe_error(MOE_ERR_ARG, "unary_backward: unknown op %d", (int)uop);
    ops_arg f[] = {{"dx", dx}, {"dy", dy}, {"x", x}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "dx", dx));
    MOE_TRY(ops_same_shape(op, "dy", dy, "x", x));
    MOE_TRY(ops_same_shape(op, "dx", dx, "x", x));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dx->device, unary_backward, be);
    if (moe_tensor_numel(dx) == 0) return MOE_OK;
    return be->unary_backward(ctx, uop, dx, dy, x, alpha);
}

moe_status moe_op_axpy(moe_ctx *ctx, moe_tensor *y, float alpha, const moe_tensor *x) {
    static const char *op = "axpy";
    ops_arg f[] = {{"y", y}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(ops_same_shape(op, "x", x, "y", y));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, y->device, axpy, be);
    if (moe_tensor_numel(y) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->axpy(ctx, y, alpha, xc);
    moe_tensor_release(xc);
    return s;
}

moe_status moe_op_sum_to(moe_ctx *ctx, moe_tensor *out, const moe_tensor *g) {
    static const char *op = "sum_to";
    ops_arg f[] = {{"out", out}, {"g", g}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    int nd = g->ndim;
    int64_t oshape[MOE_MAX_DIMS];
    int ok = out->ndim <= nd;
    for (int i = 0; ok && i < nd; i++) {
        int io = i - (nd - out->ndim);
        oshape[i] = io >= 0 ? out->shape[io] : 1;
        ok = oshape[i] == g->shape[i] || oshape[i] == 1;
    }
    if (!ok) {
        char s1[128], s2[128];
        return moe_error(MOE_ERR_SHAPE, "sum_to: out has shape %s, expected a shape that broadcasts to %s (g's shape)",
                         OPS_SHAPE(out, s1), OPS_SHAPE(g, s2));
    }
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, reduce, be);
    if (!be->copy) return ops_unsupported("copy", be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    moe_tensor *cur;
    MOE_TRY(ops_contig(ctx, g, &cur));
    int64_t cshape[MOE_MAX_DIMS];
    for (int i = 0; i < nd; i++) cshape[i] = g->shape[i];
    moe_status s = MOE_OK;
    for (int d = 0; d < nd && s == MOE_OK;) {
        if (!(oshape[d] == 1 && cshape[d] != 1)) { d++; continue; }
        /* merge a run of adjacent reduced dims into one reduce call */
        int e = d;
        int64_t n = 1;
        while (e < nd && oshape[e] == 1 && cshape[e] != 1) n *= cshape[e++];
        int64_t outer = 1, inner = 1;
        for (int i = 0; i < d; i++) outer *= cshape[i];
        for (int i = e; i < nd; i++) inner *= cshape[i];
        for (int i = d; i < e; i++) cshape[i] = 1;
        moe_tensor *nxt = moe_tensor_new(ctx, g->dtype, nd, cshape, g->device);
        if (!nxt) { s = moe_last_status(); break; }
        s = be->reduce(ctx, MOE_RED_SUM, nxt, cur, outer, n, inner);
        moe_tensor_release(cur);
        cur = nxt;
        d = e;
    }
    if (s == MOE_OK) s = be->copy(ctx, out, cur);
    /* a sum of one element is that element: a loss gradient the host knows stays known */
    if (s == MOE_OK && moe_tensor_numel(g) == 1) ops_carry_host_value(out, g);
    moe_tensor_release(cur);
    return s;
}

/* ---- reductions ---- */

moe_status moe_op_reduce(moe_ctx *ctx, moe_reduce_op rop, moe_tensor *out, const moe_tensor *x, int dim) {
    static const char *op = "reduce";
    if ((unsigned)rop >= MOE_NUM_REDUCE) return moe_error(MOE_ERR_ARG, "reduce: unknown op %d", (int)rop);
    ops_arg f[] = {{"out", out}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    int d = dim < 0 ? dim + x->ndim : dim;
    if (d < 0 || d >= x->ndim)
        return moe_error(MOE_ERR_RANGE, "reduce: dim %d is out of range for x with %d dims (expected %d..%d)", dim,
                         x->ndim, -x->ndim, x->ndim - 1);
    int64_t outer = 1, n = x->shape[d], inner = 1;
    for (int i = 0; i < d; i++) outer *= x->shape[i];
    for (int i = d + 1; i < x->ndim; i++) inner *= x->shape[i];
    int64_t rs[MOE_MAX_DIMS], ks[MOE_MAX_DIMS];
    for (int i = 0, j = 0; i < x->ndim; i++) {
        ks[i] = i == d ? 1 : x->shape[i];
        if (i != d) rs[j++] = x->shape[i];
    }
    int ok_removed = out->ndim == x->ndim - 1, ok_keep = out->ndim == x->ndim;
    for (int i = 0; ok_removed && i < x->ndim - 1; i++) ok_removed = out->shape[i] == rs[i];
    for (int i = 0; ok_keep && i < x->ndim; i++) ok_keep = out->shape[i] == ks[i];
    if (!ok_removed && !ok_keep) {
        char s1[128], s2[128], s3[128];
        return moe_error(MOE_ERR_SHAPE, "reduce: out has shape %s, expected %s (x's shape %s without dim %d) or "
                         "the keepdim shape", OPS_SHAPE(out, s1), moe_shape_str_raw(x->ndim - 1, rs, s2, sizeof s2),
                         OPS_SHAPE(x, s3), d);
    }
    if (n == 0 && (rop == MOE_RED_MAX || rop == MOE_RED_MIN))
        return moe_error(MOE_ERR_SHAPE, "reduce: cannot take the %s of an empty dim (dim %d has size 0)",
                         rop == MOE_RED_MAX ? "max" : "min", d);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, reduce, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->reduce(ctx, rop, out, xc, outer, n, inner);
    moe_tensor_release(xc);
    return s;
}

moe_status moe_op_reduce_all(moe_ctx *ctx, moe_reduce_op rop, moe_tensor *out, const moe_tensor *x) {
    static const char *op = "reduce_all";
    if ((unsigned)rop >= MOE_NUM_REDUCE) return moe_error(MOE_ERR_ARG, "reduce_all: unknown op %d", (int)rop);
    ops_arg f[] = {{"out", out}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    if (moe_tensor_numel(out) != 1) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "reduce_all: out has shape %s, expected a 0-dim or 1-element tensor",
                         OPS_SHAPE(out, s1));
    }
    int64_t n = moe_tensor_numel(x);
    if (n == 0 && (rop == MOE_RED_MAX || rop == MOE_RED_MIN))
        return moe_error(MOE_ERR_SHAPE, "reduce_all: cannot take the %s of an empty tensor",
                         rop == MOE_RED_MAX ? "max" : "min");
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, reduce, be);
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->reduce(ctx, rop, out, xc, 1, n, 1);
    moe_tensor_release(xc);
    return s;
}

moe_status moe_op_sumsq(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    static const char *op = "sumsq";
    if (!out || !x) return moe_error(MOE_ERR_ARG, "sumsq: %s is NULL, expected a tensor", out ? "x" : "out");
    if (out->dtype != MOE_F32) return moe_error(MOE_ERR_DTYPE, "sumsq: out has dtype %s, expected f32", moe_dtype_name(out->dtype));
    if (x->dtype != MOE_F32 && x->dtype != MOE_BF16)
        return moe_error(MOE_ERR_DTYPE, "sumsq: x has dtype %s, expected f32 or bf16", moe_dtype_name(x->dtype));
    if (!moe_device_eq(out->device, x->device)) return moe_error(MOE_ERR_DEVICE, "sumsq: out and x are on different devices");
    MOE_TRY(ops_out(op, "out", out));
    if (moe_tensor_numel(out) != 1) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "sumsq: out has shape %s, expected a 0-dim or 1-element tensor", OPS_SHAPE(out, s1));
    }
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, sumsq, be);
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->sumsq(ctx, out, xc);
    moe_tensor_release(xc);
    return s;
}

/* ---- softmax family ---- */

typedef moe_status (*rowop_fn)(moe_ctx *, moe_tensor *, const moe_tensor *);

static moe_status softmax_like(moe_ctx *ctx, const char *op, size_t entry, moe_tensor *y, const moe_tensor *x) {
    ops_arg f[] = {{"y", y}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(ops_same_shape(op, "y", y, "x", x));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, y->device, &be));
    rowop_fn fn;
    memcpy(&fn, (const char *)be + entry, sizeof fn);
    if (!fn) return ops_unsupported(op, be);
    if (moe_tensor_numel(y) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = fn(ctx, y, xc);
    moe_tensor_release(xc);
    return s;
}

typedef moe_status (*rowbwd_fn)(moe_ctx *, moe_tensor *, const moe_tensor *, const moe_tensor *);

static moe_status softmax_like_backward(moe_ctx *ctx, const char *op, size_t entry, moe_tensor *dx,
                                        const moe_tensor *dy, const moe_tensor *y) {
    ops_arg f[] = {{"dx", dx}, {"dy", dy}, {"y", y}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "dx", dx));
    MOE_TRY(ops_same_shape(op, "dy", dy, "y", y));
    MOE_TRY(ops_same_shape(op, "dx", dx, "y", y));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, dx->device, &be));
    rowbwd_fn fn;
    memcpy(&fn, (const char *)be + entry, sizeof fn);
    if (!fn) return ops_unsupported(op, be);
    if (moe_tensor_numel(dx) == 0) return MOE_OK;
    moe_tensor *dyc, *yc = NULL;
    MOE_TRY(ops_contig(ctx, dy, &dyc));
    moe_status s = ops_contig(ctx, y, &yc);
    if (s == MOE_OK) s = fn(ctx, dx, dyc, yc);
    moe_tensor_release(dyc);
    moe_tensor_release(yc);
    return s;
}

moe_status moe_op_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return softmax_like(ctx, "softmax", offsetof(moe_backend, softmax), y, x);
}
moe_status moe_op_log_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return softmax_like(ctx, "log_softmax", offsetof(moe_backend, log_softmax), y, x);
}
moe_status moe_op_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return softmax_like_backward(ctx, "softmax_backward", offsetof(moe_backend, softmax_backward), dx, dy, y);
}
moe_status moe_op_log_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return softmax_like_backward(ctx, "log_softmax_backward", offsetof(moe_backend, log_softmax_backward), dx, dy, y);
}

/* out has x's shape without the last dim, or with the last dim set to `last` */
static moe_status check_last_removed(const char *op, const char *name, const moe_tensor *out, const moe_tensor *x,
                                     int64_t last, int allow_removed) {
    int64_t ks[MOE_MAX_DIMS];
    for (int i = 0; i < x->ndim; i++) ks[i] = x->shape[i];
    ks[x->ndim - 1] = last;
    if (allow_removed && out->ndim == x->ndim - 1) {
        int ok = 1;
        for (int i = 0; i < out->ndim; i++) ok &= out->shape[i] == x->shape[i];
        if (ok) return MOE_OK;
    }
    if (ops_shape_is(op, name, out, x->ndim, ks, NULL) == MOE_OK) return MOE_OK;
    char s1[128], s2[128], s3[128];
    return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected %s%s%s", op, name, OPS_SHAPE(out, s1),
                     allow_removed ? moe_shape_str_raw(x->ndim - 1, x->shape, s2, sizeof s2) : "",
                     allow_removed ? " (x without its last dim) or " : "",
                     moe_shape_str_raw(x->ndim, ks, s3, sizeof s3));
}

moe_status moe_op_logsumexp(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    static const char *op = "logsumexp";
    ops_arg f[] = {{"out", out}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "logsumexp: x is 0-dim, expected at least 1 dim");
    MOE_TRY(check_last_removed(op, "out", out, x, 1, 1));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, logsumexp, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->logsumexp(ctx, out, xc);
    moe_tensor_release(xc);
    return s;
}

/* ---- selection and indexing ---- */

moe_status moe_op_topk(moe_ctx *ctx, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k) {
    static const char *op = "topk";
    ops_arg f[] = {{"values", values}, {"x", x}}, ix[] = {{"indices", indices}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "values", values));
    MOE_TRY(ops_out(op, "indices", indices));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "topk: x is 0-dim, expected at least 1 dim");
    int64_t n = ops_last(x);
    if (k < 0 || k > n)
        return moe_error(MOE_ERR_ARG, "topk: k is %d, expected 0..%lld (the size of x's last dim)", k, (long long)n);
    MOE_TRY(check_last_removed(op, "values", values, x, k, 0));
    MOE_TRY(check_last_removed(op, "indices", indices, x, k, 0));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, x->device, topk, be);
    if (moe_tensor_numel(values) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->topk(ctx, values, indices, xc, k);
    moe_tensor_release(xc);
    return s;
}

/* index has x's leading dims (any last dim) */
static moe_status check_rowwise_index(const char *op, const char *xname, const moe_tensor *x, const moe_tensor *index) {
    char s1[128], s2[128];
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "%s: %s is 0-dim, expected at least 1 dim", op, xname);
    int ok = index->ndim == x->ndim;
    for (int i = 0; ok && i < x->ndim - 1; i++) ok = index->shape[i] == x->shape[i];
    if (!ok)
        return moe_error(MOE_ERR_SHAPE, "%s: index has shape %s, expected the leading dims of %s %s and any last dim",
                         op, OPS_SHAPE(index, s1), xname, OPS_SHAPE(x, s2));
    return MOE_OK;
}

moe_status moe_op_gather(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    static const char *op = "gather";
    ops_arg f[] = {{"out", out}, {"x", x}}, ix[] = {{"index", index}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(check_rowwise_index(op, "x", x, index));
    MOE_TRY(ops_same_shape(op, "out", out, "index", index));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, gather, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    moe_tensor *xc, *ic = NULL;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = ops_contig(ctx, index, &ic);
    if (s == MOE_OK) s = be->gather(ctx, out, xc, ic);
    moe_tensor_release(xc);
    moe_tensor_release(ic);
    return s;
}

moe_status moe_op_scatter_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    static const char *op = "scatter_add";
    ops_arg f[] = {{"dst", dst}, {"src", src}}, ix[] = {{"index", index}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "dst", dst));
    MOE_TRY(check_rowwise_index(op, "dst", dst, index));
    MOE_TRY(ops_same_shape(op, "src", src, "index", index));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dst->device, scatter_add, be);
    if (moe_tensor_numel(src) == 0) return MOE_OK;
    moe_tensor *sc, *ic = NULL;
    MOE_TRY(ops_contig(ctx, src, &sc));
    moe_status s = ops_contig(ctx, index, &ic);
    if (s == MOE_OK) s = be->scatter_add(ctx, dst, ic, sc);
    moe_tensor_release(sc);
    moe_tensor_release(ic);
    return s;
}

/* rows selected from a table: index [M], other [M, table.shape[1:]...] */
static moe_status check_row_select(const char *op, const char *tname, const moe_tensor *table, const moe_tensor *index,
                                   const char *oname, const moe_tensor *other) {
    char s1[128];
    if (table->ndim < 1) return moe_error(MOE_ERR_SHAPE, "%s: %s is 0-dim, expected at least 1 dim", op, tname);
    if (index->ndim != 1)
        return moe_error(MOE_ERR_SHAPE, "%s: index has shape %s, expected 1 dim [M]", op, OPS_SHAPE(index, s1));
    int64_t shape[MOE_MAX_DIMS];
    shape[0] = index->shape[0];
    for (int i = 1; i < table->ndim; i++) shape[i] = table->shape[i];
    return ops_shape_is(op, oname, other, table->ndim, shape, "[index size, the other dims of the table]");
}

moe_status moe_op_index_select(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    static const char *op = "index_select";
    ops_arg f[] = {{"out", out}, {"x", x}}, ix[] = {{"index", index}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(check_row_select(op, "x", x, index, "out", out));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, index_select, be);
    if (moe_tensor_numel(index) == 0) return MOE_OK;
    moe_tensor *xc, *ic = NULL;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = ops_contig(ctx, index, &ic);
    if (s == MOE_OK) s = be->index_select(ctx, out, xc, ic);
    moe_tensor_release(xc);
    moe_tensor_release(ic);
    return s;
}

moe_status moe_op_index_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    static const char *op = "index_add";
    ops_arg f[] = {{"dst", dst}, {"src", src}}, ix[] = {{"index", index}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "dst", dst));
    MOE_TRY(check_row_select(op, "dst", dst, index, "src", src));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dst->device, index_add, be);
    if (moe_tensor_numel(index) == 0) return MOE_OK;
    moe_tensor *sc, *ic = NULL;
    MOE_TRY(ops_contig(ctx, src, &sc));
    moe_status s = ops_contig(ctx, index, &ic);
    if (s == MOE_OK) s = be->index_add(ctx, dst, ic, sc);
    moe_tensor_release(sc);
    moe_tensor_release(ic);
    return s;
}

/* embedding = index_select / index_add over a [V, D] table with flattened ids */
static moe_status check_embedding(const char *op, const moe_tensor *table, const moe_tensor *ids, const char *oname,
                                  const moe_tensor *o) {
    char s1[128];
    if (table->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: table has shape %s, expected [V, D]", op, OPS_SHAPE(table, s1));
    if (ids->ndim + 1 > MOE_MAX_DIMS)
        return moe_error(MOE_ERR_SHAPE, "%s: ids has %d dims, expected at most %d", op, ids->ndim, MOE_MAX_DIMS - 1);
    int64_t shape[MOE_MAX_DIMS];
    for (int i = 0; i < ids->ndim; i++) shape[i] = ids->shape[i];
    shape[ids->ndim] = table->shape[1];
    return ops_shape_is(op, oname, o, ids->ndim + 1, shape, "[ids..., D]");
}

static moe_status flat_view(moe_tensor *t, int64_t d0, int64_t d1, int nd, moe_tensor **out) {
    int64_t s[2] = {d0, d1};
    *out = moe_tensor_view(t, nd, s);
    return *out ? MOE_OK : moe_last_status();
}

/* The contiguous ids as a flat [n] header over the same memory, for the length
 * of one backend call (which reads it and keeps no reference). Not a view: a
 * view marks the storage aliased, which voids the ids' index bound (tensor.h),
 * and with it the check the bound lets the backend skip. */
static moe_tensor flat_ids(const moe_tensor *ic, int64_t n) {
    moe_tensor h = *ic;
    h.refcount = 1;
    h.ndim = 1;
    h.shape[0] = n;
    h.stride[0] = 1;
    return h;
}

moe_status moe_op_embedding(moe_ctx *ctx, moe_tensor *out, const moe_tensor *table, const moe_tensor *ids) {
    static const char *op = "embedding";
    ops_arg f[] = {{"out", out}, {"table", table}}, ix[] = {{"ids", ids}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(check_embedding(op, table, ids, "out", out));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, index_select, be);
    int64_t n = moe_tensor_numel(ids);
    if (n == 0) return MOE_OK;
    moe_tensor *ic = NULL, *ov = NULL, *tc = NULL;
    moe_status s = ops_contig(ctx, ids, &ic);
    if (s == MOE_OK) s = ops_contig(ctx, table, &tc);
    if (s == MOE_OK) s = flat_view(out, n, table->shape[1], 2, &ov);
    if (s == MOE_OK) {
        moe_tensor iv = flat_ids(ic, n);
        s = moe_error_context(be->index_select(ctx, ov, tc, &iv), "embedding");
    }
    moe_tensor_release(ic); moe_tensor_release(ov); moe_tensor_release(tc);
    return s;
}

moe_status moe_op_embedding_backward(moe_ctx *ctx, moe_tensor *dtable, const moe_tensor *dout, const moe_tensor *ids) {
    static const char *op = "embedding_backward";
    ops_arg f[] = {{"dtable", dtable}, {"dout", dout}}, ix[] = {{"ids", ids}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "dtable", dtable));
    MOE_TRY(check_embedding(op, dtable, ids, "dout", dout));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dtable->device, index_add, be);
    int64_t n = moe_tensor_numel(ids);
    if (n == 0) return MOE_OK;
    moe_tensor *ic = NULL, *dc = NULL, *dv = NULL;
    moe_status s = ops_contig(ctx, ids, &ic);
    if (s == MOE_OK) s = ops_contig(ctx, dout, &dc);
    if (s == MOE_OK) s = flat_view(dc, n, dtable->shape[1], 2, &dv);
    if (s == MOE_OK) {
        moe_tensor iv = flat_ids(ic, n);
        s = moe_error_context(be->index_add(ctx, dtable, &iv, dv), "embedding_backward");
    }
    moe_tensor_release(ic); moe_tensor_release(dc); moe_tensor_release(dv);
    return s;
}
