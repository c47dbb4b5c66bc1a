"""Loopback scenarios through a real ``sniproxy run`` process, named for what they prove."""

from __future__ import annotations

import hashlib
import os
import socket
import ssl
import struct
import threading
import time

import pytest
import trustme

from tests.helpers import FIXTURES, Server, free_port, read_hello, recv_all, recv_exactly
from tests.integration.conftest import NAME, echo, make_hello, proxy_config

#: Connection limits count per worker process, like nginx's worker_connections.
single_worker = pytest.mark.skipif(os.environ.get("SNIPROXY_TEST_WORKERS", "1") != "1",
                                   reason="limits are per worker; with several workers they add up")


def route(name: str = "echo", sni: str = NAME, port: int = 443, upstream: str | None = None) -> str:
    up = f'upstream = "{upstream}"\n' if upstream else ""
    return f'[[route]]\nname = "{name}"\nsni = "{sni}"\nport = {port}\n{up}'


def connect(port: int) -> socket.socket:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s






def test_client_verifies_the_real_certificate_through_the_proxy(ca, dns_server, start_proxy):
    """TLS passes through untouched: the client sees the upstream's certificate, and a client
    without the CA fails verification (so the proxy cannot be terminating TLS)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ca.issue_cert(NAME).configure_cert(ctx)
    ctx.set_alpn_protocols(["h2", "http/1.1"])

    def tls_echo(conn):
        conn.sendall(b"alpn=" + (conn.selected_alpn_protocol() or "").encode() + b";" + conn.recv(100))

    up = Server(tls_echo, host="127.0.0.2", tls=ctx)
    dns_server.add(NAME, "127.0.0.2")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=up.port)))

    client = ssl.create_default_context(cafile=None)
    ca.configure_trust(client)
    client.set_alpn_protocols(["h2"])
    with client.wrap_socket(connect(port), server_hostname=NAME) as s:
        assert s.getpeercert()["subjectAltName"] == (("DNS", NAME),)
        s.sendall(b"hello")
        assert recv_all(s) == b"alpn=h2;hello"

    untrusting = ssl.create_default_context(cafile=None)
    trustme.CA().configure_trust(untrusting)  # a CA, but not the upstream's
    with pytest.raises(ssl.SSLCertVerificationError):
        untrusting.wrap_socket(connect(port), server_hostname=NAME)
    proxy.log.wait_for(r'"sni":"api.ecr.us-east-1.amazonaws.com".*"close":"done"')


def bulk_roundtrip(port: int, size: int) -> int:
    """Send hello + ``size`` random bytes through an echo upstream, reading the echo at the
    same time; check sha256 both ways. Returns the bytes counted each way."""
    hello = make_hello(NAME)
    s = connect(port)
    sent = hashlib.sha256()
    errors = []

    def send():
        try:
            s.sendall(hello)
            sent.update(hello)
            block = os.urandom(1 << 20)
            for i in range(size >> 20):
                chunk = block[i:] + block[:i]
                s.sendall(chunk)
                sent.update(chunk)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(exc)

    t = threading.Thread(target=send)
    t.start()
    received = hashlib.sha256()
    n = 0
    s.settimeout(30)
    while True:
        data = s.recv(1 << 20)
        if not data:
            break
        received.update(data)
        n += len(data)
    t.join(30)
    s.close()
    assert not errors
    assert n == size + len(hello)
    assert received.hexdigest() == sent.hexdigest()
    return n


def test_bulk_64mib_each_way_is_byte_exact(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)), "--log-level", "debug")
    n = bulk_roundtrip(port, 64 * 1024 * 1024)
    line = proxy.log.wait_for(r'"close":"done"')
    assert f'"bytes_to_upstream":{n}' in line and f'"bytes_to_client":{n}' in line
    assert proxy.sample("sniproxy_bytes_total", route="echo", direction="to_upstream") == n


def test_a_busy_pair_moves_to_splice_mid_stream_byte_exact(dns_server, upstream, start_proxy):
    """splice = "auto": the pump starts, and once a pair has carried 1 MiB the sweep hands
    it to splice(2) at a moment with nothing buffered: no byte lost, duplicated or reordered."""
    from sniproxy.engine.splice import probe

    if probe() is not None:
        pytest.skip(f"splice(2) unavailable: {probe()}")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server='splice = "auto"'),
                        "--log-level", "debug")
    n = bulk_roundtrip(port, 128 * 1024 * 1024)
    proxy.log.wait_for(r"moved to splice after \d+ bytes")
    line = proxy.log.wait_for(r'"close":"done"')
    assert f'"bytes_to_upstream":{n}' in line and f'"bytes_to_client":{n}' in line


def test_half_close_keeps_the_other_direction_flowing(dns_server, start_proxy):
    """Client FIN reaches the upstream as a FIN; the upstream can still answer afterwards."""

    hello = make_hello(NAME)

    def answer_after_eof(conn):
        data = recv_all(conn)  # until the client's FIN arrives
        conn.sendall(b"got %d after hello; " % (len(data) - len(hello)) + b"x" * 100000)

    up = Server(answer_after_eof, host="127.0.0.2")
    dns_server.add(NAME, "127.0.0.2")
    port = free_port()
    start_proxy(proxy_config(port, dns_server, route(port=up.port)))
    s = connect(port)
    s.sendall(hello + b"request")
    s.shutdown(socket.SHUT_WR)
    s.settimeout(10)
    reply = recv_all(s)
    assert reply.startswith(b"got 7 after hello; ") and len(reply) == 19 + 100000


def test_split_post_quantum_hello_is_reassembled(dns_server, upstream, start_proxy):
    """Chromium's ~2 KB ML-KEM hello, split across 3 records and sent in small segments."""
    raw = (FIXTURES / "chromium_pq_3records.bin").read_bytes()
    sni = "prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com"
    dns_server.add(sni, "127.0.0.2")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(sni=sni, port=upstream.port)))
    s = connect(port)
    for i in range(0, len(raw), 500):
        s.sendall(raw[i : i + 500])
    s.shutdown(socket.SHUT_WR)
    assert recv_exactly(s, len(raw)) == raw  # forwarded byte-exact, records as received
    proxy.log.wait_for(r'"sni":"prod-us-east-1-starport-layer-bucket')


@pytest.mark.parametrize(
    "payload, reason",
    [
        (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", "not_tls"),
        (b"SSH-2.0-OpenSSH_9.2\r\n", "not_tls"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "not_tls"),
        (b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad_hello"),
    ],
)
def test_non_tls_is_refused_at_once(dns_server, upstream, start_proxy, payload, reason):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="handshake_timeout = 30.0"))
    s = connect(port)
    started = time.monotonic()
    s.sendall(payload)
    with _reset_is_eof():
        assert recv_all(s) == b""
    assert time.monotonic() - started < 5  # not after the 30 s handshake timeout
    proxy.log.wait_for(rf'"close":"{reason}"')
    assert proxy.sample("sniproxy_connections_rejected_total", reason=reason) == 1
    assert upstream.accepted == 0


class _reset_is_eof:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return isinstance(exc[1], ConnectionResetError)


@pytest.mark.parametrize("sni, reason", [("unknown.example.com", "no_route"), (None, "no_sni"), ("10.0.0.1", "no_sni")])
def test_unrouted_names_get_an_alert_and_never_reach_an_upstream(dns_server, upstream, start_proxy, sni, reason):
    port = free_port()
    dns_server.add("unknown.example.com", "127.0.0.2")
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)))
    s = connect(port)
    s.sendall(make_hello(sni))
    assert recv_all(s) == bytes([21, 3, 3, 0, 2, 2, 112])  # fatal unrecognized_name
    proxy.log.wait_for(rf'"close":"{reason}"')
    assert proxy.sample("sniproxy_connections_rejected_total", reason=reason) == 1
    assert upstream.accepted == 0
    assert dns_server.count("unknown.example.com") == 0


def test_wildcard_route_matches_one_label(dns_server, upstream, start_proxy):
    port = free_port()
    dns_server.add("123456789012.dkr.ecr.us-east-1.amazonaws.com", "127.0.0.2")
    proxy = start_proxy(proxy_config(port, dns_server, route(sni="*.dkr.ecr.us-east-1.amazonaws.com", port=upstream.port)))
    for sni, ok in [("123456789012.dkr.ecr.us-east-1.amazonaws.com", True), ("a.b.dkr.ecr.us-east-1.amazonaws.com", False)]:
        s = connect(port)
        hello = make_hello(sni)
        s.sendall(hello)
        s.shutdown(socket.SHUT_WR)
        assert (recv_all(s) == hello) is ok
    assert proxy.sample("sniproxy_connections_total", route="echo") == 1


def test_handshake_timeout_is_a_total_deadline(dns_server, upstream, start_proxy):
    """A client trickling its hello one byte at a time is cut off at handshake_timeout,
    not kept alive by each byte."""
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="handshake_timeout = 1.0"))
    hello = make_hello(NAME)
    s = connect(port)
    started = time.monotonic()
    closed = threading.Event()

    def trickle():
        for b in hello:
            if closed.wait(0.05):
                return
            try:
                s.send(bytes([b]))
            except OSError:
                return

    t = threading.Thread(target=trickle, daemon=True)
    t.start()
    s.settimeout(10)
    try:
        assert s.recv(100) == b""
    except ConnectionResetError:
        pass
    elapsed = time.monotonic() - started
    closed.set()
    assert 0.9 < elapsed < 3.0
    proxy.log.wait_for(r'"close":"handshake_timeout"')


def test_failover_to_the_next_address_and_connect_histogram(dns_server, start_proxy):
    """The first A record refuses connections; the second one serves."""
    port_up = free_port("127.0.0.3")
    up = Server(echo, host="127.0.0.3", port=port_up)
    dns_server.add(NAME, "127.0.0.4")  # nothing listens there: connection refused
    dns_server.add(NAME, "127.0.0.3")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=port_up)))
    s = connect(port)
    hello = make_hello(NAME)
    s.sendall(hello)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello
    proxy.log.wait_for(r'"upstream":"127.0.0.3:%d"' % port_up)
    assert proxy.sample("sniproxy_upstream_connect_seconds_count", route="echo") == 1
    up.close()


def refused_before_upstream(proxy, port: int, reason: str) -> None:
    """Send a hello; the proxy must close without forwarding anything and log ``reason``."""
    s = connect(port)
    s.sendall(make_hello(NAME))
    assert recv_all(s) == b""
    proxy.log.wait_for(rf'"close":"{reason}"')


def test_connect_failure_is_counted(dns_server, start_proxy):
    dns_server.add(NAME, "127.0.0.4")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=free_port("127.0.0.4"))))
    refused_before_upstream(proxy, port, "connect_failed")
    assert proxy.sample("sniproxy_connections_rejected_total", reason="connect_failed") == 1


def test_resolve_failure_is_counted(dns_server, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=443)))  # NAME not in DNS: NXDOMAIN
    refused_before_upstream(proxy, port, "resolve_failed")
    assert proxy.sample("sniproxy_dns_queries_total", result="nxdomain") == 1


def test_a_route_pointing_back_at_the_proxy_is_refused_as_a_loop(dns_server, start_proxy):
    port = free_port()
    dns_server.add(NAME, "127.0.0.1")  # the proxy's own listen address and port
    proxy = start_proxy(proxy_config(port, dns_server, route(port=port)))
    refused_before_upstream(proxy, port, "loop")
    assert proxy.sample("sniproxy_connections_rejected_total", reason="loop") == 1
    assert proxy.sample("sniproxy_connections_total", route="echo") == 0


def test_wildcard_listener_refuses_loops_through_any_local_address(dns_server, start_proxy):
    port = free_port()
    dns_server.add(NAME, "127.0.0.9")  # local, and 0.0.0.0 listens there too
    proxy = start_proxy(proxy_config(port, dns_server, route(port=port), listen_address="0.0.0.0"))
    refused_before_upstream(proxy, port, "loop")


def test_upstream_reset_reaches_the_client_as_a_reset(dns_server, start_proxy):
    def reset(conn):
        read_hello(conn)
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))

    up = Server(reset, host="127.0.0.2")
    dns_server.add(NAME, "127.0.0.2")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=up.port)))
    s = connect(port)
    s.sendall(make_hello(NAME))
    with pytest.raises(ConnectionResetError):
        while s.recv(100):
            pass
    proxy.log.wait_for(r'"close":"upstream_reset"')


def test_client_reset_reaches_the_upstream_as_a_reset(dns_server, start_proxy):
    seen = []
    done = threading.Event()

    def wait_reset(conn):
        read_hello(conn)
        try:
            conn.recv(100)
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")
        done.set()

    up = Server(wait_reset, host="127.0.0.2")
    dns_server.add(NAME, "127.0.0.2")
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=up.port)))
    s = connect(port)
    s.sendall(make_hello(NAME))
    _wait_until(lambda: proxy.sample("sniproxy_connections_active", route="echo") == 1)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert done.wait(10)
    assert seen == ["reset"]
    proxy.log.wait_for(r'"close":"client_reset"')


def test_idle_pairs_are_closed(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="idle_timeout = 0.5"))
    s = connect(port)
    s.sendall(make_hello(NAME))
    s.settimeout(10)
    started = time.monotonic()
    assert len(recv_all(s)) > 0
    assert time.monotonic() - started < 5
    proxy.log.wait_for(r'"close":"idle"')


def test_bytes_are_visible_in_metrics_while_the_transfer_runs(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)))
    s = connect(port)
    hello = make_hello(NAME)
    s.sendall(hello + b"x" * 100000)
    recv_exactly(s, len(hello) + 100000)
    # The connection is still open: the counters must already show its bytes.
    assert proxy.sample("sniproxy_bytes_total", route="echo", direction="to_upstream") == len(hello) + 100000
    assert proxy.sample("sniproxy_bytes_total", route="echo", direction="to_client") == len(hello) + 100000
    assert proxy.sample("sniproxy_connections_active", route="echo") == 1
    s.close()


@single_worker
def test_max_connections_refuses_the_excess(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="max_connections = 2"))
    held = [connect(port) for _ in range(2)]
    for s in held:
        s.sendall(make_hello(NAME))
    _wait_until(lambda: proxy.sample("sniproxy_connections_active", route="echo") == 2)
    extra = connect(port)
    extra.settimeout(10)
    try:
        assert extra.recv(10) == b""
    except ConnectionResetError:
        pass
    proxy.log.wait_for(r'"close":"limit"')
    assert proxy.sample("sniproxy_connections_rejected_total", reason="limit") == 1
    assert proxy.sample("sniproxy_max_connections") == 2


def test_no_descriptor_leaks_after_churn_with_resets(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)))
    hello = make_hello(NAME)
    s = connect(port)  # warm up: DNS socket, caches
    s.sendall(hello)
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    before = proxy.fds()
    for i in range(150):
        s = connect(port)
        kind = i % 3
        if kind == 0:  # clean exchange
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            recv_all(s)
        elif kind == 1:  # reset mid-stream
            s.sendall(hello + b"x" * 1000)
            recv_exactly(s, 100)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # reset mid-hello
            s.sendall(hello[:50])
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    _wait_until(lambda: len(proxy.log.access()) >= 151, what=lambda: "\n".join(proxy.log.lines[-20:]))
    _wait_until(lambda: proxy.fds() <= before, timeout=5, what=lambda: f"{proxy.fds()} sockets, {before} before")
    assert proxy.fds() <= before
    # splice(2) keeps a bounded pool of empty pipes per process; anything past it is a leak
    from sniproxy.engine.splice import POOL_LIMIT

    assert proxy.fds("pipe") <= 2 * POOL_LIMIT * len(proxy.pids()) + 2 * len(proxy.pids())
    assert proxy.proc.poll() is None
    assert not [line for line in proxy.log.lines if "Traceback" in line]


def _wait_until(predicate, timeout: float = 10.0, what=lambda: "") -> None:
    """Poll a cheap condition with a deadline (used for state in another process)."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met in time {what()}")
        time.sleep(0.02)


def test_debug_logs_one_line_for_every_refusal_reason(dns_server, upstream, start_proxy):
    """--log-level debug explains each refusal in one line, naming the reason and the detail."""
    port, denied_port = free_port(), free_port()
    dns_server.add("down.example.com", "127.0.0.4")
    config = proxy_config(port, dns_server, route(port=upstream.port) + "\n" + route(
        "down", "down.example.com", port=free_port("127.0.0.4")))
    config = config.replace("[resolver]", f'[[listen]]\naddress = "127.0.0.1"\nport = {denied_port}\n'
                                          'allow = ["192.0.2.0/24"]\n\n[resolver]')
    proxy = start_proxy(config, "--log-level", "debug")
    cases = [
        (port, b"GET / HTTP/1.1\r\n\r\n", "not_tls"),
        (port, b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00", "bad_hello"),
        (port, make_hello(None), "no_sni"),
        (port, make_hello("unknown.example.com"), "no_route"),
        (port, make_hello("down.example.com"), "connect_failed"),
        (denied_port, b"", "denied"),
    ]
    for listen_port, payload, reason in cases:
        s = connect(listen_port)
        try:
            if payload:
                s.sendall(payload)
            with _reset_is_eof():
                recv_all(s)
        except OSError:
            pass
        s.close()
        line = proxy.log.wait_for(rf"DEBUG sniproxy\.connection( worker=\d+)?: 127\.0\.0\.1:\d+: refused \({reason}\): \S")
        assert line.count("refused") == 1
