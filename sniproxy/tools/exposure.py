"""Judge an endpoint policy against what the proxy promises: policy in, verdict and reasons out.

The question for the ECR endpoints: can a builder reach a repository of an account the routes do
not list? For the S3 endpoint: can it do anything but s3:GetObject on ECR's layer bucket? And
the other way round: does the policy still let docker log in, push and pull?

`sniproxy.tools.iam` answers for one concrete request. This module picks the requests: every
action that matters (the table below) on every account and bucket the policy itself names, plus
ones it names nowhere, plus wildcard fills, so that each pattern of the policy is exercised.
Pure: no AWS, no files.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections.abc import Iterable

from sniproxy.ecr import al2023_repo_bucket, starport_bucket
from sniproxy.tools import iam
from sniproxy.tools.policy import (
    AUTH_ACTION,
    LAYER_ACTION,
    PULL_ACTIONS,
    PUSH_ACTIONS,
    REPOSITORY_ACTIONS,
    layer_arn,
    partition,
)

# Actions whose reach matters, beyond the ones docker needs: reading or changing other
# accounts' repositories, and S3 uploads (the way data leaves) or reads of other buckets.
OTHER_ECR_ACTIONS = ("ecr:DescribeImages", "ecr:ListImages", "ecr:DescribeRepositories",
                     "ecr:BatchDeleteImage", "ecr:CreateRepository", "ecr:DeleteRepository",
                     "ecr:SetRepositoryPolicy")
OBJECT, BUCKET = "object", "bucket"
S3_ACTIONS = {"s3:PutObject": OBJECT, LAYER_ACTION: OBJECT, "s3:DeleteObject": OBJECT,
              "s3:GetObjectVersion": OBJECT, "s3:ListBucket": BUCKET, "s3:PutBucketPolicy": BUCKET}

PROBE_NAME = "sniproxy-probe"
PROBE_BUCKET = "sniproxy-probe-bucket"
FILLERS = ("0", "9", "z")
_ACCOUNT = re.compile(r"(?<![0-9])[0-9]{12}(?![0-9])")
_S3_ARN = re.compile(r"^arn:[^:]*:s3:::([^/]*)(?:/(.*))?$", re.DOTALL)
_ECR_ARN = re.compile(r"^arn:[^:]*:ecr:[^:]*:([^:]*):repository/(.*)$", re.DOTALL)
_ECR_ACCOUNT = re.compile(r"^arn:[^:]*:ecr:[^:]*:([^:]*)")
_DIGITS = re.compile(r"[0-9]{1,11}")

OPEN, CLOSED, UNJUDGED, MALFORMED = "open", "closed", "unjudged", "malformed"
_VERBS = {(True, True): "lets builders push to and pull from", (True, False): "lets builders push to",
          (False, True): "lets builders pull from"}


@dataclasses.dataclass(frozen=True)
class Verdict:
    exposure: str
    """OPEN (reaches beyond the promise), CLOSED, UNJUDGED ("cannot judge") or MALFORMED."""
    reason: str = ""
    """Why, in one clause: the statement that opens it, what could not be judged, or what is
    wrong with the document."""
    denied: tuple[str, ...] = ()
    """What docker needs and the policy refuses, e.g. "ecr:PutImage on 123456789012"."""
    unjudged_needs: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Probe:
    request: iam.Request
    acceptable: bool
    need: str | None = None
    """Set on requests docker needs: the label of the need it stands for."""


def _fills(pattern: str, length: int | None = None) -> set[str]:
    """Concrete strings a wildcard pattern matches, one per filler."""
    out = set()
    for filler in FILLERS:
        fixed = pattern.replace("?", filler[0])
        stars = fixed.count("*")
        if length is not None and stars:
            room = length - (len(fixed) - stars)
            if room < 0:
                continue
            fixed = fixed.replace("*", filler * room, 1).replace("*", "")
        else:
            fixed = fixed.replace("*", filler)
        if length is None or len(fixed) == length:
            out.add(fixed)
    return out


def _fresh(base: str, taken: set[str]) -> str:
    for i in itertools.count():
        candidate = base if i == 0 else f"{base[:-len(str(i))]}{i}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


def _texts(statements: tuple[iam.Statement, ...]) -> list[str]:
    return [r for s in statements for r in s.resources] + \
           [v for s in statements for c in s.conditions for v in c.values]


def _accounts(statements: tuple[iam.Statement, ...], configured: tuple[str, ...]) -> list[str]:
    """Configured accounts, accounts the policy names, wildcard fills, and one named nowhere."""
    named = {m for text in _texts(statements) for m in _ACCOUNT.findall(text)}
    patterns = [m.group(1) for r in (r for s in statements for r in s.resources) if (m := _ECR_ACCOUNT.match(r))]
    patterns += [v for s in statements for c in s.conditions
                 if iam.KEY_MEANINGS.get(c.key.lower()) == "aws:resourceaccount" for v in c.values]
    for pattern in filter(iam.has_wildcard, patterns):
        named |= {a for a in _fills(pattern, 12) if a.isdigit()}
    # Pieces of accounts under a wildcard anywhere ("*2109*"): try them at both ends.
    for run in (run for text in _texts(statements) if iam.has_wildcard(text) for run in _DIGITS.findall(text)):
        named |= {run.ljust(12, pad) for pad in "09"} | {run.rjust(12, pad) for pad in "09"}
    fresh = _fresh("000000000000", named | set(configured))
    return list(dict.fromkeys([*configured, *sorted(named), fresh]))


def _tails(statements: tuple[iam.Statement, ...], arn: re.Pattern[str], group: int) -> list[str]:
    """Repository names or object keys: a probe, plus fills of what the patterns allow."""
    tails = {PROBE_NAME}
    for pattern in (r for s in statements for r in s.resources):
        match = arn.match(pattern)
        if match and match.group(group):
            tails |= _fills(match.group(group))
    return sorted(tails)


def _ecr_probes(statements: tuple[iam.Statement, ...], region: str,
                configured: tuple[str, ...]) -> Iterable[_Probe]:
    yield _Probe(iam.Request(AUTH_ACTION, "*", {"aws:resourceaccount": iam.Unknown()}), True,
                 need=f"{AUTH_ACTION} (docker login)")
    named = {a for s in statements for a in s.actions if a.lower().startswith("ecr:") and not iam.has_wildcard(a)}
    actions = list(dict.fromkeys([*REPOSITORY_ACTIONS, *OTHER_ECR_ACTIONS, *sorted(named - {AUTH_ACTION})]))
    names = _tails(statements, _ECR_ARN, 2)
    for account in _accounts(statements, configured):
        ours = account in configured
        for action, name in itertools.product(actions, names):
            arn = f"arn:{partition(region)}:ecr:{region}:{account}:repository/{name}"
            needed = ours and action in REPOSITORY_ACTIONS
            yield _Probe(iam.Request(action, arn, {"aws:resourceaccount": account}), ours,
                         need=f"{action} on {account}" if needed else None)


def _s3_probes(statements: tuple[iam.Statement, ...], region: str,
               configured: tuple[str, ...]) -> Iterable[_Probe]:
    layers = starport_bucket(region)
    # Buckets AWS owns, whose objects may be read through the endpoint: ECR's layers (which
    # docker needs) and Amazon Linux 2023's packages (which dnf needs, docker does not).
    readable = {layers, al2023_repo_bucket(region)}
    named: set[str] = set()
    for pattern in (r for s in statements for r in s.resources):
        match = _S3_ARN.match(pattern)
        if match:
            bucket = match.group(1)
            named |= _fills(bucket) if iam.has_wildcard(bucket) else {bucket}
    buckets = [layers, *sorted(named - {layers}), _fresh(PROBE_BUCKET, named | readable)]
    owners = _accounts(statements, configured)
    keys = _tails(statements, _S3_ARN, 2)
    literal = {a for s in statements for a in s.actions if a.lower().startswith("s3:") and not iam.has_wildcard(a)}
    actions = dict(S3_ACTIONS)
    for action in sorted(literal - set(actions)):
        actions[action] = OBJECT  # and BUCKET: an unknown action is tried on both below
    for action, kind in actions.items():
        kinds = (OBJECT, BUCKET) if action not in S3_ACTIONS else (kind,)
        for bucket, shape in itertools.product(buckets, kinds):
            # AWS's buckets: not one of your accounts, id unknown.
            bucket_owners = [iam.Unknown(frozenset(configured))] if bucket in readable else owners
            for owner in bucket_owners:
                for key in (keys if shape == OBJECT else [""]):
                    arn = f"arn:{partition(region)}:s3:::{bucket}" + (f"/{key}" if shape == OBJECT else "")
                    acceptable = action == LAYER_ACTION and bucket in readable and shape == OBJECT
                    needed = acceptable and bucket == layers
                    yield _Probe(iam.Request(action, arn, {"aws:resourceaccount": owner}), acceptable,
                                 need=f"{LAYER_ACTION} on {layer_arn(region)}" if needed else None)


def _summary(actions: list[str]) -> str:
    """The first few, in the order of the tables above: the ones that matter most come first."""
    actions = list(dict.fromkeys(actions))
    shown = ", ".join(actions[:3])
    return shown + (f" and {len(actions) - 3} more" if len(actions) > 3 else "")


def _judge(document: str | None, probes_for, where_for) -> Verdict:
    try:
        statements = iam.parse(document)
    except iam.PolicyError as exc:
        return Verdict(MALFORMED, str(exc))
    probes = list(probes_for(statements))
    outcomes = [(p, iam.evaluate(statements, p.request)) for p in probes]
    needs: dict[str, list[bool | None]] = {}
    for probe, outcome in outcomes:
        if probe.need:
            needs.setdefault(probe.need, []).append(outcome.allowed)
    denied = tuple(n for n, results in needs.items() if True not in results and None not in results)
    unjudged_needs = tuple(n for n, results in needs.items() if True not in results and None in results)
    opened = [(p, o) for p, o in outcomes if not p.acceptable and o.allowed is True]
    if opened:
        by = opened[0][1].by
        mine = [p for p, o in opened if o.by == by]
        source = f"{by.label} ({by.summary})" if by is not None else "an Allow"
        reason = f"{source} {where_for(mine)}"
        return Verdict(OPEN, reason, denied, unjudged_needs)
    unknown = [o for p, o in outcomes if not p.acceptable and o.allowed is None]
    if unknown:
        return Verdict(UNJUDGED, unknown[0].why, denied, unjudged_needs)
    return Verdict(CLOSED, "", denied, unjudged_needs)


def judge_ecr(document: str | None, region: str, accounts: tuple[str, ...]) -> Verdict:
    """For an ecr.api or ecr.dkr endpoint: OPEN when it lets anyone reach other accounts' repositories."""
    def where(probes: list[_Probe]) -> str:
        push = any(p.request.action in PUSH_ACTIONS for p in probes)
        pull = any(p.request.action in PULL_ACTIONS for p in probes)
        verb = _VERBS.get((push, pull)) or f"allows {_summary([p.request.action for p in probes])} on"
        return f"{verb} repositories of accounts other than {', '.join(accounts)}"
    return _judge(document, lambda s: _ecr_probes(s, region, accounts), where)


def judge_s3(document: str | None, region: str, accounts: tuple[str, ...]) -> Verdict:
    """For the S3 endpoint of the proxy's subnet: OPEN when it allows more than layer downloads
    (and Amazon Linux 2023's package downloads)."""
    layers = starport_bucket(region)

    def where(probes: list[_Probe]) -> str:
        other = any(f":::{layers}" not in p.request.resource for p in probes)
        return f"allows {_summary([p.request.action for p in probes])} on " + ("other buckets" if other else layers)
    return _judge(document, lambda s: _s3_probes(s, region, accounts), where)
