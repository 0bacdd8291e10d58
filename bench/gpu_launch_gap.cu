// What a kernel boundary costs on one stream: chains of dependent
// memory-bound kernels (each reads the previous one's output), launched
//   plain  - <<<>>> one after the other;
//   pdl    - with programmatic dependent launch (the next grid is scheduled
//            while the previous one drains; it waits in griddepcontrol.wait);
//   graph  - the plain chain captured once and replayed as a CUDA graph;
//   graph+pdl.
// The time per kernel of each mode, for several sizes, against the same bytes
// moved by one kernel looping over them (no boundaries). Standalone:
//   nvcc -O3 -gencode arch=compute_90,code=sm_90 -o build/gpu_launch_gap bench/gpu_launch_gap.cu
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <stdio.h>
#include <stdlib.h>

#include <algorithm>

#define CK(x)                                                                                     \
    do {                                                                                          \
        cudaError_t e_ = (x);                                                                     \
        if (e_ != cudaSuccess) {                                                                  \
            fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));   \
            exit(1);                                                                              \
        }                                                                                         \
    } while (0)

// y = 1.0001 x over n 16-byte vectors; reps > 1: the same pass reps times (the boundary-free reference)
__global__ void k_pass(const uint4 *x, uint4 *y, long n, int reps) {
    asm volatile("griddepcontrol.wait;" ::: "memory");   // a no-op unless launched as a dependent
    asm volatile("griddepcontrol.launch_dependents;");
    for (int r = 0; r < reps; r++) {
        for (long i = blockIdx.x * (long)blockDim.x + threadIdx.x; i < n; i += (long)gridDim.x * blockDim.x) {
            uint4 v = x[i];
            __nv_bfloat162 *h = reinterpret_cast<__nv_bfloat162 *>(&v);
            for (int k = 0; k < 4; k++) h[k] = __hmul2(h[k], __floats2bfloat162_rn(1.0001f, 1.0001f));
            y[i] = v;
        }
        const uint4 *t = x; x = y; y = const_cast<uint4 *>(t);
        if (reps > 1) __syncthreads();   // not a grid barrier: the reference only counts bytes
    }
}

static void launch(const uint4 *x, uint4 *y, long n, int grid, bool pdl, cudaStream_t s) {
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = dim3(grid);
    cfg.blockDim = dim3(256);
    cfg.stream = s;
    cudaLaunchAttribute at[1];
    at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    at[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.attrs = pdl ? at : nullptr;
    cfg.numAttrs = pdl ? 1 : 0;
    CK(cudaLaunchKernelEx(&cfg, k_pass, x, y, n, 1));
}

int main(int argc, char **argv) {
    const int chain = argc > 1 ? atoi(argv[1]) : 400;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    printf("# %s, %d SMs; a chain of %d dependent kernels per measurement, median of 5\n", prop.name,
           prop.multiProcessorCount, chain);
    cudaStream_t s;
    CK(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking));
    const long sizes[] = {1 << 20, 4 << 20, 16 << 20, 64 << 20};   // bytes per pass (read, and the same written)
    long maxn = (64 << 20) / 16;
    uint4 *a, *b;
    CK(cudaMalloc(&a, maxn * 16));
    CK(cudaMalloc(&b, maxn * 16));
    CK(cudaMemset(a, 0x3f, maxn * 16));
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    printf("%10s %10s %10s %10s %10s %10s   us per kernel\n", "bytes", "one-loop", "plain", "pdl", "graph", "graph+pdl");
    for (long bytes : sizes) {
        const long n = bytes / 16;
        const int grid = (int)std::min<long>((n + 255) / 256, prop.multiProcessorCount * 8L);
        double res[5];
        for (int mode = 0; mode < 5; mode++) {
            cudaGraphExec_t ge = nullptr;
            if (mode >= 3) {
                cudaGraph_t g;
                CK(cudaStreamBeginCapture(s, cudaStreamCaptureModeGlobal));
                for (int i = 0; i < chain; i++) launch(i & 1 ? b : a, i & 1 ? a : b, n, grid, mode == 4, s);
                CK(cudaStreamEndCapture(s, &g));
                CK(cudaGraphInstantiate(&ge, g, 0));
                CK(cudaGraphDestroy(g));
            }
            float t[5];
            for (int rep = 0; rep < 6; rep++) {
                CK(cudaStreamSynchronize(s));
                CK(cudaEventRecord(e0, s));
                if (mode == 0) k_pass<<<grid, 256, 0, s>>>(a, b, n, chain);
                else if (mode <= 2)
                    for (int i = 0; i < chain; i++) launch(i & 1 ? b : a, i & 1 ? a : b, n, grid, mode == 2, s);
                else CK(cudaGraphLaunch(ge, s));
                CK(cudaEventRecord(e1, s));
                CK(cudaEventSynchronize(e1));
                if (rep > 0) CK(cudaEventElapsedTime(&t[rep - 1], e0, e1));
            }
            std::sort(t, t + 5);
            res[mode] = t[2] * 1e3 / chain;
            if (ge) CK(cudaGraphExecDestroy(ge));
        }
        printf("%10ld %10.2f %10.2f %10.2f %10.2f %10.2f\n", bytes, res[0], res[1], res[2], res[3], res[4]);
    }
    CK(cudaGetLastError());
    return 0;
}
