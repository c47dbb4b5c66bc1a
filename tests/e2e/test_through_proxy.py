"""The promise: boto3 and a registry client work unmodified through `sniproxy run` when the
builder's /etc/hosts points the ECR names at it.

Two topologies: three listen addresses, one per name (as the nginx seed setup did), and one
address for all three names. Clients sit in their own namespace; the proxy finds the
upstreams through the DNS server, and never holds a key.
"""

from __future__ import annotations

import pytest

from . import observe, oci_image
from .world import ACCOUNT, API, DKR, LINKS, NAMES, PROXY_BY_NAME, REPORT, S3, TOPOLOGIES, UPSTREAM_BY_NAME

pytestmark = pytest.mark.e2e

ROUTE = {API: "ecr-api", DKR: "ecr-dkr", S3: "ecr-s3"}
MiB = 1 << 20


def _expected_listener(topology: str, sni: str) -> str:
    _, listen = TOPOLOGIES[topology]
    return f"{PROXY_BY_NAME[sni] if len(listen) > 1 else listen[0]}:443"


@pytest.mark.parametrize("topology", list(TOPOLOGIES))
def test_token_push_and_pull_through_the_proxy(world, image, start_proxy, pull_dir, topology):
    role, _ = TOPOLOGIES[topology]
    proxy = start_proxy(topology)

    token = world.ecr_client(role)
    assert "error" not in token, token["error"]
    assert token["endpoint"] == f"https://{API}"  # boto3's own default, not an override
    assert token["registryId"] == ACCOUNT
    assert token["user"] == "AWS"

    ref = f"{DKR}/e2e/{topology}:{image.tag}"
    pushed, push_s = world.push(role, image, ref, password=token["password"])
    assert pushed.returncode == 0, pushed.stderr
    pulled, pull_s = world.pull(role, ref, pull_dir, image.tag, password=token["password"])
    assert pulled.returncode == 0, pulled.stderr
    assert oci_image.read(pull_dir, image.tag) == (image.manifest_digest, image.blobs)

    snap = observe.settled(proxy)
    client_ip = LINKS[role][1]
    for entry in snap.log:
        assert entry["sni"] in NAMES, entry
        assert entry["route"] == ROUTE[entry["sni"]], entry
        assert entry["listener"] == _expected_listener(topology, entry["sni"]), entry
        assert entry["client"].rsplit(":", 1)[0] == client_ip, entry
        assert entry["upstream"] == f"{UPSTREAM_BY_NAME[entry['sni']]}:443", entry
    assert {entry["sni"] for entry in snap.log} == set(NAMES)

    per_route = {}
    for route in ROUTE.values():
        up, down = snap.bytes(route)
        logged = [e for e in snap.log if e["route"] == route]
        assert len(logged) == snap.value("sniproxy_connections_total", route=route)
        assert (sum(e["bytes_to_upstream"] for e in logged),
                sum(e["bytes_to_client"] for e in logged)) == (up, down), route
        assert up > 0 and down > 0, (route, up, down)
        per_route[route] = (up, down, len(logged))
    layer = max(image.layer_sizes)
    assert per_route["ecr-dkr"][0] >= layer, "the pushed layer went to the registry"
    assert per_route["ecr-s3"][1] >= layer, "the pulled layer came from the starport bucket"
    assert snap.by_label("sniproxy_connections_rejected_total", "reason") == {}

    dns_log = (world.tmp / "logs" / "dns.log").read_text()
    for name in NAMES:
        assert "peer=127.0.0.1:" in dns_log and f"name={name} type=A" in dns_log, name

    size = sum(image.blobs.values())
    REPORT[f"proxy {topology} push (20 MiB layer image)"] = (
        f"{push_s:.2f} s ({size / push_s / MiB:.0f} MiB/s)")
    REPORT[f"proxy {topology} pull (20 MiB layer image)"] = (
        f"{pull_s:.2f} s ({size / pull_s / MiB:.0f} MiB/s)")
    REPORT[f"proxy {topology} bytes to_upstream/to_client (connections)"] = ", ".join(
        f"{route} {up}/{down} ({n})" for route, (up, down, n) in per_route.items())
