/* Private helpers shared by ops.c, ops_math.c and ops_nn.c: argument checks
 * that produce "expected vs got" messages, backend lookup, and contiguous
 * copies of inputs. Not part of the public API. */
#ifndef MOE_OPS_INTERNAL_H
#define MOE_OPS_INTERNAL_H

#include "backend.h"

#define OPS_SHAPE(t, buf) moe_shape_str((t), (buf), sizeof(buf))

/* One named tensor argument of an op. */
typedef struct { const char *name; const moe_tensor *t; } ops_arg;

/* Checks that every tensor is non-NULL, that the float ones share a float
 * dtype (that of floats[0]) and that the index ones are i64, and that all of
 * them live on one device (that of floats[0], or indices[0] when nf == 0). */
moe_status ops_check(const char *op, const ops_arg *floats, int nf, const ops_arg *indices, int ni);
moe_status ops_nonnull(const char *op, const char *name, const void *p);
/* An output: must be contiguous. */
moe_status ops_out(const char *op, const char *name, const moe_tensor *t);
/* dst (one element, on a device) takes src's value as known to the host
 * (tensor.h: moe_tensor.host_value) when src is on the host or has one; called
 * after dst was written with src's element (copies, sums over one element). */
void ops_carry_host_value(moe_tensor *dst, const moe_tensor *src);
moe_status ops_same_shape(const char *op, const char *na, const moe_tensor *a, const char *nb,
                          const moe_tensor *b);
moe_status ops_shape_is(const char *op, const char *name, const moe_tensor *t, int ndim,
                        const int64_t *shape, const char *why);
/* Resolves the backend of dev; the caller checks its entry with OPS_ENTRY. */
moe_status ops_backend(moe_ctx *ctx, const char *op, moe_device dev, const moe_backend **be);
moe_status ops_unsupported(const char *op, const moe_backend *be);
/* *out = t itself (retained) when contiguous, else a new contiguous copy;
 * t may be NULL (then *out = NULL). Release with moe_tensor_release. */
moe_status ops_contig(moe_ctx *ctx, const moe_tensor *t, moe_tensor **out);
/* rows = product of all dims but the last (1 for a 0-dim tensor). */
int64_t ops_rows(const moe_tensor *t);
int64_t ops_last(const moe_tensor *t);

/* Resolve the backend and its entry `field` or return an error. */
#define OPS_ENTRY(ctx, opname, dev, field, be)                              \
    do {                                                                    \
        MOE_TRY(ops_backend((ctx), (opname), (dev), &(be)));                \
        if (!(be)->field) return ops_unsupported((opname), (be));           \
    } while (0)

#define OPS_NARGS(a) ((int)(sizeof(a) / sizeof((a)[0])))

#endif
