// Grouped (expert) GEMMs in bf16 as one kernel launch per call: every expert's
// tiles in one grid, with the experts' row offsets passed as kernel
// parameters. cuBLAS's grouped call launches once per distinct row count and
// costs about 1.5 ms of host time per call with 32 experts; a loop of single
// GEMMs launches once per expert and leaves most SMs idle when an expert has
// ~1000 rows. Here the host only fills a small parameter block.
//
// One kernel serves both calls, C_g (+)= alpha * A_g B_g:
//   forward / data gradient (rows vary): A_g = a[o_g:o_g+1] [M_g, K] (K
//     contiguous), B_g = b[g] stored [N, K] (transb) or [K, N], C_g = c rows;
//     optionally a second pair along K (a2 [M_g, K2], b2[g]), summed in the
//     same accumulators: the data gradient of gate and up, dx = dg Wg + du Wu,
//     as one GEMM over K + K2 instead of two (the second re-reading dx);
//   weight gradient (the reduction varies): A_g = a_g^T (a_g [rows_g, P],
//     P contiguous), B_g = b_g [rows_g, Q], C_g = c[g] [P, Q]. Under skewed
//     routing one expert's tiles can each take longer than the rest of the
//     call (a block runs at about half its SM's rate): a group whose tiles are
//     well above the average load of a block slot is cut into chunks of rows.
//     Each chunk's block writes its raw f32 sums to scratch and counts itself
//     in on the tile's counter; the last to arrive adds the chunks in chunk
//     order (the same bytes whichever block is last) and stores
//     alpha * sum + beta * C like an unsplit tile.
//
// Hopper tensor cores through wgmma (sm_90a; this file is built for
// compute_90a): a block computes 128 x 128 with two warpgroups of 64 x 128
// each (wgmma.m64n128k16, accumulators in registers). Operands sit in shared
// memory in the 128-byte-swizzled layouts that wgmma reads through matrix
// descriptors, filled by cp.async (which zero-fills rows and K beyond the
// group, so a group's tile never reads its neighbour's rows), 3 stages deep,
// 2 K tiles ahead. Each warpgroup waits for its wgmmas at the end of a K tile,
// so the stage just read can be refilled after the next barrier; two blocks
// share an SM, and one's waits, prologue and epilogue overlap the other's
// math. Measured on an H100 against deeper single-block pipelines (5 stages
// of 128 x 128, 4 or 3 of 128 x 256, one batch of wgmmas kept in flight):
// 4-8% faster per layer and 1-4% on the whole step. A warp-specialized
// persistent variant (one loading warpgroup signalling mbarriers with
// cp.async.mbarrier.arrive, two multiplying 64 x 256 each, 4 stages) was
// slower still (367-383 TFLOP/s against 375-427 at the OLMoE layer, 275
// against 309 at the step model's experts): at 128 x 128 tiles the blocks
// read about 6 TB/s from L2, near its limit; the next step is TMA with
// multicast across a cluster, which halves that.
//
// K-major tile (R rows x 64 K, 128 bytes a row): 16-byte chunk j of row r
// sits at chunk j ^ (r % 8) of its row; 8-row atoms of 1024 bytes one after
// the other (descriptor stride 1024; the leading offset is unused). MN-major
// tile (64 K rows x R M-or-N): atoms of 8 K rows x 64 elements; the R/64
// atoms of one 8-row K group are 1024 bytes apart (leading offset), K groups
// R/64 * 1024 apart (stride); inside an atom chunk j of K row r sits at j ^ r.
#include "cuda_common.cuh"
#include "cuda_grouped_mma.h"
#include "cuda_grouped_sched.cuh"
#include "moe_cuda_route.h"

#include "cuda_swiglu.cuh"
#include "cuda_vec.cuh"

#include <cuda_bf16.h>

#include <algorithm>
#include <stdint.h>

namespace {

constexpr int BM = 128, BN = 128, BK = 64, THREADS = 256, STAGES = 3;
constexpr int SMEM_BYTES = STAGES * (BM + BN) * BK * 2 + 1024;   // + room to align the atoms to 1024 B
constexpr int MAX_GROUPS = MOE_MMA_GROUPED_MAX_GROUPS;
// weight-gradient split-K limits: chunks per call, per-tile counters on the device,
// bytes of f32 partials (a call needing more runs unsplit)
constexpr int MAX_SEG = 64, MAX_CHUNKS = 32, SPLIT_COUNTERS = 16384;
constexpr size_t SPLIT_PART_BYTES = (size_t)64 << 20;
static_assert(MAX_CHUNKS <= 255 && MAX_SEG <= 32767 && MOE_MMA_GROUPED_MAX_GROUPS <= 32767,
              "segment fields: unsigned char chunk numbers, short groups and segments");
// what a block does with its accumulators: store them (c = alpha acc + beta c), or a
// fused SwiGLU (forward: gate and up tiles side by side; backward: dh into dgate, dup)
enum { EPI_PLAIN = 0, EPI_SWIGLU = 1, EPI_SWIGLU_BWD = 2, EPI_SWIGLU_BWD_W = 3 };

struct mma_params {
    const __nv_bfloat16 *a, *b;
    const __nv_bfloat16 *a2, *b2;   // forward: the second pair along K (K2 > 0), else unused
    __nv_bfloat16 *c;
    // fused SwiGLU epilogues (EPI_SWIGLU: b = gate weights, b2 = up weights, c = the
    // activation, cg / cu = gate / up; EPI_SWIGLU_BWD: sg / su = the saved gate / up,
    // cg / cu = their gradients, c unused, ch the activation again or NULL); epi_n = the
    // expert hidden width
    const __nv_bfloat16 *sg, *su;
    __nv_bfloat16 *cg, *cu, *ch;
    // gathered rows (the GATHER instantiations): row r of the group-ordered
    // operand is row rows[r] of a (forward, the SwiGLU's x) or of b (weight
    // gradient, the experts' input): the MoE dispatch's gather done by the loads
    const int64_t *rows;
    // EPI_SWIGLU_BWD_W: the combine's weight of each row (rw), and each row's
    // partial dot products with the activation, one per N tile (dwp [M, n_tiles])
    const __nv_bfloat16 *rw;
    float *dwp;
    int epi_n;
    float alpha, beta;
    int n_tiles;             // tiles across N (forward) or across Q (wgrad)
    int m_tiles;             // wgrad: tiles across P per group
    int K, N, P, Q;          // forward: K, N; wgrad: P, Q
    int K2;                  // forward: K of the second pair (0: none)
    int groups;
    // offsets on the device (the weight gradient is then not split) and the
    // rows they end at, else NULL; with them the call's plan of work items
    // (k_grouped_plan), which replaces off, tile0 and order
    const int64_t *off_dev;
    int M;
    const int4 *plan;
    int off[MAX_GROUPS + 1];         // row offsets of the groups
    union {
        int tile0[MAX_GROUPS + 1];   // forward: the first M tile of each group (prefix sums)
        int order[MAX_GROUPS];       // wgrad: the unsplit groups by decreasing rows (the order their tiles run)
    };
    // wgrad split-K: nseg chunks of heavy groups, whose tiles run before the unsplit
    // groups'; chunk i covers rows seg_r0[i] .. + seg_rows[i] of group seg_g[i], is
    // chunk seg_chunk[i] of seg_nch[i], and its group's chunk 0 is segment seg_first[i]
    // (tile j of chunk c: partials at part[(seg_first + c) * tiles + j], counter
    // counters[seg_first * tiles + j])
    int nseg;
    float *part;
    int *counters;
    int seg_r0[MAX_SEG], seg_rows[MAX_SEG];
    short seg_g[MAX_SEG], seg_first[MAX_SEG];
    unsigned char seg_chunk[MAX_SEG], seg_nch[MAX_SEG];
};
static_assert(sizeof(mma_params) < 4096, "grouped GEMM parameters exceed the classic kernel parameter limit");

__device__ __forceinline__ unsigned smem_addr(const void *p) {
    return (unsigned)__cvta_generic_to_shared(p);
}

__device__ __forceinline__ void cp_async16(void *dst, const void *src, bool valid) {
    // src-size 0 zero-fills the 16 bytes and reads nothing
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_addr(dst)), "l"(src),
                 "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// One operand tile of a stage: R rows (K-major) or R columns (MN-major) x 64
// K. Element (r, k) is at g[r * ld + k] (K-major) or g[k * ld + r]; r < r_lim
// and k < k_lim are loaded, the rest zero-filled (the contiguous extent is a
// multiple of 8, checked on the host, so a 16-byte chunk is wholly in or out).
template <bool KMAJ, int R, int NT>
__device__ __forceinline__ void load_tile(unsigned char *s, const __nv_bfloat16 *g, int64_t ld, int r0, int r_lim,
                                          int k0, int k_lim, int tid) {
#pragma unroll
    for (int i = 0; i < R * BK / 8 / NT; i++) {
        int ch = tid + i * NT;
        if (KMAJ) {
            int r = ch >> 3, j = ch & 7;
            bool ok = r0 + r < r_lim && k0 + j * 8 < k_lim;
            const __nv_bfloat16 *src = ok ? g + (int64_t)(r0 + r) * ld + (k0 + j * 8) : g;
            cp_async16(s + r * 128 + ((j ^ (r & 7)) << 4), src, ok);
        } else {
            constexpr int PER_ROW = R / 8;   // chunks per K row
            int k = ch / PER_ROW, c = ch % PER_ROW, j = c & 7;
            bool ok = k0 + k < k_lim && r0 + c * 8 < r_lim;
            const __nv_bfloat16 *src = ok ? g + (int64_t)(k0 + k) * ld + (r0 + c * 8) : g;
            cp_async16(s + (c >> 3) * 1024 + (k >> 3) * (R / 64 * 1024) + (k & 7) * 128 + ((j ^ (k & 7)) << 4), src,
                       ok);
        }
    }
}

// The same tiles with their rows gathered: R rows (K-major: operand row r0 + r
// is rows[r0 + r] of g) or 64 K rows (MN-major: K row k0 + k is rows[k0 + k]
// of g), in the layouts above. The index is read only for a row inside the
// limits; a K-major tile's rows are the same at every K step (L1 keeps them).
template <int R, int NT>
__device__ __forceinline__ void load_tile_rows_kmaj(unsigned char *s, const __nv_bfloat16 *g, const int64_t *rows,
                                                    int64_t ld, int r0, int r_lim, int k0, int k_lim, int tid) {
#pragma unroll
    for (int i = 0; i < R * BK / 8 / NT; i++) {
        int ch = tid + i * NT, r = ch >> 3, j = ch & 7;
        bool ok = r0 + r < r_lim && k0 + j * 8 < k_lim;
        const __nv_bfloat16 *src = ok ? g + rows[r0 + r] * ld + (k0 + j * 8) : g;
        cp_async16(s + r * 128 + ((j ^ (r & 7)) << 4), src, ok);
    }
}

template <int R, int NT>
__device__ __forceinline__ void load_tile_rows_mn(unsigned char *s, const __nv_bfloat16 *g, const int64_t *rows,
                                                  int64_t ld, int r0, int r_lim, int k0, int k_lim, int tid) {
    constexpr int PER_ROW = R / 8;
#pragma unroll
    for (int i = 0; i < R * BK / 8 / NT; i++) {
        int ch = tid + i * NT, k = ch / PER_ROW, c = ch % PER_ROW, j = c & 7;
        bool ok = k0 + k < k_lim && r0 + c * 8 < r_lim;
        const __nv_bfloat16 *src = ok ? g + rows[k0 + k] * ld + (r0 + c * 8) : g;
        cp_async16(s + (c >> 3) * 1024 + (k >> 3) * (R / 64 * 1024) + (k & 7) * 128 + ((j ^ (k & 7)) << 4), src, ok);
    }
}

__device__ __forceinline__ void prefetch_l1(const void *q) { asm volatile("prefetch.global.L1 [%0];" ::"l"(q)); }

// Descriptor of a 128-byte-swizzled operand at p (see the layouts above).
template <bool KMAJ, int R> __device__ __forceinline__ uint64_t desc_of(const void *p) {
    uint64_t a = smem_addr(p);
    uint64_t lbo = KMAJ ? 1 : 1024 >> 4, sbo = KMAJ ? 1024 >> 4 : (R / 64 * 1024) >> 4;
    return ((a & 0x3FFFF) >> 4) | (lbo << 16) | (sbo << 32) | (1ull << 62);
}

template <int TA, int TB>
__device__ __forceinline__ void wgmma_m64n128k16(float *d, uint64_t da, uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %66, %67;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

// The block tile t of a call: its group, corner and operands. WGRAD: the
// groups split the reduction (weight gradient); else they split M.
struct tile_info {
    int m0, n0, M, N, K, g;
    int r0;   // the first row of the tile's group (forward) or of its rows of the reduction (weight gradient)
    int64_t lda, ldb, ldc;
    const __nv_bfloat16 *A, *B;
    __nv_bfloat16 *C;
    bool skip;   // an empty weight-gradient group with beta 1: nothing to do
};

// The block tile of group g whose rows start at r0: forward, M tile m0 of
// its `rows` rows; weight gradient, the tile at j of c_g over `rows` rows of
// the reduction.
template <bool B_KMAJ, bool WGRAD>
__device__ __forceinline__ tile_info tile_of(const mma_params &p, int t, int g, int r0, int rows, int m0_or_j) {
    tile_info ti;
    ti.n0 = (t % p.n_tiles) * BN;
    ti.g = g;
    ti.r0 = r0;
    if (WGRAD) {
        ti.m0 = (m0_or_j / p.n_tiles) * BM;
        ti.M = p.P; ti.N = p.Q; ti.K = rows;
        ti.A = p.a + (int64_t)r0 * p.P; ti.lda = p.P;
        ti.B = p.b + (int64_t)r0 * p.Q; ti.ldb = p.Q;
        ti.C = p.c + (int64_t)g * p.P * p.Q; ti.ldc = p.Q;
        ti.skip = ti.K == 0 && p.beta == 1.0f;
    } else {
        ti.m0 = m0_or_j;
        ti.M = rows; ti.N = p.N; ti.K = p.K;
        ti.A = p.a + (int64_t)r0 * p.K; ti.lda = p.K;
        ti.B = p.b + (int64_t)g * p.K * p.N; ti.ldb = B_KMAJ ? p.K : p.N;
        ti.C = p.c + (int64_t)r0 * p.N; ti.ldc = p.N;
        ti.skip = false;
    }
    return ti;
}

// Block t's tile from the launch's parameters (offsets on the host).
template <bool B_KMAJ, bool WGRAD> __device__ __forceinline__ tile_info tile_at(const mma_params &p, int t) {
    if (WGRAD) {
        // a tile's work grows with its group's rows: the split chunks and then
        // the largest groups' tiles go first, so the last wave holds short ones
        // (imbalanced routing otherwise left a few long tiles running alone at the end)
        const int per = p.m_tiles * p.n_tiles, item = t / per, j = t % per;
        if (item < p.nseg) return tile_of<B_KMAJ, WGRAD>(p, t, p.seg_g[item], p.seg_r0[item], p.seg_rows[item], j);
        const int g = p.order[item - p.nseg];
        return tile_of<B_KMAJ, WGRAD>(p, t, g, p.off[g], p.off[g + 1] - p.off[g], j);
    }
    int mt = t / p.n_tiles, lo = 0, hi = p.groups - 1;
    while (lo < hi) {   // the last group whose first tile is <= mt (empty groups share it with the next)
        int mid = (lo + hi + 1) >> 1;
        if (p.tile0[mid] <= mt) lo = mid;
        else hi = mid - 1;
    }
    return tile_of<B_KMAJ, WGRAD>(p, t, lo, p.off[lo], p.off[lo + 1] - p.off[lo], (mt - p.tile0[lo]) * BM);
}

// Offsets on the device: a one-block kernel plans the call into a table of
// work items, one int4 each: {group, its first row, its rows, first row of
// the M tile (forward; the weight gradient's items are whole groups, largest
// first)}, group -1 past the real work. Each block of the GEMM then reads its
// item with one load. (Built by every block in shared memory instead, the
// forward, weighted backward and weight gradient of the step's experts ran
// 5%, 13% and 26% slower than with host offsets: a block's tile is ~10 us.)
// tiles: the forward's `items` M tiles (or NULL); order: the weight
// gradient's `groups` items (or NULL). The routing writes both at once for a
// layer's calls (moe_cuda_grouped_plan); a call without them plans its own.
__global__ void k_grouped_plan(const int64_t *off_dev, int groups, int M, int items, int4 *tiles, int4 *order_items) {
    __shared__ int off[MAX_GROUPS + 1], first[MAX_GROUPS + 1], total;
    const int tid = threadIdx.x;
    if (tid < 32) {
        auto m_tiles = [&](int g) { return (off[g + 1] - off[g] + BM - 1) / BM; };
        const int n = sched_offsets(off_dev, groups, M, off, first, m_tiles, tid);
        if (tid == 0) total = n;
    }
    __syncthreads();
    if (order_items) {
        __shared__ int order[MAX_GROUPS];
        sched_order(off, groups, order, tid, (int)blockDim.x);
        __syncthreads();
        for (int i = tid; i < groups; i += blockDim.x) {
            const int g = order[i];
            order_items[i] = make_int4(g, off[g], off[g + 1] - off[g], 0);
        }
    }
    if (!tiles) return;
    for (int mt = tid; mt < items; mt += blockDim.x) {
        if (mt >= total) { tiles[mt] = make_int4(-1, 0, 0, 0); continue; }
        int lo = 0, hi = groups - 1;
        while (lo < hi) {
            int mid = (lo + hi + 1) >> 1;
            if (first[mid] <= mt) lo = mid;
            else hi = mid - 1;
        }
        tiles[mt] = make_int4(lo, off[lo], off[lo + 1] - off[lo], (mt - first[lo]) * BM);
    }
}

// The forward's M tiles for `groups` groups over M rows: the most the rows can make
static int64_t dev_m_tiles(int64_t groups, int64_t M) { return (M + groups * (BM - 1)) / BM; }

extern "C" int64_t moe_cuda_grouped_plan_bytes(int64_t groups, int64_t rows) {
    if (groups < 1 || groups > MAX_GROUPS || rows < 0 || rows >= (int64_t)INT32_MAX - BM) return 0;
    return (dev_m_tiles(groups, rows) + groups) * (int64_t)sizeof(int4);
}

extern "C" moe_status moe_cuda_grouped_plan(moe_ctx *ctx, moe_device dev, const int64_t *off_dev, int64_t groups,
                                            int64_t rows, void *tables) {
    if (!moe_cuda_grouped_plan_bytes(groups, rows) || ((uintptr_t)tables & 15) || ((uintptr_t)off_dev & 7))
        return moe_error(MOE_ERR_ARG, "grouped plan: %lld groups over %lld rows cannot be planned here",
                         (long long)groups, (long long)rows);
    CUDA_ENTER(d, ctx, dev);
    const int64_t items = dev_m_tiles(groups, rows);
    int4 *t = (int4 *)tables;
    k_grouped_plan<<<1, 256, 0, d->stream>>>(off_dev, (int)groups, (int)rows, (int)items, t, t + items);
    CU_LAUNCHED("grouped plan");
    return MOE_OK;
}

#include "cuda_grouped_epilogue.cuh"   // the epilogues: a fragment of this unit

// The B tile of the SwiGLU forward: rows 0-63 from the gate weights, 64-127
// from the up weights, both at expert-hidden rows nc0 + (r % 64) (K-major).
__device__ __forceinline__ void load_tile_gate_up(unsigned char *s, const __nv_bfloat16 *bg, const __nv_bfloat16 *bu,
                                                  int64_t ld, int nc0, int n_lim, int k0, int k_lim, int tid) {
#pragma unroll
    for (int i = 0; i < BN * BK / 8 / THREADS; i++) {
        int ch = tid + i * THREADS, r = ch >> 3, j = ch & 7, n = nc0 + (r & 63);
        bool ok = n < n_lim && k0 + j * 8 < k_lim;
        const __nv_bfloat16 *src = ok ? (r < 64 ? bg : bu) + (int64_t)n * ld + (k0 + j * 8) : bg;
        cp_async16(s + r * 128 + ((j ^ (r & 7)) << 4), src, ok);
    }
}

// The four wgmmas of one 64-deep K tile for warpgroup wg's 64 rows.
template <bool A_KMAJ, bool B_KMAJ>
__device__ __forceinline__ void mma_stage(float *d, const unsigned char *sa, int wg) {
    const unsigned char *sb = sa + BM * BK * 2;
#pragma unroll
    for (int s = 0; s < BK / 16; s++) {
        const unsigned char *pa = A_KMAJ ? sa + wg * 8192 + s * 32 : sa + wg * 1024 + s * 2 * (BM / 64 * 1024);
        const unsigned char *pb = B_KMAJ ? sb + s * 32 : sb + s * 2 * (BN / 64 * 1024);
        wgmma_m64n128k16<A_KMAJ ? 0 : 1, B_KMAJ ? 0 : 1>(d, desc_of<A_KMAJ, BM>(pa), desc_of<B_KMAJ, BN>(pb));
    }
}

// A split weight-gradient tile (block t of segment `item`), its raw sums staged
// in cs: they go to scratch (row-major 128 x 128 f32, coalesced), then the
// tile's counter counts the chunk in. The last of its chunks to arrive stages
// alpha * (the sums of all chunks, in chunk order) in cs and returns true (it
// stores the tile); the others return false. The accumulator registers are
// dead by then: handling the chunk from registers kept them live past the K
// loop, which the compiler paid for with a third more instructions in it.
__device__ __forceinline__ bool split_sum(float *cs, const mma_params &p, int t, int tid) {
    __shared__ int last;
    constexpr int PER = BM * BN / 8 / THREADS;   // 8-float chunks per thread
    const int per = p.m_tiles * p.n_tiles, item = t / per, nch = p.seg_nch[item];
    const int sbase = p.seg_first[item] * per + t % per;
    const int64_t stride = (int64_t)per * BM * BN;   // floats from one chunk's partials to the next
    float *base = p.part + (int64_t)sbase * BM * BN;
    float *mine = base + p.seg_chunk[item] * stride;
#pragma unroll
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8;
        __stcg(reinterpret_cast<float4 *>(mine + r * BN + c), *reinterpret_cast<const float4 *>(cs + r * CLD + c));
        __stcg(reinterpret_cast<float4 *>(mine + r * BN + c + 4), *reinterpret_cast<const float4 *>(cs + r * CLD + c + 4));
    }
    __threadfence();   // the sums are visible device-wide before the count says so
    __syncthreads();
    if (tid == 0) {
        int n = atomicAdd(p.counters + sbase, 1) + 1;
        last = n == nch;
        if (last) atomicExch(p.counters + sbase, 0);   // zero again for the next call
    }
    __syncthreads();
    if (!last) return false;
    __threadfence();
#pragma unroll 1
    for (int i = 0; i < PER; i++) {
        int idx = tid + i * THREADS, r = idx >> 4, c = (idx & 15) * 8;
        float4 a = make_float4(0.0f, 0.0f, 0.0f, 0.0f), b = a;
#pragma unroll 4
        for (int k = 0; k < nch; k++) {
            const float *q = base + k * stride + r * BN + c;
            float4 x = __ldcg(reinterpret_cast<const float4 *>(q)), y = __ldcg(reinterpret_cast<const float4 *>(q + 4));
            a.x += x.x; a.y += x.y; a.z += x.z; a.w += x.w;
            b.x += y.x; b.y += y.y; b.z += y.z; b.w += y.w;
        }
        const float al = p.alpha;
        *reinterpret_cast<float4 *>(cs + r * CLD + c) = make_float4(al * a.x, al * a.y, al * a.z, al * a.w);
        *reinterpret_cast<float4 *>(cs + r * CLD + c + 4) = make_float4(al * b.x, al * b.y, al * b.z, al * b.w);
    }
    return true;   // (store_staged reads back only what this thread wrote: no barrier needed)
}

// Out of line: inlined, this path made the compiler spend a fifth more
// instructions in every weight-gradient tile's K loop.
__device__ __noinline__ void split_finish(float *cs, const tile_info &ti, const mma_params &p, int t, int tid) {
    if (split_sum(cs, p, t, tid)) store_staged(cs, ti, tid, p.beta);
}

// ---- plain kernel: one tile per block, every thread loads and computes ----
// PAIR: a second (A, B) pair along K - its own instantiation, since the extra
// pointers pushed the single-pair kernels past 128 registers into spills
// (the forward GEMMs ran ~20% slower).
// GATHER: the forward's A rows (SwiGLU) or the weight gradient's B rows come
// through p.rows (load_tile_rows_*).
// DEV: the offsets on the device (p.off_dev): each block reads its work item
// from the call's plan (k_grouped_plan), and the grid is sized for the most M
// tiles the rows can make (the forward's blocks past the real count return at once).
template <bool A_KMAJ, bool B_KMAJ, bool WGRAD, bool PAIR, int EPI, bool GATHER, bool DEV>
__global__ void __launch_bounds__(THREADS, 2) grouped_wgmma_kernel(const __grid_constant__ mma_params p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    constexpr int STAGE_BYTES = (BM + BN) * BK * 2, PREF = STAGES - 1;
    extern __shared__ unsigned char smem_raw[];
    unsigned char *smem = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);   // atoms on 1024 B
    int tid = threadIdx.x, wg = tid >> 7;
    tile_info ti;
    if constexpr (DEV) {   // the block's item of the call's plan (k_grouped_plan)
        const int per = WGRAD ? p.m_tiles * p.n_tiles : p.n_tiles, t = blockIdx.x;
        const int4 e = p.plan[t / per];
        if (e.x < 0) return;
        ti = tile_of<B_KMAJ, WGRAD>(p, t, e.x, e.y, e.z, WGRAD ? t % per : e.w);
    } else {
        ti = tile_at<B_KMAJ, WGRAD>(p, blockIdx.x);
    }
    if (ti.skip) return;
    float d[BN / 2];
#pragma unroll
    for (int i = 0; i < BN / 2; i++) d[i] = 0.0f;

    // K tiles of the first pair, then of the second (each zero-filled past its
    // own K): stages load in order, so the operands switch once, at tile nk1
    const int nk1 = (ti.K + BK - 1) / BK, nk = PAIR ? nk1 + (p.K2 + BK - 1) / BK : nk1;
    int kbase = 0;
    auto load_stage = [&](int kt) {
        if (PAIR && kt == nk1) {
            ti.A = p.a2 + (int64_t)ti.r0 * p.K2; ti.lda = p.K2;
            ti.B = p.b2 + (int64_t)ti.g * p.K2 * p.N; ti.ldb = B_KMAJ ? p.K2 : p.N;
            ti.K = p.K2;
            kbase = nk1;
        }
        unsigned char *s = smem + (kt % STAGES) * STAGE_BYTES;
        int k0 = (kt - kbase) * BK;
        if (GATHER && !WGRAD)
            load_tile_rows_kmaj<BM, THREADS>(s, p.a, p.rows + ti.r0, ti.lda, ti.m0, ti.M, k0, ti.K, tid);
        else
            load_tile<A_KMAJ, BM, THREADS>(s, ti.A, ti.lda, ti.m0, ti.M, k0, ti.K, tid);
        if (EPI == EPI_SWIGLU) {
            load_tile_gate_up(s + BM * BK * 2, p.b + (int64_t)ti.g * p.K * p.epi_n,
                              p.b2 + (int64_t)ti.g * p.K * p.epi_n, p.K, ti.n0 / 2, p.epi_n, k0, ti.K, tid);
        } else if (GATHER && WGRAD) {
            load_tile_rows_mn<BN, THREADS>(s + BM * BK * 2, p.b, p.rows + ti.r0, ti.ldb, ti.n0, ti.N, k0, ti.K, tid);
            // the next K step's 64 row numbers (512 bytes) on their way to L1 while this one's loads run
            if (tid < 4 && k0 + BK + tid * 16 < ti.K) prefetch_l1(p.rows + ti.r0 + k0 + BK + tid * 16);
        } else {
            load_tile<B_KMAJ, BN, THREADS>(s + BM * BK * 2, ti.B, ti.ldb, ti.n0, ti.N, k0, ti.K, tid);
        }
    };
#pragma unroll
    for (int st = 0; st < PREF; st++) {
        if (st < nk) load_stage(st);
        cp_async_commit();
    }
    for (int kt = 0; kt < nk; kt++) {
        cp_async_wait<PREF - 1>();
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");   // cp.async writes -> wgmma reads
        __syncthreads();   // stage kt complete for all; every wgmma of kt-1 done, so its stage is free
        if (kt + PREF < nk) load_stage(kt + PREF);
        cp_async_commit();
        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
        mma_stage<A_KMAJ, B_KMAJ>(d, smem + (kt % STAGES) * STAGE_BYTES, wg);
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
    }
    cp_async_wait<0>();
    __syncthreads();   // both warpgroups are done with the stages: their memory takes the C tile
    if (WGRAD && (int)blockIdx.x < p.nseg * p.m_tiles * p.n_tiles) {
        float *cs = reinterpret_cast<float *>(smem);
        stage_acc(d, cs, tid, 1.0f);
        split_finish(cs, ti, p, blockIdx.x, tid);
        return;
    }
    if (EPI == EPI_SWIGLU) store_swiglu(d, reinterpret_cast<float *>(smem), ti, p, tid);
    else if (EPI == EPI_SWIGLU_BWD) store_swiglu_bwd(d, reinterpret_cast<float *>(smem), ti, p, tid);
    else if (EPI == EPI_SWIGLU_BWD_W) store_swiglu_bwd_w(d, reinterpret_cast<float *>(smem), ti, p, tid);
    else store_tile(d, reinterpret_cast<float *>(smem), ti, tid, p.alpha, p.beta);
#endif
}

bool aligned16(const void *q) { return ((uintptr_t)q & 15) == 0; }

template <bool A_KMAJ, bool B_KMAJ, bool WGRAD, bool PAIR = false, int EPI = EPI_PLAIN, bool GATHER = false>
moe_status launch(cuda_dev *d, mma_params &p, int64_t m_tiles_total, int64_t n_extent, const char *what, bool *ran) {
    p.n_tiles = (int)((n_extent + BN - 1) / BN);
    int64_t blocks = m_tiles_total * p.n_tiles;
    if (blocks > INT32_MAX) return MOE_OK;
    *ran = true;
    if (blocks == 0) return MOE_OK;
    auto kern = p.off_dev ? grouped_wgmma_kernel<A_KMAJ, B_KMAJ, WGRAD, PAIR, EPI, GATHER, true>
                          : grouped_wgmma_kernel<A_KMAJ, B_KMAJ, WGRAD, PAIR, EPI, GATHER, false>;
    // above 48 KB a block's dynamic shared memory must be allowed first (per device, cheap to repeat)
    CU_TRY(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES), what);
    p.plan = nullptr;
    const int items = (int)(WGRAD ? p.groups : m_tiles_total);
    const size_t plan_bytes = (size_t)items * sizeof(int4);
    bool own_plan = false;
    if (p.off_dev && d->plan_off == p.off_dev && d->plan_rows == p.M) {
        // the routing planned these offsets for the layer's calls (tensor.h grouped_plan):
        // the forward's M tiles, then the weight gradient's order
        const int4 *tables = (const int4 *)((const char *)p.off_dev + d->plan_at);
        p.plan = WGRAD ? tables + dev_m_tiles(p.groups, p.M) : tables;
        d->n_plan_shared++;
    } else if (p.off_dev) {   // stream-ordered scratch: freed once both kernels are queued
        p.plan = (const int4 *)cuda_scratch_alloc(d, plan_bytes);
        if (!p.plan) return moe_last_status();
        own_plan = true;
        k_grouped_plan<<<1, 256, 0, d->stream>>>(p.off_dev, p.groups, p.M, items, WGRAD ? nullptr : (int4 *)p.plan,
                                                 WGRAD ? (int4 *)p.plan : nullptr);
    }
    cudaError_t e = cudaGetLastError();
    if (e == cudaSuccess) {
        kern<<<(unsigned)blocks, THREADS, SMEM_BYTES, d->stream>>>(p);
        e = cudaGetLastError();
    }
    if (own_plan) cuda_scratch_free(d, (void *)p.plan, plan_bytes);
    if (e != cudaSuccess) return moe_error(MOE_ERR_DEVICE, "cuda %s: %s", what, cudaGetErrorString(e));
    return MOE_OK;
}

// offsets on the host, or on the device (off_dev: 8-byte aligned; M rows in all)
bool groups_fit(const int64_t *offsets, const int64_t *off_dev, int groups, int64_t M) {
    if (groups < 1 || groups > MAX_GROUPS) return false;
    if (offsets) return offsets[0] == 0 && offsets[groups] < (int64_t)INT32_MAX - BM;
    return off_dev && ((uintptr_t)off_dev & 7) == 0 && M >= 0 && M < (int64_t)INT32_MAX - BM;
}

// The groups' rows into p: offsets on the host as parameters (off, and for
// the forward each group's first M tile), or on the device (off_dev, M rows in
// all), which the plan kernel reads. Returns the forward's M tiles in all;
// with off_dev the most M rows can make (a group's tiles are at most
// (rows + BM - 1) / BM).
int64_t set_rows(mma_params &p, const int64_t *offsets, const int64_t *off_dev, int groups, int64_t M) {
    p.groups = groups;
    p.off_dev = offsets ? nullptr : off_dev;
    if (!offsets) {
        p.M = (int)M;
        return dev_m_tiles(groups, M);
    }
    p.M = (int)offsets[groups];
    int64_t tiles = 0;
    for (int g = 0; g <= groups; g++) {
        p.off[g] = (int)offsets[g];
        p.tile0[g] = (int)tiles;
        if (g < groups) tiles += (offsets[g + 1] - offsets[g] + BM - 1) / BM;
    }
    return tiles;
}

// Weight-gradient split-K plan: which of the groups (order: by decreasing rows)
// are cut into chunks of rows, filled into p's segment table. The work of a
// call is counted in 64-row K tiles over every tile (an empty group's tiles
// count one, for their stores); a block slot (two per SM) gets `avg` of it on
// average. A block sharing its SM runs at about half the SM's rate, so a tile
// much longer than avg still runs when the SMs are done with the average: a
// group whose tiles exceed 5/4 avg is cut into the fewest equal chunks of at
// most 5/4 avg K tiles (at least 8). Chunks near avg rather than small ones:
// each chunk costs a tile's prologue and stores again and the last reads every
// chunk's sums, and when routing collapses onto a few experts their chunks are
// most of the call's tiles, so chunks of about avg fill the slots about once
// (four experts holding every row: 2 chunks each, 256 tiles for 264 slots).
// Returns the number of groups split (the first ones of order); 0 when none
// needs it or the scratch is refused (then the call runs unsplit, as correct,
// only slower). Splitting changes the order of the sums, so whether a call
// splits (it depends on the SM count and on free memory) changes its bytes;
// a given plan gives the same bytes every run.
int plan_split(cuda_dev *d, mma_params &p, const int *order, int groups, int64_t per, size_t *part_bytes) {
    p.nseg = 0; p.part = nullptr; p.counters = nullptr;
    int64_t work = 0;
    for (int g = 0; g < groups; g++) {
        int64_t kt = (p.off[g + 1] - p.off[g] + BK - 1) / BK;
        work += per * (kt > 0 ? kt : 1);
    }
    const int64_t avg = work / (2 * (int64_t)(d->sm_count > 0 ? d->sm_count : 1));
    const int64_t cap = std::max<int64_t>(avg * 5 / 4, 8);
    int nsplit = 0, nseg = 0;
    for (; nsplit < groups; nsplit++) {
        const int g = order[nsplit];
        const int64_t rows = p.off[g + 1] - p.off[g], kt = (rows + BK - 1) / BK;
        if (kt <= cap) break;
        int64_t nch = std::min<int64_t>((kt + cap - 1) / cap, MAX_CHUNKS);
        const int64_t crows = ((rows + nch - 1) / nch + BK - 1) / BK * BK;
        nch = (rows + crows - 1) / crows;
        if (nseg + nch > MAX_SEG || (nseg + nch) * per > SPLIT_COUNTERS ||
            (size_t)(nseg + nch) * (size_t)per * BM * BN * sizeof(float) > SPLIT_PART_BYTES)
            break;
        for (int c = 0; c < nch; c++, nseg++) {
            p.seg_r0[nseg] = p.off[g] + (int)(c * crows);
            p.seg_rows[nseg] = (int)std::min<int64_t>(crows, rows - c * crows);
            p.seg_g[nseg] = (short)g;
            p.seg_first[nseg] = (short)(nseg - c);
            p.seg_chunk[nseg] = (unsigned char)c;
            p.seg_nch[nseg] = (unsigned char)nch;
        }
    }
    if (nseg == 0) return 0;
    if (!d->split_counters) {
        void *q = nullptr;
        if (cudaMalloc(&q, SPLIT_COUNTERS * sizeof(int)) != cudaSuccess ||
            cudaMemsetAsync(q, 0, SPLIT_COUNTERS * sizeof(int), d->stream) != cudaSuccess) {
            if (q) cudaFree(q);
            (void)cudaGetLastError();
            return 0;
        }
        d->split_counters = (int *)q;
    }
    *part_bytes = (size_t)nseg * (size_t)per * BM * BN * sizeof(float);
    // optional: under memory pressure the call runs unsplit rather than collect
    // garbage and flush the allocator's cache for it
    p.part = (float *)cuda_scratch_try_alloc(d, *part_bytes);
    if (!p.part) return 0;
    p.counters = d->split_counters;
    p.nseg = nseg;
    return nsplit;
}

}  // namespace

moe_status cuda_mma_grouped(cuda_dev *d, int transb, float alpha, const void *a, const void *b, float beta, void *c,
                            const int64_t *offsets, const int64_t *off_dev, int groups, int64_t M, int64_t K,
                            int64_t N, bool *ran) {
    return cuda_mma_grouped_pair(d, transb, alpha, a, b, NULL, NULL, 0, beta, c, offsets, off_dev, groups, M, K, N, ran);
}

moe_status cuda_mma_grouped_pair(cuda_dev *d, int transb, float alpha, const void *a, const void *b, const void *a2,
                                 const void *b2, int64_t K2, float beta, void *c, const int64_t *offsets,
                                 const int64_t *off_dev, int groups, int64_t M, int64_t K, int64_t N, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || K <= 0 || N <= 0 || K % 8 || N % 8 || K > INT32_MAX || N > INT32_MAX ||
        !aligned16(a) || !aligned16(b) || !aligned16(c))
        return MOE_OK;
    if (K2 < 0 || K2 % 8 || K2 > INT32_MAX || (K2 > 0 && (!a2 || !b2 || !aligned16(a2) || !aligned16(b2))))
        return MOE_OK;
    mma_params p;
    p.a = (const __nv_bfloat16 *)a; p.b = (const __nv_bfloat16 *)b; p.c = (__nv_bfloat16 *)c;
    p.a2 = (const __nv_bfloat16 *)a2; p.b2 = (const __nv_bfloat16 *)b2; p.K2 = (int)K2;
    p.sg = p.su = nullptr; p.cg = p.cu = p.ch = nullptr; p.rows = nullptr; p.rw = nullptr; p.dwp = nullptr; p.epi_n = 0;
    p.alpha = alpha; p.beta = beta;
    p.K = (int)K; p.N = (int)N; p.P = p.Q = 0; p.m_tiles = 0;
    int64_t tiles = set_rows(p, offsets, off_dev, groups, M);
    if (K2 > 0)
        return transb ? launch<true, true, false, true>(d, p, tiles, N, "gemm_grouped_pair (kernel)", ran)
                      : launch<true, false, false, true>(d, p, tiles, N, "gemm_grouped_pair (kernel)", ran);
    return transb ? launch<true, true, false>(d, p, tiles, N, "gemm_grouped (kernel)", ran)
                  : launch<true, false, false>(d, p, tiles, N, "gemm_grouped (kernel)", ran);
}

moe_status cuda_mma_grouped_wgrad(cuda_dev *d, float alpha, const void *a, const void *b, const int64_t *b_rows,
                                  float beta, void *c, const int64_t *offsets, const int64_t *off_dev, int groups,
                                  int64_t M, int64_t P, int64_t Q, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || P <= 0 || Q <= 0 || P % 8 || Q % 8 || P > INT32_MAX || Q > INT32_MAX ||
        !aligned16(a) || !aligned16(b) || !aligned16(c))
        return MOE_OK;
    mma_params p;
    p.a = (const __nv_bfloat16 *)a; p.b = (const __nv_bfloat16 *)b; p.c = (__nv_bfloat16 *)c;
    p.alpha = alpha; p.beta = beta;
    p.P = (int)P; p.Q = (int)Q; p.K = p.N = 0;
    p.a2 = p.b2 = nullptr; p.K2 = 0;
    p.sg = p.su = nullptr; p.cg = p.cu = p.ch = nullptr; p.rows = nullptr; p.rw = nullptr; p.dwp = nullptr; p.epi_n = 0;
    p.m_tiles = (int)((P + BM - 1) / BM);
    p.nseg = 0; p.part = nullptr; p.counters = nullptr;
    set_rows(p, offsets, off_dev, groups, M);
    int nsplit = 0;
    size_t part_bytes = 0;
    if (offsets) {   // on the device, each block orders the groups, and none is split
        int order[MAX_GROUPS];
        for (int g = 0; g < groups; g++) order[g] = g;
        std::stable_sort(order, order + groups, [&](int x, int y) {
            return offsets[x + 1] - offsets[x] > offsets[y + 1] - offsets[y];
        });
        const int64_t per = p.m_tiles * ((Q + BN - 1) / BN);
        nsplit = plan_split(d, p, order, groups, per, &part_bytes);
        for (int i = nsplit; i < groups; i++) p.order[i - nsplit] = order[i];
    }
    p.rows = b_rows;
    const int64_t tiles = (int64_t)(p.nseg + groups - nsplit) * p.m_tiles;
    moe_status st = b_rows ? launch<false, false, true, false, EPI_PLAIN, true>(d, p, tiles, Q, "gemm_grouped_wgrad (kernel, gathered rows)", ran)
                           : launch<false, false, true>(d, p, tiles, Q, "gemm_grouped_wgrad (kernel)", ran);
    if (p.part) cuda_scratch_free(d, p.part, part_bytes);   // stream-ordered: free once the kernel is queued
    if (st == MOE_OK && p.nseg > 0 && *ran) d->n_grouped_split++;
    return st;
}

moe_status cuda_mma_grouped_swiglu(cuda_dev *d, const void *x, const int64_t *x_rows, const void *wg, const void *wu,
                                   void *g, void *u, void *h, const int64_t *offsets, const int64_t *off_dev, int groups,
                                   int64_t M, int64_t K, int64_t de, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || K <= 0 || de <= 0 || K % 8 || de % 64 || K > INT32_MAX ||
        2 * de > INT32_MAX || !aligned16(x) || !aligned16(wg) || !aligned16(wu) || !aligned16(g) || !aligned16(u) ||
        !aligned16(h))
        return MOE_OK;
    mma_params p;
    p.a = (const __nv_bfloat16 *)x; p.b = (const __nv_bfloat16 *)wg; p.b2 = (const __nv_bfloat16 *)wu;
    p.a2 = nullptr; p.K2 = 0;
    p.c = (__nv_bfloat16 *)h; p.cg = (__nv_bfloat16 *)g; p.cu = (__nv_bfloat16 *)u; p.ch = nullptr;
    p.rows = x_rows; p.rw = nullptr; p.dwp = nullptr;
    p.sg = p.su = nullptr; p.epi_n = (int)de;
    p.alpha = 1.0f; p.beta = 0.0f;
    p.K = (int)K; p.N = (int)(2 * de); p.P = p.Q = 0; p.m_tiles = 0;
    int64_t tiles = set_rows(p, offsets, off_dev, groups, M);
    if (x_rows)
        return launch<true, true, false, false, EPI_SWIGLU, true>(d, p, tiles, 2 * de,
                                                                 "gemm_grouped_swiglu (kernel, gathered rows)", ran);
    return launch<true, true, false, false, EPI_SWIGLU>(d, p, tiles, 2 * de, "gemm_grouped_swiglu (kernel)", ran);
}

moe_status cuda_mma_grouped_swiglu_bwd(cuda_dev *d, float alpha, const void *dy, const void *w, const void *g,
                                       const void *u, void *dg, void *du, void *h, const int64_t *offsets,
                                       const int64_t *off_dev, int groups, int64_t M, int64_t K, int64_t de, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || K <= 0 || de <= 0 || K % 8 || de % 8 || K > INT32_MAX || de > INT32_MAX ||
        !aligned16(dy) || !aligned16(w) || !aligned16(g) || !aligned16(u) || !aligned16(dg) || !aligned16(du) ||
        (h && !aligned16(h)))
        return MOE_OK;
    mma_params p;
    p.a = (const __nv_bfloat16 *)dy; p.b = (const __nv_bfloat16 *)w;
    p.a2 = p.b2 = nullptr; p.K2 = 0;
    p.c = (__nv_bfloat16 *)dg;   // not written: the epilogue writes cg and cu (and ch)
    p.ch = (__nv_bfloat16 *)h;   // NULL: the activation is not written again
    p.rows = nullptr; p.rw = nullptr; p.dwp = nullptr;
    p.sg = (const __nv_bfloat16 *)g; p.su = (const __nv_bfloat16 *)u;
    p.cg = (__nv_bfloat16 *)dg; p.cu = (__nv_bfloat16 *)du; p.epi_n = (int)de;
    p.alpha = alpha; p.beta = 0.0f;
    p.K = (int)K; p.N = (int)de; p.P = p.Q = 0; p.m_tiles = 0;
    int64_t tiles = set_rows(p, offsets, off_dev, groups, M);
    return launch<true, false, false, false, EPI_SWIGLU_BWD>(d, p, tiles, de, "gemm_grouped_swiglu_backward (kernel)",
                                                             ran);
}

moe_status cuda_mma_grouped_swiglu_bwd_w(cuda_dev *d, float alpha, const void *dy, const void *w, const void *g,
                                         const void *u, const void *rw, void *dg, void *du, void *hw, void *dw,
                                         bool dw_bf16, const int64_t *offsets, const int64_t *off_dev, int groups,
                                         int64_t M, int64_t K, int64_t de, bool *ran) {
    *ran = false;
    if (!groups_fit(offsets, off_dev, groups, M) || K <= 0 || de <= 0 || K % 8 || de % 8 || K > INT32_MAX || de > INT32_MAX ||
        !aligned16(dy) || !aligned16(w) || !aligned16(g) || !aligned16(u) || !aligned16(dg) || !aligned16(du) ||
        !aligned16(hw))
        return MOE_OK;
    const int64_t rows = offsets ? offsets[groups] : M;
    const int nt = (int)((de + BN - 1) / BN);
    const size_t part_bytes = (size_t)(rows > 0 ? rows : 1) * (size_t)nt * sizeof(float);
    float *part = (float *)cuda_scratch_alloc(d, part_bytes);
    if (!part) return moe_last_status();
    // device offsets that break the contract (not from 0 to M) leave rows in no
    // group, whose partial sums no tile writes: zeros then, not the pool's old bytes
    if (off_dev && cudaMemsetAsync(part, 0, part_bytes, d->stream) != cudaSuccess) {
        cudaError_t e = cudaGetLastError();
        cuda_scratch_free(d, part, part_bytes);
        return moe_error(MOE_ERR_DEVICE, "cuda gemm_grouped_swiglu_backward (weighted): %s", cudaGetErrorString(e));
    }
    mma_params p;
    p.a = (const __nv_bfloat16 *)dy; p.b = (const __nv_bfloat16 *)w;
    p.a2 = p.b2 = nullptr; p.K2 = 0;
    p.c = (__nv_bfloat16 *)dg;   // not written: the epilogue writes cg, cu and ch
    p.sg = (const __nv_bfloat16 *)g; p.su = (const __nv_bfloat16 *)u;
    p.cg = (__nv_bfloat16 *)dg; p.cu = (__nv_bfloat16 *)du; p.ch = (__nv_bfloat16 *)hw;
    p.rows = nullptr; p.rw = (const __nv_bfloat16 *)rw; p.dwp = part;
    p.epi_n = (int)de;
    p.alpha = alpha; p.beta = 0.0f;
    p.K = (int)K; p.N = (int)de; p.P = p.Q = 0; p.m_tiles = 0;
    int64_t tiles = set_rows(p, offsets, off_dev, groups, M);
    moe_status st = launch<true, false, false, false, EPI_SWIGLU_BWD_W>(d, p, tiles, de,
                                                                      "gemm_grouped_swiglu_backward (kernel, weighted)", ran);
    if (st == MOE_OK && *ran && rows > 0) {
        unsigned grid = (unsigned)std::min<int64_t>((rows + 255) / 256, 4096);
        if (dw_bf16)
            k_rowsum_partials<__nv_bfloat16><<<grid, 256, 0, d->stream>>>((__nv_bfloat16 *)dw, part, rows, nt);
        else
            k_rowsum_partials<float><<<grid, 256, 0, d->stream>>>((float *)dw, part, rows, nt);
        cudaError_t e = cudaGetLastError();
        if (e != cudaSuccess) st = moe_error(MOE_ERR_DEVICE, "gemm_grouped_swiglu_backward (weights' sums): %s", cudaGetErrorString(e));
    }
    cuda_scratch_free(d, part, part_bytes);   // stream-ordered
    return st;
}
