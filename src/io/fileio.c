#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <libgen.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

moe_status moe_io_write_all(int fd, const void *buf, size_t n, const char *path) {
    const unsigned char *p = buf;
    while (n > 0) {
        /* write(2) moves at most about 2 GiB per call on Linux */
        size_t chunk = n < ((size_t)1 << 30) ? n : ((size_t)1 << 30);
        ssize_t w = write(fd, p, chunk);
        if (w < 0) {
            if (errno == EINTR) continue;
            return moe_error(MOE_ERR_IO, "%s: write failed: %s", path, strerror(errno));
        }
        p += w;
        n -= (size_t)w;
    }
    return MOE_OK;
}

/* The rename is only durable once the directory entry is on disk. Failure
 * here is ignored: some filesystems cannot fsync a directory, and the file
 * itself is complete either way. */
static void fsync_parent_dir(const char *path) {
    char *copy = strdup(path);
    if (!copy) return;
    int fd = open(dirname(copy), O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    free(copy);
    if (fd < 0) return;
    (void)fsync(fd);
    close(fd);
}

moe_status moe_io_write_atomic(const char *path, moe_io_fill_fn fill, void *arg) {
    if (!path || !*path) return moe_error(MOE_ERR_ARG, "write: empty path");
    size_t n = strlen(path) + 32;
    char *tmp = malloc(n);
    if (!tmp) return moe_error(MOE_ERR_OOM, "%s: out of memory", path);
    snprintf(tmp, n, "%s.tmp.%ld", path, (long)getpid());

    moe_status st = MOE_OK;
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (fd < 0) {
        st = moe_error(MOE_ERR_IO, "%s: cannot create temp file %s: %s", path, tmp, strerror(errno));
        free(tmp);
        return st;
    }
    st = fill(fd, path, arg);
    if (st == MOE_OK && fsync(fd) != 0)
        st = moe_error(MOE_ERR_IO, "%s: fsync failed: %s", path, strerror(errno));
    if (close(fd) != 0 && st == MOE_OK)
        st = moe_error(MOE_ERR_IO, "%s: close failed: %s", path, strerror(errno));
    if (st == MOE_OK && rename(tmp, path) != 0)
        st = moe_error(MOE_ERR_IO, "%s: cannot rename temp file over it: %s", path, strerror(errno));
    if (st != MOE_OK) unlink(tmp);
    else fsync_parent_dir(path);
    free(tmp);
    return st;
}

typedef struct { const void *data; size_t n; } bytes_arg;

static moe_status fill_bytes(int fd, const char *path, void *arg) {
    bytes_arg *b = arg;
    return moe_io_write_all(fd, b->data, b->n, path);
}

moe_status moe_io_write_file_atomic(const char *path, const void *data, size_t n) {
    bytes_arg b = {data, n};
    return moe_io_write_atomic(path, fill_bytes, &b);
}

moe_status moe_io_read_file(const char *path, char **data, size_t *n) {
    *data = NULL;
    *n = 0;
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) return moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno));
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        return moe_error(MOE_ERR_IO, "%s: not a regular file", path);
    }
    size_t len = (size_t)sb.st_size;
    char *buf = malloc(len + 1);
    if (!buf) { close(fd); return moe_error(MOE_ERR_OOM, "%s: out of memory for %zu bytes", path, len); }
    size_t got = 0;
    while (got < len) {
        ssize_t r = read(fd, buf + got, len - got);
        if (r < 0 && errno == EINTR) continue;
        if (r <= 0) {
            moe_status st = r < 0 ? moe_error(MOE_ERR_IO, "%s: read failed: %s", path, strerror(errno))
                                  : moe_error(MOE_ERR_IO, "%s: file shrank while being read", path);
            free(buf);
            close(fd);
            return st;
        }
        got += (size_t)r;
    }
    close(fd);
    buf[len] = '\0';
    *data = buf;
    *n = len;
    return MOE_OK;
}

static moe_status mkdir_one(const char *dir, const char *full) {
    if (mkdir(dir, 0777) == 0) return MOE_OK;
    int err = errno;
    struct stat sb;
    if (err == EEXIST && stat(dir, &sb) == 0 && S_ISDIR(sb.st_mode)) return MOE_OK;
    if (err == EEXIST) return moe_error(MOE_ERR_IO, "mkdir_p %s: %s exists and is not a directory", full, dir);
    return moe_error(MOE_ERR_IO, "mkdir_p %s: cannot create %s: %s", full, dir, strerror(err));
}

moe_status moe_io_mkdir_p(const char *path) {
    if (!path || !*path) return moe_error(MOE_ERR_ARG, "mkdir_p: empty path");
    char *p = strdup(path);
    if (!p) return moe_error(MOE_ERR_OOM, "mkdir_p: out of memory");
    moe_status st = MOE_OK;
    /* each prefix ending before a '/' (skipping the root's and repeated ones) */
    for (char *s = p + 1; *s && st == MOE_OK; s++) {
        if (*s != '/' || s[-1] == '/') continue;
        *s = '\0';
        st = mkdir_one(p, path);
        *s = '/';
    }
    if (st == MOE_OK) st = mkdir_one(p, path);
    free(p);
    return st;
}

moe_io_map *moe_io_map_open(const char *path) {
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) { moe_error(MOE_ERR_IO, "%s: cannot open: %s", path, strerror(errno)); return NULL; }
    struct stat sb;
    if (fstat(fd, &sb) != 0 || !S_ISREG(sb.st_mode)) {
        close(fd);
        moe_error(MOE_ERR_IO, "%s: not a regular file", path);
        return NULL;
    }
    moe_io_map *m = calloc(1, sizeof *m);
    if (!m) { close(fd); moe_error(MOE_ERR_OOM, "%s: out of memory", path); return NULL; }
    m->refcount = 1;
    m->len = (size_t)sb.st_size;
    if (m->len > 0) {
        /* MAP_PRIVATE + PROT_WRITE: copy-on-write, so a tensor written in
         * place (an optimiser step on loaded weights) neither faults on a
         * read-only page nor modifies the checkpoint. */
        void *p = mmap(NULL, m->len, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
        if (p == MAP_FAILED) {
            moe_error(MOE_ERR_IO, "%s: mmap of %zu bytes failed: %s", path, m->len, strerror(errno));
            close(fd);
            free(m);
            return NULL;
        }
        m->base = p;
    }
    close(fd);   /* the mapping stays valid without the descriptor */
    return m;
}

void moe_io_map_retain(moe_io_map *m) { if (m) __atomic_add_fetch(&m->refcount, 1, __ATOMIC_RELAXED); }

void moe_io_map_release(moe_io_map *m) {
    if (!m) return;
    if (__atomic_sub_fetch(&m->refcount, 1, __ATOMIC_ACQ_REL) == 0) {
        if (m->base) munmap(m->base, m->len);
        free(m);
    }
}

void moe_io_map_release_cb(void *m) { moe_io_map_release(m); }
