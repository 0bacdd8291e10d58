/* A fork-join pool for CPU kernels. Work is split statically into one chunk per
 * thread so results never depend on scheduling. Nested calls run inline. */
#ifndef MOE_THREADPOOL_H
#define MOE_THREADPOOL_H

#include <stdint.h>

typedef struct moe_threadpool moe_threadpool;
typedef void (*moe_range_fn)(void *arg, int64_t begin, int64_t end);

moe_threadpool *moe_threadpool_new(int nthreads);
void moe_threadpool_free(moe_threadpool *p);
int moe_threadpool_size(const moe_threadpool *p);

/* Runs fn over [0, n) in chunks of at least `grain` items; pool may be NULL. */
void moe_parallel_for(moe_threadpool *p, int64_t n, int64_t grain, moe_range_fn fn, void *arg);

#endif
