"""Prometheus exposition: a collector that reads plain stats at scrape time, and a tiny
HTTP endpoint on the event loop (no thread, no lock on the data path)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .stats import CONNECT_BUCKETS, DURATION_BUCKETS

log = logging.getLogger("sniproxy.metrics")

#: Paths on the metrics listener. A load balancer's health check asks READY_PATH: 200 while
#: the proxy accepts and is not draining, 503 from the moment SIGTERM arrives.
METRICS_PATH = "/metrics"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"


def _buckets(bounds: tuple[float, ...], counts: list) -> tuple[list, float]:
    """Per-bucket counts plus sum -> Prometheus cumulative buckets and the sum."""
    out, acc = [], 0
    for bound, n in zip(list(bounds) + [float("inf")], counts[:-1]):
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
        ct = HistogramMetricFamily("sniproxy_upstream_connect_seconds", "Time to connect to the upstream.", labels=["route"])
        d = HistogramMetricFamily("sniproxy_connection_duration_seconds", "Lifetime of proxied connections.", labels=["route"])
        for name in sorted(routes):
            r = routes[name]
            b.add_metric([name, "to_upstream"], r["to_upstream"])
            b.add_metric([name, "to_client"], r["to_client"])
            c.add_metric([name], r["connections"])
            a.add_metric([name], r["active"])
            ct.add_metric([name], *_buckets(CONNECT_BUCKETS, r["connect"]))
            d.add_metric([name], *_buckets(DURATION_BUCKETS, r["duration"]))
        rej = CounterMetricFamily("sniproxy_connections_rejected", "Connections refused, by reason.", labels=["reason"])
        for reason, n in sorted(snap["rejected"].items()):
            rej.add_metric([reason], n)
        q = CounterMetricFamily("sniproxy_dns_queries", "DNS lookups sent for upstream names, by result.", labels=["result"])
        for result, n in sorted(snap["dns"].items()):
            q.add_metric([result], n)
        hits = CounterMetricFamily("sniproxy_dns_cache_hits", "Upstream names answered from the cache.")
        hits.add_metric([], snap["dns_cache_hits"])
        return [b, c, a, rej, ct, d, q, hits]


def make_registry(snapshot: Callable[[], dict]) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    return registry


async def start_http(registry: CollectorRegistry, address: str, port: int,
                     before_scrape: Callable[[], Awaitable] | None = None) -> asyncio.AbstractServer:
    """Serve ``GET /metrics`` (and ``/`` as a liveness probe) on the running loop.

    ``before_scrape`` lets a supervisor collect its workers' snapshots first."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(5):
                request = await reader.readuntil(b"\r\n\r\n")
            method, path = request.split(b" ", 2)[:2]
            if method != b"GET":
                status, body, ctype = b"405 Method Not Allowed", b"GET only\n", b"text/plain"
            elif path.split(b"?")[0] == b"/metrics":
                if before_scrape is not None:
                    await before_scrape()
                status, body, ctype = b"200 OK", generate_latest(registry), CONTENT_TYPE_LATEST.encode()
            elif path == b"/":
                status, body, ctype = b"200 OK", b"sniproxy: see /metrics\n", b"text/plain"
            else:
                status, body, ctype = b"404 Not Found", b"not found\n", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, address, port, limit=16 * 1024, reuse_address=True)
