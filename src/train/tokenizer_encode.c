/* The encode path: added tokens -> normalize -> pre-tokenize -> BPE -> ids.
 * Scratch buffers and the word cache live in the tokenizer (not reentrant). */
#include "tokenizer_internal.h"

#include <stdlib.h>
#include <string.h>
#include <utf8proc.h>

#define RANK_NONE INT32_MAX
#define CACHE_MAX_WORD 128          /* longer words are not cached */
#define CACHE_SLOTS (1u << 17)
#define CACHE_MAX_COUNT (CACHE_SLOTS / 2)
#define CACHE_MAX_KEYS (8u << 20)
#define HEAP_MIN_SYMBOLS 48         /* longer words merge through a heap */

static moe_status oom(void) { return moe_error(MOE_ERR_OOM, "tokenizer.encode: out of memory"); }

static int grow(void **p, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 0;
    size_t c = *cap ? *cap : 64;
    while (c < need) c *= 2;
    void *q = realloc(*p, c * elem);
    if (!q) return -1;
    *p = q; *cap = c;
    return 0;
}

static moe_status push_id(moe_token_ids *out, int32_t id) {
    if (out->n == out->cap && grow((void **)&out->ids, &out->cap, out->n + 1, sizeof *out->ids) < 0) return oom();
    out->ids[out->n++] = id;
    return MOE_OK;
}

/* ------------------------------------------------------------- cache -- */

static int cache_init(tk_cache *c) {
    c->hash = calloc(CACHE_SLOTS, sizeof *c->hash);
    c->koff = malloc(CACHE_SLOTS * sizeof *c->koff);
    c->klen = malloc(CACHE_SLOTS * sizeof *c->klen);
    c->voff = malloc(CACHE_SLOTS * sizeof *c->voff);
    c->vlen = malloc(CACHE_SLOTS * sizeof *c->vlen);
    if (!c->hash || !c->koff || !c->klen || !c->voff || !c->vlen) return -1;
    c->mask = CACHE_SLOTS - 1;
    return 0;
}

static void cache_clear(tk_cache *c) {
    memset(c->hash, 0, CACHE_SLOTS * sizeof *c->hash);
    c->count = 0;
    c->keys_n = c->vals_n = 0;
}

/* The ids of a cached word, or NULL. */
static const int32_t *cache_get(const tk_cache *c, const char *w, size_t n, uint64_t h, uint32_t *nids) {
    uint32_t i = (uint32_t)h & c->mask;
    for (;;) {
        uint64_t hh = c->hash[i];
        if (!hh) return NULL;
        if (hh == h && c->klen[i] == n && !memcmp(c->keys + c->koff[i], w, n)) {
            *nids = c->vlen[i];
            return c->vals + c->voff[i];
        }
        i = (i + 1) & c->mask;
    }
}

static void cache_put(tk_cache *c, const char *w, size_t n, uint64_t h, const int32_t *ids, size_t nids) {
    if (c->count >= CACHE_MAX_COUNT || c->keys_n + n > CACHE_MAX_KEYS) cache_clear(c);
    if (grow((void **)&c->keys, &c->keys_cap, c->keys_n + n, 1) < 0) return;
    if (grow((void **)&c->vals, &c->vals_cap, c->vals_n + nids, sizeof *c->vals) < 0) return;
    uint32_t i = (uint32_t)h & c->mask;
    while (c->hash[i]) i = (i + 1) & c->mask;
    c->hash[i] = h;
    c->koff[i] = (uint32_t)c->keys_n; c->klen[i] = (uint32_t)n;
    c->voff[i] = (uint32_t)c->vals_n; c->vlen[i] = (uint32_t)nids;
    memcpy(c->keys + c->keys_n, w, n);
    memcpy(c->vals + c->vals_n, ids, nids * sizeof *ids);
    c->keys_n += n; c->vals_n += nids;
    c->count++;
}

void moe_tk_scratch_free(moe_tokenizer *tk) {
    tk_cache *c = &tk->cache;
    free(c->hash); free(c->koff); free(c->klen); free(c->voff); free(c->vlen);
    free(c->keys); free(c->vals);
    free(tk->pieces); free(tk->pieces2);
    free(tk->sym); free(tk->nxt); free(tk->prv); free(tk->rnk);
    free(tk->heap); free(tk->buf); free(tk->wbuf);
}

/* --------------------------------------------------------------- BPE -- */

/* rank of the pair starting at symbol i (its right neighbour nxt[i]) */
static inline void pair_rank(const moe_tokenizer *tk, int32_t *sym, int32_t *nxt, int32_t *rnk, int32_t *mid, int32_t i) {
    int32_t j = nxt[i];
    int r = j >= 0 ? moe_tk_pair_get(&tk->merges, sym[i], sym[j], &mid[i]) : -1;
    rnk[i] = r < 0 ? RANK_NONE : r;
}

static inline void merge_at(const moe_tokenizer *tk, int32_t *sym, int32_t *nxt, int32_t *prv, int32_t *rnk,
                            int32_t *mid, int32_t i) {
    int32_t j = nxt[i];
    sym[i] = mid[i];
    nxt[i] = nxt[j];
    if (nxt[j] >= 0) prv[nxt[j]] = i;
    prv[j] = -2;                       /* dead */
    rnk[j] = RANK_NONE;
    pair_rank(tk, sym, nxt, rnk, mid, i);
    if (prv[i] >= 0) pair_rank(tk, sym, nxt, rnk, mid, prv[i]);
}

static void heap_push(uint64_t *h, size_t *n, uint64_t v) {
    size_t i = (*n)++;
    while (i > 0) {
        size_t p = (i - 1) / 2;
        if (h[p] <= v) break;
        h[i] = h[p];
        i = p;
    }
    h[i] = v;
}

static uint64_t heap_pop(uint64_t *h, size_t *n) {
    uint64_t top = h[0], v = h[--(*n)];
    size_t i = 0;
    for (;;) {
        size_t l = 2 * i + 1, r = l + 1, m = i;
        uint64_t mv = v;
        if (l < *n && h[l] < mv) { m = l; mv = h[l]; }
        if (r < *n && h[r] < mv) { m = r; }
        if (m == i) break;
        h[i] = h[m];
        i = m;
    }
    if (*n) h[i] = v;
    return top;
}

/* The ids of one pre-tokenized word w[0..n) appended to out. */
static moe_status bpe_word(moe_tokenizer *tk, const unsigned char *w, size_t n, moe_token_ids *out) {
    if (tk->byte_level && n == 1 && tk->byte_id[w[0]] >= 0) return push_id(out, tk->byte_id[w[0]]);
    uint64_t h = 0;
    if (n <= CACHE_MAX_WORD) {
        if (!tk->cache.hash && cache_init(&tk->cache) < 0) return oom();
        h = moe_tk_hash(w, n) | 1;
        uint32_t k;
        const int32_t *ids = cache_get(&tk->cache, (const char *)w, n, h, &k);
        if (ids) {
            if (out->n + k > out->cap && grow((void **)&out->ids, &out->cap, out->n + k, sizeof *out->ids) < 0) return oom();
            memcpy(out->ids + out->n, ids, k * sizeof *ids);
            out->n += k;
            return MOE_OK;
        }
    }
    if (tk->ignore_merges) {
        const char *key = (const char *)w;
        size_t kn = n;
        if (tk->byte_level) {   /* the word in its byte-level spelling */
            if (grow((void **)&tk->wbuf, &tk->wbuf_cap, 2 * n + 1, 1) < 0) return oom();
            kn = 0;
            for (size_t i = 0; i < n; i++) {
                uint16_t cp = moe_tk_byte_to_cp[w[i]];
                if (cp < 0x80) tk->wbuf[kn++] = (char)cp;
                else { tk->wbuf[kn++] = (char)(0xc0 | (cp >> 6)); tk->wbuf[kn++] = (char)(0x80 | (cp & 0x3f)); }
            }
            key = tk->wbuf;
        }
        int32_t id = moe_tk_strmap_get(tk, &tk->model_vocab, key, kn);
        if (id >= 0) {
            if (h) cache_put(&tk->cache, (const char *)w, n, h, &id, 1);
            return push_id(out, id);
        }
    }
    /* initial symbols: one per byte (byte-level) or per character */
    size_t need = n + 1;
    if (need > tk->sym_cap) {
        size_t cap = tk->sym_cap ? tk->sym_cap : 256;
        while (cap < need) cap *= 2;
        int32_t *a = realloc(tk->sym, cap * 5 * sizeof *a);
        if (!a) return oom();
        tk->sym = a; tk->sym_cap = cap;
    }
    int32_t *sym = tk->sym, *nxt = sym + tk->sym_cap, *prv = nxt + tk->sym_cap, *rnk = prv + tk->sym_cap,
            *mid = rnk + tk->sym_cap;
    int32_t m = 0;
    if (tk->byte_level) {
        for (size_t i = 0; i < n; i++) {
            int32_t id = tk->byte_id[w[i]];
            if (id < 0) id = tk->unk_id;
            if (id < 0) continue;
            if (id == tk->unk_id && tk->fuse_unk && m > 0 && sym[m - 1] == id) continue;
            sym[m++] = id;
        }
    } else {
        size_t i = 0;
        while (i < n) {
            uint32_t cp; int bad;
            int l = moe_tk_utf8_char(w + i, n - i, &cp, &bad);
            if (!l) l = bad;
            int32_t id = moe_tk_strmap_get(tk, &tk->model_vocab, (const char *)w + i, (size_t)l);
            i += (size_t)l;
            if (id < 0) id = tk->unk_id;
            if (id < 0) continue;
            if (id == tk->unk_id && tk->fuse_unk && m > 0 && sym[m - 1] == id) continue;
            sym[m++] = id;
        }
    }
    for (int32_t i = 0; i < m; i++) { nxt[i] = i + 1 < m ? i + 1 : -1; prv[i] = i - 1; }
    for (int32_t i = 0; i < m; i++) pair_rank(tk, sym, nxt, rnk, mid, i);
    if (m < HEAP_MIN_SYMBOLS) {
        for (;;) {
            int32_t best = -1, br = RANK_NONE;
            for (int32_t i = 0; i >= 0; i = nxt[i])
                if (rnk[i] < br) { br = rnk[i]; best = i; }
            if (best < 0) break;
            merge_at(tk, sym, nxt, prv, rnk, mid, best);
        }
    } else {
        if (grow((void **)&tk->heap, &tk->heap_cap, (size_t)m * 3 + 16, sizeof *tk->heap) < 0) return oom();
        size_t hn = 0;
        for (int32_t i = 0; i < m; i++)
            if (rnk[i] != RANK_NONE) heap_push(tk->heap, &hn, ((uint64_t)rnk[i] << 32) | (uint32_t)i);
        while (hn) {
            uint64_t top = heap_pop(tk->heap, &hn);
            int32_t i = (int32_t)(uint32_t)top, r = (int32_t)(top >> 32);
            if (prv[i] == -2 || rnk[i] != r) continue;    /* stale */
            merge_at(tk, sym, nxt, prv, rnk, mid, i);
            /* at most two new pairs per merge: room is kept by the 3m bound plus pops */
            if (hn + 2 > tk->heap_cap && grow((void **)&tk->heap, &tk->heap_cap, hn + 2, sizeof *tk->heap) < 0) return oom();
            if (rnk[i] != RANK_NONE) heap_push(tk->heap, &hn, ((uint64_t)rnk[i] << 32) | (uint32_t)i);
            if (prv[i] >= 0 && rnk[prv[i]] != RANK_NONE)
                heap_push(tk->heap, &hn, ((uint64_t)rnk[prv[i]] << 32) | (uint32_t)prv[i]);
        }
    }
    size_t start = out->n;
    for (int32_t i = m > 0 ? 0 : -1; i >= 0; i = nxt[i]) MOE_TRY(push_id(out, sym[i]));
    if (h) cache_put(&tk->cache, (const char *)w, n, h, out->ids + start, out->n - start);
    return MOE_OK;
}

/* ------------------------------------------------------ pre-tokenize -- */

typedef struct { uint32_t off, len; int delim, have; } piece;

static moe_status split_step(moe_tokenizer *tk, int step, const char *s, uint32_t off, uint32_t len, moe_token_ids *out);

static moe_status emit(moe_tokenizer *tk, int step, const char *s, piece p, moe_token_ids *out) {
    if (!p.have || !p.len) return MOE_OK;
    if (step + 1 < tk->nsplit) return split_step(tk, step + 1, s, p.off, p.len, out);
    return bpe_word(tk, (const unsigned char *)s + p.off, p.len, out);
}

/* One (range, is-delimiter) part of a split, applied with the step's behaviour. */
static moe_status part(moe_tokenizer *tk, int step, const char *s, piece *pend, piece cur, moe_token_ids *out) {
    switch (tk->split[step].behavior) {
    case TK_SPLIT_ISOLATED:
        return emit(tk, step, s, cur, out);
    case TK_SPLIT_REMOVED:
        return cur.delim ? MOE_OK : emit(tk, step, s, cur, out);
    case TK_SPLIT_CONTIGUOUS:
        if (cur.delim && pend->have && pend->delim) { pend->len += cur.len; return MOE_OK; }
        MOE_TRY(emit(tk, step, s, *pend, out));
        *pend = cur;
        return MOE_OK;
    case TK_SPLIT_PREV:   /* a delimiter joins the piece before it, unless that ended in one */
        if (cur.delim && pend->have && !pend->delim) { pend->len += cur.len; pend->delim = 1; return MOE_OK; }
        MOE_TRY(emit(tk, step, s, *pend, out));
        *pend = cur;
        return MOE_OK;
    default:              /* TK_SPLIT_NEXT: a delimiter joins the non-delimiter after it */
        if (pend->have && pend->delim && !cur.delim) {
            cur.off = pend->off; cur.len += pend->len;
            pend->have = 0;
            return emit(tk, step, s, cur, out);
        }
        MOE_TRY(emit(tk, step, s, *pend, out));
        pend->have = 0;
        if (cur.delim) { *pend = cur; return MOE_OK; }
        return emit(tk, step, s, cur, out);
    }
}

static moe_status split_step(moe_tokenizer *tk, int step, const char *s, uint32_t off, uint32_t len, moe_token_ids *out) {
    tk_split *sp = &tk->split[step];
    PCRE2_SPTR subj = (PCRE2_SPTR)s + off;
    size_t start = 0, prev = 0;
    piece pend = {0, 0, 0, 0};
    while (start < len) {
        int rc = pcre2_match(sp->re, subj, len, start, PCRE2_NO_UTF_CHECK, sp->md, NULL);
        if (rc == PCRE2_ERROR_NOMATCH) break;
        if (rc < 0) {
            PCRE2_UCHAR msg[160];
            pcre2_get_error_message(rc, msg, sizeof msg);
            return moe_error(MOE_ERR_INTERNAL, "tokenizer.encode: regex match failed: %s", (char *)msg);
        }
        PCRE2_SIZE *ov = pcre2_get_ovector_pointer(sp->md);
        size_t ms = ov[0], me = ov[1];
        if (me == ms) {   /* empty match: nothing to split off; step over one character */
            start = ms + 1;
            while (start < len && (subj[start] & 0xc0) == 0x80) start++;
            continue;
        }
        if (ms > prev)
            MOE_TRY(part(tk, step, s, &pend, (piece){off + (uint32_t)prev, (uint32_t)(ms - prev), sp->invert, 1}, out));
        MOE_TRY(part(tk, step, s, &pend, (piece){off + (uint32_t)ms, (uint32_t)(me - ms), !sp->invert, 1}, out));
        prev = start = me;
    }
    if (len > prev) MOE_TRY(part(tk, step, s, &pend, (piece){off + (uint32_t)prev, (uint32_t)(len - prev), sp->invert, 1}, out));
    return emit(tk, step, s, pend, out);
}

/* Pre-tokenize and BPE one normalized stretch of text without added tokens. */
static moe_status encode_words(moe_tokenizer *tk, const char *s, size_t n, moe_token_ids *out) {
    if (!n) return MOE_OK;
    if (n > UINT32_MAX - 2) return moe_error(MOE_ERR_ARG, "tokenizer.encode: text longer than 4 GB");
    if (tk->add_prefix_space && s[0] != ' ') {
        if (grow((void **)&tk->buf, &tk->buf_cap, n + 1, 1) < 0) return oom();
        tk->buf[0] = ' ';
        memcpy(tk->buf + 1, s, n);
        s = tk->buf;
        n++;
    }
    if (tk->nsplit) return split_step(tk, 0, s, 0, (uint32_t)n, out);
    return bpe_word(tk, (const unsigned char *)s, n, out);
}

/* ----------------------------------------------------- added tokens -- */

static int is_space_cp(uint32_t c) {
    return (c >= 9 && c <= 13) || c == 32 || c == 0x85 || c == 0xa0 || c == 0x1680 || (c >= 0x2000 && c <= 0x200a)
        || c == 0x2028 || c == 0x2029 || c == 0x202f || c == 0x205f || c == 0x3000;
}

/* Leftmost-longest match of an added token in s[from..n); -1 when none. */
static ptrdiff_t trie_find(const tk_trie *t, const unsigned char *s, size_t n, size_t from, size_t *end, int *tok) {
    for (size_t i = from; i < n; i++) {
        int32_t node = t->root[s[i]];
        if (node < 0) continue;
        int best = -1;
        size_t bend = 0, j = i + 1;
        for (;;) {
            if (t->nodes[node].tok >= 0) { best = t->nodes[node].tok; bend = j; }
            if (j >= n) break;
            int32_t c = t->nodes[node].first;
            while (c >= 0 && t->nodes[c].c != s[j]) c = t->nodes[c].next;
            if (c < 0) break;
            node = c;
            j++;
        }
        if (best >= 0) { *end = bend; *tok = best; return (ptrdiff_t)i; }
    }
    return -1;
}

typedef moe_status (*segment_fn)(moe_tokenizer *tk, const char *s, size_t n, moe_token_ids *out);

/* Splits s on the trie's tokens: the stretches between go to fn, tokens become their ids. */
static moe_status split_added(moe_tokenizer *tk, const tk_trie *t, const char *s, size_t n, segment_fn fn,
                              moe_token_ids *out) {
    if (!t->count) return fn(tk, s, n, out);
    const unsigned char *u = (const unsigned char *)s;
    size_t pos = 0;
    while (pos < n) {
        size_t me; int k;
        ptrdiff_t ms = trie_find(t, u, n, pos, &me, &k);
        if (ms < 0) break;
        const tk_added *a = &tk->added[k];
        size_t seg_end = (size_t)ms;
        if (a->lstrip) {   /* the token takes the whitespace before it */
            while (seg_end > pos) {
                size_t b = seg_end - 1;
                while (b > pos && (u[b] & 0xc0) == 0x80) b--;
                uint32_t cp; int bad;
                if (!moe_tk_utf8_char(u + b, n - b, &cp, &bad) || !is_space_cp(cp)) break;
                seg_end = b;
            }
        }
        if (a->rstrip) {   /* and the whitespace after it */
            while (me < n) {
                uint32_t cp; int bad;
                int l = moe_tk_utf8_char(u + me, n - me, &cp, &bad);
                if (!l || !is_space_cp(cp)) break;
                me += (size_t)l;
            }
        }
        MOE_TRY(fn(tk, s + pos, seg_end - pos, out));
        MOE_TRY(push_id(out, a->id));
        pos = me;
    }
    return fn(tk, s + pos, n - pos, out);
}

/* --------------------------------------------------------- normalize -- */

/* True when the normalizer leaves s unchanged for certain (a quick scan). */
static int norm_trivial(int kind, const unsigned char *s, size_t n) {
    /* below U+0300 nothing composes (NFC); below U+00A0 nothing has a compatibility
     * or canonical decomposition either; ASCII is fixed by every form */
    uint32_t lim = kind == TK_NORM_NFC ? 0x300 : 0xa0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < 0x80) continue;
        uint32_t cp; int bad;
        int l = moe_tk_utf8_char(s + i, n - i, &cp, &bad);
        if (!l || cp >= lim) return 0;
        i += (size_t)l - 1;
    }
    return 1;
}

static moe_status segment_normalized(moe_tokenizer *tk, const char *s, size_t n, moe_token_ids *out) {
    return split_added(tk, &tk->trie_norm, s, n, encode_words, out);
}

static moe_status segment_raw(moe_tokenizer *tk, const char *s, size_t n, moe_token_ids *out) {
    if (!n) return MOE_OK;
    char *owned = NULL;
    for (int k = 0; k < tk->nnorm; k++) {
        if (norm_trivial(tk->norm[k], (const unsigned char *)s, n)) continue;
        int opt = UTF8PROC_STABLE;
        switch (tk->norm[k]) {
        case TK_NORM_NFC: opt |= UTF8PROC_COMPOSE; break;
        case TK_NORM_NFD: opt |= UTF8PROC_DECOMPOSE; break;
        case TK_NORM_NFKC: opt |= UTF8PROC_COMPOSE | UTF8PROC_COMPAT; break;
        default: opt |= UTF8PROC_DECOMPOSE | UTF8PROC_COMPAT; break;
        }
        utf8proc_uint8_t *dst = NULL;
        utf8proc_ssize_t r = utf8proc_map((const utf8proc_uint8_t *)s, (utf8proc_ssize_t)n, &dst, opt);
        free(owned);
        if (r < 0) return moe_error(MOE_ERR_ARG, "tokenizer.encode: normalization failed: %s", utf8proc_errmsg(r));
        owned = (char *)dst;
        s = owned;
        n = (size_t)r;
    }
    moe_status st = segment_normalized(tk, s, n, out);
    free(owned);
    return st;
}

moe_status moe_tokenizer_encode(moe_tokenizer *tk, const char *text, size_t len, moe_token_ids *out) {
    if (!tk) return moe_error(MOE_ERR_ARG, "tokenizer.encode: tokenizer is NULL");
    if (!text && len) return moe_error(MOE_ERR_ARG, "tokenizer.encode: text is NULL");
    char *owned = NULL;
    if (len && !moe_tk_utf8_valid(text, len)) {
        owned = moe_tk_utf8_lossy(text, len, &len);
        if (!owned) return oom();
        text = owned;
    }
    moe_status st = len ? split_added(tk, &tk->trie_raw, text, len, segment_raw, out) : MOE_OK;
    free(owned);
    return st;
}
