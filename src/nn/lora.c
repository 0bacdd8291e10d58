/* LoRA adapters on expert banks and Linear layers (see lora.h). */
#include "lora.h"
#include "functional.h"
#include "moe_block.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int64_t next_id = 1;

static int is_bank(const moe_layer *l) { return moe_layer_is(l, "ExpertBank"); }
static int is_linear(const moe_layer *l) { return moe_layer_is(l, "Linear"); }

const moe_lora *moe_lora_of(const moe_layer *l) {
    if (!l) return NULL;
    if (is_bank(l)) return moe_expert_bank_lora(l);
    if (is_linear(l)) return l->state;
    return NULL;
}

static void set_lora(moe_layer *l, moe_lora *lo) {
    if (is_bank(l)) moe_expert_bank_set_lora(l, lo);
    else { free(l->state); l->state = lo; }
}

moe_layer *moe_layer_find_child(moe_layer *root, const char *path) {
    moe_layer *l = root;
    const char *p = path;
    while (l && *p) {
        const char *dot = strchr(p, '.');
        size_t len = dot ? (size_t)(dot - p) : strlen(p);
        moe_layer *next = NULL;
        for (int c = 0; c < l->n_children; c++)
            if (strlen(l->child_names[c]) == len && !strncmp(l->child_names[c], p, len)) { next = l->children[c]; break; }
        l = next;
        p = dot ? dot + 1 : p + len;
    }
    return l;
}

/* Appends parameter `name` of the given shape; its index goes to *idx. */
static moe_status add_param(moe_layer *l, const char *name, int ndim, const int64_t *shape, int *idx) {
    moe_param *ps = realloc(l->params, (size_t)(l->n_params + 1) * sizeof *ps);
    if (!ps) return moe_error(MOE_ERR_OOM, "out of host memory for adapter parameters");
    l->params = ps;
    memset(&ps[l->n_params], 0, sizeof *ps);
    *idx = l->n_params++;
    return moe_layer_init_param(l, *idx, name, ndim, shape);
}

/* Drops parameters from index `first` on (the adapters are always the last ones). */
static void drop_params(moe_layer *l, int first) {
    for (int i = first; i < l->n_params; i++) {
        moe_tensor_release(l->params[i].value);
        moe_tensor_release(l->params[i].grad);
        moe_tensor_release(l->params[i].compute);
        memset(&l->params[i], 0, sizeof l->params[i]);
    }
    if (first < l->n_params) l->n_params = first;
}

/* A ~ U(-1/sqrt(in), 1/sqrt(in)), B = 0, on the cpu (flattening moves them). */
static moe_status init_pair(moe_ctx *ctx, moe_layer *l, int a, int b, int64_t in, moe_init *init) {
    MOE_TRY(moe_param_init_uniform(ctx, &l->params[a], init, 1.0f / sqrtf((float)in)));
    return moe_tensor_fill_cpu(l->params[b].value, 0.0);
}

static const char *const proj_names[3] = {"gate_proj", "up_proj", "down_proj"};

moe_status moe_lora_attach(moe_ctx *ctx, moe_layer *l, const moe_lora_cfg *cfg, moe_init *init, int *n_adapted) {
    if (n_adapted) *n_adapted = 0;
    if (!l || (!is_bank(l) && !is_linear(l)))
        return moe_error(MOE_ERR_ARG, "lora: adapters go on an ExpertBank or a Linear layer, got %s", l ? l->vt->kind : "nil");
    if (cfg->r <= 0) return moe_error(MOE_ERR_ARG, "lora: r must be positive, got %lld", (long long)cfg->r);
    if (!(cfg->alpha > 0) || !isfinite(cfg->alpha))
        return moe_error(MOE_ERR_ARG, "lora: lora_alpha must be a positive number, got %g", cfg->alpha);
    if (moe_lora_of(l)) return moe_error(MOE_ERR_STATE, "lora: the %s layer already has adapters", l->vt->kind);
    /* per-expert adapters of a shard would not map onto the single-process layout */
    if (is_bank(l) && moe_expert_bank_is_sharded(l))
        return moe_error(MOE_ERR_STATE, "lora: the expert bank is sharded over expert-parallel ranks; "
                         "gather the experts first (trainer:gather_experts()) or use shard_experts = false");
    moe_lora *lo = calloc(1, sizeof *lo);
    if (!lo) return moe_error(MOE_ERR_OOM, "out of host memory");
    lo->cfg = *cfg;
    lo->scale = cfg->alpha / (float)cfg->r;
    lo->first = l->n_params;
    for (int k = 0; k < 3; k++) lo->a[k] = lo->b[k] = -1;
    int64_t r = cfg->r;
    moe_status s = MOE_OK;
    int n = 0;
    if (is_bank(l)) {
        for (int w = 0; w < 3 && s == MOE_OK; w++) {
            moe_param *p = moe_expert_bank_param(l, w);
            if (!p || !(cfg->targets & (1u << w))) continue;
            int64_t e = cfg->expert_wise ? p->value->shape[0] : 1, out = p->value->shape[1], in = p->value->shape[2];
            int64_t as[3] = {e, r, in}, bs[3] = {e, out, r};
            char na[64], nb[64];
            snprintf(na, sizeof na, "%s_lora_A", proj_names[w]);
            snprintf(nb, sizeof nb, "%s_lora_B", proj_names[w]);
            s = add_param(l, na, 3, as, &lo->a[w]);
            if (s == MOE_OK) s = add_param(l, nb, 3, bs, &lo->b[w]);
            if (s == MOE_OK) s = init_pair(ctx, l, lo->a[w], lo->b[w], in, init);
            n++;
        }
    } else {
        int64_t out = l->params[0].value->shape[0], in = l->params[0].value->shape[1];
        int64_t as[2] = {r, in}, bs[2] = {out, r};
        s = add_param(l, "lora_A", 2, as, &lo->a[0]);
        if (s == MOE_OK) s = add_param(l, "lora_B", 2, bs, &lo->b[0]);
        if (s == MOE_OK) s = init_pair(ctx, l, lo->a[0], lo->b[0], in, init);
        n = 1;
    }
    if (s != MOE_OK || n == 0) {
        drop_params(l, lo->first);
        free(lo);
        return s == MOE_OK ? MOE_OK : moe_error_context(s, "lora");
    }
    lo->id = next_id++;
    set_lora(l, lo);
    if (n_adapted) *n_adapted = n;
    return MOE_OK;
}

moe_status moe_lora_remove(moe_layer *l) {
    const moe_lora *lo = moe_lora_of(l);
    if (!lo) return MOE_OK;
    drop_params(l, lo->first);
    set_lora(l, NULL);
    return MOE_OK;
}

/* w [out, in] += scale * b [out, r] @ a [r, in] */
static moe_status fold(moe_ctx *ctx, moe_tensor *w, moe_tensor *b, moe_tensor *a, float scale) {
    return moe_op_gemm(ctx, 0, 0, scale, b, a, 1.0f, w);
}

moe_status moe_lora_merge(moe_ctx *ctx, moe_layer *l) {
    const moe_lora *lo = moe_lora_of(l);
    if (!lo) return MOE_OK;
    moe_status s = MOE_OK;
    if (is_bank(l)) {
        for (int w = 0; w < 3 && s == MOE_OK; w++) {
            if (lo->a[w] < 0) continue;
            moe_tensor *W = moe_expert_bank_param(l, w)->value;
            moe_tensor *A = l->params[lo->a[w]].value, *B = l->params[lo->b[w]].value;
            for (int64_t e = 0; e < W->shape[0] && s == MOE_OK; e++) {
                int64_t k = lo->cfg.expert_wise ? e : 0;
                moe_tensor *we = moe_tensor_select(W, 0, e), *ae = moe_tensor_select(A, 0, k), *be = moe_tensor_select(B, 0, k);
                s = we && ae && be ? fold(ctx, we, be, ae, lo->scale) : moe_last_status();
                moe_tensor_release(we); moe_tensor_release(ae); moe_tensor_release(be);
            }
        }
    } else {
        s = fold(ctx, l->params[0].value, l->params[lo->b[0]].value, l->params[lo->a[0]].value, lo->scale);
    }
    if (s != MOE_OK) return moe_error_context(s, "lora merge");
    return moe_lora_remove(l);
}

/* ---- expert bank hooks ---- */

/* Offsets and group count the adapter of `lo` uses: the routing groups, or one group of all rows. */
static void adapter_groups(const moe_lora *lo, const int64_t *offsets, int groups, int64_t rows, int64_t one[2],
                           const int64_t **off, int *g) {
    one[0] = 0;
    one[1] = rows;
    *off = lo->cfg.expert_wise ? offsets : one;
    *g = lo->cfg.expert_wise ? groups : 1;
}

moe_status moe_lora_bank_forward(moe_ctx *ctx, moe_layer *bank, int which, const moe_tensor *x, moe_tensor *y,
                                 const int64_t *offsets, int groups) {
    const moe_lora *lo = moe_expert_bank_lora(bank);
    if (!lo || lo->a[which] < 0) return MOE_OK;
    moe_param *A = &bank->params[lo->a[which]], *B = &bank->params[lo->b[which]];
    int64_t one[2];
    const int64_t *off;
    int g;
    adapter_groups(lo, offsets, groups, x->shape[0], one, &off, &g);
    int64_t ts[2] = {x->shape[0], lo->cfg.r};
    moe_tensor *t = moe_tensor_new(ctx, x->dtype, 2, ts, x->device);
    moe_status s = t ? MOE_OK : moe_last_status();
    /* t = x A^T, y += scale * t B^T */
    if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 1, 1.0f, x, moe_param_w(A), 0.0f, t, off, g);
    if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 1, lo->scale, t, moe_param_w(B), 1.0f, y, off, g);
    moe_tensor_release(t);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "lora %s", proj_names[which]);
}

moe_status moe_lora_bank_backward(moe_ctx *ctx, moe_layer *bank, int which, const moe_tensor *x, const moe_tensor *dy,
                                  moe_tensor *dx, const int64_t *offsets, int groups) {
    const moe_lora *lo = moe_expert_bank_lora(bank);
    if (!lo || lo->a[which] < 0) return MOE_OK;
    moe_param *A = &bank->params[lo->a[which]], *B = &bank->params[lo->b[which]];
    int64_t one[2];
    const int64_t *off;
    int g;
    adapter_groups(lo, offsets, groups, x->shape[0], one, &off, &g);
    int64_t ts[2] = {x->shape[0], lo->cfg.r};
    moe_tensor *t = moe_tensor_new(ctx, x->dtype, 2, ts, x->device);
    moe_tensor *dt = moe_tensor_new(ctx, x->dtype, 2, ts, x->device);
    moe_status s = t && dt ? MOE_OK : moe_last_status();
    /* t = x A^T (recomputed: r columns are cheap); dt = scale * dy B; dB += scale * dy^T t; dA += dt^T x; dx += dt A */
    if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 1, 1.0f, x, moe_param_w(A), 0.0f, t, off, g);
    if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 0, lo->scale, dy, moe_param_w(B), 0.0f, dt, off, g);
    if (s == MOE_OK) s = moe_op_gemm_grouped_wgrad(ctx, lo->scale, dy, t, 1.0f, B->grad, off, g);
    if (s == MOE_OK) s = moe_op_gemm_grouped_wgrad(ctx, 1.0f, dt, x, 1.0f, A->grad, off, g);
    if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 0, 1.0f, dt, moe_param_w(A), 1.0f, dx, off, g);
    moe_tensor_release(t);
    moe_tensor_release(dt);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "lora %s backward", proj_names[which]);
}

/* ---- Linear hook ---- */

moe_status moe_lora_linear_forward(moe_ctx *ctx, moe_tape *tape, moe_layer *lin, moe_tensor *x, moe_tensor *y0,
                                   moe_tensor **y) {
    *y = NULL;
    const moe_lora *lo = moe_lora_of(lin);
    if (!lo) { moe_tensor_retain(y0); *y = y0; return MOE_OK; }
    moe_param *A = &lin->params[lo->a[0]], *B = &lin->params[lo->b[0]];
    moe_tensor *t = NULL, *u = NULL, *us = NULL;
    moe_status s = moe_f_linear(ctx, tape, x, moe_param_w(A), A->grad, NULL, NULL, &t);
    if (s == MOE_OK) s = moe_f_linear(ctx, tape, t, moe_param_w(B), B->grad, NULL, NULL, &u);
    if (s == MOE_OK) s = moe_f_unary(ctx, tape, MOE_UN_SCALE, u, lo->scale, &us);
    if (s == MOE_OK) s = moe_f_binary(ctx, tape, MOE_BIN_ADD, y0, us, y);
    moe_tensor_release(t); moe_tensor_release(u); moe_tensor_release(us);
    return s == MOE_OK ? MOE_OK : moe_error_context(s, "lora");
}
