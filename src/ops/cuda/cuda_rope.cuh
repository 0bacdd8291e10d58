// The rotary angles shared by the rope kernels (cuda_rope.cu) and the fused
// RMSNorm + rope of QK-norm (cuda_norm_rope.cu): computed in double, as the
// CPU does, so long positions keep their precision.
#ifndef MOE_CUDA_ROPE_CUH
#define MOE_CUDA_ROPE_CUH

#include "cuda_common.cuh"

// cos and sin of positions p0 .. p0 + np - 1 for the D/2 frequencies, position-major
// (block-wide: every thread of the block takes part)
__device__ __forceinline__ void rope_angles(float *cs, float *sn, int64_t half, int64_t D, double p0, int64_t np,
                                            double theta, int inverse) {
    for (int64_t j = threadIdx.x; j < np * half; j += blockDim.x) {
        int64_t tp = j / half, i = j - tp * half;
        double f = pow(theta, -2.0 * (double)i / (double)D);
        double s, c;
        sincos((p0 + (double)tp) * f, &s, &c);
        cs[j] = (float)c;
        sn[j] = (float)(inverse ? -s : s);
    }
}

#endif
