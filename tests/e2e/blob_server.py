"""The "starport layer bucket" of the end-to-end suite: a TLS static file server.

The registry's `redirect` storage middleware answers blob GETs with a 307 to
https://prod-<region>-starport-layer-bucket.s3.<region>.amazonaws.com/<storage path>, as ECR
does; this server serves the registry's storage root at that name, read-only.

    python blob_server.py --listen 10.0.0.3 --port 443 --root DIR --cert C --key K
"""

from __future__ import annotations

import argparse
import functools
import http.server
import signal
import ssl
import sys


class Handler(http.server.SimpleHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    timeout = 30

    def setup(self) -> None:
        # handshake here, on the connection's own thread, not in the accept loop
        self.request.settimeout(self.timeout)
        self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def translate_path(self, path: str) -> str:
        # the middleware may join its base URL and the storage path with "//"
        while "//" in path:
            path = path.replace("//", "/")
        return super().translate_path(path)

    def list_directory(self, path):  # a bucket does not list itself here
        self.send_error(404)
        return None

    def log_message(self, format: str, *args) -> None:
        print(f"{self.client_address[0]} {format % args}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--listen", required=True)
    parser.add_argument("--port", type=int, default=443)
    parser.add_argument("--root", required=True)
    parser.add_argument("--cert", required=True)
    parser.add_argument("--key", required=True)
    args = parser.parse_args(argv)

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(args.cert, args.key)
    http.server.ThreadingHTTPServer.allow_reuse_address = True
    server = http.server.ThreadingHTTPServer(
        (args.listen, args.port), functools.partial(Handler, directory=args.root))
    server.daemon_threads = True
    server.tls = context
    print(f"ready on {args.listen}:{args.port} serving {args.root}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    sys.exit(main())
