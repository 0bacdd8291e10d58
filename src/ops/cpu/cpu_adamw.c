/* Fused AdamW step over flat f32 buffers (formula in ops.h). */
#include "cpu.h"

typedef struct { float *p, *m, *v; const float *g; float b1, b2, lr, eps, wd, ibc1, ibc2; } adam_job;

static void adam_range(void *arg, int64_t b, int64_t e) {
    adam_job *J = arg;
    float *restrict p = J->p, *restrict m = J->m, *restrict v = J->v;
    const float *restrict g = J->g;
    float b1 = J->b1, b2 = J->b2, lr = J->lr, eps = J->eps, wd = J->wd, ibc1 = J->ibc1, ibc2 = J->ibc2;
    for (int64_t i = b; i < e; i++) {
        float gi = g[i];
        float mi = b1 * m[i] + (1.0f - b1) * gi;
        float vi = b2 * v[i] + (1.0f - b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        p[i] -= lr * (mi * ibc1 / (sqrtf(vi * ibc2) + eps) + wd * p[i]);
    }
}

moe_status moe_cpu_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                         const moe_adamw_cfg *cfg) {
    double bc1 = 1.0 - pow((double)cfg->beta1, (double)cfg->step);
    double bc2 = 1.0 - pow((double)cfg->beta2, (double)cfg->step);
    adam_job J = {moe_f32(params), moe_f32(m), moe_f32(v), moe_f32(grads), cfg->beta1, cfg->beta2, cfg->lr, cfg->eps,
                  cfg->weight_decay, (float)(1.0 / bc1), (float)(1.0 / bc2)};
    moe_parallel_for(ctx->pool, moe_tensor_numel(params), 1 << 15, adam_range, &J);
    return MOE_OK;
}
