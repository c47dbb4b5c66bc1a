"""The minimal VPC endpoint policies for what the proxy routes, and `sniproxy policy`.

The route table promises which registries builders reach; the endpoint policies make AWS keep
that promise for the requests the proxy cannot see inside TLS. Pure logic: the registries are
read from the config's routes, the documents are plain dicts. `main` only writes files.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from sniproxy import config as config_mod
from sniproxy.config import Config
from sniproxy.ecr import DKR, al2023_repo_bucket, ecr_names, starport_bucket
from sniproxy.errors import ConfigError
from sniproxy.routes import is_wildcard

# What docker (and the AWS SDKs behind `docker login`) call through the endpoints, and why.
# ecr:GetAuthorizationToken names no resource, so its statement needs Resource "*"; the others
# are repository actions, limited to the registries the proxy routes.
AUTH_ACTION = "ecr:GetAuthorizationToken"
PULL_ACTIONS = ("ecr:BatchGetImage", "ecr:GetDownloadUrlForLayer")
PUSH_ACTIONS = ("ecr:BatchCheckLayerAvailability", "ecr:InitiateLayerUpload", "ecr:UploadLayerPart",
                "ecr:CompleteLayerUpload", "ecr:PutImage")
REPOSITORY_ACTIONS = tuple(sorted(PULL_ACTIONS + PUSH_ACTIONS))
LAYER_ACTION = "s3:GetObject"

# Partition by region prefix; every other region is in "aws" (tests check this against botocore).
PARTITIONS = {"cn-": "aws-cn", "us-gov-": "aws-us-gov", "us-iso-": "aws-iso", "us-isob-": "aws-iso-b",
              "eu-isoe-": "aws-iso-e", "us-isof-": "aws-iso-f", "eusc-": "aws-eusc"}

FILES = {"ecr": "ecr-endpoints.json", "s3": "s3-gateway.json"}
DEFAULT_OUT = "sniproxy-policies"
VERSION = "2012-10-17"

# Candidates for registry names in the routes; ecr_names() then confirms each one, so the name
# shapes stay defined in sniproxy.ecr alone.
_DKR_CANDIDATE = re.compile(r"^([0-9]{12})\.dkr[.-]ecr(?:-fips)?\.([a-z0-9-]+)\.")


def partition(region: str) -> str:
    return next((name for prefix, name in PARTITIONS.items() if region.startswith(prefix)), "aws")


def repository_arns(region: str, accounts: tuple[str, ...]) -> list[str]:
    return [f"arn:{partition(region)}:ecr:{region}:{account}:repository/*" for account in accounts]


def layer_arn(region: str) -> str:
    return f"arn:{partition(region)}:s3:::{starport_bucket(region)}/*"


def al2023_repo_arn(region: str) -> str:
    return f"arn:{partition(region)}:s3:::{al2023_repo_bucket(region)}/*"


def ecr_document(region: str, accounts: tuple[str, ...]) -> dict:
    """For the ecr.api and ecr.dkr endpoints: docker login, push and pull, to these registries only."""
    return {"Version": VERSION, "Statement": [
        {"Sid": "SniproxyDockerLogin", "Effect": "Allow", "Principal": "*",
         "Action": AUTH_ACTION, "Resource": "*"},
        {"Sid": "SniproxyPushPullRoutedRegistries", "Effect": "Allow", "Principal": "*",
         "Action": list(REPOSITORY_ACTIONS), "Resource": repository_arns(region, accounts)},
    ]}


def s3_document(region: str) -> dict:
    """For the S3 endpoint the proxy's subnet uses: layer downloads from ECR's bucket, and
    package downloads from Amazon Linux 2023's, without which dnf fails on the proxy's own
    instances (and on any other AL2023 instance of that subnet)."""
    return {"Version": VERSION, "Statement": [
        {"Sid": "SniproxyEcrLayersOnly", "Effect": "Allow", "Principal": "*",
         "Action": LAYER_ACTION, "Resource": layer_arn(region)},
        {"Sid": "AmazonLinux2023Repositories", "Effect": "Allow", "Principal": "*",
         "Action": LAYER_ACTION, "Resource": al2023_repo_arn(region)},
    ]}


def documents(region: str, accounts: tuple[str, ...]) -> dict[str, dict]:
    """File name -> policy document."""
    return {FILES["ecr"]: ecr_document(region, accounts), FILES["s3"]: s3_document(region)}


def render(document: dict) -> str:
    return json.dumps(document, indent=2) + "\n"


def registries(config: Config) -> dict[str, tuple[str, ...]]:
    """Region -> the registry accounts the routes let through, from their exact names.

    A wildcard that would route any account's registry is a ConfigError: there is no account
    list to restrict the endpoints to."""
    found: dict[str, list[str]] = {}
    for route in config.routes:
        for name in route.patterns:
            if is_wildcard(name) and ".dkr" in name and "ecr" in name:
                raise ConfigError("", f"route {route.name!r} sends every registry through ({name}): "
                                      "list the accounts instead, so the endpoints can be limited to them")
            match = _DKR_CANDIDATE.match(name)
            if not match:
                continue
            account, region = match.groups()
            if name in ecr_names(region, (account,), fips=True, dualstack=True)[DKR]:
                accounts = found.setdefault(region, [])
                if account not in accounts:
                    accounts.append(account)
    return {region: tuple(accounts) for region, accounts in found.items()}


def pick_region(config: Config, region: str | None) -> tuple[str, tuple[str, ...]]:
    """The one region to write policies for, and its accounts."""
    found = registries(config)
    if not found:
        raise ConfigError("", f"{config.source}: no registry names (<account>.dkr.ecr.<region>...) "
                              "in the routes: nothing to write policies for")
    if region is None:
        if len(found) > 1:
            raise ConfigError("", f"{config.source} routes registries in {', '.join(sorted(found))}: "
                                  "pass --region (endpoints are regional)")
        region = next(iter(found))
    if region not in found:
        raise ConfigError("", f"{config.source} routes no registry in {region}")
    return region, found[region]


# --- command line ----------------------------------------------------------------------------

def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", default=config_mod.DEFAULT_PATH,
                        help=f"TOML config whose registries the policies allow (default {config_mod.DEFAULT_PATH})")
    parser.add_argument("--region", help="the region to write for, when the config routes several")
    parser.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                        help="directory for the policy files (default %(default)s)")


def write(out: str, region: str, accounts: tuple[str, ...]) -> list[str]:
    """Write the documents into `out` (created if missing); returns the paths."""
    os.makedirs(out, exist_ok=True)
    paths = []
    for name, document in documents(region, accounts).items():
        path = os.path.join(out, name)
        with open(path, "w") as handle:
            handle.write(render(document))
        paths.append(path)
    return paths


def apply_commands(region: str, out: str) -> list[str]:
    """How to attach the files, with the endpoint ids left for `sniproxy discover` to fill in."""
    return [
        f"aws ec2 modify-vpc-endpoint --region {region} --vpc-endpoint-id <ecr.api endpoint> "
        f"--policy-document file://{os.path.join(out, FILES['ecr'])}",
        f"aws ec2 modify-vpc-endpoint --region {region} --vpc-endpoint-id <ecr.dkr endpoint> "
        f"--policy-document file://{os.path.join(out, FILES['ecr'])}",
        f"aws ec2 modify-vpc-endpoint --region {region} --vpc-endpoint-id <S3 endpoint of the proxy's "
        f"subnet> --policy-document file://{os.path.join(out, FILES['s3'])}",
    ]


def main(args: argparse.Namespace) -> int:
    """0: written; 2: a bad config or an unwritable directory (one line)."""
    try:
        config = config_mod.load(args.config)
        region, accounts = pick_region(config, args.region)
    except ConfigError as exc:
        print(f"policy: error: {exc}", file=sys.stderr)
        return 2
    try:
        paths = write(args.out, region, accounts)
    except OSError as exc:
        print(f"policy: error: cannot write {args.out}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    print(f"wrote {', '.join(paths)} for {', '.join(accounts)} in {region}")
    print("attach them (sniproxy discover prints these with your endpoint ids, and warns first if "
          "the S3 endpoint is shared with other subnets):")
    for line in apply_commands(region, args.out):
        print("  " + line)
    return 0
