"""sniproxy.tools.iam: reading a policy document, and the meaning of each construct for one
concrete request (True, False, or None: cannot judge)."""

from __future__ import annotations

import json

import pytest

from sniproxy.tools import iam

OURS = "123456789012"
THEIRS = "999999999999"
REPO = f"arn:aws:ecr:eu-west-2:{OURS}:repository/app"
FOREIGN = f"arn:aws:ecr:eu-west-2:{THEIRS}:repository/app"


def doc(*statements: dict) -> str:
    return json.dumps({"Version": "2012-10-17", "Statement": list(statements)})


def allow(**kw) -> dict:
    return {"Effect": "Allow", "Principal": "*", "Action": "*", "Resource": "*", **kw}


def deny(**kw) -> dict:
    return {"Effect": "Deny", "Principal": "*", "Action": "*", "Resource": "*", **kw}


def decide(text: str, action: str = "ecr:PutImage", resource: str = FOREIGN,
           account: str | iam.Unknown = THEIRS) -> iam.Outcome:
    return iam.evaluate(iam.parse(text), iam.Request(action, resource, {"aws:resourceaccount": account}))


# --- parsing: every bad document is one line ---------------------------------------------------

@pytest.mark.parametrize("text, message", [
    (None, "the endpoint has no policy document"),
    ('{"Statement": [', "not valid JSON (Expecting value at line 1 column 16)"),
    ("[]", "not a JSON object"),
    ('{"Version": "2012-10-17"}', "no Statement"),
    ('{"Statement": []}', "Statement is empty"),
    ('{"Statement": [], "Extra": 1}', "unknown top-level element 'Extra'"),
    ('{"Statement": ["Allow"]}', "statement 1 is not a JSON object"),
    (doc(allow(), allow(Effect="allow")), "statement 2: Effect must be \"Allow\" or \"Deny\", not 'allow'"),
    (doc(allow(NotAction="s3:*")), "statement 1: needs exactly one of Action and NotAction"),
    (doc({"Effect": "Allow", "Principal": "*", "Action": "*"}), "statement 1: needs exactly one of Resource and NotResource"),
    (doc(allow(Action=[])), "statement 1: Action must be a string or a list of strings"),
    (doc(allow(Resource=["*", 3])), "statement 1: Resource must be a string or a list of strings"),
    (doc(allow(Condition={"StringEquals": "x"})), "statement 1: Condition must map operators to {key: value or values}"),
    (doc(allow(Effects="Allow")), "statement 1: unknown element 'Effects'"),
])
def test_bad_documents_are_one_line(text, message):
    with pytest.raises(iam.PolicyError) as caught:
        iam.parse(text)
    assert str(caught.value) == message
    assert "\n" not in str(caught.value)


def test_a_single_statement_object_and_condition_values_of_any_json_kind():
    (statement,) = iam.parse(json.dumps({"Statement": allow(Sid="One", Condition={
        "Bool": {"aws:SecureTransport": True}, "NumericLessThan": {"aws:MultiFactorAuthAge": 3600}})}))
    assert statement.label == 'statement 1 ("One")'
    assert [c.values for c in statement.conditions] == [("true",), ("3600",)]
    assert statement.summary == 'Allow Action "*" on Resource "*" with a Condition'


# --- the constructs ---------------------------------------------------------------------------

def test_default_full_access_allows_everything():
    outcome = decide(doc(allow()))
    assert outcome.allowed is True and outcome.by.number == 1


def test_actions_fold_case_resources_do_not():
    assert decide(doc(allow(Action="ECR:putimage", Resource=FOREIGN))).allowed is True
    assert decide(doc(allow(Resource=FOREIGN.upper()))).allowed is False


def test_wildcards_span_colons_and_slashes_and_question_mark_is_one_character():
    assert decide(doc(allow(Resource="arn:aws:ecr:*"))).allowed is True
    assert decide(doc(allow(Resource="arn:aws:ecr:eu-west-2:99999999999?:repository/*"))).allowed is True
    assert decide(doc(allow(Resource="arn:aws:ecr:eu-west-2:9999999999?:repository/*"))).allowed is False
    assert decide(doc(allow(Resource="arn:aws:ecr:eu-west-2:[9]*"))).allowed is False  # no character classes in IAM


def test_no_matching_allow_is_an_implicit_deny():
    outcome = decide(doc(allow(Resource=REPO)))
    assert outcome.allowed is False and outcome.by is None


def test_explicit_deny_wins_and_is_named():
    outcome = decide(doc(allow(), deny(Sid="NoPush", Action="ecr:PutImage")))
    assert outcome.allowed is False and outcome.by.label == 'statement 2 ("NoPush")'


def test_not_action_and_not_resource():
    text = doc({"Effect": "Allow", "Principal": "*", "NotAction": ["ecr:PutImage"], "Resource": "*"})
    assert decide(text, action="ecr:PutImage").allowed is False
    assert decide(text, action="ecr:BatchGetImage").allowed is True
    fenced = doc(allow(), {"Effect": "Deny", "Principal": "*", "Action": "ecr:*",
                           "NotResource": f"arn:aws:ecr:eu-west-2:{OURS}:repository/*"})
    assert decide(fenced).allowed is False
    assert decide(fenced, resource=REPO, account=OURS).allowed is True
    assert decide(fenced, action="ecr:GetAuthorizationToken", resource="*").allowed is False


def test_a_deny_for_some_principals_does_not_bind_the_builder():
    text = doc(allow(), deny(Principal={"AWS": "arn:aws:iam::210987654321:root"}))
    assert decide(text).allowed is True
    assert decide(doc(allow(), deny(Principal={"AWS": "*"}))).allowed is False
    not_principal = doc(allow(), {"Effect": "Deny", "NotPrincipal": {"AWS": f"arn:aws:iam::{OURS}:root"},
                                  "Action": "*", "Resource": "*"})
    assert decide(not_principal).allowed is True


@pytest.mark.parametrize("condition", [
    {"StringEquals": {"aws:PrincipalAccount": OURS}},
    {"StringNotEquals": {"aws:SourceVpce": "vpce-0123"}},
    {"StringEquals": {"aws:PrincipalTag/team": "build"}},
    {"IpAddress": {"aws:SourceIp": "10.8.0.0/16"}},
])
def test_conditions_on_the_caller_narrow_nothing(condition):
    """The builder meets an Allow's caller conditions, and escapes a Deny's."""
    assert decide(doc(allow(Condition=condition))).allowed is True
    assert decide(doc(allow(), deny(Condition=condition))).allowed is True


@pytest.mark.parametrize("operator, values, ours, theirs", [
    ("StringEquals", [OURS], True, False),
    ("StringEqualsIfExists", [OURS], True, False),
    ("ForAnyValue:StringEquals", [OURS], True, False),
    ("StringNotEquals", [OURS], False, True),
    ("StringNotEqualsIgnoreCase", [OURS], False, True),
    ("StringLike", ["1234*"], True, False),
    ("StringNotLike", ["*"], False, False),
])
def test_resource_account_conditions_are_exact(operator, values, ours, theirs):
    text = doc(allow(Condition={operator: {"aws:ResourceAccount": values}}))
    assert decide(text, resource=REPO, account=OURS).allowed is ours
    assert decide(text, account=THEIRS).allowed is theirs
    s3_key = doc(allow(Condition={operator: {"s3:ResourceAccount": values}}))
    assert decide(s3_key, account=THEIRS).allowed is theirs


def test_the_data_perimeter_deny_closes_other_accounts():
    text = doc(allow(), deny(Condition={"StringNotEqualsIfExists": {"aws:ResourceAccount": [OURS]}}))
    assert decide(text, resource=REPO, account=OURS).allowed is True
    assert decide(text).allowed is False


def test_an_unknown_owner_is_judged_only_when_the_lists_say_enough():
    """ECR's layer bucket belongs to AWS: not one of ours, id unknown."""
    aws_owned = iam.Unknown(frozenset({OURS}))
    only_ours = doc(allow(Condition={"StringEquals": {"aws:ResourceAccount": [OURS]}}))
    assert decide(only_ours, account=aws_owned).allowed is False
    with_another = doc(allow(Condition={"StringEquals": {"aws:ResourceAccount": [OURS, THEIRS]}}))
    outcome = decide(with_another, account=aws_owned)
    assert outcome.allowed is None
    assert outcome.why == ("statement 1: condition StringEquals on aws:ResourceAccount: depends on an "
                           "account sniproxy cannot know")
    assert decide(doc(allow(Condition={"StringLike": {"aws:ResourceAccount": "*"}})), account=aws_owned).allowed is True


@pytest.mark.parametrize("statement, why", [
    (deny(Condition={"StringNotEquals": {"aws:ResourceOrgID": "o-a1b2c3d4e5"}}),
     "statement 2: condition StringNotEquals on aws:ResourceOrgID: a key sniproxy does not judge"),
    (deny(Condition={"ForAllValues:StringEquals": {"aws:ResourceAccount": [OURS]}}),
     "statement 2: condition ForAllValues:StringEquals on aws:ResourceAccount: ForAllValues on a single-valued key"),
    (deny(Condition={"ArnNotLike": {"aws:ResourceAccount": OURS}}),
     "statement 2: condition ArnNotLike on aws:ResourceAccount: an operator sniproxy does not judge"),
    (deny(Resource="arn:aws:ecr:eu-west-2:${aws:PrincipalAccount}:repository/*"),
     "statement 2: a policy variable in Resource"),
])
def test_what_cannot_be_judged_says_so(statement, why):
    outcome = decide(doc(allow(), statement))
    assert outcome.allowed is None
    assert outcome.why == why


def test_cannot_judge_does_not_hide_a_certain_answer():
    """An unjudgeable Allow next to a certain one is still allowed; a certain Deny still wins."""
    unknown = allow(Condition={"StringEquals": {"ecr:ResourceTag/team": "build"}})
    assert decide(doc(unknown, allow())).allowed is True
    assert decide(doc(unknown, deny())).allowed is False
    assert decide(doc(unknown)).allowed is None


def test_an_action_without_a_resource_has_no_known_account():
    text = doc(allow(), deny(Condition={"StringNotEqualsIfExists": {"aws:ResourceAccount": [OURS]}}))
    outcome = decide(text, action="ecr:GetAuthorizationToken", resource="*", account=iam.Unknown())
    assert outcome.allowed is None
    assert "the request's value is not known" in outcome.why
