/* The NCCL communicator's internals, shared by its files (CUDA builds only):
 * comm_nccl.c (creation, blocking collectives, splits), comm_nccl_watch.c
 * (heartbeats and the watcher of queued collectives) and comm_nccl_queue.c
 * (collectives queued on the compute stream). See comm_nccl.c's header. */
#ifndef MOE_DIST_COMM_NCCL_H
#define MOE_DIST_COMM_NCCL_H

#include "comm.h"

#include <cuda_runtime.h>
#include <nccl.h>
#include <pthread.h>

typedef struct {
    void *lib;
    ncclResult_t (*GetUniqueId)(ncclUniqueId *);
    ncclResult_t (*CommInitRank)(ncclComm_t *, int, ncclUniqueId, int);
    ncclResult_t (*CommAbort)(ncclComm_t);
    ncclResult_t (*CommDestroy)(ncclComm_t);
    ncclResult_t (*CommGetAsyncError)(ncclComm_t, ncclResult_t *);
    const char *(*GetErrorString)(ncclResult_t);
    ncclResult_t (*AllReduce)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*Broadcast)(const void *, void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*AllGather)(const void *, void *, size_t, ncclDataType_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*ReduceScatter)(const void *, void *, size_t, ncclDataType_t, ncclRedOp_t, ncclComm_t, cudaStream_t);
    ncclResult_t (*Send)(const void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*Recv)(void *, size_t, ncclDataType_t, int, ncclComm_t, cudaStream_t);
    ncclResult_t (*GroupStart)(void);
    ncclResult_t (*GroupEnd)(void);
    /* optional (NCCL >= 2.18): NULL when the loaded library lacks it; the
     * config pointer is passed as NULL (the defaults) */
    ncclResult_t (*CommSplit)(ncclComm_t, int, int, ncclComm_t *, void *);
} nccl_api;

typedef struct {
    nccl_api api;
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    int broken;
    void *scratch;         /* device staging buffer for CPU tensors */
    size_t scratch_bytes;
    cudaEvent_t ready;     /* queued all-reduces: recorded on the compute stream, waited by ours */
    int pending;           /* all-reduces queued and not yet waited for */
    /* heartbeats (file rendezvous only): see the header */
    char *hb_dir;
    int hb_rank, hb_size;
    double hb_stale_s, hb_since, hb_checked;
    double *hb_seen, *hb_seen_at;   /* per rank: last heartbeat value read, and when it changed (our clock) */
    pthread_t hb_thread;
    int hb_running;
    volatile int hb_stop;
    /* queued exchanges, watched by the heartbeat thread (see the header) */
    /* held by this rank's thread for every NCCL operation, by the watcher to
     * abort (so it never frees the communicator under a running call); also
     * guards q_pending, q_since, q_done's record and hb_seen* */
    pthread_mutex_t q_mu;
    cudaEvent_t q_done;     /* recorded on our stream after the latest queued exchange */
    int q_pending;          /* q_done may be unfinished */
    double q_since;         /* when the oldest exchange not yet seen finished was queued */
    double timeout_s;
    int q_aborted;          /* set (atomically) by the watcher once it aborted the communicator */
    char q_error[512];      /* its verdict, written before q_aborted is set */
} nccl_impl;

static inline int watcher_aborted(nccl_impl *m) { return __atomic_load_n(&m->q_aborted, __ATOMIC_ACQUIRE); }

/* comm_nccl.c */
ncclDataType_t moe_nccl_type(moe_dtype dt, size_t *count);
moe_status moe_nccl_check(nccl_impl *m, ncclResult_t r, const char *what);
/* every operation starts here: the watcher's verdict, a broken communicator, the device */
moe_status moe_nccl_begin(moe_comm *c, const char *what);
/* one grouped send/recv per peer on our stream, no wait */
moe_status moe_nccl_enqueue_a2a(moe_comm *c, const void *din, const size_t *sc, void *dout, const size_t *rc, moe_dtype dt);

/* comm_nccl_watch.c */
void moe_nccl_abort(nccl_impl *m);   /* once; the communicator is never touched again */
void moe_nccl_hb_write(const char *dir, int rank);
/* ranks whose heartbeat is older than the limit, as "1, 3" in buf; their count */
int moe_nccl_hb_stale(nccl_impl *m, char *buf, size_t n, double *worst_age);
void *moe_nccl_hb_main(void *arg);   /* the heartbeat thread */

/* comm_nccl_queue.c: the communicator's ops, called with its lock held */
moe_status nc_all_to_all_v_queued_u(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc,
                                    moe_dtype dt, moe_device d, int join, int *queued);
moe_status nc_all_gather_queued_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d,
                                  int join, int *queued);
moe_status nc_reduce_scatter_queued_u(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_dist_op op,
                                      moe_device d, int join, int *queued);
moe_status nc_join_queued_u(moe_comm *c, moe_device d);
moe_status nc_check_queued_u(moe_comm *c);

#endif
