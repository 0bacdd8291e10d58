/* ops.c: argument checking helpers and the memory ops (copy, fill, random
 * fills, to, contiguous). The math ops are in ops_math.c, the layer-level ones
 * (norms, rope, attention, loss, optimiser) in ops_nn.c. */
#include "ops_internal.h"

#include <stdio.h>
#include <string.h>

/* ---- helpers ---- */

moe_status ops_nonnull(const char *op, const char *name, const void *p) {
    if (!p) return moe_error(MOE_ERR_ARG, "%s: %s is NULL, expected a tensor", op, name);
    return MOE_OK;
}

moe_status ops_check(const char *op, const ops_arg *floats, int nf, const ops_arg *indices, int ni) {
    for (int i = 0; i < nf; i++) MOE_TRY(ops_nonnull(op, floats[i].name, floats[i].t));
    for (int i = 0; i < ni; i++) MOE_TRY(ops_nonnull(op, indices[i].name, indices[i].t));
    /* parked parameter memory (tensor.h) comes back here, where its failure can be told */
    for (int i = 0; i < nf; i++) MOE_TRY(moe_tensor_ready(floats[i].t));
    const ops_arg *ref = nf ? &floats[0] : ni ? &indices[0] : NULL;
    if (!ref) return MOE_OK;
    if (nf) {
        moe_dtype dt = floats[0].t->dtype;
        if (!moe_dtype_is_float(dt))
            return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected a float dtype", op, floats[0].name,
                             moe_dtype_name(dt));
        for (int i = 1; i < nf; i++)
            if (floats[i].t->dtype != dt)
                return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected %s (the dtype of %s)", op,
                                 floats[i].name, moe_dtype_name(floats[i].t->dtype), moe_dtype_name(dt),
                                 floats[0].name);
    }
    for (int i = 0; i < ni; i++)
        if (indices[i].t->dtype != MOE_I64)
            return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s, expected i64", op, indices[i].name,
                             moe_dtype_name(indices[i].t->dtype));
    for (int k = 0; k < nf + ni; k++) {
        const ops_arg *a = k < nf ? &floats[k] : &indices[k - nf];
        if (!moe_device_eq(a->t->device, ref->t->device)) {
            char b1[16], b2[16];
            return moe_error(MOE_ERR_DEVICE, "%s: %s is on %s, expected %s (the device of %s)", op, a->name,
                             moe_device_str(a->t->device, b1, sizeof b1),
                             moe_device_str(ref->t->device, b2, sizeof b2), ref->name);
        }
    }
    return MOE_OK;
}

moe_status ops_out(const char *op, const char *name, const moe_tensor *t) {
    /* an output is about to be written: its index bound and host value (tensor.h) no longer hold */
    if (t) moe_tensor_mark_written((moe_tensor *)t);
    MOE_TRY(moe_tensor_ready(t));
    if (!moe_tensor_is_contiguous(t)) {
        char b[128];
        return moe_error(MOE_ERR_ARG, "%s: output %s (shape %s) must be contiguous, got a strided view", op, name,
                         OPS_SHAPE(t, b));
    }
    return MOE_OK;
}

moe_status ops_same_shape(const char *op, const char *na, const moe_tensor *a, const char *nb,
                          const moe_tensor *b) {
    if (!moe_tensor_same_shape(a, b)) {
        char s1[128], s2[128];
        return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected %s (the shape of %s)", op, na,
                         OPS_SHAPE(a, s1), OPS_SHAPE(b, s2), nb);
    }
    return MOE_OK;
}

moe_status ops_shape_is(const char *op, const char *name, const moe_tensor *t, int ndim, const int64_t *shape,
                        const char *why) {
    int ok = t->ndim == ndim;
    for (int i = 0; ok && i < ndim; i++) ok = t->shape[i] == shape[i];
    if (!ok) {
        char s1[128], s2[128];
        return moe_error(MOE_ERR_SHAPE, "%s: %s has shape %s, expected %s%s%s%s", op, name, OPS_SHAPE(t, s1),
                         moe_shape_str_raw(ndim, shape, s2, sizeof s2), why ? " (" : "", why ? why : "",
                         why ? ")" : "");
    }
    return MOE_OK;
}

moe_status ops_backend(moe_ctx *ctx, const char *op, moe_device dev, const moe_backend **be) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "%s: ctx is NULL", op);
    if (dev.type < 0 || dev.type >= MOE_NUM_DEVICE_TYPES)
        return moe_error(MOE_ERR_DEVICE, "%s: unknown device type %d", op, dev.type);
    *be = ctx->backends[dev.type];
    if (!*be) {
        char b[16];
        return moe_error(MOE_ERR_DEVICE, "%s: no backend is installed for %s", op, moe_device_str(dev, b, sizeof b));
    }
    return MOE_OK;
}

moe_status ops_unsupported(const char *op, const moe_backend *be) {
    return moe_error(MOE_ERR_DEVICE, "%s is not supported on %s", op, be->name);
}

int64_t ops_rows(const moe_tensor *t) {
    int64_t r = 1;
    for (int i = 0; i < t->ndim - 1; i++) r *= t->shape[i];
    return r;
}

int64_t ops_last(const moe_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }

moe_status ops_contig(moe_ctx *ctx, const moe_tensor *t, moe_tensor **out) {
    *out = NULL;
    if (!t) return MOE_OK;
    if (moe_tensor_is_contiguous(t)) {
        moe_tensor_retain((moe_tensor *)t);
        *out = (moe_tensor *)t;
        return MOE_OK;
    }
    moe_tensor *c = moe_tensor_new(ctx, t->dtype, t->ndim, t->shape, t->device);
    if (!c) return moe_last_status() ? moe_last_status() : MOE_ERR_OOM;
    moe_status s = moe_op_copy(ctx, c, t);
    if (s != MOE_OK) { moe_tensor_release(c); return s; }
    *out = c;
    return MOE_OK;
}

/* ---- memory ---- */

/* Integer values uploaded from the host give the device tensor their bound
 * (tensor.h) when none is negative: the host reads them in microseconds, where
 * a device range check in each index op (the embedding's forward and backward,
 * every training step) costs a stream synchronisation. */
static void bound_from_host(moe_tensor *dst, const moe_tensor *src) {
    if (src->dtype != dst->dtype || (dst->dtype != MOE_I64 && dst->dtype != MOE_I32) ||
        !moe_tensor_is_contiguous(src))
        return;
    int64_t n = moe_tensor_numel(src), mx = -1;
    if (src->dtype == MOE_I64) {
        const int64_t *v = (const int64_t *)moe_tensor_data((moe_tensor *)src);
        for (int64_t i = 0; i < n; i++) {
            if (v[i] < 0) return;
            if (v[i] > mx) mx = v[i];
        }
    } else {
        const int32_t *v = (const int32_t *)moe_tensor_data((moe_tensor *)src);
        for (int64_t i = 0; i < n; i++) {
            if (v[i] < 0) return;
            if (v[i] > mx) mx = v[i];
        }
    }
    if (mx < INT64_MAX) moe_tensor_set_index_bound(dst, mx + 1);
}

/* The element of a one-element tensor as dst's dtype stores it */
static double stored_as(moe_dtype dt, double v) {
    uint64_t b = 0;
    moe_dtype_store(dt, &b, v);
    return moe_dtype_load(dt, &b);
}

/* A one-element copy keeps the value known to the host (tensor.h): read from a
 * host source, or carried from a device source that had one. */
void ops_carry_host_value(moe_tensor *dst, const moe_tensor *src) {
    if (moe_tensor_numel(dst) != 1 || dst->device.type == MOE_CPU) return;
    double v;
    if (src->device.type == MOE_CPU) v = moe_dtype_load(src->dtype, (const char *)moe_tensor_data((moe_tensor *)src));
    else if (!moe_tensor_host_value(src, &v)) return;
    moe_tensor_set_host_value(dst, stored_as(dst->dtype, v));
}

moe_status moe_op_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src) {
    MOE_TRY(ops_nonnull("copy", "dst", dst));
    MOE_TRY(ops_nonnull("copy", "src", src));
    MOE_TRY(moe_tensor_ready(dst));   /* parked memory back first (tensor.h) */
    MOE_TRY(moe_tensor_ready(src));
    moe_tensor_mark_written(dst);   /* see tensor.h */
    if (moe_tensor_numel(dst) != moe_tensor_numel(src)) {
        char a[128], b[128];
        return moe_error(MOE_ERR_SHAPE, "copy: dst has shape %s (%lld elements), src has shape %s (%lld elements); "
                         "expected the same number of elements", OPS_SHAPE(dst, a), (long long)moe_tensor_numel(dst),
                         OPS_SHAPE(src, b), (long long)moe_tensor_numel(src));
    }
    if (moe_tensor_numel(dst) == 0) return MOE_OK;
    if (dst->device.type == MOE_CPU && src->device.type == MOE_CPU) {
        const moe_backend *be = ctx ? ctx->backends[MOE_CPU] : NULL;
        if (be && be->copy) return be->copy(ctx, dst, src);
        return moe_tensor_copy_cpu(dst, src);
    }
    /* the non-CPU side's backend does the transfer (dst's when both are devices) */
    moe_device dev = dst->device.type != MOE_CPU ? dst->device : src->device;
    const moe_backend *be;
    OPS_ENTRY(ctx, "copy", dev, copy, be);
    moe_status s = be->copy(ctx, dst, src);
    if (s == MOE_OK && src->device.type == MOE_CPU) bound_from_host(dst, src);
    if (s == MOE_OK) ops_carry_host_value(dst, src);
    return s;
}

moe_status moe_op_read_start(moe_ctx *ctx, const moe_tensor *const *ts, int n, moe_read *r) {
    if (!r) return moe_error(MOE_ERR_ARG, "read_start: no read record given");
    memset(r, 0, sizeof *r);
    if (!ts || n < 1 || n > MOE_READ_MAX)
        return moe_error(MOE_ERR_ARG, "read_start: %d tensors, expected 1 to %d", n, MOE_READ_MAX);
    for (int i = 0; i < n; i++) {
        if (!ts[i]) return moe_error(MOE_ERR_ARG, "read_start: tensor %d is NULL", i + 1);
        MOE_TRY(moe_tensor_ready(ts[i]));
        if (moe_tensor_numel(ts[i]) != 1)
            return moe_error(MOE_ERR_SHAPE, "read_start: tensor %d has %lld elements, expected one", i + 1,
                             (long long)moe_tensor_numel(ts[i]));
        if (!moe_device_eq(ts[i]->device, ts[0]->device))
            return moe_error(MOE_ERR_DEVICE, "read_start: tensor %d is on another device than the first", i + 1);
        if (moe_dtype_size(ts[i]->dtype) > 8)
            return moe_error(MOE_ERR_DTYPE, "read_start: tensor %d has dtype %s, wider than 8 bytes", i + 1,
                             moe_dtype_name(ts[i]->dtype));
        r->dtype[i] = ts[i]->dtype;
    }
    r->n = n;
    r->dev = ts[0]->device;
    const moe_backend *be = ctx && (unsigned)r->dev.type < MOE_NUM_DEVICE_TYPES ? ctx->backends[r->dev.type] : NULL;
    if (r->dev.type != MOE_CPU && be && be->read_start) return be->read_start(ctx, ts, n, r);
    for (int i = 0; i < n; i++) {
        moe_tensor *h = moe_op_to(ctx, (moe_tensor *)ts[i], MOE_DEVICE_CPU, MOE_F64);
        if (!h) return moe_last_status();
        r->value[i] = ((const double *)moe_tensor_data(h))[0];
        moe_tensor_release(h);
    }
    r->done = 1;
    return MOE_OK;
}

moe_status moe_op_read_finish(moe_ctx *ctx, moe_read *r) {
    if (!r || r->n < 1) return moe_error(MOE_ERR_ARG, "read_finish: the read was not started");
    if (r->done) return MOE_OK;
    if (!ctx || (unsigned)r->dev.type >= MOE_NUM_DEVICE_TYPES)
        return moe_error(MOE_ERR_ARG, "read_finish: no context, or a read record that no read_start filled");
    const moe_backend *be = ctx->backends[r->dev.type];
    if (!be || !be->read_finish)
        return moe_error(MOE_ERR_STATE, "read_finish: the read's device is no longer served by this context "
                         "(its backend was uninstalled?)");
    return be->read_finish(ctx, r);
}

moe_status moe_op_fill(moe_ctx *ctx, moe_tensor *t, double v) {
    MOE_TRY(ops_nonnull("fill", "t", t));
    MOE_TRY(moe_tensor_ready(t));   /* parked memory back first (tensor.h) */
    moe_tensor_mark_written(t);     /* see tensor.h */
    const moe_backend *be;
    OPS_ENTRY(ctx, "fill", t->device, fill, be);
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    if (moe_tensor_is_contiguous(t)) {
        moe_status s = be->fill(ctx, t, v);
        if (s == MOE_OK && moe_tensor_numel(t) == 1 && t->device.type != MOE_CPU)
            moe_tensor_set_host_value(t, stored_as(t->dtype, v));
        return s;
    }
    /* a strided view: fill a contiguous buffer and copy it in */
    moe_tensor *tmp = moe_tensor_new(ctx, t->dtype, t->ndim, t->shape, t->device);
    if (!tmp) return moe_last_status();
    moe_status s = be->fill(ctx, tmp, v);
    if (s == MOE_OK) s = moe_op_copy(ctx, t, tmp);
    moe_tensor_release(tmp);
    return s;
}

static moe_status check_random_fill(const char *op, moe_tensor *t) {
    MOE_TRY(ops_nonnull(op, "t", t));
    if (!moe_dtype_is_float(t->dtype))
        return moe_error(MOE_ERR_DTYPE, "%s: t has dtype %s, expected a float dtype", op, moe_dtype_name(t->dtype));
    return ops_out(op, "t", t);
}

moe_status moe_op_fill_randn(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std) {
    MOE_TRY(check_random_fill("fill_randn", t));
    const moe_backend *be;
    OPS_ENTRY(ctx, "fill_randn", t->device, fill_randn, be);
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    return be->fill_randn(ctx, t, key, offset, mean, std);
}

moe_status moe_op_fill_rand(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi) {
    MOE_TRY(check_random_fill("fill_rand", t));
    const moe_backend *be;
    OPS_ENTRY(ctx, "fill_rand", t->device, fill_rand, be);
    if (moe_tensor_numel(t) == 0) return MOE_OK;
    return be->fill_rand(ctx, t, key, offset, lo, hi);
}

moe_tensor *moe_op_to(moe_ctx *ctx, moe_tensor *t, moe_device dev, moe_dtype dt) {
    if (ops_nonnull("to", "t", t) != MOE_OK) return NULL;
    if ((unsigned)dt >= MOE_NUM_DTYPES) { moe_error(MOE_ERR_DTYPE, "to: unknown dtype %d", (int)dt); return NULL; }
    moe_tensor *r = moe_tensor_new(ctx, dt, t->ndim, t->shape, dev);
    if (!r) return NULL;
    if (moe_op_copy(ctx, r, t) != MOE_OK) { moe_tensor_release(r); return NULL; }
    return r;
}

moe_tensor *moe_op_contiguous(moe_ctx *ctx, moe_tensor *t) {
    if (ops_nonnull("contiguous", "t", t) != MOE_OK) return NULL;
    moe_tensor *r = NULL;
    if (ops_contig(ctx, t, &r) != MOE_OK) return NULL;
    return r;
}
