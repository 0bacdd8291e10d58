// Elementwise ops: binary (numpy broadcasting arrives as stride-0 views),
// unary, unary_backward, axpy. Outputs are contiguous; inputs may be strided
// (up to 8 dims, index decomposition per element). Math in f32.
#include "cuda_common.cuh"
#include "cuda_vec.cuh"

__device__ __forceinline__ float bin_apply(int op, float a, float b) {
    switch (op) {
    case MOE_BIN_ADD: return a + b;
    case MOE_BIN_SUB: return a - b;
    case MOE_BIN_MUL: return a * b;
    case MOE_BIN_DIV: return a / b;
    case MOE_BIN_MAX: return a > b ? a : b;   // NaN handling as on the CPU
    default: return a < b ? a : b;   // MOE_BIN_MIN
    }
}

#define GELU_C 0.7978845608028654f    /* sqrt(2/pi) */
#define GELU_K 0.044715f
#define INV_SQRT2 0.7071067811865476f
#define INV_SQRT_2PI 0.3989422804014327f

__device__ __forceinline__ float sigmoidf_(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ __forceinline__ float un_apply(int op, float x, float alpha) {
    switch (op) {
    case MOE_UN_NEG: return -x;
    case MOE_UN_EXP: return expf(x);
    case MOE_UN_LOG: return logf(x);
    case MOE_UN_SQRT: return sqrtf(x);
    case MOE_UN_RSQRT: return 1.0f / sqrtf(x);
    case MOE_UN_ABS: return fabsf(x);
    case MOE_UN_TANH: return tanhf(x);
    case MOE_UN_SIGMOID: return sigmoidf_(x);
    case MOE_UN_RELU: return x > 0.0f ? x : 0.0f;
    case MOE_UN_SILU: return x / (1.0f + expf(-x));
    case MOE_UN_GELU: return 0.5f * x * (1.0f + tanhf(GELU_C * (x + GELU_K * x * x * x)));
    case MOE_UN_GELU_ERF: return 0.5f * x * (1.0f + erff(x * INV_SQRT2));
    case MOE_UN_SQUARE: return x * x;
    case MOE_UN_SCALE: return x * alpha;
    case MOE_UN_ADD_SCALAR: return x + alpha;
    default: return powf(x, alpha);   // MOE_UN_POW_SCALAR
    }
}

// f'(x)
__device__ __forceinline__ float un_deriv(int op, float x, float alpha) {
    switch (op) {
    case MOE_UN_NEG: return -1.0f;
    case MOE_UN_EXP: return expf(x);
    case MOE_UN_LOG: return 1.0f / x;
    case MOE_UN_SQRT: return 0.5f / sqrtf(x);
    case MOE_UN_RSQRT: return -0.5f / (x * sqrtf(x));
    case MOE_UN_ABS: return x > 0.0f ? 1.0f : x < 0.0f ? -1.0f : 0.0f;
    case MOE_UN_TANH: { float t = tanhf(x); return 1.0f - t * t; }
    case MOE_UN_SIGMOID: { float s = sigmoidf_(x); return s * (1.0f - s); }
    case MOE_UN_RELU: return x > 0.0f ? 1.0f : 0.0f;
    case MOE_UN_SILU: { float s = sigmoidf_(x); return s * (1.0f + x * (1.0f - s)); }
    case MOE_UN_GELU: {
        float u = GELU_C * (x + GELU_K * x * x * x), t = tanhf(u);
        return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * GELU_K * x * x);
    }
    case MOE_UN_GELU_ERF: return 0.5f * (1.0f + erff(x * INV_SQRT2)) + x * INV_SQRT_2PI * expf(-0.5f * x * x);
    case MOE_UN_SQUARE: return 2.0f * x;
    case MOE_UN_SCALE: return alpha;
    case MOE_UN_ADD_SCALAR: return 1.0f;
    default: return alpha == 0.0f ? 0.0f : alpha * powf(x, alpha - 1.0f);   // MOE_UN_POW_SCALAR
    }
}

// ---- flat (contiguous) paths: out[i] = f(in0[i], in1[i]) ----
// f is a functor; TWO says whether in1 is read. The vector kernel needs out,
// in0 and in1 16-byte aligned (cuda_aligned16); the scalar one takes anything.
struct f_binary {
    int op;
    __device__ __forceinline__ float operator()(float a, float b) const { return bin_apply(op, a, b); }
};
struct f_unary {
    int op; float alpha;
    __device__ __forceinline__ float operator()(float a, float) const { return un_apply(op, a, alpha); }
};
struct f_unary_bwd {   // in0 = dy, in1 = x
    int op; float alpha;
    __device__ __forceinline__ float operator()(float g, float v) const { return g * un_deriv(op, v, alpha); }
};
struct f_axpy {        // in0 = y, in1 = x
    float alpha;
    __device__ __forceinline__ float operator()(float y, float x) const { return y + alpha * x; }
};

template <typename T, bool TWO, typename F>
__global__ void k_flat(T *out, const T *in0, const T *in1, int64_t n, F f) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(f(to_f32(in0[i]), TWO ? to_f32(in1[i]) : 0.0f));
}

template <typename T, bool TWO, typename F>
__device__ __forceinline__ void flat_vec_one(T *out, const T *in0, const T *in1, int64_t v, const F &f) {
    constexpr int N = VEC<T>::N;
    float a[N], b[N];
    vload(in0 + v * N, a);
    if (TWO) vload(in1 + v * N, b);
#pragma unroll
    for (int k = 0; k < N; k++) a[k] = f(a[k], TWO ? b[k] : 0.0f);
    vstore(out + v * N, a);
}

// Vectors of N elements, two per thread per iteration (both loaded before
// either is stored); the last n % N elements by the first threads of the grid.
// Every element is read and written by one thread, so out may alias in0/in1.
template <typename T, bool TWO, typename F>
__global__ void k_flat_vec(T *out, const T *in0, const T *in1, int64_t n, F f) {
    constexpr int N = VEC<T>::N;
    const int64_t nv = n / N, stride = (int64_t)gridDim.x * blockDim.x;
    const int64_t tid = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    int64_t v = tid;
    for (; v + stride < nv; v += 2 * stride) {
        float a0[N], a1[N], b0[N], b1[N];
        vload(in0 + v * N, a0);
        vload(in0 + (v + stride) * N, a1);
        if (TWO) {
            vload(in1 + v * N, b0);
            vload(in1 + (v + stride) * N, b1);
        }
#pragma unroll
        for (int k = 0; k < N; k++) {
            a0[k] = f(a0[k], TWO ? b0[k] : 0.0f);
            a1[k] = f(a1[k], TWO ? b1[k] : 0.0f);
        }
        vstore(out + v * N, a0);
        vstore(out + (v + stride) * N, a1);
    }
    if (v < nv) flat_vec_one<T, TWO>(out, in0, in1, v, f);
    int64_t e = nv * N + tid;
    if (e < n) out[e] = from_f32<T>(f(to_f32(in0[e]), TWO ? to_f32(in1[e]) : 0.0f));
}

// Launches the flat path: vectorised when every pointer is 16-byte aligned.
template <typename T, bool TWO, typename F>
static void launch_flat(cuda_dev *d, T *out, const T *in0, const T *in1, int64_t n, F f) {
    bool vec = cuda_aligned16(out) && cuda_aligned16(in0) && (!TWO || cuda_aligned16(in1));
    if (vec) {
        int64_t nv = n / VEC<T>::N;
        int64_t work = nv > 0 ? (nv + 1) / 2 : 1;   // two vectors per thread per iteration
        k_flat_vec<T, TWO, F><<<cuda_grid_1d(d, work, 256), 256, 0, d->stream>>>(out, in0, in1, n, f);
    } else {
        k_flat<T, TWO, F><<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(out, in0, in1, n, f);
    }
}

// ---- strided paths (index decomposition per element) ----
template <typename T>
__global__ void k_binary(int op, T *out, const T *a, cuda_layout la, const T *b, cuda_layout lb, int64_t n) {
    GRID_STRIDE(i, n) {
        float x = to_f32(a[cuda_offset(la, i)]), y = to_f32(b[cuda_offset(lb, i)]);
        out[i] = from_f32<T>(bin_apply(op, x, y));
    }
}

template <typename T>
__global__ void k_unary(int op, T *out, const T *x, cuda_layout lx, float alpha, int64_t n) {
    GRID_STRIDE(i, n) out[i] = from_f32<T>(un_apply(op, to_f32(x[cuda_offset(lx, i)]), alpha));
}

template <typename T>
__global__ void k_unary_bwd(int op, T *dx, const T *dy, cuda_layout ldy, const T *x, cuda_layout lx, float alpha,
                            int64_t n) {
    GRID_STRIDE(i, n) {
        float g = to_f32(dy[cuda_offset(ldy, i)]), v = to_f32(x[cuda_offset(lx, i)]);
        dx[i] = from_f32<T>(g * un_deriv(op, v, alpha));
    }
}

#define PTR(T, t) ((T *)moe_tensor_data(t))

moe_status cuda_binary(moe_ctx *ctx, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b) {
    MOE_TRY(cuda_check_float(out->dtype, "binary"));
    int64_t n = moe_tensor_numel(out);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    cuda_layout la = cuda_layout_tensor(a), lb = cuda_layout_tensor(b);
    if (cuda_layout_is_flat(la) && cuda_layout_is_flat(lb)) {
        f_binary f = {(int)op};
        if (out->dtype == MOE_F32) launch_flat<float, true>(d, PTR(float, out), PTR(const float, a), PTR(const float, b), n, f);
        else launch_flat<bf16, true>(d, PTR(bf16, out), PTR(const bf16, a), PTR(const bf16, b), n, f);
    } else {
        unsigned grid = cuda_grid_1d(d, n, 256);
        if (out->dtype == MOE_F32)
            k_binary<float><<<grid, 256, 0, d->stream>>>(op, PTR(float, out), PTR(const float, a), la, PTR(const float, b), lb, n);
        else
            k_binary<bf16><<<grid, 256, 0, d->stream>>>(op, PTR(bf16, out), PTR(const bf16, a), la, PTR(const bf16, b), lb, n);
    }
    CU_LAUNCHED("binary");
    return MOE_OK;
}

moe_status cuda_unary(moe_ctx *ctx, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha) {
    MOE_TRY(cuda_check_float(out->dtype, "unary"));
    int64_t n = moe_tensor_numel(out);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    cuda_layout lx = cuda_layout_tensor(x);
    if (cuda_layout_is_flat(lx)) {
        f_unary f = {(int)op, alpha};
        if (out->dtype == MOE_F32) launch_flat<float, false>(d, PTR(float, out), PTR(const float, x), (const float *)nullptr, n, f);
        else launch_flat<bf16, false>(d, PTR(bf16, out), PTR(const bf16, x), (const bf16 *)nullptr, n, f);
    } else {
        unsigned grid = cuda_grid_1d(d, n, 256);
        if (out->dtype == MOE_F32)
            k_unary<float><<<grid, 256, 0, d->stream>>>(op, PTR(float, out), PTR(const float, x), lx, alpha, n);
        else
            k_unary<bf16><<<grid, 256, 0, d->stream>>>(op, PTR(bf16, out), PTR(const bf16, x), lx, alpha, n);
    }
    CU_LAUNCHED("unary");
    return MOE_OK;
}

moe_status cuda_unary_backward(moe_ctx *ctx, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                               const moe_tensor *x, float alpha) {
    MOE_TRY(cuda_check_float(dx->dtype, "unary_backward"));
    int64_t n = moe_tensor_numel(dx);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dx->device);
    cuda_layout ldy = cuda_layout_tensor(dy), lx = cuda_layout_tensor(x);
    if (cuda_layout_is_flat(ldy) && cuda_layout_is_flat(lx)) {
        f_unary_bwd f = {(int)op, alpha};
        if (dx->dtype == MOE_F32) launch_flat<float, true>(d, PTR(float, dx), PTR(const float, dy), PTR(const float, x), n, f);
        else launch_flat<bf16, true>(d, PTR(bf16, dx), PTR(const bf16, dy), PTR(const bf16, x), n, f);
    } else {
        unsigned grid = cuda_grid_1d(d, n, 256);
        if (dx->dtype == MOE_F32)
            k_unary_bwd<float><<<grid, 256, 0, d->stream>>>(op, PTR(float, dx), PTR(const float, dy), ldy, PTR(const float, x), lx, alpha, n);
        else
            k_unary_bwd<bf16><<<grid, 256, 0, d->stream>>>(op, PTR(bf16, dx), PTR(const bf16, dy), ldy, PTR(const bf16, x), lx, alpha, n);
    }
    CU_LAUNCHED("unary_backward");
    return MOE_OK;
}

// x arrives contiguous (ops.c makes it so) with y's shape: always the flat path.
moe_status cuda_axpy(moe_ctx *ctx, moe_tensor *y, float alpha, const moe_tensor *x) {
    MOE_TRY(cuda_check_float(y->dtype, "axpy"));
    int64_t n = moe_tensor_numel(y);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, y->device);
    f_axpy f = {alpha};
    if (y->dtype == MOE_F32) launch_flat<float, true>(d, PTR(float, y), PTR(const float, y), PTR(const float, x), n, f);
    else launch_flat<bf16, true>(d, PTR(bf16, y), PTR(const bf16, y), PTR(const bf16, x), n, f);
    CU_LAUNCHED("axpy");
    return MOE_OK;
}
