"""sniproxy.tools.discover: the TOML it writes (read back by sniproxy.config),
and `main` end to end against a loopback IMDS server and Stubbed EC2/STS clients."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tomllib

import pytest
from botocore.stub import Stubber

from sniproxy import config as config_mod
from sniproxy.tools import aws, discover, policy
from tests.tools.test_aws import (
    ACCOUNT,
    DEFAULT_GATEWAY_POLICY,
    DEFAULT_INTERFACE_POLICY,
    MAIN_FILTER,
    REGION,
    RTB_MAIN,
    RTB_SUBNET,
    SUBNET,
    SUBNET_FILTER,
    VPC,
    VPC_FILTER,
    identity,
    imds_server,
    instance_data,
    no_aws_env,
    route_table,
    subnet_item,
)
from tests.tools.test_endpoints import (
    DKR_REGIONAL,
    GATEWAY,
    api,
    dkr,
    gateway,
    plan_for,
    s3_interface,
    site,
)

assert no_aws_env  # a fixture, used by name below

SHOW = os.environ.get("SNIPROXY_SHOW_FINDINGS") == "1"  # print the findings tables, for the docs


def test_resolver_is_amazon_dns_and_cidr_base_plus_two():
    assert discover.resolver_addresses("10.20.0.0/16") == ["169.254.169.253", "10.20.0.2"]
    assert discover.resolver_addresses(None) == ["169.254.169.253"]


# --- the TOML and the hosts block ------------------------------------------------------------

def test_generated_config_is_what_sniproxy_loads(tmp_path):
    the_site = site(listen=("10.20.1.10", "10.20.1.11"), accounts=(ACCOUNT, "210987654321"))
    plan = plan_for([api(private_dns=False), dkr(private_dns=False),
                     s3_interface(private_dns=False)])
    text = discover.render_toml(the_site, plan)
    path = tmp_path / "sniproxy.toml"
    path.write_text(text)
    config = config_mod.load(str(path))
    assert [(entry.address, entry.port) for entry in config.listen] == [
        ("10.20.1.10", 443), ("10.20.1.11", 443)]
    assert config.resolver.nameservers == ("169.254.169.253", "10.20.0.2")
    assert (config.metrics.address, config.metrics.port) == ("127.0.0.1", 9464)
    routes = {route.name: route for route in config.routes}
    assert routes["ecr-dkr"].upstream == DKR_REGIONAL
    assert routes["ecr-api"].upstream == ("vpce-0aaa1111bbbb22223-k2x9q7ma.api.ecr.eu-west-2"
                                          ".vpce.amazonaws.com")
    assert routes["ecr-s3"].upstream.endswith(".s3.eu-west-2.vpce.amazonaws.com")
    assert f"210987654321.dkr.ecr.{REGION}.amazonaws.com" in routes["ecr-dkr"].patterns
    assert all(line.startswith("#") or "=" in line or line.startswith("[") or not line
               for line in text.splitlines())


def test_fleet_options_reach_the_config():
    """Behind a load balancer: metrics (and /readyz) on a routable address, a drain delay
    covering the health check, the builders' networks allowed."""
    service = discover.Service(metrics_address="0.0.0.0", drain_delay=20, allow=("10.8.0.0/16", "10.9.0.0/16"),
                               workers="auto")
    config = discover.parse(discover.render_toml(site(), plan_for([api(), dkr(), s3_interface()]), service))
    assert config.server.workers == max(1, len(__import__("os").sched_getaffinity(0)))
    assert discover.parse(discover.render_toml(site(), plan_for([api(), dkr(), s3_interface()]),
                                               discover.Service(workers="3"))).server.workers == 3
    assert config.metrics.address == "0.0.0.0"
    assert config.server.drain_delay == 20.0
    assert config.server.allow == ("10.8.0.0/16", "10.9.0.0/16")
    plain = discover.parse(discover.render_toml(site(), plan_for([api(), dkr(), s3_interface()])))
    assert "[server]" not in discover.render_toml(site(), plan_for([api(), dkr(), s3_interface()]))
    assert plain.server.drain_delay == 0.0 and plain.metrics.address == "127.0.0.1"
    assert all(not entry.proxy_protocol and entry.proxy_from == () for entry in plain.listen)


def test_behind_a_balancer_that_sends_proxy_v2_the_listeners_believe_only_its_subnets():
    service = discover.Service(proxy_from=("10.20.1.0/24", "10.20.2.0/24"))
    config = discover.parse(discover.render_toml(site(listen=("10.20.1.10", "10.20.1.11")),
                                                 plan_for([api(), dkr(), s3_interface()]), service))
    assert [(e.proxy_protocol, e.proxy_from) for e in config.listen] == [(True, ("10.20.1.0/24", "10.20.2.0/24"))] * 2


@pytest.mark.parametrize("flags, message", [
    ({"metrics_address": "localhost"}, "--metrics-address 'localhost': not an IP address"),
    ({"drain_delay": -1.0}, "--drain-delay -1: expected seconds, 0 or more"),
    ({"allow": ["10.8.0.1/16"]}, "--allow '10.8.0.1/16'"),
    ({"workers": "many"}, "--workers 'many': expected auto or a count 1-256"),
    ({"proxy_from": ["10.20.1.9/24"]}, "--proxy-from '10.20.1.9/24'"),
])
def test_bad_fleet_options_are_one_line(flags, message, capsys):
    assert discover.main(namespace(region=REGION, vpc_id=VPC, listen=["10.20.1.50"], **flags),
                         connect=stub_connect([])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err


def test_config_without_overrides_has_no_upstreams_table():
    text = discover.render_toml(site(), plan_for([api(), dkr(), s3_interface()]))
    assert "[ecr.upstreams]" not in text
    assert "upstreams" not in tomllib.loads(text)["ecr"]
    assert all(route.upstream is None for route in discover.parse(text).routes)


def test_hosts_block_points_ecr_names_at_the_first_listener():
    text = discover.render_toml(site(listen=("10.20.1.10", "10.20.1.11")),
                                plan_for([api(), dkr(), s3_interface()]))
    block = discover.hosts_block(discover.parse(text))
    assert f"10.20.1.10\tapi.ecr.{REGION}.amazonaws.com" in block
    assert f"10.20.1.10\t{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com" in block
    assert f"10.20.1.10\tprod-{REGION}-starport-layer-bucket.s3.{REGION}.amazonaws.com" in block
    assert "10.20.1.11" not in block


def test_findings_table_shows_marks_and_fixes():
    table = discover.findings_table(plan_for([api(), gateway([RTB_MAIN])])
                                    .findings)
    lines = table.splitlines()
    assert lines[0].startswith("[ OK  ] ecr.api  vpce-0aaa1111bbbb22223 available")
    assert lines[1].startswith("[ OK  ] ecr.api  policy of vpce-0aaa1111bbbb22223 keeps it")
    assert lines[2].startswith("[BLOCK] ecr.dkr  no ecr.dkr endpoint")
    assert lines[3].strip().startswith("fix: create an interface endpoint")


# --- main, end to end ------------------------------------------------------------------------

def namespace(**kw) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    discover.add_arguments(parser)
    args = parser.parse_args([])
    for key, value in kw.items():
        setattr(args, key, value)
    return args


def stub_connect(ec2_calls, sts_calls=(), stubs=None):
    """A `connect` for main: the real aws.Aws with Stubbers answering in order."""
    def connect(session, region):
        client = aws.Aws(session, region)
        ec2, sts = Stubber(client.ec2), Stubber(client.sts)
        for stub, calls in ((ec2, ec2_calls), (sts, sts_calls)):
            for call in calls:
                method, kind, *rest = call
                getattr(stub, kind)(method, *rest)
            stub.activate()
        if stubs is not None:
            stubs.extend([ec2, sts])
        return client
    return connect


@pytest.fixture
def fake_credentials(no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")


HEALTHY = [
    ("describe_route_tables", "add_response",
     {"RouteTables": [route_table(RTB_SUBNET, subnet=SUBNET)]}, {"Filters": SUBNET_FILTER}),
    ("describe_vpc_endpoints", "add_response",
     {"VpcEndpoints": [api()], "NextToken": "cGFnZTI="}, {"Filters": VPC_FILTER}),
    ("describe_vpc_endpoints", "add_response",
     {"VpcEndpoints": [dkr(private_dns=False), gateway([RTB_SUBNET])]},
     {"Filters": VPC_FILTER, "NextToken": "cGFnZTI="}),
]
CALLER = [("get_caller_identity", "add_response", identity(), {})]


def test_main_from_instance_metadata_writes_a_loadable_config(fake_credentials, monkeypatch,
                                                               tmp_path, capsys):
    out = tmp_path / "sniproxy.toml"
    stubs: list = []
    with imds_server(instance_data()) as (server, url):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
        code = discover.main(namespace(write=str(out)),
                             connect=stub_connect(HEALTHY, CALLER, stubs))
    for stub in stubs:
        stub.assert_no_pending_responses()
    printed = capsys.readouterr()
    assert code == 0, printed
    assert printed.err == ""
    config = config_mod.load(str(out))
    assert [entry.address for entry in config.listen] == ["10.20.1.10", "10.20.1.11",
                                                          "10.20.2.20"]
    assert {r.name: r.upstream for r in config.routes}["ecr-dkr"] == DKR_REGIONAL
    assert f"wrote {out}" in printed.out
    assert "[WARN ] ecr.dkr  private DNS disabled on ecr.dkr" in printed.out
    assert f"10.20.1.10\t{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com" in printed.out


def test_main_flags_without_metadata_print_config_on_stdout(fake_credentials, capsys):
    calls = [("describe_subnets", "add_response", {"Subnets": [subnet_item()]},
              {"SubnetIds": [SUBNET]})] + HEALTHY
    code = discover.main(namespace(region=REGION, subnet_id=SUBNET, listen=["10.20.1.50"],
                                   account=["210987654321"]),
                         connect=stub_connect(calls))
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = tomllib.loads(printed.out)
    assert data["ecr"]["accounts"] == ["210987654321"]
    assert data["listen"] == [{"address": "10.20.1.50", "port": 443}]
    assert data["resolver"]["nameservers"] == ["169.254.169.253"]
    assert "Findings for" in printed.err


def test_main_write_keeps_the_previous_file(fake_credentials, tmp_path, capsys):
    out = tmp_path / "sniproxy.toml"
    out.write_text("# the operator's edits\n")
    code = discover.main(namespace(region=REGION, vpc_id=VPC, subnet_id=None,
                                   listen=["10.20.1.50"], account=[ACCOUNT], write=str(out)),
                         connect=stub_connect([
                             ("describe_route_tables", "add_response",
                              {"RouteTables": [route_table(RTB_MAIN, main=True)]},
                              {"Filters": MAIN_FILTER}),
                             ("describe_vpc_endpoints", "add_response",
                              {"VpcEndpoints": [api(), dkr(), s3_interface()]},
                              {"Filters": VPC_FILTER}),
                         ]))
    assert code == 0, capsys.readouterr()
    assert (tmp_path / "sniproxy.toml.bak").read_text() == "# the operator's edits\n"
    assert "[[listen]]" in out.read_text()


def test_main_exits_one_on_a_blocking_finding(fake_credentials, capsys):
    calls = [("describe_subnets", "add_response", {"Subnets": [subnet_item()]},
              {"SubnetIds": [SUBNET]}),
             HEALTHY[0], ("describe_vpc_endpoints", "add_response",
                          {"VpcEndpoints": [api()]}, {"Filters": VPC_FILTER})]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, subnet_id=SUBNET,
                                   listen=["10.20.1.50"], account=[ACCOUNT]),
                         connect=stub_connect(calls))
    printed = capsys.readouterr()
    assert code == 1
    assert "[BLOCK] ecr.dkr  no ecr.dkr endpoint" in printed.err
    assert "[BLOCK] s3" in printed.err
    config_mod.from_dict(tomllib.loads(printed.out))  # still a usable config


def one_line_error(capsys) -> str:
    printed = capsys.readouterr()
    assert printed.out == ""
    lines = printed.err.splitlines()
    assert len(lines) == 1, printed.err
    assert "Traceback" not in printed.err
    return lines[0]


def test_main_access_denied_is_one_line(fake_credentials, capsys):
    calls = [("describe_route_tables", "add_client_error", "UnauthorizedOperation",
              "You are not authorized to perform this operation.", 403)]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, listen=["10.20.1.50"],
                                   account=[ACCOUNT]), connect=stub_connect(calls))
    assert code == 2
    assert one_line_error(capsys) == ("discover: error: access denied: the IAM policy lacks "
                                      "ec2:DescribeRouteTables (see the IAM policy for discover "
                                      "in docs/aws.md)")


def test_main_without_credentials_is_one_line(no_aws_env, capsys):
    code = discover.main(namespace(region=REGION, vpc_id=VPC, listen=["10.20.1.50"]))
    assert code == 2
    assert one_line_error(capsys).startswith("discover: error: no AWS credentials found:")


@pytest.mark.parametrize("flags, message", [
    (dict(region="eu-west-9", vpc_id=VPC), "region 'eu-west-9' not found"),
    (dict(vpc_id=VPC), "no region: pass --region"),
    (dict(region=REGION), "no VPC: pass --vpc-id or --subnet-id"),
    (dict(region=REGION, vpc_id=VPC, listen=["10.20.1"]), "--listen '10.20.1': not an IP"),
    (dict(region=REGION, vpc_id=VPC, account=["12345"]), "--account '12345': an account ID has"),
], ids=["unknown-region", "no-region", "no-vpc", "bad-listen", "bad-account"])
def test_main_bad_input_is_one_line(fake_credentials, capsys, flags, message):
    code = discover.main(namespace(**flags), connect=stub_connect([]))
    assert code == 2
    line = one_line_error(capsys)
    assert line.startswith("discover: error: ") and message in line


def test_main_subnet_outside_the_vpc_is_one_line(fake_credentials, capsys):
    calls = [("describe_subnets", "add_response",
              {"Subnets": [subnet_item(vpc="vpc-0ffffffffffffffff")]}, {"SubnetIds": [SUBNET]})]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, subnet_id=SUBNET,
                                   listen=["10.20.1.50"], account=[ACCOUNT]),
                         connect=stub_connect(calls))
    assert code == 2
    assert one_line_error(capsys) == (f"discover: error: subnet {SUBNET} is in "
                                      f"vpc-0ffffffffffffffff, not in {VPC}")


def test_main_unwritable_file_is_one_line(fake_credentials, capsys, tmp_path):
    calls = [("describe_route_tables", "add_response",
              {"RouteTables": [route_table(RTB_MAIN, main=True)]}, {"Filters": MAIN_FILTER}),
             ("describe_vpc_endpoints", "add_response", {"VpcEndpoints": []},
              {"Filters": VPC_FILTER})]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, listen=["10.20.1.50"],
                                   account=[ACCOUNT], write=str(tmp_path / "no" / "x.toml")),
                         connect=stub_connect(calls))
    assert code == 2
    assert one_line_error(capsys).startswith(f"discover: error: cannot write {tmp_path}/no/x")


def test_main_ignores_metadata_of_another_region(fake_credentials, monkeypatch, capsys):
    with imds_server(instance_data(region="eu-west-1")) as (server, url):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
        code = discover.main(namespace(region=REGION), connect=stub_connect([]))
    assert code == 2
    assert "no VPC: pass --vpc-id" in one_line_error(capsys)


# --- main: endpoint policies ------------------------------------------------------------------

RTB_B, RTB_C = "rtb-0bbbbbbbbbbbbbbbb", "rtb-0cccccccccccccccc"


def default_policy_calls(gateway_tables: list[str]) -> list:
    """A VPC whose endpoints all keep AWS's default full-access policy; the S3 gateway endpoint
    is on the proxy's route table and on `gateway_tables` besides."""
    calls = [
        ("describe_route_tables", "add_response",
         {"RouteTables": [route_table(RTB_SUBNET, subnet=SUBNET, on_prem=True)]}, {"Filters": SUBNET_FILTER}),
        ("describe_vpc_endpoints", "add_response",
         {"VpcEndpoints": [api(policy=DEFAULT_INTERFACE_POLICY), dkr(policy=DEFAULT_INTERFACE_POLICY),
                           gateway([RTB_SUBNET, *gateway_tables], policy=DEFAULT_GATEWAY_POLICY)]},
         {"Filters": VPC_FILTER}),
    ]
    if gateway_tables:
        calls.append(("describe_route_tables", "add_response",
                      {"RouteTables": [route_table(RTB_B, subnets=("subnet-0b1b1b1b1b1b1b1b1", "subnet-0b2b2b2b2b2b2b2b2")),
                                       route_table(RTB_C, main=True)]},
                      {"Filters": [{"Name": "route-table-id", "Values": gateway_tables}]}))
    return calls


def run_discover(capsys, calls, **flags) -> tuple[int, str]:
    stubs: list = []
    args = dict(region=REGION, vpc_id=VPC, subnet_id=None, listen=["10.20.1.10"], account=[ACCOUNT])
    args.update(flags)
    code = discover.main(namespace(**args), connect=stub_connect(calls, stubs=stubs))
    for stub in stubs:
        stub.assert_no_pending_responses()
    printed = capsys.readouterr()
    return code, printed.err if not flags.get("write") else printed.out


@pytest.fixture
def on_the_instance(fake_credentials, monkeypatch):
    with imds_server(instance_data()) as (_, url):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
        yield


def test_main_default_policies(on_the_instance, capsys):
    code, report = run_discover(capsys, default_policy_calls([]), vpc_id=None)
    assert code == 0, report  # warnings: the proxy works, the endpoints just do not enforce the routes
    findings = report[report.index("Findings for"):report.index("/etc/hosts block")]
    assert "[WARN ] ecr.api  policy of vpce-0aaa1111bbbb22223: statement 1" in findings
    assert "[WARN ] ecr.dkr  policy of vpce-0123abcd: statement 1" in findings
    assert f"[WARN ] s3       policy of gateway {GATEWAY} allows more than s3:GetObject" in findings
    assert ("fix: aws ec2 modify-vpc-endpoint --region eu-west-2 --vpc-endpoint-id vpce-0123abcd "
            "--policy-document file://sniproxy-policies/ecr-endpoints.json") in findings
    assert "first write the policies: sniproxy policy --config FILE --out sniproxy-policies" in findings
    if SHOW:
        print(findings, file=sys.__stdout__)


def test_main_gateway_shared_by_three_route_tables_writes_policies(on_the_instance, capsys, tmp_path):
    out = tmp_path / "policies"
    code, report = run_discover(capsys, default_policy_calls([RTB_B, RTB_C]), vpc_id=None, policies=str(out))
    assert code == 0, report
    assert json.loads((out / "s3-gateway.json").read_text()) == policy.s3_document(REGION)
    assert json.loads((out / "ecr-endpoints.json").read_text()) == policy.ecr_document(REGION, (ACCOUNT,))
    findings = report[report.index("Findings for"):report.index("/etc/hosts block")]
    assert (f"fix: the endpoint is shared: {GATEWAY} is also on {RTB_B} (subnet-0b1b1b1b1b1b1b1b1, subnet-0b2b2b2b2b2b2b2b2), {RTB_C} "
            "(the main route table: every subnet without its own)") in findings
    assert f"--remove-route-table-ids {RTB_SUBNET}" in findings
    assert f"--policy-document file://{out}/s3-gateway.json" in findings
    assert "first write the policies" not in findings
    if SHOW:
        print(findings, file=sys.__stdout__)


def test_main_access_denied_on_the_gateway_route_tables_is_one_line(fake_credentials, capsys):
    calls = default_policy_calls([RTB_B])[:2] + [
        ("describe_route_tables", "add_client_error", "UnauthorizedOperation",
         "You are not authorized to perform this operation.", 403)]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, subnet_id=SUBNET, listen=["10.20.1.50"],
                                   account=[ACCOUNT]),
                         connect=stub_connect([("describe_subnets", "add_response", {"Subnets": [subnet_item()]},
                                                {"SubnetIds": [SUBNET]})] + calls))
    assert code == 2
    assert one_line_error(capsys) == ("discover: error: access denied: the IAM policy lacks ec2:DescribeRouteTables "
                                      "(see the IAM policy for discover in docs/aws.md)")


def test_main_unwritable_policies_directory_is_one_line(fake_credentials, capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    calls = [("describe_route_tables", "add_response", {"RouteTables": [route_table(RTB_MAIN, main=True)]},
              {"Filters": MAIN_FILTER}),
             ("describe_vpc_endpoints", "add_response", {"VpcEndpoints": []}, {"Filters": VPC_FILTER})]
    code = discover.main(namespace(region=REGION, vpc_id=VPC, listen=["10.20.1.50"], account=[ACCOUNT],
                                   policies=str(blocker / "policies")), connect=stub_connect(calls))
    assert code == 2
    assert one_line_error(capsys).startswith(f"discover: error: cannot write {blocker}/policies: ")


# --- --offline: the config from flags and instance metadata, no AWS call ------------------------

def no_aws_call(session, region):
    """A `connect` whose client fails any call: --offline must make none."""
    client = aws.Aws(session, region)
    for stub in (Stubber(client.ec2), Stubber(client.sts)):
        stub.activate()  # no responses queued: any call raises
    return client


def test_offline_writes_the_config_from_metadata_and_flags_without_credentials(no_aws_env, monkeypatch,
                                                                                tmp_path, capsys):
    """What a fleet instance runs at boot in a VPC without an EC2 endpoint: IMDS (link-local,
    always reachable) gives the addresses and the VPC's CIDR, the flags give the rest."""
    out = tmp_path / "sniproxy.toml"
    with imds_server(instance_data()) as (server, url):
        monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", url)
        code = discover.main(namespace(offline=True, region=REGION, account=[ACCOUNT, "210987654321"],
                                       write=str(out), metrics_address="0.0.0.0", drain_delay=70.0,
                                       allow=["10.8.0.0/16"], workers="auto"),
                             connect=no_aws_call)
    printed = capsys.readouterr()
    assert code == 0, printed
    assert server.log[0] == ("PUT", "/latest/api/token")
    config = config_mod.load(str(out))
    assert [entry.address for entry in config.listen] == ["10.20.1.10", "10.20.1.11", "10.20.2.20"]
    assert config.resolver.nameservers == ("169.254.169.253", "10.20.0.2")
    assert {r.name: r.upstream for r in config.routes} == {"ecr-api": None, "ecr-dkr": None, "ecr-s3": None}
    assert f"{ACCOUNT}.dkr.ecr.{REGION}.amazonaws.com" in {p for r in config.routes for p in r.patterns}
    assert (config.server.drain_delay, config.server.allow) == (70.0, ("10.8.0.0/16",))
    assert "--offline" in out.read_text().splitlines()[1]
    assert "[WARN ] endpoints  not checked: --offline makes no AWS call" in printed.out


def test_offline_without_metadata_takes_listen_and_region_from_flags(no_aws_env, capsys):
    code = discover.main(namespace(offline=True, region=REGION, vpc_id=VPC, account=[ACCOUNT], listen=["10.20.1.50"]),
                         connect=no_aws_call)
    printed = capsys.readouterr()
    assert code == 0, printed.err
    data = tomllib.loads(printed.out)
    assert data["listen"] == [{"address": "10.20.1.50", "port": 443}]
    assert data["resolver"]["nameservers"] == ["169.254.169.253"]


@pytest.mark.parametrize("flags, message", [
    ({}, "--offline needs --account"),
    ({"account": [ACCOUNT], "subnet_id": SUBNET}, "--offline takes no --subnet-id"),
    ({"account": [ACCOUNT], "listen": []}, "no listen address"),
])
def test_offline_bad_input_is_one_line(no_aws_env, capsys, flags, message):
    args = {"offline": True, "region": REGION, "vpc_id": VPC, "listen": ["10.20.1.50"], **flags}
    assert discover.main(namespace(**args), connect=no_aws_call) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
