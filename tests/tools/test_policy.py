"""sniproxy.tools.policy: the generated endpoint policies, exactly; the registries read from the
config's routes; `sniproxy policy`; and a lint of every generated document by parliament, an
IAM policy linter that knows every action's resource types."""

from __future__ import annotations

import json
import os

import botocore.session
import pytest

from sniproxy import cli
from sniproxy import config as config_mod
from sniproxy.errors import ConfigError
from sniproxy.tools import policy

ACCOUNTS = ("123456789012", "210987654321")


def config(text: str, tmp_path) -> config_mod.Config:
    path = tmp_path / "sniproxy.toml"
    path.write_text('[[listen]]\naddress = "10.20.1.10"\n[resolver]\nnameservers = ["169.254.169.253"]\n' + text)
    return config_mod.load(str(path))


# --- facts ------------------------------------------------------------------------------------

def test_partition_agrees_with_botocore_for_every_region():
    session = botocore.session.get_session()
    regions = {(r, p) for p in session.get_available_partitions() for r in session.get_available_regions("ec2", p)}
    assert len(regions) > 30 and {p for _, p in regions} >= {"aws", "aws-cn", "aws-us-gov"}
    assert {r: policy.partition(r) for r, _ in regions} == {r: p for r, p in regions}


def test_ecr_document_exactly():
    assert policy.ecr_document("eu-west-2", ACCOUNTS) == {"Version": "2012-10-17", "Statement": [
        {"Sid": "SniproxyDockerLogin", "Effect": "Allow", "Principal": "*",
         "Action": "ecr:GetAuthorizationToken", "Resource": "*"},
        {"Sid": "SniproxyPushPullRoutedRegistries", "Effect": "Allow", "Principal": "*",
         "Action": ["ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:CompleteLayerUpload",
                    "ecr:GetDownloadUrlForLayer", "ecr:InitiateLayerUpload", "ecr:PutImage", "ecr:UploadLayerPart"],
         "Resource": ["arn:aws:ecr:eu-west-2:123456789012:repository/*",
                      "arn:aws:ecr:eu-west-2:210987654321:repository/*"]},
    ]}


@pytest.mark.parametrize("region, arn", [
    ("eu-west-2", "arn:aws:s3:::prod-eu-west-2-starport-layer-bucket/*"),
    ("cn-northwest-1", "arn:aws-cn:s3:::prod-cn-northwest-1-starport-layer-bucket/*"),
    ("us-gov-west-1", "arn:aws-us-gov:s3:::prod-us-gov-west-1-starport-layer-bucket/*"),
])
def test_s3_document_exactly(region, arn):
    """ECR's layers, and Amazon Linux 2023's package repositories, so that dnf still works on an
    instance whose subnet uses this endpoint (the bucket AWS names for an S3 endpoint policy)."""
    partition = arn.split(":")[1]
    assert policy.s3_document(region) == {"Version": "2012-10-17", "Statement": [
        {"Sid": "SniproxyEcrLayersOnly", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
         "Resource": arn},
        {"Sid": "AmazonLinux2023Repositories", "Effect": "Allow", "Principal": "*", "Action": "s3:GetObject",
         "Resource": f"arn:{partition}:s3:::al2023-repos-{region}-de612dc2/*"}]}
    assert policy.ecr_document(region, ACCOUNTS)["Statement"][1]["Resource"][0].startswith(arn.split(":s3:")[0] + ":ecr:")


# --- the lint ----------------------------------------------------------------------------------

def _parliament():
    try:
        import parliament
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("parliament is not installed: it belongs in the test extras (pyproject.toml)")
        pytest.skip("parliament is not installed (pip install parliament)")
    return parliament


def lint(document: dict) -> list[tuple[str, object]]:
    result = _parliament().analyze_policy_string(json.dumps(document))
    return [(finding.issue, finding.detail) for finding in result.findings]


@pytest.mark.parametrize("region", ["eu-west-2", "us-east-1", "cn-north-1", "us-gov-east-1", "ap-southeast-5"])
def test_generated_policies_pass_parliament(region):
    for name, document in policy.documents(region, ACCOUNTS).items():
        assert lint(document) == [], name


def test_parliament_would_catch_what_we_could_get_wrong():
    """The lint can fail: a misspelt action, or s3:GetObject on the bucket instead of its objects."""
    document = policy.ecr_document("eu-west-2", ACCOUNTS)
    document["Statement"][1]["Action"].append("ecr:PutImages")
    assert ("UNKNOWN_ACTION", "Unknown action ecr:PutImages") in lint(document)
    document = policy.s3_document("eu-west-2")
    document["Statement"][0]["Resource"] = "arn:aws:s3:::prod-eu-west-2-starport-layer-bucket"
    assert [issue for issue, _ in lint(document)] == ["RESOURCE_MISMATCH"]


# --- registries from the routes ---------------------------------------------------------------

def test_registries_from_the_ecr_table_with_fips_and_dualstack(tmp_path):
    cfg = config('[ecr]\nregion = "eu-west-2"\naccounts = ["123456789012", "210987654321"]\n'
                 "fips = true\ndualstack = true\n", tmp_path)
    assert policy.registries(cfg) == {"eu-west-2": ACCOUNTS}


def test_registries_from_hand_written_routes_in_two_regions(tmp_path):
    cfg = config('[[route]]\nname = "a"\nsni = ["123456789012.dkr.ecr.us-east-1.amazonaws.com", '
                 '"api.ecr.us-east-1.amazonaws.com", "registry.example.com"]\n'
                 '[[route]]\nname = "b"\nsni = "210987654321.dkr.ecr.cn-north-1.amazonaws.com.cn"\n'
                 '[[route]]\nname = "c"\nsni = "123456789012.dkr.ecr.us-east-1.example.com"\n', tmp_path)
    assert policy.registries(cfg) == {"us-east-1": ("123456789012",), "cn-north-1": ("210987654321",)}
    with pytest.raises(ConfigError, match="routes registries in cn-north-1, us-east-1: pass --region"):
        policy.pick_region(cfg, None)
    assert policy.pick_region(cfg, "cn-north-1") == ("cn-north-1", ("210987654321",))
    with pytest.raises(ConfigError, match="routes no registry in eu-west-1"):
        policy.pick_region(cfg, "eu-west-1")


def test_a_wildcard_registry_route_has_no_accounts_to_restrict_to(tmp_path):
    cfg = config('[[route]]\nname = "any"\nsni = "*.dkr.ecr.eu-west-2.amazonaws.com"\n', tmp_path)
    with pytest.raises(ConfigError, match=r"route 'any' sends every registry through \(\*\.dkr\.ecr"):
        policy.registries(cfg)


# --- sniproxy policy ---------------------------------------------------------------------------

def test_policy_command_writes_both_files(tmp_path, capsys):
    path = tmp_path / "sniproxy.toml"
    path.write_text('[[listen]]\naddress = "10.20.1.10"\n[resolver]\nnameservers = ["169.254.169.253"]\n'
                    '[ecr]\nregion = "eu-west-2"\naccounts = ["123456789012"]\n')
    out = tmp_path / "out"
    assert cli.main(["policy", "--config", str(path), "--out", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert sorted(os.listdir(out)) == ["ecr-endpoints.json", "s3-gateway.json"]
    assert json.loads((out / "ecr-endpoints.json").read_text()) == policy.ecr_document("eu-west-2", ("123456789012",))
    assert json.loads((out / "s3-gateway.json").read_text()) == policy.s3_document("eu-west-2")
    assert printed.out.splitlines()[0] == f"wrote {out}/ecr-endpoints.json, {out}/s3-gateway.json for 123456789012 in eu-west-2"
    assert f"--vpc-endpoint-id <ecr.dkr endpoint> --policy-document file://{out}/ecr-endpoints.json" in printed.out


@pytest.mark.parametrize("toml, message", [
    (None, "policy: error: config error: {path}: no such file"),
    ('[[route]]\nname = "m"\nsni = "registry.example.com"\n',
     "policy: error: config error: {path}: no registry names (<account>.dkr.ecr.<region>...) in the routes: "
     "nothing to write policies for"),
])
def test_policy_command_bad_config_is_one_line(tmp_path, capsys, toml, message):
    path = tmp_path / "sniproxy.toml"
    if toml is not None:
        path.write_text('[[listen]]\naddress = "10.20.1.10"\n[resolver]\nnameservers = ["169.254.169.253"]\n' + toml)
    assert cli.main(["policy", "--config", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err == message.format(path=path) + "\n"


def test_policy_command_unwritable_directory_is_one_line(tmp_path, capsys):
    path = tmp_path / "sniproxy.toml"
    path.write_text('[[listen]]\naddress = "10.20.1.10"\n[resolver]\nnameservers = ["169.254.169.253"]\n'
                    '[ecr]\nregion = "eu-west-2"\naccounts = ["123456789012"]\n')
    (tmp_path / "file").write_text("")
    assert cli.main(["policy", "--config", str(path), "--out", str(tmp_path / "file" / "out")]) == 2
    assert capsys.readouterr().err.startswith(f"policy: error: cannot write {tmp_path}/file/out: ")
