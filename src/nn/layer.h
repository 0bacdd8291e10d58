/* Layers: explicit forward and backward in C, composed through the tape.
 *
 * A layer owns named parameters (value + gradient tensors) and child layers.
 * Parameter tensors are views into flat buffers: every layer starts with its
 * own, and moe_layer_flatten re-points a whole tree into one value buffer and
 * one gradient buffer (containers do this on construction), so optimisers,
 * all-reduce and checkpoints loop over a single buffer. Re-pointing mutates
 * the shared tensor headers, so every holder of a parameter sees the move. */
#ifndef MOE_LAYER_H
#define MOE_LAYER_H

#include "../core/context.h"
#include "../core/tensor.h"
#include "../ops/ops.h"
#include "tape.h"

typedef struct moe_layer moe_layer;

typedef struct {
    char name[64];
    moe_tensor *value;     /* the parameter (f32): what optimisers, checkpoints and Lua see */
    moe_tensor *grad;      /* in the compute dtype */
    moe_tensor *compute;   /* mixed precision: the low-precision copy layers compute with, else NULL */
    /* the gradient reads as zero but its memory was not cleared (moe_layer_zero_grad
     * on a lazily zeroed layer): its next writer overwrites (moe_param_grad_beta),
     * readers call moe_layer_settle_grads first */
    int grad_zero_pending;
    /* its layer's backward writes this gradient through moe_param_grad_beta, so
     * zero_grad on a flat buffer may only mark it (the expert banks' weights: most
     * of an MoE model's gradient bytes) */
    int grad_lazy_zero;
} moe_param;

/* What a layer computes with: the compute copy under mixed precision, else the value. */
static inline moe_tensor *moe_param_w(const moe_param *p) { return p->compute ? p->compute : p->value; }

typedef struct moe_layer_vtable {
    const char *kind;
    /* y = f(x). With a tape, records what backward needs; without, saves nothing. */
    moe_status (*forward)(moe_layer *self, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y);
    /* One-line description for printing ("Linear(16 -> 32, bias)"). */
    void (*describe)(const moe_layer *self, char *buf, size_t n);
    void (*destroy)(moe_layer *self);   /* frees layer-specific state, may be NULL */
    /* y = residual + f(x) with the add folded into the layer's last op (may be
     * NULL: moe_layer_forward_residual then adds separately). residual has
     * the output's shape and dtype. */
    moe_status (*forward_residual)(moe_layer *self, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                   moe_tensor **y);
} moe_layer_vtable;

struct moe_layer {
    const moe_layer_vtable *vt;
    int refcount;
    moe_device device;
    moe_param *params;
    int n_params;
    moe_layer **children;
    char (*child_names)[32];
    int n_children;
    moe_tensor *flat_values, *flat_grads;   /* set when this layer owns the flat buffers of its tree */
    moe_tensor *flat_compute;               /* mixed precision (root only): the compute copy of flat_values */
    moe_dtype compute_dtype;                /* root only: MOE_F32, or MOE_BF16 under mixed precision */
    struct moe_master_split *master;        /* root only: the f32 master split into two planes (master_split.c) */
    /* State that is saved with the model but not trained (the router bias of
     * auxiliary-loss-free balancing): names and tensors, owned. */
    moe_param *buffers;                     /* .grad is NULL */
    int n_buffers;
    int training;                           /* training mode: noise, jitter and bias updates apply */
    void *state;                            /* layer-specific */
};

/* Where initial values come from: (seed, running offset) into the init stream,
 * so a model built twice from one seed is identical on any device. */
typedef struct { uint64_t seed; uint64_t offset; } moe_init;

void moe_layer_retain(moe_layer *l);
void moe_layer_release(moe_layer *l);
/* The tape keeps layers alive through these (void * signatures). */
void moe_layer_retain_v(void *l);
void moe_layer_release_v(void *l);

moe_status moe_layer_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y);
/* y = residual + l(x): a transformer block's residual add, folded into the
 * layer's last op where it has a way (a linear's GEMM, an MoE block's
 * combine), saving a [tokens, hidden] tensor and a pass over it; else the
 * forward and a taped add. */
moe_status moe_layer_forward_residual(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *residual,
                                      moe_tensor **y);
void moe_layer_describe(const moe_layer *l, char *buf, size_t n);

/* Parameters of the whole tree in a stable order, with dotted names
 * ("1.weight", "attn.wq.weight"). Returns the count; fills up to max. */
int moe_layer_num_param_tensors(const moe_layer *l);
int moe_layer_collect_params(moe_layer *l, moe_param *out, int max);
int64_t moe_layer_num_params(const moe_layer *l);       /* scalar count */
moe_param *moe_layer_find_param(moe_layer *l, const char *dotted_name);

/* Buffers of the whole tree, as moe_layer_collect_params does for parameters. */
int moe_layer_num_buffer_tensors(const moe_layer *l);
int moe_layer_collect_buffers(moe_layer *l, moe_param *out, int max);
/* Adds a buffer (takes a reference). */
moe_status moe_layer_add_buffer(moe_layer *l, const char *name, moe_tensor *t);
/* Training mode for the whole tree. */
void moe_layer_set_training(moe_layer *l, int on);

/* Moves every parameter of the tree into one fresh value buffer and one grad
 * buffer on `dev` (values kept, grads zeroed). */
moe_status moe_layer_flatten(moe_ctx *ctx, moe_layer *l, moe_device dev);
/* Zeroes the tree's gradients (their memory: a tensor fetched before reads 0). */
moe_status moe_layer_zero_grad(moe_ctx *ctx, moe_layer *l);
/* The same as far as gradients read through the layer go, but on a flat buffer
 * the parameters with grad_lazy_zero are only marked (grad_zero_pending): their
 * memory is cleared by their next writer (beta 0) or by moe_layer_settle_grads.
 * For training loops, which read gradients only through the layer. */
moe_status moe_layer_zero_grad_lazy(moe_ctx *ctx, moe_layer *l);
/* Clears the memory of every pending gradient in the tree: call before reading
 * gradients (optimisers, norms, all-reduce, Lua access). Cheap when none is. */
moe_status moe_layer_settle_grads(moe_ctx *ctx, moe_layer *l);
/* The same for the pending gradients in storage s that overlap elements [lo, hi). */
moe_status moe_layer_settle_grads_range(moe_ctx *ctx, moe_layer *l, const moe_storage *s, int64_t lo, int64_t hi);
/* For a writer that accumulates into p's gradient: 0 (overwrite) when it is
 * pending zero, else 1; after the write succeeds, moe_param_grad_written clears
 * the mark (a failed write leaves it, so the old memory is never read as valid). */
float moe_param_grad_beta(const moe_param *p);
void moe_param_grad_written(moe_param *p);

/* Mixed precision (precision.c). MOE_BF16 on a root that owns flat buffers:
 * the f32 values stay the parameters (master weights, optimiser input,
 * checkpoints); a bf16 copy (flat_compute, one view per parameter in
 * moe_param.compute) is what layers compute with, and gradients become bf16.
 * The copy rounds ties away from zero (ops.h, moe_master_hi).
 * MOE_F32 turns it off (gradients f32 again, zeroed). Needs a CUDA device:
 * the CPU backend computes in f32 only. Survives moe_layer_flatten (to()). */
moe_status moe_layer_set_compute_dtype(moe_ctx *ctx, moe_layer *root, moe_dtype dt);
/* Copies the f32 values into the compute copy: call after writing parameters
 * other than through the optimiser (loading a checkpoint, editing weights).
 * A no-op without mixed precision. */
moe_status moe_layer_refresh_compute(moe_ctx *ctx, moe_layer *root);

/* ---- the split master (master_split.c) ----
 * Under bf16 precision an optimiser keeps the f32 master weights as the bf16
 * compute copy plus an i16 low plane (ops.h, moe_master_hi) and gives the
 * f32 buffer's memory back; any read or write of the f32 values brings them
 * back (a join), and the next split takes them as they are then.
 * split: splits (*split = 1), or leaves the root as it is (*split = 0) when it
 * has no bf16 compute copy over a buffer of its own; already split: nothing
 * to do. Refused while the device captures a CUDA graph.
 * join: the f32 values back in their buffer (no-op unless split).
 * drop: join, then forget the planes (before the buffers or the precision change).
 * release: the layer's part of the state, when the layer goes.
 * lo: the low plane while split, else NULL. counts: whether split now and how
 * many splits and joins there were. */
typedef struct moe_master_split moe_master_split;
moe_status moe_layer_master_split(moe_ctx *ctx, moe_layer *root, int *split);
moe_status moe_layer_master_join(moe_ctx *ctx, moe_layer *root);
moe_status moe_layer_master_drop(moe_ctx *ctx, moe_layer *root);
void moe_layer_master_release(moe_layer *root);
moe_tensor *moe_layer_master_lo(const moe_layer *root);
void moe_layer_master_counts(const moe_layer *root, int *parked, uint64_t *splits, uint64_t *joins);

/* ---- activations recomputed in the backward (remat.c) ----
 * park: gives t's memory back now; the first access through any view runs
 * fn(ctx, out, arg) into fresh memory (out: a header like t over it), then
 * free_arg(arg). t must be the whole of an allocator's storage, contiguous;
 * otherwise nothing is parked (*parked = 0) and arg is freed at once.
 * The recipe must give the bytes t holds now (the forward's op over inputs
 * that arg keeps). is_parked: t's memory is given back to a recipe. */
typedef moe_status (*moe_remat_fn)(moe_ctx *ctx, moe_tensor *out, void *arg);
moe_status moe_remat_park(moe_ctx *ctx, moe_tensor *t, moe_remat_fn fn, void *arg, void (*free_arg)(void *),
                          int *parked);
int moe_remat_is_parked(const moe_tensor *t);
/* The common case: y made by layer l from x (both retained until the recipe
 * has run or y goes), with an integer and a float for the recipe; fn gets a
 * moe_remat_layer_arg. */
typedef struct { moe_layer *l; moe_tensor *x; int64_t i; float f; } moe_remat_layer_arg;
moe_status moe_remat_layer_output(moe_ctx *ctx, moe_tensor *y, moe_remat_fn fn, moe_layer *l, moe_tensor *x,
                                  int64_t i, float f);

/* ---- for layer implementations ---- */
/* Re-points tensor header t (contiguous) at storage s from element offset, as dtype dt;
 * every holder of the header sees the move. */
void moe_layer_repoint(moe_tensor *t, moe_storage *s, int64_t offset, moe_dtype dt);
moe_layer *moe_layer_alloc(const moe_layer_vtable *vt, int n_params, int n_children);
/* Allocates parameter `idx` with the given shape on the cpu (value uninitialised, grad zero). */
moe_status moe_layer_init_param(moe_layer *l, int idx, const char *name, int ndim, const int64_t *shape);
moe_status moe_layer_set_child(moe_layer *l, int idx, const char *name, moe_layer *child); /* retains */
/* Fills a parameter from the init stream: normal(0, std) or uniform(-a, a). */
moe_status moe_param_init_normal(moe_ctx *ctx, moe_param *p, moe_init *init, float std);
moe_status moe_param_init_uniform(moe_ctx *ctx, moe_param *p, moe_init *init, float a);

/* ---- built-in layers (NULL + error on bad configuration) ---- */
moe_layer *moe_linear_new(moe_ctx *ctx, int64_t in, int64_t out, int bias, moe_init *init);
moe_layer *moe_embedding_new(moe_ctx *ctx, int64_t vocab, int64_t dim, moe_init *init);
moe_layer *moe_rmsnorm_new(moe_ctx *ctx, int64_t dim, float eps);
int moe_layer_is_rmsnorm(const moe_layer *l);
/* y = rope(rmsnorm(x)) per head with the RMSNorm layer l's weight and eps, x [B, T, heads * D]
 * (QK-norm feeding attention; one pass each way where the backend fuses them) */
moe_status moe_rmsnorm_rope_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, int64_t heads,
                                    float theta, moe_tensor **y);
/* With the tape's recompute on (moe_tape_recompute): parks y, the output of
 * RMSNorm l over x (heads > 0: rmsnorm_rope's, with theta), once its readers
 * in the forward are done; the backward's first read recomputes it from x
 * (which the norm's tape entry keeps). A no-op otherwise. */
moe_status moe_rmsnorm_recompute_later(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *y,
                                       int64_t heads, float theta);
/* The same for y = x W^T (+ b), the output of the plain Linear l over x,
 * where the tape's recompute has one of the bits in `modes`: the backward's
 * first read (if any) runs its GEMM again. */
moe_status moe_linear_recompute_later(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor *y,
                                      int modes);
moe_layer *moe_layernorm_new(moe_ctx *ctx, int64_t dim, float eps, int bias);
/* An elementwise activation (MOE_UN_SILU, GELU, GELU_ERF, RELU, TANH, SIGMOID). */
moe_layer *moe_activation_new(moe_unary_op op);

typedef struct {
    int64_t hidden, n_heads, n_kv_heads, head_dim;   /* head_dim 0: hidden / n_heads */
    float rope_theta;                                /* 0: no rotary embedding */
    int causal, bias, qk_norm;                       /* bias: on all four projections; qk_norm: RMSNorm on q and k (OLMoE) */
    float norm_eps;
    int qkv_bias;                                    /* bias on q, k and v only, not o (Qwen2) */
} moe_attention_cfg;
moe_layer *moe_attention_new(moe_ctx *ctx, const moe_attention_cfg *cfg, moe_init *init);

typedef enum { MOE_FFN_SWIGLU, MOE_FFN_GELU } moe_ffn_kind;
moe_layer *moe_ffn_new(moe_ctx *ctx, int64_t hidden, int64_t inner, moe_ffn_kind kind, int bias, moe_init *init);

/* Applies children in order; takes references to them and flattens the tree. */
moe_layer *moe_sequential_new(moe_ctx *ctx, moe_layer **children, int n);
/* Children grouped for their parameters only (names may be NULL: "0", "1", ...). */
moe_layer *moe_module_list_new(moe_ctx *ctx, moe_layer **children, const char *const *names, int n);

int moe_layer_is(const moe_layer *l, const char *kind);

#endif
