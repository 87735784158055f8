/* ticker.c: a native thread that advances a wasmtime engine's epoch, without Python.
 *
 * The Proxy-Wasm host interrupts a looping filter through wasmtime's epochs (see
 * addons/proxywasm/_wasmtime.py): something must call wasmtime_engine_increment_epoch every
 * tick. A Python thread doing it needs the GIL at every tick, which costs the proxy's thread a
 * GIL hand-over and two context switches each time, and every guest call must release the GIL
 * so that the ticker can run. This thread needs no GIL: the host's guest calls then keep it.
 *
 * A tick is a period of the process's CPU time (10 ms): a POSIX timer on
 * CLOCK_PROCESS_CPUTIME_ID signals this thread, which waits for the signal and ticks. A guest
 * call can only run on while the process uses CPU, so a tick per period of CPU prompts it as
 * often as a tick per period of wall time would, and an idle proxy is never woken: at 100
 * wake-ups a second, the wall-time ticker cost an idle proxy about 2 ms of CPU a second and a
 * proxy at a quarter of a core 1 %. The kernel checks CPU timers at its scheduler tick, so a
 * tick may come up to one scheduler tick (4 ms at HZ=250) late. Where the timer cannot be made
 * (no such clock), the thread sleeps one period of wall time between ticks instead.
 *
 * One wr_ticker per engine: a thread (joined by wr_ticker_stop) that waits one period, calls
 * increment(engine), and again. A late wake-up adds one tick, never the ticks it missed. The
 * library does not link against wasmtime: the caller passes the address of
 * wasmtime_engine_increment_epoch and the engine, which must outlive the ticker.
 *
 * Built by .ci/setup (`gcc -O2 -shared -fPIC -pthread`) into addons/proxywasm/_ticker.so;
 * _wasmtime.py loads it with ctypes and ticks from Python when it is missing.
 */

#define _GNU_SOURCE /* SIGEV_THREAD_ID */

#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id /* glibc before 2.41 names the field only this way */
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* ---------------------------------------------------------------------------------------- */
/* Types                                                                                    */
/* ---------------------------------------------------------------------------------------- */

typedef void (*wr_increment_fn)(void *engine);

/* How the ticker's thread waits between ticks. */
enum wr_clock {
    WR_STARTING = 0,  /* the thread has not chosen yet */
    WR_PROCESS_CPU = 1, /* a period of the process's CPU time (the timer's signal) */
    WR_WALL = 2,      /* a period of wall time (nanosleep), where the timer cannot be made */
};

typedef struct wr_ticker {
    wr_increment_fn increment;
    void *engine;
    long period_ns;
    atomic_int stop;
    atomic_int clock; /* enum wr_clock, set once by the thread */
    pthread_t thread;
} wr_ticker;

/* Allocation goes through these two, in one place. */
#define WR_ALLOC(size) malloc(size)
#define WR_FREE(ptr) free(ptr)

/* The signal the CPU-time timer sends to the ticker's thread only (SIGEV_THREAD_ID). The
 * thread blocks it, as every signal, and takes it with sigwaitinfo, so no handler runs and no
 * other thread sees it. */
#define WR_SIGNAL (SIGRTMIN + 6)

/* ---------------------------------------------------------------------------------------- */
/* The thread                                                                               */
/* ---------------------------------------------------------------------------------------- */

/* Tick every period of wall time until asked to stop. */
static void wr_run_wall(wr_ticker *t) {
    struct timespec period = {t->period_ns / 1000000000L, t->period_ns % 1000000000L};
    while (!atomic_load(&t->stop)) {
        struct timespec left = period;
        while (nanosleep(&left, &left) == -1 && errno == EINTR) {
        }
        if (atomic_load(&t->stop)) break;
        t->increment(t->engine);
    }
}

/* Make a timer that sends WR_SIGNAL to the calling thread every period of the process's CPU
 * time. Returns 0, or -1 (nothing made) where the clock or the timer is not available. */
static int wr_cpu_timer(wr_ticker *t, timer_t *timer) {
    struct sigevent event = {0};
    event.sigev_notify = SIGEV_THREAD_ID;
    event.sigev_signo = WR_SIGNAL;
    event.sigev_notify_thread_id = (pid_t)syscall(SYS_gettid);
    if (timer_create(CLOCK_PROCESS_CPUTIME_ID, &event, timer) != 0) return -1;
    struct timespec period = {t->period_ns / 1000000000L, t->period_ns % 1000000000L};
    struct itimerspec spec = {period, period};
    if (timer_settime(*timer, 0, &spec, NULL) != 0) {
        timer_delete(*timer);
        return -1;
    }
    return 0;
}

/* The ticker's loop: wait one period (of CPU time if the timer can be made), tick, until asked
 * to stop (wr_ticker_stop sends WR_SIGNAL to end the wait). Returns NULL; `arg` (the
 * wr_ticker) stays owned by whoever calls wr_ticker_stop. */
static void *wr_ticker_run(void *arg) {
    wr_ticker *t = arg;
    timer_t timer;
    if (wr_cpu_timer(t, &timer) != 0) {
        atomic_store(&t->clock, WR_WALL);
        wr_run_wall(t);
        return NULL;
    }
    atomic_store(&t->clock, WR_PROCESS_CPU);
    sigset_t wait_for;
    sigemptyset(&wait_for);
    sigaddset(&wait_for, WR_SIGNAL);
    while (!atomic_load(&t->stop)) {
        if (sigwaitinfo(&wait_for, NULL) == -1) continue; /* EINTR */
        if (atomic_load(&t->stop)) break;
        t->increment(t->engine);
    }
    timer_delete(timer);
    return NULL;
}

/* ---------------------------------------------------------------------------------------- */
/* API                                                                                      */
/* ---------------------------------------------------------------------------------------- */

/* Start a thread calling increment(engine) every period_ns nanoseconds (1 ns to 1 s) of the
 * process's CPU time (of wall time where that clock has no timer). The thread blocks every
 * signal, so signals go to the process's other threads.
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
    t->period_ns = period_ns;
    atomic_init(&t->stop, 0);
    atomic_init(&t->clock, WR_STARTING);
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

/* The clock the ticker counts its period on: 1 the process's CPU time, 2 wall time, 0 not
 * chosen yet (the thread is starting). */
int wr_ticker_clock(const wr_ticker *t) { return t == NULL ? 0 : atomic_load(&t->clock); }

/* Stop the ticker and wait for its thread (at most one period of wall time), then free it.
 * Returns 0, or the error of pthread_join (the ticker is not freed then). */
int wr_ticker_stop(wr_ticker *t) {
    if (t == NULL) return 0;
    atomic_store(&t->stop, 1);
    /* Ends a wait for the timer's signal (queued until the thread waits, if it is not waiting
     * yet); a thread sleeping on wall time sees the flag after its period. */
    pthread_kill(t->thread, WR_SIGNAL);
    int rc = pthread_join(t->thread, NULL);
    if (rc != 0) return rc;
    WR_FREE(t);
    return 0;
}
