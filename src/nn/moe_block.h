/* The MoE block: router -> selection -> dispatch -> experts -> combine
 * (+ shared experts). Its forward takes [..., H] and returns the same shape;
 * the balancing losses of the last forward are taped tensors the model adds
 * to the training loss. */
#ifndef MOE_BLOCK_H
#define MOE_BLOCK_H

#include "layer.h"
#include "router.h"

typedef struct {
    int64_t hidden, expert_inner;          /* expert_inner: each routed expert's intermediate size */
    moe_ffn_kind activation;
    moe_router_cfg router;
    float jitter;                          /* Switch: multiply the router input by U(1-j, 1+j) in training */
    int aux_free;                          /* DeepSeek-V3 bias balancing */
    float aux_free_rate;                   /* u in b += u * sign(mean load - load) */
    int64_t shared_experts;                /* 0: none */
    int64_t shared_inner;                  /* intermediate size of the shared expert block */
    int shared_gate;                       /* Qwen2-MoE: shared output *= sigmoid(shared_expert_gate(x)), a Linear H -> 1 */
    uint64_t seed;                         /* noise and jitter streams */
} moe_block_cfg;

/* experts: NULL for the built-in grouped SwiGLU/GELU experts, else
 * cfg->router.num_experts layers mapping [rows, H] -> [rows, H] (custom experts). */
moe_layer *moe_block_new(moe_ctx *ctx, const moe_block_cfg *cfg, moe_layer **experts, moe_init *init);
int moe_layer_is_moe(const moe_layer *l);
/* an MoE block set to expert parallelism (its rows cross devices on other streams) */
int moe_block_uses_ep(const moe_layer *l);
const moe_block_cfg *moe_block_config(const moe_layer *l);
/* The last forward's routing (counts, drops, entropy...) and its taped losses (borrowed; NULL before any forward). */
/* The last forward's routing statistics, or NULL (none yet, or still on the
 * device: the routing did not wait; moe_block_fetch_stats reads them, waiting
 * for the device). */
const moe_route_stats *moe_block_last_stats(const moe_layer *l);
moe_status moe_block_fetch_stats(moe_ctx *ctx, moe_layer *l);
/* The device summary of the last forward's routing when it did not wait and
 * its statistics were not yet read (borrowed; else NULL): a CUDA graph that
 * captured the forward rewrites it at each replay (read it with
 * moe_routing_stats_from_summary, router.h). */
moe_tensor *moe_block_pending_summary(const moe_layer *l);
/* Whether the routing may leave its summary on the device (no wait) wherever
 * every GEMM of the forward and backward can read the offsets there (see
 * moe_block.c): on != 0 always, 0 only with MOELAB_ROUTE_DEFER=1 (the
 * default; eagerly the wait is cheaper than the plan kernels). A CUDA graph
 * of the step needs it: the wait cannot be captured. */
moe_status moe_block_set_defer_routing(moe_layer *l, int on);
/* Reads the last forward's statistics to the host (if pending), then lets
 * go of its device tensors (assignments, weights, losses, slot map, router
 * logits): the memory of a CUDA graph that captured the forward goes back
 * with its graph instead of at the next forward. The statistics stay. */
moe_status moe_block_release_last(moe_ctx *ctx, moe_layer *l);

moe_tensor *moe_block_last_aux(const moe_layer *l);
moe_tensor *moe_block_last_z(const moe_layer *l);
/* The router logits [tokens, E] of the last forward, before noise or bias (borrowed; NULL before any forward). */
moe_tensor *moe_block_last_logits(const moe_layer *l);
/* Assignments of the last forward: token_idx, expert_idx, weights (borrowed). */
void moe_block_last_assignments(const moe_layer *l, moe_tensor **token_idx, moe_tensor **expert_idx, moe_tensor **weights);
/* Auxiliary-loss-free balancing: b_e += rate * sign(mean load - load_e) from the last forward's loads. */
moe_status moe_block_update_bias(moe_layer *l);
/* Sets the call counter that indexes the noise and jitter streams, so a
 * forward can be repeated with the same noise (gradient checks, replays). */
moe_status moe_block_set_noise_step(moe_layer *l, uint64_t step);
/* Whether a taped forward keeps the experts' gathered rows [N*k, hidden] for
 * the backward: 1 keeps them (a dispatch entry, as before); 0 never does (a
 * SwiGLU bank's GEMMs gather the rows in their loads, other banks gather them
 * again in the backward); -1, the default, takes the token rows only where
 * the GEMMs gather in their loads (bf16 SwiGLU experts on a GPU whose own
 * kernel serves the routing's row counts), which costs no time. */
moe_status moe_block_set_keep_rows(moe_layer *l, int keep);
int moe_block_keep_rows(const moe_layer *l);
uint64_t moe_block_noise_step(const moe_layer *l);
/* An additive bias on the router's input (task conditioning): each forward
 * routes on x + bias (broadcast to x's shape; last dim hidden) while the
 * experts still see x. Taped, so the bias gets its gradient. NULL clears it;
 * the block keeps a reference until cleared or replaced. */
moe_status moe_block_set_router_input_bias(moe_layer *l, moe_tensor *bias);
moe_tensor *moe_block_router_input_bias(const moe_layer *l);   /* borrowed; NULL when none */
/* The per-expert selection bias (a buffer; host f32 [E]). */
moe_tensor *moe_block_bias(const moe_layer *l);

/* Expert parallelism over comm's ranks (EP = world size; NULL or one rank: off).
 * Rank r computes experts [r*E/size, (r+1)*E/size) for the rows every rank
 * routes to them (moe_ep.h); the router and everything else run locally on
 * each rank's own tokens, and the balancing losses describe the local tokens.
 * The expert bank may hold all E experts (only the owned slice is used and
 * gets gradients) or, sharded (moe_experts_set_shard), exactly rank r's
 * slice; a sharded bank must match the communicator, and its layer refuses
 * to run without expert parallelism. Every rank must run the same forwards
 * and backwards (they are collectives). The communicator is borrowed and
 * must outlive its use; the expert bank only (not custom experts), E
 * divisible by the size. */
struct moe_comm;
moe_status moe_block_set_expert_parallel(moe_layer *l, struct moe_comm *comm);
/* The batch auxiliary loss over comm's ranks (router.h, aux_comm); NULL: this rank's tokens. Borrowed. */
moe_status moe_block_set_aux_comm(moe_layer *l, struct moe_comm *comm);
int moe_block_expert_parallel_size(const moe_layer *l);   /* 1 when off */
/* Expert parallelism by all_gather instead of all-to-all (Megatron's
 * "allgather" token dispatcher): every rank's tokens go to every rank before
 * routing (overlapped with it), and every rank's outputs for a rank's tokens
 * add up there (reduce_scatter). It needs `tokens` (> 0) tokens per rank in
 * every training-mode forward on every rank (another count is an error;
 * evaluation-mode forwards move token rows); 0 turns it off.
 * It moves every token to every rank: worth it when nearly every token has
 * a choice on every rank (top-k over 2 ranks). */
moe_status moe_block_set_ep_gather(moe_layer *l, int64_t tokens);

/* The grouped expert bank used by the block (exposed for tests and benches). */
moe_layer *moe_expert_bank_new(moe_ctx *ctx, int64_t experts, int64_t hidden, int64_t inner, moe_ffn_kind kind,
                               moe_init *init);
moe_status moe_expert_bank_forward(moe_layer *bank, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp,
                                   const int64_t *offsets, int groups, moe_tensor **yp);
/* The same, the experts' rows xp gathered from token rows x (xp[a] =
 * x[token_idx[a]], the dispatch, done by the caller; slots the routing's
 * [N, k] slot map): the tape's entry takes x, keeps token_idx and slots
 * instead of xp, gathers xp again in the backward and sums its gradient back
 * into the token rows (the dispatch's backward) - the [N*k, hidden] rows are
 * not kept between the passes. */
typedef struct {
    moe_tensor *x, *token_idx, *slots;
    /* combine folded in (moe_expert_bank_forward_tokens returns the tokens'
     * combined rows: y[t] = residual[t] + sum of w[r] * out[r] over t's rows
     * r): w [M] the routing's weights (NULL: not folded), residual [N, H] or
     * NULL. The experts' outputs are then not kept for the backward, which
     * takes w's gradient from the down projection's (gemm_grouped_swiglu_backward_w). */
    moe_tensor *w, *residual;
    /* xp given and kept for the backward (its weight gradients and dx read
     * it there) instead of gathered again: GEMMs that cannot gather rows in
     * their loads (the TMA kernel's shapes) then take the combine all the
     * same. The entry still takes x and sums dx back into its rows. */
    int keep_rows;
} moe_bank_tokens;
/* Whether the bank's GEMMs gather the rows themselves (SwiGLU without
 * adapters): then moe_expert_bank_forward_tokens takes xp = NULL. */
int moe_expert_bank_gathers(const moe_layer *bank);
/* The experts' hidden width (0 for another layer). */
int64_t moe_expert_bank_inner(const moe_layer *bank);
/* offsets_dev (may be NULL): the offsets as an i64 [groups + 1] tensor on the
 * device, in place of the host offsets (then NULL): the GEMMs read them there
 * where they can (ops.h moe_op_gemm_grouped_dev), else they are read back. */
moe_status moe_expert_bank_forward_tokens(moe_layer *bank, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp,
                                          const moe_bank_tokens *tok, const int64_t *offsets,
                                          moe_tensor *offsets_dev, int groups, moe_tensor **yp);

/* Expert sharding (expert parallelism without full-size expert weights on
 * every rank). A bank holds the rows [first, first + count) of its layer's
 * total experts in each of its stacked weights; an unsharded bank holds
 * [0, total). */
void moe_expert_bank_range(const moe_layer *bank, int64_t *first, int64_t *count, int64_t *total);
int moe_expert_bank_is_sharded(const moe_layer *bank);   /* count < total */
/* The expert banks of a tree in parameter order; returns how many (fills up to max; out may be NULL). */
int moe_expert_banks(moe_layer *root, moe_layer **out, int max);
/* Makes every expert bank of the tree hold experts [first, first + count):
 * from `values` (n_values f32 tensors [count, ...], one per bank weight in
 * parameter order: gate (SwiGLU), up, down, bank after bank), or, with
 * values NULL, from the rows the banks hold now (which must include them).
 * Then rebuilds the root's flat buffers (gradients zeroed; an optimiser made
 * before is stale and refuses to step). Checks everything before changing
 * anything: a refused request leaves the model as it was. Banks with LoRA
 * adapters are refused. */
moe_status moe_experts_set_shard(moe_ctx *ctx, moe_layer *root, int64_t first, int64_t count,
                                 moe_tensor *const *values, int n_values);

#endif
