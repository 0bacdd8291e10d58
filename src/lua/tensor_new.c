/* Tensor constructors: tensor, zeros, ones, full, empty, randn, rand, arange,
 * plus is_tensor and manual_seed. Random tensors use the counter-based RNG
 * (key = moe_rng_key(seed, MOE_RNG_USER), offset 0), so a seed gives the same
 * values on every device; without a seed, the seed comes from a per-Lua-state
 * sequence kept in the registry (moe.manual_seed restarts it). */
#include "lmoe.h"
#include "tensor_internal.h"
#include "../core/rng.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

typedef moe_lua_tbox tbox;
#define new_box moe_lua_tensor_box
#define type_at moe_lua_type_at
#define push_new moe_lua_push_new

#define SEED_BASE_KEY "moelab.seed_base"
#define SEED_COUNT_KEY "moelab.seed_count"

uint64_t moe_lua_next_seed(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, SEED_BASE_KEY);
    lua_getfield(L, LUA_REGISTRYINDEX, SEED_COUNT_KEY);
    uint64_t base = lua_isnumber(L, -2) ? (uint64_t)(int64_t)lua_tonumber(L, -2) : 0x6d6f656c6162ull;
    double count = lua_isnumber(L, -1) ? lua_tonumber(L, -1) : 0;
    lua_pop(L, 2);
    lua_pushnumber(L, count + 1);
    lua_setfield(L, LUA_REGISTRYINDEX, SEED_COUNT_KEY);
    /* splitmix-style mixing so consecutive draws give unrelated seeds */
    uint64_t z = base + ((uint64_t)count + 1) * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Reads the shape at idx (a table or integers) and returns the index of the
 * argument after it (where options go). Requires a shape to be present. */
static int shape_and_next(lua_State *L, int idx, const char *fname, int64_t *shape, int *ndim) {
    if (lua_isnoneornil(L, idx)) moe_lua_errorf(L, "%s: shape is required (a table of sizes or sizes as arguments)", fname);
    *ndim = moe_lua_check_shape(L, idx, fname, shape);
    if (lua_type(L, idx) == LUA_TTABLE) return idx + 1;
    return idx + *ndim;
}

static void opts_dtype_device(lua_State *L, int oidx, const char *fname, moe_dtype *dt, moe_device *dev) {
    const char *d = moe_lua_opt_field_str(L, oidx, "dtype", NULL, fname);
    *dt = d ? moe_lua_check_dtype(L, d, fname) : MOE_F32;
    const char *v = moe_lua_opt_field_str(L, oidx, "device", NULL, fname);
    *dev = v ? moe_lua_check_device(L, v, fname) : MOE_DEVICE_CPU;
}

/* -------------------------------------------------------- constructors -- */

static int l_is_tensor(lua_State *L) {
    lua_pushboolean(L, moe_lua_is_tensor(L, 1));
    return 1;
}

/* Fills a cpu tensor from nested tables; path names the position for errors. */
static void fill_nested(lua_State *L, int tidx, moe_tensor *h, int d, char *path, size_t plen, int64_t *pos) {
    size_t es = moe_dtype_size(h->dtype);
    char *base = moe_tensor_data(h);
    int n = (int)lua_objlen(L, tidx);
    if (n != h->shape[d])
        moe_lua_errorf(L, "tensor: ragged nesting at data%s: expected %lld items, got %d", path, (long long)h->shape[d], n);
    lua_checkstack(L, 4);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, tidx, i);
        int top = lua_gettop(L);
        int len = snprintf(path + plen, 256 - plen, "[%d]", i);
        size_t nplen = plen + (len > 0 ? (size_t)len : 0);
        if (nplen >= 256) nplen = 255;
        if (d + 1 == h->ndim) {
            if (lua_type(L, top) != LUA_TNUMBER)
                moe_lua_errorf(L, "tensor: data%s must be a number, got %s", path, type_at(L, top));
            moe_dtype_store(h->dtype, base + (*pos)++ * (int64_t)es, lua_tonumber(L, top));
        } else {
            if (lua_type(L, top) != LUA_TTABLE)
                moe_lua_errorf(L, "tensor: ragged nesting at data%s: expected a table of %lld items, got %s", path,
                           (long long)h->shape[d + 1], type_at(L, top));
            fill_nested(L, top, h, d + 1, path, nplen, pos);
        }
        path[plen] = 0;
        lua_pop(L, 1);
    }
}

static int l_tensor(lua_State *L) {
    const char *fn = "tensor";
    moe_dtype dt;
    moe_device dev;
    opts_dtype_device(L, 2, fn, &dt, &dev);
    int64_t shape[MOE_MAX_DIMS];
    int nd = 0;
    if (lua_type(L, 1) == LUA_TNUMBER) {
        /* a 0-dim tensor */
    } else if (lua_type(L, 1) == LUA_TTABLE) {
        lua_pushvalue(L, 1);
        for (;;) {
            if (lua_type(L, -1) != LUA_TTABLE) break;
            if (nd >= MOE_MAX_DIMS) return moe_lua_errorf(L, "tensor: data nests deeper than %d dims", MOE_MAX_DIMS);
            int n = (int)lua_objlen(L, -1);
            shape[nd++] = n;
            if (n == 0) break;
            lua_rawgeti(L, -1, 1);
            lua_remove(L, -2);
        }
        lua_pop(L, 1);
    } else {
        return moe_lua_errorf(L, "tensor: data must be a number or a (nested) table of numbers, got %s", type_at(L, 1));
    }
    lua_settop(L, 2);
    tbox *hb = new_box(L);     /* keeps the host tensor alive through errors */
    hb->t = moe_tensor_new_cpu(dt, nd, shape);
    if (!hb->t) moe_lua_fail(L, fn);
    if (nd == 0) {
        moe_dtype_store(dt, moe_tensor_data(hb->t), lua_tonumber(L, 1));
    } else {
        char path[256] = "";
        int64_t pos = 0;
        fill_nested(L, 1, hb->t, 0, path, 0, &pos);
    }
    if (dev.type != MOE_CPU) push_new(L, moe_op_to(moe_lua_ctx(L), hb->t, dev, dt), fn);
    return 1;
}

static int new_filled(lua_State *L, const char *fn, int mode /* 0 empty, 1 zeros, 2 ones, 3 full */) {
    int64_t shape[MOE_MAX_DIMS];
    int nd;
    double v = mode == 2 ? 1.0 : 0.0;
    int oidx;
    if (mode == 3) {
        if (lua_type(L, 1) != LUA_TTABLE)
            return moe_lua_errorf(L, "%s: shape must be a table of sizes, got %s", fn, type_at(L, 1));
        oidx = shape_and_next(L, 1, fn, shape, &nd);
        v = moe_lua_check_num(L, oidx, fn, "value");
        oidx++;
    } else {
        oidx = shape_and_next(L, 1, fn, shape, &nd);
    }
    moe_dtype dt;
    moe_device dev;
    opts_dtype_device(L, oidx, fn, &dt, &dev);
    if (!lua_isnoneornil(L, oidx + 1))
        return moe_lua_errorf(L, "%s: unexpected argument %d (%s) after the options", fn, oidx + 1, type_at(L, oidx + 1));
    moe_tensor *t = moe_lua_new_tensor(L, dt, nd, shape, dev, fn);
    if (mode != 0) moe_lua_check(L, moe_op_fill(moe_lua_ctx(L), t, v), fn);
    return 1;
}

static int l_empty(lua_State *L) { return new_filled(L, "empty", 0); }
static int l_zeros(lua_State *L) { return new_filled(L, "zeros", 1); }
static int l_ones(lua_State *L) { return new_filled(L, "ones", 2); }
static int l_full(lua_State *L) { return new_filled(L, "full", 3); }

static int new_random(lua_State *L, const char *fn, int normal) {
    int64_t shape[MOE_MAX_DIMS];
    int nd;
    int oidx = shape_and_next(L, 1, fn, shape, &nd);
    moe_dtype dt;
    moe_device dev;
    opts_dtype_device(L, oidx, fn, &dt, &dev);
    if (!moe_dtype_is_float(dt))
        return moe_lua_errorf(L, "%s: dtype must be a float type (f32, f64, bf16, f16), got %s", fn, moe_dtype_name(dt));
    uint64_t seed;
    lua_Number a, b;
    if (normal) {
        a = moe_lua_opt_field_num(L, oidx, "mean", 0.0, fn);
        b = moe_lua_opt_field_num(L, oidx, "std", 1.0, fn);
        if (!(b >= 0)) return moe_lua_errorf(L, "%s: option 'std' must be >= 0, got %g", fn, (double)b);
    } else {
        a = moe_lua_opt_field_num(L, oidx, "low", 0.0, fn);
        b = moe_lua_opt_field_num(L, oidx, "high", 1.0, fn);
        if (!(b >= a)) return moe_lua_errorf(L, "%s: option 'high' (%g) must be >= 'low' (%g)", fn, (double)b, (double)a);
    }
    int has_seed = 0;
    if (lua_istable(L, oidx)) {
        lua_getfield(L, oidx, "seed");
        has_seed = !lua_isnil(L, -1);
        lua_pop(L, 1);
    }
    seed = has_seed ? (uint64_t)(int64_t)moe_lua_opt_field_int(L, oidx, "seed", 0, fn) : moe_lua_next_seed(L);
    if (!lua_isnoneornil(L, oidx + 1))
        return moe_lua_errorf(L, "%s: unexpected argument %d (%s) after the options", fn, oidx + 1, type_at(L, oidx + 1));
    moe_tensor *t = moe_lua_new_tensor(L, dt, nd, shape, dev, fn);
    uint64_t key = moe_rng_key(seed, MOE_RNG_USER);
    moe_status s = normal ? moe_op_fill_randn(moe_lua_ctx(L), t, key, 0, (float)a, (float)b)
                          : moe_op_fill_rand(moe_lua_ctx(L), t, key, 0, (float)a, (float)b);
    moe_lua_check(L, s, fn);
    return 1;
}

static int l_randn(lua_State *L) { return new_random(L, "randn", 1); }
static int l_rand(lua_State *L) { return new_random(L, "rand", 0); }

static int l_manual_seed(lua_State *L) {
    lua_Integer s = moe_lua_check_int(L, 1, "manual_seed", "seed");
    lua_pushnumber(L, (lua_Number)s);
    lua_setfield(L, LUA_REGISTRYINDEX, SEED_BASE_KEY);
    lua_pushnumber(L, 0);
    lua_setfield(L, LUA_REGISTRYINDEX, SEED_COUNT_KEY);
    return 0;
}

static int l_arange(lua_State *L) {
    const char *fn = "arange";
    int nnum = 0;
    while (nnum < 3 && lua_type(L, nnum + 1) == LUA_TNUMBER) nnum++;
    if (nnum == 0)
        return moe_lua_errorf(L, "arange: expected arange(stop) or arange(start, stop[, step]), got %s", type_at(L, 1));
    double start = 0, stop, step = 1;
    if (nnum == 1) stop = lua_tonumber(L, 1);
    else {
        start = lua_tonumber(L, 1);
        stop = lua_tonumber(L, 2);
        if (nnum == 3) step = lua_tonumber(L, 3);
    }
    int oidx = nnum + 1;
    if (step == 0 || step != step) return moe_lua_errorf(L, "arange: step must be non-zero");
    if (!isfinite(start) || !isfinite(stop)) return moe_lua_errorf(L, "arange: start and stop must be finite");
    double cnt = ceil((stop - start) / step);
    if (cnt < 0) cnt = 0;
    if (cnt > (double)((int64_t)1 << 40)) return moe_lua_errorf(L, "arange: too many elements (%g)", cnt);
    moe_dtype dt;
    moe_device dev;
    opts_dtype_device(L, oidx, fn, &dt, &dev);
    int64_t n = (int64_t)cnt;
    lua_settop(L, oidx);
    tbox *hb = new_box(L);
    hb->t = moe_tensor_new_cpu(dt, 1, &n);
    if (!hb->t) moe_lua_fail(L, fn);
    char *p = moe_tensor_data(hb->t);
    size_t es = moe_dtype_size(dt);
    for (int64_t i = 0; i < n; i++) moe_dtype_store(dt, p + i * (int64_t)es, start + (double)i * step);
    if (dev.type != MOE_CPU) push_new(L, moe_op_to(moe_lua_ctx(L), hb->t, dev, dt), fn);
    return 1;
}

static const luaL_Reg functions[] = {
    {"tensor", l_tensor}, {"zeros", l_zeros}, {"ones", l_ones}, {"full", l_full}, {"empty", l_empty},
    {"randn", l_randn}, {"rand", l_rand}, {"arange", l_arange}, {"is_tensor", l_is_tensor},
    {"manual_seed", l_manual_seed},
    {NULL, NULL}
};

void moe_lua_tensor_open_constructors(lua_State *L, int mod) {
    for (const luaL_Reg *r = functions; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, mod, r->name);
    }
}
