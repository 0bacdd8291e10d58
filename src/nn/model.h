/* A pre-norm decoder-only transformer whose feed-forward blocks are MoE
 * layers (all, every other, or all but the first few) or dense FFNs:
 *   h = embed(ids); per layer: h += attn(norm(h)); h += mlp(norm(h)); logits = head(norm(h))
 * Children carry Hugging Face names (embed_tokens, layers.N.self_attn.q_proj,
 * layers.N.mlp.gate, layers.N.mlp.experts.up_proj, norm, lm_head). */
#ifndef MOE_MODEL_H
#define MOE_MODEL_H

#include "moe_block.h"

#define MOE_MODEL_MAX_LAYERS 1024

typedef struct {
    int64_t vocab, hidden, layers, heads, kv_heads, head_dim;
    int64_t dense_inner;        /* intermediate size of dense FFN layers */
    float rope_theta, norm_eps;
    int qk_norm, tie_embeddings, attn_bias;
    moe_ffn_kind activation;
    int moe_every;              /* 0: dense model; 1: every layer; 2: every other layer (odd layers, as GLaM) */
    int first_dense;            /* this many leading layers stay dense (DeepSeek) */
    int qkv_bias;               /* bias on q, k, v only (Qwen2); attn_bias puts one on all four projections */
    uint64_t mlp_only[MOE_MODEL_MAX_LAYERS / 64];   /* bit i: layer i stays dense (Qwen2-MoE mlp_only_layers) */
    moe_block_cfg moe;
} moe_model_cfg;

moe_status moe_model_cfg_check(const moe_model_cfg *cfg);
int moe_model_layer_is_moe(const moe_model_cfg *cfg, int64_t layer);
/* custom_experts: NULL, or for each MoE layer in order an array of
 * moe.num_experts expert layers (the model takes references). */
moe_layer *moe_model_new(moe_ctx *ctx, const moe_model_cfg *cfg, moe_layer ***custom_experts, moe_init *init);
const moe_model_cfg *moe_model_config(const moe_layer *model);
/* ids [B, T] i64 -> logits [B, T, vocab]. */
moe_status moe_model_forward(moe_layer *model, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor **logits);
/* The forward to the mean cross-entropy against targets (ids' shape, i64),
 * without the [tokens, vocab] logits: the head and the loss go chunk_rows at a
 * time through moe_f_linear_cross_entropy (functional.h; <= 0: its default
 * chunks), which takes the loss's gradient in the forward. loss_grad > 0
 * (under a tape) promises the backward's upstream gradient of the loss: the
 * head's weight gradient is then added during the forward (functional.h,
 * upstream_grad). A head with a bias or LoRA adapters makes its logits and
 * takes the fused loss over them. */
moe_status moe_model_forward_loss(moe_layer *model, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor *targets,
                                  int64_t ignore_index, int64_t chunk_rows, float loss_grad, moe_tensor **loss);
/* Sum over MoE layers of the last forward's auxiliary and z losses (taped;
 * 0-dim zeros for a dense model). */
moe_status moe_model_balance_losses(moe_layer *model, moe_ctx *ctx, moe_tape *tape, moe_tensor **aux, moe_tensor **z);
/* The MoE layers in order (borrowed), and their count. */
int moe_model_moe_layers(moe_layer *model, moe_layer **out, int max);
/* Parameters touched per token: everything but the routed experts not chosen. */
int64_t moe_model_num_active_params(const moe_layer *model);

/* Data parallel with the gradient all-reduce overlapped with backward:
 * set_grad_allreduce(comm) (NULL: off; the communicator is borrowed);
 * arm_grad_allreduce(1) before the forward whose backward completes the
 * step's gradients (the last micro-batch): that backward queues the average
 * over the ranks of each block's gradients (and everything after the block
 * in the flat buffer) as soon as they are final (moe_comm_all_reduce_start:
 * asynchronous over NCCL on GPUs, blocking elsewhere); finish_grad_allreduce
 * then queues the rest (the embedding, or everything when nothing was armed)
 * and waits for all of it. Every rank must follow the same sequence. */
struct moe_comm;
moe_status moe_model_set_grad_allreduce(moe_layer *model, struct moe_comm *comm);
/* The same with the reduction op (MOE_DIST_AVG or MOE_DIST_SUM) and n_skip
 * sorted, disjoint [lo, hi) element ranges of the flat gradient buffer that
 * are never reduced (skip: 2 * n_skip values, copied): sharded experts, whose
 * gradients are this rank's alone, summed with the others' non-expert ones. */
moe_status moe_model_set_grad_reduce(moe_layer *model, struct moe_comm *comm, int op, const int64_t *skip,
                                     int n_skip);
moe_status moe_model_arm_grad_allreduce(moe_layer *model, int on);
moe_status moe_model_finish_grad_allreduce(moe_ctx *ctx, moe_layer *model);

#endif
