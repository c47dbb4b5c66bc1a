"""sniproxy.tools.endpoints: the pure assessment of a VPC's endpoints, which discover renders
and doctor --aws reports, on real-shaped DescribeVpcEndpoints items."""

from __future__ import annotations

import json

from sniproxy.tools import endpoints, model, policy
from tests.tools.test_aws import (
    ACCOUNT,
    REGION,
    RTB_MAIN,
    RTB_SUBNET,
    SUBNET,
    VPC,
    gateway_endpoint,
    interface_endpoint,
    other_endpoint,
)

DKR_REGIONAL = "vpce-0123abcd-uz5j3lr2.dkr.ecr.eu-west-2.vpce.amazonaws.com"
GATEWAY = "vpce-0s3gw000000000000"
# The policies `sniproxy policy` writes for this site: what a well-kept VPC has attached.
ECR_POLICY = json.dumps(policy.ecr_document(REGION, (ACCOUNT,)))
S3_POLICY = json.dumps(policy.s3_document(REGION))


def api(**kw):
    return interface_endpoint("ecr.api", "vpce-0aaa1111bbbb22223", "k2x9q7ma", **{"policy": ECR_POLICY, **kw})


def dkr(**kw):
    return interface_endpoint("ecr.dkr", "vpce-0123abcd", "uz5j3lr2", **{"policy": ECR_POLICY, **kw})


def s3_interface(**kw):
    return interface_endpoint("s3", "vpce-0e5e5e5e5e5e5e5e5", "3fq8c1vh", **{"policy": S3_POLICY, **kw})


def gateway(route_tables, **kw):
    return gateway_endpoint(GATEWAY, route_tables, **{"policy": S3_POLICY, **kw})


def site(**kw) -> model.Site:
    values = dict(region=REGION, vpc_id=VPC, vpc_cidr="10.20.0.0/16", subnet_id=SUBNET,
                  route_table_id=RTB_SUBNET, accounts=(ACCOUNT,), listen=("10.20.1.10",))
    values.update(kw)
    return model.Site(**values)


def plan_for(raw: list[dict], **kw) -> model.Plan:
    return endpoints.assess(site(**kw), endpoints.endpoints_from_api(raw, REGION))


def levels(plan: model.Plan) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for finding in plan.findings:
        out.setdefault(finding.subject, []).append(finding.level)
    return out


def test_healthy_vpc_needs_no_overrides():
    plan = plan_for([api(), dkr(), gateway([RTB_SUBNET, RTB_MAIN]),
                     other_endpoint("vpce-0sts", "sts")])
    assert plan.upstreams == {}
    assert not plan.blocking
    assert levels(plan) == {"ecr.api": ["pass", "pass"], "ecr.dkr": ["pass", "pass"], "s3": ["pass", "pass"]}
    assert [f.message for f in plan.findings if f.message.startswith("policy")] == [
        f"policy of vpce-0aaa1111bbbb22223 keeps it to registries {ACCOUNT}",
        f"policy of vpce-0123abcd keeps it to registries {ACCOUNT}",
        f"policy of gateway {GATEWAY} allows only layer downloads from ECR's bucket (and Amazon Linux 2023's packages)"]


def test_endpoints_from_api_keeps_only_ecr_and_s3_of_the_region():
    raw = [api(), other_endpoint("vpce-0logs", "logs"), other_endpoint("vpce-0ecs", "ecs"),
           dict(dkr(), ServiceName="com.amazonaws.eu-west-1.ecr.dkr")]
    assert [e.id for e in endpoints.endpoints_from_api(raw, REGION)] == ["vpce-0aaa1111bbbb22223"]
    china = dict(dkr(), ServiceName="cn.com.amazonaws.cn-north-1.ecr.dkr")
    assert [e.service for e in endpoints.endpoints_from_api([china], "cn-north-1")] == ["ecr.dkr"]


def test_private_dns_off_sets_the_regional_vpce_name_not_a_zonal_one():
    plan = plan_for([api(), dkr(private_dns=False), gateway([RTB_SUBNET])])
    assert plan.upstreams == {"dkr": DKR_REGIONAL}
    assert not plan.blocking
    finding, _policy = [f for f in plan.findings if f.subject == "ecr.dkr"]
    assert finding.level == "warn"
    assert finding.message == ("private DNS disabled on ecr.dkr (vpce-0123abcd): ECR requires it "
                               "for docker pulls; upstream set to the vpce name")


def test_missing_dkr_endpoint_blocks():
    plan = plan_for([api(), gateway([RTB_SUBNET])])
    assert plan.blocking
    (finding,) = [f for f in plan.findings if f.level == "fail"]
    assert finding.message == (f"no ecr.dkr endpoint in {VPC}: image traffic would leave "
                               "through NAT or IGW")
    assert f"com.amazonaws.{REGION}.ecr.dkr" in finding.fix


def test_endpoint_not_available_blocks():
    plan = plan_for([api(state="pendingAcceptance"), dkr(),
                     gateway([RTB_SUBNET])])
    assert levels(plan)["ecr.api"] == ["fail"]
    assert "is pendingacceptance" in plan.findings[0].message


def test_an_available_duplicate_wins_over_a_failed_one():
    failed = interface_endpoint("ecr.dkr", "vpce-0dead", "aaaa1111", state="failed")
    plan = plan_for([api(), failed, dkr(), gateway([RTB_SUBNET])])
    assert levels(plan)["ecr.dkr"] == ["pass", "pass"]


def test_gateway_not_on_the_proxy_route_table_blocks():
    plan = plan_for([api(), dkr(), gateway([RTB_MAIN])])
    assert plan.blocking
    (finding,) = [f for f in plan.findings if f.subject == "s3"]
    assert finding.message == (f"S3 gateway endpoint {GATEWAY} not associated with "
                               f"{RTB_SUBNET}: layer downloads would bypass it")
    assert finding.fix == (f"aws ec2 modify-vpc-endpoint --vpc-endpoint-id {GATEWAY} "
                           f"--add-route-table-ids {RTB_SUBNET}")


def test_no_s3_endpoint_blocks():
    plan = plan_for([api(), dkr()])
    assert [f.message for f in plan.findings if f.level == "fail"] == [
        f"no S3 endpoint in {VPC}: layer downloads would leave through NAT or IGW"]


def test_s3_interface_without_private_dns_is_dialled_by_its_vpce_name():
    plan = plan_for([api(), dkr(), gateway([RTB_MAIN]),
                     s3_interface(private_dns=False)])
    assert not plan.blocking
    assert plan.upstreams == {"s3": "prod-eu-west-2-starport-layer-bucket.vpce-0e5e5e5e5e5e5e5e5"
                                     "-3fq8c1vh.s3.eu-west-2.vpce.amazonaws.com"}
    assert levels(plan)["s3"] == ["warn", "warn", "pass"]  # the interface's policy is judged


def test_s3_interface_with_inbound_only_private_dns_still_needs_the_vpce_name():
    plan = plan_for([api(), dkr(), s3_interface(inbound_only=True)])
    assert "s3" in plan.upstreams


def test_s3_interface_with_private_dns_needs_nothing():
    plan = plan_for([api(), dkr(), s3_interface()])
    assert plan.upstreams == {} and levels(plan)["s3"] == ["pass", "pass"]


def test_associated_gateway_is_preferred_over_an_interface():
    plan = plan_for([api(), dkr(), gateway([RTB_SUBNET]),
                     s3_interface(private_dns=False)])
    assert plan.upstreams == {} and levels(plan)["s3"] == ["pass", "pass"]
    assert f"gateway {GATEWAY}" in plan.findings[-1].message


def test_unknown_subnet_is_a_warning():
    plan = plan_for([api(), dkr(), gateway([RTB_MAIN])], subnet_id=None,
                    route_table_id=RTB_MAIN)
    assert levels(plan)["subnet"] == ["warn"]
    assert not plan.blocking
