// AdamW over flat contiguous f32 buffers (params, grads, m, v), one pass.
// Bias corrections are computed on the host in double and applied as f32
// reciprocals, in the same order of operations as the CPU backend.
#include "cuda_common.cuh"

#include <math.h>

__global__ void k_adamw(float *p, const float *g, float *m, float *v, int64_t n, float lr, float b1, float b2,
                        float eps, float wd, float ibc1, float ibc2) {
    GRID_STRIDE(i, n) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * ibc1 / (sqrtf(vi * ibc2) + eps) + wd * p[i]);
    }
}

moe_status cuda_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                      const moe_adamw_cfg *cfg) {
    const moe_tensor *all[4] = {params, grads, m, v};
    for (int i = 0; i < 4; i++)
        if (all[i]->dtype != MOE_F32)
            return moe_error(MOE_ERR_DTYPE, "adamw on cuda needs f32 params, grads and state, got %s",
                             moe_dtype_name(all[i]->dtype));
    if (cfg->step < 1) return moe_error(MOE_ERR_ARG, "adamw: step counts from 1, got %lld", (long long)cfg->step);
    int64_t n = moe_tensor_numel(params);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, params->device);
    double bc1 = 1.0 - pow((double)cfg->beta1, (double)cfg->step);
    double bc2 = 1.0 - pow((double)cfg->beta2, (double)cfg->step);
    k_adamw<<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(moe_f32(params), moe_f32(grads), moe_f32(m), moe_f32(v), n,
                                                            cfg->lr, cfg->beta1, cfg->beta2, cfg->eps,
                                                            cfg->weight_decay, (float)(1.0 / bc1), (float)(1.0 / bc2));
    CU_LAUNCHED("adamw");
    return MOE_OK;
}
