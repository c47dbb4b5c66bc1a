"""Reloads under load (issue 9, item 2): a real ``sniproxy run`` replaces its workers ten
times while clients open 200 connections a second and four long transfers run, and not
one connection fails or waits a second for its first byte. Then the faults: a config that
fails validation, workers that cannot start or do not become ready, and a reload that
arrives during another.

The load runs in its own processes (``fleet_load``), so what is timed is the proxy.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import time
import urllib.error
import urllib.request

import pytest

from tests.helpers import Proxy, free_port, recv_all
from tests.integration.conftest import NAME, TEST_SPLICE, make_hello, proxy_config
from tests.integration.fleet_load import ClientFigures, Load, assert_no_stall, raised_priority, report
from tests.integration.test_proxy import connect, route

RELOADS = 10
RATE = 200
TRANSFERS = 4
#: Each transfer sends at least this much each way, paced, and goes on until the reloads end.
TRANSFER_MIN_MIB = 256
TRANSFER_RATE_MIB = 32
#: Long enough that no transfer is cut by an old worker's drain while the test runs.
DRAIN_TIMEOUT = 120.0

RELOADED_WORKERS = re.compile(r"sniproxy\.supervisor: reloaded .*: generation (\d+) \((\d+) workers\) ready in ([\d.]+)s")
RELOADED_PROCESS = re.compile(r"sniproxy\.server: reloaded .*: \d+ listeners, \d+ routes")


@pytest.fixture
def echo_upstream(dns_server):
    """A plain echo upstream on 127.0.0.2, in its own process; NAME resolves to it."""
    load = Load("echo", "--host", "127.0.0.2")
    dns_server.add(NAME, "127.0.0.2")
    yield load.ready["port"]
    load.finish()


def without_time(line: str) -> str:
    """An error-log line without the timestamp stderr lines carry outside journald."""
    return re.sub(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z ", "", line)


def fleet_config(port: int, dns, upstream_port: int, workers: int) -> str:
    """Routes appended to it (a reload's edit) land in its last section, the routes."""
    return proxy_config(port, dns, route(port=upstream_port), server=f"workers = {workers}\ndrain_timeout = {DRAIN_TIMEOUT}")


def extra_route(i: int, upstream_port: int) -> tuple[str, str]:
    """A route that only a config edited for reload ``i`` has, and the name it serves."""
    name = f"r{i}.reload.test"
    return f'\n[[route]]\nname = "added{i}"\nsni = "{name}"\nupstream = "127.0.0.2"\nport = {upstream_port}\n', name


def echoes(port: int, sni: str) -> bool:
    s = connect(port)
    hello = make_hello(sni)
    s.sendall(hello)
    s.shutdown(socket.SHUT_WR)
    ok = recv_all(s) == hello
    s.close()
    return ok


def clients(port: int, rate: float = RATE) -> Load:
    return Load("clients", "--host", "127.0.0.1", "--port", str(port), "--sni", NAME, "--rate", str(rate))


def reload(proxy: Proxy, workers: int, timeout: float = 40.0) -> tuple[float, float | None, str]:
    """SIGHUP, then wait for the line that says the reload is done: (wall seconds, the
    supervisor's own "ready in" figure, the line)."""
    mark = len(proxy.log.lines)
    sent = time.monotonic()
    proxy.signal(signal.SIGHUP)
    pattern = RELOADED_WORKERS if workers > 1 else RELOADED_PROCESS
    line = proxy.log.wait_for(pattern.pattern, start=mark, timeout=timeout)
    wall = time.monotonic() - sent
    m = RELOADED_WORKERS.search(line)
    return wall, float(m.group(3)) if m else None, line


def wait_until(predicate, timeout: float = 15.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what}: not met within {timeout}s"
        time.sleep(0.05)


def worker_pids(proxy: Proxy) -> set[int]:
    return set(proxy.pids()[1:])


def error_lines(proxy: Proxy, start: int) -> list[str]:
    """The error log after ``start``, without the access log's JSON lines."""
    return [line for line in proxy.log.lines[start:] if not line.startswith("{")]


# -- the target: ten reloads under load --------------------------------------------------------

@pytest.mark.parametrize("workers", [2, 1], ids=["workers2", "workers1"])
def test_ten_reloads_under_load_fail_and_stall_nothing(workers, dns_server, echo_upstream, start_proxy, request):
    """workers = 2: each SIGHUP starts a new generation and drains the old one. workers = 1:
    the reload is in place. Either way, under 200 connections/s and four long transfers:
    no failed connection, none waits more than 1 s for its first byte, every transfer is
    byte-exact, and the totals in /metrics count every connection of every generation."""
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, workers)
    routes = ""
    with raised_priority():  # the proxy and the workers it starts, as the load parts run (fleet_load)
        proxy = start_proxy(config)
    # Each transfer must outlast the ten reloads, however long a loaded machine makes them
    # (starting a generation's workers is the slow part): bounded by time, not by size.
    bulk = Load("bulk", "--host", "127.0.0.1", "--port", str(port), "--sni", NAME, "--count", str(TRANSFERS),
                "--min-mib", str(TRANSFER_MIN_MIB), "--rate-mib", str(TRANSFER_RATE_MIB), "--max-seconds", "90",
                "--max-mib", str(TRANSFER_RATE_MIB * 90), timeout=60)
    load = clients(port)
    walls, readies, added = [], [], []
    checks = 0  # connections on the added routes
    try:
        time.sleep(1.0)  # generation 1 serves the load before the first reload
        first_signal = time.monotonic()
        for i in range(RELOADS):
            if i % 3 == 1:  # reloads 2, 5 and 8 each add a route, so generations really differ
                text, name = extra_route(i, echo_upstream)
                routes += text
                proxy.path.write_text(config + routes)
                added.append(name)
            wall, ready, _ = reload(proxy, workers)
            walls.append(wall)
            if ready is not None:
                readies.append(ready)
            for name in added[-1:]:  # the newest added route serves on every later generation
                assert echoes(port, name), f"the route for {name} does not serve after reload {i + 1}"
                checks += 1
            time.sleep(0.5)  # each generation takes connections before the next reload
        last_reloaded = time.monotonic()
        time.sleep(1.0)
    finally:
        figures = ClientFigures.of(load.finish())
        transfers = bulk.finish()["transfers"]

    label = f"reloads under load, workers={workers}, splice={TEST_SPLICE}"
    reload_figures = (f"{RELOADS} reloads, wall time from SIGHUP to the 'reloaded' line: "
                      f"min {min(walls):.2f} s, median {sorted(walls)[len(walls) // 2]:.2f} s, max {max(walls):.2f} s")
    if readies:
        reload_figures += (f"; 'ready in' min {min(readies):.2f} s, median {sorted(readies)[len(readies) // 2]:.2f} s, "
                           f"max {max(readies):.2f} s")
    mib = [round(t["sent"] / (1 << 20)) for t in transfers]
    report(request, label, f"{figures.summary()}; {reload_figures}; transfers MiB each way {mib}, "
           f"intact {sum(t['intact'] for t in transfers)}/{len(transfers)}")

    assert not figures.failed, f"{len(figures.failed)} failed connections, e.g. {figures.failed[:5]}"
    assert_no_stall(figures)
    assert figures.rate >= 0.9 * RATE, f"offered {figures.rate:.0f}/s, not {RATE}/s: the load itself fell behind"
    for t in transfers:
        assert t["intact"], t
        assert t["sent"] >= TRANSFER_MIN_MIB << 20
        assert t["start"] < first_signal and t["end"] > last_reloaded, "a transfer did not span every reload"

    # Every connection of every generation is counted once: those of exited workers too.
    expected = figures.made + TRANSFERS
    if workers > 1:
        wait_until(lambda: len(proxy.pids()) == 1 + workers, what="old generations exited")
        assert proxy.sample("sniproxy_worker_generation") == 1 + RELOADS
    wait_until(lambda: proxy.sample("sniproxy_connections_total", route="echo") == expected,
               what=f"sniproxy_connections_total == {expected}")
    assert proxy.stop() == 0
    closes = {}
    for entry in proxy.log.access():
        closes[entry["close"]] = closes.get(entry["close"], 0) + 1
    assert closes == {"done": expected + checks}, closes


# -- bad input and faults ----------------------------------------------------------------------

def test_a_config_that_fails_validation_keeps_the_workers_and_says_so_in_one_line(
        dns_server, echo_upstream, start_proxy):
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, 2)
    proxy = start_proxy(config)
    before = worker_pids(proxy)
    load = clients(port, rate=50)
    try:
        proxy.path.write_text(config.replace("[server]", "[server]\nmax_connections = 'many'"))
        mark = len(proxy.log.lines)
        proxy.signal(signal.SIGHUP)
        proxy.log.wait_for("reload failed", start=mark)
        wait_until(lambda: proxy.sample("sniproxy_config_last_reload_successful") == 0.0, what="reload reported failed")
        time.sleep(0.5)
    finally:
        figures = ClientFigures.of(load.finish())
    lines = error_lines(proxy, mark)
    assert len(lines) == 1, lines
    assert without_time(lines[0]).startswith("ERROR sniproxy.supervisor: reload failed, keeping the running config: ")
    assert "server.max_connections" in lines[0]
    assert worker_pids(proxy) == before  # nothing was started or stopped
    assert proxy.sample("sniproxy_worker_generation") == 1
    assert not figures.failed and not figures.slow, figures.summary()

    proxy.path.write_text(config)  # the next good reload works as usual
    _, _, line = reload(proxy, 2)
    assert "generation 2 (2 workers)" in line


def test_workers_that_cannot_start_are_stopped_and_the_old_ones_keep_serving(dns_server, echo_upstream, start_proxy):
    """A config the supervisor accepts but a worker cannot run: ``[server] user`` names no
    user. The supervisor, which keeps root, does not look the user up; each new worker
    exits at its privilege drop, before it is ready."""
    if os.geteuid() != 0:
        pytest.skip("a worker looks [server] user up only when started as root")
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, 2)
    proxy = start_proxy(config)
    before = worker_pids(proxy)
    load = clients(port, rate=50)
    try:
        proxy.path.write_text(config.replace("[server]", '[server]\nuser = "sniproxy-test-no-such-user"'))
        mark = len(proxy.log.lines)
        proxy.signal(signal.SIGHUP)
        line = proxy.log.wait_for(r"reload failed", start=mark, timeout=40)
        wait_until(lambda: proxy.sample("sniproxy_config_last_reload_successful") == 0.0, what="reload reported failed")
        time.sleep(0.5)
    finally:
        figures = ClientFigures.of(load.finish())
    assert without_time(line).startswith("ERROR sniproxy.supervisor: reload failed: the new workers did not become ready")
    lines = error_lines(proxy, mark)
    assert sum("user 'sniproxy-test-no-such-user' does not exist" in x for x in lines) == 2, lines
    assert sum(bool(re.search(r"generation 2: worker \d \(pid \d+\) exited", x)) for x in lines) >= 1, lines
    assert worker_pids(proxy) == before
    assert not figures.failed and not figures.slow, figures.summary()
    assert echoes(port, NAME)


def test_a_failed_reload_does_not_count_as_a_generation(dns_server, echo_upstream, start_proxy):
    if os.geteuid() != 0:
        pytest.skip("a worker looks [server] user up only when started as root")
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, 2)
    proxy = start_proxy(config)
    proxy.path.write_text(config.replace("[server]", '[server]\nuser = "sniproxy-test-no-such-user"'))
    mark = len(proxy.log.lines)
    proxy.signal(signal.SIGHUP)
    proxy.log.wait_for(r"reload failed", start=mark, timeout=40)
    wait_until(lambda: proxy.sample("sniproxy_config_last_reload_successful") == 0.0, what="reload reported failed")
    assert proxy.sample("sniproxy_worker_generation") == 1


def patched_supervisor(tmp_path, config: str, ready_timeout: float) -> Proxy:
    """The supervisor with READY_TIMEOUT patched (it is 30 s), so a test need not wait 30 s."""
    code = (f"import sys, sniproxy.process.supervisor as s; s.READY_TIMEOUT = {ready_timeout}; "
            "from sniproxy.cli import main; sys.exit(main())")
    return Proxy(tmp_path, config, launcher=("-c", code))


def hanging_workers(tmp_path, config: str) -> str:
    """A config whose workers hang before they are ready: their access log is a FIFO that
    nobody reads, so open(2) blocks. The supervisor does not open it (workers write it)."""
    fifo = tmp_path / "access.fifo"
    os.mkfifo(fifo)
    return config.replace("[metrics]", f'[log]\naccess = "{fifo}"\n\n[metrics]')


def kill_all(proxy: Proxy) -> None:
    """The supervisor and every worker: a worker hung on the FIFO would outlive its supervisor."""
    if proxy.proc.poll() is None:  # only then are the pids ours (not reaped, not reused)
        for pid in proxy.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proxy.proc.wait(5)
    print("proxy log:\n" + "\n".join(proxy.log.lines))


def readyz(proxy: Proxy) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{proxy.metrics_port}/readyz", timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_workers_not_ready_in_time_are_stopped_and_the_old_ones_keep_serving(dns_server, echo_upstream, tmp_path):
    """New workers that hang before they are ready are stopped after READY_TIMEOUT (patched
    to 3 s), and the old ones keep serving."""
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, 2)
    proxy = patched_supervisor(tmp_path, config, 3.0)
    try:
        before = worker_pids(proxy)
        load = clients(port, rate=50)
        try:
            proxy.path.write_text(hanging_workers(tmp_path, config))
            mark = len(proxy.log.lines)
            started = time.monotonic()
            proxy.signal(signal.SIGHUP)
            line = proxy.log.wait_for(r"reload failed", start=mark, timeout=20)
            took = time.monotonic() - started
            time.sleep(0.5)
        finally:
            figures = ClientFigures.of(load.finish())
        assert without_time(line).startswith("ERROR sniproxy.supervisor: reload failed: the new workers did not become ready")
        lines = error_lines(proxy, mark)
        assert sum(bool(re.search(r"generation 2: worker \d \(pid \d+\) was not ready within 3s", x)) for x in lines) == 2
        assert 3.0 <= took < 10.0
        assert worker_pids(proxy) == before  # the hung ones are gone, the old ones serve
        assert not figures.failed and not figures.slow, figures.summary()
        assert echoes(port, NAME)
        assert proxy.stop() == 0
    finally:
        kill_all(proxy)


def test_a_reload_during_a_reload_is_queued_and_runs_after_it(dns_server, echo_upstream, start_proxy):
    """The second SIGHUP arrives while generation 2 is starting: it is neither lost nor run
    at the same time. Generation 3 starts only after generation 2's reload is done."""
    port = free_port()
    proxy = start_proxy(fleet_config(port, dns_server, echo_upstream, 2))
    load = clients(port, rate=50)
    try:
        mark = len(proxy.log.lines)
        proxy.signal(signal.SIGHUP)
        proxy.log.wait_for(r"worker \d started \(pid \d+, generation 2\)", start=mark)
        proxy.signal(signal.SIGHUP)  # while generation 2 is not yet ready
        second = len(proxy.log.lines)
        proxy.log.wait_for(r"reloaded .*generation 3", start=mark, timeout=40)
        time.sleep(0.5)
    finally:
        figures = ClientFigures.of(load.finish())
    lines = error_lines(proxy, mark)
    events = [(m.group(1), int(m.group(2))) for x in lines
              if (m := re.search(r"(reloaded|started) .*generation (\d+)", x))]
    assert events == [("started", 2), ("started", 2), ("reloaded", 2),
                      ("started", 3), ("started", 3), ("reloaded", 3)], events
    # The test proves something only if the first reload was still running at the second signal.
    assert not any("reloaded" in x for x in proxy.log.lines[mark:second])
    assert not figures.failed and not figures.slow, figures.summary()



def test_sigterm_during_a_reload_answers_503_at_once(dns_server, echo_upstream, tmp_path):
    """/readyz answers 503 from the moment SIGTERM arrives (issue 9), also while a reload
    waits for its new workers: the balancer must stop sending now, not when the reload ends.
    The stop wins: the reload is cancelled, its workers stopped, and the drain begins."""
    port = free_port()
    config = fleet_config(port, dns_server, echo_upstream, 2).replace("[server]\n", "[server]\ndrain_delay = 3.0\n", 1)
    proxy = patched_supervisor(tmp_path, config, 5.0)
    try:
        proxy.path.write_text(hanging_workers(tmp_path, config))
        mark = len(proxy.log.lines)
        proxy.signal(signal.SIGHUP)
        proxy.log.wait_for(r"worker \d started \(pid \d+, generation 2\)", start=mark)
        proxy.signal(signal.SIGTERM)
        time.sleep(0.3)
        assert readyz(proxy) == 503
        proxy.log.wait_for("reload cancelled: stopping instead", start=mark)
        assert echoes(port, NAME)  # generation 1 still accepts during drain_delay
        assert proxy.proc.wait(20) == 0
    finally:
        kill_all(proxy)
