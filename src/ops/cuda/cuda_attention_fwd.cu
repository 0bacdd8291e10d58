// Scaled dot-product attention, forward: the tensor-core and SIMT kernels and
// cuda_attention(). The design (shapes, the two implementations, online
// softmax) is described at the top of cuda_attention.cuh.
#include "cuda_attention.cuh"


namespace {

// ---------------------------------------------------------------- forward, tensor cores

template <int D, int NW, int MT>
constexpr int fwd_mma_smem() { return (16 * NW * MT + 4 * 64) * (D + 8) * 2; }

// NW warps of MT x 16 queries each share the block's K and V tiles. A warp's
// MT row tiles share every K and V fragment it loads from shared memory: with
// one (16 rows a warp) the ldmatrix traffic bound the kernel at D = 64.
template <int D, typename LS, int NW, int MT>
__global__ void __launch_bounds__(32 * NW, D == 64 ? (MT == 1 ? 16 / NW : 2) : 1)
k_att_fwd_mma(const bf16 *__restrict__ q, const bf16 *__restrict__ k, const bf16 *__restrict__ v,
              bf16 *__restrict__ o, LS *lse, att_dims a) {
    constexpr int WQ = 16 * MT, BQ = WQ * NW, BK = 64, LD = D + 8, KD = D / 16, NT = BK / 8, DT = D / 8,
                  NTH = 32 * NW;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    bf16 *Qs = (bf16 *)smem_raw, *Ks = Qs + BQ * LD, *Vs = Ks + 2 * BK * LD;
    // the last query tiles (the most keys under a causal mask) first: a shorter tail
    const tile_head_batch tb = block_tile_major();
    const int b = tb.b, h = tb.h, q0 = (gridDim.x - 1 - tb.t) * BQ, hk = h / (a.Hq / a.Hkv);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, tg = lane & 3;
    const int64_t ldq = (int64_t)a.Hq * D, ldk = (int64_t)a.Hkv * D;
    const bf16 *qb = q + ((int64_t)b * a.T * a.Hq + h) * D;
    const bf16 *kb = k + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const bf16 *vb = v + ((int64_t)b * a.S * a.Hkv + hk) * D;
    const int off = a.S - a.T;
    const int nkeys = keys_needed(a, q0, q0 + BQ), nkt = (nkeys + BK - 1) / BK;
    const int wq0 = q0 + warp * WQ;   // this warp's first query

    load_rows<D, BQ, NTH>(Qs, qb, ldq, q0, a.T);
    if (nkt > 0) {
        load_rows<D, BK, NTH>(Ks, kb, ldk, 0, a.S);
        load_rows<D, BK, NTH>(Vs, vb, ldk, 0, a.S);
    }
    cp_async_commit();

    float acc[MT][DT][4];
    float m[MT][2], l[MT][2];
    uint32_t qf[MT][KD][4];
#pragma unroll
    for (int mt = 0; mt < MT; mt++) {
#pragma unroll
        for (int i = 0; i < DT; i++) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.0f;
        m[mt][0] = m[mt][1] = -INFINITY;
        l[mt][0] = l[mt][1] = 0.0f;
    }

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
        if (kt == 0) {
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int kk = 0; kk < KD; kk++) lds_a(qf[mt][kk], Qs, LD, warp * WQ + mt * 16, kk * 16);
        }
        const int k0 = kt * BK;
        // under a causal mask the block's last key tile can lie wholly past this
        // warp's queries (BQ > BK): nothing of it to add
        if (!(a.causal && k0 > wq0 + WQ - 1 + off)) {
            const bf16 *Kt = Ks + buf * BK * LD, *Vt = Vs + buf * BK * LD;
            float s[MT][NT][4];
#pragma unroll
            for (int mt = 0; mt < MT; mt++)
#pragma unroll
                for (int i = 0; i < NT; i++) s[mt][i][0] = s[mt][i][1] = s[mt][i][2] = s[mt][i][3] = 0.0f;
#pragma unroll
            for (int kk = 0; kk < KD; kk++)
#pragma unroll
                for (int np = 0; np < NT / 2; np++) {
                    uint32_t bb[4];
                    lds_bn(bb, Kt, LD, np * 16, kk * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(s[mt][2 * np], qf[mt][kk], bb[0], bb[1]);
                        mma16816(s[mt][2 * np + 1], qf[mt][kk], bb[2], bb[3]);
                    }
                }
            // scores stay unscaled (the host sends only a positive scale here): the
            // row maximum is taken on them and the scale folded into one
            // multiply-add per score, exp2(s sl2 - m sl2)
#pragma unroll
            for (int mt = 0; mt < MT; mt++) {
                const int row0 = wq0 + mt * 16 + g;   // this lane's rows: row0 and row0 + 8
                const bool need_mask = k0 + BK > a.S || (a.causal && k0 + BK - 1 > wq0 + mt * 16 + off);
                if (need_mask) {
#pragma unroll
                    for (int nt = 0; nt < NT; nt++)
#pragma unroll
                        for (int e = 0; e < 4; e++) {
                            int key = k0 + nt * 8 + 2 * tg + (e & 1), row = row0 + (e >> 1) * 8;
                            if (key >= a.S || (a.causal && key > row + off)) s[mt][nt][e] = -INFINITY;
                        }
                }
                float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    mx[0] = fmaxf(mx[0], fmaxf(s[mt][nt][0], s[mt][nt][1]));
                    mx[1] = fmaxf(mx[1], fmaxf(s[mt][nt][2], s[mt][nt][3]));
                }
                float alpha[2], base[2];
#pragma unroll
                for (int i = 0; i < 2; i++) {
                    float mn = fmaxf(m[mt][i], shfl_max4(mx[i]));
                    base[i] = mn == -INFINITY ? 0.0f : mn * a.sl2;
                    alpha[i] = ex2_approx(m[mt][i] * a.sl2 - base[i]);
                    m[mt][i] = mn;
                    l[mt][i] *= alpha[i];
                }
#pragma unroll
                for (int nt = 0; nt < NT; nt++) {
                    s[mt][nt][0] = ex2_approx(fmaf(s[mt][nt][0], a.sl2, -base[0]));
                    s[mt][nt][1] = ex2_approx(fmaf(s[mt][nt][1], a.sl2, -base[0]));
                    s[mt][nt][2] = ex2_approx(fmaf(s[mt][nt][2], a.sl2, -base[1]));
                    s[mt][nt][3] = ex2_approx(fmaf(s[mt][nt][3], a.sl2, -base[1]));
                    l[mt][0] += s[mt][nt][0] + s[mt][nt][1];
                    l[mt][1] += s[mt][nt][2] + s[mt][nt][3];
                }
#pragma unroll
                for (int i = 0; i < DT; i++) {
                    acc[mt][i][0] *= alpha[0];
                    acc[mt][i][1] *= alpha[0];
                    acc[mt][i][2] *= alpha[1];
                    acc[mt][i][3] *= alpha[1];
                }
            }
#pragma unroll
            for (int j = 0; j < BK / 16; j++) {
                uint32_t pa[MT][4];
#pragma unroll
                for (int mt = 0; mt < MT; mt++) {
                    pa[mt][0] = pack_bf16(s[mt][2 * j][0], s[mt][2 * j][1]);
                    pa[mt][1] = pack_bf16(s[mt][2 * j][2], s[mt][2 * j][3]);
                    pa[mt][2] = pack_bf16(s[mt][2 * j + 1][0], s[mt][2 * j + 1][1]);
                    pa[mt][3] = pack_bf16(s[mt][2 * j + 1][2], s[mt][2 * j + 1][3]);
                }
#pragma unroll
                for (int dp = 0; dp < D / 16; dp++) {
                    uint32_t bb[4];
                    lds_bt(bb, Vt, LD, j * 16, dp * 16);
#pragma unroll
                    for (int mt = 0; mt < MT; mt++) {
                        mma16816(acc[mt][2 * dp], pa[mt], bb[0], bb[1]);
                        mma16816(acc[mt][2 * dp + 1], pa[mt], bb[2], bb[3]);
                    }
                }
            }
        }
        __syncthreads();
    }
    cp_async_wait<0>();

#pragma unroll
    for (int mt = 0; mt < MT; mt++)
#pragma unroll
        for (int i = 0; i < 2; i++) {
            float lt = shfl_sum4(l[mt][i]);
            int row = wq0 + mt * 16 + g + i * 8;
            if (row >= a.T) continue;
            float inv = lt > 0.0f ? 1.0f / lt : 0.0f;
            bf16 *orow = o + ((int64_t)(b * a.T + row) * a.Hq + h) * D;
#pragma unroll
            for (int dt = 0; dt < DT; dt++)
                *reinterpret_cast<uint32_t *>(orow + dt * 8 + 2 * tg) =
                    pack_bf16(acc[mt][dt][2 * i] * inv, acc[mt][dt][2 * i + 1] * inv);
            if (tg == 0)
                lse[((int64_t)b * a.Hq + h) * a.T + row] =
                    from_f32<LS>(lt > 0.0f ? (m[mt][i] * a.sl2 + log2f(lt)) * LN2 : -INFINITY);
        }
}

// ---------------------------------------------------------------- forward, SIMT (tiles: cuda_attention.cuh)

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

// ---------------------------------------------------------------- host side

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

template <int D, typename LS, int NW, int MT>
moe_status fwd_mma_launch(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                          const moe_tensor *v, moe_tensor *out, moe_tensor *lse);

template <int D, typename LS>
moe_status fwd_mma(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                   const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    // 8 warps (128 queries) share K and V at D = 128: 0.543 -> 0.358 ms causal,
    // 0.937 -> 0.576 non-causal (B 4, T 2048, 16 heads, H100, with the register
    // cap of one block per SM); at D = 64 they were slower (0.130 -> 0.143 ms at
    // the step model's shape). At D = 64, 4 warps of 32 queries each: 0.091-0.092
    // -> 0.090 ms (187-188 -> 190.5-190.9 TFLOP/s, B 8, T 1024, 16 heads, causal, H200).
    constexpr int NW = D == 128 ? 8 : 4;
    return fwd_mma_launch<D, LS, NW, D == 64 ? 2 : 1>(d, s, a, q, k, v, out, lse);
}

template <int D, typename LS, int NW, int MT>
moe_status fwd_mma_launch(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                          const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    auto kern = k_att_fwd_mma<D, LS, NW, MT>;
    size_t smem = fwd_mma_smem<D, NW, MT>();
    MOE_TRY(set_smem(kern, smem, "attention"));
    dim3 grid((unsigned)((s.T + 16 * NW * MT - 1) / (16 * NW * MT)), (unsigned)s.Hq, (unsigned)s.B);
    kern<<<grid, 32 * NW, smem, d->stream>>>(PTR(const bf16, q), PTR(const bf16, k), PTR(const bf16, v), PTR(bf16, out),
                                         PTR(LS, lse), a);
    CU_LAUNCHED("attention (tensor cores)");
    return MOE_OK;
}

template <typename LS>
moe_status fwd_dispatch(cuda_dev *d, const att_shape &s, const att_dims &a, const moe_tensor *q, const moe_tensor *k,
                        const moe_tensor *v, moe_tensor *out, moe_tensor *lse) {
    if (a.sl2 > 0.0f && use_mma(q, k, v, out, nullptr))
        return s.D == 64 ? fwd_mma<64, LS>(d, s, a, q, k, v, out, lse) : fwd_mma<128, LS>(d, s, a, q, k, v, out, lse);
    if (q->dtype == MOE_F32) return fwd_simt_any<float, LS>(d, s, a, q, k, v, out, lse);
    return fwd_simt_any<bf16, LS>(d, s, a, q, k, v, out, lse);
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
