"""The resolver against a real DNS server on loopback; time is a variable, never a sleep."""

from __future__ import annotations

import asyncio

import pytest

from sniproxy.config import ResolverConfig
from sniproxy.dns.resolver import ResolveError, Resolver
from sniproxy.observe.stats import Stats
from tests.helpers import DnsServer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def dns_server():
    server = DnsServer("127.0.0.1")
    yield server
    server.close()


def make(dns_server: DnsServer, **kw) -> tuple[Resolver, Clock, Stats]:
    clock = Clock()
    stats = Stats()
    cfg = ResolverConfig(nameservers=(dns_server.host,), port=dns_server.port, timeout=0.5, **kw)
    return Resolver(cfg, stats, clock), clock, stats


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 10))


def test_asks_a_and_aaaa_and_orders_ipv4_first(dns_server):
    dns_server.add("vpce.example.com", "2001:db8::1")
    dns_server.add("vpce.example.com", "10.0.0.5")
    dns_server.add("vpce.example.com", "10.0.0.6")
    r, _, stats = make(dns_server)
    assert run(r.resolve("vpce.example.com")) == ("10.0.0.5", "10.0.0.6", "2001:db8::1")
    assert sorted(t for n, t in dns_server.queries) == ["A", "AAAA"]
    assert stats.dns == {"ok": 1}


def test_caches_by_ttl_within_bounds(dns_server):
    dns_server.add("a.example.com", "10.0.0.5", ttl=1)  # below min_ttl
    r, clock, stats = make(dns_server, min_ttl=5, max_ttl=60)
    run(r.resolve("a.example.com"))
    clock.now += 4.9
    assert r.cached("a.example.com") == ("10.0.0.5",)
    assert dns_server.count("a.example.com") == 2  # one A, one AAAA
    clock.now += 0.2
    assert r.cached("a.example.com") is None
    run(r.resolve("a.example.com"))
    assert dns_server.count("a.example.com") == 4


def test_max_ttl_caps_long_ttls(dns_server):
    dns_server.add("b.example.com", "10.0.0.5", ttl=86400)
    r, clock, _ = make(dns_server, max_ttl=60)
    run(r.resolve("b.example.com"))
    clock.now += 61
    assert r.cached("b.example.com") is None


def test_serves_stale_while_dns_is_unreachable(dns_server):
    dns_server.add("c.example.com", "10.0.0.5", ttl=30)
    r, clock, stats = make(dns_server, stale_ttl=3600)
    run(r.resolve("c.example.com"))
    dns_server.silent = True
    clock.now += 31
    assert run(r.resolve("c.example.com")) == ("10.0.0.5",)
    assert stats.dns["stale"] == 1
    clock.now += 3600
    with pytest.raises(ResolveError, match="timeout|answered"):
        run(r.resolve("c.example.com"))
    assert stats.dns["error"] == 1


def test_nxdomain_is_cached_negatively_and_not_served_stale(dns_server):
    r, clock, stats = make(dns_server, negative_ttl=5)
    with pytest.raises(ResolveError, match="NXDOMAIN"):
        run(r.resolve("missing.example.com"))
    with pytest.raises(ResolveError, match="cached"):
        run(r.resolve("missing.example.com"))
    assert dns_server.count("missing.example.com") == 2
    assert stats.dns == {"nxdomain": 1}


def test_never_reads_etc_hosts(dns_server):
    """localhost is in every /etc/hosts; our DNS server does not know it."""
    r, _, _ = make(dns_server)
    with pytest.raises(ResolveError):
        run(r.resolve("localhost"))


def test_concurrent_lookups_share_one_query(dns_server):
    dns_server.add("d.example.com", "10.0.0.7")
    r, _, _ = make(dns_server)

    async def many():
        return await asyncio.gather(*(r.resolve("d.example.com") for _ in range(20)))

    assert run(many()) == [("10.0.0.7",)] * 20
    assert dns_server.count("d.example.com") == 2


def test_ip_literal_upstreams_need_no_lookup(dns_server):
    r, _, _ = make(dns_server)
    assert r.cached("10.1.2.3") == ("10.1.2.3",)
    assert run(r.resolve("2001:db8::5")) == ("2001:db8::5",)
    assert dns_server.queries == []


def test_after_a_failed_lookup_stale_answers_come_at_once_and_refreshes_are_rate_limited(dns_server):
    """RFC 8767: once DNS has failed for a name and its stale answer was served, later
    connections get that answer without waiting for the resolver's timeout; a background
    lookup runs at most every stale_refresh seconds, and its success ends the stale period."""

    async def main():
        dns_server.add("d.example.com", "10.0.0.7", ttl=30)
        r, clock, stats = make(dns_server, stale_ttl=3600, stale_refresh=30)
        await r.resolve("d.example.com")
        dns_server.silent = True
        clock.now += 31
        assert r.cached("d.example.com") is None  # expired, DNS not known to fail yet: look it up
        assert await r.resolve("d.example.com") == ("10.0.0.7",)  # waits for the timeout, once
        asked = dns_server.count("d.example.com")
        for _ in range(50):
            assert r.cached("d.example.com") == ("10.0.0.7",)  # at once, no query
        assert dns_server.count("d.example.com") == asked
        assert stats.dns_stale_served == 50
        clock.now += 30  # stale_refresh later: one background lookup, still answered at once
        assert r.cached("d.example.com") == ("10.0.0.7",)
        assert r.cached("d.example.com") == ("10.0.0.7",)
        await asyncio.sleep(0.8)  # the background lookup times out (0.5 s) meanwhile
        assert dns_server.count("d.example.com") == asked + 2  # one A and one AAAA, not two pairs
        dns_server.silent = False
        dns_server.records["d.example.com"] = [("A", "10.0.0.8", 30)]
        clock.now += 30
        assert r.cached("d.example.com") == ("10.0.0.7",)  # the refresh starts; stale meanwhile
        await asyncio.sleep(0.3)
        assert r.cached("d.example.com") == ("10.0.0.8",)  # fresh again

    run(main())
