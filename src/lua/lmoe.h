/* Shared helpers of the Lua binding (moelab.core). Every binding function
 * checks its arguments and raises a Lua error naming the bad one; C failures
 * become Lua errors carrying the engine's message. Nothing here crashes on
 * user input. */
#ifndef MOE_LUA_H
#define MOE_LUA_H

#include <lauxlib.h>
#include <lua.h>

#include "../core/context.h"
#include "../core/tensor.h"
#include "../ops/ops.h"

#define MOE_TENSOR_MT "moelab.Tensor"

/* The context of this Lua state (created by luaopen_moelab_core). */
moe_ctx *moe_lua_ctx(lua_State *L);

/* Tensor userdata: a box holding one reference. */
moe_tensor *moe_lua_check_tensor(lua_State *L, int idx, const char *argname);
moe_tensor *moe_lua_opt_tensor(lua_State *L, int idx, const char *argname); /* nil -> NULL */
int moe_lua_is_tensor(lua_State *L, int idx);
/* Pushes t as userdata, taking over the caller's reference. t == NULL raises
 * the current engine error with `what` as context. */
void moe_lua_push_tensor(lua_State *L, moe_tensor *t, const char *what);
/* Pushes a tensor the engine keeps (a parameter, a saved loss) with a new
 * reference; NULL pushes nil. */
void moe_lua_push_borrowed(lua_State *L, moe_tensor *t, const char *what);

/* Raise a Lua error: "<fname>: <engine message>". Never returns. */
int moe_lua_fail(lua_State *L, const char *fname);
/* luaL_error with full printf formatting (%lld, %zu, %x...), which
 * luaL_error/lua_pushfstring do not support. Never returns. */
int moe_lua_errorf(lua_State *L, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
/* If s != MOE_OK raise like moe_lua_fail. */
void moe_lua_check(lua_State *L, moe_status s, const char *fname);

/* Argument helpers that name the argument in their errors. */
lua_Integer moe_lua_check_int(lua_State *L, int idx, const char *fname, const char *argname);
lua_Number moe_lua_check_num(lua_State *L, int idx, const char *fname, const char *argname);
/* Reads a shape from a table {d1, d2, ...} or from integers at idx..top. */
int moe_lua_check_shape(lua_State *L, int idx, const char *fname, int64_t *shape);
/* Options table helpers: field of table at idx, or the default when absent. */
lua_Integer moe_lua_opt_field_int(lua_State *L, int idx, const char *key, lua_Integer def, const char *fname);
lua_Number moe_lua_opt_field_num(lua_State *L, int idx, const char *key, lua_Number def, const char *fname);
const char *moe_lua_opt_field_str(lua_State *L, int idx, const char *key, const char *def, const char *fname);
int moe_lua_opt_field_bool(lua_State *L, int idx, const char *key, int def, const char *fname);
/* Parse a dtype / device name; raises with the list of valid names. */
moe_dtype moe_lua_check_dtype(lua_State *L, const char *name, const char *fname);
moe_device moe_lua_check_device(lua_State *L, const char *name, const char *fname);

/* Added with the tensor binding (src/lua/tensor.c). */
/* Like moe_lua_check_tensor, but the error reads "<fname>: <argname> must be a
 * tensor, got nil" / "<fname>: tensor was freed (argument <argname>)". */
moe_tensor *moe_lua_check_tensor_f(lua_State *L, int idx, const char *fname, const char *argname);
/* the same for code that reads only the header or the storage's identity:
 * parked memory (tensor.h) stays parked */
moe_tensor *moe_lua_check_tensor_meta(lua_State *L, int idx, const char *fname, const char *argname);
moe_tensor *moe_lua_opt_tensor_f(lua_State *L, int idx, const char *fname, const char *argname);
/* Pushes a new uninitialised (or zero-filled) tensor box and returns the tensor;
 * the box is on the stack before the allocation, so nothing leaks on error. */
moe_tensor *moe_lua_new_tensor(lua_State *L, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev,
                               const char *fname);
moe_tensor *moe_lua_new_zeros(lua_State *L, moe_dtype dt, int ndim, const int64_t *shape, moe_device dev,
                              const char *fname);
/* A 1-based (or negative, -1 = last) dim argument, returned 0-based. */
int moe_lua_dim_arg(lua_State *L, int idx, int ndim, const char *fname);
/* The next seed of this Lua state's default sequence (moe.manual_seed resets it). */
uint64_t moe_lua_next_seed(lua_State *L);
/* tensor_math.c: adds math methods to the methods table, metamethods to the
 * metatable and module functions (matmul) to the module table. */
void moe_lua_tensor_math_register(lua_State *L, int methods, int mt, int mod);

/* Layers and tapes (src/lua/nn.c), shared with the MoE binding. */
struct moe_layer;
struct moe_tape;
void moe_lua_push_layer(lua_State *L, struct moe_layer *l, const char *what);   /* takes the reference; NULL raises */
struct moe_layer *moe_lua_check_layer(lua_State *L, int idx, const char *fname, const char *arg);
struct moe_tape *moe_lua_check_tape(lua_State *L, int idx, const char *fname);
/* opts.seed, or the next seed of this Lua state's layer-seed sequence */
uint64_t moe_lua_layer_seed(lua_State *L, int opts, const char *fname);
void moe_lua_open_moe(lua_State *L);
void moe_lua_open_train(lua_State *L);

/* Registration of the parts of moelab.core; each adds functions to the table on top. */
void moe_lua_open_tensor(lua_State *L);
void moe_lua_open_ops(lua_State *L);
void moe_lua_open_nn(lua_State *L);
void moe_lua_open_data(lua_State *L);   /* data.c: datasets, the corpus, the byte tokenizer */
void moe_lua_open_io(lua_State *L);     /* io.c: safetensors, atomic files, JSON (json.c) */
void moe_lua_open_tokenizer(lua_State *L);   /* tokenizer.c: tokenizer.json tokenizers */
void moe_lua_open_cuda_graph(lua_State *L);   /* cuda_graph.c: core.cuda_graph_begin (the table on top) */
void moe_lua_open_dist(lua_State *L);        /* dist.c: communicators and collectives (moe.dist) */

#endif
