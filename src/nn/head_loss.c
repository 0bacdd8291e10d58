/* The language-model head and its cross-entropy in chunks of rows
 * (functional.h, moe_f_linear_cross_entropy). The logits of a whole batch
 * are the largest tensor a training step makes (8192 tokens x 50304 in bf16:
 * 824 MB, held from the forward to the backward even when their gradient is
 * written over them). Here a chunk's logits live only while its loss and
 * gradient are taken: the gradient goes at once into dx (N x D) and the
 * head's weight gradient (V x D), the products the head's backward would make
 * from the whole dlogits later, with the same FLOPs. */
#include "functional.h"

#include <math.h>

/* saved: dx, dW (NULL for a frozen weight or one written in the forward),
 * wgrad; e->i[0]: consumed; e->f[0]: the upstream gradient promised (0: none) */
static moe_status head_loss_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *dx = e->saved[0], *dw = e->saved[1], *wgrad = e->saved[2];
    if (e->i[0])
        return moe_error(MOE_ERR_STATE, "linear_cross_entropy: its gradients were taken in the forward and handed "
                                        "over by the first backward: one backward only");
    float dloss;
    MOE_TRY(moe_scalar_grad_value(ctx, gout[0], &dloss));
    const float promised = (float)e->f[0];
    if (promised > 0 && dloss != promised)
        return moe_error(MOE_ERR_STATE, "linear_cross_entropy: its gradients were taken for an upstream gradient of "
                                        "%g (upstream_grad, the trainer's loss_grad), but the backward brings %g",
                         (double)promised, (double)dloss);
    e->i[0] = 1;
    if (promised > 0) dloss = 1.0f;   /* taken scaled already, dW added in the forward */
    if (dw && wgrad) MOE_TRY(moe_op_axpy(ctx, wgrad, dloss, dw));
    moe_tensor *acc = moe_tape_grad_acc(e, 0);
    if (acc) return moe_op_axpy(ctx, acc, dloss, dx);   /* x already has a gradient: add to it */
    if (dloss != 1.0f) MOE_TRY(moe_op_unary(ctx, MOE_UN_SCALE, dx, dx, dloss));
    e->saved[0] = NULL;   /* handed over */
    gin[0] = dx;
    return MOE_OK;
}

static moe_status check_args(moe_tensor *x, moe_tensor *w, moe_tensor *wgrad, moe_tensor *targets) {
    const char *f = "linear_cross_entropy";
    if (!x || !w || !targets) return moe_error(MOE_ERR_ARG, "%s: x, w or targets is nil", f);
    if (targets->dtype != MOE_I64)
        return moe_error(MOE_ERR_DTYPE, "%s: targets must be i64, got %s", f, moe_dtype_name(targets->dtype));
    char a[96], b[96];
    if (w->ndim != 2 || w->shape[0] < 1 || x->ndim < 1 || x->shape[x->ndim - 1] != w->shape[1])
        return moe_error(MOE_ERR_SHAPE, "%s: x %s and w %s, expected x [..., D] and w [V, D] with V >= 1", f,
                         moe_shape_str(x, a, sizeof a), moe_shape_str(w, b, sizeof b));
    if (moe_tensor_numel(targets) * w->shape[1] != moe_tensor_numel(x))
        return moe_error(MOE_ERR_SHAPE, "%s: x %s has %lld rows but targets %s has %lld", f,
                         moe_shape_str(x, a, sizeof a), (long long)(moe_tensor_numel(x) / w->shape[1]),
                         moe_shape_str(targets, b, sizeof b), (long long)moe_tensor_numel(targets));
    if (x->dtype != w->dtype)
        return moe_error(MOE_ERR_DTYPE, "%s: x is %s but w is %s", f, moe_dtype_name(x->dtype), moe_dtype_name(w->dtype));
    if (wgrad && (!moe_tensor_same_shape(wgrad, w) || wgrad->dtype != w->dtype))
        return moe_error(MOE_ERR_SHAPE, "%s: wgrad must be w's shape and dtype", f);
    return MOE_OK;
}

moe_status moe_f_linear_cross_entropy(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                                      moe_tensor *targets, const moe_head_loss_opts *o, moe_tensor **loss) {
    *loss = NULL;
    if (!o) return moe_error(MOE_ERR_ARG, "linear_cross_entropy: no options");
    MOE_TRY(check_args(x, w, wgrad, targets));
    if (!(o->upstream_grad >= 0) || isinf(o->upstream_grad))
        return moe_error(MOE_ERR_ARG, "linear_cross_entropy: upstream_grad must be finite and >= 0 (0: none), got %g",
                         (double)o->upstream_grad);
    const int64_t ignore_index = o->ignore_index;
    int64_t chunk_rows = o->chunk_rows;
    const int64_t V = w->shape[0], N = moe_tensor_numel(targets);
    const size_t es = moe_dtype_size(x->dtype);
    if (chunk_rows <= 0) {   /* the fewest chunks of at most 256 MB of logits, as even as that allows */
        int64_t per = (int64_t)(((size_t)256 << 20) / ((size_t)V * es));
        if (per < 1) per = 1;
        int64_t chunks = N > 0 ? (N + per - 1) / per : 1;
        chunk_rows = (N + chunks - 1) / chunks;
        if (chunk_rows < 1) chunk_rows = 1;
    }
    const int grads = tape != NULL;
    /* dW straight into wgrad during the forward (see functional.h) */
    const float upstream = grads ? o->upstream_grad : 0.0f;
    const int direct = upstream > 0 && wgrad && N > 0;
    const int fuses = moe_op_cross_entropy_fuses(ctx, x->device);
    moe_tensor *xc = moe_op_contiguous(ctx, x);
    moe_tensor *tc = moe_op_contiguous(ctx, targets);
    double count = 0;
    moe_status s = xc && tc ? moe_ce_count(ctx, tc, V, ignore_index, &count) : moe_last_status();
    int64_t n1[1] = {N}, cshape[2] = {chunk_rows < N ? chunk_rows : N, V};
    moe_tensor *t1 = s == MOE_OK ? moe_tensor_view(tc, 1, n1) : NULL;
    moe_tensor *per_row = moe_tensor_new(ctx, MOE_F32, 1, n1, x->device);
    moe_tensor *lse = moe_tensor_new(ctx, MOE_F32, 1, n1, x->device);
    moe_tensor *out = moe_tensor_new(ctx, MOE_F32, 0, n1, x->device);
    /* one chunk's logits (their gradient over them where the backend fuses, else beside them) */
    moe_tensor *lg = N > 0 ? moe_tensor_new(ctx, x->dtype, 2, cshape, x->device) : NULL;
    moe_tensor *dlg = grads && !fuses && N > 0 ? moe_tensor_new(ctx, x->dtype, 2, cshape, x->device) : NULL;
    moe_tensor *dx = grads ? moe_tensor_new(ctx, x->dtype, x->ndim, x->shape, x->device) : NULL;   /* x's shape */
    moe_tensor *dw = grads && wgrad && !direct ? moe_tensor_new(ctx, w->dtype, 2, w->shape, w->device) : NULL;
    moe_tensor *xrows = xc ? moe_rows_view(xc) : NULL, *dxrows = dx ? moe_rows_view(dx) : NULL;
    if (s == MOE_OK && !(t1 && per_row && lse && out && xrows && (lg || N == 0) && (dlg || !grads || fuses || N == 0) &&
                         (dxrows || !grads) && (dw || !grads || !wgrad || direct)))
        s = moe_last_status();
    if (s == MOE_OK && dw && N == 0) s = moe_op_fill(ctx, dw, 0.0);
    const float scale = count > 0 ? (float)(1.0 / count) : 0.0f;
    /* the gradient's scale: the promised upstream gradient folded in */
    const float gscale = upstream > 0 ? (float)((double)upstream / count) : scale;
    /* the first chunk overwrites a pending-zero wgrad */
    const float beta0 = direct && o->wgrad_pending && *o->wgrad_pending ? 0.0f : 1.0f;
    for (int64_t r0 = 0; r0 < N && s == MOE_OK; r0 += chunk_rows) {
        const int64_t n = N - r0 < chunk_rows ? N - r0 : chunk_rows;
        moe_tensor *xr = moe_tensor_narrow(xrows, 0, r0, n), *lr = moe_tensor_narrow(lg, 0, 0, n);
        moe_tensor *tr = moe_tensor_narrow(t1, 0, r0, n), *pr = moe_tensor_narrow(per_row, 0, r0, n);
        moe_tensor *sr = moe_tensor_narrow(lse, 0, r0, n);
        moe_tensor *dr = grads ? (fuses ? lr : moe_tensor_narrow(dlg, 0, 0, n)) : NULL;
        if (dr == lr) moe_tensor_retain(dr);
        moe_tensor *dxr = grads ? moe_tensor_narrow(dxrows, 0, r0, n) : NULL;
        if (!xr || !lr || !tr || !pr || !sr || (grads && (!dr || !dxr))) s = moe_last_status();
        if (s == MOE_OK) s = moe_op_gemm(ctx, 0, 1, 1.0f, xr, w, 0.0f, lr);   /* logits = x w^T */
        if (s == MOE_OK && grads) {
            s = moe_op_cross_entropy_fused(ctx, pr, sr, dr, lr, tr, ignore_index, count > 0 ? gscale : 0.0f);
            if (s == MOE_OK) s = moe_op_gemm(ctx, 0, 0, 1.0f, dr, w, 0.0f, dxr);   /* dx = dlogits w */
            if (s == MOE_OK && dw) s = moe_op_gemm(ctx, 1, 0, 1.0f, dr, xr, r0 > 0 ? 1.0f : 0.0f, dw);
            if (s == MOE_OK && direct) s = moe_op_gemm(ctx, 1, 0, 1.0f, dr, xr, r0 > 0 ? 1.0f : beta0, wgrad);
        } else if (s == MOE_OK) {
            s = moe_op_cross_entropy(ctx, pr, sr, lr, tr, ignore_index);
        }
        moe_tensor_release(xr); moe_tensor_release(lr); moe_tensor_release(tr); moe_tensor_release(pr);
        moe_tensor_release(sr); moe_tensor_release(dr); moe_tensor_release(dxr);
    }
    moe_tensor_release(lg);
    moe_tensor_release(dlg);
    moe_tensor_release(xrows);
    moe_tensor_release(dxrows);
    if (s == MOE_OK) s = moe_op_reduce_all(ctx, MOE_RED_SUM, out, per_row);
    if (s == MOE_OK) s = moe_op_unary(ctx, MOE_UN_SCALE, out, out, scale);
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, "linear_cross_entropy", head_loss_backward, NULL, NULL, NULL, 1, &x,
                                            1, &out);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, dx);
            moe_tape_save(e, dw);
            moe_tape_save(e, wgrad);
            e->i[0] = 0;
            e->f[0] = upstream;
        }
    }
    moe_tensor_release(xc); moe_tensor_release(tc); moe_tensor_release(t1); moe_tensor_release(per_row);
    moe_tensor_release(lse); moe_tensor_release(dx); moe_tensor_release(dw);
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    if (direct && o->wgrad_pending) *o->wgrad_pending = 0;   /* written: its memory holds dW now */
    *loss = out;
    return MOE_OK;
}
