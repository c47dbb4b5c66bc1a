"""`sniproxy bundle`: everything a host needs to install sniproxy with no network, in one tarball.

The tarball holds the sniproxy wheel and every runtime dependency's wheel for one CPython and
one or more Linux architectures, a requirements.txt that pins each distribution with the hash
of every wheel of it, SHA256SUMS, a MANIFEST.json and install.sh::

    sniproxy-bundle/
      wheels/*.whl
      requirements.txt      name==version --hash=sha256:... (one hash per wheel, all architectures)
      SHA256SUMS            sha256sum -c format, over wheels/, requirements.txt and MANIFEST.json
      MANIFEST.json         python, platforms and their wheel tags, versions
      install.sh            checks the sums, then pip install --no-index --require-hashes into a venv

Wheels come from `pip download --only-binary=:all:` with the target's tags, so nothing is
compiled and the bundle can be made on any machine for any of ARCHITECTURES. The first
architecture resolves the dependencies; the others are held to the same versions, so one
requirements.txt serves all of them. A setup-time tool: it runs pip, never the proxy.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from sniproxy.errors import SniproxyError, UsageError

TOP = "sniproxy-bundle"
DEFAULT_OUT = "sniproxy-bundle.tar.gz"
ARCHITECTURES = ("x86_64", "aarch64")
ALIASES = {"amd64": "x86_64", "arm64": "aarch64"}  # Docker's and Debian's names
# The newest glibc a wheel may need: Amazon Linux 2023 has 2.34, Debian 12 has 2.36.
GLIBC_CEILING = 34
# The oldest manylinux each architecture has (PEP 600), and the legacy names PEP 513, 571 and
# 599 gave glibc 2.5, 2.12 and 2.17. pip matches the tags it is given literally (it expands
# manylinux2014 to the older names for x86 only), so every acceptable one is listed.
GLIBC_FLOOR = {"x86_64": 5, "aarch64": 17}
LEGACY = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
PIP_TIMEOUT = 900.0
"""Seconds one pip command may take (a download of every wheel on a slow link)."""
# What pip says when no index could be reached.
_OFFLINE = ("NewConnectionError", "Failed to establish a new connection", "Temporary failure in name resolution",
            "Network is unreachable", "No route to host", "Name or service not known")
# Left out of the copy a wheel is built from: build output, caches, and earlier bundles.
_NOT_SOURCE = shutil.ignore_patterns(".git", "build", "dist", "*.egg-info", "__pycache__", ".*cache", ".hypothesis",
                                     "work", "*.tar.gz", ".venv")
_PYTHON = re.compile(r"^3\.(\d+)$")
_CHECKOUT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Wheel:
    """One wheel file, named as PEP 427 says: name-version[-build]-python-abi-platform.whl."""

    path: Path
    name: str
    """The distribution's canonical name (PEP 503)."""
    version: str
    platforms: tuple[str, ...]
    """Its platform tags; ("any",) for a pure wheel."""

    @classmethod
    def of(cls, path: Path) -> Wheel:
        parts = path.name[:-len(".whl")].split("-")
        if not path.name.endswith(".whl") or len(parts) not in (5, 6):
            raise SniproxyError(f"{path.name} is not a wheel file name")
        return cls(path, canonical(parts[0]), parts[1], tuple(parts[-1].split(".")))

    @property
    def pure(self) -> bool:
        return self.platforms == ("any",)

    def serves(self, arch: str) -> bool:
        return self.pure or any(tag.endswith("_" + arch) for tag in self.platforms)

    def sha256(self) -> str:
        return sha256(self.path)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def platform_tags(arch: str) -> list[str]:
    """Every manylinux tag a CPython on `arch` with glibc up to GLIBC_CEILING loads, newest
    first as pip ranks them for the host it runs on."""
    tags = []
    for minor in range(GLIBC_CEILING, GLIBC_FLOOR[arch] - 1, -1):
        tags.append(f"manylinux_2_{minor}_{arch}")
        if minor in LEGACY:
            tags.append(f"{LEGACY[minor]}_{arch}")
    return tags


def parse_platforms(text: str) -> tuple[str, ...]:
    """"x86_64,aarch64" (or amd64/arm64) -> ("x86_64", "aarch64"), each once, in order."""
    found: list[str] = []
    for word in filter(None, (w.strip() for w in text.split(","))):
        arch = ALIASES.get(word, word)
        if arch not in ARCHITECTURES:
            raise UsageError(f"--platform: unknown platform {word!r}; choose from {', '.join(ARCHITECTURES)}")
        if arch not in found:
            found.append(arch)
    if not found:
        raise UsageError("--platform: name at least one of " + ", ".join(ARCHITECTURES))
    return tuple(found)


def parse_python(text: str) -> str:
    if not _PYTHON.match(text):
        raise UsageError(f"--python: {text!r} is not a CPython version such as 3.11")
    return text


def pip_options(python: str, arch: str) -> list[str]:
    """The options that make pip fetch wheels for another interpreter and machine."""
    abi = "cp" + python.replace(".", "")
    options = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi]
    for tag in platform_tags(arch):
        options += ["--platform", tag]
    return options


def pip(what: str, log: Path, *arguments: str) -> None:
    """Run pip quietly, its debug log kept in `log`; a failure is one line: pip's last error, and
    whether the index was out of reach (that shows in the debug log only)."""
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", "-q", "--log", str(log),
               *arguments]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=PIP_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        raise SniproxyError(f"{what}: pip did not finish in {PIP_TIMEOUT:g} s") from None
    if done.returncode == 0:
        return
    output = done.stderr + done.stdout
    errors = [line[len("ERROR: "):] for line in output.splitlines() if line.startswith("ERROR: ")]
    if "No module named pip" in output:
        errors = [f"pip is not installed for {sys.executable}"]
    reason = errors[-1] if errors else (output.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    try:
        debug = log.read_text(errors="replace")
    except OSError:
        debug = ""
    offline = any(s in output or s in debug for s in _OFFLINE)
    raise SniproxyError(f"{what}: {reason.strip()}" + (" (the package index could not be reached: no network?)"
                                                      if offline else ""))


def checkout() -> Path | None:
    """The sniproxy source tree this module runs from, or None for an installed copy."""
    try:
        project = tomllib.loads((_CHECKOUT / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return None
    return _CHECKOUT if project.get("project", {}).get("name") == "sniproxy" else None


def build_wheel(work: Path) -> Path:
    """Build the sniproxy wheel from a copy of this checkout, so no stale build/ tree of the
    checkout's own can slip a deleted module into it."""
    source = checkout()
    if source is None:
        raise UsageError("this sniproxy is installed, not a checkout: give --wheel PATH (a sniproxy wheel)")
    copy = work / "source"
    shutil.copytree(source, copy, ignore=_NOT_SOURCE, symlinks=True)
    pip("building the sniproxy wheel", work / "pip-wheel.log", "wheel", "--no-deps", "-w", str(work / "dist"), str(copy))
    (wheel,) = (work / "dist").glob("sniproxy-*.whl")
    return wheel


def own_wheel(path: str | None, work: Path) -> Wheel:
    if path is None:
        return Wheel.of(build_wheel(work))
    given = Path(path)
    if not given.is_file():
        raise UsageError(f"--wheel: no file {path}")
    wheel = Wheel.of(given)
    if wheel.name != "sniproxy":
        raise UsageError(f"--wheel: {given.name} is a wheel of {wheel.name}, not of sniproxy")
    return wheel


def download(own: Wheel, python: str, platforms: tuple[str, ...], wheels: Path, work: Path) -> dict[str, list[Wheel]]:
    """Fetch every dependency's wheels into `wheels`; return them by architecture."""
    by_arch: dict[str, list[Wheel]] = {}
    pins = work / "pins.txt"
    for arch in platforms:
        dest = work / f"download-{arch}"
        held = ["-c", str(pins)] if pins.exists() else []
        pip(f"pip download for CPython {python} on {arch}", work / f"pip-{arch}.log", "download", *pip_options(python, arch), *held,
            "-d", str(dest), str(own.path))
        found = [Wheel.of(p) for p in sorted(dest.glob("*.whl")) if Wheel.of(p).name != own.name]
        missing = [w.name for w in found if not w.serves(arch)]
        if missing:
            raise SniproxyError(f"pip chose wheels that do not run on {arch}: {', '.join(missing)}")
        if by_arch:
            first, names = next(iter(by_arch)), {w.name for w in found}
            expected = {w.name for w in by_arch[first]}
            if names != expected:
                raise SniproxyError(f"the dependencies differ between {first} and {arch} "
                                    f"({', '.join(sorted(names ^ expected))}): one requirements.txt cannot serve both")
        else:
            pins.write_text("".join(f"{w.name}=={w.version}\n" for w in found))
        for wheel in found:
            shutil.copy2(wheel.path, wheels / wheel.path.name)
        by_arch[arch] = [Wheel.of(wheels / w.path.name) for w in found]
    return by_arch


def requirements(wheels: list[Wheel], header: str) -> str:
    """Every distribution pinned ==, with the hash of each of its wheels (pip's hash-checking mode)."""
    by_name: dict[str, list[Wheel]] = {}
    for wheel in wheels:
        by_name.setdefault(wheel.name, []).append(wheel)
    lines = [header]
    for name, group in sorted(by_name.items()):
        versions = sorted({w.version for w in group})
        if len(versions) != 1:
            raise SniproxyError(f"{name}: wheels of several versions ({', '.join(versions)})")
        hashes = sorted({w.sha256() for w in group})
        lines.append(f"{name}=={versions[0]} \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in hashes))
    return "\n".join(lines) + "\n"


def manifest(own: Wheel, python: str, by_arch: dict[str, list[Wheel]]) -> dict:
    every = [own, *{w.path.name: w for ws in by_arch.values() for w in ws}.values()]
    return {
        "sniproxy": own.version,
        "python": python,
        "implementation": "cp",
        "platforms": {arch: platform_tags(arch) for arch in by_arch},
        "distributions": {w.name: w.version for w in sorted(every, key=lambda w: w.name)},
        "wheels": {w.path.name: {"sha256": w.sha256(), "pure": w.pure,
                                 "architectures": [arch for arch in by_arch if w.serves(arch)]}
                   for w in sorted(every, key=lambda w: w.path.name)},
    }


INSTALL_SH = r"""#!/bin/sh
# Install sniproxy from this bundle with no network: check every file against SHA256SUMS, then
# pip install --no-index --require-hashes into a new venv. Usage: install.sh [VENV] (default
# /opt/sniproxy). PYTHON names the interpreter (default python@PYTHON@: the bundle's wheels are
# for CPython @PYTHON@). pip reads no config file or PIP_* variable of the host here: the bundle
# is the whole source.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
venv=${1:-/opt/sniproxy}
python=${PYTHON:-python@PYTHON@}
if ! report=$(cd "$here" && sha256sum --strict -c SHA256SUMS 2>&1); then
    bad=$(printf '%s\n' "$report" | grep ': FAILED' | sed 's/: FAILED.*//' | paste -s -d ' ' -)
    echo "install.sh: checksum mismatch in $here: ${bad:-SHA256SUMS is unreadable}" >&2
    exit 1
fi
"$python" -m venv "$venv"
PIP_CONFIG_FILE=/dev/null "$venv/bin/python" -m pip --isolated --disable-pip-version-check --no-input install \
    --quiet --no-index --find-links "$here/wheels" --only-binary=:all: --require-hashes -r "$here/requirements.txt"
echo "installed sniproxy @VERSION@ into $venv: $venv/bin/sniproxy"
"""


def install_script(python: str, version: str) -> str:
    return INSTALL_SH.replace("@PYTHON@", python).replace("@VERSION@", version)


def _add(tar: tarfile.TarFile, name: str, data: bytes, mode: int = 0o644) -> None:
    info = tarfile.TarInfo(f"{TOP}/{name}")
    info.size, info.mode, info.mtime = len(data), mode, 0
    info.uname = info.gname = "root"
    tar.addfile(info, io.BytesIO(data))


def write_tarball(out: Path, files: dict[str, bytes]) -> None:
    """Write `files` (name -> bytes, in order) under sniproxy-bundle/, then move into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=out.parent, prefix=f".{out.name}.", delete=False) as handle:
        try:
            with tarfile.open(fileobj=handle, mode="w:gz", format=tarfile.PAX_FORMAT) as tar:
                for directory in ("", "wheels"):
                    info = tarfile.TarInfo(f"{TOP}/{directory}".rstrip("/"))
                    info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, 0
                    tar.addfile(info)
                for name, data in files.items():
                    _add(tar, name, data, 0o755 if name == "install.sh" else 0o644)
        except BaseException:
            os.unlink(handle.name)
            raise
    os.chmod(handle.name, 0o644)
    os.replace(handle.name, out)


def make(out: Path, python: str, platforms: tuple[str, ...], wheel: str | None = None) -> dict:
    """Build the bundle at `out`; return its manifest."""
    with tempfile.TemporaryDirectory(prefix="sniproxy-bundle.") as tmp:
        work = Path(tmp)
        wheels = work / "wheels"
        wheels.mkdir()
        own = own_wheel(wheel, work)
        by_arch = download(own, python, platforms, wheels, work)
        own = Wheel.of(Path(shutil.copy2(own.path, wheels / own.path.name)))
        every = [own, *{w.path.name: w for ws in by_arch.values() for w in ws}.values()]
        header = (f"# sniproxy {own.version} for CPython {python} on {', '.join(platforms)}: every distribution "
                  "pinned, with the hash of each of its wheels.\n"
                  "# pip install --no-index --find-links wheels --require-hashes -r requirements.txt")
        info = manifest(own, python, by_arch)
        files = {f"wheels/{w.path.name}": w.path.read_bytes() for w in sorted(every, key=lambda w: w.path.name)}
        files["requirements.txt"] = requirements(every, header).encode()
        files["MANIFEST.json"] = (json.dumps(info, indent=2) + "\n").encode()
        sums = "".join(f"{hashlib.sha256(data).hexdigest()}  {name}\n" for name, data in files.items())
        files["SHA256SUMS"] = sums.encode()
        files["install.sh"] = install_script(python, own.version).encode()
        write_tarball(out, files)
    return info


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--python", default="%d.%d" % sys.version_info[:2],
                        help="the target CPython, X.Y (default: this one, %(default)s)")
    parser.add_argument("--platform", default=",".join(ARCHITECTURES),
                        help="target architectures, comma-separated (default %(default)s)")
    parser.add_argument("-o", "--output", default=DEFAULT_OUT, metavar="FILE",
                        help="the tarball to write (default %(default)s)")
    parser.add_argument("--wheel", metavar="PATH", help="a sniproxy wheel to bundle, instead of building one from "
                        "this checkout")


def main(args: argparse.Namespace) -> int:
    """0: written; 2: a bad flag, pip failing, no network (one line)."""
    try:
        python, platforms = parse_python(args.python), parse_platforms(args.platform)
        info = make(Path(args.output), python, platforms, args.wheel)
    except SniproxyError as exc:
        print(f"bundle: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"bundle: error: {exc.filename or args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    compiled = [name for name, wheel in info["wheels"].items() if not wheel["pure"]]
    print(f"wrote {args.output}: sniproxy {info['sniproxy']} for CPython {python} on {', '.join(platforms)}, "
          f"{len(info['wheels'])} wheels ({len(compiled)} compiled), {os.path.getsize(args.output) / (1 << 20):.1f} MiB")
    return 0
