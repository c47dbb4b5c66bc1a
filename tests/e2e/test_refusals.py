"""What the proxy must refuse, and what it cannot do: terminate TLS.

The upstreams' certificates also cover the other account and the other region, and
test_direct shows both work without the proxy: a refusal here can only be the proxy's.
"""

from __future__ import annotations

import ssl

import pytest

from . import observe
from .world import API, DKR, NAMES, OTHER_API, OTHER_DKR, OTHER_REGION, PROXY_BY_NAME, S3

pytestmark = pytest.mark.e2e

ROLE_OF = {API: "api", DKR: "dkr", S3: "s3"}


def test_a_name_outside_the_routes_is_refused(world, start_proxy):
    proxy = start_proxy("three-addresses")
    token = world.ecr_client("cli3", region=OTHER_REGION)
    assert "error" in token, f"boto3 reached {OTHER_API} through the proxy: {token}"
    stray = world.tls_client("cli3", PROXY_BY_NAME[API], "registry.example.org")
    assert not stray["ok"]
    # the proxy's unrecognized_name alert, not a reset or a certificate error
    assert "UNRECOGNIZED_NAME" in stray["error"], stray["error"]

    snap = observe.settled(proxy)
    seen = {(e["sni"], e["route"], e["upstream"], e["close"]) for e in snap.log}
    assert seen == {(OTHER_API, None, None, "no_route"),
                    ("registry.example.org", None, None, "no_route")}, snap.log
    assert snap.value("sniproxy_connections_rejected_total", reason="no_route") == len(snap.log)
    assert sum(snap.by_label("sniproxy_connections_total", "route").values()) == 0


def test_a_push_to_an_account_not_in_accounts_fails(world, small_image, start_proxy):
    proxy = start_proxy("three-addresses")
    repo = "e2e/other-account-via-proxy"
    pushed, _ = world.push("cli3", small_image, f"{OTHER_DKR}/{repo}:{small_image.tag}")
    assert pushed.returncode != 0, "a push to an account outside [ecr] accounts went through"

    snap = observe.settled(proxy)
    assert snap.log, "skopeo never reached the proxy"
    for entry in snap.log:
        assert (entry["sni"], entry["route"], entry["close"]) == (OTHER_DKR, None, "no_route")
    assert repo not in (world.tmp / "logs" / "registry.log").read_text()


def test_a_client_without_the_test_ca_fails_verification(world, small_image, start_proxy):
    """The client meets the upstream's own certificate: the proxy holds no key and
    terminates nothing, so a client that does not trust the CA cannot get through."""
    proxy = start_proxy("three-addresses")
    pushed, _ = world.push("cli3", small_image, f"{DKR}/e2e/no-ca:{small_image.tag}", ca=False)
    assert pushed.returncode != 0
    assert "x509: certificate signed by unknown authority" in pushed.stderr, pushed.stderr
    token = world.ecr_client("cli3", ca=False)
    assert "CERTIFICATE_VERIFY_FAILED" in token.get("error", ""), token

    certs = world.tmp / "certs"
    for name in NAMES:
        seen = world.tls_client("cli3", PROXY_BY_NAME[name], name)
        assert seen["ok"], (name, seen["error"])
        upstream = ssl.PEM_cert_to_DER_cert((certs / f"{ROLE_OF[name]}.crt").read_text())
        assert seen["cert_der"] == upstream, f"{name}: the client saw another certificate"

    snap = observe.settled(proxy)
    # Every connection, the failing ones included, was routed and its handshake answered
    # by the upstream: the verification failed at the client, end to end.
    assert snap.by_label("sniproxy_connections_rejected_total", "reason") == {}
    for entry in snap.log:
        assert entry["route"] is not None and entry["bytes_to_client"] > 0, entry
    assert {e["sni"] for e in snap.log} == {API, DKR, S3}
