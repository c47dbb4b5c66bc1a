"""The clients builders named: the Docker engine, with and without the ECR credential
helper, and podman, through `sniproxy run`.

Debian's docker.io (dockerd with its managed containerd and runc, see docker_engine.py) runs
in a client namespace. It logs in the two ways builders do:

- password: a token fetched as `aws ecr get-login-password` does (boto3, through the proxy),
  then `docker login -u AWS --password-stdin`;
- credential helper: the CLI's config names `ecr-login` (amazon-ecr-credential-helper) in
  `credHelpers` and stores no password; the helper asks the ECR API for a token itself
  (the AWS Go SDK, through the proxy) each time the CLI needs one.

Each flow imports a new image (`docker import` of a 20 MiB tarball of random bytes), pushes
it, removes it and pulls it back: the image id must survive, and the pull's layer must come
through the registry's redirect to the starport bucket name. The password flow also runs
without the proxy, from the "direct" namespace, for baseline times. Then podman pulls what
docker pushed, both ways, into an empty store.
"""

from __future__ import annotations

import json
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from . import observe, oci_image, podman
from .docker_engine import HELPER, DockerEngine
from .world import DKR, LINKS, NAMES, PROXY_ONE, REPORT, World

pytestmark = pytest.mark.e2e
NEEDS = ("docker", "podman")

MiB = 1 << 20
LAYER = 20 * MiB
ROLE = "cli1"  # the one-address builders: their /etc/hosts is what `sniproxy hosts` prints
LISTENERS = {name: f"{PROXY_ONE}:443" for name in NAMES}
# The credential helper's AWS Go SDK: keys, region, and the test CA (AWS_CA_BUNDLE).
# Nothing is read from the machine's AWS config or instance metadata.
HELPER_AWS = {"AWS_ACCESS_KEY_ID": "AKIDE2ETESTING", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
              "AWS_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true",
              "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}

# namespace -> (ref, image id) of the password flow's image, for podman to pull
PUSHED: dict[str, tuple[str, str]] = {}


@pytest.fixture(scope="module")
def engines(world: World):
    """dockerd per client namespace, started on first use; all stopped by PID at the end of
    the module, which then fails if a process or a mount of theirs is left."""
    started: dict[str, DockerEngine] = {}

    def engine(role: str) -> DockerEngine:
        if role not in started:
            started[role] = DockerEngine(world.ns[role], world.tmp / f"docker-{role}",
                                         world.tmp / "logs" / f"dockerd-{role}.log", [DKR],
                                         world.ca_pem)
            started[role].start()  # registered first: a half-started daemon is stopped too
            if "client versions" not in REPORT:
                REPORT["client versions"] = _versions(started[role], world.tmp / "docker-version")
        return started[role]

    yield engine
    problems = [problem for each in started.values() for problem in each.stop()]
    assert not problems, problems


def _versions(engine: DockerEngine, config: Path) -> str:
    config.mkdir(exist_ok=True)
    seen = engine.versions(config)
    helper = subprocess.run([HELPER, "-v"], capture_output=True, text=True, timeout=30,
                            env={"PATH": "/usr/bin:/bin", "HOME": str(config)}).stdout
    seen["amazon-ecr-credential-helper"] = re.search(r"Version:\s*(\S+)", helper).group(1)
    seen["podman"] = podman.version()
    return ", ".join(f"{name} {version}" for name, version in seen.items())


@dataclass(frozen=True)
class RoundTrip:
    image_id: str
    push_s: float
    pull_s: float


def _push_rmi_pull(world: World, engine: DockerEngine, flow: str, config: Path,
                   **env: str) -> RoundTrip:
    """Import a new image, push it, remove it, pull it back; check it came back the same."""
    ref = f"{DKR}/e2e/docker-{flow}:v1"
    tarball = oci_image.rootfs_tar(world.tmp / "docker-rootfs" / f"{flow}.tar", LAYER)
    imported, _ = engine.docker("import", str(tarball), ref, config=config)
    assert imported.returncode == 0, imported.stderr
    image_id = engine.image_id(ref, config)
    assert image_id and image_id.startswith("sha256:"), imported.stdout

    pushed, push_s = engine.docker("push", ref, config=config, **env)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    digest = re.search(r"digest: (sha256:[0-9a-f]{64})", pushed.stdout)
    assert digest, pushed.stdout
    assert "Pushed" in pushed.stdout, f"no layer was sent:\n{pushed.stdout}"

    removed, _ = engine.docker("rmi", ref, config=config)
    assert removed.returncode == 0, removed.stderr
    assert engine.image_id(ref, config) is None, f"{ref} still there after docker rmi"

    pulled, pull_s = engine.docker("pull", ref, config=config, **env)
    assert pulled.returncode == 0, pulled.stdout + pulled.stderr
    assert f"Digest: {digest.group(1)}" in pulled.stdout, pulled.stdout
    assert "Pull complete" in pulled.stdout and "Already exists" not in pulled.stdout, pulled.stdout
    assert engine.image_id(ref, config) == image_id, "the pulled image is not the one pushed"
    return RoundTrip(image_id, push_s, pull_s)


def _seconds(size: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({size / seconds / MiB:.0f} MiB/s)"


def _report(label: str, trip: RoundTrip) -> None:
    REPORT[f"docker {label} push (20 MiB layer image)"] = _seconds(LAYER, trip.push_s)
    REPORT[f"docker {label} pull (20 MiB layer image)"] = _seconds(LAYER, trip.pull_s)


def _login(world: World, engine: DockerEngine, role: str, config: Path) -> None:
    token = world.ecr_client(role)  # what `aws ecr get-login-password` prints
    assert "error" not in token, token["error"]
    login, _ = engine.docker("login", "-u", token["user"], "--password-stdin", DKR,
                             config=config, input=token["password"])
    assert login.returncode == 0, login.stderr
    assert "Login Succeeded" in login.stdout, login.stdout


def _bytes_went_through(snap: observe.Snapshot) -> dict[str, tuple[int, int, int]]:
    per_route = observe.routed(snap, LINKS[ROLE][1], LISTENERS)
    assert per_route["ecr-dkr"][0] >= LAYER, ("the pushed layer went to the registry", per_route)
    assert per_route["ecr-s3"][1] >= LAYER, ("the pulled layer came from the bucket", per_route)
    return per_route


def _route_bytes(per_route: dict[str, tuple[int, int, int]]) -> str:
    return ", ".join(f"{route} {up}/{down} ({n})" for route, (up, down, n) in per_route.items())


def test_docker_password_flow_directly(world, engines, tmp_path):
    engine = engines("direct")
    _login(world, engine, "direct", tmp_path)
    trip = _push_rmi_pull(world, engine, "direct", tmp_path)
    PUSHED["direct"] = (f"{DKR}/e2e/docker-direct:v1", trip.image_id)
    _report("direct", trip)


def test_docker_password_flow_through_the_proxy(world, engines, start_proxy, tmp_path):
    engine = engines(ROLE)
    proxy = start_proxy("one-address")
    _login(world, engine, ROLE, tmp_path)
    auths = json.loads((tmp_path / "config.json").read_text())["auths"]
    assert DKR in auths, "docker login stored no password"
    trip = _push_rmi_pull(world, engine, "password", tmp_path)
    PUSHED[ROLE] = (f"{DKR}/e2e/docker-password:v1", trip.image_id)

    per_route = _bytes_went_through(observe.settled(proxy))
    assert per_route["ecr-api"][2] >= 1, "the token came through the proxy"
    _report("proxy (password)", trip)
    REPORT["docker proxy (password) bytes to_upstream/to_client (connections)"] = _route_bytes(per_route)


def test_docker_credential_helper_flow_through_the_proxy(world, engines, start_proxy, tmp_path):
    engine = engines(ROLE)
    proxy = start_proxy("one-address")
    config = tmp_path / "docker-config"
    config.mkdir()
    (config / "config.json").write_text(json.dumps({"credHelpers": {DKR: "ecr-login"}}))
    trip = _push_rmi_pull(world, engine, "helper", config,
                          AWS_CA_BUNDLE=str(world.ca_pem), **HELPER_AWS)
    stored = json.loads((config / "config.json").read_text())
    assert not stored.get("auths"), f"a password was stored: {stored}"

    per_route = _bytes_went_through(observe.settled(proxy))
    # push and pull each asked the helper, and the helper asked the ECR API
    assert per_route["ecr-api"][2] >= 2, per_route
    helper_logs = list((engine.root / "home").glob("cli-*/.ecr/log/ecr-login.log"))
    calls = sum(log.read_text().count("Calling ECR.GetAuthorizationToken") for log in helper_logs)
    assert calls >= 2, f"the helper logged {calls} token calls"
    _report("proxy (credential helper)", trip)
    REPORT["docker proxy (credential helper) bytes to_upstream/to_client (connections)"] = (
        _route_bytes(per_route))


@pytest.mark.parametrize("via", ["direct", "proxy"])
def test_podman_pulls_what_docker_pushed(world, start_proxy, tmp_path, via):
    role = "direct" if via == "direct" else ROLE
    if role not in PUSHED:
        pytest.fail(f"docker's password flow ({role}) pushed nothing for podman to pull",
                    pytrace=False)
    ref, image_id = PUSHED[role]
    proxy = start_proxy("one-address") if via == "proxy" else None
    pulled, seconds = podman.pull(world.ns[role], tmp_path / "podman", ref, world.cert_dir,
                                  f"AWS:{world.password}")
    assert pulled.returncode == 0, pulled.stderr
    assert f"sha256:{pulled.stdout.split()[-1]}" == image_id, (pulled.stdout, image_id)
    if proxy is not None:
        per_route = observe.routed(observe.settled(proxy), LINKS[ROLE][1], LISTENERS)
        assert per_route["ecr-s3"][1] >= LAYER, per_route
    REPORT[f"podman {via} pull (20 MiB layer image)"] = _seconds(LAYER, seconds)
