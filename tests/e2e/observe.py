"""Reading what the proxy says about itself: /metrics (parsed with prometheus_client's own
parser) and its JSON access log, once every connection has finished."""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families

from .procs import wait_until
from .world import Proxy

ROUTE_BY_NAME_KIND = {"api": "ecr-api", "dkr": "ecr-dkr", "s3": "ecr-s3"}


@dataclass(frozen=True)
class Snapshot:
    samples: dict[tuple[str, frozenset], float]
    log: list[dict]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out = {}
        for (sample, labels), value in self.samples.items():
            if sample == name:
                out[dict(labels)[label]] = value
        return out

    def bytes(self, route: str) -> tuple[int, int]:
        return (int(self.value("sniproxy_bytes_total", route=route, direction="to_upstream")),
                int(self.value("sniproxy_bytes_total", route=route, direction="to_client")))


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def settled(proxy: Proxy, timeout: float = 15.0) -> Snapshot:
    """Wait until no connection is open and the access log holds one line for every
    connection the metrics counted (routed or refused); return both."""
    def look() -> Snapshot | None:
        proxy.service.check_alive()
        snap = Snapshot(parse(proxy.metrics_text()), proxy.access_log())
        active = sum(snap.by_label("sniproxy_connections_active", "route").values())
        counted = (sum(snap.by_label("sniproxy_connections_total", "route").values())
                   + sum(snap.by_label("sniproxy_connections_rejected_total", "reason").values()))
        return snap if active == 0 and counted == len(snap.log) else None
    return wait_until(look, timeout, "the proxy to settle (no active connection, "
                                     "one access-log line per counted connection)")
