"""sniproxy.tools.policy_findings, through endpoints.assess: what the findings say about each
endpoint's policy, and the fix commands, for real-shaped endpoints and route tables."""

from __future__ import annotations

import dataclasses
import json

from sniproxy.tools import endpoints, model, policy
from sniproxy.tools.findings import Finding
from sniproxy.tools.model import PolicyFiles, VpcRouteTable
from tests.tools.test_aws import (
    ACCOUNT,
    DEFAULT_GATEWAY_POLICY,
    DEFAULT_INTERFACE_POLICY,
    REGION,
    RTB_MAIN,
    RTB_SUBNET,
    SUBNET,
    VPC,
    interface_endpoint,
    route_table,
)
from tests.tools.test_endpoints import ECR_POLICY, GATEWAY, S3_POLICY, api, dkr, gateway, s3_interface, site

RTB_B, RTB_C = "rtb-0bbbbbbbbbbbbbbbb", "rtb-0cccccccccccccccc"
S3_FIX = (f"aws ec2 modify-vpc-endpoint --region {REGION} --vpc-endpoint-id {GATEWAY} "
          "--policy-document file://sniproxy-policies/s3-gateway.json")
FIRST = "first write the policies: sniproxy policy --config FILE --out sniproxy-policies"


def tables(*items: dict) -> dict[str, VpcRouteTable]:
    return {item["RouteTableId"]: VpcRouteTable.from_api(item) for item in items}


def assess(raw: list[dict], tables_: dict[str, VpcRouteTable] | None = None, files: PolicyFiles | None = None, **kw):
    return endpoints.assess(site(**kw), endpoints.endpoints_from_api(raw, REGION), tables_, files)


def policy_lines(plan: model.Plan) -> list[Finding]:
    return [f for f in plan.findings if "policy of" in f.message]


def test_default_policies_everywhere():
    plan = assess([api(policy=DEFAULT_INTERFACE_POLICY), dkr(policy=policy.render(policy.ecr_document(REGION, (ACCOUNT,)))),
                   gateway([RTB_SUBNET], policy=DEFAULT_GATEWAY_POLICY)],
                  tables(route_table(RTB_SUBNET, subnet=SUBNET)))
    api_finding, dkr_finding, s3_finding = policy_lines(plan)
    assert (api_finding.level, dkr_finding.level, s3_finding.level) == ("warn", "pass", "warn")
    assert api_finding.message == ('policy of vpce-0aaa1111bbbb22223: statement 1 (Allow Action "*" on Resource "*") '
                                   f"lets builders push to and pull from repositories of accounts other than {ACCOUNT}")
    assert api_finding.fix.splitlines() == [
        f"aws ec2 modify-vpc-endpoint --region {REGION} --vpc-endpoint-id vpce-0aaa1111bbbb22223 "
        "--policy-document file://sniproxy-policies/ecr-endpoints.json", FIRST]
    assert s3_finding.message == (f"policy of gateway {GATEWAY} allows more than s3:GetObject on arn:aws:s3:::"
                                  'prod-eu-west-2-starport-layer-bucket/*: statement 1 (Allow Action "*" on Resource "*") '
                                  "allows s3:PutObject, s3:GetObject, s3:DeleteObject and 3 more on other buckets")
    assert s3_finding.fix.splitlines() == [S3_FIX, FIRST]  # the proxy's table alone uses it
    assert not plan.blocking


def test_policy_files_already_written_need_no_first_step():
    plan = assess([api(policy="{}"), dkr(), gateway([RTB_SUBNET])], tables(route_table(RTB_SUBNET, subnet=SUBNET)),
                  PolicyFiles("/etc/sniproxy/policies", written=True))
    (finding,) = [f for f in policy_lines(plan) if f.level == "warn"]
    assert finding.message == "cannot judge policy of vpce-0aaa1111bbbb22223: no Statement"
    assert finding.fix == (f"aws ec2 modify-vpc-endpoint --region {REGION} --vpc-endpoint-id vpce-0aaa1111bbbb22223 "
                           "--policy-document file:///etc/sniproxy/policies/ecr-endpoints.json")


def test_malformed_policy_is_one_line():
    plan = assess([api(policy='{"Statement": [{"Effect": "Allow"'), dkr(), gateway([RTB_SUBNET])],
                  tables(route_table(RTB_SUBNET, subnet=SUBNET)))
    (finding,) = [f for f in policy_lines(plan) if f.level == "warn"]
    assert finding.message == ("cannot judge policy of vpce-0aaa1111bbbb22223: not valid JSON (Expecting ',' "
                               "delimiter at line 1 column 34)")


def test_wrong_account_says_what_docker_loses():
    other = json.dumps(policy.ecr_document(REGION, ("999999999999",)))
    plan = assess([api(), dkr(policy=other), gateway([RTB_SUBNET])], tables(route_table(RTB_SUBNET, subnet=SUBNET)))
    (finding,) = [f for f in policy_lines(plan) if f.level == "warn"]
    assert finding.subject == "ecr.dkr"
    assert finding.message.startswith('policy of vpce-0123abcd: statement 2 ("SniproxyPushPullRoutedRegistries")')
    assert finding.message.endswith(f"; and it denies what docker needs: ecr:BatchCheckLayerAvailability on {ACCOUNT}, "
                                    + ", ".join(f"{a} on {ACCOUNT}" for a in policy.REPOSITORY_ACTIONS[1:]))
    pull_only = json.dumps({"Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Effect": "Allow", "Principal": "*", "Action": list(policy.PULL_ACTIONS),
         "Resource": policy.repository_arns(REGION, (ACCOUNT,))}]})
    plan = assess([api(), dkr(policy=pull_only), gateway([RTB_SUBNET])], tables(route_table(RTB_SUBNET, subnet=SUBNET)))
    (finding,) = [f for f in policy_lines(plan) if f.level == "warn"]
    assert finding.message == ("policy of vpce-0123abcd denies what docker needs, so it fails through this endpoint: "
                               + ", ".join(f"{a} on {ACCOUNT}" for a in sorted(policy.PUSH_ACTIONS)))


def test_deny_with_a_condition_is_judged():
    perimeter = json.dumps({"Statement": [
        {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*"},
        {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*",
         "Condition": {"StringNotEqualsIfExists": {"aws:ResourceAccount": [ACCOUNT]}}}]})
    plan = assess([api(policy=perimeter), dkr(), gateway([RTB_SUBNET], policy=perimeter)],
                  tables(route_table(RTB_SUBNET, subnet=SUBNET)))
    api_finding, _, s3_finding = policy_lines(plan)
    assert api_finding.level == "pass"
    assert api_finding.message == (f"policy of vpce-0aaa1111bbbb22223 keeps it to registries {ACCOUNT}; cannot judge "
                                   "whether it allows ecr:GetAuthorizationToken (docker login)")
    assert s3_finding.level == "warn"  # your own other buckets stay open, and ECR's bucket is not yours
    assert s3_finding.message.endswith("allows s3:PutObject, s3:GetObject, s3:DeleteObject and 3 more on other buckets; "
                                       "and it denies what docker needs: s3:GetObject on "
                                       "arn:aws:s3:::prod-eu-west-2-starport-layer-bucket/*")


def test_gateway_shared_by_three_route_tables():
    """The proxy's table is its own, but the gateway endpoint is also on two others: move the
    proxy's table to an endpoint of its own, or tighten the shared one for everybody."""
    plan = assess([api(), dkr(), gateway([RTB_B, RTB_SUBNET, RTB_C], policy=DEFAULT_GATEWAY_POLICY)],
                  tables(route_table(RTB_SUBNET, subnet=SUBNET), route_table(RTB_B, subnets=("subnet-0b1", "subnet-0b2")),
                         route_table(RTB_C, main=True)))
    (finding,) = [f for f in policy_lines(plan) if f.subject == "s3"]
    assert finding.level == "warn"
    assert finding.fix.splitlines() == [
        f"the endpoint is shared: {GATEWAY} is also on {RTB_B} (subnet-0b1, subnet-0b2), {RTB_C} (the main route "
        "table: every subnet without its own). Its policy applies to all of them: tightened, it would cut them off "
        "every other bucket.",
        FIRST,
        "Either give the proxy's subnet a route table and S3 gateway endpoint of its own (recommended):",
        "  # layer downloads pause between these two: run them together, between builds",
        f"  aws ec2 modify-vpc-endpoint --region {REGION} --vpc-endpoint-id {GATEWAY} --remove-route-table-ids {RTB_SUBNET}",
        f"  aws ec2 create-vpc-endpoint --region {REGION} --vpc-id {VPC} --vpc-endpoint-type Gateway --service-name "
        f"com.amazonaws.{REGION}.s3 --route-table-ids {RTB_SUBNET} --policy-document file://sniproxy-policies/s3-gateway.json",
        "or tighten the shared endpoint for every subnet on it:",
        "  " + S3_FIX,
    ]


def test_proxy_route_table_shared_with_other_subnets_gets_a_new_one_with_the_same_routes():
    plan = assess([api(), dkr(), gateway([RTB_SUBNET], policy='{"Statement":[{"Effect":"Allow","Principal":"*",'
                                                               '"Action":"s3:*","Resource":"*"}]}')],
                  tables(route_table(RTB_SUBNET, subnet=SUBNET, subnets=("subnet-0d1",), on_prem=True)))
    (finding,) = [f for f in policy_lines(plan) if f.subject == "s3"]
    lines = finding.fix.splitlines()
    assert lines[0].startswith(f"the endpoint is shared: {RTB_SUBNET} also serves subnet-0d1. Its policy applies")
    commands = [line.strip() for line in lines[3:-2]]
    assert commands[0].startswith(f"# the proxy's subnet must hold only the proxy; if other instances use {SUBNET}")
    assert commands[1:] == [
        f"RTB=$(aws ec2 create-route-table --region {REGION} --vpc-id {VPC} --query RouteTable.RouteTableId --output text)",
        f'aws ec2 create-route --region {REGION} --route-table-id "$RTB" --destination-cidr-block 10.8.0.0/16 '
        "--transit-gateway-id tgw-0123456789abcdef0",
        f'aws ec2 enable-vgw-route-propagation --region {REGION} --route-table-id "$RTB" --gateway-id vgw-0fedcba987654321f',
        f"aws ec2 create-vpc-endpoint --region {REGION} --vpc-id {VPC} --vpc-endpoint-type Gateway --service-name "
        f'com.amazonaws.{REGION}.s3 --route-table-ids "$RTB" --policy-document file://sniproxy-policies/s3-gateway.json',
        f"aws ec2 replace-route-table-association --region {REGION} --association-id rtbassoc-00{SUBNET[-15:]} "
        '--route-table-id "$RTB"',
    ]


def test_proxy_on_the_main_route_table_associates_its_subnet_with_the_new_one():
    plan = assess([api(), dkr(), gateway([RTB_MAIN], policy=DEFAULT_GATEWAY_POLICY)],
                  tables(route_table(RTB_MAIN, main=True)), route_table_id=RTB_MAIN)
    (finding,) = [f for f in policy_lines(plan) if f.subject == "s3"]
    assert finding.fix.splitlines()[0] == (f"the endpoint is shared: {RTB_MAIN} is the VPC's main route table: every "
                                           "subnet without its own uses it. Its policy applies to all of them: tightened, "
                                           "it would cut them off every other bucket.")
    assert finding.fix.splitlines()[-3].strip() == (f"aws ec2 associate-route-table --region {REGION} --subnet-id "
                                                    f'{SUBNET} --route-table-id "$RTB"')


def test_the_gateway_on_the_proxy_table_is_the_one_judged():
    """A VPC may have several S3 gateway endpoints on different route tables."""
    shared = endpoints.endpoints_from_api([gateway([RTB_MAIN], policy=DEFAULT_GATEWAY_POLICY)], REGION)[0]
    own = endpoints.endpoints_from_api([gateway([RTB_SUBNET])], REGION)[0]
    own = dataclasses.replace(own, id="vpce-0zzzzzzzzzzzzzzzz")
    plan = endpoints.assess(site(), [endpoints.endpoints_from_api([api()], REGION)[0],
                                    endpoints.endpoints_from_api([dkr()], REGION)[0], shared, own])
    assert [f.level for f in plan.findings if f.subject == "s3"] == ["pass", "pass"]
    assert "vpce-0zzzzzzzzzzzzzzzz" in plan.findings[-1].message


def test_s3_interface_endpoint_policy_is_judged_without_sharing():
    plan = assess([api(), dkr(), s3_interface(policy=DEFAULT_INTERFACE_POLICY)])
    (finding,) = [f for f in policy_lines(plan) if f.subject == "s3"]
    assert finding.message.startswith("policy of interface endpoint vpce-0e5e5e5e5e5e5e5e5 allows more than")
    assert finding.fix.splitlines()[0].startswith("aws ec2 modify-vpc-endpoint")


def test_unavailable_or_missing_endpoints_have_no_policy_finding():
    pending = interface_endpoint("ecr.dkr", "vpce-0123abcd", "uz5j3lr2", state="pending", policy=ECR_POLICY)
    plan = assess([pending, gateway([RTB_MAIN], policy=S3_POLICY)])
    assert policy_lines(plan) == []
    assert plan.blocking
