"""systemd integration with the standard library only: socket activation and sd_notify.

Protocols: sd_listen_fds(3) and sd_notify(3). Everything here is a no-op when not
started by systemd, so the same code runs by hand, in tests and under the unit.
"""

import ipaddress
import logging
import os
import socket
import time
from collections.abc import Iterable, Mapping, MutableMapping
from dataclasses import dataclass, field
from typing import NamedTuple

from ..addresses import format_address
from ..config import Config
from ..errors import SniproxyError

log = logging.getLogger("sniproxy.systemd")

LISTEN_FDS_START = 3
_LISTEN_ENV = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class SystemdError(SniproxyError):
    """The environment systemd handed us is inconsistent."""


class ListenFd(NamedTuple):
    name: str
    """FileDescriptorName= of the socket unit ("unknown" when systemd gave none)."""
    sock: socket.socket


def listen_fds(environ: MutableMapping[str, str] = os.environ) -> list[ListenFd]:
    """The sockets systemd passed to this process, in order, from fd 3.

    Returns [] unless LISTEN_PID names this process (the variables may have been
    inherited from a parent). The variables are removed either way, so children do not
    take the sockets for theirs, and each fd is marked close-on-exec.
    """
    pid, count, names = (environ.pop(key, None) for key in _LISTEN_ENV)
    if pid is None or count is None:
        return []
    try:
        if int(pid) != os.getpid():
            return []
        n = int(count)
    except ValueError:
        raise SystemdError(f"LISTEN_PID={pid!r} LISTEN_FDS={count!r} are not numbers") from None
    if n < 0:
        raise SystemdError(f"LISTEN_FDS={count!r} is negative")
    name_list = names.split(":") if names is not None else []
    if len(name_list) != n:
        name_list = ["unknown"] * n  # as sd_listen_fds_with_names does
    fds = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), name_list):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as e:
            raise SystemdError(f"inherited fd {fd} ({name}) is not a usable socket: {e.strerror}") from None
        fds.append(ListenFd(name, sock))
    return fds


Address = tuple[str, int]


@dataclass
class ListenerMatch:
    matched: dict[Address, socket.socket] = field(default_factory=dict)
    """Wanted (address, port) -> the inherited socket bound to it."""
    missing: list[Address] = field(default_factory=list)
    """Wanted but not inherited: the server must bind these itself or refuse to start."""
    extra: list[socket.socket] = field(default_factory=list)
    """Inherited but not wanted (or not a TCP listener): close them and say so."""


def bound_address(sock: socket.socket) -> Address | None:
    """(address, port) a listening TCP socket is bound to, normalised; else None."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6) or sock.type != socket.SOCK_STREAM:
        return None
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        return None
    host, port = sock.getsockname()[:2]
    return normalise_address((host, port))


def normalise_address(address: Address) -> Address:
    host, port = address
    return (str(ipaddress.ip_address(host)), int(port))


def match_listeners(inherited: Iterable[socket.socket], wanted: Iterable[Address]) -> ListenerMatch:
    """Pair inherited sockets with the configured listen addresses by their bound address.

    Names from FileDescriptorName= play no part: the address a socket is bound to is the
    truth, and it cannot drift from the config the way a name can.
    """
    wanted_set = {normalise_address(a): a for a in wanted}
    result = ListenerMatch()
    for sock in inherited:
        key = bound_address(sock)
        if key in wanted_set and wanted_set[key] not in result.matched:
            result.matched[wanted_set[key]] = sock
        else:
            result.extra.append(sock)
    result.missing = [a for a in wanted_set.values() if a not in result.matched]
    return result


def inherited_sockets(config: Config) -> dict[Address, socket.socket]:
    """Sockets passed by systemd socket activation, matched to [[listen]] by bound address.

    They must match exactly: a socket with no [[listen]] entry would be a black hole (systemd
    keeps it open and the kernel keeps queueing connections nobody accepts), and a [[listen]]
    entry with no socket loses what the socket unit gives (FreeBind=, connections queued
    across restarts). Either is a deployment mistake, refused in one line that says the fix."""
    fds = listen_fds()
    if not fds:
        return {}
    match = match_listeners([f.sock for f in fds], [entry.key for entry in config.listen])
    unit = unit_name([f.name for f in fds])
    if match.extra or match.missing:
        message = activation_mismatch(unit, [_sockname(s) for s in match.extra],
                                      [format_address(*key) for key in match.missing])
        for f in fds:
            f.sock.close()
        raise SniproxyError(message)
    log.info("socket activation: %d listeners from systemd", len(match.matched))
    return match.matched


def _sockname(sock: socket.socket) -> str:
    try:
        host, port = sock.getsockname()[:2]
        return format_address(host, port)
    except (OSError, ValueError):
        return f"fd {sock.fileno()}"


def unit_name(names: list[str]) -> str:
    """systemd names each socket after its unit, unless FileDescriptorName= says otherwise."""
    named = sorted({n for n in names if n and n != "unknown"})
    return named[0] if len(named) == 1 else "the socket unit"


def activation_mismatch(unit: str, extra: list[str], missing: list[str]) -> str:
    """One line: which sockets and [[listen]] entries disagree, and the fix."""
    parts = []
    if extra:
        parts.append(f"{unit} passes {', '.join(extra)}, which no [[listen]] names")
    if missing:
        parts.append(f"[[listen]] {', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not passed by {unit}")
    return ("socket activation: " + "; ".join(parts) + ": make ListenStream= match [[listen]] "
            "(systemctl edit sniproxy.socket), then systemctl restart sniproxy")


def watchdog_interval(environ: Mapping[str, str] = os.environ) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WatchdogSec=), or None if not asked for."""
    usec = environ.get("WATCHDOG_USEC")
    pid = environ.get("WATCHDOG_PID")
    try:
        if not usec or int(usec) <= 0 or (pid and int(pid) != os.getpid()):
            return None
        return int(usec) / 2 / 1_000_000
    except ValueError:
        log.warning("ignoring malformed WATCHDOG_USEC=%r WATCHDOG_PID=%r", usec, pid)
        return None


class Notifier:
    """Tells systemd about our state over NOTIFY_SOCKET (Type=notify).

    A no-op when NOTIFY_SOCKET is unset. A failed send is logged once and never raised:
    losing a status line must not take the proxy down.
    """

    # systemd reads the socket promptly; a full queue means it is wedged, and blocking
    # the event loop longer than this would hurt more than a lost message.
    SEND_TIMEOUT = 0.5

    def __init__(self, environ: Mapping[str, str] = os.environ):
        self._address = self._parse_address(environ.get("NOTIFY_SOCKET"))
        self._sock: socket.socket | None = None
        self._failed = False
        if self._address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.settimeout(self.SEND_TIMEOUT)

    @staticmethod
    def _parse_address(path: str | None) -> str | None:
        if not path:
            return None
        if path.startswith("@"):
            return "\0" + path[1:]  # abstract namespace
        if path.startswith("/"):
            return path
        log.warning("NOTIFY_SOCKET=%r is not a unix socket path; not notifying systemd", path)
        return None

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    async def start(self) -> None:
        """Nothing to open: the socket is made in __init__."""

    async def final(self) -> None:
        """Nothing to say after STOPPING=1: systemd sees the exit."""

    def ready(self, status: str | None = None) -> bool:
        """Startup (or a reload) finished: listeners are open."""
        return self.send("READY=1", status)

    def reloading(self, status: str | None = None) -> bool:
        """A reload started; call ready() when it is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.send(f"RELOADING=1\nMONOTONIC_USEC={usec}", status)

    def stopping(self, status: str | None = None) -> bool:
        """Shutdown started (draining)."""
        return self.send("STOPPING=1", status)

    def draining(self, status: str) -> bool:
        """Listeners closed; running connections are finishing."""
        return self.send(None, f"draining: {status}")

    def watchdog(self) -> bool:
        """Still alive: call every watchdog_interval() seconds from the event loop."""
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        """A one-line status for `systemctl status`."""
        return self.send(None, text)

    def send(self, message: str | None, status: str | None = None) -> bool:
        """Send one datagram; True if systemd got it, False if disabled or it failed."""
        if self._sock is None or self._address is None:
            return False
        lines = [message] if message else []
        if status is not None:
            lines.append("STATUS=" + " ".join(status.split()))  # one line, no newlines
        try:
            self._sock.sendto("\n".join(lines).encode(), self._address)
        except OSError as e:
            if not self._failed:
                self._failed = True
                log.warning("cannot notify systemd via %r: %s", self._address, e)
            return False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None
