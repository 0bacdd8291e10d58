/* Embedding: ids (i64, any shape) -> rows of a [vocab, dim] table. */
#include "layer.h"

#include <stdio.h>

static moe_status embedding_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_layer *l = e->self;
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    if (!g) return moe_last_status();
    moe_status s = moe_op_embedding_backward(ctx, l->params[0].grad, g, e->in[0]);
    moe_tensor_release(g);
    (void)gin;   /* ids have no gradient */
    return s;
}

static moe_status embedding_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor **y) {
    moe_tensor *table = moe_param_w(&l->params[0]);
    if (ids->dtype != MOE_I64)
        return moe_error(MOE_ERR_DTYPE, "ids must be i64, got %s", moe_dtype_name(ids->dtype));
    if (ids->ndim >= MOE_MAX_DIMS) return moe_error(MOE_ERR_SHAPE, "ids have too many dims (%d)", ids->ndim);
    int64_t shape[MOE_MAX_DIMS];
    for (int i = 0; i < ids->ndim; i++) shape[i] = ids->shape[i];
    shape[ids->ndim] = table->shape[1];
    moe_tensor *out = moe_tensor_new(ctx, table->dtype, ids->ndim + 1, shape, table->device);
    if (!out) return moe_last_status();
    moe_status s = moe_op_embedding(ctx, out, table, ids);
    if (s == MOE_OK && tape
        && !moe_tape_record(tape, "embedding", embedding_backward, l, moe_layer_retain_v, moe_layer_release_v,
                            1, &ids, 1, &out))
        s = moe_last_status();
    if (s != MOE_OK) { moe_tensor_release(out); return s; }
    *y = out;
    return MOE_OK;
}

static void embedding_describe(const moe_layer *l, char *buf, size_t n) {
    snprintf(buf, n, "Embedding(%lld, %lld)", (long long)l->params[0].value->shape[0],
             (long long)l->params[0].value->shape[1]);
}

static const moe_layer_vtable embedding_vt = {"Embedding", embedding_forward, embedding_describe, NULL, NULL};

moe_layer *moe_embedding_new(moe_ctx *ctx, int64_t vocab, int64_t dim, moe_init *init) {
    if (vocab <= 0 || dim <= 0) {
        moe_error(MOE_ERR_ARG, "Embedding: vocab_size and dim must be positive, got %lld and %lld",
                  (long long)vocab, (long long)dim);
        return NULL;
    }
    moe_layer *l = moe_layer_alloc(&embedding_vt, 1, 0);
    if (!l) return NULL;
    int64_t shape[2] = {vocab, dim};
    moe_status s = moe_layer_init_param(l, 0, "weight", 2, shape);
    if (s == MOE_OK) s = moe_param_init_normal(ctx, &l->params[0], init, 1.0f);
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
