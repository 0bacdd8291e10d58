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

// ---- the SwiGLU backward with the MoE combine's weights folded in, by rows ----
// After a plain GEMM dh = dy W (dy: each expert row's token gradient,
// unweighted), a warp per row r does what the own kernel's epilogue does
// (cuda_grouped_epilogue.cuh store_swiglu_bwd_w) with dh already rounded:
// h = swiglu(g, u) rounded (the forward's activation), dw[r] = dh . h (lane
// partials in column order, then the warp's fixed tree), dh' = w dh rounded
// meets g and u for dgate and dup, and w h goes to hw. Rows of bf16, de a
// multiple of 8, every pointer 16-byte aligned (the caller checks).
#define SBW_UNROLL 4   // 16-byte pieces a lane has in flight

template <typename TW>
__global__ void k_swiglu_bwd_w_rows(bf16 *__restrict__ dgate, bf16 *__restrict__ dup, bf16 *__restrict__ hw,
                                    TW *__restrict__ dw, const bf16 *__restrict__ dh, const bf16 *__restrict__ gate,
                                    const bf16 *__restrict__ up, const bf16 *__restrict__ rw, int64_t rows, int64_t de) {
    const int lane = threadIdx.x & 31;
    const int64_t warps = (int64_t)gridDim.x * (blockDim.x >> 5);
    const int64_t nv = de / 8;
    for (int64_t r = (int64_t)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5); r < rows; r += warps) {
        const float w = __bfloat162float(rw[r]);
        const int64_t base = r * de;
        float part = 0.0f;
        for (int64_t v0 = lane; v0 < nv; v0 += 32 * SBW_UNROLL) {
            uint4 a[SBW_UNROLL], b[SBW_UNROLL], c[SBW_UNROLL];
#pragma unroll
            for (int i = 0; i < SBW_UNROLL; i++) {
                const int64_t v = v0 + 32 * i;
                if (v < nv) {
                    a[i] = ld16_cs(dh + base + v * 8);
                    b[i] = ld16_cs(gate + base + v * 8);
                    c[i] = ld16_cs(up + base + v * 8);
                }
            }
#pragma unroll
            for (int i = 0; i < SBW_UNROLL; i++) {
                const int64_t v = v0 + 32 * i;
                if (v >= nv) continue;
                float go[8], g[8], u[8], h[8], d[8];
                unpack(a[i], go);
                unpack(b[i], g);
                unpack(c[i], u);
#pragma unroll
                for (int k = 0; k < 8; k++) h[k] = swiglu_1(g[k], u[k]);
                const uint4 hr = pack(h);   // the forward's activation, as the down projection read it
                unpack(hr, h);
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    part = fmaf(go[k], h[k], part);
                    d[k] = go[k] * w;
                    h[k] *= w;
                }
                unpack(pack(d), d);   // dh' rounded, as the epilogue rounds it
#pragma unroll
                for (int k = 0; k < 8; k++) swiglu_bwd_1(d[k], g[k], u[k], g[k], u[k]);
                st16(dgate + base + v * 8, pack(g));
                st16(dup + base + v * 8, pack(u));
                st16(hw + base + v * 8, pack(h));
            }
        }
        part = warp_sum(part);
        if (lane == 0) {
            if constexpr (sizeof(TW) == 2) dw[r] = __float2bfloat16_rn(part);
            else dw[r] = part;
        }
    }
}

// the row pass's conditions: bf16 rows of a multiple of 8 on 16-byte
// boundaries (rw: bf16, read one element a row; dw: bf16 or f32); dh, the
// caller's scratch, the same
bool cuda_swiglu_backward_w_rows_fit(const moe_tensor *dgate, const moe_tensor *dup, const moe_tensor *hw,
                                     const moe_tensor *dw, const moe_tensor *gate, const moe_tensor *up,
                                     const moe_tensor *rw) {
    const moe_tensor *rows[] = {dgate, dup, hw, gate, up};
    for (const moe_tensor *t : rows)
        if (t->dtype != MOE_BF16 || !cuda_aligned16(moe_tensor_data(t))) return false;
    return rw->dtype == MOE_BF16 && (dw->dtype == MOE_BF16 || dw->dtype == MOE_F32) && dgate->shape[1] % 8 == 0;
}

moe_status cuda_swiglu_backward_w_rows(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, moe_tensor *hw, moe_tensor *dw,
                                       const moe_tensor *dh, const moe_tensor *gate, const moe_tensor *up,
                                       const moe_tensor *rw) {
    if (!cuda_swiglu_backward_w_rows_fit(dgate, dup, hw, dw, gate, up, rw) || dh->dtype != MOE_BF16 ||
        !cuda_aligned16(moe_tensor_data(dh)))
        return moe_error(MOE_ERR_INTERNAL, "swiglu_backward_w_rows: dtypes, widths or alignment it does not take");
    const int64_t rows = dgate->shape[0], de = dgate->shape[1];
    CUDA_ENTER(d, ctx, dgate->device);
    if (rows == 0) return MOE_OK;
    const int threads = 256;
    const int64_t blocks64 = (rows + threads / 32 - 1) / (threads / 32);
    const unsigned blocks = (unsigned)(blocks64 < 65535 * 8 ? blocks64 : 65535 * 8);
    if (dw->dtype == MOE_BF16)
        k_swiglu_bwd_w_rows<bf16><<<blocks, threads, 0, d->stream>>>(PTR(bf16, dgate), PTR(bf16, dup), PTR(bf16, hw),
                                                                    PTR(bf16, dw), PTR(const bf16, dh),
                                                                    PTR(const bf16, gate), PTR(const bf16, up),
                                                                    PTR(const bf16, rw), rows, de);
    else
        k_swiglu_bwd_w_rows<float><<<blocks, threads, 0, d->stream>>>(PTR(bf16, dgate), PTR(bf16, dup), PTR(bf16, hw),
                                                                     PTR(float, dw), PTR(const bf16, dh),
                                                                     PTR(const bf16, gate), PTR(const bf16, up),
                                                                     PTR(const bf16, rw), rows, de);
    CU_LAUNCHED("swiglu_backward_w_rows");
    return MOE_OK;
}
