"""Network namespaces for the end-to-end suite.

Every namespace is named ``snie2e-<pid>-<role>`` after the pytest process that made it, so a
run that died leaves names a later run can recognise as stale (their pid is gone) without
touching a run that is still going on the same machine.

``ip netns exec`` bind-mounts the files of ``/etc/netns/<name>/`` over ``/etc``: that is how a
client's ``/etc/hosts`` pins the ECR names, while the real ``/etc/hosts`` is never touched.
"""

from __future__ import annotations

import concurrent.futures
import ctypes
import os
import re
import shutil
import signal
import subprocess
from pathlib import Path

PREFIX = "snie2e-"
IP = shutil.which("ip") or "/usr/sbin/ip"
TC = shutil.which("tc") or "/usr/sbin/tc"
ETC_NETNS = Path("/etc/netns")
RUN_NETNS = Path("/run/netns")
_CLONE_NEWNET = 0x40000000
_STALE = re.compile(rf"^{re.escape(PREFIX)}(\d+)-")


class NetnsUnavailable(Exception):
    """Raised when this machine cannot create network namespaces (not root, no CAP_SYS_ADMIN)."""


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(
        [IP, *args], capture_output=True, text=True, timeout=20, check=check,
        env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"},
    )


def probe() -> None:
    """Raise NetnsUnavailable with one line saying why, unless namespaces can be made here."""
    if os.geteuid() != 0:
        raise NetnsUnavailable("needs root to create network namespaces (ip netns add)")
    name = f"{PREFIX}{os.getpid()}-probe"
    try:
        result = ip("netns", "add", name, check=False)
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetnsUnavailable(f"cannot run {IP}: {exc}") from None
    if result.returncode != 0:
        raise NetnsUnavailable(f"ip netns add failed: {result.stderr.strip()}")
    ip("netns", "del", name, check=False)


def _list() -> list[str]:
    out = ip("netns", "list", check=False).stdout
    return [line.split()[0] for line in out.splitlines() if line.strip()]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale() -> list[str]:
    """Delete namespaces left by earlier runs whose pytest process is gone.

    Processes still inside such a namespace were started by that earlier run; they are
    stopped by PID before the namespace goes.
    """
    removed = []
    for name in _list():
        match = _STALE.match(name)
        if not match or _pid_alive(int(match.group(1))):
            continue
        for pid in pids(name):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        ip("netns", "del", name, check=False)
        shutil.rmtree(ETC_NETNS / name, ignore_errors=True)
        removed.append(name)
    # /etc/netns dirs whose namespace is already gone
    if ETC_NETNS.is_dir():
        for path in ETC_NETNS.glob(f"{PREFIX}*"):
            match = _STALE.match(path.name)
            if match and not _pid_alive(int(match.group(1))):
                shutil.rmtree(path, ignore_errors=True)
    return removed


def pids(name: str) -> list[int]:
    out = ip("netns", "pids", name, check=False).stdout
    return [int(tok) for tok in out.split() if tok.isdigit()]


def _enter(name: str) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(RUN_NETNS / name, os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(fd, _CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({name}): {os.strerror(err)}")
    finally:
        os.close(fd)


class Namespace:
    """One network namespace, with a worker thread living inside it.

    ``call`` runs a function on that thread, so sockets it opens belong to the namespace:
    the test process can probe ports and scrape metrics there without a subprocess.
    """

    def __init__(self, role: str) -> None:
        self.name = f"{PREFIX}{os.getpid()}-{role}"
        self.role = role
        self._thread: concurrent.futures.ThreadPoolExecutor | None = None

    def create(self) -> None:
        ip("netns", "add", self.name)
        ip("-n", self.name, "link", "set", "lo", "up")
        self._thread = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix=self.name, initializer=_enter, initargs=(self.name,))

    def run_ip(self, *args: str) -> None:
        ip("-n", self.name, *args)

    def write_etc(self, filename: str, text: str) -> Path:
        directory = ETC_NETNS / self.name
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / filename
        path.write_text(text)
        return path

    def call(self, fn, *args, timeout: float = 30.0):
        assert self._thread is not None, f"{self.name} not created"
        return self._thread.submit(fn, *args).result(timeout=timeout)

    def exec_argv(self, argv: list[str]) -> list[str]:
        return [IP, "netns", "exec", self.name, *argv]

    def destroy(self) -> list[int]:
        """Delete the namespace and its /etc/netns dir; return PIDs found still inside."""
        if self._thread is not None:
            self._thread.shutdown(wait=True)
            self._thread = None
        leftover = pids(self.name) if (RUN_NETNS / self.name).exists() else []
        ip("netns", "del", self.name, check=False)
        shutil.rmtree(ETC_NETNS / self.name, ignore_errors=True)
        try:
            ETC_NETNS.rmdir()  # only if empty: leave the machine's /etc as it was
        except OSError:
            pass
        return leftover


def tc(ns: Namespace, *args: str) -> None:
    subprocess.run([TC, "-n", ns.name, *args], capture_output=True, text=True, timeout=20,
                   check=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"})


def link(a: Namespace, a_addr: str, b: Namespace, b_addr: str, prefix: int = 30) -> None:
    """Join two namespaces with a veth pair, each end named after the namespace it faces."""
    a_if, b_if = f"to-{b.role}"[:15], f"to-{a.role}"[:15]
    a.run_ip("link", "add", a_if, "type", "veth", "peer", "name", b_if, "netns", b.name)
    a.run_ip("addr", "add", f"{a_addr}/{prefix}", "dev", a_if)
    b.run_ip("addr", "add", f"{b_addr}/{prefix}", "dev", b_if)
    a.run_ip("link", "set", a_if, "up")
    b.run_ip("link", "set", b_if, "up")
