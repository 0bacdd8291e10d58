// 16-byte vector access for the memory-bound kernels (elementwise, loss, norm,
// rope): VEC<T>::N elements of T in one uint4 (8 bf16 or 4 f32), converted
// to and from f32 registers. A vector path needs every pointer it touches
// 16-byte aligned (cuda_aligned16) and vector indices that stay on vector
// boundaries; the callers fall back to scalar code otherwise.
#ifndef MOE_CUDA_VEC_CUH
#define MOE_CUDA_VEC_CUH

#include "cuda_common.cuh"

template <typename T> struct VEC;
template <> struct VEC<float> { static constexpr int N = 4; };
template <> struct VEC<bf16> { static constexpr int N = 8; };

static inline bool cuda_aligned16(const void *p) { return ((uintptr_t)p & 15u) == 0; }

// Raw 16-byte load / store (p 16-byte aligned).
__device__ __forceinline__ uint4 ld16(const void *p) { return *reinterpret_cast<const uint4 *>(p); }
__device__ __forceinline__ void st16(void *p, uint4 v) { *reinterpret_cast<uint4 *>(p) = v; }
// Streaming variants (evict-first): data read or written once.
__device__ __forceinline__ uint4 ld16_cs(const void *p) { return __ldcs(reinterpret_cast<const uint4 *>(p)); }
__device__ __forceinline__ void st16_cs(void *p, uint4 v) { __stcs(reinterpret_cast<uint4 *>(p), v); }

// uint4 <-> f32 registers
__device__ __forceinline__ void unpack(uint4 u, float (&f)[4]) {
    f[0] = __uint_as_float(u.x); f[1] = __uint_as_float(u.y);
    f[2] = __uint_as_float(u.z); f[3] = __uint_as_float(u.w);
}
__device__ __forceinline__ void unpack(uint4 u, float (&f)[8]) {
    const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int k = 0; k < 4; k++) {
        f[2 * k] = __uint_as_float(w[k] << 16);              // bf16 -> f32 is exact: the high half
        f[2 * k + 1] = __uint_as_float(w[k] & 0xffff0000u);
    }
}
__device__ __forceinline__ uint4 pack(const float (&f)[4]) {
    return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]), __float_as_uint(f[3]));
}
__device__ __forceinline__ unsigned pack2_bf16(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);   // .x (low half) = lo, round to nearest even
    return *reinterpret_cast<unsigned *>(&h);
}
__device__ __forceinline__ uint4 pack(const float (&f)[8]) {
    return make_uint4(pack2_bf16(f[0], f[1]), pack2_bf16(f[2], f[3]), pack2_bf16(f[4], f[5]), pack2_bf16(f[6], f[7]));
}

// Typed: N elements of T at p (16-byte aligned) as f32, and back.
template <typename T> __device__ __forceinline__ void vload(const T *p, float (&f)[VEC<T>::N]) { unpack(ld16(p), f); }
template <typename T> __device__ __forceinline__ void vload_cs(const T *p, float (&f)[VEC<T>::N]) {
    unpack(ld16_cs(p), f);
}
template <typename T> __device__ __forceinline__ void vstore(T *p, const float (&f)[VEC<T>::N]) { st16(p, pack(f)); }
template <typename T> __device__ __forceinline__ void vstore_cs(T *p, const float (&f)[VEC<T>::N]) {
    st16_cs(p, pack(f));
}

#endif
