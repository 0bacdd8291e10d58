#include "device.h"
#include "status.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int moe_device_parse(const char *s, moe_device *out) {
    if (!s) return -1;
    if (!strcmp(s, "cpu")) { *out = MOE_DEVICE_CPU; return 0; }
    if (!strncmp(s, "cuda", 4)) {
        if (s[4] == 0) { *out = (moe_device){MOE_CUDA, 0}; return 0; }
        if (s[4] == ':') {
            char *end;
            long idx = strtol(s + 5, &end, 10);
            if (end != s + 5 && *end == 0 && idx >= 0 && idx < 1024) {
                *out = (moe_device){MOE_CUDA, (int)idx};
                return 0;
            }
        }
    }
    return -1;
}

const char *moe_device_str(moe_device d, char *buf, size_t n) {
    if (d.type == MOE_CPU) snprintf(buf, n, "cpu");
    else snprintf(buf, n, "cuda:%d", d.index);
    return buf;
}

static void *cpu_alloc(moe_allocator *self, size_t nbytes) {
    (void)self;
    size_t rounded = (nbytes + 63) & ~(size_t)63;
    if (rounded == 0) rounded = 64;
    void *p = aligned_alloc(64, rounded);
    if (!p) moe_error(MOE_ERR_OOM, "out of host memory allocating %zu bytes", nbytes);
    return p;
}

static void cpu_free(moe_allocator *self, void *ptr, size_t nbytes) {
    (void)self; (void)nbytes;
    free(ptr);
}

static moe_allocator cpu_allocator = { "cpu", {MOE_CPU, 0}, cpu_alloc, cpu_free, NULL };

moe_allocator *moe_cpu_allocator(void) { return &cpu_allocator; }
