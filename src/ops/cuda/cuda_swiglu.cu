// SwiGLU: out = silu(gate) * up, and its backward. Flat, contiguous, f32 math.
#include "cuda_common.cuh"

__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

template <typename T>
__global__ void k_swiglu(T *out, const T *gate, const T *up, int64_t n) {
    GRID_STRIDE(i, n) {
        float g = to_f32(gate[i]);
        out[i] = from_f32<T>(g * sigm(g) * to_f32(up[i]));
    }
}

// dgate = dout * up * s * (1 + g * (1 - s)),  dup = dout * g * s
template <typename T>
__global__ void k_swiglu_bwd(T *dgate, T *dup, const T *dout, const T *gate, const T *up, int64_t n) {
    GRID_STRIDE(i, n) {
        float g = to_f32(gate[i]), u = to_f32(up[i]), go = to_f32(dout[i]), s = sigm(g);
        dgate[i] = from_f32<T>(go * u * s * (1.0f + g * (1.0f - s)));
        dup[i] = from_f32<T>(go * g * s);
    }
}

#define PTR(T, t) ((T *)moe_tensor_data(t))

moe_status cuda_swiglu(moe_ctx *ctx, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up) {
    MOE_TRY(cuda_check_float(out->dtype, "swiglu"));
    int64_t n = moe_tensor_numel(out);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    unsigned grid = cuda_grid_1d(d, n, 256);
    if (out->dtype == MOE_F32)
        k_swiglu<float><<<grid, 256, 0, d->stream>>>(PTR(float, out), PTR(const float, gate), PTR(const float, up), n);
    else
        k_swiglu<bf16><<<grid, 256, 0, d->stream>>>(PTR(bf16, out), PTR(const bf16, gate), PTR(const bf16, up), n);
    CU_LAUNCHED("swiglu");
    return MOE_OK;
}

moe_status cuda_swiglu_backward(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                const moe_tensor *gate, const moe_tensor *up) {
    MOE_TRY(cuda_check_float(dgate->dtype, "swiglu_backward"));
    int64_t n = moe_tensor_numel(dgate);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dgate->device);
    unsigned grid = cuda_grid_1d(d, n, 256);
    if (dgate->dtype == MOE_F32)
        k_swiglu_bwd<float><<<grid, 256, 0, d->stream>>>(PTR(float, dgate), PTR(float, dup), PTR(const float, dout),
                                                         PTR(const float, gate), PTR(const float, up), n);
    else
        k_swiglu_bwd<bf16><<<grid, 256, 0, d->stream>>>(PTR(bf16, dgate), PTR(bf16, dup), PTR(const bf16, dout),
                                                        PTR(const bf16, gate), PTR(const bf16, up), n);
    CU_LAUNCHED("swiglu_backward");
    return MOE_OK;
}
