/* The data layer in C: the synthetic corpus (determinism, prefix stability,
 * ASCII, domain balance, every arithmetic line evaluated, dates valid, code
 * blocks balanced), datasets (token files and their errors, splits, domain
 * labels) and the sampler (determinism, shifted targets, ranges, shuffled
 * windows forming a permutation). Prints TAP and throughput as comments. */
#include "../../src/train/corpus.h"
#include "../../src/train/dataset.h"
#include "tap.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>



static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static moe_corpus gen(uint64_t seed, int64_t docs, int64_t bytes) {
    moe_corpus c;
    if (moe_corpus_generate(seed, docs, bytes, &c) != MOE_OK) {
        fprintf(stderr, "corpus failed: %s\n", moe_last_error());
        exit(2);
    }
    return c;
}

/* ------------------------------------------------ arithmetic evaluation -- */

/* expr := term {('+'|'-') term}; term := factor {'*' factor}; factor := int | '(' expr ')' */
typedef struct { const char *p; int bad; } parser;
static long long p_expr(parser *ps);
static void skip(parser *ps) { while (*ps->p == ' ') ps->p++; }
static long long p_factor(parser *ps) {
    skip(ps);
    if (*ps->p == '(') {
        ps->p++;
        long long v = p_expr(ps);
        skip(ps);
        if (*ps->p != ')') ps->bad = 1;
        else ps->p++;
        return v;
    }
    if (*ps->p < '0' || *ps->p > '9') { ps->bad = 1; return 0; }
    long long v = 0;
    while (*ps->p >= '0' && *ps->p <= '9') v = v * 10 + (*ps->p++ - '0');
    return v;
}
static long long p_term(parser *ps) {
    long long v = p_factor(ps);
    for (;;) {
        skip(ps);
        if (*ps->p != '*') return v;
        ps->p++;
        v *= p_factor(ps);
    }
}
static long long p_expr(parser *ps) {
    long long v = p_term(ps);
    for (;;) {
        skip(ps);
        char op = *ps->p;
        if (op != '+' && op != '-') return v;
        ps->p++;
        long long w = p_term(ps);
        v = op == '+' ? v + w : v - w;
    }
}

/* Checks every complete line "expr = result." of one arithmetic document. */
static int check_arith_doc(const char *s, int64_t n, char *why, size_t whylen) {
    int lines = 0;
    const char *end = s + n;
    while (s < end) {
        const char *nl = memchr(s, '\n', (size_t)(end - s));
        if (!nl) break;   /* a line cut by the byte budget */
        if (nl == s) { s++; continue; }
        char line[128];
        size_t len = (size_t)(nl - s);
        if (len >= sizeof line) { snprintf(why, whylen, "line too long"); return -1; }
        memcpy(line, s, len);
        line[len] = '\0';
        char *eq = strstr(line, " = ");
        if (!eq || line[len - 1] != '.') { snprintf(why, whylen, "malformed line '%s'", line); return -1; }
        *eq = '\0';
        parser ps = {line, 0};
        long long lhs = p_expr(&ps);
        skip(&ps);
        char *endp;
        long long rhs = strtoll(eq + 3, &endp, 10);
        if (ps.bad || *ps.p || *endp != '.' || lhs != rhs) {
            snprintf(why, whylen, "'%s = %s' evaluates to %lld", line, eq + 3, lhs);
            return -1;
        }
        lines++;
        s = nl + 1;
    }
    return lines;
}

/* ------------------------------------------------------------- corpus -- */

static void test_corpus(void) {
    moe_corpus a = gen(7, 400, 0), b = gen(7, 400, 0), c = gen(8, 400, 0);
    report(a.num_bytes == b.num_bytes && !memcmp(a.text, b.text, (size_t)a.num_bytes) &&
               !memcmp(a.doc_domains, b.doc_domains, 400 * sizeof(int32_t)),
           "corpus: the same seed gives the same bytes and labels", "differs");
    report(c.num_bytes != a.num_bytes || memcmp(a.text, c.text, (size_t)a.num_bytes) != 0,
           "corpus: another seed gives other bytes", "identical");
    report(a.num_docs == 400 && a.doc_offsets[0] == 0 && a.doc_offsets[400] == a.num_bytes &&
               (int64_t)strlen(a.text) == a.num_bytes,
           "corpus: num_documents gives that many documents, offsets span the text", "docs %lld", (long long)a.num_docs);

    /* a byte budget gives exactly that many bytes, a prefix of the longer corpus */
    int64_t budget = a.doc_offsets[200] + 17;
    moe_corpus p = gen(7, 0, budget);
    report(p.num_bytes == budget && p.num_docs == 201 && !memcmp(p.text, a.text, (size_t)budget) &&
               p.doc_offsets[201] == budget,
           "corpus: num_bytes is exact and a prefix of the same seed's documents", "bytes %lld docs %lld",
           (long long)p.num_bytes, (long long)p.num_docs);

    int ok = 1;
    for (int64_t i = 0; i < 400 && ok; i += 37) {
        char buf[8192];
        int dom;
        int64_t len = moe_corpus_document(7, i, buf, sizeof buf, &dom);
        ok = len == a.doc_offsets[i + 1] - a.doc_offsets[i] && dom == a.doc_domains[i] &&
             !memcmp(buf, a.text + a.doc_offsets[i], (size_t)len);
    }
    report(ok, "corpus: one document regenerates alone from (seed, index)", "mismatch");

    int ascii = 1, sep = 1;
    for (int64_t i = 0; i < a.num_bytes; i++) {
        unsigned char ch = (unsigned char)a.text[i];
        if (!(ch == '\n' || (ch >= 32 && ch < 127))) ascii = 0;
    }
    for (int64_t d = 0; d < a.num_docs; d++) {
        int64_t e = a.doc_offsets[d + 1];
        if (e - a.doc_offsets[d] < 3 || a.text[e - 1] != '\n' || a.text[e - 2] != '\n') sep = 0;
    }
    report(ascii, "corpus: plain printable ASCII and newlines only", "non-ASCII byte");
    report(sep, "corpus: every document ends with a blank line", "missing separator");
    moe_corpus_free(&b);
    moe_corpus_free(&c);
    moe_corpus_free(&p);

    /* domains: balanced, and each has its own signature */
    moe_corpus big = gen(11, 4000, 0);
    int64_t count[MOE_CORPUS_NUM_DOMAINS] = {0}, bytes[MOE_CORPUS_NUM_DOMAINS] = {0};
    int arith_lines = 0, arith_ok = 1, dates_ok = 1, code_ok = 1;
    char why[256] = "";
    for (int64_t d = 0; d < big.num_docs; d++) {
        int dom = big.doc_domains[d];
        const char *s = big.text + big.doc_offsets[d];
        int64_t n = big.doc_offsets[d + 1] - big.doc_offsets[d];
        if (dom < 0 || dom >= MOE_CORPUS_NUM_DOMAINS) { arith_ok = 0; continue; }
        count[dom]++;
        bytes[dom] += n;
        if (dom == MOE_DOMAIN_ARITHMETIC && arith_ok) {
            int k = check_arith_doc(s, n, why, sizeof why);
            if (k < 0) arith_ok = 0;
            else arith_lines += k;
        } else if (dom == MOE_DOMAIN_RECORDS) {
            for (int64_t i = 0; i + 10 <= n; i++) {
                int y, m, dd;
                char tail;
                if (s[i + 4] == '-' && s[i + 7] == '-' && sscanf(s + i, "%4d-%2d-%2d%c", &y, &m, &dd, &tail) == 4) {
                    static const int md[] = {31, 29, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31};
                    int leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
                    if (m < 1 || m > 12 || dd < 1 || dd > md[m - 1] || (m == 2 && dd == 29 && !leap)) dates_ok = 0;
                }
            }
        } else if (dom == MOE_DOMAIN_CODE) {
            /* C-like: braces and parentheses balance; Lua-like: each block opener has its end */
            int br = 0, pa = 0, opens = 0, ends = 0, lua = !strncmp(s, "local function", 14);
            for (int64_t i = 0; i < n; i++) {
                br += s[i] == '{' ? 1 : s[i] == '}' ? -1 : 0;
                pa += s[i] == '(' ? 1 : s[i] == ')' ? -1 : 0;
                if (i == 0 || s[i - 1] == '\n') {
                    int64_t j = i;
                    while (j < n && s[j] == ' ') j++;
                    if (!strncmp(s + j, "local function", 14) || !strncmp(s + j, "if ", 3) || !strncmp(s + j, "for ", 4)) opens++;
                    if (!strncmp(s + j, "end\n", 4)) ends++;
                    if ((j - i) % (lua ? 2 : 4) != 0) code_ok = 0;   /* consistent indentation */
                }
            }
            if (br != 0 || pa != 0 || (lua && opens != ends)) code_ok = 0;
        }
    }
    int balanced = 1;
    for (int d = 0; d < MOE_CORPUS_NUM_DOMAINS; d++) balanced &= count[d] > 800 && count[d] < 1200;
    report(balanced, "corpus: the four domains are about equally frequent", "%lld %lld %lld %lld",
           (long long)count[0], (long long)count[1], (long long)count[2], (long long)count[3]);
    report(arith_ok && arith_lines > 5000, "corpus: every arithmetic line is correct", "%s (%d lines)", why, arith_lines);
    report(dates_ok, "corpus: every record date is a real date", "bad date");
    report(code_ok, "corpus: code blocks balance and indent consistently", "unbalanced");
    printf("# corpus: %lld docs, mean bytes arithmetic %.0f code %.0f records %.0f prose %.0f\n", (long long)big.num_docs,
           (double)bytes[0] / (double)count[0], (double)bytes[1] / (double)count[1], (double)bytes[2] / (double)count[2],
           (double)bytes[3] / (double)count[3]);
    moe_corpus_free(&big);

    moe_corpus bad;
    report(moe_corpus_generate(1, 0, 0, &bad) == MOE_ERR_ARG && moe_corpus_generate(1, 5, 5, &bad) == MOE_ERR_ARG &&
               moe_corpus_generate(1, -1, 0, &bad) == MOE_ERR_ARG && strstr(moe_last_error(), "exactly one"),
           "corpus: needs exactly one positive size", "%s", moe_last_error());

    double t0 = now();
    moe_corpus m = gen(5, 0, 32 << 20);
    double dt = now() - t0;
    printf("# corpus generation: %.1f MB/s (32 MiB in %.3f s)\n", 32.0 * 1.048576 / dt, dt);
    report(dt < 5.0, "corpus: generation is fast", "%.2f s for 32 MiB", dt);
    moe_corpus_free(&m);
    moe_corpus_free(&a);
}

/* ------------------------------------------------------------ datasets -- */

static char tmpdir[] = "/tmp/moelab_test_data_XXXXXX";

static const char *write_file(const char *name, const void *data, size_t n) {
    static char path[256];
    snprintf(path, sizeof path, "%s/%s", tmpdir, name);
    FILE *f = fopen(path, "wb");
    if (!f || fwrite(data, 1, n, f) != n) { fprintf(stderr, "cannot write %s\n", path); exit(2); }
    fclose(f);
    return path;
}

/* A uint32 token file whose id at position p is p: every window names its start. */
static moe_dataset *position_dataset(int64_t n) {
    uint32_t *ids = malloc(sizeof(uint32_t) * (size_t)n);
    for (int64_t i = 0; i < n; i++) ids[i] = (uint32_t)i;
    const char *path = write_file("pos.u32", ids, sizeof(uint32_t) * (size_t)n);
    free(ids);
    moe_dataset *ds = moe_dataset_from_token_file(path, 4, 0);
    if (!ds) { fprintf(stderr, "%s\n", moe_last_error()); exit(2); }
    return ds;
}

static void test_token_files(void) {
    uint16_t ids[6] = {5, 0, 65535, 7, 300, 1};
    const char *p = write_file("a.u16", ids, sizeof ids);
    moe_dataset *ds = moe_dataset_from_token_file(p, 2, 0);
    int64_t back[6] = {0};
    int ok = ds && moe_dataset_num_tokens(ds) == 6 && moe_dataset_vocab_size(ds) == 65536 &&
             moe_dataset_tokens(ds, 0, 6, back) == MOE_OK && !moe_dataset_is_byte_level(ds);
    for (int i = 0; ok && i < 6; i++) ok = back[i] == ids[i];
    report(ok, "token file: uint16 ids read back, vocab inferred as max + 1", "%s", ok ? "" : moe_last_error());
    moe_dataset_free(ds);

    ds = moe_dataset_from_token_file(p, 2, 1000);
    report(!ds && strstr(moe_last_error(), "65535") && strstr(moe_last_error(), "position 2"),
           "token file: an id above vocab_size is an error naming it", "%s", moe_last_error());
    report(!moe_dataset_from_token_file("/nonexistent/x.u16", 2, 0) && moe_last_status() == MOE_ERR_IO &&
               strstr(moe_last_error(), "No such file"),
           "token file: a missing file is an error", "%s", moe_last_error());
    p = write_file("empty.u16", "", 0);
    report(!moe_dataset_from_token_file(p, 2, 0) && strstr(moe_last_error(), "empty"),
           "token file: an empty file is an error", "%s", moe_last_error());
    p = write_file("odd.u16", "abc", 3);
    report(!moe_dataset_from_token_file(p, 2, 0) && strstr(moe_last_error(), "not a multiple of 2"),
           "token file: a size that is not a multiple of the width is an error", "%s", moe_last_error());
    report(!moe_dataset_from_token_file(p, 3, 0) && strstr(moe_last_error(), "width"),
           "token file: the width must be 2 or 4", "%s", moe_last_error());
    report(!moe_dataset_from_token_file(tmpdir, 2, 0) && strstr(moe_last_error(), "regular file"),
           "token file: a directory is an error", "%s", moe_last_error());

    p = write_file("t.txt", "hello\n", 6);
    ds = moe_dataset_from_text_file(p);
    char txt[8] = "";
    report(ds && moe_dataset_num_tokens(ds) == 6 && moe_dataset_is_byte_level(ds) &&
               moe_dataset_bytes(ds, 1, 4, txt) == MOE_OK && !memcmp(txt, "ell", 3),
           "text file: byte-level, memory-mapped", "%s", moe_last_error());
    moe_dataset_free(ds);
}

static void test_split(void) {
    moe_dataset *ds = moe_dataset_from_corpus(3, 100, 0), *tr, *ho;
    int64_t n = moe_dataset_num_tokens(ds);
    moe_status s0 = moe_dataset_split(ds, 0.1, &tr, &ho);
    report(s0 == MOE_OK && moe_dataset_num_tokens(tr) + moe_dataset_num_tokens(ho) == n,
           "split: the parts cover the dataset", "%s", moe_last_error());
    /* the cut falls on a document start: the held-out part begins a document */
    int64_t t0 = moe_dataset_num_tokens(tr);
    moe_corpus c = gen(3, 100, 0);
    int on_boundary = 0;
    for (int64_t d = 1; d < 100; d++) on_boundary |= c.doc_offsets[d] == t0;
    double frac = (double)moe_dataset_num_tokens(ho) / (double)n;
    report(on_boundary && frac > 0.05 && frac < 0.15 &&
               moe_dataset_num_documents(tr) + moe_dataset_num_documents(ho) == 100,
           "split: at a document boundary near the fraction", "held-out fraction %.3f", frac);
    int labels = 1;
    for (int64_t i = 0; i < moe_dataset_num_tokens(ho); i += 7) {
        int64_t d = 0;
        while (c.doc_offsets[d + 1] <= t0 + i) d++;
        labels &= moe_dataset_domain_at(ho, i) == c.doc_domains[d];
    }
    report(labels, "split: domain labels follow the documents into the held-out part", "mismatch");
    moe_corpus_free(&c);
    moe_dataset_free(tr);
    moe_dataset_free(ho);

    moe_dataset *pos = position_dataset(1000);
    /* split first: report's arguments are evaluated in no fixed order */
    moe_status st = moe_dataset_split(pos, 0.25, &tr, &ho);
    report(st == MOE_OK && moe_dataset_num_tokens(tr) == 750 && moe_dataset_num_documents(tr) == 0,
           "split: without documents, at the token position", "%lld", (long long)moe_dataset_num_tokens(tr));
    int64_t first = -1;
    moe_dataset_tokens(ho, 0, 1, &first);
    report(first == 750, "split: the held-out part starts where training ends", "first id %lld", (long long)first);
    moe_dataset_free(tr);
    moe_dataset_free(ho);
    report(moe_dataset_split(pos, 1.0, &tr, &ho) == MOE_ERR_ARG && moe_dataset_split(pos, 0, &tr, &ho) == MOE_ERR_ARG,
           "split: the fraction must be inside (0, 1)", "%s", moe_last_error());
    moe_dataset_free(pos);
    moe_dataset_free(ds);
}

static void test_sampler(void) {
    enum { B = 16, T = 64, N = 100000 };
    moe_dataset *pos = position_dataset(N);
    static int64_t ids[B * T], tg[B * T], dm[B * T], ids2[B * T], tg2[B * T];
    moe_status s1 = moe_dataset_batch(pos, 42, 0, 9, B, T, ids, tg, dm);
    moe_status s2 = moe_dataset_batch(pos, 42, 0, 9, B, T, ids2, tg2, NULL);
    report(s1 == MOE_OK && s2 == MOE_OK && !memcmp(ids, ids2, sizeof ids) && !memcmp(tg, tg2, sizeof tg),
           "batch: the same (seed, epoch, step) gives the same batch", "%s", moe_last_error());
    int shifted = 1, inrange = 1, nolabels = 1;
    for (int r = 0; r < B; r++) {
        int64_t st = ids[r * T];
        inrange &= st >= 0 && st <= N - T - 1;
        for (int t = 0; t < T; t++) {
            shifted &= ids[r * T + t] == st + t && tg[r * T + t] == st + t + 1;
            nolabels &= dm[r * T + t] == -1;
        }
    }
    report(shifted && inrange, "batch: contiguous windows in range, targets shifted by one", "bad window");
    report(nolabels, "batch: domains are -1 without documents", "label");

    /* row r depends on (step, r) only: a larger batch starts with the smaller one */
    static int64_t big[2 * B * T], bigt[2 * B * T];
    moe_dataset_batch(pos, 42, 0, 9, 2 * B, T, big, bigt, NULL);
    report(!memcmp(big, ids, sizeof ids), "batch: row r is the same whatever the batch size", "differs");
    moe_dataset_batch(pos, 42, 0, 10, B, T, ids2, tg2, NULL);
    int diff_step = memcmp(ids, ids2, sizeof ids) != 0;
    moe_dataset_batch(pos, 43, 0, 9, B, T, ids2, tg2, NULL);
    int diff_seed = memcmp(ids, ids2, sizeof ids) != 0;
    moe_dataset_batch(pos, 42, 1, 9, B, T, ids2, tg2, NULL);
    int diff_epoch = memcmp(ids, ids2, sizeof ids) != 0;
    report(diff_step && diff_seed && diff_epoch, "batch: step, seed and epoch each change the batch", "%d %d %d",
           diff_step, diff_seed, diff_epoch);

    /* starts are uniform: the mean start is near the middle over many rows */
    double mean = 0;
    int rows = 0;
    for (int step = 0; step < 200; step++) {
        moe_dataset_batch(pos, 1, 0, (uint64_t)step, B, T, ids2, tg2, NULL);
        for (int r = 0; r < B; r++, rows++) mean += (double)ids2[r * T];
    }
    mean /= rows;
    report(mean > 0.45 * N && mean < 0.55 * N, "batch: start positions are uniform", "mean %.0f", mean);

    report(moe_dataset_batch(pos, 1, 0, 0, B, N, ids, tg, NULL) == MOE_ERR_ARG && strstr(moe_last_error(), "needs at least"),
           "batch: seq_len beyond the dataset is an error", "%s", moe_last_error());
    report(moe_dataset_batch(pos, 1, 0, 0, 0, T, ids, tg, NULL) == MOE_ERR_ARG,
           "batch: batch_size 0 is an error", "%s", moe_last_error());

    /* windows: natural order, then a shuffled permutation per epoch */
    int64_t nw = moe_dataset_num_windows(pos, T);
    report(nw == (N - 1) / T, "windows: (n - 1) / seq_len of them", "%lld", (long long)nw);
    char *seen = calloc((size_t)nw, 1);
    int64_t *order0 = calloc((size_t)nw, sizeof(int64_t));
    int perm = 1, natural = 1;
    int64_t *wi = malloc(sizeof(int64_t) * (size_t)(100 * T)), *wt = malloc(sizeof(int64_t) * (size_t)(100 * T));
    moe_dataset_window_batch(pos, T, 5, 3, 0, 0, 0, wi, wt, NULL);
    for (int r = 0; r < 3; r++) natural &= wi[r * T] == (5 + r) * T && wt[r * T + T - 1] == (5 + r) * T + T;
    report(natural, "windows: natural order without shuffling", "window start %lld", (long long)wi[0]);
    for (int64_t first = 0; first < nw; first += 100) {
        int64_t cnt = nw - first < 100 ? nw - first : 100;
        if (moe_dataset_window_batch(pos, T, first, cnt, 1, 7, 3, wi, wt, NULL) != MOE_OK) { perm = 0; break; }
        for (int64_t r = 0; r < cnt; r++) {
            int64_t w = wi[r * T] / T;
            if (wi[r * T] % T || w < 0 || w >= nw || seen[w]) perm = 0;
            else seen[w] = 1;
            order0[first + r] = w;
        }
    }
    report(perm, "windows: a shuffled epoch visits every window once", "repeat or gap");
    int64_t w1;
    moe_dataset_window_batch(pos, T, 0, 1, 1, 7, 4, wi, wt, NULL);
    w1 = wi[0] / T;
    moe_dataset_window_batch(pos, T, 10, 1, 1, 7, 3, wi, wt, NULL);
    int same_epoch = wi[0] / T == order0[10];
    int moved = 0;
    for (int64_t i = 0; i < nw; i++) moved += order0[i] != i;
    report(same_epoch && moved > nw / 2 && (w1 != order0[0] || nw < 3),
           "windows: the order depends on (seed, epoch) and is reproducible", "moved %d", moved);
    report(moe_dataset_window_batch(pos, T, nw - 1, 2, 0, 0, 0, wi, wt, NULL) == MOE_ERR_RANGE,
           "windows: past the last window is an error", "%s", moe_last_error());
    free(seen); free(order0); free(wi); free(wt);
    moe_dataset_free(pos);

    /* domain labels of corpus windows match the documents */
    moe_dataset *cd = moe_dataset_from_corpus(9, 300, 0);
    moe_corpus c = gen(9, 300, 0);
    int lab = 1;
    for (int64_t w = 0; w < moe_dataset_num_windows(cd, T); w += 13) {
        moe_dataset_window_batch(cd, T, w, 1, 0, 0, 0, ids, tg, dm);
        for (int t = 0; t < T; t++) {
            int64_t p = w * T + t, d = 0;
            while (c.doc_offsets[d + 1] <= p) d++;
            lab &= dm[t] == c.doc_domains[d] && ids[t] == (unsigned char)c.text[p];
        }
    }
    report(lab, "windows: per-token domain labels follow the documents", "mismatch");
    moe_corpus_free(&c);

    /* throughput of the sampler itself, B = 16, T = 256 */
    moe_dataset *mb = moe_dataset_from_corpus(1, 0, 1 << 20);
    static int64_t bi[16 * 256], bt[16 * 256], bd[16 * 256];
    double t0 = now();
    int nb = 20000;
    for (int i = 0; i < nb; i++) moe_dataset_batch(mb, 1, 0, (uint64_t)i, 16, 256, bi, bt, bd);
    double dt = now() - t0;
    printf("# sampler (C, B=16 T=256, with domain labels, 1 MiB corpus): %.0f batches/s\n", nb / dt);
    report(nb / dt > 1000, "batch: sampling is fast", "%.0f batches/s", nb / dt);
    moe_dataset_free(mb);
    moe_dataset_free(cd);
}

int main(void) {
    if (!mkdtemp(tmpdir)) { perror("mkdtemp"); return 2; }
    test_corpus();
    test_token_files();
    test_split();
    test_sampler();
    char cmd[300];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", tmpdir);
    return tap_done();
}
