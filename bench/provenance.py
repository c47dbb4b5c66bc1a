"""Where a result came from: the commit, the command, and the machine, stamped into every
result file so two runs (or two machines) can be compared, and any result reproduced from
git history alone."""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    return {
        "cpu": cpu_model(),
        "cpus": os.cpu_count(),
        "kernel": os.uname().release,
        "python": f"{platform.python_implementation()} {platform.python_version()} "
                  f"({' '.join(platform.python_build())}, {platform.python_compiler()})",
    }


def provenance() -> dict:
    """The commit (with "+dirty" when the tree has uncommitted changes), the command as typed
    from the repository root, and the machine."""
    commit = _git("rev-parse", "--short", "HEAD") or "unknown"
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += "+dirty"
    argv = [os.path.relpath(sys.argv[0], REPO) if sys.argv[0].endswith(".py") else sys.argv[0], *sys.argv[1:]]
    return {"commit": commit, "command": "python " + shlex.join(argv), "machine": machine()}


def header(meta: dict) -> str:
    """One markdown line naming commit, command and machine (older files may lack them)."""
    m = meta.get("machine") or {}
    parts = [f"commit `{meta.get('commit', '?')}`", f"`{meta.get('command', '?')}`"]
    if m:
        parts.append(f"{m.get('cpu', '?')}, {m.get('cpus', '?')} CPUs, kernel {m.get('kernel', '?')}, {m.get('python', '?')}")
    return "Made at " + " · ".join(parts) + "\n"
