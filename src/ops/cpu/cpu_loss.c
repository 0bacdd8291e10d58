/* Cross-entropy over rows of logits [N, V] with integer targets; rows whose
 * target is ignore_index get loss 0 and gradient 0. Max-subtracted. */
#include "cpu.h"

typedef struct { float *out, *lse; const float *logits, *lsein; const int64_t *tg; int64_t V, ignore; float scale; } ce_job;

static void ce_fwd(void *arg, int64_t r0, int64_t r1) {
    ce_job *J = arg;
    int64_t V = J->V;
    for (int64_t r = r0; r < r1; r++) {
        const float *x = J->logits + r * V;
        float m = cpu_row_max(x, V);
        float l = m + logf(cpu_row_sumexp(x, V, m));
        J->lse[r] = l;
        int64_t t = J->tg[r];
        J->out[r] = t == J->ignore ? 0.0f : l - x[t];
    }
}

static void ce_bwd(void *arg, int64_t r0, int64_t r1) {
    ce_job *J = arg;
    int64_t V = J->V;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->logits + r * V;
        float *restrict d = J->out + r * V;
        int64_t t = J->tg[r];
        if (t == J->ignore) { memset(d, 0, (size_t)V * sizeof(float)); continue; }
        float l = J->lsein[r], sc = J->scale;
        for (int64_t i = 0; i < V; i++) d[i] = sc * cpu_expf(x[i] - l);
        d[t] -= sc;
    }
}

static moe_status check_targets(const char *op, const int64_t *tg, int64_t n, int64_t V, int64_t ignore) {
    for (int64_t i = 0; i < n; i++)
        if (tg[i] != ignore && (tg[i] < 0 || tg[i] >= V))
            return moe_error(MOE_ERR_RANGE, "%s: target %lld of row %lld is out of range, expected [0, %lld) or "
                             "ignore_index %lld", op, (long long)tg[i], (long long)i, (long long)V, (long long)ignore);
    return MOE_OK;
}

moe_status moe_cpu_cross_entropy(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                                 const moe_tensor *targets, int64_t ignore_index) {
    CPU_F32("cross_entropy", loss);
    int64_t N = logits->shape[0], V = logits->shape[1];
    const int64_t *tg = moe_tensor_data(targets);
    MOE_TRY(check_targets("cross_entropy", tg, N, V, ignore_index));
    ce_job J = {moe_f32(loss), moe_f32(lse), moe_f32(logits), NULL, tg, V, ignore_index, 0.0f};
    moe_parallel_for(ctx->pool, N, cpu_grain(V * 4, CPU_PAR_WORK), ce_fwd, &J);
    return MOE_OK;
}

moe_status moe_cpu_cross_entropy_backward(moe_ctx *ctx, moe_tensor *dlogits, const moe_tensor *logits,
                                          const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                          float scale) {
    CPU_F32("cross_entropy_backward", dlogits);
    int64_t N = logits->shape[0], V = logits->shape[1];
    const int64_t *tg = moe_tensor_data(targets);
    MOE_TRY(check_targets("cross_entropy_backward", tg, N, V, ignore_index));
    ce_job J = {moe_f32(dlogits), NULL, moe_f32(logits), moe_f32(lse), tg, V, ignore_index, scale};
    moe_parallel_for(ctx->pool, N, cpu_grain(V * 4, CPU_PAR_WORK), ce_bwd, &J);
    return MOE_OK;
}
