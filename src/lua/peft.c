/* Lua binding of parameter-efficient fine-tuning hooks: LoRA adapters on
 * expert banks and Linear layers (src/nn/lora.c) and the MoE block's
 * router-input bias (task conditioning). The Lua side (moelab.peft,
 * moelab.task_adaptive) builds the user API on these:
 *
 *   core.lora_attach(root, path, {r=, alpha=, expert_wise=, targets = {"gate_proj", ...}, seed=}) -> n
 *   core.lora_merge(root, path), core.lora_remove(root, path)
 *   core.lora_info(root, path) -> nil | {r=, alpha=, scale=, expert_wise=, targets = {...}}
 *   core.layer_kind_at(root, path) -> "ExpertBank" | "Linear" | ... | nil
 *   layer:set_router_input_bias(tensor | nil), layer:router_input_bias()
 *
 * Attach, merge and remove leave the root's flat buffers stale: re-flatten
 * with root:to(root:device()) after a batch of them. */
#include "lmoe.h"
#include "../nn/lora.h"
#include "../nn/moe_block.h"

#include <string.h>

void moe_lua_open_peft(lua_State *L);

static const char *const proj_names[3] = {"gate_proj", "up_proj", "down_proj"};

static moe_layer *check_path(lua_State *L, const char *f, moe_layer **root) {
    *root = moe_lua_check_layer(L, 1, f, "root");
    if (lua_type(L, 2) != LUA_TSTRING) luaL_error(L, "%s: path must be a string, got %s", f, luaL_typename(L, 2));
    const char *path = lua_tostring(L, 2);
    moe_layer *l = moe_layer_find_child(*root, path);
    if (!l) luaL_error(L, "%s: no layer at '%s'", f, path);
    return l;
}

static int l_kind_at(lua_State *L) {
    moe_layer *root = moe_lua_check_layer(L, 1, "layer_kind_at", "root");
    if (lua_type(L, 2) != LUA_TSTRING) return luaL_error(L, "layer_kind_at: path must be a string, got %s", luaL_typename(L, 2));
    moe_layer *l = moe_layer_find_child(root, lua_tostring(L, 2));
    if (!l) lua_pushnil(L);
    else lua_pushstring(L, l->vt->kind);
    return 1;
}

static int l_attach(lua_State *L) {
    const char *f = "lora_attach";
    moe_layer *root, *l = check_path(L, f, &root);
    if (!lua_istable(L, 3)) return luaL_error(L, "%s: expected a table of options, got %s", f, luaL_typename(L, 3));
    moe_lora_cfg c = {0};
    c.r = moe_lua_opt_field_int(L, 3, "r", 8, f);
    c.alpha = (float)moe_lua_opt_field_num(L, 3, "alpha", 2.0 * (double)c.r, f);
    c.expert_wise = moe_lua_opt_field_bool(L, 3, "expert_wise", 1, f);
    lua_getfield(L, 3, "targets");
    if (lua_isnil(L, -1)) c.targets = MOE_LORA_GATE | MOE_LORA_UP | MOE_LORA_DOWN;
    else if (!lua_istable(L, -1)) return luaL_error(L, "%s: option 'targets' must be a list of projection names", f);
    else {
        int n = (int)lua_objlen(L, -1);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, -1, i);
            const char *name = lua_tostring(L, -1);
            int k = -1;
            for (int j = 0; j < 3 && name; j++)
                if (!strcmp(name, proj_names[j])) k = j;
            if (k < 0) return luaL_error(L, "%s: targets[%d] must be gate_proj, up_proj or down_proj", f, i);
            c.targets |= 1u << k;
            lua_pop(L, 1);
        }
    }
    lua_pop(L, 1);
    moe_init init = {moe_lua_layer_seed(L, 3, f), 0};
    int n = 0;
    moe_lua_check(L, moe_lora_attach(moe_lua_ctx(L), l, &c, &init, &n), f);
    lua_pushinteger(L, n);
    return 1;
}

static int l_merge(lua_State *L) {
    moe_layer *root, *l = check_path(L, "lora_merge", &root);
    moe_lua_check(L, moe_lora_merge(moe_lua_ctx(L), l), "lora_merge");
    return 0;
}

static int l_remove(lua_State *L) {
    moe_layer *root, *l = check_path(L, "lora_remove", &root);
    moe_lua_check(L, moe_lora_remove(l), "lora_remove");
    return 0;
}

static int l_info(lua_State *L) {
    moe_layer *root, *l = check_path(L, "lora_info", &root);
    const moe_lora *lo = moe_lora_of(l);
    if (!lo) { lua_pushnil(L); return 1; }
    lua_createtable(L, 0, 6);
    lua_pushnumber(L, (lua_Number)lo->cfg.r); lua_setfield(L, -2, "r");
    lua_pushnumber(L, lo->cfg.alpha); lua_setfield(L, -2, "alpha");
    lua_pushnumber(L, lo->scale); lua_setfield(L, -2, "scale");
    lua_pushboolean(L, lo->cfg.expert_wise); lua_setfield(L, -2, "expert_wise");
    lua_pushstring(L, l->vt->kind); lua_setfield(L, -2, "kind");
    lua_newtable(L);
    int k = 0;
    if (moe_layer_is(l, "ExpertBank")) {
        for (int w = 0; w < 3; w++)
            if (lo->a[w] >= 0) { lua_pushstring(L, proj_names[w]); lua_rawseti(L, -2, ++k); }
    }
    lua_setfield(L, -2, "targets");
    return 1;
}

static moe_layer *check_moe_layer(lua_State *L, const char *f) {
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!moe_layer_is_moe(l)) luaL_error(L, "%s: %s is not an MoE layer", f, l->vt->kind);
    return l;
}

static int m_set_router_bias(lua_State *L) {
    const char *f = "layer:set_router_input_bias";
    moe_layer *l = check_moe_layer(L, f);
    moe_tensor *b = moe_lua_opt_tensor_f(L, 2, f, "bias");
    if (b && b->dtype != MOE_F32) return luaL_error(L, "%s: bias must be an f32 tensor, got %s", f, moe_dtype_name(b->dtype));
    if (b && !moe_device_eq(b->device, l->device)) {
        char a[16], c[16];
        return luaL_error(L, "%s: bias is on %s but the layer is on %s", f, moe_device_str(b->device, a, sizeof a),
                          moe_device_str(l->device, c, sizeof c));
    }
    moe_lua_check(L, moe_block_set_router_input_bias(l, b), f);
    lua_settop(L, 1);
    return 1;
}

static int m_router_bias(lua_State *L) {
    moe_lua_push_borrowed(L, moe_block_router_input_bias(check_moe_layer(L, "layer:router_input_bias")),
                          "layer:router_input_bias");
    return 1;
}

/* Called with the module table on top of the stack (from moe_lua_open_moe). */
void moe_lua_open_peft(lua_State *L) {
    luaL_getmetatable(L, "moelab.Layer");
    lua_getfield(L, -1, "__index");
    lua_pushcfunction(L, m_set_router_bias); lua_setfield(L, -2, "set_router_input_bias");
    lua_pushcfunction(L, m_router_bias); lua_setfield(L, -2, "router_input_bias");
    lua_pop(L, 2);
    static const luaL_Reg fns[] = {
        {"lora_attach", l_attach}, {"lora_merge", l_merge}, {"lora_remove", l_remove}, {"lora_info", l_info},
        {"layer_kind_at", l_kind_at}, {NULL, NULL}};
    luaL_register(L, NULL, fns);
}
