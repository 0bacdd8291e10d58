/* Expert-parallel exchanges (see moe_ep.h). */
#include "moe_ep.h"

#include <stdlib.h>
#include <string.h>

struct moe_ep_plan {
    int refs;
    moe_comm *comm;
    int ep;
    int64_t *send_rows, *recv_rows;   /* [ep] each */
    int64_t sent, received;           /* A and R */
    int64_t el;                       /* experts per rank */
    int64_t *rcounts;                 /* [ep * el]: rows from rank src for local expert j at src * el + j */
    moe_tensor *perm;                 /* i64 [R] once built: regrouped row k = received row perm[k] */
    moe_tensor *inv;                  /* i64 [R]: its inverse, received row i = regrouped row inv[i] */
    /* token rows (one per token and owning rank), when the plan has them */
    int64_t *tsend_rows, *trecv_rows; /* [ep] each */
    int64_t tsent, treceived;         /* S and U */
    int64_t *adjust;                  /* [ep]: send row -> the receiver's row (moe_op_ep_pack) */
};

static void plan_retain(void *v) { ((moe_ep_plan *)v)->refs++; }
static void plan_release(void *v) {
    moe_ep_plan *p = v;
    if (!p || --p->refs > 0) return;
    moe_tensor_release(p->perm);
    moe_tensor_release(p->inv);
    free(p->send_rows);
    free(p->tsend_rows);
    free(p->rcounts);
    free(p);
}
void moe_ep_plan_release(moe_ep_plan *p) { plan_release(p); }
int64_t moe_ep_plan_received(const moe_ep_plan *p) { return p->received; }
int64_t moe_ep_plan_tokens_received(const moe_ep_plan *p) { return p->treceived; }
const int64_t *moe_ep_plan_token_adjust(const moe_ep_plan *p) { return p->adjust; }

/* A plan from every rank's counts g[src * (E + ep) + x] (rank src's count
 * x: E per-expert counts, then ep token-row counts). */
static moe_status plan_from(moe_comm *comm, const int64_t *g, int64_t e, int64_t *local_offsets, moe_ep_plan **plan) {
    *plan = NULL;
    const int ep = comm->size, rank = comm->rank;
    const int64_t el = e / ep, w = e + ep;
    moe_ep_plan *p = calloc(1, sizeof *p);
    int64_t *rows = calloc((size_t)ep * 2, sizeof *rows), *trows = calloc((size_t)ep * 3, sizeof *trows);
    int64_t *rcounts = malloc((size_t)(ep * el) * sizeof *rcounts);
    if (!p || !rows || !trows || !rcounts) {
        free(p); free(rows); free(trows); free(rcounts);
        return moe_error(MOE_ERR_OOM, "out of host memory");
    }
    p->refs = 1;
    p->comm = comm;
    p->ep = ep;
    p->el = el;
    p->send_rows = rows;
    p->recv_rows = rows + ep;
    p->tsend_rows = trows;
    p->trecv_rows = trows + ep;
    p->adjust = trows + 2 * ep;
    p->rcounts = rcounts;
    const int64_t *mine = g + (int64_t)rank * w;
    for (int d = 0; d < ep; d++) {
        for (int64_t j = 0; j < el; j++) p->send_rows[d] += mine[d * el + j];
        p->sent += p->send_rows[d];
    }
    for (int src = 0; src < ep; src++) {
        for (int64_t j = 0; j < el; j++) p->recv_rows[src] += g[src * w + rank * el + j];
        p->received += p->recv_rows[src];
    }
    /* token rows: rank d receives rank 0's block, then rank 1's, ...; this
     * rank's send row for d (send order: ranks one after another) becomes
     * row (its rows before d subtracted, the earlier senders' added) */
    int64_t before = 0;
    for (int d = 0; d < ep; d++) {
        p->tsend_rows[d] = mine[e + d];
        p->trecv_rows[d] = g[d * w + e + rank];
        p->tsent += p->tsend_rows[d];
        p->treceived += p->trecv_rows[d];
        int64_t earlier = 0;
        for (int src = 0; src < rank; src++) earlier += g[src * w + e + d];
        p->adjust[d] = earlier - before;
        before += p->tsend_rows[d];
    }
    for (int src = 0; src < ep; src++)
        for (int64_t j = 0; j < el; j++) p->rcounts[src * el + j] = g[src * w + rank * el + j];
    /* offsets over all E experts: only this rank's are non-empty */
    int64_t acc = 0;
    for (int64_t j = 0; j <= e; j++) {
        local_offsets[j] = acc;
        if (j < e && j / el == rank)
            for (int src = 0; src < ep; src++) acc += g[src * w + j];
    }
    *plan = p;
    return MOE_OK;
}

static moe_status check_split(const moe_comm *comm, int64_t e) {
    if (comm->size < 1 || e % comm->size != 0)
        return moe_error(MOE_ERR_ARG, "expert parallel: %lld experts do not split over %d ranks", (long long)e, comm->size);
    return MOE_OK;
}

moe_status moe_ep_plan_new(moe_ctx *ctx, moe_comm *comm, const int64_t *offsets, int64_t num_experts,
                           int64_t *local_offsets, moe_ep_plan **plan) {
    (void)ctx;
    *plan = NULL;
    const int64_t e = num_experts;
    MOE_TRY(check_split(comm, e));
    const int ep = comm->size;
    const int64_t w = e + ep;   /* per rank: E expert counts, then ep token counts */
    int64_t shape[1] = {w}, gshape[1] = {w * ep};
    moe_tensor *cnt = moe_tensor_new_cpu(MOE_I64, 1, shape), *all = moe_tensor_new_cpu(MOE_I64, 1, gshape);
    moe_status s = cnt && all ? MOE_OK : moe_last_status();
    if (s == MOE_OK) {
        /* every rank learns every rank's per-expert counts (block d of
         * experts goes to rank d); no token rows move */
        int64_t *c = moe_tensor_data(cnt);
        for (int64_t j = 0; j < e; j++) c[j] = offsets[j + 1] - offsets[j];
        for (int d = 0; d < ep; d++) c[e + d] = 0;
        s = moe_comm_all_gather(comm, cnt, all);
    }
    if (s == MOE_OK) s = plan_from(comm, moe_tensor_data(all), e, local_offsets, plan);
    moe_tensor_release(cnt);
    moe_tensor_release(all);
    return s == MOE_OK ? s : moe_error_context(s, "expert parallel dispatch");
}

moe_status moe_ep_plan_from_counts(moe_comm *comm, const int64_t *gathered, int64_t num_experts,
                                   int64_t *local_offsets, moe_ep_plan **plan) {
    *plan = NULL;
    MOE_TRY(check_split(comm, num_experts));
    return plan_from(comm, gathered, num_experts, local_offsets, plan);
}

/* The regrouping (perm and its inverse) is built where the rows are, from
 * the counts (moe_op_ep_regroup): a device needs no copy from the host. The
 * plan keeps it for the backward exchanges. */
static moe_status perm_on(moe_ctx *ctx, moe_ep_plan *p, moe_device dev) {
    if (p->perm && moe_device_eq(p->perm->device, dev)) return MOE_OK;
    moe_tensor_release(p->perm);
    moe_tensor_release(p->inv);
    int64_t shape[1] = {p->received};
    p->perm = moe_tensor_new(ctx, MOE_I64, 1, shape, dev);
    p->inv = moe_tensor_new(ctx, MOE_I64, 1, shape, dev);
    moe_status s = p->perm && p->inv ? moe_op_ep_regroup(ctx, p->perm, p->inv, p->rcounts, p->ep, p->el)
                                     : moe_last_status();
    if (s != MOE_OK) {
        moe_tensor_release(p->perm);
        moe_tensor_release(p->inv);
        p->perm = p->inv = NULL;
    }
    return s;
}

static moe_status new_rows(moe_ctx *ctx, moe_tensor *like, int64_t rows, moe_tensor **out) {
    int64_t shape[2] = {rows, like->shape[1]};
    *out = moe_tensor_new(ctx, like->dtype, 2, shape, like->device);
    return *out ? MOE_OK : moe_last_status();
}

/* After a collective started without joining (status `started`): the
 * tape's deferred work but the newest `keep` jobs is queued while it runs,
 * then the compute stream joins it (even when that work failed: the caller
 * releases the collective's buffers next). */
static moe_status overlap_then_join(moe_ctx *ctx, moe_comm *comm, moe_device dev, moe_tape *tape, int keep,
                                   moe_status started) {
    moe_status sd = moe_tape_run_deferred_keep(started == MOE_OK ? ctx : NULL, tape, keep);
    moe_status sj = started == MOE_OK ? moe_comm_join_queued(comm, dev) : MOE_OK;
    return started != MOE_OK ? started : sj != MOE_OK ? sj : sd;
}

/* Rows of x [sum(send), H] go to the ranks in blocks of send[r] rows; *out
 * [sum(recv), H] gets rank r's block of recv[r] rows, ranks in order. Queued
 * on the GPU where the communicator can (moe_comm_all_to_all_v_queued). With
 * `overlap`, that tape's deferred work (moe_tape_defer: the experts' weight
 * gradients) is queued on the compute stream while the rows travel, and the
 * compute stream joins the exchange after it. */
static moe_status exchange_rows_overlap(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, const int64_t *send,
                                        int64_t nsend, const int64_t *recv, int64_t nrecv, moe_tape *overlap, int keep,
                                        moe_tensor **out) {
    *out = NULL;
    if (x->ndim != 2 || x->shape[0] != nsend)
        return moe_error(MOE_ERR_SHAPE, "expert parallel: %lld rows to send, the plan has %lld",
                         (long long)(x->ndim ? x->shape[0] : 0), (long long)nsend);
    int64_t h = x->shape[1];
    int64_t *sc = calloc((size_t)p->ep * 2, sizeof *sc);
    if (!sc) return moe_error(MOE_ERR_OOM, "out of host memory");
    int64_t *rc = sc + p->ep;
    for (int r = 0; r < p->ep; r++) { sc[r] = send[r] * h; rc[r] = recv[r] * h; }
    moe_tensor *xc = moe_op_contiguous(ctx, x), *y = NULL;
    moe_status s = xc ? new_rows(ctx, x, nrecv, &y) : moe_last_status();
    if (s == MOE_OK && !overlap) s = moe_comm_all_to_all_v_queued(p->comm, xc, sc, y, rc);
    if (s == MOE_OK && overlap)
        s = overlap_then_join(ctx, p->comm, x->device, overlap, keep,
                              moe_comm_all_to_all_v_start(p->comm, xc, sc, y, rc));
    free(sc);
    moe_tensor_release(xc);
    if (s != MOE_OK) { moe_tensor_release(y); return s; }
    *out = y;
    return MOE_OK;
}

static moe_status exchange_rows(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, const int64_t *send, int64_t nsend,
                                const int64_t *recv, int64_t nrecv, moe_tensor **out) {
    return exchange_rows_overlap(ctx, p, x, send, nsend, recv, nrecv, NULL, 0, out);
}

/* rows of x reordered: y[i] = x[idx[i]] */
static moe_status reorder(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor *const *idx, moe_tensor **out) {
    *out = NULL;
    moe_tensor *y = NULL;
    moe_status s = new_rows(ctx, x, x->shape[0], &y);
    if (s == MOE_OK && x->shape[0] > 0) s = perm_on(ctx, p, x->device);
    if (s == MOE_OK && x->shape[0] > 0) s = moe_op_index_select(ctx, y, x, *idx);
    if (s != MOE_OK) { moe_tensor_release(y); return s; }
    *out = y;
    return MOE_OK;
}

/* [A, H] in sender order -> [R, H] regrouped by local expert */
static moe_status forward_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    moe_tensor *recv = NULL;
    MOE_TRY(exchange_rows(ctx, p, x, p->send_rows, p->sent, p->recv_rows, p->received, &recv));
    moe_status s = reorder(ctx, p, recv, &p->perm, out);
    moe_tensor_release(recv);
    return s;
}

/* [R, H] regrouped -> [A, H] back in each sender's order */
static moe_status reverse_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *y, moe_tensor **out) {
    *out = NULL;
    if (y->ndim != 2 || y->shape[0] != p->received)
        return moe_error(MOE_ERR_SHAPE, "expert parallel: %lld rows to return, the plan has %lld",
                         (long long)(y->ndim ? y->shape[0] : 0), (long long)p->received);
    /* undo the regrouping: back[perm[k]] = y[k], i.e. back[i] = y[inv[i]] (a gather) */
    moe_tensor *yc = moe_op_contiguous(ctx, y), *back = NULL;
    moe_status s = yc ? reorder(ctx, p, yc, &p->inv, &back) : moe_last_status();
    if (s == MOE_OK) s = exchange_rows(ctx, p, back, p->recv_rows, p->received, p->send_rows, p->sent, out);
    moe_tensor_release(yc);
    moe_tensor_release(back);
    return s;
}

moe_status moe_ep_exchange_assignments(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    moe_status s = exchange_rows(ctx, p, x, p->send_rows, p->sent, p->recv_rows, p->received, out);
    return s == MOE_OK ? s : moe_error_context(s, "expert parallel dispatch");
}

moe_status moe_ep_plan_perm(moe_ctx *ctx, moe_ep_plan *p, moe_device dev, moe_tensor **perm) {
    *perm = NULL;
    if (p->received > 0) MOE_TRY(perm_on(ctx, p, dev));
    *perm = p->perm;
    return MOE_OK;
}

/* the token rows: one per (token, owning rank) to the owners, and back */
static moe_status tokens_out(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    return exchange_rows(ctx, p, x, p->tsend_rows, p->tsent, p->trecv_rows, p->treceived, out);
}
static moe_status tokens_back(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    return exchange_rows(ctx, p, x, p->trecv_rows, p->treceived, p->tsend_rows, p->tsent, out);
}

static moe_status ep_dispatch_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    return reverse_exchange(ctx, e->self, gout[0], &gin[0]);
}
static moe_status ep_combine_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    return forward_exchange(ctx, e->self, gout[0], &gin[0]);
}
/* MOELAB_EP_OVERLAP: "1" or unset overlaps the experts' weight gradients
 * with the exchange of their input gradients; "0" runs them in the experts'
 * backward (for A/B comparisons); read at each backward. */
static moe_status overlap_wanted(int *on) {
    const char *env = getenv("MOELAB_EP_OVERLAP");
    if (env && *env && strcmp(env, "0") && strcmp(env, "1"))
        return moe_error(MOE_ERR_ARG, "MOELAB_EP_OVERLAP is \"%s\", expected 0 or 1", env);
    *on = !(env && !strcmp(env, "0"));
    return MOE_OK;
}

/* Backward of the token rows' way out, after the backward of their way back
 * (which let the experts' backward defer its weight gradients): the input
 * gradients go back to the senders while the first weight-gradient job runs;
 * the second waits for the next layer's first exchange. */
static moe_status ep_tokens_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_ep_plan *p = e->self;
    moe_tape_set_defer(e->tape, 0);
    return exchange_rows_overlap(ctx, p, gout[0], p->trecv_rows, p->treceived, p->tsend_rows, p->tsent, e->tape, 1,
                                 &gin[0]);
}
/* Backward of the way back: the output gradients go to the owners while the
 * weight-gradient job the layer above kept runs; then the experts' backward
 * may defer its own. */
static moe_status ep_tokens_back_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_ep_plan *p = e->self;
    int on = 0;
    MOE_TRY(overlap_wanted(&on));
    MOE_TRY(exchange_rows_overlap(ctx, p, gout[0], p->tsend_rows, p->tsent, p->trecv_rows, p->treceived, e->tape, 0,
                                  &gin[0]));
    moe_tape_set_defer(e->tape, on);
    return MOE_OK;
}

typedef moe_status (*exchange_fn)(moe_ctx *, moe_ep_plan *, moe_tensor *, moe_tensor **);

/* one exchange as a tape entry whose backward is the opposite exchange */
static moe_status taped(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, exchange_fn fn, const char *name,
                        moe_backward_fn back, const char *what, moe_tensor *x, moe_tensor **y) {
    moe_status s = fn(ctx, p, x, y);
    if (s == MOE_OK && tape && !moe_tape_record(tape, name, back, p, plan_retain, plan_release, 1, &x, 1, y)) {
        s = moe_last_status();
        moe_tensor_release(*y);
        *y = NULL;
    }
    return s == MOE_OK ? s : moe_error_context(s, what);
}

moe_status moe_f_ep_dispatch(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xp, moe_tensor **xl) {
    return taped(ctx, tape, p, forward_exchange, "ep_dispatch", ep_dispatch_backward, "expert parallel dispatch", xp, xl);
}
moe_status moe_f_ep_combine(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yl, moe_tensor **yp) {
    return taped(ctx, tape, p, reverse_exchange, "ep_combine", ep_combine_backward, "expert parallel combine", yl, yp);
}
moe_status moe_f_ep_tokens(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xs, moe_tensor **xu) {
    return taped(ctx, tape, p, tokens_out, "ep_tokens", ep_tokens_backward, "expert parallel dispatch", xs, xu);
}
moe_status moe_f_ep_tokens_back(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yu, moe_tensor **ys) {
    return taped(ctx, tape, p, tokens_back, "ep_tokens_back", ep_tokens_back_backward, "expert parallel combine", yu, ys);
}

/* ---- expert parallelism by all_gather / reduce_scatter (moe_ep.h) ---- */

/* backward of the gather: each rank's rows' gradients go home and add up
 * (reduce_scatter), while the deferred weight gradients run */
static moe_status ep_gather_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_comm *comm = e->self;
    moe_tape_set_defer(e->tape, 0);
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]), *dx = NULL;
    moe_status s = g ? new_rows(ctx, g, g->shape[0] / comm->size, &dx) : moe_last_status();
    if (s == MOE_OK)
        s = overlap_then_join(ctx, comm, g->device, e->tape, 1,
                              moe_comm_reduce_scatter_queued(comm, g, dx, MOE_DIST_SUM, 0));
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dx); return s; }
    gin[0] = dx;
    return MOE_OK;
}

moe_status moe_f_ep_gather(moe_ctx *ctx, moe_tape *tape, moe_comm *comm, moe_tensor *x, moe_tensor **xa) {
    *xa = NULL;
    if (x->ndim != 2) return moe_error(MOE_ERR_SHAPE, "expert parallel gather: expected rows [N, H]");
    moe_tensor *xc = moe_op_contiguous(ctx, x), *y = NULL;
    moe_status s = xc ? new_rows(ctx, x, x->shape[0] * comm->size, &y) : moe_last_status();
    /* a copy made here is released on return: the compute stream then waits for the gather */
    if (s == MOE_OK) s = moe_comm_all_gather_queued(comm, xc, y, xc != x);
    moe_tensor_release(xc);
    if (s == MOE_OK && tape && !moe_tape_record(tape, "ep_gather", ep_gather_backward, comm, NULL, NULL, 1, &x, 1, &y))
        s = moe_last_status();
    if (s != MOE_OK) {
        /* the gather may still be running: nothing may reuse y before it ends */
        if (y) moe_comm_join_queued(comm, y->device);
        moe_tensor_release(y);
        return moe_error_context(s, "expert parallel gather");
    }
    *xa = y;
    return MOE_OK;
}

/* backward of the scatter: the gradient of every rank's rows, gathered while
 * the weight-gradient job the layer above kept runs; then the experts'
 * backward may defer its own (run by the gather's backward) */
static moe_status ep_scatter_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    moe_comm *comm = e->self;
    int on = 0;
    MOE_TRY(overlap_wanted(&on));
    moe_tensor *g = moe_op_contiguous(ctx, gout[0]), *dy = NULL;
    moe_status s = g ? new_rows(ctx, g, g->shape[0] * comm->size, &dy) : moe_last_status();
    /* the weight-gradient job the layer above kept runs while the gradients travel */
    if (s == MOE_OK) s = overlap_then_join(ctx, comm, g->device, e->tape, 0, moe_comm_all_gather_queued(comm, g, dy, 0));
    moe_tensor_release(g);
    if (s != MOE_OK) { moe_tensor_release(dy); return s; }
    moe_tape_set_defer(e->tape, on);
    gin[0] = dy;
    return MOE_OK;
}

moe_status moe_f_ep_scatter(moe_ctx *ctx, moe_tape *tape, moe_comm *comm, moe_tensor *yu, moe_tensor **yr) {
    *yr = NULL;
    if (yu->ndim != 2 || yu->shape[0] % comm->size)
        return moe_error(MOE_ERR_SHAPE, "expert parallel scatter: expected [%d * N, H] rows", comm->size);
    moe_tensor *yc = moe_op_contiguous(ctx, yu), *y = NULL;
    moe_status s = yc ? new_rows(ctx, yu, yu->shape[0] / comm->size, &y) : moe_last_status();
    if (s == MOE_OK) s = moe_comm_reduce_scatter_queued(comm, yc, y, MOE_DIST_SUM, 1);
    moe_tensor_release(yc);
    if (s == MOE_OK && tape && !moe_tape_record(tape, "ep_scatter", ep_scatter_backward, comm, NULL, NULL, 1, &yu, 1, &y))
        s = moe_last_status();
    if (s != MOE_OK) { moe_tensor_release(y); return moe_error_context(s, "expert parallel scatter"); }
    *yr = y;
    return MOE_OK;
}
