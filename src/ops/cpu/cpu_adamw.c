/* Fused AdamW step over flat buffers (formula in ops.h): f32 params; f32 or
 * bf16 state (stochastically rounded, ops.h); f32 or bf16 gradients;
 * optionally a bf16/f32 compute copy written in the same pass (mixed
 * precision). */
#include "cpu.h"

typedef struct {
    float *p;
    void *m, *v;
    const void *g;
    void *c;              /* compute copy or NULL */
    int g_bf16, c_bf16, s_bf16;
    float b1, b2, lr, eps, wd, ibc1, ibc2, gs;
    int64_t index0, step;
} adam_job;

/* one element: the update in the order the CUDA kernels follow (cuda_adamw.cu) */
static inline void adam_1(float *p, float *m, float *v, float g, const adam_job *J) {
    float gi = g * J->gs;
    *m = J->b1 * *m + (1.0f - J->b1) * gi;
    *v = J->b2 * *v + (1.0f - J->b2) * gi * gi;
    *p -= J->lr * (*m * J->ibc1 / (sqrtf(*v * J->ibc2) + J->eps) + J->wd * *p);
}

static void adam_range(void *arg, int64_t b, int64_t e) {
    adam_job *J = arg;
    float *restrict p = J->p;
    const float *gf = J->g_bf16 ? NULL : J->g;
    const uint16_t *gb = J->g_bf16 ? J->g : NULL;
    if (J->s_bf16) {   /* the moments read as f32, stored stochastically rounded (ops.h) */
        uint16_t *restrict m = J->m, *restrict v = J->v;
        for (int64_t i = b; i < e; i++) {
            float mi = moe_bf16_to_f32(m[i]), vi = moe_bf16_to_f32(v[i]);
            adam_1(&p[i], &mi, &vi, gf ? gf[i] : moe_bf16_to_f32(gb[i]), J);
            uint32_t r = moe_adamw_sr_bits(J->index0 + i, J->step);
            m[i] = moe_bf16_round_sr(mi, r);
            v[i] = moe_bf16_round_sr(vi, r >> 16);
        }
    } else {
        float *restrict m = J->m, *restrict v = J->v;
        for (int64_t i = b; i < e; i++) adam_1(&p[i], &m[i], &v[i], gf ? gf[i] : moe_bf16_to_f32(gb[i]), J);
    }
    if (J->c && J->c_bf16)
        for (int64_t i = b; i < e; i++) ((uint16_t *)J->c)[i] = moe_f32_to_bf16(p[i]);
    else if (J->c)
        for (int64_t i = b; i < e; i++) ((float *)J->c)[i] = p[i];
}

moe_status moe_cpu_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                         const moe_adamw_cfg *cfg) {
    float gs = cfg->grad_scale != 0.0f ? cfg->grad_scale : 1.0f;
    if (cfg->clip_sumsq) {
        double f = moe_adamw_clip_factor(cfg, moe_f32((moe_tensor *)cfg->clip_sumsq)[0],
                                         cfg->guard ? moe_f32((moe_tensor *)cfg->guard)[0] : 0.0);
        if (f < 0) return MOE_OK;   /* non-finite norm or guard: the step is skipped */
        gs = (float)f;
    }
    double bc1 = 1.0 - pow((double)cfg->beta1, (double)cfg->step);
    double bc2 = 1.0 - pow((double)cfg->beta2, (double)cfg->step);
    adam_job J = {moe_f32(params), moe_tensor_data(m), moe_tensor_data(v), moe_tensor_data((moe_tensor *)grads),
                  cfg->compute ? moe_tensor_data(cfg->compute) : NULL, grads->dtype == MOE_BF16,
                  cfg->compute && cfg->compute->dtype == MOE_BF16, m->dtype == MOE_BF16, cfg->beta1, cfg->beta2,
                  cfg->lr, cfg->eps, cfg->weight_decay, (float)(1.0 / bc1), (float)(1.0 / bc2), gs, cfg->index0,
                  cfg->step};
    moe_parallel_for(ctx->pool, moe_tensor_numel(params), 1 << 15, adam_range, &J);
    return MOE_OK;
}
