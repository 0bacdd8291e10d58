/* Lua binding of layers and the tape: moelab.core.nn.* constructors, layer
 * methods (forward, parameters, grads, zero_grad, to) and moelab.core.Tape. */
#include "lmoe.h"
#include "../nn/functional.h"
#include "../nn/layer.h"

#include <stdio.h>
#include <string.h>

#define LAYER_MT "moelab.Layer"
#define TAPE_MT "moelab.Tape"

typedef struct { moe_layer *l; } layer_box;
typedef struct { moe_tape *t; } tape_box;

void moe_lua_push_layer(lua_State *L, moe_layer *l, const char *what) {
    if (!l) moe_lua_fail(L, what);
    layer_box *b = lua_newuserdata(L, sizeof *b);
    b->l = l;
    luaL_getmetatable(L, LAYER_MT);
    lua_setmetatable(L, -2);
}

moe_layer *moe_lua_check_layer(lua_State *L, int idx, const char *fname, const char *arg) {
    layer_box *b = lua_touserdata(L, idx);
    if (!b || !lua_getmetatable(L, idx)) goto bad;
    luaL_getmetatable(L, LAYER_MT);
    int ok = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    if (ok && b->l) return b->l;
bad:
    luaL_error(L, "%s: %s must be a layer, got %s", fname, arg, luaL_typename(L, idx));
    return NULL;
}

moe_tape *moe_lua_check_tape(lua_State *L, int idx, const char *fname) {
    tape_box *b = luaL_testudata(L, idx, TAPE_MT);
    if (!b) luaL_error(L, "%s: expected a tape, got %s", fname, luaL_typename(L, idx));
    if (!b->t) luaL_error(L, "%s: the tape was freed", fname);
    return b->t;
}

/* Seeds for layers built without one: a counter in the registry of this Lua state. */
uint64_t moe_lua_layer_seed(lua_State *L, int opts, const char *fname) {
    lua_Integer s = moe_lua_opt_field_int(L, opts, "seed", -1, fname);
    if (s >= 0) return (uint64_t)s;
    lua_getfield(L, LUA_REGISTRYINDEX, "moelab.layer_seed");
    lua_Integer n = lua_isnumber(L, -1) ? lua_tointeger(L, -1) : 0x5eed;
    lua_pop(L, 1);
    lua_pushinteger(L, n + 1);
    lua_setfield(L, LUA_REGISTRYINDEX, "moelab.layer_seed");
    return (uint64_t)n;
}

static int64_t check_pos(lua_State *L, int idx, const char *fname, const char *arg) {
    lua_Integer v = moe_lua_check_int(L, idx, fname, arg);
    if (v <= 0) luaL_error(L, "%s: %s must be positive, got %d", fname, arg, (int)v);
    return v;
}

static int64_t field_pos(lua_State *L, int opts, const char *key, lua_Integer def, const char *fname) {
    lua_Integer v = moe_lua_opt_field_int(L, opts, key, def, fname);
    if (v <= 0) luaL_error(L, "%s: option '%s' must be a positive integer%s", fname, key, def <= 0 ? " (required)" : "");
    return v;
}

static int l_linear(lua_State *L) {
    const char *f = "nn.Linear";
    int64_t in = check_pos(L, 1, f, "in_features"), out = check_pos(L, 2, f, "out_features");
    int bias = moe_lua_opt_field_bool(L, 3, "bias", 1, f);
    moe_init init = {moe_lua_layer_seed(L, 3, f), 0};
    moe_lua_push_layer(L, moe_linear_new(moe_lua_ctx(L), in, out, bias, &init), f);
    return 1;
}

static int l_embedding(lua_State *L) {
    const char *f = "nn.Embedding";
    int64_t v = check_pos(L, 1, f, "num_embeddings"), d = check_pos(L, 2, f, "embedding_dim");
    moe_init init = {moe_lua_layer_seed(L, 3, f), 0};
    moe_lua_push_layer(L, moe_embedding_new(moe_lua_ctx(L), v, d, &init), f);
    return 1;
}

static int l_rmsnorm(lua_State *L) {
    const char *f = "nn.RMSNorm";
    int64_t d = check_pos(L, 1, f, "dim");
    float eps = (float)moe_lua_opt_field_num(L, 2, "eps", 1e-6, f);
    moe_lua_push_layer(L, moe_rmsnorm_new(moe_lua_ctx(L), d, eps), f);
    return 1;
}

static int l_layernorm(lua_State *L) {
    const char *f = "nn.LayerNorm";
    int64_t d = check_pos(L, 1, f, "dim");
    float eps = (float)moe_lua_opt_field_num(L, 2, "eps", 1e-5, f);
    int bias = moe_lua_opt_field_bool(L, 2, "bias", 1, f);
    moe_lua_push_layer(L, moe_layernorm_new(moe_lua_ctx(L), d, eps, bias), f);
    return 1;
}

static void check_opts(lua_State *L, const char *f) {
    if (!lua_istable(L, 1)) luaL_error(L, "%s: expected a table of options, got %s", f, luaL_typename(L, 1));
}

static int l_attention(lua_State *L) {
    const char *f = "nn.Attention";
    check_opts(L, f);
    moe_attention_cfg c = {0};
    c.hidden = field_pos(L, 1, "hidden_size", 0, f);
    c.n_heads = field_pos(L, 1, "num_heads", 0, f);
    c.n_kv_heads = field_pos(L, 1, "num_kv_heads", c.n_heads, f);
    c.head_dim = field_pos(L, 1, "head_dim", c.hidden / c.n_heads > 0 ? c.hidden / c.n_heads : 1, f);
    c.rope_theta = (float)moe_lua_opt_field_num(L, 1, "rope_theta", 10000.0, f);
    c.causal = moe_lua_opt_field_bool(L, 1, "causal", 1, f);
    c.bias = moe_lua_opt_field_bool(L, 1, "bias", 0, f);
    c.qkv_bias = moe_lua_opt_field_bool(L, 1, "qkv_bias", 0, f);
    c.qk_norm = moe_lua_opt_field_bool(L, 1, "qk_norm", 0, f);
    c.norm_eps = (float)moe_lua_opt_field_num(L, 1, "norm_eps", 1e-5, f);
    moe_init init = {moe_lua_layer_seed(L, 1, f), 0};
    moe_lua_push_layer(L, moe_attention_new(moe_lua_ctx(L), &c, &init), f);
    return 1;
}

static int l_ffn(lua_State *L) {
    const char *f = "nn.FeedForward";
    check_opts(L, f);
    int64_t h = field_pos(L, 1, "hidden_size", 0, f);
    int64_t inner = field_pos(L, 1, "intermediate_size", 4 * h, f);
    const char *act = moe_lua_opt_field_str(L, 1, "activation", "swiglu", f);
    moe_ffn_kind kind;
    if (!strcmp(act, "swiglu")) kind = MOE_FFN_SWIGLU;
    else if (!strcmp(act, "gelu")) kind = MOE_FFN_GELU;
    else return luaL_error(L, "%s: option 'activation' must be \"swiglu\" or \"gelu\", got \"%s\"", f, act);
    int bias = moe_lua_opt_field_bool(L, 1, "bias", 0, f);
    moe_init init = {moe_lua_layer_seed(L, 1, f), 0};
    moe_lua_push_layer(L, moe_ffn_new(moe_lua_ctx(L), h, inner, kind, bias, &init), f);
    return 1;
}

static int l_activation(lua_State *L) {
    moe_unary_op op = (moe_unary_op)lua_tointeger(L, lua_upvalueindex(1));
    moe_lua_push_layer(L, moe_activation_new(op), "nn.Activation");
    return 1;
}

#define MAX_CHILDREN 256

/* Reads children given as arguments (l1, l2, ...), as a list {l1, l2, ...} or,
 * when names != NULL, as a map {name = layer} taken in sorted name order for a
 * stable layout. Returns the count; *named tells which form was used. */
static int read_children(lua_State *L, const char *f, moe_layer **kids, const char **names, int *named) {
    int n = 0;
    *named = 0;
    if (lua_gettop(L) == 1 && lua_istable(L, 1) && !lua_getmetatable(L, 1)) {
        int len = (int)lua_objlen(L, 1);
        if (len > MAX_CHILDREN) luaL_error(L, "%s: at most %d children", f, MAX_CHILDREN);
        if (len == 0 && names) {
            lua_getglobal(L, "table");
            lua_newtable(L);
            int keys = lua_gettop(L);
            lua_pushnil(L);
            while (lua_next(L, 1)) {
                lua_pop(L, 1);
                if (lua_type(L, -1) != LUA_TSTRING) luaL_error(L, "%s: keys must be names", f);
                if (n >= MAX_CHILDREN) luaL_error(L, "%s: at most %d children", f, MAX_CHILDREN);
                lua_pushvalue(L, -1);
                lua_rawseti(L, keys, ++n);
            }
            lua_getfield(L, keys - 1, "sort");
            lua_pushvalue(L, keys);
            lua_call(L, 1, 0);
            for (int i = 1; i <= n; i++) {
                lua_rawgeti(L, keys, i);
                names[i - 1] = lua_tostring(L, -1);  /* kept alive by the keys table */
                lua_gettable(L, 1);
                kids[i - 1] = moe_lua_check_layer(L, -1, f, names[i - 1]);
                lua_pop(L, 1);
            }
            *named = 1;
            return n;
        }
        for (int i = 1; i <= len; i++) {
            lua_rawgeti(L, 1, i);
            char arg[32];
            snprintf(arg, sizeof arg, "child %d", i);
            kids[n++] = moe_lua_check_layer(L, -1, f, arg);
            lua_pop(L, 1);
        }
        return n;
    }
    int top = lua_gettop(L);
    if (top > MAX_CHILDREN) luaL_error(L, "%s: at most %d children", f, MAX_CHILDREN);
    for (int i = 1; i <= top; i++) {
        char arg[32];
        snprintf(arg, sizeof arg, "child %d", i);
        kids[n++] = moe_lua_check_layer(L, i, f, arg);
    }
    return n;
}

static int l_sequential(lua_State *L) {
    const char *f = "nn.Sequential";
    moe_layer *kids[MAX_CHILDREN];
    int named;
    int n = read_children(L, f, kids, NULL, &named);
    moe_lua_push_layer(L, moe_sequential_new(moe_lua_ctx(L), kids, n), f);
    return 1;
}

/* ModuleList(l1, l2, ...), ModuleList{l1, l2, ...} or ModuleList{name = layer, ...} */
static int l_module_list(lua_State *L) {
    const char *f = "nn.ModuleList";
    moe_layer *kids[MAX_CHILDREN];
    const char *names[MAX_CHILDREN];
    int named;
    int n = read_children(L, f, kids, names, &named);
    moe_lua_push_layer(L, moe_module_list_new(moe_lua_ctx(L), kids, named ? names : NULL, n), f);
    return 1;
}

/* ---- layer methods ---- */

static int layer_forward(lua_State *L) {
    const char *f = "layer:forward";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "input");
    moe_tape *tape = lua_isnoneornil(L, 3) ? NULL : moe_lua_check_tape(L, 3, f);
    moe_tensor *y;
    moe_status s = moe_layer_forward(l, moe_lua_ctx(L), tape, x, &y);
    if (s != MOE_OK) return moe_lua_fail(L, f);
    moe_lua_push_tensor(L, y, f);
    return 1;
}

/* layer:forward_residual(x, residual[, tape]) -> residual + layer(x), the add
 * folded into the layer's last op where it has one (layer.h) */
static int layer_forward_residual(lua_State *L) {
    const char *f = "layer:forward_residual";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "input");
    moe_tensor *r = moe_lua_check_tensor_f(L, 3, f, "residual");
    moe_tape *tape = lua_isnoneornil(L, 4) ? NULL : moe_lua_check_tape(L, 4, f);
    moe_tensor *y;
    moe_status s = moe_layer_forward_residual(l, moe_lua_ctx(L), tape, x, r, &y);
    if (s != MOE_OK) return moe_lua_fail(L, f);
    moe_lua_push_tensor(L, y, f);
    return 1;
}

static int layer_tostring(lua_State *L) {
    layer_box *b = luaL_checkudata(L, 1, LAYER_MT);
    char buf[1024];
    if (!b->l) { lua_pushstring(L, "Layer(freed)"); return 1; }
    moe_layer_describe(b->l, buf, sizeof buf);
    lua_pushstring(L, buf);
    return 1;
}

static int layer_gc(lua_State *L) {
    layer_box *b = luaL_checkudata(L, 1, LAYER_MT);
    moe_layer_release(b->l);
    b->l = NULL;
    return 0;
}

/* [{name=, value=, grad=}] in the given order (grad is nil for buffers) */
static void push_param_list(lua_State *L, const moe_param *ps, int n, const char *f) {
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, ps[i].name);
        lua_setfield(L, -2, "name");
        moe_lua_push_borrowed(L, ps[i].value, f);
        lua_setfield(L, -2, "value");
        moe_lua_push_borrowed(L, ps[i].grad, f);
        lua_setfield(L, -2, "grad");
        lua_rawseti(L, -2, i + 1);
    }
}

/* parameters() -> array of {name=, value=, grad=} in a stable order */
static int layer_parameters(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:parameters", "self");
    /* the gradients handed out read as they should: zero_grad may have only marked some */
    moe_lua_check(L, moe_layer_settle_grads(moe_lua_ctx(L), l), "layer:parameters");
    int n = moe_layer_num_param_tensors(l);
    moe_param *ps = lua_newuserdata(L, sizeof(moe_param) * (size_t)(n ? n : 1));
    moe_layer_collect_params(l, ps, n);
    push_param_list(L, ps, n, "layer:parameters");
    return 1;
}

/* buffers() -> array of {name=, value=}: saved with the model, not trained */
static int layer_buffers(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:buffers", "self");
    int n = moe_layer_num_buffer_tensors(l);
    moe_param *bs = lua_newuserdata(L, sizeof(moe_param) * (size_t)(n ? n : 1));
    moe_layer_collect_buffers(l, bs, n);
    push_param_list(L, bs, n, "layer:buffers");
    return 1;
}

static moe_param *find_param(lua_State *L, const char *f) {
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (lua_type(L, 2) != LUA_TSTRING) luaL_error(L, "%s: name must be a string, got %s", f, luaL_typename(L, 2));
    const char *name = lua_tostring(L, 2);
    moe_param *p = moe_layer_find_param(l, name);
    if (!p) luaL_error(L, "%s: no parameter named '%s' (see layer:parameters())", f, name);
    return p;
}

static int layer_param(lua_State *L) { moe_lua_push_borrowed(L, find_param(L, "layer:param")->value, "layer:param"); return 1; }
static int layer_grad(lua_State *L) {
    moe_param *p = find_param(L, "layer:grad");
    if (p->grad_zero_pending) {
        moe_lua_check(L, moe_op_fill(moe_lua_ctx(L), p->grad, 0.0), "layer:grad");
        p->grad_zero_pending = 0;
    }
    moe_lua_push_borrowed(L, p->grad, "layer:grad");
    return 1;
}

static int layer_num_params(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_layer_num_params(moe_lua_check_layer(L, 1, "layer:num_params", "self")));
    return 1;
}

/* zero_grad([{lazy = true}]): lazy leaves the expert banks' and the LM head's gradients to their
 * next writer (moe_layer_zero_grad_lazy): gradients read through the layer are
 * zero, but a gradient tensor fetched before may still show the old values */
static int layer_zero_grad(lua_State *L) {
    const char *f = "layer:zero_grad";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!lua_isnoneornil(L, 2) && !lua_istable(L, 2)) luaL_error(L, "%s: options must be a table", f);
    int lazy = moe_lua_opt_field_bool(L, 2, "lazy", 0, f);
    moe_lua_check(L, lazy ? moe_layer_zero_grad_lazy(moe_lua_ctx(L), l) : moe_layer_zero_grad(moe_lua_ctx(L), l), f);
    lua_settop(L, 1);
    return 1;
}

static int layer_to(lua_State *L) {
    const char *f = "layer:to";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (lua_type(L, 2) != LUA_TSTRING) return luaL_error(L, "%s: device must be a string, got %s", f, luaL_typename(L, 2));
    moe_device d = moe_lua_check_device(L, lua_tostring(L, 2), f);
    moe_lua_check(L, moe_layer_flatten(moe_lua_ctx(L), l, d), f);
    lua_settop(L, 1);
    return 1;
}

/* layer:set_precision("bf16" | "f32"): mixed precision on a root layer (layer.h) */
static int layer_set_precision(lua_State *L) {
    const char *f = "layer:set_precision";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    const char *name = luaL_optstring(L, 2, "f32");
    moe_dtype dt;
    if (!strcmp(name, "bf16") || !strcmp(name, "bfloat16")) dt = MOE_BF16;
    else if (!strcmp(name, "f32") || !strcmp(name, "fp32") || !strcmp(name, "float32")) dt = MOE_F32;
    else return luaL_error(L, "%s: precision must be \"bf16\" or \"f32\", got \"%s\"", f, name);
    moe_lua_check(L, moe_layer_set_compute_dtype(moe_lua_ctx(L), l, dt), f);
    lua_settop(L, 1);
    return 1;
}

static int layer_precision(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:precision", "self");
    lua_pushstring(L, l->flat_compute ? moe_dtype_name(l->compute_dtype) : "f32");
    return 1;
}

/* layer:master_state() -> {split = bool, splits = n, joins = n}: whether an optimiser keeps the
 * root's f32 master split into the compute copy and a low plane now, and how often it was split
 * and joined (layer.h: a training loop that leaves the parameters alone splits once) */
static int layer_master_state(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:master_state", "self");
    int parked;
    uint64_t splits, joins;
    moe_layer_master_counts(l, &parked, &splits, &joins);
    lua_createtable(L, 0, 3);
    lua_pushboolean(L, parked); lua_setfield(L, -2, "split");
    lua_pushnumber(L, (lua_Number)splits); lua_setfield(L, -2, "splits");
    lua_pushnumber(L, (lua_Number)joins); lua_setfield(L, -2, "joins");
    return 1;
}

static int layer_refresh_compute(lua_State *L) {
    const char *f = "layer:refresh_compute";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    moe_lua_check(L, moe_layer_refresh_compute(moe_lua_ctx(L), l), f);
    lua_settop(L, 1);
    return 1;
}

static int layer_flat(lua_State *L) {
    const char *f = "layer:flat_parameters";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!l->flat_values) moe_lua_check(L, moe_layer_flatten(moe_lua_ctx(L), l, l->device), f);
    moe_lua_check(L, moe_layer_settle_grads(moe_lua_ctx(L), l), f);
    moe_lua_push_borrowed(L, l->flat_values, "layer:flat_parameters");
    moe_lua_push_borrowed(L, l->flat_grads, "layer:flat_parameters");
    if (!l->flat_compute) return 2;
    moe_lua_push_borrowed(L, l->flat_compute, "layer:flat_parameters");   /* bf16 precision: the compute copy */
    return 3;
}

static int layer_kind(lua_State *L) {
    lua_pushstring(L, moe_lua_check_layer(L, 1, "layer:kind", "self")->vt->kind);
    return 1;
}

static int layer_device(lua_State *L) {
    char b[16];
    lua_pushstring(L, moe_device_str(moe_lua_check_layer(L, 1, "layer:device", "self")->device, b, sizeof b));
    return 1;
}

static int layer_children(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:children", "self");
    lua_createtable(L, l->n_children, 0);
    for (int i = 0; i < l->n_children; i++) {
        moe_layer_retain(l->children[i]);
        moe_lua_push_layer(L, l->children[i], "layer:children");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* ---- tape ---- */

static int l_tape_new(lua_State *L) {
    tape_box *b = lua_newuserdata(L, sizeof *b);
    b->t = NULL;
    luaL_getmetatable(L, TAPE_MT);
    lua_setmetatable(L, -2);
    b->t = moe_tape_new();
    if (!b->t) return moe_lua_fail(L, "Tape");
    return 1;
}

static int tape_gc(lua_State *L) {
    tape_box *b = luaL_checkudata(L, 1, TAPE_MT);
    moe_tape_free(b->t);
    b->t = NULL;
    return 0;
}

static int tape_backward(lua_State *L) {
    const char *f = "tape:backward";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *y = moe_lua_check_tensor_f(L, 2, f, "output");
    moe_tensor *g = moe_lua_opt_tensor_f(L, 3, f, "grad_output");
    moe_lua_check(L, moe_tape_backward(moe_lua_ctx(L), t, y, g), f);
    return 0;
}

static int tape_grad(lua_State *L) {
    const char *f = "tape:grad";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "tensor");
    moe_lua_push_borrowed(L, moe_tape_grad(t, x), f);
    return 1;
}

/* tape:set_profile("host" | "sync" | false): per-entry backward timing (tape.h) */
static int tape_set_profile(lua_State *L) {
    moe_tape *t = moe_lua_check_tape(L, 1, "tape:set_profile");
    int mode = MOE_TAPE_PROFILE_OFF;
    if (lua_type(L, 2) == LUA_TSTRING) {
        const char *m = lua_tostring(L, 2);
        if (!strcmp(m, "host")) mode = MOE_TAPE_PROFILE_HOST;
        else if (!strcmp(m, "sync")) mode = MOE_TAPE_PROFILE_SYNC;
        else return luaL_error(L, "tape:set_profile: mode must be \"host\", \"sync\" or false, got \"%s\"", m);
    } else if (lua_toboolean(L, 2)) {
        return luaL_error(L, "tape:set_profile: mode must be \"host\", \"sync\" or false");
    }
    moe_tape_set_profile(t, mode);
    lua_settop(L, 1);
    return 1;
}

/* tape:set_recompute("none" | "norms" | "norms_qkv"): outputs recomputed in the backward
 * instead of kept (tape.h); tape:recompute() -> the mode's name */
static int tape_set_recompute(lua_State *L) {
    moe_tape *t = moe_lua_check_tape(L, 1, "tape:set_recompute");
    const char *m = luaL_checkstring(L, 2);
    if (!strcmp(m, "norms")) moe_tape_set_recompute(t, MOE_TAPE_RECOMPUTE_NORMS);
    else if (!strcmp(m, "norms_qkv")) moe_tape_set_recompute(t, MOE_TAPE_RECOMPUTE_NORMS | MOE_TAPE_RECOMPUTE_QKV);
    else if (!strcmp(m, "none")) moe_tape_set_recompute(t, MOE_TAPE_RECOMPUTE_NONE);
    else return luaL_error(L, "tape:set_recompute: mode must be \"none\", \"norms\" or \"norms_qkv\", got \"%s\"", m);
    lua_settop(L, 1);
    return 1;
}
/* tape:set_one_backward(on): the backward lets go of what it has used (tape.h) */
static int tape_set_one_backward(lua_State *L) {
    moe_tape_set_one_backward(moe_lua_check_tape(L, 1, "tape:set_one_backward"), lua_toboolean(L, 2));
    lua_settop(L, 1);
    return 1;
}
static int tape_recompute(lua_State *L) {
    int m = moe_tape_recompute(moe_lua_check_tape(L, 1, "tape:recompute"));
    lua_pushstring(L, m & MOE_TAPE_RECOMPUTE_QKV ? "norms_qkv" : m & MOE_TAPE_RECOMPUTE_NORMS ? "norms" : "none");
    return 1;
}

/* tape:profile() -> {{name=, calls=, ms=}, ...}, most time first */
static int tape_profile(lua_State *L) {
    moe_tape *t = moe_lua_check_tape(L, 1, "tape:profile");
    moe_tape_profile_row rows[256];
    int n = moe_tape_profile(t, rows, 256);
    if (n > 256) n = 256;
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, rows[i].name); lua_setfield(L, -2, "name");
        lua_pushnumber(L, (double)rows[i].calls); lua_setfield(L, -2, "calls");
        lua_pushnumber(L, rows[i].seconds * 1e3); lua_setfield(L, -2, "ms");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* tape:memory([tensors]) -> {{name=, tensors=, bytes=}, ...}, most bytes
 * first: the memory the tape's entries hold, each storage counted once for
 * the first entry holding it; the storages of `tensors` (say
 * model:parameters()) are left out. */
static int tape_memory(lua_State *L) {
    const char *f = "tape:memory";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    int nskip = 0;
    const void **skip = NULL;
    if (!lua_isnoneornil(L, 2)) {
        luaL_argcheck(L, lua_istable(L, 2), 2, "tape:memory: expected a list of tensors to leave out");
        nskip = (int)lua_objlen(L, 2);
        skip = lua_newuserdata(L, (size_t)(nskip ? nskip : 1) * sizeof *skip);
        for (int i = 0; i < nskip; i++) {
            lua_rawgeti(L, 2, i + 1);
            moe_tensor *x = moe_lua_check_tensor_meta(L, -1, f, "tensors[i]");   /* a split master stays split */
            skip[i] = x->storage;
            lua_pop(L, 1);
        }
    }
    moe_tape_memory_row rows[256];
    int n = moe_tape_memory(t, skip, nskip, rows, 256);
    if (n > 256) n = 256;
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_createtable(L, 0, 3);
        lua_pushstring(L, rows[i].name); lua_setfield(L, -2, "name");
        lua_pushnumber(L, (double)rows[i].tensors); lua_setfield(L, -2, "tensors");
        lua_pushnumber(L, rows[i].bytes); lua_setfield(L, -2, "bytes");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int tape_reset(lua_State *L) { moe_tape_reset(moe_lua_check_tape(L, 1, "tape:reset")); return 0; }
static int tape_size(lua_State *L) { lua_pushinteger(L, moe_tape_size(moe_lua_check_tape(L, 1, "tape:size"))); return 1; }
static int tape_retain(lua_State *L) {
    moe_tape_retain_grads(moe_lua_check_tape(L, 1, "tape:retain_grads"), lua_toboolean(L, 2));
    return 0;
}

/* y is passed by address: C leaves the order of argument evaluation open, so
 * finish(L, op(..., &y), y, f) could read y before op wrote it. */
static int finish(lua_State *L, moe_status s, moe_tensor **y, const char *f) {
    if (s != MOE_OK) return moe_lua_fail(L, f);
    moe_lua_push_tensor(L, *y, f);
    return 1;
}

static int tape_binary(lua_State *L) {
    moe_binary_op op = (moe_binary_op)lua_tointeger(L, lua_upvalueindex(1));
    const char *f = lua_tostring(L, lua_upvalueindex(2));
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *a = moe_lua_check_tensor_f(L, 2, f, "a"), *b = moe_lua_check_tensor_f(L, 3, f, "b"), *y;
    return finish(L, moe_f_binary(moe_lua_ctx(L), t, op, a, b, &y), &y, f);
}

static int tape_unary(lua_State *L) {
    moe_unary_op op = (moe_unary_op)lua_tointeger(L, lua_upvalueindex(1));
    const char *f = lua_tostring(L, lua_upvalueindex(2));
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "x"), *y;
    float alpha = lua_isnoneornil(L, 3) ? 0.0f : (float)moe_lua_check_num(L, 3, f, "alpha");
    return finish(L, moe_f_unary(moe_lua_ctx(L), t, op, x, alpha, &y), &y, f);
}

static int tape_swiglu(lua_State *L) {
    const char *f = "tape:swiglu";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *g = moe_lua_check_tensor_f(L, 2, f, "gate"), *u = moe_lua_check_tensor_f(L, 3, f, "up"), *y;
    return finish(L, moe_f_swiglu(moe_lua_ctx(L), t, g, u, &y), &y, f);
}

static int tape_view(lua_State *L) {
    const char *f = "tape:view";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "x"), *y;
    int64_t shape[MOE_MAX_DIMS];
    /* allow -1 in a table shape: read it by hand */
    if (!lua_istable(L, 3)) return luaL_error(L, "%s: shape must be a table, got %s", f, luaL_typename(L, 3));
    int n = (int)lua_objlen(L, 3);
    if (n > MOE_MAX_DIMS) return luaL_error(L, "%s: at most %d dims", f, MOE_MAX_DIMS);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 3, i + 1);
        char arg[32];
        snprintf(arg, sizeof arg, "shape[%d]", i + 1);
        shape[i] = moe_lua_check_int(L, -1, f, arg);
        lua_pop(L, 1);
    }
    return finish(L, moe_f_view(moe_lua_ctx(L), t, x, n, shape, &y), &y, f);
}

static int tape_cross_entropy(lua_State *L) {
    const char *f = "tape:cross_entropy";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *logits = moe_lua_check_tensor_f(L, 2, f, "logits"), *targets = moe_lua_check_tensor_f(L, 3, f, "targets"), *y;
    int64_t ignore = moe_lua_opt_field_int(L, 4, "ignore_index", -100, f);
    int gif = moe_lua_opt_field_bool(L, 4, "grad_in_forward", 1, f);
    int over = moe_lua_opt_field_bool(L, 4, "overwrite_logits", 0, f);
    if (over && !gif) return luaL_error(L, "%s: overwrite_logits needs grad_in_forward", f);
    int mode = over ? MOE_CE_GRAD_OVER_LOGITS : gif ? MOE_CE_GRAD_NEW : MOE_CE_GRAD_LATER;
    return finish(L, moe_f_cross_entropy_ex(moe_lua_ctx(L), t, logits, targets, ignore, mode, &y), &y, f);
}

static int tape_sum(lua_State *L) {
    int mean = (int)lua_tointeger(L, lua_upvalueindex(1));
    const char *f = mean ? "tape:mean" : "tape:sum";
    moe_tape *t = moe_lua_check_tape(L, 1, f);
    moe_tensor *x = moe_lua_check_tensor_f(L, 2, f, "x"), *y;
    return finish(L, moe_f_sum(moe_lua_ctx(L), t, x, mean, &y), &y, f);
}

static int tape_forward(lua_State *L) {
    /* tape:forward(layer, x) == layer:forward(x, tape) */
    moe_lua_check_tape(L, 1, "tape:forward");
    lua_pushcfunction(L, layer_forward);
    lua_pushvalue(L, 2);
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 1);
    lua_call(L, 3, 1);
    return 1;
}

static const luaL_Reg layer_methods[] = {
    {"forward", layer_forward}, {"forward_residual", layer_forward_residual}, {"parameters", layer_parameters}, {"buffers", layer_buffers}, {"param", layer_param}, {"grad", layer_grad},
    {"num_params", layer_num_params}, {"zero_grad", layer_zero_grad}, {"to", layer_to},
    {"set_precision", layer_set_precision}, {"precision", layer_precision}, {"refresh_compute", layer_refresh_compute},
    {"master_state", layer_master_state},
    {"flat_parameters", layer_flat}, {"kind", layer_kind}, {"device", layer_device}, {"children", layer_children},
    {NULL, NULL}};

static const luaL_Reg tape_methods[] = {
    {"backward", tape_backward}, {"grad", tape_grad}, {"reset", tape_reset}, {"set_profile", tape_set_profile}, {"profile", tape_profile}, {"memory", tape_memory}, {"size", tape_size},
    {"retain_grads", tape_retain}, {"set_recompute", tape_set_recompute}, {"recompute", tape_recompute},
    {"set_one_backward", tape_set_one_backward},
    {"swiglu", tape_swiglu}, {"view", tape_view},
    {"cross_entropy", tape_cross_entropy}, {"forward", tape_forward}, {NULL, NULL}};

static void add_closure(lua_State *L, const char *name, lua_CFunction fn, int code, const char *fname) {
    lua_pushinteger(L, code);
    lua_pushstring(L, fname);
    lua_pushcclosure(L, fn, 2);
    lua_setfield(L, -2, name);
}

void moe_lua_open_nn(lua_State *L) {
    /* layer metatable */
    luaL_newmetatable(L, LAYER_MT);
    lua_newtable(L);
    luaL_register(L, NULL, layer_methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, layer_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, layer_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushcfunction(L, layer_forward);
    lua_setfield(L, -2, "__call");
    lua_pop(L, 1);

    /* tape metatable */
    luaL_newmetatable(L, TAPE_MT);
    lua_newtable(L);
    luaL_register(L, NULL, tape_methods);
    static const struct { const char *name; int op; } bins[] = {
        {"add", MOE_BIN_ADD}, {"sub", MOE_BIN_SUB}, {"mul", MOE_BIN_MUL}, {"div", MOE_BIN_DIV}};
    for (size_t i = 0; i < sizeof bins / sizeof *bins; i++) {
        char fname[32];
        snprintf(fname, sizeof fname, "tape:%s", bins[i].name);
        add_closure(L, bins[i].name, tape_binary, bins[i].op, fname);
    }
    static const struct { const char *name; int op; } uns[] = {
        {"silu", MOE_UN_SILU}, {"gelu", MOE_UN_GELU}, {"gelu_erf", MOE_UN_GELU_ERF}, {"relu", MOE_UN_RELU},
        {"tanh", MOE_UN_TANH}, {"sigmoid", MOE_UN_SIGMOID}, {"exp", MOE_UN_EXP}, {"log", MOE_UN_LOG},
        {"square", MOE_UN_SQUARE}, {"scale", MOE_UN_SCALE}, {"neg", MOE_UN_NEG}};
    for (size_t i = 0; i < sizeof uns / sizeof *uns; i++) {
        char fname[32];
        snprintf(fname, sizeof fname, "tape:%s", uns[i].name);
        add_closure(L, uns[i].name, tape_unary, uns[i].op, fname);
    }
    lua_pushinteger(L, 0);
    lua_pushcclosure(L, tape_sum, 1);
    lua_setfield(L, -2, "sum");
    lua_pushinteger(L, 1);
    lua_pushcclosure(L, tape_sum, 1);
    lua_setfield(L, -2, "mean");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, tape_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);

    lua_pushcfunction(L, l_tape_new);
    lua_setfield(L, -2, "Tape");

    lua_newtable(L);
    static const luaL_Reg ctors[] = {
        {"Linear", l_linear}, {"Embedding", l_embedding}, {"RMSNorm", l_rmsnorm}, {"LayerNorm", l_layernorm},
        {"Attention", l_attention}, {"FeedForward", l_ffn}, {"Sequential", l_sequential},
        {"ModuleList", l_module_list}, {NULL, NULL}};
    luaL_register(L, NULL, ctors);
    static const struct { const char *name; int op; } acts[] = {
        {"SiLU", MOE_UN_SILU}, {"GELU", MOE_UN_GELU_ERF}, {"GELUTanh", MOE_UN_GELU}, {"ReLU", MOE_UN_RELU},
        {"Tanh", MOE_UN_TANH}, {"Sigmoid", MOE_UN_SIGMOID}};
    for (size_t i = 0; i < sizeof acts / sizeof *acts; i++) {
        lua_pushinteger(L, acts[i].op);
        lua_pushcclosure(L, l_activation, 1);
        lua_setfield(L, -2, acts[i].name);
    }
    lua_setfield(L, -2, "nn");
}
