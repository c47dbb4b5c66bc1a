"""Reading what the proxy says about itself: /metrics (parsed with prometheus_client's own
parser) and its JSON access log, once every connection has finished."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from .procs import wait_until
from .world import API, DKR, NAMES, S3, UPSTREAM_BY_NAME, Proxy

ROUTE = {API: "ecr-api", DKR: "ecr-dkr", S3: "ecr-s3"}


@dataclass(frozen=True)
class Snapshot:
    samples: dict[tuple[str, frozenset], float]
    log: list[dict]

    def value(self, name: str, **labels: str) -> float:
        return self.samples.get((name, frozenset(labels.items())), 0.0)

    def by_label(self, name: str, label: str) -> dict[str, float]:
        out = {}
        for (sample, labels), value in self.samples.items():
            if sample == name:
                out[dict(labels)[label]] = value
        return out

    def bytes(self, route: str) -> tuple[int, int]:
        return (int(self.value("sniproxy_bytes_total", route=route, direction="to_upstream")),
                int(self.value("sniproxy_bytes_total", route=route, direction="to_client")))


def parse(text: str) -> dict[tuple[str, frozenset], float]:
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def settled(proxy: Proxy, timeout: float = 15.0) -> Snapshot:
    """Wait until no connection is open and the access log holds one line for every
    connection the metrics counted (routed or refused); return both."""
    def look() -> Snapshot | None:
        proxy.service.check_alive()
        snap = Snapshot(parse(proxy.metrics_text()), proxy.access_log())
        active = sum(snap.by_label("sniproxy_connections_active", "route").values())
        counted = (sum(snap.by_label("sniproxy_connections_total", "route").values())
                   + sum(snap.by_label("sniproxy_connections_rejected_total", "reason").values()))
        return snap if active == 0 and counted == len(snap.log) else None
    try:
        return wait_until(look, timeout, "the proxy to settle (no active connection, "
                                         "one access-log line per counted connection)")
    except TimeoutError as exc:
        raise TimeoutError(f"{exc}\n{held_sockets(proxy.service.pid)}") from None


_TCP_STATES = {"01": "ESTABLISHED", "02": "SYN_SENT", "03": "SYN_RECV", "04": "FIN_WAIT1",
               "05": "FIN_WAIT2", "06": "TIME_WAIT", "07": "CLOSE", "08": "CLOSE_WAIT",
               "09": "LAST_ACK", "0A": "LISTEN", "0B": "CLOSING"}


def _address(end: str) -> str:
    hex_addr, hex_port = end.split(":")
    return f"{socket.inet_ntoa(int(hex_addr, 16).to_bytes(4, 'little'))}:{int(hex_port, 16)}"


def held_sockets(pid: int) -> str:
    """The TCP sockets a process holds open, as the kernel sees them: one line each.

    A held socket missing from the namespace's TCP table was closed by the kernel (a reset,
    or both FINs done) while the process kept its descriptor: the process missed that event.
    """
    known: dict[str, str] = {}
    for table in ("tcp", "udp", "unix"):
        try:
            rows = Path(f"/proc/{pid}/net/{table}").read_text().splitlines()[1:]
        except OSError:
            return f"(cannot read /proc/{pid}: {table})"
        for row in rows:
            fields = row.split()
            if table == "unix":
                known[fields[6]] = "unix"
            elif table == "udp":
                known[fields[9]] = "udp"
            else:
                state = _TCP_STATES.get(fields[3], fields[3])
                known[fields[9]] = f"tcp {_address(fields[1])} {_address(fields[2])} {state}"
    lines = []
    for fd in sorted(Path(f"/proc/{pid}/fd").iterdir(), key=lambda p: int(p.name)):
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            what = known.get(target[8:-1], "tcp, gone from the table: closed by the kernel")
            if not what.startswith(("unix", "udp")) and not what.endswith("LISTEN"):
                lines.append(f"  fd {fd.name}: {what}")
    return f"TCP sockets pid {pid} holds, besides listeners ({len(lines)}):\n" + "\n".join(lines)


def routed(snap: Snapshot, client_ip: str, listeners: dict[str, str]) -> dict[str, tuple[int, int, int]]:
    """Check that every connection in `snap` came from `client_ip` to the listener `listeners`
    names for its SNI, took that SNI's route to its upstream, and that the access log and the
    metrics agree on connections and bytes per route; nothing was refused.

    Returns {route: (bytes to upstream, bytes to client, connections)} for every route.
    """
    for entry in snap.log:
        assert entry["sni"] in NAMES, entry
        assert entry["route"] == ROUTE[entry["sni"]], entry
        assert entry["listener"] == listeners[entry["sni"]], entry
        assert entry["client"].rsplit(":", 1)[0] == client_ip, entry
        assert entry["upstream"] == f"{UPSTREAM_BY_NAME[entry['sni']]}:443", entry
    per_route = {}
    for route in ROUTE.values():
        up, down = snap.bytes(route)
        logged = [e for e in snap.log if e["route"] == route]
        assert len(logged) == snap.value("sniproxy_connections_total", route=route), route
        assert (sum(e["bytes_to_upstream"] for e in logged),
                sum(e["bytes_to_client"] for e in logged)) == (up, down), route
        per_route[route] = (up, down, len(logged))
    assert snap.by_label("sniproxy_connections_rejected_total", "reason") == {}
    return per_route
