/* moelab.core.dist: communicators and collectives (src/dist) for Lua.
 *
 * One communicator per Lua state, kept in the registry: dist.init{backend=}
 * makes it ("auto": MPI when this process was launched by mpirun, else the
 * single-process communicator; "single", "mpi", "nccl"); every other
 * function initialises with the defaults on first use. With "nccl" the MPI
 * (or single) communicator that bootstrapped it stays, and collectives of
 * CPU tensors go through it.
 *
 * Communicator objects: dist.comm() (the main one), dist.host_comm() (the one
 * for CPU tensors: the bootstrap communicator under NCCL, else the main one)
 * and comm:split(color[, key]) / dist.split(color[, key]) (sub-communicators,
 * moe_comm_split; collective over the split communicator). The collectives
 * are also methods (comm:all_reduce(t, op), comm:rank(), ...), working over
 * that communicator. A split communicator keeps its parent alive; both are
 * freed by the garbage collector. set_expert_parallel(layer, comm) keeps comm
 * alive while the layer (its Lua object) has expert parallelism on. */
#include <stdlib.h>
#include <string.h>

#include "../dist/comm.h"
#include "../nn/model.h"
#include "../nn/moe_block.h"
#include "../ops/backend.h"
#include "lmoe.h"

#define COMM_MT "moelab.Comm"
#define KEY_MAIN "moelab.dist.comm"
#define KEY_HOST "moelab.dist.host_comm"
#define KEY_EP_REFS "moelab.dist.ep_refs"

typedef struct { moe_comm *c; } comm_box;

static int comm_gc(lua_State *L) {
    comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    moe_comm_free(b->c);
    b->c = NULL;
    return 0;
}

static void push_comm_methods(lua_State *L);
static int comm_tostring(lua_State *L);

static comm_box *new_box(lua_State *L) {
    comm_box *b = lua_newuserdata(L, sizeof *b);
    b->c = NULL;
    if (luaL_newmetatable(L, COMM_MT)) {
        lua_pushcfunction(L, comm_gc);
        lua_setfield(L, -2, "__gc");
        lua_pushcfunction(L, comm_tostring);
        lua_setfield(L, -2, "__tostring");
        push_comm_methods(L);
        lua_setfield(L, -2, "__index");
    }
    lua_setmetatable(L, -2);
    return b;
}

/* The communicator of a Comm object at index 1 (a method call): sets *base to
 * the first argument after it. NULL (and *base = 1) when index 1 is not one. */
static moe_comm *self_comm(lua_State *L, int *base, const char *f) {
    comm_box *b = lua_type(L, 1) == LUA_TUSERDATA ? luaL_testudata(L, 1, COMM_MT) : NULL;
    *base = b ? 2 : 1;
    if (b && !b->c) moe_lua_errorf(L, "%s: the communicator was freed", f);
    return b ? b->c : NULL;
}

static moe_comm *registry_comm(lua_State *L, const char *key) {
    lua_getfield(L, LUA_REGISTRYINDEX, key);
    comm_box *b = lua_isuserdata(L, -1) ? lua_touserdata(L, -1) : NULL;
    lua_pop(L, 1);
    return b ? b->c : NULL;
}

static void push_info(lua_State *L, moe_comm *c) {
    lua_createtable(L, 0, 6);
    lua_pushstring(L, c->ops->name);
    lua_setfield(L, -2, "backend");
    lua_pushinteger(L, c->rank);
    lua_setfield(L, -2, "rank");
    lua_pushinteger(L, c->size);
    lua_setfield(L, -2, "world_size");
    lua_pushinteger(L, c->local_rank);
    lua_setfield(L, -2, "local_rank");
    lua_pushinteger(L, c->local_size);
    lua_setfield(L, -2, "local_world_size");
    lua_pushnumber(L, c->timeout_s);
    lua_setfield(L, -2, "timeout");
    lua_pushnumber(L, (double)c->a2a_calls);
    lua_setfield(L, -2, "a2a_calls");
    lua_pushnumber(L, c->a2a_wait_s);
    lua_setfield(L, -2, "a2a_wait_s");   /* waiting for the device before exchanges */
    lua_pushnumber(L, c->a2a_s);
    lua_setfield(L, -2, "a2a_s");        /* inside the exchanges */
}

/* Makes the communicator(s) of this state; opts at index `opts` (or 0). */
static moe_comm *do_init(lua_State *L, int opts) {
    const char *f = "dist.init";
    const char *backend = "auto";
    double timeout = 0;
    int device = -1;
    const char *rdv = getenv("MOELAB_DIST_RENDEZVOUS");
    if (opts) {
        lua_pushnil(L);
        while (lua_next(L, opts)) {
            const char *k = lua_type(L, -2) == LUA_TSTRING ? lua_tostring(L, -2) : NULL;
            if (!k || (strcmp(k, "backend") && strcmp(k, "timeout") && strcmp(k, "device") && strcmp(k, "rendezvous")))
                moe_lua_errorf(L, "%s: unknown option '%s' (known: backend, device, rendezvous, timeout)", f,
                               k ? k : luaL_typename(L, -2));
            lua_pop(L, 1);
        }
        backend = moe_lua_opt_field_str(L, opts, "backend", "auto", f);
        timeout = moe_lua_opt_field_num(L, opts, "timeout", 0, f);
        device = (int)moe_lua_opt_field_int(L, opts, "device", -1, f);
        rdv = moe_lua_opt_field_str(L, opts, "rendezvous", rdv, f);
        if (timeout < 0) moe_lua_errorf(L, "%s: timeout must be >= 0 seconds, got %g", f, timeout);
    }
    if (timeout == 0) {
        const char *e = getenv("MOELAB_DIST_TIMEOUT");
        if (e && *e) timeout = atof(e);
    }
    moe_comm *existing = registry_comm(L, KEY_MAIN);
    if (existing) {
        if (strcmp(backend, "auto") && strcmp(backend, existing->ops->name))
            moe_lua_errorf(L, "%s: already initialised with the %s backend (asked for %s)", f, existing->ops->name,
                           backend);
        if (timeout > 0) existing->timeout_s = timeout;
        return existing;
    }
    moe_ctx *ctx = moe_lua_ctx(L);
    int want_mpi = !strcmp(backend, "mpi") || (!strcmp(backend, "auto") && moe_dist_launched_by_mpi());
    int want_nccl = !strcmp(backend, "nccl");
    if (strcmp(backend, "auto") && strcmp(backend, "single") && !want_mpi && !want_nccl)
        moe_lua_errorf(L, "%s: backend must be \"auto\", \"single\", \"mpi\" or \"nccl\", got \"%s\"", f, backend);
    if (want_nccl && moe_dist_launched_by_mpi()) want_mpi = 1;

    /* the host communicator: MPI or single */
    comm_box *hb = new_box(L);
    hb->c = want_mpi ? moe_comm_mpi_new(ctx, timeout) : (want_nccl && rdv ? NULL : moe_comm_single_new(ctx));
    if (!hb->c && !(want_nccl && rdv && !want_mpi)) moe_lua_fail(L, f);
    if (!want_nccl) {
        lua_setfield(L, LUA_REGISTRYINDEX, KEY_MAIN);
        return registry_comm(L, KEY_MAIN);
    }
    comm_box *nb = new_box(L);
    if (device < 0) {
        int n = moe_cuda_device_count();
        if (n <= 0) moe_lua_errorf(L, "%s: the nccl backend needs a CUDA device, found none", f);
        int lr = hb->c ? hb->c->local_rank : atoi(getenv("LOCAL_RANK") ? getenv("LOCAL_RANK") : "0");
        device = lr % n;
    }
    nb->c = moe_comm_nccl_new(ctx, hb->c, hb->c ? NULL : rdv, device, timeout);
    if (!nb->c) moe_lua_fail(L, f);
    lua_setfield(L, LUA_REGISTRYINDEX, KEY_MAIN);
    if (hb->c) lua_setfield(L, LUA_REGISTRYINDEX, KEY_HOST);
    else lua_pop(L, 1);
    return registry_comm(L, KEY_MAIN);
}

static moe_comm *get_comm(lua_State *L) {
    moe_comm *c = registry_comm(L, KEY_MAIN);
    return c ? c : do_init(L, 0);
}

/* The communicator for a tensor on device d: the main one, or the host one
 * (the MPI communicator under NCCL) for CPU tensors. */
static moe_comm *comm_for(lua_State *L, moe_tensor *t) {
    moe_comm *c = get_comm(L);
    if (!c->ops->supports(c, t->device)) {
        moe_comm *h = registry_comm(L, KEY_HOST);
        if (h && h->ops->supports(h, t->device)) return h;
    }
    return c;
}

static int l_init(lua_State *L) {
    int opts = 0;
    if (!lua_isnoneornil(L, 1)) {
        luaL_checktype(L, 1, LUA_TTABLE);
        opts = 1;
    }
    push_info(L, do_init(L, opts));
    return 1;
}

static int l_is_initialized(lua_State *L) {
    lua_pushboolean(L, registry_comm(L, KEY_MAIN) != NULL);
    return 1;
}

/* the method's communicator, else the main one */
static moe_comm *self_or_main(lua_State *L, int *base, const char *f) {
    moe_comm *c = self_comm(L, base, f);
    return c ? c : get_comm(L);
}
static int l_info(lua_State *L) { int b; push_info(L, self_or_main(L, &b, "dist.info")); return 1; }
static int l_rank(lua_State *L) { int b; lua_pushinteger(L, self_or_main(L, &b, "dist.rank")->rank); return 1; }
static int l_world_size(lua_State *L) { int b; lua_pushinteger(L, self_or_main(L, &b, "dist.world_size")->size); return 1; }
static int l_local_rank(lua_State *L) { int b; lua_pushinteger(L, self_or_main(L, &b, "dist.local_rank")->local_rank); return 1; }
static int l_local_world_size(lua_State *L) {
    int b;
    lua_pushinteger(L, self_or_main(L, &b, "dist.local_world_size")->local_size);
    return 1;
}
static int l_backend(lua_State *L) { int b; lua_pushstring(L, self_or_main(L, &b, "dist.backend")->ops->name); return 1; }
static int l_launched(lua_State *L) { lua_pushboolean(L, moe_dist_launched_by_mpi()); return 1; }
static int l_have_mpi(lua_State *L) { lua_pushboolean(L, moe_dist_have_mpi()); return 1; }
static int l_have_nccl(lua_State *L) { lua_pushboolean(L, moe_dist_have_nccl()); return 1; }

static int l_barrier(lua_State *L) {
    int b;
    moe_lua_check(L, moe_comm_barrier(self_or_main(L, &b, "dist.barrier")), "dist.barrier");
    return 0;
}

/* The communicator for tensor argument t: the method's, else comm_for. */
static moe_comm *comm_arg(lua_State *L, moe_comm *self, moe_tensor *t) { return self ? self : comm_for(L, t); }

static moe_dist_op check_op(lua_State *L, int idx, const char *f) {
    if (lua_isnoneornil(L, idx)) return MOE_DIST_SUM;
    if (lua_type(L, idx) != LUA_TSTRING) moe_lua_errorf(L, "%s: op must be \"sum\" or \"avg\", got %s", f, luaL_typename(L, idx));
    int op = moe_dist_op_parse(lua_tostring(L, idx));
    if (op < 0) moe_lua_errorf(L, "%s: op must be \"sum\" or \"avg\", got \"%s\"", f, lua_tostring(L, idx));
    return (moe_dist_op)op;
}

/* all_reduce(t[, op = "sum"|"avg"[, {bucket_mb=}]]) -> t (in place) */
static int l_all_reduce(lua_State *L) {
    const char *f = "dist.all_reduce";
    int a;
    moe_comm *self = self_comm(L, &a, f);
    moe_tensor *t = moe_lua_check_tensor_f(L, a, f, "tensor");
    moe_dist_op op = check_op(L, a + 1, f);
    double mb = 0;
    if (!lua_isnoneornil(L, a + 2)) {
        luaL_checktype(L, a + 2, LUA_TTABLE);
        mb = moe_lua_opt_field_num(L, a + 2, "bucket_mb", 0, f);
        if (mb < 0) moe_lua_errorf(L, "%s: bucket_mb must be >= 0, got %g", f, mb);
    }
    moe_lua_check(L, moe_comm_all_reduce_bucketed(comm_arg(L, self, t), t, op, (size_t)(mb * 1024 * 1024)), f);
    lua_settop(L, a);
    return 1;
}

/* broadcast(t[, root = 0]) -> t (in place) */
static int l_broadcast(lua_State *L) {
    const char *f = "dist.broadcast";
    int a;
    moe_comm *self = self_comm(L, &a, f);
    moe_tensor *t = moe_lua_check_tensor_f(L, a, f, "tensor");
    int root = lua_isnoneornil(L, a + 1) ? 0 : (int)moe_lua_check_int(L, a + 1, f, "root");
    moe_lua_check(L, moe_comm_broadcast(comm_arg(L, self, t), t, root), f);
    lua_settop(L, a);
    return 1;
}

/* all_gather(t) -> a new tensor of shape {world_size, ...t's shape} */
static int l_all_gather(lua_State *L) {
    const char *f = "dist.all_gather";
    int a;
    moe_comm *self = self_comm(L, &a, f);
    moe_tensor *t = moe_lua_check_tensor_f(L, a, f, "tensor");
    moe_comm *c = comm_arg(L, self, t);
    if (t->ndim + 1 > MOE_MAX_DIMS) moe_lua_errorf(L, "%s: the tensor has too many dims", f);
    int64_t shape[MOE_MAX_DIMS];
    shape[0] = c->size;
    for (int i = 0; i < t->ndim; i++) shape[i + 1] = t->shape[i];
    moe_tensor *out = moe_lua_new_tensor(L, t->dtype, t->ndim + 1, shape, t->device, f);
    moe_lua_check(L, moe_comm_all_gather(c, t, out), f);
    return 1;
}

/* reduce_scatter(t[, op]) -> a new tensor: t's shape with the first dim divided by world_size */
static int l_reduce_scatter(lua_State *L) {
    const char *f = "dist.reduce_scatter";
    int a;
    moe_comm *self = self_comm(L, &a, f);
    moe_tensor *t = moe_lua_check_tensor_f(L, a, f, "tensor");
    moe_dist_op op = check_op(L, a + 1, f);
    moe_comm *c = comm_arg(L, self, t);
    if (t->ndim < 1 || t->shape[0] % c->size != 0)
        moe_lua_errorf(L, "%s: the first dim (%lld) must be divisible by the world size %d", f,
                       t->ndim ? (long long)t->shape[0] : 0LL, c->size);
    int64_t shape[MOE_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i];
    shape[0] /= c->size;
    moe_tensor *out = moe_lua_new_tensor(L, t->dtype, t->ndim, shape, t->device, f);
    moe_lua_check(L, moe_comm_reduce_scatter(c, t, out, op), f);
    return 1;
}

static void read_counts(lua_State *L, int idx, int n, int64_t *out, const char *f, const char *arg) {
    if (!lua_istable(L, idx)) moe_lua_errorf(L, "%s: %s must be a table of %d row counts", f, arg, n);
    if ((int)lua_objlen(L, idx) != n)
        moe_lua_errorf(L, "%s: %s has %d entries, expected one per rank (%d)", f, arg, (int)lua_objlen(L, idx), n);
    for (int r = 0; r < n; r++) {
        lua_rawgeti(L, idx, r + 1);
        if (!lua_isnumber(L, -1) || lua_tonumber(L, -1) < 0 || lua_tonumber(L, -1) != (lua_Integer)lua_tonumber(L, -1))
            moe_lua_errorf(L, "%s: %s[%d] must be a non-negative integer", f, arg, r + 1);
        out[r] = (int64_t)lua_tointeger(L, -1);
        lua_pop(L, 1);
    }
}

/* all_to_all_v(t, send_rows, recv_rows) -> a new tensor of sum(recv_rows) rows:
 * rows of t (first dim) go to rank r in consecutive blocks of send_rows[r]. */
static int l_all_to_all_v(lua_State *L) {
    const char *f = "dist.all_to_all_v";
    int a;
    moe_comm *self = self_comm(L, &a, f);
    moe_tensor *t = moe_lua_check_tensor_f(L, a, f, "tensor");
    moe_comm *c = comm_arg(L, self, t);
    if (t->ndim < 1) moe_lua_errorf(L, "%s: the tensor needs at least one dim", f);
    int64_t *counts = lua_newuserdata(L, sizeof(int64_t) * 2 * (size_t)c->size);
    int64_t *sc = counts, *rc = counts + c->size;
    read_counts(L, a + 1, c->size, sc, f, "send_rows");
    read_counts(L, a + 2, c->size, rc, f, "recv_rows");
    int64_t row = 1, rows = 0, sent = 0;
    for (int i = 1; i < t->ndim; i++) row *= t->shape[i];
    for (int r = 0; r < c->size; r++) { rows += rc[r]; sent += sc[r]; }
    if (sent > t->shape[0]) moe_lua_errorf(L, "%s: send_rows add up to %lld, the tensor has %lld rows", f,
                                           (long long)sent, (long long)t->shape[0]);
    int64_t shape[MOE_MAX_DIMS];
    for (int i = 0; i < t->ndim; i++) shape[i] = t->shape[i];
    shape[0] = rows;
    for (int r = 0; r < c->size; r++) { sc[r] *= row; rc[r] *= row; }
    moe_tensor *out = moe_lua_new_tensor(L, t->dtype, t->ndim, shape, t->device, f);
    moe_lua_check(L, moe_comm_all_to_all_v(c, t, sc, out, rc), f);
    return 1;
}

/* Applies set(layer, c) to every MoE layer of the tree; returns how many. */
static int set_moe_tree(lua_State *L, moe_layer *l, moe_status (*set)(moe_layer *, moe_comm *), moe_comm *c,
                        const char *f) {
    int n = 0;
    if (moe_layer_is_moe(l)) {
        moe_lua_check(L, set(l, c), f);
        n++;
    }
    for (int i = 0; i < l->n_children; i++)
        if (l->children[i]) n += set_moe_tree(L, l->children[i], set, c, f);
    return n;
}

/* dist.set_global_aux(layer, on) -> MoE layers set: their batch auxiliary
 * loss over every rank's tokens (the main communicator; the host one for CPU
 * layers), or (false) over this rank's */
static int l_set_global_aux(lua_State *L) {
    const char *f = "dist.set_global_aux";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "layer");
    int on = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    moe_comm *c = on ? get_comm(L) : NULL;
    if (c && !c->ops->supports(c, MOE_DEVICE_CPU)) {
        moe_comm *h = registry_comm(L, KEY_HOST);
        if (h) c = h;
    }
    lua_pushinteger(L, set_moe_tree(L, l, moe_block_set_aux_comm, c, f));
    return 1;
}

/* set_expert_parallel(layer, on | comm) -> the number of MoE layers set:
 * expert parallelism over all ranks of this state's communicator (the host one
 * for CPU layers), or over the ranks of `comm` (a Comm object, e.g. a split),
 * for every MoE layer in the tree; on = false turns it off. The layers borrow
 * the communicator: a Comm given here stays referenced (from a weak-keyed
 * registry table, by the layer object) until expert parallelism is turned off. */
static int l_set_expert_parallel(lua_State *L) {
    const char *f = "dist.set_expert_parallel";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "layer");
    comm_box *given = lua_type(L, 2) == LUA_TUSERDATA ? luaL_testudata(L, 2, COMM_MT) : NULL;
    if (lua_type(L, 2) == LUA_TUSERDATA && !given)
        moe_lua_errorf(L, "%s: the second argument must be true, false or a communicator (dist.split)", f);
    if (given && !given->c) moe_lua_errorf(L, "%s: the communicator was freed", f);
    int on = given || lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    moe_comm *c = given ? given->c : get_comm(L);
    if (on && !given && !c->ops->supports(c, l->device)) {
        moe_comm *h = registry_comm(L, KEY_HOST);
        if (h && h->ops->supports(h, l->device)) c = h;
    }
    int n = set_moe_tree(L, l, moe_block_set_expert_parallel, on ? c : NULL, f);
    /* registry[KEY_EP_REFS][layer object] = the Comm given (or nil) */
    lua_getfield(L, LUA_REGISTRYINDEX, KEY_EP_REFS);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_newtable(L);
        lua_createtable(L, 0, 1);
        lua_pushstring(L, "k");
        lua_setfield(L, -2, "__mode");
        lua_setmetatable(L, -2);
        lua_pushvalue(L, -1);
        lua_setfield(L, LUA_REGISTRYINDEX, KEY_EP_REFS);
    }
    lua_pushvalue(L, 1);
    if (given) lua_pushvalue(L, 2);
    else lua_pushnil(L);
    lua_rawset(L, -3);
    lua_pop(L, 1);
    lua_pushinteger(L, n);
    return 1;
}

static int set_gather_tree(lua_State *L, moe_layer *l, int64_t tokens, const char *f) {
    int n = 0;
    if (moe_layer_is_moe(l)) {
        moe_lua_check(L, moe_block_set_ep_gather(l, tokens), f);
        n++;
    }
    for (int i = 0; i < l->n_children; i++)
        if (l->children[i]) n += set_gather_tree(L, l->children[i], tokens, f);
    return n;
}

/* dist.set_ep_gather(layer, tokens | false) -> MoE layers set: expert
 * parallelism by all_gather of `tokens` tokens per rank (moe_block.h), or
 * (false / 0) by all-to-all */
static int l_set_ep_gather(lua_State *L) {
    const char *f = "dist.set_ep_gather";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "layer");
    int64_t tokens = 0;
    if (lua_type(L, 2) == LUA_TNUMBER) {
        lua_Number v = lua_tonumber(L, 2);
        if (v < 0 || v != (lua_Number)(int64_t)v)
            moe_lua_errorf(L, "%s: tokens must be a whole number >= 0, got %g", f, (double)v);
        tokens = (int64_t)v;
    } else if (!(lua_isboolean(L, 2) && !lua_toboolean(L, 2))) {
        moe_lua_errorf(L, "%s: the second argument must be the tokens per rank or false, got %s", f, luaL_typename(L, 2));
    }
    lua_pushinteger(L, set_gather_tree(L, l, tokens, f));
    return 1;
}

/* The skip ranges of dist.set_grad_allreduce's options ({{lo, hi}, ...},
 * 0-based element ranges) as 2 * n integers (malloc'd; NULL when none). */
static int64_t *skip_ranges(lua_State *L, int idx, const char *f, int *n) {
    *n = 0;
    lua_getfield(L, idx, "skip");
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return NULL; }
    if (!lua_istable(L, -1)) moe_lua_errorf(L, "%s: skip must be a list of {lo, hi} ranges", f);
    int k = (int)lua_objlen(L, -1);
    int64_t *r = k ? malloc((size_t)k * 2 * sizeof *r) : NULL;
    if (k && !r) moe_lua_errorf(L, "%s: out of memory", f);
    for (int i = 0; i < k; i++) {
        lua_rawgeti(L, -1, i + 1);
        for (int j = 0; j < 2; j++) {
            if (lua_istable(L, -1)) lua_rawgeti(L, -1, j + 1);
            else lua_pushnil(L);
            if (!lua_isnumber(L, -1)) {
                free(r);
                moe_lua_errorf(L, "%s: skip[%d] must be {lo, hi} with integer bounds", f, i + 1);
                return NULL;
            }
            r[2 * i + j] = (int64_t)lua_tonumber(L, -1);
            lua_pop(L, 1);
        }
        lua_pop(L, 1);
    }
    lua_pop(L, 1);
    *n = k;
    return r;
}

/* dist.set_grad_allreduce(model, on[, {op = "avg"|"sum", skip = {{lo, hi}, ...}}]):
 * data-parallel gradient averaging over the main communicator, overlapped
 * with backward (src/nn/model.h); sharded experts sum the rest and skip their
 * own ranges. */
static int l_set_grad_allreduce(lua_State *L) {
    const char *f = "dist.set_grad_allreduce";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "model");
    int on = lua_isnoneornil(L, 2) ? 1 : lua_toboolean(L, 2);
    moe_comm *c = on ? get_comm(L) : NULL;
    if (c && !c->ops->supports(c, l->device))
        moe_lua_errorf(L, "%s: the %s communicator cannot reduce this model's gradients", f, c->ops->name);
    int op = MOE_DIST_AVG, n_skip = 0;
    int64_t *skip = NULL;
    if (!lua_isnoneornil(L, 3)) {
        if (!lua_istable(L, 3)) moe_lua_errorf(L, "%s: options must be a table {op =, skip =}, got %s", f, luaL_typename(L, 3));
        lua_getfield(L, 3, "op");
        if (!lua_isnil(L, -1)) {
            const char *o = lua_tostring(L, -1);
            if (!o || (strcmp(o, "sum") && strcmp(o, "avg"))) moe_lua_errorf(L, "%s: op must be \"sum\" or \"avg\"", f);
            op = strcmp(o, "sum") ? MOE_DIST_AVG : MOE_DIST_SUM;
        }
        lua_pop(L, 1);
        skip = skip_ranges(L, 3, f, &n_skip);
    }
    moe_status s = moe_model_set_grad_reduce(l, c, op, skip, n_skip);
    free(skip);
    moe_lua_check(L, s, f);
    return 0;
}
static int l_arm_grad_allreduce(lua_State *L) {
    const char *f = "dist.arm_grad_allreduce";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "model");
    moe_lua_check(L, moe_model_arm_grad_allreduce(l, lua_toboolean(L, 2)), f);
    return 0;
}
static int l_finish_grad_allreduce(lua_State *L) {
    const char *f = "dist.finish_grad_allreduce";
    moe_layer *l = moe_lua_check_layer(L, 1, f, "model");
    moe_lua_check(L, moe_model_finish_grad_allreduce(moe_lua_ctx(L), l), f);
    return 0;
}

static int ep_size_tree(const moe_layer *l) {
    if (moe_layer_is_moe(l)) return moe_block_expert_parallel_size(l);
    for (int i = 0; i < l->n_children; i++) {
        int n = l->children[i] ? ep_size_tree(l->children[i]) : 0;
        if (n) return n;
    }
    return 0;
}

/* expert_parallel_size(layer) -> the number of ranks the first MoE layer of
 * the tree splits its experts over (1: off; 0: no MoE layer) */
static int l_expert_parallel_size(lua_State *L) {
    lua_pushinteger(L, ep_size_tree(moe_lua_check_layer(L, 1, "dist.expert_parallel_size", "layer")));
    return 1;
}

/* dist.comm() -> the main communicator as an object (initialising it) */
static int l_comm(lua_State *L) {
    get_comm(L);
    lua_getfield(L, LUA_REGISTRYINDEX, KEY_MAIN);
    return 1;
}

/* dist.host_comm() -> the communicator for CPU tensors: the one that
 * bootstrapped NCCL, else the main one */
static int l_host_comm(lua_State *L) {
    get_comm(L);
    lua_getfield(L, LUA_REGISTRYINDEX, KEY_HOST);
    if (lua_isnil(L, -1)) {
        lua_pop(L, 1);
        lua_getfield(L, LUA_REGISTRYINDEX, KEY_MAIN);
    }
    return 1;
}

/* comm:split(color[, key = rank]) / dist.split(color[, key]) -> a new Comm of
 * the ranks that pass the same color (>= 0), ranked by key then rank.
 * Collective: every rank of the communicator must call it. */
static int l_split(lua_State *L) {
    const char *f = "dist.split";
    int a;
    moe_comm *c = self_or_main(L, &a, f);
    lua_Integer color = moe_lua_check_int(L, a, f, "color");
    lua_Integer key = lua_isnoneornil(L, a + 1) ? c->rank : moe_lua_check_int(L, a + 1, f, "key");
    if (color < 0 || color > 0x7fffffff) moe_lua_errorf(L, "%s: color must be >= 0, got %lld", f, (long long)color);
    if (key < -0x7fffffff || key > 0x7fffffff) moe_lua_errorf(L, "%s: key %lld is out of range", f, (long long)key);
    comm_box *b = new_box(L);
    moe_lua_check(L, moe_comm_split(c, (int)color, (int)key, &b->c), f);
    return 1;
}

static int comm_tostring(lua_State *L) {
    comm_box *b = luaL_checkudata(L, 1, COMM_MT);
    if (!b->c) lua_pushstring(L, "Comm(freed)");
    else lua_pushfstring(L, "Comm(%s, rank %d of %d)", b->c->ops->name, b->c->rank, b->c->size);
    return 1;
}

static const luaL_Reg dist_fns[] = {
    {"init", l_init}, {"is_initialized", l_is_initialized}, {"info", l_info}, {"rank", l_rank},
    {"world_size", l_world_size}, {"local_rank", l_local_rank}, {"local_world_size", l_local_world_size},
    {"backend", l_backend}, {"launched_by_mpi", l_launched}, {"have_mpi", l_have_mpi}, {"have_nccl", l_have_nccl},
    {"barrier", l_barrier}, {"all_reduce", l_all_reduce}, {"broadcast", l_broadcast}, {"all_gather", l_all_gather},
    {"reduce_scatter", l_reduce_scatter}, {"all_to_all_v", l_all_to_all_v},
    {"set_expert_parallel", l_set_expert_parallel}, {"comm", l_comm}, {"host_comm", l_host_comm},
    {"split", l_split}, {"expert_parallel_size", l_expert_parallel_size},
    {"set_grad_allreduce", l_set_grad_allreduce}, {"arm_grad_allreduce", l_arm_grad_allreduce},
    {"finish_grad_allreduce", l_finish_grad_allreduce}, {"set_global_aux", l_set_global_aux},
    {"set_ep_gather", l_set_ep_gather}, {NULL, NULL},
};

static const luaL_Reg comm_methods[] = {
    {"info", l_info}, {"rank", l_rank}, {"world_size", l_world_size}, {"size", l_world_size},
    {"local_rank", l_local_rank}, {"local_world_size", l_local_world_size}, {"backend", l_backend},
    {"barrier", l_barrier}, {"all_reduce", l_all_reduce}, {"broadcast", l_broadcast}, {"all_gather", l_all_gather},
    {"reduce_scatter", l_reduce_scatter}, {"all_to_all_v", l_all_to_all_v}, {"split", l_split}, {NULL, NULL},
};

static void push_comm_methods(lua_State *L) {
    lua_newtable(L);
    for (const luaL_Reg *r = comm_methods; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
}

void moe_lua_open_dist(lua_State *L) {
    lua_newtable(L);
    for (const luaL_Reg *r = dist_fns; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
    lua_setfield(L, -2, "dist");
}
