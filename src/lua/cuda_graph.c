/* CUDA graphs from Lua (core.cuda_graph_begin): the trainer captures one
 * training step and replays it (lua/moelab/trainer.lua, cuda_graph option).
 *   g = core.cuda_graph_begin([device=0])   -- the device's work is now recorded, not run
 *   g:finish()                              -- closes the capture, instantiates; errors if it broke
 *   g:launch()                              -- one replay, queued
 *   g:info() -> {nodes=, launches=, pool_bytes=}
 *   g:free()                                -- also at collection; abandons a capture in progress
 *   core.cuda_capturing([device]) -> boolean
 * Without CUDA every call but cuda_capturing (false) is an error. */
#include "lmoe.h"

#ifdef MOELAB_CUDA
#include "../ops/cuda/moe_cuda.h"

#define GRAPH_MT "moelab.CudaGraph"

typedef struct { moe_cuda_graph *g; } graph_box;

static graph_box *check_graph(lua_State *L, const char *f) {
    graph_box *b = luaL_checkudata(L, 1, GRAPH_MT);
    if (!b->g) luaL_error(L, "%s: the graph was freed", f);
    return b;
}

static int l_graph_begin(lua_State *L) {
    int dev = (int)luaL_optinteger(L, 1, 0);
    graph_box *b = lua_newuserdata(L, sizeof *b);
    b->g = NULL;
    luaL_getmetatable(L, GRAPH_MT);
    lua_setmetatable(L, -2);
    moe_lua_check(L, moe_cuda_graph_begin(moe_lua_ctx(L), dev, &b->g), "cuda_graph_begin");
    return 1;
}

static int g_finish(lua_State *L) {
    graph_box *b = check_graph(L, "graph:finish");
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
    moe_cuda_graph_free(b->g);
    b->g = NULL;
    return 0;
}

static int l_capturing(lua_State *L) {
    lua_pushboolean(L, moe_cuda_capturing(moe_lua_ctx(L), (int)luaL_optinteger(L, 1, 0)));
    return 1;
}

void moe_lua_open_cuda_graph(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"finish", g_finish}, {"launch", g_launch}, {"info", g_info}, {"free", g_free}, {NULL, NULL}};
    luaL_newmetatable(L, GRAPH_MT);
    lua_pushcfunction(L, g_free);
    lua_setfield(L, -2, "__gc");
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_graph_begin);
    lua_setfield(L, -2, "cuda_graph_begin");
    lua_pushcfunction(L, l_capturing);
    lua_setfield(L, -2, "cuda_capturing");
}
#else
static int l_graph_begin(lua_State *L) { return luaL_error(L, "cuda_graph_begin: this moelab was built without CUDA"); }
static int l_capturing(lua_State *L) { lua_pushboolean(L, 0); return 1; }

void moe_lua_open_cuda_graph(lua_State *L) {
    lua_pushcfunction(L, l_graph_begin);
    lua_setfield(L, -2, "cuda_graph_begin");
    lua_pushcfunction(L, l_capturing);
    lua_setfield(L, -2, "cuda_capturing");
}
#endif
