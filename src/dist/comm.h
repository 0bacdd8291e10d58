/* Communicators: the collectives data and expert parallelism are built from.
 *
 * A moe_comm is a struct of function pointers (moe_comm_ops) plus its state;
 * there are three implementations:
 *   single  one process, identity collectives (always available);
 *   mpi     OpenMPI, CPU tensors (built when mpicc is found: MOELAB_MPI);
 *   nccl    NCCL, CUDA tensors (CUDA builds only: MOELAB_CUDA; libnccl.so.2
 *           is opened at run time, so the program starts where NCCL is absent).
 * Each communicator belongs to one moe_ctx (the one it was created with) and
 * is used from one thread at a time.
 *
 * Failures return a status with the message set (moe_error), never abort.
 * Timeouts and dead ranks (what is and is not covered):
 *   - every blocking collective of the MPI communicator is a non-blocking MPI
 *     call polled against a deadline (timeout_s). Ranks talk on a separate
 *     control channel: a rank that leaves (its program ends, normally or by
 *     an error, or calls exit()) tells the others, which then fail at once
 *     with "rank K has left"; when a collective makes no progress for
 *     timeout_s, the rank asks every other rank where it is and fails with
 *     the ranks that did not answer (dead, stuck in a long computation, or in
 *     a different collective: their position is reported when they answer).
 *   - a rank killed by a signal (SIGKILL, a segfault) cannot say goodbye:
 *     mpirun then ends the whole job itself and names the rank; the timeout
 *     covers the remaining case where mpirun does not.
 *   - after a failure the communicator is broken (further calls fail at once)
 *     and the process ends with MPI_Abort instead of MPI_Finalize (a pending
 *     collective cannot be finalized).
 *   - NCCL: kernels are polled with cudaStreamQuery against the deadline and
 *     the communicator is aborted (ncclCommAbort) on timeout; NCCL cannot
 *     tell which peer is missing, so the error names none.
 *   - MPI errors use MPI_ERRORS_RETURN and come back as statuses.
 *
 * Process-wide state: MPI can be initialised once per process and finalised
 * once, so the MPI runtime (initialised flag, the control channel, the ranks
 * known to have left, the exit hook that says goodbye and finalises) is
 * process-wide in comm_mpi.c, behind a mutex. Each moe_comm still has its
 * own MPI communicator (a duplicate of MPI_COMM_WORLD, or a split of one).
 *
 * Sub-communicators (moe_comm_split): the ranks of a communicator that pass
 * the same color form a child communicator with its own rank (ordered by key,
 * then the parent rank) and size, like MPI_Comm_split. The child holds a
 * reference to its parent (moe_comm_free drops references; a communicator is
 * destroyed when the last one goes, children before their parent), and is
 * otherwise independent: it has its own MPI communicator / NCCL communicator
 * and stream, and the same devices as the parent. */
#ifndef MOE_DIST_COMM_H
#define MOE_DIST_COMM_H

#include <stddef.h>
#include <stdint.h>

#include "../core/context.h"
#include "../core/device.h"
#include "../core/dtype.h"
#include "../core/status.h"
#include "../core/tensor.h"

typedef enum { MOE_DIST_SUM = 0, MOE_DIST_AVG = 1 } moe_dist_op;

typedef struct moe_comm moe_comm;

/* Buffer-level operations of one implementation. Buffers are contiguous,
 * counts are in elements, and the wrappers below have already checked the
 * arguments (dtype, device, sizes). Reductions take f32 or f64; the others
 * move any dtype. */
typedef struct {
    const char *name;                                   /* "single", "mpi", "nccl" */
    int (*supports)(const moe_comm *c, moe_device dev); /* can it work on this device's memory? */
    moe_status (*barrier)(moe_comm *c);
    moe_status (*all_reduce)(moe_comm *c, void *buf, size_t count, moe_dtype dt, moe_dist_op op, moe_device dev);
    moe_status (*broadcast)(moe_comm *c, void *buf, size_t count, moe_dtype dt, int root, moe_device dev);
    /* out holds size * count elements, rank-major */
    moe_status (*all_gather)(moe_comm *c, const void *in, void *out, size_t count, moe_dtype dt, moe_device dev);
    /* in holds size * count elements; rank r gets the reduction of block r */
    moe_status (*reduce_scatter)(moe_comm *c, const void *in, void *out, size_t count, moe_dtype dt,
                                 moe_dist_op op, moe_device dev);
    /* send_counts[r] elements to rank r (blocks consecutive in `in`), recv_counts[r]
     * from rank r (consecutive in `out`) */
    moe_status (*all_to_all_v)(moe_comm *c, const void *in, const size_t *send_counts, void *out,
                               const size_t *recv_counts, moe_dtype dt, moe_device dev);
    /* the implementation's part of moe_comm_split: `child` arrives with ctx,
     * rank, size, local_rank, local_size and timeout_s set; members[i] is the
     * parent rank of child rank i. Sets child->ops and child->impl. */
    moe_status (*split)(moe_comm *c, int color, int key, const int *members, moe_comm *child);
    void (*destroy)(moe_comm *c);                       /* frees impl; not c itself */
    /* Optional (NULL: the wrappers below run the blocking all_reduce): queue an
     * all-reduce of a device buffer behind the work already queued on the
     * device's compute stream, without waiting; wait_pending waits (with the
     * deadline) for every one queued so far. */
    moe_status (*all_reduce_start)(moe_comm *c, void *buf, size_t count, moe_dtype dt, moe_dist_op op, moe_device dev);
    moe_status (*wait_pending)(moe_comm *c);
    /* Optional (NULL: the blocking all_to_all_v): the exchange ordered on the
     * device's compute stream (it starts after the work queued there and the
     * compute stream's later work starts after it), no host wait. Sets
     * *queued = 0 and does nothing when it cannot watch a queued exchange
     * (then the caller runs the blocking one). join = 0 leaves the compute
     * stream free to run other work meanwhile, until join_queued. */
    moe_status (*all_to_all_v_queued)(moe_comm *c, const void *in, const size_t *send_counts, void *out,
                                      const size_t *recv_counts, moe_dtype dt, moe_device dev, int join, int *queued);
    /* The compute stream's later work waits for every exchange queued so far. */
    moe_status (*join_queued)(moe_comm *c, moe_device dev);
    /* Optional: the watcher's verdict when it aborted a queued collective (results read since are not valid). */
    moe_status (*check_queued)(moe_comm *c);
    /* Optional (NULL: the blocking calls): queued like all_to_all_v_queued. */
    moe_status (*all_gather_queued)(moe_comm *c, const void *in, void *out, size_t count, moe_dtype dt, moe_device dev,
                                    int join, int *queued);
    moe_status (*reduce_scatter_queued)(moe_comm *c, const void *in, void *out, size_t count, moe_dtype dt,
                                        moe_dist_op op, moe_device dev, int join, int *queued);
} moe_comm_ops;

struct moe_comm {
    const moe_comm_ops *ops;
    void *impl;
    moe_ctx *ctx;          /* device synchronisation and copies */
    int rank, size;        /* in the job */
    int local_rank, local_size;   /* on this host */
    double timeout_s;      /* a collective making no progress this long fails */
    uint64_t seq;          /* collectives issued, for error messages */
    /* all_to_all_v accounting (host clock): calls, seconds waiting for the
     * device's queued work before the exchange, seconds in the exchange itself */
    uint64_t a2a_calls;
    double a2a_wait_s, a2a_s;
    int refs;              /* references beyond the first (moe_comm_retain); 0: one owner */
    moe_comm *parent;      /* the communicator this one was split from (a reference), or NULL */
};

#define MOE_DIST_DEFAULT_TIMEOUT_S 300.0

/* Is this process one rank of an mpirun job (OMPI_COMM_WORLD_SIZE or
 * PMI_SIZE/PMIX_RANK set)? */
int moe_dist_launched_by_mpi(void);
/* Was the MPI communicator compiled in? */
int moe_dist_have_mpi(void);
int moe_dist_have_nccl(void);   /* compiled in; the library is opened at moe_comm_nccl_new */

moe_comm *moe_comm_single_new(moe_ctx *ctx);
/* MPI_Init_thread on first use (only when launched by mpirun), then a
 * duplicate of MPI_COMM_WORLD with MPI_ERRORS_RETURN. timeout_s <= 0: default. */
moe_comm *moe_comm_mpi_new(moe_ctx *ctx, double timeout_s);
/* NCCL over the CUDA device `device`; the unique id travels over `bootstrap`
 * (any communicator of the same ranks, e.g. MPI; broadcast from rank 0) or,
 * when bootstrap is NULL, through the file rendezvous_dir/nccl_id written
 * by rank 0 (rank and size then come from RANK/WORLD_SIZE/LOCAL_RANK, as torchrun
 * sets them). Keep NCCL_NVLS_ENABLE=0 where NVLink multicast is unavailable:
 * it is set (without overriding a user value) before the first init. */
moe_comm *moe_comm_nccl_new(moe_ctx *ctx, moe_comm *bootstrap, const char *rendezvous_dir, int device,
                            double timeout_s);
/* Drops a reference: the communicator is destroyed when the last one goes
 * (then its parent's reference is dropped too). */
void moe_comm_free(moe_comm *c);
moe_comm *moe_comm_retain(moe_comm *c);

/* Splits `parent` (collective: every rank of the parent calls it): the ranks
 * with the same color (>= 0) form *child, ranked by key, then by their parent
 * rank. local_rank/local_size of the child count its members on this host
 * (by host name). The colors and keys are first all-gathered over the parent
 * (a deadline-guarded collective, so a missing rank fails instead of
 * hanging), then the implementation splits:
 *   single  a new single-process communicator;
 *   mpi     MPI_Comm_split;
 *   nccl    ncclCommSplit when the loaded libnccl has it (NCCL >= 2.18), else
 *           (or with MOELAB_NCCL_SPLIT=new_id) a new communicator from a fresh
 *           unique id that each group's rank 0 makes and the parent all-gathers.
 * Expert parallel x data parallel uses it for the expert-parallel groups
 * (consecutive ranks; see lua/moelab/distributed.lua). */
moe_status moe_comm_split(moe_comm *parent, int color, int key, moe_comm **child);

/* Tensor-level collectives: check dtype (f32/f64 for reductions), device
 * (supported by the communicator, the same for in and out), contiguity and
 * sizes, then call the implementation. */
moe_status moe_comm_barrier(moe_comm *c);
moe_status moe_comm_all_reduce(moe_comm *c, moe_tensor *t, moe_dist_op op);
/* all_reduce in chunks of at most bucket_bytes (0: one call): the bucketed
 * gradient all-reduce of data parallelism over a flat buffer. */
moe_status moe_comm_all_reduce_bucketed(moe_comm *c, moe_tensor *t, moe_dist_op op, size_t bucket_bytes);
/* Elements [offset, offset + count) of contiguous t, all-reduced in place.
 * On GPU tensors over NCCL the reduction is queued and the call returns
 * (overlap with the compute that follows); moe_comm_wait_pending waits for
 * all queued ones. Elsewhere it runs to completion here. Every rank must
 * start the same ranges in the same order. */
moe_status moe_comm_all_reduce_start(moe_comm *c, moe_tensor *t, int64_t offset, int64_t count, moe_dist_op op);
moe_status moe_comm_wait_pending(moe_comm *c);
moe_status moe_comm_broadcast(moe_comm *c, moe_tensor *t, int root);
/* out has size * numel(in) elements */
moe_status moe_comm_all_gather(moe_comm *c, const moe_tensor *in, moe_tensor *out);
/* The same, queued on the compute stream like moe_comm_all_to_all_v_queued
 * where the communicator can (GPU tensors over NCCL with heartbeats), so a
 * later copy to the host waits for it with the device's other work (the
 * expert-parallel counts ride the routing's one synchronisation). join = 0
 * leaves the compute stream free until moe_comm_join_queued, as
 * moe_comm_all_to_all_v_start does (keep in and out alive till then).
 * Elsewhere the blocking call. */
moe_status moe_comm_all_gather_queued(moe_comm *c, const moe_tensor *in, moe_tensor *out, int join);
/* reduce_scatter queued the same way */
moe_status moe_comm_reduce_scatter_queued(moe_comm *c, const moe_tensor *in, moe_tensor *out, moe_dist_op op, int join);
/* After reading what queued collectives wrote (a copy to the host): fails,
 * naming the cause, when the communicator's watcher aborted them meanwhile
 * (a dead rank: the results are garbage). MOE_OK elsewhere. */
moe_status moe_comm_check_queued(moe_comm *c);
/* in has size * numel(out) elements */
moe_status moe_comm_reduce_scatter(moe_comm *c, const moe_tensor *in, moe_tensor *out, moe_dist_op op);
/* counts in elements, one per rank; sum(send_counts) <= numel(in), sum(recv_counts) <= numel(out) */
moe_status moe_comm_all_to_all_v(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                 const int64_t *recv_counts);
/* The same exchange, for GPU tensors over NCCL with heartbeats (the file
 * rendezvous launch) queued on the compute stream without any host wait:
 * expert parallelism's token exchanges, so the host keeps queueing work
 * ahead of the GPU. A rank that dies or stops mid-exchange is caught by the
 * communicator's watchdog thread (stale heartbeat, or no progress within the
 * timeout), which aborts NCCL; the next collective then fails naming it.
 * Elsewhere (MPI, CPU tensors, mpirun-launched NCCL) it is the blocking call. */
moe_status moe_comm_all_to_all_v_queued(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                        const int64_t *recv_counts);
/* The queued exchange without ordering the compute stream after it: work
 * queued next runs alongside it (the experts' weight gradients while their
 * input gradients travel). The caller keeps in and out alive and touches
 * neither until moe_comm_join_queued, which orders the compute stream's
 * later work after every exchange started so far. Where the exchange cannot
 * be queued, start runs the blocking one and join does nothing. */
moe_status moe_comm_all_to_all_v_start(moe_comm *c, const moe_tensor *in, const int64_t *send_counts, moe_tensor *out,
                                       const int64_t *recv_counts);
moe_status moe_comm_join_queued(moe_comm *c, moe_device dev);

/* "sum"/"avg" (also "mean") -> op; -1 for an unknown name */
int moe_dist_op_parse(const char *name);

/* Used by the implementations: monotonic seconds. */
double moe_dist_now(void);

#endif
