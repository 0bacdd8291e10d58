/* Argument checks, colour parsing and the source-colour guard of the
 * canvas (see canvas_internal.h). */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <unistd.h>
#include <cairo-pdf.h>
#include <cairo-svg.h>
#include "canvas_internal.h"
/* ------------------------------------------------------------ arguments */

VIZ_INTERNAL int fail(lua_State *L, const char *fn, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return luaL_error(L, "%s: %s", fn, msg);
}

VIZ_INTERNAL const char *tname(lua_State *L, int idx) { return luaL_typename(L, idx); }

VIZ_INTERNAL double check_num(lua_State *L, int idx, const char *fn, const char *arg) {
    if (lua_type(L, idx) != LUA_TNUMBER)
        fail(L, fn, "argument '%s' must be a number, got %s", arg, tname(L, idx));
    double v = lua_tonumber(L, idx);
    if (!isfinite(v)) fail(L, fn, "argument '%s' must be finite, got %f", arg, v);
    /* far outside any canvas: cairo's fixed-point geometry (and arcs) break down */
    if (fabs(v) > MAX_COORD) fail(L, fn, "argument '%s' is out of range (|%s| <= %g), got %g", arg, arg, MAX_COORD, v);
    return v;
}

/* The options table at idx: none/nil -> 0, a table -> 1, else an error.
 * Unknown keys are errors (they are usually typos). */
VIZ_INTERNAL int check_opts(lua_State *L, int idx, const char *fn, const char *const *allowed) {
    if (lua_isnoneornil(L, idx)) return 0;
    if (!lua_istable(L, idx)) fail(L, fn, "argument 'opts' must be a table, got %s", tname(L, idx));
    lua_pushnil(L);
    while (lua_next(L, idx)) {
        lua_pop(L, 1);
        if (lua_type(L, -1) != LUA_TSTRING) {
            fail(L, fn, "options must have string keys, got a %s key", tname(L, -1));
        }
        const char *k = lua_tostring(L, -1);
        int ok = 0;
        for (const char *const *a = allowed; *a; a++) if (strcmp(*a, k) == 0) { ok = 1; break; }
        if (!ok) {
            char list[256] = "";
            for (const char *const *a = allowed; *a; a++) {
                strncat(list, *a, sizeof list - strlen(list) - 3);
                if (a[1]) strncat(list, ", ", sizeof list - strlen(list) - 1);
            }
            fail(L, fn, "unknown option '%s' (known: %s)", k, list);
        }
    }
    return 1;
}

VIZ_INTERNAL int opt_bool(lua_State *L, int idx, int has, const char *key, int def, const char *fn) {
    if (!has) return def;
    lua_getfield(L, idx, key);
    int v = def;
    if (lua_isboolean(L, -1)) v = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1)) fail(L, fn, "option '%s' must be a boolean, got %s", key, tname(L, -1));
    lua_pop(L, 1);
    return v;
}

VIZ_INTERNAL double opt_num(lua_State *L, int idx, int has, const char *key, double def, double lo,
                      double hi, const char *fn) {
    if (!has) return def;
    lua_getfield(L, idx, key);
    double v = def;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        v = lua_tonumber(L, -1);
        if (!isfinite(v) || v < lo || v > hi)
            fail(L, fn, "option '%s' must be a number in [%g, %g], got %g", key, lo, hi, v);
    } else if (!lua_isnil(L, -1)) {
        fail(L, fn, "option '%s' must be a number, got %s", key, tname(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

/* A string option copied into buf (so it outlives the stack slot). */
VIZ_INTERNAL const char *opt_str(lua_State *L, int idx, int has, const char *key, const char *def,
                           char *buf, size_t size, const char *fn) {
    if (!has) return def;
    lua_getfield(L, idx, key);
    const char *v = def;
    if (lua_type(L, -1) == LUA_TSTRING) {
        size_t n;
        const char *s = lua_tolstring(L, -1, &n);
        if (n == 0 || n >= size) fail(L, fn, "option '%s' must be a non-empty string shorter than %d bytes", key, (int)size);
        memcpy(buf, s, n + 1);
        v = buf;
    } else if (!lua_isnil(L, -1)) {
        fail(L, fn, "option '%s' must be a string, got %s", key, tname(L, -1));
    }
    lua_pop(L, 1);
    return v;
}

static int hexval(int ch) {
    if (ch >= '0' && ch <= '9') return ch - '0';
    if (ch >= 'a' && ch <= 'f') return ch - 'a' + 10;
    if (ch >= 'A' && ch <= 'F') return ch - 'A' + 10;
    return -1;
}

/* "#rgb", "#rrggbb", "#rrggbbaa" and a few names. */
static int parse_hex(const char *s, double rgba[4]) {
    static const struct { const char *name; double r, g, b, a; } names[] = {
        {"black", 0, 0, 0, 1}, {"white", 1, 1, 1, 1}, {"gray", .5, .5, .5, 1},
        {"grey", .5, .5, .5, 1}, {"none", 0, 0, 0, 0}, {"transparent", 0, 0, 0, 0},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        if (strcasecmp(s, names[i].name) == 0) {
            rgba[0] = names[i].r; rgba[1] = names[i].g; rgba[2] = names[i].b; rgba[3] = names[i].a;
            return 0;
        }
    }
    if (s[0] != '#') return -1;
    size_t n = strlen(s + 1);
    int d[8];
    for (size_t i = 0; i < n && i < 8; i++) if ((d[i] = hexval(s[1 + i])) < 0) return -1;
    if (n == 3) {
        for (int i = 0; i < 3; i++) rgba[i] = (d[i] * 17) / 255.0;
        rgba[3] = 1;
    } else if (n == 6 || n == 8) {
        for (int i = 0; i < (int)n / 2; i++) rgba[i] = (d[2 * i] * 16 + d[2 * i + 1]) / 255.0;
        if (n == 6) rgba[3] = 1;
    } else {
        return -1;
    }
    return 0;
}

/* A colour value at idx: a string ("#rrggbb", ...) or a table {r, g, b[, a]}. */
VIZ_INTERNAL void check_color_value(lua_State *L, int idx, const char *fn, const char *arg, double rgba[4]) {
    if (lua_type(L, idx) == LUA_TSTRING) {
        if (parse_hex(lua_tostring(L, idx), rgba) != 0)
            fail(L, fn, "argument '%s': '%s' is not a colour (use \"#rrggbb\", \"#rrggbbaa\" or {r, g, b[, a]} in 0..1)",
                 arg, lua_tostring(L, idx));
        return;
    }
    if (!lua_istable(L, idx))
        fail(L, fn, "argument '%s' must be a colour string or {r, g, b[, a]}, got %s", arg, tname(L, idx));
    int n = (int)lua_objlen(L, idx);
    if (n != 3 && n != 4) fail(L, fn, "argument '%s' must have 3 or 4 components, got %d", arg, n);
    rgba[3] = 1;
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, idx, i + 1);
        if (lua_type(L, -1) != LUA_TNUMBER)
            fail(L, fn, "argument '%s'[%d] must be a number in 0..1, got %s", arg, i + 1, tname(L, -1));
        double v = lua_tonumber(L, -1);
        if (!(v >= 0 && v <= 1)) fail(L, fn, "argument '%s'[%d] must be in 0..1, got %g", arg, i + 1, v);
        rgba[i] = v;
        lua_pop(L, 1);
    }
}

/* Option `key` as a colour; returns 1 when present. */
VIZ_INTERNAL int opt_color(lua_State *L, int idx, int has, const char *key, double rgba[4], const char *fn) {
    if (!has) return 0;
    lua_getfield(L, idx, key);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    char arg[64];
    snprintf(arg, sizeof arg, "opts.%s", key);
    check_color_value(L, lua_gettop(L), fn, arg, rgba);
    lua_pop(L, 1);
    return 1;
}

/* dash = number (on = off) or a list of positive lengths; returns the count. */
VIZ_INTERNAL int opt_dash(lua_State *L, int idx, int has, double dash[MAX_DASH], const char *fn) {
    if (!has) return 0;
    lua_getfield(L, idx, "dash");
    int n = 0;
    if (lua_type(L, -1) == LUA_TNUMBER) {
        double v = lua_tonumber(L, -1);
        if (!(v > 0 && v < 1e4)) fail(L, fn, "option 'dash' must be a positive length, got %g", v);
        dash[0] = dash[1] = v;
        n = 2;
    } else if (lua_istable(L, -1)) {
        n = (int)lua_objlen(L, -1);
        if (n < 1 || n > MAX_DASH) fail(L, fn, "option 'dash' must list 1 to %d lengths, got %d", MAX_DASH, n);
        for (int i = 0; i < n; i++) {
            lua_rawgeti(L, -1, i + 1);
            double v = lua_tonumber(L, -1);
            if (lua_type(L, -1) != LUA_TNUMBER || !(v > 0 && v < 1e4))
                fail(L, fn, "option 'dash'[%d] must be a positive length", i + 1);
            dash[i] = v;
            lua_pop(L, 1);
        }
    } else if (lua_isboolean(L, -1)) {
        if (lua_toboolean(L, -1)) { dash[0] = 4; dash[1] = 3; n = 2; }
    } else if (!lua_isnil(L, -1)) {
        fail(L, fn, "option 'dash' must be a number, a list of lengths or a boolean, got %s", tname(L, -1));
    }
    lua_pop(L, 1);
    return n;
}

VIZ_INTERNAL viz_canvas *check_canvas(lua_State *L, const char *fn) {
    viz_canvas *c = luaL_testudata(L, 1, VIZ_CANVAS_MT);
    if (!c) fail(L, fn, "expected a canvas as self (call it as c:%s(...)), got %s",
                 strchr(fn, ':') ? strchr(fn, ':') + 1 : fn, tname(L, 1));
    return c;
}

VIZ_INTERNAL const char *where(viz_canvas *c) { return c->path ? c->path : "SVG stream"; }

VIZ_INTERNAL viz_canvas *check_live(lua_State *L, const char *fn) {
    viz_canvas *c = check_canvas(L, fn);
    if (c->finished || !c->cr) fail(L, fn, "the canvas is finished ('%s'); drawing needs a new canvas", where(c));
    return c;
}

/* A drawing call left cairo in an error state: report it (the canvas is
 * unusable afterwards, as cairo contexts do not recover). */
VIZ_INTERNAL void check_cairo(lua_State *L, viz_canvas *c, const char *fn) {
    cairo_status_t st = cairo_status(c->cr);
    if (st != CAIRO_STATUS_SUCCESS)
        fail(L, fn, "cairo error on '%s': %s", where(c), cairo_status_to_string(st));
}

/* ---------------------------------------------------------- source colour */


VIZ_INTERNAL void push_color(viz_canvas *c, const double rgba[4], src_guard *g) {
    g->saved = cairo_pattern_reference(cairo_get_source(c->cr));
    cairo_set_source_rgba(c->cr, rgba[0], rgba[1], rgba[2], rgba[3]);
}

VIZ_INTERNAL void pop_color(viz_canvas *c, src_guard *g) {
    if (!g->saved) return;
    cairo_set_source(c->cr, g->saved);
    cairo_pattern_destroy(g->saved);
    g->saved = NULL;
}
