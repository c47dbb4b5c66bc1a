"""Plain counters, bumped on the hot path with no lock and read at scrape time.

A ``snapshot()`` is a plain dict, so snapshots from several worker processes can be summed
with ``merge`` before a Prometheus collector turns them into metric families.
"""

from __future__ import annotations

from bisect import bisect_left as _bisect
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
#: Kinds of whole hellos (size, post-quantum group, ECH) a route counts before folding them.
WHOLE_KINDS = 64


class Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]):
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        # RouteStats writes these two lines out where a connection observes, to save a call.
        self.counts[_bisect(self.bounds, value)] += 1
        self.total += value


class LiveConnection(Protocol):
    """What a forwarding connection exposes so its bytes count before it closes."""

    @property
    def route_stats(self) -> RouteStats: ...

    @property
    def to_upstream(self) -> int: ...

    @property
    def to_client(self) -> int: ...


class RouteStats:
    __slots__ = ("name", "connections", "active", "to_upstream", "to_client", "connect", "duration",
                 "hello_bytes", "hello_records", "hello_reads", "hello_seconds", "hello_pq", "hello_ech",
                 "whole")

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
        self.whole: dict[tuple[int, str | None, bool], int] = {}
        """Hellos whole in one record and one read (nearly all), by size, post-quantum group
        and ECH: counted here, one dict entry per kind, and folded into the hello metrics at
        scrape time (as 0 s to arrive: they came with the connection)."""

    # Once or twice per connection each: the histograms' observe is written out in each
    # (a call per value costs more than the bisect).

    def observe_hello(self, size: int, records: int, reads: int, seconds: float, pq_group: str | None,
                      ech: bool) -> None:
        """What a routed ClientHello looked like on the wire, and how long it took to arrive
        (``seconds`` is not read for a hello whole in one record and one read)."""
        if records == 1 and reads == 1:
            key = (size, pq_group, ech)
            whole = self.whole
            n = whole.get(key)
            if n is None and len(whole) >= WHOLE_KINDS:
                self.fold()  # client-chosen sizes: a bounded dict
            whole[key] = (n or 0) + 1
            return
        h = self.hello_bytes
        h.counts[_bisect(h.bounds, size)] += 1
        h.total += size
        self.hello_records.observe(records)
        self.hello_reads.observe(reads)
        h = self.hello_seconds
        h.counts[_bisect(h.bounds, seconds)] += 1
        h.total += seconds
        if pq_group is not None:
            self.hello_pq[pq_group] = self.hello_pq.get(pq_group, 0) + 1
        if ech:
            self.hello_ech += 1

    def fold(self) -> None:
        """Move the whole hellos counted by kind into the hello metrics."""
        for (size, pq_group, ech), n in self.whole.items():
            for h, value in ((self.hello_bytes, size), (self.hello_records, 1), (self.hello_reads, 1),
                             (self.hello_seconds, 0)):
                h.counts[_bisect(h.bounds, value)] += n
                h.total += value * n
            if pq_group is not None:
                self.hello_pq[pq_group] = self.hello_pq.get(pq_group, 0) + n
            if ech:
                self.hello_ech += n
        self.whole.clear()

    def connected(self, seconds: float) -> None:
        """A connection reached its upstream, after ``seconds`` of connecting."""
        self.connections += 1
        self.active += 1
        h = self.connect
        h.counts[_bisect(h.bounds, seconds)] += 1
        h.total += seconds

    def closed(self, seconds: float, to_upstream: int, to_client: int) -> None:
        """A connection that had reached its upstream closed, after ``seconds`` in all."""
        self.active -= 1
        self.to_upstream += to_upstream
        self.to_client += to_client
        h = self.duration
        h.counts[_bisect(h.bounds, seconds)] += 1
        h.total += seconds


class Stats:
    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.rejected: dict[str, int] = {}
        self.dns: dict[str, int] = {}
        self.dns_cache_hits = 0
        self.dns_stale_served = 0  # answers given from a stale entry, without waiting for DNS
        self.accept_errors: dict[str, int] = {}  # errno name -> failed accept(2) calls
        self.hello_limits: dict[str, int] = {}  # reasons.HelloLimit -> hellos refused for it

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

    def snapshot(self, live: Iterable[LiveConnection] = ()) -> dict:
        """The counters as a plain dict, with the running byte counts of ``live`` (the
        connections forwarding now, which the owner lists at scrape time) added in."""
        for rs in self.routes.values():
            rs.fold()
        routes: dict[str, dict[str, Any]] = {
            name: {
                "connections": rs.connections,
                "active": rs.active,
                "to_upstream": rs.to_upstream,
                "to_client": rs.to_client,
                "connect": rs.connect.counts + [rs.connect.total],
                "duration": rs.duration.counts + [rs.duration.total],
                "hello_bytes": rs.hello_bytes.counts + [rs.hello_bytes.total],
                "hello_records": rs.hello_records.counts + [rs.hello_records.total],
                "hello_reads": rs.hello_reads.counts + [rs.hello_reads.total],
                "hello_seconds": rs.hello_seconds.counts + [rs.hello_seconds.total],
                "hello_pq": dict(rs.hello_pq),
                "hello_ech": rs.hello_ech,
            }
            for name, rs in self.routes.items()
        }
        for conn in live:
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
