// The grouped GEMM kernel's epilogues (cuda_grouped_mma.cu): what a block
// does with its 128 x 128 accumulators, i.e. the plain store and the fused SwiGLU
// forward and backward stores, and the combine weights' row sums. A fragment of
// that translation unit, included once inside its anonymous namespace, after
// the tile constants, mma_params and tile_info it uses: the kernel template
// and its instantiations must see these in the same unit.
#ifndef MOE_CUDA_GROUPED_EPILOGUE_CUH
#define MOE_CUDA_GROUPED_EPILOGUE_CUH

// The block's 128 x 128 of c = alpha acc + beta c (c not read when beta ==
// 0: it may hold anything), through shared memory: each warpgroup writes its
// f32 accumulators there (accumulator i of a thread: row 16 * (warp % 4) +
// lane / 4 (+ 8 when i % 4 >= 2), column 8 * (i / 4) + 2 * (lane % 4) + i %
// 2), then every thread moves 16-byte chunks of 8 columns: the old c loaded
// all at once, one rounding to bf16, coalesced stores. Storing bf16 pairs
// straight from the registers wrote 4-byte pieces of 8 rows per instruction
// and, under beta != 0 (the weight gradients accumulate), waited for each old
// pair before the next: 150 us against 96 for the same tiles with beta 0.
constexpr int CLD = BN + 8;   // f32 row pitch of the staged tile: the accumulator writes meet no bank conflict
static_assert(BM * CLD * 4 <= STAGES * (BM + BN) * BK * 2, "the staged C tile must fit the pipeline's shared memory");

__device__ __forceinline__ void stage_acc(const float *d, float *cs, int tid, float alpha) {
    const int lane = tid & 31, r0 = (tid >> 7) * 64 + ((tid & 127) >> 5) * 16 + (lane >> 2);
#pragma unroll
    for (int h = 0; h < 2; h++)
#pragma unroll
        for (int j = 0; j < BN / 8; j++)
            *reinterpret_cast<float2 *>(cs + (r0 + h * 8) * CLD + j * 8 + (lane & 3) * 2) =
                make_float2(alpha * d[j * 4 + h * 2], alpha * d[j * 4 + h * 2 + 1]);
    __syncthreads();
}

// c = (staged tile) + beta c for the staged tile in cs
__device__ __forceinline__ void store_staged(const float *cs, const tile_info &ti, int tid, float beta) {
    constexpr int PER = BM * BN / 8 / THREADS;   // 16-byte chunks per thread
    uint4 old[PER];
    if (beta != 0.0f) {
#pragma unroll
        for (int i = 0; i < PER; i++) {
            int idx = tid + i * THREADS, row = ti.m0 + (idx >> 4), col = ti.n0 + (idx & 15) * 8;
            old[i] = row < ti.M && col < ti.N ? *reinterpret_cast<const uint4 *>(ti.C + (int64_t)row * ti.ldc + col)
                                              : make_uint4(0, 0, 0, 0);
        }
    }
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8, row = ti.m0 + r, col = ti.n0 + c;
        if (row >= ti.M || col >= ti.N) continue;
        float4 a = *reinterpret_cast<const float4 *>(cs + r * CLD + c);
        float4 b = *reinterpret_cast<const float4 *>(cs + r * CLD + c + 4);
        float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
        if (beta != 0.0f) {
            const unsigned w[4] = {old[i].x, old[i].y, old[i].z, old[i].w};
#pragma unroll
            for (int k = 0; k < 4; k++) {
                v[2 * k] += beta * __uint_as_float(w[k] << 16);
                v[2 * k + 1] += beta * __uint_as_float(w[k] & 0xffff0000u);
            }
        }
        uint4 out;
        unsigned *o = &out.x;
#pragma unroll
        for (int k = 0; k < 4; k++) {
            __nv_bfloat162 hv = __floats2bfloat162_rn(v[2 * k], v[2 * k + 1]);
            o[k] = *reinterpret_cast<unsigned *>(&hv);
        }
        *reinterpret_cast<uint4 *>(ti.C + (int64_t)row * ti.ldc + col) = out;
    }
}

__device__ __forceinline__ void store_tile(const float *d, float *cs, const tile_info &ti, int tid, float alpha,
                                           float beta) {
    stage_acc(d, cs, tid, alpha);
    store_staged(cs, ti, tid, beta);
}

// 8 staged f32 values rounded to bf16 and back: what a stored and re-read tensor holds
__device__ __forceinline__ void round_bf16(float (&f)[8]) {
#pragma unroll
    for (int k = 0; k < 8; k++) f[k] = __bfloat162float(__float2bfloat16_rn(f[k]));
}

// SwiGLU forward: staged columns 0-63 are gate, 64-127 up, for expert-hidden
// columns n0/2 .. n0/2 + 63 (the hidden width a multiple of 64, checked on the
// host). gate and up are stored rounded, and the activation is computed from
// the rounded values: the bytes of the two GEMMs followed by the SwiGLU kernel.
__device__ __forceinline__ void store_swiglu(const float *d, float *cs, const tile_info &ti, const mma_params &p,
                                             int tid) {
    stage_acc(d, cs, tid, 1.0f);
    const int de = p.epi_n, nc0 = ti.n0 / 2;
    const int64_t rbase = ti.r0;
    constexpr int PER = BM * 64 / 8 / THREADS;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 3, c = (idx & 7) * 8, row = ti.m0 + r;
        if (row >= ti.M) continue;
        float g[8], u[8], h[8];
        *reinterpret_cast<float4 *>(g) = *reinterpret_cast<const float4 *>(cs + r * CLD + c);
        *reinterpret_cast<float4 *>(g + 4) = *reinterpret_cast<const float4 *>(cs + r * CLD + c + 4);
        *reinterpret_cast<float4 *>(u) = *reinterpret_cast<const float4 *>(cs + r * CLD + 64 + c);
        *reinterpret_cast<float4 *>(u + 4) = *reinterpret_cast<const float4 *>(cs + r * CLD + 64 + c + 4);
        round_bf16(g);
        round_bf16(u);
#pragma unroll
        for (int k = 0; k < 8; k++) h[k] = swiglu_1(g[k], u[k]);
        const int64_t o = (rbase + row) * de + nc0 + c;
        st16(p.cg + o, pack(g));
        st16(p.cu + o, pack(u));
        st16(p.c + o, pack(h));
    }
}

// Every chunk's saved gate and up (and with W each row's combine weight) of the
// SwiGLU backward epilogues, requested before the first store: loaded inside
// the storing loop, the compiler kept each load behind the previous chunk's
// stores (they might alias), a load latency per chunk or two (SASS: LLSS LLSS ...)
template <bool W, int PER>
__device__ __forceinline__ void load_saved(uint4 (&gs)[PER], uint4 (&us)[PER], bf16 (&ws)[PER], const tile_info &ti,
                                           const mma_params &p, int tid) {
    const int de = p.epi_n;
    const int64_t rbase = ti.r0;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8, row = ti.m0 + r, col = ti.n0 + c;
        if (row >= ti.M || col >= de) continue;
        const int64_t o = (rbase + row) * de + col;
        gs[i] = ld16(p.sg + o);
        us[i] = ld16(p.su + o);
        if (W) ws[i] = p.rw[rbase + row];
    }
}

// SwiGLU backward: the staged tile is dh (rows x expert-hidden columns n0..);
// rounded as stored, it meets the saved gate and up: dgate and dup are written
// instead of dh, the bytes of the GEMM followed by the SwiGLU backward kernel.
// With p.ch set, the activation silu(g) u goes there too, the forward's bytes:
// the forward then need not keep it for the down projection's weight gradient.
__device__ __forceinline__ void store_swiglu_bwd(const float *d, float *cs, const tile_info &ti, const mma_params &p,
                                                 int tid) {
    stage_acc(d, cs, tid, p.alpha);
    const int de = p.epi_n;
    const int64_t rbase = ti.r0;
    constexpr int PER = BM * BN / 8 / THREADS;
    uint4 gs[PER], us[PER];
    bf16 ws[PER];   // unused: no combine weights here
    load_saved<false>(gs, us, ws, ti, p, tid);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8, row = ti.m0 + r, col = ti.n0 + c;
        if (row >= ti.M || col >= de) continue;
        const int64_t o = (rbase + row) * de + col;
        float go[8], g[8], u[8];
        unpack(gs[i], g);
        unpack(us[i], u);
        if (p.ch) {
            float h[8];
#pragma unroll
            for (int k = 0; k < 8; k++) h[k] = swiglu_1(g[k], u[k]);
            st16(p.ch + o, pack(h));
        }
        *reinterpret_cast<float4 *>(go) = *reinterpret_cast<const float4 *>(cs + r * CLD + c);
        *reinterpret_cast<float4 *>(go + 4) = *reinterpret_cast<const float4 *>(cs + r * CLD + c + 4);
        round_bf16(go);
#pragma unroll
        for (int k = 0; k < 8; k++) swiglu_bwd_1(go[k], g[k], u[k], g[k], u[k]);
        st16(p.cg + o, pack(g));
        st16(p.cu + o, pack(u));
    }
}

// The same with the MoE combine's weights folded in. The staged tile is dy W
// over the experts' unweighted rows (dy gathered per row, not yet scaled by
// the row's weight w): each row's dot product with the forward's rounded
// activation h is its share of dw (the weight's gradient, dw = dy . (h W^T)),
// written per N tile to p.dwp and summed in order later; dh = w (dy W),
// rounded, meets gate and up as above; w h goes to p.ch (the down
// projection's weight gradient is then (dy rows)^T (w h)).
__device__ __forceinline__ void store_swiglu_bwd_w(const float *d, float *cs, const tile_info &ti, const mma_params &p,
                                                   int tid) {
    stage_acc(d, cs, tid, p.alpha);
    const int de = p.epi_n;
    const int64_t rbase = ti.r0;
    constexpr int PER = BM * BN / 8 / THREADS;
    float part[PER];
    uint4 gs[PER], us[PER];
    bf16 ws[PER];
    load_saved<true>(gs, us, ws, ti, p, tid);
#pragma unroll
    for (int i = 0; i < PER; i++) {
        part[i] = 0.0f;
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8, row = ti.m0 + r, col = ti.n0 + c;
        if (row >= ti.M || col >= de) continue;
        const int64_t o = (rbase + row) * de + col;
        float go[8], g[8], u[8], h[8], dh[8];
        unpack(gs[i], g);
        unpack(us[i], u);
        const float w = __bfloat162float(ws[i]);
        *reinterpret_cast<float4 *>(go) = *reinterpret_cast<const float4 *>(cs + r * CLD + c);
        *reinterpret_cast<float4 *>(go + 4) = *reinterpret_cast<const float4 *>(cs + r * CLD + c + 4);
#pragma unroll
        for (int k = 0; k < 8; k++) h[k] = swiglu_1(g[k], u[k]);
        round_bf16(h);   // the forward's activation, as the down projection read it
#pragma unroll
        for (int k = 0; k < 8; k++) {
            part[i] = fmaf(go[k], h[k], part[i]);
            dh[k] = go[k] * w;
            h[k] *= w;
        }
        round_bf16(dh);
#pragma unroll
        for (int k = 0; k < 8; k++) swiglu_bwd_1(dh[k], g[k], u[k], g[k], u[k]);
        st16(p.cg + o, pack(g));
        st16(p.cu + o, pack(u));
        st16(p.ch + o, pack(h));
    }
    // the 16 threads of a half-warp hold one row's 128 columns: a fixed tree over them
#pragma unroll
    for (int i = 0; i < PER; i++) {
        float v = part[i];
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
        int idx = tid + i * THREADS, row = ti.m0 + (idx >> 4);
        if ((tid & 15) == 0 && row < ti.M) p.dwp[(rbase + row) * p.n_tiles + ti.n0 / BN] = v;
    }
}

// dw[r] = the sum of row r's n partials in order, rounded once to dw's dtype
template <typename T>
__global__ void k_rowsum_partials(T *dw, const float *part, int64_t rows, int n) {
    for (int64_t r = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; r < rows; r += (int64_t)gridDim.x * blockDim.x) {
        float s = 0.0f;
        for (int j = 0; j < n; j++) s += part[r * n + j];
        if constexpr (sizeof(T) == 2) dw[r] = __float2bfloat16_rn(s);
        else dw[r] = s;
    }
}

#endif
