/* A pool of large memory blocks cut from segments, for a caching device
 * allocator (the CUDA one, cuda_alloc.cu): a request takes the smallest free
 * block that holds it (best fit) and leaves the rest as a free block when the
 * rest is at least split_min; a freed block merges with free neighbours of
 * its segment. Segments come from and go back to the caller's functions (e.g.
 * cudaMalloc / cudaFree); a segment goes back only when all of it is free.
 * Addresses are opaque integers: the pool never touches the memory, so it is
 * tested on the host with any segment source.
 * Not thread-safe: the caller holds its own lock. */
#ifndef MOE_BLOCK_POOL_H
#define MOE_BLOCK_POOL_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moe_pool_block {
    uintptr_t addr;
    size_t size;
    struct moe_pool_block *prev, *next;   /* neighbours in the segment, by address */
    int free;
} moe_pool_block;

typedef struct moe_block_pool moe_block_pool;

/* seg_alloc(arg, n) -> n bytes of new segment (0: none to be had);
 * seg_free(arg, addr, n) gives one back. */
typedef uintptr_t (*moe_pool_seg_alloc)(void *arg, size_t n);
typedef void (*moe_pool_seg_free)(void *arg, uintptr_t addr, size_t n);

/* A new segment is at least seg_min bytes (0: just the request); the rest of it
 * stays free for later requests when it is split_min or more. */
moe_block_pool *moe_block_pool_new(size_t split_min, size_t seg_min, moe_pool_seg_alloc seg_alloc,
                                   moe_pool_seg_free seg_free, void *arg);
/* Frees every segment, in use or not (the caller knows nothing uses them). */
void moe_block_pool_destroy(moe_block_pool *p);

/* A block of at least n bytes (exactly n where a free block or new segment was
 * split; up to split_min - 1 more where the rest stayed with it); NULL when no
 * free block holds n and no segment can be had. */
moe_pool_block *moe_block_pool_alloc(moe_block_pool *p, size_t n);
/* The same from free blocks only: NULL rather than a new segment. */
moe_pool_block *moe_block_pool_alloc_free(moe_block_pool *p, size_t n);
/* A block from moe_block_pool_alloc back to the pool (merged with free neighbours). */
void moe_block_pool_free(moe_block_pool *p, moe_pool_block *b);
/* Gives back every segment that is wholly free; returns their bytes. */
size_t moe_block_pool_release(moe_block_pool *p);

/* bytes in free blocks; bytes of all segments; segments held */
size_t moe_block_pool_free_bytes(const moe_block_pool *p);
size_t moe_block_pool_segment_bytes(const moe_block_pool *p);
size_t moe_block_pool_segments(const moe_block_pool *p);

#ifdef __cplusplus
}
#endif

#endif
