/* The server-like workload of `cargo xtask bench`: a small service on 127.0.0.1 that allocates
 * per request, as request handlers do (a copy of the request, a few parsed fields, a response
 * buffer; all freed when the response is sent).
 *
 * Listens on an ephemeral port and prints it ("port N"); a thread per connection; each request
 * is REQUEST bytes, each response RESPONSE bytes. Exits when stdin closes.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

#define REQUEST 64
#define RESPONSE 128
#define FIELDS 4

#define NOINLINE __attribute__((noinline))

static int read_full(int fd, char *buf, size_t n) {
    size_t got = 0;
    while (got < n) {
        ssize_t r = read(fd, buf + got, n - got);
        if (r <= 0) return -1;
        got += (size_t)r;
    }
    return 0;
}

NOINLINE static char *parse_field(const char *request, int i) {
    size_t len = 8 + (size_t)i * 8;
    char *field = malloc(len + 1);
    memcpy(field, request + i * 8, len);
    field[len] = 0;
    return field;
}

NOINLINE static int handle_request(int fd, const char *wire) {
    char *request = malloc(REQUEST);
    memcpy(request, wire, REQUEST);
    char *fields[FIELDS];
    for (int i = 0; i < FIELDS; i++) fields[i] = parse_field(request, i);
    char *response = malloc(256);
    memset(response, ' ', RESPONSE);
    int n = snprintf(response, RESPONSE, "200 %.8s %.8s", fields[0], fields[1]);
    if (n > 0 && n < RESPONSE) response[n] = ' ';
    ssize_t w = write(fd, response, RESPONSE);
    for (int i = 0; i < FIELDS; i++) free(fields[i]);
    free(response);
    free(request);
    return w == RESPONSE ? 0 : -1;
}

static void *serve(void *arg) {
    int fd = (int)(long)arg;
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    char wire[REQUEST];
    while (read_full(fd, wire, REQUEST) == 0 && handle_request(fd, wire) == 0) {
    }
    close(fd);
    return 0;
}

static void *accept_loop(void *arg) {
    int listener = (int)(long)arg;
    for (;;) {
        int fd = accept(listener, 0, 0);
        if (fd < 0) continue;
        pthread_t tid;
        if (pthread_create(&tid, 0, serve, (void *)(long)fd) != 0) {
            close(fd);
            continue;
        }
        pthread_detach(tid);
    }
    return 0;
}

int main(void) {
    int listener = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = 0};
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof addr;
    if (listener < 0 || bind(listener, (struct sockaddr *)&addr, sizeof addr) != 0 ||
        listen(listener, 64) != 0 || getsockname(listener, (struct sockaddr *)&addr, &len) != 0) {
        perror("echo_server");
        return 1;
    }
    pthread_t tid;
    pthread_create(&tid, 0, accept_loop, (void *)(long)listener);
    printf("port %d\n", ntohs(addr.sin_port));
    fflush(stdout);
    char buf[64];
    while (fgets(buf, sizeof buf, stdin)) {
    }
    return 0;
}
