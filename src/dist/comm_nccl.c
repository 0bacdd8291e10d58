/* The NCCL communicator (CUDA tensors; CUDA builds only).
 *
 * libnccl.so.2 is opened with dlopen when a communicator is made, so the
 * CUDA program starts (and trains on one GPU) on machines without NCCL; the
 * types come from nccl.h. The unique id is broadcast over a bootstrap
 * communicator (MPI) or read from a rendezvous file written by rank 0.
 * Collectives run on the communicator's own stream after the device's
 * stream is synchronised, and are polled (cudaStreamQuery) against the
 * deadline; on timeout the communicator is aborted (ncclCommAbort) and
 * marked broken. NCCL_NVLS_ENABLE defaults to 0 here (NVLink multicast is
 * not available on every machine); a value the user sets is kept.
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

#include <cuda_runtime.h>
#include <dlfcn.h>
#include <nccl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

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
} nccl_api;

typedef struct {
    nccl_api api;
    ncclComm_t comm;
    cudaStream_t stream;
    int device;
    int broken;
} nccl_impl;

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
    return MOE_OK;
}

static ncclDataType_t nccl_type(moe_dtype dt, size_t *count) {
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

static moe_status nccl_check(nccl_impl *m, ncclResult_t r, const char *what) {
    if (r == ncclSuccess) return MOE_OK;
    m->broken = 1;
    return moe_error(MOE_ERR_IO, "%s: %s", what, m->api.GetErrorString(r));
}

/* Poll the stream until done, an asynchronous NCCL error, or the deadline. */
static moe_status nccl_wait(moe_comm *c, const char *what) {
    nccl_impl *m = c->impl;
    double deadline = moe_dist_now() + c->timeout_s;
    for (int spins = 0;; spins++) {
        cudaError_t e = cudaStreamQuery(m->stream);
        if (e == cudaSuccess) return MOE_OK;
        if (e != cudaErrorNotReady) {
            m->broken = 1;
            return moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e));
        }
        ncclResult_t ar = ncclSuccess;
        m->api.CommGetAsyncError(m->comm, &ar);
        if (ar != ncclSuccess) {
            m->api.CommAbort(m->comm);
            m->broken = 1;
            return moe_error(MOE_ERR_IO, "rank %d: %s: NCCL error: %s", c->rank, what, m->api.GetErrorString(ar));
        }
        if (moe_dist_now() > deadline) {
            m->api.CommAbort(m->comm);
            m->broken = 1;
            return moe_error(MOE_ERR_STATE,
                             "rank %d: %s timed out after %.0f s (collective #%llu); NCCL cannot tell which rank is "
                             "missing (a rank that died or is stuck); the communicator was aborted",
                             c->rank, what, c->timeout_s, (unsigned long long)c->seq);
        }
        if (spins > 1000) {
            struct timespec ts = {0, 50000};
            nanosleep(&ts, NULL);
        }
    }
}

static moe_status begin(moe_comm *c, const char *what) {
    nccl_impl *m = c->impl;
    if (m->broken) return moe_error(MOE_ERR_STATE, "%s: the NCCL communicator is broken after an earlier failure", what);
    cudaError_t e = cudaSetDevice(m->device);
    if (e != cudaSuccess) return moe_error(MOE_ERR_DEVICE, "%s: %s", what, cudaGetErrorString(e));
    return MOE_OK;
}

static int nc_supports(const moe_comm *c, moe_device d) {
    const nccl_impl *m = c->impl;
    return d.type == MOE_CUDA && d.index == m->device;
}

static moe_status nc_all_reduce(moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "all_reduce"));
    MOE_TRY(nccl_check(m, m->api.AllReduce(buf, buf, n, nccl_type(dt, &n), op == MOE_DIST_AVG ? ncclAvg : ncclSum,
                                           m->comm, m->stream), "ncclAllReduce"));
    return nccl_wait(c, "all_reduce");
}

static moe_status nc_barrier(moe_comm *c) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "barrier"));
    void *one = NULL;
    if (cudaMalloc(&one, sizeof(float)) != cudaSuccess) return moe_error(MOE_ERR_OOM, "barrier: cudaMalloc failed");
    moe_status s = nccl_check(m, m->api.AllReduce(one, one, 1, ncclFloat32, ncclSum, m->comm, m->stream), "barrier");
    if (s == MOE_OK) s = nccl_wait(c, "barrier");
    cudaFree(one);
    return s;
}

static moe_status nc_broadcast(moe_comm *c, void *buf, size_t n, moe_dtype dt, int root, moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "broadcast"));
    MOE_TRY(nccl_check(m, m->api.Broadcast(buf, buf, n, nccl_type(dt, &n), root, m->comm, m->stream), "ncclBroadcast"));
    return nccl_wait(c, "broadcast");
}

static moe_status nc_all_gather(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "all_gather"));
    MOE_TRY(nccl_check(m, m->api.AllGather(in, out, n, nccl_type(dt, &n), m->comm, m->stream), "ncclAllGather"));
    return nccl_wait(c, "all_gather");
}

static moe_status nc_reduce_scatter(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_dist_op op,
                                    moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "reduce_scatter"));
    MOE_TRY(nccl_check(m, m->api.ReduceScatter(in, out, n, nccl_type(dt, &n), op == MOE_DIST_AVG ? ncclAvg : ncclSum,
                                               m->comm, m->stream), "ncclReduceScatter"));
    return nccl_wait(c, "reduce_scatter");
}

static moe_status nc_all_to_all_v(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rc,
                                  moe_dtype dt, moe_device d) {
    nccl_impl *m = c->impl;
    MOE_TRY(begin(c, "all_to_all_v"));
    size_t es = moe_dtype_size(dt), so = 0, ro = 0, one = 1;
    ncclDataType_t t = nccl_type(dt, &one);
    MOE_TRY(nccl_check(m, m->api.GroupStart(), "ncclGroupStart"));
    for (int r = 0; r < c->size; r++) {
        if (sc[r]) m->api.Send((const char *)in + so * es, sc[r], t, r, m->comm, m->stream);
        if (rc[r]) m->api.Recv((char *)out + ro * es, rc[r], t, r, m->comm, m->stream);
        so += sc[r];
        ro += rc[r];
    }
    MOE_TRY(nccl_check(m, m->api.GroupEnd(), "ncclGroupEnd"));
    return nccl_wait(c, "all_to_all_v");
}

static void nc_destroy(moe_comm *c) {
    nccl_impl *m = c->impl;
    if (!m) return;
    if (m->comm) {
        if (m->broken) m->api.CommAbort(m->comm);
        else m->api.CommDestroy(m->comm);
    }
    if (m->stream) cudaStreamDestroy(m->stream);
    /* the library stays loaded: NCCL keeps threads of its own */
    free(m);
    c->impl = NULL;
}

static const moe_comm_ops nccl_ops = {
    .name = "nccl", .supports = nc_supports, .barrier = nc_barrier, .all_reduce = nc_all_reduce,
    .broadcast = nc_broadcast, .all_gather = nc_all_gather, .reduce_scatter = nc_reduce_scatter,
    .all_to_all_v = nc_all_to_all_v, .destroy = nc_destroy,
};

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
    nccl_impl *m = calloc(1, sizeof *m);
    if (!c || !m) { free(c); free(m); moe_error(MOE_ERR_OOM, "dist: out of memory"); return NULL; }
    c->ops = &nccl_ops;
    c->impl = m;
    c->ctx = ctx;
    c->timeout_s = timeout_s > 0 ? timeout_s : MOE_DIST_DEFAULT_TIMEOUT_S;
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
    if (s != MOE_OK) {
        moe_comm_free(c);
        return NULL;
    }
    return c;
}

#endif
