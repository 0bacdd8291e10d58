/* Scaled dot-product attention with grouped-query heads and an optional
 * causal mask (query t sees keys s <= t + S - T). The forward saves the
 * log-sum-exp of each score row; the backward recomputes probabilities from it,
 * so only a [chunk, S] block of scores exists at a time. Both directions are
 * GEMMs on strided head views (single-threaded BLAS inside each task).
 * Forward runs in parallel over (b, q head); backward over (b, kv head), so
 * each task owns its dK, dV and the dQ of its query heads and nothing races. */
#include "cpu.h"

#include <cblas.h>
#include <math.h>
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

/* Query rows are processed in chunks of this many, so the [chunk, S] score
 * block stays small at long sequences. */
#define ATT_CHUNK 256

static void gemm_rm(int ta, int tb, int64_t M, int64_t N, int64_t K, float alpha, const float *a, int64_t lda,
                    const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    cblas_sgemm(CblasRowMajor, ta ? CblasTrans : CblasNoTrans, tb ? CblasTrans : CblasNoTrans, (int)M, (int)N, (int)K,
                alpha, a, (int)lda, b, (int)ldb, beta, c, (int)ldc);
}

/* P[t, s] = exp(scale q_t . k_s - lse_t) for visible s, else 0; computes lse when lse_out is set. */
static void probabilities(const att_job *J, int64_t t0, int64_t tc, float *P, const float *lse_in, float *lse_out) {
    int64_t S = J->S;
    for (int64_t i = 0; i < tc; i++) {
        float *row = P + i * S;
        int64_t n = visible(J, t0 + i);
        if (n == 0) {
            for (int64_t s = 0; s < S; s++) row[s] = 0.0f;
            if (lse_out) lse_out[i] = -INFINITY;
            continue;
        }
        float l;
        if (lse_out) {
            float m = cpu_row_max(row, n);
            for (int64_t s = 0; s < n; s++) row[s] = cpu_expf(row[s] - m);
            float sum = cpu_row_sum(row, n);
            float inv = 1.0f / sum;
            for (int64_t s = 0; s < n; s++) row[s] *= inv;
            l = m + logf(sum);
            lse_out[i] = l;
        } else {
            l = lse_in[i];
            for (int64_t s = 0; s < n; s++) row[s] = cpu_expf(row[s] - l);
        }
        for (int64_t s = n; s < S; s++) row[s] = 0.0f;
    }
}

/* Per (b, q head), in chunks of query rows: scores by GEMM, masked softmax,
 * then O = P V by GEMM. */
static void fwd_range(void *arg, int64_t i0, int64_t i1) {
    att_job *J = arg;
    int64_t S = J->S, D = J->D, T = J->T, Hq = J->Hq, G = J->Hq / J->Hkv, ldq = Hq * D, ldk = J->Hkv * D;
    int64_t chunk = T < ATT_CHUNK ? T : ATT_CHUNK;
    float *P = malloc((size_t)(chunk * S + 1) * sizeof(float));
    if (!P) { __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED); return; }
    for (int64_t it = i0; it < i1; it++) {
        int64_t b = it / Hq, h = it % Hq, hk = h / G;
        const float *kb = J->k + (b * S * J->Hkv + hk) * D, *vb = J->v + (b * S * J->Hkv + hk) * D;
        for (int64_t t0 = 0; t0 < T; t0 += chunk) {
            int64_t tc = T - t0 < chunk ? T - t0 : chunk;
            const float *q = J->q + ((b * T + t0) * Hq + h) * D;
            float *o = J->o + ((b * T + t0) * Hq + h) * D;
            gemm_rm(0, 1, tc, S, D, J->scale, q, ldq, kb, ldk, 0.0f, P, S);
            probabilities(J, t0, tc, P, NULL, J->l + (b * Hq + h) * T + t0);
            gemm_rm(0, 0, tc, D, S, 1.0f, P, S, vb, ldk, 0.0f, o, ldq);
        }
    }
    free(P);
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

/* Per (b, kv head), over its query heads and chunks of query rows:
 *   P = softmax rows from the saved lse, dP = dO V^T, dS = P (dP - rowdot(dO, O)),
 *   dQ = scale dS K, dK += scale dS^T Q, dV += P^T dO    (five GEMMs) */
static void bwd_range(void *arg, int64_t i0, int64_t i1) {
    att_job *J = arg;
    int64_t S = J->S, D = J->D, T = J->T, Hq = J->Hq, Hkv = J->Hkv, G = Hq / Hkv, ldq = Hq * D, ldk = Hkv * D;
    int64_t chunk = T < ATT_CHUNK ? T : ATT_CHUNK;
    float *P = malloc((size_t)(2 * chunk * S + 1) * sizeof(float));
    if (!P) { __atomic_store_n(&J->failed, 1, __ATOMIC_RELAXED); return; }
    float *dS = P + chunk * S;
    for (int64_t it = i0; it < i1; it++) {
        int64_t b = it / Hkv, hk = it % Hkv;
        const float *kb = J->k + (b * S * Hkv + hk) * D, *vb = J->v + (b * S * Hkv + hk) * D;
        float *dkb = J->dk + (b * S * Hkv + hk) * D, *dvb = J->dv + (b * S * Hkv + hk) * D;
        int first = 1;
        for (int64_t h = hk * G; h < (hk + 1) * G; h++) {
            for (int64_t t0 = 0; t0 < T; t0 += chunk) {
                int64_t tc = T - t0 < chunk ? T - t0 : chunk;
                int64_t row0 = (b * T + t0) * Hq + h;
                const float *q = J->q + row0 * D, *go = J->dout + row0 * D, *o = J->out + row0 * D;
                float *dq = J->dq + row0 * D;
                gemm_rm(0, 1, tc, S, D, J->scale, q, ldq, kb, ldk, 0.0f, P, S);
                probabilities(J, t0, tc, P, J->lse + (b * Hq + h) * T + t0, NULL);
                gemm_rm(0, 1, tc, S, D, 1.0f, go, ldq, vb, ldk, 0.0f, dS, S);
                for (int64_t i = 0; i < tc; i++) {
                    float di = cpu_row_dot(go + i * ldq, o + i * ldq, D);
                    float *restrict ds = dS + i * S;
                    const float *restrict p = P + i * S;
                    for (int64_t s = 0; s < S; s++) ds[s] = p[s] * (ds[s] - di);
                }
                float beta = first ? 0.0f : 1.0f;
                gemm_rm(0, 0, tc, D, S, J->scale, dS, S, kb, ldk, 0.0f, dq, ldq);
                gemm_rm(1, 0, S, D, tc, J->scale, dS, S, q, ldq, beta, dkb, ldk);
                gemm_rm(1, 0, S, D, tc, 1.0f, P, S, go, ldq, beta, dvb, ldk);
                first = 0;
            }
        }
        if (first)   /* T == 0: nothing wrote dK, dV */
            for (int64_t s = 0; s < S; s++)
                for (int64_t d = 0; d < D; d++) dkb[s * ldk + d] = dvb[s * ldk + d] = 0.0f;
    }
    free(P);
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
