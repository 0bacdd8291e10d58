/* Taped token movement for the MoE block (see moe_dispatch.c). */
#ifndef MOE_DISPATCH_H
#define MOE_DISPATCH_H

#include "tape.h"
#include "../ops/ops.h"

/* slots: the router's slot map (router.h: i32 [N, k], the assignment of
 * each token's q-th choice, -1 where dropped) or NULL. With it, combine and
 * the dispatch backward are one-pass gathers (moe_op_gather_sum,
 * moe_op_combine_backward); without it (expert choice, or the environment
 * variable MOELAB_MOE_GATHER=0, read at each call, for A/B comparisons) they
 * take the index_add path. Either way the same values up to f32 rounding
 * order. */
/* Whether the routing's slot map [n_tokens, k] i32 may serve the one-pass
 * gathers (MOELAB_MOE_GATHER=0 turns them off: the index_add path). */
int moe_dispatch_slots_usable(const moe_tensor *slots, int64_t n_tokens);
/* xp [A, H] = x [N, H] rows at token_idx [A] (i64). */
moe_status moe_f_dispatch(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *token_idx, moe_tensor *slots,
                          moe_tensor **xp);
/* y [n_tokens, H] = sum of w[a] * yp[a] into row token_idx[a]; tokens with no assignment get 0. */
moe_status moe_f_combine(moe_ctx *ctx, moe_tape *tape, moe_tensor *yp, moe_tensor *w, moe_tensor *token_idx,
                         moe_tensor *slots, int64_t n_tokens, moe_tensor **y);
/* The same plus a residual [n_tokens, H] (y = residual + combine(...)), added
 * in the combine's one pass where the slot map allows (else a taped add). */
moe_status moe_f_combine_add(moe_ctx *ctx, moe_tape *tape, moe_tensor *yp, moe_tensor *w, moe_tensor *token_idx,
                             moe_tensor *slots, int64_t n_tokens, moe_tensor *residual, moe_tensor **y);
/* y [n_tokens, H] = sum of the rows a of src with token_idx[a] = t (slots:
 * the same map as [n_tokens, m] row numbers, -1 for none), unweighted: the
 * transpose of dispatch. */
moe_status moe_f_gather_sum(moe_ctx *ctx, moe_tape *tape, moe_tensor *src, moe_tensor *token_idx, moe_tensor *slots,
                            int64_t n_tokens, moe_tensor **y);
/* Rows [start, start+len) of a 2-d x as a new tensor. */
moe_status moe_f_rows(moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int64_t start, int64_t len, moe_tensor **y);
/* Row-wise concatenation of 2-d parts with `cols` columns. */
moe_status moe_f_cat_rows(moe_ctx *ctx, moe_tape *tape, moe_tensor **parts, int n, int64_t cols, moe_dtype dt,
                          moe_device dev, moe_tensor **y);

#endif
