/* Writing safetensors atomically. The header is built with cJSON (keys in
 * the caller's order, metadata first) and padded with spaces so the data
 * starts 8-byte aligned; the data is laid out widest dtype first so every
 * tensor's offset is a multiple of its element size, which lets the reader
 * hand out zero-copy views. */
#include "safetensors.h"
#include "fileio.h"

#include <cjson/cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "../ops/ops.h"

typedef struct {
    moe_ctx *ctx;
    size_t n;
    const char *const *names;
    moe_tensor *const *tensors;
    const size_t *order;      /* data order */
    const char *header;       /* padded JSON */
    size_t header_len;
} write_job;

/* Integers as raw JSON text: cJSON would print doubles, which switch to
 * exponent notation above 1e15 and that other readers reject as offsets. */
static cJSON *add_uint_array(cJSON *obj, const char *key, int n, const uint64_t *v) {
    cJSON *arr = cJSON_AddArrayToObject(obj, key);
    if (!arr) return NULL;
    for (int i = 0; i < n; i++) {
        char buf[32];
        snprintf(buf, sizeof buf, "%" PRIu64, v[i]);
        cJSON *num = cJSON_CreateRaw(buf);
        if (!num || !cJSON_AddItemToArray(arr, num)) { cJSON_Delete(num); return NULL; }
    }
    return arr;
}

static moe_status validate(size_t n, const char *const *names, moe_tensor *const *tensors, size_t nmeta,
                           const char *const *keys, const char *const *values) {
    for (size_t i = 0; i < n; i++) {
        if (!names[i]) return moe_error(MOE_ERR_ARG, "name %zu is missing", i + 1);
        if (!strcmp(names[i], "__metadata__"))
            return moe_error(MOE_ERR_ARG, "'__metadata__' is reserved and cannot name a tensor");
        if (!tensors[i]) return moe_error(MOE_ERR_ARG, "tensor '%s' is missing", names[i]);
        if ((unsigned)tensors[i]->dtype >= MOE_NUM_DTYPES)
            return moe_error(MOE_ERR_DTYPE, "tensor '%s' has an unknown dtype", names[i]);
        /* quadratic, but n is the number of parameters tensors (hundreds) */
        for (size_t j = 0; j < i; j++)
            if (!strcmp(names[i], names[j])) return moe_error(MOE_ERR_ARG, "tensor name '%s' is given twice", names[i]);
    }
    for (size_t i = 0; i < nmeta; i++) {
        if (!keys[i] || !values[i]) return moe_error(MOE_ERR_ARG, "metadata entry %zu is missing", i + 1);
        for (size_t j = 0; j < i; j++)
            if (!strcmp(keys[i], keys[j])) return moe_error(MOE_ERR_ARG, "metadata key '%s' is given twice", keys[i]);
    }
    return MOE_OK;
}

/* Builds the padded header: JSON, then spaces so that 8 + length is a
 * multiple of 8. */
static char *build_header(size_t n, const char *const *names, moe_tensor *const *tensors, const uint64_t *begin,
                          size_t nmeta, const char *const *keys, const char *const *values, size_t *len) {
    cJSON *root = cJSON_CreateObject();
    int ok = root != NULL;
    if (ok && nmeta > 0) {
        cJSON *meta = cJSON_AddObjectToObject(root, "__metadata__");
        ok = meta != NULL;
        for (size_t i = 0; ok && i < nmeta; i++) ok = cJSON_AddStringToObject(meta, keys[i], values[i]) != NULL;
    }
    for (size_t i = 0; ok && i < n; i++) {
        const moe_tensor *t = tensors[i];
        cJSON *e = cJSON_AddObjectToObject(root, names[i]);
        ok = e && cJSON_AddStringToObject(e, "dtype", moe_st_dtype_name(t->dtype));
        uint64_t shape[MOE_MAX_DIMS];
        for (int d = 0; d < t->ndim; d++) shape[d] = (uint64_t)t->shape[d];
        uint64_t offs[2] = {begin[i], begin[i] + moe_tensor_nbytes(t)};
        ok = ok && add_uint_array(e, "shape", t->ndim, shape) && add_uint_array(e, "data_offsets", 2, offs);
    }
    char *json = ok ? cJSON_PrintUnformatted(root) : NULL;
    cJSON_Delete(root);
    if (!json) return NULL;
    size_t jl = strlen(json), padded = (jl + 7) / 8 * 8;
    char *out = realloc(json, padded + 1);
    if (!out) { cJSON_free(json); return NULL; }
    memset(out + jl, ' ', padded - jl);
    out[padded] = '\0';
    *len = padded;
    return out;
}

static moe_status write_tensor(write_job *j, int fd, const char *path, moe_tensor *t) {
    /* device tensors come over one at a time, so saving needs host memory
     * for the largest tensor only */
    moe_tensor *h = t->device.type == MOE_CPU ? moe_tensor_contiguous_cpu(t)
                                              : moe_op_to(j->ctx, t, MOE_DEVICE_CPU, t->dtype);
    if (!h) return moe_last_status();
    moe_status st = moe_io_write_all(fd, moe_tensor_data(h), moe_tensor_nbytes(h), path);
    moe_tensor_release(h);
    return st;
}

static moe_status fill(int fd, const char *path, void *arg) {
    write_job *j = arg;
    unsigned char len8[8];
    for (int i = 0; i < 8; i++) len8[i] = (unsigned char)((uint64_t)j->header_len >> (8 * i));
    MOE_TRY(moe_io_write_all(fd, len8, 8, path));
    MOE_TRY(moe_io_write_all(fd, j->header, j->header_len, path));
    for (size_t k = 0; k < j->n; k++) {
        moe_tensor *t = j->tensors[j->order[k]];
        if (t->device.type != MOE_CPU && !j->ctx)
            return moe_error(MOE_ERR_DEVICE, "%s: tensor '%s' is on a device and needs a context to be copied",
                             path, j->names[j->order[k]]);
        moe_status st = write_tensor(j, fd, path, t);
        if (st != MOE_OK) return moe_error_context(st, "%s: tensor '%s'", path, j->names[j->order[k]]);
    }
    return MOE_OK;
}

moe_status moe_st_save(moe_ctx *ctx, const char *path, size_t n, const char *const *names,
                       moe_tensor *const *tensors, size_t nmeta, const char *const *meta_keys,
                       const char *const *meta_values) {
    if (!path || !*path) return moe_error(MOE_ERR_ARG, "safetensors save: empty path");
    moe_status st = validate(n, names, tensors, nmeta, meta_keys, meta_values);
    if (st != MOE_OK) return moe_error_context(st, "safetensors save %s", path);

    size_t *order = malloc((n + 1) * sizeof *order);
    uint64_t *begin = malloc((n + 1) * sizeof *begin);
    if (!order || !begin) {
        free(order);
        free(begin);
        return moe_error(MOE_ERR_OOM, "safetensors save %s: out of memory", path);
    }
    /* stable by decreasing element size (8, 4, 2, 1): each offset is then a
     * multiple of the element size of the tensor placed there */
    size_t k = 0;
    for (size_t es = 8; es >= 1; es /= 2)
        for (size_t i = 0; i < n; i++)
            if (moe_dtype_size(tensors[i]->dtype) == es) order[k++] = i;
    uint64_t pos = 0;
    for (size_t i = 0; i < k; i++) {
        begin[order[i]] = pos;
        pos += moe_tensor_nbytes(tensors[order[i]]);
    }
    size_t hlen = 0;
    char *header = k == n ? build_header(n, names, tensors, begin, nmeta, meta_keys, meta_values, &hlen) : NULL;
    free(begin);
    if (!header) {
        free(order);
        return k == n ? moe_error(MOE_ERR_OOM, "safetensors save %s: out of memory building the header", path)
                      : moe_error(MOE_ERR_DTYPE, "safetensors save %s: a dtype has no safetensors equivalent", path);
    }
    write_job j = {ctx, n, names, tensors, order, header, hlen};
    st = moe_io_write_atomic(path, fill, &j);
    free(header);
    free(order);
    if (st != MOE_OK) return moe_error_context(st, "safetensors save");
    return MOE_OK;
}
