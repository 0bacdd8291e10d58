// Softmax family over the last dim: one block per row (32..256 threads), f32
// accumulation, inputs and outputs contiguous.
#include "cuda_common.cuh"

enum { SM_SOFTMAX, SM_LOG_SOFTMAX };

// Row max and sum of exp(x - max); max is 0 for a row of all -inf so the
// result is a clean -inf log-sum-exp instead of NaN.
template <typename T>
__device__ __forceinline__ void row_max_sum(const T *x, int64_t n, float *sh, float *m_out, float *s_out) {
    float m = -INFINITY;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, to_f32(x[j]));
    m = block_max(m, sh);
    if (m == -INFINITY) m = 0.0f;
    float s = 0.0f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(to_f32(x[j]) - m);
    *s_out = block_sum(s, sh);
    *m_out = m;
}

template <typename T>
__global__ void k_softmax(int mode, T *y, const T *x, int64_t rows, int64_t n) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        T *yr = y + r * n;
        float m, s;
        row_max_sum(xr, n, sh, &m, &s);
        if (mode == SM_SOFTMAX) {
            float inv = 1.0f / s;
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(expf(to_f32(xr[j]) - m) * inv);
        } else {
            float lse = m + logf(s);
            for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) - lse);
        }
    }
}

template <typename T>
__global__ void k_logsumexp(T *out, const T *x, int64_t rows, int64_t n) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        float m, s;
        row_max_sum(x + r * n, n, sh, &m, &s);
        if (threadIdx.x == 0) out[r] = from_f32<T>(m + logf(s));
    }
}

// softmax:     dx = y * (dy - sum(dy * y))
// log_softmax: dx = dy - exp(y) * sum(dy)
template <typename T>
__global__ void k_softmax_bwd(int mode, T *dx, const T *dy, const T *y, int64_t rows, int64_t n) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *dyr = dy + r * n, *yr = y + r * n;
        T *dxr = dx + r * n;
        float acc = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            acc += mode == SM_SOFTMAX ? to_f32(dyr[j]) * to_f32(yr[j]) : to_f32(dyr[j]);
        acc = block_sum(acc, sh);
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            float g = to_f32(dyr[j]), v = to_f32(yr[j]);
            dxr[j] = from_f32<T>(mode == SM_SOFTMAX ? v * (g - acc) : g - expf(v) * acc);
        }
    }
}

static moe_status softmax_fwd(moe_ctx *ctx, int mode, moe_tensor *y, const moe_tensor *x, const char *what) {
    MOE_TRY(cuda_check_float(y->dtype, what));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, y->device);
    int th = cuda_row_threads(n);
    if (y->dtype == MOE_F32)
        k_softmax<float><<<cuda_row_grid(rows), th, 0, d->stream>>>(mode, moe_f32(y), moe_f32(x), rows, n);
    else
        k_softmax<bf16><<<cuda_row_grid(rows), th, 0, d->stream>>>(mode, (bf16 *)moe_tensor_data(y),
                                                              (const bf16 *)moe_tensor_data(x), rows, n);
    CU_LAUNCHED(what);
    return MOE_OK;
}

static moe_status softmax_bwd(moe_ctx *ctx, int mode, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y,
                              const char *what) {
    MOE_TRY(cuda_check_float(dx->dtype, what));
    int64_t n = cuda_last_dim(y), rows = cuda_rows(y);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dx->device);
    int th = cuda_row_threads(n);
    if (dx->dtype == MOE_F32)
        k_softmax_bwd<float><<<cuda_row_grid(rows), th, 0, d->stream>>>(mode, moe_f32(dx), moe_f32(dy), moe_f32(y), rows, n);
    else
        k_softmax_bwd<bf16><<<cuda_row_grid(rows), th, 0, d->stream>>>(mode, (bf16 *)moe_tensor_data(dx),
                                                                  (const bf16 *)moe_tensor_data(dy),
                                                                  (const bf16 *)moe_tensor_data(y), rows, n);
    CU_LAUNCHED(what);
    return MOE_OK;
}

moe_status cuda_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return softmax_fwd(ctx, SM_SOFTMAX, y, x, "softmax");
}
moe_status cuda_log_softmax(moe_ctx *ctx, moe_tensor *y, const moe_tensor *x) {
    return softmax_fwd(ctx, SM_LOG_SOFTMAX, y, x, "log_softmax");
}
moe_status cuda_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return softmax_bwd(ctx, SM_SOFTMAX, dx, dy, y, "softmax_backward");
}
moe_status cuda_log_softmax_backward(moe_ctx *ctx, moe_tensor *dx, const moe_tensor *dy, const moe_tensor *y) {
    return softmax_bwd(ctx, SM_LOG_SOFTMAX, dx, dy, y, "log_softmax_backward");
}

moe_status cuda_logsumexp(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x) {
    MOE_TRY(cuda_check_float(x->dtype, "logsumexp"));
    int64_t n = cuda_last_dim(x), rows = moe_tensor_numel(out);
    if (rows == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (n == 0) return cuda_fill(ctx, out, -INFINITY);
    int th = cuda_row_threads(n);
    if (x->dtype == MOE_F32)
        k_logsumexp<float><<<cuda_row_grid(rows), th, 0, d->stream>>>(moe_f32(out), moe_f32(x), rows, n);
    else
        k_logsumexp<bf16><<<cuda_row_grid(rows), th, 0, d->stream>>>((bf16 *)moe_tensor_data(out),
                                                                (const bf16 *)moe_tensor_data(x), rows, n);
    CU_LAUNCHED("logsumexp");
    return MOE_OK;
}
