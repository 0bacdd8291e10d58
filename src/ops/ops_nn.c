/* ops_nn.c: layer-level ops (norms, rope, attention, gated activations, loss,
 * optimiser): argument checks, contiguous copies, dispatch. */
#include "ops_internal.h"

#include <math.h>

/* A per-row statistic (rstd, mean, lse, loss): `rows` elements, any shape
 * ([rows] or x's leading dims). */
static moe_status check_rowstat(const char *op, const char *name, const moe_tensor *t, int64_t rows) {
    if (moe_tensor_numel(t) != rows) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s (%lld elements), expected %lld elements (one per row)",
                         op, name, OPS_SHAPE(t, s1), (long long)moe_tensor_numel(t), (long long)rows);
    }
    return MOE_OK;
}

/* The dtype and device of a per-row statistic (rstd, mean, lse, per-row loss):
 * the data's dtype, or f32 whatever the data's dtype (so bf16 data can keep
 * f32 statistics). The statistic is left out of ops_check's shared-dtype rule;
 * `data` (already checked by ops_check) names the data dtype and device. */
static moe_status check_stat(const char *op, const char *name, const moe_tensor *t, const char *dname,
                             const moe_tensor *data) {
    MOE_TRY(ops_nonnull(op, name, t));
    if (t->dtype != data->dtype && t->dtype != MOE_F32)
        return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected %s (the dtype of %s)%s", op, name,
                         moe_dtype_name(t->dtype), moe_dtype_name(data->dtype), dname,
                         data->dtype == MOE_F32 ? "" : " or f32");
    if (!moe_device_eq(t->device, data->device)) {
        char b1[16], b2[16];
        return moe_error(MOE_ERR_DEVICE, "%s: %s is on %s, expected %s (the device of %s)", op, name,
                         moe_device_str(t->device, b1, sizeof b1), moe_device_str(data->device, b2, sizeof b2), dname);
    }
    return MOE_OK;
}

static moe_status check_norm_weight(const char *op, const char *name, const moe_tensor *w, const moe_tensor *x) {
    int64_t d = ops_last(x);
    return ops_shape_is(op, name, w, 1, &d, "the last dim of x");
}

static void release_all(moe_tensor **ts, int n) {
    for (int i = 0; i < n; i++) moe_tensor_release(ts[i]);
}

/* contiguous copies of n inputs into c[]; on failure releases what it made */
static moe_status contig_all(moe_ctx *ctx, const moe_tensor *const *in, moe_tensor **c, int n) {
    for (int i = 0; i < n; i++) c[i] = NULL;
    for (int i = 0; i < n; i++) {
        moe_status s = ops_contig(ctx, in[i], &c[i]);
        if (s != MOE_OK) { release_all(c, i); return s; }
    }
    return MOE_OK;
}

/* ---- normalisation ---- */

moe_status moe_op_rmsnorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                          float eps) {
    static const char *op = "rmsnorm";
    ops_arg f[] = {{"y", y}, {"x", x}, {"w", w}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(check_stat(op, "rstd", rstd, "y", y));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(ops_out(op, "rstd", rstd));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "rmsnorm: x is 0-dim, expected at least 1 dim");
    MOE_TRY(ops_same_shape(op, "y", y, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    if (!(eps >= 0)) return moe_error(MOE_ERR_ARG, "rmsnorm: eps is %g, expected >= 0", (double)eps);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, y->device, rmsnorm, be);
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {x, w};
    moe_tensor *c[2];
    MOE_TRY(contig_all(ctx, in, c, 2));
    moe_status s = be->rmsnorm(ctx, y, rstd, c[0], c[1], eps);
    release_all(c, 2);
    return s;
}

moe_status moe_op_rmsnorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd) {
    return moe_op_rmsnorm_backward_beta(ctx, dx, dw, dy, x, w, rstd, 0.0f);
}

moe_status moe_op_rmsnorm_backward_beta(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                        const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta) {
    static const char *op = "rmsnorm_backward";
    ops_arg f[] = {{"dx", dx}, {"dy", dy}, {"x", x}, {"w", w}, {"dw", dw}};
    MOE_TRY(ops_check(op, f, dw ? 5 : 4, NULL, 0));
    MOE_TRY(check_stat(op, "rstd", rstd, "dx", dx));
    MOE_TRY(ops_out(op, "dx", dx));
    if (dw) MOE_TRY(ops_out(op, "dw", dw));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "rmsnorm_backward: x is 0-dim, expected at least 1 dim");
    MOE_TRY(ops_same_shape(op, "dx", dx, "x", x));
    MOE_TRY(ops_same_shape(op, "dy", dy, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    if (dw) MOE_TRY(check_norm_weight(op, "dw", dw, x));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dx->device, rmsnorm_backward, be);
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {dy, x, w, rstd};
    moe_tensor *c[4];
    MOE_TRY(contig_all(ctx, in, c, 4));
    moe_status s = be->rmsnorm_backward(ctx, dx, dw, c[0], c[1], c[2], c[3], beta);
    release_all(c, 4);
    return s;
}

moe_status moe_op_layernorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                            const moe_tensor *w, const moe_tensor *b, float eps) {
    static const char *op = "layernorm";
    ops_arg f[] = {{"y", y}, {"x", x}, {"w", w}, {"b", b}};
    MOE_TRY(ops_check(op, f, b ? 4 : 3, NULL, 0));
    MOE_TRY(check_stat(op, "mean", mean, "y", y));
    MOE_TRY(check_stat(op, "rstd", rstd, "y", y));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(ops_out(op, "mean", mean));
    MOE_TRY(ops_out(op, "rstd", rstd));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "layernorm: x is 0-dim, expected at least 1 dim");
    MOE_TRY(ops_same_shape(op, "y", y, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    if (b) MOE_TRY(check_norm_weight(op, "bias", b, x));
    MOE_TRY(check_rowstat(op, "mean", mean, ops_rows(x)));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    if (!(eps >= 0)) return moe_error(MOE_ERR_ARG, "layernorm: eps is %g, expected >= 0", (double)eps);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, y->device, layernorm, be);
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {x, w, b};
    moe_tensor *c[3];
    MOE_TRY(contig_all(ctx, in, c, 3));
    moe_status s = be->layernorm(ctx, y, mean, rstd, c[0], c[1], c[2], eps);
    release_all(c, 3);
    return s;
}

moe_status moe_op_layernorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, moe_tensor *db,
                                     const moe_tensor *dy, const moe_tensor *x, const moe_tensor *w,
                                     const moe_tensor *mean, const moe_tensor *rstd) {
    static const char *op = "layernorm_backward";
    ops_arg f[6] = {{"dx", dx}, {"dy", dy}, {"x", x}, {"w", w}};
    int nf = 4;
    if (dw) f[nf++] = (ops_arg){"dw", dw};
    if (db) f[nf++] = (ops_arg){"db", db};
    MOE_TRY(ops_check(op, f, nf, NULL, 0));
    MOE_TRY(check_stat(op, "mean", mean, "dx", dx));
    MOE_TRY(check_stat(op, "rstd", rstd, "dx", dx));
    MOE_TRY(ops_out(op, "dx", dx));
    if (dw) MOE_TRY(ops_out(op, "dw", dw));
    if (db) MOE_TRY(ops_out(op, "db", db));
    if (x->ndim < 1) return moe_error(MOE_ERR_SHAPE, "layernorm_backward: x is 0-dim, expected at least 1 dim");
    MOE_TRY(ops_same_shape(op, "dx", dx, "x", x));
    MOE_TRY(ops_same_shape(op, "dy", dy, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    if (dw) MOE_TRY(check_norm_weight(op, "dw", dw, x));
    if (db) MOE_TRY(check_norm_weight(op, "db", db, x));
    MOE_TRY(check_rowstat(op, "mean", mean, ops_rows(x)));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dx->device, layernorm_backward, be);
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {dy, x, w, mean, rstd};
    moe_tensor *c[5];
    MOE_TRY(contig_all(ctx, in, c, 5));
    moe_status s = be->layernorm_backward(ctx, dx, dw, db, c[0], c[1], c[2], c[3], c[4]);
    release_all(c, 5);
    return s;
}

/* ---- rope ---- */

moe_status moe_op_rope(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse) {
    static const char *op = "rope";
    ops_arg f[] = {{"out", out}, {"x", x}};
    MOE_TRY(ops_check(op, f, 2, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    char s1[128];
    if (x->ndim != 4 || x->shape[3] % 2)
        return moe_error(MOE_ERR_SHAPE, "rope: x has shape %s, expected [B, T, H, D] with D even", OPS_SHAPE(x, s1));
    MOE_TRY(ops_same_shape(op, "out", out, "x", x));
    if (pos_offset < 0) return moe_error(MOE_ERR_ARG, "rope: pos_offset is %lld, expected >= 0", (long long)pos_offset);
    if (!(theta > 0)) return moe_error(MOE_ERR_ARG, "rope: theta is %g, expected > 0", (double)theta);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, rope, be);
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    moe_tensor *xc;
    MOE_TRY(ops_contig(ctx, x, &xc));
    moe_status s = be->rope(ctx, out, xc, pos_offset, theta, inverse);
    moe_tensor_release(xc);
    return s;
}

/* ---- RMSNorm + rope (QK-norm) ---- */

static moe_status check_norm_rope(const char *op, const moe_tensor *x, int64_t heads, int64_t pos_offset,
                                  float theta) {
    char s1[128];
    if (x->ndim != 3 || heads < 1 || x->shape[2] % heads || (x->shape[2] / heads) % 2)
        return moe_error(MOE_ERR_SHAPE, "%s: x has shape %s, expected [B, T, heads * D] with %lld heads of even D", op,
                         OPS_SHAPE(x, s1), (long long)heads);
    if (pos_offset < 0) return moe_error(MOE_ERR_ARG, "%s: pos_offset is %lld, expected >= 0", op, (long long)pos_offset);
    if (!(theta > 0)) return moe_error(MOE_ERR_ARG, "%s: theta is %g, expected > 0", op, (double)theta);
    return MOE_OK;
}

/* [B, T, heads, D] view of a [B, T, heads * D] tensor, for moe_op_rope */
static moe_tensor *heads_view4(moe_tensor *t, int64_t heads) {
    int64_t s[4] = {t->shape[0], t->shape[1], heads, t->shape[2] / heads};
    return moe_tensor_view(t, 4, s);
}

moe_status moe_op_rmsnorm_rope(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                               float eps, int64_t heads, int64_t pos_offset, float theta) {
    static const char *op = "rmsnorm_rope";
    ops_arg f[] = {{"y", y}, {"x", x}, {"w", w}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(check_norm_rope(op, x, heads, pos_offset, theta));
    if (!(eps >= 0)) return moe_error(MOE_ERR_ARG, "%s: eps is %g, expected >= 0", op, (double)eps);
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, x->device, &be));
    if (!be->rmsnorm_rope || !moe_tensor_is_contiguous(y)) {   /* the two ops check the rest */
        MOE_TRY(moe_op_rmsnorm(ctx, y, rstd, x, w, eps));
        moe_tensor *y4 = heads_view4(y, heads);
        if (!y4) return moe_last_status();
        moe_status s = moe_op_rope(ctx, y4, y4, pos_offset, theta, 0);
        moe_tensor_release(y4);
        return s;
    }
    MOE_TRY(check_stat(op, "rstd", rstd, "x", x));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(ops_out(op, "rstd", rstd));
    MOE_TRY(ops_same_shape(op, "y", y, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {x, w};
    moe_tensor *c[2];
    MOE_TRY(contig_all(ctx, in, c, 2));
    moe_status s = be->rmsnorm_rope(ctx, y, rstd, c[0], c[1], eps, heads, pos_offset, theta);
    release_all(c, 2);
    return s;
}

moe_status moe_op_rmsnorm_rope_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                        const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, int64_t heads,
                                        int64_t pos_offset, float theta, float beta) {
    static const char *op = "rmsnorm_rope_backward";
    ops_arg f[] = {{"dx", dx}, {"dy", dy}, {"x", x}, {"w", w}, {"dw", dw}};
    MOE_TRY(ops_check(op, f, dw ? 5 : 4, NULL, 0));
    MOE_TRY(check_norm_rope(op, x, heads, pos_offset, theta));
    MOE_TRY(ops_same_shape(op, "dy", dy, "x", x));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, x->device, &be));
    if (!be->rmsnorm_rope_backward || !moe_tensor_is_contiguous(dx)) {   /* inverse rope into a temporary, then the norm */
        moe_tensor *g = moe_tensor_new(ctx, dy->dtype, dy->ndim, dy->shape, dy->device);
        moe_tensor *g4 = g ? heads_view4(g, heads) : NULL, *dy4 = heads_view4((moe_tensor *)dy, heads);
        moe_status s = g4 && dy4 ? moe_op_rope(ctx, g4, dy4, pos_offset, theta, 1) : moe_last_status();
        if (s == MOE_OK) s = moe_op_rmsnorm_backward_beta(ctx, dx, dw, g, x, w, rstd, beta);
        moe_tensor_release(g4); moe_tensor_release(dy4); moe_tensor_release(g);
        return s;
    }
    MOE_TRY(check_stat(op, "rstd", rstd, "dx", dx));
    MOE_TRY(ops_out(op, "dx", dx));
    if (dw) MOE_TRY(ops_out(op, "dw", dw));
    MOE_TRY(ops_same_shape(op, "dx", dx, "x", x));
    MOE_TRY(check_norm_weight(op, "weight", w, x));
    if (dw) MOE_TRY(check_norm_weight(op, "dw", dw, x));
    MOE_TRY(check_rowstat(op, "rstd", rstd, ops_rows(x)));
    if (moe_tensor_numel(x) == 0) return MOE_OK;
    const moe_tensor *in[] = {dy, x, w, rstd};
    moe_tensor *c[4];
    MOE_TRY(contig_all(ctx, in, c, 4));
    moe_status s = be->rmsnorm_rope_backward(ctx, dx, dw, c[0], c[1], c[2], c[3], heads, pos_offset, theta, beta);
    release_all(c, 4);
    return s;
}

/* ---- attention ---- */

static moe_status check_attention(const char *op, const moe_tensor *q, const moe_tensor *k, const moe_tensor *v,
                                  const moe_tensor *out, const moe_tensor *lse) {
    char s1[128];
    if (q->ndim != 4) return moe_error(MOE_ERR_SHAPE, "%s: q has shape %s, expected [B, T, Hq, D]", op, OPS_SHAPE(q, s1));
    if (k->ndim != 4) return moe_error(MOE_ERR_SHAPE, "%s: k has shape %s, expected [B, S, Hkv, D]", op, OPS_SHAPE(k, s1));
    int64_t B = q->shape[0], T = q->shape[1], Hq = q->shape[2], D = q->shape[3];
    int64_t ks[4] = {B, k->shape[1], k->shape[2], D};
    MOE_TRY(ops_shape_is(op, "k", k, 4, ks, "[B, S, Hkv, D] with B and D from q"));
    MOE_TRY(ops_shape_is(op, "v", v, 4, ks, "the shape of k"));
    int64_t Hkv = k->shape[2];
    if (Hkv == 0 || Hq % Hkv)
        return moe_error(MOE_ERR_SHAPE, "%s: q has %lld heads and k %lld; expected a multiple (grouped-query)", op,
                         (long long)Hq, (long long)Hkv);
    MOE_TRY(ops_same_shape(op, "out", out, "q", q));
    int64_t ls[3] = {B, Hq, T};
    return ops_shape_is(op, "lse", lse, 3, ls, "[B, Hq, T]");
}

moe_status moe_op_attention(moe_ctx *ctx, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                            const moe_tensor *v, float scale, int causal) {
    static const char *op = "attention";
    ops_arg f[] = {{"out", out}, {"q", q}, {"k", k}, {"v", v}};
    MOE_TRY(ops_check(op, f, 4, NULL, 0));
    MOE_TRY(check_stat(op, "lse", lse, "out", out));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(ops_out(op, "lse", lse));
    MOE_TRY(check_attention(op, q, k, v, out, lse));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, attention, be);
    if (moe_tensor_numel(q) == 0) return MOE_OK;
    const moe_tensor *in[] = {q, k, v};
    moe_tensor *c[3];
    MOE_TRY(contig_all(ctx, in, c, 3));
    moe_status s = be->attention(ctx, out, lse, c[0], c[1], c[2], scale, causal);
    release_all(c, 3);
    return s;
}

moe_status moe_op_attention_backward(moe_ctx *ctx, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv,
                                     const moe_tensor *dout, const moe_tensor *q, const moe_tensor *k,
                                     const moe_tensor *v, const moe_tensor *out, const moe_tensor *lse, float scale,
                                     int causal) {
    static const char *op = "attention_backward";
    ops_arg f[] = {{"dq", dq}, {"dk", dk}, {"dv", dv}, {"dout", dout}, {"q", q},
                   {"k", k},   {"v", v},   {"out", out}};
    MOE_TRY(ops_check(op, f, 8, NULL, 0));
    MOE_TRY(check_stat(op, "lse", lse, "dq", dq));
    MOE_TRY(ops_out(op, "dq", dq));
    MOE_TRY(ops_out(op, "dk", dk));
    MOE_TRY(ops_out(op, "dv", dv));
    MOE_TRY(check_attention(op, q, k, v, out, lse));
    MOE_TRY(ops_same_shape(op, "dout", dout, "q", q));
    MOE_TRY(ops_same_shape(op, "dq", dq, "q", q));
    MOE_TRY(ops_same_shape(op, "dk", dk, "k", k));
    MOE_TRY(ops_same_shape(op, "dv", dv, "v", v));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dq->device, attention_backward, be);
    if (moe_tensor_numel(q) == 0 && moe_tensor_numel(k) == 0) return MOE_OK;
    const moe_tensor *in[] = {dout, q, k, v, out, lse};
    moe_tensor *c[6];
    MOE_TRY(contig_all(ctx, in, c, 6));
    moe_status s = be->attention_backward(ctx, dq, dk, dv, c[0], c[1], c[2], c[3], c[4], c[5], scale, causal);
    release_all(c, 6);
    return s;
}

/* ---- gated activations ---- */

moe_status moe_op_swiglu(moe_ctx *ctx, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up) {
    static const char *op = "swiglu";
    ops_arg f[] = {{"out", out}, {"gate", gate}, {"up", up}};
    MOE_TRY(ops_check(op, f, 3, NULL, 0));
    MOE_TRY(ops_out(op, "out", out));
    MOE_TRY(ops_same_shape(op, "up", up, "gate", gate));
    MOE_TRY(ops_same_shape(op, "out", out, "gate", gate));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, out->device, swiglu, be);
    if (moe_tensor_numel(out) == 0) return MOE_OK;
    const moe_tensor *in[] = {gate, up};
    moe_tensor *c[2];
    MOE_TRY(contig_all(ctx, in, c, 2));
    moe_status s = be->swiglu(ctx, out, c[0], c[1]);
    release_all(c, 2);
    return s;
}

moe_status moe_op_swiglu_backward(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                  const moe_tensor *gate, const moe_tensor *up) {
    static const char *op = "swiglu_backward";
    ops_arg f[] = {{"dgate", dgate}, {"dup", dup}, {"dout", dout}, {"gate", gate}, {"up", up}};
    MOE_TRY(ops_check(op, f, 5, NULL, 0));
    MOE_TRY(ops_out(op, "dgate", dgate));
    MOE_TRY(ops_out(op, "dup", dup));
    MOE_TRY(ops_same_shape(op, "up", up, "gate", gate));
    MOE_TRY(ops_same_shape(op, "dout", dout, "gate", gate));
    MOE_TRY(ops_same_shape(op, "dgate", dgate, "gate", gate));
    MOE_TRY(ops_same_shape(op, "dup", dup, "gate", gate));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dgate->device, swiglu_backward, be);
    if (moe_tensor_numel(gate) == 0) return MOE_OK;
    const moe_tensor *in[] = {dout, gate, up};
    moe_tensor *c[3];
    MOE_TRY(contig_all(ctx, in, c, 3));
    moe_status s = be->swiglu_backward(ctx, dgate, dup, c[0], c[1], c[2]);
    release_all(c, 3);
    return s;
}

/* ---- loss ---- */

static moe_status check_ce(const char *op, const moe_tensor *logits, const moe_tensor *targets) {
    char s1[128];
    if (logits->ndim != 2) return moe_error(MOE_ERR_SHAPE, "%s: logits has shape %s, expected [N, V]", op, OPS_SHAPE(logits, s1));
    int64_t n = logits->shape[0];
    return ops_shape_is(op, "targets", targets, 1, &n, "[N], one per row of logits");
}

/* the forward's loss and lse (one per row, f32 or the logits' dtype) and targets */
static moe_status check_ce_outputs(const char *op, const moe_tensor *loss, const moe_tensor *lse,
                                   const moe_tensor *logits, const moe_tensor *targets) {
    MOE_TRY(check_stat(op, "loss", loss, "logits", logits));
    MOE_TRY(check_stat(op, "lse", lse, "logits", logits));
    MOE_TRY(ops_out(op, "loss", loss));
    MOE_TRY(ops_out(op, "lse", lse));
    MOE_TRY(check_ce(op, logits, targets));
    MOE_TRY(check_rowstat(op, "loss", loss, logits->shape[0]));
    MOE_TRY(check_rowstat(op, "lse", lse, logits->shape[0]));
    if (logits->shape[1] == 0 && logits->shape[0] > 0)
        return moe_error(MOE_ERR_SHAPE, "%s: logits has 0 classes, expected at least 1", op);
    return MOE_OK;
}

moe_status moe_op_cross_entropy(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                                const moe_tensor *targets, int64_t ignore_index) {
    static const char *op = "cross_entropy";
    ops_arg f[] = {{"logits", logits}}, ix[] = {{"targets", targets}};
    MOE_TRY(ops_check(op, f, 1, ix, 1));
    MOE_TRY(check_ce_outputs(op, loss, lse, logits, targets));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, loss->device, cross_entropy, be);
    if (logits->shape[0] == 0) return MOE_OK;
    const moe_tensor *in[] = {logits, targets};
    moe_tensor *c[2];
    MOE_TRY(contig_all(ctx, in, c, 2));
    moe_status s = be->cross_entropy(ctx, loss, lse, c[0], c[1], ignore_index);
    release_all(c, 2);
    return s;
}

moe_status moe_op_cross_entropy_backward(moe_ctx *ctx, moe_tensor *dlogits, const moe_tensor *logits,
                                         const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                         float scale) {
    static const char *op = "cross_entropy_backward";
    ops_arg f[] = {{"dlogits", dlogits}, {"logits", logits}}, ix[] = {{"targets", targets}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(check_stat(op, "lse", lse, "logits", logits));
    MOE_TRY(ops_out(op, "dlogits", dlogits));
    MOE_TRY(check_ce(op, logits, targets));
    MOE_TRY(ops_same_shape(op, "dlogits", dlogits, "logits", logits));
    MOE_TRY(check_rowstat(op, "lse", lse, logits->shape[0]));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dlogits->device, cross_entropy_backward, be);
    if (moe_tensor_numel(logits) == 0) return MOE_OK;
    const moe_tensor *in[] = {logits, lse, targets};
    moe_tensor *c[3];
    MOE_TRY(contig_all(ctx, in, c, 3));
    moe_status s = be->cross_entropy_backward(ctx, dlogits, c[0], c[1], c[2], ignore_index, scale);
    release_all(c, 3);
    return s;
}

int moe_op_cross_entropy_fuses(moe_ctx *ctx, moe_device dev) {
    const moe_backend *be = NULL;
    return ops_backend(ctx, "cross_entropy_fused", dev, &be) == MOE_OK && be->cross_entropy_fused != NULL;
}

moe_status moe_op_cross_entropy_fused(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                      const moe_tensor *logits, const moe_tensor *targets, int64_t ignore_index,
                                      float scale) {
    static const char *op = "cross_entropy_fused";
    ops_arg f[] = {{"dlogits", dlogits}, {"logits", logits}}, ix[] = {{"targets", targets}};
    MOE_TRY(ops_check(op, f, 2, ix, 1));
    MOE_TRY(ops_out(op, "dlogits", dlogits));
    MOE_TRY(ops_same_shape(op, "dlogits", dlogits, "logits", logits));
    const moe_backend *be;
    MOE_TRY(ops_backend(ctx, op, logits->device, &be));
    if (!be->cross_entropy_fused) {   /* the two ops check the rest */
        MOE_TRY(moe_op_cross_entropy(ctx, loss, lse, logits, targets, ignore_index));
        return moe_op_cross_entropy_backward(ctx, dlogits, logits, lse, targets, ignore_index, scale);
    }
    MOE_TRY(check_ce_outputs(op, loss, lse, logits, targets));
    if (logits->shape[0] == 0) return MOE_OK;
    const moe_tensor *in[] = {logits, targets};
    moe_tensor *c[2];
    MOE_TRY(contig_all(ctx, in, c, 2));
    moe_status s = be->cross_entropy_fused(ctx, loss, lse, dlogits, c[0], c[1], ignore_index, scale);
    release_all(c, 2);
    return s;
}

/* ---- optimiser ---- */

/* t: one element of dtype dt on the device of `ref` (named ref_name): AdamW's
 * device-held scalars (the clipping's norm and guard, step_dev, lr_dev) */
static moe_status adamw_scalar(const char *op, const char *name, const moe_tensor *t, moe_dtype dt,
                               const moe_tensor *ref, const char *ref_name) {
    if (t->dtype == dt && moe_tensor_numel(t) == 1 && moe_device_eq(t->device, ref->device)) return MOE_OK;
    char got[32], want[32];
    return moe_error(MOE_ERR_ARG, "%s: %s must be one %s element on %s device (%s), got %s with %lld elements on %s",
                     op, name, moe_dtype_name(dt), ref_name, moe_device_str(ref->device, want, sizeof want),
                     moe_dtype_name(t->dtype), (long long)moe_tensor_numel(t),
                     moe_device_str(t->device, got, sizeof got));
}

/* cfg's clipping by the device's norm, as the update and the counter's advance read it */
static moe_status adamw_clip_args(const char *op, const moe_adamw_cfg *cfg, const moe_tensor *ref,
                                  const char *ref_name) {
    if (cfg->clip_sumsq) MOE_TRY(adamw_scalar(op, "clip_sumsq", cfg->clip_sumsq, MOE_F32, ref, ref_name));
    if (cfg->guard) MOE_TRY(adamw_scalar(op, "guard", cfg->guard, MOE_F32, ref, ref_name));
    if (cfg->guard && !cfg->clip_sumsq) return moe_error(MOE_ERR_ARG, "%s: a guard needs clip_sumsq", op);
    if (cfg->clip_sumsq && !(cfg->clip_max > 0))
        return moe_error(MOE_ERR_ARG, "%s: clip_max is %g, expected > 0 (infinity: no clipping)", op, cfg->clip_max);
    return MOE_OK;
}

moe_status moe_op_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                        const moe_adamw_cfg *cfg) {
    static const char *op = "adamw";
    if (!cfg) return moe_error(MOE_ERR_ARG, "adamw: cfg is NULL, expected the hyperparameters");
    ops_arg f[] = {{"params", params}, {"grads", grads}, {"m", m}, {"v", v}, {"compute", cfg->compute}};
    int nf = cfg->compute ? 5 : 4;
    for (int i = 0; i < nf; i++)
        if (!f[i].t) return moe_error(MOE_ERR_ARG, "adamw: %s is NULL, expected a tensor", f[i].name);
    if (cfg->lo) {   /* a split master: params is its bf16 high plane (ops.h) */
        if (cfg->compute)
            return moe_error(MOE_ERR_ARG, "adamw: a split master's high plane is the compute copy; compute must be NULL");
        if (params->dtype != MOE_BF16 || cfg->lo->dtype != MOE_I16)
            return moe_error(MOE_ERR_DTYPE, "adamw: a split master takes params bf16 and lo i16, got %s and %s",
                             moe_dtype_name(params->dtype), moe_dtype_name(cfg->lo->dtype));
        f[4] = (ops_arg){"lo", cfg->lo};
        nf = 5;
    }
    for (int i = 0; i < nf; i++) {
        int lowp_ok = i >= 1;   /* grads, m and v (the two alike, below) and the compute copy may be bf16 */
        moe_dtype dt = f[i].t->dtype;
        if (cfg->lo && (i == 0 || i == 4)) dt = MOE_F32;   /* (the planes' dtypes checked above) */
        if (dt != MOE_F32 && !(lowp_ok && dt == MOE_BF16))
            return moe_error(MOE_ERR_DTYPE, "adamw: %s has dtype %s, expected f32%s", f[i].name, moe_dtype_name(dt),
                             lowp_ok ? " or bf16" : "");
        if (!moe_device_eq(f[i].t->device, params->device))
            return moe_error(MOE_ERR_DEVICE, "adamw: %s is on another device than params", f[i].name);
        if (!moe_tensor_is_contiguous(f[i].t))
            return moe_error(MOE_ERR_ARG, "adamw: %s must be contiguous, got a strided view", f[i].name);
        if (moe_tensor_numel(f[i].t) != moe_tensor_numel(params)) {
            char s1[128], s2[128];
            return moe_error(MOE_ERR_SHAPE, "adamw: %s has shape %s (%lld elements), expected %lld elements "
                             "(params %s)", f[i].name, OPS_SHAPE(f[i].t, s1), (long long)moe_tensor_numel(f[i].t),
                             (long long)moe_tensor_numel(params), OPS_SHAPE(params, s2));
        }
    }
    if (m->dtype != v->dtype)
        return moe_error(MOE_ERR_DTYPE, "adamw: m is %s and v is %s, expected both f32 or both bf16",
                         moe_dtype_name(m->dtype), moe_dtype_name(v->dtype));
    if (cfg->index0 < 0) return moe_error(MOE_ERR_ARG, "adamw: index0 is %lld, expected >= 0", (long long)cfg->index0);
    if (!cfg->step_dev && cfg->step < 1)
        return moe_error(MOE_ERR_ARG, "adamw: step is %lld, expected >= 1 (steps count from 1)", (long long)cfg->step);
    if (cfg->step_dev) MOE_TRY(adamw_scalar(op, "step_dev", cfg->step_dev, MOE_I64, params, "the params'"));
    if (cfg->lr_dev) MOE_TRY(adamw_scalar(op, "lr_dev", cfg->lr_dev, MOE_F32, params, "the params'"));
    if (!(cfg->beta1 >= 0 && cfg->beta1 < 1) || !(cfg->beta2 >= 0 && cfg->beta2 < 1))
        return moe_error(MOE_ERR_ARG, "adamw: betas are (%g, %g), expected each in [0, 1)", (double)cfg->beta1,
                         (double)cfg->beta2);
    MOE_TRY(adamw_clip_args(op, cfg, params, "the params'"));
    if (cfg->n_runs < 0 || cfg->n_runs > MOE_ADAMW_MAX_RUNS || (cfg->n_runs > 0 && !cfg->runs))
        return moe_error(MOE_ERR_ARG, "adamw: %d runs%s, expected 0 to %d", cfg->n_runs,
                         cfg->n_runs > 0 && !cfg->runs ? " but no array" : "", MOE_ADAMW_MAX_RUNS);
    for (int r = 0; r < cfg->n_runs; r++) {
        const moe_adamw_run *u = &cfg->runs[r];
        int64_t prev = r > 0 ? cfg->runs[r - 1].hi : 0;
        if (u->lo < prev || u->hi <= u->lo || u->hi > moe_tensor_numel(params) || u->lo % 8)
            return moe_error(MOE_ERR_ARG, "adamw: run %d is [%lld, %lld), expected sorted, disjoint, non-empty runs "
                             "within [0, %lld) starting on multiples of 8", r, (long long)u->lo, (long long)u->hi,
                             (long long)moe_tensor_numel(params));
    }
    moe_tensor *written[5] = {params, m, v, cfg->compute, cfg->lo};
    for (int i = 0; i < 5; i++)
        if (written[i]) MOE_TRY(ops_out(op, "params, m, v, compute or lo", written[i]));   /* (contiguity checked above) */
    MOE_TRY(moe_tensor_ready(grads));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, params->device, adamw, be);
    if (moe_tensor_numel(params) == 0) return MOE_OK;
    return be->adamw(ctx, params, grads, m, v, cfg);
}

moe_status moe_op_adamw_advance(moe_ctx *ctx, moe_tensor *step_dev, const moe_adamw_cfg *cfg) {
    static const char *op = "adamw_advance";
    if (!cfg) return moe_error(MOE_ERR_ARG, "%s: cfg is NULL, expected the step's clipping settings", op);
    if (!step_dev) return moe_error(MOE_ERR_ARG, "%s: step_dev is NULL, expected a tensor", op);
    MOE_TRY(adamw_scalar(op, "step_dev", step_dev, MOE_I64, step_dev, "its own"));
    MOE_TRY(adamw_clip_args(op, cfg, step_dev, "step_dev's"));
    MOE_TRY(ops_out(op, "step_dev", step_dev));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, step_dev->device, adamw_advance, be);
    return be->adamw_advance(ctx, step_dev, cfg);
}

/* hi bf16, lo i16 (when lo_optional, may be NULL) and the f32 values: contiguous, one device, one numel */
static moe_status master_args(const char *op, const moe_tensor *f32, const moe_tensor *hi, const moe_tensor *lo,
                              int lo_optional) {
    ops_arg a[] = {{"the f32 values", f32}, {"hi", hi}, {"lo", lo}};
    moe_dtype want[] = {MOE_F32, MOE_BF16, MOE_I16};
    for (int i = 0; i < 3; i++) {
        if (i == 2 && !lo && lo_optional) continue;
        MOE_TRY(ops_nonnull(op, a[i].name, a[i].t));
        if (a[i].t->dtype != want[i])
            return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected %s", op, a[i].name,
                             moe_dtype_name(a[i].t->dtype), moe_dtype_name(want[i]));
        if (!moe_device_eq(a[i].t->device, f32->device))
            return moe_error(MOE_ERR_DEVICE, "%s: %s is on another device than the f32 values", op, a[i].name);
        if (!moe_tensor_is_contiguous(a[i].t))
            return moe_error(MOE_ERR_ARG, "%s: %s must be contiguous, got a strided view", op, a[i].name);
        if (moe_tensor_numel(a[i].t) != moe_tensor_numel(f32))
            return moe_error(MOE_ERR_SHAPE, "%s: %s has %lld elements, expected %lld (the f32 values')", op, a[i].name,
                             (long long)moe_tensor_numel(a[i].t), (long long)moe_tensor_numel(f32));
    }
    return MOE_OK;
}

moe_status moe_op_master_split(moe_ctx *ctx, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src) {
    static const char *op = "master_split";
    MOE_TRY(master_args(op, src, hi, lo, 1));
    MOE_TRY(moe_tensor_ready(src));
    MOE_TRY(ops_out(op, "hi", hi));
    if (lo) MOE_TRY(ops_out(op, "lo", lo));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, src->device, master_split, be);
    if (moe_tensor_numel(src) == 0) return MOE_OK;
    return be->master_split(ctx, hi, lo, src);
}

moe_status moe_op_master_join(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo) {
    static const char *op = "master_join";
    MOE_TRY(master_args(op, dst, hi, lo, 0));
    MOE_TRY(moe_tensor_ready(hi));
    MOE_TRY(moe_tensor_ready(lo));
    MOE_TRY(ops_out(op, "dst", dst));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dst->device, master_join, be);
    if (moe_tensor_numel(dst) == 0) return MOE_OK;
    return be->master_join(ctx, dst, hi, lo);
}
