"""deploy/sniproxy-fleet.yaml: lint-clean, and what it deploys agrees with sniproxy's code.

moto cannot deploy it (moto builds an application balancer for an NLB and then refuses the
TCP listener), so the template is read with cfn-lint's decoder and evaluated for given
parameters by tests/deploy/cfn.py. The user data itself boots in a network namespace with no
route out: tests/deploy/test_boot_rehearsal.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from cfnlint.api import ManualArgs, lint_file

from sniproxy import config as config_mod
from sniproxy.config import Listen, MetricsConfig, ServerConfig
from sniproxy.ecr import al2023_repo_bucket
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
    "BundleS3Uri": "s3://artifacts-460811/sniproxy/sniproxy-bundle-0.1.0.tar.gz",
}
EVERYTHING = {
    **REQUIRED,
    "BuilderCidr2": "10.9.0.0/16",
    "BuilderCidr3": "192.168.40.0/24",
    "PrometheusCidr": "10.0.9.0/24",
    "CreateEndpoints": "true",
    "EndpointRouteTableIds": "rtb-0aaaabbbbccccdddd,rtb-0eeeeffff00001111",
    "EndpointSecurityGroupId": "sg-0123456789abcdef0",
    "Architecture": "arm64",
    "AlarmTopicArn": "arn:aws:sns:us-east-1:123456789012:sniproxy-oncall",
}
FROM_AN_INDEX = {
    **{k: v for k, v in REQUIRED.items() if k != "BundleS3Uri"},
    "SniproxyPackage": "sniproxy==0.1.0",
    "PipIndexUrl": "https://pypi.corp.example/simple",
}
# How long a Network Load Balancer is reported to keep sending new connections to a target
# it took out (AWS documents no figure): after it turns unhealthy, and after DeregisterTargets.
# Sources in the template's header comment.
PROPAGATION_AFTER_UNHEALTHY = 40
PROPAGATION_AFTER_DEREGISTRATION = 120


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
    """Both architectures are branches of one template: cfn-lint reads both (and the
    conditions that pick them)."""
    args = ManualArgs(regions=["us-east-1", "eu-west-2", "ap-southeast-1"], include_checks=["I"])
    findings = [str(match) for match in lint_file(TEMPLATE, args)]
    assert findings == []


def test_cfn_lint_can_fail(tmp_path):
    """The lint above is not vacuous: a mapping key spelling x86_64 is refused (that is why the
    template picks the architecture with conditions)."""
    broken = tmp_path / "broken.yaml"
    broken.write_text(TEMPLATE.read_text().replace(
        "Conditions:\n", "Mappings:\n  Images:\n    x86_64:\n      Type: c7i.large\n\nConditions:\n", 1))
    findings = [str(match) for match in lint_file(broken, ManualArgs(regions=["us-east-1"]))]
    assert any("E7001" in finding for finding in findings), findings


def test_template_and_user_data_fit_aws_limits(stack):
    assert len(TEMPLATE.read_bytes()) < TEMPLATE_BODY_LIMIT
    for parameters in (REQUIRED, EVERYTHING, FROM_AN_INDEX):
        assert len(user_data(Stack(stack.template, parameters)).encode()) < USER_DATA_LIMIT


@pytest.mark.parametrize("architecture, image, default_type", [
    ("x86_64", "al2023-ami-kernel-default-x86_64", "c7i.large"),
    ("arm64", "al2023-ami-kernel-default-arm64", "c7g.large"),
])
def test_architecture_picks_the_image_and_the_instance_type_together(template, architecture, image, default_type):
    """The default AMI (it ships the AWS CLI v2 the boot uses), from AWS's public parameter,
    and a compute-optimized type of the same architecture unless one is given."""
    data = Stack(template, {**REQUIRED, "Architecture": architecture}).one("AWS::EC2::LaunchTemplate")["LaunchTemplateData"]
    assert data["ImageId"] == f"{{{{resolve:ssm:/aws/service/ami-amazon-linux-latest/{image}}}}}"
    assert data["InstanceType"] == default_type
    chosen = Stack(template, {**REQUIRED, "Architecture": architecture, "InstanceType": "m7g.xlarge"})
    assert chosen.one("AWS::EC2::LaunchTemplate")["LaunchTemplateData"]["InstanceType"] == "m7g.xlarge"
    with pytest.raises(AssertionError):
        Stack(template, {**REQUIRED, "Architecture": "aarch64"})


def test_internal_network_load_balancer_with_a_fixed_address_per_subnet(stack):
    nlb = stack.one("AWS::ElasticLoadBalancingV2::LoadBalancer")
    assert (nlb["Type"], nlb["Scheme"]) == ("network", "internal")
    # Security groups can be given to an NLB only when it is created.
    assert nlb["SecurityGroups"] == ["<LoadBalancerSecurityGroup>"]
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
    return {(r["IpProtocol"], r["FromPort"], r["ToPort"],
             r.get("CidrIp") or r.get("SourceSecurityGroupId") or r.get("DestinationSecurityGroupId"))
            for r in group[key]}


@pytest.mark.parametrize("parameters", [REQUIRED, EVERYTHING], ids=["required", "everything"])
def test_load_balancer_group_admits_builders_on_443_and_path_mtu_icmp(template, parameters):
    stack = Stack(template, parameters)
    group = stack.of_type("AWS::EC2::SecurityGroup")["LoadBalancerSecurityGroup"]
    builders = [parameters[k] for k in ("BuilderCidr1", "BuilderCidr2", "BuilderCidr3") if parameters.get(k)]
    # ICMP "fragmentation needed" is type 3 code 4 (FromPort = type, ToPort = code), from any
    # router on the path.
    assert rules(group, "SecurityGroupIngress") == (
        {("tcp", LISTEN_PORT, LISTEN_PORT, cidr) for cidr in builders} | {("icmp", 3, 4, "0.0.0.0/0")})
    # Health checks obey the balancer's outbound rules: the listener and metrics ports of the instances.
    assert rules(group, "SecurityGroupEgress") == {("tcp", LISTEN_PORT, LISTEN_PORT, "<InstanceSecurityGroup>"),
                                                   ("tcp", METRICS_PORT, METRICS_PORT, "<InstanceSecurityGroup>")}
    assert stack.outputs["LoadBalancerSecurityGroupId"] == "<LoadBalancerSecurityGroup>"


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


@pytest.mark.parametrize("parameters", [REQUIRED, FROM_AN_INDEX], ids=["bundle", "index"])
def test_instance_role_may_signal_this_stack_and_read_the_bundle_object_only(template, parameters):
    """No ec2:Describe* (the boot makes no EC2 call), no s3 beyond the one object."""
    stack = Stack(template, parameters)
    role = stack.one("AWS::IAM::Role")
    assert role["AssumeRolePolicyDocument"]["Statement"] == [
        {"Effect": "Allow", "Principal": {"Service": "ec2.amazonaws.com"}, "Action": "sts:AssumeRole"}]
    assert "ManagedPolicyArns" not in role
    statements = [st for p in role["Policies"] for st in p["PolicyDocument"]["Statement"]]
    expected = [{"Sid": "SignalThisStack", "Effect": "Allow", "Action": "cloudformation:SignalResource",
                 "Resource": stack.pseudo["AWS::StackId"]}]
    if "BundleS3Uri" in parameters:
        expected.append({"Sid": "ReadTheBundle", "Effect": "Allow", "Action": "s3:GetObject",
                         "Resource": "arn:aws:s3:::artifacts-460811/sniproxy/sniproxy-bundle-0.1.0.tar.gz"})
    assert statements == expected
    assert stack.one("AWS::IAM::InstanceProfile")["Roles"] == ["<InstanceRole>"]


def test_the_bundle_object_arn_follows_the_partition(template):
    stack = Stack(template, REQUIRED, region="cn-north-1")
    statements = stack.one("AWS::IAM::Role")["Policies"][0]["PolicyDocument"]["Statement"]
    assert statements[1]["Resource"] == "arn:aws-cn:s3:::artifacts-460811/sniproxy/sniproxy-bundle-0.1.0.tar.gz"


@pytest.mark.parametrize("parameters, message", [
    ({**REQUIRED, "SniproxyPackage": "sniproxy==0.1.0"}, "not both"),
    ({k: v for k, v in REQUIRED.items() if k != "BundleS3Uri"}, "not both"),
    ({**FROM_AN_INDEX, "PipIndexUrl": ""}, "SniproxyPackage needs PipIndexUrl"),
])
def test_one_way_to_install(template, parameters, message):
    with pytest.raises(AssertionError, match=message):
        Stack(template, parameters)


@pytest.mark.parametrize("name, value", [
    ("PipIndexUrl", "http://pypi.corp.example/simple"),  # egress is 443 only, and plain http is not
    ("SniproxyPackage", "http://artifacts.example.com/sniproxy-0.1.0-py3-none-any.whl"),
    ("SniproxyPackage", "file:///tmp/sniproxy.whl"),
    ("BundleS3Uri", "https://artifacts-460811.s3.amazonaws.com/sniproxy-bundle.tar.gz"),
    ("BundleS3Uri", "s3://artifacts-460811/it's.tar.gz"),
    ("BundleS3Uri", "s3://artifacts-460811"),
])
def test_install_sources_are_https_or_s3_only(template, name, value):
    parameters = {**FROM_AN_INDEX, name: value} if name != "BundleS3Uri" else {**REQUIRED, name: value}
    with pytest.raises(AssertionError, match=name):
        Stack(template, parameters)


def test_creation_waits_for_min_size_boot_signals_and_alarms_below_it(template):
    stack = Stack(template, {**EVERYTHING, "MinSize": "3", "MaxSize": "6"})
    assert stack.attribute("AutoScalingGroup", "CreationPolicy") == {"ResourceSignal": {"Count": "3", "Timeout": "PT15M"}}
    # The user data signals that very resource (SignalResource by logical id).
    assert "--logical-resource-id AutoScalingGroup" in user_data(stack)
    alarm = stack.one("AWS::CloudWatch::Alarm")
    assert (alarm["Namespace"], alarm["MetricName"], alarm["Statistic"]) == ("AWS/NetworkELB", "HealthyHostCount", "Minimum")
    assert {d["Name"]: d["Value"] for d in alarm["Dimensions"]} == {
        "LoadBalancer": "<LoadBalancer.LoadBalancerFullName>", "TargetGroup": "<TargetGroup.TargetGroupFullName>"}
    assert (alarm["ComparisonOperator"], alarm["Threshold"]) == ("LessThanThreshold", "3")
    assert alarm["TreatMissingData"] == "breaching"
    assert alarm["AlarmActions"] == alarm["OKActions"] == [EVERYTHING["AlarmTopicArn"]]
    assert "AlarmActions" not in Stack(template, REQUIRED).one("AWS::CloudWatch::Alarm")


@pytest.mark.parametrize("parameters", [REQUIRED, EVERYTHING], ids=["existing", "created"])
def test_endpoints_are_created_only_when_asked(template, parameters):
    """Every endpoint the boot reaches: ECR's two, S3 (the bundle, dnf, layers) and
    CloudFormation (the boot signal); no ec2 endpoint, since the boot makes no EC2 call."""
    stack = Stack(template, parameters)
    endpoints = stack.of_type("AWS::EC2::VPCEndpoint")
    script = user_data(stack)
    if parameters.get("CreateEndpoints") != "true":
        assert endpoints == {}
        assert "STACK_RESOURCES='no-endpoints no-endpoint-rule'" in script
        return
    region = stack.pseudo["AWS::Region"]
    by_service = {e["ServiceName"].removeprefix(f"com.amazonaws.{region}."): e for e in endpoints.values()}
    assert sorted(by_service) == ["cloudformation", "ecr.api", "ecr.dkr", "s3"]
    for service in ("ecr.api", "ecr.dkr", "cloudformation"):
        endpoint = by_service[service]
        assert (endpoint["VpcEndpointType"], endpoint["PrivateDnsEnabled"]) == ("Interface", True)
        assert endpoint["SubnetIds"] == [parameters["SubnetA"], parameters["SubnetB"]]
        assert endpoint["SecurityGroupIds"] == ["<EndpointSecurityGroup>"]
    assert by_service["s3"]["VpcEndpointType"] == "Gateway"
    assert by_service["s3"]["RouteTableIds"] == parameters["EndpointRouteTableIds"].split(",")
    # The user data names the endpoints and the rule, so instances start only once they exist.
    assert ("STACK_RESOURCES='<EcrApiEndpoint> <EcrDkrEndpoint> <CloudFormationEndpoint> <S3Endpoint> "
            "<EndpointIngress>'") in script
    # The endpoints admit the proxies.
    endpoint_group = stack.of_type("AWS::EC2::SecurityGroup")["EndpointSecurityGroup"]
    assert rules(endpoint_group, "SecurityGroupIngress") == {("tcp", 443, 443, "<InstanceSecurityGroup>")}


def test_existing_endpoints_group_admits_the_instances(template):
    """The instances' group exists only once the stack creates it: the stack adds the rule."""
    assert Stack(template, REQUIRED).of_type("AWS::EC2::SecurityGroupIngress") == {}
    rule = Stack(template, {**REQUIRED, "EndpointSecurityGroupId": "sg-0123456789abcdef0"}).one(
        "AWS::EC2::SecurityGroupIngress")
    assert (rule["GroupId"], rule["IpProtocol"], rule["FromPort"], rule["ToPort"], rule["SourceSecurityGroupId"]) == (
        "sg-0123456789abcdef0", "tcp", 443, 443, "<InstanceSecurityGroup>")


def test_generated_s3_policy_keeps_dnf_working(template):
    """The boot runs dnf through the S3 gateway endpoint: the policy sniproxy recommends for
    that endpoint allows Amazon Linux 2023's repository bucket of the region."""
    from sniproxy.tools import policy

    script = user_data(Stack(template, REQUIRED))
    assert re.search(r"^dnf install ", script, re.M)
    resources = [st["Resource"] for st in policy.s3_document("eu-west-2")["Statement"]]
    assert f"arn:aws:s3:::{al2023_repo_bucket('eu-west-2')}/*" in resources


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




def drain_delay(script: str) -> int:
    return int(re.search(r"^DRAIN_DELAY=(\d+)$", script, re.M).group(1))


def test_drain_covers_the_balancer_taking_the_target_out_and_deregistration_covers_the_drain(stack):
    """SIGTERM first: /readyz fails after interval x threshold, and the NLB is reported to keep
    sending new connections for ~40 s more, all while sniproxy still accepts (drain_delay).
    Deregistration first: the NLB is reported to send new connections for ~120 s after
    DeregisterTargets, while the instance serves as usual for the deregistration delay; then
    SIGTERM still keeps accepting for drain_delay, and running connections get drain_timeout,
    which the delay (and the unhealthy draining interval) keep alive at the balancer."""
    script = user_data(stack)
    site = model.Site(region="us-east-1", vpc_id=REQUIRED["VpcId"], vpc_cidr="10.0.0.0/16", subnet_id=REQUIRED["SubnetA"],
                      route_table_id="rtb-0aaaabbbbccccdddd", accounts=("123456789012",), listen=(INSTANCE_IP,))
    service = discover.Service(metrics_address="0.0.0.0", drain_delay=drain_delay(script))
    server = discover.parse(discover.render_toml(site, model.Plan(upstreams={}, findings=()), service)).server
    assert server.drain_timeout == config_mod.default(ServerConfig, "drain_timeout")  # the user data keeps it
    group = stack.one("AWS::ElasticLoadBalancingV2::TargetGroup")
    taken_out = group["HealthCheckIntervalSeconds"] * group["UnhealthyThresholdCount"] + PROPAGATION_AFTER_UNHEALTHY
    assert taken_out <= server.drain_delay
    assert group["HealthCheckTimeoutSeconds"] < group["HealthCheckIntervalSeconds"]

    attrs = attributes(group, "TargetGroupAttributes")
    assert attrs["target_health_state.unhealthy.connection_termination.enabled"] == "false"
    declared = stack.template["Parameters"]["DeregistrationDelay"]
    delay = int(stack.params["DeregistrationDelay"])
    assert int(attrs["deregistration_delay.timeout_seconds"]) == delay
    assert int(attrs["target_health_state.unhealthy.draining_interval_seconds"]) == delay
    # Every value CloudFormation accepts satisfies it, not only the default.
    assert int(declared["MinValue"]) >= max(PROPAGATION_AFTER_DEREGISTRATION, server.drain_delay + server.drain_timeout)
    assert delay >= int(declared["MinValue"])
