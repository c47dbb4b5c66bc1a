"""The interpreter's floor: a minimal SNI proxy in pure Python, for the benchmark only.

    python bench/floor.py LISTEN_ADDR PORT SNI UPSTREAM_ADDR UPSTREAM_PORT

It makes the same system calls per short connection as sniproxy's engine (accept4, ioctl,
epoll_ctl x2, readv, socket, setsockopt, connect, write, shutdown, close x2) and the least
Python work around them that forwards a real ClientHello to the route its SNI names: one
epoll set of its own (no event loop around it), one object per connection, the SNI found by
walking the extensions without checking anything else, no limits, no timeouts, no stats, no
logs, no half-close subtleties beyond passing each FIN on. It is not a proxy to run: it is
how low CPU per connection can go in this interpreter with this design, so that
``sniproxy / floor`` says what the engine's own Python costs and ``floor / nginx`` what no
pure-Python engine can win back. It prints "ready" once listening; SIGTERM stops it.
"""

from __future__ import annotations

import _socket
import ctypes
import os
import select
import signal
import socket
import sys

IN, OUT, RDHUP, ET = select.EPOLLIN, select.EPOLLOUT, select.EPOLLRDHUP, select.EPOLLET
ERR = select.EPOLLERR | select.EPOLLHUP
EVENTS = IN | OUT | RDHUP | ET
STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
#: shutdown(2) on the client's bare descriptor: a socket object made from it would cost a
#: getsockname(2) per connection (CPython checks the descriptor), as the engine found too.
_shutdown = ctypes.CDLL(None, use_errno=True).shutdown
BUF = bytearray(256 * 1024)
VIEW = memoryview(BUF)
VIEWS = [VIEW]


def sni_of(d: bytes) -> str | None:
    """The host name of a ClientHello that is whole in ``d``; None otherwise. No checks."""
    try:
        if d[0] != 22 or d[5] != 1:
            return None
        pos = 9 + 34
        pos += 1 + d[pos]
        pos += 2 + ((d[pos] << 8) | d[pos + 1])
        pos += 1 + d[pos]
        end = pos + 2 + ((d[pos] << 8) | d[pos + 1])
        pos += 2
        while pos < end:
            n = (d[pos + 2] << 8) | d[pos + 3]
            if d[pos] == 0 and d[pos + 1] == 0:
                k = (d[pos + 7] << 8) | d[pos + 8]
                return d[pos + 9:pos + 9 + k].decode("ascii")
            pos += 4 + n
    except (IndexError, UnicodeDecodeError):
        return None
    return None


class Conn:
    __slots__ = ("cfd", "ufd", "usock", "forwarding", "held", "c_ready", "c_fin", "c_done", "u_done")

    def __init__(self, cfd: int):
        self.cfd = cfd
        self.ufd = -1
        self.usock = None
        self.forwarding = False
        self.held = b""
        self.c_ready = True
        self.c_fin = False  # the client's FIN was reported (EPOLLRDHUP) before forwarding
        self.c_done = False
        self.u_done = False


def main() -> int:
    addr, port, sni, up_addr, up_port = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4], int(sys.argv[5])
    routes = {sni: (up_addr, up_port)}
    ep = select.epoll()
    lsock = socket.socket()
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((addr, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    lsock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    lfd = lsock.fileno()
    accept = lsock._accept
    ep.register(lfd, IN)
    conns: dict[int, Conn] = {}
    closing: list[int] = []
    readv, write, close, register = os.readv, os.write, os.close, ep.register
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))

    def finish(c: Conn) -> None:
        for fd in (c.cfd, c.ufd):
            if fd >= 0 and conns.pop(fd, None) is not None:
                closing.append(fd)
        if c.usock is not None:
            c.usock.detach()

    def pump(c: Conn, up: bool, fin: bool) -> None:
        """Move what the source has; pass its FIN on. Writes are assumed whole (short messages).
        A short read drained the socket, unless the FIN was reported (``fin``): then read on
        to the 0 that says so, since no further edge will come (sniproxy's rule too)."""
        src, dst = (c.cfd, c.ufd) if up else (c.ufd, c.cfd)
        while True:
            try:
                n = readv(src, VIEWS)
            except BlockingIOError:
                n = -1
            except OSError:
                finish(c)
                return
            if n < 0:
                break
            if n == 0:
                if up:
                    c.c_done = True
                else:
                    c.u_done = True
                if c.c_done and c.u_done:
                    finish(c)
                elif up:
                    c.usock.shutdown(socket.SHUT_WR)
                else:
                    _shutdown(c.cfd, socket.SHUT_WR)
                return
            write(dst, VIEW[:n])
            if n < len(BUF) and not fin:
                break
        if up:
            c.c_ready = False

    def hello(c: Conn) -> None:
        try:
            n = readv(c.cfd, VIEWS)
        except BlockingIOError:
            return
        except OSError:
            n = 0
        if n <= 0:
            finish(c)
            return
        data = bytes(BUF[:n])
        target = routes.get(sni_of(data))
        if target is None:
            finish(c)
            return
        s = _socket.socket(socket.AF_INET, STREAM)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.connect_ex(target)
        c.usock = s
        c.ufd = s.fileno()
        c.held = data
        c.c_ready = False
        conns[c.ufd] = c
        register(c.ufd, EVENTS)

    print("ready", flush=True)
    try:
        while True:
            for fd, ev in ep.poll(-1, 256):
                if fd == lfd:
                    for _ in range(64):
                        try:
                            cfd, _peer = accept()
                        except BlockingIOError:
                            break
                        os.set_blocking(cfd, False)
                        c = Conn(cfd)
                        conns[cfd] = c
                        register(cfd, EVENTS)
                        hello(c)
                    continue
                c = conns.get(fd)
                if c is None:
                    continue
                if ev & ERR:
                    finish(c)
                    continue
                if not c.forwarding:
                    if fd == c.cfd:
                        if ev & IN:
                            if c.ufd < 0:
                                hello(c)
                            else:
                                c.c_ready = True
                                c.c_fin = bool(ev & RDHUP)
                    elif ev & OUT:
                        c.forwarding = True
                        write(c.ufd, c.held)
                        c.held = b""
                        if c.c_ready:
                            pump(c, True, c.c_fin)
                        if ev & IN and c.ufd in conns:
                            pump(c, False, bool(ev & RDHUP))
                    continue
                if ev & IN:
                    if fd == c.cfd:
                        if not c.c_done:
                            pump(c, True, bool(ev & RDHUP))
                    elif not c.u_done:
                        pump(c, False, bool(ev & RDHUP))
            for fd in closing:
                close(fd)
            closing.clear()
    except SystemExit:
        return 0


if __name__ == "__main__":
    sys.exit(main())
