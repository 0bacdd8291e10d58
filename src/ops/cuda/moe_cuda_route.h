/* Router kernels of the CUDA backend (cuda_route.cu): top-k routing of
 * [n, e] logits on the device, and its backward. The driver is
 * src/nn/router_device.c; the arithmetic follows the host path in
 * src/nn/router.c operation for operation (see cuda_route.cu).
 * In a build without CUDA, src/ops/cuda_none.c provides stubs that fail with
 * MOE_ERR_DEVICE (no CUDA tensor exists there, so they are never reached). */
#ifndef MOE_CUDA_ROUTE_H
#define MOE_CUDA_ROUTE_H

#include <stdint.h>

#include "../../core/context.h"
#include "../../core/status.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The device path handles at most this many experts (the bias travels as a
 * kernel argument, a token's row lives in shared memory). */
#define MOE_CUDA_ROUTE_MAX_E 1024

enum { MOE_CUDA_ROUTE_AUX_NONE = 0, MOE_CUDA_ROUTE_AUX_BATCH = 1, MOE_CUDA_ROUTE_AUX_SEQUENCE = 2 };

/* Summary slots (int64 each) copied to the host at the end of the forward:
 * offsets [e + 1], counts [e], dropped, then four doubles stored bit for bit:
 * sum of token entropies, sum of lse^2, sum of top-1 probabilities, aux. */
#define MOE_CUDA_ROUTE_SUMMARY(e) (2 * (e) + 6)

typedef struct {
    int64_t n, e, k;          /* tokens, experts, choices per token (1 <= k <= e <= MAX_E) */
    int64_t seq_len, groups;  /* tokens per aux group, number of groups (batch aux: n, 1) */
    int64_t capacity;         /* kept assignments per expert at most; <= 0: unlimited */
    int softmax;              /* else sigmoid */
    int renormalize;
    float scale;              /* routed scaling (1 when unset) */
    int aux;                  /* MOE_CUDA_ROUTE_AUX_* */
    int bf16;                 /* logits (and weights) are bf16, else f32 */
    const void *logits;       /* [n, e] contiguous */
    const float *bias;        /* HOST [e] or NULL: added to the scores for selection */
    /* outputs (device) */
    int64_t *token_idx, *expert_idx;   /* [n*k] capacity; the first offsets[e] are written */
    void *weights;                     /* [n*k] in the logits' dtype */
    float *aux_loss, *z_loss;          /* 0-dim f32 */
    /* saved for backward (device) */
    float *s;                 /* [n, e] scores */
    float *pn, *zsm;          /* [n, e] sigmoid only: normalised scores, softmax of the logits (else NULL) */
    float *lse;               /* [n] */
    float *f;                 /* [groups, e] dispatch fractions (NULL when aux is none) */
    int32_t *chosen;          /* [n, k] experts chosen per token, best first */
    int32_t *pos;             /* [n, k] the assignment of each choice, -1 where dropped */
    /* host [MOE_CUDA_ROUTE_SUMMARY(e)] */
    int64_t *summary;
    /* or device [MOE_CUDA_ROUTE_SUMMARY(e)]: the summary is copied there and
     * nothing waits (the caller brings it back) */
    int64_t *summary_dev;
} moe_cuda_route_fwd;

/* Queues the routing kernels on the device's stream, then one device->host
 * copy of the summary and one stream synchronisation (none with summary_dev). */
moe_status moe_cuda_route_forward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_fwd *a);

/* The own grouped kernel's work tables for expert offsets left on the device
 * (tensor.h grouped_plan; src/ops/cuda/cuda_grouped_mma.cu): their bytes for
 * `groups` experts over `rows` rows (0: the kernel cannot take such calls),
 * and one queued kernel that writes them at `tables` (16-byte aligned) from
 * off_dev, so the expert GEMMs of the layer share one plan. */
int64_t moe_cuda_grouped_plan_bytes(int64_t groups, int64_t rows);
moe_status moe_cuda_grouped_plan(moe_ctx *ctx, moe_device dev, const int64_t *off_dev, int64_t groups, int64_t rows,
                                 void *tables);

typedef struct {
    int64_t n, e, k, seq_len, groups;
    int softmax, renormalize, aux, bf16;   /* bf16: dweights and dlogits are bf16, else f32 */
    float scale;
    const float *s, *pn, *zsm, *lse, *f;
    const int32_t *chosen, *pos;
    const void *dweights;       /* [assignments] upstream gradient of the weights, or NULL */
    const void *daux, *dz;      /* 0-dim device scalars, or NULL */
    int daux_bf16, dz_bf16;     /* their dtypes (else f32) */
    void *dlogits;              /* [n, e] output */
} moe_cuda_route_bwd;

/* Queues the backward kernel; no synchronisation. */
moe_status moe_cuda_route_backward(moe_ctx *ctx, moe_device dev, const moe_cuda_route_bwd *a);

#ifdef __cplusplus
}
#endif

#endif
