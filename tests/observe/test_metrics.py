"""The Prometheus collector, read back through prometheus_client's own text parser."""

from __future__ import annotations

import functools
import math

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sniproxy.observe.metrics import make_registry
from sniproxy.observe.stats import CONNECT_BUCKETS, DURATION_BUCKETS, Stats, merge


class Live:
    def __init__(self, route_stats, to_upstream, to_client):
        self.route_stats, self.to_upstream, self.to_client = route_stats, to_upstream, to_client


def scrape(snapshot) -> dict:
    text = generate_latest(make_registry(snapshot)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def samples(family, name=None) -> dict:
    """{frozenset(labels): value} for one sample name of a family."""
    return {
        frozenset(s.labels.items()): s.value
        for s in family.samples
        if name is None or s.name == name
    }


def key(**labels) -> frozenset:
    return frozenset(labels.items())


CONNECT_TIMES = (0.0004, 0.0005, 0.003, 0.003, 0.2, 6.0)
DURATIONS = (0.2, 42.0, 7200.0)


@pytest.fixture
def stats() -> Stats:
    s = Stats()
    api, dkr = s.route("ecr-api"), s.route("ecr-dkr")
    api.connections, api.active, api.to_upstream, api.to_client = 6, 1, 1000, 20_000
    for t in CONNECT_TIMES:
        api.connect.observe(t)
    for d in DURATIONS:
        api.duration.observe(d)
    dkr.connections = 2
    dkr.connect.observe(0.01)
    # A connection forwarding now, as the server lists its own at scrape time:
    s.snapshot = functools.partial(s.snapshot, [Live(api, 11, 22)])
    s.reject("no_route")
    s.reject("not_tls")
    s.reject("not_tls")
    s.dns_result("ok")
    s.dns_result("nxdomain")
    s.dns_cache_hits = 9
    return s


def test_names_types_and_help(stats):
    families = scrape(stats.snapshot)
    assert {name: f.type for name, f in families.items()} == {
        "sniproxy_bytes": "counter",
        "sniproxy_connections": "counter",
        "sniproxy_connections_active": "gauge",
        "sniproxy_connections_rejected": "counter",
        "sniproxy_hello_limit": "counter",
        "sniproxy_handshakes_waiting": "gauge",
        "sniproxy_hello_memory_bytes": "gauge",
        "sniproxy_upstream_connect_seconds": "histogram",
        "sniproxy_connection_duration_seconds": "histogram",
        "sniproxy_hello_size_bytes": "histogram",
        "sniproxy_hello_records": "histogram",
        "sniproxy_hello_reads": "histogram",
        "sniproxy_hello_seconds": "histogram",
        "sniproxy_hello_pq": "counter",
        "sniproxy_hello_ech": "counter",
        "sniproxy_accept_errors": "counter",
        "sniproxy_dns_queries": "counter",
        "sniproxy_dns_cache_hits": "counter",
        "sniproxy_dns_stale_served": "counter",
    }
    assert all(f.documentation for f in families.values())
    # counters are exposed with the _total suffix the context names
    assert {s.name for s in families["sniproxy_bytes"].samples} == {"sniproxy_bytes_total"}
    assert {s.name for s in families["sniproxy_connections_rejected"].samples} == {"sniproxy_connections_rejected_total"}
    assert {s.name for s in families["sniproxy_dns_queries"].samples} == {"sniproxy_dns_queries_total"}


def test_counters_and_labels(stats):
    f = scrape(stats.snapshot)
    assert samples(f["sniproxy_bytes"]) == {
        key(route="ecr-api", direction="to_upstream"): 1000 + 11,  # live bytes included
        key(route="ecr-api", direction="to_client"): 20_000 + 22,
        key(route="ecr-dkr", direction="to_upstream"): 0,
        key(route="ecr-dkr", direction="to_client"): 0,
    }
    assert samples(f["sniproxy_connections"]) == {key(route="ecr-api"): 6, key(route="ecr-dkr"): 2}
    assert samples(f["sniproxy_connections_active"]) == {key(route="ecr-api"): 1, key(route="ecr-dkr"): 0}
    assert samples(f["sniproxy_connections_rejected"]) == {key(reason="no_route"): 1, key(reason="not_tls"): 2}
    assert samples(f["sniproxy_dns_queries"]) == {key(result="ok"): 1, key(result="nxdomain"): 1}
    assert samples(f["sniproxy_dns_cache_hits"]) == {key(): 9}


def check_histogram(family, route, bounds, observed):
    buckets = {
        s.labels["le"]: s.value
        for s in family.samples
        if s.name == family.name + "_bucket" and s.labels["route"] == route
    }
    les = list(buckets)
    assert les[-1] == "+Inf"
    assert [float(le) for le in les[:-1]] == list(bounds)
    values = list(buckets.values())
    assert values == sorted(values), "buckets must be cumulative"
    for le, value in buckets.items():
        assert value == sum(1 for v in observed if v <= float(le)), le
    assert samples(family, family.name + "_count")[key(route=route)] == len(observed)
    assert samples(family, family.name + "_sum")[key(route=route)] == pytest.approx(sum(observed))


def test_histograms_are_cumulative(stats):
    f = scrape(stats.snapshot)
    check_histogram(f["sniproxy_upstream_connect_seconds"], "ecr-api", CONNECT_BUCKETS, CONNECT_TIMES)
    check_histogram(f["sniproxy_upstream_connect_seconds"], "ecr-dkr", CONNECT_BUCKETS, (0.01,))
    check_histogram(f["sniproxy_connection_duration_seconds"], "ecr-api", DURATION_BUCKETS, DURATIONS)
    check_histogram(f["sniproxy_connection_duration_seconds"], "ecr-dkr", DURATION_BUCKETS, ())


def test_each_scrape_reads_a_new_snapshot(stats):
    registry = make_registry(stats.snapshot)
    before = generate_latest(registry).decode()
    stats.route("ecr-api").connections += 1
    stats.reject("no_route")
    text = generate_latest(registry).decode()
    assert text != before  # nothing is cached between scrapes
    after = {f.name: f for f in text_string_to_metric_families(text)}
    assert samples(after["sniproxy_connections"])[key(route="ecr-api")] == 7
    assert samples(after["sniproxy_connections_rejected"])[key(reason="no_route")] == 2


def test_merged_snapshots(stats):
    other = Stats()
    other.route("ecr-api").connections = 4
    other.route("ecr-api").connect.observe(0.003)
    other.route("ecr-s3").to_client = 5
    other.reject("not_tls")
    other.dns_cache_hits = 1
    f = scrape(lambda: merge([stats.snapshot(), other.snapshot()]))
    assert samples(f["sniproxy_connections"]) == {key(route="ecr-api"): 10, key(route="ecr-dkr"): 2, key(route="ecr-s3"): 0}
    assert samples(f["sniproxy_bytes"])[key(route="ecr-s3", direction="to_client")] == 5
    assert samples(f["sniproxy_connections_rejected"])[key(reason="not_tls")] == 3
    assert samples(f["sniproxy_dns_cache_hits"]) == {key(): 10}
    check_histogram(f["sniproxy_upstream_connect_seconds"], "ecr-api", CONNECT_BUCKETS, CONNECT_TIMES + (0.003,))


def test_hello_diagnostics_per_route(stats):
    api = stats.route("ecr-api")
    api.observe_hello(517, 1, 1, 0.0002, None, False)
    api.observe_hello(1739, 1, 2, 0.004, "X25519MLKEM768", True)
    api.observe_hello(2067, 3, 5, 0.02, "X25519MLKEM768", True)
    stats.accept_error("EMFILE")
    stats.accept_error("EMFILE")
    f = scrape(stats.snapshot)
    from sniproxy.observe.stats import HELLO_BYTES_BUCKETS, HELLO_READS_BUCKETS, HELLO_RECORDS_BUCKETS, HELLO_SECONDS_BUCKETS

    check_histogram(f["sniproxy_hello_size_bytes"], "ecr-api", HELLO_BYTES_BUCKETS, (517, 1739, 2067))
    check_histogram(f["sniproxy_hello_records"], "ecr-api", HELLO_RECORDS_BUCKETS, (1, 1, 3))
    check_histogram(f["sniproxy_hello_reads"], "ecr-api", HELLO_READS_BUCKETS, (1, 2, 5))
    # the first hello was whole in one read: it came with the connection, and counts 0 s
    check_histogram(f["sniproxy_hello_seconds"], "ecr-api", HELLO_SECONDS_BUCKETS, (0, 0.004, 0.02))
    assert samples(f["sniproxy_hello_pq"]) == {key(route="ecr-api", group="X25519MLKEM768"): 2}
    assert samples(f["sniproxy_hello_ech"]) == {key(route="ecr-api"): 2, key(route="ecr-dkr"): 0}
    assert samples(f["sniproxy_accept_errors"]) == {key(errno="EMFILE"): 2}
    merged = scrape(lambda: merge([stats.snapshot(), stats.snapshot()]))
    assert samples(merged["sniproxy_hello_pq"]) == {key(route="ecr-api", group="X25519MLKEM768"): 4}
    assert samples(merged["sniproxy_accept_errors"]) == {key(errno="EMFILE"): 4}


def test_empty_stats_still_expose_every_family():
    f = scrape(Stats().snapshot)
    assert len(f) == 19
    unlabelled = ("sniproxy_dns_cache_hits", "sniproxy_dns_stale_served", "sniproxy_handshakes_waiting",
                  "sniproxy_hello_memory_bytes")
    assert all(samples(f[name]) == {key(): 0} for name in unlabelled)
    assert all(not fam.samples for name, fam in f.items() if name not in unlabelled)


def test_label_values_are_escaped():
    s = Stats()
    s.reject('we"ird\\reason\n')
    f = scrape(s.snapshot)
    assert samples(f["sniproxy_connections_rejected"]) == {key(reason='we"ird\\reason\n'): 1}


def test_no_nan_or_negative_values(stats):
    for family in scrape(stats.snapshot).values():
        for s in family.samples:
            assert not math.isnan(s.value) and s.value >= 0, s


def test_process_metrics_sum_the_tree_and_report_the_tightest_fd_ratio():
    """Over this process and a child holding many descriptors: CPU, memory and fds add up;
    the ratio is the child's (the tightest), not the sum over the sum."""
    import os
    import subprocess
    import sys

    from prometheus_client import CollectorRegistry

    from sniproxy.observe.metrics import ProcessTreeCollector

    child = subprocess.Popen(
        [sys.executable, "-c", "import os,resource,sys; resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256));"
         " fds=[os.open(os.devnull, os.O_RDONLY) for _ in range(200)]; print('ok', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ok"
        registry = CollectorRegistry(auto_describe=False)
        registry.register(ProcessTreeCollector(lambda: (os.getpid(), child.pid, 999_999_999)))  # one pid is gone
        f = {fam.name: fam for fam in text_string_to_metric_families(generate_latest(registry).decode())}
        value = {name: fam.samples[0].value for name, fam in f.items()}
        mine, theirs = len(os.listdir("/proc/self/fd")), len(os.listdir(f"/proc/{child.pid}/fd"))
        assert theirs >= 200
        assert abs(value["process_open_fds"] - (mine + theirs)) <= 2
        assert value["sniproxy_fd_usage_ratio"] == pytest.approx(theirs / 256, abs=0.01)
        assert value["process_resident_memory_bytes"] > 2 * 10_000_000  # two Python processes
        assert value["process_cpu_seconds"] > 0
        assert value["process_max_fds"] == __import__("resource").getrlimit(__import__("resource").RLIMIT_NOFILE)[0]
        assert value["process_start_time_seconds"] > 1.7e9
    finally:
        child.kill()
        child.wait()
