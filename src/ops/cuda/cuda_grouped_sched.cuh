// The schedule of a grouped GEMM whose row offsets are on the device, built on
// the device: nothing is copied back to the host, and the launch (grid and
// parameters) does not depend on the offsets' values, so a CUDA graph can
// replay it under new routing. Shared by the TMA kernel (pairs of M tiles,
// built in each persistent block) and the own mma kernel's plan kernel
// (single M tiles).
#ifndef MOE_CUDA_GROUPED_SCHED_CUH
#define MOE_CUDA_GROUPED_SCHED_CUH

#include <stdint.h>

// Warp 0, every lane: off[0..G] = the offsets clamped into [0, M] and made
// nondecreasing (offsets that break the contract give wrong rows, never
// accesses outside the tensors), and first[g] = the sum of units(h) over
// h < g for g = 0..G, by scans across the lanes. units(g) may read off[g]
// and off[g + 1]. Returns the sum over all G groups on every lane.
template <typename U>
__device__ __forceinline__ int sched_offsets(const int64_t *off_dev, int G, int M, int *off, int *first, U units,
                                             int lane) {
    const unsigned FULL = 0xffffffffu;
    const int per = (G + 1 + 31) / 32, g0 = lane * per;   // each lane its run of entries
    int run = 0;
    for (int i = 0; i < per && g0 + i <= G; i++) {
        const int64_t v = off_dev[g0 + i];
        run = max(run, v < 0 ? 0 : v > M ? M : (int)v);
        off[g0 + i] = run;
    }
    int hi = run;   // the largest offset up to this lane's last, over the lanes before too
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL, hi, o);
        if (lane >= o) hi = max(hi, y);
    }
    int before = __shfl_up_sync(FULL, hi, 1);
    if (lane == 0) before = 0;
    for (int i = 0; i < per && g0 + i <= G; i++) off[g0 + i] = max(off[g0 + i], before);
    __syncwarp();
    int sum = 0;
    for (int i = 0; i < per && g0 + i < G; i++) sum += units(g0 + i);
    int incl = sum;
    for (int o = 1; o < 32; o <<= 1) {
        const int y = __shfl_up_sync(FULL, incl, o);
        if (lane >= o) incl += y;
    }
    int acc = incl - sum;
    for (int i = 0; i < per && g0 + i <= G; i++) {
        first[g0 + i] = acc;
        if (g0 + i < G) acc += units(g0 + i);
    }
    return __shfl_sync(FULL, incl, 31);
}

// Every thread of the block, after off is complete: order[r] = the group of
// rank r by decreasing rows, ties by index (as a stable sort on the host), by
// counting. The caller synchronises before reading order.
template <typename T>
__device__ __forceinline__ void sched_order(const int *off, int G, T *order, int tid, int nthreads) {
    for (int g = tid; g < G; g += nthreads) {
        const int rg = off[g + 1] - off[g];
        int r = 0;
        for (int j = 0; j < G; j++) {
            const int rj = off[j + 1] - off[j];
            r += rj > rg || (rj == rg && j < g);
        }
        order[r] = (T)g;
    }
}

#endif
