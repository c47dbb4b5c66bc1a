"""The ECR and S3 VPC endpoints of the proxy's VPC, and what they mean for it: pure logic.

Plain data about the site and its endpoints goes in (as `discover` and `doctor --aws` read it
from AWS); findings, each with its fix, and the upstream overrides for the config come out.
"""

from __future__ import annotations

from sniproxy.ecr import starport_bucket
from sniproxy.tools.findings import FAIL, PASS, WARN, Finding
from sniproxy.tools.model import Endpoint, Plan, PolicyFiles, Site, VpcRouteTable
from sniproxy.tools.policy_findings import ecr_finding, s3_finding

SERVICES = ("ecr.api", "ecr.dkr", "s3")
UPSTREAM_KEY = {"ecr.api": "api", "ecr.dkr": "dkr", "s3": "s3"}
SERVICE_PREFIXES = ("com.amazonaws.", "cn.com.amazonaws.")



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
        return Finding(FAIL, service,
                       f"no {service} endpoint in {site.vpc_id}: {traffic} would leave through "
                       "NAT or IGW",
                       f"create an interface endpoint for {full} in {site.vpc_id}, "
                       "private DNS on")
    if not endpoint.available:
        return Finding(FAIL, service, f"{service} endpoint {endpoint.id} is {endpoint.state}",
                       "wait until it is available, or accept/repair it, then run discover again")
    if endpoint.private_dns:
        return Finding(PASS, service, f"{endpoint.id} available, private DNS on")
    regional = endpoint.regional_name
    if regional is None:
        return Finding(FAIL, service,
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
        return [Finding(PASS, "s3", f"gateway {gateway.id} is associated with {rtb}")]
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
                FAIL, "s3", f"no S3 endpoint in {site.vpc_id}: layer downloads would leave "
                "through NAT or IGW",
                f"create a gateway endpoint for {full} and associate it with {rtb}"))
        else:
            findings.append(Finding(FAIL, "s3", problem, fix))
        return findings
    if problem is not None:
        findings.append(Finding(WARN, "s3", problem + f"; using interface {interface.id}", fix))
    if interface.private_dns and not interface.inbound_only:
        findings.append(Finding(PASS, "s3", f"interface {interface.id} available, private DNS on"))
        return findings
    regional = interface.regional_name
    if regional is None:
        findings.append(Finding(FAIL, "s3", f"S3 interface endpoint {interface.id} has no "
                                "regional vpce DNS name", f"enable private DNS on {interface.id}"))
        return findings
    upstreams["s3"] = starport_bucket(site.region) + "." + regional.removeprefix("*.")
    why = ("answers only inbound resolver endpoints" if interface.private_dns
           else "has private DNS disabled")
    findings.append(Finding(WARN, "s3", f"S3 interface endpoint {interface.id} {why}; "
                            "upstream set to its vpce name",
                            f"or associate an S3 gateway endpoint with {rtb} (no data charge)"))
    return findings


def judge_policies(site: Site, endpoints: list[Endpoint], tables: dict[str, VpcRouteTable] | None = None,
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


def assess(site: Site, endpoints: list[Endpoint], tables: dict[str, VpcRouteTable] | None = None,
           files: PolicyFiles | None = None) -> Plan:
    """Findings for the site, its endpoints and their policies, and the upstream overrides the
    config needs. `tables` holds the route tables the S3 gateway endpoint is on."""
    policies = judge_policies(site, endpoints, tables, files)
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
