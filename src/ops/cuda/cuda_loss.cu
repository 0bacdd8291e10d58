// Cross entropy over rows of logits [N, V] with i64 targets [N]; reads the
// logits in their own dtype (no f32 copy), f32 accumulation, one block per row.
// loss and lse may be f32 or the logits' dtype (S below).
// A target outside [0, V) that is not ignore_index gives a NaN loss for its row
// (and NaN gradients): reporting it would need a host sync.
#include "cuda_common.cuh"

template <typename T, typename S>
__global__ void k_xent(S *loss, S *lse, const T *x, const int64_t *tgt, int64_t rows, int64_t n, int64_t ignore) {
    __shared__ float sh[32];
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        float m = -INFINITY;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) m = fmaxf(m, to_f32(xr[j]));
        m = block_max(m, sh);
        if (m == -INFINITY) m = 0.0f;
        float s = 0.0f;
        for (int64_t j = threadIdx.x; j < n; j += blockDim.x) s += expf(to_f32(xr[j]) - m);
        s = block_sum(s, sh);
        if (threadIdx.x == 0) {
            float l = m + logf(s);
            int64_t t = tgt[r];
            float v = t == ignore ? 0.0f : (t < 0 || t >= n) ? NAN : l - to_f32(xr[t]);
            lse[r] = from_f32<S>(l);
            loss[r] = from_f32<S>(v);
        }
    }
}

// dlogits[r, j] = scale * (exp(x - lse[r]) - [j == t_r]), 0 for ignored rows
template <typename T, typename S>
__global__ void k_xent_bwd(T *dx, const T *x, const S *lse, const int64_t *tgt, int64_t total, int64_t n,
                           int64_t ignore, float scale) {
    GRID_STRIDE(i, total) {
        int64_t r = i / n, j = i - r * n, t = tgt[r];
        float g;
        if (t == ignore) g = 0.0f;
        else if (t < 0 || t >= n) g = NAN;
        else g = scale * (expf(to_f32(x[i]) - to_f32(lse[r])) - (j == t ? 1.0f : 0.0f));
        dx[i] = from_f32<T>(g);
    }
}

#define PTR(T, t) ((T *)moe_tensor_data(t))

static moe_status check_stat(const moe_tensor *x, const moe_tensor *s, const char *what) {
    if (s->dtype == x->dtype || s->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: loss and lse must be f32 or %s, got %s", what,
                     moe_dtype_name(x->dtype), moe_dtype_name(s->dtype));
}

moe_status cuda_cross_entropy(moe_ctx *ctx, moe_tensor *loss, moe_tensor *lse, const moe_tensor *logits,
                              const moe_tensor *targets, int64_t ignore_index) {
    MOE_TRY(cuda_check_float(logits->dtype, "cross_entropy"));
    MOE_TRY(check_stat(logits, loss, "cross_entropy"));
    if (lse->dtype != loss->dtype)
        return moe_error(MOE_ERR_DTYPE, "cross_entropy on cuda: loss (%s) and lse (%s) must share a dtype",
                         moe_dtype_name(loss->dtype), moe_dtype_name(lse->dtype));
    int64_t n = cuda_last_dim(logits), rows = cuda_rows(logits);
    if (rows == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, logits->device);
    int th = cuda_row_threads(n);
    unsigned g = cuda_row_grid(rows);
    const int64_t *t = PTR(const int64_t, targets);
    if (logits->dtype == MOE_F32)
        k_xent<float, float><<<g, th, 0, d->stream>>>(PTR(float, loss), PTR(float, lse), PTR(const float, logits), t,
                                                      rows, n, ignore_index);
    else if (loss->dtype == MOE_F32)
        k_xent<bf16, float><<<g, th, 0, d->stream>>>(PTR(float, loss), PTR(float, lse), PTR(const bf16, logits), t,
                                                     rows, n, ignore_index);
    else
        k_xent<bf16, bf16><<<g, th, 0, d->stream>>>(PTR(bf16, loss), PTR(bf16, lse), PTR(const bf16, logits), t,
                                                    rows, n, ignore_index);
    CU_LAUNCHED("cross_entropy");
    return MOE_OK;
}

moe_status cuda_cross_entropy_backward(moe_ctx *ctx, moe_tensor *dlogits, const moe_tensor *logits,
                                       const moe_tensor *lse, const moe_tensor *targets, int64_t ignore_index,
                                       float scale) {
    MOE_TRY(cuda_check_float(logits->dtype, "cross_entropy_backward"));
    MOE_TRY(check_stat(logits, lse, "cross_entropy_backward"));
    int64_t n = cuda_last_dim(logits), total = moe_tensor_numel(logits);
    if (total == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, logits->device);
    unsigned g = cuda_grid_1d(d, total, 256);
    const int64_t *t = PTR(const int64_t, targets);
    if (logits->dtype == MOE_F32)
        k_xent_bwd<float, float><<<g, 256, 0, d->stream>>>(PTR(float, dlogits), PTR(const float, logits),
                                                           PTR(const float, lse), t, total, n, ignore_index, scale);
    else if (lse->dtype == MOE_F32)
        k_xent_bwd<bf16, float><<<g, 256, 0, d->stream>>>(PTR(bf16, dlogits), PTR(const bf16, logits),
                                                          PTR(const float, lse), t, total, n, ignore_index, scale);
    else
        k_xent_bwd<bf16, bf16><<<g, 256, 0, d->stream>>>(PTR(bf16, dlogits), PTR(const bf16, logits),
                                                         PTR(const bf16, lse), t, total, n, ignore_index, scale);
    CU_LAUNCHED("cross_entropy_backward");
    return MOE_OK;
}
