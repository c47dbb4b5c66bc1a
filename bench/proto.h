/* Wire protocol between the benchmark load generator and upstream, carried through the proxy.
 *
 * A connection starts with a real TLS ClientHello (one or more records), immediately followed
 * by a 16-byte command header. The proxy forwards both untouched; the upstream reads the hello
 * records by length (it does not speak TLS), then the header, then does the mode:
 *
 *   'S' sink:    read and discard; every `param` bytes received (0: never) send back the
 *                cumulative count as a little-endian u64, so the sender measures what really
 *                arrived, not what sat in buffers.
 *   'P' source:  send `param` bytes (0: until the peer closes), then close.
 *   'E' echo:    echo every byte back until the peer closes.
 *   'A' ack:     send one byte at once (first byte back = end of the proxy's setup), then echo.
 *   'L' line:    read one line (up to and including '\n'), echo it, then close: the upstream
 *                sends its FIN first, as a line-oriented echo server does.
 *
 * No header: when the bytes after the hello do not start with "SNB1", they are a line and the
 * connection is in 'L' mode (the workload of issue 14: hello, a 64 B line, echo, server FIN
 * first), unless the line starts with '=': then it is 'E' (echo until the client closes,
 * client FIN first). A headerless line therefore never starts with 'S'.
 */
#ifndef BENCH_PROTO_H
#define BENCH_PROTO_H

#include <stdint.h>
#include <string.h>

#define CMD_MAGIC "SNB1"
#define CMD_LEN 16

enum { MODE_SINK = 'S', MODE_SOURCE = 'P', MODE_ECHO = 'E', MODE_ACK = 'A', MODE_LINE = 'L' };
#define LINE_KEEP '=' /* first byte of a headerless line: echo until the client closes */

static inline void cmd_build(uint8_t out[CMD_LEN], char mode, uint64_t param)
{
    memcpy(out, CMD_MAGIC, 4);
    out[4] = (uint8_t)mode;
    out[5] = out[6] = out[7] = 0;
    for (int i = 0; i < 8; i++)
        out[8 + i] = (uint8_t)(param >> (8 * i));
}

static inline uint64_t le64(const uint8_t *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | p[i];
    return v;
}

#endif
