// AdamW over flat contiguous buffers, one pass: f32 params, f32 or bf16
// state (bf16: stochastically rounded with the CPU's random bits, ops.h), f32
// or bf16 gradients, and optionally the compute copy of mixed precision
// written from the updated params in the same pass (no separate cast kernel).
// Bias corrections are computed in double and applied as f32 reciprocals
// (moe_adamw_inv_bias_corr), in the same order of operations as the CPU
// backend: on the host from cfg->step, or, with the step held by the device
// (cfg->step_dev, for a step captured into a CUDA graph), by every thread from
// the counter it reads; cfg->lr_dev likewise scales the learning rate there.
// Nothing here waits for the device.
#include "cuda_common.cuh"
#include "cuda_vec.cuh"

#include <math.h>

// The gradient factor under clipping by the device's norm (moe_adamw_clip_scale,
// ops.h: the CPU's arithmetic); false: skip the step (a non-finite norm or
// guard). Without clip_ss, gs as given.
__device__ __forceinline__ bool grad_factor(const float *clip_ss, const float *guard, double clip_max, float &gs) {
    if (!clip_ss) return true;
    const double f = moe_adamw_clip_scale(gs, clip_max, (double)*clip_ss, guard ? (double)*guard : 0.0);
    if (f < 0) return false;
    gs = (float)f;
    return true;
}

// The step and learning rate the device holds (ops.h: step_dev, lr_dev), when
// given: step = *step_dev + 1 with its bias corrections, lr = *lr_dev * lr.
__device__ __forceinline__ void device_step(const int64_t *step_dev, const float *lr_dev, float b1, float b2,
                                            int64_t &step, float &lr, float &ibc1, float &ibc2) {
    if (step_dev) {
        step = *step_dev + 1;
        ibc1 = moe_adamw_inv_bias_corr(b1, step);
        ibc2 = moe_adamw_inv_bias_corr(b2, step);
    }
    if (lr_dev) lr = __fmul_rn(*lr_dev, lr);
}

// One element's update in the CPU's order of operations, each rounded on its
// own (no fused multiply-adds, which nvcc would otherwise form and the CPU
// build does not): the same bits as cpu_adamw.c, so bf16 moments round alike.
__device__ __forceinline__ void adam_1(float &p, float &m, float &v, float g, float gs, float lr, float b1, float b2,
                                       float eps, float wd, float ibc1, float ibc2) {
    const float gi = __fmul_rn(g, gs);
    m = __fadd_rn(__fmul_rn(b1, m), __fmul_rn(1.0f - b1, gi));
    v = __fadd_rn(__fmul_rn(b2, v), __fmul_rn(__fmul_rn(1.0f - b2, gi), gi));
    const float q = __fdiv_rn(__fmul_rn(m, ibc1), __fadd_rn(__fsqrt_rn(__fmul_rn(v, ibc2)), eps));
    p = __fsub_rn(p, __fmul_rn(lr, __fadd_rn(q, __fmul_rn(wd, p))));
}

// the state's store: f32 as is; bf16 stochastically rounded with element i's bits
template <typename S> __device__ __forceinline__ void store_state(S *m, S *v, int64_t k, float mi, float vi,
                                                                  int64_t i, int64_t step) {
    if constexpr (sizeof(S) == 2) {
        uint32_t r = moe_adamw_sr_bits(i, step);
        reinterpret_cast<uint16_t *>(m)[k] = moe_bf16_round_sr(mi, r);
        reinterpret_cast<uint16_t *>(v)[k] = moe_bf16_round_sr(vi, r >> 16);
    } else {
        m[k] = mi;
        v[k] = vi;
    }
}

// 8 elements of T as f32 (p 16-byte aligned): one 16-byte access for bf16, two for f32
template <typename T> __device__ __forceinline__ void load8(const T *p, float (&f)[8]) {
    if constexpr (sizeof(T) == 2) {
        vload(p, f);
    } else {
        float a[4], b[4];
        vload(p, a);
        vload(p + 4, b);
#pragma unroll
        for (int i = 0; i < 4; i++) { f[i] = a[i]; f[4 + i] = b[i]; }
    }
}
template <typename T> __device__ __forceinline__ void store8(T *p, const float (&f)[8]) {
    if constexpr (sizeof(T) == 2) {
        vstore(p, f);
    } else {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; i++) { a[i] = f[i]; b[i] = f[4 + i]; }
        vstore(p, a);
        vstore(p + 4, b);
    }
}

// The master weights an update reads and writes: f32, or split into a bf16
// high plane (the compute copy) and an i16 low one (ops.h, moe_master_hi).
struct master_f32 {
    float *p;
    __device__ __forceinline__ float load(int64_t i) const { return p[i]; }
    __device__ __forceinline__ void store(int64_t i, float x) const { p[i] = x; }
    __device__ __forceinline__ void load8(int64_t o, float (&f)[8]) const { ::load8(p + o, f); }
    __device__ __forceinline__ void store8(int64_t o, const float (&f)[8]) const { ::store8(p + o, f); }
    master_f32 at(int64_t k) const { return {p + k}; }
    bool aligned() const { return cuda_aligned16(p); }
};
struct master_split {
    uint16_t *hi;
    int16_t *lo;
    __device__ __forceinline__ float load(int64_t i) const { return __uint_as_float(moe_master_bits(hi[i], lo[i])); }
    __device__ __forceinline__ void store(int64_t i, float x) const {
        const uint32_t u = __float_as_uint(x);
        const uint16_t h = moe_master_hi(u);
        hi[i] = h;
        lo[i] = moe_master_lo(u, h);
    }
    __device__ __forceinline__ void load8(int64_t o, float (&f)[8]) const {
        const uint4 a = *reinterpret_cast<const uint4 *>(hi + o), b = *reinterpret_cast<const uint4 *>(lo + o);
        const uint16_t *h = reinterpret_cast<const uint16_t *>(&a);
        const int16_t *l = reinterpret_cast<const int16_t *>(&b);
#pragma unroll
        for (int k = 0; k < 8; k++) f[k] = __uint_as_float(moe_master_bits(h[k], l[k]));
    }
    __device__ __forceinline__ void store8(int64_t o, const float (&f)[8]) const {
        uint4 a, b;
        uint16_t *h = reinterpret_cast<uint16_t *>(&a);
        int16_t *l = reinterpret_cast<int16_t *>(&b);
#pragma unroll
        for (int k = 0; k < 8; k++) {
            const uint32_t u = __float_as_uint(f[k]);
            h[k] = moe_master_hi(u);
            l[k] = moe_master_lo(u, h[k]);
        }
        *reinterpret_cast<uint4 *>(hi + o) = a;
        *reinterpret_cast<uint4 *>(lo + o) = b;
    }
    master_split at(int64_t k) const { return {hi + k, lo + k}; }
    bool aligned() const { return cuda_aligned16(hi) && cuda_aligned16(lo); }
};

// The compute copy's value: bf16 rounds ties away from zero (ops.h), the
// split master's high plane, so the copy's bytes do not depend on the split.
template <typename C> __device__ __forceinline__ C compute_of(float x);
template <> __device__ __forceinline__ float compute_of<float>(float x) { return x; }
template <> __device__ __forceinline__ bf16 compute_of<bf16>(float x) {
    return __ushort_as_bfloat16(moe_master_hi(__float_as_uint(x)));
}
__device__ __forceinline__ void store_compute8(float *c, const float (&f)[8]) { store8(c, f); }
__device__ __forceinline__ void store_compute8(bf16 *c, const float (&f)[8]) {
    uint4 a;
    uint16_t *h = reinterpret_cast<uint16_t *>(&a);
#pragma unroll
    for (int k = 0; k < 8; k++) h[k] = moe_master_hi(__float_as_uint(f[k]));
    *reinterpret_cast<uint4 *>(c) = a;
}

// element i of the buffers, all their values read and written (index0 + i: its random bits)
template <typename P, typename G, typename C, typename S>
__device__ __forceinline__ void adam_elem(P p, const G *g, S *m, S *v, C *c, int64_t i, float gs, float lr,
                                          float b1, float b2, float eps, float wd, float ibc1, float ibc2,
                                          int64_t index0, int64_t step) {
    float pi = p.load(i), mi = to_f32(m[i]), vi = to_f32(v[i]);
    adam_1(pi, mi, vi, to_f32(g[i]), gs, lr, b1, b2, eps, wd, ibc1, ibc2);
    store_state(m, v, i, mi, vi, index0 + i, step);
    p.store(i, pi);
    if (c) c[i] = compute_of<C>(pi);
}

template <typename P, typename G, typename C, typename S>
__global__ void k_adamw(P p, const G *g, S *m, S *v, C *c, int64_t n, float lr, float b1, float b2,
                        float eps, float wd, float ibc1, float ibc2, float gs, const float *clip_ss,
                        const float *guard, double clip_max, int64_t index0, int64_t step, const int64_t *step_dev,
                        const float *lr_dev) {
    if (!grad_factor(clip_ss, guard, clip_max, gs)) return;
    device_step(step_dev, lr_dev, b1, b2, step, lr, ibc1, ibc2);
    GRID_STRIDE(i, n) adam_elem(p, g, m, v, c, i, gs, lr, b1, b2, eps, wd, ibc1, ibc2, index0, step);
}

// The same update on groups of 8 elements with 16-byte accesses (every
// pointer 16-byte aligned; the flat buffers align each parameter to 16
// elements). Elements n8 * 8 .. n are left to k_adamw.
// 8 bf16 values stochastically rounded with elements i0 .. i0 + 7's bits (hi: v's half)
__device__ __forceinline__ void store8_sr(bf16 *p, const float (&f)[8], int64_t i0, int64_t step, bool hi) {
    uint4 u;
    uint16_t *h = reinterpret_cast<uint16_t *>(&u);
#pragma unroll
    for (int k = 0; k < 8; k++) {
        uint32_t r = moe_adamw_sr_bits(i0 + k, step);
        h[k] = moe_bf16_round_sr(f[k], hi ? r >> 16 : r);
    }
    *reinterpret_cast<uint4 *>(p) = u;
}

// elements o .. o + 7 (o a multiple of 8) through 16-byte accesses
template <typename P, typename G, typename C, typename S>
__device__ __forceinline__ void adam_group8(P p, const G *g, S *m, S *v, C *c, int64_t o, float gs, float lr,
                                            float b1, float b2, float eps, float wd, float ibc1, float ibc2,
                                            int64_t index0, int64_t step) {
    float pf[8], gf[8], mf[8], vf[8];
    p.load8(o, pf);
    load8(g + o, gf);
    load8(m + o, mf);
    load8(v + o, vf);
#pragma unroll
    for (int k = 0; k < 8; k++) adam_1(pf[k], mf[k], vf[k], gf[k], gs, lr, b1, b2, eps, wd, ibc1, ibc2);
    if constexpr (sizeof(S) == 2) {
        store8_sr(m + o, mf, index0 + o, step, false);
        store8_sr(v + o, vf, index0 + o, step, true);
    } else {
        store8(m + o, mf);
        store8(v + o, vf);
    }
    p.store8(o, pf);
    if (c) store_compute8(c + o, pf);
}

template <typename P, typename G, typename C, typename S>
__global__ void k_adamw8(P p, const G *g, S *m, S *v, C *c, int64_t n8, float lr, float b1, float b2,
                         float eps, float wd, float ibc1, float ibc2, float gs, const float *clip_ss,
                         const float *guard, double clip_max, int64_t index0, int64_t step, const int64_t *step_dev,
                         const float *lr_dev) {
    if (!grad_factor(clip_ss, guard, clip_max, gs)) return;
    device_step(step_dev, lr_dev, b1, b2, step, lr, ibc1, ibc2);
    GRID_STRIDE(i, n8) adam_group8(p, g, m, v, c, i * 8, gs, lr, b1, b2, eps, wd, ibc1, ibc2, index0, step);
}

template <typename P, typename G, typename C, typename S>
static void launch_ptr(cuda_dev *d, P pp, const G *gp, S *mp, S *vp, C *c, int64_t n, const moe_adamw_cfg *cfg,
                       float ibc1, float ibc2) {
    float gs = cfg->grad_scale != 0.0f ? cfg->grad_scale : 1.0f;
    const float *css = cfg->clip_sumsq ? moe_f32((moe_tensor *)cfg->clip_sumsq) : nullptr;
    const float *gd = cfg->guard ? moe_f32((moe_tensor *)cfg->guard) : nullptr;
    const int64_t *sd = cfg->step_dev ? (const int64_t *)moe_tensor_data(cfg->step_dev) : nullptr;
    const float *ld = cfg->lr_dev ? moe_f32(cfg->lr_dev) : nullptr;
    int64_t n8 = 0;
    if (pp.aligned() && cuda_aligned16(gp) && cuda_aligned16(mp) && cuda_aligned16(vp) && (!c || cuda_aligned16(c)))
        n8 = n / 8;
    if (n8 > 0)
        k_adamw8<P, G, C, S><<<cuda_grid_1d(d, n8, 256), 256, 0, d->stream>>>(
            pp, gp, mp, vp, c, n8, cfg->lr, cfg->beta1, cfg->beta2, cfg->eps, cfg->weight_decay, ibc1, ibc2, gs, css,
            gd, cfg->clip_max, cfg->index0, cfg->step, sd, ld);
    int64_t done = n8 * 8;
    if (done < n)
        k_adamw<P, G, C, S><<<cuda_grid_1d(d, n - done, 256), 256, 0, d->stream>>>(
            pp.at(done), gp + done, mp + done, vp + done, c ? c + done : c, n - done, cfg->lr, cfg->beta1, cfg->beta2,
            cfg->eps, cfg->weight_decay, ibc1, ibc2, gs, css, gd, cfg->clip_max, cfg->index0 + done, cfg->step, sd,
            ld);
}

// Runs of elements with their own lr and weight decay in one launch (ops.h,
// cfg->runs): every run starts on a multiple of 8 elements, so a group of 8
// never holds two runs; a group past its run's end (the run's last, partial
// group) updates only the run's elements, and groups between runs are skipped.
struct runs_arg {
    int n;
    int64_t lo[MOE_ADAMW_MAX_RUNS], hi[MOE_ADAMW_MAX_RUNS];
    float lr[MOE_ADAMW_MAX_RUNS], wd[MOE_ADAMW_MAX_RUNS];
};

template <typename P, typename G, typename C, typename S>
__global__ void k_adamw8_runs(P p, const G *g, S *m, S *v, C *c, runs_arg ru, int64_t g0, int64_t g1, float b1,
                              float b2, float eps, float ibc1, float ibc2, float gs, const float *clip_ss,
                              const float *guard, double clip_max, int64_t index0, int64_t step,
                              const int64_t *step_dev, const float *lr_dev) {
    if (!grad_factor(clip_ss, guard, clip_max, gs)) return;
    float lr_one = 1.0f;
    device_step(step_dev, lr_dev, b1, b2, step, lr_one, ibc1, ibc2);
    for (int64_t i = g0 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < g1; i += (int64_t)gridDim.x * blockDim.x) {
        const int64_t o = i * 8;
        int r = 0;   // the last run starting at or before o
        for (int step_r = MOE_ADAMW_MAX_RUNS / 2; step_r > 0; step_r >>= 1)
            if (r + step_r < ru.n && ru.lo[r + step_r] <= o) r += step_r;
        const int64_t hi = ru.hi[r];
        if (o >= hi) continue;   // between runs
        const float lr = lr_dev ? __fmul_rn(*lr_dev, ru.lr[r]) : ru.lr[r], wd = ru.wd[r];
        if (o + 8 > hi) {   // the run's partial last group
            for (int64_t k = o; k < hi; k++)
                adam_elem(p, g, m, v, c, k, gs, lr, b1, b2, eps, wd, ibc1, ibc2, index0, step);
            continue;
        }
        adam_group8(p, g, m, v, c, o, gs, lr, b1, b2, eps, wd, ibc1, ibc2, index0, step);
    }
}

template <typename P, typename G, typename C, typename S>
static void launch_runs(cuda_dev *d, P pp, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v, C *c,
                        const moe_adamw_cfg *cfg, float ibc1, float ibc2) {
    S *mp = (S *)moe_tensor_data(m), *vp = (S *)moe_tensor_data(v);
    const G *gp = (const G *)moe_tensor_data((moe_tensor *)grads);
    if (!(pp.aligned() && cuda_aligned16(gp) && cuda_aligned16(mp) && cuda_aligned16(vp) &&
          (!c || cuda_aligned16(c)))) {
        // unaligned tensors: a launch per run (each its own vector and tail kernels)
        for (int r = 0; r < cfg->n_runs; r++) {
            const moe_adamw_run *u = &cfg->runs[r];
            moe_adamw_cfg one = *cfg;
            one.n_runs = 0;
            one.lr = u->lr;
            one.weight_decay = u->weight_decay;
            one.index0 = cfg->index0 + u->lo;
            launch_ptr<P, G, C, S>(d, pp.at(u->lo), gp + u->lo, mp + u->lo, vp + u->lo, c ? c + u->lo : c, u->hi - u->lo,
                                &one, ibc1, ibc2);
        }
        return;
    }
    runs_arg ru;
    ru.n = cfg->n_runs;
    for (int r = 0; r < cfg->n_runs; r++) {
        ru.lo[r] = cfg->runs[r].lo;
        ru.hi[r] = cfg->runs[r].hi;
        ru.lr[r] = cfg->runs[r].lr;
        ru.wd[r] = cfg->runs[r].weight_decay;
    }
    const int64_t g0 = ru.lo[0] / 8, g1 = (ru.hi[ru.n - 1] + 7) / 8;
    const float *css = cfg->clip_sumsq ? moe_f32((moe_tensor *)cfg->clip_sumsq) : nullptr;
    const float *gd = cfg->guard ? moe_f32((moe_tensor *)cfg->guard) : nullptr;
    const int64_t *sd = cfg->step_dev ? (const int64_t *)moe_tensor_data(cfg->step_dev) : nullptr;
    const float *ld = cfg->lr_dev ? moe_f32(cfg->lr_dev) : nullptr;
    k_adamw8_runs<P, G, C, S><<<cuda_grid_1d(d, g1 - g0, 256), 256, 0, d->stream>>>(
        pp, gp, mp, vp, c, ru, g0, g1, cfg->beta1, cfg->beta2, cfg->eps, ibc1, ibc2,
        cfg->grad_scale != 0.0f ? cfg->grad_scale : 1.0f, css, gd, cfg->clip_max, cfg->index0, cfg->step, sd, ld);
}

template <typename P, typename G, typename C, typename S>
static void launch(cuda_dev *d, P pp, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v, C *c,
                   int64_t n, const moe_adamw_cfg *cfg, float ibc1, float ibc2) {
    if (cfg->n_runs > 0) {
        launch_runs<P, G, C, S>(d, pp, params, grads, m, v, c, cfg, ibc1, ibc2);
        return;
    }
    launch_ptr<P, G, C, S>(d, pp, (const G *)moe_tensor_data((moe_tensor *)grads), (S *)moe_tensor_data(m),
                           (S *)moe_tensor_data(v), c, n, cfg, ibc1, ibc2);
}

template <typename S>
static void launch_s(cuda_dev *d, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                     const moe_adamw_cfg *cfg, int64_t n, float ibc1, float ibc2) {
    int gb = grads->dtype == MOE_BF16;
    moe_tensor *ct = cfg->compute;
    if (cfg->lo) {   // a split master: its high plane is the compute copy (no c)
        master_split pm = {(uint16_t *)moe_tensor_data(params), (int16_t *)moe_tensor_data(cfg->lo)};
        bf16 *none = nullptr;
        if (gb) launch<master_split, bf16, bf16, S>(d, pm, params, grads, m, v, none, n, cfg, ibc1, ibc2);
        else launch<master_split, float, bf16, S>(d, pm, params, grads, m, v, none, n, cfg, ibc1, ibc2);
        return;
    }
    master_f32 pm = {moe_f32(params)};
    if (ct && ct->dtype == MOE_BF16) {
        bf16 *c = (bf16 *)moe_tensor_data(ct);
        if (gb) launch<master_f32, bf16, bf16, S>(d, pm, params, grads, m, v, c, n, cfg, ibc1, ibc2);
        else launch<master_f32, float, bf16, S>(d, pm, params, grads, m, v, c, n, cfg, ibc1, ibc2);
    } else {
        float *c = ct ? moe_f32(ct) : NULL;
        if (gb) launch<master_f32, bf16, float, S>(d, pm, params, grads, m, v, c, n, cfg, ibc1, ibc2);
        else launch<master_f32, float, float, S>(d, pm, params, grads, m, v, c, n, cfg, ibc1, ibc2);
    }
}

moe_status cuda_adamw(moe_ctx *ctx, moe_tensor *params, const moe_tensor *grads, moe_tensor *m, moe_tensor *v,
                      const moe_adamw_cfg *cfg) {
    int64_t n = moe_tensor_numel(params);
    if (n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, params->device);
    // with step_dev the kernels compute these themselves (cfg->step is not read)
    float ibc1 = 1.0f, ibc2 = 1.0f;
    if (!cfg->step_dev) {
        ibc1 = moe_adamw_inv_bias_corr(cfg->beta1, cfg->step);
        ibc2 = moe_adamw_inv_bias_corr(cfg->beta2, cfg->step);
    }
    if (m->dtype == MOE_BF16) launch_s<bf16>(d, params, grads, m, v, cfg, n, ibc1, ibc2);
    else launch_s<float>(d, params, grads, m, v, cfg, n, ibc1, ibc2);
    CU_LAUNCHED("adamw");
    return MOE_OK;
}

// One thread: the counter's step (ops.h moe_op_adamw_advance), skipped by the
// update kernels' own rule, so that it and they agree without the host.
__global__ void k_adamw_advance(int64_t *step, const float *clip_ss, const float *guard, double clip_max, float gs) {
    if (grad_factor(clip_ss, guard, clip_max, gs)) *step += 1;
}

moe_status cuda_adamw_advance(moe_ctx *ctx, moe_tensor *step_dev, const moe_adamw_cfg *cfg) {
    CUDA_ENTER(d, ctx, step_dev->device);
    const float *css = cfg->clip_sumsq ? moe_f32(cfg->clip_sumsq) : nullptr;
    const float *gd = cfg->guard ? moe_f32(cfg->guard) : nullptr;
    k_adamw_advance<<<1, 1, 0, d->stream>>>((int64_t *)moe_tensor_data(step_dev), css, gd, cfg->clip_max,
                                            cfg->grad_scale != 0.0f ? cfg->grad_scale : 1.0f);
    CU_LAUNCHED("adamw_advance");
    return MOE_OK;
}

// The split master's planes (ops.h, moe_master_hi), 8 elements a thread where
// the buffers allow 16-byte accesses
__global__ void k_master_split(const uint32_t *src, uint16_t *hi, int16_t *lo, int64_t n, int vec) {
    if (!lo) {   // the high plane alone: the compute copy of f32 values
        GRID_STRIDE(i, n) hi[i] = moe_master_hi(src[i]);
        return;
    }
    if (vec) {
        GRID_STRIDE(i, n / 8) {
            float f[8];
            load8(reinterpret_cast<const float *>(src) + i * 8, f);
            master_split{hi, lo}.store8(i * 8, f);
        }
        for (int64_t i = n / 8 * 8 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
             i += (int64_t)gridDim.x * blockDim.x)
            master_split{hi, lo}.store(i, __uint_as_float(src[i]));
        return;
    }
    GRID_STRIDE(i, n) master_split{hi, lo}.store(i, __uint_as_float(src[i]));
}

__global__ void k_master_join(uint32_t *dst, const uint16_t *hi, const int16_t *lo, int64_t n, int vec) {
    master_split pm = {const_cast<uint16_t *>(hi), const_cast<int16_t *>(lo)};
    if (vec) {
        GRID_STRIDE(i, n / 8) {
            float f[8];
            pm.load8(i * 8, f);
            store8(reinterpret_cast<float *>(dst) + i * 8, f);
        }
        for (int64_t i = n / 8 * 8 + blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
             i += (int64_t)gridDim.x * blockDim.x)
            dst[i] = __float_as_uint(pm.load(i));
        return;
    }
    GRID_STRIDE(i, n) dst[i] = __float_as_uint(pm.load(i));
}

moe_status cuda_master_split(moe_ctx *ctx, moe_tensor *hi, moe_tensor *lo, const moe_tensor *src) {
    CUDA_ENTER(d, ctx, src->device);
    const int64_t n = moe_tensor_numel(src);
    const uint32_t *s = (const uint32_t *)moe_tensor_data(src);
    uint16_t *h = (uint16_t *)moe_tensor_data(hi);
    int16_t *l = lo ? (int16_t *)moe_tensor_data(lo) : nullptr;
    const int vec = l && cuda_aligned16(s) && cuda_aligned16(h) && cuda_aligned16(l);
    k_master_split<<<cuda_grid_1d(d, vec ? (n + 7) / 8 : n, 256), 256, 0, d->stream>>>(s, h, l, n, vec);
    CU_LAUNCHED("master_split");
    return MOE_OK;
}

moe_status cuda_master_join(moe_ctx *ctx, moe_tensor *dst, const moe_tensor *hi, const moe_tensor *lo) {
    CUDA_ENTER(d, ctx, dst->device);
    const int64_t n = moe_tensor_numel(dst);
    uint32_t *o = (uint32_t *)moe_tensor_data(dst);
    const uint16_t *h = (const uint16_t *)moe_tensor_data(hi);
    const int16_t *l = (const int16_t *)moe_tensor_data(lo);
    const int vec = cuda_aligned16(o) && cuda_aligned16(h) && cuda_aligned16(l);
    k_master_join<<<cuda_grid_1d(d, vec ? (n + 7) / 8 : n, 256), 256, 0, d->stream>>>(o, h, l, n, vec);
    CU_LAUNCHED("master_join");
    return MOE_OK;
}
