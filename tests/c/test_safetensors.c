/* safetensors and file I/O from C: what the Lua specs cannot reach. A write
 * that fails halfway through the data (a device tensor with no backend to
 * copy it) must leave the old file and no temp file; zero-copy tensors hold
 * the mapping after the reader closes; misaligned data from other writers is
 * copied; every header corruption is refused with a message naming the
 * problem. Prints TAP. */
#include "../../src/core/context.h"
#include "../../src/io/fileio.h"
#include "../../src/io/safetensors.h"
#include "../../src/ops/backend.h"
#include "tap.h"

#include <dirent.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>



static moe_tensor *f32_range(int64_t n, float scale) {
    moe_tensor *t = moe_tensor_new_cpu(MOE_F32, 1, &n);
    for (int64_t i = 0; i < n; i++) moe_f32(t)[i] = scale * (float)i;
    return t;
}

static int count_temp_files(const char *dir, const char *base) {
    DIR *d = opendir(dir);
    int n = 0;
    struct dirent *e;
    char prefix[256];
    snprintf(prefix, sizeof prefix, "%s.tmp.", base);
    while (d && (e = readdir(d)))
        if (!strncmp(e->d_name, prefix, strlen(prefix))) n++;
    if (d) closedir(d);
    return n;
}

/* Writes raw bytes: an 8-byte length, the header text, then `data`. */
static void write_raw(const char *path, const char *header, const void *data, size_t ndata) {
    FILE *f = fopen(path, "wb");
    uint64_t n = strlen(header);
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)(n >> (8 * i));
    fwrite(len8, 1, 8, f);
    fwrite(header, 1, n, f);
    if (ndata) fwrite(data, 1, ndata, f);
    fclose(f);
}

static void expect_open_error(const char *dir, const char *name, const char *header, size_t ndata,
                              const char *needle) {
    char path[512];
    snprintf(path, sizeof path, "%s/%s.safetensors", dir, name);
    unsigned char data[64] = {0};
    write_raw(path, header, data, ndata);
    moe_st_file *f = moe_st_open(path);
    const char *msg = moe_last_error();
    report(!f && strstr(msg, needle) && strstr(msg, path), name, "expected an error containing '%s', got %s", needle,
           f ? "success" : msg);
    moe_st_close(f);
}

int main(void) {
    moe_ctx *ctx = moe_ctx_new(1);
    moe_cpu_backend_install(ctx);   /* no CUDA backend, even in the CUDA build */
    char dir[] = "/tmp/moelab_st_XXXXXX";
    if (!mkdtemp(dir)) { perror("mkdtemp"); return 2; }
    char path[512];
    snprintf(path, sizeof path, "%s/ckpt.safetensors", dir);

    /* a good file */
    moe_tensor *a = f32_range(6, 1.0f), *b = f32_range(3, 2.0f);
    const char *names[] = {"a", "b", "gpu"};
    moe_tensor *ts[] = {a, b, NULL};
    const char *mk[] = {"step"}, *mv[] = {"1"};
    moe_status st = moe_st_save(ctx, path, 2, names, ts, 1, mk, mv);
    report(st == MOE_OK, "save", "%s", moe_last_error());

    /* a write that fails midway: a and b are written, then the device tensor
     * cannot be copied (no backend) */
    float fake[4] = {0};
    moe_storage *s = moe_storage_wrap(fake, sizeof fake, (moe_device){MOE_CUDA, 0});
    int64_t four = 4;
    moe_tensor *gpu = moe_tensor_from_storage(s, 0, MOE_F32, 1, &four, NULL);
    moe_storage_release(s);
    ts[2] = gpu;
    moe_tensor *c = f32_range(6, -1.0f);
    ts[0] = c;   /* different contents, to tell the files apart */
    st = moe_st_save(ctx, path, 3, names, ts, 0, NULL, NULL);
    report(st != MOE_OK && strstr(moe_last_error(), "tensor 'gpu'"), "midway failure is reported",
           "status %d: %s", (int)st, moe_last_error());
    report(count_temp_files(dir, "ckpt.safetensors") == 0, "midway failure removes the temp file", "temp file left");
    moe_st_file *f = moe_st_open(path);
    report(f && moe_st_count(f) == 2 && moe_st_find(f, "gpu") == NULL, "midway failure keeps the old file", "%s",
           f ? "file changed" : moe_last_error());
    if (f) {
        moe_tensor *ra = moe_st_tensor(f, moe_st_find(f, "a"));
        report(ra && moe_f32(ra)[5] == 5.0f, "old contents intact", "a[5] = %g", ra ? moe_f32(ra)[5] : -1.0);
        /* zero-copy: the storage points into the mapping and keeps it alive */
        report(ra && ra->storage->release != NULL && ra->storage->alloc == NULL, "load is zero-copy",
               "storage is not a mapping view");
        report(!strcmp(moe_st_metadata_get(f, "step"), "1"), "metadata", "step = %s", moe_st_metadata_get(f, "step"));
        moe_st_close(f);
        /* the mapping outlives the reader, and writes stay private */
        moe_f32(ra)[0] = 42.0f;
        report(moe_f32(ra)[0] == 42.0f && moe_f32(ra)[1] == 1.0f, "tensor usable after close", "values changed");
        moe_st_file *g = moe_st_open(path);
        moe_tensor *again = g ? moe_st_tensor(g, moe_st_find(g, "a")) : NULL;
        report(again && moe_f32(again)[0] == 0.0f, "writes to a loaded tensor do not reach the file", "a[0] = %g",
               again ? moe_f32(again)[0] : -1.0);
        moe_tensor_release(again);
        moe_st_close(g);
        moe_tensor_release(ra);
    }

    /* data misaligned for its dtype (legal in the format): loaded as a copy */
    {
        char mis[512];
        snprintf(mis, sizeof mis, "%s/misaligned.safetensors", dir);
        /* the data starts 8-aligned (padded header), so x at byte 1 is not */
        char hdr[256] = "{\"u\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                          "\"x\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[1,9]}}";
        while ((8 + strlen(hdr)) % 8) strcat(hdr, " ");
        unsigned char data[9] = {7};
        float xv[2] = {1.5f, -2.5f};
        memcpy(data + 1, xv, 8);
        write_raw(mis, hdr, data, 9);
        moe_st_file *m = moe_st_open(mis);
        moe_tensor *x = m ? moe_st_tensor(m, moe_st_find(m, "x")) : NULL;
        report(x && moe_f32(x)[0] == 1.5f && moe_f32(x)[1] == -2.5f && x->storage->release == NULL,
               "misaligned data is copied", "%s", x ? "wrong values or not a copy" : moe_last_error());
        moe_tensor *x16 = m ? moe_st_tensor_as(m, moe_st_find(m, "x"), MOE_BF16) : NULL;
        report(x16 && x16->dtype == MOE_BF16 && moe_bf16_to_f32(((uint16_t *)moe_tensor_data(x16))[1]) == -2.5f,
               "conversion on load", "%s", moe_last_error());
        moe_tensor_release(x);
        moe_tensor_release(x16);
        moe_st_close(m);
    }

    /* header corruptions */
    expect_open_error(dir, "gap", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}", 3, "without gaps");
    expect_open_error(dir, "overlap",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]},"
                      "\"b\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[1,3]}}", 3, "overlaps");
    expect_open_error(dir, "trailing_data", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 5,
                      "cover only 2");
    expect_open_error(dir, "out_of_range", "{\"a\":{\"dtype\":\"U8\",\"shape\":[2],\"data_offsets\":[0,2]}}", 1,
                      "reach past the data");
    expect_open_error(dir, "size_mismatch", "{\"a\":{\"dtype\":\"F32\",\"shape\":[2],\"data_offsets\":[0,4]}}", 4,
                      "needs 8.0 bytes");
    expect_open_error(dir, "bad_dtype", "{\"a\":{\"dtype\":\"F33\",\"shape\":[1],\"data_offsets\":[0,4]}}", 4,
                      "unknown dtype 'F33'");
    expect_open_error(dir, "negative_dim", "{\"a\":{\"dtype\":\"U8\",\"shape\":[-1],\"data_offsets\":[0,0]}}", 0,
                      "shape[0] must be a non-negative integer");
    expect_open_error(dir, "reversed", "{\"a\":{\"dtype\":\"U8\",\"shape\":[0],\"data_offsets\":[2,0]}}", 2,
                      "end before they begin");
    expect_open_error(dir, "duplicate",
                      "{\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[0,1]},"
                      "\"a\":{\"dtype\":\"U8\",\"shape\":[1],\"data_offsets\":[1,2]}}", 2, "appears twice");
    expect_open_error(dir, "bad_json", "{\"a\":{\"dtype\":\"U8\",", 0, "not valid JSON");
    expect_open_error(dir, "trailing_json", "{} x", 0, "trailing bytes");
    expect_open_error(dir, "not_object", "[1, 2]", 0, "not a JSON object");
    expect_open_error(dir, "bad_metadata", "{\"__metadata__\":{\"k\":1}}", 0, "must be a string");
    /* F8 opens (it is a valid safetensors dtype) but cannot be loaded */
    {
        char p8[512];
        snprintf(p8, sizeof p8, "%s/f8.safetensors", dir);
        unsigned char d8[2] = {1, 2};
        write_raw(p8, "{\"w\":{\"dtype\":\"F8_E4M3\",\"shape\":[2],\"data_offsets\":[0,2]}}", d8, 2);
        moe_st_file *m = moe_st_open(p8);
        moe_tensor *w = m ? moe_st_tensor(m, moe_st_entry_at(m, 0)) : NULL;
        report(m && !w && moe_last_status() == MOE_ERR_DTYPE && strstr(moe_last_error(), "F8_E4M3"),
               "F8 opens, loading it is a dtype error", "%s", moe_last_error());
        moe_st_close(m);
    }

    /* atomic write of bytes and mkdir -p */
    char sub[600];
    snprintf(sub, sizeof sub, "%s/x/y/z", dir);
    report(moe_io_mkdir_p(sub) == MOE_OK && moe_io_mkdir_p(sub) == MOE_OK, "mkdir_p", "%s", moe_last_error());
    char *text = NULL;
    size_t n = 0;
    snprintf(sub, sizeof sub, "%s/x/y/z/note.json", dir);
    st = moe_io_write_file_atomic(sub, "{\"k\": 1}", 8);
    if (st == MOE_OK) st = moe_io_read_file(sub, &text, &n);
    report(st == MOE_OK && n == 8 && !strcmp(text, "{\"k\": 1}"), "write_file_atomic + read_file", "%s",
           moe_last_error());
    free(text);

    moe_tensor_release(a);
    moe_tensor_release(b);
    moe_tensor_release(c);
    moe_tensor_release(gpu);
    moe_ctx_free(ctx);
    char cmd[600];
    snprintf(cmd, sizeof cmd, "rm -rf %s", dir);
    if (system(cmd) != 0) fprintf(stderr, "could not remove %s\n", dir);
    return tap_done();
}
