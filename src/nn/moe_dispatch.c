/* Moving tokens to experts and back, as taped operations:
 *   dispatch: xp[a] = x[token[a]]
 *   combine:  y[t]  = sum over a with token[a] = t of w[a] * yp[a]
 * plus row slicing and concatenation, used when experts are arbitrary layers.
 *
 * Two ways to move rows back to tokens:
 * - with the router's slot map (slots [N, k], router.h): combine is
 *   gather_sum(yp, w, slots), its backward one combine_backward op, and the
 *   dispatch backward gather_sum(dxp, slots): one pass each, every output
 *   row written once;
 * - without one (expert choice; MOELAB_MOE_GATHER=0): combine scales yp by w
 *   and index_adds it into y, its backward is index_select + two products +
 *   a row sum, and the dispatch backward an index_add.
 * Under expert parallelism yp comes back in xp's order (moe_ep.c), so the
 * slot map holds there too. */
#include "moe_dispatch.h"
#include "functional.h"

#include <stdlib.h>
#include <string.h>

int moe_dispatch_slots_usable(const moe_tensor *slots, int64_t n_tokens) {
    if (!slots || slots->ndim != 2 || slots->shape[0] != n_tokens || slots->dtype != MOE_I32) return 0;
    const char *env = getenv("MOELAB_MOE_GATHER");
    return !(env && env[0] == '0' && env[1] == 0);
}

/* slots if the gather path may use them for n_tokens tokens, else NULL */
static moe_tensor *usable_slots(moe_tensor *slots, int64_t n_tokens) {
    return moe_dispatch_slots_usable(slots, n_tokens) ? slots : NULL;
}

static moe_status dispatch_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *dx = moe_tensor_like(ctx, e->in[0]);
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_status s = dx && g ? MOE_OK : moe_last_status();
    if (s == MOE_OK && e->n_saved > 1) {
        s = moe_op_gather_sum(ctx, dx, g, NULL, e->saved[1]);   /* dx[t] = sum of its kept rows of g */
    } else if (s == MOE_OK) {
        s = moe_op_fill(ctx, dx, 0.0);
        if (s == MOE_OK) s = moe_op_index_add(ctx, dx, e->saved[0], g);
    }
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_dispatch(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *token_idx, moe_tensor *slots,
                          moe_tensor **xp) {
    *xp = NULL;
    int64_t shape[2] = {token_idx->shape[0], x->shape[1]};
    moe_tensor *out = moe_tensor_new(ctx, x->dtype, 2, shape, x->device);
    if (!out) return moe_last_status();
    moe_tensor *sl = usable_slots(slots, x->ndim == 2 ? x->shape[0] : -1);
    moe_status s = moe_op_index_select_slots(ctx, out, x, token_idx, sl);   /* by token where the device can */
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, "dispatch", dispatch_backward, NULL, NULL, NULL, 1, &x, 1, &out);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, token_idx);
            if (sl) moe_tape_save(e, sl);
        }
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *xp = out;
    return MOE_OK;
}

/* w [A] as a column [A, 1] view for broadcasting against [A, H] */
static moe_tensor *column(moe_tensor *w) {
    int64_t shape[2] = {w->shape[0], 1};
    return moe_tensor_view(w, 2, shape);
}

/* the gather path's backward: dyp[a] = w[a] * dy[token[a]], dw[a] = dy[token[a]] . yp[a], one op
 * (given the slots too, which let a device read each row of dy once) */
static moe_status combine_backward_fused(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *yp = e->in[0], *w = e->in[1], *idx = e->saved[0], *sl = e->saved[1];
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *dyp = moe_tensor_like(ctx, yp), *dw = moe_tensor_like(ctx, w);
    moe_status s = g && dyp && dw ? moe_op_combine_backward_slots(ctx, dyp, dw, g, yp, w, idx, sl) : moe_last_status();
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dyp); moe_tensor_release(dw); return s; }
    gin[0] = dyp;
    gin[1] = dw;
    return MOE_OK;
}

static moe_status combine_backward_rows(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin);

/* With a residual (a third input, added in the combine's pass), its gradient
 * is the output's, handed over as it is (like an add's). */
static moe_status combine_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_status s = e->i[0] ? combine_backward_fused(ctx, e, gout, gin) : combine_backward_rows(ctx, e, gout, gin);
    if (s == MOE_OK && e->n_in > 2) {
        moe_tensor_retain(gout[0]);
        gin[2] = gout[0];
    }
    return s;
}

static moe_status combine_backward_rows(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *yp = e->in[0], *w = e->in[1], *idx = e->saved[0];
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *gsel = moe_tensor_like(ctx, yp);       /* dy[token[a]] */
    moe_tensor *dyp = moe_tensor_like(ctx, yp), *prod = moe_tensor_like(ctx, yp);
    moe_tensor *dw = moe_tensor_like(ctx, w);
    moe_tensor *wc = column(w);
    moe_status s = g && gsel && dyp && prod && dw && wc ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_index_select(ctx, gsel, g, idx);
    if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, dyp, gsel, wc);
    if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, prod, gsel, yp);
    if (s == MOE_OK) s = moe_op_reduce(ctx, MOE_RED_SUM, dw, prod, 1);
    moe_tensor_release(g); moe_tensor_release(gsel); moe_tensor_release(prod); moe_tensor_release(wc);
    if (s != MOE_OK) { moe_tensor_release(dyp); moe_tensor_release(dw); return s; }
    gin[0] = dyp;
    gin[1] = dw;
    return MOE_OK;
}

moe_status moe_f_combine(moe_ctx *ctx, moe_tape *tape, moe_tensor *yp, moe_tensor *w, moe_tensor *token_idx,
                         moe_tensor *slots, int64_t n_tokens, moe_tensor **y) {
    return moe_f_combine_add(ctx, tape, yp, w, token_idx, slots, n_tokens, NULL, y);
}

moe_status moe_f_combine_add(moe_ctx *ctx, moe_tape *tape, moe_tensor *yp, moe_tensor *w, moe_tensor *token_idx,
                             moe_tensor *slots, int64_t n_tokens, moe_tensor *residual, moe_tensor **y) {
    *y = NULL;
    int64_t shape[2] = {n_tokens, yp->shape[1]};
    moe_tensor *sl = usable_slots(slots, n_tokens);
    if (residual && (!sl || residual->ndim != 2 || residual->shape[0] != n_tokens ||
                     residual->shape[1] != yp->shape[1] || residual->dtype != yp->dtype)) {
        /* no one-pass kernel for this path: the combine, then a taped add */
        moe_tensor *c = NULL;
        MOE_TRY(moe_f_combine_add(ctx, tape, yp, w, token_idx, slots, n_tokens, NULL, &c));
        moe_status s = moe_f_binary(ctx, tape, MOE_BIN_ADD, residual, c, y);
        moe_tensor_release(c);
        return s;
    }
    moe_tensor *out = moe_tensor_new(ctx, yp->dtype, 2, shape, yp->device);
    moe_tensor *scaled = NULL, *wc = NULL;
    moe_status s = out ? MOE_OK : moe_last_status();
    if (s == MOE_OK && sl) {
        s = moe_op_gather_sum_add(ctx, out, residual, yp, w, sl);
    } else if (s == MOE_OK) {
        scaled = moe_tensor_like(ctx, yp);
        wc = column(w);
        s = scaled && wc ? moe_op_fill(ctx, out, 0.0) : moe_last_status();
        if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_MUL, scaled, yp, wc);
        if (s == MOE_OK) s = moe_op_index_add(ctx, out, token_idx, scaled);
    }
    if (s == MOE_OK && tape) {
        moe_tensor *in[3] = {yp, w, residual};
        moe_tape_entry *e = moe_tape_record(tape, "combine", combine_backward, NULL, NULL, NULL, residual ? 3 : 2, in, 1, &out);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, token_idx);
            if (sl) moe_tape_save(e, sl);
            e->i[0] = sl != NULL;
        }
    }
    moe_tensor_release(scaled); moe_tensor_release(wc);
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

/* the unweighted sum's backward: dsrc[a] = dy[token[a]] */
static moe_status gather_sum_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *dsrc = moe_tensor_like(ctx, e->in[0]);
    moe_status s = g && dsrc ? moe_op_index_select(ctx, dsrc, g, e->saved[0]) : moe_last_status();
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dsrc); return s; }
    gin[0] = dsrc;
    return MOE_OK;
}

moe_status moe_f_gather_sum(moe_ctx *ctx, moe_tape *tape, moe_tensor *src, moe_tensor *token_idx, moe_tensor *slots,
                            int64_t n_tokens, moe_tensor **y) {
    *y = NULL;
    int64_t shape[2] = {n_tokens, src->shape[1]};
    moe_tensor *sl = usable_slots(slots, n_tokens);
    moe_tensor *out = moe_tensor_new(ctx, src->dtype, 2, shape, src->device);
    moe_status s = out ? MOE_OK : moe_last_status();
    if (s == MOE_OK && sl) {
        s = moe_op_gather_sum(ctx, out, src, NULL, sl);
    } else if (s == MOE_OK) {
        s = moe_op_fill(ctx, out, 0.0);
        if (s == MOE_OK) s = moe_op_index_add(ctx, out, token_idx, src);
    }
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, "gather_sum", gather_sum_backward, NULL, NULL, NULL, 1, &src, 1, &out);
        if (!e) s = moe_last_status();
        else moe_tape_save(e, token_idx);
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

/* ---- rows of a 2-d tensor, for per-expert layers ---- */

static moe_status rows_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *dx = moe_tensor_like(ctx, e->in[0]);
    moe_status s = dx ? moe_op_fill(ctx, dx, 0.0) : moe_last_status();
    moe_tensor *part = s == MOE_OK ? moe_tensor_narrow(dx, 0, e->i[0], e->i[1]) : NULL;
    if (s == MOE_OK && !part) s = moe_last_status();
    if (s == MOE_OK) s = moe_op_copy(ctx, part, gout[0]);
    moe_tensor_release(part);
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_rows(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int64_t start, int64_t len, moe_tensor **y) {
    *y = NULL;
    moe_tensor *v = moe_tensor_narrow(x, 0, start, len);
    if (!v) return moe_last_status();
    moe_tensor *out = moe_op_contiguous(ctx, v);
    moe_tensor_release(v);
    if (!out) return moe_last_status();
    if (tape) {
        moe_tape_entry *e = moe_tape_record(tape, "rows", rows_backward, NULL, NULL, NULL, 1, &x, 1, &out);
        if (!e) { moe_tensor_release(out); return moe_last_status(); }
        e->i[0] = start;
        e->i[1] = len;
    }
    *y = out;
    return MOE_OK;
}

/* One tape entry per part (an entry has at most MOE_TAPE_MAX_IO inputs, fewer
 * than the experts of a layer), all sharing the output: each part's gradient
 * is a row slice of the output's gradient. Backward runs the entries last to
 * first, so all but the first keep the output's gradient alive. */
static moe_status slice_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    if (!g) return moe_last_status();
    moe_tensor *v = moe_tensor_narrow(g, 0, e->i[0], e->i[1]);
    moe_tensor *d = v ? moe_op_contiguous(ctx, v) : NULL;
    moe_status s = d ? MOE_OK : moe_last_status();
    /* contiguous() may hand back v itself when it is already contiguous: own a fresh copy */
    if (s == MOE_OK && d == v) {
        moe_tensor_release(d);
        d = moe_tensor_like(ctx, v);
        s = d ? moe_op_copy(ctx, d, v) : moe_last_status();
    }
    moe_tensor_release(v);
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(d); return s; }
    gin[0] = d;
    return MOE_OK;
}

moe_status moe_f_cat_rows(moe_ctx *ctx, moe_tape *tape, moe_tensor **parts, int n, int64_t cols, moe_dtype dt,
                          moe_device dev, moe_tensor **y) {
    *y = NULL;
    int64_t rows = 0;
    for (int i = 0; i < n; i++) {
        if (parts[i]->ndim != 2 || parts[i]->shape[1] != cols) {
            char b[96];
            return moe_error(MOE_ERR_SHAPE, "cat_rows: part %d has shape %s, expected [rows, %lld]", i + 1,
                             moe_shape_str(parts[i], b, sizeof b), (long long)cols);
        }
        rows += parts[i]->shape[0];
    }
    int64_t shape[2] = {rows, cols};
    moe_tensor *out = moe_tensor_new(ctx, dt, 2, shape, dev);
    if (!out) return moe_last_status();
    moe_status s = MOE_OK;
    int64_t off = 0;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        int64_t r = parts[i]->shape[0];
        moe_tensor *dst = moe_tensor_narrow(out, 0, off, r);
        s = dst ? moe_op_copy(ctx, dst, parts[i]) : moe_last_status();
        moe_tensor_release(dst);
        if (s == MOE_OK && tape) {
            moe_tape_entry *e = moe_tape_record(tape, "cat_rows", slice_backward, NULL, NULL, NULL, 1, &parts[i], 1, &out);
            if (!e) s = moe_last_status();
            else { e->i[0] = off; e->i[1] = r; e->keep_out_grads = i > 0; }
        }
        off += r;
    }
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}
