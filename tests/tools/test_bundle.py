"""`sniproxy bundle`: the tags pip is given, one-line errors, and a real bundle of this checkout
read back: every distribution pinned and hashed, aarch64 wheels for every compiled one, sums
that sha256sum accepts, and an install.sh that refuses a changed wheel in one line.

Installing it with no network and carrying a connection from that install is
tests/e2e/test_bundle_offline.py; building the container image from it, tests/e2e/test_image.py.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

from sniproxy.tools import bundle as bundle_mod
from sniproxy.tools.bundle import ARCHITECTURES, TOP, Wheel, parse_platforms, platform_tags
from tests.conftest import BUNDLE_PYTHON
from tests.helpers import REPO, clean_env

UNSHARE = "/usr/bin/unshare"


def test_every_manylinux_tag_up_to_al2023s_glibc_newest_first():
    x86 = platform_tags("x86_64")
    assert x86[0] == "manylinux_2_34_x86_64" and x86[-1] == "manylinux1_x86_64"
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"} <= set(x86)
    arm = platform_tags("aarch64")
    assert arm[0] == "manylinux_2_34_aarch64" and arm[-1] == "manylinux2014_aarch64"
    assert not any("2010" in t or "manylinux1" in t for t in arm)  # aarch64 begins at glibc 2.17
    minors = [int(m) for m in re.findall(r"manylinux_2_(\d+)_", " ".join(x86))]
    assert minors == sorted(minors, reverse=True) and max(minors) == bundle_mod.GLIBC_CEILING


def test_platforms_take_dockers_names_and_keep_their_order():
    assert parse_platforms("arm64, amd64,aarch64") == ("aarch64", "x86_64")


def test_a_wheel_name_says_what_it_serves():
    arm = Wheel.of(Path("uvloop-0.23.0-cp311-cp311-manylinux2014_aarch64.manylinux_2_17_aarch64.whl"))
    assert (arm.name, arm.version, arm.pure) == ("uvloop", "0.23.0", False)
    assert arm.serves("aarch64") and not arm.serves("x86_64")
    pure = Wheel.of(Path("prometheus_client-0.26.0-py3-none-any.whl"))
    assert pure.name == "prometheus-client" and pure.serves("aarch64") and pure.serves("x86_64")


def _bundle_cli(*argv: str, prefix: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "sniproxy", "bundle", *argv], capture_output=True, text=True,
                          timeout=300, env=clean_env(**env), cwd=REPO)


def one_line(done: subprocess.CompletedProcess, *fragments: str) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr and done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1, done.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("argv, fragments", [
    (["--platform", "x86_64,ppc64le"], ["unknown platform 'ppc64le'", "x86_64, aarch64"]),
    (["--platform", ","], ["--platform"]),
    (["--python", "3"], ["--python", "'3'"]),
    (["--wheel", "/nonexistent/sniproxy-0.1.0-py3-none-any.whl"], ["--wheel", "no file"]),
], ids=["platform", "no-platform", "python", "no-wheel"])
def test_bad_flags_are_one_line(argv, fragments, tmp_path):
    one_line(_bundle_cli(*argv, "-o", str(tmp_path / "b.tar.gz")), "bundle: error:", *fragments)
    assert not (tmp_path / "b.tar.gz").exists()


@pytest.fixture(scope="module")
def unpacked(bundle, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("unpacked")
    with tarfile.open(bundle) as tar:
        assert all(m.name == TOP or m.name.startswith(TOP + "/") for m in tar.getmembers())
        tar.extractall(root, filter="data")
    return root / TOP


def test_another_wheel_is_refused_in_one_line(unpacked, tmp_path):
    six = next((unpacked / "wheels").glob("six-*.whl"))
    one_line(_bundle_cli("--wheel", str(six), "-o", str(tmp_path / "b.tar.gz")), "bundle: error:", "not of sniproxy")


def test_pip_failing_is_one_line(unpacked, tmp_path):
    """A Python the wheel does not support: pip's own reason, in one line."""
    own = next((unpacked / "wheels").glob("sniproxy-*.whl"))
    line = one_line(_bundle_cli("--wheel", str(own), "--python", "3.10", "-o", str(tmp_path / "b.tar.gz"),
                                PIP_CONFIG_FILE=os.devnull, PIP_NO_INDEX="1"), "bundle: error:", "3.10")
    assert "pip download for CPython 3.10 on x86_64" in line


def test_no_network_is_one_line(unpacked, tmp_path):
    """In a network namespace of its own (only lo, down), with no pip cache or local index."""
    if os.geteuid() != 0 or not os.access(UNSHARE, os.X_OK):
        if os.environ.get("CI"):
            pytest.fail("needs root and unshare on CI", pytrace=False)
        pytest.skip("needs root and unshare (a network namespace)")
    own = next((unpacked / "wheels").glob("sniproxy-*.whl"))
    line = one_line(_bundle_cli("--wheel", str(own), "-o", str(tmp_path / "b.tar.gz"), prefix=(UNSHARE, "-n"),
                                PIP_CONFIG_FILE=os.devnull, PIP_NO_CACHE_DIR="1", PIP_RETRIES="0", PIP_TIMEOUT="5"),
                    "bundle: error:", "no network?")
    assert "x86_64" in line


def _requirements(unpacked: Path) -> dict[str, tuple[str, set[str]]]:
    """name -> (version, hashes), read back from requirements.txt."""
    text = (unpacked / "requirements.txt").read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        spec, *options = line.split()
        name, version = spec.split("==")
        assert all(o.startswith("--hash=sha256:") for o in options), line
        found[name] = (version, {o.split(":", 1)[1] for o in options})
    return found


def test_requirements_pin_and_hash_every_wheel(unpacked):
    wheels = [Wheel.of(p) for p in (unpacked / "wheels").glob("*.whl")]
    pinned = _requirements(unpacked)
    assert set(pinned) == {w.name for w in wheels}
    for wheel in wheels:
        version, hashes = pinned[wheel.name]
        assert wheel.version == version and wheel.sha256() in hashes, wheel.path.name
    # nothing hashed that the bundle does not hold
    assert sum(len(h) for _, h in pinned.values()) == len(wheels)
    manifest = json.loads((unpacked / "MANIFEST.json").read_text())
    assert {"sniproxy", "uvloop", "dnspython", "prometheus-client", "boto3", "botocore"} <= set(manifest["distributions"])
    assert manifest["python"] == BUNDLE_PYTHON and set(manifest["platforms"]) == set(ARCHITECTURES)
    assert manifest["distributions"] == {name: version for name, (version, _) in pinned.items()}
    assert {name for name, w in manifest["wheels"].items() if not w["pure"]} == {
        w.path.name for w in wheels if not w.pure}


def test_every_compiled_dependency_has_a_wheel_for_each_architecture(unpacked):
    wheels = [Wheel.of(p) for p in (unpacked / "wheels").glob("*.whl")]
    compiled = {w.name for w in wheels if not w.pure}
    assert "uvloop" in compiled
    for name in compiled:
        for arch in ARCHITECTURES:
            fits = [w for w in wheels if w.name == name and w.serves(arch)]
            assert len(fits) == 1, (name, arch, fits)
            assert any(tag.startswith("manylinux") for tag in fits[0].platforms)
            assert f"cp{BUNDLE_PYTHON.replace('.', '')}" in fits[0].path.name


def test_sha256sum_checks_every_file(unpacked):
    listed = {line.split("  ", 1)[1] for line in (unpacked / "SHA256SUMS").read_text().splitlines()}
    assert listed == {f"wheels/{p.name}" for p in (unpacked / "wheels").iterdir()} | {"requirements.txt",
                                                                                      "MANIFEST.json"}
    done = subprocess.run(["sha256sum", "--strict", "-c", "SHA256SUMS"], cwd=unpacked, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_install_sh_refuses_a_changed_wheel_in_one_line(unpacked, tmp_path):
    copy = tmp_path / TOP
    shutil.copytree(unpacked, copy)
    uvloop = next((copy / "wheels").glob("uvloop-*aarch64*.whl"))
    with open(uvloop, "ab") as handle:
        handle.write(b"\0")
    done = subprocess.run(["/bin/sh", str(copy / "install.sh"), str(tmp_path / "venv")], capture_output=True,
                          text=True, timeout=60, env={"PATH": "/usr/bin:/bin"})
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [f"install.sh: checksum mismatch in {copy}: wheels/{uvloop.name}"]
    assert not (tmp_path / "venv").exists()
