/* primeload: primecount's own load generator. Keeps --conns requests in flight over TCP (one connection per
 * request, or with --keepalive one request after another on each connection), checks every reply against the
 * one it computes itself (--verify), and prints requests per second, latency percentiles and errors, as text or
 * one JSON object (--json); with --requests N it stops after N replies (--duration is then a cap). One thread, epoll; build: cc -O2 -o primeload primeload.c
 *
 * A reply is "<count> sí" or "<count> no": how often the message's last character (a code point; the message
 * stripped of ASCII spaces and tabs at both ends, as the server strips whitespace) occurs in it, and whether
 * that count is prime. Exit status: 0 ok, 1 a reply did not match or nothing completed, 2 bad usage. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define BUCKET_US 10 /* latency histogram: 10 µs buckets up to 2 s, the rest in the last one */
#define BUCKETS 200000
#define REPLY_MAX 128

/* line: the request as sent, with its newline (length counts it); expected: the reply owed. */
typedef struct { char *line; size_t length; char expected[32]; size_t expectedLength; } Message;
typedef struct { int fd; size_t message, sent, received; double started; char reply[REPLY_MAX]; } Slot;

static Message *messages;
static size_t messageCount, nextMessage;
static unsigned long long histogram[BUCKETS], completed, matched, mismatches, errorReplies, errors, connections;
static double maxLatency;
static unsigned long long requestsWanted; /* --requests: stop once this many completed (0: run --duration) */
static int verify, keepAlive, epollFd;
static struct sockaddr_in target;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static int isPrime(unsigned long n) {
    if (n < 2) return 0;
    for (unsigned long d = 2; d * d <= n; d++)
        if (n % d == 0) return 0;
    return 1;
}

/* The reply the server owes for `line`: count the last code point's UTF-8 bytes at every offset (UTF-8 is
 * self-synchronising, so a whole code point's bytes only match at code point boundaries). */
static void expect(Message *m) {
    const char *start = m->line, *end = m->line + m->length - 1; /* without the newline */
    while (start < end && (*start == ' ' || *start == '\t')) start++;
    while (end > start && (end[-1] == ' ' || end[-1] == '\t')) end--;
    const char *last = end;
    while (last > start && (((unsigned char)last[-1]) & 0xC0) == 0x80) last--;
    if (last > start) last--;
    size_t width = end - last;
    unsigned long count = 0;
    for (const char *p = start; width && p + width <= end; p++)
        if (memcmp(p, last, width) == 0) count++;
    m->expectedLength = snprintf(m->expected, sizeof m->expected, "%lu %s\n", count,
                                 isPrime(count) ? "s\xc3\xad" : "no");
}

static void loadMessages(const char *path) {
    static char fallback[] = "abc2a\n";
    char *text = NULL;
    size_t size = 0;
    if (path) {
        FILE *file = fopen(path, "rb");
        if (!file) { perror(path); exit(2); }
        text = malloc(1 << 20);
        size = fread(text, 1, (1 << 20) - 1, file);
        fclose(file);
        text[size] = '\0';
    }
    messages = calloc(size / 2 + 2, sizeof *messages);
    for (char *line = text, *next; line && *line; line = next) {
        next = strchr(line, '\n');
        size_t length = next ? (size_t)(next - line) : strlen(line);
        if (next) *next++ = '\0';
        if (length && line[length - 1] == '\r') line[--length] = '\0';
        if (length == 0) continue;
        line[length] = '\n'; /* the newline it was cut at (or the text's end), so the request is sent whole */
        messages[messageCount] = (Message){.line = line, .length = length + 1};
        expect(&messages[messageCount++]);
    }
    if (!messageCount) {
        messages[0] = (Message){.line = fallback, .length = strlen(fallback)};
        expect(&messages[messageCount++]);
    }
}

static void closeSlot(Slot *s) {
    if (s->fd >= 0) close(s->fd);
    s->fd = -1;
}

/* Send as much of the slot's request (the message and its newline) as the socket takes. */
static int sendRequest(Slot *s) {
    Message *m = &messages[s->message];
    ssize_t n = send(s->fd, m->line + s->sent, m->length - s->sent, MSG_NOSIGNAL);
    if (n < 0) return errno == EAGAIN || errno == ENOTCONN ? 0 : -1; /* full, or still connecting */
    s->sent += n;
    return 0;
}

static void begin(Slot *s, double at) {
    s->message = nextMessage++ % messageCount;
    s->sent = s->received = 0;
    s->started = at;
    if (s->fd < 0) {
        s->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
        int one = 1;
        setsockopt(s->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        connections++;
        if (connect(s->fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
            errors++;
            closeSlot(s);
            return;
        }
        struct epoll_event event = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = s};
        epoll_ctl(epollFd, EPOLL_CTL_ADD, s->fd, &event);
        /* On loopback the handshake is usually over already: send now, as a client that writes right after
         * connect() does, so the request can be waiting when the server accepts; otherwise once writable. */
    }
    if (sendRequest(s) < 0) { errors++; closeSlot(s); }
}

static void finish(Slot *s, double at, int inWindow) {
    Message *m = &messages[s->message];
    int isError = s->received >= 6 && memcmp(s->reply, "ERROR ", 6) == 0;
    if (inWindow) {
        double latency = (at - s->started) * 1e6;
        size_t bucket = (size_t)(latency / BUCKET_US);
        histogram[bucket < BUCKETS ? bucket : BUCKETS - 1]++;
        if (latency > maxLatency) maxLatency = latency;
        completed++;
        errorReplies += isError;
        if (s->received == m->expectedLength && memcmp(s->reply, m->expected, s->received) == 0) {
            matched++;
        } else if (verify) {
            if (!mismatches)
                fprintf(stderr, "mismatch: sent '%.*s', expected '%.*s', got '%.*s'\n", (int)m->length - 1, m->line,
                        (int)m->expectedLength - 1, m->expected, (int)s->received - 1, s->reply);
            mismatches++;
        }
    }
    if (!keepAlive || isError) closeSlot(s);
}

static double percentile(double fraction) {
    unsigned long long seen = 0, wanted = (unsigned long long)(completed * fraction);
    for (size_t i = 0; i < BUCKETS; i++)
        if ((seen += histogram[i]) > wanted) return (i + 0.5) * BUCKET_US;
    return maxLatency;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *messagesPath = NULL;
    int port = 5050, conns = 50, json = 0;
    double duration = 5;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *value = i + 1 < argc ? argv[i + 1] : NULL;
        if (!strcmp(a, "--verify")) verify = 1;
        else if (!strcmp(a, "--keepalive")) keepAlive = 1;
        else if (!strcmp(a, "--json")) json = 1;
        else if (value && !strcmp(a, "--host")) host = argv[++i];
        else if (value && !strcmp(a, "--port")) port = atoi(argv[++i]);
        else if (value && !strcmp(a, "--conns")) conns = atoi(argv[++i]);
        else if (value && !strcmp(a, "--duration")) duration = atof(argv[++i]);
        else if (value && !strcmp(a, "--messages")) messagesPath = argv[++i];
        else if (value && !strcmp(a, "--requests")) requestsWanted = strtoull(argv[++i], NULL, 10);
        else {
            fprintf(stderr, "usage: primeload [--host IPV4] [--port N] [--conns N] [--duration S] "
                            "[--messages FILE] [--requests N] [--verify] [--keepalive] [--json]\n");
            return 2;
        }
    }
    target.sin_family = AF_INET;
    target.sin_port = htons(port);
    if (conns < 1 || duration <= 0 || inet_pton(AF_INET, host, &target.sin_addr) != 1) {
        fprintf(stderr, "primeload: --conns must be at least 1, --duration positive, --host an IPv4 address\n");
        return 2;
    }
    loadMessages(messagesPath);
    epollFd = epoll_create1(0);
    Slot *slots = calloc(conns, sizeof *slots);
    double start = now(), end = start + duration;
    for (int i = 0; i < conns; i++) { slots[i].fd = -1; begin(&slots[i], start); }
    struct epoll_event events[256];
    double at = start;
    while (at < end && (!requestsWanted || completed < requestsWanted)) {
        int ready = epoll_wait(epollFd, events, 256, 10);
        at = now();
        for (int i = 0; i < ready; i++) {
            Slot *s = events[i].data.ptr;
            if (s->fd < 0) continue;
            size_t whole = messages[s->message].length;
            if ((events[i].events & EPOLLOUT) && s->sent < whole && sendRequest(s) < 0) {
                errors++; closeSlot(s); begin(s, at); continue;
            }
            if (s->sent >= whole) { /* written: only readability matters now */
                struct epoll_event event = {.events = EPOLLIN | EPOLLRDHUP, .data.ptr = s};
                epoll_ctl(epollFd, EPOLL_CTL_MOD, s->fd, &event);
            }
            if (!(events[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))) continue;
            ssize_t n = recv(s->fd, s->reply + s->received, REPLY_MAX - s->received, 0);
            if (n < 0 && errno == EAGAIN) continue;
            if (n <= 0) { errors++; closeSlot(s); begin(s, at); continue; }
            s->received += n;
            if (memchr(s->reply, '\n', s->received) || s->received == REPLY_MAX) {
                int kept = s->fd >= 0 && (finish(s, at, at < end), s->fd >= 0);
                begin(s, at);
                if (kept && s->fd >= 0 && s->sent < messages[s->message].length) { /* the rest when writable */
                    struct epoll_event event = {.events = EPOLLIN | EPOLLOUT | EPOLLRDHUP, .data.ptr = s};
                    epoll_ctl(epollFd, EPOLL_CTL_MOD, s->fd, &event);
                }
            }
        }
        for (int i = 0; i < conns; i++) /* a slot whose connection failed at once (refused, no port) tries again */
            if (slots[i].fd < 0 && at < end) begin(&slots[i], at);
    }
    double window = at - start, rps = completed / window;
    if (json)
        printf("{\"target\":\"%s:%d\",\"conns\":%d,\"keepalive\":%s,\"duration_s\":%.3f,\"completed\":%llu,"
               "\"rps\":%.1f,\"ok\":%llu,\"mismatches\":%llu,\"error_replies\":%llu,\"errors_total\":%llu,"
               "\"connections\":%llu,\"latency_us\":{\"p50\":%.0f,\"p90\":%.0f,\"p99\":%.0f,\"max\":%.0f}}\n",
               host, port, conns, keepAlive ? "true" : "false", window, completed, rps, matched, mismatches,
               errorReplies, errors, connections, percentile(0.5), percentile(0.9), percentile(0.99), maxLatency);
    else
        printf("%llu requests in %.2f s: %.0f req/s, p50 %.2f ms, p99 %.2f ms; %llu ERROR replies, %llu errors, "
               "%llu mismatches\n", completed, window, rps, percentile(0.5) / 1e3, percentile(0.99) / 1e3,
               errorReplies, errors, mismatches);
    return (verify && mismatches) || !completed ? 1 : 0;
}
