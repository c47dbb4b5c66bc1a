"""The /etc/hosts lines for builders: one line per exact name, a comment per wildcard."""

import ipaddress

import pytest

from sniproxy.config import Config, Listen, ResolverConfig, embedded
from sniproxy.routes import Route
from sniproxy.tools.hosts import hosts_lines


def config(*routes: Route) -> Config:
    return Config(
        listen=(Listen("10.0.1.10"),), resolver=ResolverConfig(nameservers=("127.0.0.53",)),
        routes=routes, source="/etc/sniproxy/test.toml",
    )


MIXED = config(
    Route("one", ("a.example.com", "*.mirror.example.com", "b.example.com")),
    Route("two", ("c.example.net",), upstream="vpce.example.org"),
    Route("three", ("*.dkr.example.net",)),
)


def parse_hosts(lines):
    """(address, name) of each host line, as the C library would read /etc/hosts."""
    out = []
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            address, *names = line.split()
            ipaddress.ip_address(address)
            out.extend((address, n) for n in names)
    return out


def test_one_line_per_exact_name_and_a_comment_per_wildcard():
    lines = hosts_lines(MIXED, "10.0.1.10")
    assert lines[0].startswith("# ") and "10.0.1.10" in lines[0] and "/etc/sniproxy/test.toml" in lines[0]
    assert lines[1:] == [
        "10.0.1.10\ta.example.com",
        "# *.mirror.example.com (route one): a wildcard cannot go into /etc/hosts; add each name you use",
        "10.0.1.10\tb.example.com",
        "10.0.1.10\tc.example.net",
        "# *.dkr.example.net (route three): a wildcard cannot go into /etc/hosts; add each name you use",
    ]
    assert parse_hosts(lines) == [("10.0.1.10", n) for n in ("a.example.com", "b.example.com", "c.example.net")]
    assert all(line.startswith("#") for line in lines if "*" in line)


def test_ipv6_address():
    assert parse_hosts(hosts_lines(MIXED, "2001:db8::10"))[0] == ("2001:db8::10", "a.example.com")


def test_a_name_in_two_routes_is_listed_once():
    lines = hosts_lines(config(Route("x", ("a.example.com", "*.w.example.com")), Route("y", ("a.example.com", "*.w.example.com"))), "10.0.0.1")
    assert len(lines) == 3


@pytest.mark.parametrize("region", ["us-east-1", "cn-north-1"])
def test_ecr_routes_are_all_exact(tmp_path, region):
    resolv = tmp_path / "resolv.conf"
    resolv.write_text("nameserver 10.0.0.2\n")
    cfg = embedded(region, ["123456789012", "210987654321"], resolv_conf=str(resolv))
    lines = hosts_lines(cfg, "10.0.1.10")
    names = [n for _, n in parse_hosts(lines)]
    assert names == [p for r in cfg.routes for p in r.patterns]
    assert len(lines) == 1 + len(names)  # the header, then no wildcard comments
    assert f"123456789012.dkr.ecr.{region}." in "\n".join(lines)
