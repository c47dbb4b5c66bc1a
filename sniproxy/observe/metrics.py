"""Prometheus exposition: collectors that turn plain stats snapshots and /proc into metric
families at scrape time, so the data path takes no lock. The HTTP listener that serves them is
``observe.http``.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .stats import (
    CONNECT_BUCKETS,
    DURATION_BUCKETS,
    HELLO_BYTES_BUCKETS,
    HELLO_READS_BUCKETS,
    HELLO_RECORDS_BUCKETS,
    HELLO_SECONDS_BUCKETS,
)

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
        lim = CounterMetricFamily("sniproxy_hello_limit", "ClientHellos refused for a bound on their size, records, "
                                  "reads or counts (each also a bad_hello refusal), by bound.", labels=["limit"])
        for limit, n in sorted(snap["hello_limits"].items()):
            lim.add_metric([limit], n)
        q = CounterMetricFamily("sniproxy_dns_queries", "DNS lookups sent for upstream names, by result.", labels=["result"])
        for result, n in sorted(snap["dns"].items()):
            q.add_metric([result], n)
        hits = CounterMetricFamily("sniproxy_dns_cache_hits", "Upstream names answered from the cache.")
        hits.add_metric([], snap["dns_cache_hits"])
        stale = CounterMetricFamily("sniproxy_dns_stale_served", "Upstream names answered at once from a stale "
                                    "entry, while DNS fails (RFC 8767).")
        stale.add_metric([], snap["dns_stale_served"])
        waiting = GaugeMetricFamily("sniproxy_handshakes_waiting", "Connections waiting for the rest of their "
                                    "ClientHello (a hello that arrives with the first read never waits).")
        waiting.add_metric([], snap["handshakes_waiting"])
        held = GaugeMetricFamily("sniproxy_hello_memory_bytes", "Bytes held by partial ClientHellos (at most "
                                 "[server] max_hello_memory per process).")
        held.add_metric([], snap["hello_memory"])
        return [b, c, a, rej, lim, waiting, held, *histograms, pq, ech, acc, q, hits, stale]


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
        # Workers that have exited (an old generation, a restart) and been reaped: their CPU
        # stays in the total, or the counter would go backwards when they leave the tree.
        # A worker that exited but is not reaped yet is still in /proc; once reaped, it is here.
        reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu += reaped.ru_utime + reaped.ru_stime
        families = []
        for name, kind, text, value in (
            ("process_cpu_seconds", CounterMetricFamily, "User and system CPU time, summed over the process tree, "
             "exited workers included.", cpu),
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


def make_registry(snapshot: Callable[[], dict], *collectors: Collector) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatsCollector(snapshot))
    for collector in collectors:
        registry.register(collector)
    return registry
