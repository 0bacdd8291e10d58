// Shared-memory mbarriers of the kernels fed by the bulk copy engine (the TMA
// grouped GEMM, cuda_grouped_tma.cu; the streamed cross entropy, cuda_loss.cu):
// a copy's bytes are counted on a barrier (expect, then the copy's
// complete_tx), and its readers wait on the barrier's phase parity.
#ifndef MOE_CUDA_MBARRIER_CUH
#define MOE_CUDA_MBARRIER_CUH

#include <stdint.h>

__device__ __forceinline__ unsigned smem_u32(const void *p) { return (unsigned)__cvta_generic_to_shared(p); }

__device__ __forceinline__ void bar_init(uint64_t *b, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_u32(b)), "r"(count));
}
// one arrival that also expects `bytes` of copies to complete on b
__device__ __forceinline__ void bar_expect(uint64_t *b, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(smem_u32(b)), "r"(bytes) : "memory");
}
// one plain arrival (release: the caller's earlier accesses precede it for the waiter)
__device__ __forceinline__ void bar_arrive(uint64_t *b) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_u32(b)) : "memory");
}
__device__ __forceinline__ void bar_wait(uint64_t *b, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
                     : "=r"(done) : "r"(smem_u32(b)), "r"(parity) : "memory");
    } while (!done);
}

#endif
