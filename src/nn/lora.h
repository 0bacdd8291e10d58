/* LoRA adapters: a low-rank update scale * B A (scale = alpha / r) added to
 * the weights of an expert bank or of a Linear layer without touching them.
 *
 * Expert banks: for each adapted projection (gate_proj, up_proj, down_proj,
 * stacked [E, out, in]) the bank gains parameters <proj>_lora_A [E, r, in]
 * and <proj>_lora_B [E, out, r] (one pair per expert) or [1, r, in] and
 * [1, out, r] (one pair shared by every expert). After each grouped
 * projection the bank adds scale * (x A_e^T) B_e^T to the rows routed to
 * expert e with two more grouped GEMMs; its backward accumulates dA, dB by
 * grouped weight gradients and adds the adapter's share to dx.
 *
 * Linear layers: parameters lora_A [r, in] and lora_B [out, r]; the forward
 * adds scale * (x A^T) B^T through taped functional ops.
 *
 * A starts U(-1/sqrt(in), 1/sqrt(in)) (Kaiming-uniform as nn.Linear) and B
 * at zero, so an adapted layer computes exactly what it did before.
 *
 * The adapter parameters are appended to the layer's own parameters, so they
 * sit in its tree's parameter list; attach, merge and remove leave the
 * tree's flat buffers stale: re-flatten the root afterwards
 * (moe_layer_flatten(ctx, root, root->device)). Do not attach, merge or
 * remove between a taped forward and its backward (the backward says so). */
#ifndef MOE_LORA_H
#define MOE_LORA_H

#include "layer.h"

/* Projections of an expert bank. */
enum { MOE_LORA_GATE = 1, MOE_LORA_UP = 2, MOE_LORA_DOWN = 4 };

typedef struct {
    int64_t r;              /* rank, > 0 */
    float alpha;            /* scale = alpha / r */
    int expert_wise;        /* banks: one (A, B) pair per expert; 0: one pair shared by all experts */
    unsigned targets;       /* banks: MOE_LORA_* bits (gate on a GELU bank is skipped); ignored for Linear */
} moe_lora_cfg;

typedef struct moe_lora {
    moe_lora_cfg cfg;
    float scale;
    int64_t id;             /* distinct per attachment: tape entries check it */
    int first;              /* index of the first adapter parameter of the layer */
    int a[3], b[3];         /* parameter indices of A and B per projection (gate, up, down; a Linear uses [0]); -1: none */
} moe_lora;

/* Adds adapters to an ExpertBank or Linear layer. *n_adapted (may be NULL)
 * gets the number of adapted projections (0 for a bank with none of the
 * targets: nothing is added then). */
moe_status moe_lora_attach(moe_ctx *ctx, moe_layer *l, const moe_lora_cfg *cfg, moe_init *init, int *n_adapted);
/* W += scale * B A for every adapted projection (per expert), then removes the adapters. */
moe_status moe_lora_merge(moe_ctx *ctx, moe_layer *l);
/* Drops the adapters without folding them in. */
moe_status moe_lora_remove(moe_layer *l);
/* The adapters of l (borrowed), or NULL. */
const moe_lora *moe_lora_of(const moe_layer *l);

/* The layer at a dotted child path ("layers.0.mlp.experts"), or NULL. */
moe_layer *moe_layer_find_child(moe_layer *root, const char *path);

/* ---- hooks for the layers ---- */
/* Expert bank projection `which` (0 gate, 1 up, 2 down): y += scale * (x A^T) B^T per group. */
moe_status moe_lora_bank_forward(moe_ctx *ctx, moe_layer *bank, int which, const moe_tensor *x, moe_tensor *y,
                                 const int64_t *offsets, int groups);
/* Given dy of that projection: dA, dB accumulate into the gradients, dx += the adapter's share. */
moe_status moe_lora_bank_backward(moe_ctx *ctx, moe_layer *bank, int which, const moe_tensor *x, const moe_tensor *dy,
                                  moe_tensor *dx, const int64_t *offsets, int groups);
/* Linear: *y = y0 + scale * (x A^T) B^T, taped. */
moe_status moe_lora_linear_forward(moe_ctx *ctx, moe_tape *tape, moe_layer *lin, moe_tensor *x, moe_tensor *y0,
                                   moe_tensor **y);

/* Implemented by the expert bank (expert_bank.c). */
moe_param *moe_expert_bank_param(moe_layer *bank, int which);   /* NULL: absent (gate of a GELU bank) */
moe_lora *moe_expert_bank_lora(const moe_layer *bank);
void moe_expert_bank_set_lora(moe_layer *bank, moe_lora *lora); /* takes ownership */

#endif
