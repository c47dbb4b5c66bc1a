"""Prometheus exposition and health checks on the metrics listener.

A collector turns a plain stats snapshot into metric families at scrape time, so the data
path takes no lock. The listener is a small HTTP/1.0-style endpoint on the event loop:

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
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..errors import BindError
from ..hostnames import format_address
from .stats import (
    CONNECT_BUCKETS,
    DURATION_BUCKETS,
    HELLO_BYTES_BUCKETS,
    HELLO_READS_BUCKETS,
    HELLO_RECORDS_BUCKETS,
    HELLO_SECONDS_BUCKETS,
)

log = logging.getLogger("sniproxy.observe.metrics")

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

_HISTOGRAMS = (
    # (snapshot key, metric name, help, buckets)
    ("connect", "sniproxy_upstream_connect_seconds", "Time to connect to the upstream.", CONNECT_BUCKETS),
    ("duration", "sniproxy_connection_duration_seconds", "Lifetime of proxied connections.", DURATION_BUCKETS),
    ("hello_bytes", "sniproxy_hello_size_bytes", "Size of the ClientHello records.", HELLO_BYTES_BUCKETS),
    ("hello_records", "sniproxy_hello_records", "TLS records the ClientHello came in.", HELLO_RECORDS_BUCKETS),
    ("hello_reads", "sniproxy_hello_reads", "Reads the ClientHello took to arrive.", HELLO_READS_BUCKETS),
    ("hello_seconds", "sniproxy_hello_seconds", "Time from accept to a complete ClientHello.", HELLO_SECONDS_BUCKETS),
)


def _buckets(bounds: tuple[float, ...], counts: list) -> tuple[list, float]:
    """Per-bucket counts plus sum -> Prometheus cumulative buckets and the sum."""
    out, acc = [], 0
    for bound, n in zip([*bounds, float("inf")], counts[:-1], strict=True):
        acc += n
        out.append(("+Inf" if bound == float("inf") else repr(bound), acc))
    return out, counts[-1]


class StatsCollector:
    """Turns a stats snapshot (one process, or several merged) into metric families."""

    def __init__(self, snapshot: Callable[[], dict]):
        self.snapshot = snapshot

    def collect(self) -> Iterable:
        snap = self.snapshot()
        routes = snap["routes"]
        b = CounterMetricFamily("sniproxy_bytes", "Bytes forwarded, ClientHello included.", labels=["route", "direction"])
        c = CounterMetricFamily("sniproxy_connections", "Connections routed to an upstream.", labels=["route"])
        a = GaugeMetricFamily("sniproxy_connections_active", "Connections being proxied now.", labels=["route"])
        pq = CounterMetricFamily("sniproxy_hello_pq", "Routed hellos offering a post-quantum hybrid key share, "
                                 "by the first such group.", labels=["route", "group"])
        ech = CounterMetricFamily("sniproxy_hello_ech", "Routed hellos with an encrypted_client_hello extension "
                                  "(ECH or its GREASE).", labels=["route"])
        histograms = [HistogramMetricFamily(name, text, labels=["route"]) for _, name, text, _ in _HISTOGRAMS]
        for name in sorted(routes):
            r = routes[name]
            b.add_metric([name, "to_upstream"], r["to_upstream"])
            b.add_metric([name, "to_client"], r["to_client"])
            c.add_metric([name], r["connections"])
            a.add_metric([name], r["active"])
            for family, (key, _, _, bounds) in zip(histograms, _HISTOGRAMS, strict=True):
                family.add_metric([name], *_buckets(bounds, r[key]))
            for group, n in sorted(r["hello_pq"].items()):
                pq.add_metric([name, group], n)
            ech.add_metric([name], r["hello_ech"])
        rej = CounterMetricFamily("sniproxy_connections_rejected", "Connections refused, by reason.", labels=["reason"])
        for reason, n in sorted(snap["rejected"].items()):
            rej.add_metric([reason], n)
        acc = CounterMetricFamily("sniproxy_accept_errors", "Failed accept(2) calls on the listeners, by errno "
                                  "(EMFILE: out of file descriptors).", labels=["errno"])
        for name, n in sorted(snap["accept_errors"].items()):
            acc.add_metric([name], n)
        q = CounterMetricFamily("sniproxy_dns_queries", "DNS lookups sent for upstream names, by result.", labels=["result"])
        for result, n in sorted(snap["dns"].items()):
            q.add_metric([result], n)
        hits = CounterMetricFamily("sniproxy_dns_cache_hits", "Upstream names answered from the cache.")
        hits.add_metric([], snap["dns_cache_hits"])
        stale = CounterMetricFamily("sniproxy_dns_stale_served", "Upstream names answered at once from a stale "
                                    "entry, while DNS fails (RFC 8767).")
        stale.add_metric([], snap["dns_stale_served"])
        return [b, c, a, rej, *histograms, pq, ech, acc, q, hits, stale]


_TICKS = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _boot_time() -> float:
    with open("/proc/stat", "rb") as f:
        for line in f:
            if line.startswith(b"btime "):
                return float(line.split()[1])
    return 0.0


def _max_fds(pid: int) -> int:
    with open(f"/proc/{pid}/limits", "rb") as f:
        for line in f:
            if line.startswith(b"Max open files"):
                return int(line.split()[3])
    return 0


class ProcessTreeCollector:
    """The standard ``process_*`` metrics, over this process and its workers.

    CPU, memory and open descriptors are summed over the tree: one scrape address describes
    one service, and its cost is the sum. Descriptor limits are per process, though, so the
    limit is reported as one process's (they are all the same), and ``sniproxy_fd_usage_ratio``
    gives the highest open/limit ratio of any process: that is what runs out first."""

    def __init__(self, pids: Callable[[], Iterable[int]]):
        self.pids = pids
        self.boot = _boot_time()

    def collect(self) -> Iterable:
        cpu = rss = fds = 0.0
        start = 0.0
        limit = 0
        ratio = 0.0
        for i, pid in enumerate(self.pids()):
            try:
                with open(f"/proc/{pid}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                open_fds = len(os.listdir(f"/proc/{pid}/fd"))
                max_fds = _max_fds(pid)
            except OSError as exc:
                if exc.errno == errno.EMFILE:  # we could not open /proc: this process is at its limit
                    ratio = 1.0
                continue  # else a worker that just exited
            cpu += (int(fields[11]) + int(fields[12])) / _TICKS  # utime + stime
            rss += int(fields[21]) * _PAGE
            fds += open_fds
            if i == 0:
                start = self.boot + int(fields[19]) / _TICKS
                limit = max_fds
            if max_fds:
                ratio = max(ratio, open_fds / max_fds)
        families = []
        for name, kind, text, value in (
            ("process_cpu_seconds", CounterMetricFamily, "User and system CPU time, summed over the process tree.", cpu),
            ("process_resident_memory_bytes", GaugeMetricFamily, "Resident memory, summed over the process tree.", rss),
            ("process_open_fds", GaugeMetricFamily, "Open file descriptors, summed over the process tree.", fds),
            ("process_max_fds", GaugeMetricFamily, "RLIMIT_NOFILE of each process.", limit),
            ("process_start_time_seconds", GaugeMetricFamily, "Start of the main process, in seconds since the epoch.",
             start),
            ("sniproxy_fd_usage_ratio", GaugeMetricFamily, "Highest share of its descriptor limit any process uses.",
             ratio),
        ):
            family = kind(name, text)
            family.add_metric([], value)
            families.append(family)
        return families


def make_registry(snapshot: Callable[[], dict], *collectors: object) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    for collector in collectors:
        registry.register(collector)  # type: ignore[arg-type]
    return registry


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
        self._tasks: set[asyncio.Task] = set()
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
            task = self.loop.create_task(self._serve(conn))
            self._tasks.add(task)
            task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task) -> None:
        self._tasks.discard(task)
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
        for task in self._tasks:
            task.cancel()
        for fd in self._reserve:
            os.close(fd)
        self._reserve.clear()
