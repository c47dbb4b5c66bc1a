"""Fixtures of the end-to-end suite. The world itself is built in world.py; it lives for
this package only, so none of its servers runs on beside the rest of the suite."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

from . import netns, oci_image
from .world import REPORT, TOPOLOGIES, World

MiB = 1 << 20
# >= 2 layers, one >= 20 MiB, the rest small to keep the run short
LAYERS = (20 * MiB, 256 * 1024, 4 * 1024)


# What the world needs, then what each group of clients needs: a test module names the
# groups it uses in NEEDS. Each entry: (program, Debian package) or (python module, PyPI name).
PROGRAMS = {
    "world": (("/usr/bin/docker-registry", "docker-registry"), ("/usr/bin/skopeo", "skopeo")),
    "docker": (("/usr/sbin/dockerd", "docker.io"), ("/usr/bin/docker", "docker.io"),
               ("/usr/bin/containerd", "containerd"), ("/usr/sbin/runc", "runc"),
               ("/usr/bin/docker-credential-ecr-login", "amazon-ecr-credential-helper"),
               ("/usr/bin/nsenter", "util-linux"), ("/usr/bin/unshare", "util-linux")),
    "podman": (("/usr/bin/podman", "podman"),),
    "pq": (("/usr/sbin/ethtool", "ethtool"), ("/usr/sbin/tc", "iproute2")),
    "image": (("/usr/bin/mmdebstrap", "mmdebstrap"), ("/usr/sbin/haproxy", "haproxy"),
              ("/usr/bin/nsenter", "util-linux"), ("/usr/bin/python3.11", "python3-venv")),
}
MODULES = {
    "world": (("moto", "moto[server]"), ("flask", "moto[server]"), ("bcrypt", "bcrypt"),
              ("trustme", "trustme"), ("dns", "dnspython")),
    "pq": (("curl_cffi", "curl_cffi"),),
}


def _missing(group: str) -> str | None:
    for tool, package in PROGRAMS.get(group, ()):
        if not os.access(tool, os.X_OK):
            return f"{tool} missing (apt-get install {package})"
    for module, package in MODULES.get(group, ()):
        if importlib.util.find_spec(module) is None:
            return f"python module {module} missing (pip install {package})"
    return None


def _unavailable() -> str | None:
    if missing := _missing("world"):
        return missing
    try:
        netns.probe()
    except netns.NetnsUnavailable as exc:
        return str(exc)
    return None


UNAVAILABLE = _unavailable()


def pytest_runtest_setup(item) -> None:
    # Skipping here rather than in a fixture makes pytest report the conftest as the skip's
    # location, so -ra folds the whole suite into one line (one more per missing client).
    missing = UNAVAILABLE or next(
        filter(None, map(_missing, getattr(item.module, "NEEDS", ()))), None)
    if not missing:
        return
    if os.environ.get("CI"):
        pytest.fail(f"e2e must run on CI but cannot: {missing}", pytrace=False)
    pytest.skip(f"e2e skipped: {missing}")


@pytest.fixture(scope="package")
def world(tmp_path_factory):
    if UNAVAILABLE:
        pytest.fail(f"e2e must run on CI but cannot: {UNAVAILABLE}", pytrace=False)
    built = World(tmp_path_factory.mktemp("e2e"))
    try:
        built.build()
        yield built
    finally:
        problems = built.close()
    assert not problems, problems


@pytest.fixture(scope="package")
def image(world: World) -> oci_image.Image:
    return oci_image.build(world.tmp / "image", "v1", LAYERS)


@pytest.fixture(scope="package")
def small_image(world: World) -> oci_image.Image:
    return oci_image.build(world.tmp / "small-image", "v1", (1024,))


@pytest.fixture
def start_proxy(world: World):
    """Start `sniproxy run` for a topology; each test gets its own, so its metrics and
    access log hold only that test's connections. Stopped by PID with SIGTERM: it must
    drain and exit 0."""
    started = []

    def start(topology: str):
        _, listen = TOPOLOGIES[topology]
        proxy = world.start_proxy(f"sniproxy-{topology}-{len(world.services)}", listen,
                                  metrics_port=9464 + len(started))
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        rc = proxy.service.stop(timeout=15)
        assert rc == 0, f"sniproxy exited {rc} on SIGTERM:\n{proxy.service.log.read_text()[-3000:]}"


@pytest.fixture
def pull_dir(tmp_path: Path) -> Path:
    return tmp_path / "pulled"


def pytest_terminal_summary(terminalreporter) -> None:
    if not REPORT:
        return
    terminalreporter.section("e2e measurements")
    for key, value in REPORT.items():
        terminalreporter.write_line(f"{key}: {value}")
