"""The TTL cache: clamping, negative answers, the stale window and the size bound, with ``now`` passed in."""

import dataclasses

import pytest

from sniproxy.dns.cache import DnsCache

A = ("10.0.0.1", "10.0.0.2")
B = ("10.0.0.3",)
T0 = 1000.0


def cache(**kw) -> DnsCache:
    args = dict(min_ttl=5.0, max_ttl=300.0, stale_ttl=3600.0, negative_ttl=10.0)
    args.update(kw)
    return DnsCache(**args)


@pytest.mark.parametrize(
    "ttl, kept",
    [(60, 60.0), (5, 5.0), (300, 300.0), (1, 5.0), (0, 5.0), (-30, 5.0), (301, 300.0), (86400 * 7, 300.0), (7.5, 7.5)],
)
def test_positive_ttl_is_clamped(ttl, kept):
    c = cache()
    entry = c.put("a.example.com", A, ttl, T0)
    assert entry.ttl == kept
    assert entry.expires == T0 + kept
    assert entry.stale_until == T0 + kept + 3600.0
    assert c.get("a.example.com", T0 + kept - 0.001) is entry
    assert c.get("a.example.com", T0 + kept) is None  # expiry is exclusive


def test_zero_min_ttl_keeps_nothing_fresh():
    c = cache(min_ttl=0.0)
    c.put("a.example.com", A, 0, T0)
    assert c.get("a.example.com", T0) is None
    assert c.stale("a.example.com", T0).addresses == A


@pytest.mark.parametrize("ttl", [0, 3, 3600, -1])
def test_negative_answer_uses_negative_ttl(ttl):
    c = cache()
    entry = c.put("nx.example.com", (), ttl, T0)
    assert (entry.addresses, entry.ttl, entry.expires) == ((), 10.0, T0 + 10.0)
    assert c.get("nx.example.com", T0 + 9.9) is entry  # a fresh "no"
    assert c.get("nx.example.com", T0 + 10.0) is None
    assert c.stale("nx.example.com", T0 + 1) is None  # never served as a stale address list


def test_stale_window():
    c = cache()
    c.put("a.example.com", A, 60, T0)
    assert c.stale("a.example.com", T0 + 1).addresses == A  # also while still fresh
    assert c.get("a.example.com", T0 + 61) is None
    assert c.stale("a.example.com", T0 + 61).addresses == A
    assert c.stale("a.example.com", T0 + 60 + 3600 - 0.001).addresses == A
    assert c.stale("a.example.com", T0 + 60 + 3600) is None


def test_zero_stale_window():
    c = cache(stale_ttl=0.0)
    c.put("a.example.com", A, 60, T0)
    assert c.stale("a.example.com", T0 + 60) is None


def test_negative_answer_replaces_a_stale_positive_one():
    c = cache()
    c.put("a.example.com", A, 60, T0)
    c.put("a.example.com", (), 60, T0 + 100)
    assert c.stale("a.example.com", T0 + 101) is None
    assert c.get("a.example.com", T0 + 101).addresses == ()
    c.put("a.example.com", B, 60, T0 + 200)
    assert c.get("a.example.com", T0 + 201).addresses == B


def test_refresh_replaces_the_answer():
    c = cache()
    c.put("a.example.com", A, 60, T0)
    c.put("a.example.com", B, 120, T0 + 30)
    entry = c.get("a.example.com", T0 + 100)
    assert entry.addresses == B and entry.expires == T0 + 150
    assert len(c) == 1


def test_unknown_name():
    c = cache()
    assert c.get("x.example.com", T0) is None and c.stale("x.example.com", T0) is None


def test_entries_are_frozen():
    entry = cache().put("a.example.com", A, 60, T0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        entry.addresses = B  # type: ignore[misc]


# -- the size bound ---------------------------------------------------------------------------------


def test_bound_evicts_oldest_insertion():
    c = cache(max_entries=3)
    for i, name in enumerate("abcd"):
        c.put(f"{name}.example.com", A, 60, T0 + i)
    assert len(c) == 3
    assert c.get("a.example.com", T0 + 4) is None
    assert all(c.get(f"{n}.example.com", T0 + 4) for n in "bcd")


def test_bound_evicts_dead_entries_before_live_ones():
    c = cache(max_entries=3, stale_ttl=0.0)
    c.put("old-but-alive.example.com", A, 300, T0)
    c.put("dead.example.com", A, 5, T0)  # fresh until T0+5, no stale window
    c.put("c.example.com", A, 300, T0 + 100)
    c.put("d.example.com", A, 300, T0 + 100)
    assert len(c) == 3
    assert c.get("old-but-alive.example.com", T0 + 100) is not None
    assert c.stale("dead.example.com", T0 + 100) is None


def test_refresh_makes_an_entry_young_again():
    c = cache(max_entries=3)
    for i, name in enumerate("abc"):
        c.put(f"{name}.example.com", A, 60, T0 + i)
    c.put("a.example.com", B, 60, T0 + 3)
    c.put("d.example.com", A, 60, T0 + 4)
    assert c.get("a.example.com", T0 + 5).addresses == B
    assert c.get("b.example.com", T0 + 5) is None


def test_bound_holds_under_churn():
    c = cache(max_entries=50)
    for i in range(2000):
        c.put(f"n{i % 137}.example.com", A if i % 3 else (), i % 400, T0 + i * 0.5)
        assert len(c) <= 50
    assert len(c) == 50
