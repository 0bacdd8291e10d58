// SwiGLU: out = silu(gate) * up, and its backward. Flat, contiguous, f32 math.
// 16-byte vector accesses where every pointer is aligned (the expert
// activations: 2 x 32 MB in, 32 MB out per MoE layer of the step model, where
// the scalar kernel ran at ~1.4 TB/s); a scalar kernel for the tail and for
// unaligned views. Both compute each element with the same operations.
#include "cuda_common.cuh"
#include "cuda_vec.cuh"

#include "cuda_swiglu.cuh"

template <typename T>
__global__ void k_swiglu(T *out, const T *gate, const T *up, int64_t n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(swiglu_1(to_f32(gate[i]), to_f32(up[i])));
}

template <typename T>
__global__ void k_swiglu_vec(T *out, const T *gate, const T *up, int64_t nv) {
    constexpr int N = VEC<T>::N;
    GRID_STRIDE(i, nv) {
        float g[N], u[N];
        vload_cs(gate + i * N, g);
        vload_cs(up + i * N, u);
#pragma unroll
        for (int k = 0; k < N; k++) g[k] = swiglu_1(g[k], u[k]);
        vstore(out + i * N, g);
    }
}

// H: also write the forward's activation silu(gate) * up into h (the experts'
// backward, which does not keep it, reads gate and up here anyway)
template <typename T, bool H>
__global__ void k_swiglu_bwd(T *dgate, T *dup, T *h, const T *dout, const T *gate, const T *up, int64_t n) {
    GRID_STRIDE(i, n) {
        float dg, du, g = to_f32(gate[i]), u = to_f32(up[i]);
        if (H) h[i] = from_f32<T>(swiglu_1(g, u));
        swiglu_bwd_1(to_f32(dout[i]), g, u, dg, du);
        dgate[i] = from_f32<T>(dg);
        dup[i] = from_f32<T>(du);
    }
}

template <typename T, bool H>
__global__ void k_swiglu_bwd_vec(T *dgate, T *dup, T *h, const T *dout, const T *gate, const T *up, int64_t nv) {
    constexpr int N = VEC<T>::N;
    GRID_STRIDE(i, nv) {
        float go[N], g[N], u[N];
        vload_cs(dout + i * N, go);
        vload_cs(gate + i * N, g);
        vload_cs(up + i * N, u);
        if (H) {
            float a[N];
#pragma unroll
            for (int k = 0; k < N; k++) a[k] = swiglu_1(g[k], u[k]);
            vstore(h + i * N, a);
        }
#pragma unroll
        for (int k = 0; k < N; k++) swiglu_bwd_1(go[k], g[k], u[k], g[k], u[k]);
        vstore(dgate + i * N, g);
        vstore(dup + i * N, u);
    }
}

#define PTR(T, t) ((T *)moe_tensor_data(t))

template <typename T>
static void swiglu_fwd(cuda_dev *d, T *out, const T *gate, const T *up, int64_t n) {
    constexpr int N = VEC<T>::N;
    int64_t nv = cuda_aligned16(out) && cuda_aligned16(gate) && cuda_aligned16(up) ? n / N : 0, done = nv * N;
    if (nv > 0) k_swiglu_vec<T><<<cuda_grid_1d(d, nv, 256), 256, 0, d->stream>>>(out, gate, up, nv);
    if (done < n) k_swiglu<T><<<cuda_grid_1d(d, n - done, 256), 256, 0, d->stream>>>(out + done, gate + done, up + done, n - done);
}

template <typename T, bool H>
static void swiglu_bwd(cuda_dev *d, T *dgate, T *dup, T *h, const T *dout, const T *gate, const T *up, int64_t n) {
    constexpr int N = VEC<T>::N;
    bool al = cuda_aligned16(dgate) && cuda_aligned16(dup) && cuda_aligned16(dout) && cuda_aligned16(gate) &&
              cuda_aligned16(up) && (!H || cuda_aligned16(h));
    int64_t nv = al ? n / N : 0, done = nv * N;
    if (nv > 0)
        k_swiglu_bwd_vec<T, H><<<cuda_grid_1d(d, nv, 256), 256, 0, d->stream>>>(dgate, dup, h, dout, gate, up, nv);
    if (done < n)
        k_swiglu_bwd<T, H><<<cuda_grid_1d(d, n - done, 256), 256, 0, d->stream>>>(
            dgate + done, dup + done, H ? h + done : h, dout + done, gate + done, up + done, n - done);
}

moe_status cuda_swiglu(moe_ctx *ctx, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up) {
    MOE_TRY(cuda_check_float(out->dtype, "swiglu"));
    int64_t n = moe_tensor_numel(out);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    if (out->dtype == MOE_F32) swiglu_fwd(d, PTR(float, out), PTR(const float, gate), PTR(const float, up), n);
    else swiglu_fwd(d, PTR(bf16, out), PTR(const bf16, gate), PTR(const bf16, up), n);
    CU_LAUNCHED("swiglu");
    return MOE_OK;
}

template <typename T>
static void swiglu_bwd_any(cuda_dev *d, moe_tensor *dgate, moe_tensor *dup, moe_tensor *h, const moe_tensor *dout,
                           const moe_tensor *gate, const moe_tensor *up, int64_t n) {
    if (h)
        swiglu_bwd<T, true>(d, PTR(T, dgate), PTR(T, dup), PTR(T, h), PTR(const T, dout), PTR(const T, gate),
                            PTR(const T, up), n);
    else
        swiglu_bwd<T, false>(d, PTR(T, dgate), PTR(T, dup), nullptr, PTR(const T, dout), PTR(const T, gate),
                             PTR(const T, up), n);
}

// h (optional, the shape and dtype of gate, not aliasing any other argument):
// also gets silu(gate) * up, with swiglu's bytes
moe_status cuda_swiglu_backward_h(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, moe_tensor *h,
                                  const moe_tensor *dout, const moe_tensor *gate, const moe_tensor *up) {
    MOE_TRY(cuda_check_float(dgate->dtype, "swiglu_backward"));
    int64_t n = moe_tensor_numel(dgate);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dgate->device);
    if (dgate->dtype == MOE_F32) swiglu_bwd_any<float>(d, dgate, dup, h, dout, gate, up, n);
    else swiglu_bwd_any<bf16>(d, dgate, dup, h, dout, gate, up, n);
    CU_LAUNCHED("swiglu_backward");
    return MOE_OK;
}

moe_status cuda_swiglu_backward(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                const moe_tensor *gate, const moe_tensor *up) {
    return cuda_swiglu_backward_h(ctx, dgate, dup, NULL, dout, gate, up);
}
