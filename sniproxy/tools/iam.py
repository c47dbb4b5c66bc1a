"""IAM policy documents read without AWS: parse one, and tell whether it allows a request.

Sans-I/O and three-valued. `parse` turns the text of a policy into statements or raises one
`PolicyError`; `evaluate` answers True, False or None (cannot judge) for one concrete request,
naming the statement that decided or the construct that could not be read. Which requests to
ask about is the caller's business (`sniproxy.tools.exposure`); this module knows only the
policy language.

The caller is always "a builder the endpoint lets in": someone who holds credentials the
endpoint policy admits, which is exactly who could misuse an allowed SNI. So everything that
says *who* calls (Principal, NotPrincipal, aws:PrincipalAccount, aws:SourceVpc, ...) narrows
nothing: the builder meets every such condition of an Allow, and escapes every such condition
of a Deny. What the request *reaches* (its action, its resource, the resource's account) is
evaluated exactly. Anything else is "cannot judge", never a guess.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
from collections.abc import Mapping

from sniproxy.errors import SniproxyError

ALLOW, DENY = "Allow", "Deny"
_STATEMENT_KEYS = {"Sid", "Effect", "Principal", "NotPrincipal", "Action", "NotAction",
                   "Resource", "NotResource", "Condition"}
_TOP_KEYS = {"Version", "Id", "Statement"}


class PolicyError(SniproxyError):
    """The document is not a policy we can read: one line saying where."""


# --- three-valued logic: True, False, None for "cannot judge" ----------------------------------

def _any(values) -> bool | None:
    values = list(values)
    return True if True in values else (None if None in values else False)


def _all(values) -> bool | None:
    values = list(values)
    return False if False in values else (None if None in values else True)


def _not(value: bool | None) -> bool | None:
    return None if value is None else not value


# --- the document ------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Condition:
    operator: str
    key: str
    values: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Statement:
    number: int
    """1-based position in the document, as people count statements."""
    sid: str
    effect: str
    everyone: bool
    """Principal "*" (or {"AWS": "*"}): a Deny then binds every builder."""
    actions: tuple[str, ...]
    not_action: bool
    resources: tuple[str, ...]
    not_resource: bool
    conditions: tuple[Condition, ...]

    @property
    def label(self) -> str:
        return f'statement {self.number}' + (f' ("{self.sid}")' if self.sid else "")

    @property
    def summary(self) -> str:
        """Its Action and Resource as written, for a reason line."""
        def show(items: tuple[str, ...]) -> str:
            return ", ".join(f'"{item}"' for item in items[:3]) + (", ..." if len(items) > 3 else "")
        action = ("NotAction " if self.not_action else "Action ") + show(self.actions)
        resource = ("NotResource " if self.not_resource else "Resource ") + show(self.resources)
        condition = " with a Condition" if self.conditions else ""
        return f"{self.effect} {action} on {resource}{condition}"


def _strings(value: object, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and value and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise PolicyError(f"{where} must be a string or a list of strings")


def _condition_values(value: object) -> tuple[str, ...]:
    items = value if isinstance(value, list) else [value]
    out = []
    for item in items:
        if isinstance(item, bool):
            out.append("true" if item else "false")
        elif isinstance(item, str | int | float):
            out.append(str(item))
        else:
            raise ValueError
    return tuple(out)


def _everyone(principal: object) -> bool:
    if principal == "*":
        return True
    if isinstance(principal, dict):
        aws = principal.get("AWS")
        return aws == "*" or (isinstance(aws, list) and "*" in aws)
    return False


def _statement(number: int, raw: object) -> Statement:
    where = f"statement {number}"
    if not isinstance(raw, dict):
        raise PolicyError(f"{where} is not a JSON object")
    unknown = sorted(set(raw) - _STATEMENT_KEYS)
    if unknown:
        raise PolicyError(f"{where}: unknown element {unknown[0]!r}")
    effect = raw.get("Effect")
    if effect not in (ALLOW, DENY):
        raise PolicyError(f'{where}: Effect must be "Allow" or "Deny", not {effect!r}')
    pairs = {}
    for name in ("Action", "Resource"):
        given = [key for key in (name, "Not" + name) if key in raw]
        if len(given) != 1:
            raise PolicyError(f"{where}: needs exactly one of {name} and Not{name}")
        pairs[name] = (_strings(raw[given[0]], f"{where}: {given[0]}"), given[0].startswith("Not"))
    conditions = []
    block = raw.get("Condition", {})
    try:
        if not isinstance(block, dict):
            raise ValueError
        for operator, keys in block.items():
            if not isinstance(keys, dict):
                raise ValueError
            conditions += [Condition(operator, key, _condition_values(v)) for key, v in keys.items()]
    except ValueError:
        raise PolicyError(f"{where}: Condition must map operators to {{key: value or values}}") from None
    sid = raw.get("Sid", "")
    return Statement(
        number=number, sid=sid if isinstance(sid, str) else str(sid), effect=effect,
        everyone="NotPrincipal" not in raw and _everyone(raw.get("Principal", "*")),
        actions=pairs["Action"][0], not_action=pairs["Action"][1],
        resources=pairs["Resource"][0], not_resource=pairs["Resource"][1],
        conditions=tuple(conditions),
    )


def parse(text: str | None) -> tuple[Statement, ...]:
    """The statements of a policy document; PolicyError (one line) when it cannot be read."""
    if text is None:
        raise PolicyError("the endpoint has no policy document")
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise PolicyError(f"not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from None
    if not isinstance(document, dict):
        raise PolicyError("not a JSON object")
    unknown = sorted(set(document) - _TOP_KEYS)
    if unknown:
        raise PolicyError(f"unknown top-level element {unknown[0]!r}")
    if "Statement" not in document:
        raise PolicyError("no Statement")
    raw = document["Statement"]
    raw = raw if isinstance(raw, list) else [raw]
    if not raw:
        raise PolicyError("Statement is empty")
    return tuple(_statement(i, item) for i, item in enumerate(raw, 1))


# --- matching ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _glob(pattern: str, fold: bool) -> re.Pattern[str]:
    """IAM wildcards: '*' any run of characters (':' and '/' included), '?' one character."""
    body = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.compile(body, re.DOTALL | (re.IGNORECASE if fold else 0))


def glob_match(pattern: str, value: str, fold: bool = False) -> bool:
    return _glob(pattern, fold).fullmatch(value) is not None


def has_wildcard(text: str) -> bool:
    return "*" in text or "?" in text


@dataclasses.dataclass(frozen=True)
class Unknown:
    """A context value we cannot know, except that it is none of `not_in` (the owner of an
    AWS-owned bucket is not one of your accounts; an action with no resource has no account)."""

    not_in: frozenset[str] = frozenset()


@dataclasses.dataclass(frozen=True)
class Request:
    action: str
    resource: str
    """An ARN, or "*" for actions that name no resource (ecr:GetAuthorizationToken)."""
    context: Mapping[str, str | Unknown] = dataclasses.field(default_factory=dict)
    """Condition-key values about the resource, keys in lower case."""


# What each condition key means. "caller": who calls or from where, so narrows nothing (see the
# module docstring). A context name: a fact about the resource, read from Request.context.
# Keys in neither are "cannot judge" (aws:ResourceOrgID, aws:ResourceTag/..., s3:prefix, ...).
CALLER = "caller"
KEY_MEANINGS: dict[str, str] = {
    "aws:resourceaccount": "aws:resourceaccount",
    "s3:resourceaccount": "aws:resourceaccount",
    **{key: CALLER for key in (
        "aws:principalaccount", "aws:principalorgid", "aws:principalorgpaths", "aws:principalarn",
        "aws:principaltype", "aws:principalisawsservice", "aws:principalservicename",
        "aws:principalservicenameslist", "aws:userid", "aws:username", "aws:sourceip",
        "aws:sourcevpc", "aws:sourcevpce", "aws:vpcsourceip", "aws:sourceaccount", "aws:sourcearn",
        "aws:sourceorgid", "aws:sourceorgpaths", "aws:securetransport", "aws:currenttime",
        "aws:epochtime", "aws:multifactorauthpresent", "aws:multifactorauthage", "aws:viaawsservice",
        "aws:calledvia", "aws:calledviafirst", "aws:calledvialast", "aws:tokenissuetime",
        "aws:requestedregion", "aws:useragent", "aws:referer",
    )},
}
CALLER_PREFIXES = ("aws:principaltag/",)


def _equals(values: tuple[str, ...], actual: str | Unknown, fold: bool) -> bool | None:
    if isinstance(actual, Unknown):
        return False if all(v in actual.not_in for v in values) else None
    return any(v == actual or (fold and v.lower() == actual.lower()) for v in values)


def _like(values: tuple[str, ...], actual: str | Unknown, fold: bool) -> bool | None:
    if isinstance(actual, Unknown):
        if "*" in values:
            return True
        return False if all(not has_wildcard(v) and v in actual.not_in for v in values) else None
    return any(glob_match(v, actual, fold) for v in values)


# operator (lower case, without IfExists and ForAnyValue:) -> (test, negated, case-folded)
OPERATORS = {
    "stringequals": (_equals, False, False),
    "stringnotequals": (_equals, True, False),
    "stringequalsignorecase": (_equals, False, True),
    "stringnotequalsignorecase": (_equals, True, True),
    "stringlike": (_like, False, False),
    "stringnotlike": (_like, True, False),
}


def _condition(condition: Condition, effect: str, context: Mapping[str, str | Unknown]) -> tuple[bool | None, str]:
    key = condition.key.lower()
    meaning = KEY_MEANINGS.get(key) or (CALLER if key.startswith(CALLER_PREFIXES) else None)
    what = f"{condition.operator} on {condition.key}"
    if meaning == CALLER:
        return effect == ALLOW, ""
    if meaning is None:
        return None, f"condition {what}: a key sniproxy does not judge"
    operator = condition.operator.lower()
    if operator.startswith("forallvalues:"):
        return None, f"condition {what}: ForAllValues on a single-valued key"
    operator = operator.removeprefix("foranyvalue:").removesuffix("ifexists")
    if operator not in OPERATORS:
        return None, f"condition {what}: an operator sniproxy does not judge"
    actual = context.get(meaning)
    if actual is None or (isinstance(actual, Unknown) and not actual.not_in):
        return None, f"condition {what}: the request's value is not known"
    test, negated, fold = OPERATORS[operator]
    result = test(condition.values, actual, fold)
    if result is None:
        return None, f"condition {what}: depends on an account sniproxy cannot know"
    return (not result) if negated else result, ""


def _applies(statement: Statement, request: Request) -> tuple[bool | None, str]:
    """Whether the statement covers the request, and why not when that cannot be judged."""
    if statement.effect == DENY and not statement.everyone:
        return False, ""  # a Deny aimed at some principals: the builder is not one of them
    action = any(glob_match(p, request.action, fold=True) for p in statement.actions)
    if action == statement.not_action:
        return False, ""
    if any("${" in p for p in statement.resources):
        return None, f"{statement.label}: a policy variable in {'NotResource' if statement.not_resource else 'Resource'}"
    resource = any(glob_match(p, request.resource) for p in statement.resources)
    if resource == statement.not_resource:
        return False, ""
    results = [_condition(c, statement.effect, request.context) for c in statement.conditions]
    value = _all(r for r, _ in results)
    why = next((f"{statement.label}: {w}" for r, w in results if r is None), "")
    return value, why


@dataclasses.dataclass(frozen=True)
class Outcome:
    allowed: bool | None
    """None: cannot judge."""
    by: Statement | None = None
    """The Allow that lets the request through, or the Deny that stops it."""
    why: str = ""
    """When allowed is None: the construct that could not be judged."""


def evaluate(statements: tuple[Statement, ...], request: Request) -> Outcome:
    """IAM's rule for one policy: an explicit Deny wins, then any Allow, else denied."""
    allows = [(s, *_applies(s, request)) for s in statements if s.effect == ALLOW]
    denies = [(s, *_applies(s, request)) for s in statements if s.effect == DENY]
    denied = _any(v for _, v, _ in denies)
    allowed = _any(v for _, v, _ in allows)
    if denied is True:
        return Outcome(False, next(s for s, v, _ in denies if v is True))
    if allowed is False:
        return Outcome(False)
    if denied is False and allowed is True:
        return Outcome(True, next(s for s, v, _ in allows if v is True))
    why = next(w for _, v, w in denies + allows if v is None)
    return Outcome(None, why=why)
