"""workers = 2: one metrics endpoint summing every worker, restarts, signals to every worker."""

from __future__ import annotations

import os
import signal
import socket
import time

import pytest

from tests.helpers import free_port, recv_all, recv_exactly
from tests.integration.conftest import NAME, make_hello, proxy_config
from tests.integration.test_proxy import connect, route


@pytest.fixture
def two_workers(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="workers = 2\ndrain_timeout = 30.0"))
    assert len(proxy.pids()) == 3  # the supervisor and two workers
    return proxy, port


def exchange(port: int) -> int:
    s = connect(port)
    hello = make_hello(NAME)
    s.sendall(hello + b"x" * 1000)
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello + b"x" * 1000
    s.close()
    return len(hello) + 1000


def wait_until(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.02)


def test_metrics_are_the_sum_of_all_workers(two_workers):
    proxy, port = two_workers
    sent = sum(exchange(port) for _ in range(40))
    wait_until(lambda: len(proxy.log.access()) == 40)
    workers = {line.split("worker=")[1].split(":")[0] for line in proxy.log.lines if "worker=" in line}
    assert workers == {"0", "1"}
    m = proxy.metrics()
    assert m[("sniproxy_connections_total", (("route", "echo"),))] == 40
    assert m[("sniproxy_bytes_total", (("direction", "to_upstream"), ("route", "echo")))] == sent
    assert m[("sniproxy_bytes_total", (("direction", "to_client"), ("route", "echo")))] == sent


def test_a_dead_worker_is_restarted_and_its_counts_kept(two_workers):
    proxy, port = two_workers
    for _ in range(10):
        exchange(port)
    assert proxy.sample("sniproxy_connections_total", route="echo") == 10  # scraped: counts known
    victim = proxy.pids()[1]
    os.kill(victim, signal.SIGKILL)
    proxy.log.wait_for(rf"worker \d \(pid {victim}\) died \(signal SIGKILL\); restarting")
    proxy.log.wait_for(r"worker \d started", start=len(proxy.log.lines) - 1)
    wait_until(lambda: len(proxy.pids()) == 3 and victim not in proxy.pids())
    exchange(port)
    wait_until(lambda: proxy.sample("sniproxy_connections_total", route="echo") == 11)


def test_sighup_replaces_the_workers_with_a_new_generation(two_workers, tmp_path):
    """A reload starts new workers on the new config, and only once they are ready tells
    the old ones to drain: a connection held across the reload finishes on its old worker."""
    proxy, port = two_workers
    held = connect(port)
    hello = make_hello(NAME)
    held.sendall(hello)
    assert recv_exactly(held, len(hello)) == hello
    old = set(proxy.pids()[1:])
    other = "123456789012.dkr.ecr.us-east-1.amazonaws.com"
    proxy.path.write_text(proxy.path.read_text().replace(f'sni = "{NAME}"', f'sni = ["{NAME}", "{other}"]'))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"supervisor: reloaded .*: generation 2 \(2 workers\) ready in", start=mark)
    for _ in range(4):  # the new route serves, whichever new worker accepts
        s = connect(port)
        other_hello = make_hello(other)
        s.sendall(other_hello)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == other_hello
        s.close()
    # The old generation drains: the held connection still works, then its worker exits.
    held.sendall(b"after the reload")
    assert recv_exactly(held, 16) == b"after the reload"
    held.close()
    wait_until(lambda: not old & set(proxy.pids()), timeout=15)
    assert len(proxy.pids()) == 3
    assert proxy.sample("sniproxy_worker_generation") == 2


def test_sigterm_drains_every_worker_then_exits_zero(two_workers):
    proxy, port = two_workers
    held = []
    for _ in range(4):  # likely spread over both workers
        s = connect(port)
        hello = make_hello(NAME)
        s.sendall(hello)
        assert s.recv(len(hello))
        held.append(s)
    proxy.signal(signal.SIGTERM)
    proxy.log.wait_for("asking 2 workers to drain")
    # Refused once every copy of the listener is closed; a probe queued just before the last
    # close is reset by the kernel instead. Either way, not accepted.
    with pytest.raises((ConnectionRefusedError, ConnectionResetError)):
        for _ in range(5):
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            time.sleep(0.05)
    for s in held:
        s.close()
    assert proxy.proc.wait(15) == 0
    closes = [e["close"] for e in proxy.log.access()]
    assert closes.count("done") == 4 and "drain" not in closes  # finished, not cut off
    # (a probe that connected before the listeners closed may add a "client_closed")


def test_workers_exit_when_the_supervisor_dies(two_workers):
    proxy, _ = two_workers
    workers = proxy.pids()[1:]
    proxy.proc.kill()
    proxy.proc.wait(5)

    def gone(pid: int) -> bool:
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().split()[2] == "Z"
        except FileNotFoundError:
            return True

    wait_until(lambda: all(gone(pid) for pid in workers), timeout=15)
