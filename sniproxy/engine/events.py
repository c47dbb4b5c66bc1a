"""The engine's event set: one edge-triggered epoll set, nested in the event loop as one reader.

Each socket of the data path is registered once, for input, output and the peer's
half-close, and stays registered until it is closed. Readiness is then a flag kept by its
owner (set by an event, cleared by a short read or EAGAIN), as in nginx's event core, so a
paused direction costs no system call, and errors and hang-ups are seen whether or not a
side is being read.

Descriptors closed while a batch of events is being dispatched are closed after the batch:
a number freed and reused by an accept in the same batch could otherwise receive an event
that belonged to its previous owner.

A few socket calls that the ``os`` module lacks (shutdown, SO_LINGER, SO_ERROR) are made on
plain descriptors through libc, so the data path needs no socket object per connection.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import logging
import os
import select
import socket
import struct
from collections.abc import Callable
from typing import Protocol

IN = select.EPOLLIN
OUT = select.EPOLLOUT
RDHUP = select.EPOLLRDHUP
ERR = select.EPOLLERR
HUP = select.EPOLLHUP
#: Every data-path socket: registered once with all of these.
SOCKET_EVENTS = IN | OUT | RDHUP | select.EPOLLET
#: Listening sockets are level-triggered: a batch accepts at most so many, the rest stay ready.
LISTENER_EVENTS = IN
#: Events taken from the kernel per batch.
MAX_EVENTS = 256
#: The scratch buffer every read of this event set goes through: the most one read takes.
SCRATCH = 256 * 1024

log = logging.getLogger("sniproxy.events")
_libc = ctypes.CDLL(None, use_errno=True)
_LINGER_RST = struct.pack("ii", 1, 0)


class Handler(Protocol):
    def on_event(self, fd: int, events: int) -> None: ...

    def on_error(self, exc: Exception) -> None:
        """``on_event`` raised (a bug): close what it owns. A bug costs one connection."""


class Scratch:
    """The buffer every read goes through, reused by each and copied out of before the next.
    One per event set, so one per event loop and thread."""

    __slots__ = ("buffer", "view", "views")

    def __init__(self, size: int = SCRATCH):
        self.buffer = bytearray(size)
        self.view = memoryview(self.buffer)
        self.views = [self.view]  # os.readv's argument, built once


class EventSet:
    """fd -> handler, dispatched in batches from one epoll set watched by the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.scratch = Scratch()
        self.epoll = select.epoll()
        self.handlers: dict[int, Handler] = {}
        self._dispatching = False
        self._closing: list[int] = []
        self._posted: list[Callable[[], None]] = []
        loop.add_reader(self.epoll.fileno(), self.poll)

    def add(self, fd: int, handler: Handler, events: int = SOCKET_EVENTS) -> None:
        """Watch ``fd`` until ``close`` (or ``remove``). Raises OSError."""
        self.epoll.register(fd, events)
        self.handlers[fd] = handler

    def remove(self, fd: int) -> None:
        """Stop watching a descriptor that stays open, or one another process shares (a
        listener): epoll forgets a registration only when every copy of it is closed."""
        if self.handlers.pop(fd, None) is not None:
            try:
                self.epoll.unregister(fd)
            except OSError:
                pass

    def close(self, fd: int) -> None:
        """Forget and close a descriptor only this process holds. Closing it removes it
        from the epoll set; during a batch, the close waits for the batch's end."""
        self.handlers.pop(fd, None)
        if self._dispatching:
            self._closing.append(fd)
        else:
            _close(fd)

    def post(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` after this batch (work left over by a bounded loop)."""
        if not self._posted and not self._dispatching:
            self.loop.call_soon(self._run_posted)
        self._posted.append(callback)

    def poll(self) -> None:
        handlers = self.handlers
        self._dispatching = True
        try:
            for fd, events in self.epoll.poll(0, MAX_EVENTS):
                handler = handlers.get(fd)
                if handler is not None:
                    try:
                        handler.on_event(fd, events)
                    except Exception as exc:  # the rest of the batch must still be dispatched
                        _failed(handler, exc)
        finally:
            self._end_batch()
        if self._posted:
            self.loop.call_soon(self._run_posted)

    def _run_posted(self) -> None:
        posted, self._posted = self._posted, []
        self._dispatching = True
        try:
            for callback in posted:
                try:
                    callback()
                except Exception as exc:
                    _failed(getattr(callback, "__self__", None), exc)
        finally:
            self._end_batch()
        if self._posted:
            self.loop.call_soon(self._run_posted)

    def _end_batch(self) -> None:
        """Close what the batch closed, now that no event of it can name those descriptors."""
        self._dispatching = False
        closing = self._closing
        if closing:
            for fd in closing:  # _close, written out: two per connection
                try:
                    _os_close(fd)
                except OSError:
                    pass
            closing.clear()

    def close_all(self) -> None:
        self.loop.remove_reader(self.epoll.fileno())
        self.epoll.close()


def _failed(handler: object, exc: Exception) -> None:
    log.error("internal error in %r", handler, exc_info=exc)
    on_error = getattr(handler, "on_error", None)
    if on_error is not None:
        try:
            on_error(exc)
        except Exception:
            log.exception("internal error while closing after an internal error")


_os_close = os.close


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


# -- plain-descriptor socket calls -----------------------------------------------------------

def shutdown_write(fd: int) -> None:
    """shutdown(fd, SHUT_WR): pass a FIN on. Raises OSError."""
    if _libc.shutdown(fd, socket.SHUT_WR) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def close_with_reset(fd: int) -> None:
    """Set SO_LINGER to 0 so the coming close sends a TCP RST (passing a reset on)."""
    _libc.setsockopt(fd, socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST, len(_LINGER_RST))


def set_receive_low_water(fd: int, nbytes: int) -> bool:
    """SO_RCVLOWAT: epoll reports the socket readable only once ``nbytes`` are queued (or a
    FIN or an error arrived). False if the kernel refused it."""
    value = ctypes.c_int(nbytes)
    return _libc.setsockopt(fd, socket.SOL_SOCKET, socket.SO_RCVLOWAT, ctypes.byref(value), ctypes.sizeof(value)) == 0


def socket_error(fd: int) -> int:
    """SO_ERROR: the errno of a failed non-blocking connect (and clears it)."""
    value = ctypes.c_int(0)
    size = ctypes.c_uint32(ctypes.sizeof(value))
    if _libc.getsockopt(fd, socket.SOL_SOCKET, socket.SO_ERROR, ctypes.byref(value), ctypes.byref(size)) != 0:
        return ctypes.get_errno()
    return value.value


def errno_name(code: int) -> str:
    return errno.errorcode.get(code, str(code))
