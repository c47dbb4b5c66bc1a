"""One process's proxy: its listeners, the engine's event set, the live connections, and
the context new connections get. The ``Lifecycle`` drives it (as a single process, or as a
worker under a supervisor).

Shared state lives here and nowhere else: the set of live connections, the listeners, and
``ctx``, which a reload replaces in one assignment.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import socket
from collections.abc import Callable, Iterable

from prometheus_client.registry import Collector

from ..addresses import connect_target, is_unspecified
from ..allow import Allowlist, ClientLimits
from ..config import Config, Listen
from ..dns.resolver import Resolver
from ..engine.connection import Connection, State, clock
from ..engine.context import Context, ListenerInfo
from ..engine.events import EventSet
from ..engine.handshakes import Handshakes
from ..engine.listener import Listener, bind, listen_name
from ..engine.splice import splice_after
from ..errors import SniproxyError
from ..observe.accesslog import AccessLog
from ..observe.metrics import ProcessTreeCollector
from ..observe.stats import Stats
from ..reasons import Refusal
from ..routes import RouteTable
from ..tasks import TaskSet
from .reload import SINGLE_PROCESS, Loader, load_new, warn_restart_only

log = logging.getLogger("sniproxy.server")

#: Deadlines (handshake, connect, idle) are checked this often, at most.
SWEEP_INTERVAL = 1.0
class Server:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, access_log: AccessLog | None,
                 load_config: Loader | None = None, reopen: Callable[[], None] | None = None):
        self.config = config
        self.loop = loop
        self.access_log = access_log
        if access_log is not None:
            access_log.loop = loop  # lines of one loop iteration go out in one write
        self.load_config = load_config
        self._reopen = reopen
        self.events = EventSet(loop)
        self.stats = Stats()
        self.connections: set[Connection] = set()
        self.listeners: dict[tuple[str, int], tuple[Listener, ListenerInfo]] = {}
        self.sockets: dict[tuple[str, int], socket.socket] = {}  # inherited, not yet listening
        self.fixed_listeners = False  # from systemd: a reload may not add or remove one
        self._client_counts: dict[str, int] = {}
        self.handshakes = Handshakes(config.server.max_handshakes_per_client, config.server.max_hello_memory)
        self.tasks = TaskSet()
        self._local: dict[str, bool] = {}
        self._loops: dict[tuple[str, int], bool] = {}
        self._drained = asyncio.Event()
        self._on_closed = self._closed  # bound once: a connection is given it
        self._sweeper: asyncio.TimerHandle | None = None
        self.ctx = self._context(config, Resolver(config.resolver, self.stats))

    def _context(self, config: Config, resolver: Resolver) -> Context:
        s = config.server
        return Context(
            events=self.events,
            routes=RouteTable(config.routes),
            resolver=resolver,
            limits=ClientLimits(s.max_connections_per_client, self._client_counts),
            handshakes=self.handshakes,
            stats=self.stats,
            access_log=self.access_log,
            handshake_timeout=s.handshake_timeout,
            connect_timeout=s.connect_timeout,
            idle_timeout=s.idle_timeout,
            splice_after=splice_after(s.splice),
            refuse_alert=s.refuse_alert,
            is_loop=self.is_loop,
            spawn=self.tasks.spawn,
        )

    # -- accept ----------------------------------------------------------------------------

    def _accepted(self, key: tuple[str, int], fd: int, peer: tuple) -> None:
        info = self.listeners[key][1]
        conn = Connection(self.ctx, info, fd, peer, self._on_closed)
        self.connections.add(conn)
        if len(self.connections) > self.config.server.max_connections:
            # Full: the oldest connection still waiting for its hello makes room, so silent
            # connections cannot starve new ones; only established ones refuse a newcomer.
            waiting = self.handshakes.oldest()
            if waiting is None:
                conn.refuse(Refusal.LIMIT, detail=f"max_connections {self.config.server.max_connections} reached")
                return
            waiting.evict(Refusal.EVICTED)
        conn.start()

    def _closed(self, conn: Connection) -> None:
        self.connections.discard(conn)
        if not self.connections:
            self._drained.set()

    def _listen(self, listen: Listen, sock: socket.socket) -> None:
        key = listen.key
        info = ListenerInfo(listen_name(listen), _allowlist(listen, self.config), listen.proxy_protocol,
                            Allowlist(listen.proxy_from))
        listener = Listener(sock, info.name, self.events, functools.partial(self._accepted, key),
                            self.stats.accept_error)
        self.listeners[key] = (listener, info)
        log.info("listening on %s%s", info.name, " (PROXY protocol)" if info.proxy_protocol else "")

    # -- loop refusal ----------------------------------------------------------------------

    def is_loop(self, ip: str, port: int) -> bool:
        """Would connecting to (ip, port) land on one of our own listeners? Cached: the
        answer changes only when listeners do, and it is asked on every connection."""
        key = (ip, port)
        known = self._loops.get(key)
        if known is None:
            known = self._check_loop(ip, port)
            if len(self._loops) < 4096:
                self._loops[key] = known
        return known

    def _check_loop(self, ip: str, port: int) -> bool:
        """Judged by what connect() would reach, not by the string DNS gave: a mapped or an
        unspecified address reaches a listener as surely as its plain form."""
        target = connect_target(ip)
        family = ":" in target
        for address, listen_port in self.listeners:
            if listen_port != port:
                continue
            if address == target or (is_unspecified(address) and (":" in address) == family and self._is_local(target)):
                return True
        return False

    def _is_local(self, ip: str) -> bool:
        known = self._local.get(ip)
        if known is None:
            # An address is ours if we can bind to it; cached, since upstream addresses are few.
            family = socket.AF_INET6 if ":" in ip else socket.AF_INET
            with socket.socket(family, socket.SOCK_DGRAM) as s:
                try:
                    s.bind((ip, 0))
                    known = True
                except OSError:
                    known = False
            if len(self._local) < 1024:
                self._local[ip] = known
        return known

    # -- the Service the lifecycle drives ----------------------------------------------------

    async def start(self) -> None:
        """Serve every [[listen]] entry, on an inherited socket where one was given."""
        for listen in self.config.listen:
            sock = self.sockets.pop(listen.key, None) or bind(listen)
            self._listen(listen, sock)
        for sock in self.sockets.values():
            sock.close()
        self.sockets.clear()
        self._schedule_sweep()

    async def reload(self) -> bool:
        """Re-read the config: new routes, resolver, limits, timeouts and splice policy for
        new connections (running ones keep their context), listeners added and removed."""
        if self.load_config is None:
            log.error("reload failed: this server has no config file to read")
            return False
        loaded = load_new(self.load_config, self.config, self.fixed_listeners, log)
        if loaded is None:
            return False
        new = loaded[0]
        added = [entry for entry in new.listen if entry.key not in self.listeners]
        sockets = {}
        try:
            for listen in added:
                sockets[listen.key] = bind(listen)
        except (OSError, SniproxyError) as exc:
            for sock in sockets.values():
                sock.close()
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        warn_restart_only(self.config, new, SINGLE_PROCESS, log)
        wanted = {entry.key: entry for entry in new.listen}
        for key in [k for k in self.listeners if k not in wanted]:
            listener, info = self.listeners.pop(key)
            listener.close()
            log.info("stopped listening on %s", info.name)
        old = self.config
        self.config = new
        for key, (_, info) in self.listeners.items():
            info.allow = _allowlist(wanted[key], new)
            info.proxy_protocol = wanted[key].proxy_protocol
            info.proxy_from = Allowlist(wanted[key].proxy_from)
        for listen in added:
            self._listen(listen, sockets[listen.key])
        self._loops.clear()
        self.handshakes.max_per_client = new.server.max_handshakes_per_client
        self.handshakes.max_memory = new.server.max_hello_memory
        resolver = self.ctx.resolver if new.resolver == old.resolver else Resolver(new.resolver, self.stats)
        self.ctx = self._context(new, resolver)
        self._schedule_sweep()
        log.info("reloaded %s: %d listeners, %d routes", new.source, len(new.listen), len(new.routes))
        return True

    def stop_accepting(self) -> None:
        for listener, _ in self.listeners.values():
            listener.close()
        n = len(self.connections)
        log.info("stopping: listeners closed, draining %d connections for up to %gs", n,
                 self.config.server.drain_timeout)

    async def drain(self, timeout: float, hurry: asyncio.Event) -> None:
        if self.connections:
            self._drained.clear()
            waiter = self.loop.create_task(self._drained.wait())
            rush = self.loop.create_task(hurry.wait())
            done, _ = await asyncio.wait({waiter, rush}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()
            rush.cancel()
            if self.connections:
                why = "second stop signal" if rush in done else "drain timeout"
                log.info("%s: closing %d connections", why, len(self.connections))
                for conn in list(self.connections):
                    conn.force_close()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self.tasks.cancel_all()
        if self.access_log is not None:
            self.access_log.flush()

    async def collect(self) -> bool:
        return True  # this very loop is answering

    def snapshot(self) -> dict:
        snap = self.stats.snapshot(c for c in self.connections if c.state is State.FORWARDING)
        snap["handshakes_waiting"] = len(self.handshakes)
        snap["hello_memory"] = self.handshakes.held
        return snap

    def status(self) -> str:
        return f"{len(self.connections)} connections"

    def reopen_logs(self) -> None:
        try:
            if self._reopen is not None:
                self._reopen()
            if self.access_log is not None:
                self.access_log.reopen()
        except OSError as exc:  # e.g. the new file's directory is not writable for us
            log.error("cannot reopen log files (still writing to the old ones): %s", exc)
            return
        log.info("log files reopened")

    def collectors(self) -> Iterable[Collector]:
        return (ProcessTreeCollector(lambda: (os.getpid(),)),)

    # -- deadlines ---------------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        s = self.config.server
        interval = min(SWEEP_INTERVAL, s.idle_timeout / 4, s.handshake_timeout / 4, s.connect_timeout / 4)
        self._sweeper = self.loop.call_later(interval, self._sweep, interval)

    def _sweep(self, interval: float) -> None:
        """Act on passed deadlines: handshake, connect and idle, for every connection."""
        now = clock()
        for conn in list(self.connections):
            try:
                conn.expire(now)
            except Exception as exc:  # a bug costs one connection, never the sweep
                log.error("internal error in %r", conn, exc_info=exc)
                conn.on_error(exc)
        self._sweeper = self.loop.call_later(interval, self._sweep, interval)


def _allowlist(listen: Listen, config: Config) -> Allowlist:
    return Allowlist(listen.allow if listen.allow is not None else config.server.allow)
