// fill_rand / fill_randn: the counter-based stream of src/core/rng.c on the GPU.
//
// Philox4x32-10 and the mapping of 24 bits to (0, 1) are integer or exact float
// arithmetic, so uniform values are bit-identical to the CPU. The normal values
// use Box-Muller with logf, sinf and cosf: CUDA's precise versions (this file
// is built without fast-math) are within 1 ulp (logf) and 2 ulp (sinf, cosf) of
// the exact result and glibc's within about 1 ulp, so a normal value may differ
// from the CPU's by a few ulp (relative error below 1e-6 of max(1, |x|)).
// The final affine maps use __fmul_rn / __fadd_rn so nvcc does not contract
// them into an FMA that the CPU (built with -std=c11, no contraction) lacks:
//   randn: mean + std * z          rand: lo + (hi - lo) * u
#include "cuda_common.cuh"

__device__ __forceinline__ uint4 philox4x32(uint64_t counter, uint64_t key) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
#pragma unroll
    for (int r = 0; r < 10; r++) {
        uint32_t lo0 = 0xD2511F53u * c0, hi0 = __umulhi(0xD2511F53u, c0);
        uint32_t lo1 = 0xCD9E8D57u * c2, hi1 = __umulhi(0xCD9E8D57u, c2);
        uint32_t n0 = hi1 ^ c1 ^ k0;
        uint32_t n2 = hi0 ^ c3 ^ k1;
        c1 = lo1; c3 = lo0;
        c0 = n0; c2 = n2;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    return make_uint4(c0, c1, c2, c3);
}

__device__ __forceinline__ float u32_to_unit(uint32_t x) {
    return __fmul_rn(__fadd_rn((float)(x >> 8), 0.5f), 1.0f / 16777216.0f);
}

__device__ __forceinline__ uint32_t lane_of(uint4 b, int lane) {
    return lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w;
}

__device__ __forceinline__ float uniform_at(uint64_t key, uint64_t index) {
    uint4 b = philox4x32(index >> 2, key);
    return u32_to_unit(lane_of(b, (int)(index & 3)));
}

__device__ __forceinline__ float normal_at(uint64_t key, uint64_t index) {
    uint4 b = philox4x32(index >> 2, key);
    int lane = (int)(index & 3);
    float u1 = u32_to_unit((lane & 2) ? b.z : b.x), u2 = u32_to_unit((lane & 2) ? b.w : b.y);
    float r = sqrtf(__fmul_rn(-2.0f, logf(u1)));
    float th = __fmul_rn(6.28318530717958647692f, u2);
    return (lane & 1) ? __fmul_rn(r, sinf(th)) : __fmul_rn(r, cosf(th));
}

template <typename T>
__global__ void k_randn(T *out, int64_t n, uint64_t key, uint64_t offset, float mean, float std) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(__fadd_rn(mean, __fmul_rn(std, normal_at(key, offset + (uint64_t)i))));
}

template <typename T>
__global__ void k_rand(T *out, int64_t n, uint64_t key, uint64_t offset, float lo, float hi) {
    float span = __fsub_rn(hi, lo);
    GRID_STRIDE(i, n) out[i] = from_f32<T>(__fadd_rn(lo, __fmul_rn(span, uniform_at(key, offset + (uint64_t)i))));
}

moe_status cuda_fill_randn(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float mean, float std) {
    MOE_TRY(cuda_check_float(t->dtype, "fill_randn"));
    int64_t n = moe_tensor_numel(t);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, t->device);
    unsigned grid = cuda_grid_1d(d, n, 256);
    if (t->dtype == MOE_F32) k_randn<float><<<grid, 256, 0, d->stream>>>(moe_f32(t), n, key, offset, mean, std);
    else k_randn<bf16><<<grid, 256, 0, d->stream>>>((bf16 *)moe_tensor_data(t), n, key, offset, mean, std);
    CU_LAUNCHED("fill_randn");
    return MOE_OK;
}

moe_status cuda_fill_rand(moe_ctx *ctx, moe_tensor *t, uint64_t key, uint64_t offset, float lo, float hi) {
    MOE_TRY(cuda_check_float(t->dtype, "fill_rand"));
    int64_t n = moe_tensor_numel(t);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, t->device);
    unsigned grid = cuda_grid_1d(d, n, 256);
    if (t->dtype == MOE_F32) k_rand<float><<<grid, 256, 0, d->stream>>>(moe_f32(t), n, key, offset, lo, hi);
    else k_rand<bf16><<<grid, 256, 0, d->stream>>>((bf16 *)moe_tensor_data(t), n, key, offset, lo, hi);
    CU_LAUNCHED("fill_rand");
    return MOE_OK;
}
