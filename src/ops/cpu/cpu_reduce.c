/* Reductions over one dim of x viewed as [outer, n, inner]. Each output
 * element is computed by one fixed sequence of operations, so results do not
 * depend on the thread count. */
#include "cpu.h"

#include <stdlib.h>

typedef struct { moe_reduce_op op; float *out; const float *x; int64_t outer, n, inner, iblocks; } red_job;

#define RED_BLOCK 512

/* inner == 1: one contiguous row per output */
static void red_rows(void *arg, int64_t b, int64_t e) {
    red_job *J = arg;
    int64_t n = J->n;
    for (int64_t o = b; o < e; o++) {
        const float *x = J->x + o * n;
        float r;
        switch (J->op) {
        case MOE_RED_SUM: r = cpu_row_sum(x, n); break;
        case MOE_RED_MEAN: r = n ? cpu_row_sum(x, n) / (float)n : NAN; break;
        case MOE_RED_MAX: r = cpu_row_max(x, n); break;
        default: {
            float acc[8];
            for (int l = 0; l < 8; l++) acc[l] = INFINITY;
            int64_t i = 0;
            for (; i + 8 <= n; i += 8)
                for (int l = 0; l < 8; l++) acc[l] = x[i + l] < acc[l] ? x[i + l] : acc[l];
            for (int l = 0; i < n; i++, l++) acc[l] = x[i] < acc[l] ? x[i] : acc[l];
            r = acc[0];
            for (int l = 1; l < 8; l++) r = acc[l] < r ? acc[l] : r;
        }
        }
        J->out[o] = r;
    }
}

/* inner > 1: items are (outer, block of inner columns); loop over n outside */
static void red_cols(void *arg, int64_t b, int64_t e) {
    red_job *J = arg;
    int64_t n = J->n, inner = J->inner;
    for (int64_t it = b; it < e; it++) {
        int64_t o = it / J->iblocks, c0 = (it % J->iblocks) * RED_BLOCK;
        int64_t c1 = c0 + RED_BLOCK < inner ? c0 + RED_BLOCK : inner, w = c1 - c0;
        float *restrict out = J->out + o * inner + c0;
        const float *base = J->x + o * n * inner + c0;
        if (n == 0) {
            for (int64_t c = 0; c < w; c++) out[c] = J->op == MOE_RED_MEAN ? NAN : 0.0f;
            continue;
        }
        for (int64_t c = 0; c < w; c++) out[c] = base[c];
        for (int64_t j = 1; j < n; j++) {
            const float *restrict x = base + j * inner;
            switch (J->op) {
            case MOE_RED_SUM: case MOE_RED_MEAN: for (int64_t c = 0; c < w; c++) out[c] += x[c]; break;
            case MOE_RED_MAX: for (int64_t c = 0; c < w; c++) out[c] = x[c] > out[c] ? x[c] : out[c]; break;
            default: for (int64_t c = 0; c < w; c++) out[c] = x[c] < out[c] ? x[c] : out[c]; break;
            }
        }
        if (J->op == MOE_RED_MEAN)
            for (int64_t c = 0; c < w; c++) out[c] /= (float)n;
    }
}

moe_status moe_cpu_reduce(moe_ctx *ctx, moe_reduce_op op, moe_tensor *out, const moe_tensor *x, int64_t outer,
                          int64_t n, int64_t inner) {
    CPU_F32("reduce", out);
    red_job J = {op, moe_f32(out), moe_f32(x), outer, n, inner, (inner + RED_BLOCK - 1) / RED_BLOCK};
    if (inner == 1) {
        moe_parallel_for(ctx->pool, outer, cpu_grain(n, CPU_PAR_WORK), red_rows, &J);
    } else {
        int64_t per = n * (inner < RED_BLOCK ? inner : RED_BLOCK);
        moe_parallel_for(ctx->pool, outer * J.iblocks, cpu_grain(per, CPU_PAR_WORK), red_cols, &J);
    }
    return MOE_OK;
}

/* sum of squares in f64: fixed blocks of 4096 summed in block order, so the
 * result does not depend on the thread count */
typedef struct { const void *x; int bf16; int64_t n; double *part; } sumsq_job;

static void sumsq_range(void *arg, int64_t b, int64_t e) {
    sumsq_job *J = arg;
    for (int64_t blk = b; blk < e; blk++) {
        int64_t lo = blk * 4096, hi = lo + 4096 < J->n ? lo + 4096 : J->n;
        double acc = 0;
        if (J->bf16)
            for (int64_t i = lo; i < hi; i++) { double v = moe_bf16_to_f32(((const uint16_t *)J->x)[i]); acc += v * v; }
        else
            for (int64_t i = lo; i < hi; i++) { double v = ((const float *)J->x)[i]; acc += v * v; }
        J->part[blk] = acc;
    }
}

moe_status moe_cpu_sumsq(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    int64_t n = moe_tensor_numel(x), blocks = (n + 4095) / 4096;
    double *part = malloc((size_t)(blocks ? blocks : 1) * sizeof *part);
    if (!part) return moe_error(MOE_ERR_OOM, "sumsq: out of host memory");
    sumsq_job J = {moe_tensor_data((moe_tensor *)x), x->dtype == MOE_BF16, n, part};
    moe_parallel_for(ctx->pool, blocks, 16, sumsq_range, &J);
    double tot = 0;
    for (int64_t b = 0; b < blocks; b++) tot += part[b];
    free(part);
    moe_f32(out)[0] = (float)tot;
    return MOE_OK;
}
