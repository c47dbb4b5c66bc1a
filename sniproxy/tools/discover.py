"""`sniproxy discover`: find the ECR/S3 VPC endpoints and write the proxy's config.

The assessment of the endpoints is `sniproxy.tools.endpoints`; this module renders the TOML
config and the builders' /etc/hosts block, and runs the command. `main` alone talks to AWS,
through `sniproxy.tools.aws`, with read-only calls.
"""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import json
import os
import re
import sys
import tempfile
import tomllib

from sniproxy import config as config_mod
from sniproxy.config import Config
from sniproxy.errors import ConfigError, UsageError
from sniproxy.tools import policy
from sniproxy.tools.endpoints import assess
from sniproxy.tools.findings import WARN, Finding, findings_table
from sniproxy.tools.hosts import hosts_lines
from sniproxy.tools.model import Endpoint, Plan, PolicyFiles, Site, VpcRouteTable

AMAZON_DNS = "169.254.169.253"
LISTEN_PORT = config_mod.default(config_mod.Listen, "port")
METRICS = (config_mod.default(config_mod.MetricsConfig, "address"), config_mod.default(config_mod.MetricsConfig, "port"))

_ACCOUNT = re.compile(r"^[0-9]{12}$")



@dataclasses.dataclass(frozen=True)
class Service:
    """How this instance serves, when it is one of a fleet behind a load balancer."""

    metrics_address: str = METRICS[0]
    """Where /metrics, /healthz and /readyz listen; a balancer's health check needs a
    routable address (the instance's private IP, or 0.0.0.0)."""
    drain_delay: float | None = None
    """[server] drain_delay: at least the balancer's health-check interval x threshold."""
    allow: tuple[str, ...] = ()
    """[server] allow: the builders' networks."""
    workers: str | None = None
    """[server] workers ("auto" or a count): with a supervisor, a reload also loads new code."""
    proxy_from: tuple[str, ...] = ()
    """Behind a balancer that sends PROXY v2 (an NLB with IP targets): its subnets. Each
    [[listen]] then expects the header, and believes it only from these networks."""


def resolver_addresses(vpc_cidr: str | None) -> list[str]:
    """The VPC resolver: Amazon's link-local address, plus the VPC CIDR base + 2."""
    addresses = [AMAZON_DNS]
    if vpc_cidr:
        network = ipaddress.ip_network(vpc_cidr, strict=False)
        addresses.append(str(network.network_address + 2))
    return addresses


def _toml(value: object) -> str:
    """A TOML value; JSON strings and lists of them are valid TOML for our ASCII values."""
    return json.dumps(value)


def render_toml(site: Site, plan: Plan, service: Service = Service(), surveyed: bool = True) -> str:
    """The complete, commented config for the proxy. `surveyed` is False for --offline: no
    route table or endpoint was looked up, and the header says so."""
    where = f"# Region {site.region}, {site.vpc_id}, subnet {site.subnet_id or 'unknown'}"
    lines = [
        "# sniproxy configuration written by `sniproxy discover`.",
        f"{where}, route table {site.route_table_id}." if surveyed else
        f"{where}; written with --offline: endpoints and route tables not looked up.",
        "# Check it with `sniproxy check --config FILE`, prove the path with",
        "# `sniproxy doctor --config FILE`.",
        "",
        "# Addresses the builders reach (their /etc/hosts points the ECR names here).",
    ]
    for address in site.listen:
        lines += ["[[listen]]", f"address = {_toml(address)}", f"port = {LISTEN_PORT}"]
        if service.proxy_from:
            lines += ["# The balancer sends a PROXY v2 header naming the client: believed from its subnets only.",
                      "proxy_protocol = true", f"proxy_from = {_toml(list(service.proxy_from))}"]
        lines.append("")
    lines += [
        "# The VPC resolver, so the endpoints' private DNS names resolve to their",
        "# interfaces. The proxy never reads its own /etc/hosts.",
        "[resolver]",
        f"nameservers = {_toml(resolver_addresses(site.vpc_cidr))}",
        "port = 53",
        "",
    ]
    server = []
    if service.drain_delay is not None:
        server += ["# After SIGTERM, /readyz answers 503 for this long while the proxy still accepts,",
                   "# so the load balancer's health check takes it out of service first.",
                   f"drain_delay = {service.drain_delay:g}"]
    if service.allow:
        server += ["# Only the builders' networks may connect.", f"allow = {_toml(list(service.allow))}"]
    if service.workers is not None:
        value = _toml(service.workers) if service.workers == "auto" else service.workers
        server += ["# Worker processes under a supervisor: `systemctl reload` replaces them, and so",
                   "# also loads code newly installed into the venv.", f"workers = {value}"]
    if server:
        lines += ["[server]", *server, ""]
    lines += [
        "# Prometheus metrics at http://ADDRESS:PORT/metrics; /healthz and /readyz for health checks.",
        "[metrics]",
        f"address = {_toml(service.metrics_address)}",
        f"port = {METRICS[1]}",
        "",
        "# ECR in this region: routes for api.ecr, <account>.dkr.ecr and the layer bucket.",
        "[ecr]",
        f"region = {_toml(site.region)}",
        f"accounts = {_toml(list(site.accounts))}",
        "port = 443",
    ]
    if plan.upstreams:
        lines += [
            "",
            "# Private DNS does not reach these endpoints from the VPC resolver, so the proxy",
            "# dials their regional vpce names; the SNI still carries the ECR name.",
            "[ecr.upstreams]",
        ]
        lines += [f"{key} = {_toml(plan.upstreams[key])}"
                  for key in ("api", "dkr", "s3") if key in plan.upstreams]
    return "\n".join(lines) + "\n"


def parse(text: str, source: str = "sniproxy discover") -> Config:
    """The generated text read back exactly as `sniproxy run` reads it; a ConfigError here
    is a bug in discover."""
    return config_mod.from_dict(tomllib.loads(text), source=source)


def hosts_block(config: Config) -> str:
    """The /etc/hosts lines for the builders, pointing the ECR names at the first listener."""
    return "\n".join(hosts_lines(config, config.listen[0].address)) + "\n"


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--region", help="AWS region (default: instance metadata, then the "
                        "AWS config)")
    parser.add_argument("--vpc-id", help="VPC of the proxy (default: instance metadata)")
    parser.add_argument("--subnet-id", help="subnet of the proxy, whose route table must reach "
                        "the S3 gateway endpoint (default: instance metadata)")
    parser.add_argument("--profile", help="AWS profile for the read-only calls")
    parser.add_argument("--account", action="append", default=[], metavar="ACCOUNT",
                        help="registry account ID; repeat for several (default: the caller's)")
    parser.add_argument("--listen", action="append", default=[], metavar="IP",
                        help="address the proxy listens on; repeat for several (default: the "
                        "instance's private IPv4 addresses)")
    parser.add_argument("--metrics-address", default=METRICS[0], metavar="IP",
                        help="address of /metrics, /healthz and /readyz (default %(default)s; behind a "
                        "load balancer, one its health checks reach, such as 0.0.0.0)")
    parser.add_argument("--drain-delay", type=float, metavar="SECONDS",
                        help="[server] drain_delay: after SIGTERM, keep accepting this long while "
                        "/readyz says 503 (behind a load balancer: its check interval x threshold)")
    parser.add_argument("--workers", metavar="N|auto",
                        help="[server] workers: worker processes under a supervisor (a reload then also "
                        "loads newly installed code)")
    parser.add_argument("--allow", action="append", default=[], metavar="CIDR",
                        help="[server] allow: a builder network; repeat for several")
    parser.add_argument("--proxy-from", action="append", default=[], metavar="CIDR",
                        help="behind a balancer that sends PROXY v2 (an NLB with IP targets): its subnet; repeat for "
                        "several. Sets proxy_protocol = true and proxy_from on every listener")
    parser.add_argument("--write", metavar="FILE", help="write the config to FILE (the old file "
                        "is kept as FILE.bak) instead of standard output")
    parser.add_argument("--policies", metavar="DIR", help="also write the minimal endpoint policies "
                        "into DIR, for the fix commands (as `sniproxy policy` does)")
    parser.add_argument("--offline", action="store_true",
                        help="make no AWS call: write the config from the flags and instance metadata "
                        "alone (needs --account; the endpoints are not checked: run doctor for the path, "
                        "and discover without --offline where the EC2 API answers)")


def _service(args: argparse.Namespace) -> Service:
    try:
        ipaddress.ip_address(args.metrics_address)
    except ValueError:
        raise UsageError(f"--metrics-address {args.metrics_address!r}: not an IP address") from None
    if args.drain_delay is not None and not 0 <= args.drain_delay < float("inf"):
        raise UsageError(f"--drain-delay {args.drain_delay:g}: expected seconds, 0 or more")
    for flag, cidrs in (("--allow", args.allow), ("--proxy-from", args.proxy_from)):
        for cidr in cidrs:
            try:
                ipaddress.ip_network(cidr)
            except ValueError as exc:
                raise UsageError(f"{flag} {cidr!r}: {exc}") from None
    workers = args.workers
    if workers is not None and workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 256):
        raise UsageError(f"--workers {workers!r}: expected auto or a count 1-256")
    return Service(args.metrics_address, args.drain_delay, tuple(args.allow), workers, tuple(args.proxy_from))


# What --offline reports instead of the endpoints' findings.
NOT_SURVEYED = Finding(WARN, "endpoints", "not checked: --offline makes no AWS call",
                       "sniproxy doctor --config FILE proves DNS, TCP and TLS to every endpoint; run discover "
                       "without --offline, or doctor --aws, where the EC2 API answers, for the endpoints' policies")


def _offline(args: argparse.Namespace, connect) -> Site:
    """The site from flags and instance metadata: IMDS is link-local, so it answers in a VPC
    with no EC2 endpoint, where the calls of `_gather` would time out."""
    if not args.account:
        raise UsageError("--offline needs --account: the registry accounts (no STS call tells them)")
    if args.subnet_id:
        raise UsageError("--offline takes no --subnet-id: looking up its VPC is an EC2 call")
    where = _locate(args, connect)
    # No route table was looked up: render_toml(surveyed=False) does not show this field.
    return _site(args, where, route_table_id="")


def _locate(args: argparse.Namespace, connect):
    """Check the flags, then find the region, VPC and subnet: flags first, then instance metadata."""
    for account in args.account:
        if not _ACCOUNT.match(account):
            raise UsageError(f"--account {account!r}: an account ID has 12 digits")
    for address in args.listen:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise UsageError(f"--listen {address!r}: not an IP address") from None
    from sniproxy.tools.vpc import locate

    return locate(profile=args.profile, region=args.region, vpc_id=args.vpc_id, subnet_id=args.subnet_id,
                  connect=connect)


def _site(args: argparse.Namespace, where, route_table_id: str) -> Site:
    listen = tuple(args.listen) or tuple(ip for i in where.interfaces for ip in i.local_ipv4s)
    if not listen:
        raise UsageError(f"no listen address: pass --listen IP (instance metadata shows no "
                         f"private IPs in {where.vpc_id})")
    accounts = tuple(dict.fromkeys(args.account)) or (where.client.account(),)
    return Site(region=where.region, vpc_id=where.vpc_id,
                vpc_cidr=where.interfaces[0].vpc_cidr if where.interfaces else None,
                subnet_id=where.subnet_id, route_table_id=route_table_id, accounts=accounts, listen=listen)


def _gather(args: argparse.Namespace, connect) -> tuple[Site, list[Endpoint], dict[str, VpcRouteTable]]:
    from sniproxy.tools.vpc import survey

    where = _locate(args, connect)
    rtb, endpoints, tables = survey(where)
    return _site(args, where, rtb), endpoints, tables


def write_file(path: str, text: str) -> str | None:
    """Write atomically; an existing file is kept as FILE.bak. Returns the backup's path."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, temporary = tempfile.mkstemp(prefix=".sniproxy-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(temporary, 0o644)
        backup = None
        if os.path.exists(path):
            backup = path + ".bak"
            os.replace(path, backup)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    return backup


def main(args: argparse.Namespace, *, connect=None) -> int:
    """0: config written, nothing blocks; 1: a blocking finding; 2: could not discover.

    `connect(session, region)` builds the `aws.Aws` client; tests pass one with Stubbers."""
    from sniproxy.tools import aws

    offline = bool(getattr(args, "offline", False))
    endpoints: list[Endpoint] = []
    tables: dict[str, VpcRouteTable] = {}
    try:
        service = _service(args)
        if offline:
            site = _offline(args, connect)
        else:
            site, endpoints, tables = _gather(args, connect)
    except (UsageError, aws.AwsError) as exc:
        print(f"discover: error: {exc}", file=sys.stderr)
        return 2
    files = PolicyFiles(config=args.write or "FILE")
    if args.policies:
        try:
            policy.write(args.policies, site.region, site.accounts)
        except OSError as exc:
            print(f"discover: error: cannot write {args.policies}: {exc.strerror or exc}", file=sys.stderr)
            return 2
        files = PolicyFiles(args.policies, written=True)
    plan = Plan(upstreams={}, findings=(NOT_SURVEYED,)) if offline else assess(site, endpoints, tables, files)
    text = render_toml(site, plan, service, surveyed=not offline)
    try:
        config = parse(text, args.write or "sniproxy discover")
    except (ConfigError, tomllib.TOMLDecodeError) as exc:
        print(f"discover: error: the generated config is invalid (a bug): {exc}",
              file=sys.stderr)
        return 2
    report = sys.stderr
    if args.write:
        try:
            backup = write_file(args.write, text)
        except OSError as exc:
            print(f"discover: error: cannot write {args.write}: {exc.strerror or exc}",
                  file=sys.stderr)
            return 2
        report = sys.stdout
        kept = f" (previous version kept as {backup})" if backup else ""
        print(f"wrote {args.write}{kept}", file=report)
    else:
        sys.stdout.write(text)
    print(f"\nFindings for {site.vpc_id} in {site.region}:", file=report)
    report.write(findings_table(plan.findings))
    print("\n/etc/hosts block for the builders:", file=report)
    report.write(hosts_block(config))
    if plan.blocking:
        print("\ndiscover: blocking findings: fix them, then run discover again", file=report)
        return 1
    return 0
