// The loop strategy's lanes: its per-expert cuBLAS GEMMs spread over several
// streams (cuda_gemm.cu runs the loop; moe_cuda.h, moe_cuda_set_grouped_lanes).
//
// One cuBLAS GEMM per expert runs each expert as its own short wave: at the
// OLMoE layer shape an expert's GEMM is ~128 tiles on 132 SMs, and every
// launch ramps up and drains alone. Spread over several streams (lanes, each
// with its own cuBLAS handle and workspace, since one workspace cannot serve
// two streams at once), the next expert's tiles fill the SMs the last one's
// tail leaves. The lanes fork from the device's stream with an event and join
// back into it before the call returns: every other op still sees one ordered
// stream, and blocks freed afterwards are reused only after the join.
#include "cuda_common.cuh"
#include "moe_cuda.h"

#include <algorithm>
#include <stdlib.h>

static moe_status lanes_blas_err(cublasStatus_t s, const char *what) {
    return moe_error(MOE_ERR_DEVICE, "cuda %s: cuBLAS %s", what, cublasGetStatusString(s));
}

static moe_status lanes_make(cuda_dev *d) {
    if (d->lanes_made) return MOE_OK;
    CU_TRY(cudaEventCreateWithFlags(&d->lane_fork, cudaEventDisableTiming), "grouped GEMM lanes");
    const size_t ws = (size_t)32 << 20;   // as the device's own handle (init_dev)
    for (int i = 1; i < MOE_CUDA_MAX_LANES; i++) {
        CU_TRY(cudaStreamCreateWithFlags(&d->lane_stream[i], cudaStreamNonBlocking), "grouped GEMM lanes");
        CU_TRY(cudaEventCreateWithFlags(&d->lane_join[i], cudaEventDisableTiming), "grouped GEMM lanes");
        CU_TRY(cudaMalloc(&d->lane_ws[i], ws), "grouped GEMM lanes (cuBLAS workspace)");
        cublasStatus_t s = cublasCreate(&d->lane_blas[i]);
        if (s != CUBLAS_STATUS_SUCCESS) { d->lane_blas[i] = NULL; return lanes_blas_err(s, "grouped GEMM lanes"); }
        if ((s = cublasSetStream(d->lane_blas[i], d->lane_stream[i])) != CUBLAS_STATUS_SUCCESS ||
            (s = cublasSetWorkspace(d->lane_blas[i], d->lane_ws[i], ws)) != CUBLAS_STATUS_SUCCESS)
            return lanes_blas_err(s, "grouped GEMM lanes");
    }
    d->lanes_made = true;   // cuda_dev_destroy frees whatever was made, also after a failure part way
    return MOE_OK;
}

void cuda_lanes_free(cuda_dev *d) {
    for (int i = 1; i < MOE_CUDA_MAX_LANES; i++) {
        if (d->lane_stream[i]) cudaStreamSynchronize(d->lane_stream[i]);
        if (d->lane_blas[i]) cublasDestroy(d->lane_blas[i]);
        if (d->lane_ws[i]) cudaFree(d->lane_ws[i]);
        if (d->lane_join[i]) cudaEventDestroy(d->lane_join[i]);
        if (d->lane_stream[i]) cudaStreamDestroy(d->lane_stream[i]);
    }
    if (d->lane_fork) cudaEventDestroy(d->lane_fork);
}

// How many lanes a loop over the non-empty experts of `offsets` (flops in
// all) uses, forking them off the device's stream; 1: none (everything on the
// device's stream). Experts of 64 GFLOP or more keep one lane: each GEMM then
// fills the GPU many times over (the Mixtral layer: 25.5 ms for its 9 GEMMs in
// one lane, 25.7-26.1 in two or four, H100), and two only compete.
moe_status cuda_lanes_fork(cuda_dev *d, const int64_t *offsets, int groups, double flops, int *n) {
    int busy = 0;
    for (int g = 0; g < groups; g++) busy += offsets[g + 1] > offsets[g];
    *n = busy > 0 && flops / busy < 64e9 ? std::min(d->loop_lanes, busy) : 1;
    if (*n <= 1) { *n = 1; return MOE_OK; }
    MOE_TRY(lanes_make(d));
    CU_TRY(cudaEventRecord(d->lane_fork, d->stream), "grouped GEMM lanes (fork)");
    for (int i = 1; i < *n; i++)
        CU_TRY(cudaStreamWaitEvent(d->lane_stream[i], d->lane_fork, 0), "grouped GEMM lanes (fork)");
    return MOE_OK;
}

cublasHandle_t cuda_lane_blas(cuda_dev *d, int i) { return i == 0 ? d->blas : d->lane_blas[i]; }

// The device's stream waits for every lane; `st` (the loop's status) is
// returned unless the join itself fails.
moe_status cuda_lanes_join(cuda_dev *d, int n, moe_status st) {
    for (int i = 1; i < n; i++) {
        CU_TRY(cudaEventRecord(d->lane_join[i], d->lane_stream[i]), "grouped GEMM lanes (join)");
        CU_TRY(cudaStreamWaitEvent(d->stream, d->lane_join[i], 0), "grouped GEMM lanes (join)");
    }
    return st;
}

// MOELAB_GROUPED_LANES: 1 to MOE_CUDA_MAX_LANES streams for the loop strategy
moe_status cuda_grouped_lanes_from_env(int *lanes) {
    const char *v = getenv("MOELAB_GROUPED_LANES");
    if (!v || !*v) { *lanes = MOE_CUDA_DEFAULT_LANES; return MOE_OK; }
    char *end = NULL;
    long n = strtol(v, &end, 10);
    if (*end || n < 1 || n > MOE_CUDA_MAX_LANES)
        return moe_error(MOE_ERR_ARG, "MOELAB_GROUPED_LANES=%s: expected a whole number from 1 to %d", v,
                         MOE_CUDA_MAX_LANES);
    *lanes = (int)n;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_set_grouped_lanes(moe_ctx *ctx, int device, int lanes) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_lanes: no context");
    if (lanes < 1 || lanes > MOE_CUDA_MAX_LANES)
        return moe_error(MOE_ERR_ARG, "moe_cuda_set_grouped_lanes: %d lanes (expected 1 to %d)", lanes,
                         MOE_CUDA_MAX_LANES);
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->loop_lanes = lanes;
    return MOE_OK;
}

