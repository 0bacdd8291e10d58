/* Tensor arithmetic, reductions, softmax, top-k, comparisons, matmul and the
 * operator metamethods. Every result is a new tensor on the device and dtype
 * of the tensor operand; the math itself is moe_op_* (src/ops). */
#include "lmoe.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static moe_tensor *self_arg(lua_State *L, const char *fn) { return moe_lua_check_tensor_f(L, 1, fn, "self"); }

static moe_tensor *out_like(lua_State *L, const moe_tensor *ref, int ndim, const int64_t *shape, const char *fn) {
    return moe_lua_new_tensor(L, ref->dtype, ndim, shape, ref->device, fn);
}

/* A 0-dim tensor holding v, with t's dtype and device (left on the stack). */
static moe_tensor *scalar_like(lua_State *L, const moe_tensor *t, double v, const char *fn) {
    moe_tensor *s = moe_lua_new_tensor(L, t->dtype, 0, NULL, t->device, fn);
    moe_lua_check(L, moe_op_fill(moe_lua_ctx(L), s, v), fn);
    return s;
}

/* ---------------------------------------------------------- elementwise -- */

static int do_unary(lua_State *L, moe_tensor *x, moe_unary_op op, float alpha, const char *fn) {
    moe_tensor *out = out_like(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_unary(moe_lua_ctx(L), op, out, x, alpha), fn);
    return 1;
}

static int do_binary_tt(lua_State *L, moe_binary_op op, moe_tensor *a, moe_tensor *b, const char *fn) {
    int nd;
    int64_t shape[MOE_MAX_DIMS];
    moe_lua_check(L, moe_broadcast_shape(a, b, &nd, shape), fn);
    moe_tensor *out = out_like(L, a, nd, shape, fn);
    moe_lua_check(L, moe_op_binary(moe_lua_ctx(L), op, out, a, b), fn);
    return 1;
}

/* a OP b where either side may be a number (but not both). */
static int arith(lua_State *L, moe_binary_op op, const char *fn) {
    int ta = moe_lua_is_tensor(L, 1), tb = moe_lua_is_tensor(L, 2);
    if (!ta && !tb) return moe_lua_errorf(L, "%s: expected a tensor operand, got %s and %s", fn, luaL_typename(L, 1),
                                      luaL_typename(L, 2));
    if (ta && tb) {
        moe_tensor *a = moe_lua_check_tensor_f(L, 1, fn, "self");
        moe_tensor *b = moe_lua_check_tensor_f(L, 2, fn, "other");
        return do_binary_tt(L, op, a, b, fn);
    }
    int tidx = ta ? 1 : 2, nidx = ta ? 2 : 1;
    moe_tensor *t = moe_lua_check_tensor_f(L, tidx, fn, ta ? "self" : "other");
    if (lua_type(L, nidx) != LUA_TNUMBER)
        return moe_lua_errorf(L, "%s: other operand must be a tensor or a number, got %s", fn, luaL_typename(L, nidx));
    double v = lua_tonumber(L, nidx);
    switch (op) {
    case MOE_BIN_ADD: return do_unary(L, t, MOE_UN_ADD_SCALAR, (float)v, fn);
    case MOE_BIN_MUL: return do_unary(L, t, MOE_UN_SCALE, (float)v, fn);
    case MOE_BIN_SUB: if (ta) return do_unary(L, t, MOE_UN_ADD_SCALAR, (float)-v, fn); break;
    default: break;
    }
    moe_tensor *s = scalar_like(L, t, v, fn);
    return ta ? do_binary_tt(L, op, t, s, fn) : do_binary_tt(L, op, s, t, fn);
}

static int m_add(lua_State *L) { return arith(L, MOE_BIN_ADD, "Tensor:add"); }
static int m_sub(lua_State *L) { return arith(L, MOE_BIN_SUB, "Tensor:sub"); }
static int m_mul(lua_State *L) { return arith(L, MOE_BIN_MUL, "Tensor:mul"); }
static int m_div(lua_State *L) { return arith(L, MOE_BIN_DIV, "Tensor:div"); }
static int m_maximum(lua_State *L) { return arith(L, MOE_BIN_MAX, "Tensor:maximum"); }
static int m_minimum(lua_State *L) { return arith(L, MOE_BIN_MIN, "Tensor:minimum"); }

#define UNARY_METHOD(cname, OP, lname) \
    static int cname(lua_State *L) { return do_unary(L, self_arg(L, "Tensor:" lname), OP, 0.0f, "Tensor:" lname); }
UNARY_METHOD(m_neg, MOE_UN_NEG, "neg")
UNARY_METHOD(m_exp, MOE_UN_EXP, "exp")
UNARY_METHOD(m_log, MOE_UN_LOG, "log")
UNARY_METHOD(m_sqrt, MOE_UN_SQRT, "sqrt")
UNARY_METHOD(m_rsqrt, MOE_UN_RSQRT, "rsqrt")
UNARY_METHOD(m_abs, MOE_UN_ABS, "abs")
UNARY_METHOD(m_tanh, MOE_UN_TANH, "tanh")
UNARY_METHOD(m_sigmoid, MOE_UN_SIGMOID, "sigmoid")
UNARY_METHOD(m_relu, MOE_UN_RELU, "relu")
UNARY_METHOD(m_silu, MOE_UN_SILU, "silu")
UNARY_METHOD(m_gelu, MOE_UN_GELU, "gelu")
UNARY_METHOD(m_gelu_erf, MOE_UN_GELU_ERF, "gelu_erf")
UNARY_METHOD(m_square, MOE_UN_SQUARE, "square")

static int m_pow(lua_State *L) {
    moe_tensor *t = self_arg(L, "Tensor:pow");
    double e = moe_lua_check_num(L, 2, "Tensor:pow", "exponent");
    return do_unary(L, t, MOE_UN_POW_SCALAR, (float)e, "Tensor:pow");
}

static int mm_unm(lua_State *L) { return do_unary(L, self_arg(L, "Tensor:neg"), MOE_UN_NEG, 0.0f, "Tensor:neg"); }

static int mm_pow(lua_State *L) {
    if (!moe_lua_is_tensor(L, 1))
        return moe_lua_errorf(L, "Tensor:pow: the base must be a tensor and the exponent a number, got %s ^ tensor",
                          luaL_typename(L, 1));
    return m_pow(L);
}

/* ----------------------------------------------------------- reductions -- */

static int reduce(lua_State *L, moe_reduce_op op, const char *fn) {
    moe_tensor *x = self_arg(L, fn);
    moe_ctx *ctx = moe_lua_ctx(L);
    if (lua_isnoneornil(L, 2)) {
        moe_tensor *out = out_like(L, x, 0, NULL, fn);
        moe_lua_check(L, moe_op_reduce_all(ctx, op, out, x), fn);
        return 1;
    }
    int d = moe_lua_dim_arg(L, 2, x->ndim, fn);
    int keep = 0;
    if (!lua_isnoneornil(L, 3)) {
        if (lua_type(L, 3) != LUA_TBOOLEAN) return moe_lua_errorf(L, "%s: keepdim must be a boolean, got %s", fn,
                                                              luaL_typename(L, 3));
        keep = lua_toboolean(L, 3);
    }
    int64_t shape[MOE_MAX_DIMS];
    int nd = 0;
    for (int i = 0; i < x->ndim; i++) {
        if (i == d) { if (keep) shape[nd++] = 1; continue; }
        shape[nd++] = x->shape[i];
    }
    moe_tensor *out = out_like(L, x, nd, shape, fn);
    moe_lua_check(L, moe_op_reduce(ctx, op, out, x, d), fn);
    return 1;
}

static int m_sum(lua_State *L) { return reduce(L, MOE_RED_SUM, "Tensor:sum"); }
static int m_mean(lua_State *L) { return reduce(L, MOE_RED_MEAN, "Tensor:mean"); }
static int m_max(lua_State *L) { return reduce(L, MOE_RED_MAX, "Tensor:max"); }
static int m_min(lua_State *L) { return reduce(L, MOE_RED_MIN, "Tensor:min"); }

/* --------------------------------------------------------- softmax etc. -- */

static void last_dim_only(lua_State *L, moe_tensor *x, const char *fn) {
    if (x->ndim == 0) moe_lua_errorf(L, "%s: needs a tensor with at least 1 dim", fn);
    if (lua_isnoneornil(L, 2)) return;
    int d = moe_lua_dim_arg(L, 2, x->ndim, fn);
    if (d != x->ndim - 1) moe_lua_errorf(L, "%s: only the last dim (-1) is supported, got dim %d", fn, d + 1);
}

static int m_softmax(lua_State *L) {
    const char *fn = "Tensor:softmax";
    moe_tensor *x = self_arg(L, fn);
    last_dim_only(L, x, fn);
    moe_tensor *y = out_like(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_softmax(moe_lua_ctx(L), y, x), fn);
    return 1;
}

static int m_log_softmax(lua_State *L) {
    const char *fn = "Tensor:log_softmax";
    moe_tensor *x = self_arg(L, fn);
    last_dim_only(L, x, fn);
    moe_tensor *y = out_like(L, x, x->ndim, x->shape, fn);
    moe_lua_check(L, moe_op_log_softmax(moe_lua_ctx(L), y, x), fn);
    return 1;
}

static int m_logsumexp(lua_State *L) {
    const char *fn = "Tensor:logsumexp";
    moe_tensor *x = self_arg(L, fn);
    last_dim_only(L, x, fn);
    moe_tensor *y = out_like(L, x, x->ndim - 1, x->shape, fn);
    moe_lua_check(L, moe_op_logsumexp(moe_lua_ctx(L), y, x), fn);
    return 1;
}

/* values, indices (i64, 0-based) of the k largest over the last dim */
static int topk_impl(lua_State *L, moe_tensor *x, int k, const char *fn) {
    if (x->ndim == 0) return moe_lua_errorf(L, "%s: needs a tensor with at least 1 dim", fn);
    if (k < 1 || k > x->shape[x->ndim - 1])
        return moe_lua_errorf(L, "%s: k must be in 1..%lld (the size of the last dim), got %d", fn,
                          (long long)x->shape[x->ndim - 1], k);
    int64_t shape[MOE_MAX_DIMS];
    memcpy(shape, x->shape, sizeof shape);
    shape[x->ndim - 1] = k;
    moe_tensor *v = out_like(L, x, x->ndim, shape, fn);
    moe_tensor *i = moe_lua_new_tensor(L, MOE_I64, x->ndim, shape, x->device, fn);
    moe_lua_check(L, moe_op_topk(moe_lua_ctx(L), v, i, x, k), fn);
    return 2;
}

static int m_topk(lua_State *L) {
    moe_tensor *x = self_arg(L, "Tensor:topk");
    lua_Integer k = moe_lua_check_int(L, 2, "Tensor:topk", "k");
    if (k < 1 || k > (1 << 30)) return moe_lua_errorf(L, "Tensor:topk: k must be positive, got %lld", (long long)k);
    return topk_impl(L, x, (int)k, "Tensor:topk");
}

/* 0-based i64 index of the maximum over the last dim (that dim removed). */
static int m_argmax(lua_State *L) {
    const char *fn = "Tensor:argmax";
    moe_tensor *x = self_arg(L, fn);
    last_dim_only(L, x, fn);
    lua_settop(L, 1);
    topk_impl(L, x, 1, fn);
    moe_tensor *idx = moe_lua_check_tensor_f(L, -1, fn, "indices");
    moe_lua_push_tensor(L, moe_tensor_view(idx, x->ndim - 1, x->shape), fn);
    return 1;
}

/* ---------------------------------------------------------- comparisons -- */

/* Host f64 copies of two same-shape tensors (left on the stack as tensors). */
static void host_pair(lua_State *L, moe_tensor *a, moe_tensor *b, double **pa, double **pb, const char *fn) {
    moe_tensor *ha = moe_lua_new_tensor(L, MOE_F64, a->ndim, a->shape, MOE_DEVICE_CPU, fn);
    moe_lua_check(L, moe_op_copy(moe_lua_ctx(L), ha, a), fn);
    moe_tensor *hb = moe_lua_new_tensor(L, MOE_F64, b->ndim, b->shape, MOE_DEVICE_CPU, fn);
    moe_lua_check(L, moe_op_copy(moe_lua_ctx(L), hb, b), fn);
    *pa = moe_tensor_data(ha);
    *pb = moe_tensor_data(hb);
}

static int m_allclose(lua_State *L) {
    const char *fn = "Tensor:allclose";
    moe_tensor *a = self_arg(L, fn);
    moe_tensor *b = moe_lua_check_tensor_f(L, 2, fn, "other");
    double rtol = lua_isnoneornil(L, 3) ? 1e-5 : moe_lua_check_num(L, 3, fn, "rtol");
    double atol = lua_isnoneornil(L, 4) ? 1e-8 : moe_lua_check_num(L, 4, fn, "atol");
    if (!moe_tensor_same_shape(a, b)) {
        char sa[128], sb[128];
        return moe_lua_errorf(L, "%s: shapes differ: %s vs %s", fn, moe_shape_str(a, sa, sizeof sa),
                          moe_shape_str(b, sb, sizeof sb));
    }
    double *pa, *pb;
    host_pair(L, a, b, &pa, &pb, fn);
    int64_t n = moe_tensor_numel(a);
    int ok = 1;
    for (int64_t i = 0; i < n && ok; i++) {
        double x = pa[i], y = pb[i];
        if (x == y) continue;   /* also equal infinities */
        if (!(fabs(x - y) <= atol + rtol * fabs(y))) ok = 0;
    }
    lua_pushboolean(L, ok);
    return 1;
}

static int m_equal(lua_State *L) {
    const char *fn = "Tensor:equal";
    moe_tensor *a = self_arg(L, fn);
    moe_tensor *b = moe_lua_check_tensor_f(L, 2, fn, "other");
    if (!moe_tensor_same_shape(a, b)) { lua_pushboolean(L, 0); return 1; }
    double *pa, *pb;
    host_pair(L, a, b, &pa, &pb, fn);
    int64_t n = moe_tensor_numel(a);
    int ok = 1;
    for (int64_t i = 0; i < n && ok; i++) ok = pa[i] == pb[i];
    lua_pushboolean(L, ok);
    return 1;
}

/* --------------------------------------------------------------- matmul -- */

/* A 2-D operand for gemm: contiguous as is, or the transpose of a contiguous
 * matrix (passed as that matrix with trans = 1), or a contiguous copy. */
static moe_tensor *gemm_operand(lua_State *L, moe_tensor *x, int *trans, const char *fn) {
    *trans = 0;
    if (moe_tensor_is_contiguous(x)) return x;
    moe_ctx *ctx = moe_lua_ctx(L);
    if (x->ndim == 2 && x->stride[0] == 1 && x->stride[1] == x->shape[0]) {
        moe_tensor *tv = moe_tensor_transpose(x, 0, 1);
        moe_lua_push_tensor(L, tv, fn);
        *trans = 1;
        return tv;
    }
    moe_tensor *c = moe_op_contiguous(ctx, x);
    moe_lua_push_tensor(L, c, fn);
    return c;
}

static int matmul_impl(lua_State *L, moe_tensor *a, moe_tensor *b, const char *fn) {
    char sa[128], sb[128];
    if (a->ndim < 1 || b->ndim < 1)
        return moe_lua_errorf(L, "%s: operands need at least 1 dim, got shapes %s and %s", fn,
                          moe_shape_str(a, sa, sizeof sa), moe_shape_str(b, sb, sizeof sb));
    moe_ctx *ctx = moe_lua_ctx(L);
    int base = lua_gettop(L);
    /* vectors become matrices: [K] @ [K, N] -> [1, K] @ ..., [M, K] @ [K] -> ... @ [K, 1] */
    int squeeze_a = 0, squeeze_b = 0;
    if (a->ndim == 1) { a = moe_tensor_unsqueeze(a, 0); moe_lua_push_tensor(L, a, fn); squeeze_a = 1; }
    if (b->ndim == 1) { b = moe_tensor_unsqueeze(b, 1); moe_lua_push_tensor(L, b, fn); squeeze_b = 1; }
    int64_t K = a->shape[a->ndim - 1];
    if (b->shape[b->ndim - 2] != K)
        return moe_lua_errorf(L, "%s: inner dims differ: %s @ %s", fn, moe_shape_str(a, sa, sizeof sa),
                          moe_shape_str(b, sb, sizeof sb));
    int64_t M = a->shape[a->ndim - 2], N = b->shape[b->ndim - 1];
    int64_t oshape[MOE_MAX_DIMS];
    int ond;
    moe_tensor *out;
    if (b->ndim == 2) {
        /* a [..., M, K] @ b [K, N]: fold a's leading dims into rows */
        ond = a->ndim;
        memcpy(oshape, a->shape, sizeof oshape);
        oshape[ond - 1] = N;
        int64_t rows = moe_tensor_numel(a) / (K ? K : 1);
        if (K == 0) rows = moe_shape_numel(a->ndim - 1, a->shape);
        int ta, tb;
        moe_tensor *a2 = a;
        if (a->ndim > 2) {
            a2 = gemm_operand(L, a, &ta, fn);
            int64_t s2[2] = {rows, K};
            a2 = moe_tensor_view(a2, 2, s2);
            moe_lua_push_tensor(L, a2, fn);
        }
        a2 = gemm_operand(L, a2, &ta, fn);
        moe_tensor *b2 = gemm_operand(L, b, &tb, fn);
        out = moe_lua_new_zeros(L, a->dtype, ond, oshape, a->device, fn);
        int64_t s2[2] = {rows, N};
        moe_tensor *o2 = moe_tensor_view(out, 2, s2);
        moe_lua_push_tensor(L, o2, fn);
        moe_lua_check(L, moe_op_gemm(ctx, ta, tb, 1.0f, a2, b2, 0.0f, o2), fn);
        lua_pop(L, 1);
    } else {
        /* batched: leading dims must match (a 2-D a is shared by all batches) */
        int lead_b = b->ndim - 2;
        if (a->ndim > 2 && a->ndim != b->ndim)
            return moe_lua_errorf(L, "%s: batch dims differ: %s @ %s", fn, moe_shape_str(a, sa, sizeof sa),
                              moe_shape_str(b, sb, sizeof sb));
        for (int i = 0; a->ndim > 2 && i < lead_b; i++)
            if (a->shape[i] != b->shape[i])
                return moe_lua_errorf(L, "%s: batch dims differ: %s @ %s", fn, moe_shape_str(a, sa, sizeof sa),
                                  moe_shape_str(b, sb, sizeof sb));
        int64_t batch = moe_shape_numel(lead_b, b->shape);
        ond = b->ndim;
        memcpy(oshape, b->shape, sizeof oshape);
        oshape[ond - 2] = M;
        oshape[ond - 1] = N;
        int ta = 0, tb = 0;
        moe_tensor *a3 = a, *b3 = b;
        if (a->ndim > 2) {
            a3 = gemm_operand(L, a, &ta, fn);
            int64_t s3[3] = {batch, M, K};
            a3 = moe_tensor_view(a3, 3, s3);
            moe_lua_push_tensor(L, a3, fn);
        } else {
            a3 = gemm_operand(L, a, &ta, fn);
        }
        b3 = gemm_operand(L, b, &tb, fn);
        int64_t s3b[3] = {batch, K, N};
        b3 = moe_tensor_view(b3, 3, s3b);
        moe_lua_push_tensor(L, b3, fn);
        out = moe_lua_new_zeros(L, a->dtype, ond, oshape, a->device, fn);
        int64_t s3[3] = {batch, M, N};
        moe_tensor *o3 = moe_tensor_view(out, 3, s3);
        moe_lua_push_tensor(L, o3, fn);
        moe_lua_check(L, moe_op_gemm(ctx, ta, tb, 1.0f, a3, b3, 0.0f, o3), fn);
        lua_pop(L, 1);
    }
    if (squeeze_a || squeeze_b) {
        int64_t fshape[MOE_MAX_DIMS];
        int fnd = 0;
        for (int i = 0; i < ond; i++) {
            if (squeeze_a && i == ond - 2) continue;
            if (squeeze_b && i == ond - 1) continue;
            fshape[fnd++] = oshape[i];
        }
        moe_lua_push_tensor(L, moe_tensor_view(out, fnd, fshape), fn);
    }
    if (lua_gettop(L) > base + 1) {      /* the result is on top; drop the temporaries */
        lua_replace(L, base + 1);
        lua_settop(L, base + 1);
    }
    return 1;
}

static int m_matmul(lua_State *L) {
    moe_tensor *a = moe_lua_check_tensor_f(L, 1, "matmul", "a");
    moe_tensor *b = moe_lua_check_tensor_f(L, 2, "matmul", "b");
    return matmul_impl(L, a, b, "matmul");
}

/* -------------------------------------------------------- registration -- */

static const luaL_Reg math_methods[] = {
    {"add", m_add}, {"sub", m_sub}, {"mul", m_mul}, {"div", m_div}, {"maximum", m_maximum}, {"minimum", m_minimum},
    {"neg", m_neg}, {"exp", m_exp}, {"log", m_log}, {"sqrt", m_sqrt}, {"rsqrt", m_rsqrt}, {"abs", m_abs},
    {"tanh", m_tanh}, {"sigmoid", m_sigmoid}, {"relu", m_relu}, {"silu", m_silu}, {"gelu", m_gelu},
    {"gelu_erf", m_gelu_erf}, {"square", m_square}, {"pow", m_pow},
    {"sum", m_sum}, {"mean", m_mean}, {"max", m_max}, {"min", m_min},
    {"softmax", m_softmax}, {"log_softmax", m_log_softmax}, {"logsumexp", m_logsumexp},
    {"topk", m_topk}, {"argmax", m_argmax}, {"allclose", m_allclose}, {"equal", m_equal},
    {"matmul", m_matmul},
    {NULL, NULL}
};

static const luaL_Reg metamethods[] = {
    {"__add", m_add}, {"__sub", m_sub}, {"__mul", m_mul}, {"__div", m_div}, {"__unm", mm_unm}, {"__pow", mm_pow},
    {NULL, NULL}
};

void moe_lua_tensor_math_register(lua_State *L, int methods, int mt, int mod) {
    for (const luaL_Reg *r = math_methods; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, methods, r->name);
    }
    for (const luaL_Reg *r = metamethods; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, mt, r->name);
    }
    lua_pushcfunction(L, m_matmul);
    lua_setfield(L, mod, "matmul");
}
