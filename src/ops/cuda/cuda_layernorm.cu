// LayerNorm forward and backward over the last dim: one block per row, f32
// accumulation (two passes over the row for the mean and the variance, as the
// CPU does). The saved mean and rstd may be f32 or the data dtype (S below;
// both the same). dw and db are accumulated deterministically: per-chunk
// column partials into f32 scratch, then one pass that sums the chunks in
// order and adds into dw / db (no atomics).
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))

template <typename T, typename S>
__global__ void k_ln_fwd(T *y, S *mean, S *rstd, const T *x, const T *w, const T *b, int64_t rows, int64_t n,
                         float eps) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        T *yr = y + r * n;
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += to_f32(xr[j]);
        float mu = block_sum(s, sh) / (float)n;
        float v = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) { float t = to_f32(xr[j]) - mu; v += t * t; }
        float rs = 1.0f / sqrtf(block_sum(v, sh) / (float)n + eps);
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            float o = (to_f32(xr[j]) - mu) * rs * to_f32(w[j]);
            if (b) o += to_f32(b[j]);
            yr[j] = from_f32<T>(o);
        }
        if (threadIdx.x == 0) { mean[r] = from_f32<S>(mu); rstd[r] = from_f32<S>(rs); }
    }
}

// dx = rstd * (g - mean(g) - xhat * mean(g xhat)),  g = dy * w
template <typename T, typename S>
__global__ void k_ln_dx(T *dx, const T *dy, const T *x, const T *w, const S *mean, const S *rstd, int64_t rows,
                        int64_t n) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *dyr = dy + r * n, *xr = x + r * n;
        T *dxr = dx + r * n;
        float mu = to_f32(mean[r]), rs = to_f32(rstd[r]);
        float a1 = 0.0f, a2 = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            float g = to_f32(dyr[j]) * to_f32(w[j]);
            a1 += g;
            a2 += g * (to_f32(xr[j]) - mu) * rs;
        }
        float mg = block_sum(a1, sh) / (float)n;
        float mgx = block_sum(a2, sh) / (float)n;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
            float xh = (to_f32(xr[j]) - mu) * rs;
            dxr[j] = from_f32<T>(rs * (to_f32(dyr[j]) * to_f32(w[j]) - mg - xh * mgx));
        }
    }
}

// pw[c, j] = sum over the rows of chunk c of dy * xhat, pb[c, j] = of dy
template <typename T, typename S>
__global__ void k_ln_param_part(float *pw, float *pb, const T *dy, const T *x, const S *mean, const S *rstd,
                                int64_t rows, int64_t n, int64_t chunk) {
    int64_t j = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= n) return;
    int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float aw = 0.0f, ab = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        float g = to_f32(dy[r * n + j]);
        aw += g * (to_f32(x[r * n + j]) - to_f32(mean[r])) * to_f32(rstd[r]);
        ab += g;
    }
    if (pw) pw[blockIdx.y * n + j] = aw;
    if (pb) pb[blockIdx.y * n + j] = ab;
}

template <typename T>
__global__ void k_ln_param_sum(T *p, const float *part, int64_t nchunks, int64_t n) {
    GRID_STRIDE(j, n) {
        float acc = 0.0f;
        for (int64_t c = 0; c < nchunks; c++) acc += part[c * n + j];
        p[j] = from_f32<T>(to_f32(p[j]) + acc);
    }
}

moe_status check_stats(const moe_tensor *x, const moe_tensor *mean, const moe_tensor *rstd, const char *what) {
    if ((mean->dtype == x->dtype || mean->dtype == MOE_F32) && mean->dtype == rstd->dtype) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: mean and rstd must both be f32 or both %s, got %s and %s", what,
                     moe_dtype_name(x->dtype), moe_dtype_name(mean->dtype), moe_dtype_name(rstd->dtype));
}

template <typename T, typename S>
void ln_fwd(cuda_dev *d, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
            const moe_tensor *b, int64_t rows, int64_t n, float eps) {
    k_ln_fwd<T, S><<<cuda_row_grid(rows), cuda_row_threads(n), 0, d->stream>>>(
        PTR(T, y), PTR(S, mean), PTR(S, rstd), PTR(const T, x), PTR(const T, w), b ? PTR(const T, b) : nullptr, rows,
        n, eps);
}

template <typename T, typename S>
moe_status ln_bwd(cuda_dev *d, moe_tensor *dx, moe_tensor *dw, moe_tensor *db, const moe_tensor *dy,
                  const moe_tensor *x, const moe_tensor *w, const moe_tensor *mean, const moe_tensor *rstd, int64_t rows,
                  int64_t n) {
    k_ln_dx<T, S><<<cuda_row_grid(rows), cuda_row_threads(n), 0, d->stream>>>(
        PTR(T, dx), PTR(const T, dy), PTR(const T, x), PTR(const T, w), PTR(const S, mean), PTR(const S, rstd), rows, n);
    CU_LAUNCHED("layernorm_backward (dx)");
    if (!dw && !db) return MOE_OK;
    int64_t nchunks = rows < 128 ? rows : 128, chunk = (rows + nchunks - 1) / nchunks;
    nchunks = (rows + chunk - 1) / chunk;
    size_t one = (size_t)(nchunks * n);
    cuda_scratch part(d, one * sizeof(float) * 2);
    if (!part.p) return moe_last_status();
    float *pw = dw ? (float *)part.p : nullptr, *pb = db ? (float *)part.p + one : nullptr;
    dim3 grid((unsigned)((n + 255) / 256), (unsigned)nchunks);
    k_ln_param_part<T, S><<<grid, 256, 0, d->stream>>>(pw, pb, PTR(const T, dy), PTR(const T, x), PTR(const S, mean),
                                                       PTR(const S, rstd), rows, n, chunk);
    CU_LAUNCHED("layernorm_backward (parameter partials)");
    if (dw) {
        k_ln_param_sum<T><<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(PTR(T, dw), pw, nchunks, n);
        CU_LAUNCHED("layernorm_backward (dw)");
    }
    if (db) {
        k_ln_param_sum<T><<<cuda_grid_1d(d, n, 256), 256, 0, d->stream>>>(PTR(T, db), pb, nchunks, n);
        CU_LAUNCHED("layernorm_backward (db)");
    }
    return MOE_OK;
}

}  // namespace

moe_status cuda_layernorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *mean, moe_tensor *rstd, const moe_tensor *x,
                          const moe_tensor *w, const moe_tensor *b, float eps) {
    MOE_TRY(cuda_check_float(x->dtype, "layernorm"));
    MOE_TRY(check_stats(x, mean, rstd, "layernorm"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32) ln_fwd<float, float>(d, y, mean, rstd, x, w, b, rows, n, eps);
    else if (mean->dtype == MOE_F32) ln_fwd<bf16, float>(d, y, mean, rstd, x, w, b, rows, n, eps);
    else ln_fwd<bf16, bf16>(d, y, mean, rstd, x, w, b, rows, n, eps);
    CU_LAUNCHED("layernorm");
    return MOE_OK;
}

moe_status cuda_layernorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, moe_tensor *db, const moe_tensor *dy,
                                   const moe_tensor *x, const moe_tensor *w, const moe_tensor *mean,
                                   const moe_tensor *rstd) {
    MOE_TRY(cuda_check_float(x->dtype, "layernorm_backward"));
    MOE_TRY(check_stats(x, mean, rstd, "layernorm_backward"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32) return ln_bwd<float, float>(d, dx, dw, db, dy, x, w, mean, rstd, rows, n);
    if (mean->dtype == MOE_F32) return ln_bwd<bf16, float>(d, dx, dw, db, dy, x, w, mean, rstd, rows, n);
    return ln_bwd<bf16, bf16>(d, dx, dw, db, dy, x, w, mean, rstd, rows, n);
}
