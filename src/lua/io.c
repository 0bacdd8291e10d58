/* The io table of moelab.core: safetensors load/save/info, atomic file
 * writes, whole-file reads, mkdir -p (and JSON, in json.c). Every C resource
 * sits in a collectable handle while Lua code may raise, so a bad argument
 * halfway through never leaks a mapping or a buffer. */
#include "io_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../io/fileio.h"
#include "../io/safetensors.h"

#define HANDLE_MT "moelab.io.handle"

typedef struct {
    void *p;
    void (*fr)(void *);
} handle;

static int handle_gc(lua_State *L) {
    handle *h = luaL_checkudata(L, 1, HANDLE_MT);
    if (h->p && h->fr) h->fr(h->p);
    h->p = NULL;
    return 0;
}

int moe_lua_handle_push(lua_State *L, void *p, void (*fr)(void *)) {
    handle *h = lua_newuserdata(L, sizeof *h);
    h->p = NULL;
    h->fr = fr;
    if (luaL_newmetatable(L, HANDLE_MT)) {
        lua_pushcfunction(L, handle_gc);
        lua_setfield(L, -2, "__gc");
    }
    lua_setmetatable(L, -2);
    h->p = p;   /* only now: the box owns p once nothing above can raise */
    return lua_gettop(L);
}

void moe_lua_handle_free(lua_State *L, int idx) {
    handle *h = lua_touserdata(L, idx);
    if (h->p && h->fr) h->fr(h->p);
    h->p = NULL;
}

static const char *check_path(lua_State *L, int idx, const char *fname) {
    if (lua_type(L, idx) != LUA_TSTRING)
        luaL_error(L, "%s: path must be a string, got %s", fname, luaL_typename(L, idx));
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (n == 0) luaL_error(L, "%s: path must not be empty", fname);
    if (strlen(s) != n) luaL_error(L, "%s: path contains a NUL byte", fname);
    return s;
}

/* ------------------------------------------------------------ opening -- */

/* A checkpoint: one file, or a sharded one through its index (*.json). */
typedef struct {
    moe_st_file *file;
    moe_st_index *index;
    int slot;
} source;

static void close_file(void *p) { moe_st_close(p); }
static void close_index(void *p) { moe_st_index_close(p); }
static void free_cjson(void *p) { cJSON_Delete(p); }

static int ends_with(const char *s, const char *suffix) {
    size_t n = strlen(s), m = strlen(suffix);
    return n >= m && !strcmp(s + n - m, suffix);
}

static source open_source(lua_State *L, const char *path, const char *fname) {
    source src = {0};
    if (ends_with(path, ".json")) {
        moe_st_index *ix = moe_st_index_open(path);
        if (!ix) moe_lua_fail(L, fname);
        src.index = ix;
        src.slot = moe_lua_handle_push(L, ix, close_index);
    } else {
        moe_st_file *f = moe_st_open(path);
        if (!f) moe_lua_fail(L, fname);
        src.file = f;
        src.slot = moe_lua_handle_push(L, f, close_file);
    }
    return src;
}

static size_t source_count(const source *s) {
    return s->file ? moe_st_count(s->file) : moe_st_index_count(s->index);
}

static const moe_st_entry *source_at(const source *s, size_t i, moe_st_file **f) {
    if (s->file) { *f = s->file; return moe_st_entry_at(s->file, i); }
    return moe_st_index_entry(s->index, i, f);
}

static const moe_st_entry *source_find(const source *s, const char *name, moe_st_file **f) {
    if (s->file) { *f = s->file; return moe_st_find(s->file, name); }
    return moe_st_index_find(s->index, name, f);
}

/* The metadata: the file's __metadata__ (string -> string), or the
 * index's "metadata" object as decoded JSON (total_size is a number there). */
static void push_metadata(lua_State *L, const source *s, const char *fname) {
    if (s->file) {
        size_t n = moe_st_metadata_count(s->file);
        lua_createtable(L, 0, (int)n);
        for (size_t i = 0; i < n; i++) {
            lua_pushstring(L, moe_st_metadata_value(s->file, i));
            lua_setfield(L, -2, moe_st_metadata_key(s->file, i));
        }
        return;
    }
    const char *text = moe_st_index_metadata_json(s->index);
    cJSON *root = cJSON_Parse(text);
    if (!root) luaL_error(L, "%s: out of memory", fname);
    int h = moe_lua_handle_push(L, root, free_cjson);
    moe_lua_json_push(L, root, fname);
    moe_lua_handle_free(L, h);
    lua_remove(L, h);
}

/* ---------------------------------------------------------------- load -- */

static void load_one(lua_State *L, moe_st_file *f, const moe_st_entry *e, int convert, moe_dtype dt,
                     const char *fname) {
    moe_tensor *t = convert ? moe_st_tensor_as(f, e, dt) : moe_st_tensor(f, e);
    moe_lua_push_tensor(L, t, fname);
    lua_setfield(L, -2, e->name);
}

/* safetensors_load(path, {dtype=, names=}) -> {name = tensor}, metadata */
static int l_safetensors_load(lua_State *L) {
    const char *fname = "safetensors.load";
    const char *path = check_path(L, 1, fname);
    const char *dts = moe_lua_opt_field_str(L, 2, "dtype", NULL, fname);
    moe_dtype dt = dts ? moe_lua_check_dtype(L, dts, fname) : MOE_F32;
    int names = 0;
    if (!lua_isnoneornil(L, 2)) {
        lua_getfield(L, 2, "names");
        if (!lua_isnil(L, -1) && !lua_istable(L, -1))
            luaL_error(L, "%s: option 'names' must be a list of strings, got %s", fname, luaL_typename(L, -1));
        names = lua_istable(L, -1) ? lua_gettop(L) : 0;
        if (!names) lua_pop(L, 1);
    }
    source src = open_source(L, path, fname);
    lua_newtable(L);
    moe_st_file *f;
    if (names) {
        int n = (int)lua_objlen(L, names);
        for (int i = 1; i <= n; i++) {
            lua_rawgeti(L, names, i);
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "%s: names[%d] must be a string, got %s", fname, i, luaL_typename(L, -1));
            const char *name = lua_tostring(L, -1);
            const moe_st_entry *e = source_find(&src, name, &f);
            if (!e) luaL_error(L, "%s: %s has no tensor '%s'", fname, path, name);
            lua_pop(L, 1);
            load_one(L, f, e, dts != NULL, dt, fname);
        }
    } else {
        size_t n = source_count(&src);
        for (size_t i = 0; i < n; i++) {
            const moe_st_entry *e = source_at(&src, i, &f);
            load_one(L, f, e, dts != NULL, dt, fname);
        }
    }
    push_metadata(L, &src, fname);
    /* tensors hold the mapping themselves; the handle can go now */
    moe_lua_handle_free(L, src.slot);
    return 2;
}

/* ---------------------------------------------------------------- info -- */

/* safetensors_info(path) -> {{name=, dtype=, file_dtype=, shape=, nbytes=, file=}...}, metadata */
static int l_safetensors_info(lua_State *L) {
    const char *fname = "safetensors.info";
    const char *path = check_path(L, 1, fname);
    source src = open_source(L, path, fname);
    size_t n = source_count(&src);
    lua_createtable(L, (int)n, 0);
    for (size_t i = 0; i < n; i++) {
        moe_st_file *f;
        const moe_st_entry *e = source_at(&src, i, &f);
        lua_createtable(L, 0, 6);
        lua_pushstring(L, e->name);
        lua_setfield(L, -2, "name");
        /* moelab's name when it can hold the type, else the file's */
        lua_pushstring(L, e->dtype >= 0 ? moe_dtype_name((moe_dtype)e->dtype) : e->file_dtype);
        lua_setfield(L, -2, "dtype");
        lua_pushstring(L, e->file_dtype);
        lua_setfield(L, -2, "file_dtype");
        lua_createtable(L, e->ndim, 0);
        for (int d = 0; d < e->ndim; d++) {
            lua_pushnumber(L, (lua_Number)e->shape[d]);
            lua_rawseti(L, -2, d + 1);
        }
        lua_setfield(L, -2, "shape");
        lua_pushnumber(L, (lua_Number)(e->end - e->begin));
        lua_setfield(L, -2, "nbytes");
        lua_pushstring(L, moe_st_path(f));
        lua_setfield(L, -2, "file");
        lua_rawseti(L, -2, (int)i + 1);
    }
    push_metadata(L, &src, fname);
    moe_lua_handle_free(L, src.slot);
    return 2;
}

/* ---------------------------------------------------------------- save -- */

static int cmp_cstr(const void *a, const void *b) { return strcmp(*(const char *const *)a, *(const char *const *)b); }

static size_t count_keys(lua_State *L, int idx) {
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) { lua_pop(L, 1); n++; }
    return n;
}

/* Collects the string keys of the table at idx, sorted, into a userdata
 * array pushed on the stack (the table keeps the strings alive). */
static const char **sorted_keys(lua_State *L, int idx, size_t n, const char *fname, const char *what) {
    const char **keys = lua_newuserdata(L, (n + 1) * sizeof *keys);
    size_t k = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING)
            luaL_error(L, "%s: %s keys must be strings, got a %s key", fname, what, luaL_typename(L, -1));
        keys[k++] = lua_tostring(L, -1);
    }
    qsort(keys, n, sizeof *keys, cmp_cstr);
    return keys;
}

/* safetensors_save(path, tensors, metadata): tensors is a list of
 * {name, tensor} pairs (order kept) or a map name -> tensor (sorted). */
static int l_safetensors_save(lua_State *L) {
    const char *fname = "safetensors.save";
    const char *path = check_path(L, 1, fname);
    if (!lua_istable(L, 2) || moe_lua_is_tensor(L, 2))
        return luaL_error(L, "%s: tensors must be a list of {name, tensor} pairs or a map name -> tensor, got %s",
                          fname, moe_lua_is_tensor(L, 2) ? "tensor" : luaL_typename(L, 2));
    if (!lua_isnoneornil(L, 3) && !lua_istable(L, 3))
        return luaL_error(L, "%s: metadata must be a table of strings, got %s", fname, luaL_typename(L, 3));
    lua_settop(L, 3);

    size_t total = count_keys(L, 2), listn = lua_objlen(L, 2);
    int is_list = listn > 0;
    if (is_list && total != listn)
        return luaL_error(L, "%s: tensors mixes list entries and named entries; use a list of {name, tensor} "
                          "pairs or a map name -> tensor", fname);
    size_t n = total;
    const char **names;
    moe_tensor **tensors = lua_newuserdata(L, (n + 1) * sizeof *tensors);   /* slot 4 */
    if (is_list) {
        names = lua_newuserdata(L, (n + 1) * sizeof *names);                /* slot 5 */
        for (size_t i = 0; i < n; i++) {
            lua_rawgeti(L, 2, (int)i + 1);
            int pair = lua_gettop(L);
            if (!lua_istable(L, pair) || moe_lua_is_tensor(L, pair))
                luaL_error(L, "%s: tensors[%d] must be a {name, tensor} pair, got %s", fname, (int)i + 1,
                           moe_lua_is_tensor(L, pair) ? "tensor" : luaL_typename(L, pair));
            lua_rawgeti(L, pair, 1);
            if (lua_type(L, -1) != LUA_TSTRING)
                luaL_error(L, "%s: tensors[%d][1] (the name) must be a string, got %s", fname, (int)i + 1,
                           luaL_typename(L, -1));
            names[i] = lua_tostring(L, -1);   /* the pair table keeps it alive */
            lua_rawgeti(L, pair, 2);
            char arg[64];
            snprintf(arg, sizeof arg, "tensors[%d][2]", (int)i + 1);
            tensors[i] = moe_lua_check_tensor_f(L, -1, fname, arg);
            lua_settop(L, 5);
        }
    } else {
        names = sorted_keys(L, 2, n, fname, "tensors");                  /* slot 5 */
        for (size_t i = 0; i < n; i++) {
            lua_getfield(L, 2, names[i]);
            char arg[200];
            snprintf(arg, sizeof arg, "tensors['%.150s']", names[i]);
            tensors[i] = moe_lua_check_tensor_f(L, -1, fname, arg);
            lua_pop(L, 1);
        }
    }

    size_t nmeta = lua_isnil(L, 3) ? 0 : count_keys(L, 3);
    const char **mkeys = nmeta ? sorted_keys(L, 3, nmeta, fname, "metadata") : NULL;
    const char **mvals = lua_newuserdata(L, (nmeta + 1) * sizeof *mvals);
    lua_newtable(L);   /* keeps the strings made from numbers alive */
    int anchor = lua_gettop(L);
    for (size_t i = 0; i < nmeta; i++) {
        lua_getfield(L, 3, mkeys[i]);
        int t = lua_type(L, -1);
        if (t != LUA_TSTRING && t != LUA_TNUMBER)
            luaL_error(L, "%s: metadata['%s'] must be a string (the format stores strings), got %s", fname, mkeys[i],
                       luaL_typename(L, -1));
        mvals[i] = lua_tostring(L, -1);   /* numbers become their decimal text */
        lua_rawseti(L, anchor, (int)i + 1);
    }
    moe_status st = moe_st_save(moe_lua_ctx(L), path, n, names, tensors, nmeta, mkeys, mvals);
    moe_lua_check(L, st, fname);
    return 0;
}

/* --------------------------------------------------------------- files -- */

static int l_write_file_atomic(lua_State *L) {
    const char *fname = "io.write_file_atomic";
    const char *path = check_path(L, 1, fname);
    if (lua_type(L, 2) != LUA_TSTRING)
        return luaL_error(L, "%s: data must be a string, got %s", fname, luaL_typename(L, 2));
    size_t n;
    const char *data = lua_tolstring(L, 2, &n);
    moe_lua_check(L, moe_io_write_file_atomic(path, data, n), fname);
    return 0;
}

static int l_read_file(lua_State *L) {
    const char *fname = "io.read_file";
    const char *path = check_path(L, 1, fname);
    char *data;
    size_t n;
    moe_lua_check(L, moe_io_read_file(path, &data, &n), fname);
    int h = moe_lua_handle_push(L, data, free);
    lua_pushlstring(L, data, n);
    moe_lua_handle_free(L, h);
    return 1;
}

static int l_mkdir_p(lua_State *L) {
    const char *fname = "io.mkdir_p";
    moe_lua_check(L, moe_io_mkdir_p(check_path(L, 1, fname)), fname);
    return 0;
}

void moe_lua_open_io(lua_State *L) {
    lua_newtable(L);
    static const luaL_Reg fns[] = {
        {"safetensors_load", l_safetensors_load},
        {"safetensors_save", l_safetensors_save},
        {"safetensors_info", l_safetensors_info},
        {"write_file_atomic", l_write_file_atomic},
        {"read_file", l_read_file},
        {"mkdir_p", l_mkdir_p},
        {NULL, NULL},
    };
    for (const luaL_Reg *r = fns; r->name; r++) {
        lua_pushcfunction(L, r->func);
        lua_setfield(L, -2, r->name);
    }
    moe_lua_json_register(L);
    lua_setfield(L, -2, "io");
}
