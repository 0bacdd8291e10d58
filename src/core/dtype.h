/* Element types and the conversions between them. Half types are stored as
 * raw 16-bit patterns; arithmetic always happens in f32 on the CPU. */
#ifndef MOE_DTYPE_H
#define MOE_DTYPE_H

#include <stddef.h>
#include <stdint.h>

typedef enum {
    MOE_F32 = 0, MOE_F64, MOE_BF16, MOE_F16, MOE_I32, MOE_I64, MOE_U8, MOE_I8,
    MOE_I16,   /* (last: the codes above are kept) */
    MOE_NUM_DTYPES
} moe_dtype;

size_t moe_dtype_size(moe_dtype dt);
const char *moe_dtype_name(moe_dtype dt);
/* Parse "f32", "float32", "bf16", ... Returns -1 for an unknown name. */
int moe_dtype_parse(const char *name);
int moe_dtype_is_float(moe_dtype dt);

static inline float moe_bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v = { .u = (uint32_t)h << 16 };
    return v.f;
}

/* Round to nearest even, keeping NaN a NaN. */
static inline uint16_t moe_f32_to_bf16(float f) {
    union { uint32_t u; float f; } v = { .f = f };
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    uint32_t rounding = 0x7fffu + ((v.u >> 16) & 1u);
    return (uint16_t)((v.u + rounding) >> 16);
}

float moe_f16_to_f32(uint16_t h);
uint16_t moe_f32_to_f16(float f);

/* Read or write one element of any dtype as a double. */
double moe_dtype_load(moe_dtype dt, const void *p);
void moe_dtype_store(moe_dtype dt, void *p, double v);

#endif
