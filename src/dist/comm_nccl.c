/* The NCCL communicator (CUDA tensors; CUDA builds only).
 *
 * libnccl.so.2 is opened with dlopen when a communicator is made, so the
 * CUDA program starts (and trains on one GPU) on machines without NCCL; the
 * types come from nccl.h. The unique id is broadcast over a bootstrap
 * communicator (MPI) or read from a rendezvous file written by rank 0.
 * Collectives run on the communicator's own stream after the device's
 * stream is synchronised (CPU tensors are staged through a device buffer), and are polled (cudaStreamQuery) against the
 * deadline; on timeout the communicator is aborted (ncclCommAbort) and
 * marked broken. NCCL_NVLS_ENABLE defaults to 0 here (NVLink multicast is
 * not available on every machine); a value the user sets is kept.
 *
 * A rank that dies: NCCL cannot say which rank is missing, so communicators
 * made through the file rendezvous also keep heartbeats there: a thread of
 * each rank rewrites <dir>/alive.<rank> every second, and a rank waiting on
 * a collective checks the others' files once a second; a heartbeat older
 * than MOELAB_DIST_HEARTBEAT_S (default 15 s) names that rank and fails the
 * collective at once, without waiting for the full timeout.
 *
 * Queued collectives (comm_nccl_queue.c: expert parallelism's exchanges,
 * all_to_all_v, all_gather and reduce_scatter) run on our stream between two
 * events, the compute stream's work before them and its later work after
 * them (or after a later join), and the host does not wait. The heartbeat
 * thread (comm_nccl_watch.c) watches them: every 100 ms, while one may be unfinished,
 * it checks NCCL's asynchronous error, the others' heartbeats and the
 * timeout (counted from the oldest exchange not yet seen finished), and on a
 * verdict aborts the communicator, which frees the GPU work waiting on it;
 * the next collective of this rank then fails with that verdict. Without
 * heartbeats (mpirun's bootstrap, split communicators) there is no watcher
 * and the exchanges stay blocking.
 *
 * Splits (moe_comm_split) use ncclCommSplit when the library has it, else a
 * new communicator from a fresh unique id per group (all-gathered over the
 * parent); MOELAB_NCCL_SPLIT=new_id forces the latter.
 *
 * Not run in the test suite (no GPU there): compiled and linked only. */
#include "comm.h"

int moe_dist_have_nccl(void) {
#ifdef MOELAB_CUDA
    return 1;
#else
    return 0;
#endif
}

#ifndef MOELAB_CUDA

moe_comm *moe_comm_nccl_new(moe_ctx *ctx, moe_comm *bootstrap, const char *rendezvous_dir, int device,
                            double timeout_s) {
    moe_error(MOE_ERR_STATE, "dist: NCCL needs a CUDA build (make CUDA=1)");
    return NULL;
}

#else

#include "comm_nccl.h"
#include "../ops/cuda/moe_cuda.h"

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <pthread.h>
#include <time.h>
#include <unistd.h>

static nccl_impl *impl_new(void) {
    nccl_impl *m = calloc(1, sizeof *m);
    /* recursive: a locked operation calls others (the queued exchange's begin) */
    pthread_mutexattr_t at;
    int ok = m && pthread_mutexattr_init(&at) == 0;
    if (ok) {
        ok = pthread_mutexattr_settype(&at, PTHREAD_MUTEX_RECURSIVE) == 0 && pthread_mutex_init(&m->q_mu, &at) == 0;
        pthread_mutexattr_destroy(&at);
    }
    if (m && !ok) { free(m); m = NULL; }
    return m;
}

static moe_status load_api(nccl_api *a) {
    a->lib = dlopen("libnccl.so.2", RTLD_NOW | RTLD_LOCAL);
    if (!a->lib) a->lib = dlopen("libnccl.so", RTLD_NOW | RTLD_LOCAL);
    if (!a->lib) return moe_error(MOE_ERR_STATE, "dist: cannot open libnccl.so.2 (%s)", dlerror());
#define SYM(f) if (!(*(void **)&a->f = dlsym(a->lib, "nccl" #f))) \
        return moe_error(MOE_ERR_STATE, "dist: libnccl lacks nccl" #f)
    SYM(GetUniqueId); SYM(CommInitRank); SYM(CommAbort); SYM(CommDestroy); SYM(CommGetAsyncError);
    SYM(GetErrorString); SYM(AllReduce); SYM(Broadcast); SYM(AllGather); SYM(ReduceScatter); SYM(Send);
    SYM(Recv); SYM(GroupStart); SYM(GroupEnd);
#undef SYM
    *(void **)&a->CommSplit = dlsym(a->lib, "ncclCommSplit");
    return MOE_OK;
}

ncclDataType_t moe_nccl_type(moe_dtype dt, size_t *count) {
    switch (dt) {
    case MOE_F32: return ncclFloat32;
    case MOE_F64: return ncclFloat64;
    case MOE_BF16: return ncclBfloat16;
    case MOE_F16: return ncclFloat16;
    case MOE_I32: return ncclInt32;
    case MOE_I64: return ncclInt64;
    default: return ncclUint8;
    }
}

moe_status moe_nccl_check(nccl_impl *m, ncclResult_t r, const char *what) {
    if (r == ncclSuccess) return MOE_OK;
    m->broken = 1;
    return moe_error(MOE_ERR_IO, "%s: %s", what, m->api.GetErrorString(r));
}

/* Poll the stream until done, an asynchronous NCCL error, or the deadline. */
static moe_status nccl_wait(moe_comm *c, const char *what) {
    nccl_impl *m = c->impl;
    double deadline = moe_dist_now() + c->timeout_s;
    m->hb_checked = moe_dist_now();   /* heartbeats are read only once a wait passes a second */
    for (int spins = 0;; spins++) {
        if (watcher_aborted(m)) {
            m->broken = 1;
            return moe_error(MOE_ERR_STATE, "%s", m->q_error);
        }
        cudaError_t e = cudaStreamQuery(m->stream);
        if (e == cudaSuccess) return MOE_OK;
        if (e != cudaErrorNotReady) {
            m->broken = 1;
            return moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e));
        }
        ncclResult_t ar = ncclSuccess;
        m->api.CommGetAsyncError(m->comm, &ar);
        if (ar != ncclSuccess) {
            moe_nccl_abort(m);
            return moe_error(MOE_ERR_IO, "rank %d: %s: NCCL error: %s", c->rank, what, m->api.GetErrorString(ar));
        }
        if (m->hb_dir && moe_dist_now() - m->hb_checked > 1.0) {
            m->hb_checked = moe_dist_now();
            char who[256];
            double age = 0;
            pthread_mutex_lock(&m->q_mu);
            int n = moe_nccl_hb_stale(m, who, sizeof who, &age);
            pthread_mutex_unlock(&m->q_mu);
            if (n > 0) {
                moe_nccl_abort(m);
                return moe_error(MOE_ERR_STATE,
                                 "rank %d: %s (collective #%llu) cannot finish: rank%s %s sent no heartbeat for %.0f s "
                                 "(exited, killed or its host is gone); the communicator was aborted",
                                 c->rank, what, (unsigned long long)c->seq, n > 1 ? "s" : "", who, age);
            }
        }
        if (moe_dist_now() > deadline) {
            moe_nccl_abort(m);
            return moe_error(MOE_ERR_STATE,
                             "rank %d: %s timed out after %.0f s (collective #%llu); %s; the communicator was aborted",
                             c->rank, what, c->timeout_s, (unsigned long long)c->seq,
                             m->hb_dir ? "every rank still sends heartbeats, so one is alive but stuck (in other code "
                                         "or another collective)"
                                       : "NCCL cannot tell which rank is missing (a rank that died or is stuck)");
        }
        if (spins > 1000) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

moe_status moe_nccl_begin(moe_comm *c, const char *what) {
    nccl_impl *m = c->impl;
    /* the watcher's verdict, every time (its abort marked the communicator broken too) */
    if (watcher_aborted(m)) {
        m->broken = 1;
        return moe_error(MOE_ERR_STATE, "%s: %s", what, m->q_error);
    }
    if (m->broken) return moe_error(MOE_ERR_STATE, "%s: the NCCL communicator is broken after an earlier failure", what);
    cudaError_t e = cudaSetDevice(m->device);
    if (e != cudaSuccess) return moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e));
    return MOE_OK;
}

/* CPU tensors are accepted too (the rendezvous launch has no host
 * communicator, and the trainers all-reduce a few host scalars per step):
 * they are staged through a device buffer of the communicator. */
static int nc_supports(const moe_comm *c, moe_device d) {
    const nccl_impl *m = c->impl;
    return d.type == MOE_CPU || (d.type == MOE_CUDA && d.index == m->device);
}

/* Stream-ordered on our stream: cudaFree would wait for the whole device,
 * which may wait on a queued exchange that only the watcher can end, and the
 * watcher cannot act while this rank holds the communicator's lock. */
static moe_status scratch(nccl_impl *m, size_t bytes, const char *what) {
    if (bytes <= m->scratch_bytes) return MOE_OK;
    if (m->scratch) cudaFreeAsync(m->scratch, m->stream);
    m->scratch = NULL;
    m->scratch_bytes = 0;
    if (cudaMallocAsync(&m->scratch, bytes ? bytes : 1, m->stream) != cudaSuccess)
        return moe_error(MOE_ERR_OOM, "%s: cannot allocate %zu bytes of device staging memory", what, bytes);
    m->scratch_bytes = bytes;
    return MOE_OK;
}

/* On our stream, so the collective that follows (same stream) sees the data;
 * a copy back waits for our stream, whose collective has finished by then. */
static moe_status copy(nccl_impl *m, void *dst, const void *src, size_t bytes, enum cudaMemcpyKind k, const char *what) {
    if (!bytes) return MOE_OK;
    cudaError_t e = cudaMemcpyAsync(dst, src, bytes, k, m->stream);
    if (e == cudaSuccess && k == cudaMemcpyDeviceToHost) e = cudaStreamSynchronize(m->stream);
    return e == cudaSuccess ? MOE_OK : moe_error(MOE_ERR_DEVICE, "%s: staging copy: %s", what, cudaGetErrorString(e));
}

/* Device pointers for a collective reading in_bytes from `in` and writing
 * out_bytes to `out`: the buffers themselves on CUDA, else the staging
 * buffer (input at offset 0, output after it; in == out shares them). */
static moe_status stage_in(moe_comm *c, moe_device d, const void *in, size_t in_bytes, void *out, size_t out_bytes,
                           const void **din, void **dout, const char *what) {
    nccl_impl *m = c->impl;
    if (d.type != MOE_CPU) { *din = in; *dout = out; return MOE_OK; }
    int same = in == out;
    size_t off = same ? 0 : (in_bytes + 255) / 256 * 256;
    MOE_TRY(scratch(m, same ? (in_bytes > out_bytes ? in_bytes : out_bytes) : off + out_bytes, what));
    MOE_TRY(copy(m, m->scratch, in, in_bytes, cudaMemcpyHostToDevice, what));
    *din = m->scratch;
    *dout = (char *)m->scratch + off;
    return MOE_OK;
}

static moe_status stage_out(moe_comm *c, moe_device d, void *out, const void *dout, size_t out_bytes, const char *what) {
    if (d.type != MOE_CPU) return MOE_OK;
    return copy(c->impl, out, dout, out_bytes, cudaMemcpyDeviceToHost, what);
}

static moe_status nc_all_reduce_u(moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d) {
    nccl_impl *m = c->impl;
    const void *din; void *dout;
    size_t bytes = n * moe_dtype_size(dt);
    MOE_TRY(moe_nccl_begin(c, "all_reduce"));
    MOE_TRY(stage_in(c, d, buf, bytes, buf, bytes, &din, &dout, "all_reduce"));
    MOE_TRY(moe_nccl_check(m, m->api.AllReduce(din, dout, n, moe_nccl_type(dt, &n), op == MOE_DIST_AVG ? ncclAvg : ncclSum,
                                           m->comm, m->stream), "ncclAllReduce"));
    MOE_TRY(nccl_wait(c, "all_reduce"));
    return stage_out(c, d, buf, dout, bytes, "all_reduce");
}

/* Queued behind the compute stream's work (an event, no host wait); the
 * buffer is final there, and nothing on the compute stream touches it until
 * wait_pending has returned (the caller's contract). */
static moe_status nc_all_reduce_start_u(moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(moe_nccl_begin(c, "all_reduce_start"));
    cudaStream_t compute = (cudaStream_t)moe_cuda_stream(c->ctx, d.index);
    if (!compute) return moe_last_status();
    if (!m->ready && cudaEventCreateWithFlags(&m->ready, cudaEventDisableTiming) != cudaSuccess) {
        m->ready = NULL;
        return moe_error(MOE_ERR_DEVICE, "all_reduce_start: cannot create a CUDA event");
    }
    if (cudaEventRecord(m->ready, compute) != cudaSuccess || cudaStreamWaitEvent(m->stream, m->ready, 0) != cudaSuccess)
        return moe_error(MOE_ERR_DEVICE, "all_reduce_start: %s", cudaGetErrorString(cudaGetLastError()));
    MOE_TRY(moe_nccl_check(m, m->api.AllReduce(buf, buf, n, moe_nccl_type(dt, &n), op == MOE_DIST_AVG ? ncclAvg : ncclSum,
                                           m->comm, m->stream), "ncclAllReduce"));
    m->pending++;
    return MOE_OK;
}

static moe_status nc_wait_pending_u(moe_comm *c) {
    nccl_impl *m = c->impl;
    if (!m->pending) return MOE_OK;
    m->pending = 0;
    MOE_TRY(moe_nccl_begin(c, "all_reduce (queued)"));
    return nccl_wait(c, "all_reduce (queued)");
}

static moe_status nc_barrier_u(moe_comm *c) {
    nccl_impl *m = c->impl;
    MOE_TRY(moe_nccl_begin(c, "barrier"));
    MOE_TRY(scratch(m, sizeof(float), "barrier"));
    MOE_TRY(moe_nccl_check(m, m->api.AllReduce(m->scratch, m->scratch, 1, ncclFloat32, ncclSum, m->comm, m->stream),
                       "barrier"));
    return nccl_wait(c, "barrier");
}

static moe_status nc_broadcast_u(moe_comm *c, void *buf, size_t n, moe_dtype dt, int root, moe_device d) {
    nccl_impl *m = c->impl;
    const void *din; void *dout;
    size_t bytes = n * moe_dtype_size(dt);
    MOE_TRY(moe_nccl_begin(c, "broadcast"));
    MOE_TRY(stage_in(c, d, buf, bytes, buf, bytes, &din, &dout, "broadcast"));
    MOE_TRY(moe_nccl_check(m, m->api.Broadcast(din, dout, n, moe_nccl_type(dt, &n), root, m->comm, m->stream), "ncclBroadcast"));
    MOE_TRY(nccl_wait(c, "broadcast"));
    return stage_out(c, d, buf, dout, bytes, "broadcast");
}

static moe_status nc_all_gather_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d) {
    nccl_impl *m = c->impl;
    const void *din; void *dout;
    size_t bytes = n * moe_dtype_size(dt);
    MOE_TRY(moe_nccl_begin(c, "all_gather"));
    MOE_TRY(stage_in(c, d, in, bytes, out, bytes * (size_t)c->size, &din, &dout, "all_gather"));
    MOE_TRY(moe_nccl_check(m, m->api.AllGather(din, dout, n, moe_nccl_type(dt, &n), m->comm, m->stream), "ncclAllGather"));
    MOE_TRY(nccl_wait(c, "all_gather"));
    return stage_out(c, d, out, dout, bytes * (size_t)c->size, "all_gather");
}

static moe_status nc_reduce_scatter_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_dist_op op,
                                    moe_device d) {
    nccl_impl *m = c->impl;
    const void *din; void *dout;
    size_t bytes = n * moe_dtype_size(dt);
    MOE_TRY(moe_nccl_begin(c, "reduce_scatter"));
    MOE_TRY(stage_in(c, d, in, bytes * (size_t)c->size, out, bytes, &din, &dout, "reduce_scatter"));
    MOE_TRY(moe_nccl_check(m, m->api.ReduceScatter(din, dout, n, moe_nccl_type(dt, &n), op == MOE_DIST_AVG ? ncclAvg : ncclSum,
                                               m->comm, m->stream), "ncclReduceScatter"));
    MOE_TRY(nccl_wait(c, "reduce_scatter"));
    return stage_out(c, d, out, dout, bytes, "reduce_scatter");
}

/* One grouped send/recv per peer on our stream (no wait). The rank's own
 * block is a device copy on the same stream instead of an NCCL self-send,
 * queued only once the group is (a failed group leaves nothing behind that
 * could still touch buffers the caller frees). */
moe_status moe_nccl_enqueue_a2a(moe_comm *c, const void *din, const size_t *sc, void *dout, const size_t *rc,
                              moe_dtype dt) {
    nccl_impl *m = c->impl;
    size_t es = moe_dtype_size(dt), so = 0, ro = 0, one = 1, self_so = 0, self_ro = 0;
    ncclDataType_t t = moe_nccl_type(dt, &one);
    if (sc[c->rank] != rc[c->rank])
        return moe_error(MOE_ERR_ARG, "all_to_all_v: rank %d sends %zu elements to itself but expects %zu", c->rank,
                         sc[c->rank], rc[c->rank]);
    MOE_TRY(moe_nccl_check(m, m->api.GroupStart(), "ncclGroupStart"));
    ncclResult_t err = ncclSuccess;
    for (int r = 0; r < c->size; r++) {
        ncclResult_t e1 = ncclSuccess, e2 = ncclSuccess;
        if (r == c->rank) { self_so = so; self_ro = ro; }
        if (sc[r] && r != c->rank) e1 = m->api.Send((const char *)din + so * es, sc[r], t, r, m->comm, m->stream);
        if (rc[r] && r != c->rank) e2 = m->api.Recv((char *)dout + ro * es, rc[r], t, r, m->comm, m->stream);
        if (err == ncclSuccess) err = e1 != ncclSuccess ? e1 : e2;
        so += sc[r];
        ro += rc[r];
    }
    ncclResult_t ge = m->api.GroupEnd();
    MOE_TRY(moe_nccl_check(m, err, "ncclSend/ncclRecv"));
    MOE_TRY(moe_nccl_check(m, ge, "ncclGroupEnd"));
    if (sc[c->rank] && cudaMemcpyAsync((char *)dout + self_ro * es, (const char *)din + self_so * es, sc[c->rank] * es,
                                       cudaMemcpyDeviceToDevice, m->stream) != cudaSuccess) {
        /* the exchange is queued: nothing may reuse its buffers before it ends */
        cudaStreamSynchronize(m->stream);
        m->broken = 1;
        return moe_error(MOE_ERR_DEVICE, "all_to_all_v: the rank's own rows: %s", cudaGetErrorString(cudaGetLastError()));
    }
    return MOE_OK;
}

static moe_status nc_all_to_all_v_u(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc,
                                  moe_dtype dt, moe_device d) {
    MOE_TRY(moe_nccl_begin(c, "all_to_all_v"));
    size_t es = moe_dtype_size(dt), ts = 0, tr = 0;
    for (int r = 0; r < c->size; r++) { ts += sc[r]; tr += rc[r]; }
    const void *din; void *dout;
    MOE_TRY(stage_in(c, d, in, ts * es, out, tr * es, &din, &dout, "all_to_all_v"));
    MOE_TRY(moe_nccl_enqueue_a2a(c, din, sc, dout, rc, dt));
    MOE_TRY(nccl_wait(c, "all_to_all_v"));
    return stage_out(c, d, out, dout, tr * es, "all_to_all_v");
}

/* Every operation holds the communicator's lock while it runs (see q_mu). */
#define LOCKED(name, params, args)                                                                  \
    static moe_status name params {                                                                   \
        nccl_impl *m_ = c->impl;                                                                      \
        pthread_mutex_lock(&m_->q_mu);                                                                \
        moe_status s_ = name##_u args;                                                                \
        pthread_mutex_unlock(&m_->q_mu);                                                              \
        return s_;                                                                                    \
    }
LOCKED(nc_all_reduce, (moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d), (c, buf, n, dt, op, d))
LOCKED(nc_all_reduce_start, (moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d),
       (c, buf, n, dt, op, d))
LOCKED(nc_wait_pending, (moe_comm *c), (c))
LOCKED(nc_barrier, (moe_comm *c), (c))
LOCKED(nc_broadcast, (moe_comm *c, void *buf, size_t n, moe_dtype dt, int root, moe_device d), (c, buf, n, dt, root, d))
LOCKED(nc_all_gather, (moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d), (c, in, out, n, dt, d))
LOCKED(nc_reduce_scatter,
       (moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_dist_op op, moe_device d),
       (c, in, out, n, dt, op, d))
LOCKED(nc_all_to_all_v,
       (moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc, moe_dtype dt, moe_device d),
       (c, in, sc, out, rc, dt, d))
LOCKED(nc_all_to_all_v_queued,
       (moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc, moe_dtype dt, moe_device d,
        int join, int *queued),
       (c, in, sc, out, rc, dt, d, join, queued))
LOCKED(nc_join_queued, (moe_comm *c, moe_device d), (c, d))
LOCKED(nc_check_queued, (moe_comm *c), (c))
LOCKED(nc_all_gather_queued,
       (moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d, int join, int *queued),
       (c, in, out, n, dt, d, join, queued))
LOCKED(nc_reduce_scatter_queued,
       (moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_dist_op op, moe_device d, int join,
        int *queued),
       (c, in, out, n, dt, op, d, join, queued))
static moe_status nc_split_u(moe_comm *c, int color, int key, const int *members, moe_comm *child);
LOCKED(nc_split, (moe_comm *c, int color, int key, const int *members, moe_comm *child), (c, color, key, members, child))
#undef LOCKED

static void nc_destroy(moe_comm *c) {
    nccl_impl *m = c->impl;
    if (!m) return;
    if (m->hb_running) {   /* first: the watcher may abort the communicator */
        m->hb_stop = 1;
        pthread_join(m->hb_thread, NULL);
    }
    if (m->comm) {
        /* destroy waits for the communicator's work: work that may never end is aborted instead */
        int unfinished = m->pending || (m->q_pending && m->q_done && cudaEventQuery(m->q_done) != cudaSuccess);
        if (m->broken || unfinished) moe_nccl_abort(m);
        else m->api.CommDestroy(m->comm);
        m->comm = NULL;
    }
    free(m->hb_dir);
    free(m->hb_seen);
    free(m->hb_seen_at);
    if (m->ready) cudaEventDestroy(m->ready);
    if (m->q_done) cudaEventDestroy(m->q_done);
    pthread_mutex_destroy(&m->q_mu);
    if (m->stream) cudaStreamDestroy(m->stream);
    if (m->scratch) cudaFree(m->scratch);   /* waits for the device */
    /* the library stays loaded: NCCL keeps threads of its own */
    free(m);
    c->impl = NULL;
}

static const moe_comm_ops nccl_ops = {
    .name = "nccl", .supports = nc_supports, .barrier = nc_barrier, .all_reduce = nc_all_reduce,
    .broadcast = nc_broadcast, .all_gather = nc_all_gather, .reduce_scatter = nc_reduce_scatter,
    .all_to_all_v = nc_all_to_all_v, .split = nc_split, .destroy = nc_destroy,
    .all_to_all_v_queued = nc_all_to_all_v_queued, .join_queued = nc_join_queued,
    .all_gather_queued = nc_all_gather_queued, .reduce_scatter_queued = nc_reduce_scatter_queued,
    .check_queued = nc_check_queued,
    .all_reduce_start = nc_all_reduce_start, .wait_pending = nc_wait_pending,
};

/* The child runs on the parent's device with a stream of its own. Its NCCL
 * communicator comes from ncclCommSplit, or from a unique id made by the
 * group's rank 0 (members[0]) and all-gathered over the parent with a status
 * byte, so a failure there reaches the whole group instead of a hang. */
static moe_status nc_split_u(moe_comm *c, int color, int key, const int *members, moe_comm *child) {
    nccl_impl *pm = c->impl;
    MOE_TRY(moe_nccl_begin(c, "split"));
    nccl_impl *m = impl_new();
    if (!m) return moe_error(MOE_ERR_OOM, "split: out of memory");
    m->api = pm->api;   /* the library stays loaded for the process */
    m->device = pm->device;
    child->ops = &nccl_ops;
    child->impl = m;
    if (cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking) != cudaSuccess) {
        m->stream = NULL;
        return moe_error(MOE_ERR_DEVICE, "split: cannot create a CUDA stream on cuda:%d", m->device);
    }
    const char *how = getenv("MOELAB_NCCL_SPLIT");
    int new_id = (how && !strcmp(how, "new_id")) || !m->api.CommSplit;
    if (!new_id) {
        ncclResult_t r = m->api.CommSplit(pm->comm, color, key, &m->comm, NULL);
        if (r != ncclSuccess) {
            m->comm = NULL;
            return moe_error(MOE_ERR_IO, "ncclCommSplit (rank %d of %d, color %d): %s", c->rank, c->size, color,
                             m->api.GetErrorString(r));
        }
        return MOE_OK;
    }
    /* one slot per parent rank: a status byte, then the id (group leaders fill theirs) */
    size_t slot = 1 + sizeof(ncclUniqueId);
    int64_t s1[1] = {(int64_t)slot}, s2[1] = {(int64_t)slot * c->size};
    moe_tensor *mine = moe_tensor_new_cpu(MOE_U8, 1, s1), *all = moe_tensor_new_cpu(MOE_U8, 1, s2);
    moe_status s = mine && all ? MOE_OK : moe_last_status(), made = MOE_OK;
    if (s == MOE_OK) {
        unsigned char *p = moe_tensor_data(mine);
        memset(p, 0, slot);
        if (child->rank == 0) {
            ncclUniqueId id;
            ncclResult_t r = m->api.GetUniqueId(&id);
            if (r == ncclSuccess) {
                p[0] = 1;
                memcpy(p + 1, &id, sizeof id);
            } else {
                made = moe_error(MOE_ERR_IO, "ncclGetUniqueId: %s", m->api.GetErrorString(r));
            }
        }
        s = moe_comm_all_gather(c, mine, all);   /* every rank joins, whatever happened above */
    }
    if (s == MOE_OK && made != MOE_OK) s = made;
    if (s == MOE_OK) {
        const unsigned char *lead = (const unsigned char *)moe_tensor_data(all) + slot * (size_t)members[0];
        ncclUniqueId id;
        memcpy(&id, lead + 1, sizeof id);
        if (!lead[0]) {
            s = moe_error(MOE_ERR_IO, "rank %d (rank 0 of the group of color %d) could not make an NCCL id",
                          members[0], color);
        } else if (cudaSetDevice(m->device) != cudaSuccess) {
            s = moe_error(MOE_ERR_DEVICE, "split: cannot use cuda:%d", m->device);
        } else {
            ncclResult_t r = m->api.CommInitRank(&m->comm, child->size, id, child->rank);
            if (r != ncclSuccess) {
                m->comm = NULL;
                s = moe_error(MOE_ERR_IO, "ncclCommInitRank (rank %d of %d, color %d): %s", child->rank,
                              child->size, color, m->api.GetErrorString(r));
            }
        }
    }
    moe_tensor_release(mine);
    moe_tensor_release(all);
    return s;
}

static int env_int(const char *name, int def) {
    const char *v = getenv(name);
    return v && *v ? atoi(v) : def;
}

/* Rank 0 writes <dir>/nccl_id (to a temporary name, then renamed); the others
 * wait for it until the deadline. */
static moe_status file_rendezvous(const char *dir, int rank, ncclUniqueId *id, double timeout_s, nccl_api *a) {
    char path[4096], tmp[4200];
    snprintf(path, sizeof path, "%s/nccl_id", dir);
    if (rank == 0) {
        ncclResult_t r = a->GetUniqueId(id);
        if (r != ncclSuccess) return moe_error(MOE_ERR_IO, "dist: ncclGetUniqueId: %s", a->GetErrorString(r));
        snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
        FILE *f = fopen(tmp, "wb");
        if (!f || fwrite(id, sizeof *id, 1, f) != 1 || fclose(f) != 0 || rename(tmp, path) != 0)
            return moe_error(MOE_ERR_IO, "dist: cannot write the rendezvous file %s", path);
        return MOE_OK;
    }
    double deadline = moe_dist_now() + timeout_s;
    for (;;) {
        FILE *f = fopen(path, "rb");
        if (f) {
            size_t got = fread(id, sizeof *id, 1, f);
            fclose(f);
            if (got == 1) return MOE_OK;
        }
        if (moe_dist_now() > deadline)
            return moe_error(MOE_ERR_STATE, "dist: rank %d: no NCCL id from rank 0 in %s after %.0f s", rank, path,
                             timeout_s);
        struct timespec ts = {0, 50000000};
        nanosleep(&ts, NULL);
    }
}

moe_comm *moe_comm_nccl_new(moe_ctx *ctx, moe_comm *bootstrap, const char *rendezvous_dir, int device,
                            double timeout_s) {
    setenv("NCCL_NVLS_ENABLE", "0", 0);
    moe_comm *c = calloc(1, sizeof *c);
    nccl_impl *m = impl_new();
    if (!c || !m) { free(c); free(m); moe_error(MOE_ERR_OOM, "dist: out of memory"); return NULL; }
    c->ops = &nccl_ops;
    c->impl = m;
    c->ctx = ctx;
    c->timeout_s = timeout_s > 0 ? timeout_s : MOE_DIST_DEFAULT_TIMEOUT_S;
    m->timeout_s = c->timeout_s;
    m->device = device;
    moe_status s = load_api(&m->api);
    if (bootstrap) {
        c->rank = bootstrap->rank;
        c->size = bootstrap->size;
        c->local_rank = bootstrap->local_rank;
        c->local_size = bootstrap->local_size;
    } else {
        c->rank = env_int("RANK", 0);
        c->size = env_int("WORLD_SIZE", 1);
        c->local_rank = env_int("LOCAL_RANK", c->rank);
        c->local_size = env_int("LOCAL_WORLD_SIZE", c->size);
        if (s == MOE_OK && !rendezvous_dir)
            s = moe_error(MOE_ERR_ARG, "dist: NCCL without a bootstrap communicator needs a rendezvous directory");
    }
    ncclUniqueId id;
    memset(&id, 0, sizeof id);
    if (s == MOE_OK && bootstrap) {
        if (c->rank == 0) {
            ncclResult_t r = m->api.GetUniqueId(&id);
            if (r != ncclSuccess) s = moe_error(MOE_ERR_IO, "dist: ncclGetUniqueId: %s", m->api.GetErrorString(r));
        }
        /* every rank joins the broadcast, so a failure on rank 0 still reaches the others as a zero id */
        int64_t shape[1] = {(int64_t)sizeof id};
        moe_storage *st = moe_storage_wrap(&id, sizeof id, MOE_DEVICE_CPU);
        moe_tensor *t = st ? moe_tensor_from_storage(st, 0, MOE_U8, 1, shape, NULL) : NULL;
        moe_status b = t ? moe_comm_broadcast(bootstrap, t, 0) : moe_last_status();
        if (t) moe_tensor_release(t);
        if (st) moe_storage_release(st);
        if (s == MOE_OK) s = b;
    } else if (s == MOE_OK) {
        s = file_rendezvous(rendezvous_dir, c->rank, &id, c->timeout_s, &m->api);
    }
    if (s == MOE_OK && cudaSetDevice(device) != cudaSuccess)
        s = moe_error(MOE_ERR_DEVICE, "dist: cannot use cuda:%d", device);
    if (s == MOE_OK && cudaStreamCreateWithFlags(&m->stream, cudaStreamNonBlocking) != cudaSuccess)
        s = moe_error(MOE_ERR_DEVICE, "dist: cannot create a CUDA stream on cuda:%d", device);
    if (s == MOE_OK) {
        ncclResult_t r = m->api.CommInitRank(&m->comm, c->size, id, c->rank);
        if (r != ncclSuccess) {
            m->comm = NULL;
            s = moe_error(MOE_ERR_IO, "dist: ncclCommInitRank (rank %d of %d): %s", c->rank, c->size,
                          m->api.GetErrorString(r));
        }
    }
    if (s == MOE_OK && !bootstrap && rendezvous_dir) {
        m->hb_dir = strdup(rendezvous_dir);
        m->hb_rank = c->rank;
        m->hb_size = c->size;
        const char *hs = getenv("MOELAB_DIST_HEARTBEAT_S");
        m->hb_stale_s = hs && atof(hs) > 0 ? atof(hs) : 15.0;
        m->hb_since = moe_dist_now();
        m->hb_seen = calloc((size_t)c->size, sizeof *m->hb_seen);
        m->hb_seen_at = calloc((size_t)c->size, sizeof *m->hb_seen_at);
        for (int r = 0; m->hb_seen_at && r < c->size; r++) m->hb_seen_at[r] = m->hb_since;
        if (!m->hb_seen || !m->hb_seen_at) { free(m->hb_dir); m->hb_dir = NULL; }
        if (m->hb_dir) {
            moe_nccl_hb_write(m->hb_dir, m->hb_rank);
            m->hb_running = pthread_create(&m->hb_thread, NULL, moe_nccl_hb_main, m) == 0;
            if (!m->hb_running) { free(m->hb_dir); m->hb_dir = NULL; }
        }
    }
    if (s != MOE_OK) {
        moe_comm_free(c);
        return NULL;
    }
    return c;
}

#endif
