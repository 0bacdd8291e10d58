/* Scaled dot-product attention with grouped-query heads and an optional
 * causal mask (query t sees keys s <= t + S - T). The forward saves the
 * log-sum-exp of each score row; the backward recomputes probabilities from it
 * (flash-style, no [T, S] matrix kept). Forward runs in parallel over (b, q
 * head); backward over (b, kv head), so each task owns its dK, dV and the dQ of
 * its query heads and nothing races. Per (t, s) loops run over s contiguously
 * on transposed K/V so they vectorise without reassociating sums. */
#include "cpu.h"

#include <stdlib.h>

typedef struct {
    const float *q, *k, *v, *dout, *out, *lse;
    float *o, *l, *dq, *dk, *dv;
    int64_t B, T, S, Hq, Hkv, D;
    float scale;
    int causal;
    int failed;
} att_job;

static inline int64_t visible(const att_job *J, int64_t t) {
    if (!J->causal) return J->S;
    int64_t n = t + J->S - J->T + 1;
    return n < 0 ? 0 : n > J->S ? J->S : n;
}

/* Kt[d][s] = k[b, s, hk, d] */
static void transpose_kv(const float *src, float *dst, const att_job *J, int64_t b, int64_t hk) {
    int64_t S = J->S, D = J->D, rs = J->Hkv * D;
    const float *base = src + (b * S * J->Hkv + hk) * D;
    for (int64_t s = 0; s < S; s++)
        for (int64_t d = 0; d < D; d++) dst[d * S + s] = base[s * rs + d];
}

/* sc[s] = scale * q . k_s for s < n, from the transposed keys */
static void scores(const float *restrict q, const float *restrict Kt, int64_t S, int64_t n, int64_t D, float scale,
                   float *restrict sc) {
    for (int64_t s = 0; s < n; s++) sc[s] = 0.0f;
    for (int64_t d = 0; d < D; d++) {
        float qd = q[d];
        const float *restrict kr = Kt + d * S;
        for (int64_t s = 0; s < n; s++) sc[s] += qd * kr[s];
    }
    for (int64_t s = 0; s < n; s++) sc[s] *= scale;
}

static void fwd_range(void *arg, int64_t i0, int64_t i1) {
    att_job *J = arg;
    int64_t S = J->S, D = J->D, T = J->T, Hq = J->Hq, G = J->Hq / J->Hkv;
    float *Kt = malloc((size_t)(S * D + S + 1) * sizeof(float));
    if (!Kt) { __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED); return; }
    float *sc = Kt + S * D;
    for (int64_t it = i0; it < i1; it++) {
        int64_t b = it / Hq, h = it % Hq, hk = h / G;
        transpose_kv(J->k, Kt, J, b, hk);
        const float *vb = J->v + (b * S * J->Hkv + hk) * D;
        for (int64_t t = 0; t < T; t++) {
            const float *q = J->q + ((b * T + t) * Hq + h) * D;
            float *restrict o = J->o + ((b * T + t) * Hq + h) * D;
            float *lse = J->l + (b * Hq + h) * T + t;
            int64_t n = visible(J, t);
            for (int64_t d = 0; d < D; d++) o[d] = 0.0f;
            if (n == 0) { *lse = -INFINITY; continue; }
            scores(q, Kt, S, n, D, J->scale, sc);
            float m = cpu_row_max(sc, n);
            for (int64_t s = 0; s < n; s++) sc[s] = cpu_expf(sc[s] - m);
            float l = cpu_row_sum(sc, n);
            for (int64_t s = 0; s < n; s++) {
                const float *restrict vr = vb + s * J->Hkv * D;
                float p = sc[s];
                for (int64_t d = 0; d < D; d++) o[d] += p * vr[d];
            }
            float inv = 1.0f / l;
            for (int64_t d = 0; d < D; d++) o[d] *= inv;
            *lse = m + logf(l);
        }
    }
    free(Kt);
}

moe_status moe_cpu_attention(moe_ctx *ctx, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                             const moe_tensor *v, float scale, int causal) {
    CPU_F32("attention", out);
    att_job J = {.q = moe_f32(q), .k = moe_f32(k), .v = moe_f32(v), .o = moe_f32(out), .l = moe_f32(lse),
                 .B = q->shape[0], .T = q->shape[1], .S = k->shape[1], .Hq = q->shape[2], .Hkv = k->shape[2],
                 .D = q->shape[3], .scale = scale, .causal = causal};
    moe_parallel_for(ctx->pool, J.B * J.Hq, 1, fwd_range, &J);
    if (J.failed) return moe_error(MOE_ERR_OOM, "attention: out of host memory for scratch");
    return MOE_OK;
}

static void bwd_range(void *arg, int64_t i0, int64_t i1) {
    att_job *J = arg;
    int64_t S = J->S, D = J->D, T = J->T, Hq = J->Hq, Hkv = J->Hkv, G = Hq / Hkv, rs = Hkv * D;
    float *Kt = malloc((size_t)(2 * S * D + 3 * S + 1) * sizeof(float));
    if (!Kt) { __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED); return; }
    float *Vt = Kt + S * D, *p = Vt + S * D, *dp = p + S, *ds = dp + S;
    for (int64_t it = i0; it < i1; it++) {
        int64_t b = it / Hkv, hk = it % Hkv;
        transpose_kv(J->k, Kt, J, b, hk);
        transpose_kv(J->v, Vt, J, b, hk);
        const float *kb = J->k + (b * S * Hkv + hk) * D;
        float *dkb = J->dk + (b * S * Hkv + hk) * D, *dvb = J->dv + (b * S * Hkv + hk) * D;
        for (int64_t s = 0; s < S; s++)
            for (int64_t d = 0; d < D; d++) dkb[s * rs + d] = dvb[s * rs + d] = 0.0f;
        for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
            for (int64_t t = 0; t < T; t++) {
                int64_t row = (b * T + t) * Hq + h;
                const float *restrict q = J->q + row * D, *restrict go = J->dout + row * D;
                const float *restrict o = J->out + row * D;
                float *restrict dq = J->dq + row * D;
                for (int64_t d = 0; d < D; d++) dq[d] = 0.0f;
                int64_t n = visible(J, t);
                if (n == 0) continue;
                float lse = J->lse[(b * Hq + h) * T + t];
                scores(q, Kt, S, n, D, J->scale, p);
                for (int64_t s = 0; s < n; s++) p[s] = cpu_expf(p[s] - lse);
                for (int64_t s = 0; s < n; s++) dp[s] = 0.0f;
                for (int64_t d = 0; d < D; d++) {
                    float g = go[d];
                    const float *restrict vr = Vt + d * S;
                    for (int64_t s = 0; s < n; s++) dp[s] += g * vr[s];
                }
                float di = cpu_row_dot(go, o, D);
                for (int64_t s = 0; s < n; s++) ds[s] = p[s] * (dp[s] - di);
                for (int64_t s = 0; s < n; s++) {
                    const float *restrict kr = kb + s * rs;
                    float *restrict dkr = dkb + s * rs, *restrict dvr = dvb + s * rs;
                    float w = ds[s], ws = ds[s] * J->scale, ps = p[s];
                    for (int64_t d = 0; d < D; d++) {
                        dq[d] += w * kr[d];
                        dkr[d] += ws * q[d];
                        dvr[d] += ps * go[d];
                    }
                }
                for (int64_t d = 0; d < D; d++) dq[d] *= J->scale;
            }
        }
    }
    free(Kt);
}

moe_status moe_cpu_attention_backward(moe_ctx *ctx, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv,
                                      const moe_tensor *dout, const moe_tensor *q, const moe_tensor *k,
                                      const moe_tensor *v, const moe_tensor *out, const moe_tensor *lse, float scale,
                                      int causal) {
    CPU_F32("attention_backward", dq);
    att_job J = {.q = moe_f32(q), .k = moe_f32(k), .v = moe_f32(v), .dout = moe_f32(dout), .out = moe_f32(out),
                 .lse = moe_f32(lse), .dq = moe_f32(dq), .dk = moe_f32(dk), .dv = moe_f32(dv), .B = q->shape[0],
                 .T = q->shape[1], .S = k->shape[1], .Hq = q->shape[2], .Hkv = k->shape[2], .D = q->shape[3],
                 .scale = scale, .causal = causal};
    moe_parallel_for(ctx->pool, J.B * J.Hkv, 1, bwd_range, &J);
    if (J.failed) return moe_error(MOE_ERR_OOM, "attention_backward: out of host memory for scratch");
    return MOE_OK;
}
