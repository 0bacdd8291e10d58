/* Fused AdamW step over flat buffers (formula in ops.h): f32 params; f32 or
 * bf16 state (stochastically rounded, ops.h); f32 or bf16 gradients;
 * optionally a bf16/f32 compute copy written in the same pass (mixed
 * precision). */
#include "cpu.h"

typedef struct {
    float *p;             /* NULL with a split master: hi and lo */
    uint16_t *hi;
    int16_t *lo;
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

/* elements [b, e) with the params at p[0 .. e - b) */
static void adam_span(const adam_job *J, float *restrict p, int64_t b, int64_t e) {
    const float *gf = J->g_bf16 ? NULL : J->g;
    const uint16_t *gb = J->g_bf16 ? J->g : NULL;
    if (J->s_bf16) {   /* the moments read as f32, stored stochastically rounded (ops.h) */
        uint16_t *restrict m = J->m, *restrict v = J->v;
        for (int64_t i = b; i < e; i++) {
            float mi = moe_bf16_to_f32(m[i]), vi = moe_bf16_to_f32(v[i]);
            adam_1(&p[i - b], &mi, &vi, gf ? gf[i] : moe_bf16_to_f32(gb[i]), J);
            uint32_t r = moe_adamw_sr_bits(J->index0 + i, J->step);
            m[i] = moe_bf16_round_sr(mi, r);
            v[i] = moe_bf16_round_sr(vi, r >> 16);
        }
    } else {
        float *restrict m = J->m, *restrict v = J->v;
        for (int64_t i = b; i < e; i++) adam_1(&p[i - b], &m[i], &v[i], gf ? gf[i] : moe_bf16_to_f32(gb[i]), J);
    }
    if (J->c && J->c_bf16)
        for (int64_t i = b; i < e; i++) {   /* ties away from zero, as the split master's high plane (ops.h) */
            union { float f; uint32_t u; } x = {.f = p[i - b]};
            ((uint16_t *)J->c)[i] = moe_master_hi(x.u);
        }
    else if (J->c)
        for (int64_t i = b; i < e; i++) ((float *)J->c)[i] = p[i - b];
}

static void adam_range(void *arg, int64_t b, int64_t e) {
    adam_job *J = arg;
    if (J->p) { adam_span(J, J->p + b, b, e); return; }
    /* a split master (ops.h): the f32 values joined, updated and split again, a block at a time */
    float buf[256];
    for (int64_t c0 = b; c0 < e; c0 += 256) {
        int64_t c1 = e - c0 < 256 ? e : c0 + 256;
        for (int64_t i = c0; i < c1; i++) {
            union { uint32_t u; float f; } x = {.u = moe_master_bits(J->hi[i], J->lo[i])};
            buf[i - c0] = x.f;
        }
        adam_span(J, buf, c0, c1);
        for (int64_t i = c0; i < c1; i++) {
            union { float f; uint32_t u; } x = {.f = buf[i - c0]};
            J->hi[i] = moe_master_hi(x.u);
            J->lo[i] = moe_master_lo(x.u, J->hi[i]);
        }
    }
}

/* The gradient factor of cfg's clipping by the norm in clip_sumsq (the
 * grad_scale alone without it); < 0: the step is skipped (ops.h). */
static double grad_factor(const moe_adamw_cfg *cfg) {
    if (!cfg->clip_sumsq) return cfg->grad_scale != 0.0f ? cfg->grad_scale : 1.0f;
    return moe_adamw_clip_factor(cfg, moe_f32(cfg->clip_sumsq)[0], cfg->guard ? moe_f32(cfg->guard)[0] : 0.0);
}

moe_status moe_cpu_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                         const moe_adamw_cfg *cfg) {
    double gs = grad_factor(cfg);
    if (gs < 0) return MOE_OK;   /* non-finite norm or guard: the step is skipped */
    /* the step and learning rate the device holds, when given (ops.h) */
    int64_t step = cfg->step_dev ? ((const int64_t *)moe_tensor_data(cfg->step_dev))[0] + 1 : cfg->step;
    const float lr_dev = cfg->lr_dev ? moe_f32(cfg->lr_dev)[0] : 1.0f;
    const size_t gsz = moe_dtype_size(grads->dtype), ssz = moe_dtype_size(m->dtype);
    const size_t csz = cfg->compute ? moe_dtype_size(cfg->compute->dtype) : 0;
    /* one run of the whole tensor unless runs are given (ops.h) */
    moe_adamw_run whole = {0, moe_tensor_numel(params), cfg->lr, cfg->weight_decay};
    const moe_adamw_run *runs = cfg->n_runs > 0 ? cfg->runs : &whole;
    const int n_runs = cfg->n_runs > 0 ? cfg->n_runs : 1;
    for (int r = 0; r < n_runs; r++) {
        const int64_t lo = runs[r].lo;
        adam_job J = {cfg->lo ? NULL : moe_f32(params) + lo, cfg->lo ? (uint16_t *)moe_tensor_data(params) + lo : NULL,
                      cfg->lo ? (int16_t *)moe_tensor_data(cfg->lo) + lo : NULL, (char *)moe_tensor_data(m) + lo * ssz, (char *)moe_tensor_data(v) + lo * ssz,
                      (const char *)moe_tensor_data((moe_tensor *)grads) + lo * gsz,
                      cfg->compute ? (char *)moe_tensor_data(cfg->compute) + lo * csz : NULL, grads->dtype == MOE_BF16,
                      cfg->compute && cfg->compute->dtype == MOE_BF16, m->dtype == MOE_BF16, cfg->beta1, cfg->beta2,
                      cfg->lr_dev ? lr_dev * runs[r].lr : runs[r].lr, cfg->eps, runs[r].weight_decay,
                      moe_adamw_inv_bias_corr(cfg->beta1, step), moe_adamw_inv_bias_corr(cfg->beta2, step), (float)gs,
                      cfg->index0 + lo, step};
        moe_parallel_for(ctx->pool, runs[r].hi - lo, 1 << 15, adam_range, &J);
    }
    return MOE_OK;
}

moe_status moe_cpu_adamw_advance(moe_ctx *ctx, moe_tensor *step_dev, const moe_adamw_cfg *cfg) {
    if (grad_factor(cfg) >= 0) ((int64_t *)moe_tensor_data(step_dev))[0] += 1;
    return MOE_OK;
}

/* The split master's planes (ops.h: moe_master_hi) */
static void split_range(void *arg, int64_t b, int64_t e) {
    void **a = arg;
    const uint32_t *src = a[0];
    uint16_t *hi = a[1];
    int16_t *lo = a[2];
    for (int64_t i = b; i < e; i++) {
        hi[i] = moe_master_hi(src[i]);
        if (lo) lo[i] = moe_master_lo(src[i], hi[i]);
    }
}

static void join_range(void *arg, int64_t b, int64_t e) {
    void **a = arg;
    uint32_t *dst = a[0];
    const uint16_t *hi = a[1];
    const int16_t *lo = a[2];
    for (int64_t i = b; i < e; i++) dst[i] = moe_master_bits(hi[i], lo[i]);
}

moe_status moe_cpu_master_split(moe_ctx *ctx, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src) {
    void *a[3] = {moe_tensor_data(src), moe_tensor_data(hi), lo ? moe_tensor_data(lo) : NULL};
    moe_parallel_for(ctx->pool, moe_tensor_numel(src), 1 << 16, split_range, a);
    return MOE_OK;
}

moe_status moe_cpu_master_join(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo) {
    void *a[3] = {moe_tensor_data(dst), moe_tensor_data(hi), moe_tensor_data(lo)};
    moe_parallel_for(ctx->pool, moe_tensor_numel(dst), 1 << 16, join_range, a);
    return MOE_OK;
}
