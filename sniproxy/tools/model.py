"""What the setup-time tools know about the proxy's VPC: plain data, read from AWS by `aws`,
judged by `endpoints` and `policy_findings`, rendered by `discover` and `doctor`."""

from __future__ import annotations

import dataclasses
import os
import re

from sniproxy.tools.findings import FAIL, Finding
from sniproxy.tools.policy import DEFAULT_OUT, FILES

# Regional vpce names: "vpce-<hex>-<id>.<service>..."; zonal names add "-<az>" after the id.
_REGIONAL = re.compile(r"^(\*\.)?vpce-[0-9a-f]+-[0-9a-z]+\.")


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
        return any(f.level == FAIL for f in self.findings)


@dataclasses.dataclass(frozen=True)
class VpcRouteTable:
    """A VPC route table (not the proxy's SNI routes), reduced to who uses it and what it routes."""

    id: str
    main: bool
    """The VPC's main table: every subnet without a table of its own uses it."""
    associations: tuple[tuple[str, str], ...] = ()
    """(subnet id, association id) of the subnets explicitly associated with it."""
    routes: tuple[dict, ...] = ()
    vgws: tuple[str, ...] = ()
    """Virtual private gateways propagating routes into it."""

    @property
    def subnets(self) -> tuple[str, ...]:
        return tuple(subnet for subnet, _ in self.associations)

    @classmethod
    def from_api(cls, item: dict) -> VpcRouteTable:
        associations = [a for a in item.get("Associations", [])
                        if a.get("AssociationState", {}).get("State", "associated") == "associated"]
        return cls(
            id=item["RouteTableId"],
            main=any(a.get("Main") for a in associations),
            associations=tuple((a["SubnetId"], a.get("RouteTableAssociationId", ""))
                               for a in associations if a.get("SubnetId")),
            routes=tuple(item.get("Routes", [])),
            vgws=tuple(v["GatewayId"] for v in item.get("PropagatingVgws", []) if "GatewayId" in v),
        )


@dataclasses.dataclass(frozen=True)
class PolicyFiles:
    """Where the generated policies are (or would be written), for the fix commands."""

    directory: str = DEFAULT_OUT
    written: bool = False
    config: str = "FILE"
    """The config `sniproxy policy` would read them from, when they are not written yet."""

    def path(self, kind: str) -> str:
        return os.path.join(self.directory, FILES[kind])

    def first(self) -> list[str]:
        if self.written:
            return []
        return [f"first write the policies: sniproxy policy --config {self.config} --out {self.directory}"]
