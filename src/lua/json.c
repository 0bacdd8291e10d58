/* JSON for Lua values via cJSON (config files, checkpoint sidecars).
 *
 * Encoding: a table whose keys are exactly 1..n (n >= 1) becomes an array,
 * any other table an object with string keys written in sorted order (so the
 * output is reproducible); an empty table is {}. json_null encodes null.
 * NaN and infinities, functions, userdata, threads, non-string keys of
 * objects and cycles are errors naming the path ($.layers[2].name).
 * Decoding: null becomes nil (a key with a null value is absent), except
 * inside arrays, where it becomes json_null so later elements keep their
 * positions and the array re-encodes the same. */
#include "io_internal.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Deeper input is refused rather than risking the C stack (cJSON's own
 * parser stops at the same depth). */
#define MAX_DEPTH 1000

typedef struct {
    lua_State *L;
    int seen;            /* stack slot of the set of tables on the current path */
    char path[512];
    char err[1024];
} encoder;

static cJSON *enc_fail(encoder *E, const char *fmt, const char *detail) {
    char what[256];
    snprintf(what, sizeof what, fmt, detail);
    snprintf(E->err, sizeof E->err, "%s (at %s)", what, E->path);
    return NULL;
}

static cJSON *enc_value(encoder *E, int idx, int depth);

/* Appends a path segment, returning the old length to restore. */
static size_t path_push(encoder *E, const char *fmt, const char *s, long long i) {
    size_t n = strlen(E->path);
    if (n < sizeof E->path - 1) {
        if (s) snprintf(E->path + n, sizeof E->path - n, fmt, s);
        else snprintf(E->path + n, sizeof E->path - n, fmt, i);
    }
    return n;
}

/* 1..n keys exactly: returns n, or 0 for an object (or empty table). */
static size_t array_length(lua_State *L, int idx) {
    size_t count = 0;
    lua_Number max = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TNUMBER) { lua_pop(L, 1); return 0; }
        lua_Number k = lua_tonumber(L, -1);
        if (k < 1 || k != floor(k)) { lua_pop(L, 1); return 0; }
        if (k > max) max = k;
        count++;
    }
    return (lua_Number)count == max ? count : 0;
}

typedef struct { const char *s; size_t n; } key_ref;

static int cmp_keys(const void *a, const void *b) {
    const key_ref *x = a, *y = b;
    size_t n = x->n < y->n ? x->n : y->n;
    int c = memcmp(x->s, y->s, n);
    return c ? c : (x->n > y->n) - (x->n < y->n);
}

static cJSON *enc_object(encoder *E, int idx, int depth) {
    lua_State *L = E->L;
    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            const char *tn = luaL_typename(L, -1);
            lua_pop(L, 1);
            return enc_fail(E, "object keys must be strings, got a %s key (a list must use keys 1..n)", tn);
        }
        n++;
    }
    /* key strings stay alive: the table holds them and is not modified */
    key_ref *keys = malloc((n + 1) * sizeof *keys);
    if (!keys) return enc_fail(E, "%s", "out of memory");
    size_t k = 0;
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        keys[k].s = lua_tolstring(L, -1, &keys[k].n);
        k++;
    }
    qsort(keys, n, sizeof *keys, cmp_keys);
    cJSON *obj = cJSON_CreateObject();
    for (size_t i = 0; obj && i < n; i++) {
        if (strlen(keys[i].s) != keys[i].n) {
            cJSON_Delete(obj);
            free(keys);
            return enc_fail(E, "%s", "object key contains a NUL byte");
        }
        size_t old = path_push(E, ".%s", keys[i].s, 0);
        lua_pushlstring(L, keys[i].s, keys[i].n);
        lua_rawget(L, idx);
        cJSON *v = enc_value(E, lua_gettop(L), depth + 1);
        lua_pop(L, 1);
        if (!v) { free(keys); cJSON_Delete(obj); return NULL; }   /* message set, path kept */
        if (!cJSON_AddItemToObject(obj, keys[i].s, v)) {
            cJSON_Delete(v);
            cJSON_Delete(obj);
            free(keys);
            return enc_fail(E, "%s", "out of memory");
        }
        E->path[old] = '\0';
    }
    free(keys);
    return obj;
}

static cJSON *enc_table(encoder *E, int idx, int depth) {
    lua_State *L = E->L;
    if (depth > MAX_DEPTH) return enc_fail(E, "nesting deeper than %s levels", "1000");
    if (!lua_checkstack(L, 8)) return enc_fail(E, "%s", "Lua stack exhausted");
    lua_pushvalue(L, idx);
    lua_rawget(L, E->seen);
    int cyclic = lua_toboolean(L, -1);
    lua_pop(L, 1);
    if (cyclic) return enc_fail(E, "%s", "table contains itself (a cycle)");
    lua_pushvalue(L, idx);
    lua_pushboolean(L, 1);
    lua_rawset(L, E->seen);

    cJSON *out;
    size_t n = array_length(L, idx);
    if (n > 0) {
        out = cJSON_CreateArray();
        for (size_t i = 1; out && i <= n; i++) {
            size_t old = path_push(E, "[%lld]", NULL, (long long)i);
            lua_rawgeti(L, idx, (int)i);
            cJSON *v = enc_value(E, lua_gettop(L), depth + 1);
            lua_pop(L, 1);
            if (!v) { cJSON_Delete(out); out = NULL; break; }
            if (!cJSON_AddItemToArray(out, v)) {
                cJSON_Delete(v);
                cJSON_Delete(out);
                out = enc_fail(E, "%s", "out of memory");
                break;
            }
            E->path[old] = '\0';
        }
        if (!out && !E->err[0]) enc_fail(E, "%s", "out of memory");
    } else {
        out = enc_object(E, idx, depth);
        if (!out && !E->err[0]) enc_fail(E, "%s", "out of memory");
    }
    /* off the path again: a table reached twice without a cycle (shared) is fine */
    lua_pushvalue(L, idx);
    lua_pushnil(L);
    lua_rawset(L, E->seen);
    return out;
}

static cJSON *enc_value(encoder *E, int idx, int depth) {
    lua_State *L = E->L;
    cJSON *v = NULL;
    switch (lua_type(L, idx)) {
    case LUA_TNIL: v = cJSON_CreateNull(); break;
    case LUA_TBOOLEAN: v = cJSON_CreateBool(lua_toboolean(L, idx)); break;
    case LUA_TNUMBER: {
        lua_Number x = lua_tonumber(L, idx);
        if (isnan(x) || isinf(x)) return enc_fail(E, "%s", "NaN and infinity have no JSON form");
        v = cJSON_CreateNumber(x);
        break;
    }
    case LUA_TSTRING: {
        size_t n;
        const char *s = lua_tolstring(L, idx, &n);
        if (strlen(s) != n) return enc_fail(E, "%s", "string contains a NUL byte");
        v = cJSON_CreateString(s);
        break;
    }
    case LUA_TTABLE: return enc_table(E, idx, depth);
    case LUA_TLIGHTUSERDATA:
        if (lua_touserdata(L, idx) == NULL) { v = cJSON_CreateNull(); break; }   /* json_null */
        return enc_fail(E, "cannot encode a %s", "light userdata");
    default:
        return enc_fail(E, "cannot encode a %s", moe_lua_is_tensor(L, idx) ? "tensor" : luaL_typename(L, idx));
    }
    if (!v) return enc_fail(E, "%s", "out of memory");
    return v;
}

/* cJSON indents with tabs and writes "key":\tvalue; two spaces per level and
 * "key": value read better. Tabs inside strings are escaped as \t, so every
 * raw tab in the output is formatting. */
static void push_reindented(lua_State *L, const char *s) {
    luaL_Buffer b;
    luaL_buffinit(L, &b);
    int line_start = 1;
    for (const char *p = s; *p; p++) {
        if (*p == '\t') luaL_addstring(&b, line_start ? "  " : " ");
        else {
            luaL_addchar(&b, *p);
            line_start = *p == '\n';
        }
    }
    luaL_pushresult(&b);
}

static void free_cjson(void *p) { cJSON_Delete(p); }
static void free_cstr(void *p) { cJSON_free(p); }

static int l_json_encode(lua_State *L) {
    const char *fname = "json.encode";
    int indent = moe_lua_opt_field_bool(L, 2, "indent", 0, fname);
    lua_settop(L, 1);
    lua_newtable(L);                         /* slot 2: tables on the current path */
    encoder *E = lua_newuserdata(L, sizeof *E);   /* slot 3: big buffers off the C stack */
    memset(E, 0, sizeof *E);
    E->L = L;
    E->seen = 2;
    strcpy(E->path, "$");
    cJSON *root = enc_value(E, 1, 0);
    if (!root) return luaL_error(L, "%s: %s", fname, E->err);
    int h = moe_lua_handle_push(L, root, free_cjson);
    char *text = indent ? cJSON_Print(root) : cJSON_PrintUnformatted(root);
    if (!text) return luaL_error(L, "%s: out of memory", fname);
    int ht = moe_lua_handle_push(L, text, free_cstr);
    if (indent) push_reindented(L, text);
    else lua_pushstring(L, text);
    moe_lua_handle_free(L, ht);
    moe_lua_handle_free(L, h);
    return 1;
}

void moe_lua_json_push(lua_State *L, const cJSON *v, const char *fname) {
    if (!lua_checkstack(L, 4)) luaL_error(L, "%s: JSON nested too deeply", fname);
    if (cJSON_IsNull(v) || cJSON_IsInvalid(v)) lua_pushnil(L);
    else if (cJSON_IsFalse(v)) lua_pushboolean(L, 0);
    else if (cJSON_IsTrue(v)) lua_pushboolean(L, 1);
    else if (cJSON_IsNumber(v)) lua_pushnumber(L, v->valuedouble);
    else if (cJSON_IsString(v)) lua_pushstring(L, v->valuestring);
    else if (cJSON_IsArray(v)) {
        lua_createtable(L, cJSON_GetArraySize(v), 0);
        int i = 1;
        const cJSON *c;
        cJSON_ArrayForEach(c, v) {
            /* json_null keeps the positions after a null in the list */
            if (cJSON_IsNull(c)) lua_pushlightuserdata(L, NULL);
            else moe_lua_json_push(L, c, fname);
            lua_rawseti(L, -2, i++);
        }
    } else if (cJSON_IsObject(v)) {
        lua_createtable(L, 0, cJSON_GetArraySize(v));
        const cJSON *c;
        cJSON_ArrayForEach(c, v) {
            lua_pushstring(L, c->string);
            moe_lua_json_push(L, c, fname);
            lua_rawset(L, -3);
        }
    } else {
        lua_pushnil(L);
    }
}

static int l_json_decode(lua_State *L) {
    const char *fname = "json.decode";
    if (lua_type(L, 1) != LUA_TSTRING)
        return luaL_error(L, "%s: text must be a string, got %s", fname, luaL_typename(L, 1));
    size_t n;
    const char *s = lua_tolstring(L, 1, &n);
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(s, n, &end, 0);
    size_t at = end && end >= s ? (size_t)(end - s) : 0;
    if (root) {
        /* only whitespace may follow the value */
        while (at < n && (s[at] == ' ' || s[at] == '\t' || s[at] == '\n' || s[at] == '\r')) at++;
        if (at < n) {
            cJSON_Delete(root);
            root = NULL;
        }
    }
    if (!root) {
        if (n == 0) return luaL_error(L, "%s: empty string is not JSON", fname);
        int line = 1, col = 1;
        for (size_t i = 0; i < at && i < n; i++) {
            if (s[i] == '\n') { line++; col = 1; }
            else col++;
        }
        char near[24];
        size_t m = at < n ? n - at : 0;
        if (m > sizeof near - 1) m = sizeof near - 1;
        memcpy(near, s + (at < n ? at : n), m);
        near[m] = '\0';
        return luaL_error(L, "%s: invalid JSON at line %d, column %d (byte %d) near '%s'", fname, line, col,
                          (int)at + 1, near);
    }
    int h = moe_lua_handle_push(L, root, free_cjson);
    moe_lua_json_push(L, root, fname);
    moe_lua_handle_free(L, h);
    return 1;
}

void moe_lua_json_register(lua_State *L) {
    lua_pushcfunction(L, l_json_encode);
    lua_setfield(L, -2, "json_encode");
    lua_pushcfunction(L, l_json_decode);
    lua_setfield(L, -2, "json_decode");
    lua_pushlightuserdata(L, NULL);
    lua_setfield(L, -2, "json_null");
}
