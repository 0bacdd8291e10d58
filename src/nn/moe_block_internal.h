/* Private to the MoE block's two files: moe_block.c (the layer, its settings
 * and its forward) and moe_block_ep.c (its expert-parallel paths). */
#ifndef MOE_BLOCK_INTERNAL_H
#define MOE_BLOCK_INTERNAL_H

#include "moe_block.h"
#include "moe_ep.h"

typedef struct {
    moe_block_cfg cfg;
    int custom;                 /* experts are child layers */
    int c_gate, c_noise, c_experts, c_shared, c_shared_gate;   /* child indices (-1: absent) */
    moe_tensor *bias;           /* [E] f32 cpu, a buffer of the layer */
    moe_tensor *last_logits;    /* router logits [tokens, E] of the last forward */
    moe_tensor *router_bias;    /* optional additive router-input bias (task conditioning), broadcast to the input */
    uint64_t calls;             /* forward count: advances the noise streams */
    moe_comm *ep_comm;          /* expert parallel over this communicator's ranks (NULL: off), borrowed */
    int64_t ep_gather;          /* > 0: expert parallel by all_gather of this many tokens per rank (moe_ep.h) */
    moe_tensor *ep_tmap;        /* gather: i32 [N, ep], row t all t (the send-row map moe_op_ep_pack reads) */
    moe_routing last;
    int keep_rows;              /* moe_block_set_keep_rows: 1 keep, 0 never keep, -1 auto (the default) */
    int defer_route;            /* moe_block_set_defer_routing: 1 wherever it can; 0 as MOELAB_ROUTE_DEFER says */
} block_state;

static inline block_state *st_of(const moe_layer *l) { return moe_layer_is_moe(l) ? l->state : NULL; }

/* The expert-parallel counts, queued between the device routing's kernels
 * and its one wait (moe_route_hook): this rank's token rows per destination
 * (tslots) and, by a queued all_gather, every rank's [E expert counts, ep
 * token counts]. out: [E + ep] this rank's, then [ep * (E + ep)] everyone's. */
typedef struct {
    moe_comm *comm;
    int64_t gather;       /* > 0: the gathered path, whose token part carries N (checked equal on every rank) */
    moe_tensor *tslots;   /* token rows: made by the hook; the caller releases it */
} ep_hook;

/* moe_block_ep.c: whether this forward moves token rows (r NULL: before the
 * routing) or gathers every rank's tokens; the hook that queues the counts;
 * the experts over all-to-all rows, token rows or gathered tokens */
moe_status moe_block_ep_moves_tokens(const moe_routing *r, const moe_comm *comm, int *tokens);
moe_status moe_block_ep_gather_wanted(const block_state *st, int training, int64_t n, int *gather);
moe_status moe_block_ep_hook_queue(moe_route_hook *h, moe_ctx *ctx, moe_tensor *slots, moe_tensor *expert_idx,
                                   moe_tensor *kept, moe_tensor *out);
moe_status moe_block_ep_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp, const int64_t *off,
                                moe_tensor **yp);
moe_status moe_block_ep_token_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xr,
                                      const moe_routing *r, const moe_route_hook *h, moe_tensor *tslots, moe_tensor **yr);
moe_status moe_block_ep_gather_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xa,
                                       const moe_routing *r, const moe_route_hook *h, int64_t n, moe_tensor **yr);

#endif
