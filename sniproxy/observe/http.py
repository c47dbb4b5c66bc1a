"""The metrics listener: a small HTTP/1.0-style endpoint on the event loop.

- ``GET /metrics``: the exposition;
- ``GET /healthz``: 200 while every event loop (every worker, under a supervisor) answers;
- ``GET /readyz``: 200 while listening and not draining, 503 from the moment SIGTERM arrives.

It accepts with descriptors kept in reserve: when the process has run out (a connection
flood), a scrape or a health check still gets one.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
from collections.abc import Awaitable, Callable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..addresses import format_address
from ..errors import BindError
from ..tasks import TaskSet
from .throttle import Throttled

log = logging.getLogger("sniproxy.metrics")

#: Paths on the metrics listener. A load balancer's health check asks READY_PATH: 200 while
#: the proxy accepts and is not draining, 503 from the moment SIGTERM arrives.
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"

#: Descriptors held back for the metrics listener: when accept(2) finds the process out of
#: them, they are released for the request (its socket, and reading /proc for process_*).
RESERVE = 4
REQUEST_TIMEOUT = 5.0
MAX_REQUEST = 16 * 1024
#: Connections the listener serves at once: a scrape, the health checks and a few spares. A
#: new one beyond it takes the place of the oldest still sending its request, so idle
#: connections to this port can neither take the process's descriptors nor lock scrapes out.
MAX_CONNECTIONS = 16
#: Out of descriptors with none in reserve: accepts wait this long, doubling up to PAUSE_MAX,
#: instead of spinning on a listener that stays readable.
PAUSE_MIN = 0.05
PAUSE_MAX = 1.0

_throttle = Throttled(log)


def bind_metrics(address: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((address, port))
        sock.listen(64)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot serve metrics on {format_address(address, port)}: {exc.strerror or exc} "
                        "(set [metrics] address/port, or enabled = false)", exc.errno or 0) from None
    return sock


class MetricsServer:
    """The metrics listener. ``collect`` runs before each scrape (a supervisor gathers its
    workers' snapshots there); ``healthy`` and ``ready`` answer the health checks."""

    def __init__(self, sock: socket.socket, registry: CollectorRegistry,
                 collect: Callable[[], Awaitable[object]] | None,
                 healthy: Callable[[], Awaitable[bool]], ready: Callable[[], bool]):
        self.sock = sock
        self.registry = registry
        self.collect = collect
        self.healthy = healthy
        self.ready = ready
        self.loop = asyncio.get_running_loop()
        self._reserve = [os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC) for _ in range(RESERVE)]
        self._tasks = TaskSet()
        self._reading: dict[socket.socket, asyncio.Task] = {}  # still sending their request, oldest first
        self._pause = PAUSE_MIN
        self._resume: asyncio.TimerHandle | None = None
        self.dropped = 0
        """Connections closed to stay within MAX_CONNECTIONS."""
        registry.register(_DroppedCollector(self))
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(MAX_CONNECTIONS):
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                self._pause = PAUSE_MIN
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    continue  # ECONNABORTED and the like: that one connection only
                if self._reserve:
                    while self._reserve:  # make room for this request
                        os.close(self._reserve.pop())
                    continue
                self._pause_accepts()
                return
            if len(self._tasks) >= MAX_CONNECTIONS and not self._drop_oldest():
                conn.close()
                continue
            conn.setblocking(False)
            task = self._reading[conn] = self._tasks.spawn(self._serve(conn))
            task.add_done_callback(self._refill)

    def _drop_oldest(self) -> bool:
        """Make room: cancel the oldest connection still sending its request."""
        self.dropped += 1
        _throttle.warning("full", "metrics listener: %d connections open, the most it serves: closing the oldest "
                          "that has not sent its request", MAX_CONNECTIONS)
        oldest = next(iter(self._reading), None)
        if oldest is None:
            return False
        self._reading.pop(oldest).cancel()
        return True

    def _pause_accepts(self) -> None:
        """Out of descriptors, the reserve in use: stop watching the listener for a while (the
        kernel queues connections meanwhile), rather than spin on it."""
        _throttle.error("emfile", "metrics listener: out of descriptors; accepting again in %gs", self._pause)
        self.loop.remove_reader(self.sock.fileno())
        self._resume = self.loop.call_later(self._pause, self._resume_accepts)
        self._pause = min(self._pause * 2, PAUSE_MAX)

    def _resume_accepts(self) -> None:
        self._resume = None
        self.loop.add_reader(self.sock.fileno(), self._accept)

    def _refill(self, task: asyncio.Task) -> None:
        while len(self._reserve) < RESERVE:
            try:
                self._reserve.append(os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC))
            except OSError:
                break  # still out of descriptors: the next request tries again

    async def _serve(self, conn: socket.socket) -> None:
        loop = self.loop
        try:
            async with asyncio.timeout(REQUEST_TIMEOUT):
                request = b""
                while b"\r\n\r\n" not in request and b"\n\n" not in request:
                    chunk = await loop.sock_recv(conn, 4096)
                    if not chunk or len(request) > MAX_REQUEST:
                        return
                    request += chunk
                self._reading.pop(conn, None)
                status, body, ctype = await self._answer(request)
                head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                await loop.sock_sendall(conn, head + body)
        except (TimeoutError, OSError):
            pass
        finally:
            self._reading.pop(conn, None)
            conn.close()

    async def _answer(self, request: bytes) -> tuple[str, bytes, str]:
        try:
            method, target = request.split(b" ", 2)[:2]
        except ValueError:
            return "400 Bad Request", b"bad request\n", "text/plain"
        if method not in (b"GET", b"HEAD"):
            return "405 Method Not Allowed", b"GET only\n", "text/plain"
        path = target.split(b"?", 1)[0].decode("latin-1")
        if path == METRICS_PATH:
            if self.collect is not None:
                await self.collect()
            return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST
        if path == HEALTH_PATH:
            if await self.healthy():
                return "200 OK", b"ok\n", "text/plain"
            return "503 Service Unavailable", b"an event loop does not answer\n", "text/plain"
        if path == READY_PATH:
            ok = self.ready()
            return ("200 OK" if ok else "503 Service Unavailable", b"ready\n" if ok else b"not ready\n", "text/plain")
        if path == "/":
            return "200 OK", b"sniproxy: see /metrics, /healthz, /readyz\n", "text/plain"
        return "404 Not Found", b"not found\n", "text/plain"

    def close(self) -> None:
        if self._resume is not None:
            self._resume.cancel()
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._tasks.cancel_all()
        for fd in self._reserve:
            os.close(fd)
        self._reserve.clear()


class _DroppedCollector:
    def __init__(self, server: MetricsServer):
        self.server = server

    def collect(self) -> list:
        family = CounterMetricFamily("sniproxy_metrics_connections_dropped", "Connections to the metrics listener "
                                     f"closed to keep it within {MAX_CONNECTIONS} at once.")
        family.add_metric([], self.server.dropped)
        return [family]
