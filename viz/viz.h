/* moelab.viz: cairo + pango drawing for Lua, built as its own shared object
 * (lib/moelab/viz.so) so the engine never needs cairo. The module links
 * against cairo and pango only; the Lua C API comes from the host program
 * (moelab is linked with -Wl,-E).
 *
 * canvas.c  the canvas userdata (PNG, PDF, SVG files or an SVG stream)
 * viz.c     the module table: canvas, svg_string, png_stats
 */
#ifndef MOELAB_VIZ_H
#define MOELAB_VIZ_H

#include <stddef.h>
#include <cairo.h>
#include <pango/pangocairo.h>
#include "lua.h"
#include "lauxlib.h"

#define VIZ_CANVAS_MT "moelab.viz.canvas"

enum viz_format { VIZ_PNG, VIZ_PDF, VIZ_SVG };

/* Growable byte buffer, the target of an SVG stream. */
typedef struct {
    char *data;
    size_t len, cap;
    int failed;
} viz_buf;

#define VIZ_MAX_STACK 64

typedef struct {
    cairo_surface_t *surface;
    cairo_t *cr;
    PangoLayout *layout;
    enum viz_format format;
    char *path;            /* NULL for a stream canvas */
    char *page_path;       /* SVG: the file the current page goes to */
    viz_buf *stream;       /* SVG stream target (svg_string) */
    double width, height, scale;
    int finished;
    int pages;
    int depth;             /* save/clip stack depth */
    char stack[VIZ_MAX_STACK]; /* 's' save_state, 'c' clip */
} viz_canvas;

/* canvas.c */
void viz_canvas_register(lua_State *L);
int viz_canvas_new(lua_State *L);
/* Creates a stream canvas (SVG into buf) and pushes it. */
viz_canvas *viz_canvas_push_stream(lua_State *L, double w, double h, viz_buf *buf);
/* Finishes the canvas; returns NULL or an error message (static or in msg). */
const char *viz_canvas_close(viz_canvas *c, char *msg, size_t msgsize);

#endif
