/* The dispatch table a backend implements. Entries have the signatures of the
 * moe_op_* functions in ops.h and are called only after ops.c validated the
 * arguments, so a backend checks nothing that ops.c already checked.
 *
 * What a backend may assume:
 * - every tensor is on this backend's device (copy: at least one of the two);
 * - outputs are contiguous; inputs are contiguous except for copy, binary,
 *   unary and unary_backward, which get strided views (broadcast inputs of
 *   binary are expanded views with stride 0 and the output's shape);
 * - float tensors of one call share one dtype, except the per-row statistics
 *   (rmsnorm/layernorm rstd and mean, attention lse, cross_entropy loss and
 *   lse), which have that dtype or f32 (f32 statistics with bf16 data);
 *   index tensors are i64.
 * A backend that lacks an entry leaves it NULL; ops.c then reports
 * "<op> is not supported on <backend>". */
#ifndef MOE_BACKEND_H
#define MOE_BACKEND_H

#include "ops.h"

typedef struct moe_backend {
    const char *name;
    moe_device_type device_type;
    moe_status (*synchronize)(moe_ctx *ctx, moe_device dev);

    moe_status (*copy)(moe_ctx *, moe_tensor *dst, const moe_tensor *src);
    moe_status (*fill)(moe_ctx *, moe_tensor *t, double v);
    moe_status (*fill_randn)(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std);
    moe_status (*fill_rand)(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi);

    moe_status (*gemm)(moe_ctx *, int transa, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                       float beta, moe_tensor *c);
    moe_status (*gemm_grouped)(moe_ctx *, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                               float beta, moe_tensor *c, const int64_t *offsets, int groups);
    moe_status (*gemm_grouped_wgrad)(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                     moe_tensor *c, const int64_t *offsets, int groups);

    moe_status (*binary)(moe_ctx *, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b);
    moe_status (*unary)(moe_ctx *, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha);
    moe_status (*unary_backward)(moe_ctx *, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                                 const moe_tensor *x, float alpha);
    moe_status (*axpy)(moe_ctx *, moe_tensor *y, float alpha, const moe_tensor *x);
    /* x viewed as [outer, n, inner], out as [outer, inner] */
    moe_status (*reduce)(moe_ctx *, moe_reduce_op op, moe_tensor *out, const moe_tensor *x,
                         int64_t outer, int64_t n, int64_t inner);

    moe_status (*softmax)(moe_ctx *, moe_tensor *y, const moe_tensor *x);
    moe_status (*softmax_backward)(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
    moe_status (*log_softmax)(moe_ctx *, moe_tensor *y, const moe_tensor *x);
    moe_status (*log_softmax_backward)(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
    moe_status (*logsumexp)(moe_ctx *, moe_tensor *out, const moe_tensor *x);

    moe_status (*topk)(moe_ctx *, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k);
    /* index range errors are the backend's to report (indices may live on the device) */
    moe_status (*gather)(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
    moe_status (*scatter_add)(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
    moe_status (*index_select)(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
    moe_status (*index_add)(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);

    moe_status (*rmsnorm)(moe_ctx *, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w, float eps);
    /* dx = beta dx + the gradient (dx not read when beta is 0) */
    moe_status (*rmsnorm_backward)(moe_ctx *, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta);
    moe_status (*layernorm)(moe_ctx *, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                            const moe_tensor *w, const moe_tensor *b, float eps);
    moe_status (*layernorm_backward)(moe_ctx *, moe_tensor *dx, moe_tensor *dw, moe_tensor *db, const moe_tensor *dy,
                                     const moe_tensor *x, const moe_tensor *w, const moe_tensor *mean,
                                     const moe_tensor *rstd);
    moe_status (*rope)(moe_ctx *, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse);
    moe_status (*attention)(moe_ctx *, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                            const moe_tensor *v, float scale, int causal);
    moe_status (*attention_backward)(moe_ctx *, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout,
                                     const moe_tensor *q, const moe_tensor *k, const moe_tensor *v,
                                     const moe_tensor *out, const moe_tensor *lse, float scale, int causal);
    moe_status (*swiglu)(moe_ctx *, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up);
    moe_status (*swiglu_backward)(moe_ctx *, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                  const moe_tensor *gate, const moe_tensor *up);
    moe_status (*cross_entropy)(moe_ctx *, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                                const moe_tensor *targets, int64_t ignore_index);
    moe_status (*cross_entropy_backward)(moe_ctx *, moe_tensor *dlogits, const moe_tensor *logits,
                                         const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                         float scale);
    moe_status (*adamw)(moe_ctx *, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                        const moe_adamw_cfg *cfg);
    /* out (f32, one element) = sum of x^2 (x contiguous, f32 or bf16) */
    moe_status (*sumsq)(moe_ctx *, moe_tensor *out, const moe_tensor *x);

    /* ---- MoE token movement (ops.h, ops_moe.c); kept at the end: the CUDA
     * table is positional. Index range errors are the backend's to report
     * (slots are i32, token_idx i64). ---- */
    moe_status (*gather_sum)(moe_ctx *, moe_tensor *y, const moe_tensor *base, const moe_tensor *src,
                             const moe_tensor *w, const moe_tensor *slots);
    /* slots may be NULL (ops.h: combine_backward_slots) */
    moe_status (*combine_backward)(moe_ctx *, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                   const moe_tensor *slots);

    /* ---- expert-parallel routing maps (ops.h, ops_moe.c); arguments
     * checked by the ops layer (shapes, dtypes, devices, P <= MOE_EP_MAX_RANKS;
     * the CUDA ep_regroup checks its own block limit) ---- */
    moe_status (*ep_token_slots)(moe_ctx *, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                                 const moe_tensor *expert_idx, int64_t group_size);
    moe_status (*slot_tokens)(moe_ctx *, moe_tensor *token_idx, const moe_tensor *slots);
    moe_status (*ep_pack)(moe_ctx *, moe_tensor *packed, const moe_tensor *token_idx, const moe_tensor *expert_idx,
                          const moe_tensor *slots, const moe_tensor *tslots, int64_t group_size, int64_t width,
                          const int64_t *adjust);
    moe_status (*ep_unpack)(moe_ctx *, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                            const moe_tensor *perm);
    /* starts: HOST [2 * blocks + 1]: the regrouped start of block b = j * ranks + src
     * (blocks + 1 entries, the last R), then its start in the received order */
    moe_status (*ep_regroup)(moe_ctx *, moe_tensor *perm, moe_tensor *inv, const int64_t *starts, int64_t blocks);

    /* c = alpha (a1 op(b1) + a2 op(b2)) + beta c, rows grouped as in
     * gemm_grouped (ops.h moe_op_gemm_grouped_pair); optional: NULL makes the
     * ops layer call gemm_grouped twice */
    moe_status (*gemm_grouped_pair)(moe_ctx *, int transb, float alpha, const moe_tensor *a1, const moe_tensor *b1,
                                    const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                    const int64_t *offsets, int groups);

    /* cross_entropy and cross_entropy_backward (scale given) in one pass over
     * the logits (ops.h moe_op_cross_entropy_fused); optional: NULL makes the
     * ops layer call the two */
    moe_status (*cross_entropy_fused)(moe_ctx *, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                      const moe_tensor *logits, const moe_tensor *targets, int64_t ignore_index,
                                      float scale);

    /* RMSNorm over the last dim of x [B, T, heads * D], then rope on each head,
     * and the backward of the pair (ops.h moe_op_rmsnorm_rope); optional: NULL
     * makes the ops layer run the two ops */
    moe_status (*rmsnorm_rope)(moe_ctx *, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                               float eps, int64_t heads, int64_t pos_offset, float theta);
    moe_status (*rmsnorm_rope_backward)(moe_ctx *, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                        const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd,
                                        int64_t heads, int64_t pos_offset, float theta, float beta);

    /* gemm_grouped twice + swiglu, and gemm_grouped + swiglu_backward (ops.h
     * moe_op_gemm_grouped_swiglu(_backward)); optional: NULL makes the ops
     * layer run the parts */
    moe_status (*gemm_grouped_swiglu)(moe_ctx *, const moe_tensor *x, const moe_tensor *wg, const moe_tensor *wu,
                                      moe_tensor *g, moe_tensor *u, moe_tensor *h, const int64_t *offsets, int groups);
    moe_status (*gemm_grouped_swiglu_backward)(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                               const moe_tensor *g, const moe_tensor *u, moe_tensor *dg,
                                               moe_tensor *du, moe_tensor *h, const int64_t *offsets, int groups);

    /* moe_op_read_start / _finish (ops.h), arguments checked; optional: NULL
     * makes the ops layer read at start */
    moe_status (*read_start)(moe_ctx *, const moe_tensor *const *ts, int n, moe_read *r);
    moe_status (*read_finish)(moe_ctx *, moe_read *r);

    /* moe_op_gemm_grouped_swiglu_rows / moe_op_gemm_grouped_wgrad_rows (ops.h):
     * the experts' rows gathered by the GEMM's loads; rows checked and trusted
     * by the caller. Optional: NULL makes the ops layer gather them first. */
    moe_status (*gemm_grouped_swiglu_rows)(moe_ctx *, const moe_tensor *x, const moe_tensor *rows,
                                           const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                           moe_tensor *h, const int64_t *offsets, int groups);
    moe_status (*gemm_grouped_wgrad_rows)(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b,
                                          const moe_tensor *b_rows, float beta, moe_tensor *c, const int64_t *offsets,
                                          int groups);
    /* moe_op_gemm_grouped_swiglu_backward_w (ops.h), arguments checked;
     * optional, and *served = 0 leaves the call to the ops layer's parts */
    moe_status (*gemm_grouped_swiglu_backward_w)(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                                 const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                                 moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                                 const int64_t *offsets, int groups, int *served);
    /* whether the _rows calls' GEMMs would gather in their loads (forward x [., K] -> [., N]
     * and its weight gradient) for dt data of these row counts (offsets NULL: `rows` on the
     * device, taken as spread over every group); optional: NULL = never */
    int (*gemm_grouped_rows_fuses)(moe_ctx *, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int64_t rows,
                                   const int64_t *offsets, int groups);
    /* whether that call would be served (bf16 data of these sizes); optional: NULL = never */
    int (*gemm_grouped_swiglu_backward_w_fuses)(moe_ctx *, moe_device dev, moe_dtype dt, int64_t K, int64_t de,
                                                int64_t rows, const int64_t *offsets, int groups);

    /* The grouped GEMMs with the row offsets in an i64 tensor on the device
     * (ops.h moe_op_gemm_grouped_dev and kin), arguments checked by the ops
     * layer; optional: NULL, or *served = 0 with MOE_OK, makes the ops layer
     * read the offsets back and run the call with them on the host.
     * gemm_grouped_dev: a2 and b2 NULL, or the pair form; wgrad_dev: b_rows
     * NULL, or b's rows gathered; swiglu_dev: x_rows NULL, or x's rows gathered. */
    moe_status (*gemm_grouped_dev)(moe_ctx *, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                   const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                   const moe_tensor *offsets, int groups, int *served);
    moe_status (*gemm_grouped_wgrad_dev)(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b,
                                         const moe_tensor *b_rows, float beta, moe_tensor *c, const moe_tensor *offsets,
                                         int groups, int *served);
    moe_status (*gemm_grouped_swiglu_dev)(moe_ctx *, const moe_tensor *x, const moe_tensor *x_rows,
                                          const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                          moe_tensor *h, const moe_tensor *offsets, int groups, int *served);
    moe_status (*gemm_grouped_swiglu_backward_w_dev)(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                                     const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                                     moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                                     const moe_tensor *offsets, int groups, int *served);

    /* moe_op_adamw_advance (ops.h), arguments checked: step_dev += 1 unless
     * cfg's device clipping skips the step */
    moe_status (*adamw_advance)(moe_ctx *, moe_tensor *step_dev, const moe_adamw_cfg *cfg);
    /* moe_op_master_split / moe_op_master_join (ops.h), arguments checked */
    moe_status (*master_split)(moe_ctx *, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src);
    moe_status (*master_join)(moe_ctx *, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo);
    /* moe_op_index_select_slots (ops.h), arguments checked (x 2-dim, slots
     * [x rows, k] i32); optional: NULL, or *served = 0 with MOE_OK, makes the
     * ops layer run index_select */
    moe_status (*index_select_slots)(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *slots,
                                     int *served);
} moe_backend;


/* Installs the CPU backend into ctx (always available). */
void moe_cpu_backend_install(moe_ctx *ctx);
/* Installs the CUDA backend and an allocator per visible GPU. In a build
 * without CUDA, returns MOE_ERR_DEVICE with a message saying so. */
moe_status moe_cuda_backend_install(moe_ctx *ctx);
/* Releases the CUDA state of ctx (streams, handles, cached memory); call
 * before moe_ctx_free. A no-op without CUDA or when it was never installed. */
void moe_cuda_backend_uninstall(moe_ctx *ctx);
/* Number of usable GPUs (0 without CUDA or without a driver). */
int moe_cuda_device_count(void);

#endif
