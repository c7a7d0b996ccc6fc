/* Per-thread scratch memory kept between kernel calls.
 *
 * A sampling call needs several V-sized buffers. Allocating them per call hands back
 * fresh pages that fault (and are zeroed by the kernel) as they are touched, which costs
 * more than the sampling itself on a large vocabulary. Each thread instead keeps one
 * block, grown when a call needs more and freed when the thread exits. Blocks larger
 * than TEP_SCRATCH_CACHE_MAX are not kept.
 */
#ifndef TEP_SCRATCH_H
#define TEP_SCRATCH_H

#include <stdlib.h>

#define TEP_SCRATCH_CACHE_MAX ((size_t)256 << 20)

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>

typedef struct { void *ptr; size_t cap; } tep_tls_block;

static pthread_key_t tep_tls_key;
static pthread_once_t tep_tls_once = PTHREAD_ONCE_INIT;
static int tep_tls_ok = 0;

static void tep_tls_destroy(void *p) {
    tep_tls_block *b = (tep_tls_block *)p;
    if (b) { free(b->ptr); free(b); }
}

static void tep_tls_make_key(void) { tep_tls_ok = pthread_key_create(&tep_tls_key, tep_tls_destroy) == 0; }

/* A block of at least n bytes for this thread. *owned = 1 when the caller must free it
 * (too large to keep, or no thread-local storage). NULL when out of memory. */
static void *tep_scratch_get(size_t n, int *owned) {
    *owned = 1;
    if (n > TEP_SCRATCH_CACHE_MAX) return malloc(n);
    pthread_once(&tep_tls_once, tep_tls_make_key);
    if (!tep_tls_ok) return malloc(n);
    tep_tls_block *b = (tep_tls_block *)pthread_getspecific(tep_tls_key);
    if (!b) {
        b = (tep_tls_block *)calloc(1, sizeof *b);
        if (!b) return malloc(n);
        if (pthread_setspecific(tep_tls_key, b) != 0) { free(b); return malloc(n); }
    }
    if (b->cap < n) {
        free(b->ptr);
        b->ptr = malloc(n);
        b->cap = b->ptr ? n : 0;
        if (!b->ptr) return NULL;
    }
    *owned = 0;
    return b->ptr;
}
#else
static void *tep_scratch_get(size_t n, int *owned) { *owned = 1; return malloc(n); }
#endif

#endif
