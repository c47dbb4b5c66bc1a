"""`sniproxy discover`: find the ECR/S3 VPC endpoints and write the proxy's config.

The logic is pure: plain data about the site and its endpoints goes in; findings, the TOML
config text and the builders' /etc/hosts block come out. `main` alone talks to AWS, through
`sniproxy.tools.aws`, with read-only calls.
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
from sniproxy.errors import ConfigError
from sniproxy.tools import policy
from sniproxy.tools.findings import BLOCK, OK, WARN, Finding, findings_table
from sniproxy.tools.hosts import hosts_lines
from sniproxy.tools.policy_findings import PolicyFiles, RouteTable, ecr_finding, s3_finding

SERVICES = ("ecr.api", "ecr.dkr", "s3")
UPSTREAM_KEY = {"ecr.api": "api", "ecr.dkr": "dkr", "s3": "s3"}
SERVICE_PREFIXES = ("com.amazonaws.", "cn.com.amazonaws.")
AMAZON_DNS = "169.254.169.253"
LISTEN_PORT = config_mod.default(config_mod.Listen, "port")
METRICS = (config_mod.default(config_mod.MetricsConfig, "address"), config_mod.default(config_mod.MetricsConfig, "port"))

# Regional vpce names: "vpce-<hex>-<id>.<service>..."; zonal names add "-<az>" after the id.
_REGIONAL = re.compile(r"^(\*\.)?vpce-[0-9a-f]+-[0-9a-z]+\.")
_ACCOUNT = re.compile(r"^[0-9]{12}$")



@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One VPC endpoint for ECR or S3, reduced to what the assessment needs."""

    id: str
    service: str
    """"ecr.api", "ecr.dkr" or "s3"."""
    type: str
    """"Interface" or "Gateway"."""
    state: str
    """Lower-case, as the API spells it: "available", "pending", "pendingacceptance", ..."""
    private_dns: bool
    inbound_only: bool
    """Private DNS answers only queries from Route 53 inbound resolver endpoints (S3)."""
    dns_names: tuple[str, ...]
    route_table_ids: tuple[str, ...]
    policy: str | None = None
    """The endpoint policy document, as the JSON text EC2 returns."""

    @property
    def available(self) -> bool:
        return self.state == "available"

    @property
    def regional_name(self) -> str | None:
        """The regional vpce DNS name (not a zonal one, not the private name)."""
        for name in self.dns_names:
            if _REGIONAL.match(name):
                return name
        return None


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


@dataclasses.dataclass(frozen=True)
class Site:
    """Where the proxy runs."""

    region: str
    vpc_id: str
    vpc_cidr: str | None
    """Primary IPv4 CIDR of the VPC when known (from IMDS)."""
    subnet_id: str | None
    route_table_id: str
    """The route table governing the proxy's subnet (or the main table)."""
    accounts: tuple[str, ...]
    listen: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    upstreams: dict[str, str]
    """[ecr.upstreams] overrides: "api"/"dkr"/"s3" -> vpce DNS name."""
    findings: tuple[Finding, ...]

    @property
    def blocking(self) -> bool:
        return any(f.level == BLOCK for f in self.findings)


def service_of(service_name: str, region: str) -> str | None:
    for prefix in SERVICE_PREFIXES:
        for service in SERVICES:
            if service_name == f"{prefix}{region}.{service}":
                return service
    return None


def endpoints_from_api(raw: list[dict], region: str) -> list[Endpoint]:
    """ECR/S3 endpoints out of ec2.describe_vpc_endpoints items; others are dropped."""
    endpoints = []
    for item in raw:
        service = service_of(item.get("ServiceName", ""), region)
        if service is None:
            continue
        endpoints.append(Endpoint(
            id=item["VpcEndpointId"],
            service=service,
            type=item.get("VpcEndpointType", ""),
            state=str(item.get("State", "")).lower(),
            private_dns=bool(item.get("PrivateDnsEnabled", False)),
            inbound_only=bool(
                item.get("DnsOptions", {}).get("PrivateDnsOnlyForInboundResolverEndpoint", False)
            ),
            dns_names=tuple(e["DnsName"] for e in item.get("DnsEntries", []) if "DnsName" in e),
            route_table_ids=tuple(item.get("RouteTableIds", [])),
            policy=item.get("PolicyDocument"),
        ))
    return endpoints


def _best(endpoints: list[Endpoint]) -> Endpoint | None:
    """Prefer an available endpoint, then one with private DNS on."""
    ranked = sorted(endpoints, key=lambda e: (not e.available, not e.private_dns, e.id))
    return ranked[0] if ranked else None


def _assess_ecr(site: Site, service: str, found: list[Endpoint],
                upstreams: dict[str, str]) -> Finding:
    endpoint = _best([e for e in found if e.type == "Interface"])
    full = f"com.amazonaws.{site.region}.{service}"
    traffic = "image traffic" if service == "ecr.dkr" else "ECR API calls (auth tokens, manifests)"
    if endpoint is None:
        return Finding(BLOCK, service,
                       f"no {service} endpoint in {site.vpc_id}: {traffic} would leave through "
                       "NAT or IGW",
                       f"create an interface endpoint for {full} in {site.vpc_id}, "
                       "private DNS on")
    if not endpoint.available:
        return Finding(BLOCK, service, f"{service} endpoint {endpoint.id} is {endpoint.state}",
                       "wait until it is available, or accept/repair it, then run discover again")
    if endpoint.private_dns:
        return Finding(OK, service, f"{endpoint.id} available, private DNS on")
    regional = endpoint.regional_name
    if regional is None:
        return Finding(BLOCK, service,
                       f"private DNS disabled on {service} ({endpoint.id}) and it has no "
                       "regional vpce DNS name",
                       f"enable private DNS on {endpoint.id}")
    upstreams[UPSTREAM_KEY[service]] = regional
    why = ": ECR requires it for docker pulls" if service == "ecr.dkr" else ""
    return Finding(WARN, service,
                   f"private DNS disabled on {service} ({endpoint.id}){why}; upstream set to "
                   "the vpce name",
                   f"enable private DNS on {endpoint.id} and run discover again, or keep the "
                   "override")


def s3_gateway(route_table_id: str, found: list[Endpoint]) -> Endpoint | None:
    """The S3 gateway endpoint on the proxy's route table, else the best other one: a VPC may
    have several, each on its own route tables."""
    gateways = [e for e in found if e.type == "Gateway"]
    return _best([e for e in gateways if route_table_id in e.route_table_ids]) or _best(gateways)


def _s3_in_use(site: Site, found: list[Endpoint]) -> Endpoint | None:
    """The S3 endpoint the proxy's layer downloads go through, whose policy then applies."""
    gateway = s3_gateway(site.route_table_id, found)
    if gateway is not None and gateway.available and site.route_table_id in gateway.route_table_ids:
        return gateway
    return _best([e for e in found if e.type == "Interface" and e.available])


def _assess_s3(site: Site, found: list[Endpoint], upstreams: dict[str, str]) -> list[Finding]:
    rtb = site.route_table_id
    gateway = s3_gateway(site.route_table_id, found)
    interface = _best([e for e in found if e.type == "Interface" and e.available])
    full = f"com.amazonaws.{site.region}.s3"
    if gateway is not None and gateway.available and rtb in gateway.route_table_ids:
        return [Finding(OK, "s3", f"gateway {gateway.id} is associated with {rtb}")]
    findings = []
    if gateway is None:
        problem = None
    elif not gateway.available:
        problem = f"S3 gateway endpoint {gateway.id} is {gateway.state}"
        fix = "wait until it is available, or repair it"
    else:
        problem = (f"S3 gateway endpoint {gateway.id} not associated with {rtb}: layer "
                   "downloads would bypass it")
        fix = (f"aws ec2 modify-vpc-endpoint --vpc-endpoint-id {gateway.id} "
               f"--add-route-table-ids {rtb}")
    if interface is None:
        if problem is None:
            findings.append(Finding(
                BLOCK, "s3", f"no S3 endpoint in {site.vpc_id}: layer downloads would leave "
                "through NAT or IGW",
                f"create a gateway endpoint for {full} and associate it with {rtb}"))
        else:
            findings.append(Finding(BLOCK, "s3", problem, fix))
        return findings
    if problem is not None:
        findings.append(Finding(WARN, "s3", problem + f"; using interface {interface.id}", fix))
    if interface.private_dns and not interface.inbound_only:
        findings.append(Finding(OK, "s3", f"interface {interface.id} available, private DNS on"))
        return findings
    regional = interface.regional_name
    if regional is None:
        findings.append(Finding(BLOCK, "s3", f"S3 interface endpoint {interface.id} has no "
                                "regional vpce DNS name", f"enable private DNS on {interface.id}"))
        return findings
    upstreams["s3"] = policy.starport_bucket(site.region) + "." + regional.removeprefix("*.")
    why = ("answers only inbound resolver endpoints" if interface.private_dns
           else "has private DNS disabled")
    findings.append(Finding(WARN, "s3", f"S3 interface endpoint {interface.id} {why}; "
                            "upstream set to its vpce name",
                            f"or associate an S3 gateway endpoint with {rtb} (no data charge)"))
    return findings


def policy_findings(site: Site, endpoints: list[Endpoint], tables: dict[str, RouteTable] | None = None,
                    files: PolicyFiles | None = None) -> dict[str, Finding]:
    """Service -> the finding about the policy of the endpoint it goes through, if any."""
    files = files or PolicyFiles()
    out = {}
    for service in ("ecr.api", "ecr.dkr"):
        endpoint = _best([e for e in endpoints if e.service == service and e.type == "Interface"])
        if endpoint is not None and endpoint.available:
            out[service] = ecr_finding(site, endpoint, files)
    s3 = _s3_in_use(site, [e for e in endpoints if e.service == "s3"])
    if s3 is not None:
        out["s3"] = s3_finding(site, s3, tables or {}, files)
    return out


def assess(site: Site, endpoints: list[Endpoint], tables: dict[str, RouteTable] | None = None,
           files: PolicyFiles | None = None) -> Plan:
    """Findings for the site, its endpoints and their policies, and the upstream overrides the
    config needs. `tables` holds the route tables the S3 gateway endpoint is on."""
    policies = policy_findings(site, endpoints, tables, files)
    upstreams: dict[str, str] = {}
    findings = []
    if site.subnet_id is None:
        findings.append(Finding(
            WARN, "subnet", f"proxy subnet unknown: checked the main route table "
            f"{site.route_table_id}", "pass --subnet-id to check the proxy's own subnet"))
    for service in ("ecr.api", "ecr.dkr"):
        findings.append(_assess_ecr(site, service,
                                    [e for e in endpoints if e.service == service], upstreams))
        findings += [policies[service]] if service in policies else []
    findings.extend(_assess_s3(site, [e for e in endpoints if e.service == "s3"], upstreams))
    findings += [policies["s3"]] if "s3" in policies else []
    return Plan(upstreams=upstreams, findings=tuple(findings))


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


def render_toml(site: Site, plan: Plan, service: Service = Service()) -> str:
    """The complete, commented config for the proxy."""
    lines = [
        "# sniproxy configuration written by `sniproxy discover`.",
        f"# Region {site.region}, {site.vpc_id}, "
        f"subnet {site.subnet_id or 'unknown'}, route table {site.route_table_id}.",
        "# Check it with `sniproxy check --config FILE`, prove the path with",
        "# `sniproxy doctor --config FILE`.",
        "",
        "# Addresses the builders reach (their /etc/hosts points the ECR names here).",
    ]
    for address in site.listen:
        lines += ["[[listen]]", f"address = {_toml(address)}", f"port = {LISTEN_PORT}", ""]
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

class UsageError(Exception):
    """A bad flag value, shown as one line."""


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
    parser.add_argument("--write", metavar="FILE", help="write the config to FILE (the old file "
                        "is kept as FILE.bak) instead of standard output")
    parser.add_argument("--policies", metavar="DIR", help="also write the minimal endpoint policies "
                        "into DIR, for the fix commands (as `sniproxy policy` does)")


def _service(args: argparse.Namespace) -> Service:
    try:
        ipaddress.ip_address(args.metrics_address)
    except ValueError:
        raise UsageError(f"--metrics-address {args.metrics_address!r}: not an IP address") from None
    if args.drain_delay is not None and not 0 <= args.drain_delay < float("inf"):
        raise UsageError(f"--drain-delay {args.drain_delay:g}: expected seconds, 0 or more")
    for cidr in args.allow:
        try:
            ipaddress.ip_network(cidr)
        except ValueError as exc:
            raise UsageError(f"--allow {cidr!r}: {exc}") from None
    workers = args.workers
    if workers is not None and workers != "auto" and not (workers.isdigit() and 1 <= int(workers) <= 256):
        raise UsageError(f"--workers {workers!r}: expected auto or a count 1-256")
    return Service(args.metrics_address, args.drain_delay, tuple(args.allow), workers)


@dataclasses.dataclass(frozen=True)
class Location:
    """Where the proxy runs, as far as flags and instance metadata tell."""

    client: object
    """The `aws.Aws` client for the region."""
    region: str
    vpc_id: str
    subnet_id: str | None
    interfaces: tuple
    """This instance's `aws.Interface`s in that VPC (none when not run on it)."""


def locate(args: argparse.Namespace, connect, region: str | None = None) -> Location:
    """Region (`region`, else --region, metadata, the AWS config), VPC and subnet (--vpc-id,
    --subnet-id, else metadata), and a client for them. `discover` and `doctor --aws` share it."""
    from sniproxy.tools import aws

    session = aws.session(args.profile)
    metadata = aws.Imds(aws.imds_endpoint(args.profile)).fetch()
    region = region or args.region or (metadata and metadata.region) or session.region_name
    if not region:
        raise UsageError("no region: pass --region (instance metadata is unavailable and the "
                         "AWS config names none)")
    aws.check_region(session, region)
    if metadata is not None and metadata.region != region:
        metadata = None  # this instance lives elsewhere: its VPC and IPs do not apply
    client = (connect or aws.Aws)(session, region)

    vpc_id = args.vpc_id
    if args.subnet_id:
        subnet_vpc = client.subnet(args.subnet_id).get("VpcId")
        if vpc_id and subnet_vpc != vpc_id:
            raise UsageError(f"subnet {args.subnet_id} is in {subnet_vpc}, not in {vpc_id}")
        vpc_id = subnet_vpc
    if not vpc_id and metadata is not None and metadata.primary is not None:
        vpc_id = metadata.primary.vpc_id
    if not vpc_id:
        raise UsageError("no VPC: pass --vpc-id or --subnet-id (instance metadata is "
                         "unavailable)")
    local = tuple(i for i in (metadata.interfaces if metadata else ()) if i.vpc_id == vpc_id)
    subnet_id = args.subnet_id or (local[0].subnet_id if local else None)
    return Location(client, region, vpc_id, subnet_id, local)


def survey(where: Location) -> tuple[str, list[Endpoint], dict[str, RouteTable]]:
    """The proxy subnet's route table id, the VPC's ECR/S3 endpoints, and the route tables the
    S3 gateway endpoint of that table is on (its policy covers all of them)."""
    route_table = where.client.route_table(where.vpc_id, where.subnet_id)
    rtb = route_table["RouteTableId"]
    endpoints = endpoints_from_api(where.client.vpc_endpoints(where.vpc_id), where.region)
    tables = {rtb: RouteTable.from_api(route_table)}
    gateway = s3_gateway(rtb, [e for e in endpoints if e.service == "s3"])
    others = [t for t in (gateway.route_table_ids if gateway else ()) if t != rtb]
    if rtb in (gateway.route_table_ids if gateway else ()) and others:
        tables.update((t["RouteTableId"], RouteTable.from_api(t)) for t in where.client.route_tables(others))
    return rtb, endpoints, tables


def _gather(args: argparse.Namespace, connect) -> tuple[Site, list[Endpoint], dict[str, RouteTable]]:
    for account in args.account:
        if not _ACCOUNT.match(account):
            raise UsageError(f"--account {account!r}: an account ID has 12 digits")
    for address in args.listen:
        try:
            ipaddress.ip_address(address)
        except ValueError:
            raise UsageError(f"--listen {address!r}: not an IP address") from None
    where = locate(args, connect)
    listen = tuple(args.listen) or tuple(ip for i in where.interfaces for ip in i.local_ipv4s)
    if not listen:
        raise UsageError(f"no listen address: pass --listen IP (instance metadata shows no "
                         f"private IPs in {where.vpc_id})")
    accounts = tuple(dict.fromkeys(args.account)) or (where.client.account(),)
    rtb, endpoints, tables = survey(where)
    site = Site(region=where.region, vpc_id=where.vpc_id,
                vpc_cidr=where.interfaces[0].vpc_cidr if where.interfaces else None,
                subnet_id=where.subnet_id, route_table_id=rtb, accounts=accounts, listen=listen)
    return site, endpoints, tables


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

    try:
        service = _service(args)
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
    plan = assess(site, endpoints, tables, files)
    text = render_toml(site, plan, service)
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
