"""A stand-in for `sniproxy bundle` (being built in another branch), of the same shape, so the
boot rehearsal can install from a bundle today. Delete it once `sniproxy bundle` is merged, and
build the rehearsal's bundle with that command instead (`make` below is the one caller).

The shape the user data relies on:

    sniproxy-bundle/wheels/*.whl         sniproxy's wheel and every dependency's
    sniproxy-bundle/requirements.txt     pinned, with --hash=sha256 for each wheel
    sniproxy-bundle/SHA256SUMS           of the wheels and requirements.txt
    sniproxy-bundle/install.sh VENV      checks the sums, then pip install --no-index
                                         --find-links wheels --require-hashes into VENV
    sniproxy-bundle/MANIFEST

Only the host's platform is downloaded here (the rehearsal installs on this machine).
"""

from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

from tests.helpers import REPO

DEPENDENCIES = ("uvloop", "dnspython", "prometheus-client", "boto3")
INSTALL_SH = """\
#!/bin/sh
# Install sniproxy from this bundle into a virtual environment, with no index.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-/opt/sniproxy}
(cd "$here" && sha256sum --check --quiet SHA256SUMS)
[ -x "$venv/bin/python" ] || python3.11 -m venv "$venv"
"$venv/bin/python" -m pip install --no-input --disable-pip-version-check --no-index \\
    --find-links "$here/wheels" --require-hashes -r "$here/requirements.txt"
"""
_WHEEL = re.compile(r"^(?P<name>[^-]+)-(?P<version>[^-]+)-")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def make(out: Path, python: str = sys.executable) -> Path:
    """Build the tarball at `out` (a .tar.gz); returns it."""
    root = out.parent / "bundle-build" / "sniproxy-bundle"
    wheels = root / "wheels"
    wheels.mkdir(parents=True)
    pip = [python, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", "--no-deps", "-w", str(wheels), str(REPO)], check=True, timeout=300,
                   capture_output=True)
    subprocess.run([*pip, "download", "--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp",
                    "--abi", "cp311", "--platform", "manylinux2014_x86_64", "--platform", "manylinux_2_17_x86_64",
                    "--platform", "manylinux_2_28_x86_64", "-d", str(wheels), *DEPENDENCIES],
                   check=True, timeout=300, capture_output=True)
    lines = []
    for wheel in sorted(wheels.glob("*.whl")):
        match = _WHEEL.match(wheel.name)
        assert match, wheel.name
        lines.append(f"{match['name'].replace('_', '-')}=={match['version']} --hash=sha256:{sha256(wheel)}")
    (root / "requirements.txt").write_text("\n".join(lines) + "\n")
    (root / "install.sh").write_text(INSTALL_SH)
    (root / "install.sh").chmod(0o755)
    (root / "MANIFEST").write_text("".join(f"{wheel.name}\n" for wheel in sorted(wheels.glob("*.whl"))))
    summed = [*sorted(wheels.glob("*.whl")), root / "requirements.txt"]
    (root / "SHA256SUMS").write_text("".join(f"{sha256(p)}  {p.relative_to(root)}\n" for p in summed))
    with tarfile.open(out, "w:gz") as tar:
        tar.add(root, arcname="sniproxy-bundle")
    return out
