"""The wheel: built without a warning, licensed, and shipping the units, the example config,
the logrotate file, the alerts and the dashboard, which `sniproxy files` then finds in an
installed copy (not this checkout)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.helpers import REPO, clean_env

# What the build backend says that is not about this project. pip's own "WARNING:" lines
# (root user, this machine's index settings) are not the build's either.
BENIGN = ("byte-compiling is disabled",)


@pytest.fixture(scope="module")
def build(tmp_path_factory) -> tuple[Path, str]:
    """pip wheel from a clean copy of the tracked files (no stale build/ or egg-info)."""
    d = tmp_path_factory.mktemp("wheel")
    src = d / "src"
    src.mkdir()
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            (src / name).write_bytes((REPO / name).read_bytes())
    out = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-v",
                          "-w", str(d / "dist"), str(src)], capture_output=True, text=True, timeout=300, env=clean_env())
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    (wheel,) = (d / "dist").glob("sniproxy-*.whl")
    return wheel, out.stdout + out.stderr


def test_the_build_warns_about_nothing(build):
    _, log = build
    warnings = [line for line in log.splitlines()
                if ("warning" in line.lower() or "deprecat" in line.lower()) and not any(b in line for b in BENIGN)
                and not line.strip().startswith("WARNING:")]
    assert not warnings, "\n".join(warnings)


def test_the_wheel_carries_the_license_and_the_shipped_files(build):
    wheel, _ = build
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        metadata = z.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
        license_text = z.read(next(n for n in names if n.endswith(".dist-info/licenses/LICENSE"))).decode()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
    assert license_text == (REPO / "LICENSE").read_text()
    assert "Apache License" in license_text and "Version 2.0" in license_text
    shipped = {n.split("/share/sniproxy/", 1)[1] for n in names if "/share/sniproxy/" in n}
    assert shipped == ({p.name for p in (REPO / "systemd").iterdir()} | {"README.md"}
                       | {f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")})


def test_files_finds_them_in_an_installed_copy(build, tmp_path):
    """A venv with the wheel alone (dependencies from the system), run from outside the checkout."""
    wheel, _ = build
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    subprocess.run([venv / "bin" / "pip", "install", "-q", "--no-deps", "--ignore-installed", "--disable-pip-version-check",
                    str(wheel)],
                   check=True, timeout=120, env=clean_env())
    env = clean_env()
    env.pop("PYTHONPATH")
    listed = subprocess.run([venv / "bin" / "sniproxy", "files"], capture_output=True, text=True, timeout=60,
                            env=env, cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    share = (venv / "share" / "sniproxy").resolve()
    assert [Path(line) for line in listed.stdout.splitlines()] == sorted(p for p in share.iterdir() if p.is_file())
    unit = subprocess.run([venv / "bin" / "sniproxy", "files", "sniproxy.service"], capture_output=True, text=True,
                          timeout=60, env=env, cwd=tmp_path)
    assert unit.stdout == (REPO / "systemd" / "sniproxy.service").read_text()
    # the unit's Documentation= is there, relative to the venv as /opt/sniproxy is
    assert (share / "README.md").read_text() == (REPO / "README.md").read_text()
    assert (share / "docs" / "operations.md").read_text() == (REPO / "docs" / "operations.md").read_text()
