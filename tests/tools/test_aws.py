"""sniproxy.tools.aws: IMDSv2 against a real loopback HTTP server, API calls through botocore's
Stubber with responses shaped like real ones, and the one-line error messages."""

from __future__ import annotations

import contextlib
import datetime
import http.server
import socket
import threading
import time

import boto3
import pytest
from botocore.stub import Stubber

from sniproxy.tools import aws

REGION = "eu-west-2"
VPC = "vpc-0a1b2c3d4e5f60718"
SUBNET = "subnet-0fedcba9876543210"
RTB_SUBNET = "rtb-0aaaabbbbccccdddd"
RTB_MAIN = "rtb-0111122223333444f"
ACCOUNT = "123456789012"
CREATED = datetime.datetime(2024, 3, 1, 12, 0, tzinfo=datetime.UTC)
# The policies EC2 attaches when none is given, byte for byte as DescribeVpcEndpoints returns them.
DEFAULT_INTERFACE_POLICY = '{"Statement":[{"Effect":"Allow","Principal":"*","Action":"*","Resource":"*"}]}'
DEFAULT_GATEWAY_POLICY = ('{"Version":"2008-10-17","Statement":[{"Effect":"Allow","Principal":"*",'
                          '"Action":"*","Resource":"*"}]}')


# --- real-shaped describe_vpc_endpoints items ------------------------------------------------

def interface_endpoint(service: str, vpce: str, suffix: str, *, private_dns: bool = True,
                       state: str = "available", inbound_only: bool = False,
                       policy: str = DEFAULT_INTERFACE_POLICY) -> dict:
    """An Interface endpoint as EC2 returns it: regional and zonal vpce names, plus the
    private names when private DNS is on. `service` is "ecr.dkr", "ecr.api" or "s3"."""
    label = {"ecr.dkr": "dkr.ecr", "ecr.api": "api.ecr", "s3": "s3"}[service]
    star = "*." if service == "s3" else ""
    entries = [
        {"DnsName": f"{star}{vpce}-{suffix}.{label}.{REGION}.vpce.amazonaws.com",
         "HostedZoneId": "Z16XN7HYX7JNTG"},
        {"DnsName": f"{star}{vpce}-{suffix}-{REGION}a.{label}.{REGION}.vpce.amazonaws.com",
         "HostedZoneId": "Z16XN7HYX7JNTG"},
        {"DnsName": f"{star}{vpce}-{suffix}-{REGION}b.{label}.{REGION}.vpce.amazonaws.com",
         "HostedZoneId": "Z16XN7HYX7JNTG"},
    ]
    if private_dns:
        private = {"ecr.dkr": [f"dkr.ecr.{REGION}.amazonaws.com",
                               f"*.dkr.ecr.{REGION}.amazonaws.com"],
                   "ecr.api": [f"api.ecr.{REGION}.amazonaws.com"],
                   "s3": [f"s3.{REGION}.amazonaws.com", f"*.s3.{REGION}.amazonaws.com"]}
        entries += [{"DnsName": name, "HostedZoneId": "Z0123456789PRIVATEZN"}
                    for name in private[service]]
    return {
        "VpcEndpointId": vpce,
        "VpcEndpointType": "Interface",
        "VpcId": VPC,
        "ServiceName": f"com.amazonaws.{REGION}.{service}",
        "State": state,
        "PolicyDocument": policy,
        "RouteTableIds": [],
        "SubnetIds": [SUBNET, "subnet-0123456789abcdef0"],
        "Groups": [{"GroupId": "sg-0abcdef0123456789", "GroupName": "ecr-endpoints"}],
        "IpAddressType": "ipv4",
        "DnsOptions": {"DnsRecordIpType": "ipv4",
                       "PrivateDnsOnlyForInboundResolverEndpoint": inbound_only},
        "PrivateDnsEnabled": private_dns,
        "RequesterManaged": False,
        "NetworkInterfaceIds": ["eni-0a1a1a1a1a1a1a1a1", "eni-0b2b2b2b2b2b2b2b2"],
        "DnsEntries": entries,
        "CreationTimestamp": CREATED,
        "Tags": [{"Key": "Name", "Value": f"{service}-endpoint"}],
        "OwnerId": ACCOUNT,
    }


def gateway_endpoint(vpce: str, route_tables: list[str], state: str = "available",
                     policy: str = DEFAULT_GATEWAY_POLICY) -> dict:
    return {
        "VpcEndpointId": vpce,
        "VpcEndpointType": "Gateway",
        "VpcId": VPC,
        "ServiceName": f"com.amazonaws.{REGION}.s3",
        "State": state,
        "PolicyDocument": policy,
        "RouteTableIds": route_tables,
        "SubnetIds": [],
        "Groups": [],
        "IpAddressType": "ipv4",
        "PrivateDnsEnabled": False,
        "RequesterManaged": False,
        "NetworkInterfaceIds": [],
        "DnsEntries": [],
        "CreationTimestamp": CREATED,
        "Tags": [],
        "OwnerId": ACCOUNT,
    }


def other_endpoint(vpce: str, service: str) -> dict:
    item = interface_endpoint("ecr.api", vpce, "zzzz9999")
    item["ServiceName"] = f"com.amazonaws.{REGION}.{service}"
    return item


def route_table(rtb: str, *, subnet: str | None = None, main: bool = False,
                subnets: tuple[str, ...] = (), on_prem: bool = False) -> dict:
    """A route table as EC2 returns it. `subnet` and `subnets` are explicitly associated;
    `on_prem` adds the routes back to the builders: a transit gateway route and a propagating VGW."""
    associations = []
    if main:
        associations.append({"Main": True, "RouteTableAssociationId": f"rtbassoc-0main{rtb[-12:]}",
                             "RouteTableId": rtb, "AssociationState": {"State": "associated"}})
    for i, sub in enumerate(([subnet] if subnet else []) + list(subnets)):
        associations.append({"Main": False, "RouteTableAssociationId": f"rtbassoc-0{i}{sub[-15:]}",
                             "RouteTableId": rtb, "SubnetId": sub,
                             "AssociationState": {"State": "associated"}})
    routes = [
        {"DestinationCidrBlock": "10.20.0.0/16", "GatewayId": "local",
         "Origin": "CreateRouteTable", "State": "active"},
        {"DestinationPrefixListId": "pl-7ca54015", "GatewayId": "vpce-0s3gw000000000000",
         "Origin": "CreateRoute", "State": "active"},
    ]
    if on_prem:
        routes += [
            {"DestinationCidrBlock": "10.8.0.0/16", "TransitGatewayId": "tgw-0123456789abcdef0",
             "Origin": "CreateRoute", "State": "active"},
            {"DestinationCidrBlock": "172.16.0.0/12", "GatewayId": "vgw-0fedcba987654321f",
             "Origin": "EnableVgwRoutePropagation", "State": "active"},
        ]
    return {
        "Associations": associations,
        "PropagatingVgws": [{"GatewayId": "vgw-0fedcba987654321f"}] if on_prem else [],
        "RouteTableId": rtb,
        "Routes": routes,
        "Tags": [],
        "VpcId": VPC,
        "OwnerId": ACCOUNT,
    }


def subnet_item(subnet: str = SUBNET, vpc: str = VPC) -> dict:
    return {"AvailabilityZone": f"{REGION}a", "AvailabilityZoneId": "euw2-az2",
            "AvailableIpAddressCount": 250, "CidrBlock": "10.20.1.0/24",
            "DefaultForAz": False, "MapPublicIpOnLaunch": False, "State": "available",
            "SubnetId": subnet, "VpcId": vpc, "OwnerId": ACCOUNT,
            "SubnetArn": f"arn:aws:ec2:{REGION}:{ACCOUNT}:subnet/{subnet}"}


def identity(account: str = ACCOUNT) -> dict:
    return {"UserId": "AROAEXAMPLEROLEID:i-0abc", "Account": account,
            "Arn": f"arn:aws:sts::{account}:assumed-role/sniproxy-discover/i-0abc"}


VPC_FILTER = [{"Name": "vpc-id", "Values": [VPC]}]
MAIN_FILTER = [{"Name": "vpc-id", "Values": [VPC]},
               {"Name": "association.main", "Values": ["true"]}]
SUBNET_FILTER = [{"Name": "association.subnet-id", "Values": [SUBNET]}]


@pytest.fixture
def no_aws_env(monkeypatch):
    """No AWS_* from the machine, fake credentials, no config files: nothing can reach AWS."""
    import os
    for name in list(os.environ):
        if name.startswith("AWS_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent/aws-config")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent/aws-credentials")
    # IMDS is never the link-local default in tests; an unused loopback port refuses at once.
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.5.254:9")


def fake_session() -> boto3.Session:
    return boto3.Session(aws_access_key_id="AKIAIOSFODNN7EXAMPLE",
                         aws_secret_access_key="wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY",
                         region_name=REGION)


@contextlib.contextmanager
def stubbed(region: str = REGION):
    client = aws.Aws(fake_session(), region)
    with Stubber(client.ec2) as ec2, Stubber(client.sts) as sts:
        yield client, ec2, sts
        ec2.assert_no_pending_responses()
        sts.assert_no_pending_responses()


# --- IMDS ------------------------------------------------------------------------------------

class ImdsHandler(http.server.BaseHTTPRequestHandler):
    token = "AQAEAFake-imds-token=="
    data: dict[str, str] = {}

    def log_message(self, *args):
        pass

    def _send(self, code: int, body: str = "") -> None:
        payload = body.encode()
        self.send_response(code)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def do_PUT(self):
        self.server.log.append(("PUT", self.path))
        if self.path != "/latest/api/token" or \
                not self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            return self._send(400)
        self._send(200, self.token)

    def do_GET(self):
        self.server.log.append(("GET", self.path))
        if self.headers.get("X-aws-ec2-metadata-token") != self.token:
            return self._send(401)
        prefix = "/latest/meta-data/"
        key = self.path[len(prefix):] if self.path.startswith(prefix) else None
        if key not in self.server.data:
            return self._send(404, "Not Found")
        self._send(200, self.server.data[key])


def instance_data(region: str = REGION, vpc: str = VPC, subnet: str = SUBNET) -> dict:
    primary, secondary = "0a:1b:2c:3d:4e:5f", "0a:1b:2c:3d:4e:60"
    data = {"placement/region": region, "mac": primary,
            "network/interfaces/macs/": f"{secondary}/\n{primary}/"}
    for mac, ips in ((primary, "10.20.1.10\n10.20.1.11"), (secondary, "10.20.2.20")):
        base = f"network/interfaces/macs/{mac}/"
        data.update({base + "vpc-id": vpc, base + "subnet-id": subnet,
                     base + "vpc-ipv4-cidr-block": "10.20.0.0/16", base + "local-ipv4s": ips})
    return data


@contextlib.contextmanager
def imds_server(data: dict[str, str], address: str = "127.0.5.1"):
    server = http.server.ThreadingHTTPServer((address, 0), ImdsHandler)
    server.data = data
    server.log = []
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield server, f"http://{address}:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_imds_endpoint_honours_botocore_variable(no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT", "http://127.0.5.1:8080/")
    assert aws.imds_endpoint() == "http://127.0.5.1:8080"
    monkeypatch.delenv("AWS_EC2_METADATA_SERVICE_ENDPOINT")
    assert aws.imds_endpoint() == "http://169.254.169.254"
    monkeypatch.setenv("AWS_EC2_METADATA_SERVICE_ENDPOINT_MODE", "IPv6")
    assert aws.imds_endpoint() == "http://[fd00:ec2::254]"


def test_imds_v2_token_then_gets(no_aws_env):
    with imds_server(instance_data()) as (server, url):
        metadata = aws.Imds(url).fetch()
    assert server.log[0] == ("PUT", "/latest/api/token")
    assert all(method == "GET" for method, _ in server.log[1:])
    assert metadata.region == REGION
    assert [i.mac for i in metadata.interfaces] == ["0a:1b:2c:3d:4e:5f", "0a:1b:2c:3d:4e:60"]
    assert metadata.primary.vpc_id == VPC
    assert metadata.primary.subnet_id == SUBNET
    assert metadata.primary.vpc_cidr == "10.20.0.0/16"
    assert metadata.primary.local_ipv4s == ("10.20.1.10", "10.20.1.11")


def test_imds_without_token_is_unavailable(no_aws_env, monkeypatch):
    # A server that rejects the token (as IMDS does with a wrong hop count) -> fallback.
    monkeypatch.setattr(ImdsHandler, "do_PUT", lambda self: self._send(403))
    with imds_server(instance_data()) as (server, url):
        assert aws.Imds(url).fetch() is None
    assert server.log == [] or all(m == "PUT" for m, _ in server.log)


def test_imds_refused_is_unavailable(no_aws_env):
    with socket.socket() as sock:  # a port that was free a moment ago: refused
        sock.bind(("127.0.5.1", 0))
        port = sock.getsockname()[1]
    assert aws.Imds(f"http://127.0.5.1:{port}").fetch() is None


def test_imds_silent_server_times_out_in_one_second(no_aws_env):
    with socket.socket() as sock:  # listens, never answers
        sock.bind(("127.0.5.1", 0))
        sock.listen(8)
        start = time.monotonic()
        assert aws.Imds(f"http://127.0.5.1:{sock.getsockname()[1]}").fetch() is None
        elapsed = time.monotonic() - start
    assert 0.9 <= elapsed < 3


def test_imds_disabled_by_botocore_variable(no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with imds_server(instance_data()) as (server, url):
        assert aws.Imds(url).fetch() is None
    assert server.log == []


# --- API calls through Stubber ---------------------------------------------------------------

def test_vpc_endpoints_follows_next_token(no_aws_env):
    first = [interface_endpoint("ecr.api", "vpce-0aaa1111bbbb22223", "k2x9q7ma")]
    second = [interface_endpoint("ecr.dkr", "vpce-0123abcd", "uz5j3lr2"),
              gateway_endpoint("vpce-0s3gw000000000000", [RTB_SUBNET])]
    with stubbed() as (client, ec2, _):
        ec2.add_response("describe_vpc_endpoints",
                         {"VpcEndpoints": first, "NextToken": "eyJ2IjoiMiIsImMiOiJwYWdlMiJ9"},
                         {"Filters": VPC_FILTER})
        ec2.add_response("describe_vpc_endpoints", {"VpcEndpoints": second},
                         {"Filters": VPC_FILTER, "NextToken": "eyJ2IjoiMiIsImMiOiJwYWdlMiJ9"})
        endpoints = client.vpc_endpoints(VPC)
    assert [e["VpcEndpointId"] for e in endpoints] == [
        "vpce-0aaa1111bbbb22223", "vpce-0123abcd", "vpce-0s3gw000000000000"]


def test_route_table_of_subnet(no_aws_env):
    with stubbed() as (client, ec2, _):
        ec2.add_response("describe_route_tables",
                         {"RouteTables": [route_table(RTB_SUBNET, subnet=SUBNET)]},
                         {"Filters": SUBNET_FILTER})
        assert client.route_table(VPC, SUBNET)["RouteTableId"] == RTB_SUBNET


def test_route_tables_by_id(no_aws_env):
    ids = ["rtb-0bbbbbbbbbbbbbbbb", "rtb-0cccccccccccccccc"]
    with stubbed() as (client, ec2, _):
        ec2.add_response("describe_route_tables",
                         {"RouteTables": [route_table(ids[0], subnets=("subnet-0b1",)),
                                          route_table(ids[1], main=True)]},
                         {"Filters": [{"Name": "route-table-id", "Values": ids}]})
        assert [t["RouteTableId"] for t in client.route_tables(ids)] == ids


def test_route_table_falls_back_to_main(no_aws_env):
    with stubbed() as (client, ec2, _):
        ec2.add_response("describe_route_tables", {"RouteTables": []},
                         {"Filters": SUBNET_FILTER})
        ec2.add_response("describe_route_tables",
                         {"RouteTables": [route_table(RTB_MAIN, main=True)]},
                         {"Filters": MAIN_FILTER})
        assert client.route_table(VPC, SUBNET)["RouteTableId"] == RTB_MAIN


def test_unknown_vpc_has_no_main_table(no_aws_env):
    with stubbed() as (client, ec2, _):
        ec2.add_response("describe_route_tables", {"RouteTables": []}, {"Filters": MAIN_FILTER})
        with pytest.raises(aws.AwsError, match=f"VPC {VPC} not found in region {REGION}"):
            client.route_table(VPC, None)


def test_unknown_subnet(no_aws_env):
    with stubbed() as (client, ec2, _):
        ec2.add_client_error("describe_subnets", "InvalidSubnetID.NotFound",
                             "The subnet ID 'subnet-0nope' does not exist", 400)
        with pytest.raises(aws.AwsError, match="subnet subnet-0nope not found"):
            client.subnet("subnet-0nope")


def test_account_from_sts(no_aws_env):
    with stubbed() as (client, _, sts):
        sts.add_response("get_caller_identity", identity(), {})
        assert client.account() == ACCOUNT


@pytest.mark.parametrize("call, method, service, code, message, action", [
    (lambda c: c.account(), "get_caller_identity", "sts", "AccessDenied",
     "User: arn:aws:sts::123456789012:assumed-role/x/i-0abc is not authorized to perform: "
     "sts:GetCallerIdentity", "sts:GetCallerIdentity"),
    (lambda c: c.vpc_endpoints(VPC), "describe_vpc_endpoints", "ec2", "UnauthorizedOperation",
     "You are not authorized to perform this operation. User: arn:aws:sts::123456789012:"
     "assumed-role/x/i-0abc is not authorized to perform: ec2:DescribeVpcEndpoints",
     "ec2:DescribeVpcEndpoints"),
    (lambda c: c.route_table(VPC, None), "describe_route_tables", "ec2",
     "UnauthorizedOperation", "You are not authorized to perform this operation.",
     "ec2:DescribeRouteTables"),
], ids=["sts", "vpc-endpoints", "route-tables"])
def test_access_denied_names_the_iam_action(no_aws_env, call, method, service, code, message,
                                            action):
    with stubbed() as (client, ec2, sts):
        stub = ec2 if service == "ec2" else sts
        stub.add_client_error(method, code, message, 403)
        with pytest.raises(aws.AwsError) as caught:
            call(client)
    text = str(caught.value)
    assert "\n" not in text
    assert text == (f"access denied: the IAM policy lacks {action} "
                    "(see the IAM policy for discover in docs/aws.md)")
    assert action in aws.IAM_ACTIONS


def test_throttling_reports_that_botocore_gave_up(no_aws_env):
    with stubbed() as (client, ec2, _):
        ec2.add_client_error("describe_vpc_endpoints", "RequestLimitExceeded",
                             "Request limit exceeded.", 503,
                             response_meta={"RetryAttempts": 4})
        with pytest.raises(aws.AwsError) as caught:
            client.vpc_endpoints(VPC)
    assert str(caught.value) == (
        "ec2:DescribeVpcEndpoints throttled: botocore retried and gave up after 5 attempts "
        "(RequestLimitExceeded); wait a minute and run discover again")


class ThrottlingEc2(http.server.BaseHTTPRequestHandler):
    """An EC2 Query API endpoint that is always over its request limit."""

    def log_message(self, *args):
        pass

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.requests += 1
        body = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Response><Errors><Error>'
                b"<Code>RequestLimitExceeded</Code><Message>Request limit exceeded.</Message>"
                b"</Error></Errors><RequestID>5e2a7c7e-0000-4000-8000-000000000000</RequestID>"
                b"</Response>")
        self.send_response(503)
        self.send_header("Content-Type", "text/xml;charset=UTF-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


def test_botocore_really_retries_throttling(no_aws_env, monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.5.1", 0), ThrottlingEc2)
    server.requests = 0
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_EC2", f"http://127.0.5.1:{server.server_address[1]}")
        monkeypatch.setattr(aws, "RETRY_ATTEMPTS", 2)  # standard backoff: at most 1 s wait
        client = aws.Aws(fake_session(), REGION)
        with pytest.raises(aws.AwsError) as caught:
            client.vpc_endpoints(VPC)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert server.requests == 2
    assert "gave up after 2 attempts (RequestLimitExceeded)" in str(caught.value)


def test_no_credentials(no_aws_env):
    client = aws.Aws(boto3.Session(region_name=REGION), REGION)
    with pytest.raises(aws.AwsError) as caught:
        client.account()
    assert str(caught.value).startswith("no AWS credentials found:")


def test_region_not_found(no_aws_env):
    with pytest.raises(aws.AwsError, match="region 'eu-west-9' not found"):
        aws.check_region(fake_session(), "eu-west-9")
    aws.check_region(fake_session(), "eu-west-2")
    aws.check_region(fake_session(), "cn-north-1")


def test_profile_not_found(no_aws_env):
    with pytest.raises(aws.AwsError, match="AWS profile 'nope' not found"):
        aws.session("nope")


def test_expired_and_opt_in(no_aws_env):
    with stubbed() as (client, ec2, sts):
        sts.add_client_error("get_caller_identity", "ExpiredToken",
                             "The security token included in the request is expired", 403)
        ec2.add_client_error("describe_vpc_endpoints", "OptInRequired",
                             "You are not subscribed to this service.", 401)
        with pytest.raises(aws.AwsError, match="credentials have expired"):
            client.account()
        with pytest.raises(aws.AwsError, match=f"region {REGION} is not enabled"):
            client.vpc_endpoints(VPC)


def test_missing_profile_from_environment_is_named(no_aws_env, monkeypatch):
    monkeypatch.setenv("AWS_PROFILE", "ghost")
    with pytest.raises(aws.AwsError, match="AWS profile 'ghost' not found"):
        aws.session(None)
