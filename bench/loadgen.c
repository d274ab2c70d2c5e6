/*
 * loadgen: the WebSocket load generator of broadcaster's fan-out benchmark.
 *
 * One thread, epoll, non-blocking sockets.  It opens N subscriber
 * connections and (except in idle mode) one publisher connection to a
 * WebSocket server on 127.0.0.1, with a real client handshake (random
 * Sec-WebSocket-Key, Sec-WebSocket-Accept checked) and masked frames for
 * everything it sends.  Server frames must be unmasked; text, binary and
 * continuation frames, 7-, 16- and 64-bit lengths are parsed; pings are
 * answered with pongs and close frames with close frames.
 *
 * Benchmark messages are text frames of --size bytes (default 64):
 *
 *     B<seq: 10 digits> <CLOCK_MONOTONIC send time in ns: 20 digits> xxxx...
 *
 * Any other frame (such as broadcaster's "<id> connected") is counted as an
 * announcement and otherwise ignored.  Every benchmark frame is checked: its
 * padding, and per connection its sequence number (a jump forward is an
 * order error, a number already seen a duplicate).  Latency is receive time
 * minus the send time in the payload, kept in a log-linear histogram (0.2%
 * precision).
 *
 * The publisher connects to --publisher-port if given (a second server
 * sharing a backplane with the first), else to --port like the subscribers.
 *
 * Modes:
 *   throughput  the publisher keeps --window messages in flight: it sends a
 *               new one whenever one has reached every subscriber.
 *   rate        the publisher sends --rate messages per second.
 *   idle        subscribers only, opened in --stages (e.g. 500,5000); after
 *               each stage has connected and gone quiet, a JSON line is
 *               printed and the next stage waits for a line on stdin.
 *   storm       --subscribers connections opened as fast as the server takes
 *               them, --concurrency connects and handshakes under way at a
 *               time; a connection is done at its 101 (with --greeting 1, at
 *               its first message: the server's greeting).  The time until
 *               all are done, each one's handshake time (connect() to 101),
 *               and the server's CPU until it went quiet.
 *
 * In rate and throughput modes, --slow K of the subscribers read at most
 * --slow-bytes-per-s bytes a second and --stalled M read nothing at all from
 * their 101 on, both with an SO_RCVBUF of --slow-rcvbuf bytes
 * and a TCP MSS of --slow-mss (spread evenly among the others).  They are left out of the delivery check
 * and the latencies, which are the other ("honest") subscribers'; the server
 * closing or resetting them is no error but reported: whether, how (close
 * frame and its code, EOF, reset) and, when seen during the run, how long
 * after the first message (a server that closes cleanly waits for the close
 * handshake, which a stalled reader cannot answer: then the time is not
 * known, -1).  After the run they all read what they were sent, without a
 * limit, to see how it ended.
 *
 * Both message modes run --warmup seconds (not measured), then --duration
 * seconds (measured: deliveries, completed messages, server CPU from
 * /proc/<--server-pid>/stat, our own CPU from getrusage), or stop after
 * --messages messages if given; with --server-core, the busy, softirq and
 * steal time of that CPU over the window too (/proc/stat), since the
 * kernel's network processing on the server's CPU is not all charged to
 * the server process.  Then sending stops and the generator waits
 * for every message to arrive everywhere (giving up after --drain-timeout
 * seconds without progress, or --drain-max seconds in all), and prints one
 * JSON line with every figure.
 *
 * After its last line it keeps serving the connections (answering close
 * frames, so servers can drain) until stdin reaches end of file, then exits.
 * Exit status: 0 when it ran (check the JSON for delivery errors), 2 for
 * usage errors, 1 for failures (a connection or handshake failed).
 *
 * Build: cc -O2 -o loadgen loadgen.c   (Linux only; no library needed)
 */

#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/random.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#ifndef IP_BIND_ADDRESS_NO_PORT
#define IP_BIND_ADDRESS_NO_PORT 24
#endif

/* ------------------------------------------------------------------ */
/* Small utilities                                                      */

static void die(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    fprintf(stderr, "loadgen: ");
    vfprintf(stderr, fmt, ap);
    fprintf(stderr, "\n");
    va_end(ap);
    exit(1);
}

static void *xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        die("out of memory (%zu bytes)", n);
    return q;
}

static int64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static double self_cpu_s(void)
{
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    return ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6 + ru.ru_stime.tv_sec +
           ru.ru_stime.tv_usec / 1e6;
}

/* utime + stime of another process, in seconds (and stime alone in *sys_s);
 * -1 if unreadable. */
static double proc_cpu2_s(int pid, double *sys_s)
{
    char path[64], buf[4096];
    if (pid <= 0)
        return -1;
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    char *p = strrchr(buf, ')'); /* the command name may contain spaces */
    if (!p)
        return -1;
    p += 2; /* field 3, state */
    unsigned long utime = 0, stime = 0;
    /* fields 3..13 skipped, 14 utime, 15 stime */
    if (sscanf(p, "%*c %*d %*d %*d %*d %*d %*u %*u %*u %*u %*u %lu %lu", &utime, &stime) != 2)
        return -1;
    if (sys_s)
        *sys_s = (double)stime / sysconf(_SC_CLK_TCK);
    return (double)(utime + stime) / sysconf(_SC_CLK_TCK);
}

static double proc_cpu_s(int pid) { return proc_cpu2_s(pid, NULL); }

/* Jiffies of CPU `core` from /proc/stat: busy (all but idle and iowait),
 * softirq, steal.  Returns 0 on success. */
typedef struct {
    double busy, softirq, steal, total;
} core_times;

static int read_core(int core, core_times *out)
{
    char buf[16384], name[16];
    if (core < 0)
        return -1;
    int fd = open("/proc/stat", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return -1;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return -1;
    buf[n] = 0;
    snprintf(name, sizeof name, "\ncpu%d ", core);
    char *p = strstr(buf, name);
    if (!p)
        return -1;
    unsigned long long v[8] = {0};
    if (sscanf(p + strlen(name), "%llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
               &v[3], &v[4], &v[5], &v[6], &v[7]) != 8)
        return -1;
    double hz = sysconf(_SC_CLK_TCK);
    out->total = (double)(v[0] + v[1] + v[2] + v[3] + v[4] + v[5] + v[6] + v[7]) / hz;
    out->busy = out->total - (double)(v[3] + v[4]) / hz;
    out->softirq = (double)v[6] / hz;
    out->steal = (double)v[7] / hz;
    return 0;
}

/* xorshift128+, seeded from getrandom(): keys and masks. */
static uint64_t rng_s[2];

static void rng_seed(void)
{
    if (getrandom(rng_s, sizeof rng_s, 0) != sizeof rng_s)
        die("getrandom failed: %s", strerror(errno));
    if (!rng_s[0] && !rng_s[1])
        rng_s[0] = 1;
}

static uint64_t rng_next(void)
{
    uint64_t s1 = rng_s[0];
    const uint64_t s0 = rng_s[1];
    rng_s[0] = s0;
    s1 ^= s1 << 23;
    rng_s[1] = s1 ^ s0 ^ (s1 >> 17) ^ (s0 >> 26);
    return rng_s[1] + s0;
}

#include "wsutil.h"

/* ------------------------------------------------------------------ */
/* Latency histogram: log-linear, 512 sub-buckets per power of two.     */

#define H_SUB 512
#define H_LINEAR 1024
#define H_BUCKETS (H_LINEAR + 48 * H_SUB)

static uint64_t hist[H_BUCKETS];
static uint64_t hist_count, hist_max;
static double hist_sum;

static int h_index(uint64_t v)
{
    if (v < H_LINEAR)
        return (int)v;
    int e = 63 - __builtin_clzll(v) - 9; /* v >> e is in [512, 1024) */
    int i = H_LINEAR + (e - 1) * H_SUB + (int)((v >> e) - H_SUB);
    return i < H_BUCKETS ? i : H_BUCKETS - 1;
}

static uint64_t h_value(int i) /* lower bound of bucket i */
{
    if (i < H_LINEAR)
        return (uint64_t)i;
    int e = (i - H_LINEAR) / H_SUB + 1;
    return (uint64_t)(H_SUB + (i - H_LINEAR) % H_SUB) << e;
}

static void h_record(int64_t ns)
{
    uint64_t v = ns < 0 ? 0 : (uint64_t)ns;
    hist[h_index(v)]++;
    hist_count++;
    hist_sum += (double)v;
    if (v > hist_max)
        hist_max = v;
}

static double h_quantile(double q) /* in ns */
{
    if (!hist_count)
        return 0;
    uint64_t target = (uint64_t)(q * (double)hist_count);
    if (target >= hist_count)
        target = hist_count - 1;
    uint64_t seen = 0;
    for (int i = 0; i < H_BUCKETS; i++) {
        seen += hist[i];
        if (seen > target) {
            uint64_t lo = h_value(i), hi = i + 1 < H_BUCKETS ? h_value(i + 1) : lo;
            double mid = (lo + hi) / 2.0;
            return mid > (double)hist_max ? (double)hist_max : mid;
        }
    }
    return (double)hist_max;
}

/* ------------------------------------------------------------------ */
/* Configuration                                                        */

enum { MODE_THROUGHPUT, MODE_RATE, MODE_IDLE, MODE_STORM };

static struct {
    const char *host;
    int port;
    int publisher_port; /* 0: --port (another node's port for cross-node runs) */
    int mode;
    int subscribers;
    int window;
    double rate;
    double duration;
    double warmup;
    long messages; /* 0: no cap */
    int size;
    int server_pid;
    int server_core; /* -1: unknown */
    int concurrency;
    int sources;
    double drain_timeout;
    double drain_max;
    double connect_timeout;
    int settle_ms;
    double settle_max;
    int stages[16];
    int nstages;
    double linger_max; /* seconds to wait for stdin EOF after the last report */
    int name_length;   /* >0: connect as /?name=<this many characters> */
    int greeting;      /* storm: a connection is done at its first message, not its 101 */
    int slow;          /* rate: subscribers that read at slow_bytes_per_s */
    double slow_bytes_per_s;
    int stalled;       /* rate: subscribers that stop reading when sending starts */
    int slow_rcvbuf;   /* SO_RCVBUF of slow and stalled subscribers (0: the system's) */
    int slow_mss;      /* their TCP_MAXSEG (0: the system's) */
} cfg = {
    .host = "127.0.0.1",
    .port = 0,
    .mode = MODE_THROUGHPUT,
    .subscribers = 100,
    .window = 32,
    .rate = 200,
    .duration = 5,
    .warmup = 1,
    .messages = 0,
    .size = 64,
    .server_pid = 0,
    .server_core = -1,
    .concurrency = 32,
    .sources = 1,
    .drain_timeout = 5,
    .drain_max = 60,
    .connect_timeout = 120,
    .settle_ms = 300,
    .settle_max = 600,
    .nstages = 0,
    .linger_max = 120,
    .slow_rcvbuf = 4096,
    .slow_mss = 536,
};

#define HDR_LEN 33 /* "B" + 10 digits + " " + 20 digits + " " */

/* ------------------------------------------------------------------ */
/* Connections                                                          */

enum { ST_IDLE, ST_CONNECTING, ST_HANDSHAKE, ST_OPEN, ST_CLOSING, ST_CLOSED };
enum { ROLE_SUB, ROLE_PUB };
/* What kind of reader a subscriber is: only honest ones are in the delivery
 * check and the latencies. */
enum { KIND_HONEST, KIND_SLOW, KIND_STALLED };
/* How the server ended a slow or stalled subscriber. */
enum { CUT_NONE, CUT_CLOSE, CUT_EOF, CUT_RESET };

typedef struct conn {
    int fd;
    int id;
    uint8_t role, state, want_out;
    char key[32];
    uint8_t *left; /* received bytes not yet parsed (a partial frame or header) */
    uint32_t left_len, left_cap;
    uint8_t *tx; /* bytes the socket would not take yet */
    uint32_t tx_off, tx_len, tx_cap;
    uint8_t *msg; /* fragmented message being reassembled */
    uint32_t msg_len, msg_cap;
    int8_t msg_op;
    int64_t last_seq;
    uint64_t received;
    uint8_t kind, paused, detached, cut_how;
    int close_code;    /* of the server's close frame, -1: none */
    double budget;     /* bytes a slow subscriber may read now */
    int64_t t_start;   /* connect() called */
    int64_t t_open;    /* 101 received */
    int64_t t_greet;   /* first message received */
    int64_t t_cut;     /* the server hung up on a paused subscriber, seen then */
} conn;

static conn *conns;
static int nconns;      /* allocated */
static int target_open; /* how many subscribers the current stage wants */
static int started;     /* subscribers whose connect has begun */
static int pending;     /* in CONNECTING or HANDSHAKE */
static int opened;      /* ever reached OPEN */
static int greeted;     /* received a first message */
static int honest;      /* subscribers in the delivery check */
static int pacing;      /* slow subscribers read at their bandwidth, stalled ones not at all */
static int64_t pace_ns; /* when budgets were last topped up */
static int epfd;
static uint8_t *scratch;
static size_t scratch_cap = 1 << 18;

/* Counters */
static uint64_t announcements, announcement_bytes, bench_bytes;
static uint64_t order_errors, duplicates, corrupt, protocol_errors;
static uint64_t server_closes, resets, pings;
/* Server closes and resets of slow and stalled subscribers (not errors). */
static uint64_t odd_closes, odd_resets;
static int64_t last_data_ns;

/* Message bookkeeping (publisher side). */
static uint32_t *counts; /* per seq: subscribers that have it */
static size_t counts_cap;
static int64_t next_seq;       /* next to send */
static int64_t completed;      /* messages that reached every subscriber */
static int64_t in_flight;
static int sending = 0;          /* publisher may send */
static int64_t measure_from_seq = INT64_MAX; /* latency recorded for seq >= this */
static int64_t t_measure_start, t_measure_end; /* 0: not yet */
static uint64_t win_deliveries, win_completed;
static int measuring;

static void set_events(conn *c, int out)
{
    struct epoll_event ev = {.events = (c->paused ? 0 : EPOLLIN | EPOLLRDHUP) | (out ? EPOLLOUT : 0),
                             .data.ptr = c};
    c->want_out = out;
    if (c->detached)
        return;
    if (epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev) < 0)
        die("epoll_ctl: %s", strerror(errno));
}

static void resume(conn *c);

/* A slow or stalled subscriber stops (or resumes) reading. */
static void set_paused(conn *c, int paused)
{
    if (c->paused == paused || c->state == ST_CLOSED)
        return;
    c->paused = paused;
    set_events(c, c->want_out);
}

/* The server ended a slow or stalled subscriber: keep the first sign of it. */
static void note_cut(conn *c, int how)
{
    if (c->cut_how == CUT_NONE)
        c->cut_how = how;
    if (!c->t_cut && pacing) /* after the run, the time would say nothing */
        c->t_cut = now_ns();
}

static void conn_close(conn *c)
{
    if (c->state == ST_CLOSED)
        return;
    if (c->state == ST_CONNECTING || c->state == ST_HANDSHAKE)
        pending--;
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    c->fd = -1;
    c->state = ST_CLOSED;
    free(c->left), c->left = NULL, c->left_len = c->left_cap = 0;
    free(c->tx), c->tx = NULL, c->tx_len = c->tx_off = c->tx_cap = 0;
    free(c->msg), c->msg = NULL, c->msg_len = c->msg_cap = 0;
}

/* Queue bytes for the socket: write now if nothing is waiting, keep the rest. */
static void conn_send(conn *c, const uint8_t *data, size_t len)
{
    if (c->state == ST_CLOSED)
        return;
    if (c->tx_len == c->tx_off) {
        c->tx_len = c->tx_off = 0;
        while (len) {
            ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
            if (n > 0) {
                data += n, len -= n;
                continue;
            }
            if (n < 0 && errno == EINTR)
                continue;
            if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                break;
            resets++;
            conn_close(c);
            return;
        }
        if (!len)
            return;
    }
    if (c->tx_len + len > c->tx_cap) {
        if (c->tx_off) {
            memmove(c->tx, c->tx + c->tx_off, c->tx_len - c->tx_off);
            c->tx_len -= c->tx_off, c->tx_off = 0;
        }
        while (c->tx_len + len > c->tx_cap)
            c->tx_cap = c->tx_cap ? c->tx_cap * 2 : 1024;
        c->tx = xrealloc(c->tx, c->tx_cap);
    }
    memcpy(c->tx + c->tx_len, data, len);
    c->tx_len += len;
    if (!c->want_out)
        set_events(c, 1);
}

static void conn_flush(conn *c)
{
    while (c->tx_off < c->tx_len) {
        ssize_t n = send(c->fd, c->tx + c->tx_off, c->tx_len - c->tx_off, MSG_NOSIGNAL);
        if (n > 0) {
            c->tx_off += n;
            continue;
        }
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
            return;
        resets++;
        conn_close(c);
        return;
    }
    c->tx_off = c->tx_len = 0;
    set_events(c, 0);
}

/* A masked client frame (FIN set). */
static void send_frame(conn *c, int opcode, const uint8_t *payload, size_t len)
{
    uint8_t buf[14 + 256];
    uint8_t *frame = len <= 256 ? buf : xrealloc(NULL, len + 14);
    size_t h = 0;
    frame[h++] = 0x80 | opcode;
    if (len < 126) {
        frame[h++] = 0x80 | len;
    } else if (len < 65536) {
        frame[h++] = 0x80 | 126, frame[h++] = len >> 8, frame[h++] = len;
    } else {
        frame[h++] = 0x80 | 127;
        for (int i = 7; i >= 0; i--)
            frame[h++] = (uint8_t)((uint64_t)len >> (8 * i));
    }
    uint32_t m = (uint32_t)rng_next();
    uint8_t mask[4] = {m, m >> 8, m >> 16, m >> 24};
    memcpy(frame + h, mask, 4);
    h += 4;
    for (size_t i = 0; i < len; i++)
        frame[h + i] = payload[i] ^ mask[i & 3];
    conn_send(c, frame, h + len);
    if (frame != buf)
        free(frame);
}

static void start_connect(conn *c)
{
    int fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
        die("socket: %s (raise the open files limit?)", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (c->kind != KIND_HONEST) {
        /* Before connect(): the window scale and the MSS are agreed in the
         * TCP handshake.  A small MSS keeps the server's kernel from giving
         * this connection a send buffer of megabytes (on loopback its MSS
         * is 64 KiB, and the initial send buffer is sized from it), so the
         * backlog of a slow or stalled reader reaches the server process. */
        if (cfg.slow_rcvbuf > 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &cfg.slow_rcvbuf, sizeof cfg.slow_rcvbuf);
        if (cfg.slow_mss > 0)
            setsockopt(fd, IPPROTO_TCP, TCP_MAXSEG, &cfg.slow_mss, sizeof cfg.slow_mss);
    }
    if (cfg.sources > 1) {
        /* Spread connections over 127.0.0.1..127.0.0.K so that ephemeral
         * ports do not run short; the port is still chosen at connect(). */
        setsockopt(fd, IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, &one, sizeof one);
        struct sockaddr_in src = {.sin_family = AF_INET, .sin_port = 0};
        src.sin_addr.s_addr = htonl(0x7f000001 + (uint32_t)(c->id % cfg.sources));
        if (bind(fd, (struct sockaddr *)&src, sizeof src) < 0)
            die("bind 127.0.0.%d: %s", 1 + c->id % cfg.sources, strerror(errno));
    }
    int port = (c->role == ROLE_PUB && cfg.publisher_port) ? cfg.publisher_port : cfg.port;
    struct sockaddr_in dst = {.sin_family = AF_INET, .sin_port = htons(port)};
    if (inet_pton(AF_INET, cfg.host, &dst.sin_addr) != 1)
        die("bad host %s", cfg.host);
    c->fd = fd;
    c->state = ST_CONNECTING;
    c->last_seq = -1;
    c->t_start = now_ns();
    pending++;
    struct epoll_event ev = {.events = EPOLLOUT | EPOLLIN | EPOLLRDHUP, .data.ptr = c};
    c->want_out = 1;
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, fd, &ev) < 0)
        die("epoll_ctl add: %s", strerror(errno));
    if (connect(fd, (struct sockaddr *)&dst, sizeof dst) < 0 && errno != EINPROGRESS)
        die("connect to %s:%d: %s", cfg.host, port, strerror(errno));
}

static void send_handshake(conn *c)
{
    uint8_t raw[16];
    for (int i = 0; i < 16; i += 8) {
        uint64_t r = rng_next();
        memcpy(raw + i, &r, 8);
    }
    base64(raw, 16, c->key);
    /* A display name of cfg.name_length characters, unique per connection. */
    char path[160] = "/";
    if (cfg.name_length > 0) {
        int len = cfg.name_length < 128 ? cfg.name_length : 128;
        int n = snprintf(path, sizeof path, "/?name=c%d-", c->id);
        while (n < 7 + len && n < (int)sizeof path - 1)
            path[n++] = 'x';
        path[n] = 0;
    }
    char req[640];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\n"
                     "Host: %s:%d\r\n"
                     "Upgrade: websocket\r\n"
                     "Connection: Upgrade\r\n"
                     "Sec-WebSocket-Key: %s\r\n"
                     "Sec-WebSocket-Version: 13\r\n"
                     "User-Agent: broadcaster-bench-loadgen\r\n"
                     "\r\n",
                     path, cfg.host, cfg.port, c->key);
    c->state = ST_HANDSHAKE;
    conn_send(c, (uint8_t *)req, n);
}

/* Check the 101 response; returns header length, 0 if incomplete. */
static size_t check_handshake(conn *c, const uint8_t *buf, size_t len)
{
    const uint8_t *end = memmem(buf, len, "\r\n\r\n", 4);
    if (!end) {
        if (len > 16384)
            die("handshake response over 16 KiB");
        return 0;
    }
    size_t hlen = end + 4 - buf;
    char *h = strndup((const char *)buf, hlen);
    if (strncmp(h, "HTTP/1.1 101", 12) != 0) {
        char *eol = strstr(h, "\r\n");
        if (eol)
            *eol = 0;
        die("handshake refused: %s", h);
    }
    char guid_key[128];
    snprintf(guid_key, sizeof guid_key, "%s258EAFA5-E914-47DA-95CA-C5AB0DC85B11", c->key);
    uint8_t digest[20];
    char expect[40];
    sha1((uint8_t *)guid_key, strlen(guid_key), digest);
    base64(digest, 20, expect);
    int ok = 0;
    for (char *line = strstr(h, "\r\n"); line && line[2]; line = strstr(line + 2, "\r\n")) {
        char *l = line + 2;
        if (strncasecmp(l, "Sec-WebSocket-Accept:", 21) == 0) {
            char *v = l + 21;
            while (*v == ' ' || *v == '\t')
                v++;
            ok = strncmp(v, expect, strlen(expect)) == 0;
        }
    }
    if (!ok)
        die("handshake: missing or wrong Sec-WebSocket-Accept (expected %s)", expect);
    free(h);
    return hlen;
}

static void ensure_counts(int64_t seq)
{
    if ((size_t)seq < counts_cap)
        return;
    size_t cap = counts_cap ? counts_cap : 4096;
    while (cap <= (size_t)seq)
        cap *= 2;
    counts = xrealloc(counts, cap * sizeof *counts);
    memset(counts + counts_cap, 0, (cap - counts_cap) * sizeof *counts);
    counts_cap = cap;
}

static conn *publisher(void)
{
    return cfg.mode == MODE_IDLE || cfg.mode == MODE_STORM ? NULL : &conns[nconns - 1];
}

static void publish_one(int64_t t)
{
    conn *p = publisher();
    static uint8_t payload[65536];
    int64_t seq = next_seq++;
    snprintf((char *)payload, sizeof payload, "B%010" PRId64 " %020" PRId64 " ", seq, t);
    for (int i = HDR_LEN; i < cfg.size; i++)
        payload[i] = 'a' + (i % 26);
    ensure_counts(seq);
    in_flight++;
    send_frame(p, 0x1, payload, cfg.size);
}

static int parse_digits(const uint8_t *p, int n, int64_t *out)
{
    int64_t v = 0;
    for (int i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9')
            return 0;
        v = v * 10 + (p[i] - '0');
    }
    *out = v;
    return 1;
}

static void on_complete(int64_t now)
{
    completed++;
    in_flight--;
    if (measuring && now >= t_measure_start && !t_measure_end)
        win_completed++;
}

static void on_message(conn *c, const uint8_t *p, size_t len, int64_t now)
{
    int64_t seq, ts;
    if (!c->t_greet) {
        c->t_greet = now;
        greeted++;
    }
    if (len == 0 || p[0] != 'B' || len < HDR_LEN) {
        announcements++;
        announcement_bytes += len;
        return;
    }
    if (len != (size_t)cfg.size || !parse_digits(p + 1, 10, &seq) || p[11] != ' ' ||
        !parse_digits(p + 12, 20, &ts) || p[32] != ' ' || seq >= next_seq) {
        corrupt++;
        return;
    }
    for (size_t i = HDR_LEN; i < len; i++)
        if (p[i] != 'a' + (i % 26)) {
            corrupt++;
            return;
        }
    bench_bytes += len;
    if (seq == c->last_seq + 1) {
        c->last_seq = seq;
    } else if (seq > c->last_seq) {
        order_errors++;
        c->last_seq = seq;
    } else {
        duplicates++;
        return;
    }
    c->received++;
    if (c->role != ROLE_SUB || c->kind != KIND_HONEST)
        return;
    if (seq >= measure_from_seq && measuring)
        h_record(now - ts);
    if (measuring && now >= t_measure_start && !t_measure_end)
        win_deliveries++;
    if (++counts[seq] == (uint32_t)honest)
        on_complete(now);
}

static void on_frame(conn *c, int fin, int op, const uint8_t *p, size_t len, int64_t now)
{
    switch (op) {
    case 0x0: /* continuation */
        if (c->msg_op < 0) {
            protocol_errors++;
            return;
        }
        if (c->msg_len + len > c->msg_cap) {
            c->msg_cap = (c->msg_len + len) * 2;
            c->msg = xrealloc(c->msg, c->msg_cap);
        }
        memcpy(c->msg + c->msg_len, p, len);
        c->msg_len += len;
        if (fin) {
            on_message(c, c->msg, c->msg_len, now);
            c->msg_len = 0, c->msg_op = -1;
        }
        return;
    case 0x1:
    case 0x2:
        if (fin) {
            on_message(c, p, len, now);
            return;
        }
        c->msg_op = op;
        c->msg_len = 0;
        if (len > c->msg_cap) {
            c->msg_cap = len * 2;
            c->msg = xrealloc(c->msg, c->msg_cap);
        }
        memcpy(c->msg, p, len);
        c->msg_len = len;
        return;
    case 0x8: /* close: answer with the same code, then wait for the server to hang up */
        if (c->state == ST_OPEN) {
            if (c->kind == KIND_HONEST) {
                server_closes++;
            } else {
                odd_closes++;
                c->close_code = len >= 2 ? p[0] << 8 | p[1] : 1005;
                note_cut(c, CUT_CLOSE);
            }
            send_frame(c, 0x8, p, len >= 2 ? 2 : 0);
            c->state = ST_CLOSING;
        }
        return;
    case 0x9:
        pings++;
        send_frame(c, 0xA, p, len);
        return;
    case 0xA:
        return;
    default:
        protocol_errors++;
    }
}

/* Parse as many whole frames as buf holds; return the bytes consumed. */
static size_t parse_frames(conn *c, const uint8_t *buf, size_t len, int64_t now)
{
    size_t off = 0;
    while (len - off >= 2 && c->state != ST_CLOSED) {
        const uint8_t *f = buf + off;
        int fin = f[0] & 0x80, op = f[0] & 0x0f;
        if ((f[0] & 0x70) || (f[1] & 0x80)) { /* reserved bits, or a masked server frame */
            protocol_errors++;
            conn_close(c);
            return len;
        }
        uint64_t plen = f[1] & 0x7f;
        size_t h = 2;
        if (plen == 126) {
            if (len - off < 4)
                break;
            plen = (uint64_t)f[2] << 8 | f[3];
            h = 4;
        } else if (plen == 127) {
            if (len - off < 10)
                break;
            plen = 0;
            for (int i = 0; i < 8; i++)
                plen = plen << 8 | f[2 + i];
            h = 10;
        }
        if (plen > (1u << 26)) {
            protocol_errors++;
            conn_close(c);
            return len;
        }
        if (len - off < h + plen)
            break;
        on_frame(c, fin, op, f + h, (size_t)plen, now);
        off += h + plen;
    }
    return off;
}

/* The server hung up (EOF, or an error such as a reset). */
static void on_hangup(conn *c, int eof)
{
    if (c->kind != KIND_HONEST) {
        if (c->state == ST_OPEN || !eof)
            odd_resets++;
        note_cut(c, eof ? CUT_EOF : CUT_RESET);
    } else if (c->state == ST_OPEN || !eof) {
        resets++;
    }
    conn_close(c);
}

static void on_readable(conn *c)
{
    for (int rounds = 0; rounds < 4 && c->state != ST_CLOSED && !c->paused; rounds++) {
        /* Whatever was left over goes in front of the new bytes. */
        size_t have = c->left_len;
        if (have + 65536 > scratch_cap) {
            while (have + 65536 > scratch_cap)
                scratch_cap *= 2;
            scratch = xrealloc(scratch, scratch_cap);
        }
        if (have)
            memcpy(scratch, c->left, have);
        size_t want = scratch_cap - have;
        int limited = pacing && c->kind == KIND_SLOW && c->state == ST_OPEN;
        if (limited && want > (size_t)c->budget)
            want = (size_t)c->budget;
        ssize_t n = recv(c->fd, scratch + have, want, 0);
        if (n == 0) {
            on_hangup(c, 1);
            return;
        }
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR)
                return;
            on_hangup(c, 0);
            return;
        }
        if (limited) {
            /* Its bandwidth is spent: it waits for pace_slow() to top it up. */
            c->budget -= n;
            if (c->budget < 1)
                set_paused(c, 1);
        }
        int64_t now = now_ns();
        last_data_ns = now;
        size_t len = have + n, off = 0;
        if (c->state == ST_HANDSHAKE) {
            off = check_handshake(c, scratch, len);
            if (off) {
                c->state = ST_OPEN;
                c->t_open = now;
                pending--;
                opened++;
                if (pacing && c->kind != KIND_HONEST)
                    /* Slow from the start: had it read the join
                     * announcements at full speed, the server's kernel
                     * would have grown its send buffer (with the
                     * congestion window) to hundreds of KB. */
                    set_paused(c, 1);
            }
        }
        if (c->state == ST_OPEN || c->state == ST_CLOSING)
            off += parse_frames(c, scratch + off, len - off, now);
        if (c->state == ST_CLOSED)
            return;
        size_t rest = len - off;
        if (rest > c->left_cap) {
            c->left_cap = rest < 256 ? 256 : rest * 2;
            c->left = xrealloc(c->left, c->left_cap);
        }
        if (rest)
            memmove(c->left, scratch + off, rest);
        c->left_len = rest;
        if ((size_t)n < want || limited)
            return; /* drained the socket, or read what it may for now */
    }
}

static void on_event(conn *c, uint32_t ev)
{
    if (c->state == ST_CONNECTING) {
        if (ev & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t l = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &l);
            if (err)
                die("connect to %s:%d: %s", cfg.host,
                    (c->role == ROLE_PUB && cfg.publisher_port) ? cfg.publisher_port : cfg.port,
                    strerror(err));
            set_events(c, 0);
            send_handshake(c);
        }
        return;
    }
    if (c->paused && (ev & (EPOLLHUP | EPOLLERR))) {
        /* The server reset a subscriber that is not reading: note when.  A
         * stalled one is no longer watched (the hang-up would be reported
         * again and again) until resume() reads what it was sent and how it
         * ended; a slow one reads it now, its bandwidth no longer matters. */
        if (!c->t_cut)
            c->t_cut = now_ns();
        if (c->kind == KIND_STALLED) {
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            c->detached = 1;
            return;
        }
        resume(c);
    }
    if (ev & EPOLLOUT)
        conn_flush(c);
    if (c->state != ST_CLOSED && (ev & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR)))
        on_readable(c);
}

/* A paused subscriber reads again (without a bandwidth limit). */
static void resume(conn *c)
{
    if (c->state == ST_CLOSED)
        return;
    c->paused = 0;
    if (c->detached) {
        struct epoll_event ev = {.events = EPOLLIN | EPOLLRDHUP | (c->want_out ? EPOLLOUT : 0),
                                 .data.ptr = c};
        c->detached = 0;
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev) < 0)
            die("epoll_ctl add: %s", strerror(errno));
    } else {
        set_events(c, c->want_out);
    }
}

/* Slow subscribers' bandwidth: top up each one's budget for the time gone
 * by (at most a tenth of a second's worth, so an idle spell is not saved up
 * for a burst) and let those with a useful amount read again. */
static void pace_slow(int64_t now)
{
    if (!pacing || !cfg.slow || now - pace_ns < 5000000)
        return;
    double dt = (now - pace_ns) / 1e9, cap = cfg.slow_bytes_per_s / 10;
    if (cap < 1024)
        cap = 1024;
    pace_ns = now;
    for (int i = 0; i < cfg.subscribers; i++) {
        conn *c = &conns[i];
        if (c->kind != KIND_SLOW || c->state == ST_CLOSED)
            continue;
        c->budget += cfg.slow_bytes_per_s * dt;
        if (c->budget > cap)
            c->budget = cap;
        if (c->paused && c->budget >= 512)
            set_paused(c, 0);
    }
}

/* Open more subscribers, keeping at most --concurrency handshakes under way. */
static void open_more(void)
{
    while (started < target_open && pending < cfg.concurrency)
        start_connect(&conns[started++]);
}

static int stdin_eof;
static int stdin_watched; /* 0 when stdin is a file or /dev/null */
static char stdin_line[256];
static size_t stdin_len;
static int stdin_lines; /* complete lines received */

static void on_stdin(void)
{
    char buf[256];
    ssize_t n = read(0, buf, sizeof buf);
    if (n <= 0) {
        if (n == 0 || (errno != EAGAIN && errno != EINTR)) {
            stdin_eof = 1;
            epoll_ctl(epfd, EPOLL_CTL_DEL, 0, NULL);
        }
        return;
    }
    for (ssize_t i = 0; i < n; i++) {
        if (buf[i] == '\n') {
            stdin_lines++;
            stdin_len = 0;
        } else if (stdin_len < sizeof stdin_line - 1) {
            stdin_line[stdin_len++] = buf[i];
        }
    }
}

/* One epoll round; wait at most timeout_ms. */
static void poll_once(int timeout_ms)
{
    static struct epoll_event evs[1024];
    int n = epoll_wait(epfd, evs, 1024, timeout_ms);
    if (n < 0) {
        if (errno == EINTR)
            return;
        die("epoll_wait: %s", strerror(errno));
    }
    for (int i = 0; i < n; i++) {
        if (evs[i].data.ptr == NULL)
            on_stdin();
        else
            on_event(evs[i].data.ptr, evs[i].events);
    }
    pace_slow(now_ns());
}

static void check_stdin_alive(void)
{
    if (stdin_eof)
        die("stdin closed before the run ended (the harness went away?)");
}

/* Open subscribers up to target, then wait until nothing has arrived for
 * settle_ms.  Returns seconds spent connecting. */
static double connect_and_settle(int target, double *settle_s)
{
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(cfg.connect_timeout * 1e9);
    target_open = target;
    open_more();
    while (opened < target) {
        if (now_ns() > deadline)
            die("only %d of %d connections open after %.0f s", opened, target,
                cfg.connect_timeout);
        poll_once(50);
        open_more();
        check_stdin_alive();
    }
    int64_t t1 = now_ns();
    int64_t settle_deadline = t1 + (int64_t)(cfg.settle_max * 1e9);
    last_data_ns = t1;
    while (now_ns() - last_data_ns < (int64_t)cfg.settle_ms * 1000000) {
        if (now_ns() > settle_deadline)
            break;
        poll_once(cfg.settle_ms / 4 + 1);
        check_stdin_alive();
    }
    *settle_s = (now_ns() - t1) / 1e9;
    return (t1 - t0) / 1e9;
}

static int count_open(void)
{
    int n = 0;
    for (int i = 0; i < nconns; i++)
        n += conns[i].state == ST_OPEN;
    return n;
}

/* After the last report: keep serving until stdin ends (or linger_max). */
static void linger(void)
{
    fflush(stdout);
    int64_t deadline = now_ns() + (int64_t)(cfg.linger_max * 1e9);
    while (stdin_watched && !stdin_eof && now_ns() < deadline)
        poll_once(100);
    /* Close with RST: no TIME_WAIT left behind for the next run. */
    struct linger lg = {1, 0};
    for (int i = 0; i < nconns; i++)
        if (conns[i].state != ST_CLOSED && conns[i].state != ST_IDLE) {
            setsockopt(conns[i].fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg);
            close(conns[i].fd);
        }
}

static void run_idle(void)
{
    for (int s = 0; s < cfg.nstages; s++) {
        double cpu0 = self_cpu_s(), srv0 = proc_cpu_s(cfg.server_pid), settle;
        uint64_t ann0 = announcements;
        double secs = connect_and_settle(cfg.stages[s], &settle);
        double srv1 = proc_cpu_s(cfg.server_pid);
        printf("{\"mode\":\"idle\",\"stage\":%d,\"connections\":%d,\"open\":%d,"
               "\"connect_seconds\":%.3f,\"settle_seconds\":%.3f,\"announcements\":%" PRIu64
               ",\"server_cpu_s\":%.3f,\"loadgen_cpu_s\":%.3f,\"server_closes\":%" PRIu64
               ",\"resets\":%" PRIu64 ",\"protocol_errors\":%" PRIu64 ",\"pings\":%" PRIu64 "}\n",
               s, cfg.stages[s], count_open(), secs, settle, announcements - ann0,
               (srv0 >= 0 && srv1 >= 0) ? srv1 - srv0 : -1.0, self_cpu_s() - cpu0, server_closes,
               resets, protocol_errors, pings);
        fflush(stdout);
        if (s + 1 < cfg.nstages && stdin_watched) {
            /* Stage s+1 starts once s+1 lines have been read, in all. */
            while (stdin_lines < s + 1) {
                poll_once(100);
                check_stdin_alive();
            }
        }
    }
    linger();
}

/* Storm: open every connection as fast as the server takes them, with up
 * to --concurrency connects and handshakes under way.  A connection is done
 * at its 101 or, with --greeting 1, at its first message (the server's
 * greeting); then the generator waits until nothing has arrived for
 * --settle-ms and reports. */
static void run_storm(void)
{
    int n = cfg.subscribers;
    double cpu0 = self_cpu_s(), srv0 = proc_cpu_s(cfg.server_pid);
    int64_t t0 = now_ns(), deadline = t0 + (int64_t)(cfg.connect_timeout * 1e9);
    int64_t t_open = 0, t_done = 0;
    target_open = n;
    open_more();
    while (1) {
        int64_t now = now_ns();
        if (!t_open && opened >= n)
            t_open = now;
        if (t_open && (!cfg.greeting || greeted >= n)) {
            t_done = now;
            break;
        }
        if (now > deadline)
            break;
        poll_once(50);
        open_more();
        check_stdin_alive();
    }
    int64_t t1 = now_ns(), settle_deadline = t1 + (int64_t)(cfg.settle_max * 1e9);
    last_data_ns = t1;
    while (now_ns() - last_data_ns < (int64_t)cfg.settle_ms * 1000000 && now_ns() < settle_deadline) {
        poll_once(cfg.settle_ms / 4 + 1);
        check_stdin_alive();
    }
    /* The last data, not the end of the quiet spell that proved it last. */
    double quiet_s = (last_data_ns - t0) / 1e9;
    double srv1 = proc_cpu_s(cfg.server_pid);
    int64_t last_greet = 0;
    for (int i = 0; i < n; i++) {
        if (conns[i].t_open)
            h_record(conns[i].t_open - conns[i].t_start);
        if (conns[i].t_greet > last_greet)
            last_greet = conns[i].t_greet;
    }
    printf("{\"mode\":\"storm\",\"connections\":%d,\"concurrency\":%d,\"greeting\":%s,"
           "\"opened\":%d,\"greeted\":%d,\"open\":%d,\"complete\":%s,"
           "\"storm_seconds\":%.4f,\"connect_seconds\":%.4f,\"greet_seconds\":%.4f,"
           "\"quiet_seconds\":%.4f,\"announcements\":%" PRIu64 ",\"server_cpu_s\":%.3f,"
           "\"loadgen_cpu_s\":%.3f,"
           "\"handshake_ms\":{\"count\":%" PRIu64 ",\"p50\":%.3f,\"p90\":%.3f,\"p99\":%.3f,"
           "\"max\":%.3f},"
           "\"server_closes\":%" PRIu64 ",\"resets\":%" PRIu64 ",\"protocol_errors\":%" PRIu64
           ",\"pings\":%" PRIu64 "}\n",
           n, cfg.concurrency, cfg.greeting ? "true" : "false", opened, greeted, count_open(),
           t_done ? "true" : "false", t_done ? (t_done - t0) / 1e9 : -1.0,
           t_open ? (t_open - t0) / 1e9 : -1.0, last_greet ? (last_greet - t0) / 1e9 : -1.0,
           quiet_s, announcements, (srv0 >= 0 && srv1 >= 0) ? srv1 - srv0 : -1.0,
           self_cpu_s() - cpu0, hist_count, h_quantile(0.5) / 1e6, h_quantile(0.9) / 1e6,
           h_quantile(0.99) / 1e6, hist_max / 1e6, server_closes, resets, protocol_errors, pings);
    linger();
}

/* After the run: let the slow and stalled subscribers read what they were
 * sent, to learn whether the server cut them (a close frame, EOF or reset)
 * or kept them open, and so that they answer the server's close frames when
 * it stops; at most 5 s, or 1 s without anything new. */
static void wait_odd(void)
{
    int64_t start = now_ns(), last = start;
    uint64_t seen = 0;
    for (int i = 0; i < cfg.subscribers; i++)
        if (conns[i].kind != KIND_HONEST)
            resume(&conns[i]);
    while (now_ns() - start < 5000000000LL) {
        int open = 0;
        uint64_t got = 0;
        for (int i = 0; i < cfg.subscribers; i++)
            if (conns[i].kind == KIND_STALLED) {
                open += conns[i].state != ST_CLOSED && conns[i].state != ST_CLOSING;
                got += conns[i].received;
            }
        if (!open)
            break;
        if (got != seen)
            seen = got, last = now_ns();
        else if (now_ns() - last > 1000000000LL)
            break;
        poll_once(20);
        check_stdin_alive();
    }
}

static const char *cut_name(int how)
{
    return how == CUT_CLOSE ? "close" : how == CUT_EOF ? "eof" : how == CUT_RESET ? "reset" : "open";
}

static void run_messages(void)
{
    double settle;
    /* From its 101 on, a slow subscriber reads at its bandwidth and a
     * stalled one not at all. */
    pacing = cfg.slow || cfg.stalled;
    pace_ns = now_ns();
    /* Subscribers first, then the publisher, so every message finds them all. */
    double connect_s = connect_and_settle(cfg.subscribers, &settle);
    double settle_total = settle;
    connect_s += connect_and_settle(cfg.subscribers + 1, &settle);
    settle_total += settle;
    uint64_t ann_setup = announcements;

    conn *pub = publisher();
    int64_t t0 = now_ns();
    int64_t warm_end = cfg.messages ? t0 : t0 + (int64_t)(cfg.warmup * 1e9);
    int64_t run_end = warm_end + (int64_t)(cfg.duration * 1e9);
    double srv_cpu0 = -1, self_cpu0 = 0, srv_cpu1 = -1, self_cpu1 = 0, srv_sys0 = 0, srv_sys1 = 0;
    core_times core0 = {0}, core1 = {0};
    int core_ok0 = -1, core_ok1 = -1;
    double period_ns = cfg.mode == MODE_RATE ? 1e9 / cfg.rate : 0;
    int64_t next_send = t0;
    measuring = 1; /* counts deliveries from t_measure_start */
    t_measure_start = INT64_MAX;
    sending = 1;
    if (cfg.messages) {
        t_measure_start = t0;
        measure_from_seq = 0;
        srv_cpu0 = proc_cpu2_s(cfg.server_pid, &srv_sys0);
        core_ok0 = read_core(cfg.server_core, &core0);
        self_cpu0 = self_cpu_s();
    }
    int64_t last_progress = t0, last_completed = -1, drain_start = 0;
    uint64_t last_received = 0;
    while (1) {
        int64_t now = now_ns();
        if (t_measure_start == INT64_MAX && now >= warm_end) {
            t_measure_start = now;
            measure_from_seq = next_seq;
            srv_cpu0 = proc_cpu2_s(cfg.server_pid, &srv_sys0);
            core_ok0 = read_core(cfg.server_core, &core0);
            self_cpu0 = self_cpu_s();
        }
        if (sending && (now >= run_end || (cfg.messages && next_seq >= cfg.messages))) {
            sending = 0;
            if (!cfg.messages) {
                /* The measured window ends here: a fixed duration. */
                t_measure_end = now;
                srv_cpu1 = proc_cpu2_s(cfg.server_pid, &srv_sys1);
                core_ok1 = read_core(cfg.server_core, &core1);
                self_cpu1 = self_cpu_s();
            }
            last_progress = drain_start = now;
        }
        if (pub->state != ST_OPEN)
            break;
        int timeout = cfg.slow ? 10 : 50;
        if (sending) {
            if (cfg.mode == MODE_THROUGHPUT) {
                while (in_flight < cfg.window && sending &&
                       !(cfg.messages && next_seq >= cfg.messages))
                    publish_one(now_ns());
            } else {
                while (now >= next_send && !(cfg.messages && next_seq >= cfg.messages)) {
                    publish_one(now_ns());
                    next_send += (int64_t)period_ns;
                }
                int64_t wait = next_send - now_ns();
                int until_next = wait <= 0 ? 0 : (int)(wait / 1000000);
                if (until_next < timeout)
                    timeout = until_next;
            }
        } else {
            /* Draining: done once everything sent has reached everyone. */
            uint64_t received = 0;
            if (completed == next_seq && pub->received >= (uint64_t)next_seq)
                break;
            for (int i = 0; i < nconns; i++)
                received += conns[i].received;
            if (received != last_received || completed != last_completed) {
                last_received = received, last_completed = completed;
                last_progress = now;
            } else if (now - last_progress > (int64_t)(cfg.drain_timeout * 1e9)) {
                break;
            }
            if (now - drain_start > (int64_t)(cfg.drain_max * 1e9))
                break;
        }
        poll_once(timeout);
        check_stdin_alive();
    }
    int64_t t_done = now_ns();
    if (cfg.messages) {
        /* A fixed message count: the window runs until the last completion. */
        t_measure_end = t_done;
        srv_cpu1 = proc_cpu2_s(cfg.server_pid, &srv_sys1);
        core_ok1 = read_core(cfg.server_core, &core1);
        self_cpu1 = self_cpu_s();
    }
    measuring = 0;
    if (srv_cpu1 < 0 && srv_cpu0 >= 0) {
        srv_cpu1 = proc_cpu2_s(cfg.server_pid, &srv_sys1);
        core_ok1 = read_core(cfg.server_core, &core1);
        self_cpu1 = self_cpu_s();
        t_measure_end = t_done;
    }

    uint64_t deliveries = 0, short_subs = 0;
    for (int i = 0; i < cfg.subscribers; i++) {
        if (conns[i].kind != KIND_HONEST)
            continue;
        deliveries += conns[i].received;
        short_subs += conns[i].received != (uint64_t)next_seq;
    }
    uint64_t expected = (uint64_t)next_seq * honest;
    /* The slow and stalled subscribers: how far each got, and whether and
     * when (seconds after the first message) the server cut it. */
    int64_t slow_min = -1, slow_max = -1, stalled_received = -1;
    int slow_cut = 0, stalled_cut = 0, stalled_how = CUT_NONE, stalled_code = -1;
    double stalled_cut_s = -1;
    pacing = 0;
    for (int i = 0; i < cfg.subscribers; i++) {
        conn *c = &conns[i];
        if (c->kind != KIND_SLOW)
            continue;
        /* What it had read at its bandwidth by the end of the run. */
        if (slow_min < 0 || (int64_t)c->received < slow_min)
            slow_min = c->received;
        if ((int64_t)c->received > slow_max)
            slow_max = c->received;
    }
    if (cfg.slow || cfg.stalled)
        wait_odd();
    for (int i = 0; i < cfg.subscribers; i++) {
        conn *c = &conns[i];
        int cut = c->cut_how != CUT_NONE;
        if (c->kind == KIND_SLOW) {
            slow_cut += cut;
        } else if (c->kind == KIND_STALLED) {
            stalled_cut += cut;
            if (stalled_received < 0) { /* the first one speaks for all */
                stalled_received = c->received;
                stalled_how = c->cut_how;
                stalled_code = c->close_code;
                stalled_cut_s = c->t_cut ? (c->t_cut - t0) / 1e9 : -1.0;
            }
        }
    }
    double win_s = (t_measure_end - t_measure_start) / 1e9;
    if (win_s <= 0)
        win_s = 1e-9;
    double srv_cpu = (srv_cpu0 >= 0 && srv_cpu1 >= 0) ? srv_cpu1 - srv_cpu0 : -1;
    double self_cpu = self_cpu1 - self_cpu0;
    int core_ok = core_ok0 == 0 && core_ok1 == 0 && core1.total > core0.total;
    int complete = deliveries == expected && pub->received == (uint64_t)next_seq &&
                   !order_errors && !duplicates && !corrupt && !protocol_errors;
    printf("{\"mode\":\"%s\",\"subscribers\":%d,\"window\":%d,\"rate\":%g,\"size\":%d,"
           "\"connect_seconds\":%.3f,\"settle_seconds\":%.3f,\"setup_announcements\":%" PRIu64 ","
           "\"sent\":%" PRId64 ",\"completed\":%" PRId64 ","
           "\"measured\":{\"seconds\":%.4f,\"messages\":%" PRIu64 ",\"deliveries\":%" PRIu64
           ",\"deliveries_per_s\":%.1f,\"messages_per_s\":%.1f,\"server_cpu_s\":%.3f,"
           "\"server_cpu_us_per_delivery\":%.4f,\"server_sys_s\":%.3f,"
           "\"loadgen_cpu_s\":%.3f,\"loadgen_cpu_pct\":%.1f,"
           "\"server_core_busy_pct\":%.1f,\"server_core_softirq_pct\":%.1f,"
           "\"server_core_steal_pct\":%.1f,\"server_core_us_per_delivery\":%.4f},"
           "\"latency_us\":{\"count\":%" PRIu64 ",\"p50\":%.1f,\"p90\":%.1f,\"p99\":%.1f,"
           "\"p999\":%.1f,\"max\":%.1f,\"mean\":%.1f},"
           "\"check\":{\"expected_deliveries\":%" PRIu64 ",\"deliveries\":%" PRIu64
           ",\"lost\":%" PRIu64 ",\"subscribers_short\":%" PRIu64 ",\"order_errors\":%" PRIu64
           ",\"duplicates\":%" PRIu64 ",\"corrupt\":%" PRIu64 ",\"protocol_errors\":%" PRIu64
           ",\"publisher_echoes\":%" PRIu64 ",\"announcements\":%" PRIu64
           ",\"server_closes\":%" PRIu64 ",\"resets\":%" PRIu64 ",\"open_at_end\":%d,"
           "\"complete\":%s},"
           "\"honest\":%d,\"slow\":{\"count\":%d,\"bytes_per_s\":%.0f,\"rcvbuf\":%d,"
           "\"received_min\":%" PRId64 ",\"received_max\":%" PRId64 ",\"cut\":%d},"
           "\"stalled\":{\"count\":%d,\"cut\":%d,\"how\":\"%s\",\"close_code\":%d,"
           "\"cut_after_s\":%.3f,\"received\":%" PRId64 "},"
           "\"odd_closes\":%" PRIu64 ",\"odd_resets\":%" PRIu64 ","
           "\"loadgen_total_cpu_s\":%.3f}\n",
           cfg.mode == MODE_RATE ? "rate" : "throughput", cfg.subscribers,
           cfg.mode == MODE_THROUGHPUT ? cfg.window : 0, cfg.mode == MODE_RATE ? cfg.rate : 0.0,
           cfg.size, connect_s, settle_total, ann_setup, next_seq, completed, win_s,
           win_completed, win_deliveries, win_deliveries / win_s, win_completed / win_s, srv_cpu,
           (srv_cpu >= 0 && win_deliveries) ? srv_cpu * 1e6 / win_deliveries : -1.0,
           srv_cpu >= 0 ? srv_sys1 - srv_sys0 : -1.0, self_cpu, 100.0 * self_cpu / win_s,
           core_ok ? 100.0 * (core1.busy - core0.busy) / (core1.total - core0.total) : -1.0,
           core_ok ? 100.0 * (core1.softirq - core0.softirq) / (core1.total - core0.total) : -1.0,
           core_ok ? 100.0 * (core1.steal - core0.steal) / (core1.total - core0.total) : -1.0,
           (core_ok && win_deliveries) ? (core1.busy - core0.busy) * 1e6 / win_deliveries : -1.0,
           hist_count, h_quantile(0.5) / 1e3, h_quantile(0.9) / 1e3, h_quantile(0.99) / 1e3, h_quantile(0.999) / 1e3, hist_max / 1e3,
           hist_count ? hist_sum / hist_count / 1e3 : 0.0, expected, deliveries,
           expected > deliveries ? expected - deliveries : 0, short_subs, order_errors,
           duplicates, corrupt, protocol_errors, pub->received, announcements, server_closes,
           resets, count_open(), complete ? "true" : "false", honest, cfg.slow,
           cfg.slow_bytes_per_s, cfg.slow_rcvbuf, slow_min, slow_max, slow_cut, cfg.stalled,
           stalled_cut, cut_name(stalled_how), stalled_code, stalled_cut_s, stalled_received,
           odd_closes, odd_resets, self_cpu_s());
    fflush(stdout);
    linger();
}

static void usage(void)
{
    fprintf(stderr,
            "usage: loadgen --port P [--publisher-port P] [--host 127.0.0.1]\n"
            "  [--mode throughput|rate|idle|storm] [--greeting 0|1]\n"
            "  [--subscribers N] [--window W] [--rate R] [--duration S] [--warmup S]\n"
            "  [--messages M] [--size BYTES] [--server-pid PID] [--server-core CPU]\n"
            "  [--concurrency C]\n"
            "  [--sources K] [--drain-timeout S] [--drain-max S] [--connect-timeout S] [--settle-ms MS]\n"
            "  [--settle-max S] [--stages N1,N2,...] [--linger-max S] [--name-length N]\n"
            "  [--slow K] [--slow-bytes-per-s B] [--stalled M] [--slow-rcvbuf BYTES]\n"
            "  [--slow-mss BYTES]\n");
    exit(2);
}

int main(int argc, char **argv)
{
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (i + 1 >= argc)
            usage();
        const char *v = argv[++i];
        if (!strcmp(a, "--host"))
            cfg.host = v;
        else if (!strcmp(a, "--port"))
            cfg.port = atoi(v);
        else if (!strcmp(a, "--publisher-port"))
            cfg.publisher_port = atoi(v);
        else if (!strcmp(a, "--mode"))
            cfg.mode = !strcmp(v, "rate") ? MODE_RATE
                       : !strcmp(v, "idle") ? MODE_IDLE
                       : !strcmp(v, "storm") ? MODE_STORM
                       : !strcmp(v, "throughput") ? MODE_THROUGHPUT
                                                  : (usage(), 0);
        else if (!strcmp(a, "--subscribers"))
            cfg.subscribers = atoi(v);
        else if (!strcmp(a, "--window"))
            cfg.window = atoi(v);
        else if (!strcmp(a, "--rate"))
            cfg.rate = atof(v);
        else if (!strcmp(a, "--duration"))
            cfg.duration = atof(v);
        else if (!strcmp(a, "--warmup"))
            cfg.warmup = atof(v);
        else if (!strcmp(a, "--messages"))
            cfg.messages = atol(v);
        else if (!strcmp(a, "--size"))
            cfg.size = atoi(v);
        else if (!strcmp(a, "--server-pid"))
            cfg.server_pid = atoi(v);
        else if (!strcmp(a, "--server-core"))
            cfg.server_core = atoi(v);
        else if (!strcmp(a, "--concurrency"))
            cfg.concurrency = atoi(v);
        else if (!strcmp(a, "--sources"))
            cfg.sources = atoi(v);
        else if (!strcmp(a, "--drain-timeout"))
            cfg.drain_timeout = atof(v);
        else if (!strcmp(a, "--drain-max"))
            cfg.drain_max = atof(v);
        else if (!strcmp(a, "--connect-timeout"))
            cfg.connect_timeout = atof(v);
        else if (!strcmp(a, "--settle-ms"))
            cfg.settle_ms = atoi(v);
        else if (!strcmp(a, "--settle-max"))
            cfg.settle_max = atof(v);
        else if (!strcmp(a, "--linger-max"))
            cfg.linger_max = atof(v);
        else if (!strcmp(a, "--name-length"))
            cfg.name_length = atoi(v);
        else if (!strcmp(a, "--greeting"))
            cfg.greeting = atoi(v);
        else if (!strcmp(a, "--slow"))
            cfg.slow = atoi(v);
        else if (!strcmp(a, "--slow-bytes-per-s"))
            cfg.slow_bytes_per_s = atof(v);
        else if (!strcmp(a, "--stalled"))
            cfg.stalled = atoi(v);
        else if (!strcmp(a, "--slow-rcvbuf"))
            cfg.slow_rcvbuf = atoi(v);
        else if (!strcmp(a, "--slow-mss"))
            cfg.slow_mss = atoi(v);
        else if (!strcmp(a, "--stages")) {
            char *s = strdup(v), *tok, *save;
            for (tok = strtok_r(s, ",", &save); tok && cfg.nstages < 16;
                 tok = strtok_r(NULL, ",", &save))
                cfg.stages[cfg.nstages++] = atoi(tok);
            free(s);
        } else
            usage();
    }
    if (cfg.port <= 0 || cfg.port > 65535 || cfg.publisher_port < 0 ||
        cfg.publisher_port > 65535 || cfg.size < HDR_LEN || cfg.size > 65536 ||
        cfg.subscribers < 1 || cfg.window < 1 || cfg.rate <= 0 || cfg.concurrency < 1 ||
        cfg.sources < 1 || cfg.sources > 250 || (cfg.mode == MODE_IDLE && !cfg.nstages) ||
        cfg.slow < 0 || cfg.stalled < 0 || cfg.slow + cfg.stalled >= cfg.subscribers ||
        (cfg.slow && cfg.slow_bytes_per_s <= 0) || cfg.slow_rcvbuf < 0 || cfg.slow_mss < 0 ||
        ((cfg.slow || cfg.stalled) && cfg.mode == MODE_IDLE))
        usage();
    for (int s = 1; s < cfg.nstages; s++)
        if (cfg.stages[s] < cfg.stages[s - 1])
            usage();

    signal(SIGPIPE, SIG_IGN);
    rng_seed();
    /* Every connection is a file descriptor. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && rl.rlim_cur < rl.rlim_max) {
        rl.rlim_cur = rl.rlim_max;
        setrlimit(RLIMIT_NOFILE, &rl);
    }
    nconns = cfg.mode == MODE_IDLE    ? cfg.stages[cfg.nstages - 1]
             : cfg.mode == MODE_STORM ? cfg.subscribers
                                      : cfg.subscribers + 1;
    if (getrlimit(RLIMIT_NOFILE, &rl) == 0 && (rlim_t)nconns + 16 > rl.rlim_cur)
        die("%d connections need more open files than the limit (%lu); lower the count or "
            "raise the hard limit (ulimit -Hn)",
            nconns, (unsigned long)rl.rlim_cur);
    conns = calloc(nconns, sizeof *conns);
    if (!conns)
        die("out of memory");
    for (int i = 0; i < nconns; i++) {
        conns[i].fd = -1;
        conns[i].id = i;
        conns[i].msg_op = -1;
        conns[i].role = (publisher() == &conns[i]) ? ROLE_PUB : ROLE_SUB;
        conns[i].close_code = -1;
    }
    /* Slow and stalled subscribers spread evenly among the honest ones. */
    int odd = cfg.slow + cfg.stalled;
    for (int k = 0; k < odd; k++) {
        int i = (int)((int64_t)k * cfg.subscribers / odd) + cfg.subscribers / (2 * odd);
        conns[i].kind = k < cfg.stalled ? KIND_STALLED : KIND_SLOW;
    }
    honest = cfg.subscribers - odd;
    scratch = xrealloc(NULL, scratch_cap);
    epfd = epoll_create1(EPOLL_CLOEXEC);
    if (epfd < 0)
        die("epoll_create1: %s", strerror(errno));
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event ev = {.events = EPOLLIN, .data.ptr = NULL};
    /* epoll refuses regular files and /dev/null: then stdin is not watched. */
    stdin_watched = epoll_ctl(epfd, EPOLL_CTL_ADD, 0, &ev) == 0;
    if (cfg.mode == MODE_IDLE)
        run_idle();
    else if (cfg.mode == MODE_STORM)
        run_storm();
    else
        run_messages();
    return 0;
}
