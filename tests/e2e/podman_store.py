"""podman building an image and running it as a container, in a store of its own.

podman.pull runs each command in a mount namespace of its own. A container that keeps running
while other commands look at it (healthcheck, inspect, stop) needs those commands to share
what podman keeps in /run: the run root, runc's state, conmon's files. So one holder process
makes a mount namespace (unshare --mount, propagation private) with a tmpfs over /run and one
over /var/lib, and every command of the store enters it with nsenter, together with the
network namespace it runs in. /sys stays the host's, with the cgroups runc needs (`ip netns
exec` would remount it). Images live under the test's tmp (vfs), with podman.pull's
configuration files; close() removes every container, stops the holder by PID (its mounts
vanish with it) and deletes the store.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from pathlib import Path

from . import procs
from .docker_engine import NSENTER, UNSHARE, processes_naming
from .netns import RUN_NETNS, Namespace
from .podman import PODMAN, RUNROOT, _configure

CGROUPS = Path("/sys/fs/cgroup")
_HOLD = ('mount -t tmpfs -o size=64m,mode=0755 e2e-podman-run /run && '
         'mount -t tmpfs -o size=16m e2e-podman-var-lib /var/lib && echo ready && exec sleep 3600')


class Store:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.env = procs.clean_env(work / "home", TMPDIR=str(work / "tmp"), **_configure(work))
        (work / "tmp").mkdir()
        self.holder: procs.Service | None = None
        self._cgroups_before: set[Path] = set()

    def open(self) -> None:
        self._cgroups_before = set(CGROUPS.glob("*/libpod_parent"))
        log = self.work / "holder.log"
        self.holder = procs.spawn("podman-mounts", [UNSHARE, "--mount", "--propagation", "private", "/bin/sh", "-c",
                                                   _HOLD], self.env, log)
        procs.wait_until(lambda: self.holder.check_alive() or "ready" in log.read_text(), 30,
                         "the podman mount namespace")

    def argv(self, args: tuple[str, ...], ns: Namespace | None) -> list[str]:
        assert self.holder is not None, "Store.open() first"
        net = [f"--net={RUN_NETNS / ns.name}"] if ns else []
        return [NSENTER, f"--mount=/proc/{self.holder.pid}/ns/mnt", *net,
                PODMAN, "--root", str(self.work / "root"), "--runroot", RUNROOT, "--storage-driver", "vfs",
                "--events-backend", "none", "--cgroup-manager", "cgroupfs", *args]

    def podman(self, *args: str, ns: Namespace | None = None, timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, float]:
        """Run one podman command to completion; return (result, seconds)."""
        started = time.monotonic()
        result = subprocess.run(self.argv(args, ns), env=self.env, capture_output=True, text=True, timeout=timeout,
                                stdin=subprocess.DEVNULL)
        return result, time.monotonic() - started

    def check(self, *args: str, ns: Namespace | None = None, timeout: float = 120.0) -> str:
        result, _ = self.podman(*args, ns=ns, timeout=timeout)
        assert result.returncode == 0, f"podman {' '.join(args)}: {result.returncode}\n{result.stderr[-3000:]}"
        return result.stdout

    def spawn(self, name: str, *args: str, ns: Namespace, log: Path) -> procs.Service:
        """A podman command that runs on (`podman run` attached), its output in `log`."""
        return procs.spawn(name, self.argv(args, ns), self.env, log)

    def close(self) -> list[str]:
        """Remove every container, stop the holder, delete the store. Returns problems seen."""
        problems = []
        if self.holder is not None and self.holder.alive():
            removed, _ = self.podman("rm", "--force", "--all", "--time", "5")
            if removed.returncode != 0:
                problems.append(f"podman rm --all: {removed.stderr[-2000:]}")
            self.holder.stop(timeout=10)
        for pid in processes_naming(str(self.work)):  # a conmon that outlived its container
            problems.append(f"process {pid} of the podman store still running: killed")
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.work / "root", ignore_errors=True)  # vfs: a full copy per layer
        # runc under cgroupfs leaves libpod_parent/conmon in each hierarchy: empty ones that
        # this store made go (rmdir refuses any a process still uses).
        for parent in set(CGROUPS.glob("*/libpod_parent")) - self._cgroups_before:
            for directory in [*sorted(p for p in parent.iterdir() if p.is_dir()), parent]:
                try:
                    directory.rmdir()
                except OSError:
                    pass
        return problems
