"""A TTL cache for upstream addresses that can serve stale answers (RFC 8767). Pure logic:
the caller passes ``now``, so tests need no sleeping."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Entry:
    addresses: tuple[str, ...]
    """Empty for a negative answer (NXDOMAIN or no records)."""
    expires: float
    stale_until: float
    ttl: float


class DnsCache:
    def __init__(self, min_ttl: float, max_ttl: float, stale_ttl: float, negative_ttl: float, max_entries: int = 4096):
        self.min_ttl = min_ttl
        self.max_ttl = max_ttl
        self.stale_ttl = stale_ttl
        self.negative_ttl = negative_ttl
        self.max_entries = max_entries
        self._entries: dict[str, Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, name: str, now: float) -> Entry | None:
        """A fresh entry, positive or negative."""
        entry = self._entries.get(name)
        if entry is not None and now < entry.expires:
            return entry
        return None

    def stale(self, name: str, now: float) -> Entry | None:
        """An expired positive entry still inside its stale window, for when DNS is unreachable."""
        entry = self._entries.get(name)
        if entry is not None and entry.addresses and now < entry.stale_until:
            return entry
        return None

    def put(self, name: str, addresses: tuple[str, ...], ttl: float, now: float) -> Entry:
        if addresses:
            ttl = min(max(ttl, self.min_ttl), self.max_ttl)
            stale_until = now + ttl + self.stale_ttl
        else:
            ttl = self.negative_ttl
            stale_until = now + ttl  # an authoritative "no" replaces any stale "yes"
        entry = Entry(addresses, now + ttl, stale_until, ttl)
        self._entries.pop(name, None)
        self._entries[name] = entry
        if len(self._entries) > self.max_entries:
            self._evict(now)
        return entry

    def _evict(self, now: float) -> None:
        for key in [k for k, e in self._entries.items() if e.stale_until <= now]:
            del self._entries[key]
        while len(self._entries) > self.max_entries:
            del self._entries[next(iter(self._entries))]  # oldest insertion first
