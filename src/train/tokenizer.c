/* Loading tokenizer.json (cJSON), lookups and decode. The encode path is in
 * tokenizer_encode.c; what a file may hold is listed in tokenizer.h. */
#include "tokenizer_internal.h"

#include <cjson/cJSON.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#include "../io/fileio.h"

/* ------------------------------------------------------------- bytes -- */

/* GPT-2's printable stand-ins: bytes that are printable Latin-1 characters map
 * to themselves, the other 68 to U+0100.. in byte order. Filled once. */
uint16_t moe_tk_byte_to_cp[256];
static int16_t cp_to_byte[324];
static pthread_once_t byte_map_once = PTHREAD_ONCE_INIT;

static int printable_byte(int b) {
    return (b >= 0x21 && b <= 0x7e) || (b >= 0xa1 && b <= 0xac) || (b >= 0xae && b <= 0xff);
}

static void init_byte_map(void) {
    for (int i = 0; i < 324; i++) cp_to_byte[i] = -1;
    int extra = 0;
    for (int b = 0; b < 256; b++) {
        uint16_t cp = printable_byte(b) ? (uint16_t)b : (uint16_t)(256 + extra++);
        moe_tk_byte_to_cp[b] = cp;
        cp_to_byte[cp] = (int16_t)b;
    }
}

int moe_tk_cp_to_byte(uint32_t cp) { return cp < 324 ? cp_to_byte[cp] : -1; }

/* -------------------------------------------------------------- UTF-8 -- */

int moe_tk_utf8_char(const unsigned char *s, size_t n, uint32_t *cp, int *bad) {
    unsigned c = s[0];
    if (c < 0x80) { *cp = c; return 1; }
    int len; uint32_t v; unsigned lo = 0x80, hi = 0xbf;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; v = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) {
        len = 3; v = c & 0x0f;
        if (c == 0xe0) lo = 0xa0;
        if (c == 0xed) hi = 0x9f;
    } else if (c >= 0xf0 && c <= 0xf4) {
        len = 4; v = c & 0x07;
        if (c == 0xf0) lo = 0x90;
        if (c == 0xf4) hi = 0x8f;
    } else { *bad = 1; return 0; }
    for (int i = 1; i < len; i++) {
        if ((size_t)i >= n) { *bad = i; return 0; }
        unsigned d = s[i];
        if (d < lo || d > hi) { *bad = i; return 0; }
        lo = 0x80; hi = 0xbf;
        v = (v << 6) | (d & 0x3f);
    }
    *cp = v;
    return len;
}

int moe_tk_utf8_valid(const char *s, size_t n) {
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0;
    while (i < n) {
        /* ASCII eight bytes at a time */
        while (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, p + i, 8);
            if (w & 0x8080808080808080ull) break;
            i += 8;
        }
        if (i >= n) break;
        if (p[i] < 0x80) { i++; continue; }
        uint32_t cp; int bad;
        int l = moe_tk_utf8_char(p + i, n - i, &cp, &bad);
        if (!l) return 0;
        i += (size_t)l;
    }
    return 1;
}

char *moe_tk_utf8_lossy(const char *s, size_t n, size_t *out_n) {
    char *o = malloc(n * 3 + 1);   /* each bad byte becomes at most 3 bytes */
    if (!o) return NULL;
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, k = 0;
    while (i < n) {
        uint32_t cp; int bad;
        int l = moe_tk_utf8_char(p + i, n - i, &cp, &bad);
        if (l) { memcpy(o + k, p + i, (size_t)l); k += (size_t)l; i += (size_t)l; }
        else { memcpy(o + k, "\xef\xbf\xbd", 3); k += 3; i += (size_t)bad; }
    }
    o[k] = 0;
    *out_n = k;
    return o;
}

/* -------------------------------------------------------------- maps -- */

uint64_t moe_tk_hash(const void *p, size_t n) {
    const unsigned char *s = p;
    uint64_t h = 0x9e3779b97f4a7c15ull ^ (n * 0xff51afd7ed558ccdull);
    while (n >= 8) {
        uint64_t w;
        memcpy(&w, s, 8);
        h = (h ^ w) * 0xbf58476d1ce4e5b9ull;
        h ^= h >> 29;
        s += 8; n -= 8;
    }
    uint64_t w = 0;
    memcpy(&w, s, n);
    h = (h ^ w ^ ((uint64_t)n << 56)) * 0x94d049bb133111ebull;
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ull;
    h ^= h >> 32;
    return h;
}

static int strmap_init(tk_strmap *m, size_t n) {
    uint32_t cap = 16;
    while (cap < n * 2) cap <<= 1;
    m->slot = malloc(cap * sizeof *m->slot);
    if (!m->slot) return -1;
    memset(m->slot, 0xff, cap * sizeof *m->slot);
    m->mask = cap - 1;
    return 0;
}

static int str_eq(const moe_tokenizer *tk, int32_t id, const char *s, size_t n) {
    tk_str t = tk->tok[id];
    return t.len == n && !memcmp(tk->strs + t.off, s, n);
}

int32_t moe_tk_strmap_get(const moe_tokenizer *tk, const tk_strmap *m, const char *s, size_t n) {
    uint32_t i = (uint32_t)moe_tk_hash(s, n) & m->mask;
    for (;;) {
        int32_t id = m->slot[i];
        if (id < 0) return -1;
        if (str_eq(tk, id, s, n)) return id;
        i = (i + 1) & m->mask;
    }
}

/* Inserts id under its token string; an existing key is replaced. */
static void strmap_put(const moe_tokenizer *tk, tk_strmap *m, int32_t id) {
    tk_str t = tk->tok[id];
    const char *s = tk->strs + t.off;
    uint32_t i = (uint32_t)moe_tk_hash(s, t.len) & m->mask;
    for (;;) {
        int32_t cur = m->slot[i];
        if (cur < 0 || str_eq(tk, cur, s, t.len)) { m->slot[i] = id; return; }
        i = (i + 1) & m->mask;
    }
}

static uint64_t mix64(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull;
    x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull;
    x ^= x >> 33;
    return x;
}

int moe_tk_pair_get(const tk_pairmap *m, int32_t a, int32_t b, int32_t *merged) {
    uint64_t key = (((uint64_t)(uint32_t)a << 32) | (uint32_t)b) + 1;
    uint64_t i = mix64(key) & m->mask;
    for (;;) {
        uint64_t k = m->key[i];
        if (k == key) { *merged = m->merged[i]; return m->rank[i]; }
        if (!k) return -1;
        i = (i + 1) & m->mask;
    }
}

/* ------------------------------------------------------------ loading -- */

typedef struct {
    moe_tokenizer *tk;
    const char *origin;
} loader;

static moe_status fail(loader *ld, moe_status s, const char *fmt, const char *a, const char *b) {
    char msg[400];
    snprintf(msg, sizeof msg, fmt, a ? a : "", b ? b : "");
    return moe_error(s, "tokenizer %s: %s", ld->origin, msg);
}

static moe_status add_str(moe_tokenizer *tk, const char *s, size_t n, tk_str *out) {
    if (tk->strs_n + n + 1 > tk->strs_cap) {
        size_t cap = tk->strs_cap ? tk->strs_cap * 2 : 1 << 20;
        while (cap < tk->strs_n + n + 1) cap *= 2;
        char *p = realloc(tk->strs, cap);
        if (!p) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
        tk->strs = p; tk->strs_cap = cap;
    }
    memcpy(tk->strs + tk->strs_n, s, n);
    tk->strs[tk->strs_n + n] = 0;
    out->off = (uint32_t)tk->strs_n;
    out->len = (uint32_t)n;
    tk->strs_n += n + 1;
    return MOE_OK;
}

static const char *type_of(const cJSON *o) {
    const cJSON *t = cJSON_GetObjectItemCaseSensitive(o, "type");
    return cJSON_IsString(t) ? t->valuestring : NULL;
}

static int json_bool(const cJSON *o, const char *key, int def) {
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(o, key);
    if (cJSON_IsBool(v)) return cJSON_IsTrue(v);
    return def;
}

static int is_null(const cJSON *v) { return !v || cJSON_IsNull(v); }

/* Normalizes with utf8proc; malloc'd result. */
static moe_status run_normalizer(int kind, const char *s, size_t n, char **out, size_t *out_n) {
    int opt = UTF8PROC_STABLE;
    switch (kind) {
    case TK_NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
    case TK_NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
    case TK_NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
    default: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
    }
    utf8proc_uint8_t *dst = NULL;
    utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst, opt);
    if (r < 0) return moe_error(MOE_ERR_ARG, "tokenizer: normalization failed: %s", utf8proc_errmsg(r));
    *out = (char *)dst;
    *out_n = (size_t)r;
    return MOE_OK;
}

static moe_status parse_normalizer(loader *ld, const cJSON *n, int depth) {
    moe_tokenizer *tk = ld->tk;
    if (is_null(n)) return MOE_OK;
    const char *t = type_of(n);
    if (!t) return fail(ld, MOE_ERR_ARG, "normalizer has no type", NULL, NULL);
    if (!strcmp(t, "Sequence") && depth == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(n, "normalizers"), *e;
        if (!cJSON_IsArray(list)) return fail(ld, MOE_ERR_ARG, "normalizer Sequence has no 'normalizers' list", NULL, NULL);
        cJSON_ArrayForEach(e, list) MOE_TRY(parse_normalizer(ld, e, 1));
        return MOE_OK;
    }
    int kind = !strcmp(t, "NFC") ? TK_NORM_NFC : !strcmp(t, "NFD") ? TK_NORM_NFD
             : !strcmp(t, "NFKC") ? TK_NORM_NFKC : !strcmp(t, "NFKD") ? TK_NORM_NFKD : -1;
    if (kind < 0)
        return fail(ld, MOE_ERR_ARG, "unsupported normalizer type '%s' (supported: NFC, NFD, NFKC, NFKD, Sequence)", t, NULL);
    if (tk->nnorm >= TK_MAX_NORM) return fail(ld, MOE_ERR_ARG, "too many normalizers", NULL, NULL);
    tk->norm[tk->nnorm++] = kind;
    return MOE_OK;
}

/* The GPT-2 pre-tokenizer regex (ByteLevel with use_regex). */
static const char GPT2_REGEX[] =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

/* PCRE2's \s (with UCP) also matches U+180E, which the HF library's regex
 * engine (Oniguruma) does not: Oniguruma follows Unicode White_Space. So \s
 * and \S are spelled out as White_Space before compiling: outside a class
 * \s -> [WS] and \S -> [^WS]; inside one \s -> WS and \S -> \S plus U+180E. */
#define WS_CLASS "\\t-\\r\\x{20}\\x{85}\\x{a0}\\x{1680}\\x{2000}-\\x{200a}\\x{2028}\\x{2029}\\x{202f}\\x{205f}\\x{3000}"

static char *rewrite_spaces(const char *pat, size_t len, size_t *out_len) {
    size_t cap = len * 8 + 64, k = 0;
    char *o = malloc(cap);
    if (!o) return NULL;
    int in_class = 0;
    for (size_t i = 0; i < len; i++) {
        char c = pat[i];
        if (k + 128 > cap) {
            cap *= 2;
            char *p = realloc(o, cap);
            if (!p) { free(o); return NULL; }
            o = p;
        }
        if (c == '\\' && i + 1 < len) {
            char d = pat[i + 1];
            const char *rep = NULL;
            if (d == 's') rep = in_class ? WS_CLASS : "[" WS_CLASS "]";
            else if (d == 'S') rep = in_class ? "\\S\\x{180e}" : "[^" WS_CLASS "]";
            if (rep) { size_t r = strlen(rep); memcpy(o + k, rep, r); k += r; }
            else { o[k++] = c; o[k++] = d; }
            i++;
            continue;
        }
        if (!in_class && c == '[') {
            in_class = 1;
            o[k++] = c;
            /* a ']' right after '[' or '[^' is a literal */
            if (i + 1 < len && pat[i + 1] == '^') o[k++] = pat[++i];
            if (i + 1 < len && pat[i + 1] == ']') o[k++] = pat[++i];
            continue;
        }
        if (in_class && c == '[' && i + 1 < len && pat[i + 1] == ':') {   /* [:alpha:] */
            const char *end = strstr(pat + i + 2, ":]");
            if (end && (size_t)(end - pat) < len) {
                size_t r = (size_t)(end - (pat + i)) + 2;
                memcpy(o + k, pat + i, r); k += r; i += r - 1;
                continue;
            }
        }
        if (in_class && c == ']') in_class = 0;
        o[k++] = c;
    }
    o[k] = 0;
    *out_len = k;
    return o;
}

static moe_status add_split(loader *ld, const char *pat0, size_t len0, int literal, int behavior, int invert) {
    moe_tokenizer *tk = ld->tk;
    size_t len = len0;
    char *owned = NULL;
    const char *pat = pat0;
    if (!literal) {
        owned = rewrite_spaces(pat0, len0, &len);
        if (!owned) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
        pat = owned;
    }
    if (tk->nsplit >= TK_MAX_PRE) return fail(ld, MOE_ERR_ARG, "too many pre-tokenizers", NULL, NULL);
    int err; PCRE2_SIZE off;
    uint32_t opts = PCRE2_UTF | (literal ? PCRE2_LITERAL : PCRE2_UCP);
    pcre2_code *re = pcre2_compile((PCRE2_SPTR)pat, len, opts, &err, &off, NULL);
    free(owned);
    if (!re && !literal) {   /* report the error and offset in the file's own pattern */
        pcre2_code *orig = pcre2_compile((PCRE2_SPTR)pat0, len0, opts, &err, &off, NULL);
        if (orig) pcre2_code_free(orig);
    }
    if (!re) {
        char emsg[200], pos[32];
        pcre2_get_error_message(err, (PCRE2_UCHAR *)emsg, sizeof emsg);
        snprintf(pos, sizeof pos, "%zu", (size_t)off);
        char m[300];
        snprintf(m, sizeof m, "%s (at offset %s)", emsg, pos);
        return fail(ld, MOE_ERR_ARG, "pre-tokenizer regex does not compile: %s", m, NULL);
    }
    pcre2_jit_compile(re, PCRE2_JIT_COMPLETE);   /* interpreted when JIT is unavailable */
    pcre2_match_data *md = pcre2_match_data_create_from_pattern(re, NULL);
    if (!md) { pcre2_code_free(re); return moe_error(MOE_ERR_OOM, "tokenizer: out of memory"); }
    tk_split *s = &tk->split[tk->nsplit++];
    s->re = re; s->md = md; s->behavior = behavior; s->invert = invert;
    return MOE_OK;
}

static moe_status parse_pre(loader *ld, const cJSON *p, int depth, int first) {
    moe_tokenizer *tk = ld->tk;
    if (is_null(p)) return MOE_OK;
    const char *t = type_of(p);
    if (!t) return fail(ld, MOE_ERR_ARG, "pre_tokenizer has no type", NULL, NULL);
    if (tk->byte_level)
        return fail(ld, MOE_ERR_ARG, "pre_tokenizer '%s' after ByteLevel is not supported (ByteLevel must come last)", t, NULL);
    if (!strcmp(t, "Sequence") && depth == 0) {
        const cJSON *list = cJSON_GetObjectItemCaseSensitive(p, "pretokenizers"), *e;
        if (!cJSON_IsArray(list)) return fail(ld, MOE_ERR_ARG, "pre_tokenizer Sequence has no 'pretokenizers' list", NULL, NULL);
        int i = 0;
        cJSON_ArrayForEach(e, list) MOE_TRY(parse_pre(ld, e, 1, i++ == 0));
        return MOE_OK;
    }
    if (!strcmp(t, "ByteLevel")) {
        if (json_bool(p, "add_prefix_space", 0)) {
            if (!first) return fail(ld, MOE_ERR_ARG, "ByteLevel add_prefix_space is supported only as the first pre_tokenizer", NULL, NULL);
            tk->add_prefix_space = 1;
        }
        if (json_bool(p, "use_regex", 1)) MOE_TRY(add_split(ld, GPT2_REGEX, sizeof GPT2_REGEX - 1, 0, TK_SPLIT_ISOLATED, 0));
        tk->byte_level = 1;
        return MOE_OK;
    }
    if (!strcmp(t, "Split")) {
        const cJSON *pat = cJSON_GetObjectItemCaseSensitive(p, "pattern");
        const cJSON *re = pat ? cJSON_GetObjectItemCaseSensitive(pat, "Regex") : NULL;
        const cJSON *str = pat ? cJSON_GetObjectItemCaseSensitive(pat, "String") : NULL;
        if (!cJSON_IsString(re) && !cJSON_IsString(str))
            return fail(ld, MOE_ERR_ARG, "Split pre_tokenizer needs a pattern {\"Regex\": ...} or {\"String\": ...}", NULL, NULL);
        const cJSON *b = cJSON_GetObjectItemCaseSensitive(p, "behavior");
        const char *bs = cJSON_IsString(b) ? b->valuestring : "";
        int beh = !strcmp(bs, "Removed") ? TK_SPLIT_REMOVED : !strcmp(bs, "Isolated") ? TK_SPLIT_ISOLATED
                : !strcmp(bs, "MergedWithPrevious") ? TK_SPLIT_PREV : !strcmp(bs, "MergedWithNext") ? TK_SPLIT_NEXT
                : !strcmp(bs, "Contiguous") ? TK_SPLIT_CONTIGUOUS : -1;
        if (beh < 0) return fail(ld, MOE_ERR_ARG, "unsupported Split behavior '%s'", bs, NULL);
        const char *ps = cJSON_IsString(re) ? re->valuestring : str->valuestring;
        return add_split(ld, ps, strlen(ps), !cJSON_IsString(re), beh, json_bool(p, "invert", 0));
    }
    return fail(ld, MOE_ERR_ARG, "unsupported pre_tokenizer type '%s' (supported: ByteLevel, Split, Sequence)", t, NULL);
}

static moe_status parse_decoder(loader *ld, const cJSON *d) {
    if (is_null(d)) return MOE_OK;
    const char *t = type_of(d);
    if (t && !strcmp(t, "ByteLevel")) { ld->tk->decoder_byte_level = 1; return MOE_OK; }
    return fail(ld, MOE_ERR_ARG, "unsupported decoder type '%s' (supported: ByteLevel)", t ? t : "?", NULL);
}

static moe_status ensure_ids(moe_tokenizer *tk, int64_t n) {
    if (n <= tk->ntok) return MOE_OK;
    tk_str *p = realloc(tk->tok, (size_t)n * sizeof *p);
    if (!p) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
    for (int64_t i = tk->ntok; i < n; i++) p[i] = (tk_str){0, UINT32_MAX};
    tk->tok = p;
    tk->ntok = n;
    return MOE_OK;
}

static moe_status parse_model(loader *ld, const cJSON *m) {
    moe_tokenizer *tk = ld->tk;
    if (!cJSON_IsObject(m)) return fail(ld, MOE_ERR_ARG, "no 'model' object", NULL, NULL);
    const char *t = type_of(m);
    if (t && strcmp(t, "BPE"))
        return fail(ld, MOE_ERR_ARG, "unsupported model type '%s' (only BPE is supported)", t, NULL);
    const cJSON *vocab = cJSON_GetObjectItemCaseSensitive(m, "vocab");
    const cJSON *merges = cJSON_GetObjectItemCaseSensitive(m, "merges");
    if (!cJSON_IsObject(vocab)) return fail(ld, MOE_ERR_ARG, "model has no 'vocab' object", NULL, NULL);
    if (!cJSON_IsArray(merges)) return fail(ld, MOE_ERR_ARG, "BPE model has no 'merges' list", NULL, NULL);
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(m, "dropout");
    if (cJSON_IsNumber(v) && v->valuedouble != 0.0) return fail(ld, MOE_ERR_ARG, "BPE dropout is not supported", NULL, NULL);
    if (json_bool(m, "byte_fallback", 0)) return fail(ld, MOE_ERR_ARG, "BPE byte_fallback is not supported", NULL, NULL);
    const char *affix[2] = {"continuing_subword_prefix", "end_of_word_suffix"};
    for (int i = 0; i < 2; i++) {
        v = cJSON_GetObjectItemCaseSensitive(m, affix[i]);
        if (cJSON_IsString(v) && v->valuestring[0]) return fail(ld, MOE_ERR_ARG, "BPE %s is not supported", affix[i], NULL);
    }
    /* vocab */
    int64_t maxid = -1, count = 0;
    const cJSON *e;
    cJSON_ArrayForEach(e, vocab) {
        if (!cJSON_IsNumber(e) || e->valuedouble < 0 || e->valuedouble > 2e9 || e->valuedouble != (double)(int64_t)e->valuedouble)
            return fail(ld, MOE_ERR_ARG, "vocab entry '%s' is not a valid id", e->string, NULL);
        if ((int64_t)e->valuedouble > maxid) maxid = (int64_t)e->valuedouble;
        count++;
    }
    MOE_TRY(ensure_ids(tk, maxid + 1));
    tk->model_size = maxid + 1;
    cJSON_ArrayForEach(e, vocab) {
        int64_t id = (int64_t)e->valuedouble;
        if (tk->tok[id].len != UINT32_MAX) return fail(ld, MOE_ERR_ARG, "vocab id of '%s' is used twice", e->string, NULL);
        MOE_TRY(add_str(tk, e->string, strlen(e->string), &tk->tok[id]));
    }
    if (strmap_init(&tk->model_vocab, (size_t)count) < 0) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
    for (int64_t id = 0; id < tk->ntok; id++)
        if (tk->tok[id].len != UINT32_MAX) strmap_put(tk, &tk->model_vocab, (int32_t)id);
    /* merges */
    int64_t nm = cJSON_GetArraySize(merges);
    uint64_t cap = 16;
    while (cap < (uint64_t)nm * 2) cap <<= 1;
    tk_pairmap *pm = &tk->merges;
    pm->key = calloc(cap, sizeof *pm->key);
    pm->rank = malloc(cap * sizeof *pm->rank);
    pm->merged = malloc(cap * sizeof *pm->merged);
    if (!pm->key || !pm->rank || !pm->merged) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
    pm->mask = cap - 1;
    char *cat = NULL; size_t catcap = 0;
    int32_t rank = 0;
    moe_status st = MOE_OK;
    cJSON_ArrayForEach(e, merges) {
        const char *a, *b; size_t na, nb;
        char where[48];
        snprintf(where, sizeof where, "%d", (int)rank);
        if (cJSON_IsString(e)) {
            const char *s = e->valuestring, *sp = strchr(s, ' ');
            if (!sp || strchr(sp + 1, ' ')) { st = fail(ld, MOE_ERR_ARG, "merge %s ('%s') is not two tokens separated by one space", where, s); break; }
            a = s; na = (size_t)(sp - s); b = sp + 1; nb = strlen(b);
        } else if (cJSON_IsArray(e) && cJSON_GetArraySize(e) == 2 && cJSON_IsString(cJSON_GetArrayItem(e, 0))
                   && cJSON_IsString(cJSON_GetArrayItem(e, 1))) {
            a = cJSON_GetArrayItem(e, 0)->valuestring; na = strlen(a);
            b = cJSON_GetArrayItem(e, 1)->valuestring; nb = strlen(b);
        } else { st = fail(ld, MOE_ERR_ARG, "merge %s is neither \"a b\" nor [\"a\", \"b\"]", where, NULL); break; }
        int32_t ia = moe_tk_strmap_get(tk, &tk->model_vocab, a, na);
        int32_t ib = moe_tk_strmap_get(tk, &tk->model_vocab, b, nb);
        if (na + nb + 1 > catcap) {
            catcap = (na + nb + 1) * 2;
            char *p = realloc(cat, catcap);
            if (!p) { st = moe_error(MOE_ERR_OOM, "tokenizer: out of memory"); break; }
            cat = p;
        }
        memcpy(cat, a, na); memcpy(cat + na, b, nb); cat[na + nb] = 0;
        int32_t im = moe_tk_strmap_get(tk, &tk->model_vocab, cat, na + nb);
        if (ia < 0 || ib < 0 || im < 0) {
            st = fail(ld, MOE_ERR_ARG, "merge %s: token '%s' is not in the vocab", where, ia < 0 ? a : ib < 0 ? b : cat);
            break;
        }
        uint64_t key = (((uint64_t)(uint32_t)ia << 32) | (uint32_t)ib) + 1;
        uint64_t i = mix64(key) & pm->mask;
        while (pm->key[i] && pm->key[i] != key) i = (i + 1) & pm->mask;
        if (!pm->key[i]) {   /* a repeated merge keeps its first (lowest) rank */
            pm->key[i] = key; pm->rank[i] = rank; pm->merged[i] = im;
        }
        rank++;
    }
    free(cat);
    MOE_TRY(st);
    tk->nmerges = rank;
    /* unknown token */
    tk->unk_id = -1;
    v = cJSON_GetObjectItemCaseSensitive(m, "unk_token");
    if (cJSON_IsString(v)) {
        tk->unk_id = moe_tk_strmap_get(tk, &tk->model_vocab, v->valuestring, strlen(v->valuestring));
        if (tk->unk_id < 0) return fail(ld, MOE_ERR_ARG, "unk_token '%s' is not in the vocab", v->valuestring, NULL);
    }
    tk->fuse_unk = json_bool(m, "fuse_unk", 0);
    tk->ignore_merges = json_bool(m, "ignore_merges", 0);
    return MOE_OK;
}

static int32_t trie_node(tk_trie *t, unsigned char c) {
    if (t->n == t->cap) {
        int32_t cap = t->cap ? t->cap * 2 : 64;
        tk_trie_node *p = realloc(t->nodes, (size_t)cap * sizeof *p);
        if (!p) return -1;
        t->nodes = p; t->cap = cap;
    }
    t->nodes[t->n] = (tk_trie_node){-1, -1, -1, c};
    return t->n++;
}

static moe_status trie_add(tk_trie *t, const char *s, size_t n, int32_t tok) {
    int32_t node = -1;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        int32_t child = i == 0 ? t->root[c] : t->nodes[node].first;
        while (i > 0 && child >= 0 && t->nodes[child].c != c) child = t->nodes[child].next;
        if (child < 0) {
            child = trie_node(t, c);
            if (child < 0) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
            if (i == 0) t->root[c] = child;
            else { t->nodes[child].next = t->nodes[node].first; t->nodes[node].first = child; }
        }
        node = child;
    }
    if (t->nodes[node].tok < 0) t->count++;
    t->nodes[node].tok = tok;   /* a later duplicate wins, as it would in a map */
    return MOE_OK;
}

static moe_status parse_added(loader *ld, const cJSON *list) {
    moe_tokenizer *tk = ld->tk;
    if (is_null(list)) return MOE_OK;
    if (!cJSON_IsArray(list)) return fail(ld, MOE_ERR_ARG, "'added_tokens' is not a list", NULL, NULL);
    int n = cJSON_GetArraySize(list);
    tk->added = calloc((size_t)n + 1, sizeof *tk->added);
    if (!tk->added) return moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
    const cJSON *e;
    cJSON_ArrayForEach(e, list) {
        const cJSON *id = cJSON_GetObjectItemCaseSensitive(e, "id");
        const cJSON *c = cJSON_GetObjectItemCaseSensitive(e, "content");
        if (!cJSON_IsNumber(id) || !cJSON_IsString(c) || id->valuedouble < 0 || id->valuedouble > 2e9)
            return fail(ld, MOE_ERR_ARG, "added token without a valid id and content", NULL, NULL);
        if (!c->valuestring[0]) return fail(ld, MOE_ERR_ARG, "added token with empty content", NULL, NULL);
        if (json_bool(e, "single_word", 0))
            return fail(ld, MOE_ERR_ARG, "added token '%s': single_word is not supported", c->valuestring, NULL);
        tk_added *a = &tk->added[tk->nadded++];
        a->id = (int32_t)id->valuedouble;
        a->special = (uint8_t)json_bool(e, "special", 0);
        a->normalized = (uint8_t)json_bool(e, "normalized", !a->special);
        a->lstrip = (uint8_t)json_bool(e, "lstrip", 0);
        a->rstrip = (uint8_t)json_bool(e, "rstrip", 0);
        MOE_TRY(ensure_ids(tk, (int64_t)a->id + 1));
        tk_str raw;
        MOE_TRY(add_str(tk, c->valuestring, strlen(c->valuestring), &raw));
        if (tk->tok[a->id].len == UINT32_MAX) tk->tok[a->id] = raw;
        else if (tk->tok[a->id].len != raw.len || memcmp(tk->strs + tk->tok[a->id].off, c->valuestring, raw.len))
            tk->tok[a->id] = raw;   /* the added token's content names the id */
        a->content = raw;
        if (a->normalized && tk->nnorm) {
            char *cur = NULL; size_t cn = raw.len;
            const char *src = c->valuestring;
            for (int k = 0; k < tk->nnorm; k++) {
                char *o = NULL; size_t on = 0;
                moe_status s = run_normalizer(tk->norm[k], src, cn, &o, &on);
                free(cur);
                if (s != MOE_OK) return s;
                cur = o; src = o; cn = on;
            }
            moe_status s = add_str(tk, cur, cn, &a->content);
            free(cur);
            MOE_TRY(s);
        }
    }
    return MOE_OK;
}

static void describe(moe_tokenizer *tk) {
    char norm[64] = "none", pre[96] = "none";
    static const char *nn[] = {"NFC", "NFD", "NFKC", "NFKD"};
    if (tk->nnorm) {
        norm[0] = 0;
        for (int i = 0; i < tk->nnorm; i++) {
            if (i) strcat(norm, "+");
            strcat(norm, nn[tk->norm[i]]);
        }
    }
    if (tk->nsplit || tk->byte_level) {
        snprintf(pre, sizeof pre, "%s%d regex split%s%s", tk->byte_level ? "ByteLevel, " : "", tk->nsplit,
                 tk->nsplit == 1 ? "" : "s", tk->add_prefix_space ? ", prefix space" : "");
    }
    snprintf(tk->desc, sizeof tk->desc,
             "Tokenizer(BPE, vocab_size %lld, %lld merges, %d added tokens, normalizer %s, pre_tokenizer %s, decoder %s)",
             (long long)tk->ntok, (long long)tk->nmerges, tk->nadded, norm, pre,
             tk->decoder_byte_level ? "ByteLevel" : "none");
}

moe_tokenizer *moe_tokenizer_from_json(const char *json, size_t len, const char *origin) {
    pthread_once(&byte_map_once, init_byte_map);
    loader ld = {0};
    ld.origin = origin ? origin : "<string>";
    cJSON *root = cJSON_ParseWithLength(json, len);
    if (!root) {
        const char *at = cJSON_GetErrorPtr();
        size_t off = at && at >= json && at <= json + len ? (size_t)(at - json) : 0;
        moe_error(MOE_ERR_ARG, "tokenizer %s: malformed JSON (near byte %zu)", ld.origin, off);
        return NULL;
    }
    moe_tokenizer *tk = calloc(1, sizeof *tk);
    if (!tk) { cJSON_Delete(root); moe_error(MOE_ERR_OOM, "tokenizer: out of memory"); return NULL; }
    ld.tk = tk;
    tk->origin = strdup(ld.origin);
    memset(tk->trie_raw.root, 0xff, sizeof tk->trie_raw.root);
    memset(tk->trie_norm.root, 0xff, sizeof tk->trie_norm.root);
    moe_status s = MOE_OK;
    if (!cJSON_IsObject(root)) s = fail(&ld, MOE_ERR_ARG, "the JSON is not an object", NULL, NULL);
    if (!s) s = parse_model(&ld, cJSON_GetObjectItemCaseSensitive(root, "model"));
    if (!s) s = parse_normalizer(&ld, cJSON_GetObjectItemCaseSensitive(root, "normalizer"), 0);
    if (!s) s = parse_pre(&ld, cJSON_GetObjectItemCaseSensitive(root, "pre_tokenizer"), 0, 1);
    if (!s) s = parse_decoder(&ld, cJSON_GetObjectItemCaseSensitive(root, "decoder"));
    if (!s) s = parse_added(&ld, cJSON_GetObjectItemCaseSensitive(root, "added_tokens"));
    cJSON_Delete(root);
    if (!s) {
        /* the full map: vocab, then added tokens over it */
        if (strmap_init(&tk->vocab, (size_t)tk->ntok) < 0) s = moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
        for (int64_t id = 0; !s && id < tk->model_size; id++)
            if (tk->tok[id].len != UINT32_MAX) strmap_put(tk, &tk->vocab, (int32_t)id);
        tk->special = calloc((size_t)tk->ntok + 1, 1);
        if (!tk->special) s = moe_error(MOE_ERR_OOM, "tokenizer: out of memory");
        for (int i = 0; !s && i < tk->nadded; i++) {
            tk_added *a = &tk->added[i];
            strmap_put(tk, &tk->vocab, a->id);
            tk->special[a->id] = a->special;
            s = trie_add(a->normalized ? &tk->trie_norm : &tk->trie_raw, tk->strs + a->content.off, a->content.len, i);
        }
    }
    if (!s && tk->byte_level) {
        for (int b = 0; b < 256; b++) {
            char u[4];
            int n = (int)utf8proc_encode_char(moe_tk_byte_to_cp[b], (utf8proc_uint8_t *)u);
            tk->byte_id[b] = moe_tk_strmap_get(tk, &tk->model_vocab, u, (size_t)n);
        }
    }
    if (s) { moe_tokenizer_free(tk); return NULL; }
    describe(tk);
    return tk;
}

moe_tokenizer *moe_tokenizer_from_file(const char *path) {
    char *data; size_t n;
    if (moe_io_read_file(path, &data, &n) != MOE_OK) return NULL;
    moe_tokenizer *tk = moe_tokenizer_from_json(data, n, path);
    free(data);
    return tk;
}

void moe_tokenizer_free(moe_tokenizer *tk) {
    if (!tk) return;
    for (int i = 0; i < tk->nsplit; i++) {
        pcre2_match_data_free(tk->split[i].md);
        pcre2_code_free(tk->split[i].re);
    }
    moe_tk_scratch_free(tk);
    free(tk->origin); free(tk->strs); free(tk->tok);
    free(tk->vocab.slot); free(tk->model_vocab.slot);
    free(tk->merges.key); free(tk->merges.rank); free(tk->merges.merged);
    free(tk->added); free(tk->special);
    free(tk->trie_raw.nodes); free(tk->trie_norm.nodes);
    free(tk);
}

/* ------------------------------------------------------------ lookups -- */

int64_t moe_tokenizer_vocab_size(const moe_tokenizer *tk) { return tk->ntok; }

int64_t moe_tokenizer_token_to_id(const moe_tokenizer *tk, const char *s, size_t len) {
    return moe_tk_strmap_get(tk, &tk->vocab, s, len);
}

const char *moe_tokenizer_id_to_token(const moe_tokenizer *tk, int64_t id, size_t *len) {
    if (id < 0 || id >= tk->ntok || tk->tok[id].len == UINT32_MAX) return NULL;
    if (len) *len = tk->tok[id].len;
    return tk->strs + tk->tok[id].off;
}

int moe_tokenizer_is_special(const moe_tokenizer *tk, int64_t id) {
    return id >= 0 && id < tk->ntok && tk->special[id];
}

const char *moe_tokenizer_describe(const moe_tokenizer *tk) { return tk->desc; }

void moe_token_ids_free(moe_token_ids *v) {
    free(v->ids);
    v->ids = NULL;
    v->n = v->cap = 0;
}

/* ------------------------------------------------------------- decode -- */

typedef struct { char *p; size_t n, cap; } buf_t;

static int buf_put(buf_t *b, const void *s, size_t n) {
    if (b->n + n + 1 > b->cap) {
        size_t cap = b->cap ? b->cap * 2 : 256;
        while (cap < b->n + n + 1) cap *= 2;
        char *p = realloc(b->p, cap);
        if (!p) return -1;
        b->p = p; b->cap = cap;
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    return 0;
}

static int buf_grow(buf_t *b, size_t n) {
    size_t cap = b->cap * 2;
    while (cap < b->n + n + 1) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) return -1;
    b->p = p; b->cap = cap;
    return 0;
}

moe_status moe_tokenizer_decode(const moe_tokenizer *tk, const int64_t *ids, size_t n, int skip_special,
                                char **out, size_t *out_len) {
    buf_t b = {0};
    if (buf_put(&b, "", 0) < 0) return moe_error(MOE_ERR_OOM, "tokenizer.decode: out of memory");
    int first = 1;
    for (size_t i = 0; i < n; i++) {
        int64_t id = ids[i];
        if (id < 0 || id >= tk->ntok || tk->tok[id].len == UINT32_MAX) {
            free(b.p);
            if (id < 0 || id >= tk->ntok)
                return moe_error(MOE_ERR_RANGE, "tokenizer.decode: id %lld at position %zu is out of range [0, %lld)",
                                 (long long)id, i + 1, (long long)tk->ntok);
            return moe_error(MOE_ERR_RANGE, "tokenizer.decode: id %lld at position %zu has no token", (long long)id, i + 1);
        }
        if (skip_special && tk->special[id]) continue;
        const unsigned char *s = (const unsigned char *)tk->strs + tk->tok[id].off;
        size_t len = tk->tok[id].len;
        int ok = 0;
        if (tk->decoder_byte_level) {
            /* every character a byte stand-in: its bytes; else the token's own UTF-8 */
            if (buf_put(&b, "", 0) < 0 || (b.n + len + 1 > b.cap && buf_grow(&b, len) < 0)) goto oom;
            size_t mark = b.n, j = 0;
            ok = 1;
            while (j < len) {
                uint32_t cp; int bad;
                int l = moe_tk_utf8_char(s + j, len - j, &cp, &bad);
                int by = l ? moe_tk_cp_to_byte(cp) : -1;
                if (by < 0) { ok = 0; b.n = mark; break; }
                b.p[b.n++] = (char)by;
                j += (size_t)l;
            }
        } else if (!first && buf_put(&b, " ", 1) < 0) goto oom;
        if (!ok && buf_put(&b, s, len) < 0) goto oom;
        first = 0;
    }
    if (!moe_tk_utf8_valid(b.p, b.n)) {
        size_t m;
        char *o = moe_tk_utf8_lossy(b.p, b.n, &m);
        free(b.p);
        if (!o) return moe_error(MOE_ERR_OOM, "tokenizer.decode: out of memory");
        *out = o; *out_len = m;
        return MOE_OK;
    }
    b.p[b.n] = 0;
    *out = b.p; *out_len = b.n;
    return MOE_OK;
oom:
    free(b.p);
    return moe_error(MOE_ERR_OOM, "tokenizer.decode: out of memory");
}
