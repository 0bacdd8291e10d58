// Top-k routing on the device (moe_cuda_route.h), the device twin of the host
// path in src/nn/router.c for MOE_SELECT_TOPK.
//
// Kernels, in stream order:
//   k_tokens   one warp per token: logsumexp (f32 max, f64 sum of exp), scores
//              (softmax, or sigmoid as the host's 1/(1+expf(-x))), normalised
//              scores, entropy / top-1 / lse^2 per token, selection scores
//              (+ bias; NaN ranks last), top-k by k rounds of a warp arg-best
//              under the strict order (value desc, index asc) - the host's
//              tie rule -, each choice's combine weight (the renormalising sum
//              in the host's order), and integer histograms: choices per
//              (rank q, expert) and per (aux group, expert).
//   k_colsum   (aux only) column sums of the normalised scores per group, in
//              chunks of tokens: fixed-order partial sums.
//   k_plan     one block: per expert the kept count under GShard priority
//              (all first choices before any second choice), which makes
//              threshold T[q][e] = how many of the rank-q choices of e in
//              token order are kept; offsets (a block scan); dispatch
//              fractions; the sums of the statistics; the aux and z losses.
//   k_chunk_counts  per (chunk of tokens, expert) the choices of e of wholly
//              kept ranks and of the partly kept one;
//   k_assign   one block per (chunk of tokens, expert): adds up the counts of
//              the chunks before, then ranks the chunk's kept
//              choices of e in token order by ballot scans (for the one rank
//              whose choices of e are only partly kept - at most one - its
//              own rank decides which stay); each kept choice gets the slot
//              offsets[e] + rank: expert-contiguous, token order within an
//              expert.
// then one device->host copy of the summary (offsets, counts, dropped, the
// statistics' sums, aux) and one stream synchronisation.
//
// Exactness: every value the host computes in f32 or f64 is computed here
// with the same operations in the same precision (explicit _rn intrinsics
// where the compiler could otherwise fuse a multiply-add), so scores, choices
// and weights match the host bit for bit, except when the host's and the
// device's exp() round differently (f64 exp: almost never visible after the
// f32 rounding). Sums over many terms (the softmax denominator, statistics,
// column sums, aux) are fixed-order trees: a few f64 ulps from the host's
// sequential sums, and the same bytes on every run (no float atomics; the
// integer atomics only count).
#include "cuda_common.cuh"
#include "moe_cuda_route.h"

namespace {

constexpr int RW = 4;              // warps (tokens in flight) per block in the row kernels
constexpr int PLAN_THREADS = 1024;
constexpr int ASSIGN_THREADS = 512;
constexpr int CHUNK = 1024;        // tokens per column-sum block
constexpr unsigned FULL = 0xffffffffu;

// The bias travels by value (4 KB of kernel arguments, fine since CUDA 12.1):
// no host->device copy from pageable memory, which may synchronise.
struct bias_arg { float v[MOE_CUDA_ROUTE_MAX_E]; };

__device__ __forceinline__ double warp_sum_d(double v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL, v, o);
    return v;   // the same bytes in every lane (a + b == b + a)
}

// Four block-wide sums at once (warp trees, then a tree over the warps' sums:
// fixed order, the same bytes every run), with one pair of barriers for all four
__device__ __forceinline__ void block_sum_d4(double (&v)[4], double *sh) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = warp_sum_d(v[k]);
    __syncthreads();
    if (lane == 0)
#pragma unroll
        for (int k = 0; k < 4; k++) sh[k * 32 + w] = v[k];
    __syncthreads();
#pragma unroll
    for (int k = 0; k < 4; k++) v[k] = warp_sum_d(lane < nw ? sh[k * 32 + lane] : 0.0);
}

// exclusive prefix sum over the block (thread order); *total gets the sum
__device__ long long block_scan(long long v, long long *sh, long long *total) {
    int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    long long x = v;
    for (int o = 1; o < 32; o <<= 1) {
        long long y = __shfl_up_sync(FULL, x, o);
        if (lane >= o) x += y;
    }
    __syncthreads();
    if (lane == 31) sh[w] = x;
    __syncthreads();
    if (w == 0) {
        long long s = lane < nw ? sh[lane] : 0;
        for (int o = 1; o < 32; o <<= 1) {
            long long y = __shfl_up_sync(FULL, s, o);
            if (lane >= o) s += y;
        }
        sh[lane] = s;
    }
    __syncthreads();
    *total = sh[nw - 1];
    return (w > 0 ? sh[w - 1] : 0) + x - v;
}

// the host's sigmoidf_: 1.0f / (1.0f + expf(-x)), expf correctly rounded
__device__ __forceinline__ float sigmoid_host(float x) {
    float e = (float)exp(-(double)x);
    return __fdiv_rn(1.0f, __fadd_rn(1.0f, e));
}

// does (va, ia) rank before (vb, ib)? (no NaN reaches here)
__device__ __forceinline__ bool before(float va, int ia, float vb, int ib) {
    return va > vb || (va == vb && ia < ib);
}

template <typename T> __device__ __forceinline__ float load_f(const void *p, int64_t i) {
    return to_f32(((const T *)p)[i]);
}

// ---- k_tokens ----

struct tok_args {
    const void *logits;
    int64_t n, seq_len;
    int e, k, softmax, renorm, has_bias, seq;
    float scale;
    float *s, *pn, *zsm, *lse;
    double *st;            // [3][n]: entropy, top-1 probability, lse^2 per token
    int32_t *chosen;       // [n, k]
    float *wq;             // [n, k] combine weight of each choice
    unsigned *cnt_q;       // [k, e]
    unsigned *grp;         // [groups, e] or NULL
};

// token i's logsumexp and statistics: entropy, top-1 probability, lse^2 (st is [3][n])
__device__ __forceinline__ void store_token_stats(const tok_args &a, int64_t i, float lse, double h, float mx) {
    a.lse[i] = lse;
    a.st[i] = h;
    a.st[a.n + i] = (double)mx;
    a.st[2 * a.n + i] = __dmul_rn((double)lse, (double)lse);
}

template <typename T>
__global__ void __launch_bounds__(RW * 32) k_tokens(tok_args a, bias_arg b) {
    extern __shared__ float shm[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, E = a.e, K = a.k;
    float *row = shm + (size_t)w * 2 * E, *sel = row + E;
    for (int64_t i = (int64_t)blockIdx.x * RW + w; i < a.n; i += (int64_t)gridDim.x * RW) {
        const T *lr = (const T *)a.logits + i * E;
        float m = -INFINITY;
        for (int j = lane; j < E; j += 32) {
            float v = to_f32(lr[j]);
            row[j] = v;
            m = fmaxf(m, v);
        }
        m = warp_max(m);
        double den = 0;
        for (int j = lane; j < E; j += 32) den += exp((double)(row[j] - m));
        den = warp_sum_d(den);
        const float lse = (float)((double)m + log(den));
        double tot = 0;
        for (int j = lane; j < E; j += 32) {
            float x = row[j], sc;
            if (a.softmax) {
                sc = (float)(exp((double)(x - m)) / den);
            } else {
                sc = sigmoid_host(x);
                tot += (double)sc;
                a.zsm[i * E + j] = (float)(exp((double)(x - m)) / den);
            }
            row[j] = sc;
            a.s[i * E + j] = sc;
        }
        if (!a.softmax) tot = warp_sum_d(tot);
        double h = 0;
        float mx = 0.0f;
        for (int j = lane; j < E; j += 32) {
            float sc = row[j], p = a.softmax ? sc : (float)((double)sc / tot);
            if (!a.softmax) a.pn[i * E + j] = p;
            if (p > 0) h -= __dmul_rn((double)p, log((double)p));
            if (p > mx) mx = p;
            float v = a.has_bias ? __fadd_rn(sc, b.v[j]) : sc;
            sel[j] = v == v ? v : -INFINITY;
        }
        h = warp_sum_d(h);
        mx = warp_max(mx);
        if (lane == 0) store_token_stats(a, i, lse, h, mx);
        __syncwarp();
        // top-k: round q picks the best element ranking strictly after round q-1's pick
        int32_t *ch = a.chosen + i * K;
        float pv = INFINITY;
        int pi = -1;
        for (int q = 0; q < K; q++) {
            float bv = -INFINITY;
            int bi = -1;
            for (int j = lane; j < E; j += 32) {
                float v = sel[j];
                if (q > 0 && !before(pv, pi, v, j)) continue;
                if (bi < 0 || before(v, j, bv, bi)) { bv = v; bi = j; }
            }
            for (int o = 16; o > 0; o >>= 1) {
                float v2 = __shfl_xor_sync(FULL, bv, o);
                int i2 = __shfl_xor_sync(FULL, bi, o);
                if (i2 >= 0 && (bi < 0 || before(v2, i2, bv, bi))) { bv = v2; bi = i2; }
            }
            if (lane == 0) ch[q] = bi;
            pv = bv;
            pi = bi;
        }
        __syncwarp();
        // weights: the renormalising sum in the host's order (q ascending, f32)
        float wden = 0.0f;
        if (lane == 0 && a.renorm)
            for (int q = 0; q < K; q++) wden = __fadd_rn(wden, row[ch[q]]);
        wden = __shfl_sync(FULL, wden, 0);
        if (!(wden > 0.0f)) wden = 1e-20f;
        const int64_t g = a.seq ? i / a.seq_len : 0;
        for (int q = lane; q < K; q += 32) {
            int c = ch[q];
            float sc = row[c], wv = a.renorm ? __fdiv_rn(sc, wden) : sc;
            a.wq[i * K + q] = __fmul_rn(wv, a.scale);
            atomicAdd(&a.cnt_q[(int64_t)q * E + c], 1u);
            if (a.grp) atomicAdd(&a.grp[g * E + c], 1u);
        }
        __syncwarp();   // row and sel are rewritten for the next token
    }
}

// ---- k_tokens_reg: the same results for E <= 32 * EPL and K <= 32, in registers ----
//
// Lane l holds experts l, l + 32, ... (EPL of them). Each exp is taken once,
// the entropy's log p as (x - m) - log(den) for softmax (the host's log of the
// f32-rounded p differs by its rounding, ~1e-8 relative on the sum), and a
// top-k round is two warp reductions: the largest order-preserving key of the
// lanes' best remaining values, then the smallest index among the lanes that
// hold it - the strict order (value desc, index asc) of k_tokens. k_tokens
// ran ~1200 instructions per token (35 us per layer at 8192 x 32, top-4),
// half of them in its shuffle arg-best rounds.

// order-preserving key of a non-NaN float (-0 taken as +0, as == does); 0 ranks below every value
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned u = __float_as_uint(v == 0.0f ? 0.0f : v);
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

constexpr int RWR = 16;   // warps (tokens in flight) per block in k_tokens_reg

template <typename T, int EPL>
__global__ void __launch_bounds__(RWR * 32) k_tokens_reg(const __grid_constant__ tok_args a,
                                                         const __grid_constant__ bias_arg b) {
    // The histograms go through shared memory: a block adds its tokens' choices
    // there, then one global atomic per touched bin (the sequence-aux groups' at
    // the end of each chunk of RWR tokens, the rest at the end). Straight global atomics
    // from every token serialised on a few addresses when routing is skewed
    // (every token on the same experts: 8192 adds to one counter, ~33 us).
    extern __shared__ unsigned hs[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, E = a.e, K = a.k;
    unsigned *hq = hs, *hg = hs + K * E;   // [K][E], then two groups' [E] (the block's chunk spans at most two)
    for (int j = threadIdx.x; j < K * E + 2 * E; j += blockDim.x) hs[j] = 0;
    __syncthreads();
    for (int64_t base = (int64_t)blockIdx.x * RWR; base < a.n; base += (int64_t)gridDim.x * RWR) {
        const int64_t i = base + w, g0 = a.seq ? base / a.seq_len : 0;
        if (i < a.n) {
            const T *lr = (const T *)a.logits + i * E;
            float x[EPL], sc[EPL];
            double ex[EPL];
            float m = -INFINITY;
#pragma unroll
            for (int u = 0; u < EPL; u++) {
                const int j = lane + 32 * u;
                x[u] = j < E ? to_f32(lr[j]) : -INFINITY;
                m = fmaxf(m, x[u]);
            }
            m = warp_max(m);
            double den = 0;
#pragma unroll
            for (int u = 0; u < EPL; u++) {
                ex[u] = lane + 32 * u < E ? exp((double)(x[u] - m)) : 0.0;
                den += ex[u];
            }
            den = warp_sum_d(den);
            const double lden = log(den);
            const float lse = (float)((double)m + lden);
            double tot = 0;
#pragma unroll
            for (int u = 0; u < EPL; u++) {
                const int j = lane + 32 * u;
                if (j >= E) { sc[u] = 0.0f; continue; }
                if (a.softmax) {
                    sc[u] = (float)(ex[u] / den);
                } else {
                    sc[u] = sigmoid_host(x[u]);
                    tot += (double)sc[u];
                    a.zsm[i * E + j] = (float)(ex[u] / den);
                }
                a.s[i * E + j] = sc[u];
            }
            if (!a.softmax) tot = warp_sum_d(tot);
            double h = 0;
            float mx = 0.0f;
            unsigned key[EPL];
#pragma unroll
            for (int u = 0; u < EPL; u++) {
                const int j = lane + 32 * u;
                key[u] = 0;
                if (j >= E) continue;
                const float p = a.softmax ? sc[u] : (float)((double)sc[u] / tot);
                if (!a.softmax) a.pn[i * E + j] = p;
                if (p > 0) {
                    const double lp = a.softmax ? (double)(x[u] - m) - lden : log((double)p);
                    h -= __dmul_rn((double)p, lp);
                }
                if (p > mx) mx = p;
                const float v = a.has_bias ? __fadd_rn(sc[u], b.v[j]) : sc[u];
                key[u] = order_key(v == v ? v : -INFINITY);
            }
            h = warp_sum_d(h);
            mx = warp_max(mx);
            if (lane == 0) store_token_stats(a, i, lse, h, mx);
            // top-k; lane q keeps choice q and its score; wden sums the scores in q order (f32, as the host)
            int my_c = -1;
            float my_sc = 0.0f, wden = 0.0f;
            for (int q = 0; q < K; q++) {
                unsigned bk = 0;
                int bj = 0x7fffffff;
#pragma unroll
                for (int u = 0; u < EPL; u++)
                    if (key[u] > bk) { bk = key[u]; bj = lane + 32 * u; }   // increasing j: the smallest index of a tie
                const unsigned mk = __reduce_max_sync(FULL, bk);
                const int c = (int)__reduce_min_sync(FULL, bk == mk ? (unsigned)bj : 0x7fffffffu);
                float cs = 0.0f;
#pragma unroll
                for (int u = 0; u < EPL; u++)
                    if (c == lane + 32 * u) { key[u] = 0; cs = sc[u]; }
                cs = __shfl_sync(FULL, cs, c & 31);
                if (a.renorm) wden = __fadd_rn(wden, cs);
                if (lane == q) { my_c = c; my_sc = cs; }
            }
            if (!(wden > 0.0f)) wden = 1e-20f;
            if (lane < K) {
                a.chosen[i * K + lane] = my_c;
                const float wv = a.renorm ? __fdiv_rn(my_sc, wden) : my_sc;
                a.wq[i * K + lane] = __fmul_rn(wv, a.scale);
                atomicAdd(&hq[lane * E + my_c], 1u);
                if (a.grp) {
                    const int64_t g = a.seq ? i / a.seq_len : 0;
                    if (g - g0 < 2) atomicAdd(&hg[(g - g0) * E + my_c], 1u);
                    else atomicAdd(&a.grp[g * E + my_c], 1u);   // sequences shorter than a block's chunk
                }
            }
        }
        if (a.grp && a.seq) {   // the chunk's groups, before the next chunk's reuse the two slots
            __syncthreads();
            for (int j = threadIdx.x; j < 2 * E; j += blockDim.x)
                if (hg[j]) {
                    atomicAdd(&a.grp[(g0 + j / E) * E + j % E], hg[j]);
                    hg[j] = 0;
                }
            __syncthreads();
        }
    }
    __syncthreads();
    for (int j = threadIdx.x; j < K * E; j += blockDim.x)
        if (hq[j]) atomicAdd(&a.cnt_q[j], hq[j]);
    if (a.grp && !a.seq)   // one group (batch aux): its slot 0 took every token
        for (int j = threadIdx.x; j < E; j += blockDim.x)
            if (hg[j]) atomicAdd(&a.grp[j], hg[j]);
}

// ---- k_colsum: part[g][c][e] = sum of p[t][e] over chunk c of group g ----

__global__ void __launch_bounds__(1024) k_colsum(const float *p, int E, int64_t per, int64_t chunks, int etiles,
                                                 double *part) {
    __shared__ double sh[32][33];
    int64_t b = blockIdx.x;
    const int et = (int)(b % etiles);
    b /= etiles;
    const int64_t c = b % chunks, g = b / chunks;
    const int tx = threadIdx.x & 31, ty = threadIdx.x >> 5;
    const int e = et * 32 + tx;
    const int64_t t0 = g * per + c * CHUNK, t1 = min(t0 + (int64_t)CHUNK, (g + 1) * per);
    double acc = 0;
    if (e < E)
        for (int64_t t = t0 + ty; t < t1; t += 32) acc += (double)p[t * E + e];
    sh[ty][tx] = acc;
    __syncthreads();
    if (ty == 0 && e < E) {
        double s = 0;
        for (int y = 0; y < 32; y++) s += sh[y][tx];
        part[(g * chunks + c) * E + e] = s;
    }
}

// ---- k_plan ----

struct plan_args {
    int64_t n, cap, per, groups, chunks;
    int e, k, aux;
    const unsigned *cnt_q, *grp;
    const double *st, *part;
    float *f;
    long long *thr;        // [k, e]
    long long *sum;        // summary, MOE_CUDA_ROUTE_SUMMARY(e) slots
    float *aux_loss, *z_loss;
};

// p[0] + p[stride] + ... (count terms) added in order from 0, the loads
// requested eight at a time: one add a load waited for each load in turn (~30
// L2 latencies in k_plan)
__device__ __forceinline__ double strided_sum(const double *p, int64_t count, int64_t stride) {
    double s = 0;
    int64_t c = 0;
    for (; c + 8 <= count; c += 8) {
        double t[8];
#pragma unroll
        for (int u = 0; u < 8; u++) t[u] = p[(c + u) * stride];
#pragma unroll
        for (int u = 0; u < 8; u++) s += t[u];
    }
    for (; c < count; c++) s += p[c * stride];
    return s;
}

__global__ void __launch_bounds__(PLAN_THREADS) k_plan(plan_args a) {
    __shared__ long long shl[32];
    __shared__ double shd[4 * 32];
    const int E = a.e, K = a.k;
    long long *offsets = a.sum, *counts = a.sum + E + 1;
    // kept per expert: first choices of all tokens, then second choices, ... until the capacity
    long long kept = 0;
    const int e = threadIdx.x;   // E <= MOE_CUDA_ROUTE_MAX_E == PLAN_THREADS
    if (e < E) {
        for (int q = 0; q < K; q++) {
            long long c = a.cnt_q[(int64_t)q * E + e], t = c;
            if (a.cap > 0) {
                long long room = a.cap - kept;   // the host's counts[e] < cap test, per rank
                t = c < room ? c : room;
            }
            a.thr[(int64_t)q * E + e] = t;
            kept += t;
        }
        counts[e] = kept;
    }
    long long total;
    long long off = block_scan(kept, shl, &total);
    if (e < E) offsets[e] = off;
    if (threadIdx.x == 0) {
        offsets[E] = total;
        a.sum[2 * E + 1] = a.n * K - total;   // dropped
    }
    // dispatch fractions: choices before capacity / (tokens in the group * k)
    const double per_k = (double)a.per * (double)K;
    if (a.f)
        for (int64_t x = threadIdx.x; x < a.groups * E; x += blockDim.x) a.f[x] = (float)((double)a.grp[x] / per_k);
    // statistics: each thread's terms in order
    double acc[4] = {0, 0, 0, 0};
    const int64_t mine = a.n > (int64_t)threadIdx.x ? (a.n - threadIdx.x + blockDim.x - 1) / blockDim.x : 0;
    for (int s = 0; s < 3; s++) acc[s] = strided_sum(a.st + s * a.n + threadIdx.x, mine, blockDim.x);
    // aux = E * sum_e f_e P_e, averaged over groups (P: mean normalised score over the group's tokens)
    if (a.f) {
        for (int64_t x = threadIdx.x; x < a.groups * E; x += blockDim.x) {
            int64_t g = x / E, j = x - g * E;
            double pm = strided_sum(a.part + g * a.chunks * E + j, a.chunks, E);
            pm /= (double)a.per;
            float fx = (float)((double)a.grp[x] / per_k);
            acc[3] += __dmul_rn(__dmul_rn((double)E, (double)fx), pm);
        }
    }
    // the four sums through one block reduction
    block_sum_d4(acc, shd);
    const double aux = a.f ? acc[3] / (double)a.groups : 0.0;
    if (threadIdx.x == 0) {
        // summary order = moe_route_stats: entropy, z (mean lse^2), top1, aux; acc holds entropy, top1, lse^2
        double out[4] = {acc[0], acc[2], acc[1], aux};
        for (int s = 0; s < 4; s++) a.sum[2 * E + 2 + s] = __double_as_longlong(out[s]);
        *a.aux_loss = (float)aux;
        *a.z_loss = (float)(acc[2] / (double)a.n);
    }
}

// ---- k_chunk_counts, k_assign: block (chunk c of ASSIGN_CHUNK tokens, expert e) ----
//
// A choice of e is kept when its rank q is wholly kept, or q is the one partly
// kept rank qp and fewer than thr[qp][e] rank-qp choices of e come before it
// in token order. k_chunk_counts counts per chunk the choices of e of wholly
// kept ranks and of rank qp (order-free); k_assign adds up the counts of the
// chunks before its own (kept before = full + min(thr, rank-qp count)), then
// walks its chunk in tiles of one token per thread, ranked by ballot scans:
// reads are coalesced and E x chunks blocks share the work (one block per
// expert scanning every token serially took ~56 us at 8192 tokens x top-4).

constexpr int ASSIGN_CHUNK = 1024;

struct assign_args {
    int64_t n;
    int e, k;
    const int32_t *chosen;
    const float *wq;
    const unsigned *cnt_q;
    const long long *thr, *sum;
    unsigned *ccnt;   // [e][chunks][2]: choices of e of wholly kept ranks, of the partly kept rank
    int64_t *token_idx, *expert_idx;
    void *weights;
    int32_t *pos;
};

__device__ __forceinline__ int rank_of(const int32_t *ch, int K, int e) {
    for (int q = 0; q < K; q++)
        if (ch[q] == e) return q;
    return -1;
}

// exclusive rank of this thread's flag among the block's set flags (thread
// order); *total gets their number. wsum: 32 ints of shared memory.
__device__ __forceinline__ int flag_scan(bool f, int *wsum, int *total) {
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, nw = blockDim.x >> 5;
    unsigned m = __ballot_sync(FULL, f);
    if (lane == 0) wsum[w] = __popc(m);
    __syncthreads();
    int base = 0, tot = 0;
    for (int j = 0; j < nw; j++) {
        int c = wsum[j];
        base += j < w ? c : 0;
        tot += c;
    }
    __syncthreads();   // wsum is rewritten by the next call
    *total = tot;
    return base + __popc(m & ((1u << lane) - 1u));
}

// per rank of e: 0 none kept, 1 all kept, 2 partly (the returned rank, -1 if none)
__device__ __forceinline__ int rank_states(const assign_args &a, int e, unsigned char *state, int *partial) {
    if (threadIdx.x == 0) *partial = -1;
    __syncthreads();
    for (int q = threadIdx.x; q < a.k; q += blockDim.x) {
        long long c = a.cnt_q[(int64_t)q * a.e + e], t = a.thr[(int64_t)q * a.e + e];
        state[q] = t >= c ? 1 : t == 0 ? 0 : 2;
        if (state[q] == 2) *partial = q;   // at most one rank per expert is partly kept
    }
    __syncthreads();
    return *partial;
}

__global__ void __launch_bounds__(ASSIGN_THREADS) k_chunk_counts(assign_args a) {
    __shared__ long long shl[32];
    __shared__ unsigned char state[MOE_CUDA_ROUTE_MAX_E];
    __shared__ int partial;
    const int e = blockIdx.y;
    const int qp = rank_states(a, e, state, &partial);
    const int64_t c0 = (int64_t)blockIdx.x * ASSIGN_CHUNK, c1 = min(a.n, c0 + ASSIGN_CHUNK);
    long long full = 0, part = 0;
    for (int64_t i = c0 + threadIdx.x; i < c1; i += blockDim.x) {
        int q = rank_of(a.chosen + i * a.k, a.k, e);
        full += q >= 0 && state[q] == 1;
        part += q >= 0 && q == qp;
    }
    long long tf, tp;
    block_scan(full, shl, &tf);
    block_scan(part, shl, &tp);
    if (threadIdx.x == 0) {
        unsigned *c = a.ccnt + ((int64_t)e * gridDim.x + blockIdx.x) * 2;
        c[0] = (unsigned)tf;
        c[1] = (unsigned)tp;
    }
}

template <typename T>
__global__ void __launch_bounds__(ASSIGN_THREADS) k_assign(assign_args a) {
    __shared__ long long shl[32];
    __shared__ int wsum[32];
    __shared__ unsigned char state[MOE_CUDA_ROUTE_MAX_E];
    __shared__ int partial;
    const int e = blockIdx.y, K = a.k;
    const int qp = rank_states(a, e, state, &partial);
    const long long lim = qp >= 0 ? a.thr[(int64_t)qp * a.e + e] : 0;
    const int64_t c0 = (int64_t)blockIdx.x * ASSIGN_CHUNK, c1 = min(a.n, c0 + ASSIGN_CHUNK);
    // the chunks before this one: kept choices of e, and rank-qp choices of e
    long long full = 0, part = 0;
    const unsigned *cc = a.ccnt + (int64_t)e * gridDim.x * 2;
    for (int c = threadIdx.x; c < (int)blockIdx.x; c += blockDim.x) {
        full += cc[2 * c];
        part += cc[2 * c + 1];
    }
    long long tot;
    block_scan(full, shl, &tot);
    long long before = tot;
    block_scan(part, shl, &tot);
    part = tot;
    if (qp >= 0) before += part < lim ? part : lim;
    long long d0 = a.sum[e] + before;
    T *wp = (T *)a.weights;
    for (int64_t t0 = c0; t0 < c1; t0 += blockDim.x) {
        const int64_t i = t0 + threadIdx.x;
        const int q = i < c1 ? rank_of(a.chosen + i * K, K, e) : -1;
        bool kept = q >= 0 && state[q] == 1;
        if (qp >= 0) {   // block-uniform
            int np, r = flag_scan(q >= 0 && q == qp, wsum, &np);
            if (q >= 0 && q == qp) kept = part + r < lim;
            part += np;
        }
        int nk, r = flag_scan(kept, wsum, &nk);
        if (kept) {
            const long long d = d0 + r;
            a.token_idx[d] = i;
            a.expert_idx[d] = e;
            wp[d] = from_f32<T>(a.wq[i * K + q]);
            a.pos[i * K + q] = (int32_t)d;
        }
        d0 += nk;
    }
}

// ---- backward: one warp per token ----

template <typename T>
__global__ void __launch_bounds__(RW * 32) k_backward(moe_cuda_route_bwd a) {
    extern __shared__ double shb[];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5, E = (int)a.e, K = (int)a.k;
    double *ds = shb + (size_t)w * E;
    const double scale = (double)a.scale;
    double daux = 0, dz = 0;
    if (a.daux) daux = a.daux_bf16 ? (double)load_f<bf16>(a.daux, 0) : (double)load_f<float>(a.daux, 0);
    if (a.dz) dz = a.dz_bf16 ? (double)load_f<bf16>(a.dz, 0) : (double)load_f<float>(a.dz, 0);
    const bool use_aux = a.daux && a.aux != MOE_CUDA_ROUTE_AUX_NONE;
    for (int64_t i = (int64_t)blockIdx.x * RW + w; i < a.n; i += (int64_t)gridDim.x * RW) {
        const float *s = a.s + i * E;
        const int32_t *ch = a.chosen + i * K, *ps = a.pos + i * K;
        for (int j = lane; j < E; j += 32) ds[j] = 0.0;
        __syncwarp();
        // combine weights -> scores
        if (a.dweights) {
            double sum = 0, dot = 0;
            for (int q = lane; q < K; q += 32) {
                int p = ps[q];
                double g = p >= 0 ? (double)load_f<T>(a.dweights, p) * scale : 0.0, sc = s[ch[q]];
                sum += sc;
                dot += __dmul_rn(g, sc);
            }
            if (a.renormalize) {
                sum = warp_sum_d(sum);
                dot = warp_sum_d(dot);
                if (sum <= 0) sum = 1e-20;
            }
            for (int q = lane; q < K; q += 32) {
                int p = ps[q];
                double g = p >= 0 ? (double)load_f<T>(a.dweights, p) * scale : 0.0;
                ds[ch[q]] = a.renormalize ? g / sum - dot / __dmul_rn(sum, sum) : g;
            }
        }
        __syncwarp();
        // auxiliary loss -> normalised scores -> scores
        if (use_aux) {
            const bool seq = a.aux == MOE_CUDA_ROUTE_AUX_SEQUENCE;
            const int64_t g = seq ? i / a.seq_len : 0, per = seq ? a.seq_len : a.n;
            const float *f = a.f + g * E;
            const double den = (double)per * (double)a.groups;
            if (a.softmax) {
                for (int j = lane; j < E; j += 32) ds[j] += __dmul_rn(__dmul_rn(daux, (double)E), (double)f[j]) / den;
            } else {
                const float *p = a.pn + i * E;
                double tot = 0, dot = 0;
                for (int j = lane; j < E; j += 32) {
                    double dpp = __dmul_rn(__dmul_rn(daux, (double)E), (double)f[j]) / den;
                    tot += (double)s[j];
                    dot += __dmul_rn(dpp, (double)p[j]);
                }
                tot = warp_sum_d(tot);
                dot = warp_sum_d(dot);
                for (int j = lane; j < E; j += 32) {
                    double dpp = __dmul_rn(__dmul_rn(daux, (double)E), (double)f[j]) / den;
                    ds[j] += (dpp - dot) / tot;
                }
            }
        }
        __syncwarp();
        // scores -> logits, plus the z-loss
        double dot = 0;
        if (a.softmax) {
            for (int j = lane; j < E; j += 32) dot += __dmul_rn(ds[j], (double)s[j]);
            dot = warp_sum_d(dot);
        }
        const double cz = a.dz ? __dmul_rn(__dmul_rn(dz, 2.0), (double)a.lse[i]) / (double)a.n : 0.0;
        const float *sm = a.softmax ? s : a.zsm + i * E;
        T *out = (T *)a.dlogits + i * E;
        for (int j = lane; j < E; j += 32) {
            double sj = s[j];
            double o = a.softmax ? __dmul_rn(sj, ds[j] - dot) : __dmul_rn(__dmul_rn(ds[j], sj), 1.0 - sj);
            if (a.dz) o = __dadd_rn(o, __dmul_rn(cz, (double)sm[j]));
            out[j] = from_f32<T>((float)o);
        }
        __syncwarp();   // ds is rewritten for the next token
    }
}

size_t align_up(size_t x) { return (x + 255) & ~(size_t)255; }

}  // namespace

extern "C" moe_status moe_cuda_route_forward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_fwd *a) {
    const int64_t n = a->n, E = a->e, K = a->k;
    if (n < 1 || E < 1 || E > MOE_CUDA_ROUTE_MAX_E || K < 1 || K > E || n * K > INT32_MAX)
        return moe_error(MOE_ERR_ARG, "route on cuda: unsupported sizes n=%lld e=%lld k=%lld", (long long)n,
                         (long long)E, (long long)K);
    CUDA_ENTER(d, ctx, dev);
    const bool aux = a->aux != MOE_CUDA_ROUTE_AUX_NONE;
    const int64_t groups = aux ? a->groups : 1, per = a->aux == MOE_CUDA_ROUTE_AUX_SEQUENCE ? a->seq_len : n;
    const int64_t chunks = (per + CHUNK - 1) / CHUNK;
    const int etiles = (int)((E + 31) / 32);
    // scratch: per-token statistics, choice weights, histograms, thresholds, chunk counts, column sums, summary
    size_t o_st = 0, o_wq = align_up(o_st + (size_t)(3 * n) * sizeof(double));
    size_t o_cnt = align_up(o_wq + (size_t)(n * K) * sizeof(float));
    size_t n_cnt = (size_t)(K * E + (aux ? groups * E : 0));
    size_t o_thr = align_up(o_cnt + n_cnt * sizeof(unsigned));
    const int64_t achunks = (n + ASSIGN_CHUNK - 1) / ASSIGN_CHUNK;
    size_t o_ccnt = align_up(o_thr + (size_t)(K * E) * sizeof(long long));
    size_t o_part = align_up(o_ccnt + (size_t)(E * achunks * 2) * sizeof(unsigned));
    size_t o_sum = align_up(o_part + (aux ? (size_t)(groups * chunks * E) * sizeof(double) : 0));
    size_t nbytes = o_sum + (size_t)MOE_CUDA_ROUTE_SUMMARY(E) * sizeof(long long);
    cuda_scratch scr(d, nbytes);
    if (!scr.p) return moe_last_status();
    char *base = (char *)scr.p;
    unsigned *cnt_q = (unsigned *)(base + o_cnt), *grp = aux ? cnt_q + K * E : nullptr;
    long long *sum = (long long *)(base + o_sum);
    CU_TRY(cudaMemsetAsync(cnt_q, 0, n_cnt * sizeof(unsigned), d->stream), "route");
    CU_TRY(cudaMemsetAsync(a->pos, 0xff, (size_t)(n * K) * sizeof(int32_t), d->stream), "route");

    tok_args ta;
    ta.logits = a->logits; ta.n = n; ta.seq_len = a->seq_len; ta.e = (int)E; ta.k = (int)K;
    ta.softmax = a->softmax; ta.renorm = a->renormalize; ta.has_bias = a->bias != NULL;
    ta.seq = a->aux == MOE_CUDA_ROUTE_AUX_SEQUENCE; ta.scale = a->scale;
    ta.s = a->s; ta.pn = a->pn; ta.zsm = a->zsm; ta.lse = a->lse; ta.st = (double *)(base + o_st);
    ta.chosen = a->chosen; ta.wq = (float *)(base + o_wq); ta.cnt_q = cnt_q; ta.grp = grp;
    bias_arg b;
    for (int64_t j = 0; j < E; j++) b.v[j] = a->bias ? a->bias[j] : 0.0f;
    int64_t blocks = (n + RW - 1) / RW, cap = (int64_t)d->sm_count * 16;
    unsigned g1 = (unsigned)(blocks < cap ? blocks : cap);
    size_t smem = (size_t)RW * 2 * (size_t)E * sizeof(float);
    if (K <= 32 && E <= 128) {
        // elements per lane: 1, 2 or 4; one token per warp, as many blocks as fit at once
        const size_t hsm = (size_t)(K * E + 2 * E) * sizeof(unsigned);
        auto kern = E <= 32 ? (a->bf16 ? k_tokens_reg<bf16, 1> : k_tokens_reg<float, 1>)
                  : E <= 64 ? (a->bf16 ? k_tokens_reg<bf16, 2> : k_tokens_reg<float, 2>)
                            : (a->bf16 ? k_tokens_reg<bf16, 4> : k_tokens_reg<float, 4>);
        int per_sm = 1;
        CU_TRY(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, RWR * 32, hsm), "route tokens");
        const int64_t rb = (n + RWR - 1) / RWR, rcap = (int64_t)d->sm_count * (per_sm > 0 ? per_sm : 1);
        kern<<<(unsigned)(rb < rcap ? rb : rcap), RWR * 32, hsm, d->stream>>>(ta, b);
    } else if (a->bf16) k_tokens<bf16><<<g1, RW * 32, smem, d->stream>>>(ta, b);
    else k_tokens<float><<<g1, RW * 32, smem, d->stream>>>(ta, b);
    CU_LAUNCHED("route tokens");

    double *part = aux ? (double *)(base + o_part) : nullptr;
    if (aux) {
        k_colsum<<<(unsigned)(groups * chunks * etiles), 1024, 0, d->stream>>>(a->softmax ? a->s : a->pn, (int)E, per,
                                                                              chunks, etiles, part);
        CU_LAUNCHED("route column sums");
    }

    plan_args pa;
    pa.n = n; pa.cap = a->capacity; pa.per = per; pa.groups = groups; pa.chunks = chunks;
    pa.e = (int)E; pa.k = (int)K; pa.aux = a->aux;
    pa.cnt_q = cnt_q; pa.grp = grp; pa.st = ta.st; pa.part = part; pa.f = aux ? a->f : nullptr;
    pa.thr = (long long *)(base + o_thr); pa.sum = sum; pa.aux_loss = a->aux_loss; pa.z_loss = a->z_loss;
    k_plan<<<1, PLAN_THREADS, 0, d->stream>>>(pa);
    CU_LAUNCHED("route plan");

    assign_args sa;
    sa.n = n; sa.e = (int)E; sa.k = (int)K; sa.chosen = a->chosen; sa.wq = ta.wq; sa.cnt_q = cnt_q;
    sa.thr = pa.thr; sa.sum = sum; sa.ccnt = (unsigned *)(base + o_ccnt);
    sa.token_idx = a->token_idx; sa.expert_idx = a->expert_idx; sa.weights = a->weights; sa.pos = a->pos;
    dim3 ga((unsigned)achunks, (unsigned)E);
    k_chunk_counts<<<ga, ASSIGN_THREADS, 0, d->stream>>>(sa);
    CU_LAUNCHED("route chunk counts");
    if (a->bf16) k_assign<bf16><<<ga, ASSIGN_THREADS, 0, d->stream>>>(sa);
    else k_assign<float><<<ga, ASSIGN_THREADS, 0, d->stream>>>(sa);
    CU_LAUNCHED("route assign");

    if (a->summary_dev) {   // the caller queues more work before its one synchronisation
        CU_TRY(cudaMemcpyAsync(a->summary_dev, sum, (size_t)MOE_CUDA_ROUTE_SUMMARY(E) * sizeof(long long),
                               cudaMemcpyDeviceToDevice, d->stream), "route summary");
        return MOE_OK;
    }
    // the one synchronisation: offsets, counts and statistics to the host
    CUDA_NOT_IN_CAPTURE(d, "the routing's wait for its counts (a graph needs the deferred summary: defer_summary)");
    CU_TRY(cudaMemcpyAsync(a->summary, sum, (size_t)MOE_CUDA_ROUTE_SUMMARY(E) * sizeof(long long),
                           cudaMemcpyDeviceToHost, d->stream), "route summary");
    CU_TRY(cudaStreamSynchronize(d->stream), "route summary");
    return MOE_OK;
}

extern "C" moe_status moe_cuda_route_backward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_bwd *a) {
    if (a->n < 1 || a->e < 1 || a->e > MOE_CUDA_ROUTE_MAX_E || a->k < 1 || a->k > a->e)
        return moe_error(MOE_ERR_ARG, "route backward on cuda: unsupported sizes");
    CUDA_ENTER(d, ctx, dev);
    int64_t blocks = (a->n + RW - 1) / RW, cap = (int64_t)d->sm_count * 16;
    unsigned g = (unsigned)(blocks < cap ? blocks : cap);
    size_t smem = (size_t)RW * (size_t)a->e * sizeof(double);
    if (a->bf16) k_backward<bf16><<<g, RW * 32, smem, d->stream>>>(*a);
    else k_backward<float><<<g, RW * 32, smem, d->stream>>>(*a);
    CU_LAUNCHED("route backward");
    return MOE_OK;
}
