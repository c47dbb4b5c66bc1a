"""sniproxy.tools.exposure: the verdict on an endpoint policy, for the policies people really
attach: AWS's default, ours, ours for the wrong account or bucket, data-perimeter Denies, and
the ones we must refuse to guess about."""

from __future__ import annotations

import json

import pytest

from sniproxy.tools import exposure, policy
from tests.tools.test_aws import DEFAULT_GATEWAY_POLICY, DEFAULT_INTERFACE_POLICY

REGION = "eu-west-2"
OURS = ("123456789012", "210987654321")
LAYERS = "arn:aws:s3:::prod-eu-west-2-starport-layer-bucket/*"
PUSH_PULL = [f"{action} on {account}" for account in OURS for action in policy.REPOSITORY_ACTIONS]


def doc(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(**kw) -> dict:
    return {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", **kw}


def deny(**kw) -> dict:
    return {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*", **kw}


def ecr(text: str | None) -> exposure.Verdict:
    return exposure.judge_ecr(text, REGION, OURS)


def s3(text: str | None) -> exposure.Verdict:
    return exposure.judge_s3(text, REGION, OURS)


GENERATED_ECR = json.dumps(policy.ecr_document(REGION, OURS))
GENERATED_S3 = json.dumps(policy.s3_document(REGION))
PERIMETER = deny(Condition={"StringNotEqualsIfExists": {"aws:ResourceAccount": list(OURS)}})


# --- ECR ---------------------------------------------------------------------------------------

def test_ecr_default_policy_is_open_and_says_how():
    verdict = ecr(DEFAULT_INTERFACE_POLICY)
    assert verdict == exposure.Verdict(
        exposure.OPEN, 'statement 1 (Allow Action "*" on Resource "*") lets builders push to and pull from '
                       "repositories of accounts other than 123456789012, 210987654321")


def test_ecr_generated_policy_is_closed_and_lets_docker_work():
    assert ecr(GENERATED_ECR) == exposure.Verdict(exposure.CLOSED)


def test_ecr_policy_for_the_wrong_account_is_open_and_denies_ours():
    verdict = ecr(json.dumps(policy.ecr_document(REGION, ("999999999999",))))
    assert verdict.exposure == exposure.OPEN
    assert verdict.reason.startswith('statement 2 ("SniproxyPushPullRoutedRegistries") (Allow Action '
                                     '"ecr:BatchCheckLayerAvailability", "ecr:BatchGetImage", "ecr:CompleteLayerUpload", '
                                     '... on Resource "arn:aws:ecr:eu-west-2:999999999999:repository/*") lets builders '
                                     "push to and pull from")
    assert list(verdict.denied) == PUSH_PULL


def test_ecr_policy_for_one_of_two_accounts_denies_the_other():
    verdict = ecr(json.dumps(policy.ecr_document(REGION, OURS[:1])))
    assert verdict.exposure == exposure.CLOSED
    assert list(verdict.denied) == PUSH_PULL[len(policy.REPOSITORY_ACTIONS):]


def test_ecr_pull_only_policy_says_push_is_denied():
    pull_only = doc(allow(Action="ecr:GetAuthorizationToken"),
                    allow(Action=list(policy.PULL_ACTIONS), Resource=policy.repository_arns(REGION, OURS)))
    verdict = ecr(pull_only)
    assert verdict.exposure == exposure.CLOSED
    assert set(verdict.denied) == {f"{a} on {o}" for a in policy.PUSH_ACTIONS for o in OURS}


def test_ecr_deny_with_resource_account_condition_closes_the_default():
    verdict = ecr(doc(allow(), PERIMETER))
    assert verdict.exposure == exposure.CLOSED and not verdict.denied
    # Whether docker login passes depends on aws:ResourceAccount for an action with no resource.
    assert verdict.unjudged_needs == ("ecr:GetAuthorizationToken (docker login)",)


def test_ecr_condition_on_the_caller_does_not_close_it():
    verdict = ecr(doc(allow(Condition={"StringEquals": {"aws:PrincipalAccount": list(OURS)}})))
    assert verdict.exposure == exposure.OPEN
    assert verdict.reason.startswith('statement 1 (Allow Action "*" on Resource "*" with a Condition) lets')


def test_ecr_not_action_still_lets_builders_pull_elsewhere():
    verdict = ecr(doc({"Effect": "Allow", "Principal": "*", "NotAction": list(policy.PUSH_ACTIONS), "Resource": "*"}))
    assert verdict.exposure == exposure.OPEN
    assert "lets builders pull from repositories of accounts other than" in verdict.reason
    assert len(verdict.denied) == len(policy.PUSH_ACTIONS) * len(OURS)


def test_ecr_not_resource_deny_closes_it_and_catches_docker_login():
    fence = {"Effect": "Deny", "Principal": "*", "Action": "ecr:*", "NotResource": policy.repository_arns(REGION, OURS)}
    verdict = ecr(doc(allow(), fence))
    assert verdict.exposure == exposure.CLOSED
    assert verdict.denied == ("ecr:GetAuthorizationToken (docker login)",)


@pytest.mark.parametrize("resource", [
    "arn:aws:ecr:eu-west-2:12345678901?:repository/*",   # also 123456789010..19
    "arn:aws:ecr:eu-west-2:*:repository/*",
    "arn:aws:ecr:*:*:*",
    "arn:aws:ecr:eu-west-2:2109*",
    "*:99999*",
])
def test_ecr_wildcards_in_the_account_reach_other_accounts(resource):
    verdict = ecr(doc(allow(Action=list(policy.REPOSITORY_ACTIONS), Resource=resource)))
    assert verdict.exposure == exposure.OPEN


def test_ecr_other_actions_on_other_accounts_count_too():
    verdict = ecr(doc(allow(Action="ecr:Describe*", Resource="*")))
    assert verdict.exposure == exposure.OPEN
    assert verdict.reason.endswith("allows ecr:DescribeImages, ecr:DescribeRepositories on repositories of "
                                   "accounts other than 123456789012, 210987654321")


def test_ecr_a_repository_subset_of_ours_is_closed():
    verdict = ecr(doc(allow(Action="ecr:GetAuthorizationToken"),
                      allow(Action="ecr:*", Resource=[f"arn:aws:ecr:eu-west-2:{a}:repository/team-a/*" for a in OURS])))
    assert verdict == exposure.Verdict(exposure.CLOSED)


@pytest.mark.parametrize("statement, reason", [
    (deny(Condition={"StringNotEquals": {"aws:ResourceOrgID": "o-a1b2c3d4e5"}}),
     "statement 2: condition StringNotEquals on aws:ResourceOrgID: a key sniproxy does not judge"),
    (deny(Condition={"StringNotLike": {"aws:ResourceAccount": ["1234567890??", "2109*"]}}),
     None),  # judged: the fills of both patterns are tried
])
def test_ecr_deny_we_cannot_read_is_cannot_judge(statement, reason):
    verdict = ecr(doc(allow(), statement))
    if reason is None:
        assert verdict.exposure == exposure.OPEN  # 123456789099 passes the Deny's patterns
    else:
        assert verdict == exposure.Verdict(exposure.UNJUDGED, reason, (),
                                           ("ecr:GetAuthorizationToken (docker login)", *PUSH_PULL))


def test_ecr_malformed_policy():
    assert ecr('{"Statement": [{"Effect": "Allow",}]}') == exposure.Verdict(
        exposure.MALFORMED, "not valid JSON (Expecting property name enclosed in double quotes at line 1 column 35)")
    assert ecr(None).exposure == exposure.MALFORMED


# --- S3 ----------------------------------------------------------------------------------------

def test_s3_default_gateway_policy_is_open():
    verdict = s3(DEFAULT_GATEWAY_POLICY)
    assert verdict == exposure.Verdict(
        exposure.OPEN, 'statement 1 (Allow Action "*" on Resource "*") allows s3:PutObject, s3:GetObject, '
                       "s3:DeleteObject and 3 more on other buckets")


def test_s3_generated_policy_is_closed():
    assert s3(GENERATED_S3) == exposure.Verdict(exposure.CLOSED)


def test_s3_amazon_linux_repositories_are_not_an_opening():
    """dnf on Amazon Linux 2023 reads its packages from an AWS bucket of the region: allowing
    s3:GetObject there keeps the promise; uploads there, or its neighbours by wildcard, do not."""
    repos = "arn:aws:s3:::al2023-repos-eu-west-2-de612dc2/*"
    assert s3(doc(allow(Action="s3:GetObject", Resource=LAYERS), allow(Action="s3:GetObject", Resource=repos))) \
        == exposure.Verdict(exposure.CLOSED)
    assert s3(doc(allow(Action="s3:GetObject", Resource=LAYERS), allow(Action="s3:PutObject", Resource=repos))) \
        .exposure == exposure.OPEN
    assert s3(doc(allow(Action="s3:GetObject", Resource=LAYERS),
                  allow(Action="s3:GetObject", Resource="arn:aws:s3:::al2023-repos-*/*"))).exposure == exposure.OPEN
    # Not something docker needs: a policy without it is not short of anything.
    assert s3(doc(allow(Action="s3:GetObject", Resource=LAYERS))) == exposure.Verdict(exposure.CLOSED)


def test_s3_wrong_bucket_is_open_and_denies_layers():
    verdict = s3(json.dumps(policy.s3_document("eu-west-1")))
    assert verdict.exposure == exposure.OPEN
    assert verdict.reason.endswith("allows s3:GetObject on other buckets")
    assert verdict.denied == (f"s3:GetObject on {LAYERS}",)


@pytest.mark.parametrize("statement, reason_end", [
    (allow(Action="s3:*", Resource=LAYERS), "allows s3:PutObject, s3:DeleteObject, s3:GetObjectVersion "
                                            "on prod-eu-west-2-starport-layer-bucket"),
    (allow(Action="s3:GetObject", Resource="arn:aws:s3:::prod-*-starport-layer-bucket/*"),
     "allows s3:GetObject on other buckets"),  # anyone can create prod-x-starport-layer-bucket
    (allow(Action=["s3:GetObject", "s3:PutObject"], Resource=LAYERS), "allows s3:PutObject on prod-eu-west-2-starport-layer-bucket"),
    (allow(Action="s3:GetObject", Resource="arn:aws:s3:::*"), "allows s3:GetObject on other buckets"),
    (allow(Action="s3:ListBucket", Resource="arn:aws:s3:::prod-eu-west-2-starport-layer-bucket"),
     "allows s3:ListBucket on prod-eu-west-2-starport-layer-bucket"),
])
def test_s3_more_than_layer_downloads_is_open(statement, reason_end):
    verdict = s3(doc(allow(Action="s3:GetObject", Resource=LAYERS), statement))
    assert verdict.exposure == exposure.OPEN
    assert verdict.reason.endswith(reason_end)


def test_s3_resource_account_perimeter_still_reaches_your_own_buckets_and_blocks_ecrs():
    """A perimeter Deny keeps other accounts' buckets out, but not your own; and ECR's bucket is
    AWS's, so the same Deny also stops layer downloads."""
    verdict = s3(doc(allow(), PERIMETER))
    assert verdict.exposure == exposure.OPEN
    assert verdict.denied == (f"s3:GetObject on {LAYERS}",)


def test_s3_deny_with_condition_on_the_layer_bucket_only():
    """Allow everything, Deny everything except ECR's bucket: closed."""
    fence = {"Effect": "Deny", "Principal": "*", "NotAction": "s3:GetObject", "Resource": "*"}
    other = {"Effect": "Deny", "Principal": "*", "Action": "*", "NotResource": LAYERS}
    assert s3(doc(allow(), fence, other)) == exposure.Verdict(exposure.CLOSED)


def test_s3_unknown_condition_in_the_allow_is_cannot_judge():
    verdict = s3(doc(allow(Condition={"StringLike": {"s3:prefix": "sha256/*"}})))
    assert verdict.exposure == exposure.UNJUDGED
    assert verdict.reason == "statement 1: condition StringLike on s3:prefix: a key sniproxy does not judge"


@pytest.mark.parametrize("region", ["eu-west-2", "cn-north-1", "us-gov-west-1"])
def test_generated_policies_are_closed_in_every_partition(region):
    assert exposure.judge_ecr(json.dumps(policy.ecr_document(region, OURS)), region, OURS) == exposure.Verdict(exposure.CLOSED)
    assert exposure.judge_s3(json.dumps(policy.s3_document(region)), region, OURS) == exposure.Verdict(exposure.CLOSED)
    aws_partition = json.dumps(policy.s3_document(region)).replace(f"arn:{policy.partition(region)}:", "arn:aws:")
    if region != "eu-west-2":  # an ARN in the wrong partition matches nothing: layers denied
        assert exposure.judge_s3(aws_partition, region, OURS).denied
