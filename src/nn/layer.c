#include "layer.h"
#include "functional.h"
#include "../core/rng.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

moe_layer *moe_layer_alloc(const moe_layer_vtable *vt, int n_params, int n_children) {
    moe_layer *l = calloc(1, sizeof *l);
    if (!l) { moe_error(MOE_ERR_OOM, "out of host memory for a layer"); return NULL; }
    l->vt = vt;
    l->refcount = 1;
    l->device = MOE_DEVICE_CPU;
    if (n_params) l->params = calloc((size_t)n_params, sizeof *l->params);
    if (n_children) {
        l->children = calloc((size_t)n_children, sizeof *l->children);
        l->child_names = calloc((size_t)n_children, sizeof *l->child_names);
    }
    if ((n_params && !l->params) || (n_children && (!l->children || !l->child_names))) {
        free(l->params); free(l->children); free(l->child_names); free(l);
        moe_error(MOE_ERR_OOM, "out of host memory for a layer");
        return NULL;
    }
    l->n_params = n_params;
    l->n_children = n_children;
    return l;
}

void moe_layer_retain(moe_layer *l) { if (l) l->refcount++; }
void moe_layer_retain_v(void *l) { moe_layer_retain(l); }
void moe_layer_release_v(void *l) { moe_layer_release(l); }

void moe_layer_release(moe_layer *l) {
    if (!l || --l->refcount > 0) return;
    if (l->vt->destroy) l->vt->destroy(l);
    for (int i = 0; i < l->n_params; i++) {
        moe_tensor_release(l->params[i].value);
        moe_tensor_release(l->params[i].grad);
        moe_tensor_release(l->params[i].compute);
    }
    for (int i = 0; i < l->n_children; i++) moe_layer_release(l->children[i]);
    moe_layer_master_release(l);
    moe_tensor_release(l->flat_values);
    moe_tensor_release(l->flat_grads);
    moe_tensor_release(l->flat_compute);
    for (int i = 0; i < l->n_buffers; i++) moe_tensor_release(l->buffers[i].value);
    free(l->buffers);
    free(l->params);
    free(l->children);
    free(l->child_names);
    free(l);
}

int moe_layer_is(const moe_layer *l, const char *kind) { return l && !strcmp(l->vt->kind, kind); }

moe_status moe_layer_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    *y = NULL;
    if (!x) return moe_error(MOE_ERR_ARG, "%s.forward: input is nil", l->vt->kind);
    if (!moe_device_eq(x->device, l->device)) {
        char a[16], b[16];
        return moe_error(MOE_ERR_DEVICE, "%s.forward: input is on %s but the layer is on %s", l->vt->kind,
                         moe_device_str(x->device, a, sizeof a), moe_device_str(l->device, b, sizeof b));
    }
    moe_status s = l->vt->forward(l, ctx, tape, x, y);
    if (s != MOE_OK) {
        moe_tensor_release(*y);
        *y = NULL;
        /* container layers already prefixed their children's names */
        if (!l->n_children || !strstr(moe_last_error(), ".forward")) moe_error_context(s, "%s.forward", l->vt->kind);
    }
    return s;
}

moe_status moe_layer_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                      moe_tensor **y) {
    *y = NULL;
    if (!residual) return moe_error(MOE_ERR_ARG, "%s.forward: residual is nil", l->vt->kind);
    if (!l->vt->forward_residual || !x || !moe_device_eq(x->device, l->device)) {
        moe_tensor *t = NULL;
        MOE_TRY(moe_layer_forward(l, ctx, tape, x, &t));
        moe_status s = moe_f_binary(ctx, tape, MOE_BIN_ADD, residual, t, y);
        moe_tensor_release(t);
        return s;
    }
    moe_status s = l->vt->forward_residual(l, ctx, tape, x, residual, y);
    if (s != MOE_OK) {
        moe_tensor_release(*y);
        *y = NULL;
        if (!l->n_children || !strstr(moe_last_error(), ".forward")) moe_error_context(s, "%s.forward", l->vt->kind);
    }
    return s;
}

void moe_layer_describe(const moe_layer *l, char *buf, size_t n) {
    if (l->vt->describe) l->vt->describe(l, buf, n);
    else snprintf(buf, n, "%s", l->vt->kind);
}

moe_status moe_layer_init_param(moe_layer *l, int idx, const char *name, int ndim, const int64_t *shape) {
    moe_param *p = &l->params[idx];
    snprintf(p->name, sizeof p->name, "%s", name);
    p->value = moe_tensor_new_cpu(MOE_F32, ndim, shape);
    p->grad = moe_tensor_new_cpu(MOE_F32, ndim, shape);
    if (!p->value || !p->grad) return moe_last_status();
    moe_tensor_fill_cpu(p->grad, 0);
    return MOE_OK;
}

moe_status moe_layer_set_child(moe_layer *l, int idx, const char *name, moe_layer *child) {
    moe_layer_retain(child);
    l->children[idx] = child;
    snprintf(l->child_names[idx], sizeof l->child_names[idx], "%s", name);
    return MOE_OK;
}

moe_status moe_param_init_normal(moe_ctx *ctx, moe_param *p, moe_init *init, float std) {
    uint64_t key = moe_rng_key(init->seed, MOE_RNG_INIT);
    moe_status s = moe_op_fill_randn(ctx, p->value, key, init->offset, 0.0f, std);
    init->offset += (uint64_t)moe_tensor_numel(p->value);
    return s;
}

moe_status moe_param_init_uniform(moe_ctx *ctx, moe_param *p, moe_init *init, float a) {
    uint64_t key = moe_rng_key(init->seed, MOE_RNG_INIT);
    moe_status s = moe_op_fill_rand(ctx, p->value, key, init->offset, -a, a);
    init->offset += (uint64_t)moe_tensor_numel(p->value);
    return s;
}

int moe_layer_num_param_tensors(const moe_layer *l) {
    int n = l->n_params;
    for (int i = 0; i < l->n_children; i++) n += moe_layer_num_param_tensors(l->children[i]);
    return n;
}

static int collect(moe_layer *l, const char *prefix, moe_param *out, int pos, int max) {
    for (int i = 0; i < l->n_params; i++, pos++) {
        if (pos >= max) continue;
        out[pos] = l->params[i];
        snprintf(out[pos].name, sizeof out[pos].name, "%s%s", prefix, l->params[i].name);
    }
    for (int c = 0; c < l->n_children; c++) {
        char p[64];
        snprintf(p, sizeof p, "%s%s.", prefix, l->child_names[c]);
        pos = collect(l->children[c], p, out, pos, max);
    }
    return pos;
}

int moe_layer_collect_params(moe_layer *l, moe_param *out, int max) { return collect(l, "", out, 0, max); }

int moe_layer_num_buffer_tensors(const moe_layer *l) {
    int n = l->n_buffers;
    for (int i = 0; i < l->n_children; i++) n += moe_layer_num_buffer_tensors(l->children[i]);
    return n;
}

static int collect_buffers(moe_layer *l, const char *prefix, moe_param *out, int pos, int max) {
    for (int i = 0; i < l->n_buffers; i++, pos++) {
        if (pos >= max) continue;
        out[pos] = l->buffers[i];
        snprintf(out[pos].name, sizeof out[pos].name, "%s%s", prefix, l->buffers[i].name);
    }
    for (int c = 0; c < l->n_children; c++) {
        char p[64];
        snprintf(p, sizeof p, "%s%s.", prefix, l->child_names[c]);
        pos = collect_buffers(l->children[c], p, out, pos, max);
    }
    return pos;
}

int moe_layer_collect_buffers(moe_layer *l, moe_param *out, int max) { return collect_buffers(l, "", out, 0, max); }

moe_status moe_layer_add_buffer(moe_layer *l, const char *name, moe_tensor *t) {
    moe_param *b = realloc(l->buffers, (size_t)(l->n_buffers + 1) * sizeof *b);
    if (!b) return moe_error(MOE_ERR_OOM, "out of host memory");
    l->buffers = b;
    memset(&b[l->n_buffers], 0, sizeof *b);
    snprintf(b[l->n_buffers].name, sizeof b[l->n_buffers].name, "%s", name);
    moe_tensor_retain(t);
    b[l->n_buffers++].value = t;
    return MOE_OK;
}

void moe_layer_set_training(moe_layer *l, int on) {
    l->training = on;
    for (int i = 0; i < l->n_children; i++) moe_layer_set_training(l->children[i], on);
}

int64_t moe_layer_num_params(const moe_layer *l) {
    int64_t n = 0;
    for (int i = 0; i < l->n_params; i++) n += moe_tensor_numel(l->params[i].value);
    for (int i = 0; i < l->n_children; i++) n += moe_layer_num_params(l->children[i]);
    return n;
}

moe_param *moe_layer_find_param(moe_layer *l, const char *name) {
    const char *dot = strchr(name, '.');
    if (!dot) {
        for (int i = 0; i < l->n_params; i++)
            if (!strcmp(l->params[i].name, name)) return &l->params[i];
        return NULL;
    }
    size_t len = (size_t)(dot - name);
    for (int c = 0; c < l->n_children; c++)
        if (strlen(l->child_names[c]) == len && !strncmp(l->child_names[c], name, len))
            return moe_layer_find_param(l->children[c], dot + 1);
    return NULL;
}

void moe_layer_repoint(moe_tensor *t, moe_storage *s, int64_t offset, moe_dtype dt) {
    moe_storage_retain(s);
    moe_storage_release(t->storage);
    t->storage = s;
    t->offset = offset;
    t->dtype = dt;
    t->device = s->device;
    int64_t st = 1;
    for (int i = t->ndim - 1; i >= 0; i--) { t->stride[i] = st; st *= t->shape[i]; }
}

static void set_device(moe_layer *l, moe_device dev) {
    l->device = dev;
    for (int i = 0; i < l->n_children; i++) set_device(l->children[i], dev);
}

static void drop_flat(moe_layer *l) {
    moe_tensor_release(l->flat_values);
    moe_tensor_release(l->flat_grads);
    l->flat_values = l->flat_grads = NULL;
    for (int i = 0; i < l->n_children; i++) drop_flat(l->children[i]);
}

moe_status moe_layer_flatten(moe_ctx *ctx, moe_layer *l, moe_device dev) {
    /* mixed precision is rebuilt on the new buffers */
    moe_dtype mixed = l->flat_compute ? l->compute_dtype : MOE_F32;
    if (mixed != MOE_F32 && dev.type != MOE_CUDA)
        return moe_error(MOE_ERR_DEVICE, "to: the model computes in %s, which needs a CUDA device; "
                         "set_precision(\"f32\") first", moe_dtype_name(mixed));
    if (mixed != MOE_F32) MOE_TRY(moe_layer_set_compute_dtype(ctx, l, MOE_F32));
    int n = moe_layer_num_param_tensors(l);
    moe_param *ps = calloc((size_t)(n ? n : 1), sizeof *ps);
    if (!ps) return moe_error(MOE_ERR_OOM, "out of host memory flattening parameters");
    moe_layer_collect_params(l, ps, n);
    /* each parameter starts on a 16-element boundary so vector loads stay aligned */
    int64_t total = 0;
    for (int i = 0; i < n; i++) total += (moe_tensor_numel(ps[i].value) + 15) & ~(int64_t)15;
    int64_t shape[1] = {total};
    moe_tensor *vals = moe_tensor_new(ctx, MOE_F32, 1, shape, dev);
    moe_tensor *grads = vals ? moe_tensor_new(ctx, MOE_F32, 1, shape, dev) : NULL;
    moe_status s = vals && grads ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, vals, 0.0);
    if (s == MOE_OK) s = moe_op_fill(ctx, grads, 0.0);
    int64_t off = 0;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        int64_t numel = moe_tensor_numel(ps[i].value);
        moe_tensor *dst = moe_tensor_from_storage(vals->storage, off, MOE_F32, ps[i].value->ndim,
                                                  ps[i].value->shape, NULL);
        if (!dst) { s = moe_last_status(); break; }
        s = moe_op_copy(ctx, dst, ps[i].value);
        moe_tensor_release(dst);
        off += (numel + 15) & ~(int64_t)15;
    }
    if (s != MOE_OK) {
        moe_tensor_release(vals);
        moe_tensor_release(grads);
        free(ps);
        return moe_error_context(s, "flatten parameters");
    }
    off = 0;
    for (int i = 0; i < n; i++) {
        moe_layer_repoint(ps[i].value, vals->storage, off, MOE_F32);
        moe_layer_repoint(ps[i].grad, grads->storage, off, MOE_F32);
        off += (moe_tensor_numel(ps[i].value) + 15) & ~(int64_t)15;
    }
    free(ps);
    drop_flat(l);
    l->flat_values = vals;
    l->flat_grads = grads;
    set_device(l, dev);
    if (mixed != MOE_F32) return moe_layer_set_compute_dtype(ctx, l, mixed);
    return MOE_OK;
}

/* Marks the lazily zeroed gradients (grad_lazy_zero) under l that live in
 * storage s as pending; appends their [start, end) element ranges (in s,
 * increasing: the flat order is the tree order) to r. Returns the count or -1
 * without memory. */
static int64_t mark_lazy(moe_layer *l, const moe_storage *s, int64_t **r, int64_t n, int64_t *cap) {
    for (int i = 0; i < l->n_params; i++) {
        moe_tensor *g = l->params[i].grad;
        if (!l->params[i].grad_lazy_zero || !g || g->storage != s) continue;
        if (n + 1 > *cap) {
            int64_t c = *cap ? *cap * 2 : 16, *q = realloc(*r, (size_t)c * 2 * sizeof *q);
            if (!q) return -1;
            *r = q;
            *cap = c;
        }
        (*r)[2 * n] = g->offset;
        (*r)[2 * n + 1] = g->offset + moe_tensor_numel(g);
        l->params[i].grad_zero_pending = 1;
        n++;
    }
    for (int i = 0; i < l->n_children && n >= 0; i++) n = mark_lazy(l->children[i], s, r, n, cap);
    return n;
}

static moe_status fill_span(moe_ctx *ctx, moe_tensor *flat, int64_t lo, int64_t hi) {
    if (hi <= lo) return MOE_OK;
    moe_tensor *v = moe_tensor_narrow(flat, 0, lo, hi - lo);
    moe_status s = v ? moe_op_fill(ctx, v, 0.0) : moe_last_status();
    moe_tensor_release(v);
    return s;
}

/* A flat buffer: everything but the lazy layers' gradients, cleared by spans. */
static moe_status zero_flat(moe_ctx *ctx, moe_layer *root) {
    moe_tensor *f = root->flat_grads;
    int64_t *r = NULL, cap = 0, n = mark_lazy(root, f->storage, &r, 0, &cap);
    if (n < 0) {
        free(r);
        moe_layer_settle_grads(ctx, root);   /* undo the marks by clearing what was marked */
        return moe_error(MOE_ERR_OOM, "zero_grad: out of host memory");
    }
    int64_t at = 0, len = moe_tensor_numel(f);
    moe_status s = MOE_OK;
    for (int64_t k = 0; k < n && s == MOE_OK; k++) {
        int64_t lo = r[2 * k] - f->offset, hi = r[2 * k + 1] - f->offset;
        s = fill_span(ctx, f, at, lo);
        if (hi > at) at = hi;
    }
    if (s == MOE_OK) s = fill_span(ctx, f, at, len);
    free(r);
    return s;
}

static void clear_marks(moe_layer *l) {
    for (int i = 0; i < l->n_params; i++) l->params[i].grad_zero_pending = 0;
    for (int i = 0; i < l->n_children; i++) clear_marks(l->children[i]);
}

moe_status moe_layer_zero_grad(moe_ctx *ctx, moe_layer *l) {
    if (l->flat_grads) {
        MOE_TRY(moe_op_fill(ctx, l->flat_grads, 0.0));
        clear_marks(l);
        return MOE_OK;
    }
    for (int i = 0; i < l->n_params; i++) {
        MOE_TRY(moe_op_fill(ctx, l->params[i].grad, 0.0));
        l->params[i].grad_zero_pending = 0;
    }
    for (int i = 0; i < l->n_children; i++) MOE_TRY(moe_layer_zero_grad(ctx, l->children[i]));
    return MOE_OK;
}

moe_status moe_layer_zero_grad_lazy(moe_ctx *ctx, moe_layer *l) {
    return l->flat_grads ? zero_flat(ctx, l) : moe_layer_zero_grad(ctx, l);
}

moe_status moe_layer_settle_grads(moe_ctx *ctx, moe_layer *l) {
    for (int i = 0; i < l->n_params; i++) {
        moe_param *p = &l->params[i];
        if (!p->grad_zero_pending) continue;
        if (p->grad) MOE_TRY(moe_op_fill(ctx, p->grad, 0.0));
        p->grad_zero_pending = 0;
    }
    for (int i = 0; i < l->n_children; i++) MOE_TRY(moe_layer_settle_grads(ctx, l->children[i]));
    return MOE_OK;
}

static moe_status settle_range(moe_ctx *ctx, moe_layer *l, const moe_storage *s, int64_t lo, int64_t hi) {
    for (int i = 0; i < l->n_params; i++) {
        moe_param *p = &l->params[i];
        if (!p->grad_zero_pending || !p->grad || p->grad->storage != s) continue;
        if (p->grad->offset >= hi || p->grad->offset + moe_tensor_numel(p->grad) <= lo) continue;
        MOE_TRY(moe_op_fill(ctx, p->grad, 0.0));
        p->grad_zero_pending = 0;
    }
    for (int i = 0; i < l->n_children; i++) MOE_TRY(settle_range(ctx, l->children[i], s, lo, hi));
    return MOE_OK;
}

moe_status moe_layer_settle_grads_range(moe_ctx *ctx, moe_layer *l, const moe_storage *s, int64_t lo, int64_t hi) {
    return settle_range(ctx, l, s, lo, hi);
}

float moe_param_grad_beta(const moe_param *p) { return p->grad_zero_pending ? 0.0f : 1.0f; }
void moe_param_grad_written(moe_param *p) { p->grad_zero_pending = 0; }
