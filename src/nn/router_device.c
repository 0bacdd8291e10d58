/* The device path of moe_route: top-k selection on a CUDA device
 * (src/ops/cuda/cuda_route.cu does the work). Forward queues the kernels and
 * waits once, for one small copy that brings back the offsets and the
 * statistics; backward queues one kernel and never waits: the upstream
 * gradients of the aux and z losses are read by the kernel from device
 * memory. Everything backward needs stays on the device, owned by the tape
 * entry. Results match the host path (router.c) exactly: assignment order,
 * ties, capacity, offsets, counts; weights to f32 rounding. */
#include "router.h"
#include "../ops/cuda/moe_cuda_route.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* What backward needs, on the device; owned by the tape entry. */
typedef struct {
    moe_router_cfg cfg;
    int64_t n, e, k, seq_len, groups;
    moe_tensor *s, *pn, *zsm, *lse, *f, *chosen, *pos;
} dev_saved;

static void dev_saved_free(void *p) {
    dev_saved *r = p;
    if (!r) return;
    moe_tensor *all[] = {r->s, r->pn, r->zsm, r->lse, r->f, r->chosen, r->pos};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    free(r);
}

int moe_route_device_supported(const moe_router_cfg *cfg, const moe_tensor *logits) {
    if (logits->device.type != MOE_CUDA || cfg->selection != MOE_SELECT_TOPK) return 0;
    if (logits->dtype != MOE_F32 && logits->dtype != MOE_BF16) return 0;
    int64_t n = logits->shape[0];
    return n > 0 && cfg->num_experts <= MOE_CUDA_ROUTE_MAX_E && n * cfg->top_k <= INT32_MAX;
}

static int aux_code(moe_aux_kind a) {
    return a == MOE_AUX_SEQUENCE ? MOE_CUDA_ROUTE_AUX_SEQUENCE
         : a == MOE_AUX_BATCH    ? MOE_CUDA_ROUTE_AUX_BATCH
                                 : MOE_CUDA_ROUTE_AUX_NONE;
}

static float scale_of(const moe_router_cfg *c) { return c->routed_scaling > 0 ? c->routed_scaling : 1.0f; }

/* t as a contiguous tensor of dtype dt on dev: t itself (a new reference) when it already is one */
static moe_tensor *as_device(moe_ctx *ctx, moe_tensor *t, moe_device dev, moe_dtype dt) {
    if (moe_device_eq(t->device, dev) && t->dtype == dt && moe_tensor_is_contiguous(t)) {
        moe_tensor_retain(t);
        return t;
    }
    return moe_op_to(ctx, t, dev, dt);
}

/* an upstream scalar gradient: f32 or bf16 on dev as it comes, anything else as f32 */
static moe_tensor *scalar_on(moe_ctx *ctx, moe_tensor *g, moe_device dev) {
    moe_dtype dt = g->dtype == MOE_BF16 ? MOE_BF16 : MOE_F32;
    return as_device(ctx, g, dev, dt);
}

static moe_status route_backward_device(moe_ctx *ctx, moe_tape_entry *ent, moe_tensor *const *gout,
                                        moe_tensor **gin) {
    dev_saved *r = ent->self;
    moe_tensor *lg = ent->in[0];
    const moe_device dev = lg->device;
    moe_tensor *dw = NULL, *da = NULL, *dz = NULL, *dl = NULL;
    moe_status st = MOE_OK;
    if (gout[0] && moe_tensor_numel(gout[0]) > 0 && !(dw = as_device(ctx, gout[0], dev, lg->dtype))) st = moe_last_status();
    if (st == MOE_OK && gout[1] && r->cfg.aux != MOE_AUX_NONE && !(da = scalar_on(ctx, gout[1], dev)))
        st = moe_last_status();
    if (st == MOE_OK && gout[2] && !(dz = scalar_on(ctx, gout[2], dev))) st = moe_last_status();
    int64_t shape[2] = {r->n, r->e};
    if (st == MOE_OK && !(dl = moe_tensor_new(ctx, lg->dtype, 2, shape, dev))) st = moe_last_status();
    if (st == MOE_OK) {
        moe_cuda_route_bwd b;
        memset(&b, 0, sizeof b);
        b.n = r->n; b.e = r->e; b.k = r->k; b.seq_len = r->seq_len; b.groups = r->groups;
        b.softmax = r->cfg.score == MOE_SCORE_SOFTMAX;
        b.renormalize = r->cfg.renormalize;
        b.aux = aux_code(r->cfg.aux);
        b.bf16 = lg->dtype == MOE_BF16;
        b.scale = scale_of(&r->cfg);
        b.s = moe_f32(r->s);
        b.pn = r->pn ? moe_f32(r->pn) : NULL;
        b.zsm = r->zsm ? moe_f32(r->zsm) : NULL;
        b.lse = moe_f32(r->lse);
        b.f = r->f ? moe_f32(r->f) : NULL;
        b.chosen = moe_tensor_data(r->chosen);
        b.pos = moe_tensor_data(r->pos);
        b.dweights = dw ? moe_tensor_data(dw) : NULL;
        b.daux = da ? moe_tensor_data(da) : NULL;
        b.dz = dz ? moe_tensor_data(dz) : NULL;
        b.daux_bf16 = da && da->dtype == MOE_BF16;
        b.dz_bf16 = dz && dz->dtype == MOE_BF16;
        b.dlogits = moe_tensor_data(dl);
        st = moe_cuda_route_backward(ctx, dev, &b);
    }
    moe_tensor_release(dw); moe_tensor_release(da); moe_tensor_release(dz);
    if (st != MOE_OK) { moe_tensor_release(dl); return st; }
    gin[0] = dl;
    return MOE_OK;
}

static double slot_double(const int64_t *p) {
    double v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* offsets, counts and statistics from the device summary (moe_cuda.h
 * MOE_CUDA_ROUTE_SUMMARY); aux: the global aux where it was reduced across
 * ranks, else NAN for the summary's own */
static moe_status fill_from_summary(moe_routing *out, const int64_t *summary, int64_t n, double aux) {
    const int64_t e = out->num_experts;
    int64_t *offsets = malloc((size_t)(e + 1) * sizeof *offsets), *counts = malloc((size_t)e * sizeof *counts);
    if (!offsets || !counts) {
        free(offsets); free(counts);
        return moe_error(MOE_ERR_OOM, "router: out of host memory");
    }
    memcpy(offsets, summary, (size_t)(e + 1) * sizeof *offsets);
    memcpy(counts, summary + e + 1, (size_t)e * sizeof *counts);
    free(out->offsets);
    free(out->stats.counts);
    out->offsets = offsets;
    out->stats = (moe_route_stats){n, summary[e], summary[2 * e + 1], counts,
                                   slot_double(summary + 2 * e + 2) / (double)n,
                                   slot_double(summary + 2 * e + 3) / (double)n,
                                   slot_double(summary + 2 * e + 4) / (double)n,
                                   isnan(aux) ? slot_double(summary + 2 * e + 5) : aux};
    return MOE_OK;
}

moe_status moe_routing_fetch(moe_ctx *ctx, moe_routing *r) {
    if (!r || !r->summary_dev) return MOE_OK;
    moe_tensor *back = moe_op_to(ctx, r->summary_dev, MOE_DEVICE_CPU, MOE_I64);
    if (!back) return moe_error_context(moe_last_status(), "router: reading the routing's summary");
    moe_status st = fill_from_summary(r, moe_tensor_data(back), r->stats.tokens, NAN);
    moe_tensor_release(back);
    if (st == MOE_OK) {
        moe_tensor_release(r->summary_dev);
        r->summary_dev = NULL;
    }
    return st;
}

moe_status moe_routing_stats_from_summary(const moe_tensor *summary, int64_t e, int64_t n, moe_route_stats *out) {
    memset(out, 0, sizeof *out);
    if (!summary || summary->device.type != MOE_CPU || summary->dtype != MOE_I64 ||
        !moe_tensor_is_contiguous(summary) || moe_tensor_numel(summary) != MOE_CUDA_ROUTE_SUMMARY(e))
        return moe_error(MOE_ERR_ARG, "routing statistics: the summary must be a contiguous i64 cpu tensor of %lld "
                         "elements (the device summary of a routing over %lld experts)",
                         (long long)MOE_CUDA_ROUTE_SUMMARY(e), (long long)e);
    if (n < 1) return moe_error(MOE_ERR_ARG, "routing statistics: tokens must be >= 1, got %lld", (long long)n);
    moe_routing r = {.num_experts = e};
    moe_status st = fill_from_summary(&r, moe_tensor_data((moe_tensor *)summary), n, NAN);
    if (st == MOE_OK) {
        *out = r.stats;
        r.stats.counts = NULL;
    }
    moe_routing_clear(&r);
    return st;
}

/* The batch aux over cfg->aux_comm's ranks: this rank's f (device) and mean
 * scores come to the host, are averaged over the ranks, and the global f goes
 * back (backward reads it) with aux written into its tensor. Optional mode:
 * it adds a device sync and a collective per MoE layer. */
static moe_status global_aux_device(moe_ctx *ctx, struct moe_comm *comm, dev_saved *r, moe_tensor *aux_t, double *aux) {
    const int64_t e = r->e;
    int64_t s_e[1] = {e};
    moe_tensor *pm_d = moe_tensor_new(ctx, MOE_F32, 1, s_e, r->s->device);
    moe_status st = pm_d ? moe_op_reduce(ctx, MOE_RED_MEAN, pm_d, r->pn ? r->pn : r->s, 0) : moe_last_status();
    moe_tensor *pm_h = st == MOE_OK ? moe_op_to(ctx, pm_d, MOE_DEVICE_CPU, MOE_F32) : NULL;
    moe_tensor *f_h = st == MOE_OK ? moe_op_to(ctx, r->f, MOE_DEVICE_CPU, MOE_F32) : NULL;
    double *pm = calloc((size_t)e + 1, sizeof *pm);
    if (st == MOE_OK && (!pm_h || !f_h)) st = moe_last_status();
    if (st == MOE_OK && !pm) st = moe_error(MOE_ERR_OOM, "router: out of host memory");
    if (st == MOE_OK) {
        for (int64_t j = 0; j < e; j++) pm[j] = moe_f32(pm_h)[j];
        st = moe_route_global_aux(comm, moe_f32(f_h), pm, e, aux);
    }
    if (st == MOE_OK) st = moe_op_copy(ctx, r->f, f_h);
    if (st == MOE_OK) st = moe_op_fill(ctx, aux_t, *aux);
    free(pm);
    moe_tensor_release(pm_d); moe_tensor_release(pm_h); moe_tensor_release(f_h);
    return st;
}

/* The hook's work, queued behind the routing kernels (whose summary is in
 * sdev), then the one wait: the summary and the hook's results to the host. */
static moe_status run_hook(moe_ctx *ctx, moe_route_hook *h, moe_tensor *sdev, int64_t e, int64_t n, int64_t slots_bound,
                           moe_tensor *pos, moe_tensor *ex, moe_tensor *tok, int64_t *summary) {
    const int64_t ns = MOE_CUDA_ROUTE_SUMMARY(e);
    /* before the wait only these bounds are known (A <= N*k) */
    moe_tensor_set_index_bound(pos, slots_bound);
    moe_tensor_set_index_bound(tok, n);
    moe_tensor *kept = moe_tensor_narrow(sdev, 0, e + 1, e), *out = moe_tensor_narrow(sdev, 0, ns, h->extra), *back = NULL;
    h->token_idx = tok;
    moe_status st = kept && out ? h->queue(h, ctx, pos, ex, kept, out) : moe_last_status();
    h->token_idx = NULL;
    if (st == MOE_OK) back = moe_op_to(ctx, sdev, MOE_DEVICE_CPU, MOE_I64);
    if (st == MOE_OK && !back) st = moe_last_status();
    if (st == MOE_OK) {
        const int64_t *b = moe_tensor_data(back);
        memcpy(summary, b, (size_t)ns * sizeof *summary);
        st = moe_route_hook_deliver(h, b + ns);
    }
    moe_tensor_release(kept); moe_tensor_release(out); moe_tensor_release(back);
    return st;
}

moe_status moe_route_device(moe_ctx *ctx, moe_tape *tape, const moe_router_cfg *cfg, moe_tensor *logits,
                            const float *bias, int64_t seq_len, moe_routing *out) {
    memset(out, 0, sizeof *out);
    const int64_t n = logits->shape[0], e = cfg->num_experts, k = cfg->top_k;
    const moe_device dev = logits->device;
    const int sigmoid = cfg->score != MOE_SCORE_SOFTMAX, seq = cfg->aux == MOE_AUX_SEQUENCE;
    if (seq_len <= 0 || n % seq_len) seq_len = n;
    int64_t groups = seq ? n / seq_len : 1;
    if (groups < 1) groups = 1;
    int64_t cap = cfg->capacity_factor > 0
                      ? (int64_t)ceil((double)cfg->capacity_factor * (double)k * (double)n / (double)e) : 0;

    /* the summary stays on the device: nothing can drop, so the N k slots are all kept */
    const int defer = cfg->defer_summary && cap == 0 && !cfg->hook && !cfg->aux_comm;
    dev_saved *r = calloc(1, sizeof *r);
    int64_t *summary = malloc((size_t)MOE_CUDA_ROUTE_SUMMARY(e) * sizeof *summary);
    if (!r || !summary) {
        free(r); free(summary);
        return moe_error(MOE_ERR_OOM, "router: out of host memory");
    }
    r->cfg = *cfg;
    r->n = n; r->e = e; r->k = k; r->seq_len = seq_len; r->groups = groups;
    int64_t s_ne[2] = {n, e}, s_nk[2] = {n, k}, s_a[1] = {n * k}, s_n[1] = {n}, s_f[1] = {groups * e};
    moe_tensor *lc = moe_op_contiguous(ctx, logits), *sdev = NULL;
    int64_t plan_bytes = 0, plan_at = 0;   /* deferred: the GEMMs' shared plan, bytes past the offsets */
    moe_tensor *tok = moe_tensor_new(ctx, MOE_I64, 1, s_a, dev), *ex = moe_tensor_new(ctx, MOE_I64, 1, s_a, dev);
    moe_tensor *w = moe_tensor_new(ctx, logits->dtype, 1, s_a, dev);
    moe_tensor *aux_t = moe_tensor_new(ctx, MOE_F32, 0, NULL, dev), *z_t = moe_tensor_new(ctx, MOE_F32, 0, NULL, dev);
    r->s = moe_tensor_new(ctx, MOE_F32, 2, s_ne, dev);
    r->lse = moe_tensor_new(ctx, MOE_F32, 1, s_n, dev);
    if (sigmoid) {
        r->pn = moe_tensor_new(ctx, MOE_F32, 2, s_ne, dev);
        r->zsm = moe_tensor_new(ctx, MOE_F32, 2, s_ne, dev);
    }
    if (cfg->aux != MOE_AUX_NONE) r->f = moe_tensor_new(ctx, MOE_F32, 1, s_f, dev);
    r->chosen = moe_tensor_new(ctx, MOE_I32, 2, s_nk, dev);
    r->pos = moe_tensor_new(ctx, MOE_I32, 2, s_nk, dev);
    moe_status st = MOE_OK;
    if (!lc || !tok || !ex || !w || !aux_t || !z_t || !r->s || !r->lse || (sigmoid && (!r->pn || !r->zsm)) ||
        (cfg->aux != MOE_AUX_NONE && !r->f) || !r->chosen || !r->pos)
        st = moe_last_status() != MOE_OK ? moe_last_status() : MOE_ERR_OOM;
    if (st == MOE_OK) {
        moe_cuda_route_fwd a;
        memset(&a, 0, sizeof a);
        a.n = n; a.e = e; a.k = k; a.seq_len = seq_len; a.groups = groups; a.capacity = cap;
        a.softmax = !sigmoid;
        a.renormalize = cfg->renormalize;
        a.scale = scale_of(cfg);
        a.aux = aux_code(cfg->aux);
        a.bf16 = logits->dtype == MOE_BF16;
        a.logits = moe_tensor_data(lc);
        a.bias = bias;
        a.token_idx = moe_tensor_data(tok);
        a.expert_idx = moe_tensor_data(ex);
        a.weights = moe_tensor_data(w);
        a.aux_loss = moe_f32(aux_t);
        a.z_loss = moe_f32(z_t);
        a.s = moe_f32(r->s);
        a.pn = r->pn ? moe_f32(r->pn) : NULL;
        a.zsm = r->zsm ? moe_f32(r->zsm) : NULL;
        a.lse = moe_f32(r->lse);
        a.f = r->f ? moe_f32(r->f) : NULL;
        a.chosen = moe_tensor_data(r->chosen);
        a.pos = moe_tensor_data(r->pos);
        a.summary = summary;
        if (cfg->hook || defer) {
            /* deferred: the expert GEMMs' plan tables follow the summary in its
             * storage (tensor.h grouped_plan), 16-byte aligned */
            const int64_t words = MOE_CUDA_ROUTE_SUMMARY(e) + (cfg->hook ? cfg->hook->extra : 0);
            plan_bytes = defer ? moe_cuda_grouped_plan_bytes(e, n * k) : 0;
            plan_at = ((words + 1) & ~(int64_t)1) * 8;
            int64_t s_buf[1] = {plan_bytes ? plan_at / 8 + (plan_bytes + 7) / 8 : words};
            moe_tensor *buf = moe_tensor_new(ctx, MOE_I64, 1, s_buf, dev);
            sdev = buf && plan_bytes ? moe_tensor_narrow(buf, 0, 0, words) : buf;
            if (sdev != buf) moe_tensor_release(buf);
            if (!sdev) st = moe_last_status();
            else a.summary_dev = moe_tensor_data(sdev);
        }
        if (st == MOE_OK) st = moe_cuda_route_forward(ctx, dev, &a);
        if (st == MOE_OK && plan_bytes)
            st = moe_cuda_grouped_plan(ctx, dev, moe_tensor_data(sdev), e, n * k, (char *)moe_tensor_data(sdev) + plan_at);
    }
    moe_tensor_release(lc);
    double global_aux = 0;
    if (st == MOE_OK && cfg->aux == MOE_AUX_BATCH && cfg->aux_comm)
        st = global_aux_device(ctx, cfg->aux_comm, r, aux_t, &global_aux);
    /* after the global aux, as on the host path: every rank's collectives in one order */
    if (st == MOE_OK && cfg->hook) st = run_hook(ctx, cfg->hook, sdev, e, n, n * k, r->pos, ex, tok, summary);
    if (st == MOE_OK) {
        out->num_experts = e;
        if (defer) {
            out->offsets_dev = moe_tensor_narrow(sdev, 0, 0, e + 1);
            out->summary_dev = sdev;
            sdev = NULL;
            if (!out->offsets_dev) st = moe_last_status();
            else if (plan_bytes) {
                out->offsets_dev->grouped_plan_rows = n * k;
                out->offsets_dev->grouped_plan_at = plan_at;
            }
            out->stats.tokens = n;
            out->stats.assignments = n * k;
        } else {
            st = fill_from_summary(out, summary, n,
                                   cfg->aux == MOE_AUX_BATCH && cfg->aux_comm ? global_aux : (double)NAN);
        }
    }
    moe_tensor_release(sdev);
    if (st == MOE_OK) {
        const int64_t na = out->stats.assignments;
        /* the first na of the n*k slots hold the assignments: these headers are
         * fresh, so shortening them in place is safe; a hook may have saved tok
         * on the tape already (the MoE block's dispatch), but only where nothing
         * can drop, so there na == n*k and the shape does not change */
        tok->shape[0] = ex->shape[0] = w->shape[0] = na;
        moe_tensor_set_index_bound(tok, n);
        moe_tensor_set_index_bound(ex, e);
        out->token_idx = tok; out->expert_idx = ex; out->weights = w;
        out->aux_loss = aux_t; out->z_loss = z_t;
        /* the slot map is pos itself (shared with backward, which only reads it): values in [-1, na),
         * each of [0, na) once */
        moe_tensor_set_index_bound(r->pos, na);
        moe_tensor_mark_slot_map(r->pos);
        moe_tensor_retain(r->pos);
        out->slots = r->pos;
        tok = ex = w = aux_t = z_t = NULL;
        if (tape) {
            moe_tensor *outs[3] = {out->weights, out->aux_loss, out->z_loss};
            moe_tape_entry *ent = moe_tape_record(tape, "router", route_backward_device, r, NULL, dev_saved_free, 1,
                                                  &logits, 3, outs);
            if (!ent) st = moe_last_status();
            else r = NULL;   /* owned by the tape now */
        }
        if (st != MOE_OK) moe_routing_clear(out);
    }
    moe_tensor_release(tok); moe_tensor_release(ex); moe_tensor_release(w);
    moe_tensor_release(aux_t); moe_tensor_release(z_t);
    free(summary);
    if (st != MOE_OK) moe_routing_clear(out);
    dev_saved_free(r);
    return st == MOE_OK ? st : moe_error_context(st, "router");
}
