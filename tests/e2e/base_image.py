"""A stand-in for the Dockerfile's base image, made here because no image can be pulled.

mmdebstrap makes a minimal Debian 12 root (the essential packages) with Debian's python3 and
python3-venv, CPython 3.11 as the bundle needs, and passwd for useradd; podman imports it
under the name the Dockerfile's `ARG BASE` gives, so the real Dockerfile builds unchanged.
The official python:3.11-slim-bookworm is the same Debian with its own CPython 3.11 build.

The tarball is cached under ~/.cache/sniproxy-ci (SNIPROXY_CI_CACHE), keyed on the suite,
the package list, the excluded paths and the month: the first run of a month fetches the
packages (about 90 s), every other run reads the file.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

from . import procs

MMDEBSTRAP = "/usr/bin/mmdebstrap"
SUITE = "bookworm"
VARIANT = "essential"
PACKAGES = ("python3", "python3-venv", "passwd")
EXCLUDED = ("/usr/share/doc/*", "/usr/share/man/*", "/usr/share/info/*", "/usr/share/locale/*")
CACHE = Path(os.environ.get("SNIPROXY_CI_CACHE", Path.home() / ".cache" / "sniproxy-ci"))
TIMEOUT = 900.0
DOCKERFILE = Path(__file__).resolve().parents[2] / "Dockerfile"


def base_name() -> str:
    """The base image the Dockerfile builds on by default."""
    found = re.search(r"^ARG BASE=(\S+)$", DOCKERFILE.read_text(), re.M)
    assert found, f"{DOCKERFILE} has no ARG BASE=<image>"
    return found.group(1)


def rootfs(log: Path) -> tuple[Path, float]:
    """The root filesystem tarball, and the seconds it took to make (0 from the cache)."""
    recipe = json.dumps([SUITE, VARIANT, PACKAGES, EXCLUDED, time.strftime("%Y-%m")])
    key = hashlib.sha256(recipe.encode()).hexdigest()[:16]
    path = CACHE / f"debian-{SUITE}-python3-{key}.tar"
    if path.is_file():
        return path, 0.0
    CACHE.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    # No mirror named: mmdebstrap takes Debian's, with the updates and security suites.
    argv = [MMDEBSTRAP, "--mode=root", f"--variant={VARIANT}", "--format=tar", f"--include={','.join(PACKAGES)}",
            *(f"--dpkgopt=path-exclude={p}" for p in EXCLUDED), SUITE, str(partial)]
    started = time.monotonic()
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "wb") as out:
        done = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, timeout=TIMEOUT,
                              env=procs.clean_env(log.parent / "mmdebstrap-home"))
    assert done.returncode == 0, f"mmdebstrap failed ({done.returncode}):\n{procs.tail(log)}"
    os.replace(partial, path)
    for old in CACHE.glob(f"debian-{SUITE}-python3-*.tar"):  # last month's
        if old != path:
            old.unlink()
    return path, time.monotonic() - started
