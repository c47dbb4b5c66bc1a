"""Endpoint policies as findings: the verdict of `exposure`, said plainly, with the fix.

For the ECR endpoints the fix is the generated policy and the exact modify-vpc-endpoint command.
For the S3 gateway endpoint it depends on who else uses it: its policy covers every subnet whose
route table it is on, so when the proxy shares it, the fix that breaks nobody is a route table
(and gateway endpoint) of the proxy's own; tightening the shared one is given as the other way.
Pure: facts in, findings out.
"""

from __future__ import annotations

import shlex

from sniproxy.tools import exposure
from sniproxy.tools.findings import PASS, WARN, Finding
from sniproxy.tools.model import Endpoint, PolicyFiles, Site, VpcRouteTable
from sniproxy.tools.policy import LAYER_ACTION, layer_arn

# Route fields -> `aws ec2 create-route` flags, to copy a route table's routes to a new one.
ROUTE_DESTINATIONS = {"DestinationCidrBlock": "--destination-cidr-block",
                      "DestinationIpv6CidrBlock": "--destination-ipv6-cidr-block",
                      "DestinationPrefixListId": "--destination-prefix-list-id"}
ROUTE_TARGETS = {"TransitGatewayId": "--transit-gateway-id", "NatGatewayId": "--nat-gateway-id",
                 "VpcPeeringConnectionId": "--vpc-peering-connection-id",
                 "NetworkInterfaceId": "--network-interface-id",
                 "EgressOnlyInternetGatewayId": "--egress-only-internet-gateway-id",
                 "CarrierGatewayId": "--carrier-gateway-id", "LocalGatewayId": "--local-gateway-id",
                 "CoreNetworkArn": "--core-network-arn", "GatewayId": "--gateway-id"}


def _copy_route(route: dict, region: str) -> str | None:
    """The create-route command re-creating `route` in "$RTB"; None for routes that come by
    themselves (local, propagated) or must not be copied (gateway endpoints, blackholes)."""
    gateway = route.get("GatewayId", "")
    if gateway == "local" or gateway.startswith("vpce-") or route.get("State") == "blackhole" \
            or route.get("Origin") == "EnableVgwRoutePropagation":
        return None
    destination = next(((flag, route[key]) for key, flag in ROUTE_DESTINATIONS.items() if key in route), None)
    target = next(((flag, route[key]) for key, flag in ROUTE_TARGETS.items() if key in route), None)
    if destination is None or target is None:
        return f"# copy by hand: {route}"
    return (f'aws ec2 create-route --region {region} --route-table-id "$RTB" {destination[0]} {destination[1]} '
            f"{target[0]} {target[1]}")


def _modify(site: Site, endpoint: Endpoint, path: str) -> str:
    return (f"aws ec2 modify-vpc-endpoint --region {site.region} --vpc-endpoint-id {endpoint.id} "
            f"--policy-document file://{shlex.quote(path)}")


def _problem(verdict: exposure.Verdict, what: str) -> str | None:
    """The message for a policy that does not keep the promise, or None when it does."""
    if verdict.exposure == exposure.OPEN:
        return f"{what}: {verdict.reason}{_also_denied(verdict)}"
    if verdict.exposure in (exposure.UNJUDGED, exposure.MALFORMED):
        return f"cannot judge {what}: {verdict.reason}{_also_denied(verdict)}"
    if verdict.denied:
        return f"{what} denies what docker needs, so it fails through this endpoint: {', '.join(verdict.denied)}"
    return None


def _also_denied(verdict: exposure.Verdict) -> str:
    return f"; and it denies what docker needs: {', '.join(verdict.denied)}" if verdict.denied else ""


def _unjudged_needs(verdict: exposure.Verdict) -> str:
    if not verdict.unjudged_needs:
        return ""
    return f"; cannot judge whether it allows {', '.join(verdict.unjudged_needs)}"


def ecr_finding(site: Site, endpoint: Endpoint, files: PolicyFiles) -> Finding:
    verdict = exposure.judge_ecr(endpoint.policy, site.region, site.accounts)
    what = f"policy of {endpoint.id}"
    problem = _problem(verdict, what)
    if problem is None:
        return Finding(PASS, endpoint.service, f"{what} keeps it to registries {', '.join(site.accounts)}"
                       + _unjudged_needs(verdict))
    return Finding(WARN, endpoint.service, problem,
                   "\n".join([_modify(site, endpoint, files.path("ecr")), *files.first()]))


def sharing(site: Site, endpoint: Endpoint, tables: dict[str, VpcRouteTable]) -> list[str]:
    """Who else the S3 gateway endpoint's policy applies to; empty when only the proxy's subnet."""
    ours = tables.get(site.route_table_id)
    lines = []
    for rtb in endpoint.route_table_ids:
        if rtb == site.route_table_id:
            continue
        table = tables.get(rtb)
        if table is None:
            users = ""
        elif table.main:
            users = " (the main route table: every subnet without its own)"
        else:
            users = f" ({', '.join(table.subnets)})" if table.subnets else " (no subnets)"
        lines.append(f"{rtb}{users}")
    said = [f"{endpoint.id} is also on {', '.join(lines)}"] if lines else []
    if ours is not None and ours.main:
        said.append(f"{ours.id} is the VPC's main route table: every subnet without its own uses it")
    others = [s for s in (ours.subnets if ours else ()) if s != site.subnet_id]
    if others:
        said.append(f"{site.route_table_id} also serves {', '.join(others)}")
    return said


def dedicated_commands(site: Site, endpoint: Endpoint, tables: dict[str, VpcRouteTable], path: str) -> list[str]:
    """Give the proxy's subnet an S3 gateway endpoint of its own, with the restricted policy."""
    region, ours = site.region, tables.get(site.route_table_id)
    create = (f"aws ec2 create-vpc-endpoint --region {region} --vpc-id {site.vpc_id} --vpc-endpoint-type Gateway "
              f"--service-name com.amazonaws.{region}.s3 --route-table-ids {{rtb}} --policy-document file://{shlex.quote(path)}")
    rtb_shared = ours is None or ours.main or any(s != site.subnet_id for s in ours.subnets)
    if not rtb_shared:
        # The proxy's table is its own: move it from the shared endpoint to a new one. A route
        # table takes one S3 gateway endpoint, so the old one goes first.
        return ["# layer downloads pause between these two: run them together, between builds",
                f"aws ec2 modify-vpc-endpoint --region {region} --vpc-endpoint-id {endpoint.id} "
                f"--remove-route-table-ids {site.route_table_id}",
                create.format(rtb=site.route_table_id)]
    subnet = site.subnet_id or "<the proxy's subnet>"
    lines = [f"# the proxy's subnet must hold only the proxy; if other instances use {subnet}, first make it one: "
             f"aws ec2 create-subnet --region {region} --vpc-id {site.vpc_id} --cidr-block <free CIDR> "
             "--availability-zone <AZ>, and move the proxy there",
             f"RTB=$(aws ec2 create-route-table --region {region} --vpc-id {site.vpc_id} "
             "--query RouteTable.RouteTableId --output text)"]
    for route in (ours.routes if ours else ()):
        command = _copy_route(route, region)
        if command:
            lines.append(command)
    lines += [f'aws ec2 enable-vgw-route-propagation --region {region} --route-table-id "$RTB" --gateway-id {vgw}'
              for vgw in (ours.vgws if ours else ())]
    lines.append(create.format(rtb='"$RTB"'))
    association = dict(ours.associations).get(site.subnet_id or "") if ours else None
    if association:
        lines.append(f'aws ec2 replace-route-table-association --region {region} --association-id {association} '
                     '--route-table-id "$RTB"')
    else:
        lines.append(f'aws ec2 associate-route-table --region {region} --subnet-id {subnet} --route-table-id "$RTB"')
    return lines


def s3_finding(site: Site, endpoint: Endpoint, tables: dict[str, VpcRouteTable], files: PolicyFiles) -> Finding:
    verdict = exposure.judge_s3(endpoint.policy, site.region, site.accounts)
    kind = "gateway" if endpoint.type == "Gateway" else "interface endpoint"
    what = f"policy of {kind} {endpoint.id}"
    problem: str | None
    if verdict.exposure == exposure.OPEN:
        problem = (f"{what} allows more than {LAYER_ACTION} on {layer_arn(site.region)}: {verdict.reason}"
                   + _also_denied(verdict))
    else:
        problem = _problem(verdict, what)
    if problem is None:
        return Finding(PASS, "s3", f"{what} allows only layer downloads from ECR's bucket (and Amazon Linux 2023's "
                       "packages)" + _unjudged_needs(verdict))
    path = files.path("s3")
    shared = sharing(site, endpoint, tables) if endpoint.type == "Gateway" else []
    if not shared:
        return Finding(WARN, "s3", problem, "\n".join([_modify(site, endpoint, path), *files.first()]))
    fix = [
        "the endpoint is shared: " + "; ".join(shared) + ". Its policy applies to all of them: tightened, it "
        "would cut them off every other bucket.",
        *files.first(),
        "Either give the proxy's subnet a route table and S3 gateway endpoint of its own (recommended):",
        *("  " + line for line in dedicated_commands(site, endpoint, tables, path)),
        "or tighten the shared endpoint for every subnet on it:",
        "  " + _modify(site, endpoint, path),
    ]
    return Finding(WARN, "s3", problem, "\n".join(fix))
