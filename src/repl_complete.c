/* Tab completion for the REPL: completes globals and fields reached by dotted
 * or colon paths ("moe.ra" -> "moe.rand", "x:nu" -> "x:numel"), looking
 * through __index tables of metatables for methods.
 *
 * complete_state is process-wide because libedit's completion callback takes
 * no user pointer; it is set only while the interactive REPL runs. */
#include "repl_complete.h"

#include <lauxlib.h>
#include <stdio.h>
#include <editline/readline.h>
#include <stdlib.h>
#include <string.h>


static lua_State *complete_state;

static const char *const lua_keywords[] = {
    "and", "break", "do", "else", "elseif", "end", "false", "for", "function", "goto", "if", "in",
    "local", "nil", "not", "or", "repeat", "return", "then", "true", "until", "while", NULL,
};

typedef struct {
    const char *text; /* the word being completed */
    char **matches;   /* result, in libedit's format */
} completion;

static int is_ident_char(int c) {
    return c == '_' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

/* Replaces the value on top by its field `key`, read without running
 * metamethods: raw fields of tables, then __index tables of metatables. */
static void raw_lookup(lua_State *L, const char *key, size_t klen) {
    for (int depth = 0; depth < 16; depth++) {
        if (lua_istable(L, -1)) {
            lua_pushlstring(L, key, klen);
            lua_rawget(L, -2);
            if (!lua_isnil(L, -1)) { lua_remove(L, -2); return; }
            lua_pop(L, 1);
        } else if (!lua_isuserdata(L, -1)) {
            break;
        }
        if (!lua_getmetatable(L, -1)) break;
        lua_pushliteral(L, "__index");
        lua_rawget(L, -2);
        lua_remove(L, -2); /* metatable */
        lua_remove(L, -2); /* object */
        if (!lua_istable(L, -1)) break;
    }
    lua_pop(L, 1);
    lua_pushnil(L);
}

/* Adds to the set at index `set` the string keys of the value on top (and
 * of its __index tables) that start with prefix. Pops the value. */
static void collect_names(lua_State *L, int set, const char *prefix, size_t plen, int only_functions) {
    for (int depth = 0; depth < 16; depth++) {
        if (lua_istable(L, -1)) {
            lua_pushnil(L);
            while (lua_next(L, -2)) {
                if (lua_type(L, -2) == LUA_TSTRING && (!only_functions || lua_isfunction(L, -1))) {
                    size_t klen;
                    const char *k = lua_tolstring(L, -2, &klen);
                    int ok = klen >= plen && !memcmp(k, prefix, plen) && klen > 0 && !(k[0] >= '0' && k[0] <= '9');
                    for (size_t i = 0; ok && i < klen; i++) ok = is_ident_char((unsigned char)k[i]);
                    if (ok) {
                        lua_pushvalue(L, -2);
                        lua_pushboolean(L, 1);
                        lua_rawset(L, set);
                    }
                }
                lua_pop(L, 1);
            }
        } else if (!lua_isuserdata(L, -1)) {
            break;
        }
        if (!lua_getmetatable(L, -1)) break;
        lua_pushliteral(L, "__index");
        lua_rawget(L, -2);
        lua_remove(L, -2);
        lua_remove(L, -2);
        if (!lua_istable(L, -1)) break;
    }
    lua_pop(L, 1);
}

static int cmp_str(const void *a, const void *b) {
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Runs under lua_cpcall: builds c->matches for c->text. */
static int complete_protected(lua_State *L) {
    completion *c = lua_touserdata(L, 1);
    const char *text = c->text;
    const char *sep = NULL;
    for (const char *p = text; *p; p++) {
        if (*p == '.' || *p == ':') sep = p;
        else if (!is_ident_char((unsigned char)*p)) return 0;
    }
    if (text[0] >= '0' && text[0] <= '9') return 0; /* a number */
    const char *word = sep ? sep + 1 : text;
    size_t plen = strlen(word);

    lua_newtable(L);
    int set = lua_gettop(L);
    lua_pushvalue(L, LUA_GLOBALSINDEX);
    if (sep) {
        const char *seg = text;
        while (seg <= sep) {
            const char *end = seg;
            while (end < sep && *end != '.' && *end != ':') end++;
            if (end == seg) return 0;
            if (*end == ':' && end != sep) return 0;
            raw_lookup(L, seg, (size_t)(end - seg));
            if (lua_isnil(L, -1)) return 0;
            seg = end + 1;
        }
    } else {
        for (int i = 0; lua_keywords[i]; i++)
            if (!strncmp(lua_keywords[i], word, plen)) {
                lua_pushstring(L, lua_keywords[i]);
                lua_pushboolean(L, 1);
                lua_rawset(L, set);
            }
    }
    collect_names(L, set, word, plen, sep && *sep == ':');

    size_t n = 0;
    lua_pushnil(L);
    while (lua_next(L, set)) { n++; lua_pop(L, 1); }
    if (n == 0) return 0;

    char **m = calloc(n + 2, sizeof *m);
    if (!m) return 0;
    size_t head = sep ? (size_t)(sep - text) + 1 : 0, k = 1;
    lua_pushnil(L);
    while (lua_next(L, set)) {
        lua_pop(L, 1);
        size_t klen;
        const char *key = lua_tolstring(L, -1, &klen);
        char *s = malloc(head + klen + 1);
        if (s) {
            memcpy(s, text, head);
            memcpy(s + head, key, klen + 1);
            m[k++] = s;
        }
    }
    n = k - 1;
    if (n == 0) { free(m); return 0; }
    qsort(m + 1, n, sizeof *m, cmp_str);
    if (n == 1) {
        m[0] = m[1];
        m[1] = NULL;
    } else {
        size_t common = strlen(m[1]);
        for (size_t i = 2; i <= n; i++) {
            size_t j = 0;
            while (j < common && m[i][j] == m[1][j]) j++;
            common = j;
        }
        m[0] = strndup(m[1], common);
        if (!m[0]) {
            for (size_t i = 1; i <= n; i++) free(m[i]);
            free(m);
            return 0;
        }
    }
    c->matches = m;
    return 0;
}

static char **complete_names(const char *text, int start, int end) {
    (void)start;
    (void)end;
    rl_attempted_completion_over = 1; /* never fall back to file names */
    lua_State *L = complete_state;
    if (!L) return NULL;
    completion c = {text, NULL};
    int top = lua_gettop(L);
    if (lua_cpcall(L, complete_protected, &c) != 0) lua_settop(L, top);
    return c.matches;
}

/* exit([code]) for the REPL, and os.exit wrapped the same way: save the
 * history, then leave through the original os.exit. */

void moe_repl_completion_install(lua_State *L) {
    complete_state = L;
    if (!L) return;
    rl_basic_word_break_characters = " \t\n\"\\'`@$><=;|&{([,+-*/%^~#";
    rl_completer_word_break_characters = (char *)rl_basic_word_break_characters;
    rl_attempted_completion_function = complete_names;
    rl_completion_append_character = '\0';
}
