"""A browser-shaped TLS client: curl_cffi (curl-impersonate, BoringSSL) hello as Chrome's.

Chrome's hello today carries an X25519MLKEM768 key share (about 1.2 KB on its own), ECH
GREASE and GREASE values, so it is some 1.8-2 KB: more than one TCP segment on most paths.
Run inside a client namespace; the URL's name resolves through that namespace's /etc/hosts
and the certificate is verified against the CA given, as curl does by default.

    python pq_client.py --url https://HOST/v2/ --ca ca.pem [--impersonate chrome]

Prints one JSON object: the HTTP status, protocol version, a response header that only the
real upstream sends, and the library and impersonation target used. Exits 1 with a
one-line error when the request fails.
"""

from __future__ import annotations

import argparse
import json
import sys

import curl_cffi
from curl_cffi import requests
from curl_cffi.curl import Curl

# libcurl's CURL_HTTP_VERSION_* values, as CURLINFO_HTTP_VERSION reports them
HTTP_VERSIONS = {1: "1.0", 2: "1.1", 3: "2", 30: "3"}


def resolved_target(name: str) -> str:
    """The browser version an alias such as "chrome" stands for in this curl_cffi."""
    try:
        from curl_cffi.requests.impersonate import resolve_latest_browser_type
    except ImportError:  # not a public API: report the alias as given
        return name
    return resolve_latest_browser_type(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--url", required=True)
    parser.add_argument("--ca", required=True)
    parser.add_argument("--impersonate", default="chrome")
    args = parser.parse_args(argv)

    versions = {"curl_cffi": curl_cffi.__version__, "libcurl": Curl().version().decode(),
                "impersonate": resolved_target(args.impersonate)}
    try:
        response = requests.get(args.url, impersonate=args.impersonate, verify=args.ca,
                                timeout=15, allow_redirects=False)
    except Exception as exc:  # curl_cffi raises its own tree plus OSError; report either
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}", **versions}))
        return 1
    print(json.dumps({
        "status": response.status_code,
        "http_version": HTTP_VERSIONS.get(int(response.http_version), str(response.http_version)),
        "api_version": response.headers.get("Docker-Distribution-Api-Version"),
        **versions,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
