/* check_uploads: host->device traffic that no longer waits for the GPU.
 * - Small uploads go through pinned staging slots without a synchronisation:
 *   the bytes arrive even when the host buffer is overwritten right after the
 *   call, slots are reused correctly past their number, a dtype conversion
 *   goes the same way, and a copy above a slot's size takes the waiting path.
 * - Integer values uploaded from the host carry their bound (tensor.h), which
 *   spares the embedding's forward and backward their range check; values out
 *   of range or negative are still checked and reported.
 * - Cross-entropy counts its rows without reading the targets when their bound
 *   excludes the ignored id, and reads them when it does not.
 * - One-element tensors whose value the host wrote keep it known (tensor.h:
 *   host_value) through copies and one-element sums, lose it to any other
 *   write or a view, and cross-entropy's backward takes its upstream gradient
 *   from it: the same gradients as when the value has to be read back.
 * - Reads of one-element tensors that wait for their own copies: the values as
 *   of the read's place on the stream, whatever is queued after; a read whose
 *   slot was taken by 64 later ones says so.
 * Fresh random data, TAP. */
#include "gpucheck.h"
#include "../../src/nn/functional.h"
#include "../../src/nn/tape.h"

static uint64_t staged(void) {
    uint64_t n = 0;
    die_if(moe_cuda_staged_copies(ctx, 0, &n) != MOE_OK, "staged copy counter");
    return n;
}

/* 20 uploads (more than the slots) from one host buffer rewritten after each call */
static void test_staged_uploads(void) {
    const int64_t n = 5003;
    moe_tensor *h = moe_tensor_new_cpu(MOE_F32, 1, (int64_t[]){n});
    die_if(!h, "host tensor");
    float *hp = moe_f32(h);
    moe_tensor *d[20], *ref[20];
    /* GEMMs queued first keep every transfer pending while the 8 slots wrap */
    pair ga = in_randn(MOE_F32, SH(2048, 2048)), gb = in_randn(MOE_F32, SH(2048, 2048));
    moe_tensor *gc = moe_tensor_new(ctx, MOE_F32, 2, (int64_t[]){2048, 2048}, GPU);
    die_if(!gc, "gemm output");
    for (int i = 0; i < 40; i++) die_if(moe_op_gemm(ctx, 0, 0, 1.0f, ga.d, gb.d, 0.0f, gc) != MOE_OK, "gemm");
    uint64_t s0 = staged();
    for (int i = 0; i < 20; i++) {
        ref[i] = host_randn(1, (int64_t[]){n}, 1.0f, (float)i, 0);
        memcpy(hp, moe_f32(ref[i]), (size_t)n * sizeof(float));
        d[i] = moe_op_to(ctx, h, GPU, i % 2 ? MOE_BF16 : MOE_F32);   /* odd: converted on the device */
        die_if(!d[i], "upload");
        for (int64_t j = 0; j < n; j++) hp[j] = NAN;   /* the caller's memory is free again at once */
    }
    ok(staged() - s0 == 20, "20 small uploads went through the staging slots (%llu)",
       (unsigned long long)(staged() - s0));
    pfree(&ga); pfree(&gb); moe_tensor_release(gc);
    for (int i = 0; i < 20; i++) {
        moe_dtype dt = i % 2 ? MOE_BF16 : MOE_F32;
        round_through(ref[i], dt);
        char name[64];
        snprintf(name, sizeof name, "staged upload %d arrived intact", i);
        check(name, dt, d[i], ref[i], 0.0);
        moe_tensor_release(d[i]);
        moe_tensor_release(ref[i]);
    }
    /* above a slot (1 MB): the waiting path, the same bytes */
    const int64_t big = (1 << 20) / 4 + 7;
    moe_tensor *bh = host_randn(1, (int64_t[]){big}, 1.0f, 0.0f, 0);
    s0 = staged();
    moe_tensor *bd = moe_op_to(ctx, bh, GPU, MOE_F32);
    die_if(!bd, "big upload");
    ok(staged() == s0, "an upload above the slot size is not staged");
    check("big upload arrived intact", MOE_F32, bd, bh, 0.0);
    moe_tensor_release(bd);
    moe_tensor_release(bh);
    moe_tensor_release(h);
}

static moe_tensor *i64_host(const int64_t *v, int64_t n) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){n});
    die_if(!h, "index tensor");
    memcpy(moe_tensor_data(h), v, (size_t)n * sizeof *v);
    return h;
}

static void test_upload_bounds(void) {
    int64_t good[6] = {4, 9, 0, 2, 9, 1}, neg[3] = {3, -1, 2};
    moe_tensor *gh = i64_host(good, 6), *nh = i64_host(neg, 3);
    moe_tensor *gd = moe_op_to(ctx, gh, GPU, MOE_I64), *nd = moe_op_to(ctx, nh, GPU, MOE_I64);
    die_if(!gd || !nd, "index uploads");
    ok(gd->index_bound == 10 && moe_tensor_index_trusted(gd, 10) && !moe_tensor_index_trusted(gd, 9),
       "uploaded ids carry max + 1 as their bound (%lld)", (long long)gd->index_bound);
    ok(nd->index_bound == 0, "uploaded ids with a negative value carry no bound");
    /* i32 the same way; a conversion i64 -> i32 does not (the device wrote the values) */
    moe_tensor *g32 = moe_op_to(ctx, gh, MOE_DEVICE_CPU, MOE_I32);
    moe_tensor *d32 = g32 ? moe_op_to(ctx, g32, GPU, MOE_I32) : NULL, *c32 = moe_op_to(ctx, gh, GPU, MOE_I32);
    die_if(!d32 || !c32, "i32 uploads");
    ok(d32->index_bound == 10 && c32->index_bound == 0, "i32 uploads: bound %lld, converted on the way: %lld",
       (long long)d32->index_bound, (long long)c32->index_bound);
    /* into a slice of a device tensor (aliased memory): none */
    moe_tensor *whole = moe_tensor_new(ctx, MOE_I64, 1, (int64_t[]){12}, GPU);
    moe_tensor *part = whole ? moe_tensor_narrow(whole, 0, 3, 6) : NULL;
    die_if(!part, "slice");
    ok(moe_op_copy(ctx, part, gh) == MOE_OK && part->index_bound == 0 && whole->index_bound == 0,
       "an upload into a slice sets no bound");
    moe_tensor_release(part); moe_tensor_release(whole);
    moe_tensor_release(g32); moe_tensor_release(d32); moe_tensor_release(c32);

    /* the embedding keeps the ids' bound (no view over them), forward and backward */
    const int64_t V = 10, D = 48;
    pair tab = in_randn(MOE_F32, SH(V, D)), o = out_pair(MOE_F32, SH(6, D));
    if (RUN("embedding over uploaded ids", MOE_F32, moe_op_embedding(ctx, o.h, tab.h, gh),
            moe_op_embedding(ctx, o.d, tab.d, gd)))
        check("embedding over uploaded ids", MOE_F32, o.d, o.h, 0.0);
    ok(moe_tensor_index_trusted(gd, V), "the ids are still trusted after the embedding");
    pair dtab = in_randn(MOE_F32, SH(V, D)), g = in_randn(MOE_F32, SH(6, D));
    if (RUN("embedding_backward over uploaded ids", MOE_F32, moe_op_embedding_backward(ctx, dtab.h, g.h, gh),
            moe_op_embedding_backward(ctx, dtab.d, g.d, gd)))
        check("embedding_backward over uploaded ids", MOE_F32, dtab.d, dtab.h, 1e-6);
    /* a bound above the table is not trusted: the check runs and names the id */
    pair small = in_randn(MOE_F32, SH(9, D));
    moe_status st = moe_op_embedding(ctx, o.d, small.d, gd);
    ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), "9"), "uploaded id 9 over a 9-row table -> MOE_ERR_RANGE (%s)",
       moe_last_error());
    st = moe_op_embedding(ctx, o.d, tab.d, nd);
    ok(st != MOE_OK, "uploaded id -1 -> an error (%s)", moe_last_error());
    pfree(&tab); pfree(&o); pfree(&dtab); pfree(&g); pfree(&small);
    moe_tensor_release(gh); moe_tensor_release(nh); moe_tensor_release(gd); moe_tensor_release(nd);
}

/* mean cross-entropy of uploaded targets against the CPU's, for an ignored id
 * outside the targets' bound (counted without reading them) and inside it */
static void test_cross_entropy_count(void) {
    const int64_t N = 300, V = 37;
    pair x = in_randn(MOE_F32, SH(N, V));
    moe_tensor *th = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){N});
    die_if(!th, "targets");
    int64_t *t = moe_tensor_data(th);
    for (int64_t i = 0; i < N; i++) t[i] = (i * 7 + 3) % V;   /* id 5 at about 1 row in 37 */
    const int64_t ignores[2] = {-100, 5};
    for (int k = 0; k < 2; k++) {
        moe_tensor *lh = NULL, *ld = NULL;
        /* a fresh upload each time: the loss's view of the targets voids their bound */
        moe_tensor *tk = moe_op_to(ctx, th, GPU, MOE_I64);
        die_if(!tk, "targets upload");
        char name[96];
        snprintf(name, sizeof name, "cross_entropy mean of uploaded targets, ignore_index %lld", (long long)ignores[k]);
        if (RUN(name, MOE_F32, moe_f_cross_entropy(ctx, NULL, x.h, th, ignores[k], &lh),
                moe_f_cross_entropy(ctx, NULL, x.d, tk, ignores[k], &ld)))
            check(name, MOE_F32, ld, lh, 1e-5);
        moe_tensor_release(lh); moe_tensor_release(ld); moe_tensor_release(tk);
    }
    moe_tensor_release(th);
    pfree(&x);
}

static moe_tensor *scalar_on(moe_dtype dt, double v) {
    moe_tensor *h = moe_tensor_new_cpu(MOE_F32, 0, NULL);
    die_if(!h, "scalar");
    moe_f32(h)[0] = (float)v;
    moe_tensor *d = moe_op_to(ctx, h, GPU, dt);
    die_if(!d, "scalar upload");
    moe_tensor_release(h);
    return d;
}

static void test_host_values(void) {
    double v = 0;
    moe_tensor *a = scalar_on(MOE_F32, 0.25), *b = scalar_on(MOE_BF16, 0.1);
    ok(moe_tensor_host_value(a, &v) && v == 0.25, "an uploaded f32 scalar's value is known (%g)", v);
    ok(moe_tensor_host_value(b, &v) && v == (double)moe_bf16_to_f32(moe_f32_to_bf16(0.1f)),
       "an uploaded bf16 scalar's value is known as bf16 stores it (%.9g)", v);
    moe_tensor *c = moe_tensor_new(ctx, MOE_F32, 0, NULL, GPU), *many = moe_tensor_new(ctx, MOE_F32, 1, (int64_t[]){3}, GPU);
    die_if(!c || !many, "tensors");
    ok(moe_op_fill(ctx, c, -1.5) == MOE_OK && moe_tensor_host_value(c, &v) && v == -1.5, "a filled scalar's value is known");
    ok(moe_op_fill(ctx, many, 2.0) == MOE_OK && !moe_tensor_host_value(many, &v), "a filled 3-element tensor has none");
    ok(moe_op_copy(ctx, c, a) == MOE_OK && moe_tensor_host_value(c, &v) && v == 0.25, "a device copy carries it");
    moe_tensor *s = moe_tensor_new(ctx, MOE_F32, 0, NULL, GPU);
    moe_tensor *a1 = moe_tensor_new(ctx, MOE_F32, 1, (int64_t[]){1}, GPU);
    die_if(!s || !a1 || moe_op_copy(ctx, a1, a) != MOE_OK, "tensors");
    ok(moe_op_sum_to(ctx, s, a1) == MOE_OK && moe_tensor_host_value(s, &v) && v == 0.25,
       "a sum over one element carries it");
    ok(moe_op_unary(ctx, MOE_UN_SCALE, c, c, 3.0f) == MOE_OK && !moe_tensor_host_value(c, &v),
       "an op writing the tensor forgets it");
    moe_tensor *u = moe_tensor_new(ctx, MOE_F32, 0, NULL, GPU);
    die_if(!u || moe_op_unary(ctx, MOE_UN_SCALE, u, a, 2.0f) != MOE_OK, "scale");
    ok(!moe_tensor_host_value(u, &v), "an op's output has none");
    moe_tensor *view = moe_tensor_view(a1, 0, NULL);
    die_if(!view, "view");
    ok(!moe_tensor_host_value(view, &v) && !moe_tensor_host_value(a1, &v), "a view has none and voids its source's");
    moe_tensor_release(view); moe_tensor_release(u); moe_tensor_release(s); moe_tensor_release(a1);
    moe_tensor_release(a); moe_tensor_release(b); moe_tensor_release(c); moe_tensor_release(many);

    /* cross-entropy's backward under an upstream gradient of 0.5: known (an
     * upload), unknown (an op's output) and on the CPU give the same gradient */
    const int64_t N = 96, V = 53;
    pair x = in_randn(MOE_F32, SH(N, V));
    moe_tensor *th = moe_tensor_new_cpu(MOE_I64, 1, (int64_t[]){N});
    die_if(!th, "targets");
    for (int64_t i = 0; i < N; i++) ((int64_t *)moe_tensor_data(th))[i] = (i * 5 + 1) % V;
    moe_tensor *gh = moe_tensor_new_cpu(MOE_F32, 0, NULL);
    die_if(!gh, "seed");
    moe_f32(gh)[0] = 0.5f;
    moe_tensor *dx[3] = {0};
    for (int k = 0; k < 3; k++) {
        moe_tensor *xs = k == 2 ? x.h : x.d;
        moe_tensor *tt = k == 2 ? th : moe_op_to(ctx, th, GPU, MOE_I64), *seed = NULL, *loss = NULL;
        moe_tape *tape = moe_tape_new();
        die_if(!tt || !tape, "tape");
        die_if(moe_f_cross_entropy(ctx, tape, xs, tt, -100, &loss) != MOE_OK, "cross_entropy");
        if (k == 0) seed = moe_op_to(ctx, gh, GPU, MOE_F32);
        else if (k == 1) {
            moe_tensor *one = scalar_on(MOE_F32, 1.0);
            seed = moe_tensor_new(ctx, MOE_F32, 0, NULL, GPU);
            die_if(!seed || moe_op_unary(ctx, MOE_UN_SCALE, seed, one, 0.5f) != MOE_OK, "seed op");
            moe_tensor_release(one);
        } else seed = gh, moe_tensor_retain(gh);
        ok(k != 0 || moe_tensor_host_value(seed, &v), "the uploaded seed's value is known");
        ok(k != 1 || !moe_tensor_host_value(seed, &v), "the computed seed's value is not");
        die_if(moe_tape_backward(ctx, tape, loss, seed) != MOE_OK, "backward");
        moe_tensor *g = moe_tape_grad(tape, xs);
        die_if(!g, "logits gradient");
        dx[k] = moe_op_to(ctx, g, MOE_DEVICE_CPU, MOE_F32);
        moe_tape_free(tape);
        moe_tensor_release(loss); moe_tensor_release(seed);
        if (k != 2) moe_tensor_release(tt);
    }
    check("cross_entropy backward, upstream 0.5 known to the host", MOE_F32, dx[0], dx[2], 1e-5);
    check("cross_entropy backward, upstream 0.5 read back", MOE_F32, dx[1], dx[2], 1e-5);
    for (int k = 0; k < 3; k++) moe_tensor_release(dx[k]);
    moe_tensor_release(gh); moe_tensor_release(th);
    pfree(&x);
}

static void test_async_reads(void) {
    moe_tensor *a = scalar_on(MOE_F32, 1.25), *b = scalar_on(MOE_BF16, -3.5);
    moe_tensor *ih = moe_tensor_new_cpu(MOE_I64, 0, NULL);
    die_if(!ih, "i64 scalar");
    ((int64_t *)moe_tensor_data(ih))[0] = 123456789012345LL;
    moe_tensor *c = moe_op_to(ctx, ih, GPU, MOE_I64);
    die_if(!c, "i64 upload");
    const moe_tensor *ts[3] = {a, b, c};
    moe_read r;
    moe_status st = moe_op_read_start(ctx, ts, 3, &r);
    /* written after the read was queued: the read sees the values before */
    die_if(moe_op_fill(ctx, a, 7.0) != MOE_OK || moe_op_fill(ctx, b, 8.0) != MOE_OK || moe_op_fill(ctx, c, 9.0) != MOE_OK,
           "overwrite");
    if (st == MOE_OK) st = moe_op_read_finish(ctx, &r);
    ok(st == MOE_OK && r.n == 3 && r.value[0] == 1.25 && r.value[1] == -3.5 && r.value[2] == 123456789012345.0,
       "read_async: f32, bf16 and i64 values as of the read, not of the writes queued after (%g %g %.17g)",
       r.value[0], r.value[1], r.value[2]);
    ok(moe_op_read_finish(ctx, &r) == MOE_OK && r.value[0] == 1.25, "a finished read finishes again with its values");
    /* 65 reads in flight: the first one's slot is taken */
    moe_read many[65];
    const moe_tensor *one[1] = {a};
    int started = 1;
    for (int i = 0; i < 65; i++) started &= moe_op_read_start(ctx, one, 1, &many[i]) == MOE_OK;
    st = moe_op_read_finish(ctx, &many[0]);
    ok(started && st == MOE_ERR_STATE && strstr(moe_last_error(), "taken by later reads"),
       "a read whose slot was reused reports it (%s)", moe_last_error());
    st = moe_op_read_finish(ctx, &many[64]);
    ok(st == MOE_OK && many[64].value[0] == 7.0, "the latest of 65 reads finishes (%g)", many[64].value[0]);
    /* bad arguments */
    moe_tensor *two = moe_tensor_new(ctx, MOE_F32, 1, (int64_t[]){2}, GPU), *hc = moe_tensor_new_cpu(MOE_F32, 0, NULL);
    die_if(!two || !hc, "tensors");
    const moe_tensor *bad1[1] = {two}, *bad2[2] = {a, hc};
    ok(moe_op_read_start(ctx, bad1, 1, &r) == MOE_ERR_SHAPE, "read_start refuses a 2-element tensor");
    ok(moe_op_read_start(ctx, bad2, 2, &r) == MOE_ERR_DEVICE, "read_start refuses tensors of two devices");
    ok(moe_op_read_start(ctx, ts, 0, &r) == MOE_ERR_ARG && moe_op_read_start(ctx, ts, MOE_READ_MAX + 1, &r) == MOE_ERR_ARG,
       "read_start refuses 0 or more than %d tensors", MOE_READ_MAX);
    moe_tensor_release(two); moe_tensor_release(hc);
    moe_tensor_release(a); moe_tensor_release(b); moe_tensor_release(c); moe_tensor_release(ih);
}

int main(void) {
    gpucheck_begin();
    test_async_reads();
    test_staged_uploads();
    test_upload_bounds();
    test_cross_entropy_count();
    test_host_values();
    return gpucheck_end();
}
