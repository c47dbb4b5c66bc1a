"""podman as a builder without a daemon runs it: `podman pull`, in a client namespace.

Each pull gets a store of its own under the test's tmp (--root, --runroot, --tmpdir; the vfs
driver), its own containers.conf, registries.conf and storage.conf (CONTAINERS_* variables),
its own signature policy, and the test CA through --cert-dir. The starport redirect is trusted
the same way as the registry: containers/image follows the 307 with the registry's client,
whose roots are the system store plus the --cert-dir CA.

As root, podman still reaches for /var/lib/containers and /run (a blob-info cache, lock and
state files). `ip netns exec` runs it in a mount namespace of its own, where a small tmpfs
covers each of those, so nothing it writes outlives the command and the host's are untouched.
The run root (locks, state) lives in that private /run too: podman refuses one longer than
50 characters, which a pytest tmp path is.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

from . import procs
from .netns import Namespace

PODMAN = "/usr/bin/podman"
RUNROOT = "/run/e2e-podman"  # in the private tmpfs, see above
_PRIVATE = ('mount -t tmpfs -o size=16m e2e-var-lib /var/lib && '
            'mount -t tmpfs -o size=16m e2e-run /run && exec "$@"')


def _configure(work: Path) -> dict[str, str]:
    conf = work / "conf"
    conf.mkdir(parents=True)
    (conf / "policy.json").write_text(json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
    (conf / "registries.conf").write_text("unqualified-search-registries = []\n")
    (conf / "containers.conf").write_text(
        '[engine]\nevents_logger = "none"\ncgroup_manager = "cgroupfs"\n')
    (conf / "storage.conf").write_text(
        f'[storage]\ndriver = "vfs"\ngraphroot = "{work / "root"}"\nrunroot = "{RUNROOT}"\n')
    return {"CONTAINERS_CONF": str(conf / "containers.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(conf / "registries.conf"),
            "CONTAINERS_STORAGE_CONF": str(conf / "storage.conf")}


def pull(ns: Namespace, work: Path, ref: str, cert_dir: Path, creds: str,
         timeout: float = 120.0) -> tuple[subprocess.CompletedProcess, float]:
    """`podman pull ref` into a fresh store under `work`; return (result, seconds).
    On success the last line of stdout is the image id (the config digest's hex)."""
    env = procs.clean_env(work / "home", TMPDIR=str(work), **_configure(work))
    argv = ["/bin/sh", "-c", _PRIVATE, "podman",
            PODMAN, "--root", str(work / "root"), "--runroot", RUNROOT,
            "--storage-driver", "vfs", "--tmpdir", str(work / "tmp"),
            "--events-backend", "none", "--cgroup-manager", "cgroupfs",
            "pull", "--signature-policy", str(work / "conf" / "policy.json"),
            "--cert-dir", str(cert_dir), "--creds", creds, ref]
    started = time.monotonic()
    result = procs.run(ns, argv, env, timeout=timeout)
    return result, time.monotonic() - started


def version() -> str:
    result = subprocess.run([PODMAN, "--version"], capture_output=True, text=True, timeout=30,
                            env={"PATH": procs.SYSTEM_PATH, "HOME": "/nonexistent"})
    return result.stdout.strip().rsplit(" ", 1)[-1]
