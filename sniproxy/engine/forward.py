"""One direction of a proxied pair: bytes read from ``src`` are written to ``dst``.

Copy small, splice big, on the same descriptors: a direction copies through the event
set's scratch buffer (``readv``/``write``) and moves to splice(2) through a pooled pipe once it has
carried ``splice_after`` bytes. Both modes keep one backpressure rule: ``src`` is read only
while nothing is held for ``dst``. What is held is either the unsent tail of one read (at
most ``CHUNK`` bytes, in user space) or the bytes of one pipe (in the kernel), never both.

Readiness is two flags set by events: ``readable`` (src) and ``writable`` (dst). EAGAIN, or a
short read into the buffer (a socket gives all it has, up to the size asked), clears
``readable``; a short splice does not (see ``_splice_in``). A short write or EAGAIN clears
``writable``. The edge-triggered event set sets them again. Once an event has reported the peer's FIN
(EPOLLRDHUP), ``eof_pending`` keeps ``readable`` set through short reads until the read
that returns 0: the FIN may have come with the last data, and no further edge will follow. ``run`` returns what happened, so the owner
decides what a failure or an end means (the connection closes, resets, counts).
"""

from __future__ import annotations

import enum
import logging
import os

from ..observe.throttle import Throttled
from .events import SCRATCH, Scratch, shutdown_write
from .splice import FLAGS, Pipe, pool

log = logging.getLogger("sniproxy.forward")

#: Bytes per read when copying, and the most a direction holds in user space.
CHUNK = SCRATCH
#: Reads (or splices) per call: a busy direction yields to the others after this many.
ROUNDS = 8

_splice = os.splice  # Linux, Python 3.10+: where it fails, splice.probe() keeps a direction copying
_readv = os.readv
_write = os.write


class Mode(enum.Enum):
    COPY = "copy"
    SPLICE = "splice"


class Result(enum.Enum):
    WAIT = "wait"  # nothing more until an event
    MORE = "more"  # still ready after ROUNDS: run again after this batch
    EOF = "eof"  # src sent its FIN and it was passed on to dst
    SRC_FAILED = "src_failed"  # reading src failed (reset): see ``error``
    DST_FAILED = "dst_failed"  # writing or shutting down dst failed: see ``error``


#: The members as module globals: on 3.11 an attribute of an Enum class is looked up through
#: EnumType.__getattr__ (about 1,100 instructions, against about 25 for a global), and a
#: direction returns one of these on every run.
_WAIT, _MORE, _EOF, _SRC_FAILED, _DST_FAILED = Result.WAIT, Result.MORE, Result.EOF, Result.SRC_FAILED, Result.DST_FAILED
_COPY, _SPLICE = Mode.COPY, Mode.SPLICE


class Flow:
    __slots__ = ("src", "dst", "readable", "eof_pending", "writable", "mode", "nbytes", "splice_after",
                 "pending", "pipe", "in_pipe", "done", "last", "error")

    def __init__(self, src: int, dst: int, splice_after: float, head: bytes = b"", readable: bool = True,
                 eof_pending: bool = False):
        self.src = src
        self.dst = dst
        self.readable = readable
        self.eof_pending = eof_pending
        self.writable = True
        self.mode = _COPY  # the first read past splice_after moves it to SPLICE
        self.nbytes = len(head)
        """Bytes read from src so far (those in ``head`` included): a live counter."""
        self.splice_after = splice_after
        self.pending: memoryview | None = memoryview(head) if head else None
        self.pipe: Pipe | None = None
        self.in_pipe = 0
        self.done = False
        self.last = False
        """The other direction is done: this one's FIN ends the pair, and the close that
        follows sends it, so no shutdown is needed."""
        self.error: OSError | None = None

    def run(self, scratch: Scratch) -> Result:
        """Move what can be moved now. ``scratch``'s buffer holds each read until written."""
        if self.done:  # src's FIN was passed on: later events (EPOLLIN on EOF) mean nothing here
            return _WAIT
        rounds = ROUNDS
        while True:
            # 1. Hand dst what it is owed: the tail of a read, or the bytes in the pipe.
            pending = self.pending
            if pending is not None:
                if not self.writable:
                    return _WAIT
                try:
                    n = _write(self.dst, pending)
                except BlockingIOError:
                    self.writable = False
                    return _WAIT
                except OSError as exc:
                    self.error = exc
                    return _DST_FAILED
                if n < len(pending):
                    self.pending = pending[n:]
                    self.writable = False
                    return _WAIT
                self.pending = None
            elif self.in_pipe and (pipe := self.pipe) is not None:
                if not self.writable:
                    return _WAIT
                try:
                    n = _splice(pipe.r, self.dst, self.in_pipe, flags=FLAGS)
                except BlockingIOError:
                    self.writable = False
                    return _WAIT
                except OSError as exc:
                    self.error = exc
                    return _DST_FAILED
                if n <= 0:  # cannot happen with bytes in the pipe; never wait on it forever
                    self.error = BrokenPipeError("splice from a non-empty pipe moved nothing")
                    return _DST_FAILED
                self.in_pipe -= n
                if self.in_pipe:
                    self.writable = False
                    return _WAIT
            # 2. Nothing held: read src, if it has anything.
            if not self.readable:
                if self.pipe is not None:
                    self._release_pipe()
                return _WAIT
            if not rounds:
                return _MORE
            rounds -= 1
            if self.mode is _SPLICE or self.nbytes >= self.splice_after:
                if self.mode is _COPY:
                    self.mode = _SPLICE
                    log.debug("fd %d -> fd %d: moved to splice after %d bytes", self.src, self.dst, self.nbytes)
                pipe = self.pipe or self._take_pipe()
                if pipe is not None:
                    result = self._splice_in(pipe)
                    if result is not None:
                        return result
                    continue
                # no pipe to be had: this burst is copied
            # Copy: one read into the scratch buffer, written on at once (here, not in a
            # method: nearly every read of a short connection comes this way).
            try:
                n = _readv(self.src, scratch.views)
            except BlockingIOError:
                self.readable = False
                return _WAIT
            except OSError as exc:
                self.error = exc
                return _SRC_FAILED
            if n == 0:
                return self._eof()
            if n < CHUNK and not self.eof_pending:
                self.readable = False  # a short read drained the socket; the next edge says more
            self.nbytes += n
            try:
                sent = _write(self.dst, scratch.view[:n])
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                self.error = exc
                return _DST_FAILED
            if sent < n:
                self.pending = memoryview(scratch.buffer[sent:n])  # a copy: the scratch buffer moves on
                self.writable = False
                return _WAIT

    def _splice_in(self, pipe: Pipe) -> Result | None:
        try:
            n = _splice(self.src, pipe.w, pipe.size, flags=FLAGS)  # the pipe is empty
        except BlockingIOError:
            self.readable = False
            self._release_pipe()
            return _WAIT
        except OSError as exc:
            self.error = exc
            return _SRC_FAILED
        if n == 0:
            self._release_pipe()
            return self._eof()
        # No "short read means drained" here, unlike a copy: a pipe has one slot per page and
        # a socket's small segments take one slot each, so a splice may stop short with bytes
        # left. Only EAGAIN says the socket is drained; anything else could wait for an edge
        # that never comes (the sender blocked on a full window).
        self.nbytes += n
        self.in_pipe = n
        return None

    def _eof(self) -> Result:
        """src sent its FIN, and nothing is held for dst: pass it on."""
        self.done = True
        self.readable = False
        if self.last:
            return _EOF
        try:
            shutdown_write(self.dst)
        except OSError as exc:
            self.error = exc
            return _DST_FAILED
        return _EOF

    def _take_pipe(self) -> Pipe | None:
        try:
            self.pipe = pool.acquire()
        except OSError as exc:  # out of descriptors: copy this burst instead
            _warn_no_pipe(exc)
        return self.pipe

    def _release_pipe(self) -> None:
        if self.pipe is not None:
            pool.release(self.pipe, self.in_pipe)
            self.pipe = None
            self.in_pipe = 0

    def release(self) -> None:
        """The pair is closing: give back the pipe (a pipe still holding bytes is closed)."""
        if self.pipe is not None:
            self._release_pipe()
        self.pending = None


_throttle = Throttled(log)


def _warn_no_pipe(exc: OSError) -> None:
    _throttle.warning("no_pipe", "cannot make a pipe for splice (%s): copying instead", exc.strerror or exc)
