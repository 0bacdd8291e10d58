/* The data binding: moe.core.data, token datasets (src/train/dataset.h),
 * the built-in corpus and the byte-level tokenizer. Token positions and
 * window numbers are 0-based, ranges end-exclusive, as the ids they index
 * are data (see the tensor binding's note on ids). Batches are i64 CPU
 * tensors; the trainer moves them to its device. */
#include "lmoe.h"

#include "../train/dataset.h"

#include <stdio.h>
#include <string.h>

#define DATASET_MT "moelab.Dataset"

typedef struct { moe_dataset *ds; } dbox;

/* ------------------------------------------------------------- helpers -- */

/* The box is on the stack before the dataset exists, so nothing leaks when
 * an error is raised in between. */
static dbox *new_box(lua_State *L) {
    dbox *b = lua_newuserdata(L, sizeof *b);
    b->ds = NULL;
    luaL_getmetatable(L, DATASET_MT);
    lua_setmetatable(L, -2);
    return b;
}

static moe_dataset *check_ds(lua_State *L, const char *fname) {
    dbox *b = lua_type(L, 1) == LUA_TUSERDATA ? luaL_testudata(L, 1, DATASET_MT) : NULL;
    if (!b) moe_lua_errorf(L, "%s: self must be a dataset, got %s (call it with ':')", fname, luaL_typename(L, 1));
    if (!b->ds) moe_lua_errorf(L, "%s: the dataset was freed", fname);
    return b->ds;
}

/* A typo in an option name would otherwise be ignored silently. */
static void check_keys(lua_State *L, int idx, const char *fname, const char *const *allowed) {
    if (lua_isnoneornil(L, idx)) return;
    if (!lua_istable(L, idx)) moe_lua_errorf(L, "%s: options must be a table, got %s", fname, luaL_typename(L, idx));
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        int ok = 0;
        if (lua_type(L, -1) == LUA_TSTRING)
            for (const char *const *a = allowed; *a && !ok; a++) ok = !strcmp(*a, lua_tostring(L, -1));
        if (!ok) {
            char list[256] = "";
            for (const char *const *a = allowed; *a; a++)
                snprintf(list + strlen(list), sizeof list - strlen(list), "%s%s", a == allowed ? "" : ", ", *a);
            if (lua_type(L, -1) == LUA_TSTRING)
                moe_lua_errorf(L, "%s: unknown option '%s' (expected %s)", fname, lua_tostring(L, -1), list);
            moe_lua_errorf(L, "%s: options must be named (expected %s), got a %s key", fname, list,
                           luaL_typename(L, -1));
        }
    }
}

static int has_field(lua_State *L, int idx, const char *key) {
    if (!lua_istable(L, idx)) return 0;
    lua_getfield(L, idx, key);
    int has = !lua_isnil(L, -1);
    lua_pop(L, 1);
    return has;
}

static lua_Integer req_field_int(lua_State *L, int idx, const char *key, const char *fname) {
    if (!has_field(L, idx, key)) moe_lua_errorf(L, "%s: option '%s' is required", fname, key);
    return moe_lua_opt_field_int(L, idx, key, 0, fname);
}

/* Seeds, steps and epochs: non-negative integers a double holds exactly. */
static uint64_t opt_field_u64(lua_State *L, int idx, const char *key, uint64_t def, const char *fname) {
    lua_Integer v = moe_lua_opt_field_int(L, idx, key, (lua_Integer)def, fname);
    if (v < 0 || v > ((lua_Integer)1 << 53))
        moe_lua_errorf(L, "%s: option '%s' must be a non-negative integer (at most 2^53), got %lld", fname, key,
                       (long long)v);
    return (uint64_t)v;
}

static int64_t check_count(lua_State *L, int idx, const char *fname, const char *argname, int64_t lo) {
    lua_Integer v = moe_lua_check_int(L, idx, fname, argname);
    if (v < lo) moe_lua_errorf(L, "%s: %s must be >= %lld, got %lld", fname, argname, (long long)lo, (long long)v);
    return (int64_t)v;
}

/* Three [rows, seq_len] i64 tensors pushed in order ids, targets, domains. */
static void push_batch_tensors(lua_State *L, int64_t rows, int64_t seq_len, const char *fname, int64_t **p) {
    int64_t shape[2] = {rows, seq_len};
    for (int i = 0; i < 3; i++) p[i] = moe_tensor_data(moe_lua_new_tensor(L, MOE_I64, 2, shape, MOE_DEVICE_CPU, fname));
}

/* ------------------------------------------------------ byte tokenizer -- */

static void push_encoded(lua_State *L, const char *s, size_t n, const char *fname) {
    int64_t shape[1] = {(int64_t)n};
    int64_t *out = moe_tensor_data(moe_lua_new_tensor(L, MOE_I64, 1, shape, MOE_DEVICE_CPU, fname));
    for (size_t i = 0; i < n; i++) out[i] = (unsigned char)s[i];
}

/* Ids from a tensor (any dtype and shape, row-major) or an array table,
 * each an integer in 0..255, into a string. */
static int decode_at(lua_State *L, int idx, const char *fname) {
    if (moe_lua_is_tensor(L, idx)) {
        moe_tensor *t = moe_lua_check_tensor_f(L, idx, fname, "ids");
        if (t->device.type != MOE_CPU) moe_lua_errorf(L, "%s: ids must be a CPU tensor (use ids:to(\"cpu\"))", fname);
        int64_t n = moe_tensor_numel(t);
        char *buf = lua_newuserdata(L, n ? (size_t)n : 1);   /* freed by the GC, also on error */
        moe_tensor *c = moe_tensor_contiguous_cpu(t);
        if (!c) moe_lua_fail(L, fname);
        const char *base = moe_tensor_data(c);
        size_t es = moe_dtype_size(c->dtype);
        int64_t bad = -1;
        double badv = 0;
        for (int64_t i = 0; i < n && bad < 0; i++) {
            double v = moe_dtype_load(c->dtype, base + (size_t)i * es);
            if (!(v >= 0 && v <= 255 && v == (double)(int)v)) bad = i, badv = v;
            else buf[i] = (char)(unsigned char)v;
        }
        moe_tensor_release(c);
        if (bad >= 0)
            moe_lua_errorf(L, "%s: ids element %lld is %g; byte-level ids are integers 0..255", fname,
                           (long long)bad + 1, badv);
        lua_pushlstring(L, buf, (size_t)n);
        return 1;
    }
    if (!lua_istable(L, idx))
        moe_lua_errorf(L, "%s: ids must be a tensor or a table of integers, got %s", fname, luaL_typename(L, idx));
    size_t n = lua_objlen(L, idx);
    char *buf = lua_newuserdata(L, n ? n : 1);
    for (size_t i = 1; i <= n; i++) {
        lua_rawgeti(L, idx, (int)i);
        if (lua_type(L, -1) != LUA_TNUMBER)
            moe_lua_errorf(L, "%s: ids[%zu] must be an integer, got %s", fname, i, luaL_typename(L, -1));
        lua_Number v = lua_tonumber(L, -1);
        lua_pop(L, 1);
        if (!(v >= 0 && v <= 255 && v == (lua_Number)(int)v))
            moe_lua_errorf(L, "%s: ids[%zu] is %g; byte-level ids are integers 0..255", fname, i, (double)v);
        buf[i - 1] = (char)(unsigned char)v;
    }
    lua_pushlstring(L, buf, n);
    return 1;
}

static int l_encode(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        moe_lua_errorf(L, "data.encode: text must be a string, got %s", luaL_typename(L, 1));
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    push_encoded(L, s, n, "data.encode");
    return 1;
}

static int l_decode(lua_State *L) { return decode_at(L, 1, "data.decode"); }

/* -------------------------------------------------------- constructors -- */

static int l_corpus(lua_State *L) {
    const char *f = "data.corpus";
    static const char *const keys[] = {"seed", "num_bytes", "num_documents", NULL};
    if (!lua_istable(L, 1))
        moe_lua_errorf(L, "%s: expected a table {seed=, num_bytes= or num_documents=}, got %s", f, luaL_typename(L, 1));
    check_keys(L, 1, f, keys);
    uint64_t seed = opt_field_u64(L, 1, "seed", 0, f);
    int hb = has_field(L, 1, "num_bytes"), hd = has_field(L, 1, "num_documents");
    if (hb == hd) moe_lua_errorf(L, "%s: give exactly one of num_bytes and num_documents", f);
    const char *key = hb ? "num_bytes" : "num_documents";
    lua_Integer n = moe_lua_opt_field_int(L, 1, key, 0, f);
    if (n < 1) moe_lua_errorf(L, "%s: option '%s' must be >= 1, got %lld", f, key, (long long)n);
    dbox *b = new_box(L);
    b->ds = moe_dataset_from_corpus(seed, hd ? n : 0, hb ? n : 0);
    if (!b->ds) moe_lua_fail(L, f);
    return 1;
}

static int l_from_text(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        moe_lua_errorf(L, "data.from_text: text must be a string, got %s", luaL_typename(L, 1));
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    dbox *b = new_box(L);
    b->ds = moe_dataset_from_bytes(s, (int64_t)n);
    if (!b->ds) moe_lua_fail(L, "data.from_text");
    return 1;
}

static int l_from_file(lua_State *L) {
    if (lua_type(L, 1) != LUA_TSTRING)
        moe_lua_errorf(L, "data.from_file: path must be a string, got %s", luaL_typename(L, 1));
    dbox *b = new_box(L);
    b->ds = moe_dataset_from_text_file(lua_tostring(L, 1));
    if (!b->ds) moe_lua_fail(L, "data.from_file");
    return 1;
}

static int l_from_tokens(lua_State *L) {
    const char *f = "data.from_tokens";
    static const char *const keys[] = {"dtype", "vocab_size", NULL};
    if (lua_type(L, 1) != LUA_TSTRING) moe_lua_errorf(L, "%s: path must be a string, got %s", f, luaL_typename(L, 1));
    if (!lua_istable(L, 2))
        moe_lua_errorf(L, "%s: options must be a table {dtype = \"u16\" or \"u32\", vocab_size =}, got %s", f,
                       luaL_typename(L, 2));
    check_keys(L, 2, f, keys);
    if (!has_field(L, 2, "dtype")) moe_lua_errorf(L, "%s: option 'dtype' is required (\"u16\" or \"u32\")", f);
    const char *dt = moe_lua_opt_field_str(L, 2, "dtype", NULL, f);
    int width = !strcmp(dt, "u16") || !strcmp(dt, "uint16") ? 2 : !strcmp(dt, "u32") || !strcmp(dt, "uint32") ? 4 : 0;
    if (!width) moe_lua_errorf(L, "%s: option 'dtype' must be \"u16\" or \"u32\", got \"%s\"", f, dt);
    lua_Integer vocab = moe_lua_opt_field_int(L, 2, "vocab_size", 0, f);
    if (has_field(L, 2, "vocab_size") && vocab < 1)
        moe_lua_errorf(L, "%s: option 'vocab_size' must be >= 1, got %lld", f, (long long)vocab);
    dbox *b = new_box(L);
    b->ds = moe_dataset_from_token_file(lua_tostring(L, 1), width, vocab);
    if (!b->ds) moe_lua_fail(L, f);
    return 1;
}

/* ------------------------------------------------------------- methods -- */

static int m_num_tokens(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_dataset_num_tokens(check_ds(L, "dataset:num_tokens")));
    return 1;
}

static int m_vocab_size(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_dataset_vocab_size(check_ds(L, "dataset:vocab_size")));
    return 1;
}

static int m_num_documents(lua_State *L) {
    lua_pushnumber(L, (lua_Number)moe_dataset_num_documents(check_ds(L, "dataset:num_documents")));
    return 1;
}

static int m_is_byte_level(lua_State *L) {
    lua_pushboolean(L, moe_dataset_is_byte_level(check_ds(L, "dataset:is_byte_level")));
    return 1;
}

/* Domain names in id order: domains()[id + 1] names domain id `id`. */
static int m_domains(lua_State *L) {
    moe_dataset *ds = check_ds(L, "dataset:domains");
    int n = moe_dataset_num_domains(ds);
    lua_createtable(L, n, 0);
    for (int i = 0; i < n; i++) {
        lua_pushstring(L, moe_dataset_domain_name(ds, i));
        lua_rawseti(L, -2, i + 1);
    }
    return 1;
}

static int m_split(lua_State *L) {
    const char *f = "dataset:split";
    moe_dataset *ds = check_ds(L, f);
    lua_Number fr = moe_lua_check_num(L, 2, f, "fraction");
    if (!(fr > 0 && fr < 1)) moe_lua_errorf(L, "%s: fraction must be between 0 and 1 (exclusive), got %g", f, (double)fr);
    dbox *a = new_box(L), *b = new_box(L);
    moe_lua_check(L, moe_dataset_split(ds, (double)fr, &a->ds, &b->ds), f);
    return 2;
}

static int m_batch(lua_State *L) {
    const char *f = "dataset:batch";
    static const char *const keys[] = {"batch_size", "seq_len", "seed", "step", "epoch", NULL};
    moe_dataset *ds = check_ds(L, f);
    if (!lua_istable(L, 2))
        moe_lua_errorf(L, "%s: expected a table {batch_size=, seq_len=, seed=, step=, epoch=}, got %s", f,
                       luaL_typename(L, 2));
    check_keys(L, 2, f, keys);
    lua_Integer bs = req_field_int(L, 2, "batch_size", f), sl = req_field_int(L, 2, "seq_len", f);
    if (bs < 1 || bs > ((lua_Integer)1 << 24))
        moe_lua_errorf(L, "%s: option 'batch_size' must be in 1..2^24, got %lld", f, (long long)bs);
    if (sl < 1) moe_lua_errorf(L, "%s: option 'seq_len' must be >= 1, got %lld", f, (long long)sl);
    uint64_t seed = opt_field_u64(L, 2, "seed", 0, f), step = opt_field_u64(L, 2, "step", 0, f);
    uint64_t epoch = opt_field_u64(L, 2, "epoch", 0, f);
    int64_t n = moe_dataset_num_tokens(ds);
    if (n < sl + 1)   /* checked before allocating [batch_size, seq_len] outputs */
        moe_lua_errorf(L, "%s: the dataset has %lld tokens; seq_len %lld needs at least %lld", f, (long long)n,
                       (long long)sl, (long long)sl + 1);
    int64_t *p[3];
    push_batch_tensors(L, bs, sl, f, p);
    moe_lua_check(L, moe_dataset_batch(ds, seed, epoch, step, bs, sl, p[0], p[1], p[2]), f);
    return 3;
}

static int m_num_windows(lua_State *L) {
    const char *f = "dataset:num_windows";
    moe_dataset *ds = check_ds(L, f);
    int64_t sl = check_count(L, 2, f, "seq_len", 1);
    lua_pushnumber(L, (lua_Number)moe_dataset_num_windows(ds, sl));
    return 1;
}

/* window_batch(seq_len, first, count[, {seed=, epoch=}]): `first` is 0-based;
 * the last batch of an epoch is shorter when count runs past the end. With a
 * seed the windows come in that epoch's shuffled order. */
static int m_window_batch(lua_State *L) {
    const char *f = "dataset:window_batch";
    static const char *const keys[] = {"seed", "epoch", NULL};
    moe_dataset *ds = check_ds(L, f);
    int64_t sl = check_count(L, 2, f, "seq_len", 1);
    int64_t first = check_count(L, 3, f, "first", 0);
    int64_t count = check_count(L, 4, f, "count", 1);
    check_keys(L, 5, f, keys);
    int shuffle = has_field(L, 5, "seed");
    uint64_t seed = opt_field_u64(L, 5, "seed", 0, f), epoch = opt_field_u64(L, 5, "epoch", 0, f);
    int64_t nw = moe_dataset_num_windows(ds, sl);
    if (first >= nw)
        moe_lua_errorf(L, "%s: first is %lld but there are %lld windows of seq_len %lld (0-based: 0..%lld)", f,
                       (long long)first, (long long)nw, (long long)sl, (long long)nw - 1);
    if (count > nw - first) count = nw - first;
    int64_t *p[3];
    push_batch_tensors(L, count, sl, f, p);
    moe_lua_check(L, moe_dataset_window_batch(ds, sl, first, count, shuffle, seed, epoch, p[0], p[1], p[2]), f);
    return 3;
}

static void need_bytes(lua_State *L, moe_dataset *ds, const char *fname) {
    if (!moe_dataset_is_byte_level(ds))
        moe_lua_errorf(L, "%s: the dataset holds pre-tokenized ids (vocab %lld), not bytes; it has no byte tokenizer",
                       fname, (long long)moe_dataset_vocab_size(ds));
}

static int m_encode(lua_State *L) {
    const char *f = "dataset:encode";
    need_bytes(L, check_ds(L, f), f);
    if (lua_type(L, 2) != LUA_TSTRING) moe_lua_errorf(L, "%s: text must be a string, got %s", f, luaL_typename(L, 2));
    size_t n;
    const char *s = lua_tolstring(L, 2, &n);
    push_encoded(L, s, n, f);
    return 1;
}

static int m_decode(lua_State *L) {
    const char *f = "dataset:decode";
    need_bytes(L, check_ds(L, f), f);
    return decode_at(L, 2, f);
}

/* Reads the 0-based, end-exclusive range [i, j) (j defaults to the end). */
static void range_args(lua_State *L, moe_dataset *ds, const char *f, int64_t *i, int64_t *j) {
    int64_t n = moe_dataset_num_tokens(ds);
    *i = (int64_t)moe_lua_check_int(L, 2, f, "i");
    *j = lua_isnoneornil(L, 3) ? n : (int64_t)moe_lua_check_int(L, 3, f, "j");
    if (*i < 0 || *i > n) moe_lua_errorf(L, "%s: i must be in 0..%lld (0-based), got %lld", f, (long long)n, (long long)*i);
    if (*j < *i || *j > n)
        moe_lua_errorf(L, "%s: j must be in %lld..%lld (end-exclusive), got %lld", f, (long long)*i, (long long)n,
                       (long long)*j);
}

static int m_text(lua_State *L) {
    const char *f = "dataset:text";
    moe_dataset *ds = check_ds(L, f);
    need_bytes(L, ds, f);
    int64_t i, j;
    range_args(L, ds, f, &i, &j);
    char *buf = lua_newuserdata(L, (size_t)(j - i) + 1);
    moe_lua_check(L, moe_dataset_bytes(ds, i, j, buf), f);
    lua_pushlstring(L, buf, (size_t)(j - i));
    return 1;
}

static int m_tokens(lua_State *L) {
    const char *f = "dataset:tokens";
    moe_dataset *ds = check_ds(L, f);
    int64_t i, j;
    range_args(L, ds, f, &i, &j);
    int64_t shape[1] = {j - i};
    int64_t *out = moe_tensor_data(moe_lua_new_tensor(L, MOE_I64, 1, shape, MOE_DEVICE_CPU, f));
    moe_lua_check(L, moe_dataset_tokens(ds, i, j, out), f);
    return 1;
}

/* domain_at(pos) -> domain name or nil, for the 0-based token position pos. */
static int m_domain_at(lua_State *L) {
    const char *f = "dataset:domain_at";
    moe_dataset *ds = check_ds(L, f);
    int64_t n = moe_dataset_num_tokens(ds);
    lua_Integer pos = moe_lua_check_int(L, 2, f, "pos");
    if (pos < 0 || pos >= n) moe_lua_errorf(L, "%s: pos must be in 0..%lld (0-based), got %lld", f, (long long)n - 1, (long long)pos);
    const char *name = moe_dataset_domain_name(ds, moe_dataset_domain_at(ds, pos));
    if (name) lua_pushstring(L, name);
    else lua_pushnil(L);
    return 1;
}

static int m_tostring(lua_State *L) {
    dbox *b = luaL_checkudata(L, 1, DATASET_MT);
    if (!b->ds) { lua_pushstring(L, "Dataset(freed)"); return 1; }
    char buf[160];
    int nd = moe_dataset_num_domains(b->ds);
    int k = snprintf(buf, sizeof buf, "Dataset(%lld tokens, vocab %lld", (long long)moe_dataset_num_tokens(b->ds),
                     (long long)moe_dataset_vocab_size(b->ds));
    if (nd > 0) snprintf(buf + k, sizeof buf - (size_t)k, ", %d domains)", nd);
    else snprintf(buf + k, sizeof buf - (size_t)k, ")");
    lua_pushstring(L, buf);
    return 1;
}

static int m_gc(lua_State *L) {
    dbox *b = luaL_checkudata(L, 1, DATASET_MT);
    moe_dataset_free(b->ds);
    b->ds = NULL;
    return 0;
}

/* ------------------------------------------------------------ register -- */

void moe_lua_open_data(lua_State *L) {
    static const luaL_Reg methods[] = {
        {"num_tokens", m_num_tokens}, {"vocab_size", m_vocab_size}, {"num_documents", m_num_documents},
        {"is_byte_level", m_is_byte_level}, {"domains", m_domains}, {"split", m_split}, {"batch", m_batch},
        {"num_windows", m_num_windows}, {"window_batch", m_window_batch}, {"encode", m_encode},
        {"decode", m_decode}, {"text", m_text}, {"tokens", m_tokens}, {"domain_at", m_domain_at}, {NULL, NULL}};
    luaL_newmetatable(L, DATASET_MT);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, m_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, m_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pop(L, 1);

    static const luaL_Reg fns[] = {
        {"corpus", l_corpus}, {"from_text", l_from_text}, {"from_file", l_from_file},
        {"from_tokens", l_from_tokens}, {"encode", l_encode}, {"decode", l_decode}, {NULL, NULL}};
    lua_newtable(L);
    luaL_register(L, NULL, fns);
    lua_setfield(L, -2, "data");
}
