/* Softmax, log-softmax (and backwards) and logsumexp over the last dim; every
 * row subtracts its max before exponentiating. Parallel over rows. */
#include "cpu.h"

typedef struct { float *y; const float *a, *b; int64_t n; int kind; } sm_job;

enum { SM_SOFTMAX, SM_LOGSOFTMAX, SM_LSE, SM_SOFTMAX_BWD, SM_LOGSOFTMAX_BWD };

static void sm_range(void *arg, int64_t r0, int64_t r1) {
    sm_job *J = arg;
    int64_t n = J->n;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->a + r * n;
        switch (J->kind) {
        case SM_SOFTMAX: {
            float *restrict y = J->y + r * n;
            float m = cpu_row_max(x, n);
            if (m == -INFINITY) m = 0.0f;   /* an all -inf row gives NaN like the reference */
            for (int64_t i = 0; i < n; i++) y[i] = cpu_expf(x[i] - m);
            float inv = 1.0f / cpu_row_sum(y, n);
            for (int64_t i = 0; i < n; i++) y[i] *= inv;
            break;
        }
        case SM_LOGSOFTMAX: {
            float *restrict y = J->y + r * n;
            float m = cpu_row_max(x, n);
            float l = m + logf(cpu_row_sumexp(x, n, m));
            for (int64_t i = 0; i < n; i++) y[i] = x[i] - l;
            break;
        }
        case SM_LSE: {
            float m = cpu_row_max(x, n);
            J->y[r] = m == -INFINITY ? -INFINITY : m + logf(cpu_row_sumexp(x, n, m));
            break;
        }
        case SM_SOFTMAX_BWD: {   /* x = dy, b = y: dx = y (dy - sum(dy y)) */
            const float *restrict y = J->b + r * n;
            float *restrict dx = J->y + r * n;
            float d = cpu_row_dot(x, y, n);
            for (int64_t i = 0; i < n; i++) dx[i] = y[i] * (x[i] - d);
            break;
        }
        default: {               /* log-softmax: dx = dy - exp(y) sum(dy) */
            const float *restrict y = J->b + r * n;
            float *restrict dx = J->y + r * n;
            float s = cpu_row_sum(x, n);
            for (int64_t i = 0; i < n; i++) dx[i] = x[i] - cpu_expf(y[i]) * s;
            break;
        }
        }
    }
}

static moe_status run(moe_ctx *ctx, const char *op, int kind, moe_tensor *y, const moe_tensor *a, const moe_tensor *b) {
    CPU_F32(op, y);
    int64_t n = a->ndim ? a->shape[a->ndim - 1] : 1;
    int64_t rows = n ? moe_tensor_numel(a) / n : 0;
    sm_job J = {moe_f32(y), moe_f32(a), b ? moe_f32(b) : NULL, n, kind};
    moe_parallel_for(ctx->pool, rows, cpu_grain(n * 8, CPU_PAR_WORK), sm_range, &J);
    return MOE_OK;
}

moe_status moe_cpu_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return run(ctx, "softmax", SM_SOFTMAX, y, x, NULL);
}
moe_status moe_cpu_log_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return run(ctx, "log_softmax", SM_LOGSOFTMAX, y, x, NULL);
}
moe_status moe_cpu_logsumexp(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    return run(ctx, "logsumexp", SM_LSE, out, x, NULL);
}
moe_status moe_cpu_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return run(ctx, "softmax_backward", SM_SOFTMAX_BWD, dx, dy, y);
}
moe_status moe_cpu_log_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return run(ctx, "log_softmax_backward", SM_LOGSOFTMAX_BWD, dx, dy, y);
}
