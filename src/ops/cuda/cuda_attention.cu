// Scaled dot-product attention, forward and backward, flash style: scores live
// only in registers / shared memory tile by tile, never as a [T, S] matrix in
// device memory, so memory stays O(B H T D) at any sequence length.
//
// Shapes (contiguous): q [B, T, Hq, D], k and v [B, S, Hkv, D], out [B, T, Hq, D],
// lse [B, Hq, T] (f32 or the data dtype). Grouped-query: q head h reads kv head
// h / (Hq / Hkv). Causal: query t sees keys s <= t + (S - T). A query that sees
// no key gets out = 0 and lse = -inf (as on the CPU).
//
// Two implementations of each kernel:
//  * tensor cores (bf16 data, D = 64 or 128): mma.sync m16n8k16 bf16 -> f32 via
//    ldmatrix from padded shared tiles (rows of D + 8 elements, conflict-free),
//    tiles streamed with cp.async, double-buffered. Softmax and all sums in f32;
//    P and dS are rounded to bf16 as matmul operands (as FlashAttention does).
//  * SIMT (f32 data, or bf16 with another D <= 256, or unaligned pointers):
//    f32 tiles of 32 x 32 in shared memory, f32 FMA; exact f32 arithmetic, so
//    f32 matches the CPU to rounding. Correct for any D <= 256, not fast.
//
// Forward: one block per (64 or 32 queries, q head, batch); online softmax in
// base 2 (scores pre-multiplied by scale * log2 e); keys past the causal limit
// of the block's last query are never loaded.
//
// Backward (deterministic, no atomics):
//  1. prep: lse2 = lse * log2 e and Dvec = rowsum(dO * O) per (b, h, t), f32 scratch;
//  2. dK/dV: one block per (64 or 32 keys, kv head, batch) owns its dK, dV rows
//     and loops over the G query heads of its group and every query tile that
//     can see its keys, in a fixed order: P^T = exp2(K Q^T sl2 - lse2),
//     dP^T = V dO^T, dS^T = P^T (dP^T - Dvec), dV += P^T dO, dK += dS^T Q;
//  3. dQ: one block per (query tile, q head, batch) over the key tiles:
//     dQ += dS K (recomputing P and dP).
// Cost: the scores and dP are computed twice (in 2 and 3): 7 T x S x D matmuls
// instead of the 5 of an atomic dQ, about 1.4x the arithmetic, in exchange for
// bit-identical results from run to run.
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// c[16x8] += a[16x16] b[16x8], bf16 operands, f32 accumulators
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// Fragment loads from a shared tile with row stride ld (elements).
// A operand (16 rows x 16 k) of a [row][k] tile; also the B operand of a [k][n]
// tile loaded transposed (two n-tiles of 8): the lane addresses coincide.
__device__ __forceinline__ const bf16 *frag_addr_a(const bf16 *base, int ld, int row0, int col0) {
    int lane = threadIdx.x & 31;
    return base + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8;
}
// B operand of a [n][k] tile (two n-tiles of 8 at n0, k-slice of 16 at k0):
// r[0], r[1] are b0, b1 of n-tile n0, r[2], r[3] of n-tile n0 + 8.
__device__ __forceinline__ const bf16 *frag_addr_bn(const bf16 *base, int ld, int n0, int k0) {
    int lane = threadIdx.x & 31;
    return base + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
__device__ __forceinline__ void lds_a(uint32_t r[4], const bf16 *base, int ld, int row0, int k0) {
    ldsm_x4(r, frag_addr_a(base, ld, row0, k0));
}
__device__ __forceinline__ void lds_bn(uint32_t r[4], const bf16 *base, int ld, int n0, int k0) {
    ldsm_x4(r, frag_addr_bn(base, ld, n0, k0));
}
// B operand of a [k][n] tile, transposed on load: r[0], r[1] for n-tile n0, r[2], r[3] for n0 + 8.
__device__ __forceinline__ void lds_bt(uint32_t r[4], const bf16 *base, int ld, int k0, int n0) {
    ldsm_x4_t(r, frag_addr_a(base, ld, k0, n0));
}

// ROWS rows of D bf16 (global row stride `stride` elements) into a shared tile
// of row stride D + 8, with cp.async; rows at or past `valid` are zero-filled.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *src, int64_t stride, int row0, int valid) {
    constexpr int CPR = D / 8, LD = D + 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NT) {
        int r = c / CPR, cc = c - r * CPR, gr = row0 + r;
        bool ok = gr < valid;
        const bf16 *g = ok ? src + (int64_t)gr * stride + cc * 8 : src;
        cp_async16(dst + r * LD + cc * 8, g, ok ? 16 : 0);
    }
}

__device__ __forceinline__ float shfl_max4(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float shfl_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

struct att_dims {
    int T, S, Hq, Hkv, D;
    int causal;
    float scale, sl2;   // sl2 = scale * log2(e)
};

// keys [0, n) that some query of [q0, q_end) may see
__device__ __forceinline__ int keys_needed(const att_dims &a, int q0, int q_end) {
    if (!a.causal) return a.S;
    int qlast = (q_end < a.T ? q_end : a.T) - 1;
    int n = qlast + a.S - a.T + 1;
    return n < 0 ? 0 : n > a.S ? a.S : n;
}

// ---------------------------------------------------------------- forward, tensor cores

template <int D>
constexpr int fwd_mma_smem() { return (64 + 4 * 64) * (D + 8) * 2; }

template <int D, typename LS>
__global__ void __launch_bounds__(128) k_att_fwd_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                                     const bf16 *__restrict__ v, bf16 *__restrict__ o, LS *lse,
                                                     att_dims a) {
    constexpr int BQ = 64, BK = 64, LD = D + 8, KD = D / 16, NT = BK / 8, DT = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + BQ * LD, *Vs = Ks + 2 * BK * LD;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ, hk = h / (a.Hq / a.Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const bf16 *qb = q + ((int64_t)b * a.T * a.Hq + h) * D;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const bf16 *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int off = a.S - a.T;
    const int nkeys = keys_needed(a, q0, q0 + BQ), nkt = (nkeys + BK - 1) / BK;

    load_rows<D, BQ, 128>(Qs, qb, ldq, q0, a.T);
    if (nkt > 0) {
        load_rows<D, BK, 128>(Ks, kb, ldk, 0, a.S);
        load_rows<D, BK, 128>(Vs, vb, ldk, 0, a.S);
    }
    cp_async_commit();

    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
    uint32_t qf[KD][4];
    const int row0 = q0 + warp * 16 + g;   // this lane's rows: row0 and row0 + 8

    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            load_rows<D, BK, 128>(Ks + (buf ^ 1) * BK * LD, kb, ldk, (kt + 1) * BK, a.S);
            load_rows<D, BK, 128>(Vs + (buf ^ 1) * BK * LD, vb, ldk, (kt + 1) * BK, a.S);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        if (kt == 0) {
#pragma unroll
            for (int kk = 0; kk < KD; kk++) lds_a(qf[kk], Qs, LD, warp * 16, kk * 16);
        }
        const bf16 *Kt = Ks + buf * BK * LD, *Vt = Vs + buf * BK * LD;
        float s[NT][4];
#pragma unroll
        for (int i = 0; i < NT; i++) s[i][0] = s[i][1] = s[i][2] = s[i][3] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++)
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t bb[4];
                lds_bn(bb, Kt, LD, np * 16, kk * 16);
                mma16816(s[2 * np], qf[kk], bb[0], bb[1]);
                mma16816(s[2 * np + 1], qf[kk], bb[2], bb[3]);
            }
        const int k0 = kt * BK;
        const bool need_mask = k0 + BK > a.S || (a.causal && k0 + BK - 1 > q0 + warp * 16 + off);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float x = s[nt][e] * a.sl2;
                if (need_mask) {
                    int key = k0 + nt * 8 + 2 * tg + (e & 1), row = row0 + (e >> 1) * 8;
                    if (key >= a.S || (a.causal && key > row + off)) x = -INFINITY;
                }
                s[nt][e] = x;
            }
        float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            mx[0] = fmaxf(mx[0], fmaxf(s[nt][0], s[nt][1]));
            mx[1] = fmaxf(mx[1], fmaxf(s[nt][2], s[nt][3]));
        }
        float alpha[2], base[2];
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float mn = fmaxf(m[i], shfl_max4(mx[i]));
            base[i] = mn == -INFINITY ? 0.0f : mn;
            alpha[i] = exp2f(m[i] - base[i]);
            m[i] = mn;
            l[i] *= alpha[i];
        }
#pragma unroll
        for (int nt = 0; nt < NT; nt++) {
            s[nt][0] = exp2f(s[nt][0] - base[0]);
            s[nt][1] = exp2f(s[nt][1] - base[0]);
            s[nt][2] = exp2f(s[nt][2] - base[1]);
            s[nt][3] = exp2f(s[nt][3] - base[1]);
            l[0] += s[nt][0] + s[nt][1];
            l[1] += s[nt][2] + s[nt][3];
        }
#pragma unroll
        for (int i = 0; i < DT; i++) {
            acc[i][0] *= alpha[0];
            acc[i][1] *= alpha[0];
            acc[i][2] *= alpha[1];
            acc[i][3] *= alpha[1];
        }
#pragma unroll
        for (int j = 0; j < BK / 16; j++) {
            uint32_t pa[4] = {pack_bf16(s[2 * j][0], s[2 * j][1]), pack_bf16(s[2 * j][2], s[2 * j][3]),
                              pack_bf16(s[2 * j + 1][0], s[2 * j + 1][1]), pack_bf16(s[2 * j + 1][2], s[2 * j + 1][3])};
#pragma unroll
            for (int dp = 0; dp < D / 16; dp++) {
                uint32_t bb[4];
                lds_bt(bb, Vt, LD, j * 16, dp * 16);
                mma16816(acc[2 * dp], pa, bb[0], bb[1]);
                mma16816(acc[2 * dp + 1], pa, bb[2], bb[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 2; i++) {
        float lt = shfl_sum4(l[i]);
        int row = row0 + i * 8;
        if (row >= a.T) continue;
        float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        bf16 *orow = o + ((int64_t)(b * a.T + row) * a.Hq + h) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *reinterpret_cast<uint32_t *>(orow + dt * 8 + 2 * tg) = pack_bf16(acc[dt][2 * i] * inv, acc[dt][2 * i + 1] * inv);
        if (tg == 0) lse[((int64_t)b * a.Hq + h) * a.T + row] = from_f32<LS>(lt > 0.0f ? (m[i] + log2f(lt)) * LN2 : -INFINITY);
    }
}

// ---------------------------------------------------------------- backward, tensor cores

// dK/dV: block = 64 keys (16 per warp) of one kv head; query tiles of BQ.
template <int D, int BQ>
constexpr int dkdv_mma_smem() { return (2 * 64 + 4 * BQ) * (D + 8) * 2 + 4 * BQ * 4; }

template <int D, int BQ>
__global__ void __launch_bounds__(128) k_att_dkdv_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                                      const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                                      const float *__restrict__ lse2, const float *__restrict__ dvec,
                                                      bf16 *__restrict__ dk, bf16 *__restrict__ dv, att_dims a) {
    constexpr int BK = 64, LD = D + 8, KD = D / 16, NT = BQ / 8, DT = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Ks = (bf16 *)smem_raw, *Vs = Ks + BK * LD, *Qs = Vs + BK * LD, *Os = Qs + 2 * BQ * LD;
    float *Ls = (float *)(Os + 2 * BQ * LD), *Ds = Ls + 2 * BQ;
    const int b = blockIdx.z, hk = blockIdx.y, s0 = blockIdx.x * BK, G = a.Hq / a.Hkv;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const bf16 *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int off = a.S - a.T;
    int qt0 = 0;
    if (a.causal) {
        int tmin = s0 - off;   // the first query that sees key s0
        qt0 = tmin > 0 ? tmin / BQ : 0;
    }
    const int nqt = (a.T + BQ - 1) / BQ, per = nqt > qt0 ? nqt - qt0 : 0, total = G * per;

    // item it -> (query head, query tile): loads its Q, dO, lse2, Dvec into buffer `buf`
    auto load_item = [&](int it, int buf) {
        int h = hk * G + it / per, t0 = (qt0 + it % per) * BQ;
        const bf16 *qb = q + ((int64_t)b * a.T * a.Hq + h) * D, *ob = dout + ((int64_t)b * a.T * a.Hq + h) * D;
        load_rows<D, BQ, 128>(Qs + buf * BQ * LD, qb, ldq, t0, a.T);
        load_rows<D, BQ, 128>(Os + buf * BQ * LD, ob, ldq, t0, a.T);
        const float *lb = lse2 + ((int64_t)b * a.Hq + h) * a.T, *db = dvec + ((int64_t)b * a.Hq + h) * a.T;
        for (int i = threadIdx.x; i < 2 * BQ; i += 128) {
            int r = i % BQ, t = t0 + r;
            bool ok = t < a.T;
            if (i < BQ) cp_async4(Ls + buf * BQ + r, ok ? lb + t : lb, ok ? 4 : 0);
            else cp_async4(Ds + buf * BQ + r, ok ? db + t : db, ok ? 4 : 0);
        }
    };

    load_rows<D, BK, 128>(Ks, kb, ldk, s0, a.S);
    load_rows<D, BK, 128>(Vs, vb, ldk, s0, a.S);
    if (total > 0) load_item(0, 0);
    cp_async_commit();

    float dka[DT][4], dva[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++)
#pragma unroll
        for (int e = 0; e < 4; e++) dka[i][e] = dva[i][e] = 0.0f;
    const int key0 = s0 + warp * 16 + g;   // this lane's keys: key0 and key0 + 8

    for (int it = 0; it < total; it++) {
        const int buf = it & 1;
        if (it + 1 < total) {
            load_item(it + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const int t0 = (qt0 + it % per) * BQ;
        const bf16 *Qt = Qs + buf * BQ * LD, *Ot = Os + buf * BQ * LD;
        const float *Lt = Ls + buf * BQ, *Dt = Ds + buf * BQ;
        float st[NT][4], dp[NT][4];
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) st[i][e] = dp[i][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t ka[4], va[4];
            lds_a(ka, Ks, LD, warp * 16, kk * 16);
            lds_a(va, Vs, LD, warp * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t bb[4];
                lds_bn(bb, Qt, LD, np * 16, kk * 16);
                mma16816(st[2 * np], ka, bb[0], bb[1]);
                mma16816(st[2 * np + 1], ka, bb[2], bb[3]);
                lds_bn(bb, Ot, LD, np * 16, kk * 16);
                mma16816(dp[2 * np], va, bb[0], bb[1]);
                mma16816(dp[2 * np + 1], va, bb[2], bb[3]);
            }
        }
        // rows are keys, columns queries: P^T and dS^T
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = nt * 8 + 2 * tg + (e & 1), t = t0 + c, key = key0 + (e >> 1) * 8;
                float p = 0.0f;
                if (t < a.T && key < a.S && !(a.causal && key > t + off)) p = exp2f(st[nt][e] * a.sl2 - Lt[c]);
                st[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - Dt[c]);
            }
#pragma unroll
        for (int j = 0; j < BQ / 16; j++) {
            uint32_t pa[4] = {pack_bf16(st[2 * j][0], st[2 * j][1]), pack_bf16(st[2 * j][2], st[2 * j][3]),
                              pack_bf16(st[2 * j + 1][0], st[2 * j + 1][1]),
                              pack_bf16(st[2 * j + 1][2], st[2 * j + 1][3])};
            uint32_t sa[4] = {pack_bf16(dp[2 * j][0], dp[2 * j][1]), pack_bf16(dp[2 * j][2], dp[2 * j][3]),
                              pack_bf16(dp[2 * j + 1][0], dp[2 * j + 1][1]),
                              pack_bf16(dp[2 * j + 1][2], dp[2 * j + 1][3])};
#pragma unroll
            for (int dq = 0; dq < D / 16; dq++) {
                uint32_t bb[4];
                lds_bt(bb, Ot, LD, j * 16, dq * 16);
                mma16816(dva[2 * dq], pa, bb[0], bb[1]);
                mma16816(dva[2 * dq + 1], pa, bb[2], bb[3]);
                lds_bt(bb, Qt, LD, j * 16, dq * 16);
                mma16816(dka[2 * dq], sa, bb[0], bb[1]);
                mma16816(dka[2 * dq + 1], sa, bb[2], bb[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 2; i++) {
        int key = key0 + i * 8;
        if (key >= a.S) continue;
        int64_t r = ((int64_t)(b * a.S + key) * a.Hkv + hk) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++) {
            *reinterpret_cast<uint32_t *>(dk + r + dt * 8 + 2 * tg) =
                pack_bf16(dka[dt][2 * i] * a.scale, dka[dt][2 * i + 1] * a.scale);
            *reinterpret_cast<uint32_t *>(dv + r + dt * 8 + 2 * tg) = pack_bf16(dva[dt][2 * i], dva[dt][2 * i + 1]);
        }
    }
}

// dQ: block = 64 queries (16 per warp) of one q head; key tiles of 64.
template <int D>
constexpr int dq_mma_smem() { return (2 * 64 + 4 * 64) * (D + 8) * 2; }

template <int D>
__global__ void __launch_bounds__(128) k_att_dq_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                                    const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                                    const float *__restrict__ lse2, const float *__restrict__ dvec,
                                                    bf16 *__restrict__ dq, att_dims a) {
    constexpr int BQ = 64, BK = 64, LD = D + 8, KD = D / 16, NT = BK / 8, DT = D / 8;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Os = Qs + BQ * LD, *Ks = Os + BQ * LD, *Vs = Ks + 2 * BK * LD;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * BQ, hk = h / (a.Hq / a.Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const bf16 *qb = q + ((int64_t)b * a.T * a.Hq + h) * D, *ob = dout + ((int64_t)b * a.T * a.Hq + h) * D;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const bf16 *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int off = a.S - a.T;
    const int nkeys = keys_needed(a, q0, q0 + BQ), nkt = (nkeys + BK - 1) / BK;

    load_rows<D, BQ, 128>(Qs, qb, ldq, q0, a.T);
    load_rows<D, BQ, 128>(Os, ob, ldq, q0, a.T);
    if (nkt > 0) {
        load_rows<D, BK, 128>(Ks, kb, ldk, 0, a.S);
        load_rows<D, BK, 128>(Vs, vb, ldk, 0, a.S);
    }
    cp_async_commit();

    const int row0 = q0 + warp * 16 + g;
    float lrow[2], drow[2];
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int r = row0 + i * 8;
        int64_t li = ((int64_t)b * a.Hq + h) * a.T + r;
        lrow[i] = r < a.T ? lse2[li] : 0.0f;
        drow[i] = r < a.T ? dvec[li] : 0.0f;
    }
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;

    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            load_rows<D, BK, 128>(Ks + (buf ^ 1) * BK * LD, kb, ldk, (kt + 1) * BK, a.S);
            load_rows<D, BK, 128>(Vs + (buf ^ 1) * BK * LD, vb, ldk, (kt + 1) * BK, a.S);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16 *Kt = Ks + buf * BK * LD, *Vt = Vs + buf * BK * LD;
        float s[NT][4], dp[NT][4];
#pragma unroll
        for (int i = 0; i < NT; i++)
#pragma unroll
            for (int e = 0; e < 4; e++) s[i][e] = dp[i][e] = 0.0f;
#pragma unroll
        for (int kk = 0; kk < KD; kk++) {
            uint32_t qa[4], oa[4];
            lds_a(qa, Qs, LD, warp * 16, kk * 16);
            lds_a(oa, Os, LD, warp * 16, kk * 16);
#pragma unroll
            for (int np = 0; np < NT / 2; np++) {
                uint32_t bb[4];
                lds_bn(bb, Kt, LD, np * 16, kk * 16);
                mma16816(s[2 * np], qa, bb[0], bb[1]);
                mma16816(s[2 * np + 1], qa, bb[2], bb[3]);
                lds_bn(bb, Vt, LD, np * 16, kk * 16);
                mma16816(dp[2 * np], oa, bb[0], bb[1]);
                mma16816(dp[2 * np + 1], oa, bb[2], bb[3]);
            }
        }
        const int k0 = kt * BK;
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int key = k0 + nt * 8 + 2 * tg + (e & 1), row = row0 + (e >> 1) * 8;
                float p = 0.0f;
                if (row < a.T && key < a.S && !(a.causal && key > row + off))
                    p = exp2f(s[nt][e] * a.sl2 - lrow[e >> 1]);
                dp[nt][e] = p * (dp[nt][e] - drow[e >> 1]);
            }
#pragma unroll
        for (int j = 0; j < BK / 16; j++) {
            uint32_t sa[4] = {pack_bf16(dp[2 * j][0], dp[2 * j][1]), pack_bf16(dp[2 * j][2], dp[2 * j][3]),
                              pack_bf16(dp[2 * j + 1][0], dp[2 * j + 1][1]),
                              pack_bf16(dp[2 * j + 1][2], dp[2 * j + 1][3])};
#pragma unroll
            for (int dd = 0; dd < D / 16; dd++) {
                uint32_t bb[4];
                lds_bt(bb, Kt, LD, j * 16, dd * 16);
                mma16816(acc[2 * dd], sa, bb[0], bb[1]);
                mma16816(acc[2 * dd + 1], sa, bb[2], bb[3]);
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int i = 0; i < 2; i++) {
        int row = row0 + i * 8;
        if (row >= a.T) continue;
        bf16 *r = dq + ((int64_t)(b * a.T + row) * a.Hq + h) * D;
#pragma unroll
        for (int dt = 0; dt < DT; dt++)
            *reinterpret_cast<uint32_t *>(r + dt * 8 + 2 * tg) =
                pack_bf16(acc[dt][2 * i] * a.scale, acc[dt][2 * i + 1] * a.scale);
    }
}

// ---------------------------------------------------------------- SIMT (any dtype, D <= 256)
//
// Tiles of 32 queries x 32 keys, f32 in shared memory with rows of D + 1
// (conflict-free column reads); 128 threads. Score tiles: thread i computes
// rows 2 (i / 8) + {0, 1} and columns (i % 8) + 8 j, j < 4. Row-owned
// accumulators (O, dQ, dK, dV): thread i owns row i / 4 and columns
// (i % 4) + 4 j, j < DMAX / 4.

#define SB 32   // SIMT tile edge

__device__ __forceinline__ void simt_dot(float acc[2][4], const float *A, const float *B, int ld, int D) {
    const int rg = threadIdx.x >> 3, cg = threadIdx.x & 7;
    const float *a0 = A + (2 * rg) * ld, *a1 = a0 + ld;
    const float *b0 = B + cg * ld, *b1 = b0 + 8 * ld, *b2 = b1 + 8 * ld, *b3 = b2 + 8 * ld;
#pragma unroll
    for (int i = 0; i < 2; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int d = 0; d < D; d++) {
        float x0 = a0[d], x1 = a1[d], y0 = b0[d], y1 = b1[d], y2 = b2[d], y3 = b3[d];
        acc[0][0] += x0 * y0; acc[0][1] += x0 * y1; acc[0][2] += x0 * y2; acc[0][3] += x0 * y3;
        acc[1][0] += x1 * y0; acc[1][1] += x1 * y1; acc[1][2] += x1 * y2; acc[1][3] += x1 * y3;
    }
}

// SB rows of D (global row stride `stride`) into f32 shared rows of ld; rows >= valid are 0
template <typename T>
__device__ __forceinline__ void simt_load(float *dst, int ld, const T *src, int64_t stride, int row0, int valid, int D) {
    for (int e = threadIdx.x; e < SB * D; e += blockDim.x) {
        int r = e / D, c = e - r * D, gr = row0 + r;
        dst[r * ld + c] = gr < valid ? to_f32(src[(int64_t)gr * stride + c]) : 0.0f;
    }
}

template <typename T, typename LS, int DMAX>
__global__ void __launch_bounds__(128) k_att_fwd_simt(const T *q, const T *k, const T *v, T *o, LS *lse, att_dims a) {
    constexpr int NJ = DMAX / 4;
    extern __shared__ float sm[];
    const int D = a.D, ld = D + 1;
    float *Qs = sm, *Ks = Qs + SB * ld, *Vs = Ks + SB * ld, *Ss = Vs + SB * ld, *rm = Ss + SB * 33, *rl = rm + SB,
          *ra = rl + SB;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * SB, hk = h / (a.Hq / a.Hkv), off = a.S - a.T;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const T *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D, *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    simt_load(Qs, ld, q + ((int64_t)b * a.T * a.Hq + h) * D, ldq, q0, a.T, D);
    if (threadIdx.x < SB) { rm[threadIdx.x] = -INFINITY; rl[threadIdx.x] = 0.0f; }
    const int orow = threadIdx.x >> 2, oc = threadIdx.x & 3, warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    float acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) acc[j] = 0.0f;
    const int nkt = (keys_needed(a, q0, q0 + SB) + SB - 1) / SB;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * SB;
        __syncthreads();
        simt_load(Ks, ld, kb, ldk, k0, a.S, D);
        simt_load(Vs, ld, vb, ldk, k0, a.S, D);
        __syncthreads();
        float s[2][4];
        simt_dot(s, Qs, Ks, ld, D);
#pragma unroll
        for (int i = 0; i < 2; i++)
#pragma unroll
            for (int j = 0; j < 4; j++) {
                int r = 2 * (threadIdx.x >> 3) + i, c = (threadIdx.x & 7) + 8 * j, key = k0 + c, t = q0 + r;
                float x = s[i][j] * a.sl2;
                if (key >= a.S || (a.causal && key > t + off)) x = -INFINITY;
                Ss[r * 33 + c] = x;
            }
        __syncthreads();
        for (int rr = 0; rr < 8; rr++) {   // warp w: rows 8 w .. 8 w + 7, lane = key
            int r = warp * 8 + rr;
            float x = Ss[r * 33 + lane], mo = rm[r];
            float mn = fmaxf(mo, warp_max(x));
            float base = mn == -INFINITY ? 0.0f : mn;
            float p = exp2f(x - base);
            float sum = warp_sum(p);
            Ss[r * 33 + lane] = p;
            if (lane == 0) {
                float al = exp2f(mo - base);
                rl[r] = rl[r] * al + sum;
                rm[r] = mn;
                ra[r] = al;
            }
        }
        __syncthreads();
        float al = ra[orow];
#pragma unroll
        for (int j = 0; j < NJ; j++) acc[j] *= al;
        for (int s2 = 0; s2 < SB; s2++) {
            float p = Ss[orow * 33 + s2];
            const float *vr = Vs + s2 * ld;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                int d = oc + 4 * j;
                if (d < D) acc[j] += p * vr[d];
            }
        }
    }
    __syncthreads();
    const int t = q0 + orow;
    if (t < a.T) {
        float lt = rl[orow], inv = lt > 0.0f ? 1.0f / lt : 0.0f;
        T *orp = o + ((int64_t)(b * a.T + t) * a.Hq + h) * D;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = oc + 4 * j;
            if (d < D) orp[d] = from_f32<T>(acc[j] * inv);
        }
        if (oc == 0)
            lse[((int64_t)b * a.Hq + h) * a.T + t] = from_f32<LS>(lt > 0.0f ? (rm[orow] + log2f(lt)) * LN2 : -INFINITY);
    }
}

// P[t][s] and dS[t][s] (rows: local queries, columns: local keys) into Ps, dSs (row stride 33)
__device__ __forceinline__ void simt_p_ds(float *Ps, float *dSs, const float *Qs, const float *Os, const float *Ks,
                                          const float *Vs, const float *Lt, const float *Dt, int ld, const att_dims &a,
                                          int q0, int k0) {
    float s[2][4], dp[2][4];
    simt_dot(s, Qs, Ks, ld, a.D);
    simt_dot(dp, Os, Vs, ld, a.D);
    const int off = a.S - a.T;
#pragma unroll
    for (int i = 0; i < 2; i++)
#pragma unroll
        for (int j = 0; j < 4; j++) {
            int r = 2 * (threadIdx.x >> 3) + i, c = (threadIdx.x & 7) + 8 * j, t = q0 + r, key = k0 + c;
            float p = 0.0f;
            if (t < a.T && key < a.S && !(a.causal && key > t + off)) p = exp2f(s[i][j] * a.sl2 - Lt[r]);
            if (Ps) Ps[r * 33 + c] = p;
            dSs[r * 33 + c] = p * (dp[i][j] - Dt[r]);
        }
}

__device__ __forceinline__ void simt_load_stats(float *Lt, float *Dt, const float *lse2, const float *dvec, int64_t base,
                                                int t0, int T) {
    if (threadIdx.x < SB) {
        int t = t0 + threadIdx.x;
        Lt[threadIdx.x] = t < T ? lse2[base + t] : 0.0f;
        Dt[threadIdx.x] = t < T ? dvec[base + t] : 0.0f;
    }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(128) k_att_dkdv_simt(const T *q, const T *k, const T *v, const T *dout,
                                                       const float *lse2, const float *dvec, T *dk, T *dv, att_dims a) {
    constexpr int NJ = DMAX / 4;
    extern __shared__ float sm[];
    const int D = a.D, ld = D + 1;
    float *Ks = sm, *Vs = Ks + SB * ld, *Qs = Vs + SB * ld, *Os = Qs + SB * ld, *Ps = Os + SB * ld, *dSs = Ps + SB * 33,
          *Lt = dSs + SB * 33, *Dt = Lt + SB;
    const int b = blockIdx.z, hk = blockIdx.y, s0 = blockIdx.x * SB, G = a.Hq / a.Hkv, off = a.S - a.T;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    simt_load(Ks, ld, k + ((int64_t)b * a.S * a.Hkv + hk) * D, ldk, s0, a.S, D);
    simt_load(Vs, ld, v + ((int64_t)b * a.S * a.Hkv + hk) * D, ldk, s0, a.S, D);
    const int orow = threadIdx.x >> 2, oc = threadIdx.x & 3;
    float dka[NJ], dva[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) dka[j] = dva[j] = 0.0f;
    int qt0 = 0;
    if (a.causal) qt0 = s0 - off > 0 ? (s0 - off) / SB : 0;
    const int nqt = (a.T + SB - 1) / SB;
    for (int hh = 0; hh < G; hh++) {
        const int h = hk * G + hh;
        const T *qb = q + ((int64_t)b * a.T * a.Hq + h) * D, *ob = dout + ((int64_t)b * a.T * a.Hq + h) * D;
        for (int qt = qt0; qt < nqt; qt++) {
            const int t0 = qt * SB;
            __syncthreads();
            simt_load(Qs, ld, qb, ldq, t0, a.T, D);
            simt_load(Os, ld, ob, ldq, t0, a.T, D);
            simt_load_stats(Lt, Dt, lse2, dvec, ((int64_t)b * a.Hq + h) * a.T, t0, a.T);
            __syncthreads();
            simt_p_ds(Ps, dSs, Qs, Os, Ks, Vs, Lt, Dt, ld, a, t0, s0);
            __syncthreads();
            for (int r = 0; r < SB; r++) {
                float p = Ps[r * 33 + orow], ds = dSs[r * 33 + orow];
                const float *orp = Os + r * ld, *qrp = Qs + r * ld;
#pragma unroll
                for (int j = 0; j < NJ; j++) {
                    int d = oc + 4 * j;
                    if (d < D) {
                        dva[j] += p * orp[d];
                        dka[j] += ds * qrp[d];
                    }
                }
            }
        }
    }
    const int key = s0 + orow;
    if (key < a.S) {
        int64_t r = ((int64_t)(b * a.S + key) * a.Hkv + hk) * D;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = oc + 4 * j;
            if (d < D) {
                dk[r + d] = from_f32<T>(dka[j] * a.scale);
                dv[r + d] = from_f32<T>(dva[j]);
            }
        }
    }
}

template <typename T, int DMAX>
__global__ void __launch_bounds__(128) k_att_dq_simt(const T *q, const T *k, const T *v, const T *dout,
                                                     const float *lse2, const float *dvec, T *dq, att_dims a) {
    constexpr int NJ = DMAX / 4;
    extern __shared__ float sm[];
    const int D = a.D, ld = D + 1;
    float *Qs = sm, *Os = Qs + SB * ld, *Ks = Os + SB * ld, *Vs = Ks + SB * ld, *dSs = Vs + SB * ld,
          *Lt = dSs + 2 * SB * 33, *Dt = Lt + SB;
    const int b = blockIdx.z, h = blockIdx.y, q0 = blockIdx.x * SB, hk = h / (a.Hq / a.Hkv);
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const T *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D, *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    simt_load(Qs, ld, q + ((int64_t)b * a.T * a.Hq + h) * D, ldq, q0, a.T, D);
    simt_load(Os, ld, dout + ((int64_t)b * a.T * a.Hq + h) * D, ldq, q0, a.T, D);
    simt_load_stats(Lt, Dt, lse2, dvec, ((int64_t)b * a.Hq + h) * a.T, q0, a.T);
    const int orow = threadIdx.x >> 2, oc = threadIdx.x & 3;
    float acc[NJ];
#pragma unroll
    for (int j = 0; j < NJ; j++) acc[j] = 0.0f;
    const int nkt = (keys_needed(a, q0, q0 + SB) + SB - 1) / SB;
    for (int kt = 0; kt < nkt; kt++) {
        const int k0 = kt * SB;
        __syncthreads();
        simt_load(Ks, ld, kb, ldk, k0, a.S, D);
        simt_load(Vs, ld, vb, ldk, k0, a.S, D);
        __syncthreads();
        simt_p_ds(nullptr, dSs, Qs, Os, Ks, Vs, Lt, Dt, ld, a, q0, k0);
        __syncthreads();
        for (int s2 = 0; s2 < SB; s2++) {
            float ds = dSs[orow * 33 + s2];
            const float *kr = Ks + s2 * ld;
#pragma unroll
            for (int j = 0; j < NJ; j++) {
                int d = oc + 4 * j;
                if (d < D) acc[j] += ds * kr[d];
            }
        }
    }
    const int t = q0 + orow;
    if (t < a.T) {
        T *r = dq + ((int64_t)(b * a.T + t) * a.Hq + h) * D;
#pragma unroll
        for (int j = 0; j < NJ; j++) {
            int d = oc + 4 * j;
            if (d < D) r[d] = from_f32<T>(acc[j] * a.scale);
        }
    }
}

// ---------------------------------------------------------------- backward prep

// per (b, h, t): lse2 = lse * log2 e, dvec = sum_d dO * O (one warp per row)
template <typename T, typename LS>
__global__ void k_att_prep(float *lse2, float *dvec, const T *dout, const T *out, const LS *lse, int64_t nrows, int T_,
                           int Hq, int D) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    for (int64_t i = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); i < nrows; i += warps) {
        int64_t t = i % T_, bh = i / T_, h = bh % Hq, b = bh / Hq;
        int64_t r = ((b * T_ + t) * Hq + h) * D;
        float acc = 0.0f;
        for (int d = lane; d < D; d += 32) acc += to_f32(dout[r + d]) * to_f32(out[r + d]);
        acc = warp_sum(acc);
        if (lane == 0) {
            dvec[i] = acc;
            lse2[i] = to_f32(lse[i]) * LOG2E;
        }
    }
}

// ---------------------------------------------------------------- host side

struct att_shape {
    int64_t B, T, S, Hq, Hkv, D;
};

att_shape shape_of(const moe_tensor *q, const moe_tensor *k) {
    return att_shape{q->shape[0], q->shape[1], k->shape[1], q->shape[2], k->shape[2], q->shape[3]};
}

moe_status check_shape(const att_shape &s, const char *op) {
    if (s.D > 256) return moe_error(MOE_ERR_SHAPE, "%s on cuda: head dim %lld, at most 256 supported", op, (long long)s.D);
    if (s.T > INT32_MAX / 2 || s.S > INT32_MAX / 2 || s.B > 65535 || s.Hq > 65535)
        return moe_error(MOE_ERR_SHAPE, "%s on cuda: B %lld, T %lld, S %lld or Hq %lld too large", op, (long long)s.B,
                         (long long)s.T, (long long)s.S, (long long)s.Hq);
    return MOE_OK;
}

att_dims dims_of(const att_shape &s, float scale, int causal) {
    att_dims a;
    a.T = (int)s.T; a.S = (int)s.S; a.Hq = (int)s.Hq; a.Hkv = (int)s.Hkv; a.D = (int)s.D;
    a.causal = causal;
    a.scale = scale;
    a.sl2 = scale * LOG2E;
    return a;
}

bool aligned16(const moe_tensor *t) { return ((uintptr_t)moe_tensor_data(t) & 15) == 0; }

// tensor-core path: bf16 data, D 64 or 128, 16-byte aligned rows
bool use_mma(const moe_tensor *q, const moe_tensor *k, const moe_tensor *v, const moe_tensor *a,
             const moe_tensor *b) {
    int64_t D = q->shape[3];
    if (q->dtype != MOE_BF16 || (D != 64 && D != 128)) return false;
    const moe_tensor *ts[] = {q, k, v, a, b};
    for (const moe_tensor *t : ts)
        if (t && !aligned16(t)) return false;
    return true;
}

template <typename K>
moe_status set_smem(K kernel, size_t bytes, const char *what) {
    if (bytes > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
    return MOE_OK;
}

int simt_dmax(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : 256; }

template <typename T, typename LS, int DMAX>
moe_status fwd_simt(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                    const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    auto kern = k_att_fwd_simt<T, LS, DMAX>;
    size_t smem = (size_t)(3 * SB * (s.D + 1) + SB * 33 + 3 * SB) * sizeof(float);
    MOE_TRY(set_smem(kern, smem, "attention"));
    dim3 grid((unsigned)((s.T + SB - 1) / SB), (unsigned)s.Hq, (unsigned)s.B);
    kern<<<grid, 128, smem, d->stream>>>(PTR(const T, q), PTR(const T, k), PTR(const T, v), PTR(T, out), PTR(LS, lse), a);
    CU_LAUNCHED("attention (simt)");
    return MOE_OK;
}

template <typename T, typename LS>
moe_status fwd_simt_any(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                        const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    switch (simt_dmax(s.D)) {
    case 64: return fwd_simt<T, LS, 64>(d, s, a, q, k, v, out, lse);
    case 128: return fwd_simt<T, LS, 128>(d, s, a, q, k, v, out, lse);
    default: return fwd_simt<T, LS, 256>(d, s, a, q, k, v, out, lse);
    }
}

template <int D, typename LS>
moe_status fwd_mma(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                   const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    auto kern = k_att_fwd_mma<D, LS>;
    size_t smem = fwd_mma_smem<D>();
    MOE_TRY(set_smem(kern, smem, "attention"));
    dim3 grid((unsigned)((s.T + 63) / 64), (unsigned)s.Hq, (unsigned)s.B);
    kern<<<grid, 128, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v), PTR(bf16, out),
                                         PTR(LS, lse), a);
    CU_LAUNCHED("attention (tensor cores)");
    return MOE_OK;
}

template <typename LS>
moe_status fwd_dispatch(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                        const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    if (use_mma(q, k, v, out, nullptr))
        return s.D == 64 ? fwd_mma<64, LS>(d, s, a, q, k, v, out, lse) : fwd_mma<128, LS>(d, s, a, q, k, v, out, lse);
    if (q->dtype == MOE_F32) return fwd_simt_any<float, LS>(d, s, a, q, k, v, out, lse);
    return fwd_simt_any<bf16, LS>(d, s, a, q, k, v, out, lse);
}

template <typename T, int DMAX>
moe_status bwd_simt(cuda_dev *d, const att_shape &s, const att_dims &a, const float *lse2, const float *dvec,
                    moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout, const moe_tensor *q,
                    const moe_tensor *k, const moe_tensor *v) {
    size_t smem = (size_t)(4 * SB * (s.D + 1) + 2 * SB * 33 + 2 * SB) * sizeof(float);
    if (s.S > 0) {
        auto kern = k_att_dkdv_simt<T, DMAX>;
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.S + SB - 1) / SB), (unsigned)s.Hkv, (unsigned)s.B);
        kern<<<grid, 128, smem, d->stream>>>(PTR(const T, q), PTR(const T, k), PTR(const T, v), PTR(const T, dout), lse2,
                                             dvec, PTR(T, dk), PTR(T, dv), a);
        CU_LAUNCHED("attention_backward (dk, dv; simt)");
    }
    if (s.T > 0) {
        auto kern = k_att_dq_simt<T, DMAX>;
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.T + SB - 1) / SB), (unsigned)s.Hq, (unsigned)s.B);
        kern<<<grid, 128, smem, d->stream>>>(PTR(const T, q), PTR(const T, k), PTR(const T, v), PTR(const T, dout), lse2,
                                             dvec, PTR(T, dq), a);
        CU_LAUNCHED("attention_backward (dq; simt)");
    }
    return MOE_OK;
}

template <typename T>
moe_status bwd_simt_any(cuda_dev *d, const att_shape &s, const att_dims &a, const float *lse2, const float *dvec,
                        moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout, const moe_tensor *q,
                        const moe_tensor *k, const moe_tensor *v) {
    switch (simt_dmax(s.D)) {
    case 64: return bwd_simt<T, 64>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
    case 128: return bwd_simt<T, 128>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
    default: return bwd_simt<T, 256>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
    }
}

template <int D>
moe_status bwd_mma(cuda_dev *d, const att_shape &s, const att_dims &a, const float *lse2, const float *dvec,
                   moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout, const moe_tensor *q,
                   const moe_tensor *k, const moe_tensor *v) {
    constexpr int BQ = D == 128 ? 32 : 64;
    if (s.S > 0) {
        auto kern = k_att_dkdv_mma<D, BQ>;
        size_t smem = dkdv_mma_smem<D, BQ>();
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.S + 63) / 64), (unsigned)s.Hkv, (unsigned)s.B);
        kern<<<grid, 128, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v),
                                             PTR(const bf16, dout), lse2, dvec, PTR(bf16, dk), PTR(bf16, dv), a);
        CU_LAUNCHED("attention_backward (dk, dv; tensor cores)");
    }
    if (s.T > 0) {
        auto kern = k_att_dq_mma<D>;
        size_t smem = dq_mma_smem<D>();
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.T + 63) / 64), (unsigned)s.Hq, (unsigned)s.B);
        kern<<<grid, 128, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v),
                                             PTR(const bf16, dout), lse2, dvec, PTR(bf16, dq), a);
        CU_LAUNCHED("attention_backward (dq; tensor cores)");
    }
    return MOE_OK;
}

template <typename T, typename LS>
void launch_prep(cuda_dev *d, float *lse2, float *dvec, const moe_tensor *dout, const moe_tensor *out,
                 const moe_tensor *lse, const att_shape &s) {
    int64_t nrows = s.B * s.Hq * s.T;
    int64_t blocks = (nrows + 7) / 8;
    int64_t cap = (int64_t)d->sm_count * 16;
    k_att_prep<T, LS><<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, d->stream>>>(
        lse2, dvec, PTR(const T, dout), PTR(const T, out), PTR(const LS, lse), nrows, (int)s.T, (int)s.Hq, (int)s.D);
}

moe_status check_lse(const moe_tensor *q, const moe_tensor *lse, const char *op) {
    if (lse->dtype == q->dtype || lse->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: lse must be f32 or %s, got %s", op, moe_dtype_name(q->dtype),
                     moe_dtype_name(lse->dtype));
}

}  // namespace

moe_status cuda_attention(moe_ctx *ctx, moe_tensor *out, moe_tensor *lse, const moe_tensor *q, const moe_tensor *k,
                          const moe_tensor *v, float scale, int causal) {
    MOE_TRY(cuda_check_float(q->dtype, "attention"));
    MOE_TRY(check_lse(q, lse, "attention"));
    att_shape s = shape_of(q, k);
    MOE_TRY(check_shape(s, "attention"));
    if (s.B * s.T * s.Hq == 0 || s.D == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, q->device);
    att_dims a = dims_of(s, scale, causal ? 1 : 0);
    if (lse->dtype == MOE_F32) return fwd_dispatch<float>(d, s, a, q, k, v, out, lse);
    return fwd_dispatch<bf16>(d, s, a, q, k, v, out, lse);
}

moe_status cuda_attention_backward(moe_ctx *ctx, moe_tensor *dq, moe_tensor *dk, moe_tensor *dv, const moe_tensor *dout,
                                   const moe_tensor *q, const moe_tensor *k, const moe_tensor *v,
                                   const moe_tensor *out, const moe_tensor *lse, float scale, int causal) {
    MOE_TRY(cuda_check_float(q->dtype, "attention_backward"));
    MOE_TRY(check_lse(q, lse, "attention_backward"));
    att_shape s = shape_of(q, k);
    MOE_TRY(check_shape(s, "attention_backward"));
    if (s.B == 0 || s.D == 0 || s.Hq == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, q->device);
    att_dims a = dims_of(s, scale, causal ? 1 : 0);
    int64_t nrows = s.B * s.Hq * s.T;
    cuda_scratch scr(d, (size_t)(2 * nrows) * sizeof(float));
    if (nrows && !scr.p) return moe_last_status();
    float *lse2 = (float *)scr.p, *dvec = lse2 ? lse2 + nrows : nullptr;
    if (nrows) {
        if (q->dtype == MOE_F32) launch_prep<float, float>(d, lse2, dvec, dout, out, lse, s);
        else if (lse->dtype == MOE_F32) launch_prep<bf16, float>(d, lse2, dvec, dout, out, lse, s);
        else launch_prep<bf16, bf16>(d, lse2, dvec, dout, out, lse, s);
        CU_LAUNCHED("attention_backward (prep)");
    }
    if (use_mma(q, k, v, dout, out) && aligned16(dq) && aligned16(dk) && aligned16(dv))
        return s.D == 64 ? bwd_mma<64>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v)
                         : bwd_mma<128>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
    if (q->dtype == MOE_F32) return bwd_simt_any<float>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
    return bwd_simt_any<bf16>(d, s, a, lse2, dvec, dq, dk, dv, dout, q, k, v);
}
