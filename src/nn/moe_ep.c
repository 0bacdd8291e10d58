/* Expert-parallel exchanges (see moe_ep.h). */
#include "moe_ep.h"

#include <stdlib.h>
#include <string.h>

struct moe_ep_plan {
    int refs;
    moe_comm *comm;
    int ep;
    int64_t el;                       /* experts per rank */
    int64_t sent, received;           /* A and R */
    /* [ep * el], index d * el + j: rows this rank sends for expert j of rank d,
     * and where they start in its dispatched rows (expert-major already) */
    int64_t *send_rows, *send_at;
    /* [ep * el], index src * el + j: rows rank src sends for local expert j,
     * and where they go in the received rows (expert-major, source within) */
    int64_t *recv_rows, *recv_at;
};

static void plan_retain(void *v) { ((moe_ep_plan *)v)->refs++; }
static void plan_release(void *v) {
    moe_ep_plan *p = v;
    if (!p || --p->refs > 0) return;
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
    int64_t *rows = calloc((size_t)e * 4, sizeof *rows);
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
    p->el = el;
    p->send_rows = rows;
    p->send_at = rows + e;
    p->recv_rows = rows + 2 * e;
    p->recv_at = rows + 3 * e;
    /* per-expert counts: block d (experts of rank d) goes to rank d */
    int64_t *c = moe_tensor_data(cnt);
    for (int64_t j = 0; j < e; j++) {
        c[j] = offsets[j + 1] - offsets[j];
        p->send_rows[j] = c[j];
        p->send_at[j] = offsets[j] - offsets[0];
        p->sent += c[j];
    }
    for (int d = 0; d < ep; d++) ecounts[d] = el;
    s = moe_comm_all_to_all_v(comm, cnt, ecounts, rcnt, ecounts);
    if (s == MOE_OK) {
        /* rc[src * el + j]: rows from rank src for local expert j, placed
         * expert-major (then by source), so the bank sees its experts' rows
         * contiguous without a regrouping pass */
        const int64_t *rc = moe_tensor_data(rcnt);
        int64_t at = 0;
        for (int64_t j = 0; j < el; j++)
            for (int src = 0; src < ep; src++) {
                p->recv_rows[src * el + j] = rc[src * el + j];
                p->recv_at[src * el + j] = at;
                at += rc[src * el + j];
            }
        p->received = at;
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

static moe_status new_rows(moe_ctx *ctx, moe_tensor *like, int64_t rows, moe_tensor **out) {
    int64_t shape[2] = {rows, like->shape[1]};
    *out = moe_tensor_new(ctx, like->dtype, 2, shape, like->device);
    return *out ? MOE_OK : moe_last_status();
}

/* The non-empty (peer, expert) blocks, in the order both sides list them:
 * peer-major, expert within, so the k-th block between two ranks pairs up. */
static int make_blocks(const moe_ep_plan *p, const int64_t *rows, const int64_t *at, int64_t h, moe_comm_block *b) {
    int n = 0;
    for (int r = 0; r < p->ep; r++)
        for (int64_t j = 0; j < p->el; j++) {
            int64_t k = r * p->el + j;
            if (!rows[k]) continue;
            b[n].peer = r;
            b[n].offset = (size_t)(at[k] * h);
            b[n].count = (size_t)(rows[k] * h);
            n++;
        }
    return n;
}

/* forward = 1: [A, H] in sender order -> [R, H] grouped by local expert;
 * forward = 0: the way back. */
static moe_status exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, int forward, moe_tensor **out) {
    *out = NULL;
    int64_t have = forward ? p->sent : p->received, want = forward ? p->received : p->sent;
    if (x->ndim != 2 || x->shape[0] != have)
        return moe_error(MOE_ERR_SHAPE, "expert parallel: %lld rows to %s, the plan has %lld",
                         (long long)(x->ndim ? x->shape[0] : 0), forward ? "send" : "return", (long long)have);
    int64_t h = x->shape[1], nb = (int64_t)p->ep * p->el;
    moe_comm_block *b = malloc((size_t)(nb ? nb : 1) * 2 * sizeof *b);
    if (!b) return moe_error(MOE_ERR_OOM, "out of host memory");
    int ns = forward ? make_blocks(p, p->send_rows, p->send_at, h, b) : make_blocks(p, p->recv_rows, p->recv_at, h, b);
    int nr = forward ? make_blocks(p, p->recv_rows, p->recv_at, h, b + nb)
                     : make_blocks(p, p->send_rows, p->send_at, h, b + nb);
    moe_tensor *xc = moe_op_contiguous(ctx, x), *y = NULL;
    moe_status s = xc ? new_rows(ctx, x, want, &y) : moe_last_status();
    if (s == MOE_OK) s = moe_comm_exchange_blocks(p->comm, xc, b, ns, y, b + nb, nr, 1);
    free(b);
    moe_tensor_release(xc);
    if (s != MOE_OK) { moe_tensor_release(y); return s; }
    *out = y;
    return MOE_OK;
}

static moe_status forward_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *x, moe_tensor **out) {
    return exchange(ctx, p, x, 1, out);
}
static moe_status reverse_exchange(moe_ctx *ctx, moe_ep_plan *p, moe_tensor *y, moe_tensor **out) {
    return exchange(ctx, p, y, 0, out);
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
