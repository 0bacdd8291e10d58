/* The built-in synthetic corpus generator (see corpus.h).
 *
 * Randomness: document i draws from Philox blocks (key, counter) with key =
 * moe_rng_key(seed, MOE_RNG_DATA) and counters starting at i << 20, so each
 * document is a pure function of (seed, i) and no two documents share draws.
 * Integer choices need all 32 bits of a lane (moe_rng_uniform_at keeps 24),
 * and using the four lanes of one block makes generation 4x cheaper, so the
 * generator calls the block function directly; the result is still defined
 * only by integer arithmetic and is identical on every platform. */
#include "corpus.h"

#include "../core/rng.h"

#include <stdlib.h>
#include <string.h>

/* -------------------------------------------------------------- drawing -- */

typedef struct {
    uint64_t key, counter;
    moe_philox_block blk;
    int lane;
} drng;

static drng doc_rng(uint64_t key, int64_t index) {
    drng r = {.key = key, .counter = (uint64_t)index << 20, .lane = 4};
    return r;
}

static uint32_t next_u32(drng *r) {
    if (r->lane == 4) {
        r->blk = moe_philox4x32(r->counter++, r->key);
        r->lane = 0;
    }
    return r->blk.v[r->lane++];
}

/* Uniform in [0, n) by multiply-shift; the bias (< n / 2^32) is irrelevant here. */
static uint32_t below(drng *r, uint32_t n) { return (uint32_t)(((uint64_t)next_u32(r) * n) >> 32); }
static int32_t range(drng *r, int32_t lo, int32_t hi) { return lo + (int32_t)below(r, (uint32_t)(hi - lo + 1)); }
static int chance(drng *r, uint32_t percent) { return below(r, 100) < percent; }

#define PICK(r, arr) ((arr)[below((r), (uint32_t)(sizeof(arr) / sizeof *(arr)))])

/* -------------------------------------------------------------- writing -- */

/* A growable byte buffer; an allocation failure sets oom and drops further
 * writes, so generators need no error paths of their own. */
typedef struct {
    char *p;
    int64_t len, cap;
    int oom;
} sbuf;

static int reserve(sbuf *b, int64_t extra) {
    if (b->oom) return 0;
    if (b->len + extra + 1 <= b->cap) return 1;
    int64_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra + 1) cap *= 2;
    char *p = realloc(b->p, (size_t)cap);
    if (!p) { b->oom = 1; return 0; }
    b->p = p;
    b->cap = cap;
    return 1;
}

static void put(sbuf *b, const char *s, size_t n) {
    if (!reserve(b, (int64_t)n)) return;
    memcpy(b->p + b->len, s, n);
    b->len += (int64_t)n;
}
static void puts_(sbuf *b, const char *s) { put(b, s, strlen(s)); }
static void putch(sbuf *b, char c) { put(b, &c, 1); }
static void indent(sbuf *b, int n) { for (int i = 0; i < n; i++) putch(b, ' '); }

/* Decimal integer, zero-padded to at least `width` digits (snprintf is the
 * bottleneck otherwise: arithmetic lines are mostly numbers). */
static void put_int_w(sbuf *b, int64_t v, int width) {
    char tmp[24];
    int n = 0;
    uint64_t u = v < 0 ? (uint64_t)0 - (uint64_t)v : (uint64_t)v;
    do { tmp[n++] = (char)('0' + u % 10); u /= 10; } while (u);
    while (n < width) tmp[n++] = '0';
    if (v < 0) tmp[n++] = '-';
    if (!reserve(b, n)) return;
    for (int i = 0; i < n; i++) b->p[b->len + i] = tmp[n - 1 - i];
    b->len += n;
}
static void put_int(sbuf *b, int64_t v) { put_int_w(b, v, 1); }

/* ----------------------------------------------------------- arithmetic -- */

/* An operand with 1, 2 or 3 digits, so digit lengths vary within a line. */
static int32_t operand(drng *r) {
    static const int32_t lim[] = {9, 99, 999};
    return range(r, 0, lim[below(r, 3)]);
}

/* Lines such as "37 + 58 = 95." with standard precedence; the result is
 * computed, never guessed, so the domain is learnable exactly. */
static void gen_arithmetic(drng *r, sbuf *b) {
    int lines = range(r, 10, 30);   /* ~300 bytes, near the other domains' mean */
    for (int l = 0; l < lines; l++) {
        int64_t a = operand(r), c = operand(r), res;
        int32_t bb = operand(r);
        switch (below(r, 10)) {
        case 0: case 1: case 2:
            res = a + bb;
            put_int(b, a); puts_(b, " + "); put_int(b, bb);
            break;
        case 3: case 4:
            res = a - bb;   /* may be negative: "12 - 40 = -28." */
            put_int(b, a); puts_(b, " - "); put_int(b, bb);
            break;
        case 5: case 6:
            a = range(r, 0, 99);
            bb = range(r, 0, 99);
            res = a * bb;
            put_int(b, a); puts_(b, " * "); put_int(b, bb);
            break;
        case 7:
            res = a + bb + c;
            put_int(b, a); puts_(b, " + "); put_int(b, bb); puts_(b, " + "); put_int(b, c);
            break;
        case 8:
            c = range(r, 0, 12);
            res = a + bb * c;
            put_int(b, a); puts_(b, " + "); put_int(b, bb); puts_(b, " * "); put_int(b, c);
            break;
        default:
            c = range(r, 0, 12);
            res = (a + bb) * c;
            putch(b, '('); put_int(b, a); puts_(b, " + "); put_int(b, bb); puts_(b, ") * "); put_int(b, c);
            break;
        }
        puts_(b, " = ");
        put_int(b, res);
        puts_(b, ".\n");
    }
}

/* ----------------------------------------------------------------- code -- */

static const char *const verbs[] = {"sum", "count", "scale", "merge", "find", "update", "compute", "clamp",
                                    "filter", "reduce", "load", "store", "parse", "check", "build", "mix"};
static const char *const nouns[] = {"items", "values", "total", "buffer", "index", "weights", "scores",
                                    "tokens", "nodes", "edges", "limit", "offset", "rows", "state", "bias", "size"};
static const char *const vars[] = {"acc", "tmp", "res", "delta", "step", "best", "left", "right", "mid",
                                   "count", "value", "sum", "prod", "gap"};
static const char *const calls[] = {"abs", "max", "min", "hash", "len", "sqrt", "log_value", "next_id"};

typedef struct {
    int lua;                 /* 0: C-like, 1: Lua-like */
    int unit;                /* indentation unit (4 for C, 2 for Lua) */
    const char *names[16];   /* variables in scope */
    int nnames;
} code_ctx;

static void code_expr(drng *r, sbuf *b, code_ctx *c, int depth) {
    static const char *const ops[] = {" + ", " - ", " * ", " / ", " % "};
    switch (below(r, depth > 0 ? 3 : 5)) {
    case 0: puts_(b, c->names[below(r, (uint32_t)c->nnames)]); break;
    case 1: put_int(b, range(r, 0, below(r, 2) ? 9 : 255)); break;
    case 2:
        puts_(b, PICK(r, calls)); putch(b, '(');
        puts_(b, c->names[below(r, (uint32_t)c->nnames)]);
        putch(b, ')');
        break;
    default:
        code_expr(r, b, c, depth + 1);
        puts_(b, PICK(r, ops));
        code_expr(r, b, c, depth + 1);
        break;
    }
}

static void code_cond(drng *r, sbuf *b, code_ctx *c) {
    static const char *const cmp_c[] = {" < ", " > ", " <= ", " >= ", " == ", " != "};
    static const char *const cmp_lua[] = {" < ", " > ", " <= ", " >= ", " == ", " ~= "};
    puts_(b, c->names[below(r, (uint32_t)c->nnames)]);
    puts_(b, c->lua ? PICK(r, cmp_lua) : PICK(r, cmp_c));
    code_expr(r, b, c, 1);
}

static void code_block(drng *r, sbuf *b, code_ctx *c, int depth, int nstmts);

static void code_stmt(drng *r, sbuf *b, code_ctx *c, int depth) {
    int ind = depth * c->unit;
    uint32_t kind = below(r, depth >= 3 ? 3 : 5);
    if (kind == 0 && c->nnames < 16) {   /* a new local */
        const char *v = PICK(r, vars);
        indent(b, ind);
        puts_(b, c->lua ? "local " : "int ");
        puts_(b, v); puts_(b, " = ");
        code_expr(r, b, c, 0);
        puts_(b, c->lua ? "\n" : ";\n");
        c->names[c->nnames++] = v;
    } else if (kind <= 1) {              /* an update */
        const char *v = c->names[below(r, (uint32_t)c->nnames)];
        indent(b, ind);
        puts_(b, v);
        if (c->lua) { puts_(b, " = "); puts_(b, v); puts_(b, " + "); }
        else puts_(b, " += ");
        code_expr(r, b, c, 1);
        puts_(b, c->lua ? "\n" : ";\n");
    } else if (kind == 2) {              /* a call for its effect */
        indent(b, ind);
        puts_(b, "emit("); code_expr(r, b, c, 1); puts_(b, c->lua ? ")\n" : ");\n");
    } else if (kind == 3) {              /* if / else */
        indent(b, ind);
        puts_(b, c->lua ? "if " : "if ("); code_cond(r, b, c); puts_(b, c->lua ? " then\n" : ") {\n");
        int saved = c->nnames;
        code_block(r, b, c, depth + 1, range(r, 1, 2));
        c->nnames = saved;
        if (chance(r, 40)) {
            indent(b, ind); puts_(b, c->lua ? "else\n" : "} else {\n");
            code_block(r, b, c, depth + 1, 1);
            c->nnames = saved;
        }
        indent(b, ind); puts_(b, c->lua ? "end\n" : "}\n");
    } else {                             /* a counted loop */
        static const char *const loopvar[] = {"i", "j", "k", "m"};
        const char *iv = loopvar[(depth - 1) & 3];
        const char *bound = c->names[below(r, (uint32_t)c->nnames)];
        indent(b, ind);
        if (c->lua) { puts_(b, "for "); puts_(b, iv); puts_(b, " = 1, "); puts_(b, bound); puts_(b, " do\n"); }
        else {
            puts_(b, "for (int "); puts_(b, iv); puts_(b, " = 0; "); puts_(b, iv); puts_(b, " < ");
            puts_(b, bound); puts_(b, "; "); puts_(b, iv); puts_(b, "++) {\n");
        }
        int saved = c->nnames;
        if (c->nnames < 16) c->names[c->nnames++] = iv;
        code_block(r, b, c, depth + 1, range(r, 1, 3));
        c->nnames = saved;
        indent(b, ind); puts_(b, c->lua ? "end\n" : "}\n");
    }
}

static void code_block(drng *r, sbuf *b, code_ctx *c, int depth, int nstmts) {
    for (int i = 0; i < nstmts; i++) code_stmt(r, b, c, depth);
}

static void gen_code(drng *r, sbuf *b) {
    code_ctx c = {.lua = (int)below(r, 2)};
    c.unit = c.lua ? 2 : 4;
    int nfuncs = range(r, 1, 2);
    for (int f = 0; f < nfuncs; f++) {
        if (f) putch(b, '\n');
        c.nnames = 0;
        int nparams = range(r, 1, 3);
        uint32_t first = below(r, 16);
        for (int p = 0; p < nparams; p++) c.names[c.nnames++] = nouns[(first + (uint32_t)p * 5) % 16];
        puts_(b, c.lua ? "local function " : "int ");
        puts_(b, PICK(r, verbs)); putch(b, '_'); puts_(b, PICK(r, nouns));
        putch(b, '(');
        for (int p = 0; p < nparams; p++) {
            if (p) puts_(b, ", ");
            if (!c.lua) puts_(b, "int ");
            puts_(b, c.names[p]);
        }
        puts_(b, c.lua ? ")\n" : ") {\n");
        code_block(r, b, &c, 1, range(r, 2, 5));
        indent(b, c.unit);
        puts_(b, "return "); code_expr(r, b, &c, 1); puts_(b, c.lua ? "\n" : ";\n");
        puts_(b, c.lua ? "end\n" : "}\n");
    }
}

/* -------------------------------------------------------------- records -- */

static const char *const first_names[] = {"Ada", "Bruno", "Chen", "Dara", "Elif", "Farid", "Greta", "Hugo",
                                          "Ines", "Jonas", "Kemal", "Lena", "Mira", "Noor", "Omar", "Petra"};
static const char *const last_names[] = {"Moreno", "Okafor", "Lindqvist", "Tanaka", "Novak", "Silva", "Haddad",
                                         "Kowalski", "Dubois", "Rossi", "Nguyen", "Weber", "Ivanova", "Costa"};
static const char *const cities[] = {"Lisbon", "Oslo", "Nairobi", "Kyoto", "Lima", "Porto", "Tallinn",
                                     "Dakar", "Quito", "Hanoi", "Zagreb", "Perth"};
static const char *const statuses[] = {"paid", "pending", "refunded", "shipped", "cancelled"};

typedef struct {
    int32_t id, year, month, day;
    int64_t cents;
    const char *first, *last, *city, *status;
} record;

static record gen_record(drng *r) {
    static const int mdays[] = {31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
    record x;
    x.id = range(r, 10000, 999999);
    x.year = range(r, 1990, 2029);
    x.month = range(r, 1, 12);
    int leap = (x.year % 4 == 0 && x.year % 100 != 0) || x.year % 400 == 0;
    x.day = range(r, 1, mdays[x.month - 1] + (x.month == 2 && leap));
    x.cents = range(r, 1, below(r, 2) ? 9999 : 2500000);
    x.first = PICK(r, first_names);
    x.last = PICK(r, last_names);
    x.city = PICK(r, cities);
    x.status = PICK(r, statuses);
    return x;
}

static void put_date(sbuf *b, const record *x) {
    put_int_w(b, x->year, 4); putch(b, '-'); put_int_w(b, x->month, 2); putch(b, '-'); put_int_w(b, x->day, 2);
}
static void put_amount(sbuf *b, const record *x) { put_int(b, x->cents / 100); putch(b, '.'); put_int_w(b, x->cents % 100, 2); }

static void gen_records(drng *r, sbuf *b) {
    int n = range(r, 3, 8);
    uint32_t style = below(r, 3);
    if (style == 2) puts_(b, "id,name,date,amount,city,status\n");
    for (int i = 0; i < n; i++) {
        record x = gen_record(r);
        if (style == 0) {
            puts_(b, "id="); put_int(b, x.id);
            puts_(b, " name=\""); puts_(b, x.first); putch(b, ' '); puts_(b, x.last);
            puts_(b, "\" date="); put_date(b, &x);
            puts_(b, " amount="); put_amount(b, &x);
            puts_(b, " city="); puts_(b, x.city);
            puts_(b, " status="); puts_(b, x.status);
        } else if (style == 1) {
            puts_(b, "{\"id\": "); put_int(b, x.id);
            puts_(b, ", \"name\": \""); puts_(b, x.first); putch(b, ' '); puts_(b, x.last);
            puts_(b, "\", \"date\": \""); put_date(b, &x);
            puts_(b, "\", \"amount\": "); put_amount(b, &x);
            puts_(b, ", \"city\": \""); puts_(b, x.city);
            puts_(b, "\", \"status\": \""); puts_(b, x.status); puts_(b, "\"}");
        } else {
            put_int(b, x.id); putch(b, ',');
            puts_(b, x.first); putch(b, ' '); puts_(b, x.last); putch(b, ',');
            put_date(b, &x); putch(b, ','); put_amount(b, &x); putch(b, ',');
            puts_(b, x.city); putch(b, ','); puts_(b, x.status);
        }
        putch(b, '\n');
    }
}

/* ---------------------------------------------------------------- prose -- */

static const char *const p_nouns[] = {"sailor", "river", "garden", "merchant", "lantern", "village", "owl",
                                      "letter", "bridge", "teacher", "storm", "orchard", "child", "engine",
                                      "island", "painter", "forest", "clock", "harbor", "fox", "window", "road"};
static const char *const p_adjs[] = {"old", "quiet", "bright", "small", "distant", "green", "patient", "cold",
                                     "golden", "narrow", "curious", "heavy", "gentle", "empty", "ancient"};
static const char *const p_tverbs[] = {"watched", "found", "carried", "followed", "painted", "crossed",
                                       "remembered", "opened", "visited", "built", "lost", "answered"};
static const char *const p_iverbs[] = {"slept", "waited", "laughed", "wandered", "vanished", "sang",
                                       "rested", "returned", "trembled", "listened"};
static const char *const p_advs[] = {"slowly", "again", "at last", "without a sound", "all night",
                                     "in silence", "quickly", "once more"};
static const char *const p_preps[] = {"near", "beyond", "under", "beside", "across", "behind"};
static const char *const p_dets[] = {"the", "the", "a", "every", "that", "one", "my"};
static const char *const p_conjs[] = {", and ", ", but ", " because ", " while ", " until "};
static const char *const p_openers[] = {"At dawn, ", "Later, ", "In the evening, ", "Long ago, ", "Then ",
                                        "Before the rain, "};

/* A determiner agreeing with the next word ("an old owl", "a bright river"). */
static void prose_np(drng *r, sbuf *b, int depth) {
    const char *det = PICK(r, p_dets);
    const char *adj = chance(r, 45) ? PICK(r, p_adjs) : NULL;
    const char *noun = PICK(r, p_nouns);
    const char *next = adj ? adj : noun;
    if (!strcmp(det, "a") && strchr("aeiou", next[0])) det = "an";
    puts_(b, det); putch(b, ' ');
    if (adj) { puts_(b, adj); putch(b, ' '); }
    puts_(b, noun);
    if (depth == 0 && chance(r, 20)) {
        putch(b, ' '); puts_(b, PICK(r, p_preps)); putch(b, ' ');
        prose_np(r, b, 1);
    }
}

static void prose_clause(drng *r, sbuf *b) {
    prose_np(r, b, 0);
    putch(b, ' ');
    if (chance(r, 60)) {
        puts_(b, PICK(r, p_tverbs)); putch(b, ' ');
        prose_np(r, b, 0);
    } else {
        puts_(b, PICK(r, p_iverbs));
        if (chance(r, 50)) { putch(b, ' '); puts_(b, PICK(r, p_advs)); }
    }
}

static void gen_prose(drng *r, sbuf *b) {
    int paras = range(r, 1, 3);
    for (int p = 0; p < paras; p++) {
        int sentences = range(r, 2, 5);
        for (int s = 0; s < sentences; s++) {
            if (s) putch(b, ' ');
            int64_t start = b->len;
            if (chance(r, 20)) puts_(b, PICK(r, p_openers));
            prose_clause(r, b);
            if (chance(r, 30)) { puts_(b, PICK(r, p_conjs)); prose_clause(r, b); }
            putch(b, '.');
            if (!b->oom && b->p[start] >= 'a' && b->p[start] <= 'z') b->p[start] = (char)(b->p[start] - 'a' + 'A');
        }
        putch(b, '\n');
    }
}

/* ------------------------------------------------------------- the corpus -- */

const char *moe_corpus_domain_name(int domain) {
    static const char *const names[MOE_CORPUS_NUM_DOMAINS] = {"arithmetic", "code", "records", "prose"};
    return domain >= 0 && domain < MOE_CORPUS_NUM_DOMAINS ? names[domain] : NULL;
}

/* Appends document `index` (ending in a blank line) and returns its domain. */
static int gen_document(uint64_t key, int64_t index, sbuf *b) {
    drng r = doc_rng(key, index);
    int domain = (int)below(&r, MOE_CORPUS_NUM_DOMAINS);
    switch (domain) {
    case MOE_DOMAIN_ARITHMETIC: gen_arithmetic(&r, b); break;
    case MOE_DOMAIN_CODE: gen_code(&r, b); break;
    case MOE_DOMAIN_RECORDS: gen_records(&r, b); break;
    default: gen_prose(&r, b); break;
    }
    putch(b, '\n');
    return domain;
}

void moe_corpus_free(moe_corpus *c) {
    if (!c) return;
    free(c->text);
    free(c->doc_offsets);
    free(c->doc_domains);
    memset(c, 0, sizeof *c);
}

/* Documents are a few hundred bytes; this bounds the first allocation only. */
#define AVG_DOC_BYTES 256

moe_status moe_corpus_generate(uint64_t seed, int64_t num_docs, int64_t num_bytes, moe_corpus *out) {
    if (!out) return moe_error(MOE_ERR_ARG, "corpus: out is NULL");
    memset(out, 0, sizeof *out);
    if (num_docs < 0 || num_bytes < 0 || (num_docs > 0) == (num_bytes > 0))
        return moe_error(MOE_ERR_ARG, "corpus: give exactly one of num_documents (got %lld) and num_bytes (got %lld), "
                                      "as a positive count", (long long)num_docs, (long long)num_bytes);
    /* document counters are i << 20 of a 64-bit Philox counter; the byte bound is a sanity bound */
    if (num_docs > ((int64_t)1 << 40))
        return moe_error(MOE_ERR_ARG, "corpus: num_documents %lld is too large (at most 2^40)", (long long)num_docs);
    if (num_bytes > ((int64_t)1 << 46))
        return moe_error(MOE_ERR_ARG, "corpus: num_bytes %lld is too large (at most 2^46)", (long long)num_bytes);
    uint64_t key = moe_rng_key(seed, MOE_RNG_DATA);
    int64_t doc_cap = num_docs ? num_docs : num_bytes / AVG_DOC_BYTES + 16;
    int64_t *off = malloc(sizeof(int64_t) * (size_t)(doc_cap + 1));
    int32_t *dom = malloc(sizeof(int32_t) * (size_t)doc_cap);
    sbuf b = {0};
    if (!off || !dom || !reserve(&b, num_bytes ? num_bytes : num_docs * AVG_DOC_BYTES)) goto oom;
    int64_t n = 0;
    while (num_docs ? n < num_docs : b.len < num_bytes) {
        if (n == doc_cap) {
            doc_cap *= 2;
            int64_t *o2 = realloc(off, sizeof(int64_t) * (size_t)(doc_cap + 1));
            if (o2) off = o2;
            int32_t *d2 = realloc(dom, sizeof(int32_t) * (size_t)doc_cap);
            if (d2) dom = d2;
            if (!o2 || !d2) goto oom;
        }
        off[n] = b.len;
        dom[n] = gen_document(key, n, &b);
        if (b.oom) goto oom;
        n++;
    }
    if (num_bytes) b.len = num_bytes;   /* cut the last document short */
    b.p[b.len] = '\0';
    off[n] = b.len;
    out->text = b.p;
    out->num_bytes = b.len;
    out->num_docs = n;
    out->doc_offsets = off;
    out->doc_domains = dom;
    return MOE_OK;
oom:
    free(off);
    free(dom);
    free(b.p);
    return moe_error(MOE_ERR_OOM, "corpus: out of memory generating %lld %s", (long long)(num_docs ? num_docs : num_bytes),
                     num_docs ? "documents" : "bytes");
}

int64_t moe_corpus_document(uint64_t seed, int64_t index, char *buf, int64_t cap, int *domain) {
    if (index < 0) return moe_error(MOE_ERR_ARG, "corpus document: index %lld is negative", (long long)index), -1;
    sbuf b = {0};
    int d = gen_document(moe_rng_key(seed, MOE_RNG_DATA), index, &b);
    if (b.oom) { free(b.p); return moe_error(MOE_ERR_OOM, "corpus document: out of memory"), -1; }
    if (domain) *domain = d;
    if (cap > 0) {
        int64_t n = b.len < cap - 1 ? b.len : cap - 1;
        if (n > 0) memcpy(buf, b.p, (size_t)n);
        buf[n] = '\0';
    }
    int64_t len = b.len;
    free(b.p);
    return len;
}
