/* moelab.core: the C module behind `require "moelab"`. It owns the context
 * for its Lua state (no process-wide state), installs the backends and
 * registers the tensor, ops and nn bindings. */
#include "lmoe.h"
#include "../ops/backend.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <time.h>

#define CTX_KEY "moelab.ctx"

typedef struct { moe_ctx *ctx; } ctx_box;

static int ctx_gc(lua_State *L) {
    ctx_box *b = luaL_checkudata(L, 1, CTX_KEY);
    if (b->ctx) moe_cuda_backend_uninstall(b->ctx);
    moe_ctx_free(b->ctx);
    b->ctx = NULL;
    return 0;
}

moe_ctx *moe_lua_ctx(lua_State *L) {
    lua_getfield(L, LUA_REGISTRYINDEX, CTX_KEY ".instance");
    ctx_box *b = lua_touserdata(L, -1);
    lua_pop(L, 1);
    if (!b || !b->ctx) luaL_error(L, "moelab.core is not initialised in this Lua state");
    return b->ctx;
}

/* Device allocators call this before retrying a failed allocation. */
static void reclaim_by_gc(void *arg) {
    lua_State *L = arg;
    lua_gc(L, LUA_GCCOLLECT, 0);
}

int moe_lua_fail(lua_State *L, const char *fname) {
    return luaL_error(L, "%s: %s", fname, moe_last_error());
}

/* luaL_error with printf formatting (lua_pushfstring knows no %lld, %zu, %x). */
int moe_lua_errorf(lua_State *L, const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    luaL_where(L, 1);
    lua_pushstring(L, buf);
    lua_concat(L, 2);
    return lua_error(L);
}

void moe_lua_check(lua_State *L, moe_status s, const char *fname) {
    if (s != MOE_OK) moe_lua_fail(L, fname);
}

/* True for integral values that fit an int64 (the cast below is then defined). */
static int is_int64(lua_Number n) {
    return n >= -9.2e18 && n <= 9.2e18 && n == (lua_Number)(int64_t)n;
}

static const char *typename_at(lua_State *L, int idx) {
    if (moe_lua_is_tensor(L, idx)) return "tensor";
    return luaL_typename(L, idx);
}

lua_Integer moe_lua_check_int(lua_State *L, int idx, const char *fname, const char *argname) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "%s: %s must be an integer, got %s", fname, argname, typename_at(L, idx));
    lua_Number n = lua_tonumber(L, idx);
    if (!is_int64(n))
        luaL_error(L, "%s: %s must be an integer, got %g", fname, argname, (double)n);
    return (lua_Integer)n;
}

lua_Number moe_lua_check_num(lua_State *L, int idx, const char *fname, const char *argname) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        luaL_error(L, "%s: %s must be a number, got %s", fname, argname, typename_at(L, idx));
    return lua_tonumber(L, idx);
}

int moe_lua_check_shape(lua_State *L, int idx, const char *fname, int64_t *shape) {
    int ndim = 0;
    if (lua_istable(L, idx) && !moe_lua_is_tensor(L, idx)) {
        int n = (int)lua_objlen(L, idx);
        if (n > MOE_MAX_DIMS) luaL_error(L, "%s: shape has %d dims, at most %d allowed", fname, n, MOE_MAX_DIMS);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            if (lua_type(L, -1) != LUA_TNUMBER)
                luaL_error(L, "%s: shape[%d] must be an integer, got %s", fname, i, luaL_typename(L, -1));
            lua_Number v = lua_tonumber(L, -1);
            lua_pop(L, 1);
            if (!is_int64(v) || v < 0)
                luaL_error(L, "%s: shape[%d] must be a non-negative integer, got %g", fname, i, (double)v);
            shape[ndim++] = (int64_t)v;
        }
        return ndim;
    }
    int top = lua_gettop(L);
    for (int i = idx; i <= top && lua_type(L, i) == LUA_TNUMBER; i++) {
        if (ndim >= MOE_MAX_DIMS) luaL_error(L, "%s: at most %d dims allowed", fname, MOE_MAX_DIMS);
        lua_Number v = lua_tonumber(L, i);
        if (!is_int64(v) || v < 0)
            luaL_error(L, "%s: size of dim %d must be a non-negative integer, got %g", fname, ndim + 1, (double)v);
        shape[ndim++] = (int64_t)v;
    }
    if (ndim == 0 && !lua_isnoneornil(L, idx) && lua_type(L, idx) != LUA_TTABLE)
        luaL_error(L, "%s: shape must be a table of sizes or sizes as arguments, got %s", fname, typename_at(L, idx));
    return ndim;
}

static int push_field(lua_State *L, int idx, const char *key, const char *fname) {
    if (lua_isnoneornil(L, idx)) return 0;
    if (!lua_istable(L, idx)) luaL_error(L, "%s: options must be a table, got %s", fname, typename_at(L, idx));
    lua_getfield(L, idx, key);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    return 1;
}

lua_Integer moe_lua_opt_field_int(lua_State *L, int idx, const char *key, lua_Integer def, const char *fname) {
    if (!push_field(L, idx, key, fname)) return def;
    char arg[96];
    snprintf(arg, sizeof arg, "option '%s'", key);
    lua_Integer v = moe_lua_check_int(L, -1, fname, arg);
    lua_pop(L, 1);
    return v;
}

lua_Number moe_lua_opt_field_num(lua_State *L, int idx, const char *key, lua_Number def, const char *fname) {
    if (!push_field(L, idx, key, fname)) return def;
    char arg[96];
    snprintf(arg, sizeof arg, "option '%s'", key);
    lua_Number v = moe_lua_check_num(L, -1, fname, arg);
    lua_pop(L, 1);
    return v;
}

/* The returned string stays valid because the options table keeps it alive. */
const char *moe_lua_opt_field_str(lua_State *L, int idx, const char *key, const char *def, const char *fname) {
    if (!push_field(L, idx, key, fname)) return def;
    if (lua_type(L, -1) != LUA_TSTRING)
        luaL_error(L, "%s: option '%s' must be a string, got %s", fname, key, typename_at(L, -1));
    const char *s = lua_tostring(L, -1);
    lua_pop(L, 1);
    return s;
}

int moe_lua_opt_field_bool(lua_State *L, int idx, const char *key, int def, const char *fname) {
    if (!push_field(L, idx, key, fname)) return def;
    if (lua_type(L, -1) != LUA_TBOOLEAN)
        luaL_error(L, "%s: option '%s' must be a boolean, got %s", fname, key, typename_at(L, -1));
    int v = lua_toboolean(L, -1);
    lua_pop(L, 1);
    return v;
}

moe_dtype moe_lua_check_dtype(lua_State *L, const char *name, const char *fname) {
    int dt = moe_dtype_parse(name);
    if (dt < 0)
        luaL_error(L, "%s: unknown dtype '%s' (expected f32, f64, bf16, f16, i32, i64, u8 or i8)", fname,
                   name ? name : "nil");
    return (moe_dtype)dt;
}

moe_device moe_lua_check_device(lua_State *L, const char *name, const char *fname) {
    moe_device d;
    if (moe_device_parse(name, &d) != 0)
        luaL_error(L, "%s: unknown device '%s' (expected cpu, cuda or cuda:N)", fname, name ? name : "nil");
    return d;
}

static int l_cuda_available(lua_State *L) {
    lua_pushboolean(L, moe_cuda_device_count() > 0);
    return 1;
}

#ifdef MOELAB_CUDA
#include "../ops/cuda/moe_cuda.h"
/* core.cuda_memory_stats([device]) -> {in_use=, peak=, cached=, reserved=, peak_reserved=, device_free=,
 * device_total=, cuda_mallocs=, cache_hits=} (bytes) */
static int l_cuda_memory_stats(lua_State *L) {
    int dev = (int)luaL_optinteger(L, 1, 0);
    moe_cuda_mem_stats st;
    moe_lua_check(L, moe_cuda_memory_stats(moe_lua_ctx(L), dev, &st), "cuda_memory_stats");
    lua_createtable(L, 0, 9);
    lua_pushnumber(L, (double)st.bytes_in_use); lua_setfield(L, -2, "in_use");
    lua_pushnumber(L, (double)st.peak_bytes_in_use); lua_setfield(L, -2, "peak");
    lua_pushnumber(L, (double)st.bytes_cached); lua_setfield(L, -2, "cached");
    lua_pushnumber(L, (double)st.bytes_reserved); lua_setfield(L, -2, "reserved");
    lua_pushnumber(L, (double)st.peak_bytes_reserved); lua_setfield(L, -2, "peak_reserved");
    lua_pushnumber(L, (double)st.device_free); lua_setfield(L, -2, "device_free");
    lua_pushnumber(L, (double)st.device_total); lua_setfield(L, -2, "device_total");
    lua_pushnumber(L, (double)st.num_cuda_malloc); lua_setfield(L, -2, "cuda_mallocs");
    lua_pushnumber(L, (double)st.num_cache_hits); lua_setfield(L, -2, "cache_hits");
    return 1;
}
static int l_cuda_reset_peak_memory(lua_State *L) {
    moe_lua_check(L, moe_cuda_reset_peak_memory(moe_lua_ctx(L), (int)luaL_optinteger(L, 1, 0)), "cuda_reset_peak_memory");
    return 0;
}
/* core.cuda_empty_cache([device]): gives every wholly free cached segment back
 * to the driver (what other processes, or a later cudaMalloc, can then use) */
static int l_cuda_empty_cache(lua_State *L) {
    moe_lua_check(L, moe_cuda_empty_cache(moe_lua_ctx(L), (int)luaL_optinteger(L, 1, 0)), "cuda_empty_cache");
    return 0;
}
/* core.cuda_profiler(on): opens or closes the range an external profiler
 * records when told not to profile from the start (ncu --profile-from-start off) */
static int l_cuda_profiler(lua_State *L) {
    if (!lua_isboolean(L, 1))
        return luaL_error(L, "cuda_profiler: expected true (open the range) or false (close it), got %s",
                          luaL_typename(L, 1));
    moe_lua_check(L, moe_cuda_profiler_range(lua_toboolean(L, 1)), "cuda_profiler");
    return 0;
}
#else
static int l_cuda_profiler(lua_State *L) { return luaL_error(L, "cuda_profiler: this moelab was built without CUDA"); }
static int l_cuda_memory_stats(lua_State *L) { return luaL_error(L, "cuda_memory_stats: this moelab was built without CUDA"); }
static int l_cuda_reset_peak_memory(lua_State *L) { return luaL_error(L, "cuda_reset_peak_memory: this moelab was built without CUDA"); }
static int l_cuda_empty_cache(lua_State *L) { return luaL_error(L, "cuda_empty_cache: this moelab was built without CUDA"); }
#endif

static int l_cuda_device_count(lua_State *L) {
    lua_pushinteger(L, moe_cuda_device_count());
    return 1;
}

/* Wall-clock seconds from a monotonic clock, for progress lines and benchmarks. */
static int l_clock(lua_State *L) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    lua_pushnumber(L, (lua_Number)ts.tv_sec + 1e-9 * (lua_Number)ts.tv_nsec);
    return 1;
}

static int l_num_threads(lua_State *L) {
    lua_pushinteger(L, moe_ctx_num_threads(moe_lua_ctx(L)));
    return 1;
}

static int l_synchronize(lua_State *L) {
    moe_ctx *ctx = moe_lua_ctx(L);
    moe_device d = moe_lua_check_device(L, luaL_optstring(L, 1, "cuda"), "synchronize");
    const moe_backend *be = ctx->backends[d.type];
    if (be && be->synchronize) moe_lua_check(L, be->synchronize(ctx, d), "synchronize");
    return 0;
}

int luaopen_moelab_core(lua_State *L) {
    moe_ctx *ctx = moe_ctx_new(0);
    if (!ctx) return luaL_error(L, "moelab.core: %s", moe_last_error());
    moe_cpu_backend_install(ctx);
    int have_cuda = moe_cuda_device_count() > 0 && moe_cuda_backend_install(ctx) == MOE_OK;
    ctx->reclaim = reclaim_by_gc;
    ctx->reclaim_arg = L;

    ctx_box *b = lua_newuserdata(L, sizeof *b);
    b->ctx = ctx;
    luaL_newmetatable(L, CTX_KEY);
    lua_pushcfunction(L, ctx_gc);
    lua_setfield(L, -2, "__gc");
    lua_setmetatable(L, -2);
    lua_setfield(L, LUA_REGISTRYINDEX, CTX_KEY ".instance");

    lua_newtable(L);
    lua_pushstring(L, MOELAB_VERSION);
    lua_setfield(L, -2, "version");
    lua_pushboolean(L, have_cuda);
    lua_setfield(L, -2, "has_cuda");
#ifdef MOELAB_CUDA
    lua_pushboolean(L, 1);
#else
    lua_pushboolean(L, 0);
#endif
    lua_setfield(L, -2, "built_with_cuda");
    lua_pushcfunction(L, l_cuda_available);
    lua_setfield(L, -2, "cuda_available");
    lua_pushcfunction(L, l_cuda_device_count);
    lua_setfield(L, -2, "cuda_device_count");
    lua_pushcfunction(L, l_cuda_memory_stats);
    lua_setfield(L, -2, "cuda_memory_stats");
    lua_pushcfunction(L, l_cuda_reset_peak_memory);
    lua_setfield(L, -2, "cuda_reset_peak_memory");
    lua_pushcfunction(L, l_cuda_empty_cache);
    lua_setfield(L, -2, "cuda_empty_cache");
    lua_pushcfunction(L, l_cuda_profiler);
    lua_setfield(L, -2, "cuda_profiler");
    lua_pushcfunction(L, l_clock);
    lua_setfield(L, -2, "clock");
    lua_pushcfunction(L, l_num_threads);
    lua_setfield(L, -2, "num_threads");
    lua_pushcfunction(L, l_synchronize);
    lua_setfield(L, -2, "synchronize");
    moe_lua_open_cuda_graph(L);
    moe_lua_open_tensor(L);
    moe_lua_open_ops(L);
    moe_lua_open_nn(L);
    moe_lua_open_moe(L);
    moe_lua_open_train(L);
    moe_lua_open_data(L);
    moe_lua_open_io(L);
    moe_lua_open_tokenizer(L);
    moe_lua_open_dist(L);
    return 1;
}
