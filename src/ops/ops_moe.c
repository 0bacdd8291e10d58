/* ops_moe.c: the MoE token-movement ops (gather_sum, combine_backward) and
 * the expert-parallel routing maps (ep_token_slots, slot_tokens, ep_pack,
 * ep_unpack, ep_regroup):
 * argument checks, contiguous copies, dispatch. See ops.h. */
#include "ops_internal.h"

#include <stdlib.h>
#include <string.h>

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

/* contiguous copies of up to 4 inputs (NULL allowed); release with contig_release */
typedef struct { moe_tensor *c[4]; } contig4;
static moe_status contig_all(moe_ctx *ctx, contig4 *k, const moe_tensor *a, const moe_tensor *b, const moe_tensor *c,
                             const moe_tensor *d) {
    const moe_tensor *in[4] = {a, b, c, d};
    moe_status s = MOE_OK;
    for (int i = 0; i < 4; i++) k->c[i] = NULL;
    for (int i = 0; i < 4 && s == MOE_OK; i++) s = ops_contig(ctx, in[i], &k->c[i]);
    return s;
}
static void contig_release(contig4 *k) {
    for (int i = 0; i < 4; i++) moe_tensor_release(k->c[i]);
}

moe_status moe_op_gather_sum(moe_ctx *ctx, moe_tensor *y, const moe_tensor *src, const moe_tensor *w,
                             const moe_tensor *slots) {
    return moe_op_gather_sum_add(ctx, y, NULL, src, w, slots);
}

moe_status moe_op_gather_sum_add(moe_ctx *ctx, moe_tensor *y, const moe_tensor *base, const moe_tensor *src,
                                 const moe_tensor *w, const moe_tensor *slots) {
    const char *op = base ? "gather_sum_add" : "gather_sum";
    ops_arg f[] = {{"y", y}, {"src", src}, {"w", w}, {"base", base}};
    int nf = 2;
    if (w) nf = 3;
    if (base) { f[nf] = f[3]; nf++; }
    MOE_TRY(ops_check(op, f, nf, NULL, 0));
    if (base) MOE_TRY(ops_same_shape(op, "base", base, "y", y));
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
    contig4 k;
    moe_status s = contig_all(ctx, &k, src, w, slots, base);
    if (s == MOE_OK) s = be->gather_sum(ctx, y, k.c[3], k.c[0], k.c[1], k.c[2]);
    contig_release(&k);
    return s;
}

moe_status moe_op_combine_backward(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx) {
    return moe_op_combine_backward_slots(ctx, dsrc, dw, dy, src, w, token_idx, NULL);
}

moe_status moe_op_combine_backward_slots(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                         const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                         const moe_tensor *slots) {
    const char *op = slots ? "combine_backward_slots" : "combine_backward";
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
    if (slots) MOE_TRY(check_slots(op, slots, dy->shape[0], dsrc->device));
    const moe_backend *be;
    OPS_ENTRY(ctx, op, dsrc->device, combine_backward, be);
    if (a == 0) return MOE_OK;
    contig4 k;
    moe_tensor *sc = NULL;
    moe_status s = contig_all(ctx, &k, dy, src, w, token_idx);
    if (s == MOE_OK && slots) s = ops_contig(ctx, slots, &sc);
    if (s == MOE_OK) s = be->combine_backward(ctx, dsrc, dw, k.c[0], k.c[1], k.c[2], k.c[3], sc);
    moe_tensor_release(sc);
    contig_release(&k);
    return s;
}

moe_status moe_op_index_select_slots(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index,
                                     const moe_tensor *slots) {
    static const char *op = "index_select_slots";
    if (slots && x && out && index) {
        ops_arg f[] = {{"out", out}, {"x", x}}, ix[] = {{"index", index}};
        MOE_TRY(ops_check(op, f, 2, ix, 1));
        MOE_TRY(ops_out(op, "out", out));
        MOE_TRY(check_2d(op, "x", x));
        MOE_TRY(check_slots(op, slots, x->shape[0], out->device));
        const moe_backend *be;
        MOE_TRY(ops_backend(ctx, op, out->device, &be));
        if (be->index_select_slots && out->ndim == 2 && out->shape[0] == index->shape[0] && out->shape[1] == x->shape[1] &&
            index->ndim == 1 && moe_tensor_numel(out) > 0) {
            moe_tensor *xc = NULL, *sc = NULL;
            int served = 0;
            moe_status s = ops_contig(ctx, x, &xc);
            if (s == MOE_OK) s = ops_contig(ctx, slots, &sc);
            if (s == MOE_OK) s = be->index_select_slots(ctx, out, xc, sc, &served);
            moe_tensor_release(xc);
            moe_tensor_release(sc);
            if (s != MOE_OK || served) return s;
        }
    }
    return moe_op_index_select(ctx, out, x, index);
}

/* ---- expert-parallel routing maps ---- */

/* i32 slots [rows, any] on dev (rows < 0: any) */
static moe_status check_i32_2d(const char *op, const char *name, const moe_tensor *t, int64_t rows, moe_device dev) {
    MOE_TRY(ops_nonnull(op, name, t));
    if (t->dtype != MOE_I32)
        return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected i32", op, name, moe_dtype_name(t->dtype));
    if (!moe_device_eq(t->device, dev)) {
        char b1[16], b2[16];
        return moe_error(MOE_ERR_DEVICE, "%s: %s is on %s, expected %s", op, name,
                         moe_device_str(t->device, b1, sizeof b1), moe_device_str(dev, b2, sizeof b2));
    }
    if (t->ndim != 2 || (rows >= 0 && t->shape[0] != rows)) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected 2 dims [%lld, ...]", op, name, OPS_SHAPE(t, s1),
                         (long long)rows);
    }
    return MOE_OK;
}

static moe_status check_ranks(const char *op, int64_t p) {
    if (p < 1 || p > MOE_EP_MAX_RANKS)
        return moe_error(MOE_ERR_ARG, "%s: %lld ranks, expected 1 to %d", op, (long long)p, MOE_EP_MAX_RANKS);
    return MOE_OK;
}

moe_status moe_op_ep_token_slots(moe_ctx *ctx, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                                 const moe_tensor *expert_idx, int64_t group_size) {
    static const char *op = "ep_token_slots";
    ops_arg ix[] = {{"expert_idx", expert_idx}};
    MOE_TRY(ops_check(op, NULL, 0, ix, 1));
    MOE_TRY(check_i32_2d(op, "slots", slots, -1, expert_idx->device));
    MOE_TRY(check_i32_2d(op, "tslots", tslots, slots->shape[0], expert_idx->device));
    MOE_TRY(ops_out(op, "tslots", tslots));
    MOE_TRY(check_ranks(op, tslots->shape[1]));
    const int64_t p = tslots->shape[1];
    if (!counts || counts->dtype != MOE_I64 || counts->ndim != 1 || counts->shape[0] != p ||
        !moe_device_eq(counts->device, tslots->device) || !moe_tensor_is_contiguous(counts)) {
        char s1[128];
        return moe_error(MOE_ERR_ARG, "%s: counts is %s, expected a contiguous i64 [%lld] on the device of tslots", op,
                         counts ? OPS_SHAPE(counts, s1) : "NULL", (long long)p);
    }
    MOE_TRY(ops_out(op, "counts", counts));
    if (expert_idx->ndim != 1) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: expert_idx has shape %s, expected [A]", op, OPS_SHAPE(expert_idx, s1));
    }
    if (group_size < 1) return moe_error(MOE_ERR_ARG, "%s: group_size %lld, expected >= 1", op, (long long)group_size);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, tslots->device, ep_token_slots, be);
    if (moe_tensor_numel(tslots) == 0) return moe_op_fill(ctx, counts, 0.0);
    contig4 k;
    moe_status s = contig_all(ctx, &k, slots, expert_idx, NULL, NULL);
    if (s == MOE_OK) s = be->ep_token_slots(ctx, tslots, counts, k.c[0], k.c[1], group_size);
    contig_release(&k);
    int64_t rows = tslots->shape[0] * p;
    if (s == MOE_OK && counts->device.type == MOE_CPU) {
        const int64_t *c = moe_tensor_data(counts);
        rows = 0;
        for (int64_t d = 0; d < p; d++) rows += c[d];
    }
    if (s == MOE_OK) moe_tensor_set_index_bound(tslots, rows);   /* slots in [-1, rows) */
    return s;
}

moe_status moe_op_slot_tokens(moe_ctx *ctx, moe_tensor *token_idx, const moe_tensor *slots) {
    static const char *op = "slot_tokens";
    ops_arg ix[] = {{"token_idx", token_idx}};
    MOE_TRY(ops_check(op, NULL, 0, ix, 1));
    MOE_TRY(check_i32_2d(op, "slots", slots, -1, token_idx->device));
    MOE_TRY(ops_out(op, "token_idx", token_idx));
    if (token_idx->ndim != 1) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: token_idx has shape %s, expected [S]", op, OPS_SHAPE(token_idx, s1));
    }
    const moe_backend *be;
    OPS_ENTRY(ctx, op, token_idx->device, slot_tokens, be);
    if (token_idx->shape[0] == 0) return MOE_OK;
    contig4 k;
    moe_status s = contig_all(ctx, &k, slots, NULL, NULL, NULL);
    if (s == MOE_OK) s = be->slot_tokens(ctx, token_idx, k.c[0]);
    contig_release(&k);
    if (s == MOE_OK) moe_tensor_set_index_bound(token_idx, slots->shape[0]);
    return s;
}

moe_status moe_op_ep_pack(moe_ctx *ctx, moe_tensor *packed, const moe_tensor *token_idx,
                          const moe_tensor *expert_idx, const moe_tensor *slots, const moe_tensor *tslots,
                          int64_t group_size, int64_t width, const int64_t *adjust) {
    static const char *op = "ep_pack";
    ops_arg ix[] = {{"packed", packed}, {"token_idx", token_idx}, {"expert_idx", expert_idx}};
    MOE_TRY(ops_check(op, NULL, 0, ix, 3));
    if (!adjust) return moe_error(MOE_ERR_ARG, "%s: adjust is NULL, expected a host array (one per rank)", op);
    MOE_TRY(ops_out(op, "packed", packed));
    MOE_TRY(check_i32_2d(op, "slots", slots, -1, packed->device));
    MOE_TRY(check_i32_2d(op, "tslots", tslots, slots->shape[0], packed->device));
    MOE_TRY(check_ranks(op, tslots->shape[1]));
    const int64_t a = packed->ndim == 1 ? packed->shape[0] : -1;
    if (a < 0) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: packed has shape %s, expected [A]", op, OPS_SHAPE(packed, s1));
    }
    MOE_TRY(ops_shape_is(op, "token_idx", token_idx, 1, &a, "one per assignment"));
    MOE_TRY(ops_shape_is(op, "expert_idx", expert_idx, 1, &a, "one per assignment"));
    int64_t k = slots->shape[1], need = k < group_size ? k : group_size;
    if (group_size < 1 || width < need)
        return moe_error(MOE_ERR_ARG, "%s: group_size %lld and width %lld, expected group_size >= 1 and width >= %lld "
                         "(a token's choices in one group)", op, (long long)group_size, (long long)width, (long long)need);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, packed->device, ep_pack, be);
    if (a == 0) return MOE_OK;
    contig4 c;
    moe_status s = contig_all(ctx, &c, token_idx, expert_idx, slots, tslots);
    if (s == MOE_OK) s = be->ep_pack(ctx, packed, c.c[0], c.c[1], c.c[2], c.c[3], group_size, width, adjust);
    contig_release(&c);
    return s;
}

moe_status moe_op_ep_unpack(moe_ctx *ctx, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                            const moe_tensor *perm) {
    static const char *op = "ep_unpack";
    ops_arg ix[] = {{"token_idx", token_idx}, {"packed", packed}, {"perm", perm}};
    MOE_TRY(ops_check(op, NULL, 0, ix, perm ? 3 : 2));
    MOE_TRY(ops_out(op, "token_idx", token_idx));
    MOE_TRY(ops_out(op, "slots", slots));
    MOE_TRY(check_i32_2d(op, "slots", slots, -1, token_idx->device));
    const int64_t r = token_idx->ndim == 1 ? token_idx->shape[0] : -1;
    if (r < 0) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: token_idx has shape %s, expected [R]", op, OPS_SHAPE(token_idx, s1));
    }
    MOE_TRY(ops_shape_is(op, "packed", packed, 1, &r, "one per row of token_idx"));
    if (perm) MOE_TRY(ops_shape_is(op, "perm", perm, 1, &r, "one per row of token_idx"));
    if (slots->shape[1] < 1) return moe_error(MOE_ERR_SHAPE, "%s: slots has width 0, expected >= 1", op);
    const moe_backend *be;
    OPS_ENTRY(ctx, op, token_idx->device, ep_unpack, be);
    contig4 c;
    moe_status s = contig_all(ctx, &c, packed, perm, NULL, NULL);
    if (s == MOE_OK) s = be->ep_unpack(ctx, token_idx, slots, c.c[0], c.c[1]);
    contig_release(&c);
    if (s == MOE_OK) {
        moe_tensor_set_index_bound(token_idx, slots->shape[0]);
        moe_tensor_set_index_bound(slots, r);
    }
    return s;
}

moe_status moe_op_ep_regroup(moe_ctx *ctx, moe_tensor *perm, moe_tensor *inv, const int64_t *counts, int64_t ranks,
                             int64_t experts) {
    static const char *op = "ep_regroup";
    ops_arg ix[] = {{"perm", perm}, {"inv", inv}};
    MOE_TRY(ops_check(op, NULL, 0, ix, inv ? 2 : 1));
    if (!counts) return moe_error(MOE_ERR_ARG, "%s: counts is NULL, expected a host array of ranks * experts", op);
    MOE_TRY(ops_out(op, "perm", perm));
    if (inv) MOE_TRY(ops_out(op, "inv", inv));
    const int64_t r = perm->ndim == 1 ? perm->shape[0] : -1;
    if (r < 0) {
        char s1[128];
        return moe_error(MOE_ERR_SHAPE, "%s: perm has shape %s, expected [R]", op, OPS_SHAPE(perm, s1));
    }
    if (inv) MOE_TRY(ops_shape_is(op, "inv", inv, 1, &r, "the shape of perm"));
    if (ranks < 1 || experts < 1)
        return moe_error(MOE_ERR_ARG, "%s: %lld ranks x %lld experts, expected at least 1 of each", op, (long long)ranks,
                         (long long)experts);
    const int64_t nb = ranks * experts;
    int64_t *starts = malloc((size_t)(2 * nb + 1) * sizeof *starts);
    if (!starts) return moe_error(MOE_ERR_OOM, "%s: out of host memory", op);
    int64_t *g = starts, *v = starts + nb + 1, acc = 0;
    for (int64_t i = 0; i < nb; i++) {
        if (counts[i] < 0) {
            free(starts);
            return moe_error(MOE_ERR_ARG, "%s: count %lld at position %lld is negative", op, (long long)counts[i],
                             (long long)i);
        }
        v[i] = acc;   /* received order: the position of (src, j) = i itself */
        acc += counts[i];
    }
    if (acc != r) {
        free(starts);
        return moe_error(MOE_ERR_SHAPE, "%s: the counts sum to %lld rows, perm has %lld", op, (long long)acc, (long long)r);
    }
    /* regrouped order: block b = j * ranks + src; v re-indexed to it */
    int64_t *vr = malloc((size_t)nb * sizeof *vr);
    if (!vr) { free(starts); return moe_error(MOE_ERR_OOM, "%s: out of host memory", op); }
    acc = 0;
    for (int64_t j = 0; j < experts; j++)
        for (int64_t src = 0; src < ranks; src++) {
            int64_t b = j * ranks + src, i = src * experts + j;
            g[b] = acc;
            vr[b] = v[i];
            acc += counts[i];
        }
    g[nb] = acc;
    memcpy(v, vr, (size_t)nb * sizeof *vr);
    free(vr);
    const moe_backend *be;
    moe_status s = ops_backend(ctx, op, perm->device, &be);
    if (s == MOE_OK && !be->ep_regroup) s = ops_unsupported(op, be);
    if (s == MOE_OK && r > 0) s = be->ep_regroup(ctx, perm, inv, starts, nb);
    free(starts);
    if (s == MOE_OK) {
        moe_tensor_set_index_bound(perm, r);
        if (inv) moe_tensor_set_index_bound(inv, r);
    }
    return s;
}
