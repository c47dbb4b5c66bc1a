"""boto3 as a builder runs it: default endpoint, CA from AWS_CA_BUNDLE, names from /etc/hosts.

Run inside a client namespace. Prints one JSON object: the registry id from
describe_registry and, from get_authorization_token, the token, its endpoint and the
user/password it decodes to. Exits 1 with a one-line error when a call fails.
"""

from __future__ import annotations

import base64
import json
import sys

import boto3
import botocore.config
import botocore.exceptions


def main() -> int:
    config = botocore.config.Config(
        retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=10)
    ecr = boto3.client("ecr", config=config)  # region from AWS_DEFAULT_REGION
    try:
        registry = ecr.describe_registry()
        auth = ecr.get_authorization_token()["authorizationData"][0]
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as exc:
        print(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return 1
    user, _, password = base64.b64decode(auth["authorizationToken"]).decode().partition(":")
    print(json.dumps({
        "endpoint": ecr.meta.endpoint_url,
        "registryId": registry["registryId"],
        "proxyEndpoint": auth["proxyEndpoint"],
        "user": user,
        "password": password,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
