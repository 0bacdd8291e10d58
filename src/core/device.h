/* Devices and the allocator interface. A storage remembers the allocator that
 * made it, so releasing memory never needs a context. */
#ifndef MOE_DEVICE_H
#define MOE_DEVICE_H

#include <stddef.h>

typedef enum { MOE_CPU = 0, MOE_CUDA = 1, MOE_NUM_DEVICE_TYPES } moe_device_type;

typedef struct { int type; int index; } moe_device;

#define MOE_DEVICE_CPU ((moe_device){MOE_CPU, 0})

static inline int moe_device_eq(moe_device a, moe_device b) {
    return a.type == b.type && (a.type == MOE_CPU || a.index == b.index);
}

/* "cpu", "cuda", "cuda:1". Returns 0 on success. */
int moe_device_parse(const char *s, moe_device *out);
/* Writes "cpu" or "cuda:N" into buf (at least 16 bytes); returns buf. */
const char *moe_device_str(moe_device d, char *buf, size_t n);

typedef struct moe_allocator moe_allocator;
struct moe_allocator {
    const char *name;
    moe_device device;
    /* Returns NULL on failure after setting the error message. */
    void *(*alloc)(moe_allocator *self, size_t nbytes);
    void (*free)(moe_allocator *self, void *ptr, size_t nbytes);
    void *state;
};

/* 64-byte aligned host memory; stateless, so one shared instance is safe. */
moe_allocator *moe_cpu_allocator(void);

#endif
