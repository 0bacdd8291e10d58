/* moe.ops: the kernels of src/ops/ops.h as functions that allocate their
 * outputs, for gradient checks and advanced users. Outputs take the dtype and
 * device of the first float input. Index tensors are i64 holding 0-based ids.
 * Gradients that the engine accumulates (dw, db, dtable, scatter/index_add
 * destinations) start from zeros allocated here. Dims are 1-based. */
#include "lmoe.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

#define T(idx, fn, name) moe_lua_check_tensor_f(L, idx, fn, name)

static moe_tensor *new_out(lua_State *L, const moe_tensor *ref, int ndim, const int64_t *shape, const char *fn) {
    return moe_lua_new_tensor(L, ref->dtype, ndim, shape, ref->device, fn);
}

static moe_tensor *new_zeros(lua_State *L, const moe_tensor *ref, int ndim, const int64_t *shape, const char *fn) {
    return moe_lua_new_zeros(L, ref->dtype, ndim, shape, ref->device, fn);
}

static void need_dims(lua_State *L, const moe_tensor *t, int lo, int hi, const char *fn, const char *arg) {
    if (t->ndim < lo || t->ndim > hi) {
        char s[128];
        if (lo == hi) moe_lua_errorf(L, "%s: %s must have %d dims, got shape %s", fn, arg, lo, moe_shape_str(t, s, sizeof s));
        moe_lua_errorf(L, "%s: %s must have %d to %d dims, got shape %s", fn, arg, lo, hi, moe_shape_str(t, s, sizeof s));
    }
}

/* product of all dims but the last */
static int64_t rows_of(const moe_tensor *t) { return moe_shape_numel(t->ndim - 1, t->shape); }

/* The options table at idx: nil or a table. */
static void check_opts(lua_State *L, int idx, const char *fn) {
    if (!lua_isnoneornil(L, idx) && !lua_istable(L, idx))
        moe_lua_errorf(L, "%s: options must be a table, got %s", fn, luaL_typename(L, idx));
}

/* ---------------------------------------------------------------- GEMM -- */

static int o_gemm(lua_State *L) {
    const char *fn = "ops.gemm";
    moe_tensor *a = T(1, fn, "a"), *b = T(2, fn, "b");
    check_opts(L, 3, fn);
    int ta = moe_lua_opt_field_bool(L, 3, "transa", 0, fn), tb = moe_lua_opt_field_bool(L, 3, "transb", 0, fn);
    float alpha = (float)moe_lua_opt_field_num(L, 3, "alpha", 1.0, fn);
    need_dims(L, a, 2, 3, fn, "a");
    need_dims(L, b, 2, 3, fn, "b");
    int64_t M = ta ? a->shape[a->ndim - 1] : a->shape[a->ndim - 2];
    int64_t N = tb ? b->shape[b->ndim - 2] : b->shape[b->ndim - 1];
    int64_t shape[3];
    int nd = 0;
    if (a->ndim == 3) shape[nd++] = a->shape[0];
    else if (b->ndim == 3) shape[nd++] = b->shape[0];
    shape[nd++] = M;
    shape[nd++] = N;
    moe_tensor *c = new_zeros(L, a, nd, shape, fn);
    moe_lua_check(L, moe_op_gemm(moe_lua_ctx(L), ta, tb, alpha, a, b, 0.0f, c), fn);
    return 1;
}

/* offsets table {0, o1, ..., M} -> host array; returns the group count */
static int offsets_arg(lua_State *L, int idx, const char *fn, int64_t **out) {
    if (lua_type(L, idx) != LUA_TTABLE)
        moe_lua_errorf(L, "%s: offsets must be a table of G+1 integers, got %s", fn,
                   moe_lua_is_tensor(L, idx) ? "tensor" : luaL_typename(L, idx));
    int n = (int)lua_objlen(L, idx);
    if (n < 2) moe_lua_errorf(L, "%s: offsets must hold at least 2 values (G+1 for G groups), got %d", fn, n);
    int64_t *o = lua_newuserdata(L, sizeof(int64_t) * (size_t)n);   /* freed by the GC */
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, i);
        char what[48];
        snprintf(what, sizeof what, "offsets[%d]", i);
        o[i - 1] = (int64_t)moe_lua_check_int(L, -1, fn, what);
        lua_pop(L, 1);
    }
    *out = o;
    return n - 1;
}

/* The output of a grouped GEMM, pushed: opts.out (the table at opts, may be
 * nil) written in place, e.g. to time the GEMM alone, which may not share
 * storage with an input (the GEMM would read what it writes); else new zeros. */
static moe_tensor *out_or_zeros(lua_State *L, int opts, const char *fn, const moe_tensor *a, const moe_tensor *b,
                                int ndim, const int64_t *shape) {
    if (lua_istable(L, opts)) lua_getfield(L, opts, "out");
    else lua_pushnil(L);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        return new_zeros(L, a, ndim, shape, fn);
    }
    moe_tensor *c = T(-1, fn, "out");
    if (c->storage == a->storage || c->storage == b->storage)
        moe_lua_errorf(L, "%s: out shares storage with an input (the GEMM would read what it writes)", fn);
    return c;
}

/* gemm_grouped(a, b, offsets[, opts]): offsets a table of G + 1 integers, or an
 * i64 tensor of them on a's device (moe_op_gemm_grouped_dev: read there where
 * the backend can) */
static int o_gemm_grouped(lua_State *L) {
    const char *fn = "ops.gemm_grouped";
    lua_settop(L, 4);   /* offsets_arg pushes a buffer: keep it past the arguments */
    moe_tensor *a = T(1, fn, "a"), *b = T(2, fn, "b");
    int64_t *off = NULL;
    moe_tensor *ot = moe_lua_is_tensor(L, 3) ? T(3, fn, "offsets") : NULL;
    int groups = ot ? (int)(ot->ndim == 1 && ot->shape[0] > 1 ? ot->shape[0] - 1 : 0) : offsets_arg(L, 3, fn, &off);
    check_opts(L, 4, fn);
    int tb = moe_lua_opt_field_bool(L, 4, "transb", 0, fn);
    float alpha = (float)moe_lua_opt_field_num(L, 4, "alpha", 1.0, fn);
    need_dims(L, a, 2, 2, fn, "a");
    need_dims(L, b, 3, 3, fn, "b");
    int64_t shape[2] = {a->shape[0], tb ? b->shape[1] : b->shape[2]};
    moe_tensor *c = out_or_zeros(L, 4, fn, a, b, 2, shape);
    moe_lua_check(L, ot ? moe_op_gemm_grouped_dev(moe_lua_ctx(L), tb, alpha, a, b, 0.0f, c, ot)
                        : moe_op_gemm_grouped(moe_lua_ctx(L), tb, alpha, a, b, 0.0f, c, off, groups), fn);
    return 1;
}

/* gemm_grouped_swiglu(x, wg, wu, offsets) -> g, u, h: the experts' gate and up
 * projections (wg, wu [G, I, K], as the expert bank stores them) and the
 * SwiGLU activation, one launch where the backend fuses them */
static int o_gemm_grouped_swiglu(lua_State *L) {
    const char *fn = "ops.gemm_grouped_swiglu";
    lua_settop(L, 4);   /* offsets_arg pushes a buffer: keep it past the arguments */
    moe_tensor *x = T(1, fn, "x"), *wg = T(2, fn, "wg"), *wu = T(3, fn, "wu");
    int64_t *off;
    int groups = offsets_arg(L, 4, fn, &off);
    need_dims(L, x, 2, 2, fn, "x");
    need_dims(L, wg, 3, 3, fn, "wg");
    int64_t shape[2] = {x->shape[0], wg->shape[1]};
    moe_tensor *g = new_out(L, x, 2, shape, fn), *u = new_out(L, x, 2, shape, fn), *h = new_out(L, x, 2, shape, fn);
    moe_lua_check(L, moe_op_gemm_grouped_swiglu(moe_lua_ctx(L), x, wg, wu, g, u, h, off, groups), fn);
    return 3;
}

/* gemm_grouped_wgrad(a, b, offsets[, groups][, opts]): offsets as gemm_grouped's */
static int o_gemm_grouped_wgrad(lua_State *L) {
    const char *fn = "ops.gemm_grouped_wgrad";
    lua_settop(L, 5);   /* offsets_arg pushes a buffer: keep it past the arguments */
    moe_tensor *a = T(1, fn, "a"), *b = T(2, fn, "b");
    int64_t *off = NULL;
    moe_tensor *ot = moe_lua_is_tensor(L, 3) ? T(3, fn, "offsets") : NULL;
    int groups = ot ? (int)(ot->ndim == 1 && ot->shape[0] > 1 ? ot->shape[0] - 1 : 0) : offsets_arg(L, 3, fn, &off);
    if (!lua_isnoneornil(L, 4)) {
        lua_Integer g = moe_lua_check_int(L, 4, fn, "groups");
        if (g != groups) return moe_lua_errorf(L, "%s: groups is %lld but offsets describe %d groups", fn, (long long)g, groups);
    }
    need_dims(L, a, 2, 2, fn, "a");
    need_dims(L, b, 2, 2, fn, "b");
    int64_t shape[3] = {groups, a->shape[1], b->shape[1]};
    check_opts(L, 5, fn);
    moe_tensor *c = out_or_zeros(L, 5, fn, a, b, 3, shape);
    moe_lua_check(L, ot ? moe_op_gemm_grouped_wgrad_dev(moe_lua_ctx(L), 1.0f, a, b, 0.0f, c, ot)
                        : moe_op_gemm_grouped_wgrad(moe_lua_ctx(L), 1.0f, a, b, 0.0f, c, off, groups), fn);
    return 1;
}

/* --------------------------------------------------------- elementwise -- */

static const struct { const char *name; moe_unary_op op; int needs_alpha; } unary_names[] = {
    {"neg", MOE_UN_NEG, 0}, {"exp", MOE_UN_EXP, 0}, {"log", MOE_UN_LOG, 0}, {"sqrt", MOE_UN_SQRT, 0},
    {"rsqrt", MOE_UN_RSQRT, 0}, {"abs", MOE_UN_ABS, 0}, {"tanh", MOE_UN_TANH, 0},
    {"sigmoid", MOE_UN_SIGMOID, 0}, {"relu", MOE_UN_RELU, 0}, {"silu", MOE_UN_SILU, 0},
    {"gelu", MOE_UN_GELU, 0}, {"gelu_erf", MOE_UN_GELU_ERF, 0}, {"square", MOE_UN_SQUARE, 0},
    {"scale", MOE_UN_SCALE, 1}, {"add_scalar", MOE_UN_ADD_SCALAR, 1}, {"pow", MOE_UN_POW_SCALAR, 1},
    {"pow_scalar", MOE_UN_POW_SCALAR, 1},
};

static moe_unary_op unary_arg(lua_State *L, int idx, const char *fn, int *needs_alpha) {
    if (lua_type(L, idx) != LUA_TSTRING)
        moe_lua_errorf(L, "%s: name must be a string (neg, exp, log, sqrt, rsqrt, abs, tanh, sigmoid, relu, silu, gelu, "
                   "gelu_erf, square, scale, add_scalar, pow), got %s", fn, luaL_typename(L, idx));
    const char *s = lua_tostring(L, idx);
    for (size_t i = 0; i < sizeof unary_names / sizeof unary_names[0]; i++)
        if (!strcmp(s, unary_names[i].name)) { *needs_alpha = unary_names[i].needs_alpha; return unary_names[i].op; }
    moe_lua_errorf(L, "%s: unknown unary op '%s' (expected neg, exp, log, sqrt, rsqrt, abs, tanh, sigmoid, relu, silu, "
               "gelu, gelu_erf, square, scale, add_scalar or pow)", fn, s);
    return MOE_UN_NEG;
}

static float alpha_arg(lua_State *L, int idx, int needs, const char *opname, const char *fn) {
    if (lua_isnoneornil(L, idx)) {
        if (needs) moe_lua_errorf(L, "%s: alpha is required for '%s'", fn, opname);
        return 0.0f;
    }
    return (float)moe_lua_check_num(L, idx, fn, "alpha");
}

static int o_unary(lua_State *L) {
    const char *fn = "ops.unary";
    int needs;
    moe_unary_op op = unary_arg(L, 1, fn, &needs);
    moe_tensor *x = T(2, fn, "x");
    float alpha = alpha_arg(L, 3, needs, lua_tostring(L, 1), fn);
    moe_tensor *y = new_out(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_unary(moe_lua_ctx(L), op, y, x, alpha), fn);
    return 1;
}

static int o_unary_backward(lua_State *L) {
    const char *fn = "ops.unary_backward";
    int needs;
    moe_unary_op op = unary_arg(L, 1, fn, &needs);
    moe_tensor *dy = T(2, fn, "dy"), *x = T(3, fn, "x");
    float alpha = alpha_arg(L, 4, needs, lua_tostring(L, 1), fn);
    moe_tensor *dx = new_out(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_unary_backward(moe_lua_ctx(L), op, dx, dy, x, alpha), fn);
    return 1;
}

static int o_binary(lua_State *L) {
    const char *fn = "ops.binary";
    static const char *names[] = {"add", "sub", "mul", "div", "max", "min"};
    if (lua_type(L, 1) != LUA_TSTRING)
        return moe_lua_errorf(L, "%s: name must be a string (add, sub, mul, div, max, min), got %s", fn, luaL_typename(L, 1));
    const char *s = lua_tostring(L, 1);
    int op = -1;
    for (int i = 0; i < MOE_NUM_BINARY; i++) if (!strcmp(s, names[i])) op = i;
    if (op < 0) return moe_lua_errorf(L, "%s: unknown binary op '%s' (expected add, sub, mul, div, max or min)", fn, s);
    moe_tensor *a = T(2, fn, "a"), *b = T(3, fn, "b");
    int nd;
    int64_t shape[MOE_MAX_DIMS];
    moe_lua_check(L, moe_broadcast_shape(a, b, &nd, shape), fn);
    moe_tensor *out = new_out(L, a, nd, shape, fn);
    moe_lua_check(L, moe_op_binary(moe_lua_ctx(L), (moe_binary_op)op, out, a, b), fn);
    return 1;
}

static int o_sum_to(lua_State *L) {
    const char *fn = "ops.sum_to";
    moe_tensor *g = T(1, fn, "g");
    int64_t shape[MOE_MAX_DIMS];
    int nd;
    if (moe_lua_is_tensor(L, 2)) {
        moe_tensor *like = T(2, fn, "shape");
        nd = like->ndim;
        memcpy(shape, like->shape, sizeof shape);
    } else {
        if (lua_isnoneornil(L, 2)) return moe_lua_errorf(L, "%s: shape is required (a table of sizes or a tensor)", fn);
        nd = moe_lua_check_shape(L, 2, fn, shape);
    }
    moe_tensor *out = new_out(L, g, nd, shape, fn);
    moe_lua_check(L, moe_op_sum_to(moe_lua_ctx(L), out, g), fn);
    return 1;
}

static int o_axpy(lua_State *L) {
    const char *fn = "ops.axpy";
    moe_tensor *y = T(1, fn, "y");
    float alpha = (float)moe_lua_check_num(L, 2, fn, "alpha");
    moe_tensor *x = T(3, fn, "x");
    moe_lua_check(L, moe_op_axpy(moe_lua_ctx(L), y, alpha, x), fn);
    lua_settop(L, 1);
    return 1;
}

static int o_reduce(lua_State *L) {
    const char *fn = "ops.reduce";
    static const char *names[] = {"sum", "mean", "max", "min"};
    if (lua_type(L, 1) != LUA_TSTRING)
        return moe_lua_errorf(L, "%s: name must be a string (sum, mean, max, min), got %s", fn, luaL_typename(L, 1));
    const char *s = lua_tostring(L, 1);
    int op = -1;
    for (int i = 0; i < MOE_NUM_REDUCE; i++) if (!strcmp(s, names[i])) op = i;
    if (op < 0) return moe_lua_errorf(L, "%s: unknown reduction '%s' (expected sum, mean, max or min)", fn, s);
    moe_tensor *x = T(2, fn, "x");
    if (lua_isnoneornil(L, 3)) {
        moe_tensor *out = new_out(L, x, 0, NULL, fn);
        moe_lua_check(L, moe_op_reduce_all(moe_lua_ctx(L), (moe_reduce_op)op, out, x), fn);
        return 1;
    }
    int d = moe_lua_dim_arg(L, 3, x->ndim, fn);
    int64_t shape[MOE_MAX_DIMS];
    int nd = 0;
    for (int i = 0; i < x->ndim; i++) if (i != d) shape[nd++] = x->shape[i];
    moe_tensor *out = new_out(L, x, nd, shape, fn);
    moe_lua_check(L, moe_op_reduce(moe_lua_ctx(L), (moe_reduce_op)op, out, x, d), fn);
    return 1;
}

/* ops.sumsq(x) -> a 0-dim f32 tensor on x's device: the sum of x's squares
 * (accumulated in f64), without reading it back to the host */
static int o_sumsq(lua_State *L) {
    const char *fn = "ops.sumsq";
    moe_tensor *x = T(1, fn, "x");
    moe_tensor *out = moe_lua_new_tensor(L, MOE_F32, 0, NULL, x->device, fn);
    moe_lua_check(L, moe_op_sumsq(moe_lua_ctx(L), out, x), fn);
    return 1;
}

/* ------------------------------------------------------------- softmax -- */

static int o_softmax(lua_State *L) {
    const char *fn = "ops.softmax";
    moe_tensor *x = T(1, fn, "x");
    moe_tensor *y = new_out(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_softmax(moe_lua_ctx(L), y, x), fn);
    return 1;
}

static int o_softmax_backward(lua_State *L) {
    const char *fn = "ops.softmax_backward";
    moe_tensor *dy = T(1, fn, "dy"), *y = T(2, fn, "y");
    moe_tensor *dx = new_out(L, y, y->ndim, y->shape, fn);
    moe_lua_check(L, moe_op_softmax_backward(moe_lua_ctx(L), dx, dy, y), fn);
    return 1;
}

static int o_log_softmax(lua_State *L) {
    const char *fn = "ops.log_softmax";
    moe_tensor *x = T(1, fn, "x");
    moe_tensor *y = new_out(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_log_softmax(moe_lua_ctx(L), y, x), fn);
    return 1;
}

static int o_log_softmax_backward(lua_State *L) {
    const char *fn = "ops.log_softmax_backward";
    moe_tensor *dy = T(1, fn, "dy"), *y = T(2, fn, "y");
    moe_tensor *dx = new_out(L, y, y->ndim, y->shape, fn);
    moe_lua_check(L, moe_op_log_softmax_backward(moe_lua_ctx(L), dx, dy, y), fn);
    return 1;
}

static int o_logsumexp(lua_State *L) {
    const char *fn = "ops.logsumexp";
    moe_tensor *x = T(1, fn, "x");
    need_dims(L, x, 1, MOE_MAX_DIMS, fn, "x");
    moe_tensor *y = new_out(L, x, x->ndim - 1, x->shape, fn);
    moe_lua_check(L, moe_op_logsumexp(moe_lua_ctx(L), y, x), fn);
    return 1;
}

/* ---------------------------------------------------------- selection -- */

static int o_topk(lua_State *L) {
    const char *fn = "ops.topk";
    moe_tensor *x = T(1, fn, "x");
    lua_Integer k = moe_lua_check_int(L, 2, fn, "k");
    need_dims(L, x, 1, MOE_MAX_DIMS, fn, "x");
    if (k < 1 || k > x->shape[x->ndim - 1])
        return moe_lua_errorf(L, "%s: k must be in 1..%lld (the size of the last dim), got %lld", fn,
                          (long long)x->shape[x->ndim - 1], (long long)k);
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = k;
    moe_tensor *v = new_out(L, x, x->ndim, shape, fn);
    moe_tensor *i = moe_lua_new_tensor(L, MOE_I64, x->ndim, shape, x->device, fn);
    moe_lua_check(L, moe_op_topk(moe_lua_ctx(L), v, i, x, (int)k), fn);
    return 2;
}

static int o_gather(lua_State *L) {
    const char *fn = "ops.gather";
    moe_tensor *x = T(1, fn, "x"), *index = T(2, fn, "index");
    moe_tensor *out = new_out(L, x, index->ndim, index->shape, fn);
    moe_lua_check(L, moe_op_gather(moe_lua_ctx(L), out, x, index), fn);
    return 1;
}

/* The destination of scatter_add / index_add: a shape (zeros) or a tensor
 * whose values are the starting point (it is not modified). */
static moe_tensor *dst_arg(lua_State *L, int idx, const moe_tensor *src, const char *fn) {
    if (moe_lua_is_tensor(L, idx)) {
        moe_tensor *d = T(idx, fn, "dst");
        moe_tensor *c = moe_lua_new_tensor(L, d->dtype, d->ndim, d->shape, d->device, fn);
        moe_lua_check(L, moe_op_copy(moe_lua_ctx(L), c, d), fn);
        return c;
    }
    if (lua_type(L, idx) != LUA_TTABLE)
        moe_lua_errorf(L, "%s: dst must be a shape table or a tensor, got %s", fn, luaL_typename(L, idx));
    int64_t shape[MOE_MAX_DIMS];
    int nd = moe_lua_check_shape(L, idx, fn, shape);
    return new_zeros(L, src, nd, shape, fn);
}

static int o_scatter_add(lua_State *L) {
    const char *fn = "ops.scatter_add";
    moe_tensor *index = T(2, fn, "index"), *src = T(3, fn, "src");
    moe_tensor *dst = dst_arg(L, 1, src, fn);
    moe_lua_check(L, moe_op_scatter_add(moe_lua_ctx(L), dst, index, src), fn);
    return 1;
}

/* index_select(x, index[, slots [N, k] i32]): with the router's slot map a
 * device may write the rows by token (ops.h index_select_slots) */
static int o_index_select(lua_State *L) {
    const char *fn = "ops.index_select";
    moe_tensor *x = T(1, fn, "x"), *index = T(2, fn, "index");
    moe_tensor *slots = moe_lua_opt_tensor_f(L, 3, fn, "slots");
    need_dims(L, x, 1, MOE_MAX_DIMS, fn, "x");
    need_dims(L, index, 1, 1, fn, "index");
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[0] = index->shape[0];
    moe_tensor *out = new_out(L, x, x->ndim, shape, fn);
    moe_lua_check(L, moe_op_index_select_slots(moe_lua_ctx(L), out, x, index, slots), fn);
    return 1;
}

static int o_index_add(lua_State *L) {
    const char *fn = "ops.index_add";
    moe_tensor *index = T(2, fn, "index"), *src = T(3, fn, "src");
    moe_tensor *dst = dst_arg(L, 1, src, fn);
    moe_lua_check(L, moe_op_index_add(moe_lua_ctx(L), dst, index, src), fn);
    return 1;
}

static int o_embedding(lua_State *L) {
    const char *fn = "ops.embedding";
    moe_tensor *table = T(1, fn, "table"), *ids = T(2, fn, "ids");
    need_dims(L, table, 2, 2, fn, "table");
    need_dims(L, ids, 0, MOE_MAX_DIMS - 1, fn, "ids");
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, ids->shape, sizeof(int64_t) * (size_t)ids->ndim);
    shape[ids->ndim] = table->shape[1];
    moe_tensor *out = new_out(L, table, ids->ndim + 1, shape, fn);
    moe_lua_check(L, moe_op_embedding(moe_lua_ctx(L), out, table, ids), fn);
    return 1;
}

static int o_embedding_backward(lua_State *L) {
    const char *fn = "ops.embedding_backward";
    moe_tensor *dout = T(1, fn, "dout"), *ids = T(2, fn, "ids");
    lua_Integer vocab = moe_lua_check_int(L, 3, fn, "vocab");
    if (vocab < 1) return moe_lua_errorf(L, "%s: vocab must be positive, got %lld", fn, (long long)vocab);
    need_dims(L, dout, 1, MOE_MAX_DIMS, fn, "dout");
    int64_t shape[2] = {vocab, dout->shape[dout->ndim - 1]};
    moe_tensor *dt = new_zeros(L, dout, 2, shape, fn);
    moe_lua_check(L, moe_op_embedding_backward(moe_lua_ctx(L), dt, dout, ids), fn);
    return 1;
}

/* ------------------------------------------------------- normalisation -- */

static float eps_arg(lua_State *L, int idx, const char *fn) {
    if (lua_isnoneornil(L, idx)) return 1e-5f;
    double e = moe_lua_check_num(L, idx, fn, "eps");
    if (!(e >= 0)) moe_lua_errorf(L, "%s: eps must be >= 0, got %g", fn, e);
    return (float)e;
}

static int o_rmsnorm(lua_State *L) {
    const char *fn = "ops.rmsnorm";
    moe_tensor *x = T(1, fn, "x"), *w = T(2, fn, "w");
    float eps = eps_arg(L, 3, fn);
    need_dims(L, x, 1, MOE_MAX_DIMS, fn, "x");
    int64_t rows = rows_of(x);
    moe_tensor *y = new_out(L, x, x->ndim, x->shape, fn);
    moe_tensor *rstd = new_out(L, x, 1, &rows, fn);
    moe_lua_check(L, moe_op_rmsnorm(moe_lua_ctx(L), y, rstd, x, w, eps), fn);
    return 2;
}

static int o_rmsnorm_backward(lua_State *L) {
    const char *fn = "ops.rmsnorm_backward";
    moe_tensor *dy = T(1, fn, "dy"), *x = T(2, fn, "x"), *w = T(3, fn, "w"), *rstd = T(4, fn, "rstd");
    moe_tensor *dx = new_out(L, x, x->ndim, x->shape, fn);
    moe_tensor *dw = new_zeros(L, w, w->ndim, w->shape, fn);
    moe_lua_check(L, moe_op_rmsnorm_backward(moe_lua_ctx(L), dx, dw, dy, x, w, rstd), fn);
    return 2;
}

static int o_layernorm(lua_State *L) {
    const char *fn = "ops.layernorm";
    moe_tensor *x = T(1, fn, "x"), *w = T(2, fn, "w");
    moe_tensor *b = moe_lua_opt_tensor_f(L, 3, fn, "b");
    float eps = eps_arg(L, 4, fn);
    need_dims(L, x, 1, MOE_MAX_DIMS, fn, "x");
    int64_t rows = rows_of(x);
    moe_tensor *y = new_out(L, x, x->ndim, x->shape, fn);
    moe_tensor *mean = new_out(L, x, 1, &rows, fn);
    moe_tensor *rstd = new_out(L, x, 1, &rows, fn);
    moe_lua_check(L, moe_op_layernorm(moe_lua_ctx(L), y, mean, rstd, x, w, b, eps), fn);
    return 3;
}

static int o_layernorm_backward(lua_State *L) {
    const char *fn = "ops.layernorm_backward";
    moe_tensor *dy = T(1, fn, "dy"), *x = T(2, fn, "x"), *w = T(3, fn, "w");
    moe_tensor *mean = T(4, fn, "mean"), *rstd = T(5, fn, "rstd");
    moe_tensor *dx = new_out(L, x, x->ndim, x->shape, fn);
    moe_tensor *dw = new_zeros(L, w, w->ndim, w->shape, fn);
    moe_tensor *db = new_zeros(L, w, w->ndim, w->shape, fn);
    moe_lua_check(L, moe_op_layernorm_backward(moe_lua_ctx(L), dx, dw, db, dy, x, w, mean, rstd), fn);
    return 3;
}

/* -------------------------------------------------- rope and attention -- */

static int o_rope(lua_State *L) {
    const char *fn = "ops.rope";
    moe_tensor *x = T(1, fn, "x");
    check_opts(L, 2, fn);
    lua_Integer pos = moe_lua_opt_field_int(L, 2, "pos_offset", 0, fn);
    double theta = moe_lua_opt_field_num(L, 2, "theta", 10000.0, fn);
    int inverse = moe_lua_opt_field_bool(L, 2, "inverse", 0, fn);
    if (pos < 0) return moe_lua_errorf(L, "%s: option 'pos_offset' must be >= 0, got %lld", fn, (long long)pos);
    if (!(theta > 0)) return moe_lua_errorf(L, "%s: option 'theta' must be > 0, got %g", fn, theta);
    moe_tensor *out = new_out(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_rope(moe_lua_ctx(L), out, x, pos, (float)theta, inverse), fn);
    return 1;
}

static void attn_opts(lua_State *L, int idx, const moe_tensor *q, float *scale, int *causal, const char *fn) {
    check_opts(L, idx, fn);
    double d = q->ndim == 4 && q->shape[3] > 0 ? (double)q->shape[3] : 1.0;
    *scale = (float)moe_lua_opt_field_num(L, idx, "scale", 1.0 / sqrt(d), fn);
    *causal = moe_lua_opt_field_bool(L, idx, "causal", 0, fn);
}

static int o_attention(lua_State *L) {
    const char *fn = "ops.attention";
    moe_tensor *q = T(1, fn, "q"), *k = T(2, fn, "k"), *v = T(3, fn, "v");
    float scale;
    int causal;
    attn_opts(L, 4, q, &scale, &causal, fn);
    need_dims(L, q, 4, 4, fn, "q");
    int64_t lshape[3] = {q->shape[0], q->shape[2], q->shape[1]};
    moe_tensor *out = new_out(L, q, 4, q->shape, fn);
    moe_tensor *lse = new_out(L, q, 3, lshape, fn);
    moe_lua_check(L, moe_op_attention(moe_lua_ctx(L), out, lse, q, k, v, scale, causal), fn);
    return 2;
}

static int o_attention_backward(lua_State *L) {
    const char *fn = "ops.attention_backward";
    moe_tensor *dout = T(1, fn, "dout"), *q = T(2, fn, "q"), *k = T(3, fn, "k"), *v = T(4, fn, "v");
    moe_tensor *out = T(5, fn, "out"), *lse = T(6, fn, "lse");
    float scale;
    int causal;
    attn_opts(L, 7, q, &scale, &causal, fn);
    moe_tensor *dq = new_out(L, q, q->ndim, q->shape, fn);
    moe_tensor *dk = new_out(L, k, k->ndim, k->shape, fn);
    moe_tensor *dv = new_out(L, v, v->ndim, v->shape, fn);
    moe_lua_check(L, moe_op_attention_backward(moe_lua_ctx(L), dq, dk, dv, dout, q, k, v, out, lse, scale, causal), fn);
    return 3;
}

/* ------------------------------------------------------ swiglu and loss -- */

static int o_swiglu(lua_State *L) {
    const char *fn = "ops.swiglu";
    moe_tensor *gate = T(1, fn, "gate"), *up = T(2, fn, "up");
    moe_tensor *out = new_out(L, gate, gate->ndim, gate->shape, fn);
    moe_lua_check(L, moe_op_swiglu(moe_lua_ctx(L), out, gate, up), fn);
    return 1;
}

static int o_swiglu_backward(lua_State *L) {
    const char *fn = "ops.swiglu_backward";
    moe_tensor *dout = T(1, fn, "dout"), *gate = T(2, fn, "gate"), *up = T(3, fn, "up");
    moe_tensor *dg = new_out(L, gate, gate->ndim, gate->shape, fn);
    moe_tensor *du = new_out(L, up, up->ndim, up->shape, fn);
    moe_lua_check(L, moe_op_swiglu_backward(moe_lua_ctx(L), dg, du, dout, gate, up), fn);
    return 2;
}

static int o_cross_entropy(lua_State *L) {
    const char *fn = "ops.cross_entropy";
    moe_tensor *logits = T(1, fn, "logits"), *targets = T(2, fn, "targets");
    check_opts(L, 3, fn);
    int64_t ignore = moe_lua_opt_field_int(L, 3, "ignore_index", -100, fn);
    need_dims(L, logits, 1, MOE_MAX_DIMS, fn, "logits");
    int64_t rows = rows_of(logits);
    moe_tensor *loss = new_out(L, logits, 1, &rows, fn);
    moe_tensor *lse = new_out(L, logits, 1, &rows, fn);
    moe_lua_check(L, moe_op_cross_entropy(moe_lua_ctx(L), loss, lse, logits, targets, ignore), fn);
    return 2;
}

static int o_cross_entropy_backward(lua_State *L) {
    const char *fn = "ops.cross_entropy_backward";
    moe_tensor *logits = T(1, fn, "logits"), *lse = T(2, fn, "lse"), *targets = T(3, fn, "targets");
    check_opts(L, 4, fn);
    int64_t ignore = moe_lua_opt_field_int(L, 4, "ignore_index", -100, fn);
    float scale = (float)moe_lua_opt_field_num(L, 4, "scale", 1.0, fn);
    moe_tensor *dl = new_out(L, logits, logits->ndim, logits->shape, fn);
    moe_lua_check(L, moe_op_cross_entropy_backward(moe_lua_ctx(L), dl, logits, lse, targets, ignore, scale), fn);
    return 1;
}

/* ----------------------------------------------------------- optimiser -- */

static int o_adamw(lua_State *L) {
    const char *fn = "ops.adamw";
    moe_tensor *p = T(1, fn, "params"), *g = T(2, fn, "grads"), *m = T(3, fn, "m"), *v = T(4, fn, "v");
    check_opts(L, 5, fn);
    moe_adamw_cfg cfg = {0};
    cfg.lr = (float)moe_lua_opt_field_num(L, 5, "lr", 1e-3, fn);
    cfg.beta1 = (float)moe_lua_opt_field_num(L, 5, "beta1", 0.9, fn);
    cfg.beta2 = (float)moe_lua_opt_field_num(L, 5, "beta2", 0.999, fn);
    cfg.eps = (float)moe_lua_opt_field_num(L, 5, "eps", 1e-8, fn);
    cfg.weight_decay = (float)moe_lua_opt_field_num(L, 5, "weight_decay", 0.0, fn);
    cfg.step = moe_lua_opt_field_int(L, 5, "step", 1, fn);
    if (cfg.step < 1) return moe_lua_errorf(L, "%s: option 'step' counts from 1, got %lld", fn, (long long)cfg.step);
    /* bf16 m and v: the index of element 0 in a larger buffer (their rounding's random bits) */
    cfg.index0 = moe_lua_opt_field_int(L, 5, "index0", 0, fn);
    if (lua_istable(L, 5)) {   /* compute = tensor: the low-precision copy written in the same pass */
        lua_getfield(L, 5, "compute");
        if (!lua_isnil(L, -1)) cfg.compute = T(lua_gettop(L), fn, "option 'compute'");
        lua_pop(L, 1);
    }
    moe_lua_check(L, moe_op_adamw(moe_lua_ctx(L), p, g, m, v, &cfg), fn);
    lua_settop(L, 1);
    return 1;
}

/* ------------------------------------------------- MoE token movement -- */

/* gather_sum(src [A, H], w [A] or nil, slots [N, k] i32[, base [N, H]]) -> y [N, H] (+ base) */
static int o_gather_sum(lua_State *L) {
    const char *fn = "ops.gather_sum";
    moe_tensor *src = T(1, fn, "src"), *w = moe_lua_opt_tensor_f(L, 2, fn, "w"), *slots = T(3, fn, "slots");
    moe_tensor *base = moe_lua_opt_tensor_f(L, 4, fn, "base");
    need_dims(L, src, 2, 2, fn, "src");
    need_dims(L, slots, 2, 2, fn, "slots");
    int64_t shape[2] = {slots->shape[0], src->shape[1]};
    moe_tensor *y = new_out(L, src, 2, shape, fn);
    moe_lua_check(L, moe_op_gather_sum_add(moe_lua_ctx(L), y, base, src, w, slots), fn);
    return 1;
}

/* combine_backward(dy [N, H], src [A, H], w [A], token_idx [A] i64[, slots [N, k] i32]) -> dsrc [A, H], dw [A] */
static int o_combine_backward(lua_State *L) {
    const char *fn = "ops.combine_backward";
    moe_tensor *dy = T(1, fn, "dy"), *src = T(2, fn, "src"), *w = T(3, fn, "w"), *tok = T(4, fn, "token_idx");
    moe_tensor *slots = moe_lua_opt_tensor_f(L, 5, fn, "slots");
    need_dims(L, src, 2, 2, fn, "src");
    moe_tensor *dsrc = new_out(L, src, 2, src->shape, fn);
    moe_tensor *dw = new_out(L, src, 1, src->shape, fn);
    moe_lua_check(L, moe_op_combine_backward_slots(moe_lua_ctx(L), dsrc, dw, dy, src, w, tok, slots), fn);
    return 2;
}

static const luaL_Reg ops_funcs[] = {
    {"gemm", o_gemm}, {"gemm_grouped", o_gemm_grouped}, {"gemm_grouped_wgrad", o_gemm_grouped_wgrad},
    {"gemm_grouped_swiglu", o_gemm_grouped_swiglu},
    {"unary", o_unary}, {"unary_backward", o_unary_backward}, {"binary", o_binary}, {"sum_to", o_sum_to},
    {"axpy", o_axpy}, {"reduce", o_reduce}, {"sumsq", o_sumsq},
    {"softmax", o_softmax}, {"softmax_backward", o_softmax_backward}, {"log_softmax", o_log_softmax},
    {"log_softmax_backward", o_log_softmax_backward}, {"logsumexp", o_logsumexp},
    {"topk", o_topk}, {"gather", o_gather}, {"scatter_add", o_scatter_add}, {"index_select", o_index_select},
    {"index_add", o_index_add}, {"embedding", o_embedding}, {"embedding_backward", o_embedding_backward},
    {"rmsnorm", o_rmsnorm}, {"rmsnorm_backward", o_rmsnorm_backward}, {"layernorm", o_layernorm},
    {"layernorm_backward", o_layernorm_backward}, {"rope", o_rope}, {"attention", o_attention},
    {"attention_backward", o_attention_backward}, {"swiglu", o_swiglu}, {"swiglu_backward", o_swiglu_backward},
    {"cross_entropy", o_cross_entropy}, {"cross_entropy_backward", o_cross_entropy_backward}, {"adamw", o_adamw},
    {"gather_sum", o_gather_sum}, {"combine_backward", o_combine_backward},
    {NULL, NULL}
};

void moe_lua_open_ops(lua_State *L) {
    lua_newtable(L);
    for (const luaL_Reg *r = ops_funcs; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
    lua_setfield(L, -2, "ops");
}
