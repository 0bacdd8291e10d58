/* Mixed precision over the flat buffers: f32 master values, a bf16 compute
 * copy laid out exactly like them (same element offsets; each value rounded
 * with ties away from zero, ops.h moe_master_hi, so that the copy is the same
 * whether an optimiser keeps the master split or not), bf16 gradients.
 * Keeping the f32 values as "the parameters" means every reader and writer
 * of parameters (optimiser, checkpoints, Hugging Face loading, LoRA merges)
 * stays exact; only the layers' arithmetic sees bf16. */
#include "layer.h"

#include <stdlib.h>

/* Visits every parameter of the tree in place (not copies, unlike collect). */
static void each_param(moe_layer *l, void (*fn)(moe_param *p, void *arg), void *arg) {
    for (int i = 0; i < l->n_params; i++) fn(&l->params[i], arg);
    for (int c = 0; c < l->n_children; c++) each_param(l->children[c], fn, arg);
}

static void drop_compute(moe_param *p, void *arg) {
    (void)arg;
    moe_tensor_release(p->compute);
    p->compute = NULL;
}

typedef struct {
    moe_tensor *values, *compute, *grads;   /* flat buffers */
    moe_dtype dt;
    moe_status st;
} attach_ctx;

static void attach(moe_param *p, void *arg) {
    attach_ctx *a = arg;
    if (a->st != MOE_OK) return;
    int64_t off = p->value->offset - a->values->offset;
    moe_tensor_release(p->compute);
    p->compute = moe_tensor_from_storage(a->compute->storage, a->compute->offset + off, a->dt, p->value->ndim,
                                         p->value->shape, NULL);
    if (!p->compute) { a->st = moe_last_status(); return; }
    moe_layer_repoint(p->grad, a->grads->storage, a->grads->offset + off, a->dt);
}

static void detach_grad(moe_param *p, void *arg) {
    attach_ctx *a = arg;
    moe_layer_repoint(p->grad, a->grads->storage, a->grads->offset + (p->value->offset - a->values->offset), MOE_F32);
}

moe_status moe_layer_set_compute_dtype(moe_ctx *ctx, moe_layer *l, moe_dtype dt) {
    if (!l) return moe_error(MOE_ERR_ARG, "set_precision: layer is nil");
    if (dt != MOE_F32 && dt != MOE_BF16)
        return moe_error(MOE_ERR_DTYPE, "set_precision: compute dtype must be f32 or bf16, got %s", moe_dtype_name(dt));
    if (!l->flat_values)
        return moe_error(MOE_ERR_STATE, "set_precision: the layer does not own flat parameter buffers (use the model's root)");
    if (dt == (l->flat_compute ? l->compute_dtype : MOE_F32)) return MOE_OK;
    MOE_TRY(moe_layer_master_drop(ctx, l));   /* the values whole again before the compute copy changes */
    moe_tensor *vals = l->flat_values;
    int64_t shape[1] = {moe_tensor_numel(vals)};
    if (dt == MOE_F32) {
        moe_tensor *g = moe_tensor_new(ctx, MOE_F32, 1, shape, vals->device);
        moe_status s = g ? moe_op_fill(ctx, g, 0.0) : moe_last_status();
        if (s != MOE_OK) { moe_tensor_release(g); return moe_error_context(s, "set_precision f32"); }
        attach_ctx a = {vals, NULL, g, MOE_F32, MOE_OK};
        each_param(l, detach_grad, &a);
        each_param(l, drop_compute, NULL);
        moe_tensor_release(l->flat_grads);
        moe_tensor_release(l->flat_compute);
        l->flat_grads = g;
        l->flat_compute = NULL;
        l->compute_dtype = MOE_F32;
        return MOE_OK;
    }
    if (vals->device.type != MOE_CUDA)
        return moe_error(MOE_ERR_DEVICE, "the model is on the cpu; bf16 compute needs a CUDA device "
                         "(the CPU backend computes in f32); move the model first (model:to(\"cuda\"))");
    moe_tensor *c = moe_tensor_new(ctx, dt, 1, shape, vals->device);
    moe_tensor *g = c ? moe_tensor_new(ctx, dt, 1, shape, vals->device) : NULL;
    /* (rounded as the split master's high plane, ties away from zero: the same copy either way) */
    moe_status s = c && g ? moe_op_master_split(ctx, c, NULL, vals) : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, g, 0.0);
    if (s != MOE_OK) {
        moe_tensor_release(c); moe_tensor_release(g);
        return moe_error_context(s, "set_precision bf16");
    }
    attach_ctx a = {vals, c, g, dt, MOE_OK};
    each_param(l, attach, &a);
    if (a.st != MOE_OK) {   /* undo: back to f32 gradients, no compute copies */
        attach_ctx b = {vals, NULL, l->flat_grads, MOE_F32, MOE_OK};
        each_param(l, detach_grad, &b);
        each_param(l, drop_compute, NULL);
        moe_tensor_release(c); moe_tensor_release(g);
        return moe_error_context(a.st, "set_precision bf16");
    }
    moe_tensor_release(l->flat_grads);
    l->flat_grads = g;
    l->flat_compute = c;
    l->compute_dtype = dt;
    return MOE_OK;
}

moe_status moe_layer_refresh_compute(moe_ctx *ctx, moe_layer *l) {
    if (!l || !l->flat_compute) return MOE_OK;
    MOE_TRY(moe_layer_master_join(ctx, l));   /* (the next split takes the values as they are then) */
    return moe_op_master_split(ctx, l->flat_compute, NULL, l->flat_values);
}
