"""The end-to-end world: namespaces, certificates, upstream servers, clients and proxies.

Topology (every address lives only inside namespaces this run creates)::

    cli3 ──veth── ┐                       srv (lo): proxy listeners 198.18.1.1-3 (one per name)
    cli1 ──veth── ┤                                  proxy listener  198.18.1.10 (all names)
    slow ──veth── ┼── srv                            moto ECR API    198.18.2.1:443
    direct ─veth─ ┘                                  registry (dkr)  198.18.2.2:443
                                                     starport blobs  198.18.2.3:443
                                                     DNS             127.0.0.1:53

Each client namespace has its own /etc/hosts: cli3 pins each ECR name to its own proxy
address, cli1 and slow get what `sniproxy hosts` prints for the single-address proxy, direct
pins the names to the upstreams. slow's link can be made to cut a hello into small segments
that arrive milliseconds apart (segment_link).
The proxy must resolve upstreams through the DNS server: srv's /etc/hosts is a decoy.
"""

from __future__ import annotations

import http.client
import json
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import netns, oci_image, procs
from .netns import Namespace

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]

REGION = "us-east-1"
ACCOUNT = "123456789012"
OTHER_ACCOUNT = "999999999999"
API = f"api.ecr.{REGION}.amazonaws.com"
DKR = f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
S3 = f"prod-{REGION}-starport-layer-bucket.s3.{REGION}.amazonaws.com"
OTHER_DKR = f"{OTHER_ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com"
OTHER_REGION = "us-west-2"
OTHER_API = f"api.ecr.{OTHER_REGION}.amazonaws.com"
NAMES = (API, DKR, S3)

PROXY_BY_NAME = {API: "198.18.1.1", DKR: "198.18.1.2", S3: "198.18.1.3"}
PROXY_ONE = "198.18.1.10"
UPSTREAM_BY_NAME = {API: "198.18.2.1", DKR: "198.18.2.2", S3: "198.18.2.3"}
DNS_ADDR, DNS_PORT = "127.0.0.1", 53
DECOY = "198.18.9.9"  # routed nowhere
# client namespace -> (srv end, client end) of its veth
LINKS = {"cli3": ("198.19.3.1", "198.19.3.2"), "cli1": ("198.19.1.1", "198.19.1.2"),
         "slow": ("198.19.5.1", "198.19.5.2"), "direct": ("198.19.0.1", "198.19.0.2")}
SERVICE_NET = "198.18.0.0/16"

# topology -> (client namespace, proxy listen addresses)
TOPOLOGIES = {
    "three-addresses": ("cli3", list(PROXY_BY_NAME.values())),
    "one-address": ("cli1", [PROXY_ONE]),
}

PROC_TIMEOUT = 60.0
# The proxy's data path, as the integration suite takes it: auto (the default), on or off.
SPLICE = os.environ.get("SNIPROXY_TEST_SPLICE", "auto")
ETHTOOL = "/usr/sbin/ethtool"
REPORT: dict[str, object] = {}  # printed by conftest at the end of the session


def _hosts(pins: dict[str, str]) -> str:
    lines = ["127.0.0.1 localhost"] + [f"{addr} {name}" for name, addr in pins.items()]
    return "\n".join(lines) + "\n"


def listening(path: str = "/proc/thread-self/net/tcp") -> set[tuple[str, int]]:
    """TCP sockets in LISTEN state in the calling thread's namespace, read from /proc.

    Readiness is checked this way rather than by connecting, so no probe connection
    shows up in the proxy's access log or an upstream's error log.
    """
    found = set()
    with open(path) as table:
        next(table)
        for row in table:
            fields = row.split()
            if fields[3] != "0A":
                continue
            hex_addr, hex_port = fields[1].split(":")
            addr = socket.inet_ntoa(int(hex_addr, 16).to_bytes(4, "little"))
            found.add((addr, int(hex_port, 16)))
    return found


def _http_get(host: str, port: int, path: str) -> tuple[int, str]:
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    finally:
        conn.close()


@dataclass
class Proxy:
    service: procs.Service
    ns: Namespace
    metrics_port: int
    config: Path

    def metrics_text(self) -> str:
        status, body = self.ns.call(_http_get, "127.0.0.1", self.metrics_port, "/metrics")
        assert status == 200, f"/metrics answered {status}"
        return body

    def access_log(self) -> list[dict]:
        entries = []
        for line in self.service.log.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict) and "sni" in entry:
                entries.append(entry)
        return entries


@dataclass
class World:
    tmp: Path
    ns: dict[str, Namespace] = field(default_factory=dict)
    services: list[procs.Service] = field(default_factory=list)
    ca_pem: Path | None = None
    cert_dir: Path | None = None  # holds only ca.crt, for skopeo's --*-cert-dir
    password: str = ""
    registry_root: Path | None = None
    _counter: int = 0

    # ---- building -------------------------------------------------------------------

    def build(self) -> None:
        REPORT["logs"] = str(self.tmp / "logs")
        netns.clean_stale()
        self._certificates()
        self._namespaces()
        self._start_upstreams()

    def _certificates(self) -> None:
        import trustme

        ca = trustme.CA(organization_name="sniproxy e2e")
        certs = self.tmp / "certs"
        certs.mkdir()
        self.ca_pem = certs / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_pem))
        self.cert_dir = self.tmp / "cert-dir"
        self.cert_dir.mkdir()
        shutil.copy(self.ca_pem, self.cert_dir / "ca.crt")
        # The other account and region are in the upstream certs so that, directly, they
        # work: through the proxy only the proxy's routes can refuse them.
        for role, names in {"api": [API, OTHER_API], "dkr": [DKR, OTHER_DKR],
                            "s3": [S3]}.items():
            leaf = ca.issue_cert(*names)
            leaf.cert_chain_pems[0].write_to_path(str(certs / f"{role}.crt"))
            leaf.private_key_pem.write_to_path(str(certs / f"{role}.key"))

    def _namespaces(self) -> None:
        for role in ("srv", *LINKS):
            ns = Namespace(role)
            self.ns[role] = ns
            ns.create()
        srv = self.ns["srv"]
        for addr in [*PROXY_BY_NAME.values(), PROXY_ONE, *UPSTREAM_BY_NAME.values()]:
            srv.run_ip("addr", "add", f"{addr}/32", "dev", "lo")
        for role, (srv_end, cli_end) in LINKS.items():
            netns.link(srv, srv_end, self.ns[role], cli_end)
            self.ns[role].run_ip("route", "add", SERVICE_NET, "via", srv_end)
        # A decoy: were the proxy to read /etc/hosts, it would find the ECR names pinned to
        # an address nobody serves, and every connection would fail.
        self.ns["srv"].write_etc("hosts", _hosts({name: DECOY for name in NAMES}))
        self.ns["cli3"].write_etc("hosts", _hosts({
            **PROXY_BY_NAME, OTHER_DKR: PROXY_BY_NAME[DKR], OTHER_API: PROXY_BY_NAME[API]}))
        one_address = "127.0.0.1 localhost\n" + self._sniproxy_hosts()
        self.ns["cli1"].write_etc("hosts", one_address)
        self.ns["slow"].write_etc("hosts", one_address)
        self.ns["direct"].write_etc("hosts", _hosts({
            **UPSTREAM_BY_NAME, OTHER_DKR: UPSTREAM_BY_NAME[DKR],
            OTHER_API: UPSTREAM_BY_NAME[API]}))

    def add_client(self, role: str, link: tuple[str, str], proxy: str) -> Namespace:
        """One more builders' namespace, joined to srv like the others (link: the srv end and
        its own), whose /etc/hosts pins the ECR names to `proxy`, a new address on srv's lo.
        It goes with the world."""
        ns = Namespace(role)
        self.ns[role] = ns
        ns.create()
        self.ns["srv"].run_ip("addr", "add", f"{proxy}/32", "dev", "lo")
        netns.link(self.ns["srv"], link[0], ns, link[1])
        ns.run_ip("route", "add", SERVICE_NET, "via", link[0])
        ns.write_etc("hosts", _hosts({name: proxy for name in NAMES}))
        return ns

    def _sniproxy_hosts(self) -> str:
        """The single-address builders' /etc/hosts, as `sniproxy hosts` prints it."""
        result = subprocess.run(
            [sys.executable, "-m", "sniproxy", "hosts", "--region", REGION, "--account", ACCOUNT,
             "--address", PROXY_ONE],
            env=self.env("sniproxy-hosts", PYTHONPATH=str(REPO)), capture_output=True,
            text=True, timeout=PROC_TIMEOUT)
        assert result.returncode == 0, f"sniproxy hosts failed: {result.stderr}"
        pinned = {tuple(line.split()[:2]) for line in result.stdout.splitlines()
                  if line.strip() and not line.startswith("#")}
        missing = {(PROXY_ONE, name) for name in NAMES} - pinned
        assert not missing, f"sniproxy hosts does not pin {missing}:\n{result.stdout}"
        return result.stdout

    def segment_link(self, role: str, mtu: int, rate: str) -> None:
        """Make `role`'s link carry a client's writes as MTU-sized segments spaced in time.

        Both veth ends get the MTU, and lose the offloads that would otherwise hand the
        peer one large buffer (TSO/GSO on send, GRO on receive). A token bucket on the
        client's end then lets one segment through at a time at `rate`: at 1 Mbit/s a
        576-byte packet takes about 4.7 ms, so a 2 KB hello arrives as four segments
        over some 12 ms, as it might over a slow VPN.
        """
        ends = ((self.ns["srv"], f"to-{role}"[:15]), (self.ns[role], "to-srv"))
        for ns, ifname in ends:
            ns.run_ip("link", "set", ifname, "mtu", str(mtu))
            subprocess.run(ns.exec_argv([ETHTOOL, "-K", ifname, "tso", "off", "gso", "off",
                                         "gro", "off"]), check=True, capture_output=True,
                           timeout=PROC_TIMEOUT)
        # a bucket that holds one full frame but not two
        netns.tc(self.ns[role], "qdisc", "add", "dev", "to-srv", "root", "tbf", "rate", rate,
                 "burst", str(mtu * 3 // 2), "latency", "200ms")

    def env(self, name: str, **extra: str) -> dict[str, str]:
        return procs.clean_env(self.tmp / "home" / name, **extra)

    def _start(self, name: str, argv: list[str], env: dict[str, str],
               split_stdout: bool = False) -> procs.Service:
        logs = self.tmp / "logs"
        service = procs.start(self.ns["srv"], name, argv, env, logs / f"{name}.log",
                              stdout=logs / f"{name}.stdout" if split_stdout else None)
        self.services.append(service)
        return service

    def wait_listening(self, service: procs.Service, *endpoints: tuple[str, int],
                       timeout: float = 20.0) -> None:
        wanted = set(endpoints)
        procs.wait_until(
            lambda: service.check_alive() or wanted <= self.ns["srv"].call(listening),
            timeout, f"{service.name} to listen on {sorted(wanted)}")

    def _start_upstreams(self) -> None:
        certs = self.tmp / "certs"
        records = [f"{name}={addr}" for name, addr in UPSTREAM_BY_NAME.items()]
        records += [f"*.dkr.ecr.{REGION}.amazonaws.com={UPSTREAM_BY_NAME[DKR]}",
                    f"{OTHER_API}={UPSTREAM_BY_NAME[API]}"]
        dns_server = self._start("dns", [
            sys.executable, str(HERE / "dns_server.py"), "--listen", DNS_ADDR,
            "--port", str(DNS_PORT), *[arg for r in records for arg in ("--record", r)]],
            self.env("dns"))
        moto = self._start("moto", [
            sys.executable, "-m", "moto.server", "-H", UPSTREAM_BY_NAME[API], "-p", "443",
            "-c", str(certs / "api.crt"), "-k", str(certs / "api.key")],
            self.env("moto", MOTO_ACCOUNT_ID=ACCOUNT))
        self.registry_root = self.tmp / "registry"
        self.registry_root.mkdir()
        blobs = self._start("blobs", [
            sys.executable, str(HERE / "blob_server.py"), "--listen", UPSTREAM_BY_NAME[S3],
            "--port", "443", "--root", str(self.registry_root),
            "--cert", str(certs / "s3.crt"), "--key", str(certs / "s3.key")],
            self.env("blobs"))
        self.wait_listening(dns_server, (DNS_ADDR, DNS_PORT))
        self.wait_listening(blobs, (UPSTREAM_BY_NAME[S3], 443))
        self.wait_listening(moto, (UPSTREAM_BY_NAME[API], 443), timeout=30)

        # The registry's htpasswd is made from the token moto hands out, fetched the way
        # a builder would, but directly: the proxy is not part of the setup.
        token = self.ecr_client("direct")
        assert "error" not in token, f"direct get_authorization_token failed: {token}"
        assert token["user"] == "AWS", token
        self.password = token["password"]
        registry = self._start("registry", ["/usr/bin/docker-registry", "serve",
                                            str(self._registry_config())], self.env("registry"))
        self.wait_listening(registry, (UPSTREAM_BY_NAME[DKR], 443))

    def _registry_config(self) -> Path:
        import bcrypt

        certs = self.tmp / "certs"
        htpasswd = self.tmp / "htpasswd"
        hashed = bcrypt.hashpw(self.password.encode(), bcrypt.gensalt(rounds=4)).decode()
        htpasswd.write_text(f"AWS:{hashed}\n")
        config = self.tmp / "registry.json"  # YAML is a superset of JSON
        config.write_text(json.dumps({
            "version": 0.1,
            "log": {"level": "info", "formatter": "text"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.registry_root)},
                "redirect": {"disable": False},
                "maintenance": {"uploadpurging": {"enabled": False}},
            },
            "middleware": {"storage": [{"name": "redirect",
                                        "options": {"baseurl": f"https://{S3}/"}}]},
            "http": {
                "addr": f"{UPSTREAM_BY_NAME[DKR]}:443",
                "secret": secrets.token_hex(16),
                "tls": {"certificate": str(certs / "dkr.crt"), "key": str(certs / "dkr.key")},
            },
            "auth": {"htpasswd": {"realm": "ecr-e2e", "path": str(htpasswd)}},
        }, indent=2))
        return config

    # ---- clients --------------------------------------------------------------------

    def ecr_client(self, role: str, region: str = REGION, ca: bool = True) -> dict:
        """Run boto3 (ecr_client.py) in a client namespace; return its JSON result."""
        extra = {"AWS_ACCESS_KEY_ID": "AKIDE2ETESTING", "AWS_SECRET_ACCESS_KEY": "e2e-secret",
                 "AWS_DEFAULT_REGION": region, "AWS_EC2_METADATA_DISABLED": "true",
                 "AWS_CONFIG_FILE": "/dev/null", "AWS_SHARED_CREDENTIALS_FILE": "/dev/null"}
        if ca:
            extra["AWS_CA_BUNDLE"] = str(self.ca_pem)
        result = procs.run(self.ns[role], [sys.executable, str(HERE / "ecr_client.py")],
                           self.env(f"boto3-{role}", **extra), timeout=PROC_TIMEOUT)
        try:
            return json.loads(result.stdout.strip().splitlines()[-1])
        except (ValueError, IndexError):
            raise AssertionError(
                f"ecr_client in {role} printed no JSON (rc {result.returncode}):\n"
                f"{result.stdout}\n{result.stderr[-3000:]}") from None

    def skopeo(self, role: str, *args: str, timeout: float = PROC_TIMEOUT):
        """Run skopeo in a client namespace with a fresh HOME (no blob-info cache carries
        over between runs); return (CompletedProcess, seconds)."""
        self._counter += 1
        home = self.tmp / "home" / f"skopeo-{self._counter}"
        config = self.tmp / "containers"
        if not config.exists():
            config.mkdir()
            (config / "policy.json").write_text(
                json.dumps({"default": [{"type": "insecureAcceptAnything"}]}))
            (config / "registries.conf").write_text("unqualified-search-registries = []\n")
            (config / "registries.d").mkdir()
        env = procs.clean_env(home, CONTAINERS_REGISTRIES_CONF=str(config / "registries.conf"),
                              REGISTRY_AUTH_FILE=str(home / "auth.json"),
                              TMPDIR=str(self.tmp))
        # As root, skopeo keeps a blob-info cache in /var/lib/containers, which would both
        # touch the machine and let a later push "mount" blobs instead of sending them.
        # `ip netns exec` gives the command its own mount namespace, so a tmpfs over
        # /var/lib there is private to this one skopeo and vanishes with it.
        argv = ["/bin/sh", "-c", 'mount -t tmpfs -o size=16m e2e-var-lib /var/lib && exec "$@"',
                "skopeo", "/usr/bin/skopeo", "--policy", str(config / "policy.json"),
                "--registries.d", str(config / "registries.d"), *args]
        started = time.monotonic()
        result = procs.run(self.ns[role], argv, env, timeout=timeout)
        return result, time.monotonic() - started

    def push(self, role: str, image: oci_image.Image, ref: str, ca: bool = True,
             password: str | None = None):
        certs = ["--dest-cert-dir", str(self.cert_dir)] if ca else []
        return self.skopeo(role, "copy", "--quiet", "--preserve-digests", "--retry-times", "0",
                           "--dest-creds", f"AWS:{password or self.password}", *certs,
                           f"oci:{image.layout}:{image.tag}", f"docker://{ref}")

    def pull(self, role: str, ref: str, layout: Path, tag: str, password: str | None = None):
        return self.skopeo(role, "copy", "--quiet", "--preserve-digests", "--retry-times", "0",
                           "--src-creds", f"AWS:{password or self.password}",
                           "--src-cert-dir", str(self.cert_dir),
                           f"docker://{ref}", f"oci:{layout}:{tag}")

    def tls_client(self, role: str, address: str, sni: str, ca: bool = True,
                   request: bytes | None = None) -> dict:
        """One TLS connection from a client namespace, in this process; report what happened.

        Returns {"ok", "error", "cert_der", "reply"}: cert_der is the leaf the client saw.
        """
        def connect() -> dict:
            context = (ssl.create_default_context(cafile=str(self.ca_pem)) if ca
                       else ssl.create_default_context())
            raw = socket.create_connection((address, 443), timeout=10)
            try:
                with context.wrap_socket(raw, server_hostname=sni) as tls:
                    cert = tls.getpeercert(binary_form=True)
                    reply = b""
                    if request is not None:
                        tls.sendall(request)
                        while chunk := tls.recv(65536):
                            reply += chunk
                    return {"ok": True, "error": None, "cert_der": cert, "reply": reply}
            except (OSError, ssl.SSLError) as exc:
                return {"ok": False, "error": f"{type(exc).__name__}: {exc}",
                        "cert_der": None, "reply": b""}
            finally:
                raw.close()
        return self.ns[role].call(connect)

    # ---- proxies --------------------------------------------------------------------

    def start_proxy(self, name: str, listen: list[str], metrics_port: int) -> Proxy:
        listeners = "".join(f'[[listen]]\naddress = "{a}"\nport = 443\n\n' for a in listen)
        config = self.tmp / f"{name}.toml"
        config.write_text(
            f"{listeners}"
            f'[resolver]\nnameservers = ["{DNS_ADDR}"]\nport = {DNS_PORT}\ntimeout = 2.0\n\n'
            "[server]\nhandshake_timeout = 5.0\nconnect_timeout = 5.0\ndrain_timeout = 3.0\n"
            f'splice = "{SPLICE}"\n\n'
            f'[metrics]\naddress = "127.0.0.1"\nport = {metrics_port}\n\n'
            f'[ecr]\nregion = "{REGION}"\naccounts = ["{ACCOUNT}"]\n')
        env = self.env(name, PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
        # stderr alone in the log: that is where the access log must be
        service = self._start(name, [sys.executable, "-m", "sniproxy", "run",
                                     "--config", str(config)], env, split_stdout=True)
        self.wait_listening(service, *[(a, 443) for a in listen], ("127.0.0.1", metrics_port))
        return Proxy(service, self.ns["srv"], metrics_port, config)

    # ---- teardown -------------------------------------------------------------------

    def close(self) -> list[str]:
        """Stop every service by PID, then delete the namespaces. Returns problems seen."""
        problems = []
        for service in reversed(self.services):
            service.stop()
        for ns in self.ns.values():
            leftover = ns.destroy()
            if leftover:
                problems.append(f"{ns.name}: processes still inside at teardown: {leftover}")
        return problems
