"""The route table: exact names beat wildcards, and "*" is exactly one label."""

import pytest

from sniproxy.routes import Route, RouteTable, is_wildcard

EXACT = Route("exact", ("api.example.com", "other.example.net"), upstream="vpce-1.example.org", port=8443)
WILD = Route("wild", ("*.example.com",))
DEEP = Route("deep", ("*.b.example.com",))
DKR = Route("dkr", ("*.dkr.ecr.us-east-1.amazonaws.com",))


@pytest.fixture(params=["exact-first", "wildcard-first"])
def table(request):
    routes = [EXACT, WILD, DEEP, DKR]
    return RouteTable(routes if request.param == "exact-first" else routes[::-1])


@pytest.mark.parametrize(
    "sni, route",
    [
        ("api.example.com", EXACT),  # exact beats *.example.com, whatever the order
        ("other.example.net", EXACT),
        ("x.example.com", WILD),
        ("api2.example.com", WILD),
        ("b.example.com", WILD),
        ("a.b.example.com", DEEP),  # the longer wildcard owns its own labels
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", DKR),
        # "*" is one label: never zero ...
        ("example.com", None),
        ("b.example.com.evil", None),
        ("dkr.ecr.us-east-1.amazonaws.com", None),
        # ... and never two
        ("a.x.example.com", None),
        ("a.b.c.example.com", None),
        ("a.123456789012.dkr.ecr.us-east-1.amazonaws.com", None),
        # no suffix tricks
        ("xexample.com", None),
        ("api.example.com.evil.net", None),
        ("com", None),
        ("unknown.example.org", None),
        (None, None),
    ],
)
def test_match(table, sni, route):
    assert table.match(sni) is route


def test_no_sni_is_refused_even_with_routes_for_everything():
    table = RouteTable([Route("all", ("*.com", "localhost"))])
    assert table.match(None) is None
    assert table.match("a.com") is not None


def test_empty_table_matches_nothing():
    assert RouteTable([]).match("api.example.com") is None


def test_upstream_for():
    assert EXACT.upstream_for("api.example.com") == "vpce-1.example.org"
    assert WILD.upstream_for("x.example.com") == "x.example.com"
    assert (WILD.port, EXACT.port) == (443, 8443)


@pytest.mark.parametrize("pattern, wild", [("*.a.b", True), ("a.b", False), ("*", False), ("a.*.b", False)])
def test_is_wildcard(pattern, wild):
    assert is_wildcard(pattern) is wild


def test_routes_are_kept_in_order():
    routes = [EXACT, WILD]
    assert RouteTable(routes).routes == (EXACT, WILD)
