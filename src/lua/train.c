/* Lua binding of the training helpers: the grouped AdamW optimiser, global
 * gradient norms and clipping, and a terminal check for progress display. */
#include "lmoe.h"
#include "../train/optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define ADAMW_MT "moelab.AdamW"

typedef struct { moe_adamw *o; } adamw_box;

static moe_adamw *check_opt(lua_State *L, const char *f) {
    adamw_box *b = luaL_testudata(L, 1, ADAMW_MT);
    if (!b || !b->o) luaL_error(L, "%s: expected an optimiser, got %s", f, luaL_typename(L, 1));
    return b->o;
}

/* per-parameter list of numbers (or booleans) in parameter order */
static void read_list(lua_State *L, int opts, const char *key, int n, float *outf, int *outi, const char *f) {
    if (lua_isnoneornil(L, opts)) return;
    lua_getfield(L, opts, key);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return; }
    if (!lua_istable(L, -1) || (int)lua_objlen(L, -1) != n)
        luaL_error(L, "%s: option '%s' must be a list with one entry per parameter tensor (%d)", f, key, n);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, -1, i + 1);
        if (outf) {
            if (lua_type(L, -1) != LUA_TNUMBER || lua_tonumber(L, -1) < 0)
                luaL_error(L, "%s: %s[%d] must be a number >= 0", f, key, i + 1);
            outf[i] = (float)lua_tonumber(L, -1);
        } else {
            if (lua_type(L, -1) != LUA_TBOOLEAN) luaL_error(L, "%s: %s[%d] must be a boolean", f, key, i + 1);
            outi[i] = lua_toboolean(L, -1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Option `key` of the table at 2, one of two strings: 0 when absent or `first`, 1 when `second`. */
static int opt_pick(lua_State *L, const char *f, const char *key, const char *first, const char *second) {
    if (lua_isnoneornil(L, 2)) return 0;
    lua_getfield(L, 2, key);
    const char *v = lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : NULL;
    int absent = lua_isnil(L, -1);
    if (!absent && (!v || (strcmp(v, first) && strcmp(v, second))))
        luaL_error(L, "%s: option '%s' must be \"%s\" or \"%s\", got %s", f, key, first, second,
                   v ? v : luaL_typename(L, -1));
    int pick = !absent && !strcmp(v, second);
    lua_pop(L, 1);
    return pick;
}

static int l_adamw(lua_State *L) {
    const char *f = "optim.adamw";
    lua_settop(L, 2);   /* the options at 2 even when left out: the scratch userdata below goes above them */
    moe_layer *l = moe_lua_check_layer(L, 1, f, "params");
    if (!lua_isnoneornil(L, 2) && !lua_istable(L, 2)) return luaL_error(L, "%s: options must be a table", f);
    moe_adamw_hparams hp = {
        (float)moe_lua_opt_field_num(L, 2, "beta1", 0.9, f), (float)moe_lua_opt_field_num(L, 2, "beta2", 0.999, f),
        (float)moe_lua_opt_field_num(L, 2, "eps", 1e-8, f), (float)moe_lua_opt_field_num(L, 2, "weight_decay", 0.01, f),
        MOE_F32, 0};
    /* state_dtype = "f32" (default) | "bf16": m and v (bf16: stochastically rounded) */
    if (opt_pick(L, f, "state_dtype", "f32", "bf16")) hp.state_dtype = MOE_BF16;
    /* master = "split" (default) | "f32": under bf16 precision, the f32 master weights as the
     * compute copy plus a low plane while training (optimizer.h), or kept whole */
    hp.master_f32 = opt_pick(L, f, "master", "split", "f32");
    int n = moe_layer_num_param_tensors(l);
    float *scale = lua_newuserdata(L, sizeof(float) * (size_t)(n ? n : 1));
    int *decay = lua_newuserdata(L, sizeof(int) * (size_t)(n ? n : 1));
    for (int i = 0; i < n; i++) { scale[i] = 1.0f; decay[i] = 1; }
    read_list(L, 2, "lr_scale", n, scale, NULL, f);
    read_list(L, 2, "decay", n, NULL, decay, f);
    adamw_box *b = lua_newuserdata(L, sizeof *b);
    b->o = NULL;
    luaL_getmetatable(L, ADAMW_MT);
    lua_setmetatable(L, -2);
    /* range = {lo, hi}: own only the flat-buffer elements [lo, hi) (0-based; ZeRO shards) */
    int64_t lo = 0, hi = -1;
    if (!lua_isnoneornil(L, 2)) {
        lua_getfield(L, 2, "range");
        if (!lua_isnil(L, -1)) {
            if (!lua_istable(L, -1) || lua_objlen(L, -1) != 2)
                return luaL_error(L, "%s: option 'range' must be {lo, hi} (0-based elements, hi exclusive)", f);
            lua_rawgeti(L, -1, 1);
            lua_rawgeti(L, -2, 2);
            if (lua_type(L, -2) != LUA_TNUMBER || lua_type(L, -1) != LUA_TNUMBER)
                return luaL_error(L, "%s: option 'range' must be {lo, hi} (0-based elements, hi exclusive)", f);
            double dlo = lua_tonumber(L, -2), dhi = lua_tonumber(L, -1);
            if (dlo != floor(dlo) || dhi != floor(dhi) || dlo < 0 || dhi < dlo)
                return luaL_error(L, "%s: range {%g, %g} must be integers with 0 <= lo <= hi", f, dlo, dhi);
            lo = (int64_t)dlo;
            hi = (int64_t)dhi;
            lua_pop(L, 2);
        }
        lua_pop(L, 1);
    }
    b->o = hi < 0 ? moe_adamw_new(moe_lua_ctx(L), l, &hp, scale, decay)
                  : moe_adamw_new_range(moe_lua_ctx(L), l, &hp, scale, decay, lo, hi);
    if (!b->o) return moe_lua_fail(L, f);
    return 1;
}

static int a_gc(lua_State *L) {
    adamw_box *b = luaL_checkudata(L, 1, ADAMW_MT);
    moe_adamw_free(b->o);
    b->o = NULL;
    return 0;
}

/* optimizer:step(lr): lr may be left out with the device state on (the device's is used) */
static int a_step(lua_State *L) {
    const char *f = "optimizer:step";
    moe_adamw *o = check_opt(L, f);
    double lr = moe_adamw_device_state(o) && lua_isnoneornil(L, 2) ? 0.0 : moe_lua_check_num(L, 2, f, "lr");
    if (!(lr >= 0)) return luaL_error(L, "%s: lr must be >= 0, got %g", f, lr);
    moe_lua_check(L, moe_adamw_step(moe_lua_ctx(L), o, (float)lr), f);
    return 0;
}

/* optimizer:prepare(): the parameters in the form the next step updates (the split
 * master, optimizer.h); a CUDA graph capture calls it before capturing and replaying */
static int a_prepare(lua_State *L) {
    const char *f = "optimizer:prepare";
    moe_lua_check(L, moe_adamw_prepare(moe_lua_ctx(L), check_opt(L, f)), f);
    return 0;
}

/* optimizer:step_count([n]) -> the steps taken (with the device state on, read
 * from the device: one wait); n sets the count first (and is returned) */
static int a_count(lua_State *L) {
    const char *f = "optimizer:step_count";
    moe_adamw *o = check_opt(L, f);
    int64_t n;
    if (!lua_isnoneornil(L, 2)) {
        n = moe_lua_check_int(L, 2, f, "step");
        if (n < 0) return luaL_error(L, "%s: step must be >= 0", f);
        moe_lua_check(L, moe_adamw_set_step_count(moe_lua_ctx(L), o, n), f);
    } else {
        moe_lua_check(L, moe_adamw_get_step_count(moe_lua_ctx(L), o, &n), f);
    }
    lua_pushnumber(L, (lua_Number)n);
    return 1;
}

/* optimizer:set_device_state(on): the step count and learning rate held by the
 * device (a step replayed from a CUDA graph); off reads the count back */
static int a_set_device_state(lua_State *L) {
    const char *f = "optimizer:set_device_state";
    moe_adamw *o = check_opt(L, f);
    if (lua_type(L, 2) != LUA_TBOOLEAN) return luaL_error(L, "%s: on must be a boolean, got %s", f, luaL_typename(L, 2));
    moe_lua_check(L, moe_adamw_set_device_state(moe_lua_ctx(L), o, lua_toboolean(L, 2)), f);
    return 0;
}

static int a_device_state(lua_State *L) {
    lua_pushboolean(L, moe_adamw_device_state(check_opt(L, "optimizer:device_state")));
    return 1;
}

/* optimizer:set_lr(lr): the device's learning rate for the next steps (queued, no wait) */
static int a_set_lr(lua_State *L) {
    const char *f = "optimizer:set_lr";
    moe_adamw *o = check_opt(L, f);
    double lr = moe_lua_check_num(L, 2, f, "lr");
    moe_lua_check(L, moe_adamw_set_lr(moe_lua_ctx(L), o, (float)lr), f);
    return 0;
}

/* optimizer:launches() -> update calls made so far (runs of adjacent parameters share one) */
static int a_launches(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_adamw_launches(check_opt(L, "optimizer:launches")));
    return 1;
}

static int a_state(lua_State *L) {
    moe_adamw *o = check_opt(L, "optimizer:state");
    moe_tensor *m = moe_adamw_m(o), *v = moe_adamw_v(o);
    moe_lua_push_borrowed(L, m, "optimizer:state");
    moe_lua_push_borrowed(L, v, "optimizer:state");
    return 2;
}

/* optimizer:scale_next_step(s): the next step reads the gradients times s (deferred clipping) */
static int a_scale_next(lua_State *L) {
    const char *f = "optimizer:scale_next_step";
    moe_adamw *o = check_opt(L, f);
    double sc = moe_lua_check_num(L, 2, f, "scale");
    moe_lua_check(L, moe_adamw_scale_next_step(o, (float)sc), f);
    return 0;
}

/* optimizer:clip_next_step(sumsq, max_norm[, guard]): the next step clips by the
 * device's norm and skips itself on the device when it or the guard is not finite */
static int a_clip_next(lua_State *L) {
    const char *f = "optimizer:clip_next_step";
    moe_adamw *o = check_opt(L, f);
    moe_tensor *ss = moe_lua_check_tensor_f(L, 2, f, "sumsq");
    double max = moe_lua_check_num(L, 3, f, "max_norm");
    moe_tensor *guard = moe_lua_opt_tensor_f(L, 4, f, "guard");
    moe_lua_check(L, moe_adamw_clip_next_step(o, ss, guard, max), f);
    return 0;
}

/* grad_sumsq(layer) -> the sum of squared gradients, a one-element tensor on their device (not read) */
static int l_grad_sumsq(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "grad_sumsq", "layer");
    moe_tensor *t = NULL;
    moe_lua_check(L, moe_grad_sumsq(moe_lua_ctx(L), l, &t), "grad_sumsq");
    moe_lua_push_tensor(L, t, "grad_sumsq");
    return 1;
}

/* read_async(t1, ...) -> a pending read of one-element tensors; read:wait()
 * -> their values, waiting for their copies only (not for work queued after) */
#define READ_MT "moelab.Read"

static int l_read_async(lua_State *L) {
    const char *f = "read_async";
    int n = lua_gettop(L);
    if (n < 1 || n > MOE_READ_MAX) return luaL_error(L, "%s: %d tensors, expected 1 to %d", f, n, MOE_READ_MAX);
    const moe_tensor *ts[MOE_READ_MAX];
    for (int i = 0; i < n; i++) ts[i] = moe_lua_check_tensor_f(L, i + 1, f, "tensor");
    moe_read *r = lua_newuserdata(L, sizeof *r);
    luaL_getmetatable(L, READ_MT);
    lua_setmetatable(L, -2);
    moe_lua_check(L, moe_op_read_start(moe_lua_ctx(L), ts, n, r), f);
    return 1;
}

static int r_wait(lua_State *L) {
    moe_read *r = luaL_testudata(L, 1, READ_MT);
    if (!r) return luaL_error(L, "read:wait: expected a read from read_async (call it as read:wait())");
    moe_lua_check(L, moe_op_read_finish(moe_lua_ctx(L), r), "read:wait");
    for (int i = 0; i < r->n; i++) lua_pushnumber(L, r->value[i]);
    return r->n;
}

static int l_grad_norm(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "grad_norm", "layer");
    double n;
    moe_lua_check(L, moe_grad_norm(moe_lua_ctx(L), l, &n), "grad_norm");
    lua_pushnumber(L, n);
    return 1;
}

static int l_clip(lua_State *L) {
    const char *f = "clip_grad_norm";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "layer");
    double max = moe_lua_check_num(L, 2, f, "max_norm"), n;
    moe_lua_check(L, moe_clip_grad_norm(moe_lua_ctx(L), l, max, &n), f);
    lua_pushnumber(L, n);
    return 1;
}

static int l_isatty(lua_State *L) {
    lua_Integer fd = lua_isnoneornil(L, 1) ? 1 : moe_lua_check_int(L, 1, "isatty", "fd");
    lua_pushboolean(L, isatty((int)fd));
    return 1;
}

void moe_lua_open_train(lua_State *L) {
    luaL_newmetatable(L, ADAMW_MT);
    lua_newtable(L);
    lua_pushcfunction(L, a_step); lua_setfield(L, -2, "step");
    lua_pushcfunction(L, a_prepare); lua_setfield(L, -2, "prepare");
    lua_pushcfunction(L, a_count); lua_setfield(L, -2, "step_count");
    lua_pushcfunction(L, a_set_device_state); lua_setfield(L, -2, "set_device_state");
    lua_pushcfunction(L, a_device_state); lua_setfield(L, -2, "device_state");
    lua_pushcfunction(L, a_set_lr); lua_setfield(L, -2, "set_lr");
    lua_pushcfunction(L, a_state); lua_setfield(L, -2, "state");
    lua_pushcfunction(L, a_launches); lua_setfield(L, -2, "launches");
    lua_pushcfunction(L, a_scale_next); lua_setfield(L, -2, "scale_next_step");
    lua_pushcfunction(L, a_clip_next); lua_setfield(L, -2, "clip_next_step");
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, a_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    luaL_newmetatable(L, READ_MT);
    lua_newtable(L);
    lua_pushcfunction(L, r_wait); lua_setfield(L, -2, "wait");
    lua_setfield(L, -2, "__index");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_read_async); lua_setfield(L, -2, "read_async");
    lua_pushcfunction(L, l_adamw); lua_setfield(L, -2, "adamw");
    lua_pushcfunction(L, l_grad_norm); lua_setfield(L, -2, "grad_norm");
    lua_pushcfunction(L, l_grad_sumsq); lua_setfield(L, -2, "grad_sumsq");
    lua_pushcfunction(L, l_clip); lua_setfield(L, -2, "clip_grad_norm");
    lua_pushcfunction(L, l_isatty); lua_setfield(L, -2, "isatty");
}
