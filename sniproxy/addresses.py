"""IP addresses as the proxy names and judges them: one helper for each question.

Peer addresses come as ``getpeername`` gives them, so these take strings and avoid parsing
where they can: several run once per connection.
"""

from __future__ import annotations

import ipaddress

_MAPPED_PREFIX = "::ffff:"


def format_address(host: str, port: int | None) -> str:
    """host:port, IPv6 in brackets: how logs, metrics and messages name an endpoint."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


_LITERALS: dict[str, bool] = {}


def is_ip(text: str) -> bool:
    """Whether ``text`` is an IPv4 or IPv6 literal. Asked on every connection about the few
    upstreams of the route table, so remembered (bounded: a wildcard route's upstream is the
    client's SNI)."""
    known = _LITERALS.get(text)
    if known is None:
        try:
            ipaddress.ip_address(text)
            known = True
        except ValueError:
            known = False
        if len(_LITERALS) >= 4096:
            _LITERALS.clear()
        _LITERALS[text] = known
    return known


def is_unspecified(address: str) -> bool:
    """0.0.0.0 or ``::``: bound, it takes its port on every address of its family."""
    return ipaddress.ip_address(address).is_unspecified


def client_key(ip: str) -> str:
    """The address that names a client: an IPv4-mapped IPv6 address is its IPv4 address.

    Linux prints one on a dual-stack socket as ``::ffff:10.0.0.7``; Python 3.11's ipaddress
    (a PROXY v2 AF_INET6 source, a v1 TCP6 one) as ``::ffff:a00:7``. Both name 10.0.0.7,
    for allowlists, per-client limits and logs alike."""
    if not ip.startswith(_MAPPED_PREFIX):
        return ip
    if "." in ip:
        return ip[len(_MAPPED_PREFIX) :]
    try:
        mapped = ipaddress.IPv6Address(ip).ipv4_mapped
    except ValueError:
        return ip
    return str(mapped) if mapped is not None else ip


def connect_target(ip: str) -> str:
    """The address connect(2) reaches for ``ip``, as the kernel sees it: an IPv4-mapped IPv6
    address is its IPv4 address, an unspecified one is this host (Linux connects 0.0.0.0 to
    127.0.0.1 and :: to ::1), and a scope id plays no part. How the loop check judges an
    upstream address, whatever DNS said."""
    addr = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if addr.is_unspecified:
        return "127.0.0.1" if addr.version == 4 else "::1"
    return str(addr)
