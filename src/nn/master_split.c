/* The f32 master weights kept as two 16-bit planes while an optimiser trains
 * them under bf16 precision (ops.h, moe_master_hi): the high plane is the bf16
 * compute copy the layers already read, the low plane (i16) holds the rest of
 * each value's bits, and the f32 buffer's memory is given back. The master
 * stays exact; what changes is where its bits live:
 * - 2 bytes a parameter less memory (the f32 buffer's 4 against the low
 *   plane's 2);
 * - 2 bytes a parameter less traffic in every AdamW step, which reads and
 *   writes the two planes instead of the f32 value and the compute copy.
 *
 * The values come back whenever anything touches the f32 buffer: its storage
 * is parked (tensor.h), so the first read or write through any view of it
 * (ops, Lua, checkpoints) rebuilds it from the planes (a join). The next
 * optimiser step splits the values again, so whatever was written to them
 * in between is what trains on. A training loop that leaves the parameters
 * alone splits once and never joins (the counts are kept, for tests and
 * benchmarks). */
#include "layer.h"

#include <stdlib.h>

#ifdef MOELAB_CUDA
#include "../ops/cuda/moe_cuda.h"
#endif

struct moe_master_split {
    moe_storage_park park;   /* first: the values storage's hook points here */
    int refs;                /* the root layer's and the values storage's */
    moe_ctx *ctx;            /* the context of the split: restores run there */
    moe_tensor *hi;          /* the compute copy (retained) */
    moe_tensor *lo;          /* the low plane, i16 */
    int parked;              /* the values' memory is given back; hi and lo hold the master */
    uint64_t splits, joins;
};

static void state_unref(moe_master_split *st) {
    if (!st || --st->refs > 0) return;
    moe_tensor_release(st->hi);
    moe_tensor_release(st->lo);
    free(st);
}

static int capturing(moe_ctx *ctx, moe_device dev) {
#ifdef MOELAB_CUDA
    return dev.type == MOE_CUDA && moe_cuda_capturing(ctx, dev.index);
#else
    (void)ctx; (void)dev;
    return 0;
#endif
}

/* The park hook: the values' memory again, rebuilt from the planes. */
static moe_status restore(moe_storage *s, moe_storage_park *p) {
    moe_master_split *st = (moe_master_split *)p;
    if (!st->parked || s->data) return MOE_OK;
    if (capturing(st->ctx, s->device))
        return moe_error(MOE_ERR_STATE, "the f32 parameters were read during a CUDA graph capture while the "
                         "optimiser keeps them split (read them before capturing)");
    void *data = s->alloc->alloc(s->alloc, s->nbytes);
    if (!data) return moe_error_context(moe_last_status(), "restoring the f32 parameters from their bf16 planes");
    s->data = data;
    int64_t n = moe_tensor_numel(st->hi);
    moe_tensor *vals = moe_tensor_from_storage(s, 0, MOE_F32, 1, &n, NULL);
    moe_status r = vals ? moe_op_master_join(st->ctx, vals, st->hi, st->lo) : moe_last_status();
    moe_tensor_release(vals);
    if (r != MOE_OK) {   /* back to parked: the planes still hold the master */
        s->alloc->free(s->alloc, s->data, s->nbytes);
        s->data = NULL;
        return moe_error_context(r, "restoring the f32 parameters from their bf16 planes");
    }
    st->parked = 0;
    st->joins++;
    return MOE_OK;
}

static void destroy(moe_storage_park *p) { state_unref((moe_master_split *)p); }

moe_status moe_layer_master_split(moe_ctx *ctx, moe_layer *root, int *split) {
    *split = 0;
    moe_tensor *vals = root ? root->flat_values : NULL;
    if (!vals || !root->flat_compute || root->compute_dtype != MOE_BF16) return MOE_OK;
    moe_storage *s = vals->storage;
    /* the whole storage is the values (flatten makes it so); memory from elsewhere stays as it is */
    if (!s->alloc || vals->offset != 0 || (size_t)moe_tensor_numel(vals) * 4 != s->nbytes ||
        moe_tensor_numel(root->flat_compute) != moe_tensor_numel(vals))
        return MOE_OK;
    moe_master_split *st = root->master;
    if (st && st->parked) { *split = 1; return MOE_OK; }
    if (capturing(ctx, vals->device))
        return moe_error(MOE_ERR_STATE, "AdamW: the f32 parameters must be split into their bf16 planes before a "
                         "CUDA graph capture (the optimiser's prepare does it), not inside one");
    if (!st) {
        if (s->park) return MOE_OK;   /* someone else's parked memory */
        st = calloc(1, sizeof *st);
        if (!st) return moe_error(MOE_ERR_OOM, "out of host memory splitting the master");
        int64_t n = moe_tensor_numel(vals);
        moe_tensor *lo = moe_tensor_new(ctx, MOE_I16, 1, &n, vals->device);
        if (!lo) { free(st); return moe_error_context(moe_last_status(), "splitting the master"); }
        st->park.restore = restore;
        st->park.destroy = destroy;
        st->refs = 2;
        st->lo = lo;
        st->hi = root->flat_compute;
        moe_tensor_retain(st->hi);
        s->park = &st->park;
        root->master = st;
    }
    MOE_TRY(moe_op_master_split(ctx, st->hi, st->lo, vals));
    st->ctx = ctx;
    /* the kernels queued on the stream before the free still see the memory (one stream a device) */
    s->alloc->free(s->alloc, s->data, s->nbytes);
    s->data = NULL;
    st->parked = 1;
    st->splits++;
    *split = 1;
    return MOE_OK;
}

moe_status moe_layer_master_join(moe_ctx *ctx, moe_layer *root) {
    (void)ctx;
    moe_master_split *st = root ? root->master : NULL;
    if (!st || !st->parked) return MOE_OK;
    return moe_tensor_ready(root->flat_values);
}

moe_status moe_layer_master_drop(moe_ctx *ctx, moe_layer *root) {
    moe_master_split *st = root ? root->master : NULL;
    if (!st) return MOE_OK;
    MOE_TRY(moe_layer_master_join(ctx, root));
    root->flat_values->storage->park = NULL;
    root->master = NULL;
    st->refs--;        /* the storage's */
    state_unref(st);   /* the layer's */
    return MOE_OK;
}

void moe_layer_master_release(moe_layer *root) {
    /* the storage keeps its reference: views of a parked buffer can still restore it */
    if (root && root->master) state_unref(root->master);
    if (root) root->master = NULL;
}

moe_tensor *moe_layer_master_lo(const moe_layer *root) {
    return root && root->master && root->master->parked ? root->master->lo : NULL;
}

void moe_layer_master_counts(const moe_layer *root, int *parked, uint64_t *splits, uint64_t *joins) {
    const moe_master_split *st = root ? root->master : NULL;
    *parked = st ? st->parked : 0;
    *splits = st ? st->splits : 0;
    *joins = st ? st->joins : 0;
}
