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
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..addresses import format_address
from ..errors import BindError
from ..tasks import TaskSet

log = logging.getLogger(__name__)

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
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno not in (errno.EMFILE, errno.ENFILE):
                    continue
                if not self._reserve:
                    return  # the reserve is serving a request; the kernel queues this one
                while self._reserve:  # make room for this request
                    os.close(self._reserve.pop())
                continue
            conn.setblocking(False)
            self._tasks.spawn(self._serve(conn)).add_done_callback(self._refill)

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
                status, body, ctype = await self._answer(request)
                head = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                        "Connection: close\r\n\r\n").encode()
                await loop.sock_sendall(conn, head + body)
        except (TimeoutError, OSError):
            pass
        finally:
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
        self.loop.remove_reader(self.sock.fileno())
        self.sock.close()
        self._tasks.cancel_all()
        for fd in self._reserve:
            os.close(fd)
        self._reserve.clear()
