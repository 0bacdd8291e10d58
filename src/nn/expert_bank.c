/* The routed experts of an MoE layer, all in one layer with stacked weights:
 *   gate_proj [E, I, H], up_proj [E, I, H], down_proj [E, H, I]
 * (each expert's matrices in the [out, in] layout of its dense twin). Rows of
 * its input arrive in expert-contiguous order with offsets, so every
 * projection is one grouped GEMM over all experts. */
#include "moe_block.h"
#include "functional.h"
#include "lora.h"

#include <stdio.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    moe_ffn_kind kind;
    moe_lora *lora;   /* optional LoRA adapters (lora.c), owned */
    /* Expert sharding: the params hold rows [first, first + shape[0]) of the
     * model's `total` experts (expert parallelism keeps only a rank's own). */
    int64_t first, total;
} bank_state;

enum { P_GATE, P_UP, P_DOWN };

static int swiglu_bank(const moe_layer *l) { return ((bank_state *)l->state)->kind == MOE_FFN_SWIGLU; }
static moe_param *bank_param(moe_layer *l, int which) {
    /* GELU banks have no gate: up is params[0], down params[1] */
    if (swiglu_bank(l)) return &l->params[which];
    return &l->params[which == P_UP ? 0 : 1];
}

moe_param *moe_expert_bank_param(moe_layer *l, int which) {
    if (which == P_GATE && !swiglu_bank(l)) return NULL;
    return bank_param(l, which);
}
moe_lora *moe_expert_bank_lora(const moe_layer *l) { return ((bank_state *)l->state)->lora; }
void moe_expert_bank_set_lora(moe_layer *l, moe_lora *lora) {
    bank_state *st = l->state;
    free(st->lora);
    st->lora = lora;
}

/* The weight gradients: d(down) += dy^T h, d(up) += du^T x, d(gate) += dg^T
 * x ("=" for a gradient zero_grad only marked), in two jobs: down and up (GELU: down), then gate (GELU: up). Expert
 * parallelism runs the first while the layer's input gradients travel and
 * keeps the second for the next layer's exchange (moe_ep.c). */
typedef struct {
    moe_layer *l;
    int last;   /* the second job */
    moe_tensor *dy, *h, *du, *dg, *xp, *offs;
    moe_tensor *rows;   /* set: xp is the token rows and these index the experts' rows in them */
} wgrad_args;

/* d(W) (+)= da^T xp, or over xp's gathered rows (the offsets a tensor: on
 * the CPU, or on the device where the routing left them) */
static moe_status wgrad_x(moe_ctx *ctx, const wgrad_args *w, moe_tensor *da, float beta, moe_tensor *grad) {
    return w->rows ? moe_op_gemm_grouped_wgrad_rows_dev(ctx, 1.0f, da, w->xp, w->rows, beta, grad, w->offs)
                   : moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, da, w->xp, beta, grad, w->offs);
}

static moe_status bank_wgrad(moe_ctx *ctx, void *arg) {
    wgrad_args *w = arg;
    int sw = swiglu_bank(w->l);
    moe_param *pg = sw ? bank_param(w->l, P_GATE) : NULL, *pu = bank_param(w->l, P_UP), *pd = bank_param(w->l, P_DOWN);
    moe_status s = MOE_OK;
    /* beta 0 for a gradient zero_grad only marked: the first backward after it
     * overwrites (no memset of the bank's gradients, no read of the old values);
     * the mark goes once the write succeeded */
    if (!w->last) {
        s = moe_op_gemm_grouped_wgrad_dev(ctx, 1.0f, w->dy, w->h, moe_param_grad_beta(pd), pd->grad, w->offs);
        if (s == MOE_OK) moe_param_grad_written(pd);
    }
    if (s == MOE_OK && (sw ? !w->last : w->last)) {
        s = wgrad_x(ctx, w, w->du, moe_param_grad_beta(pu), pu->grad);
        if (s == MOE_OK) moe_param_grad_written(pu);
    }
    if (s == MOE_OK && sw && w->last) {
        s = wgrad_x(ctx, w, w->dg, moe_param_grad_beta(pg), pg->grad);
        if (s == MOE_OK) moe_param_grad_written(pg);
    }
    return s == MOE_OK ? s : moe_error_context(s, "experts.backward");
}

/* *offs as host values: itself on the CPU, else a copy read back from the
 * device (waits for it), which replaces it; for the calls that take host
 * offsets (adapters, the unfused parts) */
static moe_status offsets_to_host(moe_ctx *ctx, moe_tensor **offs) {
    if ((*offs)->device.type == MOE_CPU) return MOE_OK;
    moe_tensor *h = moe_op_to(ctx, *offs, MOE_DEVICE_CPU, MOE_I64);
    if (!h) return moe_last_status();
    moe_tensor_release(*offs);
    *offs = h;
    return MOE_OK;
}

static void wgrad_free(void *arg) {
    wgrad_args *w = arg;
    if (!w) return;
    moe_tensor *all[] = {w->dy, w->h, w->du, w->dg, w->xp, w->offs, w->rows};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    moe_layer_release_v(w->l);
    free(w);
}

static moe_status bank_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_layer *l = e->self;
    int sw = swiglu_bank(l);
    /* token rows in (e->i[2]): the experts' rows are gathered again from them
     * (saved[0] is token_idx, saved[5] the slot map), and their gradient
     * summed back into the token rows below */
    const int tokens = (int)e->i[2];
    moe_tensor *kept = tokens && e->n_saved > 6 ? e->saved[6] : NULL;   /* moe_bank_tokens.keep_rows */
    moe_tensor *xp = tokens ? NULL : e->saved[0], *g = e->saved[2], *u = e->saved[3];
    const moe_lora *lo = moe_expert_bank_lora(l);
    /* before anything is gathered or allocated: the adapters must be the forward's */
    if ((lo ? lo->id : 0) != e->i[0])
        return moe_error(MOE_ERR_STATE, "experts: LoRA adapters were attached, merged or removed between forward and backward");
    /* fused SwiGLU without adapters: the weight gradients gather the rows themselves */
    moe_tensor *rows = tokens && sw && !lo && !kept ? e->saved[0] : NULL;
    if (rows) {
        xp = e->in[0];
        moe_tensor_retain(xp);
    } else if (kept) {
        xp = kept;
        moe_tensor_retain(xp);
    } else if (tokens) {
        moe_tensor *tok = e->saved[0], *x = e->in[0];
        int64_t shape[2] = {tok->shape[0], x->shape[1]};
        xp = moe_tensor_new(ctx, x->dtype, 2, shape, x->device);
        moe_status sx = xp ? moe_op_index_select_slots(ctx, xp, x, tok, e->saved[5]) : moe_last_status();
        if (sx != MOE_OK) { moe_tensor_release(xp); return sx; }
    } else {
        moe_tensor_retain(xp);
    }
    /* the fused SwiGLU forward keeps gate and up only: the activation comes back
     * from the backward's epilogue (e->i[1]) */
    moe_tensor *h = e->i[1] ? moe_tensor_like(ctx, u) : e->saved[4];
    if (!e->i[1]) moe_tensor_retain(h);
    int groups = (int)(e->saved[1]->shape[0] - 1);
    moe_param *pg = sw ? bank_param(l, P_GATE) : NULL, *pu = bank_param(l, P_UP), *pd = bank_param(l, P_DOWN);
    /* combine folded in (e->i[3]): gout is the tokens' gradient; each expert
     * row takes its token's, unweighted (the weights enter in the epilogue) */
    const int combined = (int)e->i[3];
    /* offsets on the device serve the folded path's calls; the others take them on the host */
    moe_tensor *offs = e->saved[1];
    moe_tensor_retain(offs);
    moe_status so = combined && sw && !lo ? MOE_OK : offsets_to_host(ctx, &offs);
    if (so != MOE_OK) {
        moe_tensor_release(offs); moe_tensor_release(h); moe_tensor_release(xp);
        return so;
    }
    const int64_t *off = offs->device.type == MOE_CPU ? moe_tensor_data(offs) : NULL;
    moe_tensor *dy = moe_op_contiguous(ctx, gout[0]);
    if (dy && combined) {
        int64_t ds[2] = {u->shape[0], dy->shape[1]};
        moe_tensor *dyu = moe_tensor_new(ctx, dy->dtype, 2, ds, dy->device);
        /* by token where the device can: each row of dy read once for its k rows */
        moe_status sg = dyu ? moe_op_index_select_slots(ctx, dyu, dy, e->saved[0], e->saved[5]) : moe_last_status();
        moe_tensor_release(dy);
        dy = sg == MOE_OK ? dyu : NULL;
        if (sg != MOE_OK) moe_tensor_release(dyu);
    }
    moe_tensor *dw = combined ? moe_tensor_like(ctx, e->in[1]) : NULL;
    /* SwiGLU without adapters: dh only feeds the activation's backward, so one
     * call may keep it out of memory (a fused epilogue on CUDA) */
    const int fused = sw && !lo;
    moe_tensor *dh = fused ? NULL : moe_tensor_like(ctx, h);
    moe_tensor *dg = sw ? moe_tensor_like(ctx, g) : NULL, *du = moe_tensor_like(ctx, u);
    int64_t dxs[2] = {u->shape[0], xp->shape[1]};   /* the experts' rows (xp may be the token rows) */
    /* a backward that lets go frees gate and up once the activation's backward
     * has read them: the rows' gradient dx is made after that (combined path) */
    const int early = combined && moe_tape_letting_go(e->tape);
    moe_tensor *dx = early ? NULL : moe_tensor_new(ctx, xp->dtype, 2, dxs, xp->device);
    moe_status s = dy && h && (fused || dh) && du && (dx || early) && (!sw || dg) && (!combined || dw)
                   ? MOE_OK : moe_last_status();
    /* down: y = h @ down^T  ->  dh = dy @ down, then the activation */
    if (s == MOE_OK && combined) {   /* h becomes w * h: the down weights' gradient is then dy^T h */
        s = moe_op_gemm_grouped_swiglu_backward_w_dev(ctx, 1.0f, dy, moe_param_w(pd), g, u, e->in[1], dg, du, h, dw,
                                                      offs);
        if (s == MOE_OK && early) {
            moe_tensor_release(e->saved[2]); moe_tensor_release(e->saved[3]);
            e->saved[2] = e->saved[3] = g = u = NULL;
            dx = moe_tensor_new(ctx, xp->dtype, 2, dxs, xp->device);
            if (!dx) s = moe_last_status();
        }
    } else if (s == MOE_OK && fused) {
        s = moe_op_gemm_grouped_swiglu_backward(ctx, 1.0f, dy, moe_param_w(pd), g, u, dg, du, e->i[1] ? h : NULL, off,
                                                groups);
    } else if (s == MOE_OK) {
        s = moe_op_gemm_grouped(ctx, 0, 1.0f, dy, moe_param_w(pd), 0.0f, dh, off, groups);
        if (s == MOE_OK && lo) s = moe_lora_bank_backward(ctx, l, P_DOWN, h, dy, dh, off, groups);
        if (s == MOE_OK) s = sw ? moe_op_swiglu_backward(ctx, dg, du, dh, g, u)
                                : moe_op_unary_backward(ctx, MOE_UN_GELU, du, dh, u, 0.0f);
    }
    /* up (and gate): a = x @ W^T -> dx += da @ W */
    if (s == MOE_OK)   /* SwiGLU: one call; on CUDA's own kernel one pass over K1 + K2 (dx rounded once, not re-read) */
        s = sw ? moe_op_gemm_grouped_pair_dev(ctx, 0, 1.0f, du, moe_param_w(pu), dg, moe_param_w(pg), 0.0f, dx, offs)
               : moe_op_gemm_grouped_dev(ctx, 0, 1.0f, du, moe_param_w(pu), 0.0f, dx, offs);
    if (s == MOE_OK && lo) s = moe_lora_bank_backward(ctx, l, P_UP, xp, du, dx, off, groups);
    if (s == MOE_OK && lo && sw) s = moe_lora_bank_backward(ctx, l, P_GATE, xp, dg, dx, off, groups);
    /* the weight gradients last: under expert parallelism they may wait for
     * the exchanges, which they then overlap (moe_tape_defer) */
    for (int last = 0; last < 2 && s == MOE_OK; last++) {
        wgrad_args *w = calloc(1, sizeof *w);
        if (!w) { s = moe_error(MOE_ERR_OOM, "out of host memory"); break; }
        moe_layer_retain_v(l);
        w->l = l;
        w->last = last;
        /* each job holds only what it reads: the first dy, h (and du, xp), the second dg (GELU: du) and xp */
        int up_here = sw ? !last : last;
        w->dy = last ? NULL : dy;
        w->h = last ? NULL : h;
        w->du = up_here ? du : NULL;
        w->dg = sw && last ? dg : NULL;
        w->xp = up_here || (sw && last) ? xp : NULL;
        w->rows = w->xp ? rows : NULL;
        w->offs = offs;
        moe_tensor *keep[] = {w->dy, w->h, w->du, w->dg, w->xp, w->offs, w->rows};
        for (int i = 0; i < 7; i++) if (keep[i]) moe_tensor_retain(keep[i]);
        moe_param *written[2] = {last ? (sw ? pg : pu) : pd, up_here && !last ? pu : NULL};
        const moe_tensor *writes[2] = {written[0]->grad, written[1] ? written[1]->grad : NULL};
        s = moe_tape_defer_writing(ctx, e->tape, bank_wgrad, wgrad_free, w, writes, written[1] ? 2 : 1);
    }
    moe_tensor_release(dy); moe_tensor_release(dh); moe_tensor_release(dg); moe_tensor_release(du);
    moe_tensor_release(h); moe_tensor_release(xp); moe_tensor_release(offs);
    if (s == MOE_OK && tokens) {   /* the dispatch's backward: each token row sums its experts' rows */
        moe_tensor *dxt = moe_tensor_like(ctx, e->in[0]);
        s = dxt ? moe_op_gather_sum(ctx, dxt, dx, NULL, e->saved[5]) : moe_last_status();
        moe_tensor_release(dx);
        dx = dxt;
    }
    if (s != MOE_OK) { moe_tensor_release(dx); moe_tensor_release(dw); return s; }
    gin[0] = dx;
    if (combined) {
        gin[1] = dw;
        if (e->n_in > 2) {   /* the residual's gradient is the output's, handed over (like an add's) */
            moe_tensor_retain(gout[0]);
            gin[2] = gout[0];
        }
    }
    return MOE_OK;
}

/* tok: the token rows the experts' rows were gathered from (NULL: xp is the input) */
/* offs: the offsets, i64 [groups + 1] on the CPU or on the device (a reference the call takes over) */
static moe_status bank_forward_rows(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp, const moe_bank_tokens *tok,
                                    moe_tensor *offs, int groups, moe_tensor **yp) {
    *yp = NULL;
    int sw = swiglu_bank(l);
    moe_param *pg = sw ? bank_param(l, P_GATE) : NULL, *pu = bank_param(l, P_UP), *pd = bank_param(l, P_DOWN);
    /* xp NULL: the fused SwiGLU GEMM gathers the rows from the token rows */
    if (!offs) return moe_last_status();
    if (!xp && (!tok || !sw || moe_expert_bank_lora(l))) {
        moe_tensor_release(offs);
        return moe_error(MOE_ERR_INTERNAL, "experts: the experts' rows are needed (GELU or adapters) but were not gathered");
    }
    const moe_tensor *src = xp ? xp : tok->x;
    int64_t a = xp ? xp->shape[0] : tok->token_idx->shape[0], inner = pu->value->shape[1], hidden = pu->value->shape[2];
    const moe_lora *lo = moe_expert_bank_lora(l);
    /* the combine folded in: the tokens' rows out, the experts' outputs not kept */
    const int combined = tok && tok->w && sw && !lo;
    /* offsets on the device serve the gathered, folded path; the others take them on the host */
    moe_status s = groups != pu->value->shape[0]
                       ? moe_error(MOE_ERR_SHAPE, "experts: %d groups of rows for %lld experts", groups,
                                   (long long)pu->value->shape[0])
                       : !xp && combined ? MOE_OK : offsets_to_host(ctx, &offs);
    if (s != MOE_OK) { moe_tensor_release(offs); return s; }
    const int64_t *offsets = offs->device.type == MOE_CPU ? moe_tensor_data(offs) : NULL;
    int64_t ish[2] = {a, inner}, hsh[2] = {a, hidden};
    moe_tensor *g = sw ? moe_tensor_new(ctx, src->dtype, 2, ish, src->device) : NULL;
    moe_tensor *u = moe_tensor_new(ctx, src->dtype, 2, ish, src->device);
    moe_tensor *h = moe_tensor_new(ctx, src->dtype, 2, ish, src->device);
    moe_tensor *y = moe_tensor_new(ctx, src->dtype, 2, hsh, src->device);
    s = u && h && y && (!sw || g) ? MOE_OK : moe_last_status();
    if (s == MOE_OK && sw && !lo && !xp) {   /* the same over the token rows, gathered by the GEMM */
        s = moe_op_gemm_grouped_swiglu_rows_dev(ctx, tok->x, tok->token_idx, moe_param_w(pg), moe_param_w(pu), g, u,
                                                h, offs);
    } else if (s == MOE_OK && sw && !lo) {   /* gate, up and the activation in one call (one kernel on CUDA) */
        s = moe_op_gemm_grouped_swiglu(ctx, xp, moe_param_w(pg), moe_param_w(pu), g, u, h, offsets, groups);
    } else if (s == MOE_OK) {
        if (sw) s = moe_op_gemm_grouped(ctx, 1, 1.0f, xp, moe_param_w(pg), 0.0f, g, offsets, groups);
        if (s == MOE_OK && sw && lo) s = moe_lora_bank_forward(ctx, l, P_GATE, xp, g, offsets, groups);
        if (s == MOE_OK) s = moe_op_gemm_grouped(ctx, 1, 1.0f, xp, moe_param_w(pu), 0.0f, u, offsets, groups);
        if (s == MOE_OK && lo) s = moe_lora_bank_forward(ctx, l, P_UP, xp, u, offsets, groups);
        if (s == MOE_OK) s = sw ? moe_op_swiglu(ctx, h, g, u) : moe_op_unary(ctx, MOE_UN_GELU, h, u, 0.0f);
    }
    if (s == MOE_OK) s = moe_op_gemm_grouped_dev(ctx, 1, 1.0f, h, moe_param_w(pd), 0.0f, y, offs);
    if (s == MOE_OK && lo) s = moe_lora_bank_forward(ctx, l, P_DOWN, h, y, offsets, groups);
    if (s == MOE_OK && combined) {
        int64_t ysh[2] = {tok->x->shape[0], hidden};
        moe_tensor *yt = moe_tensor_new(ctx, src->dtype, 2, ysh, src->device);
        s = yt ? moe_op_gather_sum_add(ctx, yt, tok->residual, y, tok->w, tok->slots) : moe_last_status();
        moe_tensor_release(y);
        y = yt;
    }
    if (s == MOE_OK && tape) {
        moe_tensor *ins[3] = {tok ? tok->x : xp, combined ? tok->w : NULL, combined ? tok->residual : NULL};
        int n_in = !combined ? 1 : tok->residual ? 3 : 2;
        moe_tape_entry *e = moe_tape_record(tape, "experts", bank_backward, l, moe_layer_retain_v, moe_layer_release_v,
                                            n_in, ins, 1, &y);
        if (!e) s = moe_last_status();
        else {
            moe_tape_save(e, tok ? tok->token_idx : xp); moe_tape_save(e, offs);
            moe_tape_save(e, g ? g : u);   /* a placeholder keeps saved[] positions fixed */
            moe_tape_save(e, u);
            /* fused SwiGLU: the backward's epilogue writes the activation again
             * (the forward's bytes), so it is not kept between the passes */
            const int again = sw && !lo;
            moe_tape_save(e, again ? u : h);   /* u: a placeholder, saved[5] is the slot map's place */
            if (tok) moe_tape_save(e, tok->slots);
            if (tok && tok->keep_rows && xp) moe_tape_save(e, xp);   /* saved[6]: the rows, not gathered again */
            e->i[0] = lo ? lo->id : 0;   /* the adapters this forward used */
            e->i[1] = again;
            e->i[2] = tok != NULL;
            e->i[3] = combined;
        }
    }
    moe_tensor_release(g); moe_tensor_release(u); moe_tensor_release(h); moe_tensor_release(offs);
    if (s != MOE_OK) { moe_tensor_release(y); return moe_error_context(s, "experts"); }
    *yp = y;
    return MOE_OK;
}

/* the host offsets in a new CPU tensor (NULL on failure, the error set) */
static moe_tensor *offsets_tensor(const int64_t *offsets, int groups) {
    if (!offsets) {
        moe_error(MOE_ERR_ARG, "experts: offsets is NULL, expected %d + 1 row offsets", groups);
        return NULL;
    }
    if (groups < 1) {
        moe_error(MOE_ERR_ARG, "experts: %d groups of rows, expected at least 1", groups);
        return NULL;
    }
    int64_t osh[1] = {groups + 1};
    moe_tensor *offs = moe_tensor_new_cpu(MOE_I64, 1, osh);
    if (offs) memcpy(moe_tensor_data(offs), offsets, (size_t)(groups + 1) * sizeof *offsets);
    return offs;
}

moe_status moe_expert_bank_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp,
                                   const int64_t *offsets, int groups, moe_tensor **yp) {
    return bank_forward_rows(l, ctx, tape, xp, NULL, offsets_tensor(offsets, groups), groups, yp);
}

int64_t moe_expert_bank_inner(const moe_layer *l) {
    return moe_layer_is(l, "ExpertBank") ? bank_param((moe_layer *)l, P_UP)->value->shape[1] : 0;
}

int moe_expert_bank_gathers(const moe_layer *l) {
    return moe_layer_is(l, "ExpertBank") && swiglu_bank(l) && !moe_expert_bank_lora(l);
}

moe_status moe_expert_bank_forward_tokens(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *xp,
                                          const moe_bank_tokens *tok, const int64_t *offsets,
                                          moe_tensor *offsets_dev, int groups, moe_tensor **yp) {
    if (!tok || !tok->x || !tok->token_idx || !tok->slots)
        return moe_error(MOE_ERR_ARG, "experts: token rows need x, token_idx and slots");
    if (tok->keep_rows && !xp) return moe_error(MOE_ERR_ARG, "experts: keep_rows needs the gathered rows xp");
    if (tok->w && !moe_expert_bank_gathers(l))
        return moe_error(MOE_ERR_ARG, "experts: the combine folds into SwiGLU experts without adapters only");
    if (offsets_dev && (offsets_dev->dtype != MOE_I64 || offsets_dev->ndim != 1 || offsets_dev->shape[0] != groups + 1))
        return moe_error(MOE_ERR_SHAPE, "experts: offsets_dev must be i64 [%d]", groups + 1);
    if (offsets_dev && (!moe_tensor_is_contiguous(offsets_dev) ||
                        (offsets_dev->device.type != MOE_CPU && !moe_device_eq(offsets_dev->device, tok->x->device))))
        return moe_error(MOE_ERR_ARG, "experts: offsets_dev must be contiguous, on the CPU or the tokens' device");
    if (offsets_dev) moe_tensor_retain(offsets_dev);
    return bank_forward_rows(l, ctx, tape, xp, tok, offsets_dev ? offsets_dev : offsets_tensor(offsets, groups), groups,
                             yp);
}

static moe_status bank_forward(moe_layer *l, moe_ctx *ctx, moe_tape *tape, moe_tensor *x, moe_tensor **y) {
    return moe_error(MOE_ERR_STATE, "an expert bank runs inside its MoE layer (it needs the routing offsets)");
}

static void bank_describe(const moe_layer *l, char *buf, size_t n) {
    const bank_state *st = l->state;
    moe_tensor *up = l->params[swiglu_bank(l) ? 1 : 0].value;
    const moe_lora *lo = moe_expert_bank_lora(l);
    char extra[96] = "", count[64];
    if (lo) snprintf(extra, sizeof extra, ", LoRA r=%lld alpha=%g%s", (long long)lo->cfg.r, lo->cfg.alpha,
                     lo->cfg.expert_wise ? " per expert" : " shared");
    if (up->shape[0] < st->total)
        snprintf(count, sizeof count, "experts [%lld, %lld) of %lld", (long long)st->first,
                 (long long)(st->first + up->shape[0]), (long long)st->total);
    else
        snprintf(count, sizeof count, "%lld experts", (long long)up->shape[0]);
    snprintf(buf, n, "ExpertBank(%s, %lld -> %lld, %s%s)", count, (long long)up->shape[2], (long long)up->shape[1],
             swiglu_bank(l) ? "swiglu" : "gelu", extra);
}

static void bank_destroy(moe_layer *l) {
    bank_state *st = l->state;
    if (st) free(st->lora);
    free(st);
}

static const moe_layer_vtable bank_vt = {"ExpertBank", bank_forward, bank_describe, bank_destroy, NULL};

moe_layer *moe_expert_bank_new(moe_ctx *ctx, int64_t experts, int64_t hidden, int64_t inner, moe_ffn_kind kind,
                               moe_init *init) {
    if (experts <= 0 || hidden <= 0 || inner <= 0) {
        moe_error(MOE_ERR_ARG, "experts: num_experts, hidden_size and expert intermediate size must be positive");
        return NULL;
    }
    int sw = kind == MOE_FFN_SWIGLU;
    moe_layer *l = moe_layer_alloc(&bank_vt, sw ? 3 : 2, 0);
    bank_state *st = l ? calloc(1, sizeof *st) : NULL;
    if (!st) { moe_layer_release(l); if (l) moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    st->kind = kind;
    st->total = experts;
    l->state = st;
    int64_t in_shape[3] = {experts, inner, hidden}, out_shape[3] = {experts, hidden, inner};
    moe_status s = MOE_OK;
    int i = 0;
    /* as nn.Linear: U(-1/sqrt(fan_in), 1/sqrt(fan_in)) */
    if (sw) {
        s = moe_layer_init_param(l, i, "gate_proj", 3, in_shape);
        if (s == MOE_OK) s = moe_param_init_uniform(ctx, &l->params[i], init, 1.0f / sqrtf((float)hidden));
        i++;
    }
    if (s == MOE_OK) s = moe_layer_init_param(l, i, "up_proj", 3, in_shape);
    if (s == MOE_OK) s = moe_param_init_uniform(ctx, &l->params[i], init, 1.0f / sqrtf((float)hidden));
    i++;
    if (s == MOE_OK) s = moe_layer_init_param(l, i, "down_proj", 3, out_shape);
    if (s == MOE_OK) s = moe_param_init_uniform(ctx, &l->params[i], init, 1.0f / sqrtf((float)inner));
    if (s == MOE_OK) s = moe_layer_flatten(ctx, l, MOE_DEVICE_CPU);
    if (s != MOE_OK) { moe_layer_release(l); return NULL; }
    /* bank_wgrad writes these through moe_param_grad_beta (adapters added later are not) */
    for (int j = 0; j < l->n_params; j++) l->params[j].grad_lazy_zero = 1;
    return l;
}

/* ---- expert sharding ---- */

void moe_expert_bank_range(const moe_layer *l, int64_t *first, int64_t *count, int64_t *total) {
    const bank_state *st = l->state;
    *first = st->first;
    *count = bank_param((moe_layer *)l, P_UP)->value->shape[0];
    *total = st->total;
}

int moe_expert_bank_is_sharded(const moe_layer *l) {
    int64_t first, count, total;
    moe_expert_bank_range(l, &first, &count, &total);
    return count < total;
}

/* The expert banks of the tree in parameter order (pre-order, as
 * moe_layer_collect_params walks it). Returns how many; fills up to max. */
int moe_expert_banks(moe_layer *l, moe_layer **out, int max) {
    int n = 0;
    if (moe_layer_is(l, "ExpertBank")) {
        if (max > 0) out[0] = l;
        return 1;
    }
    for (int c = 0; c < l->n_children; c++)
        if (l->children[c]) n += moe_expert_banks(l->children[c], out ? out + n : NULL, max - n);
    return n;
}

/* The expert params of a bank: gate (SwiGLU only), up, down, in parameter order. */
static int bank_weights(moe_layer *bank, moe_param **out) {
    int n = 0;
    for (int w = P_GATE; w <= P_DOWN; w++) {
        moe_param *p = moe_expert_bank_param(bank, w);
        if (p) out[n++] = p;
    }
    return n;
}

static moe_status check_shard_request(moe_layer *bank, int64_t first, int64_t count, moe_tensor *const *values,
                                      int *next_value, int n_values) {
    if (moe_expert_bank_lora(bank))
        return moe_error(MOE_ERR_ARG, "expert sharding: LoRA adapters on the experts are not supported "
                         "(merge or remove them first)");
    int64_t held_first, held, total;
    moe_expert_bank_range(bank, &held_first, &held, &total);
    if (first < 0 || count < 1 || first + count > total)
        return moe_error(MOE_ERR_ARG, "expert sharding: experts [%lld, %lld) are not within the %lld experts",
                         (long long)first, (long long)(first + count), (long long)total);
    moe_param *ws[3];
    int nw = bank_weights(bank, ws);
    if (!values) {
        if (first < held_first || first + count > held_first + held)
            return moe_error(MOE_ERR_ARG, "expert sharding: experts [%lld, %lld) are not all held here "
                             "(this bank holds [%lld, %lld)); give their values",
                             (long long)first, (long long)(first + count), (long long)held_first,
                             (long long)(held_first + held));
        return MOE_OK;
    }
    for (int k = 0; k < nw; k++, (*next_value)++) {
        if (*next_value >= n_values)
            return moe_error(MOE_ERR_ARG, "expert sharding: %d values given, the expert banks have more weights",
                             n_values);
        const moe_tensor *v = values[*next_value], *p = ws[k]->value;
        int ok = v && v->dtype == MOE_F32 && v->ndim == p->ndim && v->shape[0] == count;
        for (int d = 1; ok && d < p->ndim; d++) ok = v->shape[d] == p->shape[d];
        if (!ok) {
            char got[96];
            return moe_error(MOE_ERR_SHAPE, "expert sharding: value %d for %s must be f32 [%lld, %lld, %lld], got %s %s",
                             *next_value + 1, ws[k]->name, (long long)count, (long long)p->shape[1],
                             (long long)p->shape[2], v ? moe_dtype_name(v->dtype) : "nil",
                             v ? moe_shape_str(v, got, sizeof got) : "");
        }
    }
    return MOE_OK;
}

/* New storage for one expert weight: rows [first, first + count), from `src`
 * (already those rows) or from the rows the param holds now. */
static moe_status new_rows_for(moe_ctx *ctx, moe_param *p, int64_t held_first, int64_t first, int64_t count,
                               moe_tensor *src, moe_tensor **value, moe_tensor **grad) {
    moe_tensor *v = p->value;
    int64_t shape[MOE_MAX_DIMS], row = 1;
    for (int d = 0; d < v->ndim; d++) shape[d] = v->shape[d];
    for (int d = 1; d < v->ndim; d++) row *= v->shape[d];
    shape[0] = count;
    moe_tensor *from = src;
    if (!from) from = moe_tensor_from_storage(v->storage, v->offset + (first - held_first) * row, MOE_F32, v->ndim,
                                              shape, NULL);
    *value = from ? moe_tensor_new(ctx, MOE_F32, v->ndim, shape, v->device) : NULL;
    *grad = *value ? moe_tensor_new(ctx, MOE_F32, v->ndim, shape, v->device) : NULL;
    moe_status s = *grad ? moe_op_copy(ctx, *value, from) : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, *grad, 0.0);
    if (from != src) moe_tensor_release(from);
    return s;
}

moe_status moe_experts_set_shard(moe_ctx *ctx, moe_layer *root, int64_t first, int64_t count,
                                 moe_tensor *const *values, int n_values) {
    if (!root->flat_values)
        return moe_error(MOE_ERR_STATE, "expert sharding: the layer does not own flat parameter buffers (use the model's root)");
    int nb = moe_expert_banks(root, NULL, 0);
    if (nb == 0) return moe_error(MOE_ERR_ARG, "expert sharding: the model has no expert bank");
    moe_layer **banks = calloc((size_t)nb, sizeof *banks);
    /* at most 3 weights per bank: new values and grads, made before anything changes */
    moe_tensor **fresh = calloc((size_t)nb * 6, sizeof *fresh);
    if (!banks || !fresh) { free(banks); free(fresh); return moe_error(MOE_ERR_OOM, "out of host memory"); }
    moe_expert_banks(root, banks, nb);
    moe_status s = MOE_OK;
    int next = 0;
    for (int b = 0; b < nb && s == MOE_OK; b++) s = check_shard_request(banks[b], first, count, values, &next, n_values);
    if (s == MOE_OK && values && next != n_values)
        s = moe_error(MOE_ERR_ARG, "expert sharding: %d values given for %d expert weights", n_values, next);
    /* mixed precision is rebuilt over the new flat buffers */
    moe_dtype mixed = root->flat_compute ? root->compute_dtype : MOE_F32;
    if (s == MOE_OK && mixed != MOE_F32) s = moe_layer_set_compute_dtype(ctx, root, MOE_F32);
    next = 0;
    for (int b = 0; b < nb && s == MOE_OK; b++) {
        moe_param *ws[3];
        int nw = bank_weights(banks[b], ws);
        int64_t held_first = ((bank_state *)banks[b]->state)->first;
        for (int k = 0; k < nw && s == MOE_OK; k++, next++)
            s = new_rows_for(ctx, ws[k], held_first, first, count, values ? values[next] : NULL, &fresh[2 * next],
                             &fresh[2 * next + 1]);
    }
    int repointed = 0;
    if (s == MOE_OK) {
        repointed = 1;
        /* nothing can fail from here to the flatten: re-point every weight at its new rows */
        next = 0;
        for (int b = 0; b < nb; b++) {
            moe_param *ws[3];
            int nw = bank_weights(banks[b], ws);
            for (int k = 0; k < nw; k++, next++) {
                ws[k]->value->shape[0] = ws[k]->grad->shape[0] = count;
                moe_layer_repoint(ws[k]->value, fresh[2 * next]->storage, fresh[2 * next]->offset, MOE_F32);
                moe_layer_repoint(ws[k]->grad, fresh[2 * next + 1]->storage, fresh[2 * next + 1]->offset, MOE_F32);
            }
            ((bank_state *)banks[b]->state)->first = first;
        }
        s = moe_layer_flatten(ctx, root, root->device);
        if (s != MOE_OK)
            s = moe_error_context(s, "expert sharding: the experts changed but the flat buffers could not be rebuilt; "
                                  "the model is unusable");
    }
    /* back to mixed precision, unless the flatten failed over re-pointed weights */
    if (mixed != MOE_F32 && !root->flat_compute && (s == MOE_OK || !repointed)) {
        moe_status m = moe_layer_set_compute_dtype(ctx, root, mixed);
        if (s == MOE_OK) s = m;
    }
    for (int i = 0; i < nb * 6; i++) moe_tensor_release(fresh[i]);
    free(banks);
    free(fresh);
    return s;
}
