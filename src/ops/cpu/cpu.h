/* Private declarations of the CPU backend: the kernels of its dispatch table
 * and small inline helpers shared by them. Math is f32 only. */
#ifndef MOE_CPU_H
#define MOE_CPU_H

#include "../backend.h"
#include "../../core/context.h"
#include "../../core/threadpool.h"

#include <math.h>
#include <stdint.h>
#include <string.h>

/* Floating-point exceptions are never trapped in moelab; telling GCC so lets it
 * if-convert (and so vectorise) loops with float compares such as cpu_expf's
 * clamps. Results are unchanged: this flag permits no reassociation. */
#pragma GCC optimize("no-trapping-math")

/* Return MOE_ERR_DTYPE unless t is f32. */
#define CPU_F32(op, t)                                                                             \
    do {                                                                                           \
        if ((t) && (t)->dtype != MOE_F32)                                                          \
            return moe_error(MOE_ERR_DTYPE, "%s: the cpu backend computes in f32, got dtype %s", \
                             (op), moe_dtype_name((t)->dtype));                                    \
    } while (0)

/* Items per parallel chunk so that each chunk does about `work` scalar ops. */
static inline int64_t cpu_grain(int64_t per_item, int64_t work) {
    if (per_item < 1) per_item = 1;
    int64_t g = work / per_item;
    return g < 1 ? 1 : g;
}
#define CPU_PAR_WORK 32768

/* exp for f32 built from arithmetic only, so loops over it vectorise:
 * Cody-Waite range reduction and a degree-6 polynomial (about 1 ulp);
 * exp(x) = 0 below -87.3, saturates at 88.7. */
static inline float cpu_expf(float x) {
    float xc = x > 88.7f ? 88.7f : x;
    xc = xc < -87.3f ? -87.3f : xc;
    float n = xc * 1.44269504088896341f + 12582912.0f;   /* round to nearest */
    n -= 12582912.0f;
    float r = xc - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } sc = { .u = (uint32_t)((int32_t)n + 127) << 23 };
    float res = p * sc.f;
    return x < -87.3f ? 0.0f : res;
}

/* Deterministic 8-lane sum / max of a contiguous row (vectorises at -O3
 * without reassociation flags; the lane order is fixed). */
/* Sums in blocks of 256 with 8 float lanes (vectorises), blocks added in
 * double: long reductions (a whole gradient buffer) keep their precision. */
static inline float cpu_block_sum(const float *restrict x, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline float cpu_row_sum(const float *restrict x, int64_t n) {
    if (n <= 256) return cpu_block_sum(x, n);
    double total = 0;
    for (int64_t i = 0; i < n; i += 256) total += cpu_block_sum(x + i, n - i < 256 ? n - i : 256);
    return (float)total;
}

static inline float cpu_row_dot(const float *restrict x, const float *restrict y, int64_t n) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += x[i + l] * y[i + l];
    for (int l = 0; i < n; i++, l++) acc[l] += x[i] * y[i];
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

static inline float cpu_row_max(const float *restrict x, int64_t n) {
    float acc[8];
    for (int l = 0; l < 8; l++) acc[l] = -INFINITY;
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] = x[i + l] > acc[l] ? x[i + l] : acc[l];
    for (int l = 0; i < n; i++, l++) acc[l] = x[i] > acc[l] ? x[i] : acc[l];
    float m = acc[0];
    for (int l = 1; l < 8; l++) m = acc[l] > m ? acc[l] : m;
    return m;
}

/* sum of exp(x - m) over a row */
static inline float cpu_row_sumexp(const float *restrict x, int64_t n, float m) {
    float acc[8] = {0};
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        for (int l = 0; l < 8; l++) acc[l] += cpu_expf(x[i + l] - m);
    for (int l = 0; i < n; i++, l++) acc[l] += cpu_expf(x[i] - m);
    return ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7]));
}

/* memory (cpu_backend.c) */
moe_status moe_cpu_copy(moe_ctx *, moe_tensor *dst, const moe_tensor *src);
moe_status moe_cpu_fill(moe_ctx *, moe_tensor *t, double v);
moe_status moe_cpu_fill_randn(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std);
moe_status moe_cpu_fill_rand(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi);
/* cpu_gemm.c */
moe_status moe_cpu_gemm(moe_ctx *, int transa, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                        float beta, moe_tensor *c);
moe_status moe_cpu_gemm_grouped(moe_ctx *, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                float beta, moe_tensor *c, const int64_t *offsets, int groups);
moe_status moe_cpu_gemm_grouped_wgrad(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                      moe_tensor *c, const int64_t *offsets, int groups);
/* cpu_elementwise.c */
moe_status moe_cpu_binary(moe_ctx *, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b);
moe_status moe_cpu_unary(moe_ctx *, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha);
moe_status moe_cpu_unary_backward(moe_ctx *, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                                  const moe_tensor *x, float alpha);
moe_status moe_cpu_axpy(moe_ctx *, moe_tensor *y, float alpha, const moe_tensor *x);
moe_status moe_cpu_swiglu(moe_ctx *, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up);
moe_status moe_cpu_swiglu_backward(moe_ctx *, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                   const moe_tensor *gate, const moe_tensor *up);
/* cpu_reduce.c */
moe_status moe_cpu_reduce(moe_ctx *, moe_reduce_op op, moe_tensor *out, const moe_tensor *x, int64_t outer,
                          int64_t n, int64_t inner);
/* cpu_softmax.c */
moe_status moe_cpu_softmax(moe_ctx *, moe_tensor *y, const moe_tensor *x);
moe_status moe_cpu_softmax_backward(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
moe_status moe_cpu_log_softmax(moe_ctx *, moe_tensor *y, const moe_tensor *x);
moe_status moe_cpu_log_softmax_backward(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
moe_status moe_cpu_logsumexp(moe_ctx *, moe_tensor *out, const moe_tensor *x);
/* cpu_index.c */
moe_status moe_cpu_topk(moe_ctx *, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k);
moe_status moe_cpu_gather(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
moe_status moe_cpu_scatter_add(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
moe_status moe_cpu_index_select(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
moe_status moe_cpu_index_add(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
/* cpu_norm.c */
moe_status moe_cpu_rmsnorm(moe_ctx *, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                           float eps);
moe_status moe_cpu_rmsnorm_backward(moe_ctx *, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                    const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta);
moe_status moe_cpu_layernorm(moe_ctx *, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                             const moe_tensor *w, const moe_tensor *b, float eps);
moe_status moe_cpu_layernorm_backward(moe_ctx *, moe_tensor *dx, moe_tensor *dw, moe_tensor *db,
                                      const moe_tensor *dy, const moe_tensor *x, const moe_tensor *w,
                                      const moe_tensor *mean, const moe_tensor *rstd);
/* cpu_rope.c */
moe_status moe_cpu_rope(moe_ctx *, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse);
/* cpu_attention.c */
moe_status moe_cpu_attention(moe_ctx *, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                             const moe_tensor *v, float scale, int causal);
moe_status moe_cpu_attention_backward(moe_ctx *, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv,
                                      const moe_tensor *dout, const moe_tensor *q, const moe_tensor *k,
                                      const moe_tensor *v, const moe_tensor *out, const moe_tensor *lse, float scale,
                                      int causal);
/* cpu_loss.c */
moe_status moe_cpu_cross_entropy(moe_ctx *, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                                 const moe_tensor *targets, int64_t ignore_index);
moe_status moe_cpu_cross_entropy_backward(moe_ctx *, moe_tensor *dlogits, const moe_tensor *logits,
                                          const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                          float scale);
/* cpu_reduce.c */
moe_status moe_cpu_sumsq(moe_ctx *, moe_tensor *out, const moe_tensor *x);
/* cpu_adamw.c */
moe_status moe_cpu_adamw(moe_ctx *, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                         const moe_adamw_cfg *cfg);
moe_status moe_cpu_adamw_advance(moe_ctx *, moe_tensor *step_dev, const moe_adamw_cfg *cfg);
moe_status moe_cpu_master_split(moe_ctx *, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src);
moe_status moe_cpu_master_join(moe_ctx *, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo);
/* cpu_moe.c (f32 and bf16) */
moe_status moe_cpu_gather_sum(moe_ctx *, moe_tensor *y, const moe_tensor *base, const moe_tensor *src, const moe_tensor *w,
                              const moe_tensor *slots);
moe_status moe_cpu_combine_backward(moe_ctx *, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                    const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                    const moe_tensor *slots);
moe_status moe_cpu_ep_token_slots(moe_ctx *, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                                  const moe_tensor *expert_idx, int64_t group_size);
moe_status moe_cpu_slot_tokens(moe_ctx *, moe_tensor *token_idx, const moe_tensor *slots);
moe_status moe_cpu_ep_pack(moe_ctx *, moe_tensor *packed, const moe_tensor *token_idx, const moe_tensor *expert_idx,
                           const moe_tensor *slots, const moe_tensor *tslots, int64_t group_size, int64_t width,
                           const int64_t *adjust);
moe_status moe_cpu_ep_unpack(moe_ctx *, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                             const moe_tensor *perm);
moe_status moe_cpu_ep_regroup(moe_ctx *, moe_tensor *perm, moe_tensor *inv, const int64_t *starts, int64_t blocks);

#endif
