/* The MPI communicator (OpenMPI; CPU tensors). Built when MOELAB_MPI is
 * defined (the Makefile does so when mpicc is found).
 *
 * Every collective is the non-blocking MPI call (MPI_Iallreduce, ...) polled
 * with MPI_Test until a deadline; while it waits, a rank also serves a small
 * control channel (its own duplicate of MPI_COMM_WORLD):
 *   BYE   sent to every rank by a process that ends (exit hook): a waiting
 *         rank then fails at once, naming the rank that left;
 *   PING  sent by a rank whose collective made no progress for timeout_s;
 *   PONG  the answer, carrying the answering rank's collective count.
 * The failing rank names the ranks that did not answer within a second or two.
 *
 * Process-wide state (see comm.h): MPI is initialised and finalised once per
 * process, so `rt` below is the MPI runtime of the process, behind a mutex. */
#include "comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_dist_have_mpi(void) {
#ifdef MOELAB_MPI
    return 1;
#else
    return 0;
#endif
}

#ifndef MOELAB_MPI

moe_comm *moe_comm_mpi_new(moe_ctx *ctx, double timeout_s) {
    moe_error(MOE_ERR_STATE, "dist: this moelab was built without MPI (install libopenmpi-dev and rebuild)");
    return NULL;
}

#else

#include <mpi.h>
#include <pthread.h>
#include <time.h>

enum { TAG_BYE = 7001, TAG_PING = 7002, TAG_PONG = 7003 };

static struct {
    pthread_mutex_t mu;
    int initialized;      /* MPI_Init_thread done (by us or by the host program) */
    int we_initialized;   /* we must finalise */
    int finalized;
    int failed;           /* a collective failed with requests pending: abort at exit */
    int rank, size;
    MPI_Comm ctrl;        /* the control channel */
    char *left;           /* left[r]: rank r said goodbye */
    long long *pong_buf;  /* payloads of our PONG answers, one slot per rank */
    long long seq;        /* this process's collective count (for PONG) */
} rt = {.mu = PTHREAD_MUTEX_INITIALIZER};

typedef struct {
    MPI_Comm comm;
    int broken;
    char why[256];
    int *members;         /* world rank of each rank of a split communicator (NULL: the world itself) */
} mpi_impl;

/* World rank of this communicator's rank r. */
static int world_rank(const moe_comm *c, int r) {
    const mpi_impl *m = c->impl;
    return m->members ? m->members[r] : r;
}

/* A member of this communicator (other than us) that has said goodbye, as a
 * world rank; -1 if none. Ranks outside a split communicator do not matter to it. */
static int member_gone(const moe_comm *c) {
    for (int r = 0; r < c->size; r++) {
        int w = world_rank(c, r);
        if (w != rt.rank && rt.left[w]) return w;
    }
    return -1;
}

static moe_status mpi_fail(int rc, const char *what) {
    char msg[MPI_MAX_ERROR_STRING];
    int len = 0;
    if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) snprintf(msg, sizeof msg, "MPI error %d", rc);
    return moe_error(MOE_ERR_IO, "%s: %s", what, msg);
}

static void nap(int spins) {
    /* spin briefly, then sleep: ranks share cores when oversubscribed */
    if (spins < 200) return;
    struct timespec ts = {0, spins < 2000 ? 20000 : 200000};
    nanosleep(&ts, NULL);
}

/* Serve the control channel: record goodbyes, answer pings, collect pongs
 * (pong_seen[r] = 1 + the answering rank's count, when pong_seen is given). */
static void serve_ctrl(long long *pong_seen) {
    for (;;) {
        int flag = 0;
        MPI_Status st;
        if (MPI_Iprobe(MPI_ANY_SOURCE, MPI_ANY_TAG, rt.ctrl, &flag, &st) != MPI_SUCCESS || !flag) return;
        long long v = 0;
        if (MPI_Recv(&v, 1, MPI_LONG_LONG, st.MPI_SOURCE, st.MPI_TAG, rt.ctrl, MPI_STATUS_IGNORE) != MPI_SUCCESS) return;
        int src = st.MPI_SOURCE;
        if (st.MPI_TAG == TAG_BYE) {
            rt.left[src] = 1;
        } else if (st.MPI_TAG == TAG_PING) {
            MPI_Request r;
            rt.pong_buf[src] = rt.seq;
            if (MPI_Isend(&rt.pong_buf[src], 1, MPI_LONG_LONG, src, TAG_PONG, rt.ctrl, &r) == MPI_SUCCESS)
                MPI_Request_free(&r);
        } else if (st.MPI_TAG == TAG_PONG && pong_seen) {
            pong_seen[src] = 1 + v;
        }
    }
}

/* Ask every other rank where it is; list those that do not answer. */
static void ping_round(char *out, size_t n) {
    long long *seen = calloc((size_t)rt.size, sizeof *seen);
    long long *payload = calloc((size_t)rt.size, sizeof *payload);
    if (!seen || !payload) { free(seen); free(payload); snprintf(out, n, "(out of memory)"); return; }
    for (int r = 0; r < rt.size; r++) {
        if (r == rt.rank || rt.left[r]) continue;
        MPI_Request q;
        payload[r] = rt.seq;
        if (MPI_Isend(&payload[r], 1, MPI_LONG_LONG, r, TAG_PING, rt.ctrl, &q) == MPI_SUCCESS) MPI_Request_free(&q);
    }
    double until = moe_dist_now() + 2.0;
    for (int spins = 0; moe_dist_now() < until; spins++) {
        serve_ctrl(seen);
        int all = 1;
        for (int r = 0; r < rt.size; r++)
            if (r != rt.rank && !rt.left[r] && !seen[r]) all = 0;
        if (all) break;
        nap(spins);
    }
    size_t len = 0;
    out[0] = 0;
    int quiet = 0;
    for (int r = 0; r < rt.size && len + 64 < n; r++) {
        if (r == rt.rank) continue;
        if (rt.left[r]) len += (size_t)snprintf(out + len, n - len, "%srank %d has left", len ? "; " : "", r);
        else if (!seen[r]) { len += (size_t)snprintf(out + len, n - len, "%srank %d does not answer", len ? "; " : "", r); quiet++; }
        else if (seen[r] - 1 != rt.seq)
            len += (size_t)snprintf(out + len, n - len, "%srank %d is at collective #%lld", len ? "; " : "", r,
                                    seen[r] - 1);
    }
    if (!len) snprintf(out, n, "every rank answers (a slow collective, or a mismatch of collectives)");
    (void)quiet;
    free(seen);
    free(payload);
}

static moe_status wait_req(moe_comm *c, MPI_Request *req, const char *what) {
    mpi_impl *m = c->impl;
    double start = moe_dist_now(), deadline = start + c->timeout_s, grace = -1;
    for (int spins = 0;; spins++) {
        int done = 0;
        int rc = MPI_Test(req, &done, MPI_STATUS_IGNORE);
        if (rc != MPI_SUCCESS) {
            m->broken = 1;
            rt.failed = 1;
            snprintf(m->why, sizeof m->why, "an MPI error in %s", what);
            return mpi_fail(rc, what);
        }
        if (done) return MOE_OK;
        serve_ctrl(NULL);
        int gone = member_gone(c);
        double now = moe_dist_now();
        if (gone >= 0) {
            /* data the leaver sent before its goodbye may still be arriving */
            if (grace < 0) grace = now + 1.0;
            if (now > grace) {
                m->broken = 1;
                rt.failed = 1;
                snprintf(m->why, sizeof m->why, "rank %d left during %s", gone, what);
                return moe_error(MOE_ERR_STATE,
                                 "rank %d has left (its program ended or failed) while rank %d waits in %s "
                                 "(collective #%llu)", gone, rt.rank, what, (unsigned long long)c->seq);
            }
        }
        if (now > deadline) {
            char who[512];
            ping_round(who, sizeof who);
            m->broken = 1;
            rt.failed = 1;
            snprintf(m->why, sizeof m->why, "%s timed out", what);
            return moe_error(MOE_ERR_STATE, "rank %d: %s timed out after %.0f s (collective #%llu): %s", rt.rank,
                             what, c->timeout_s, (unsigned long long)c->seq, who);
        }
        nap(spins);
    }
}

static moe_status begin(moe_comm *c, const char *what) {
    mpi_impl *m = c->impl;
    if (m->broken)
        return moe_error(MOE_ERR_STATE, "%s: the communicator is broken after an earlier failure (%s)", what, m->why);
    rt.seq = (long long)c->seq;
    serve_ctrl(NULL);
    int r = member_gone(c);
    if (r >= 0) {
        m->broken = 1;
        snprintf(m->why, sizeof m->why, "rank %d has left", r);
        return moe_error(MOE_ERR_STATE, "rank %d has left (its program ended or failed); rank %d cannot run %s",
                         r, rt.rank, what);
    }
    return MOE_OK;
}

static MPI_Datatype mpi_type(moe_dtype dt) {
    switch (dt) {
    case MOE_F32: return MPI_FLOAT;
    case MOE_F64: return MPI_DOUBLE;
    case MOE_I32: return MPI_INT32_T;
    case MOE_I64: return MPI_INT64_T;
    case MOE_BF16: case MOE_F16: return MPI_UINT16_T;
    default: return MPI_UINT8_T;
    }
}

static void scale(void *buf, size_t n, moe_dtype dt, double s) {
    if (dt == MOE_F32) { float *p = buf; float f = (float)s; for (size_t i = 0; i < n; i++) p[i] *= f; }
    else { double *p = buf; for (size_t i = 0; i < n; i++) p[i] *= s; }
}

#define MAX_CHUNK ((size_t)1 << 30)   /* MPI counts are ints */

static int mpi_supports(const moe_comm *c, moe_device d) { return d.type == MOE_CPU; }

static moe_status mpi_barrier(moe_comm *c) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "barrier"));
    MPI_Request q;
    int rc = MPI_Ibarrier(m->comm, &q);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Ibarrier");
    return wait_req(c, &q, "barrier");
}

static moe_status mpi_all_reduce(moe_comm *c, void *buf, size_t n, moe_dtype dt, moe_dist_op op, moe_device d) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "all_reduce"));
    size_t es = moe_dtype_size(dt);
    for (size_t off = 0; off < n; off += MAX_CHUNK) {
        size_t k = n - off < MAX_CHUNK ? n - off : MAX_CHUNK;
        MPI_Request q;
        int rc = MPI_Iallreduce(MPI_IN_PLACE, (char *)buf + off * es, (int)k, mpi_type(dt), MPI_SUM, m->comm, &q);
        if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Iallreduce");
        MOE_TRY(wait_req(c, &q, "all_reduce"));
    }
    if (op == MOE_DIST_AVG && c->size > 1) scale(buf, n, dt, 1.0 / c->size);
    return MOE_OK;
}

static moe_status mpi_broadcast(moe_comm *c, void *buf, size_t n, moe_dtype dt, int root, moe_device d) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "broadcast"));
    size_t es = moe_dtype_size(dt);
    for (size_t off = 0; off < n; off += MAX_CHUNK) {
        size_t k = n - off < MAX_CHUNK ? n - off : MAX_CHUNK;
        MPI_Request q;
        int rc = MPI_Ibcast((char *)buf + off * es, (int)k, mpi_type(dt), root, m->comm, &q);
        if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Ibcast");
        MOE_TRY(wait_req(c, &q, "broadcast"));
    }
    return MOE_OK;
}

static moe_status mpi_all_gather(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt, moe_device d) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "all_gather"));
    if (n > MAX_CHUNK) return moe_error(MOE_ERR_ARG, "all_gather: %zu elements per rank is too many for MPI", n);
    MPI_Request q;
    int rc = MPI_Iallgather(in, (int)n, mpi_type(dt), out, (int)n, mpi_type(dt), m->comm, &q);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Iallgather");
    return wait_req(c, &q, "all_gather");
}

static moe_status mpi_reduce_scatter(moe_comm *c, const void *in, void *out, size_t n, moe_dtype dt,
                                     moe_dist_op op, moe_device d) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "reduce_scatter"));
    if (n > MAX_CHUNK) return moe_error(MOE_ERR_ARG, "reduce_scatter: %zu elements per rank is too many for MPI", n);
    MPI_Request q;
    int rc = MPI_Ireduce_scatter_block(in, out, (int)n, mpi_type(dt), MPI_SUM, m->comm, &q);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "MPI_Ireduce_scatter_block");
    MOE_TRY(wait_req(c, &q, "reduce_scatter"));
    if (op == MOE_DIST_AVG && c->size > 1) scale(out, n, dt, 1.0 / c->size);
    return MOE_OK;
}

static moe_status mpi_all_to_all_v(moe_comm *c, const void *in, const size_t *sc, void *out, const size_t *rcv,
                                   moe_dtype dt, moe_device d) {
    mpi_impl *m = c->impl;
    MOE_TRY(begin(c, "all_to_all_v"));
    int p = c->size;
    int *v = calloc((size_t)p * 4, sizeof *v);
    if (!v) return moe_error(MOE_ERR_OOM, "all_to_all_v: out of memory");
    size_t so = 0, ro = 0;
    for (int r = 0; r < p; r++) {
        if (sc[r] > MAX_CHUNK || rcv[r] > MAX_CHUNK || so > MAX_CHUNK || ro > MAX_CHUNK) {
            free(v);
            return moe_error(MOE_ERR_ARG, "all_to_all_v: counts too large for MPI");
        }
        v[r] = (int)sc[r]; v[p + r] = (int)so; v[2 * p + r] = (int)rcv[r]; v[3 * p + r] = (int)ro;
        so += sc[r];
        ro += rcv[r];
    }
    MPI_Request q;
    int rc = MPI_Ialltoallv(in, v, v + p, mpi_type(dt), out, v + 2 * p, v + 3 * p, mpi_type(dt), m->comm, &q);
    moe_status s = rc != MPI_SUCCESS ? mpi_fail(rc, "MPI_Ialltoallv") : wait_req(c, &q, "all_to_all_v");
    if (s != MOE_OK && rc == MPI_SUCCESS && m->broken) {
        /* the request still points at v: keep it */
        return s;
    }
    free(v);
    return s;
}

static void mpi_destroy(moe_comm *c) {
    mpi_impl *m = c->impl;
    if (!m) return;
    pthread_mutex_lock(&rt.mu);
    if (!m->broken && !rt.finalized && m->comm != MPI_COMM_NULL) MPI_Comm_free(&m->comm);
    pthread_mutex_unlock(&rt.mu);
    free(m->members);
    free(m);
    c->impl = NULL;
}

/* At process exit: say goodbye, then finalise (or abort when a collective is
 * left pending, which MPI_Finalize would wait for forever). */
static void mpi_at_exit(void) {
    pthread_mutex_lock(&rt.mu);
    if (rt.initialized && !rt.finalized) {
        long long one = 1;
        MPI_Request *q = calloc((size_t)rt.size, sizeof *q);
        for (int r = 0; q && r < rt.size; r++) {
            q[r] = MPI_REQUEST_NULL;
            if (r != rt.rank && !rt.left[r]) MPI_Isend(&one, 1, MPI_LONG_LONG, r, TAG_BYE, rt.ctrl, &q[r]);
        }
        double until = moe_dist_now() + 2.0;
        for (int spins = 0; q && moe_dist_now() < until; spins++) {
            int all = 0;
            MPI_Testall(rt.size, q, &all, MPI_STATUSES_IGNORE);
            if (all) break;
            serve_ctrl(NULL);
            nap(spins);
        }
        free(q);
        fflush(stdout);
        fflush(stderr);
        if (rt.failed) MPI_Abort(MPI_COMM_WORLD, 1);
        if (rt.we_initialized) MPI_Finalize();
        rt.finalized = 1;
    }
    pthread_mutex_unlock(&rt.mu);
}

static moe_status runtime_init(void) {
    if (rt.initialized) return MOE_OK;
    int flag = 0;
    MPI_Finalized(&flag);
    if (flag) return moe_error(MOE_ERR_STATE, "dist: MPI was already finalised in this process");
    MPI_Initialized(&flag);
    if (!flag) {
        if (!moe_dist_launched_by_mpi())
            return moe_error(MOE_ERR_STATE, "dist: not launched by mpirun (OMPI_COMM_WORLD_SIZE is not set); "
                                            "use `mpirun -np N moelab ...` or `moelab --nproc N ...`");
        int provided = 0;
        int rc = MPI_Init_thread(NULL, NULL, MPI_THREAD_SERIALIZED, &provided);
        if (rc != MPI_SUCCESS) return moe_error(MOE_ERR_IO, "dist: MPI_Init_thread failed (%d)", rc);
        rt.we_initialized = 1;
    }
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
    MPI_Comm_rank(MPI_COMM_WORLD, &rt.rank);
    MPI_Comm_size(MPI_COMM_WORLD, &rt.size);
    int rc = MPI_Comm_dup(MPI_COMM_WORLD, &rt.ctrl);
    if (rc != MPI_SUCCESS) return mpi_fail(rc, "dist: MPI_Comm_dup");
    MPI_Comm_set_errhandler(rt.ctrl, MPI_ERRORS_RETURN);
    rt.left = calloc((size_t)rt.size, 1);
    rt.pong_buf = calloc((size_t)rt.size, sizeof *rt.pong_buf);
    if (!rt.left || !rt.pong_buf) return moe_error(MOE_ERR_OOM, "dist: out of memory");
    rt.initialized = 1;
    atexit(mpi_at_exit);
    return MOE_OK;
}

static moe_status mpi_split(moe_comm *c, int color, int key, const int *members, moe_comm *child);

static const moe_comm_ops mpi_ops = {
    .name = "mpi", .supports = mpi_supports, .barrier = mpi_barrier, .all_reduce = mpi_all_reduce,
    .broadcast = mpi_broadcast, .all_gather = mpi_all_gather, .reduce_scatter = mpi_reduce_scatter,
    .all_to_all_v = mpi_all_to_all_v, .split = mpi_split, .destroy = mpi_destroy,
};

/* MPI_Comm_split is blocking, but moe_comm_split has just all-gathered over
 * the parent, so every rank has arrived at it. */
static moe_status mpi_split(moe_comm *c, int color, int key, const int *members, moe_comm *child) {
    mpi_impl *pm = c->impl;
    MOE_TRY(begin(c, "split"));
    mpi_impl *m = calloc(1, sizeof *m);
    int *wm = calloc((size_t)child->size, sizeof *wm);
    if (!m || !wm) {
        free(m);
        free(wm);
        return moe_error(MOE_ERR_OOM, "split: out of memory");
    }
    for (int i = 0; i < child->size; i++) wm[i] = world_rank(c, members[i]);
    m->members = wm;
    m->comm = MPI_COMM_NULL;
    child->ops = &mpi_ops;
    child->impl = m;
    pthread_mutex_lock(&rt.mu);
    int rc = MPI_Comm_split(pm->comm, color, key, &m->comm);
    pthread_mutex_unlock(&rt.mu);
    if (rc != MPI_SUCCESS) {
        m->comm = MPI_COMM_NULL;
        return mpi_fail(rc, "MPI_Comm_split");
    }
    MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
    int r = -1, n = -1;
    MPI_Comm_rank(m->comm, &r);
    MPI_Comm_size(m->comm, &n);
    if (r != child->rank || n != child->size)
        return moe_error(MOE_ERR_STATE, "MPI_Comm_split gave rank %d of %d, expected %d of %d", r, n, child->rank,
                         child->size);
    return MOE_OK;
}

moe_comm *moe_comm_mpi_new(moe_ctx *ctx, double timeout_s) {
    pthread_mutex_lock(&rt.mu);
    moe_status s = runtime_init();
    moe_comm *c = NULL;
    mpi_impl *m = NULL;
    if (s == MOE_OK) {
        c = calloc(1, sizeof *c);
        m = calloc(1, sizeof *m);
        if (!c || !m) s = moe_error(MOE_ERR_OOM, "dist: out of memory");
    }
    int rc;
    if (s == MOE_OK && (rc = MPI_Comm_dup(MPI_COMM_WORLD, &m->comm)) != MPI_SUCCESS) s = mpi_fail(rc, "dist: MPI_Comm_dup");
    if (s == MOE_OK) {
        MPI_Comm_set_errhandler(m->comm, MPI_ERRORS_RETURN);
        c->ops = &mpi_ops;
        c->impl = m;
        c->ctx = ctx;
        c->rank = rt.rank;
        c->size = rt.size;
        c->timeout_s = timeout_s > 0 ? timeout_s : MOE_DIST_DEFAULT_TIMEOUT_S;
        MPI_Comm local;
        if (MPI_Comm_split_type(m->comm, MPI_COMM_TYPE_SHARED, rt.rank, MPI_INFO_NULL, &local) == MPI_SUCCESS) {
            MPI_Comm_rank(local, &c->local_rank);
            MPI_Comm_size(local, &c->local_size);
            MPI_Comm_free(&local);
        } else {
            c->local_rank = rt.rank;
            c->local_size = rt.size;
        }
    }
    pthread_mutex_unlock(&rt.mu);
    if (s != MOE_OK) {
        free(m);
        free(c);
        return NULL;
    }
    return c;
}

#endif
