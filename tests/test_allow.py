import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy.addresses import client_key
from sniproxy.allow import Allowlist, ClientLimits


def test_empty_allows_everyone():
    allow = Allowlist([])
    assert allow.allows("192.0.2.1")
    assert allow.allows("2001:db8::1")
    assert allow.allows("")


def test_networks_and_hosts():
    allow = Allowlist(["10.0.0.0/8", "192.0.2.7", "2001:db8:1::/48", "198.51.100.5/32"])
    assert allow.allows("10.0.0.0")
    assert allow.allows("10.255.255.255")
    assert not allow.allows("11.0.0.0")
    assert not allow.allows("9.255.255.255")
    assert allow.allows("192.0.2.7")
    assert not allow.allows("192.0.2.8")
    assert allow.allows("198.51.100.5")
    assert allow.allows("2001:db8:1:ffff::1")
    assert not allow.allows("2001:db8:2::1")


def test_ipv4_mapped_clients_match_ipv4_entries():
    allow = Allowlist(["10.0.0.0/8", "192.0.2.7"])
    assert allow.allows("::ffff:10.1.2.3")
    assert allow.allows("::ffff:192.0.2.7")
    assert not allow.allows("::ffff:192.0.2.8")
    assert not allow.allows("::10.1.2.3")  # IPv4-compatible is not IPv4-mapped


def test_ipv4_mapped_entries_match_ipv4_clients():
    allow = Allowlist(["::ffff:10.0.0.0/104", "::ffff:192.0.2.7"])
    assert allow.allows("10.1.2.3")
    assert allow.allows("::ffff:10.1.2.3")
    assert allow.allows("192.0.2.7")
    assert not allow.allows("11.0.0.1")


def test_ipv4_entries_do_not_match_ipv6_numbers():
    # 10.0.0.0/8 as an integer range is also ::a00:0/104; versions must not mix.
    allow = Allowlist(["10.0.0.0/8"])
    assert not allow.allows("::a00:1")


def test_non_canonical_forms_still_match():
    allow = Allowlist(["2001:0db8:0000:0000:0000:0000:0000:0001"])
    assert allow.allows("2001:db8::1")
    assert Allowlist(["2001:db8::1"]).allows("2001:DB8:0::1")
    assert Allowlist(["fe80::/10"]).allows("fe80::1%eth0")


def test_not_an_ip_is_refused_when_a_list_is_set():
    allow = Allowlist(["10.0.0.0/8"])
    assert not allow.allows("")
    assert not allow.allows("/run/sniproxy.sock")
    assert not allow.allows("10.0.0.256")


@pytest.mark.parametrize("entry", ["10.0.1.5/24", "10.0.0.0/33", "example.com", "", "2001:db8::/129"])
def test_bad_entries_raise_naming_the_entry(entry):
    with pytest.raises(ValueError, match="allowlist entry"):
        Allowlist([entry])


def test_peer_address_from_a_real_dual_stack_socket():
    # The string the allowlist sees on the hot path is what getpeername gives.
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as server:
        port = server.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            conn, peer = server.accept()
            conn.close()
    assert peer[0] == "::ffff:127.0.0.1"
    assert Allowlist(["127.0.0.0/8"]).allows(peer[0])
    assert client_key(peer[0]) == "127.0.0.1"


addresses = st.one_of(
    st.builds(ipaddress.IPv4Address, st.integers(0, 2**32 - 1)),
    # IPv4-mapped clients deliberately count as IPv4 (tested above), unlike in ipaddress.
    st.builds(ipaddress.IPv6Address, st.integers(0, 2**128 - 1)).filter(lambda a: a.ipv4_mapped is None),
)
networks = st.builds(
    lambda a, p: ipaddress.ip_network(f"{a}/{min(p, a.max_prefixlen)}", strict=False),
    addresses,
    st.integers(0, 128),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(networks, max_size=5), addresses)
def test_agrees_with_ipaddress(networks, addr):
    allow = Allowlist([str(n) for n in networks])
    expected = not networks or any(addr in n for n in networks)
    assert allow.allows(str(addr)) == expected


@settings(max_examples=200, deadline=None)
@given(st.lists(networks, min_size=1, max_size=5), st.data())
def test_every_address_inside_a_listed_network_is_allowed(nets, data):
    net = data.draw(st.sampled_from(nets))
    addr = net.network_address + data.draw(st.integers(0, net.num_addresses - 1))
    if addr.version == 6 and addr.ipv4_mapped is not None:
        return
    assert Allowlist([str(n) for n in nets]).allows(str(addr))


def test_hot_path_is_cheap():
    import time

    allow = Allowlist([f"10.{i}.0.0/16" for i in range(8)] + ["192.0.2.7"])
    n = 20000
    start = time.perf_counter()
    for _ in range(n):
        allow.allows("10.7.1.1")  # the worst case: parse plus a scan to the last network
    per_call = (time.perf_counter() - start) / n
    assert per_call < 50e-6, per_call  # well under a connection's accept cost


def test_client_limits_count_and_release():
    limits = ClientLimits(2)
    assert limits.try_acquire("192.0.2.1")
    assert limits.try_acquire("192.0.2.1")
    assert not limits.try_acquire("192.0.2.1")
    assert limits.try_acquire("192.0.2.2")
    assert limits.open_count("192.0.2.1") == 2
    assert len(limits) == 2
    limits.release("192.0.2.1")
    assert limits.try_acquire("192.0.2.1")
    limits.release("192.0.2.1")
    limits.release("192.0.2.1")
    limits.release("192.0.2.2")
    assert len(limits) == 0  # entries go at zero, so idle clients cost nothing
    assert limits._open == {}


def test_client_limits_count_client_keys():
    """The caller names a client once (a connection, by addresses.client_key): the limits
    count that name, and open_count finds it under either spelling."""
    limits = ClientLimits(1)
    assert limits.try_acquire(client_key("::ffff:192.0.2.1"))
    assert not limits.try_acquire("192.0.2.1")
    assert limits.open_count("::ffff:192.0.2.1") == 1
    limits.release("192.0.2.1")
    assert len(limits) == 0


def test_client_limits_unlimited_still_counts():
    limits = ClientLimits(None)
    for _ in range(1000):
        assert limits.try_acquire("192.0.2.1")
    assert limits.open_count("192.0.2.1") == 1000


def test_release_without_acquire_is_a_bug():
    limits = ClientLimits(3)
    with pytest.raises(ValueError, match="no open connection"):
        limits.release("192.0.2.1")
    assert limits.try_acquire("192.0.2.1")
    limits.release("192.0.2.1")
    with pytest.raises(ValueError):
        limits.release("192.0.2.1")


@pytest.mark.parametrize("bad", [0, -1])
def test_client_limits_reject_nonsense_limit(bad):
    with pytest.raises(ValueError):
        ClientLimits(bad)
