/* check_route: moe_route on a CUDA device (the device path of router_device.c
 * and cuda_route.cu) against the host path (the same logits as a CPU tensor),
 * for the routers of the common MoE architectures and the edge cases: exact
 * equality of token_idx, expert_idx, offsets, counts and dropped; weights,
 * losses and statistics to 1e-5 (weights and gradients 2e-2 for bf16 logits);
 * the logits gradient of the tape's backward for random upstream gradients of
 * the weights, the aux loss and the z-loss; determinism (two runs, same
 * bytes); and the index bound on the routed indices (index_select trusts it,
 * an untrusted or overwritten index is still checked).
 * Fresh random logits (never zeros) with exact ties in some rows (equal
 * pairs, and whole rows of one value) and, for the capacity cases, a skew
 * that overloads some experts so tokens are dropped. TAP; skips without a GPU.
 * Built with -DROUTE_SELFTEST it runs the same comparisons with the CPU in
 * place of the GPU (the host path against itself), to check the checks. */
#include "gpucheck.h"
#include "../../src/nn/functional.h"
#include "../../src/nn/router.h"
#include "../../src/dist/comm.h"

static moe_device DEV;

typedef struct {
    const char *name;
    int64_t n, e, k;
    moe_score_fn score;
    int renorm;
    float cf, scaling;
    int bias;
    moe_aux_kind aux;
    int64_t seq_len;
    float skew;        /* added to every third expert's logit: capacity then drops */
    moe_dtype dt;
} rcase;

static moe_tensor *download(moe_tensor *t, moe_dtype dt) {
    moe_tensor *h = moe_op_to(ctx, t, MOE_DEVICE_CPU, dt);
    die_if(!h, "download");
    return h;
}

static int same_i64(moe_tensor *d, moe_tensor *h) {
    if (moe_tensor_numel(d) != moe_tensor_numel(h)) return 0;
    moe_tensor *a = download(d, MOE_I64), *b = download(h, MOE_I64);
    int eq = !memcmp(moe_tensor_data(a), moe_tensor_data(b), (size_t)moe_tensor_numel(a) * sizeof(int64_t));
    moe_tensor_release(a);
    moe_tensor_release(b);
    return eq;
}

static int close_rel(double a, double b, double tol) { return fabs(a - b) <= tol * fmax(fabs(b), 1e-6); }

static float bias_of(int64_t j) { return 0.05f * (float)((j * 7) % 5 - 2); }   /* equal for j and j + 5 */

/* logits [n, e] on the host (rounded through dt), with exact ties and the case's skew */
static moe_tensor *make_logits(const rcase *c) {
    moe_tensor *h = host_randn(SH(c->n, c->e), c->score == MOE_SCORE_SIGMOID ? 1.5f : 2.0f, 0.0f, 0);
    float *p = moe_f32(h);
    const int64_t e = c->e;
    for (int64_t i = 0; i < c->n; i++) {
        float *r = p + i * e;
        if (c->skew != 0)
            for (int64_t j = 0; j < e; j += 3) r[j] += c->skew;
        if (i % 5 == 1)
            for (int64_t j = 0; j + 5 < e; j += 10) r[j + 5] = r[j];   /* equal pairs (equal bias too) */
        if (i % 17 == 3)
            for (int64_t j = 1; j < e; j++) r[j] = r[0];               /* a row of one value */
    }
    round_through(h, c->dt);
    return h;
}

static moe_router_cfg cfg_of(const rcase *c) {
    moe_router_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.num_experts = c->e;
    cfg.top_k = c->k;
    cfg.score = c->score;
    cfg.selection = MOE_SELECT_TOPK;
    cfg.renormalize = c->renorm;
    cfg.capacity_factor = c->cf;
    cfg.routed_scaling = c->scaling;
    cfg.aux = c->aux;
    return cfg;
}

/* the gradient of the logits after a backward from root with upstream g (NULL: ones), as host f32 */
static moe_tensor *logits_grad(moe_tape *tape, moe_tensor *logits, moe_tensor *root, moe_tensor *g) {
    if (moe_tape_backward(ctx, tape, root, g) != MOE_OK) return NULL;
    moe_tensor *gr = moe_tape_grad(tape, logits);
    return gr ? download(gr, MOE_F32) : NULL;
}

static moe_tensor *scalar(moe_device dev, float v) {
    moe_tensor *t = moe_tensor_new(ctx, MOE_F32, 0, NULL, dev);
    die_if(!t || moe_op_fill(ctx, t, v) != MOE_OK, "scalar");
    return t;
}

/* loss = sum(w * gw) + aux * ga + z * gz on the tape (f32 weights only) */
static moe_tensor *combined_loss(moe_tape *tape, moe_routing *r, moe_tensor *gw, moe_tensor *ga, moe_tensor *gz) {
    moe_tensor *p = NULL, *s0 = NULL, *s1 = NULL, *s2 = NULL, *t = NULL, *loss = NULL;
    moe_status st = moe_f_binary(ctx, tape, MOE_BIN_MUL, r->weights, gw, &p);
    if (st == MOE_OK) st = moe_f_sum(ctx, tape, p, 0, &s0);
    if (st == MOE_OK) st = moe_f_binary(ctx, tape, MOE_BIN_MUL, r->aux_loss, ga, &s1);
    if (st == MOE_OK) st = moe_f_binary(ctx, tape, MOE_BIN_MUL, r->z_loss, gz, &s2);
    if (st == MOE_OK) st = moe_f_binary(ctx, tape, MOE_BIN_ADD, s0, s1, &t);
    if (st == MOE_OK) st = moe_f_binary(ctx, tape, MOE_BIN_ADD, t, s2, &loss);
    moe_tensor_release(p); moe_tensor_release(s0); moe_tensor_release(s1); moe_tensor_release(s2);
    moe_tensor_release(t);
    return st == MOE_OK ? loss : NULL;
}

static void check_grad(const char *what, const rcase *c, moe_tensor *gd, moe_tensor *gh) {
    if (!gd || !gh) {
        ok(0, "%s: %s backward failed: %s", c->name, what, moe_last_error());
    } else {
        char name[160];
        snprintf(name, sizeof name, "%s: logits gradient, %s", c->name, what);
        check(name, c->dt, gd, gh, tol_of(c->dt, 1e-5));
    }
    moe_tensor_release(gd);
    moe_tensor_release(gh);
}

static void run_case(const rcase *c) {
    moe_router_cfg cfg = cfg_of(c);
    float *bias = NULL;
    if (c->bias) {
        bias = malloc((size_t)c->e * sizeof *bias);
        for (int64_t j = 0; j < c->e; j++) bias[j] = bias_of(j);
    }
    moe_tensor *lh = make_logits(c), *ld = moe_op_to(ctx, lh, DEV, c->dt);
    die_if(!ld, "logits upload");
    moe_tape *th = moe_tape_new(), *td = moe_tape_new();
    moe_routing rh, rd;
    moe_status sh = moe_route(ctx, th, &cfg, lh, NULL, bias, 1, 0, 0, c->seq_len, &rh);
    moe_status sd = moe_route(ctx, td, &cfg, ld, NULL, bias, 1, 0, 0, c->seq_len, &rd);
    if (!RUN(c->name, c->dt, sh, sd)) goto done;
    const int64_t e = c->e, na = rh.stats.assignments;
    ok(rd.stats.tokens == rh.stats.tokens && rd.stats.assignments == na && rd.stats.dropped == rh.stats.dropped,
       "%s: assignments %lld (host %lld), dropped %lld (host %lld)", c->name, (long long)rd.stats.assignments,
       (long long)na, (long long)rd.stats.dropped, (long long)rh.stats.dropped);
    ok(!memcmp(rd.offsets, rh.offsets, (size_t)(e + 1) * sizeof(int64_t)) &&
       !memcmp(rd.stats.counts, rh.stats.counts, (size_t)e * sizeof(int64_t)),
       "%s: offsets and counts equal", c->name);
    ok(same_i64(rd.token_idx, rh.token_idx), "%s: token_idx equal", c->name);
    ok(same_i64(rd.expert_idx, rh.expert_idx), "%s: expert_idx equal", c->name);
    ok(rd.token_idx->device.type == DEV.type && rd.weights->dtype == c->dt &&
       rd.aux_loss->dtype == MOE_F32 && rd.z_loss->dtype == MOE_F32 && rh.aux_loss->dtype == MOE_F32 &&
       moe_tensor_numel(rd.aux_loss) == 1 && moe_tensor_numel(rd.z_loss) == 1,
       "%s: weights in the logits' dtype, f32 loss scalars", c->name);
    ok(moe_tensor_index_trusted(rd.token_idx, c->n) && moe_tensor_index_trusted(rd.expert_idx, e) &&
       rd.token_idx->index_bound == c->n && rd.expert_idx->index_bound == e,
       "%s: token_idx and expert_idx carry their index bounds", c->name);
    {
        char name[160];
        snprintf(name, sizeof name, "%s: weights", c->name);
        if (moe_tensor_numel(rd.weights) == na) check(name, c->dt, rd.weights, rh.weights, tol_of(c->dt, 1e-5));
        else ok(0, "%s: %lld weights, expected %lld", name, (long long)moe_tensor_numel(rd.weights), (long long)na);
        snprintf(name, sizeof name, "%s: aux loss", c->name);
        check(name, MOE_F32, rd.aux_loss, rh.aux_loss, 1e-5);
        snprintf(name, sizeof name, "%s: z loss", c->name);
        check(name, MOE_F32, rd.z_loss, rh.z_loss, 1e-5);
    }
    const moe_route_stats *a = &rd.stats, *b = &rh.stats;
    ok(close_rel(a->entropy, b->entropy, 1e-5) && close_rel(a->z, b->z, 1e-5) &&
       close_rel(a->top1_prob, b->top1_prob, 1e-5) && close_rel(a->aux, b->aux, 1e-5),
       "%s: stats entropy %.9g/%.9g z %.9g/%.9g top1 %.9g/%.9g aux %.9g/%.9g", c->name, a->entropy, b->entropy, a->z,
       b->z, a->top1_prob, b->top1_prob, a->aux, b->aux);

    /* backward: random upstream gradients for the weights, the aux loss and the z-loss, one at a time */
    moe_tensor *gwh = host_randn(SH(na), 1.0f, 0.0f, 0);
    round_through(gwh, c->dt);
    moe_tensor *gwd = moe_op_to(ctx, gwh, DEV, c->dt);
    die_if(!gwd, "upstream upload");
    float ga = 0.3f + 0.7f * (float)(seed % 7), gz = -1.3f + 0.1f * (float)(seed % 5);
    moe_tensor *gah = scalar(MOE_DEVICE_CPU, ga), *gad = scalar(DEV, ga), *gzh = scalar(MOE_DEVICE_CPU, gz),
               *gzd = scalar(DEV, gz);
    check_grad("from the weights", c, logits_grad(td, ld, rd.weights, gwd), logits_grad(th, lh, rh.weights, gwh));
    check_grad("from the aux loss", c, logits_grad(td, ld, rd.aux_loss, gad), logits_grad(th, lh, rh.aux_loss, gah));
    check_grad("from the z-loss", c, logits_grad(td, ld, rd.z_loss, gzd), logits_grad(th, lh, rh.z_loss, gzh));
    if (c->dt == MOE_F32) {
        /* all three in one backward */
        moe_tensor *Ld = combined_loss(td, &rd, gwd, gad, gzd), *Lh = combined_loss(th, &rh, gwh, gah, gzh);
        check_grad("all three at once", c, Ld ? logits_grad(td, ld, Ld, NULL) : NULL,
                   Lh ? logits_grad(th, lh, Lh, NULL) : NULL);
        moe_tensor_release(Ld);
        moe_tensor_release(Lh);
    }
    moe_tensor_release(gwh); moe_tensor_release(gwd);
    moe_tensor_release(gah); moe_tensor_release(gad); moe_tensor_release(gzh); moe_tensor_release(gzd);
done:
    moe_routing_clear(&rh);
    moe_routing_clear(&rd);
    moe_tape_free(th);
    moe_tape_free(td);
    moe_tensor_release(lh);
    moe_tensor_release(ld);
    free(bias);
}

/* the same inputs twice: the same bytes, forward and backward */
static void check_determinism(const rcase *c) {
    moe_router_cfg cfg = cfg_of(c);
    float *bias = NULL;
    if (c->bias) {
        bias = malloc((size_t)c->e * sizeof *bias);
        for (int64_t j = 0; j < c->e; j++) bias[j] = bias_of(j);
    }
    moe_tensor *lh = make_logits(c), *ld = moe_op_to(ctx, lh, DEV, c->dt);
    die_if(!ld, "logits upload");
    moe_tape *t1 = moe_tape_new(), *t2 = moe_tape_new();
    moe_routing r1, r2;
    moe_status s1 = moe_route(ctx, t1, &cfg, ld, NULL, bias, 1, 0, 0, c->seq_len, &r1);
    moe_status s2 = moe_route(ctx, t2, &cfg, ld, NULL, bias, 1, 0, 0, c->seq_len, &r2);
    if (RUN("determinism", c->dt, s1, s2)) {
        ok(same_bytes(r1.token_idx, r2.token_idx) && same_bytes(r1.expert_idx, r2.expert_idx) &&
           same_bytes(r1.weights, r2.weights) && same_bytes(r1.aux_loss, r2.aux_loss) &&
           same_bytes(r1.z_loss, r2.z_loss) && r1.stats.entropy == r2.stats.entropy && r1.stats.z == r2.stats.z &&
           r1.stats.top1_prob == r2.stats.top1_prob && r1.stats.aux == r2.stats.aux,
           "%s: two forward runs give the same bytes", c->name);
        moe_tensor *gw = host_randn(SH(r1.stats.assignments), 1.0f, 0.0f, 0), *gwd = moe_op_to(ctx, gw, DEV, c->dt);
        moe_tensor *ga = scalar(DEV, 0.7f), *gz = scalar(DEV, 0.2f);
        die_if(!gwd, "upstream upload");
        moe_tensor *L1 = c->dt == MOE_F32 ? combined_loss(t1, &r1, gwd, ga, gz) : NULL;
        moe_tensor *L2 = c->dt == MOE_F32 ? combined_loss(t2, &r2, gwd, ga, gz) : NULL;
        moe_status b1 = L1 ? moe_tape_backward(ctx, t1, L1, NULL) : moe_tape_backward(ctx, t1, r1.weights, gwd);
        moe_tensor *g1 = b1 == MOE_OK && moe_tape_grad(t1, ld) ? download(moe_tape_grad(t1, ld), c->dt) : NULL;
        moe_status b2 = L2 ? moe_tape_backward(ctx, t2, L2, NULL) : moe_tape_backward(ctx, t2, r2.weights, gwd);
        moe_tensor *g2 = b2 == MOE_OK && moe_tape_grad(t2, ld) ? download(moe_tape_grad(t2, ld), c->dt) : NULL;
        ok(g1 && g2 && !memcmp(moe_tensor_data(g1), moe_tensor_data(g2), moe_tensor_nbytes(g1)),
           "%s: two backward runs give the same bytes", c->name);
        moe_tensor_release(g1); moe_tensor_release(g2); moe_tensor_release(L1); moe_tensor_release(L2);
        moe_tensor_release(gw); moe_tensor_release(gwd); moe_tensor_release(ga); moe_tensor_release(gz);
        moe_routing_clear(&r1);
        moe_routing_clear(&r2);
    }
    moe_tape_free(t1);
    moe_tape_free(t2);
    moe_tensor_release(lh);
    moe_tensor_release(ld);
    free(bias);
}

static moe_tensor *i64_on(moe_device dev, const int64_t *v, int64_t n) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){n});
    die_if(!h, "index tensor");
    memcpy(moe_tensor_data(h), v, (size_t)n * sizeof *v);
    moe_tensor *d = moe_op_to(ctx, h, dev, MOE_I64);
    die_if(!d, "index upload");
    moe_tensor_release(h);
    return d;
}

/* the index bound: trusted routed indices work; untrusted, overwritten and aliased ones are checked */
static void check_index_bound(void) {
    rcase c = {"index bound", 300, 12, 2, MOE_SCORE_SOFTMAX, 1, 1.0f, 0, 0, MOE_AUX_BATCH, 0, 1.0f, MOE_F32};
    moe_router_cfg cfg = cfg_of(&c);
    moe_tensor *lh = make_logits(&c), *ld = moe_op_to(ctx, lh, DEV, MOE_F32);
    moe_routing rh, rd;
    moe_status sh = moe_route(ctx, NULL, &cfg, lh, NULL, NULL, 1, 0, 0, 0, &rh);
    moe_status sd = moe_route(ctx, NULL, &cfg, ld, NULL, NULL, 1, 0, 0, 0, &rd);
    if (!RUN("index bound: route", MOE_F32, sh, sd)) { moe_tensor_release(lh); moe_tensor_release(ld); return; }
    const int64_t n = c.n, w = 40, na = rh.stats.assignments;
    pair x, o;
    x.h = host_randn(SH(n, w), 1.0f, 0.0f, 0);
    x.d = moe_op_to(ctx, x.h, DEV, MOE_F32);
    o.h = moe_tensor_new_cpu(MOE_F32, 2, (int64_t[]){na, w});
    o.d = moe_tensor_new(ctx, MOE_F32, 2, (int64_t[]){na, w}, DEV);
    die_if(!x.d || !o.h || !o.d || moe_op_fill(ctx, o.h, NAN) != MOE_OK || moe_op_fill(ctx, o.d, NAN) != MOE_OK,
           "index_select tensors");
    ok(moe_tensor_index_trusted(rd.token_idx, n), "index bound: routed token_idx is trusted for [0, %lld)", (long long)n);
    ok(!moe_tensor_index_trusted(rd.token_idx, n - 1), "index bound: not trusted for a smaller row count");
    if (RUN("index bound: index_select with routed indices", MOE_F32,
            moe_op_index_select(ctx, o.h, x.h, rh.token_idx), moe_op_index_select(ctx, o.d, x.d, rd.token_idx)))
        check("index bound: index_select with routed indices", MOE_F32, o.d, o.h, 0.0);
    /* an untrusted index out of range still errors */
    int64_t bad[5] = {0, 1, n, 2, 3}, good[5] = {4, 3, 2, 1, 0};
    moe_tensor *ib = i64_on(DEV, bad, 5);
    moe_tensor *ob = moe_tensor_new(ctx, MOE_F32, 2, (int64_t[]){5, w}, DEV);
    die_if(!ob, "output");
    moe_status s = moe_op_index_select(ctx, ob, x.d, ib);
    ok(s == MOE_ERR_RANGE, "index bound: an untrusted index out of range is reported (%s)", moe_last_error());
    /* a trusted tensor loses its bound when written */
    moe_tensor *it = i64_on(DEV, good, 5);
    moe_tensor_set_index_bound(it, n);
    int trusted = moe_tensor_index_trusted(it, n);
    moe_tensor *hb = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){5});
    die_if(!hb, "host index");
    memcpy(moe_tensor_data(hb), bad, sizeof bad);
    s = moe_op_copy(ctx, it, hb);
    /* (an upload from the host gives it the new values' bound, max + 1 = n + 1) */
    ok(trusted && s == MOE_OK && it->index_bound != n && !moe_tensor_index_trusted(it, n),
       "index bound: set on a fresh tensor, replaced by a copy into it (%lld)", (long long)it->index_bound);
    s = moe_op_index_select(ctx, ob, x.d, it);
    ok(s == MOE_ERR_RANGE, "index bound: the overwritten index is checked again (%s)", moe_last_error());
    /* a fill drops it too */
    moe_tensor_set_index_bound(it, n);
    s = moe_op_fill(ctx, it, (double)(n + 5));
    ok(s == MOE_OK && it->index_bound == 0, "index bound: dropped by a fill");
    /* views do not inherit it, and making one voids the original's (an alias could write) */
    moe_tensor *v = moe_tensor_narrow(rd.token_idx, 0, 0, 2);
    die_if(!v, "narrow");
    ok(v->index_bound == 0 && !moe_tensor_index_trusted(v, n) && !moe_tensor_index_trusted(rd.token_idx, n),
       "index bound: a view has none and voids its source's");
    moe_tensor_set_index_bound(rd.token_idx, n);
    ok(rd.token_idx->index_bound == 0, "index bound: cannot be set over aliased memory");
    moe_tensor_release(v); moe_tensor_release(ib); moe_tensor_release(ob); moe_tensor_release(it);
    moe_tensor_release(hb);
    pfree(&x);
    pfree(&o);
    moe_routing_clear(&rh);
    moe_routing_clear(&rd);
    moe_tensor_release(lh);
    moe_tensor_release(ld);
}

/* global batch aux (cfg.aux_comm) over a one-rank communicator: the same aux,
 * statistics and logits gradient as the rank-local aux (the all-reduce is the
 * identity there; this exercises the path's copies, reductions and refill) */
static void check_global_aux(const rcase *c) {
    moe_comm *one = moe_comm_single_new(ctx);
    die_if(!one, "single communicator");
    moe_router_cfg local = cfg_of(c), global = cfg_of(c);
    global.aux_comm = one;
    moe_tensor *lh = make_logits(c), *ld = moe_op_to(ctx, lh, DEV, c->dt);
    die_if(!ld, "logits upload");
    moe_tape *t1 = moe_tape_new(), *t2 = moe_tape_new();
    moe_routing r1, r2;
    moe_status s1 = moe_route(ctx, t1, &local, ld, NULL, NULL, 1, 0, 0, c->seq_len, &r1);
    moe_status s2 = moe_route(ctx, t2, &global, ld, NULL, NULL, 1, 0, 0, c->seq_len, &r2);
    if (RUN("global aux", c->dt, s1, s2)) {
        moe_tensor *a1 = download(r1.aux_loss, MOE_F32), *a2 = download(r2.aux_loss, MOE_F32);
        double x1 = a1 ? moe_f32(a1)[0] : NAN, x2 = a2 ? moe_f32(a2)[0] : NAN;
        ok(close_rel(x2, x1, 1e-5) && close_rel(r2.stats.aux, r1.stats.aux, 1e-5),
           "%s: aux over a one-rank communicator = local aux (%.8g vs %.8g; stats %.8g vs %.8g)", c->name, x2, x1,
           r2.stats.aux, r1.stats.aux);
        moe_tensor *gw = host_randn(SH(r1.stats.assignments), 1.0f, 0.0f, 0), *gwd = moe_op_to(ctx, gw, DEV, c->dt);
        moe_tensor *ga = scalar(DEV, 0.9f), *gz = scalar(DEV, 0.3f);
        die_if(!gwd, "upstream upload");
        moe_tensor *L1 = combined_loss(t1, &r1, gwd, ga, gz), *L2 = combined_loss(t2, &r2, gwd, ga, gz);
        moe_tensor *g1 = L1 ? logits_grad(t1, ld, L1, NULL) : NULL;
        moe_tensor *g2 = L2 ? logits_grad(t2, ld, L2, NULL) : NULL;
        check_grad("global aux over one rank vs local", c, g2, g1);
        moe_tensor_release(a1); moe_tensor_release(a2); moe_tensor_release(L1); moe_tensor_release(L2);
        moe_tensor_release(gw); moe_tensor_release(gwd); moe_tensor_release(ga); moe_tensor_release(gz);
        moe_routing_clear(&r1);
        moe_routing_clear(&r2);
    }
    moe_tape_free(t1);
    moe_tape_free(t2);
    moe_tensor_release(lh);
    moe_tensor_release(ld);
    moe_comm_free(one);
}

int main(void) {
#ifdef ROUTE_SELFTEST
    ctx = moe_ctx_new(0);
    die_if(!ctx, "context");
    moe_cpu_backend_install(ctx);
    DEV = MOE_DEVICE_CPU;
#else
    gpucheck_begin();
    DEV = GPU;
#endif
    const moe_score_fn SM = MOE_SCORE_SOFTMAX, SG = MOE_SCORE_SIGMOID;
    const moe_aux_kind NONE = MOE_AUX_NONE, BATCH = MOE_AUX_BATCH, SEQ = MOE_AUX_SEQUENCE;
    /* name, n, e, k, score, renorm, cf, scaling, bias, aux, seq_len, skew, dtype */
    const rcase cases[] = {
        {"mixtral softmax top-2 renormalized", 512, 8, 2, SM, 1, 0, 0, 0, BATCH, 0, 0, MOE_F32},
        {"olmoe softmax top-8 N=16384 E=64", 16384, 64, 8, SM, 0, 0, 0, 0, BATCH, 0, 0, MOE_F32},
        {"deepseek sigmoid + bias + renorm, scaling 2.5, sequence aux", 1024, 64, 6, SG, 1, 0, 2.5f, 1, SEQ, 256, 0,
         MOE_F32},
        {"switch top-1 capacity 1.0 (drops)", 1024, 16, 1, SM, 0, 1.0f, 0, 0, BATCH, 0, 2.0f, MOE_F32},
        {"top-2 capacity 1.25 (drops)", 1000, 12, 2, SM, 1, 1.25f, 0, 0, BATCH, 0, 1.5f, MOE_F32},
        {"sequence aux, seq_len 128", 768, 24, 4, SM, 0, 0, 0, 0, SEQ, 128, 0, MOE_F32},
        {"E=60 top-4 capacity 1.0 (drops)", 999, 60, 4, SM, 1, 1.0f, 0, 0, BATCH, 0, 1.0f, MOE_F32},
        {"k=E=16 capacity 0.5 (drops)", 100, 16, 16, SM, 1, 0.5f, 0, 0, BATCH, 0, 0, MOE_F32},
        {"N=1", 1, 8, 2, SM, 1, 1.0f, 0, 0, BATCH, 0, 0, MOE_F32},
        {"sigmoid no aux, no renorm", 300, 10, 3, SG, 0, 0, 0, 0, NONE, 0, 0, MOE_F32},
        {"sigmoid + bias, capacity 1.0, sequence aux (drops)", 640, 32, 4, SG, 1, 1.0f, 1.5f, 1, SEQ, 64, 1.0f,
         MOE_F32},
        {"E=1000 top-3", 256, 1000, 3, SM, 1, 0, 0, 0, BATCH, 0, 0, MOE_F32},
        /* the token kernel holds up to 4 experts a lane in registers (E <= 128, k <= 32);
         * E=100 pads its last lanes; k=40 takes the shared-memory kernel at a small E */
        {"bf16 E=100 top-8 (experts in registers, padded lanes)", 700, 100, 8, SM, 1, 0, 0, 0, BATCH, 0, 0, MOE_BF16},
        {"E=128 sigmoid top-6, sequence aux", 512, 128, 6, SG, 1, 0, 1.0f, 0, SEQ, 128, 0, MOE_F32},
        {"E=48 top-40 (the shared-memory token kernel)", 300, 48, 40, SM, 1, 0, 0, 0, BATCH, 0, 0, MOE_F32},
        {"bf16 mixtral", 512, 8, 2, SM, 1, 0, 0, 0, BATCH, 0, 0, MOE_BF16},
        {"bf16 deepseek sigmoid + bias", 1024, 64, 6, SG, 1, 0, 2.5f, 1, SEQ, 256, 0, MOE_BF16},
        {"bf16 olmoe-like top-8 capacity 1.25 (drops)", 4096, 64, 8, SM, 0, 1.25f, 0, 0, BATCH, 0, 1.0f, MOE_BF16},
        /* k_assign works in chunks of 1024 tokens: drops whose partly kept rank crosses
         * chunk boundaries, and a partial last chunk */
        {"top-2 capacity 1.0 over 3 chunks (drops)", 2500, 16, 2, SM, 1, 1.0f, 0, 0, BATCH, 0, 1.5f, MOE_F32},
        /* the token kernel's group histograms: 16-token chunks spanning two sequences,
         * and sequences shorter than a chunk (straight to the global counters) */
        {"sequence aux, seq_len 24", 480, 16, 2, SM, 1, 0, 0, 0, SEQ, 24, 0, MOE_F32},
        {"bf16 sequence aux, seq_len 5", 100, 8, 2, SM, 0, 0, 0, 0, SEQ, 5, 0, MOE_BF16},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) run_case(&cases[i]);
    check_determinism(&cases[1]);
    check_determinism(&cases[10]);
    check_determinism(&cases[17]);
    check_index_bound();
    check_global_aux(&cases[0]);    /* softmax */
    check_global_aux(&cases[4]);    /* capacity drops */
    return gpucheck_end();
}
