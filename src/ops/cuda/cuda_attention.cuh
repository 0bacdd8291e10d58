// Scaled dot-product attention, forward and backward, flash style: scores live
// only in registers / shared memory tile by tile, never as a [T, S] matrix in
// device memory, so memory stays O(B H T D) at any sequence length.
//
// Shapes (contiguous): q [B, T, Hq, D], k and v [B, S, Hkv, D], out [B, T, Hq, D],
// lse [B, Hq, T] (f32 or the data dtype). Grouped-query: q head h reads kv head
// h / (Hq / Hkv). Causal: query t sees keys s <= t + (S - T). A query that sees
// no key gets out = 0 and lse = -inf (as on the CPU).
//
// Two implementations of each kernel:
//  * tensor cores (bf16 data, D = 64 or 128): mma.sync m16n8k16 bf16 -> f32 via
//    ldmatrix from padded shared tiles (rows of D + 8 elements, conflict-free),
//    tiles streamed with cp.async, double-buffered. Softmax and all sums in f32;
//    P and dS are rounded to bf16 as matmul operands (as FlashAttention does).
//  * SIMT (f32 data, or bf16 with another D <= 256, or unaligned pointers):
//    f32 tiles of 32 x 32 in shared memory, f32 FMA; exact f32 arithmetic, so
//    f32 matches the CPU to rounding. Correct for any D <= 256, not fast.
//
// Forward: one block per (64 or 128 queries, q head, batch) on tensor cores
// (32 in the SIMT kernel); online softmax in base 2 with scale * log2 e folded
// into one multiply-add per score (tensor cores; the SIMT kernel multiplies
// first), exponentials by ex2.approx; keys past the causal limit of the
// block's last query are never loaded.
//
// Backward (deterministic, no atomics):
//  1. prep: lse2 = lse * log2 e and Dvec = rowsum(dO * O) per (b, h, t), f32 scratch;
//  2. dK/dV: one block per (64 or 32 keys, kv head, batch) owns its dK, dV rows
//     and loops over the G query heads of its group and every query tile that
//     can see its keys, in a fixed order: P^T = exp2(K Q^T sl2 - lse2),
//     dP^T = V dO^T, dS^T = P^T (dP^T - Dvec), dV += P^T dO, dK += dS^T Q;
//  3. dQ: one block per (query tile, q head, batch) over the key tiles:
//     dQ += dS K (recomputing P and dP).
// Cost: the scores and dP are computed twice (in 2 and 3): 7 T x S x D matmuls
// instead of the 5 of an atomic dQ, about 1.4x the arithmetic, in exchange for
// bit-identical results from run to run. At D = 64 the dK/dV kernel instead
// keeps its dS tiles (bf16, 8 KB each, the causal ones only) in scratch when
// they fit the device's cap, and dQ is one matmul a tile over them: 5 matmuls
// and a write and read of the tiles, still without atomics.
//
// Files: this header holds what the forward and the backward share (the
// cp.async / ldmatrix / mma.sync wrappers, the SIMT tile helpers, the host-side
// shape checks and path choice); cuda_attention_fwd.cu has the forward kernels
// and cuda_attention(), cuda_attention_bwd.cu the backward kernels (prep, dK/dV,
// dQ) and cuda_attention_backward(). Everything here has internal linkage
// (anonymous namespace), so each .cu that includes it compiles on its own.
#ifndef MOE_CUDA_ATTENTION_CUH
#define MOE_CUDA_ATTENTION_CUH

#include "cuda_common.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define LOG2E 1.4426950408889634f
#define LN2 0.6931471805599453f

// ---------------------------------------------------------------- helpers

__device__ __forceinline__ void cp_async16(void *smem, const void *gmem, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async4(void *smem, const void *gmem, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(smem);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory"); }

__device__ __forceinline__ void ldsm_x4(uint32_t r[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t r[4], const bf16 *p) {
    unsigned a = (unsigned)__cvta_generic_to_shared(p);
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(a)
                 : "memory");
}

// c[16x8] += a[16x16] b[16x8], bf16 operands, f32 accumulators
__device__ __forceinline__ void mma16816(float c[4], const uint32_t a[4], uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t pack_bf16(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t *>(&v);
}

// Fragment loads from a shared tile with row stride ld (elements).
// A operand (16 rows x 16 k) of a [row][k] tile; also the B operand of a [k][n]
// tile loaded transposed (two n-tiles of 8): the lane addresses coincide.
__device__ __forceinline__ const bf16 *frag_addr_a(const bf16 *base, int ld, int row0, int col0) {
    int lane = threadIdx.x & 31;
    return base + (row0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + col0 + (lane >> 4) * 8;
}
// B operand of a [n][k] tile (two n-tiles of 8 at n0, k-slice of 16 at k0):
// r[0], r[1] are b0, b1 of n-tile n0, r[2], r[3] of n-tile n0 + 8.
__device__ __forceinline__ const bf16 *frag_addr_bn(const bf16 *base, int ld, int n0, int k0) {
    int lane = threadIdx.x & 31;
    return base + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;
}
__device__ __forceinline__ void lds_a(uint32_t r[4], const bf16 *base, int ld, int row0, int k0) {
    ldsm_x4(r, frag_addr_a(base, ld, row0, k0));
}
__device__ __forceinline__ void lds_bn(uint32_t r[4], const bf16 *base, int ld, int n0, int k0) {
    ldsm_x4(r, frag_addr_bn(base, ld, n0, k0));
}
// B operand of a [k][n] tile, transposed on load: r[0], r[1] for n-tile n0, r[2], r[3] for n0 + 8.
__device__ __forceinline__ void lds_bt(uint32_t r[4], const bf16 *base, int ld, int k0, int n0) {
    ldsm_x4_t(r, frag_addr_a(base, ld, k0, n0));
}

// ROWS rows of D bf16 (global row stride `stride` elements) into a shared tile
// of row stride D + 8, with cp.async; rows at or past `valid` are zero-filled.
template <int D, int ROWS, int NT>
__device__ __forceinline__ void load_rows(bf16 *dst, const bf16 *src, int64_t stride, int row0, int valid) {
    constexpr int CPR = D / 8, LD = D + 8;
#pragma unroll
    for (int c = threadIdx.x; c < ROWS * CPR; c += NT) {
        int r = c / CPR, cc = c - r * CPR, gr = row0 + r;
        bool ok = gr < valid;
        const bf16 *g = ok ? src + (int64_t)gr * stride + cc * 8 : src;
        cp_async16(dst + r * LD + cc * 8, g, ok ? 16 : 0);
    }
}

// 2^x by the special-function unit alone (exp2f adds range handling for
// denormal results): softmax weights below 2^-126 flush to 0
__device__ __forceinline__ float ex2_approx(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float shfl_max4(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float shfl_sum4(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// The block's (tile, head, batch) of a (tiles, heads, batch) grid, with the tile
// slowest: blocks start in linear order (x fastest), so read this way every
// head's and batch's tile 0 (the heaviest under a causal mask, as each kernel
// maps tiles) starts before any tile 1, and the last wave holds only light
// tiles. Read as x, y, z, each (head, batch) ran through all its tiles in turn
// and the last wave held heavy tiles of the last heads (ncu: the SMs active
// 84-87% of the kernels' time).
struct tile_head_batch { int t, h, b; };
__device__ __forceinline__ tile_head_batch block_tile_major() {
    const int64_t yz = (int64_t)gridDim.y * gridDim.z;
    const int64_t lin = blockIdx.x + (int64_t)gridDim.x * (blockIdx.y + (int64_t)gridDim.y * blockIdx.z);
    const int64_t rest = lin % yz;
    return tile_head_batch{(int)(lin / yz), (int)(rest % gridDim.y), (int)(rest / gridDim.y)};
}

struct att_dims {
    int T, S, Hq, Hkv, D;
    int causal;
    float scale, sl2;   // sl2 = scale * log2(e)
};

// keys [0, n) that some query of [q0, q_end) may see
__device__ __forceinline__ int keys_needed(const att_dims &a, int q0, int q_end) {
    if (!a.causal) return a.S;
    int qlast = (q_end < a.T ? q_end : a.T) - 1;
    int n = qlast + a.S - a.T + 1;
    return n < 0 ? 0 : n > a.S ? a.S : n;
}

// ---------------------------------------------------------------- SIMT (any dtype, D <= 256)
//
// Tiles of 32 queries x 32 keys, f32 in shared memory with rows of D + 1
// (conflict-free column reads); 128 threads. Score tiles: thread i computes
// rows 2 (i / 8) + {0, 1} and columns (i % 8) + 8 j, j < 4. Row-owned
// accumulators (O, dQ, dK, dV): thread i owns row i / 4 and columns
// (i % 4) + 4 j, j < DMAX / 4.

#define SB 32   // SIMT tile edge

__device__ __forceinline__ void simt_dot(float acc[2][4], const float *A, const float *B, int ld, int D) {
    const int rg = threadIdx.x >> 3, cg = threadIdx.x & 7;
    const float *a0 = A + (2 * rg) * ld, *a1 = a0 + ld;
    const float *b0 = B + cg * ld, *b1 = b0 + 8 * ld, *b2 = b1 + 8 * ld, *b3 = b2 + 8 * ld;
#pragma unroll
    for (int i = 0; i < 2; i++) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f;
    for (int d = 0; d < D; d++) {
        float x0 = a0[d], x1 = a1[d], y0 = b0[d], y1 = b1[d], y2 = b2[d], y3 = b3[d];
        acc[0][0] += x0 * y0; acc[0][1] += x0 * y1; acc[0][2] += x0 * y2; acc[0][3] += x0 * y3;
        acc[1][0] += x1 * y0; acc[1][1] += x1 * y1; acc[1][2] += x1 * y2; acc[1][3] += x1 * y3;
    }
}

// SB rows of D (global row stride `stride`) into f32 shared rows of ld; rows >= valid are 0
template <typename T>
__device__ __forceinline__ void simt_load(float *dst, int ld, const T *src, int64_t stride, int row0, int valid, int D) {
    for (int e = threadIdx.x; e < SB * D; e += blockDim.x) {
        int r = e / D, c = e - r * D, gr = row0 + r;
        dst[r * ld + c] = gr < valid ? to_f32(src[(int64_t)gr * stride + c]) : 0.0f;
    }
}

// ---------------------------------------------------------------- host side

struct att_shape {
    int64_t B, T, S, Hq, Hkv, D;
};

att_shape shape_of(const moe_tensor *q, const moe_tensor *k) {
    return att_shape{q->shape[0], q->shape[1], k->shape[1], q->shape[2], k->shape[2], q->shape[3]};
}

moe_status check_shape(const att_shape &s, const char *op) {
    if (s.D > 256) return moe_error(MOE_ERR_SHAPE, "%s on cuda: head dim %lld, at most 256 supported", op, (long long)s.D);
    if (s.T > INT32_MAX / 2 || s.S > INT32_MAX / 2 || s.B > 65535 || s.Hq > 65535)
        return moe_error(MOE_ERR_SHAPE, "%s on cuda: B %lld, T %lld, S %lld or Hq %lld too large", op, (long long)s.B,
                         (long long)s.T, (long long)s.S, (long long)s.Hq);
    return MOE_OK;
}

att_dims dims_of(const att_shape &s, float scale, int causal) {
    att_dims a;
    a.T = (int)s.T; a.S = (int)s.S; a.Hq = (int)s.Hq; a.Hkv = (int)s.Hkv; a.D = (int)s.D;
    a.causal = causal;
    a.scale = scale;
    a.sl2 = scale * LOG2E;
    return a;
}

bool aligned16(const moe_tensor *t) { return ((uintptr_t)moe_tensor_data(t) & 15) == 0; }

// tensor-core path: bf16 data, D 64 or 128, 16-byte aligned rows
bool use_mma(const moe_tensor *q, const moe_tensor *k, const moe_tensor *v, const moe_tensor *a,
             const moe_tensor *b) {
    int64_t D = q->shape[3];
    if (q->dtype != MOE_BF16 || (D != 64 && D != 128)) return false;
    const moe_tensor *ts[] = {q, k, v, a, b};
    for (const moe_tensor *t : ts)
        if (t && !aligned16(t)) return false;
    return true;
}

template <typename K>
moe_status set_smem(K kernel, size_t bytes, const char *what) {
    if (bytes > 48 * 1024)
        CU_TRY(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)bytes), what);
    return MOE_OK;
}

int simt_dmax(int64_t D) { return D <= 64 ? 64 : D <= 128 ? 128 : 256; }

moe_status check_lse(const moe_tensor *q, const moe_tensor *lse, const char *op) {
    if (lse->dtype == q->dtype || lse->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: lse must be f32 or %s, got %s", op, moe_dtype_name(q->dtype),
                     moe_dtype_name(lse->dtype));
}

}  // namespace

#endif
