// MoE token movement on the device (ops.h: gather_sum, combine_backward).
//
// Both are one pass over their rows, one block per output row, no atomics:
//   gather_sum:       block t reads token t's k slots and sums the (weighted)
//                     source rows in q order into registers, adds row t of
//                     base when there is one (a residual added in the same
//                     pass), then writes row t once. Eight choices' loads
//                     (16-byte rows; else four) are in flight at a time; the
//                     adds stay in q order.
//   combine_backward: block a reads row token_idx[a] of dy and row a of src,
//                     writes dsrc[a] = w[a] * dy[t] and reduces dw[a] =
//                     dy[t] . src[a] (per-thread f32 partial sums in column
//                     order, then block_sum's fixed tree): deterministic.
//                     Given the router's slots it runs by token instead
//                     (block t: dy[t] read once for its k rows), with the
//                     same arithmetic.
//   index_select_slots: the dispatch xp[a] = x[token_idx[a]] by token (block
//                     t reads row t of x once and writes it to its k rows),
//                     given the router's slots: read in expert order, x's
//                     rows are fetched k times, and at the OLMoE layer's
//                     64 MB x they do not stay in L2.
// Rows move in 16-byte vectors (8 bf16 / 4 f32 per thread) when H is a
// multiple of the vector and the row pointers are 16-byte aligned, else one
// element per thread. Any H (a block walks its row in steps of blockDim).
//
// Exactness: gather_sum computes acc = __fadd_rn(acc, __fmul_rn(w, x)) from
// acc = 0 in q order, then acc = __fadd_rn(acc, base) (in f32 the bits of a
// separate add) (no fused multiply-add), the CPU backend's arithmetic
// (cpu_moe.c), so f32 results are bit-identical to the CPU and bf16 ones are
// the f32 sum rounded once. dsrc is one rounded product (bit-identical too);
// dw is an f32 dot product whose order differs from the CPU's (to rounding).
//
// Index range: slots in [-1, A) (-1: a dropped choice, skipped), token_idx in
// [0, N). Untrusted indices are checked first (one check kernel, one small
// copy back and a stream synchronisation; MOE_ERR_RANGE naming the first bad
// position, nothing written). Indices with a trusted bound
// (moe_tensor_index_trusted(slots, A) / (token_idx, N): the router's) skip the
// check and its synchronisation.
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))

// ---- vectors of V elements (16 bytes when V * sizeof(T) == 16) ----

template <typename T, int V>
__device__ __forceinline__ void load_f32(const T *p, float *f) {
    if constexpr (V * sizeof(T) == 16) {
        uint4 u = __ldg(reinterpret_cast<const uint4 *>(p));
        const T *e = reinterpret_cast<const T *>(&u);
#pragma unroll
        for (int i = 0; i < V; i++) f[i] = to_f32(e[i]);
    } else {
#pragma unroll
        for (int i = 0; i < V; i++) f[i] = to_f32(p[i]);
    }
}

template <typename T, int V>
__device__ __forceinline__ void store_f32(T *p, const float *f) {
    if constexpr (V * sizeof(T) == 16) {
        uint4 u;
        T *e = reinterpret_cast<T *>(&u);
#pragma unroll
        for (int i = 0; i < V; i++) e[i] = from_f32<T>(f[i]);
        *reinterpret_cast<uint4 *>(p) = u;
    } else {
#pragma unroll
        for (int i = 0; i < V; i++) p[i] = from_f32<T>(f[i]);
    }
}

// ---- gather_sum ----

#define GS_BATCH 4   // choices whose loads are issued together

template <typename T, int V>
__global__ void k_gather_sum(T *__restrict__ y, const T *__restrict__ base, const T *__restrict__ src,
                             const T *__restrict__ w, const int32_t *__restrict__ slots, int64_t n, int64_t h, int k) {
    const int64_t nv = h / V;
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t *sl = slots + t * k;
        for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; i++) acc[i] = 0.0f;
            for (int q = 0; q < k; q += GS_BATCH) {
                int32_t s[GS_BATCH];
                float ws[GS_BATCH], x[GS_BATCH][V];
#pragma unroll
                for (int j = 0; j < GS_BATCH; j++) {
                    s[j] = q + j < k ? sl[q + j] : -1;
                    ws[j] = s[j] >= 0 && w ? to_f32(w[s[j]]) : 1.0f;
                    if (s[j] >= 0) load_f32<T, V>(src + (int64_t)s[j] * h + v * V, x[j]);
                }
#pragma unroll
                for (int j = 0; j < GS_BATCH; j++)
                    if (s[j] >= 0) {
#pragma unroll
                        for (int i = 0; i < V; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(ws[j], x[j][i]));
                    }
            }
            if (base) {
                float b[V];
                load_f32<T, V>(base + t * h + v * V, b);
#pragma unroll
                for (int i = 0; i < V; i++) acc[i] = __fadd_rn(acc[i], b[i]);
            }
            store_f32<T, V>(y + t * h + v * V, acc);
        }
    }
}

// The same over 16-byte vectors with every kept choice's load in flight at
// once (up to GS_VEC_BATCH, kept as raw words, not yet f32) and the rows read
// with evict-first loads (each is read once): at the OLMoE layer's k = 8 the
// batches of four above left the reads at about 2.9 TB/s on an H200. The adds
// stay in q order: the same bits.
#define GS_VEC_BATCH 8

template <typename T>
__global__ void k_gather_sum_vec(T *__restrict__ y, const T *__restrict__ base, const T *__restrict__ src,
                                 const T *__restrict__ w, const int32_t *__restrict__ slots, int64_t n, int64_t h,
                                 int k) {
    constexpr int V = 16 / sizeof(T);
    const int64_t nv = h / V;
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t *sl = slots + t * k;
        for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
            float acc[V];
#pragma unroll
            for (int i = 0; i < V; i++) acc[i] = 0.0f;
            for (int q = 0; q < k; q += GS_VEC_BATCH) {
                int32_t s[GS_VEC_BATCH];
                uint4 raw[GS_VEC_BATCH];
                float ws[GS_VEC_BATCH];
#pragma unroll
                for (int j = 0; j < GS_VEC_BATCH; j++) {
                    s[j] = q + j < k ? __ldg(sl + q + j) : -1;
                    ws[j] = s[j] >= 0 && w ? to_f32(w[s[j]]) : 1.0f;
                    if (s[j] >= 0) raw[j] = __ldcs(reinterpret_cast<const uint4 *>(src + (int64_t)s[j] * h + v * V));
                }
#pragma unroll
                for (int j = 0; j < GS_VEC_BATCH; j++)
                    if (s[j] >= 0) {
                        const T *e = reinterpret_cast<const T *>(&raw[j]);
#pragma unroll
                        for (int i = 0; i < V; i++) acc[i] = __fadd_rn(acc[i], __fmul_rn(ws[j], to_f32(e[i])));
                    }
            }
            if (base) {
                float b[V];
                load_f32<T, V>(base + t * h + v * V, b);
#pragma unroll
                for (int i = 0; i < V; i++) acc[i] = __fadd_rn(acc[i], b[i]);
            }
            store_f32<T, V>(y + t * h + v * V, acc);
        }
    }
}

// ---- combine_backward ----

template <typename T, int V>
__global__ void k_combine_backward(T *__restrict__ dsrc, T *__restrict__ dw, const T *__restrict__ dy,
                                   const T *__restrict__ src, const T *__restrict__ w,
                                   const int64_t *__restrict__ tok, int64_t a_n, int64_t h) {
    __shared__ float sh[32];
    const int64_t nv = h / V;
    for (int64_t a = blockIdx.x; a < a_n; a += gridDim.x) {
        const T *g = dy + tok[a] * h;
        const T *x = src + a * h;
        T *o = dsrc + a * h;
        const float wa = to_f32(w[a]);
        float dot = 0.0f;
        for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
            float gf[V], xf[V], of[V];
            load_f32<T, V>(g + v * V, gf);
            if (dw) load_f32<T, V>(x + v * V, xf);
#pragma unroll
            for (int i = 0; i < V; i++) {
                of[i] = __fmul_rn(wa, gf[i]);
                if (dw) dot = fmaf(gf[i], xf[i], dot);
            }
            store_f32<T, V>(o + v * V, of);
        }
        if (dw) {
            dot = block_sum(dot, sh);
            if (threadIdx.x == 0) dw[a] = from_f32<T>(dot);
        }
    }
}

// The same by token (slots given): block t reads row t of dy once for its k
// rows, CB_BATCH of them a pass over the row. Each thread's share of the row
// and its column order are those of k_combine_backward (same blockDim), and
// so is block_sum's tree: the same bytes, dy read once instead of k times.
#define CB_BATCH 8

template <typename T, int V>
__global__ void k_combine_backward_tok(T *__restrict__ dsrc, T *__restrict__ dw, const T *__restrict__ dy,
                                       const T *__restrict__ src, const T *__restrict__ w,
                                       const int32_t *__restrict__ slots, int64_t n, int64_t h, int k) {
    __shared__ float sh[CB_BATCH][32];
    const int64_t nv = h / V;
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t *sl = slots + t * k;
        const T *g = dy + t * h;
        for (int q = 0; q < k; q += CB_BATCH) {
            int32_t s[CB_BATCH];
            float wa[CB_BATCH], dot[CB_BATCH];
#pragma unroll
            for (int j = 0; j < CB_BATCH; j++) {
                s[j] = q + j < k ? sl[q + j] : -1;
                wa[j] = s[j] >= 0 ? to_f32(w[s[j]]) : 0.0f;
                dot[j] = 0.0f;
            }
            for (int64_t v = threadIdx.x; v < nv; v += blockDim.x) {
                float gf[V];
                load_f32<T, V>(g + v * V, gf);
#pragma unroll
                for (int j = 0; j < CB_BATCH; j++) {
                    if (s[j] < 0) continue;
                    float xf[V], of[V];
                    if (dw) load_f32<T, V>(src + (int64_t)s[j] * h + v * V, xf);
#pragma unroll
                    for (int i = 0; i < V; i++) {
                        of[i] = __fmul_rn(wa[j], gf[i]);
                        if (dw) dot[j] = fmaf(gf[i], xf[i], dot[j]);
                    }
                    store_f32<T, V>(dsrc + (int64_t)s[j] * h + v * V, of);
                }
            }
            if (dw) {
                // block_sum of each dot, all at once: the same order (the same bits), two barriers
                const int lane = threadIdx.x & 31, wi = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
                for (int j = 0; j < CB_BATCH; j++) dot[j] = warp_sum(dot[j]);
                __syncthreads();   // sh may still be read for the last token
                if (lane == 0)
#pragma unroll
                    for (int j = 0; j < CB_BATCH; j++) sh[j][wi] = dot[j];
                __syncthreads();
#pragma unroll
                for (int j = 0; j < CB_BATCH; j++) {
                    const float r = warp_sum(lane < nw ? sh[j][lane] : 0.0f);
                    if (threadIdx.x == 0 && s[j] >= 0) dw[s[j]] = from_f32<T>(r);
                }
            }
        }
    }
}

// ---- index_select_slots: the dispatch by token ----

// out[slots[t, q]] = x[t] for every kept choice q: rows of w 16-byte words,
// the row read once into registers, then written k times
__global__ void k_select_tok(uint4 *__restrict__ out, const uint4 *__restrict__ x, const int32_t *__restrict__ slots,
                             int64_t n, int k, int64_t w) {
    for (int64_t t = blockIdx.x; t < n; t += gridDim.x) {
        const int32_t *sl = slots + t * k;
        for (int64_t v = threadIdx.x; v < w; v += blockDim.x) {
            const uint4 val = __ldg(x + t * w + v);
            for (int q = 0; q < k; q++) {
                const int32_t s = __ldg(sl + q);
                if (s >= 0) out[(int64_t)s * w + v] = val;
            }
        }
    }
}

// threads per block for rows of nv vectors: at most 256, a multiple of 32,
// and as even a split of the row as that allows
int row_threads(int64_t nv) {
    int64_t iters = (nv + 255) / 256;
    if (iters < 1) iters = 1;
    int64_t per = (nv + iters - 1) / iters;
    int64_t th = (per + 31) / 32 * 32;
    return th < 32 ? 32 : th > 256 ? 256 : (int)th;
}

bool al16(const void *p) { return (uintptr_t)p % 16 == 0; }

template <typename T>
void launch_gather_sum(cuda_dev *d, T *y, const T *base, const T *src, const T *w, const int32_t *slots, int64_t n,
                       int64_t h, int k) {
    constexpr int V = 16 / sizeof(T);
    unsigned grid = cuda_row_grid(n);
    if (h % V == 0 && al16(y) && al16(src) && (!base || al16(base)))
        k_gather_sum_vec<T><<<grid, row_threads(h / V), 0, d->stream>>>(y, base, src, w, slots, n, h, k);
    else
        k_gather_sum<T, 1><<<grid, row_threads(h), 0, d->stream>>>(y, base, src, w, slots, n, h, k);
}

template <typename T>
void launch_combine_backward(cuda_dev *d, T *dsrc, T *dw, const T *dy, const T *src, const T *w, const int64_t *tok,
                             const int32_t *slots, int64_t n, int k, int64_t a_n, int64_t h) {
    constexpr int V = 16 / sizeof(T);
    const bool vec = h % V == 0 && al16(dsrc) && al16(dy) && al16(src);
    if (slots && vec)
        k_combine_backward_tok<T, V><<<cuda_row_grid(n), row_threads(h / V), 0, d->stream>>>(dsrc, dw, dy, src, w, slots,
                                                                                             n, h, k);
    else if (slots)
        k_combine_backward_tok<T, 1><<<cuda_row_grid(n), row_threads(h), 0, d->stream>>>(dsrc, dw, dy, src, w, slots, n,
                                                                                         h, k);
    else if (vec)
        k_combine_backward<T, V><<<cuda_row_grid(a_n), row_threads(h / V), 0, d->stream>>>(dsrc, dw, dy, src, w, tok, a_n, h);
    else
        k_combine_backward<T, 1><<<cuda_row_grid(a_n), row_threads(h), 0, d->stream>>>(dsrc, dw, dy, src, w, tok, a_n, h);
}

}  // namespace

moe_status cuda_gather_sum(moe_ctx *ctx, moe_tensor *y, const moe_tensor *base, const moe_tensor *src,
                           const moe_tensor *w, const moe_tensor *slots) {
    MOE_TRY(cuda_check_float(y->dtype, "gather_sum"));
    const int64_t n = y->shape[0], h = y->shape[1], a = src->shape[0], k = slots->shape[1];
    if (n == 0 || h == 0) return MOE_OK;
    if (k > INT32_MAX) return moe_error(MOE_ERR_ARG, "gather_sum on cuda: k = %lld choices per token, too many", (long long)k);
    CUDA_ENTER(d, ctx, y->device);
    MOE_TRY(cuda_check_index<int32_t>(d, "gather_sum", "slot", slots, n * k, -1, a, k));
    const int32_t *sl = PTR(const int32_t, slots);
    if (y->dtype == MOE_F32)
        launch_gather_sum<float>(d, PTR(float, y), base ? PTR(const float, base) : nullptr, PTR(const float, src),
                                 w ? PTR(const float, w) : nullptr, sl, n, h, (int)k);
    else
        launch_gather_sum<bf16>(d, PTR(bf16, y), base ? PTR(const bf16, base) : nullptr, PTR(const bf16, src),
                                w ? PTR(const bf16, w) : nullptr, sl, n, h, (int)k);
    CU_LAUNCHED("gather_sum");
    return MOE_OK;
}

moe_status cuda_combine_backward(moe_ctx *ctx, moe_tensor *dsrc, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *src, const moe_tensor *w, const moe_tensor *token_idx,
                                 const moe_tensor *slots) {
    MOE_TRY(cuda_check_float(dsrc->dtype, "combine_backward"));
    const int64_t a = src->shape[0], h = src->shape[1], n = dy->shape[0], k = slots ? slots->shape[1] : 0;
    if (a == 0) return MOE_OK;
    if (k > INT32_MAX) return moe_error(MOE_ERR_ARG, "combine_backward on cuda: k = %lld choices per token, too many", (long long)k);
    CUDA_ENTER(d, ctx, dsrc->device);
    // by token when the slots are a router's map over these a rows (each row once: a map
    // that only passes the range check could leave rows unwritten or write one twice),
    // else by row, checking token_idx
    const bool by_token = slots && moe_tensor_slot_map_trusted(slots, a);
    if (!by_token) MOE_TRY(cuda_check_index<int64_t>(d, "combine_backward", "token_idx", token_idx, a, 0, n, 0));
    const int64_t *tok = PTR(const int64_t, token_idx);
    const int32_t *sl = by_token ? PTR(const int32_t, slots) : nullptr;
    if (dsrc->dtype == MOE_F32)
        launch_combine_backward<float>(d, PTR(float, dsrc), dw ? PTR(float, dw) : nullptr, PTR(const float, dy),
                                       PTR(const float, src), PTR(const float, w), tok, sl, n, (int)k, a, h);
    else
        launch_combine_backward<bf16>(d, PTR(bf16, dsrc), dw ? PTR(bf16, dw) : nullptr, PTR(const bf16, dy),
                                      PTR(const bf16, src), PTR(const bf16, w), tok, sl, n, (int)k, a, h);
    CU_LAUNCHED("combine_backward");
    return MOE_OK;
}

// By token where the slots are a router's map over out's rows (each row
// written once) and the rows are whole 16-byte words; else *served 0 and the
// ops layer runs index_select (by row).
moe_status cuda_index_select_slots(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *slots,
                                   int *served) {
    *served = 0;
    const int64_t m = out->shape[0], n = x->shape[0], k = slots->shape[1];
    const size_t rb = n ? moe_tensor_numel(x) / n * moe_dtype_size(x->dtype) : 0;
    if (x->ndim != 2 || !moe_tensor_slot_map_trusted(slots, m) || k > INT32_MAX || rb == 0 || rb % 16 ||
        !al16(moe_tensor_data(x)) || !al16(moe_tensor_data(out)))
        return MOE_OK;
    CUDA_ENTER(d, ctx, out->device);
    const int64_t w = (int64_t)(rb / 16);
    if (n > 0)
        k_select_tok<<<cuda_row_grid(n), row_threads(w), 0, d->stream>>>(PTR(uint4, out), PTR(const uint4, x),
                                                                        PTR(const int32_t, slots), n, (int)k, w);
    CU_LAUNCHED("index_select_slots");
    *served = 1;
    return MOE_OK;
}
