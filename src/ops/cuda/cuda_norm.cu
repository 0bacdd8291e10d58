// RMSNorm forward and backward over the last dim: one block per row, f32
// accumulation. The saved rstd may be f32 or the data dtype (S below).
// dw is accumulated deterministically: per-chunk column partials into f32
// scratch, then one pass that sums the chunks in order and adds into dw.
#include "cuda_common.cuh"

template <typename T, typename S>
__global__ void k_rmsnorm(T *y, S *rstd, const T *x, const T *w, int64_t rows, int64_t n, float eps) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        T *yr = y + r * n;
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) { float v = to_f32(xr[j]); ss += v * v; }
        ss = block_sum(ss, sh);
        float rs = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) yr[j] = from_f32<T>(to_f32(xr[j]) * rs * to_f32(w[j]));
        if (threadIdx.x == 0) rstd[r] = from_f32<S>(rs);
    }
}

// dx = r * (dy*w - x * r^2 * mean(dy*w*x))
template <typename T, typename S>
__global__ void k_rmsnorm_dx(T *dx, const T *dy, const T *x, const T *w, const S *rstd, int64_t rows, int64_t n) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *dyr = dy + r * n, *xr = x + r * n;
        T *dxr = dx + r * n;
        float rs = to_f32(rstd[r]);
        float dot = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) dot += to_f32(dyr[j]) * to_f32(w[j]) * to_f32(xr[j]);
        dot = block_sum(dot, sh);
        float c = rs * rs * dot / (float)n;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
            dxr[j] = from_f32<T>(rs * (to_f32(dyr[j]) * to_f32(w[j]) - to_f32(xr[j]) * c));
    }
}

// part[c, j] = sum over rows of chunk c of dy[r, j] * x[r, j] * rstd[r]
template <typename T, typename S>
__global__ void k_rmsnorm_dw_part(float *part, const T *dy, const T *x, const S *rstd, int64_t rows, int64_t n,
                                  int64_t chunk) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float acc = 0.0f;
    for (int64_t r = r0; r < r1; r++) acc += to_f32(dy[r * n + j]) * to_f32(x[r * n + j]) * to_f32(rstd[r]);
    part[blockIdx.y * n + j] = acc;
}

template <typename T>
__global__ void k_dw_sum(T *dw, const float *part, int64_t nchunks, int64_t n) {
    GRID_STRIDE(j, n) {
        float acc = 0.0f;
        for (int64_t c = 0; c < nchunks; c++) acc += part[c * n + j];
        dw[j] = from_f32<T>(to_f32(dw[j]) + acc);
    }
}

#define PTR(T, t) ((T *)moe_tensor_data(t))

static moe_status check_stat(const moe_tensor *x, const moe_tensor *rstd, const char *what) {
    if (rstd->dtype == x->dtype || rstd->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: rstd must be f32 or %s, got %s", what, moe_dtype_name(x->dtype),
                     moe_dtype_name(rstd->dtype));
}

moe_status cuda_rmsnorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                        float eps) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm"));
    MOE_TRY(check_stat(x, rstd, "rmsnorm"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    int th = cuda_row_threads(n);
    unsigned g = cuda_row_grid(rows);
    if (x->dtype == MOE_F32)
        k_rmsnorm<float, float><<<g, th, 0, d->stream>>>(PTR(float, y), PTR(float, rstd), PTR(const float, x),
                                                         PTR(const float, w), rows, n, eps);
    else if (rstd->dtype == MOE_F32)
        k_rmsnorm<bf16, float><<<g, th, 0, d->stream>>>(PTR(bf16, y), PTR(float, rstd), PTR(const bf16, x),
                                                        PTR(const bf16, w), rows, n, eps);
    else
        k_rmsnorm<bf16, bf16><<<g, th, 0, d->stream>>>(PTR(bf16, y), PTR(bf16, rstd), PTR(const bf16, x),
                                                       PTR(const bf16, w), rows, n, eps);
    CU_LAUNCHED("rmsnorm");
    return MOE_OK;
}

template <typename T, typename S>
static moe_status rmsnorm_bwd(cuda_dev *d, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy, const moe_tensor *x,
                              const moe_tensor *w, const moe_tensor *rstd, int64_t rows, int64_t n) {
    int th = cuda_row_threads(n);
    k_rmsnorm_dx<T, S><<<cuda_row_grid(rows), th, 0, d->stream>>>(PTR(T, dx), PTR(const T, dy), PTR(const T, x),
                                                             PTR(const T, w), PTR(const S, rstd), rows, n);
    CU_LAUNCHED("rmsnorm_backward (dx)");
    if (!dw) return MOE_OK;
    int64_t nchunks = rows < 128 ? rows : 128, chunk = (rows + nchunks - 1) / nchunks;
    nchunks = (rows + chunk - 1) / chunk;
    cuda_scratch part(d, (size_t)(nchunks * n) * sizeof(float));
    if (!part.p) return moe_last_status();
    dim3 grid((unsigned)((n + 255) / 256), (unsigned)nchunks);
    k_rmsnorm_dw_part<T, S><<<grid, 256, 0, d->stream>>>((float *)part.p, PTR(const T, dy), PTR(const T, x),
                                                         PTR(const S, rstd), rows, n, chunk);
    CU_LAUNCHED("rmsnorm_backward (dw partials)");
    k_dw_sum<T><<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(PTR(T, dw), (const float *)part.p, nchunks, n);
    CU_LAUNCHED("rmsnorm_backward (dw)");
    return MOE_OK;
}

moe_status cuda_rmsnorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm_backward"));
    MOE_TRY(check_stat(x, rstd, "rmsnorm_backward"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32) return rmsnorm_bwd<float, float>(d, dx, dw, dy, x, w, rstd, rows, n);
    if (rstd->dtype == MOE_F32) return rmsnorm_bwd<bf16, float>(d, dx, dw, dy, x, w, rstd, rows, n);
    return rmsnorm_bwd<bf16, bf16>(d, dx, dw, dy, x, w, rstd, rows, n);
}
