/* The MoE router: scores, selection and balancing losses.
 *
 * moe_route turns router logits [N, E] into assignments (token, expert,
 * weight), sorted into expert-contiguous order, and records one tape entry
 * whose outputs are the differentiable parts: the assignment weights [A], the
 * auxiliary loss and the z-loss (0-dim). Selection itself is not
 * differentiable; the weights are differentiable functions of the scores.
 *
 * Where it runs. With logits on a CUDA device and selection MOE_SELECT_TOPK
 * (any score function, renormalize, routed_scaling, capacity, bias, aux
 * kind, z-loss; at most MOE_CUDA_ROUTE_MAX_E = 1024 experts; f32 or bf16
 * logits) the whole router runs on the device (router_device.c,
 * src/ops/cuda/cuda_route.cu): forward waits once, for one small copy of the
 * offsets and statistics, and backward does not wait at all. Its results
 * equal the host path's: the same assignments in the same order, ties to the
 * lower expert index, the same capacity rule, offsets, counts and dropped;
 * weights, losses and statistics to f32 rounding. Everything else - noisy
 * top-k, expert choice, Sinkhorn, CPU logits - runs on the host in f32 (a
 * copy of the logits to the host, results uploaded back).
 *
 * Dtypes: weights have the logits' dtype; aux_loss and z_loss are f32 0-dim
 * tensors on the logits' device whatever the logits' dtype; backward accepts
 * f32 (or bf16) upstream gradients for them. token_idx and expert_idx carry
 * an index bound (tensor.h: n and num_experts), so CUDA index ops on them
 * skip their range check. */
#ifndef MOE_ROUTER_H
#define MOE_ROUTER_H

#include "tape.h"
#include "../ops/ops.h"

struct moe_comm;

typedef enum { MOE_SCORE_SOFTMAX, MOE_SCORE_SIGMOID } moe_score_fn;

typedef enum {
    MOE_SELECT_TOPK,           /* each token its top-k experts (capacity optional) */
    MOE_SELECT_NOISY_TOPK,     /* top-k of logits + N(0,1) * softplus(noise logits); softmax over the kept k */
    MOE_SELECT_EXPERT_CHOICE,  /* each expert its top-C tokens */
    MOE_SELECT_SINKHORN,       /* balanced assignment (BASE layers) via Sinkhorn iterations */
} moe_selection;

typedef enum { MOE_AUX_NONE, MOE_AUX_BATCH, MOE_AUX_SEQUENCE } moe_aux_kind;

typedef struct {
    int64_t num_experts, top_k;
    moe_score_fn score;
    moe_selection selection;
    int renormalize;          /* weights of a token's chosen experts sum to 1 (Mixtral) */
    float capacity_factor;    /* > 0: capacity = ceil(cf * k * N / E) per expert, overflow dropped;
                                 expert choice: C = ceil(cf * k * N / E) tokens per expert (cf 0 -> 1) */
    float routed_scaling;     /* weights are multiplied by this (DeepSeek); 0 -> 1 */
    int sinkhorn_iters;       /* 0 -> 8 */
    moe_aux_kind aux;         /* which auxiliary loss to compute */
    /* batch aux over every rank's tokens: the dispatch fractions f and mean
     * scores P are averaged over this communicator's ranks (equal token
     * counts per rank) before aux = E sum f P; the gradient then uses the
     * global f, which makes the ranks' averaged gradients those of one
     * process on the whole batch. NULL: this rank's tokens only. */
    struct moe_comm *aux_comm;
    /* Work queued between the device routing's kernels and its one wait
     * (moe_route_hook), or NULL. */
    struct moe_route_hook *hook;
    /* The device path only, where nothing can drop (top-k, no capacity) and
     * neither a hook nor aux_comm is set: the routing's offsets and statistics
     * stay on the device (moe_routing.offsets_dev, summary_dev) and the
     * routing does not wait for the device; moe_routing_fetch reads them when
     * the host needs them. Ignored elsewhere (the routing waits as usual). */
    int defer_summary;
} moe_router_cfg;

/* Work queued on the device between the routing kernels and the routing's
 * one wait, so that the wait brings its results back too (expert
 * parallelism's token rows per rank and every rank's counts, which would
 * otherwise cost two more waits per layer), or runs while the host waits (the
 * MoE block's dispatch). On the host path (slots on a device) the router calls
 * the queue after routing, then brings `out` back: `ran` is set either way;
 * with no slots on a device the hook is not called and `ran` stays 0. */
typedef struct moe_route_hook {
    int64_t extra;   /* i64 results the hook writes on the device */
    /* slots: the routing's [N, k] i32 slot map (values in [-1, N*k)),
     * expert_idx: its [N*k] i64 experts (valid where slots point), kept: i64
     * [E] kept assignments per expert, out: i64 [extra]; all on the device. */
    moe_status (*queue)(struct moe_route_hook *h, moe_ctx *ctx, moe_tensor *slots, moe_tensor *expert_idx,
                        moe_tensor *kept, moe_tensor *out);
    void *arg;
    /* set by the router while queue runs: the [A] token of each slot (i64,
     * index-bounded by N). On the device path A = N*k before the wait, of
     * which only the kept count is valid: all of them when nothing can drop. */
    moe_tensor *token_idx;
    int64_t *host;   /* after the wait: out on the host (the router allocates it, the caller frees it) */
    int ran;
} moe_route_hook;

/* Host-side statistics of one routing call, free of device syncs for callers. */
typedef struct {
    int64_t tokens, assignments, dropped;   /* dropped: chosen but over capacity */
    int64_t *counts;                        /* [E] kept assignments per expert */
    double entropy;                         /* mean per-token entropy of the (normalised) scores */
    double z;                               /* mean logsumexp^2 of the logits */
    double top1_prob;                       /* mean of each token's largest normalised score */
    double aux;                             /* the auxiliary loss value */
} moe_route_stats;

typedef struct {
    int64_t num_experts;
    moe_tensor *token_idx;    /* i64 [A] rows of x, in expert-contiguous order */
    moe_tensor *expert_idx;   /* i64 [A] */
    moe_tensor *weights;      /* [A] combine weights (taped) */
    moe_tensor *aux_loss;     /* 0-dim (taped) */
    moe_tensor *z_loss;       /* 0-dim (taped) */
    int64_t *offsets;         /* host [E + 1]: expert e owns assignments [offsets[e], offsets[e+1]) */
    moe_route_stats stats;
    /* Deferred summary (cfg.defer_summary): offsets_dev, i64 [E + 1] on the
     * logits' device, holds the offsets; summary_dev the offsets, counts and
     * statistics not yet read. Until moe_routing_fetch: offsets and
     * stats.counts NULL, stats.tokens and stats.assignments (N k) set, the
     * rest 0. NULL both when the routing waited. */
    moe_tensor *offsets_dev, *summary_dev;
    /* i32 [N, k] on the logits' device, or NULL: slots[t*k + q] = the
     * assignment (row of token_idx / weights) of token t's q-th choice, -1
     * where capacity dropped it. Carries the index bound A (tensor.h; -1
     * allowed), so CUDA ops skip their range check. NULL for expert choice
     * (no fixed k) and when N*k or A does not fit i32: the MoE block then
     * takes its index_add path (moe_dispatch.c). */
    moe_tensor *slots;
} moe_routing;

/* logits [N, E]; noise_logits [N, E] for noisy top-k in training (else NULL);
 * bias [E] (host, may be NULL): added to the scores for selection only
 * (auxiliary-loss-free balancing); noise_key/noise_offset seed the noise;
 * seq_len: tokens per sequence for the sequence-level auxiliary loss. */
moe_status moe_route(moe_ctx *ctx, moe_tape *tape, const moe_router_cfg *cfg, moe_tensor *logits,
                     moe_tensor *noise_logits, const float *bias, int training, uint64_t noise_key,
                     uint64_t noise_offset, int64_t seq_len, moe_routing *out);
void moe_routing_clear(moe_routing *r);
/* A deferred routing's summary read to the host (waits for the device):
 * offsets, counts and statistics filled, summary_dev released (offsets_dev
 * stays). Nothing to do for a routing that waited. */
moe_status moe_routing_fetch(moe_ctx *ctx, moe_routing *r);
/* The statistics of a deferred routing over n tokens and e experts from its
 * summary read back to the host (summary: a contiguous i64 cpu tensor of the
 * device summary's length): out->counts is malloc'd, the caller frees it. */
moe_status moe_routing_stats_from_summary(const moe_tensor *summary, int64_t e, int64_t n, moe_route_stats *out);
/* Both paths (router.c): the batch aux over comm's ranks (see aux_comm) from
 * this rank's f (averaged in place) and mean scores pm, both [e]. */
moe_status moe_route_global_aux(struct moe_comm *comm, float *f, const double *pm, int64_t e, double *aux);

/* Internal (router.c <-> router_device.c): whether moe_route takes the
 * device path for these logits, and that path (arguments checked by moe_route). */
int moe_route_device_supported(const moe_router_cfg *cfg, const moe_tensor *logits);
moe_status moe_route_device(moe_ctx *ctx, moe_tape *tape, const moe_router_cfg *cfg, moe_tensor *logits,
                            const float *bias, int64_t seq_len, moe_routing *out);
moe_status moe_router_cfg_check(const moe_router_cfg *cfg);
/* Both paths: the hook's h->extra results, read back, handed to it (h->host, h->ran). */
moe_status moe_route_hook_deliver(moe_route_hook *h, const int64_t *values);

#endif
