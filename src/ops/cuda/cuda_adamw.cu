// AdamW over flat contiguous buffers, one pass: f32 params and state, f32 or
// bf16 gradients, and optionally the compute copy of mixed precision written
// from the updated params in the same pass (no separate cast kernel).
// Bias corrections are computed on the host in double and applied as f32
// reciprocals, in the same order of operations as the CPU backend.
#include "cuda_common.cuh"

#include <math.h>

template <typename G, typename C>
__global__ void k_adamw(float *p, const G *g, float *m, float *v, C *c, int64_t n, float lr, float b1, float b2,
                        float eps, float wd, float ibc1, float ibc2) {
    GRID_STRIDE(i, n) {
        float gi = to_f32(g[i]);
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        float pi = p[i] - lr * (mi * ibc1 / (sqrtf(vi * ibc2) + eps) + wd * p[i]);
        p[i] = pi;
        if (c) c[i] = from_f32<C>(pi);
    }
}

template <typename G, typename C>
static void launch(cuda_dev *d, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v, C *c,
                   int64_t n, const moe_adamw_cfg *cfg, float ibc1, float ibc2) {
    k_adamw<G, C><<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(
        moe_f32(params), (const G *)moe_tensor_data((moe_tensor *)grads), moe_f32(m), moe_f32(v), c, n, cfg->lr,
        cfg->beta1, cfg->beta2, cfg->eps, cfg->weight_decay, ibc1, ibc2);
}

moe_status cuda_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                      const moe_adamw_cfg *cfg) {
    int64_t n = moe_tensor_numel(params);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, params->device);
    double bc1 = 1.0 - pow((double)cfg->beta1, (double)cfg->step);
    double bc2 = 1.0 - pow((double)cfg->beta2, (double)cfg->step);
    float ibc1 = (float)(1.0 / bc1), ibc2 = (float)(1.0 / bc2);
    int gb = grads->dtype == MOE_BF16;
    moe_tensor *ct = cfg->compute;
    if (ct && ct->dtype == MOE_BF16) {
        bf16 *c = (bf16 *)moe_tensor_data(ct);
        if (gb) launch<bf16, bf16>(d, params, grads, m, v, c, n, cfg, ibc1, ibc2);
        else launch<float, bf16>(d, params, grads, m, v, c, n, cfg, ibc1, ibc2);
    } else {
        float *c = ct ? moe_f32(ct) : NULL;
        if (gb) launch<bf16, float>(d, params, grads, m, v, c, n, cfg, ibc1, ibc2);
        else launch<float, float>(d, params, grads, m, v, c, n, cfg, ibc1, ibc2);
    }
    CU_LAUNCHED("adamw");
    return MOE_OK;
}
