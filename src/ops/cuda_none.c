/* Built only without CUDA (the Makefile drops this file when CUDA=1). */
#include "backend.h"

moe_status moe_cuda_backend_install(moe_ctx *ctx) {
    (void)ctx;
    return moe_error(MOE_ERR_DEVICE, "this moelab was built without CUDA; rebuild with make CUDA=1");
}

int moe_cuda_device_count(void) { return 0; }

void moe_cuda_backend_uninstall(moe_ctx *ctx) { (void)ctx; }
