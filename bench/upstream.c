/* Benchmark upstream: single-threaded epoll server behind the proxies (see proto.h).
 *
 * Built to cost as little CPU per byte as the kernel allows, so it is never the bottleneck:
 * the sink discards with recv(MSG_TRUNC) (no copy to user space), the source sends from a
 * memfd with sendfile (no copy from user space).
 *
 * usage: upstream ADDR:PORT [ADDR:PORT...]
 * Prints "ready" on stdout once listening; exits on SIGTERM/SIGINT.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/sendfile.h>
#include <sys/socket.h>
#include <unistd.h>

#include "proto.h"

#define HELLO_BUF (32 * 1024)
#define SRC_FILE (8 * 1024 * 1024)
#define SRC_CHUNK (1024 * 1024)
#define ECHO_BUF (64 * 1024)

enum { ST_HELLO, ST_RUN };

struct conn {
    int fd;
    uint8_t state, mode, want_out, close_after; /* close_after: close once the echo is sent */
    uint8_t *buf;      /* hello/command buffer, later echo backlog */
    uint32_t len, off; /* bytes in buf; echo: first unsent byte */
    uint64_t param, count, next_report;
    off_t src_off;
};

static struct conn **conns;
static int nconns_cap;
static int ep, srcfd;
static volatile sig_atomic_t stop;
static uint8_t scratch[1 << 20];

static void on_signal(int sig) { (void)sig; stop = 1; }

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void set_events(struct conn *c, uint32_t ev)
{
    struct epoll_event e = {.events = ev, .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

static void conn_close(struct conn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    conns[c->fd] = NULL;
    free(c->buf);
    free(c);
}

/* Length of the ClientHello records at the start of buf, or 0 if more bytes are needed, or -1
 * if the bytes are not a TLS handshake. */
static long hello_end(const uint8_t *b, uint32_t n)
{
    uint32_t pos = 0, hs_have = 0;
    long hs_total = -1;
    while (pos + 5 <= n) {
        if (b[pos] != 22)
            return -1;
        uint32_t rl = ((uint32_t)b[pos + 3] << 8) | b[pos + 4];
        if (pos + 5 + rl > n)
            return 0;
        if (hs_total < 0) {
            if (rl < 4)
                return -1;
            hs_total = 4 + (((long)b[pos + 6] << 16) | ((long)b[pos + 7] << 8) | b[pos + 8]);
        }
        hs_have += rl;
        pos += 5 + rl;
        if (hs_have >= hs_total)
            return (long)pos;
    }
    return 0;
}

static int send_count(struct conn *c)
{
    uint8_t m[8];
    for (int i = 0; i < 8; i++)
        m[i] = (uint8_t)(c->count >> (8 * i));
    /* 8 bytes into a socket whose send side is otherwise idle: never partial in practice */
    return send(c->fd, m, 8, MSG_NOSIGNAL) == 8 ? 0 : -1;
}

static void sink_account(struct conn *c, uint64_t n)
{
    c->count += n;
    if (c->param && c->count >= c->next_report) {
        c->next_report = c->count - c->count % c->param + c->param;
        send_count(c);
    }
}

/* Echo the bytes in c->buf[off..len]; returns -1 on error. */
static int echo_flush(struct conn *c)
{
    while (c->off < c->len) {
        ssize_t w = send(c->fd, c->buf + c->off, c->len - c->off, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN)
                break;
            return -1;
        }
        c->off += (uint32_t)w;
    }
    if (c->off == c->len) {
        c->off = c->len = 0;
        if (c->close_after)
            return -1; /* the line is echoed: close, our FIN first */
        if (c->want_out) {
            c->want_out = 0;
            set_events(c, EPOLLIN);
        }
    } else if (!c->want_out) {
        c->want_out = 1;
        set_events(c, EPOLLOUT); /* stop reading until the backlog is gone */
    }
    return 0;
}

/* 'L': once buf holds a whole line, echo it (and nothing after it), then close. */
static int line_flush(struct conn *c)
{
    uint8_t *nl = memchr(c->buf, '\n', c->len);
    if (!nl)
        return c->len == ECHO_BUF ? -1 : 0;
    c->len = (uint32_t)(nl - c->buf) + 1;
    c->close_after = 1;
    return echo_flush(c);
}

static int source_pump(struct conn *c)
{
    for (;;) {
        size_t n = SRC_CHUNK;
        if (c->param && c->param - c->count < n)
            n = c->param - c->count;
        if (n == 0)
            return -1; /* done: close */
        if (c->src_off >= SRC_FILE)
            c->src_off = 0;
        if ((size_t)(SRC_FILE - c->src_off) < n)
            n = SRC_FILE - c->src_off;
        ssize_t w = sendfile(c->fd, srcfd, &c->src_off, n);
        if (w < 0)
            return errno == EAGAIN ? 0 : -1;
        c->count += (uint64_t)w;
    }
}

static int start_mode(struct conn *c, long end)
{
    const uint8_t *cmd = c->buf + end - CMD_LEN;
    if (memcmp(cmd, CMD_MAGIC, 4) != 0)
        return -1;
    c->mode = cmd[4];
    c->param = le64(cmd + 8);
    c->state = ST_RUN;
    uint32_t extra = c->len - (uint32_t)end;
    switch (c->mode) {
    case MODE_SINK:
        free(c->buf);
        c->buf = NULL;
        c->next_report = c->param;
        sink_account(c, extra);
        return 0;
    case MODE_SOURCE:
        free(c->buf);
        c->buf = NULL;
        set_events(c, EPOLLIN | EPOLLOUT);
        return source_pump(c);
    case MODE_ACK:
        if (send(c->fd, "A", 1, MSG_NOSIGNAL) != 1)
            return -1;
        /* fall through */
    case MODE_ECHO:
    case MODE_LINE:
        memmove(c->buf, c->buf + end, extra);
        c->len = extra;
        c->off = 0;
        return c->mode == MODE_LINE ? line_flush(c) : echo_flush(c);
    default:
        return -1;
    }
}

static int on_readable(struct conn *c)
{
    if (c->state == ST_HELLO) {
        ssize_t r = recv(c->fd, c->buf + c->len, HELLO_BUF - c->len, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        c->len += (uint32_t)r;
        long end = hello_end(c->buf, c->len);
        if (end < 0 || (end == 0 && c->len == HELLO_BUF))
            return -1;
        if (end == 0 || c->len == (uint32_t)end)
            return 0;
        uint32_t extra = c->len - (uint32_t)end, k = extra < 4 ? extra : 4;
        if (memcmp(c->buf + end, CMD_MAGIC, k) == 0) /* a command header, maybe in part */
            return extra < CMD_LEN ? 0 : start_mode(c, end + CMD_LEN);
        /* no header: a line ('L'), or echo until the client closes ('=' first) */
        c->mode = c->buf[end] == LINE_KEEP ? MODE_ECHO : MODE_LINE;
        c->state = ST_RUN;
        memmove(c->buf, c->buf + end, extra);
        c->len = extra;
        c->off = 0;
        return c->mode == MODE_LINE ? line_flush(c) : echo_flush(c);
    }
    switch (c->mode) {
    case MODE_SINK:
        for (;;) {
            ssize_t r = recv(c->fd, scratch, sizeof scratch, MSG_TRUNC | MSG_DONTWAIT);
            if (r < 0)
                return errno == EAGAIN ? 0 : -1;
            if (r == 0) {
                send_count(c);
                return -1;
            }
            sink_account(c, (uint64_t)r);
        }
    case MODE_SOURCE: {
        ssize_t r = recv(c->fd, scratch, sizeof scratch, MSG_TRUNC | MSG_DONTWAIT);
        return r == 0 || (r < 0 && errno != EAGAIN) ? -1 : 0;
    }
    default: { /* echo / ack / line */
        if (c->close_after)
            return 0; /* echoing the line; what follows it is not read */
        ssize_t r = recv(c->fd, c->buf + c->len, ECHO_BUF - c->len, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        c->len += (uint32_t)r;
        return c->mode == MODE_LINE ? line_flush(c) : echo_flush(c);
    }
    }
}

static void accept_all(int lfd)
{
    for (;;) {
        int fd = accept4(lfd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
        if (fd < 0) {
            if (errno != EAGAIN && errno != EINTR)
                perror("accept");
            return;
        }
        if (fd >= nconns_cap) {
            close(fd);
            continue;
        }
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *c = calloc(1, sizeof *c);
        c->fd = fd;
        c->buf = malloc(HELLO_BUF > ECHO_BUF ? HELLO_BUF : ECHO_BUF);
        conns[fd] = c;
        struct epoll_event e = {.events = EPOLLIN, .data.fd = fd};
        epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    }
}

static int listen_on(const char *spec)
{
    char host[64];
    const char *colon = strrchr(spec, ':');
    if (!colon || colon - spec >= (long)sizeof host) {
        fprintf(stderr, "bad address %s\n", spec);
        exit(2);
    }
    memcpy(host, spec, colon - spec);
    host[colon - spec] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "bad address %s\n", spec);
        exit(2);
    }
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    int one = 1;
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    if (bind(fd, (struct sockaddr *)&a, sizeof a) < 0)
        die(spec);
    if (listen(fd, 65535) < 0)
        die("listen");
    return fd;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s ADDR:PORT [ADDR:PORT...]\n", argv[0]);
        return 2;
    }
    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    nconns_cap = (int)rl.rlim_cur;
    conns = calloc(nconns_cap, sizeof *conns);

    srcfd = memfd_create("bench-source", 0);
    if (srcfd < 0 || ftruncate(srcfd, SRC_FILE) < 0)
        die("memfd");
    uint8_t *m = mmap(NULL, SRC_FILE, PROT_READ | PROT_WRITE, MAP_SHARED, srcfd, 0);
    for (size_t i = 0; i < SRC_FILE; i++)
        m[i] = (uint8_t)(i * 2654435761u >> 24);
    munmap(m, SRC_FILE);

    signal(SIGPIPE, SIG_IGN);
    signal(SIGTERM, on_signal);
    signal(SIGINT, on_signal);
    ep = epoll_create1(EPOLL_CLOEXEC);
    int nl = argc - 1;
    int *lfds = calloc(nl, sizeof *lfds);
    for (int i = 0; i < nl; i++) {
        lfds[i] = listen_on(argv[i + 1]);
        struct epoll_event e = {.events = EPOLLIN, .data.fd = -1 - i};
        epoll_ctl(ep, EPOLL_CTL_ADD, lfds[i], &e);
    }
    printf("ready\n");
    fflush(stdout);

    struct epoll_event evs[256];
    while (!stop) {
        int n = epoll_wait(ep, evs, 256, 500);
        for (int i = 0; i < n; i++) {
            int fd = evs[i].data.fd;
            if (fd < 0) {
                accept_all(lfds[-1 - fd]);
                continue;
            }
            struct conn *c = conns[fd];
            if (!c)
                continue;
            uint32_t ev = evs[i].events;
            int rc = 0;
            if (ev & EPOLLOUT) {
                if (c->state == ST_RUN && c->mode == MODE_SOURCE)
                    rc = source_pump(c);
                else if (c->state == ST_RUN)
                    rc = echo_flush(c);
            }
            if (rc == 0 && (ev & (EPOLLIN | EPOLLHUP | EPOLLERR)))
                rc = on_readable(c);
            if (rc < 0)
                conn_close(c);
        }
    }
    return 0;
}
