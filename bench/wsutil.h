/*
 * What the benchmark's C programs (loadgen.c, ref_c.c) share: SHA-1 and
 * base64, for the WebSocket handshake's Sec-WebSocket-Accept.  Static
 * functions in a header: each program is one compiled file.
 */

#ifndef BROADCASTER_BENCH_WSUTIL_H
#define BROADCASTER_BENCH_WSUTIL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>


typedef struct {
    uint32_t h[5];
    uint64_t len;
    uint8_t buf[64];
    size_t n;
} sha1_ctx;

#define ROL(x, c) (((x) << (c)) | ((x) >> (32 - (c))))

static void sha1_block(sha1_ctx *c, const uint8_t *p)
{
    uint32_t w[80], a, b, d, e, f, k, t, cc;
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = ROL(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    a = c->h[0], b = c->h[1], cc = c->h[2], d = c->h[3], e = c->h[4];
    for (int i = 0; i < 80; i++) {
        if (i < 20)
            f = (b & cc) | (~b & d), k = 0x5A827999;
        else if (i < 40)
            f = b ^ cc ^ d, k = 0x6ED9EBA1;
        else if (i < 60)
            f = (b & cc) | (b & d) | (cc & d), k = 0x8F1BBCDC;
        else
            f = b ^ cc ^ d, k = 0xCA62C1D6;
        t = ROL(a, 5) + f + e + k + w[i];
        e = d, d = cc, cc = ROL(b, 30), b = a, a = t;
    }
    c->h[0] += a, c->h[1] += b, c->h[2] += cc, c->h[3] += d, c->h[4] += e;
}

static void sha1(const uint8_t *data, size_t len, uint8_t out[20])
{
    sha1_ctx c = {{0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0}, 0, {0}, 0};
    c.len = len;
    while (len >= 64) {
        sha1_block(&c, data);
        data += 64, len -= 64;
    }
    uint8_t tail[128] = {0};
    memcpy(tail, data, len);
    tail[len] = 0x80;
    size_t tl = len + 1 + 8 <= 64 ? 64 : 128;
    uint64_t bits = c.len * 8;
    for (int i = 0; i < 8; i++)
        tail[tl - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha1_block(&c, tail);
    if (tl == 128)
        sha1_block(&c, tail + 64);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = c.h[i] >> 24, out[4 * i + 1] = c.h[i] >> 16;
        out[4 * i + 2] = c.h[i] >> 8, out[4 * i + 3] = c.h[i];
    }
}

static void base64(const uint8_t *in, size_t len, char *out)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    size_t i, o = 0;
    for (i = 0; i + 2 < len; i += 3) {
        uint32_t v = in[i] << 16 | in[i + 1] << 8 | in[i + 2];
        out[o++] = tbl[v >> 18], out[o++] = tbl[(v >> 12) & 63];
        out[o++] = tbl[(v >> 6) & 63], out[o++] = tbl[v & 63];
    }
    if (len - i == 1) {
        uint32_t v = in[i] << 16;
        out[o++] = tbl[v >> 18], out[o++] = tbl[(v >> 12) & 63], out[o++] = '=', out[o++] = '=';
    } else if (len - i == 2) {
        uint32_t v = in[i] << 16 | in[i + 1] << 8;
        out[o++] = tbl[v >> 18], out[o++] = tbl[(v >> 12) & 63];
        out[o++] = tbl[(v >> 6) & 63], out[o++] = '=';
    }
    out[o] = 0;
}

#endif
