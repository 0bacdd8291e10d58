#include "dtype.h"

#include <math.h>
#include <string.h>

static const struct { const char *name; const char *alias; size_t size; } info[MOE_NUM_DTYPES] = {
    [MOE_F32] = {"f32", "float32", 4},  [MOE_F64] = {"f64", "float64", 8},
    [MOE_BF16] = {"bf16", "bfloat16", 2}, [MOE_F16] = {"f16", "float16", 2},
    [MOE_I32] = {"i32", "int32", 4},    [MOE_I64] = {"i64", "int64", 8},
    [MOE_U8] = {"u8", "uint8", 1},      [MOE_I8] = {"i8", "int8", 1},
    [MOE_I16] = {"i16", "int16", 2},
};

size_t moe_dtype_size(moe_dtype dt) { return (unsigned)dt < MOE_NUM_DTYPES ? info[dt].size : 0; }
const char *moe_dtype_name(moe_dtype dt) { return (unsigned)dt < MOE_NUM_DTYPES ? info[dt].name : "?"; }
int moe_dtype_is_float(moe_dtype dt) { return dt == MOE_F32 || dt == MOE_F64 || dt == MOE_BF16 || dt == MOE_F16; }

int moe_dtype_parse(const char *name) {
    if (!name) return -1;
    for (int i = 0; i < MOE_NUM_DTYPES; i++)
        if (!strcmp(name, info[i].name) || !strcmp(name, info[i].alias)) return i;
    if (!strcmp(name, "float")) return MOE_F32;
    if (!strcmp(name, "double")) return MOE_F64;
    if (!strcmp(name, "half")) return MOE_F16;
    if (!strcmp(name, "long")) return MOE_I64;
    if (!strcmp(name, "int")) return MOE_I32;
    return -1;
}

float moe_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
    int exp = (h >> 10) & 0x1f;
    uint32_t mant = h & 0x3ffu;
    union { uint32_t u; float f; } v;
    if (exp == 0) {
        /* zero or subnormal: value = mant * 2^-24 */
        float f = ldexpf((float)mant, -24);
        return sign ? -f : f;
    } else if (exp == 31) {
        v.u = sign | 0x7f800000u | (mant << 13);
    } else {
        v.u = sign | ((uint32_t)(exp - 15 + 127) << 23) | (mant << 13);
    }
    return v.f;
}

uint16_t moe_f32_to_f16(float f) {
    union { uint32_t u; float f; } v = { .f = f };
    uint16_t sign = (uint16_t)((v.u >> 16) & 0x8000u);
    uint32_t a = v.u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;          /* NaN */
    if (a >= 0x477ff000u) return sign | 0x7c00u;         /* overflow to inf (incl. rounding) */
    if (a < 0x38800000u) {                               /* subnormal or zero in f16 */
        float m = fabsf(f) * 16777216.0f;                /* scale by 2^24 */
        return sign | (uint16_t)nearbyintf(m);
    }
    uint32_t exp = (a >> 23) - 127 + 15;
    uint32_t mant = a & 0x7fffffu;
    uint32_t h = (exp << 10) | (mant >> 13);
    uint32_t rem = mant & 0x1fffu;
    if (rem > 0x1000u || (rem == 0x1000u && (h & 1u))) h++;
    return sign | (uint16_t)h;
}

double moe_dtype_load(moe_dtype dt, const void *p) {
    switch (dt) {
    case MOE_F32: return *(const float *)p;
    case MOE_F64: return *(const double *)p;
    case MOE_BF16: return moe_bf16_to_f32(*(const uint16_t *)p);
    case MOE_F16: return moe_f16_to_f32(*(const uint16_t *)p);
    case MOE_I32: return *(const int32_t *)p;
    case MOE_I64: return (double)*(const int64_t *)p;
    case MOE_U8: return *(const uint8_t *)p;
    case MOE_I8: return *(const int8_t *)p;
    case MOE_I16: return *(const int16_t *)p;
    default: return NAN;
    }
}

/* Integer stores saturate instead of invoking undefined float->int overflow. */
static double clampd(double v, double lo, double hi) {
    if (v != v) return 0;
    return v < lo ? lo : v > hi ? hi : v;
}

void moe_dtype_store(moe_dtype dt, void *p, double v) {
    switch (dt) {
    case MOE_F32: *(float *)p = (float)v; break;
    case MOE_F64: *(double *)p = v; break;
    case MOE_BF16: *(uint16_t *)p = moe_f32_to_bf16((float)v); break;
    case MOE_F16: *(uint16_t *)p = moe_f32_to_f16((float)v); break;
    case MOE_I32: *(int32_t *)p = (int32_t)clampd(v, -2147483648.0, 2147483647.0); break;
    case MOE_I64: *(int64_t *)p = (int64_t)clampd(v, -9223372036854775808.0, 9223372036854774784.0); break;
    case MOE_U8: *(uint8_t *)p = (uint8_t)clampd(v, 0, 255); break;
    case MOE_I8: *(int8_t *)p = (int8_t)clampd(v, -128, 127); break;
    case MOE_I16: *(int16_t *)p = (int16_t)clampd(v, -32768, 32767); break;
    default: break;
    }
}
