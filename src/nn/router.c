#include "router.h"
#include "../core/rng.h"
#include "../dist/comm.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

/* What backward needs, kept on the host and owned by the tape entry. */
typedef struct {
    moe_router_cfg cfg;
    int64_t n, e, k, a;        /* tokens, experts, choices per token (0: expert choice), assignments */
    int64_t seq_len;
    int training;
    float *s;                  /* [n*e] scores (softmax or sigmoid) */
    float *pn;                 /* [n*e] normalised scores (sum to 1 per token) */
    float *h;                  /* [n*e] noisy logits (noisy top-k), else NULL */
    float *nf;                 /* [n*e] d h / d noise_logit = z * sigmoid(nl), else NULL */
    float *lse;                /* [n] logsumexp of the logits */
    float *zsm;                /* [n*e] softmax of the logits when scores are not softmax, else NULL */
    float *f;                  /* [groups*e] dispatch fractions for the auxiliary loss */
    int64_t *chosen;           /* [n*k] experts chosen per token before capacity, or NULL */
    int64_t *tok, *exp_, *rank;/* [a] assignment token, expert, rank in the token's choices */
} route_saved;

static void saved_free(void *p) {
    route_saved *r = p;
    if (!r) return;
    free(r->s); free(r->pn); free(r->h); free(r->nf); free(r->lse); free(r->zsm); free(r->f);
    free(r->chosen); free(r->tok); free(r->exp_); free(r->rank);
    free(r);
}

moe_status moe_router_cfg_check(const moe_router_cfg *c) {
    if (c->num_experts < 1) return moe_error(MOE_ERR_ARG, "router: num_experts must be at least 1, got %lld", (long long)c->num_experts);
    if (c->top_k < 1 || c->top_k > c->num_experts)
        return moe_error(MOE_ERR_ARG, "router: experts_per_token (top_k) must be between 1 and num_experts (%lld), got %lld",
                         (long long)c->num_experts, (long long)c->top_k);
    if (c->capacity_factor < 0 || c->capacity_factor != c->capacity_factor)
        return moe_error(MOE_ERR_ARG, "router: capacity_factor must be > 0 (or 0 for no capacity limit), got %g", c->capacity_factor);
    if (c->selection < MOE_SELECT_TOPK || c->selection > MOE_SELECT_SINKHORN)
        return moe_error(MOE_ERR_ARG, "router: unknown selection method %d", (int)c->selection);
    if (c->score != MOE_SCORE_SOFTMAX && c->score != MOE_SCORE_SIGMOID)
        return moe_error(MOE_ERR_ARG, "router: unknown score function %d", (int)c->score);
    if (c->routed_scaling < 0) return moe_error(MOE_ERR_ARG, "router: routed_scaling must be >= 0");
    return MOE_OK;
}

void moe_routing_clear(moe_routing *r) {
    moe_tensor_release(r->token_idx); moe_tensor_release(r->expert_idx); moe_tensor_release(r->weights);
    moe_tensor_release(r->aux_loss); moe_tensor_release(r->z_loss);
    moe_tensor_release(r->slots);
    moe_tensor_release(r->offsets_dev); moe_tensor_release(r->summary_dev);
    free(r->offsets);
    free(r->stats.counts);
    memset(r, 0, sizeof *r);
}

/* Host copy of a [n, e] float tensor as f32. */
static moe_tensor *on_device(moe_ctx *ctx, moe_tensor *t, moe_device dev, moe_dtype dt);
static moe_tensor *host_f32(moe_ctx *ctx, moe_tensor *t) {
    moe_tensor *c = moe_op_contiguous(ctx, t);
    if (!c) return NULL;
    moe_tensor *h = on_device(ctx, c, MOE_DEVICE_CPU, MOE_F32);
    moe_tensor_release(c);
    return h;
}

/* t itself (a new reference) when it already lives on dev with dtype dt, else a copy */
static moe_tensor *on_device(moe_ctx *ctx, moe_tensor *t, moe_device dev, moe_dtype dt) {
    if (moe_device_eq(t->device, dev) && t->dtype == dt) { moe_tensor_retain(t); return t; }
    return moe_op_to(ctx, t, dev, dt);
}

static inline float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }
static inline float softplusf_(float x) { return x > 20 ? x : log1pf(expf(x)); }

/* indices of the k largest of v[0..e), descending, ties to the lower index:
 * one pass with a sorted insertion list, O(e * k) */
static void topk_row(const float *v, int64_t e, int64_t k, int64_t *out) {
    float best[64];
    float *val = k <= 64 ? best : malloc((size_t)k * sizeof *val);
    int64_t n = 0;
    if (!val) {   /* out of memory for huge k: fall back to repeated scans */
        for (int64_t r = 0; r < k; r++) {
            int64_t b = -1;
            for (int64_t j = 0; j < e; j++) {
                int taken = 0;
                for (int64_t q = 0; q < r && !taken; q++) taken = out[q] == j;
                if (!taken && (b < 0 || v[j] > v[b])) b = j;
            }
            out[r] = b;
        }
        return;
    }
    for (int64_t j = 0; j < e; j++) {
        float x = v[j];
        /* strictly greater than the current last: an equal later index never displaces an earlier one */
        if (n == k && !(x > val[k - 1])) continue;
        int64_t pos = n < k ? n : k - 1;
        while (pos > 0 && x > val[pos - 1]) {
            val[pos] = val[pos - 1];
            out[pos] = out[pos - 1];
            pos--;
        }
        val[pos] = x;
        out[pos] = j;
        if (n < k) n++;
    }
    if (val != best) free(val);
}

typedef struct { int64_t n, e, rank; float w; } assign;

/* Balanced plan by Sinkhorn: rows sum to 1, columns to n/e. */
static void sinkhorn(const float *sel, int64_t n, int64_t e, int iters, float *plan) {
    for (int64_t i = 0; i < n; i++) {
        float m = -INFINITY;
        for (int64_t j = 0; j < e; j++) m = fmaxf(m, sel[i * e + j]);
        for (int64_t j = 0; j < e; j++) plan[i * e + j] = expf(sel[i * e + j] - m);
    }
    double *col = malloc((size_t)e * sizeof *col);
    for (int it = 0; it < iters; it++) {
        for (int64_t j = 0; j < e; j++) col[j] = 0;
        for (int64_t i = 0; i < n; i++) for (int64_t j = 0; j < e; j++) col[j] += plan[i * e + j];
        for (int64_t i = 0; i < n; i++)
            for (int64_t j = 0; j < e; j++) plan[i * e + j] *= (float)((double)n / (double)e / (col[j] + 1e-30));
        for (int64_t i = 0; i < n; i++) {
            double rs = 0;
            for (int64_t j = 0; j < e; j++) rs += plan[i * e + j];
            for (int64_t j = 0; j < e; j++) plan[i * e + j] = (float)(plan[i * e + j] / (rs + 1e-30));
        }
    }
    free(col);
}

static moe_status route_backward(moe_ctx *ctx, moe_tape_entry *ent, moe_tensor *const *gout, moe_tensor **gin);

/* The combine weight of each assignment, as a function of the scores. */
static void compute_weights(route_saved *r, assign *as, int64_t na) {
    const int64_t e = r->e, k = r->k;
    float scale = r->cfg.routed_scaling > 0 ? r->cfg.routed_scaling : 1.0f;
    for (int64_t a = 0; a < na; a++) {
        int64_t n = as[a].n, j = as[a].e;
        float w;
        if (r->h) {
            /* softmax over the token's k chosen noisy logits */
            float m = -INFINITY, den = 0;
            for (int64_t q = 0; q < k; q++) m = fmaxf(m, r->h[n * e + r->chosen[n * k + q]]);
            for (int64_t q = 0; q < k; q++) den += expf(r->h[n * e + r->chosen[n * k + q]] - m);
            w = expf(r->h[n * e + j] - m) / den;
        } else if (r->cfg.renormalize && r->chosen) {
            float den = 0;
            for (int64_t q = 0; q < k; q++) den += r->s[n * e + r->chosen[n * k + q]];
            w = r->s[n * e + j] / (den > 0 ? den : 1e-20f);
        } else {
            w = r->s[n * e + j];
        }
        as[a].w = w * scale;
    }
}

/* Batch aux over every rank of comm: f (in place) and P, both [e] this rank's
 * values, averaged over the ranks; then aux = E sum f P. */
moe_status moe_route_global_aux(struct moe_comm *comm, float *f, const double *pm, int64_t e, double *aux) {
    int64_t shape[1] = {2 * e};
    moe_tensor *v = moe_tensor_new_cpu(MOE_F64, 1, shape);
    if (!v) return moe_last_status();
    double *p = moe_tensor_data(v);
    for (int64_t j = 0; j < e; j++) { p[j] = f[j]; p[e + j] = pm[j]; }
    moe_status s = moe_comm_all_reduce(comm, v, MOE_DIST_AVG);
    if (s == MOE_OK) {
        double a = 0;
        for (int64_t j = 0; j < e; j++) {
            f[j] = (float)p[j];
            a += (double)e * (double)f[j] * p[e + j];
        }
        *aux = a;
    }
    moe_tensor_release(v);
    return s == MOE_OK ? s : moe_error_context(s, "router: global auxiliary loss");
}

/* the host path: P from the normalised scores pn [n, e] */
static moe_status global_aux_host(struct moe_comm *comm, float *f, const float *pn, int64_t n, int64_t e, double *aux) {
    double *pm = calloc((size_t)e + 1, sizeof *pm);
    if (!pm) return moe_error(MOE_ERR_OOM, "router: out of host memory");
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < e; j++) pm[j] += pn[i * e + j];
    for (int64_t j = 0; j < e; j++) pm[j] /= (double)(n ? n : 1);
    moe_status s = moe_route_global_aux(comm, f, pm, e, aux);
    free(pm);
    return s;
}

/* The hook's results (h->extra values brought back to the host) handed to it. */
moe_status moe_route_hook_deliver(moe_route_hook *h, const int64_t *values) {
    free(h->host);
    h->host = malloc((size_t)(h->extra > 0 ? h->extra : 1) * sizeof *h->host);
    if (!h->host) return moe_error(MOE_ERR_OOM, "router: out of host memory");
    memcpy(h->host, values, (size_t)h->extra * sizeof *h->host);
    h->ran = 1;
    return MOE_OK;
}

/* The hook (moe_route_hook) on the host path: after routing, on the device
 * of the slot map, with the kept counts from the offsets. */
static moe_status host_hook(moe_ctx *ctx, moe_route_hook *h, const moe_routing *r) {
    const int64_t e = r->num_experts;
    const moe_device dev = r->slots->device;
    int64_t s_e[1] = {e}, s_x[1] = {h->extra};
    moe_tensor *kh = moe_tensor_new_cpu(MOE_I64, 1, s_e), *kept = NULL, *out = NULL, *back = NULL;
    moe_status st = kh ? MOE_OK : moe_last_status();
    if (st == MOE_OK) {
        int64_t *k = moe_tensor_data(kh);
        for (int64_t j = 0; j < e; j++) k[j] = r->offsets[j + 1] - r->offsets[j];
        kept = moe_op_to(ctx, kh, dev, MOE_I64);
        out = moe_tensor_new(ctx, MOE_I64, 1, s_x, dev);
        if (!kept || !out) st = moe_last_status();
    }
    h->token_idx = r->token_idx;
    if (st == MOE_OK) st = h->queue(h, ctx, r->slots, r->expert_idx, kept, out);
    h->token_idx = NULL;
    if (st == MOE_OK) st = (back = moe_op_to(ctx, out, MOE_DEVICE_CPU, MOE_I64)) ? MOE_OK : moe_last_status();
    if (st == MOE_OK) st = moe_route_hook_deliver(h, moe_tensor_data(back));
    moe_tensor_release(kh); moe_tensor_release(kept); moe_tensor_release(out); moe_tensor_release(back);
    return st;
}

moe_status moe_route(moe_ctx *ctx, moe_tape *tape, const moe_router_cfg *cfg_in, moe_tensor *logits,
                     moe_tensor *noise_logits, const float *bias, int training, uint64_t noise_key,
                     uint64_t noise_offset, int64_t seq_len, moe_routing *out) {
    memset(out, 0, sizeof *out);
    MOE_TRY(moe_router_cfg_check(cfg_in));
    /* the global aux is a collective: only taped training forwards take part
     * (evaluation and analysis forwards may run on one rank alone) */
    moe_router_cfg cfg_local = *cfg_in;
    if (!training || !tape) cfg_local.aux_comm = NULL;
    const moe_router_cfg *cfg = &cfg_local;
    if (!logits || logits->ndim != 2 || logits->shape[1] != cfg->num_experts) {
        char b[96];
        return moe_error(MOE_ERR_SHAPE, "router: logits have shape %s, expected [tokens, %lld]",
                         logits ? moe_shape_str(logits, b, sizeof b) : "nil", (long long)cfg->num_experts);
    }
    if (moe_route_device_supported(cfg, logits))
        return moe_route_device(ctx, tape, cfg, logits, bias, seq_len, out);
    const int64_t n = logits->shape[0], e = cfg->num_experts;
    const int noisy = cfg->selection == MOE_SELECT_NOISY_TOPK && training && noise_logits;
    const int ec = cfg->selection == MOE_SELECT_EXPERT_CHOICE;
    const int64_t k = ec ? 0 : cfg->top_k;
    if (seq_len <= 0 || n % seq_len) seq_len = n ? n : 1;

    route_saved *r = calloc(1, sizeof *r);
    if (!r) return moe_error(MOE_ERR_OOM, "router: out of host memory");
    r->cfg = *cfg;
    r->n = n; r->e = e; r->k = k; r->seq_len = seq_len; r->training = training;
    size_t ne = (size_t)(n * e);
    r->s = malloc(ne * sizeof(float) + 1);
    r->pn = malloc(ne * sizeof(float) + 1);
    r->lse = malloc((size_t)n * sizeof(float) + 1);
    int64_t groups = cfg->aux == MOE_AUX_SEQUENCE ? n / seq_len : 1;
    if (groups < 1) groups = 1;
    r->f = calloc((size_t)(groups * e) + 1, sizeof(float));
    if (cfg->score != MOE_SCORE_SOFTMAX) r->zsm = malloc(ne * sizeof(float) + 1);
    float *sel = malloc(ne * sizeof(float) + 1);
    assign *as = NULL;
    moe_tensor *lh = host_f32(ctx, logits), *nlh = noisy ? host_f32(ctx, noise_logits) : NULL;
    moe_status st = MOE_OK;
    if (!r->s || !r->pn || !r->lse || !r->f || (cfg->score != MOE_SCORE_SOFTMAX && !r->zsm) || !sel || !lh || (noisy && !nlh)) {
        st = lh && (!noisy || nlh) ? moe_error(MOE_ERR_OOM, "router: out of host memory") : moe_last_status();
        goto fail;
    }
    const float *L = moe_f32(lh);

    /* scores, normalised scores, logsumexp; statistics */
    double ent = 0, zsum = 0, top1 = 0;
    for (int64_t i = 0; i < n; i++) {
        const float *l = L + i * e;
        float m = -INFINITY;
        for (int64_t j = 0; j < e; j++) m = fmaxf(m, l[j]);
        double den = 0;
        for (int64_t j = 0; j < e; j++) den += exp((double)(l[j] - m));
        r->lse[i] = (float)(m + log(den));
        zsum += (double)r->lse[i] * r->lse[i];
        float *s = r->s + i * e, *p = r->pn + i * e;
        if (cfg->score == MOE_SCORE_SOFTMAX) {
            for (int64_t j = 0; j < e; j++) s[j] = p[j] = (float)(exp((double)(l[j] - m)) / den);
        } else {
            double tot = 0;
            for (int64_t j = 0; j < e; j++) { s[j] = sigmoidf_(l[j]); tot += s[j]; }
            for (int64_t j = 0; j < e; j++) {
                p[j] = (float)(s[j] / tot);
                r->zsm[i * e + j] = (float)(exp((double)(l[j] - m)) / den);
            }
        }
        double h = 0, mx = 0;
        for (int64_t j = 0; j < e; j++) {
            if (p[j] > 0) h -= p[j] * log(p[j]);
            if (p[j] > mx) mx = p[j];
        }
        ent += h;
        top1 += mx;
    }

    /* selection scores */
    if (noisy) {
        r->h = malloc(ne * sizeof(float) + 1);
        r->nf = malloc(ne * sizeof(float) + 1);
        if (!r->h || !r->nf) { st = moe_error(MOE_ERR_OOM, "router: out of host memory"); goto fail; }
        const float *NL = moe_f32(nlh);
        for (size_t i = 0; i < ne; i++) {
            float z = moe_rng_normal_at(noise_key, noise_offset + i);
            r->h[i] = L[i] + z * softplusf_(NL[i]);
            r->nf[i] = z * sigmoidf_(NL[i]);
            sel[i] = r->h[i];
        }
    } else {
        for (size_t i = 0; i < ne; i++) sel[i] = cfg->selection == MOE_SELECT_NOISY_TOPK ? L[i] : r->s[i];
    }
    if (bias)
        for (int64_t i = 0; i < n; i++) for (int64_t j = 0; j < e; j++) sel[i * e + j] += bias[j];

    /* choose */
    int64_t cap_total = ec ? e * n : n * k;
    as = malloc((size_t)(cap_total ? cap_total : 1) * sizeof *as);
    int64_t *counts = calloc((size_t)e, sizeof *counts);
    int64_t na = 0, dropped = 0;
    if (!as || !counts) { free(counts); st = moe_error(MOE_ERR_OOM, "router: out of host memory"); goto fail; }
    if (ec) {
        float cf = cfg->capacity_factor > 0 ? cfg->capacity_factor : 1.0f;
        int64_t c = (int64_t)ceil((double)cf * (double)cfg->top_k * (double)n / (double)e);
        if (c > n) c = n;
        float *col = malloc((size_t)(n ? n : 1) * sizeof *col);
        int64_t *pick = malloc((size_t)(c ? c : 1) * sizeof *pick);
        if (!col || !pick) { free(col); free(pick); free(counts); st = moe_error(MOE_ERR_OOM, "router: out of host memory"); goto fail; }
        /* per expert its top-c tokens; emitted token-major below for a stable order */
        char *taken = calloc((size_t)ne + 1, 1);
        for (int64_t j = 0; j < e && taken; j++) {
            for (int64_t i = 0; i < n; i++) col[i] = sel[i * e + j];
            topk_row(col, n, c, pick);
            for (int64_t q = 0; q < c; q++) taken[pick[q] * e + j] = 1;
        }
        for (int64_t i = 0; i < n && taken; i++)
            for (int64_t j = 0; j < e; j++)
                if (taken[i * e + j]) { as[na++] = (assign){i, j, 0, 0}; counts[j]++; }
        if (!taken) st = moe_error(MOE_ERR_OOM, "router: out of host memory");
        free(taken); free(col); free(pick);
        if (st != MOE_OK) { free(counts); goto fail; }
    } else {
        r->chosen = malloc((size_t)(n * k) * sizeof(int64_t) + 1);
        float *plan = cfg->selection == MOE_SELECT_SINKHORN ? malloc(ne * sizeof(float) + 1) : NULL;
        if (!r->chosen || (cfg->selection == MOE_SELECT_SINKHORN && !plan)) {
            free(plan); free(counts); st = moe_error(MOE_ERR_OOM, "router: out of host memory"); goto fail;
        }
        if (plan) sinkhorn(sel, n, e, cfg->sinkhorn_iters > 0 ? cfg->sinkhorn_iters : 8, plan);
        for (int64_t i = 0; i < n; i++) topk_row((plan ? plan : sel) + i * e, e, k, r->chosen + i * k);
        free(plan);
        /* dispatch fractions count choices before capacity */
        for (int64_t i = 0; i < n; i++)
            for (int64_t q = 0; q < k; q++) r->f[(cfg->aux == MOE_AUX_SEQUENCE ? (i / seq_len) : 0) * e + r->chosen[i * k + q]] += 1.0f;
        int64_t cap = cfg->capacity_factor > 0 ? (int64_t)ceil((double)cfg->capacity_factor * (double)k * (double)n / (double)e) : INT64_MAX;
        /* capacity: first choices of all tokens before any second choice (GShard's priority) */
        char *keep = calloc((size_t)(n * k) + 1, 1);
        if (!keep) { free(counts); st = moe_error(MOE_ERR_OOM, "router: out of host memory"); goto fail; }
        for (int64_t q = 0; q < k; q++)
            for (int64_t i = 0; i < n; i++) {
                int64_t j = r->chosen[i * k + q];
                if (counts[j] < cap) { counts[j]++; keep[i * k + q] = 1; } else dropped++;
            }
        for (int64_t i = 0; i < n; i++)
            for (int64_t q = 0; q < k; q++)
                if (keep[i * k + q]) as[na++] = (assign){i, r->chosen[i * k + q], q, 0};
        free(keep);
    }
    if (ec) for (int64_t j = 0; j < e; j++) r->f[j] = (float)counts[j];
    /* normalise fractions per group: f = count / (tokens_in_group * k) */
    {
        double per = (double)(cfg->aux == MOE_AUX_SEQUENCE ? seq_len : n) * (double)(ec ? cfg->top_k : k);
        for (int64_t g = 0; g < groups * e; g++) r->f[g] = (float)(r->f[g] / (per > 0 ? per : 1));
    }
    compute_weights(r, as, na);

    /* expert-contiguous order, stable in token order */
    int64_t *offsets = calloc((size_t)e + 1, sizeof *offsets);
    r->tok = malloc((size_t)(na ? na : 1) * sizeof(int64_t));
    r->exp_ = malloc((size_t)(na ? na : 1) * sizeof(int64_t));
    r->rank = malloc((size_t)(na ? na : 1) * sizeof(int64_t));
    int64_t sh[1] = {na};
    moe_tensor *tok_t = moe_tensor_new_cpu(MOE_I64, 1, sh), *exp_t = moe_tensor_new_cpu(MOE_I64, 1, sh);
    moe_tensor *w_t = moe_tensor_new_cpu(MOE_F32, 1, sh);
    /* the slot map (router.h): top-k selections only, i32 */
    int64_t s_nk[2] = {n, k};
    moe_tensor *slots_t = !ec && k > 0 && n * k <= INT32_MAX && na <= INT32_MAX ? moe_tensor_new_cpu(MOE_I32, 2, s_nk) : NULL;
    if (!offsets || !r->tok || !r->exp_ || !r->rank || !tok_t || !exp_t || !w_t) {
        free(offsets); free(counts);
        moe_tensor_release(tok_t); moe_tensor_release(exp_t); moe_tensor_release(w_t); moe_tensor_release(slots_t);
        st = moe_error(MOE_ERR_OOM, "router: out of host memory");
        goto fail;
    }
    for (int64_t a = 0; a < na; a++) offsets[as[a].e + 1]++;
    for (int64_t j = 0; j < e; j++) offsets[j + 1] += offsets[j];
    {
        int64_t *fill = malloc((size_t)e * sizeof *fill + 1);
        if (fill) memcpy(fill, offsets, (size_t)e * sizeof *fill);
        int64_t *tp = moe_tensor_data(tok_t), *ep = moe_tensor_data(exp_t);
        float *wp = moe_f32(w_t);
        int32_t *sp = slots_t ? moe_tensor_data(slots_t) : NULL;
        if (sp) for (int64_t i = 0; i < n * k; i++) sp[i] = -1;
        for (int64_t a = 0; a < na && fill; a++) {
            int64_t d = fill[as[a].e]++;
            tp[d] = r->tok[d] = as[a].n;
            ep[d] = r->exp_[d] = as[a].e;
            r->rank[d] = as[a].rank;
            wp[d] = as[a].w;
            if (sp) sp[as[a].n * k + as[a].rank] = (int32_t)d;
        }
        if (!fill) st = moe_error(MOE_ERR_OOM, "router: out of host memory");
        free(fill);
    }
    r->a = na;

    /* auxiliary loss: E * sum_e f_e P_e (averaged over groups) */
    double aux = 0;
    if (cfg->aux == MOE_AUX_BATCH && cfg->aux_comm && st == MOE_OK) {
        st = global_aux_host(cfg->aux_comm, r->f, r->pn, n, e, &aux);
    } else if (cfg->aux != MOE_AUX_NONE) {
        for (int64_t g = 0; g < groups; g++) {
            int64_t t0 = cfg->aux == MOE_AUX_SEQUENCE ? g * seq_len : 0, t1 = cfg->aux == MOE_AUX_SEQUENCE ? t0 + seq_len : n;
            for (int64_t j = 0; j < e; j++) {
                double pm = 0;
                for (int64_t i = t0; i < t1; i++) pm += r->pn[i * e + j];
                pm /= (double)(t1 - t0 ? t1 - t0 : 1);
                aux += (double)e * r->f[g * e + j] * pm;
            }
        }
        aux /= (double)groups;
    }
    double z = n ? zsum / (double)n : 0;

    /* outputs on the logits' device; the loss scalars in f32 whatever the logits' dtype */
    moe_tensor *aux_t = moe_tensor_new(ctx, MOE_F32, 0, NULL, logits->device);
    moe_tensor *z_t = moe_tensor_new(ctx, MOE_F32, 0, NULL, logits->device);
    moe_tensor *w_dev = on_device(ctx, w_t, logits->device, logits->dtype);
    moe_tensor *tok_dev = on_device(ctx, tok_t, logits->device, MOE_I64);
    moe_tensor *exp_dev = on_device(ctx, exp_t, logits->device, MOE_I64);
    moe_tensor *slots_dev = slots_t ? on_device(ctx, slots_t, logits->device, MOE_I32) : NULL;
    moe_tensor_release(tok_t); moe_tensor_release(exp_t); moe_tensor_release(w_t); moe_tensor_release(slots_t);
    if (st == MOE_OK && (!aux_t || !z_t || !w_dev || !tok_dev || !exp_dev || (slots_t && !slots_dev))) st = moe_last_status();
    if (st == MOE_OK) st = moe_op_fill(ctx, aux_t, aux);
    if (st == MOE_OK) st = moe_op_fill(ctx, z_t, z);
    /* the engine made these indices: index ops may skip their range check */
    if (st == MOE_OK) { moe_tensor_set_index_bound(tok_dev, n); moe_tensor_set_index_bound(exp_dev, e); }
    if (st == MOE_OK && slots_dev) {   /* values in [-1, na), each of [0, na) once */
        moe_tensor_set_index_bound(slots_dev, na);
        moe_tensor_mark_slot_map(slots_dev);
    }
    out->num_experts = e;
    out->token_idx = tok_dev; out->expert_idx = exp_dev; out->weights = w_dev;
    out->slots = slots_dev;
    out->aux_loss = aux_t; out->z_loss = z_t;
    out->offsets = offsets;
    out->stats = (moe_route_stats){n, na, dropped, counts, n ? ent / (double)n : 0, z, n ? top1 / (double)n : 0, aux};
    if (st == MOE_OK && tape) {
        moe_tensor *in[2] = {logits, noise_logits};
        moe_tensor *outs[3] = {w_dev, aux_t, z_t};
        moe_tape_entry *ent_ = moe_tape_record(tape, "router", route_backward, r, NULL, saved_free,
                                               noisy ? 2 : 1, in, 3, outs);
        if (!ent_) st = moe_last_status();
        else r = NULL;   /* owned by the tape now */
    }
    if (st == MOE_OK && cfg->hook && slots_dev) st = host_hook(ctx, cfg->hook, out);
    if (st != MOE_OK) moe_routing_clear(out);
fail:
    saved_free(r);
    free(sel); free(as);
    moe_tensor_release(lh); moe_tensor_release(nlh);
    return st == MOE_OK ? st : moe_error_context(st, "router");
}

static float scalar_of(moe_ctx *ctx, moe_tensor *g) {
    moe_tensor *h = host_f32(ctx, g);
    float v = h ? moe_f32(h)[0] : 0;
    moe_tensor_release(h);
    return v;
}

static moe_status route_backward(moe_ctx *ctx, moe_tape_entry *ent, moe_tensor *const *gout, moe_tensor **gin) {
    route_saved *r = ent->self;
    const int64_t n = r->n, e = r->e, k = r->k;
    size_t ne = (size_t)(n * e);
    double *ds = calloc(ne + 1, sizeof *ds), *dl = calloc(ne + 1, sizeof *dl);
    double *dh = r->h ? calloc(ne + 1, sizeof *dh) : NULL;
    if (!ds || !dl || (r->h && !dh)) { free(ds); free(dl); free(dh); return moe_error(MOE_ERR_OOM, "out of host memory"); }
    float scale = r->cfg.routed_scaling > 0 ? r->cfg.routed_scaling : 1.0f;

    /* weights -> scores (or noisy logits) */
    if (gout[0] && r->a) {
        moe_tensor *gw = host_f32(ctx, gout[0]);
        if (!gw) { free(ds); free(dl); free(dh); return moe_last_status(); }
        const float *dw = moe_f32(gw);
        if (r->h || (r->cfg.renormalize && r->chosen)) {
            /* per token: the upstream gradient of each of its k choices (0 where dropped) */
            double *dwk = calloc((size_t)(n * k) + 1, sizeof *dwk);
            if (!dwk) { moe_tensor_release(gw); free(ds); free(dl); free(dh); return moe_error(MOE_ERR_OOM, "out of host memory"); }
            for (int64_t a = 0; a < r->a; a++) dwk[r->tok[a] * k + r->rank[a]] += (double)dw[a] * scale;
            for (int64_t i = 0; i < n; i++) {
                const int64_t *c = r->chosen + i * k;
                double *g = dwk + i * k;
                if (r->h) {
                    double m = -INFINITY, den = 0, dot = 0;
                    for (int64_t q = 0; q < k; q++) m = fmax(m, r->h[i * e + c[q]]);
                    for (int64_t q = 0; q < k; q++) den += exp(r->h[i * e + c[q]] - m);
                    for (int64_t q = 0; q < k; q++) dot += g[q] * exp(r->h[i * e + c[q]] - m) / den;
                    for (int64_t q = 0; q < k; q++) {
                        double w = exp(r->h[i * e + c[q]] - m) / den;
                        dh[i * e + c[q]] += w * (g[q] - dot);
                    }
                } else {
                    double sum = 0, dot = 0;
                    for (int64_t q = 0; q < k; q++) sum += r->s[i * e + c[q]];
                    if (sum <= 0) sum = 1e-20;
                    for (int64_t q = 0; q < k; q++) dot += g[q] * r->s[i * e + c[q]];
                    for (int64_t q = 0; q < k; q++) ds[i * e + c[q]] += g[q] / sum - dot / (sum * sum);
                }
            }
            free(dwk);
        } else {
            for (int64_t a = 0; a < r->a; a++) ds[r->tok[a] * e + r->exp_[a]] += (double)dw[a] * scale;
        }
        moe_tensor_release(gw);
    }

    /* auxiliary loss -> normalised scores -> scores */
    if (gout[1] && r->cfg.aux != MOE_AUX_NONE) {
        double d = scalar_of(ctx, gout[1]);
        int seq = r->cfg.aux == MOE_AUX_SEQUENCE;
        int64_t groups = seq ? n / r->seq_len : 1, per = seq ? r->seq_len : n;
        if (groups < 1) groups = 1;
        for (int64_t i = 0; i < n; i++) {
            const float *f = r->f + (seq ? i / r->seq_len : 0) * e;
            const float *p = r->pn + i * e, *s = r->s + i * e;
            double dp[512], *dpp = e <= 512 ? dp : malloc((size_t)e * sizeof *dpp);
            if (!dpp) continue;
            for (int64_t j = 0; j < e; j++) dpp[j] = d * (double)e * f[j] / ((double)per * (double)groups);
            if (r->cfg.score == MOE_SCORE_SOFTMAX) {
                for (int64_t j = 0; j < e; j++) ds[i * e + j] += dpp[j];
            } else {
                double tot = 0, dot = 0;
                for (int64_t j = 0; j < e; j++) { tot += s[j]; dot += dpp[j] * p[j]; }
                for (int64_t j = 0; j < e; j++) ds[i * e + j] += (dpp[j] - dot) / tot;
            }
            if (dpp != dp) free(dpp);
        }
    }

    /* scores -> logits */
    for (int64_t i = 0; i < n; i++) {
        const float *s = r->s + i * e;
        double *g = ds + i * e, *o = dl + i * e;
        if (r->cfg.score == MOE_SCORE_SOFTMAX) {
            double dot = 0;
            for (int64_t j = 0; j < e; j++) dot += g[j] * s[j];
            for (int64_t j = 0; j < e; j++) o[j] = s[j] * (g[j] - dot);
        } else {
            for (int64_t j = 0; j < e; j++) o[j] = g[j] * s[j] * (1.0 - s[j]);
        }
    }
    if (dh) for (size_t i = 0; i < ne; i++) dl[i] += dh[i];

    /* z-loss: mean lse^2 */
    if (gout[2]) {
        double d = scalar_of(ctx, gout[2]);
        for (int64_t i = 0; i < n; i++) {
            const float *sm = r->zsm ? r->zsm + i * e : r->s + i * e;
            double c = d * 2.0 * r->lse[i] / (double)(n ? n : 1);
            for (int64_t j = 0; j < e; j++) dl[i * e + j] += c * sm[j];
        }
    }

    int64_t shape[2] = {n, e};
    moe_tensor *hl = moe_tensor_new_cpu(MOE_F32, 2, shape);
    moe_tensor *hn = dh ? moe_tensor_new_cpu(MOE_F32, 2, shape) : NULL;
    moe_status st = hl && (!dh || hn) ? MOE_OK : moe_last_status();
    if (st == MOE_OK) {
        float *p = moe_f32(hl);
        for (size_t i = 0; i < ne; i++) p[i] = (float)dl[i];
        if (hn) {
            float *q = moe_f32(hn);
            for (size_t i = 0; i < ne; i++) q[i] = (float)(dh[i] * r->nf[i]);
        }
        gin[0] = on_device(ctx, hl, ent->in[0]->device, ent->in[0]->dtype);
        if (!gin[0]) st = moe_last_status();
        if (st == MOE_OK && hn) {
            gin[1] = on_device(ctx, hn, ent->in[1]->device, ent->in[1]->dtype);
            if (!gin[1]) st = moe_last_status();
        }
    }
    moe_tensor_release(hl);
    moe_tensor_release(hn);
    free(ds); free(dl); free(dh);
    return st;
}
