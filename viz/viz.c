/* The moelab.viz module: viz.canvas (canvas.c), viz.svg_string (draw into an
 * in-memory SVG and return its text, for inline HTML) and viz.png_stats (what
 * a PNG holds: size, distinct colours, the share of pixels drawn over the
 * background; the tests use it to tell a figure from a blank page). */
#include <errno.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include "viz.h"

#define BUF_MT "moelab.viz.buffer"

static int buf_gc(lua_State *L) {
    viz_buf *b = luaL_testudata(L, 1, BUF_MT);
    if (b) { free(b->data); b->data = NULL; b->len = b->cap = 0; }
    return 0;
}

/* viz.svg_string(width, height, draw_fn) -> the SVG document as a string;
 * draw_fn(c) draws on a canvas of width x height units. */
static int l_svg_string(lua_State *L) {
    const char *fn = "viz.svg_string";
    double wh[2];
    static const char *names[] = {"width", "height"};
    for (int i = 0; i < 2; i++) {
        if (lua_type(L, 1 + i) != LUA_TNUMBER)
            return luaL_error(L, "%s: argument '%s' must be a number, got %s", fn, names[i], luaL_typename(L, 1 + i));
        wh[i] = lua_tonumber(L, 1 + i);
        if (!(wh[i] >= 1 && wh[i] <= 1e5))
            return luaL_error(L, "%s: argument '%s' must be in [1, 100000], got %f", fn, names[i], wh[i]);
    }
    if (!lua_isfunction(L, 3))
        return luaL_error(L, "%s: argument 'draw_fn' must be a function(c), got %s", fn, luaL_typename(L, 3));
    lua_settop(L, 3);
    viz_buf *b = lua_newuserdata(L, sizeof *b);               /* 4 */
    memset(b, 0, sizeof *b);
    luaL_getmetatable(L, BUF_MT);
    lua_setmetatable(L, -2);
    viz_canvas *c = viz_canvas_push_stream(L, wh[0], wh[1], b); /* 5 */
    lua_pushvalue(L, 3);
    lua_pushvalue(L, 5);
    int rc = lua_pcall(L, 1, 0, 0);
    char msg[256];
    const char *err = viz_canvas_close(c, msg, sizeof msg);
    c->stream = NULL;
    if (rc != 0) {
        const char *m = lua_tostring(L, -1);
        return luaL_error(L, "%s: draw_fn failed: %s", fn, m ? m : "(error object is not a string)");
    }
    if (err) return luaL_error(L, "%s: %s", fn, err);
    lua_pushlstring(L, b->data ? b->data : "", b->len);
    free(b->data);
    b->data = NULL;
    b->len = b->cap = 0;
    return 1;
}

/* ----------------------------------------------------------- png_stats */

typedef struct {
    uint64_t *keys;    /* pixel + 1; 0 = empty */
    uint32_t *counts;
    size_t cap, used;
} color_set;

static int set_grow(color_set *s) {
    size_t cap = s->cap ? s->cap * 2 : 4096;
    uint64_t *keys = calloc(cap, sizeof *keys);
    uint32_t *counts = calloc(cap, sizeof *counts);
    if (!keys || !counts) { free(keys); free(counts); return -1; }
    for (size_t i = 0; i < s->cap; i++) {
        if (!s->keys[i]) continue;
        size_t h = (size_t)((s->keys[i] * 0x9E3779B97F4A7C15ull) >> 20) & (cap - 1);
        while (keys[h]) h = (h + 1) & (cap - 1);
        keys[h] = s->keys[i];
        counts[h] = s->counts[i];
    }
    free(s->keys);
    free(s->counts);
    s->keys = keys;
    s->counts = counts;
    s->cap = cap;
    return 0;
}

static int set_add(color_set *s, uint32_t px) {
    if ((s->used + 1) * 2 > s->cap && set_grow(s) != 0) return -1;
    uint64_t k = (uint64_t)px + 1;
    size_t h = (size_t)((k * 0x9E3779B97F4A7C15ull) >> 20) & (s->cap - 1);
    while (s->keys[h] && s->keys[h] != k) h = (h + 1) & (s->cap - 1);
    if (!s->keys[h]) { s->keys[h] = k; s->used++; }
    s->counts[h]++;
    return 0;
}

/* viz.png_stats(path) -> {width=, height=, distinct_colors=, drawn_fraction=,
 * background="#rrggbbaa"}: background is the most common colour, and
 * drawn_fraction the share of pixels of any other colour. */
static int l_png_stats(lua_State *L) {
    const char *fn = "viz.png_stats";
    if (lua_type(L, 1) != LUA_TSTRING)
        return luaL_error(L, "%s: argument 'path' must be a string, got %s", fn, luaL_typename(L, 1));
    const char *path = lua_tostring(L, 1);
    FILE *f = fopen(path, "rb");
    if (!f) return luaL_error(L, "%s: cannot read '%s': %s", fn, path, strerror(errno));
    fclose(f);
    cairo_surface_t *img = cairo_image_surface_create_from_png(path);
    cairo_status_t st = cairo_surface_status(img);
    if (st != CAIRO_STATUS_SUCCESS) {
        cairo_surface_destroy(img);
        return luaL_error(L, "%s: '%s' is not a readable PNG: %s", fn, path, cairo_status_to_string(st));
    }
    int w = cairo_image_surface_get_width(img), h = cairo_image_surface_get_height(img);
    cairo_format_t fmt = cairo_image_surface_get_format(img);
    cairo_surface_t *argb = img;
    if (fmt != CAIRO_FORMAT_ARGB32 && fmt != CAIRO_FORMAT_RGB24) {
        argb = cairo_image_surface_create(CAIRO_FORMAT_ARGB32, w, h);
        cairo_t *cr = cairo_create(argb);
        cairo_set_source_surface(cr, img, 0, 0);
        cairo_set_operator(cr, CAIRO_OPERATOR_SOURCE);
        cairo_paint(cr);
        cairo_destroy(cr);
        cairo_surface_destroy(img);
        fmt = CAIRO_FORMAT_ARGB32;
    }
    cairo_surface_flush(argb);
    const unsigned char *data = cairo_image_surface_get_data(argb);
    int stride = cairo_image_surface_get_stride(argb);
    uint32_t opaque = fmt == CAIRO_FORMAT_RGB24 ? 0xFF000000u : 0;
    color_set set = {0};
    int oom = data == NULL;
    for (int y = 0; y < h && !oom; y++) {
        const uint32_t *row = (const uint32_t *)(data + (size_t)y * stride);
        for (int x = 0; x < w; x++) {
            if (set_add(&set, row[x] | opaque) != 0) { oom = 1; break; }
        }
    }
    cairo_surface_destroy(argb);
    if (oom) {
        free(set.keys);
        free(set.counts);
        return luaL_error(L, "%s: out of memory reading '%s'", fn, path);
    }
    uint32_t best = 0, best_count = 0;
    for (size_t i = 0; i < set.cap; i++) {
        if (set.keys[i] && set.counts[i] > best_count) {
            best_count = set.counts[i];
            best = (uint32_t)(set.keys[i] - 1);
        }
    }
    size_t distinct = set.used;
    free(set.keys);
    free(set.counts);
    double total = (double)w * (double)h;
    lua_createtable(L, 0, 5);
    lua_pushinteger(L, w);
    lua_setfield(L, -2, "width");
    lua_pushinteger(L, h);
    lua_setfield(L, -2, "height");
    lua_pushinteger(L, (lua_Integer)distinct);
    lua_setfield(L, -2, "distinct_colors");
    lua_pushnumber(L, total > 0 ? (total - best_count) / total : 0);
    lua_setfield(L, -2, "drawn_fraction");
    /* premultiplied ARGB -> "#rrggbbaa" */
    unsigned a = best >> 24, r = (best >> 16) & 255, g = (best >> 8) & 255, bl = best & 255;
    if (a > 0 && a < 255) { r = r * 255 / a; g = g * 255 / a; bl = bl * 255 / a; }
    char hex[16];
    snprintf(hex, sizeof hex, "#%02x%02x%02x%02x", r, g, bl, a);
    lua_pushstring(L, hex);
    lua_setfield(L, -2, "background");
    return 1;
}

static int l_versions(lua_State *L) {
    lua_pushstring(L, cairo_version_string());
    lua_pushstring(L, pango_version_string());
    return 2;
}

static const luaL_Reg funcs[] = {
    {"canvas", viz_canvas_new},
    {"svg_string", l_svg_string},
    {"png_stats", l_png_stats},
    {"versions", l_versions},
    {NULL, NULL},
};

int luaopen_moelab_viz(lua_State *L);
__attribute__((visibility("default"))) int luaopen_moelab_viz(lua_State *L) {
    viz_canvas_register(L);
    luaL_newmetatable(L, BUF_MT);
    lua_pushcfunction(L, buf_gc);
    lua_setfield(L, -2, "__gc");
    lua_pop(L, 1);
    lua_newtable(L);
    luaL_register(L, NULL, funcs);
    lua_pushliteral(L, "png pdf svg");
    lua_setfield(L, -2, "formats");
    return 1;
}
