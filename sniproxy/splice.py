"""Zero-copy forwarding with splice(2): socket -> pipe -> socket, bytes never enter user space.

Once the upstream has connected, ``start`` takes both sockets over from uvloop (a dup of each
fd; the transports are detached and aborted, which closes only their own fd and sends
nothing) and pumps each direction through a pipe with ``os.splice``.

One invariant keeps the loop simple: a direction splices socket -> pipe only while its pipe
is empty, so EAGAIN there can only mean "the socket has nothing", never "the pipe is full".
Pipes are borrowed from a pool of empty pipes for each chunk and returned once drained, so
an idle connection holds no pipe at all.

The semantics are the Protocol pump's (``pump.Side``): bytes are counted as they are read,
a FIN is passed on once its direction is flushed, a reset or write error on one socket
resets the other, and both ``Side``s end through ``Connection.side_lost``, so the close
reasons are the same. Each ``Side.transport`` becomes the ``Splice``, whose ``abort()``
closes both sockets for the idle sweeper and the drain.
"""

from __future__ import annotations

import asyncio
import fcntl
import functools
import logging
import os
import socket
import struct
from typing import Any

from .errors import ConfigError

log = logging.getLogger("sniproxy.splice")

#: Asked for with F_SETPIPE_SZ: one splice moves up to this much, and a direction whose
#: reader is slow holds up to this much (in the kernel; the pump's bound is 256 KiB in user
#: space). 1 MiB is Linux's default /proc/sys/fs/pipe-max-size, past which an unprivileged
#: process gets EPERM; it costs about a quarter less CPU per GiB than 256 KiB pipes.
PIPE_SIZE = 1 << 20
#: Used when PIPE_SIZE is refused: Linux's default pipe size.
FALLBACK_PIPE_SIZE = 64 << 10
#: Empty pipes kept for reuse, per process. Pipes in use are not bounded by this: each
#: direction holds one only while bytes wait in it for a slow reader.
POOL_LIMIT = 64
#: Most socket -> pipe -> socket rounds per readiness event, while each fills the pipe.
ROUNDS = 4
#: After a failure to get a pipe (out of descriptors), wait this long before reading again.
PIPE_RETRY = 0.1

_splice = getattr(os, "splice", None)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)
_LINGER_RST = struct.pack("ii", 1, 0)


# -- availability ----------------------------------------------------------------------------

def splice_enabled(mode: str) -> bool:
    """``[server] splice``: "off", "on" (an error where splice(2) does not work), "auto"."""
    if mode == "off":
        return False
    problem = probe()
    if problem is None:
        return True
    if mode == "on":
        raise ConfigError("server.splice", f'is "on" but {problem}')
    return False


@functools.cache
def probe() -> str | None:
    """None if splice(2) moves bytes socket -> pipe -> socket here, else what is wrong."""
    if _splice is None:
        return "this Python has no os.splice (needs Linux and Python 3.10+)"
    a, b = socket.socketpair()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        a.send(b"x")
        if _splice(b.fileno(), w, 1, flags=_FLAGS) != 1 or _splice(r, b.fileno(), 1, flags=_FLAGS) != 1:
            return "splice(2) moved no bytes in a self-test"
        if a.recv(1) != b"x":
            return "splice(2) corrupted bytes in a self-test"
    except OSError as exc:
        return f"splice(2) fails here: {exc.strerror or exc}"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    return None


# -- pipes -----------------------------------------------------------------------------------

class Pipe:
    __slots__ = ("r", "w", "size")

    def __init__(self, r: int, w: int, size: int):
        self.r = r
        self.w = w
        self.size = size  # capacity, as the kernel granted it

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _set_size(fd: int, size: int, fallback: int) -> int:
    """Grow a pipe to ``size``, or ``fallback`` when refused; returns the capacity it has."""
    for want in (size, fallback):
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
        except OSError:  # EPERM past pipe-max-size or the user's pipe-user-pages-hard
            continue
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


class PipePool:
    """Empty pipes for reuse. Only empty pipes come back in: ``release`` closes a pipe that
    still holds bytes, so every pipe ``acquire`` hands out is empty."""

    def __init__(self, size: int = PIPE_SIZE, fallback: int = FALLBACK_PIPE_SIZE, limit: int = POOL_LIMIT):
        self.size = size
        self.fallback = fallback
        self.limit = limit
        self.idle: list[Pipe] = []

    def acquire(self) -> Pipe:
        """An empty pipe; raises OSError (EMFILE...) when no new one can be made."""
        if self.idle:
            return self.idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = _set_size(w, self.size, self.fallback)
        except OSError:
            os.close(r)
            os.close(w)
            raise
        return Pipe(r, w, size)

    def release(self, pipe: Pipe, pending: int) -> None:
        """Take a pipe back; ``pending`` is how many bytes are still in it."""
        if pending or len(self.idle) >= self.limit:
            pipe.close()
        else:
            self.idle.append(pipe)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


_pool = PipePool()
# A forked worker must not share pipes with its parent: drop the inherited copies.
os.register_at_fork(after_in_child=_pool.close)


def _with_socket(fd: int, method: Any, *args: Any) -> Any:
    """Call a socket method on a plain fd, for the rare calls os has no function for."""
    sock = socket.socket(fileno=fd)
    try:
        return method(sock, *args)
    finally:
        sock.detach()


# -- takeover --------------------------------------------------------------------------------

#: Protocol for the detached uvloop transports: their connection_lost must not reach the
#: Connection, which now ends through the Splice.
_DETACHED = asyncio.Protocol()


def start(conn: Any, client: Any, upstream: Any, hello: bytes) -> bool:
    """Take both sockets over from uvloop and splice; False leaves them to the Protocol pump.

    ``client`` and ``upstream`` are the connection's ``pump.Side``s, kept as byte counters
    and for ``Connection.side_lost``. ``hello`` (already counted) goes to the upstream first.
    """
    ct = conn.client_transport
    ut = upstream.transport
    # The upstream spoke (or closed) before we got here and uvloop still holds some of it for
    # the client: the pump, which owns those buffers, carries on with this connection.
    if upstream.eof or ct.get_write_buffer_size():
        return False
    # Plain fds, not socket objects (which cost a getsockname and an ioctl each): a dup is
    # close-on-exec, and non-blocking already, as O_NONBLOCK belongs to the shared file.
    try:
        cfd = os.dup(ct.get_extra_info("socket").fileno())
    except OSError:
        return False
    try:
        ufd = os.dup(ut.get_extra_info("socket").fileno())
    except OSError:
        os.close(cfd)
        return False
    for t in (ct, ut):
        # Abort first: set_protocol on a reading transport would restart its reads. The
        # abort closes uvloop's fd only (ours stays open, so the peer sees nothing), and
        # its connection_lost, due next iteration, goes to the protocol set here.
        t.abort()
        t.set_protocol(_DETACHED)
    Splice(conn, client, upstream, cfd, ufd).begin(hello)
    return True


class Flow:
    """One direction: src socket -> pipe -> dst socket.

    ``reader`` is the Side of src (its ``nbytes`` counts what was read from it), ``writer``
    the Side of dst. ``head`` holds bytes to write before any splice (the ClientHello).
    """

    __slots__ = ("pair", "loop", "reader", "writer", "src_fd", "dst_fd", "pipe", "pending",
                 "head", "reading", "writing", "done", "retry")

    def __init__(self, pair: Splice, reader: Any, writer: Any, src_fd: int, dst_fd: int):
        self.pair = pair
        self.loop = pair.loop
        self.reader = reader
        self.writer = writer
        self.src_fd = src_fd
        self.dst_fd = dst_fd
        self.pipe: Pipe | None = None
        self.pending = 0  # bytes in the pipe
        self.head: memoryview | None = None
        self.reading = False  # a reader is registered on src
        self.writing = False  # a writer is registered on dst
        self.done = False  # EOF read from src and passed on to dst
        self.retry: asyncio.TimerHandle | None = None

    def resume(self) -> None:
        if not self.reading and not self.done:
            self.reading = True
            self.loop.add_reader(self.src_fd, self.on_readable)

    def on_readable(self) -> None:
        for _ in range(ROUNDS):
            pipe = self.pipe
            if pipe is None:
                try:
                    pipe = self.pipe = _pool.acquire()
                except OSError as exc:
                    self._wait_for_pipe(exc)
                    return
            try:
                n = _splice(self.src_fd, pipe.w, pipe.size, flags=_FLAGS)  # the pipe is empty
            except BlockingIOError:
                break
            except OSError as exc:
                self.pair.lost(self.reader, exc)
                return
            if n == 0:
                self._eof()
                return
            self.reader.nbytes += n
            self.pending = n
            if not self._flush():
                return
            if n < pipe.size:  # the socket had less than a pipeful: likely EAGAIN next, skip it
                break
        self._release_pipe()

    def on_writable(self) -> None:
        if not self._flush():
            return
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst_fd)
        self._release_pipe()
        self.resume()

    def _flush(self) -> bool:
        """Write what src sent to dst; False (and src unwatched) while dst cannot take it all."""
        try:
            head = self.head
            while head:
                head = self.head = head[os.write(self.dst_fd, head):]
            pending = self.pending
            while pending:
                n = _splice(self.pipe.r, self.dst_fd, pending, flags=_FLAGS)
                if n <= 0:  # cannot happen with bytes in the pipe; never spin on it
                    raise BrokenPipeError("splice from a non-empty pipe returned 0")
                pending = self.pending = pending - n
        except BlockingIOError:
            # Backpressure: stop reading src until dst has room.
            if self.reading:
                self.reading = False
                self.loop.remove_reader(self.src_fd)
            if not self.writing:
                self.writing = True
                self.loop.add_writer(self.dst_fd, self.on_writable)
            return False
        except OSError as exc:
            self.pair.lost(self.writer, exc)
            return False
        return True

    def _eof(self) -> None:
        """src sent its FIN, and the pipe is empty: pass it on, keep the other way flowing."""
        self._release_pipe()
        self.reader.eof = True
        self.done = True
        self.reading = False
        self.loop.remove_reader(self.src_fd)
        if not self.pair.flow_done():
            try:
                _with_socket(self.dst_fd, socket.socket.shutdown, socket.SHUT_WR)
            except OSError as exc:
                self.pair.lost(self.writer, exc)

    def _wait_for_pipe(self, exc: OSError) -> None:
        self.pair.warn_no_pipe(exc)
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        self.retry = self.loop.call_later(PIPE_RETRY, self._retry)

    def _retry(self) -> None:
        self.retry = None
        self.resume()

    def _release_pipe(self) -> None:
        if self.pipe is not None:
            _pool.release(self.pipe, self.pending)
            self.pipe = None
            self.pending = 0

    def stop(self) -> None:
        """Unwatch both sockets (before they are closed) and give the pipe back."""
        if self.reading:
            self.reading = False
            self.loop.remove_reader(self.src_fd)
        if self.writing:
            self.writing = False
            self.loop.remove_writer(self.dst_fd)
        if self.retry is not None:
            self.retry.cancel()
            self.retry = None
        self._release_pipe()


class Splice:
    """Both sockets of one connection after takeover. It is each Side's ``transport``."""

    __slots__ = ("conn", "loop", "client", "upstream", "cfd", "ufd", "up", "down", "closed")

    _warned_at = float("-inf")

    def __init__(self, conn: Any, client: Any, upstream: Any, cfd: int, ufd: int):
        self.conn = conn
        self.loop = conn.server.loop
        self.client = client
        self.upstream = upstream
        self.cfd = cfd
        self.ufd = ufd
        self.up = Flow(self, client, upstream, cfd, ufd)
        self.down = Flow(self, upstream, client, ufd, cfd)
        self.closed = False

    def begin(self, hello: bytes) -> None:
        """Stand in as both Sides' transport, and pump: the hello first, then the client."""
        self.client.transport = self.upstream.transport = self
        self.down.resume()
        self.up.head = memoryview(hello)
        self.up.on_writable()  # sends the hello, then reads the client

    def flow_done(self) -> bool:
        """A direction read its EOF. The second one closes both sockets at once, without
        a shutdown first, as the pump does (its pending write_eof is dropped by close)."""
        if not (self.up.done and self.down.done):
            return False
        self._close(reset=None)
        self._end(self.client, None)
        return True

    def lost(self, side: Any, exc: BaseException) -> None:
        """A read, write or shutdown on ``side`` failed: reset the other side, like the pump."""
        if self.closed:
            return
        self._close(reset=side.peer)
        self._end(side, exc)

    def abort(self) -> None:
        """Idle timeout or end of drain (``Connection.abort``): close both sockets now."""
        if self.closed:
            return
        self._close(reset=None)
        self._end(self.client, None)

    def _close(self, reset: Any) -> None:
        self.closed = True
        self.up.stop()
        self.down.stop()
        for side, fd in ((self.client, self.cfd), (self.upstream, self.ufd)):
            if side is reset:
                try:
                    _with_socket(fd, socket.socket.setsockopt, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
                except OSError:
                    pass
            os.close(fd)

    def _end(self, first: Any, exc: BaseException | None) -> None:
        """Report both sides lost, ``first`` first: finish() runs once, on the second."""
        first.lost = True
        self.conn.side_lost(first, exc)
        first.peer.lost = True
        self.conn.side_lost(first.peer, None)

    def warn_no_pipe(self, exc: OSError) -> None:
        now = self.loop.time()
        if now - Splice._warned_at >= 10.0:
            Splice._warned_at = now
            log.warning("cannot make a pipe for splice (%s); retrying", exc.strerror or exc)
