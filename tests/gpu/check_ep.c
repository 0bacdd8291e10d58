/* check_ep: the expert-parallel routing maps (ops.h: ep_token_slots,
 * slot_tokens, ep_pack, ep_unpack) on CUDA against the CPU backend, on fresh
 * random routings (distinct experts per token, some choices dropped, tokens
 * with no kept choice), P = 1, 2, 4, 8 ranks, k = 1..8:
 * - every output byte-identical to the CPU's, counts equal;
 * - the maps mean what they say: tslots numbers (token, rank) rows rank-major,
 *   slot_tokens inverts it, unpack(pack) puts every assignment back at its
 *   token and position;
 * - ep_regroup: expert-major order and its inverse, empty blocks, 1024 blocks;
 * - an untrusted out-of-range slot is MOE_ERR_RANGE on both; a packed value
 *   out of range is an error on the CPU and dropped (never written) on the GPU.
 * TAP; skips without a GPU. */
#include "gpucheck.h"

static uint64_t lcg_state = 0x9e3779b97f4a7c15ull;
static uint64_t lcg(void) {
    lcg_state = lcg_state * 6364136223846793005ull + 1442695040888963407ull;
    return lcg_state >> 33;
}

typedef struct {
    int64_t n, k, e, a;
    moe_tensor *slots, *tok, *ex;   /* host: i32 [n, k], i64 [a], i64 [a] */
} routing;

/* the router's layout: kept choices expert-contiguous, tokens ascending */
static routing make_routing(int64_t n, int64_t k, int64_t e, int drop_pct) {
    routing r = {n, k, e, 0, NULL, NULL, NULL};
    int64_t *choice = malloc((size_t)(n * k) * sizeof *choice), *cnt = calloc((size_t)e + 1, sizeof *cnt);
    die_if(!choice || !cnt, "routing scratch");
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < k; q++) {
            int64_t j;
            int dup;
            do {   /* distinct experts per token, as top-k gives */
                j = (int64_t)(lcg() % (uint64_t)e);
                dup = 0;
                for (int64_t c = 0; c < q; c++) dup |= choice[t * k + c] == j || choice[t * k + c] == -2 - j;
            } while (dup);
            int drop = (t % 17 == 3) || (int)(lcg() % 100) < drop_pct;
            choice[t * k + q] = drop ? -2 - j : j;   /* dropped: remembered, kept out */
            if (!drop) { cnt[j + 1]++; r.a++; }
        }
    for (int64_t j = 0; j < e; j++) cnt[j + 1] += cnt[j];
    r.slots = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){n, k});
    r.tok = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    r.ex = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    die_if(!r.slots || !r.tok || !r.ex, "routing tensors");
    int32_t *sl = moe_tensor_data(r.slots);
    int64_t *tk = moe_tensor_data(r.tok), *ex = moe_tensor_data(r.ex);
    /* expert-major, tokens ascending: walk experts, then tokens */
    for (int64_t t = 0; t < n * k; t++) sl[t] = -1;
    for (int64_t j = 0; j < e; j++)
        for (int64_t t = 0; t < n; t++)
            for (int64_t q = 0; q < k; q++)
                if (choice[t * k + q] == j) {
                    int64_t d = cnt[j]++;
                    sl[t * k + q] = (int32_t)d;
                    tk[d] = t;
                    ex[d] = j;
                }
    free(choice);
    free(cnt);
    return r;
}

static void free_routing(routing *r) {
    moe_tensor_release(r->slots); moe_tensor_release(r->tok); moe_tensor_release(r->ex);
}

static moe_tensor *up(moe_tensor *h, int64_t bound) {
    moe_tensor *d = moe_op_to(ctx, h, GPU, h->dtype);
    die_if(!d, "upload");
    if (bound > 0) moe_tensor_set_index_bound(d, bound);   /* as the router marks its maps */
    return d;
}

static int same(const moe_tensor *host, const moe_tensor *dev) {
    moe_tensor *b = moe_op_to(ctx, (moe_tensor *)dev, MOE_DEVICE_CPU, dev->dtype);
    die_if(!b, "download");
    int eq = host->dtype == b->dtype && moe_tensor_nbytes(host) == moe_tensor_nbytes(b) &&
             !memcmp(moe_tensor_data((moe_tensor *)host), moe_tensor_data(b), moe_tensor_nbytes(b));
    moe_tensor_release(b);
    return eq;
}

static void test_maps(int64_t n, int64_t k, int64_t e, int64_t p, int drop_pct) {
    routing r = make_routing(n, k, e, drop_pct);
    const int64_t gs = e / p, width = k < gs ? k : gs;
    char name[128];
    snprintf(name, sizeof name, "N=%lld k=%lld E=%lld P=%lld A=%lld", (long long)n, (long long)k, (long long)e,
             (long long)p, (long long)r.a);
    moe_tensor *slots_d = up(r.slots, r.a), *tok_d = up(r.tok, n), *ex_d = up(r.ex, e);
    moe_tensor *ts_h = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){n, p});
    moe_tensor *ts_d = moe_tensor_new(ctx, MOE_I32, 2, (int64_t[]){n, p}, GPU);
    moe_tensor *ch_t = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){p});
    moe_tensor *cd_t = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){p}, GPU);
    die_if(!ts_h || !ts_d || !ch_t || !cd_t, "tslots");
    moe_status s1 = moe_op_ep_token_slots(ctx, ts_h, ch_t, r.slots, r.ex, gs);
    moe_status s2 = moe_op_ep_token_slots(ctx, ts_d, cd_t, slots_d, ex_d, gs);
    ok(s1 == MOE_OK && s2 == MOE_OK && same(ts_h, ts_d) && same(ch_t, cd_t) && ts_d->index_bound == n * p,
       "ep_token_slots %s: tslots and counts equal the cpu, device bound N*P", name);
    const int64_t *ch = moe_tensor_data(ch_t);
    /* meaning: row numbers rank-major, tokens ascending, exactly the tokens with a choice on the rank */
    const int32_t *ts = moe_tensor_data(ts_h), *sl = moe_tensor_data(r.slots);
    const int64_t *ex = moe_tensor_data(r.ex);
    int64_t row = 0, good = 1, total = 0;
    for (int64_t d = 0; d < p; d++) {
        total += ch[d];
        for (int64_t t = 0; t < n; t++) {
            int has = 0;
            for (int64_t q = 0; q < k; q++) has |= sl[t * k + q] >= 0 && ex[sl[t * k + q]] / gs == d;
            if (has ? ts[t * p + d] != row++ : ts[t * p + d] != -1) good = 0;
        }
    }
    ok(good && row == total, "ep_token_slots %s: %lld token rows numbered rank-major, tokens ascending", name,
       (long long)total);

    moe_tensor *st_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){total});
    moe_tensor *st_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){total}, GPU);
    die_if(!st_h || !st_d, "send tokens");
    s1 = moe_op_slot_tokens(ctx, st_h, ts_h);
    s2 = moe_op_slot_tokens(ctx, st_d, ts_d);
    good = s1 == MOE_OK && s2 == MOE_OK && same(st_h, st_d);
    const int64_t *stk = moe_tensor_data(st_h);
    for (int64_t t = 0; good && t < n; t++)
        for (int64_t d = 0; d < p; d++)
            if (ts[t * p + d] >= 0 && stk[ts[t * p + d]] != t) good = 0;
    ok(good, "slot_tokens %s: the inverse of tslots, equal to the cpu", name);

    /* pack with a per-rank shift, then unpack as one owner holding every row */
    /* growing shifts keep the ranks' shifted rows apart (one owner holds all) */
    int64_t adjust[MOE_EP_MAX_RANKS];
    for (int64_t d = 0; d < p; d++) adjust[d] = (d ? adjust[d - 1] : 0) + (int64_t)(lcg() % 3);
    int64_t u = total + adjust[p - 1] + 1;
    moe_tensor *pk_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    moe_tensor *pk_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){r.a}, GPU);
    die_if(!pk_h || !pk_d, "packed");
    s1 = moe_op_ep_pack(ctx, pk_h, r.tok, r.ex, r.slots, ts_h, gs, width, adjust);
    s2 = moe_op_ep_pack(ctx, pk_d, tok_d, ex_d, slots_d, ts_d, gs, width, adjust);
    ok(s1 == MOE_OK && s2 == MOE_OK && same(pk_h, pk_d), "ep_pack %s: equal to the cpu", name);

    /* a random permutation of the assignments as the regrouping */
    moe_tensor *perm_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    die_if(!perm_h, "perm");
    int64_t *pm = moe_tensor_data(perm_h);
    for (int64_t i = 0; i < r.a; i++) pm[i] = i;
    for (int64_t i = r.a - 1; i > 0; i--) {
        int64_t j = (int64_t)(lcg() % (uint64_t)(i + 1)), x = pm[i];
        pm[i] = pm[j];
        pm[j] = x;
    }
    moe_tensor *perm_d = up(perm_h, r.a);
    moe_tensor *tl_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r.a});
    moe_tensor *tl_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){r.a}, GPU);
    moe_tensor *sl_h = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){u, width});
    moe_tensor *sl_d = moe_tensor_new(ctx, MOE_I32, 2, (int64_t[]){u, width}, GPU);
    die_if(!tl_h || !tl_d || !sl_h || !sl_d, "unpack outputs");
    s1 = moe_op_ep_unpack(ctx, tl_h, sl_h, pk_h, perm_h);
    s2 = moe_op_ep_unpack(ctx, tl_d, sl_d, pk_d, perm_d);
    good = s1 == MOE_OK && s2 == MOE_OK && same(tl_h, tl_d) && same(sl_h, sl_d);
    /* row i is assignment pm[i]: its token's row (shifted) and its slot */
    const int64_t *tl = moe_tensor_data(tl_h), *tk = moe_tensor_data(r.tok);
    const int32_t *sll = moe_tensor_data(sl_h);
    int64_t filled = 0;
    for (int64_t i = 0; good && i < r.a; i++) {
        int64_t a = pm[i], t = tk[a], d = ex[a] / gs;
        if (tl[i] != ts[t * p + d] + adjust[d]) good = 0;
    }
    for (int64_t c = 0; c < u * width; c++) filled += sll[c] >= 0;
    ok(good && filled == r.a, "ep_unpack %s: token rows and slots of every assignment, equal to the cpu", name);

    moe_tensor *all[] = {slots_d, tok_d, ex_d, ts_h, ts_d, st_h, st_d, pk_h, pk_d, perm_h, perm_d, tl_h, tl_d, sl_h, sl_d, ch_t, cd_t};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    free_routing(&r);
}

static void test_regroup(int64_t ranks, int64_t experts, int empty_pct) {
    int64_t counts[MOE_EP_MAX_BLOCKS], r = 0;
    for (int64_t i = 0; i < ranks * experts; i++) {
        counts[i] = (int)(lcg() % 100) < empty_pct ? 0 : (int64_t)(lcg() % 700);
        r += counts[i];
    }
    moe_tensor *ph = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r}), *ih = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){r});
    moe_tensor *pd = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){r}, GPU), *id = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){r}, GPU);
    die_if(!ph || !ih || !pd || !id, "regroup tensors");
    moe_status s1 = moe_op_ep_regroup(ctx, ph, ih, counts, ranks, experts);
    moe_status s2 = moe_op_ep_regroup(ctx, pd, id, counts, ranks, experts);
    /* meaning: perm walks experts, then ranks, each block in received order */
    const int64_t *pm = moe_tensor_data(ph), *iv = moe_tensor_data(ih);
    int good = s1 == MOE_OK && s2 == MOE_OK && same(ph, pd) && same(ih, id);
    int64_t k = 0;
    for (int64_t j = 0; good && j < experts; j++)
        for (int64_t src = 0; src < ranks; src++) {
            int64_t start = 0;
            for (int64_t i = 0; i < src * experts + j; i++) start += counts[i];
            for (int64_t t = 0; t < counts[src * experts + j]; t++, k++)
                if (pm[k] != start + t || iv[pm[k]] != k) good = 0;
        }
    ok(good && k == r, "ep_regroup %lld ranks x %lld experts, %lld rows (%d%% empty blocks): equal to the cpu, the "
       "expert-major order and its inverse", (long long)ranks, (long long)experts, (long long)r, empty_pct);
    moe_tensor_release(ph); moe_tensor_release(ih); moe_tensor_release(pd); moe_tensor_release(id);
}

static void test_errors(void) {
    routing r = make_routing(50, 2, 8, 10);
    moe_tensor *bad = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){50, 2});
    die_if(!bad, "bad slots");
    memcpy(moe_tensor_data(bad), moe_tensor_data(r.slots), moe_tensor_nbytes(bad));
    ((int32_t *)moe_tensor_data(bad))[37] = (int32_t)r.a + 3;
    moe_tensor *bad_d = up(bad, 0), *ex_d = up(r.ex, 8);
    moe_tensor *ts_h = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){50, 2});
    moe_tensor *ts_d = moe_tensor_new(ctx, MOE_I32, 2, (int64_t[]){50, 2}, GPU);
    moe_tensor *cnt_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){2});
    moe_tensor *cnt_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){2}, GPU);
    moe_status s1 = moe_op_ep_token_slots(ctx, ts_h, cnt_h, bad, r.ex, 4);
    char m1[256];
    snprintf(m1, sizeof m1, "%s", moe_last_error());
    moe_status s2 = moe_op_ep_token_slots(ctx, ts_d, cnt_d, bad_d, ex_d, 4);
    ok(s1 == MOE_ERR_RANGE && s2 == MOE_ERR_RANGE && strstr(m1, "position 37") && strstr(moe_last_error(), "position 37"),
       "ep_token_slots: an untrusted slot out of range is MOE_ERR_RANGE on both (%s)", moe_last_error());

    /* packed values out of range: the cpu refuses, the device drops them */
    moe_tensor *pk = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){3});
    int64_t *pv = moe_tensor_data(pk);
    pv[0] = 1; pv[1] = 99; pv[2] = 4;
    moe_tensor *pk_d = up(pk, 0);
    moe_tensor *tl_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){3});
    moe_tensor *tl_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){3}, GPU);
    moe_tensor *sl_h = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){3, 2});
    moe_tensor *sl_d = moe_tensor_new(ctx, MOE_I32, 2, (int64_t[]){3, 2}, GPU);
    s1 = moe_op_ep_unpack(ctx, tl_h, sl_h, pk, NULL);
    snprintf(m1, sizeof m1, "%s", moe_last_error());
    s2 = moe_op_ep_unpack(ctx, tl_d, sl_d, pk_d, NULL);
    moe_tensor *tl_b = moe_op_to(ctx, tl_d, MOE_DEVICE_CPU, MOE_I64), *sl_b = moe_op_to(ctx, sl_d, MOE_DEVICE_CPU, MOE_I32);
    die_if(!tl_b || !sl_b, "download");
    const int64_t *tl = moe_tensor_data(tl_b);
    const int32_t *sl = moe_tensor_data(sl_b);
    ok(s1 == MOE_ERR_RANGE && strstr(m1, "99") && s2 == MOE_OK && tl[0] == 0 && tl[1] == 0 && tl[2] == 2 &&
       sl[0] == -1 && sl[1] == 0 && sl[2] == -1 && sl[3] == -1 && sl[4] == 2 && sl[5] == -1,
       "ep_unpack: a packed value out of range is an error on the cpu (%s), dropped on the device", m1);
    /* slot_tokens on a map that leaves row 1 unnamed: the cpu refuses, the device leaves 0 (inside the bound) */
    moe_tensor *gap = moe_tensor_new_cpu(MOE_I32, 2, (int64_t[]){2, 2});
    int32_t *gv = moe_tensor_data(gap);
    gv[0] = 0; gv[1] = -1; gv[2] = -1; gv[3] = 2;
    moe_tensor *gap_d = up(gap, 0);
    moe_tensor *st_h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){3});
    moe_tensor *st_d = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){3}, GPU);
    die_if(!st_d || moe_op_fill(ctx, st_d, 7.0) != MOE_OK, "slot_tokens output");
    s1 = moe_op_slot_tokens(ctx, st_h, gap);
    snprintf(m1, sizeof m1, "%s", moe_last_error());
    s2 = moe_op_slot_tokens(ctx, st_d, gap_d);
    moe_tensor *st_b = moe_op_to(ctx, st_d, MOE_DEVICE_CPU, MOE_I64);
    die_if(!st_b, "download");
    const int64_t *sv = moe_tensor_data(st_b);
    ok(s1 == MOE_ERR_RANGE && strstr(m1, "row 1") && s2 == MOE_OK && sv[0] == 0 && sv[1] == 0 && sv[2] == 1,
       "slot_tokens: a row no slot names is an error on the cpu (%s), 0 on the device", m1);
    moe_tensor *all[] = {bad, bad_d, cnt_h, cnt_d, ex_d, ts_h, ts_d, pk, pk_d, tl_h, tl_d, sl_h, sl_d, tl_b, sl_b,
                         gap, gap_d, st_h, st_d, st_b};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    free_routing(&r);
}

int main(void) {
    gpucheck_begin();
    /* N, k, E, P, drop % */
    test_maps(1, 1, 4, 2, 0);
    test_maps(257, 4, 32, 2, 10);
    test_maps(1000, 2, 8, 4, 25);
    test_maps(4096, 8, 64, 8, 5);
    test_maps(3000, 4, 32, 1, 0);
    test_maps(2500, 6, 12, 4, 30);    /* width = group size 3 < k */
    test_maps(8192, 4, 32, 2, 0);     /* the step model's layer */
    test_regroup(2, 16, 0);
    test_regroup(4, 8, 30);
    test_regroup(8, 128, 50);   /* the 1024 blocks a kernel argument holds */
    test_regroup(1, 1, 0);
    test_errors();
    return gpucheck_end();
}
