"""What `sniproxy run` would trip over on this host, found before it runs, as `nginx -t` does:
the [server] accounts, the [log] files, and every address it would bind. `check` runs
these; each problem is one line.

An address already held by a running sniproxy is fine, so `check` passes as ExecReload=
while the service serves; under socket activation a reload can neither add nor drop a
listener (the socket unit must change, and that is a restart), and that is a problem too.
Who holds an address is doctor's question, and its answer is reused here.
"""

from __future__ import annotations

import errno
import os
import resource
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

from .. import regions
from ..addresses import format_address
from ..config import Config, open_listeners
from ..engine.listener import listen_name
from ..engine.splice import PIPE_DESCRIPTORS_PER_CONNECTION, SOCKETS_PER_CONNECTION
from ..errors import ConfigError
from ..tools.ports import is_sniproxy, listener_owner, listening_sockets, try_bind
from .systemd import LISTEN_FDS_START, normalise_address, unit_name

#: What to do about a failed bind, by errno: shared by `check` and a failing `run`.
BIND_HINTS = {
    errno.EACCES: "ports below 1024 need root, CAP_NET_BIND_SERVICE, or the socket unit: sniproxy files sniproxy.socket",
    errno.EADDRNOTAVAIL: "that address is not on this host (ip -brief address lists them)",
    errno.EADDRINUSE: "sniproxy check names the process that holds it",
}


def problems(config: Config) -> list[str]:
    """Every problem, one line each; none means `run` would start."""
    return account_problems(config) + log_problems(config) + bind_problems(config)


def config_warnings(config: Config) -> list[str]:
    """What `check` warns about: a config that works, but perhaps not as meant."""
    warnings = [f"listener {listen_name(listen)} is on a wildcard address with no allowlist: any client that "
                "can reach it may use the proxy; set [server] allow or [[listen]] allow"
                for listen in open_listeners(config)]
    if config.region is not None:
        verdict = regions.judge(config.region)
        if verdict.level == "warning":
            warnings.append(f"ecr.region: {verdict.message}")
    for listen in config.listen:
        if listen.proxy_protocol and not listen.proxy_from:
            warnings.append(f"listener {listen_name(listen)} believes the PROXY header of any peer that reaches it: "
                            "set [[listen]] proxy_from to the balancer's networks")
    warnings += descriptor_warnings(config)
    return warnings


def descriptor_warnings(config: Config, limit: int | None = None) -> list[str]:
    """max_connections against RLIMIT_NOFILE, as nginx warns that worker_connections exceed it:
    otherwise accepts fail with EMFILE, silently until the day the table fills. ``run`` raises
    its soft limit to the hard one, so the hard limit is what counts. Pipes are not counted:
    a direction that cannot get one copies instead."""
    if limit is None:
        limit = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    need = config.server.max_connections * SOCKETS_PER_CONNECTION
    if limit == resource.RLIM_INFINITY or need <= limit:
        return []
    return [f"server.max_connections {config.server.max_connections} needs {need} descriptors per process "
            f"({SOCKETS_PER_CONNECTION} sockets a connection; splicing directions take {PIPE_DESCRIPTORS_PER_CONNECTION} "
            f"more while they can), but RLIMIT_NOFILE is {limit}: raise it (LimitNOFILE= in the unit, ulimit -n) or "
            "lower max_connections, or accepts will fail with EMFILE before the table is full"]


def raise_descriptor_limit() -> None:
    """Let this process use every descriptor its hard limit allows (as Go's runtime does):
    the soft limit is often 1024 by default."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # the kernel's default nr_open
    if soft != resource.RLIM_INFINITY and soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # kept as it is; the warning above says what to do


def account_problems(config: Config) -> list[str]:
    from .privdrop import PrivilegeError, UnknownAccount, lookup

    server = config.server
    if server.user is None:
        return []
    try:
        lookup(server.user, server.group)
    except UnknownAccount as exc:
        return [str(ConfigError(f"server.{exc.key}", str(exc)))]
    except PrivilegeError as exc:
        return [str(ConfigError("server.user", str(exc)))]
    return []


def log_problems(config: Config) -> list[str]:
    problems = []
    for key in ("error", "access"):
        target = getattr(config.log, key)
        if target in ("stderr", "off"):
            continue
        problem = _unwritable(target)
        if problem is not None:
            problems.append(str(ConfigError(f"log.{key}", f"{target}: {problem}")))
    return problems


def _unwritable(path: str) -> str | None:
    """Why `run` could not open ``path`` for appending; None if it could. Creates nothing."""
    if os.path.isdir(path):
        return "is a directory"
    if os.path.exists(path):
        try:
            with open(path, "a"):
                pass
        except OSError as exc:
            return f"cannot open it: {exc.strerror}"
        return None
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        return f"cannot create it: {parent} does not exist"
    if not os.access(parent, os.W_OK | os.X_OK):
        return f"cannot create it: {parent} is not writable (under systemd, see LogsDirectory=)"
    return None


class _Probe(NamedTuple):
    state: str
    """"free", "sniproxy" (served by a running one), "systemd" (held by a socket unit) or "failed"."""
    pid: int | None = None
    problem: str = ""


def _probe(address: str, port: int) -> _Probe:
    """Bind as `run` would; when that fails, whether a running sniproxy (or systemd, for one)
    holds the address, so `check` passes as ExecReload= while the service serves. doctor's
    listener check, reused."""
    try:
        try_bind(address, port)
        return _Probe("free")
    except OSError as exc:
        failure = exc
    # A port below 1024 says EACCES before it says EADDRINUSE: it may still be ours.
    owner = listener_owner(address, port) if failure.errno in (errno.EADDRINUSE, errno.EACCES) else None
    if owner and is_sniproxy(owner[1]):
        return _Probe("sniproxy", owner[0])
    if owner and owner[0] == 1:  # systemd holds a socket unit's sockets (seen as root, outside the unit)
        return _Probe("systemd", 1)
    if failure.errno != errno.EADDRINUSE:
        return _Probe("failed", problem=_bind_failure(failure))
    who = f"pid {owner[0]} ({' '.join(owner[1])[:60]})" if owner else "another process"
    return _Probe("failed", problem=f"in use by {who}")


def _bind_failure(exc: OSError) -> str:
    hint = BIND_HINTS.get(exc.errno or 0)
    return f"{exc.strerror or exc}" + (f" ({hint})" if hint else "")


class _Activated(NamedTuple):
    pid: int
    unit: str
    addresses: list[tuple[str, int]]


def _activated(owners: list[int], held_by_systemd: bool,
               environ: Mapping[str, str] = os.environ) -> _Activated | None:
    """The running sniproxy's sockets from systemd, if it was socket-activated. It is the
    service's MAINPID (systemd sets it for ExecReload=), or owns one of our addresses. Seen
    from outside the unit (as root, by hand), pid 1 comes first as the holder: then any
    sniproxy process may be the one."""
    candidates = [int(environ["MAINPID"])] if environ.get("MAINPID", "").isdigit() else []
    for pid in owners:
        candidates += [pid, _parent(pid)]
    if held_by_systemd and not candidates:
        candidates = _sniproxy_pids()
    for pid in dict.fromkeys(candidates):
        found = _inherited_addresses(pid)
        if found is not None:
            return found
    return None


def _sniproxy_pids() -> list[int]:
    pids = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = [a for a in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0") if a]
        except OSError:
            continue
        if is_sniproxy(argv) and int(pid) != os.getpid():
            pids.append(int(pid))
    return pids


def _parent(pid: int) -> int:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return int(stat[stat.rindex(")") + 2:].split()[1])
    except (OSError, ValueError, IndexError):
        return 0


def _inherited_addresses(pid: int) -> _Activated | None:
    """What systemd passed to ``pid`` (its environment at exec still says), by bound address."""
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace")
    except OSError:
        return None
    env = dict(item.split("=", 1) for item in raw.split("\0") if "=" in item)
    if env.get("LISTEN_PID") != str(pid) or not env.get("LISTEN_FDS", "").isdigit():
        return None
    inodes = set()
    for fd in range(LISTEN_FDS_START, LISTEN_FDS_START + int(env["LISTEN_FDS"])):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue  # closed since
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    listening = listening_sockets()
    addresses = [normalise_address(listening[inode]) for inode in inodes if inode in listening]
    return _Activated(pid, unit_name(env.get("LISTEN_FDNAMES", "").split(":")), sorted(addresses))


def bind_problems(config: Config) -> list[str]:
    """Every address `run` would bind: free, or already served by a running sniproxy (so that
    `check` as ExecReload= passes while the service holds them). Under socket activation a
    reload can neither add nor drop a listener: the socket unit must change, and that is a restart."""
    probes = [_probe(*entry.key) for entry in config.listen]
    m = config.metrics
    metrics = _probe(m.address, m.port) if m.enabled else None
    seen = [p for p in (*probes, metrics) if p is not None]
    running = _activated([p.pid for p in seen if p.state == "sniproxy" and p.pid is not None], any(p.state == "systemd" for p in seen))
    problems = []
    for i, (entry, probe) in enumerate(zip(config.listen, probes)):
        name = listen_name(entry)
        if probe.state == "failed":
            problems.append(f"sniproxy: cannot listen on {name} (listen[{i}]): {probe.problem}")
        elif running is not None and entry.key not in running.addresses:
            problems.append(f"sniproxy: listen[{i}] {name} is not passed by {running.unit} to the running sniproxy "
                            f"(pid {running.pid}), and a reload cannot add a socket: add ListenStream={name} "
                            "(systemctl edit sniproxy.socket), then systemctl restart sniproxy")
    if running is not None:
        for key in running.addresses:
            if key not in {entry.key for entry in config.listen}:
                name = format_address(*key)
                problems.append(f"sniproxy: {running.unit} passes {name} to the running sniproxy (pid {running.pid}), "
                                f"and no [[listen]] names it any more: remove ListenStream={name} "
                                "(systemctl edit sniproxy.socket), then systemctl restart sniproxy")
    if metrics is not None and metrics.state == "failed":
        problems.append(f"sniproxy: cannot serve metrics on {format_address(m.address, m.port)}: {metrics.problem}; "
                        "set [metrics] address/port, or enabled = false")
    return problems
