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
#include "canvas_internal.h"


static const char *format_name(enum viz_format f) {
    return f == VIZ_PNG ? "PNG" : f == VIZ_PDF ? "PDF" : "SVG";
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
