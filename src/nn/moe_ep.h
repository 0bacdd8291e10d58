/* Expert parallelism: moving dispatched rows to the ranks that own their
 * experts and back, as taped operations over a communicator (src/dist).
 *
 * With ep ranks and E experts, rank r owns experts [r*E/ep, (r+1)*E/ep).
 * Every rank routes its own tokens over all E experts; the dispatched rows
 * (expert-contiguous, so the rows for one destination rank are one block)
 * go to their owners with one all_to_all_v, after an all_to_all of the
 * per-expert row counts. The owner regroups what it received by local
 * expert (expert-major, then source rank), runs its experts, and the
 * reverse exchange brings the outputs back in the sender's original order.
 * Each exchange is one tape entry whose backward is the opposite exchange,
 * so every rank must run the same forward/backward sequence (collectives). */
#ifndef MOE_NN_MOE_EP_H
#define MOE_NN_MOE_EP_H

#include "tape.h"
#include "../dist/comm.h"
#include "../ops/ops.h"

typedef struct moe_ep_plan moe_ep_plan;

/* Exchanges the per-expert counts (offsets: host [E+1] of this rank's
 * dispatched rows) and builds the plan. local_offsets (host [E+1], filled):
 * offsets into the received, regrouped rows, with the experts this rank does
 * not own left empty, so an expert bank over all E experts computes only the
 * owned ones, and local_offsets + rank * E/ep (E/ep + 1 entries, from 0) are
 * the offsets for a bank that holds only the owned experts. */
moe_status moe_ep_plan_new(moe_ctx *ctx, moe_comm *comm, const int64_t *offsets, int64_t num_experts,
                           int64_t *local_offsets, moe_ep_plan **plan);
void moe_ep_plan_release(moe_ep_plan *p);
int64_t moe_ep_plan_received(const moe_ep_plan *p);   /* rows this rank's experts get */

/* xp [A, H] (this rank's dispatched rows) -> xl [R, H] (rows for this rank's experts) */
moe_status moe_f_ep_dispatch(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xp, moe_tensor **xl);
/* yl [R, H] (this rank's expert outputs) -> yp [A, H] (outputs for this rank's rows, in xp's order) */
moe_status moe_f_ep_combine(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yl, moe_tensor **yp);

#endif
