#include "rng.h"

#include <math.h>

uint64_t moe_rng_key(uint64_t seed, moe_rng_purpose purpose) {
    /* splitmix64 finaliser over seed and purpose */
    uint64_t z = seed * 0x9E3779B97F4A7C15ull + (uint64_t)purpose * 0xD1B54A32D192ED03ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* 24 random bits mapped to the open interval (0, 1), so log() never sees 0. */
static inline float u32_to_unit(uint32_t x) { return ((float)(x >> 8) + 0.5f) * (1.0f / 16777216.0f); }

float moe_rng_uniform_at(uint64_t key, uint64_t index) {
    moe_philox_block b = moe_philox4x32(index >> 2, key);
    return u32_to_unit(b.v[index & 3]);
}

/* Box-Muller on lanes (0,1) and (2,3) of one block: element i takes lane i%4. */
float moe_rng_normal_at(uint64_t key, uint64_t index) {
    moe_philox_block b = moe_philox4x32(index >> 2, key);
    int lane = (int)(index & 3);
    int pair = lane & 2;
    float u1 = u32_to_unit(b.v[pair]), u2 = u32_to_unit(b.v[pair + 1]);
    float r = sqrtf(-2.0f * logf(u1));
    float th = 6.28318530717958647692f * u2;
    return (lane & 1) ? r * sinf(th) : r * cosf(th);
}

void moe_rng_uniform(float *out, int64_t n, uint64_t key, uint64_t offset) {
    for (int64_t i = 0; i < n; i++) out[i] = moe_rng_uniform_at(key, offset + (uint64_t)i);
}

void moe_rng_normal(float *out, int64_t n, uint64_t key, uint64_t offset) {
    for (int64_t i = 0; i < n; i++) out[i] = moe_rng_normal_at(key, offset + (uint64_t)i);
}
