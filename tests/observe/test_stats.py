"""Plain counters: histograms, snapshots that include live connections' bytes, and merging."""

import copy

import pytest

from sniproxy.observe.stats import CONNECT_BUCKETS, DURATION_BUCKETS, Histogram, RouteStats, Stats, empty_snapshot, merge


class Live:
    """The three attributes stats reads from a running connection (stats.LiveConnection)."""

    def __init__(self, route_stats: RouteStats, to_upstream: int, to_client: int):
        self.route_stats = route_stats
        self.to_upstream = to_upstream
        self.to_client = to_client


def test_histogram_buckets_are_upper_inclusive():
    h = Histogram((0.1, 1.0, 10.0))
    for v in (0.0, 0.1, 0.10001, 1.0, 9.99, 10.0, 10.01, 1e9):
        h.observe(v)
    assert h.counts == [2, 2, 2, 2]  # (<=0.1, <=1, <=10, +Inf)
    assert h.total == pytest.approx(sum((0.0, 0.1, 0.10001, 1.0, 9.99, 10.0, 10.01, 1e9)))


def test_bucket_bounds_are_sorted():
    assert list(CONNECT_BUCKETS) == sorted(set(CONNECT_BUCKETS))
    assert list(DURATION_BUCKETS) == sorted(set(DURATION_BUCKETS))


def test_route_is_created_once():
    s = Stats()
    assert s.route("a") is s.route("a")
    assert s.route("a").name == "a"


def test_counters():
    s = Stats()
    for reason in ("no_route", "no_route", "not_tls"):
        s.reject(reason)
    s.dns_result("ok")
    s.dns_result("nxdomain")
    s.dns_result("ok")
    s.dns_cache_hits += 4
    snap = s.snapshot()
    assert snap["rejected"] == {"no_route": 2, "not_tls": 1}
    assert snap["dns"] == {"ok": 2, "nxdomain": 1}
    assert snap["dns_cache_hits"] == 4


def test_empty_snapshot():
    assert Stats().snapshot() == {"routes": {}, "rejected": {}, "dns": {}, "dns_cache_hits": 0, "dns_stale_served": 0,
                                     "accept_errors": {}, "hello_limits": {}, "handshakes_waiting": 0,
                                     "hello_memory": 0} == empty_snapshot()


def make_stats() -> tuple[Stats, RouteStats, RouteStats]:
    s = Stats()
    api, dkr = s.route("ecr-api"), s.route("ecr-dkr")
    api.connections, api.active = 5, 2
    api.to_upstream, api.to_client = 1000, 50_000  # closed connections
    api.connect.observe(0.002)
    api.connect.observe(7.0)
    api.duration.observe(0.5)
    dkr.connections = 1
    return s, api, dkr


def test_snapshot_includes_live_connections_running_bytes():
    s, api, dkr = make_stats()
    live = [Live(api, 300, 4000), Live(api, 7, 8), Live(dkr, 1, 2)]
    snap = s.snapshot(live)
    r = snap["routes"]["ecr-api"]
    assert (r["to_upstream"], r["to_client"]) == (1000 + 300 + 7, 50_000 + 4000 + 8)
    assert (r["connections"], r["active"]) == (5, 2)
    assert (snap["routes"]["ecr-dkr"]["to_upstream"], snap["routes"]["ecr-dkr"]["to_client"]) == (1, 2)
    # the running bytes are added to the snapshot, not folded into the counters
    assert (api.to_upstream, api.to_client) == (1000, 50_000)
    assert s.snapshot(live) == snap


def test_snapshot_sees_bytes_grow_while_connection_runs():
    s, api, _ = make_stats()
    conn = Live(api, 10, 10)
    first = s.snapshot([conn])["routes"]["ecr-api"]["to_upstream"]
    conn.to_upstream += 90
    assert s.snapshot([conn])["routes"]["ecr-api"]["to_upstream"] == first + 90
    # it closes: its bytes move into the route counters, and are counted once
    api.to_upstream += conn.to_upstream
    assert s.snapshot()["routes"]["ecr-api"]["to_upstream"] == first + 90


def test_snapshot_histograms_are_counts_then_sum():
    s, api, _ = make_stats()
    r = s.snapshot()["routes"]["ecr-api"]
    assert len(r["connect"]) == len(CONNECT_BUCKETS) + 2
    assert r["connect"][CONNECT_BUCKETS.index(0.0025)] == 1
    assert r["connect"][len(CONNECT_BUCKETS)] == 1  # 7 s is past the last bound: +Inf
    assert r["connect"][-1] == pytest.approx(7.002)
    assert sum(r["duration"][:-1]) == 1 and r["duration"][-1] == 0.5


def test_snapshot_is_a_copy():
    s, api, _ = make_stats()
    snap = s.snapshot()
    kept = copy.deepcopy(snap)
    api.connect.observe(0.01)
    s.reject("x")
    api.connections += 1
    assert snap == kept
    snap["routes"]["ecr-api"]["connect"][0] = 999
    assert api.connect.counts[0] == 0


def test_merge_sums_two_snapshots():
    s1, api1, _ = make_stats()
    s1.reject("no_route")
    s1.dns_result("ok")
    s1.dns_cache_hits = 3
    s2 = Stats()
    api2, s3route = s2.route("ecr-api"), s2.route("ecr-s3")
    api2.connections, api2.to_upstream = 2, 10
    api2.connect.observe(0.002)
    s3route.connections = 9
    s2.reject("no_route")
    s2.reject("not_tls")
    s2.dns_result("servfail")
    s2.dns_cache_hits = 4
    a, b = s1.snapshot([Live(api1, 5, 6)]), s2.snapshot()
    a_copy, b_copy = copy.deepcopy(a), copy.deepcopy(b)

    m = merge([a, b])

    assert set(m["routes"]) == {"ecr-api", "ecr-dkr", "ecr-s3"}
    api = m["routes"]["ecr-api"]
    assert api["connections"] == 7
    assert api["to_upstream"] == 1000 + 5 + 10
    assert api["to_client"] == 50_000 + 6
    assert api["connect"] == [x + y for x, y in zip(a["routes"]["ecr-api"]["connect"], b["routes"]["ecr-api"]["connect"])]
    assert api["connect"][CONNECT_BUCKETS.index(0.0025)] == 2
    assert m["routes"]["ecr-dkr"] == a["routes"]["ecr-dkr"]
    assert m["routes"]["ecr-s3"] == b["routes"]["ecr-s3"]
    assert m["rejected"] == {"no_route": 2, "not_tls": 1}
    assert m["dns"] == {"ok": 1, "servfail": 1}
    assert m["dns_cache_hits"] == 7
    assert (a, b) == (a_copy, b_copy)  # the inputs are untouched
    m["routes"]["ecr-dkr"]["connect"][0] = 99
    assert a["routes"]["ecr-dkr"]["connect"][0] == 0


def test_merge_of_one_and_of_none():
    s, _, _ = make_stats()
    snap = s.snapshot()
    assert merge([snap]) == snap
    assert merge([]) == Stats().snapshot()


def test_whole_hellos_are_counted_by_kind_and_folded_at_scrape_time():
    """A hello whole in one record and one read costs one dict entry per kind on the hot
    path; a scrape shows it as if each had been observed (0 s to arrive)."""
    whole, split = Stats(), Stats()
    for stats in (whole, split):
        rs = stats.route("ecr-api")
        for size, pq, ech in [(517, None, False)] * 3 + [(1739, "X25519MLKEM768", True)] * 2:
            if stats is whole:
                rs.observe_hello(size, 1, 1, 0.5, pq, ech)  # the 0.5 s is not read
            else:
                rs.hello_bytes.observe(size)
                rs.hello_records.observe(1)
                rs.hello_reads.observe(1)
                rs.hello_seconds.observe(0)
                if pq is not None:
                    rs.hello_pq[pq] = rs.hello_pq.get(pq, 0) + 1
                rs.hello_ech += ech
    assert len(whole.route("ecr-api").whole) == 2
    assert whole.snapshot() == split.snapshot()
    assert whole.snapshot() == split.snapshot()  # folding twice counts nothing twice


def test_whole_hello_kinds_are_bounded():
    """Sizes are the client's choice: past WHOLE_KINDS kinds they are folded at once."""
    from sniproxy.observe.stats import WHOLE_KINDS

    stats = Stats()
    rs = stats.route("ecr-api")
    for size in range(300, 300 + 3 * WHOLE_KINDS):
        rs.observe_hello(size, 1, 1, 0.0, None, False)
        assert len(rs.whole) <= WHOLE_KINDS
    snap = stats.snapshot()["routes"]["ecr-api"]
    assert sum(snap["hello_bytes"][:-1]) == 3 * WHOLE_KINDS
    assert snap["hello_bytes"][-1] == sum(range(300, 300 + 3 * WHOLE_KINDS))
