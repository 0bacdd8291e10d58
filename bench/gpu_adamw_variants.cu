// AdamW's kernel against its memory roofline, and variants of it, on one GPU:
// f32 params, bf16 gradients, bf16 moments (stochastically rounded), the bf16
// compute copy written in the same pass: 20 bytes a parameter, as the step
// runs it (bench/gpu_step.lua with MOELAB_STEP_OPTIM_STATE=bf16). Every
// variant but "copy" gives the same bits as src/ops/cuda/cuda_adamw.cu (checked
// against the first variant's output). Build and run (see bench/RESULTS.md):
//   nvcc -O3 -std=c++17 -gencode arch=compute_90,code=sm_90 -o build/gpu_adamw_variants bench/gpu_adamw_variants.cu
//   build/gpu_adamw_variants [millions of parameters, default 50] [repeats, default 20]
#include "../src/ops/cuda/cuda_common.cuh"
#include "../src/ops/cuda/cuda_vec.cuh"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CK(x)                                                                                  \
    do {                                                                                       \
        cudaError_t e_ = (x);                                                                  \
        if (e_ != cudaSuccess) { fprintf(stderr, "%s: %s\n", #x, cudaGetErrorString(e_)); exit(1); } \
    } while (0)

struct hp { float lr, b1, b2, eps, wd, ibc1, ibc2, gs; int64_t step; };

__device__ __forceinline__ void adam_1(float &p, float &m, float &v, float g, const hp &h) {
    const float gi = __fmul_rn(g, h.gs);
    m = __fadd_rn(__fmul_rn(h.b1, m), __fmul_rn(1.0f - h.b1, gi));
    v = __fadd_rn(__fmul_rn(h.b2, v), __fmul_rn(__fmul_rn(1.0f - h.b2, gi), gi));
    const float q = __fdiv_rn(__fmul_rn(m, h.ibc1), __fadd_rn(__fsqrt_rn(__fmul_rn(v, h.ibc2)), h.eps));
    p = __fsub_rn(p, __fmul_rn(h.lr, __fadd_rn(q, __fmul_rn(h.wd, p))));
}

__device__ __forceinline__ uint4 sr8(const float (&f)[8], int64_t i0, int64_t step, bool hi) {
    uint4 u;
    uint16_t *q = reinterpret_cast<uint16_t *>(&u);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        uint32_t r = moe_adamw_sr_bits(i0 + k, step);
        q[k] = moe_bf16_round_sr(f[k], hi ? r >> 16 : r);
    }
    return u;
}
// both moments from one hash a pair of elements (the same bits: r for m, r >> 16 for v)
__device__ __forceinline__ void sr8_mv(const float (&m)[8], const float (&v)[8], int64_t i0, int64_t step, uint4 &um,
                                       uint4 &uv) {
    uint16_t *qm = reinterpret_cast<uint16_t *>(&um), *qv = reinterpret_cast<uint16_t *>(&uv);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        uint32_t r = moe_adamw_sr_bits(i0 + k, step);
        qm[k] = moe_bf16_round_sr(m[k], r);
        qv[k] = moe_bf16_round_sr(v[k], r >> 16);
    }
}

template <bool CS> __device__ __forceinline__ uint4 LD(const void *p) { return CS ? ld16_cs(p) : ld16(p); }
template <bool CS> __device__ __forceinline__ void ST(void *p, uint4 v) {
    if (CS) st16_cs(p, v);
    else st16(p, v);
}

// U groups of 8 elements a thread per turn of the grid-stride loop; CS: streaming cache hints
template <int U, bool CS>
__global__ void __launch_bounds__(256) k_var(float *p, const bf16 *g, bf16 *m, bf16 *v, bf16 *c, int64_t n8, hp h) {
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n8; i += stride * U) {
        uint4 rp[U][2], rg[U], rm[U], rv[U];
        bool ok[U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            const int64_t j = i + u * stride;
            ok[u] = j < n8;
            if (ok[u]) {
                const int64_t o = j * 8;
                rp[u][0] = LD<CS>(p + o);
                rp[u][1] = LD<CS>(p + o + 4);
                rg[u] = LD<CS>(g + o);
                rm[u] = LD<CS>(m + o);
                rv[u] = LD<CS>(v + o);
            }
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (!ok[u]) continue;
            const int64_t o = (i + u * stride) * 8;
            float pf[8], gf[8], mf[8], vf[8], a[4], b[4];
            unpack(rp[u][0], a);
            unpack(rp[u][1], b);
            for (int k = 0; k < 4; k++) { pf[k] = a[k]; pf[4 + k] = b[k]; }
            unpack(rg[u], gf);
            unpack(rm[u], mf);
            unpack(rv[u], vf);
#pragma unroll
            for (int k = 0; k < 8; k++) adam_1(pf[k], mf[k], vf[k], gf[k], h);
            uint4 um, uv;
            sr8_mv(mf, vf, o, h.step, um, uv);
            ST<CS>(m + o, um);
            ST<CS>(v + o, uv);
            for (int k = 0; k < 4; k++) { a[k] = pf[k]; b[k] = pf[4 + k]; }
            ST<CS>(p + o, pack(a));
            ST<CS>(p + o + 4, pack(b));
            ST<CS>(c + o, pack(pf));
        }
    }
}

// the shipped kernel's body (k_adamw8 with bf16 G, C, S)
__global__ void k_ship(float *p, const bf16 *g, bf16 *m, bf16 *v, bf16 *c, int64_t n8, hp h) {
    GRID_STRIDE(i, n8) {
        const int64_t o = i * 8;
        float pf[8], gf[8], mf[8], vf[8], a[4], b[4];
        vload(p + o, a);
        vload(p + o + 4, b);
        for (int k = 0; k < 4; k++) { pf[k] = a[k]; pf[4 + k] = b[k]; }
        vload(g + o, gf);
        vload(m + o, mf);
        vload(v + o, vf);
#pragma unroll
        for (int k = 0; k < 8; k++) adam_1(pf[k], mf[k], vf[k], gf[k], h);
        ST<false>(m + o, sr8(mf, o, h.step, false));
        ST<false>(v + o, sr8(vf, o, h.step, true));
        for (int k = 0; k < 4; k++) { a[k] = pf[k]; b[k] = pf[4 + k]; }
        vstore(p + o, a);
        vstore(p + o + 4, b);
        vstore(c + o, pf);
    }
}

// the same bytes with next to no arithmetic: the roofline
__global__ void k_copy(float *p, const bf16 *g, bf16 *m, bf16 *v, bf16 *c, int64_t n8, hp h) {
    GRID_STRIDE(i, n8) {
        const int64_t o = i * 8;
        uint4 a = ld16(p + o), b = ld16(p + o + 4), gg = ld16(g + o), mm = ld16(m + o), vv = ld16(v + o);
        st16(m + o, make_uint4(mm.x ^ gg.x, mm.y, mm.z, mm.w));
        st16(v + o, make_uint4(vv.x ^ gg.y, vv.y, vv.z, vv.w));
        st16(p + o, make_uint4(a.x + 1, a.y, a.z, a.w));
        st16(p + o + 4, b);
        st16(c + o, make_uint4(a.x, b.x, gg.z, gg.w));
    }
}

typedef void (*kfn)(float *, const bf16 *, bf16 *, bf16 *, bf16 *, int64_t, hp);

__global__ void k_fill(uint32_t *x, int64_t n, uint32_t seed, int kind) {
    GRID_STRIDE(i, n) {
        uint32_t r = moe_adamw_sr_bits(i, seed);
        float f = ((r >> 8) * (1.0f / 16777216.0f)) - 0.5f;
        if (kind == 0) x[i] = __float_as_uint(f);                                      // f32 params
        else if (kind == 1) { float a = f * 1e-2f, b = (((r >> 3) & 0xffff) / 65536.0f - 0.5f) * 1e-2f;
                              x[i] = (__float_as_uint(b) & 0xffff0000u) | (__float_as_uint(a) >> 16); }   // bf16 pairs
        else { float a = fabsf(f) * 1e-4f; x[i] = (__float_as_uint(a) & 0xffff0000u) | (__float_as_uint(a) >> 16); }
    }
}

int main(int argc, char **argv) {
    const int64_t n = (int64_t)(argc > 1 ? atof(argv[1]) : 50.0) * 1000000 / 8 * 8;
    const int reps = argc > 2 ? atoi(argv[2]) : 20;
    int sms;
    CK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0));
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    float *p, *p0;
    bf16 *g, *m, *v, *c, *m0, *v0;
    CK(cudaMalloc(&p, n * 4)); CK(cudaMalloc(&p0, n * 4));
    CK(cudaMalloc(&g, n * 2)); CK(cudaMalloc(&m, n * 2)); CK(cudaMalloc(&v, n * 2)); CK(cudaMalloc(&c, n * 2));
    CK(cudaMalloc(&m0, n * 2)); CK(cudaMalloc(&v0, n * 2));
    k_fill<<<1024, 256>>>((uint32_t *)p0, n, 1, 0);
    k_fill<<<1024, 256>>>((uint32_t *)g, n / 2, 2, 1);
    k_fill<<<1024, 256>>>((uint32_t *)m0, n / 2, 3, 1);
    k_fill<<<1024, 256>>>((uint32_t *)v0, n / 2, 4, 2);
    CK(cudaDeviceSynchronize());
    hp h = {1e-3f, 0.9f, 0.95f, 1e-8f, 0.1f, 1.0f / (1.0f - 0.9f), 1.0f / (1.0f - 0.95f), 1.0f, 7};
    const int64_t n8 = n / 8;
    const unsigned capgrid = (unsigned)std::min<int64_t>((n8 + 255) / 256, (int64_t)sms * 32);
    struct var { const char *name; kfn k; unsigned grid; };
    int occ_ship = 0, occ_v1 = 0;
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_ship, k_ship, 256, 0));
    CK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&occ_v1, k_var<1, false>, 256, 0));
    const unsigned res = (unsigned)(sms * occ_v1);
    var vars[] = {
        {"shipped (k_adamw8), grid cap sm*32", k_ship, capgrid},
        {"one hash for m and v, 1 group", k_var<1, false>, capgrid},
        {"one hash, 1 group, streaming hints", k_var<1, true>, capgrid},
        {"one hash, 2 groups in flight", k_var<2, false>, capgrid},
        {"one hash, 2 groups, streaming", k_var<2, true>, capgrid},
        {"one hash, 1 group, resident grid", k_var<1, false>, res},
        {"one hash, 2 groups, resident grid", k_var<2, false>, res},
        {"roofline: same bytes, no arithmetic", k_copy, capgrid},
    };
    const int nv = sizeof vars / sizeof vars[0];
    printf("# %s, %d SMs; n = %lld parameters (20 bytes each: %.2f GB a pass); %d passes a timing; blocks/SM: shipped %d, variant %d\n",
           prop.name, sms, (long long)n, 20.0 * n / 1e9, reps, occ_ship, occ_v1);
    printf("%-40s %10s %10s %8s\n", "variant", "us/pass", "TB/s", "same");
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0)); CK(cudaEventCreate(&e1));
    uint32_t *ref = (uint32_t *)malloc(n * 4), *got = (uint32_t *)malloc(n * 4);
    uint16_t *refm = (uint16_t *)malloc(n * 2), *gotm = (uint16_t *)malloc(n * 2);
    for (int round = 0; round < 2; round++)
        for (int k = 0; k < nv; k++) {
            // one pass from the same start, for the bits
            CK(cudaMemcpy(p, p0, n * 4, cudaMemcpyDeviceToDevice));
            CK(cudaMemcpy(m, m0, n * 2, cudaMemcpyDeviceToDevice));
            CK(cudaMemcpy(v, v0, n * 2, cudaMemcpyDeviceToDevice));
            vars[k].k<<<vars[k].grid, 256>>>(p, g, m, v, c, n8, h);
            CK(cudaGetLastError());
            CK(cudaDeviceSynchronize());
            const char *same = "-";
            if (vars[k].k != k_copy) {
                CK(cudaMemcpy(k == 0 ? ref : got, p, n * 4, cudaMemcpyDeviceToHost));
                CK(cudaMemcpy(k == 0 ? refm : gotm, v, n * 2, cudaMemcpyDeviceToHost));
                same = k == 0 ? "ref" : (memcmp(ref, got, n * 4) == 0 && memcmp(refm, gotm, n * 2) == 0 ? "yes" : "NO");
            }
            CK(cudaEventRecord(e0));
            for (int r = 0; r < reps; r++) vars[k].k<<<vars[k].grid, 256>>>(p, g, m, v, c, n8, h);
            CK(cudaEventRecord(e1));
            CK(cudaEventSynchronize(e1));
            float ms;
            CK(cudaEventElapsedTime(&ms, e0, e1));
            const double us = 1e3 * ms / reps;
            printf("%-40s %10.1f %10.3f %8s%s\n", vars[k].name, us, 20.0 * n / (us * 1e-6) / 1e12, same,
                   round == 0 ? " (round 1)" : "");
        }
    return 0;
}
