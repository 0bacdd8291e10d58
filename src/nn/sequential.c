/* Sequential: children applied in order, parameters in one flat buffer. */
#include "layer.h"

#include <stdio.h>
#include <string.h>

static moe_status sequential_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    moe_tensor *cur = x;
    moe_tensor_retain(cur);
    for (int i = 0; i < l->n_children; i++) {
        moe_tensor *next;
        moe_status s = moe_layer_forward(l->children[i], ctx, tape, cur, &next);
        moe_tensor_release(cur);
        if (s != MOE_OK) return moe_error_context(s, "Sequential[%d]", i + 1);
        cur = next;
    }
    *y = cur;
    return MOE_OK;
}

static void sequential_describe(const moe_layer *l, char *buf, size_t n) {
    size_t used = (size_t)snprintf(buf, n, "Sequential(");
    for (int i = 0; i < l->n_children && used < n; i++) {
        char c[128];
        moe_layer_describe(l->children[i], c, sizeof c);
        used += (size_t)snprintf(buf + used, n - used, "%s%s", i ? ", " : "", c);
    }
    if (used < n) snprintf(buf + used, n - used, ")");
}

static const moe_layer_vtable sequential_vt = {"Sequential", sequential_forward, sequential_describe, NULL, NULL};

moe_layer *moe_sequential_new(moe_ctx *ctx, moe_layer **children, int n) {
    for (int i = 0; i < n; i++) {
        if (!children[i]) { moe_error(MOE_ERR_ARG, "Sequential: child %d is nil", i + 1); return NULL; }
        if (!moe_device_eq(children[i]->device, children[0]->device)) {
            moe_error(MOE_ERR_DEVICE, "Sequential: children are on different devices");
            return NULL;
        }
    }
    moe_layer *l = moe_layer_alloc(&sequential_vt, 0, n);
    if (!l) return NULL;
    for (int i = 0; i < n; i++) {
        char name[16];
        snprintf(name, sizeof name, "%d", i);   /* 0-based like PyTorch state-dict names */
        moe_layer_set_child(l, i, name, children[i]);
    }
    moe_device dev = n ? children[0]->device : MOE_DEVICE_CPU;
    if (moe_layer_flatten(ctx, l, dev) != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}

/* ModuleList: children held together (one flat buffer, one optimiser) without
 * a forward of its own; the caller applies them, e.g. with residual adds. */
static moe_status module_list_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return moe_error(MOE_ERR_STATE, "a ModuleList has no forward; call its children");
}

static void module_list_describe(const moe_layer *l, char *buf, size_t n) {
    snprintf(buf, n, "ModuleList(%d layers, %lld parameters)", l->n_children, (long long)moe_layer_num_params(l));
}

static const moe_layer_vtable module_list_vt = {"ModuleList", module_list_forward, module_list_describe, NULL, NULL};

moe_layer *moe_module_list_new(moe_ctx *ctx, moe_layer **children, const char *const *names, int n) {
    for (int i = 0; i < n; i++)
        if (!children[i]) { moe_error(MOE_ERR_ARG, "ModuleList: child %d is nil", i + 1); return NULL; }
    moe_layer *l = moe_layer_alloc(&module_list_vt, 0, n);
    if (!l) return NULL;
    for (int i = 0; i < n; i++) {
        char name[32];
        if (names && names[i]) snprintf(name, sizeof name, "%s", names[i]);
        else snprintf(name, sizeof name, "%d", i);
        moe_layer_set_child(l, i, name, children[i]);
    }
    moe_device dev = n ? children[0]->device : MOE_DEVICE_CPU;
    if (moe_layer_flatten(ctx, l, dev) != MOE_OK) { moe_layer_release(l); return NULL; }
    return l;
}
