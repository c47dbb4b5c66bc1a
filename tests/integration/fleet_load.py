"""Load for the fleet tests (reloads under load, failover behind HAProxy), run as separate
processes: ``python -m tests.integration.fleet_load echo|clients|bulk ...``.

Each part has its own process, so a stalled echo, a busy bulk sender or the test's own
threads cannot hold the GIL that timestamps a client connection: a stall measured is a stall
of the proxy. Every part prints one ``ready`` line on stdout when it has started, runs until
its stdin closes (or ``--max-seconds``, a safety bound), then prints one JSON document.

- ``echo``: an echo upstream, plain or TLS, on one event loop.
- ``clients``: an open-loop client (connections start on a schedule, not when the last one
  ended, so a stall cannot hide by slowing the offered rate). Each connection: connect,
  a real ClientHello (or a verified TLS handshake and a payload), the same bytes echoed
  back, close. One record per connection: start, time to first byte, end, error, the
  client's port (to find the connection in the proxy's access log), the SYNs the kernel
  retransmitted before the connect completed (``TCP_INFO``: a SYN dropped on the way in,
  seen as a 1 s wait), and how late the client itself started it (its own schedule: a
  client starved of CPU shows here, not the proxy).
- ``bulk``: long transfers through an echo upstream, paced, sha256-checked both ways.

Times are ``time.monotonic()``, which is one clock for every process on the machine, so
the test can set its own events (a signal sent, a log line seen) against the records.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

#: Linux: bind a source address now, pick the port at connect (not a port per bind(2)).
IP_BIND_ADDRESS_NO_PORT = getattr(socket, "IP_BIND_ADDRESS_NO_PORT", 24)
MiB = 1 << 20
#: struct tcp_info (linux/tcp.h): tcpi_total_retrans, the segments this socket retransmitted;
#: read right after the connect, these are its SYN's retransmissions.
_TCP_INFO_TOTAL_RETRANS = 100
#: The niceness the fleet tests give the processes they start: their load generator, echo
#: upstream, balancer and proxies must not queue behind another job's CPU on a shared machine
#: (what they time is the proxy's behaviour, not the machine's load).
FLEET_NICE = -10


def syn_retransmits(sock: socket.socket) -> int:
    """SYNs the kernel sent again before this just-connected socket's handshake completed."""
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_TOTAL_RETRANS + 4)
    except OSError:
        return 0
    return struct.unpack_from("<I", info, _TCP_INFO_TOTAL_RETRANS)[0] if len(info) >= _TCP_INFO_TOTAL_RETRANS + 4 else 0


@contextmanager
def raised_priority(nice: int = FLEET_NICE) -> Iterator[bool]:
    """Run the calling thread, and every process and thread it starts meanwhile, at ``nice``
    (Linux keeps niceness per thread, and children inherit it). Yields whether it could:
    raising priority takes root (CAP_SYS_NICE), which CI has."""
    before = os.getpriority(os.PRIO_PROCESS, 0)
    try:
        os.setpriority(os.PRIO_PROCESS, 0, nice)
        raised = True
    except OSError:
        raised = False
    try:
        yield raised
    finally:
        if raised:
            os.setpriority(os.PRIO_PROCESS, 0, before)


def assert_no_stall(figures: ClientFigures, where: str = "the proxy") -> None:
    """No SYN dropped on the way in (a full listen queue costs TCP's 1 s initial retransmission
    timeout), and no connection over 1 s to its first byte."""
    assert not figures.syn_retransmitted, (
        f"{len(figures.syn_retransmitted)} SYNs to {where} were dropped and sent again "
        f"(first: {figures.syn_retransmitted[:3]}): {figures.summary()}")
    assert not figures.slow, f"{len(figures.slow)} connections over 1 s to first byte: {figures.summary()}"


def _raise_own_priority() -> None:
    """Every part runs at FLEET_NICE when it may (root): the load generator, the echo and the
    bulk sender must not queue for CPU behind another job on a shared machine, or the test
    times the machine's load, not the proxy. Before any thread starts, so all inherit it."""
    try:
        os.setpriority(os.PRIO_PROCESS, 0, min(FLEET_NICE, os.getpriority(os.PRIO_PROCESS, 0)))
    except OSError:
        pass


def _wait_stdin_eof(stop: threading.Event) -> None:
    sys.stdin.buffer.read()
    stop.set()


def _stop_event(max_seconds: float) -> threading.Event:
    """Set when stdin closes, or after max_seconds whatever happens."""
    stop = threading.Event()
    threading.Thread(target=_wait_stdin_eof, args=(stop,), daemon=True).start()
    timer = threading.Timer(max_seconds, stop.set)
    timer.daemon = True
    timer.start()
    return stop


def _print(doc: object) -> None:
    sys.stdout.write(json.dumps(doc) + "\n")
    sys.stdout.flush()


# -- echo ------------------------------------------------------------------------------------

async def _echo(args: argparse.Namespace) -> dict:
    """One event loop accepts and echoes every connection: under load, a thread per
    connection (this part's first form) accepted too slowly, and its listen queue overflowed:
    SYNs dropped, connections waiting 1 s for TCP's retransmission (seen with a kernel
    tracepoint, and in TcpExtListenOverflows)."""
    tls = None
    if args.cert:
        tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        tls.load_cert_chain(args.cert)
    counts = {"accepted": 0, "errors": 0}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        counts["accepted"] += 1
        try:
            async with asyncio.timeout(60):
                while data := await reader.read(1 << 20):
                    writer.write(data)
                    await writer.drain()
                if tls is None:
                    writer.write_eof()
        except (OSError, ssl.SSLError, TimeoutError):
            counts["errors"] += 1  # the clients' own records say whether it mattered
        finally:
            writer.close()

    # TLS 1.3 servers write their session tickets in small records after the handshake:
    # asyncio sets TCP_NODELAY on its TCP transports, so the echo does not wait behind them.
    from sniproxy.engine.listener import BACKLOG  # as deep a listen queue as the proxy's own

    server = await asyncio.start_server(serve, args.host, 0, ssl=tls, backlog=BACKLOG, reuse_address=True)
    _print({"ready": True, "port": server.sockets[0].getsockname()[1]})
    stop = _stop_event(args.max_seconds)
    await asyncio.get_running_loop().run_in_executor(None, stop.wait)
    server.close()
    return counts


def run_echo(args: argparse.Namespace) -> None:
    _print(asyncio.run(_echo(args)))


# -- clients ---------------------------------------------------------------------------------

def hellos(sni: str, n: int = 32) -> list[bytes]:
    from tests.integration.conftest import make_hello

    return [make_hello(sni) for _ in range(n)]  # distinct randoms and key shares, cycled


async def _one(args: argparse.Namespace, due: float, start: float, payload: bytes, tls: ssl.SSLContext | None,
               records: list) -> None:
    first = None
    error = None
    writer = None
    port = None
    syns = 0
    sock = socket.socket()
    try:
        async with asyncio.timeout(args.timeout):
            if args.bind:
                sock.setsockopt(socket.IPPROTO_IP, IP_BIND_ADDRESS_NO_PORT, 1)
                sock.bind((args.bind, 0))
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (args.host, args.port))
            port = sock.getsockname()[1]
            syns = syn_retransmits(sock)
            reader, writer = await asyncio.open_connection(sock=sock, ssl=tls, server_hostname=tls and args.sni)
            writer.write(payload)
            got = await reader.read(len(payload))
            if not got:
                raise ConnectionError("EOF before the echo")
            first = time.monotonic() - start
            while len(got) < len(payload):
                more = await reader.read(len(payload) - len(got))
                if not more:
                    raise ConnectionError(f"EOF after {len(got)} of {len(payload)} bytes")
                got += more
            if got != payload:
                raise ValueError("echo differs from what was sent")
    except (OSError, ssl.SSLError, TimeoutError, ValueError, asyncio.IncompleteReadError) as exc:
        error = f"{type(exc).__name__}: {exc}"[:200]
    finally:
        if writer is not None:
            writer.close()
        else:
            sock.close()
    records.append((start, first, time.monotonic(), error, port, syns, start - due))


async def _clients(args: argparse.Namespace) -> dict:
    tls = None
    if args.tls_ca:  # the payload goes inside the TLS session; the hello is ssl's own
        tls = ssl.create_default_context(cafile=args.tls_ca)
        pool = [os.urandom(args.payload) for _ in range(32)]
    else:
        pool = hellos(args.sni)
    records: list = []
    tasks: set[asyncio.Task] = set()
    stop = _stop_event(args.max_seconds)
    loop = asyncio.get_running_loop()
    _print({"ready": True})
    began = time.monotonic()
    i = 0
    while not stop.is_set():
        due = began + i / args.rate
        delay = due - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(_one(args, due, time.monotonic(), pool[i % len(pool)], tls, records))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
        i += 1
    ended = time.monotonic()
    if tasks:
        await asyncio.wait(tasks, timeout=args.timeout + 1)
    return {"records": sorted(records), "began": began, "ended": ended, "offered": i}


def run_clients(args: argparse.Namespace) -> None:
    _print(asyncio.run(_clients(args)))


# -- bulk ------------------------------------------------------------------------------------

def _transfer(args: argparse.Namespace, stop: threading.Event, hello: bytes, out: dict) -> None:
    out.update(start=time.monotonic(), end=None, sent=0, received=0, error=None, intact=False)
    sent, received = hashlib.sha256(), hashlib.sha256()
    errors: list[str] = []
    try:
        s = socket.create_connection((args.host, args.port), timeout=30)
    except OSError as exc:
        out.update(error=f"connect: {exc}", end=time.monotonic())
        return
    block = os.urandom(MiB)
    minimum, maximum, rate = args.min_mib * MiB, args.max_mib * MiB, args.rate_mib * MiB

    def send() -> None:
        try:
            s.sendall(hello)
            sent.update(hello)
            n, began = 0, time.monotonic()
            while n < maximum and not (stop.is_set() and n >= minimum):
                ahead = n / rate - (time.monotonic() - began)
                if ahead > 0:
                    time.sleep(ahead)
                chunk = block[n % 997:] + block[: n % 997]  # every MiB differs: a dropped or repeated one shows
                s.sendall(chunk)
                sent.update(chunk)
                n += len(chunk)
            out["sent"] = n + len(hello)
            s.shutdown(socket.SHUT_WR)
        except OSError as exc:
            errors.append(f"send: {exc}")

    sender = threading.Thread(target=send)
    sender.start()
    try:
        while data := s.recv(MiB):
            received.update(data)
            out["received"] += len(data)
    except OSError as exc:
        errors.append(f"receive: {exc}")
    sender.join()
    s.close()
    out["end"] = time.monotonic()
    out["error"] = "; ".join(errors) or None
    out["intact"] = not errors and out["received"] == out["sent"] and received.digest() == sent.digest()


def run_bulk(args: argparse.Namespace) -> None:
    stop = _stop_event(args.max_seconds)
    pool = hellos(args.sni, args.count)
    results: list[dict] = [{} for _ in range(args.count)]
    threads = [threading.Thread(target=_transfer, args=(args, stop, pool[i], results[i])) for i in range(args.count)]
    for t in threads:
        t.start()
    _print({"ready": True})
    for t in threads:
        t.join()
    _print({"transfers": results})


# -- the test side ---------------------------------------------------------------------------

class Load:
    """One part as a subprocess; ``finish()`` closes its stdin and returns its JSON document."""

    def __init__(self, *args: str, timeout: float = 30.0):
        from tests.helpers import REPO, clean_env

        self.timeout = timeout
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.integration.fleet_load", *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=clean_env(), cwd=str(REPO))
        line = self.proc.stdout.readline()  # the child's own start-up is bounded: it binds or fails
        if not line:
            self.proc.wait(5)
            raise AssertionError(f"fleet_load {args[0]} did not start (exit {self.proc.returncode})")
        self.ready = json.loads(line)

    def finish(self) -> dict:
        try:
            out, _ = self.proc.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"fleet_load did not finish within {self.timeout}s") from None
        return json.loads(out.splitlines()[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(5)


@dataclass
class ClientFigures:
    """What a ``clients`` run measured."""

    made: int
    failed: list[tuple]
    ttfb: list[float]
    rate: float
    syn_retransmitted: list[tuple]
    """Connections whose SYN the kernel had to send again: dropped on the way in (a full
    listen queue), which costs the 1 s of TCP's initial retransmission timeout."""
    late: float
    """How late the client started its most delayed connection, against its own schedule
    (seconds): a client starved of CPU, not a slow proxy."""

    @classmethod
    def of(cls, doc: dict) -> ClientFigures:
        records = doc["records"]
        failed = [tuple(r) for r in records if r[3] is not None]
        ttfb = sorted(r[1] for r in records if r[1] is not None)
        syns = [tuple(r) for r in records if r[5]]
        late = max((r[6] for r in records), default=0.0)
        return cls(len(records), failed, ttfb, len(records) / max(doc["ended"] - doc["began"], 1e-9), syns, late)

    def percentile(self, p: float) -> float:
        if not self.ttfb:
            return float("nan")
        return self.ttfb[min(len(self.ttfb) - 1, int(p / 100 * len(self.ttfb)))]

    @property
    def slow(self) -> list[float]:
        return [t for t in self.ttfb if t > 1.0]

    def summary(self) -> str:
        return (f"{self.made} connections ({self.rate:.0f}/s), {len(self.failed)} failed, {len(self.slow)} over 1 s "
                f"to first byte; first byte p50 {self.percentile(50) * 1000:.1f} ms, "
                f"p99 {self.percentile(99) * 1000:.1f} ms, max {(self.ttfb[-1] if self.ttfb else 0) * 1000:.1f} ms; "
                f"{len(self.syn_retransmitted)} SYNs retransmitted; the client ran up to {self.late * 1000:.0f} ms "
                f"behind its schedule; load average {os.getloadavg()[0]:.1f}")


#: Measured figures, printed at the end of the session (and at once, for ``-s``).
FIGURES: dict[str, str] = {}


class _PrintFigures:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        terminalreporter.section("fleet figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")


def report(request, key: str, value: str) -> None:
    """Keep a figure for the session's summary; ``request`` is the test's fixture request."""
    plugins = request.config.pluginmanager
    if not plugins.has_plugin("fleet-figures"):
        plugins.register(_PrintFigures(), "fleet-figures")
    FIGURES[key] = value
    print(f"{key}: {value}")


def main() -> None:
    p = argparse.ArgumentParser(prog="fleet_load")
    sub = p.add_subparsers(dest="part", required=True)
    e = sub.add_parser("echo")
    e.add_argument("--host", required=True)
    e.add_argument("--cert", help="PEM with key and chain: serve TLS")
    c = sub.add_parser("clients")
    c.add_argument("--host", required=True)
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--sni", required=True)
    c.add_argument("--rate", type=float, default=200)
    c.add_argument("--bind", help="source address")
    c.add_argument("--tls-ca", help="CA file: do a verified TLS handshake and echo --payload bytes")
    c.add_argument("--payload", type=int, default=4096)
    c.add_argument("--timeout", type=float, default=10.0)
    b = sub.add_parser("bulk")
    b.add_argument("--host", required=True)
    b.add_argument("--port", type=int, required=True)
    b.add_argument("--sni", required=True)
    b.add_argument("--count", type=int, default=4)
    b.add_argument("--rate-mib", type=float, default=32, help="per transfer, each way")
    b.add_argument("--min-mib", type=int, default=256)
    b.add_argument("--max-mib", type=int, default=1024)
    for sp in (e, c, b):
        sp.add_argument("--max-seconds", type=float, default=120.0)
    args = p.parse_args()
    _raise_own_priority()
    {"echo": run_echo, "clients": run_clients, "bulk": run_bulk}[args.part](args)


if __name__ == "__main__":
    main()
