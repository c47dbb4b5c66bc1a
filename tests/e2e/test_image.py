"""The container image: the repository's Dockerfile, built by podman from the offline bundle on
a Debian 12 base made here (base_image.py), run in the e2e world as an ECS task or a pod
behind an NLB would be, and carrying a push and a pull.

    img (skopeo) ──veth── srv: HAProxy 198.18.1.20:443 ──PROXY v2──> container 198.18.1.20:8443
                               (the NLB: health check GET /readyz on :9464)   │
                                                                              └─> registry, starport, DNS

The container shares srv's network (`--network host`, as awsvpc gives a task its own ENI),
reads its config from a file mounted at /etc/sniproxy/sniproxy.toml, runs as the image's
non-root user on the image's unprivileged port with no capability and a read-only root, and
answers the image's HEALTHCHECK. Port 443 in the container takes NET_BIND_SERVICE and a
start as root that [server] user ends. A
`podman stop` (the image's STOPSIGNAL) drains it and it exits 0. The image's size and the
time from `podman run` to /readyz answering 200 go to the e2e measurements.
"""

from __future__ import annotations

import http.client
import json
import resource
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import haproxy_stats

from . import base_image, oci_image, procs
from .netns import Namespace
from .podman_store import Store
from .world import ACCOUNT, DKR, DNS_ADDR, DNS_PORT, REGION, REPORT, World, listening

pytestmark = pytest.mark.e2e
NEEDS = ("podman", "image")

ROLE = "img"
LINK = ("198.19.7.1", "198.19.7.2")  # srv end, img end
PROXY = "198.18.1.20"
PORT, METRICS = 8443, 9464  # the image's EXPOSE and [metrics] port's default
IMAGE = "localhost/sniproxy:e2e"
USER = "10001"  # the image's
NAME = "sniproxy-e2e"
HAPROXY = "/usr/sbin/haproxy"
DRAIN_DELAY, DRAIN_TIMEOUT = 1.0, 5.0
MiB = 1 << 20
# podman's defaults for root raise nofile and nproc to 1048576; root here lacks
# CAP_SYS_RESOURCE, so runc is refused. The limits this test runs under are allowed.
_NOFILE = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
_ULIMITS = ("--ulimit", f"nofile={_NOFILE}:{_NOFILE}", "--ulimit", "nproc=4096:4096")


def _readyz(port: int = METRICS) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
    try:
        conn.request("GET", "/readyz")
        return conn.getresponse().status
    except OSError:
        return 0
    finally:
        conn.close()


@pytest.fixture(scope="module")
def store(world: World):
    made = Store(world.tmp / "podman-image")
    made.open()
    yield made
    problems = made.close()
    assert not problems, problems


@pytest.fixture(scope="module")
def image(world: World, store: Store, bundle: Path) -> str:
    """Import the stand-in base, then build the Dockerfile from the bundle alone."""
    rootfs, mmdebstrap_s = base_image.rootfs(world.tmp / "logs" / "mmdebstrap.log")
    base = base_image.base_name()
    _, import_s = store.podman("import", "--change", 'CMD ["python3"]', str(rootfs), base, timeout=300)
    assert base in store.check("images", "--format", "{{.Repository}}:{{.Tag}}")
    context = world.tmp / "image-context"
    context.mkdir()
    (context / bundle.name).write_bytes(bundle.read_bytes())
    # --layers=false: with vfs every cached layer is a full copy of the root; --format docker
    # keeps HEALTHCHECK, which the OCI format has no field for.
    built, build_s = store.podman("build", "--layers=false", "--pull=never", "--format", "docker",
                                  "--signature-policy", str(store.work / "conf" / "policy.json"),
                                  "-f", str(base_image.DOCKERFILE), "-t", IMAGE, str(context), timeout=600)
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = int(store.check("image", "inspect", "--format", "{{.Size}}", IMAGE))
    base_size = int(store.check("image", "inspect", "--format", "{{.Size}}", base))
    REPORT["image base (mmdebstrap, cached after the first run)"] = (
        f"{base}: {base_size / MiB:.0f} MiB, made in {mmdebstrap_s:.0f} s, imported in {import_s:.1f} s")
    REPORT["image build (podman, vfs)"] = f"{build_s:.1f} s"
    REPORT["image size"] = f"{size / MiB:.0f} MiB ({(size - base_size) / MiB:.0f} MiB over the base)"
    return IMAGE


def test_the_image_is_non_root_on_an_unprivileged_port_with_a_health_check(store, image):
    inspected = json.loads(store.check("image", "inspect", image))[0]
    config = inspected["Config"]
    assert config["User"] == f"{USER}:{USER}"
    assert config["StopSignal"] in ("SIGTERM", "15")
    assert set(config["ExposedPorts"]) == {f"{PORT}/tcp", f"{METRICS}/tcp"}
    assert config["Entrypoint"] == ["sniproxy"] and config["Cmd"] == ["run"]
    assert "/readyz" in " ".join(inspected["Healthcheck"]["Test"])


def _config(path: Path, listen: str = f'address = "{PROXY}"\nport = {PORT}\nproxy_protocol = true', server: str = "",
            metrics: int = METRICS) -> Path:
    path.write_text(
        f'[[listen]]\n{listen}\n\n'
        f'[resolver]\nnameservers = ["{DNS_ADDR}"]\nport = {DNS_PORT}\ntimeout = 2.0\n\n'
        f'[server]\ndrain_delay = {DRAIN_DELAY}\ndrain_timeout = {DRAIN_TIMEOUT}\n{server}\n'
        f'[metrics]\naddress = "0.0.0.0"\nport = {metrics}\n\n'
        f'[ecr]\nregion = "{REGION}"\naccounts = ["{ACCOUNT}"]\n')
    path.chmod(0o644)  # the image's user reads it
    return path


def _stop(store: Store, container: procs.Service, name: str, srv: Namespace) -> tuple[subprocess.CompletedProcess, float, int]:
    """`podman stop` (the image's STOPSIGNAL), then the attached `podman run` exits with the
    container's status; it is stopped by PID only if it does not."""
    stop, seconds = store.podman("stop", "--time", "30", name, ns=srv, timeout=60)
    try:
        rc = container.popen.wait(timeout=30)
    except subprocess.TimeoutExpired:
        rc = container.stop(timeout=10)
    return stop, seconds, rc


def _uids(store: Store, name: str) -> list[str]:
    """Real, effective, saved and file-system uid of the container's main process."""
    pid = int(store.check("inspect", "--format", "{{.State.Pid}}", name))
    line = next(line for line in Path(f"/proc/{pid}/status").read_text().splitlines() if line.startswith("Uid:"))
    return line.split()[1:]


def _balancer(world: World) -> tuple[procs.Service, Path]:
    """HAProxy as the NLB: 443 to the container's 8443 with PROXY v2, checking /readyz."""
    stats = world.tmp / "nlb.sock"
    config = world.tmp / "nlb.cfg"
    config.write_text(f"""
global
    stats socket {stats} mode 600 level admin

defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s

frontend nlb
    bind {PROXY}:443
    default_backend sniproxy

backend sniproxy
    option httpchk
    http-check send meth GET uri /readyz
    http-check expect status 200
    server container {PROXY}:{PORT} check port {METRICS} inter 500ms fall 2 rise 1 send-proxy-v2
""")
    service = procs.start(world.ns["srv"], "nlb", [HAPROXY, "-db", "-f", str(config)],
                          world.env("nlb"), world.tmp / "logs" / "nlb.log")
    world.services.append(service)
    return service, stats


def _server_status(stats: Path) -> str:
    try:
        rows = haproxy_stats(stats)
    except OSError:
        return ""
    return next((r["status"] for r in rows if r["pxname"] == "sniproxy" and r["svname"] == "container"), "")


def test_the_container_serves_a_push_and_a_pull_behind_a_balancer(world, store, image, tmp_path):
    srv = world.ns["srv"]
    world.add_client(ROLE, LINK, PROXY)
    config = _config(tmp_path / "sniproxy.toml")
    log = world.tmp / "logs" / "container.log"
    started = time.monotonic()
    # As docs/container.md's pod runs it: no capability at all, a read-only root.
    container = store.spawn(NAME, "run", "--rm", "--name", NAME, "--network", "host", "--health-interval", "disable",
                            *_ULIMITS, "--cap-drop", "ALL", "--read-only",
                            "--volume", f"{config}:/etc/sniproxy/sniproxy.toml:ro", image, ns=srv, log=log)
    try:
        procs.wait_until(lambda: container.check_alive() or srv.call(_readyz) == 200, 60, "the container's /readyz")
        ready_s, ready_at = time.monotonic() - started, time.time()
        # podman's share (vfs copies the whole root for a new container), then sniproxy's
        started_ns = int(store.check("inspect", "--format", "{{.State.StartedAt.UnixNano}}", NAME, ns=srv))
        REPORT["image: podman run to /readyz 200"] = (
            f"{ready_s:.2f} s, of which {ready_at - started_ns / 1e9:.2f} s from the container's start")

        # With --network host the container has no network namespace of its own: an exec
        # (the health check is one) gets podman's, so podman must run in srv's.
        healthy, _ = store.podman("healthcheck", "run", NAME, ns=srv)
        assert healthy.returncode == 0, healthy.stdout + healthy.stderr
        assert _uids(store, NAME) == [USER] * 4

        nlb, stats = _balancer(world)
        procs.wait_until(lambda: nlb.check_alive() or _server_status(stats) == "UP", 20, "the balancer to mark it UP")

        pushed_image = oci_image.build(tmp_path / "push", "v1", (2 * MiB, 4096))
        ref = f"{DKR}/e2e/through-the-image:v1"
        pushed, push_s = world.push(ROLE, pushed_image, ref)
        assert pushed.returncode == 0, pushed.stderr
        pulled, pull_s = world.pull(ROLE, ref, tmp_path / "pulled", "v1")
        assert pulled.returncode == 0, pulled.stderr
        assert oci_image.read(tmp_path / "pulled", "v1") == (pushed_image.manifest_digest, pushed_image.blobs)
        REPORT["image: skopeo push / pull through the container (2 MiB layer)"] = f"{push_s:.2f} s / {pull_s:.2f} s"
    finally:
        stop, stop_s, rc = _stop(store, container, NAME, srv)
    assert stop.returncode == 0, stop.stderr
    assert rc == 0, f"the container exited {rc} on podman stop:\n{procs.tail(log)}"
    assert stop_s >= DRAIN_DELAY, "the drain delay was skipped"

    access = [json.loads(line) for line in log.read_text().splitlines() if line.startswith("{") and '"sni"' in line]
    routes = {entry["route"] for entry in access}
    assert {"ecr-dkr", "ecr-s3"} <= routes, access
    # The balancer's PROXY v2 header named the builder, not the balancer.
    assert {entry["client"].rsplit(":", 1)[0] for entry in access} == {LINK[1]}, access


def test_port_443_with_only_the_capability_to_bind_it(world, store, image, tmp_path):
    """docs/container.md's way to listen on 443 in the container: start as root with every
    capability dropped but NET_BIND_SERVICE (and SETUID/SETGID to give up root), and let
    [server] user drop to the image's user once the listener is bound."""
    srv, address, metrics = world.ns["srv"], "198.18.1.21", METRICS + 1
    srv.run_ip("addr", "add", f"{address}/32", "dev", "lo")
    config = _config(tmp_path / "sniproxy.toml", f'address = "{address}"\nport = 443', 'user = "sniproxy"\n', metrics)
    name, log = f"{NAME}-443", world.tmp / "logs" / "container-443.log"
    container = store.spawn(name, "run", "--rm", "--name", name, "--network", "host", "--health-interval", "disable",
                            *_ULIMITS, "--user", "0", "--cap-drop", "ALL", "--cap-add", "NET_BIND_SERVICE",
                            "--cap-add", "SETUID", "--cap-add", "SETGID",
                            "--volume", f"{config}:/etc/sniproxy/sniproxy.toml:ro", image, ns=srv, log=log)
    try:
        procs.wait_until(lambda: container.check_alive() or srv.call(_readyz, metrics) == 200, 60,
                         "the container's /readyz")
        assert (address, 443) in srv.call(listening)
        assert _uids(store, name) == [USER] * 4  # root is gone once the socket is bound
    finally:
        stop, _, rc = _stop(store, container, name, srv)
    assert stop.returncode == 0 and rc == 0, f"{stop.stderr}\n{procs.tail(log)}"
