"""A real post-quantum ClientHello through `sniproxy run`, whole and cut into segments.

curl_cffi (curl-impersonate on BoringSSL) sends Chrome's hello: an X25519MLKEM768 key share,
ECH GREASE and GREASE values, about 2 KB. It fetches https://<dkr host>/v2/ through the proxy
with the certificate verified against the test CA, from two namespaces:

- normal: cli1, a veth as the other tests use it (offloads on: the hello crosses as one
  buffer);
- segmented: slow, whose link has a 576-byte MTU, no offloads and a 1 Mbit/s token bucket
  (World.segment_link), so the hello arrives as several segments milliseconds apart, as
  Go 1.24's did at the middleboxes of moby#50035.

A packet capture on the proxy's side of each link (capture.py) is the suite's own record of
what arrived: size, records, segments and their spacing, key-share groups. The proxy's access
log must then say the same about the hello it reassembled (hello_bytes, hello_records,
hello_reads, and pq: the name of the post-quantum group offered, ech: ECH or its GREASE).
"""

from __future__ import annotations

import json
import sys

import pytest

from . import observe, procs
from .capture import EXT_ECH, X25519MLKEM768, Capture, Hello, is_grease
from .world import DKR, HERE, LINKS, NAMES, PROXY_ONE, REPORT, World

pytestmark = pytest.mark.e2e
NEEDS = ("pq",)

PATHS = {"normal": "cli1", "segmented": "slow"}  # path -> client namespace
SLOW_MTU, SLOW_RATE = 576, "1mbit"
URL = f"https://{DKR}/v2/"
HELLO_FIELDS = ("hello_bytes", "hello_records", "hello_reads", "pq", "ech")


@pytest.fixture(scope="module")
def fetched(world: World):
    """Fetch once per path through one proxy, capturing each hello; return
    ({path: (client's JSON, captured Hello)}, the proxy's settled snapshot)."""
    world.segment_link(PATHS["segmented"], SLOW_MTU, SLOW_RATE)
    proxy = world.start_proxy("sniproxy-post-quantum", [PROXY_ONE], metrics_port=9480)
    results: dict[str, tuple[dict, Hello]] = {}
    try:
        for path, role in PATHS.items():
            with Capture(world.ns["srv"], f"to-{role}") as capture:
                run = procs.run(world.ns[role], [sys.executable, str(HERE / "pq_client.py"),
                                                 "--url", URL, "--ca", str(world.ca_pem)],
                                world.env(f"curl_cffi-{role}"), timeout=60)
            try:
                seen = json.loads(run.stdout.strip().splitlines()[-1])
            except (ValueError, IndexError):
                raise AssertionError(f"pq_client in {role} printed no JSON (rc {run.returncode}):"
                                     f"\n{run.stdout}\n{run.stderr[-3000:]}") from None
            results[path] = (seen, capture.client_hello(LINKS[role][1], (PROXY_ONE, 443)))
        snap = observe.settled(proxy)
    finally:
        rc = proxy.service.stop(timeout=15)
    assert rc == 0, f"sniproxy exited {rc} on SIGTERM:\n{procs.tail(proxy.service.log)}"
    seen, _ = results["normal"]
    REPORT["post-quantum client"] = (f"curl_cffi {seen['curl_cffi']}, impersonating "
                                     f"{seen['impersonate']}: {seen['libcurl']}")
    REPORT["post-quantum hello (bytes, records, segments over ms)"] = "; ".join(
        f"{path} {hello.size} B, {hello.records} record(s), {hello.segments} segment(s) over "
        f"{hello.spread_ms:.1f} ms" for path, (_, hello) in results.items())
    return results, snap


def _log_entry(snap: observe.Snapshot, path: str) -> dict:
    client = LINKS[PATHS[path]][1]
    entries = [e for e in snap.log if e["client"].rsplit(":", 1)[0] == client]
    assert len(entries) == 1, f"{path}: expected one connection from {client}: {entries}"
    return entries[0]


@pytest.mark.parametrize("path", list(PATHS))
def test_chrome_fetches_through_the_proxy_with_a_post_quantum_hello(fetched, path):
    results, snap = fetched
    seen, hello = results[path]
    assert "error" not in seen, seen["error"]
    # The registry's own answer, over a verified connection: its 401 and API header.
    assert (seen["status"], seen["api_version"]) == (401, "registry/2.0"), seen
    assert hello.sni == DKR
    assert X25519MLKEM768 in hello.groups, [hex(g) for g in hello.groups]
    assert EXT_ECH in hello.extensions, "no ECH GREASE extension"
    assert any(map(is_grease, hello.extensions)), "no GREASE extension"
    assert 1700 <= hello.size <= 2300, hello.size

    entry = _log_entry(snap, path)
    assert (entry["sni"], entry["route"]) == (DKR, "ecr-dkr"), entry
    # curl closes with a reset when bytes it never read are still queued (a late HTTP/2
    # frame or session ticket): the proxy passes that on, as it should
    assert entry["close"] in ("done", "client_reset"), entry
    assert entry["bytes_to_upstream"] > hello.size, entry
    assert {e["sni"] for e in snap.log} <= set(NAMES)


def test_the_segmented_path_delivers_the_hello_in_pieces(fetched):
    """The world, not the proxy: only the slow link cuts the hello, and spaces the pieces."""
    results, _ = fetched
    _, whole = results["normal"]
    _, cut = results["segmented"]
    assert whole.segments == 1, f"the normal path split the hello: {whole}"
    assert cut.segments >= 3, f"the slow link did not cut the hello: {cut}"
    gaps = [b - a for a, b in zip(cut.arrivals, cut.arrivals[1:])]
    assert min(gaps) >= 0.001, f"segments arrived {gaps} s apart, not milliseconds"


@pytest.mark.parametrize("path", list(PATHS))
def test_the_access_log_shows_the_hello_the_proxy_reassembled(fetched, path):
    """Needs the proxy change that logs these fields per connection (see HELLO_FIELDS)."""
    results, snap = fetched
    _, hello = results[path]
    entry = _log_entry(snap, path)
    missing = [name for name in HELLO_FIELDS if name not in entry]
    assert not missing, f"the access log has no {missing} yet: {entry}"
    assert entry["hello_bytes"] == hello.size >= 1700, (entry, hello)
    assert entry["hello_records"] == hello.records, (entry, hello)
    assert entry["pq"] == "X25519MLKEM768" and X25519MLKEM768 in hello.groups, entry
    assert entry["ech"] is True, entry
    if path == "segmented":
        assert 2 <= entry["hello_reads"] <= hello.segments, (entry, hello)
    else:
        assert entry["hello_reads"] == 1, (entry, hello)
