/* RMSNorm and LayerNorm over the last dim, with learned scale (and shift). */
#include "layer.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct { float eps; } norm_state;

static const moe_layer_vtable rmsnorm_vt;

static moe_status check_dim(moe_layer *l, moe_tensor *x) {
    int64_t d = l->params[0].value->shape[0];
    if (x->ndim < 1 || x->shape[x->ndim - 1] != d) {
        char a[96];
        return moe_error(MOE_ERR_SHAPE, "input has shape %s, expected last dim %lld", moe_shape_str(x, a, sizeof a),
                         (long long)d);
    }
    return MOE_OK;
}

/* stats shaped like x without its last dim */
static moe_tensor *new_stats(moe_ctx *ctx, moe_tensor *x) {
    return moe_tensor_new(ctx, MOE_F32, x->ndim - 1, x->shape, x->device);
}

/* The tape entry of an RMSNorm, alone or followed by rope on each head of its
 * output (QK-norm feeding attention: e->i[0] heads, 0 for the plain norm;
 * e->i[1] the position offset, e->f[0] theta). */
static moe_status rmsnorm_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_layer *l = e->self;
    moe_tensor *x = e->saved[0], *rstd = e->saved[1];
    /* the residual stream's gradient is usually there already: add to it in the kernel */
    moe_tensor *acc = moe_tape_grad_acc(e, 0);
    moe_tensor *dx = acc;
    if (acc) moe_tensor_retain(acc);
    else dx = moe_tensor_like(ctx, x);
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *w = moe_param_w(&l->params[0]), *dw = l->params[0].grad;
    float beta = acc ? 1.0f : 0.0f;
    moe_status s = !dx || !g ? moe_last_status()
                   : e->i[0] ? moe_op_rmsnorm_rope_backward(ctx, dx, dw, g, x, w, rstd, e->i[0], e->i[1], (float)e->f[0], beta)
                             : moe_op_rmsnorm_backward_beta(ctx, dx, dw, g, x, w, rstd, beta);
    moe_tensor_release(g);
    if (s != MOE_OK || acc) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

/* the norm's op into out and rstd: heads 0 the plain norm, else rope per
 * head follows in the same op (the forward and its recompute both run this) */
static moe_status rms_apply(moe_ctx *ctx, moe_layer *l, moe_tensor *out, moe_tensor *rstd, moe_tensor *xc,
                            int64_t heads, float theta) {
    const float eps = ((norm_state *)l->state)->eps;
    moe_tensor *w = moe_param_w(&l->params[0]);
    return heads ? moe_op_rmsnorm_rope(ctx, out, rstd, xc, w, eps, heads, 0, theta)
                 : moe_op_rmsnorm(ctx, out, rstd, xc, w, eps);
}

/* heads 0: the plain norm; else rope per head follows, in one op */
static moe_status rms_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int64_t heads, float theta,
                              moe_tensor **y) {
    MOE_TRY(check_dim(l, x));
    moe_tensor *xc = moe_op_contiguous(ctx, x);
    moe_tensor *out = xc ? moe_tensor_like(ctx, xc) : NULL;
    moe_tensor *rstd = xc ? new_stats(ctx, xc) : NULL;
    moe_status s = !out || !rstd ? moe_last_status() : rms_apply(ctx, l, out, rstd, xc, heads, theta);
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, heads ? "rmsnorm_rope" : "rmsnorm", rmsnorm_backward, l,
                                            moe_layer_retain_v, moe_layer_release_v, 1, &x, 1, &out);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, xc); moe_tape_save(e, rstd);
            e->i[0] = heads; e->i[1] = 0; e->f[0] = theta;
        }
    }
    moe_tensor_release(xc);
    moe_tensor_release(rstd);
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

static moe_status rmsnorm_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return rms_forward(l, ctx, tape, x, 0, 0.0f, y);
}

int moe_layer_is_rmsnorm(const moe_layer *l) { return l && l->vt == &rmsnorm_vt; }

moe_status moe_rmsnorm_rope_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int64_t heads,
                                    float theta, moe_tensor **y) {
    *y = NULL;
    if (!moe_layer_is_rmsnorm(l)) return moe_error(MOE_ERR_ARG, "rmsnorm_rope: the norm is not an RMSNorm");
    if (heads < 1) return moe_error(MOE_ERR_ARG, "rmsnorm_rope: heads is %lld, expected >= 1", (long long)heads);
    return rms_forward(l, ctx, tape, x, heads, theta, y);
}

/* ---- the output again in the backward (moe_tape_recompute) ---- */

/* the forward's op again, into out (a scratch rstd: the tape kept the
 * forward's); i: the heads of rmsnorm_rope (0: the plain norm), f: theta */
static moe_status rms_recompute(moe_ctx *ctx, moe_tensor *out, void *arg) {
    moe_remat_layer_arg *r = arg;
    moe_tensor *xc = moe_op_contiguous(ctx, r->x);
    moe_tensor *rstd = xc ? new_stats(ctx, xc) : NULL;
    moe_status s = !rstd ? moe_last_status() : rms_apply(ctx, r->l, out, rstd, xc, r->i, r->f);
    moe_tensor_release(xc);
    moe_tensor_release(rstd);
    return s;
}

moe_status moe_rmsnorm_recompute_later(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *y,
                                       int64_t heads, float theta) {
    if (!(moe_tape_recompute(tape) & MOE_TAPE_RECOMPUTE_NORMS) || !moe_layer_is_rmsnorm(l) || !x || !y) return MOE_OK;
    return moe_remat_layer_output(ctx, y, rms_recompute, l, x, heads, theta);
}

static moe_status layernorm_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_layer *l = e->self;
    moe_tensor *x = e->saved[0], *mean = e->saved[1], *rstd = e->saved[2];
    moe_tensor *dx = moe_tensor_like(ctx, x);
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *db = l->n_params > 1 ? l->params[1].grad : NULL;
    moe_status s = dx && g ? moe_op_layernorm_backward(ctx, dx, l->params[0].grad, db, g, x, moe_param_w(&l->params[0]), mean, rstd)
                           : moe_last_status();
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

static moe_status layernorm_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    norm_state *st = l->state;
    MOE_TRY(check_dim(l, x));
    moe_tensor *xc = moe_op_contiguous(ctx, x);
    moe_tensor *out = xc ? moe_tensor_like(ctx, xc) : NULL;
    moe_tensor *mean = xc ? new_stats(ctx, xc) : NULL, *rstd = xc ? new_stats(ctx, xc) : NULL;
    moe_tensor *b = l->n_params > 1 ? moe_param_w(&l->params[1]) : NULL;
    moe_status s = out && mean && rstd ? moe_op_layernorm(ctx, out, mean, rstd, xc, moe_param_w(&l->params[0]), b, st->eps)
                                       : moe_last_status();
    if (s == MOE_OK && tape) {
        moe_tape_entry *e = moe_tape_record(tape, "layernorm", layernorm_backward, l, moe_layer_retain_v,
                                            moe_layer_release_v, 1, &x, 1, &out);
        if (!e) s = moe_last_status();
        else { moe_tape_save(e, xc); moe_tape_save(e, mean); moe_tape_save(e, rstd); }
    }
    moe_tensor_release(xc); moe_tensor_release(mean); moe_tensor_release(rstd);
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

static void norm_destroy(moe_layer *l) { free(l->state); }

static void rmsnorm_describe(const moe_layer *l, char *buf, size_t n) {
    snprintf(buf, n, "RMSNorm(%lld, eps=%g)", (long long)l->params[0].value->shape[0], ((norm_state *)l->state)->eps);
}

static void layernorm_describe(const moe_layer *l, char *buf, size_t n) {
    snprintf(buf, n, "LayerNorm(%lld, eps=%g%s)", (long long)l->params[0].value->shape[0],
             ((norm_state *)l->state)->eps, l->n_params > 1 ? ", bias" : "");
}

static const moe_layer_vtable rmsnorm_vt = {"RMSNorm", rmsnorm_forward, rmsnorm_describe, norm_destroy, NULL};
static const moe_layer_vtable layernorm_vt = {"LayerNorm", layernorm_forward, layernorm_describe, norm_destroy, NULL};

static moe_layer *norm_new(moe_ctx *ctx, const moe_layer_vtable *vt, int64_t dim, float eps, int bias) {
    if (dim <= 0 || !(eps > 0)) {
        moe_error(MOE_ERR_ARG, "%s: dim must be positive and eps > 0, got %lld and %g", vt->kind, (long long)dim, eps);
        return NULL;
    }
    moe_layer *l = moe_layer_alloc(vt, bias ? 2 : 1, 0);
    if (!l) return NULL;
    norm_state *st = malloc(sizeof *st);
    if (!st) { moe_layer_release(l); moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    st->eps = eps;
    l->state = st;
    int64_t shape[1] = {dim};
    moe_status s = moe_layer_init_param(l, 0, "weight", 1, shape);
    if (s == MOE_OK) s = moe_op_fill(ctx, l->params[0].value, 1.0);
    if (s == MOE_OK && bias) s = moe_layer_init_param(l, 1, "bias", 1, shape);
    if (s == MOE_OK && bias) s = moe_op_fill(ctx, l->params[1].value, 0.0);
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}

moe_layer *moe_rmsnorm_new(moe_ctx *ctx, int64_t dim, float eps) { return norm_new(ctx, &rmsnorm_vt, dim, eps, 0); }
moe_layer *moe_layernorm_new(moe_ctx *ctx, int64_t dim, float eps, int bias) {
    return norm_new(ctx, &layernorm_vt, dim, eps, bias);
}
