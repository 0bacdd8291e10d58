#include "optimizer.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

struct moe_adamw {
    moe_layer *layer;
    moe_adamw_hparams hp;
    moe_tensor *m, *v;
    int n;
    float *lr_scale;
    int *decay;
    int64_t step;
    int64_t lo, hi;   /* owned element range of the flat buffer; full: 0, numel */
    int64_t full_n;   /* the flat buffer's numel when made */
    float grad_scale; /* applied to the gradients by the next step only (deferred clipping); 1: none */
    /* clipping by the device's norm for the next step only (moe_adamw_clip_next_step) */
    moe_tensor *clip_sumsq, *clip_guard;
    double clip_max;
    uint64_t launches;   /* moe_op_adamw calls made by steps (runs of parameters share one) */
    /* device state (moe_adamw_set_device_state), else NULL: the steps taken (i64)
     * and the learning rate (f32), one element each on the optimiser's device;
     * step stays the host's mirror of the count, refreshed when it is read */
    moe_tensor *step_dev, *lr_dev;
};

moe_adamw *moe_adamw_new(moe_ctx *ctx, moe_layer *layer, const moe_adamw_hparams *hp, const float *lr_scale,
                         const int *decay) {
    if (!layer->flat_values) {
        moe_error(MOE_ERR_STATE, "AdamW: the layer has no flat parameter buffer");
        return NULL;
    }
    return moe_adamw_new_range(ctx, layer, hp, lr_scale, decay, 0, moe_tensor_numel(layer->flat_values));
}

moe_adamw *moe_adamw_new_range(moe_ctx *ctx, moe_layer *layer, const moe_adamw_hparams *hp, const float *lr_scale,
                               const int *decay, int64_t lo, int64_t hi) {
    if (!layer->flat_values) {
        moe_error(MOE_ERR_STATE, "AdamW: the layer has no flat parameter buffer");
        return NULL;
    }
    if (!(hp->beta1 >= 0 && hp->beta1 < 1 && hp->beta2 >= 0 && hp->beta2 < 1 && hp->eps > 0 && hp->weight_decay >= 0)) {
        moe_error(MOE_ERR_ARG, "AdamW: need 0 <= betas < 1, eps > 0, weight_decay >= 0");
        return NULL;
    }
    if (hp->state_dtype != MOE_F32 && hp->state_dtype != MOE_BF16) {
        moe_error(MOE_ERR_DTYPE, "AdamW: state dtype %s, expected f32 or bf16", moe_dtype_name(hp->state_dtype));
        return NULL;
    }
    if (lo < 0 || hi < lo) {
        moe_error(MOE_ERR_ARG, "AdamW: range [%lld, %lld) is not 0 <= lo <= hi", (long long)lo, (long long)hi);
        return NULL;
    }
    moe_adamw *o = calloc(1, sizeof *o);
    if (!o) { moe_error(MOE_ERR_OOM, "out of host memory"); return NULL; }
    o->layer = layer;
    moe_layer_retain(layer);
    o->hp = *hp;
    o->n = moe_layer_num_param_tensors(layer);
    o->lr_scale = malloc((size_t)(o->n ? o->n : 1) * sizeof *o->lr_scale);
    o->decay = malloc((size_t)(o->n ? o->n : 1) * sizeof *o->decay);
    o->lo = lo;
    o->full_n = moe_tensor_numel(layer->flat_values);
    o->hi = hi;
    o->grad_scale = 1.0f;
    int64_t sn[1] = {hi - lo};
    o->m = moe_tensor_new(ctx, hp->state_dtype, 1, sn, layer->flat_values->device);
    o->v = moe_tensor_new(ctx, hp->state_dtype, 1, sn, layer->flat_values->device);
    moe_status s = o->lr_scale && o->decay && o->m && o->v ? MOE_OK : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, o->m, 0.0);
    if (s == MOE_OK) s = moe_op_fill(ctx, o->v, 0.0);
    if (s != MOE_OK) { moe_adamw_free(o); return NULL; }
    for (int i = 0; i < o->n; i++) {
        o->lr_scale[i] = lr_scale ? lr_scale[i] : 1.0f;
        o->decay[i] = decay ? decay[i] : 1;
    }
    return o;
}

void moe_adamw_free(moe_adamw *o) {
    if (!o) return;
    moe_layer_release(o->layer);
    moe_tensor_release(o->clip_sumsq);
    moe_tensor_release(o->clip_guard);
    moe_tensor_release(o->step_dev);
    moe_tensor_release(o->lr_dev);
    moe_tensor_release(o->m);
    moe_tensor_release(o->v);
    free(o->lr_scale);
    free(o->decay);
    free(o);
}

uint64_t moe_adamw_launches(const moe_adamw *o) { return o->launches; }

moe_status moe_adamw_get_step_count(moe_ctx *ctx, moe_adamw *o, int64_t *step) {
    if (o->step_dev) {   /* the device's count: waits for this read only, not for work queued after it */
        moe_read r;
        const moe_tensor *ts[1] = {o->step_dev};
        MOE_TRY(moe_op_read_start(ctx, ts, 1, &r));
        MOE_TRY(moe_op_read_finish(ctx, &r));
        o->step = (int64_t)r.value[0];
    }
    *step = o->step;
    return MOE_OK;
}

/* Writes the device's counter (queued). Its host value (tensor.h) is dropped:
 * replays of a captured step advance the counter where the host cannot see. */
static moe_status fill_counter(moe_ctx *ctx, moe_tensor *step_dev, int64_t step) {
    moe_status s = moe_op_fill(ctx, step_dev, (double)step);
    step_dev->host_known = 0;
    return s;
}

moe_status moe_adamw_set_step_count(moe_ctx *ctx, moe_adamw *o, int64_t step) {
    if (step < 0) return moe_error(MOE_ERR_ARG, "AdamW: step count %lld, expected >= 0", (long long)step);
    if (o->step_dev) MOE_TRY(fill_counter(ctx, o->step_dev, step));
    o->step = step;
    return MOE_OK;
}

int moe_adamw_device_state(const moe_adamw *o) { return o->step_dev != NULL; }

moe_status moe_adamw_set_device_state(moe_ctx *ctx, moe_adamw *o, int on) {
    if (!on == !o->step_dev) return MOE_OK;
    if (!on) {
        /* the count comes back when it can be read; the state goes even when it
         * cannot (a failed device): the host's count, as of the last read, stays */
        int64_t step;
        moe_status s = moe_adamw_get_step_count(ctx, o, &step);
        moe_tensor_release(o->step_dev);
        moe_tensor_release(o->lr_dev);
        o->step_dev = o->lr_dev = NULL;
        return s;
    }
    moe_tensor *step_dev = moe_tensor_new(ctx, MOE_I64, 0, NULL, o->m->device);
    moe_tensor *lr_dev = moe_tensor_new(ctx, MOE_F32, 0, NULL, o->m->device);
    moe_status s = step_dev && lr_dev ? fill_counter(ctx, step_dev, o->step) : moe_last_status();
    if (s == MOE_OK) s = moe_op_fill(ctx, lr_dev, 0.0);
    if (s != MOE_OK) {
        moe_tensor_release(step_dev);
        moe_tensor_release(lr_dev);
        return s;
    }
    o->step_dev = step_dev;
    o->lr_dev = lr_dev;
    return MOE_OK;
}

moe_status moe_adamw_set_lr(moe_ctx *ctx, moe_adamw *o, float lr) {
    if (!o->lr_dev)
        return moe_error(MOE_ERR_STATE, "AdamW: set_lr needs the device state on (set_device_state); "
                         "without it each step takes its learning rate as an argument");
    if (!(lr >= 0.0f) || !isfinite(lr))
        return moe_error(MOE_ERR_ARG, "AdamW: learning rate %g, expected a finite number >= 0", (double)lr);
    return moe_op_fill(ctx, o->lr_dev, lr);
}

moe_status moe_adamw_scale_next_step(moe_adamw *o, float s) {
    if (!(s > 0.0f) || !isfinite(s))
        return moe_error(MOE_ERR_ARG, "AdamW: gradient scale %g, expected a finite number > 0", (double)s);
    o->grad_scale = s;
    return MOE_OK;
}

moe_status moe_adamw_clip_next_step(moe_adamw *o, moe_tensor *sumsq, moe_tensor *guard, double max_norm) {
    moe_tensor *ts[2] = {sumsq, guard};
    for (int i = 0; i < 2; i++)
        if (ts[i] && (ts[i]->dtype != MOE_F32 || moe_tensor_numel(ts[i]) != 1 ||
                      !moe_device_eq(ts[i]->device, o->m->device)))
            return moe_error(MOE_ERR_ARG, "AdamW: the %s must be one f32 element on the optimizer's device",
                             i ? "guard" : "sum of squares");
    if (!sumsq) return moe_error(MOE_ERR_ARG, "AdamW: clip_next_step needs the sum of squared gradients");
    if (!(max_norm > 0)) return moe_error(MOE_ERR_ARG, "AdamW: max_norm %g, expected > 0 (inf: no clipping)", max_norm);
    moe_tensor_retain(sumsq);
    if (guard) moe_tensor_retain(guard);
    moe_tensor_release(o->clip_sumsq);
    moe_tensor_release(o->clip_guard);
    o->clip_sumsq = sumsq;
    o->clip_guard = guard;
    o->clip_max = max_norm;
    return MOE_OK;
}

moe_tensor *moe_adamw_m(moe_adamw *o) { return o->m; }
moe_tensor *moe_adamw_v(moe_adamw *o) { return o->v; }

/* a 1-d view of n elements of `buf`'s storage from element `off`, in buf's dtype */
static moe_tensor *span(moe_tensor *buf, int64_t off, int64_t n) {
    int64_t shape[1] = {n};
    return moe_tensor_from_storage(buf->storage, off, buf->dtype, 1, shape, NULL);
}

static moe_status step_with(moe_ctx *ctx, moe_adamw *o, float lr, float grad_scale, moe_tensor *clip_sumsq,
                            moe_tensor *clip_guard);

/* The split master on the whole buffer (optimizer.h); the values whole otherwise. */
moe_status moe_adamw_prepare(moe_ctx *ctx, moe_adamw *o) {
    if (!o) return moe_error(MOE_ERR_ARG, "AdamW: prepare without an optimiser");
    int split = 0;
    if (!o->hp.master_f32 && o->lo == 0 && o->hi >= o->full_n)
        return moe_layer_master_split(ctx, o->layer, &split);
    return moe_layer_master_join(ctx, o->layer);
}

moe_status moe_adamw_step(moe_ctx *ctx, moe_adamw *o, float lr) {
    /* the deferred scale is this call's, even when it fails below */
    float grad_scale = o->grad_scale;
    o->grad_scale = 1.0f;
    moe_tensor *clip_sumsq = o->clip_sumsq, *clip_guard = o->clip_guard;   /* released below */
    o->clip_sumsq = o->clip_guard = NULL;
    moe_status s = step_with(ctx, o, lr, grad_scale, clip_sumsq, clip_guard);
    moe_tensor_release(clip_sumsq);
    moe_tensor_release(clip_guard);
    return s;
}

/* q lies dist elements after p0 in the values, the gradients and the compute copy alike */
static int same_span(const moe_param *p0, const moe_param *q, int64_t dist) {
    return q->value->storage == p0->value->storage && q->value->offset - p0->value->offset == dist &&
           q->grad->storage == p0->grad->storage && q->grad->offset - p0->grad->offset == dist &&
           !q->compute == !p0->compute &&
           (!q->compute ||
            (q->compute->storage == p0->compute->storage && q->compute->offset - p0->compute->offset == dist));
}

/* One update launch over runs [lo, hi) counted from element `at` of the flat
 * buffer fv, where parameter p0 lies: one run as the plain update, several
 * through cfg->runs (one kernel for parameters whose settings alternate: 35
 * launches a step became one for the OLMoE-style benchmark model, each launch
 * boundary having cost the GPU 2-4 us). */
static moe_status launch_runs(moe_ctx *ctx, moe_adamw *o, const moe_adamw_cfg *base, const moe_tensor *fv,
                              moe_tensor *lo_plane, const moe_param *p0, int64_t at, const moe_adamw_run *runs,
                              int nr) {
    const int64_t len = runs[nr - 1].hi, off0 = p0->value->offset - fv->offset;
    moe_adamw_cfg c = *base;
    if (nr == 1) {
        c.lr = runs[0].lr;
        c.weight_decay = runs[0].weight_decay;
    } else {
        c.n_runs = nr;
        c.runs = runs;
    }
    c.index0 = at;
    /* a split master (lo_plane): the compute copy is its high plane, updated in place */
    moe_tensor *pv = lo_plane ? span(p0->compute, p0->compute->offset + (at - off0), len)
                              : span(p0->value, p0->value->offset + (at - off0), len);
    moe_tensor *lv = lo_plane ? span(lo_plane, lo_plane->offset + at, len) : NULL;
    moe_tensor *gv = span(p0->grad, p0->grad->offset + (at - off0), len);
    moe_tensor *mv = span(o->m, o->m->offset + (at - o->lo), len);
    moe_tensor *vv = span(o->v, o->v->offset + (at - o->lo), len);
    /* mixed precision: the compute copy is rewritten in the same pass */
    moe_tensor *cv = p0->compute && !lo_plane ? span(p0->compute, p0->compute->offset + (at - off0), len) : NULL;
    c.compute = cv;
    c.lo = lv;
    moe_status s = pv && gv && mv && vv && (cv || !p0->compute || lo_plane) && (lv || !lo_plane)
                       ? moe_op_adamw(ctx, pv, gv, mv, vv, &c)
                       : moe_last_status();
    moe_tensor_release(pv); moe_tensor_release(gv); moe_tensor_release(mv); moe_tensor_release(vv);
    moe_tensor_release(cv); moe_tensor_release(lv);
    if (s == MOE_OK) o->launches++;
    return s;
}

static moe_status step_with(moe_ctx *ctx, moe_adamw *o, float lr, float grad_scale, moe_tensor *clip_sumsq,
                            moe_tensor *clip_guard) {
    moe_tensor *fv = o->layer->flat_values;
    if (!fv || moe_tensor_numel(fv) != o->full_n || !moe_device_eq(fv->device, o->m->device)
        || moe_layer_num_param_tensors(o->layer) != o->n)
        return moe_error(MOE_ERR_STATE, "AdamW: the layer's parameters changed since the optimiser was made");
    MOE_TRY(moe_layer_settle_grads(ctx, o->layer));
    MOE_TRY(moe_adamw_prepare(ctx, o));
    moe_tensor *lo_plane = moe_layer_master_lo(o->layer);   /* set: the master is split (optimizer.h) */
    moe_param *ps = malloc((size_t)(o->n ? o->n : 1) * sizeof *ps);
    if (!ps) return moe_error(MOE_ERR_OOM, "out of host memory");
    moe_layer_collect_params(o->layer, ps, o->n);
    o->step++;
    /* what every launch of this step shares; the device's counter advances once
     * after them, skipped by the same clipping rule as they are */
    moe_adamw_cfg base = {.beta1 = o->hp.beta1, .beta2 = o->hp.beta2, .eps = o->hp.eps, .step = o->step,
                          .grad_scale = grad_scale, .clip_sumsq = clip_sumsq, .guard = clip_guard,
                          .clip_max = o->clip_max, .step_dev = o->step_dev, .lr_dev = o->lr_dev};
    moe_status s = MOE_OK;
    /* The launch being gathered: runs of parameters [lo, hi) from element `at`
     * of the flat buffers, each with its learning rate and decay (ops.h:
     * cfg->runs), starting with parameter `first`; frozen parameters between
     * them are skipped by the kernel. */
    moe_adamw_run runs[MOE_ADAMW_MAX_RUNS];
    int nr = 0, first = -1;
    int64_t at = 0;
    for (int i = 0; i < o->n && s == MOE_OK; i++) {
        if (o->lr_scale[i] == 0) continue;   /* frozen */
        if (ps[i].value->storage != o->layer->flat_values->storage) {
            s = moe_error(MOE_ERR_STATE, "AdamW: parameter %s is not in the layer's flat buffer", ps[i].name);
            break;
        }
        /* the parameter's elements [off, off + n) of the flat buffer, cut to the owned range */
        int64_t off = ps[i].value->offset - fv->offset, n = moe_tensor_numel(ps[i].value);
        int64_t a = off > o->lo ? off : o->lo, b = off + n < o->hi ? off + n : o->hi;
        if (a >= b) continue;
        /* The following parameters with the same settings extend this one's run
         * when nothing but alignment padding lies between them, in the values,
         * the gradients and the compute copy alike: the padding is zero in all
         * of them (and in m and v), so the update keeps it zero. */
        int last = i;
        /* (a head cut by the owned range starts off the 16-byte grid: it keeps its
         * own call, so the vector kernel still takes the parameters after it) */
        for (int k = i + 1; k < o->n && a == off; k++) {
            const moe_param *q = &ps[k];
            int64_t qoff = q->value->offset - fv->offset, qn = moe_tensor_numel(q->value);
            int64_t qa = qoff > o->lo ? qoff : o->lo, qb = qoff + qn < o->hi ? qoff + qn : o->hi;
            if (o->lr_scale[k] != o->lr_scale[i] || o->decay[k] != o->decay[i] || qa >= qb || qa != qoff ||
                qa - b < 0 || qa - b >= 16 || !same_span(&ps[i], q, qoff - off))
                break;
            b = qb;
            last = k;
        }
        /* the run joins the launch being gathered where the buffers keep their
         * relative offsets and it starts on a group of 8 from the launch's start */
        int joins = nr > 0 && nr < MOE_ADAMW_MAX_RUNS && a == off && (a - at) % 8 == 0 &&
                    same_span(&ps[first], &ps[i], ps[i].value->offset - ps[first].value->offset);
        if (!joins && nr > 0) {
            s = launch_runs(ctx, o, &base, fv, lo_plane, &ps[first], at, runs, nr);
            nr = 0;
            if (s != MOE_OK) break;
        }
        if (nr == 0) { first = i; at = a; }
        /* with device state, the device's lr times the parameter's scale (ops.h: lr_dev) */
        runs[nr++] = (moe_adamw_run){a - at, b - at, o->lr_dev ? o->lr_scale[i] : lr * o->lr_scale[i],
                                     o->decay[i] ? o->hp.weight_decay : 0.0f};
        i = last;
    }
    if (s == MOE_OK && nr > 0)
        s = launch_runs(ctx, o, &base, fv, lo_plane, &ps[first], at, runs, nr);
    free(ps);
    if (s == MOE_OK && o->step_dev) s = moe_op_adamw_advance(ctx, o->step_dev, &base);
    return s;
}

moe_status moe_grad_sumsq(moe_ctx *ctx, moe_layer *l, moe_tensor **sumsq) {
    *sumsq = NULL;
    moe_tensor *g = l->flat_grads;
    if (!g) return moe_error(MOE_ERR_STATE, "grad_norm: the layer has no flat gradient buffer");
    MOE_TRY(moe_layer_settle_grads(ctx, l));
    /* one pass over the gradients (f32 or bf16), summed in f64 */
    moe_tensor *sum = moe_tensor_new(ctx, MOE_F32, 0, NULL, g->device);
    moe_status s = sum ? moe_op_sumsq(ctx, sum, g) : moe_last_status();
    if (s != MOE_OK) { moe_tensor_release(sum); return s; }
    *sumsq = sum;
    return MOE_OK;
}

moe_status moe_grad_norm(moe_ctx *ctx, moe_layer *l, double *norm) {
    moe_tensor *sum = NULL, *host = NULL;
    moe_status s = moe_grad_sumsq(ctx, l, &sum);
    if (s == MOE_OK) { host = moe_op_to(ctx, sum, MOE_DEVICE_CPU, MOE_F32); if (!host) s = moe_last_status(); }
    if (s == MOE_OK) *norm = sqrt((double)moe_f32(host)[0]);
    moe_tensor_release(sum); moe_tensor_release(host);
    return s;
}

moe_status moe_clip_grad_norm(moe_ctx *ctx, moe_layer *l, double max_norm, double *norm) {
    MOE_TRY(moe_grad_norm(ctx, l, norm));
    if (!isfinite(*norm) || max_norm <= 0 || *norm <= max_norm) return MOE_OK;
    return moe_op_unary(ctx, MOE_UN_SCALE, l->flat_grads, l->flat_grads, (float)(max_norm / (*norm + 1e-6)));
}
