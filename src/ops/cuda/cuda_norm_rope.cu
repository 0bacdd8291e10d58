// RMSNorm over a row of H heads followed by rope on each head (OLMoE's QK-norm
// feeding attention), forward and backward in one pass each; x [B, T, H*D].
//
// The two ops in sequence read and write the row twice each way; here a block
// takes PP consecutive positions (their rope angles computed once, in double,
// as the rope kernel does; PP = nr_positions: about 32 rows a block, 4 a warp)
// and a warp takes one row (position, batch row) of them at a time: each lane holds
// vectors lane, lane + 32, ... of the row in registers, the warp reduces the
// sum of squares, and the rotate-half partner of a vector - the same place in
// the other half of its head - sits in lane ^ (D/2/N), one shuffle away (D/N
// divides 32). The normalised values are rounded to the data type before the
// rotation, and in the backward the inverse-rotated gradient is rounded before
// the norm's backward, as the two separate kernels store them: the results are
// those of rmsnorm then rope, up to the order of the dw sums.
// Backward: dx = rs (g w - x rs^2 mean(g w x)) (+ beta dx) with g = rope^-1(dy);
// dw partials per block (its rows, the warps combined in order through
// shared memory), added into dw in block order by the norm's k_dw_sum:
// deterministic.
// Shapes off this path (other D, row lengths, alignment) run the two ops.
#include "cuda_common.cuh"
#include "cuda_rope.cuh"
#include "cuda_vec.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
constexpr int NR_THREADS = 256, NR_WARPS = NR_THREADS / 32, NR_MAX_HALF = 128, NR_MAX_PP = 8;

// Positions a block takes: about 32 rows (4 a warp), at most NR_MAX_PP positions.
// One position a block (B rows: 8 in the step, one a warp) left each block's
// fixed costs (the angles in double, and in the backward the dw partials)
// to a single row a warp, in four waves of blocks at the step's shape.
static inline int nr_positions(int64_t B) {
    const int64_t pp = (4 * NR_WARPS + B - 1) / B;
    return (int)(pp < 1 ? 1 : pp > NR_MAX_PP ? NR_MAX_PP : pp);
}

// Rounded to T and back (what storing the intermediate would give).
template <typename T> __device__ __forceinline__ float round_t(float v) { return to_f32(from_f32<T>(v)); }

// The rotation of one vector (N elements at in-half position i0 of its head): lo
// tells whether it is in the first half; p is its partner. inverse: the angle's sign
// flipped (sn holds -sin then).
template <int N>
__device__ __forceinline__ void rotate(float (&f)[N], const float (&p)[N], bool lo, const float *cs, const float *sn,
                                       int i0) {
#pragma unroll
    for (int e = 0; e < N; e++) {
        float c = cs[i0 + e], s = sn[i0 + e];
        f[e] = lo ? f[e] * c - p[e] * s : f[e] * c + p[e] * s;
    }
}

template <int N> __device__ __forceinline__ void partner(float (&p)[N], const float (&f)[N], int hv) {
#pragma unroll
    for (int e = 0; e < N; e++) p[e] = __shfl_xor_sync(0xffffffffu, f[e], hv);
}

// y = rope(rmsnorm(x) * w); NV vectors a lane, HV = vectors per half head.
// w is re-read per row (L1 keeps its 2 KB) rather than held: registers set the occupancy here.
template <typename T, typename S, int NV>
__global__ void __launch_bounds__(NR_THREADS, NV <= 4 ? 3 : 2)
k_rms_rope_fwd(T *y, S *rstd, const T *x, const T *w, int64_t B, int64_t Tn, int n, int D, int64_t pos,
               double theta, float eps, int pp) {
    constexpr int N = VEC<T>::N;
    __shared__ float cs[NR_MAX_PP * NR_MAX_HALF], sn[NR_MAX_PP * NR_MAX_HALF];
    const int64_t t0 = (int64_t)blockIdx.x * pp, np = Tn - t0 < pp ? Tn - t0 : pp;
    const int half = D / 2, hv = half / N, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    rope_angles(cs, sn, half, D, (double)(pos + t0), np, theta, 0);
    __syncthreads();
    const bool lo = (lane / hv) % 2 == 0;
    for (int64_t q = warp; q < np * B; q += NR_WARPS) {
        const int64_t tp = q / B, r = (q - tp * B) * Tn + t0 + tp;
        const int i0 = (int)tp * half + (lane % hv) * N;   // this position's angles
        const T *xr = x + r * n;
        float f[NV][N];
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            vload(xr + (int64_t)(lane + 32 * k) * N, f[k]);
#pragma unroll
            for (int e = 0; e < N; e++) ss += f[k][e] * f[k][e];
        }
        ss = warp_sum(ss);
        const float rs = 1.0f / sqrtf(ss / (float)n + eps);
        T *yr = y + r * n;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            float p[N], wf[N];
            vload(w + (int64_t)(lane + 32 * k) * N, wf);
#pragma unroll
            for (int e = 0; e < N; e++) f[k][e] = round_t<T>(f[k][e] * rs * wf[e]);
            partner<N>(p, f[k], hv);
            rotate<N>(f[k], p, lo, cs, sn, i0);
            vstore(yr + (int64_t)(lane + 32 * k) * N, f[k]);
        }
        if (lane == 0) rstd[r] = from_f32<S>(rs);
    }
}

// dx (+)= the norm's backward of g = rope^-1(dy); part[block] = this block's dw partials.
// Held per lane: the row's rotated gradient and the dw sums; x and w are re-read
// (L1) for the output, so that two blocks fit an SM.
template <typename T, typename S, int NV>
__global__ void __launch_bounds__(NR_THREADS, NV <= 4 ? 2 : 1)
k_rms_rope_bwd(T *dx, float *part, const T *dy, const T *x, const T *w, const S *rstd, int64_t B, int64_t Tn, int n,
               int D, int64_t pos, double theta, float beta, int pp) {
    constexpr int N = VEC<T>::N;
    __shared__ float cs[NR_MAX_PP * NR_MAX_HALF], sn[NR_MAX_PP * NR_MAX_HALF];
    extern __shared__ float red[];   // NR_WARPS * n floats
    const int64_t t0 = (int64_t)blockIdx.x * pp, np = Tn - t0 < pp ? Tn - t0 : pp;
    const int half = D / 2, hv = half / N, lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    rope_angles(cs, sn, half, D, (double)(pos + t0), np, theta, 1);
    float acc[NV][N];
#pragma unroll
    for (int k = 0; k < NV; k++)
#pragma unroll
        for (int e = 0; e < N; e++) acc[k][e] = 0.0f;
    __syncthreads();
    const bool lo = (lane / hv) % 2 == 0;
    for (int64_t q = warp; q < np * B; q += NR_WARPS) {
        const int64_t tp = q / B, r = (q - tp * B) * Tn + t0 + tp;
        const int i0 = (int)tp * half + (lane % hv) * N;   // this position's angles
        const T *xr = x + r * n, *dyr = dy + r * n;
        float g[NV][N];
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            float p[N], xf[N], wf[N];
            vload(dyr + (int64_t)(lane + 32 * k) * N, g[k]);
            vload(xr + (int64_t)(lane + 32 * k) * N, xf);
            vload(w + (int64_t)(lane + 32 * k) * N, wf);
            partner<N>(p, g[k], hv);
            rotate<N>(g[k], p, lo, cs, sn, i0);
#pragma unroll
            for (int e = 0; e < N; e++) {
                g[k][e] = round_t<T>(g[k][e]);
                dot += g[k][e] * wf[e] * xf[e];
            }
        }
        dot = warp_sum(dot);
        const float rs = to_f32(rstd[r]);
        const float c = rs * rs * dot / (float)n;
        T *dxr = dx + r * n;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            float o[N], xf[N], wf[N];
            vload(xr + (int64_t)(lane + 32 * k) * N, xf);
            vload(w + (int64_t)(lane + 32 * k) * N, wf);
#pragma unroll
            for (int e = 0; e < N; e++) {
                o[e] = rs * (g[k][e] * wf[e] - xf[e] * c);
                acc[k][e] += g[k][e] * xf[e] * rs;
            }
            if (beta != 0.0f) {
                float old[N];
                vload(dxr + (int64_t)(lane + 32 * k) * N, old);
#pragma unroll
                for (int e = 0; e < N; e++) o[e] += beta * old[e];
            }
            vstore(dxr + (int64_t)(lane + 32 * k) * N, o);
        }
    }
    // the warps' partials, combined in warp order
#pragma unroll
    for (int k = 0; k < NV; k++)
#pragma unroll
        for (int e = 0; e < N; e++) red[warp * n + (lane + 32 * k) * N + e] = acc[k][e];
    __syncthreads();
    for (int j = threadIdx.x; j < n; j += NR_THREADS) {
        float s = 0.0f;
        for (int q = 0; q < NR_WARPS; q++) s += red[q * n + j];
        part[blockIdx.x * (int64_t)n + j] = s;
    }
}

// The fused path applies: a whole number of vectors per lane (1 to 8), D/N
// dividing 32 with whole vectors per half head, aligned rows.
template <typename T> int fused_nv(int64_t n, int64_t D, const void *const *ptrs, int np) {
    constexpr int N = VEC<T>::N;
    if (D % (2 * N) || 32 % (D / N) || D / 2 > NR_MAX_HALF || n % (32 * N)) return 0;
    int64_t nv = n / (32 * N);
    if (nv != 1 && nv != 2 && nv != 4 && nv != 8) return 0;
    for (int i = 0; i < np; i++)
        if (ptrs[i] && !cuda_aligned16(ptrs[i])) return 0;
    return (int)nv;
}

template <typename T, typename S, int NV>
void fwd_launch(cuda_dev *d, T *y, S *rstd, const T *x, const T *w, int64_t B, int64_t Tn, int n, int D, int64_t pos,
                double theta, float eps) {
    const int pp = nr_positions(B);
    k_rms_rope_fwd<T, S, NV><<<(unsigned)((Tn + pp - 1) / pp), NR_THREADS, 0, d->stream>>>(y, rstd, x, w, B, Tn, n, D,
                                                                                        pos, theta, eps, pp);
}

template <typename T, typename S>
moe_status fwd(cuda_dev *d, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w, int64_t B,
               int64_t Tn, int n, int D, int64_t pos, double theta, float eps, int nv) {
    T *yp = PTR(T, y);
    S *rp = PTR(S, rstd);
    const T *xp = PTR(const T, x), *wp = PTR(const T, w);
    if (nv == 1) fwd_launch<T, S, 1>(d, yp, rp, xp, wp, B, Tn, n, D, pos, theta, eps);
    else if (nv == 2) fwd_launch<T, S, 2>(d, yp, rp, xp, wp, B, Tn, n, D, pos, theta, eps);
    else if (nv == 4) fwd_launch<T, S, 4>(d, yp, rp, xp, wp, B, Tn, n, D, pos, theta, eps);
    else fwd_launch<T, S, 8>(d, yp, rp, xp, wp, B, Tn, n, D, pos, theta, eps);
    CU_LAUNCHED("rmsnorm_rope");
    return MOE_OK;
}

template <typename T, typename S, int NV>
moe_status bwd_launch(cuda_dev *d, moe_tensor *dx, float *part, const moe_tensor *dy, const moe_tensor *x,
                      const moe_tensor *w, const moe_tensor *rstd, int64_t B, int64_t Tn, int n, int D, int64_t pos,
                      double theta, float beta, int pp, int64_t blocks) {
    auto kern = k_rms_rope_bwd<T, S, NV>;
    const size_t smem = (size_t)NR_WARPS * n * sizeof(float);
    CU_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem), "rmsnorm_rope_backward");
    kern<<<(unsigned)blocks, NR_THREADS, smem, d->stream>>>(PTR(T, dx), part, PTR(const T, dy), PTR(const T, x),
                                                            PTR(const T, w), PTR(const S, rstd), B, Tn, n, D, pos,
                                                            theta, beta, pp);
    CU_LAUNCHED("rmsnorm_rope_backward");
    return MOE_OK;
}

template <typename T, typename S>
moe_status bwd(cuda_dev *d, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy, const moe_tensor *x,
               const moe_tensor *w, const moe_tensor *rstd, int64_t B, int64_t Tn, int n, int D, int64_t pos,
               double theta, float beta, int nv) {
    const int pp = nr_positions(B);
    const int64_t blocks = (Tn + pp - 1) / pp;   // one row of dw partials each
    cuda_scratch part(d, (size_t)blocks * (size_t)n * sizeof(float));
    if (!part.p) return moe_last_status();
    float *ps = (float *)part.p;
    moe_status s;
    if (nv == 1) s = bwd_launch<T, S, 1>(d, dx, ps, dy, x, w, rstd, B, Tn, n, D, pos, theta, beta, pp, blocks);
    else if (nv == 2) s = bwd_launch<T, S, 2>(d, dx, ps, dy, x, w, rstd, B, Tn, n, D, pos, theta, beta, pp, blocks);
    else if (nv == 4) s = bwd_launch<T, S, 4>(d, dx, ps, dy, x, w, rstd, B, Tn, n, D, pos, theta, beta, pp, blocks);
    else s = bwd_launch<T, S, 8>(d, dx, ps, dy, x, w, rstd, B, Tn, n, D, pos, theta, beta, pp, blocks);
    if (s != MOE_OK) return s;
    return dw ? cuda_rmsnorm_dw_sum(d, dw, ps, blocks, n) : MOE_OK;
}

// [B, T, H, D] view of a [B, T, H*D] tensor (the rope op's layout)
moe_tensor *heads4(moe_tensor *t, int64_t heads) {
    int64_t s[4] = {t->shape[0], t->shape[1], heads, t->shape[2] / heads};
    return moe_tensor_view(t, 4, s);
}

}  // namespace

moe_status cuda_rmsnorm_rope(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                             float eps, int64_t heads, int64_t pos_offset, float theta) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm_rope"));
    const int64_t B = x->shape[0], Tn = x->shape[1], n = x->shape[2], D = n / heads;
    if (B == 0 || Tn == 0 || n == 0) return MOE_OK;
    const void *ptrs[3] = {moe_tensor_data(y), moe_tensor_data(x), moe_tensor_data(w)};
    int nv = x->dtype == MOE_F32 ? fused_nv<float>(n, D, ptrs, 3) : fused_nv<bf16>(n, D, ptrs, 3);
    bool stat_ok = rstd->dtype == MOE_F32 || rstd->dtype == x->dtype;
    if (!nv || !stat_ok || Tn > INT32_MAX) {   // the two ops
        MOE_TRY(cuda_rmsnorm(ctx, y, rstd, x, w, eps));
        moe_tensor *y4 = heads4(y, heads);
        if (!y4) return moe_last_status();
        moe_status s = cuda_rope(ctx, y4, y4, pos_offset, theta, 0);
        moe_tensor_release(y4);
        return s;
    }
    CUDA_ENTER(d, ctx, x->device);
    d->n_norm_rope_fused++;
    if (x->dtype == MOE_F32) return fwd<float, float>(d, y, rstd, x, w, B, Tn, (int)n, (int)D, pos_offset, theta, eps, nv);
    if (rstd->dtype == MOE_F32) return fwd<bf16, float>(d, y, rstd, x, w, B, Tn, (int)n, (int)D, pos_offset, theta, eps, nv);
    return fwd<bf16, bf16>(d, y, rstd, x, w, B, Tn, (int)n, (int)D, pos_offset, theta, eps, nv);
}

moe_status cuda_rmsnorm_rope_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                      const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, int64_t heads,
                                      int64_t pos_offset, float theta, float beta) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm_rope_backward"));
    const int64_t B = x->shape[0], Tn = x->shape[1], n = x->shape[2], D = n / heads;
    if (B == 0 || Tn == 0 || n == 0) return MOE_OK;
    const void *ptrs[4] = {moe_tensor_data(dx), moe_tensor_data(dy), moe_tensor_data(x), moe_tensor_data(w)};
    int nv = x->dtype == MOE_F32 ? fused_nv<float>(n, D, ptrs, 4) : fused_nv<bf16>(n, D, ptrs, 4);
    bool stat_ok = rstd->dtype == MOE_F32 || rstd->dtype == x->dtype;
    if (!nv || !stat_ok || Tn > INT32_MAX) {   // the two ops, the inverse rotation into a temporary
        moe_tensor *g = moe_tensor_like(ctx, (moe_tensor *)dy);
        moe_tensor *g4 = g ? heads4(g, heads) : NULL, *dy4 = heads4((moe_tensor *)dy, heads);
        moe_status s = g4 && dy4 ? cuda_rope(ctx, g4, dy4, pos_offset, theta, 1) : moe_last_status();
        if (s == MOE_OK) s = cuda_rmsnorm_backward(ctx, dx, dw, g, x, w, rstd, beta);
        moe_tensor_release(g4); moe_tensor_release(dy4); moe_tensor_release(g);
        return s;
    }
    CUDA_ENTER(d, ctx, x->device);
    d->n_norm_rope_fused++;
    if (x->dtype == MOE_F32)
        return bwd<float, float>(d, dx, dw, dy, x, w, rstd, B, Tn, (int)n, (int)D, pos_offset, theta, beta, nv);
    if (rstd->dtype == MOE_F32)
        return bwd<bf16, float>(d, dx, dw, dy, x, w, rstd, B, Tn, (int)n, (int)D, pos_offset, theta, beta, nv);
    return bwd<bf16, bf16>(d, dx, dw, dy, x, w, rstd, B, Tn, (int)n, (int)D, pos_offset, theta, beta, nv);
}

extern "C" moe_status moe_cuda_norm_rope_fused_calls(moe_ctx *ctx, int device, uint64_t *calls) {
    return cuda_read_counter(ctx, device, calls, &cuda_dev::n_norm_rope_fused, "moe_cuda_norm_rope_fused_calls");
}
