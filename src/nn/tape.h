/* The tape: autograd at layer granularity. A forward pass given a tape pushes
 * one entry per layer call (or functional op) holding its inputs, outputs and
 * what it saved; moe_tape_backward walks the entries in reverse, handing each
 * the gradients of its outputs and summing the gradients it returns for its
 * inputs. Parameter gradients never pass through the tape: a layer's backward
 * accumulates them straight into its flat gradient buffer. */
#ifndef MOE_TAPE_H
#define MOE_TAPE_H

#include "../core/context.h"
#include "../core/tensor.h"

#define MOE_TAPE_MAX_IO 4
#define MOE_TAPE_MAX_SAVED 8
#define MOE_TAPE_MAX_DEFERRED 8

typedef struct moe_tape moe_tape;
typedef struct moe_tape_entry moe_tape_entry;

/* grad_out[j] is the gradient of out[j] (NULL when nothing flowed into it;
 * at least one is non-NULL). The function stores a NEW reference in grad_in[i]
 * for each input that has a gradient and leaves the others NULL. */
typedef moe_status (*moe_backward_fn)(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *grad_out,
                                      moe_tensor **grad_in);

struct moe_tape_entry {
    const char *name;                        /* "linear", "rmsnorm", ... for error messages */
    moe_backward_fn backward;
    void *self;                              /* the layer, kept alive by `retain_self` */
    void (*release_self)(void *self);
    int n_in, n_out, n_saved;
    moe_tensor *in[MOE_TAPE_MAX_IO];
    moe_tensor *out[MOE_TAPE_MAX_IO];
    moe_tensor *saved[MOE_TAPE_MAX_SAVED];
    int keep_out_grads;                      /* an earlier entry shares these outputs: their gradients stay */
    double f[4];                             /* scalar arguments (eps, scale, ...) */
    int64_t i[4];                            /* integer arguments */
    moe_tape *tape;                          /* the tape holding the entry (moe_tape_defer) */
};

moe_tape *moe_tape_new(void);
void moe_tape_free(moe_tape *tape);
/* Drops every entry and gradient; the tape can record again. */
void moe_tape_reset(moe_tape *tape);
int moe_tape_size(const moe_tape *tape);

/* Appends an entry; the tape takes new references to the tensors given. */
moe_tape_entry *moe_tape_record(moe_tape *tape, const char *name, moe_backward_fn backward,
                                void *self, void (*retain_self)(void *), void (*release_self)(void *),
                                int n_in, moe_tensor *const *in, int n_out, moe_tensor *const *out);
/* Adds a saved tensor to an entry (new reference). */
void moe_tape_save(moe_tape_entry *e, moe_tensor *t);

/* For a backward function: the gradient already summed for input i of e, for
 * it to add its own contribution in place (a GEMM with beta 1 instead of a
 * new tensor and a separate pass to add it), returning NULL for that input;
 * NULL when there is none yet, or it is not contiguous or not of the input's
 * dtype and device, or something else holds it or its memory (a shared
 * gradient; then return a new tensor as usual: the tape sums out of place). */
moe_tensor *moe_tape_grad_acc(moe_tape_entry *e, int i);

/* Backward from `root` with upstream gradient `grad_root` (NULL: ones, for a
 * scalar loss). Gradients of leaves (tensors that no entry produced) stay
 * readable through moe_tape_grad; intermediate ones are dropped once used
 * unless retain_grads was set. */
moe_status moe_tape_backward(moe_ctx *ctx, moe_tape *tape, moe_tensor *root, moe_tensor *grad_root);
void moe_tape_retain_grads(moe_tape *tape, int on);

/* Recompute (off by default): layers may give back outputs the backward
 * reads but can make again, and recompute them there (remat.c); the bytes
 * are the same, the activations' memory smaller. Bits:
 * MOE_TAPE_RECOMPUTE_NORMS: the RMSNorms' outputs (the blocks' two norms, the
 * QK-norms with their rotation, the final norm), from their inputs;
 * MOE_TAPE_RECOMPUTE_QKV: the attention's q, k and v projections, a GEMM each
 * from the (recomputed) norm's output. */
enum { MOE_TAPE_RECOMPUTE_NONE = 0, MOE_TAPE_RECOMPUTE_NORMS = 1, MOE_TAPE_RECOMPUTE_QKV = 2 };
void moe_tape_set_recompute(moe_tape *tape, int mode);
/* One backward (off by default): the backward lets go of each entry's
 * tensors once its backward has run, so the activations' memory shrinks as
 * it goes instead of staying whole until moe_tape_reset; a second backward of
 * the tape is then refused. Leaves that only the tape holds and that have a
 * gradient stay until the reset (their slots are keyed by their headers'
 * addresses). No effect while retain_grads is set. */
void moe_tape_set_one_backward(moe_tape *tape, int on);
/* In a backward that lets go (one_backward): an entry's backward may then
 * release (and set to NULL) saved tensors of its own once past their last
 * use, before it allocates more. */
int moe_tape_letting_go(const moe_tape *tape);
int moe_tape_recompute(const moe_tape *tape);   /* 0 for a NULL tape */

/* Backward profiling, by entry name ("linear", "experts", "attention", ...):
 * MOE_TAPE_PROFILE_HOST times each entry's backward on the host clock (the
 * time to queue its work on a GPU); MOE_TAPE_PROFILE_SYNC synchronises the
 * root's device after each entry, so the time includes the entry's GPU work
 * (and costs the overlap). Totals add up over backwards until reset to OFF. */
enum { MOE_TAPE_PROFILE_OFF = 0, MOE_TAPE_PROFILE_HOST = 1, MOE_TAPE_PROFILE_SYNC = 2 };
void moe_tape_set_profile(moe_tape *tape, int mode);
typedef struct { const char *name; int64_t calls; double seconds; } moe_tape_profile_row;
/* Rows sorted by seconds, most first; returns the count (fills up to max). */
int moe_tape_profile(const moe_tape *tape, moe_tape_profile_row *rows, int max);
/* Activation memory held by the tape, by entry name: each storage that an
 * entry's inputs, outputs or saved tensors reference counts once, for the
 * first entry (in forward order) that holds it; parked storages (given back
 * until the backward recomputes them) hold none. Storages listed in `skip`
 * (the parameters' flat buffers: they live anyway) are left out. Rows sorted
 * by bytes, most first; returns the number of names (fills up to max). */
typedef struct { const char *name; int64_t tensors; double bytes; } moe_tape_memory_row;
int moe_tape_memory(const moe_tape *tape, const void *const *skip, int nskip, moe_tape_memory_row *rows, int max);

/* Deferred backward work, for overlap with expert parallelism's exchanges:
 * while deferral is on (moe_tape_set_defer, switched on by the entry before
 * the experts' backward and off by the exchange after it), a backward may
 * hand over work whose results no later entry reads (the experts' weight
 * gradients, which go straight into their gradient buffers). The exchange's
 * backward runs it (moe_tape_run_deferred) while its rows are in flight; any
 * left over runs at the end of moe_tape_backward. moe_tape_defer takes over
 * arg (free_arg frees it, run or not); with deferral off it runs at once. */
typedef moe_status (*moe_tape_deferred_fn)(moe_ctx *ctx, void *arg);
void moe_tape_set_defer(moe_tape *tape, int on);
int moe_tape_defers(const moe_tape *tape);
moe_status moe_tape_defer(moe_ctx *ctx, moe_tape *tape, moe_tape_deferred_fn run, void (*free_arg)(void *), void *arg);
/* The same for work that writes into these tensors (gradient buffers, at
 * most MOE_TAPE_MAX_IO; borrowed: they must outlive the work), so that a
 * reader of that memory can run it first (moe_tape_run_deferred_writing). */
moe_status moe_tape_defer_writing(moe_ctx *ctx, moe_tape *tape, moe_tape_deferred_fn run, void (*free_arg)(void *),
                                  void *arg, const moe_tensor *const *writes, int nwrites);
moe_status moe_tape_run_deferred(moe_ctx *ctx, moe_tape *tape);
/* The same, leaving the newest `keep` jobs for a later exchange. */
moe_status moe_tape_run_deferred_keep(moe_ctx *ctx, moe_tape *tape, int keep);
/* Runs the deferred work (in order) up to the last job that writes elements
 * [lo, hi) of storage (element offsets): the data-parallel gradient
 * reduction calls it before reading a range of the flat gradients. */
moe_status moe_tape_run_deferred_writing(moe_ctx *ctx, moe_tape *tape, const void *storage, int64_t lo, int64_t hi);

/* Borrowed reference to the gradient of t, or NULL. Read it, do not write it:
 * gradients may share memory (an add hands its output's gradient to both
 * inputs, a view its output gradient's memory). */
moe_tensor *moe_tape_grad(moe_tape *tape, const moe_tensor *t);

#endif
