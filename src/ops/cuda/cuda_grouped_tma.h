// The grouped GEMM through the bulk tensor copy engine (cuda_grouped_tma.cu):
// c_g = alpha * a_g op(b_g) + beta * c_g with a [M, K] grouped by row
// offsets, b [G, N, K] (transb: op(b_g) = b_g^T, the forward of the expert
// bank's weights) or [G, K, N] (their data gradients), c [M, N]; and the
// weight gradient (cuda_tma_grouped_wgrad); bf16 in and out, f32 accumulation. Sets *ran = false and returns MOE_OK, launching
// nothing, when the call does not fit: more than MOE_TMA_GROUPED_MAX_GROUPS
// experts, K, K2 or N not a multiple of 8, an operand not 16-byte aligned,
// over 2^31 rows or G * N near 2^31, over 2^30 work items, no tensor-map
// encoder in the driver, or the kernel's shared memory or clusters not to be
// had on this device (then no later call tries). With beta != 0 a tile's c
// comes in by copy while it multiplies; tiles with rows past their group's
// end store directly from registers.
#ifndef MOE_CUDA_GROUPED_TMA_H
#define MOE_CUDA_GROUPED_TMA_H

#include "cuda_common.cuh"

#define MOE_TMA_GROUPED_MAX_GROUPS 256

moe_status cuda_tma_grouped(cuda_dev *d, int transb, float alpha, const void *a, const void *b, float beta, void *c,
                            const int64_t *offsets, int groups, int64_t K, int64_t N, bool *ran);
/* c = alpha (a op(b) + a2 op(b2)) + beta c in one pass over K + K2 (a2 [M, K2],
 * b2 like b with K2); K2 = 0: as cuda_tma_grouped */
moe_status cuda_tma_grouped_pair(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                 const void *b2, int64_t K2, float beta, void *c, const int64_t *offsets, int groups,
                                 int64_t K, int64_t N, bool *ran);
/* the weight gradient c_g = alpha a_g^T b_g + beta c_g: a [M, P] and b [M, Q]
 * grouped by row offsets, c [G, P, Q], all bf16; P and Q multiples of 8, G * P
 * under 2^31 (refusals as above) */
moe_status cuda_tma_grouped_wgrad(cuda_dev *d, float alpha, const void *a, const void *b, float beta, void *c,
                                  const int64_t *offsets, int groups, int64_t P, int64_t Q, bool *ran);

/* The SwiGLU around the grouped GEMM, in one launch (host offsets only):
 * _swiglu: u = x wu_g^T (wu [G, N, K]) and h = silu(g) * u, g given;
 * _swiglu_bwd: dh = alpha dy wd_g (wd [G, K, N]), not stored, and from it
 * dg, du and h (may be NULL) as swiglu_backward gives them from g and u.
 * Every tensor [rows, N] bf16; the bytes are those of the plain GEMM followed
 * by the elementwise kernels. Refusals as above. */
moe_status cuda_tma_grouped_swiglu(cuda_dev *d, const void *x, const void *wu, const void *g, void *u, void *h,
                                   const int64_t *offsets, int groups, int64_t K, int64_t N, bool *ran);
moe_status cuda_tma_grouped_swiglu_bwd(cuda_dev *d, float alpha, const void *dy, const void *wd, const void *g,
                                       const void *u, void *dg, void *du, void *h, const int64_t *offsets, int groups,
                                       int64_t K, int64_t N, bool *ran);

/* The same with the groups' row offsets on the device (off_dev: G + 1 int64,
 * 8-byte aligned; M the rows of a, the last offset): nothing is read back,
 * and the launch does not depend on the offsets' values (each block reads
 * them; the grid is sized for the most work M rows can make). Offsets that
 * are not nondecreasing from 0 to M give wrong rows, never accesses outside
 * the tensors (they are clamped into [0, M] and made nondecreasing).
 * cuda_tma_grouped_dev takes the pair form (K2 = 0: a single pair). */
moe_status cuda_tma_grouped_dev(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                const void *b2, int64_t K2, float beta, void *c, const int64_t *off_dev, int groups,
                                int64_t M, int64_t K, int64_t N, bool *ran);
moe_status cuda_tma_grouped_wgrad_dev(cuda_dev *d, float alpha, const void *a, const void *b, float beta, void *c,
                                      const int64_t *off_dev, int groups, int64_t M, int64_t P, int64_t Q, bool *ran);

#endif
