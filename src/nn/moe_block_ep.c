/* The MoE block under expert parallelism: its settings (the communicator,
 * the all_gather mode, the shard check), the counts queued on the routing's
 * wait, and the experts' three exchanges (all-to-all of the dispatched rows,
 * token rows, every rank's tokens gathered). The exchanges themselves are
 * moe_ep.c's. */
#include "moe_block_internal.h"
#include "functional.h"
#include "moe_dispatch.h"

#include <stdlib.h>
#include <string.h>

/* A sharded bank must hold exactly the experts its rank owns over comm. */
static moe_status check_shard_owner(const moe_layer *bank, const moe_comm *comm) {
    int64_t first, count, total;
    moe_expert_bank_range(bank, &first, &count, &total);
    int64_t own = total / comm->size;
    if (count < total && (count != own || first != comm->rank * own))
        return moe_error(MOE_ERR_ARG, "expert parallel: this rank's experts are sharded as [%lld, %lld) of %lld, "
                         "but rank %d of %d owns [%lld, %lld)", (long long)first, (long long)(first + count),
                         (long long)total, comm->rank, comm->size, (long long)(comm->rank * own),
                         (long long)((comm->rank + 1) * own));
    return MOE_OK;
}

moe_status moe_block_set_expert_parallel(moe_layer *l, moe_comm *comm) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_expert_parallel: not an MoE layer");
    if (comm && comm->size > 1) {
        if (s->custom) return moe_error(MOE_ERR_ARG, "expert parallel: custom (per-layer) experts are not supported, only the expert bank");
        if (s->cfg.router.num_experts % comm->size != 0)
            return moe_error(MOE_ERR_ARG, "expert parallel: %lld experts do not split evenly over %d ranks",
                             (long long)s->cfg.router.num_experts, comm->size);
        if (!comm->ops->supports(comm, l->device))
            return moe_error(MOE_ERR_ARG, "expert parallel: the %s communicator cannot move this layer's tensors",
                             comm->ops->name);
        MOE_TRY(check_shard_owner(l->children[s->c_experts], comm));
    }
    s->ep_comm = comm && comm->size > 1 ? comm : NULL;
    return MOE_OK;
}
moe_status moe_block_set_aux_comm(moe_layer *l, moe_comm *comm) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_aux_comm: not an MoE layer");
    s->cfg.router.aux_comm = comm;
    return MOE_OK;
}

moe_status moe_block_set_ep_gather(moe_layer *l, int64_t tokens) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_ep_gather: not an MoE layer");
    if (tokens < 0) return moe_error(MOE_ERR_ARG, "set_ep_gather: %lld tokens per rank", (long long)tokens);
    s->ep_gather = tokens;
    if (!tokens) {   /* the send-row map is made again when needed */
        moe_tensor_release(s->ep_tmap);
        s->ep_tmap = NULL;
    }
    return MOE_OK;
}

int moe_block_expert_parallel_size(const moe_layer *l) {
    block_state *s = st_of(l);
    return s && s->ep_comm ? s->ep_comm->size : 1;
}

/* Expert parallel: send the dispatched rows to the ranks owning their experts,
 * run this rank's experts, and bring the outputs back in xp's order. A full
 * bank runs over all E experts' offsets (the non-owned ones are empty); a
 * sharded bank holds only the owned experts and runs over their offsets. */
moe_status moe_block_ep_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp, const int64_t *off,
                                moe_tensor **yp) {
    block_state *st = l->state;
    moe_layer *bank = l->children[st->c_experts];
    int64_t e = st->cfg.router.num_experts;
    int64_t first, count, total;
    moe_expert_bank_range(bank, &first, &count, &total);
    MOE_TRY(check_shard_owner(bank, st->ep_comm));
    int64_t *loff = calloc((size_t)e + 1, sizeof *loff);
    if (!loff) return moe_error(MOE_ERR_OOM, "out of host memory");
    moe_ep_plan *p = NULL;
    moe_tensor *xl = NULL, *yl = NULL;
    moe_status s = moe_ep_plan_new(ctx, st->ep_comm, off, e, loff, &p);
    if (s == MOE_OK) s = moe_f_ep_dispatch(ctx, tape, p, xp, &xl);
    /* loff[first] is 0: the experts before the owned ones received nothing here */
    if (s == MOE_OK) s = moe_expert_bank_forward(bank, ctx, tape, xl, loff + first, (int)count, &yl);
    if (s == MOE_OK) s = moe_f_ep_combine(ctx, tape, p, yl, yp);
    moe_tensor_release(xl); moe_tensor_release(yl);
    moe_ep_plan_release(p);
    free(loff);
    return s;
}

/* Whether expert parallelism moves token rows (one per token and owning
 * rank, needs the router's slot map and at most MOE_EP_MAX_RANKS ranks) or
 * assignment rows (one per kept choice; expert choice, or
 * MOELAB_EP_EXCHANGE=assignments, read at each call, for A/B comparisons;
 * "tokens" or unset is the default, anything else an error). */
moe_status moe_block_ep_moves_tokens(const moe_routing *r /* NULL: before routing */, const moe_comm *comm,
                                     int *tokens) {
    const char *env = getenv("MOELAB_EP_EXCHANGE");
    if (env && *env && strcmp(env, "tokens") && strcmp(env, "assignments"))
        return moe_error(MOE_ERR_ARG, "MOELAB_EP_EXCHANGE is \"%s\", expected \"tokens\" or \"assignments\"", env);
    *tokens = (!r || r->slots) && comm->size <= MOE_EP_MAX_RANKS && !(env && !strcmp(env, "assignments"));
    return MOE_OK;
}

/* Whether this forward gathers every rank's tokens (moe_block_set_ep_gather;
 * MOELAB_EP_EXCHANGE=tokens or assignments overrides it for A/B runs). The
 * choice must be the same on every rank: it depends only on the setting, the
 * configuration, training mode (evaluation inside a training run, with its
 * possibly shorter last batch, moves token rows) and N, which must equal the
 * setting (else an error here). */
moe_status moe_block_ep_gather_wanted(const block_state *st, int training, int64_t n, int *gather) {
    *gather = 0;
    if (st->custom || !st->ep_comm || st->ep_gather <= 0 || !training) return MOE_OK;
    const char *env = getenv("MOELAB_EP_EXCHANGE");
    if (env && (!strcmp(env, "tokens") || !strcmp(env, "assignments"))) return MOE_OK;
    if (st->cfg.router.selection == MOE_SELECT_EXPERT_CHOICE || n * st->cfg.router.top_k > INT32_MAX) return MOE_OK;
    if (n != st->ep_gather)
        return moe_error(MOE_ERR_SHAPE, "MoE: expert parallelism by all_gather is set for %lld tokens per rank on every "
                         "rank, this forward has %lld (use the all-to-all dispatch for batches that differ)",
                         (long long)st->ep_gather, (long long)n);
    *gather = 1;
    return MOE_OK;
}

static moe_tensor *new_index(moe_ctx *ctx, moe_dtype dt, int ndim, int64_t d0, int64_t d1, moe_device dev) {
    int64_t shape[2] = {d0, d1};
    return moe_tensor_new(ctx, dt, ndim, shape, dev);
}


moe_status moe_block_ep_hook_queue(moe_route_hook *h, moe_ctx *ctx, moe_tensor *slots, moe_tensor *expert_idx,
                                   moe_tensor *kept, moe_tensor *out) {
    ep_hook *a = h->arg;
    const int ep = a->comm->size;
    const int64_t e = kept->shape[0], w = e + ep;
    moe_tensor *mine = moe_tensor_narrow(out, 0, 0, w), *mine_e = moe_tensor_narrow(out, 0, 0, e);
    moe_tensor *mine_t = moe_tensor_narrow(out, 0, e, ep), *all = moe_tensor_narrow(out, 0, w, (int64_t)ep * w);
    if (!a->gather) a->tslots = new_index(ctx, MOE_I32, 2, slots->shape[0], ep, slots->device);
    moe_status s = mine && mine_e && mine_t && all && (a->gather || a->tslots) ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_copy(ctx, mine_e, kept);
    if (s == MOE_OK && a->gather) s = moe_op_fill(ctx, mine_t, (double)slots->shape[0]);
    if (s == MOE_OK && !a->gather) s = moe_op_ep_token_slots(ctx, a->tslots, mine_t, slots, expert_idx, e / ep);
    if (s == MOE_OK) s = moe_comm_all_gather_queued(a->comm, mine, all, 1);
    moe_tensor_release(mine); moe_tensor_release(mine_e); moe_tensor_release(mine_t); moe_tensor_release(all);
    return s == MOE_OK ? s : moe_error_context(s, "expert parallel counts");
}

/* The plan from the routing hook's results; with token rows, this rank's
 * rows per destination, and tslots' index bound tightened to their number
 * (the gathered path has no tslots). */
static moe_status ep_counts_plan(moe_comm *comm, const moe_route_hook *h, int64_t e, int64_t *loff, int64_t *counts,
                                moe_tensor *tslots, moe_ep_plan **p) {
    if (!h->ran) return moe_error(MOE_ERR_INTERNAL, "expert parallel: the routing did not count the rows");
    MOE_TRY(moe_error_context(moe_comm_check_queued(comm), "expert parallel counts"));
    const ep_hook *a = h->arg;
    const int ep = comm->size;
    const int64_t w = e + ep, *g = h->host + w;
    for (int64_t i = 0; i < w; i++)
        if (g[(int64_t)comm->rank * w + i] != h->host[i])
            return moe_error(MOE_ERR_STATE, "expert parallel counts: the all_gather returned %lld for this rank's count "
                             "%lld, which was %lld", (long long)g[(int64_t)comm->rank * w + i], (long long)i,
                             (long long)h->host[i]);
    for (int src = 0; a->gather && src < ep; src++)
        if (g[(int64_t)src * w + e] != a->gather)
            return moe_error(MOE_ERR_STATE, "expert parallel (all_gather): rank %d routed %lld tokens, rank %d %lld; the "
                             "gathered exchange needs the same number on every rank", src, (long long)g[(int64_t)src * w + e],
                             comm->rank, (long long)a->gather);
    int64_t rows = 0;
    for (int d = 0; d < ep; d++) rows += counts[d] = g[(int64_t)comm->rank * w + e + d];
    if (tslots) moe_tensor_set_index_bound(tslots, rows);
    return moe_ep_plan_from_counts(comm, g, e, loff, p);
}

/* The owner's side, shared by token rows and gathered rows: every
 * assignment's packed (row, position) and weight come here; the rows of src
 * [u, H] it names are expanded to this rank's experts, which run, and each
 * row's weighted outputs are combined: *yu [u, H]. join: the gathered rows
 * may still be arriving (the compute stream joins before reading them). */
static moe_status ep_owner(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *packed,
                           moe_tensor *weights, const int64_t *loff, int64_t width, moe_tensor *src, int64_t u,
                           moe_comm *join, moe_tensor **yu) {
    block_state *st = l->state;
    moe_layer *bank = l->children[st->c_experts];
    int64_t first, count, total;
    moe_expert_bank_range(bank, &first, &count, &total);
    const moe_device dev = src->device;
    const int64_t a = weights->shape[0], rows = moe_ep_plan_received(p);
    int64_t wshape[2] = {a, 1};
    moe_tensor *precv = NULL, *wcol = NULL, *wl = NULL, *wlv = NULL, *perm = NULL, *tok_l = NULL, *slots_l = NULL;
    moe_tensor *xl = NULL, *yl = NULL;
    moe_status s = moe_ep_exchange_assignments(ctx, p, packed, &precv);
    if (s == MOE_OK) s = moe_f_view(ctx, tape, weights, 2, wshape, &wcol);
    if (s == MOE_OK) s = moe_f_ep_dispatch(ctx, tape, p, wcol, &wl);
    if (s == MOE_OK) s = moe_ep_plan_perm(ctx, p, dev, &perm);
    if (s == MOE_OK) {
        tok_l = new_index(ctx, MOE_I64, 1, rows, 0, dev);
        slots_l = new_index(ctx, MOE_I32, 2, u, width, dev);
        moe_tensor *pr = tok_l && slots_l ? moe_tensor_view(precv, 1, &rows) : NULL;
        s = pr ? moe_op_ep_unpack(ctx, tok_l, slots_l, pr, perm) : moe_last_status();
        moe_tensor_release(pr);
    }
    if (s == MOE_OK) s = moe_f_view(ctx, tape, wl, 1, &rows, &wlv);
    if (s == MOE_OK && join) s = moe_comm_join_queued(join, dev);
    if (s == MOE_OK) s = moe_f_dispatch(ctx, tape, src, tok_l, slots_l, &xl);
    /* loff[first] is 0: the experts before the owned ones received nothing here */
    if (s == MOE_OK) s = moe_expert_bank_forward(bank, ctx, tape, xl, loff + first, (int)count, &yl);
    if (s == MOE_OK) s = moe_f_combine(ctx, tape, yl, wlv, tok_l, slots_l, u, yu);
    moe_tensor *all[] = {precv, wcol, wl, wlv, tok_l, slots_l, xl, yl};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    return s;
}

/* Expert parallel with token rows (moe_ep.h): xr [n, H] -> yr [n, H], the
 * routed experts' weighted sum. Sender: each token once to each rank owning
 * one of its kept choices (tslots numbers these rows), with every choice's
 * weight and packed (row, position) going along as assignment rows. Owner:
 * expands the received tokens to its experts (slots_l), runs them, combines
 * each token's weighted outputs and sends one row back; the sender adds the
 * rows of a token. Every step is taped; no host synchronisation beyond the
 * routing's one wait, which brought the counts (moe_route_hook). */
moe_status moe_block_ep_token_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xr,
                                      const moe_routing *r, const moe_route_hook *h, moe_tensor *tslots,
                                      moe_tensor **yr) {
    block_state *st = l->state;
    moe_comm *comm = st->ep_comm;
    const int ep = comm->size;
    const int64_t e = st->cfg.router.num_experts, el = e / ep, k = r->slots->shape[1];
    const int64_t width = k < el ? k : el, n = xr->shape[0], a = r->token_idx->shape[0];
    MOE_TRY(check_shard_owner(l->children[st->c_experts], comm));
    int64_t *loff = calloc((size_t)e + 1 + (size_t)ep, sizeof *loff);
    if (!loff) return moe_error(MOE_ERR_OOM, "out of host memory");
    int64_t *counts = loff + e + 1;
    moe_device dev = xr->device;
    moe_ep_plan *p = NULL;
    moe_tensor *send_tok = NULL, *packed = NULL, *xs = NULL, *xu = NULL, *yu = NULL, *ys = NULL;
    moe_tensor_retain(tslots);
    moe_status s = tslots ? ep_counts_plan(comm, h, e, loff, counts, tslots, &p)
                          : moe_error(MOE_ERR_INTERNAL, "expert parallel: the routing did not number the token rows");
    int64_t sent = 0;
    for (int d = 0; s == MOE_OK && d < ep; d++) sent += counts[d];
    /* the sender's side: token rows, and each assignment's packed position */
    if (s == MOE_OK) s = (send_tok = new_index(ctx, MOE_I64, 1, sent, 0, dev)) ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_slot_tokens(ctx, send_tok, tslots);
    if (s == MOE_OK) s = (packed = new_index(ctx, MOE_I64, 2, a, 1, dev)) ? MOE_OK : moe_last_status();
    if (s == MOE_OK) {
        moe_tensor *pv = moe_tensor_view(packed, 1, &a);
        s = pv ? moe_op_ep_pack(ctx, pv, r->token_idx, r->expert_idx, r->slots, tslots, el, width,
                                moe_ep_plan_token_adjust(p))
               : moe_last_status();
        moe_tensor_release(pv);
    }
    if (s == MOE_OK) s = moe_f_dispatch(ctx, tape, xr, send_tok, tslots, &xs);
    if (s == MOE_OK) s = moe_f_ep_tokens(ctx, tape, p, xs, &xu);
    if (s == MOE_OK)
        s = ep_owner(l, ctx, tape, p, packed, r->weights, loff, width, xu, moe_ep_plan_tokens_received(p), NULL, &yu);
    if (s == MOE_OK) s = moe_f_ep_tokens_back(ctx, tape, p, yu, &ys);
    if (s == MOE_OK) s = moe_f_gather_sum(ctx, tape, ys, send_tok, tslots, n, yr);
    moe_tensor *all[] = {tslots, send_tok, packed, xs, xu, yu, ys};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    moe_ep_plan_release(p);
    free(loff);
    return s;
}

/* The send-row map of the gathered path: [N, ep] i32 with row t all t,
 * made once per shape and kept by the layer. */
static moe_status gather_tmap(block_state *st, moe_ctx *ctx, int64_t n, int ep, moe_device dev, moe_tensor **out) {
    moe_tensor *m = st->ep_tmap;
    if (!m || m->shape[0] != n || m->shape[1] != ep || !moe_device_eq(m->device, dev)) {
        int64_t shape[2] = {n, ep};
        moe_tensor *h = moe_tensor_new_cpu(MOE_I32, 2, shape);
        if (!h) return moe_last_status();
        int32_t *v = moe_tensor_data(h);
        for (int64_t t = 0; t < n; t++)
            for (int d = 0; d < ep; d++) v[t * ep + d] = (int32_t)t;
        m = moe_op_to(ctx, h, dev, MOE_I32);
        moe_tensor_release(h);
        if (!m) return moe_last_status();
        moe_tensor_set_index_bound(m, n);
        moe_tensor_release(st->ep_tmap);
        st->ep_tmap = m;
    }
    *out = m;
    return MOE_OK;
}

/* Expert parallel with gathered rows (moe_ep.h: moe_f_ep_gather): xa [ep *
 * N, H] holds every rank's tokens (rank r's at r * N), gathered before the
 * routing; each assignment names its token's row there (r * N + t) and the
 * owner runs its experts on the rows named; every rank's outputs for rank
 * r's tokens add up at rank r (reduce_scatter): *yr [N, H]. */
moe_status moe_block_ep_gather_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xa,
                                       const moe_routing *r, const moe_route_hook *h, int64_t n, moe_tensor **yr) {
    block_state *st = l->state;
    moe_comm *comm = st->ep_comm;
    const int ep = comm->size;
    const int64_t e = st->cfg.router.num_experts, el = e / ep, k = r->slots->shape[1];
    const int64_t width = k < el ? k : el, a = r->token_idx->shape[0];
    MOE_TRY(check_shard_owner(l->children[st->c_experts], comm));
    int64_t *loff = calloc((size_t)e + 1 + (size_t)ep * 2, sizeof *loff);
    if (!loff) return moe_error(MOE_ERR_OOM, "out of host memory");
    int64_t *counts = loff + e + 1, *adjust = counts + ep;
    for (int d = 0; d < ep; d++) adjust[d] = (int64_t)comm->rank * n;   /* this rank's rows in everyone's xa */
    moe_ep_plan *p = NULL;
    moe_tensor *tmap = NULL, *packed = NULL, *yu = NULL;
    moe_status s = ep_counts_plan(comm, h, e, loff, counts, NULL, &p);
    if (s == MOE_OK) s = gather_tmap(st, ctx, n, ep, xa->device, &tmap);
    if (s == MOE_OK) s = (packed = new_index(ctx, MOE_I64, 2, a, 1, xa->device)) ? MOE_OK : moe_last_status();
    if (s == MOE_OK) {
        moe_tensor *pv = moe_tensor_view(packed, 1, &a);
        s = pv ? moe_op_ep_pack(ctx, pv, r->token_idx, r->expert_idx, r->slots, tmap, el, width, adjust)
               : moe_last_status();
        moe_tensor_release(pv);
    }
    if (s == MOE_OK) s = ep_owner(l, ctx, tape, p, packed, r->weights, loff, width, xa, ep * n, comm, &yu);
    if (s == MOE_OK) s = moe_f_ep_scatter(ctx, tape, comm, yu, yr);
    moe_tensor_release(packed);
    moe_tensor_release(yu);
    moe_ep_plan_release(p);
    free(loff);
    return s;
}
