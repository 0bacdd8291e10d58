#include "context.h"
#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>

moe_ctx *moe_ctx_new(int nthreads) {
    moe_ctx *ctx = calloc(1, sizeof *ctx);
    if (!ctx) { moe_error(MOE_ERR_OOM, "out of host memory for a context"); return NULL; }
    if (nthreads <= 0) {
        const char *env = getenv("MOELAB_NUM_THREADS");
        nthreads = env ? atoi(env) : 0;
        if (nthreads <= 0) nthreads = (int)sysconf(_SC_NPROCESSORS_ONLN);
        if (nthreads <= 0) nthreads = 1;
        if (nthreads > 256) nthreads = 256;
    }
    ctx->pool = moe_threadpool_new(nthreads);
    ctx->allocators[MOE_CPU][0] = moe_cpu_allocator();
    return ctx;
}

void moe_ctx_free(moe_ctx *ctx) {
    if (!ctx) return;
    moe_threadpool_free(ctx->pool);
    free(ctx);
}

moe_allocator *moe_ctx_allocator(moe_ctx *ctx, moe_device dev) {
    if (dev.type == MOE_CPU) return moe_cpu_allocator();
    if (dev.type < 0 || dev.type >= MOE_NUM_DEVICE_TYPES || dev.index < 0 || dev.index >= MOE_MAX_DEVICES
        || !ctx->allocators[dev.type][dev.index]) {
        char b[16];
        moe_error(MOE_ERR_DEVICE, "device %s is not available (no backend or no such device in this build)",
                  moe_device_str(dev, b, sizeof b));
        return NULL;
    }
    return ctx->allocators[dev.type][dev.index];
}

int moe_ctx_num_threads(const moe_ctx *ctx) { return moe_threadpool_size(ctx->pool); }
