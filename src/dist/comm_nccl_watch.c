/* The NCCL communicator's heartbeats and the watcher of its queued
 * collectives (see comm_nccl.c's header): a thread per communicator made
 * through the file rendezvous rewrites <dir>/alive.<rank> every second and,
 * every 100 ms while a queued collective may be unfinished, checks NCCL's
 * asynchronous error, the other ranks' heartbeats and the timeout; on a
 * verdict it aborts the communicator, which ends the GPU work waiting on it. */
#ifdef MOELAB_CUDA

#include "comm_nccl.h"

#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ncclCommAbort frees the communicator: once, and never touched again */
void moe_nccl_abort(nccl_impl *m) {
    if (m->comm) m->api.CommAbort(m->comm);
    m->comm = NULL;
    m->broken = 1;
}

static double wall_now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

void moe_nccl_hb_write(const char *dir, int rank) {
    char path[4200], tmp[4300];
    snprintf(path, sizeof path, "%s/alive.%d", dir, rank);
    snprintf(tmp, sizeof tmp, "%s.tmp.%d", path, (int)getpid());
    FILE *f = fopen(tmp, "w");
    if (!f) return;
    fprintf(f, "%.3f\n", wall_now());
    if (fclose(f) == 0) rename(tmp, path);
}

/* One look at the queued exchanges (heartbeat thread): finished, or a verdict and an abort. */
static void watch_queued(nccl_impl *m) {
    /* busy: this rank is inside a collective, which watches itself (and the
     * heartbeats must go on being written meanwhile) */
    if (pthread_mutex_trylock(&m->q_mu) != 0) return;
    if (m->q_pending && !watcher_aborted(m) && m->comm) {
        cudaError_t e = cudaEventQuery(m->q_done);
        if (e == cudaSuccess) {
            m->q_pending = 0;
        } else {
            char why[400] = "", who[256];
            double age = 0;
            ncclResult_t ar = ncclSuccess;
            m->api.CommGetAsyncError(m->comm, &ar);
            if (ar != ncclSuccess)
                snprintf(why, sizeof why, "NCCL error: %s", m->api.GetErrorString(ar));
            else if (e != cudaErrorNotReady)
                snprintf(why, sizeof why, "%s", cudaGetErrorString(e));
            else if (moe_nccl_hb_stale(m, who, sizeof who, &age) > 0)
                snprintf(why, sizeof why, "rank %s sent no heartbeat for %.0f s (exited, killed or its host is gone)",
                         who, age);
            else if (moe_dist_now() - m->q_since > m->timeout_s)
                snprintf(why, sizeof why, "no progress for %.0f s while every rank sends heartbeats (one is alive "
                         "but stuck in other code or another collective)", m->timeout_s);
            if (why[0]) {
                snprintf(m->q_error, sizeof m->q_error,
                         "rank %d: a queued collective cannot finish: %s; the communicator was aborted", m->hb_rank,
                         why);
                __atomic_store_n(&m->q_aborted, 1, __ATOMIC_RELEASE);
                moe_nccl_abort(m);   /* ends the NCCL work, so the streams waiting on it go on */
            }
        }
    }
    pthread_mutex_unlock(&m->q_mu);
}

void *moe_nccl_hb_main(void *arg) {
    nccl_impl *m = arg;
    cudaSetDevice(m->device);   /* for the event queries */
    while (!m->hb_stop) {
        moe_nccl_hb_write(m->hb_dir, m->hb_rank);
        for (int i = 0; i < 10 && !m->hb_stop; i++) {
            struct timespec ts = {0, 100000000};
            nanosleep(&ts, NULL);
            watch_queued(m);
        }
    }
    return NULL;
}

/* Ranks whose heartbeat file has not changed for longer than the limit (by
 * this process's monotonic clock, so the hosts' clocks need not agree), as
 * "1, 3" in buf; returns their count. */
int moe_nccl_hb_stale(nccl_impl *m, char *buf, size_t n, double *worst_age) {
    int count = 0;
    double now = moe_dist_now();
    buf[0] = 0;
    *worst_age = 0;
    for (int r = 0; r < m->hb_size; r++) {
        if (r == m->hb_rank) continue;
        char path[4200];
        snprintf(path, sizeof path, "%s/alive.%d", m->hb_dir, r);
        double t = 0;
        FILE *f = fopen(path, "r");
        if (f) { if (fscanf(f, "%lf", &t) != 1) t = 0; fclose(f); }
        if (t != m->hb_seen[r]) { m->hb_seen[r] = t; m->hb_seen_at[r] = now; }
        double age = now - m->hb_seen_at[r];
        if (age > m->hb_stale_s) {
            size_t used = strlen(buf);
            snprintf(buf + used, n - used, "%s%d", count ? ", " : "", r);
            if (age > *worst_age) *worst_age = age;
            count++;
        }
    }
    return count;
}

#endif
