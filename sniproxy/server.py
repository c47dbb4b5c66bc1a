"""The server's lifecycle, top to bottom: startup -> serve -> shutdown.

Signal handlers only set flags; ``run`` reacts. Shared state lives here: the live connections,
the route table and resolver that new connections use, and the stats.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
from collections.abc import Callable

from .accesslog import AccessLog
from .allow import ClientLimits
from .config import Config, Listen
from .errors import ConfigError, SniproxyError
from .listener import ListenerInfo, bind, is_wildcard, listen_name, serve
from .metrics import make_registry, start_http
from .resolver import Resolver
from .routes import RouteTable
from .splice import splice_enabled
from .stats import Stats
from .systemd import Notifier, watchdog_interval

log = logging.getLogger("sniproxy")


def splice_modes(mode: str) -> tuple[bool, bool]:
    """(splice right after the hello, splice once a connection carries SPLICE_AFTER)."""
    available = splice_enabled(mode)
    return (available and mode == "on", available and mode == "auto")


class Server:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop, access_log: AccessLog | None = None,
                 notifier: Notifier | None = None):
        self.config = config
        self.loop = loop
        self.access_log = access_log
        self.notifier = notifier or Notifier({})
        self.stats = Stats()
        self.routes = RouteTable(config.routes)
        self.resolver = Resolver(config.resolver, self.stats)
        self.client_limits = ClientLimits(config.server.max_connections_per_client)
        self.splice, self.splice_later = splice_modes(config.server.splice)
        self.connections: set = set()
        self.listeners: dict[tuple[str, int], tuple[asyncio.AbstractServer, ListenerInfo]] = {}
        self.metrics_server: asyncio.AbstractServer | None = None
        self.on_usr1: Callable[[], None] | None = None
        self.serve_metrics = True  # a worker leaves /metrics to its supervisor
        self.reuse_port = False  # workers bind listeners added on reload side by side
        self.channel = None  # a worker's link to its supervisor
        self._status_mark = (0.0, 0)
        self._local: dict[str, bool] = {}
        self._loops: dict[tuple[str, int], bool] = {}
        self._stop = asyncio.Event()
        self._reload = asyncio.Event()
        self._drained = asyncio.Event()
        self._sweeper: asyncio.TimerHandle | None = None

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
        ip = str(ipaddress.ip_address(ip.split("%")[0]))
        for address, listen_port in self.listeners:
            if listen_port != port:
                continue
            if address == ip or (is_wildcard(address) and self._is_local(ip)):
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

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self, sockets: dict[tuple[str, int], socket.socket] | None = None) -> None:
        """Serve every [[listen]] entry, on an inherited socket where one is given."""
        sockets = dict(sockets or {})
        for listen in self.config.listen:
            sock = sockets.pop(listen.key, None) or bind(listen, reuse_port=self.reuse_port)
            await self._serve(listen, sock)
        m = self.config.metrics
        if m.enabled and self.serve_metrics:
            registry = make_registry(self.stats.snapshot)
            self.metrics_server = await start_http(registry, m.address, m.port)
            log.info("metrics on http://%s/metrics", listen_name(Listen(m.address, m.port)))
        self._schedule_sweep()
        interval = watchdog_interval()
        if interval is not None:
            self._watchdog(interval)

    async def _serve(self, listen: Listen, sock: socket.socket) -> None:
        info = ListenerInfo(listen, self.config.server.allow)
        self.listeners[listen.key] = (await serve(self, info, sock), info)
        log.info("listening on %s%s", info.name, " (PROXY protocol)" if info.proxy_protocol else "")

    def install_signal_handlers(self) -> None:
        self.loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        self.loop.add_signal_handler(signal.SIGINT, self._stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, self._reload.set)
        self.loop.add_signal_handler(signal.SIGUSR1, self._usr1)

    def _usr1(self) -> None:
        try:
            if self.on_usr1 is not None:
                self.on_usr1()
            if self.access_log is not None:
                self.access_log.reopen()
        except OSError as exc:  # e.g. the new file's directory is not writable for us
            log.error("cannot reopen log files (still writing to the old ones): %s", exc)
            return
        log.info("log files reopened")

    def _watchdog(self, interval: float) -> None:
        """Ping systemd from the event loop itself, so a stuck loop stops the pings."""
        self.notifier.watchdog()
        self.notifier.status(self.status_line())
        self.loop.call_later(interval, self._watchdog, interval)

    def status_line(self) -> str:
        snap = self.stats.snapshot()
        total = sum(r["to_upstream"] + r["to_client"] for r in snap["routes"].values())
        now = self.loop.time()
        then, before = self._status_mark
        if now - then < 0.5:  # too close to the last sample for a meaningful rate
            rate = 0.0
        else:
            self._status_mark = (now, total)
            rate = (total - before) / (now - then) if then else 0.0
        active = sum(r["active"] for r in snap["routes"].values())
        return f"{active} connections, {rate / 1e6:.1f} MB/s"

    async def run(self, reload_config: Callable[[], Config] | None = None) -> None:
        """Serve until SIGTERM/SIGINT, reloading on SIGHUP, then drain."""
        self.notifier.ready(status=self.status_line())
        if self.channel is None:
            log.info("ready")
        while not self._stop.is_set():
            stop = asyncio.ensure_future(self._stop.wait())
            hup = asyncio.ensure_future(self._reload.wait())
            await asyncio.wait({stop, hup}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            hup.cancel()
            if self._reload.is_set():
                self._reload.clear()
                if reload_config is not None:
                    self.notifier.reloading()
                    try:
                        ok = await self.reload(reload_config)
                    except Exception:  # whatever went wrong, never skip the drain over it
                        log.exception("reload failed, keeping the running config")
                        ok = False
                    self.notifier.ready(status=self.status_line())
                    if self.channel is not None:
                        self.channel.reloaded(ok)
        self.notifier.stopping()
        await self.shutdown()

    def stop(self) -> None:
        self._stop.set()

    def request_reload(self) -> None:
        self._reload.set()

    async def reload(self, reload_config: Callable[[], Config]) -> bool:
        try:
            new = reload_config()
            splice = splice_modes(new.server.splice)
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        old = self.config
        added = [entry for entry in new.listen if entry.key not in self.listeners]
        sockets = {}
        try:
            for listen in added:
                sockets[listen.key] = bind(listen, reuse_port=self.reuse_port)
        except (OSError, SniproxyError) as exc:  # BindError: address in use, not ours, port < 1024
            for sock in sockets.values():
                sock.close()
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        wanted = {entry.key: entry for entry in new.listen}
        for key in [k for k in self.listeners if k not in wanted]:
            srv, info = self.listeners.pop(key)
            srv.close()
            log.info("stopped listening on %s", info.name)
        for key, (_, info) in self.listeners.items():
            info.update(wanted[key], new.server.allow)
        self.config = new
        for listen in added:
            await self._serve(listen, sockets[listen.key])
        self._loops.clear()
        self.routes = RouteTable(new.routes)
        self.client_limits.max_per_client = new.server.max_connections_per_client
        self.splice, self.splice_later = splice  # new connections only
        if new.resolver != old.resolver:
            self.resolver = Resolver(new.resolver, self.stats)
        log.info("reloaded %s: %d listeners, %d routes", new.source, len(new.listen), len(new.routes))
        return True

    async def shutdown(self) -> None:
        for srv, _ in self.listeners.values():
            srv.close()
        n = len(self.connections)
        drain = self.config.server.drain_timeout
        log.info("stopping: listeners closed, draining %d connections for up to %.0fs", n, drain)
        if self.connections:
            try:
                async with asyncio.timeout(drain):
                    await self._drained.wait()
            except TimeoutError:
                log.info("drain timeout: closing %d connections", len(self.connections))
                for conn in list(self.connections):
                    conn.abort("drain")
                try:  # let connection_lost callbacks run, so every connection is logged
                    async with asyncio.timeout(1.0):
                        await self._drained.wait()
                except TimeoutError:
                    pass
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self.metrics_server is not None:
            self.metrics_server.close()
        if self.access_log is not None:
            self.access_log.flush()
        if self.channel is not None:
            await self.channel.final()
        log.info("stopped")

    def connection_closed(self) -> None:
        if not self.connections and self._stop.is_set():
            self._drained.set()

    # -- idle timeout ----------------------------------------------------------------------

    def _schedule_sweep(self) -> None:
        interval = min(1.0, self.config.server.idle_timeout / 4)
        self._sweeper = self.loop.call_later(interval, self._sweep)

    def _sweep(self) -> None:
        """Close pairs with no bytes either way for idle_timeout. Reads the byte counters the
        pump keeps anyway, so the data path pays nothing for idle tracking."""
        now = self.loop.time()
        idle = self.config.server.idle_timeout
        for conn in list(self.stats.live):
            total = conn.to_upstream + conn.to_client
            if total != conn.idle_mark:
                conn.idle_mark = total
                conn.idle_since = now
            elif now - conn.idle_since >= idle:
                conn.abort("idle")
        self._schedule_sweep()

