#include "tensor.h"
#include "context.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

moe_storage *moe_storage_new(moe_allocator *a, size_t nbytes) {
    moe_storage *s = calloc(1, sizeof *s);
    if (!s) { moe_error(MOE_ERR_OOM, "out of host memory for a storage header"); return NULL; }
    s->data = a->alloc(a, nbytes);
    if (!s->data) { free(s); return NULL; }
    s->refcount = 1;
    s->nbytes = nbytes;
    s->device = a->device;
    s->alloc = a;
    return s;
}

moe_storage *moe_storage_wrap(void *data, size_t nbytes, moe_device dev) {
    moe_storage *s = calloc(1, sizeof *s);
    if (!s) { moe_error(MOE_ERR_OOM, "out of host memory for a storage header"); return NULL; }
    s->refcount = 1;
    s->data = data;
    s->nbytes = nbytes;
    s->device = dev;
    return s;
}

moe_storage *moe_storage_wrap_owned(void *data, size_t nbytes, moe_device dev,
                                    void (*release)(void *release_arg), void *release_arg) {
    moe_storage *s = moe_storage_wrap(data, nbytes, dev);
    if (!s) { if (release) release(release_arg); return NULL; }
    s->release = release;
    s->release_arg = release_arg;
    return s;
}

/* A retain means a second header (a view, an alias) over this memory: from
 * now on no header's index bound over it is trusted (tensor.h). */
void moe_storage_retain(moe_storage *s) {
    if (!s) return;
    __atomic_add_fetch(&s->refcount, 1, __ATOMIC_RELAXED);
    __atomic_store_n(&s->aliased, 1, __ATOMIC_RELAXED);
}

void moe_storage_release(moe_storage *s) {
    if (!s) return;
    if (__atomic_sub_fetch(&s->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        if (s->alloc && s->data) s->alloc->free(s->alloc, s->data, s->nbytes);
        if (s->release) s->release(s->release_arg);
        if (s->park) s->park->destroy(s->park);
        free(s);
    }
}

int64_t moe_shape_numel(int ndim, const int64_t *shape) {
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) n *= shape[i];
    return n;
}

moe_status moe_shape_check(int ndim, const int64_t *shape) {
    if (ndim < 0 || ndim > MOE_MAX_DIMS)
        return moe_error(MOE_ERR_SHAPE, "a tensor has 0 to %d dims, got %d", MOE_MAX_DIMS, ndim);
    int64_t n = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return moe_error(MOE_ERR_SHAPE, "dim %d has negative size %lld", i, (long long)shape[i]);
        if (shape[i] > 0 && n > ((int64_t)1 << 48) / shape[i])
            return moe_error(MOE_ERR_SHAPE, "shape too large (more than 2^48 elements)");
        n *= shape[i];
    }
    return MOE_OK;
}

static void set_contiguous_strides(moe_tensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) { t->stride[i] = s; s *= t->shape[i]; }
}

static moe_tensor *header_new(moe_storage *s, int64_t offset, moe_dtype dt, int ndim, const int64_t *shape) {
    moe_tensor *t = calloc(1, sizeof *t);
    if (!t) { moe_error(MOE_ERR_OOM, "out of host memory for a tensor header"); return NULL; }
    t->refcount = 1;
    t->storage = s;
    t->offset = offset;
    t->ndim = ndim;
    t->dtype = dt;
    t->device = s->device;
    for (int i = 0; i < ndim; i++) t->shape[i] = shape[i];
    set_contiguous_strides(t);
    return t;
}

moe_tensor *moe_tensor_new(moe_ctx *ctx, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev) {
    if ((unsigned)dt >= MOE_NUM_DTYPES) { moe_error(MOE_ERR_DTYPE, "unknown dtype %d", (int)dt); return NULL; }
    if (moe_shape_check(ndim, shape) != MOE_OK) return NULL;
    moe_allocator *a = dev.type == MOE_CPU ? moe_cpu_allocator() : ctx ? moe_ctx_allocator(ctx, dev) : NULL;
    if (!a) {
        char buf[16];
        if (!ctx) moe_error(MOE_ERR_DEVICE, "no allocator for device %s", moe_device_str(dev, buf, sizeof buf));
        return NULL;
    }
    size_t nbytes = (size_t)moe_shape_numel(ndim, shape) * moe_dtype_size(dt);
    moe_storage *s = moe_storage_new(a, nbytes);
    if (!s) return NULL;
    moe_tensor *t = header_new(s, 0, dt, ndim, shape);
    if (!t) moe_storage_release(s);
    return t;
}

moe_tensor *moe_tensor_new_cpu(moe_dtype dt, int ndim, const int64_t *shape) {
    return moe_tensor_new(NULL, dt, ndim, shape, MOE_DEVICE_CPU);
}

moe_tensor *moe_tensor_like(moe_ctx *ctx, const moe_tensor *t) {
    return moe_tensor_new(ctx, t->dtype, t->ndim, t->shape, t->device);
}

moe_tensor *moe_tensor_from_storage(moe_storage *s, int64_t offset, moe_dtype dt, int ndim,
                                    const int64_t *shape, const int64_t *stride) {
    if (moe_shape_check(ndim, shape) != MOE_OK) return NULL;
    /* bounds: the largest reachable element must lie inside the storage */
    int64_t last = offset;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] == 0) { last = -1; break; }
        if (stride && stride[i] < 0) { moe_error(MOE_ERR_ARG, "negative strides are not supported"); return NULL; }
    }
    moe_tensor *t = header_new(s, offset, dt, ndim, shape);
    if (!t) return NULL;
    if (stride) for (int i = 0; i < ndim; i++) t->stride[i] = stride[i];
    if (last >= 0) {
        for (int i = 0; i < ndim; i++) last += (t->shape[i] - 1) * t->stride[i];
        if (offset < 0 || (size_t)(last + 1) * moe_dtype_size(dt) > s->nbytes) {
            free(t);
            moe_error(MOE_ERR_RANGE, "view reaches past the end of its storage (%zu bytes)", s->nbytes);
            return NULL;
        }
    }
    moe_storage_retain(s);
    return t;
}

void moe_tensor_retain(moe_tensor *t) { if (t) __atomic_add_fetch(&t->refcount, 1, __ATOMIC_RELAXED); }

void moe_tensor_release(moe_tensor *t) {
    if (!t) return;
    if (__atomic_sub_fetch(&t->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        moe_storage_release(t->storage);
        free(t);
    }
}

int64_t moe_tensor_numel(const moe_tensor *t) { return moe_shape_numel(t->ndim, t->shape); }
size_t moe_tensor_nbytes(const moe_tensor *t) { return (size_t)moe_tensor_numel(t) * moe_dtype_size(t->dtype); }

int moe_tensor_is_contiguous(const moe_tensor *t) {
    int64_t s = 1;
    for (int i = t->ndim - 1; i >= 0; i--) {
        if (t->shape[i] != 1 && t->stride[i] != s) return 0;
        s *= t->shape[i];
    }
    return 1;
}

int moe_tensor_same_shape(const moe_tensor *a, const moe_tensor *b) {
    if (a->ndim != b->ndim) return 0;
    for (int i = 0; i < a->ndim; i++) if (a->shape[i] != b->shape[i]) return 0;
    return 1;
}

moe_status moe_tensor_ready(const moe_tensor *t) {
    moe_storage *s = t ? t->storage : NULL;
    if (!s || s->data || !s->nbytes) return MOE_OK;
    if (!s->park) return moe_error(MOE_ERR_STATE, "a tensor's memory was given back and cannot be restored");
    return s->park->restore(s, s->park);
}

void *moe_tensor_data(const moe_tensor *t) {
    if (!t->storage->data && moe_tensor_ready(t) != MOE_OK) return NULL;
    return (char *)t->storage->data + t->offset * (int64_t)moe_dtype_size(t->dtype);
}

const char *moe_shape_str_raw(int ndim, const int64_t *shape, char *buf, size_t n) {
    size_t used = 0;
    used += (size_t)snprintf(buf, n, "[");
    for (int i = 0; i < ndim && used < n; i++)
        used += (size_t)snprintf(buf + used, n - used, i ? ", %lld" : "%lld", (long long)shape[i]);
    if (used < n) snprintf(buf + used, n - used, "]");
    return buf;
}

const char *moe_shape_str(const moe_tensor *t, char *buf, size_t n) {
    return moe_shape_str_raw(t->ndim, t->shape, buf, n);
}

int moe_tensor_dim(const moe_tensor *t, int dim) {
    int d = dim < 0 ? dim + t->ndim : dim;
    if (d < 0 || d >= t->ndim) {
        moe_error(MOE_ERR_RANGE, "dim %d out of range for a %d-dim tensor", dim, t->ndim);
        return -1;
    }
    return d;
}

static moe_tensor *view_of(moe_tensor *t) {
    moe_tensor *v = calloc(1, sizeof *v);
    if (!v) { moe_error(MOE_ERR_OOM, "out of host memory for a tensor header"); return NULL; }
    *v = *t;
    v->refcount = 1;
    moe_tensor_mark_written(v);     /* not inherited; the retain below voids t's too */
    moe_storage_retain(t->storage);
    return v;
}

void moe_tensor_set_host_value(moe_tensor *t, double v) {
    if (!t) return;
    int sole = t->storage && __atomic_load_n(&t->storage->refcount, __ATOMIC_RELAXED) == 1 &&
               !__atomic_load_n(&t->storage->aliased, __ATOMIC_RELAXED);
    t->host_known = sole && moe_tensor_numel(t) == 1;
    t->host_value = t->host_known ? v : 0.0;
}

void moe_tensor_set_index_bound(moe_tensor *t, int64_t bound) {
    if (!t) return;
    /* A bound is set right after the values were written (tensor.h). When this
     * header is the storage's only reference, the headers that once aliased it
     * are gone and cannot have written since: the storage counts as unaliased
     * again (a fixed input buffer refilled each step keeps taking bounds after
     * a forward made views of it). The host value, known from before, goes. */
    if (bound > 0 && t->storage && __atomic_load_n(&t->storage->refcount, __ATOMIC_RELAXED) == 1 &&
        __atomic_load_n(&t->storage->aliased, __ATOMIC_RELAXED)) {
        __atomic_store_n(&t->storage->aliased, 0, __ATOMIC_RELAXED);
        t->host_known = 0;
    }
    int sole = t->storage && __atomic_load_n(&t->storage->refcount, __ATOMIC_RELAXED) == 1 &&
               !__atomic_load_n(&t->storage->aliased, __ATOMIC_RELAXED);
    t->index_bound = bound > 0 && sole && (t->dtype == MOE_I64 || t->dtype == MOE_I32) ? bound : 0;
    t->slot_map = 0;
}

void moe_tensor_mark_slot_map(moe_tensor *t) {
    if (t) t->slot_map = t->index_bound > 0 && t->dtype == MOE_I32 && t->ndim == 2;
}

moe_tensor *moe_tensor_view(moe_tensor *t, int ndim, const int64_t *shape_in) {
    if (ndim < 0 || ndim > MOE_MAX_DIMS) { moe_error(MOE_ERR_SHAPE, "view: 0 to %d dims, got %d", MOE_MAX_DIMS, ndim); return NULL; }
    int64_t shape[MOE_MAX_DIMS];
    int infer = -1;
    int64_t known = 1;
    for (int i = 0; i < ndim; i++) {
        shape[i] = shape_in[i];
        if (shape[i] == -1) {
            if (infer >= 0) { moe_error(MOE_ERR_SHAPE, "view: only one dim may be -1"); return NULL; }
            infer = i;
        } else if (shape[i] < 0) {
            moe_error(MOE_ERR_SHAPE, "view: dim %d has negative size %lld", i, (long long)shape[i]);
            return NULL;
        } else known *= shape[i];
    }
    int64_t n = moe_tensor_numel(t);
    if (infer >= 0) {
        if (known == 0 || n % known) {
            char b[128];
            moe_error(MOE_ERR_SHAPE, "view: cannot infer -1 for %lld elements from shape %s",
                      (long long)n, moe_shape_str_raw(ndim, shape_in, b, sizeof b));
            return NULL;
        }
        shape[infer] = n / known;
    }
    if (moe_shape_numel(ndim, shape) != n) {
        char a[128], b[128];
        moe_error(MOE_ERR_SHAPE, "view: shape %s has %lld elements, tensor %s has %lld",
                  moe_shape_str_raw(ndim, shape, a, sizeof a), (long long)moe_shape_numel(ndim, shape),
                  moe_shape_str(t, b, sizeof b), (long long)n);
        return NULL;
    }
    if (!moe_tensor_is_contiguous(t)) {
        moe_error(MOE_ERR_STATE, "view: tensor is not contiguous (call contiguous() first)");
        return NULL;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    v->ndim = ndim;
    for (int i = 0; i < ndim; i++) v->shape[i] = shape[i];
    set_contiguous_strides(v);
    return v;
}

moe_tensor *moe_tensor_transpose(moe_tensor *t, int d0, int d1) {
    int a = moe_tensor_dim(t, d0), b = a < 0 ? -1 : moe_tensor_dim(t, d1);
    if (a < 0 || b < 0) return NULL;
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    int64_t s = v->shape[a]; v->shape[a] = v->shape[b]; v->shape[b] = s;
    s = v->stride[a]; v->stride[a] = v->stride[b]; v->stride[b] = s;
    return v;
}

moe_tensor *moe_tensor_permute(moe_tensor *t, const int *perm) {
    int seen[MOE_MAX_DIMS] = {0};
    for (int i = 0; i < t->ndim; i++) {
        if (perm[i] < 0 || perm[i] >= t->ndim || seen[perm[i]]) {
            moe_error(MOE_ERR_ARG, "permute: not a permutation of %d dims", t->ndim);
            return NULL;
        }
        seen[perm[i]] = 1;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    for (int i = 0; i < t->ndim; i++) { v->shape[i] = t->shape[perm[i]]; v->stride[i] = t->stride[perm[i]]; }
    return v;
}

moe_tensor *moe_tensor_narrow(moe_tensor *t, int dim, int64_t start, int64_t len) {
    int d = moe_tensor_dim(t, dim);
    if (d < 0) return NULL;
    if (start < 0 || len < 0 || start + len > t->shape[d]) {
        moe_error(MOE_ERR_RANGE, "narrow: [%lld, %lld) is outside dim %d of size %lld",
                  (long long)start, (long long)(start + len), d, (long long)t->shape[d]);
        return NULL;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    v->offset += start * t->stride[d];
    v->shape[d] = len;
    return v;
}

moe_tensor *moe_tensor_select(moe_tensor *t, int dim, int64_t index) {
    int d = moe_tensor_dim(t, dim);
    if (d < 0) return NULL;
    if (index < 0 || index >= t->shape[d]) {
        moe_error(MOE_ERR_RANGE, "select: index %lld out of range for dim %d of size %lld",
                  (long long)index, d, (long long)t->shape[d]);
        return NULL;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    v->offset += index * t->stride[d];
    for (int i = d; i < t->ndim - 1; i++) { v->shape[i] = t->shape[i + 1]; v->stride[i] = t->stride[i + 1]; }
    v->ndim--;
    return v;
}

moe_tensor *moe_tensor_unsqueeze(moe_tensor *t, int dim) {
    int d = dim < 0 ? dim + t->ndim + 1 : dim;
    if (d < 0 || d > t->ndim || t->ndim >= MOE_MAX_DIMS) {
        moe_error(MOE_ERR_RANGE, "unsqueeze: dim %d out of range for a %d-dim tensor", dim, t->ndim);
        return NULL;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    for (int i = t->ndim; i > d; i--) { v->shape[i] = t->shape[i - 1]; v->stride[i] = t->stride[i - 1]; }
    v->shape[d] = 1;
    v->stride[d] = d < t->ndim ? t->shape[d] * t->stride[d] : 1;
    v->ndim++;
    return v;
}

moe_tensor *moe_tensor_expand(moe_tensor *t, int ndim, const int64_t *shape) {
    if (ndim < t->ndim || ndim > MOE_MAX_DIMS) {
        moe_error(MOE_ERR_SHAPE, "expand: cannot expand %d dims to %d", t->ndim, ndim);
        return NULL;
    }
    moe_tensor *v = view_of(t);
    if (!v) return NULL;
    int lead = ndim - t->ndim;
    for (int i = 0; i < ndim; i++) {
        int64_t src = i >= lead ? t->shape[i - lead] : 1;
        int64_t st = i >= lead ? t->stride[i - lead] : 0;
        if (src != shape[i] && src != 1) {
            char a[128], b[128];
            moe_error(MOE_ERR_SHAPE, "expand: shape %s cannot broadcast to %s",
                      moe_shape_str(t, a, sizeof a), moe_shape_str_raw(ndim, shape, b, sizeof b));
            moe_tensor_release(v);
            return NULL;
        }
        v->shape[i] = shape[i];
        v->stride[i] = src == 1 && shape[i] != 1 ? 0 : st;
    }
    v->ndim = ndim;
    return v;
}

void moe_tensor_foreach(const moe_tensor *t, void (*fn)(void *elem, int64_t i, void *arg), void *arg) {
    int64_t n = moe_tensor_numel(t);
    if (n == 0) return;
    size_t es = moe_dtype_size(t->dtype);
    char *base = moe_tensor_data(t);
    int64_t idx[MOE_MAX_DIMS] = {0};
    int64_t off = 0;
    for (int64_t i = 0; i < n; i++) {
        fn(base + off * (int64_t)es, i, arg);
        for (int d = t->ndim - 1; d >= 0; d--) {
            if (++idx[d] < t->shape[d]) { off += t->stride[d]; break; }
            off -= (idx[d] - 1) * t->stride[d];
            idx[d] = 0;
        }
    }
}

struct copy_arg { const moe_tensor *src; char *sbase; size_t ses; int64_t idx[MOE_MAX_DIMS]; int64_t off; moe_dtype ddt; };

static void copy_one(void *elem, int64_t i, void *varg) {
    struct copy_arg *c = varg;
    (void)i;
    const moe_tensor *s = c->src;
    moe_dtype_store(c->ddt, elem, moe_dtype_load(s->dtype, c->sbase + c->off * (int64_t)c->ses));
    for (int d = s->ndim - 1; d >= 0; d--) {
        if (++c->idx[d] < s->shape[d]) { c->off += s->stride[d]; break; }
        c->off -= (c->idx[d] - 1) * s->stride[d];
        c->idx[d] = 0;
    }
}

moe_status moe_tensor_copy_cpu(moe_tensor *dst, const moe_tensor *src) {
    moe_tensor_mark_written(dst);
    if (dst->device.type != MOE_CPU || src->device.type != MOE_CPU)
        return moe_error(MOE_ERR_DEVICE, "copy_cpu: both tensors must be on the cpu");
    if (moe_tensor_numel(dst) != moe_tensor_numel(src)) {
        char a[128], b[128];
        return moe_error(MOE_ERR_SHAPE, "copy: destination %s and source %s differ in size",
                         moe_shape_str(dst, a, sizeof a), moe_shape_str(src, b, sizeof b));
    }
    if (dst->dtype == src->dtype && moe_tensor_is_contiguous(dst) && moe_tensor_is_contiguous(src)) {
        memmove(moe_tensor_data(dst), moe_tensor_data(src), moe_tensor_nbytes(src));
        return MOE_OK;
    }
    struct copy_arg c = { src, moe_tensor_data(src), moe_dtype_size(src->dtype), {0}, 0, dst->dtype };
    moe_tensor_foreach(dst, copy_one, &c);
    return MOE_OK;
}

moe_tensor *moe_tensor_contiguous_cpu(moe_tensor *t) {
    if (moe_tensor_is_contiguous(t)) { moe_tensor_retain(t); return t; }
    moe_tensor *c = moe_tensor_new_cpu(t->dtype, t->ndim, t->shape);
    if (!c) return NULL;
    moe_tensor_copy_cpu(c, t);
    return c;
}

static void fill_one(void *elem, int64_t i, void *arg) {
    (void)i;
    const double *v = arg;
    /* the dtype travels in v[1] */
    moe_dtype_store((moe_dtype)(int)v[1], elem, v[0]);
}

moe_status moe_tensor_fill_cpu(moe_tensor *t, double v) {
    moe_tensor_mark_written(t);
    if (t->device.type != MOE_CPU) return moe_error(MOE_ERR_DEVICE, "fill_cpu: tensor is not on the cpu");
    if (t->dtype == MOE_F32 && moe_tensor_is_contiguous(t)) {
        float *p = moe_f32(t), f = (float)v;
        int64_t n = moe_tensor_numel(t);
        for (int64_t i = 0; i < n; i++) p[i] = f;
        return MOE_OK;
    }
    double arg[2] = { v, (double)t->dtype };
    moe_tensor_foreach(t, fill_one, arg);
    return MOE_OK;
}

static moe_status elem_offset(const moe_tensor *t, const int64_t *idx, int64_t *off) {
    int64_t o = t->offset;
    for (int d = 0; d < t->ndim; d++) {
        if (idx[d] < 0 || idx[d] >= t->shape[d])
            return moe_error(MOE_ERR_RANGE, "index %lld out of range for dim %d of size %lld",
                             (long long)idx[d], d + 1, (long long)t->shape[d]);
        o += idx[d] * t->stride[d];
    }
    *off = o;
    return MOE_OK;
}

moe_status moe_tensor_get(const moe_tensor *t, const int64_t *idx, double *out) {
    if (t->device.type != MOE_CPU) return moe_error(MOE_ERR_DEVICE, "element access needs a cpu tensor");
    int64_t o = 0;
    MOE_TRY(elem_offset(t, idx, &o));
    *out = moe_dtype_load(t->dtype, (char *)t->storage->data + o * (int64_t)moe_dtype_size(t->dtype));
    return MOE_OK;
}

moe_status moe_tensor_set(moe_tensor *t, const int64_t *idx, double v) {
    moe_tensor_mark_written(t);
    if (t->device.type != MOE_CPU) return moe_error(MOE_ERR_DEVICE, "element access needs a cpu tensor");
    int64_t o = 0;
    MOE_TRY(elem_offset(t, idx, &o));
    moe_dtype_store(t->dtype, (char *)t->storage->data + o * (int64_t)moe_dtype_size(t->dtype), v);
    return MOE_OK;
}
