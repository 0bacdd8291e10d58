/* Built only without CUDA (the Makefile drops this file when CUDA=1). */
#include "backend.h"

moe_status moe_cuda_backend_install(moe_ctx *ctx) {
    (void)ctx;
    return moe_error(MOE_ERR_DEVICE, "this moelab was built without CUDA; rebuild with make CUDA=1");
}

int moe_cuda_device_count(void) { return 0; }

void moe_cuda_backend_uninstall(moe_ctx *ctx) { (void)ctx; }

/* The router kernels (src/ops/cuda/moe_cuda_route.h): no CUDA tensor exists
 * in this build, so the router never takes its device path. */
#include "cuda/moe_cuda_route.h"

moe_status moe_cuda_route_forward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_fwd *a) {
    (void)ctx; (void)dev; (void)a;
    return moe_error(MOE_ERR_DEVICE, "routing on a CUDA device needs a CUDA build");
}

int64_t moe_cuda_grouped_plan_bytes(int64_t groups, int64_t rows) { (void)groups; (void)rows; return 0; }

moe_status moe_cuda_grouped_plan(moe_ctx *ctx, moe_device dev, const int64_t *off_dev, int64_t groups, int64_t rows,
                                 void *tables) {
    (void)ctx; (void)dev; (void)off_dev; (void)groups; (void)rows; (void)tables;
    return moe_error(MOE_ERR_DEVICE, "grouped plans on a CUDA device need a CUDA build");
}

moe_status moe_cuda_route_backward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_bwd *a) {
    (void)ctx; (void)dev; (void)a;
    return moe_error(MOE_ERR_DEVICE, "routing on a CUDA device needs a CUDA build");
}
