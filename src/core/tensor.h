/* Tensors: a refcounted header (shape, strides, dtype, offset) over refcounted
 * storage. Views share storage; element offsets and strides count elements.
 * Every constructor returns NULL with the error message set on failure. */
#ifndef MOE_TENSOR_H
#define MOE_TENSOR_H

#include <stdint.h>
#include <stddef.h>

#include "device.h"
#include "dtype.h"
#include "status.h"

#define MOE_MAX_DIMS 8

typedef struct moe_ctx moe_ctx;

/* Parked memory: a storage whose bytes were given back while another
 * representation holds its values (the f32 master weights kept as two 16-bit
 * planes during training, nn/master_split.c). data is NULL while parked;
 * restore(s, p) allocates s->data again and refills it, and is run by
 * moe_tensor_ready (and so by moe_tensor_data and every Lua access) before
 * anyone reads or writes the bytes. destroy(p) runs when the storage goes. */
typedef struct moe_storage moe_storage;
typedef struct moe_storage_park {
    moe_status (*restore)(moe_storage *s, struct moe_storage_park *p);
    void (*destroy)(struct moe_storage_park *p);
} moe_storage_park;

typedef struct moe_storage {
    int refcount;
    void *data;
    size_t nbytes;
    moe_device device;
    moe_allocator *alloc;   /* NULL: memory not owned (borrowed or mmapped) */
    /* Memory with an owner of its own (an mmapped file): release(release_arg)
     * runs once when the last reference goes. NULL for the other storages. */
    void (*release)(void *release_arg);
    void *release_arg;
    int aliased;            /* a second header was made over this memory since a bound was last set (see index_bound) */
    moe_storage_park *park; /* NULL, or how parked memory comes back (above) */
} moe_storage;

typedef struct moe_tensor {
    int refcount;
    moe_storage *storage;
    int64_t offset;                   /* in elements */
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t stride[MOE_MAX_DIMS];     /* in elements */
    moe_dtype dtype;
    moe_device device;
    /* Index bound: every value of this (i64 or i32) tensor is known to lie in
     * [0, index_bound); 0 = unknown. (The MoE slot maps, i32, also hold -1
     * for a dropped choice: ops reading them treat -1 as "none", so for them
     * the bound promises [-1, index_bound).) Set only by code that produced the values
     * itself (the router on token_idx / expert_idx) or saw them on the host (an
     * upload, moe_op_copy from the CPU, sets max + 1 when none is negative), through
     * moe_tensor_set_index_bound. Index ops (CUDA index_select, index_add,
     * gather, scatter_add) skip their range check, and its stream
     * synchronisation, when moe_tensor_index_trusted(index, n) holds.
     * The promise cannot outlive a write:
     * - new tensors start at 0; views (view, narrow, transpose, ...) start at 0
     *   and making one marks the storage aliased, which also voids the bound of
     *   every header over it (an alias could write the values). A bound set on
     *   the storage's only header (its refcount 1: the views are gone) clears
     *   the mark, which assumes the views' writes were queued before the write
     *   the new bound describes (one stream per device; a refilled input);
     * - every write through the ops layer (an op's output, copy's dst, fill)
     *   and moe_tensor_set / copy_cpu / fill_cpu reset it to 0.
     * Code writing tensor memory by other means (raw pointers, communicators)
     * must reset it itself. */
    int64_t index_bound;
    /* Slot map: this i32 [N, k] tensor is a router's slot map over exactly
     * index_bound rows: besides the bound, each row in [0, index_bound)
     * appears once (the others are -1). Meaningful only while index_bound is
     * set; moe_tensor_set_index_bound clears it, so a bound set anew (an
     * upload's max + 1) never carries it. Set by the code that built the map
     * (moe_tensor_mark_slot_map), read through moe_tensor_slot_map_trusted. */
    int slot_map;
    /* Host value: a one-element tensor whose value the host knows, because the
     * host wrote it (an upload, a fill) or it is a device copy of one such.
     * Readers take host_value instead of copying the element back, which would
     * synchronise with the device (the loss gradient's scale in cross-entropy's
     * backward). Same lifetime rules as index_bound: set only on a sole header,
     * not inherited by views, voided by aliasing and by every other write. */
    int host_known;
    double host_value;
    /* Grouped plan: when grouped_plan_rows > 0, this i64 [G + 1] tensor of
     * expert offsets (a router's, over grouped_plan_rows rows in all) is
     * followed in its storage, grouped_plan_at bytes past its first element,
     * by the own grouped kernel's work tables for exactly these offsets and
     * rows (moe_cuda_grouped_plan, src/ops/cuda/cuda_grouped_mma.cu), written
     * by the same producer: the grouped GEMMs that read the offsets on the
     * device take the tables instead of planning each call. Same lifetime
     * rules as index_bound: not inherited by views, voided by every write. */
    int64_t grouped_plan_rows, grouped_plan_at;
} moe_tensor;

/* What the host knew of a tensor's values (index bound, host value, grouped
 * plan) no longer holds: it is about to be written, or is a new view. */
static inline void moe_tensor_mark_written(moe_tensor *t) {
    t->index_bound = 0;
    t->host_known = 0;
    t->grouped_plan_rows = 0;
}

moe_storage *moe_storage_new(moe_allocator *a, size_t nbytes);
/* Wraps memory the caller keeps alive (no free on release). */
moe_storage *moe_storage_wrap(void *data, size_t nbytes, moe_device dev);
/* Wraps memory kept alive by another owner, which the storage holds on to:
 * release(release_arg) is called when the storage goes (also when this call
 * fails, so the caller's reference is always consumed). */
moe_storage *moe_storage_wrap_owned(void *data, size_t nbytes, moe_device dev,
                                    void (*release)(void *release_arg), void *release_arg);
void moe_storage_retain(moe_storage *s);
void moe_storage_release(moe_storage *s);

/* New contiguous tensor, uninitialised. ctx picks the device allocator;
 * ctx may be NULL for the CPU. */
moe_tensor *moe_tensor_new(moe_ctx *ctx, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev);
moe_tensor *moe_tensor_new_cpu(moe_dtype dt, int ndim, const int64_t *shape);
moe_tensor *moe_tensor_like(moe_ctx *ctx, const moe_tensor *t);
/* A header over existing storage (takes a new reference to it). */
moe_tensor *moe_tensor_from_storage(moe_storage *s, int64_t offset, moe_dtype dt, int ndim,
                                    const int64_t *shape, const int64_t *stride);
void moe_tensor_retain(moe_tensor *t);
void moe_tensor_release(moe_tensor *t);

int64_t moe_tensor_numel(const moe_tensor *t);
size_t moe_tensor_nbytes(const moe_tensor *t);
int moe_tensor_is_contiguous(const moe_tensor *t);
int moe_tensor_same_shape(const moe_tensor *a, const moe_tensor *b);
/* Pointer to the first element. Parked memory (moe_storage_park) is restored
 * first; NULL, with the error set, when that fails. */
void *moe_tensor_data(const moe_tensor *t);
/* Restores t's memory when it is parked (a no-op otherwise): code that can
 * report an error calls this before handing t to anything that reads it. */
moe_status moe_tensor_ready(const moe_tensor *t);
static inline float *moe_f32(const moe_tensor *t) { return (float *)moe_tensor_data(t); }

/* "[2, 3, 4]" into buf; returns buf. */
const char *moe_shape_str(const moe_tensor *t, char *buf, size_t n);
const char *moe_shape_str_raw(int ndim, const int64_t *shape, char *buf, size_t n);
int64_t moe_shape_numel(int ndim, const int64_t *shape);
/* Validates a shape: 0..MOE_MAX_DIMS dims, each >= 0, product not overflowing. */
moe_status moe_shape_check(int ndim, const int64_t *shape);

/* Views (share storage). A negative dim counts from the end. */
moe_tensor *moe_tensor_view(moe_tensor *t, int ndim, const int64_t *shape); /* one -1 allowed */
moe_tensor *moe_tensor_transpose(moe_tensor *t, int d0, int d1);
moe_tensor *moe_tensor_permute(moe_tensor *t, const int *perm);
moe_tensor *moe_tensor_narrow(moe_tensor *t, int dim, int64_t start, int64_t len);
moe_tensor *moe_tensor_select(moe_tensor *t, int dim, int64_t index);
moe_tensor *moe_tensor_expand(moe_tensor *t, int ndim, const int64_t *shape);
moe_tensor *moe_tensor_unsqueeze(moe_tensor *t, int dim);

/* Index bounds (see moe_tensor.index_bound). set: records the bound when t
 * is the only header over its storage (else leaves it 0: an alias could
 * write); bound <= 0 clears it. trusted: every value is known to lie in
 * [0, n). */
void moe_tensor_set_index_bound(moe_tensor *t, int64_t bound);
/* Host values (see moe_tensor.host_value). set: records v when t has one
 * element and is the only header over its storage (else forgets it). known:
 * 1 and *v when the value is known. */
void moe_tensor_set_host_value(moe_tensor *t, double v);
static inline int moe_tensor_host_value(const moe_tensor *t, double *v) {
    if (!t || !t->host_known || !t->storage || __atomic_load_n(&t->storage->aliased, __ATOMIC_RELAXED)) return 0;
    *v = t->host_value;
    return 1;
}
static inline int moe_tensor_index_trusted(const moe_tensor *t, int64_t n) {
    return t && t->index_bound > 0 && t->index_bound <= n && t->storage &&
           !__atomic_load_n(&t->storage->aliased, __ATOMIC_RELAXED);
}
/* Marks t (its bound already set) as a slot map over index_bound rows; trusted:
 * t is one over exactly `rows` rows. */
void moe_tensor_mark_slot_map(moe_tensor *t);
static inline int moe_tensor_slot_map_trusted(const moe_tensor *t, int64_t rows) {
    return moe_tensor_index_trusted(t, rows) && t->slot_map && t->index_bound == rows;
}

/* Normalises a possibly negative dim; sets an error and returns -1 if out of range. */
int moe_tensor_dim(const moe_tensor *t, int dim);

/* CPU-only helpers; CUDA tensors go through moe_op_copy / moe_op_fill. */
moe_status moe_tensor_copy_cpu(moe_tensor *dst, const moe_tensor *src); /* any strides and dtypes */
moe_tensor *moe_tensor_contiguous_cpu(moe_tensor *t);                   /* new ref, copy if needed */
moe_status moe_tensor_fill_cpu(moe_tensor *t, double v);
/* Element access by multi-index (bounds-checked). */
moe_status moe_tensor_get(const moe_tensor *t, const int64_t *idx, double *out);
moe_status moe_tensor_set(moe_tensor *t, const int64_t *idx, double v);

/* Calls fn(element_pointer, linear_index, arg) over a CPU tensor in row-major order. */
void moe_tensor_foreach(const moe_tensor *t, void (*fn)(void *elem, int64_t i, void *arg), void *arg);

#endif
