/* Elementwise kernels: binary (broadcast via stride-0 views), unary and its
 * backward over strided inputs, axpy, SwiGLU. The op is switched on outside
 * the inner loops; inner loops run over the last (coalesced) dim. Outputs may
 * alias inputs here, so these loops do not use restrict on them. */
#include "cpu.h"

/* Up to 3 tensors (out contiguous, inputs strided) over a common shape,
 * coalesced so the inner run is as long as possible. */
typedef struct {
    int nd;                      /* dims after coalescing; the last is the inner run */
    int64_t shape[MOE_MAX_DIMS];
    int64_t st[2][MOE_MAX_DIMS]; /* strides of the inputs */
    int nin;
    const float *in[2];
    float *out;
    int64_t inner, rows;
} ew_iter;

static void ew_init(ew_iter *it, float *out, const moe_tensor *shape_of, const moe_tensor *a, const moe_tensor *b) {
    const moe_tensor *ins[2] = {a, b};
    memset(it, 0, sizeof *it);
    it->nin = b ? 2 : 1;
    it->out = out;
    int nd = 0;
    /* drop size-1 dims, then merge dim i into the next when every tensor allows it */
    int64_t shp[MOE_MAX_DIMS] = {0}, st[2][MOE_MAX_DIMS] = {{0}};
    for (int i = 0; i < shape_of->ndim; i++) {
        if (shape_of->shape[i] == 1) continue;
        shp[nd] = shape_of->shape[i];
        for (int k = 0; k < it->nin; k++) st[k][nd] = ins[k]->stride[i];
        nd++;
    }
    if (nd == 0) { shp[0] = 1; st[0][0] = st[1][0] = 1; nd = 1; }
    int m = 0;
    it->shape[0] = shp[0];
    for (int k = 0; k < it->nin; k++) it->st[k][0] = st[k][0];
    for (int i = 1; i < nd; i++) {
        int ok = 1;
        for (int k = 0; k < it->nin; k++) ok &= it->st[k][m] == st[k][i] * shp[i];
        if (ok) {
            it->shape[m] *= shp[i];
            for (int k = 0; k < it->nin; k++) it->st[k][m] = st[k][i];
        } else {
            m++;
            it->shape[m] = shp[i];
            for (int k = 0; k < it->nin; k++) it->st[k][m] = st[k][i];
        }
    }
    it->nd = m + 1;
    for (int k = 0; k < it->nin; k++) it->in[k] = moe_f32(ins[k]);
    it->inner = it->shape[m];
    it->rows = 1;
    for (int i = 0; i < m; i++) it->rows *= it->shape[i];
}

/* offsets of row r (over the outer dims) in each input */
static inline void ew_row(const ew_iter *it, int64_t r, int64_t *o0, int64_t *o1) {
    int64_t a = 0, b = 0;
    for (int i = it->nd - 2; i >= 0; i--) {
        int64_t q = r % it->shape[i];
        r /= it->shape[i];
        a += q * it->st[0][i];
        b += q * it->st[1][i];
    }
    *o0 = a;
    *o1 = b;
}

/* ---- binary ---- */

typedef struct { ew_iter it; moe_binary_op op; } bin_job;

#define BIN_LOOP(EXPR)                                                                      \
    do {                                                                                    \
        if (sa == 1 && sb == 1)      for (int64_t j = 0; j < n; j++) { float x = a[j], y = b[j]; o[j] = (EXPR); } \
        else if (sa == 1 && sb == 0) { float y = b[0]; for (int64_t j = 0; j < n; j++) { float x = a[j]; o[j] = (EXPR); } } \
        else if (sa == 0 && sb == 1) { float x = a[0]; for (int64_t j = 0; j < n; j++) { float y = b[j]; o[j] = (EXPR); } } \
        else for (int64_t j = 0; j < n; j++) { float x = a[j * sa], y = b[j * sb]; o[j] = (EXPR); } \
    } while (0)

static void bin_range(void *arg, int64_t r0, int64_t r1) {
    bin_job *J = arg;
    const ew_iter *it = &J->it;
    int64_t n = it->inner, sa = it->st[0][it->nd - 1], sb = it->st[1][it->nd - 1];
    for (int64_t r = r0; r < r1; r++) {
        int64_t oa, ob;
        ew_row(it, r, &oa, &ob);
        const float *a = it->in[0] + oa, *b = it->in[1] + ob;
        float *o = it->out + r * n;
        switch (J->op) {
        case MOE_BIN_ADD: BIN_LOOP(x + y); break;
        case MOE_BIN_SUB: BIN_LOOP(x - y); break;
        case MOE_BIN_MUL: BIN_LOOP(x * y); break;
        case MOE_BIN_DIV: BIN_LOOP(x / y); break;
        case MOE_BIN_MAX: BIN_LOOP(x > y ? x : y); break;
        case MOE_BIN_MIN: BIN_LOOP(x < y ? x : y); break;
        default: break;
        }
    }
}

moe_status moe_cpu_binary(moe_ctx *ctx, moe_binary_op op, moe_tensor *out, const moe_tensor *a, const moe_tensor *b) {
    CPU_F32("binary", out);
    bin_job J;
    ew_init(&J.it, moe_f32(out), out, a, b);
    J.op = op;
    moe_parallel_for(ctx->pool, J.it.rows, cpu_grain(J.it.inner, CPU_PAR_WORK), bin_range, &J);
    return MOE_OK;
}

/* ---- unary ---- */

#define GELU_C 0.7978845608028654f   /* sqrt(2/pi) */
#define GELU_K 0.044715f

typedef struct { ew_iter it; moe_unary_op op; float alpha; } un_job;

#define UN_LOOP(EXPR)                                                                     \
    do {                                                                                  \
        if (sx == 1) for (int64_t j = 0; j < n; j++) { float x = xs[j]; o[j] = (EXPR); }  \
        else for (int64_t j = 0; j < n; j++) { float x = xs[j * sx]; o[j] = (EXPR); }     \
    } while (0)

static void un_range(void *arg, int64_t r0, int64_t r1) {
    un_job *J = arg;
    const ew_iter *it = &J->it;
    int64_t n = it->inner, sx = it->st[0][it->nd - 1];
    float al = J->alpha;
    for (int64_t r = r0; r < r1; r++) {
        int64_t ox, unused;
        ew_row(it, r, &ox, &unused);
        const float *xs = it->in[0] + ox;
        float *o = it->out + r * n;
        switch (J->op) {
        case MOE_UN_NEG: UN_LOOP(-x); break;
        case MOE_UN_EXP: UN_LOOP(expf(x)); break;
        case MOE_UN_LOG: UN_LOOP(logf(x)); break;
        case MOE_UN_SQRT: UN_LOOP(sqrtf(x)); break;
        case MOE_UN_RSQRT: UN_LOOP(1.0f / sqrtf(x)); break;
        case MOE_UN_ABS: UN_LOOP(fabsf(x)); break;
        case MOE_UN_TANH: UN_LOOP(tanhf(x)); break;
        case MOE_UN_SIGMOID: UN_LOOP(1.0f / (1.0f + expf(-x))); break;
        case MOE_UN_RELU: UN_LOOP(x > 0.0f ? x : 0.0f); break;
        case MOE_UN_SILU: UN_LOOP(x / (1.0f + expf(-x))); break;
        case MOE_UN_GELU: UN_LOOP(0.5f * x * (1.0f + tanhf(GELU_C * (x + GELU_K * x * x * x)))); break;
        case MOE_UN_GELU_ERF: UN_LOOP(0.5f * x * (1.0f + erff(x * 0.70710678118654752f))); break;
        case MOE_UN_SQUARE: UN_LOOP(x * x); break;
        case MOE_UN_SCALE: UN_LOOP(x * al); break;
        case MOE_UN_ADD_SCALAR: UN_LOOP(x + al); break;
        case MOE_UN_POW_SCALAR: UN_LOOP(powf(x, al)); break;
        default: break;
        }
    }
}

moe_status moe_cpu_unary(moe_ctx *ctx, moe_unary_op op, moe_tensor *out, const moe_tensor *x, float alpha) {
    CPU_F32("unary", out);
    un_job J;
    ew_init(&J.it, moe_f32(out), out, x, NULL);
    J.op = op;
    J.alpha = alpha;
    int64_t cost = (op == MOE_UN_NEG || op == MOE_UN_ABS || op == MOE_UN_RELU || op == MOE_UN_SQUARE ||
                    op == MOE_UN_SCALE || op == MOE_UN_ADD_SCALAR) ? 1 : 16;
    moe_parallel_for(ctx->pool, J.it.rows, cpu_grain(J.it.inner * cost, CPU_PAR_WORK), un_range, &J);
    return MOE_OK;
}

/* ---- unary backward: dx = dy * f'(x) ---- */

#define UB_LOOP(EXPR)                                                                                   \
    do {                                                                                                \
        if (sg == 1 && sx == 1) for (int64_t j = 0; j < n; j++) { float g = gs[j], x = xs[j]; (void)x; o[j] = (EXPR); } \
        else for (int64_t j = 0; j < n; j++) { float g = gs[j * sg], x = xs[j * sx]; (void)x; o[j] = (EXPR); }   \
    } while (0)

static inline float gelu_tanh_grad(float x) {
    float u = GELU_C * (x + GELU_K * x * x * x);
    float t = tanhf(u);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * GELU_C * (1.0f + 3.0f * GELU_K * x * x);
}

static inline float gelu_erf_grad(float x) {
    return 0.5f * (1.0f + erff(x * 0.70710678118654752f)) + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

static void ub_range(void *arg, int64_t r0, int64_t r1) {
    un_job *J = arg;
    const ew_iter *it = &J->it;
    int64_t n = it->inner, sg = it->st[0][it->nd - 1], sx = it->st[1][it->nd - 1];
    float al = J->alpha;
    for (int64_t r = r0; r < r1; r++) {
        int64_t og, ox;
        ew_row(it, r, &og, &ox);
        const float *gs = it->in[0] + og, *xs = it->in[1] + ox;
        float *o = it->out + r * n;
        switch (J->op) {
        case MOE_UN_NEG: UB_LOOP(-g); break;
        case MOE_UN_EXP: UB_LOOP(g * expf(x)); break;
        case MOE_UN_LOG: UB_LOOP(g / x); break;
        case MOE_UN_SQRT: UB_LOOP(g * 0.5f / sqrtf(x)); break;
        case MOE_UN_RSQRT: UB_LOOP(g * -0.5f / (x * sqrtf(x))); break;
        case MOE_UN_ABS: UB_LOOP(x > 0.0f ? g : x < 0.0f ? -g : 0.0f); break;
        case MOE_UN_TANH: UB_LOOP(g * (1.0f - tanhf(x) * tanhf(x))); break;
        case MOE_UN_SIGMOID: UB_LOOP(g * (1.0f / (1.0f + expf(-x))) * (1.0f - 1.0f / (1.0f + expf(-x)))); break;
        case MOE_UN_RELU: UB_LOOP(x > 0.0f ? g : 0.0f); break;
        case MOE_UN_SILU: {
            UB_LOOP(g * (1.0f / (1.0f + expf(-x))) * (1.0f + x * (1.0f - 1.0f / (1.0f + expf(-x)))));
            break;
        }
        case MOE_UN_GELU: UB_LOOP(g * gelu_tanh_grad(x)); break;
        case MOE_UN_GELU_ERF: UB_LOOP(g * gelu_erf_grad(x)); break;
        case MOE_UN_SQUARE: UB_LOOP(2.0f * x * g); break;
        case MOE_UN_SCALE: UB_LOOP(g * al); break;
        case MOE_UN_ADD_SCALAR: UB_LOOP(g); break;
        case MOE_UN_POW_SCALAR: UB_LOOP(al == 0.0f ? 0.0f : g * al * powf(x, al - 1.0f)); break;
        default: break;
        }
    }
}

moe_status moe_cpu_unary_backward(moe_ctx *ctx, moe_unary_op op, moe_tensor *dx, const moe_tensor *dy,
                                  const moe_tensor *x, float alpha) {
    CPU_F32("unary_backward", dx);
    un_job J;
    ew_init(&J.it, moe_f32(dx), dx, dy, x);
    J.op = op;
    J.alpha = alpha;
    moe_parallel_for(ctx->pool, J.it.rows, cpu_grain(J.it.inner * 16, CPU_PAR_WORK), ub_range, &J);
    return MOE_OK;
}

/* ---- axpy ---- */

typedef struct { float *y; const float *x; float alpha; } axpy_job;

static void axpy_range(void *arg, int64_t b, int64_t e) {
    axpy_job *J = arg;
    float *restrict y = J->y;
    const float *restrict x = J->x;
    float al = J->alpha;
    for (int64_t i = b; i < e; i++) y[i] += al * x[i];
}

moe_status moe_cpu_axpy(moe_ctx *ctx, moe_tensor *y, float alpha, const moe_tensor *x) {
    CPU_F32("axpy", y);
    axpy_job J = {moe_f32(y), moe_f32(x), alpha};
    moe_parallel_for(ctx->pool, moe_tensor_numel(y), 1 << 16, axpy_range, &J);
    return MOE_OK;
}

/* ---- SwiGLU ---- */

typedef struct { float *o1, *o2; const float *a, *b, *c; } sw_job;

static void swiglu_range(void *arg, int64_t b, int64_t e) {
    sw_job *J = arg;
    float *o = J->o1;
    const float *restrict g = J->a, *restrict u = J->b;
    for (int64_t i = b; i < e; i++) o[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

static void swiglu_bwd_range(void *arg, int64_t b, int64_t e) {
    sw_job *J = arg;
    float *dg = J->o1, *du = J->o2;
    const float *restrict d = J->a, *restrict g = J->b, *restrict u = J->c;
    for (int64_t i = b; i < e; i++) {
        float s = 1.0f / (1.0f + expf(-g[i]));
        float dgi = d[i] * u[i] * s * (1.0f + g[i] * (1.0f - s));
        float dui = d[i] * g[i] * s;
        dg[i] = dgi;
        du[i] = dui;
    }
}

moe_status moe_cpu_swiglu(moe_ctx *ctx, moe_tensor *out, const moe_tensor *gate, const moe_tensor *up) {
    CPU_F32("swiglu", out);
    sw_job J = {moe_f32(out), NULL, moe_f32(gate), moe_f32(up), NULL};
    moe_parallel_for(ctx->pool, moe_tensor_numel(out), 4096, swiglu_range, &J);
    return MOE_OK;
}

moe_status moe_cpu_swiglu_backward(moe_ctx *ctx, moe_tensor *dgate, moe_tensor *dup, const moe_tensor *dout,
                                   const moe_tensor *gate, const moe_tensor *up) {
    CPU_F32("swiglu_backward", dgate);
    sw_job J = {moe_f32(dgate), moe_f32(dup), moe_f32(dout), moe_f32(gate), moe_f32(up)};
    moe_parallel_for(ctx->pool, moe_tensor_numel(dgate), 4096, swiglu_bwd_range, &J);
    return MOE_OK;
}
