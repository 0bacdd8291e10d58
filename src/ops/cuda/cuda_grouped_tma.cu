// Grouped (expert) GEMMs in bf16 through the bulk tensor copy engine (TMA):
// c_g = alpha * a_g op(b_g) + beta * c_g, a the experts' rows [M, K] (K
// contiguous, grouped by row offsets), b [G, N, K] (op = transpose: the
// expert bank's forward) or [G, K, N] (its data gradients), and the pair
// form that sums a second (a2, b2) along K; and the weight gradient c_g =
// alpha * a_g^T b_g + beta * c_g (a [M, P], b [M, Q], c [G, P, Q]), whose
// K is the group's rows. cuda_grouped_mma.cu's kernel
// loads with cp.async from every thread and tops out near 380 TFLOP/s at
// 128 x 128 tiles, where its blocks read about 6 TB/s from L2; here a block
// computes 128 x 256 and shares its B tile with a second block.
//
// A block: warpgroup 0 produces (its first thread issues the copies; the
// others give their registers back through setmaxnreg), warpgroups 1 and 2
// consume, 64 x 256 each with wgmma m64n256k16. STAGES stages of A (128 rows
// x 64 K) and B (256 rows x 64 K), each with a "full" mbarrier (the copy's
// bytes arrived) and an "empty" one (every consumer warp of both blocks is
// done with it). A consumer keeps one stage's wgmmas in flight and frees the
// stage before them. Blocks run in clusters of two on a pair of M tiles of
// one expert and the same N tile: each loads its own A and half of B, which
// the copy engine writes into both blocks (multicast), so L2 serves a third
// fewer bytes per FLOP than unshared 128 x 256 tiles and half of 128 x 128's.
// The grid is as many clusters as fit at once; they walk the call's tiles in
// steps of the grid, so the producer loads the next tile while the consumers
// store this one. Outputs are staged in shared memory (128-byte swizzled,
// conflict-free) and written by the copy engine, which clips columns past N;
// a warpgroup whose rows run past its expert's stores directly. With beta !=
// 0 the copy engine brings the tile of c into the staging while the tile is
// multiplied (storing directly, every thread's loads of c wait in turn: it
// cost the OLMoE layer's accumulating weight gradients about 0.6 ms).
//
// The copies read whole boxes: A rows past a group's end come from the next
// group (their results are not stored) and past the tensor's end as zeros,
// and K past its end as zeros; transposed B rows past an expert's N belong to
// the next expert (those columns are not stored); untransposed B is read as a
// 3-D tensor (N, K, G), so K rows past an expert's are zeros, never the next
// expert's weights. The weight gradient reads both operands MN-major (boxes
// of 64 columns x 64 rows, K the rows); a group's last k-tile has the rows
// past its end zeroed in shared memory, and its groups run largest first.
//
// Tried and not kept: the SwiGLU forward in one launch (gate and up boxes side
// by side, the activation in the epilogue). At the OLMoE layer's experts on
// an H100 it took 2.31-2.42 ms against 2.04-2.09 for two launches and the
// SwiGLU kernel: the activation's exp and divide run while both warpgroups'
// tensor cores wait (1.94 ms without it). A "ping-pong" schedule (ea27eec:
// each consumer warpgroup its own 128 x 128 tile, the two in turns, so one
// stores while the other multiplies) ran 2-6% slower at the OLMoE shapes on
// an H200: its tiles read 1.5x the bytes from L2 a FLOP, and the epilogue it
// hides is about 3% of a tile at K 1024.
//
// The SwiGLU epilogues (cuda_grouped_tma_swiglu.cuh, EPI != EPI_STORE; off
// unless MOELAB_TMA_SWIGLU asks): the consumers stage their tile in bf16 and
// go on; warps 1-3 of the producer warpgroup read it with gate (and up) and
// write the SwiGLU's outputs. On an H100 at the OLMoE layer the forward's
// (up + activation) ran 0.1 ms faster than up's GEMM and the SwiGLU kernel,
// the backward's (dh + the activation's backward) about 0.4 ms slower than dh's
// GEMM and swiglu_backward: three warps' arithmetic does not keep up with a
// 128 x 256 tile of K 2048 there (bench/RESULTS.md, twenty-third pass).
#include "cuda_common.cuh"
#include "cuda_grouped_tma.h"
#include "cuda_grouped_tma_ptx.cuh"
#include "cuda_grouped_sched.cuh"
#include "cuda_grouped_tma_swiglu.cuh"
#include "cuda_mbarrier.cuh"

#include <cuda.h>
#include <cuda_bf16.h>

#include <stdint.h>
#include <string.h>

#include <algorithm>

namespace {

constexpr int BM = 128, BN = 256, BK = 64, STAGES = 3, THREADS = 384;
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
// a consumer warpgroup's 64 x 256 outputs staged for the copy engine: four
// 64 x 64 boxes, 128-byte swizzled
constexpr int C_BYTES = 64 * BN * 2;
constexpr int SMEM_BYTES = STAGES * STAGE_BYTES + 2 * C_BYTES + 1024;   // + room to align to 1024 B
constexpr int MAX_GROUPS = MOE_TMA_GROUPED_MAX_GROUPS;
constexpr int CONSUMER_WARPS = 8;
// what a launch computes: c = a b_g^T (b [G, N, K]), c = a b_g (b [G, K, N]),
// or the weight gradient c_g = a_g^T b_g (a [rows, P], b [rows, Q], c [G, P, Q])
enum { MODE_BT, MODE_BN, MODE_WG };

struct tma_params {
    // first: 64-byte aligned as the copies require; a2, b2: the second pair along
    // K (K2 > 0), its K tiles after the first pair's in the same accumulators.
    // The SwiGLU epilogues (K2 = 0) take a2 and b2 for the gate and up they read
    // (boxes of 128 rows, prefetched into L2 towards a tile's end).
    CUtensorMap map_a, map_b, map_a2, map_b2, map_c;
    __nv_bfloat16 *c;
    tma_swiglu_args epi;
    float alpha, beta;
    int N, K, K2, n_tiles, items, groups;
    int P, m_pairs;              // weight gradient: the rows of c_g (a's columns) and their pairs of M tiles
    // offsets on the device (the _dev entries; then off, pair0, order and items are
    // made by each block, see build_schedule) and the rows they end at; else NULL
    const int64_t *off_dev;
    int M;
    int off[MAX_GROUPS + 1];     // row offsets of the groups
    int pair0[MAX_GROUPS + 1];   // the first pair of M tiles of each group (prefix sums)
    short order[MAX_GROUPS];     // weight gradient: the groups by decreasing rows (the order their tiles run)
};
static_assert(sizeof(tma_params) < 4096, "TMA grouped GEMM parameters exceed the classic kernel parameter limit");
static_assert(alignof(tma_params) >= 64, "tensor maps must be 64-byte aligned");

// The tile of work item t for the CTA of cluster rank `rank`: its group, its
// first row (of a_g, or of c_g for the weight gradient) and its N tile. A
// cluster of two takes a pair of M tiles of one group and one N tile. Where a
// group has an odd count of M tiles its last pair is that one tile cut in two
// halves of 64 rows (`half`: only the first consumer warpgroup of each CTA
// multiplies), so neither CTA spends the pair's time on a tile past the group's
// rows. The weight gradient's groups all have the same tiles; they run largest first.
struct tma_tile { int g, m0, nt; bool half; };

// The call's schedule: the groups' row offsets, their first pairs of M tiles,
// the weight gradient's group order and the work items, from the launch's
// parameters (offsets on the host) or from shared memory, where every block
// builds them from offsets on the device (build_schedule).
struct sched_param {
    const tma_params &p;
    __device__ __forceinline__ int off(int g) const { return p.off[g]; }
    __device__ __forceinline__ int pair0(int g) const { return p.pair0[g]; }
    __device__ __forceinline__ int order(int i) const { return p.order[i]; }
    __device__ __forceinline__ int items() const { return p.items; }
};
struct sched_smem {
    const int *o, *p0;
    const short *ord;
    int n;
    __device__ __forceinline__ int off(int g) const { return o[g]; }
    __device__ __forceinline__ int pair0(int g) const { return p0[g]; }
    __device__ __forceinline__ int order(int i) const { return ord[i]; }
    __device__ __forceinline__ int items() const { return n; }
};

template <int CL, int MODE, typename SC>
__device__ __forceinline__ tma_tile tile_of(const tma_params &p, const SC &sc, int t, int rank) {
    if (MODE == MODE_WG) {
        const int per = p.m_pairs * p.n_tiles, r = t % per;
        return tma_tile{sc.order(t / per), ((r / p.n_tiles) * CL + rank) * BM, r % p.n_tiles, false};
    }
    const int mp = t / p.n_tiles;
    int lo = 0, hi = p.groups - 1;
    while (lo < hi) {   // the last group whose first pair is <= mp (empty groups share it with the next)
        int mid = (lo + hi + 1) >> 1;
        if (sc.pair0(mid) <= mp) lo = mid;
        else hi = mid - 1;
    }
    const int pr = mp - sc.pair0(lo);
    if (CL == 2) {
        const int tiles = (sc.off(lo + 1) - sc.off(lo) + BM - 1) / BM;
        if ((tiles & 1) && pr == tiles / 2) return tma_tile{lo, pr * 2 * BM + rank * 64, t % p.n_tiles, true};
    }
    return tma_tile{lo, (pr * CL + rank) * BM, t % p.n_tiles, false};
}

// k-tiles of a tile: over K (+ K2), or over its group's rows for the weight gradient
template <int MODE, typename SC> __device__ __forceinline__ int k_tiles(const tma_params &p, const SC &sc, int g) {
    if (MODE == MODE_WG) return (sc.off(g + 1) - sc.off(g) + BK - 1) / BK;
    return (p.K + BK - 1) / BK + (p.K2 + BK - 1) / BK;
}

// A block's schedule from offsets on the device, in shared memory
// (cuda_grouped_sched.cuh): the offsets made safe, each group's first pair of
// M tiles, the work items, and for the weight gradient the groups by
// decreasing rows. Every thread of the block calls it.
template <int CL, int MODE>
__device__ void build_schedule(const tma_params &p, int *off, int *pair0, short *order, int *items, int tid) {
    const int G = p.groups;
    if (tid < 32) {
        auto pairs = [&](int g) { return ((off[g + 1] - off[g] + BM - 1) / BM + CL - 1) / CL; };
        const int total = sched_offsets(p.off_dev, G, p.M, off, pair0, pairs, tid);
        if (tid == 0) *items = (MODE == MODE_WG ? G * p.m_pairs : total) * p.n_tiles;
    }
    __syncthreads();
    if (MODE == MODE_WG) {
        sched_order(off, G, order, tid, blockDim.x);
        __syncthreads();
    }
}

// The weight gradient's last k-tile of a group whose rows end inside it: the
// rows past the end (the next group's, or zeros past the tensor) are zeroed
// in both A boxes and every B slab, so nothing there (Inf or NaN included)
// reaches the sum. Each consumer warpgroup zeroes its own A box and two of the
// B slabs; both meet on one barrier before either multiplies.
__device__ __forceinline__ void zero_tail(unsigned char *st, int cw, int valid, int tid) {
    const int n = (BK - valid) * 8 * 3;   // 16-byte pieces: 8 a row, in one A box and two B slabs
    for (int i = tid & 127; i < n; i += 128) {
        const int box = i % 3, rest = i / 3, r = valid + (rest >> 3);
        unsigned char *q = (box == 0 ? st + cw * 8192 : st + A_BYTES + (2 * cw + box - 1) * 8192) + r * 128 +
                           (rest & 7) * 16;
        *reinterpret_cast<uint4 *>(q) = make_uint4(0, 0, 0, 0);
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    asm volatile("bar.sync 3, 256;\n" ::: "memory");   // both consumer warpgroups
}

// Stages a warpgroup's 64 x 256 values (v(j, h, q): columns 8 j + 2 (lane % 4) + {0, 1}
// of row warp * 16 + lane / 4 + 8 h, to be stored at q) as four 128-byte-swizzled
// 64 x 64 boxes, after the copies that read the staging before have done so.
template <typename F>
__device__ __forceinline__ void stage(unsigned char *cs, int tid, int cw, F v) {
    const int lane = tid & 31, warp = (tid >> 5) & 3;
    if ((tid & 127) == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    wg_sync(1 + cw);
#pragma unroll
    for (int h = 0; h < 2; h++) {
        const int r = warp * 16 + (lane >> 2) + 8 * h;
#pragma unroll
        for (int j = 0; j < BN / 8; j++) {
            __nv_bfloat162 *q = reinterpret_cast<__nv_bfloat162 *>(cs + (j >> 3) * 8192 + r * 128 +
                                                                   (((j & 7) ^ (r & 7)) << 4) + 4 * (lane & 3));
            *q = v(j, h, q);
        }
    }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    wg_sync(1 + cw);
}

// EPI: EPI_STORE writes c; the SwiGLU epilogues hand each consumer
// warpgroup's staged tile to warps 1-3 (cuda_grouped_tma_swiglu.cuh) over
// sfull (staged) and sfree (read, the staging may be written again).
template <int CL, int MODE, bool DEV, int EPI = EPI_STORE>
__global__ void __launch_bounds__(THREADS, 1) grouped_tma_kernel(const __grid_constant__ tma_params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES], cbar[2], sfull[2], sfree[2];
    const int tid = threadIdx.x, wg = tid >> 7;
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            bar_init(&full[s], 1);
            // a stage is refilled in both CTAs at once: every consumer warp of both must be done with it
            bar_init(&empty[s], CL * CONSUMER_WARPS);
        }
        bar_init(&cbar[0], 1);   // a consumer warpgroup's tile of c (beta != 0) arrived in its staging
        bar_init(&cbar[1], 1);
        for (int w = 0; w < 2; w++) {
            bar_init(&sfull[w], 1);   // the warpgroup's lead thread, once all 128 have staged
            bar_init(&sfree[w], 3);   // each epilogue warp, done reading
        }
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    cluster_sync();   // the peer's copies and releases find our barriers initialised
    // offsets on the device: the schedule in shared memory (sized 1 when unused)
    __shared__ int s_off[DEV ? MAX_GROUPS + 1 : 1], s_pair0[DEV ? MAX_GROUPS + 1 : 1], s_items;
    __shared__ short s_order[DEV ? MAX_GROUPS : 1];
    if constexpr (DEV) build_schedule<CL, MODE>(p, s_off, s_pair0, s_order, &s_items, tid);
    const auto sc = [&]() {
        if constexpr (DEV) return sched_smem{s_off, s_pair0, s_order, s_items};
        else return sched_param{p};
    }();
    const int nk1 = (p.K + BK - 1) / BK;
    const int first = blockIdx.x / CL, step = gridDim.x / CL;
    if (wg == 0) {
        // the SwiGLU epilogues' warps need registers for their arithmetic in flight
        asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(EPI == EPI_STORE ? 40 : 72));
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.map_a)) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.map_b)) : "memory");
            unsigned it = 0;
            for (int t = first; t < sc.items(); t += step) {
                const tma_tile tt = tile_of<CL, MODE>(p, sc, t, rank);
                const int nk = k_tiles<MODE>(p, sc, tt.g);
                const int arow = sc.off(tt.g) + tt.m0;
                for (int kt = 0; kt < nk; kt++, it++) {
                    const int s = it % STAGES;
                    if (EPI != EPI_STORE && kt == max(nk - 8, 0)) {
                        // the epilogue's gate (and up) into L2 about eight k-steps before they are read
                        for (int b = 0; b < 4 && tt.nt * BN + b * 64 < p.N; b++) {
                            tma_prefetch(&p.map_a2, tt.nt * BN + b * 64, arow);
                            if (EPI == EPI_SWIGLU_BWD) tma_prefetch(&p.map_b2, tt.nt * BN + b * 64, arow);
                        }
                    }
                    const bool second = MODE != MODE_WG && kt >= nk1;
                    const CUtensorMap *ma = second ? &p.map_a2 : &p.map_a, *mb = second ? &p.map_b2 : &p.map_b;
                    const int k0 = (second ? kt - nk1 : kt) * BK;
                    bar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
                    unsigned char *st = smem + s * STAGE_BYTES;
                    bar_expect(&full[s], STAGE_BYTES);
                    if (MODE == MODE_BT) {
                        // this CTA's half of the B tile goes to both CTAs
                        const int brow = tt.g * p.N + tt.nt * BN + rank * (BN / CL);
                        tma_load(st, ma, k0, arow, &full[s]);
                        if (CL == 2) tma_load_both(st + A_BYTES + rank * (B_BYTES / 2), mb, k0, brow, &full[s]);
                        else tma_load(st + A_BYTES, mb, k0, brow, &full[s]);
                        continue;
                    }
                    // A: the weight gradient's two boxes of 64 columns of a (M) x 64 rows (K)
                    const int krow = sc.off(tt.g) + k0;
                    if (MODE == MODE_WG) {
                        tma_load(st, ma, tt.m0, krow, &full[s]);
                        tma_load(st + A_BYTES / 2, ma, tt.m0 + 64, krow, &full[s]);
                    } else {
                        tma_load(st, ma, k0, arow, &full[s]);
                    }
                    // B: this CTA's slabs of 64 columns x 64 K rows (all four, or two of them for both CTAs)
#pragma unroll
                    for (int j = 0; j < 4 / CL; j++) {
                        const int slab = rank * (4 / CL) + j;
                        unsigned char *dst = st + A_BYTES + slab * (B_BYTES / 4);
                        const int n = tt.nt * BN + slab * 64;
                        if (MODE == MODE_WG) {
                            if (CL == 2) tma_load_both(dst, mb, n, krow, &full[s]);
                            else tma_load(dst, mb, n, krow, &full[s]);
                        } else {
                            if (CL == 2) tma_load3_both(dst, mb, n, k0, tt.g, &full[s]);
                            else tma_load3(dst, mb, n, k0, tt.g, &full[s]);
                        }
                    }
                }
            }
        } else if (EPI != EPI_STORE && tid >= 32) {
            // the epilogue: each consumer warpgroup's staged tiles, in the order they come
            unsigned used[2] = {0, 0};
            for (int t = first; t < sc.items(); t += step) {
                const tma_tile tt = tile_of<CL, MODE>(p, sc, t, rank);
                const int rows = sc.off(tt.g + 1) - sc.off(tt.g);
#pragma unroll
                for (int cw = 0; cw < 2; cw++) {
                    const int wrow = tt.m0 + cw * 64;
                    if ((tt.half && cw == 1) || wrow >= rows) continue;   // the consumers' idle warpgroups
                    bar_wait(&sfull[cw], used[cw] & 1);
                    swiglu_epi_tile<EPI>(p.epi, smem + STAGES * STAGE_BYTES + cw * C_BYTES, (int64_t)sc.off(tt.g) + wrow,
                                         min(64, rows - wrow), tt.nt * BN, min(BN, p.N - tt.nt * BN), p.N, tid - 32);
                    __syncwarp();
                    if ((tid & 31) == 0) bar_arrive(&sfree[cw]);
                    used[cw]++;
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(EPI == EPI_STORE ? 232 : 216));
        const int cw = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
        unsigned it = 0, cph = 0, staged = 0;
        float d[BN / 2];
        unsigned char *cs = smem + STAGES * STAGE_BYTES + cw * C_BYTES;
        const bool lead = (tid & 127) == 0;
        for (int t = first; t < sc.items(); t += step) {
            const tma_tile tt = tile_of<CL, MODE>(p, sc, t, rank);
            const int nk = k_tiles<MODE>(p, sc, tt.g);
            // The tile's rows are rows [m0, m0 + 128) of its group's in c: rows of c
            // from off[g] (a's groups), or from g * P (the weight gradient's c [G, P, Q])
            const int g = tt.g, rows = MODE == MODE_WG ? p.P : sc.off(g + 1) - sc.off(g);
            const int64_t base = MODE == MODE_WG ? (int64_t)g * p.P : (int64_t)sc.off(g);
            const int wrow = tt.m0 + cw * 64;   // the warpgroup's first row in its group
            const bool whole = wrow + 64 <= rows;
            // a warpgroup with no rows of its group to compute (past the group's end, or the
            // second half of a cut tile) multiplies nothing: it frees each stage as it comes,
            // and the other warpgroup has the tensor cores to itself. Not for the weight
            // gradient, whose last k-tile both warpgroups zero together.
            const bool idle = MODE != MODE_WG && ((tt.half && cw == 1) || wrow >= rows);
            // beta != 0: the warpgroup's 64 x 256 of c come into its staging by copy
            // while it multiplies (once the last tile's store has read the staging)
            auto load_c = [&]() {
                asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
                const int nb = min(4, (p.N - tt.nt * BN + 63) / 64);
                bar_expect(&cbar[cw], nb * 8192);
                for (int b = 0; b < nb; b++) tma_load(cs + b * 8192, &p.map_c, tt.nt * BN + b * 64, (int)(base + wrow), &cbar[cw]);
            };
            if (idle) {   // (apart from the multiplying loop: a branch in it serialises the wgmmas)
                for (int kt = 0; kt < nk; kt++, it++) {
                    const int s = it % STAGES;
                    bar_wait(&full[s], (it / STAGES) & 1);
                    if (lane < CL) bar_arrive_at(&empty[s], lane);
                }
                __syncwarp();   // converged for the next tile's aligned wgmma instructions
                continue;
            }
            const bool beta_c = p.beta != 0.0f && whole;
            if (beta_c && lead && nk == 0) load_c();
#pragma unroll
            for (int i = 0; i < BN / 2; i++) d[i] = 0.0f;
            int prev = -1;
            for (int kt = 0; kt < nk; kt++, it++) {
                const int s = it % STAGES;
                bar_wait(&full[s], (it / STAGES) & 1);
                unsigned char *st = smem + s * STAGE_BYTES;
                const unsigned char *sa = st + cw * (64 * 128), *sb = st + A_BYTES;
                if (MODE == MODE_WG) {
                    const int valid = sc.off(tt.g + 1) - sc.off(tt.g) - kt * BK;
                    if (valid < BK) zero_tail(st, cw, valid, tid);
                }
                asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
                for (int k = 0; k < BK / 16; k++) {
                    if (MODE == MODE_BT) wgmma_m64n256k16<0, 0>(d, desc_kmaj(sa + k * 32), desc_kmaj(sb + k * 32));
                    else if (MODE == MODE_BN) wgmma_m64n256k16<0, 1>(d, desc_kmaj(sa + k * 32), desc_nmaj(sb + k * 2048));
                    else wgmma_m64n256k16<1, 1>(d, desc_nmaj(sa + k * 2048), desc_nmaj(sb + k * 2048));
                }
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                if (kt == 0 && beta_c && lead) load_c();
                // the stage before this one is read once its wgmmas are done
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                if (prev >= 0 && lane < CL) bar_arrive_at(&empty[prev], lane);
                prev = s;
            }
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            if (prev >= 0 && lane < CL) bar_arrive_at(&empty[prev], lane);
            if (EPI != EPI_STORE) {
                // staged whole or not (the epilogue warps clip rows and columns), once they are
                // done with this staging's last tile; beta is 0
                bar_wait(&sfree[cw], (staged & 1) ^ 1);
                staged++;
                stage(cs, tid, cw, [&](int j, int h, const __nv_bfloat162 *) {
                    return __floats2bfloat162_rn(p.alpha * d[4 * j + 2 * h], p.alpha * d[4 * j + 2 * h + 1]);
                });
                if (lead) bar_arrive(&sfull[cw]);
                continue;
            }
            // store: thread (warp, lane) holds rows r and r + 8 of its warpgroup's 64,
            // columns 8 j + 2 (lane % 4) + {0, 1} for j = 0 .. 31
            if (whole) {
                // every row inside the group: staged (over c's values when beta != 0),
                // then one bulk copy a box (columns past N are clipped by the copy)
                if (beta_c) { bar_wait(&cbar[cw], cph); cph ^= 1; }
                stage(cs, tid, cw, [&](int j, int h, const __nv_bfloat162 *q) {
                    float x = p.alpha * d[4 * j + 2 * h], y = p.alpha * d[4 * j + 2 * h + 1];
                    if (beta_c) {
                        const float2 o = __bfloat1622float2(*q);
                        x += p.beta * o.x;
                        y += p.beta * o.y;
                    }
                    return __floats2bfloat162_rn(x, y);
                });
                if (lead) {
                    for (int b = 0; b < 4; b++)
                        if (tt.nt * BN + b * 64 < p.N) tma_store(&p.map_c, cs + b * 8192, tt.nt * BN + b * 64, (int)(base + wrow));
                    asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                }
                continue;
            }
            // rows past the group's end: stored directly, row by row
            const int r = wrow + warp * 16 + (lane >> 2);
#pragma unroll
            for (int h = 0; h < 2; h++) {
                const int row = r + 8 * h;
                if (row >= rows) continue;
                const int64_t o = (base + row) * p.N;
                const int c0 = tt.nt * BN + 2 * (lane & 3);
#pragma unroll
                for (int j = 0; j < BN / 8; j++) {
                    const int col = c0 + 8 * j;
                    if (col >= p.N) continue;
                    float x = p.alpha * d[4 * j + 2 * h], y = p.alpha * d[4 * j + 2 * h + 1];
                    __nv_bfloat162 *q = reinterpret_cast<__nv_bfloat162 *>(p.c + o + col);
                    if (p.beta != 0.0f) {
                        const __nv_bfloat162 v = *q;
                        x += p.beta * __bfloat162float(v.x);
                        y += p.beta * __bfloat162float(v.y);
                    }
                    *q = __floats2bfloat162_rn(x, y);
                }
            }
        }
        // the last copies are done before the block (and its shared memory) goes
        if ((tid & 127) == 0) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
    // neither CTA leaves while the other may still copy into it or release its stages
    __syncwarp();
    cluster_sync();
#endif
}

typedef CUresult (*encode_fn)(CUtensorMap *, CUtensorMapDataType, cuuint32_t, void *, const cuuint64_t *,
                              const cuuint64_t *, const cuuint32_t *, const cuuint32_t *, CUtensorMapInterleave,
                              CUtensorMapSwizzle, CUtensorMapL2promotion, CUtensorMapFloatOOBfill);

// a row-major bf16 matrix [rows, cols] read in boxes of box_rows x 64 columns, 128-byte swizzled
bool make_map(encode_fn enc, CUtensorMap *m, const void *base, int64_t rows, int64_t cols, int box_rows) {
    cuuint64_t dims[2] = {(cuuint64_t)cols, (cuuint64_t)rows};
    cuuint64_t strides[1] = {(cuuint64_t)cols * 2};
    cuuint32_t box[2] = {(cuuint32_t)BK, (cuuint32_t)box_rows}, estr[2] = {1, 1};
    return enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, const_cast<void *>(base), dims, strides, box, estr,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// b [G, K, N] as a 3-D tensor (N, K, G) read in boxes of 64 columns x 64 K rows of one expert
bool make_map_kn(encode_fn enc, CUtensorMap *m, const void *base, int groups, int64_t K, int64_t N) {
    cuuint64_t dims[3] = {(cuuint64_t)N, (cuuint64_t)K, (cuuint64_t)groups};
    cuuint64_t strides[2] = {(cuuint64_t)N * 2, (cuuint64_t)K * N * 2};
    cuuint32_t box[3] = {64, (cuuint32_t)BK, 1}, estr[3] = {1, 1, 1};
    return enc(m, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 3, const_cast<void *>(base), dims, strides, box, estr,
               CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
               CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

encode_fn tma_encoder(cuda_dev *d) {
    if (d->tma_failed) return nullptr;
    if (!d->tma_encode) {
        cudaDriverEntryPointQueryResult q;
        void *fn = nullptr;
        if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &q) != cudaSuccess ||
            q != cudaDriverEntryPointSuccess || !fn) {
            (void)cudaGetLastError();
            d->tma_failed = true;
        }
        d->tma_encode = fn;
    }
    return (encode_fn)d->tma_encode;
}

bool offsets_fit(const int64_t *offsets, int groups) {
    return groups >= 1 && groups <= MAX_GROUPS && offsets[0] == 0 && offsets[groups] < (int64_t)INT32_MAX - BM;
}

// The work items of p (its maps, outputs and extents set), then the launch:
// one cluster of CL CTAs per item at a time, as many clusters as fit. With
// offsets on the host they go in the parameters; with off_dev (M rows in
// all) each block reads them itself, and the grid is sized for the most items
// M rows can make.
moe_status tma_launch(cuda_dev *d, tma_params &p, const int64_t *offsets, const int64_t *off_dev, int64_t M, int groups,
                      int mode, int epi, const char *what, bool *ran) {
    const int CLN = d->tma_cluster == 1 ? 1 : 2;
    p.groups = groups;
    p.n_tiles = (p.N + BN - 1) / BN;
    int64_t bands = 0;   // pairs of M tiles (with off_dev: at most)
    if (mode == MODE_WG) {
        // every group has the same tiles, whatever its rows
        p.m_pairs = ((p.P + BM - 1) / BM + CLN - 1) / CLN;
        bands = (int64_t)groups * p.m_pairs;
    }
    if (off_dev) {
        p.off_dev = off_dev;
        p.M = (int)M;
        // a group's pairs are at most its tiles, its tiles at most rows / BM + 1
        if (mode != MODE_WG) bands = (M + BM - 1) / BM + 2 * (int64_t)groups;
    } else {
        for (int g = 0; g <= groups; g++) p.off[g] = (int)offsets[g];
        if (mode != MODE_WG) {
            for (int g = 0; g <= groups; g++) {
                p.pair0[g] = (int)bands;
                if (g < groups) bands += ((offsets[g + 1] - offsets[g] + BM - 1) / BM + CLN - 1) / CLN;
            }
        } else {
            // the groups with the most rows run first
            for (int g = 0; g < groups; g++) p.order[g] = (short)g;
            std::stable_sort(p.order, p.order + groups, [&](short x, short y) {
                return offsets[x + 1] - offsets[x] > offsets[y + 1] - offsets[y];
            });
        }
    }
    const int64_t items = bands * p.n_tiles;
    if (items > INT32_MAX / 2) return MOE_OK;
    p.items = (int)items;
    void (*kern)(tma_params) =
        off_dev ? (mode == MODE_BT ? (CLN == 2 ? grouped_tma_kernel<2, MODE_BT, true> : grouped_tma_kernel<1, MODE_BT, true>)
                   : mode == MODE_BN ? (CLN == 2 ? grouped_tma_kernel<2, MODE_BN, true> : grouped_tma_kernel<1, MODE_BN, true>)
                                     : (CLN == 2 ? grouped_tma_kernel<2, MODE_WG, true> : grouped_tma_kernel<1, MODE_WG, true>))
        : mode == MODE_BT ? (CLN == 2 ? grouped_tma_kernel<2, MODE_BT, false> : grouped_tma_kernel<1, MODE_BT, false>)
        : mode == MODE_BN ? (CLN == 2 ? grouped_tma_kernel<2, MODE_BN, false> : grouped_tma_kernel<1, MODE_BN, false>)
                          : (CLN == 2 ? grouped_tma_kernel<2, MODE_WG, false> : grouped_tma_kernel<1, MODE_WG, false>);
    if (epi == EPI_SWIGLU)   // (host offsets, the forward's layout)
        kern = CLN == 2 ? grouped_tma_kernel<2, MODE_BT, false, EPI_SWIGLU> : grouped_tma_kernel<1, MODE_BT, false, EPI_SWIGLU>;
    else if (epi == EPI_SWIGLU_BWD)   // (host offsets, the data gradient's layout)
        kern = CLN == 2 ? grouped_tma_kernel<2, MODE_BN, false, EPI_SWIGLU_BWD>
                        : grouped_tma_kernel<1, MODE_BN, false, EPI_SWIGLU_BWD>;
    cudaLaunchConfig_t cfg = {};
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = CLN; attr[0].val.clusterDim.y = 1; attr[0].val.clusterDim.z = 1;
    cfg.blockDim = dim3(THREADS, 1, 1);
    cfg.dynamicSmemBytes = SMEM_BYTES;
    cfg.stream = d->stream;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    if (d->tma_clusters[CLN] == 0) {
        // how many clusters fit at once (not every SM need take one); the same for every
        // instantiation of a cluster size. Where the shared memory or the clusters cannot
        // be had (a shared or partitioned GPU), the calls take the other paths from then on.
        cfg.gridDim = dim3(CLN * (unsigned)d->sm_count, 1, 1);
        int n = 0;
        const auto all = {grouped_tma_kernel<1, MODE_BT, false>, grouped_tma_kernel<1, MODE_BN, false>,
                          grouped_tma_kernel<1, MODE_WG, false>, grouped_tma_kernel<2, MODE_BT, false>,
                          grouped_tma_kernel<2, MODE_BN, false>, grouped_tma_kernel<2, MODE_WG, false>,
                          grouped_tma_kernel<1, MODE_BT, true>,  grouped_tma_kernel<1, MODE_BN, true>,
                          grouped_tma_kernel<1, MODE_WG, true>,  grouped_tma_kernel<2, MODE_BT, true>,
                          grouped_tma_kernel<2, MODE_BN, true>,  grouped_tma_kernel<2, MODE_WG, true>,
                          grouped_tma_kernel<1, MODE_BT, false, EPI_SWIGLU>, grouped_tma_kernel<2, MODE_BT, false, EPI_SWIGLU>,
                          grouped_tma_kernel<1, MODE_BN, false, EPI_SWIGLU_BWD>,
                          grouped_tma_kernel<2, MODE_BN, false, EPI_SWIGLU_BWD>};
        bool ok = true;
        for (auto k : all) ok = ok && cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) == cudaSuccess;
        if (!ok || cudaOccupancyMaxActiveClusters(&n, kern, &cfg) != cudaSuccess || n < 1) {
            (void)cudaGetLastError();
            d->tma_failed = true;
            return MOE_OK;
        }
        d->tma_clusters[CLN] = n;
    }
    *ran = true;
    if (items == 0) return MOE_OK;
    const int64_t clusters = items < d->tma_clusters[CLN] ? items : d->tma_clusters[CLN];
    cfg.gridDim = dim3((unsigned)(CLN * clusters), 1, 1);
    CU_TRY(cudaLaunchKernelEx(&cfg, kern, p), what);
    CU_LAUNCHED(what);
    return MOE_OK;
}

// offsets on the host (checked), or on the device (off_dev: 8-byte aligned; M rows)
bool groups_fit(const int64_t *offsets, const int64_t *off_dev, int groups, int64_t M) {
    if (offsets) return offsets_fit(offsets, groups);
    return off_dev && ((uintptr_t)off_dev & 7) == 0 && groups >= 1 && groups <= MAX_GROUPS && M >= 0 &&
           M < (int64_t)INT32_MAX - BM;
}

bool al16(const void *q) { return ((uintptr_t)q & 15) == 0; }

}  // namespace

namespace {

moe_status pair_call(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2, const void *b2,
                     int64_t K2, float beta, void *c, const int64_t *offsets, const int64_t *off_dev, int groups,
                     int64_t M, int64_t K, int64_t N, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || K <= 0 || N <= 0 || K % 8 || N % 8 || K > INT32_MAX ||
        (int64_t)groups * N + BN > INT32_MAX || !al16(a) || !al16(b) || !al16(c))
        return MOE_OK;
    if (K2 < 0 || K2 % 8 || K2 > INT32_MAX || (K2 > 0 && (!a2 || !b2 || !al16(a2) || !al16(b2)))) return MOE_OK;
    encode_fn enc = tma_encoder(d);
    if (!enc) return MOE_OK;
    const int64_t rows = offsets ? offsets[groups] : M;
    if (rows == 0) { *ran = true; return MOE_OK; }
    tma_params p;
    memset(&p, 0, sizeof p);
    const int CLN = d->tma_cluster == 1 ? 1 : 2;
    if (!make_map(enc, &p.map_a, a, rows, K, BM) ||
        !(transb ? make_map(enc, &p.map_b, b, (int64_t)groups * N, K, BN / CLN) : make_map_kn(enc, &p.map_b, b, groups, K, N)) ||
        !make_map(enc, &p.map_c, c, rows, N, 64))
        return MOE_OK;
    if (K2 > 0 && (!make_map(enc, &p.map_a2, a2, rows, K2, BM) ||
                   !(transb ? make_map(enc, &p.map_b2, b2, (int64_t)groups * N, K2, BN / CLN)
                            : make_map_kn(enc, &p.map_b2, b2, groups, K2, N))))
        return MOE_OK;
    p.c = (__nv_bfloat16 *)c;
    p.alpha = alpha; p.beta = beta;
    p.N = (int)N; p.K = (int)K; p.K2 = (int)K2;
    return tma_launch(d, p, offsets, off_dev, rows, groups, transb ? MODE_BT : MODE_BN, EPI_STORE,
                      "gemm_grouped (TMA kernel)", ran);
}

moe_status wgrad_call(cuda_dev *d, float alpha, const void *a, const void *b, float beta, void *c, const int64_t *offsets,
                      const int64_t *off_dev, int groups, int64_t M, int64_t P, int64_t Q, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || P <= 0 || Q <= 0 || P % 8 || Q % 8 || P > INT32_MAX ||
        Q > INT32_MAX || (int64_t)groups * P + BM > INT32_MAX || !al16(a) || !al16(b) || !al16(c))
        return MOE_OK;
    encode_fn enc = tma_encoder(d);
    if (!enc) return MOE_OK;
    tma_params p;
    memset(&p, 0, sizeof p);
    // a and b in boxes of 64 of their columns x 64 rows. Groups with no rows
    // still have their tiles (c_g = beta c_g) and read nothing: with no rows at
    // all, a and b (perhaps no memory) are stood in for by one row of c.
    const int64_t total = offsets ? offsets[groups] : M;
    const bool none = total == 0;
    const int64_t rows = none ? 1 : total;
    if (!make_map(enc, &p.map_a, none ? c : a, rows, P, 64) || !make_map(enc, &p.map_b, none ? c : b, rows, Q, 64) ||
        !make_map(enc, &p.map_c, c, (int64_t)groups * P, Q, 64))
        return MOE_OK;
    p.c = (__nv_bfloat16 *)c;
    p.alpha = alpha; p.beta = beta;
    p.N = (int)Q; p.P = (int)P;
    return tma_launch(d, p, offsets, off_dev, total, groups, MODE_WG, EPI_STORE, "gemm_grouped_wgrad (TMA kernel)", ran);
}

// The SwiGLU epilogues: fwd (transb), up = a b_g^T with h = silu(gate) * up;
// bwd, dh = a b_g (b [G, K, N]) giving dgate, dup and h (o3, may be NULL)
moe_status swiglu_call(cuda_dev *d, int epi, float alpha, const void *a, const void *b, const tma_swiglu_args &e,
                       const int64_t *offsets, int groups, int64_t K, int64_t N, bool *ran) {
    *ran = false;
    const bool bwd = epi == EPI_SWIGLU_BWD;
    if (!offsets_fit(offsets, groups) || K <= 0 || N <= 0 || K % 8 || N % 8 || K > INT32_MAX ||
        (int64_t)groups * N + BN > INT32_MAX || !al16(a) || !al16(b) || !al16(e.gate) || !al16(e.o1) || !al16(e.o2) ||
        (bwd && (!al16(e.up) || (e.o3 && !al16(e.o3)))))
        return MOE_OK;
    encode_fn enc = tma_encoder(d);
    if (!enc) return MOE_OK;
    const int64_t rows = offsets[groups];
    if (rows == 0) { *ran = true; return MOE_OK; }
    tma_params p;
    memset(&p, 0, sizeof p);
    const int CLN = d->tma_cluster == 1 ? 1 : 2;
    if (!make_map(enc, &p.map_a, a, rows, K, BM) ||
        !(bwd ? make_map_kn(enc, &p.map_b, b, groups, K, N) : make_map(enc, &p.map_b, b, (int64_t)groups * N, K, BN / CLN)) ||
        !make_map(enc, &p.map_a2, e.gate, rows, N, BM) || (bwd && !make_map(enc, &p.map_b2, e.up, rows, N, BM)))
        return MOE_OK;
    p.epi = e;
    p.c = e.o1;
    p.alpha = alpha;
    p.N = (int)N; p.K = (int)K;
    return tma_launch(d, p, offsets, nullptr, rows, groups, bwd ? MODE_BN : MODE_BT, epi,
                      bwd ? "gemm_grouped_swiglu_backward (TMA kernel)" : "gemm_grouped_swiglu (TMA kernel)", ran);
}

}  // namespace

moe_status cuda_tma_grouped_swiglu(cuda_dev *d, const void *x, const void *wu, const void *g, void *u, void *h,
                                   const int64_t *offsets, int groups, int64_t K, int64_t N, bool *ran) {
    tma_swiglu_args e = {(const __nv_bfloat16 *)g, nullptr, (__nv_bfloat16 *)u, (__nv_bfloat16 *)h, nullptr};
    return swiglu_call(d, EPI_SWIGLU, 1.0f, x, wu, e, offsets, groups, K, N, ran);
}

moe_status cuda_tma_grouped_swiglu_bwd(cuda_dev *d, float alpha, const void *dy, const void *wd, const void *g,
                                       const void *u, void *dg, void *du, void *h, const int64_t *offsets, int groups,
                                       int64_t K, int64_t N, bool *ran) {
    tma_swiglu_args e = {(const __nv_bfloat16 *)g, (const __nv_bfloat16 *)u, (__nv_bfloat16 *)dg, (__nv_bfloat16 *)du,
                         (__nv_bfloat16 *)h};
    return swiglu_call(d, EPI_SWIGLU_BWD, alpha, dy, wd, e, offsets, groups, K, N, ran);
}

moe_status cuda_tma_grouped(cuda_dev *d, int transb, float alpha, const void *a, const void *b, float beta, void *c,
                            const int64_t *offsets, int groups, int64_t K, int64_t N, bool *ran) {
    return pair_call(d, transb, alpha, a, b, nullptr, nullptr, 0, beta, c, offsets, nullptr, groups, 0, K, N, ran);
}

moe_status cuda_tma_grouped_pair(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                 const void *b2, int64_t K2, float beta, void *c, const int64_t *offsets, int groups,
                                 int64_t K, int64_t N, bool *ran) {
    return pair_call(d, transb, alpha, a, b, a2, b2, K2, beta, c, offsets, nullptr, groups, 0, K, N, ran);
}

moe_status cuda_tma_grouped_dev(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                const void *b2, int64_t K2, float beta, void *c, const int64_t *off_dev, int groups,
                                int64_t M, int64_t K, int64_t N, bool *ran) {
    return pair_call(d, transb, alpha, a, b, a2, b2, K2, beta, c, nullptr, off_dev, groups, M, K, N, ran);
}

moe_status cuda_tma_grouped_wgrad(cuda_dev *d, float alpha, const void *a, const void *b, float beta, void *c,
                                  const int64_t *offsets, int groups, int64_t P, int64_t Q, bool *ran) {
    return wgrad_call(d, alpha, a, b, beta, c, offsets, nullptr, groups, 0, P, Q, ran);
}

moe_status cuda_tma_grouped_wgrad_dev(cuda_dev *d, float alpha, const void *a, const void *b, float beta, void *c,
                                      const int64_t *off_dev, int groups, int64_t M, int64_t P, int64_t Q, bool *ran) {
    return wgrad_call(d, alpha, a, b, beta, c, nullptr, off_dev, groups, M, P, Q, ran);
}
