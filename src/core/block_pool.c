/* Best-fit pool of large blocks (block_pool.h). The free blocks are kept in an
 * array sorted by (size, address): a request binary-searches the smallest
 * that holds it. A device allocator holds a few hundred free blocks at most,
 * so the array's moves cost less than a tree's pointer chasing. The array
 * always has room for every block there is (n_blocks), reserved before a
 * block is made, so freeing never needs host memory and cannot fail. */
#include "block_pool.h"

#include <stdlib.h>
#include <string.h>

struct moe_block_pool {
    size_t split_min, seg_min;
    moe_pool_seg_alloc seg_alloc;
    moe_pool_seg_free seg_free;
    void *arg;
    moe_pool_block **free_list;   /* sorted by (size, addr); room for n_blocks */
    size_t n_free, cap_free, n_blocks;
    size_t free_bytes, segment_bytes, segments;
    /* every block, for destroy: a list through a side array of segment heads */
    moe_pool_block **heads;
    size_t n_heads, cap_heads;
};

static int before(const moe_pool_block *a, size_t size, uintptr_t addr) {
    return a->size < size || (a->size == size && a->addr < addr);
}

/* index of the first free block not before (size, addr) */
static size_t lower(const moe_block_pool *p, size_t size, uintptr_t addr) {
    size_t lo = 0, hi = p->n_free;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        if (before(p->free_list[mid], size, addr)) lo = mid + 1;
        else hi = mid;
    }
    return lo;
}

static int grow(void **arr, size_t *cap, size_t need, size_t elem) {
    if (need <= *cap) return 1;
    size_t n = *cap ? *cap * 2 : 64;
    while (n < need) n *= 2;
    void *q = realloc(*arr, n * elem);
    if (!q) return 0;
    *arr = q;
    *cap = n;
    return 1;
}

/* room in the free array for one more block than there is; 0: no host memory */
static int reserve_block(moe_block_pool *p) {
    return grow((void **)&p->free_list, &p->cap_free, p->n_blocks + 1, sizeof *p->free_list);
}

static void insert_free(moe_block_pool *p, moe_pool_block *b) {
    size_t i = lower(p, b->size, b->addr);   /* (room reserved when b was made) */
    memmove(p->free_list + i + 1, p->free_list + i, (p->n_free - i) * sizeof *p->free_list);
    p->free_list[i] = b;
    p->n_free++;
    p->free_bytes += b->size;
    b->free = 1;
}

static void remove_free(moe_block_pool *p, moe_pool_block *b) {
    size_t i = lower(p, b->size, b->addr);   /* (size, addr) is unique */
    memmove(p->free_list + i, p->free_list + i + 1, (p->n_free - i - 1) * sizeof *p->free_list);
    p->n_free--;
    p->free_bytes -= b->size;
    b->free = 0;
}

static void remove_head(moe_block_pool *p, moe_pool_block *h) {
    for (size_t i = 0; i < p->n_heads; i++)
        if (p->heads[i] == h) { p->heads[i] = p->heads[--p->n_heads]; return; }
}

moe_block_pool *moe_block_pool_new(size_t split_min, size_t seg_min, moe_pool_seg_alloc seg_alloc,
                                   moe_pool_seg_free seg_free, void *arg) {
    if (!seg_alloc || !seg_free || split_min == 0) return NULL;
    moe_block_pool *p = calloc(1, sizeof *p);
    if (!p) return NULL;
    p->split_min = split_min;
    p->seg_min = seg_min;
    p->seg_alloc = seg_alloc;
    p->seg_free = seg_free;
    p->arg = arg;
    return p;
}

void moe_block_pool_destroy(moe_block_pool *p) {
    if (!p) return;
    for (size_t i = 0; i < p->n_heads; i++) {
        moe_pool_block *b = p->heads[i];
        size_t seg = 0;
        uintptr_t base = b->addr;
        while (b) {
            moe_pool_block *n = b->next;
            seg += b->size;
            free(b);
            b = n;
        }
        p->seg_free(p->arg, base, seg);
    }
    free(p->heads);
    free(p->free_list);
    free(p);
}

moe_pool_block *moe_block_pool_alloc_free(moe_block_pool *p, size_t n) {
    if (n == 0) n = 1;
    size_t i = lower(p, n, 0);
    if (i < p->n_free) {
        moe_pool_block *b = p->free_list[i];
        remove_free(p, b);
        /* the rest stays free, after b (without host memory for its record, b goes whole) */
        moe_pool_block *r = b->size - n >= p->split_min && reserve_block(p) ? malloc(sizeof *r) : NULL;
        if (r) {
            p->n_blocks++;
            r->addr = b->addr + n;
            r->size = b->size - n;
            r->prev = b;
            r->next = b->next;
            if (b->next) b->next->prev = r;
            b->next = r;
            b->size = n;
            insert_free(p, r);
        }
        return b;
    }
    return NULL;
}

moe_pool_block *moe_block_pool_alloc(moe_block_pool *p, size_t n) {
    if (n == 0) n = 1;
    if (p->n_free && p->free_list[p->n_free - 1]->size >= n) return moe_block_pool_alloc_free(p, n);
    size_t seg = n < p->seg_min ? p->seg_min : n;
    moe_pool_block *b = malloc(sizeof *b);
    if (!b || !reserve_block(p) || !grow((void **)&p->heads, &p->cap_heads, p->n_heads + 1, sizeof *p->heads)) {
        free(b);
        return NULL;
    }
    uintptr_t a = p->seg_alloc(p->arg, seg);
    if (!a) { free(b); return NULL; }
    b->addr = a;
    b->size = seg;
    b->prev = b->next = NULL;
    b->free = 0;
    p->heads[p->n_heads++] = b;
    p->n_blocks++;
    p->segment_bytes += seg;
    p->segments++;
    if (seg == n) return b;
    /* a segment larger than the request: cut the request from it as from any free block */
    insert_free(p, b);
    return moe_block_pool_alloc_free(p, n);   /* b is the only free block that holds n */
}

/* a takes in its next neighbour b (neither in the free array) */
static void absorb_next(moe_block_pool *p, moe_pool_block *a, moe_pool_block *b) {
    a->size += b->size;
    a->next = b->next;
    if (b->next) b->next->prev = a;
    free(b);
    p->n_blocks--;
}

void moe_block_pool_free(moe_block_pool *p, moe_pool_block *b) {
    if (!b || b->free) return;
    /* merge with a free next, then into a free prev */
    if (b->next && b->next->free) {
        remove_free(p, b->next);
        absorb_next(p, b, b->next);
    }
    moe_pool_block *v = b->prev;
    if (v && v->free) {
        remove_free(p, v);
        absorb_next(p, v, b);
        b = v;
    }
    insert_free(p, b);
}

size_t moe_block_pool_release(moe_block_pool *p) {
    size_t got = 0, i = 0;
    while (i < p->n_free) {
        moe_pool_block *b = p->free_list[i];
        if (b->prev || b->next) { i++; continue; }
        remove_free(p, b);
        remove_head(p, b);
        p->seg_free(p->arg, b->addr, b->size);
        p->segment_bytes -= b->size;
        p->segments--;
        p->n_blocks--;
        got += b->size;
        free(b);
    }
    return got;
}

size_t moe_block_pool_free_bytes(const moe_block_pool *p) { return p->free_bytes; }
size_t moe_block_pool_segment_bytes(const moe_block_pool *p) { return p->segment_bytes; }
size_t moe_block_pool_segments(const moe_block_pool *p) { return p->segments; }
