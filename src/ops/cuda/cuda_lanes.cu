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

// Lane i's stream, join event, workspace and handle, made on first use. Raw
// CUDA calls, no moe_error: a lane that cannot be made (memory short) only
// means fewer lanes, so a failure frees what it made, clears CUDA's error
// state and says no (lanes_failed: not tried again).
static bool lane_make(cuda_dev *d, int i) {
    if (d->lane_blas[i]) return true;
    if (d->lanes_failed) return false;
    const size_t ws = (size_t)32 << 20;   // as the device's own handle (init_dev)
    bool good = cudaStreamCreateWithFlags(&d->lane_stream[i], cudaStreamNonBlocking) == cudaSuccess &&
                cudaEventCreateWithFlags(&d->lane_join[i], cudaEventDisableTiming) == cudaSuccess &&
                cudaMalloc(&d->lane_ws[i], ws) == cudaSuccess;
    cublasHandle_t h = NULL;
    good = good && cublasCreate(&h) == CUBLAS_STATUS_SUCCESS && cublasSetStream(h, d->lane_stream[i]) == CUBLAS_STATUS_SUCCESS &&
           cublasSetWorkspace(h, d->lane_ws[i], ws) == CUBLAS_STATUS_SUCCESS;
    if (good) { d->lane_blas[i] = h; return true; }
    if (h) cublasDestroy(h);
    if (d->lane_ws[i]) cudaFree(d->lane_ws[i]);
    if (d->lane_join[i]) cudaEventDestroy(d->lane_join[i]);
    if (d->lane_stream[i]) cudaStreamDestroy(d->lane_stream[i]);
    d->lane_ws[i] = NULL;
    d->lane_join[i] = NULL;
    d->lane_stream[i] = NULL;
    cudaGetLastError();
    d->lanes_failed = true;
    return false;
}

void cuda_lanes_free(cuda_dev *d) {
    for (int i = 1; i < MOE_CUDA_MAX_LANES; i++) {
        if (!d->lane_blas[i]) continue;
        cudaStreamSynchronize(d->lane_stream[i]);
        cublasDestroy(d->lane_blas[i]);
        cudaFree(d->lane_ws[i]);
        cudaEventDestroy(d->lane_join[i]);
        cudaStreamDestroy(d->lane_stream[i]);
        d->lane_blas[i] = NULL;
    }
    if (d->lane_fork) cudaEventDestroy(d->lane_fork);
    d->lane_fork = NULL;
}

// How many lanes a loop over `busy` non-empty experts (flops in all) uses,
// forking them off the device's stream; 1: none (everything on the device's
// stream). Experts of 64 GFLOP or more keep one lane: each GEMM then
// fills the GPU many times over (the Mixtral layer: 25.5 ms for its 9 GEMMs in
// one lane, 25.7-26.1 in two or four, H100), and two only compete. Lanes that
// cannot be made are done without.
moe_status cuda_lanes_fork(cuda_dev *d, int busy, double flops, int *n) {
    int want = busy > 0 && flops / busy < 64e9 ? std::min(d->loop_lanes, busy) : 1;
    *n = 1;
    if (want <= 1) return MOE_OK;
    if (!d->lane_fork && cudaEventCreateWithFlags(&d->lane_fork, cudaEventDisableTiming) != cudaSuccess) {
        d->lane_fork = NULL;
        cudaGetLastError();
        return MOE_OK;
    }
    while (*n < want && lane_make(d, *n)) (*n)++;
    if (*n == 1) return MOE_OK;
    CU_TRY(cudaEventRecord(d->lane_fork, d->stream), "grouped GEMM lanes (fork)");
    for (int i = 1; i < *n; i++) {
        cudaError_t e = cudaStreamWaitEvent(d->lane_stream[i], d->lane_fork, 0);
        if (e != cudaSuccess) {   // the lanes before i wait already: run on those
            cudaGetLastError();
            *n = i;
            break;
        }
    }
    return MOE_OK;
}

cublasHandle_t cuda_lane_blas(cuda_dev *d, int i) { return i == 0 ? d->blas : d->lane_blas[i]; }

// The device's stream waits for every lane (all of them, whatever fails on the
// way: a lane left unjoined could still write blocks the allocator hands out
// again); `st` (the loop's status) is returned unless a join fails.
moe_status cuda_lanes_join(cuda_dev *d, int n, moe_status st) {
    cudaError_t first = cudaSuccess;
    for (int i = 1; i < n; i++) {
        cudaError_t e = cudaEventRecord(d->lane_join[i], d->lane_stream[i]);
        if (e == cudaSuccess) e = cudaStreamWaitEvent(d->stream, d->lane_join[i], 0);
        if (e != cudaSuccess && first == cudaSuccess) first = e;
    }
    if (first != cudaSuccess) {
        // no event to wait on: wait for the lanes' work itself
        for (int i = 1; i < n; i++) cudaStreamSynchronize(d->lane_stream[i]);
        cudaGetLastError();
        return moe_error(MOE_ERR_DEVICE, "cuda grouped GEMM lanes (join): %s", cudaGetErrorString(first));
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

