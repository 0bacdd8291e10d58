/* The CPU backend's dispatch table, its installer, and the memory kernels
 * (copy, fill, random fills). */
#include "cpu.h"

#include <cblas.h>
#include "../../core/rng.h"

static moe_status cpu_synchronize(moe_ctx *ctx, moe_device dev) {
    (void)ctx; (void)dev;
    return MOE_OK;
}

/* Strided copy of same-dtype elements of `es` bytes, row by row over the last dim. */
static void strided_copy(const moe_tensor *dst, const moe_tensor *src, size_t es) {
    int nd = dst->ndim;
    int64_t n = moe_tensor_numel(dst);
    int64_t len = nd ? dst->shape[nd - 1] : 1;
    int64_t ds = nd ? dst->stride[nd - 1] : 1, ss = nd ? src->stride[nd - 1] : 1;
    char *d = moe_tensor_data(dst);
    const char *s = moe_tensor_data(src);
    int64_t idx[MOE_MAX_DIMS] = {0};
    for (int64_t done = 0; done < n; done += len) {
        int64_t od = 0, os = 0;
        for (int i = 0; i < nd - 1; i++) { od += idx[i] * dst->stride[i]; os += idx[i] * src->stride[i]; }
        if (es == 4) {
            float *restrict pd = (float *)d + od;
            const float *restrict ps = (const float *)s + os;
            for (int64_t j = 0; j < len; j++) pd[j * ds] = ps[j * ss];
        } else {
            for (int64_t j = 0; j < len; j++) memcpy(d + (od + j * ds) * (int64_t)es, s + (os + j * ss) * (int64_t)es, es);
        }
        for (int i = nd - 2; i >= 0; i--) {
            if (++idx[i] < dst->shape[i]) break;
            idx[i] = 0;
        }
    }
}

moe_status moe_cpu_copy(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *src) {
    (void)ctx;
    int dc = moe_tensor_is_contiguous(dst), sc = moe_tensor_is_contiguous(src);
    if (dst->dtype == src->dtype) {
        if (dc && sc) {
            memmove(moe_tensor_data(dst), moe_tensor_data(src), moe_tensor_nbytes(src));
            return MOE_OK;
        }
        if (moe_tensor_same_shape(dst, src)) {
            strided_copy(dst, src, moe_dtype_size(dst->dtype));
            return MOE_OK;
        }
    } else if (dc && sc) {
        int64_t n = moe_tensor_numel(src);
        if (dst->dtype == MOE_F32 && src->dtype == MOE_BF16) {
            float *restrict d = moe_f32(dst);
            const uint16_t *restrict s = moe_tensor_data(src);
            for (int64_t i = 0; i < n; i++) d[i] = moe_bf16_to_f32(s[i]);
            return MOE_OK;
        }
        if (dst->dtype == MOE_BF16 && src->dtype == MOE_F32) {
            uint16_t *restrict d = moe_tensor_data(dst);
            const float *restrict s = moe_f32(src);
            for (int64_t i = 0; i < n; i++) d[i] = moe_f32_to_bf16(s[i]);
            return MOE_OK;
        }
    }
    return moe_tensor_copy_cpu(dst, src);
}

moe_status moe_cpu_fill(moe_ctx *ctx, moe_tensor *t, double v) {
    (void)ctx;
    return moe_tensor_fill_cpu(t, v);
}

typedef struct { float *out; moe_tensor *t; uint64_t key, offset; float a, b; int normal; } rand_job;

static void rand_range(void *arg, int64_t begin, int64_t end) {
    rand_job *j = arg;
    if (j->out) {
        float *restrict o = j->out;
        for (int64_t i = begin; i < end; i++) {
            uint64_t ix = j->offset + (uint64_t)i;
            o[i] = j->normal ? j->a + j->b * moe_rng_normal_at(j->key, ix)
                             : j->a + (j->b - j->a) * moe_rng_uniform_at(j->key, ix);
        }
    } else {
        char *base = moe_tensor_data(j->t);
        size_t es = moe_dtype_size(j->t->dtype);
        for (int64_t i = begin; i < end; i++) {
            uint64_t ix = j->offset + (uint64_t)i;
            float v = j->normal ? j->a + j->b * moe_rng_normal_at(j->key, ix)
                                : j->a + (j->b - j->a) * moe_rng_uniform_at(j->key, ix);
            moe_dtype_store(j->t->dtype, base + i * (int64_t)es, v);
        }
    }
}

static moe_status fill_random(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float a, float b, int normal) {
    rand_job j = { t->dtype == MOE_F32 ? moe_f32(t) : NULL, t, key, offset, a, b, normal };
    moe_parallel_for(ctx->pool, moe_tensor_numel(t), 4096, rand_range, &j);
    return MOE_OK;
}

moe_status moe_cpu_fill_randn(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std) {
    return fill_random(ctx, t, key, offset, mean, std, 1);
}

moe_status moe_cpu_fill_rand(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi) {
    return fill_random(ctx, t, key, offset, lo, hi, 0);
}

static const moe_backend cpu_backend = {
    .name = "cpu",
    .device_type = MOE_CPU,
    .synchronize = cpu_synchronize,
    .copy = moe_cpu_copy,
    .fill = moe_cpu_fill,
    .fill_randn = moe_cpu_fill_randn,
    .fill_rand = moe_cpu_fill_rand,
    .gemm = moe_cpu_gemm,
    .gemm_grouped = moe_cpu_gemm_grouped,
    .gemm_grouped_wgrad = moe_cpu_gemm_grouped_wgrad,
    .binary = moe_cpu_binary,
    .unary = moe_cpu_unary,
    .unary_backward = moe_cpu_unary_backward,
    .axpy = moe_cpu_axpy,
    .reduce = moe_cpu_reduce,
    .softmax = moe_cpu_softmax,
    .softmax_backward = moe_cpu_softmax_backward,
    .log_softmax = moe_cpu_log_softmax,
    .log_softmax_backward = moe_cpu_log_softmax_backward,
    .logsumexp = moe_cpu_logsumexp,
    .topk = moe_cpu_topk,
    .gather = moe_cpu_gather,
    .scatter_add = moe_cpu_scatter_add,
    .index_select = moe_cpu_index_select,
    .index_add = moe_cpu_index_add,
    .rmsnorm = moe_cpu_rmsnorm,
    .rmsnorm_backward = moe_cpu_rmsnorm_backward,
    .layernorm = moe_cpu_layernorm,
    .layernorm_backward = moe_cpu_layernorm_backward,
    .rope = moe_cpu_rope,
    .attention = moe_cpu_attention,
    .attention_backward = moe_cpu_attention_backward,
    .swiglu = moe_cpu_swiglu,
    .swiglu_backward = moe_cpu_swiglu_backward,
    .cross_entropy = moe_cpu_cross_entropy,
    .cross_entropy_backward = moe_cpu_cross_entropy_backward,
    .adamw = moe_cpu_adamw,
    .sumsq = moe_cpu_sumsq,
    .gather_sum = moe_cpu_gather_sum,
    .combine_backward = moe_cpu_combine_backward,
    .ep_token_slots = moe_cpu_ep_token_slots,
    .slot_tokens = moe_cpu_slot_tokens,
    .ep_pack = moe_cpu_ep_pack,
    .ep_unpack = moe_cpu_ep_unpack,
    .ep_regroup = moe_cpu_ep_regroup,
    .adamw_advance = moe_cpu_adamw_advance,
    .master_split = moe_cpu_master_split,
    .master_join = moe_cpu_master_join,
};

void moe_cpu_backend_install(moe_ctx *ctx) {
    if (ctx) ctx->backends[MOE_CPU] = &cpu_backend;
    /* GEMMs are split over the context's pool (cpu_gemm.c), each part a
     * single-threaded BLAS call: OpenBLAS's own workers would spin between
     * calls and compete with the pool for the same cores. */
    openblas_set_num_threads(1);
}
