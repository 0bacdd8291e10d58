/* Activations recomputed on access (layer.h, moe_remat_park): a parked
 * tensor's memory is given back at once; the first access through any view
 * (moe_tensor_data, an op) runs the recipe once and frees its argument; a
 * failing recipe reports its error and leaves the tensor parked for another
 * try; a tensor that is not the whole of an allocator's storage is not parked
 * (its argument freed at once); a storage released while parked frees the
 * recipe; the tape's memory count leaves parked storages out; a one-backward
 * tape keeps the leaves only it holds, so no new tensor inherits a leaf's
 * gradient by taking its header's address. Prints TAP. */
#include "../../src/nn/functional.h"
#include "../../src/nn/layer.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/ops.h"
#include "tap.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* a recipe that writes value + i into element i, counting its runs and frees */
typedef struct { float value; int runs, freed, fail; } recipe;

static moe_status fill_run(moe_ctx *ctx, moe_tensor *out, void *arg) {
    (void)ctx;
    recipe *r = arg;
    r->runs++;
    if (r->fail) { r->fail--; return moe_error(MOE_ERR_STATE, "the recipe fails this time"); }
    float *p = moe_tensor_data(out);
    if (!p) return moe_last_status();
    for (int64_t i = 0; i < moe_tensor_numel(out); i++) p[i] = r->value + (float)i;
    return MOE_OK;
}
static void fill_free(void *arg) { ((recipe *)arg)->freed++; }

static moe_tensor *new2(int64_t a, int64_t b) {
    int64_t shape[2] = {a, b};
    return moe_tensor_new_cpu(MOE_F32, 2, shape);
}

int main(void) {
    moe_ctx *ctx = moe_ctx_new(1);
    moe_cpu_backend_install(ctx);

    /* parked: memory gone; a view's access recomputes once, into the view's elements */
    recipe r = {.value = 5.0f};
    moe_tensor *t = new2(3, 4);
    int parked = 0;
    moe_status s = moe_remat_park(ctx, t, fill_run, &r, fill_free, &parked);
    report(s == MOE_OK && parked && t->storage->data == NULL && moe_remat_is_parked(t) && r.runs == 0,
           "park gives the memory back without running the recipe", "status %d, parked %d, runs %d", (int)s, parked,
           r.runs);
    moe_tensor *row = moe_tensor_narrow(t, 0, 1, 1);
    const float *v = moe_tensor_data(row);
    report(v && v[0] == 9.0f && v[3] == 12.0f && r.runs == 1 && r.freed == 1 && !moe_remat_is_parked(t),
           "the first access through a view recomputes, then frees the recipe", "v %g, runs %d, freed %d",
           v ? v[0] : -1.0, r.runs, r.freed);
    v = moe_tensor_data(t);
    report(v && v[0] == 5.0f && v[11] == 16.0f && r.runs == 1, "later accesses read the same memory",
           "v %g %g, runs %d", v ? v[0] : -1.0, v ? v[11] : -1.0, r.runs);
    moe_tensor_release(row);

    /* through an op: the ops layer reads the parked input */
    recipe r2 = {.value = 1.0f};
    moe_tensor *u = new2(2, 2), *sum = new2(2, 2);
    s = moe_remat_park(ctx, u, fill_run, &r2, fill_free, &parked);
    if (s == MOE_OK) s = moe_op_binary(ctx, MOE_BIN_ADD, sum, u, u);
    const float *sv = moe_tensor_data(sum);
    report(s == MOE_OK && sv && sv[0] == 2.0f && sv[3] == 8.0f && r2.runs == 1 && r2.freed == 1,
           "an op reading a parked input sees the recomputed values", "%s", moe_last_error());

    /* a failing recipe: the error comes back, the tensor stays parked, the next access tries again */
    recipe r3 = {.value = 2.0f, .fail = 1};
    moe_tensor *w = new2(2, 3);
    s = moe_remat_park(ctx, w, fill_run, &r3, fill_free, &parked);
    s = moe_tensor_ready(w);
    report(s != MOE_OK && strstr(moe_last_error(), "the recipe fails this time") &&
               strstr(moe_last_error(), "recomputing an activation") && moe_remat_is_parked(w) && r3.freed == 0,
           "a failing recipe reports its error and stays parked", "status %d: %s", (int)s, moe_last_error());
    v = moe_tensor_data(w);
    report(v && v[5] == 7.0f && r3.runs == 2 && r3.freed == 1, "the next access runs it again",
           "runs %d, freed %d", r3.runs, r3.freed);

    /* released while parked: the recipe's argument is freed, never run */
    recipe r4 = {.value = 0.0f};
    moe_tensor *x = new2(4, 4);
    moe_remat_park(ctx, x, fill_run, &r4, fill_free, &parked);
    moe_tensor_release(x);
    report(r4.runs == 0 && r4.freed == 1, "a storage released while parked frees the recipe unrun",
           "runs %d, freed %d", r4.runs, r4.freed);

    /* not parked: a view over a larger storage, and a parked storage again */
    recipe r5 = {.value = 0.0f};
    moe_tensor *big = new2(4, 4), *part = moe_tensor_narrow(big, 0, 0, 2);
    s = moe_remat_park(ctx, part, fill_run, &r5, fill_free, &parked);
    report(s == MOE_OK && !parked && big->storage->data && r5.freed == 1 && r5.runs == 0,
           "a view over part of a storage is not parked", "parked %d, freed %d", parked, r5.freed);
    recipe r6 = {.value = 0.0f}, r7 = {.value = 0.0f};
    moe_tensor *y = new2(2, 2);
    moe_remat_park(ctx, y, fill_run, &r6, fill_free, &parked);
    s = moe_remat_park(ctx, y, fill_run, &r7, fill_free, &parked);
    report(s == MOE_OK && !parked && r7.freed == 1 && r6.freed == 0, "a parked storage is not parked twice",
           "parked %d, freed %d %d", parked, r6.freed, r7.freed);

    /* the tape's memory count: a parked output holds nothing */
    moe_tape *tape = moe_tape_new();
    moe_tensor *in = new2(8, 8), *out = new2(8, 8);
    moe_tape_record(tape, "a", NULL, NULL, NULL, NULL, 1, &in, 1, &out);
    moe_tape_memory_row rows[4];
    int n = moe_tape_memory(tape, NULL, 0, rows, 4);
    double before = n == 1 ? rows[0].bytes : -1;
    recipe r8 = {.value = 0.0f};
    moe_remat_park(ctx, out, fill_run, &r8, fill_free, &parked);
    n = moe_tape_memory(tape, NULL, 0, rows, 4);
    report(before == 512.0 && n == 1 && rows[0].bytes == 256.0 && rows[0].tensors == 1,
           "tape memory leaves parked storages out", "before %g, after %g (%d rows)", before, n ? rows[0].bytes : -1, n);
    report(moe_tape_recompute(tape) == MOE_TAPE_RECOMPUTE_NONE && moe_tape_recompute(NULL) == MOE_TAPE_RECOMPUTE_NONE,
           "recompute is off by default", "mode %d", moe_tape_recompute(tape));
    moe_tape_set_recompute(tape, MOE_TAPE_RECOMPUTE_NORMS);
    report(moe_tape_recompute(tape) == MOE_TAPE_RECOMPUTE_NORMS, "set_recompute", "mode %d", moe_tape_recompute(tape));
    moe_tape_free(tape);

    /* one backward a tape: leaves held only by the tape keep their headers */
    moe_tape *ob = moe_tape_new();
    moe_tape_set_one_backward(ob, 1);
    moe_tensor *acc = NULL;
    s = MOE_OK;
    for (int i = 0; i < 40 && s == MOE_OK; i++) {
        moe_tensor *leaf = new2(2, 2), *next = NULL;
        moe_op_fill(ctx, leaf, 1.0);
        s = acc ? moe_f_binary(ctx, ob, MOE_BIN_ADD, acc, leaf, &next) : moe_f_unary(ctx, ob, MOE_UN_SCALE, leaf, 2.0f, &next);
        moe_tensor_release(leaf);   /* the tape holds it now */
        moe_tensor_release(acc);
        acc = next;
    }
    moe_tensor *ones = new2(2, 2);
    moe_op_fill(ctx, ones, 1.0);
    if (s == MOE_OK) s = moe_tape_backward(ctx, ob, acc, ones);
    int inherited = 0;
    moe_tensor *fresh[64];
    for (int i = 0; i < 64; i++) {
        fresh[i] = new2(2, 2);
        if (moe_tape_grad(ob, fresh[i])) inherited++;
    }
    report(s == MOE_OK && inherited == 0, "one backward: no new tensor inherits a leaf's gradient",
           "status %d, %d of 64 new tensors have a gradient", (int)s, inherited);
    s = moe_tape_backward(ctx, ob, acc, ones);
    report(s != MOE_OK && strstr(moe_last_error(), "reset it and record the forward again"),
           "one backward: a second backward is refused", "%s", moe_last_error());
    for (int i = 0; i < 64; i++) moe_tensor_release(fresh[i]);
    moe_tensor_release(ones); moe_tensor_release(acc);
    moe_tape_free(ob);

    moe_tensor_release(t); moe_tensor_release(u); moe_tensor_release(sum); moe_tensor_release(w);
    moe_tensor_release(big); moe_tensor_release(part); moe_tensor_release(y);
    moe_tensor_release(in); moe_tensor_release(out);
    moe_ctx_free(ctx);
    return tap_done();
}
