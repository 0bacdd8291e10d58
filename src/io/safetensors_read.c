/* Reading safetensors: map, validate the whole header once, then hand out
 * zero-copy views. Validation follows the reference implementation: the
 * header length must fit the file, the JSON must be an object, every entry
 * needs a known dtype, a non-negative shape and offsets whose byte count
 * matches numel * dtype size, and the entries must tile the data exactly. */
#include "safetensors.h"
#include "fileio.h"

#include <cjson/cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "safetensors data is little-endian; zero-copy loading assumes a little-endian host"
#endif

/* The reference implementation refuses headers above 100 MB; so do we, which
 * also keeps a corrupt length from making us parse gigabytes. */
#define MAX_HEADER_BYTES ((uint64_t)100 * 1000 * 1000)
/* Integers above 2^53 do not survive cJSON's doubles. */
#define MAX_JSON_INT ((uint64_t)1 << 53)

struct moe_st_file {
    char *path;
    moe_io_map *map;
    uint64_t data_start, data_len;
    size_t n;
    moe_st_entry *entries;        /* header order */
    moe_st_entry **by_name;       /* sorted by name, for lookup */
    size_t nmeta;
    char **meta;                  /* key, value, key, value ... in header order */
};

/* Every dtype of the format, so files with types moelab cannot compute in
 * (FP8 checkpoints) still open, list and load their other tensors. */
static const struct { const char *name; int bits; int dtype; } st_types[] = {
    {"F64", 64, MOE_F64}, {"F32", 32, MOE_F32}, {"F16", 16, MOE_F16}, {"BF16", 16, MOE_BF16},
    {"I64", 64, MOE_I64}, {"I32", 32, MOE_I32}, {"I16", 16, MOE_I16}, {"I8", 8, MOE_I8},
    {"U64", 64, -1},      {"U32", 32, -1},      {"U16", 16, -1},      {"U8", 8, MOE_U8},
    {"BOOL", 8, MOE_U8},  /* one byte per element, 0 or 1: loads as u8 */
    {"F8_E4M3", 8, -1},   {"F8_E5M2", 8, -1},   {"F8_E8M0", 8, -1},
    {"F6_E2M3", 6, -1},   {"F6_E3M2", 6, -1},   {"F4", 4, -1},        {"C64", 64, -1},
};

const char *moe_st_dtype_name(moe_dtype dt) {
    for (size_t i = 0; i < sizeof st_types / sizeof st_types[0]; i++)
        if (st_types[i].dtype == (int)dt && strcmp(st_types[i].name, "BOOL") != 0) return st_types[i].name;
    return NULL;
}

static int find_type(const char *name) {
    for (size_t i = 0; i < sizeof st_types / sizeof st_types[0]; i++)
        if (!strcmp(st_types[i].name, name)) return (int)i;
    return -1;
}

static int get_uint(const cJSON *v, uint64_t *out) {
    if (!cJSON_IsNumber(v)) return 0;
    double d = v->valuedouble;
    if (!(d >= 0) || d > (double)MAX_JSON_INT || d != (double)(uint64_t)d) return 0;
    *out = (uint64_t)d;
    return 1;
}

static moe_status parse_metadata(moe_st_file *f, const cJSON *m) {
    if (!cJSON_IsObject(m)) return moe_error(MOE_ERR_IO, "__metadata__ must be an object of strings");
    size_t n = (size_t)cJSON_GetArraySize(m);
    f->meta = calloc(2 * n + 1, sizeof *f->meta);
    if (!f->meta) return moe_error(MOE_ERR_OOM, "out of memory");
    const cJSON *kv;
    cJSON_ArrayForEach(kv, m) {
        if (!cJSON_IsString(kv))
            return moe_error(MOE_ERR_IO, "__metadata__ value of '%s' must be a string", kv->string);
        char *k = strdup(kv->string), *v = strdup(kv->valuestring);
        f->meta[2 * f->nmeta] = k;
        f->meta[2 * f->nmeta + 1] = v;
        f->nmeta++;
        if (!k || !v) return moe_error(MOE_ERR_OOM, "out of memory");
    }
    return MOE_OK;
}

static moe_status parse_entry(moe_st_file *f, const cJSON *item, moe_st_entry *e) {
    const char *name = item->string;
    e->name = strdup(name);
    if (!e->name) return moe_error(MOE_ERR_OOM, "out of memory");
    if (!cJSON_IsObject(item))
        return moe_error(MOE_ERR_IO, "tensor '%s': entry must be an object with dtype, shape, data_offsets", name);

    const cJSON *dt = cJSON_GetObjectItemCaseSensitive(item, "dtype");
    if (!cJSON_IsString(dt)) return moe_error(MOE_ERR_IO, "tensor '%s': missing or non-string dtype", name);
    int ti = find_type(dt->valuestring);
    if (ti < 0) return moe_error(MOE_ERR_IO, "tensor '%s': unknown dtype '%s'", name, dt->valuestring);
    e->file_dtype = st_types[ti].name;
    e->dtype = st_types[ti].dtype;

    const cJSON *shape = cJSON_GetObjectItemCaseSensitive(item, "shape");
    if (!cJSON_IsArray(shape)) return moe_error(MOE_ERR_IO, "tensor '%s': missing or non-array shape", name);
    int nd = cJSON_GetArraySize(shape);
    if (nd > MOE_MAX_DIMS)
        return moe_error(MOE_ERR_SHAPE, "tensor '%s': %d dims, moelab supports at most %d", name, nd, MOE_MAX_DIMS);
    e->ndim = nd;
    const cJSON *d;
    int i = 0;
    cJSON_ArrayForEach(d, shape) {
        uint64_t v;
        if (!get_uint(d, &v))
            return moe_error(MOE_ERR_SHAPE, "tensor '%s': shape[%d] must be a non-negative integer", name, i);
        e->shape[i++] = (int64_t)v;
    }
    if (moe_shape_check(e->ndim, e->shape) != MOE_OK)
        return moe_error_context(MOE_ERR_SHAPE, "tensor '%s'", name);

    const cJSON *offs = cJSON_GetObjectItemCaseSensitive(item, "data_offsets");
    if (!cJSON_IsArray(offs) || cJSON_GetArraySize(offs) != 2 || !get_uint(cJSON_GetArrayItem(offs, 0), &e->begin) ||
        !get_uint(cJSON_GetArrayItem(offs, 1), &e->end))
        return moe_error(MOE_ERR_IO, "tensor '%s': data_offsets must be [begin, end] with non-negative integers", name);
    if (e->begin > e->end)
        return moe_error(MOE_ERR_IO, "tensor '%s': data_offsets [%llu, %llu] end before they begin", name,
                         (unsigned long long)e->begin, (unsigned long long)e->end);
    if (e->end > f->data_len)
        return moe_error(MOE_ERR_IO, "tensor '%s': data_offsets [%llu, %llu] reach past the data (%llu bytes)",
                         name, (unsigned long long)e->begin, (unsigned long long)e->end,
                         (unsigned long long)f->data_len);
    /* numel <= 2^48 (checked above) and bits <= 64, so this cannot overflow */
    uint64_t bits = (uint64_t)moe_shape_numel(e->ndim, e->shape) * (uint64_t)st_types[ti].bits;
    if (bits % 8 != 0 || bits / 8 != e->end - e->begin)
        return moe_error(MOE_ERR_SHAPE, "tensor '%s': %s with %lld elements needs %.1f bytes, data_offsets hold %llu",
                         name, e->file_dtype, (long long)moe_shape_numel(e->ndim, e->shape), (double)bits / 8,
                         (unsigned long long)(e->end - e->begin));
    return MOE_OK;
}

static int cmp_offsets(const void *a, const void *b) {
    const moe_st_entry *x = *(moe_st_entry *const *)a, *y = *(moe_st_entry *const *)b;
    if (x->begin != y->begin) return x->begin < y->begin ? -1 : 1;
    return x->end < y->end ? -1 : x->end > y->end;
}

static int cmp_names(const void *a, const void *b) {
    return strcmp((*(moe_st_entry *const *)a)->name, (*(moe_st_entry *const *)b)->name);
}

/* The format requires the tensors to tile the data: sorted by offset, each
 * begins where the previous ends, the first at 0, the last at the end. */
static moe_status check_coverage(moe_st_file *f) {
    moe_st_entry **order = malloc((f->n + 1) * sizeof *order);
    if (!order) return moe_error(MOE_ERR_OOM, "out of memory");
    for (size_t i = 0; i < f->n; i++) order[i] = &f->entries[i];
    qsort(order, f->n, sizeof *order, cmp_offsets);
    uint64_t pos = 0;
    moe_status st = MOE_OK;
    for (size_t i = 0; i < f->n && st == MOE_OK; i++) {
        const moe_st_entry *e = order[i];
        if (e->begin > pos)
            st = moe_error(MOE_ERR_IO, "tensor '%s' starts at byte %llu but the data before it ends at %llu "
                           "(the tensors must cover the data without gaps)", e->name,
                           (unsigned long long)e->begin, (unsigned long long)pos);
        else if (e->begin < pos)
            st = moe_error(MOE_ERR_IO, "tensor '%s' (bytes %llu..%llu) overlaps tensor '%s' (ending at %llu)",
                           e->name, (unsigned long long)e->begin, (unsigned long long)e->end, order[i - 1]->name,
                           (unsigned long long)pos);
        pos = e->end;
    }
    if (st == MOE_OK && pos != f->data_len)
        st = moe_error(MOE_ERR_IO, "the data has %llu bytes but the tensors cover only %llu",
                       (unsigned long long)f->data_len, (unsigned long long)pos);
    free(order);
    return st;
}

static moe_status check_names(moe_st_file *f) {
    f->by_name = malloc((f->n + 1) * sizeof *f->by_name);
    if (!f->by_name) return moe_error(MOE_ERR_OOM, "out of memory");
    for (size_t i = 0; i < f->n; i++) f->by_name[i] = &f->entries[i];
    qsort(f->by_name, f->n, sizeof *f->by_name, cmp_names);
    for (size_t i = 1; i < f->n; i++)
        if (!strcmp(f->by_name[i]->name, f->by_name[i - 1]->name))
            return moe_error(MOE_ERR_IO, "tensor '%s' appears twice in the header", f->by_name[i]->name);
    return MOE_OK;
}

static moe_status parse_header(moe_st_file *f) {
    const unsigned char *b = f->map->base;
    size_t len = f->map->len;
    if (len < 8)
        return moe_error(MOE_ERR_IO, "file has %zu bytes, too small for the 8-byte header length (truncated?)", len);
    uint64_t hlen = 0;
    for (int i = 7; i >= 0; i--) hlen = (hlen << 8) | b[i];
    if (hlen > len - 8)
        return moe_error(MOE_ERR_IO, "header length %llu exceeds the %zu bytes after it (truncated or not safetensors?)",
                         (unsigned long long)hlen, len - 8);
    if (hlen > MAX_HEADER_BYTES)
        return moe_error(MOE_ERR_IO, "header length %llu is over the 100 MB limit", (unsigned long long)hlen);
    if (hlen < 2 || b[8] != '{') return moe_error(MOE_ERR_IO, "header is not a JSON object");
    f->data_start = 8 + hlen;
    f->data_len = len - f->data_start;

    const char *hdr = (const char *)b + 8, *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(hdr, (size_t)hlen, &end, 0);
    if (!root) {
        size_t at = end && end >= hdr ? (size_t)(end - hdr) : 0;
        return moe_error(MOE_ERR_IO, "header is not valid JSON (error near byte %zu of %llu)", at,
                         (unsigned long long)hlen);
    }
    /* only padding may follow the object */
    for (const char *p = end; p < hdr + hlen; p++)
        if (*p != ' ' && *p != '\t' && *p != '\n' && *p != '\r') {
            cJSON_Delete(root);
            return moe_error(MOE_ERR_IO, "header has trailing bytes after the JSON object (at byte %zu)",
                             (size_t)(p - hdr));
        }
    moe_status st = MOE_OK;
    if (!cJSON_IsObject(root)) st = moe_error(MOE_ERR_IO, "header is not a JSON object");
    size_t count = 0;
    const cJSON *item;
    if (st == MOE_OK) {
        cJSON_ArrayForEach(item, root) if (strcmp(item->string, "__metadata__") != 0) count++;
        f->entries = calloc(count + 1, sizeof *f->entries);
        if (!f->entries) st = moe_error(MOE_ERR_OOM, "out of memory");
    }
    int seen_meta = 0;
    if (st == MOE_OK) cJSON_ArrayForEach(item, root) {
        if (!strcmp(item->string, "__metadata__")) {
            if (seen_meta++) st = moe_error(MOE_ERR_IO, "__metadata__ appears twice");
            else st = parse_metadata(f, item);
        } else {
            st = parse_entry(f, item, &f->entries[f->n]);
            f->n++;   /* counted even on failure, so close() frees its name */
        }
        if (st != MOE_OK) break;
    }
    cJSON_Delete(root);
    if (st == MOE_OK) st = check_names(f);
    if (st == MOE_OK) st = check_coverage(f);
    return st;
}

moe_st_file *moe_st_open(const char *path) {
    if (!path) { moe_error(MOE_ERR_ARG, "safetensors: path is NULL"); return NULL; }
    moe_st_file *f = calloc(1, sizeof *f);
    if (!f || !(f->path = strdup(path))) {
        free(f);
        moe_error(MOE_ERR_OOM, "safetensors %s: out of memory", path);
        return NULL;
    }
    f->map = moe_io_map_open(path);
    if (!f->map) {
        moe_error_context(moe_last_status(), "safetensors");
        moe_st_close(f);
        return NULL;
    }
    moe_status st = parse_header(f);
    if (st != MOE_OK) {
        moe_error_context(st, "safetensors %s", path);
        moe_st_close(f);
        return NULL;
    }
    return f;
}

void moe_st_close(moe_st_file *f) {
    if (!f) return;
    for (size_t i = 0; i < f->n; i++) free((char *)f->entries[i].name);
    for (size_t i = 0; i < 2 * f->nmeta; i++) free(f->meta[i]);
    free(f->meta);
    free(f->entries);
    free(f->by_name);
    moe_io_map_release(f->map);
    free(f->path);
    free(f);
}

const char *moe_st_path(const moe_st_file *f) { return f->path; }
size_t moe_st_count(const moe_st_file *f) { return f->n; }
const moe_st_entry *moe_st_entry_at(const moe_st_file *f, size_t i) { return i < f->n ? &f->entries[i] : NULL; }

const moe_st_entry *moe_st_find(const moe_st_file *f, const char *name) {
    size_t lo = 0, hi = f->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(f->by_name[mid]->name, name);
        if (c == 0) return f->by_name[mid];
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

size_t moe_st_metadata_count(const moe_st_file *f) { return f->nmeta; }
const char *moe_st_metadata_key(const moe_st_file *f, size_t i) { return i < f->nmeta ? f->meta[2 * i] : NULL; }
const char *moe_st_metadata_value(const moe_st_file *f, size_t i) { return i < f->nmeta ? f->meta[2 * i + 1] : NULL; }

const char *moe_st_metadata_get(const moe_st_file *f, const char *key) {
    for (size_t i = 0; i < f->nmeta; i++)
        if (!strcmp(f->meta[2 * i], key)) return f->meta[2 * i + 1];
    return NULL;
}

moe_tensor *moe_st_tensor(moe_st_file *f, const moe_st_entry *e) {
    if (e->dtype < 0) {
        moe_error(MOE_ERR_DTYPE, "safetensors %s: tensor '%s' has dtype %s, which moelab cannot load", f->path,
                  e->name, e->file_dtype);
        return NULL;
    }
    moe_dtype dt = (moe_dtype)e->dtype;
    unsigned char *p = f->map->base + f->data_start + e->begin;
    size_t nbytes = (size_t)(e->end - e->begin);
    if ((uintptr_t)p % moe_dtype_size(dt) == 0) {
        /* the storage holds a reference to the mapping, so the tensor
         * outlives this file handle */
        moe_io_map_retain(f->map);
        moe_storage *s = moe_storage_wrap_owned(p, nbytes, MOE_DEVICE_CPU, moe_io_map_release_cb, f->map);
        if (!s) return NULL;
        moe_tensor *t = moe_tensor_from_storage(s, 0, dt, e->ndim, e->shape, NULL);
        moe_storage_release(s);
        return t;
    }
    /* misaligned data (another writer's layout): kernels need aligned
     * elements, so copy */
    moe_tensor *t = moe_tensor_new_cpu(dt, e->ndim, e->shape);
    if (t && nbytes) memcpy(moe_tensor_data(t), p, nbytes);
    return t;
}

moe_tensor *moe_st_tensor_as(moe_st_file *f, const moe_st_entry *e, moe_dtype dt) {
    if ((unsigned)dt >= MOE_NUM_DTYPES) {
        moe_error(MOE_ERR_DTYPE, "safetensors: unknown target dtype %d", (int)dt);
        return NULL;
    }
    moe_tensor *src = moe_st_tensor(f, e);
    if (!src || src->dtype == dt) return src;
    moe_tensor *dst = moe_tensor_new_cpu(dt, src->ndim, src->shape);
    if (dst && moe_tensor_copy_cpu(dst, src) != MOE_OK) { moe_tensor_release(dst); dst = NULL; }
    moe_tensor_release(src);
    return dst;
}
