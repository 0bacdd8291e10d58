#include "moe_block_internal.h"
#include "functional.h"
#include "moe_dispatch.h"
#include "../core/rng.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>


int moe_layer_is_moe(const moe_layer *l) { return moe_layer_is(l, "MoE"); }

int moe_block_uses_ep(const moe_layer *l) {
    return moe_layer_is_moe(l) && ((const block_state *)l->state)->ep_comm != NULL;
}
const moe_block_cfg *moe_block_config(const moe_layer *l) { block_state *s = st_of(l); return s ? &s->cfg : NULL; }
const moe_route_stats *moe_block_last_stats(const moe_layer *l) {
    block_state *s = st_of(l);
    return s && s->last.stats.counts ? &s->last.stats : NULL;
}
moe_status moe_block_fetch_stats(moe_ctx *ctx, moe_layer *l) {
    block_state *s = st_of(l);
    return s ? moe_routing_fetch(ctx, &s->last) : MOE_OK;
}
moe_tensor *moe_block_pending_summary(const moe_layer *l) {
    block_state *s = st_of(l);
    return s ? s->last.summary_dev : NULL;
}
moe_status moe_block_release_last(moe_ctx *ctx, moe_layer *l) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "release_last: not an MoE layer");
    MOE_TRY(moe_routing_fetch(ctx, &s->last));
    moe_tensor **ts[] = {&s->last.token_idx, &s->last.expert_idx, &s->last.weights, &s->last.aux_loss,
                         &s->last.z_loss, &s->last.slots, &s->last.offsets_dev, &s->last_logits};
    for (size_t i = 0; i < sizeof ts / sizeof ts[0]; i++) {
        moe_tensor_release(*ts[i]);
        *ts[i] = NULL;
    }
    return MOE_OK;
}
moe_status moe_block_set_defer_routing(moe_layer *l, int on) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_defer_routing: not an MoE layer");
    s->defer_route = on != 0;
    return MOE_OK;
}
moe_tensor *moe_block_last_aux(const moe_layer *l) { block_state *s = st_of(l); return s ? s->last.aux_loss : NULL; }
moe_tensor *moe_block_last_z(const moe_layer *l) { block_state *s = st_of(l); return s ? s->last.z_loss : NULL; }
moe_tensor *moe_block_bias(const moe_layer *l) { block_state *s = st_of(l); return s ? s->bias : NULL; }
moe_tensor *moe_block_last_logits(const moe_layer *l) { block_state *s = st_of(l); return s ? s->last_logits : NULL; }
void moe_block_last_assignments(const moe_layer *l, moe_tensor **t, moe_tensor **e, moe_tensor **w) {
    block_state *s = st_of(l);
    *t = s ? s->last.token_idx : NULL;
    *e = s ? s->last.expert_idx : NULL;
    *w = s ? s->last.weights : NULL;
}

moe_status moe_block_update_bias(moe_layer *l) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "update_bias: not an MoE layer");
    if (!s->cfg.aux_free || !s->last.stats.counts) return MOE_OK;
    int64_t e = s->cfg.router.num_experts;
    double mean = 0;
    for (int64_t j = 0; j < e; j++) mean += (double)s->last.stats.counts[j];
    mean /= (double)e;
    float *b = moe_f32(s->bias);
    for (int64_t j = 0; j < e; j++) {
        double d = mean - (double)s->last.stats.counts[j];
        b[j] += s->cfg.aux_free_rate * (float)((d > 0) - (d < 0));
    }
    return MOE_OK;
}

moe_status moe_block_set_router_input_bias(moe_layer *l, moe_tensor *bias) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_router_input_bias: not an MoE layer");
    if (bias && (bias->ndim < 1 || bias->shape[bias->ndim - 1] != s->cfg.hidden)) {
        char b[96];
        return moe_error(MOE_ERR_SHAPE, "set_router_input_bias: bias has shape %s, expected last dim %lld (hidden_size)",
                         moe_shape_str(bias, b, sizeof b), (long long)s->cfg.hidden);
    }
    moe_tensor_retain(bias);
    moe_tensor_release(s->router_bias);
    s->router_bias = bias;
    return MOE_OK;
}
moe_tensor *moe_block_router_input_bias(const moe_layer *l) { block_state *s = st_of(l); return s ? s->router_bias : NULL; }

uint64_t moe_block_noise_step(const moe_layer *l) { block_state *s = st_of(l); return s ? s->calls : 0; }

int moe_block_keep_rows(const moe_layer *l) {
    block_state *st = st_of(l);
    return st ? st->keep_rows : 0;
}

moe_status moe_block_set_keep_rows(moe_layer *l, int keep) {
    block_state *st = st_of(l);
    if (!st) return moe_error(MOE_ERR_ARG, "set_keep_expert_rows: not an MoE layer");
    st->keep_rows = keep < 0 ? -1 : keep != 0;
    return MOE_OK;
}

moe_status moe_block_set_noise_step(moe_layer *l, uint64_t step) {
    block_state *s = st_of(l);
    if (!s) return moe_error(MOE_ERR_ARG, "set_noise_step: not an MoE layer");
    s->calls = step;
    return MOE_OK;
}

/* Without expert parallelism the routing's wait brings nothing back for a
 * hook; one queues the dispatch (the gather of the experts' rows, which needs
 * only the device's token_idx) so the GPU has it to run while the host waits. */
typedef struct {
    moe_tape *tape;
    moe_tensor *x, *xp;   /* xp: set by the queue */
} dispatch_hook;

static moe_status dispatch_queue(moe_route_hook *h, moe_ctx *ctx, moe_tensor *slots, moe_tensor *expert_idx,
                                 moe_tensor *kept, moe_tensor *out) {
    dispatch_hook *a = h->arg;
    if (!h->token_idx) return moe_error(MOE_ERR_INTERNAL, "MoE dispatch: the routing handed no token_idx to its hook");
    return moe_f_dispatch(ctx, a->tape, a->x, h->token_idx, slots, &a->xp);
}

/* Custom experts: each child layer runs on its slice of the dispatched rows. */
static moe_status custom_experts(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp, const int64_t *off,
                                 moe_tensor **yp) {
    block_state *st = l->state;
    moe_layer *list = l->children[st->c_experts];
    int n = list->n_children;
    moe_tensor **parts = calloc((size_t)n, sizeof *parts);
    moe_tensor **ins = calloc((size_t)n, sizeof *ins);
    if (!parts || !ins) { free(parts); free(ins); return moe_error(MOE_ERR_OOM, "out of host memory"); }
    moe_status s = MOE_OK;
    int used = 0;
    moe_tensor *kept[512];
    for (int j = 0; j < n && s == MOE_OK; j++) {
        int64_t len = off[j + 1] - off[j];
        if (len == 0) continue;
        s = moe_f_rows(ctx, tape, xp, off[j], len, &ins[j]);
        if (s == MOE_OK) s = moe_layer_forward(list->children[j], ctx, tape, ins[j], &parts[j]);
        if (s == MOE_OK && (parts[j]->ndim != 2 || parts[j]->shape[0] != len || parts[j]->shape[1] != st->cfg.hidden)) {
            char b[96];
            s = moe_error(MOE_ERR_SHAPE, "expert %d returned shape %s, expected [%lld, %lld]", j + 1,
                          moe_shape_str(parts[j], b, sizeof b), (long long)len, (long long)st->cfg.hidden);
        }
        if (s == MOE_OK && used < 512) kept[used++] = parts[j];
    }
    if (s == MOE_OK && used > 0) s = moe_f_cat_rows(ctx, tape, kept, used, st->cfg.hidden, xp->dtype, xp->device, yp);
    if (s == MOE_OK && used == 0) {
        int64_t shape[2] = {0, st->cfg.hidden};
        *yp = moe_tensor_new(ctx, xp->dtype, 2, shape, xp->device);
        if (!*yp) s = moe_last_status();
    }
    for (int j = 0; j < n; j++) { moe_tensor_release(parts[j]); moe_tensor_release(ins[j]); }
    free(parts); free(ins);
    return s;
}

/* residual (NULL: none): y = residual + block(x), added in the combine's pass
 * on the plain path (one process, no shared experts), else by a taped add */
static moe_status block_forward_impl(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                     moe_tensor **y) {
    block_state *st = l->state;
    const moe_block_cfg *c = &st->cfg;
    if (x->ndim < 1 || x->shape[x->ndim - 1] != c->hidden) {
        char b[96];
        return moe_error(MOE_ERR_SHAPE, "input has shape %s, expected last dim %lld", moe_shape_str(x, b, sizeof b),
                         (long long)c->hidden);
    }
    if (!st->custom && !st->ep_comm && moe_expert_bank_is_sharded(l->children[st->c_experts])) {
        int64_t first, count, total;
        moe_expert_bank_range(l->children[st->c_experts], &first, &count, &total);
        return moe_error(MOE_ERR_STATE, "MoE: this rank holds only experts [%lld, %lld) of %lld (sharded under expert "
                         "parallelism by DistributedMoETrainer), so the layer cannot run in one process; use "
                         "trainer:train / trainer:evaluate (every rank), call trainer:gather_experts() on every rank "
                         "to restore the full experts, or save_checkpoint and moe.load it in one process",
                         (long long)first, (long long)(first + count), (long long)total);
    }
    if (residual && (!moe_tensor_same_shape(residual, x) || residual->dtype != x->dtype)) {
        char a[96], b[96];
        return moe_error(MOE_ERR_SHAPE, "the residual is %s %s, expected the input's %s %s", moe_dtype_name(residual->dtype),
                         moe_shape_str(residual, a, sizeof a), moe_dtype_name(x->dtype), moe_shape_str(x, b, sizeof b));
    }
    int64_t seq_len = x->ndim >= 3 ? x->shape[x->ndim - 2] : 0;
    /* [tokens, H] rows, linked to x on the tape so its gradient reaches x */
    int64_t rows_shape[2] = {moe_tensor_numel(x) / c->hidden, c->hidden};
    moe_tensor *xr = NULL;
    MOE_TRY(moe_f_view(ctx, tape, x, 2, rows_shape, &xr));
    int64_t n = xr->shape[0];
    uint64_t call = st->calls++;
    /* expert parallel by all_gather: every rank's tokens travel while this rank routes its own */
    int gather = 0;
    moe_tensor *xa = NULL;
    moe_status sg0 = moe_block_ep_gather_wanted(st, l->training, n, &gather);
    if (sg0 == MOE_OK && gather) sg0 = moe_f_ep_gather(ctx, tape, st->ep_comm, xr, &xa);
    if (sg0 != MOE_OK) {
        moe_tensor_release(xr);
        return sg0;
    }
    moe_tensor *rin = NULL, *noise = NULL, *logits = NULL, *nlog = NULL, *xp = NULL, *yp = NULL, *yr = NULL;
    moe_tensor *sh = NULL, *sum = NULL, *sg = NULL, *sgs = NULL, *shg = NULL;
    moe_tensor *xb = NULL, *rsrc = NULL, *res_rows = NULL, *withres = NULL;
    moe_status s = MOE_OK;

    /* the router's input: the tokens, plus the router-input bias when one is set (taped: it gets gradients) */
    if (st->router_bias) {
        s = moe_f_binary(ctx, tape, MOE_BIN_ADD, x, st->router_bias, &xb);
        if (s == MOE_OK && !moe_tensor_same_shape(xb, x)) {
            char a[96], b[96];
            s = moe_error(MOE_ERR_SHAPE, "router input bias of shape %s does not broadcast to the input %s",
                          moe_shape_str(st->router_bias, a, sizeof a), moe_shape_str(x, b, sizeof b));
        }
        if (s == MOE_OK) s = moe_f_view(ctx, tape, xb, 2, rows_shape, &rsrc);
    } else {
        rsrc = xr;
        moe_tensor_retain(rsrc);
    }
    /* Switch jitter: a fresh multiplicative noise tensor per call, from (seed, call) */
    if (s != MOE_OK) {
        /* nothing */
    } else if (l->training && c->jitter > 0) {
        noise = moe_tensor_like(ctx, rsrc);
        uint64_t key = moe_rng_key(c->seed, MOE_RNG_JITTER);
        s = noise ? moe_op_fill_rand(ctx, noise, key, call * (uint64_t)moe_tensor_numel(xr), 1.0f - c->jitter, 1.0f + c->jitter)
                  : moe_last_status();
        if (s == MOE_OK) s = moe_f_binary(ctx, tape, MOE_BIN_MUL, rsrc, noise, &rin);
    } else {
        rin = rsrc;
        moe_tensor_retain(rin);
    }
    if (s == MOE_OK) s = moe_layer_forward(l->children[st->c_gate], ctx, tape, rin, &logits);
    if (s == MOE_OK && st->c_noise >= 0 && l->training)
        s = moe_layer_forward(l->children[st->c_noise], ctx, tape, rsrc, &nlog);
    moe_routing r;
    memset(&r, 0, sizeof r);
    /* token or gathered rows under expert parallelism: their counts ride the device routing's wait */
    moe_router_cfg rcfg = c->router;
    ep_hook hk = {st->ep_comm, gather ? n : 0, NULL};
    moe_route_hook hook = {0};
    int tokens = 0;
    if (s == MOE_OK && !st->custom && st->ep_comm) s = moe_block_ep_moves_tokens(NULL, st->ep_comm, &tokens);
    /* The experts' rows [N*k, hidden] (537 MB over the 8-layer step in
     * bf16) need not be kept on the tape: the experts' entry can take the token
     * rows instead. A SwiGLU bank's GEMMs then gather the rows in their loads
     * (forward and weight gradient, no dispatch at all; on an H100 the step is
     * as fast as with kept rows); other banks, or GEMMs the own kernel does not
     * serve, gather them again in the backward, once or twice a layer.
     * moe_block_set_keep_rows: 1 keeps them, 0 never does, -1 (the default)
     * takes the token rows only where the GEMMs gather (a bf16 SwiGLU bank on
     * a GPU whose kernel serves these row counts: decided after the routing). */
    const moe_layer *bank0 = st->custom ? NULL : l->children[st->c_experts];
    const int bank_gathers = bank0 && moe_expert_bank_gathers(bank0);
    const int token_rows = tape && !st->custom && !st->ep_comm && st->keep_rows != 1 &&
                           (st->keep_rows == 0 ||
                            (bank_gathers && xr->device.type == MOE_CUDA && xr->dtype == MOE_BF16));
    /* and a SwiGLU bank may gather them in its GEMMs' loads: no dispatch queued early */
    const int gemm_gathers = token_rows && bank_gathers;
    dispatch_hook dk = {token_rows ? NULL : tape, xr, NULL};
    if (tokens || gather) {
        hook.extra = (c->router.num_experts + st->ep_comm->size) * (st->ep_comm->size + 1);
        hook.queue = moe_block_ep_hook_queue;
        hook.arg = &hk;
        rcfg.hook = &hook;
    } else if (s == MOE_OK && !st->ep_comm && c->router.selection == MOE_SELECT_TOPK &&
               !(c->router.capacity_factor > 0) && !gemm_gathers) {
        /* nothing drops, so every one of the N*k slots is kept: the dispatch may run before the wait */
        hook.extra = 0;
        hook.queue = dispatch_queue;
        hook.arg = &dk;
        rcfg.hook = &hook;
    }
    /* With MOELAB_ROUTE_DEFER=1 the routing does not wait for the device where
     * every GEMM of this forward and its backward can read the offsets there:
     * the SwiGLU bank's gathered GEMMs with the combine folded in, where
     * nothing drops (the N k rows then stay the same, only their split
     * changes), the groundwork of capturing the step in a CUDA graph. The
     * decisions below are the ones made after the routing, for N k rows spread
     * over every expert; should they come out otherwise, the summary is read
     * then. Off by default: on an H200 the step ran 2-3% slower with it (the
     * kernels as fast, but a plan kernel before each of the 32 own-kernel
     * calls, and the 8 waits it saves were cheap; bench/RESULTS.md). */
    const int64_t nk = n * c->router.top_k;
    const char *dv = getenv("MOELAB_ROUTE_DEFER");
    rcfg.defer_summary = (st->defer_route || (dv && strcmp(dv, "1") == 0)) && !rcfg.hook && gemm_gathers && !c->aux_free &&
                         c->router.selection == MOE_SELECT_TOPK && !(c->router.capacity_factor > 0) &&
                         logits && logits->dtype == xr->dtype &&
                         moe_op_gemm_grouped_rows_fuses(ctx, xr->device, xr->dtype, c->hidden,
                                                        moe_expert_bank_inner(bank0), nk, NULL,
                                                        (int)c->router.num_experts) &&
                         moe_op_gemm_grouped_swiglu_backward_w_fuses(ctx, xr->device, xr->dtype, c->hidden,
                                                                     moe_expert_bank_inner(bank0), nk, NULL,
                                                                     (int)c->router.num_experts);
    if (s == MOE_OK)
        s = moe_route(ctx, tape, &rcfg, logits, nlog, c->aux_free ? moe_f32(st->bias) : NULL, l->training,
                      moe_rng_key(c->seed, MOE_RNG_JITTER) ^ 0x9e3779b97f4a7c15ull,
                      call * (uint64_t)(n * c->router.num_experts), seq_len, &r);
    if (s == MOE_OK && tokens) s = moe_block_ep_moves_tokens(&r, st->ep_comm, &tokens);
    if (s == MOE_OK && gather && !r.slots) s = moe_error(MOE_ERR_INTERNAL, "expert parallel: the routing has no slot map");
    if (s == MOE_OK && residual) s = moe_f_view(ctx, tape, residual, 2, rows_shape, &res_rows);
    if (s == MOE_OK && gather) {
        s = moe_block_ep_gather_experts(l, ctx, tape, xa, &r, &hook, n, &yr);
    } else if (s == MOE_OK && tokens) {
        s = moe_block_ep_token_experts(l, ctx, tape, xr, &r, &hook, hk.tslots, &yr);
    } else {
        /* token rows need the slot map (top-k routing has one; expert choice does
         * not, and MOELAB_MOE_GATHER=0 refuses it); by default also GEMMs that
         * gather in their loads at these row counts */
        const int64_t na = r.token_idx ? r.token_idx->shape[0] : 0;
        int tok_rows =
            token_rows && moe_dispatch_slots_usable(r.slots, n) &&
            (st->keep_rows == 0 || moe_op_gemm_grouped_rows_fuses(ctx, xr->device, xr->dtype, c->hidden,
                                                                 moe_expert_bank_inner(bank0), na, r.offsets,
                                                                 (int)c->router.num_experts));
        /* The combine folds into a SwiGLU bank (its backward gets the weights'
         * gradient from the down projection's, the experts' outputs [N k, H]
         * not kept) where the backend runs that backward without the parts'
         * extra passes: on a GPU the own kernel in one pass, or the plain
         * GEMM and one row pass (the TMA kernel's shapes); on the CPU (exact
         * f32 arithmetic) where the GEMMs gather the rows. Where they cannot
         * gather them, the bank keeps the dispatched rows (keep_rows) and
         * takes the combine all the same: on a GPU by default, on the CPU
         * with MOELAB_MOE_FOLD=1; MOELAB_MOE_FOLD=0 never folds kept rows
         * (the A/B of bench/RESULTS.md). */
        const int foldable = gemm_gathers && moe_dispatch_slots_usable(r.slots, n) && r.weights &&
                             r.weights->dtype == xr->dtype &&
                             (xr->device.type == MOE_CPU ||
                              moe_op_gemm_grouped_swiglu_backward_w_fuses(ctx, xr->device, xr->dtype, c->hidden,
                                                                          moe_expert_bank_inner(bank0), na, r.offsets,
                                                                          (int)c->router.num_experts));
        const char *fe = getenv("MOELAB_MOE_FOLD");
        const int fold_env = !fe || !*fe ? -1 : !strcmp(fe, "0") ? 0 : !strcmp(fe, "1") ? 1 : -2;
        if (s == MOE_OK && fold_env == -2)
            s = moe_error(MOE_ERR_ARG, "MOELAB_MOE_FOLD=%s: expected 0, 1 or unset", fe);
        const int fold_kept = foldable && (fold_env == 1 || (fold_env == -1 && !tok_rows && xr->device.type != MOE_CPU));
        if (fold_kept) tok_rows = 0;
        const int fold = foldable && (tok_rows || fold_kept);
        const int from_hook = s == MOE_OK && dk.xp;
        if (from_hook) { xp = dk.xp; dk.xp = NULL; }   /* queued before the routing's wait */
        else if (s == MOE_OK && !(gemm_gathers && tok_rows))
            s = moe_f_dispatch(ctx, tok_rows || fold_kept ? NULL : tape, xr, r.token_idx, r.slots, &xp);
        if (from_hook && token_rows && !tok_rows && !fold_kept) {
            /* the hook's untaped rows, but the slot map is refused: a taped dispatch after all */
            moe_tensor_release(xp);
            xp = NULL;
            s = moe_f_dispatch(ctx, tape, xr, r.token_idx, r.slots, &xp);
        }
        /* offsets left on the device serve that path only */
        if (s == MOE_OK && r.summary_dev && !(gemm_gathers && tok_rows && fold)) s = moe_routing_fetch(ctx, &r);
        /* the residual joins in the combine's pass unless shared experts still add to yr */
        moe_tensor *res_here = st->c_shared < 0 ? res_rows : NULL;
        moe_bank_tokens bt = {xr, r.token_idx, r.slots, fold ? r.weights : NULL, fold ? res_here : NULL, fold_kept};
        if (s == MOE_OK) {
            s = st->custom ? custom_experts(l, ctx, tape, xp, r.offsets, &yp)
              : st->ep_comm ? moe_block_ep_experts(l, ctx, tape, xp, r.offsets, &yp)
              : tok_rows || fold_kept
                  ? moe_expert_bank_forward_tokens(l->children[st->c_experts], ctx, tape, xp, &bt, r.offsets,
                                                   r.summary_dev ? r.offsets_dev : NULL, (int)c->router.num_experts, &yp)
                  : moe_expert_bank_forward(l->children[st->c_experts], ctx, tape, xp, r.offsets,
                                            (int)c->router.num_experts, &yp);
        }
        if (s == MOE_OK && fold) { yr = yp; yp = NULL; }
        else if (s == MOE_OK) s = moe_f_combine_add(ctx, tape, yp, r.weights, r.token_idx, r.slots, n, res_here, &yr);
        if (s == MOE_OK && res_here) { moe_tensor_release(res_rows); res_rows = NULL; }
    }
    if (s == MOE_OK && st->c_shared >= 0) {
        s = moe_layer_forward(l->children[st->c_shared], ctx, tape, xr, &sh);
        if (s == MOE_OK && st->c_shared_gate >= 0) {
            /* Qwen2-MoE: the shared expert's output scaled per token by sigmoid(x . w_g) */
            s = moe_layer_forward(l->children[st->c_shared_gate], ctx, tape, xr, &sg);
            if (s == MOE_OK) s = moe_f_unary(ctx, tape, MOE_UN_SIGMOID, sg, 0.0f, &sgs);
            if (s == MOE_OK) s = moe_f_binary(ctx, tape, MOE_BIN_MUL, sh, sgs, &shg);
            if (s == MOE_OK) { moe_tensor_release(sh); sh = shg; shg = NULL; }
        }
        if (s == MOE_OK) s = moe_f_binary(ctx, tape, MOE_BIN_ADD, yr, sh, &sum);
        if (s == MOE_OK) { moe_tensor_release(yr); yr = sum; sum = NULL; }
    }
    if (s == MOE_OK && res_rows) {
        s = moe_f_binary(ctx, tape, MOE_BIN_ADD, res_rows, yr, &withres);
        if (s == MOE_OK) { moe_tensor_release(yr); yr = withres; withres = NULL; }
    }
    if (s == MOE_OK) s = moe_f_view(ctx, tape, yr, x->ndim, x->shape, y);
    if (s == MOE_OK) {
        moe_routing_clear(&st->last);
        st->last = r;
        moe_tensor_release(st->last_logits);
        st->last_logits = logits;
        logits = NULL;
    } else {
        moe_routing_clear(&r);
    }
    free(hook.host);
    moe_tensor_release(hk.tslots);
    if (xa && s != MOE_OK) moe_comm_join_queued(st->ep_comm, xa->device);   /* the gather may still be writing xa */
    moe_tensor_release(xa);
    moe_tensor_release(xr); moe_tensor_release(noise); moe_tensor_release(rin);
    moe_tensor_release(xb); moe_tensor_release(rsrc);
    moe_tensor_release(logits); moe_tensor_release(nlog); moe_tensor_release(xp); moe_tensor_release(dk.xp); moe_tensor_release(yp);
    moe_tensor_release(yr); moe_tensor_release(sh); moe_tensor_release(sum);
    moe_tensor_release(sg); moe_tensor_release(sgs); moe_tensor_release(shg);
    moe_tensor_release(res_rows); moe_tensor_release(withres);
    return s;
}

static moe_status block_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return block_forward_impl(l, ctx, tape, x, NULL, y);
}

static moe_status block_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x,
                                         moe_tensor *residual, moe_tensor **y) {
    return block_forward_impl(l, ctx, tape, x, residual, y);
}

static const char *selection_name(moe_selection s) {
    switch (s) {
    case MOE_SELECT_TOPK: return "topk";
    case MOE_SELECT_NOISY_TOPK: return "noisy_topk";
    case MOE_SELECT_EXPERT_CHOICE: return "expert_choice";
    default: return "sinkhorn";
    }
}

static void block_describe(const moe_layer *l, char *buf, size_t n) {
    const block_state *st = l->state;
    const moe_block_cfg *c = &st->cfg;
    snprintf(buf, n, "MoE(%lld experts, top-%lld, %s, %s%s%s, hidden %lld, expert %lld%s)",
             (long long)c->router.num_experts, (long long)c->router.top_k, selection_name(c->router.selection),
             c->router.score == MOE_SCORE_SIGMOID ? "sigmoid" : "softmax", c->router.renormalize ? ", renormalized" : "",
             c->aux_free ? ", aux-free bias" : "", (long long)c->hidden, (long long)c->expert_inner,
             st->custom ? ", custom experts" : "");
}

static void block_destroy(moe_layer *l) {
    block_state *st = l->state;
    if (!st) return;
    moe_routing_clear(&st->last);
    moe_tensor_release(st->bias);
    moe_tensor_release(st->last_logits);
    moe_tensor_release(st->router_bias);
    moe_tensor_release(st->ep_tmap);
    free(st);
}

static const moe_layer_vtable block_vt = {"MoE", block_forward, block_describe, block_destroy, block_forward_residual};

moe_layer *moe_block_new(moe_ctx *ctx, const moe_block_cfg *cfg, moe_layer **experts, moe_init *init) {
    moe_block_cfg c = *cfg;
    c.router.hook = NULL;   /* set per forward (expert parallelism) */
    if (moe_router_cfg_check(&c.router) != MOE_OK) return NULL;
    if (c.hidden <= 0 || (!experts && c.expert_inner <= 0)) {
        moe_error(MOE_ERR_ARG, "MoE: hidden_size and expert intermediate size must be positive, got %lld and %lld",
                  (long long)c.hidden, (long long)c.expert_inner);
        return NULL;
    }
    if (c.jitter < 0 || c.jitter >= 1) { moe_error(MOE_ERR_ARG, "MoE: jitter_noise must be in [0, 1), got %g", c.jitter); return NULL; }
    if (c.shared_experts < 0) { moe_error(MOE_ERR_ARG, "MoE: num_shared_experts must be >= 0"); return NULL; }
    if (c.aux_free && c.aux_free_rate <= 0) c.aux_free_rate = 1e-3f;
    int64_t e = c.router.num_experts;
    int noisy = c.router.selection == MOE_SELECT_NOISY_TOPK;
    if (c.shared_gate && c.shared_experts <= 0) {
        moe_error(MOE_ERR_ARG, "MoE: shared_expert_gate needs a shared expert (num_shared_experts > 0)");
        return NULL;
    }
    int nkids = 2 + noisy + (c.shared_experts > 0) + (c.shared_experts > 0 && c.shared_gate);
    moe_layer *l = moe_layer_alloc(&block_vt, 0, nkids);
    block_state *st = l ? calloc(1, sizeof *st) : NULL;
    if (!st) { moe_layer_release(l); if (l) moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    l->state = st;
    st->cfg = c;
    st->custom = experts != NULL;
    st->c_noise = st->c_shared = st->c_shared_gate = -1;
    st->keep_rows = -1;
    moe_status s = MOE_OK;
    int idx = 0;
    /* router: a bias-free linear map to one logit per expert (named as in HF checkpoints) */
    moe_layer *gate = moe_linear_new(ctx, c.hidden, e, 0, init);
    if (!gate) s = moe_last_status();
    else { st->c_gate = idx; moe_layer_set_child(l, idx++, "gate", gate); moe_layer_release(gate); }
    if (s == MOE_OK && noisy) {
        moe_layer *nz = moe_linear_new(ctx, c.hidden, e, 0, init);
        if (!nz) s = moe_last_status();
        else { st->c_noise = idx; moe_layer_set_child(l, idx++, "noise", nz); moe_layer_release(nz); }
    }
    if (s == MOE_OK) {
        moe_layer *ex;
        if (experts) ex = moe_module_list_new(ctx, experts, NULL, (int)e);
        else ex = moe_expert_bank_new(ctx, e, c.hidden, c.expert_inner, c.activation, init);
        if (!ex) s = moe_last_status();
        else { st->c_experts = idx; moe_layer_set_child(l, idx++, "experts", ex); moe_layer_release(ex); }
    }
    if (s == MOE_OK && c.shared_experts > 0) {
        int64_t inner = c.shared_inner > 0 ? c.shared_inner : c.expert_inner * c.shared_experts;
        moe_layer *sh = moe_ffn_new(ctx, c.hidden, inner, c.activation, 0, init);
        if (!sh) s = moe_last_status();
        else { st->c_shared = idx; moe_layer_set_child(l, idx++, "shared_expert", sh); moe_layer_release(sh); }
    }
    if (s == MOE_OK && c.shared_experts > 0 && c.shared_gate) {
        moe_layer *g = moe_linear_new(ctx, c.hidden, 1, 0, init);
        if (!g) s = moe_last_status();
        else { st->c_shared_gate = idx; moe_layer_set_child(l, idx++, "shared_expert_gate", g); moe_layer_release(g); }
    }
    if (s == MOE_OK) {
        int64_t bs[1] = {e};
        st->bias = moe_tensor_new_cpu(MOE_F32, 1, bs);
        if (!st->bias) s = moe_last_status();
        else {
            moe_tensor_fill_cpu(st->bias, 0.0);
            if (c.aux_free) s = moe_layer_add_buffer(l, "expert_bias", st->bias);
        }
    }
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
