"""What one misbehaving client costs everyone else (issue 18), with the defaults, on a fresh
``sniproxy run`` per measurement, for this checkout and for an older one side by side:

- **starvation**: another client's success rate while silent connections fill the table
  (one address, as a buggy build script; then a hundred, as a NAT'd farm of them);
- **hello cost**: CPU per connection for hellos of every hostile shape, as a multiple of a
  normal 517 B hello's (each one refused, so the hello is all that is measured), and of a
  normal proxied connection;
- **partial hellos**: RSS per held partial hello of 60 KiB, and what the budget holds.

    python bench/abuse.py                      # this checkout
    python bench/abuse.py --also old=e4d4190   # and an older commit beside it

Writes bench/results/abuse.{md,json}, stamped with commit, command and machine. Loads are
bounded in count and time; every process is stopped by pid.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from procs import tree_rss_kib, tree_runtime_s  # noqa: E402
from provenance import REPO, header, provenance  # noqa: E402

HOST = "127.0.5.1"
UPSTREAM = ("127.0.5.2", 9100)
NAME = "bench.example.com"
HELLOS = Path(__file__).resolve().parent / "hellos"


# -- hellos -------------------------------------------------------------------------------------

def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def ext(kind: int, body: bytes) -> bytes:
    return u16(kind) + u16(len(body)) + body


def sni(name: str) -> bytes:
    host = name.encode()
    return ext(0, u16(len(host) + 3) + b"\x00" + u16(len(host)) + host)


def body(*extensions: bytes) -> bytes:
    exts = b"".join(extensions)
    return b"\x03\x03" + bytes(32) + b"\x20" + bytes(32) + u16(2) + b"\x13\x01" + b"\x01\x00" + u16(len(exts)) + exts


def message(b: bytes) -> bytes:
    return b"\x01" + len(b).to_bytes(3, "big") + b


def records(msg: bytes, size: int) -> bytes:
    return b"".join(b"\x16\x03\x01" + u16(len(msg[i:i + size])) + msg[i:i + size] for i in range(0, len(msg), size))


def shapes() -> dict[str, tuple[bytes | list[bytes], int]]:
    """name -> (bytes, or a list of them taken in turn, and how many writes to send each in);
    every name is unrouted but the proxied one."""
    normal = (HELLOS / "hello-normal.bin").read_bytes()
    unrouted = NAME.replace("bench", "other")
    pad = lambda n: ext(21, bytes(n))  # noqa: E731
    max_body = body(sni(unrouted), pad(65536 - len(body(sni(unrouted), pad(0)))))
    return {
        "normal 517 B hello": (normal.replace(NAME.encode(), unrouted.encode()), 1),
        "64 KiB hello, 16 KiB records (largest valid)": (records(message(max_body), 16384), 1),
        "64 KiB hello in 64 records (most records allowed)": (records(message(max_body), -(-len(message(max_body)) // 64)), 1),
        "64 KiB hello, 1-byte records": (records(message(max_body), 1), 1),
        "15,000 extensions": (records(message(body(sni(unrouted), *[ext(0x1000 + i, b"") for i in range(15000)])), 16384), 1),
        "30,000 ALPN names": (records(message(body(sni(unrouted), ext(16, u16(60000) + b"\x01p" * 30000))), 16384), 1),
        "12,000 key shares": (records(message(body(sni(unrouted), ext(51, u16(12000 * 5) + b"".join(
            u16(0x2000 + i) + u16(1) + b"\x01" for i in range(12000))))), 16384), 1),
        # The whole hello, so that it completes (or meets the read bound) and never waits
        # for the handshake timeout.
        "517 B hello, one byte per segment": (normal.replace(NAME.encode(), unrouted.encode()), len(normal)),
        # The fast path's learned layouts (sniproxy/protocol/fasthello.py): hellos of one
        # shape whose extensions come in a new order each time (as Chrome's do) are walked
        # every time; a new layout sent twice in a row, over and over, asks for a compile
        # every other hello (the budget allows one per 16 walks).
        "18 extensions shuffled on every hello (walked each time)": (shuffled(unrouted, 60), 1),
        "a new layout every other hello (compiles asked for)": (pairs_of_new_layouts(unrouted, 60), 1),
    }


def eighteen_extensions(name: str) -> list[bytes]:
    """A Chrome-like set: the name, ALPN, key shares and 15 others of the usual sizes."""
    others = [ext(kind, bytes(size)) for kind, size in [(5, 5), (10, 10), (11, 2), (13, 18), (18, 0), (23, 0),
                                                        (27, 3), (35, 0), (43, 7), (45, 2), (17513, 5),
                                                        (65281, 1), (21, 200), (0xFE0D, 186), (0x0A0A, 0)]]
    alpn = ext(16, u16(12) + b"\x02h2\x08http/1.1")
    shares = ext(51, u16(2 * 4 + 32 + 1) + u16(0x1A1A) + u16(1) + b"\x00" + u16(29) + u16(32) + bytes(32))
    return [sni(name), alpn, shares] + others


def shuffled(name: str, n: int) -> list[bytes]:
    rng = random.Random(21)
    out = []
    for _ in range(n):
        extensions = eighteen_extensions(name)
        rng.shuffle(extensions)
        out.append(records(message(body(*extensions)), 16384))
    return out


def pairs_of_new_layouts(name: str, n: int) -> list[bytes]:
    out = []
    for i in range(n // 2):
        hello = records(message(body(*eighteen_extensions(name), ext(0x3000 + i, bytes(i)))), 16384)
        out += [hello, hello]
    return out


# -- a proxy ------------------------------------------------------------------------------------

class Proxy:
    def __init__(self, source: str, port: int, server: str = "", workdir: Path | None = None):
        self.dir = Path(tempfile.mkdtemp(prefix="abuse-", dir=workdir))
        self.port = port
        self.metrics = free_port()
        config = (f'[[listen]]\naddress = "{HOST}"\nport = {port}\n[resolver]\nnameservers = ["127.0.0.1"]\n'
                  f'[server]\n{server}\n[metrics]\naddress = "127.0.0.1"\nport = {self.metrics}\n[log]\naccess = "off"\n'
                  f'[[route]]\nname = "bench"\nsni = "{NAME}"\nupstream = "{UPSTREAM[0]}"\nport = {UPSTREAM[1]}\n')
        (self.dir / "c.toml").write_text(config)
        env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": source, "HOME": "/root"}
        # cwd: `python -m` puts it first on sys.path, and this checkout's sniproxy/ must not
        # shadow the one PYTHONPATH names.
        self.proc = subprocess.Popen([sys.executable, "-m", "sniproxy", "run", "--config", str(self.dir / "c.toml")],
                                     env=env, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True,
                                     cwd=self.dir)
        deadline = time.monotonic() + 20
        line = ""
        for line in self.proc.stderr:
            if "ready" in line:
                break
            if time.monotonic() > deadline:
                raise RuntimeError("proxy did not start")
        else:
            raise RuntimeError(f"proxy exited {self.proc.wait()}: {line.strip()}")
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()

    def cpu(self) -> float:
        """Run time of every thread, in seconds to the nanosecond (schedstat, not 10 ms ticks)."""
        return tree_runtime_s([self.proc.pid])

    def rss_kib(self) -> int:
        return tree_rss_kib([self.proc.pid])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)


_used: set[int] = set()


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _used:
            _used.add(port)
            return port


def echo_upstream(stop: threading.Event) -> socket.socket:
    srv = socket.create_server(UPSTREAM, backlog=1024, reuse_port=False)
    srv.settimeout(0.2)

    def serve():
        while not stop.is_set():
            try:
                c, _ = srv.accept()
            except (TimeoutError, OSError):
                continue
            threading.Thread(target=_echo, args=(c,), daemon=True).start()

    threading.Thread(target=serve, daemon=True).start()
    return srv


def _echo(c: socket.socket) -> None:
    c.settimeout(10)
    try:
        while data := c.recv(65536):
            c.sendall(data)
    except OSError:
        pass
    finally:
        c.close()


def connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    s = socket.create_connection((HOST, port), timeout=5, source_address=(source, 0))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def proxied(port: int, source: str) -> bool:
    hello = (HELLOS / "hello-normal.bin").read_bytes()
    try:
        with connect(port, source) as s:
            s.sendall(hello)
            got = b""
            while len(got) < len(hello):
                chunk = s.recv(65536)
                if not chunk:
                    return False
                got += chunk
            return got == hello
    except OSError:
        return False


# -- measurements --------------------------------------------------------------------------------

def starvation(source: str, addresses: int, table: int = 10000, tries: int = 100) -> dict:
    """``table`` silent connections from ``addresses`` source addresses, then ``tries`` proxied
    connections from another address: how many succeed."""
    port = free_port()
    proxy = Proxy(source, port)
    silent = []
    try:
        for i in range(table):
            try:
                silent.append(connect(port, f"127.0.{6 + i % addresses // 250}.{1 + i % addresses % 250}"))
            except OSError:
                break
        time.sleep(1.0)  # let the proxy accept what it will (bounded; this is a benchmark, not a test)
        ok = sum(proxied(port, "127.0.9.9") for _ in range(tries))
        return {"silent_opened": len(silent), "addresses": addresses, "tries": tries, "succeeded": ok}
    finally:
        for s in silent:
            s.close()
        proxy.stop()


def hello_cost(source: str, runs: int) -> dict:
    out: dict[str, list[float]] = {}
    port = free_port()
    proxy = Proxy(source, port)
    try:
        for name, (data, writes) in shapes().items():
            print(f"  hello cost: {name}", file=sys.stderr, flush=True)
            n = 300 if name.startswith("normal") else 60
            for _ in range(runs):
                before = proxy.cpu()
                if writes == 1:
                    each = data if isinstance(data, list) else [data]
                    for i in range(n):
                        with connect(port) as s:
                            try:
                                s.sendall(each[i % len(each)])
                                while s.recv(65536):
                                    pass
                            except OSError:
                                pass
                else:
                    trickle(port, data, n)
                out.setdefault(name, []).append((proxy.cpu() - before) / n * 1e6)
        for _ in range(runs):
            before = proxy.cpu()
            for _ in range(200):
                proxied(port, "127.0.0.1")
            out.setdefault("normal proxied connection", []).append((proxy.cpu() - before) / 200 * 1e6)
    finally:
        proxy.stop()
    return {name: statistics.median(v) for name, v in out.items()}


def trickle(port: int, data: bytes, n: int) -> None:
    """``n`` connections at once, each sent ``data`` one byte per segment, 0.5 ms apart: side
    by side, so that the proxy's own background work over that time (its once-a-second
    sweep and stats) is shared by all of them rather than charged to each."""
    socks = [connect(port) for _ in range(n)]
    try:
        for i in range(len(data)):
            for s in socks:
                try:
                    s.send(data[i:i + 1])
                except OSError:
                    pass
            time.sleep(0.0005)
        for s in socks:
            try:
                while s.recv(65536):
                    pass
            except OSError:
                pass
    finally:
        for s in socks:
            s.close()


def partial_hellos(source: str, count: int, budget: int | None) -> dict:
    port = free_port()
    proxy = Proxy(source, port, server=f"max_hello_memory = {budget}" if budget else "")
    held = []
    msg = message(b"\x03\x03" + bytes(65_000))  # announces 65 KB, of which 60 KiB are sent
    partial = records(msg, 16384)[: 60 * 1024]
    try:
        time.sleep(0.5)
        base = proxy.rss_kib()
        for i in range(count):
            s = connect(port, f"127.0.{6 + i // 250}.{1 + i % 250}")
            s.sendall(partial)
            held.append(s)
        time.sleep(2.0)
        rss = proxy.rss_kib()
        alive = 0
        for s in held:
            s.setblocking(False)
            try:
                alive += s.recv(1) != b""
            except BlockingIOError:
                alive += 1
            except OSError:
                pass
        return {"sent": count, "bytes_each": len(partial), "still_held": alive,
                "rss_kib_per_held": round((rss - base) / max(alive, 1), 1), "rss_delta_mib": round((rss - base) / 1024, 1)}
    finally:
        for s in held:
            s.close()
        proxy.stop()


def archive(ref: str, dest: Path) -> str:
    dest.mkdir(parents=True, exist_ok=True)
    data = subprocess.run(["git", "-C", str(REPO), "archive", ref, "sniproxy"], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=data, check=True)
    return str(dest)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--also", action="append", default=[], metavar="NAME=REF", help="also measure this git ref")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "abuse"))
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    stop = threading.Event()
    srv = echo_upstream(stop)
    sources = {"this checkout": str(REPO)}
    work = Path(tempfile.mkdtemp(prefix="abuse-src-"))
    for item in a.also:
        name, ref = item.split("=", 1)
        sources[f"{name} ({ref})"] = archive(ref, work / name)
    results: dict = {}
    try:
        for label, source in sources.items():
            print(f"{label}", file=sys.stderr, flush=True)
            r = results[label] = {}
            r["starvation, 1 address"] = starvation(source, 1)
            r["starvation, 100 addresses"] = starvation(source, 100)
            r["hello cost us/conn"] = hello_cost(source, a.runs)
            try:
                r["partial hellos, budget 128 MiB"] = partial_hellos(source, 1000, 128 << 20)
            except RuntimeError as e:  # a commit from before the budget existed refuses the key
                r["partial hellos, budget 128 MiB"] = {"error": str(e)}
            r["partial hellos, defaults"] = partial_hellos(source, 1000, None)
    finally:
        stop.set()
        srv.close()
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), **provenance(), "loadavg": os.getloadavg()}
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "results": results}, indent=1))
    lines = ["# What one misbehaving client costs the others\n", header(meta)]
    for label, r in results.items():
        lines.append(f"\n## {label}\n")
        for key in ("starvation, 1 address", "starvation, 100 addresses"):
            s = r[key]
            lines.append(f"- {key}: {s['silent_opened']} silent connections; another client: "
                         f"{s['succeeded']}/{s['tries']} proxied")
        cost = r["hello cost us/conn"]
        normal, full = cost["normal 517 B hello"], cost["normal proxied connection"]
        lines.append("\n| hello | CPU µs/conn | × normal hello | × normal proxied connection |\n|---|---:|---:|---:|")
        for name, us in cost.items():
            lines.append(f"| {name} | {us:.0f} | {us / normal:.1f}× | {us / full:.1f}× |")
        for key in ("partial hellos, budget 128 MiB", "partial hellos, defaults"):
            p = r[key]
            if "error" in p:
                lines.append(f"\n- {key}: not measured ({p['error']})")
                continue
            lines.append(f"\n- {key}: {p['sent']} sent of {p['bytes_each']} B each, {p['still_held']} held, "
                         f"RSS +{p['rss_delta_mib']} MiB, {p['rss_kib_per_held']} KiB per held one")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(out.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
