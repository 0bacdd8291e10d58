// Rotary position embedding over x [B, T, H, D], rotate-half convention:
//   out[i]        = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
//   out[i + D/2]  = x[i + D/2] cos(p f_i) + x[i] sin(p f_i),  f_i = theta^(-2i/D), p = pos_offset + t
// inverse rotates by -angle (the backward).
//
// One block per (position, or up to 4 consecutive positions on the vector
// path; chunk of batch rows): the block computes cos/sin of its positions for
// the D/2 frequencies in double (as the CPU does, so long positions keep their
// precision) into shared memory once, and rotates the H heads of every batch
// row of its chunk, so the angles are shared by the chunk. With D/2 a multiple of the vector width and 16-byte aligned x and
// out, a thread rotates N pairs at a time (one 16-byte vector from each
// half); its first vectors are loaded before the angles are computed, so the
// loads overlap that work. Each thread reads both halves of its pairs before
// writing them, so out may alias x. One pass: every element is read and
// written once.
#include "cuda_common.cuh"
#include "cuda_rope.cuh"
#include "cuda_vec.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define ROPE_MAX_HALF 4096
#define ROPE_THREADS 256

// Vector path: N = elements per 16 bytes, half % N == 0. A block takes np
// consecutive positions (the angles of all np computed at once, so their
// double-precision latency is paid once for np times the data: with one
// position per block the kernel ran at ~1.5 TB/s). Items are (position, b,
// h, v) with v the vector index within the first half: the pairs v*N ..
// v*N+N-1; i0 indexes the block's angle table (position-major).
template <typename T>
__global__ void __launch_bounds__(ROPE_THREADS)
k_rope_vec(T *out, const T *x, int64_t B, int64_t T_, int64_t H, int64_t D, int64_t nb, int np, int64_t pos,
           double theta, int inverse) {
    constexpr int N = VEC<T>::N;
    extern __shared__ float cs[];   // cos then sin, np * D/2 each
    const int64_t t0 = (int64_t)blockIdx.x * np, half = D / 2, hv = half / N;
    const int64_t b0 = (int64_t)blockIdx.y * nb, b1 = b0 + nb < B ? b0 + nb : B;
    const int64_t npos = t0 + np <= T_ ? np : T_ - t0;
    const int64_t per_pos = (b1 - b0) * H * hv, items = npos * per_pos;
    float *sn = cs + np * half;
    // element offset of item e's first-half vector and its angle index
    // (32-bit decomposition: the host keeps a block's items under 2^31)
    const unsigned uhv = (unsigned)hv, uH = (unsigned)H, upp = (unsigned)per_pos;
    auto off = [&](int64_t e, int64_t &i0) {
        unsigned ue = (unsigned)e, tp = ue / upp, r = ue - tp * upp, bh = r / uhv, v = r - bh * uhv, bi = bh / uH,
                 h = bh - bi * uH;
        i0 = (int64_t)tp * half + (int64_t)v * N;
        return (((b0 + bi) * T_ + t0 + tp) * H + h) * D + (int64_t)v * N;
    };
    int64_t e = threadIdx.x, i0 = 0;
    uint4 ra = make_uint4(0, 0, 0, 0), rb = ra;
    if (e < items) {
        int64_t o = off(e, i0);
        ra = ld16(x + o);
        rb = ld16(x + o + half);
    }
    rope_angles(cs, sn, half, D, (double)(pos + t0), npos, theta, inverse);
    __syncthreads();
    for (; e < items; e += blockDim.x) {
        const int64_t o = off(e, i0), en = e + blockDim.x;
        uint4 na = ra, nbv = rb;
        if (en < items) {   // the next item's vectors, loaded before this one is written
            int64_t in;
            int64_t on = off(en, in);
            na = ld16(x + on);
            nbv = ld16(x + on + half);
        }
        float a[N], bb[N], ya[N], yb[N];
        unpack(ra, a);
        unpack(rb, bb);
#pragma unroll
        for (int k = 0; k < N; k++) {
            float c = cs[i0 + k], s = sn[i0 + k];
            ya[k] = a[k] * c - bb[k] * s;
            yb[k] = bb[k] * c + a[k] * s;
        }
        st16(out + o, pack(ya));
        st16(out + o + half, pack(yb));
        ra = na;
        rb = nbv;
    }
}

// Any even D and alignment: element pairs.
template <typename T>
__global__ void __launch_bounds__(ROPE_THREADS)
k_rope(T *out, const T *x, int64_t B, int64_t T_, int64_t H, int64_t D, int64_t nb, int64_t pos, double theta,
       int inverse) {
    extern __shared__ float cs[];
    const int64_t t = blockIdx.x, half = D / 2;
    const int64_t b0 = (int64_t)blockIdx.y * nb, b1 = b0 + nb < B ? b0 + nb : B;
    float *sn = cs + half;
    rope_angles(cs, sn, half, D, (double)(pos + t), 1, theta, inverse);
    __syncthreads();
    const int64_t per_b = H * half, items = (b1 - b0) * per_b;
    for (int64_t e = threadIdx.x; e < items; e += blockDim.x) {
        int64_t bi = e / per_b, r = e - bi * per_b, h = r / half, i = r - h * half;
        int64_t o = (((b0 + bi) * T_ + t) * H + h) * D + i;
        float a = to_f32(x[o]), bb = to_f32(x[o + half]);
        float c = cs[i], s = sn[i];
        out[o] = from_f32<T>(a * c - bb * s);
        out[o + half] = from_f32<T>(bb * c + a * s);
    }
}

template <typename T>
static void rope_launch(cuda_dev *d, T *out, const T *x, int64_t B, int64_t T_, int64_t H, int64_t D, int64_t pos,
                        double theta, int inverse) {
    constexpr int N = VEC<T>::N;
    const int64_t half = D / 2;
    const bool vec = half % N == 0 && cuda_aligned16(out) && cuda_aligned16(x);
    // batch rows per block: at least ~8K elements of work per block (the angles are
    // computed once per block), but no fewer than 2 blocks per SM when there is room
    const int64_t per_b = H * D;
    int64_t nb = (8192 + per_b - 1) / per_b;
    if (nb > B) nb = B;
    while (nb > 1 && T_ * ((B + nb - 1) / nb) < 2 * (int64_t)d->sm_count) nb = (nb + 1) / 2;
    while (nb > 1 && nb * H * half >= 2147483647) nb = (nb + 1) / 2;   // 32-bit item indices
    const int64_t chunks = (B + nb - 1) / nb;
    // positions per block (vector path): up to 4 while a block's items fit 32 bits, its
    // angles 16 KB, and there is still at least a block per SM
    int np = 1;
    if (vec)
        while (np < 4 && 2 * np * nb * H * half < 2147483647 && 2 * np * half * 2 * (int64_t)sizeof(float) <= 16384 &&
               (T_ + 2 * np - 1) / (2 * np) * chunks >= (int64_t)d->sm_count)
            np *= 2;
    const int64_t work = np * nb * H * (vec ? half / N : half);
    const int th = work >= ROPE_THREADS ? ROPE_THREADS : work > 64 ? 128 : 64;
    dim3 grid((unsigned)((T_ + np - 1) / np), (unsigned)chunks);
    size_t smem = (size_t)np * half * 2 * sizeof(float);
    if (vec) k_rope_vec<T><<<grid, th, smem, d->stream>>>(out, x, B, T_, H, D, nb, np, pos, theta, inverse);
    else k_rope<T><<<grid, th, smem, d->stream>>>(out, x, B, T_, H, D, nb, pos, theta, inverse);
}

}  // namespace

moe_status cuda_rope(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, int64_t pos_offset, float theta, int inverse) {
    MOE_TRY(cuda_check_float(x->dtype, "rope"));
    int64_t B = x->shape[0], T = x->shape[1], H = x->shape[2], D = x->shape[3];
    if (B == 0 || T == 0 || H == 0 || D == 0) return MOE_OK;
    if (D / 2 > ROPE_MAX_HALF)
        return moe_error(MOE_ERR_SHAPE, "rope on cuda: head dim %lld, at most %d supported", (long long)D,
                         2 * ROPE_MAX_HALF);
    if (T > 2147483647 || B > 65535)
        return moe_error(MOE_ERR_SHAPE, "rope on cuda: B %lld, T %lld too large (B <= 65535, T < 2^31)", (long long)B,
                         (long long)T);
    if (H * (D / 2) >= 2147483647)
        return moe_error(MOE_ERR_SHAPE, "rope on cuda: H %lld x D %lld too large", (long long)H, (long long)D);
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32)
        rope_launch<float>(d, PTR(float, out), PTR(const float, x), B, T, H, D, pos_offset, (double)theta, inverse);
    else
        rope_launch<bf16>(d, PTR(bf16, out), PTR(const bf16, x), B, T, H, D, pos_offset, (double)theta, inverse);
    CU_LAUNCHED("rope");
    return MOE_OK;
}
