/* The canvas's drawing methods: shapes (rect, line, polyline, circle, curve,
 * ribbon) and text through pango. */
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
VIZ_INTERNAL int c_rect(lua_State *L) {
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
VIZ_INTERNAL int c_line(lua_State *L) {
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
VIZ_INTERNAL int c_polyline(lua_State *L) {
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
VIZ_INTERNAL int c_circle(lua_State *L) {
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
VIZ_INTERNAL int c_curve(lua_State *L) {
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
VIZ_INTERNAL int c_ribbon(lua_State *L) {
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
VIZ_INTERNAL int c_text(lua_State *L) {
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
VIZ_INTERNAL int c_text_extent(lua_State *L) {
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
