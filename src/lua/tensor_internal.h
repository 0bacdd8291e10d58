/* Private to the tensor binding (tensor.c, tensor_new.c, tensor_math.c). */
#ifndef MOE_LUA_TENSOR_INTERNAL_H
#define MOE_LUA_TENSOR_INTERNAL_H

#include "lmoe.h"

/* The userdata: one reference, NULL once freed. */
typedef struct { moe_tensor *t; } moe_lua_tbox;

/* Pushes an empty box with the tensor metatable. */
moe_lua_tbox *moe_lua_tensor_box(lua_State *L);
/* "tensor" for tensors, else the Lua type name. */
const char *moe_lua_type_at(lua_State *L, int idx);
/* Pushes t (a new reference) or raises the engine error when t is NULL. */
moe_tensor *moe_lua_push_new(lua_State *L, moe_tensor *t, const char *fname);
/* Adds the constructors to the module table at index mod. */
void moe_lua_tensor_open_constructors(lua_State *L, int mod);

#endif
