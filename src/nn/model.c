#include "model.h"
#include "functional.h"
#include "../dist/comm.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

enum { C_EMBED, C_LAYERS, C_NORM, C_HEAD };
enum { B_NORM1, B_ATTN, B_NORM2, B_MLP };

typedef struct {
    moe_model_cfg cfg;
    moe_comm *ar_comm;     /* data parallel: gradients all-reduced during backward (borrowed), or NULL */
    int armed;             /* the next forward records the markers that start those all-reduces */
    int64_t watermark;     /* flat-gradient elements from here to the end are queued */
    moe_dist_op ar_op;     /* average (data parallel) or sum (sharded experts) */
    int64_t *skip;         /* [2 * n_skip] sorted [lo, hi) element ranges left out (sharded experts), owned */
    int n_skip;
} model_state;

int moe_model_layer_is_moe(const moe_model_cfg *c, int64_t i) {
    if (c->moe_every <= 0 || i < c->first_dense) return 0;
    if (i >= 0 && i < MOE_MODEL_MAX_LAYERS && (c->mlp_only[i / 64] >> (i % 64) & 1)) return 0;
    return c->moe_every == 1 || (i % c->moe_every) == c->moe_every - 1;
}

moe_status moe_model_cfg_check(const moe_model_cfg *c) {
    if (c->vocab <= 0) return moe_error(MOE_ERR_ARG, "model: vocab_size must be positive, got %lld", (long long)c->vocab);
    if (c->hidden <= 0) return moe_error(MOE_ERR_ARG, "model: hidden_size must be positive, got %lld", (long long)c->hidden);
    if (c->layers <= 0) return moe_error(MOE_ERR_ARG, "model: num_layers must be positive, got %lld", (long long)c->layers);
    if (c->layers > MOE_MODEL_MAX_LAYERS)
        return moe_error(MOE_ERR_ARG, "model: at most %d layers, got %lld", MOE_MODEL_MAX_LAYERS, (long long)c->layers);
    if (c->heads <= 0) return moe_error(MOE_ERR_ARG, "model: num_heads must be positive, got %lld", (long long)c->heads);
    if (c->head_dim == 0 && c->hidden % c->heads)
        return moe_error(MOE_ERR_ARG, "model: hidden_size (%lld) must be divisible by num_heads (%lld)",
                         (long long)c->hidden, (long long)c->heads);
    if (c->kv_heads < 0 || (c->kv_heads && c->heads % c->kv_heads))
        return moe_error(MOE_ERR_ARG, "model: num_heads (%lld) must be a multiple of num_kv_heads (%lld)",
                         (long long)c->heads, (long long)c->kv_heads);
    if (c->moe_every < 0) return moe_error(MOE_ERR_ARG, "model: moe_layer_frequency must be >= 0");
    if (c->first_dense < 0) return moe_error(MOE_ERR_ARG, "model: first_dense_layers must be >= 0");
    int any_dense = 0;
    for (int64_t i = 0; i < c->layers; i++) any_dense |= !moe_model_layer_is_moe(c, i);
    if (any_dense && c->dense_inner <= 0) return moe_error(MOE_ERR_ARG, "model: intermediate_size must be positive for dense layers");
    if (c->moe_every > 0) MOE_TRY(moe_router_cfg_check(&c->moe.router));
    return MOE_OK;
}

static moe_status model_forward_vt(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return moe_model_forward(l, ctx, tape, x, y);
}

static void model_describe(const moe_layer *l, char *buf, size_t n) {
    const moe_model_cfg *c = &((model_state *)l->state)->cfg;
    int64_t moe_layers = 0;
    for (int64_t i = 0; i < c->layers; i++) moe_layers += moe_model_layer_is_moe(c, i);
    snprintf(buf, n, "MoEModel(%lld layers (%lld MoE), hidden %lld, %lld heads, vocab %lld, %lld experts top-%lld, %lld params)",
             (long long)c->layers, (long long)moe_layers, (long long)c->hidden, (long long)c->heads, (long long)c->vocab,
             (long long)c->moe.router.num_experts, (long long)c->moe.router.top_k, (long long)moe_layer_num_params(l));
}

static void model_destroy(moe_layer *l) {
    model_state *st = l->state;
    if (st) free(st->skip);
    free(st);
}

static const moe_layer_vtable model_vt = {"MoEModel", model_forward_vt, model_describe, model_destroy, NULL};

const moe_model_cfg *moe_model_config(const moe_layer *l) {
    return moe_layer_is(l, "MoEModel") ? &((model_state *)l->state)->cfg : NULL;
}

static moe_layer *make_block(moe_ctx *ctx, const moe_model_cfg *c, int64_t i, moe_layer **custom, moe_init *init) {
    moe_attention_cfg ac = {c->hidden, c->heads, c->kv_heads ? c->kv_heads : c->heads, c->head_dim, c->rope_theta,
                            1, c->attn_bias, c->qk_norm, c->norm_eps, c->qkv_bias};
    moe_layer *kids[4] = {moe_rmsnorm_new(ctx, c->hidden, c->norm_eps), moe_attention_new(ctx, &ac, init),
                          moe_rmsnorm_new(ctx, c->hidden, c->norm_eps), NULL};
    if (moe_model_layer_is_moe(c, i)) {
        moe_block_cfg bc = c->moe;
        bc.hidden = c->hidden;
        if (bc.activation != MOE_FFN_GELU) bc.activation = c->activation;
        bc.seed = init->seed * 1000003u + (uint64_t)i;
        kids[3] = moe_block_new(ctx, &bc, custom, init);
    } else {
        kids[3] = moe_ffn_new(ctx, c->hidden, c->dense_inner, c->activation, 0, init);
    }
    static const char *names[4] = {"input_layernorm", "self_attn", "post_attention_layernorm", "mlp"};
    moe_layer *b = NULL;
    if (kids[0] && kids[1] && kids[2] && kids[3]) b = moe_module_list_new(ctx, kids, names, 4);
    for (int k = 0; k < 4; k++) moe_layer_release(kids[k]);
    return b;
}

moe_layer *moe_model_new(moe_ctx *ctx, const moe_model_cfg *cfg, moe_layer ***custom, moe_init *init) {
    if (moe_model_cfg_check(cfg) != MOE_OK) return NULL;
    moe_model_cfg c = *cfg;
    if (c.norm_eps <= 0) c.norm_eps = 1e-5f;
    int n = (int)c.layers;
    moe_layer **blocks = calloc((size_t)n, sizeof *blocks);
    moe_layer *embed = moe_embedding_new(ctx, c.vocab, c.hidden, init);
    moe_layer *head = c.tie_embeddings ? NULL : moe_linear_new(ctx, c.hidden, c.vocab, 0, init);
    /* its gradient (vocab x hidden, the largest after the experts') is written by
     * the chunked loss with beta 0 when pending (moe_f_linear_cross_entropy), so
     * zero_grad need not clear it; every other path settles it first */
    if (head) head->params[0].grad_lazy_zero = 1;
    moe_layer *norm = moe_rmsnorm_new(ctx, c.hidden, c.norm_eps);
    moe_layer *layers = NULL, *model = NULL;
    moe_status s = blocks && embed && norm && (c.tie_embeddings || head) ? MOE_OK : moe_last_status();
    /* embeddings as in GPT-style models: N(0, 0.02) rather than nn.Embedding's N(0, 1) */
    if (s == MOE_OK) {
        moe_init emb_init = {init->seed, init->offset + 0x7fffffff};
        s = moe_param_init_normal(ctx, &embed->params[0], &emb_init, 0.02f);
    }
    int moe_i = 0;
    for (int i = 0; i < n && s == MOE_OK; i++) {
        int is_moe = moe_model_layer_is_moe(&c, i);
        blocks[i] = make_block(ctx, &c, i, is_moe && custom ? custom[moe_i] : NULL, init);
        moe_i += is_moe;
        if (!blocks[i]) s = moe_last_status();
    }
    if (s == MOE_OK) { layers = moe_module_list_new(ctx, blocks, NULL, n); if (!layers) s = moe_last_status(); }
    if (s == MOE_OK) {
        model = moe_layer_alloc(&model_vt, 0, c.tie_embeddings ? 3 : 4);
        model_state *st = model ? calloc(1, sizeof *st) : NULL;
        if (!st) { s = moe_last_status(); if (model) s = moe_error(MOE_ERR_OOM, "out of host memory"); }
        else {
            st->cfg = c;
            model->state = st;
            moe_layer_set_child(model, C_EMBED, "embed_tokens", embed);
            moe_layer_set_child(model, C_LAYERS, "layers", layers);
            moe_layer_set_child(model, C_NORM, "norm", norm);
            if (head) moe_layer_set_child(model, C_HEAD, "lm_head", head);
            s = moe_layer_flatten(ctx, model, MOE_DEVICE_CPU);
        }
    }
    for (int i = 0; i < n && blocks; i++) moe_layer_release(blocks[i]);
    free(blocks);
    moe_layer_release(embed); moe_layer_release(head); moe_layer_release(norm); moe_layer_release(layers);
    if (s != MOE_OK) { moe_layer_release(model); return NULL; }
    return model;
}

/* ---- gradient all-reduce overlapped with backward ----
 * A marker (a taped identity) on the residual stream at the start of each
 * block: backward reaches it after every entry of that block and of the
 * blocks, norm and head after it, so the flat gradients from the block's first
 * parameter to the end are final (the flat buffer holds embedding, blocks,
 * norm, head in that order), and their average over the ranks is queued. */
/* Queues the reduction of flat-gradient elements [lo, hi), minus the skipped
 * ranges; backward work deferred into a reduced range runs first (tape.h). */
static moe_status reduce_range(moe_layer *m, moe_tape *tape, moe_ctx *ctx, int64_t lo, int64_t hi) {
    model_state *st = m->state;
    int64_t at = lo, base = m->flat_grads->offset;
    for (int k = 0; k <= st->n_skip && at < hi; k++) {
        int64_t s_lo = k < st->n_skip ? st->skip[2 * k] : hi, s_hi = k < st->n_skip ? st->skip[2 * k + 1] : hi;
        if (s_hi <= at) continue;
        int64_t end = s_lo < hi ? s_lo : hi;
        if (tape && end > at)
            MOE_TRY(moe_tape_run_deferred_writing(ctx, tape, m->flat_grads->storage, base + at, base + end));
        /* the range is final now: a gradient in it still pending zero (an expert
         * bank whose backward did not run) is cleared before it is reduced */
        if (end > at) MOE_TRY(moe_layer_settle_grads_range(ctx, m, m->flat_grads->storage, base + at, base + end));
        if (end > at) MOE_TRY(moe_comm_all_reduce_start(st->ar_comm, m->flat_grads, at, end - at, st->ar_op));
        if (s_hi > at) at = s_hi;
    }
    return MOE_OK;
}

static moe_status marker_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_layer *m = e->self;
    model_state *st = m->state;
    if (st->armed && st->ar_comm && m->flat_grads && e->i[0] < st->watermark) {
        MOE_TRY(reduce_range(m, e->tape, ctx, e->i[0], st->watermark));
        st->watermark = e->i[0];
    }
    moe_tensor_retain(gout[0]);
    gin[0] = gout[0];
    return MOE_OK;
}

static moe_status grad_marker(moe_layer *m, moe_tape *tape, moe_layer *block, moe_tensor **h) {
    moe_param first;
    if (!m->flat_grads || moe_layer_collect_params(block, &first, 1) < 1) return MOE_OK;
    if (first.grad->storage != m->flat_grads->storage) return MOE_OK;   /* not flattened into the root: no marker */
    moe_tensor *v = moe_tensor_view(*h, (*h)->ndim, (*h)->shape);
    if (!v) return moe_last_status();
    moe_tape_entry *e = moe_tape_record(tape, "grad_ready", marker_backward, m, moe_layer_retain_v, moe_layer_release_v,
                                        1, h, 1, &v);
    if (!e) { moe_tensor_release(v); return moe_last_status(); }
    e->i[0] = first.grad->offset - m->flat_grads->offset;
    moe_tensor_release(*h);
    *h = v;
    return MOE_OK;
}

moe_status moe_model_set_grad_allreduce(moe_layer *m, moe_comm *comm) {
    return moe_model_set_grad_reduce(m, comm, MOE_DIST_AVG, NULL, 0);
}

moe_status moe_model_set_grad_reduce(moe_layer *m, moe_comm *comm, int op, const int64_t *skip, int n_skip) {
    if (!moe_model_config(m)) return moe_error(MOE_ERR_ARG, "set_grad_allreduce: not an MoEModel");
    if (op != MOE_DIST_AVG && op != MOE_DIST_SUM) return moe_error(MOE_ERR_ARG, "set_grad_allreduce: op must be sum or avg");
    if (n_skip < 0 || (n_skip > 0 && !skip)) return moe_error(MOE_ERR_ARG, "set_grad_allreduce: bad skip ranges");
    int64_t n = m->flat_grads ? moe_tensor_numel(m->flat_grads) : 0;
    for (int k = 0; k < n_skip; k++) {
        int64_t lo = skip[2 * k], hi = skip[2 * k + 1], prev = k ? skip[2 * k - 1] : 0;
        if (lo < prev || hi < lo || hi > n)
            return moe_error(MOE_ERR_ARG, "set_grad_allreduce: skip range %d [%lld, %lld) is not sorted, disjoint and "
                             "within the %lld gradient elements", k + 1, (long long)lo, (long long)hi, (long long)n);
    }
    int64_t *copy = NULL;
    if (n_skip > 0) {
        copy = malloc((size_t)n_skip * 2 * sizeof *copy);
        if (!copy) return moe_error(MOE_ERR_OOM, "out of host memory");
        memcpy(copy, skip, (size_t)n_skip * 2 * sizeof *copy);
    }
    model_state *st = m->state;
    free(st->skip);
    st->skip = copy;
    st->n_skip = n_skip;
    st->ar_op = (moe_dist_op)op;
    st->ar_comm = comm;
    st->armed = 0;
    return MOE_OK;
}

moe_status moe_model_arm_grad_allreduce(moe_layer *m, int on) {
    if (!moe_model_config(m)) return moe_error(MOE_ERR_ARG, "arm_grad_allreduce: not an MoEModel");
    model_state *st = m->state;
    if (on && !st->ar_comm) return moe_error(MOE_ERR_STATE, "arm_grad_allreduce: no communicator set");
    if (on && !m->flat_grads) return moe_error(MOE_ERR_STATE, "arm_grad_allreduce: the model has no flat gradient buffer");
    /* all-reduces queued by a step that never finished (a step skipped for a
     * non-finite loss: every rank skips it alike) are waited for here */
    if (st->ar_comm) MOE_TRY(moe_comm_wait_pending(st->ar_comm));
    st->armed = on;
    st->watermark = m->flat_grads ? moe_tensor_numel(m->flat_grads) : 0;
    return MOE_OK;
}

moe_status moe_model_finish_grad_allreduce(moe_ctx *ctx, moe_layer *m) {
    if (!moe_model_config(m)) return moe_error(MOE_ERR_ARG, "finish_grad_allreduce: not an MoEModel");
    model_state *st = m->state;
    if (!st->ar_comm || !m->flat_grads) return moe_error(MOE_ERR_STATE, "finish_grad_allreduce: no communicator set");
    int64_t n = moe_tensor_numel(m->flat_grads), upto = st->armed ? st->watermark : n;
    moe_status s = reduce_range(m, NULL, ctx, 0, upto);   /* after backward: no deferred work is left */
    moe_status w = moe_comm_wait_pending(st->ar_comm);   /* also after a failed start: nothing stays queued */
    st->armed = 0;
    st->watermark = n;
    return s != MOE_OK ? s : w;
}

/* the blocks and the final norm: the hidden states the head reads */
/* pre (may be NULL): the final norm's input, for moe_rmsnorm_recompute_later */
static moe_status forward_hidden(moe_layer *m, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor **out,
                                 moe_tensor **pre) {
    *out = NULL;
    if (pre) *pre = NULL;
    const moe_model_cfg *c = moe_model_config(m);
    if (!c) return moe_error(MOE_ERR_ARG, "model forward: not an MoEModel");
    if (!ids || ids->dtype != MOE_I64 || ids->ndim != 2) {
        char b[96];
        return moe_error(MOE_ERR_SHAPE, "model forward: ids must be an i64 tensor [batch, seq], got %s %s",
                         ids ? moe_dtype_name(ids->dtype) : "nil", ids ? moe_shape_str(ids, b, sizeof b) : "");
    }
    moe_tensor *h = NULL;
    moe_status s = moe_layer_forward(m->children[C_EMBED], ctx, tape, ids, &h);
    moe_layer *layers = m->children[C_LAYERS];
    for (int i = 0; i < layers->n_children && s == MOE_OK; i++) {
        moe_layer *b = layers->children[i];
        moe_tensor *a = NULL, *h2 = NULL;
        model_state *st = m->state;
        if (tape && st->armed && st->ar_comm) s = grad_marker(m, tape, b, &h);
        /* h + attn(norm1(h)), then h + mlp(norm2(h)): each residual add folded
         * into the sublayer's last op (o_proj's GEMM, the MoE combine) */
        if (s == MOE_OK) s = moe_layer_forward(b->children[B_NORM1], ctx, tape, h, &a);
        if (s == MOE_OK) s = moe_layer_forward_residual(b->children[B_ATTN], ctx, tape, a, h, &h2);
        /* each norm's output is read again only by its sublayer's backward:
         * with the tape's recompute on, made again there from h */
        if (s == MOE_OK) s = moe_rmsnorm_recompute_later(b->children[B_NORM1], ctx, tape, h, a, 0, 0.0f);
        moe_tensor_release(a);
        a = NULL;
        if (s == MOE_OK) { moe_tensor_release(h); h = h2; h2 = NULL; }
        if (s == MOE_OK) s = moe_layer_forward(b->children[B_NORM2], ctx, tape, h, &a);
        if (s == MOE_OK) s = moe_layer_forward_residual(b->children[B_MLP], ctx, tape, a, h, &h2);
        /* (expert parallelism may still be sending a's rows on another stream) */
        if (s == MOE_OK && !moe_block_uses_ep(b->children[B_MLP]))
            s = moe_rmsnorm_recompute_later(b->children[B_NORM2], ctx, tape, h, a, 0, 0.0f);
        moe_tensor_release(a);
        if (s == MOE_OK) { moe_tensor_release(h); h = h2; }
        else moe_tensor_release(h2);   /* a sublayer's output when what followed it failed */
        if (s != MOE_OK) s = moe_error_context(s, "layer %d", i);
    }
    if (s == MOE_OK) s = moe_layer_forward(m->children[C_NORM], ctx, tape, h, out);
    if (s == MOE_OK && pre) *pre = h;
    else moe_tensor_release(h);
    return s;
}

moe_status moe_model_forward(moe_layer *m, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor **logits) {
    *logits = NULL;
    moe_tensor *hn = NULL;
    moe_status s = forward_hidden(m, ctx, tape, ids, &hn, NULL);
    if (s == MOE_OK) {
        if (moe_model_config(m)->tie_embeddings) {
            moe_param *w = &m->children[C_EMBED]->params[0];
            s = moe_f_linear(ctx, tape, hn, moe_param_w(w), w->grad, NULL, NULL, logits);
        } else {
            s = moe_layer_forward(m->children[C_HEAD], ctx, tape, hn, logits);
        }
    }
    moe_tensor_release(hn);
    return s;
}

moe_status moe_model_forward_loss(moe_layer *m, moe_ctx *ctx, moe_tape *tape, moe_tensor *ids, moe_tensor *targets,
                                  int64_t ignore_index, int64_t chunk_rows, float loss_grad, moe_tensor **loss) {
    *loss = NULL;
    if (!moe_model_config(m)) return moe_error(MOE_ERR_ARG, "model forward_loss: not an MoEModel");
    if (!targets || !ids || !moe_tensor_same_shape(targets, ids)) {
        char a[96], b[96];
        return moe_error(MOE_ERR_SHAPE, "model forward_loss: targets %s must match ids %s",
                         targets ? moe_shape_str(targets, a, sizeof a) : "nil", ids ? moe_shape_str(ids, b, sizeof b) : "nil");
    }
    /* the head's weight: the embedding's (tied) or the plain head's; a head with a
     * bias or adapters goes through its layer and the separate loss */
    moe_layer *head = moe_model_config(m)->tie_embeddings ? m->children[C_EMBED] : m->children[C_HEAD];
    int plain = moe_model_config(m)->tie_embeddings || (head->n_params == 1 && !head->state);
    moe_tensor *hn = NULL, *pre = NULL;
    moe_status s = forward_hidden(m, ctx, tape, ids, &hn, &pre);
    if (s == MOE_OK && plain) {
        moe_param *w = &head->params[0];
        moe_head_loss_opts o = {.ignore_index = ignore_index, .chunk_rows = chunk_rows, .upstream_grad = loss_grad,
                          .wgrad_pending = &w->grad_zero_pending};
        /* without a promised upstream gradient the backward adds dW into the gradient: clear it first if pending */
        if (!(tape && loss_grad > 0)) s = moe_layer_settle_grads(ctx, head);
        if (s == MOE_OK) s = moe_f_linear_cross_entropy(ctx, tape, hn, moe_param_w(w), w->grad, targets, &o, loss);
        /* the head's gradients were taken in its forward (the backward only
         * scales them): nothing reads hn again */
        if (s == MOE_OK) s = moe_rmsnorm_recompute_later(m->children[C_NORM], ctx, tape, pre, hn, 0, 0.0f);
        if (s != MOE_OK) { moe_tensor_release(*loss); *loss = NULL; }
    } else if (s == MOE_OK) {
        moe_tensor *logits = NULL;
        s = moe_layer_forward(head, ctx, tape, hn, &logits);
        if (s == MOE_OK)
            s = moe_f_cross_entropy_ex(ctx, tape, logits, targets, ignore_index,
                                       tape ? MOE_CE_GRAD_OVER_LOGITS : MOE_CE_GRAD_LATER, loss);
        moe_tensor_release(logits);
    }
    moe_tensor_release(hn);
    moe_tensor_release(pre);
    return s;
}

int moe_model_moe_layers(moe_layer *m, moe_layer **out, int max) {
    int k = 0;
    if (!moe_model_config(m)) return 0;
    moe_layer *layers = m->children[C_LAYERS];
    for (int i = 0; i < layers->n_children; i++) {
        moe_layer *mlp = layers->children[i]->children[B_MLP];
        if (moe_layer_is_moe(mlp)) {
            if (k < max) out[k] = mlp;
            k++;
        }
    }
    return k;
}

moe_status moe_model_balance_losses(moe_layer *m, moe_ctx *ctx, moe_tape *tape, moe_tensor **aux, moe_tensor **z) {
    *aux = *z = NULL;
    moe_layer *moes[1024];
    int n = moe_model_moe_layers(m, moes, 1024);
    moe_tensor *acc[2] = {moe_tensor_new(ctx, MOE_F32, 0, NULL, m->device), moe_tensor_new(ctx, MOE_F32, 0, NULL, m->device)};
    moe_status s = acc[0] && acc[1] ? moe_op_fill(ctx, acc[0], 0.0) : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, acc[1], 0.0);
    for (int i = 0; i < n && i < 1024 && s == MOE_OK; i++) {
        moe_tensor *parts[2] = {moe_block_last_aux(moes[i]), moe_block_last_z(moes[i])};
        for (int k = 0; k < 2 && s == MOE_OK; k++) {
            if (!parts[k]) continue;
            moe_tensor *next;
            s = moe_f_binary(ctx, tape, MOE_BIN_ADD, acc[k], parts[k], &next);
            if (s == MOE_OK) { moe_tensor_release(acc[k]); acc[k] = next; }
        }
    }
    if (s != MOE_OK) { moe_tensor_release(acc[0]); moe_tensor_release(acc[1]); return s; }
    *aux = acc[0];
    *z = acc[1];
    return MOE_OK;
}

int64_t moe_model_num_active_params(const moe_layer *m) {
    int64_t total = moe_layer_num_params(m);
    moe_layer *moes[1024];
    int n = moe_model_moe_layers((moe_layer *)m, moes, 1024);
    for (int i = 0; i < n && i < 1024; i++) {
        const moe_block_cfg *c = moe_block_config(moes[i]);
        /* the experts child holds every routed expert; a token uses top_k of them */
        int64_t ex = 0;
        for (int k = 0; k < moes[i]->n_children; k++)
            if (!strcmp(moes[i]->child_names[k], "experts")) ex = moe_layer_num_params(moes[i]->children[k]);
        int64_t e = c->router.num_experts, k = c->router.top_k;
        total -= ex - ex / e * k;
    }
    return total;
}
