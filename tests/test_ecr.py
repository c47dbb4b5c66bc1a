"""The [ecr] shorthand: the names ECR clients really use, cross-checked against botocore's rules."""

from __future__ import annotations

import itertools

import pytest

from sniproxy.config import ConfigError, from_dict
from sniproxy.ecr import API, DKR, S3, ecr_names, ecr_routes
from sniproxy.hostnames import normalize_host
from sniproxy.routes import RouteTable

A1, A2, A3 = "123456789012", "210987654321", "000000000001"


def test_normal_region():
    assert ecr_names("us-east-1", (A1,)) == {
        API: ["api.ecr.us-east-1.amazonaws.com", "ecr.us-east-1.amazonaws.com"],
        DKR: [f"{A1}.dkr.ecr.us-east-1.amazonaws.com"],
        S3: [
            "prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com",
            "prod-us-east-1-starport-layer-bucket.s3.amazonaws.com",  # the legacy global name
        ],
    }


def test_china_region():
    names = ecr_names("cn-north-1", (A1,))
    assert names[API] == ["api.ecr.cn-north-1.amazonaws.com.cn", "ecr.cn-north-1.amazonaws.com.cn"]
    assert names[DKR] == [f"{A1}.dkr.ecr.cn-north-1.amazonaws.com.cn"]
    assert names[S3] == [
        "prod-cn-north-1-starport-layer-bucket.s3.cn-north-1.amazonaws.com.cn",
        "prod-cn-north-1-starport-layer-bucket.s3.amazonaws.com.cn",
    ]


def test_fips_adds_fips_names():
    names = ecr_names("us-gov-west-1", (A1, A2), fips=True)
    assert names[API] == [
        "api.ecr.us-gov-west-1.amazonaws.com",
        "ecr.us-gov-west-1.amazonaws.com",
        "api.ecr-fips.us-gov-west-1.amazonaws.com",
        "ecr-fips.us-gov-west-1.amazonaws.com",
    ]
    assert names[DKR] == [
        f"{A1}.dkr.ecr.us-gov-west-1.amazonaws.com",
        f"{A2}.dkr.ecr.us-gov-west-1.amazonaws.com",
        f"{A1}.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
        f"{A2}.dkr.ecr-fips.us-gov-west-1.amazonaws.com",
    ]


@pytest.mark.parametrize(
    "region, api, dkr, s3",
    [
        ("eu-west-1", "ecr.eu-west-1.api.aws", f"{A1}.dkr-ecr.eu-west-1.on.aws",
         "prod-eu-west-1-starport-layer-bucket.s3.dualstack.eu-west-1.amazonaws.com"),
        ("cn-northwest-1", "ecr.cn-northwest-1.api.amazonwebservices.com.cn",
         f"{A1}.dkr-ecr.cn-northwest-1.on.amazonwebservices.com.cn",
         "prod-cn-northwest-1-starport-layer-bucket.s3.dualstack.cn-northwest-1.amazonaws.com.cn"),
    ],
)
def test_dualstack_adds_dualstack_names(region, api, dkr, s3):
    plain = ecr_names(region, (A1,))
    names = ecr_names(region, (A1,), dualstack=True)
    assert names[API] == plain[API] + [api]
    assert names[DKR] == plain[DKR] + [dkr]
    assert names[S3] == plain[S3] + [s3]


def test_several_accounts_in_order():
    names = ecr_names("ap-southeast-1", (A2, A1, A3))
    assert names[DKR] == [f"{a}.dkr.ecr.ap-southeast-1.amazonaws.com" for a in (A2, A1, A3)]
    assert len(names[API]) == 2 and len(names[S3]) == 2  # not per account


@pytest.mark.parametrize("fips, dualstack", itertools.product([False, True], repeat=2))
@pytest.mark.parametrize("region", ["us-east-1", "cn-north-1", "us-gov-east-1", "il-central-1"])
def test_names_are_valid_and_unique(region, fips, dualstack):
    names = ecr_names(region, (A1, A2), fips, dualstack)
    flat = [n for ns in names.values() for n in ns]
    assert len(flat) == len(set(flat))
    assert all(normalize_host(n) == n for n in flat)


def test_routes_default_to_the_sni_and_port_443():
    routes = ecr_routes("us-east-1", (A1,))
    assert [r.name for r in routes] == [API, DKR, S3]
    assert all(r.upstream is None and r.port == 443 for r in routes)
    table = RouteTable(routes)
    assert table.match(f"{A1}.dkr.ecr.us-east-1.amazonaws.com").name == DKR
    assert table.match(f"{A2}.dkr.ecr.us-east-1.amazonaws.com") is None  # only the listed accounts
    assert table.match("prod-us-east-1-starport-layer-bucket.s3.amazonaws.com").name == S3
    assert table.match("api.ecr.us-west-2.amazonaws.com") is None


def test_upstream_overrides_and_port():
    vpce_api = "vpce-0a1b2c3d4e5f-abcdefgh.api.ecr.us-east-1.vpce.amazonaws.com"
    vpce_dkr = "vpce-0a1b2c3d4e5f-ijklmnop.dkr.ecr.us-east-1.vpce.amazonaws.com"
    routes = {r.name: r for r in ecr_routes("us-east-1", (A1,), port=8443, upstreams={"api": vpce_api, "dkr": vpce_dkr})}
    assert routes[API].upstream_for("api.ecr.us-east-1.amazonaws.com") == vpce_api
    assert routes[DKR].upstream_for(f"{A1}.dkr.ecr.us-east-1.amazonaws.com") == vpce_dkr
    sni = "prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com"
    assert routes[S3].upstream is None and routes[S3].upstream_for(sni) == sni
    assert {r.port for r in routes.values()} == {8443}


# -- cross-check: the endpoint botocore's own rules pick for ECR must be routed ---------------------


@pytest.fixture(scope="module")
def botocore_session():
    import os

    import botocore.session

    # this machine sets AWS_* globally; the endpoint rules must see none of it
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith("AWS_")}
    os.environ["AWS_CONFIG_FILE"] = os.environ["AWS_SHARED_CREDENTIALS_FILE"] = "/nonexistent/sniproxy-test"
    try:
        yield botocore.session.Session()
    finally:
        for k in ("AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
            os.environ.pop(k, None)
        os.environ.update(saved)


def sdk_api_host(session, region: str, fips: bool, dualstack: bool) -> str:
    from urllib.parse import urlsplit

    import botocore.config

    client = session.create_client(
        "ecr", region_name=region, aws_access_key_id="AKIDEXAMPLE", aws_secret_access_key="x",
        config=botocore.config.Config(use_fips_endpoint=fips, use_dualstack_endpoint=dualstack),
    )
    return urlsplit(client.meta.endpoint_url).hostname


@pytest.mark.parametrize("fips, dualstack", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("region", ["us-east-1", "eu-west-1", "cn-north-1", "cn-northwest-1", "us-gov-west-1"])
def test_sdk_api_endpoint_is_routed(botocore_session, region, fips, dualstack):
    host = sdk_api_host(botocore_session, region, fips, dualstack)
    assert host in ecr_names(region, (A1,), fips, dualstack)[API]


@pytest.mark.parametrize("region", ["us-east-1", "cn-north-1"])
def test_sdk_fips_dualstack_api_endpoint_is_routed(botocore_session, region):
    host = sdk_api_host(botocore_session, region, True, True)
    assert host in ecr_names(region, (A1,), True, True)[API]


@pytest.mark.parametrize("region", ["us-iso-east-1", "us-isob-east-1"])
def test_iso_region_is_refused_or_routed_right(botocore_session, region):
    host = sdk_api_host(botocore_session, region, False, False)
    data = {"listen": [{"address": "127.0.0.1"}], "resolver": {"nameservers": ["127.0.0.53"]},
            "ecr": {"region": region, "accounts": [A1]}}
    try:
        config = from_dict(data)
    except ConfigError as exc:
        assert exc.path == "ecr.region"
        return
    assert host in [p for r in config.routes for p in r.patterns]
