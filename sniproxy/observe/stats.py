"""Plain counters, bumped on the hot path with no lock and read at scrape time.

A ``snapshot()`` is a plain dict, so snapshots from several worker processes can be summed
with ``merge`` before a Prometheus collector turns them into metric families.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any, Protocol

CONNECT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0)
#: ClientHello sizes: classic hellos are ~500 B, post-quantum ones ~1.8-2 KB (past one
#: 1500-byte segment), and a record holds at most 16 KiB.
HELLO_BYTES_BUCKETS = (256.0, 512.0, 1024.0, 1500.0, 2048.0, 4096.0, 16384.0, 65536.0)
HELLO_RECORDS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 8.0)
HELLO_READS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 8.0, 16.0)
#: From accept to a complete hello.
HELLO_SECONDS_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value


class LiveConnection(Protocol):
    """What a connection exposes so its bytes count before it closes."""

    route_stats: RouteStats | None
    to_upstream: int
    to_client: int


class RouteStats:
    __slots__ = ("name", "connections", "active", "to_upstream", "to_client", "connect", "duration",
                 "hello_bytes", "hello_records", "hello_reads", "hello_seconds", "hello_pq", "hello_ech",
                 "hello_whole")

    def __init__(self, name: str):
        self.name = name
        self.connections = 0
        self.active = 0
        self.to_upstream = 0  # bytes of closed connections; live ones are added at scrape time
        self.to_client = 0
        self.connect = Histogram(CONNECT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)
        self.hello_bytes = Histogram(HELLO_BYTES_BUCKETS)
        self.hello_records = Histogram(HELLO_RECORDS_BUCKETS)
        self.hello_reads = Histogram(HELLO_READS_BUCKETS)
        self.hello_seconds = Histogram(HELLO_SECONDS_BUCKETS)
        self.hello_pq: dict[str, int] = {}  # group name -> hellos offering its key share
        self.hello_ech = 0
        self.hello_whole = 0
        """Hellos in one record and one read (nearly all): counted here, and folded into the
        records and reads histograms at scrape time, not observed one by one."""

    def observe_hello(self, size: int, records: int, reads: int, seconds: float, pq_group: str | None,
                      ech: bool) -> None:
        """What a routed ClientHello looked like on the wire, and how long it took to arrive."""
        self.hello_bytes.observe(size)
        if records == 1 and reads == 1:
            self.hello_whole += 1
        else:
            self.hello_records.observe(records)
            self.hello_reads.observe(reads)
        self.hello_seconds.observe(seconds)
        if pq_group is not None:
            self.hello_pq[pq_group] = self.hello_pq.get(pq_group, 0) + 1
        if ech:
            self.hello_ech += 1


class Stats:
    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.rejected: dict[str, int] = {}
        self.dns: dict[str, int] = {}
        self.dns_cache_hits = 0
        self.dns_stale_served = 0  # answers given from a stale entry, without waiting for DNS
        self.accept_errors: dict[str, int] = {}  # errno name -> failed accept(2) calls
        self.hello_limits: dict[str, int] = {}  # reasons.HelloLimit -> hellos refused for it
        self.live: set[Any] = set()
        """Connections with a route, whose running byte counts a scrape adds in."""

    def route(self, name: str) -> RouteStats:
        rs = self.routes.get(name)
        if rs is None:
            rs = self.routes[name] = RouteStats(name)
        return rs

    def reject(self, reason: str) -> None:
        """Count a refusal by its ``reasons.Refusal``."""
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def hello_limit(self, limit: str) -> None:
        self.hello_limits[limit] = self.hello_limits.get(limit, 0) + 1

    def dns_result(self, result: str) -> None:
        self.dns[result] = self.dns.get(result, 0) + 1

    def accept_error(self, name: str) -> None:
        self.accept_errors[name] = self.accept_errors.get(name, 0) + 1

    def snapshot(self) -> dict:
        routes = {
            name: {
                "connections": rs.connections,
                "active": rs.active,
                "to_upstream": rs.to_upstream,
                "to_client": rs.to_client,
                "connect": rs.connect.counts + [rs.connect.total],
                "duration": rs.duration.counts + [rs.duration.total],
                "hello_bytes": rs.hello_bytes.counts + [rs.hello_bytes.total],
                "hello_records": _with_ones(rs.hello_records, rs.hello_whole),
                "hello_reads": _with_ones(rs.hello_reads, rs.hello_whole),
                "hello_seconds": rs.hello_seconds.counts + [rs.hello_seconds.total],
                "hello_pq": dict(rs.hello_pq),
                "hello_ech": rs.hello_ech,
            }
            for name, rs in self.routes.items()
        }
        for conn in list(self.live):
            r = routes[conn.route_stats.name]
            r["to_upstream"] += conn.to_upstream
            r["to_client"] += conn.to_client
        return {
            "routes": routes,
            "rejected": dict(self.rejected),
            "dns": dict(self.dns),
            "dns_cache_hits": self.dns_cache_hits,
            "dns_stale_served": self.dns_stale_served,
            "accept_errors": dict(self.accept_errors),
            "hello_limits": dict(self.hello_limits),
            **dict.fromkeys(GAUGES, 0),  # the server fills them in: they are the handshake table's
        }


#: Snapshot keys that are gauges (a process's present, not a count): an exited worker's go to 0.
GAUGES = ("handshakes_waiting", "hello_memory")


def _with_ones(histogram: Histogram, ones: int) -> list:
    """A histogram's counts and total, with ``ones`` observations of 1 added (the first
    bucket of the records and reads histograms is 1)."""
    counts = list(histogram.counts)
    counts[bisect_left(histogram.bounds, 1)] += ones
    return counts + [histogram.total + ones]


def empty_snapshot() -> dict:
    return {"routes": {}, "rejected": {}, "dns": {}, "dns_cache_hits": 0, "dns_stale_served": 0, "accept_errors": {},
            "hello_limits": {}, **dict.fromkeys(GAUGES, 0)}


def _add(acc: Any, value: Any) -> Any:
    """Sum two snapshot values of the same shape: numbers, bucket lists, or dicts of numbers."""
    if isinstance(value, list):
        return [a + b for a, b in zip(acc, value, strict=True)] if acc is not None else list(value)
    if isinstance(value, dict):
        out = dict(acc) if acc is not None else {}
        for k, v in value.items():
            out[k] = _add(out.get(k), v)
        return out
    return value if acc is None else acc + value


def merge(snapshots: Iterable[dict]) -> dict:
    """Sum snapshots of several processes, key by key."""
    out = empty_snapshot()
    for snap in snapshots:
        for key, value in snap.items():
            out[key] = _add(out.get(key), value)
    return out
