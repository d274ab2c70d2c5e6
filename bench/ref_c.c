/*
 * The physical-limit reference of the fan-out benchmark: the least any
 * broadcast server on this machine has to do, written to do nothing else.
 *
 * One thread, epoll.  Plain semantics, as broadcaster's plain mode and the
 * other references: every message a client sends (text or binary) goes to
 * every connected client, the sender included.  The messages read in one
 * turn of the loop are framed once, into one buffer, and each client gets
 * that buffer with one send(); what a socket does not take waits in the
 * client's own buffer until EPOLLOUT.  No announcements, history, limits,
 * pings or compression; no fragmented messages (a client that sends one
 * is dropped).
 *
 * Usage: ref_c PORT (listens on 127.0.0.1; SIGTERM or SIGINT stops it).
 * Built at run time like the load generator (bench/loadgen.py).
 */

#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <unistd.h>

#include "wsutil.h"

#define MAX_EVENTS 1024
#define READ_CHUNK 65536
#define MAX_HANDSHAKE 8192

typedef struct {
    char *data;
    size_t len, cap;
} buffer;

typedef struct client {
    int fd;
    int open;             /* handshake done */
    int writing;          /* EPOLLOUT armed */
    buffer in, out;
    struct client *prev, *next; /* the open clients */
} client;

static client *by_fd[1 << 20];
static client *open_head;
static volatile sig_atomic_t stopping;
static int ep;

static void on_signal(int sig)
{
    (void)sig;
    stopping = 1;
}

static void append(buffer *b, const void *data, size_t len)
{
    if (b->len + len > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + len)
            cap *= 2;
        b->data = realloc(b->data, cap);
        if (!b->data) {
            perror("realloc");
            exit(1);
        }
        b->cap = cap;
    }
    memcpy(b->data + b->len, data, len);
    b->len += len;
}

static void consume(buffer *b, size_t n)
{
    memmove(b->data, b->data + n, b->len - n);
    b->len -= n;
}

static void drop(client *c)
{
    if (c->open) {
        if (c->prev)
            c->prev->next = c->next;
        else
            open_head = c->next;
        if (c->next)
            c->next->prev = c->prev;
    }
    by_fd[c->fd] = NULL;
    close(c->fd);
    free(c->in.data);
    free(c->out.data);
    free(c);
}

static void want_out(client *c, int on)
{
    if (c->writing == on)
        return;
    struct epoll_event ev = {.events = EPOLLIN | (on ? EPOLLOUT : 0), .data.fd = c->fd};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
    c->writing = on;
}

/* Send what the client is owed, keeping what the socket does not take. */
static int flush_out(client *c)
{
    while (c->out.len) {
        ssize_t n = send(c->fd, c->out.data, c->out.len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno == EAGAIN || errno == EWOULDBLOCK) {
                want_out(c, 1);
                return 0;
            }
            return -1;
        }
        consume(&c->out, (size_t)n);
    }
    want_out(c, 0);
    return 0;
}

/* Give the client ``data``: straight to the socket if nothing waits. */
static int give(client *c, const char *data, size_t len)
{
    if (c->out.len == 0) {
        ssize_t n = send(c->fd, data, len, MSG_NOSIGNAL);
        if (n < 0) {
            if (errno != EAGAIN && errno != EWOULDBLOCK)
                return -1;
            n = 0;
        }
        if ((size_t)n == len)
            return 0;
        data += n, len -= (size_t)n;
    }
    append(&c->out, data, len);
    want_out(c, 1);
    return 0;
}

static void frame_into(buffer *b, int opcode, const uint8_t *payload, size_t len)
{
    uint8_t header[10];
    size_t h = 0;
    header[h++] = 0x80 | (uint8_t)opcode;
    if (len < 126) {
        header[h++] = (uint8_t)len;
    } else if (len < 65536) {
        header[h++] = 126, header[h++] = (uint8_t)(len >> 8), header[h++] = (uint8_t)len;
    } else {
        header[h++] = 127;
        for (int i = 7; i >= 0; i--)
            header[h++] = (uint8_t)(len >> (8 * i));
    }
    append(b, header, h);
    append(b, payload, len);
}

static int handshake(client *c)
{
    char *end = memmem(c->in.data, c->in.len, "\r\n\r\n", 4);
    if (!end)
        return c->in.len > MAX_HANDSHAKE ? -1 : 0;
    *end = 0;
    char *key = strcasestr(c->in.data, "\nSec-WebSocket-Key:");
    if (!key)
        return -1;
    key += strlen("\nSec-WebSocket-Key:");
    while (*key == ' ')
        key++;
    size_t klen = strcspn(key, "\r\n ");
    char material[128];
    if (klen > 60)
        return -1;
    memcpy(material, key, klen);
    memcpy(material + klen, "258EAFA5-E914-47DA-95CA-C5AB0DC85B11", 36);
    uint8_t digest[20];
    char accept[32];
    sha1((const uint8_t *)material, klen + 36, digest);
    base64(digest, 20, accept);
    char response[256];
    int n = snprintf(response, sizeof response,
                     "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                     "Connection: Upgrade\r\nSec-WebSocket-Accept: %s\r\n\r\n",
                     accept);
    consume(&c->in, (size_t)(end + 4 - c->in.data));
    c->open = 1;
    c->prev = NULL, c->next = open_head;
    if (open_head)
        open_head->prev = c;
    open_head = c;
    return give(c, response, (size_t)n);
}

/* Read the client's frames: data frames go into ``batch``. */
static int parse_frames(client *c, buffer *batch)
{
    for (;;) {
        uint8_t *p = (uint8_t *)c->in.data;
        size_t have = c->in.len, h = 2;
        if (have < 2)
            return 0;
        int fin = p[0] & 0x80, opcode = p[0] & 0x0F;
        size_t len = p[1] & 0x7F;
        if (!(p[1] & 0x80) || !fin)
            return -1; /* unmasked or fragmented: not supported */
        if (len == 126) {
            if (have < 4)
                return 0;
            len = (size_t)p[2] << 8 | p[3], h = 4;
        } else if (len == 127) {
            if (have < 10)
                return 0;
            len = 0;
            for (int i = 2; i < 10; i++)
                len = len << 8 | p[i];
            h = 10;
        }
        if (have < h + 4 + len)
            return 0;
        uint8_t *mask = p + h, *payload = p + h + 4;
        for (size_t i = 0; i < len; i++)
            payload[i] ^= mask[i & 3];
        if (opcode == 1 || opcode == 2) {
            frame_into(batch, opcode, payload, len);
        } else if (opcode == 8) {
            buffer close_frame = {0};
            frame_into(&close_frame, 8, payload, len < 2 ? len : 2);
            give(c, close_frame.data, close_frame.len);
            free(close_frame.data);
            return -1;
        } else if (opcode == 9) {
            buffer pong = {0};
            frame_into(&pong, 10, payload, len);
            int r = give(c, pong.data, pong.len);
            free(pong.data);
            if (r < 0)
                return -1;
        }
        consume(&c->in, h + 4 + len);
    }
}

static int on_readable(client *c, buffer *batch)
{
    char chunk[READ_CHUNK];
    for (;;) {
        ssize_t n = recv(c->fd, chunk, sizeof chunk, 0);
        if (n == 0)
            return -1;
        if (n < 0)
            return (errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
        append(&c->in, chunk, (size_t)n);
        if (!c->open && handshake(c) < 0)
            return -1;
        if (c->open && parse_frames(c, batch) < 0)
            return -1;
    }
}

int main(int argc, char **argv)
{
    if (argc != 2) {
        fprintf(stderr, "usage: %s PORT\n", argv[0]);
        return 2;
    }
    signal(SIGPIPE, SIG_IGN);
    struct sigaction sa = {.sa_handler = on_signal};
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    int listener = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    int one = 1;
    setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
    struct sockaddr_in addr = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[1])),
                               .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
    if (bind(listener, (struct sockaddr *)&addr, sizeof addr) < 0 || listen(listener, 4096) < 0) {
        perror("listen");
        return 1;
    }
    ep = epoll_create1(0);
    struct epoll_event ev = {.events = EPOLLIN, .data.fd = listener};
    epoll_ctl(ep, EPOLL_CTL_ADD, listener, &ev);
    printf("ref_c listening on 127.0.0.1:%s\n", argv[1]);
    fflush(stdout);
    struct epoll_event events[MAX_EVENTS];
    buffer batch = {0};
    while (!stopping) {
        int n = epoll_wait(ep, events, MAX_EVENTS, 1000);
        batch.len = 0;
        for (int i = 0; i < n; i++) {
            int fd = events[i].data.fd;
            if (fd == listener) {
                int cfd;
                while ((cfd = accept4(listener, NULL, NULL, SOCK_NONBLOCK)) >= 0) {
                    if (cfd >= (int)(sizeof by_fd / sizeof by_fd[0])) {
                        close(cfd);
                        continue;
                    }
                    setsockopt(cfd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
                    client *c = calloc(1, sizeof *c);
                    c->fd = cfd;
                    by_fd[cfd] = c;
                    struct epoll_event cev = {.events = EPOLLIN, .data.fd = cfd};
                    epoll_ctl(ep, EPOLL_CTL_ADD, cfd, &cev);
                }
                continue;
            }
            client *c = by_fd[fd];
            if (!c)
                continue;
            if ((events[i].events & EPOLLOUT) && flush_out(c) < 0) {
                drop(c);
                continue;
            }
            if ((events[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) && on_readable(c, &batch) < 0)
                drop(c);
        }
        if (batch.len) {
            /* One send() per client for everything read in this turn. */
            client *next;
            for (client *c = open_head; c; c = next) {
                next = c->next;
                if (give(c, batch.data, batch.len) < 0)
                    drop(c);
            }
        }
    }
    return 0;
}
