// SwiGLU's per-element arithmetic, shared by the elementwise kernels
// (cuda_swiglu.cu) and the grouped GEMM's fused epilogues
// (cuda_grouped_mma.cu), so both give the same bytes.
#ifndef MOE_CUDA_SWIGLU_CUH
#define MOE_CUDA_SWIGLU_CUH

// The logistic function from the hardware's approximate exp2 and reciprocal:
// a few f32 ulp (far below bf16's rounding) and no branch, so the GEMM
// epilogues interleave their elements. With expf and an IEEE divide, whose
// special cases branch, the TMA kernel's epilogue warps ran one element's
// chain at a time and took twice the tile's multiplications.
__device__ __forceinline__ float swiglu_sigm(float x) { return __fdividef(1.0f, 1.0f + __expf(-x)); }
__device__ __forceinline__ float swiglu_1(float g, float u) { return g * swiglu_sigm(g) * u; }
// dgate = dout * up * s * (1 + g * (1 - s)),  dup = dout * g * s
__device__ __forceinline__ void swiglu_bwd_1(float go, float g, float u, float &dg, float &du) {
    float s = swiglu_sigm(g);
    dg = go * u * s * (1.0f + g * (1.0f - s));
    du = go * g * s;
}

#endif
