// The SwiGLU epilogues of the TMA grouped GEMM (cuda_grouped_tma.cu), run by
// warps 1-3 of the producer warpgroup, which otherwise idle while its first
// thread issues the copies. The consumer warpgroups stage their 64 x 256
// outputs in bf16 as for a plain store, then go on to the next tile's
// multiplications; these warps read the staged values, the tile's gate (and
// up) from memory, and write the SwiGLU's outputs. Done in the consumers'
// registers instead (the gate and up GEMMs side by side, tried before) the
// activation's exp and divide held both warpgroups' tensor cores idle.
//   fwd: the staged value is up: up and h = silu(gate) * up are written;
//   bwd: the staged value is dh (not written): dgate, dup and optionally h.
// The staged value is the plain GEMM's rounded output and the arithmetic is
// cuda_swiglu.cuh's, so the bytes are those of the GEMM followed by the
// elementwise SwiGLU kernels.
#ifndef MOE_CUDA_GROUPED_TMA_SWIGLU_CUH
#define MOE_CUDA_GROUPED_TMA_SWIGLU_CUH

#include "cuda_swiglu.cuh"

#include <cuda_bf16.h>
#include <stdint.h>

enum { EPI_STORE, EPI_SWIGLU, EPI_SWIGLU_BWD };

// The epilogue's tensors, all [rows, N] bf16, 16-byte aligned (N a multiple of 8)
struct tma_swiglu_args {
    const __nv_bfloat16 *gate, *up;   // up: the backward's only
    __nv_bfloat16 *o1, *o2, *o3;      // fwd: up, h; bwd: dgate, dup, h (o3 NULL: not written)
};

__device__ __forceinline__ float bf_lo(unsigned w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float bf_hi(unsigned w) { return __uint_as_float(w & 0xffff0000u); }
__device__ __forceinline__ unsigned bf_pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<unsigned *>(&h);
}

// Eight columns of one row: s the staged values, g (and u) the inputs; the
// outputs' words overwrite the inputs' (registers stay few).
template <int EPI>
__device__ __forceinline__ void swiglu_epi8(uint4 &s, uint4 &g, uint4 &u, bool want_h) {
    unsigned *sw = &s.x, *gw = &g.x, *uw = &u.x;
#pragma unroll
    for (int k = 0; k < 4; k++) {
        const float g0 = bf_lo(gw[k]), g1 = bf_hi(gw[k]);
        if (EPI == EPI_SWIGLU) {
            const float u0 = bf_lo(sw[k]), u1 = bf_hi(sw[k]);
            gw[k] = bf_pack(swiglu_1(g0, u0), swiglu_1(g1, u1));   // h
        } else {
            const float d0 = bf_lo(sw[k]), d1 = bf_hi(sw[k]), u0 = bf_lo(uw[k]), u1 = bf_hi(uw[k]);
            float dg0, du0, dg1, du1;
            if (want_h) sw[k] = bf_pack(swiglu_1(g0, u0), swiglu_1(g1, u1));   // h (dh is used up below)
            swiglu_bwd_1(d0, g0, u0, dg0, du0);
            swiglu_bwd_1(d1, g1, u1, dg1, du1);
            gw[k] = bf_pack(dg0, dg1);
            uw[k] = bf_pack(du0, du1);
        }
    }
}

// One consumer warpgroup's staged tile (cs: four 64 x 64 boxes, 128-byte
// swizzled as stage() writes them): rows [row0, row0 + nrows) of the
// outputs, columns [col0, col0 + ncols), by the 96 threads wt = 0..95. Eight
// threads take the eight 16-byte pieces of one row of a box: 128 contiguous
// bytes in memory, conflict-free in shared memory. Each thread has U pieces'
// gate (and up) loads in flight at once (the producer prefetched them into L2).
template <int EPI>
__device__ __forceinline__ void swiglu_epi_tile(const tma_swiglu_args &e, const unsigned char *cs, int64_t row0,
                                                int nrows, int col0, int ncols, int N, int wt) {
    constexpr int U = EPI == EPI_SWIGLU_BWD ? 3 : 4, PIECES = 64 * 32;
    for (int i0 = wt; i0 < PIECES; i0 += 96 * U) {
        uint4 g[U], u[U];
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int i = i0 + 96 * j, r = (i >> 3) & 63, col = (i >> 9) * 64 + (i & 7) * 8;
            g[j] = u[j] = make_uint4(0, 0, 0, 0);
            if (i >= PIECES || r >= nrows || col >= ncols) continue;
            const int64_t o = (row0 + r) * N + col0 + col;
            g[j] = __ldcs(reinterpret_cast<const uint4 *>(e.gate + o));
            if (EPI == EPI_SWIGLU_BWD) u[j] = __ldcs(reinterpret_cast<const uint4 *>(e.up + o));
        }
#pragma unroll
        for (int j = 0; j < U; j++) {
            const int i = i0 + 96 * j, b = i >> 9, r = (i >> 3) & 63, c = i & 7, col = b * 64 + c * 8;
            if (i >= PIECES || r >= nrows || col >= ncols) continue;
            uint4 s = *reinterpret_cast<const uint4 *>(cs + b * 8192 + r * 128 + ((c ^ (r & 7)) << 4));
            const int64_t o = (row0 + r) * N + col0 + col;
            if (EPI == EPI_SWIGLU) {
                __stcs(reinterpret_cast<uint4 *>(e.o1 + o), s);   // up, as the GEMM would store it
                swiglu_epi8<EPI>(s, g[j], u[j], true);
                __stcs(reinterpret_cast<uint4 *>(e.o2 + o), g[j]);
            } else {
                swiglu_epi8<EPI>(s, g[j], u[j], e.o3 != nullptr);
                __stcs(reinterpret_cast<uint4 *>(e.o1 + o), g[j]);
                __stcs(reinterpret_cast<uint4 *>(e.o2 + o), u[j]);
                if (e.o3) __stcs(reinterpret_cast<uint4 *>(e.o3 + o), s);
            }
        }
    }
}

#endif
