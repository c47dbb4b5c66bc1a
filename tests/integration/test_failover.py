"""A local failover proof (issue 9, item 4): two real ``sniproxy run`` instances behind
Debian's HAProxy, which plays the Network Load Balancer.

- Each instance has its own loopback address, a ``proxy_protocol`` listener and its metrics
  (with ``/readyz``) on that address. HAProxy balances round robin in TCP mode, checks
  ``GET /readyz`` every 200 ms (down after 2 failures, up after 2 successes), and sends
  PROXY v2. Like an NLB, it does not retry a failed connection on the other instance
  (``retries 0``, no ``option redispatch``): a client sees what an NLB's client would.
- Clients come from their own address, verify the upstream's certificate (a TLS echo
  server; the proxy terminates nothing) and echo 4 KiB through it, 100 connections a second.

Measured: a SIGTERM (with ``drain_delay`` above the check's interval x fall) and a reload
(worker replacement) fail nothing; a SIGKILL fails only what the killed instance held or
was sent before the check noticed, and only for about the check's interval x fall.

No connection may wait over 1 s for its first byte, the cost of a SYN dropped by a full
listen queue. Under another job's CPU load both causes of such a wait were seen: the test's
own parts queueing for CPU (no SYN dropped anywhere, by kernel tracepoints), and the echo
upstream's listen queue overflowing (SYNs from the proxy retransmitted after 1 s), which
``fleet_load`` now prevents. So every process of the fleet runs at a raised priority
(``raised_priority``: the clients, the echo, HAProxy and the proxies), and each client
records its SYN's retransmissions, so a stall says which it was.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers import DnsServer, LineLog, Proxy, free_port, haproxy_stats
from tests.integration.conftest import NAME, TEST_SPLICE
from tests.integration.fleet_load import ClientFigures, Load, assert_no_stall, raised_priority, report

HAPROXY = "/usr/sbin/haproxy"
BALANCER = "127.0.7.10"
INSTANCES = {"s1": "127.0.7.1", "s2": "127.0.7.2"}
UPSTREAM = "127.0.7.20"
CLIENT = "127.0.7.100"
RATE = 100
#: HAProxy's health check: every INTER seconds, down after FALL failures, up after RISE.
INTER, FALL, RISE = 0.2, 2, 2
#: Above INTER x FALL, with margin for the check that is under way when SIGTERM arrives.
DRAIN_DELAY = 1.5


def _unavailable() -> str | None:
    if not os.access(HAPROXY, os.X_OK):
        return f"{HAPROXY} missing (apt-get install haproxy)"
    try:
        with socket.socket() as s:
            s.bind((CLIENT, 0))
    except OSError as exc:
        return f"cannot bind {CLIENT}: {exc}"
    return None


@pytest.fixture(scope="module", autouse=True)
def _haproxy_available():
    why = _unavailable()
    if why and os.environ.get("CI"):
        pytest.fail(f"the failover test must run on CI but cannot: {why}", pytrace=False)
    if why:
        pytest.skip(why)


def instance_config(name: str, port: int, metrics_port: int, dns: DnsServer, upstream_port: int) -> str:
    address = INSTANCES[name]
    return f"""
[[listen]]
address = "{address}"
port = {port}
proxy_protocol = true

[resolver]
nameservers = ["{dns.host}"]
port = {dns.port}
timeout = 1.0

[server]
workers = 2
splice = "{TEST_SPLICE}"
drain_delay = {DRAIN_DELAY}
drain_timeout = 10.0

[metrics]
address = "{address}"
port = {metrics_port}

[[route]]
name = "echo"
sni = "{NAME}"
port = {upstream_port}
"""


def haproxy_config(stats: Path, port: int, servers: dict[str, tuple[int, int]]) -> str:
    lines = "\n".join(f"    server {name} {INSTANCES[name]}:{p} check port {m}" for name, (p, m) in servers.items())
    return f"""
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 1s
    timeout client 30s
    timeout server 30s
    # An NLB sends a connection to one target and does not retry it on another.
    retries 0

frontend nlb
    bind {BALANCER}:{port}
    default_backend sniproxy

backend sniproxy
    balance roundrobin
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    default-server inter {int(INTER * 1000)}ms fall {FALL} rise {RISE} send-proxy-v2
{lines}
"""


class Balancer:
    """HAProxy in the foreground, and a thread that records when it marks a server up or
    down (polling ``show stat`` on its stats socket every 20 ms)."""

    def __init__(self, tmp: Path, servers: dict[str, tuple[int, int]]):
        self.stats = tmp / "haproxy.sock"
        self.port = free_port(BALANCER)
        config = tmp / "haproxy.cfg"
        config.write_text(haproxy_config(self.stats, self.port, servers))
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", str(config)], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True, env={"PATH": "/usr/sbin:/usr/bin:/bin"})
        self.log = LineLog(self.proc.stderr)
        self.status: dict[str, str] = {}
        self.changes: list[tuple[float, str, str]] = []  # (monotonic time, server, new status)
        self._cond = threading.Condition()
        self._stop = threading.Event()
        deadline = time.monotonic() + 10
        while not self.stats.exists():
            assert self.proc.poll() is None, "haproxy exited:\n" + "\n".join(self.log.lines)
            assert time.monotonic() < deadline, "haproxy did not start"
            time.sleep(0.02)
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _show_stat(self) -> dict[str, str]:
        rows = haproxy_stats(self.stats)
        return {r["svname"]: r["status"] for r in rows if r["pxname"] == "sniproxy" and r["svname"] in INSTANCES}

    def _poll(self) -> None:
        while not self._stop.is_set():
            try:
                now = self._show_stat()
            except OSError:
                now = {}
            stamp = time.monotonic()
            with self._cond:
                for name, status in now.items():
                    if self.status.get(name) != status:
                        self.changes.append((stamp, name, status))
                self.status.update(now)
                self._cond.notify_all()
            time.sleep(0.02)

    def wait_status(self, name: str, status: str, timeout: float = 15.0) -> float:
        """Wait until HAProxy shows ``name`` as ``status`` ("UP", "DOWN"); when it did."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self.status.get(name) != status:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"haproxy: {name} not {status} within {timeout}s: {self.changes[-10:]}"
                self._cond.wait(remaining)
            return max(t for t, n, s in self.changes if n == name and s == status)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Fleet:
    """The balancer, two instances, a TLS echo upstream and a DNS server, for this module.
    ``ensure_up()`` restarts an instance a test stopped and waits until HAProxy sends to both."""

    def __init__(self, tmp: Path, ca):
        self.tmp = tmp
        self.dns = DnsServer("127.0.0.1")
        pem = tmp / "upstream.pem"
        ca.issue_cert(NAME).private_key_and_cert_chain_pem.write_to_path(str(pem))
        self.ca_file = tmp / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        self.upstream = Load("echo", "--host", UPSTREAM, "--cert", str(pem), "--max-seconds", "600")
        self.dns.add(NAME, UPSTREAM)
        self.ports = {name: (free_port(address), free_port(address)) for name, address in INSTANCES.items()}
        self.configs = {name: instance_config(name, p, m, self.dns, self.upstream.ready["port"])
                        for name, (p, m) in self.ports.items()}
        self.proxies: dict[str, Proxy] = {}
        self.stopped: list[Proxy] = []  # earlier runs of an instance, for their logs
        self.balancer: Balancer | None = None
        for name in INSTANCES:
            self.start(name)
        self.balancer = Balancer(tmp, self.ports)

    def start(self, name: str) -> Proxy:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        self.proxies[name] = Proxy(folder, self.configs[name])
        return self.proxies[name]

    def ensure_up(self) -> None:
        for name, proxy in list(self.proxies.items()):
            if proxy.proc.poll() is not None:
                self.stopped.append(proxy)
                self.start(name)
        for name in INSTANCES:
            self.balancer.wait_status(name, "UP")

    def clients(self) -> Load:
        return Load("clients", "--host", BALANCER, "--port", str(self.balancer.port), "--sni", NAME,
                    "--rate", str(RATE), "--bind", CLIENT, "--tls-ca", str(self.ca_file), "--payload", "4096",
                    "--timeout", "5")

    def close(self) -> list[str]:
        """Stop everything; return the problems seen in the logs (tracebacks)."""
        if self.balancer is not None:
            self.balancer.close()
        problems = []
        for proxy in [*self.stopped, *self.proxies.values()]:
            if proxy.proc.poll() is None:
                proxy.proc.send_signal(signal.SIGTERM)
                try:
                    proxy.proc.wait(20)
                except subprocess.TimeoutExpired:
                    for pid in proxy.pids():
                        _kill(pid)
            print("proxy log:\n" + "\n".join(proxy.log.lines))
            if any("Traceback" in line for line in proxy.log.lines):
                problems.append("a proxy logged a traceback")
        if self.balancer is not None:
            print("haproxy log:\n" + "\n".join(self.balancer.log.lines))
        self.upstream.finish()
        self.dns.close()
        return problems


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def fleet(tmp_path_factory, ca):
    with raised_priority() as raised:
        if not raised:
            print("failover: could not raise the fleet's priority (not root): another job's load can slow it")
        built = Fleet(tmp_path_factory.mktemp("failover"), ca)
        try:
            yield built
        finally:
            problems = built.close()
    assert not problems, problems


def _access(proxy: Proxy, mark: int) -> list[dict]:
    """Access-log entries after line ``mark``."""
    return [json.loads(line) for line in proxy.log.lines[mark:] if line.startswith("{")]


def clients_seen(entries: list[dict]) -> dict[int, dict]:
    """Access-log entries by client port; every client address must be the real one."""
    by_port = {}
    for entry in entries:
        host, _, port = entry["client"].rpartition(":")
        assert host == CLIENT, f"the access log shows {entry['client']}, not the client's own address {CLIENT}"
        by_port[int(port)] = entry
    return by_port


def run_scenario(fleet: Fleet, action, settle: float = 1.0) -> tuple[ClientFigures, dict, dict[str, list[dict]]]:
    """Load through the balancer; ``action()`` at 1 s; load on for ``settle`` s after it returns.
    Returns the figures, what ``action`` returned, and each instance's access-log entries."""
    marks = {name: len(proxy.log.lines) for name, proxy in fleet.proxies.items()}
    proxies = dict(fleet.proxies)
    load = fleet.clients()
    try:
        time.sleep(1.0)
        result = action()
        time.sleep(settle)
    finally:
        doc = load.finish()
    entries = {name: _access(proxies[name], marks[name]) for name in proxies}
    return ClientFigures.of(doc), {**result, "records": doc["records"]}, entries


def test_proxy_v2_carries_the_real_client_address_through_the_balancer(fleet):
    fleet.ensure_up()
    figures, result, entries = run_scenario(fleet, lambda: {}, settle=0.5)
    assert not figures.failed, figures.failed[:5]
    ok_ports = [r[4] for r in result["records"] if r[3] is None]
    # Give the access logs a moment: a line is written when its connection closes.
    deadline = time.monotonic() + 5
    while True:
        entries = {name: _access(fleet.proxies[name], 0) for name in INSTANCES}
        seen = {**clients_seen(entries["s1"]), **clients_seen(entries["s2"])}
        if set(ok_ports) <= set(seen) or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert set(ok_ports) <= set(seen), "a connection is missing from the instances' access logs"
    assert all(entries[name] for name in INSTANCES), "round robin sent nothing to one instance"


def test_a_reload_of_one_instance_fails_nothing(fleet, request):
    fleet.ensure_up()
    proxy = fleet.proxies["s2"]

    def reload() -> dict:
        mark = len(proxy.log.lines)
        sent = time.monotonic()
        proxy.signal(signal.SIGHUP)
        line = proxy.log.wait_for(r"supervisor: reloaded .* ready in", start=mark, timeout=40)
        return {"took": time.monotonic() - sent, "line": line}

    figures, result, entries = run_scenario(fleet, reload)
    report(request, f"failover, reload of one instance (workers=2), splice={TEST_SPLICE}",
           f"{figures.summary()}; reload done in {result['took']:.2f} s")
    assert not figures.failed, figures.failed[:5]
    assert_no_stall(figures)
    assert fleet.balancer.status["s2"] == "UP"
    for name in INSTANCES:
        clients_seen(entries[name])


def test_sigterm_to_one_instance_fails_nothing(fleet, request):
    """/readyz answers 503 at once; HAProxy takes the instance out within INTER x FALL; the
    instance keeps accepting for drain_delay, closes its listeners, drains and exits 0."""
    fleet.ensure_up()
    proxy = fleet.proxies["s1"]

    def stop() -> dict:
        sent = time.monotonic()
        proxy.signal(signal.SIGTERM)
        down = fleet.balancer.wait_status("s1", "DOWN", timeout=DRAIN_DELAY + 5)
        code = proxy.proc.wait(DRAIN_DELAY + 20)
        return {"sent": sent, "down": down - sent, "exited": time.monotonic() - sent, "code": code}

    figures, result, entries = run_scenario(fleet, stop)
    stopped = clients_seen(entries["s1"])
    # Connections HAProxy still sent after the SIGTERM, before its checks saw the 503: the
    # ones a proxy that closed its listeners at once would have refused.
    late = [r for r in result["records"] if r[0] > result["sent"] and r[4] in stopped]
    report(request, f"failover, SIGTERM to one instance (drain_delay {DRAIN_DELAY} s), splice={TEST_SPLICE}",
           f"{figures.summary()}; HAProxy marked it DOWN {result['down'] * 1000:.0f} ms after SIGTERM, and sent it "
           f"{len(late)} connections in between; it exited {result['exited']:.2f} s after SIGTERM")
    assert not figures.failed, figures.failed[:5]
    assert_no_stall(figures)
    assert result["code"] == 0
    assert result["down"] < DRAIN_DELAY, "HAProxy still sent to the instance when its listeners closed"
    assert {e["close"] for e in entries["s1"]} <= {"done"}, "the stopped instance cut a connection"


def test_sigkill_of_one_instance_fails_only_briefly(fleet, request):
    """Every process of one instance is killed at once. What it held fails, and so does
    what HAProxy sends it before two checks have failed; then the other serves everything."""
    fleet.ensure_up()
    proxy = fleet.proxies["s1"]

    def kill() -> dict:
        pids = proxy.pids()
        sent = time.monotonic()
        for pid in pids:
            _kill(pid)
        down = fleet.balancer.wait_status("s1", "DOWN", timeout=10)
        proxy.proc.wait(10)
        return {"sent": sent, "down": down}

    figures, result, entries = run_scenario(fleet, kill)
    sent, down = result["sent"], result["down"]
    failed = figures.failed
    first = min((f[0] for f in failed), default=sent) - sent
    last = max((f[0] for f in failed), default=sent) - sent
    report(request, f"failover, SIGKILL of one instance, splice={TEST_SPLICE}",
           f"{figures.summary()}; HAProxy marked it DOWN {(down - sent) * 1000:.0f} ms after the kill; "
           f"failed connections started {first * 1000:+.0f} ms to {last * 1000:+.0f} ms from the kill")
    bound = INTER * FALL + 1.0
    assert last <= bound, f"failures went on {last:.2f} s after the kill (bound {bound:.1f} s)"
    assert not [f for f in failed if f[0] > down + 0.05], "a connection started after HAProxy's DOWN failed"
    assert_no_stall(figures)
    # Only connections sent to the killed instance failed: none of them reached the other one.
    survivor = clients_seen(entries["s2"])
    assert not [f for f in failed if f[4] in survivor], "a connection that reached the surviving instance failed"


def test_an_instance_started_again_rejoins(fleet):
    """After the kill (or run alone: after any stop), the instance started again is back in
    service once RISE checks pass, and round robin sends it its share."""
    fleet.ensure_up()
    figures, _, entries = run_scenario(fleet, lambda: {}, settle=0.5)
    assert not figures.failed, figures.failed[:5]
    assert all(len(entries[name]) >= figures.made // 4 for name in INSTANCES), {n: len(e) for n, e in entries.items()}


def test_a_dropped_syn_is_seen_by_the_clients():
    """The check behind ``assert_no_stall``: while a listen queue is full, the kernel drops
    each SYN; the client's SYN goes again after TCP's initial 1 s, and its record says so."""
    listener = socket.socket()
    listener.bind((UPSTREAM, 0))
    listener.listen(0)  # one connection fills the queue
    port = listener.getsockname()[1]
    filler = socket.create_connection((UPSTREAM, port), timeout=5)
    release = threading.Event()
    handlers: list[threading.Thread] = []

    def echo(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                while data := conn.recv(65536):
                    conn.sendall(data)
            except OSError:
                pass

    def serve() -> None:
        release.wait(10)
        listener.settimeout(0.2)
        while release.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            handlers.append(threading.Thread(target=echo, args=(conn,), daemon=True))
            handlers[-1].start()

    server = threading.Thread(target=serve, daemon=True)
    server.start()
    load = Load("clients", "--host", UPSTREAM, "--port", str(port), "--sni", NAME, "--rate", "20", "--timeout", "8")
    try:
        time.sleep(1.2)  # the queue stays full this long: every SYN sent meanwhile is dropped
        release.set()
        filler.close()
        figures = ClientFigures.of(load.finish())
    finally:
        load.kill()
        release.clear()
        listener.close()
        server.join(5)
    assert not figures.failed, figures.failed[:5]
    assert figures.syn_retransmitted, figures.summary()
    # a dropped SYN is what a wait of 1 s or more is made of
    ttfb = {r[0]: r[1] for r in figures.syn_retransmitted}
    assert all(t >= 1.0 for t in ttfb.values()), ttfb
