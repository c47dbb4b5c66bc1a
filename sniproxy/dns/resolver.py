"""Upstream name resolution through dnspython, against the configured servers only.

/etc/hosts is never read: builders pin the ECR names to this proxy there, and on the proxy
host the same names must resolve to the VPC endpoints.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import dns.asyncbackend
import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.rdtypes.ANY.CNAME  # noqa: F401  dnspython loads rdata types lazily; see below
import dns.rdtypes.IN.A  # noqa: F401
import dns.rdtypes.IN.AAAA  # noqa: F401
import dns.resolver

from ..addresses import is_ip
from ..config import ResolverConfig
from ..errors import SniproxyError
from ..observe.stats import Stats
from .cache import DnsCache

log = logging.getLogger("sniproxy.resolver")


class ResolveError(SniproxyError):
    pass


class Resolver:
    def __init__(self, config: ResolverConfig, stats: Stats, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.stats = stats
        self.clock = clock
        self.cache = DnsCache(config.min_ttl, config.max_ttl, config.stale_ttl, config.negative_ttl)
        r = dns.asyncresolver.Resolver(configure=False)
        r.nameservers = list(config.nameservers)
        r.port = config.port
        r.timeout = config.timeout
        r.lifetime = config.timeout
        r.cache = None  # ours serves stale; dnspython's does not
        self._dns = r
        # dnspython imports its asyncio backend and rdata types on first use; load them now,
        # while the process can still read its own install (it may drop privileges after
        # binding, and an unreadable A type silently becomes GenericRdata).
        dns.asyncbackend.get_backend("asyncio")
        self._inflight: dict[str, asyncio.Future] = {}
        self._failing: dict[str, float] = {}
        """Names whose last lookup failed and got a stale answer -> when to look again."""

    def cached(self, name: str) -> tuple[str, ...] | None:
        """Addresses without awaiting, or None when a lookup is needed: a fresh entry, or,
        once DNS has failed for the name, its stale entry (RFC 8767), with a background
        lookup at most every ``stale_refresh`` seconds until DNS answers again."""
        if is_ip(name):
            return (name,)
        now = self.clock()
        entry = self.cache.get(name, now)
        if entry is not None and entry.addresses:
            self.stats.dns_cache_hits += 1
            return entry.addresses
        retry = self._failing.get(name)
        if retry is None:
            return None
        stale = self.cache.stale(name, now)
        if stale is None:  # past stale_ttl: nothing left to serve
            del self._failing[name]
            return None
        if now >= retry and name not in self._inflight:
            self._failing[name] = now + self.config.stale_refresh
            self._start(name)
        self.stats.dns_stale_served += 1
        return stale.addresses

    async def resolve(self, name: str) -> tuple[str, ...]:
        """IPv4 addresses first, then IPv6. Raises ResolveError."""
        if is_ip(name):
            return (name,)
        entry = self.cache.get(name, self.clock())
        if entry is not None:
            if entry.addresses:
                self.stats.dns_cache_hits += 1
                return entry.addresses
            raise ResolveError(f"{name}: no addresses (cached)")
        task = self._inflight.get(name) or self._start(name)
        return await asyncio.shield(task)

    def _start(self, name: str) -> asyncio.Future:
        # One lookup per name however many connections wait on it; a task of its own, so a
        # waiter that gives up (client gone) does not cancel it for the others.
        task = asyncio.get_running_loop().create_task(self._lookup(name))
        self._inflight[name] = task
        task.add_done_callback(self._lookup_done)
        return task

    def _lookup_done(self, task: asyncio.Task) -> None:
        for name, t in list(self._inflight.items()):
            if t is task:
                del self._inflight[name]
        if not task.cancelled():
            task.exception()  # retrieved, even if every waiter has gone

    async def _lookup(self, name: str) -> tuple[str, ...]:
        answers = await asyncio.gather(
            self._query(name, dns.rdatatype.A), self._query(name, dns.rdatatype.AAAA), return_exceptions=True
        )
        now = self.clock()
        addresses: list[str] = []
        ttls: list[float] = []
        nxdomain = False
        failure: BaseException | None = None
        for answer in answers:
            if isinstance(answer, dns.resolver.NXDOMAIN):
                nxdomain = True
            elif isinstance(answer, BaseException):
                failure = answer
            elif answer.rrset is not None:
                addresses += [rr.address for rr in answer.rrset]
                ttls.append(answer.rrset.ttl)
        if addresses:
            self.stats.dns_result("ok")
            if self._failing.pop(name, None) is not None:
                log.warning("DNS answers again for %s", name)
            return self.cache.put(name, tuple(addresses), min(ttls), now).addresses
        if nxdomain or failure is None:
            self.stats.dns_result("nxdomain" if nxdomain else "nodata")
            self._failing.pop(name, None)
            self.cache.put(name, (), 0, now)
            raise ResolveError(f"{name}: {'NXDOMAIN' if nxdomain else 'no A or AAAA records'}")
        stale = self.cache.stale(name, now)
        if stale is not None:
            self.stats.dns_result("stale")
            if name not in self._failing:
                log.warning("DNS unreachable for %s (%s); serving its stale answer, and looking it up "
                            "again every %gs", name, _describe(failure), self.config.stale_refresh)
            self._failing[name] = now + self.config.stale_refresh
            return stale.addresses
        self.stats.dns_result("error")
        raise ResolveError(f"{name}: {_describe(failure)}")

    async def _query(self, name: str, rdtype: dns.rdatatype.RdataType) -> dns.resolver.Answer:
        return await self._dns.resolve(name, rdtype, raise_on_no_answer=False, search=False)


def _describe(exc: BaseException) -> str:
    if isinstance(exc, dns.exception.Timeout):
        return "DNS timeout"
    if isinstance(exc, dns.resolver.NoNameservers):
        return "no DNS server answered"
    return f"{type(exc).__name__}: {exc}"

