/* The tape's deferred backward work (moe_tape_defer), which expert
 * parallelism uses to run the experts' weight gradients while their input
 * gradients are exchanged: with deferral off the work runs at once; with it
 * on it waits for moe_tape_run_deferred (in order; _keep leaves the newest) or for the end of
 * backward; a failing backward and a reset free it without running it; a
 * failing deferred job fails the backward. Prints TAP. */
#include "../../src/nn/tape.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/ops.h"
#include "tap.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>



/* a log of which jobs ran, in order, and which were freed */
typedef struct { int ran[16], nran, freed, fail_id; } job_log;
typedef struct { job_log *log; int id; } job;

static moe_status job_run(moe_ctx *ctx, void *arg) {
    (void)ctx;
    job *j = arg;
    if (j->id == j->log->fail_id) return moe_error(MOE_ERR_STATE, "job %d fails", j->id);
    j->log->ran[j->log->nran++] = j->id;
    return MOE_OK;
}
static void job_free(void *arg) {
    job *j = arg;
    j->log->freed++;
    free(j);
}
static moe_status push(moe_ctx *ctx, moe_tape *t, job_log *log, int id) {
    job *j = malloc(sizeof *j);
    j->log = log;
    j->id = id;
    return moe_tape_defer(ctx, t, job_run, job_free, j);
}

/* a backward that defers job `i[0]`, or fails when i[1] is set */
static moe_status deferring_backward(moe_ctx *ctx, moe_tape_entry *e, moe_tensor *const *gout, moe_tensor **gin) {
    if (e->i[1]) return moe_error(MOE_ERR_STATE, "this backward fails");
    moe_tape_set_defer(e->tape, 1);
    MOE_TRY(push(ctx, e->tape, e->self, (int)e->i[0]));
    gin[0] = moe_op_to(ctx, gout[0], gout[0]->device, gout[0]->dtype);
    return gin[0] ? MOE_OK : moe_last_status();
}

/* a tape of one entry x -> y with the deferring backward */
static moe_tape *one_entry(job_log *log, moe_tensor *x, moe_tensor *y, int id, int fails) {
    moe_tape *t = moe_tape_new();
    moe_tape_entry *e = moe_tape_record(t, "deferring", deferring_backward, log, NULL, NULL, 1, &x, 1, &y);
    e->i[0] = id;
    e->i[1] = fails;
    return t;
}

int main(void) {
    moe_ctx *ctx = moe_ctx_new(1);
    moe_cpu_backend_install(ctx);
    int64_t shape[1] = {1};
    moe_tensor *x = moe_tensor_new_cpu(MOE_F32, 1, shape), *y = moe_tensor_new_cpu(MOE_F32, 1, shape);

    job_log a = {.fail_id = -1};
    moe_tape *t = moe_tape_new();
    moe_status s = push(ctx, t, &a, 1);
    report(s == MOE_OK && a.nran == 1 && a.ran[0] == 1 && a.freed == 1, "deferral off: runs at once",
           "ran %d, freed %d", a.nran, a.freed);
    moe_tape_set_defer(t, 1);
    report(moe_tape_defers(t), "deferral on", "moe_tape_defers is 0");
    push(ctx, t, &a, 2);
    push(ctx, t, &a, 3);
    report(a.nran == 1 && a.freed == 1, "deferral on: waits", "ran %d, freed %d", a.nran, a.freed);
    s = moe_tape_run_deferred_keep(ctx, t, 1);
    report(s == MOE_OK && a.nran == 2 && a.ran[1] == 2 && a.freed == 2, "run_deferred_keep: all but the newest",
           "ran %d, freed %d", a.nran, a.freed);
    s = moe_tape_run_deferred(ctx, t);
    report(s == MOE_OK && a.nran == 3 && a.ran[1] == 2 && a.ran[2] == 3 && a.freed == 3, "run_deferred: in order",
           "ran %d (%d, %d), freed %d", a.nran, a.ran[1], a.ran[2], a.freed);
    for (int i = 0; i < MOE_TAPE_MAX_DEFERRED + 2; i++) push(ctx, t, &a, 10 + i);
    report(a.nran == 5 && a.ran[3] == 10 + MOE_TAPE_MAX_DEFERRED && a.freed == 5, "a full list runs new work at once",
           "ran %d, freed %d", a.nran, a.freed);
    moe_tape_reset(t);
    report(a.nran == 5 && a.freed == 5 + MOE_TAPE_MAX_DEFERRED && !moe_tape_defers(t),
           "reset frees without running, deferral off", "ran %d, freed %d", a.nran, a.freed);
    moe_tape_free(t);

    /* work writing into a range runs before a reader of that range (the
     * data-parallel gradient reduction): jobs in order up to the last one
     * that writes there; a range nobody writes runs nothing */
    job_log w = {.fail_id = -1};
    int64_t fshape[1] = {100};
    moe_tensor *flat = moe_tensor_new_cpu(MOE_F32, 1, fshape);
    moe_tensor *r1 = moe_tensor_narrow(flat, 0, 10, 10), *r2 = moe_tensor_narrow(flat, 0, 50, 20);
    t = moe_tape_new();
    moe_tape_set_defer(t, 1);
    for (int id = 1; id <= 3; id++) {
        job *j = malloc(sizeof *j);
        j->log = &w;
        j->id = id;
        const moe_tensor *wr[1] = {id == 1 ? r1 : r2};
        moe_tape_defer_writing(ctx, t, job_run, job_free, j, id == 3 ? NULL : wr, id == 3 ? 0 : 1);
    }
    s = moe_tape_run_deferred_writing(ctx, t, flat->storage, 30, 50);
    report(s == MOE_OK && w.nran == 0, "run_deferred_writing: nothing writes [30, 50)", "ran %d", w.nran);
    s = moe_tape_run_deferred_writing(ctx, t, flat->storage, 60, 61);
    report(s == MOE_OK && w.nran == 2 && w.ran[0] == 1 && w.ran[1] == 2 && w.freed == 2,
           "run_deferred_writing: in order up to the job writing [60, 61)", "ran %d, freed %d", w.nran, w.freed);
    s = moe_tape_run_deferred_writing(ctx, t, NULL, 0, 100);
    report(s == MOE_OK && w.nran == 2, "run_deferred_writing: another storage runs nothing", "ran %d", w.nran);
    moe_tape_free(t);
    report(w.nran == 2 && w.freed == 3, "the rest is freed with the tape", "ran %d, freed %d", w.nran, w.freed);
    moe_tensor_release(r1); moe_tensor_release(r2); moe_tensor_release(flat);

    /* the end of backward runs what is left */
    job_log b = {.fail_id = -1};
    t = one_entry(&b, x, y, 7, 0);
    s = moe_tape_backward(ctx, t, y, NULL);
    report(s == MOE_OK && b.nran == 1 && b.ran[0] == 7 && b.freed == 1 && !moe_tape_defers(t),
           "backward runs leftover work at its end", "%s; ran %d, freed %d", moe_last_error(), b.nran, b.freed);
    moe_tape_free(t);

    /* a failing deferred job fails the backward, naming it */
    job_log c = {.fail_id = 8};
    t = one_entry(&c, x, y, 8, 0);
    s = moe_tape_backward(ctx, t, y, NULL);
    report(s != MOE_OK && c.nran == 0 && c.freed == 1 && strstr(moe_last_error(), "job 8 fails"),
           "a failing deferred job fails backward", "status %d: %s", (int)s, moe_last_error());
    moe_tape_free(t);

    /* a failing backward frees the deferred work unrun */
    job_log d = {.fail_id = -1};
    t = moe_tape_new();
    moe_tape_set_defer(t, 1);
    push(ctx, t, &d, 9);
    moe_tape_entry *e = moe_tape_record(t, "deferring", deferring_backward, &d, NULL, NULL, 1, &x, 1, &y);
    e->i[1] = 1;
    s = moe_tape_backward(ctx, t, y, NULL);
    report(s != MOE_OK && d.nran == 0 && d.freed == 1 && !moe_tape_defers(t), "a failing backward drops deferred work",
           "status %d; ran %d, freed %d", (int)s, d.nran, d.freed);
    moe_tape_free(t);

    moe_tensor_release(x);
    moe_tensor_release(y);
    moe_ctx_free(ctx);
    return tap_done();
}
