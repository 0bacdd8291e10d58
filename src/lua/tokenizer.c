/* core.tokenizer_from_file(path): tokenizer.json tokenizers (src/train/tokenizer.h)
 * as userdata with encode / encode_tensor / decode / vocab_size /
 * token_to_id / id_to_token. Ids are 0-based, as in the file. */
#include "io_internal.h"
#include "lmoe.h"

#include <stdlib.h>
#include <string.h>

#include "../train/tokenizer.h"

#define TOKENIZER_MT "moelab.Tokenizer"

typedef struct {
    moe_tokenizer *tk;
    moe_token_ids ids;   /* encode's output buffer, reused */
} tbox;

static tbox *check_box(lua_State *L, const char *fname) {
    tbox *b = luaL_testudata(L, 1, TOKENIZER_MT);
    if (!b) moe_lua_errorf(L, "%s: expected a tokenizer as self (use tok:%s(...)), got %s", fname,
                           strchr(fname, '.') ? strchr(fname, '.') + 1 : fname, luaL_typename(L, 1));
    if (!b->tk) moe_lua_errorf(L, "%s: tokenizer was freed", fname);
    return b;
}

static int m_gc(lua_State *L) {
    tbox *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    moe_tokenizer_free(b->tk);
    moe_token_ids_free(&b->ids);
    b->tk = NULL;
    return 0;
}

static const char *check_text(lua_State *L, int idx, const char *fname, size_t *n) {
    if (lua_type(L, idx) != LUA_TSTRING)
        moe_lua_errorf(L, "%s: text must be a string, got %s", fname, luaL_typename(L, idx));
    return lua_tolstring(L, idx, n);
}

static void encode_into(lua_State *L, tbox *b, const char *fname) {
    size_t n;
    const char *s = check_text(L, 2, fname, &n);
    b->ids.n = 0;
    moe_lua_check(L, moe_tokenizer_encode(b->tk, s, n, &b->ids), fname);
}

static void trim_buffer(tbox *b) {
    if (b->ids.cap > (1u << 22)) moe_token_ids_free(&b->ids);
}

/* tok:encode(text) -> {id, ...} */
static int m_encode(lua_State *L) {
    const char *f = "tokenizer.encode";
    tbox *b = check_box(L, f);
    encode_into(L, b, f);
    lua_createtable(L, (int)b->ids.n, 0);
    for (size_t i = 0; i < b->ids.n; i++) {
        lua_pushinteger(L, b->ids.ids[i]);
        lua_rawseti(L, -2, (int)i + 1);
    }
    trim_buffer(b);
    return 1;
}

/* tok:encode_tensor(text) -> i64 tensor [n] */
static int m_encode_tensor(lua_State *L) {
    const char *f = "tokenizer.encode_tensor";
    tbox *b = check_box(L, f);
    encode_into(L, b, f);
    int64_t shape[1] = {(int64_t)b->ids.n};
    int64_t *out = moe_tensor_data(moe_lua_new_tensor(L, MOE_I64, 1, shape, MOE_DEVICE_CPU, f));
    for (size_t i = 0; i < b->ids.n; i++) out[i] = b->ids.ids[i];
    trim_buffer(b);
    return 1;
}

/* tok:decode(ids, {skip_special_tokens = false}) -> string */
static int m_decode(lua_State *L) {
    const char *f = "tokenizer.decode";
    tbox *b = check_box(L, f);
    int skip = 0;
    if (!lua_isnoneornil(L, 3)) {
        if (!lua_istable(L, 3)) moe_lua_errorf(L, "%s: options must be a table, got %s", f, luaL_typename(L, 3));
        lua_pushnil(L);
        while (lua_next(L, 3)) {
            lua_pop(L, 1);
            if (lua_type(L, -1) != LUA_TSTRING || strcmp(lua_tostring(L, -1), "skip_special_tokens"))
                moe_lua_errorf(L, "%s: unknown option '%s' (expected skip_special_tokens)", f,
                               lua_type(L, -1) == LUA_TSTRING ? lua_tostring(L, -1) : luaL_typename(L, -1));
        }
        skip = moe_lua_opt_field_bool(L, 3, "skip_special_tokens", 0, f);
    }
    int64_t *ids;
    size_t n;
    if (moe_lua_is_tensor(L, 2)) {
        moe_tensor *t = moe_lua_check_tensor_f(L, 2, f, "ids");
        if (t->device.type != MOE_CPU) moe_lua_errorf(L, "%s: ids must be a CPU tensor (use ids:to(\"cpu\"))", f);
        if (t->ndim > 1) moe_lua_errorf(L, "%s: ids must be a 1-D tensor, got %d dims", f, t->ndim);
        n = (size_t)moe_tensor_numel(t);
        ids = lua_newuserdata(L, (n ? n : 1) * sizeof *ids);   /* collected, also on error */
        moe_tensor *c = moe_tensor_contiguous_cpu(t);
        if (!c) moe_lua_fail(L, f);
        const char *base = moe_tensor_data(c);
        size_t es = moe_dtype_size(c->dtype);
        size_t bad = 0;
        double badv = 0;
        for (size_t i = 0; i < n; i++) {
            double v = moe_dtype_load(c->dtype, base + i * es);
            if (!(v >= -9e18 && v <= 9e18 && v == (double)(int64_t)v)) { bad = i + 1; badv = v; break; }
            ids[i] = (int64_t)v;
        }
        moe_tensor_release(c);
        if (bad) moe_lua_errorf(L, "%s: ids element %zu is %g, not an integer", f, bad, badv);
    } else if (lua_istable(L, 2)) {
        n = lua_objlen(L, 2);
        ids = lua_newuserdata(L, (n ? n : 1) * sizeof *ids);
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, 2, (int)i + 1);
            if (lua_type(L, -1) != LUA_TNUMBER)
                moe_lua_errorf(L, "%s: ids[%zu] must be an integer, got %s", f, i + 1, luaL_typename(L, -1));
            lua_Number v = lua_tonumber(L, -1);
            lua_pop(L, 1);
            if (!(v >= -9e18 && v <= 9e18 && v == (lua_Number)(int64_t)v))
                moe_lua_errorf(L, "%s: ids[%zu] must be an integer, got %g", f, i + 1, (double)v);
            ids[i] = (int64_t)v;
        }
    } else {
        return moe_lua_errorf(L, "%s: ids must be a table of integers or a tensor, got %s", f, luaL_typename(L, 2));
    }
    char *out;
    size_t len;
    moe_lua_check(L, moe_tokenizer_decode(b->tk, ids, n, skip, &out, &len), f);
    int h = moe_lua_handle_push(L, out, free);
    lua_pushlstring(L, out, len);
    moe_lua_handle_free(L, h);
    return 1;
}

static int m_vocab_size(lua_State *L) {
    tbox *b = check_box(L, "tokenizer.vocab_size");
    lua_pushinteger(L, (lua_Integer)moe_tokenizer_vocab_size(b->tk));
    return 1;
}

/* tok:token_to_id(s) -> id, or nil when the string is no token */
static int m_token_to_id(lua_State *L) {
    const char *f = "tokenizer.token_to_id";
    tbox *b = check_box(L, f);
    size_t n;
    if (lua_type(L, 2) != LUA_TSTRING) moe_lua_errorf(L, "%s: token must be a string, got %s", f, luaL_typename(L, 2));
    const char *s = lua_tolstring(L, 2, &n);
    int64_t id = moe_tokenizer_token_to_id(b->tk, s, n);
    if (id < 0) lua_pushnil(L);
    else lua_pushinteger(L, (lua_Integer)id);
    return 1;
}

/* tok:id_to_token(id) -> string; an id out of range raises, an unassigned one gives nil */
static int m_id_to_token(lua_State *L) {
    const char *f = "tokenizer.id_to_token";
    tbox *b = check_box(L, f);
    lua_Integer id = moe_lua_check_int(L, 2, f, "id");
    int64_t v = moe_tokenizer_vocab_size(b->tk);
    if (id < 0 || id >= v) moe_lua_errorf(L, "%s: id %lld is out of range [0, %lld)", f, (long long)id, (long long)v);
    size_t n;
    const char *s = moe_tokenizer_id_to_token(b->tk, id, &n);
    if (!s) lua_pushnil(L);
    else lua_pushlstring(L, s, n);
    return 1;
}

static int m_is_special(lua_State *L) {
    const char *f = "tokenizer.is_special";
    tbox *b = check_box(L, f);
    lua_Integer id = moe_lua_check_int(L, 2, f, "id");
    lua_pushboolean(L, moe_tokenizer_is_special(b->tk, id));
    return 1;
}

static int m_tostring(lua_State *L) {
    tbox *b = luaL_checkudata(L, 1, TOKENIZER_MT);
    lua_pushstring(L, b->tk ? moe_tokenizer_describe(b->tk) : "Tokenizer(freed)");
    return 1;
}

/* core.tokenizer_from_file(path) */
static int l_from_file(lua_State *L) {
    const char *f = "tokenizer.from_file";
    if (lua_type(L, 1) != LUA_TSTRING) moe_lua_errorf(L, "%s: path must be a string, got %s", f, luaL_typename(L, 1));
    size_t n;
    const char *path = lua_tolstring(L, 1, &n);
    if (n == 0) moe_lua_errorf(L, "%s: path must not be empty", f);
    if (strlen(path) != n) moe_lua_errorf(L, "%s: path contains a NUL byte", f);
    tbox *b = lua_newuserdata(L, sizeof *b);
    memset(b, 0, sizeof *b);
    luaL_getmetatable(L, TOKENIZER_MT);
    lua_setmetatable(L, -2);
    b->tk = moe_tokenizer_from_file(path);
    if (!b->tk) moe_lua_fail(L, f);
    return 1;
}

static int l_is_tokenizer(lua_State *L) {
    lua_pushboolean(L, luaL_testudata(L, 1, TOKENIZER_MT) != NULL);
    return 1;
}

void moe_lua_open_tokenizer(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"encode", m_encode}, {"encode_tensor", m_encode_tensor}, {"decode", m_decode},
        {"vocab_size", m_vocab_size}, {"token_to_id", m_token_to_id}, {"id_to_token", m_id_to_token},
        {"is_special", m_is_special}, {NULL, NULL}};
    luaL_newmetatable(L, TOKENIZER_MT);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, m_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, m_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);
    lua_pushcfunction(L, l_from_file);
    lua_setfield(L, -2, "tokenizer_from_file");
    lua_pushcfunction(L, l_is_tokenizer);
    lua_setfield(L, -2, "is_tokenizer");
}
