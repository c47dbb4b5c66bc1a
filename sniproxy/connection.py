"""One proxied connection: accepted -> hello -> routed -> resolving -> connecting -> pumping -> closed.

The connection owns both sockets. Until the ClientHello is complete the client socket is
served by ``HelloProtocol``; after the upstream connects it is handed to a ``pump.Side``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from .accesslog import format_line
from .errors import HelloError
from .proxyproto import NEED_DATA as PROXY_NEED_DATA
from .proxyproto import ProxyProtocolError
from .proxyproto import parse as parse_proxy_header
from .pump import SPLICE_AFTER, SPLICE_RETRY, Side
from .resolver import ResolveError
from .splice import start as start_splice
from .tls import NEED_DATA, UNRECOGNIZED_NAME_ALERT, HelloReader

if TYPE_CHECKING:
    from .listener import ListenerInfo
    from .server import Server

log = logging.getLogger("sniproxy.connection")


def _addr(peer: Any) -> str | None:
    if not peer:
        return None
    host, port = peer[0], peer[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class Connection:
    __slots__ = (
        "server", "listener", "client_transport", "client_addr", "reader", "timer", "task",
        "state", "sni", "route", "route_stats", "upstream_addr", "client", "upstream",
        "started", "close_reason", "idle_mark", "idle_since", "counted", "proxy_buf",
    )

    def __init__(self, server: Server, listener: ListenerInfo, transport: asyncio.Transport):
        self.server = server
        self.listener = listener
        self.client_transport = transport
        self.client_addr = transport.get_extra_info("peername")
        self.counted: str | None = None  # the address holding a slot in the per-client limits
        self.proxy_buf = b"" if listener.proxy_protocol else None
        self.reader: HelloReader | None = HelloReader()
        self.timer: asyncio.TimerHandle | None = None
        self.task: asyncio.Task | None = None
        self.state = "hello"
        self.sni: str | None = None
        self.route = None
        self.route_stats = None
        self.upstream_addr: tuple | None = None
        self.client: Side | None = None
        self.upstream: Side | None = None
        self.started = server.loop.time()
        self.close_reason: str | None = None
        self.idle_mark = -1
        self.idle_since = self.started

    # Byte counters as the stats snapshot reads them while the connection runs.
    @property
    def to_upstream(self) -> int:
        return self.client.nbytes if self.client is not None else 0

    @property
    def to_client(self) -> int:
        return self.upstream.nbytes if self.upstream is not None else 0

    # -- admission -------------------------------------------------------------------------

    def admit(self) -> bool:
        """Allowlist and per-client limit, on the real client address."""
        ip = self.client_addr[0] if self.client_addr else ""  # no peer: reset before accept finished
        if not self.listener.allow.allows(ip):
            self.refuse("denied", alert=False)
            return False
        if not self.server.client_limits.try_acquire(ip):
            self.refuse("client_limit", alert=False)
            return False
        self.counted = ip
        return True

    def on_proxy_data(self, data: bytes) -> None:
        """A PROXY v1/v2 header from a load balancer precedes the ClientHello."""
        buf = self.proxy_buf + data
        try:
            header = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            log.debug("%s: %s", _addr(self.client_addr), exc)
            self.refuse("bad_proxy_header", alert=False)
            return
        if header is PROXY_NEED_DATA:
            self.proxy_buf = buf
            return
        self.proxy_buf = None
        if header.source is not None:
            self.client_addr = header.source
        if not self.admit():
            return
        rest = buf[header.length_consumed :]
        if rest:
            self.on_hello_data(rest)

    # -- hello -----------------------------------------------------------------------------

    def on_hello_data(self, data: bytes) -> None:
        reader = self.reader
        try:
            hello = reader.feed(data)
        except HelloError as exc:
            log.debug("%s: %s", _addr(self.client_addr), exc)
            self.refuse(exc.reason, alert=False)
            return
        if hello is NEED_DATA:
            return
        self.timer.cancel()
        self.sni = hello.sni
        if hello.sni is None:
            self.refuse("no_sni", alert=True)
            return
        route = self.server.routes.match(hello.sni)
        if route is None:
            self.refuse("no_route", alert=True)
            return
        self.route = route
        self.state = "resolving"
        self.client_transport.pause_reading()
        self.task = self.server.loop.create_task(self.open_upstream())

    def on_handshake_timeout(self) -> None:
        if self.state == "hello":
            self.refuse("handshake_timeout", alert=False)

    def refuse(self, reason: str, alert: bool) -> None:
        """Close a connection that never reaches an upstream, counting why."""
        self.server.stats.reject(reason)
        self.close_reason = reason
        self.state = "closed"
        if self.timer is not None:
            self.timer.cancel()
        t = self.client_transport
        if alert and self.server.config.server.refuse_alert and not t.is_closing():
            t.write(UNRECOGNIZED_NAME_ALERT)
            t.close()
        else:
            t.abort()

    # -- upstream --------------------------------------------------------------------------

    async def open_upstream(self) -> None:
        try:
            await self._open_upstream()
        except asyncio.CancelledError:
            raise
        except Exception:  # a bug must cost one connection, logged, never a hung one
            log.exception("%s: internal error while connecting", _addr(self.client_addr))
            upstream = self.upstream
            if upstream is not None and upstream.transport is not None and not upstream.lost:
                upstream.transport.abort()
            if self.state != "closed":
                self.refuse("internal_error", alert=False)

    async def _open_upstream(self) -> None:
        server = self.server
        route = self.route
        host = route.upstream_for(self.sni)
        try:
            addresses = server.resolver.cached(host) or await server.resolver.resolve(host)
        except ResolveError as exc:
            log.warning("route %s: cannot resolve %s: %s", route.name, host, exc)
            self.refuse("resolve_failed", alert=False)
            return
        self.state = "connecting"
        loop = server.loop
        client = Side(self, "client")
        client.transport = self.client_transport
        loops = 0
        failures = []
        for ip in addresses:
            if server.is_loop(ip, route.port):
                loops += 1
                continue
            upstream = Side(self, "upstream")
            upstream.peer, client.peer = client, upstream
            started = loop.time()
            try:
                async with asyncio.timeout(server.config.server.connect_timeout):
                    await loop.create_connection(lambda: upstream, ip, route.port)  # noqa: B023 (awaited here)
            except (OSError, TimeoutError) as exc:
                failures.append(f"{ip}: {exc.strerror if isinstance(exc, OSError) and exc.strerror else 'timeout'}")
                continue
            except asyncio.CancelledError:  # the client left while we connected
                if upstream.transport is not None:
                    upstream.transport.abort()
                raise
            if upstream.lost:  # connected, then closed before we could attach
                failures.append(f"{ip}: closed at once")
                continue
            self.attach(route, client, upstream, (ip, route.port), loop.time() - started)
            return
        if loops and loops == len(addresses):
            log.error("route %s: %s resolves to this proxy's own listener; refusing a loop", route.name, host)
            self.refuse("loop", alert=False)
        else:
            log.warning("route %s: cannot connect to %s port %d: %s", route.name, host, route.port, "; ".join(failures))
            self.refuse("connect_failed", alert=False)

    def attach(self, route: Any, client: Side, upstream: Side, addr: tuple, connect_time: float) -> None:
        """Upstream connected: forward the hello as received, then pump both ways."""
        stats = self.server.stats
        rs = stats.route(route.name)
        rs.connections += 1
        rs.active += 1
        rs.connect.observe(connect_time)
        self.route_stats = rs
        self.upstream_addr = addr
        self.client, self.upstream = client, upstream
        self.state = "pumping"
        stats.live.add(self)
        hello = bytes(self.reader.received)
        self.reader = None
        client.nbytes = len(hello)
        # Zero-copy path: sniproxy.splice takes both sockets over from here, unless the
        # upstream already spoke into uvloop's buffers (then the pump carries on).
        if self.server.splice and start_splice(self, client, upstream, hello):
            self.client_transport = None  # aborted by the takeover: let it go (~1 KiB each)
            return
        upstream.transport.write(hello)
        if self.server.splice_later:
            client.splice_at = upstream.splice_at = SPLICE_AFTER
        t = self.client_transport
        t.set_protocol(client)
        client.connection_made(t)
        t.resume_reading()

    def move_to_splice(self) -> None:
        """Hand a busy pumping pair over to splice(2), at a moment when neither transport
        holds unsent bytes, so nothing is lost or reordered. If this is not such a moment,
        ask again after the next SPLICE_RETRY bytes."""
        client, upstream = self.client, self.upstream
        if self.state != "pumping" or self.client_transport is None:
            return  # closed, or moved already
        if client.eof or upstream.eof or client.lost or upstream.lost:
            return
        if not upstream.transport.get_write_buffer_size() and start_splice(self, client, upstream, b""):
            self.client_transport = None
            log.debug("%s: moved to splice after %d bytes", _addr(self.client_addr), self.to_upstream + self.to_client)
            return
        client.splice_at = client.nbytes + SPLICE_RETRY
        upstream.splice_at = upstream.nbytes + SPLICE_RETRY

    # -- close -----------------------------------------------------------------------------

    def client_lost(self, exc: Exception | None) -> None:
        """The client socket closed while still in HelloProtocol (before pumping)."""
        if self.timer is not None:
            self.timer.cancel()
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.close_reason is None:
            self.close_reason = "client_closed"
        self.state = "closed"
        self.finish()

    def side_lost(self, side: Side, exc: Exception | None) -> None:
        if self.close_reason is None:
            if exc is not None:
                self.close_reason = f"{side.name}_reset"
            elif side.peer.lost:
                self.close_reason = "done"
        if side.lost and side.peer.lost:
            self.state = "closed"
            self.finish()

    def abort(self, reason: str) -> None:
        """Idle timeout or end of drain: close both sockets now."""
        if self.close_reason is None:
            self.close_reason = reason
        if self.state == "pumping":
            for side in (self.client, self.upstream):
                if not side.lost:
                    side.transport.abort()
        elif self.state != "closed":
            self.refuse(reason, alert=False)

    def finish(self) -> None:
        server = self.server
        server.connections.discard(self)
        if self.counted is not None:
            server.client_limits.release(self.counted)
            self.counted = None
        duration = server.loop.time() - self.started
        rs = self.route_stats
        if rs is not None and self in server.stats.live:
            server.stats.live.discard(self)
            rs.active -= 1
            rs.to_upstream += self.client.nbytes
            rs.to_client += self.upstream.nbytes
            rs.duration.observe(duration)
        if server.access_log is not None:
            route = self.route
            server.access_log.write(format_line(
                time.time(), _addr(self.client_addr), self.listener.name, self.sni,
                route.name if route is not None else None, _addr(self.upstream_addr),
                self.to_upstream, self.to_client, duration, self.close_reason,
            ))
        server.connection_closed()


class HelloProtocol(asyncio.Protocol):
    """Serves a freshly accepted client socket until its ClientHello is complete."""

    __slots__ = ("server", "listener", "conn")

    def __init__(self, server: Server, listener: ListenerInfo):
        self.server = server
        self.listener = listener
        self.conn: Connection | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        server = self.server
        conn = self.conn = Connection(server, self.listener, transport)  # type: ignore[arg-type]
        server.connections.add(conn)
        if len(server.connections) > server.config.server.max_connections:
            conn.refuse("limit", alert=False)
            return
        # Behind a load balancer the real client is known only after the PROXY header.
        if conn.proxy_buf is None and not conn.admit():
            return
        conn.timer = server.loop.call_later(server.config.server.handshake_timeout, conn.on_handshake_timeout)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn.state == "hello":
            if conn.proxy_buf is None:
                conn.on_hello_data(data)
            else:
                conn.on_proxy_data(data)

    def eof_received(self) -> bool:
        if self.conn.state == "hello":
            log.debug("%s: closed before a complete ClientHello", _addr(self.conn.client_addr))
        return False  # a client that half-closes before we connected has nothing left to say

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.client_lost(exc)
