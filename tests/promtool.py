"""promtool for the alert and dashboard tests, from Debian's `prometheus` package, unpacked
into a cache with `apt-get download` and `dpkg -x`: nothing is installed and no daemon starts.

`python3 -m tests.promtool` prints its path (fetching it first if need be); .ci/run uses that.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

CACHE = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sniproxy-tests" / "prometheus"
UNPACKED = CACHE / "usr" / "bin" / "promtool"


def find(fetch: bool = True) -> str | None:
    """$PROMTOOL, promtool on PATH, the cached copy, or (with ``fetch``) a fresh one."""
    for candidate in (os.environ.get("PROMTOOL"), shutil.which("promtool"), str(UNPACKED)):
        if candidate and os.access(candidate, os.X_OK):
            return candidate
    return _fetch() if fetch else None


def _fetch() -> str | None:
    if not (shutil.which("apt-get") and shutil.which("dpkg")):
        return None
    CACHE.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=CACHE.parent) as work:
        got = subprocess.run(["apt-get", "download", "prometheus"], cwd=work, capture_output=True, text=True,
                             timeout=600)
        debs = sorted(Path(work).glob("prometheus_*.deb"))
        if got.returncode != 0 or not debs:
            print(f"promtool: apt-get download prometheus failed: {got.stderr.strip()[-500:]}", file=sys.stderr)
            return None
        tree = Path(work) / "tree"
        subprocess.run(["dpkg", "-x", str(debs[0]), str(tree)], check=True, timeout=300)
        try:
            tree.rename(CACHE)  # atomic: a concurrent run either sees all of it or none
        except OSError:
            pass  # another run got there first
    return str(UNPACKED) if os.access(UNPACKED, os.X_OK) else None


if __name__ == "__main__":
    path = find()
    if path is None:
        sys.exit("promtool: not found, and Debian's prometheus package could not be fetched")
    print(path)
