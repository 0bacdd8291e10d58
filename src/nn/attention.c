/* Causal self-attention with grouped-query heads and rotary embeddings:
 *   q, k, v = q_proj(x), k_proj(x), v_proj(x)      (optionally RMS-normed: OLMoE's QK-norm)
 *   o = softmax(rope(q) rope(k)^T / sqrt(D)) v      (the "attention core", one tape entry)
 * With QK-norm and rope, norm and rope run as one op per q and k
 * (moe_rmsnorm_rope_forward) and the core takes q and k already rotated.
 *   y = o_proj(o)
 * x is [B, T, hidden]. Children carry Hugging Face names. */
#include "layer.h"
#include "functional.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>

typedef struct { moe_attention_cfg cfg; } attn_state;

enum { C_Q, C_K, C_V, C_O, C_QN, C_KN };

/* [B, T, H*D] -> [B, T, H, D] view */
static moe_tensor *heads_view(moe_tensor *t, int64_t h, int64_t d) {
    int64_t shape[4] = {t->shape[0], t->shape[1], h, d};
    return moe_tensor_view(t, 4, shape);
}

static moe_status core_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    attn_state *st = ((moe_layer *)e->self)->state;
    const moe_attention_cfg *c = &st->cfg;
    moe_tensor *qr = e->saved[0], *kr = e->saved[1], *v = e->saved[2], *out = e->saved[3], *lse = e->saved[4];
    int64_t hq = c->n_heads, hkv = c->n_kv_heads, d = c->head_dim;
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]);
    moe_tensor *g4 = g ? heads_view(g, hq, d) : NULL;
    moe_tensor *dq = moe_tensor_like(ctx, e->in[0]), *dk = moe_tensor_like(ctx, e->in[1]), *dv = moe_tensor_like(ctx, e->in[2]);
    moe_tensor *dq4 = dq ? heads_view(dq, hq, d) : NULL, *dk4 = dk ? heads_view(dk, hkv, d) : NULL;
    moe_tensor *dv4 = dv ? heads_view(dv, hkv, d) : NULL;
    moe_status s = g4 && dq4 && dk4 && dv4 ? MOE_OK : moe_last_status();
    if (s == MOE_OK)
        s = moe_op_attention_backward(ctx, dq4, dk4, dv4, g4, qr, kr, v, out, lse, (float)e->f[0], c->causal);
    /* rope is a rotation: its backward is the inverse rotation of the gradient
     * (done by the norm's entry when q and k came in rotated) */
    int rope = c->rope_theta > 0 && !e->i[0];
    if (s == MOE_OK && rope) s = moe_op_rope(ctx, dq4, dq4, 0, c->rope_theta, 1);
    if (s == MOE_OK && rope) s = moe_op_rope(ctx, dk4, dk4, 0, c->rope_theta, 1);
    moe_tensor_release(g); moe_tensor_release(g4);
    moe_tensor_release(dq4); moe_tensor_release(dk4); moe_tensor_release(dv4);
    if (s != MOE_OK) { moe_tensor_release(dq); moe_tensor_release(dk); moe_tensor_release(dv); return s; }
    gin[0] = dq; gin[1] = dk; gin[2] = dv;
    return MOE_OK;
}

/* rotated: q and k come with rope applied */
static moe_status attention_core(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *q, moe_tensor *k,
                                 moe_tensor *v, int rotated, moe_tensor **y) {
    attn_state *st = l->state;
    const moe_attention_cfg *c = &st->cfg;
    int64_t hq = c->n_heads, hkv = c->n_kv_heads, d = c->head_dim;
    float scale = 1.0f / sqrtf((float)d);
    moe_tensor *q4 = heads_view(q, hq, d), *k4 = heads_view(k, hkv, d), *v4 = heads_view(v, hkv, d);
    moe_tensor *qr = NULL, *kr = NULL;
    if (rotated) {
        qr = q4; kr = k4;
        if (q4) moe_tensor_retain(q4);
        if (k4) moe_tensor_retain(k4);
    } else {
        qr = q4 ? moe_tensor_like(ctx, q4) : NULL;
        kr = k4 ? moe_tensor_like(ctx, k4) : NULL;
    }
    moe_tensor *o = moe_tensor_like(ctx, q), *o4 = o ? heads_view(o, hq, d) : NULL;
    int64_t ls[3] = {q->shape[0], hq, q->shape[1]};
    moe_tensor *lse = moe_tensor_new(ctx, MOE_F32, 3, ls, q->device);
    moe_status s = q4 && k4 && v4 && qr && kr && o4 && lse ? MOE_OK : moe_last_status();
    if (s == MOE_OK && !rotated)
        s = c->rope_theta > 0 ? moe_op_rope(ctx, qr, q4, 0, c->rope_theta, 0) : moe_op_copy(ctx, qr, q4);
    if (s == MOE_OK && !rotated)
        s = c->rope_theta > 0 ? moe_op_rope(ctx, kr, k4, 0, c->rope_theta, 0) : moe_op_copy(ctx, kr, k4);
    if (s == MOE_OK) s = moe_op_attention(ctx, o4, lse, qr, kr, v4, scale, c->causal);
    if (s == MOE_OK && tape) {
        moe_tensor *in[3] = {q, k, v};
        moe_tape_entry *e = moe_tape_record(tape, "attention", core_backward, l, moe_layer_retain_v,
                                            moe_layer_release_v, 3, in, 1, &o);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, qr); moe_tape_save(e, kr); moe_tape_save(e, v4);
            moe_tape_save(e, o4); moe_tape_save(e, lse);
            e->f[0] = scale;
            e->i[0] = rotated;
        }
    }
    moe_tensor_release(q4); moe_tensor_release(k4); moe_tensor_release(v4);
    moe_tensor_release(qr); moe_tensor_release(kr); moe_tensor_release(o4); moe_tensor_release(lse);
    if (s != MOE_OK) { moe_tensor_release(o); return s; }
    *y = o;
    return MOE_OK;
}

/* residual: y = residual + o_proj(o), the add folded into o_proj (NULL: plain) */
static moe_status attention_forward_impl(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x,
                                         moe_tensor *residual, moe_tensor **y) {
    attn_state *st = l->state;
    if (x->ndim != 3 || x->shape[2] != st->cfg.hidden) {
        char a[96];
        return moe_error(MOE_ERR_SHAPE, "input has shape %s, expected [batch, seq, %lld]", moe_shape_str(x, a, sizeof a),
                         (long long)st->cfg.hidden);
    }
    moe_tensor *q = NULL, *k = NULL, *v = NULL, *qn = NULL, *kn = NULL, *o = NULL;
    moe_status s = moe_layer_forward(l->children[C_Q], ctx, tape, x, &q);
    if (s == MOE_OK) s = moe_layer_forward(l->children[C_K], ctx, tape, x, &k);
    if (s == MOE_OK) s = moe_layer_forward(l->children[C_V], ctx, tape, x, &v);
    /* QK-norm with rope: each norm and its rotation as one op */
    const int fused = st->cfg.qk_norm && st->cfg.rope_theta > 0 && moe_layer_is_rmsnorm(l->children[C_QN]) &&
                      moe_layer_is_rmsnorm(l->children[C_KN]);
    if (s == MOE_OK && fused) {
        s = moe_rmsnorm_rope_forward(l->children[C_QN], ctx, tape, q, st->cfg.n_heads, st->cfg.rope_theta, &qn);
        if (s == MOE_OK)
            s = moe_rmsnorm_rope_forward(l->children[C_KN], ctx, tape, k, st->cfg.n_kv_heads, st->cfg.rope_theta, &kn);
    } else if (s == MOE_OK && st->cfg.qk_norm) {
        s = moe_layer_forward(l->children[C_QN], ctx, tape, q, &qn);
        if (s == MOE_OK) s = moe_layer_forward(l->children[C_KN], ctx, tape, k, &kn);
    }
    if (s == MOE_OK) s = attention_core(l, ctx, tape, qn ? qn : q, kn ? kn : k, v, fused, &o);
    /* the rotated q and k are read again only by the core's backward: with the
     * tape's recompute on they are made again there, from q and k */
    if (s == MOE_OK && fused)
        s = moe_rmsnorm_recompute_later(l->children[C_QN], ctx, tape, q, qn, st->cfg.n_heads, st->cfg.rope_theta);
    if (s == MOE_OK && fused)
        s = moe_rmsnorm_recompute_later(l->children[C_KN], ctx, tape, k, kn, st->cfg.n_kv_heads, st->cfg.rope_theta);
    /* and q, k (read by the QK-norms' backward and the recipes above) and v
     * (the core's backward): a GEMM each from x */
    const int qkv = MOE_TAPE_RECOMPUTE_QKV;
    if (s == MOE_OK && fused) s = moe_linear_recompute_later(l->children[C_Q], ctx, tape, x, q, qkv);
    if (s == MOE_OK && fused) s = moe_linear_recompute_later(l->children[C_K], ctx, tape, x, k, qkv);
    if (s == MOE_OK) s = moe_linear_recompute_later(l->children[C_V], ctx, tape, x, v, qkv);
    /* without QK-norm the core keeps rotated copies of q and k, and nothing
     * reads q and k again: given back under any recompute mode, at no cost */
    const int any = MOE_TAPE_RECOMPUTE_NORMS | MOE_TAPE_RECOMPUTE_QKV;
    if (s == MOE_OK && !st->cfg.qk_norm) s = moe_linear_recompute_later(l->children[C_Q], ctx, tape, x, q, any);
    if (s == MOE_OK && !st->cfg.qk_norm) s = moe_linear_recompute_later(l->children[C_K], ctx, tape, x, k, any);
    if (s == MOE_OK && residual) s = moe_layer_forward_residual(l->children[C_O], ctx, tape, o, residual, y);
    else if (s == MOE_OK) s = moe_layer_forward(l->children[C_O], ctx, tape, o, y);
    moe_tensor_release(q); moe_tensor_release(k); moe_tensor_release(v);
    moe_tensor_release(qn); moe_tensor_release(kn); moe_tensor_release(o);
    return s;
}

static moe_status attention_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return attention_forward_impl(l, ctx, tape, x, NULL, y);
}

static moe_status attention_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x,
                                             moe_tensor *residual, moe_tensor **y) {
    return attention_forward_impl(l, ctx, tape, x, residual, y);
}

static void attention_describe(const moe_layer *l, char *buf, size_t n) {
    const moe_attention_cfg *c = &((attn_state *)l->state)->cfg;
    snprintf(buf, n, "Attention(hidden=%lld, heads=%lld, kv_heads=%lld, head_dim=%lld%s%s)", (long long)c->hidden,
             (long long)c->n_heads, (long long)c->n_kv_heads, (long long)c->head_dim, c->causal ? ", causal" : "",
             c->qk_norm ? ", qk_norm" : "");
}

static void attention_destroy(moe_layer *l) { free(l->state); }

static const moe_layer_vtable attention_vt = {"Attention", attention_forward, attention_describe, attention_destroy,
                                              attention_forward_residual};

moe_layer *moe_attention_new(moe_ctx *ctx, const moe_attention_cfg *cfg_in, moe_init *init) {
    moe_attention_cfg c = *cfg_in;
    if (c.n_kv_heads == 0) c.n_kv_heads = c.n_heads;
    if (c.head_dim == 0 && c.n_heads > 0) c.head_dim = c.hidden / c.n_heads;
    if (c.norm_eps == 0) c.norm_eps = 1e-5f;
    if (c.hidden <= 0 || c.n_heads <= 0 || c.n_kv_heads <= 0 || c.head_dim <= 0) {
        moe_error(MOE_ERR_ARG, "Attention: hidden_size, num_heads, num_kv_heads and head_dim must be positive");
        return NULL;
    }
    if (c.n_heads % c.n_kv_heads) {
        moe_error(MOE_ERR_ARG, "Attention: num_heads (%lld) must be a multiple of num_kv_heads (%lld)",
                  (long long)c.n_heads, (long long)c.n_kv_heads);
        return NULL;
    }
    if (c.rope_theta > 0 && c.head_dim % 2) {
        moe_error(MOE_ERR_ARG, "Attention: rotary embeddings need an even head_dim, got %lld", (long long)c.head_dim);
        return NULL;
    }
    if (c.rope_theta < 0) { moe_error(MOE_ERR_ARG, "Attention: rope_theta must be >= 0"); return NULL; }
    moe_layer *l = moe_layer_alloc(&attention_vt, 0, c.qk_norm ? 6 : 4);
    attn_state *st = l ? malloc(sizeof *st) : NULL;
    if (!st) { moe_layer_release(l); if (l) moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    st->cfg = c;
    l->state = st;
    int64_t qd = c.n_heads * c.head_dim, kvd = c.n_kv_heads * c.head_dim;
    moe_layer *kids[6] = {
        moe_linear_new(ctx, c.hidden, qd, c.bias || c.qkv_bias, init), moe_linear_new(ctx, c.hidden, kvd, c.bias || c.qkv_bias, init),
        moe_linear_new(ctx, c.hidden, kvd, c.bias || c.qkv_bias, init), moe_linear_new(ctx, qd, c.hidden, c.bias, init),
        c.qk_norm ? moe_rmsnorm_new(ctx, qd, c.norm_eps) : NULL, c.qk_norm ? moe_rmsnorm_new(ctx, kvd, c.norm_eps) : NULL,
    };
    static const char *names[6] = {"q_proj", "k_proj", "v_proj", "o_proj", "q_norm", "k_norm"};
    moe_status s = MOE_OK;
    for (int i = 0; i < l->n_children; i++) {
        if (!kids[i]) { s = moe_last_status(); continue; }
        if (s == MOE_OK) moe_layer_set_child(l, i, names[i], kids[i]);
    }
    for (int i = 0; i < 6; i++) moe_layer_release(kids[i]);
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
