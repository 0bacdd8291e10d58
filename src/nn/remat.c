/* Activations recomputed in the backward instead of kept (tape recompute,
 * tape.h). An output that the backward reads but that is cheap to make again
 * (a norm's, from the input the tape keeps anyway) gives its memory back once
 * the forward has used it: its storage is parked (tensor.h), and the first
 * read or write through any view of it (every op goes through
 * moe_tensor_data) runs the recipe into fresh memory. The recipe is the
 * forward's own op over the same inputs, so the bytes are the forward's.
 *
 * On a GPU both the free and the recompute are queued on the device's one
 * stream, so kernels queued before the free still read the old memory, and
 * both may run inside a CUDA graph capture. */
#include "layer.h"

#include <stdlib.h>

typedef struct {
    moe_storage_park park;   /* first: the storage's hook points here */
    moe_ctx *ctx;            /* where the recipe runs */
    moe_remat_fn fn;
    void *arg;
    void (*free_arg)(void *arg);
    /* the parked tensor's header: the recipe writes through one like it */
    int64_t offset, shape[MOE_MAX_DIMS], stride[MOE_MAX_DIMS];
    int ndim;
    moe_dtype dtype;
} remat;

static void remat_free(remat *r) {
    if (r->free_arg) r->free_arg(r->arg);
    free(r);
}

static moe_status restore(moe_storage *s, moe_storage_park *p) {
    remat *r = (remat *)p;
    if (s->data) return MOE_OK;
    void *data = s->alloc->alloc(s->alloc, s->nbytes);
    if (!data) return moe_error_context(moe_last_status(), "recomputing an activation for the backward");
    s->data = data;
    moe_tensor *out = moe_tensor_from_storage(s, r->offset, r->dtype, r->ndim, r->shape, r->stride);
    /* the recipe writes the memory: it must not find it parked and come back here */
    s->park = NULL;
    moe_status st = out ? r->fn(r->ctx, out, r->arg) : moe_last_status();
    moe_tensor_release(out);
    if (st != MOE_OK) {   /* parked again: a later access may try once more */
        s->alloc->free(s->alloc, s->data, s->nbytes);
        s->data = NULL;
        s->park = p;
        return moe_error_context(st, "recomputing an activation for the backward");
    }
    remat_free(r);   /* the inputs go now: nothing recomputes twice */
    return MOE_OK;
}

static void destroy(moe_storage_park *p) { remat_free((remat *)p); }

moe_status moe_remat_park(moe_ctx *ctx, moe_tensor *t, moe_remat_fn fn, void *arg, void (*free_arg)(void *),
                          int *parked) {
    *parked = 0;
    moe_storage *s = t ? t->storage : NULL;
    /* only memory this code may give back and take again: an allocator's, not
     * parked already, and t's alone (a view over a larger buffer keeps it) */
    if (!s || !s->alloc || !s->data || s->park || s->release || !s->nbytes ||
        (size_t)moe_tensor_numel(t) * moe_dtype_size(t->dtype) != s->nbytes || t->offset != 0 ||
        !moe_tensor_is_contiguous(t)) {
        if (free_arg) free_arg(arg);
        return MOE_OK;
    }
    remat *r = calloc(1, sizeof *r);
    if (!r) {
        if (free_arg) free_arg(arg);
        return moe_error(MOE_ERR_OOM, "out of host memory parking an activation");
    }
    r->park.restore = restore;
    r->park.destroy = destroy;
    r->ctx = ctx;
    r->fn = fn;
    r->arg = arg;
    r->free_arg = free_arg;
    r->offset = t->offset;
    r->ndim = t->ndim;
    r->dtype = t->dtype;
    for (int i = 0; i < t->ndim; i++) { r->shape[i] = t->shape[i]; r->stride[i] = t->stride[i]; }
    s->park = &r->park;
    s->alloc->free(s->alloc, s->data, s->nbytes);
    s->data = NULL;
    *parked = 1;
    return MOE_OK;
}

int moe_remat_is_parked(const moe_tensor *t) {
    return t && t->storage && !t->storage->data && t->storage->nbytes && t->storage->park &&
           t->storage->park->restore == restore;
}

/* ---- a layer's output over one input (the norms', the linears') ---- */

static void layer_arg_free(void *arg) {
    moe_remat_layer_arg *a = arg;
    moe_layer_release(a->l);
    moe_tensor_release(a->x);
    free(a);
}

moe_status moe_remat_layer_output(moe_ctx *ctx, moe_tensor *y, moe_remat_fn fn, moe_layer *l, moe_tensor *x,
                                  int64_t i, float f) {
    moe_remat_layer_arg *a = malloc(sizeof *a);
    if (!a) return moe_error(MOE_ERR_OOM, "out of host memory");
    moe_layer_retain(l);
    moe_tensor_retain(x);
    *a = (moe_remat_layer_arg){l, x, i, f};
    int parked;
    return moe_remat_park(ctx, y, fn, a, layer_arg_free, &parked);
}
