/* A small thread pool for the encoder in which the caller never waits for an idle worker.
 *
 * Why not an OpenMP parallel region: its closing barrier waits until every thread of the
 * team has arrived. On a busy machine a worker that the OS has not scheduled holds the
 * whole layer up for a time slice (milliseconds), and a forward pass crosses ~30 such
 * barriers; measured on a loaded 2-core box, 2 threads ran 5-10x slower than 1. Here a job
 * is a count of independent items; the caller and any worker that is awake claim items
 * from one atomic counter, and the caller waits only for items that were actually claimed.
 * A worker that wakes late finds nothing left and goes back to sleep.
 *
 * The claim word packs (generation, item count, next item) so that a worker still holding
 * a previous job can never claim an item of the next one. One job at a time per pool; a
 * second caller (another request thread) that finds the pool busy runs its job alone.
 * POSIX threads only; elsewhere tep_pool_run runs every item on the caller.
 */
#ifndef TEP_ENCODER_POOL_H
#define TEP_ENCODER_POOL_H

#include <stddef.h>
#include <stdint.h>

typedef void (*tep_task_fn)(void *ctx, ptrdiff_t item, int worker);

#if defined(__unix__) || defined(__APPLE__)
#include <pthread.h>
#include <sched.h>
#include <stdlib.h>

#define TEP_POOL_MAX 64
#define TEP_SPIN_ITERS 4000    /* ~100-200 us of polling before a worker sleeps */

typedef struct {
    pthread_mutex_t mu;        /* guards sleeping workers' wake-up */
    pthread_cond_t cv;
    pthread_mutex_t busy;      /* one job at a time */
    int n_workers;
    pthread_t threads[TEP_POOL_MAX];
    uint64_t state;            /* gen:16 | n_items:24 | next:24 (atomic) */
    int64_t done;              /* items finished in the current job (atomic) */
    tep_task_fn fn;
    void *ctx;
    int stop;
    int sleepers;
} tep_pool;

#define TEP_ST(gen, n, next) (((uint64_t)(gen) << 48) | ((uint64_t)(n) << 24) | (uint64_t)(next))
#define TEP_ST_GEN(s) ((s) >> 48)
#define TEP_ST_N(s) (((s) >> 24) & 0xFFFFFF)
#define TEP_ST_NEXT(s) ((s) & 0xFFFFFF)

/* Claim one item of job `gen`; -1 when it has none left (or is no longer current). */
static inline ptrdiff_t tep_pool_claim(tep_pool *p, uint64_t gen) {
    uint64_t s = __atomic_load_n(&p->state, __ATOMIC_ACQUIRE);
    for (;;) {
        if (TEP_ST_GEN(s) != gen || TEP_ST_NEXT(s) >= TEP_ST_N(s)) return -1;
        if (__atomic_compare_exchange_n(&p->state, &s, s + 1, 1, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
            return (ptrdiff_t)TEP_ST_NEXT(s);
    }
}

static inline void tep_pool_work(tep_pool *p, uint64_t gen, int worker) {
    ptrdiff_t i;
    while ((i = tep_pool_claim(p, gen)) >= 0) {
        p->fn(p->ctx, i, worker);   /* fn/ctx are stable while a claimed item is unfinished */
        __atomic_add_fetch(&p->done, 1, __ATOMIC_ACQ_REL);
    }
}

typedef struct { tep_pool *p; int id; } tep_worker_arg;

static void *tep_pool_main(void *arg) {
    tep_worker_arg *wa = (tep_worker_arg *)arg;
    tep_pool *p = wa->p;
    int id = wa->id;
    free(wa);
    uint64_t seen = TEP_ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE));
    for (;;) {
        uint64_t gen = seen;
        for (int spin = 0; spin < TEP_SPIN_ITERS; spin++) {
            gen = TEP_ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE));
            if (gen != seen || __atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) break;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (gen == seen) {
            pthread_mutex_lock(&p->mu);
            p->sleepers++;
            while (!p->stop && TEP_ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE)) == seen)
                pthread_cond_wait(&p->cv, &p->mu);
            p->sleepers--;
            pthread_mutex_unlock(&p->mu);
            gen = TEP_ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE));
        }
        if (__atomic_load_n(&p->stop, __ATOMIC_ACQUIRE)) return NULL;
        seen = gen;
        tep_pool_work(p, gen, id);
    }
}

static tep_pool *tep_pool_new(int n_workers) {
    tep_pool *p = (tep_pool *)calloc(1, sizeof *p);
    if (!p) return NULL;
    if (n_workers > TEP_POOL_MAX) n_workers = TEP_POOL_MAX;
    pthread_mutex_init(&p->mu, NULL);
    pthread_cond_init(&p->cv, NULL);
    pthread_mutex_init(&p->busy, NULL);
    for (int i = 0; i < n_workers; i++) {
        tep_worker_arg *wa = (tep_worker_arg *)malloc(sizeof *wa);
        if (!wa) break;
        wa->p = p;
        wa->id = i + 1;  /* the caller is worker 0 */
        if (pthread_create(&p->threads[i], NULL, tep_pool_main, wa) != 0) { free(wa); break; }
        p->n_workers++;
    }
    return p;
}

static void tep_pool_free(tep_pool *p) {
    if (!p) return;
    pthread_mutex_lock(&p->mu);
    __atomic_store_n(&p->stop, 1, __ATOMIC_RELEASE);
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    for (int i = 0; i < p->n_workers; i++) pthread_join(p->threads[i], NULL);
    free(p);
}

/* Run fn(ctx, item, worker) for item in [0, n_items) on the caller (worker 0) and on up to
 * `helpers` pool workers (worker ids 1..). Returns when every item has finished. */
static void tep_pool_run(tep_pool *p, int helpers, tep_task_fn fn, void *ctx, ptrdiff_t n_items) {
    ptrdiff_t i;
    if (!p || helpers <= 0 || n_items <= 1 || n_items > 0xFFFFFF ||
        pthread_mutex_trylock(&p->busy) != 0) {
        for (i = 0; i < n_items; i++) fn(ctx, i, 0);
        return;
    }
    uint64_t gen = (TEP_ST_GEN(__atomic_load_n(&p->state, __ATOMIC_ACQUIRE)) + 1) & 0xFFFF;
    p->fn = fn;
    p->ctx = ctx;
    __atomic_store_n(&p->done, 0, __ATOMIC_RELEASE);
    __atomic_store_n(&p->state, TEP_ST(gen, n_items, 0), __ATOMIC_RELEASE);
    if (__atomic_load_n(&p->sleepers, __ATOMIC_ACQUIRE) > 0) {
        pthread_mutex_lock(&p->mu);
        pthread_cond_broadcast(&p->cv);
        pthread_mutex_unlock(&p->mu);
    }
    (void)helpers;  /* every awake worker may help; the pool is sized by the caller */
    tep_pool_work(p, gen, 0);
    /* only items a worker has claimed are left; let it run if it shares our core */
    for (int spin = 0; __atomic_load_n(&p->done, __ATOMIC_ACQUIRE) < n_items; spin++) {
        if (spin > 2000) sched_yield();
#if defined(__x86_64__) || defined(__i386__)
        else __builtin_ia32_pause();
#endif
    }
    pthread_mutex_unlock(&p->busy);
}
#else
typedef struct { int n_workers; } tep_pool;
static tep_pool *tep_pool_new(int n_workers) { (void)n_workers; return NULL; }
static void tep_pool_free(tep_pool *p) { (void)p; }
static void tep_pool_run(tep_pool *p, int helpers, tep_task_fn fn, void *ctx, ptrdiff_t n_items) {
    (void)p; (void)helpers;
    for (ptrdiff_t i = 0; i < n_items; i++) fn(ctx, i, 0);
}
#endif

#endif
