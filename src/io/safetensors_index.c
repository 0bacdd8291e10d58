/* Sharded checkpoints as Hugging Face writes them: model.safetensors.index.json
 * maps each tensor name to the shard file holding it. Every shard is opened
 * (mapped and validated) once, however many tensors it holds. */
#include "safetensors.h"
#include "fileio.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

typedef struct {
    const moe_st_entry *entry;
    size_t shard;
} index_item;

struct moe_st_index {
    size_t nshards;
    moe_st_file **shards;
    char **shard_names;       /* as written in weight_map */
    size_t n;
    index_item *items;        /* weight_map order */
    index_item *by_name;      /* sorted by name */
    char *metadata_json;
};

void moe_st_index_close(moe_st_index *ix) {
    if (!ix) return;
    for (size_t i = 0; i < ix->nshards; i++) {
        moe_st_close(ix->shards[i]);
        free(ix->shard_names[i]);
    }
    free(ix->shards);
    free(ix->shard_names);
    free(ix->items);
    free(ix->by_name);
    cJSON_free(ix->metadata_json);
    free(ix);
}

/* Directory part of path including the trailing '/', or "" for a bare name. */
static char *dir_of(const char *path) {
    const char *slash = strrchr(path, '/');
    size_t n = slash ? (size_t)(slash - path) + 1 : 0;
    char *d = malloc(n + 1);
    if (d) { memcpy(d, path, n); d[n] = '\0'; }
    return d;
}

/* The shard number for file name `fname`, opening it on first use. */
static moe_status shard_for(moe_st_index *ix, const char *dir, const char *fname, size_t *out) {
    for (size_t i = 0; i < ix->nshards; i++)
        if (!strcmp(ix->shard_names[i], fname)) { *out = i; return MOE_OK; }
    /* a shard lives beside the index: no absolute paths, no climbing out */
    if (fname[0] == '/' || !strncmp(fname, "../", 3) || strstr(fname, "/../") || !*fname)
        return moe_error(MOE_ERR_IO, "shard file '%s' must be a path relative to the index's directory", fname);
    size_t n = strlen(dir) + strlen(fname) + 1;
    char *full = malloc(n);
    if (!full) return moe_error(MOE_ERR_OOM, "out of memory");
    snprintf(full, n, "%s%s", dir, fname);
    moe_st_file *f = moe_st_open(full);
    free(full);
    if (!f) return moe_last_status();
    char *name = strdup(fname);
    moe_st_file **s2 = realloc(ix->shards, (ix->nshards + 1) * sizeof *s2);
    if (s2) ix->shards = s2;
    char **n2 = realloc(ix->shard_names, (ix->nshards + 1) * sizeof *n2);
    if (n2) ix->shard_names = n2;
    if (!name || !s2 || !n2) {
        free(name);
        moe_st_close(f);
        return moe_error(MOE_ERR_OOM, "out of memory");
    }
    ix->shards[ix->nshards] = f;
    ix->shard_names[ix->nshards] = name;
    *out = ix->nshards++;
    return MOE_OK;
}

static int cmp_items(const void *a, const void *b) {
    return strcmp(((const index_item *)a)->entry->name, ((const index_item *)b)->entry->name);
}

static moe_status parse_index(moe_st_index *ix, const char *path, const char *text, size_t len) {
    const char *end = NULL;
    cJSON *root = cJSON_ParseWithLengthOpts(text, len, &end, 0);
    if (!root) return moe_error(MOE_ERR_IO, "not valid JSON (error near byte %zu)", end ? (size_t)(end - text) : 0);
    moe_status st = MOE_OK;
    const cJSON *map = cJSON_GetObjectItemCaseSensitive(root, "weight_map");
    if (!cJSON_IsObject(root) || !cJSON_IsObject(map))
        st = moe_error(MOE_ERR_IO, "expected an object with a \"weight_map\" object");
    const cJSON *meta = cJSON_GetObjectItemCaseSensitive(root, "metadata");
    if (st == MOE_OK && meta && !cJSON_IsNull(meta) && !cJSON_IsObject(meta))
        st = moe_error(MOE_ERR_IO, "\"metadata\" must be an object");
    if (st == MOE_OK) {
        ix->metadata_json = cJSON_IsObject(meta) ? cJSON_PrintUnformatted(meta) : NULL;
        if (!ix->metadata_json) {
            char *empty = cJSON_malloc(3);
            if (empty) memcpy(empty, "{}", 3);
            ix->metadata_json = empty;
        }
        size_t n = (size_t)cJSON_GetArraySize(map);
        ix->items = calloc(n + 1, sizeof *ix->items);
        ix->by_name = calloc(n + 1, sizeof *ix->by_name);
        if (!ix->metadata_json || !ix->items || !ix->by_name) st = moe_error(MOE_ERR_OOM, "out of memory");
    }
    char *dir = st == MOE_OK ? dir_of(path) : NULL;
    if (st == MOE_OK && !dir) st = moe_error(MOE_ERR_OOM, "out of memory");
    const cJSON *kv;
    if (st == MOE_OK) cJSON_ArrayForEach(kv, map) {
        if (!cJSON_IsString(kv)) {
            st = moe_error(MOE_ERR_IO, "weight_map entry '%s' must be a file name string", kv->string);
            break;
        }
        size_t shard = 0;
        st = shard_for(ix, dir, kv->valuestring, &shard);
        if (st != MOE_OK) { moe_error_context(st, "tensor '%s'", kv->string); break; }
        const moe_st_entry *e = moe_st_find(ix->shards[shard], kv->string);
        if (!e) {
            st = moe_error(MOE_ERR_IO, "tensor '%s' is mapped to %s, which does not contain it", kv->string,
                           kv->valuestring);
            break;
        }
        ix->items[ix->n++] = (index_item){e, shard};
    }
    free(dir);
    cJSON_Delete(root);
    if (st != MOE_OK) return st;
    memcpy(ix->by_name, ix->items, ix->n * sizeof *ix->items);
    qsort(ix->by_name, ix->n, sizeof *ix->by_name, cmp_items);
    for (size_t i = 1; i < ix->n; i++)
        if (!strcmp(ix->by_name[i].entry->name, ix->by_name[i - 1].entry->name))
            return moe_error(MOE_ERR_IO, "tensor '%s' appears twice in weight_map", ix->by_name[i].entry->name);
    return MOE_OK;
}

moe_st_index *moe_st_index_open(const char *index_path) {
    if (!index_path) { moe_error(MOE_ERR_ARG, "safetensors index: path is NULL"); return NULL; }
    moe_st_index *ix = calloc(1, sizeof *ix);
    if (!ix) { moe_error(MOE_ERR_OOM, "safetensors index %s: out of memory", index_path); return NULL; }
    char *text = NULL;
    size_t len = 0;
    moe_status st = moe_io_read_file(index_path, &text, &len);
    if (st != MOE_OK) {
        moe_error_context(st, "safetensors index");
    } else {
        st = parse_index(ix, index_path, text, len);
        if (st != MOE_OK) moe_error_context(st, "safetensors index %s", index_path);
    }
    free(text);
    if (st != MOE_OK) { moe_st_index_close(ix); return NULL; }
    return ix;
}

size_t moe_st_index_count(const moe_st_index *ix) { return ix->n; }

const moe_st_entry *moe_st_index_entry(const moe_st_index *ix, size_t i, moe_st_file **shard) {
    if (i >= ix->n) return NULL;
    if (shard) *shard = ix->shards[ix->items[i].shard];
    return ix->items[i].entry;
}

const moe_st_entry *moe_st_index_find(const moe_st_index *ix, const char *name, moe_st_file **shard) {
    size_t lo = 0, hi = ix->n;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(ix->by_name[mid].entry->name, name);
        if (c == 0) {
            if (shard) *shard = ix->shards[ix->by_name[mid].shard];
            return ix->by_name[mid].entry;
        }
        if (c < 0) lo = mid + 1;
        else hi = mid;
    }
    return NULL;
}

size_t moe_st_index_num_shards(const moe_st_index *ix) { return ix->nshards; }
moe_st_file *moe_st_index_shard(const moe_st_index *ix, size_t i) { return i < ix->nshards ? ix->shards[i] : NULL; }
const char *moe_st_index_metadata_json(const moe_st_index *ix) { return ix->metadata_json; }
