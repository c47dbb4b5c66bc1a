"""Where the proxy runs, read from instance metadata and read-only AWS calls: the region, VPC
and subnet, and the endpoints and route tables there. `discover` and `doctor --aws` share it."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import boto3

from sniproxy.errors import UsageError
from sniproxy.tools import aws
from sniproxy.tools.endpoints import endpoints_from_api, s3_gateway
from sniproxy.tools.model import Endpoint, VpcRouteTable

#: Builds the client for a session and region; tests pass one with botocore Stubbers.
Connect = Callable[[boto3.Session, str], aws.Aws]


@dataclasses.dataclass(frozen=True)
class Location:
    """Where the proxy runs, as far as flags and instance metadata tell."""

    client: aws.Aws
    """The client for the region."""
    region: str
    vpc_id: str
    subnet_id: str | None
    interfaces: tuple
    """This instance's `aws.Interface`s in that VPC (none when not run on it)."""


def locate(*, profile: str | None = None, region: str | None = None, vpc_id: str | None = None,
           subnet_id: str | None = None, connect: Connect | None = None) -> Location:
    """Region (`region`, else instance metadata, else the AWS config), VPC and subnet
    (`vpc_id`, `subnet_id`, else metadata), and a client for them."""
    session = aws.session(profile)
    metadata = aws.Imds(aws.imds_endpoint(profile)).fetch()
    region = region or (metadata and metadata.region) or session.region_name
    if not region:
        raise UsageError("no region: pass --region (instance metadata is unavailable and the "
                         "AWS config names none)")
    aws.check_region(session, region)
    if metadata is not None and metadata.region != region:
        metadata = None  # this instance lives elsewhere: its VPC and IPs do not apply
    client = (connect or aws.Aws)(session, region)

    if subnet_id:
        subnet_vpc = client.subnet(subnet_id).get("VpcId")
        if vpc_id and subnet_vpc != vpc_id:
            raise UsageError(f"subnet {subnet_id} is in {subnet_vpc}, not in {vpc_id}")
        vpc_id = subnet_vpc
    if not vpc_id and metadata is not None and metadata.primary is not None:
        vpc_id = metadata.primary.vpc_id
    if not vpc_id:
        raise UsageError("no VPC: pass --vpc-id or --subnet-id (instance metadata is "
                         "unavailable)")
    local = tuple(i for i in (metadata.interfaces if metadata else ()) if i.vpc_id == vpc_id)
    subnet_id = subnet_id or (local[0].subnet_id if local else None)
    return Location(client, region, vpc_id, subnet_id, local)


def survey(where: Location) -> tuple[str, list[Endpoint], dict[str, VpcRouteTable]]:
    """The proxy subnet's route table id, the VPC's ECR/S3 endpoints, and the route tables the
    S3 gateway endpoint of that table is on (its policy covers all of them)."""
    route_table = where.client.route_table(where.vpc_id, where.subnet_id)
    rtb = route_table["RouteTableId"]
    endpoints = endpoints_from_api(where.client.vpc_endpoints(where.vpc_id), where.region)
    tables = {rtb: VpcRouteTable.from_api(route_table)}
    gateway = s3_gateway(rtb, [e for e in endpoints if e.service == "s3"])
    others = [t for t in (gateway.route_table_ids if gateway else ()) if t != rtb]
    if rtb in (gateway.route_table_ids if gateway else ()) and others:
        tables.update((t["RouteTableId"], VpcRouteTable.from_api(t)) for t in where.client.route_tables(others))
    return rtb, endpoints, tables


