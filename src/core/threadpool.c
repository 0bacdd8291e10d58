#include "threadpool.h"

#include <pthread.h>
#include <stdlib.h>

struct moe_threadpool {
    int nthreads;                 /* including the calling thread */
    pthread_t *threads;
    pthread_mutex_t mu;
    pthread_cond_t work_cv, done_cv;
    /* current job */
    struct worker_arg { struct moe_threadpool *pool; int id; } *wargs;
    moe_range_fn fn;
    void *arg;
    int64_t n, chunk;
    int nchunks;
    uint64_t generation;
    int pending;
    int stop;
};

static _Thread_local int in_parallel_region;

static void run_chunk(moe_threadpool *p, int c) {
    int64_t b = (int64_t)c * p->chunk;
    int64_t e = b + p->chunk;
    if (e > p->n) e = p->n;
    if (b < e) p->fn(p->arg, b, e);
}

static void *worker_main(void *varg) {
    struct worker_arg *wa = varg;
    moe_threadpool *p = wa->pool;
    int id = wa->id;
    pthread_mutex_lock(&p->mu);
    uint64_t seen = 0;   /* generation at creation: a job posted before this thread ran is still seen */
    in_parallel_region = 1;
    for (;;) {
        while (!p->stop && p->generation == seen) pthread_cond_wait(&p->work_cv, &p->mu);
        if (p->stop) break;
        seen = p->generation;
        int c = id;
        int active = c < p->nchunks;
        pthread_mutex_unlock(&p->mu);
        if (active) run_chunk(p, c);
        pthread_mutex_lock(&p->mu);
        if (--p->pending == 0) pthread_cond_signal(&p->done_cv);
    }
    pthread_mutex_unlock(&p->mu);
    return NULL;
}

moe_threadpool *moe_threadpool_new(int nthreads) {
    if (nthreads < 1) nthreads = 1;
    moe_threadpool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->nthreads = nthreads;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->work_cv, NULL);
    pthread_cond_init(&p->done_cv, NULL);
    if (nthreads > 1) {
        p->threads = calloc((size_t)nthreads - 1, sizeof *p->threads);
        p->wargs = calloc((size_t)nthreads - 1, sizeof *p->wargs);
        if (!p->threads || !p->wargs) { p->nthreads = 1; return p; }
        /* hold the lock so no worker reads nthreads before a failed create shrinks it */
        pthread_mutex_lock(&p->mu);
        for (int i = 0; i < nthreads - 1; i++) {
            p->wargs[i] = (struct worker_arg){p, i + 1};
            if (pthread_create(&p->threads[i], NULL, worker_main, &p->wargs[i]) != 0) {
                p->nthreads = i + 1;
                break;
            }
        }
        pthread_mutex_unlock(&p->mu);
    }
    return p;
}

void moe_threadpool_free(moe_threadpool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    p->stop = 1;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->nthreads - 1; i++) pthread_join(p->threads[i], NULL);
    free(p->threads);
    free(p->wargs);
    pthread_mutex_destroy(&p->mu);
    pthread_cond_destroy(&p->work_cv);
    pthread_cond_destroy(&p->done_cv);
    free(p);
}

int moe_threadpool_size(const moe_threadpool *p) { return p ? p->nthreads : 1; }

void moe_parallel_for(moe_threadpool *p, int64_t n, int64_t grain, moe_range_fn fn, void *arg) {
    if (n <= 0) return;
    if (grain < 1) grain = 1;
    int nt = p ? p->nthreads : 1;
    int64_t max_chunks = (n + grain - 1) / grain;
    if (nt > max_chunks) nt = (int)max_chunks;
    if (!p || nt <= 1 || in_parallel_region) { fn(arg, 0, n); return; }
    pthread_mutex_lock(&p->mu);
    p->fn = fn;
    p->arg = arg;
    p->n = n;
    p->chunk = (n + nt - 1) / nt;
    p->nchunks = nt;
    p->pending = p->nthreads - 1;
    p->generation++;
    pthread_cond_broadcast(&p->work_cv);
    pthread_mutex_unlock(&p->mu);
    in_parallel_region = 1;
    run_chunk(p, 0);
    in_parallel_region = 0;
    pthread_mutex_lock(&p->mu);
    while (p->pending > 0) pthread_cond_wait(&p->done_cv, &p->mu);
    pthread_mutex_unlock(&p->mu);
}
