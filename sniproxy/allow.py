"""Which clients may connect, and how many connections each may hold.

Both run once per accepted connection, so they take the peer address string exactly as
``getpeername`` gives it and avoid parsing it where they can.
"""

import ipaddress
from collections.abc import Iterable

from .addresses import client_key


class Allowlist:
    """Client networks allowed to connect. An empty list allows everyone."""

    __slots__ = ("_hosts", "_networks", "_allow_all")

    def __init__(self, cidrs: Iterable[str]):
        """``cidrs``: "10.0.0.0/8", "2001:db8::/32", or a bare address for one host.

        Raises ValueError naming the entry if one is not a network, or has host bits set
        (a typo like 10.0.1.5/24 is more likely than a wish for 10.0.1.0/24).
        """
        hosts: set[str] = set()
        networks: list[tuple[int, int, int]] = []
        for cidr in cidrs:
            try:
                net = ipaddress.ip_network(cidr.strip())
            except ValueError as e:
                raise ValueError(f"allowlist entry {cidr!r}: {e}") from None
            if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96:
                mapped = net.network_address.ipv4_mapped
                if mapped is not None:
                    net = ipaddress.IPv4Network(f"{mapped}/{net.prefixlen - 96}")
            if net.num_addresses == 1:
                hosts.add(str(net.network_address))
            networks.append((net.version, int(net.network_address), int(net.netmask)))
        # Exact strings first (peer addresses come canonical from the kernel), then a
        # linear scan of (version, network, mask) integers: with few networks it beats
        # anything cleverer, and it catches host entries written in another form.
        self._hosts = frozenset(hosts)
        self._networks = tuple(networks)
        self._allow_all = not networks

    def allows(self, ip: str) -> bool:
        """Whether a client at ``ip`` (as from getpeername) may connect."""
        if self._allow_all:
            return True
        ip = client_key(ip)
        if ip in self._hosts:
            return True
        try:
            addr = ipaddress.ip_address(ip)
        except ValueError:
            return False  # not an IP peer (AF_UNIX): never on an IP allowlist
        version, value = addr.version, int(addr)
        for net_version, network, mask in self._networks:
            if version == net_version and value & mask == network:
                return True
        return False


class ClientLimits:
    """Counts open connections per client address, refusing those over the limit."""

    __slots__ = ("max_per_client", "_open")

    def __init__(self, max_per_client: int | None, counts: dict[str, int] | None = None):
        """``max_per_client``: at most this many open connections per client; None: no limit.

        ``counts`` shares the open counts with the limits a reload replaces, so connections
        opened before a reload still count after it."""
        if max_per_client is not None and max_per_client < 1:
            raise ValueError("max_per_client must be at least 1")
        self.max_per_client = max_per_client
        self._open: dict[str, int] = counts if counts is not None else {}

    def try_acquire(self, key: str) -> bool:
        """Count a new connection from the client ``key`` (an address as ``client_key`` gives
        it: the caller names the client once); False (and nothing counted) if over the limit."""
        n = self._open.get(key, 0)
        if self.max_per_client is not None and n >= self.max_per_client:
            return False
        self._open[key] = n + 1
        return True

    def release(self, key: str) -> None:
        """Uncount a connection counted by ``try_acquire``.

        Raises ValueError on a release with no matching acquire: that is a bug in the
        caller, and silently going negative would let a client past its limit.
        """
        n = self._open.get(key, 0)
        if n <= 0:
            raise ValueError(f"release of {key} with no open connection counted")
        if n == 1:
            del self._open[key]  # no entry for idle clients, so the dict stays small
        else:
            self._open[key] = n - 1

    def open_count(self, ip: str) -> int:
        """Connections currently counted for ``ip``."""
        return self._open.get(client_key(ip), 0)

    def __len__(self) -> int:
        """Clients with at least one open connection."""
        return len(self._open)
