// Indexing: gather / scatter_add over the last dim, index_select / index_add
// over rows (embedding and embedding_backward reach these through ops.c).
//
// Index range: as on the CPU, a bad index gives MOE_ERR_RANGE naming the first
// bad position, and nothing is written. The indices live on the device, so
// every call first runs a check kernel (atomicMin of the first bad position
// into an 8-byte flag) and copies the flag back: one small device->host copy,
// which waits for the work queued before it (a stream synchronisation per call).
// Indices the engine produced itself carry a trusted bound (tensor.h,
// moe_tensor_index_trusted: e.g. the router's token_idx / expert_idx): for
// those the check, and its synchronisation, is skipped.
//
// Determinism of the accumulating ops (no float atomics anywhere): every
// destination element is written by exactly one thread, which adds its
// contributions in source order starting from the old value:
//   dst = ((dst + src[i1]) + src[i2]) + ...,  i1 < i2 < ...
// the CPU's association exactly, so f32 results are bit-identical to the CPU
// and bf16 ones are accumulated in f32 and rounded once.
//   index_add (and embedding_backward): a stable radix sort (cub) of the pairs
//     (dst row, source position) groups the sources of each destination row in
//     source order; then thread (p, c) with p the first sorted entry of a
//     destination row walks that row's run for column c. Cost: the sort of m
//     keys (a few passes over 8 m bytes), then one read of src and one
//     read-modify-write of each touched dst row; long runs (a frequent token)
//     are walked by one thread per column, so their cost is their length.
//   scatter_add: with m <= 32 indices per row (routing weights, top-k), thread
//     (r, c) scans the row's m indices for c: O(n m) compares per row, no
//     scratch. Longer index rows use the sort path with flat keys r * n + index.
#include "cuda_common.cuh"

#include <cub/device/device_radix_sort.cuh>

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))

// MOE_ERR_RANGE (nothing written) when some index[0:cnt] is outside [0, n)
moe_status check_range(cuda_dev *d, const char *op, const moe_tensor *index, int64_t cnt, int64_t n) {
    return cuda_check_index<int64_t>(d, op, "index", index, cnt, 0, n, 0);
}

// ---- gather / index_select: pure copies ----

template <typename T>
__global__ void k_gather(T *out, const T *x, const int64_t *idx, int64_t total, int64_t n, int64_t m) {
    GRID_STRIDE(i, total) {
        int64_t r = i / m;
        out[i] = x[r * n + idx[i]];
    }
}

// rows of `w` words (W = 16, 4 or 2 bytes)
template <typename W>
__global__ void k_select(W *out, const W *x, const int64_t *idx, int64_t m, int64_t w) {
    GRID_STRIDE(e, m * w) {
        int64_t i = e / w, c = e - i * w;
        out[e] = x[idx[i] * w + c];
    }
}

// ---- accumulation ----

// thread (r, c): dst[r, c] += src[r, j] for every j with idx[r, j] == c, in j order
template <typename T>
__global__ void k_scatter_scan(T *dst, const T *src, const int64_t *idx, int64_t rows, int64_t n, int64_t m) {
    GRID_STRIDE(e, rows * n) {
        int64_t r = e / n, c = e - r * n;
        const int64_t *ir = idx + r * m;
        const T *sr = src + r * m;
        float acc = 0.0f;
        bool hit = false;
        for (int64_t j = 0; j < m; j++)
            if (ir[j] == c) {
                if (!hit) { acc = to_f32(dst[e]); hit = true; }
                acc += to_f32(sr[j]);
            }
        if (hit) dst[e] = from_f32<T>(acc);
    }
}

// sort keys: flat destination (row for index_add, r * n + idx for scatter_add), value: source position
template <typename K>
__global__ void k_make_keys(K *keys, K *vals, const int64_t *idx, int64_t cnt, int64_t n, int64_t m, int flat) {
    GRID_STRIDE(p, cnt) {
        int64_t key = flat ? (p / m) * n + idx[p] : idx[p];
        keys[p] = (K)key;
        vals[p] = (K)p;
    }
}

// thread (p, c), p the first sorted entry of its destination: walk the run.
template <typename T, typename K>
__global__ void k_run_sum(T *dst, const T *src, const K *keys, const K *vals, int64_t cnt, int64_t w) {
    GRID_STRIDE(e, cnt * w) {
        int64_t p = e / w, c = e - p * w;
        K key = keys[p];
        if (p > 0 && keys[p - 1] == key) continue;
        T *dp = dst + (int64_t)key * w + c;
        float acc = to_f32(*dp);
        for (int64_t q = p; q < cnt && keys[q] == key; q++) acc += to_f32(src[(int64_t)vals[q] * w + c]);
        *dp = from_f32<T>(acc);
    }
}

static int bits_for(uint64_t maxkey) {
    int b = 1;
    while (b < 64 && (maxkey >> b)) b++;
    return b;
}

// dst[key(p) * w + c] += src[p * w + c] for p in [0, cnt), deterministic (see the top).
template <typename T, typename K>
moe_status sorted_accumulate(cuda_dev *d, const char *op, T *dst, const T *src, const int64_t *idx, int64_t cnt,
                             int64_t n, int64_t m, int flat, uint64_t maxkey, int64_t w) {
    if (cnt > (int64_t)INT32_MAX)
        return moe_error(MOE_ERR_ARG, "%s on cuda: %lld indices, at most %d supported", op, (long long)cnt, INT32_MAX);
    int end_bit = bits_for(maxkey);
    cuda_scratch kv(d, (size_t)cnt * 4 * sizeof(K));
    if (!kv.p) return moe_last_status();
    K *kin = (K *)kv.p, *vin = kin + cnt, *kout = vin + cnt, *vout = kout + cnt;
    k_make_keys<K><<<cuda_grid_1d(d, cnt, 256), 256, 0, d->stream>>>(kin, vin, idx, cnt, n, m, flat);
    CU_LAUNCHED(op);
    size_t tmp_bytes = 0;
    CU_TRY(cub::DeviceRadixSort::SortPairs(nullptr, tmp_bytes, kin, kout, vin, vout, (int)cnt, 0, end_bit, d->stream),
           op);
    cuda_scratch tmp(d, tmp_bytes ? tmp_bytes : 1);
    if (!tmp.p) return moe_last_status();
    CU_TRY(cub::DeviceRadixSort::SortPairs(tmp.p, tmp_bytes, kin, kout, vin, vout, (int)cnt, 0, end_bit, d->stream), op);
    k_run_sum<T, K><<<cuda_grid_1d(d, cnt * w, 256), 256, 0, d->stream>>>(dst, src, kout, vout, cnt, w);
    CU_LAUNCHED(op);
    return MOE_OK;
}

template <typename T>
moe_status accumulate(cuda_dev *d, const char *op, T *dst, const T *src, const int64_t *idx, int64_t cnt, int64_t n,
                      int64_t m, int flat, uint64_t maxkey, int64_t w) {
    if (maxkey <= 0xffffffffull && cnt <= 0xffffffffll)
        return sorted_accumulate<T, uint32_t>(d, op, dst, src, idx, cnt, n, m, flat, maxkey, w);
    return sorted_accumulate<T, unsigned long long>(d, op, dst, src, idx, cnt, n, m, flat, maxkey, w);
}

}  // namespace

moe_status cuda_gather(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    MOE_TRY(cuda_check_float(x->dtype, "gather"));
    int64_t n = cuda_last_dim(x), m = cuda_last_dim(index), total = moe_tensor_numel(index);
    if (total == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    const int64_t *ix = PTR(const int64_t, index);
    MOE_TRY(check_range(d, "gather", index, total, n));
    unsigned g = cuda_grid_1d(d, total, 256);
    if (x->dtype == MOE_F32)
        k_gather<float><<<g, 256, 0, d->stream>>>(PTR(float, out), PTR(const float, x), ix, total, n, m);
    else
        k_gather<bf16><<<g, 256, 0, d->stream>>>(PTR(bf16, out), PTR(const bf16, x), ix, total, n, m);
    CU_LAUNCHED("gather");
    return MOE_OK;
}

moe_status cuda_scatter_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    MOE_TRY(cuda_check_float(dst->dtype, "scatter_add"));
    int64_t n = cuda_last_dim(dst), m = cuda_last_dim(index), total = moe_tensor_numel(index);
    int64_t rows = cuda_rows(dst);
    if (total == 0 || m == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dst->device);
    const int64_t *ix = PTR(const int64_t, index);
    MOE_TRY(check_range(d, "scatter_add", index, total, n));
    if (m <= 32) {
        unsigned g = cuda_grid_1d(d, rows * n, 256);
        if (dst->dtype == MOE_F32)
            k_scatter_scan<float><<<g, 256, 0, d->stream>>>(PTR(float, dst), PTR(const float, src), ix, rows, n, m);
        else
            k_scatter_scan<bf16><<<g, 256, 0, d->stream>>>(PTR(bf16, dst), PTR(const bf16, src), ix, rows, n, m);
        CU_LAUNCHED("scatter_add");
        return MOE_OK;
    }
    uint64_t maxkey = (uint64_t)(rows * n);
    if (dst->dtype == MOE_F32)
        return accumulate<float>(d, "scatter_add", PTR(float, dst), PTR(const float, src), ix, total, n, m, 1, maxkey, 1);
    return accumulate<bf16>(d, "scatter_add", PTR(bf16, dst), PTR(const bf16, src), ix, total, n, m, 1, maxkey, 1);
}

moe_status cuda_index_select(moe_ctx *ctx, moe_tensor *out, const moe_tensor *x, const moe_tensor *index) {
    MOE_TRY(cuda_check_float(x->dtype, "index_select"));
    int64_t n = x->shape[0], m = index->shape[0];
    int64_t w = n ? moe_tensor_numel(x) / n : 0;   // elements per row
    if (m == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    const int64_t *ix = PTR(const int64_t, index);
    MOE_TRY(check_range(d, "index_select", index, m, n));
    if (w == 0) return MOE_OK;
    size_t es = moe_dtype_size(x->dtype), rb = (size_t)w * es;
    const void *xp = moe_tensor_data(x);
    void *op = moe_tensor_data(out);
    bool al16 = rb % 16 == 0 && (uintptr_t)xp % 16 == 0 && (uintptr_t)op % 16 == 0;
    if (al16) {
        int64_t ww = (int64_t)(rb / 16);
        k_select<uint4><<<cuda_grid_1d(d, m * ww, 256), 256, 0, d->stream>>>((uint4 *)op, (const uint4 *)xp, ix, m, ww);
    } else if (es == 4) {
        k_select<uint32_t><<<cuda_grid_1d(d, m * w, 256), 256, 0, d->stream>>>((uint32_t *)op, (const uint32_t *)xp, ix,
                                                                             m, w);
    } else {
        k_select<uint16_t><<<cuda_grid_1d(d, m * w, 256), 256, 0, d->stream>>>((uint16_t *)op, (const uint16_t *)xp, ix,
                                                                             m, w);
    }
    CU_LAUNCHED("index_select");
    return MOE_OK;
}

moe_status cuda_index_add(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *index, const moe_tensor *src) {
    MOE_TRY(cuda_check_float(dst->dtype, "index_add"));
    int64_t n = dst->shape[0], m = index->shape[0];
    int64_t w = n ? moe_tensor_numel(dst) / n : 0;
    if (m == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, dst->device);
    const int64_t *ix = PTR(const int64_t, index);
    MOE_TRY(check_range(d, "index_add", index, m, n));
    if (w == 0) return MOE_OK;
    if (dst->dtype == MOE_F32)
        return accumulate<float>(d, "index_add", PTR(float, dst), PTR(const float, src), ix, m, n, 1, 0, (uint64_t)n, w);
    return accumulate<bf16>(d, "index_add", PTR(bf16, dst), PTR(const bf16, src), ix, m, n, 1, 0, (uint64_t)n, w);
}
