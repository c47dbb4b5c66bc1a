"""Config: every documented key, the defaults, and one clear `config error: <key>: ...` per mistake."""

from __future__ import annotations

import dataclasses

import pytest

from sniproxy.config import (
    Config,
    ConfigError,
    Listen,
    MetricsConfig,
    ResolverConfig,
    ServerConfig,
    embedded,
    load,
    system_nameservers,
)
from sniproxy.routes import Route

VPCE_API = "vpce-0123456789abcdef0-abcdefgh.api.ecr.us-east-1.vpce.amazonaws.com"
VPCE_DKR = "vpce-0123456789abcdef0-ijklmnop.dkr.ecr.us-east-1.vpce.amazonaws.com"
VPCE_S3 = "bucket.vpce-0123456789abcdef0-qrstuvwx.s3.us-east-1.vpce.amazonaws.com"
VPCE_MIRROR = "vpce-0fedcba9876543210-abcdefgh.dkr.ecr.ap-southeast-1.vpce.amazonaws.com"

# The example of notes/context.md with its "..." placeholders filled in. The [[route]] there is
# also named "ecr-dkr", which [ecr] generates too; it is renamed here (see test_route_named_like_ecr).
FULL = f"""
[[listen]]            # one per bound address
address = "10.0.1.10" # v4 or v6
port = 443
[[listen]]
address = "2001:DB8::10"
port = 8443
[resolver]
nameservers = ["127.0.0.53"]   # default: /etc/resolv.conf
port = 5353
timeout = 2.5
[server]
workers = 1
handshake_timeout = 4.0
connect_timeout = 3
idle_timeout = 600.0
drain_delay = 15
drain_timeout = 20.0
max_connections = 5000
[metrics]
address = "127.0.0.1"
port = 9465            # GET /metrics
[[route]]
name = "mirror-dkr"
sni = "*.dkr.ecr.ap-southeast-1.amazonaws.com"   # string or list; exact or "*." + suffix
upstream = "{VPCE_MIRROR}"
port = 443
[ecr]                  # shorthand, expands to routes "ecr-api", "ecr-dkr", "ecr-s3"
region = "us-east-1"
accounts = ["123456789012"]
fips = false
dualstack = false
port = 443             # upstream port for the generated routes
[ecr.upstreams]        # optional overrides, e.g. vpce DNS names when private DNS is off
api = "{VPCE_API}"
dkr = "{VPCE_DKR}"
s3 = "{VPCE_S3}"
"""

LISTEN = '[[listen]]\naddress = "127.0.0.1"\n'
RESOLVER = '[resolver]\nnameservers = ["127.0.0.53"]\n'
ROUTE = '[[route]]\nname = "r"\nsni = "a.example.com"\n'
ECR = '[ecr]\nregion = "us-east-1"\naccounts = ["123456789012"]\n'


@pytest.fixture
def resolv_conf(tmp_path):
    path = tmp_path / "resolv.conf"
    path.write_text("nameserver 192.0.2.53\n")
    return str(path)


@pytest.fixture
def load_text(tmp_path, resolv_conf):
    def load_text(text: str | bytes, resolv: str | None = None) -> Config:
        path = tmp_path / "sniproxy.toml"
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return load(str(path), resolv_conf=resolv or resolv_conf)

    return load_text


def test_full_example(load_text, tmp_path):
    config = load_text(FULL)
    assert config.source == str(tmp_path / "sniproxy.toml")
    assert config.listen == (Listen("10.0.1.10", 443), Listen("2001:db8::10", 8443))
    assert config.resolver == ResolverConfig(nameservers=("127.0.0.53",), port=5353, timeout=2.5)
    assert config.server == ServerConfig(
        workers=1, handshake_timeout=4.0, connect_timeout=3.0, idle_timeout=600.0, drain_delay=15.0,
        drain_timeout=20.0, max_connections=5000,
    )
    assert isinstance(config.server.connect_timeout, float)  # an integer is taken as seconds
    assert config.metrics == MetricsConfig(address="127.0.0.1", port=9465)
    assert config.routes == (
        Route("mirror-dkr", ("*.dkr.ecr.ap-southeast-1.amazonaws.com",), VPCE_MIRROR, 443),
        Route("ecr-api", ("api.ecr.us-east-1.amazonaws.com", "ecr.us-east-1.amazonaws.com"), VPCE_API, 443),
        Route("ecr-dkr", ("123456789012.dkr.ecr.us-east-1.amazonaws.com",), VPCE_DKR, 443),
        Route(
            "ecr-s3",
            ("prod-us-east-1-starport-layer-bucket.s3.us-east-1.amazonaws.com",
             "prod-us-east-1-starport-layer-bucket.s3.amazonaws.com"),
            VPCE_S3,
            443,
        ),
    )


def test_defaults(load_text):
    config = load_text(LISTEN + ECR)
    assert config.listen == (Listen("127.0.0.1", 443),)
    assert config.resolver == ResolverConfig(
        nameservers=("192.0.2.53",), port=53, timeout=2.0, min_ttl=5.0, max_ttl=300.0,
        stale_ttl=86400.0, negative_ttl=5.0,
    )
    assert config.server == ServerConfig(
        workers=1, handshake_timeout=5.0, connect_timeout=5.0, idle_timeout=900.0, drain_delay=0.0,
        drain_timeout=30.0, max_connections=10000, refuse_alert=True,
    )
    assert config.server.drain_delay == 0.0  # documented: a single host closes its listeners at once
    # The bounds that protect a shared service hold by default (docs/security.md#limits).
    assert (config.server.max_handshakes_per_client, config.server.max_hello_memory) == (128, 32 << 20)
    assert config.listen[0].proxy_from == ()
    assert config.metrics == MetricsConfig(address="127.0.0.1", port=9464, enabled=True)
    assert all(r.upstream is None and r.port == 443 for r in config.routes)
    assert [r.name for r in config.routes] == ["ecr-api", "ecr-dkr", "ecr-s3"]


def test_undocumented_but_supported_keys(load_text):
    config = load_text(
        LISTEN + '[resolver]\nnameservers = "::1"\nmin_ttl = 0\nmax_ttl = 60\nstale_ttl = 0\nnegative_ttl = 1.5\n'
        + "[server]\nrefuse_alert = false\n[metrics]\nenabled = false\n" + ECR
        + "fips = true\ndualstack = true\nport = 8443\n"
    )
    r = config.resolver
    assert (r.nameservers, r.min_ttl, r.max_ttl, r.stale_ttl, r.negative_ttl) == (("::1",), 0.0, 60.0, 0.0, 1.5)
    assert config.server.refuse_alert is False and config.metrics.enabled is False
    api = config.routes[0]
    assert "api.ecr-fips.us-east-1.amazonaws.com" in api.patterns and "ecr.us-east-1.api.aws" in api.patterns
    assert {r.port for r in config.routes} == {8443}


def test_route_forms(load_text):
    config = load_text(
        LISTEN + RESOLVER
        + '[[route]]\nname = "one"\nsni = "Registry.Example.COM."\n'
        + '[[route]]\nname = "many"\nsni = ["a.example.net", "*.Mirror.Example.net"]\nupstream = "10.1.2.3"\nport = 8443\n'
    )
    one, many = config.routes
    assert one == Route("one", ("registry.example.com",), None, 443)
    assert one.upstream_for("registry.example.com") == "registry.example.com"
    assert many == Route("many", ("a.example.net", "*.mirror.example.net"), "10.1.2.3", 8443)


@pytest.mark.parametrize("written, stored", [("::0", "::"), ("0.0.0.0", "0.0.0.0"), ("2001:DB8:0::1", "2001:db8::1")])
def test_listen_address_normalised(load_text, written, stored):
    assert load_text(f'[[listen]]\naddress = "{written}"\n' + RESOLVER + ROUTE).listen[0].address == stored


def test_config_is_frozen(load_text):
    config = load_text(LISTEN + ECR)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.listen = ()  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.resolver.port = 1  # type: ignore[misc]


# -- each mistake: one error naming its key ---------------------------------------------------------


def listen_with(extra: str) -> str:
    return LISTEN + extra + "\n" + RESOLVER + ROUTE


def section(name: str, body: str) -> str:
    """A config whose [name] table holds ``body`` (the rest valid)."""
    tables = {"resolver": RESOLVER, "server": "[server]\n", "metrics": "[metrics]\n"}
    tables[name] = tables.get(name, f"[{name}]\n") + body + "\n"
    return LISTEN + "".join(tables.values()) + ROUTE


def route_with(body: str) -> str:
    return LISTEN + RESOLVER + "[[route]]\n" + body + "\n"


def ecr_with(body: str) -> str:
    return LISTEN + RESOLVER + "[ecr]\n" + body + "\n"


ECR_OK = 'region = "us-east-1"\naccounts = ["123456789012"]\n'

BAD = [
    # unknown keys and tables
    ("unknown_top_key", "colour = 1\n" + LISTEN + RESOLVER + ROUTE, "colour"),
    ("unknown_table", LISTEN + RESOLVER + ROUTE + "[bogus]\nx = 1\n", "bogus"),
    ("unknown_listen_key", listen_with('adress = "10.0.0.1"'), "listen[0].adress"),
    ("unknown_resolver_key", section("resolver", "timeout_s = 1"), "resolver.timeout_s"),
    ("unknown_server_key", section("server", "worker = 1"), "server.worker"),
    ("unknown_metrics_key", section("metrics", "path = '/m'"), "metrics.path"),
    ("unknown_route_key", route_with('name = "r"\nsni = "a.example.com"\nupsteam = "b.example.com"'), "route[0].upsteam"),
    ("unknown_ecr_key", ecr_with(ECR_OK + "acounts = []"), "ecr.acounts"),
    ("unknown_ecr_upstreams_key", ecr_with(ECR_OK + '[ecr.upstreams]\nsts = "x.example.com"'), "ecr.upstreams.sts"),
    # tables of the wrong shape
    ("listen_single_table", '[listen]\naddress = "127.0.0.1"\n' + RESOLVER + ROUTE, "listen"),
    ("listen_not_tables", "listen = [1]\n" + RESOLVER + ROUTE, "listen[0]"),
    ("resolver_not_table", "resolver = 5\n" + LISTEN + ROUTE, "resolver"),
    ("route_single_table", LISTEN + RESOLVER + '[route]\nname = "r"\nsni = "a.example.com"\n', "route"),
    ("ecr_not_table", "ecr = true\n" + LISTEN + RESOLVER, "ecr"),
    ("ecr_upstreams_not_table", ecr_with(ECR_OK + "upstreams = 1"), "ecr.upstreams"),
    # wrong types
    ("string_port", listen_with('port = "443"'), "listen[0].port"),
    ("bool_port", listen_with("port = true"), "listen[0].port"),
    ("float_port", listen_with("port = 443.0"), "listen[0].port"),
    ("float_workers", section("server", "workers = 1.0"), "server.workers"),
    ("bool_workers", section("server", "workers = true"), "server.workers"),
    ("bool_max_connections", section("server", "max_connections = true"), "server.max_connections"),
    ("string_timeout", section("resolver", 'timeout = "2"'), "resolver.timeout"),
    ("bool_timeout", section("server", "idle_timeout = true"), "server.idle_timeout"),
    ("string_bool", section("server", 'refuse_alert = "yes"'), "server.refuse_alert"),
    ("int_bool", section("metrics", "enabled = 1"), "metrics.enabled"),
    ("int_address", "[[listen]]\naddress = 127\n" + RESOLVER + ROUTE, "listen[0].address"),
    ("int_route_name", route_with('name = 1\nsni = "a.example.com"'), "route[0].name"),
    ("int_sni", route_with('name = "r"\nsni = 1'), "route[0].sni"),
    ("int_upstream", route_with('name = "r"\nsni = "a.example.com"\nupstream = 1'), "route[0].upstream"),
    ("string_fips", ecr_with(ECR_OK + 'fips = "no"'), "ecr.fips"),
    # out of range
    ("listen_port_0", listen_with("port = 0"), "listen[0].port"),
    ("listen_port_65536", listen_with("port = 65536"), "listen[0].port"),
    ("listen_port_negative", listen_with("port = -1"), "listen[0].port"),
    ("resolver_port_0", section("resolver", "port = 0"), "resolver.port"),
    ("metrics_port_65536", section("metrics", "port = 65536"), "metrics.port"),
    ("route_port_0", route_with('name = "r"\nsni = "a.example.com"\nport = 0'), "route[0].port"),
    ("ecr_port_65536", ecr_with(ECR_OK + "port = 65536"), "ecr.port"),
    ("timeout_0", section("resolver", "timeout = 0"), "resolver.timeout"),
    ("timeout_negative", section("server", "connect_timeout = -1.5"), "server.connect_timeout"),
    ("timeout_nan", section("server", "handshake_timeout = nan"), "server.handshake_timeout"),
    ("drain_nan", section("server", "drain_timeout = nan"), "server.drain_timeout"),
    ("drain_negative", section("server", "drain_timeout = -1"), "server.drain_timeout"),
    ("drain_delay_negative", section("server", "drain_delay = -5"), "server.drain_delay"),
    ("drain_delay_string", section("server", 'drain_delay = "20s"'), "server.drain_delay"),
    ("max_connections_0", section("server", "max_connections = 0"), "server.max_connections"),
    ("workers_0", section("server", "workers = 0"), "server.workers"),
    ("min_ttl_negative", section("resolver", "min_ttl = -1"), "resolver.min_ttl"),
    ("min_over_max_ttl", section("resolver", "min_ttl = 60\nmax_ttl = 30"), "resolver.min_ttl"),
    # required things missing
    ("no_listener", RESOLVER + ROUTE, "listen"),
    ("empty_listener_list", "listen = []\n" + RESOLVER + ROUTE, "listen"),
    ("listen_without_address", "[[listen]]\nport = 443\n" + RESOLVER + ROUTE, "listen[0].address"),
    ("no_route", LISTEN + RESOLVER, "route"),
    ("route_without_name", route_with('sni = "a.example.com"'), "route[0].name"),
    ("route_without_sni", route_with('name = "r"'), "route[0].sni"),
    ("ecr_without_region", ecr_with('accounts = ["123456789012"]'), "ecr.region"),
    ("ecr_without_accounts", ecr_with('region = "us-east-1"'), "ecr.accounts"),
    # bad values
    ("listen_hostname", "[[listen]]\naddress = \"localhost\"\n" + RESOLVER + ROUTE, "listen[0].address"),
    ("listen_bad_ipv4", "[[listen]]\naddress = \"10.0.0.256\"\n" + RESOLVER + ROUTE, "listen[0].address"),
    ("metrics_hostname", section("metrics", 'address = "metrics.local"'), "metrics.address"),
    ("nameservers_empty", section("resolver", "").replace('["127.0.0.53"]', "[]"), "resolver.nameservers"),
    ("nameservers_hostname", section("resolver", "").replace('"127.0.0.53"', '"dns.google"'), "resolver.nameservers"),
    ("nameservers_int", section("resolver", "").replace('["127.0.0.53"]', "[53]"), "resolver.nameservers"),
    ("route_name_space", route_with('name = "my route"\nsni = "a.example.com"'), "route[0].name"),
    ("route_name_empty", route_with('name = ""\nsni = "a.example.com"'), "route[0].name"),
    ("sni_empty_list", route_with('name = "r"\nsni = []'), "route[0].sni"),
    ("sni_star", route_with('name = "r"\nsni = "*"'), "route[0].sni"),
    ("sni_star_tld", route_with('name = "r"\nsni = "*.com"'), "route[0].sni"),
    ("sni_inner_star", route_with('name = "r"\nsni = "a.*.example.com"'), "route[0].sni"),
    ("sni_double_star", route_with('name = "r"\nsni = "*.*.example.com"'), "route[0].sni"),
    ("sni_single_label", route_with('name = "r"\nsni = "localhost"'), "route[0].sni"),
    ("sni_ip", route_with('name = "r"\nsni = "10.0.0.1"'), "route[0].sni"),
    ("sni_space", route_with('name = "r"\nsni = ["a.example.com", "b example.com"]'), "route[0].sni"),
    ("sni_url", route_with('name = "r"\nsni = "https://a.example.com/"'), "route[0].sni"),
    ("upstream_space", route_with('name = "r"\nsni = "a.example.com"\nupstream = "vpce example"'), "route[0].upstream"),
    ("upstream_url", route_with('name = "r"\nsni = "a.example.com"\nupstream = "https://b.example.com"'), "route[0].upstream"),
    ("ecr_upstream_bad", ecr_with(ECR_OK + '[ecr.upstreams]\napi = "not a host"'), "ecr.upstreams.api"),
    # region and accounts
    ("region_upper", ecr_with('region = "US-EAST-1"\naccounts = ["123456789012"]'), "ecr.region"),
    ("region_no_dashes", ecr_with('region = "useast1"\naccounts = ["123456789012"]'), "ecr.region"),
    ("region_no_number", ecr_with('region = "us-east"\naccounts = ["123456789012"]'), "ecr.region"),
    ("region_empty", ecr_with('region = ""\naccounts = ["123456789012"]'), "ecr.region"),
    ("region_trailing_space", ecr_with('region = "us-east-1 "\naccounts = ["123456789012"]'), "ecr.region"),
    ("region_az", ecr_with('region = "us-east-1a"\naccounts = ["123456789012"]'), "ecr.region"),
    ("account_11_digits", ecr_with('region = "us-east-1"\naccounts = ["12345678901"]'), "ecr.accounts"),
    ("account_13_digits", ecr_with('region = "us-east-1"\naccounts = ["1234567890123"]'), "ecr.accounts"),
    ("account_int", ecr_with('region = "us-east-1"\naccounts = [123456789012]'), "ecr.accounts"),
    ("account_letters", ecr_with('region = "us-east-1"\naccounts = ["12345678901a"]'), "ecr.accounts"),
    ("accounts_empty", ecr_with('region = "us-east-1"\naccounts = []'), "ecr.accounts"),
    ("account_newline", ecr_with('region = "us-east-1"\naccounts = ["123456789012\\n"]'), "ecr.accounts"),
    # duplicates
    ("duplicate_route_name", LISTEN + RESOLVER + ROUTE + '[[route]]\nname = "r"\nsni = "b.example.com"\n', "route[1].name"),
    ("same_sni_two_routes", LISTEN + RESOLVER + ROUTE + '[[route]]\nname = "s"\nsni = "a.example.com"\n', "route[1].sni"),
    ("same_sni_other_case", LISTEN + RESOLVER + ROUTE + '[[route]]\nname = "s"\nsni = "A.Example.com."\n', "route[1].sni"),
    ("same_sni_one_route", route_with('name = "r"\nsni = ["a.example.com", "a.example.com"]'), "route[0].sni"),
    ("same_wildcard_twice", LISTEN + RESOLVER + '[[route]]\nname = "r"\nsni = "*.example.com"\n'
     '[[route]]\nname = "s"\nsni = "*.example.com"\n', "route[1].sni"),
    # a clash with what [ecr] generates names the [[route]] the operator wrote
    ("sni_in_route_and_ecr", LISTEN + RESOLVER + '[[route]]\nname = "mine"\nsni = "api.ecr.us-east-1.amazonaws.com"\n' + ECR, "route[0].sni"),
    ("route_named_like_ecr", LISTEN + RESOLVER + '[[route]]\nname = "ecr-dkr"\nsni = "x.example.com"\n' + ECR, "route[0].name"),
    ("second_route_in_ecr", LISTEN + RESOLVER + ROUTE + '[[route]]\nname = "s3"\nsni = "prod-us-east-1-starport-layer-bucket.s3.amazonaws.com"\n' + ECR, "route[1].sni"),
    ("duplicate_listener", LISTEN + LISTEN + RESOLVER + ROUTE, "listen[1]"),
    ("duplicate_listener_spelled_apart", '[[listen]]\naddress = "::"\n[[listen]]\naddress = "0::0"\n' + RESOLVER + ROUTE, "listen[1]"),
]


@pytest.mark.parametrize("text, path", [b[1:] for b in BAD], ids=[b[0] for b in BAD])
def test_bad_config_names_the_key(load_text, text, path):
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    assert exc.value.path == path
    message = str(exc.value)
    assert message.startswith(f"config error: {path}: ")
    assert len(message) > len(f"config error: {path}: ") + 3
    assert "\n" not in message


def test_duplicate_sni_error_names_both_routes(load_text):
    with pytest.raises(ConfigError, match="'a.example.com' is already routed by 'r'"):
        load_text(LISTEN + RESOLVER + ROUTE + '[[route]]\nname = "s"\nsni = "a.example.com"\n')


def test_a_clash_with_ecr_names_the_route_written_and_the_generated_one(load_text):
    with pytest.raises(ConfigError) as exc:
        load_text(LISTEN + RESOLVER + '[[route]]\nname = "mine"\nsni = "api.ecr.us-east-1.amazonaws.com"\n' + ECR)
    assert str(exc.value) == (
        "config error: route[0].sni: 'api.ecr.us-east-1.amazonaws.com' is also routed by [ecr] (route 'ecr-api'): "
        "remove it here, or set [ecr.upstreams] to send [ecr]'s names elsewhere")
    with pytest.raises(ConfigError, match=r"route\[0\]\.name: 'ecr-dkr' is a route name \[ecr\] generates"):
        load_text(LISTEN + RESOLVER + '[[route]]\nname = "ecr-dkr"\nsni = "x.example.com"\n' + ECR)


# -- a misspelling is reported as unknown, before the "required" it causes ----------------------

MISSPELT = [
    ("listen_table", '[[listn]]\naddress = "127.0.0.1"\n' + RESOLVER + ROUTE, "listn", "listen"),
    ("route_table", LISTEN + RESOLVER + '[[routes]]\nname = "r"\nsni = "a.example.com"\n', "routes", "route"),
    ("ecr_table", LISTEN + RESOLVER + '[ecrr]\nregion = "us-east-1"\naccounts = ["123456789012"]\n', "ecrr", "ecr"),
    ("listen_address", '[[listen]]\nadress = "127.0.0.1"\n' + RESOLVER + ROUTE, "listen[0].adress", "address"),
    ("route_name", LISTEN + RESOLVER + '[[route]]\nnmae = "r"\nsni = "a.example.com"\n', "route[0].nmae", "name"),
    ("route_sni", LISTEN + RESOLVER + '[[route]]\nname = "r"\nsin = "a.example.com"\n', "route[0].sin", "sni"),
    ("ecr_region", ecr_with('regoin = "us-east-1"\naccounts = ["123456789012"]'), "ecr.regoin", "region"),
    ("ecr_accounts", ecr_with('region = "us-east-1"\naccount = ["123456789012"]'), "ecr.account", "accounts"),
]


@pytest.mark.parametrize("text, path, meant", [m[1:] for m in MISSPELT], ids=[m[0] for m in MISSPELT])
def test_misspelt_key_is_unknown_not_a_missing_required_one(load_text, text, path, meant):
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    assert str(exc.value) == f"config error: {path}: unknown key (did you mean {meant}?)"


def test_unknown_key_with_nothing_close_has_no_suggestion(load_text):
    with pytest.raises(ConfigError) as exc:
        load_text("colour = 1\n" + LISTEN + RESOLVER + ROUTE)
    assert str(exc.value) == "config error: colour: unknown key"


# -- allow entries: the index and the reason ----------------------------------------------------------

ALLOW = [
    ("host_bits", 'allow = ["10.8.0.0/16", "10.0.1.5/24"]', "server.allow[1]",
     "'10.0.1.5/24' has host bits set (did you mean 10.0.1.0/24?)"),
    ("host_bits_v6", 'allow = ["2001:db8::1/32"]', "server.allow[0]",
     "'2001:db8::1/32' has host bits set (did you mean 2001:db8::/32?)"),
    ("prefix_too_long", 'allow = ["10.0.0.0/8", "10.0.0.0/8", "10.0.0.0/33"]', "server.allow[2]",
     "'10.0.0.0/33' has a bad prefix length: /0 to /32 for IPv4"),
    ("prefix_not_a_number", 'allow = ["2001:db8::/x"]', "server.allow[0]",
     "'2001:db8::/x' has a bad prefix length: /0 to /128 for IPv6"),
    ("prefix_empty", 'allow = ["10.0.0.0/"]', "server.allow[0]", "'10.0.0.0/' has a bad prefix length: /0 to /32 for IPv4"),
    ("not_an_address", 'allow = ["10.0.0.300/8"]', "server.allow[0]", "'10.0.0.300/8' is not an IP address or network"),
    ("a_name", 'allow = ["builders.corp.example"]', "server.allow[0]",
     "'builders.corp.example' is not an IP address or network"),
]


@pytest.mark.parametrize("body, path, reason", [a[1:] for a in ALLOW], ids=[a[0] for a in ALLOW])
def test_allow_entry_errors_carry_the_index_and_the_reason(load_text, body, path, reason):
    with pytest.raises(ConfigError) as exc:
        load_text(section("server", body))
    assert str(exc.value) == f"config error: {path}: {reason}"


def test_listener_allow_entries_are_named_too(load_text):
    with pytest.raises(ConfigError) as exc:
        load_text(LISTEN + '[[listen]]\naddress = "127.0.0.2"\nallow = ["10.0.0.0/8", "fe80::1/10"]\n' + RESOLVER + ROUTE)
    assert str(exc.value) == "config error: listen[1].allow[1]: 'fe80::1/10' has host bits set (did you mean fe80::/10?)"


def test_proxy_from_names_networks_and_needs_proxy_protocol(load_text):
    config = load_text('[[listen]]\naddress = "127.0.0.1"\nproxy_protocol = true\nproxy_from = ["10.0.1.0/24", "10.0.2.9"]\n'
                       + RESOLVER + ROUTE)
    assert config.listen[0].proxy_from == ("10.0.1.0/24", "10.0.2.9")
    with pytest.raises(ConfigError) as exc:
        load_text('[[listen]]\naddress = "127.0.0.1"\nproxy_from = ["10.0.1.0/24"]\n' + RESOLVER + ROUTE)
    assert str(exc.value) == ("config error: listen[0].proxy_from: names the balancers whose PROXY headers are "
                              "believed: it needs proxy_protocol = true")
    with pytest.raises(ConfigError) as exc:
        load_text('[[listen]]\naddress = "127.0.0.1"\nproxy_protocol = true\nproxy_from = ["10.0.1.5/24"]\n'
                  + RESOLVER + ROUTE)
    assert str(exc.value) == ("config error: listen[0].proxy_from[0]: '10.0.1.5/24' has host bits set "
                              "(did you mean 10.0.1.0/24?)")


@pytest.mark.parametrize("body, message", [
    ("max_hello_memory = 1000", "server.max_hello_memory: expected a number of bytes, at least 65536"),
    ("max_handshakes_per_client = 0", "server.max_handshakes_per_client: expected a positive integer"),
])
def test_the_new_bounds_are_checked(load_text, body, message):
    with pytest.raises(ConfigError) as exc:
        load_text(section("server", body))
    assert str(exc.value) == f"config error: {message}"


def test_good_allow_entries(load_text):
    config = load_text(section("server", 'allow = ["10.0.1.0/24", "10.0.0.7", "2001:db8::/32", "0.0.0.0/0"]'))
    assert config.server.allow == ("10.0.1.0/24", "10.0.0.7", "2001:db8::/32", "0.0.0.0/0")


# -- addresses that cannot all be bound ---------------------------------------------------------------

def listeners(*entries: tuple[str, int]) -> str:
    return "".join(f'[[listen]]\naddress = "{a}"\nport = {p}\n' for a, p in entries)


COLLISIONS = [
    ("metrics_on_a_listener", listeners(("127.0.0.1", 9000)) + RESOLVER + "[metrics]\nport = 9000\n" + ROUTE,
     "metrics.port", "metrics on 127.0.0.1:9000 would take listen[0]'s 127.0.0.1:9000"),
    ("metrics_under_a_wildcard_listener", listeners(("10.0.0.1", 443), ("0.0.0.0", 9000)) + RESOLVER
     + '[metrics]\naddress = "127.0.0.1"\nport = 9000\n' + ROUTE, "metrics.port", "listen[1]'s 0.0.0.0:9000"),
    ("wildcard_metrics_over_a_listener", listeners(("10.0.0.1", 443)) + RESOLVER
     + '[metrics]\naddress = "0.0.0.0"\nport = 443\n' + ROUTE, "metrics.port", "listen[0]'s 10.0.0.1:443"),
    ("metrics_address_only", listeners(("10.0.0.1", 9464)) + RESOLVER + '[metrics]\naddress = "10.0.0.1"\n' + ROUTE,
     "metrics.address", "listen[0]'s 10.0.0.1:9464"),
    # metrics binds [::] without IPV6_V6ONLY, so it takes IPv4 too
    ("dual_stack_metrics_over_ipv4", listeners(("10.0.0.1", 9000)) + RESOLVER
     + '[metrics]\naddress = "::"\nport = 9000\n' + ROUTE, "metrics.port", "listen[0]'s 10.0.0.1:9000"),
    ("listener_on_the_default_metrics_port", listeners(("127.0.0.1", 9464)) + RESOLVER + ROUTE,
     "listen[0]", "127.0.0.1:9464 takes the [metrics] default 127.0.0.1:9464"),
    ("wildcard_listener_on_the_default_metrics_port", listeners(("0.0.0.0", 9464)) + RESOLVER + ROUTE,
     "listen[0]", "0.0.0.0:9464 takes the [metrics] default 127.0.0.1:9464"),
    ("listener_under_a_wildcard_one", listeners(("0.0.0.0", 443), ("10.0.1.10", 443)) + RESOLVER + ROUTE,
     "listen[1]", "10.0.1.10:443 overlaps listen[0] 0.0.0.0:443"),
    ("wildcard_listener_over_one", listeners(("::1", 443), ("::", 443)) + RESOLVER + ROUTE,
     "listen[1]", "[::]:443 overlaps listen[0] [::1]:443"),
]


@pytest.mark.parametrize("text, path, fragment", [c[1:] for c in COLLISIONS], ids=[c[0] for c in COLLISIONS])
def test_colliding_addresses(load_text, text, path, fragment):
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    assert exc.value.path == path
    assert fragment in str(exc.value)


@pytest.mark.parametrize("text", [
    listeners(("0.0.0.0", 443), ("::", 443)) + RESOLVER + ROUTE,  # listeners bind [::] IPv6 only
    listeners(("127.0.0.1", 9464)) + RESOLVER + "[metrics]\nenabled = false\n" + ROUTE,
    listeners(("127.0.0.1", 9000)) + RESOLVER + '[metrics]\naddress = "127.0.0.2"\nport = 9000\n' + ROUTE,
    listeners(("::1", 9000)) + RESOLVER + '[metrics]\naddress = "0.0.0.0"\nport = 9000\n' + ROUTE,
    listeners(("10.0.0.1", 443), ("10.0.0.1", 8443)) + RESOLVER + ROUTE,
], ids=["v4_and_v6_wildcards", "metrics_disabled", "other_address", "other_family", "other_port"])
def test_addresses_that_can_all_be_bound(load_text, text):
    load_text(text)


def test_listeners_on_other_ports_or_addresses_are_not_duplicates(load_text):
    text = LISTEN + '[[listen]]\naddress = "127.0.0.1"\nport = 8443\n[[listen]]\naddress = "127.0.0.2"\n' + RESOLVER + ROUTE
    assert len(load_text(text).listen) == 3


@pytest.mark.parametrize("region", ["us-east-1", "ap-southeast-1", "cn-north-1", "us-gov-west-1", "il-central-1", "ca-west-1"])
def test_real_regions_accepted(load_text, region):
    config = load_text(LISTEN + RESOLVER + f'[ecr]\nregion = "{region}"\naccounts = ["123456789012", "000000000000"]\n')
    assert config.routes[0].patterns[0].startswith(f"api.ecr.{region}.")


@pytest.mark.parametrize(
    "body, path",
    [
        ('region = "us-east-1"\naccounts = ["１２３４５６７８９０１２"]', "ecr.accounts"),  # fullwidth digits
        ('region = "us-east-١"\naccounts = ["123456789012"]', "ecr.region"),  # Arabic-Indic one
    ],
    ids=["fullwidth_account", "arabic_indic_region"],
)
def test_non_ascii_digits_refused(load_text, body, path):
    with pytest.raises(ConfigError) as exc:
        load_text(ecr_with(body))
    assert exc.value.path == path


def test_huge_integer_seconds(load_text):
    with pytest.raises(ConfigError) as exc:
        load_text(section("resolver", "timeout = 1" + "0" * 400))
    assert exc.value.path == "resolver.timeout"


def test_workers_two_and_auto(load_text):
    import os

    assert load_text(section("server", "workers = 2")).server.workers == 2
    assert load_text(section("server", 'workers = "auto"')).server.workers == len(os.sched_getaffinity(0))
    for bad in ("0", "257", '"many"', "1.5"):
        with pytest.raises(ConfigError, match=r"server\.workers: expected an integer 1-256 or \"auto\""):
            load_text(section("server", f"workers = {bad}"))


@pytest.mark.parametrize("value", ["auto", "on", "off"])
def test_splice_modes(load_text, value):
    assert load_text(section("server", f'splice = "{value}"')).server.splice == value
    with pytest.raises(ConfigError, match=r"server\.splice"):
        load_text(section("server", 'splice = "yes"'))


@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_infinite_or_nan_seconds_are_refused(load_text, value):
    # TOML has inf and nan floats; a timer cannot use them, so they must name the key
    with pytest.raises(ConfigError, match=r"server\.idle_timeout"):
        load_text(section("server", f"idle_timeout = {value}"))


# -- files -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["[[listen]\naddress = 1", 'x = "unterminated', "a = 1\na = 2\n", "= 1"])
def test_invalid_toml(load_text, tmp_path, text):
    with pytest.raises(ConfigError) as exc:
        load_text(text)
    message = str(exc.value)
    assert message.startswith(f"config error: {tmp_path / 'sniproxy.toml'}: invalid TOML: ")
    assert "\n" not in message


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError) as exc:
        load(str(path))
    assert str(exc.value) == f"config error: {path}: no such file"


def test_directory_instead_of_file(tmp_path):
    with pytest.raises(ConfigError) as exc:
        load(str(tmp_path))
    assert str(exc.value).startswith(f"config error: {tmp_path}: ")


def test_not_utf8(load_text, tmp_path):
    with pytest.raises(ConfigError) as exc:
        load_text(b"# caf\xe9 latin-1 comment\n" + (LISTEN + RESOLVER + ROUTE).encode())
    assert str(exc.value).startswith(f"config error: {tmp_path / 'sniproxy.toml'}: ")


# -- resolv.conf ------------------------------------------------------------------------------------

RESOLV = """\
# generated by something
search corp.example.com
nameserver 10.0.0.2
nameserver   fe80::1%eth0
;nameserver 10.9.9.9
#nameserver 10.9.9.8
nameserver dns.example.com
nameserver
options edns0 trust-ad
nameserver 2001:db8::53 # trailing comment
"""


def test_nameservers_default_to_resolv_conf(load_text, tmp_path):
    path = tmp_path / "resolv.custom"
    path.write_text(RESOLV)
    config = load_text(LISTEN + ROUTE, resolv=str(path))
    assert config.resolver.nameservers == ("10.0.0.2", "fe80::1%eth0", "2001:db8::53")
    assert system_nameservers(str(path)) == config.resolver.nameservers


def test_explicit_nameservers_ignore_resolv_conf(load_text, tmp_path):
    assert load_text(LISTEN + RESOLVER + ROUTE, resolv=str(tmp_path / "absent")).resolver.nameservers == ("127.0.0.53",)


@pytest.mark.parametrize("content", [None, "", "search example.com\n#nameserver 10.0.0.1\n"], ids=["missing", "empty", "none"])
def test_no_nameservers_anywhere(load_text, tmp_path, content):
    path = tmp_path / "resolv.none"
    if content is not None:
        path.write_text(content)
    with pytest.raises(ConfigError) as exc:
        load_text(LISTEN + ROUTE, resolv=str(path))
    assert exc.value.path == "resolver.nameservers"
    assert str(path) in str(exc.value)


def test_embedded(resolv_conf):
    config = embedded("eu-west-1", ["123456789012", "210987654321"], resolv_conf=resolv_conf)
    assert config.listen == (Listen("0.0.0.0", 443), Listen("::", 443))
    assert config.resolver.nameservers == ("192.0.2.53",)
    assert [r.name for r in config.routes] == ["ecr-api", "ecr-dkr", "ecr-s3"]
    assert config.routes[1].patterns == (
        "123456789012.dkr.ecr.eu-west-1.amazonaws.com",
        "210987654321.dkr.ecr.eu-west-1.amazonaws.com",
    )
    with pytest.raises(ConfigError) as exc:
        embedded("eu-west-1", ["12"], resolv_conf=resolv_conf)
    assert exc.value.path == "ecr.accounts"
