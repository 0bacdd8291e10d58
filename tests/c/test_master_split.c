/* The split master on the CPU backend (ops.h, moe_master_hi): the two planes
 * give back every f32's bits (NaN aside, which stays a NaN); the high plane
 * is the value rounded to bf16 with ties away from zero; AdamW on the planes
 * writes the bits the f32 update writes, with every state and gradient dtype,
 * with runs and with gaps left alone; the argument checks; and parked storage
 * (tensor.h) coming back through moe_tensor_data and the ops layer. Prints TAP. */
#include "../../src/core/rng.h"
#include "../../src/ops/backend.h"
#include "tap.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static moe_ctx *ctx;

static void die_if(int cond, const char *what) {
    if (cond) {
        printf("Bail out! %s: %s\n", what, moe_last_error());
        exit(1);
    }
}

static moe_tensor *new1(moe_dtype dt, int64_t n) {
    moe_tensor *t = moe_tensor_new_cpu(dt, 1, &n);
    die_if(!t, "tensor");
    return t;
}

static uint32_t bits_of(float f) { union { float f; uint32_t u; } x = {.f = f}; return x.u; }
static float float_of(uint32_t u) { union { uint32_t u; float f; } x = {.u = u}; return x.f; }

/* the bf16 nearest to x, ties away from zero, by arithmetic on the value (not on bits) */
static uint16_t ties_away(float x) {
    uint16_t t = (uint16_t)(bits_of(x) >> 16);   /* truncated toward zero */
    double lo = float_of((uint32_t)t << 16), up = float_of((uint32_t)(t + 1) << 16);
    if ((t & 0x7fffu) == 0x7f7fu) up = copysign(ldexp(1.0, 128), x);   /* past the largest bf16: overflow */
    double dl = fabs((double)x - lo), du = fabs(up - x);
    return du <= dl ? (uint16_t)(t + 1) : t;
}

static void test_planes(void) {
    const int64_t n = 4096;
    moe_tensor *src = new1(MOE_F32, n), *hi = new1(MOE_BF16, n), *lo = new1(MOE_I16, n), *back = new1(MOE_F32, n);
    uint32_t *u = moe_tensor_data(src);
    moe_rng_normal(moe_f32(src), n, moe_rng_key(7, MOE_RNG_USER), 0);
    /* the edges: zeros, ties either side of an even and an odd bf16, carries into the exponent,
     * the largest finite values (which round to infinity), infinities, subnormals, NaNs */
    const uint32_t edge[] = {0x00000000u, 0x80000000u, 0x3f808000u, 0x3f818000u, 0xbf808000u, 0xbf818000u,
                             0x3fffffffu, 0x3f7fffffu, 0x7f7fffffu, 0xff7fffffu, 0x7f800000u, 0xff800000u,
                             0x00000001u, 0x00008000u, 0x807fffffu, 0x7fc00000u, 0xffc00001u, 0x7f800001u,
                             0x3f807fffu, 0x3f808001u};
    const int ne = (int)(sizeof edge / sizeof edge[0]);
    for (int i = 0; i < ne; i++) u[i] = edge[i];
    /* every 16-bit remainder once, over one exponent: each rounding case */
    for (int64_t i = 0; i < 2048; i++) u[64 + i] = 0x40490000u + (uint32_t)(i * 32 + (i & 31));
    moe_status s = moe_op_master_split(ctx, hi, lo, src);
    if (s == MOE_OK) s = moe_op_master_join(ctx, back, hi, lo);
    const uint32_t *b = moe_tensor_data(back);
    const uint16_t *h = moe_tensor_data(hi);
    int64_t bad_bits = -1, bad_hi = -1, bad_nan = -1;
    for (int64_t i = 0; i < n; i++) {
        int nan = (u[i] & 0x7fffffffu) > 0x7f800000u;
        if (nan) {
            if (bad_nan < 0 && !((b[i] & 0x7fffffffu) > 0x7f800000u && (b[i] >> 31) == (u[i] >> 31) &&
                                 (h[i] & 0x7fffu) > 0x7f80u))
                bad_nan = i;
            continue;
        }
        if (bad_bits < 0 && b[i] != u[i]) bad_bits = i;
        /* the high plane: ties away from zero (the largest finite values round up to infinity) */
        uint16_t want = ties_away(float_of(u[i]));
        if (isinf(float_of(u[i]))) want = (uint16_t)(u[i] >> 16);
        if (bad_hi < 0 && h[i] != want) bad_hi = i;
    }
    report(s == MOE_OK && bad_bits < 0, "split then join gives every f32's bits back",
           "status %s (%s); first differing element %lld: %08x -> %08x", moe_status_name(s), moe_last_error(),
           (long long)bad_bits, bad_bits >= 0 ? u[bad_bits] : 0, bad_bits >= 0 ? b[bad_bits] : 0);
    report(s == MOE_OK && bad_hi < 0, "the high plane is the value rounded to bf16, ties away from zero",
           "first bad element %lld: %08x -> hi %04x", (long long)bad_hi, bad_hi >= 0 ? u[bad_hi] : 0,
           bad_hi >= 0 ? h[bad_hi] : 0);
    report(s == MOE_OK && bad_nan < 0, "a NaN stays a NaN of its sign in both planes' join and in the high plane",
           "element %lld", (long long)bad_nan);
    /* ties away differs from round-to-nearest-even only at ties below an even bf16 */
    int64_t differ = 0, wrong = 0;
    for (int64_t i = 0; i < n; i++) {
        if ((u[i] & 0x7fffffffu) > 0x7f800000u || h[i] == moe_f32_to_bf16(float_of(u[i]))) continue;
        differ++;
        if ((u[i] & 0xffffu) != 0x8000u || ((u[i] >> 16) & 1u)) wrong++;
    }
    report(differ > 0 && wrong == 0, "only ties below an even bf16 round otherwise than to nearest even",
           "%lld differ, %lld of them not such ties", (long long)differ, (long long)wrong);
    /* the high plane alone (lo NULL: the compute copy of f32 values) */
    moe_tensor *h2 = new1(MOE_BF16, n);
    moe_status s2 = moe_op_master_split(ctx, h2, NULL, src);
    report(s2 == MOE_OK && !memcmp(moe_tensor_data(h2), moe_tensor_data(hi), (size_t)n * 2),
           "split without a low plane writes the same high plane", "status %s (%s)", moe_status_name(s2),
           moe_last_error());
    report(moe_op_master_join(ctx, back, hi, NULL) == MOE_ERR_ARG, "join refuses a missing low plane", "%s",
           moe_last_error());
    moe_tensor_release(h2);
    /* argument checks */
    moe_tensor *short_lo = new1(MOE_I16, n - 1), *f32_hi = new1(MOE_F32, n);
    report(moe_op_master_split(ctx, hi, short_lo, src) == MOE_ERR_SHAPE, "split refuses a plane of another length",
           "%s", moe_last_error());
    report(moe_op_master_join(ctx, back, f32_hi, lo) == MOE_ERR_DTYPE, "join refuses a high plane that is not bf16",
           "%s", moe_last_error());
    report(moe_op_master_split(ctx, hi, lo, NULL) == MOE_ERR_ARG, "split refuses a missing source", "%s",
           moe_last_error());
    moe_tensor_release(short_lo); moe_tensor_release(f32_hi);
    moe_tensor_release(src); moe_tensor_release(hi); moe_tensor_release(lo); moe_tensor_release(back);
}

/* AdamW on the planes against AdamW on f32 params with a bf16 compute copy:
 * the master's bits after 3 steps; the high plane = the master, ties away */
static void test_adamw_planes(moe_dtype sdt, moe_dtype gdt, int with_runs) {
    const int64_t n = 3001;
    moe_tensor *p = new1(MOE_F32, n), *c = new1(MOE_BF16, n), *hi = new1(MOE_BF16, n), *lo = new1(MOE_I16, n);
    moe_tensor *m[2] = {new1(sdt, n), new1(sdt, n)}, *v[2] = {new1(sdt, n), new1(sdt, n)};
    moe_tensor *g32 = new1(MOE_F32, n), *g = new1(gdt, n), *back = new1(MOE_F32, n);
    moe_rng_normal(moe_f32(p), n, moe_rng_key(11, MOE_RNG_USER), 0);
    for (int k = 0; k < 2; k++) die_if(moe_op_fill(ctx, m[k], 0.0) || moe_op_fill(ctx, v[k], 0.0), "fill");
    die_if(moe_op_master_split(ctx, hi, lo, p) != MOE_OK || moe_op_master_split(ctx, c, NULL, p) != MOE_OK, "split");
    const moe_adamw_run runs[3] = {{0, 1003, 1e-2f, 0.1f}, {1008, 1013, 2e-2f, 0.0f}, {1024, 2999, 5e-3f, 0.2f}};
    moe_status s = MOE_OK;
    for (int t = 1; t <= 3 && s == MOE_OK; t++) {
        moe_rng_normal(moe_f32(g32), n, moe_rng_key(100 + (uint64_t)t, MOE_RNG_USER), 0);
        die_if(moe_op_copy(ctx, g, g32) != MOE_OK, "grads");
        moe_adamw_cfg cf = {.lr = 3e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .step = t,
                            .compute = c, .grad_scale = 0.5f, .index0 = 40};
        if (with_runs) { cf.n_runs = 3; cf.runs = runs; }
        moe_adamw_cfg cs = cf;
        cs.compute = NULL;
        cs.lo = lo;
        s = moe_op_adamw(ctx, p, g, m[0], v[0], &cf);
        if (s == MOE_OK) s = moe_op_adamw(ctx, hi, g, m[1], v[1], &cs);
    }
    if (s == MOE_OK) s = moe_op_master_join(ctx, back, hi, lo);
    const uint32_t *pu = moe_tensor_data(p), *bu = moe_tensor_data(back);
    const uint16_t *h = moe_tensor_data(hi);
    int64_t bad = -1, bad_hi = -1;
    for (int64_t i = 0; i < n; i++) {
        if (bad < 0 && pu[i] != bu[i]) bad = i;
        if (bad_hi < 0 && h[i] != moe_master_hi(pu[i])) bad_hi = i;
    }
    size_t sb = (size_t)n * moe_dtype_size(sdt);
    int same_state = !memcmp(moe_tensor_data(m[0]), moe_tensor_data(m[1]), sb) &&
                     !memcmp(moe_tensor_data(v[0]), moe_tensor_data(v[1]), sb);
    /* the f32 update's compute copy rounds as the high plane does: the same bytes */
    int same_copy = !memcmp(moe_tensor_data(c), moe_tensor_data(hi), (size_t)n * 2);
    char name[160];
    snprintf(name, sizeof name, "adamw on the split master = on f32 params, 3 steps, %s moments, %s gradients%s",
             moe_dtype_name(sdt), moe_dtype_name(gdt), with_runs ? ", runs with gaps" : "");
    report(s == MOE_OK && bad < 0 && bad_hi < 0 && same_state && same_copy, name,
           "status %s (%s); first differing master element %lld, high plane %lld; m and v %s; compute copy %s",
           moe_status_name(s), moe_last_error(), (long long)bad, (long long)bad_hi, same_state ? "same" : "differ",
           same_copy ? "same" : "differs");
    if (with_runs && sdt == MOE_F32 && gdt == MOE_F32) {
        /* the split update refuses a compute copy beside its planes, and planes of the wrong dtypes */
        moe_adamw_cfg cs = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step = 1, .lo = lo, .compute = c};
        report(moe_op_adamw(ctx, hi, g, m[1], v[1], &cs) == MOE_ERR_ARG, "adamw refuses a compute copy with a split master",
               "%s", moe_last_error());
        cs.compute = NULL;
        report(moe_op_adamw(ctx, p, g, m[1], v[1], &cs) == MOE_ERR_DTYPE, "adamw refuses f32 params with a low plane",
               "%s", moe_last_error());
        moe_tensor *lo_short = new1(MOE_I16, n - 8);
        cs.lo = lo_short;
        report(moe_op_adamw(ctx, hi, g, m[1], v[1], &cs) == MOE_ERR_SHAPE, "adamw refuses a low plane of another length",
               "%s", moe_last_error());
        moe_tensor_release(lo_short);
    }
    moe_tensor *all[] = {p, c, hi, lo, m[0], m[1], v[0], v[1], g32, g, back};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

/* parked storage: a restore hook that refills the bytes, counted */
typedef struct {
    moe_storage_park park;
    int restores, destroyed, fail;
    float fill;
} test_park;

static moe_status test_restore(moe_storage *s, moe_storage_park *p) {
    test_park *tp = (test_park *)p;
    if (tp->fail) return moe_error(MOE_ERR_STATE, "test park: refused");
    s->data = s->alloc->alloc(s->alloc, s->nbytes);
    if (!s->data) return moe_last_status();
    for (size_t i = 0; i < s->nbytes / 4; i++) ((float *)s->data)[i] = tp->fill;
    tp->restores++;
    return MOE_OK;
}

static void test_destroy(moe_storage_park *p) { ((test_park *)p)->destroyed++; }

static void park(moe_tensor *t) {
    t->storage->alloc->free(t->storage->alloc, t->storage->data, t->storage->nbytes);
    t->storage->data = NULL;
}

static void test_parked_storage(void) {
    static test_park tp = {{test_restore, test_destroy}, 0, 0, 0, 1.5f};
    moe_tensor *t = new1(MOE_F32, 64), *out = new1(MOE_F32, 8);
    t->storage->park = &tp.park;
    park(t);
    moe_tensor *view = moe_tensor_narrow(t, 0, 8, 8);   /* a header only: nothing restored */
    int quiet = tp.restores == 0 && view && !t->storage->data;
    moe_status s = moe_op_copy(ctx, out, view);
    report(quiet && s == MOE_OK && tp.restores == 1 && moe_f32(out)[0] == 1.5f,
           "a parked storage stays parked for views and comes back when an op reads it",
           "views quiet %d, status %s, restores %d, value %g", quiet, moe_status_name(s), tp.restores,
           s == MOE_OK ? (double)moe_f32(out)[0] : 0.0);
    park(t);
    tp.fill = -2.0f;
    float *d = moe_tensor_data(view);
    report(d && d[0] == -2.0f && tp.restores == 2, "moe_tensor_data brings parked memory back", "restores %d",
           tp.restores);
    park(t);
    tp.fail = 1;
    s = moe_op_fill(ctx, t, 0.0);
    report(s == MOE_ERR_STATE && strstr(moe_last_error(), "test park") && !t->storage->data,
           "a restore that fails is the op's error, and the memory stays parked", "status %s (%s)",
           moe_status_name(s), moe_last_error());
    moe_tensor_release(view);
    moe_tensor_release(t);
    report(tp.destroyed == 1, "the hook is destroyed with the storage, parked or not", "destroyed %d", tp.destroyed);
    moe_tensor_release(out);
}

int main(void) {
    ctx = moe_ctx_new(2);
    die_if(!ctx, "context");
    moe_cpu_backend_install(ctx);
    test_planes();
    const moe_dtype dts[2] = {MOE_F32, MOE_BF16};
    for (int a = 0; a < 2; a++)
        for (int b = 0; b < 2; b++)
            for (int r = 0; r < 2; r++) test_adamw_planes(dts[a], dts[b], r);
    test_parked_storage();
    moe_ctx_free(ctx);
    return tap_done();
}
