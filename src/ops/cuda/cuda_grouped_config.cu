// The grouped GEMMs' settings (moe_cuda.h): the strategies from the
// environment (MOELAB_GROUPED_GEMM, MOELAB_GROUPED_WGRAD) and their setters,
// the TMA kernel's switch and cluster size, and the counters tests and
// benchmarks read to see which path served a call. The paths themselves are
// in cuda_gemm.cu (policy), cuda_grouped_mma.cu and cuda_grouped_tma.cu.
#include "cuda_common.cuh"
#include "moe_cuda.h"

#include <stdlib.h>
#include <string.h>

static bool known(moe_cuda_grouped_gemm mode) {
    return mode == MOE_CUDA_GROUPED_BATCHED || mode == MOE_CUDA_GROUPED_LOOP || mode == MOE_CUDA_GROUPED_AUTO ||
           mode == MOE_CUDA_GROUPED_PADDED || mode == MOE_CUDA_GROUPED_KERNEL;
}

// "auto" | "batched" | "padded" | "kernel" | "loop" -> a moe_cuda_grouped_gemm
static moe_status parse_grouped(const char *var, const char *v, int *mode) {
    if (!strcmp(v, "auto")) *mode = MOE_CUDA_GROUPED_AUTO;
    else if (!strcmp(v, "batched")) *mode = MOE_CUDA_GROUPED_BATCHED;
    else if (!strcmp(v, "padded")) *mode = MOE_CUDA_GROUPED_PADDED;
    else if (!strcmp(v, "loop")) *mode = MOE_CUDA_GROUPED_LOOP;
    else if (!strcmp(v, "kernel")) *mode = MOE_CUDA_GROUPED_KERNEL;
    else return moe_error(MOE_ERR_ARG, "%s=%s: expected \"auto\", \"batched\", \"padded\", \"kernel\" or \"loop\"",
                          var, v);
    return MOE_OK;
}

moe_status cuda_grouped_wgrad_from_env(int *mode) {
    const char *v = getenv("MOELAB_GROUPED_WGRAD");
    return v && *v ? parse_grouped("MOELAB_GROUPED_WGRAD", v, mode) : MOE_OK;
}

moe_status cuda_grouped_gemm_from_env(int *mode) {
    const char *v = getenv("MOELAB_GROUPED_GEMM");
    if (!v || !*v) { *mode = MOE_CUDA_GROUPED_AUTO; return MOE_OK; }
    return parse_grouped("MOELAB_GROUPED_GEMM", v, mode);
}

moe_status cuda_grouped_tma_from_env(int *on, int *cluster) {
    const char *v = getenv("MOELAB_GROUPED_TMA");
    if (v && *v) {
        if (!strcmp(v, "auto")) *on = -1;
        else if (!strcmp(v, "0") || !strcmp(v, "1")) *on = v[0] - '0';
        else return moe_error(MOE_ERR_ARG, "MOELAB_GROUPED_TMA=%s: expected 0, 1 or auto", v);
    }
    v = getenv("MOELAB_TMA_CLUSTER");
    if (v && *v) {
        if (strcmp(v, "1") && strcmp(v, "2")) return moe_error(MOE_ERR_ARG, "MOELAB_TMA_CLUSTER=%s: expected 1 or 2", v);
        *cluster = v[0] - '0';
    }
    return MOE_OK;
}

// The TMA kernel's SwiGLU epilogues (cuda_dev.tma_swiglu): the forward's by
// default. At the OLMoE layer it gained 1.8% on an H200 and 0.5% on an H100
// (runs alternating); the backward's lost to the elementwise kernel (0.4 ms on
// an H100), so it stays off unless asked (bench/RESULTS.md, twenty-fourth pass).
moe_status cuda_tma_swiglu_from_env(int *mask) {
    static const char *names[] = {"0", "fwd", "bwd", "all"};
    const char *v = getenv("MOELAB_TMA_SWIGLU");
    if (!v || !*v) return MOE_OK;
    for (int m = 0; m < 4; m++)
        if (!strcmp(v, names[m])) { *mask = m; return MOE_OK; }
    return moe_error(MOE_ERR_ARG, "MOELAB_TMA_SWIGLU=%s: expected 0, fwd, bwd or all", v);
}

extern "C" moe_status moe_cuda_set_grouped_gemm(moe_ctx *ctx, int device, moe_cuda_grouped_gemm mode) {
    if (!known(mode)) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_gemm: unknown strategy %d", (int)mode);
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_gemm: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->grouped_gemm = mode;
    d->grouped_wgrad = mode;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_set_grouped_wgrad(moe_ctx *ctx, int device, moe_cuda_grouped_gemm mode) {
    if (!known(mode)) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_wgrad: unknown strategy %d", (int)mode);
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_wgrad: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->grouped_wgrad = mode;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_grouped_gemm_info(moe_ctx *ctx, int device, moe_cuda_grouped_gemm *mode,
                                                 uint64_t *batched_calls, uint64_t *loop_calls) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_grouped_gemm_info: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    if (mode) *mode = (moe_cuda_grouped_gemm)d->grouped_gemm;
    if (batched_calls) *batched_calls = d->n_grouped_batched;
    if (loop_calls) *loop_calls = d->n_grouped_loop;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_grouped_kernel_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_grouped_kernel, "moe_cuda_grouped_kernel_calls");
}

extern "C" moe_status moe_cuda_grouped_split_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_grouped_split, "moe_cuda_grouped_split_calls");
}

extern "C" moe_status moe_cuda_set_grouped_tma(moe_ctx *ctx, int device, int on) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_tma: no context");
    if (on < -1 || on > 1) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_tma: %d is not -1 (auto), 0 or 1", on);
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->grouped_tma = on;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_set_tma_cluster(moe_ctx *ctx, int device, int ctas) {
    if (ctas != 1 && ctas != 2) return moe_error(MOE_ERR_ARG, "moe_cuda_set_tma_cluster: %d CTAs, expected 1 or 2", ctas);
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_tma_cluster: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->tma_cluster = ctas;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_set_tma_swiglu(moe_ctx *ctx, int device, int mask) {
    if (mask < 0 || mask > 3) return moe_error(MOE_ERR_ARG, "moe_cuda_set_tma_swiglu: mask %d, expected 0 to 3", mask);
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_tma_swiglu: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->tma_swiglu = mask;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_grouped_dev_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_grouped_dev, "moe_cuda_grouped_dev_calls");
}

extern "C" moe_status moe_cuda_grouped_plan_shared_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_plan_shared, "moe_cuda_grouped_plan_shared_calls");
}

extern "C" moe_status moe_cuda_tma_swiglu_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_tma_swiglu, "moe_cuda_tma_swiglu_calls");
}

extern "C" moe_status moe_cuda_grouped_tma_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_grouped_tma, "moe_cuda_grouped_tma_calls");
}
