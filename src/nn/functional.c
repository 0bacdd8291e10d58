#include "functional.h"

#include <string.h>

moe_tensor *moe_new_last_dim(moe_ctx *ctx, const moe_tensor *t, int64_t n) {
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, t->shape, sizeof shape);
    if (t->ndim == 0) { moe_error(MOE_ERR_SHAPE, "expected at least one dim, got a 0-dim tensor"); return NULL; }
    shape[t->ndim - 1] = n;
    return moe_tensor_new(ctx, t->dtype, t->ndim, shape, t->device);
}

moe_tensor *moe_rows_view(moe_tensor *t) {
    int64_t d = t->ndim ? t->shape[t->ndim - 1] : 1;
    int64_t shape[2] = {d ? moe_tensor_numel(t) / d : 0, d};
    return moe_tensor_view(t, 2, shape);
}

/* ---- binary ---- */

static moe_status binary_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_binary_op op = (moe_binary_op)e->i[0];
    moe_tensor *a = e->in[0], *b = e->in[1], *g = gout[0];
    /* an add of two tensors of g's shape passes g itself to both: the tape sums
     * into a shared gradient out of place (tape.c), so no copy is needed (two
     * full copies of the residual stream's gradient per add, otherwise) */
    if (op == MOE_BIN_ADD && moe_tensor_same_shape(a, g) && moe_tensor_same_shape(b, g) && a->dtype == g->dtype &&
        b->dtype == g->dtype && moe_tensor_is_contiguous(g)) {
        moe_tensor_retain(g);
        moe_tensor_retain(g);
        gin[0] = g;
        gin[1] = g;
        return MOE_OK;
    }
    moe_tensor *ga = moe_tensor_like(ctx, a), *gb = moe_tensor_like(ctx, b), *tmp = NULL;
    moe_status s = ga && gb ? MOE_OK : moe_last_status();
    if (s == MOE_OK && (op == MOE_BIN_ADD || op == MOE_BIN_SUB)) {
        s = moe_op_sum_to(ctx, ga, g);
        if (s == MOE_OK) s = moe_op_sum_to(ctx, gb, g);
        if (s == MOE_OK && op == MOE_BIN_SUB) s = moe_op_unary(ctx, MOE_UN_NEG, gb, gb, 0);
    } else if (s == MOE_OK && (op == MOE_BIN_MUL || op == MOE_BIN_DIV)) {
        tmp = moe_tensor_like(ctx, g);
        if (!tmp) s = moe_last_status();
        if (op == MOE_BIN_MUL) {
            /* da = g*b, db = g*a */
            if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, tmp, g, b);
            if (s == MOE_OK) s = moe_op_sum_to(ctx, ga, tmp);
            if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, tmp, g, a);
            if (s == MOE_OK) s = moe_op_sum_to(ctx, gb, tmp);
        } else {
            /* da = g/b, db = -g*y/b with y = a/b (saved) */
            if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_DIV, tmp, g, b);
            if (s == MOE_OK) s = moe_op_sum_to(ctx, ga, tmp);
            if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, tmp, tmp, e->saved[0]);
            if (s == MOE_OK) s = moe_op_sum_to(ctx, gb, tmp);
            if (s == MOE_OK) s = moe_op_unary(ctx, MOE_UN_NEG, gb, gb, 0);
        }
    } else if (s == MOE_OK) {
        s = moe_error(MOE_ERR_ARG, "binary op %d has no backward", (int)op);
    }
    moe_tensor_release(tmp);
    if (s != MOE_OK) { moe_tensor_release(ga); moe_tensor_release(gb); return s; }
    gin[0] = ga;
    gin[1] = gb;
    return MOE_OK;
}

static const char *binary_name(moe_binary_op op) {
    switch (op) {
    case MOE_BIN_ADD: return "add";
    case MOE_BIN_SUB: return "sub";
    case MOE_BIN_MUL: return "mul";
    case MOE_BIN_DIV: return "div";
    case MOE_BIN_MAX: return "max";
    default: return "min";
    }
}

moe_status moe_f_binary(moe_ctx *ctx, moe_tape *tape, moe_binary_op op, moe_tensor *a, moe_tensor *b, moe_tensor **y) {
    *y = NULL;
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    if (!a || !b) return moe_error(MOE_ERR_ARG, "%s: operand is nil", binary_name(op));
    if (tape && op != MOE_BIN_ADD && op != MOE_BIN_SUB && op != MOE_BIN_MUL && op != MOE_BIN_DIV)
        return moe_error(MOE_ERR_ARG, "%s: not differentiable on a tape", binary_name(op));
    MOE_TRY(moe_broadcast_shape(a, b, &ndim, shape));
    moe_tensor *out = moe_tensor_new(ctx, a->dtype, ndim, shape, a->device);
    if (!out) return moe_last_status();
    moe_status s = moe_op_binary(ctx, op, out, a, b);
    if (s == MOE_OK && tape) {
        moe_tensor *in[2] = {a, b};
        moe_tape_entry *e = moe_tape_record(tape, binary_name(op), binary_backward, NULL, NULL, NULL, 2, in, 1, &out);
        if (!e) s = moe_last_status();
        else {
            e->i[0] = op;
            if (op == MOE_BIN_DIV) moe_tape_save(e, out);
        }
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

/* ---- unary ---- */

static moe_status unary_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *dx = moe_tensor_like(ctx, e->in[0]);
    if (!dx) return moe_last_status();
    moe_status s = moe_op_unary_backward(ctx, (moe_unary_op)e->i[0], dx, gout[0], e->in[0], (float)e->f[0]);
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_unary(moe_ctx *ctx, moe_tape *tape, moe_unary_op op, moe_tensor *x, float alpha, moe_tensor **y) {
    *y = NULL;
    if (!x) return moe_error(MOE_ERR_ARG, "unary: input is nil");
    moe_tensor *out = moe_tensor_new(ctx, x->dtype, x->ndim, x->shape, x->device);
    if (!out) return moe_last_status();
    moe_status s = moe_op_unary(ctx, op, out, x, alpha);
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, "unary", unary_backward, NULL, NULL, NULL, 1, &x, 1, &out);
        if (!e) s = moe_last_status();
        else { e->i[0] = op; e->f[0] = alpha; }
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

/* ---- swiglu ---- */

static moe_status swiglu_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *dg = moe_tensor_like(ctx, e->in[0]), *du = moe_tensor_like(ctx, e->in[1]);
    moe_status s = dg && du ? moe_op_swiglu_backward(ctx, dg, du, gout[0], e->in[0], e->in[1]) : moe_last_status();
    if (s != MOE_OK) { moe_tensor_release(dg); moe_tensor_release(du); return s; }
    gin[0] = dg;
    gin[1] = du;
    return MOE_OK;
}

moe_status moe_f_swiglu(moe_ctx *ctx, moe_tape *tape, moe_tensor *gate, moe_tensor *up, moe_tensor **y) {
    *y = NULL;
    if (!gate || !up) return moe_error(MOE_ERR_ARG, "swiglu: input is nil");
    moe_tensor *out = moe_tensor_like(ctx, gate);
    if (!out) return moe_last_status();
    moe_status s = moe_op_swiglu(ctx, out, gate, up);
    if (s == MOE_OK && tape) {
        moe_tensor *in[2] = {gate, up};
        if (!moe_tape_record(tape, "swiglu", swiglu_backward, NULL, NULL, NULL, 2, in, 1, &out)) s = moe_last_status();
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

/* ---- view ---- */

static moe_status view_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    if (!g) return moe_last_status();
    moe_tensor *dx = moe_tensor_view(g, e->in[0]->ndim, e->in[0]->shape);
    moe_tensor_release(g);
    if (!dx) return moe_last_status();
    /* a view of gout's memory: the tape sums into it in place only once nothing
     * else holds that memory (tape.c), so no copy */
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_view(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int ndim, const int64_t *shape, moe_tensor **y) {
    *y = NULL;
    if (!x) return moe_error(MOE_ERR_ARG, "view: input is nil");
    /* a strided input is copied first; the tape still links the result to x */
    moe_tensor *xc = moe_op_contiguous(ctx, x);
    if (!xc) return moe_last_status();
    moe_tensor *out = moe_tensor_view(xc, ndim, shape);
    moe_tensor_release(xc);
    if (!out) return moe_last_status();
    if (tape && !moe_tape_record(tape, "view", view_backward, NULL, NULL, NULL, 1, &x, 1, &out)) {
        moe_tensor_release(out);
        return moe_last_status();
    }
    *y = out;
    return MOE_OK;
}

/* ---- cross-entropy ---- */

/* The forward under a tape, where the backend fuses the pass, computed dlogits
 * for an upstream gradient of 1 (saved[3]): handed over once, scaled in place
 * when the upstream gradient is another number (gradient accumulation's
 * 1/steps); handing it over empties the slot, so a second backward recomputes
 * from the logits. */
moe_status moe_scalar_grad_value(moe_ctx *ctx, moe_tensor *g, float *dloss) {
    /* the upstream gradient of a scalar loss: one number, read once per backward
     * unless the host knows it (the seed of a backward is written by the host) */
    double known;
    if (moe_tensor_host_value(g, &known)) {
        *dloss = (float)known;
        return MOE_OK;
    }
    moe_tensor *h = moe_op_to(ctx, g, MOE_DEVICE_CPU, MOE_F32);
    if (!h) return moe_last_status();
    *dloss = moe_f32(h)[0];
    moe_tensor_release(h);
    return MOE_OK;
}

moe_status moe_ce_count(moe_ctx *ctx, moe_tensor *targets, int64_t vocab, int64_t ignore_index, double *count) {
    /* Targets known to lie in [0, bound) (uploaded from the host, tensor.h) all
     * count unless the ignored id is in that range; else they are counted on
     * the host (small, one id per token, but the read synchronises with the
     * device). */
    const int64_t n = moe_tensor_numel(targets);
    const int64_t tbound =
        targets->device.type != MOE_CPU && moe_tensor_index_trusted(targets, vocab) ? targets->index_bound : 0;
    if (tbound > 0 && (ignore_index < 0 || ignore_index >= tbound)) {
        *count = (double)n;
        return MOE_OK;
    }
    moe_tensor *tcpu = moe_op_to(ctx, targets, MOE_DEVICE_CPU, MOE_I64);
    if (!tcpu) return moe_last_status();
    const int64_t *tp = moe_tensor_data(tcpu);
    double c = 0;
    for (int64_t i = 0; i < n; i++) c += tp[i] != ignore_index;
    moe_tensor_release(tcpu);
    *count = c;
    return MOE_OK;
}

static moe_status ce_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *lse = e->saved[0], *logits = e->saved[1], *targets = e->saved[2];
    float dloss;
    MOE_TRY(moe_scalar_grad_value(ctx, gout[0], &dloss));
    if (e->i[1] && !(e->n_saved > 3 && e->saved[3]))
        return moe_error(MOE_ERR_STATE, "cross_entropy: the logits were overwritten by their gradient "
                                        "(overwrite_logits): one backward only");
    if (e->n_saved > 3 && e->saved[3]) {
        moe_tensor *pre = e->saved[3];
        e->saved[3] = NULL;
        moe_status s = dloss == 1.0f ? MOE_OK : moe_op_unary(ctx, MOE_UN_SCALE, pre, pre, dloss);
        if (s != MOE_OK) { moe_tensor_release(pre); return s; }
        gin[0] = pre;
        return MOE_OK;
    }
    moe_tensor *rows = moe_rows_view(logits);
    moe_tensor *dl = moe_tensor_like(ctx, logits);
    moe_tensor *drows = dl ? moe_rows_view(dl) : NULL;
    moe_tensor *t1 = NULL;
    int64_t n1[1] = {rows ? rows->shape[0] : 0};
    moe_status s = rows && drows ? MOE_OK : moe_last_status();
    if (s == MOE_OK) { t1 = moe_tensor_view(targets, 1, n1); if (!t1) s = moe_last_status(); }
    float count = (float)e->f[0];
    if (s == MOE_OK)
        s = moe_op_cross_entropy_backward(ctx, drows, rows, lse, t1, e->i[0], count > 0 ? dloss / count : 0.0f);
    moe_tensor_release(rows);
    moe_tensor_release(drows);
    moe_tensor_release(t1);
    if (s != MOE_OK) { moe_tensor_release(dl); return s; }
    gin[0] = dl;
    return MOE_OK;
}

moe_status moe_f_cross_entropy(moe_ctx *ctx, moe_tape *tape, moe_tensor *logits, moe_tensor *targets,
                               int64_t ignore_index, moe_tensor **loss) {
    return moe_f_cross_entropy_ex(ctx, tape, logits, targets, ignore_index, MOE_CE_GRAD_NEW, loss);
}

moe_status moe_f_cross_entropy_ex(moe_ctx *ctx, moe_tape *tape, moe_tensor *logits, moe_tensor *targets,
                                  int64_t ignore_index, int grad_in_forward, moe_tensor **loss) {
    *loss = NULL;
    if (!logits || !targets) return moe_error(MOE_ERR_ARG, "cross_entropy: logits or targets is nil");
    if (targets->dtype != MOE_I64)
        return moe_error(MOE_ERR_DTYPE, "cross_entropy: targets must be i64, got %s", moe_dtype_name(targets->dtype));
    if (logits->ndim < 1 || moe_tensor_numel(targets) * (logits->ndim ? logits->shape[logits->ndim - 1] : 1)
                                != moe_tensor_numel(logits) || targets->ndim != logits->ndim - 1) {
        char a[96], b[96];
        return moe_error(MOE_ERR_SHAPE, "cross_entropy: logits %s need targets of shape %s without the last dim, got %s",
                         moe_shape_str(logits, a, sizeof a), a, moe_shape_str(targets, b, sizeof b));
    }
    moe_tensor *lc = moe_op_contiguous(ctx, logits);
    if (!lc) return moe_last_status();
    moe_tensor *rows = moe_rows_view(lc);
    moe_tensor *tc = moe_op_contiguous(ctx, targets);
    const int64_t vocab = logits->shape[logits->ndim - 1];
    /* the number of counted rows, for the mean (read before the view below voids tc's bound, tensor.h) */
    double count = 0;
    moe_status s = tc ? moe_ce_count(ctx, tc, vocab, ignore_index, &count) : moe_last_status();
    int64_t n = rows ? rows->shape[0] : 0;
    int64_t n1[1] = {n};
    moe_tensor *t1 = tc ? moe_tensor_view(tc, 1, n1) : NULL;
    /* the loss and its per-row terms are f32 whatever the logits (bf16 under mixed precision) */
    moe_tensor *per_row = moe_tensor_new(ctx, MOE_F32, 1, n1, logits->device);
    moe_tensor *lse = moe_tensor_new(ctx, MOE_F32, 1, n1, logits->device);
    moe_tensor *out = moe_tensor_new(ctx, MOE_F32, 0, n1, logits->device);
    moe_tensor *dl = NULL, *drows = NULL;
    if (s == MOE_OK && !(rows && t1 && per_row && lse && out)) s = moe_last_status();
    /* Under a tape the gradient for an upstream 1 (the training loss) comes in
     * the same pass over the logits, with ce_backward's scale. */
    if (s == MOE_OK && tape && grad_in_forward != MOE_CE_GRAD_LATER && moe_op_cross_entropy_fuses(ctx, logits->device)) {
        /* over the logits: the fused kernel reads each row before it writes it */
        dl = grad_in_forward == MOE_CE_GRAD_OVER_LOGITS ? lc : moe_tensor_like(ctx, lc);
        if (dl == lc) moe_tensor_retain(dl);
        drows = dl ? moe_rows_view(dl) : NULL;
        if (!drows) s = moe_last_status();
        float cnt = (float)count;
        if (s == MOE_OK)
            s = moe_op_cross_entropy_fused(ctx, per_row, lse, drows, rows, t1, ignore_index, cnt > 0 ? 1.0f / cnt : 0.0f);
    } else if (s == MOE_OK) {
        s = moe_op_cross_entropy(ctx, per_row, lse, rows, t1, ignore_index);
    }
    if (s == MOE_OK) s = moe_op_reduce_all(ctx, MOE_RED_SUM, out, per_row);
    if (s == MOE_OK) s = moe_op_unary(ctx, MOE_UN_SCALE, out, out, count > 0 ? (float)(1.0 / count) : 0.0f);
    if (s == MOE_OK && tape) {
        moe_tensor *in[2] = {logits, targets};
        moe_tape_entry *e = moe_tape_record(tape, "cross_entropy", ce_backward, NULL, NULL, NULL, 2, in, 1, &out);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, lse);
            moe_tape_save(e, lc);   /* contiguous copies (or the inputs themselves) for backward */
            moe_tape_save(e, tc);
            moe_tape_save(e, dl);
            e->i[0] = ignore_index;
            e->i[1] = dl != NULL && dl == lc;   /* the logits hold the gradient now */
            e->f[0] = count;
        }
    }
    moe_tensor_release(rows); moe_tensor_release(t1); moe_tensor_release(per_row);
    moe_tensor_release(lse); moe_tensor_release(lc); moe_tensor_release(tc);
    moe_tensor_release(dl); moe_tensor_release(drows);
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *loss = out;
    return MOE_OK;
}

/* ---- sum / mean ---- */

static moe_status sum_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *x = e->in[0];
    moe_tensor *dx = moe_tensor_like(ctx, x);
    if (!dx) return moe_last_status();
    /* dx = broadcast(g) (/ n for the mean); g stays on its device, no host read */
    moe_status s = moe_op_fill(ctx, dx, 0.0);
    if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_ADD, dx, dx, gout[0]);
    if (s == MOE_OK && e->i[0]) s = moe_op_unary(ctx, MOE_UN_SCALE, dx, dx, (float)(1.0 / (double)e->i[1]));
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_sum(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int mean, moe_tensor **y) {
    *y = NULL;
    if (!x) return moe_error(MOE_ERR_ARG, "sum: input is nil");
    moe_tensor *out = moe_tensor_new(ctx, x->dtype, 0, NULL, x->device);
    if (!out) return moe_last_status();
    moe_status s = moe_op_reduce_all(ctx, mean ? MOE_RED_MEAN : MOE_RED_SUM, out, x);
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, mean ? "mean" : "sum", sum_backward, NULL, NULL, NULL, 1, &x, 1, &out);
        if (!e) s = moe_last_status();
        else { e->i[0] = mean; e->i[1] = moe_tensor_numel(x) ? moe_tensor_numel(x) : 1; }
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}
