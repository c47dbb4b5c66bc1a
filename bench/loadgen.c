/* Benchmark load generator: single-threaded epoll client (protocol in proto.h).
 *
 * Every connection sends a real ClientHello read from --hello, split in two writes at 1448
 * bytes when larger (2 TCP segments, as on a 1500-byte MTU path; TCP_NODELAY keeps them
 * apart), followed by the command header.
 *
 * modes:
 *   push     N connections send for --duration; the upstream reports bytes received, and the
 *            rate is what arrived during [warmup, duration].
 *   pull     N connections receive for --duration; rate is what arrived during the window.
 *   short    --conns connections in flight, each: connect, hello + 64 B, read 64 B echo,
 *            close; rate = completed / duration; latency = connect() to echo complete.
 *            The 64 B end in '\n'. --no-cmd: no command header, the line alone (proto.h);
 *            --server-fin: the upstream echoes the line and closes first ('L'), and the
 *            connection completes when its FIN arrives, then closes; --split: the hello
 *            goes in its own write (segment), the rest in a second one, as a TLS client's
 *            first flight is the hello alone. With --rate R: open loop, R connections/s
 *            offered (at most --conns in flight) instead of --conns kept in flight.
 *   latency  open-loop --rate connections/s, at most --conns in flight; each sends the hello
 *            and times hello sent -> first upstream byte back, then closes.
 *   idle     open --conns connections (hello, wait for the upstream's ack byte), print a
 *            "ready" JSON line, hold them until stdin closes or --hold seconds pass.
 *
 * Sending uses sendfile from a memfd and receiving recv(MSG_TRUNC): no user-space copies, so
 * the load generator costs far less than any proxy. Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
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
#include <time.h>
#include <unistd.h>

#include "proto.h"

#define SEG 1448
#define SRC_FILE (8 * 1024 * 1024)
#define SHORT_MSG 64
#define MAX_PENDING_IDLE 256

enum { M_PUSH, M_PULL, M_SHORT, M_LATENCY, M_IDLE };
enum { C_CONNECTING, C_RUN, C_DONE };

struct lconn {
    int fd;
    uint8_t state;
    uint8_t rlen;
    uint8_t rbuf[SHORT_MSG];
    uint64_t count, at_t0, at_t1;
    double t_connect, t_hello;
};

/* options */
static int mode = -1, nconns = 1;
static double duration = 3, warmup = -1, rate = 1000, hold = 60, timeout_s = 10;
static uint64_t report_every = 1 << 20;
static struct sockaddr_in target, bindaddr;
static int have_bind;
static int no_cmd, server_fin, split_hello, rate_given;

static uint8_t *pre;
static size_t pre_len, pre_cut[2];
static int ep, srcfd;
static struct lconn **byfd;
static int fdcap;
static uint8_t scratch[1 << 20];

/* results */
static uint64_t completed, completed_late, errors, started, late;
static int inflight;
static double *lat;
static size_t nlat, caplat;

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void die(const char *what)
{
    perror(what);
    exit(1);
}

static void add_lat(double s)
{
    if (nlat == caplat) {
        caplat = caplat ? caplat * 2 : 65536;
        lat = realloc(lat, caplat * sizeof *lat);
    }
    lat[nlat++] = s;
}

static int parse_addr(const char *spec, struct sockaddr_in *a)
{
    char host[64];
    const char *colon = strrchr(spec, ':');
    size_t hl = colon ? (size_t)(colon - spec) : strlen(spec);
    if (hl >= sizeof host)
        return -1;
    memcpy(host, spec, hl);
    host[hl] = 0;
    memset(a, 0, sizeof *a);
    a->sin_family = AF_INET;
    a->sin_port = htons(colon ? atoi(colon + 1) : 0);
    return inet_pton(AF_INET, host, &a->sin_addr) == 1 ? 0 : -1;
}

static void load_preamble(const char *hello_path)
{
    FILE *f = fopen(hello_path, "rb");
    if (!f)
        die(hello_path);
    uint8_t hello[65536];
    size_t hl = fread(hello, 1, sizeof hello, f);
    fclose(f);
    char m = mode == M_PUSH ? MODE_SINK : mode == M_PULL ? MODE_SOURCE
           : mode == M_SHORT ? (server_fin ? MODE_LINE : MODE_ECHO) : MODE_ACK;
    uint64_t param = mode == M_PUSH ? report_every : 0;
    size_t cmd_len = mode == M_SHORT && no_cmd ? 0 : CMD_LEN;
    pre_len = hl + cmd_len + (mode == M_SHORT ? SHORT_MSG : 0);
    pre = malloc(pre_len);
    memcpy(pre, hello, hl);
    if (cmd_len)
        cmd_build(pre + hl, m, param);
    if (mode == M_SHORT) {
        uint8_t *msg = pre + hl + cmd_len;
        for (int i = 0; i < SHORT_MSG; i++)
            msg[i] = (uint8_t)('a' + i % 26);
        msg[SHORT_MSG - 1] = '\n';
        if (no_cmd && !server_fin)
            msg[0] = LINE_KEEP;
    }
    /* up to 3 writes: the first 1448 B of a long hello, the rest of the hello (--split), the rest */
    pre_cut[0] = hl > SEG ? SEG : pre_len;
    pre_cut[1] = split_hello && hl > pre_cut[0] ? hl : pre_len;
    if (split_hello && hl <= SEG)
        pre_cut[0] = hl, pre_cut[1] = pre_len;
}

static void conn_free(struct lconn *c)
{
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    byfd[c->fd] = NULL;
    free(c);
    inflight--;
}

static struct lconn *conn_open(void)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        errors++;
        return NULL;
    }
    if (fd >= fdcap) {
        close(fd);
        errors++;
        return NULL;
    }
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (have_bind) {
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&bindaddr, sizeof bindaddr) < 0) {
            close(fd);
            errors++;
            return NULL;
        }
    }
    struct lconn *c = calloc(1, sizeof *c);
    c->fd = fd;
    c->t_connect = now();
    if (connect(fd, (struct sockaddr *)&target, sizeof target) < 0 && errno != EINPROGRESS) {
        close(fd);
        free(c);
        errors++;
        return NULL;
    }
    byfd[fd] = c;
    inflight++;
    started++;
    struct epoll_event e = {.events = EPOLLOUT, .data.fd = fd};
    epoll_ctl(ep, EPOLL_CTL_ADD, fd, &e);
    return c;
}

static void set_events(struct lconn *c, uint32_t ev)
{
    struct epoll_event e = {.events = ev, .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &e);
}

/* Connection established: send hello (+command, +payload). Returns -1 on error. */
static int send_preamble(struct lconn *c)
{
    int err = 0;
    socklen_t el = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &el);
    if (err)
        return -1;
    c->t_hello = now();
    size_t at = 0;
    for (int i = 0; i <= 2 && at < pre_len; i++) {
        size_t to = i < 2 ? pre_cut[i] : pre_len;
        if (to <= at)
            continue;
        if (send(c->fd, pre + at, to - at, MSG_NOSIGNAL) != (ssize_t)(to - at))
            return -1;
        at = to;
    }
    c->state = C_RUN;
    set_events(c, mode == M_PUSH ? EPOLLIN | EPOLLOUT : EPOLLIN);
    return 0;
}

static int push_pump(struct lconn *c)
{
    static off_t off;
    for (int i = 0; i < 64; i++) {
        if (off >= SRC_FILE)
            off = 0;
        ssize_t w = sendfile(c->fd, srcfd, &off, SRC_FILE - off < (1 << 20) ? SRC_FILE - off : (1 << 20));
        if (w < 0)
            return errno == EAGAIN ? 0 : -1;
    }
    return 0;
}

/* Readable. Returns 1 when the connection is finished successfully, -1 on error, else 0. */
static int on_readable(struct lconn *c, double t)
{
    switch (mode) {
    case M_PUSH: {
        /* cumulative byte counts from the upstream, 8 bytes each; keep a partial one */
        uint8_t m[4096];
        memcpy(m, c->rbuf, c->rlen);
        ssize_t r = recv(c->fd, m + c->rlen, sizeof m - c->rlen, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        size_t have = c->rlen + (size_t)r, i;
        for (i = 0; i + 8 <= have; i += 8)
            c->count = le64(m + i);
        c->rlen = (uint8_t)(have - i);
        memcpy(c->rbuf, m + i, c->rlen);
        return 0;
    }
    case M_PULL: {
        for (;;) {
            ssize_t r = recv(c->fd, scratch, sizeof scratch, MSG_TRUNC | MSG_DONTWAIT);
            if (r < 0)
                return errno == EAGAIN ? 0 : -1;
            if (r == 0)
                return -1;
            c->count += (uint64_t)r;
        }
    }
    case M_SHORT: {
        if (c->state == C_DONE) { /* --server-fin: the echo is in; now the upstream's FIN */
            uint8_t b;
            ssize_t r = recv(c->fd, &b, 1, 0);
            if (r < 0 && errno == EAGAIN)
                return 0;
            return r == 0 ? 1 : -1;
        }
        ssize_t r = recv(c->fd, c->rbuf + c->rlen, SHORT_MSG - c->rlen, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        c->rlen += (uint8_t)r;
        if (c->rlen < SHORT_MSG)
            return 0;
        if (memcmp(c->rbuf, pre + pre_len - SHORT_MSG, SHORT_MSG) != 0)
            return -1;
        add_lat(t - c->t_connect);
        if (server_fin) {
            c->state = C_DONE;
            return on_readable(c, t); /* the FIN may have come with the echo */
        }
        return 1;
    }
    case M_LATENCY: {
        uint8_t b;
        ssize_t r = recv(c->fd, &b, 1, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        if (b != 'A')
            return -1;
        add_lat(t - c->t_hello);
        return 1;
    }
    default: { /* idle */
        uint8_t b;
        ssize_t r = recv(c->fd, &b, 1, 0);
        if (r <= 0)
            return r < 0 && errno == EAGAIN ? 0 : -1;
        if (c->state == C_DONE || b != 'A')
            return -1;
        c->state = C_DONE;
        return 1;
    }
    }
}

static int cmp_double(const void *a, const void *b)
{
    double x = *(const double *)a, y = *(const double *)b;
    return x < y ? -1 : x > y;
}

static double pct(double p)
{
    if (!nlat)
        return 0;
    size_t i = (size_t)ceil(p / 100.0 * nlat);
    return lat[i ? i - 1 : 0] * 1e6;
}

static double self_cpu(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

static void print_lat_json(void)
{
    qsort(lat, nlat, sizeof *lat, cmp_double);
    printf("\"lat_us\": {\"n\": %zu, \"p50\": %.1f, \"p90\": %.1f, \"p99\": %.1f, \"max\": %.1f}",
           nlat, pct(50), pct(90), pct(99), nlat ? lat[nlat - 1] * 1e6 : 0.0);
}

static const char *mode_name(void)
{
    static const char *n[] = {"push", "pull", "short", "latency", "idle"};
    return n[mode];
}

static void usage(void)
{
    fprintf(stderr, "usage: loadgen --mode push|pull|short|latency|idle --target IP:PORT --hello FILE\n"
                    "  [--conns N] [--duration S] [--warmup S] [--rate R] [--hold S] [--timeout S]\n"
                    "  [--bind IP] [--report-every BYTES] [--no-cmd 1] [--server-fin 1] [--split 1]\n");
    exit(2);
}

/* ---- bulk (push / pull) ---- */
static int run_bulk(void)
{
    double t_start = now(), t0 = t_start + warmup, t1 = t_start + duration;
    for (int i = 0; i < nconns; i++)
        if (!conn_open())
            return 1;
    struct epoll_event evs[256];
    int taken0 = 0;
    double t;
    while ((t = now()) < t1) {
        if (!taken0 && t >= t0) {
            for (int fd = 0; fd < fdcap; fd++)
                if (byfd[fd])
                    byfd[fd]->at_t0 = byfd[fd]->count;
            t0 = t;
            taken0 = 1;
        }
        int n = epoll_wait(ep, evs, 256, 5);
        t = now();
        for (int i = 0; i < n; i++) {
            struct lconn *c = byfd[evs[i].data.fd];
            if (!c)
                continue;
            int rc = 0;
            if (c->state == C_CONNECTING) {
                rc = send_preamble(c);
            } else {
                if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR))
                    rc = on_readable(c, t);
                if (rc == 0 && mode == M_PUSH && (evs[i].events & EPOLLOUT))
                    rc = push_pump(c);
            }
            if (rc < 0) {
                errors++;
                c->state = C_DONE;
                epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
            }
        }
    }
    t1 = now();
    uint64_t win = 0, total = 0;
    for (int fd = 0; fd < fdcap; fd++) {
        struct lconn *c = byfd[fd];
        if (c)
            c->at_t1 = c->count, win += c->count - c->at_t0;
    }
    if (mode == M_PUSH) {
        /* stop sending; collect the final reports while the proxy drains its buffers */
        int open_conns = 0;
        for (int fd = 0; fd < fdcap; fd++) {
            struct lconn *c = byfd[fd];
            if (c && c->state == C_RUN) {
                shutdown(c->fd, SHUT_WR);
                set_events(c, EPOLLIN);
                open_conns++;
            }
        }
        double tend = now() + 2.0;
        while (open_conns > 0 && now() < tend) {
            int n = epoll_wait(ep, evs, 256, 50);
            for (int i = 0; i < n; i++) {
                struct lconn *c = byfd[evs[i].data.fd];
                if (c && c->state == C_RUN && on_readable(c, now()) < 0) {
                    c->state = C_DONE;
                    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
                    open_conns--;
                }
            }
        }
    }
    for (int fd = 0; fd < fdcap; fd++)
        if (byfd[fd])
            total += byfd[fd]->count;
    double w = t1 - t0;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"window_s\": %.4f, \"bytes_window\": %llu, "
           "\"bytes_total\": %llu, \"gib_per_s\": %.4f, \"errors\": %llu, \"cpu_s\": %.3f}\n",
           mode_name(), nconns, w, (unsigned long long)win, (unsigned long long)total,
           win / w / (1024.0 * 1024 * 1024), (unsigned long long)errors, self_cpu());
    return 0;
}

/* ---- short / latency ---- */
static int run_conns(void)
{
    double t_start = now(), t_end = t_start + duration, t_next = t_start;
    int open_loop = mode == M_LATENCY || rate_given; /* short --rate R: offered, not closed-loop */
    double interval = open_loop ? 1.0 / rate : 0;
    struct epoll_event evs[256];
    double t;
    while ((t = now()) < t_end || inflight > 0) {
        if (t > t_end + timeout_s)
            break;
        if (t < t_end && errors < 1000) {
            if (!open_loop) {
                while (inflight < nconns && conn_open())
                    ;
            } else {
                while (t >= t_next && t_next < t_end) {
                    if (inflight >= nconns) {
                        late++;
                        break;
                    }
                    if (!conn_open())
                        break;
                    t_next += interval;
                }
            }
        }
        int wait_ms = 5;
        if (open_loop && t < t_end) {
            double d = (t_next - now()) * 1000;
            wait_ms = d <= 0 ? 0 : d < 5 ? (int)ceil(d) : 5;
        }
        int n = epoll_wait(ep, evs, 256, wait_ms);
        t = now();
        for (int i = 0; i < n; i++) {
            struct lconn *c = byfd[evs[i].data.fd];
            if (!c)
                continue;
            int rc = c->state == C_CONNECTING ? send_preamble(c) : on_readable(c, t);
            if (rc != 0) {
                if (rc > 0 && t <= t_end + 0.001)
                    completed++;
                else if (rc > 0)
                    completed_late++; /* started in the window, done after it: its CPU counts */
                else if (rc < 0)
                    errors++;
                conn_free(c);
            }
        }
    }
    double el = (now() < t_end ? now() : t_end) - t_start;
    printf("{\"mode\": \"%s\", \"conns\": %d, \"duration_s\": %.4f, \"completed\": %llu, "
           "\"rate_per_s\": %.1f, \"errors\": %llu, \"late\": %llu, \"unfinished\": %d, \"cpu_s\": %.3f, "
           "\"completed_late\": %llu, ",
           mode_name(), nconns, el, (unsigned long long)completed, completed / el,
           (unsigned long long)errors, (unsigned long long)late, inflight, self_cpu(),
           (unsigned long long)completed_late);
    print_lat_json();
    printf("}\n");
    return 0;
}

/* ---- idle ---- */
static int run_idle(void)
{
    double t_start = now(), deadline = t_start + timeout_s;
    struct epoll_event evs[256];
    uint64_t ready = 0;
    int opened = 0;
    while (ready + errors < (uint64_t)nconns && now() < deadline) {
        while (opened < nconns && (uint64_t)opened - ready - errors < MAX_PENDING_IDLE) {
            if (!conn_open()) {
                opened++;
                continue;
            }
            opened++;
        }
        int n = epoll_wait(ep, evs, 256, 10);
        double t = now();
        for (int i = 0; i < n; i++) {
            struct lconn *c = byfd[evs[i].data.fd];
            if (!c)
                continue;
            int rc = c->state == C_CONNECTING ? send_preamble(c) : on_readable(c, t);
            if (rc > 0) {
                ready++;
                set_events(c, EPOLLRDHUP);
            } else if (rc < 0) {
                errors++;
                conn_free(c);
            }
        }
    }
    printf("{\"event\": \"ready\", \"ready\": %llu, \"errors\": %llu, \"open_s\": %.3f}\n",
           (unsigned long long)ready, (unsigned long long)errors, now() - t_start);
    fflush(stdout);
    /* hold until stdin closes (or says anything) or --hold passes */
    struct epoll_event e = {.events = EPOLLIN, .data.fd = -1};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &e);
    uint64_t dropped = 0;
    double hold_end = now() + hold;
    int done = 0;
    while (!done && now() < hold_end) {
        int n = epoll_wait(ep, evs, 256, 100);
        for (int i = 0; i < n; i++) {
            if (evs[i].data.fd == -1) {
                done = 1;
                continue;
            }
            struct lconn *c = byfd[evs[i].data.fd];
            if (c) {
                dropped++;
                conn_free(c);
            }
        }
    }
    printf("{\"mode\": \"idle\", \"conns\": %d, \"ready\": %llu, \"errors\": %llu, \"dropped\": %llu, "
           "\"cpu_s\": %.3f}\n",
           nconns, (unsigned long long)ready, (unsigned long long)errors, (unsigned long long)dropped,
           self_cpu());
    return 0;
}

int main(int argc, char **argv)
{
    const char *hello = NULL, *tgt = NULL;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i], *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        i++;
        if (!strcmp(a, "--mode")) {
            const char *n[] = {"push", "pull", "short", "latency", "idle"};
            for (int k = 0; k < 5; k++)
                if (!strcmp(v, n[k]))
                    mode = k;
        } else if (!strcmp(a, "--target"))
            tgt = v;
        else if (!strcmp(a, "--hello"))
            hello = v;
        else if (!strcmp(a, "--conns"))
            nconns = atoi(v);
        else if (!strcmp(a, "--duration"))
            duration = atof(v);
        else if (!strcmp(a, "--warmup"))
            warmup = atof(v);
        else if (!strcmp(a, "--rate"))
            rate = atof(v), rate_given = 1;
        else if (!strcmp(a, "--hold"))
            hold = atof(v);
        else if (!strcmp(a, "--timeout"))
            timeout_s = atof(v);
        else if (!strcmp(a, "--no-cmd"))
            no_cmd = atoi(v);
        else if (!strcmp(a, "--server-fin"))
            server_fin = atoi(v);
        else if (!strcmp(a, "--split"))
            split_hello = atoi(v);
        else if (!strcmp(a, "--report-every"))
            report_every = strtoull(v, NULL, 10);
        else if (!strcmp(a, "--bind")) {
            if (parse_addr(v, &bindaddr) < 0)
                usage();
            have_bind = 1;
        } else
            usage();
    }
    if (mode < 0 || !hello || !tgt || parse_addr(tgt, &target) < 0 || nconns < 1 || rate <= 0)
        usage();
    if (warmup < 0)
        warmup = duration * 0.15;

    struct rlimit rl;
    getrlimit(RLIMIT_NOFILE, &rl);
    fdcap = (int)rl.rlim_cur;
    byfd = calloc(fdcap, sizeof *byfd);
    signal(SIGPIPE, SIG_IGN);
    load_preamble(hello);
    ep = epoll_create1(EPOLL_CLOEXEC);
    if (mode == M_PUSH) {
        srcfd = memfd_create("bench-push", 0);
        if (srcfd < 0 || ftruncate(srcfd, SRC_FILE) < 0)
            die("memfd");
        uint8_t *m = mmap(NULL, SRC_FILE, PROT_READ | PROT_WRITE, MAP_SHARED, srcfd, 0);
        for (size_t i = 0; i < SRC_FILE; i++)
            m[i] = (uint8_t)(i * 2654435761u >> 24);
        munmap(m, SRC_FILE);
    }
    switch (mode) {
    case M_PUSH:
    case M_PULL:
        return run_bulk();
    case M_IDLE:
        return run_idle();
    default:
        return run_conns();
    }
}
