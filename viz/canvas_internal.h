/* Private to the canvas files of moelab.viz: argument checks and colour
 * helpers shared by canvas.c (lifecycle, state) and draw.c (shapes, text).
 * Hidden symbols: they never interpose with the host program's. */
#ifndef MOELAB_VIZ_CANVAS_INTERNAL_H
#define MOELAB_VIZ_CANVAS_INTERNAL_H

#include "viz.h"

#define VIZ_INTERNAL __attribute__((visibility("hidden")))
#define MAX_PNG_SIDE 32767.0
#define MAX_PNG_PIXELS (1 << 27)     /* 128 Mpixel, 512 MiB as ARGB32 */
#define MAX_UNITS 1.0e5               /* a canvas side in units (points) */
#define MAX_COORD 1.0e6               /* any coordinate or length */
#define MAX_DASH 16

typedef struct { cairo_pattern_t *saved; } src_guard;

VIZ_INTERNAL int fail(lua_State *L, const char *fn, const char *fmt, ...);
VIZ_INTERNAL const char *tname(lua_State *L, int idx);
VIZ_INTERNAL double check_num(lua_State *L, int idx, const char *fn, const char *arg);
VIZ_INTERNAL int check_opts(lua_State *L, int idx, const char *fn, const char *const *allowed);
VIZ_INTERNAL int opt_bool(lua_State *L, int idx, int has, const char *key, int def, const char *fn);
VIZ_INTERNAL double opt_num(lua_State *L, int idx, int has, const char *key, double def, double lo, double hi, const char *fn);
VIZ_INTERNAL const char *opt_str(lua_State *L, int idx, int has, const char *key, const char *def, char *buf, size_t size, const char *fn);
VIZ_INTERNAL void check_color_value(lua_State *L, int idx, const char *fn, const char *arg, double rgba[4]);
VIZ_INTERNAL int opt_color(lua_State *L, int idx, int has, const char *key, double rgba[4], const char *fn);
VIZ_INTERNAL int opt_dash(lua_State *L, int idx, int has, double dash[MAX_DASH], const char *fn);
VIZ_INTERNAL viz_canvas *check_canvas(lua_State *L, const char *fn);
VIZ_INTERNAL const char *where(viz_canvas *c);
VIZ_INTERNAL viz_canvas *check_live(lua_State *L, const char *fn);
VIZ_INTERNAL void check_cairo(lua_State *L, viz_canvas *c, const char *fn);
VIZ_INTERNAL void push_color(viz_canvas *c, const double rgba[4], src_guard *g);
VIZ_INTERNAL void pop_color(viz_canvas *c, src_guard *g);

/* drawing methods (draw.c) */
VIZ_INTERNAL int c_rect(lua_State *L);
VIZ_INTERNAL int c_line(lua_State *L);
VIZ_INTERNAL int c_polyline(lua_State *L);
VIZ_INTERNAL int c_circle(lua_State *L);
VIZ_INTERNAL int c_curve(lua_State *L);
VIZ_INTERNAL int c_ribbon(lua_State *L);
VIZ_INTERNAL int c_text(lua_State *L);
VIZ_INTERNAL int c_text_extent(lua_State *L);

#endif
