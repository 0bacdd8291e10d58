/* Functional operations that record themselves on a tape (when one is given),
 * so layers and Lua code can combine tensors between layer calls (residual
 * adds, gating, reshapes, the loss) and still get a backward. */
#ifndef MOE_FUNCTIONAL_H
#define MOE_FUNCTIONAL_H

#include "tape.h"
#include "../ops/ops.h"

/* y = a op b with broadcasting (ADD, SUB, MUL, DIV). */
moe_status moe_f_binary(moe_ctx *ctx, moe_tape *tape, moe_binary_op op, moe_tensor *a, moe_tensor *b, moe_tensor **y);
moe_status moe_f_unary(moe_ctx *ctx, moe_tape *tape, moe_unary_op op, moe_tensor *x, float alpha, moe_tensor **y);
moe_status moe_f_swiglu(moe_ctx *ctx, moe_tape *tape, moe_tensor *gate, moe_tensor *up, moe_tensor **y);
/* x with a new shape (an alias when x is contiguous, else a copy); its gradient is reshaped back. */
moe_status moe_f_view(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int ndim, const int64_t *shape, moe_tensor **y);
/* Mean cross-entropy over rows whose target != ignore_index: a 0-dim scalar.
 * logits [..., V], targets [...] i64. All-ignored batches give loss 0. */
moe_status moe_f_cross_entropy(moe_ctx *ctx, moe_tape *tape, moe_tensor *logits, moe_tensor *targets,
                               int64_t ignore_index, moe_tensor **loss);
/* The same, saying where a fusing backend (CUDA) writes the logits' gradient
 * during the forward:
 * - MOE_CE_GRAD_LATER: nowhere; the backward recomputes it (a taped evaluation
 *   that will not go backward: the [N, V] tensor would only take memory);
 * - MOE_CE_GRAD_NEW: into a new tensor (what moe_f_cross_entropy does);
 * - MOE_CE_GRAD_OVER_LOGITS: over the logits' own memory, saving the [N, V]
 *   tensor (824 MB in bf16 at 8192 tokens of a 50k vocabulary). The caller
 *   promises that nothing reads the logits afterwards, the backward of the op
 *   that made them included (a linear head's reads only its input); a second
 *   backward through the loss is refused (MOE_ERR_STATE). */
enum { MOE_CE_GRAD_LATER = 0, MOE_CE_GRAD_NEW = 1, MOE_CE_GRAD_OVER_LOGITS = 2 };
moe_status moe_f_cross_entropy_ex(moe_ctx *ctx, moe_tape *tape, moe_tensor *logits, moe_tensor *targets,
                                  int64_t ignore_index, int grad_in_forward, moe_tensor **loss);
/* Shared by the losses: the number of targets != ignore_index (all of them,
 * without a read, when their trusted bound rules the ignored id out; else
 * counted on the host), and the value of a scalar loss's upstream gradient. */
moe_status moe_ce_count(moe_ctx *ctx, moe_tensor *targets, int64_t vocab, int64_t ignore_index, double *count);
moe_status moe_scalar_grad_value(moe_ctx *ctx, moe_tensor *g, float *dloss);
/* The mean cross-entropy of x w^T against targets without the [N, V] logits:
 * x [..., D] (N rows), w [V, D], targets [...] i64 (N). The rows go through
 * the head and the loss o->chunk_rows at a time (<= 0: chunks of at most 256
 * MB of logits). Under a tape each chunk's loss gradient goes straight into dx
 * = dlogits w and into dW = dlogits^T x; a second backward is refused
 * (MOE_ERR_STATE). The chunks' dW are summed in w's dtype (bf16 under mixed
 * precision: rounded once a chunk). What it saves: the logits' 824 MB at 8192
 * tokens of a 50k vocabulary in bf16, for dW (V x D) and dx (N x D).
 *   o->upstream_grad 0: the gradients are taken for an upstream 1 and kept; the
 * backward scales them by the upstream gradient it brings, hands dx over and
 * adds dW into wgrad (NULL: a frozen weight, no dW).
 *   o->upstream_grad > 0: the caller promises the backward's upstream gradient
 * (a trainer's micro-batch scale); the gradients are taken scaled by it and dW
 * is added into wgrad during the forward, with no V x D tensor of its own and
 * no pass to add it later. Where o->wgrad_pending points at a set pending-zero
 * mark (moe_param.grad_zero_pending), the first chunk overwrites wgrad's
 * memory instead of adding to it and the mark is cleared. The backward only
 * hands dx over, and refuses another upstream gradient. A tape dropped without
 * its backward leaves dW in wgrad. */
typedef struct {
    int64_t ignore_index;
    int64_t chunk_rows;
    float upstream_grad;
    int *wgrad_pending;
} moe_head_loss_opts;
moe_status moe_f_linear_cross_entropy(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                                      moe_tensor *targets, const moe_head_loss_opts *o, moe_tensor **loss);
/* Sum or mean of all elements into a 0-dim tensor. */
moe_status moe_f_sum(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int mean, moe_tensor **y);
/* y = x @ w^T (+ b): x [..., in], w [out, in], b [out] or NULL. The layer Linear uses it. */
moe_status moe_f_linear(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                        moe_tensor *b, moe_tensor *bgrad, moe_tensor **y);
/* The same plus a residual of y's shape and dtype, y = residual + x w^T (+ b),
 * summed by the GEMM (beta 1 over a copy of the residual): no separate
 * product tensor and add. NULL residual: moe_f_linear. */
moe_status moe_f_linear_add(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *w, moe_tensor *wgrad,
                            moe_tensor *b, moe_tensor *bgrad, moe_tensor *residual, moe_tensor **y);

/* Small helpers shared by layers: new tensor shaped like t but with its last dim = n. */
moe_tensor *moe_new_last_dim(moe_ctx *ctx, const moe_tensor *t, int64_t n);
/* Rows x D view of a contiguous tensor (all leading dims flattened). */
moe_tensor *moe_rows_view(moe_tensor *t);

#endif
