"""What a VPC with no internet gives an instance, stood in for by servers on namespace
addresses: the instance metadata service (IMDSv2), and behind one TLS listener the S3 gateway
endpoint (GetObject of the bundle), the CloudFormation interface endpoint (SignalResource) and
the ECR interface endpoints (TLS handshakes, for doctor). Plus a recorder for the "internet":
every packet that reaches it is an escape, with its destination.

Each server records what it was asked, so the rehearsal can check who asked for what, with
which credentials. Sockets are made by `bind` on a thread inside the namespace (netns.Namespace
.call), then served from ordinary threads.
"""

from __future__ import annotations

import dataclasses
import http.server
import json
import re
import socket
import ssl
import struct
import threading
import urllib.parse
from pathlib import Path

IMDS_TOKEN = "AQAEAKh0cmVoZWFyc2FsLXRva2VuLWZvci1pbWRzdjI="
ROLE = "sniproxy-InstanceRole-1A2B3C4D5E6F"
CREDENTIALS = {
    "Code": "Success", "Type": "AWS-HMAC", "LastUpdated": "2026-01-01T00:00:00Z",
    "AccessKeyId": "ASIAREHEARSAL0000001", "SecretAccessKey": "rehearsal/secret/access/key/0000000000000",
    "Token": "IQoJb3JpZ2luX2VjEHJlaGVhcnNhbC1zZXNzaW9uLXRva2Vu", "Expiration": "2099-01-01T00:00:00Z",
}
_CREDENTIAL_SCOPE = re.compile(r"Credential=([^/]+)/\d{8}/([a-z0-9-]+)/([a-z0-9]+)/aws4_request")


@dataclasses.dataclass(frozen=True)
class Instance:
    instance_id: str
    region: str
    vpc_id: str
    subnet_id: str
    vpc_cidr: str
    private_ip: str
    mac: str = "0e:5a:1d:00:00:57"

    def metadata(self) -> dict[str, str]:
        base = f"network/interfaces/macs/{self.mac}/"
        return {
            "instance-id": self.instance_id, "placement/region": self.region, "mac": self.mac,
            "local-ipv4": self.private_ip, "network/interfaces/macs/": f"{self.mac}/",
            base + "vpc-id": self.vpc_id, base + "subnet-id": self.subnet_id,
            base + "vpc-ipv4-cidr-block": self.vpc_cidr, base + "local-ipv4s": self.private_ip,
            "iam/security-credentials/": ROLE, f"iam/security-credentials/{ROLE}": json.dumps(CREDENTIALS),
        }


class _Quiet(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:  # the records below say what matters
        pass

    def reply(self, status: int, body: bytes, content_type: str = "text/plain", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name.replace("_", "-"), value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)


class ImdsHandler(_Quiet):
    """IMDSv2 only: a GET without the token from PUT /latest/api/token gets 401, as on an
    instance whose launch template sets HttpTokens: required."""

    def do_PUT(self) -> None:
        self.server.calls.append(("PUT", self.path, True))
        if self.path != "/latest/api/token" or "X-aws-ec2-metadata-token-ttl-seconds" not in self.headers:
            self.reply(400, b"")
            return
        self.reply(200, IMDS_TOKEN.encode())

    def do_GET(self) -> None:
        authorised = self.headers.get("X-aws-ec2-metadata-token") == IMDS_TOKEN
        self.server.calls.append(("GET", self.path, authorised))
        if not authorised:
            self.reply(401, b"")
            return
        value = self.server.data.get(self.path.removeprefix("/latest/meta-data/"))
        if value is None:
            self.reply(404, b"")
        else:
            self.reply(200, value.encode())


@dataclasses.dataclass
class AwsCall:
    service: str
    """"s3", "cloudformation" or "other"."""
    method: str
    host: str
    path: str
    access_key: str | None
    signing: tuple[str, str] | None
    """(region, service) of the SigV4 credential scope."""
    session_token: str | None
    params: dict[str, str]


class AwsHandler(_Quiet):
    """The endpoints' HTTPS side: S3 answers GetObject for the one bundle object (403 for
    anything else, as the bucket policy of a private bucket would), CloudFormation answers
    SignalResource (or refuses it, as outside a stack operation)."""

    def _record(self, params: dict[str, str]) -> AwsCall:
        host = self.headers.get("Host", "").split(":")[0]
        auth = self.headers.get("Authorization", "")
        scope = _CREDENTIAL_SCOPE.search(auth)
        service = "s3" if ".s3." in f".{host}" else "cloudformation" if host.startswith("cloudformation.") else "other"
        call = AwsCall(service, self.command, host, self.path, scope.group(1) if scope else None,
                       (scope.group(2), scope.group(3)) if scope else None,
                       self.headers.get("X-Amz-Security-Token"), params)
        self.server.calls.append(call)
        return call

    def do_GET(self) -> None:
        call = self._record({})
        bucket, key = self.server.bundle_location
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        wanted = (call.service == "s3" and
                  ((call.host.startswith(f"{bucket}.s3.") and path == f"/{key}") or path == f"/{bucket}/{key}"))
        if not wanted or self.server.s3_refuses:
            body = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>"
            self.reply(403, body, "application/xml")
            return
        body = self.server.bundle.read_bytes()
        self.reply(200, body, "application/x-gzip", ETag='"0123456789abcdef0123456789abcdef"',
                   Last_Modified="Thu, 01 Jan 2026 00:00:00 GMT", Accept_Ranges="bytes")

    do_HEAD = do_GET

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        params = dict(urllib.parse.parse_qsl(self.rfile.read(length).decode()))
        call = self._record(params)
        namespace = "http://cloudformation.amazonaws.com/doc/2010-05-15/"
        if call.service != "cloudformation" or params.get("Action") != "SignalResource":
            self.reply(400, b"<ErrorResponse><Error><Code>InvalidAction</Code></Error></ErrorResponse>", "text/xml")
            return
        if not self.server.signal_accepted:
            body = (f'<ErrorResponse xmlns="{namespace}"><Error><Type>Sender</Type><Code>ValidationError</Code>'
                    "<Message>Resource AutoScalingGroup is in CREATE_COMPLETE state and can not be signaled"
                    "</Message></Error><RequestId>5ccc7dcd-744c-11e5-be70-000000000001</RequestId></ErrorResponse>")
            self.reply(400, body.encode(), "text/xml")
            return
        body = (f'<SignalResourceResponse xmlns="{namespace}"><ResponseMetadata>'
                "<RequestId>5ccc7dcd-744c-11e5-be70-000000000000</RequestId>"
                "</ResponseMetadata></SignalResourceResponse>")
        self.reply(200, body.encode(), "text/xml")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


def imds(data: dict[str, str], address: str = "169.254.169.254") -> _Server:
    """Call on a thread inside the namespace; serve with `serve`."""
    server = _Server((address, 80), ImdsHandler)
    server.data = data
    server.calls = []
    return server


def aws(context: ssl.SSLContext, bundle: Path, bundle_uri: str) -> _Server:
    """Every endpoint address of the namespace, port 443 (call inside it)."""
    server = _Server(("0.0.0.0", 443), AwsHandler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    location = bundle_uri.removeprefix("s3://")
    server.bundle_location = tuple(location.split("/", 1))
    server.bundle = bundle
    server.calls = []
    server.s3_refuses = False
    server.signal_accepted = True
    return server


def serve(server: _Server) -> threading.Thread:
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
    thread.start()
    return thread


class Recorder:
    """Every IPv4/IPv6 packet arriving on `interface`: in the "internet" namespace, each one is
    an attempt to leave the VPC. Make it on a thread inside that namespace."""

    def __init__(self, interface: str) -> None:
        self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(0x0003))
        self.sock.bind((interface, 0))
        self.sock.settimeout(0.2)
        self.packets: list[tuple[str, int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                frame = self.sock.recv(65535)
            except TimeoutError:
                continue
            except OSError:
                return
            ethertype = struct.unpack("!H", frame[12:14])[0]
            if ethertype == 0x0800:
                header = frame[14:]
                ihl = (header[0] & 0x0F) * 4
                protocol = header[9]
                port = struct.unpack("!H", header[ihl + 2:ihl + 4])[0] if protocol in (6, 17) else 0
                self.packets.append((socket.inet_ntoa(header[16:20]), protocol, port))
            elif ethertype == 0x86DD:
                header = frame[14:]
                self.packets.append((socket.inet_ntop(socket.AF_INET6, header[24:40]), header[6], 0))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()
