/* Rotary position embedding, rotate-half convention, over x [B, T, H, D].
 * Angles are computed in double per (t, i) so long positions keep precision.
 * Safe when out aliases x. */
#include "cpu.h"

#include <stdlib.h>

typedef struct { float *out; const float *x; int64_t T, H, D, pos; double theta; int inverse; } rope_job;

/* items are (b, t) pairs */
static void rope_range(void *arg, int64_t i0, int64_t i1) {
    rope_job *J = arg;
    int64_t H = J->H, D = J->D, half = D / 2;
    float *cs = malloc((size_t)D * sizeof(float));
    if (!cs) return;   /* checked by the caller before the parallel run */
    float *sn = cs + half;
    int64_t last_t = -1;
    for (int64_t it = i0; it < i1; it++) {
        int64_t t = it % J->T;
        if (t != last_t) {
            double p = (double)(J->pos + t);
            for (int64_t i = 0; i < half; i++) {
                double f = pow(J->theta, -2.0 * (double)i / (double)D);
                cs[i] = (float)cos(p * f);
                sn[i] = (float)(J->inverse ? -sin(p * f) : sin(p * f));
            }
            last_t = t;
        }
        for (int64_t h = 0; h < H; h++) {
            const float *x = J->x + (it * H + h) * D;
            float *o = J->out + (it * H + h) * D;
            for (int64_t i = 0; i < half; i++) {
                float a = x[i], b = x[i + half];
                o[i] = a * cs[i] - b * sn[i];
                o[i + half] = b * cs[i] + a * sn[i];
            }
        }
    }
    free(cs);
}

moe_status moe_cpu_rope(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse) {
    CPU_F32("rope", out);
    int64_t B = x->shape[0], T = x->shape[1], H = x->shape[2], D = x->shape[3];
    if (D == 0) return MOE_OK;
    void *probe = malloc((size_t)D * sizeof(float));
    if (!probe) return moe_error(MOE_ERR_OOM, "rope: out of host memory");
    free(probe);
    rope_job J = {moe_f32(out), moe_f32(x), T, H, D, pos_offset, theta, inverse};
    moe_parallel_for(ctx->pool, B * T, cpu_grain(H * D * 2, CPU_PAR_WORK), rope_range, &J);
    return MOE_OK;
}
