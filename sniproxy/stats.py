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
    __slots__ = ("name", "connections", "active", "to_upstream", "to_client", "connect", "duration")

    def __init__(self, name: str):
        self.name = name
        self.connections = 0
        self.active = 0
        self.to_upstream = 0  # bytes of closed connections; live ones are added at scrape time
        self.to_client = 0
        self.connect = Histogram(CONNECT_BUCKETS)
        self.duration = Histogram(DURATION_BUCKETS)


class Stats:
    def __init__(self) -> None:
        self.routes: dict[str, RouteStats] = {}
        self.rejected: dict[str, int] = {}
        self.dns: dict[str, int] = {}
        self.dns_cache_hits = 0
        self.live: set[Any] = set()
        """Connections with a route, whose running byte counts a scrape adds in."""

    def route(self, name: str) -> RouteStats:
        rs = self.routes.get(name)
        if rs is None:
            rs = self.routes[name] = RouteStats(name)
        return rs

    def reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def dns_result(self, result: str) -> None:
        self.dns[result] = self.dns.get(result, 0) + 1

    def snapshot(self) -> dict:
        routes = {
            name: {
                "connections": rs.connections,
                "active": rs.active,
                "to_upstream": rs.to_upstream,
                "to_client": rs.to_client,
                "connect": rs.connect.counts + [rs.connect.total],
                "duration": rs.duration.counts + [rs.duration.total],
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
        }


def merge(snapshots: Iterable[dict]) -> dict:
    """Sum snapshots of several processes, key by key."""
    out: dict = {"routes": {}, "rejected": {}, "dns": {}, "dns_cache_hits": 0}
    for snap in snapshots:
        for name, r in snap["routes"].items():
            acc = out["routes"].get(name)
            if acc is None:
                out["routes"][name] = {k: (list(v) if isinstance(v, list) else v) for k, v in r.items()}
                continue
            for k, v in r.items():
                if isinstance(v, list):
                    acc[k] = [a + b for a, b in zip(acc[k], v)]
                else:
                    acc[k] += v
        for key in ("rejected", "dns"):
            for k, v in snap[key].items():
                out[key][k] = out[key].get(k, 0) + v
        out["dns_cache_hits"] += snap["dns_cache_hits"]
    return out
