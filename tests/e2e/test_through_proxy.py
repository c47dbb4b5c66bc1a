"""The promise: boto3 and a registry client work unmodified through `sniproxy run` when the
builder's /etc/hosts points the ECR names at it.

Two topologies: three listen addresses, one per name (as the nginx seed setup did), and one
address for all three names. Clients sit in their own namespace; the proxy finds the
upstreams through the DNS server, and never holds a key.
"""

from __future__ import annotations

import pytest

from . import observe, oci_image
from .world import ACCOUNT, API, DKR, LINKS, NAMES, PROXY_BY_NAME, REPORT, TOPOLOGIES

pytestmark = pytest.mark.e2e

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
    per_route = observe.routed(snap, LINKS[role][1],
                               {name: _expected_listener(topology, name) for name in NAMES})
    assert {entry["sni"] for entry in snap.log} == set(NAMES)
    for route, (up, down, _) in per_route.items():
        assert up > 0 and down > 0, (route, up, down)
    layer = max(image.layer_sizes)
    assert per_route["ecr-dkr"][0] >= layer, "the pushed layer went to the registry"
    assert per_route["ecr-s3"][1] >= layer, "the pulled layer came from the starport bucket"

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
