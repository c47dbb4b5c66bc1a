"""What a connection is given: a small ``Context`` (nothing of the server itself) and what it
knows of the listener that accepted it. Both are replaced whole by a reload; a running
connection keeps the ones it started with."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from ..allow import Allowlist, ClientLimits
from ..dns.resolver import Resolver
from ..observe.accesslog import AccessLog
from ..observe.stats import RouteStats, Stats
from ..routes import Route, RouteTable
from .events import EventSet
from .handshakes import Handshakes


@dataclass(frozen=True, slots=True)
class Context:
    """What a connection may touch. A reload builds a new one and the server swaps it in
    one assignment; running connections keep the one they started with."""

    events: EventSet
    routes: RouteTable
    resolver: Resolver
    limits: ClientLimits
    handshakes: Handshakes
    """The connections waiting for their hello: shared by every context of the process."""
    stats: Stats
    access_log: AccessLog | None
    handshake_timeout: float
    connect_timeout: float
    idle_timeout: float
    splice_after: float
    """Bytes a direction copies before it moves to splice(2) (0: at once; inf: never)."""
    refuse_alert: bool
    is_loop: Callable[[str, int], bool]
    """Would connecting to (ip, port) reach one of our own listeners?"""
    spawn: Callable[[Coroutine[Any, Any, None]], asyncio.Task]
    """Run a coroutine as a task the server keeps a reference to (DNS cache misses only)."""
    routing: dict[str, tuple[Route, RouteStats, str]] = field(default_factory=dict)
    """What routing gave each name: its route, the route's stats and the upstream host. Kept
    here because a name's route changes only with a reload, which makes a new context."""


@dataclass(slots=True)
class ListenerInfo:
    """What a connection knows of the listener that accepted it. A reload replaces it."""

    name: str
    allow: Allowlist
    proxy_protocol: bool
    proxy_from: Allowlist
    """The peers whose PROXY headers are believed (empty: every peer)."""
