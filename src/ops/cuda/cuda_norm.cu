// RMSNorm forward and backward over the last dim, f32 accumulation. The saved
// rstd may be f32 or the data dtype (S below).
//
// Register path (n a multiple of the 16-byte vector width N, x/y/w/dy/dx
// 16-byte aligned, n / N <= 256 forward, n <= 1024 backward): a group of TPR
// lanes (8, 16 or 32: a sub-warp, so short rows such as per-head norms keep
// every lane busy) owns a row; each lane loads its NV vectors (columns
// (lane + k*TPR)*N ...) once into registers, the group reduces with shuffles,
// and the output is written from the registers: x (and dy) are read once.
// The forward keeps each lane's w vectors in registers across rows.
// The backward computes dx and, with dw, accumulates dy*x*rstd per column in
// registers over a fixed block of rows; the groups of a warp, then the warps
// of a block (through shared memory, in warp order) combine, and each block
// writes one row of f32 partials. k_dw_sum then adds the partials into dw in
// block order. Fixed partition and fixed order: dw is deterministic.
// Generic path (any n or alignment): one block per row, two passes over the
// row (vectorised when n % N == 0 and the pointers are aligned), and column
// partials over fixed chunks of rows for dw.
#include "cuda_common.cuh"
#include "cuda_vec.cuh"

namespace {

#define PTR(T, t) ((T *)moe_tensor_data(t))
#define NORM_THREADS 256
#define DW_BLOCKS 256   /* blocks (row chunks) of dw partials, at most */

template <typename T, int V>
__device__ __forceinline__ void load_v(const T *p, float *f) {
    if constexpr (V == 1) f[0] = to_f32(*p);
    else unpack(ld16(p), *reinterpret_cast<float (*)[V]>(f));
}
template <typename T, int V>
__device__ __forceinline__ void store_v(T *p, const float *f) {
    if constexpr (V == 1) *p = from_f32<T>(f[0]);
    else st16(p, pack(*reinterpret_cast<const float (*)[V]>(f)));
}

// Sum over the TPR lanes of an aligned lane group (xor offsets below TPR stay in the group).
template <int TPR>
__device__ __forceinline__ float group_sum(float v) {
#pragma unroll
    for (int o = TPR / 2; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// ---- register path ----

template <typename T, typename S, int TPR, int NV>
__global__ void __launch_bounds__(NORM_THREADS)
k_rms_fwd_reg(T *y, S *rstd, const T *x, const T *w, int64_t rows, int n, float eps) {
    constexpr int N = VEC<T>::N;
    const int gl = threadIdx.x % TPR, gpb = blockDim.x / TPR, nvec = n / N;
    const int64_t g = threadIdx.x / TPR;
    uint4 wr[NV];   // this lane's w vectors, for every row
#pragma unroll
    for (int k = 0; k < NV; k++) {
        int v = gl + k * TPR;
        wr[k] = v < nvec ? ld16(w + (int64_t)v * N) : make_uint4(0, 0, 0, 0);
    }
    for (int64_t base = (int64_t)blockIdx.x * gpb; base < rows; base += (int64_t)gridDim.x * gpb) {
        const int64_t r = base + g;
        const bool ok = r < rows;
        const T *xr = x + r * n;
        uint4 xraw[NV];
#pragma unroll
        for (int k = 0; k < NV; k++) {
            int v = gl + k * TPR;
            xraw[k] = ok && v < nvec ? ld16(xr + (int64_t)v * N) : make_uint4(0, 0, 0, 0);
        }
        float ss = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            float f[N];
            unpack(xraw[k], f);   // zeros where nothing was loaded
#pragma unroll
            for (int e = 0; e < N; e++) ss += f[e] * f[e];
        }
        ss = group_sum<TPR>(ss);   // every lane of the warp takes part
        const float rs = 1.0f / sqrtf(ss / (float)n + eps);
        if (!ok) continue;
        T *yr = y + r * n;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            int v = gl + k * TPR;
            if (v < nvec) {
                float f[N], wf[N];
                unpack(xraw[k], f);
                unpack(wr[k], wf);
#pragma unroll
                for (int e = 0; e < N; e++) f[e] = f[e] * rs * wf[e];
                vstore(yr + (int64_t)v * N, f);
            }
        }
        if (gl == 0) rstd[r] = from_f32<S>(rs);
    }
}

// dx = beta dx + r * (dy*w - x * r^2 * mean(dy*w*x)) (the old dx read only when beta != 0: a
// gradient already summed for x, such as the residual stream's); block b handles rows [b*rpb, (b+1)*rpb).
// With DW, part[b, j] = sum over those rows of dy[r, j] * x[r, j] * rstd[r]
// (dynamic shared memory: (blockDim.x / 32) * n floats).
template <typename T, typename S, int TPR, int NV, bool DW>
__global__ void __launch_bounds__(NORM_THREADS)
k_rms_bwd_reg(T *dx, float *part, const T *dy, const T *x, const T *w, const S *rstd, int64_t rows, int n,
              int64_t rpb, float beta) {
    constexpr int N = VEC<T>::N;
    extern __shared__ float red[];
    const int gl = threadIdx.x % TPR, gpb = blockDim.x / TPR, nvec = n / N;
    const int64_t g = threadIdx.x / TPR;
    const int64_t r0 = (int64_t)blockIdx.x * rpb, r1 = r0 + rpb < rows ? r0 + rpb : rows;
    float acc[NV][N];   // dw partials of this lane's columns (DW only)
#pragma unroll
    for (int k = 0; k < NV; k++)
#pragma unroll
        for (int e = 0; e < N; e++) acc[k][e] = 0.0f;
    for (int64_t base = r0; base < r1; base += gpb) {
        const int64_t r = base + g;
        const bool ok = r < r1;
        const T *xr = x + r * n, *dyr = dy + r * n;
        T *dxr = dx + r * n;
        uint4 xraw[NV], graw[NV];
#pragma unroll
        for (int k = 0; k < NV; k++) {
            int v = gl + k * TPR;
            bool in = ok && v < nvec;
            xraw[k] = in ? ld16(xr + (int64_t)v * N) : make_uint4(0, 0, 0, 0);
            graw[k] = in ? ld16(dyr + (int64_t)v * N) : make_uint4(0, 0, 0, 0);
            // the old dx comes into L1 now: read after the row's sum, it was a
            // third memory latency in sequence (with rstd's) for every row
            // (the step's 17 calls: 0.433 -> 0.404 ms, H200)
            if (in && beta != 0.0f) asm volatile("prefetch.global.L1 [%0];" ::"l"(dxr + (int64_t)v * N));
        }
        const float rs = ok ? to_f32(rstd[r]) : 0.0f;
        float dot = 0.0f;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            int v = gl + k * TPR;
            if (v < nvec) {
                float xf[N], gf[N], wf[N];
                unpack(xraw[k], xf);
                unpack(graw[k], gf);
                vload(w + (int64_t)v * N, wf);
#pragma unroll
                for (int e = 0; e < N; e++) dot += gf[e] * wf[e] * xf[e];
            }
        }
        dot = group_sum<TPR>(dot);   // every lane of the warp takes part
        if (!ok) continue;
        const float c = rs * rs * dot / (float)n;
#pragma unroll
        for (int k = 0; k < NV; k++) {
            int v = gl + k * TPR;
            if (v < nvec) {
                float xf[N], gf[N], wf[N], o[N];
                unpack(xraw[k], xf);
                unpack(graw[k], gf);
                vload(w + (int64_t)v * N, wf);
#pragma unroll
                for (int e = 0; e < N; e++) o[e] = rs * (gf[e] * wf[e] - xf[e] * c);
                if (beta != 0.0f) {
                    float old[N];
                    vload(dxr + (int64_t)v * N, old);
#pragma unroll
                    for (int e = 0; e < N; e++) o[e] += beta * old[e];
                }
                vstore(dxr + (int64_t)v * N, o);
                if (DW) {
#pragma unroll
                    for (int e = 0; e < N; e++) acc[k][e] += gf[e] * xf[e] * rs;
                }
            }
        }
    }
    if constexpr (DW) {
        // the groups of a warp hold the same columns: a butterfly over the group index
#pragma unroll
        for (int k = 0; k < NV; k++)
#pragma unroll
            for (int e = 0; e < N; e++)
#pragma unroll
                for (int o = TPR; o < 32; o <<= 1) acc[k][e] += __shfl_xor_sync(0xffffffffu, acc[k][e], o);
        // then the warps, in warp order
        const int lane = threadIdx.x & 31, wp = threadIdx.x >> 5, nw = blockDim.x >> 5;
        if (lane < TPR) {
#pragma unroll
            for (int k = 0; k < NV; k++) {
                int v = lane + k * TPR;
                if (v < nvec)
#pragma unroll
                    for (int e = 0; e < N; e++) red[wp * n + v * N + e] = acc[k][e];
            }
        }
        __syncthreads();
        for (int j = threadIdx.x; j < n; j += blockDim.x) {
            float s = 0.0f;
            for (int q = 0; q < nw; q++) s += red[q * n + j];
            part[(int64_t)blockIdx.x * n + j] = s;
        }
    }
}

// ---- generic path: one block per row, V = N (vectorised) or 1 ----

template <typename T, typename S, int V>
__global__ void k_rmsnorm(T *y, S *rstd, const T *x, const T *w, int64_t rows, int64_t n, float eps) {
    __shared__ float sh[32];
    const int64_t nv = n / V;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *xr = x + r * n;
        T *yr = y + r * n;
        float ss = 0.0f;
        for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
            float f[V];
            load_v<T, V>(xr + j * V, f);
#pragma unroll
            for (int e = 0; e < V; e++) ss += f[e] * f[e];
        }
        ss = block_sum(ss, sh);
        float rs = 1.0f / sqrtf(ss / (float)n + eps);
        for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
            float f[V], wf[V];
            load_v<T, V>(xr + j * V, f);
            load_v<T, V>(w + j * V, wf);
#pragma unroll
            for (int e = 0; e < V; e++) f[e] = f[e] * rs * wf[e];
            store_v<T, V>(yr + j * V, f);
        }
        if (threadIdx.x == 0) rstd[r] = from_f32<S>(rs);
    }
}

template <typename T, typename S, int V>
__global__ void k_rmsnorm_dx(T *dx, const T *dy, const T *x, const T *w, const S *rstd, int64_t rows, int64_t n,
                             float beta) {
    __shared__ float sh[32];
    const int64_t nv = n / V;
    for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
        const T *dyr = dy + r * n, *xr = x + r * n;
        T *dxr = dx + r * n;
        float rs = to_f32(rstd[r]);
        float dot = 0.0f;
        for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
            float a[V], b[V], c[V];
            load_v<T, V>(dyr + j * V, a);
            load_v<T, V>(w + j * V, b);
            load_v<T, V>(xr + j * V, c);
#pragma unroll
            for (int e = 0; e < V; e++) dot += a[e] * b[e] * c[e];
        }
        dot = block_sum(dot, sh);
        float c = rs * rs * dot / (float)n;
        for (int64_t j = threadIdx.x; j < nv; j += blockDim.x) {
            float a[V], b[V], xx[V];
            load_v<T, V>(dyr + j * V, a);
            load_v<T, V>(w + j * V, b);
            load_v<T, V>(xr + j * V, xx);
#pragma unroll
            for (int e = 0; e < V; e++) a[e] = rs * (a[e] * b[e] - xx[e] * c);
            if (beta != 0.0f) {
                float old[V];
                load_v<T, V>(dxr + j * V, old);
#pragma unroll
                for (int e = 0; e < V; e++) a[e] += beta * old[e];
            }
            store_v<T, V>(dxr + j * V, a);
        }
    }
}

// part[c, j] = sum over rows of chunk c of dy[r, j] * x[r, j] * rstd[r]; a thread owns V columns.
template <typename T, typename S, int V>
__global__ void k_rmsnorm_dw_part(float *part, const T *dy, const T *x, const S *rstd, int64_t rows, int64_t n,
                                  int64_t chunk) {
    int64_t jv = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (jv >= n / V) return;
    int64_t r0 = (int64_t)blockIdx.y * chunk, r1 = r0 + chunk < rows ? r0 + chunk : rows;
    float acc[V];
#pragma unroll
    for (int e = 0; e < V; e++) acc[e] = 0.0f;
    for (int64_t r = r0; r < r1; r++) {
        float a[V], b[V];
        load_v<T, V>(dy + r * n + jv * V, a);
        load_v<T, V>(x + r * n + jv * V, b);
        float rs = to_f32(rstd[r]);
#pragma unroll
        for (int e = 0; e < V; e++) acc[e] += a[e] * b[e] * rs;
    }
#pragma unroll
    for (int e = 0; e < V; e++) part[(int64_t)blockIdx.y * n + jv * V + e] = acc[e];
}

// dw[j] += sum over c (in order) of part[c, j]. A block of 8 x 32 threads owns
// 8 columns (a 32-byte sector of each partial row): thread (cx, cy) sums
// chunks cy, cy + 32, ... in order, then thread (cx, 0) adds the 32 sums in
// order. Fixed order: deterministic. (32 columns a block left 32 blocks for a
// row of 1024 and each thread 32 dependent chunks: ~9 us a call, latency.)
template <typename T>
__global__ void __launch_bounds__(256) k_dw_sum(T *dw, const float *part, int64_t nchunks, int64_t n) {
    __shared__ float sh[32][8];   // sh[cy][cx] is word tid: no bank conflict either way
    const int cx = threadIdx.x & 7, cy = threadIdx.x >> 3;
    const int64_t j = (int64_t)blockIdx.x * 8 + cx;
    float acc = 0.0f;
    if (j < n) {
        int64_t c = cy;
        for (; c + 96 < nchunks; c += 128) {   // four loads in flight
            float a = part[c * n + j], b = part[(c + 32) * n + j], d = part[(c + 64) * n + j],
                  e = part[(c + 96) * n + j];
            acc += a;
            acc += b;
            acc += d;
            acc += e;
        }
        for (; c < nchunks; c += 32) acc += part[c * n + j];
    }
    sh[cy][cx] = acc;
    __syncthreads();
    if (cy == 0 && j < n) {
        float s = 0.0f;
#pragma unroll
        for (int q = 0; q < 32; q++) s += sh[q][cx];
        dw[j] = from_f32<T>(to_f32(dw[j]) + s);
    }
}

static moe_status check_stat(const moe_tensor *x, const moe_tensor *rstd, const char *what) {
    if (rstd->dtype == x->dtype || rstd->dtype == MOE_F32) return MOE_OK;
    return moe_error(MOE_ERR_DTYPE, "%s on cuda: rstd must be f32 or %s, got %s", what, moe_dtype_name(x->dtype),
                     moe_dtype_name(rstd->dtype));
}

// Lanes per row and vectors per lane for the register path; false if it does not apply.
static bool reg_config(int64_t nvec, int max_nv, int *tpr, int *nv) {
    if (nvec <= 8) { *tpr = 8; *nv = 1; return true; }
    if (nvec <= 16) { *tpr = 16; *nv = 1; return true; }
    for (int k = 1; k <= max_nv; k *= 2)
        if (nvec <= 32 * k) { *tpr = 32; *nv = k; return true; }
    return false;
}

template <typename T, typename S, int TPR, int NV>
static void fwd_reg_launch(cuda_dev *d, T *y, S *rstd, const T *x, const T *w, int64_t rows, int64_t n, float eps) {
    const int gpb = NORM_THREADS / TPR;
    int64_t blocks = (rows + gpb - 1) / gpb, cap = (int64_t)d->sm_count * 32;
    if (blocks > cap) blocks = cap;
    k_rms_fwd_reg<T, S, TPR, NV><<<(unsigned)blocks, NORM_THREADS, 0, d->stream>>>(y, rstd, x, w, rows, (int)n, eps);
}

template <typename T, typename S>
static void rmsnorm_launch(cuda_dev *d, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                           int64_t rows, int64_t n, float eps) {
    constexpr int N = VEC<T>::N;
    T *yp = PTR(T, y);
    S *rp = PTR(S, rstd);
    const T *xp = PTR(const T, x), *wp = PTR(const T, w);
    const bool vec = n % N == 0 && cuda_aligned16(yp) && cuda_aligned16(xp) && cuda_aligned16(wp);
    int tpr = 0, nv = 0;
    if (vec && reg_config(n / N, 8, &tpr, &nv)) {
        if (tpr == 8) fwd_reg_launch<T, S, 8, 1>(d, yp, rp, xp, wp, rows, n, eps);
        else if (tpr == 16) fwd_reg_launch<T, S, 16, 1>(d, yp, rp, xp, wp, rows, n, eps);
        else if (nv == 1) fwd_reg_launch<T, S, 32, 1>(d, yp, rp, xp, wp, rows, n, eps);
        else if (nv == 2) fwd_reg_launch<T, S, 32, 2>(d, yp, rp, xp, wp, rows, n, eps);
        else if (nv == 4) fwd_reg_launch<T, S, 32, 4>(d, yp, rp, xp, wp, rows, n, eps);
        else fwd_reg_launch<T, S, 32, 8>(d, yp, rp, xp, wp, rows, n, eps);
        return;
    }
    int th = cuda_row_threads(vec ? n / N : n);
    if (vec) k_rmsnorm<T, S, N><<<cuda_row_grid(rows), th, 0, d->stream>>>(yp, rp, xp, wp, rows, n, eps);
    else k_rmsnorm<T, S, 1><<<cuda_row_grid(rows), th, 0, d->stream>>>(yp, rp, xp, wp, rows, n, eps);
}

// dw partials + their sum into dw (nchunks rows of n floats in part).
template <typename T>
static moe_status dw_sum_launch(cuda_dev *d, moe_tensor *dw, const float *part, int64_t nchunks, int64_t n) {
    k_dw_sum<T><<<(unsigned)((n + 7) / 8), 256, 0, d->stream>>>(PTR(T, dw), part, nchunks, n);
    CU_LAUNCHED("rmsnorm_backward (dw)");
    return MOE_OK;
}

template <typename T, typename S, int TPR, int NV>
static moe_status bwd_reg_launch(cuda_dev *d, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, int64_t rows,
                                 int64_t n, float beta) {
    const int gpb = NORM_THREADS / TPR;
    int64_t groups = (rows + gpb - 1) / gpb;   // blocks if every block took gpb rows
    if (!dw) {
        int64_t cap = (int64_t)d->sm_count * 32, blocks = groups < cap ? groups : cap;
        int64_t rpb = (rows + blocks - 1) / blocks;
        k_rms_bwd_reg<T, S, TPR, NV, false><<<(unsigned)blocks, NORM_THREADS, 0, d->stream>>>(
            PTR(T, dx), nullptr, PTR(const T, dy), PTR(const T, x), PTR(const T, w), PTR(const S, rstd), rows,
            (int)n, rpb, beta);
        CU_LAUNCHED("rmsnorm_backward (dx)");
        return MOE_OK;
    }
    // a fixed partition of the rows (it depends on the shape only): deterministic dw
    int64_t blocks = groups < DW_BLOCKS ? groups : DW_BLOCKS;
    int64_t rpb = (rows + blocks - 1) / blocks;
    blocks = (rows + rpb - 1) / rpb;
    cuda_scratch part(d, (size_t)(blocks * n) * sizeof(float));
    if (!part.p) return moe_last_status();
    size_t smem = (size_t)(NORM_THREADS / 32) * (size_t)n * sizeof(float);
    k_rms_bwd_reg<T, S, TPR, NV, true><<<(unsigned)blocks, NORM_THREADS, smem, d->stream>>>(
        PTR(T, dx), (float *)part.p, PTR(const T, dy), PTR(const T, x), PTR(const T, w), PTR(const S, rstd), rows,
        (int)n, rpb, beta);
    CU_LAUNCHED("rmsnorm_backward (dx, dw partials)");
    return dw_sum_launch<T>(d, dw, (const float *)part.p, blocks, n);
}

template <typename T, typename S>
static moe_status rmsnorm_bwd(cuda_dev *d, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy, const moe_tensor *x,
                              const moe_tensor *w, const moe_tensor *rstd, int64_t rows, int64_t n, float beta) {
    constexpr int N = VEC<T>::N;
    const bool vec = n % N == 0 && cuda_aligned16(moe_tensor_data(dx)) && cuda_aligned16(moe_tensor_data(dy)) &&
                     cuda_aligned16(moe_tensor_data(x)) && cuda_aligned16(moe_tensor_data(w));
    int tpr = 0, nv = 0;
    // at most 32 f32 accumulators per lane for dw: n <= 1024
    if (vec && reg_config(n / N, 32 / N, &tpr, &nv)) {
        if (tpr == 8) return bwd_reg_launch<T, S, 8, 1>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
        if (tpr == 16) return bwd_reg_launch<T, S, 16, 1>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
        if (nv == 1) return bwd_reg_launch<T, S, 32, 1>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
        if (nv == 2) return bwd_reg_launch<T, S, 32, 2>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
        if (nv == 4) return bwd_reg_launch<T, S, 32, 4>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
        if constexpr (N == 4) return bwd_reg_launch<T, S, 32, 8>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
    }
    const int64_t vw = vec ? N : 1, nvec = n / vw;
    int th = cuda_row_threads(nvec);
    if (vec)
        k_rmsnorm_dx<T, S, N><<<cuda_row_grid(rows), th, 0, d->stream>>>(
            PTR(T, dx), PTR(const T, dy), PTR(const T, x), PTR(const T, w), PTR(const S, rstd), rows, n, beta);
    else
        k_rmsnorm_dx<T, S, 1><<<cuda_row_grid(rows), th, 0, d->stream>>>(
            PTR(T, dx), PTR(const T, dy), PTR(const T, x), PTR(const T, w), PTR(const S, rstd), rows, n, beta);
    CU_LAUNCHED("rmsnorm_backward (dx)");
    if (!dw) return MOE_OK;
    int64_t nchunks = rows < 128 ? rows : 128, chunk = (rows + nchunks - 1) / nchunks;
    nchunks = (rows + chunk - 1) / chunk;
    cuda_scratch part(d, (size_t)(nchunks * n) * sizeof(float));
    if (!part.p) return moe_last_status();
    dim3 grid((unsigned)((nvec + 255) / 256), (unsigned)nchunks);
    if (vec)
        k_rmsnorm_dw_part<T, S, N><<<grid, 256, 0, d->stream>>>((float *)part.p, PTR(const T, dy), PTR(const T, x),
                                                                 PTR(const S, rstd), rows, n, chunk);
    else
        k_rmsnorm_dw_part<T, S, 1><<<grid, 256, 0, d->stream>>>((float *)part.p, PTR(const T, dy), PTR(const T, x),
                                                                 PTR(const S, rstd), rows, n, chunk);
    CU_LAUNCHED("rmsnorm_backward (dw partials)");
    return dw_sum_launch<T>(d, dw, (const float *)part.p, nchunks, n);
}

}  // namespace

moe_status cuda_rmsnorm_dw_sum(cuda_dev *d, moe_tensor *dw, const float *part, int64_t nchunks, int64_t n) {
    return dw->dtype == MOE_F32 ? dw_sum_launch<float>(d, dw, part, nchunks, n) : dw_sum_launch<bf16>(d, dw, part, nchunks, n);
}

moe_status cuda_rmsnorm(moe_ctx *ctx, moe_tensor *y, moe_tensor *rstd, const moe_tensor *x, const moe_tensor *w,
                        float eps) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm"));
    MOE_TRY(check_stat(x, rstd, "rmsnorm"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32) rmsnorm_launch<float, float>(d, y, rstd, x, w, rows, n, eps);
    else if (rstd->dtype == MOE_F32) rmsnorm_launch<bf16, float>(d, y, rstd, x, w, rows, n, eps);
    else rmsnorm_launch<bf16, bf16>(d, y, rstd, x, w, rows, n, eps);
    CU_LAUNCHED("rmsnorm");
    return MOE_OK;
}

moe_status cuda_rmsnorm_backward(moe_ctx *ctx, moe_tensor *dx, moe_tensor *dw, const moe_tensor *dy,
                                 const moe_tensor *x, const moe_tensor *w, const moe_tensor *rstd, float beta) {
    MOE_TRY(cuda_check_float(x->dtype, "rmsnorm_backward"));
    MOE_TRY(check_stat(x, rstd, "rmsnorm_backward"));
    int64_t n = cuda_last_dim(x), rows = cuda_rows(x);
    if (rows == 0 || n == 0) return MOE_OK;
    CUDA_ENTER(d, ctx, x->device);
    if (x->dtype == MOE_F32) return rmsnorm_bwd<float, float>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
    if (rstd->dtype == MOE_F32) return rmsnorm_bwd<bf16, float>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
    return rmsnorm_bwd<bf16, bf16>(d, dx, dw, dy, x, w, rstd, rows, n, beta);
}
