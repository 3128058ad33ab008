/* The malloc-heavy microbenchmark of `cargo xtask bench`.
 *
 * It waits on stdin so that a tracer can attach first, then runs what it is told and prints
 * one line per workload:
 *   run SECS         every workload for SECS seconds: "<workload> <ns per pair> <pairs>"
 *   rate N SECS      two threads doing paced pairs, N pairs/s in all: "rate <pairs/s> <pairs>"
 *   quit
 * A "pair" is two allocator calls: malloc+free, or for the realloc mix half of
 * malloc, realloc, realloc, free. In the two-thread workload it is per thread: wall time
 * divided by the pairs of one thread, so that it compares with the single thread.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define NOINLINE __attribute__((noinline))

static uint64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* Keeps the compiler from removing a malloc+free pair. */
static void touch(void *p) { __asm__ volatile("" : : "r"(p) : "memory"); }

/* small malloc+free, three calls deep */
NOINLINE static void pair_leaf(size_t size) {
    void *p = malloc(size);
    touch(p);
    *(volatile char *)p = 1;
    free(p);
}
NOINLINE static void pair_mid(size_t size) { pair_leaf(size); touch(0); }
NOINLINE static void pair_top(size_t size) { pair_mid(size); touch(0); }

/* malloc, grow twice, free: two pairs */
NOINLINE static void realloc_leaf(void) {
    char *p = malloc(16);
    *p = 1;
    p = realloc(p, 64);
    p[63] = 1;
    p = realloc(p, 256);
    p[255] = 1;
    free(p);
}
NOINLINE static void realloc_top(void) { realloc_leaf(); touch(0); }

/* sizes from 8 bytes to 32 KiB, 64 blocks held at a time: replace one per pair */
#define SLOTS 64
struct mixed {
    void *slot[SLOTS];
    uint64_t rng;
};
NOINLINE static void mixed_leaf(struct mixed *m) {
    m->rng ^= m->rng << 13;
    m->rng ^= m->rng >> 7;
    m->rng ^= m->rng << 17;
    unsigned i = m->rng % SLOTS;
    size_t size = (size_t)8 << ((m->rng >> 8) % 13);
    size += (m->rng >> 16) % size;
    free(m->slot[i]);
    m->slot[i] = malloc(size);
    *(volatile char *)m->slot[i] = 1;
}
NOINLINE static void mixed_top(struct mixed *m) { mixed_leaf(m); touch(0); }

enum workload { PAIRS, REALLOC, MIXED };

struct job {
    enum workload workload;
    uint64_t deadline_ns;
    /* pairs per second for this thread, 0 for as fast as it goes */
    double rate;
    uint64_t start_ns;
    uint64_t pairs;
};

static void *run_job(void *arg) {
    struct job *job = arg;
    struct mixed m = {.rng = 88172645463325252ull};
    uint64_t pairs = 0;
    for (;;) {
        for (int i = 0; i < 256; i++) {
            switch (job->workload) {
            case PAIRS: pair_top(32); pairs += 1; break;
            case REALLOC: realloc_top(); pairs += 2; break;
            case MIXED: mixed_top(&m); pairs += 1; break;
            }
        }
        uint64_t t = now_ns();
        if (t >= job->deadline_ns) break;
        if (job->rate > 0) {
            /* pace: wait until the time these pairs are due */
            uint64_t due = job->start_ns + (uint64_t)(pairs / job->rate * 1e9);
            while (now_ns() < due) {
            }
        }
    }
    for (int i = 0; i < SLOTS; i++) free(m.slot[i]);
    job->pairs = pairs;
    return 0;
}

/* Runs `threads` jobs for `secs`; returns the wall time and fills pairs per thread. */
static uint64_t run_threads(enum workload w, int threads, double secs, double rate,
                            uint64_t *pairs) {
    struct job jobs[2];
    pthread_t tids[2];
    uint64_t start = now_ns();
    for (int i = 0; i < threads; i++) {
        jobs[i] = (struct job){w, start + (uint64_t)(secs * 1e9), rate, start, 0};
        if (pthread_create(&tids[i], 0, run_job, &jobs[i]) != 0) {
            perror("pthread_create");
            exit(1);
        }
    }
    *pairs = 0;
    for (int i = 0; i < threads; i++) {
        pthread_join(tids[i], 0);
        *pairs += jobs[i].pairs;
    }
    return now_ns() - start;
}

static void report(const char *name, enum workload w, int threads, double secs) {
    uint64_t pairs;
    uint64_t elapsed = run_threads(w, threads, secs, 0, &pairs);
    printf("%s %.1f %llu\n", name, (double)elapsed * threads / (double)pairs,
           (unsigned long long)pairs);
    fflush(stdout);
}

int main(void) {
    char line[128];
    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin)) {
        double secs, rate;
        if (sscanf(line, "run %lf", &secs) == 1) {
            report("pairs_1t", PAIRS, 1, secs);
            report("pairs_2t", PAIRS, 2, secs);
            report("realloc_mix", REALLOC, 1, secs);
            report("mixed_sizes", MIXED, 1, secs);
            printf("done\n");
        } else if (sscanf(line, "rate %lf %lf", &rate, &secs) == 2) {
            uint64_t pairs;
            uint64_t elapsed = run_threads(PAIRS, 2, secs, rate / 2, &pairs);
            printf("rate %.0f %llu\n", (double)pairs / ((double)elapsed / 1e9),
                   (unsigned long long)pairs);
        } else if (strncmp(line, "quit", 4) == 0) {
            return 0;
        } else {
            fprintf(stderr, "malloc_bench: unknown command %s", line);
            return 2;
        }
        fflush(stdout);
    }
    return 0;
}
