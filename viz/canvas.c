/* The canvas: a cairo surface (PNG, PDF or SVG file, or an SVG stream) with
 * a small drawing API for charts. Every method checks its arguments before
 * touching cairo and raises a Lua error naming the method and the argument;
 * cairo's own failures are read back with cairo_status and raised with the
 * path. A finished canvas refuses to draw. */
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
#include "viz.h"

#define MAX_PNG_SIDE 32767.0
#define MAX_PNG_PIXELS (1 << 27)     /* 128 Mpixel, 512 MiB as ARGB32 */
#define MAX_UNITS 1.0e5               /* a canvas side in units (points) */
#define MAX_COORD 1.0e6               /* any coordinate or length */

static const char *format_name(enum viz_format f) {
    return f == VIZ_PNG ? "PNG" : f == VIZ_PDF ? "PDF" : "SVG";
}

/* ------------------------------------------------------------ arguments */

static int fail(lua_State *L, const char *fn, const char *fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    return luaL_error(L, "%s: %s", fn, msg);
}

static const char *tname(lua_State *L, int idx) { return luaL_typename(L, idx); }

static double check_num(lua_State *L, int idx, const char *fn, const char *arg) {
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
static int check_opts(lua_State *L, int idx, const char *fn, const char *const *allowed) {
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

static int opt_bool(lua_State *L, int idx, int has, const char *key, int def, const char *fn) {
    if (!has) return def;
    lua_getfield(L, idx, key);
    int v = def;
    if (lua_isboolean(L, -1)) v = lua_toboolean(L, -1);
    else if (!lua_isnil(L, -1)) fail(L, fn, "option '%s' must be a boolean, got %s", key, tname(L, -1));
    lua_pop(L, 1);
    return v;
}

static double opt_num(lua_State *L, int idx, int has, const char *key, double def, double lo,
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
static const char *opt_str(lua_State *L, int idx, int has, const char *key, const char *def,
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
static void check_color_value(lua_State *L, int idx, const char *fn, const char *arg, double rgba[4]) {
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
static int opt_color(lua_State *L, int idx, int has, const char *key, double rgba[4], const char *fn) {
    if (!has) return 0;
    lua_getfield(L, idx, key);
    if (lua_isnil(L, -1)) { lua_pop(L, 1); return 0; }
    char arg[64];
    snprintf(arg, sizeof arg, "opts.%s", key);
    check_color_value(L, lua_gettop(L), fn, arg, rgba);
    lua_pop(L, 1);
    return 1;
}

#define MAX_DASH 16
/* dash = number (on = off) or a list of positive lengths; returns the count. */
static int opt_dash(lua_State *L, int idx, int has, double dash[MAX_DASH], const char *fn) {
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

static viz_canvas *check_canvas(lua_State *L, const char *fn) {
    viz_canvas *c = luaL_testudata(L, 1, VIZ_CANVAS_MT);
    if (!c) fail(L, fn, "expected a canvas as self (call it as c:%s(...)), got %s",
                 strchr(fn, ':') ? strchr(fn, ':') + 1 : fn, tname(L, 1));
    return c;
}

static const char *where(viz_canvas *c) { return c->path ? c->path : "SVG stream"; }

static viz_canvas *check_live(lua_State *L, const char *fn) {
    viz_canvas *c = check_canvas(L, fn);
    if (c->finished || !c->cr) fail(L, fn, "the canvas is finished ('%s'); drawing needs a new canvas", where(c));
    return c;
}

/* A drawing call left cairo in an error state: report it (the canvas is
 * unusable afterwards, as cairo contexts do not recover). */
static void check_cairo(lua_State *L, viz_canvas *c, const char *fn) {
    cairo_status_t st = cairo_status(c->cr);
    if (st != CAIRO_STATUS_SUCCESS)
        fail(L, fn, "cairo error on '%s': %s", where(c), cairo_status_to_string(st));
}

/* ---------------------------------------------------------- source colour */

typedef struct { cairo_pattern_t *saved; } src_guard;

static void push_color(viz_canvas *c, const double rgba[4], src_guard *g) {
    g->saved = cairo_pattern_reference(cairo_get_source(c->cr));
    cairo_set_source_rgba(c->cr, rgba[0], rgba[1], rgba[2], rgba[3]);
}

static void pop_color(viz_canvas *c, src_guard *g) {
    if (!g->saved) return;
    cairo_set_source(c->cr, g->saved);
    cairo_pattern_destroy(g->saved);
    g->saved = NULL;
}

/* ------------------------------------------------------------- lifecycle */

static cairo_status_t stream_write(void *closure, const unsigned char *data, unsigned int len) {
    viz_buf *b = closure;
    if (b->failed) return CAIRO_STATUS_WRITE_ERROR;
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len) cap *= 2;
        char *d = realloc(b->data, cap);
        if (!d) { b->failed = 1; return CAIRO_STATUS_WRITE_ERROR; }
        b->data = d;
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
    return CAIRO_STATUS_SUCCESS;
}

static void set_defaults(viz_canvas *c) {
    cairo_set_source_rgb(c->cr, 0, 0, 0);
    cairo_set_line_join(c->cr, CAIRO_LINE_JOIN_ROUND);
    cairo_set_line_cap(c->cr, CAIRO_LINE_CAP_BUTT);
}

/* Opens the surface for the current page (path may be NULL: stream). */
static cairo_status_t open_surface(viz_canvas *c, const char *path) {
    switch (c->format) {
    case VIZ_PNG:
        c->surface = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, (int)ceil(c->width * c->scale),
                                                (int)ceil(c->height * c->scale));
        break;
    case VIZ_PDF:
        c->surface = cairo_pdf_surface_create(path, c->width, c->height);
        break;
    case VIZ_SVG:
        if (path) c->surface = cairo_svg_surface_create(path, c->width, c->height);
        else c->surface = cairo_svg_surface_create_for_stream(stream_write, c->stream, c->width, c->height);
        break;
    }
    cairo_status_t st = cairo_surface_status(c->surface);
    if (st != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(c->surface);
        c->surface = NULL;
        return st;
    }
    c->cr = cairo_create(c->surface);
    if (c->format == VIZ_PNG) cairo_scale(c->cr, c->scale, c->scale);
    set_defaults(c);
    return cairo_status(c->cr);
}

static void drop_layout(viz_canvas *c) {
    if (c->layout) g_object_unref(c->layout);
    c->layout = NULL;
}

const char *viz_canvas_close(viz_canvas *c, char *msg, size_t msgsize) {
    if (c->finished) return NULL;
    c->finished = 1;
    const char *err = NULL;
    drop_layout(c);
    if (c->cr) {
        cairo_status_t st = cairo_status(c->cr);
        if (st != CAIRO_STATUS_SUCCESS) {
            snprintf(msg, msgsize, "cairo error while drawing '%s': %s", where(c), cairo_status_to_string(st));
            err = msg;
        }
        cairo_destroy(c->cr);
        c->cr = NULL;
    }
    if (c->surface) {
        cairo_surface_flush(c->surface);
        if (c->format == VIZ_PNG && !err) {
            cairo_status_t st = cairo_surface_write_to_png(c->surface, c->path);
            if (st != CAIRO_STATUS_SUCCESS) {
                snprintf(msg, msgsize, "could not write '%s': %s", c->path, cairo_status_to_string(st));
                err = msg;
            }
        }
        cairo_surface_finish(c->surface);
        cairo_status_t st = cairo_surface_status(c->surface);
        if (st != CAIRO_STATUS_SUCCESS && !err) {
            snprintf(msg, msgsize, "could not write '%s': %s",
                     c->page_path ? c->page_path : where(c), cairo_status_to_string(st));
            err = msg;
        }
        if (!err && c->stream && c->stream->failed) {
            snprintf(msg, msgsize, "out of memory while writing the SVG stream");
            err = msg;
        }
        cairo_surface_destroy(c->surface);
        c->surface = NULL;
    }
    return err;
}

/* Checks that path can be written (a clear errno message beats cairo's
 * "error while writing to output stream"). */
static void check_writable(lua_State *L, const char *fn, const char *path) {
    FILE *f = fopen(path, "wb");
    if (!f) fail(L, fn, "cannot write '%s': %s", path, strerror(errno));
    fclose(f);
}

static const char *const canvas_keys[] = {"path", "width", "height", "scale", "background", NULL};

/* viz.canvas{path=, width=, height=, scale=2, background=} */
int viz_canvas_new(lua_State *L) {
    const char *fn = "viz.canvas";
    if (!lua_istable(L, 1)) fail(L, fn, "expected a table {path=, width=, height=[, scale=]}, got %s", tname(L, 1));
    check_opts(L, 1, fn, canvas_keys);
    lua_getfield(L, 1, "path");
    if (lua_type(L, -1) != LUA_TSTRING) fail(L, fn, "option 'path' must be a file name ending in .png, .pdf or .svg, got %s", tname(L, -1));
    size_t plen;
    const char *path = lua_tolstring(L, -1, &plen);
    if (plen == 0 || strlen(path) != plen) fail(L, fn, "option 'path' must be a non-empty file name without NUL bytes");
    const char *dot = strrchr(path, '.');
    const char *slash = strrchr(path, '/');
    enum viz_format format = VIZ_PNG;
    if (dot && (!slash || dot > slash) && strcasecmp(dot, ".png") == 0) format = VIZ_PNG;
    else if (dot && (!slash || dot > slash) && strcasecmp(dot, ".pdf") == 0) format = VIZ_PDF;
    else if (dot && (!slash || dot > slash) && strcasecmp(dot, ".svg") == 0) format = VIZ_SVG;
    else fail(L, fn, "option 'path': cannot tell the format of '%s' (use .png, .pdf or .svg)", path);
    double w = opt_num(L, 1, 1, "width", NAN, 1, MAX_UNITS, fn);
    double h = opt_num(L, 1, 1, "height", NAN, 1, MAX_UNITS, fn);
    if (isnan(w)) fail(L, fn, "option 'width' is required (a number of units: points in PDF/SVG)");
    if (isnan(h)) fail(L, fn, "option 'height' is required (a number of units: points in PDF/SVG)");
    double scale = opt_num(L, 1, 1, "scale", 2, 0.01, 100, fn);
    double bg[4] = {1, 1, 1, 1};
    int has_bg = format == VIZ_PNG;
    lua_getfield(L, 1, "background");
    if (lua_isboolean(L, -1)) {
        if (!lua_toboolean(L, -1)) has_bg = 0;
        else has_bg = 1;
    } else if (!lua_isnil(L, -1)) {
        check_color_value(L, lua_gettop(L), fn, "opts.background", bg);
        has_bg = 1;
    }
    lua_pop(L, 1);
    if (format == VIZ_PNG) {
        double pw = ceil(w * scale), ph = ceil(h * scale);
        if (pw > MAX_PNG_SIDE || ph > MAX_PNG_SIDE || pw * ph > MAX_PNG_PIXELS)
            fail(L, fn, "a PNG of %.0f x %.0f pixels is too large (width*scale and height*scale at most %.0f, %d pixels in all)",
                 pw, ph, MAX_PNG_SIDE, MAX_PNG_PIXELS);
    }
    check_writable(L, fn, path);

    viz_canvas *c = lua_newuserdata(L, sizeof *c);
    memset(c, 0, sizeof *c);
    c->finished = 1;    /* until the surface is open: __gc then has nothing to do */
    luaL_getmetatable(L, VIZ_CANVAS_MT);
    lua_setmetatable(L, -2);
    c->format = format;
    c->width = w;
    c->height = h;
    c->scale = format == VIZ_PNG ? scale : 1;
    c->path = strdup(path);
    if (!c->path) fail(L, fn, "out of memory");
    if (format == VIZ_SVG) {
        c->page_path = strdup(path);
        if (!c->page_path) fail(L, fn, "out of memory");
    }
    cairo_status_t st = open_surface(c, path);
    c->finished = 0;
    if (st != CAIRO_STATUS_SUCCESS) {
        char msg[256];
        viz_canvas_close(c, msg, sizeof msg);
        fail(L, fn, "cannot create '%s': %s", path, cairo_status_to_string(st));
    }
    c->pages = 1;
    if (has_bg) {
        cairo_save(c->cr);
        cairo_set_source_rgba(c->cr, bg[0], bg[1], bg[2], bg[3]);
        cairo_paint(c->cr);
        cairo_restore(c->cr);
    }
    return 1;
}

viz_canvas *viz_canvas_push_stream(lua_State *L, double w, double h, viz_buf *buf) {
    viz_canvas *c = lua_newuserdata(L, sizeof *c);
    memset(c, 0, sizeof *c);
    c->finished = 1;
    luaL_getmetatable(L, VIZ_CANVAS_MT);
    lua_setmetatable(L, -2);
    c->format = VIZ_SVG;
    c->width = w;
    c->height = h;
    c->scale = 1;
    c->stream = buf;
    cairo_status_t st = open_surface(c, NULL);
    c->finished = 0;
    if (st != CAIRO_STATUS_SUCCESS) {
        char msg[256];
        viz_canvas_close(c, msg, sizeof msg);
        fail(L, "viz.svg_string", "cannot create an SVG stream: %s", cairo_status_to_string(st));
    }
    c->pages = 1;
    return c;
}

static int c_gc(lua_State *L) {
    viz_canvas *c = luaL_testudata(L, 1, VIZ_CANVAS_MT);
    if (!c) return 0;
    char msg[256];
    viz_canvas_close(c, msg, sizeof msg);   /* errors cannot be raised from __gc */
    free(c->path);
    free(c->page_path);
    c->path = c->page_path = NULL;
    return 0;
}

/* c:finish() -> path, pages. Writes the file(s) and closes the canvas;
 * finishing again does nothing. */
static int c_finish(lua_State *L) {
    const char *fn = "canvas:finish";
    viz_canvas *c = check_canvas(L, fn);
    if (!c->finished) {
        char msg[PATH_MAX + 256];
        const char *err = viz_canvas_close(c, msg, sizeof msg);
        if (err) fail(L, fn, "%s", err);
    }
    if (c->path) lua_pushstring(L, c->path);
    else lua_pushnil(L);
    lua_pushinteger(L, c->pages);
    return 2;
}

static int c_tostring(lua_State *L) {
    viz_canvas *c = luaL_checkudata(L, 1, VIZ_CANVAS_MT);
    lua_pushfstring(L, "viz.canvas(%s %dx%d '%s'%s)", format_name(c->format), (int)c->width,
                    (int)c->height, where(c), c->finished ? ", finished" : "");
    return 1;
}

static int c_size(lua_State *L) {
    viz_canvas *c = check_canvas(L, "canvas:size");
    lua_pushnumber(L, c->width);
    lua_pushnumber(L, c->height);
    return 2;
}

static int c_format(lua_State *L) {
    viz_canvas *c = check_canvas(L, "canvas:format");
    lua_pushstring(L, c->format == VIZ_PNG ? "png" : c->format == VIZ_PDF ? "pdf" : "svg");
    return 1;
}

static int c_pages(lua_State *L) {
    viz_canvas *c = check_canvas(L, "canvas:pages");
    lua_pushinteger(L, c->pages);
    return 1;
}

static int c_is_finished(lua_State *L) {
    viz_canvas *c = check_canvas(L, "canvas:is_finished");
    lua_pushboolean(L, c->finished);
    return 1;
}

/* c:new_page(): PDF: the next page; SVG file: the next page goes to
 * "<stem>-N.svg" (SVG 1.1 has one page per document); PNG: an error. */
static int c_new_page(lua_State *L) {
    const char *fn = "canvas:new_page";
    viz_canvas *c = check_live(L, fn);
    if (c->format == VIZ_PNG)
        fail(L, fn, "PNG holds one page ('%s'); use a .pdf (or .svg) path for several pages", c->path);
    if (c->format == VIZ_PDF) {
        cairo_show_page(c->cr);
        check_cairo(L, c, fn);
        c->pages++;
        return 0;
    }
    if (!c->path) fail(L, fn, "an SVG stream (viz.svg_string) holds one page");
    if (c->depth > 0)
        fail(L, fn, "SVG pages are separate files: close the %d open save_state/clip first", c->depth);
    /* next file name: stem-N.svg */
    const char *dot = strrchr(c->path, '.');
    size_t stem = (size_t)(dot - c->path);
    char *next = malloc(stem + 32);
    if (!next) fail(L, fn, "out of memory");
    snprintf(next, stem + 32, "%.*s-%d%s", (int)stem, c->path, c->pages + 1, dot);
    FILE *f = fopen(next, "wb");
    if (!f) {
        char e[256];
        snprintf(e, sizeof e, "%s", strerror(errno));
        free(next);
        fail(L, fn, "cannot write the next SVG page: %s", e);
    }
    fclose(f);
    /* keep the current colour on the new page */
    cairo_pattern_t *src = cairo_pattern_reference(cairo_get_source(c->cr));
    drop_layout(c);
    cairo_status_t st = cairo_status(c->cr);
    cairo_destroy(c->cr);
    c->cr = NULL;
    cairo_surface_finish(c->surface);
    if (st == CAIRO_STATUS_SUCCESS) st = cairo_surface_status(c->surface);
    cairo_surface_destroy(c->surface);
    c->surface = NULL;
    if (st != CAIRO_STATUS_SUCCESS) {
        cairo_pattern_destroy(src);
        c->finished = 1;
        char e[512];
        snprintf(e, sizeof e, "could not write '%s': %s", c->page_path, cairo_status_to_string(st));
        free(next);
        fail(L, fn, "%s", e);
    }
    free(c->page_path);
    c->page_path = next;
    st = open_surface(c, next);
    if (st != CAIRO_STATUS_SUCCESS) {
        cairo_pattern_destroy(src);
        char msg[256];
        viz_canvas_close(c, msg, sizeof msg);
        fail(L, fn, "cannot create '%s': %s", next, cairo_status_to_string(st));
    }
    cairo_set_source(c->cr, src);
    cairo_pattern_destroy(src);
    c->pages++;
    return 0;
}

/* ---------------------------------------------------------------- state */

/* c:color(r, g, b[, a]) | c:color("#rrggbb") | c:color({r, g, b[, a]}) */
static int c_color(lua_State *L) {
    const char *fn = "canvas:color";
    viz_canvas *c = check_live(L, fn);
    double rgba[4] = {0, 0, 0, 1};
    if (lua_type(L, 2) == LUA_TNUMBER) {
        static const char *names[] = {"r", "g", "b", "a"};
        int n = lua_isnoneornil(L, 5) ? 3 : 4;
        for (int i = 0; i < n; i++) {
            double v = check_num(L, 2 + i, fn, names[i]);
            if (v < 0 || v > 1) fail(L, fn, "argument '%s' must be in 0..1, got %g", names[i], v);
            rgba[i] = v;
        }
    } else if (lua_type(L, 2) == LUA_TSTRING || lua_istable(L, 2)) {
        check_color_value(L, 2, fn, "color", rgba);
    } else {
        fail(L, fn, "expected (r, g, b[, a]) in 0..1, \"#rrggbb\" or {r, g, b[, a]}, got %s", tname(L, 2));
    }
    cairo_set_source_rgba(c->cr, rgba[0], rgba[1], rgba[2], rgba[3]);
    return 0;
}

static int c_save_state(lua_State *L) {
    const char *fn = "canvas:save_state";
    viz_canvas *c = check_live(L, fn);
    if (c->depth >= VIZ_MAX_STACK) fail(L, fn, "too many nested save_state/clip calls (%d)", VIZ_MAX_STACK);
    c->stack[c->depth++] = 's';
    cairo_save(c->cr);
    return 0;
}

static int c_restore_state(lua_State *L) {
    const char *fn = "canvas:restore_state";
    viz_canvas *c = check_live(L, fn);
    if (c->depth == 0) fail(L, fn, "no save_state to restore");
    if (c->stack[c->depth - 1] != 's') fail(L, fn, "a clip is open above the last save_state; call unclip first");
    c->depth--;
    cairo_restore(c->cr);
    return 0;
}

static int c_clip(lua_State *L) {
    const char *fn = "canvas:clip";
    viz_canvas *c = check_live(L, fn);
    double x = check_num(L, 2, fn, "x"), y = check_num(L, 3, fn, "y");
    double w = check_num(L, 4, fn, "w"), h = check_num(L, 5, fn, "h");
    if (w < 0 || h < 0) fail(L, fn, "arguments 'w' and 'h' must not be negative, got %g, %g", w, h);
    if (c->depth >= VIZ_MAX_STACK) fail(L, fn, "too many nested save_state/clip calls (%d)", VIZ_MAX_STACK);
    c->stack[c->depth++] = 'c';
    cairo_save(c->cr);
    cairo_new_path(c->cr);
    cairo_rectangle(c->cr, x, y, w, h);
    cairo_clip(c->cr);
    check_cairo(L, c, fn);
    return 0;
}

/* c:unclip(): removes the last clip; the current colour is kept. */
static int c_unclip(lua_State *L) {
    const char *fn = "canvas:unclip";
    viz_canvas *c = check_live(L, fn);
    if (c->depth == 0) fail(L, fn, "no clip to remove");
    if (c->stack[c->depth - 1] != 'c') fail(L, fn, "a save_state is open above the last clip; call restore_state first");
    c->depth--;
    cairo_pattern_t *src = cairo_pattern_reference(cairo_get_source(c->cr));
    cairo_restore(c->cr);
    cairo_set_source(c->cr, src);
    cairo_pattern_destroy(src);
    return 0;
}

/* ---------------------------------------------------------------- shapes */

static const char *const rect_keys[] = {"fill", "stroke", "line_width", "color", "stroke_color", "dash", "radius", NULL};

static void stroke_with(viz_canvas *c, double width, const double *dash, int ndash) {
    cairo_set_line_width(c->cr, width);
    cairo_set_dash(c->cr, dash, ndash, 0);
    cairo_stroke(c->cr);
    cairo_set_dash(c->cr, NULL, 0, 0);
}

static void rounded_rect(cairo_t *cr, double x, double y, double w, double h, double r) {
    if (r <= 0) { cairo_rectangle(cr, x, y, w, h); return; }
    if (r > fabs(w) / 2) r = fabs(w) / 2;
    if (r > fabs(h) / 2) r = fabs(h) / 2;
    if (w < 0) { x += w; w = -w; }
    if (h < 0) { y += h; h = -h; }
    cairo_new_sub_path(cr);
    cairo_arc(cr, x + w - r, y + r, r, -M_PI / 2, 0);
    cairo_arc(cr, x + w - r, y + h - r, r, 0, M_PI / 2);
    cairo_arc(cr, x + r, y + h - r, r, M_PI / 2, M_PI);
    cairo_arc(cr, x + r, y + r, r, M_PI, 3 * M_PI / 2);
    cairo_close_path(cr);
}

/* c:rect(x, y, w, h[, {fill=true, stroke=false, line_width=1, color=, stroke_color=, dash=, radius=}]) */
static int c_rect(lua_State *L) {
    const char *fn = "canvas:rect";
    viz_canvas *c = check_live(L, fn);
    double x = check_num(L, 2, fn, "x"), y = check_num(L, 3, fn, "y");
    double w = check_num(L, 4, fn, "w"), h = check_num(L, 5, fn, "h");
    int has = check_opts(L, 6, fn, rect_keys);
    int fill = opt_bool(L, 6, has, "fill", 1, fn);
    int stroke = opt_bool(L, 6, has, "stroke", 0, fn);
    double lw = opt_num(L, 6, has, "line_width", 1, 0, 1000, fn);
    double radius = opt_num(L, 6, has, "radius", 0, 0, 1e5, fn);
    double col[4], scol[4], dash[MAX_DASH];
    int has_col = opt_color(L, 6, has, "color", col, fn);
    int has_scol = opt_color(L, 6, has, "stroke_color", scol, fn);
    int ndash = opt_dash(L, 6, has, dash, fn);
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    rounded_rect(c->cr, x, y, w, h, radius);
    if (fill) {
        if (stroke) cairo_fill_preserve(c->cr);
        else cairo_fill(c->cr);
    }
    if (stroke) {
        src_guard g2 = {0};
        if (has_scol) push_color(c, scol, &g2);
        stroke_with(c, lw, dash, ndash);
        pop_color(c, &g2);
    }
    cairo_new_path(c->cr);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

static const char *const line_keys[] = {"width", "dash", "color", "cap", NULL};

static cairo_line_cap_t opt_cap(lua_State *L, int idx, int has, const char *fn) {
    char buf[16];
    const char *cap = opt_str(L, idx, has, "cap", "butt", buf, sizeof buf, fn);
    if (strcmp(cap, "butt") == 0) return CAIRO_LINE_CAP_BUTT;
    if (strcmp(cap, "round") == 0) return CAIRO_LINE_CAP_ROUND;
    if (strcmp(cap, "square") == 0) return CAIRO_LINE_CAP_SQUARE;
    fail(L, fn, "option 'cap' must be \"butt\", \"round\" or \"square\", got '%s'", cap);
    return CAIRO_LINE_CAP_BUTT;
}

/* c:line(x1, y1, x2, y2[, {width=1, dash=, color=, cap=}]) */
static int c_line(lua_State *L) {
    const char *fn = "canvas:line";
    viz_canvas *c = check_live(L, fn);
    double x1 = check_num(L, 2, fn, "x1"), y1 = check_num(L, 3, fn, "y1");
    double x2 = check_num(L, 4, fn, "x2"), y2 = check_num(L, 5, fn, "y2");
    int has = check_opts(L, 6, fn, line_keys);
    double lw = opt_num(L, 6, has, "width", 1, 0, 1000, fn);
    double col[4], dash[MAX_DASH];
    int has_col = opt_color(L, 6, has, "color", col, fn);
    int ndash = opt_dash(L, 6, has, dash, fn);
    cairo_line_cap_t cap = opt_cap(L, 6, has, fn);
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    cairo_move_to(c->cr, x1, y1);
    cairo_line_to(c->cr, x2, y2);
    cairo_set_line_cap(c->cr, cap);
    stroke_with(c, lw, dash, ndash);
    cairo_set_line_cap(c->cr, CAIRO_LINE_CAP_BUTT);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

static const char *const poly_keys[] = {"close", "fill", "stroke", "width", "dash", "color", "stroke_color", "cap", NULL};

/* c:polyline({x1, y1, x2, y2, ...}[, {close=false, fill=false, stroke=true, width=1, dash=, color=}]) */
static int c_polyline(lua_State *L) {
    const char *fn = "canvas:polyline";
    viz_canvas *c = check_live(L, fn);
    if (!lua_istable(L, 2)) fail(L, fn, "argument 'points' must be a flat table {x1, y1, x2, y2, ...}, got %s", tname(L, 2));
    int n = (int)lua_objlen(L, 2);
    if (n < 4 || n % 2 != 0)
        fail(L, fn, "argument 'points' must hold an even number of coordinates, at least 2 points, got %d numbers", n);
    int has = check_opts(L, 3, fn, poly_keys);
    int close = opt_bool(L, 3, has, "close", 0, fn);
    int fill = opt_bool(L, 3, has, "fill", 0, fn);
    int stroke = opt_bool(L, 3, has, "stroke", !fill, fn);
    double lw = opt_num(L, 3, has, "width", 1, 0, 1000, fn);
    double col[4], scol[4], dash[MAX_DASH];
    int has_col = opt_color(L, 3, has, "color", col, fn);
    int has_scol = opt_color(L, 3, has, "stroke_color", scol, fn);
    int ndash = opt_dash(L, 3, has, dash, fn);
    cairo_line_cap_t cap = opt_cap(L, 3, has, fn);
    double *pts = malloc(sizeof(double) * (size_t)n);
    if (!pts) fail(L, fn, "out of memory for %d points", n / 2);
    for (int i = 0; i < n; i++) {
        lua_rawgeti(L, 2, i + 1);
        int ok = lua_type(L, -1) == LUA_TNUMBER;
        double v = lua_tonumber(L, -1);
        lua_pop(L, 1);
        if (!ok || !isfinite(v) || fabs(v) > MAX_COORD) {
            free(pts);
            fail(L, fn, "argument 'points'[%d] must be a finite number within +-%g", i + 1, MAX_COORD);
        }
        pts[i] = v;
    }
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    cairo_move_to(c->cr, pts[0], pts[1]);
    for (int i = 2; i < n; i += 2) cairo_line_to(c->cr, pts[i], pts[i + 1]);
    free(pts);
    if (close || fill) cairo_close_path(c->cr);
    if (fill) {
        if (stroke) cairo_fill_preserve(c->cr);
        else cairo_fill(c->cr);
    }
    if (stroke) {
        src_guard g2 = {0};
        if (has_scol) push_color(c, scol, &g2);
        cairo_set_line_cap(c->cr, cap);
        stroke_with(c, lw, dash, ndash);
        cairo_set_line_cap(c->cr, CAIRO_LINE_CAP_BUTT);
        pop_color(c, &g2);
    }
    cairo_new_path(c->cr);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

static const char *const circle_keys[] = {"fill", "stroke", "width", "color", "stroke_color", NULL};

/* c:circle(x, y, r[, {fill=true, stroke=false, width=1, color=, stroke_color=}]) */
static int c_circle(lua_State *L) {
    const char *fn = "canvas:circle";
    viz_canvas *c = check_live(L, fn);
    double x = check_num(L, 2, fn, "x"), y = check_num(L, 3, fn, "y"), r = check_num(L, 4, fn, "r");
    if (r < 0) fail(L, fn, "argument 'r' must not be negative, got %g", r);
    int has = check_opts(L, 5, fn, circle_keys);
    int fill = opt_bool(L, 5, has, "fill", 1, fn);
    int stroke = opt_bool(L, 5, has, "stroke", !fill, fn);
    double lw = opt_num(L, 5, has, "width", 1, 0, 1000, fn);
    double col[4], scol[4];
    int has_col = opt_color(L, 5, has, "color", col, fn);
    int has_scol = opt_color(L, 5, has, "stroke_color", scol, fn);
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    cairo_arc(c->cr, x, y, r, 0, 2 * M_PI);
    cairo_close_path(c->cr);
    if (fill) {
        if (stroke) cairo_fill_preserve(c->cr);
        else cairo_fill(c->cr);
    }
    if (stroke) {
        src_guard g2 = {0};
        if (has_scol) push_color(c, scol, &g2);
        stroke_with(c, lw, NULL, 0);
        pop_color(c, &g2);
    }
    cairo_new_path(c->cr);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

static const char *const curve_keys[] = {"width", "dash", "color", NULL};

/* c:curve(x1, y1, c1x, c1y, c2x, c2y, x2, y2[, {width=1, dash=, color=}]): a cubic bezier */
static int c_curve(lua_State *L) {
    const char *fn = "canvas:curve";
    viz_canvas *c = check_live(L, fn);
    static const char *names[] = {"x1", "y1", "c1x", "c1y", "c2x", "c2y", "x2", "y2"};
    double p[8];
    for (int i = 0; i < 8; i++) p[i] = check_num(L, 2 + i, fn, names[i]);
    int has = check_opts(L, 10, fn, curve_keys);
    double lw = opt_num(L, 10, has, "width", 1, 0, 1000, fn);
    double col[4], dash[MAX_DASH];
    int has_col = opt_color(L, 10, has, "color", col, fn);
    int ndash = opt_dash(L, 10, has, dash, fn);
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    cairo_move_to(c->cr, p[0], p[1]);
    cairo_curve_to(c->cr, p[2], p[3], p[4], p[5], p[6], p[7]);
    stroke_with(c, lw, dash, ndash);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

static const char *const ribbon_keys[] = {"color", "curvature", NULL};

/* c:ribbon(x1, y1a, y1b, x2, y2a, y2b[, {color=, curvature=0.5}]): a filled band
 * from the span [y1a, y1b] at x1 to [y2a, y2b] at x2 with bezier edges. */
static int c_ribbon(lua_State *L) {
    const char *fn = "canvas:ribbon";
    viz_canvas *c = check_live(L, fn);
    static const char *names[] = {"x1", "y1a", "y1b", "x2", "y2a", "y2b"};
    double p[6];
    for (int i = 0; i < 6; i++) p[i] = check_num(L, 2 + i, fn, names[i]);
    int has = check_opts(L, 8, fn, ribbon_keys);
    double k = opt_num(L, 8, has, "curvature", 0.5, 0, 1, fn);
    double col[4];
    int has_col = opt_color(L, 8, has, "color", col, fn);
    double x1 = p[0], x2 = p[3], dx = (x2 - x1) * k;
    src_guard g = {0};
    if (has_col) push_color(c, col, &g);
    cairo_new_path(c->cr);
    cairo_move_to(c->cr, x1, p[1]);
    cairo_curve_to(c->cr, x1 + dx, p[1], x2 - dx, p[4], x2, p[4]);
    cairo_line_to(c->cr, x2, p[5]);
    cairo_curve_to(c->cr, x2 - dx, p[5], x1 + dx, p[2], x1, p[2]);
    cairo_close_path(c->cr);
    cairo_fill(c->cr);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

/* ------------------------------------------------------------------ text */

static const char *const text_keys[] = {"size", "bold", "italic", "font", "align", "valign", "rotate",
                                        "color", "markup", "width", NULL};

typedef struct {
    double size, rotate, wrap;
    int bold, italic, markup;
    char font[128];
    int align;    /* 0 left, 1 center, 2 right */
    int valign;   /* 0 top, 1 middle, 2 bottom, 3 baseline */
    int has_color;
    double color[4];
} text_opts;

static void parse_text_opts(lua_State *L, int idx, const char *fn, text_opts *o) {
    int has = check_opts(L, idx, fn, text_keys);
    o->size = opt_num(L, idx, has, "size", 10, 0.5, 1000, fn);
    o->bold = opt_bool(L, idx, has, "bold", 0, fn);
    o->italic = opt_bool(L, idx, has, "italic", 0, fn);
    o->markup = opt_bool(L, idx, has, "markup", 0, fn);
    o->rotate = opt_num(L, idx, has, "rotate", 0, -36000, 36000, fn);
    o->wrap = opt_num(L, idx, has, "width", 0, 0, MAX_UNITS, fn);
    const char *font = opt_str(L, idx, has, "font", "Sans", o->font, sizeof o->font, fn);
    if (font != o->font) snprintf(o->font, sizeof o->font, "%s", font);
    char buf[16];
    const char *a = opt_str(L, idx, has, "align", "left", buf, sizeof buf, fn);
    if (strcmp(a, "left") == 0) o->align = 0;
    else if (strcmp(a, "center") == 0 || strcmp(a, "centre") == 0) o->align = 1;
    else if (strcmp(a, "right") == 0) o->align = 2;
    else fail(L, fn, "option 'align' must be \"left\", \"center\" or \"right\", got '%s'", a);
    const char *v = opt_str(L, idx, has, "valign", "baseline", buf, sizeof buf, fn);
    if (strcmp(v, "top") == 0) o->valign = 0;
    else if (strcmp(v, "middle") == 0 || strcmp(v, "center") == 0) o->valign = 1;
    else if (strcmp(v, "bottom") == 0) o->valign = 2;
    else if (strcmp(v, "baseline") == 0) o->valign = 3;
    else fail(L, fn, "option 'valign' must be \"top\", \"middle\", \"bottom\" or \"baseline\", got '%s'", v);
    o->has_color = opt_color(L, idx, has, "color", o->color, fn);
}

static const char *check_text(lua_State *L, int idx, const char *fn, int markup) {
    if (lua_type(L, idx) != LUA_TSTRING && lua_type(L, idx) != LUA_TNUMBER)
        fail(L, fn, "argument 's' must be a string, got %s", tname(L, idx));
    size_t n;
    const char *s = lua_tolstring(L, idx, &n);
    if (strlen(s) != n) fail(L, fn, "argument 's' contains a NUL byte");
    if (!g_utf8_validate(s, (gssize)n, NULL)) fail(L, fn, "argument 's' is not valid UTF-8");
    if (markup) {
        GError *err = NULL;
        if (!pango_parse_markup(s, (int)n, 0, NULL, NULL, NULL, &err)) {
            char msg[256];
            snprintf(msg, sizeof msg, "%s", err ? err->message : "invalid markup");
            if (err) g_error_free(err);
            fail(L, fn, "argument 's' is not valid pango markup: %s", msg);
        }
    }
    return s;
}

static PangoLayout *layout_for(viz_canvas *c) {
    if (!c->layout) {
        c->layout = pango_cairo_create_layout(c->cr);
        PangoContext *ctx = pango_layout_get_context(c->layout);
        cairo_font_options_t *fo = cairo_font_options_create();
        /* the same metrics on every surface: no hinting of positions */
        cairo_font_options_set_hint_metrics(fo, CAIRO_HINT_METRICS_OFF);
        cairo_font_options_set_hint_style(fo, CAIRO_HINT_STYLE_NONE);
        cairo_font_options_set_antialias(fo, CAIRO_ANTIALIAS_GRAY);
        pango_cairo_context_set_font_options(ctx, fo);
        cairo_font_options_destroy(fo);
    }
    pango_cairo_update_layout(c->cr, c->layout);
    return c->layout;
}

static void setup_layout(PangoLayout *layout, const char *s, const text_opts *o) {
    PangoFontDescription *d = pango_font_description_from_string(o->font);
    pango_font_description_set_absolute_size(d, o->size * PANGO_SCALE);
    if (o->bold) pango_font_description_set_weight(d, PANGO_WEIGHT_BOLD);
    if (o->italic) pango_font_description_set_style(d, PANGO_STYLE_ITALIC);
    pango_layout_set_font_description(layout, d);
    pango_font_description_free(d);
    pango_layout_set_alignment(layout, o->align == 0 ? PANGO_ALIGN_LEFT : o->align == 1 ? PANGO_ALIGN_CENTER : PANGO_ALIGN_RIGHT);
    pango_layout_set_width(layout, o->wrap > 0 ? (int)(o->wrap * PANGO_SCALE) : -1);
    pango_layout_set_wrap(layout, PANGO_WRAP_WORD_CHAR);
    if (o->markup) pango_layout_set_markup(layout, s, -1);
    else {
        pango_layout_set_attributes(layout, NULL);
        pango_layout_set_text(layout, s, -1);
    }
}

/* c:text(x, y, s[, {size=10, bold=, italic=, font="Sans", align="left", valign="baseline",
 * rotate=degrees counter-clockwise, color=, markup=false, width= (wrap)}]) */
static int c_text(lua_State *L) {
    const char *fn = "canvas:text";
    viz_canvas *c = check_live(L, fn);
    double x = check_num(L, 2, fn, "x"), y = check_num(L, 3, fn, "y");
    text_opts o;
    parse_text_opts(L, 5, fn, &o);
    const char *s = check_text(L, 4, fn, o.markup);
    src_guard g = {0};
    if (o.has_color) push_color(c, o.color, &g);
    cairo_save(c->cr);
    cairo_translate(c->cr, x, y);
    if (o.rotate != 0) cairo_rotate(c->cr, -o.rotate * M_PI / 180.0);
    PangoLayout *layout = layout_for(c);
    setup_layout(layout, s, &o);
    PangoRectangle ink, logical;
    pango_layout_get_extents(layout, &ink, &logical);
    double lx = logical.x / (double)PANGO_SCALE, ly = logical.y / (double)PANGO_SCALE;
    double w = logical.width / (double)PANGO_SCALE, h = logical.height / (double)PANGO_SCALE;
    double base = pango_layout_get_baseline(layout) / (double)PANGO_SCALE;
    double dx = o.align == 0 ? -lx : o.align == 1 ? -(lx + w / 2) : -(lx + w);
    double dy = o.valign == 0 ? -ly : o.valign == 1 ? -(ly + h / 2) : o.valign == 2 ? -(ly + h) : -base;
    cairo_move_to(c->cr, dx, dy);
    pango_cairo_show_layout(c->cr, layout);
    cairo_new_path(c->cr);
    cairo_restore(c->cr);
    pop_color(c, &g);
    check_cairo(L, c, fn);
    return 0;
}

/* c:text_extent(s[, opts]) -> width, height, baseline (unrotated, in units) */
static int c_text_extent(lua_State *L) {
    const char *fn = "canvas:text_extent";
    viz_canvas *c = check_live(L, fn);
    text_opts o;
    parse_text_opts(L, 3, fn, &o);
    const char *s = check_text(L, 2, fn, o.markup);
    cairo_save(c->cr);
    cairo_identity_matrix(c->cr);
    if (c->format == VIZ_PNG) cairo_scale(c->cr, c->scale, c->scale);
    PangoLayout *layout = layout_for(c);
    setup_layout(layout, s, &o);
    PangoRectangle logical;
    pango_layout_get_extents(layout, NULL, &logical);
    double base = pango_layout_get_baseline(layout) / (double)PANGO_SCALE;
    cairo_restore(c->cr);
    lua_pushnumber(L, logical.width / (double)PANGO_SCALE);
    lua_pushnumber(L, logical.height / (double)PANGO_SCALE);
    lua_pushnumber(L, base);
    return 3;
}

/* ------------------------------------------------------------- register */

static const luaL_Reg methods[] = {
    {"color", c_color},
    {"rect", c_rect},
    {"line", c_line},
    {"polyline", c_polyline},
    {"circle", c_circle},
    {"curve", c_curve},
    {"ribbon", c_ribbon},
    {"text", c_text},
    {"text_extent", c_text_extent},
    {"clip", c_clip},
    {"unclip", c_unclip},
    {"save_state", c_save_state},
    {"restore_state", c_restore_state},
    {"new_page", c_new_page},
    {"finish", c_finish},
    {"size", c_size},
    {"format", c_format},
    {"pages", c_pages},
    {"is_finished", c_is_finished},
    {NULL, NULL},
};

void viz_canvas_register(lua_State *L) {
    luaL_newmetatable(L, VIZ_CANVAS_MT);
    lua_newtable(L);
    luaL_register(L, NULL, methods);
    lua_setfield(L, -2, "__index");
    lua_pushcfunction(L, c_gc);
    lua_setfield(L, -2, "__gc");
    lua_pushcfunction(L, c_tostring);
    lua_setfield(L, -2, "__tostring");
    lua_pushliteral(L, "moelab.viz.canvas");
    lua_setfield(L, -2, "__name");
    lua_pushboolean(L, 0);
    lua_setfield(L, -2, "__metatable");
    lua_pop(L, 1);
}
