/* Counter-based random numbers (Philox4x32-10). Element i of a stream with
 * (seed, offset) is a pure function of (seed, offset + i), so the CPU and CUDA
 * produce identical tensors and any slice of a stream can be regenerated. */
#ifndef MOE_RNG_H
#define MOE_RNG_H

#include <stdint.h>

typedef struct { uint32_t v[4]; } moe_philox_block;

/* Purposes separate streams that share a user seed. */
typedef enum { MOE_RNG_INIT = 1, MOE_RNG_DATA = 2, MOE_RNG_JITTER = 3, MOE_RNG_DROPOUT = 4, MOE_RNG_USER = 5 } moe_rng_purpose;

static inline moe_philox_block moe_philox4x32(uint64_t counter, uint64_t key) {
    uint32_t c0 = (uint32_t)counter, c1 = (uint32_t)(counter >> 32), c2 = 0, c3 = 0;
    uint32_t k0 = (uint32_t)key, k1 = (uint32_t)(key >> 32);
    for (int r = 0; r < 10; r++) {
        uint64_t p0 = (uint64_t)0xD2511F53u * c0, p1 = (uint64_t)0xCD9E8D57u * c2;
        uint32_t n0 = (uint32_t)(p1 >> 32) ^ c1 ^ k0;
        uint32_t n2 = (uint32_t)(p0 >> 32) ^ c3 ^ k1;
        c1 = (uint32_t)p1; c3 = (uint32_t)p0;
        c0 = n0; c2 = n2;
        k0 += 0x9E3779B9u; k1 += 0xBB67AE85u;
    }
    return (moe_philox_block){{c0, c1, c2, c3}};
}

/* A key for (seed, purpose): mixes so nearby seeds give unrelated streams. */
uint64_t moe_rng_key(uint64_t seed, moe_rng_purpose purpose);

/* Uniform in (0, 1) and standard normal, element i from counter offset + i. */
void moe_rng_uniform(float *out, int64_t n, uint64_t key, uint64_t offset);
void moe_rng_normal(float *out, int64_t n, uint64_t key, uint64_t offset);
float moe_rng_uniform_at(uint64_t key, uint64_t index);
float moe_rng_normal_at(uint64_t key, uint64_t index);

#endif
