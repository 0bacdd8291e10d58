// Expert-parallel routing maps on the device (ops.h: ep_token_slots,
// slot_tokens, ep_pack, ep_unpack, ep_regroup): integer index maps, a few
// reads per token.
//
//   k_token_slots  one block: for each rank d in order, the block walks the
//                  tokens in tiles of 8192 (8 per thread) and numbers the
//                  tokens with a kept choice in group d by a block scan
//                  (tokens ascending within a rank, ranks one after another):
//                  P * N / 8192 block scans, a few microseconds for the P <= 8
//                  and N <= 64k of expert parallelism on one host. The per-rank
//                  counts stay on the device (the caller brings them back with
//                  the routing summary and the counts exchange).
//   k_slot_tokens  one thread per slot: token_idx[slots[i]] = i / m (token_idx
//                  zeroed first, so rows no slot names hold a valid index).
//   k_pack         one thread per assignment: finds its slot among its token's
//                  k choices, counting the earlier choices in the same group.
//   k_unpack       one thread per received row (slots memset to -1 first).
//   k_regroup      one thread per row: a binary search over the (rank, expert)
//                  blocks, whose starts travel as a kernel argument.
//
// Memory safety without synchronising: router maps carry index bounds (no
// check); other slots are checked once (cuda_check_index). Experts outside the
// P groups count for no rank; packed values outside [0, U * width) are dropped
// (documented in ops.h: the host path reports them).
#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data((moe_tensor *)(t)))

constexpr int TS_THREADS = 1024;
constexpr int TS_ITEMS = 8;
constexpr unsigned FULL = 0xffffffffu;

struct adjust_arg { long long v[MOE_EP_MAX_RANKS]; };

// exclusive scan of v over the block; *total gets the block's sum
__device__ int block_excl_scan(int v, int *sh, int *total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int x = v;
    for (int o = 1; o < 32; o <<= 1) {
        int y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (w == 0) {
        int s = lane < nw ? sh[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            int y = __shfl_up_sync(FULL, s, o);
            if (lane >= o) s += y;
        }
        if (lane < nw) sh[lane] = s;   // inclusive sums of the warps
    }
    __syncthreads();
    int before = w ? sh[w - 1] : 0;
    *total = sh[nw - 1];
    return before + x - v;
}

// Each thread takes TS_ITEMS consecutive tokens (their loads in flight
// together), one block scan per rank and tile of TS_THREADS * TS_ITEMS tokens.
__global__ void __launch_bounds__(TS_THREADS) k_token_slots(int32_t *tslots, long long *counts, const int32_t *slots,
                                                           const int64_t *ex, int64_t n, int k, int p, int64_t gs) {
    __shared__ int sh[32];
    long long base = 0;
    const int64_t tile = (int64_t)blockDim.x * TS_ITEMS;
    for (int d = 0; d < p; d++) {
        long long start = base;
        for (int64_t c0 = 0; c0 < n; c0 += tile) {
            const int64_t t0 = c0 + (int64_t)threadIdx.x * TS_ITEMS;
            unsigned flags = 0;
            int mine = 0;
#pragma unroll
            for (int i = 0; i < TS_ITEMS; i++) {
                const int64_t t = t0 + i;
                int f = 0;
                if (t < n)
                    for (int q = 0; q < k; q++) {
                        int32_t s = slots[t * k + q];
                        if (s >= 0) {
                            int64_t e = ex[s];
                            f |= e >= 0 && e / gs == d;
                        }
                    }
                flags |= (unsigned)f << i;
                mine += f;
            }
            int total;
            int pos = block_excl_scan(mine, sh, &total);
#pragma unroll
            for (int i = 0; i < TS_ITEMS; i++) {
                const int64_t t = t0 + i;
                if (t >= n) break;
                const int f = (flags >> i) & 1;
                tslots[t * p + d] = f ? (int32_t)(base + pos) : -1;
                pos += f;
            }
            base += total;
        }
        if (threadIdx.x == 0) counts[d] = base - start;
    }
}

__global__ void k_slot_tokens(int64_t *tok, const int32_t *slots, int64_t cnt, int64_t m, int64_t rows) {
    GRID_STRIDE(i, cnt) {
        int32_t v = slots[i];
        if (v >= 0 && v < rows) tok[v] = i / m;
    }
}

__global__ void k_pack(int64_t *packed, const int64_t *tok, const int64_t *ex, const int32_t *slots,
                       const int32_t *tslots, int64_t a, int k, int p, int64_t gs, int64_t width, adjust_arg adj) {
    GRID_STRIDE(i, a) {
        int64_t t = tok[i], d = ex[i] / gs, q = 0;
        int found = 0;
        for (int c = 0; c < k && !found; c++) {
            int32_t s = slots[t * k + c];
            if (s == i) found = 1;
            else if (s >= 0 && ex[s] / gs == d) q++;
        }
        int32_t row = d >= 0 && d < p ? tslots[t * p + d] : -1;
        packed[i] = found && row >= 0 && q < width ? (row + adj.v[d]) * width + q : -1;
    }
}

__global__ void k_unpack(int64_t *tok, int32_t *slots, const int64_t *packed, const int64_t *perm, int64_t r,
                         int64_t cells, int64_t width) {
    GRID_STRIDE(i, r) {
        int64_t j = perm ? perm[i] : i;
        int64_t v = j >= 0 && j < r ? packed[j] : -1;
        if (v >= 0 && v < cells) {
            tok[i] = v / width;
            slots[v] = (int32_t)i;
        } else {
            tok[i] = 0;
        }
    }
}

struct regroup_arg { long long g[MOE_EP_MAX_BLOCKS + 1], v[MOE_EP_MAX_BLOCKS]; };   // 16 KB (CUDA >= 12.1)

__global__ void k_regroup(int64_t *perm, int64_t *inv, int64_t r, int nb, const __grid_constant__ regroup_arg a) {
    GRID_STRIDE(k, r) {
        int lo = 0, hi = nb - 1;   // the last block starting at or before k holds it (empty ones are skipped)
        while (lo < hi) {
            int mid = (lo + hi + 1) / 2;
            if (a.g[mid] <= k) lo = mid;
            else hi = mid - 1;
        }
        int64_t i = a.v[lo] + (k - a.g[lo]);
        perm[k] = i;
        if (inv) inv[i] = k;
    }
}

}  // namespace

moe_status cuda_ep_token_slots(moe_ctx *ctx, moe_tensor *tslots, moe_tensor *counts, const moe_tensor *slots,
                               const moe_tensor *expert_idx, int64_t group_size) {
    const int64_t n = slots->shape[0], k = slots->shape[1], p = tslots->shape[1], a = expert_idx->shape[0];
    if (n * p > INT32_MAX) return moe_error(MOE_ERR_ARG, "ep_token_slots: %lld rows do not fit i32 slots", (long long)(n * p));
    CUDA_ENTER(d, ctx, tslots->device);
    MOE_TRY(cuda_check_index<int32_t>(d, "ep_token_slots", "slot", slots, n * k, -1, a, k));
    static_assert(sizeof(long long) == sizeof(int64_t), "counts are written as int64");
    k_token_slots<<<1, TS_THREADS, 0, d->stream>>>(PTR(int32_t, tslots), PTR(long long, counts), PTR(const int32_t, slots),
                                                   PTR(const int64_t, expert_idx), n, (int)k, (int)p, group_size);
    CU_LAUNCHED("ep_token_slots");
    return MOE_OK;
}

moe_status cuda_slot_tokens(moe_ctx *ctx, moe_tensor *token_idx, const moe_tensor *slots) {
    const int64_t rows = token_idx->shape[0], cnt = moe_tensor_numel(slots);
    CUDA_ENTER(d, ctx, token_idx->device);
    MOE_TRY(cuda_check_index<int32_t>(d, "slot_tokens", "slot", slots, cnt, -1, rows, slots->shape[1]));
    // rows no slot names (a map the host would refuse) stay 0, inside the bound the op layer promises
    CU_TRY(cudaMemsetAsync(moe_tensor_data(token_idx), 0, (size_t)rows * sizeof(int64_t), d->stream), "slot_tokens");
    if (cnt == 0) return MOE_OK;
    k_slot_tokens<<<cuda_grid_1d(d, cnt, 256), 256, 0, d->stream>>>(PTR(int64_t, token_idx), PTR(const int32_t, slots),
                                                                     cnt, slots->shape[1], rows);
    CU_LAUNCHED("slot_tokens");
    return MOE_OK;
}

moe_status cuda_ep_pack(moe_ctx *ctx, moe_tensor *packed, const moe_tensor *token_idx, const moe_tensor *expert_idx,
                        const moe_tensor *slots, const moe_tensor *tslots, int64_t group_size, int64_t width,
                        const int64_t *adjust) {
    const int64_t a = packed->shape[0], n = slots->shape[0], k = slots->shape[1], p = tslots->shape[1];
    CUDA_ENTER(d, ctx, packed->device);
    MOE_TRY(cuda_check_index<int64_t>(d, "ep_pack", "token_idx", token_idx, a, 0, n, 0));
    MOE_TRY(cuda_check_index<int32_t>(d, "ep_pack", "slot", slots, n * k, -1, a, k));
    adjust_arg adj;
    for (int64_t i = 0; i < p; i++) adj.v[i] = adjust[i];
    k_pack<<<cuda_grid_1d(d, a, 256), 256, 0, d->stream>>>(PTR(int64_t, packed), PTR(const int64_t, token_idx),
                                                           PTR(const int64_t, expert_idx), PTR(const int32_t, slots),
                                                           PTR(const int32_t, tslots), a, (int)k, (int)p, group_size,
                                                           width, adj);
    CU_LAUNCHED("ep_pack");
    return MOE_OK;
}

moe_status cuda_ep_unpack(moe_ctx *ctx, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                          const moe_tensor *perm) {
    const int64_t r = token_idx->shape[0], cells = moe_tensor_numel(slots);
    if (r > INT32_MAX) return moe_error(MOE_ERR_ARG, "ep_unpack: %lld rows do not fit i32 slots", (long long)r);
    CUDA_ENTER(d, ctx, token_idx->device);
    if (cells) CU_TRY(cudaMemsetAsync(moe_tensor_data(slots), 0xff, (size_t)cells * sizeof(int32_t), d->stream), "ep_unpack");
    if (r == 0) return MOE_OK;
    k_unpack<<<cuda_grid_1d(d, r, 256), 256, 0, d->stream>>>(PTR(int64_t, token_idx), PTR(int32_t, slots),
                                                             PTR(const int64_t, packed),
                                                             perm ? PTR(const int64_t, perm) : nullptr, r, cells,
                                                             slots->shape[1]);
    CU_LAUNCHED("ep_unpack");
    return MOE_OK;
}

moe_status cuda_ep_regroup(moe_ctx *ctx, moe_tensor *perm, moe_tensor *inv, const int64_t *starts, int64_t blocks) {
    const int64_t r = perm->shape[0];
    if (blocks > MOE_EP_MAX_BLOCKS)
        return moe_error(MOE_ERR_ARG, "ep_regroup: %lld (rank, expert) blocks, the device path takes at most %d",
                         (long long)blocks, MOE_EP_MAX_BLOCKS);
    CUDA_ENTER(d, ctx, perm->device);
    regroup_arg a;
    for (int64_t b = 0; b <= blocks; b++) a.g[b] = starts[b];
    for (int64_t b = 0; b < blocks; b++) a.v[b] = starts[blocks + 1 + b];
    k_regroup<<<cuda_grid_1d(d, r, 256), 256, 0, d->stream>>>(PTR(int64_t, perm), inv ? PTR(int64_t, inv) : nullptr, r,
                                                              (int)blocks, a);
    CU_LAUNCHED("ep_regroup");
    return MOE_OK;
}
