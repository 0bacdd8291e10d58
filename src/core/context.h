/* The context: everything an operation needs that is not its arguments (the
 * thread pool, allocators and backends per device). There is no global
 * mutable state: each embedding (the Lua state, a C test) owns one. */
#ifndef MOE_CONTEXT_H
#define MOE_CONTEXT_H

#include "device.h"
#include "threadpool.h"

#define MOE_MAX_DEVICES 16

struct moe_backend;   /* defined by src/ops; the core only stores the pointer */

typedef struct moe_ctx {
    moe_threadpool *pool;
    moe_allocator *allocators[MOE_NUM_DEVICE_TYPES][MOE_MAX_DEVICES];
    const struct moe_backend *backends[MOE_NUM_DEVICE_TYPES];
    /* Called by device allocators before their one retry on out-of-memory
     * (the Lua binding runs a full GC here). */
    void (*reclaim)(void *reclaim_arg);
    void *reclaim_arg;
} moe_ctx;

/* nthreads <= 0: the number of online CPUs (or $MOELAB_NUM_THREADS). */
moe_ctx *moe_ctx_new(int nthreads);
void moe_ctx_free(moe_ctx *ctx);
moe_allocator *moe_ctx_allocator(moe_ctx *ctx, moe_device dev);  /* NULL + error if absent */
int moe_ctx_num_threads(const moe_ctx *ctx);

#endif
