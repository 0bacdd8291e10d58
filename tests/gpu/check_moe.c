/* check_moe: the MoE token-movement ops (ops.h: gather_sum, combine_backward)
 * on CUDA against the CPU backend, and their use by the router and the MoE
 * block:
 * - both ops, f32 (gather_sum and dsrc bit-identical to the CPU, dw to 2e-4: f32 dots in another order)
 *   and bf16 (2e-2 against the f32 reference; gather_sum and dsrc also
 *   byte-identical to the CPU backend's own bf16), with dropped choices (-1),
 *   tokens keeping 0..k choices, N = 1, H not a multiple of 8, H = 2048 and
 *   7168, k = 1..8, with and without weights / dw;
 * - determinism (two runs, same bytes);
 * - untrusted out-of-range indices give MOE_ERR_RANGE naming the position,
 *   nothing written; a trusted bound skips the check;
 * - the router's slot map (device and host paths) agrees with token_idx;
 * - the MoE block on the GPU (top-k with capacity drops) gives the same
 *   output and gradients with the slot map and on the index_add fallback
 *   (MOELAB_MOE_GATHER=0), and in f32 the same as on the CPU.
 * Then timings ("# ..." lines; MOELAB_CHECK_NO_TIMING skips them). Fresh
 * random data, NaN-poisoned outputs. TAP; skips without a GPU. */
#include "gpucheck.h"
#include "../../src/nn/layer.h"
#include "../../src/nn/moe_block.h"
#include "../../src/nn/router.h"
#include "../../src/nn/tape.h"

#include <time.h>

/* ---- routings ---- */

typedef struct {
    int64_t n, k, a;
    moe_tensor *slots_h, *tok_h;   /* host i32 [n, k], i64 [a] */
    moe_tensor *slots_d, *tok_d;   /* device copies (bounded by their largest value when none is -1) */
} routing;

static uint64_t lcg_state = 88172645463325252ull;
static uint64_t lcg(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return lcg_state >> 33;
}

/* n tokens with k choices each among e experts; a choice is dropped with
 * probability drop_pct/100 (token 0 keeps all, token 1 none when n > 2);
 * kept choices are laid out expert-contiguous, tokens ascending within an
 * expert (the router's order). */
static routing make_routing(int64_t n, int64_t k, int64_t e, int drop_pct) {
    routing r;
    memset(&r, 0, sizeof r);
    r.n = n;
    r.k = k;
    int64_t *ex = malloc((size_t)(n * k + 1) * sizeof *ex);
    int64_t *cnt = calloc((size_t)e + 1, sizeof *cnt);
    die_if(!ex || !cnt, "routing scratch");
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < k; q++) {
            int keep = t == 0 || (!(t == 1 && n > 2) && (int)(lcg() % 100) >= drop_pct);
            ex[t * k + q] = keep ? (int64_t)(lcg() % (uint64_t)e) : -1;
            if (keep) { cnt[ex[t * k + q] + 1]++; r.a++; }
        }
    for (int64_t j = 0; j < e; j++) cnt[j + 1] += cnt[j];
    r.slots_h = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){n, k});
    r.tok_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    die_if(!r.slots_h || !r.tok_h, "routing tensors");
    int32_t *sl = moe_tensor_data(r.slots_h);
    int64_t *tk = moe_tensor_data(r.tok_h);
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < k; q++) {
            int64_t j = ex[t * k + q];
            if (j < 0) { sl[t * k + q] = -1; continue; }
            int64_t d = cnt[j]++;
            sl[t * k + q] = (int32_t)d;
            tk[d] = t;
        }
    free(ex);
    free(cnt);
    r.slots_d = moe_op_to(ctx, r.slots_h, GPU, MOE_I32);
    r.tok_d = moe_op_to(ctx, r.tok_h, GPU, MOE_I64);
    die_if(!r.slots_d || !r.tok_d, "routing upload");
    return r;
}

static void free_routing(routing *r) {
    moe_tensor_release(r->slots_h); moe_tensor_release(r->tok_h);
    moe_tensor_release(r->slots_d); moe_tensor_release(r->tok_d);
}

static moe_tensor *download(const moe_tensor *t, moe_dtype dt) {
    moe_tensor *h = moe_op_to(ctx, (moe_tensor *)t, MOE_DEVICE_CPU, dt);
    die_if(!h, "download");
    return h;
}

/* the GPU result's bytes equal the CPU backend's result computed in dtype dt
 * (data copies of the host reference inputs in dt) */
static moe_tensor *host_in(const moe_tensor *h, moe_dtype dt) {
    moe_tensor *t = moe_op_to(ctx, (moe_tensor *)h, MOE_DEVICE_CPU, dt);
    die_if(!t, "host copy");
    return t;
}

/* ---- gather_sum ---- */

static void test_gather_sum(moe_dtype dt, int64_t n, int64_t k, int64_t e, int64_t h, int drop_pct, int weighted) {
    routing r = make_routing(n, k, e, drop_pct);
    char name[160];
    snprintf(name, sizeof name, "gather_sum N=%lld k=%lld H=%lld A=%lld%s", (long long)n, (long long)k, (long long)h,
             (long long)r.a, weighted ? "" : " (no w)");
    pair src = in_randn(dt, SH(r.a, h));
    pair w = {NULL, NULL};
    if (weighted) w = in_randn(dt, SH(r.a));
    pair y = out_pair(dt, SH(n, h));
    if (RUN(name, dt, moe_op_gather_sum(ctx, y.h, src.h, w.h, r.slots_h), moe_op_gather_sum(ctx, y.d, src.d, w.d, r.slots_d))) {
        check(name, dt, y.d, y.h, dt == MOE_F32 ? 0.0 : 2e-2);
        if (dt == MOE_BF16) {
            /* the CPU backend's bf16: the same f32 sums rounded once */
            moe_tensor *sb = host_in(src.h, dt), *wb = w.h ? host_in(w.h, dt) : NULL;
            moe_tensor *yb = moe_tensor_new_cpu(dt, 2, (int64_t[]){n, h});
            die_if(!yb, "bf16 out");
            moe_status s = moe_op_gather_sum(ctx, yb, sb, wb, r.slots_h);
            ok(s == MOE_OK && same_bytes(y.d, yb), "%s [bf16]: same bytes as the cpu backend's bf16", name);
            moe_tensor_release(sb); moe_tensor_release(wb); moe_tensor_release(yb);
        }
    }
    pfree(&src); pfree(&w); pfree(&y);
    free_routing(&r);
}

/* gather_sum_add: the sum from a base row (the block's residual), f32 bit-identical
 * to the CPU and bf16 the same bytes as the CPU's bf16 */
static void test_gather_sum_add(moe_dtype dt, int64_t n, int64_t k, int64_t e, int64_t h, int drop_pct) {
    routing r = make_routing(n, k, e, drop_pct);
    char name[160];
    snprintf(name, sizeof name, "gather_sum_add N=%lld k=%lld H=%lld A=%lld", (long long)n, (long long)k, (long long)h,
             (long long)r.a);
    pair src = in_randn(dt, SH(r.a, h)), w = in_randn(dt, SH(r.a)), base = in_randn(dt, SH(n, h));
    pair y = out_pair(dt, SH(n, h));
    if (RUN(name, dt, moe_op_gather_sum_add(ctx, y.h, base.h, src.h, w.h, r.slots_h),
            moe_op_gather_sum_add(ctx, y.d, base.d, src.d, w.d, r.slots_d))) {
        check(name, dt, y.d, y.h, dt == MOE_F32 ? 0.0 : 2e-2);
        if (dt == MOE_BF16) {
            moe_tensor *sb = host_in(src.h, dt), *wb = host_in(w.h, dt), *bb = host_in(base.h, dt);
            moe_tensor *yb = moe_tensor_new_cpu(dt, 2, (int64_t[]){n, h});
            die_if(!yb, "bf16 out");
            moe_status s = moe_op_gather_sum_add(ctx, yb, bb, sb, wb, r.slots_h);
            ok(s == MOE_OK && same_bytes(y.d, yb), "%s [bf16]: same bytes as the cpu backend's bf16", name);
            moe_tensor_release(sb); moe_tensor_release(wb); moe_tensor_release(bb); moe_tensor_release(yb);
        }
    }
    pfree(&src); pfree(&w); pfree(&base); pfree(&y);
    free_routing(&r);
}

/* ---- combine_backward ---- */

/* combine_backward given the slots: marked as a router's map (bound and mark
 * set here as the router sets them) the device runs by token, reading
 * token_idx not at all (an out-of-range token_idx then goes unnoticed, which
 * shows the path); the uploaded slots, whose bound (when none is -1) is only a
 * range, by row. Either way the bytes of the by-row run (ds, dw; dw NULL: none). */
static void combine_by_token(const char *name, moe_dtype dt, const routing *r, const moe_tensor *dy,
                             const moe_tensor *src, const moe_tensor *w, const moe_tensor *ds, const moe_tensor *dw) {
    moe_tensor *sl = moe_op_to(ctx, r->slots_h, GPU, MOE_I32), *bad = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){r->a}, GPU);
    moe_tensor *ds2 = moe_tensor_new(ctx, dt, 2, ds->shape, GPU);
    moe_tensor *dw2 = dw ? moe_tensor_new(ctx, dt, 1, (int64_t[]){r->a}, GPU) : NULL;
    die_if(!sl || !bad || !ds2 || (dw && !dw2), "by-token tensors");
    die_if(moe_op_fill(ctx, bad, (double)(r->n + 5)) != MOE_OK || moe_op_fill(ctx, ds2, NAN) != MOE_OK ||
           (dw2 && moe_op_fill(ctx, dw2, NAN) != MOE_OK), "by-token poison");
    moe_tensor_set_index_bound(sl, r->a);
    moe_tensor_mark_slot_map(sl);
    moe_status s = moe_op_combine_backward_slots(ctx, ds2, dw2, dy, src, w, bad, sl);
    ok(s == MOE_OK && same_bytes(ds2, ds) && (!dw || same_bytes(dw2, dw)),
       "%s: by token (a marked slot map, token_idx unread): the by-row bytes", name);
    die_if(moe_op_fill(ctx, ds2, NAN) != MOE_OK, "by-token poison");
    s = moe_op_combine_backward_slots(ctx, ds2, dw2, dy, src, w, r->tok_d, r->slots_d);
    ok(s == MOE_OK && same_bytes(ds2, ds) && (!dw || same_bytes(dw2, dw)), "%s: uploaded slots (no mark): the by-row bytes",
       name);
    moe_tensor_release(sl); moe_tensor_release(bad); moe_tensor_release(ds2); moe_tensor_release(dw2);
}

static void test_combine_backward(moe_dtype dt, int64_t n, int64_t k, int64_t e, int64_t h, int drop_pct, int with_dw) {
    routing r = make_routing(n, k, e, drop_pct);
    char name[160];
    snprintf(name, sizeof name, "combine_backward N=%lld k=%lld H=%lld A=%lld%s", (long long)n, (long long)k,
             (long long)h, (long long)r.a, with_dw ? "" : " (no dw)");
    pair dy = in_randn(dt, SH(n, h)), src = in_randn(dt, SH(r.a, h)), w = in_randn(dt, SH(r.a));
    pair dsrc = out_pair(dt, SH(r.a, h));
    pair dw = {NULL, NULL};
    if (with_dw) dw = out_pair(dt, SH(r.a));
    if (RUN(name, dt, moe_op_combine_backward(ctx, dsrc.h, dw.h, dy.h, src.h, w.h, r.tok_h),
            moe_op_combine_backward(ctx, dsrc.d, dw.d, dy.d, src.d, w.d, r.tok_d))) {
        char nm[200];
        snprintf(nm, sizeof nm, "%s: dsrc", name);
        check(nm, dt, dsrc.d, dsrc.h, dt == MOE_F32 ? 0.0 : 2e-2);
        if (with_dw) {
            snprintf(nm, sizeof nm, "%s: dw", name);
            /* f32 dot products of H terms in different orders (CPU: 8 lanes;
             * GPU: per-thread fma chains, then a tree): measured up to 7.5e-5
             * apart at H = 8192 on an H100 */
            check(nm, dt, dw.d, dw.h, tol_of(dt, 2e-4));
        }
        if (dt == MOE_BF16) {
            moe_tensor *gb = host_in(dy.h, dt), *sb = host_in(src.h, dt), *wb = host_in(w.h, dt);
            moe_tensor *ob = moe_tensor_new_cpu(dt, 2, (int64_t[]){r.a, h});
            die_if(!ob, "bf16 out");
            moe_status s = moe_op_combine_backward(ctx, ob, NULL, gb, sb, wb, r.tok_h);
            ok(s == MOE_OK && same_bytes(dsrc.d, ob), "%s [bf16]: dsrc same bytes as the cpu backend's bf16", name);
            moe_tensor_release(gb); moe_tensor_release(sb); moe_tensor_release(wb); moe_tensor_release(ob);
        }
        combine_by_token(name, dt, &r, dy.d, src.d, w.d, dsrc.d, dw.d);
    }
    pfree(&dy); pfree(&src); pfree(&w); pfree(&dsrc); pfree(&dw);
    free_routing(&r);
}

/* ---- index_select given the slots (the dispatch by token) ---- */

/* The rows of index_select on the CPU (a copy: the same bytes), written by
 * token from a marked slot map (output poisoned first, so a row left out
 * shows), and by row from an unmarked one */
static void test_select_by_token(moe_dtype dt, int64_t n, int64_t k, int64_t e, int64_t h, int drop_pct) {
    routing r = make_routing(n, k, e, drop_pct);
    char name[160];
    snprintf(name, sizeof name, "index_select given the slots %s N=%lld k=%lld H=%lld A=%lld", moe_dtype_name(dt),
             (long long)n, (long long)k, (long long)h, (long long)r.a);
    pair x = in_randn(dt, SH(n, h)), out = out_pair(dt, SH(r.a, h));
    if (RUN(name, dt, moe_op_index_select(ctx, out.h, x.h, r.tok_h), moe_op_index_select(ctx, out.d, x.d, r.tok_d))) {
        moe_tensor *sl = moe_op_to(ctx, r.slots_h, GPU, MOE_I32), *o2 = moe_tensor_new(ctx, dt, 2, out.d->shape, GPU);
        die_if(!sl || !o2, "by-token tensors");
        moe_tensor_set_index_bound(sl, r.a);
        moe_tensor_mark_slot_map(sl);
        for (int marked = 1; marked >= 0; marked--) {
            die_if(moe_op_fill(ctx, o2, NAN) != MOE_OK, "poison");
            moe_status s = moe_op_index_select_slots(ctx, o2, x.d, r.tok_d, marked ? sl : r.slots_d);
            moe_tensor *hb = host_in(out.h, dt);
            ok(s == MOE_OK && same_bytes(o2, hb) && same_bytes(o2, out.d), "%s: %s, the bytes of index_select", name,
               marked ? "a marked slot map (by token)" : "uploaded slots (no mark, by row)");
            moe_tensor_release(hb);
        }
        moe_tensor_release(sl); moe_tensor_release(o2);
    }
    pfree(&x); pfree(&out);
    free_routing(&r);
}

/* ---- determinism ---- */

static void test_determinism(moe_dtype dt, int64_t n, int64_t k, int64_t h) {
    routing r = make_routing(n, k, 32, 10);
    pair src = in_randn(dt, SH(r.a, h)), w = in_randn(dt, SH(r.a)), dy = in_randn(dt, SH(n, h));
    moe_tensor *y1 = moe_tensor_new(ctx, dt, 2, (int64_t[]){n, h}, GPU), *y2 = moe_tensor_new(ctx, dt, 2, (int64_t[]){n, h}, GPU);
    moe_tensor *d1 = moe_tensor_new(ctx, dt, 2, (int64_t[]){r.a, h}, GPU), *d2 = moe_tensor_new(ctx, dt, 2, (int64_t[]){r.a, h}, GPU);
    moe_tensor *w1 = moe_tensor_new(ctx, dt, 1, (int64_t[]){r.a}, GPU), *w2 = moe_tensor_new(ctx, dt, 1, (int64_t[]){r.a}, GPU);
    die_if(!y1 || !y2 || !d1 || !d2 || !w1 || !w2, "determinism tensors");
    moe_status s = moe_op_gather_sum(ctx, y1, src.d, w.d, r.slots_d);
    if (s == MOE_OK) s = moe_op_gather_sum(ctx, y2, src.d, w.d, r.slots_d);
    if (s == MOE_OK) s = moe_op_combine_backward(ctx, d1, w1, dy.d, src.d, w.d, r.tok_d);
    if (s == MOE_OK) s = moe_op_combine_backward(ctx, d2, w2, dy.d, src.d, w.d, r.tok_d);
    ok(s == MOE_OK && same_bytes(y1, y2) && same_bytes(d1, d2) && same_bytes(w1, w2),
       "determinism [%s] N=%lld k=%lld H=%lld: two runs, same bytes (y, dsrc, dw)%s%s", dtn(dt), (long long)n,
       (long long)k, (long long)h, s == MOE_OK ? "" : ": ", s == MOE_OK ? "" : moe_last_error());
    moe_tensor *all[] = {y1, y2, d1, d2, w1, w2};
    for (int i = 0; i < 6; i++) moe_tensor_release(all[i]);
    pfree(&src); pfree(&w); pfree(&dy);
    free_routing(&r);
}

/* ---- index ranges ---- */

static int still_nan(const moe_tensor *d) {
    moe_tensor *h = download(d, MOE_F32);
    int all = 1;
    for (int64_t i = 0; i < moe_tensor_numel(h); i++) all = all && isnan(moe_f32(h)[i]);
    moe_tensor_release(h);
    return all;
}

static void test_ranges(void) {
    const int64_t n = 37, k = 4, h = 24;
    routing r = make_routing(n, k, 8, 20);
    pair src = in_randn(MOE_F32, SH(r.a, h)), w = in_randn(MOE_F32, SH(r.a)), dy = in_randn(MOE_F32, SH(n, h));
    pair y = out_pair(MOE_F32, SH(n, h)), dsrc = out_pair(MOE_F32, SH(r.a, h)), dw = out_pair(MOE_F32, SH(r.a));
    int32_t *sl = moe_tensor_data(r.slots_h);
    int64_t *tk = moe_tensor_data(r.tok_h);

    /* slot A at position 4*k+2 (token 4, choice 2); then -2 */
    const int32_t bad_vals[2] = {(int32_t)r.a, -2};
    for (int b = 0; b < 2; b++) {
        int32_t keep = sl[4 * k + 2];
        sl[4 * k + 2] = bad_vals[b];
        moe_tensor *bad = moe_op_to(ctx, r.slots_h, GPU, MOE_I32);
        sl[4 * k + 2] = keep;
        die_if(!bad, "bad slots");
        moe_status s = moe_op_gather_sum(ctx, y.d, src.d, w.d, bad);
        const char *msg = moe_last_error();
        char want[64];
        snprintf(want, sizeof want, "at position %lld (token 4, choice 2)", (long long)(4 * k + 2));
        ok(s == MOE_ERR_RANGE && strstr(msg, want) && still_nan(y.d),
           "gather_sum: untrusted slot %d gives MOE_ERR_RANGE, nothing written: %s", bad_vals[b], msg);
        moe_tensor_release(bad);
    }
    /* token_idx N at position 5 */
    {
        int64_t keep = tk[5];
        tk[5] = n;
        moe_tensor *bad = moe_op_to(ctx, r.tok_h, GPU, MOE_I64);
        tk[5] = keep;
        die_if(!bad, "bad token_idx");
        moe_status s = moe_op_combine_backward(ctx, dsrc.d, dw.d, dy.d, src.d, w.d, bad);
        const char *msg = moe_last_error();
        ok(s == MOE_ERR_RANGE && strstr(msg, "at position 5") && still_nan(dsrc.d) && still_nan(dw.d),
           "combine_backward: untrusted token_idx %lld gives MOE_ERR_RANGE, nothing written: %s", (long long)n, msg);
        moe_tensor_release(bad);
    }
    /* a trusted bound (the router's promise) is honoured; a smaller row count is not trusted */
    moe_tensor_set_index_bound(r.slots_d, r.a);
    moe_tensor_set_index_bound(r.tok_d, n);
    ok(moe_tensor_index_trusted(r.slots_d, r.a) && moe_tensor_index_trusted(r.tok_d, n) &&
           !moe_tensor_index_trusted(r.slots_d, r.a - 1),
       "index bounds: i32 slots and i64 token_idx can carry a trusted bound");
    moe_status s1 = moe_op_gather_sum(ctx, y.d, src.d, w.d, r.slots_d);
    moe_status s2 = moe_op_combine_backward(ctx, dsrc.d, dw.d, dy.d, src.d, w.d, r.tok_d);
    moe_status s3 = moe_op_gather_sum(ctx, y.h, src.h, w.h, r.slots_h);
    ok(s1 == MOE_OK && s2 == MOE_OK && s3 == MOE_OK && max_err(y.d, y.h) == 0,
       "trusted indices: gather_sum and combine_backward run (no check) and match the cpu");
    /* dtype / shape errors */
    moe_tensor *s64 = moe_op_to(ctx, r.slots_h, GPU, MOE_I64);
    die_if(!s64, "i64 slots");
    moe_status s4 = moe_op_gather_sum(ctx, y.d, src.d, w.d, s64);
    ok(s4 == MOE_ERR_DTYPE, "gather_sum: i64 slots are rejected: %s", moe_last_error());
    moe_tensor_release(s64);
    pfree(&src); pfree(&w); pfree(&dy); pfree(&y); pfree(&dsrc); pfree(&dw);
    free_routing(&r);
}

/* ---- the router's slot map ---- */

/* slots [n, k] agree with token_idx [a]: every kept choice names a distinct
 * assignment of its token, every assignment is named once */
static int slots_consistent(moe_tensor *slots, moe_tensor *tok, int64_t n, int64_t k, int64_t *dropped) {
    if (!slots || slots->dtype != MOE_I32 || slots->ndim != 2 || slots->shape[0] != n || slots->shape[1] != k) return 0;
    moe_tensor *sh = download(slots, MOE_I32), *th = download(tok, MOE_I64);
    const int32_t *s = moe_tensor_data(sh);
    const int64_t *t = moe_tensor_data(th);
    int64_t a = tok->shape[0];
    char *seen = calloc((size_t)a + 1, 1);
    int good = seen != NULL;
    *dropped = 0;
    for (int64_t i = 0; good && i < n * k; i++) {
        if (s[i] == -1) { (*dropped)++; continue; }
        good = s[i] >= 0 && s[i] < a && !seen[s[i]] && t[s[i]] == i / k;
        if (good) seen[s[i]] = 1;
    }
    for (int64_t j = 0; good && j < a; j++) good = seen[j];
    free(seen);
    moe_tensor_release(sh);
    moe_tensor_release(th);
    return good;
}

static void test_router_slots(int64_t n, int64_t e, int64_t k, float cf) {
    moe_router_cfg cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.num_experts = e;
    cfg.top_k = k;
    cfg.score = MOE_SCORE_SOFTMAX;
    cfg.selection = MOE_SELECT_TOPK;
    cfg.renormalize = 1;
    cfg.capacity_factor = cf;
    cfg.aux = MOE_AUX_BATCH;
    moe_tensor *lh = host_randn(SH(n, e), 2.0f, 0.0f, 0);
    float *p = moe_f32(lh);
    for (int64_t i = 0; i < n; i++) p[i * e] += 1.5f;   /* overload expert 0: capacity drops */
    moe_tensor *ld = to_gpu(lh, MOE_F32);
    moe_routing rh, rd;
    moe_status sh = moe_route(ctx, NULL, &cfg, lh, NULL, NULL, 1, 0, 0, 0, &rh);
    moe_status sd = moe_route(ctx, NULL, &cfg, ld, NULL, NULL, 1, 0, 0, 0, &rd);
    if (sh != MOE_OK || sd != MOE_OK) {
        ok(0, "router slots N=%lld E=%lld k=%lld: routing failed: %s", (long long)n, (long long)e, (long long)k,
           moe_last_error());
    } else {
        int64_t dh = 0, dd = 0;
        int ch = slots_consistent(rh.slots, rh.token_idx, n, k, &dh);
        int cd = slots_consistent(rd.slots, rd.token_idx, n, k, &dd);
        ok(ch && dh == rh.stats.dropped, "router slots (host path) N=%lld E=%lld k=%lld cf=%g: consistent with token_idx, %lld dropped",
           (long long)n, (long long)e, (long long)k, (double)cf, (long long)dh);
        ok(cd && dd == rd.stats.dropped && rd.slots->device.type == MOE_CUDA,
           "router slots (device path) N=%lld E=%lld k=%lld cf=%g: consistent with token_idx, %lld dropped",
           (long long)n, (long long)e, (long long)k, (double)cf, (long long)dd);
        ok(cd && moe_tensor_index_trusted(rd.slots, rd.token_idx->shape[0]) && moe_tensor_index_trusted(rh.slots, rh.token_idx->shape[0]),
           "router slots: both maps carry the trusted bound A = %lld", (long long)rd.token_idx->shape[0]);
        ok(ch && cd && same_bytes(rd.slots, rh.slots), "router slots: the device map equals the host map");
    }
    moe_routing_clear(&rh);
    moe_routing_clear(&rd);
    moe_tensor_release(lh);
    moe_tensor_release(ld);
}

/* ---- the MoE block: slot map vs fallback ---- */

typedef struct { moe_tensor *y, *dx, *grads; } block_run;

static block_run run_block(moe_layer *l, moe_tensor *x, moe_tensor *r) {
    block_run o = {NULL, NULL, NULL};
    moe_tape *tape = moe_tape_new();
    moe_tensor *y = NULL;
    die_if(!tape || moe_layer_zero_grad(ctx, l) != MOE_OK, "tape / zero_grad");
    moe_status s = moe_layer_forward(l, ctx, tape, x, &y);
    if (s == MOE_OK) s = moe_tape_backward(ctx, tape, y, r);
    if (s == MOE_OK) {
        moe_tensor *gx = moe_tape_grad(tape, x);
        o.y = download(y, MOE_F32);
        o.dx = gx ? download(gx, MOE_F32) : NULL;
        o.grads = download(l->flat_grads, MOE_F32);
    }
    moe_tensor_release(y);
    moe_tape_free(tape);
    return o;
}

static void free_run(block_run *o) {
    moe_tensor_release(o->y); moe_tensor_release(o->dx); moe_tensor_release(o->grads);
}

/* the blocks these checks build: 8 SwiGLU experts of 64, top-k softmax, renormalized, batch aux */
static moe_block_cfg block_cfg(int64_t hidden, int64_t k, float cf) {
    moe_block_cfg c;
    memset(&c, 0, sizeof c);
    c.hidden = hidden;
    c.expert_inner = 64;
    c.activation = MOE_FFN_SWIGLU;
    c.router.num_experts = 8;
    c.router.top_k = k;
    c.router.score = MOE_SCORE_SOFTMAX;
    c.router.selection = MOE_SELECT_TOPK;
    c.router.renormalize = 1;
    c.router.capacity_factor = cf;
    c.router.aux = MOE_AUX_BATCH;
    c.seed = 5;
    return c;
}

static void test_block(int64_t k, float cf, moe_dtype dt) {
    const int64_t hidden = 96, tokens = 256;
    moe_block_cfg c = block_cfg(hidden, k, cf);
    moe_init init = {21, 0};
    moe_layer *l = moe_block_new(ctx, &c, NULL, &init);
    die_if(!l, "moe block");
    die_if(moe_layer_flatten(ctx, l, GPU) != MOE_OK, "block to gpu");
    if (dt == MOE_BF16) die_if(moe_layer_set_compute_dtype(ctx, l, MOE_BF16) != MOE_OK, "bf16 block");
    moe_tensor *xh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0), *rh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0);
    moe_tensor *x = to_gpu(xh, dt), *r = to_gpu(rh, dt);
    block_run a = run_block(l, x, r);
    die_if(moe_block_fetch_stats(ctx, l) != MOE_OK, "routing statistics");
    const moe_route_stats *st = moe_block_last_stats(l);
    int64_t dropped = st ? st->dropped : -1;
    setenv("MOELAB_MOE_GATHER", "0", 1);
    block_run b = run_block(l, x, r);
    unsetenv("MOELAB_MOE_GATHER");
    char name[160];
    snprintf(name, sizeof name, "MoE block top-%lld cf=%g (%lld dropped): slot map vs index_add fallback", (long long)k,
             (double)cf, (long long)dropped);
    if (!a.y || !a.dx || !b.y || !b.dx) {
        ok(0, "%s: a run failed: %s", name, moe_last_error());
    } else {
        double tol = dt == MOE_F32 ? 1e-5 : 3e-2;
        double ey = max_err(a.y, b.y), ex = max_err(a.dx, b.dx), eg = max_err(a.grads, b.grads);
        ok(ey <= tol && ex <= tol && eg <= tol && (cf == 0 || dropped > 0),
           "%s [%s]: max err y %.3g, dx %.3g, param grads %.3g", name, dtn(dt), ey, ex, eg);
    }
    free_run(&a);
    free_run(&b);
    moe_tensor_release(xh); moe_tensor_release(rh); moe_tensor_release(x); moe_tensor_release(r);
    moe_layer_release(l);
}

/* bf16, no capacity, SwiGLU, MOELAB_ROUTE_DEFER=1: the routing does not wait,
 * and every grouped GEMM of the step reads the offsets on the device; the same
 * results (the forward bit for bit) and statistics as with the wait (the default). */
static void test_block_deferred(int64_t k) {
    const int64_t hidden = 96, tokens = 512;
    moe_block_cfg c = block_cfg(hidden, k, 0.0f);
    moe_init init = {29, 0};
    moe_layer *l = moe_block_new(ctx, &c, NULL, &init);
    die_if(!l, "moe block");
    die_if(moe_layer_flatten(ctx, l, GPU) != MOE_OK || moe_layer_set_compute_dtype(ctx, l, MOE_BF16) != MOE_OK, "bf16 block");
    moe_tensor *xh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0), *rh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0);
    moe_tensor *x = to_gpu(xh, MOE_BF16), *r = to_gpu(rh, MOE_BF16);
    uint64_t d0 = 0, d1 = 0, d2 = 0, p0 = 0, p1 = 0, p2 = 0;
    die_if(moe_cuda_grouped_dev_calls(ctx, 0, &d0) != MOE_OK, "dev calls");
    die_if(moe_cuda_grouped_plan_shared_calls(ctx, 0, &p0) != MOE_OK, "shared plans");
    setenv("MOELAB_ROUTE_DEFER", "1", 1);
    block_run a = run_block(l, x, r);
    unsetenv("MOELAB_ROUTE_DEFER");
    die_if(moe_cuda_grouped_dev_calls(ctx, 0, &d1) != MOE_OK, "dev calls");
    die_if(moe_cuda_grouped_plan_shared_calls(ctx, 0, &p1) != MOE_OK, "shared plans");
    const int pending = moe_block_last_stats(l) == NULL;
    die_if(moe_block_fetch_stats(ctx, l) != MOE_OK, "routing statistics");
    const moe_route_stats *sa = moe_block_last_stats(l);
    int64_t ca[8] = {0}, sum = 0;
    for (int j = 0; sa && j < 8; j++) { ca[j] = sa->counts[j]; sum += ca[j]; }
    block_run b = run_block(l, x, r);
    die_if(moe_cuda_grouped_dev_calls(ctx, 0, &d2) != MOE_OK, "dev calls");
    die_if(moe_cuda_grouped_plan_shared_calls(ctx, 0, &p2) != MOE_OK, "shared plans");
    const moe_route_stats *sb = moe_block_last_stats(l);
    int same_counts = sa && sb && sb->assignments == sa->assignments;
    for (int j = 0; same_counts && j < 8; j++) same_counts = sb->counts[j] == ca[j];
    ok(pending && sa && sum == tokens * k && same_counts,
       "MoE block top-%lld deferred routing: statistics pending until fetched, then those of the waiting run "
       "(%lld assignments)", (long long)k, (long long)sum);
    /* forward: SwiGLU rows and down; backward: the weighted SwiGLU, the dx pair, three weight gradients */
    ok(d1 - d0 == 7 && d2 == d1, "MoE block top-%lld deferred routing: %llu grouped GEMMs read the offsets on the device "
       "(7 expected), %llu with the wait", (long long)k, (unsigned long long)(d1 - d0), (unsigned long long)(d2 - d1));
    /* the own kernel's calls among them (at least the SwiGLU forward, the weighted
     * backward and the gathered weight gradients of gate and up) take the routing's plan */
    ok(p1 - p0 >= 4 && p1 - p0 <= 7 && p2 == p1,
       "MoE block top-%lld deferred routing: %llu own-kernel calls took the routing's plan (4 to 7 expected), %llu "
       "with the wait", (long long)k, (unsigned long long)(p1 - p0), (unsigned long long)(p2 - p1));
    if (!a.y || !a.dx || !b.y || !b.dx) {
        ok(0, "MoE block top-%lld deferred routing: a run failed: %s", (long long)k, moe_last_error());
    } else {
        double ey = max_err(a.y, b.y), ex = max_err(a.dx, b.dx), eg = max_err(a.grads, b.grads);
        ok(ey == 0 && ex <= 3e-2 && eg <= 3e-2,
           "MoE block top-%lld deferred routing = waiting [bf16]: max err y %.3g (0 expected), dx %.3g, param grads %.3g",
           (long long)k, ey, ex, eg);
    }
    free_run(&a);
    free_run(&b);
    moe_tensor_release(xh); moe_tensor_release(rh); moe_tensor_release(x); moe_tensor_release(r);
    moe_layer_release(l);
}

/* The block on the GPU against its twin on the CPU (same config and init, f32:
 * the routing's choices match bit for bit). Without capacity the dispatch is
 * queued before the routing's wait (moe_block.c, dispatch_hook). */
static void test_block_cpu(int64_t k) {
    const int64_t hidden = 96, tokens = 256;
    moe_block_cfg c = block_cfg(hidden, k, 0.0f);
    moe_init ig = {23, 0}, ic = {23, 0};   /* the offset runs on as parameters are drawn: one each */
    moe_layer *lg = moe_block_new(ctx, &c, NULL, &ig), *lc = moe_block_new(ctx, &c, NULL, &ic);
    die_if(!lg || !lc, "moe blocks");
    die_if(moe_layer_flatten(ctx, lg, GPU) != MOE_OK || moe_layer_flatten(ctx, lc, MOE_DEVICE_CPU) != MOE_OK, "flatten");
    moe_tensor *xh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0), *rh = host_randn(SH(2, tokens / 2, hidden), 1.0f, 0.0f, 0);
    moe_tensor *x = to_gpu(xh, MOE_F32), *r = to_gpu(rh, MOE_F32);
    block_run a = run_block(lg, x, r), b = run_block(lc, xh, rh);
    if (!a.y || !a.dx || !b.y || !b.dx) {
        ok(0, "MoE block top-%lld on the GPU vs the CPU: a run failed: %s", (long long)k, moe_last_error());
    } else {
        double ey = max_err(a.y, b.y), ex = max_err(a.dx, b.dx), eg = max_err(a.grads, b.grads);
        ok(ey <= 1e-4 && ex <= 1e-4 && eg <= 1e-4, "MoE block top-%lld, no capacity, GPU vs CPU [f32]: max err y %.3g, dx %.3g, param grads %.3g",
           (long long)k, ey, ex, eg);
    }
    free_run(&a);
    free_run(&b);
    moe_tensor_release(xh); moe_tensor_release(rh); moe_tensor_release(x); moe_tensor_release(r);
    moe_layer_release(lg);
    moe_layer_release(lc);
}

/* ---- timings ---- */

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}
static void gpu_sync(void) { die_if(ctx->backends[MOE_CUDA]->synchronize(ctx, GPU) != MOE_OK, "synchronize"); }

static moe_tensor *gpu_randn(int nd, const int64_t *shape, moe_dtype dt) {
    moe_tensor *h = host_randn(nd, shape, 1.0f, 0.0f, 0), *d = to_gpu(h, dt);
    moe_tensor_release(h);
    return d;
}

#define TIME_US(reps, STMT, out_us)                                        \
    do {                                                                   \
        for (int w_ = 0; w_ < 3; w_++) die_if((STMT) != MOE_OK, #STMT);    \
        gpu_sync();                                                        \
        double t0_ = now_s();                                              \
        for (int r_ = 0; r_ < (reps); r_++) die_if((STMT) != MOE_OK, #STMT); \
        gpu_sync();                                                        \
        (out_us) = (now_s() - t0_) * 1e6 / (reps);                         \
    } while (0)

static void time_case(int64_t n, int64_t h, int64_t k, int64_t e) {
    const moe_dtype dt = MOE_BF16;
    const int reps = 50;
    routing r = make_routing(n, k, e, 0);
    const int64_t a = r.a;
    moe_tensor_set_index_bound(r.slots_d, a);   /* trusted, as the router's */
    moe_tensor_set_index_bound(r.tok_d, n);
    moe_tensor *src = gpu_randn(SH(a, h), dt), *w = gpu_randn(SH(a), dt), *dy = gpu_randn(SH(n, h), dt);
    moe_tensor *y = moe_tensor_new(ctx, dt, 2, (int64_t[]){n, h}, GPU);
    moe_tensor *dsrc = moe_tensor_new(ctx, dt, 2, (int64_t[]){a, h}, GPU), *dw = moe_tensor_new(ctx, dt, 1, (int64_t[]){a}, GPU);
    moe_tensor *tmp = moe_tensor_new(ctx, dt, 2, (int64_t[]){a, h}, GPU), *tmp2 = moe_tensor_new(ctx, dt, 2, (int64_t[]){a, h}, GPU);
    moe_tensor *wc = moe_tensor_view(w, 2, (int64_t[]){a, 1});
    die_if(!y || !dsrc || !dw || !tmp || !tmp2 || !wc, "timing tensors");
    const double es = (double)moe_dtype_size(dt);
    const double rows = (double)a * (double)h * es, toks = (double)n * (double)h * es;
    double us;

    TIME_US(reps, moe_op_gather_sum(ctx, y, src, w, r.slots_d), us);
    printf("# gather_sum (combine fwd)  N=%lld H=%lld k=%lld bf16: %8.1f us, %7.1f GB/s (reads A*H + writes N*H)\n",
           (long long)n, (long long)h, (long long)k, us, (rows + toks) / (us * 1e3));
    TIME_US(reps, moe_op_gather_sum(ctx, y, src, NULL, r.slots_d), us);
    printf("# gather_sum no w (dispatch bwd) N=%lld H=%lld k=%lld bf16: %8.1f us, %7.1f GB/s\n", (long long)n,
           (long long)h, (long long)k, us, (rows + toks) / (us * 1e3));
    TIME_US(reps, moe_op_index_select(ctx, dsrc, dy, r.tok_d), us);
    printf("# index_select (dispatch, by row)   N=%lld H=%lld k=%lld bf16: %8.1f us, %7.1f GB/s (reads and writes A*H)\n",
           (long long)n, (long long)h, (long long)k, us, 2.0 * rows / (us * 1e3));
    moe_tensor_mark_slot_map(r.slots_d);
    TIME_US(reps, moe_op_index_select_slots(ctx, dsrc, dy, r.tok_d, r.slots_d), us);
    printf("# index_select (dispatch, by token) N=%lld H=%lld k=%lld bf16: %8.1f us, %7.1f GB/s (reads N*H, writes A*H)\n",
           (long long)n, (long long)h, (long long)k, us, (rows + toks) / (us * 1e3));
    TIME_US(reps, moe_op_combine_backward(ctx, dsrc, dw, dy, src, w, r.tok_d), us);
    printf("# combine_backward          N=%lld H=%lld k=%lld bf16: %8.1f us, %7.1f GB/s (reads 2*A*H + writes A*H)\n",
           (long long)n, (long long)h, (long long)k, us, 3.0 * rows / (us * 1e3));
    /* the index_add path these replace, for comparison */
    moe_status st;
    double t0 = 0;
    for (int i = 0; i < 3 + reps; i++) {
        if (i == 3) { gpu_sync(); t0 = now_s(); }
        st = moe_op_fill(ctx, y, 0.0);
        if (st == MOE_OK) st = moe_op_binary(ctx, MOE_BIN_MUL, tmp, src, wc);
        if (st == MOE_OK) st = moe_op_index_add(ctx, y, r.tok_d, tmp);
        die_if(st != MOE_OK, "fallback combine");
    }
    gpu_sync();
    printf("# fallback combine fwd (fill + mul + index_add): %8.1f us\n", (now_s() - t0) * 1e6 / reps);
    for (int i = 0; i < 3 + reps; i++) {
        if (i == 3) { gpu_sync(); t0 = now_s(); }
        st = moe_op_index_select(ctx, tmp, dy, r.tok_d);
        if (st == MOE_OK) st = moe_op_binary(ctx, MOE_BIN_MUL, dsrc, tmp, wc);
        if (st == MOE_OK) st = moe_op_binary(ctx, MOE_BIN_MUL, tmp2, tmp, src);
        if (st == MOE_OK) st = moe_op_reduce(ctx, MOE_RED_SUM, dw, tmp2, 1);
        die_if(st != MOE_OK, "fallback combine backward");
    }
    gpu_sync();
    printf("# fallback combine bwd (index_select + 2 mul + reduce): %8.1f us\n", (now_s() - t0) * 1e6 / reps);
    for (int i = 0; i < 3 + reps; i++) {
        if (i == 3) { gpu_sync(); t0 = now_s(); }
        st = moe_op_fill(ctx, y, 0.0);
        if (st == MOE_OK) st = moe_op_index_add(ctx, y, r.tok_d, src);
        die_if(st != MOE_OK, "fallback dispatch backward");
    }
    gpu_sync();
    printf("# fallback dispatch bwd (fill + index_add): %8.1f us\n", (now_s() - t0) * 1e6 / reps);
    moe_tensor *all[] = {src, w, dy, y, dsrc, dw, tmp, tmp2, wc};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    free_routing(&r);
}

int main(void) {
    gpucheck_begin();
    const moe_dtype dts[2] = {MOE_F32, MOE_BF16};
    for (int i = 0; i < 2; i++) {
        moe_dtype dt = dts[i];
        /* N, k, experts, H, drop %, weighted */
        test_gather_sum(dt, 1, 1, 4, 64, 0, 1);          /* N = 1 */
        test_gather_sum(dt, 1, 4, 4, 13, 0, 1);          /* N = 1, odd H */
        test_gather_sum(dt, 257, 4, 32, 1024, 25, 1);
        test_gather_sum(dt, 129, 2, 8, 1001, 30, 1);     /* H not a multiple of 8 */
        test_gather_sum(dt, 100, 3, 8, 36, 30, 1);       /* H = 36: a multiple of 4, not of 8 */
        test_gather_sum(dt, 300, 8, 64, 2048, 20, 1);
        test_gather_sum(dt, 64, 4, 16, 7168, 25, 1);
        test_gather_sum(dt, 300, 8, 64, 2048, 20, 0);    /* the dispatch backward */
        test_gather_sum(dt, 77, 5, 8, 8192, 40, 0);
        test_gather_sum_add(dt, 257, 4, 32, 1024, 25);
        test_gather_sum_add(dt, 129, 2, 8, 1001, 30);   /* H not a multiple of 8: the scalar kernel */
        test_gather_sum_add(dt, 1, 4, 4, 13, 0);
        test_combine_backward(dt, 1, 1, 4, 64, 0, 1);
        test_combine_backward(dt, 1, 4, 4, 13, 0, 1);
        test_combine_backward(dt, 257, 4, 32, 1024, 25, 1);
        test_combine_backward(dt, 129, 2, 8, 1001, 30, 1);
        test_combine_backward(dt, 100, 3, 8, 36, 30, 1);
        test_combine_backward(dt, 40, 8, 64, 2048, 10, 1);   /* OLMoE's rows: several vector batches a lane */
        test_combine_backward(dt, 17, 2, 8, 4100, 0, 1);
        test_combine_backward(dt, 300, 8, 64, 2048, 20, 1);
        test_combine_backward(dt, 64, 4, 16, 7168, 25, 1);
        test_combine_backward(dt, 77, 5, 8, 8192, 40, 1);
        test_combine_backward(dt, 257, 4, 32, 1024, 25, 0);   /* no dw */
        test_combine_backward(dt, 90, 10, 16, 520, 20, 1);    /* k past one batch of 8 (by token) */
        test_combine_backward(dt, 33, 16, 32, 2048, 0, 1);
        test_select_by_token(dt, 300, 8, 64, 2048, 0);    /* the OLMoE layer's rows */
        test_select_by_token(dt, 257, 4, 32, 1024, 25);   /* drops: tokens with 0..k rows */
        test_select_by_token(dt, 129, 2, 8, 1001, 30);    /* rows not whole 16-byte words: by row */
        test_select_by_token(dt, 1, 4, 4, 64, 0);
        test_select_by_token(dt, 90, 10, 16, 520, 20);
    }
    test_determinism(MOE_BF16, 2048, 4, 2048);
    test_determinism(MOE_F32, 1000, 8, 1000);
    test_ranges();
    test_router_slots(1024, 16, 2, 1.0f);
    test_router_slots(999, 60, 4, 1.25f);
    test_router_slots(1, 8, 2, 0.0f);
    test_block(2, 0.8f, MOE_F32);
    test_block(4, 0.0f, MOE_F32);
    test_block(2, 0.8f, MOE_BF16);
    test_block(4, 0.0f, MOE_BF16);   /* no capacity: the queued dispatch, the fused SwiGLU experts */
    test_block_deferred(2);
    test_block_deferred(8);
    test_block_cpu(4);
    test_block_cpu(1);
    if (!getenv("MOELAB_CHECK_NO_TIMING")) {
        time_case(8192, 1024, 4, 32);
        time_case(16384, 2048, 8, 64);
    }
    return gpucheck_end();
}
