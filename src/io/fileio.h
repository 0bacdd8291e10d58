/* File helpers for checkpoints and their sidecars: atomic replacement of a
 * file, whole-file reads, mkdir -p, and refcounted read-only file mappings.
 * All return a status (or NULL) with a message naming the path. */
#ifndef MOE_IO_FILEIO_H
#define MOE_IO_FILEIO_H

#include <stddef.h>

#include "../core/status.h"

/* Fills the temp file; returns MOE_OK or an error status with the message set.
 * `path` is the final path, for messages. */
typedef moe_status (*moe_io_fill_fn)(int fd, const char *path, void *arg);

/* Writes `path` atomically: fill() writes <path>.tmp.<pid>, which is fsynced
 * and renamed over path (then the directory is fsynced). On any failure the
 * temp file is removed and an existing file at path is left as it was, so a
 * crash or an error never leaves a truncated file under the real name. */
moe_status moe_io_write_atomic(const char *path, moe_io_fill_fn fill, void *arg);
moe_status moe_io_write_file_atomic(const char *path, const void *data, size_t n);
/* write(2) until done, retrying short writes and EINTR. */
moe_status moe_io_write_all(int fd, const void *buf, size_t n, const char *path);

/* Reads a whole file into a malloc'd buffer (NUL-terminated, *n excludes the NUL). */
moe_status moe_io_read_file(const char *path, char **data, size_t *n);

/* Creates path and its missing parents (like mkdir -p); an existing directory is fine. */
moe_status moe_io_mkdir_p(const char *path);

/* A file mapped copy-on-write: reads come from the page cache (zero-copy),
 * and writes into tensors over it stay private to the process instead of
 * faulting or changing the file. Refcounted so tensors can outlive the reader
 * that made them. A file replaced by rename (as moe_io_write_atomic does) keeps
 * its old contents visible through a live mapping. */
typedef struct moe_io_map {
    int refcount;
    unsigned char *base;   /* NULL for an empty file */
    size_t len;
} moe_io_map;

moe_io_map *moe_io_map_open(const char *path);
void moe_io_map_retain(moe_io_map *m);
void moe_io_map_release(moe_io_map *m);
/* moe_io_map_release with a void * argument, for moe_storage_wrap_owned. */
void moe_io_map_release_cb(void *m);

#endif
