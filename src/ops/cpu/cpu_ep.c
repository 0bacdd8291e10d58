/* Expert-parallel routing maps on the CPU (ops.h: ep_token_slots,
 * slot_tokens, ep_pack, ep_unpack, ep_regroup). Single-threaded: they touch a few
 * integers per token. Every index is validated before anything is written,
 * so a bad map is reported instead of corrupting memory. */
#include "cpu.h"

#include <stdlib.h>

/* group of the kept choice in slot value s (slots [-1, A)); -1 when s < 0 */
static moe_status slot_group(const char *op, const int32_t *slots, const int64_t *ex, int64_t a, int64_t gs, int64_t p,
                             int64_t t, int64_t q, int64_t k, int64_t *g) {
    int32_t s = slots[t * k + q];
    *g = -1;
    if (s < 0) return MOE_OK;
    if (s >= a)
        return moe_error(MOE_ERR_RANGE, "%s: slot %d at position %lld (token %lld, choice %lld) is out of range, "
                         "expected [-1, %lld)", op, s, (long long)(t * k + q), (long long)t, (long long)q, (long long)a);
    int64_t e = ex[s];
    if (e < 0 || e / gs >= p)
        return moe_error(MOE_ERR_RANGE, "%s: expert %lld of assignment %d is outside the %lld ranks' %lld experts", op,
                         (long long)e, s, (long long)p, (long long)(p * gs));
    *g = e / gs;
    return MOE_OK;
}

moe_status moe_cpu_ep_token_slots(moe_ctx *ctx, moe_tensor *tslots, moe_tensor *counts_t, const moe_tensor *slots,
                                  const moe_tensor *expert_idx, int64_t group_size) {
    (void)ctx;
    int64_t *counts = moe_tensor_data(counts_t);
    const int64_t n = slots->shape[0], k = slots->shape[1], p = tslots->shape[1], a = expert_idx->shape[0];
    const int32_t *sl = moe_tensor_data((moe_tensor *)slots);
    const int64_t *ex = moe_tensor_data((moe_tensor *)expert_idx);
    int32_t *out = moe_tensor_data(tslots);
    /* validate first; count rows per rank */
    for (int64_t t = 0; t < n; t++) {
        for (int64_t q = 0; q < k; q++) {
            int64_t g;
            MOE_TRY(slot_group("ep_token_slots", sl, ex, a, group_size, p, t, q, k, &g));
        }
    }
    if (n * p > INT32_MAX) return moe_error(MOE_ERR_ARG, "ep_token_slots: %lld rows do not fit i32 slots", (long long)(n * p));
    for (int64_t i = 0; i < n * p; i++) out[i] = -1;
    for (int64_t t = 0; t < n; t++)
        for (int64_t q = 0; q < k; q++) {
            int32_t s = sl[t * k + q];
            if (s >= 0) out[t * p + ex[s] / group_size] = 0;   /* mark */
        }
    int64_t row = 0;
    for (int64_t d = 0; d < p; d++) {
        counts[d] = 0;
        for (int64_t t = 0; t < n; t++)
            if (out[t * p + d] >= 0) {
                out[t * p + d] = (int32_t)row++;
                counts[d]++;
            }
    }
    return MOE_OK;
}

moe_status moe_cpu_slot_tokens(moe_ctx *ctx, moe_tensor *token_idx, const moe_tensor *slots) {
    (void)ctx;
    const int64_t rows = token_idx->shape[0], n = slots->shape[0], m = slots->shape[1];
    const int32_t *sl = moe_tensor_data((moe_tensor *)slots);
    int64_t *out = moe_tensor_data(token_idx);
    int64_t *seen = calloc((size_t)rows, sizeof *seen);
    if (!seen) return moe_error(MOE_ERR_OOM, "slot_tokens: out of host memory");
    moe_status s = MOE_OK;
    for (int64_t i = 0; i < n * m && s == MOE_OK; i++) {
        int32_t v = sl[i];
        if (v < 0) continue;
        if (v >= rows)
            s = moe_error(MOE_ERR_RANGE, "slot_tokens: slot %d at position %lld is out of range, expected [-1, %lld)", v,
                          (long long)i, (long long)rows);
        else if (seen[v]++)
            s = moe_error(MOE_ERR_RANGE, "slot_tokens: row %d is named twice (again at position %lld)", v, (long long)i);
    }
    for (int64_t r = 0; r < rows && s == MOE_OK; r++)
        if (!seen[r]) s = moe_error(MOE_ERR_RANGE, "slot_tokens: row %lld of %lld is named by no slot", (long long)r, (long long)rows);
    if (s == MOE_OK)
        for (int64_t i = 0; i < n * m; i++)
            if (sl[i] >= 0) out[sl[i]] = i / m;
    free(seen);
    return s;
}

moe_status moe_cpu_ep_pack(moe_ctx *ctx, moe_tensor *packed, const moe_tensor *token_idx, const moe_tensor *expert_idx,
                           const moe_tensor *slots, const moe_tensor *tslots, int64_t group_size, int64_t width,
                           const int64_t *adjust) {
    (void)ctx;
    const int64_t a = packed->shape[0], n = slots->shape[0], k = slots->shape[1], p = tslots->shape[1];
    const int64_t *tok = moe_tensor_data((moe_tensor *)token_idx), *ex = moe_tensor_data((moe_tensor *)expert_idx);
    const int32_t *sl = moe_tensor_data((moe_tensor *)slots), *ts = moe_tensor_data((moe_tensor *)tslots);
    int64_t *out = moe_tensor_data(packed);
    for (int64_t i = 0; i < a; i++) {
        int64_t t = tok[i], e = ex[i];
        if (t < 0 || t >= n)
            return moe_error(MOE_ERR_RANGE, "ep_pack: token_idx %lld at position %lld is out of range, expected [0, %lld)",
                             (long long)t, (long long)i, (long long)n);
        if (e < 0 || e / group_size >= p)
            return moe_error(MOE_ERR_RANGE, "ep_pack: expert %lld at position %lld is outside the %lld ranks' %lld experts",
                             (long long)e, (long long)i, (long long)p, (long long)(p * group_size));
        int64_t d = e / group_size, q = 0, found = 0;
        for (int64_t c = 0; c < k && !found; c++) {
            int64_t g;
            MOE_TRY(slot_group("ep_pack", sl, ex, a, group_size, p, t, c, k, &g));
            if (sl[t * k + c] == i) found = 1;
            else if (g == d) q++;
        }
        if (!found)
            return moe_error(MOE_ERR_RANGE, "ep_pack: assignment %lld is not among token %lld's slots", (long long)i,
                             (long long)t);
        int32_t row = ts[t * p + d];
        if (row < 0 || q >= width)
            return moe_error(MOE_ERR_RANGE, "ep_pack: token %lld has no row for rank %lld (tslots %d) or choice %lld "
                             "does not fit width %lld", (long long)t, (long long)d, row, (long long)q, (long long)width);
        out[i] = (row + adjust[d]) * width + q;
    }
    return MOE_OK;
}

moe_status moe_cpu_ep_unpack(moe_ctx *ctx, moe_tensor *token_idx, moe_tensor *slots, const moe_tensor *packed,
                             const moe_tensor *perm) {
    (void)ctx;
    const int64_t r = token_idx->shape[0], u = slots->shape[0], w = slots->shape[1];
    const int64_t *pk = moe_tensor_data((moe_tensor *)packed);
    const int64_t *pm = perm ? moe_tensor_data((moe_tensor *)perm) : NULL;
    int64_t *tok = moe_tensor_data(token_idx);
    int32_t *out = moe_tensor_data(slots);
    if (r > INT32_MAX) return moe_error(MOE_ERR_ARG, "ep_unpack: %lld rows do not fit i32 slots", (long long)r);
    for (int64_t i = 0; i < r; i++) {
        int64_t j = pm ? pm[i] : i;
        if (j < 0 || j >= r)
            return moe_error(MOE_ERR_RANGE, "ep_unpack: perm %lld at position %lld is out of range, expected [0, %lld)",
                             (long long)j, (long long)i, (long long)r);
        if (pk[j] < 0 || pk[j] >= u * w)
            return moe_error(MOE_ERR_RANGE, "ep_unpack: packed %lld at position %lld is out of range, expected [0, %lld)",
                             (long long)pk[j], (long long)j, (long long)(u * w));
    }
    for (int64_t i = 0; i < u * w; i++) out[i] = -1;
    for (int64_t i = 0; i < r; i++) {
        int64_t v = pk[pm ? pm[i] : i];
        tok[i] = v / w;
        out[v] = (int32_t)i;
    }
    return MOE_OK;
}

moe_status moe_cpu_ep_regroup(moe_ctx *ctx, moe_tensor *perm, moe_tensor *inv, const int64_t *starts, int64_t blocks) {
    (void)ctx;
    const int64_t *g = starts, *v = starts + blocks + 1;
    int64_t *pm = moe_tensor_data(perm), *iv = inv ? moe_tensor_data(inv) : NULL;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t k = g[b]; k < g[b + 1]; k++) {
            pm[k] = v[b] + (k - g[b]);
            if (iv) iv[pm[k]] = k;
        }
    return MOE_OK;
}
