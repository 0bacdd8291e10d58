/* The safetensors format: an 8-byte little-endian header length N, N bytes of
 * JSON ({"name": {"dtype", "shape", "data_offsets": [begin, end]}, ...,
 * "__metadata__": {str: str}}), then the tensor bytes, which the offsets
 * (relative to the end of the header) must cover exactly, without gaps or
 * overlaps.
 *
 * Reading maps the file and validates the whole header up front, so every
 * later access is in bounds; tensors are zero-copy views of the mapping
 * (which they keep alive after the file handle is closed) or converted
 * copies. Writing is atomic (temp file, fsync, rename). Sharded checkpoints
 * (model.safetensors.index.json) open each shard once. */
#ifndef MOE_IO_SAFETENSORS_H
#define MOE_IO_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "../core/context.h"
#include "../core/tensor.h"

typedef struct moe_st_file moe_st_file;

typedef struct moe_st_entry {
    const char *name;
    const char *file_dtype;   /* as written in the file: "F32", "BF16", "F8_E4M3", ... */
    int dtype;                /* the moe_dtype it loads as, -1 if moelab has none (F8, U16...) */
    int ndim;
    int64_t shape[MOE_MAX_DIMS];
    uint64_t begin, end;      /* byte range relative to the start of the data */
} moe_st_entry;

/* Opens and validates; NULL with MOE_ERR_IO / MOE_ERR_SHAPE naming the file
 * (and the tensor) on any problem. */
moe_st_file *moe_st_open(const char *path);
/* Tensors made from the file stay valid after close. NULL is fine. */
void moe_st_close(moe_st_file *f);

const char *moe_st_path(const moe_st_file *f);
size_t moe_st_count(const moe_st_file *f);
/* Entries in the order of the header. */
const moe_st_entry *moe_st_entry_at(const moe_st_file *f, size_t i);
/* NULL (no error set) if the file has no such tensor. */
const moe_st_entry *moe_st_find(const moe_st_file *f, const char *name);

size_t moe_st_metadata_count(const moe_st_file *f);
const char *moe_st_metadata_key(const moe_st_file *f, size_t i);
const char *moe_st_metadata_value(const moe_st_file *f, size_t i);
const char *moe_st_metadata_get(const moe_st_file *f, const char *key);  /* NULL if absent */

/* A CPU tensor of the entry's dtype: a zero-copy view of the mapping when the
 * data is aligned for its dtype (always so for files moe_st_save writes),
 * else a copy. Fails with MOE_ERR_DTYPE for dtypes moelab cannot hold. */
moe_tensor *moe_st_tensor(moe_st_file *f, const moe_st_entry *e);
/* The same converted to `dt` (a copy; zero-copy when dt is already the dtype). */
moe_tensor *moe_st_tensor_as(moe_st_file *f, const moe_st_entry *e, moe_dtype dt);

/* safetensors dtype name of a moelab dtype ("F32"...). */
const char *moe_st_dtype_name(moe_dtype dt);

/* Writes n named tensors (any dtype and device; device tensors are copied to
 * the host one at a time) and nmeta string pairs of metadata, atomically.
 * Header keys follow the order given (metadata first); the data is laid out
 * widest dtype first so every tensor is aligned for zero-copy loading.
 * ctx is needed only for device tensors (may be NULL otherwise). */
moe_status moe_st_save(moe_ctx *ctx, const char *path, size_t n, const char *const *names,
                       moe_tensor *const *tensors, size_t nmeta, const char *const *meta_keys,
                       const char *const *meta_values);

/* ---- sharded checkpoints: model.safetensors.index.json ---- */
typedef struct moe_st_index moe_st_index;

/* Reads {"metadata": {...}, "weight_map": {name: shard file}}, opens every
 * shard once (paths relative to the index's directory) and checks that each
 * listed tensor is in its shard. */
moe_st_index *moe_st_index_open(const char *index_path);
void moe_st_index_close(moe_st_index *ix);
/* Tensors in weight_map order. */
size_t moe_st_index_count(const moe_st_index *ix);
const moe_st_entry *moe_st_index_entry(const moe_st_index *ix, size_t i, moe_st_file **shard);
/* NULL (no error set) if absent. */
const moe_st_entry *moe_st_index_find(const moe_st_index *ix, const char *name, moe_st_file **shard);
size_t moe_st_index_num_shards(const moe_st_index *ix);
moe_st_file *moe_st_index_shard(const moe_st_index *ix, size_t i);
/* The index's "metadata" object as JSON text ("{}" if absent). */
const char *moe_st_index_metadata_json(const moe_st_index *ix);

#endif
