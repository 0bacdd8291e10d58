/* Selection and indexing: topk, gather / scatter_add over the last dim,
 * index_select / index_add over rows. Indices are validated before anything
 * is written; accumulating kernels are deterministic (each output element is
 * updated by one thread in index order). */
#include "cpu.h"

#include <stdlib.h>

/* first index outside [0, n) (ignoring `skip` when use_skip), or -1 */
static int64_t find_bad(const int64_t *idx, int64_t m, int64_t n) {
    for (int64_t i = 0; i < m; i++)
        if (idx[i] < 0 || idx[i] >= n) return i;
    return -1;
}

static moe_status range_error(const char *op, const int64_t *idx, int64_t pos, int64_t n) {
    return moe_error(MOE_ERR_RANGE, "%s: index %lld at position %lld is out of range, expected [0, %lld)", op,
                     (long long)idx[pos], (long long)pos, (long long)n);
}

/* ---- topk ---- */

typedef struct { float v; int64_t i; } vi_pair;

/* a ranks before b: larger value, then lower index */
static int vi_cmp(const void *pa, const void *pb) {
    const vi_pair *a = pa, *b = pb;
    if (a->v > b->v) return -1;
    if (a->v < b->v) return 1;
    return a->i < b->i ? -1 : a->i > b->i;
}

typedef struct { float *vals; int64_t *idx; const float *x; int64_t n; int k; } topk_job;

static void topk_range(void *arg, int64_t r0, int64_t r1) {
    topk_job *J = arg;
    int64_t n = J->n;
    int k = J->k;
    vi_pair *buf = NULL;
    if (k > 16) buf = malloc((size_t)n * sizeof *buf);
    for (int64_t r = r0; r < r1; r++) {
        const float *x = J->x + r * n;
        float *vo = J->vals + r * k;
        int64_t *io = J->idx + r * k;
        if (k > 16 && buf) {
            for (int64_t i = 0; i < n; i++) buf[i] = (vi_pair){x[i], i};
            qsort(buf, (size_t)n, sizeof *buf, vi_cmp);
            for (int j = 0; j < k; j++) { vo[j] = buf[j].v; io[j] = buf[j].i; }
            continue;
        }
        /* insertion into a sorted list of the best k; scanning in index
         * order, an equal value never displaces an earlier one */
        int cnt = 0;
        for (int64_t i = 0; i < n; i++) {
            float v = x[i];
            if (cnt == k && !(v > vo[k - 1])) continue;
            int p = cnt < k ? cnt++ : k - 1;
            while (p > 0 && v > vo[p - 1]) { vo[p] = vo[p - 1]; io[p] = io[p - 1]; p--; }
            vo[p] = v;
            io[p] = i;
        }
    }
    free(buf);
}

moe_status moe_cpu_topk(moe_ctx *ctx, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k) {
    CPU_F32("topk", values);
    int64_t n = x->shape[x->ndim - 1];
    if (k == 0 || n == 0) return MOE_OK;
    topk_job J = {moe_f32(values), moe_tensor_data(indices), moe_f32(x), n, k};
    if (k > 16) {
        /* allocate per chunk inside; check it can be allocated at all */
        void *probe = malloc((size_t)n * sizeof(vi_pair));
        if (!probe) return moe_error(MOE_ERR_OOM, "topk: out of host memory for a row of %lld", (long long)n);
        free(probe);
    }
    moe_parallel_for(ctx->pool, moe_tensor_numel(x) / n, cpu_grain(n * (k < 16 ? k : 16), CPU_PAR_WORK), topk_range, &J);
    return MOE_OK;
}

/* ---- gather / scatter_add (last dim) ---- */

typedef struct { float *out; const float *x; const int64_t *idx; int64_t n, m; } gs_job;

static void gather_range(void *arg, int64_t r0, int64_t r1) {
    gs_job *J = arg;
    for (int64_t r = r0; r < r1; r++) {
        const float *restrict x = J->x + r * J->n;
        const int64_t *restrict ix = J->idx + r * J->m;
        float *restrict o = J->out + r * J->m;
        for (int64_t j = 0; j < J->m; j++) o[j] = x[ix[j]];
    }
}

static void scatter_range(void *arg, int64_t r0, int64_t r1) {
    gs_job *J = arg;
    for (int64_t r = r0; r < r1; r++) {
        float *restrict d = J->out + r * J->n;
        const int64_t *restrict ix = J->idx + r * J->m;
        const float *restrict s = J->x + r * J->m;
        for (int64_t j = 0; j < J->m; j++) d[ix[j]] += s[j];
    }
}

moe_status moe_cpu_gather(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    CPU_F32("gather", out);
    int64_t n = x->shape[x->ndim - 1], m = index->shape[index->ndim - 1];
    const int64_t *ix = moe_tensor_data(index);
    int64_t bad = find_bad(ix, moe_tensor_numel(index), n);
    if (bad >= 0) return range_error("gather", ix, bad, n);
    gs_job J = {moe_f32(out), moe_f32(x), ix, n, m};
    moe_parallel_for(ctx->pool, m ? moe_tensor_numel(index) / m : 0, cpu_grain(m, CPU_PAR_WORK), gather_range, &J);
    return MOE_OK;
}

moe_status moe_cpu_scatter_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    CPU_F32("scatter_add", dst);
    int64_t n = dst->shape[dst->ndim - 1], m = index->shape[index->ndim - 1];
    const int64_t *ix = moe_tensor_data(index);
    int64_t bad = find_bad(ix, moe_tensor_numel(index), n);
    if (bad >= 0) return range_error("scatter_add", ix, bad, n);
    gs_job J = {moe_f32(dst), moe_f32(src), ix, n, m};
    moe_parallel_for(ctx->pool, m ? moe_tensor_numel(index) / m : 0, cpu_grain(m, CPU_PAR_WORK), scatter_range, &J);
    return MOE_OK;
}

/* ---- index_select / index_add (rows) ---- */

typedef struct { float *out; const float *x; const int64_t *idx; int64_t m, d; } is_job;

static void select_range(void *arg, int64_t r0, int64_t r1) {
    is_job *J = arg;
    for (int64_t i = r0; i < r1; i++)
        memcpy(J->out + i * J->d, J->x + J->idx[i] * J->d, (size_t)J->d * sizeof(float));
}

/* items are column blocks; each thread walks every index in order */
#define IA_BLOCK 256
static void add_range(void *arg, int64_t b0, int64_t b1) {
    is_job *J = arg;
    int64_t c0 = b0 * IA_BLOCK, c1 = b1 * IA_BLOCK < J->d ? b1 * IA_BLOCK : J->d;
    for (int64_t i = 0; i < J->m; i++) {
        float *restrict d = J->out + J->idx[i] * J->d;
        const float *restrict s = J->x + i * J->d;
        for (int64_t c = c0; c < c1; c++) d[c] += s[c];
    }
}

moe_status moe_cpu_index_select(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    CPU_F32("index_select", out);
    int64_t n = x->shape[0], m = index->shape[0], d = n ? moe_tensor_numel(x) / n : 0;
    const int64_t *ix = moe_tensor_data(index);
    int64_t bad = find_bad(ix, m, n);
    if (bad >= 0) return range_error("index_select", ix, bad, n);
    is_job J = {moe_f32(out), moe_f32(x), ix, m, d};
    moe_parallel_for(ctx->pool, m, cpu_grain(d, CPU_PAR_WORK * 4), select_range, &J);
    return MOE_OK;
}

moe_status moe_cpu_index_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    CPU_F32("index_add", dst);
    int64_t n = dst->shape[0], m = index->shape[0], d = n ? moe_tensor_numel(dst) / n : 0;
    const int64_t *ix = moe_tensor_data(index);
    int64_t bad = find_bad(ix, m, n);
    if (bad >= 0) return range_error("index_add", ix, bad, n);
    is_job J = {moe_f32(dst), moe_f32(src), ix, m, d};
    moe_parallel_for(ctx->pool, (d + IA_BLOCK - 1) / IA_BLOCK, cpu_grain(m * IA_BLOCK, CPU_PAR_WORK), add_range, &J);
    return MOE_OK;
}
