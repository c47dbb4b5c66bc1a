"""The pieces of a short connection's path through the engine, each timed alone.

    python bench/micro.py [--sniproxy DIR] [--repeat 7] [--out bench/results/micro]

For each piece of per-connection work (the hello parse, the stats observes, building a
Connection and its two Flows, the address helpers, an enum member load, the libc shutdown
through ctypes, ...): microseconds per call, the minimum over ``--repeat`` timings of many
calls (the minimum is the figure least moved by whatever else runs), and the calls per
connection on `short-issue` (counted with cProfile, written here), so the product is the
piece's share of a connection. Pieces that make a system call include the kernel's part.

``--sniproxy DIR`` times the package in DIR (a `git archive` of another commit, say);
default: the one on sys.path. Writes ``--out``.{md,json} with the commit, command and machine.
"""

from __future__ import annotations

import argparse
import enum
import json
import os
import socket
import sys
import time
import timeit
from pathlib import Path

BENCH = Path(__file__).resolve().parent
OUT = BENCH / "results" / "micro"
CHROME = BENCH / "hellos" / "hello-chrome.bin"


def pieces() -> list[tuple[str, float, str, str, dict]]:
    """(name, calls per connection, statement, setup, namespace). Calls per connection: on
    short-issue, profile a (6 extra routes, IP-literal upstream, access log off), from a
    cProfile run of the engine at 93a6a7b; 0 for an alternative that is not on the path."""
    from sniproxy.addresses import client_key, format_address
    from sniproxy.engine import connection as conn_mod
    from sniproxy.engine.connection import Connection, State
    from sniproxy.engine.context import Context, ListenerInfo
    from sniproxy.engine.events import shutdown_write
    from sniproxy.engine.forward import Flow
    from sniproxy.observe.stats import Histogram, RouteStats, Stats
    from sniproxy.protocol.fasthello import parse_single_record

    hello = CHROME.read_bytes() + b"x" * 63 + b"\n"
    ctx = Context(events=None, routes=None, resolver=None, limits=None, handshakes=None,  # type: ignore[arg-type]
                  stats=Stats(),
                  access_log=None, handshake_timeout=10.0, connect_timeout=5.0, idle_timeout=300.0,
                  splice_after=float(1 << 20), refuse_alert=True, is_loop=lambda ip, port: False,
                  spawn=None)  # type: ignore[arg-type]
    info = ListenerInfo("127.0.4.1:8443", None, False, None)  # type: ignore[arg-type]
    rs = RouteStats("bench")
    a, b = socket.socketpair()
    ns = dict(parse_single_record=parse_single_record, hello=hello, rs=rs, h=Histogram((0.001, 0.01, 0.1, 1.0)),
              Connection=Connection, ctx=ctx, info=info, peer=("127.0.4.100", 40000), cb=lambda c: None,
              Flow=Flow, head=hello[:580], client_key=client_key, format_address=format_address, State=State,
              FORWARDING=State.FORWARDING, s=State.FORWARDING, shutdown_write=shutdown_write, fd=a.fileno(),
              sock=a, buf=bytearray(256 * 1024), n=len(hello), time=time, os=os, conn_mod=conn_mod, socket=socket)

    class Plain(enum.Enum):
        A = "a"
    ns["Plain"] = Plain
    ns["A"] = Plain.A
    return [
        ("parse_single_record(Chrome 517 B hello)", 1, "parse_single_record(hello)", "", ns),
        ("RouteStats.observe_hello (4 histograms)", 1,
         "rs.observe_hello(517, 1, 1, 0.00012, None, False)", "", ns),
        ("Histogram.observe", 2, "h.observe(0.0004)", "", ns),
        ("Connection(...) (constructor)", 1, "Connection(ctx, info, 7, peer, cb)", "", ns),
        ("Flow(...) (constructor)", 2, "Flow(5, 6, 1048576.0, head=head)", "", ns),
        ("client_key(IPv4)", 3, "client_key('127.0.4.100')", "", ns),
        ("format_address(IPv4, port)", 1, "format_address('127.0.4.2', 9000)", "", ns),
        ("bytes(buffer[:n]) (the hello copied out of the scratch buffer)", 1, "bytes(buf[:n])", "", ns),
        ("time.monotonic()", 5, "time.monotonic()", "", ns),
        ("IntEnum member from its class (State.FORWARDING)", 0, "State.FORWARDING", "", ns),
        ("... the same member from a module-level alias", 0, "FORWARDING", "", ns),
        ("'x is State.FORWARDING' (a state test)", 0, "s is State.FORWARDING", "", ns),
        ("Enum member from its class (plain Enum)", 0, "Plain.A", "", ns),
        ("shutdown_write(fd) (libc through ctypes; kernel included)", 1, "shutdown_write(fd)", "", ns),
        ("sock.shutdown(SHUT_WR) on a socket object (kernel included)", 0, "sock.shutdown(socket.SHUT_WR)", "", ns),
        ("os.set_blocking(fd, False) (ioctl; kernel included)", 1, "os.set_blocking(fd, False)", "", ns),
        ("connection._enter (the transition table check)", 2,
         "c.state = State.HELLO; c._enter(State.CONNECTING)", "c = Connection(ctx, info, 7, peer, cb)", ns),
        ("... a plain state assignment instead", 0,
         "c.state = State.HELLO; c.state = State.CONNECTING", "c = Connection(ctx, info, 7, peer, cb)", ns),
    ]


def time_piece(stmt: str, setup: str, ns: dict, repeat: int) -> float:
    """Microseconds per call: the minimum over ``repeat`` timings of about 0.1 s each."""
    t = timeit.Timer(stmt, setup=setup or "pass", globals=ns)
    number, _ = t.autorange()
    number = max(number, 1)
    return min(t.repeat(repeat=repeat, number=number)) / number * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sniproxy", help="a directory holding the sniproxy package to time")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--out", default=str(OUT))
    a = ap.parse_args()
    if a.sniproxy:
        sys.path.insert(0, str(Path(a.sniproxy).resolve()))
    sys.path.insert(1, str(BENCH))
    from provenance import header, provenance

    rows = []
    for name, per_conn, stmt, setup, ns in pieces():
        us = time_piece(stmt, setup, ns, a.repeat)
        rows.append({"piece": name, "us_per_call": us, "calls_per_conn": per_conn, "us_per_conn": us * per_conn})
        print(f"{us:8.3f} µs × {per_conn:g} = {us * per_conn:7.3f} µs/conn  {name}", flush=True)
    import sniproxy
    meta = {"date": time.strftime("%Y-%m-%d %H:%M:%S %z"), "sniproxy": str(Path(sniproxy.__file__).parent),
            "repeat": a.repeat, "loadavg": os.getloadavg()[0], **provenance()}
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    L = ["# The per-connection pieces, timed alone\n", f"{meta['date']} · sniproxy from {meta['sniproxy']} · "
         f"minimum of {a.repeat} timings · load average {meta['loadavg']:.2f}\n", header(meta),
         "Calls per connection: `short-issue`, profile a, counted with cProfile. System calls include the "
         "kernel's part.\n", "| piece | µs per call | calls/conn | µs/conn |", "|---|---:|---:|---:|"]
    L += [f"| {r['piece']} | {r['us_per_call']:.3f} | {r['calls_per_conn']:g} | {r['us_per_conn']:.2f} |" for r in rows]
    out.with_suffix(".md").write_text("\n".join(L) + "\n")
    print(f"wrote {out}.md and {out}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
