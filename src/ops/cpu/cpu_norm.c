/* RMSNorm and LayerNorm over the last dim. Forward and dx are parallel over
 * rows; the parameter gradients are parallel over column blocks, each block
 * summing every row in order, so results do not depend on the thread count. */
#include "cpu.h"

typedef struct {
    float *y, *s1, *s2;            /* y / dx; mean; rstd */
    float *dw, *db;
    const float *x, *w, *b, *dy, *mean, *rstd;
    int64_t d;
    float eps;
    float beta;                    /* rmsnorm backward: dx = beta dx + the gradient */
} norm_job;

static void rms_fwd(void *arg, int64_t r0, int64_t r1) {
    norm_job *J = arg;
    int64_t d = J->d;
    const float *restrict w = J->w;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->x + r * d;
        float *restrict y = J->y + r * d;
        float rs = 1.0f / sqrtf(cpu_row_dot(x, x, d) / (float)d + J->eps);
        J->s2[r] = rs;
        for (int64_t i = 0; i < d; i++) y[i] = x[i] * rs * w[i];
    }
}

/* dx = rstd * (g - x * rstd^2 * mean(g x)),  g = dy * w */
static void rms_bwd(void *arg, int64_t r0, int64_t r1) {
    norm_job *J = arg;
    int64_t d = J->d;
    const float *restrict w = J->w;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->x + r * d, *restrict dy = J->dy + r * d;
        float *restrict dx = J->y + r * d;
        float rs = J->rstd[r];
        float acc[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int l = 0; l < 8; l++) acc[l] += dy[i + l] * w[i + l] * x[i + l];
        for (int l = 0; i < d; i++, l++) acc[l] += dy[i] * w[i] * x[i];
        float dot = ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
        float c = rs * rs * rs * dot / (float)d;
        if (J->beta != 0.0f)
            for (i = 0; i < d; i++) dx[i] = J->beta * dx[i] + (rs * dy[i] * w[i] - c * x[i]);
        else
            for (i = 0; i < d; i++) dx[i] = rs * dy[i] * w[i] - c * x[i];
    }
}

#define COLB 64
typedef struct { norm_job *J; int64_t rows; int layer; } col_job;

static void param_grad(void *arg, int64_t b0, int64_t b1) {
    col_job *C = arg;
    norm_job *J = C->J;
    int64_t d = J->d;
    int64_t c0 = b0 * COLB, c1 = b1 * COLB < d ? b1 * COLB : d;
    for (int64_t r = 0; r < C->rows; r++) {
        const float *restrict x = J->x + r * d, *restrict dy = J->dy + r * d;
        float rs = J->rstd[r], mu = C->layer ? J->mean[r] : 0.0f;
        if (J->dw) {
            float *restrict dw = J->dw;
            for (int64_t c = c0; c < c1; c++) dw[c] += dy[c] * (x[c] - mu) * rs;
        }
        if (J->db) {
            float *restrict db = J->db;
            for (int64_t c = c0; c < c1; c++) db[c] += dy[c];
        }
    }
}

static void ln_fwd(void *arg, int64_t r0, int64_t r1) {
    norm_job *J = arg;
    int64_t d = J->d;
    const float *restrict w = J->w, *restrict b = J->b;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->x + r * d;
        float *restrict y = J->y + r * d;
        float mu = cpu_row_sum(x, d) / (float)d;
        float acc[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int l = 0; l < 8; l++) { float t = x[i + l] - mu; acc[l] += t * t; }
        for (int l = 0; i < d; i++, l++) { float t = x[i] - mu; acc[l] += t * t; }
        float var = (((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]))) / (float)d;
        float rs = 1.0f / sqrtf(var + J->eps);
        J->s1[r] = mu;
        J->s2[r] = rs;
        if (b) for (i = 0; i < d; i++) y[i] = (x[i] - mu) * rs * w[i] + b[i];
        else for (i = 0; i < d; i++) y[i] = (x[i] - mu) * rs * w[i];
    }
}

/* dx = rstd * (g - mean(g) - xhat * mean(g xhat)),  g = dy * w */
static void ln_bwd(void *arg, int64_t r0, int64_t r1) {
    norm_job *J = arg;
    int64_t d = J->d;
    const float *restrict w = J->w;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->x + r * d, *restrict dy = J->dy + r * d;
        float *restrict dx = J->y + r * d;
        float mu = J->mean[r], rs = J->rstd[r];
        float a1[8] = {0}, a2[8] = {0};
        int64_t i = 0;
        for (; i + 8 <= d; i += 8)
            for (int l = 0; l < 8; l++) {
                float g = dy[i + l] * w[i + l];
                a1[l] += g;
                a2[l] += g * (x[i + l] - mu) * rs;
            }
        for (int l = 0; i < d; i++, l++) {
            float g = dy[i] * w[i];
            a1[l] += g;
            a2[l] += g * (x[i] - mu) * rs;
        }
        float mg = (((a1[0] + a1[4]) + (a1[1] + a1[5])) + ((a1[2] + a1[6]) + (a1[3] + a1[7]))) / (float)d;
        float mgx = (((a2[0] + a2[4]) + (a2[1] + a2[5])) + ((a2[2] + a2[6]) + (a2[3] + a2[7]))) / (float)d;
        for (i = 0; i < d; i++) {
            float xh = (x[i] - mu) * rs;
            dx[i] = rs * (dy[i] * w[i] - mg - xh * mgx);
        }
    }
}

static int64_t nrows(const moe_tensor *x, int64_t d) { return d ? moe_tensor_numel(x) / d : 0; }

moe_status moe_cpu_rmsnorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                           float eps) {
    CPU_F32("rmsnorm", y);
    int64_t d = x->shape[x->ndim - 1];
    norm_job J = {.y = moe_f32(y), .s2 = moe_f32(rstd), .x = moe_f32(x), .w = moe_f32(w), .d = d, .eps = eps};
    moe_parallel_for(ctx->pool, nrows(x, d), cpu_grain(d * 3, CPU_PAR_WORK), rms_fwd, &J);
    return MOE_OK;
}

moe_status moe_cpu_rmsnorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                    const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta) {
    CPU_F32("rmsnorm_backward", dx);
    int64_t d = x->shape[x->ndim - 1], rows = nrows(x, d);
    norm_job J = {.y = moe_f32(dx), .dw = dw ? moe_f32(dw) : NULL, .x = moe_f32(x), .w = moe_f32(w),
                  .dy = moe_f32(dy), .rstd = moe_f32(rstd), .d = d, .beta = beta};
    moe_parallel_for(ctx->pool, rows, cpu_grain(d * 5, CPU_PAR_WORK), rms_bwd, &J);
    if (dw) {
        col_job C = {&J, rows, 0};
        moe_parallel_for(ctx->pool, (d + COLB - 1) / COLB, cpu_grain(rows * COLB, CPU_PAR_WORK), param_grad, &C);
    }
    return MOE_OK;
}

moe_status moe_cpu_layernorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                             const moe_tensor *w, const moe_tensor *b, float eps) {
    CPU_F32("layernorm", y);
    int64_t d = x->shape[x->ndim - 1];
    norm_job J = {.y = moe_f32(y), .s1 = moe_f32(mean), .s2 = moe_f32(rstd), .x = moe_f32(x), .w = moe_f32(w),
                  .b = b ? moe_f32(b) : NULL, .d = d, .eps = eps};
    moe_parallel_for(ctx->pool, nrows(x, d), cpu_grain(d * 4, CPU_PAR_WORK), ln_fwd, &J);
    return MOE_OK;
}

moe_status moe_cpu_layernorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, moe_tensor *db,
                                      const moe_tensor *dy, const moe_tensor *x, const moe_tensor *w,
                                      const moe_tensor *mean, const moe_tensor *rstd) {
    CPU_F32("layernorm_backward", dx);
    int64_t d = x->shape[x->ndim - 1], rows = nrows(x, d);
    norm_job J = {.y = moe_f32(dx), .dw = dw ? moe_f32(dw) : NULL, .db = db ? moe_f32(db) : NULL, .x = moe_f32(x),
                  .w = moe_f32(w), .dy = moe_f32(dy), .mean = moe_f32(mean), .rstd = moe_f32(rstd), .d = d};
    moe_parallel_for(ctx->pool, rows, cpu_grain(d * 6, CPU_PAR_WORK), ln_bwd, &J);
    if (dw || db) {
        col_job C = {&J, rows, 1};
        moe_parallel_for(ctx->pool, (d + COLB - 1) / COLB, cpu_grain(rows * COLB, CPU_PAR_WORK), param_grad, &C);
    }
    return MOE_OK;
}
