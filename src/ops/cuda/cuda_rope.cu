// Rotary position embedding over x [B, T, H, D], rotate-half convention:
//   out[i]        = x[i] cos(p f_i) - x[i + D/2] sin(p f_i)
//   out[i + D/2]  = x[i + D/2] cos(p f_i) + x[i] sin(p f_i),  f_i = theta^(-2i/D), p = pos_offset + t
// inverse rotates by -angle (the backward). One block per (t, b): the block
// first computes cos/sin of its position for the D/2 frequencies in double
// (as the CPU does, so long positions keep their precision) into shared
// memory, then rotates the H heads. Each thread reads both halves of a pair
// before writing them, so out may alias x.
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define ROPE_MAX_HALF 4096

template <typename T>
__global__ void k_rope(T *out, const T *x, int64_t T_, int64_t H, int64_t D, int64_t pos, double theta, int inverse) {
    extern __shared__ float cs[];   // cos then sin, D/2 each
    int64_t t = blockIdx.x, b = blockIdx.y, half = D / 2;
    float *sn = cs + half;
    double p = (double)(pos + t);
    for (int64_t i = threadIdx.x; i < half; i += blockDim.x) {
        double f = pow(theta, -2.0 * (double)i / (double)D);
        double s, c;
        sincos(p * f, &s, &c);
        cs[i] = (float)c;
        sn[i] = (float)(inverse ? -s : s);
    }
    __syncthreads();
    int64_t base = (b * T_ + t) * H * D;
    for (int64_t e = threadIdx.x; e < H * half; e += blockDim.x) {
        int64_t h = e / half, i = e - h * half;
        int64_t o = base + h * D + i;
        float a = to_f32(x[o]), bb = to_f32(x[o + half]);
        float c = cs[i], s = sn[i];
        out[o] = from_f32<T>(a * c - bb * s);
        out[o + half] = from_f32<T>(bb * c + a * s);
    }
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
    CUDA_ENTER(d, ctx, x->device);
    int64_t work = H * (D / 2);
    int th = work >= 256 ? 256 : work > 64 ? 128 : 64;
    dim3 grid((unsigned)T, (unsigned)B);
    size_t smem = (size_t)(D / 2) * 2 * sizeof(float);
    if (x->dtype == MOE_F32)
        k_rope<float><<<grid, th, smem, d->stream>>>(PTR(float, out), PTR(const float, x), T, H, D, pos_offset,
                                                  (double)theta, inverse);
    else
        k_rope<bf16><<<grid, th, smem, d->stream>>>(PTR(bf16, out), PTR(const bf16, x), T, H, D, pos_offset, (double)theta,
                                                 inverse);
    CU_LAUNCHED("rope");
    return MOE_OK;
}
