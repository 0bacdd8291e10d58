// The TMA grouped GEMM's second schedule, "ping-pong": c = alpha a op(b_g) +
// beta c over expert-grouped rows (the forward and the data gradients, the
// pair form included; not the weight gradient), as cuda_grouped_tma.cu's
// kernel computes it, with another division of the work.
//
// There, both consumer warpgroups multiply one 128 x 256 tile (64 rows each)
// and finish it together, so the tensor cores wait while both stage and store
// their outputs: at K 1024 (the OLMoE down projection) that kernel ran 9%
// below cuBLAS's per-expert GEMMs. Here each consumer warpgroup owns a whole
// 128 x 128 tile (two m64n128k16 wgmmas a k-step) and the two take the
// block's tiles in turns: warpgroup 0 the first, third, ...; warpgroup 1 the
// second, fourth, .... A warpgroup issues its tile's wgmmas only once the
// other has issued all of its own (the "turn" barriers), so one multiplies
// while the other stores, and the tensor cores see one stream of wgmmas.
//
// The producer (one thread of warpgroup 0) loads the block's tiles' k-steps
// in the order the turns consume them: STAGES stages of A (128 rows x 64 K)
// and B (128 rows x 64 K). Clusters of two share B by multicast as in the
// other kernel. A 128 x 128 tile reads more bytes per FLOP than 128 x 256
// (A 16 KB and B 8 KB a k-step a block, against 16 and 16 for twice the
// FLOPs), which is why this is a choice (MOELAB_TMA_PINGPONG), not a
// replacement.
//
// Outputs: a whole tile is staged (128-byte swizzled boxes of 64 x 64) and
// stored by the copy engine; a tile whose rows run past its expert's end is
// staged the same way and copied out in 16-byte pieces up to the last row
// (or, with beta != 0, stored from registers).
#include "cuda_common.cuh"
#include "cuda_tma_ptx.cuh"

namespace moe_tma {

namespace {

constexpr int BN = PP_BN, STAGES = PP_STAGES;
constexpr int A_BYTES = BM * BK * 2, B_BYTES = BN * BK * 2, STAGE_BYTES = A_BYTES + B_BYTES;
constexpr int C_BYTES = BM * BN * 2;   // a warpgroup's whole tile: four 64 x 64 boxes
static_assert(STAGES * STAGE_BYTES + 2 * C_BYTES + 1024 == PP_SMEM_BYTES, "PP_SMEM_BYTES is out of date");

// Stages a warpgroup's 128 x 128 values (v(i, j, h, q): row half i, columns
// 8 j + 2 (lane % 4) + {0, 1} of row 64 i + warp * 16 + lane / 4 + 8 h, to be
// stored at q) as boxes (i, j / 8) of 64 x 64, after the copies that read the
// staging before have done so.
template <typename F> __device__ __forceinline__ void stage_tile(unsigned char *cs, int tid, int cw, F v) {
    const int lane = tid & 31, warp = (tid >> 5) & 3;
    if ((tid & 127) == 0) asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
    wg_sync(1 + cw);
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int r = warp * 16 + (lane >> 2) + 8 * h;
#pragma unroll
            for (int j = 0; j < BN / 8; j++) {
                __nv_bfloat162 *q = reinterpret_cast<__nv_bfloat162 *>(cs + (2 * i + (j >> 3)) * 8192 + r * 128 +
                                                                       (((j & 7) ^ (r & 7)) << 4) + 4 * (lane & 3));
                *q = v(i, j, h, q);
            }
        }
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    wg_sync(1 + cw);
}

template <int CL, int MODE>
__global__ void __launch_bounds__(THREADS, 1) grouped_tma_pp_kernel(const __grid_constant__ tma_params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = smem_raw + ((1024 - (smem_u32(smem_raw) & 1023)) & 1023);
    // turn[w]: warpgroup w may issue its next tile's wgmmas (the other has issued its own)
    __shared__ __align__(8) uint64_t full[STAGES], empty[STAGES], cbar[2], turn[2];
    const int tid = threadIdx.x, wg = tid >> 7;
    unsigned rank;
    asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(rank));
    if (tid == 0) {
        for (int s = 0; s < STAGES; s++) {
            bar_init(&full[s], 1);
            // one warpgroup of each CTA reads a stage: its four warps in both CTAs free it
            bar_init(&empty[s], CL * 4);
        }
        bar_init(&cbar[0], 1);
        bar_init(&cbar[1], 1);
        bar_init(&turn[0], 128);
        bar_init(&turn[1], 128);
        asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
    }
    cluster_sync();
    const int nk1 = (p.K + BK - 1) / BK, nk = nk1 + (p.K2 + BK - 1) / BK;
    const int first = blockIdx.x / CL, step = gridDim.x / CL;
    if (wg == 0) {
        asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
        if (tid == 0) {
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.map_a)) : "memory");
            asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<uint64_t>(&p.map_b)) : "memory");
            unsigned it = 0;
            for (int t = first; t < p.items; t += step) {
                const tma_tile tt = tile_of<CL, MODE>(p, t, rank);
                const int arow = p.off[tt.g] + tt.m0;
                for (int kt = 0; kt < nk; kt++, it++) {
                    const int s = it % STAGES;
                    const bool second = kt >= nk1;
                    const CUtensorMap *ma = second ? &p.map_a2 : &p.map_a, *mb = second ? &p.map_b2 : &p.map_b;
                    const int k0 = (second ? kt - nk1 : kt) * BK;
                    bar_wait(&empty[s], ((it / STAGES) & 1) ^ 1);
                    unsigned char *st = smem + s * STAGE_BYTES;
                    bar_expect(&full[s], STAGE_BYTES);
                    tma_load(st, ma, k0, arow, &full[s]);
                    if (MODE == MODE_BT) {
                        // this CTA's half of the B tile (rows of b_g^T) goes to both CTAs
                        const int brow = tt.g * p.N + tt.nt * BN + rank * (BN / CL);
                        if (CL == 2) tma_load_both(st + A_BYTES + rank * (B_BYTES / 2), mb, k0, brow, &full[s]);
                        else tma_load(st + A_BYTES, mb, k0, brow, &full[s]);
                    } else {
                        // b [G, K, N]: this CTA's slabs of 64 columns x 64 K rows
#pragma unroll
                        for (int j = 0; j < 2 / CL; j++) {
                            const int slab = rank * (2 / CL) + j;
                            unsigned char *dst = st + A_BYTES + slab * (B_BYTES / 2);
                            if (CL == 2) tma_load3_both(dst, mb, tt.nt * BN + slab * 64, k0, tt.g, &full[s]);
                            else tma_load3(dst, mb, tt.nt * BN + slab * 64, k0, tt.g, &full[s]);
                        }
                    }
                }
            }
        }
    } else {
        asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
        const int cw = wg - 1, lane = tid & 31, warp = (tid >> 5) & 3;
        const bool lead = (tid & 127) == 0;
        unsigned cph = 0;
        float d[BN];   // rows 0-63 of the tile in d[0, 64), rows 64-127 in d[64, 128)
        unsigned char *cs = smem + STAGES * STAGE_BYTES + cw * C_BYTES;
        // the block's tiles j = cw, cw + 2, ...; n counts this warpgroup's
        for (int j = cw, n = 0;; j += 2, n++) {
            const int t = first + j * step;
            if (t >= p.items) break;
            const tma_tile tt = tile_of<CL, MODE>(p, t, rank);
            const int g = tt.g, rows = p.off[g + 1] - p.off[g];
            const int64_t base = (int64_t)p.off[g];
            const bool whole = tt.m0 + BM <= rows;
            const int nb = min(2, (p.N - tt.nt * BN + 63) / 64);   // boxes of 64 columns inside N
            const bool beta_c = p.beta != 0.0f && whole;
            auto load_c = [&]() {
                asm volatile("cp.async.bulk.wait_group.read 0;\n" ::: "memory");
                bar_expect(&cbar[cw], 2 * nb * 8192);
                for (int i = 0; i < 2; i++)
                    for (int b = 0; b < nb; b++)
                        tma_load(cs + (2 * i + b) * 8192, &p.map_c, tt.nt * BN + b * 64, (int)(base + tt.m0 + 64 * i),
                                 &cbar[cw]);
            };
            // warpgroup 0's first tile goes first; every other waits for the other's last
            if (j > 0) bar_wait(&turn[cw], cw == 0 ? (unsigned)((n - 1) & 1) : (unsigned)(n & 1));
#pragma unroll
            for (int i = 0; i < BN; i++) d[i] = 0.0f;
            unsigned it = (unsigned)j * (unsigned)nk;
            int prev = -1;
            for (int kt = 0; kt < nk; kt++, it++) {
                const int s = it % STAGES;
                bar_wait(&full[s], (it / STAGES) & 1);
                const unsigned char *sa = smem + s * STAGE_BYTES, *sb = sa + A_BYTES;
                asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
                for (int k = 0; k < BK / 16; k++) {
                    if (MODE == MODE_BT) {
                        wgmma_m64n128k16<0, 0>(d, desc_kmaj(sa + k * 32), desc_kmaj(sb + k * 32));
                        wgmma_m64n128k16<0, 0>(d + 64, desc_kmaj(sa + 8192 + k * 32), desc_kmaj(sb + k * 32));
                    } else {
                        wgmma_m64n128k16<0, 1>(d, desc_kmaj(sa + k * 32), desc_nmaj(sb + k * 2048));
                        wgmma_m64n128k16<0, 1>(d + 64, desc_kmaj(sa + 8192 + k * 32), desc_nmaj(sb + k * 2048));
                    }
                }
                asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
                if (kt == 0 && beta_c && lead) load_c();
                asm volatile("wgmma.wait_group.sync.aligned 1;\n" ::: "memory");
                if (prev >= 0 && lane < CL) bar_arrive_at(&empty[prev], lane);
                prev = s;
            }
            // every wgmma of this tile is issued: the other warpgroup's turn
            bar_arrive(&turn[cw ^ 1]);
            asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
            if (prev >= 0 && lane < CL) bar_arrive_at(&empty[prev], lane);
            if (beta_c) { bar_wait(&cbar[cw], cph); cph ^= 1; }
            if (whole || p.beta == 0.0f) {
                stage_tile(cs, tid, cw, [&](int i, int jj, int h, const __nv_bfloat162 *q) {
                    float x = p.alpha * d[64 * i + 4 * jj + 2 * h], y = p.alpha * d[64 * i + 4 * jj + 2 * h + 1];
                    if (beta_c) {
                        const float2 o = __bfloat1622float2(*q);
                        x += p.beta * o.x;
                        y += p.beta * o.y;
                    }
                    return __floats2bfloat162_rn(x, y);
                });
                if (whole) {
                    if (lead) {
                        for (int i = 0; i < 2; i++)
                            for (int b = 0; b < nb; b++)
                                tma_store(&p.map_c, cs + (2 * i + b) * 8192, tt.nt * BN + b * 64,
                                          (int)(base + tt.m0 + 64 * i));
                        asm volatile("cp.async.bulk.commit_group;\n" ::: "memory");
                    }
                    continue;
                }
                // rows past the group's end: the staged rows inside it copied out in 16-byte
                // pieces (16 a row; the staging is reused only after the next stage_tile's barrier)
                const int live = rows - tt.m0;
                for (int e = tid & 127; e < BM * 16; e += 128) {
                    const int row = e >> 4, pc = e & 15, col = tt.nt * BN + pc * 8;
                    if (row >= live || col >= p.N) continue;
                    const int r = row & 63;
                    const uint4 v = *reinterpret_cast<const uint4 *>(cs + (2 * (row >> 6) + (pc >> 3)) * 8192 + r * 128 +
                                                                     (((pc & 7) ^ (r & 7)) << 4));
                    *reinterpret_cast<uint4 *>(p.c + (base + tt.m0 + row) * p.N + col) = v;
                }
                continue;
            }
            // beta != 0 and rows past the group's end: from registers, row by row
#pragma unroll
            for (int i = 0; i < 2; i++)
#pragma unroll
                for (int h = 0; h < 2; h++) {
                    const int row = tt.m0 + 64 * i + warp * 16 + (lane >> 2) + 8 * h;
                    if (row >= rows) continue;
                    const int64_t o = (base + row) * p.N;
#pragma unroll
                    for (int jj = 0; jj < BN / 8; jj++) {
                        const int col = tt.nt * BN + 8 * jj + 2 * (lane & 3);
                        if (col >= p.N) continue;
                        __nv_bfloat162 *q = reinterpret_cast<__nv_bfloat162 *>(p.c + o + col);
                        const float2 old = __bfloat1622float2(*q);
                        *q = __floats2bfloat162_rn(p.alpha * d[64 * i + 4 * jj + 2 * h] + p.beta * old.x,
                                                   p.alpha * d[64 * i + 4 * jj + 2 * h + 1] + p.beta * old.y);
                    }
                }
        }
        if (lead) asm volatile("cp.async.bulk.wait_group 0;\n" ::: "memory");
    }
    __syncwarp();
    cluster_sync();
#endif
}

}  // namespace

tma_kernel_fn pp_kernel(int cl, int mode) {
    if (mode == MODE_BT) return cl == 2 ? grouped_tma_pp_kernel<2, MODE_BT> : grouped_tma_pp_kernel<1, MODE_BT>;
    if (mode == MODE_BN) return cl == 2 ? grouped_tma_pp_kernel<2, MODE_BN> : grouped_tma_pp_kernel<1, MODE_BN>;
    return nullptr;
}

}  // namespace moe_tma
