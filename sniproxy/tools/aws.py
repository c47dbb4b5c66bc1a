"""Read-only AWS look-ups for the setup-time commands (`discover`).

The only module that imports boto3/botocore. The proxy itself never calls AWS and holds no
credentials. Every failure a user can meet leaves here as one `AwsError` whose text is a
single line saying what went wrong and what to do; callers print it, never a traceback.

Responses are returned as the plain dicts boto3 gives; turning them into findings is the
pure logic in `discover`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import urllib.error
import urllib.request
from collections.abc import Iterator

import boto3
import botocore.config
import botocore.exceptions
import botocore.session

IMDS_TIMEOUT = 1.0
IMDS_TOKEN_TTL = "21600"
IMDS_DEFAULT = {"IPv4": "http://169.254.169.254", "IPv6": "http://[fd00:ec2::254]"}

# botocore retries throttled calls itself (standard mode); we only report when it gives up.
RETRY_ATTEMPTS = 5

# The IAM actions discover needs; the policy in docs/aws.md lists exactly these.
IAM_ACTIONS = (
    "sts:GetCallerIdentity",
    "ec2:DescribeVpcEndpoints",
    "ec2:DescribeRouteTables",
    "ec2:DescribeSubnets",
)

_ACCESS_DENIED = {
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "UnauthorizedAccess",
}
_THROTTLED = {
    "Throttling", "ThrottlingException", "ThrottledException", "RequestThrottledException",
    "TooManyRequestsException", "RequestLimitExceeded", "RequestThrottled",
    "EC2ThrottledException", "SlowDown", "PriorRequestNotComplete", "BandwidthLimitExceeded",
}
_BAD_CREDENTIALS = {
    "AuthFailure", "InvalidClientTokenId", "SignatureDoesNotMatch", "IncompleteSignature",
    "UnrecognizedClientException",
}
_EXPIRED = {"ExpiredToken", "ExpiredTokenException", "RequestExpired"}
_OPT_IN = {"OptInRequired"}


class AwsError(Exception):
    """One line for the user: what failed and what to do about it."""


# --- instance metadata (IMDSv2) ---------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Interface:
    """One network interface of this instance, as IMDS describes it."""

    mac: str
    vpc_id: str | None
    subnet_id: str | None
    vpc_cidr: str | None
    """The VPC's primary IPv4 CIDR; the VPC resolver lives at its base + 2."""
    local_ipv4s: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class InstanceMetadata:
    """What IMDS says about the instance discover runs on."""

    region: str | None
    interfaces: tuple[Interface, ...]
    """Primary interface first."""

    @property
    def primary(self) -> Interface | None:
        return self.interfaces[0] if self.interfaces else None


def imds_endpoint(profile: str | None = None) -> str:
    """The IMDS base URL, honouring botocore's settings.

    AWS_EC2_METADATA_SERVICE_ENDPOINT (or `ec2_metadata_service_endpoint` in the AWS config)
    wins; otherwise the mode (IPv4/IPv6) picks the link-local address.
    """
    try:
        session = botocore.session.Session(profile=profile)
        endpoint = session.get_config_variable("ec2_metadata_service_endpoint")
        mode = session.get_config_variable("ec2_metadata_service_endpoint_mode") or "IPv4"
    except botocore.exceptions.ProfileNotFound:
        endpoint = os.environ.get("AWS_EC2_METADATA_SERVICE_ENDPOINT")
        mode = "IPv4"
    if endpoint:
        return endpoint.rstrip("/")
    return IMDS_DEFAULT.get(mode, IMDS_DEFAULT["IPv4"])


class Imds:
    """A tiny IMDSv2 client: PUT for a token, then GETs carrying it, 1 s timeout each.

    Unreachable metadata (not on EC2, hop limit, IMDS disabled) is not an error: `fetch`
    returns None and the caller falls back to flags or the boto3 session.
    """

    def __init__(self, endpoint: str, timeout: float = IMDS_TIMEOUT) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        # IMDS is link-local: never send it through an HTTP proxy from the environment.
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self._token: str | None = None

    def _request(self, method: str, path: str, headers: dict[str, str]) -> str | None:
        request = urllib.request.Request(self.endpoint + path, method=method, headers=headers)
        try:
            with self._opener.open(request, timeout=self.timeout) as response:
                return response.read().decode("utf-8", "replace")
        except urllib.error.HTTPError as exc:
            if exc.code == 404:
                return None
            raise
        # Anything else (refused, timeout, reset) propagates as OSError.

    def get(self, path: str) -> str | None:
        """The text at /latest/meta-data/<path>, or None when IMDS has no such item."""
        if self._token is None:
            token = self._request(
                "PUT", "/latest/api/token",
                {"X-aws-ec2-metadata-token-ttl-seconds": IMDS_TOKEN_TTL},
            )
            if not token:
                raise OSError("IMDS returned no token")
            self._token = token
        text = self._request(
            "GET", "/latest/meta-data/" + path, {"X-aws-ec2-metadata-token": self._token},
        )
        return None if text is None else text.strip()

    def fetch(self) -> InstanceMetadata | None:
        if os.environ.get("AWS_EC2_METADATA_DISABLED", "").lower() == "true":
            return None
        try:
            region = self.get("placement/region")
            primary = self.get("mac")
            listing = self.get("network/interfaces/macs/") or ""
            macs = [line.strip().rstrip("/") for line in listing.splitlines() if line.strip()]
            if primary in macs:
                macs.remove(primary)
                macs.insert(0, primary)
            interfaces = tuple(self._interface(mac) for mac in macs)
        except (OSError, ValueError):
            # urllib's HTTPError/URLError and socket timeouts are all OSErrors.
            return None
        return InstanceMetadata(region=region, interfaces=interfaces)

    def _interface(self, mac: str) -> Interface:
        base = f"network/interfaces/macs/{mac}/"
        ipv4s = self.get(base + "local-ipv4s") or ""
        return Interface(
            mac=mac,
            vpc_id=self.get(base + "vpc-id"),
            subnet_id=self.get(base + "subnet-id"),
            vpc_cidr=self.get(base + "vpc-ipv4-cidr-block"),
            local_ipv4s=tuple(ip.strip() for ip in ipv4s.split() if ip.strip()),
        )


# --- API calls -------------------------------------------------------------------------------

def session(profile: str | None = None, region: str | None = None) -> boto3.Session:
    try:
        return boto3.Session(profile_name=profile, region_name=region)
    except botocore.exceptions.ProfileNotFound:
        name = profile or os.environ.get("AWS_PROFILE") or os.environ.get("AWS_DEFAULT_PROFILE")
        raise AwsError(f"AWS profile {name!r} not found in the AWS config files") from None


def check_region(sess: boto3.Session, region: str) -> None:
    """Reject a region botocore does not know, before any call tries to reach it."""
    known = {
        r for p in sess.get_available_partitions()
        for r in sess.get_available_regions("ec2", partition_name=p)
    }
    if region not in known:
        raise AwsError(
            f"region {region!r} not found: not an EC2 region known to botocore "
            f"{botocore.__version__}; check --region (e.g. eu-west-2)"
        )


def describe_error(exc: Exception, action: str, region: str) -> str:
    """The one line we show for a failed call of IAM action `action`."""
    if isinstance(exc, botocore.exceptions.NoCredentialsError):
        return ("no AWS credentials found: attach an instance profile, or pass --profile, "
                "or set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY")
    if isinstance(exc, botocore.exceptions.PartialCredentialsError):
        return f"incomplete AWS credentials: {exc}"
    if isinstance(exc, botocore.exceptions.NoRegionError):
        return "no region: pass --region"
    if isinstance(exc, botocore.exceptions.ProfileNotFound):
        return f"AWS profile not found: {exc}"
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return (f"{action}: cannot reach the AWS API endpoint for region {region} "
                f"({exc.kwargs.get('endpoint_url', '?')}): check --region, DNS and the route "
                "to the internet or to the sts/ec2 interface endpoints")
    if isinstance(exc, botocore.exceptions.ConnectTimeoutError | botocore.exceptions.ReadTimeoutError):
        return f"{action}: the AWS API for region {region} timed out: {exc}"
    if isinstance(exc, botocore.exceptions.ClientError):
        error = exc.response.get("Error", {})
        code = error.get("Code", "")
        message = " ".join(str(error.get("Message", "")).split())
        attempts = exc.response.get("ResponseMetadata", {}).get("RetryAttempts", 0) + 1
        if code in _ACCESS_DENIED:
            return (f"access denied: the IAM policy lacks {action} "
                    f"(see the IAM policy for discover in docs/aws.md)")
        if code in _THROTTLED:
            return (f"{action} throttled: botocore retried and gave up after {attempts} "
                    f"attempts ({code}); wait a minute and run discover again")
        if code in _EXPIRED:
            return f"AWS credentials have expired ({code}): refresh them and run again"
        if code in _OPT_IN:
            return f"region {region} is not enabled for this account ({code})"
        if code in _BAD_CREDENTIALS:
            return f"AWS rejected the credentials ({code}): {message}"
        return f"{action} failed: {code}: {message}"
    if isinstance(exc, botocore.exceptions.BotoCoreError):
        return f"{action} failed: {exc}"
    raise exc


class Aws:
    """The read-only calls discover makes. Pass a boto3 session; tests use Stubber on
    `.ec2` and `.sts`."""

    def __init__(self, sess: boto3.Session, region: str) -> None:
        self.region = region
        config = botocore.config.Config(
            retries={"mode": "standard", "total_max_attempts": RETRY_ATTEMPTS},
            connect_timeout=5, read_timeout=15,
        )
        # AWS_ENDPOINT_URL_EC2/_STS (botocore's own variables) reach private API endpoints.
        try:
            self.ec2 = sess.client("ec2", region_name=region, config=config)
            self.sts = sess.client("sts", region_name=region, config=config)
        except (botocore.exceptions.BotoCoreError, ValueError) as exc:
            raise AwsError(f"cannot use region {region!r}: {exc}") from None

    @contextlib.contextmanager
    def _calling(self, action: str) -> Iterator[None]:
        try:
            yield
        except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
            raise AwsError(describe_error(exc, action, self.region)) from None

    def account(self) -> str:
        with self._calling("sts:GetCallerIdentity"):
            return self.sts.get_caller_identity()["Account"]

    def vpc_endpoints(self, vpc_id: str) -> list[dict]:
        """All VPC endpoints in the VPC (every page); discover picks the ECR/S3 ones."""
        with self._calling("ec2:DescribeVpcEndpoints"):
            pages = self.ec2.get_paginator("describe_vpc_endpoints").paginate(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]}],
            )
            return [ep for page in pages for ep in page.get("VpcEndpoints", [])]

    def subnet(self, subnet_id: str) -> dict:
        with self._calling("ec2:DescribeSubnets"):
            try:
                subnets = self.ec2.describe_subnets(SubnetIds=[subnet_id]).get("Subnets", [])
            except botocore.exceptions.ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in (
                    "InvalidSubnetID.NotFound", "InvalidSubnetID.Malformed"
                ):
                    subnets = []
                else:
                    raise
        if not subnets:
            raise AwsError(f"subnet {subnet_id} not found in region {self.region}")
        return subnets[0]

    def route_tables(self, ids: list[str]) -> list[dict]:
        """These route tables (an S3 gateway endpoint's others), to see which subnets use them."""
        with self._calling("ec2:DescribeRouteTables"):
            pages = self.ec2.get_paginator("describe_route_tables").paginate(
                Filters=[{"Name": "route-table-id", "Values": list(ids)}],
            )
            return [t for page in pages for t in page.get("RouteTables", [])]

    def route_table(self, vpc_id: str, subnet_id: str | None) -> dict:
        """The route table that governs `subnet_id`: its explicit association, else the
        VPC's main table (subnets without an association use it)."""
        with self._calling("ec2:DescribeRouteTables"):
            paginator = self.ec2.get_paginator("describe_route_tables")
            if subnet_id:
                tables = [t for page in paginator.paginate(
                    Filters=[{"Name": "association.subnet-id", "Values": [subnet_id]}],
                ) for t in page.get("RouteTables", [])]
                if tables:
                    return tables[0]
            tables = [t for page in paginator.paginate(
                Filters=[{"Name": "vpc-id", "Values": [vpc_id]},
                         {"Name": "association.main", "Values": ["true"]}],
            ) for t in page.get("RouteTables", [])]
        if not tables:
            raise AwsError(f"VPC {vpc_id} not found in region {self.region} (it has no main "
                           "route table); check --vpc-id and --region")
        return tables[0]
