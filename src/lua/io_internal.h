/* Shared by the io binding (io.c) and its JSON half (json.c). */
#ifndef MOE_LUA_IO_INTERNAL_H
#define MOE_LUA_IO_INTERNAL_H

#include <cjson/cJSON.h>

#include "lmoe.h"

/* Pushes a userdata that owns p and calls fr(p) when collected, so C
 * resources (a mapped file, a cJSON tree, a malloc'd buffer) are not leaked
 * when a Lua error unwinds past them. Returns the box's stack slot. */
int moe_lua_handle_push(lua_State *L, void *p, void (*fr)(void *));
/* Frees now (idempotent). */
void moe_lua_handle_free(lua_State *L, int idx);

/* Pushes a decoded JSON value; null becomes nil, or json_null (a NULL light
 * userdata) as an array element. */
void moe_lua_json_push(lua_State *L, const cJSON *v, const char *fname);
/* Adds json_encode, json_decode and json_null to the table on top. */
void moe_lua_json_register(lua_State *L);

#endif
