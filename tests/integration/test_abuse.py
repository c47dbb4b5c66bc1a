"""One misbehaving builder must not take the proxy down for everyone (issue 18), tried on a
real ``sniproxy run`` as an allowlisted client with a bug (or a grudge) would: silent
connections, hellos of hostile shapes, partial hellos that hold memory, PROXY headers from a
peer nobody trusted, DNS answers that lead back to the proxy, idle connections to the metrics
port, and the counters Prometheus reads across reloads and a worker's death.

Each test runs on every data path and worker count CI runs the suite with; where a limit is
per worker, the numbers follow SNIPROXY_TEST_WORKERS.
"""

from __future__ import annotations

import os
import signal
import socket
import struct
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import Proxy, connect_from, free_port, recv_exactly, refused
from tests.integration.conftest import NAME, TEST_WORKERS, make_hello, proxy_config
from tests.integration.test_proxy import _wait_until, route

WORKERS = int(TEST_WORKERS)
single_worker = pytest.mark.skipif(WORKERS != 1, reason="a per-process bound: with workers, each has its own")


def echoed(source: str, port: int, hello: bytes) -> bool:
    with connect_from(source, port) as s:
        s.sendall(hello)
        try:
            return recv_exactly(s, len(hello)) == hello
        except (ConnectionError, TimeoutError):
            return False


def rejected(proxy: Proxy, reason: str) -> float:
    return proxy.sample("sniproxy_connections_rejected_total", reason=reason)


# -- 1. handshake slots --------------------------------------------------------------------------

def test_silent_connections_cannot_starve_another_client(dns_server, upstream, start_proxy):
    """A build script's bug: connections that never send. They fill the table; every one of
    another client's connections still gets through, each making room by dropping the oldest
    silent one. Today's main refuses them all with `limit`."""
    table = 100
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server=f"max_connections = {table}"))
    # Four addresses (as several builders, or one NAT), each under max_handshakes_per_client.
    silent = [connect_from(f"127.0.0.{10 + i % 4}", port) for i in range(table * WORKERS)]
    _wait_until(lambda: proxy.sample("sniproxy_handshakes_waiting") + rejected(proxy, "evicted") == len(silent),
                what=lambda: proxy.metrics_text())
    hello = make_hello(NAME)
    served = []  # another client's connections, held open once their echo is back
    for _ in range(30):
        s = connect_from("127.0.0.20", port)
        s.sendall(hello)
        assert recv_exactly(s, len(hello)) == hello
        served.append(s)
    assert rejected(proxy, "limit") == 0
    if WORKERS == 1:  # one full table: each newcomer that stays made room by dropping one silent connection
        assert rejected(proxy, "evicted") == 30
        assert sum(refused(s) for s in silent[:30]) == 30  # the oldest ones
        proxy.log.wait_for(r"connection table full \(max_connections\): dropped the oldest connection waiting")
    for s in silent + served:
        s.close()


@single_worker
def test_one_client_waits_in_at_most_max_handshakes_per_client(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="max_handshakes_per_client = 20"))
    silent = [connect_from("127.0.0.10", port) for _ in range(30)]
    _wait_until(lambda: rejected(proxy, "client_handshakes") == 10)
    assert proxy.sample("sniproxy_handshakes_waiting") == 20
    assert sum(refused(s) for s in silent[20:]) == 10
    line = proxy.log.wait_for(r"127\.0\.0\.10 has 20 connections waiting for a ClientHello")
    assert "WARNING" in line
    # Another client is not affected, nor this one once its hellos arrive.
    assert echoed("127.0.0.11", port, make_hello(NAME))
    for s in silent[:20]:
        s.close()
    _wait_until(lambda: proxy.sample("sniproxy_handshakes_waiting") == 0)


@single_worker
def test_a_burst_from_one_address_whose_hellos_come_late_is_served(dns_server, upstream, start_proxy):
    """A busy builder (or a NAT'd farm) opens connections faster than it sends their hellos:
    at accept, many have no hello yet. They are in flight, not silent: none is refused for
    max_handshakes_per_client (the benchmark's 5,000 idle connections from one address lost
    128 of them to it)."""
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="max_handshakes_per_client = 20"))
    hello = make_hello(NAME)
    burst = [connect_from("127.0.0.10", port) for _ in range(60)]
    _wait_until(lambda: proxy.sample("sniproxy_handshakes_waiting") == 60)  # accepted, every hello to come
    for s in burst:
        s.sendall(hello)
    assert all(recv_exactly(s, len(hello)) == hello for s in burst)
    assert rejected(proxy, "client_handshakes") == 0
    for s in burst:
        s.close()


# -- 2. hellos of hostile shapes -------------------------------------------------------------------

def one_byte_records(message: bytes) -> bytes:
    return b"".join(b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(len(message)))


def huge_alpn_hello() -> bytes:
    from tests.protocol.test_tls import alpn_ext, handshake, hello_body, records, sni_ext

    return records(handshake(hello_body(sni_ext(NAME), alpn_ext(*[b"p"] * 30000))))


@pytest.mark.parametrize("shape, limit", [
    ("records", "records"),
    ("alpn", "alpn"),
])
def test_hellos_past_a_bound_are_refused_and_counted_by_bound(dns_server, upstream, start_proxy, shape, limit):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)))
    hello = make_hello(NAME)
    data = one_byte_records(hello[5:]) if shape == "records" else huge_alpn_hello()
    with connect_from("127.0.0.10", port) as s:
        try:
            s.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused while it was still sending: that is the point
        assert refused(s)
    _wait_until(lambda: proxy.sample("sniproxy_hello_limit_total", limit=limit) == 1)
    assert rejected(proxy, "bad_hello") == 1
    proxy.log.wait_for(rf"refused a ClientHello over a bound: .*{'records' if shape == 'records' else 'ALPN'}")
    assert echoed("127.0.0.11", port, hello)


# -- 3. memory held by partial hellos ---------------------------------------------------------------

def partial_hello(payload: int) -> bytes:
    """The start of a ClientHello that announces 60,000 bytes and sends ``payload`` of them,
    in 16 KiB records."""
    body = b"\x03\x03" + bytes(60_000 - 2)
    message = b"\x01" + (60_000).to_bytes(3, "big") + body
    out = b""
    for i in range(0, payload, 16384):
        chunk = message[i : min(i + 16384, payload)]
        out += b"\x16\x03\x01" + struct.pack("!H", 16384) + chunk
    return out


def test_partial_hellos_hold_no_more_than_max_hello_memory(dns_server, upstream, start_proxy):
    budget = 256 * 1024
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port),
                                     server=f"max_hello_memory = {budget}"))
    partial = partial_hello(40_000)
    each = len(partial)  # what a connection's partial hello holds: every byte received
    held = []
    for i in range(12 * WORKERS):  # 480 KB a worker against a 256 KiB budget
        s = connect_from(f"127.0.0.{10 + i % 4}", port)
        s.sendall(partial)
        held.append(s)
        sent = each * (i + 1)  # every byte sent is held, or was refused with its connection
        _wait_until(lambda sent=sent: proxy.sample("sniproxy_hello_memory_bytes") + each * rejected(proxy, "hello_memory")
                    == sent, what=lambda: proxy.metrics_text())
    assert proxy.sample("sniproxy_hello_memory_bytes") <= budget * WORKERS
    assert rejected(proxy, "hello_memory") >= 5 * WORKERS
    proxy.log.wait_for(r"partial ClientHellos hold more than max_hello_memory \(262144 bytes\): dropped the oldest")
    if WORKERS == 1:  # the oldest went first; the newest is still waiting
        assert refused(held[0])
        held[-1].settimeout(0.2)
        with pytest.raises(TimeoutError):
            held[-1].recv(1)
    assert echoed("127.0.0.20", port, make_hello(NAME))
    for s in held:
        s.close()


# -- 5. PROXY headers are believed only from the balancer ------------------------------------------

def proxy_v2(src: str, dst: str = "10.0.1.10", sport: int = 50412, dport: int = 443) -> bytes:
    import ipaddress

    a, b = ipaddress.ip_address(src), ipaddress.ip_address(dst)
    if a.version == 4:
        addr, fam = a.packed + b.packed + struct.pack("!HH", sport, dport), 0x11
    else:
        addr, fam = a.packed + b.packed + struct.pack("!HH", sport, dport), 0x21
    return b"\r\n\r\n\x00\r\nQUIT\n" + bytes([0x21, fam]) + struct.pack("!H", len(addr)) + addr


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 10.8.3.7 10.0.1.10 50412 443\r\n",
    proxy_v2("10.8.3.7"),
    proxy_v2("::ffff:10.8.3.7", "::ffff:10.0.1.10"),
], ids=["v1", "v2", "v2-mapped"])
def test_a_proxy_header_is_believed_only_from_proxy_from(dns_server, upstream, start_proxy, header):
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    config = config.replace(f"port = {port}\n", f'port = {port}\nproxy_protocol = true\nproxy_from = ["127.0.0.9/32"]\n'
                            'allow = ["10.8.0.0/16"]\n', 1)
    proxy = start_proxy(config)
    hello = make_hello(NAME)
    with connect_from("127.0.0.10", port) as direct:  # a client outside the allowlist, claiming to be in it
        direct.sendall(header + hello)
        assert refused(direct)
    proxy.log.wait_for(r'"client":"127\.0\.0\.10:\d+".*"close":"untrusted_proxy"')
    assert rejected(proxy, "untrusted_proxy") == 1
    with connect_from("127.0.0.9", port) as balancer:
        balancer.sendall(header + hello)
        assert recv_exactly(balancer, len(hello)) == hello
    proxy.log.wait_for(r'"client":"10\.8\.3\.7:50412".*"close":"done"')


def test_check_warns_about_a_proxy_protocol_listener_without_proxy_from(dns_server, tmp_path):
    import subprocess
    import sys

    from tests.helpers import clean_env

    port = free_port()
    config = proxy_config(port, dns_server, route()).replace(f"port = {port}\n", f"port = {port}\nproxy_protocol = true\n", 1)
    path = tmp_path / "c.toml"
    path.write_text(config)
    out = subprocess.run([sys.executable, "-m", "sniproxy", "check", "--config", str(path)], capture_output=True,
                         text=True, timeout=60, env=clean_env())
    assert out.returncode == 0, out.stderr
    assert (f"warning: listener 127.0.0.1:{port} believes the PROXY header of any peer that reaches it: set "
            "[[listen]] proxy_from to the balancer's networks") in out.stderr


# -- 6. the loop check judges what connect() reaches ---------------------------------------------

@pytest.mark.parametrize("answer", ["::ffff:127.0.0.1", "0.0.0.0"])
def test_a_loop_is_judged_by_what_connect_would_reach(dns_server, start_proxy, answer):
    """A mapped or unspecified address leads back to the proxy's own listener as surely as
    127.0.0.1 does. Today's main connected to itself, again and again."""
    port = free_port()
    dns_server.add(NAME, answer)
    proxy = start_proxy(proxy_config(port, dns_server, route(port=port)))
    with connect_from("127.0.0.10", port) as s:
        s.sendall(make_hello(NAME))
        assert refused(s)
    proxy.log.wait_for(r'"close":"loop"')
    assert rejected(proxy, "loop") == 1
    assert [line["client"].split(":")[0] for line in proxy.log.access()] == ["127.0.0.10"]  # no self-connection


# -- 7. the metrics port ------------------------------------------------------------------------------

def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_idle_metrics_connections_cannot_stop_proxying_or_spin(dns_server, upstream, tmp_path):
    """On a process with few descriptors: 150 idle connections to the metrics port took them
    all and left the event loop spinning at EMFILE. Now the listener holds at most 16, the
    oldest idle one making room, and it pauses instead of spinning."""
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    code = ("import resource, sys; resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64)); "
            "from sniproxy.cli import main; sys.exit(main())")
    proxy = Proxy(tmp_path, config, launcher=("-c", code))
    try:
        idle = []
        for _ in range(150):
            try:
                idle.append(socket.create_connection(("127.0.0.1", proxy.metrics_port), timeout=5))
            except OSError:
                break
        hello = make_hello(NAME)
        assert [echoed("127.0.0.20", port, hello) for _ in range(3)] == [True] * 3
        before = sum(cpu_seconds(pid) for pid in proxy.pids())
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # the hold: idle connections still open
            time.sleep(0.1)
        spent = sum(cpu_seconds(pid) for pid in proxy.pids()) - before
        assert spent < 0.5, f"the proxy used {spent:.2f}s of CPU in 2s while idle connections were held"
        assert proxy.sample("sniproxy_metrics_connections_dropped_total") > 0
        assert [echoed("127.0.0.20", port, hello) for _ in range(3)] == [True] * 3
        for s in idle:
            s.close()
    finally:
        assert proxy.stop() == 0


# -- 8. counters never go backwards ---------------------------------------------------------------------

def counters(text: str) -> dict[tuple, float]:
    out = {}
    for family in text_string_to_metric_families(text):
        if family.type not in ("counter", "histogram"):
            continue
        for s in family.samples:
            if s.name.endswith("_created"):
                continue
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_no_counter_goes_backwards_across_reloads_and_a_worker_kill(dns_server, upstream, tmp_path):
    port = free_port()
    proxy = Proxy(tmp_path, proxy_config(port, dns_server, route(port=upstream.port), server="workers = 2"))
    hello = make_hello(NAME)
    try:
        scrapes = [counters(proxy.metrics_text())]
        for i in range(11):
            for _ in range(5):
                assert echoed("127.0.0.20", port, hello)
            mark = len(proxy.log.lines)
            if i < 10:
                proxy.signal(signal.SIGHUP)
                proxy.log.wait_for(r"sniproxy\.supervisor: reloaded", start=mark, timeout=30)
            else:  # a worker dies: its counters and its CPU stay in the totals
                worker = proxy.pids()[1]
                os.kill(worker, signal.SIGKILL)
                proxy.log.wait_for(rf"\(pid {worker}\) died", start=mark)
                proxy.log.wait_for(r"worker \d+ started", start=mark)
            _wait_until(lambda: proxy.sample("sniproxy_workers", state="ready") == 2)
            scrapes.append(counters(proxy.metrics_text()))
        for before, after in zip(scrapes, scrapes[1:]):
            went_back = {key: (before[key], after[key]) for key in before if key in after and after[key] < before[key]}
            assert not went_back
            assert set(before) <= set(after)  # a counter never disappears either
        total = [s.get(("sniproxy_connections_total", (("route", "echo"),)), 0) for s in scrapes]
        print("connections_total after each step:", total)
        # Old generations hand in their last counters as they exit: every reload round counted.
        assert total[10] == 50
        # A killed worker cannot: what it did since the last scrape is lost, but nothing counted is.
        assert 50 <= total[11] <= 55
    finally:
        assert proxy.stop() == 0
