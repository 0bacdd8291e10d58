/* The expert bank's token-rows entry (moe_expert_bank_forward_tokens): its
 * argument errors, and for a SwiGLU bank the rows gathered by its own GEMM
 * call (xp NULL) and the combine folded in give the values of the plain
 * chain (index_select, moe_expert_bank_forward, gather_sum_add). Prints TAP. */
#include "../../src/nn/moe_block.h"
#include "../../src/nn/layer.h"
#include "../../src/ops/backend.h"
#include "../../src/ops/ops.h"
#include "tap.h"

#include <math.h>
#include <stdio.h>
#include <string.h>

static float max_diff(const moe_tensor *a, const moe_tensor *b) {
    float m = 0;
    for (int64_t i = 0; i < moe_tensor_numel(a); i++) {
        float d = fabsf(moe_f32(a)[i] - moe_f32(b)[i]);
        if (d > m) m = d;
    }
    return m;
}

int main(void) {
    moe_ctx *ctx = moe_ctx_new(1);
    moe_cpu_backend_install(ctx);
    moe_init init = {7, 0};
    const int64_t E = 3, H = 6, I = 5, N = 4, K = 2, A = N * K;
    moe_layer *sw = moe_expert_bank_new(ctx, E, H, I, MOE_FFN_SWIGLU, &init);
    moe_layer *gelu = moe_expert_bank_new(ctx, E, H, I, MOE_FFN_GELU, &init);
    /* token t's choices: experts (t + q) % E, rows grouped by expert */
    int64_t off[4] = {0, 0, 0, 0}, sh_x[2] = {N, H}, sh_a[1] = {A}, sh_s[2] = {N, K};
    moe_tensor *x = moe_tensor_new_cpu(MOE_F32, 2, sh_x), *tok = moe_tensor_new_cpu(MOE_I64, 1, sh_a);
    moe_tensor *w = moe_tensor_new_cpu(MOE_F32, 1, sh_a), *slots = moe_tensor_new_cpu(MOE_I32, 2, sh_s);
    moe_tensor *res = moe_tensor_new_cpu(MOE_F32, 2, sh_x);
    for (int64_t i = 0; i < N * H; i++) { moe_f32(x)[i] = sinf((float)i); moe_f32(res)[i] = cosf((float)i); }
    int64_t cnt[3] = {0, 0, 0};
    for (int64_t t = 0; t < N; t++)
        for (int64_t q = 0; q < K; q++) cnt[(t + q) % E]++;
    for (int e = 0; e < E; e++) off[e + 1] = off[e] + cnt[e];
    int64_t fill[3] = {off[0], off[1], off[2]};
    for (int64_t t = 0; t < N; t++)
        for (int64_t q = 0; q < K; q++) {
            int64_t r = fill[(t + q) % E]++;
            ((int64_t *)moe_tensor_data(tok))[r] = t;
            ((int32_t *)moe_tensor_data(slots))[t * K + q] = (int32_t)r;
            moe_f32(w)[r] = 0.25f + 0.1f * (float)r;
        }

    moe_tensor *y = NULL;
    moe_bank_tokens bad = {x, tok, NULL, NULL, NULL};
    moe_status s = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &bad, off, NULL, (int)E, &y);
    report(s == MOE_ERR_ARG && !y, "token rows without a slot map are refused", "%s: %s", moe_status_name(s),
           moe_last_error());
    moe_bank_tokens folded = {x, tok, slots, w, res};
    s = moe_expert_bank_forward_tokens(gelu, ctx, NULL, NULL, &folded, off, NULL, (int)E, &y);
    report(s == MOE_ERR_ARG && strstr(moe_last_error(), "SwiGLU"), "a GELU bank refuses the folded combine",
           "%s: %s", moe_status_name(s), moe_last_error());
    moe_bank_tokens plain = {x, tok, slots, NULL, NULL};
    s = moe_expert_bank_forward_tokens(gelu, ctx, NULL, NULL, &plain, off, NULL, (int)E, &y);
    report(s == MOE_ERR_INTERNAL && strstr(moe_last_error(), "not gathered"),
           "a GELU bank needs the gathered rows (xp NULL is refused)", "%s: %s", moe_status_name(s), moe_last_error());
    report(moe_expert_bank_gathers(sw) && !moe_expert_bank_gathers(gelu) && moe_expert_bank_inner(sw) == I,
           "gathers: SwiGLU yes, GELU no; inner width", "inner %lld", (long long)moe_expert_bank_inner(sw));

    /* the folded call against the plain chain */
    int64_t sh_p[2] = {A, H};
    moe_tensor *xp = moe_tensor_new_cpu(MOE_F32, 2, sh_p), *yp = NULL, *ref = moe_tensor_new_cpu(MOE_F32, 2, sh_x);
    s = moe_op_index_select(ctx, xp, x, tok);
    if (s == MOE_OK) s = moe_expert_bank_forward(sw, ctx, NULL, xp, off, (int)E, &yp);
    if (s == MOE_OK) s = moe_op_gather_sum_add(ctx, ref, res, yp, w, slots);
    moe_tensor *yf = NULL, *yg = NULL;
    moe_status s2 = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &folded, off, NULL, (int)E, &yf);
    moe_status s3 = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &plain, off, NULL, (int)E, &yg);
    report(s == MOE_OK && s2 == MOE_OK && s3 == MOE_OK && yf && yg && yf->shape[0] == N && yg->shape[0] == A &&
               max_diff(yf, ref) == 0.0f && max_diff(yg, yp) == 0.0f,
           "SwiGLU: gathered by the GEMM and folded = the plain chain, bit for bit", "%s %s %s",
           moe_status_name(s), moe_status_name(s2), moe_status_name(s3));

    /* the offsets as a tensor (the routing's device offsets; here on the CPU) */
    int64_t sh_o[1] = {E + 1}, sh_bad[1] = {E};
    moe_tensor *ot = moe_tensor_new_cpu(MOE_I64, 1, sh_o), *obad = moe_tensor_new_cpu(MOE_I64, 1, sh_bad), *yt = NULL;
    memcpy(moe_tensor_data(ot), off, sizeof off);
    moe_status s4 = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &folded, NULL, ot, (int)E, &yt);
    report(s4 == MOE_OK && yt && max_diff(yt, ref) == 0.0f, "SwiGLU folded: offsets in a tensor = host offsets",
           "%s: %s", moe_status_name(s4), moe_last_error());
    moe_tensor *yb = NULL;
    s4 = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &folded, NULL, obad, (int)E, &yb);
    report(s4 == MOE_ERR_SHAPE && !yb && strstr(moe_last_error(), "offsets_dev must be i64 [4]"),
           "offsets in a tensor of the wrong length are refused", "%s: %s", moe_status_name(s4), moe_last_error());
    s4 = moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &folded, NULL, NULL, (int)E, &yb);
    report(s4 == MOE_ERR_ARG && !yb && strstr(moe_last_error(), "offsets is NULL"),
           "no offsets at all are refused", "%s: %s", moe_status_name(s4), moe_last_error());

    /* a strided view (column 0 of [E + 1, 2]) is refused, not read as dense */
    int64_t sh_2[2] = {E + 1, 2};
    moe_tensor *wide = moe_tensor_new_cpu(MOE_I64, 2, sh_2), *col = wide ? moe_tensor_select(wide, 1, 0) : NULL;
    s4 = col ? moe_expert_bank_forward_tokens(sw, ctx, NULL, NULL, &folded, NULL, col, (int)E, &yb) : MOE_ERR_OOM;
    report(s4 == MOE_ERR_ARG && !yb && strstr(moe_last_error(), "must be contiguous"),
           "strided offsets in a tensor are refused", "%s: %s", moe_status_name(s4), moe_last_error());
    moe_tensor_release(col); moe_tensor_release(wide);

    moe_tensor *all[] = {x, tok, w, slots, res, xp, yp, ref, yf, yg, ot, obad, yt};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) moe_tensor_release(all[i]);
    moe_layer_release(sw);
    moe_layer_release(gelu);
    moe_ctx_free(ctx);
    return tap_done();
}
