/* check_mixed: the mixed-precision pieces of the engine on CUDA against the
 * CPU backend: AdamW with bf16 gradients writing a bf16 compute copy, and a
 * model-level check that moe_layer_set_compute_dtype lays the compute copy
 * and the bf16 gradients out like the f32 values. Fresh random data. TAP. */
#include "gpucheck.h"
#include "../../src/nn/layer.h"

/* AdamW: f32 params/m/v, bf16 grads, bf16 (and f32) compute copy */
static void test_adamw_mixed(moe_dtype cdt) {
    const int64_t n = 10007;
    pair p = in_randn(MOE_F32, SH(n)), m = in_pair(MOE_F32, SH(n), 0.1f, 0.0f, 0);
    pair v = in_pair(MOE_F32, SH(n), 0.1f, 0.01f, 1);
    moe_tensor *gh = host_randn(1, (int64_t[]){n}, 1.0f, 0.0f, 0);
    moe_tensor *gh16 = moe_op_to(ctx, gh, MOE_DEVICE_CPU, MOE_BF16), *gd16 = to_gpu(gh, MOE_BF16);
    moe_tensor *ch = moe_tensor_new_cpu(cdt, 1, (int64_t[]){n}), *cd = moe_tensor_new(ctx, cdt, 1, (int64_t[]){n}, GPU);
    die_if(!gh16 || !gd16 || !ch || !cd, "adamw mixed tensors");
    die_if(moe_op_fill(ctx, ch, NAN) != MOE_OK || moe_op_fill(ctx, cd, NAN) != MOE_OK, "poison");
    moe_adamw_cfg ch_cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f, .step = 5,
                            .compute = ch};
    moe_adamw_cfg cd_cfg = ch_cfg;
    cd_cfg.compute = cd;
    if (RUN("adamw bf16 grads", cdt, moe_op_adamw(ctx, p.h, gh16, m.h, v.h, &ch_cfg),
            moe_op_adamw(ctx, p.d, gd16, m.d, v.d, &cd_cfg))) {
        check("adamw bf16 grads: params", cdt, p.d, p.h, 1e-5);
        check("adamw bf16 grads: m", cdt, m.d, m.h, 1e-5);
        check("adamw bf16 grads: v", cdt, v.d, v.h, 1e-5);
        moe_tensor *chf = moe_op_to(ctx, ch, MOE_DEVICE_CPU, MOE_F32);
        check("adamw compute copy vs cpu", cdt, cd, chf, cdt == MOE_F32 ? 1e-5 : 1e-2);
        /* the copy is exactly the updated params rounded to its dtype */
        moe_tensor *pr = moe_op_to(ctx, p.d, GPU, cdt);
        double e = max_err(cd, pr ? moe_op_to(ctx, pr, MOE_DEVICE_CPU, MOE_F32) : NULL);
        ok(e == 0, "adamw compute copy [%s] equals the updated params rounded (max err %.3g)", dtn(cdt), e);
        moe_tensor_release(chf); moe_tensor_release(pr);
    }
    moe_tensor_release(gh); moe_tensor_release(gh16); moe_tensor_release(gd16);
    moe_tensor_release(ch); moe_tensor_release(cd);
    pfree(&p); pfree(&m); pfree(&v);
}

/* sum of squares (gradient norms): f32 and bf16 inputs, CPU vs CUDA, f64 sums */
static void test_sumsq(moe_dtype dt, int64_t n) {
    moe_tensor *h = host_randn(1, (int64_t[]){n}, 1.0f, 0.0f, 0);
    moe_tensor *hd = moe_op_to(ctx, h, MOE_DEVICE_CPU, dt), *dd = to_gpu(h, dt);
    moe_tensor *oh = moe_tensor_new_cpu(MOE_F32, 0, NULL), *od = moe_tensor_new(ctx, MOE_F32, 0, NULL, GPU);
    die_if(!hd || !oh || !od, "sumsq tensors");
    if (RUN("sumsq", dt, moe_op_sumsq(ctx, oh, hd), moe_op_sumsq(ctx, od, dd))) {
        char name[64];
        snprintf(name, sizeof name, "sumsq n=%lld", (long long)n);
        check(name, dt, od, oh, 1e-6);
        /* and against a direct f64 sum */
        const float *p = moe_f32(h);
        double want = 0;
        for (int64_t i = 0; i < n; i++) {
            double v = dt == MOE_BF16 ? moe_bf16_to_f32(moe_f32_to_bf16(p[i])) : p[i];
            want += v * v;
        }
        moe_tensor *g = moe_op_to(ctx, od, MOE_DEVICE_CPU, MOE_F32);
        double got = g ? moe_f32(g)[0] : NAN;
        ok(fabs(got - want) <= 1e-6 * want, "sumsq n=%lld [%s] = f64 sum (%.9g vs %.9g)", (long long)n, dtn(dt), got, want);
        moe_tensor_release(g);
    }
    moe_tensor_release(h); moe_tensor_release(hd); moe_tensor_release(dd); moe_tensor_release(oh); moe_tensor_release(od);
}

/* AdamW clipping by a norm on the device (clip_sumsq, guard), bf16 grads with a
 * bf16 compute copy, against the CPU with the same tensors on the host: clipped,
 * unclipped (norm under the limit), and skipped for a NaN sum or an infinite
 * guard (then params, m, v and the copy keep their bytes). Both n8 and tail kernels. */
static void test_adamw_device_clip(void) {
    const int64_t n = 10007;
    pair p = in_randn(MOE_F32, SH(n)), m = in_pair(MOE_F32, SH(n), 0.1f, 0.0f, 0);
    pair v = in_pair(MOE_F32, SH(n), 0.1f, 0.01f, 1);
    moe_tensor *gh = host_randn(1, (int64_t[]){n}, 1.0f, 0.0f, 0);
    moe_tensor *gh16 = moe_op_to(ctx, gh, MOE_DEVICE_CPU, MOE_BF16), *gd16 = to_gpu(gh, MOE_BF16);
    moe_tensor *ch = moe_tensor_new_cpu(MOE_BF16, 1, (int64_t[]){n}), *cd = moe_tensor_new(ctx, MOE_BF16, 1, (int64_t[]){n}, GPU);
    moe_tensor *ssh = moe_tensor_new_cpu(MOE_F32, 0, NULL), *grh = moe_tensor_new_cpu(MOE_F32, 0, NULL);
    die_if(!gh16 || !gd16 || !ch || !cd || !ssh || !grh, "tensors");
    die_if(moe_op_fill(ctx, ch, 0.5) != MOE_OK || moe_op_fill(ctx, cd, 0.5) != MOE_OK, "compute copies");
    const struct { const char *name; float sumsq, guard; double max; int skip, no_guard; } cs[] = {
        {"clipped (norm 30 > 2)", 900.0f, 1.5f, 2.0, 0, 0},
        {"under the limit (norm 30 < 100)", 900.0f, 1.5f, 100.0, 0, 0},
        {"no limit (inf)", 900.0f, 1.5f, INFINITY, 0, 0},
        {"clipped, no guard", 400.0f, 0.0f, 3.0, 0, 1},
        {"NaN sum of squares: skipped", NAN, 1.5f, 2.0, 1, 0},
        {"infinite sum of squares, no guard: skipped", INFINITY, 0.0f, 2.0, 1, 1},
        {"infinite guard: skipped", 900.0f, INFINITY, 2.0, 1, 0},
    };
    for (size_t k = 0; k < sizeof cs / sizeof cs[0]; k++) {
        moe_f32(ssh)[0] = cs[k].sumsq;
        moe_f32(grh)[0] = cs[k].guard;
        moe_tensor *ssd = to_gpu(ssh, MOE_F32), *grd = to_gpu(grh, MOE_F32);
        moe_tensor *p0 = moe_op_to(ctx, p.d, MOE_DEVICE_CPU, MOE_F32), *m0 = moe_op_to(ctx, m.d, MOE_DEVICE_CPU, MOE_F32);
        moe_tensor *v0 = moe_op_to(ctx, v.d, MOE_DEVICE_CPU, MOE_F32);
        moe_tensor *c0 = moe_op_to(ctx, cd, MOE_DEVICE_CPU, MOE_F32);
        moe_adamw_cfg hc = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .weight_decay = 0.1f,
                            .step = 3 + (int64_t)k, .compute = ch, .grad_scale = 0.5f, .clip_sumsq = ssh, .guard = grh,
                            .clip_max = cs[k].max};
        moe_adamw_cfg dc = hc;
        dc.compute = cd; dc.clip_sumsq = ssd; dc.guard = grd;
        if (cs[k].no_guard) hc.guard = dc.guard = NULL;
        char name[96];
        snprintf(name, sizeof name, "adamw device clip, %s", cs[k].name);
        if (RUN(name, MOE_BF16, moe_op_adamw(ctx, p.h, gh16, m.h, v.h, &hc), moe_op_adamw(ctx, p.d, gd16, m.d, v.d, &dc))) {
            check(name, MOE_F32, p.d, p.h, 1e-5);
            check("  m", MOE_F32, m.d, m.h, 1e-5);
            check("  v", MOE_F32, v.d, v.h, 1e-5);
            if (cs[k].skip) {
                ok(max_err(p.d, p0) == 0 && max_err(m.d, m0) == 0 && max_err(v.d, v0) == 0 && max_err(cd, c0) == 0,
                   "  skipped: params, m, v and the compute copy unchanged");
            } else {
                ok(max_err(p.d, p0) > 0, "  the params moved");
            }
        }
        moe_tensor_release(ssd); moe_tensor_release(grd);
        moe_tensor_release(p0); moe_tensor_release(m0); moe_tensor_release(v0); moe_tensor_release(c0);
    }
    /* the factor itself: max / (norm + 1e-6) times grad_scale, in double */
    moe_adamw_cfg fc = {.grad_scale = 0.5f, .clip_max = 2.0};
    double f = moe_adamw_clip_factor(&fc, 900.0, 0.0);
    ok(f == 0.5 * 2.0 / (30.0 + 1e-6) && moe_adamw_clip_factor(&fc, NAN, 0.0) < 0 &&
           moe_adamw_clip_factor(&fc, 1.0, -INFINITY) < 0 && moe_adamw_clip_factor(&fc, 1.0, 0.0) == 0.5,
       "moe_adamw_clip_factor: clipped, skipped for NaN or an infinite guard, plain under the limit");
    /* clip tensors of the wrong kind are refused */
    moe_tensor *two = moe_tensor_new(ctx, MOE_F32, 1, (int64_t[]){2}, GPU);
    die_if(!two, "tensor");
    moe_adamw_cfg bc = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step = 1, .clip_sumsq = two,
                        .clip_max = 1.0};
    moe_status st = moe_op_adamw(ctx, p.d, gd16, m.d, v.d, &bc);
    ok(st == MOE_ERR_ARG && strstr(moe_last_error(), "clip_sumsq"), "adamw refuses a 2-element sum of squares (%s)",
       moe_last_error());
    bc.clip_sumsq = ssh;   /* on the host, params on the GPU */
    st = moe_op_adamw(ctx, p.d, gd16, m.d, v.d, &bc);
    ok(st == MOE_ERR_ARG, "adamw refuses a sum of squares on another device (%s)", moe_last_error());
    moe_tensor_release(two);
    moe_tensor_release(gh); moe_tensor_release(gh16); moe_tensor_release(gd16);
    moe_tensor_release(ch); moe_tensor_release(cd); moe_tensor_release(ssh); moe_tensor_release(grh);
    pfree(&p); pfree(&m); pfree(&v);
}

/* dtype rules of adamw: params f32 only, grads f32 or bf16 */
static void test_adamw_dtypes(void) {
    moe_tensor *pb = moe_tensor_new(ctx, MOE_BF16, 1, (int64_t[]){8}, GPU), *f = moe_tensor_new(ctx, MOE_F32, 1, (int64_t[]){8}, GPU);
    moe_adamw_cfg cfg = {.lr = 1e-2f, .beta1 = 0.9f, .beta2 = 0.95f, .eps = 1e-8f, .step = 1};
    moe_status s = moe_op_adamw(ctx, pb, f, f, f, &cfg);
    ok(s == MOE_ERR_DTYPE && strstr(moe_last_error(), "params"), "adamw rejects bf16 params: %s", moe_last_error());
    moe_tensor_release(pb); moe_tensor_release(f);
}

/* set_compute_dtype on a two-parameter tree: views, dtypes and values */
static void test_layer_precision(void) {
    moe_init init = {11, 0};
    moe_layer *lin = moe_linear_new(ctx, 48, 40, 1, &init);
    die_if(!lin, "linear");
    die_if(moe_layer_flatten(ctx, lin, GPU) != MOE_OK, "flatten to gpu");
    moe_status s = moe_layer_set_compute_dtype(ctx, lin, MOE_BF16);
    ok(s == MOE_OK, "set_compute_dtype bf16 on a CUDA layer");
    if (s != MOE_OK) { moe_layer_release(lin); return; }
    moe_param *w = &lin->params[0], *b = &lin->params[1];
    ok(w->value->dtype == MOE_F32 && w->grad->dtype == MOE_BF16 && w->compute && w->compute->dtype == MOE_BF16 &&
           b->compute && w->compute->storage == lin->flat_compute->storage && w->grad->storage == lin->flat_grads->storage,
       "values f32, grads and compute copy bf16 views of the flat buffers");
    moe_tensor *wr = moe_op_to(ctx, w->value, GPU, MOE_BF16);
    moe_tensor *wh = wr ? moe_op_to(ctx, wr, MOE_DEVICE_CPU, MOE_F32) : NULL;
    check("compute copy of the weight = weight rounded to bf16", MOE_BF16, w->compute, wh, 0.0);
    /* a forward on the compute copy: y = x W^T + b in bf16 */
    moe_tensor *x = to_gpu(host_randn(2, (int64_t[]){5, 48}, 1.0f, 0.0f, 0), MOE_BF16), *y = NULL;
    s = moe_layer_forward(lin, ctx, NULL, x, &y);
    ok(s == MOE_OK && y && y->dtype == MOE_BF16, "bf16 forward of a linear layer (%s)", s == MOE_OK ? "bf16 out" : moe_last_error());
    /* moving the layer keeps mixed precision */
    s = moe_layer_flatten(ctx, lin, GPU);
    ok(s == MOE_OK && lin->flat_compute && lin->params[0].compute && lin->params[0].grad->dtype == MOE_BF16,
       "re-flattening keeps the compute copy");
    s = moe_layer_set_compute_dtype(ctx, lin, MOE_F32);
    ok(s == MOE_OK && !lin->flat_compute && !lin->params[0].compute && lin->params[0].grad->dtype == MOE_F32,
       "set_compute_dtype f32 drops the compute copy");
    moe_tensor_release(wr); moe_tensor_release(wh); moe_tensor_release(x); moe_tensor_release(y);
    moe_layer_release(lin);
}

int main(void) {
    gpucheck_begin();
    test_adamw_mixed(MOE_BF16);
    test_adamw_mixed(MOE_F32);
    test_adamw_dtypes();
    test_adamw_device_clip();
    test_sumsq(MOE_F32, 1);
    test_sumsq(MOE_F32, 3000017);
    test_sumsq(MOE_BF16, 3000017);
    test_sumsq(MOE_BF16, 8000);   /* whole 16-byte vectors, no tail */
    test_sumsq(MOE_BF16, 7);      /* only a tail */
    test_layer_precision();
    return gpucheck_end();
}
