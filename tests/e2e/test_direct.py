"""The harness without the proxy: clients in the "direct" namespace talk to the upstreams.

This proves the world is sound (ECR-like auth, 307 to the starport name, byte-identical
round trip), so a failure in the proxy tests is the proxy's, and gives the baseline timings.
"""

from __future__ import annotations

import base64
import json
import urllib.parse

import pytest

from . import oci_image
from .world import ACCOUNT, DKR, OTHER_API, OTHER_DKR, REPORT, S3, UPSTREAM_BY_NAME

pytestmark = pytest.mark.e2e


def _mib_per_s(size: int, seconds: float) -> str:
    return f"{seconds:.2f} s ({size / seconds / (1 << 20):.0f} MiB/s)"


def test_boto3_gets_a_token_directly(world):
    token = world.ecr_client("direct")
    assert token["endpoint"] == "https://api.ecr.us-east-1.amazonaws.com"
    assert token["registryId"] == ACCOUNT
    assert token["proxyEndpoint"] == f"https://{DKR}"
    assert (token["user"], token["password"]) == ("AWS", world.password)


def test_push_and_pull_directly(world, image, pull_dir):
    ref = f"{DKR}/e2e/direct:{image.tag}"
    pushed, push_s = world.push("direct", image, ref)
    assert pushed.returncode == 0, pushed.stderr
    pulled, pull_s = world.pull("direct", ref, pull_dir, image.tag)
    assert pulled.returncode == 0, pulled.stderr
    assert oci_image.read(pull_dir, image.tag) == (image.manifest_digest, image.blobs)
    size = sum(image.blobs.values())
    REPORT["direct push (20 MiB layer image)"] = _mib_per_s(size, push_s)
    REPORT["direct pull (20 MiB layer image)"] = _mib_per_s(size, pull_s)


def test_blob_get_redirects_to_the_starport_name(world, image):
    """ECR answers a layer GET with a 307 to its S3 bucket; our registry must as well."""
    ref = f"{DKR}/e2e/redirect:{image.tag}"
    pushed, _ = world.push("direct", image, ref)
    assert pushed.returncode == 0, pushed.stderr
    digest = max(image.blobs, key=image.blobs.get)
    basic = base64.b64encode(f"AWS:{world.password}".encode()).decode()
    request = (f"GET /v2/e2e/redirect/blobs/{digest} HTTP/1.1\r\nHost: {DKR}\r\n"
               f"Authorization: Basic {basic}\r\nConnection: close\r\n\r\n").encode()
    seen = world.tls_client("direct", UPSTREAM_BY_NAME[DKR], DKR, request=request)
    assert seen["ok"], seen["error"]
    head = seen["reply"].split(b"\r\n\r\n", 1)[0].decode()
    status = head.split("\r\n")[0]
    headers = dict(line.split(": ", 1) for line in head.split("\r\n")[1:])
    assert status.split()[1] == "307", head
    location = urllib.parse.urlsplit(headers["Location"])
    assert (location.scheme, location.hostname, location.port) == ("https", S3, None), head


def test_other_account_and_region_work_directly(world, small_image):
    """Controls for the refusal tests: the upstreams accept these names, so through the
    proxy only its routes can be what refuses them."""
    pushed, _ = world.push("direct", small_image, f"{OTHER_DKR}/e2e/other:{small_image.tag}")
    assert pushed.returncode == 0, pushed.stderr
    token = world.ecr_client("direct", region="us-west-2")
    assert token.get("endpoint") == f"https://{OTHER_API}", json.dumps(token)
