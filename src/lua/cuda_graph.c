/* CUDA graphs from Lua (core.cuda_graph_begin): the trainer captures one
 * training step and replays it (lua/moelab/trainer.lua, cuda_graph option).
 *   g = core.cuda_graph_begin([device=0])   -- the device's work is now recorded, not run
 *   g:finish()                              -- closes the capture, instantiates; errors if it broke
 *   g:launch()                              -- one replay, queued
 *   g:info() -> {nodes=, launches=, pool_bytes=}
 *   g:free()                                -- also at collection; abandons a capture in progress
 *   core.cuda_capturing([device]) -> boolean
 *   m = core.cuda_mirror(t)                 -- a pinned host mirror of a small device tensor
 *   m:start()                               -- queues a copy of t's values now
 *   m:finish() -> a cpu tensor              -- waits for that copy alone
 *   m:free()
 * Without CUDA every call but cuda_capturing (false) is an error. */
#include "lmoe.h"

#ifdef MOELAB_CUDA
#include "../ops/cuda/moe_cuda.h"

#define GRAPH_MT "moelab.CudaGraph"

/* ref: while capturing, the registry holds the graph, so a handle dropped
 * mid-capture is not collected (which would end the capture unseen) */
typedef struct { moe_cuda_graph *g; int ref; } graph_box;

static void unpin(lua_State *L, graph_box *b) {
    if (b->ref != LUA_NOREF) luaL_unref(L, LUA_REGISTRYINDEX, b->ref);
    b->ref = LUA_NOREF;
}

static graph_box *check_graph(lua_State *L, const char *f) {
    graph_box *b = luaL_checkudata(L, 1, GRAPH_MT);
    if (!b->g) luaL_error(L, "%s: the graph was freed", f);
    return b;
}

static int l_graph_begin(lua_State *L) {
    int dev = (int)luaL_optinteger(L, 1, 0);
    graph_box *b = lua_newuserdata(L, sizeof *b);
    b->g = NULL;
    b->ref = LUA_NOREF;
    luaL_getmetatable(L, GRAPH_MT);
    lua_setmetatable(L, -2);
    moe_lua_check(L, moe_cuda_graph_begin(moe_lua_ctx(L), dev, &b->g), "cuda_graph_begin");
    lua_pushvalue(L, -1);
    b->ref = luaL_ref(L, LUA_REGISTRYINDEX);
    return 1;
}

static int g_finish(lua_State *L) {
    graph_box *b = check_graph(L, "graph:finish");
    unpin(L, b);
    moe_lua_check(L, moe_cuda_graph_end(moe_lua_ctx(L), b->g), "graph:finish");
    return 0;
}

static int g_launch(lua_State *L) {
    graph_box *b = check_graph(L, "graph:launch");
    moe_lua_check(L, moe_cuda_graph_launch(moe_lua_ctx(L), b->g), "graph:launch");
    return 0;
}

static int g_info(lua_State *L) {
    graph_box *b = check_graph(L, "graph:info");
    size_t nodes = 0, pool = 0;
    uint64_t launches = 0;
    moe_lua_check(L, moe_cuda_graph_info(b->g, &nodes, &launches, &pool), "graph:info");
    lua_createtable(L, 0, 3);
    lua_pushnumber(L, (lua_Number)nodes); lua_setfield(L, -2, "nodes");
    lua_pushnumber(L, (lua_Number)launches); lua_setfield(L, -2, "launches");
    lua_pushnumber(L, (lua_Number)pool); lua_setfield(L, -2, "pool_bytes");
    return 1;
}

static int g_free(lua_State *L) {
    graph_box *b = luaL_checkudata(L, 1, GRAPH_MT);
    unpin(L, b);
    moe_cuda_graph_free(b->g);
    b->g = NULL;
    return 0;
}

#define MIRROR_MT "moelab.CudaMirror"
typedef struct { moe_cuda_mirror *m; } mirror_box;

static moe_cuda_mirror *check_mirror(lua_State *L, const char *f) {
    mirror_box *b = luaL_checkudata(L, 1, MIRROR_MT);
    if (!b->m) luaL_error(L, "%s: the mirror was freed", f);
    return b->m;
}

static int l_mirror(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor(L, 1, "cuda_mirror");
    mirror_box *b = lua_newuserdata(L, sizeof *b);
    b->m = NULL;
    luaL_getmetatable(L, MIRROR_MT);
    lua_setmetatable(L, -2);
    moe_lua_check(L, moe_cuda_mirror_new(moe_lua_ctx(L), t, &b->m), "cuda_mirror");
    lua_createtable(L, 1, 0);   /* the tensor's Lua handle, for finish's shape */
    lua_pushvalue(L, 1);
    lua_rawseti(L, -2, 1);
    lua_setfenv(L, -2);
    return 1;
}

static int mr_start(lua_State *L) {
    moe_lua_check(L, moe_cuda_mirror_start(moe_lua_ctx(L), check_mirror(L, "mirror:start")), "mirror:start");
    return 0;
}

static int mr_finish(lua_State *L) {
    const char *f = "mirror:finish";
    moe_cuda_mirror *m = check_mirror(L, f);
    lua_getfenv(L, 1);
    lua_rawgeti(L, -1, 1);   /* the mirrored tensor, for its shape and dtype */
    moe_tensor *t = moe_lua_check_tensor(L, -1, f);
    moe_tensor *dst = moe_tensor_new_cpu(t->dtype, t->ndim, t->shape);
    if (!dst) return luaL_error(L, "%s: %s", f, moe_last_error());
    moe_status s = moe_cuda_mirror_finish(moe_lua_ctx(L), m, dst);
    if (s != MOE_OK) {
        moe_tensor_release(dst);
        moe_lua_check(L, s, f);
    }
    moe_lua_push_tensor(L, dst, f);
    return 1;
}

static int mr_free(lua_State *L) {
    mirror_box *b = luaL_checkudata(L, 1, MIRROR_MT);
    moe_cuda_mirror_free(b->m);
    b->m = NULL;
    lua_newtable(L);   /* lets go of the tensor's handle now, not when the mirror is collected */
    lua_setfenv(L, 1);
    return 0;
}

static int l_capturing(lua_State *L) {
    lua_pushboolean(L, moe_cuda_capturing(moe_lua_ctx(L), (int)luaL_optinteger(L, 1, 0)));
    return 1;
}

/* a userdata class: its methods, and free as its collector */
static void define_class(lua_State *L, const char *mt, const luaL_Reg *methods, lua_CFunction gc) {
    luaL_newmetatable(L, mt);
    lua_pushcfunction(L, gc);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
}

void moe_lua_open_cuda_graph(lua_State *L) {
    static const luaL_Reg graph[] = {
        {"finish", g_finish}, {"launch", g_launch}, {"info", g_info}, {"free", g_free}, {NULL, NULL}};
    static const luaL_Reg mirror[] = {{"start", mr_start}, {"finish", mr_finish}, {"free", mr_free}, {NULL, NULL}};
    define_class(L, GRAPH_MT, graph, g_free);
    define_class(L, MIRROR_MT, mirror, mr_free);
    static const luaL_Reg fns[] = {
        {"cuda_graph_begin", l_graph_begin}, {"cuda_capturing", l_capturing}, {"cuda_mirror", l_mirror}, {NULL, NULL}};
    luaL_register(L, NULL, fns);
}
#else
static int l_graph_begin(lua_State *L) { return luaL_error(L, "cuda_graph_begin: this moelab was built without CUDA"); }
static int l_capturing(lua_State *L) { lua_pushboolean(L, 0); return 1; }
static int l_mirror(lua_State *L) { return luaL_error(L, "cuda_mirror: this moelab was built without CUDA"); }

void moe_lua_open_cuda_graph(lua_State *L) {
    static const luaL_Reg fns[] = {
        {"cuda_graph_begin", l_graph_begin}, {"cuda_capturing", l_capturing}, {"cuda_mirror", l_mirror}, {NULL, NULL}};
    luaL_register(L, NULL, fns);
}
#endif
