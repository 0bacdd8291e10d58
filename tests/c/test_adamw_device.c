/* AdamW with its step count and learning rate held by the device (ops.h:
 * step_dev, lr_dev; optimizer.h: moe_adamw_set_device_state), on the CPU
 * backend: the same bytes of params, m and v as the host's step and lr (f32
 * and bf16 moments, with and without clipping by the device's norm); a step
 * skipped by a non-finite guard leaves the counter and the params alone; the
 * counter's get/set round trip; moe_op_adamw_advance's pass and skip; and the
 * argument checks. Prints TAP. */
#include "../../src/core/rng.h"
#include "../../src/nn/layer.h"
#include "../../src/ops/backend.h"
#include "../../src/train/optimizer.h"
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

static moe_tensor *scalar(moe_dtype dt, double v) {
    moe_tensor *t = moe_tensor_new_cpu(dt, 0, NULL);
    die_if(!t || moe_op_fill(ctx, t, v) != MOE_OK, "scalar");
    return t;
}

static int64_t i64_of(const moe_tensor *t) { return ((const int64_t *)moe_tensor_data(t))[0]; }

static int same_bytes(const moe_tensor *a, const moe_tensor *b) {
    int64_t n = moe_tensor_numel(a);
    return a->dtype == b->dtype && n == moe_tensor_numel(b) &&
           !memcmp(moe_tensor_data(a), moe_tensor_data(b), (size_t)n * moe_dtype_size(a->dtype));
}

/* Linear(7 -> 13, bias) then Linear(13 -> 5): three parameters, which the
 * lr scales and decay flags below split into runs of their own */
static moe_layer *model(void) {
    moe_init init = {29, 0};
    moe_layer *parts[2] = {moe_linear_new(ctx, 7, 13, 1, &init), moe_linear_new(ctx, 13, 5, 0, &init)};
    die_if(!parts[0] || !parts[1], "linear");
    moe_layer *seq = moe_sequential_new(ctx, parts, 2);
    die_if(!seq, "sequential");
    moe_layer_release(parts[0]);
    moe_layer_release(parts[1]);
    return seq;
}

static const float lr_scale[3] = {1.0f, 0.5f, 2.0f};
static const int decay[3] = {1, 0, 1};

static moe_adamw *adamw(moe_layer *l, moe_dtype state) {
    moe_adamw_hparams hp = {0.9f, 0.95f, 1e-8f, 0.1f, state, 0};
    moe_adamw *o = moe_adamw_new(ctx, l, &hp, lr_scale, decay);
    die_if(!o, "adamw");
    return o;
}

/* fresh normal gradients, the same in both layers */
static void set_grads(moe_layer *a, moe_layer *b, uint64_t seed) {
    moe_tensor *ga = a->flat_grads, *gb = b->flat_grads;
    moe_rng_normal(moe_f32(ga), moe_tensor_numel(ga), moe_rng_key(seed, MOE_RNG_USER), 0);
    memcpy(moe_f32(gb), moe_f32(ga), (size_t)moe_tensor_numel(ga) * sizeof(float));
}

/* a's optimiser steps with host values, b's with the device's; clip: each
 * step clipped by the norm on the device, at half of it (so it scales) */
static void test_same_bytes(moe_dtype state, int clip) {
    moe_layer *a = model(), *b = model();
    moe_adamw *oa = adamw(a, state), *ob = adamw(b, state);
    die_if(moe_adamw_set_device_state(ctx, ob, 1) != MOE_OK, "device state on");
    const float lrs[4] = {3e-2f, 1e-2f, 7e-3f, 2e-2f};
    moe_status sa = MOE_OK, sb = MOE_OK;
    for (int t = 0; t < 4 && sa == MOE_OK && sb == MOE_OK; t++) {
        set_grads(a, b, 100 + (uint64_t)t);
        if (clip) {
            moe_tensor *ssa = NULL, *ssb = NULL, *guard = scalar(MOE_F32, 2.5);
            die_if(moe_grad_sumsq(ctx, a, &ssa) != MOE_OK || moe_grad_sumsq(ctx, b, &ssb) != MOE_OK, "sumsq");
            double half = 0.5 * sqrt((double)moe_f32(ssa)[0]);
            die_if(moe_adamw_clip_next_step(oa, ssa, guard, half) != MOE_OK ||
                   moe_adamw_clip_next_step(ob, ssb, guard, half) != MOE_OK, "clip_next_step");
            moe_tensor_release(ssa);
            moe_tensor_release(ssb);
            moe_tensor_release(guard);
        }
        sa = moe_adamw_step(ctx, oa, lrs[t]);
        sb = moe_adamw_set_lr(ctx, ob, lrs[t]);
        if (sb == MOE_OK) sb = moe_adamw_step(ctx, ob, 123.0f);   /* lr not read with device state on */
    }
    int64_t na = -1, nb = -1;
    if (sb == MOE_OK) sb = moe_adamw_get_step_count(ctx, ob, &nb);
    if (sa == MOE_OK) sa = moe_adamw_get_step_count(ctx, oa, &na);
    char name[128];
    snprintf(name, sizeof name, "device step and lr = host step and lr, 4 steps, %s moments%s", moe_dtype_name(state),
             clip ? ", clipped by the device's norm" : "");
    report(sa == MOE_OK && sb == MOE_OK && same_bytes(a->flat_values, b->flat_values) &&
               same_bytes(moe_adamw_m(oa), moe_adamw_m(ob)) && same_bytes(moe_adamw_v(oa), moe_adamw_v(ob)) &&
               na == 4 && nb == 4,
           name, "status %s / %s (%s); params %s, m %s, v %s; counts %lld and %lld", moe_status_name(sa),
           moe_status_name(sb), moe_last_error(), same_bytes(a->flat_values, b->flat_values) ? "same" : "differ",
           same_bytes(moe_adamw_m(oa), moe_adamw_m(ob)) ? "same" : "differ",
           same_bytes(moe_adamw_v(oa), moe_adamw_v(ob)) ? "same" : "differ", (long long)na, (long long)nb);
    moe_adamw_free(oa);
    moe_adamw_free(ob);
    moe_layer_release(a);
    moe_layer_release(b);
}

/* a step whose guard is not finite: the device's counter and the params stay;
 * the host's mirror counts it until it reads the device */
static void test_skip_and_counter(void) {
    moe_layer *l = model(), *twin = model();
    moe_adamw *o = adamw(l, MOE_F32);
    die_if(moe_adamw_set_device_state(ctx, o, 1) != MOE_OK || moe_adamw_set_lr(ctx, o, 1e-2f) != MOE_OK, "device state");
    set_grads(l, twin, 7);
    die_if(moe_adamw_step(ctx, o, 0.0f) != MOE_OK, "first step");
    moe_tensor *before = moe_tensor_new_cpu(MOE_F32, 1, l->flat_values->shape);
    die_if(!before || moe_op_copy(ctx, before, l->flat_values) != MOE_OK, "copy");
    moe_tensor *ss = NULL, *guard = scalar(MOE_F32, NAN);
    die_if(moe_grad_sumsq(ctx, l, &ss) != MOE_OK || moe_adamw_clip_next_step(o, ss, guard, 1.0) != MOE_OK, "clip");
    moe_status s = moe_adamw_step(ctx, o, 0.0f);
    int64_t n = -1;
    if (s == MOE_OK) s = moe_adamw_get_step_count(ctx, o, &n);
    report(s == MOE_OK && n == 1 && same_bytes(before, l->flat_values),
           "a step with a non-finite guard leaves the device's counter and the params unchanged",
           "status %s (%s); count %lld, expected 1; params %s", moe_status_name(s), moe_last_error(), (long long)n,
           same_bytes(before, l->flat_values) ? "unchanged" : "changed");

    /* set / get with the device state on, then off and on again (idempotent both ways) */
    s = moe_adamw_set_step_count(ctx, o, 41);
    int64_t got = -1, after = -1, off = -1, on_again = -1;
    if (s == MOE_OK) s = moe_adamw_get_step_count(ctx, o, &got);
    if (s == MOE_OK) s = moe_adamw_step(ctx, o, 0.0f);
    if (s == MOE_OK) s = moe_adamw_get_step_count(ctx, o, &after);
    report(s == MOE_OK && got == 41 && after == 42, "set_step_count / get_step_count round trip with device state on",
           "status %s (%s); got %lld (41), after a step %lld (42)", moe_status_name(s), moe_last_error(),
           (long long)got, (long long)after);
    if (s == MOE_OK) s = moe_adamw_set_device_state(ctx, o, 1);   /* again: keeps the counter */
    if (s == MOE_OK) s = moe_adamw_get_step_count(ctx, o, &on_again);
    if (s == MOE_OK) s = moe_adamw_set_device_state(ctx, o, 0);
    if (s == MOE_OK) s = moe_adamw_set_device_state(ctx, o, 0);
    if (s == MOE_OK) s = moe_adamw_get_step_count(ctx, o, &off);
    report(s == MOE_OK && on_again == 42 && off == 42 && !moe_adamw_device_state(o),
           "device state on twice keeps the counter; off reads it back into the host's count",
           "status %s (%s); %lld, %lld (42 each), state %d", moe_status_name(s), moe_last_error(), (long long)on_again,
           (long long)off, moe_adamw_device_state(o));
    s = moe_adamw_set_lr(ctx, o, 1e-3f);
    report(s == MOE_ERR_STATE, "set_lr with device state off is refused", "status %s", moe_status_name(s));
    die_if(moe_adamw_set_device_state(ctx, o, 1) != MOE_OK, "device state on");
    s = moe_adamw_set_lr(ctx, o, NAN);
    report(s == MOE_ERR_ARG, "set_lr(NaN) is refused", "status %s", moe_status_name(s));
    moe_tensor_release(before);
    moe_tensor_release(ss);
    moe_tensor_release(guard);
    moe_adamw_free(o);
    moe_layer_release(l);
    moe_layer_release(twin);
}

static void test_advance(void) {
    moe_tensor *step = scalar(MOE_I64, 5), *ss = scalar(MOE_F32, 9.0), *fine = scalar(MOE_F32, 1.5);
    moe_tensor *bad = scalar(MOE_F32, INFINITY), *nan_ss = scalar(MOE_F32, NAN);
    moe_adamw_cfg plain = {0}, pass = {.clip_sumsq = ss, .guard = fine, .clip_max = 1.0};
    moe_adamw_cfg skip_guard = {.clip_sumsq = ss, .guard = bad, .clip_max = 1.0};
    moe_adamw_cfg skip_norm = {.clip_sumsq = nan_ss, .clip_max = 1.0};
    moe_status s = moe_op_adamw_advance(ctx, step, &plain);
    int64_t v1 = i64_of(step);
    if (s == MOE_OK) s = moe_op_adamw_advance(ctx, step, &pass);
    int64_t v2 = i64_of(step);
    report(s == MOE_OK && v1 == 6 && v2 == 7, "adamw_advance adds 1 without clipping and with finite clipping",
           "status %s (%s); %lld, %lld (6, 7)", moe_status_name(s), moe_last_error(), (long long)v1, (long long)v2);
    if (s == MOE_OK) s = moe_op_adamw_advance(ctx, step, &skip_guard);
    if (s == MOE_OK) s = moe_op_adamw_advance(ctx, step, &skip_norm);
    report(s == MOE_OK && i64_of(step) == 7, "adamw_advance adds 0 on a skip (infinite guard, NaN norm)",
           "status %s (%s); %lld (7)", moe_status_name(s), moe_last_error(), (long long)i64_of(step));

    /* argument checks: the update's step_dev and lr_dev, and the counter's dtype */
    int64_t sh[1] = {2};
    moe_tensor *p = moe_tensor_new_cpu(MOE_F32, 1, (int64_t[]){16}), *g = moe_tensor_new_cpu(MOE_F32, 1, (int64_t[]){16});
    moe_tensor *m = moe_tensor_new_cpu(MOE_F32, 1, (int64_t[]){16}), *v = moe_tensor_new_cpu(MOE_F32, 1, (int64_t[]){16});
    moe_tensor *i32 = scalar(MOE_I32, 3), *two = moe_tensor_new_cpu(MOE_F32, 1, sh), *lr = scalar(MOE_F32, 0.5);
    die_if(!p || !g || !m || !v || !two, "tensors");
    moe_rng_normal(moe_f32(p), 16, moe_rng_key(3, MOE_RNG_USER), 0);
    moe_rng_normal(moe_f32(g), 16, moe_rng_key(4, MOE_RNG_USER), 0);
    moe_tensor_fill_cpu(m, 0.0);
    moe_tensor_fill_cpu(v, 0.0);
    moe_tensor_fill_cpu(two, 1.0);
    moe_adamw_cfg c = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step_dev = i32, .lr_dev = lr};
    s = moe_op_adamw(ctx, p, g, m, v, &c);
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "step_dev"), "adamw refuses an i32 step_dev",
           "status %s: %s", moe_status_name(s), moe_last_error());
    c.step_dev = step;
    c.lr_dev = two;
    s = moe_op_adamw(ctx, p, g, m, v, &c);
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "lr_dev"), "adamw refuses a two-element lr_dev",
           "status %s: %s", moe_status_name(s), moe_last_error());
    s = moe_op_adamw_advance(ctx, two, &plain);
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "step_dev"), "adamw_advance refuses an f32 counter",
           "status %s: %s", moe_status_name(s), moe_last_error());
    /* step 0 in cfg is fine when the device holds the step (cfg->step not read) */
    c.lr_dev = lr;
    s = moe_op_adamw(ctx, p, g, m, v, &c);
    report(s == MOE_OK, "adamw with step_dev takes cfg->step = 0", "status %s: %s", moe_status_name(s),
           moe_last_error());
    moe_tensor *all[] = {step, ss, fine, bad, nan_ss, p, g, m, v, i32, two, lr};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
}

int main(void) {
    ctx = moe_ctx_new(2);
    die_if(!ctx, "context");
    moe_cpu_backend_install(ctx);
    const moe_dtype states[2] = {MOE_F32, MOE_BF16};
    for (int k = 0; k < 2; k++)
        for (int clip = 0; clip < 2; clip++) test_same_bytes(states[k], clip);
    test_skip_and_counter();
    test_advance();
    moe_ctx_free(ctx);
    return tap_done();
}
