/* The math layer's public API. Every moe_op_* validates its arguments (shapes,
 * dtypes, devices; errors say expected vs got) and then calls the backend of
 * the tensors' device through its dispatch table (backend.h).
 *
 * Conventions
 * - Outputs are preallocated by the caller and must be contiguous; inputs may
 *   be any strided view unless a comment says "contiguous" (the op then makes a
 *   contiguous copy itself when needed).
 * - All float tensors of one call share a dtype, except per-row statistics
 *   (rstd, mean, lse, per-row loss), which may also be f32 whatever the data
 *   dtype (bf16 data with f32 statistics); index tensors are i64.
 *   The CPU backend computes in f32; the CUDA backend in bf16/f32 with f32
 *   accumulation.
 * - "rows" means all leading dims flattened: a [B, T, D] tensor is B*T rows of D.
 * - Backward functions that produce parameter gradients ACCUMULATE into them
 *   (dw += ...), because parameters are shared across uses; input gradients
 *   are OVERWRITTEN.
 */
#ifndef MOE_OPS_H
#define MOE_OPS_H

#include "../core/context.h"
#include "../core/tensor.h"

#include <math.h>

typedef enum {
    MOE_BIN_ADD, MOE_BIN_SUB, MOE_BIN_MUL, MOE_BIN_DIV, MOE_BIN_MAX, MOE_BIN_MIN,
    MOE_NUM_BINARY
} moe_binary_op;

typedef enum {
    MOE_UN_NEG, MOE_UN_EXP, MOE_UN_LOG, MOE_UN_SQRT, MOE_UN_RSQRT, MOE_UN_ABS,
    MOE_UN_TANH, MOE_UN_SIGMOID, MOE_UN_RELU, MOE_UN_SILU, MOE_UN_GELU, /* GELU: tanh approximation */
    MOE_UN_GELU_ERF, MOE_UN_SQUARE,
    MOE_UN_SCALE,       /* x * alpha */
    MOE_UN_ADD_SCALAR,  /* x + alpha */
    MOE_UN_POW_SCALAR,  /* x ^ alpha */
    MOE_NUM_UNARY
} moe_unary_op;

typedef enum { MOE_RED_SUM, MOE_RED_MEAN, MOE_RED_MAX, MOE_RED_MIN, MOE_NUM_REDUCE } moe_reduce_op;

/* ---- memory ---- */
/* dst = src: same number of elements; any dtypes (converted), any devices. */
moe_status moe_op_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src);
moe_status moe_op_fill(moe_ctx *ctx, moe_tensor *t, double v);
/* Normal(mean, std) / Uniform(lo, hi) from the counter-based stream (key, offset):
 * identical values on every device. t contiguous, float dtype. */
moe_status moe_op_fill_randn(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std);
moe_status moe_op_fill_rand(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi);
/* New contiguous tensor on `dev` (and dtype `dt`) holding t's values. */
moe_tensor *moe_op_to(moe_ctx *ctx, moe_tensor *t, moe_device dev, moe_dtype dt);
moe_tensor *moe_op_contiguous(moe_ctx *ctx, moe_tensor *t);

/* ---- GEMM (all float tensors contiguous in memory after op()) ----
 * c = alpha * op(a) @ op(b) + beta * c, op = transpose when trans* != 0.
 * 2-D: a [M,K] (or [K,M] if transa), b [K,N] (or [N,K]), c [M,N].
 * Batched: any of a, b with 3 dims [batch, ...]; a 2-D operand is shared by all
 * batches; c is [batch, M, N]. */
moe_status moe_op_gemm(moe_ctx *ctx, int transa, int transb, float alpha, const moe_tensor *a,
                       const moe_tensor *b, float beta, moe_tensor *c);
/* Expert GEMM, rows grouped by offsets (host array of G+1 nondecreasing values,
 * offsets[0] = 0, offsets[G] = M):
 *   c[o_g:o_{g+1}] = alpha * a[o_g:o_{g+1}] @ op(b[g]) + beta * c[o_g:o_{g+1}]
 * a [M,K], b [G,K,N] (or [G,N,K] when transb), c [M,N]. */
moe_status moe_op_gemm_grouped(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a,
                               const moe_tensor *b, float beta, moe_tensor *c, const int64_t *offsets, int groups);
/* Two grouped GEMMs into one output, summed before rounding:
 *   c[rows of g] = alpha * (a1 @ op(b1[g]) + a2 @ op(b2[g])) + beta * c[rows of g]
 * a1 [M,K1], b1 [G,K1,N] (or [G,N,K1]), a2 [M,K2], b2 likewise with K2, c [M,N]
 * (the data gradient of gate and up: dx = dg @ Wg + du @ Wu). */
moe_status moe_op_gemm_grouped_pair(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a1, const moe_tensor *b1,
                                    const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                    const int64_t *offsets, int groups);
/* The SwiGLU experts' first half in one call: g = x @ wg_e^T, u = x @ wu_e^T
 * per group of rows (wg, wu [G, I, K], the expert bank's layout), then
 * h = silu(g) * u; g, u and h [M, I] (g and u kept for the backward). Same
 * bytes as two gemm_grouped calls and swiglu; a backend may do it in one pass. */
moe_status moe_op_gemm_grouped_swiglu(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *wg, const moe_tensor *wu,
                                      moe_tensor *g, moe_tensor *u, moe_tensor *h, const int64_t *offsets, int groups);
/* Its backward through the down projection: dh = alpha * dy @ w_e (dy [M, K],
 * w [G, K, I]), then (dg, du) = swiglu_backward(dh, g, u); dh is not kept.
 * Same bytes as gemm_grouped (into a dh of g's dtype) and swiglu_backward.
 * h (NULL: skipped) gets swiglu(g, u) again, the forward's bytes: a forward
 * that kept only g and u has the activation back for the down projection's
 * weight gradient (on CUDA from the same epilogue, no extra pass). */
moe_status moe_op_gemm_grouped_swiglu_backward(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                               const moe_tensor *g, const moe_tensor *u, moe_tensor *dg, moe_tensor *du,
                                               moe_tensor *h, const int64_t *offsets, int groups);
/* The backward of the down projection, the SwiGLU and the MoE combine's row
 * weights at once, for a combine y[t] = sum of rw[r] * (h W^T)[r] over token
 * t's rows r. dy [M, K] holds each row's token gradient unweighted:
 *   dh = rw * (alpha dy @ w_e); (dg, du) = swiglu_backward(dh, g, u);
 *   hw = rw * h, h = swiglu(g, u) (for the down weights' gradient, dy^T hw);
 *   dw[r] = (alpha dy @ w_e)[r] . h[r]   (the weights' gradient)
 * so the combine's inputs (h W^T, [M, K]) need not be kept. rw, dw [M]. */
moe_status moe_op_gemm_grouped_swiglu_backward_w(moe_ctx *ctx, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                                 const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                                 moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                                 const int64_t *offsets, int groups);
/* Whether dev's backend gathers the rows in the GEMMs' loads for the _rows
 * calls below (x [., K] -> [., N] and its weight gradient), for dt data of
 * these row counts (else the rows are gathered into a tensor first). */
int moe_op_gemm_grouped_rows_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int64_t rows,
                                   const int64_t *offsets, int groups);
/* Whether dev's backend runs that call without the ops layer's parts for dt
 * data of these sizes (CUDA: one fused kernel, or the grouped GEMM and one
 * row pass; else the parts take more memory and passes than keeping the
 * combine's inputs would). For both: offsets NULL asks about `rows` rows whose
 * offsets stay on the device (the _dev calls below), taken as spread over
 * every group; else rows is unused. */
int moe_op_gemm_grouped_swiglu_backward_w_fuses(moe_ctx *ctx, moe_device dev, moe_dtype dt, int64_t K, int64_t de,
                                                int64_t rows, const int64_t *offsets, int groups);
/* moe_op_gemm_grouped_swiglu on the rows of x [N, K] listed in rows (i64
 * [M], M = offsets[groups]): row r of the grouped input is x[rows[r]] - the
 * MoE dispatch's gather, done by the GEMM's loads on CUDA (bf16, own kernel,
 * rows with a trusted index bound: the router's), else gathered into a tensor
 * first. The same bytes either way. */
moe_status moe_op_gemm_grouped_swiglu_rows(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows,
                                           const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                           moe_tensor *h, const int64_t *offsets, int groups);
/* moe_op_gemm_grouped_wgrad with b's rows gathered the same way: b [N, Q],
 * b_rows i64 [M], row r of the grouped b is b[b_rows[r]]. */
moe_status moe_op_gemm_grouped_wgrad_rows(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                          const moe_tensor *b_rows, float beta, moe_tensor *c, const int64_t *offsets,
                                          int groups);
/* Weight gradient of a grouped GEMM: c[g] = alpha * a_g^T @ b_g + beta * c[g],
 * a [M,P], b [M,Q], c [G,P,Q], groups of rows given by offsets as above. */
moe_status moe_op_gemm_grouped_wgrad(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                     float beta, moe_tensor *c, const int64_t *offsets, int groups);
/* The grouped GEMMs with the row offsets in a tensor: offsets i64 [G + 1]
 * on the device of c or on the CPU (G from its length). On the device, a
 * backend that can reads them where they are (CUDA, bf16: the TMA kernel or
 * the own kernel, where the call's policy gives it the call; the policy's
 * data-dependent parts take the rows as spread over every group): nothing is
 * copied back and the launch does not depend on their values, as a CUDA
 * graph of a step needs. Else they are read back to the host (on a GPU that
 * waits for the device) and the call runs as the host-offset op, which
 * checks them. Read on the device they are not checked: values that do not
 * rise from 0 to M (the rows) give wrong rows, never accesses outside the
 * tensors. They must not change while the call runs, nor share memory with
 * an output (each block of a cluster reads them itself, and blocks that
 * disagree would wait on each other for ever). Inside a graph capture the
 * read-back is an error: the call must be one the device serves
 * (moe_cuda_grouped_dev_calls counts them). Each takes the arguments of the
 * op it is named after. */
moe_status moe_op_gemm_grouped_dev(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                   float beta, moe_tensor *c, const moe_tensor *offsets);
moe_status moe_op_gemm_grouped_pair_dev(moe_ctx *ctx, int transb, float alpha, const moe_tensor *a1,
                                        const moe_tensor *b1, const moe_tensor *a2, const moe_tensor *b2, float beta,
                                        moe_tensor *c, const moe_tensor *offsets);
moe_status moe_op_gemm_grouped_wgrad_dev(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                         float beta, moe_tensor *c, const moe_tensor *offsets);
moe_status moe_op_gemm_grouped_wgrad_rows_dev(moe_ctx *ctx, float alpha, const moe_tensor *a, const moe_tensor *b,
                                              const moe_tensor *b_rows, float beta, moe_tensor *c,
                                              const moe_tensor *offsets);
moe_status moe_op_gemm_grouped_swiglu_rows_dev(moe_ctx *ctx, const moe_tensor *x, const moe_tensor *rows,
                                               const moe_tensor *wg, const moe_tensor *wu, moe_tensor *g, moe_tensor *u,
                                               moe_tensor *h, const moe_tensor *offsets);
moe_status moe_op_gemm_grouped_swiglu_backward_w_dev(moe_ctx *ctx, float alpha, const moe_tensor *dy,
                                                     const moe_tensor *w, const moe_tensor *g, const moe_tensor *u,
                                                     const moe_tensor *rw, moe_tensor *dg, moe_tensor *du,
                                                     moe_tensor *hw, moe_tensor *dw, const moe_tensor *offsets);

/* ---- elementwise ---- */
/* out = a OP b with numpy broadcasting; out has the broadcast shape. out may alias a or b. */
moe_status moe_op_binary(moe_ctx *ctx, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b);
/* Writes the broadcast shape of a and b into shape/ndim; error if incompatible. */
moe_status moe_broadcast_shape(const moe_tensor *a, const moe_tensor *b, int *ndim, int64_t *shape);
/* out = f(x) (alpha used by SCALE, ADD_SCALAR, POW_SCALAR); out may alias x. */
moe_status moe_op_unary(moe_ctx *ctx, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha);
/* dx = dy * f'(x), for every unary op (alpha as in forward). */
moe_status moe_op_unary_backward(moe_ctx *ctx, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                                 const moe_tensor *x, float alpha);
/* y += alpha * x (same shape). */
moe_status moe_op_axpy(moe_ctx *ctx, moe_tensor *y, float alpha, const moe_tensor *x);
/* Sum the broadcast gradient g back to `out`'s shape (the backward of broadcasting). */
moe_status moe_op_sum_to(moe_ctx *ctx, moe_tensor *out, const moe_tensor *g);

/* ---- reductions ---- */
/* Reduce over one dim; out has that dim removed (keepdim shapes are accepted too). */
moe_status moe_op_reduce(moe_ctx *ctx, moe_reduce_op op, moe_tensor *out, const moe_tensor *x, int dim);
/* Reduce over all elements into a 0-dim or 1-element out. */
moe_status moe_op_reduce_all(moe_ctx *ctx, moe_reduce_op op, moe_tensor *out, const moe_tensor *x);
/* out (f32, 0-dim or one element) = sum of x^2 over every element of x (f32 or
 * bf16), accumulated in f64 in a fixed order: gradient norms of bf16
 * gradients without an f32 copy. */
moe_status moe_op_sumsq(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x);

/* ---- softmax family (over the last dim) ---- */
moe_status moe_op_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x);
moe_status moe_op_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
moe_status moe_op_log_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x);
moe_status moe_op_log_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
/* logsumexp over the last dim: out has the last dim removed. */
moe_status moe_op_logsumexp(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x);

/* ---- selection and indexing ---- */
/* Top k over the last dim, sorted descending; ties broken by the lower index.
 * values [..., k] float, indices [..., k] i64. */
moe_status moe_op_topk(moe_ctx *ctx, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k);
/* out[r, j] = x[r, index[r, j]] over the last dim (rows as above). */
moe_status moe_op_gather(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
/* dst[r, index[r, j]] += src[r, j] over the last dim (the backward of gather). */
moe_status moe_op_scatter_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
/* out[i, :] = x[index[i], :]; x [N, D] (or any dims, row = dim 0), index [M] i64, out [M, D...]. */
moe_status moe_op_index_select(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
/* dst[index[i], :] += src[i, :] (the backward of index_select); deterministic order. */
moe_status moe_op_index_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
/* out[..., :] = table[ids[...], :]; ids any shape i64, table [V, D], out [ids..., D]. */
moe_status moe_op_embedding(moe_ctx *ctx, moe_tensor *out, const moe_tensor *table, const moe_tensor *ids);
/* dtable[ids[...], :] += dout[..., :] */
moe_status moe_op_embedding_backward(moe_ctx *ctx, moe_tensor *dtable, const moe_tensor *dout, const moe_tensor *ids);

/* ---- normalisation (over the last dim) ---- */
/* y = x * rstd * w, rstd = 1/sqrt(mean(x^2) + eps); rstd [rows] is saved for backward. */
moe_status moe_op_rmsnorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x,
                          const moe_tensor *w, float eps);
/* dx overwritten; dw accumulated (dw may be NULL). */
moe_status moe_op_rmsnorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd);
/* The same, adding: dx = beta dx + the gradient (dx not read when beta is 0). */
moe_status moe_op_rmsnorm_backward_beta(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                        const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta);
/* QK-norm feeding attention: y = rope(rmsnorm(x) * w) with x, y [B, T, heads * D]
 * (the norm over the whole last dim, rope on each head of D as moe_op_rope),
 * rstd [B, T]; one pass where the backend fuses the two. The backward takes
 * dy, the gradient of y: dx = beta dx + the gradient, dw += as the norm's. */
moe_status moe_op_rmsnorm_rope(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                               float eps, int64_t heads, int64_t pos_offset, float theta);
moe_status moe_op_rmsnorm_rope_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                        const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, int64_t heads,
                                        int64_t pos_offset, float theta, float beta);
/* y = (x - mean) * rstd * w + b (b may be NULL); mean, rstd [rows] saved. */
moe_status moe_op_layernorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd,
                            const moe_tensor *x, const moe_tensor *w, const moe_tensor *b, float eps);
moe_status moe_op_layernorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, moe_tensor *db,
                                     const moe_tensor *dy, const moe_tensor *x, const moe_tensor *w,
                                     const moe_tensor *mean, const moe_tensor *rstd);

/* ---- rotary position embedding ----
 * x [B, T, H, D] (D even), rotate-half convention (GPT-NeoX / Llama / HF):
 *   out[..., i]       = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
 *   out[..., i + D/2] = x[i + D/2] cos(p f_i) + x[i] sin(p f_i),   f_i = theta^(-2i/D)
 * with p = pos_offset + t. inverse != 0 rotates by -angle (this is the backward). */
moe_status moe_op_rope(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse);

/* ---- attention ----
 * q [B, T, Hq, D], k and v [B, S, Hkv, D] with Hq % Hkv == 0 (grouped-query),
 * out [B, T, Hq, D], lse [B, Hq, T] (saved log-sum-exp of the scaled scores).
 * causal: query t attends keys s <= t + (S - T). All contiguous. */
moe_status moe_op_attention(moe_ctx *ctx, moe_tensor *out, moe_tensor *lse, const moe_tensor *q,
                            const moe_tensor *k, const moe_tensor *v, float scale, int causal);
/* dq, dk, dv overwritten. */
moe_status moe_op_attention_backward(moe_ctx *ctx, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv,
                                     const moe_tensor *dout, const moe_tensor *q, const moe_tensor *k,
                                     const moe_tensor *v, const moe_tensor *out, const moe_tensor *lse,
                                     float scale, int causal);

/* ---- gated activations ---- */
/* out = silu(gate) * up, all the same shape. */
moe_status moe_op_swiglu(moe_ctx *ctx, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up);
moe_status moe_op_swiglu_backward(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                  const moe_tensor *gate, const moe_tensor *up);

/* ---- loss ----
 * logits [N, V] (rows), targets [N] i64; rows whose target == ignore_index do
 * not count. loss [N] per row (0 for ignored rows), lse [N] saved. */
moe_status moe_op_cross_entropy(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                                const moe_tensor *targets, int64_t ignore_index);
/* dlogits = scale * (softmax(logits) - onehot(target)) for counted rows, 0 for
 * ignored ones; scale is typically dloss / number_of_counted_rows. */
moe_status moe_op_cross_entropy_backward(moe_ctx *ctx, moe_tensor *dlogits, const moe_tensor *logits,
                                         const moe_tensor *lse, const moe_tensor *targets,
                                         int64_t ignore_index, float scale);
/* Both of the above at once: loss and lse as moe_op_cross_entropy, dlogits as
 * moe_op_cross_entropy_backward with this scale, the same values; where the
 * backend has a fused kernel the logits are read from memory once (training
 * knows the scale, 1 / counted rows, before the backward pass). Where the
 * backend fuses, dlogits may be the logits themselves: each row is read before
 * it is written. */
/* Whether dev's backend has the one-pass kernel (else the op runs the two and
 * precomputing the gradient saves nothing). */
int moe_op_cross_entropy_fuses(moe_ctx *ctx, moe_device dev);
moe_status moe_op_cross_entropy_fused(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                      const moe_tensor *logits, const moe_tensor *targets, int64_t ignore_index,
                                      float scale);

/* ---- optimiser ----
 * Decoupled-weight-decay Adam over flat contiguous buffers (same numel):
 *   m = b1 m + (1-b1) g;  v = b2 v + (1-b2) g^2
 *   p -= lr * ( m / (1-b1^step) / (sqrt(v / (1-b2^step)) + eps) + wd * p )
 * step counts from 1. params are f32; m and v both f32 or both bf16; grads
 * f32 or bf16 (mixed precision, read as f32). cfg->compute, when set, is a
 * contiguous bf16 (or f32) buffer of the same numel that gets the updated
 * params rounded to its dtype in the same pass (the compute copy of mixed
 * precision); bf16 rounds as moe_master_hi does (ties away from zero), so a
 * compute copy has the same bytes whether the master is split or not.
 * bf16 m and v are read as f32, updated in f32 (the params' update uses the
 * unrounded values) and stored with stochastic rounding: rounded to nearest,
 * v's small increments (1 - b2 of it, under half a bf16 step once b2 is
 * above ~0.996) would be lost for good and v would stop following g^2. The
 * random bits come from moe_adamw_sr_bits of the element's index
 * cfg->index0 + i and the step, so the CPU and CUDA round alike, a shard
 * rounds as the whole buffer would, and a run repeats itself.
 * Step and learning rate held by the device (a step captured into a CUDA
 * graph and replayed must not bake them into its kernels' parameters):
 * step_dev, when set, is one i64 element on the params' device holding the
 * count of steps done before this one; the update uses step = *step_dev + 1
 * (bias corrections and the bf16 rounding bits alike) and cfg->step is
 * ignored. lr_dev, when set, is one f32 element on the params' device; the
 * update's learning rate is *lr_dev * cfg->lr (cfg->lr then being the
 * parameter's scale). Both NULL: step and lr as given. The update never
 * advances step_dev: moe_op_adamw_advance does, once per optimiser step. */
typedef struct {
    float lr, beta1, beta2, eps, weight_decay;
    int64_t step;
    moe_tensor *compute;   /* optional, see above */
    /* the gradients are read as g * grad_scale (gradient clipping folded into
     * the step, saving a pass over the gradients); 0 means 1, so a config
     * that leaves it out keeps the plain update */
    float grad_scale;
    /* Clipping by a norm the device holds (the step can be queued before the
     * host reads it): clip_sumsq, when set, is a one-element f32 tensor on the
     * params' device with the sum of squared gradients; the gradients are read
     * as g * grad_scale * (norm > clip_max ? clip_max / (norm + 1e-6) : 1),
     * norm = sqrt(sumsq) in double, and nothing is written when the norm or
     * the optional one-element f32 guard (e.g. the loss) is not finite. */
    const moe_tensor *clip_sumsq, *guard;
    double clip_max;
    int64_t index0;   /* bf16 m and v: the index of element 0 in the whole flat buffer (see above) */
    const moe_tensor *step_dev;   /* optional, i64: the steps done before this one (see above) */
    const moe_tensor *lr_dev;     /* optional, f32: multiplies cfg->lr (see above) */
    /* Optional runs (n_runs > 0): the update touches only these element ranges
     * [lo, hi) of the tensors, each with its own lr and weight_decay (replacing
     * cfg->lr and cfg->weight_decay; lr_dev multiplies each); elements between
     * them are neither read nor written. Sorted and disjoint within [0, n), each
     * lo a multiple of 8, at most MOE_ADAMW_MAX_RUNS. One launch for a model's
     * parameters whose settings alternate (norms without decay between
     * matrices with it): each launch boundary cost the GPU 2-4 us. */
    int n_runs;
    const struct moe_adamw_run *runs;
    /* Split master (optional, i16, contiguous, params' numel): params is then
     * the bf16 high plane of f32 master weights whose low halves lo holds
     * (moe_master_hi, below); the update reads and writes the master as the
     * two planes, 4 bytes an element as before, and the high plane is the
     * compute copy (cfg->compute must be NULL). The f32 bits are those of the
     * f32 update; the high plane rounds ties away from zero instead of to
     * even. */
    moe_tensor *lo;
} moe_adamw_cfg;
#define MOE_ADAMW_MAX_RUNS 64
typedef struct moe_adamw_run {
    int64_t lo, hi;
    float lr, weight_decay;
} moe_adamw_run;
/* ---- reads of one-element tensors that wait for themselves only ----
 * moe_op_read_start queues copies of n (1..MOE_READ_MAX) one-element tensors
 * of one device to the host; moe_op_read_finish waits for those copies, not
 * for work queued after them (a training step's update), and leaves the
 * values in r->value as doubles. Where the backend has no such reads (the
 * CPU), start reads at once. A started read that is never finished costs
 * nothing; finishing one whose host memory was taken by later reads (more
 * than 64 in flight on one device) is an error. Values pass through double:
 * i64 is exact up to 2^53. A read is finished with the context it started in. */
#define MOE_READ_MAX 16
typedef struct {
    int n, done;
    moe_device dev;
    moe_dtype dtype[MOE_READ_MAX];
    double value[MOE_READ_MAX];
    int slot;        /* the backend's */
    uint64_t gen;
} moe_read;
moe_status moe_op_read_start(moe_ctx *ctx, const moe_tensor *const *ts, int n, moe_read *r);
moe_status moe_op_read_finish(moe_ctx *ctx, moe_read *r);

/* The gradient factor of cfg's device clipping from the values of the sum of
 * squares and the guard; < 0 when the step is to be skipped. One definition
 * for the CPU and the CUDA kernels (host and device), so both compute the same
 * bits: grad_scale * clip_max / (norm + 1e-6) in double when norm > clip_max. */
#ifdef __CUDACC__
#define MOE_HOST_DEVICE __host__ __device__
#else
#define MOE_HOST_DEVICE
#endif
static inline MOE_HOST_DEVICE double moe_adamw_clip_scale(float grad_scale, double clip_max, double sumsq,
                                                          double guard) {
    double norm = sqrt(sumsq), f = grad_scale != 0.0f ? (double)grad_scale : 1.0;
    if (!isfinite(norm) || !isfinite(guard)) return -1.0;
    if (norm > clip_max) f = f * clip_max / (norm + 1e-6);
    return f;
}
/* Stochastic rounding of bf16 AdamW state: 32 random bits for element i at
 * `step` (a splitmix64 finalizer over both), the low 16 for m, the high 16
 * for v. moe_bf16_round_sr adds 16 random bits below bf16's last kept bit and
 * truncates: x rounds away from zero with probability equal to the fraction
 * dropped, so the rounding is unbiased. NaN stays NaN. */
static inline MOE_HOST_DEVICE uint32_t moe_adamw_sr_bits(int64_t i, int64_t step) {
    uint64_t x = (uint64_t)i * 0x9E3779B97F4A7C15ull + ((uint64_t)step << 40) + (uint64_t)step;
    x ^= x >> 30;
    x *= 0xBF58476D1CE4E5B9ull;
    x ^= x >> 27;
    x *= 0x94D049BB133111EBull;
    x ^= x >> 31;
    return (uint32_t)x;
}
static inline MOE_HOST_DEVICE uint16_t moe_bf16_round_sr(float x, uint32_t r16) {
    union { float f; uint32_t u; } b;
    b.f = x;
    if ((b.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((b.u >> 16) | 0x40u);   /* NaN, kept quiet */
    return (uint16_t)((b.u + (r16 & 0xffffu)) >> 16);
}
/* 1 / (1 - beta^step) in double, rounded once to f32: the bias correction's
 * factor as the CPU and the CUDA kernels (host or device step) apply it. */
static inline MOE_HOST_DEVICE float moe_adamw_inv_bias_corr(float beta, int64_t step) {
    return (float)(1.0 / (1.0 - pow((double)beta, (double)step)));
}
/* f32 master weights as two 16-bit planes (nn/master_split.c): hi, the
 * value rounded to bf16 with ties away from zero (so the compute copy needs no
 * bytes of its own), and lo, the i16 remainder: bits(x) = (hi << 16) + lo
 * exactly, the sum taken mod 2^32. (Rounding ties to even would leave a
 * remainder of +-2^15 two meanings.) A NaN keeps its sign and stays a quiet
 * NaN, its payload lost (lo 0). */
static inline MOE_HOST_DEVICE uint16_t moe_master_hi(uint32_t u) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    return (uint16_t)((u + 0x8000u) >> 16);
}
static inline MOE_HOST_DEVICE int16_t moe_master_lo(uint32_t u, uint16_t hi) {
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0;
    return (int16_t)(int32_t)(u - ((uint32_t)hi << 16));
}
static inline MOE_HOST_DEVICE uint32_t moe_master_bits(uint16_t hi, int16_t lo) {
    return ((uint32_t)hi << 16) + (uint32_t)(int32_t)lo;
}
static inline double moe_adamw_clip_factor(const moe_adamw_cfg *cfg, double sumsq, double guard) {
    return moe_adamw_clip_scale(cfg->grad_scale, cfg->clip_max, sumsq, guard);
}
moe_status moe_op_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                        const moe_adamw_cfg *cfg);
/* Adds 1 to step_dev (one i64 element) unless cfg's device clipping skips the
 * step, by the update kernels' rule: clip_sumsq set and moe_adamw_clip_scale
 * < 0 (a non-finite norm or guard). Without clip_sumsq it always adds 1. Only
 * cfg's clip_sumsq, guard, clip_max and grad_scale are read; they must be on
 * step_dev's device. Queued after the step's updates, it keeps step_dev the
 * count of steps taken, without the host reading the norm. */
moe_status moe_op_adamw_advance(moe_ctx *ctx, moe_tensor *step_dev, const moe_adamw_cfg *cfg);
/* The two planes of f32 master weights (moe_master_hi above): split writes
 * hi (bf16) and lo (i16) from src (f32); lo may be NULL (the high plane alone:
 * the compute copy of f32 values). join writes dst (f32) from them. All
 * contiguous, one device, the same numel. */
moe_status moe_op_master_split(moe_ctx *ctx, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src);
moe_status moe_op_master_join(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo);

/* ---- MoE token movement (ops_moe.c) ----
 * One-pass gathers for the MoE block's combine and dispatch backward, given
 * the router's slot map: slots [N, k] i32, slots[t, q] = the row (of the A
 * expert-ordered assignment rows) of token t's q-th choice, -1 where that
 * choice was dropped. All tensors contiguous (inputs are made contiguous when
 * they are not); float data f32 or bf16, one dtype per call (w included).
 * Index values are checked (slots in [-1, A), token_idx in [0, N)) with
 * MOE_ERR_RANGE naming the first bad position, nothing written; on CUDA the
 * check (one stream synchronisation) is skipped for tensors with a trusted
 * index bound (tensor.h; for slots a bound of A promises [-1, A)).
 * Deterministic: fixed summation orders, no atomics. */
/* y[t, :] = sum over q (in q order) with slots[t, q] >= 0 of
 * (w ? w[slots[t, q]] : 1) * src[slots[t, q], :], accumulated in f32 and
 * rounded once; a token without kept choices gets 0. y [N, H] is
 * overwritten; src [A, H]; w [A] or NULL. */
moe_status moe_op_gather_sum(moe_ctx *ctx, moe_tensor *y, const moe_tensor *src, const moe_tensor *w,
                             const moe_tensor *slots);
/* The same plus base[t, :], added to the f32 sum last (a residual added in the
 * same pass; f32 results have the bits of a separate add, bf16 ones are
 * rounded once instead of twice): y = gather_sum(...) + base.
 * base [N, H], of y's dtype, must not overlap y. */
moe_status moe_op_gather_sum_add(moe_ctx *ctx, moe_tensor *y, const moe_tensor *base, const moe_tensor *src,
                                 const moe_tensor *w, const moe_tensor *slots);
/* The backward of y = gather_sum(src, w, slots) written per assignment a
 * (token t = token_idx[a]):
 *   dsrc[a, :] = w[a] * dy[t, :]
 *   dw[a]      = sum over h of dy[t, h] * src[a, h]   (f32, fixed order)
 * dsrc [A, H] and dw [A] (may be NULL) are overwritten; dy [N, H], src [A, H],
 * w [A], token_idx [A] i64. */
moe_status moe_op_combine_backward(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                   const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx);
/* The same, also given the assignments by token: slots [N, k] i32 (slot
 * slots[t, q] = a with token_idx[a] = t, or -1; every a once, as the router
 * makes them). A device backend may then read each row of dy once for all of
 * its token's rows instead of once a row (the CUDA one does: each of dy's rows
 * is read k times otherwise, and at the OLMoE layer's 64 MB dy does not stay
 * in L2); the results are the same bytes. It does so only for a map the
 * router marked (moe_tensor_slot_map_trusted(slots, A)), and then reads and
 * checks no token_idx; other slots change nothing. slots NULL: as
 * combine_backward. */
moe_status moe_op_combine_backward_slots(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                         const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                         const moe_tensor *slots);

/* moe_op_index_select(out, x, index) given the assignments by token as well:
 * slots [N, k] i32 over x's N rows (slots[t, q] = a with index[a] = t, or -1;
 * every a once, as the router makes them); x [N, H]. The same bytes. A device
 * backend may then read each row of x once and write it to its k rows (the
 * MoE dispatch; the CUDA one does, for a map the router marked
 * (moe_tensor_slot_map_trusted(slots, M)) and rows of whole 16-byte words:
 * read in index order at the OLMoE layer, x's 64 MB rows are fetched k times
 * from memory). slots NULL: as index_select. */
moe_status moe_op_index_select_slots(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index,
                                     const moe_tensor *slots);

/* ---- Expert-parallel routing maps (ops_moe.c) ----
 * Expert parallelism over P ranks sends each token once to every rank that
 * owns one of its kept choices (group d = expert / group_size, the experts of
 * rank d), instead of once per choice; the owner expands the token to its
 * choices and sums the weighted outputs before sending one row back. These
 * ops build the index maps for that, on the device of their tensors, with no
 * float data. slots [N, k] i32 and expert_idx [A] i64 are the router's
 * (router.h). Results are deterministic (fixed token order, no atomics). */

/* Ranks an expert-parallel map may span (the device kernels take the
 * per-rank adjustments as a kernel argument), and the (rank, expert) blocks
 * a regrouping may have on CUDA (a kernel argument too). */
#define MOE_EP_MAX_RANKS 256
#define MOE_EP_MAX_BLOCKS 1024

/* tslots [N, P] i32 (overwritten): tslots[t, d] = the row of (token t, rank
 * d) in the send order - rank-major, tokens ascending within a rank - or -1
 * when none of t's kept choices is in group d. counts: i64 [P] on tslots'
 * device (overwritten), the rows for each rank; on a GPU nothing waits for
 * them. tslots carries an index bound: the rows in all (counts on the host),
 * else N * P, which a caller that brings the counts back may tighten.
 * Experts of group >= P are an error on the host; on the device they count
 * for no rank. */
moe_status moe_op_ep_token_slots(moe_ctx *ctx, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                                 const moe_tensor *expert_idx, int64_t group_size);
/* token_idx [S] i64 (overwritten): token_idx[slots[t, j]] = t for every
 * slots[t, j] >= 0 of slots [N, m] i32, whose non-negative values must name
 * each row of [0, S) exactly once (as ep_token_slots' do; on the host a row
 * named twice or never is an error). The result carries the index bound N. */
moe_status moe_op_slot_tokens(moe_ctx *ctx, moe_tensor *token_idx, const moe_tensor *slots);
/* packed [A] i64 (overwritten), for assignment a of token t = token_idx[a] to
 * expert e = expert_idx[a] in group d = e / group_size:
 *   packed[a] = (tslots[t, d] + adjust[d]) * width + q
 * q = how many of t's kept choices before a (in slots order) are in group d
 * (q < width is required: width >= min(k, group_size)). adjust: HOST [P],
 * turns send rows into the receiving rank's rows. */
moe_status moe_op_ep_pack(moe_ctx *ctx, moe_tensor *packed, const moe_tensor *token_idx,
                          const moe_tensor *expert_idx, const moe_tensor *slots, const moe_tensor *tslots,
                          int64_t group_size, int64_t width, const int64_t *adjust);
/* The owner's side: for row r of R, v = packed[perm ? perm[r] : r]:
 *   token_idx[r] = v / width,  slots[v] = r   (slots [U, width] i32, -1 elsewhere)
 * token_idx [R] i64 and slots are overwritten; perm [R] i64 or NULL. Values
 * outside [0, U * width) are an error on the host; the device drops them
 * (token_idx 0, nothing written to slots) instead of synchronising to check
 * values that its own ep_pack made. The outputs carry index bounds U and R. */
moe_status moe_op_ep_unpack(moe_ctx *ctx, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                            const moe_tensor *perm);
/* perm [R] i64 and inv [R] i64 (or NULL), overwritten: rows received from
 * `ranks` ranks, source-major (rank 0's rows, then rank 1's, ...; expert-
 * major within each), regrouped expert-major (local expert 0's rows from
 * every rank in rank order, then expert 1's, ...): regrouped row k is
 * received row perm[k], received row i is regrouped row inv[i]. counts: HOST
 * [ranks * experts], counts[src * experts + j] = rows from rank src for
 * local expert j, summing to R (on CUDA ranks * experts <= MOE_EP_MAX_BLOCKS,
 * the blocks travel as a kernel argument). Both
 * outputs carry the index bound R. Built where they are used, so a device
 * needs no copy from the host (which would wait for its stream). */
moe_status moe_op_ep_regroup(moe_ctx *ctx, moe_tensor *perm, moe_tensor *inv, const int64_t *counts, int64_t ranks,
                             int64_t experts);

#endif
