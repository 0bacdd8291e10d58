/* ops_moe.c: the MoE token-movement ops (gather_sum, combine_backward):
 * argument checks, contiguous copies, dispatch. See ops.h. */
#include "ops_internal.h"

/* slots: i32 [rows, any k] on dev */
static moe_status check_slots(const char *op, const moe_tensor *slots, int64_t rows, moe_device dev) {
    MOE_TRY(ops_nonnull(op, "slots", slots));
    if (slots->dtype != MOE_I32)
        return moe_error(MOE_ERR_DTYPE, "%s: slots has dtype %s, expected i32", op, moe_dtype_name(slots->dtype));
    if (!moe_device_eq(slots->device, dev)) {
        char b1[16], b2[16];
        return moe_error(MOE_ERR_DEVICE, "%s: slots is on %s, expected %s (the device of y)", op,
                         moe_device_str(slots->device, b1, sizeof b1), moe_device_str(dev, b2, sizeof b2));
    }
    if (slots->ndim != 2 || slots->shape[0] != rows) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: slots has shape %s, expected [%lld, k] (one row per token of y)", op,
                         OPS_SHAPE(slots, s1), (long long)rows);
    }
    return MOE_OK;
}

static moe_status check_2d(const char *op, const char *name, const moe_tensor *t) {
    if (t->ndim != 2) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected 2 dims [rows, H]", op, name, OPS_SHAPE(t, s1));
    }
    return MOE_OK;
}

moe_status moe_op_gather_sum(moe_ctx *ctx, moe_tensor *y, const moe_tensor *src, const moe_tensor *w,
                             const moe_tensor *slots) {
    static const char *op = "gather_sum";
    ops_arg f[] = {{"y", y}, {"src", src}, {"w", w}};
    MOE_TRY(ops_check(op, f, w ? 3 : 2, NULL, 0));
    MOE_TRY(ops_out(op, "y", y));
    MOE_TRY(check_2d(op, "y", y));
    MOE_TRY(check_2d(op, "src", src));
    if (src->shape[1] != y->shape[1]) {
        char s1[128], s2[128];
        return moe_error(MOE_ERR_SHAPE, "%s: src has shape %s, expected [A, %lld] (the last dim of y %s)", op,
                         OPS_SHAPE(src, s1), (long long)y->shape[1], OPS_SHAPE(y, s2));
    }
    if (w) MOE_TRY(ops_shape_is(op, "w", w, 1, &src->shape[0], "one weight per row of src"));
    MOE_TRY(check_slots(op, slots, y->shape[0], y->device));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, y->device, gather_sum, be);
    if (moe_tensor_numel(y) == 0) return MOE_OK;
    moe_tensor *sc = NULL, *wc = NULL, *ic = NULL;
    moe_status s = ops_contig(ctx, src, &sc);
    if (s == MOE_OK) s = ops_contig(ctx, w, &wc);
    if (s == MOE_OK) s = ops_contig(ctx, slots, &ic);
    if (s == MOE_OK) s = be->gather_sum(ctx, y, sc, wc, ic);
    moe_tensor_release(sc);
    moe_tensor_release(wc);
    moe_tensor_release(ic);
    return s;
}

moe_status moe_op_combine_backward(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx) {
    static const char *op = "combine_backward";
    ops_arg f[] = {{"dsrc", dsrc}, {"dy", dy}, {"src", src}, {"w", w}, {"dw", dw}};
    ops_arg ix[] = {{"token_idx", token_idx}};
    MOE_TRY(ops_check(op, f, dw ? 5 : 4, ix, 1));
    MOE_TRY(ops_out(op, "dsrc", dsrc));
    if (dw) MOE_TRY(ops_out(op, "dw", dw));
    MOE_TRY(check_2d(op, "src", src));
    MOE_TRY(check_2d(op, "dy", dy));
    MOE_TRY(ops_same_shape(op, "dsrc", dsrc, "src", src));
    if (dy->shape[1] != src->shape[1]) {
        char s1[128], s2[128];
        return moe_error(MOE_ERR_SHAPE, "%s: dy has shape %s, expected [N, %lld] (the last dim of src %s)", op,
                         OPS_SHAPE(dy, s1), (long long)src->shape[1], OPS_SHAPE(src, s2));
    }
    const int64_t a = src->shape[0];
    MOE_TRY(ops_shape_is(op, "w", w, 1, &a, "one weight per row of src"));
    if (dw) MOE_TRY(ops_shape_is(op, "dw", dw, 1, &a, "one weight per row of src"));
    MOE_TRY(ops_shape_is(op, "token_idx", token_idx, 1, &a, "one token per row of src"));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dsrc->device, combine_backward, be);
    if (a == 0) return MOE_OK;
    const moe_tensor *in[] = {dy, src, w, token_idx};
    moe_tensor *c[4] = {NULL, NULL, NULL, NULL};
    moe_status s = MOE_OK;
    for (int i = 0; i < 4 && s == MOE_OK; i++) s = ops_contig(ctx, in[i], &c[i]);
    if (s == MOE_OK) s = be->combine_backward(ctx, dsrc, dw, c[0], c[1], c[2], c[3]);
    for (int i = 0; i < 4; i++) moe_tensor_release(c[i]);
    return s;
}
