"""deploy/sniproxy-fleet.yaml: lint-clean, and what it deploys agrees with sniproxy's code.

moto cannot deploy it (moto builds an application balancer for an NLB and then refuses the
TCP listener), so the template is read with cfn-lint's decoder and evaluated for given
parameters by tests/deploy/cfn.py. The user data is then rehearsed under bash, with the
operating system and AWS replaced by stubs and sniproxy's own argument parsers and config
writer behind `sniproxy discover` and `sniproxy doctor`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cfnlint.api import ManualArgs, lint_file

from sniproxy import config as config_mod
from sniproxy.config import Listen, MetricsConfig, ServerConfig
from sniproxy.observe.http import READY_PATH
from sniproxy.tools import discover, model
from sniproxy.tools.hosts import hosts_lines
from tests.helpers import REPO

from .cfn import Stack, load

TEMPLATE = REPO / "deploy" / "sniproxy-fleet.yaml"
LISTEN_PORT = config_mod.default(Listen, "port")
METRICS_PORT = config_mod.default(MetricsConfig, "port")
INSTANCE_IP = "10.0.1.57"  # what instance metadata would give discover on one instance
USER_DATA_LIMIT = 16 * 1024  # EC2's limit, before base64
TEMPLATE_BODY_LIMIT = 51_200  # larger templates need an S3 bucket to deploy

REQUIRED = {
    "VpcId": "vpc-0a1b2c3d4e5f60718",
    "SubnetA": "subnet-0aaaa1111bbbb2222",
    "SubnetB": "subnet-0cccc3333dddd4444",
    "AddressA": "10.0.1.10",
    "AddressB": "10.0.2.10",
    "BuilderCidr1": "10.8.0.0/16",
    "SniproxyPackage": "https://artifacts.example.com/sniproxy-0.1.0-py3-none-any.whl",
}
EVERYTHING = {
    **REQUIRED,
    "BuilderCidr2": "10.9.0.0/16",
    "BuilderCidr3": "192.168.40.0/24",
    "PrometheusCidr": "10.0.9.0/24",
    "PipIndexUrl": "https://pypi.example.com/simple",
    "CreateEndpoints": "true",
    "EndpointRouteTableIds": "rtb-0aaaabbbbccccdddd,rtb-0eeeeffff00001111",
}


@pytest.fixture(scope="module")
def template() -> dict:
    return load(TEMPLATE)


@pytest.fixture
def stack(template) -> Stack:
    return Stack(template, REQUIRED)


def user_data(stack: Stack) -> str:
    return stack.one("AWS::EC2::LaunchTemplate")["LaunchTemplateData"]["UserData"]


def attributes(properties: dict, key: str) -> dict[str, str]:
    return {a["Key"]: a["Value"] for a in properties[key]}


def test_cfn_lint_reports_nothing():
    args = ManualArgs(regions=["us-east-1", "eu-west-2", "ap-southeast-1"], include_checks=["I"])
    findings = [str(match) for match in lint_file(TEMPLATE, args)]
    assert findings == []


def test_template_and_user_data_fit_aws_limits(stack):
    assert len(TEMPLATE.read_bytes()) < TEMPLATE_BODY_LIMIT
    assert len(user_data(Stack(stack.template, EVERYTHING)).encode()) < USER_DATA_LIMIT


def test_internal_network_load_balancer_with_a_fixed_address_per_subnet(stack):
    nlb = stack.one("AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert (nlb["Type"], nlb["Scheme"]) == ("network", "internal")
    assert nlb["SubnetMappings"] == [
        {"SubnetId": REQUIRED["SubnetA"], "PrivateIPv4Address": REQUIRED["AddressA"]},
        {"SubnetId": REQUIRED["SubnetB"], "PrivateIPv4Address": REQUIRED["AddressB"]},
    ]
    assert attributes(nlb, "LoadBalancerAttributes")["load_balancing.cross_zone.enabled"] == "true"


def test_listener_forwards_tcp_443_to_the_target_group(stack):
    listener = stack.one("AWS::ElasticLoadBalancingV2::Listener")
    assert (listener["Protocol"], listener["Port"]) == ("TCP", LISTEN_PORT)
    assert listener["LoadBalancerArn"] == "<LoadBalancer>"
    assert listener["DefaultActions"] == [{"Type": "forward", "TargetGroupArn": "<TargetGroup>"}]


def test_target_group_checks_readyz_on_the_metrics_port_of_instance_targets(stack):
    group = stack.one("AWS::ElasticLoadBalancingV2::TargetGroup")
    assert (group["TargetType"], group["Protocol"], group["Port"]) == ("instance", "TCP", LISTEN_PORT)
    assert group["HealthCheckProtocol"] == "HTTP"
    assert group["HealthCheckPath"] == READY_PATH
    assert group["HealthCheckPort"] == str(METRICS_PORT)
    assert group["Matcher"] == {"HttpCode": "200"}  # /readyz says 503 while draining
    # The allowlist needs the builder's own address: instance targets keep it.
    assert attributes(group, "TargetGroupAttributes")["preserve_client_ip.enabled"] == "true"


def test_auto_scaling_group_spans_the_load_balancer_subnets(stack):
    group = stack.one("AWS::AutoScaling::AutoScalingGroup")
    declared = stack.template["Parameters"]["MinSize"]
    assert int(declared["MinValue"]) >= 2 and int(declared["Default"]) >= 2
    assert group["MinSize"] == stack.params["MinSize"]
    subnets = [m["SubnetId"] for m in stack.one("AWS::ElasticLoadBalancingV2::LoadBalancer")["SubnetMappings"]]
    assert sorted(group["VPCZoneIdentifier"]) == sorted(subnets) and len(set(subnets)) >= 2
    assert group["TargetGroupARNs"] == ["<TargetGroup>"]
    assert group["HealthCheckType"] == "ELB"
    assert group["LaunchTemplate"] == {"LaunchTemplateId": "<LaunchTemplate>",
                                       "Version": "<LaunchTemplate.LatestVersionNumber>"}


def rules(group: dict, key: str) -> set[tuple]:
    return {(r["IpProtocol"], r["FromPort"], r["ToPort"], r.get("CidrIp") or r.get("SourceSecurityGroupId"))
            for r in group[key]}


@pytest.mark.parametrize("parameters", [REQUIRED, EVERYTHING], ids=["required", "everything"])
def test_security_groups_admit_builders_on_443_and_health_checks_on_metrics(template, parameters):
    stack = Stack(template, parameters)
    instances = stack.of_type("AWS::EC2::SecurityGroup")["InstanceSecurityGroup"]
    builders = [parameters[k] for k in ("BuilderCidr1", "BuilderCidr2", "BuilderCidr3") if parameters.get(k)]
    metrics = [parameters["AddressA"] + "/32", parameters["AddressB"] + "/32"]
    metrics += [parameters["PrometheusCidr"]] if parameters.get("PrometheusCidr") else []
    assert rules(instances, "SecurityGroupIngress") == (
        {("tcp", LISTEN_PORT, LISTEN_PORT, cidr) for cidr in builders}
        | {("tcp", METRICS_PORT, METRICS_PORT, cidr) for cidr in metrics})
    assert rules(instances, "SecurityGroupEgress") == {("tcp", 443, 443, "0.0.0.0/0")}
    # For the security group of endpoints the stack did not create.
    assert stack.outputs["InstanceSecurityGroupId"] == "<InstanceSecurityGroup>"


def readme_discover_policy() -> dict:
    text = (REPO / "docs" / "aws.md").read_text()
    section = text.split("### IAM policy for `discover`", 1)[1]
    return json.loads(re.search(r"```json\n(.*?)```", section, re.S).group(1))


def test_instance_role_has_only_the_readme_discover_policy(stack):
    role = stack.one("AWS::IAM::Role")
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    assert "ManagedPolicyArns" not in role
    assert [p["PolicyDocument"] for p in role["Policies"]] == [readme_discover_policy()]
    assert stack.one("AWS::IAM::InstanceProfile")["Roles"] == ["<InstanceRole>"]


@pytest.mark.parametrize("parameters", [REQUIRED, EVERYTHING], ids=["existing", "created"])
def test_endpoints_are_created_only_when_asked(template, parameters):
    stack = Stack(template, parameters)
    endpoints = stack.of_type("AWS::EC2::VPCEndpoint")
    script = user_data(stack)
    if parameters.get("CreateEndpoints") != "true":
        assert endpoints == {}
        assert "STACK_ENDPOINTS='none'" in script
        return
    region = stack.pseudo["AWS::Region"]
    by_service = {e["ServiceName"].removeprefix(f"com.amazonaws.{region}."): e for e in endpoints.values()}
    assert sorted(by_service) == ["ecr.api", "ecr.dkr", "s3"]
    for service in ("ecr.api", "ecr.dkr"):
        endpoint = by_service[service]
        assert (endpoint["VpcEndpointType"], endpoint["PrivateDnsEnabled"]) == ("Interface", True)
        assert endpoint["SubnetIds"] == [parameters["SubnetA"], parameters["SubnetB"]]
    assert by_service["s3"]["VpcEndpointType"] == "Gateway"
    assert by_service["s3"]["RouteTableIds"] == parameters["EndpointRouteTableIds"].split(",")
    # The user data names the endpoints, so instances start only once they exist.
    assert "STACK_ENDPOINTS='<EcrApiEndpoint> <EcrDkrEndpoint> <S3Endpoint>'" in script
    # The endpoints admit the proxies.
    endpoint_group = stack.of_type("AWS::EC2::SecurityGroup")["EndpointSecurityGroup"]
    assert rules(endpoint_group, "SecurityGroupIngress") == {("tcp", 443, 443, "<InstanceSecurityGroup>")}


def test_creating_endpoints_needs_route_tables(template):
    with pytest.raises(AssertionError, match="EndpointRouteTableIds"):
        Stack(template, {**REQUIRED, "CreateEndpoints": "true"})


@pytest.mark.parametrize("region", ["eu-west-2", "cn-north-1"])
def test_hosts_output_is_what_sniproxy_hosts_prints_for_each_address(template, region):
    stack = Stack(template, REQUIRED, region=region, account="460811381319")
    # The config discover writes on an instance, read back from the path the units use.
    site = model.Site(region=region, vpc_id=REQUIRED["VpcId"], vpc_cidr="10.0.0.0/16",
                         subnet_id=REQUIRED["SubnetA"], route_table_id="rtb-0aaaabbbbccccdddd",
                         accounts=("460811381319",), listen=(INSTANCE_IP,))
    text = discover.render_toml(site, model.Plan(upstreams={}, findings=()))
    config = discover.parse(text, config_mod.DEFAULT_PATH)
    expected = [line for address in (REQUIRED["AddressA"], REQUIRED["AddressB"])
                for line in hosts_lines(config, address)]
    assert stack.outputs["HostsFile"].split("\n") == expected
    assert stack.outputs["LoadBalancerAddresses"] == "10.0.1.10,10.0.2.10"


# --- the user data ----------------------------------------------------------------------------

def needs(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        if os.environ.get("CI"):
            pytest.fail(f"{tool} must run on CI but is not installed (Debian: {tool})", pytrace=False)
        pytest.skip(f"{tool} not installed (Debian: apt-get install {tool})")
    return path


def test_user_data_passes_shellcheck(template):
    shellcheck = needs("shellcheck")
    for parameters in (REQUIRED, EVERYTHING):
        result = subprocess.run([shellcheck, "--shell=bash", "-"], input=user_data(Stack(template, parameters)),
                                capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr


def test_user_data_installs_the_units_from_systemd_unchanged(stack):
    script = user_data(stack)
    for unit in ("sniproxy.service", "sniproxy.socket"):
        embedded = re.search(rf'^cat > "\$UNITS/{re.escape(unit)}" <<\'UNIT\'\n(.*?)^UNIT$', script, re.S | re.M)
        assert embedded is not None, unit
        assert embedded.group(1) == (REPO / "systemd" / unit).read_text(), unit


# `sniproxy` on the rehearsal's instance: the real command line parser, then, for discover,
# the real config writer with this instance's address standing in for instance metadata and
# no findings standing in for the AWS calls; for doctor, the config read back.
FAKE_SNIPROXY = """\
import json, os, sys
from sniproxy import config
from sniproxy.cli import parser
from sniproxy.tools import discover, model

with open(os.environ["REHEARSAL_LOG"], "a") as log:
    log.write(json.dumps(["sniproxy", *sys.argv[1:]]) + "\\n")
args = parser().parse_args(sys.argv[1:])
if args.command == "discover":
    site = model.Site(region=args.region, vpc_id="vpc-0a1b2c3d4e5f60718", vpc_cidr="10.0.0.0/16",
                         subnet_id="subnet-0aaaa1111bbbb2222", route_table_id="rtb-0aaaabbbbccccdddd",
                         accounts=tuple(args.account), listen=(os.environ["INSTANCE_IP"],))
    text = discover.render_toml(site, model.Plan(upstreams={}, findings=()), discover._service(args))
    discover.parse(text)
    discover.write_file(args.write, text)
    if os.environ.get("DISCOVER_BLOCKS"):
        sys.exit(1)  # as discover does after writing, on a blocking finding
elif args.command == "doctor":
    config.load(args.config)
else:
    sys.exit(f"unexpected sniproxy command {args.command}")
"""
# Commands that only log what they were asked, with the environment pip reads.
FAKE_COMMAND = """\
#!/bin/sh
printf '["%s", "%s"]\\n' "$(basename "$0")" "$*|PIP_INDEX_URL=${PIP_INDEX_URL:-}" >> "$REHEARSAL_LOG"
"""


def rehearse(script: str, root: Path, status: int = 0, **extra_env: str) -> tuple[list[list[str]], Path, Path]:
    """Run the user data under bash with the OS stubbed out, expecting exit `status`. Returns
    the commands it ran (sniproxy's as argv, others as [name, "args|PIP_INDEX_URL=..."]), the
    config discover wrote and the systemd unit directory."""
    venv, bin_dir, units, config = root / "venv", root / "stubs", root / "units", root / "etc" / "sniproxy.toml"
    for directory in (venv / "bin", bin_dir, units):
        directory.mkdir(parents=True)
    for name, directory in (("dnf", bin_dir), ("python3.11", bin_dir), ("systemctl", bin_dir), ("pip", venv / "bin")):
        (directory / name).write_text(FAKE_COMMAND)
        (directory / name).chmod(0o755)
    (venv / "bin" / "python").symlink_to(sys.executable)
    (venv / "bin" / "sniproxy").write_text(f"#!{sys.executable}\n{FAKE_SNIPROXY}")
    (venv / "bin" / "sniproxy").chmod(0o755)
    for name, value in (("VENV", venv), ("CONFIG", config), ("UNITS", units)):
        script, count = re.subn(rf"^{name}=.*$", f"{name}={value}", script, flags=re.M)
        assert count == 1, name
    log = root / "commands.log"
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "LANG": "C.UTF-8",
           "REHEARSAL_LOG": str(log), "INSTANCE_IP": INSTANCE_IP, **extra_env}
    result = subprocess.run(["bash", "-"], input=script, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == status, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("sniproxy bootstrap: done") == (status == 0), result.stdout
    commands = [json.loads(line) for line in log.read_text().splitlines()]
    return commands, config, units


@pytest.mark.parametrize("parameters", [REQUIRED, EVERYTHING], ids=["required", "everything"])
def test_user_data_rehearsal_installs_configures_and_starts(template, parameters, tmp_path):
    stack = Stack(template, parameters)
    commands, config_path, units = rehearse(user_data(stack), tmp_path)
    config = config_mod.load(str(config_path))
    index = parameters.get("PipIndexUrl", "")
    names = [c[0] for c in commands]
    assert names == ["dnf", "python3.11", "pip", "sniproxy", "sniproxy", "systemctl", "systemctl"], commands
    assert commands[2] == ["pip", f"install --no-input --disable-pip-version-check {parameters['SniproxyPackage']}"
                           f"|PIP_INDEX_URL={index}"]
    assert commands[3][:2] == ["sniproxy", "discover"] and commands[4][:2] == ["sniproxy", "doctor"]
    assert commands[5][1].startswith("daemon-reload")
    assert commands[6][1].startswith("enable --now sniproxy.socket sniproxy.service")

    # The config: where the NLB delivers and checks, open to the builders only.
    assert [entry.key for entry in config.listen] == [(INSTANCE_IP, LISTEN_PORT)]
    assert (config.metrics.address, config.metrics.port) == ("0.0.0.0", METRICS_PORT)
    builders = [parameters[k] for k in ("BuilderCidr1", "BuilderCidr2", "BuilderCidr3") if parameters.get(k)]
    assert list(config.server.allow) == builders
    # Workers under a supervisor, one per CPU: a reload then also loads a newly installed version.
    assert config.server.workers == max(1, len(os.sched_getaffinity(0)))
    assert 'workers = "auto"' in config_path.read_text()
    assert [r.name for r in config.routes] and all(
        p.endswith(stack.pseudo["AWS::URLSuffix"]) for r in config.routes for p in r.patterns)

    # The units: systemd binds exactly the [[listen]] addresses, and waits out the drain.
    socket_drop_in = (units / "sniproxy.socket.d" / "listen.conf").read_text()
    assert re.findall(r"^ListenStream=(.*)$", socket_drop_in, re.M) == ["", f"{INSTANCE_IP}:{LISTEN_PORT}"]
    stop = re.search(r"^TimeoutStopSec=(\d+)s$", (units / "sniproxy.service.d" / "drain.conf").read_text(), re.M)
    assert int(stop.group(1)) >= config.server.drain_delay + config.server.drain_timeout
    for unit in ("sniproxy.service", "sniproxy.socket"):
        assert (units / unit).read_text() == (REPO / "systemd" / unit).read_text()


def test_drain_outlasts_the_health_check_and_deregistration_outlasts_the_drain(stack, tmp_path):
    """interval x unhealthy threshold <= drain_delay: the NLB stops sending new connections
    while the proxy still accepts. drain_delay + drain_timeout <= the deregistration delay
    (and the unhealthy draining interval): the NLB keeps running connections as long as the
    proxy may serve them."""
    _, config_path, _ = rehearse(user_data(stack), tmp_path)
    server = config_mod.load(str(config_path)).server
    assert server.drain_timeout == config_mod.default(ServerConfig, "drain_timeout")  # not overridden
    group = stack.one("AWS::ElasticLoadBalancingV2::TargetGroup")
    assert group["HealthCheckIntervalSeconds"] * group["UnhealthyThresholdCount"] <= server.drain_delay
    assert group["HealthCheckTimeoutSeconds"] < group["HealthCheckIntervalSeconds"]

    attrs = attributes(group, "TargetGroupAttributes")
    assert attrs["target_health_state.unhealthy.connection_termination.enabled"] == "false"
    declared = stack.template["Parameters"]["DeregistrationDelay"]
    delay = int(stack.params["DeregistrationDelay"])
    assert delay == int(declared["Default"])
    assert int(attrs["deregistration_delay.timeout_seconds"]) == delay
    assert int(attrs["target_health_state.unhealthy.draining_interval_seconds"]) == delay
    assert delay >= server.drain_delay + server.drain_timeout
    # Every value CloudFormation accepts satisfies it, not only the default.
    assert int(declared["MinValue"]) >= server.drain_delay + server.drain_timeout


def test_a_blocking_discover_finding_stops_the_boot(stack, tmp_path):
    """The instance then never serves, so never turns healthy; the log says why."""
    commands, config_path, units = rehearse(user_data(stack), tmp_path, status=1, DISCOVER_BLOCKS="1")
    assert [c[:2] for c in commands if c[0] in ("sniproxy", "systemctl")] == [["sniproxy", "discover"]]
    assert config_path.exists() and list(units.iterdir()) == []
