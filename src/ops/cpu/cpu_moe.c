/* MoE token movement on the CPU (ops.h: gather_sum, combine_backward), f32
 * and bf16 data (bf16 read as f32, results rounded once). Indices are
 * validated before anything is written. Fixed summation orders:
 *   gather_sum: y[t, c] = (((0 + w_q0 * src[s_q0, c]) + w_q1 * src[s_q1, c]) + ...) + base[t, c]
 *     (the base, when there is one, added last: in f32 the same bits as a
 *     separate add of the sum and the base)
 *     in q order, each product rounded to f32 then added (no fused multiply-
 *     add: the CUDA kernel does exactly this, so f32 results are bit-identical);
 *   combine_backward: dw[a] by cpu_row_dot's 8-lane order. */
#include "cpu.h"

#include <stdlib.h>

static inline float ld(const void *p, int bf, int64_t i) {
    return bf ? moe_bf16_to_f32(((const uint16_t *)p)[i]) : ((const float *)p)[i];
}

typedef struct {
    void *y;
    const void *base, *src, *w;
    const int32_t *slots;
    int64_t h, k;
    int bf;
    int oom;
} gs_job;

static void gs_range(void *arg, int64_t t0, int64_t t1) {
    gs_job *J = arg;
    const int64_t h = J->h, k = J->k;
    float *tmp = NULL;
    if (J->bf) {
        tmp = malloc((size_t)h * sizeof *tmp + 1);
        if (!tmp) { __atomic_store_n(&J->oom, 1, __ATOMIC_RELAXED); return; }
    }
    for (int64_t t = t0; t < t1; t++) {
        float *restrict acc = J->bf ? tmp : (float *)J->y + t * h;
        for (int64_t c = 0; c < h; c++) acc[c] = 0.0f;
        for (int64_t q = 0; q < k; q++) {
            int32_t s = J->slots[t * k + q];
            if (s < 0) continue;
            if (!J->bf) {
                const float *restrict x = (const float *)J->src + (int64_t)s * h;
                if (J->w) {
                    float ws = ((const float *)J->w)[s];
                    for (int64_t c = 0; c < h; c++) acc[c] += ws * x[c];
                } else {
                    for (int64_t c = 0; c < h; c++) acc[c] += x[c];
                }
            } else {
                const uint16_t *restrict x = (const uint16_t *)J->src + (int64_t)s * h;
                if (J->w) {
                    float ws = ld(J->w, 1, s);
                    for (int64_t c = 0; c < h; c++) acc[c] += ws * moe_bf16_to_f32(x[c]);
                } else {
                    for (int64_t c = 0; c < h; c++) acc[c] += moe_bf16_to_f32(x[c]);
                }
            }
        }
        if (J->base)
            for (int64_t c = 0; c < h; c++) acc[c] += ld(J->base, J->bf, t * h + c);
        if (J->bf) {
            uint16_t *restrict o = (uint16_t *)J->y + t * h;
            for (int64_t c = 0; c < h; c++) o[c] = moe_f32_to_bf16(acc[c]);
        }
    }
    free(tmp);
}

static moe_status float_dtype(const char *op, moe_dtype dt) {
    if (dt == MOE_F32 || dt == MOE_BF16) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s: the cpu backend supports f32 and bf16, got dtype %s", op, moe_dtype_name(dt));
}

moe_status moe_cpu_gather_sum(moe_ctx *ctx, moe_tensor *y, const moe_tensor *base, const moe_tensor *src,
                              const moe_tensor *w, const moe_tensor *slots) {
    MOE_TRY(float_dtype("gather_sum", y->dtype));
    const int64_t n = y->shape[0], h = y->shape[1], a = src->shape[0], k = slots->shape[1];
    const int32_t *sl = moe_tensor_data(slots);
    for (int64_t i = 0; i < n * k; i++)
        if (sl[i] < -1 || sl[i] >= a)
            return moe_error(MOE_ERR_RANGE,
                             "gather_sum: slot %lld at position %lld (token %lld, choice %lld) is out of range, "
                             "expected [-1, %lld)",
                             (long long)sl[i], (long long)i, (long long)(i / k), (long long)(i % k), (long long)a);
    gs_job J = {moe_tensor_data(y), base ? moe_tensor_data(base) : NULL, moe_tensor_data(src),
                w ? moe_tensor_data(w) : NULL, sl, h, k,
                y->dtype == MOE_BF16, 0};
    moe_parallel_for(ctx->pool, n, cpu_grain(h * (k ? k : 1), CPU_PAR_WORK), gs_range, &J);
    if (J.oom) return moe_error(MOE_ERR_OOM, "gather_sum: out of host memory");
    return MOE_OK;
}

typedef struct {
    void *dsrc, *dw;
    const void *dy, *src, *w;
    const int64_t *tok;
    int64_t h;
    int bf;
    int oom;
} cb_job;

static void cb_range(void *arg, int64_t a0, int64_t a1) {
    cb_job *J = arg;
    const int64_t h = J->h;
    float *tmp = NULL;
    if (J->bf) {
        tmp = malloc((size_t)(2 * h) * sizeof *tmp + 1);
        if (!tmp) { __atomic_store_n(&J->oom, 1, __ATOMIC_RELAXED); return; }
    }
    for (int64_t a = a0; a < a1; a++) {
        const int64_t t = J->tok[a];
        const float wa = ld(J->w, J->bf, a);
        float dot;
        if (!J->bf) {
            const float *restrict g = (const float *)J->dy + t * h, *restrict x = (const float *)J->src + a * h;
            float *restrict o = (float *)J->dsrc + a * h;
            for (int64_t c = 0; c < h; c++) o[c] = wa * g[c];
            dot = cpu_row_dot(g, x, h);
        } else {
            const uint16_t *restrict g = (const uint16_t *)J->dy + t * h, *restrict x = (const uint16_t *)J->src + a * h;
            uint16_t *restrict o = (uint16_t *)J->dsrc + a * h;
            float *restrict gf = tmp, *restrict xf = tmp + h;
            for (int64_t c = 0; c < h; c++) {
                gf[c] = moe_bf16_to_f32(g[c]);
                xf[c] = moe_bf16_to_f32(x[c]);
                o[c] = moe_f32_to_bf16(wa * gf[c]);
            }
            dot = cpu_row_dot(gf, xf, h);
        }
        if (J->dw) {
            if (J->bf) ((uint16_t *)J->dw)[a] = moe_f32_to_bf16(dot);
            else ((float *)J->dw)[a] = dot;
        }
    }
    free(tmp);
}

/* slots (the same assignments by token) change nothing here: the rows are independent on the host */
moe_status moe_cpu_combine_backward(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                    const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                    const moe_tensor *slots) {
    MOE_TRY(float_dtype("combine_backward", dsrc->dtype));
    const int64_t a = src->shape[0], h = src->shape[1], n = dy->shape[0];
    const int64_t *tok = moe_tensor_data(token_idx);
    for (int64_t i = 0; i < a; i++)
        if (tok[i] < 0 || tok[i] >= n)
            return moe_error(MOE_ERR_RANGE, "combine_backward: token_idx %lld at position %lld is out of range, expected [0, %lld)",
                             (long long)tok[i], (long long)i, (long long)n);
    cb_job J = {moe_tensor_data(dsrc), dw ? moe_tensor_data(dw) : NULL, moe_tensor_data(dy), moe_tensor_data(src),
                moe_tensor_data(w), tok, h, dsrc->dtype == MOE_BF16, 0};
    moe_parallel_for(ctx->pool, a, cpu_grain(2 * h, CPU_PAR_WORK), cb_range, &J);
    if (J.oom) return moe_error(MOE_ERR_OOM, "combine_backward: out of host memory");
    return MOE_OK;
}
