/* Linear: y = x W^T + b with W [out, in] (the PyTorch / Hugging Face layout,
 * so checkpoints load without transposes). */
#include "layer.h"
#include "functional.h"
#include "lora.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { SAVED_X, SAVED_W, SAVED_WGRAD, SAVED_B, SAVED_BGRAD };

static moe_status linear_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_tensor *x = e->saved[SAVED_X], *w = e->saved[SAVED_W], *wgrad = e->saved[SAVED_WGRAD];
    int has_bias = e->i[0];
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *grows = g ? moe_rows_view(g) : NULL;
    moe_tensor *xrows = moe_rows_view(x);
    /* where x already has a gradient (q, k and v share their input), add to it in the GEMM */
    moe_tensor *acc = moe_tape_grad_acc(e, 0);
    moe_tensor *dx = acc;
    if (acc) moe_tensor_retain(acc);
    else dx = moe_tensor_like(ctx, x);
    moe_tensor *dxrows = dx ? moe_rows_view(dx) : NULL;
    moe_tensor *db = NULL;
    moe_status s = grows && xrows && dxrows ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_gemm(ctx, 0, 0, 1.0f, grows, w, acc ? 1.0f : 0.0f, dxrows);
    if (s == MOE_OK && wgrad) s = moe_op_gemm(ctx, 1, 0, 1.0f, grows, xrows, 1.0f, wgrad);
    if (s == MOE_OK && has_bias && e->saved[SAVED_BGRAD]) {
        db = moe_tensor_like(ctx, e->saved[SAVED_BGRAD]);
        s = db ? moe_op_reduce(ctx, MOE_RED_SUM, db, grows, 0) : moe_last_status();
        if (s == MOE_OK) s = moe_op_axpy(ctx, e->saved[SAVED_BGRAD], 1.0f, db);
    }
    moe_tensor_release(g); moe_tensor_release(grows); moe_tensor_release(xrows);
    moe_tensor_release(dxrows); moe_tensor_release(db);
    if (s == MOE_OK && e->n_in > 1) {   /* the residual's gradient is the output's, handed over (like an add's) */
        moe_tensor_retain(gout[0]);
        gin[1] = gout[0];
    }
    if (s != MOE_OK || acc) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

/* y = x W^T (+ b) over row views, added to beta * y (the forward and its recompute both run this) */
static moe_status gemm_bias(moe_ctx *ctx, moe_tensor *xrows, moe_tensor *w, moe_tensor *b, float beta,
                            moe_tensor *yrows) {
    MOE_TRY(moe_op_gemm(ctx, 0, 1, 1.0f, xrows, w, beta, yrows));
    return b ? moe_op_binary(ctx, MOE_BIN_ADD, yrows, yrows, b) : MOE_OK;
}

moe_status moe_f_linear(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                        moe_tensor *b, moe_tensor *bgrad, moe_tensor **y) {
    return moe_f_linear_add(ctx, tape, x, w, wgrad, b, bgrad, NULL, y);
}

moe_status moe_f_linear_add(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                            moe_tensor *b, moe_tensor *bgrad, moe_tensor *residual, moe_tensor **y) {
    *y = NULL;
    if (!x) return moe_error(MOE_ERR_ARG, "linear: input is nil");
    int64_t in = w->shape[1], out_f = w->shape[0];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != in) {
        char a[96];
        return moe_error(MOE_ERR_SHAPE, "linear: input has shape %s, expected last dim %lld (in_features)",
                         moe_shape_str(x, a, sizeof a), (long long)in);
    }
    if (x->dtype != w->dtype)
        return moe_error(MOE_ERR_DTYPE, "linear: input is %s but the weight is %s", moe_dtype_name(x->dtype),
                         moe_dtype_name(w->dtype));
    moe_tensor *xc = moe_op_contiguous(ctx, x);
    moe_tensor *xrows = xc ? moe_rows_view(xc) : NULL;
    moe_tensor *yt = xc ? moe_new_last_dim(ctx, xc, out_f) : NULL;
    moe_tensor *yrows = yt ? moe_rows_view(yt) : NULL;
    moe_status s = xrows && yrows ? MOE_OK : moe_last_status();
    if (s == MOE_OK && residual && (!moe_tensor_same_shape(residual, yt) || residual->dtype != yt->dtype)) {
        char a[96], c[96];
        s = moe_error(MOE_ERR_SHAPE, "linear: the residual is %s %s, expected %s %s (the output's)",
                      moe_dtype_name(residual->dtype), moe_shape_str(residual, a, sizeof a), moe_dtype_name(yt->dtype),
                      moe_shape_str(yt, c, sizeof c));
    }
    /* with a residual: y = residual, then the GEMM adds x W^T to it (beta 1):
     * one rounding of the sum and no separate [rows, out] product to keep */
    if (s == MOE_OK && residual) s = moe_op_copy(ctx, yt, residual);
    if (s == MOE_OK) s = gemm_bias(ctx, xrows, w, b, residual ? 1.0f : 0.0f, yrows);
    if (s == MOE_OK && tape) {
        moe_tensor *in[2] = {x, residual};
        moe_tape_entry *e = moe_tape_record(tape, "linear", linear_backward, NULL, NULL, NULL, residual ? 2 : 1, in, 1, &yt);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, xc);
            moe_tape_save(e, w);
            moe_tape_save(e, wgrad);
            if (b) { moe_tape_save(e, b); moe_tape_save(e, bgrad); }
            e->i[0] = b != NULL;
        }
    }
    moe_tensor_release(xc); moe_tensor_release(xrows); moe_tensor_release(yrows);
    if (s != MOE_OK) { moe_tensor_release(yt); return s; }
    *y = yt;
    return MOE_OK;
}

/* LoRA adapters (lora.c) append parameters after the weight and bias. */
static int has_bias(const moe_layer *l) { return l->n_params > 1 && !strcmp(l->params[1].name, "bias"); }

/* ---- the output again in the backward (moe_tape_recompute) ---- */

/* the forward's ops again (moe_f_linear_add without a residual), into out */
static moe_status linear_recompute(moe_ctx *ctx, moe_tensor *out, void *arg) {
    moe_remat_layer_arg *r = arg;
    moe_tensor *b = has_bias(r->l) ? moe_param_w(&r->l->params[1]) : NULL;
    moe_tensor *xc = moe_op_contiguous(ctx, r->x);
    moe_tensor *xrows = xc ? moe_rows_view(xc) : NULL, *yrows = moe_rows_view(out);
    moe_status s = xrows && yrows ? gemm_bias(ctx, xrows, moe_param_w(&r->l->params[0]), b, 0.0f, yrows)
                                  : moe_last_status();
    moe_tensor_release(xc); moe_tensor_release(xrows); moe_tensor_release(yrows);
    return s;
}

moe_status moe_linear_recompute_later(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *y,
                                      int modes) {
    /* a plain Linear only: adapters (l->state) add to the base output */
    if (!(moe_tape_recompute(tape) & modes) || !l || l->state || strcmp(l->vt->kind, "Linear") || !x || !y)
        return MOE_OK;
    return moe_remat_layer_output(ctx, y, linear_recompute, l, x, 0, 0.0f);
}

/* The backward adds into the weight's gradient (beta 1): one left pending zero
 * (the LM head's, model.c) is cleared before a forward that records. */
static moe_status settle_if_recording(moe_ctx *ctx, moe_layer *l, moe_tape *tape) {
    return tape ? moe_layer_settle_grads(ctx, l) : MOE_OK;
}

static moe_status linear_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    moe_param *w = &l->params[0], *b = has_bias(l) ? &l->params[1] : NULL;
    MOE_TRY(settle_if_recording(ctx, l, tape));
    if (!l->state) return moe_f_linear(ctx, tape, x, moe_param_w(w), w->grad, b ? moe_param_w(b) : NULL, b ? b->grad : NULL, y);
    moe_tensor *y0 = NULL;
    MOE_TRY(moe_f_linear(ctx, tape, x, moe_param_w(w), w->grad, b ? moe_param_w(b) : NULL, b ? b->grad : NULL, &y0));
    moe_status s = moe_lora_linear_forward(ctx, tape, l, x, y0, y);
    moe_tensor_release(y0);
    return s;
}

/* LoRA's adapters add after the base output: the residual is added by moe_layer_forward_residual then */
static moe_status linear_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x,
                                          moe_tensor *residual, moe_tensor **y) {
    moe_param *w = &l->params[0], *b = has_bias(l) ? &l->params[1] : NULL;
    MOE_TRY(settle_if_recording(ctx, l, tape));
    if (l->state) {
        moe_tensor *t = NULL;
        MOE_TRY(linear_forward(l, ctx, tape, x, &t));
        moe_status s = moe_f_binary(ctx, tape, MOE_BIN_ADD, residual, t, y);
        moe_tensor_release(t);
        return s;
    }
    return moe_f_linear_add(ctx, tape, x, moe_param_w(w), w->grad, b ? moe_param_w(b) : NULL, b ? b->grad : NULL,
                            residual, y);
}

static void linear_describe(const moe_layer *l, char *buf, size_t n) {
    const moe_lora *lo = moe_lora_of(l);
    char extra[64] = "";
    if (lo) snprintf(extra, sizeof extra, ", LoRA r=%lld alpha=%g", (long long)lo->cfg.r, lo->cfg.alpha);
    snprintf(buf, n, "Linear(%lld -> %lld%s%s)", (long long)l->params[0].value->shape[1],
             (long long)l->params[0].value->shape[0], has_bias(l) ? ", bias" : "", extra);
}

static void linear_destroy(moe_layer *l) { free(l->state); }   /* the LoRA adapters, if any */

static const moe_layer_vtable linear_vt = {"Linear", linear_forward, linear_describe, linear_destroy,
                                           linear_forward_residual};

moe_layer *moe_linear_new(moe_ctx *ctx, int64_t in, int64_t out, int bias, moe_init *init) {
    if (in <= 0 || out <= 0) {
        moe_error(MOE_ERR_ARG, "Linear: in_features and out_features must be positive, got %lld and %lld",
                  (long long)in, (long long)out);
        return NULL;
    }
    moe_layer *l = moe_layer_alloc(&linear_vt, bias ? 2 : 1, 0);
    if (!l) return NULL;
    int64_t ws[2] = {out, in}, bs[1] = {out};
    /* PyTorch's default: U(-1/sqrt(in), 1/sqrt(in)) for weight and bias */
    float a = 1.0f / sqrtf((float)in);
    moe_status s = moe_layer_init_param(l, 0, "weight", 2, ws);
    if (s == MOE_OK) s = moe_param_init_uniform(ctx, &l->params[0], init, a);
    if (s == MOE_OK && bias) s = moe_layer_init_param(l, 1, "bias", 1, bs);
    if (s == MOE_OK && bias) s = moe_param_init_uniform(ctx, &l->params[1], init, a);
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
