// Scaled dot-product attention, backward (deterministic, no atomics): the prep,
// dK/dV and dQ kernels, tensor-core and SIMT, and cuda_attention_backward().
// The design (the three passes, their costs) is described at the top of
// cuda_attention.cuh.
#include "cuda_attention.cuh"
#include "cuda_vec.cuh"

namespace {

// ---------------------------------------------------------------- backward, tensor cores

// The dS tiles the dK/dV kernel keeps for dQ (KEEP): 64 keys x 64 queries of
// bf16 each, one per (batch and query head, query tile, key tile) that the
// causal mask lets through. packed (causal, T == S): only tiles with kt <= qt,
// row after row of the triangle; else the full grid of tiles. Inside a tile,
// 8 x 8 blocks of 128 bytes (block (key / 8, query / 8) at (key / 8 * 8 +
// query / 8) * 64, row-major inside): a warp's store of one mma fragment
// column fills one whole block (key-major rows of 16 bytes a quad took 8 half
// sectors a store, and the dK/dV kernel 1.33x its time), and each block row is
// one ldmatrix row for the dQ kernel.
struct ds_tiles {
    bf16 *p;
    int nqt, nkt, packed;
};
__device__ __forceinline__ bf16 *ds_tile(const ds_tiles &t, int64_t bh, int qt, int kt) {
    const int64_t i = t.packed ? bh * ((int64_t)t.nqt * (t.nqt + 1) / 2) + (int64_t)qt * (qt + 1) / 2 + kt
                               : (bh * t.nqt + qt) * t.nkt + kt;
    return t.p + i * 64 * 64;
}

// dK/dV: block = 64 keys (16 per warp) of one kv head; query tiles of BQ.
template <int D, int BQ, int NW>
constexpr int dkdv_mma_smem() { return (2 * 16 * NW + 4 * BQ) * (D + 8) * 2 + 4 * BQ * 4; }

template <int D, int BQ, int NW, bool KEEP>
__global__ void __launch_bounds__(32 * NW, NW == 4 && D == 64 ? 3 : 1) k_att_dkdv_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                                      const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                                      const float *__restrict__ lse2, const float *__restrict__ dvec,
                                                      bf16 *__restrict__ dk, bf16 *__restrict__ dv, att_dims a,
                                                      ds_tiles keep) {
    constexpr int BK = 16 * NW, LD = D + 8, KD = D / 16, NT = BQ / 8, DT = D / 8, NTH = 32 * NW;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Ks = (bf16 *)smem_raw, *Vs = Ks + BK * LD, *Qs = Vs + BK * LD, *Os = Qs + 2 * BQ * LD;
    float *Ls = (float *)(Os + 2 * BQ * LD), *Ds = Ls + 2 * BQ;
    // key tile 0 (every query tile sees it under a causal mask) first
    const tile_head_batch tb = block_tile_major();
    const int b = tb.b, hk = tb.h, s0 = tb.t * BK, G = a.Hq / a.Hkv;
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
        load_rows<D, BQ, NTH>(Qs + buf * BQ * LD, qb, ldq, t0, a.T);
        load_rows<D, BQ, NTH>(Os + buf * BQ * LD, ob, ldq, t0, a.T);
        const float *lb = lse2 + ((int64_t)b * a.Hq + h) * a.T, *db = dvec + ((int64_t)b * a.Hq + h) * a.T;
        for (int i = threadIdx.x; i < 2 * BQ; i += NTH) {
            int r = i % BQ, t = t0 + r;
            bool ok = t < a.T;
            if (i < BQ) cp_async4(Ls + buf * BQ + r, ok ? lb + t : lb, ok ? 4 : 0);
            else cp_async4(Ds + buf * BQ + r, ok ? db + t : db, ok ? 4 : 0);
        }
    };

    load_rows<D, BK, NTH>(Ks, kb, ldk, s0, a.S);
    load_rows<D, BK, NTH>(Vs, vb, ldk, s0, a.S);
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
        // the bounds and causal tests only where this warp's 16 keys x BQ queries cross an edge
        const int khi = s0 + warp * 16 + 15;
        const bool need_mask = t0 + BQ > a.T || khi >= a.S || (a.causal && khi > t0 + off);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                int c = nt * 8 + 2 * tg + (e & 1);
                float p = ex2_approx(fmaf(st[nt][e], a.sl2, -Lt[c]));
                if (need_mask) {
                    int t = t0 + c, key = key0 + (e >> 1) * 8;
                    if (!(t < a.T && key < a.S && !(a.causal && key > t + off))) p = 0.0f;
                }
                st[nt][e] = p;
                dp[nt][e] = p * (dp[nt][e] - Dt[c]);
            }
        if constexpr (KEEP) {   // dS^T as the dQ kernel reads it: this warp's 16 keys x BQ queries
            static_assert(BQ == 64 && BK == 64, "dS tiles are 64 x 64");
            bf16 *tile = ds_tile(keep, (int64_t)b * a.Hq + hk * G + it / per, t0 / BQ, s0 / BK);
#pragma unroll
            for (int nt = 0; nt < NT; nt++)
#pragma unroll
                for (int i = 0; i < 2; i++)   // keys warp * 16 + 8 i + g: block row (warp * 2 + i), column nt
                    *reinterpret_cast<uint32_t *>(tile + ((warp * 2 + i) * 8 + nt) * 64 + g * 8 + 2 * tg) =
                        pack_bf16(dp[nt][2 * i], dp[nt][2 * i + 1]);
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

// The two dQ kernels' shared steps: acc (this warp's 16 query rows x D) += the
// dS fragment sa (16 rows x 16 keys from key j * 16 on) times the K tile's rows
// j * 16 .. + 16; and the rows' store, scaled, into dq [B, T, Hq, D].
template <int D>
__device__ __forceinline__ void dq_accum(float (&acc)[D / 8][4], const uint32_t (&sa)[4], const bf16 *Kt, int ld, int j) {
#pragma unroll
    for (int dd = 0; dd < D / 16; dd++) {
        uint32_t bb[4];
        lds_bt(bb, Kt, ld, j * 16, dd * 16);
        mma16816(acc[2 * dd], sa, bb[0], bb[1]);
        mma16816(acc[2 * dd + 1], sa, bb[2], bb[3]);
    }
}
template <int D>
__device__ __forceinline__ void dq_store(bf16 *dq, const float (&acc)[D / 8][4], const att_dims &a, int b, int h, int row0) {
    const int tg = threadIdx.x & 3;
#pragma unroll
    for (int i = 0; i < 2; i++) {
        int row = row0 + i * 8;
        if (row >= a.T) continue;
        bf16 *r = dq + ((int64_t)(b * a.T + row) * a.Hq + h) * D;
#pragma unroll
        for (int dt = 0; dt < D / 8; dt++)
            *reinterpret_cast<uint32_t *>(r + dt * 8 + 2 * tg) =
                pack_bf16(acc[dt][2 * i] * a.scale, acc[dt][2 * i + 1] * a.scale);
    }
}

// dQ: block = 64 queries (16 per warp) of one q head; key tiles of 64.
template <int D, int NW>
constexpr int dq_mma_smem() { return (2 * 16 * NW + 4 * 64) * (D + 8) * 2; }

template <int D, int NW>
__global__ void __launch_bounds__(32 * NW, NW == 4 && D == 64 ? 3 : 1) k_att_dq_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k,
                                                    const bf16 *__restrict__ v, const bf16 *__restrict__ dout,
                                                    const float *__restrict__ lse2, const float *__restrict__ dvec,
                                                    bf16 *__restrict__ dq, att_dims a) {
    constexpr int BQ = 16 * NW, BK = 64, LD = D + 8, KD = D / 16, NT = BK / 8, DT = D / 8, NTH = 32 * NW;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Os = Qs + BQ * LD, *Ks = Os + BQ * LD, *Vs = Ks + 2 * BK * LD;
    // the last query tiles (the most keys under a causal mask) first: a shorter tail
    const tile_head_batch tb = block_tile_major();
    const int b = tb.b, h = tb.h, q0 = (gridDim.x - 1 - tb.t) * BQ, hk = h / (a.Hq / a.Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const bf16 *qb = q + ((int64_t)b * a.T * a.Hq + h) * D, *ob = dout + ((int64_t)b * a.T * a.Hq + h) * D;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const bf16 *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int off = a.S - a.T;
    const int nkeys = keys_needed(a, q0, q0 + BQ), nkt = (nkeys + BK - 1) / BK;

    load_rows<D, BQ, NTH>(Qs, qb, ldq, q0, a.T);
    load_rows<D, BQ, NTH>(Os, ob, ldq, q0, a.T);
    if (nkt > 0) {
        load_rows<D, BK, NTH>(Ks, kb, ldk, 0, a.S);
        load_rows<D, BK, NTH>(Vs, vb, ldk, 0, a.S);
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
            load_rows<D, BK, NTH>(Ks + (buf ^ 1) * BK * LD, kb, ldk, (kt + 1) * BK, a.S);
            load_rows<D, BK, NTH>(Vs + (buf ^ 1) * BK * LD, vb, ldk, (kt + 1) * BK, a.S);
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
        const int k0 = kt * BK, rlo = q0 + warp * 16;
        const bool need_mask = rlo + 15 >= a.T || k0 + BK > a.S || (a.causal && k0 + BK - 1 > rlo + off);
#pragma unroll
        for (int nt = 0; nt < NT; nt++)
#pragma unroll
            for (int e = 0; e < 4; e++) {
                float p = ex2_approx(fmaf(s[nt][e], a.sl2, -lrow[e >> 1]));
                if (need_mask) {
                    int key = k0 + nt * 8 + 2 * tg + (e & 1), row = row0 + (e >> 1) * 8;
                    if (!(row < a.T && key < a.S && !(a.causal && key > row + off))) p = 0.0f;
                }
                dp[nt][e] = p * (dp[nt][e] - drow[e >> 1]);
            }
#pragma unroll
        for (int j = 0; j < BK / 16; j++) {
            uint32_t sa[4] = {pack_bf16(dp[2 * j][0], dp[2 * j][1]), pack_bf16(dp[2 * j][2], dp[2 * j][3]),
                              pack_bf16(dp[2 * j + 1][0], dp[2 * j + 1][1]),
                              pack_bf16(dp[2 * j + 1][2], dp[2 * j + 1][3])};
            dq_accum<D>(acc, sa, Kt, LD, j);
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    dq_store<D>(dq, acc, a, b, h, row0);
}

// dQ from the dS tiles the dK/dV kernel kept: one matmul a key tile, dQ += dS K,
// instead of the three (scores, dP, dQ) and the exponentials of k_att_dq_mma.
// Block = 64 queries (16 per warp) of one q head, as there; dS^T tiles [key][query]
// give the A operand through transposing loads.
template <int D, int NW>
constexpr int dq_kept_smem() { return 2 * 64 * (D + 8) * 2 + 2 * 64 * 64 * 2; }

template <int D, int NW>
__global__ void __launch_bounds__(32 * NW) k_att_dq_kept(const bf16 *__restrict__ k, ds_tiles keep,
                                                         bf16 *__restrict__ dq, att_dims a) {
    constexpr int BQ = 16 * NW, BK = 64, LD = D + 8, DT = D / 8, NTH = 32 * NW;
    static_assert(BQ == 64 && D == 64, "dS tiles are 64 x 64");
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Ks = (bf16 *)smem_raw, *Ss = Ks + 2 * BK * LD;   // K tiles (padded rows), then two dS tiles
    const tile_head_batch tb = block_tile_major();
    const int b = tb.b, h = tb.h, qt = gridDim.x - 1 - tb.t, q0 = qt * BQ, hk = h / (a.Hq / a.Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int64_t ldk = (int64_t)a.Hkv * D, bh = (int64_t)b * a.Hq + h;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int nkeys = keys_needed(a, q0, q0 + BQ), nkt = (nkeys + BK - 1) / BK;
    auto load = [&](int kt, int buf) {
        load_rows<D, BK, NTH>(Ks + buf * BK * LD, kb, ldk, kt * BK, a.S);
        const bf16 *src = ds_tile(keep, bh, qt, kt);   // 8 KB as they lie (blocked: no padding needed)
        for (int c = threadIdx.x; c < 64 * 64 / 8; c += NTH) cp_async16(Ss + buf * 64 * 64 + c * 8, src + c * 8, 16);
    };
    if (nkt > 0) load(0, 0);
    cp_async_commit();
    float acc[DT][4];
#pragma unroll
    for (int i = 0; i < DT; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int kt = 0; kt < nkt; kt++) {
        const int buf = kt & 1;
        if (kt + 1 < nkt) {
            load(kt + 1, buf ^ 1);
            cp_async_commit();
            cp_async_wait<1>();
        } else {
            cp_async_wait<0>();
        }
        __syncthreads();
        const bf16 *Kt = Ks + buf * BK * LD, *St = Ss + buf * 64 * 64;
#pragma unroll
        for (int j = 0; j < BK / 16; j++) {
            // dS rows (this warp's 16 queries) x 16 keys, transposed from the key-major
            // blocks: matrix m = lane / 8 is keys 8 (m / 2) .. + 8 x queries 8 (m % 2) .. + 8
            uint32_t sa[4];
            const int m = lane >> 3, kblk = j * 2 + (m >> 1), qblk = warp * 2 + (m & 1);
            ldsm_x4_t(sa, St + (kblk * 8 + qblk) * 64 + (lane & 7) * 8);
            dq_accum<D>(acc, sa, Kt, LD, j);
        }
        __syncthreads();
    }
    cp_async_wait<0>();
    dq_store<D>(dq, acc, a, b, h, q0 + warp * 16 + (lane >> 2));
}

// ---------------------------------------------------------------- backward, SIMT (tiles: cuda_attention.cuh)

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

// The same with 16-byte loads: TPR threads per row (D = TPR * VEC<T>::N), a
// warp on 32 / TPR rows at once. One warp per row with 2-byte loads ran at ~1
// TB/s (32 us per layer at the step model's shape): too few bytes in flight.
template <typename T, typename LS, int TPR>
__global__ void k_att_prep_vec(float *lse2, float *dvec, const T *dout, const T *out, const LS *lse, int64_t nrows,
                               int T_, int Hq) {
    constexpr int N = VEC<T>::N, D = TPR * N, RPW = 32 / TPR;   // rows a warp takes at once
    const int sub = threadIdx.x % TPR, lane = threadIdx.x & 31;
    const int64_t wpb = blockDim.x / 32, per = (int64_t)gridDim.x * wpb * RPW;
    // the loop runs on the warp's first row, so every lane reaches the full-mask
    // shuffles; rows past the end load nothing and store nothing
    for (int64_t w0 = ((int64_t)blockIdx.x * wpb + threadIdx.x / 32) * RPW; w0 < nrows; w0 += per) {
        const int64_t i = w0 + lane / TPR;
        const bool valid = i < nrows;
        float acc = 0.0f;
        if (valid) {
            int64_t t = i % T_, bh = i / T_, h = bh % Hq, b = bh / Hq;
            int64_t r = ((b * T_ + t) * Hq + h) * D + sub * N;
            float g[N], o[N];
            vload(dout + r, g);
            vload(out + r, o);
#pragma unroll
            for (int j = 0; j < N; j++) acc = fmaf(g[j], o[j], acc);
        }
#pragma unroll
        for (int m = TPR / 2; m > 0; m >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, m);
        if (valid && sub == 0) {
            dvec[i] = acc;
            lse2[i] = to_f32(lse[i]) * LOG2E;
        }
    }
}

// ---------------------------------------------------------------- host side

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
    // 4 warps each: 8 (dK/dV over 128 keys, dQ over 128 queries) lost in every
    // combination measured (H100: 0.406 ms against 0.457-0.527 at the step
    // model's shape, 1.387 against 1.461 at D = 128, T 2048)
    constexpr int BQ = D == 128 ? 32 : 64, NWK = 4, NWQ = 4;
    // D = 64: the dS tiles kept for dQ where the scratch is within the device's cap
    // and can be had (else dQ computes scores and dP again). The step model's
    // attention (B 8, T 1024, 16 heads, causal, H200): 143 MB of tiles; dK/dV
    // 184 -> 203 us, dQ 135 -> 57, the backward 0.325 -> 0.273 ms.
    ds_tiles keep = {nullptr, (int)((s.T + 63) / 64), (int)((s.S + 63) / 64), a.causal && s.T == s.S};
    size_t keep_bytes = 0;
    if (D == 64 && s.T > 0 && s.S > 0 && d->att_ds_cap > 0) {
        const double tiles = (double)s.B * (double)s.Hq *
                             (keep.packed ? (double)keep.nqt * (keep.nqt + 1) / 2 : (double)keep.nqt * keep.nkt);
        if (tiles * 8192.0 <= (double)d->att_ds_cap) {
            keep_bytes = (size_t)tiles * 8192;
            keep.p = (bf16 *)cuda_scratch_try_alloc(d, keep_bytes);
        }
    }
    if (s.S > 0) {
        auto kern = keep.p ? k_att_dkdv_mma<D, BQ, NWK, D == 64> : k_att_dkdv_mma<D, BQ, NWK, false>;
        size_t smem = dkdv_mma_smem<D, BQ, NWK>();
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.S + 16 * NWK - 1) / (16 * NWK)), (unsigned)s.Hkv, (unsigned)s.B);
        kern<<<grid, 32 * NWK, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v),
                                             PTR(const bf16, dout), lse2, dvec, PTR(bf16, dk), PTR(bf16, dv), a, keep);
        CU_LAUNCHED("attention_backward (dk, dv; tensor cores)");
    }
    if constexpr (D == 64) {
        if (keep.p) {
            auto kern = k_att_dq_kept<D, NWQ>;
            size_t smem = dq_kept_smem<D, NWQ>();
            moe_status st = set_smem(kern, smem, "attention_backward");
            if (st == MOE_OK) {
                dim3 grid((unsigned)((s.T + 16 * NWQ - 1) / (16 * NWQ)), (unsigned)s.Hq, (unsigned)s.B);
                kern<<<grid, 32 * NWQ, smem, d->stream>>>(PTR(const bf16, k), keep, PTR(bf16, dq), a);
            }
            cuda_scratch_free(d, keep.p, keep_bytes);   // stream-ordered: the kernel above reads it first
            MOE_TRY(st);
            CU_LAUNCHED("attention_backward (dq from the kept dS; tensor cores)");
            d->n_att_ds++;
            return MOE_OK;
        }
    }
    if (s.T > 0) {
        auto kern = k_att_dq_mma<D, NWQ>;
        size_t smem = dq_mma_smem<D, NWQ>();
        MOE_TRY(set_smem(kern, smem, "attention_backward"));
        dim3 grid((unsigned)((s.T + 16 * NWQ - 1) / (16 * NWQ)), (unsigned)s.Hq, (unsigned)s.B);
        kern<<<grid, 32 * NWQ, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v),
                                                  PTR(const bf16, dout), lse2, dvec, PTR(bf16, dq), a);
        CU_LAUNCHED("attention_backward (dq; tensor cores)");
    }
    return MOE_OK;
}

template <typename T, typename LS>
void launch_prep(cuda_dev *d, float *lse2, float *dvec, const moe_tensor *dout, const moe_tensor *out,
                 const moe_tensor *lse, const att_shape &s) {
    int64_t nrows = s.B * s.Hq * s.T;
    int64_t cap = (int64_t)d->sm_count * 16;
    const int64_t tpr = s.D % VEC<T>::N ? 0 : s.D / VEC<T>::N;
    if (cuda_aligned16(moe_tensor_data(dout)) && cuda_aligned16(moe_tensor_data(out)) &&
        (tpr == 4 || tpr == 8 || tpr == 16 || tpr == 32)) {
        int64_t blocks = (nrows * tpr + 255) / 256;
        unsigned g = (unsigned)(blocks < cap ? blocks : cap);
        const T *dp = PTR(const T, dout), *op = PTR(const T, out);
        const LS *lp = PTR(const LS, lse);
        if (tpr == 4) k_att_prep_vec<T, LS, 4><<<g, 256, 0, d->stream>>>(lse2, dvec, dp, op, lp, nrows, (int)s.T, (int)s.Hq);
        else if (tpr == 8) k_att_prep_vec<T, LS, 8><<<g, 256, 0, d->stream>>>(lse2, dvec, dp, op, lp, nrows, (int)s.T, (int)s.Hq);
        else if (tpr == 16) k_att_prep_vec<T, LS, 16><<<g, 256, 0, d->stream>>>(lse2, dvec, dp, op, lp, nrows, (int)s.T, (int)s.Hq);
        else k_att_prep_vec<T, LS, 32><<<g, 256, 0, d->stream>>>(lse2, dvec, dp, op, lp, nrows, (int)s.T, (int)s.Hq);
        return;
    }
    int64_t blocks = (nrows + 7) / 8;
    k_att_prep<T, LS><<<(unsigned)(blocks < cap ? blocks : cap), 256, 0, d->stream>>>(
        lse2, dvec, PTR(const T, dout), PTR(const T, out), PTR(const LS, lse), nrows, (int)s.T, (int)s.Hq, (int)s.D);
}

}  // namespace

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

extern "C" moe_status moe_cuda_set_attention_ds_cap(moe_ctx *ctx, int device, size_t bytes) {
    if (!ctx) return moe_error(MOE_ERR_ARG, "moe_cuda_set_attention_ds_cap: no context");
    CUDA_ENTER(d, ctx, (moe_device{MOE_CUDA, device}));
    d->att_ds_cap = bytes;
    return MOE_OK;
}

extern "C" moe_status moe_cuda_attention_ds_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_att_ds, "moe_cuda_attention_ds_calls");
}
