/* ticker.c: a native thread that advances a wasmtime engine's epoch, without Python.
 *
 * The Proxy-Wasm host interrupts a looping filter through wasmtime's epochs (see
 * addons/proxywasm/_wasmtime.py): something must call wasmtime_engine_increment_epoch every
 * tick (10 ms). A Python thread doing it needs the GIL 100 times a second, which costs the
 * proxy's thread a GIL hand-over and two context switches each time, and every guest call
 * must release the GIL so that the ticker can run. This thread needs no GIL: the host's guest
 * calls then keep it.
 *
 * One wr_ticker per engine: a detached-in-spirit thread (joined only by wr_ticker_stop) that
 * sleeps one period, calls increment(engine), and again. A late wake-up adds one tick, never
 * the ticks it missed. The library does not link against wasmtime: the caller passes the
 * address of wasmtime_engine_increment_epoch and the engine, which must outlive the ticker.
 *
 * Built by .ci/setup (`gcc -O2 -shared -fPIC -pthread`) into addons/proxywasm/_ticker.so;
 * _wasmtime.py loads it with ctypes and ticks from Python when it is missing.
 */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <time.h>

/* ---------------------------------------------------------------------------------------- */
/* Types                                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef void (*wr_increment_fn)(void *engine);

typedef struct wr_ticker {
    wr_increment_fn increment;
    void *engine;
    struct timespec period;
    atomic_int stop;
    pthread_t thread;
} wr_ticker;

/* Allocation goes through these two, in one place. */
#define WR_ALLOC(size) malloc(size)
#define WR_FREE(ptr) free(ptr)

/* ---------------------------------------------------------------------------------------- */
/* The thread                                                                               */
/* ---------------------------------------------------------------------------------------- */

/* The ticker's loop: sleep one period (resumed after a signal), tick, until asked to stop.
 * Returns NULL; `arg` (the wr_ticker) stays owned by whoever calls wr_ticker_stop. */
static void *wr_ticker_run(void *arg) {
    wr_ticker *t = arg;
    while (!atomic_load(&t->stop)) {
        struct timespec left = t->period;
        while (nanosleep(&left, &left) == -1 && errno == EINTR) {
        }
        if (atomic_load(&t->stop)) break;
        t->increment(t->engine);
    }
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* API                                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* Start a thread calling increment(engine) every period_ns nanoseconds (1 ns to 1 s). The
 * thread blocks every signal, so signals go to the process's other threads.
 * Returns the ticker (owned by the caller, released by wr_ticker_stop), or NULL if the
 * arguments are invalid, memory runs out or the thread cannot be created (nothing is left
 * allocated then). */
wr_ticker *wr_ticker_start(wr_increment_fn increment, void *engine, long period_ns) {
    if (increment == NULL || engine == NULL || period_ns < 1 || period_ns > 1000000000L)
        return NULL;
    wr_ticker *t = WR_ALLOC(sizeof *t);
    if (t == NULL) return NULL;
    t->increment = increment;
    t->engine = engine;
    t->period.tv_sec = period_ns / 1000000000L;
    t->period.tv_nsec = period_ns % 1000000000L;
    atomic_init(&t->stop, 0);
    sigset_t all, before;
    sigfillset(&all);
    pthread_sigmask(SIG_SETMASK, &all, &before); /* the new thread inherits this mask */
    int rc = pthread_create(&t->thread, NULL, wr_ticker_run, t);
    pthread_sigmask(SIG_SETMASK, &before, NULL);
    if (rc != 0) {
        WR_FREE(t);
        return NULL;
    }
    return t;
}

/* Stop the ticker and wait for its thread (at most one period), then free it.
 * Returns 0, or the error of pthread_join (the ticker is not freed then). */
int wr_ticker_stop(wr_ticker *t) {
    if (t == NULL) return 0;
    atomic_store(&t->stop, 1);
    int rc = pthread_join(t->thread, NULL);
    if (rc != 0) return rc;
    WR_FREE(t);
    return 0;
}
