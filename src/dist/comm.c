/* Communicators: argument checking shared by every implementation, and the
 * single-process (identity) communicator. */
#include "comm.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "../ops/backend.h"
#include "../ops/ops.h"

double moe_dist_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int env_set(const char *name) {
    const char *v = getenv(name);
    return v && *v;
}

int moe_dist_launched_by_mpi(void) {
    return env_set("OMPI_COMM_WORLD_SIZE") || env_set("PMI_SIZE") || env_set("PMIX_RANK");
}

int moe_dist_op_parse(const char *name) {
    if (!name) return -1;
    if (!strcmp(name, "sum")) return MOE_DIST_SUM;
    if (!strcmp(name, "avg") || !strcmp(name, "mean")) return MOE_DIST_AVG;
    return -1;
}

void moe_comm_free(moe_comm *c) {
    if (!c) return;
    if (c->refs > 0) {
        c->refs--;
        return;
    }
    moe_comm *parent = c->parent;
    if (c->ops && c->ops->destroy) c->ops->destroy(c);
    free(c);
    moe_comm_free(parent);   /* after the child: a child never outlives its parent */
}

moe_comm *moe_comm_retain(moe_comm *c) {
    if (c) c->refs++;
    return c;
}

/* ------------------------------------------------------------ checks */

static moe_status check_comm(moe_comm *c, const char *what) {
    if (!c || !c->ops) return moe_error(MOE_ERR_ARG, "%s: no communicator", what);
    return MOE_OK;
}

/* A tensor a collective writes: what the host knew of its values (tensor.h:
 * index bound, host value) no longer holds. */
static void mark_written(moe_tensor *t) {
    if (!t) return;
    moe_tensor_mark_written(t);
}

static moe_status check_tensor(moe_comm *c, const moe_tensor *t, const char *what, const char *arg, int reduce) {
    char b[16];
    if (!t) return moe_error(MOE_ERR_ARG, "%s: %s is missing", what, arg);
    if (!moe_tensor_is_contiguous(t))
        return moe_error(MOE_ERR_ARG, "%s: %s must be contiguous (use :contiguous())", what, arg);
    /* bf16 (mixed-precision gradients) reduces natively in NCCL on GPU tensors;
     * MPI has no bf16 arithmetic */
    int nccl_bf16 = t->dtype == MOE_BF16 && t->device.type == MOE_CUDA && !strcmp(c->ops->name, "nccl");
    if (reduce && t->dtype != MOE_F32 && t->dtype != MOE_F64 && !nccl_bf16)
        return moe_error(MOE_ERR_DTYPE, "%s: %s has dtype %s; reductions take f32 or f64 (bf16 on GPUs over NCCL)", what,
                         arg, moe_dtype_name(t->dtype));
    if (!c->ops->supports(c, t->device))
        return moe_error(MOE_ERR_DEVICE, "%s: the %s communicator cannot work on %s tensors (%s)%s", what,
                         c->ops->name, moe_device_str(t->device, b, sizeof b), arg,
                         t->device.type == MOE_CUDA ? "; use NCCL (a CUDA build) or copy to the cpu"
                                                    : "; copy the tensor to the communicator's device");
    return MOE_OK;
}

/* Device work queued on t's stream must be done before another library reads the memory. */
static moe_status sync_device(moe_comm *c, moe_device d) {
    if (d.type == MOE_CPU || !c->ctx) return MOE_OK;
    const moe_backend *be = c->ctx->backends[d.type];
    if (be && be->synchronize) return be->synchronize(c->ctx, d);
    return MOE_OK;
}

moe_status moe_comm_barrier(moe_comm *c) {
    MOE_TRY(check_comm(c, "barrier"));
    c->seq++;
    return moe_error_context(c->ops->barrier(c), "barrier");
}

moe_status moe_comm_all_reduce(moe_comm *c, moe_tensor *t, moe_dist_op op) {
    return moe_comm_all_reduce_bucketed(c, t, op, 0);
}

moe_status moe_comm_all_reduce_bucketed(moe_comm *c, moe_tensor *t, moe_dist_op op, size_t bucket_bytes) {
    const char *w = "all_reduce";
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_tensor(c, t, w, "tensor", 1));
    if (op != MOE_DIST_SUM && op != MOE_DIST_AVG) return moe_error(MOE_ERR_ARG, "%s: unknown op %d", w, (int)op);
    mark_written(t);
    MOE_TRY(sync_device(c, t->device));
    size_t n = (size_t)moe_tensor_numel(t), es = moe_dtype_size(t->dtype);
    size_t chunk = bucket_bytes ? bucket_bytes / es : n;
    if (chunk == 0) chunk = 1;
    char *p = moe_tensor_data(t);
    for (size_t off = 0; off < n || (n == 0 && off == 0); off += chunk) {
        size_t k = n - off < chunk ? n - off : chunk;
        c->seq++;
        MOE_TRY(moe_error_context(c->ops->all_reduce(c, p + off * es, k, t->dtype, op, t->device), "%s", w));
        if (n == 0) break;
    }
    return MOE_OK;
}

moe_status moe_comm_all_reduce_start(moe_comm *c, moe_tensor *t, int64_t offset, int64_t count, moe_dist_op op) {
    const char *w = "all_reduce_start";
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_tensor(c, t, w, "tensor", 1));
    if (op != MOE_DIST_SUM && op != MOE_DIST_AVG) return moe_error(MOE_ERR_ARG, "%s: unknown op %d", w, (int)op);
    if (offset < 0 || count < 0 || offset + count > moe_tensor_numel(t))
        return moe_error(MOE_ERR_RANGE, "%s: range [%lld, %lld) is outside the tensor's %lld elements", w,
                         (long long)offset, (long long)(offset + count), (long long)moe_tensor_numel(t));
    if (count == 0) return MOE_OK;
    mark_written(t);
    char *p = (char *)moe_tensor_data(t) + (size_t)offset * moe_dtype_size(t->dtype);
    c->seq++;
    if (c->ops->all_reduce_start && t->device.type != MOE_CPU)
        return moe_error_context(c->ops->all_reduce_start(c, p, (size_t)count, t->dtype, op, t->device), "%s", w);
    MOE_TRY(sync_device(c, t->device));
    return moe_error_context(c->ops->all_reduce(c, p, (size_t)count, t->dtype, op, t->device), "%s", w);
}

moe_status moe_comm_wait_pending(moe_comm *c) {
    MOE_TRY(check_comm(c, "wait_pending"));
    if (!c->ops->wait_pending) return MOE_OK;
    return moe_error_context(c->ops->wait_pending(c), "all_reduce (queued)");
}

moe_status moe_comm_broadcast(moe_comm *c, moe_tensor *t, int root) {
    const char *w = "broadcast";
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_tensor(c, t, w, "tensor", 0));
    if (root < 0 || root >= c->size)
        return moe_error(MOE_ERR_RANGE, "%s: root %d is not a rank (0..%d)", w, root, c->size - 1);
    mark_written(t);
    MOE_TRY(sync_device(c, t->device));
    c->seq++;
    return moe_error_context(c->ops->broadcast(c, moe_tensor_data(t), (size_t)moe_tensor_numel(t), t->dtype, root,
                                               t->device), "%s", w);
}

static moe_status check_pair(moe_comm *c, const moe_tensor *in, const moe_tensor *out, const char *w, int reduce) {
    MOE_TRY(check_tensor(c, in, w, "input", reduce));
    MOE_TRY(check_tensor(c, out, w, "output", reduce));
    mark_written((moe_tensor *)out);
    if (in->dtype != out->dtype)
        return moe_error(MOE_ERR_DTYPE, "%s: input is %s but output is %s", w, moe_dtype_name(in->dtype),
                         moe_dtype_name(out->dtype));
    if (!moe_device_eq(in->device, out->device))
        return moe_error(MOE_ERR_DEVICE, "%s: input and output are on different devices", w);
    return MOE_OK;
}

/* all_gather and reduce_scatter: queued on the compute stream when asked and
 * the communicator can (join as for all_to_all_v_queued), else blocking */
static moe_status all_gather(moe_comm *c, const moe_tensor *in, moe_tensor *out, int try_queue, int join) {
    const char *w = "all_gather";
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_pair(c, in, out, w, 0));
    int64_t n = moe_tensor_numel(in);
    if (moe_tensor_numel(out) != n * c->size)
        return moe_error(MOE_ERR_SHAPE, "%s: output has %lld elements, expected %d x %lld", w,
                         (long long)moe_tensor_numel(out), c->size, (long long)n);
    if (try_queue && c->ops->all_gather_queued && in->device.type != MOE_CPU) {
        int queued = 0;
        c->seq++;
        MOE_TRY(moe_error_context(c->ops->all_gather_queued(c, moe_tensor_data(in), moe_tensor_data(out), (size_t)n,
                                                            in->dtype, in->device, join, &queued), "%s", w));
        if (queued) return MOE_OK;
        c->seq--;
    }
    MOE_TRY(sync_device(c, in->device));
    c->seq++;
    return moe_error_context(c->ops->all_gather(c, moe_tensor_data(in), moe_tensor_data(out), (size_t)n, in->dtype,
                                                in->device), "%s", w);
}

static moe_status reduce_scatter(moe_comm *c, const moe_tensor *in, moe_tensor *out, moe_dist_op op, int try_queue,
                                 int join) {
    const char *w = "reduce_scatter";
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_pair(c, in, out, w, 1));
    if (op != MOE_DIST_SUM && op != MOE_DIST_AVG) return moe_error(MOE_ERR_ARG, "%s: unknown op %d", w, (int)op);
    int64_t n = moe_tensor_numel(out);
    if (moe_tensor_numel(in) != n * c->size)
        return moe_error(MOE_ERR_SHAPE, "%s: input has %lld elements, expected %d x %lld", w,
                         (long long)moe_tensor_numel(in), c->size, (long long)n);
    if (try_queue && c->ops->reduce_scatter_queued && in->device.type != MOE_CPU) {
        int queued = 0;
        c->seq++;
        MOE_TRY(moe_error_context(c->ops->reduce_scatter_queued(c, moe_tensor_data(in), moe_tensor_data(out), (size_t)n,
                                                                in->dtype, op, in->device, join, &queued), "%s", w));
        if (queued) return MOE_OK;
        c->seq--;
    }
    MOE_TRY(sync_device(c, in->device));
    c->seq++;
    return moe_error_context(c->ops->reduce_scatter(c, moe_tensor_data(in), moe_tensor_data(out), (size_t)n,
                                                    in->dtype, op, in->device), "%s", w);
}

moe_status moe_comm_all_gather(moe_comm *c, const moe_tensor *in, moe_tensor *out) {
    return all_gather(c, in, out, 0, 1);
}
moe_status moe_comm_all_gather_queued(moe_comm *c, const moe_tensor *in, moe_tensor *out, int join) {
    return all_gather(c, in, out, 1, join);
}
moe_status moe_comm_reduce_scatter(moe_comm *c, const moe_tensor *in, moe_tensor *out, moe_dist_op op) {
    return reduce_scatter(c, in, out, op, 0, 1);
}
moe_status moe_comm_reduce_scatter_queued(moe_comm *c, const moe_tensor *in, moe_tensor *out, moe_dist_op op, int join) {
    return reduce_scatter(c, in, out, op, 1, join);
}

moe_status moe_comm_check_queued(moe_comm *c) {
    MOE_TRY(check_comm(c, "queued collectives"));
    return c->ops->check_queued ? c->ops->check_queued(c) : MOE_OK;
}

/* checks the counts against the tensors; sc/rc (2 * size, freed by the caller) in elements */
static moe_status a2a_counts(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                             const int64_t *recv_counts, size_t **counts, const char *w) {
    *counts = NULL;
    MOE_TRY(check_comm(c, w));
    MOE_TRY(check_pair(c, in, out, w, 0));
    if (!send_counts || !recv_counts) return moe_error(MOE_ERR_ARG, "%s: counts are missing", w);
    size_t *sc = calloc((size_t)c->size * 2, sizeof *sc);
    if (!sc) return moe_error(MOE_ERR_OOM, "%s: out of memory", w);
    size_t *rc = sc + c->size;
    int64_t ts = 0, tr = 0;
    for (int r = 0; r < c->size; r++) {
        if (send_counts[r] < 0 || recv_counts[r] < 0) {
            free(sc);
            return moe_error(MOE_ERR_ARG, "%s: negative count for rank %d", w, r);
        }
        sc[r] = (size_t)send_counts[r];
        rc[r] = (size_t)recv_counts[r];
        ts += send_counts[r];
        tr += recv_counts[r];
    }
    moe_status s = MOE_OK;
    if (ts > moe_tensor_numel(in))
        s = moe_error(MOE_ERR_SHAPE, "%s: send counts add up to %lld, the input has %lld elements", w, (long long)ts,
                      (long long)moe_tensor_numel(in));
    else if (tr > moe_tensor_numel(out))
        s = moe_error(MOE_ERR_SHAPE, "%s: receive counts add up to %lld, the output has %lld elements", w,
                      (long long)tr, (long long)moe_tensor_numel(out));
    if (s != MOE_OK) { free(sc); return s; }
    *counts = sc;
    return MOE_OK;
}

static moe_status a2a_blocking(moe_comm *c, const moe_tensor *in, const size_t *sc, moe_tensor *out,
                               const size_t *rc, const char *w) {
    double t0 = moe_dist_now();
    moe_status s = sync_device(c, in->device);
    double t1 = moe_dist_now();
    if (s == MOE_OK) {
        c->seq++;
        s = moe_error_context(c->ops->all_to_all_v(c, moe_tensor_data(in), sc, moe_tensor_data(out), rc, in->dtype,
                                                   in->device), "%s", w);
    }
    c->a2a_calls++;
    c->a2a_wait_s += t1 - t0;
    c->a2a_s += moe_dist_now() - t1;
    return s;
}

moe_status moe_comm_all_to_all_v(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                 const int64_t *recv_counts) {
    size_t *sc;
    MOE_TRY(a2a_counts(c, in, send_counts, out, recv_counts, &sc, "all_to_all_v"));
    moe_status s = a2a_blocking(c, in, sc, out, sc + c->size, "all_to_all_v");
    free(sc);
    return s;
}

static moe_status a2a_queued(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                             const int64_t *recv_counts, int join) {
    const char *w = "all_to_all_v";
    size_t *sc;
    MOE_TRY(a2a_counts(c, in, send_counts, out, recv_counts, &sc, w));
    int queued = 0;
    moe_status s = MOE_OK;
    if (c->ops->all_to_all_v_queued && in->device.type != MOE_CPU) {
        double t0 = moe_dist_now();
        c->seq++;
        s = moe_error_context(c->ops->all_to_all_v_queued(c, moe_tensor_data(in), sc, moe_tensor_data(out),
                                                          sc + c->size, in->dtype, in->device, join, &queued),
                               "%s", w);
        if (queued) {
            c->a2a_calls++;
            c->a2a_s += moe_dist_now() - t0;
        } else {
            c->seq--;
        }
    }
    if (s == MOE_OK && !queued) s = a2a_blocking(c, in, sc, out, sc + c->size, w);
    free(sc);
    return s;
}

moe_status moe_comm_all_to_all_v_queued(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                        const int64_t *recv_counts) {
    return a2a_queued(c, in, send_counts, out, recv_counts, 1);
}

moe_status moe_comm_all_to_all_v_start(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                       const int64_t *recv_counts) {
    return a2a_queued(c, in, send_counts, out, recv_counts, 0);
}

moe_status moe_comm_join_queued(moe_comm *c, moe_device dev) {
    MOE_TRY(check_comm(c, "join"));
    if (!c->ops->join_queued || dev.type == MOE_CPU) return MOE_OK;
    return moe_error_context(c->ops->join_queued(c, dev), "a queued collective (joining the compute stream)");
}

/* ------------------------------------------------------------ split */

static int64_t host_hash(void) {
    char name[256] = {0};
    if (gethostname(name, sizeof name - 1) != 0) return 0;
    uint64_t h = 1469598103934665603ull;   /* FNV-1a */
    for (const unsigned char *p = (const unsigned char *)name; *p; p++) h = (h ^ *p) * 1099511628211ull;
    return (int64_t)(h >> 1);
}

moe_status moe_comm_split(moe_comm *parent, int color, int key, moe_comm **child) {
    const char *w = "split";
    if (child) *child = NULL;
    MOE_TRY(check_comm(parent, w));
    if (!child) return moe_error(MOE_ERR_ARG, "%s: no place for the child communicator", w);
    if (!parent->ops->split)
        return moe_error(MOE_ERR_STATE, "%s: the %s communicator cannot be split", w, parent->ops->name);
    /* everyone's (color, key, host) first: a deadline-guarded collective, and
     * the child's rank, size and host-local numbers follow from it */
    int n = parent->size;
    int64_t shape1[1] = {3}, shape2[1] = {3 * (int64_t)n};
    moe_tensor *mine = moe_tensor_new_cpu(MOE_I64, 1, shape1), *all = moe_tensor_new_cpu(MOE_I64, 1, shape2);
    int *members = calloc((size_t)n, sizeof *members);
    moe_comm *c = calloc(1, sizeof *c);
    moe_status s = MOE_OK;
    if (!mine || !all) s = moe_last_status();
    else if (!members || !c) s = moe_error(MOE_ERR_OOM, "%s: out of memory", w);
    if (s == MOE_OK) {
        int64_t *m = moe_tensor_data(mine);
        m[0] = color;
        m[1] = key;
        m[2] = host_hash();
        s = moe_comm_all_gather(parent, mine, all);
    }
    if (s == MOE_OK) {
        const int64_t *a = moe_tensor_data(all);
        for (int r = 0; r < n && s == MOE_OK; r++)
            if (a[3 * r] < 0 || a[3 * r] > 0x7fffffff)
                s = moe_error(MOE_ERR_ARG, "%s: rank %d passed color %lld; colors must be >= 0", w, r,
                              (long long)a[3 * r]);
        int size = 0, rank = -1, local_size = 0, local_rank = 0;
        /* members of this color in child-rank order: by key, then parent rank (insertion sort) */
        for (int r = 0; r < n && s == MOE_OK; r++) {
            if (a[3 * r] != color) continue;
            int i = size++;
            while (i > 0 && a[3 * members[i - 1] + 1] > a[3 * r + 1]) {
                members[i] = members[i - 1];
                i--;
            }
            members[i] = r;
        }
        for (int i = 0; i < size && s == MOE_OK; i++) {
            if (members[i] == parent->rank) rank = i;
        }
        for (int i = 0; i < size && s == MOE_OK; i++) {
            if (a[3 * members[i] + 2] != a[3 * parent->rank + 2]) continue;
            if (i < rank) local_rank++;
            local_size++;
        }
        if (s == MOE_OK) {
            c->ctx = parent->ctx;
            c->rank = rank;
            c->size = size;
            c->local_rank = local_rank;
            c->local_size = local_size;
            c->timeout_s = parent->timeout_s;
            s = moe_error_context(parent->ops->split(parent, color, key, members, c), "%s", w);
        }
    }
    moe_tensor_release(mine);
    moe_tensor_release(all);
    free(members);
    if (s != MOE_OK) {
        if (c && c->ops && c->ops->destroy) c->ops->destroy(c);
        free(c);
        return s;
    }
    c->parent = moe_comm_retain(parent);
    *child = c;
    return MOE_OK;
}

/* ------------------------------------------------------------ single process */

static int single_supports(const moe_comm *c, moe_device d) { return 1; }
static moe_status single_barrier(moe_comm *c) { return MOE_OK; }
static moe_status single_all_reduce(moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d) {
    return MOE_OK;   /* the sum (and the mean) over one rank is the value itself */
}
static moe_status single_broadcast(moe_comm *c, void *buf, size_t n, moe_dtype dt, int root, moe_device d) {
    return MOE_OK;
}

/* A copy of n elements between two buffers of one device, through the device's copy op. */
static moe_status device_copy(moe_comm *c, void *dst, const void *src, size_t n, moe_dtype dt, moe_device d) {
    if (n == 0 || dst == src) return MOE_OK;
    if (d.type == MOE_CPU) {
        memmove(dst, src, n * moe_dtype_size(dt));
        return MOE_OK;
    }
    int64_t shape[1] = {(int64_t)n};
    size_t nb = n * moe_dtype_size(dt);
    moe_storage *ss = moe_storage_wrap((void *)src, nb, d), *ds = moe_storage_wrap(dst, nb, d);
    moe_tensor *ts = ss ? moe_tensor_from_storage(ss, 0, dt, 1, shape, NULL) : NULL;
    moe_tensor *td = ds ? moe_tensor_from_storage(ds, 0, dt, 1, shape, NULL) : NULL;
    moe_status s = ts && td ? moe_op_copy(c->ctx, td, ts) : moe_last_status();
    if (ts) moe_tensor_release(ts);
    if (td) moe_tensor_release(td);
    if (ss) moe_storage_release(ss);
    if (ds) moe_storage_release(ds);
    if (s == MOE_OK) s = sync_device(c, d);
    return s;
}

static moe_status single_all_gather(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d) {
    return device_copy(c, out, in, n, dt, d);
}
static moe_status single_reduce_scatter(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt,
                                        moe_dist_op op, moe_device d) {
    return device_copy(c, out, in, n, dt, d);
}
static moe_status single_all_to_all_v(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc,
                                      moe_dtype dt, moe_device d) {
    if (sc[0] != rc[0])
        return moe_error(MOE_ERR_ARG, "one rank sends %zu elements to itself but expects %zu", sc[0], rc[0]);
    return device_copy(c, out, in, sc[0], dt, d);
}
static void single_destroy(moe_comm *c) {}
static moe_status single_split(moe_comm *c, int color, int key, const int *members, moe_comm *child);

static const moe_comm_ops single_ops = {
    .name = "single", .supports = single_supports, .barrier = single_barrier, .all_reduce = single_all_reduce,
    .broadcast = single_broadcast, .all_gather = single_all_gather, .reduce_scatter = single_reduce_scatter,
    .all_to_all_v = single_all_to_all_v, .split = single_split, .destroy = single_destroy,
};

static moe_status single_split(moe_comm *c, int color, int key, const int *members, moe_comm *child) {
    child->ops = &single_ops;
    return MOE_OK;
}

moe_comm *moe_comm_single_new(moe_ctx *ctx) {
    moe_comm *c = calloc(1, sizeof *c);
    if (!c) { moe_error(MOE_ERR_OOM, "dist: out of memory"); return NULL; }
    c->ops = &single_ops;
    c->ctx = ctx;
    c->rank = 0;
    c->size = 1;
    c->local_rank = 0;
    c->local_size = 1;
    c->timeout_s = MOE_DIST_DEFAULT_TIMEOUT_S;
    return c;
}
