/* Host cost per call of moelab ops on CUDA, in C (no Lua): where does a small
 * GEMM's time go? Build (CUDA variant) and run on the GPU machine:
 *   make CUDA=1 build/cuda/libmoelab.a && cc -O2 -DMOELAB_CUDA=1 -o build/cuda/gpu_op_overhead \
 *     bench/gpu_op_overhead.c build/cuda/libmoelab.a <the CUDA LIBS of the Makefile>
 */
#include <stdio.h>
#include <time.h>

#include "../src/ops/backend.h"
#include "../src/ops/cuda/moe_cuda.h"

static double now_us(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e6 + t.tv_nsec / 1e3;
}

static moe_ctx *ctx;
static const moe_device GPU = {MOE_CUDA, 0};

#define TIME(name, n, stmt)                                                                    \
    do {                                                                                       \
        stmt;                                                                                  \
        ctx->backends[MOE_CUDA]->synchronize(ctx, GPU);                                                   \
        double t0 = now_us();                                                                  \
        for (int i_ = 0; i_ < (n); i_++) { stmt; }                                             \
        double t1 = now_us();                                                                  \
        ctx->backends[MOE_CUDA]->synchronize(ctx, GPU);                                                   \
        double t2 = now_us();                                                                  \
        printf("%-56s host %7.1f us/call  wall %7.1f us/call\n", name, (t1 - t0) / (n), (t2 - t0) / (n)); \
    } while (0)

int main(void) {
    if (moe_cuda_device_count() == 0) { printf("no CUDA device\n"); return 0; }
    ctx = moe_ctx_new(0);
    moe_cpu_backend_install(ctx);
    if (moe_cuda_backend_install(ctx) != MOE_OK) { printf("install: %s\n", moe_last_error()); return 1; }
    int64_t sa[2] = {4096, 1024}, sb[2] = {512, 1024}, sc[2] = {4096, 512}, s1[1] = {1024};
    moe_tensor *a = moe_tensor_new(ctx, MOE_BF16, 2, sa, GPU), *b = moe_tensor_new(ctx, MOE_BF16, 2, sb, GPU);
    moe_tensor *c = moe_tensor_new(ctx, MOE_BF16, 2, sc, GPU);
    moe_tensor *x = moe_tensor_new(ctx, MOE_F32, 1, s1, GPU), *y = moe_tensor_new(ctx, MOE_F32, 1, s1, GPU);
    moe_op_fill_randn(ctx, a, 1, 0, 0, 1);
    moe_op_fill_randn(ctx, b, 2, 0, 0, 1);
    moe_op_fill(ctx, x, 1.0);
    TIME("moe_op_fill 1024 f32", 2000, moe_op_fill(ctx, x, 2.0));
    TIME("moe_op_binary add 1024 f32 (preallocated out)", 2000, moe_op_binary(ctx, MOE_BIN_ADD, y, x, x));
    TIME("moe_op_gemm bf16 4096x1024 @ (512x1024)^T (preallocated)", 300, moe_op_gemm(ctx, 0, 1, 1.0f, a, b, 0.0f, c));
    TIME("moe_op_gemm + moe_op_fill of c (as the Lua binding)", 300,
         (moe_op_fill(ctx, c, 0.0), moe_op_gemm(ctx, 0, 1, 1.0f, a, b, 0.0f, c)));
    TIME("moe_tensor_new + release 4 MiB on the GPU", 2000,
         moe_tensor_release(moe_tensor_new(ctx, MOE_BF16, 2, sc, GPU)));
    moe_cuda_backend_uninstall(ctx);
    return 0;
}
