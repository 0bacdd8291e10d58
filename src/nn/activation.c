/* Elementwise activations as layers, so Sequential stacks (and custom experts
 * written in Lua) can use them. The backward is moe_f_unary's. */
#include "layer.h"
#include "functional.h"

#include <stdio.h>

static moe_unary_op op_of(const moe_layer *l) { return (moe_unary_op)(intptr_t)l->state; }

static moe_status activation_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return moe_f_unary(ctx, tape, op_of(l), x, 0.0f, y);
}

static void activation_describe(const moe_layer *l, char *buf, size_t n) {
    const char *name = "Activation";
    switch (op_of(l)) {
    case MOE_UN_SILU: name = "SiLU"; break;
    case MOE_UN_GELU: name = "GELU(tanh)"; break;
    case MOE_UN_GELU_ERF: name = "GELU"; break;
    case MOE_UN_RELU: name = "ReLU"; break;
    case MOE_UN_TANH: name = "Tanh"; break;
    case MOE_UN_SIGMOID: name = "Sigmoid"; break;
    default: break;
    }
    snprintf(buf, n, "%s()", name);
}

static const moe_layer_vtable activation_vt = {"Activation", activation_forward, activation_describe, NULL, NULL};

moe_layer *moe_activation_new(moe_unary_op op) {
    switch (op) {
    case MOE_UN_SILU: case MOE_UN_GELU: case MOE_UN_GELU_ERF: case MOE_UN_RELU: case MOE_UN_TANH: case MOE_UN_SIGMOID:
        break;
    default:
        moe_error(MOE_ERR_ARG, "Activation: op %d is not an activation", (int)op);
        return NULL;
    }
    moe_layer *l = moe_layer_alloc(&activation_vt, 0, 0);
    if (l) l->state = (void *)(intptr_t)op;
    return l;
}
