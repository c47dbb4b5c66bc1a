"""Listening sockets: bind them, and accept on the engine's event set in batches.

A listener knows nothing of connections: it hands each accepted descriptor to a factory.
When accept(2) fails, the failure is counted by errno and, for running out of descriptors,
logged at most once per ten seconds with the limit and the count; the listener then
pauses (connections wait in the kernel's backlog) and tries again after a back-off.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import socket
from collections.abc import Callable
from typing import Any, cast

from ..addresses import format_address
from ..config import Listen
from ..errors import BindError
from ..observe.throttle import Throttled
from .events import LISTENER_EVENTS, EventSet, errno_name

log = logging.getLogger("sniproxy.listener")

BACKLOG = 4096
#: Connections accepted per readiness event; the rest stay in the backlog for the next one.
ACCEPT_BATCH = 64
#: Pause after running out of descriptors: doubles from PAUSE_MIN up to PAUSE_MAX.
PAUSE_MIN = 0.05
PAUSE_MAX = 1.0
#: accept(2) errors that mean "this process or the system cannot take more now".
_EXHAUSTED = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def listen_name(listen: Listen) -> str:
    return format_address(listen.address, listen.port)


def bind(listen: Listen) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            # [::]:443 next to 0.0.0.0:443 must not claim the IPv4 side too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.address, listen.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {listen_name(listen)}: {exc.strerror or exc}", exc.errno or 0) from None
    return sock


def prepare(sock: socket.socket) -> None:
    """Before accepting: non-blocking, and TCP_NODELAY, which accepted sockets inherit
    (the proxy relays TLS records as they come; Nagle would hold the small ones)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Listener:
    """Accepts on one listening socket and hands each connection to ``factory(fd, peer)``."""

    def __init__(self, sock: socket.socket, name: str, events: EventSet,
                 factory: Callable[[int, tuple], None], count_error: Callable[[str], None]):
        self.sock = sock
        self.name = name
        self.events = events
        self.factory = factory
        self.count_error = count_error  # an accept failure, by errno name
        # (fd, peer) without a socket object per connection: CPython's accept() is built on
        # it, and typeshed does not list it.
        self._accept: Callable[[], tuple[int, Any]] = cast(Any, sock)._accept
        self.fd = sock.fileno()
        self.paused = False
        self._pause = PAUSE_MIN
        self._resume: asyncio.TimerHandle | None = None
        prepare(sock)
        events.add(self.fd, self, LISTENER_EVENTS)

    def on_event(self, fd: int, events: int) -> None:
        accept = self._accept
        factory = self.factory
        for _ in range(ACCEPT_BATCH):
            try:
                conn_fd, peer = accept()
            except BlockingIOError:
                self._pause = PAUSE_MIN
                return
            except OSError as exc:
                self._failed(exc)
                return
            os.set_blocking(conn_fd, False)
            factory(conn_fd, peer)
        self._pause = PAUSE_MIN

    def _failed(self, exc: OSError) -> None:
        code = exc.errno or 0
        self.count_error(errno_name(code))
        if code not in _EXHAUSTED:
            return  # ECONNABORTED, EPERM (a firewall), EPROTO...: this one connection only
        _warn_exhausted(exc, self.name)
        self.pause()
        self._resume = self.events.loop.call_later(self._pause, self.resume)
        self._pause = min(self._pause * 2, PAUSE_MAX)

    def on_error(self, exc: Exception) -> None:
        """A bug while accepting (the event set has logged it): the listener stays, and the
        next readiness event tries again."""

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.events.epoll.modify(self.fd, 0)

    def resume(self) -> None:
        self._resume = None
        if self.paused:
            self.paused = False
            self.events.epoll.modify(self.fd, LISTENER_EVENTS)

    def close(self) -> None:
        """Stop accepting. The socket may be shared with other processes (workers, the
        supervisor): its registration is removed before the close, or epoll would keep it."""
        if self._resume is not None:
            self._resume.cancel()
        self.events.remove(self.fd)
        self.sock.close()


_throttle = Throttled(log)


def _warn_exhausted(exc: OSError, name: str) -> None:
    if not _throttle.due("exhausted"):
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        open_fds = len(os.listdir("/proc/self/fd"))
    except OSError:  # EMFILE: this very listing needs a descriptor; the table is full
        open_fds = soft
    log.error("cannot accept on %s: %s (%d descriptors open, RLIMIT_NOFILE %d); pausing accepts "
              "until some close", name, exc.strerror or errno_name(exc.errno or 0), open_fds, soft)
