/* Shared by the tests/gpu/check_*.c programs: a CPU + CUDA context, TAP
 * output, host/device input pairs with fresh normal values (never zeros),
 * NaN-poisoned outputs, and the error measure max |gpu - cpu| / (1 + |cpu|).
 * Header-only (static functions): each check program is one translation unit. */
#ifndef MOE_GPUCHECK_H
#define MOE_GPUCHECK_H

/* not every program uses every helper */
#pragma GCC diagnostic ignored "-Wunused-function"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../../src/core/rng.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/cuda/moe_cuda.h"

static moe_ctx *ctx;
static int ntest, nfail;
static uint64_t seed = 20240611;
static const moe_device GPU = {MOE_CUDA, 0};

#define SH(...) (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (int64_t[]){__VA_ARGS__}

static void ok(int pass, const char *fmt, ...) {
    char name[256];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(name, sizeof name, fmt, ap);
    va_end(ap);
    ntest++;
    if (!pass) nfail++;
    printf("%s %d - %s\n", pass ? "ok" : "not ok", ntest, name);
    fflush(stdout);
}

static const char *dtn(moe_dtype dt) { return moe_dtype_name(dt); }

/* ---- host/device pairs: h is the CPU f32 reference side, d the GPU side ---- */
typedef struct { moe_tensor *h, *d; } pair;

static void die_if(int cond, const char *what) {
    if (cond) {
        printf("Bail out! %s: %s\n", what, moe_last_error());
        exit(1);
    }
}

/* bf16: round a host f32 tensor's values through bf16 */
static void round_through(moe_tensor *h, moe_dtype dt) {
    if (dt == MOE_F32) return;
    float *p = moe_f32(h);
    for (int64_t i = 0; i < moe_tensor_numel(h); i++) p[i] = moe_bf16_to_f32(moe_f32_to_bf16(p[i]));
}

static moe_tensor *host_randn(int nd, const int64_t *shape, float scale, float shift, int positive) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_F32, nd, shape);
    die_if(!h, "host tensor");
    float *p = moe_f32(h);
    int64_t n = moe_tensor_numel(h);
    moe_rng_normal(p, n, moe_rng_key(seed++, MOE_RNG_USER), 0);
    for (int64_t i = 0; i < n; i++) {
        float v = p[i] * scale;
        p[i] = (positive ? fabsf(v) : v) + shift;
    }
    return h;
}

static moe_tensor *to_gpu(moe_tensor *h, moe_dtype dt) {
    moe_tensor *d = moe_op_to(ctx, h, GPU, dt);
    die_if(!d, "upload");
    return d;
}

static pair in_pair(moe_dtype dt, int nd, const int64_t *shape, float scale, float shift, int positive) {
    pair p;
    p.h = host_randn(nd, shape, scale, shift, positive);
    round_through(p.h, dt);
    p.d = to_gpu(p.h, dt);
    return p;
}
static pair in_randn(moe_dtype dt, int nd, const int64_t *shape) { return in_pair(dt, nd, shape, 1.0f, 0.0f, 0); }

/* outputs: NaN on both sides */
static pair out_pair(moe_dtype dt, int nd, const int64_t *shape) {
    pair p;
    p.h = moe_tensor_new_cpu(MOE_F32, nd, shape);
    p.d = moe_tensor_new(ctx, dt, nd, shape, GPU);
    die_if(!p.h || !p.d, "output tensor");
    die_if(moe_op_fill(ctx, p.h, NAN) != MOE_OK || moe_op_fill(ctx, p.d, NAN) != MOE_OK, "poison");
    return p;
}

static void pfree(pair *p) {
    moe_tensor_release(p->h);
    moe_tensor_release(p->d);
    p->h = p->d = NULL;
}

/* max |g - r| / (1 + |r|); NaN anywhere gives INFINITY */
static double max_err(const moe_tensor *gpu, const moe_tensor *ref) {
    moe_tensor *g = moe_op_to(ctx, (moe_tensor *)gpu, MOE_DEVICE_CPU, MOE_F32);
    die_if(!g, "download");
    moe_tensor *r = moe_tensor_contiguous_cpu((moe_tensor *)ref);
    die_if(!r, "contiguous");
    const float *a = moe_f32(g), *b = moe_f32(r);
    double m = 0;
    for (int64_t i = 0; i < moe_tensor_numel(r); i++) {
        double x = a[i], y = b[i], e;
        if (isnan(x) || isnan(y)) e = INFINITY;
        else if (isinf(x) || isinf(y)) e = x == y ? 0.0 : INFINITY;
        else e = fabs(x - y) / (1.0 + fabs(y));
        if (e > m) m = e;
    }
    moe_tensor_release(g);
    moe_tensor_release(r);
    return m;
}

static void check(const char *name, moe_dtype dt, const moe_tensor *gpu, const moe_tensor *ref, double tol) {
    double e = max_err(gpu, ref);
    if (e <= tol) ok(1, "%s [%s] (max err %.3g)", name, dtn(dt), e);
    else ok(0, "%s [%s]: max err %.3g > tol %.3g", name, dtn(dt), e, tol);
}

/* ||g - r|| / ||r|| (NaN anywhere: INFINITY) */
static double rel_l2(const moe_tensor *gpu, const moe_tensor *ref) {
    moe_tensor *g = moe_op_to(ctx, (moe_tensor *)gpu, MOE_DEVICE_CPU, MOE_F32);
    die_if(!g, "download");
    moe_tensor *r = moe_tensor_contiguous_cpu((moe_tensor *)ref);
    die_if(!r, "contiguous");
    const float *a = moe_f32(g), *b = moe_f32(r);
    double num = 0, den = 0;
    for (int64_t i = 0; i < moe_tensor_numel(r); i++) {
        double x = a[i], y = b[i];
        if (isnan(x) || isnan(y)) { num = INFINITY; break; }
        if (isinf(x) || isinf(y)) { if (x != y) { num = INFINITY; break; } continue; }
        num += (x - y) * (x - y);
        den += y * y;
    }
    moe_tensor_release(g);
    moe_tensor_release(r);
    return den > 0 ? sqrt(num / den) : sqrt(num);
}

/* max err and rel l2 both within their tolerances */
static void check2(const char *name, moe_dtype dt, const moe_tensor *gpu, const moe_tensor *ref, double tol,
                   double l2tol) {
    double e = max_err(gpu, ref), l = rel_l2(gpu, ref);
    if (e <= tol && l <= l2tol) ok(1, "%s [%s] (max err %.3g, rel l2 %.3g)", name, dtn(dt), e, l);
    else ok(0, "%s [%s]: max err %.3g (tol %.3g), rel l2 %.3g (tol %.3g)", name, dtn(dt), e, tol, l, l2tol);
}

/* G + 1 row offsets uploaded to the GPU as an i64 tensor (the _dev grouped ops) */
static moe_tensor *upload_offsets(const int64_t *off, int G) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){G + 1});
    die_if(!h, "offsets");
    memcpy(moe_tensor_data(h), off, (size_t)(G + 1) * sizeof *off);
    moe_tensor *d = moe_op_to(ctx, h, GPU, MOE_I64);
    die_if(!d, "offsets upload");
    moe_tensor_release(h);
    return d;
}

/* the grouped GEMM calls that read their offsets on the device, so far */
static uint64_t dev_calls(void) {
    uint64_t n = 0;
    die_if(moe_cuda_grouped_dev_calls(ctx, 0, &n) != MOE_OK, "device-offset counter");
    return n;
}

/* Row offsets of G experts with sizes in [0, maxrows] drawn from the running
 * seed, the first and last expert and every empty_every-th (0: none) empty. */
static void make_offsets(int64_t *off, int G, int maxrows, int empty_every) {
    uint64_t x = seed++ * 0x9E3779B97F4A7C15ull + 7;
    off[0] = 0;
    for (int g = 0; g < G; g++) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17;
        int64_t n = (int64_t)(x % (uint64_t)(maxrows + 1));
        if (g == 0 || g == G - 1 || (empty_every && g % empty_every == empty_every - 1)) n = 0;
        off[g + 1] = off[g] + n;
    }
}

/* a host copy of the bytes of any tensor (caller frees) */
static void *bytes_of(const moe_tensor *t, size_t *n) {
    moe_tensor *h = moe_op_to(ctx, (moe_tensor *)t, MOE_DEVICE_CPU, t->dtype);
    die_if(!h, "download");
    *n = (size_t)moe_tensor_numel(h) * moe_dtype_size(h->dtype);
    void *p = malloc(*n ? *n : 1);
    die_if(!p, "host memory");
    memcpy(p, moe_tensor_data(h), *n);
    moe_tensor_release(h);
    return p;
}

/* the same dtype, shape size and bytes */
static int same_bytes(const moe_tensor *a, const moe_tensor *b) {
    if (a->dtype != b->dtype || moe_tensor_numel(a) != moe_tensor_numel(b)) return 0;
    size_t na, nb;
    void *pa = bytes_of(a, &na), *pb = bytes_of(b, &nb);
    int same = na == nb && !memcmp(pa, pb, na);
    free(pa);
    free(pb);
    return same;
}

/* i64 index pair with values in [0, n) (host and device) */
typedef struct { moe_tensor *h, *d; } ipair;
static ipair idx_pair(int nd, const int64_t *shape, int64_t n) {
    ipair p;
    p.h = moe_tensor_new_cpu(MOE_I64, nd, shape);
    die_if(!p.h, "index tensor");
    int64_t *v = moe_tensor_data(p.h);
    uint64_t st = seed++ * 0x9E3779B97F4A7C15ull + 1;
    for (int64_t i = 0; i < moe_tensor_numel(p.h); i++) {
        st ^= st << 13; st ^= st >> 7; st ^= st << 17;
        v[i] = (int64_t)(st % (uint64_t)n);
    }
    p.d = moe_op_to(ctx, p.h, GPU, MOE_I64);
    die_if(!p.d, "index upload");
    return p;
}
static void ifree(ipair *p) {
    moe_tensor_release(p->h);
    moe_tensor_release(p->d);
    p->h = p->d = NULL;
}

/* GPU result equals the CPU's rounded to dt, bit for bit */
static void check_exact(const char *name, moe_dtype dt, const moe_tensor *gpu, moe_tensor *ref) {
    moe_tensor *r = moe_tensor_contiguous_cpu(ref);
    die_if(!r, "contiguous");
    round_through(r, dt);
    check(name, dt, gpu, r, 0.0);
    moe_tensor_release(r);
}

/* MOELAB_CHECK_ONLY=name,name,...: run only these test groups (test_<name>)
 * and timings (time_attention, time_attention_step, time_grouped, time_wgrad_skew, time_cross_entropy, time_axpy,
 * time_rope, time_rmsnorm, time_moe_layer), for quick runs while working on
 * one kernel. */
static int want(const char *name) {
    const char *only = getenv("MOELAB_CHECK_ONLY");
    if (!only || !*only) return 1;
    size_t n = strlen(name);
    for (const char *p = only; *p;) {
        const char *e = strchr(p, ',');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len == n && strncmp(p, name, n) == 0) return 1;
        if (!e) break;
        p = e + 1;
    }
    return 0;
}

/* both calls must succeed; otherwise a failed test with the message */
static int ran(const char *name, moe_dtype dt, moe_status sc, moe_status sg) {
    if (sc == MOE_OK && sg == MOE_OK) return 1;
    ok(0, "%s [%s]: %s failed: %s", name, dtn(dt), sc != MOE_OK ? "cpu" : "cuda", moe_last_error());
    return 0;
}
#define RUN(name, dt, CALL_CPU, CALL_GPU) ran((name), (dt), (CALL_CPU), (CALL_GPU))

static double tol_of(moe_dtype dt, double f32tol) { return dt == MOE_F32 ? f32tol : 2e-2; }

/* The common start of a check program: skips (TAP, exit 0) without a GPU,
 * else makes ctx with the CPU and CUDA backends. */
static void gpucheck_begin(void) {
    if (moe_cuda_device_count() == 0) {
        printf("1..0 # SKIP no CUDA device\n");
        exit(0);
    }
    ctx = moe_ctx_new(0);
    die_if(!ctx, "context");
    moe_cpu_backend_install(ctx);
    die_if(moe_cuda_backend_install(ctx) != MOE_OK, "cuda backend install");
}

/* Prints the plan, frees the context; the program's exit status. */
static int gpucheck_end(void) {
    printf("1..%d\n", ntest);
    moe_cuda_backend_uninstall(ctx);
    moe_ctx_free(ctx);
    return nfail ? 1 : 0;
}

#endif
