"""Processes of the end-to-end suite: clean environments, readiness, stop by PID.

This machine exports AWS_CA_BUNDLE, SSL_CERT_FILE, REQUESTS_CA_BUNDLE and more; distribution's
S3 driver panics on some of them and every client would trust the wrong CA. So no process gets
our environment: each is handed a small explicit one.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

from .netns import Namespace

SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    home.mkdir(parents=True, exist_ok=True)
    return {"PATH": SYSTEM_PATH, "HOME": str(home), "LANG": "C.UTF-8", "TZ": "UTC", **extra}


def tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


@dataclass
class Service:
    """A long-running process inside a namespace, its output going to one log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    stopped_rc: int | None = field(default=None)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def check_alive(self) -> None:
        if not self.alive():
            raise RuntimeError(
                f"{self.name} (pid {self.pid}) exited with {self.popen.returncode}:\n"
                f"{tail(self.log)}")

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM by PID, then SIGKILL after the deadline. Returns the exit code."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=5)
        self.stopped_rc = self.popen.returncode
        return self.popen.returncode


def start(ns: Namespace, name: str, argv: list[str], env: dict[str, str], log: Path,
          stdout: Path | None = None) -> Service:
    """Start argv in ns. Its stderr goes to `log`, and so does its stdout unless `stdout`
    names a file of its own."""
    # `ip netns exec` execs argv in place, so popen.pid is the service itself.
    return spawn(name, ns.exec_argv(argv), env, log, stdout)


def spawn(name: str, argv: list[str], env: dict[str, str], log: Path,
          stdout: Path | None = None) -> Service:
    """Start argv as it is (the caller has put it in its namespace): see start()."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as err, open(stdout or os.devnull, "wb") as out:
        popen = subprocess.Popen(
            argv, env=env, stdin=subprocess.DEVNULL,
            stdout=out if stdout else err, stderr=err, start_new_session=True)
    return Service(name, popen, log)


def run(ns: Namespace, argv: list[str], env: dict[str, str],
        timeout: float, input: str | None = None) -> subprocess.CompletedProcess:
    """Run a client to completion inside a namespace; never raises on a non-zero exit.
    `input`, if given, is its stdin (a password for --password-stdin)."""
    return subprocess.run(
        ns.exec_argv(argv), env=env, input=input,
        stdin=subprocess.DEVNULL if input is None else None,
        capture_output=True, text=True, timeout=timeout)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.05):
    """Poll predicate until it returns a truthy value, bounded by timeout."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
