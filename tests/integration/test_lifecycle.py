"""Signals on a real process: SIGTERM drains, SIGHUP reloads without dropping connections."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.helpers import free_port, recv_all, recv_exactly
from tests.integration.conftest import NAME, OTHER, make_hello, proxy_config
from tests.integration.test_proxy import connect, route


def open_forwarding(port: int, sni: str = NAME) -> socket.socket:
    s = connect(port)
    hello = make_hello(sni)
    s.sendall(hello)
    assert recv_exactly(s, len(hello)) == hello
    return s


def roundtrip(s: socket.socket, data: bytes = b"still here") -> bool:
    s.sendall(data)
    return recv_exactly(s, len(data)) == data


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stop_closes_listeners_and_lets_connections_finish(dns_server, upstream, start_proxy, sig):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="drain_timeout = 30.0"))
    s = open_forwarding(port)
    started = time.monotonic()
    proxy.signal(sig)
    proxy.log.wait_for("draining 1 connections")
    for index in range(len(proxy.pids()) - 1):  # with workers, every one has closed its listeners
        proxy.log.wait_for(rf"worker={index}: stopping: listeners closed")
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)
    assert roundtrip(s)
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    s.close()
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 10  # exited when the last connection ended, not at 30 s
    assert proxy.log.access()[-1]["close"] == "done"


def test_drain_timeout_closes_what_is_left_and_exits_zero(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="drain_timeout = 0.5"))
    s = open_forwarding(port)
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert recv_all(s) == b""
    assert [entry["close"] for entry in proxy.log.access()] == ["drain"]


def test_reload_swaps_routes_without_dropping_connections(dns_server, upstream, start_proxy, tmp_path):
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    proxy = start_proxy(config)
    held = open_forwarding(port)

    proxy.path.write_text(config.replace(f'sni = "{NAME}"', f'sni = "{OTHER}"'))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"sniproxy\.(server|supervisor): reloaded", start=mark)

    assert roundtrip(held)  # the running connection survived
    new = open_forwarding(port, OTHER)  # the new route serves
    refused = connect(port)
    refused.sendall(make_hello(NAME))  # the removed route does not
    assert recv_all(refused)[:1] == b"\x15"
    for s in (held, new):
        s.close()


def test_bad_reload_keeps_the_running_config(dns_server, upstream, start_proxy):
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    proxy = start_proxy(config)
    proxy.path.write_text(config.replace("[server]", "[server]\nmax_connections = 'many'"))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    line = proxy.log.wait_for("reload failed", start=mark)
    assert "server.max_connections" in line
    s = open_forwarding(port)
    assert roundtrip(s)
    s.close()


def test_reload_adds_and_removes_listeners(dns_server, upstream, start_proxy):
    port, port2 = free_port(), free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    proxy = start_proxy(config)
    proxy.path.write_text(config.replace(f"port = {port}", f"port = {port2}", 1))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"sniproxy\.(server|supervisor): reloaded", start=mark)
    open_forwarding(port2).close()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", port), timeout=5)


def test_reload_adding_an_unbindable_listener_keeps_serving(dns_server, upstream, start_proxy):
    """A new [[listen]] whose port is taken fails the reload, not the process."""
    port = free_port()
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    proxy = start_proxy(config)
    held = open_forwarding(port)
    extra = f'[[listen]]\naddress = "127.0.0.1"\nport = {taken.getsockname()[1]}\n\n[resolver]'
    proxy.path.write_text(config.replace("[resolver]", extra, 1))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"reload failed|kept their running config", start=mark)
    assert proxy.proc.poll() is None
    assert roundtrip(held)
    open_forwarding(port).close()
    taken.close()


def test_a_second_sigterm_during_the_drain_stops_at_once(dns_server, upstream, start_proxy):
    """Like nginx's fast shutdown: the first SIGTERM drains (for up to 30 s here), the second
    closes what is left and exits."""
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="drain_timeout = 30.0"))
    s = open_forwarding(port)
    proxy.signal(signal.SIGTERM)
    proxy.log.wait_for("draining 1 connections")
    started = time.monotonic()
    proxy.signal(signal.SIGTERM)
    assert proxy.proc.wait(10) == 0
    assert time.monotonic() - started < 5
    assert recv_all(s) == b""
    assert [entry["close"] for entry in proxy.log.access()] == ["drain"]


@pytest.mark.skipif(os.environ.get("SNIPROXY_TEST_WORKERS", "1") != "1", reason="one process reloads in place")
def test_a_reload_says_which_changed_settings_need_a_restart(dns_server, upstream, start_proxy):
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    proxy = start_proxy(config)
    old_metrics = proxy.metrics_port
    proxy.path.write_text(config.replace(f"port = {old_metrics}", f"port = {free_port()}").replace(
        "[server]\n", '[server]\nworkers = 2\n', 1).replace("workers = 1\n", ""))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"reload: \[server\] workers changed; that takes effect on restart", start=mark)
    proxy.log.wait_for(r"reload: \[metrics\] changed; that takes effect on restart", start=mark)
    proxy.log.wait_for(r"sniproxy\.server: reloaded", start=mark)
    assert roundtrip(open_forwarding(port))
    assert proxy.metrics_text()  # still on the old port
