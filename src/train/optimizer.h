/* AdamW over a layer's flat buffers with per-parameter groups: each parameter
 * has a learning-rate scale (0 freezes it) and a weight-decay switch (norms,
 * biases and embeddings usually decay-free). State m and v are flat buffers
 * shaped like the parameter buffer, so checkpoints save them as two tensors. */
#ifndef MOE_OPTIMIZER_H
#define MOE_OPTIMIZER_H

#include "../nn/layer.h"

typedef struct moe_adamw moe_adamw;

typedef struct {
    float beta1, beta2, eps, weight_decay;
    /* m and v: MOE_F32 (0, the default) or MOE_BF16 (half the memory and
     * traffic, stochastically rounded: ops.h, moe_op_adamw) */
    moe_dtype state_dtype;
    /* 1: keep the f32 master weights whole. 0 (the default): under bf16
     * precision on a layer's whole buffer, split them into the compute copy
     * and a low plane (layer.h, moe_layer_master_split) at each step that
     * finds them whole: 2 bytes a parameter less memory and traffic. */
    int master_f32;
} moe_adamw_hparams;

/* lr_scale and decay: one entry per parameter in moe_layer_collect_params
 * order (NULL: all 1 / all decayed). The layer must own flat buffers. */
moe_adamw *moe_adamw_new(moe_ctx *ctx, moe_layer *layer, const moe_adamw_hparams *hp, const float *lr_scale,
                         const int *decay);
/* Range mode (ZeRO): the optimiser owns only the elements [lo, hi) of the flat
 * parameter buffer (hi may pass its end: padding, never touched); m and v hold
 * hi - lo elements, and a step updates only the owned elements of each
 * parameter, with that parameter's lr scale and decay flag. */
moe_adamw *moe_adamw_new_range(moe_ctx *ctx, moe_layer *layer, const moe_adamw_hparams *hp, const float *lr_scale,
                               const int *decay, int64_t lo, int64_t hi);
void moe_adamw_free(moe_adamw *opt);
/* Brings the parameters into the form the next step updates: the split
 * master where the optimiser splits it (above), else nothing. A step does
 * this itself; a CUDA graph capture of a step, which cannot, calls it before
 * capturing and before each replay (anything may have read the values and so
 * joined them in between). */
moe_status moe_adamw_prepare(moe_ctx *ctx, moe_adamw *opt);
/* One step at learning rate lr from the gradients in the layer (with device
 * state on, lr is not read: the device's learning rate is). */
moe_status moe_adamw_step(moe_ctx *ctx, moe_adamw *opt, float lr);
/* The steps taken. With device state off, the host's count (each step adds 1,
 * skipped or not). With it on, the device's counter, read back (one wait for
 * that read): steps skipped by clip_next_step's guard are not counted; the
 * host's count is set to it. */
moe_status moe_adamw_get_step_count(moe_ctx *ctx, moe_adamw *opt, int64_t *step);
/* Sets the count (>= 0) the next step continues from; with device state on,
 * the device's counter too (queued, no wait). */
moe_status moe_adamw_set_step_count(moe_ctx *ctx, moe_adamw *opt, int64_t step);
/* How many update calls (moe_op_adamw) the steps so far made: one per run of
 * parameters with the same settings that lie next to each other. */
uint64_t moe_adamw_launches(const moe_adamw *opt);

/* Device state, for a step captured into a CUDA graph and replayed: the step
 * count and the learning rate live in one-element tensors on the optimiser's
 * device (i64 and f32), which the update kernels read (ops.h: step_dev,
 * lr_dev) instead of host values baked into their parameters, and each step
 * queues the counter's advance (moe_op_adamw_advance: +1 unless the step's
 * device clipping skips it) behind its updates. on: creates them, the counter
 * from the host's count, the learning rate 0 (set it with moe_adamw_set_lr);
 * off: reads the counter back into the host's count (one wait) and frees
 * them, even when the read fails (its error is returned). Either again is a
 * no-op. A CUDA graph that captured a step reads the two tensors: free the
 * graph before turning this off. */
moe_status moe_adamw_set_device_state(moe_ctx *ctx, moe_adamw *opt, int on);
int moe_adamw_device_state(const moe_adamw *opt);
/* The learning rate the next steps use (>= 0, finite), written on the device
 * (queued, no wait); each parameter's lr scale multiplies it. Needs device
 * state on. */
moe_status moe_adamw_set_lr(moe_ctx *ctx, moe_adamw *opt, float lr);
/* The state buffers (borrowed), for checkpoints; in range mode hi - lo elements. */
/* The next step reads the gradients multiplied by s (> 0), then forgets it:
 * gradient clipping without a pass of its own over the gradients. */
moe_status moe_adamw_scale_next_step(moe_adamw *opt, float s);
/* The next step clips by a norm still on the device: sumsq (one f32 element on
 * the optimizer's device, moe_grad_sumsq's) gives norm = sqrt(sumsq), and the
 * gradients are read times the scale above times max_norm / (norm + 1e-6)
 * when norm > max_norm (inf: never). When the norm, or the optional guard
 * (one f32 element, e.g. the loss), is not finite the step changes nothing
 * on the device; the host's step count still advances (the host learns of it
 * only when it reads the values: step_count - 1 takes it back), while the
 * device's counter (device state on) does not. Nothing waits for the device,
 * so the step is queued right behind the norm's reduction. */
moe_status moe_adamw_clip_next_step(moe_adamw *opt, moe_tensor *sumsq, moe_tensor *guard, double max_norm);
moe_tensor *moe_adamw_m(moe_adamw *opt);
moe_tensor *moe_adamw_v(moe_adamw *opt);

/* The sum of the squares of the layer's gradients, as a one-element f32
 * tensor on their device (queued, not read). */
moe_status moe_grad_sumsq(moe_ctx *ctx, moe_layer *layer, moe_tensor **sumsq);
/* Global L2 norm of the layer's gradients (one host read). */
moe_status moe_grad_norm(moe_ctx *ctx, moe_layer *layer, double *norm);
/* Scales all gradients so their global norm is at most max_norm; returns the
 * norm before clipping. Non-finite norms are reported, nothing is scaled. */
moe_status moe_clip_grad_norm(moe_ctx *ctx, moe_layer *layer, double max_norm, double *norm);

#endif
