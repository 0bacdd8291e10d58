/* Shared helpers of the Lua binding (moelab.core). Every binding function
 * checks its arguments and raises a Lua error naming the bad one; C failures
 * become Lua errors carrying the engine's message. Nothing here crashes on
 * user input. */
#ifndef MOE_LUA_H
#define MOE_LUA_H

#include <lauxlib.h>
#include <lua.h>

#include "../core/context.h"
#include "../core/tensor.h"
#include "../ops/ops.h"

#define MOE_TENSOR_MT "moelab.Tensor"

/* The context of this Lua state (created by luaopen_moelab_core). */
moe_ctx *moe_lua_ctx(lua_State *L);

/* Tensor userdata: a box holding one reference. */
moe_tensor *moe_lua_check_tensor(lua_State *L, int idx, const char *argname);
moe_tensor *moe_lua_opt_tensor(lua_State *L, int idx, const char *argname); /* nil -> NULL */
int moe_lua_is_tensor(lua_State *L, int idx);
/* Pushes t as userdata, taking over the caller's reference. t == NULL raises
 * the current engine error with `what` as context. */
void moe_lua_push_tensor(lua_State *L, moe_tensor *t, const char *what);

/* Raise a Lua error: "<fname>: <engine message>". Never returns. */
int moe_lua_fail(lua_State *L, const char *fname);
/* If s != MOE_OK raise like moe_lua_fail. */
void moe_lua_check(lua_State *L, moe_status s, const char *fname);

/* Argument helpers that name the argument in their errors. */
lua_Integer moe_lua_check_int(lua_State *L, int idx, const char *fname, const char *argname);
lua_Number moe_lua_check_num(lua_State *L, int idx, const char *fname, const char *argname);
/* Reads a shape from a table {d1, d2, ...} or from integers at idx..top. */
int moe_lua_check_shape(lua_State *L, int idx, const char *fname, int64_t *shape);
/* Options table helpers: field of table at idx, or the default when absent. */
lua_Integer moe_lua_opt_field_int(lua_State *L, int idx, const char *key, lua_Integer def, const char *fname);
lua_Number moe_lua_opt_field_num(lua_State *L, int idx, const char *key, lua_Number def, const char *fname);
const char *moe_lua_opt_field_str(lua_State *L, int idx, const char *key, const char *def, const char *fname);
int moe_lua_opt_field_bool(lua_State *L, int idx, const char *key, int def, const char *fname);
/* Parse a dtype / device name; raises with the list of valid names. */
moe_dtype moe_lua_check_dtype(lua_State *L, const char *name, const char *fname);
moe_device moe_lua_check_device(lua_State *L, const char *name, const char *fname);

/* Registration of the parts of moelab.core; each adds functions to the table on top. */
void moe_lua_open_tensor(lua_State *L);
void moe_lua_open_ops(lua_State *L);
void moe_lua_open_nn(lua_State *L);

#endif
