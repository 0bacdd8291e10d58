// Internal header of the CUDA backend: per-device state, error macros, dtype
// helpers and launch helpers shared by the src/ops/cuda/*.cu files.
//
// State layout (no globals): moe_cuda_backend_install creates one cuda_dev per
// visible GPU. The cuda_dev embeds the moe_allocator that the context stores in
// ctx->allocators[MOE_CUDA][i], with allocator.state pointing back at the
// cuda_dev, so an op reaches its stream and cuBLAS handle from the context and
// the tensor's device index, and a storage reaches it through storage->alloc.
#ifndef MOE_CUDA_COMMON_CUH
#define MOE_CUDA_COMMON_CUH

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cublas_v2.h>
#include <stdint.h>

#include <map>
#include <mutex>
#include <unordered_map>
#include <vector>

extern "C" {
#include "../../core/context.h"
#include "../../core/status.h"
#include "../../core/tensor.h"
#include "../backend.h"
}

constexpr int MOE_CUDA_MAX_LANES = 4, MOE_CUDA_DEFAULT_LANES = 2;

struct cuda_dev {
    moe_allocator alloc;          // handed to the context; alloc.state == this
    int index;                    // CUDA ordinal
    int sm_count;
    int l2_bytes;
    cudaStream_t stream;          // every kernel, copy and cuBLAS call of this device runs here
    cublasHandle_t blas;
    void *blas_ws;                // cuBLAS workspace set on the handle (see init_dev)
    moe_ctx *ctx;                 // for ctx->reclaim; NULL once uninstalled
    // allocator (guarded by mu)
    std::mutex mu;
    // blocks of up to 1 MiB and larger ones, each from its own pool (cuda_alloc.cu), made on
    // first use: the device's shared pair, and one private pair per CUDA graph (cuda_graph.cu)
    struct pools {
        struct moe_block_pool *small, *large;
        size_t live;       // blocks handed out and not yet freed
        bool retired;      // a graph's pair whose graph is gone: destroyed when live reaches 0
    };
    pools shared;
    pools *capture;       // while a graph is captured, every allocation comes from its pair
    std::vector<pools *> graph_pools;   // the graphs' pairs, counted in the memory statistics
    int n_graphs;         // graphs not yet freed: the device state outlives them (cuda_graph.cu)
    struct live_block { struct moe_pool_block *blk; bool small; pools *owner; };
    std::unordered_map<void *, live_block> live;   // address -> its block and pool
    size_t bytes_in_use, peak_in_use;   // cached bytes: cuda_alloc_cached_locked
    size_t peak_reserved;               // the most cuda_alloc_reserved_locked has been
    uint64_t n_malloc, n_hits;
    bool closing;                 // uninstalled: destroy when the last live block is freed
    // grouped (expert) GEMMs: strategy (a moe_cuda_grouped_gemm of moe_cuda.h, set at install
    // from MOELAB_GROUPED_GEMM) and how many calls each path served
    int grouped_gemm;
    int grouped_wgrad;            // the same for gemm_grouped_wgrad (MOELAB_GROUPED_WGRAD, default: grouped_gemm)
    uint64_t n_grouped_batched, n_grouped_loop;
    uint64_t n_grouped_kernel;    // of the batched calls, those the own kernel served
    // the loop strategy's lanes (cuda_gemm.cu): its per-expert GEMMs spread over
    // loop_lanes streams (MOELAB_GROUPED_LANES); lane 0 is `stream` with `blas`, each
    // other is made on first use with its own handle and workspace
    int loop_lanes;
    bool lanes_failed;            // a lane could not be made (memory short): no more tries
    cudaStream_t lane_stream[MOE_CUDA_MAX_LANES];
    cublasHandle_t lane_blas[MOE_CUDA_MAX_LANES];
    void *lane_ws[MOE_CUDA_MAX_LANES];
    cudaEvent_t lane_fork, lane_join[MOE_CUDA_MAX_LANES];
    uint64_t n_norm_rope_fused;   // RMSNorm + rope calls (either way) the fused kernels served
    // attention backward (cuda_attention_bwd.cu): the dS tiles kept for dQ up to
    // att_ds_cap bytes (moe_cuda_set_attention_ds_cap), and the calls that kept them
    size_t att_ds_cap;
    uint64_t n_att_ds;
    // the fused cross entropy (cuda_loss.cu) streaming bf16 rows through the copy
    // engine where they fit (xent_pipe, default on; MOELAB_XENT_PIPE=0 at install: off),
    // and the calls it served
    bool xent_pipe;
    uint64_t n_xent_pipe;
    // weight-gradient split-K (cuda_grouped_mma.cu): per-tile arrival counters, zero
    // between launches (the last block of a tile resets its own), allocated on first use
    int *split_counters;
    uint64_t n_grouped_split;     // weight-gradient calls that split a heavy expert's rows
    // the TMA kernel (cuda_grouped_tma.cu) for gemm_grouped, its pair form and the
    // weight gradient: grouped_tma 1 takes it for every bf16 call it fits, 0 never,
    // -1 (auto) under the call's auto strategy where an expert's weights take at most
    // a quarter of L2 (MOELAB_GROUPED_TMA); the driver's tensor-map encoder, looked up on first
    // use; tma_failed: no encoder, or the kernel's shared memory or clusters could
    // not be had (then never tried again)
    int grouped_tma;
    bool tma_failed;
    void *tma_encode;
    int tma_cluster;              // CTAs a cluster, 1 or 2 (MOELAB_TMA_CLUSTER; default 2: B multicast)
    int tma_clusters[3];          // [cluster size]: clusters that fit at once (0: not yet asked)
    // the SwiGLU around the TMA kernel's GEMMs in its own epilogue warps, where the
    // plain calls would take the TMA kernel: bit 1 the forward (gate's GEMM, then up's
    // with the activation), bit 2 the backward (dh's GEMM with the activation's
    // backward); the others run the elementwise kernels after the GEMMs.
    // MOELAB_TMA_SWIGLU: 0 (the default), fwd, bwd or all
    int tma_swiglu;
    uint64_t n_tma_swiglu;        // launches with a SwiGLU epilogue
    uint64_t n_grouped_tma;
    uint64_t n_grouped_dev;       // of those, calls that read their offsets on the device (gemm_grouped_dev)
    // the routing's plan tables of the offsets at plan_off (tensor.h grouped_plan), for
    // the own kernel's calls of one gemm_grouped_*_dev entry (cuda_gemm.cu plan_scope):
    // rows, and the tables' place in bytes past plan_off; NULL outside such a call
    const int64_t *plan_off;
    int64_t plan_rows, plan_at;
    uint64_t n_plan_shared;       // own-kernel calls that took the routing's tables (no plan kernel)
    // small host->device copies (cuda_copy.cu): pinned staging slots, each with the
    // event of the last transfer that read it; allocated on first use (stage_failed:
    // could not be, not tried again). stage_mu guards these and the reads' slots below.
    std::mutex stage_mu;
    bool stage_failed, reads_failed;
    unsigned char *stage;
    cudaEvent_t stage_done[8];
    int stage_next;
    uint64_t n_staged;            // copies that went through the slots (no synchronisation)
    // moe_op_read_start / finish (cuda_copy.cu): pinned slots of 8-byte values, the
    // event of each slot's copies, and a generation that tells a finished read's slot
    // from one reused since; allocated on first use
    unsigned char *reads;
    cudaEvent_t read_done[64];
    uint64_t read_gen[64];
    int read_next;
};

// ---- entry points of the individual files (C++ linkage, internal) ----
moe_allocator *cuda_alloc_create(int index, moe_ctx *ctx);   // NULL + error on failure
void cuda_alloc_release_cache(cuda_dev *d);
size_t cuda_alloc_cached_locked(const cuda_dev *d);            // the pools' free bytes; caller holds d->mu
size_t cuda_alloc_reserved_locked(const cuda_dev *d);          // the pools' segment bytes; caller holds d->mu
size_t cuda_pools_segment_bytes(const cuda_dev::pools &ps);   // a pair's segment bytes; caller holds d->mu
void cuda_alloc_reap_locked(cuda_dev *d);   // destroys retired graph pools with nothing live; caller holds d->mu
void cuda_dev_destroy(cuda_dev *d);                          // frees cache, stream, handle, d
void *cuda_scratch_alloc(cuda_dev *d, size_t nbytes);        // NULL + error on failure
// Scratch a caller can do without: a cached block or one cudaMalloc, else NULL (no
// garbage collection, no cache flush, no error); freed with cuda_scratch_free.
void *cuda_scratch_try_alloc(cuda_dev *d, size_t nbytes);
void cuda_scratch_free(cuda_dev *d, void *p, size_t nbytes);

moe_status cuda_synchronize(moe_ctx *, moe_device);
moe_status cuda_copy(moe_ctx *, moe_tensor *dst, const moe_tensor *src);
moe_status cuda_read_start(moe_ctx *, const moe_tensor *const *ts, int n, moe_read *r);
void cuda_pinned_slots_free(cuda_dev *d);   // the staging and read slots (cuda_copy.cu), after a stream sync
moe_status cuda_read_finish(moe_ctx *, moe_read *r);
moe_status cuda_fill(moe_ctx *, moe_tensor *t, double v);
moe_status cuda_fill_randn(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std);
moe_status cuda_fill_rand(moe_ctx *, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi);
moe_status cuda_gemm(moe_ctx *, int transa, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                     float beta, moe_tensor *c);
moe_status cuda_gemm_grouped(moe_ctx *, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                             float beta, moe_tensor *c, const int64_t *offsets, int groups);
moe_status cuda_gemm_grouped_wgrad(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b, float beta,
                                   moe_tensor *c, const int64_t *offsets, int groups);
// offsets on the device (ops.h gemm_grouped_dev and kin; backend.h): the TMA or
// the own kernel where the policy gives it the call, else *served = 0
moe_status cuda_gemm_grouped_dev(moe_ctx *, int transb, float alpha, const moe_tensor *a, const moe_tensor *b,
                                 const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                 const moe_tensor *offsets, int groups, int *served);
moe_status cuda_gemm_grouped_wgrad_dev(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b,
                                       const moe_tensor *b_rows, float beta, moe_tensor *c, const moe_tensor *offsets,
                                       int groups, int *served);
moe_status cuda_gemm_grouped_swiglu_dev(moe_ctx *, const moe_tensor *x, const moe_tensor *x_rows, const moe_tensor *wg,
                                        const moe_tensor *wu, moe_tensor *g, moe_tensor *u, moe_tensor *h,
                                        const moe_tensor *offsets, int groups, int *served);
moe_status cuda_gemm_grouped_swiglu_backward_w_dev(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                                   const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                                   moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                                   const moe_tensor *offsets, int groups, int *served);
moe_status cuda_gemm_grouped_pair(moe_ctx *, int transb, float alpha, const moe_tensor *a1, const moe_tensor *b1,
                                  const moe_tensor *a2, const moe_tensor *b2, float beta, moe_tensor *c,
                                  const int64_t *offsets, int groups);
moe_status cuda_gemm_grouped_swiglu_rows(moe_ctx *, const moe_tensor *x, const moe_tensor *rows, const moe_tensor *wg,
                                         const moe_tensor *wu, moe_tensor *g, moe_tensor *u, moe_tensor *h,
                                         const int64_t *offsets, int groups);
moe_status cuda_gemm_grouped_wgrad_rows(moe_ctx *, float alpha, const moe_tensor *a, const moe_tensor *b,
                                        const moe_tensor *b_rows, float beta, moe_tensor *c, const int64_t *offsets,
                                        int groups);
moe_status cuda_gemm_grouped_swiglu_backward_w(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                               const moe_tensor *g, const moe_tensor *u, const moe_tensor *rw,
                                               moe_tensor *dg, moe_tensor *du, moe_tensor *hw, moe_tensor *dw,
                                               const int64_t *offsets, int groups, int *served);
int cuda_gemm_grouped_rows_fuses(moe_ctx *, moe_device dev, moe_dtype dt, int64_t K, int64_t N, int64_t rows,
                                 const int64_t *offsets, int groups);
int cuda_gemm_grouped_swiglu_backward_w_fuses(moe_ctx *, moe_device dev, moe_dtype dt, int64_t K, int64_t de,
                                              int64_t rows, const int64_t *offsets, int groups);
moe_status cuda_gemm_grouped_swiglu(moe_ctx *, const moe_tensor *x, const moe_tensor *wg, const moe_tensor *wu,
                                    moe_tensor *g, moe_tensor *u, moe_tensor *h, const int64_t *offsets, int groups);
moe_status cuda_gemm_grouped_swiglu_backward(moe_ctx *, float alpha, const moe_tensor *dy, const moe_tensor *w,
                                             const moe_tensor *g, const moe_tensor *u, moe_tensor *dg, moe_tensor *du,
                                             moe_tensor *h, const int64_t *offsets, int groups);
// The grouped-GEMM strategy named by MOELAB_GROUPED_GEMM (unset, "batched": batched; "loop": loop);
// MOE_ERR_ARG for another value.
moe_status cuda_grouped_gemm_from_env(int *mode);
moe_status cuda_grouped_wgrad_from_env(int *mode);   // leaves *mode when MOELAB_GROUPED_WGRAD is unset
moe_status cuda_grouped_lanes_from_env(int *lanes);
// MOELAB_GROUPED_TMA (0, 1 or auto: *on 0, 1, -1) and MOELAB_TMA_CLUSTER (1 or 2); unset leaves them
moe_status cuda_grouped_tma_from_env(int *on, int *cluster);
moe_status cuda_tma_swiglu_from_env(int *mask);
void cuda_lanes_free(cuda_dev *d);   // the loop's side streams, handles, workspaces and events
// cuda_lanes.cu: fork *n lanes (1: none) off the device's stream for a loop over `busy`
// non-empty experts; lane i's cuBLAS handle; join them back (returns st unless the
// join fails)
moe_status cuda_lanes_fork(cuda_dev *d, int busy, double flops, int *n);
cublasHandle_t cuda_lane_blas(cuda_dev *d, int i);
moe_status cuda_lanes_join(cuda_dev *d, int n, moe_status st);
moe_status cuda_binary(moe_ctx *, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b);
moe_status cuda_unary(moe_ctx *, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha);
moe_status cuda_unary_backward(moe_ctx *, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                               const moe_tensor *x, float alpha);
moe_status cuda_axpy(moe_ctx *, moe_tensor *y, float alpha, const moe_tensor *x);
moe_status cuda_softmax(moe_ctx *, moe_tensor *y, const moe_tensor *x);
moe_status cuda_softmax_backward(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
moe_status cuda_log_softmax(moe_ctx *, moe_tensor *y, const moe_tensor *x);
moe_status cuda_log_softmax_backward(moe_ctx *, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y);
moe_status cuda_logsumexp(moe_ctx *, moe_tensor *out, const moe_tensor *x);
moe_status cuda_rmsnorm(moe_ctx *, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                        float eps);
moe_status cuda_rmsnorm_backward(moe_ctx *, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta);
moe_status cuda_swiglu(moe_ctx *, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up);
moe_status cuda_swiglu_backward_h(moe_ctx *, moe_tensor *dgate, moe_tensor *dup, moe_tensor *h, const moe_tensor *dout,
                                  const moe_tensor *gate, const moe_tensor *up);   // h (optional): silu(gate) * up too
moe_status cuda_swiglu_backward(moe_ctx *, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                const moe_tensor *gate, const moe_tensor *up);
// the weighted backward's row pass after the GEMM dh = dy W (ops.h
// gemm_grouped_swiglu_backward_w), for arguments that _fit (else an error)
bool cuda_swiglu_backward_w_rows_fit(const moe_tensor *dgate, const moe_tensor *dup, const moe_tensor *hw,
                                     const moe_tensor *dw, const moe_tensor *gate, const moe_tensor *up,
                                     const moe_tensor *rw);
moe_status cuda_swiglu_backward_w_rows(moe_ctx *, moe_tensor *dgate, moe_tensor *dup, moe_tensor *hw, moe_tensor *dw,
                                       const moe_tensor *dh, const moe_tensor *gate, const moe_tensor *up,
                                       const moe_tensor *rw);
moe_status cuda_cross_entropy(moe_ctx *, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                              const moe_tensor *targets, int64_t ignore_index);
moe_status cuda_cross_entropy_backward(moe_ctx *, moe_tensor *dlogits, const moe_tensor *logits,
                                       const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                       float scale);
moe_status cuda_cross_entropy_fused(moe_ctx *, moe_tensor *loss, moe_tensor *lse, moe_tensor *dlogits,
                                    const moe_tensor *logits, const moe_tensor *targets, int64_t ignore_index,
                                    float scale);
moe_status cuda_adamw(moe_ctx *, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                      const moe_adamw_cfg *cfg);
moe_status cuda_adamw_advance(moe_ctx *, moe_tensor *step_dev, const moe_adamw_cfg *cfg);
moe_status cuda_master_split(moe_ctx *, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src);
moe_status cuda_master_join(moe_ctx *, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo);
moe_status cuda_sumsq(moe_ctx *, moe_tensor *out, const moe_tensor *x);
// cuda_reduce.cu
moe_status cuda_reduce(moe_ctx *, moe_reduce_op op, moe_tensor *out, const moe_tensor *x, int64_t outer, int64_t n,
                       int64_t inner);
// cuda_topk.cu
moe_status cuda_topk(moe_ctx *, moe_tensor *values, moe_tensor *indices, const moe_tensor *x, int k);
// cuda_index.cu
moe_status cuda_gather(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
moe_status cuda_scatter_add(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
moe_status cuda_index_select(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *index);
moe_status cuda_index_add(moe_ctx *, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src);
// cuda_layernorm.cu
moe_status cuda_layernorm(moe_ctx *, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                          const moe_tensor *w, const moe_tensor *b, float eps);
moe_status cuda_layernorm_backward(moe_ctx *, moe_tensor *dx, moe_tensor *dw, moe_tensor *db, const moe_tensor *dy,
                                   const moe_tensor *x, const moe_tensor *w, const moe_tensor *mean,
                                   const moe_tensor *rstd);
// cuda_rope.cu
moe_status cuda_rope(moe_ctx *, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse);
// cuda_norm_rope.cu (x [B, T, heads * D])
moe_status cuda_rmsnorm_rope(moe_ctx *, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                             float eps, int64_t heads, int64_t pos_offset, float theta);
moe_status cuda_rmsnorm_rope_backward(moe_ctx *, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                      const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, int64_t heads,
                                      int64_t pos_offset, float theta, float beta);
// cuda_norm.cu: dw[j] += the nchunks rows of f32 partials part[c, j], in row order
moe_status cuda_rmsnorm_dw_sum(cuda_dev *d, moe_tensor *dw, const float *part, int64_t nchunks, int64_t n);
// cuda_attention_fwd.cu
moe_status cuda_attention(moe_ctx *, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                          const moe_tensor *v, float scale, int causal);
// cuda_attention_bwd.cu
moe_status cuda_attention_backward(moe_ctx *, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout,
                                   const moe_tensor *q, const moe_tensor *k, const moe_tensor *v,
                                   const moe_tensor *out, const moe_tensor *lse, float scale, int causal);

// cuda_moe.cu
moe_status cuda_gather_sum(moe_ctx *, moe_tensor *y, const moe_tensor *base, const moe_tensor *src, const moe_tensor *w,
                           const moe_tensor *slots);
moe_status cuda_combine_backward(moe_ctx *, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                 const moe_tensor *slots);
moe_status cuda_index_select_slots(moe_ctx *, moe_tensor *out, const moe_tensor *x, const moe_tensor *slots,
                                   int *served);
// cuda_ep.cu
moe_status cuda_ep_token_slots(moe_ctx *, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                               const moe_tensor *expert_idx, int64_t group_size);
moe_status cuda_slot_tokens(moe_ctx *, moe_tensor *token_idx, const moe_tensor *slots);
moe_status cuda_ep_pack(moe_ctx *, moe_tensor *packed, const moe_tensor *token_idx, const moe_tensor *expert_idx,
                        const moe_tensor *slots, const moe_tensor *tslots, int64_t group_size, int64_t width,
                        const int64_t *adjust);
moe_status cuda_ep_unpack(moe_ctx *, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                          const moe_tensor *perm);
moe_status cuda_ep_regroup(moe_ctx *, moe_tensor *perm, moe_tensor *inv, const int64_t *starts, int64_t blocks);

// ---- errors ----
#define CU_TRY(call, what)                                                                  \
    do {                                                                                    \
        cudaError_t e_ = (call);                                                            \
        if (e_ != cudaSuccess)                                                              \
            return moe_error(MOE_ERR_DEVICE, "cuda %s: %s", (what), cudaGetErrorString(e_)); \
    } while (0)
// After every kernel launch.
#define CU_LAUNCHED(what) CU_TRY(cudaGetLastError(), (what))

// The device state of `dev`, made current (cudaSetDevice). NULL + error if absent.
cuda_dev *cuda_dev_get(moe_ctx *ctx, moe_device dev);
#define CUDA_ENTER(d, ctx, device)                       \
    cuda_dev *d = cuda_dev_get((ctx), (device));         \
    if (!d) return moe_last_status() != MOE_OK ? moe_last_status() : MOE_ERR_DEVICE

// One of the device's counters into *out, for the moe_cuda_*_calls functions (fn: their name).
static inline moe_status cuda_read_counter(moe_ctx *ctx, int device, uint64_t *out, uint64_t cuda_dev::*field,
                                           const char *fn) {
    if (!ctx || !out) return moe_error(MOE_ERR_ARG, "%s: expected a context and an output", fn);
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    *out = d->*field;
    return MOE_OK;
}

// Work that waits for the device or moves host memory cannot be held by a CUDA
// graph (a replay would copy a stale slot, or the wait would break the
// capture): refused while one is captured, naming the op. (d->capture changes
// only on the capturing thread, between ops.)
#define CUDA_NOT_IN_CAPTURE(d, what)                                                                           \
    do {                                                                                                       \
        if ((d)->capture)                                                                                      \
            return moe_error(MOE_ERR_STATE,                                                                    \
                             "%s cannot be captured into a CUDA graph: it waits for the device or copies host " \
                             "memory (do it before or after the captured work)",                               \
                             (what));                                                                          \
    } while (0)

// Scratch device memory that returns to the cache when it goes out of scope.
// Stream-ordered reuse is safe: every user of the block runs on d->stream.
struct cuda_scratch {
    cuda_dev *d; void *p; size_t n;
    // n == 0 allocates nothing (p stays NULL).
    cuda_scratch(cuda_dev *d_, size_t n_) : d(d_), p(nullptr), n(n_) { if (n_) p = cuda_scratch_alloc(d_, n_); }
    ~cuda_scratch() { if (p) cuda_scratch_free(d, p, n); }
    cuda_scratch(const cuda_scratch &) = delete;
    cuda_scratch &operator=(const cuda_scratch &) = delete;
};

// ---- dtype helpers ----
typedef __nv_bfloat16 bf16;

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(bf16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { return __float2bfloat16_rn(x); }

// Ops on float data support f32 and bf16; this reports anything else.
static inline moe_status cuda_check_float(moe_dtype dt, const char *op) {
    if (dt == MOE_F32 || dt == MOE_BF16) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda supports f32 and bf16, got %s", op, moe_dtype_name(dt));
}

// ---- strided index decomposition ----
// A tensor's element layout with size-1 dims dropped and mergeable neighbours
// merged (dim k folds into k+1 when stride[k] == stride[k+1] * shape[k+1]).
// Merging never changes which offset the i-th element (row-major) has, so every
// operand of a call can be simplified on its own.
struct cuda_layout {
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    int64_t stride[MOE_MAX_DIMS];
};

static inline cuda_layout cuda_layout_of(int ndim, const int64_t *shape, const int64_t *stride) {
    cuda_layout l;
    l.ndim = 0;
    for (int k = 0; k < ndim; k++) {
        if (shape[k] == 1) continue;
        if (l.ndim > 0 && l.stride[l.ndim - 1] == stride[k] * shape[k]) {
            l.shape[l.ndim - 1] *= shape[k];
            l.stride[l.ndim - 1] = stride[k];
        } else {
            l.shape[l.ndim] = shape[k];
            l.stride[l.ndim] = stride[k];
            l.ndim++;
        }
    }
    for (int k = l.ndim; k < MOE_MAX_DIMS; k++) { l.shape[k] = 1; l.stride[k] = 0; }
    return l;
}
static inline cuda_layout cuda_layout_tensor(const moe_tensor *t) { return cuda_layout_of(t->ndim, t->shape, t->stride); }
static inline cuda_layout cuda_layout_flat(int64_t n) {
    int64_t one = 1;
    return cuda_layout_of(1, &n, &one);
}
// A layout is the identity map when it has at most one dim of stride 1.
static inline bool cuda_layout_is_flat(const cuda_layout &l) { return l.ndim == 0 || (l.ndim == 1 && l.stride[0] == 1); }

// Element offset of the i-th element (row-major order) of layout l.
__device__ __forceinline__ int64_t cuda_offset(const cuda_layout &l, int64_t i) {
    int64_t off = 0;
#pragma unroll
    for (int k = MOE_MAX_DIMS - 1; k >= 0; k--) {
        if (k < l.ndim) {
            int64_t s = l.shape[k], q = i / s;
            off += (i - q * s) * l.stride[k];
            i = q;
        }
    }
    return off;
}

// ---- launch helpers ----
static inline unsigned cuda_grid_1d(const cuda_dev *d, int64_t n, int threads) {
    int64_t blocks = (n + threads - 1) / threads;
    int64_t cap = (int64_t)d->sm_count * 32;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    return (unsigned)blocks;
}
#define GRID_STRIDE(i, n) \
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (int64_t)gridDim.x * blockDim.x)

// Rows and the last dim of a contiguous tensor (rows = leading dims flattened).
static inline int64_t cuda_last_dim(const moe_tensor *t) { return t->ndim ? t->shape[t->ndim - 1] : 1; }
static inline int64_t cuda_rows(const moe_tensor *t) {
    int64_t d = cuda_last_dim(t);
    return d ? moe_tensor_numel(t) / d : 0;
}

// Block-wide sum / max over blockDim.x threads (a multiple of 32, at most 1024).
// `sh` holds 32 floats; every thread gets the result.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
__device__ __forceinline__ float block_sum(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();                 // sh may still be read from a previous call
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) sh[w] = v;
    __syncthreads();
    v = lane < nw ? sh[lane] : -INFINITY;
    return warp_max(v);
}

// Blocks for the row-wise kernels (which loop over rows by gridDim.x).
static inline unsigned cuda_row_grid(int64_t rows) { return (unsigned)(rows < 2147483647 ? rows : 2147483647); }

// Threads per row for the row-wise kernels: enough to cover short rows, 256 for long.
static inline int cuda_row_threads(int64_t n) {
    if (n <= 32) return 32;
    if (n <= 64) return 64;
    if (n <= 128) return 128;
    return 256;
}

// ---- index checks (shared by the MoE and expert-parallel kernels) ----
// Untrusted indices (no index bound, tensor.h) cost one check kernel, one small
// copy back and a stream synchronisation.

template <typename I>
__global__ void cuda_k_check_index(const I *idx, int64_t cnt, int64_t lo, int64_t hi, unsigned long long *first_bad) {
    GRID_STRIDE(i, cnt) {
        int64_t v = (int64_t)idx[i];
        if (v < lo || v >= hi) atomicMin(first_bad, (unsigned long long)i);
    }
}

// MOE_ERR_RANGE (nothing written) when some index[0:cnt] is outside [lo, hi).
// row_len > 0 names the row and column of the bad position (slots [N, k]).
template <typename I>
inline moe_status cuda_check_index(cuda_dev *d, const char *op, const char *name, const moe_tensor *index,
                                   int64_t cnt, int64_t lo, int64_t hi, int64_t row_len) {
    if (cnt == 0 || moe_tensor_index_trusted(index, hi)) return MOE_OK;
    const I *idx = (const I *)moe_tensor_data((moe_tensor *)index);
    CUDA_NOT_IN_CAPTURE(d, "an index check (mark the index trusted: tensor.h's index bound)");
    cuda_scratch flag(d, sizeof(unsigned long long));
    if (!flag.p) return moe_last_status();
    unsigned long long *f = (unsigned long long *)flag.p;
    CU_TRY(cudaMemsetAsync(f, 0xff, sizeof *f, d->stream), op);
    cuda_k_check_index<I><<<cuda_grid_1d(d, cnt, 256), 256, 0, d->stream>>>(idx, cnt, lo, hi, f);
    CU_LAUNCHED(op);
    unsigned long long bad = 0;
    CU_TRY(cudaMemcpyAsync(&bad, f, sizeof bad, cudaMemcpyDeviceToHost, d->stream), op);
    CU_TRY(cudaStreamSynchronize(d->stream), op);
    if (bad == ~0ull) return MOE_OK;
    I v = 0;
    CU_TRY(cudaMemcpyAsync(&v, idx + bad, sizeof v, cudaMemcpyDeviceToHost, d->stream), op);
    CU_TRY(cudaStreamSynchronize(d->stream), op);
    if (row_len > 0)
        return moe_error(MOE_ERR_RANGE,
                         "%s: %s %lld at position %lld (token %lld, choice %lld) is out of range, expected [%lld, %lld)",
                         op, name, (long long)v, (long long)bad, (long long)(bad / (unsigned long long)row_len),
                         (long long)(bad % (unsigned long long)row_len), (long long)lo, (long long)hi);
    return moe_error(MOE_ERR_RANGE, "%s: %s %lld at position %lld is out of range, expected [%lld, %lld)", op, name,
                     (long long)v, (long long)bad, (long long)lo, (long long)hi);
}


#endif
