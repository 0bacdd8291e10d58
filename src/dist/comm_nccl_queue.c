/* Collectives of the NCCL communicator queued on the compute stream (see
 * comm.h: moe_comm_all_to_all_v_queued, _start, all_gather_queued,
 * reduce_scatter_queued, join_queued): between two events, after the compute
 * stream's work so far and, unless the caller joins later, before its later
 * work; the host does not wait. The heartbeat thread watches them
 * (comm_nccl_watch.c). */
#ifdef MOELAB_CUDA

#include "comm_nccl.h"
#include "../ops/cuda/moe_cuda.h"

static moe_status event(cudaEvent_t *e, const char *what) {
    if (*e) return MOE_OK;
    if (cudaEventCreateWithFlags(e, cudaEventDisableTiming) == cudaSuccess) return MOE_OK;
    *e = NULL;
    return moe_error(MOE_ERR_DEVICE, "%s: cannot create a CUDA event", what);
}

/* Queues enqueue(c, arg) on our stream between two events: after the
 * compute stream's work so far, and (join) before its later work. The
 * heartbeat thread watches it; *queued = 0 and nothing is done when there is
 * no watcher (the caller then runs the blocking collective). */
static moe_status queue_ordered(moe_comm *c, moe_device d, int join, int *queued, const char *what,
                                moe_status (*enqueue)(moe_comm *c, void *arg), void *arg) {
    nccl_impl *m = c->impl;
    *queued = 0;
    if (!m->hb_running || d.type != MOE_CUDA) return MOE_OK;   /* nobody would watch it: blocking */
    MOE_TRY(moe_nccl_begin(c, what));
    cudaStream_t compute = (cudaStream_t)moe_cuda_stream(c->ctx, d.index);
    if (!compute) return moe_last_status();
    MOE_TRY(event(&m->ready, what));
    MOE_TRY(event(&m->q_done, what));
    pthread_mutex_lock(&m->q_mu);
    /* the timeout counts from the oldest exchange not yet seen finished */
    if (!m->q_pending || cudaEventQuery(m->q_done) == cudaSuccess) m->q_since = moe_dist_now();
    moe_status s = MOE_OK;
    if (cudaEventRecord(m->ready, compute) != cudaSuccess || cudaStreamWaitEvent(m->stream, m->ready, 0) != cudaSuccess)
        s = moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(cudaGetLastError()));
    if (s == MOE_OK) s = enqueue(c, arg);
    if (s == MOE_OK && (cudaEventRecord(m->q_done, m->stream) != cudaSuccess ||
                        (join && cudaStreamWaitEvent(compute, m->q_done, 0) != cudaSuccess))) {
        /* the collective runs, but nothing orders the compute stream after it: its buffers are not safe to reuse */
        cudaStreamSynchronize(m->stream);
        m->broken = 1;
        s = moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(cudaGetLastError()));
    }
    if (s == MOE_OK) m->q_pending = 1;
    pthread_mutex_unlock(&m->q_mu);
    if (s == MOE_OK) *queued = 1;
    return s;
}

typedef struct {
    const void *in; const size_t *sc; void *out; const size_t *rc; moe_dtype dt; size_t n; moe_dist_op op;
} queued_args;

static moe_status enqueue_a2a_v(moe_comm *c, void *arg) {
    queued_args *a = arg;
    return moe_nccl_enqueue_a2a(c, a->in, a->sc, a->out, a->rc, a->dt);
}

moe_status nc_all_to_all_v_queued_u(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc,
                                         moe_dtype dt, moe_device d, int join, int *queued) {
    queued_args a = {in, sc, out, rc, dt, 0, MOE_DIST_SUM};
    return queue_ordered(c, d, join, queued, "all_to_all_v", enqueue_a2a_v, &a);
}

static moe_status enqueue_all_gather(moe_comm *c, void *arg) {
    nccl_impl *m = c->impl;
    queued_args *a = arg;
    size_t n = a->n;
    ncclDataType_t t = moe_nccl_type(a->dt, &n);
    return moe_nccl_check(m, m->api.AllGather(a->in, a->out, n, t, m->comm, m->stream), "ncclAllGather");
}

moe_status nc_all_gather_queued_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d,
                                       int join, int *queued) {
    queued_args a = {in, NULL, out, NULL, dt, n, MOE_DIST_SUM};
    return queue_ordered(c, d, join, queued, "all_gather", enqueue_all_gather, &a);
}

static moe_status enqueue_reduce_scatter(moe_comm *c, void *arg) {
    nccl_impl *m = c->impl;
    queued_args *a = arg;
    size_t n = a->n;
    ncclDataType_t t = moe_nccl_type(a->dt, &n);
    return moe_nccl_check(m, m->api.ReduceScatter(a->in, a->out, n, t, a->op == MOE_DIST_AVG ? ncclAvg : ncclSum, m->comm,
                                              m->stream), "ncclReduceScatter");
}

moe_status nc_reduce_scatter_queued_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt,
                                           moe_dist_op op, moe_device d, int join, int *queued) {
    queued_args a = {in, NULL, out, NULL, dt, n, op};
    return queue_ordered(c, d, join, queued, "reduce_scatter", enqueue_reduce_scatter, &a);
}

/* q_done was recorded after the latest queued exchange (none: nothing to wait for). */
/* The wait is queued even on a communicator the watcher aborted (the
 * caller releases the buffers next); its verdict is reported after. */
moe_status nc_join_queued_u(moe_comm *c, moe_device d) {
    nccl_impl *m = c->impl;
    if (m->q_pending && m->q_done) {
        cudaSetDevice(m->device);
        cudaStream_t compute = (cudaStream_t)moe_cuda_stream(c->ctx, d.index);
        if (!compute) return moe_last_status();
        if (cudaStreamWaitEvent(compute, m->q_done, 0) != cudaSuccess) {
            /* the collective runs, but nothing orders the compute stream after it: its buffers are not safe to reuse */
            cudaStreamSynchronize(m->stream);
            m->broken = 1;
            return moe_error(MOE_ERR_DEVICE, "queued collective: %s", cudaGetErrorString(cudaGetLastError()));
        }
    }
    return moe_nccl_begin(c, "a queued collective");
}

moe_status nc_check_queued_u(moe_comm *c) { return moe_nccl_begin(c, "a queued collective"); }

#endif
