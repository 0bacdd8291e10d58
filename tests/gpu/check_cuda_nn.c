/* check_cuda_nn: the CUDA kernels of reductions, top-k, gather / scatter and
 * index ops, embeddings, layer norm, RoPE (also fused with RMSNorm) and
 * attention against the CPU backend, through the public moe_op_* API, as in
 * check_cuda.c; then the ops' validation (statistics dtypes, out-of-range
 * indices: MOE_ERR_RANGE with nothing written, dtype errors) and determinism.
 * Accumulating index ops (scatter_add, index_add, embedding_backward) must
 * match the CPU bit for bit (same order of f32 additions); determinism checks
 * run a kernel twice on the same inputs and compare the bytes. Attention also
 * prints ||gpu - cpu|| / ||cpu|| ("rel l2").
 * Prints TAP; exit 1 on failure; "1..0 # SKIP no CUDA device" and exit 0
 * without a GPU. MOELAB_CHECK_ONLY=name,... runs only those groups (gpucheck.h). */
#include "gpucheck.h"

/* ---- reductions ---- */

/* float64 sum of x [R, C] over dim (0 or 1), as an f32 host tensor */
static moe_tensor *sum64(const moe_tensor *x, int dim) {
    int64_t R = x->shape[0], C = x->shape[1], n = dim ? R : C;
    moe_tensor *r = moe_tensor_new_cpu(MOE_F32, 1, &n);
    die_if(!r, "host tensor");
    const float *p = moe_f32(x);
    for (int64_t o = 0; o < n; o++) {
        double acc = 0;
        if (dim) for (int64_t j = 0; j < C; j++) acc += p[o * C + j];
        else for (int64_t j = 0; j < R; j++) acc += p[j * C + o];
        moe_f32(r)[o] = (float)acc;
    }
    return r;
}

static const char *red_names[] = {"sum", "mean", "max", "min"};

static void test_reduce(moe_dtype dt) {
    char name[128];
    /* every op over every dim of a small 3-d tensor (rows, columns, keepdim) */
    pair x = in_randn(dt, SH(5, 37, 11));
    for (int op = 0; op < MOE_NUM_REDUCE; op++)
        for (int dim = -1; dim < 3; dim++) {
            int d = dim < 0 ? 2 : dim;
            int64_t os[2], k = 0;
            for (int i = 0; i < 3; i++) if (i != d) os[k++] = x.h->shape[i];
            pair o = out_pair(dt, 2, os);
            snprintf(name, sizeof name, "reduce %s dim=%d of [5,37,11]", red_names[op], dim);
            if (RUN(name, dt, moe_op_reduce(ctx, op, o.h, x.h, dim), moe_op_reduce(ctx, op, o.d, x.d, dim)))
                check(name, dt, o.d, o.h, tol_of(dt, 2e-6));
            pfree(&o);
        }
    pfree(&x);
    /* long rows, few of them (chunked row path); few columns, long n (chunked column path) */
    const int64_t shapes[3][2] = {{3, 50001}, {20001, 3}, {4000, 300}};
    for (int v = 0; v < 3; v++) {
        pair y = in_randn(dt, 2, shapes[v]);
        for (int op = 0; op < MOE_NUM_REDUCE; op++)
            for (int dim = 0; dim < 2; dim++) {
                int64_t os[1] = {shapes[v][1 - dim]};
                pair o = out_pair(dt, 1, os);
                snprintf(name, sizeof name, "reduce %s dim=%d of [%lld,%lld]", red_names[op], dim,
                         (long long)shapes[v][0], (long long)shapes[v][1]);
                /* the CPU sums a column sequentially in f32 (error growing with n), the GPU in chunks
                 * whose partials are then summed in order: against the CPU allow 5e-4, against a
                 * float64 reference 5e-5 */
                int sum = op == MOE_RED_SUM || op == MOE_RED_MEAN;
                if (RUN(name, dt, moe_op_reduce(ctx, op, o.h, y.h, dim), moe_op_reduce(ctx, op, o.d, y.d, dim)))
                    check(name, dt, o.d, o.h, tol_of(dt, sum ? 5e-4 : 0.0));
                if (op == MOE_RED_SUM) {
                    moe_tensor *r64 = sum64(y.h, dim);
                    snprintf(name, sizeof name, "reduce sum dim=%d of [%lld,%lld] vs float64", dim,
                             (long long)shapes[v][0], (long long)shapes[v][1]);
                    check(name, dt, o.d, r64, tol_of(dt, 5e-5));
                    moe_tensor_release(r64);
                }
                pfree(&o);
            }
        pfree(&y);
    }
    /* reduce_all over 1e6 elements (two-pass), every op */
    pair z = in_randn(dt, SH(1000, 1000));
    for (int op = 0; op < MOE_NUM_REDUCE; op++) {
        pair o = out_pair(dt, 0, NULL);
        snprintf(name, sizeof name, "reduce_all %s of 1e6", red_names[op]);
        if (RUN(name, dt, moe_op_reduce_all(ctx, op, o.h, z.h), moe_op_reduce_all(ctx, op, o.d, z.d)))
            check(name, dt, o.d, o.h, tol_of(dt, 1e-5));
        pfree(&o);
    }
    pfree(&z);
    /* sum_to (the backward of broadcasting) goes through reduce */
    pair g = in_randn(dt, SH(6, 5, 7)), st = out_pair(dt, SH(5, 1));
    if (RUN("sum_to [6,5,7] -> [5,1]", dt, moe_op_sum_to(ctx, st.h, g.h), moe_op_sum_to(ctx, st.d, g.d)))
        check("sum_to [6,5,7] -> [5,1]", dt, st.d, st.h, tol_of(dt, 1e-5));
    pfree(&g); pfree(&st);
}

/* ---- topk ---- */

static void test_topk(moe_dtype dt) {
    const struct { int64_t rows, n; int k; int ties; } cs[] = {
        {257, 8, 2, 0}, {100, 64, 8, 0}, {33, 64, 6, 1}, {5, 1000, 16, 1}, {3, 10000, 5, 1}, {4, 37, 37, 1}};
    char name[128];
    for (size_t c = 0; c < sizeof cs / sizeof cs[0]; c++) {
        pair x = in_randn(dt, SH(cs[c].rows, cs[c].n));
        if (cs[c].ties) {   /* few distinct values: ties must go to the lower index */
            float *p = moe_f32(x.h);
            for (int64_t i = 0; i < moe_tensor_numel(x.h); i++) p[i] = floorf(p[i] * 2.0f) * 0.5f;
            moe_tensor_release(x.d);
            x.d = to_gpu(x.h, dt);
        }
        pair v = out_pair(dt, SH(cs[c].rows, cs[c].k));
        moe_tensor *ih = moe_tensor_new_cpu(MOE_I64, SH(cs[c].rows, cs[c].k));
        moe_tensor *id = moe_tensor_new(ctx, MOE_I64, SH(cs[c].rows, cs[c].k), GPU);
        die_if(!ih || !id, "topk indices");
        snprintf(name, sizeof name, "topk rows=%lld n=%lld k=%d%s", (long long)cs[c].rows, (long long)cs[c].n, cs[c].k,
                 cs[c].ties ? " (ties)" : "");
        if (RUN(name, dt, moe_op_topk(ctx, v.h, ih, x.h, cs[c].k), moe_op_topk(ctx, v.d, id, x.d, cs[c].k))) {
            check(name, dt, v.d, v.h, 0.0);
            moe_tensor *ib = moe_op_to(ctx, id, MOE_DEVICE_CPU, MOE_I64);
            die_if(!ib, "download");
            int same = !memcmp(moe_tensor_data(ib), moe_tensor_data(ih), (size_t)moe_tensor_numel(ih) * 8);
            ok(same, "%s indices identical to the cpu's [%s]", name, dtn(dt));
            moe_tensor_release(ib);
        }
        moe_tensor_release(ih); moe_tensor_release(id);
        pfree(&x); pfree(&v);
    }
}

/* ---- gather / scatter_add ---- */

static void test_gather_scatter(moe_dtype dt) {
    const int64_t R = 6, N = 50;
    const int64_t ms[] = {7, 100};   /* scan path (m <= 32) and sort path, both with duplicates */
    char name[128];
    for (int v = 0; v < 2; v++) {
        int64_t M = ms[v];
        pair x = in_randn(dt, SH(R, N)), o = out_pair(dt, SH(R, M));
        ipair ix = idx_pair(SH(R, M), N);
        snprintf(name, sizeof name, "gather m=%lld", (long long)M);
        if (RUN(name, dt, moe_op_gather(ctx, o.h, x.h, ix.h), moe_op_gather(ctx, o.d, x.d, ix.d)))
            check(name, dt, o.d, o.h, 0.0);
        pair dst = in_randn(dt, SH(R, N)), src = in_randn(dt, SH(R, M));
        snprintf(name, sizeof name, "scatter_add m=%lld (bit-exact: same order of f32 adds)", (long long)M);
        if (RUN(name, dt, moe_op_scatter_add(ctx, dst.h, ix.h, src.h), moe_op_scatter_add(ctx, dst.d, ix.d, src.d)))
            check_exact(name, dt, dst.d, dst.h);
        pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
    }
}

/* ---- index_select / index_add ---- */

static void test_index_select_add(moe_dtype dt) {
    const int64_t widths[] = {33, 64, 1};   /* unaligned rows, 16-byte rows, scalars */
    char name[128];
    for (int v = 0; v < 3; v++) {
        int64_t N = 40, M = 300, W = widths[v];
        pair x = in_randn(dt, SH(N, W)), o = out_pair(dt, SH(M, W));
        ipair ix = idx_pair(SH(M), N);
        snprintf(name, sizeof name, "index_select [%lld,%lld] m=%lld", (long long)N, (long long)W, (long long)M);
        if (RUN(name, dt, moe_op_index_select(ctx, o.h, x.h, ix.h), moe_op_index_select(ctx, o.d, x.d, ix.d)))
            check(name, dt, o.d, o.h, 0.0);
        pair dst = in_randn(dt, SH(N, W)), src = in_randn(dt, SH(M, W));
        snprintf(name, sizeof name, "index_add [%lld,%lld] m=%lld (bit-exact)", (long long)N, (long long)W, (long long)M);
        if (RUN(name, dt, moe_op_index_add(ctx, dst.h, ix.h, src.h), moe_op_index_add(ctx, dst.d, ix.d, src.d)))
            check_exact(name, dt, dst.d, dst.h);
        pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
    }
    /* 3-d rows: x [N, 3, 5] */
    pair x = in_randn(dt, SH(9, 3, 5)), o = out_pair(dt, SH(20, 3, 5));
    pair dst = in_randn(dt, SH(9, 3, 5)), src = in_randn(dt, SH(20, 3, 5));
    ipair ix = idx_pair(SH(20), 9);
    if (RUN("index_select 3-d", dt, moe_op_index_select(ctx, o.h, x.h, ix.h), moe_op_index_select(ctx, o.d, x.d, ix.d)))
        check("index_select 3-d", dt, o.d, o.h, 0.0);
    if (RUN("index_add 3-d", dt, moe_op_index_add(ctx, dst.h, ix.h, src.h), moe_op_index_add(ctx, dst.d, ix.d, src.d)))
        check_exact("index_add 3-d (bit-exact)", dt, dst.d, dst.h);
    pfree(&x); pfree(&o); pfree(&dst); pfree(&src); ifree(&ix);
}

static void test_embedding(moe_dtype dt) {
    const int64_t V = 97, D = 64;
    pair tab = in_randn(dt, SH(V, D)), o = out_pair(dt, SH(4, 33, D));
    ipair ids = idx_pair(SH(4, 33), V);
    if (RUN("embedding", dt, moe_op_embedding(ctx, o.h, tab.h, ids.h), moe_op_embedding(ctx, o.d, tab.d, ids.d)))
        check("embedding", dt, o.d, o.h, 0.0);
    pair dtab = in_randn(dt, SH(V, D)), g = in_randn(dt, SH(4, 33, D));
    if (RUN("embedding_backward", dt, moe_op_embedding_backward(ctx, dtab.h, g.h, ids.h),
            moe_op_embedding_backward(ctx, dtab.d, g.d, ids.d)))
        check_exact("embedding_backward (accumulated, bit-exact)", dt, dtab.d, dtab.h);
    pfree(&tab); pfree(&o); pfree(&dtab); pfree(&g); ifree(&ids);
}

/* ---- layernorm ---- */

static void test_layernorm(moe_dtype dt) {
    const int64_t R = 3, T = 7, D = 301;
    /* bf16 data with f32 statistics, and (bf16 only) with bf16 statistics */
    for (int sv = 0; sv < (dt == MOE_F32 ? 1 : 2); sv++) {
        moe_dtype sdt = sv ? dt : MOE_F32;
        for (int bias = 0; bias < 2; bias++) {
            char name[128], tag[64];
            snprintf(tag, sizeof tag, "%s, stats %s", bias ? "bias" : "no bias", dtn(sdt));
            pair x = in_pair(dt, SH(R, T, D), 1.5f, 0.7f, 0), w = in_pair(dt, SH(D), 0.2f, 1.0f, 0);
            pair b = in_randn(dt, SH(D));
            pair y = out_pair(dt, SH(R, T, D)), mean = out_pair(sdt, SH(R, T)), rstd = out_pair(sdt, SH(R * T));
            snprintf(name, sizeof name, "layernorm (%s)", tag);
            if (RUN(name, dt, moe_op_layernorm(ctx, y.h, mean.h, rstd.h, x.h, w.h, bias ? b.h : NULL, 1e-5f),
                    moe_op_layernorm(ctx, y.d, mean.d, rstd.d, x.d, w.d, bias ? b.d : NULL, 1e-5f))) {
                snprintf(name, sizeof name, "layernorm y (%s)", tag);
                check(name, dt, y.d, y.h, tol_of(dt, 1e-5));
                snprintf(name, sizeof name, "layernorm mean (%s)", tag);
                check(name, sdt, mean.d, mean.h, tol_of(sdt, 1e-6));
                snprintf(name, sizeof name, "layernorm rstd (%s)", tag);
                check(name, sdt, rstd.d, rstd.h, tol_of(sdt, 1e-5));
            }
            round_through(mean.h, sdt);
            round_through(rstd.h, sdt);
            moe_tensor *md = to_gpu(mean.h, sdt), *rd = to_gpu(rstd.h, sdt);
            pair dy = in_randn(dt, SH(R, T, D)), dx = out_pair(dt, SH(R, T, D));
            pair dw = in_randn(dt, SH(D)), db = in_randn(dt, SH(D));
            snprintf(name, sizeof name, "layernorm_backward (%s)", tag);
            if (RUN(name, dt, moe_op_layernorm_backward(ctx, dx.h, dw.h, bias ? db.h : NULL, dy.h, x.h, w.h, mean.h, rstd.h),
                    moe_op_layernorm_backward(ctx, dx.d, dw.d, bias ? db.d : NULL, dy.d, x.d, w.d, md, rd))) {
                snprintf(name, sizeof name, "layernorm_backward dx (%s)", tag);
                check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
                snprintf(name, sizeof name, "layernorm_backward dw accumulated (%s)", tag);
                check(name, dt, dw.d, dw.h, tol_of(dt, 2e-5));
                snprintf(name, sizeof name, "layernorm_backward db accumulated (%s)", tag);
                check(name, dt, db.d, db.h, tol_of(dt, 2e-5));
            }
            moe_tensor_release(md); moe_tensor_release(rd);
            pfree(&x); pfree(&w); pfree(&b); pfree(&y); pfree(&mean); pfree(&rstd);
            pfree(&dy); pfree(&dx); pfree(&dw); pfree(&db);
        }
    }
}

/* ---- rope ---- */

static void test_rope(moe_dtype dt) {
    const int64_t pos[] = {0, 5, 100000};
    char name[128];
    for (int v = 0; v < 3; v++) {
        pair x = in_randn(dt, SH(2, 9, 3, 64)), o = out_pair(dt, SH(2, 9, 3, 64)), back = out_pair(dt, SH(2, 9, 3, 64));
        snprintf(name, sizeof name, "rope pos_offset=%lld", (long long)pos[v]);
        if (RUN(name, dt, moe_op_rope(ctx, o.h, x.h, pos[v], 10000.0f, 0), moe_op_rope(ctx, o.d, x.d, pos[v], 10000.0f, 0)))
            check(name, dt, o.d, o.h, tol_of(dt, 2e-6));
        snprintf(name, sizeof name, "rope inverse pos_offset=%lld", (long long)pos[v]);
        if (RUN(name, dt, moe_op_rope(ctx, back.h, o.h, pos[v], 10000.0f, 1),
                moe_op_rope(ctx, back.d, o.d, pos[v], 10000.0f, 1))) {
            check(name, dt, back.d, back.h, tol_of(dt, 2e-6));
            snprintf(name, sizeof name, "rope then inverse gives x back, pos_offset=%lld", (long long)pos[v]);
            check(name, dt, back.d, x.h, tol_of(dt, 1e-5) * (dt == MOE_F32 ? 1 : 1.5));
        }
        pfree(&x); pfree(&o); pfree(&back);
    }
    /* in place (out aliases x), odd head dim and theta */
    pair x = in_randn(dt, SH(1, 5, 2, 30));
    if (RUN("rope in place D=30 theta=500", dt, moe_op_rope(ctx, x.h, x.h, 3, 500.0f, 0), moe_op_rope(ctx, x.d, x.d, 3, 500.0f, 0)))
        check("rope in place D=30 theta=500", dt, x.d, x.h, tol_of(dt, 2e-6));
    pfree(&x);
    /* the vector path's shapes: D/2 = 16, 24 (vectors for both dtypes), 20 (f32 vectors, bf16 pairs);
     * B=7, T=200: several batch rows per block, the last chunk partial; [8,300,16,64] in place:
     * several vectors per thread (the next one loaded before this one is written) */
    static const int64_t cfg[][5] = {{7, 200, 1, 32, 0}, {2, 9, 3, 48, 0}, {2, 9, 2, 40, 0}, {8, 300, 16, 64, 1}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t B = cfg[c][0], T = cfg[c][1], H = cfg[c][2], D = cfg[c][3];
        const int inplace = (int)cfg[c][4];
        pair xx = in_randn(dt, SH(B, T, H, D)), o = out_pair(dt, SH(B, T, H, D));
        moe_tensor *oh = inplace ? xx.h : o.h, *od = inplace ? xx.d : o.d;
        snprintf(name, sizeof name, "rope [%lld,%lld,%lld,%lld]%s pos_offset=7", (long long)B, (long long)T,
                 (long long)H, (long long)D, inplace ? " in place" : "");
        if (RUN(name, dt, moe_op_rope(ctx, oh, xx.h, 7, 10000.0f, 0), moe_op_rope(ctx, od, xx.d, 7, 10000.0f, 0)))
            check(name, dt, od, oh, tol_of(dt, 2e-6));
        pfree(&xx); pfree(&o);
    }
}

/* RMSNorm over [B, T, H*D] then rope per head, forward and backward, against the
 * CPU's two ops: the fused kernel's shapes (bf16 D=64 with 4 vectors a lane as in
 * the step model, D=128, one vector a lane, B=11 > the 8 warps of a block), and
 * shapes it leaves to the two ops (D=48: D/N does not divide 32; 3 heads of 64:
 * not whole vectors per lane). The backward also with beta 1 (adding into dx)
 * and without dw. */
/* The CPU reference of the backward with the GPU's rounding: the inverse-rotated
 * gradient is stored in dt before the norm's backward reads it (as the two ops
 * store it on the GPU; f32 on the CPU would drift from it over many rows of dw). */
static moe_status ref_norm_rope_bwd(moe_dtype dt, moe_tensor *dx, moe_tensor *dw, moe_tensor *dy, moe_tensor *x,
                                    moe_tensor *w, moe_tensor *rstd, int64_t H, int64_t pos, float beta) {
    int64_t B = x->shape[0], T = x->shape[1], D = x->shape[2] / H;
    moe_tensor *g = moe_tensor_new_cpu(MOE_F32, SH(B, T, H * D));
    moe_tensor *g4 = moe_tensor_view(g, SH(B, T, H, D)), *dy4 = moe_tensor_view(dy, SH(B, T, H, D));
    die_if(!g || !g4 || !dy4, "reference tensors");
    moe_status s = moe_op_rope(ctx, g4, dy4, pos, 10000.0f, 1);
    round_through(g, dt);
    if (s == MOE_OK) s = moe_op_rmsnorm_backward_beta(ctx, dx, dw, g, x, w, rstd, beta);
    moe_tensor_release(g4); moe_tensor_release(dy4); moe_tensor_release(g);
    return s;
}

static uint64_t norm_rope_fused(void) {
    uint64_t n = 0;
    die_if(moe_cuda_norm_rope_fused_calls(ctx, 0, &n) != MOE_OK, "fused counter");
    return n;
}

/* B, T, heads, D, the first position, and whether the fused kernels take the
 * shape (1) or run the two ops (-1: D 48 does not split a warp evenly, 3 heads
 * of 64 are not a whole number of 16-byte vectors per lane), in both dtypes */
static void test_rmsnorm_rope(moe_dtype dt) {
    static const int64_t cfg[][6] = {{8, 33, 16, 64, 0, 1}, {2, 17, 8, 128, 5, 1}, {11, 5, 4, 64, 1000, 1},
                                     {2, 9, 4, 48, 3, -1}, {2, 7, 3, 64, 0, -1}};
    for (size_t c = 0; c < sizeof cfg / sizeof cfg[0]; c++) {
        const int64_t B = cfg[c][0], T = cfg[c][1], H = cfg[c][2], D = cfg[c][3], n = H * D, P = cfg[c][4];
        char name[160], shp[96];
        snprintf(shp, sizeof shp, "[%lld,%lld,%lld x %lld] from position %lld", (long long)B, (long long)T, (long long)H,
                 (long long)D, (long long)P);
        const uint64_t f0 = norm_rope_fused();
        pair x = in_randn(dt, SH(B, T, n)), w = in_pair(dt, SH(n), 0.2f, 1.0f, 0);
        pair y = out_pair(dt, SH(B, T, n)), rstd = out_pair(dt, SH(B, T));
        snprintf(name, sizeof name, "rmsnorm_rope %s", shp);
        if (RUN(name, dt, moe_op_rmsnorm_rope(ctx, y.h, rstd.h, x.h, w.h, 1e-5f, H, P, 10000.0f),
                moe_op_rmsnorm_rope(ctx, y.d, rstd.d, x.d, w.d, 1e-5f, H, P, 10000.0f))) {
            check(name, dt, y.d, y.h, tol_of(dt, 2e-5));
            snprintf(name, sizeof name, "rmsnorm_rope rstd %s", shp);
            check(name, dt, rstd.d, rstd.h, tol_of(dt, 1e-5));
        }
        round_through(rstd.h, dt);
        moe_tensor *rd = to_gpu(rstd.h, dt);
        for (int mode = 0; mode < 3; mode++) {   /* 0: with dw; 1: beta 1 with dw; 2: no dw */
            pair dy = in_randn(dt, SH(B, T, n)), dw = in_randn(dt, SH(n));
            pair dx = mode == 1 ? in_randn(dt, SH(B, T, n)) : out_pair(dt, SH(B, T, n));
            float beta = mode == 1 ? 1.0f : 0.0f;
            snprintf(name, sizeof name, "rmsnorm_rope_backward %s%s", shp,
                     mode == 1 ? " beta 1" : mode == 2 ? " no dw" : "");
            if (RUN(name, dt, ref_norm_rope_bwd(dt, dx.h, mode == 2 ? NULL : dw.h, dy.h, x.h, w.h, rstd.h, H, P, beta),
                    moe_op_rmsnorm_rope_backward(ctx, dx.d, mode == 2 ? NULL : dw.d, dy.d, x.d, w.d, rd, H, P, 10000.0f,
                                                 beta))) {
                check(name, dt, dx.d, dx.h, tol_of(dt, 2e-5));
                if (mode != 2) {
                    snprintf(name, sizeof name, "rmsnorm_rope_backward dw (accumulated) %s%s", shp,
                             mode == 1 ? " beta 1" : "");
                    check(name, dt, dw.d, dw.h, tol_of(dt, B * T > 1000 ? 1e-4 : 2e-5));
                }
            }
            pfree(&dy); pfree(&dw); pfree(&dx);
        }
        moe_tensor_release(rd);
        /* the forward and three backwards: all four fused where the shape allows, none elsewhere */
        const uint64_t used = norm_rope_fused() - f0;
        const int want = cfg[c][5] > 0;
        ok(used == (uint64_t)(want ? 4 : 0), "rmsnorm_rope %s [%s]: %llu of 4 calls fused (want %d)", shp, dtn(dt),
           (unsigned long long)used, want ? 4 : 0);
        pfree(&x); pfree(&w); pfree(&y); pfree(&rstd);
    }
}

/* ---- attention ---- */

typedef struct { int64_t B, T, S, Hq, Hkv, D; int causal; } att_cfg;

static void att_name(char *buf, size_t n, const char *what, const att_cfg *c) {
    snprintf(buf, n, "%s B=%lld T=%lld S=%lld Hq=%lld Hkv=%lld D=%lld%s", what, (long long)c->B, (long long)c->T,
             (long long)c->S, (long long)c->Hq, (long long)c->Hkv, (long long)c->D, c->causal ? " causal" : "");
}

static void test_attention_cfg(moe_dtype dt, const att_cfg *c, moe_dtype lse_dt) {
    char name[192];
    float scale = 1.0f / sqrtf((float)c->D);
    pair q = in_randn(dt, SH(c->B, c->T, c->Hq, c->D));
    pair k = in_randn(dt, SH(c->B, c->S, c->Hkv, c->D)), v = in_randn(dt, SH(c->B, c->S, c->Hkv, c->D));
    pair o = out_pair(dt, SH(c->B, c->T, c->Hq, c->D)), lse = out_pair(lse_dt, SH(c->B, c->Hq, c->T));
    double tol = dt == MOE_F32 ? 1e-4 : 3e-2, l2 = dt == MOE_F32 ? 2e-5 : 1e-2;
    att_name(name, sizeof name, "attention", c);
    if (RUN(name, dt, moe_op_attention(ctx, o.h, lse.h, q.h, k.h, v.h, scale, c->causal),
            moe_op_attention(ctx, o.d, lse.d, q.d, k.d, v.d, scale, c->causal))) {
        att_name(name, sizeof name, "attention out", c);
        check2(name, dt, o.d, o.h, tol, l2);
        att_name(name, sizeof name, "attention lse", c);
        check2(name, lse_dt, lse.d, lse.h, lse_dt == MOE_F32 ? 1e-5 : 2e-2, lse_dt == MOE_F32 ? 1e-5 : 1e-2);
    }
    /* backward from the same out and lse on both sides (the CPU's, rounded to the device dtypes) */
    round_through(o.h, dt);
    round_through(lse.h, lse_dt);
    moe_tensor *od = to_gpu(o.h, dt), *ld = to_gpu(lse.h, lse_dt);
    pair go = in_randn(dt, SH(c->B, c->T, c->Hq, c->D));
    pair dq = out_pair(dt, SH(c->B, c->T, c->Hq, c->D));
    pair dk = out_pair(dt, SH(c->B, c->S, c->Hkv, c->D)), dv = out_pair(dt, SH(c->B, c->S, c->Hkv, c->D));
    att_name(name, sizeof name, "attention_backward", c);
    if (RUN(name, dt, moe_op_attention_backward(ctx, dq.h, dk.h, dv.h, go.h, q.h, k.h, v.h, o.h, lse.h, scale, c->causal),
            moe_op_attention_backward(ctx, dq.d, dk.d, dv.d, go.d, q.d, k.d, v.d, od, ld, scale, c->causal))) {
        att_name(name, sizeof name, "attention_backward dq", c);
        check2(name, dt, dq.d, dq.h, tol, l2);
        att_name(name, sizeof name, "attention_backward dk", c);
        check2(name, dt, dk.d, dk.h, tol, l2);
        att_name(name, sizeof name, "attention_backward dv", c);
        check2(name, dt, dv.d, dv.h, tol, l2);
    }
    moe_tensor_release(od); moe_tensor_release(ld);
    pfree(&q); pfree(&k); pfree(&v); pfree(&o); pfree(&lse); pfree(&go); pfree(&dq); pfree(&dk); pfree(&dv);
}

static void test_attention(moe_dtype dt) {
    /* D 64 and 128 take the tensor-core kernels in bf16; the others (and f32) the SIMT ones */
    const att_cfg cs[] = {
        {2, 37, 37, 4, 2, 64, 1},      /* GQA, causal, one partial tile */
        {1, 45, 77, 6, 2, 128, 1},     /* S > T: causal offset S - T (a KV cache) */
        {2, 70, 50, 2, 1, 64, 1},      /* T > S: the first 20 queries see no key (out 0, lse -inf) */
        {1, 33, 65, 4, 4, 128, 0},     /* not causal, S != T */
        {1, 130, 130, 2, 2, 64, 1},    /* several tiles each way */
        {1, 200, 200, 4, 1, 128, 1},   /* GQA 4:1, several tiles */
        {1, 300, 170, 2, 2, 128, 1},   /* T > S at D 128: 130 queries see no key; three 128-query tiles */
        {1, 20, 29, 2, 1, 40, 1},      /* another head dim: SIMT path for bf16 too */
        {1, 19, 19, 3, 3, 256, 0},     /* the largest head dim */
        {1, 37, 37, 3, 3, 64, 1},      /* 111 rows: the backward prep's last warp only partly full */
        {1, 21, 21, 2, 1, 32, 1},      /* D 32: the prep with 4 threads a row (bf16), 42 rows */
        {1, 70, 100, 2, 1, 64, 0},     /* not causal at D 64, S != T: the kept dS tiles' full grid */
    };
    uint64_t kept0 = 0, kept1 = 0;
    die_if(moe_cuda_attention_ds_calls(ctx, 0, &kept0) != MOE_OK, "dS counter");
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) test_attention_cfg(dt, &cs[i], MOE_F32);
    /* bf16 at D 64: the backward keeps its dS tiles for dQ (one call a case); with
     * no room for them (cap 0) dQ computes scores and dP again, same results */
    int d64 = 0;
    for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++) d64 += cs[i].D == 64;
    die_if(moe_cuda_attention_ds_calls(ctx, 0, &kept1) != MOE_OK, "dS counter");
    ok(kept1 - kept0 == (uint64_t)(dt == MOE_BF16 ? d64 : 0), "attention_backward [%s]: %llu of %d D=64 calls kept dS (want %d)",
       dtn(dt), (unsigned long long)(kept1 - kept0), d64, dt == MOE_BF16 ? d64 : 0);
    if (dt == MOE_BF16) {
        die_if(moe_cuda_set_attention_ds_cap(ctx, 0, 0) != MOE_OK, "dS cap");
        for (size_t i = 0; i < sizeof cs / sizeof cs[0]; i++)
            if (cs[i].D == 64) test_attention_cfg(dt, &cs[i], MOE_F32);
        die_if(moe_cuda_attention_ds_calls(ctx, 0, &kept0) != MOE_OK, "dS counter");
        ok(kept0 == kept1, "attention_backward: with a dS cap of 0 no call keeps dS (%llu)",
           (unsigned long long)(kept0 - kept1));
        die_if(moe_cuda_set_attention_ds_cap(ctx, 0, (size_t)256 << 20) != MOE_OK, "dS cap");
    }
    if (dt != MOE_F32) {   /* statistics in the data dtype too */
        att_cfg c = {1, 40, 40, 2, 1, 64, 1};
        test_attention_cfg(dt, &c, dt);
        /* a negative scale: the tensor-core forward needs a positive one (it takes
         * row maxima on unscaled scores), so this takes the SIMT kernel */
        pair q = in_randn(dt, SH(1, 70, 2, 64)), k = in_randn(dt, SH(1, 70, 2, 64)), v = in_randn(dt, SH(1, 70, 2, 64));
        pair o = out_pair(dt, SH(1, 70, 2, 64)), l = out_pair(MOE_F32, SH(1, 2, 70));
        if (RUN("attention scale -0.125 D=64 causal", dt, moe_op_attention(ctx, o.h, l.h, q.h, k.h, v.h, -0.125f, 1),
                moe_op_attention(ctx, o.d, l.d, q.d, k.d, v.d, -0.125f, 1))) {
            check("attention scale -0.125 D=64 causal: out", dt, o.d, o.h, tol_of(dt, 1e-5));
            check("attention scale -0.125 D=64 causal: lse", MOE_F32, l.d, l.h, 1e-2);
        }
        pfree(&q); pfree(&k); pfree(&v); pfree(&o); pfree(&l);
    }
}

/* ---- statistics dtypes (ops validation) ---- */

static void test_stat_dtypes(void) {
    /* bf16 data with f32 statistics is accepted (checked by the runs above); f32 data with bf16 statistics is not */
    moe_tensor *x = moe_tensor_new(ctx, MOE_F32, SH(4, 16), GPU), *y = moe_tensor_new(ctx, MOE_F32, SH(4, 16), GPU);
    moe_tensor *w = moe_tensor_new(ctx, MOE_F32, SH(16), GPU), *r = moe_tensor_new(ctx, MOE_BF16, SH(4), GPU);
    moe_tensor *r16 = moe_tensor_new(ctx, MOE_F16, SH(4), GPU), *xb = moe_tensor_new(ctx, MOE_BF16, SH(4, 16), GPU);
    moe_tensor *yb = moe_tensor_new(ctx, MOE_BF16, SH(4, 16), GPU), *wb = moe_tensor_new(ctx, MOE_BF16, SH(16), GPU);
    die_if(!x || !y || !w || !r || !r16 || !xb || !yb || !wb, "tensors");
    moe_status st = moe_op_rmsnorm(ctx, y, r, x, w, 1e-5f);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "expected f32"), "f32 data with bf16 rstd is a dtype error (%s)",
       moe_last_error());
    st = moe_op_rmsnorm(ctx, yb, r16, xb, wb, 1e-5f);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "or f32"), "bf16 data with f16 rstd is a dtype error (%s)",
       moe_last_error());
    moe_tensor *all[] = {x, y, w, r, r16, xb, yb, wb};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    /* bf16 rmsnorm and cross entropy with f32 statistics against the cpu */
    const int64_t N = 9, D = 200;
    pair xx = in_randn(MOE_BF16, SH(N, D)), ww = in_pair(MOE_BF16, SH(D), 0.2f, 1.0f, 0);
    pair yy = out_pair(MOE_BF16, SH(N, D)), rs = out_pair(MOE_F32, SH(N));
    if (RUN("rmsnorm bf16 data, f32 rstd", MOE_BF16, moe_op_rmsnorm(ctx, yy.h, rs.h, xx.h, ww.h, 1e-5f),
            moe_op_rmsnorm(ctx, yy.d, rs.d, xx.d, ww.d, 1e-5f))) {
        check("rmsnorm y (f32 rstd)", MOE_BF16, yy.d, yy.h, 2e-2);
        check("rmsnorm rstd kept in f32", MOE_F32, rs.d, rs.h, 1e-5);
    }
    pair dy = in_randn(MOE_BF16, SH(N, D)), dx = out_pair(MOE_BF16, SH(N, D)), dw = in_randn(MOE_BF16, SH(D));
    moe_tensor *rsd = to_gpu(rs.h, MOE_F32);
    if (RUN("rmsnorm_backward bf16 data, f32 rstd", MOE_BF16,
            moe_op_rmsnorm_backward(ctx, dx.h, dw.h, dy.h, xx.h, ww.h, rs.h),
            moe_op_rmsnorm_backward(ctx, dx.d, dw.d, dy.d, xx.d, ww.d, rsd))) {
        check("rmsnorm_backward dx (f32 rstd)", MOE_BF16, dx.d, dx.h, 2e-2);
        check("rmsnorm_backward dw (f32 rstd)", MOE_BF16, dw.d, dw.h, 2e-2);
    }
    moe_tensor_release(rsd);
    pfree(&xx); pfree(&ww); pfree(&yy); pfree(&rs); pfree(&dy); pfree(&dx); pfree(&dw);
    const int64_t V = 517;
    pair lg = in_pair(MOE_BF16, SH(N, V), 3.0f, 0.0f, 0), loss = out_pair(MOE_F32, SH(N)), lse = out_pair(MOE_F32, SH(N));
    ipair tg = idx_pair(SH(N), V);
    if (RUN("cross_entropy bf16 logits, f32 loss and lse", MOE_BF16,
            moe_op_cross_entropy(ctx, loss.h, lse.h, lg.h, tg.h, -100),
            moe_op_cross_entropy(ctx, loss.d, lse.d, lg.d, tg.d, -100))) {
        check("cross_entropy loss kept in f32", MOE_F32, loss.d, loss.h, 1e-5);
        check("cross_entropy lse kept in f32", MOE_F32, lse.d, lse.h, 1e-5);
    }
    moe_tensor *lsed = to_gpu(lse.h, MOE_F32);
    pair dl = out_pair(MOE_BF16, SH(N, V));
    if (RUN("cross_entropy_backward bf16 logits, f32 lse", MOE_BF16,
            moe_op_cross_entropy_backward(ctx, dl.h, lg.h, lse.h, tg.h, -100, 0.1f),
            moe_op_cross_entropy_backward(ctx, dl.d, lg.d, lsed, tg.d, -100, 0.1f)))
        check("cross_entropy_backward (f32 lse)", MOE_BF16, dl.d, dl.h, 2e-3);
    /* the fused pass with the types training uses (bf16 logits, f32 loss and lse) */
    pair floss = out_pair(MOE_F32, SH(N)), flse = out_pair(MOE_F32, SH(N)), fdl = out_pair(MOE_BF16, SH(N, V));
    if (RUN("cross_entropy_fused bf16 logits, f32 loss and lse", MOE_BF16,
            moe_op_cross_entropy_fused(ctx, floss.h, flse.h, fdl.h, lg.h, tg.h, -100, 0.1f),
            moe_op_cross_entropy_fused(ctx, floss.d, flse.d, fdl.d, lg.d, tg.d, -100, 0.1f))) {
        check("cross_entropy_fused loss kept in f32", MOE_F32, floss.d, floss.h, 1e-5);
        check("cross_entropy_fused lse kept in f32", MOE_F32, flse.d, flse.h, 1e-5);
        check("cross_entropy_fused dlogits (f32 lse)", MOE_BF16, fdl.d, fdl.h, 2e-3);
    }
    pfree(&floss); pfree(&flse); pfree(&fdl);
    moe_tensor_release(lsed);
    pfree(&lg); pfree(&loss); pfree(&lse); pfree(&dl); ifree(&tg);
}

/* ---- index errors: MOE_ERR_RANGE, nothing written ---- */

static void test_index_errors(void) {
    const int64_t N = 10, W = 8, M = 12;
    pair x = in_randn(MOE_F32, SH(N, W)), dst = in_randn(MOE_F32, SH(N, W)), src = in_randn(MOE_F32, SH(M, W));
    pair o = out_pair(MOE_F32, SH(M, W));
    const int64_t bad_vals[] = {N, -1, 1000000};
    for (int v = 0; v < 3; v++) {
        ipair ix = idx_pair(SH(M), N);
        int64_t *p = moe_tensor_data(ix.h);
        p[7] = bad_vals[v];
        p[9] = bad_vals[v];   /* the first bad position (7) is the one reported */
        moe_tensor_release(ix.d);
        ix.d = moe_op_to(ctx, ix.h, GPU, MOE_I64);
        die_if(!ix.d, "upload");
        char want[64];
        snprintf(want, sizeof want, "index %lld at position 7", (long long)bad_vals[v]);
        moe_status st = moe_op_index_select(ctx, o.d, x.d, ix.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), want), "index_select index %lld -> MOE_ERR_RANGE (%s)",
           (long long)bad_vals[v], moe_last_error());
        moe_tensor *before = moe_op_to(ctx, dst.d, MOE_DEVICE_CPU, MOE_F32);
        st = moe_op_index_add(ctx, dst.d, ix.d, src.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), want), "index_add index %lld -> MOE_ERR_RANGE (%s)",
           (long long)bad_vals[v], moe_last_error());
        check("index_add with a bad index leaves dst unchanged", MOE_F32, dst.d, before, 0.0);
        moe_tensor_release(before);
        pair eo = out_pair(MOE_F32, SH(M, W));
        st = moe_op_embedding(ctx, eo.d, x.d, ix.d);
        ok(st == MOE_ERR_RANGE, "embedding id %lld -> MOE_ERR_RANGE (%s)", (long long)bad_vals[v], moe_last_error());
        st = moe_op_embedding_backward(ctx, dst.d, src.d, ix.d);
        ok(st == MOE_ERR_RANGE, "embedding_backward id %lld -> MOE_ERR_RANGE (%s)", (long long)bad_vals[v],
           moe_last_error());
        pfree(&eo);
        ifree(&ix);
    }
    /* gather / scatter_add over the last dim; both scatter paths (m <= 32 and m > 32) */
    const int64_t ms[] = {5, 40};
    for (int v = 0; v < 2; v++) {
        int64_t m = ms[v];
        ipair ix = idx_pair(SH(3, m), W);
        int64_t *p = moe_tensor_data(ix.h);
        p[m + 2] = W;   /* row 1 */
        moe_tensor_release(ix.d);
        ix.d = moe_op_to(ctx, ix.h, GPU, MOE_I64);
        die_if(!ix.d, "upload");
        pair gx = in_randn(MOE_F32, SH(3, W)), go = out_pair(MOE_F32, SH(3, m)), gs = in_randn(MOE_F32, SH(3, m));
        moe_status st = moe_op_gather(ctx, go.d, gx.d, ix.d);
        ok(st == MOE_ERR_RANGE && strstr(moe_last_error(), "out of range"), "gather m=%lld bad index -> MOE_ERR_RANGE (%s)",
           (long long)m, moe_last_error());
        moe_tensor *before = moe_op_to(ctx, gx.d, MOE_DEVICE_CPU, MOE_F32);
        st = moe_op_scatter_add(ctx, gx.d, ix.d, gs.d);
        ok(st == MOE_ERR_RANGE, "scatter_add m=%lld bad index -> MOE_ERR_RANGE (%s)", (long long)m, moe_last_error());
        check("scatter_add with a bad index leaves dst unchanged", MOE_F32, gx.d, before, 0.0);
        moe_tensor_release(before);
        pfree(&gx); pfree(&go); pfree(&gs); ifree(&ix);
    }
    /* and the device still works */
    ipair ix = idx_pair(SH(M), N);
    if (RUN("index_select after range errors", MOE_F32, moe_op_index_select(ctx, o.h, x.h, ix.h),
            moe_op_index_select(ctx, o.d, x.d, ix.d)))
        check("index_select after range errors", MOE_F32, o.d, o.h, 0.0);
    ifree(&ix);
    pfree(&x); pfree(&dst); pfree(&src); pfree(&o);
}

/* ---- determinism: the same inputs twice give the same bytes ---- */

static void test_determinism(void) {
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = k ? MOE_BF16 : MOE_F32;
        /* index_add with many duplicates (an embedding gradient: 20000 tokens, 100 rows) */
        pair src = in_randn(dt, SH(20000, 64)), d0 = in_randn(dt, SH(100, 64));
        ipair ix = idx_pair(SH(20000), 100);
        moe_tensor *a = moe_op_to(ctx, d0.d, GPU, dt), *b = moe_op_to(ctx, d0.d, GPU, dt);
        die_if(!a || !b, "copies");
        moe_status s1 = moe_op_index_add(ctx, a, ix.d, src.d), s2 = moe_op_index_add(ctx, b, ix.d, src.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(a, b), "index_add 20000 -> 100 rows twice: bit-identical [%s]",
           dtn(dt));
        if (RUN("index_add 20000 -> 100 rows", dt, moe_op_index_add(ctx, d0.h, ix.h, src.h), MOE_OK))
            check_exact("index_add 20000 -> 100 rows vs cpu (bit-exact)", dt, a, d0.h);
        moe_tensor_release(a); moe_tensor_release(b);
        pfree(&src); pfree(&d0); ifree(&ix);
        /* scatter_add, sort path */
        pair ss = in_randn(dt, SH(50, 300)), sd = in_randn(dt, SH(50, 20));
        ipair si = idx_pair(SH(50, 300), 20);
        a = moe_op_to(ctx, sd.d, GPU, dt); b = moe_op_to(ctx, sd.d, GPU, dt);
        die_if(!a || !b, "copies");
        s1 = moe_op_scatter_add(ctx, a, si.d, ss.d); s2 = moe_op_scatter_add(ctx, b, si.d, ss.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(a, b), "scatter_add m=300 twice: bit-identical [%s]", dtn(dt));
        moe_tensor_release(a); moe_tensor_release(b);
        pfree(&ss); pfree(&sd); ifree(&si);
        /* reductions */
        pair x = in_randn(dt, SH(3000, 700));
        pair r1 = out_pair(dt, SH(700)), r2 = out_pair(dt, SH(700)), t1 = out_pair(dt, 0, NULL), t2 = out_pair(dt, 0, NULL);
        s1 = moe_op_reduce(ctx, MOE_RED_SUM, r1.d, x.d, 0); s2 = moe_op_reduce(ctx, MOE_RED_SUM, r2.d, x.d, 0);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(r1.d, r2.d), "reduce sum over dim 0 twice: bit-identical [%s]", dtn(dt));
        s1 = moe_op_reduce_all(ctx, MOE_RED_SUM, t1.d, x.d); s2 = moe_op_reduce_all(ctx, MOE_RED_SUM, t2.d, x.d);
        ok(s1 == MOE_OK && s2 == MOE_OK && same_bytes(t1.d, t2.d), "reduce_all sum twice: bit-identical [%s]", dtn(dt));
        pfree(&x); pfree(&r1); pfree(&r2); pfree(&t1); pfree(&t2);
        /* attention forward and backward (GQA, causal): tensor cores in bf16 */
        const int64_t B = 2, T = 300, S = 300, Hq = 4, Hkv = 2, D = 128;
        moe_tensor *q = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU), *kk = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
        moe_tensor *v = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU), *go = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
        moe_tensor *o[2], *l[2], *dq[2], *dk[2], *dv[2];
        die_if(!q || !kk || !v || !go, "attention tensors");
        moe_op_fill_randn(ctx, q, 11, 0, 0, 1); moe_op_fill_randn(ctx, kk, 12, 0, 0, 1);
        moe_op_fill_randn(ctx, v, 13, 0, 0, 1); moe_op_fill_randn(ctx, go, 14, 0, 0, 1);
        moe_status st = MOE_OK;
        for (int r = 0; r < 2; r++) {
            o[r] = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
            l[r] = moe_tensor_new(ctx, MOE_F32, SH(B, Hq, T), GPU);
            dq[r] = moe_tensor_new(ctx, dt, SH(B, T, Hq, D), GPU);
            dk[r] = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
            dv[r] = moe_tensor_new(ctx, dt, SH(B, S, Hkv, D), GPU);
            die_if(!o[r] || !l[r] || !dq[r] || !dk[r] || !dv[r], "attention outputs");
            if (st == MOE_OK) st = moe_op_attention(ctx, o[r], l[r], q, kk, v, 0.088f, 1);
            if (st == MOE_OK) st = moe_op_attention_backward(ctx, dq[r], dk[r], dv[r], go, q, kk, v, o[0], l[0], 0.088f, 1);
        }
        ok(st == MOE_OK && same_bytes(o[0], o[1]) && same_bytes(l[0], l[1]),
           "attention forward twice: bit-identical out and lse [%s]%s", dtn(dt), st ? moe_last_error() : "");
        ok(st == MOE_OK && same_bytes(dq[0], dq[1]) && same_bytes(dk[0], dk[1]) && same_bytes(dv[0], dv[1]),
           "attention backward twice: bit-identical dq, dk, dv [%s]", dtn(dt));
        moe_tensor_release(q); moe_tensor_release(kk); moe_tensor_release(v); moe_tensor_release(go);
        for (int r = 0; r < 2; r++) {
            moe_tensor_release(o[r]); moe_tensor_release(l[r]); moe_tensor_release(dq[r]);
            moe_tensor_release(dk[r]); moe_tensor_release(dv[r]);
        }
    }
}

static void test_dtype_error(void) {
    moe_tensor *x = moe_tensor_new(ctx, MOE_F16, SH(4, 8), GPU), *y = moe_tensor_new(ctx, MOE_F16, SH(4, 8), GPU);
    die_if(!x || !y, "f16 tensors");
    moe_status st = moe_op_softmax(ctx, y, x);
    ok(st == MOE_ERR_DTYPE && strstr(moe_last_error(), "f32 and bf16"), "an f16 op on cuda reports a dtype error (%s)",
       moe_last_error());
    moe_tensor_release(x); moe_tensor_release(y);
}

int main(void) {
    gpucheck_begin();
    const moe_dtype dts[] = {MOE_F32, MOE_BF16};
    for (int k = 0; k < 2; k++) {
        moe_dtype dt = dts[k];
        if (want("reduce")) test_reduce(dt);
        if (want("topk")) test_topk(dt);
        if (want("gather_scatter")) test_gather_scatter(dt);
        if (want("index_select_add")) test_index_select_add(dt);
        if (want("embedding")) test_embedding(dt);
        if (want("layernorm")) test_layernorm(dt);
        if (want("rope")) test_rope(dt);
        if (want("rmsnorm_rope")) test_rmsnorm_rope(dt);
        if (want("attention")) test_attention(dt);
    }
    if (want("stat_dtypes")) test_stat_dtypes();
    if (want("index_errors")) test_index_errors();
    if (want("determinism")) test_determinism();
    if (want("dtype_error")) test_dtype_error();
    return gpucheck_end();
}
