/* The Tensor userdata: construction, shape and views, element access and
 * conversions. Arithmetic, reductions and the operator metamethods live in
 * tensor_math.c. Indices and dims are 1-based as is usual in Lua; a negative
 * dim counts from the end (-1 is the last). Index tensors (topk, gather, ids)
 * hold 0-based ids as stored data, as in every checkpoint and tokenizer. */
#include "lmoe.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "tensor_internal.h"

typedef moe_lua_tbox tbox;
#define new_box moe_lua_tensor_box
#define type_at moe_lua_type_at
#define push_new moe_lua_push_new

/* ---------------------------------------------------------------- boxes -- */

tbox *moe_lua_tensor_box(lua_State *L) {
    tbox *b = lua_newuserdata(L, sizeof *b);
    b->t = NULL;
    luaL_getmetatable(L, MOE_TENSOR_MT);
    lua_setmetatable(L, -2);
    return b;
}

int moe_lua_is_tensor(lua_State *L, int idx) {
    if (lua_type(L, idx) != LUA_TUSERDATA || !lua_getmetatable(L, idx)) return 0;
    luaL_getmetatable(L, MOE_TENSOR_MT);
    int eq = lua_rawequal(L, -1, -2);
    lua_pop(L, 2);
    return eq;
}

const char *moe_lua_type_at(lua_State *L, int idx) {
    return moe_lua_is_tensor(L, idx) ? "tensor" : luaL_typename(L, idx);
}

/* Parked memory (tensor.h: the split master's f32 values) comes back before Lua touches it. */
static moe_tensor *ready(lua_State *L, moe_tensor *t, const char *what) {
    if (!t->storage->data && moe_tensor_ready(t) != MOE_OK) moe_lua_fail(L, what);
    return t;
}

moe_tensor *moe_lua_check_tensor(lua_State *L, int idx, const char *argname) {
    if (!moe_lua_is_tensor(L, idx)) moe_lua_errorf(L, "%s must be a tensor, got %s", argname, type_at(L, idx));
    tbox *b = lua_touserdata(L, idx);
    if (!b->t) moe_lua_errorf(L, "%s: tensor was freed", argname);
    return ready(L, b->t, argname);
}

moe_tensor *moe_lua_opt_tensor(lua_State *L, int idx, const char *argname) {
    if (lua_isnoneornil(L, idx)) return NULL;
    return moe_lua_check_tensor(L, idx, argname);
}

/* the tensor at idx, its memory as it is (parked memory stays parked) */
static moe_tensor *unboxed(lua_State *L, int idx, const char *fname, const char *argname) {
    if (!moe_lua_is_tensor(L, idx))
        moe_lua_errorf(L, "%s: %s must be a tensor, got %s", fname, argname, type_at(L, idx));
    tbox *b = lua_touserdata(L, idx);
    if (!b->t) {
        if (!strcmp(argname, "self")) moe_lua_errorf(L, "%s: tensor was freed", fname);
        moe_lua_errorf(L, "%s: tensor was freed (argument %s)", fname, argname);
    }
    return b->t;
}

moe_tensor *moe_lua_check_tensor_f(lua_State *L, int idx, const char *fname, const char *argname) {
    return ready(L, unboxed(L, idx, fname, argname), fname);
}

/* self of a method that reads the header only (shape, dtype, views): parked memory stays parked */
static moe_tensor *check_meta(lua_State *L, const char *fname) { return unboxed(L, 1, fname, "self"); }

moe_tensor *moe_lua_check_tensor_meta(lua_State *L, int idx, const char *fname, const char *argname) {
    return unboxed(L, idx, fname, argname);
}

moe_tensor *moe_lua_opt_tensor_f(lua_State *L, int idx, const char *fname, const char *argname) {
    if (lua_isnoneornil(L, idx)) return NULL;
    return moe_lua_check_tensor_f(L, idx, fname, argname);
}

void moe_lua_push_tensor(lua_State *L, moe_tensor *t, const char *what) {
    if (!t) { moe_lua_fail(L, what); return; }
    tbox *b = new_box(L);
    b->t = t;
}

void moe_lua_push_borrowed(lua_State *L, moe_tensor *t, const char *what) {
    if (!t) { lua_pushnil(L); return; }
    moe_tensor_retain(t);
    moe_lua_push_tensor(L, t, what);
}

/* Leak-free: the box is on the stack before the tensor exists. */
moe_tensor *moe_lua_new_tensor(lua_State *L, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev,
                               const char *fname) {
    tbox *b = new_box(L);
    b->t = moe_tensor_new(moe_lua_ctx(L), dt, ndim, shape, dev);
    if (!b->t) moe_lua_fail(L, fname);
    return b->t;
}

moe_tensor *moe_lua_new_zeros(lua_State *L, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev,
                              const char *fname) {
    moe_tensor *t = moe_lua_new_tensor(L, dt, ndim, shape, dev, fname);
    moe_lua_check(L, moe_op_fill(moe_lua_ctx(L), t, 0.0), fname);
    return t;
}

/* Pushes the result of a C call that returns a new reference (NULL: error). */
moe_tensor *moe_lua_push_new(lua_State *L, moe_tensor *t, const char *fname) {
    if (!t) moe_lua_fail(L, fname);
    tbox *b = new_box(L);
    b->t = t;
    return t;
}

int moe_lua_dim_arg(lua_State *L, int idx, int ndim, const char *fname) {
    lua_Integer d = moe_lua_check_int(L, idx, fname, "dim");
    if (d >= 1 && d <= ndim) return (int)d - 1;
    if (d <= -1 && d >= -ndim) return ndim + (int)d;
    if (ndim == 0) moe_lua_errorf(L, "%s: dim %d out of range: the tensor has no dims", fname, (int)d);
    return moe_lua_errorf(L, "%s: dim %d out of range for a %d-dim tensor (dims are 1..%d, or -%d..-1 from the end)",
                      fname, (int)d, ndim, ndim, ndim);
}

/* ------------------------------------------------------------ arguments -- */

/* A shape that may contain -1 (view, reshape, expand). */
static int shape_infer_arg(lua_State *L, int idx, const char *fname, int64_t *shape) {
    int ndim = 0;
    if (lua_type(L, idx) == LUA_TTABLE) {
        int n = (int)lua_objlen(L, idx);
        if (n > MOE_MAX_DIMS) moe_lua_errorf(L, "%s: shape has %d dims, at most %d allowed", fname, n, MOE_MAX_DIMS);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, idx, i);
            if (lua_type(L, -1) != LUA_TNUMBER)
                moe_lua_errorf(L, "%s: shape[%d] must be an integer, got %s", fname, i, luaL_typename(L, -1));
            lua_Number v = lua_tonumber(L, -1);
            lua_pop(L, 1);
            if (!(v >= -1 && v <= 9.2e18 && v == (lua_Number)(int64_t)v))
                moe_lua_errorf(L, "%s: shape[%d] must be a non-negative integer or -1, got %g", fname, i, (double)v);
            shape[ndim++] = (int64_t)v;
        }
        return ndim;
    }
    int top = lua_gettop(L);
    if (idx > top || lua_type(L, idx) != LUA_TNUMBER)
        moe_lua_errorf(L, "%s: shape must be a table of sizes or sizes as arguments, got %s", fname, type_at(L, idx));
    for (int i = idx; i <= top; i++) {
        if (ndim >= MOE_MAX_DIMS) moe_lua_errorf(L, "%s: at most %d dims allowed", fname, MOE_MAX_DIMS);
        if (lua_type(L, i) != LUA_TNUMBER)
            moe_lua_errorf(L, "%s: size of dim %d must be an integer, got %s", fname, ndim + 1, type_at(L, i));
        lua_Number v = lua_tonumber(L, i);
        if (!(v >= -1 && v <= 9.2e18 && v == (lua_Number)(int64_t)v))
            moe_lua_errorf(L, "%s: size of dim %d must be a non-negative integer or -1, got %g", fname, ndim + 1,
                       (double)v);
        shape[ndim++] = (int64_t)v;
    }
    return ndim;
}

/* Checks an index argument (1-based) against a dim and returns it 0-based. */
static int64_t index_arg(lua_State *L, int idx, const char *fname, int dim, int64_t size) {
    char what[48];
    snprintf(what, sizeof what, "index for dim %d", dim + 1);
    lua_Integer i = moe_lua_check_int(L, idx, fname, what);
    if (i < 1 || i > size)
        moe_lua_errorf(L, "%s: index %lld out of range for dim %d of size %lld (indices are 1-based)", fname,
                   (long long)i, dim + 1, (long long)size);
    return (int64_t)i - 1;
}

/* ------------------------------------------------------ element access -- */

/* A copy of t on the cpu with dtype dt (any strides in, contiguous out). */
static moe_tensor *host_copy(lua_State *L, moe_tensor *t, moe_dtype dt, const char *fname) {
    moe_ctx *ctx = moe_lua_ctx(L);
    moe_tensor *src = t;
    if (t->device.type != MOE_CPU) {
        src = moe_op_to(ctx, t, MOE_DEVICE_CPU, t->dtype);
        if (!src) moe_lua_fail(L, fname);
    }
    moe_tensor *h = moe_tensor_new_cpu(dt, t->ndim, t->shape);
    moe_status s = h ? moe_tensor_copy_cpu(h, src) : moe_last_status();
    if (src != t) moe_tensor_release(src);
    if (s != MOE_OK) { moe_tensor_release(h); moe_lua_fail(L, fname); }
    return h;
}

static double elem_read(lua_State *L, moe_tensor *t, const int64_t *idx, const char *fname) {
    double v = 0;
    if (t->device.type == MOE_CPU) {
        moe_lua_check(L, moe_tensor_get(t, idx, &v), fname);
        return v;
    }
    int64_t off = t->offset;
    for (int d = 0; d < t->ndim; d++) off += idx[d] * t->stride[d];
    moe_tensor *one = moe_tensor_from_storage(t->storage, off, t->dtype, 0, NULL, NULL);
    if (!one) moe_lua_fail(L, fname);
    moe_tensor *h = moe_op_to(moe_lua_ctx(L), one, MOE_DEVICE_CPU, t->dtype);
    moe_tensor_release(one);
    if (!h) moe_lua_fail(L, fname);
    v = moe_dtype_load(h->dtype, moe_tensor_data(h));
    moe_tensor_release(h);
    return v;
}

static void elem_write(lua_State *L, moe_tensor *t, const int64_t *idx, double v, const char *fname) {
    if (t->device.type == MOE_CPU) {
        moe_lua_check(L, moe_tensor_set(t, idx, v), fname);
        return;
    }
    int64_t off = t->offset;
    for (int d = 0; d < t->ndim; d++) off += idx[d] * t->stride[d];
    moe_tensor *one = moe_tensor_from_storage(t->storage, off, t->dtype, 0, NULL, NULL);
    moe_tensor *h = moe_tensor_new_cpu(t->dtype, 0, NULL);
    moe_status s = one && h ? MOE_OK : moe_last_status();
    if (s == MOE_OK) {
        moe_dtype_store(h->dtype, moe_tensor_data(h), v);
        s = moe_op_copy(moe_lua_ctx(L), one, h);
    }
    moe_tensor_release(one);
    moe_tensor_release(h);
    moe_lua_check(L, s, fname);
}

static int t_get(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:get", "self");
    int n = lua_gettop(L) - 1;
    if (n != t->ndim)
        return moe_lua_errorf(L, "Tensor:get: expected %d indices for a %d-dim tensor, got %d", t->ndim, t->ndim, n);
    int64_t idx[MOE_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) idx[d] = index_arg(L, 2 + d, "Tensor:get", d, t->shape[d]);
    lua_pushnumber(L, elem_read(L, t, idx, "Tensor:get"));
    return 1;
}

static int t_set(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:set", "self");
    int n = lua_gettop(L) - 2;
    if (n != t->ndim)
        return moe_lua_errorf(L, "Tensor:set: expected %d indices and a value for a %d-dim tensor, got %d arguments",
                          t->ndim, t->ndim, n + 1 < 0 ? 0 : n + 1);
    int64_t idx[MOE_MAX_DIMS];
    for (int d = 0; d < t->ndim; d++) idx[d] = index_arg(L, 2 + d, "Tensor:set", d, t->shape[d]);
    double v = moe_lua_check_num(L, 2 + t->ndim, "Tensor:set", "value");
    elem_write(L, t, idx, v, "Tensor:set");
    lua_settop(L, 1);
    return 1;
}

static void flat_to_index(const moe_tensor *t, int64_t flat, int64_t *idx) {
    for (int d = t->ndim - 1; d >= 0; d--) {
        idx[d] = t->shape[d] ? flat % t->shape[d] : 0;
        flat = t->shape[d] ? flat / t->shape[d] : 0;
    }
}

static int64_t flat_arg(lua_State *L, moe_tensor *t, const char *fname) {
    lua_Integer i = moe_lua_check_int(L, 2, fname, "index");
    int64_t n = moe_tensor_numel(t);
    if (i < 1 || i > n)
        moe_lua_errorf(L, "%s: flat index %lld out of range for %lld elements (indices are 1-based)", fname,
                   (long long)i, (long long)n);
    return (int64_t)i - 1;
}

static int t_get_flat(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:get_flat", "self");
    int64_t idx[MOE_MAX_DIMS];
    flat_to_index(t, flat_arg(L, t, "Tensor:get_flat"), idx);
    lua_pushnumber(L, elem_read(L, t, idx, "Tensor:get_flat"));
    return 1;
}

static int t_set_flat(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:set_flat", "self");
    int64_t idx[MOE_MAX_DIMS];
    flat_to_index(t, flat_arg(L, t, "Tensor:set_flat"), idx);
    double v = moe_lua_check_num(L, 3, "Tensor:set_flat", "value");
    elem_write(L, t, idx, v, "Tensor:set_flat");
    lua_settop(L, 1);
    return 1;
}

static int t_item(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:item", "self");
    if (moe_tensor_numel(t) != 1) {
        char b[128];
        return moe_lua_errorf(L, "Tensor:item: needs a tensor with one element, got shape %s (%lld elements)",
                          moe_shape_str(t, b, sizeof b), (long long)moe_tensor_numel(t));
    }
    int64_t idx[MOE_MAX_DIMS] = {0};
    lua_pushnumber(L, elem_read(L, t, idx, "Tensor:item"));
    return 1;
}

static void push_nested(lua_State *L, const moe_tensor *h, int d, const double **p) {
    if (d == h->ndim) { lua_pushnumber(L, *(*p)++); return; }
    lua_checkstack(L, 4);
    lua_createtable(L, h->shape[d] > 1 << 24 ? 0 : (int)h->shape[d], 0);
    for (int64_t i = 0; i < h->shape[d]; i++) {
        push_nested(L, h, d + 1, p);
        lua_rawseti(L, -2, (int)(i + 1));
    }
}

static int t_to_table(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:to_table", "self");
    if (moe_tensor_numel(t) > ((int64_t)1 << 27))
        return moe_lua_errorf(L, "Tensor:to_table: tensor too large (%lld elements)", (long long)moe_tensor_numel(t));
    moe_tensor *h = host_copy(L, t, MOE_F64, "Tensor:to_table");
    const double *p = moe_tensor_data(h);
    push_nested(L, h, 0, &p);
    moe_tensor_release(h);
    return 1;
}

/* ------------------------------------------------------------ metadata -- */

static void push_shape(lua_State *L, const moe_tensor *t) {
    lua_createtable(L, t->ndim, 0);
    for (int i = 0; i < t->ndim; i++) {
        lua_pushnumber(L, (lua_Number)t->shape[i]);
        lua_rawseti(L, -2, i + 1);
    }
}

static int t_shape(lua_State *L) {
    push_shape(L, check_meta(L, "Tensor:shape"));
    return 1;
}

static int t_size(lua_State *L) {
    moe_tensor *t = check_meta(L, "Tensor:size");
    if (lua_isnoneornil(L, 2)) { push_shape(L, t); return 1; }
    int d = moe_lua_dim_arg(L, 2, t->ndim, "Tensor:size");
    lua_pushnumber(L, (lua_Number)t->shape[d]);
    return 1;
}

static int t_stride(lua_State *L) {
    moe_tensor *t = check_meta(L, "Tensor:stride");
    if (!lua_isnoneornil(L, 2)) {
        lua_pushnumber(L, (lua_Number)t->stride[moe_lua_dim_arg(L, 2, t->ndim, "Tensor:stride")]);
        return 1;
    }
    lua_createtable(L, t->ndim, 0);
    for (int i = 0; i < t->ndim; i++) {
        lua_pushnumber(L, (lua_Number)t->stride[i]);
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int t_dim(lua_State *L) {
    lua_pushinteger(L, check_meta(L, "Tensor:dim")->ndim);
    return 1;
}

static int t_numel(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_tensor_numel(check_meta(L, "Tensor:numel")));
    return 1;
}

static int t_dtype(lua_State *L) {
    lua_pushstring(L, moe_dtype_name(check_meta(L, "Tensor:dtype")->dtype));
    return 1;
}

static int t_device(lua_State *L) {
    char buf[32];
    lua_pushstring(L, moe_device_str(check_meta(L, "Tensor:device")->device, buf, sizeof buf));
    return 1;
}

static int t_is_contiguous(lua_State *L) {
    lua_pushboolean(L, moe_tensor_is_contiguous(check_meta(L, "Tensor:is_contiguous")));
    return 1;
}

static int t_is_freed(lua_State *L) {
    if (!moe_lua_is_tensor(L, 1)) return moe_lua_errorf(L, "Tensor:is_freed: self must be a tensor, got %s", type_at(L, 1));
    lua_pushboolean(L, ((tbox *)lua_touserdata(L, 1))->t == NULL);
    return 1;
}

/* t:index_bound() -> n when every value of this integer tensor is known to
 * lie in [0, n) (an upload or copy from the host sets it; tensor.h), else 0 */
static int t_index_bound(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor(L, 1, "Tensor:index_bound");
    const int64_t n = t->index_bound;
    lua_pushnumber(L, moe_tensor_index_trusted(t, n > 0 ? n : 1) ? (lua_Number)n : 0);
    return 1;
}

static int t_free(lua_State *L) {
    if (!moe_lua_is_tensor(L, 1)) return moe_lua_errorf(L, "Tensor:free: self must be a tensor, got %s", type_at(L, 1));
    tbox *b = lua_touserdata(L, 1);
    moe_tensor_release(b->t);
    b->t = NULL;
    return 0;
}

static int t_gc(lua_State *L) {
    tbox *b = lua_touserdata(L, 1);
    if (b) { moe_tensor_release(b->t); b->t = NULL; }
    return 0;
}

static int t_len(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:__len", "self");
    if (t->ndim == 0) return moe_lua_errorf(L, "Tensor:__len: a 0-dim tensor has no length");
    lua_pushnumber(L, (lua_Number)t->shape[0]);
    return 1;
}

/* Fallback printing; lua/moelab/tensor.lua installs the full formatter. */
static int t_tostring(lua_State *L) {
    if (!moe_lua_is_tensor(L, 1)) return moe_lua_errorf(L, "Tensor:__tostring: self must be a tensor");
    tbox *b = lua_touserdata(L, 1);
    if (!b->t) { lua_pushstring(L, "tensor(<freed>)"); return 1; }
    char s[160], d[32];
    lua_pushfstring(L, "tensor(shape=%s, dtype=%s, device=%s)", moe_shape_str(b->t, s, sizeof s),
                    moe_dtype_name(b->t->dtype), moe_device_str(b->t->device, d, sizeof d));
    return 1;
}

/* --------------------------------------------------------- conversions -- */

static int t_to(lua_State *L) {
    const char *fn = "Tensor:to";
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, fn, "self");
    moe_device dev = t->device;
    moe_dtype dt = t->dtype;
    int any = 0;
    for (int i = 2; i <= 3 && !lua_isnoneornil(L, i); i++) {
        if (lua_type(L, i) != LUA_TSTRING)
            return moe_lua_errorf(L, "%s: argument %d must be a device or dtype name, got %s", fn, i - 1, type_at(L, i));
        const char *s = lua_tostring(L, i);
        int p = moe_dtype_parse(s);
        moe_device d;
        if (p >= 0) dt = (moe_dtype)p;
        else if (moe_device_parse(s, &d) == 0) dev = d;
        else return moe_lua_errorf(L, "%s: '%s' is neither a dtype (f32, f64, bf16, f16, i32, i64, u8, i8) nor a device "
                               "(cpu, cuda, cuda:N)", fn, s);
        any = 1;
    }
    if (!any) return moe_lua_errorf(L, "%s: expected a device or dtype name", fn);
    if (moe_device_eq(dev, t->device) && dt == t->dtype) { lua_settop(L, 1); return 1; }
    push_new(L, moe_op_to(moe_lua_ctx(L), t, dev, dt), fn);
    return 1;
}

static int t_float(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:float", "self");
    if (t->dtype == MOE_F32) { lua_settop(L, 1); return 1; }
    push_new(L, moe_op_to(moe_lua_ctx(L), t, t->device, MOE_F32), "Tensor:float");
    return 1;
}

static int t_clone(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:clone", "self");
    push_new(L, moe_op_to(moe_lua_ctx(L), t, t->device, t->dtype), "Tensor:clone");
    return 1;
}

static int t_contiguous(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:contiguous", "self");
    if (moe_tensor_is_contiguous(t)) { lua_settop(L, 1); return 1; }
    push_new(L, moe_op_contiguous(moe_lua_ctx(L), t), "Tensor:contiguous");
    return 1;
}

/* ---------------------------------------------------------------- views -- */

static int t_view(lua_State *L) {
    moe_tensor *t = check_meta(L, "Tensor:view");
    int64_t shape[MOE_MAX_DIMS];
    int nd = shape_infer_arg(L, 2, "Tensor:view", shape);
    push_new(L, moe_tensor_view(t, nd, shape), "Tensor:view");
    return 1;
}

static int t_reshape(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:reshape", "self");
    int64_t shape[MOE_MAX_DIMS];
    int nd = shape_infer_arg(L, 2, "Tensor:reshape", shape);
    if (moe_tensor_is_contiguous(t)) {
        push_new(L, moe_tensor_view(t, nd, shape), "Tensor:reshape");
        return 1;
    }
    moe_tensor *c = push_new(L, moe_op_contiguous(moe_lua_ctx(L), t), "Tensor:reshape");
    push_new(L, moe_tensor_view(c, nd, shape), "Tensor:reshape");
    return 1;
}

static int t_transpose(lua_State *L) {
    moe_tensor *t = check_meta(L, "Tensor:transpose");
    int a = moe_lua_dim_arg(L, 2, t->ndim, "Tensor:transpose");
    int b = moe_lua_dim_arg(L, 3, t->ndim, "Tensor:transpose");
    push_new(L, moe_tensor_transpose(t, a, b), "Tensor:transpose");
    return 1;
}

static int t_t(lua_State *L) {
    moe_tensor *t = check_meta(L, "Tensor:t");
    if (t->ndim > 2) return moe_lua_errorf(L, "Tensor:t: expects a tensor with at most 2 dims, got %d (use transpose)", t->ndim);
    if (t->ndim < 2) { lua_settop(L, 1); return 1; }
    push_new(L, moe_tensor_transpose(t, 0, 1), "Tensor:t");
    return 1;
}

static int t_permute(lua_State *L) {
    const char *fn = "Tensor:permute";
    moe_tensor *t = check_meta(L, fn);
    int perm[MOE_MAX_DIMS];
    int n;
    if (lua_type(L, 2) == LUA_TTABLE) {
        n = (int)lua_objlen(L, 2);
        if (n != t->ndim) return moe_lua_errorf(L, "%s: expected %d dims, got %d", fn, t->ndim, n);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, 2, i + 1);
            perm[i] = moe_lua_dim_arg(L, -1, t->ndim, fn);
            lua_pop(L, 1);
        }
    } else {
        n = lua_gettop(L) - 1;
        if (n != t->ndim) return moe_lua_errorf(L, "%s: expected %d dims, got %d", fn, t->ndim, n);
        for (int i = 0; i < n; i++) perm[i] = moe_lua_dim_arg(L, 2 + i, t->ndim, fn);
    }
    push_new(L, moe_tensor_permute(t, perm), fn);
    return 1;
}

static int t_narrow(lua_State *L) {
    const char *fn = "Tensor:narrow";
    moe_tensor *t = check_meta(L, fn);
    int d = moe_lua_dim_arg(L, 2, t->ndim, fn);
    lua_Integer start = moe_lua_check_int(L, 3, fn, "start");
    lua_Integer len = moe_lua_check_int(L, 4, fn, "length");
    if (start < 1 || len < 0 || start - 1 + len > t->shape[d])
        return moe_lua_errorf(L, "%s: start %lld, length %lld do not fit dim %d of size %lld (start is 1-based)", fn,
                          (long long)start, (long long)len, d + 1, (long long)t->shape[d]);
    push_new(L, moe_tensor_narrow(t, d, start - 1, len), fn);
    return 1;
}

static int t_select(lua_State *L) {
    const char *fn = "Tensor:select";
    moe_tensor *t = check_meta(L, fn);
    int d = moe_lua_dim_arg(L, 2, t->ndim, fn);
    int64_t i = index_arg(L, 3, fn, d, t->shape[d]);
    push_new(L, moe_tensor_select(t, d, i), fn);
    return 1;
}

static int t_unsqueeze(lua_State *L) {
    const char *fn = "Tensor:unsqueeze";
    moe_tensor *t = check_meta(L, fn);
    if (t->ndim >= MOE_MAX_DIMS) return moe_lua_errorf(L, "%s: the tensor already has %d dims", fn, MOE_MAX_DIMS);
    int d = moe_lua_dim_arg(L, 2, t->ndim + 1, fn);
    push_new(L, moe_tensor_unsqueeze(t, d), fn);
    return 1;
}

static int t_squeeze(lua_State *L) {
    const char *fn = "Tensor:squeeze";
    moe_tensor *t = check_meta(L, fn);
    int only = lua_isnoneornil(L, 2) ? -1 : moe_lua_dim_arg(L, 2, t->ndim, fn);
    int64_t shape[MOE_MAX_DIMS], stride[MOE_MAX_DIMS];
    int nd = 0;
    for (int i = 0; i < t->ndim; i++) {
        if (t->shape[i] == 1 && (only < 0 || only == i)) continue;
        shape[nd] = t->shape[i];
        stride[nd++] = t->stride[i];
    }
    push_new(L, moe_tensor_from_storage(t->storage, t->offset, t->dtype, nd, shape, stride), fn);
    return 1;
}

static int t_expand(lua_State *L) {
    const char *fn = "Tensor:expand";
    moe_tensor *t = check_meta(L, fn);
    int64_t shape[MOE_MAX_DIMS];
    int nd = shape_infer_arg(L, 2, fn, shape);
    int lead = nd - t->ndim;
    for (int i = 0; i < nd; i++) {
        if (shape[i] != -1) continue;
        if (i < lead) return moe_lua_errorf(L, "%s: -1 is not allowed for a new leading dim (%d)", fn, i + 1);
        shape[i] = t->shape[i - lead];
    }
    push_new(L, moe_tensor_expand(t, nd, shape), fn);
    return 1;
}

/* ------------------------------------------------------------ mutation -- */

static int t_fill(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:fill", "self");
    double v = moe_lua_check_num(L, 2, "Tensor:fill", "value");
    moe_status s = t->device.type == MOE_CPU ? moe_tensor_fill_cpu(t, v) : moe_op_fill(moe_lua_ctx(L), t, v);
    moe_lua_check(L, s, "Tensor:fill");
    lua_settop(L, 1);
    return 1;
}

static int t_zero(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:zero", "self");
    moe_status s = t->device.type == MOE_CPU ? moe_tensor_fill_cpu(t, 0) : moe_op_fill(moe_lua_ctx(L), t, 0);
    moe_lua_check(L, s, "Tensor:zero");
    lua_settop(L, 1);
    return 1;
}

static int t_copy(lua_State *L) {
    moe_tensor *t = moe_lua_check_tensor_f(L, 1, "Tensor:copy", "self");
    moe_tensor *src = moe_lua_check_tensor_f(L, 2, "Tensor:copy", "src");
    moe_lua_check(L, moe_op_copy(moe_lua_ctx(L), t, src), "Tensor:copy");
    lua_settop(L, 1);
    return 1;
}

/* ---------------------------------------------------------- registration -- */

static const luaL_Reg methods[] = {
    {"shape", t_shape}, {"size", t_size}, {"stride", t_stride}, {"dim", t_dim}, {"numel", t_numel},
    {"dtype", t_dtype}, {"device", t_device}, {"is_contiguous", t_is_contiguous}, {"is_freed", t_is_freed}, {"index_bound", t_index_bound},
    {"get", t_get}, {"set", t_set}, {"get_flat", t_get_flat}, {"set_flat", t_set_flat}, {"item", t_item},
    {"to_table", t_to_table}, {"to", t_to}, {"float", t_float}, {"clone", t_clone}, {"contiguous", t_contiguous},
    {"view", t_view}, {"reshape", t_reshape}, {"transpose", t_transpose}, {"t", t_t}, {"permute", t_permute},
    {"narrow", t_narrow}, {"select", t_select}, {"unsqueeze", t_unsqueeze}, {"squeeze", t_squeeze},
    {"expand", t_expand}, {"fill", t_fill}, {"zero", t_zero}, {"copy", t_copy}, {"free", t_free},
    {NULL, NULL}
};

void moe_lua_open_tensor(lua_State *L) {
    int mod = lua_gettop(L);
    luaL_newmetatable(L, MOE_TENSOR_MT);
    int mt = lua_gettop(L);
    lua_pushcfunction(L, t_gc);
    lua_setfield(L, mt, "__gc");
    lua_pushcfunction(L, t_tostring);
    lua_setfield(L, mt, "__tostring");
    lua_pushcfunction(L, t_len);
    lua_setfield(L, mt, "__len");
    lua_newtable(L);
    int meth = lua_gettop(L);
    for (const luaL_Reg *r = methods; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, meth, r->name);
    }
    moe_lua_tensor_math_register(L, meth, mt, mod);
    lua_pushvalue(L, meth);
    lua_setfield(L, mt, "__index");
    lua_pushvalue(L, meth);
    lua_setfield(L, mod, "Tensor");
    moe_lua_tensor_open_constructors(L, mod);
    lua_settop(L, mod);
}
