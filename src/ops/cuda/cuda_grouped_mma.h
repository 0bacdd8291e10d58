// The own grouped-GEMM kernel (cuda_grouped_mma.cu): bf16 in and out, f32
// accumulation, one launch for all experts. Each entry sets *ran = false and
// returns MOE_OK, launching nothing, when the call does not fit the kernel:
// more than MOE_MMA_GROUPED_MAX_GROUPS experts, a contiguous extent (K and N,
// or P and Q) not a multiple of 8, an operand not 16-byte aligned, or over
// 2^31 rows. Operands as in moe_op_gemm_grouped / moe_op_gemm_grouped_wgrad.
// The row offsets are on the host (offsets, G + 1 values; off_dev NULL and M
// unused), or on the device (offsets NULL, off_dev an 8-byte aligned i64
// [G + 1] array, M the rows in all): then a one-block plan kernel reads them
// (clamped into [0, M], made nondecreasing) and lists each block's work in
// scratch memory; nothing is copied back and the launch does not depend on
// their values (graph capture needs the scratch from a pool of its own); the
// weight gradient is then never split along its rows. off_dev must not
// change during the call.
#ifndef MOE_CUDA_GROUPED_MMA_H
#define MOE_CUDA_GROUPED_MMA_H

#include "cuda_common.cuh"

#define MOE_MMA_GROUPED_MAX_GROUPS 256

moe_status cuda_mma_grouped(cuda_dev *d, int transb, float alpha, const void *a, const void *b, float beta, void *c,
                            const int64_t *offsets, const int64_t *off_dev, int groups, int64_t M, int64_t K,
                            int64_t N, bool *ran);
/* c = alpha (a op(b) + a2 op(b2)) + beta c in one pass over K + K2 (a2 [M, K2],
 * b2 like b with K2); K2 = 0: as cuda_mma_grouped */
moe_status cuda_mma_grouped_pair(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                 const void *b2, int64_t K2, float beta, void *c, const int64_t *offsets,
                                 const int64_t *off_dev, int groups, int64_t M, int64_t K, int64_t N, bool *ran);
/* SwiGLU forward in one launch: g = x wg_e^T, u = x wu_e^T (wg, wu [E, de, K],
 * transposed as the expert bank stores them), h = silu(g) u from the rounded g
 * and u; all three written [M, de]. de a multiple of 64. x_rows (device, M
 * values, or NULL): row r of x is x_rows[r] of x (the MoE dispatch's gather). */
moe_status cuda_mma_grouped_swiglu(cuda_dev *d, const void *x, const int64_t *x_rows, const void *wg, const void *wu,
                                   void *g, void *u, void *h, const int64_t *offsets, const int64_t *off_dev, int groups,
                                   int64_t M, int64_t K, int64_t de, bool *ran);
/* SwiGLU backward through the down projection: dh = alpha dy w_e (w [E, K, de],
 * not transposed), rounded to bf16 and met with the saved g and u: dg and du
 * written [M, de], dh never stored; h (may be NULL) gets the activation again,
 * the forward's bytes (the weight gradient of the down projection reads it). */
moe_status cuda_mma_grouped_swiglu_bwd(cuda_dev *d, float alpha, const void *dy, const void *w, const void *g,
                                       const void *u, void *dg, void *du, void *h, const int64_t *offsets,
                                       const int64_t *off_dev, int groups, int64_t M, int64_t K, int64_t de, bool *ran);
/* b_rows (device, M values, or NULL): row r of b is b_rows[r] of b. */
/* The same with the MoE combine's row weights folded in (dy: the unweighted
 * rows, rw [M] bf16 the weights): dh = rw * (alpha dy w_e); hw = rw * h (h
 * the forward's rounded activation); dw[r] = (alpha dy w_e)[r] . h[r] (f32,
 * a fixed order), written as bf16 (dw_bf16) or f32. */
moe_status cuda_mma_grouped_swiglu_bwd_w(cuda_dev *d, float alpha, const void *dy, const void *w, const void *g,
                                         const void *u, const void *rw, void *dg, void *du, void *hw, void *dw,
                                         bool dw_bf16, const int64_t *offsets, const int64_t *off_dev, int groups,
                                         int64_t M, int64_t K, int64_t de, bool *ran);
moe_status cuda_mma_grouped_wgrad(cuda_dev *d, float alpha, const void *a, const void *b, const int64_t *b_rows,
                                  float beta, void *c, const int64_t *offsets, const int64_t *off_dev, int groups,
                                  int64_t M, int64_t P, int64_t Q, bool *ran);

#endif
