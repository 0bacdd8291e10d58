/* Lua binding of the MoE block and the MoE transformer: nn.MoE{...},
 * nn.Model{...}, and the MoE-specific layer methods (routing statistics,
 * balancing losses, the aux-free bias, training mode). */
#include "lmoe.h"
#include "../nn/model.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static int opt_choice(lua_State *L, int idx, const char *key, const char *const *names, int def, const char *f) {
    const char *v = moe_lua_opt_field_str(L, idx, key, NULL, f);
    if (!v) return def;
    for (int i = 0; names[i]; i++)
        if (!strcmp(v, names[i])) return i;
    char list[256] = "";
    for (int i = 0; names[i]; i++) {
        strncat(list, i ? ", " : "", sizeof list - strlen(list) - 1);
        strncat(list, names[i], sizeof list - strlen(list) - 1);
    }
    return luaL_error(L, "%s: option '%s' must be one of %s, got \"%s\"", f, key, list, v);
}

static int64_t opt_pos(lua_State *L, int idx, const char *key, lua_Integer def, const char *f) {
    lua_Integer v = moe_lua_opt_field_int(L, idx, key, def, f);
    if (v <= 0) luaL_error(L, "%s: option '%s' must be a positive integer%s", f, key, def <= 0 ? " (required)" : "");
    return v;
}

static const char *const selections[] = {"topk", "noisy_topk", "expert_choice", "sinkhorn", NULL};
static const char *const scores[] = {"softmax", "sigmoid", NULL};
static const char *const aux_kinds[] = {"none", "batch", "sequence", NULL};
static const char *const acts[] = {"swiglu", "gelu", NULL};

/* Reads the MoE options of the table at idx (flat keys, as in the original API). */
static void read_block_cfg(lua_State *L, int idx, moe_block_cfg *c, int64_t hidden, const char *f) {
    memset(c, 0, sizeof *c);
    c->hidden = hidden;
    c->router.num_experts = opt_pos(L, idx, "num_experts", 8, f);
    c->router.top_k = opt_pos(L, idx, "experts_per_token", 2, f);
    c->router.selection = (moe_selection)opt_choice(L, idx, "router", selections, 0, f);
    c->router.score = (moe_score_fn)opt_choice(L, idx, "router_score", scores, 0, f);
    c->router.renormalize = moe_lua_opt_field_bool(L, idx, "renormalize", 1, f);
    c->router.capacity_factor = (float)moe_lua_opt_field_num(L, idx, "capacity_factor", 0, f);
    if (c->router.capacity_factor < 0)
        luaL_error(L, "%s: option 'capacity_factor' must be > 0 (or 0 for no limit), got %g", f, c->router.capacity_factor);
    c->router.routed_scaling = (float)moe_lua_opt_field_num(L, idx, "routed_scaling_factor", 1.0, f);
    c->router.sinkhorn_iters = (int)moe_lua_opt_field_int(L, idx, "sinkhorn_iterations", 8, f);
    c->router.aux = (moe_aux_kind)opt_choice(L, idx, "aux_loss_type", aux_kinds, MOE_AUX_BATCH, f);
    c->expert_inner = opt_pos(L, idx, "expert_intermediate_size", 4 * hidden, f);
    c->activation = (moe_ffn_kind)opt_choice(L, idx, "activation", acts, 0, f);
    c->jitter = (float)moe_lua_opt_field_num(L, idx, "jitter_noise", 0, f);
    c->aux_free = moe_lua_opt_field_bool(L, idx, "aux_free", 0, f);
    c->aux_free_rate = (float)moe_lua_opt_field_num(L, idx, "aux_free_rate", 1e-3, f);
    c->shared_experts = moe_lua_opt_field_int(L, idx, "num_shared_experts", 0, f);
    c->shared_inner = moe_lua_opt_field_int(L, idx, "shared_intermediate_size", 0, f);
    c->shared_gate = moe_lua_opt_field_bool(L, idx, "shared_expert_gate", 0, f);
}

/* mlp_only_layers = {i, ...}: 0-based ids of layers that stay dense. */
static void read_mlp_only(lua_State *L, int idx, moe_model_cfg *c, const char *f) {
    lua_getfield(L, idx, "mlp_only_layers");
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return; }
    if (!lua_istable(L, -1)) luaL_error(L, "%s: option 'mlp_only_layers' must be a list of 0-based layer ids, got %s", f, luaL_typename(L, -1));
    int n = (int)lua_objlen(L, -1);
    for (int i = 1; i <= n; i++) {
        lua_rawgeti(L, -1, i);
        if (!lua_isnumber(L, -1)) luaL_error(L, "%s: mlp_only_layers[%d] must be a layer id, got %s", f, i, luaL_typename(L, -1));
        lua_Number v = lua_tonumber(L, -1);
        if (v != (lua_Number)(int64_t)v || v < 0 || v >= (lua_Number)c->layers)
            luaL_error(L, "%s: mlp_only_layers[%d] must be a 0-based layer id below num_layers (%d), got %g", f, i, (int)c->layers, v);
        int64_t k = (int64_t)v;
        c->mlp_only[k / 64] |= (uint64_t)1 << (k % 64);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
}

/* Custom experts: opts.experts = {layer, layer, ...} (exactly num_experts). */
static int read_experts(lua_State *L, int idx, moe_layer **out, int64_t n, const char *f) {
    lua_getfield(L, idx, "experts");
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    if (!lua_istable(L, -1)) luaL_error(L, "%s: option 'experts' must be a list of layers", f);
    if ((int64_t)lua_objlen(L, -1) != n)
        luaL_error(L, "%s: option 'experts' has %d layers, expected num_experts = %d", f, (int)lua_objlen(L, -1), (int)n);
    for (int64_t i = 0; i < n; i++) {
        lua_rawgeti(L, -1, (int)i + 1);
        char arg[48];
        snprintf(arg, sizeof arg, "experts[%d]", (int)i + 1);
        out[i] = moe_lua_check_layer(L, -1, f, arg);
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    return 1;
}

#define MAX_EXPERTS 1024

static int l_moe(lua_State *L) {
    const char *f = "nn.MoE";
    if (!lua_istable(L, 1)) return luaL_error(L, "%s: expected a table of options, got %s", f, luaL_typename(L, 1));
    int64_t hidden = opt_pos(L, 1, "hidden_size", 0, f);
    moe_block_cfg c;
    read_block_cfg(L, 1, &c, hidden, f);
    if (c.router.num_experts > MAX_EXPERTS) return luaL_error(L, "%s: at most %d experts", f, MAX_EXPERTS);
    moe_layer *ex[MAX_EXPERTS];
    int custom = read_experts(L, 1, ex, c.router.num_experts, f);
    moe_init init = {moe_lua_layer_seed(L, 1, f), 0};
    c.seed = init.seed;
    moe_lua_push_layer(L, moe_block_new(moe_lua_ctx(L), &c, custom ? ex : NULL, &init), f);
    return 1;
}

static int l_model(lua_State *L) {
    const char *f = "nn.Model";
    if (!lua_istable(L, 1)) return luaL_error(L, "%s: expected a table of options, got %s", f, luaL_typename(L, 1));
    moe_model_cfg c;
    memset(&c, 0, sizeof c);
    c.vocab = opt_pos(L, 1, "vocab_size", 0, f);
    c.hidden = opt_pos(L, 1, "hidden_size", 0, f);
    c.layers = opt_pos(L, 1, "num_layers", 0, f);
    c.heads = opt_pos(L, 1, "num_heads", 0, f);
    c.kv_heads = opt_pos(L, 1, "num_kv_heads", c.heads, f);
    c.head_dim = moe_lua_opt_field_int(L, 1, "head_dim", 0, f);
    c.dense_inner = moe_lua_opt_field_int(L, 1, "intermediate_size", 4 * c.hidden, f);
    c.rope_theta = (float)moe_lua_opt_field_num(L, 1, "rope_theta", 10000.0, f);
    c.norm_eps = (float)moe_lua_opt_field_num(L, 1, "norm_eps", 1e-5, f);
    c.qk_norm = moe_lua_opt_field_bool(L, 1, "qk_norm", 0, f);
    c.tie_embeddings = moe_lua_opt_field_bool(L, 1, "tie_word_embeddings", 0, f);
    c.attn_bias = moe_lua_opt_field_bool(L, 1, "attention_bias", 0, f);
    c.qkv_bias = moe_lua_opt_field_bool(L, 1, "qkv_bias", 0, f);
    if (c.layers > MOE_MODEL_MAX_LAYERS) return luaL_error(L, "%s: at most %d layers", f, MOE_MODEL_MAX_LAYERS);
    read_mlp_only(L, 1, &c, f);
    c.activation = (moe_ffn_kind)opt_choice(L, 1, "activation", acts, 0, f);
    c.moe_every = (int)moe_lua_opt_field_int(L, 1, "moe_layer_frequency", 1, f);
    c.first_dense = (int)moe_lua_opt_field_int(L, 1, "first_dense_layers", 0, f);
    if (c.heads > 0 && c.head_dim == 0 && c.hidden % c.heads)
        return luaL_error(L, "%s: hidden_size (%d) must be divisible by num_heads (%d)", f, (int)c.hidden, (int)c.heads);
    read_block_cfg(L, 1, &c.moe, c.hidden, f);
    if (c.moe.router.num_experts > MAX_EXPERTS) return luaL_error(L, "%s: at most %d experts", f, MAX_EXPERTS);
    /* custom_experts = { {layer x num_experts} per MoE layer } */
    int n_moe = 0;
    for (int64_t i = 0; i < c.layers; i++) n_moe += moe_model_layer_is_moe(&c, i);
    moe_layer ***custom = NULL;
    lua_getfield(L, 1, "custom_experts");
    if (!lua_isnil(L, -1)) {
        int list = lua_gettop(L);
        if (!lua_istable(L, list) || (int)lua_objlen(L, list) != n_moe)
            return luaL_error(L, "%s: option 'custom_experts' must list the experts of each of the %d MoE layers", f, n_moe);
        custom = lua_newuserdata(L, sizeof(moe_layer **) * (size_t)(n_moe ? n_moe : 1));
        lua_newtable(L);   /* keeps the per-layer scratch arrays alive */
        int anchor = lua_gettop(L);
        for (int i = 0; i < n_moe; i++) {
            lua_rawgeti(L, list, i + 1);
            if (!lua_istable(L, -1) || (int64_t)lua_objlen(L, -1) != c.moe.router.num_experts)
                return luaL_error(L, "%s: custom_experts[%d] must be a list of %d layers", f, i + 1, (int)c.moe.router.num_experts);
            custom[i] = lua_newuserdata(L, sizeof(moe_layer *) * (size_t)c.moe.router.num_experts);
            lua_rawseti(L, anchor, i + 1);
            for (int64_t j = 0; j < c.moe.router.num_experts; j++) {
                lua_rawgeti(L, -1, (int)j + 1);
                char arg[64];
                snprintf(arg, sizeof arg, "custom_experts[%d][%d]", i + 1, (int)j + 1);
                custom[i][j] = moe_lua_check_layer(L, -1, f, arg);
                lua_pop(L, 1);
            }
            lua_pop(L, 1);
        }
    }
    moe_init init = {moe_lua_layer_seed(L, 1, f), 0};
    moe_layer *m = moe_model_new(moe_lua_ctx(L), &c, custom, &init);
    moe_lua_push_layer(L, m, f);
    return 1;
}

/* ---- methods added to every layer (they check the layer kind) ---- */

static moe_layer *check_moe(lua_State *L, const char *f) {
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!moe_layer_is_moe(l)) luaL_error(L, "%s: %s is not an MoE layer", f, l->vt->kind);
    return l;
}

static void push_stats(lua_State *L, const moe_route_stats *s, int64_t e) {
    lua_createtable(L, 0, 9);
    lua_pushnumber(L, (lua_Number)s->tokens); lua_setfield(L, -2, "tokens");
    lua_pushnumber(L, (lua_Number)s->assignments); lua_setfield(L, -2, "assignments");
    lua_pushnumber(L, (lua_Number)s->dropped); lua_setfield(L, -2, "dropped");
    lua_pushnumber(L, s->entropy); lua_setfield(L, -2, "entropy");
    lua_pushnumber(L, s->z); lua_setfield(L, -2, "z");
    lua_pushnumber(L, s->top1_prob); lua_setfield(L, -2, "top1_prob");
    lua_pushnumber(L, s->aux); lua_setfield(L, -2, "aux");
    lua_createtable(L, (int)e, 0);
    for (int64_t j = 0; j < e; j++) { lua_pushnumber(L, (lua_Number)s->counts[j]); lua_rawseti(L, -2, (int)j + 1); }
    lua_setfield(L, -2, "counts");
}

static int m_routing_stats(lua_State *L) {
    moe_layer *l = check_moe(L, "layer:routing_stats");
    /* a routing that did not wait has its statistics on the device: read them now */
    moe_lua_check(L, moe_block_fetch_stats(moe_lua_ctx(L), l), "layer:routing_stats");
    const moe_route_stats *s = moe_block_last_stats(l);
    if (!s) { lua_pushnil(L); return 1; }
    push_stats(L, s, moe_block_config(l)->router.num_experts);
    return 1;
}


static int m_aux(lua_State *L) { moe_lua_push_borrowed(L, moe_block_last_aux(check_moe(L, "layer:aux_loss")), "layer:aux_loss"); return 1; }
static int m_z(lua_State *L) { moe_lua_push_borrowed(L, moe_block_last_z(check_moe(L, "layer:z_loss")), "layer:z_loss"); return 1; }
static int m_router_logits(lua_State *L) {
    moe_lua_push_borrowed(L, moe_block_last_logits(check_moe(L, "layer:router_logits")), "layer:router_logits");
    return 1;
}
static int m_bias(lua_State *L) { moe_lua_push_borrowed(L, moe_block_bias(check_moe(L, "layer:expert_bias")), "layer:expert_bias"); return 1; }

static int m_assignments(lua_State *L) {
    const char *f = "layer:assignments";
    moe_tensor *t, *e, *w;
    moe_block_last_assignments(check_moe(L, f), &t, &e, &w);
    moe_lua_push_borrowed(L, t, f); moe_lua_push_borrowed(L, e, f); moe_lua_push_borrowed(L, w, f);
    return 3;
}

static int m_update_bias(lua_State *L) {
    moe_lua_check(L, moe_block_update_bias(check_moe(L, "layer:update_bias")), "layer:update_bias");
    return 0;
}

static int m_get_noise_step(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_block_noise_step(check_moe(L, "layer:noise_step")));
    return 1;
}

static int m_noise_step(lua_State *L) {
    const char *f = "layer:set_noise_step";
    moe_layer *l = check_moe(L, f);
    lua_Integer n = moe_lua_check_int(L, 2, f, "step");
    if (n < 0) return luaL_error(L, "%s: step must be >= 0", f);
    moe_lua_check(L, moe_block_set_noise_step(l, (uint64_t)n), f);
    return 0;
}

/* layer:set_keep_expert_rows(true | false | "auto"): keep the experts'
 * gathered rows for the backward, never keep them, or keep them only where
 * the GEMMs cannot gather them in their loads (the default; moe_block.h) */
static int m_keep_rows(lua_State *L) {
    const char *f = "layer:set_keep_expert_rows";
    moe_layer *l = check_moe(L, f);
    int keep;
    if (lua_isboolean(L, 2)) keep = lua_toboolean(L, 2);
    else if (lua_type(L, 2) == LUA_TSTRING && !strcmp(lua_tostring(L, 2), "auto")) keep = -1;
    else return luaL_error(L, "%s: expected true, false or \"auto\", got %s", f, luaL_typename(L, 2));
    moe_lua_check(L, moe_block_set_keep_rows(l, keep), f);
    return 0;
}

/* layer:set_defer_routing(on): let the routing leave its counts on the
 * device wherever the expert GEMMs can read them there (a CUDA graph of the
 * step needs it; moe_block.h) */
static int m_defer_routing(lua_State *L) {
    const char *f = "layer:set_defer_routing";
    moe_layer *l = check_moe(L, f);
    luaL_checktype(L, 2, LUA_TBOOLEAN);
    moe_lua_check(L, moe_block_set_defer_routing(l, lua_toboolean(L, 2)), f);
    return 0;
}
/* layer:release_last_forward(): the last forward's statistics read, its
 * device tensors let go (moe_block.h) */
static int m_release_last(lua_State *L) {
    const char *f = "layer:release_last_forward";
    moe_lua_check(L, moe_block_release_last(moe_lua_ctx(L), check_moe(L, f)), f);
    return 0;
}
/* layer:routing_summary() -> the device summary of the last forward's
 * routing while its statistics are unread (it did not wait), else nil: a CUDA
 * graph that captured the forward rewrites it at each replay */
static int m_routing_summary(lua_State *L) {
    moe_lua_push_borrowed(L, moe_block_pending_summary(check_moe(L, "layer:routing_summary")), "layer:routing_summary");
    return 1;
}
/* layer:routing_stats_from(summary, tokens) -> the statistics routing_stats()
 * gives, from a summary read back to the host (an i64 cpu tensor of
 * routing_summary()'s length) of a routing over `tokens` tokens */
static int m_routing_stats_from(lua_State *L) {
    const char *f = "layer:routing_stats_from";
    moe_layer *l = check_moe(L, f);
    moe_tensor *sum = moe_lua_check_tensor(L, 2, f);
    lua_Integer n = luaL_checkinteger(L, 3);
    const int64_t e = moe_block_config(l)->router.num_experts;
    moe_route_stats st;
    moe_lua_check(L, moe_routing_stats_from_summary(sum, e, (int64_t)n, &st), f);
    push_stats(L, &st, e);
    free(st.counts);
    return 1;
}

/* layer:keep_expert_rows() -> true | false | "auto" */
static int m_get_keep_rows(lua_State *L) {
    int k = moe_block_keep_rows(check_moe(L, "layer:keep_expert_rows"));
    if (k < 0) lua_pushstring(L, "auto");
    else lua_pushboolean(L, k);
    return 1;
}

static int m_train(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:train", "self");
    int on = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    moe_layer_set_training(l, on);
    lua_settop(L, 1);
    return 1;
}

static int m_is_training(lua_State *L) {
    lua_pushboolean(L, moe_lua_check_layer(L, 1, "layer:is_training", "self")->training);
    return 1;
}


static moe_layer *check_model(lua_State *L, const char *f) {
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!moe_model_config(l)) luaL_error(L, "%s: %s is not an MoE model", f, l->vt->kind);
    return l;
}

static int m_balance_losses(lua_State *L) {
    const char *f = "model:balance_losses";
    moe_layer *m = check_model(L, f);
    moe_tape *tape = lua_isnoneornil(L, 2) ? NULL : moe_lua_check_tape(L, 2, f);
    moe_tensor *aux, *z;
    moe_lua_check(L, moe_model_balance_losses(m, moe_lua_ctx(L), tape, &aux, &z), f);
    moe_lua_push_tensor(L, aux, f);
    moe_lua_push_tensor(L, z, f);
    return 2;
}

/* model:forward_loss(ids, targets[, tape][, {ignore_index = -100, chunk_rows = 0, loss_grad = 0}]) -> the
 * mean cross-entropy, the head and loss in chunks of rows (no logits; moe_model_forward_loss). loss_grad > 0
 * promises the backward's upstream gradient: the head's weight gradient is added during the forward. */
static int m_forward_loss(lua_State *L) {
    const char *f = "model:forward_loss";
    moe_layer *m = check_model(L, f);
    moe_tensor *ids = moe_lua_check_tensor_f(L, 2, f, "ids");
    moe_tensor *targets = moe_lua_check_tensor_f(L, 3, f, "targets");
    moe_tape *tape = lua_isnoneornil(L, 4) ? NULL : moe_lua_check_tape(L, 4, f);
    if (!lua_isnoneornil(L, 5) && !lua_istable(L, 5)) return luaL_error(L, "%s: options must be a table", f);
    int64_t ignore = moe_lua_opt_field_int(L, 5, "ignore_index", -100, f);
    int64_t chunk = moe_lua_opt_field_int(L, 5, "chunk_rows", 0, f);
    if (chunk < 0) return luaL_error(L, "%s: chunk_rows must be >= 0 (0: chunks of at most 256 MB of logits)", f);
    double loss_grad = moe_lua_opt_field_num(L, 5, "loss_grad", 0.0, f);
    const float lg = (float)loss_grad;   /* in f32 as the backward's seed: neither overflowing nor vanishing */
    if (!(loss_grad >= 0) || isinf(lg) || (loss_grad > 0 && lg == 0.0f))
        return luaL_error(L, "%s: loss_grad must be a finite number >= 0 (0: none), got %g", f, loss_grad);
    moe_tensor *loss = NULL;
    moe_lua_check(L, moe_model_forward_loss(m, moe_lua_ctx(L), tape, ids, targets, ignore, chunk, lg, &loss),
                  f);
    moe_lua_push_tensor(L, loss, f);
    return 1;
}

static int m_moe_layers(lua_State *L) {
    moe_layer *m = check_model(L, "model:moe_layers");
    moe_layer *ls[1024];
    int n = moe_model_moe_layers(m, ls, 1024);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n && i < 1024; i++) {
        moe_layer_retain(ls[i]);
        moe_lua_push_layer(L, ls[i], "model:moe_layers");
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int m_active(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_model_num_active_params(check_model(L, "model:num_active_params")));
    return 1;
}

static int m_config(lua_State *L) {
    const moe_model_cfg *c = moe_model_config(check_model(L, "model:config"));
    lua_createtable(L, 0, 24);
#define SETN(k, v) (lua_pushnumber(L, (lua_Number)(v)), lua_setfield(L, -2, k))
#define SETB(k, v) (lua_pushboolean(L, (v)), lua_setfield(L, -2, k))
#define SETS(k, v) (lua_pushstring(L, (v)), lua_setfield(L, -2, k))
    SETN("vocab_size", c->vocab); SETN("hidden_size", c->hidden); SETN("num_layers", c->layers);
    SETN("num_heads", c->heads); SETN("num_kv_heads", c->kv_heads ? c->kv_heads : c->heads);
    SETN("head_dim", c->head_dim ? c->head_dim : c->hidden / c->heads); SETN("intermediate_size", c->dense_inner);
    SETN("rope_theta", c->rope_theta); SETN("norm_eps", c->norm_eps); SETB("qk_norm", c->qk_norm);
    SETB("tie_word_embeddings", c->tie_embeddings); SETB("attention_bias", c->attn_bias); SETB("qkv_bias", c->qkv_bias);
    SETS("activation", acts[c->activation]); SETN("moe_layer_frequency", c->moe_every);
    SETN("first_dense_layers", c->first_dense);
    const moe_block_cfg *b = &c->moe;
    SETN("num_experts", b->router.num_experts); SETN("experts_per_token", b->router.top_k);
    SETS("router", selections[b->router.selection]); SETS("router_score", scores[b->router.score]);
    SETB("renormalize", b->router.renormalize); SETN("capacity_factor", b->router.capacity_factor);
    SETN("routed_scaling_factor", b->router.routed_scaling ? b->router.routed_scaling : 1);
    SETN("sinkhorn_iterations", b->router.sinkhorn_iters); SETS("aux_loss_type", aux_kinds[b->router.aux]);
    SETN("expert_intermediate_size", b->expert_inner); SETN("jitter_noise", b->jitter); SETB("aux_free", b->aux_free);
    SETN("aux_free_rate", b->aux_free_rate); SETN("num_shared_experts", b->shared_experts);
    SETN("shared_intermediate_size", b->shared_inner); SETB("shared_expert_gate", b->shared_gate);
    lua_newtable(L);
    for (int64_t i = 0, k = 0; i < c->layers && i < MOE_MODEL_MAX_LAYERS; i++)
        if (c->mlp_only[i / 64] >> (i % 64) & 1) { lua_pushnumber(L, (lua_Number)i); lua_rawseti(L, -2, (int)++k); }
    lua_setfield(L, -2, "mlp_only_layers");
#undef SETN
#undef SETB
#undef SETS
    return 1;
}

/* ---- expert sharding (expert parallelism; lua/moelab/dist_shard.lua) ---- */

/* The bank whose weights include param value v, or NULL. */
static moe_layer *bank_of(moe_layer **banks, int nb, const moe_tensor *v) {
    for (int b = 0; b < nb; b++)
        for (int i = 0; i < banks[b]->n_params; i++)
            if (banks[b]->params[i].value == v) return banks[b];
    return NULL;
}

/* layer:param_layout() -> array in parameters() order of {name=, offset=, numel=}
 * (offset: 0-based element of the root's flat buffer), with expert_first=,
 * expert_count=, expert_total= for the weights of expert banks (their rows
 * are experts [expert_first, expert_first + expert_count) of expert_total). */
static int m_param_layout(lua_State *L) {
    const char *f = "layer:param_layout";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    if (!l->flat_values) return luaL_error(L, "%s: the layer does not own flat parameter buffers (use the model's root)", f);
    int n = moe_layer_num_param_tensors(l), nb = moe_expert_banks(l, NULL, 0);
    moe_param *ps = lua_newuserdata(L, sizeof(moe_param) * (size_t)(n ? n : 1));
    moe_layer **banks = lua_newuserdata(L, sizeof(moe_layer *) * (size_t)(nb ? nb : 1));
    moe_layer_collect_params(l, ps, n);
    moe_expert_banks(l, banks, nb);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        if (ps[i].value->storage != l->flat_values->storage)
            return luaL_error(L, "%s: parameter %s is not in the flat buffer (re-flatten the model)", f, ps[i].name);
        lua_createtable(L, 0, 6);
        lua_pushstring(L, ps[i].name);
        lua_setfield(L, -2, "name");
        lua_pushnumber(L, (lua_Number)(ps[i].value->offset - l->flat_values->offset));
        lua_setfield(L, -2, "offset");
        lua_pushnumber(L, (lua_Number)moe_tensor_numel(ps[i].value));
        lua_setfield(L, -2, "numel");
        moe_layer *bank = bank_of(banks, nb, ps[i].value);
        if (bank) {
            int64_t first, count, total;
            moe_expert_bank_range(bank, &first, &count, &total);
            lua_pushnumber(L, (lua_Number)first);
            lua_setfield(L, -2, "expert_first");
            lua_pushnumber(L, (lua_Number)count);
            lua_setfield(L, -2, "expert_count");
            lua_pushnumber(L, (lua_Number)total);
            lua_setfield(L, -2, "expert_total");
        }
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

/* layer:expert_shard() -> nil when every expert bank of the tree holds all of
 * its experts, else {first=, count=, total=} of the first sharded bank */
static int m_expert_shard(lua_State *L) {
    moe_layer *l = moe_lua_check_layer(L, 1, "layer:expert_shard", "self");
    int nb = moe_expert_banks(l, NULL, 0);
    moe_layer **banks = lua_newuserdata(L, sizeof(moe_layer *) * (size_t)(nb ? nb : 1));
    moe_expert_banks(l, banks, nb);
    for (int b = 0; b < nb; b++) {
        int64_t first, count, total;
        moe_expert_bank_range(banks[b], &first, &count, &total);
        if (count == total) continue;
        lua_createtable(L, 0, 3);
        lua_pushnumber(L, (lua_Number)first);
        lua_setfield(L, -2, "first");
        lua_pushnumber(L, (lua_Number)count);
        lua_setfield(L, -2, "count");
        lua_pushnumber(L, (lua_Number)total);
        lua_setfield(L, -2, "total");
        return 1;
    }
    lua_pushnil(L);
    return 1;
}

/* layer:set_expert_shard(first, count[, values]) -> self: every expert bank of
 * the tree holds experts [first, first + count) (0-based), taken from the rows
 * it holds now or from values (an array of f32 tensors [count, ...], one per
 * expert weight in parameter order); the flat buffers are rebuilt (moe_block.h) */
static int m_set_expert_shard(lua_State *L) {
    const char *f = "layer:set_expert_shard";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "self");
    lua_Integer first = moe_lua_check_int(L, 2, f, "first"), count = moe_lua_check_int(L, 3, f, "count");
    int nv = 0;
    moe_tensor **vals = NULL;
    if (!lua_isnoneornil(L, 4)) {
        if (!lua_istable(L, 4)) return luaL_error(L, "%s: values must be an array of tensors, got %s", f, luaL_typename(L, 4));
        nv = (int)lua_objlen(L, 4);
        vals = lua_newuserdata(L, sizeof(moe_tensor *) * (size_t)(nv ? nv : 1));
        for (int i = 0; i < nv; i++) {
            lua_rawgeti(L, 4, i + 1);
            vals[i] = moe_lua_check_tensor_f(L, -1, f, "values[i]");
            lua_pop(L, 1);   /* the values table keeps the tensor alive */
        }
    }
    moe_lua_check(L, moe_experts_set_shard(moe_lua_ctx(L), l, first, count, vals, nv), f);
    lua_settop(L, 1);
    return 1;
}

static const luaL_Reg layer_extra[] = {
    {"routing_stats", m_routing_stats}, {"aux_loss", m_aux}, {"z_loss", m_z}, {"expert_bias", m_bias}, {"router_logits", m_router_logits},
    {"assignments", m_assignments}, {"update_bias", m_update_bias}, {"set_noise_step", m_noise_step}, {"set_keep_expert_rows", m_keep_rows}, {"keep_expert_rows", m_get_keep_rows}, {"set_defer_routing", m_defer_routing}, {"routing_summary", m_routing_summary}, {"release_last_forward", m_release_last}, {"routing_stats_from", m_routing_stats_from}, {"noise_step", m_get_noise_step}, {"train", m_train},
    {"is_training", m_is_training}, {"balance_losses", m_balance_losses}, {"forward_loss", m_forward_loss},
    {"moe_layers", m_moe_layers}, {"num_active_params", m_active}, {"config", m_config},
    {"param_layout", m_param_layout}, {"expert_shard", m_expert_shard}, {"set_expert_shard", m_set_expert_shard},
    {NULL, NULL}};

void moe_lua_open_peft(lua_State *L);   /* peft.c: LoRA adapters and the router-input bias */

void moe_lua_open_moe(lua_State *L) {
    /* extend the layer methods table */
    luaL_getmetatable(L, "moelab.Layer");
    lua_getfield(L, -1, "__index");
    luaL_register(L, NULL, layer_extra);
    lua_pop(L, 2);
    /* constructors into the nn table of the module on top of the stack */
    lua_getfield(L, -1, "nn");
    lua_pushcfunction(L, l_moe);
    lua_setfield(L, -2, "MoE");
    lua_pushcfunction(L, l_model);
    lua_setfield(L, -2, "Model");
    lua_pop(L, 1);
    moe_lua_open_peft(L);
}
