"""`sniproxy doctor`: prove, from the proxy host, that each route reaches its endpoint.

For every exact name of every route: resolve the upstream through the configured resolver
(never /etc/hosts), connect to each address, complete a TLS handshake with the route's SNI
and verify the chain and the name, then close without sending a byte. Then check that the
listeners can be bound (or are already served by sniproxy) and that metrics answer.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import http.client
import ipaddress
import json
import re
import socket
import ssl
import sys
import time

import dns.exception
import dns.rdatatype
import dns.resolver
from prometheus_client.parser import text_string_to_metric_families

from sniproxy import config as config_mod
from sniproxy.addresses import format_address
from sniproxy.config import Config, ResolverConfig
from sniproxy.errors import ConfigError, UsageError
from sniproxy.routes import Route, is_wildcard
from sniproxy.tools.findings import FAIL, PASS, SKIP, WARN, Level
from sniproxy.tools.ports import is_sniproxy, listener_owner, try_bind

_MARK = {PASS: "PASS", WARN: "WARN", FAIL: "FAIL", SKIP: "SKIP"}
ALPN = ["h2", "http/1.1"]
X509_V_ERR_HOSTNAME_MISMATCH = 62
# ECR API and registry names: these only ever reach the VPC through interface endpoints.
_ECR_NAME = re.compile(r"(^|\.)(api\.ecr|dkr\.ecr|ecr)(-fips)?\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$")


@dataclasses.dataclass
class Check:
    status: Level
    check: str
    """"dns", "tcp", "tls", "listen", "metrics" or "policy"."""
    group: str
    """The name under test, or "listeners" / "metrics"."""
    target: str
    detail: str
    hint: str = ""
    data: dict = dataclasses.field(default_factory=dict)


class Failed(Exception):
    """A check failed: the detail line and a hint."""

    def __init__(self, detail: str, hint: str = ""):
        super().__init__(detail)
        self.detail = detail
        self.hint = hint


# --- names -----------------------------------------------------------------------------------

def resolve(name: str, resolver: ResolverConfig) -> tuple[list[str], int]:
    """A then AAAA addresses of `name` from the configured servers, and the lowest TTL."""
    r = dns.resolver.Resolver(configure=False)
    r.nameservers = list(resolver.nameservers)
    r.port = resolver.port
    r.timeout = r.lifetime = resolver.timeout
    r.cache = None
    servers = ", ".join(format_address(s, resolver.port) for s in resolver.nameservers)
    addresses: list[str] = []
    ttls: list[int] = []
    for rdtype in (dns.rdatatype.A, dns.rdatatype.AAAA):
        try:
            answer = r.resolve(name, rdtype, raise_on_no_answer=False, search=False)
        except dns.resolver.NXDOMAIN:
            raise Failed(f"NXDOMAIN from {servers}",
                         "the VPC resolver does not know this name: check the endpoint's "
                         "private DNS, or set an upstream (sniproxy discover)") from None
        except dns.exception.Timeout:
            raise Failed(f"no answer from {servers} within {resolver.timeout:g}s",
                         "check [resolver] nameservers and that UDP/TCP 53 is open") from None
        except dns.resolver.NoNameservers as exc:
            raise Failed(f"no DNS server answered well: {exc}",
                         "check [resolver] nameservers") from None
        if answer.rrset is not None:
            addresses += [rr.address for rr in answer.rrset]
            ttls.append(answer.rrset.ttl)
    if not addresses:
        raise Failed(f"no A or AAAA records from {servers}", "check the name and the resolver")
    return addresses, min(ttls)


def expects_endpoint(name: str, upstream: str) -> bool:
    """Whether the name should resolve to private interface-endpoint addresses."""
    return ".vpce.amazonaws.com" in upstream or bool(_ECR_NAME.search(name))


def public_addresses(addresses: list[str]) -> list[str]:
    return [a for a in addresses if ipaddress.ip_address(a).is_global]


def connect(address: str, port: int, timeout: float) -> tuple[socket.socket, float]:
    """A connected socket and the connect time in seconds."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    start = time.monotonic()
    try:
        sock.connect((address, port))
    except OSError as exc:
        sock.close()
        if isinstance(exc, TimeoutError) or exc.errno == errno.ETIMEDOUT:
            raise Failed(f"no answer within {timeout:g}s",
                         "a security group or network ACL drops it: the endpoint's security "
                         "group must allow TCP 443 from the proxy") from None
        if exc.errno == errno.ECONNREFUSED:
            raise Failed("connection refused", "nothing listens on this port") from None
        raise Failed(f"connect failed: {exc.strerror or exc}", "check routing") from None
    return sock, time.monotonic() - start


def handshake(sock: socket.socket, name: str, context: ssl.SSLContext,
              timeout: float) -> dict:
    """TLS handshake with SNI `name` on a connected socket; closes it without sending data."""
    sock.settimeout(timeout)
    try:
        with context.wrap_socket(sock, server_hostname=name) as tls:
            cert = tls.getpeercert() or {}
            expires = cert.get("notAfter")
            days = int((ssl.cert_time_to_seconds(str(expires)) - time.time()) // 86400) if expires else None
            return {"tls_version": tls.version(), "alpn": tls.selected_alpn_protocol(),
                    "expires_in_days": days}
    except ssl.SSLCertVerificationError as exc:
        if exc.verify_code == X509_V_ERR_HOSTNAME_MISMATCH:
            hint = ("this address serves other names: the DNS answer or the upstream "
                    "override points at the wrong endpoint")
        else:
            hint = "the system store does not trust the chain; pass --cafile if that is expected"
        raise Failed(f"certificate rejected: {exc.verify_message}", hint) from None
    except (ssl.SSLError, OSError) as exc:
        raise Failed(f"TLS handshake failed: {getattr(exc, 'reason', None) or exc}",
                     "the upstream does not speak TLS for this name") from None
    finally:
        sock.close()


def check_name(route: Route, name: str, config: Config, context: ssl.SSLContext) -> list[Check]:
    upstream = route.upstream_for(name)
    checks: list[Check] = []
    if is_wildcard(name):
        return [Check(SKIP, "dns", name, name, "a wildcard pattern names no host to resolve",
                      "doctor tests exact names only; add the host names you use as a route")]
    via = f" via {upstream}" if upstream != name else ""
    try:
        ipaddress.ip_address(upstream)
        addresses, ttl = [upstream], None
        checks.append(Check(SKIP, "dns", name, upstream, "upstream is an address"))
    except ValueError:
        try:
            addresses, ttl = resolve(upstream, config.resolver)
        except Failed as exc:
            return [Check(FAIL, "dns", name, upstream, exc.detail, exc.hint)]
        checks.append(Check(PASS, "dns", name, upstream,
                            f"{', '.join(addresses)} (TTL {ttl}s){via}",
                            data={"addresses": addresses, "ttl": ttl}))
    public = public_addresses(addresses)
    if public and expects_endpoint(name, upstream):
        checks.append(Check(WARN, "dns", name, upstream,
                            f"public address {', '.join(public)} where an interface endpoint "
                            "is expected: traffic would leave through NAT or IGW",
                            "enable private DNS on the endpoint, or set the vpce name as the "
                            "upstream (sniproxy discover)",
                            data={"public": public}))
    for address in addresses:
        target = format_address(address, route.port)
        try:
            sock, seconds = connect(address, route.port, config.server.connect_timeout)
        except Failed as exc:
            checks.append(Check(FAIL, "tcp", name, target, exc.detail, exc.hint))
            continue
        latency = round(seconds * 1000, 1)
        checks.append(Check(PASS, "tcp", name, target, f"connected in {latency} ms",
                            data={"latency_ms": latency}))
        try:
            info = handshake(sock, name, context, config.server.handshake_timeout)
        except Failed as exc:
            checks.append(Check(FAIL, "tls", name, target, exc.detail, exc.hint))
            continue
        expiry = (f", expires in {info['expires_in_days']} days"
                  if info["expires_in_days"] is not None else "")
        checks.append(Check(PASS, "tls", name, target,
                            f"{info['tls_version']}, ALPN {info['alpn'] or 'none'}, chain and "
                            f"name verified{expiry}", data=info))
    return checks


# --- listeners and metrics -------------------------------------------------------------------

def check_listener(address: str, port: int, group: str = "listeners") -> Check:
    target = format_address(address, port)
    try:
        try_bind(address, port)
        return Check(PASS, "listen", group, target, "bindable", data={"state": "free"})
    except OSError as exc:
        error = exc
    if error.errno == errno.EADDRINUSE:
        owner = listener_owner(address, port)
        if owner and is_sniproxy(owner[1]):
            return Check(PASS, "listen", group, target, f"served by sniproxy (pid {owner[0]})",
                         data={"state": "sniproxy", "pid": owner[0]})
        who = f"pid {owner[0]}: {' '.join(owner[1])[:60]}" if owner else "another process"
        return Check(FAIL, "listen", group, target, f"in use by {who}",
                     "stop it, or choose another address or port",
                     data={"state": "taken", "pid": owner[0] if owner else None})
    if error.errno == errno.EACCES:
        return Check(FAIL, "listen", group, target, "permission denied",
                     "ports below 1024 need root or CAP_NET_BIND_SERVICE "
                     "(systemd: AmbientCapabilities=CAP_NET_BIND_SERVICE)")
    if error.errno == errno.EADDRNOTAVAIL:
        return Check(FAIL, "listen", group, target, "address not on this host",
                     "use one of this host's addresses (ip -brief address)")
    return Check(FAIL, "listen", group, target, f"cannot bind: {error.strerror or error}")


def scrape(address: str, port: int, timeout: float) -> int:
    """The number of sniproxy_ metric families at /metrics; raises OSError or Failed."""
    connection = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        connection.request("GET", "/metrics")
        response = connection.getresponse()
        body = response.read(4 << 20).decode("utf-8", "replace")
    except http.client.HTTPException as exc:
        raise Failed(f"not an HTTP answer: {exc}", "something else holds the metrics port") from None
    finally:
        connection.close()
    if response.status != 200:
        raise Failed(f"HTTP {response.status} for /metrics", "something else holds the port")
    try:
        families = [f.name for f in text_string_to_metric_families(body)]
    except ValueError as exc:
        raise Failed(f"/metrics is not Prometheus text: {exc}") from None
    count = sum(name.startswith("sniproxy_") for name in families)
    if not count:
        raise Failed("/metrics has no sniproxy_ metrics", "another exporter holds the port")
    return count


def check_metrics(config: Config, running: bool) -> Check:
    m = config.metrics
    target = format_address(m.address, m.port)
    if not m.enabled:
        return Check(SKIP, "metrics", "metrics", target, "disabled in the config")
    try:
        count = scrape(m.address, m.port, config.server.connect_timeout)
        return Check(PASS, "metrics", "metrics", target,
                     f"answers: {count} sniproxy metric families", data={"families": count})
    except Failed as exc:
        return Check(FAIL, "metrics", "metrics", target, exc.detail, exc.hint)
    except OSError as exc:
        refused = f"no answer: {exc.strerror or exc}"
    if running:
        return Check(FAIL, "metrics", "metrics", target, refused,
                     "sniproxy runs but its metrics do not answer: check [metrics]")
    free = check_listener(m.address, m.port, "metrics")
    if free.status == PASS:
        return Check(PASS, "metrics", "metrics", target,
                     "bindable (sniproxy is not running yet)", data={"state": "free"})
    return dataclasses.replace(free, check="metrics")


# --- endpoint policies (--aws) ----------------------------------------------------------------

POLICY_GROUP = "endpoint policies"


def aws_checks(config: Config, args: argparse.Namespace, connect=None) -> list[Check]:
    """What `discover` says about the ECR/S3 endpoints' policies, for the registries this config
    routes: read-only AWS calls, with the credentials of the environment or --profile."""
    from sniproxy.tools import aws, endpoints, policy, vpc
    from sniproxy.tools.model import PolicyFiles, Site

    try:
        region, accounts = policy.pick_region(config, args.region)
    except ConfigError as exc:
        return [Check(FAIL, "policy", POLICY_GROUP, config.source, exc.message)]
    try:
        where = vpc.locate(profile=args.profile, region=region, vpc_id=args.vpc_id, subnet_id=args.subnet_id,
                           connect=connect)
        rtb, found, tables = vpc.survey(where)
    except (UsageError, aws.AwsError) as exc:
        return [Check(FAIL, "policy", POLICY_GROUP, region, str(exc))]
    site = Site(region=region, vpc_id=where.vpc_id, vpc_cidr=None, subnet_id=where.subnet_id,
                          route_table_id=rtb, accounts=accounts, listen=())
    files = PolicyFiles(config=config.source)
    policies = endpoints.judge_policies(site, found, tables, files)
    plan = endpoints.assess(site, found, tables, files)
    findings = []
    for service in endpoints.SERVICES:
        # The policy of the endpoint in use; without one, why there is none (missing, pending...).
        findings += [policies[service]] if service in policies else \
            [f for f in plan.findings if f.subject == service and f.level == FAIL]
    return [Check(f.level, "policy", POLICY_GROUP, f.subject, f.message, f.fix) for f in findings]


# --- command line ----------------------------------------------------------------------------

def run_checks(config: Config, cafile: str | None) -> list[Check]:
    context = ssl.create_default_context(cafile=cafile)
    context.set_alpn_protocols(ALPN)
    checks: list[Check] = []
    for route in config.routes:
        for name in route.patterns:
            checks += check_name(route, name, config, context)
    listeners = [check_listener(entry.address, entry.port) for entry in config.listen]
    running = any(c.data.get("state") == "sniproxy" for c in listeners)
    return checks + listeners + [check_metrics(config, running)]


def summary(checks: list[Check]) -> dict[str, int]:
    return {status: sum(c.status == status for c in checks) for status in (PASS, WARN, FAIL, SKIP)}


def render_table(checks: list[Check]) -> str:
    lines: list[str] = []
    group = None
    for c in checks:
        if c.group != group:
            group = c.group
            lines.append(group)
        lines.append(f"  {_MARK[c.status]}  {c.check:<7} {c.target}  {c.detail}")
        if c.hint and c.status in (FAIL, WARN):
            first, *rest = c.hint.splitlines()
            lines.append(f"  {'':4}  {'':<7} hint: {first}")
            lines += [f"  {'':4}  {'':<7}       {line}" for line in rest]
    counts = summary(checks)
    lines.append(f"{counts[PASS]} passed, {counts[WARN]} warnings, {counts[FAIL]} failed, "
                 f"{counts[SKIP]} skipped")
    return "\n".join(lines) + "\n"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=config_mod.DEFAULT_PATH,
                        help=f"TOML config (default {config_mod.DEFAULT_PATH})")
    parser.add_argument("--cafile", help="verify upstream certificates against this CA bundle "
                        "instead of the system store")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    aws_flags = parser.add_argument_group("endpoint policies (read-only AWS calls, as sniproxy discover makes)")
    aws_flags.add_argument("--aws", action="store_true", help="also judge the ECR/S3 VPC endpoints' policies "
                           "against the registries the config routes")
    aws_flags.add_argument("--profile", help="AWS profile (default: the environment, or the instance profile)")
    aws_flags.add_argument("--region", help="region of the endpoints, when the config routes registries in several")
    aws_flags.add_argument("--vpc-id", help="VPC of the proxy (default: instance metadata)")
    aws_flags.add_argument("--subnet-id", help="subnet of the proxy (default: instance metadata)")


def main(args: argparse.Namespace, *, connect=None) -> int:
    """0: every check passed (warnings allowed); 1: a check failed; 2: unusable input.

    `connect(session, region)` builds the `aws.Aws` client for --aws; tests pass Stubbers."""
    try:
        config = config_mod.load(args.config)
    except ConfigError as exc:
        print(f"doctor: error: {exc}", file=sys.stderr)
        return 2
    if args.cafile:
        try:
            ssl.create_default_context(cafile=args.cafile)
        except (OSError, ssl.SSLError) as exc:
            reason = getattr(exc, "strerror", None) or getattr(exc, "reason", None) or exc
            print(f"doctor: error: --cafile {args.cafile}: {reason}", file=sys.stderr)
            return 2
    checks = run_checks(config, args.cafile)
    if args.aws:
        checks += aws_checks(config, args, connect)
    failed = any(c.status == FAIL for c in checks)
    if args.json:
        json.dump({"ok": not failed, "config": config.source, "summary": summary(checks),
                   "checks": [dataclasses.asdict(c) for c in checks]}, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_table(checks))
    return 1 if failed else 0
