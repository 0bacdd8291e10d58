/* Dense feed-forward: SwiGLU  y = down(silu(gate(x)) * up(x))
 *                     GELU    y = down(gelu(up(x)))
 * Children are named as in Hugging Face checkpoints (gate_proj, up_proj,
 * down_proj) so weights map by name. The same block is one expert of an MoE. */
#include "layer.h"
#include "functional.h"

#include <stdio.h>
#include <stdlib.h>

typedef struct { moe_ffn_kind kind; } ffn_state;

/* the last projection, with the block's residual folded into it when there is one */
static moe_status ffn_last(moe_layer *down, moe_ctx *ctx, moe_tape *tape, moe_tensor *h, moe_tensor *residual,
                           moe_tensor **y) {
    return residual ? moe_layer_forward_residual(down, ctx, tape, h, residual, y) : moe_layer_forward(down, ctx, tape, h, y);
}

static moe_status ffn_forward_impl(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                   moe_tensor **y) {
    ffn_state *st = l->state;
    moe_tensor *h = NULL, *a = NULL, *b = NULL;
    moe_status s;
    if (st->kind == MOE_FFN_SWIGLU) {
        s = moe_layer_forward(l->children[0], ctx, tape, x, &a);               /* gate */
        if (s == MOE_OK) s = moe_layer_forward(l->children[1], ctx, tape, x, &b); /* up */
        if (s == MOE_OK) s = moe_f_swiglu(ctx, tape, a, b, &h);
        if (s == MOE_OK) s = ffn_last(l->children[2], ctx, tape, h, residual, y);
    } else {
        s = moe_layer_forward(l->children[0], ctx, tape, x, &a);               /* up */
        if (s == MOE_OK) s = moe_f_unary(ctx, tape, MOE_UN_GELU, a, 0.0f, &h);
        if (s == MOE_OK) s = ffn_last(l->children[1], ctx, tape, h, residual, y);
    }
    moe_tensor_release(a);
    moe_tensor_release(b);
    moe_tensor_release(h);
    return s;
}

static moe_status ffn_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return ffn_forward_impl(l, ctx, tape, x, NULL, y);
}

static moe_status ffn_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                       moe_tensor **y) {
    return ffn_forward_impl(l, ctx, tape, x, residual, y);
}

static void ffn_describe(const moe_layer *l, char *buf, size_t n) {
    ffn_state *st = l->state;
    moe_tensor *up = l->children[st->kind == MOE_FFN_SWIGLU ? 1 : 0]->params[0].value;
    snprintf(buf, n, "FeedForward(%lld -> %lld, %s)", (long long)up->shape[1], (long long)up->shape[0],
             st->kind == MOE_FFN_SWIGLU ? "swiglu" : "gelu");
}

static void ffn_destroy(moe_layer *l) { free(l->state); }

static const moe_layer_vtable ffn_vt = {"FeedForward", ffn_forward, ffn_describe, ffn_destroy, ffn_forward_residual};

moe_layer *moe_ffn_new(moe_ctx *ctx, int64_t hidden, int64_t inner, moe_ffn_kind kind, int bias, moe_init *init) {
    if (hidden <= 0 || inner <= 0) {
        moe_error(MOE_ERR_ARG, "FeedForward: hidden_size and intermediate_size must be positive, got %lld and %lld",
                  (long long)hidden, (long long)inner);
        return NULL;
    }
    if (kind != MOE_FFN_SWIGLU && kind != MOE_FFN_GELU) {
        moe_error(MOE_ERR_ARG, "FeedForward: unknown kind %d", (int)kind);
        return NULL;
    }
    int swiglu = kind == MOE_FFN_SWIGLU;
    moe_layer *l = moe_layer_alloc(&ffn_vt, 0, swiglu ? 3 : 2);
    ffn_state *st = l ? malloc(sizeof *st) : NULL;
    if (!st) { moe_layer_release(l); if (l) moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    st->kind = kind;
    l->state = st;
    moe_layer *gate = swiglu ? moe_linear_new(ctx, hidden, inner, bias, init) : NULL;
    moe_layer *up = moe_linear_new(ctx, hidden, inner, bias, init);
    moe_layer *down = moe_linear_new(ctx, inner, hidden, bias, init);
    moe_status s = (!swiglu || gate) && up && down ? MOE_OK : moe_last_status();
    if (s == MOE_OK) {
        int i = 0;
        if (swiglu) moe_layer_set_child(l, i++, "gate_proj", gate);
        moe_layer_set_child(l, i++, "up_proj", up);
        moe_layer_set_child(l, i, "down_proj", down);
        s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    }
    moe_layer_release(gate);
    moe_layer_release(up);
    moe_layer_release(down);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
