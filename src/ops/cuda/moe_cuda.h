/* Extras of the CUDA backend beyond backend.h (C API; only in CUDA builds).
 * moe_cuda_backend_install / moe_cuda_device_count are declared in backend.h. */
#ifndef MOE_CUDA_H
#define MOE_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "../../core/context.h"
#include "../../core/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Detaches the CUDA backend from ctx (call before moe_ctx_free). Each device's
 * state (stream, cuBLAS handle, cached blocks) is destroyed at once if no
 * storage still holds one of its blocks, else when the last such block is freed. */
void moe_cuda_backend_uninstall(moe_ctx *ctx);

typedef struct {
    size_t bytes_in_use;        /* held by live storages (size classes, not requested sizes) */
    size_t bytes_cached;        /* freed blocks kept for reuse */
    size_t peak_bytes_in_use;
    size_t bytes_reserved;      /* held from the driver: in use + cached (the pools' segments) */
    size_t peak_bytes_reserved; /* the most held at once (as torch.cuda.max_memory_reserved) */
    uint64_t num_cuda_malloc;   /* cudaMalloc calls that succeeded */
    uint64_t num_cache_hits;    /* allocations served from the cache */
    size_t device_free;         /* cudaMemGetInfo: free and total bytes of the device */
    size_t device_total;
} moe_cuda_mem_stats;

moe_status moe_cuda_memory_stats(moe_ctx *ctx, int device, moe_cuda_mem_stats *out);
/* The device's one stream (a cudaStream_t) on which every op of the device is
 * queued, for libraries that must order their work after it (NCCL); NULL and
 * an error when the device has no CUDA state. */
void *moe_cuda_stream(moe_ctx *ctx, int device);
/* Starts peak_bytes_in_use and peak_bytes_reserved afresh from the bytes in use and reserved now. */
moe_status moe_cuda_reset_peak_memory(moe_ctx *ctx, int device);
/* Returns every cached block of the device to the driver. */
moe_status moe_cuda_empty_cache(moe_ctx *ctx, int device);
/* Opens (on != 0) or closes the profiled range (cudaProfilerStart / Stop), so
 * that a profiler started with "profile from start: off" (ncu
 * --profile-from-start off) sees only the work queued in between. */
moe_status moe_cuda_profiler_range(int on);

/* Times fn(arg) on the device's stream with CUDA events: `warmup` untimed
 * calls, then `iters` timed ones (one event pair each); *median_ms gets the
 * median. fn must queue its work through moe_op_* on that device (every op of
 * a device runs on its one stream) and return MOE_OK; its first error stops
 * the timing and is returned. */
moe_status moe_cuda_time_ms(moe_ctx *ctx, int device, moe_status (*fn)(void *arg), void *arg, int warmup, int iters,
                            double *median_ms);

/* How a device runs the grouped (expert) GEMMs, moe_op_gemm_grouped and
 * moe_op_gemm_grouped_wgrad:
 *   MOE_CUDA_GROUPED_BATCHED  one cublasGemmGroupedBatchedEx over all non-empty
 *                             experts per call;
 *   MOE_CUDA_GROUPED_LOOP     one cuBLAS GEMM per non-empty expert;
 *   MOE_CUDA_GROUPED_PADDED   rows copied into a zero-padded [E, max rows, cols]
 *                             buffer, one strided-batched GEMM, rows copied
 *                             back (at most 256 experts; else as batched);
 *   MOE_CUDA_GROUPED_KERNEL   bf16 calls through moelab's own grouped kernel
 *                             (src/ops/cuda/cuda_grouped_mma.cu: tensor cores,
 *                             one launch, no per-expert host work); other
 *                             calls, and those it cannot take, as batched;
 *   MOE_CUDA_GROUPED_AUTO     (the default) per call: the loop when the average
 *                             expert GEMM is large (>= 6 GFLOP, where cuBLAS's
 *                             single GEMMs ran at 510-770 TFLOP/s, the grouped
 *                             call at 250-330 and the own kernel at 380-430 on
 *                             an H100), else the own kernel for bf16 and
 *                             batched for f32 (small GEMMs, where the loop's
 *                             launches dominate; the kernel ran at 270-310
 *                             TFLOP/s there, the grouped call at 180-260).
 *                             bf16 calls under 100 GFLOP in all take the own
 *                             kernel whatever their experts: when routing
 *                             collapses onto a few experts the loop's GEMMs get
 *                             new row counts every step, and cuBLAS's ~130 us
 *                             of host time per new shape made whole steps
 *                             5-18 ms slower (the step model, H100).
 * Install sets every device from the environment variable MOELAB_GROUPED_GEMM
 * ("auto" or unset: auto; "batched"; "padded"; "kernel"; "loop"; another value fails
 * the install); MOELAB_GROUPED_WGRAD sets the weight-gradient calls apart.
 * The batched strategy still loops for a call whose operands or row pitches are
 * not 16-byte aligned, or whose type combination cuBLAS rejects. The setter is
 * for tests and benchmarks that compare the two in one process. */
typedef enum {
    MOE_CUDA_GROUPED_BATCHED = 0, MOE_CUDA_GROUPED_LOOP = 1, MOE_CUDA_GROUPED_AUTO = 2, MOE_CUDA_GROUPED_PADDED = 3,
    MOE_CUDA_GROUPED_KERNEL = 4
} moe_cuda_grouped_gemm;
moe_status moe_cuda_set_grouped_gemm(moe_ctx *ctx, int device, moe_cuda_grouped_gemm mode);
/* The weight gradients' strategy alone (MOELAB_GROUPED_WGRAD at install). */
moe_status moe_cuda_set_grouped_wgrad(moe_ctx *ctx, int device, moe_cuda_grouped_gemm mode);
/* How many streams (lanes, 1 to 4) the loop strategy spreads its per-expert
 * GEMMs over, for calls whose experts average under 64 GFLOP; install sets it
 * from MOELAB_GROUPED_LANES (default 2: the OLMoE layer's 9 grouped GEMMs took
 * 9.64 ms in one lane, 8.48 in two and 9.34 in four on an H100). The lanes
 * fork from the device's stream and join back before the call returns. */
moe_status moe_cuda_set_grouped_lanes(moe_ctx *ctx, int device, int lanes);
/* The device's strategy and how many grouped calls since install each path
 * served (batched: one cublasGemmGroupedBatchedEx; loop: one GEMM per expert).
 * NULL outputs are skipped. */
moe_status moe_cuda_grouped_gemm_info(moe_ctx *ctx, int device, moe_cuda_grouped_gemm *mode, uint64_t *batched_calls,
                                      uint64_t *loop_calls);
/* How many of the batched calls the own grouped kernels served (the TMA
 * kernel's calls included: moe_cuda_grouped_tma_calls counts those alone). */
moe_status moe_cuda_grouped_kernel_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* The TMA kernel (cuda_grouped_tma.cu) for bf16 gemm_grouped calls, their
 * pair form (either layout of b) and gemm_grouped_wgrad (not over gathered
 * rows): on = 1 tries it first for every call, 0 never, -1 (auto, the
 * default) under the call's auto strategy where one expert's weights (for the
 * weight gradient: one expert's c) take at most a quarter of the device's L2;
 * a weight gradient also needs c_g of at least 128 x 256 and a tile of
 * 128 x 256 for every SM. Install sets it from
 * MOELAB_GROUPED_TMA (0, 1 or auto). tma_calls: how many calls it served
 * since install. set_tma_cluster: CTAs a cluster, 2 (the default, sharing
 * the weight tile) or 1; install sets it from MOELAB_TMA_CLUSTER. */
moe_status moe_cuda_set_grouped_tma(moe_ctx *ctx, int device, int on);
moe_status moe_cuda_set_tma_cluster(moe_ctx *ctx, int device, int ctas);
/* The TMA kernel's SwiGLU epilogues (the activation after up's GEMM, its
 * backward after dh's, in the kernel's own epilogue warps): mask bit 1 the
 * forward's, 2 the backward's; install sets it from MOELAB_TMA_SWIGLU (0,
 * fwd, bwd, all; default fwd). tma_swiglu_calls: the launches with one. */
moe_status moe_cuda_set_tma_swiglu(moe_ctx *ctx, int device, int mask);
moe_status moe_cuda_tma_swiglu_calls(moe_ctx *ctx, int device, uint64_t *calls);
moe_status moe_cuda_grouped_tma_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* How many grouped calls read their row offsets on the device
 * (moe_op_gemm_grouped_dev and _wgrad_dev served by the TMA kernel, no copy back). */
moe_status moe_cuda_grouped_dev_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* Of the own kernel's calls with offsets on the device, those that took the
 * routing's plan tables (tensor.h grouped_plan) instead of planning. */
moe_status moe_cuda_grouped_plan_shared_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* How many weight-gradient calls of the own kernel cut a heavy expert's rows
 * into chunks summed by the tile's last block (split-K under skewed routing). */
moe_status moe_cuda_grouped_split_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* How many RMSNorm + rope calls (forward or backward) the fused kernels served
 * since install; the others ran the two ops. */
moe_status moe_cuda_norm_rope_fused_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* The tensor-core attention backward at D = 64 keeps its dS tiles (bf16) for
 * dQ instead of computing scores and dP again there, where they take at most
 * `bytes` (default 256 MB; 0: never) and the scratch can be had.
 * attention_ds_calls: the backward calls that kept them since install. */
moe_status moe_cuda_set_attention_ds_cap(moe_ctx *ctx, int device, size_t bytes);
moe_status moe_cuda_attention_ds_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* How many fused cross-entropy calls streamed their bf16 rows through the copy
 * engine (two rows in a block's shared memory, more rows than SMs) since
 * install; MOELAB_XENT_PIPE=0 at install turns that kernel off. */
moe_status moe_cuda_xent_pipe_calls(moe_ctx *ctx, int device, uint64_t *calls);
/* How many host->device copies went through the pinned staging slots (queued
 * without a synchronisation) since install; larger ones wait for their transfer. */
moe_status moe_cuda_staged_copies(moe_ctx *ctx, int device, uint64_t *copies);

/* ---- CUDA graphs (cuda_graph.cu) ----
 * A captured sequence of a device's work, replayed with one launch.
 * moe_cuda_graph_begin starts capturing the device's stream: the ops called
 * until moe_cuda_graph_end are recorded, not run, and every block they
 * allocate comes from a pool of the graph's own, never handed to work outside
 * it, so the addresses the graph holds stay valid for its life (tensors made
 * during the capture keep their memory; a replay rewrites it). Work a graph
 * cannot hold is refused with MOE_ERR_STATE while capturing: copies from or
 * to the host, reads, synchronisations, and garbage collection on running out
 * of memory. moe_cuda_graph_end closes the capture and instantiates the
 * graph; when the capture was broken (by a refused op or one the driver
 * would not record) it returns the error, and the graph can only be freed.
 * One capture at a time per device. moe_cuda_graph_free may be called at any
 * point (a capture in progress is abandoned); the pool goes back to the
 * driver once the tensors made during the capture are freed too. */
typedef struct moe_cuda_graph moe_cuda_graph;
moe_status moe_cuda_graph_begin(moe_ctx *ctx, int device, moe_cuda_graph **out);
moe_status moe_cuda_graph_end(moe_ctx *ctx, moe_cuda_graph *g);
/* Queues one replay on the device's stream (no wait). */
moe_status moe_cuda_graph_launch(moe_ctx *ctx, moe_cuda_graph *g);
void moe_cuda_graph_free(moe_cuda_graph *g);
/* nodes: the instantiated graph's kernels, copies and memsets; launches: replays so far */
moe_status moe_cuda_graph_info(const moe_cuda_graph *g, size_t *nodes, uint64_t *launches, size_t *pool_bytes);
/* Whether the device is capturing a graph now. */
int moe_cuda_capturing(moe_ctx *ctx, int device);

/* A pinned host mirror of one small contiguous device tensor (a graph's
 * output, e.g. the routing summaries): _start queues a copy of its current
 * values behind the work queued so far and returns at once; _finish waits for
 * that copy alone (not for work queued after it, such as the next replay) and
 * copies the values into dst, a contiguous cpu tensor of the same dtype and
 * size. A start while the last one is unfinished is an error. The mirror
 * holds a reference to the tensor. */
typedef struct moe_cuda_mirror moe_cuda_mirror;
moe_status moe_cuda_mirror_new(moe_ctx *ctx, moe_tensor *t, moe_cuda_mirror **out);
moe_status moe_cuda_mirror_start(moe_ctx *ctx, moe_cuda_mirror *m);
moe_status moe_cuda_mirror_finish(moe_ctx *ctx, moe_cuda_mirror *m, moe_tensor *dst);
void moe_cuda_mirror_free(moe_cuda_mirror *m);

#ifdef __cplusplus
}
#endif

#endif
