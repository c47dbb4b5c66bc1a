"""Real parts for tests: a DNS server on loopback, upstream servers, and a sniproxy process.

Everything binds loopback only, every wait has a deadline, and nothing sleeps to hope.
"""

from __future__ import annotations

import csv
import io
import os
import random
import re
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parent.parent


_handed_out: set[tuple[str, int]] = set()


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


#: The lowest port free_port hands out (the bench's fixed ports are below it).
PORTS_FROM = 20000


def _ephemeral_low() -> int:
    """The first port of the kernel's ephemeral range (ip_local_port_range)."""
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(*hosts: str) -> int:
    """A port free now on every one of ``hosts`` (default 127.0.0.1), as on 443 in production,
    and never one this process handed out before: two calls in a row may otherwise get the
    same one back from the kernel.

    It is taken below the kernel's ephemeral range: a port from that range can be given to an
    outgoing connection between this probe and the real bind, and a bind on the wildcard
    then fails with EADDRINUSE (seen under load, with thousands of connections a second)."""
    hosts = hosts or ("127.0.0.1",)
    for _ in range(100):
        port = random.randrange(PORTS_FROM, _ephemeral_low())
        if any((host, port) in _handed_out for host in hosts):
            continue
        probes = [socket.socket(_family(host)) for host in hosts]
        try:
            for sock, host in zip(probes, hosts):
                sock.bind((host, port))
        except OSError:
            continue
        finally:
            for sock in probes:
                sock.close()
        _handed_out.update((host, port) for host in hosts)
        return port
    raise AssertionError(f"no port free on all of {hosts} in 100 tries")


def clean_env(**extra: str) -> dict[str, str]:
    """An explicit environment: this machine sets AWS_CA_BUNDLE, SSL_CERT_FILE and friends."""
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/root"), "LANG": "C.UTF-8"}
    env["PYTHONPATH"] = str(REPO)
    env.update(extra)
    return env


class DnsServer:
    """A UDP DNS server on loopback answering from a dict; it can go silent to simulate an outage."""

    def __init__(self, host: str = "127.0.0.1"):
        self.records: dict[str, list[tuple[str, str, int]]] = {}  # name -> [(type, address, ttl)]
        self.silent = False
        self.queries: list[tuple[str, str]] = []
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind((host, 0))
        self.host, self.port = self.sock.getsockname()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def add(self, name: str, address: str, ttl: int = 60) -> None:
        rtype = "AAAA" if ":" in address else "A"
        self.records.setdefault(name.lower().rstrip("."), []).append((rtype, address, ttl))

    def count(self, name: str) -> int:
        return sum(1 for n, _ in self.queries if n == name)

    def _serve(self) -> None:
        while True:
            try:
                data, peer = self.sock.recvfrom(4096)
            except OSError:
                return
            try:
                query = dns.message.from_wire(data)
            except Exception:
                continue
            q = query.question[0]
            name = q.name.to_text().rstrip(".").lower()
            self.queries.append((name, dns.rdatatype.to_text(q.rdtype)))
            if self.silent:
                continue
            response = dns.message.make_response(query)
            if name not in self.records:
                response.set_rcode(dns.rcode.NXDOMAIN)
            else:
                for rtype, address, ttl in self.records[name]:
                    if rtype == dns.rdatatype.to_text(q.rdtype):
                        response.answer.append(dns.rrset.from_text(q.name, ttl, "IN", rtype, address))
            self.sock.sendto(response.to_wire(), peer)

    def close(self) -> None:
        self.sock.close()


class Server:
    """A threaded TCP server on loopback running ``handler(conn)`` per connection."""

    def __init__(self, handler: Callable[[socket.socket], None], host: str = "127.0.0.1", port: int = 0,
                 tls: ssl.SSLContext | None = None):
        self.handler = handler
        self.tls = tls
        self.sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.host, self.port = self.sock.getsockname()[:2]
        self.accepted = 0
        self.errors: list[BaseException] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            threading.Thread(target=self._run, args=(conn,), daemon=True).start()

    def _run(self, conn: socket.socket) -> None:
        conn.settimeout(30)
        try:
            if self.tls is not None:
                conn = self.tls.wrap_socket(conn, server_side=True)
            self.handler(conn)
        except (OSError, ssl.SSLError) as exc:
            self.errors.append(exc)
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def read_hello(conn: socket.socket) -> bytes:
    """Read one complete TLS handshake message worth of records (the test's own hello)."""
    buf = b""
    need = None
    while need is None or len(buf) < need:
        chunk = conn.recv(65536)
        if not chunk:
            raise ConnectionError("EOF inside hello")
        buf += chunk
        if need is None and len(buf) >= 9:
            # total = records; our test hellos are single-record unless the test says otherwise
            need = 5 + int.from_bytes(buf[3:5], "big")
    return buf


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(65536, n - len(out)))
        if not chunk:
            raise ConnectionError(f"EOF after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def connect_from(source: str, port: int, dest: str = "127.0.0.1") -> socket.socket:
    """A client connection from a chosen loopback address (one client of several), as the
    proxy relays: TCP_NODELAY."""
    s = socket.create_connection((dest, port), timeout=10, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def refused(s: socket.socket) -> bool:
    """The proxy closed (or reset) the connection without sending a byte."""
    try:
        return recv_all(s) == b""
    except ConnectionResetError:
        return True


def recv_all(sock: socket.socket) -> bytes:
    out = bytearray()
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return bytes(out)
        out += chunk


class LineLog:
    """Lines read from a process's stderr by a thread, with waits that have deadlines."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream) -> None:
        for line in stream:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self.lines.append("<EOF>")
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float = 10.0, start: int = 0) -> str:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines[start:]:
                    if regex.search(line):
                        return line
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (self.lines and self.lines[-1] == "<EOF>"):
                    raise AssertionError(f"no line matching {pattern!r}; got:\n" + "\n".join(self.lines[-30:]))
                self._cond.wait(remaining)

    def access(self) -> list[dict]:
        import json

        with self._cond:
            return [json.loads(line) for line in self.lines if line.startswith("{")]


@contextmanager
def socket_activated(config: Path, listen: list[str], *env: str) -> Iterator[tuple[subprocess.Popen, LineLog]]:
    """``sniproxy run --config config`` under systemd-socket-activate, which binds each
    ``"address:port"`` in ``listen``, then waits for the first connection before it execs the
    proxy with those sockets. Yields once all are bound; stopped by PID at the end (SIGTERM,
    then SIGKILL), and its log printed for the record."""
    cmd = ["systemd-socket-activate", *(f"--listen={a}" for a in listen)]
    for assignment in (*env, f"PYTHONPATH={REPO}"):
        cmd += ["-E", assignment]
    cmd += [sys.executable, "-m", "sniproxy", "run", "--config", str(config)]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env=clean_env())
    log = LineLog(proc.stderr)
    try:
        for address in listen:
            log.wait_for("Listening on " + re.escape(address))
        yield proc, log
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        print("proxy log:\n" + "\n".join(log.lines))


class Proxy:
    """``python -m sniproxy run`` as a real process, with its config written to a temp file."""

    def __init__(self, tmp_path: Path, config: str, extra_args: tuple[str, ...] = (),
                 launcher: tuple[str, ...] = ("-m", "sniproxy")):
        """``launcher``: what follows ``python``; e.g. ``("-c", code)`` to patch a constant of
        the supervisor before it starts (its workers are still started as ``-m sniproxy``)."""
        self.path = tmp_path / "sniproxy.toml"
        self.path.write_text(config)
        self.metrics_port = int(re.search(r"\[metrics\][^\[]*port\s*=\s*(\d+)", config, re.S).group(1))
        self.proc = subprocess.Popen(
            [sys.executable, *launcher, "run", "--config", str(self.path), *extra_args],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=clean_env(), cwd=str(REPO),
        )
        self.log = LineLog(self.proc.stderr)
        line = self.log.wait_for(r"sniproxy\.lifecycle: ready|stopped|error", timeout=20)
        if "ready" not in line:  # a startup failure: wait for the exit, and say what it was
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is not None:
            raise AssertionError("proxy exited: " + "\n".join(self.log.lines))

    def metrics_text(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def metrics(self) -> dict[tuple, float]:
        from prometheus_client.parser import text_string_to_metric_families

        out = {}
        for family in text_string_to_metric_families(self.metrics_text()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out

    def sample(self, name: str, **labels: str) -> float:
        return self.metrics().get((name, tuple(sorted(labels.items()))), 0.0)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def pids(self) -> list[int]:
        """The proxy and its workers (when [server] workers > 1)."""
        pids, todo = [], [self.proc.pid]
        while todo:
            pid = todo.pop()
            pids.append(pid)
            try:
                for tid in os.listdir(f"/proc/{pid}/task"):
                    todo += [int(c) for c in open(f"/proc/{pid}/task/{tid}/children").read().split()]
            except OSError:
                pass
        return pids

    def fds(self, kind: str = "socket") -> int:
        """Open descriptors of one kind ("socket", "pipe", or "" for all) over all processes."""
        total = 0
        for pid in self.pids():
            try:
                for fd in os.listdir(f"/proc/{pid}/fd"):
                    try:
                        total += os.readlink(f"/proc/{pid}/fd/{fd}").startswith(kind)
                    except OSError:
                        pass
            except OSError:
                pass
        return total

    def stop(self, timeout: float = 15) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError("proxy did not stop within %ss" % timeout) from None


def unix_exchange(path: Path, request: bytes, timeout: float = 2.0) -> bytes:
    """Send ``request`` on a unix socket and read the reply until the server closes it (an
    admin socket, a daemon's HTTP/1.0 API). Raises OSError."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(path))
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return data


def haproxy_stats(stats: Path) -> list[dict[str, str]]:
    """HAProxy's ``show stat`` from its admin socket: one row per frontend, backend and server
    (pxname, svname, status...)."""
    data = unix_exchange(stats, b"show stat\n")
    return list(csv.DictReader(io.StringIO(data.decode().lstrip("# "))))


LINGER_RST = struct.pack("ii", 1, 0)
"""SO_LINGER on, 0 s: close() sends a TCP RST."""


def stall_after_hello(release: threading.Event, seen: list) -> Callable[[socket.socket], None]:
    """An upstream that reads the hello, then nothing until ``release``; then records in
    ``seen`` how its socket ended ("eof" or "reset")."""

    def handle(conn: socket.socket) -> None:
        read_hello(conn)
        release.wait(30)
        try:
            while conn.recv(1 << 20):
                pass
            seen.append("eof")
        except ConnectionResetError:
            seen.append("reset")

    return handle


def flood_then_reset(stop: threading.Event) -> Callable[[socket.socket], None]:
    """An upstream that reads the hello, sends as fast as the client lets it until ``stop``,
    then resets the connection."""

    def handle(conn: socket.socket) -> None:
        read_hello(conn)
        conn.settimeout(0.05)
        while not stop.is_set():
            try:
                conn.send(b"y" * 65536)
            except (TimeoutError, BlockingIOError):
                pass
        conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)

    return handle
