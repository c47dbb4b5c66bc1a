"""Configuration: TOML in, frozen dataclasses out, every error tied to its key path."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .addresses import format_address, is_ip, is_unspecified
from .ecr import ecr_routes
from .errors import ConfigError
from .hostnames import normalize_host
from .routes import Route, is_wildcard

DEFAULT_PATH = "/etc/sniproxy/sniproxy.toml"
RESOLV_CONF = "/etc/resolv.conf"


@dataclass(frozen=True, slots=True)
class Listen:
    address: str
    """IPv4 or IPv6 address to bind; 0.0.0.0 or :: for all."""
    port: int = 443
    allow: tuple[str, ...] | None = None
    """Client networks allowed on this listener; None inherits [server] allow."""
    proxy_protocol: bool = False
    """Expect a PROXY protocol v1/v2 header (from an NLB or HAProxy) before the ClientHello."""
    proxy_from: tuple[str, ...] = ()
    """Networks whose PROXY headers are believed (the balancer's); others are refused. Empty
    believes every peer, which `check` warns about."""

    @property
    def key(self) -> tuple[str, int]:
        return (self.address, self.port)


@dataclass(frozen=True, slots=True)
class ResolverConfig:
    nameservers: tuple[str, ...]
    """DNS servers for upstream names; /etc/hosts is never consulted."""
    port: int = 53
    timeout: float = 2.0
    """Seconds per query attempt, A and AAAA asked in parallel."""
    min_ttl: float = 5.0
    """Answers are cached at least this long, shielding the DNS server from churn."""
    max_ttl: float = 300.0
    """And at most this long, so endpoint changes are picked up."""
    stale_ttl: float = 86400.0
    """How long an expired answer may still be served while DNS is unreachable (RFC 8767)."""
    stale_refresh: float = 30.0
    """While DNS fails and a stale answer is served, look the name up again at most this
    often, in the background (RFC 8767 suggests 30 s)."""
    negative_ttl: float = 5.0
    """How long NXDOMAIN and empty answers are cached."""


@dataclass(frozen=True, slots=True)
class ServerConfig:
    workers: int = 1
    """Processes sharing the listeners ("auto": one per CPU)."""
    splice: str = "auto"
    """splice(2) forwarding: "on" right after the hello, "auto" once a connection carries 1 MiB, "off"."""
    handshake_timeout: float = 5.0
    """Total seconds from accept until a complete ClientHello."""
    connect_timeout: float = 5.0
    """Seconds per upstream address."""
    idle_timeout: float = 900.0
    """Seconds with no bytes either way before the pair is closed."""
    drain_delay: float = 0.0
    """After SIGTERM, seconds to keep accepting while /readyz says 503, so a load balancer's
    health check takes this instance out of service before its listeners close."""
    drain_timeout: float = 30.0
    """Then, seconds running connections may take to finish."""
    max_connections: int = 10000
    refuse_alert: bool = True
    """Send a TLS unrecognized_name alert before closing a connection with no route."""
    max_connections_per_client: int | None = None
    """Open connections one client address may hold; None for no limit."""
    max_handshakes_per_client: int = 128
    """Connections one client address may hold while their ClientHello is incomplete (a real
    hello arrives within a round trip; established connections do not count)."""
    max_hello_memory: int = 32 * 1024 * 1024
    """Bytes all partial ClientHellos may hold, per process; past it the oldest is refused."""
    allow: tuple[str, ...] = ()
    """Client networks (CIDR) allowed to connect; empty allows everyone."""
    user: str | None = None
    """When started as root without socket activation: bind, then run as this user."""
    group: str | None = None
    """Group for ``user``; default: the user's primary group."""


@dataclass(frozen=True, slots=True)
class LogConfig:
    access: str = "stderr"
    """Where access-log lines go: "stderr", a file path, or "off"."""
    error: str = "stderr"
    """Where error and info messages go: "stderr" or a file path."""
    level: str = "info"


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    address: str = "127.0.0.1"
    port: int = 9464
    enabled: bool = True


@dataclass(frozen=True, slots=True)
class Config:
    listen: tuple[Listen, ...]
    resolver: ResolverConfig
    server: ServerConfig = field(default_factory=ServerConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    routes: tuple[Route, ...] = ()
    log: LogConfig = field(default_factory=LogConfig)
    source: str = "<embedded>"
    region: str | None = None
    """The [ecr] region as written, so the CLI can check it against botocore's regions."""


class _Table:
    """One TOML table being read: typed getters that name the key path, and unknown-key checks.

    ``defaults`` is the dataclass the table becomes: a missing key takes its field's default,
    so every default is written once, in the dataclass. A missing required key is reported by
    ``done()``, after any unknown key: a misspelt key is what the operator needs to hear about,
    not the "required" that the misspelling causes."""

    def __init__(self, data: Any, path: str, defaults: type | None = None):
        if not isinstance(data, dict):
            raise ConfigError(path, "expected a table")
        self.data = data
        self.path = path
        self.seen: set[str] = set()
        self.missing: list[str] = []
        self.defaults = {f.name: f.default for f in dataclasses.fields(defaults)
                         if f.default is not dataclasses.MISSING} if defaults else {}

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def get(self, name: str, kind: str, check: Callable[[Any], bool] | None = None, default: Any = None) -> Any:
        """The value of ``name``, checked; when absent, ``default``, else the dataclass's.
        A missing required key reads as None until ``done()`` reports it."""
        self.seen.add(name)
        if name not in self.data:
            if default is _REQUIRED:
                self.missing.append(name)
                return None
            return self.defaults.get(name) if default is None else default
        value = self.data[name]
        convert, expected = _KINDS[kind]
        ok, value = convert(value)
        if not ok or (check is not None and not check(value)):
            raise ConfigError(self.key(name), f"expected {expected}")
        return value

    def table(self, name: str, defaults: type | None = None) -> _Table:
        self.seen.add(name)
        return _Table(self.data.get(name, {}), self.key(name), defaults)

    def tables(self, name: str, defaults: type | None = None) -> list[_Table]:
        self.seen.add(name)
        items = self.data.get(name, [])
        if not isinstance(items, list):
            raise ConfigError(self.key(name), "expected an array of tables ([[" + name + "]])")
        return [_Table(item, f"{self.key(name)}[{i}]", defaults) for i, item in enumerate(items)]

    def unknown(self, known: Iterable[str]) -> None:
        """Refuse the first key not in ``known``, suggesting the closest known one."""
        known = list(known)
        for name in self.data:
            if name not in known:
                close = difflib.get_close_matches(name, known, n=1)
                raise ConfigError(self.key(name), f"unknown key (did you mean {close[0]}?)" if close else "unknown key")

    def done(self) -> None:
        """After every get(): unknown keys first, then missing required ones."""
        self.unknown(self.seen)
        if self.missing:
            raise ConfigError(self.key(self.missing[0]), "required")


_REQUIRED = object()


def default(cls: type, name: str) -> Any:
    """A config field's default, for the few places outside this module that print or
    compare it (discover, the deploy template's test): written once, in the dataclass."""
    return next(f.default for f in dataclasses.fields(cls) if f.name == name)


_ROUTE_PORT = default(Route, "port")


def _int(v: Any) -> tuple[bool, Any]:
    return (isinstance(v, int) and not isinstance(v, bool)), v


def _float(v: Any) -> tuple[bool, Any]:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False, v
    try:
        v = float(v)
    except OverflowError:
        return False, v
    return v == v and v != float("inf"), v  # no NaN, no infinity


def _str(v: Any) -> tuple[bool, Any]:
    return isinstance(v, str), v


def _bool(v: Any) -> tuple[bool, Any]:
    return isinstance(v, bool), v


def _strs(v: Any) -> tuple[bool, Any]:
    if isinstance(v, str):
        v = [v]
    return (isinstance(v, list) and all(isinstance(x, str) for x in v)), tuple(v) if isinstance(v, list) else v


def _port(v: int) -> bool:
    return 1 <= v <= 65535


def _positive(v: float) -> bool:
    return v > 0


_KINDS: dict[str, tuple[Callable[[Any], tuple[bool, Any]], str]] = {
    "port": (_int, "an integer 1-65535"),
    "count": (_int, "a positive integer"),
    "bytes": (_int, "a number of bytes, at least 65536"),
    "seconds": (_float, "a positive number of seconds"),
    "str": (_str, "a string"),
    "ip": (_str, "an IPv4 or IPv6 address"),
    "ips": (_strs, "a list of IP addresses"),
    "host": (_str, "a DNS host name"),
    "hosts": (_strs, "a DNS host name or a list of them"),
    "bool": (_bool, "true or false"),
    "region": (_str, "an AWS region such as us-east-1"),
    "accounts": (_strs, "a list of 12-digit account ids as strings"),
    "cidrs": (_strs, "a list of networks such as \"10.8.0.0/16\""),
    "level": (_str, "one of debug, info, warning, error"),
    "workers": (_int, 'an integer 1-256 or "auto"'),
    "splice": (_str, 'one of "auto", "on", "off"'),
}

# ISO partitions use other DNS suffixes (c2s.ic.gov...); not supported, so refused here.
_REGION = re.compile(r"[a-z]{2}(-gov)?-[a-z]+-[0-9]+\Z")
_ACCOUNT = re.compile(r"[0-9]{12}\Z")


def _valid_pattern(p: str) -> bool:
    name = p[2:] if is_wildcard(p) else p
    return normalize_host(name) == name and "." in name


def listeners_differ(old: Config, new: Config) -> bool:
    """Whether a reload would add or remove a [[listen]] address."""
    return {entry.key for entry in old.listen} != {entry.key for entry in new.listen}


#: Why a reload under socket activation keeps the running config when [[listen]] changed.
FIXED_LISTENERS = ("[[listen]] changed, but the socket unit passed the listeners: change its "
                   "ListenStream= lines to match, then restart (systemctl restart sniproxy)")


def open_listeners(config: Config) -> list[Listen]:
    """Wildcard listeners that accept any client: worth a warning."""
    return [
        entry for entry in config.listen
        if is_unspecified(entry.address)
        and not (entry.allow if entry.allow is not None else config.server.allow)
    ]


def system_nameservers(path: str = RESOLV_CONF) -> tuple[str, ...]:
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return ()
    servers = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver" and is_ip(parts[1].split("%")[0]):
            servers.append(parts[1])
    return tuple(servers)


def _network_problem(entry: str) -> str | None:
    """Why an allowlist entry is not a network, in the operator's terms; None if it is one."""
    address, slash, prefix = entry.partition("/")
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return f"{entry!r} is not an IP address or network"
    if slash:
        if not (prefix.isascii() and prefix.isdigit()) or int(prefix) > ip.max_prefixlen:
            return f"{entry!r} has a bad prefix length: /0 to /{ip.max_prefixlen} for IPv{ip.version}"
        try:
            ipaddress.ip_network(entry)
        except ValueError:
            return f"{entry!r} has host bits set (did you mean {ipaddress.ip_network(entry, strict=False)}?)"
    return None


def _cidrs(t: _Table, key: str = "allow") -> tuple[str, ...] | None:
    """A list of networks; each bad entry is named by its index, with the reason."""
    networks = t.get(key, "cidrs")
    for i, entry in enumerate(networks or ()):
        problem = _network_problem(entry)
        if problem is not None:
            raise ConfigError(f"{t.key(key)}[{i}]", problem)
    return tuple(networks) if networks is not None else None


def _listen(t: _Table) -> Listen:
    address = t.get("address", "ip", is_ip, default=_REQUIRED)
    allow = _cidrs(t)
    port = t.get("port", "port", _port)
    proxy_protocol = t.get("proxy_protocol", "bool")
    proxy_from = _cidrs(t, "proxy_from") or ()
    if proxy_from and not proxy_protocol:
        raise ConfigError(t.key("proxy_from"), "names the balancers whose PROXY headers are believed: it needs "
                                               "proxy_protocol = true")
    t.done()
    return Listen(address=str(ipaddress.ip_address(address)), port=port, allow=allow, proxy_protocol=proxy_protocol,
                  proxy_from=proxy_from)


def _resolver(t: _Table, resolv_conf: str) -> ResolverConfig:
    servers = t.get("nameservers", "ips", lambda v: len(v) > 0 and all(map(is_ip, v)))
    if servers is None:
        servers = system_nameservers(resolv_conf)
        if not servers:
            raise ConfigError(t.key("nameservers"), f"not set and {resolv_conf} lists none")
    r = ResolverConfig(
        nameservers=tuple(servers),
        port=t.get("port", "port", _port),
        timeout=t.get("timeout", "seconds", _positive),
        min_ttl=t.get("min_ttl", "seconds", lambda v: v >= 0),
        max_ttl=t.get("max_ttl", "seconds", _positive),
        stale_ttl=t.get("stale_ttl", "seconds", lambda v: v >= 0),
        stale_refresh=t.get("stale_refresh", "seconds", _positive),
        negative_ttl=t.get("negative_ttl", "seconds", lambda v: v >= 0),
    )
    if r.min_ttl > r.max_ttl:
        raise ConfigError(t.key("min_ttl"), "must not exceed max_ttl")
    t.done()
    return r


def _server(t: _Table) -> ServerConfig:
    s = ServerConfig(
        workers=_workers(t),
        splice=t.get("splice", "splice", lambda v: v in ("auto", "on", "off")),
        handshake_timeout=t.get("handshake_timeout", "seconds", _positive),
        connect_timeout=t.get("connect_timeout", "seconds", _positive),
        idle_timeout=t.get("idle_timeout", "seconds", _positive),
        drain_delay=t.get("drain_delay", "seconds", lambda v: v >= 0),
        drain_timeout=t.get("drain_timeout", "seconds", lambda v: v >= 0),
        max_connections=t.get("max_connections", "count", _positive),
        refuse_alert=t.get("refuse_alert", "bool"),
        max_connections_per_client=t.get("max_connections_per_client", "count", _positive),
        max_handshakes_per_client=t.get("max_handshakes_per_client", "count", _positive),
        max_hello_memory=t.get("max_hello_memory", "bytes", lambda v: v >= 1 << 16),
        allow=_cidrs(t) or (),
        user=t.get("user", "str", lambda v: len(v) > 0),
        group=t.get("group", "str", lambda v: len(v) > 0),
    )
    t.done()
    return s


def _workers(t: _Table) -> int:
    if t.data.get("workers") == "auto":
        t.seen.add("workers")
        return max(1, len(os.sched_getaffinity(0)))
    return t.get("workers", "workers", lambda v: 1 <= v <= 256)


def _log(t: _Table) -> LogConfig:
    c = LogConfig(
        access=t.get("access", "str", lambda v: len(v) > 0),
        error=t.get("error", "str", lambda v: v != "off" and len(v) > 0),
        level=t.get("level", "level", lambda v: v in ("debug", "info", "warning", "error")),
    )
    t.done()
    return c


def _metrics(t: _Table) -> MetricsConfig:
    m = MetricsConfig(
        address=t.get("address", "ip", is_ip),
        port=t.get("port", "port", _port),
        enabled=t.get("enabled", "bool"),
    )
    t.done()
    return m


def _route(t: _Table) -> Route:
    name = t.get("name", "str", lambda v: re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", v) is not None, default=_REQUIRED)
    patterns = t.get("sni", "hosts", lambda v: len(v) > 0 and all(_valid_pattern(p.lower().rstrip(".")) for p in v),
                     default=_REQUIRED)
    upstream = t.get("upstream", "host", lambda v: normalize_host(v) is not None or is_ip(v))
    port = t.get("port", "port", _port)
    t.done()
    return Route(name=name, patterns=tuple(p.lower().rstrip(".") for p in patterns), upstream=upstream, port=port)


def _ecr(t: _Table) -> tuple[str, list[Route]]:
    region = t.get("region", "region", lambda v: _REGION.match(v) is not None, default=_REQUIRED)
    accounts = t.get("accounts", "accounts", lambda v: len(v) > 0 and all(_ACCOUNT.match(a) for a in v), default=_REQUIRED)
    fips = t.get("fips", "bool", default=False)
    dualstack = t.get("dualstack", "bool", default=False)
    port = t.get("port", "port", _port, default=_ROUTE_PORT)
    u = t.table("upstreams")
    upstreams = {
        kind: u.get(kind, "host", lambda v: normalize_host(v) is not None or is_ip(v))
        for kind in ("api", "dkr", "s3")
    }
    u.done()
    t.done()
    routes = ecr_routes(region, tuple(accounts), fips, dualstack, port, {k: v for k, v in upstreams.items() if v})
    return region, routes


#: The top-level tables, each read by one function below.
_TOP = ("listen", "resolver", "server", "metrics", "log", "route", "ecr")


def from_dict(data: dict, source: str = "<embedded>", resolv_conf: str = RESOLV_CONF) -> Config:
    top = _Table(data, "")
    top.unknown(_TOP)  # [[listn]] is a misspelling, not a missing [[listen]]
    listen = tuple(_listen(t) for t in top.tables("listen", Listen))
    if not listen:
        raise ConfigError("listen", "at least one [[listen]] table is required")
    for i, entry in enumerate(listen):
        for j, other in enumerate(listen[:i]):
            if entry.key == other.key:
                raise ConfigError(f"listen[{i}]", f"duplicate listener {format_address(*entry.key)}: listen[{j}] "
                                                  "already listens there")
            if _overlap(entry.key, other.key):
                raise ConfigError(f"listen[{i}]", f"{format_address(*entry.key)} overlaps listen[{j}] "
                                                  f"{format_address(*other.key)}: a wildcard address takes its "
                                                  "port on every address")
    resolver = _resolver(top.table("resolver", ResolverConfig), resolv_conf)
    server = _server(top.table("server", ServerConfig))
    metrics_table = top.table("metrics", MetricsConfig)
    metrics = _metrics(metrics_table)
    _metrics_apart(metrics, metrics_table, listen)
    log = _log(top.table("log", LogConfig))
    routes = [_route(t) for t in top.tables("route", Route)]
    region = None
    generated: list[Route] = []
    if "ecr" in data:
        region, generated = _ecr(top.table("ecr"))
    _routes_apart(routes, generated)
    if not routes + generated:
        raise ConfigError("route", "at least one [[route]] or an [ecr] table is required")
    return Config(listen=listen, resolver=resolver, server=server, metrics=metrics, routes=tuple(routes + generated),
                  log=log, source=source, region=region)


def _overlap(a: tuple[str, int], b: tuple[str, int], dual_stack: bool = False) -> bool:
    """Would binding ``a`` fail because ``b`` is bound (both listening, SO_REUSEADDR)?

    A wildcard takes its port on every address of its family. Listeners bind IPv6 with
    IPV6_V6ONLY, so [::] leaves IPv4 alone; ``dual_stack`` says ``a`` is bound without it
    (the metrics listener), so its [::] takes IPv4 too."""
    if a[1] != b[1]:
        return False
    x, y = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    if x.version != y.version:
        return dual_stack and x.version == 6 and is_unspecified(a[0])
    return x == y or is_unspecified(a[0]) or is_unspecified(b[0])


def _metrics_apart(metrics: MetricsConfig, t: _Table, listen: tuple[Listen, ...]) -> None:
    """The metrics listener must not take a [[listen]] address, wildcards included. The error
    names whichever side the operator wrote: [metrics] if it has address or port, else the listener."""
    if not metrics.enabled:
        return
    here = (metrics.address, metrics.port)
    for i, entry in enumerate(listen):
        if _overlap(here, entry.key, dual_stack=True):
            where = format_address(metrics.address, metrics.port)
            if "port" in t.data or "address" in t.data:
                key = t.key("port" if "port" in t.data else "address")
                raise ConfigError(key, f"metrics on {where} would take listen[{i}]'s {format_address(*entry.key)}: "
                                       "choose another [metrics] port or address")
            raise ConfigError(f"listen[{i}]", f"{format_address(*entry.key)} takes the [metrics] default {where}: "
                                              "choose another port, or set [metrics] port")


def _routes_apart(routes: list[Route], generated: list[Route]) -> None:
    """Route names and patterns are unique. A clash with what [ecr] generates is reported at the
    [[route]] the operator wrote, since [ecr]'s routes have no line of their own."""
    names: dict[str, int] = {}
    patterns: dict[str, int] = {}
    for i, route in enumerate(routes):
        if route.name in names:
            raise ConfigError(f"route[{i}].name", f"duplicate route name {route.name!r}")
        names[route.name] = i
        for p in route.patterns:
            if p in patterns:
                raise ConfigError(f"route[{i}].sni", f"{p!r} is already routed by {routes[patterns[p]].name!r}")
            patterns[p] = i
    for route in generated:
        if route.name in names:
            raise ConfigError(f"route[{names[route.name]}].name",
                              f"{route.name!r} is a route name [ecr] generates: choose another")
        for p in route.patterns:
            if p in patterns:
                raise ConfigError(f"route[{patterns[p]}].sni",
                                  f"{p!r} is also routed by [ecr] (route {route.name!r}): remove it here, "
                                  "or set [ecr.upstreams] to send [ecr]'s names elsewhere")


def read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise ConfigError("", f"{path}: no such file") from None
    except OSError as exc:
        raise ConfigError("", f"{path}: {exc.strerror}") from None


def loads(text: bytes, source: str, resolv_conf: str = RESOLV_CONF) -> Config:
    try:
        data = tomllib.loads(text.decode("utf-8"))
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError("", f"{source}: invalid TOML: {exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError("", f"{source}: not UTF-8 (byte {exc.start})") from None
    return from_dict(data, source=source, resolv_conf=resolv_conf)


def load(path: str, resolv_conf: str = RESOLV_CONF) -> Config:
    return loads(read(path), path, resolv_conf)


def embedded(region: str, accounts: list[str], resolv_conf: str = RESOLV_CONF, ipv6: bool = True,
             port: int | None = None) -> Config:
    """The first-run default: the ECR routes of one region on every address, on `port` or
    [[listen]] port's default (IPv6 too where the host has it)."""
    chosen = {} if port is None else {"port": port}
    data = {
        "listen": [{"address": "0.0.0.0", **chosen}] + ([{"address": "::", **chosen}] if ipv6 else []),
        "ecr": {"region": region, "accounts": list(accounts)},
    }
    return from_dict(data, source="--region/--account", resolv_conf=resolv_conf)
