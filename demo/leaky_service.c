/* leaky-service: leaktrace's bundled demo, a toy request handler with one real leak.
 *
 * Every millisecond it "handles a request":
 *   - parse_request():    a scratch buffer, freed at the end of the request (churn: not a leak);
 *   - session_cache_put(): a bounded cache of 256 sessions, the oldest evicted (stable usage);
 *   - remember_request(): appends a 512-byte record to an audit list that is never trimmed
 *                          (the leak: it grows by ~500 KiB/s for as long as the service runs).
 * It runs until killed.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define CACHE_SLOTS 256

struct record {
    struct record *next;
    char payload[504];
};

static struct record *audit_log;
static char *session_cache[CACHE_SLOTS];

__attribute__((noinline)) static void remember_request(long id) {
    struct record *r = malloc(sizeof *r);
    memset(r->payload, (int)id, sizeof r->payload);
    r->next = audit_log;
    audit_log = r;
}

__attribute__((noinline)) static void session_cache_put(long id) {
    size_t slot = (size_t)id % CACHE_SLOTS;
    free(session_cache[slot]);
    session_cache[slot] = calloc(1, 1024);
}

__attribute__((noinline)) static long parse_request(long id) {
    char *scratch = malloc(2048);
    memset(scratch, (int)id, 2048);
    long sum = scratch[id % 2048];
    free(scratch);
    return sum;
}

__attribute__((noinline)) static void handle_request(long id) {
    parse_request(id);
    session_cache_put(id);
    remember_request(id);
}

int main(void) {
    struct timespec tick = {0, 1000 * 1000};
    for (long id = 0;; id++) {
        handle_request(id);
        nanosleep(&tick, NULL);
    }
}
