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
    moe_tensor *perm;                 /* i64 [R]: regrouped row k = received row perm[k] */
    moe_tensor *inv;                  /* i64 [R]: its inverse, received row i = regrouped row inv[i] */
};

static void plan_retain(void *v) { ((moe_ep_plan *)v)->refs++; }
static void plan_release(void *v) {
    moe_ep_plan *p = v;
    if (!p || --p->refs > 0) return;
    moe_tensor_release(p->perm);
    moe_tensor_release(p->inv);
    free(p->send_rows);
    free(p);
}
void moe_ep_plan_release(moe_ep_plan *p) { plan_release(p); }
int64_t moe_ep_plan_received(const moe_ep_plan *p) { return p->received; }

moe_status moe_ep_plan_new(moe_ctx *ctx, moe_comm *comm, const int64_t *offsets, int64_t num_experts,
                           int64_t *local_offsets, moe_ep_plan **plan) {
    *plan = NULL;
    int ep = comm->size, rank = comm->rank;
    int64_t e = num_experts;
    if (ep < 1 || e % ep != 0)
        return moe_error(MOE_ERR_ARG, "expert parallel: %lld experts do not split over %d ranks", (long long)e, ep);
    int64_t el = e / ep;
    moe_ep_plan *p = calloc(1, sizeof *p);
    int64_t *rows = calloc((size_t)ep * 2, sizeof *rows);
    int64_t shape[1] = {e};
    moe_tensor *cnt = moe_tensor_new_cpu(MOE_I64, 1, shape), *rcnt = moe_tensor_new_cpu(MOE_I64, 1, shape);
    int64_t *ecounts = calloc((size_t)ep, sizeof *ecounts);
    moe_status s = MOE_OK;
    if (!p || !rows || !ecounts) s = moe_error(MOE_ERR_OOM, "out of host memory");
    else if (!cnt || !rcnt) s = moe_last_status();
    if (s != MOE_OK) {
        free(p); free(rows); free(ecounts); moe_tensor_release(cnt); moe_tensor_release(rcnt);
        return s;
    }
    p->refs = 1;
    p->comm = comm;
    p->ep = ep;
    p->send_rows = rows;
    p->recv_rows = rows + ep;
    /* per-expert counts: block d (experts of rank d) goes to rank d */
    int64_t *c = moe_tensor_data(cnt);
    for (int64_t j = 0; j < e; j++) c[j] = offsets[j + 1] - offsets[j];
    for (int d = 0; d < ep; d++) {
        ecounts[d] = el;
        for (int64_t j = 0; j < el; j++) p->send_rows[d] += c[d * el + j];
        p->sent += p->send_rows[d];
    }
    s = moe_comm_all_to_all_v(comm, cnt, ecounts, rcnt, ecounts);
    /* rc[src * el + j]: rows from rank src for local expert j */
    const int64_t *rc = s == MOE_OK ? moe_tensor_data(rcnt) : NULL;
    if (s == MOE_OK) {
        for (int src = 0; src < ep; src++) {
            for (int64_t j = 0; j < el; j++) p->recv_rows[src] += rc[src * el + j];
            p->received += p->recv_rows[src];
        }
        int64_t pshape[1] = {p->received};
        p->perm = moe_tensor_new_cpu(MOE_I64, 1, pshape);
        p->inv = moe_tensor_new_cpu(MOE_I64, 1, pshape);
        if (!p->perm || !p->inv) s = moe_last_status();
    }
    if (s == MOE_OK) {
        /* received rows are source-major, expert within; regroup expert-major, source within */
        int64_t *perm = moe_tensor_data(p->perm), k = 0;
        for (int64_t j = 0; j < el; j++) {
            int64_t base = 0;
            for (int src = 0; src < ep; src++) {
                int64_t start = base;
                for (int64_t q = 0; q < j; q++) start += rc[src * el + q];
                for (int64_t t = 0; t < rc[src * el + j]; t++) perm[k++] = start + t;
                base += p->recv_rows[src];
            }
        }
        int64_t *inv = moe_tensor_data(p->inv);
        for (int64_t q = 0; q < p->received; q++) inv[perm[q]] = q;
        /* offsets over all E experts: only this rank's are non-empty */
        int64_t acc = 0;
        for (int64_t j = 0; j <= e; j++) {
            local_offsets[j] = acc;
            if (j < e && j / el == rank)
                for (int src = 0; src < ep; src++) acc += rc[src * el + (j - rank * el)];
        }
    }
    free(ecounts);
    moe_tensor_release(cnt);
    moe_tensor_release(rcnt);
    if (s != MOE_OK) { plan_release(p); return moe_error_context(s, "expert parallel dispatch"); }
    *plan = p;
    return MOE_OK;
}

/* The permutation and its inverse are built on the host; rows may live on a
 * GPU. Move them to their device once (the plan is reused by the backward
 * exchange), marked as checked indices (values < R by construction), so the
 * gathers need no range-check sync. */
static moe_status move_index(moe_ctx *ctx, moe_tensor **t, moe_device dev, int64_t bound) {
    if (moe_device_eq((*t)->device, dev)) return MOE_OK;
    moe_tensor *moved = moe_op_to(ctx, *t, dev, MOE_I64);
    if (!moved) return moe_last_status();
    moe_tensor_set_index_bound(moved, bound);
    moe_tensor_release(*t);
    *t = moved;
    return MOE_OK;
}
static moe_status perm_on(moe_ctx *ctx, moe_ep_plan *p, moe_device dev) {
    MOE_TRY(move_index(ctx, &p->perm, dev, p->received));
    return move_index(ctx, &p->inv, dev, p->received);
}

static moe_status new_rows(moe_ctx *ctx, moe_tensor *like, int64_t rows, moe_tensor **out) {
    int64_t shape[2] = {rows, like->shape[1]};
    *out = moe_tensor_new(ctx, like->dtype, 2, shape, like->device);
    return *out ? MOE_OK : moe_last_status();
}

static void scale_counts(const int64_t *rows, int n, int64_t by, int64_t *out) {
    for (int i = 0; i < n; i++) out[i] = rows[i] * by;
}

/* [A, H] in sender order -> [R, H] regrouped by local expert */
static moe_status forward_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    *out = NULL;
    if (x->ndim != 2 || x->shape[0] != p->sent)
        return moe_error(MOE_ERR_SHAPE, "expert parallel: %lld rows to send, the plan has %lld",
                         (long long)(x->ndim ? x->shape[0] : 0), (long long)p->sent);
    int64_t h = x->shape[1];
    int64_t *sc = calloc((size_t)p->ep * 2, sizeof *sc);
    if (!sc) return moe_error(MOE_ERR_OOM, "out of host memory");
    int64_t *rcv = sc + p->ep;
    scale_counts(p->send_rows, p->ep, h, sc);
    scale_counts(p->recv_rows, p->ep, h, rcv);
    moe_tensor *xc = moe_op_contiguous(ctx, x), *recv = NULL, *y = NULL;
    moe_status s = xc ? new_rows(ctx, x, p->received, &recv) : moe_last_status();
    if (s == MOE_OK) s = moe_comm_all_to_all_v_queued(p->comm, xc, sc, recv, rcv);
    if (s == MOE_OK) s = new_rows(ctx, x, p->received, &y);
    if (s == MOE_OK && p->received > 0) s = perm_on(ctx, p, recv->device);
    if (s == MOE_OK && p->received > 0) s = moe_op_index_select(ctx, y, recv, p->perm);
    free(sc);
    moe_tensor_release(xc);
    moe_tensor_release(recv);
    if (s != MOE_OK) { moe_tensor_release(y); return s; }
    *out = y;
    return MOE_OK;
}

/* [R, H] regrouped -> [A, H] back in each sender's order */
static moe_status reverse_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *y, moe_tensor **out) {
    *out = NULL;
    if (y->ndim != 2 || y->shape[0] != p->received)
        return moe_error(MOE_ERR_SHAPE, "expert parallel: %lld rows to return, the plan has %lld",
                         (long long)(y->ndim ? y->shape[0] : 0), (long long)p->received);
    int64_t h = y->shape[1];
    int64_t *sc = calloc((size_t)p->ep * 2, sizeof *sc);
    if (!sc) return moe_error(MOE_ERR_OOM, "out of host memory");
    int64_t *rcv = sc + p->ep;
    scale_counts(p->recv_rows, p->ep, h, sc);
    scale_counts(p->send_rows, p->ep, h, rcv);
    moe_tensor *yc = moe_op_contiguous(ctx, y), *back = NULL, *x = NULL;
    moe_status s = yc ? new_rows(ctx, y, p->received, &back) : moe_last_status();
    /* undo the regrouping: back[perm[k]] = y[k], i.e. back[i] = y[inv[i]] (a gather) */
    if (s == MOE_OK && p->received > 0) s = perm_on(ctx, p, yc->device);
    if (s == MOE_OK && p->received > 0) s = moe_op_index_select(ctx, back, yc, p->inv);
    if (s == MOE_OK) s = new_rows(ctx, y, p->sent, &x);
    if (s == MOE_OK) s = moe_comm_all_to_all_v_queued(p->comm, back, sc, x, rcv);
    free(sc);
    moe_tensor_release(yc);
    moe_tensor_release(back);
    if (s != MOE_OK) { moe_tensor_release(x); return s; }
    *out = x;
    return MOE_OK;
}

static moe_status ep_dispatch_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    return reverse_exchange(ctx, e->self, gout[0], &gin[0]);
}

static moe_status ep_combine_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    return forward_exchange(ctx, e->self, gout[0], &gin[0]);
}

moe_status moe_f_ep_dispatch(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *xp, moe_tensor **xl) {
    moe_status s = forward_exchange(ctx, p, xp, xl);
    if (s == MOE_OK && tape &&
        !moe_tape_record(tape, "ep_dispatch", ep_dispatch_backward, p, plan_retain, plan_release, 1, &xp, 1, xl)) {
        s = moe_last_status();
        moe_tensor_release(*xl);
        *xl = NULL;
    }
    return s == MOE_OK ? s : moe_error_context(s, "expert parallel dispatch");
}

moe_status moe_f_ep_combine(moe_ctx *ctx, moe_tape *tape, moe_ep_plan *p, moe_tensor *yl, moe_tensor **yp) {
    moe_status s = reverse_exchange(ctx, p, yl, yp);
    if (s == MOE_OK && tape &&
        !moe_tape_record(tape, "ep_combine", ep_combine_backward, p, plan_retain, plan_release, 1, &yl, 1, yp)) {
        s = moe_last_status();
        moe_tensor_release(*yp);
        *yp = NULL;
    }
    return s == MOE_OK ? s : moe_error_context(s, "expert parallel combine");
}
