// What the two TMA grouped-GEMM kernels share: cuda_grouped_tma.cu (two
// consumer warpgroups on one 128 x 256 tile) and cuda_grouped_tma_pp.cu (each
// warpgroup on its own 128 x 128 tile, in turns): the launch parameters, the
// work items' tiles, and the PTX of the barriers, the copies and wgmma.
#ifndef MOE_CUDA_TMA_PTX_CUH
#define MOE_CUDA_TMA_PTX_CUH

#include <cuda.h>
#include <cuda_bf16.h>
#include <stdint.h>

#include "cuda_grouped_tma.h"

namespace moe_tma {

// M tiles of 128 rows and k-tiles of 64 in both kernels
constexpr int BM = 128, BK = 64, THREADS = 384;
constexpr int MAX_GROUPS = MOE_TMA_GROUPED_MAX_GROUPS;
// what a launch computes: c = a b_g^T (b [G, N, K]), c = a b_g (b [G, K, N]),
// or the weight gradient c_g = a_g^T b_g (a [rows, P], b [rows, Q], c [G, P, Q])
enum { MODE_BT, MODE_BN, MODE_WG };

struct tma_params {
    // first: 64-byte aligned as the copies require; a2, b2: the second pair along
    // K (K2 > 0), its K tiles after the first pair's in the same accumulators
    CUtensorMap map_a, map_b, map_a2, map_b2, map_c;
    __nv_bfloat16 *c;
    float alpha, beta;
    int N, K, K2, n_tiles, items, groups;
    int P, m_pairs;              // weight gradient: the rows of c_g (a's columns) and their pairs of M tiles
    int off[MAX_GROUPS + 1];     // row offsets of the groups
    int pair0[MAX_GROUPS + 1];   // the first pair of M tiles of each group (prefix sums)
    short order[MAX_GROUPS];     // weight gradient: the groups by decreasing rows (the order their tiles run)
};
static_assert(sizeof(tma_params) < 4096, "TMA grouped GEMM parameters exceed the classic kernel parameter limit");
static_assert(alignof(tma_params) >= 64, "tensor maps must be 64-byte aligned");

__device__ __forceinline__ unsigned smem_u32(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(uint64_t *b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
__device__ __forceinline__ void bar_expect(uint64_t *b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t *b, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
    } while (!done);
}
// this thread's arrival on a barrier of its own CTA
__device__ __forceinline__ void bar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
// a consumer warp's release of a stage, on the barrier at the same place in CTA `cta` of the cluster
__device__ __forceinline__ void bar_arrive_at(uint64_t *b, unsigned cta) {
    unsigned r;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(r) : "r"(smem_u32(b)), "r"(cta));
    asm volatile("mbarrier.arrive.shared::cluster.b64 _, [%0];\n" ::"r"(r) : "memory");
}
// the staged outputs of a warpgroup (box of 64 rows x 64 columns) to global memory
__device__ __forceinline__ void tma_store(const CUtensorMap *map, const void *src, int c0, int c1) {
    asm volatile("cp.async.bulk.tensor.2d.global.shared::cta.bulk_group [%0, {%1, %2}], [%3];\n"
                 ::"l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(src)) : "memory");
}
__device__ __forceinline__ void wg_sync(int id) { asm volatile("bar.sync %0, 128;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// one 2-D box of the map into shared memory, counted on bar
__device__ __forceinline__ void tma_load(void *dst, const CUtensorMap *map, int c0, int c1, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
                 ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar))
                 : "memory");
}
// one 3-D box (b [G, K, N] by expert: K rows past the expert's read as zeros)
__device__ __forceinline__ void tma_load3(void *dst, const CUtensorMap *map, int c0, int c1, int c2, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
                 ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar))
                 : "memory");
}
__device__ __forceinline__ void tma_load3_both(void *dst, const CUtensorMap *map, int c0, int c1, int c2, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3, %4}], [%5], %6;\n"
                 ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(smem_u32(bar)),
                 "h"((unsigned short)3)
                 : "memory");
}
// the same box into the same place of both CTAs of the cluster, counted on each one's bar
__device__ __forceinline__ void tma_load_both(void *dst, const CUtensorMap *map, int c0, int c1, uint64_t *bar) {
    asm volatile("cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.multicast::cluster"
                 " [%0], [%1, {%2, %3}], [%4], %5;\n"
                 ::"r"(smem_u32(dst)), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_u32(bar)),
                 "h"((unsigned short)3)
                 : "memory");
}

// K-major, 128-byte swizzled operand (8-row atoms of 1024 B, as the copy engine writes them)
__device__ __forceinline__ uint64_t desc_kmaj(const void *p) {
    uint64_t a = smem_u32(p);
    return ((a & 0x3FFFF) >> 4) | (1ull << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}
// N-major B (b [G, K, N]), as the copy engine writes boxes of 64 K rows x 64 N
// (128 bytes a row, swizzled): the 64-column slabs 8 KB apart (leading
// offset), groups of 8 K rows 1024 B apart (stride)
__device__ __forceinline__ uint64_t desc_nmaj(const void *p) {
    uint64_t a = smem_u32(p);
    return ((a & 0x3FFFF) >> 4) | ((uint64_t)(8192 >> 4) << 16) | ((uint64_t)(1024 >> 4) << 32) | (1ull << 62);
}

template <int TA, int TB> __device__ __forceinline__ void wgmma_m64n256k16(float *d, uint64_t da, uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, %64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127}, %128, %129, p, 1, 1, %130, %131;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]), "+f"(d[64]), "+f"(d[65]), "+f"(d[66]), "+f"(d[67]), "+f"(d[68]), "+f"(d[69]), "+f"(d[70]), "+f"(d[71]), "+f"(d[72]), "+f"(d[73]), "+f"(d[74]), "+f"(d[75]), "+f"(d[76]), "+f"(d[77]), "+f"(d[78]), "+f"(d[79]), "+f"(d[80]), "+f"(d[81]), "+f"(d[82]), "+f"(d[83]), "+f"(d[84]), "+f"(d[85]), "+f"(d[86]), "+f"(d[87]), "+f"(d[88]), "+f"(d[89]), "+f"(d[90]), "+f"(d[91]), "+f"(d[92]), "+f"(d[93]), "+f"(d[94]), "+f"(d[95]), "+f"(d[96]), "+f"(d[97]), "+f"(d[98]), "+f"(d[99]), "+f"(d[100]), "+f"(d[101]), "+f"(d[102]), "+f"(d[103]), "+f"(d[104]), "+f"(d[105]), "+f"(d[106]), "+f"(d[107]), "+f"(d[108]), "+f"(d[109]), "+f"(d[110]), "+f"(d[111]), "+f"(d[112]), "+f"(d[113]), "+f"(d[114]), "+f"(d[115]), "+f"(d[116]), "+f"(d[117]), "+f"(d[118]), "+f"(d[119]), "+f"(d[120]), "+f"(d[121]), "+f"(d[122]), "+f"(d[123]), "+f"(d[124]), "+f"(d[125]), "+f"(d[126]), "+f"(d[127])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

template <int TA, int TB> __device__ __forceinline__ void wgmma_m64n128k16(float *d, uint64_t da, uint64_t db) {
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, %64, %65, p, 1, 1, %66, %67;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
                 : "l"(da), "l"(db), "n"(TA), "n"(TB));
}

// The tile of work item t for the CTA of cluster rank `rank`: its group, its
// first row (of a_g, or of c_g for the weight gradient) and its N tile. A
// cluster of two takes a pair of M tiles of one group (the second past the
// group's rows when it has an odd count: that CTA loads and multiplies, and
// stores nothing) and one N tile. The weight gradient's groups all have the
// same tiles; they run largest first.
struct tma_tile { int g, m0, nt; };
template <int CL, int MODE> __device__ __forceinline__ tma_tile tile_of(const tma_params &p, int t, int rank) {
    if (MODE == MODE_WG) {
        const int per = p.m_pairs * p.n_tiles, r = t % per;
        return tma_tile{p.order[t / per], ((r / p.n_tiles) * CL + rank) * BM, r % p.n_tiles};
    }
    const int mp = t / p.n_tiles;
    int lo = 0, hi = p.groups - 1;
    while (lo < hi) {   // the last group whose first pair is <= mp (empty groups share it with the next)
        int mid = (lo + hi + 1) >> 1;
        if (p.pair0[mid] <= mp) lo = mid;
        else hi = mid - 1;
    }
    return tma_tile{lo, ((mp - p.pair0[lo]) * CL + rank) * BM, t % p.n_tiles};
}

typedef void (*tma_kernel_fn)(tma_params);
// The ping-pong schedule (cuda_grouped_tma_pp.cu): tiles of 128 x PP_BN, one a
// consumer warpgroup; PP_STAGES stages of 32 KB and two 32 KB stagings
constexpr int PP_BN = 128, PP_STAGES = 5, PP_SMEM_BYTES = PP_STAGES * 32768 + 2 * 32768 + 1024;
// its kernel for a cluster size (1 or 2) and MODE_BT or MODE_BN (NULL for another mode)
tma_kernel_fn pp_kernel(int cl, int mode);

}  // namespace moe_tma

#endif
