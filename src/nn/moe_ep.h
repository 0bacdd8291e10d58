/* Expert parallelism: moving dispatched rows to the ranks that own their
 * experts and back, as taped operations over a communicator (src/dist).
 *
 * With ep ranks and E experts, rank r owns experts [r*E/ep, (r+1)*E/ep).
 * Every rank routes its own tokens over all E experts; the dispatched rows
 * (expert-contiguous, so the rows for one destination rank are one block)
 * go to their owners with one all_to_all_v, after one all_gather of every
 * rank's per-expert (and per-rank token) row counts. The owner regroups what it received by local
 * expert (expert-major, then source rank), runs its experts, and the
 * reverse exchange brings the outputs back in the sender's original order.
 * Each exchange is one tape entry whose backward is the opposite exchange,
 * so every rank must run the same forward/backward sequence (collectives).
 *
 * With the router's slot map the MoE block moves token rows instead (see
 * moe_block.c, ep_token_experts): each token goes once to every rank owning
 * one of its choices, with its choices' weights and slot positions; the owner
 * expands it to its experts, combines their weighted outputs and returns one
 * row, which halves the bytes at top-4 over 2 ranks. The counts for it come
 * back with the routing's one wait (moe_route_hook, moe_ep_plan_from_counts).
 * Or every rank's tokens are all_gathered before routing and the outputs
 * summed back by reduce_scatter (moe_f_ep_gather / moe_f_ep_scatter below;
 * moe_block_set_ep_gather). In backward the exchanges run the experts'
 * deferred weight gradients while their rows travel (moe_tape_defer). */
#ifndef MOE_NN_MOE_EP_H
#define MOE_NN_MOE_EP_H

#include "tape.h"
#include "../dist/comm.h"
#include "../ops/ops.h"

typedef struct moe_ep_plan moe_ep_plan;

/* Exchanges the counts and builds the plan for assignment rows (every rank
 * learns every rank's counts: one all_gather). offsets: host [E+1] of this
 * rank's dispatched rows. local_offsets (host [E+1], filled): offsets into
 * the received, regrouped rows, with the experts this rank does not own left
 * empty, so an expert bank over all E experts computes only the owned ones,
 * and local_offsets + rank * E/ep (E/ep + 1 entries, from 0) are the offsets
 * for a bank that holds only the owned experts. */
moe_status moe_ep_plan_new(moe_ctx *ctx, moe_comm *comm, const int64_t *offsets, int64_t num_experts,
                           int64_t *local_offsets, moe_ep_plan **plan);
/* The plan from counts already exchanged, with token rows too: gathered
 * (host [ep * (E + ep)]) holds rank src's E per-expert counts, then its ep
 * token-row counts (moe_op_ep_token_slots), at src * (E + ep); the routing
 * brings them back with its one wait (moe_route_hook). */
moe_status moe_ep_plan_from_counts(moe_comm *comm, const int64_t *gathered, int64_t num_experts,
                                   int64_t *local_offsets, moe_ep_plan **plan);
void moe_ep_plan_release(moe_ep_plan *p);
int64_t moe_ep_plan_received(const moe_ep_plan *p);          /* R: assignment rows this rank's experts get */
int64_t moe_ep_plan_tokens_received(const moe_ep_plan *p);   /* U: token rows this rank gets */
/* [ep]: what turns this rank's send row for rank d into the row rank d
 * receives it as (the adjust of moe_op_ep_pack) */
const int64_t *moe_ep_plan_token_adjust(const moe_ep_plan *p);
/* The regrouping on dev (borrowed; NULL when R is 0): regrouped row k is
 * received row perm[k]. */
moe_status moe_ep_plan_perm(moe_ctx *ctx, moe_ep_plan *p, moe_device dev, moe_tensor **perm);

/* Assignment rows, the original scheme (one row per kept choice):
 * xp [A, H] (this rank's dispatched rows) -> xl [R, H] (rows for this rank's experts) */
moe_status moe_f_ep_dispatch(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xp, moe_tensor **xl);
/* yl [R, H] (this rank's expert outputs) -> yp [A, H] (outputs for this rank's rows, in xp's order) */
moe_status moe_f_ep_combine(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yl, moe_tensor **yp);
/* Untaped: x [A, c] -> out [R, c] in the received order (source rank major,
 * expert within; moe_ep_plan_perm regroups it). For index data. */
moe_status moe_ep_exchange_assignments(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out);

/* Token rows (one per token and owning rank; plans made with token_counts):
 * xs [S, H] in send order -> xu [U, H], sender ranks in order */
moe_status moe_f_ep_tokens(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xs, moe_tensor **xu);
/* yu [U, H] -> ys [S, H], the reverse */
moe_status moe_f_ep_tokens_back(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yu, moe_tensor **ys);

/* Expert parallelism by all_gather (Megatron's "allgather" dispatcher): every
 * rank's token rows x [N, H] (N the same on every rank) go to every rank,
 * *xa [ep * N, H] with rank r's rows at r * N; queued without ordering the
 * compute stream after it (routing runs meanwhile): moe_comm_join_queued
 * before reading xa. Backward: the rows' gradients go home and add up
 * (reduce_scatter), overlapped with the experts' deferred weight gradients.
 * moe_f_ep_scatter is the way back: yu [ep * N, H], rank r's block of every
 * rank's yu summed into *yr [N, H] (reduce_scatter; backward all_gather). */
moe_status moe_f_ep_gather(moe_ctx *ctx, moe_tape *tape, moe_comm *comm, moe_tensor *x, moe_tensor **xa);
moe_status moe_f_ep_scatter(moe_ctx *ctx, moe_tape *tape, moe_comm *comm, moe_tensor *yu, moe_tensor **yr);

#endif
