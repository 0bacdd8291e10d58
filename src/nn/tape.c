#include "tape.h"
#include "../ops/backend.h"
#include "../ops/ops.h"

#include <stdlib.h>
#include <string.h>
#include <time.h>

/* gradients keyed by tensor identity (the header pointer) */
typedef struct { const moe_tensor *key; moe_tensor *grad; } grad_slot;

struct moe_tape {
    moe_tape_entry *entries;
    int n, cap;
    grad_slot *slots;
    int nslots, used;
    int retain_grads;
    int recompute;                   /* MOE_TAPE_RECOMPUTE_* */
    int one_backward, spent;         /* moe_tape_set_one_backward; its backward has run */
    int profile;                     /* MOE_TAPE_PROFILE_* */
    moe_tape_profile_row *prof;      /* by entry name (names are static strings) */
    int nprof;
    /* deferred backward work (moe_tape_defer), run in order */
    int defer_on, ndeferred;
    struct {
        moe_tape_deferred_fn run;
        void (*free_arg)(void *);
        void *arg;
        const moe_tensor *writes[MOE_TAPE_MAX_IO];
        int nwrites;
    } deferred[MOE_TAPE_MAX_DEFERRED];
};

moe_tape *moe_tape_new(void) {
    moe_tape *t = calloc(1, sizeof *t);
    if (!t) moe_error(MOE_ERR_OOM, "out of host memory for a tape");
    return t;
}

static void clear_grads(moe_tape *t) {
    for (int i = 0; i < t->nslots; i++) {
        if (t->slots[i].grad) moe_tensor_release(t->slots[i].grad);
        t->slots[i] = (grad_slot){0};
    }
    t->used = 0;
}

/* Runs the deferred work in order but the newest `keep` jobs, which move to
 * the front; after a failure the rest is only freed (kept ones too). */
moe_status moe_tape_run_deferred_keep(moe_ctx *ctx, moe_tape *t, int keep) {
    moe_status s = MOE_OK;
    int run = t->ndeferred > keep ? t->ndeferred - keep : 0;
    for (int i = 0; i < run; i++) {
        if (s == MOE_OK && ctx) s = t->deferred[i].run(ctx, t->deferred[i].arg);
        if (t->deferred[i].free_arg) t->deferred[i].free_arg(t->deferred[i].arg);
    }
    int left = t->ndeferred - run;
    for (int i = 0; i < left; i++) t->deferred[i] = t->deferred[run + i];
    t->ndeferred = left;
    if (s != MOE_OK && left) moe_tape_run_deferred_keep(NULL, t, 0);
    return s;
}

moe_status moe_tape_run_deferred(moe_ctx *ctx, moe_tape *t) { return moe_tape_run_deferred_keep(ctx, t, 0); }

moe_status moe_tape_run_deferred_writing(moe_ctx *ctx, moe_tape *t, const void *storage, int64_t lo, int64_t hi) {
    int last = -1;
    for (int i = 0; i < t->ndeferred; i++)
        for (int w = 0; w < t->deferred[i].nwrites; w++) {
            const moe_tensor *x = t->deferred[i].writes[w];
            int64_t a = x->offset, b = x->offset + moe_tensor_numel(x);
            if ((const void *)x->storage == storage && a < hi && lo < b) last = i;
        }
    return last < 0 ? MOE_OK : moe_tape_run_deferred_keep(ctx, t, t->ndeferred - last - 1);
}

void moe_tape_set_defer(moe_tape *t, int on) { t->defer_on = on; }
int moe_tape_defers(const moe_tape *t) { return t && t->defer_on; }

moe_status moe_tape_defer_writing(moe_ctx *ctx, moe_tape *t, moe_tape_deferred_fn run, void (*free_arg)(void *),
                                  void *arg, const moe_tensor *const *writes, int nwrites) {
    if (!t->defer_on || t->ndeferred == MOE_TAPE_MAX_DEFERRED || nwrites > MOE_TAPE_MAX_IO) {
        moe_status s = run(ctx, arg);
        if (free_arg) free_arg(arg);
        return s;
    }
    t->deferred[t->ndeferred].run = run;
    t->deferred[t->ndeferred].free_arg = free_arg;
    t->deferred[t->ndeferred].arg = arg;
    t->deferred[t->ndeferred].nwrites = nwrites > 0 ? nwrites : 0;
    for (int w = 0; w < nwrites; w++) t->deferred[t->ndeferred].writes[w] = writes[w];
    t->ndeferred++;
    return MOE_OK;
}

moe_status moe_tape_defer(moe_ctx *ctx, moe_tape *t, moe_tape_deferred_fn run, void (*free_arg)(void *), void *arg) {
    return moe_tape_defer_writing(ctx, t, run, free_arg, arg, NULL, 0);
}

static void release_entry(moe_tape *t, moe_tape_entry *e);
static grad_slot *find_slot(moe_tape *t, const moe_tensor *key, int insert);

void moe_tape_reset(moe_tape *t) {
    moe_tape_run_deferred(NULL, t);   /* frees without running */
    t->defer_on = 0;
    for (int k = 0; k < t->n; k++) release_entry(NULL, &t->entries[k]);
    t->n = 0;
    t->spent = 0;
    clear_grads(t);
}

/* An entry's references: all of them (t NULL: the reset), or once its
 * backward has run (one_backward, t the tape). Then an input held by nothing
 * else that has a gradient (a leaf: no entry made it) stays until the reset:
 * its gradient slot is keyed by its header's address, which a new tensor
 * could otherwise take and be given its gradient. */
static void release_entry(moe_tape *t, moe_tape_entry *e) {
    int kept = 0;
    for (int i = 0; i < e->n_in; i++) {
        grad_slot *g = t && e->in[i]->refcount == 1 ? find_slot(t, e->in[i], 0) : NULL;
        if (g && g->grad) e->in[kept++] = e->in[i];
        else moe_tensor_release(e->in[i]);
    }
    for (int i = 0; i < e->n_out; i++) moe_tensor_release(e->out[i]);
    for (int i = 0; i < e->n_saved; i++) moe_tensor_release(e->saved[i]);
    if (e->release_self) e->release_self(e->self);
    e->n_in = kept;
    e->n_out = e->n_saved = 0;
    e->release_self = NULL;
}

void moe_tape_free(moe_tape *t) {
    if (!t) return;
    moe_tape_reset(t);
    free(t->entries);
    free(t->slots);
    free(t->prof);
    free(t);
}

int moe_tape_size(const moe_tape *t) { return t->n; }
void moe_tape_retain_grads(moe_tape *t, int on) { t->retain_grads = on; }
void moe_tape_set_recompute(moe_tape *t, int mode) { t->recompute = mode; }
int moe_tape_recompute(const moe_tape *t) { return t ? t->recompute : MOE_TAPE_RECOMPUTE_NONE; }
void moe_tape_set_one_backward(moe_tape *t, int on) { t->one_backward = on; }
int moe_tape_letting_go(const moe_tape *t) { return t && t->spent; }

void moe_tape_set_profile(moe_tape *t, int mode) {
    t->profile = mode;
    if (mode == MOE_TAPE_PROFILE_OFF) { free(t->prof); t->prof = NULL; t->nprof = 0; }
}

static void prof_add(moe_tape *t, const char *name, double sec) {
    for (int i = 0; i < t->nprof; i++)
        if (!strcmp(t->prof[i].name, name)) { t->prof[i].calls++; t->prof[i].seconds += sec; return; }
    moe_tape_profile_row *r = realloc(t->prof, (size_t)(t->nprof + 1) * sizeof *r);
    if (!r) return;   /* profiling is best effort */
    t->prof = r;
    t->prof[t->nprof++] = (moe_tape_profile_row){name, 1, sec};
}

static int prof_cmp(const void *a, const void *b) {
    double x = ((const moe_tape_profile_row *)a)->seconds, y = ((const moe_tape_profile_row *)b)->seconds;
    return (x < y) - (x > y);
}

int moe_tape_profile(const moe_tape *t, moe_tape_profile_row *rows, int max) {
    int n = t->nprof < max ? t->nprof : max;
    for (int i = 0; i < n; i++) rows[i] = t->prof[i];
    qsort(rows, (size_t)n, sizeof *rows, prof_cmp);
    return t->nprof;
}

static size_t hash_ptr(const void *p);

/* an open-addressing set of storage pointers, for moe_tape_memory */
typedef struct { const void **keys; size_t cap; } ptr_set;

static int ptr_set_add(ptr_set *s, const void *p) {   /* 1: added, 0: already there */
    size_t mask = s->cap - 1;
    for (size_t i = hash_ptr(p) & mask;; i = (i + 1) & mask) {
        if (s->keys[i] == p) return 0;
        if (!s->keys[i]) { s->keys[i] = p; return 1; }
    }
}

int moe_tape_memory(const moe_tape *t, const void *const *skip, int nskip, moe_tape_memory_row *rows, int max) {
    size_t need = (size_t)nskip + (size_t)t->n * (2 * MOE_TAPE_MAX_IO + MOE_TAPE_MAX_SAVED) + 1, cap = 16;
    while (cap < 2 * need) cap *= 2;
    ptr_set set = {calloc(cap, sizeof(void *)), cap};
    if (!set.keys) return 0;
    for (int i = 0; i < nskip; i++) if (skip[i]) ptr_set_add(&set, skip[i]);
    int nrows = 0;
    moe_tape_memory_row *all = NULL;
    for (int k = 0; k < t->n; k++) {
        const moe_tape_entry *e = &t->entries[k];
        moe_tensor *ts[2 * MOE_TAPE_MAX_IO + MOE_TAPE_MAX_SAVED];
        int n = 0;
        for (int i = 0; i < e->n_in; i++) ts[n++] = e->in[i];
        for (int i = 0; i < e->n_out; i++) ts[n++] = e->out[i];
        for (int i = 0; i < e->n_saved; i++) ts[n++] = e->saved[i];
        for (int i = 0; i < n; i++) {
            if (!ts[i] || !ts[i]->storage || (!ts[i]->storage->data && ts[i]->storage->nbytes) ||
                ptr_set_add(&set, ts[i]->storage) != 1)
                continue;
            int r = 0;
            while (r < nrows && strcmp(all[r].name, e->name)) r++;
            if (r == nrows) {
                moe_tape_memory_row *g = realloc(all, (size_t)(nrows + 1) * sizeof *g);
                if (!g) continue;   /* best effort, like profiling */
                all = g;
                all[nrows++] = (moe_tape_memory_row){e->name, 0, 0};
            }
            all[r].tensors++;
            all[r].bytes += (double)ts[i]->storage->nbytes;
        }
    }
    free(set.keys);
    /* most bytes first (insertion sort: a few dozen names) */
    for (int i = 1; i < nrows; i++)
        for (int j = i; j > 0 && all[j].bytes > all[j - 1].bytes; j--) {
            moe_tape_memory_row x = all[j]; all[j] = all[j - 1]; all[j - 1] = x;
        }
    for (int i = 0; i < nrows && i < max; i++) rows[i] = all[i];
    free(all);
    return nrows;
}

static double now_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void device_sync(moe_ctx *ctx, moe_device dev) {
    const moe_backend *be = ctx->backends[dev.type];
    if (be && be->synchronize) be->synchronize(ctx, dev);
}

moe_tape_entry *moe_tape_record(moe_tape *t, const char *name, moe_backward_fn backward,
                                void *self, void (*retain_self)(void *), void (*release_self)(void *),
                                int n_in, moe_tensor *const *in, int n_out, moe_tensor *const *out) {
    if (n_in > MOE_TAPE_MAX_IO || n_out > MOE_TAPE_MAX_IO) {
        moe_error(MOE_ERR_INTERNAL, "%s: too many tape inputs/outputs", name);
        return NULL;
    }
    if (t->n == t->cap) {
        int cap = t->cap ? t->cap * 2 : 64;
        moe_tape_entry *e = realloc(t->entries, (size_t)cap * sizeof *e);
        if (!e) { moe_error(MOE_ERR_OOM, "out of host memory growing the tape"); return NULL; }
        t->entries = e;
        t->cap = cap;
    }
    moe_tape_entry *e = &t->entries[t->n++];
    memset(e, 0, sizeof *e);
    e->tape = t;
    e->name = name;
    e->backward = backward;
    e->self = self;
    e->release_self = release_self;
    if (retain_self) retain_self(self);
    e->n_in = n_in;
    e->n_out = n_out;
    for (int i = 0; i < n_in; i++) { e->in[i] = in[i]; moe_tensor_retain(in[i]); }
    for (int i = 0; i < n_out; i++) { e->out[i] = out[i]; moe_tensor_retain(out[i]); }
    return e;
}

void moe_tape_save(moe_tape_entry *e, moe_tensor *t) {
    /* callers save at most MOE_TAPE_MAX_SAVED tensors: a layer bug, not user input */
    if (e->n_saved >= MOE_TAPE_MAX_SAVED) return;
    moe_tensor_retain(t);
    e->saved[e->n_saved++] = t;
}

static size_t hash_ptr(const void *p) {
    uintptr_t x = (uintptr_t)p;
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33;
    return (size_t)x;
}

static grad_slot *find_slot(moe_tape *t, const moe_tensor *key, int insert) {
    if (insert && (t->used + 1) * 2 > t->nslots) {
        int n = t->nslots ? t->nslots * 2 : 256;
        grad_slot *s = calloc((size_t)n, sizeof *s);
        if (!s) return NULL;
        grad_slot *old = t->slots;
        int oldn = t->nslots;
        t->slots = s;
        t->nslots = n;
        t->used = 0;
        for (int i = 0; i < oldn; i++)
            if (old[i].key) {
                grad_slot *d = find_slot(t, old[i].key, 1);
                *d = old[i];
                t->used++;
            }
        free(old);
    }
    if (!t->nslots) return NULL;
    size_t mask = (size_t)t->nslots - 1;
    for (size_t i = hash_ptr(key) & mask;; i = (i + 1) & mask) {
        if (t->slots[i].key == key) return &t->slots[i];
        if (!t->slots[i].key) {
            if (!insert) return NULL;
            t->slots[i].key = key;
            return &t->slots[i];
        }
    }
}

moe_tensor *moe_tape_grad(moe_tape *t, const moe_tensor *x) {
    grad_slot *s = find_slot(t, x, 0);
    return s ? s->grad : NULL;
}

/* A gradient may be shared: an add's backward hands the same tensor to both
 * inputs, a view's backward a header over its output gradient's memory. It is
 * written in place (summed into, or by a GEMM with beta 1) only when nothing
 * else holds it or its memory; otherwise the sum goes to a new tensor. */
static int exclusive(const moe_tensor *g) {
    return g->refcount == 1 && g->storage && __atomic_load_n(&g->storage->refcount, __ATOMIC_RELAXED) == 1;
}

/* Sums g into the gradient of x, taking over the reference to g. */
static moe_status accumulate(moe_ctx *ctx, moe_tape *t, const moe_tensor *x, moe_tensor *g) {
    if (!moe_tensor_same_shape(x, g)) {
        char a[96], b[96];
        moe_tensor_release(g);
        return moe_error(MOE_ERR_INTERNAL, "gradient shape %s does not match its tensor %s",
                         moe_shape_str(g, b, sizeof b), moe_shape_str(x, a, sizeof a));
    }
    grad_slot *s = find_slot(t, x, 1);
    if (!s) { moe_tensor_release(g); return moe_error(MOE_ERR_OOM, "out of host memory for gradients"); }
    if (!s->grad) { s->grad = g; t->used++; return MOE_OK; }
    moe_status st;
    if (exclusive(s->grad)) {
        st = moe_op_axpy(ctx, s->grad, 1.0f, g);
    } else {
        moe_tensor *sum = moe_tensor_like(ctx, s->grad);
        st = sum ? moe_op_binary(ctx, MOE_BIN_ADD, sum, s->grad, g) : moe_last_status();
        if (st == MOE_OK) { moe_tensor_release(s->grad); s->grad = sum; }
        else moe_tensor_release(sum);
    }
    moe_tensor_release(g);
    return st;
}

moe_tensor *moe_tape_grad_acc(moe_tape_entry *e, int i) {
    if (!e || !e->tape || i < 0 || i >= e->n_in) return NULL;
    const moe_tensor *x = e->in[i];
    grad_slot *s = find_slot(e->tape, x, 0);
    moe_tensor *g = s ? s->grad : NULL;
    if (!g || !moe_tensor_is_contiguous(g) || g->dtype != x->dtype || !moe_device_eq(g->device, x->device) ||
        !moe_tensor_same_shape(g, x) || !exclusive(g))
        return NULL;
    return g;
}

/* A tensor is intermediate if an entry produced it; its gradient can go once
 * that entry has run. Leaves keep theirs for moe_tape_grad. */
static void drop_grad(moe_tape *t, const moe_tensor *x) {
    grad_slot *s = find_slot(t, x, 0);
    if (s && s->grad) { moe_tensor_release(s->grad); s->grad = NULL; }
}

moe_status moe_tape_backward(moe_ctx *ctx, moe_tape *t, moe_tensor *root, moe_tensor *grad_root) {
    if (!root) return moe_error(MOE_ERR_ARG, "backward: root tensor is nil");
    if (t->spent)
        return moe_error(MOE_ERR_STATE, "backward: this tape's backward has run and let go of what it recorded "
                         "(one backward a tape); reset it and record the forward again");
    int produced = 0;
    for (int k = 0; k < t->n && !produced; k++)
        for (int j = 0; j < t->entries[k].n_out; j++)
            if (t->entries[k].out[j] == root) produced = 1;
    if (!produced)
        return moe_error(MOE_ERR_STATE, "backward: the tensor was not produced by a forward recorded on this tape");
    moe_tensor *g;
    if (grad_root) {
        if (!moe_tensor_same_shape(root, grad_root)) {
            char a[96], b[96];
            return moe_error(MOE_ERR_SHAPE, "backward: gradient has shape %s, expected %s (the output's shape)",
                             moe_shape_str(grad_root, b, sizeof b), moe_shape_str(root, a, sizeof a));
        }
        /* a fresh copy on the output's device and dtype: later accumulation
         * never writes into the caller's tensor, and a cpu scalar works for a
         * cuda loss */
        g = moe_op_to(ctx, grad_root, root->device, root->dtype);
        if (!g) return moe_last_status();
    } else {
        if (moe_tensor_numel(root) != 1)
            return moe_error(MOE_ERR_SHAPE, "backward: a gradient is required for a non-scalar output (%lld elements)",
                             (long long)moe_tensor_numel(root));
        g = moe_tensor_like(ctx, root);
        if (!g) return moe_last_status();
        MOE_TRY(moe_op_fill(ctx, g, 1.0));
    }
    clear_grads(t);
    MOE_TRY(accumulate(ctx, t, root, g));
    /* letting go as we go: every reader of an entry's outputs comes later on
     * the tape, so once its backward has run nothing reads its tensors again
     * (the gradients of intermediates are dropped anyway unless retained) */
    const int let_go = t->one_backward && !t->retain_grads;
    if (let_go) t->spent = 1;

    for (int k = t->n - 1; k >= 0; k--) {
        moe_tape_entry *e = &t->entries[k];
        moe_tensor *gout[MOE_TAPE_MAX_IO] = {0};
        int any = 0;
        for (int j = 0; j < e->n_out; j++) {
            gout[j] = moe_tape_grad(t, e->out[j]);
            if (gout[j]) any = 1;
        }
        if (!any) {
            if (let_go && !e->keep_out_grads) release_entry(t, e);
            continue;
        }
        moe_tensor *gin[MOE_TAPE_MAX_IO] = {0};
        double t0 = t->profile ? now_s() : 0;
        moe_status s = e->backward(ctx, e, gout, gin);
        if (t->profile) {
            if (t->profile == MOE_TAPE_PROFILE_SYNC) device_sync(ctx, root->device);
            prof_add(t, e->name, now_s() - t0);
        }
        if (s != MOE_OK) {
            for (int i = 0; i < e->n_in; i++) moe_tensor_release(gin[i]);
            t->defer_on = 0;
            moe_tape_run_deferred(NULL, t);
            return moe_error_context(s, "%s.backward", e->name);
        }
        if (!t->retain_grads && !e->keep_out_grads)
            for (int j = 0; j < e->n_out; j++) drop_grad(t, e->out[j]);
        double t1 = t->profile ? now_s() : 0;
        for (int i = 0; i < e->n_in; i++) {
            if (!gin[i]) continue;
            s = accumulate(ctx, t, e->in[i], gin[i]);
            if (s != MOE_OK) {
                for (int r = i + 1; r < e->n_in; r++) moe_tensor_release(gin[r]);
                t->defer_on = 0;
                moe_tape_run_deferred(NULL, t);
                return moe_error_context(s, "%s.backward", e->name);
            }
        }
        if (t->profile) {
            if (t->profile == MOE_TAPE_PROFILE_SYNC) device_sync(ctx, root->device);
            prof_add(t, "(gradient accumulation)", now_s() - t1);
        }
        if (let_go && !e->keep_out_grads) release_entry(t, e);
    }
    /* work deferred for an exchange that never came (none is expected) */
    t->defer_on = 0;
    return moe_error_context(moe_tape_run_deferred(ctx, t), "deferred backward work");
}
