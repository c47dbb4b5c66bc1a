"""One proxied connection, from accept to close, on the engine's event set.

    PROXY_HEADER -> HELLO -> RESOLVING -> CONNECTING -> FORWARDING -> CLOSED
    (any state may go to CLOSED; HELLO skips RESOLVING when the name is cached)

The connection owns both descriptors. It gets a small ``Context`` (routes, resolver, limits,
stats, access log, timeouts, splice policy, loop guard) and an ``on_closed`` callback; it
never sees the server. Deadlines (handshake, connect, idle) are fields read by the server's
once-a-second sweep: there are no per-connection timers or tasks, except a task for a DNS
cache miss.
"""

from __future__ import annotations

import _socket as _csocket
import asyncio
import enum
import errno
import logging
import os
import socket
import time
from collections.abc import Callable

from ..addresses import client_key, format_address
from ..dns.resolver import ResolveError
from ..errors import HelloError, OverLimit
from ..observe.accesslog import format_line
from ..observe.stats import RouteStats
from ..observe.throttle import Throttled
from ..protocol.fasthello import first_record_size, parse_single_record
from ..protocol.proxyproto import ProxyProtocolError
from ..protocol.proxyproto import parse as parse_proxy_header
from ..protocol.tls import MAX_RECORD, RECORD_HEADER, UNRECOGNIZED_NAME_ALERT, ClientHello, HelloReader
from ..protocol.wire import NeedData
from ..reasons import Close, HelloLimit, Refusal
from ..routes import Route
from .context import Context, ListenerInfo
from .events import ERR, IN, OUT, RDHUP, close_with_reset, errno_name, set_receive_low_water, socket_error
from .forward import Flow, Result
from .handshakes import CLIENT_GRACE

log = logging.getLogger("sniproxy.connection")
_throttle = Throttled(log)

#: Reads a ClientHello may take. Segments arriving apart each make one: 125 of them come from a
#: path with a tiny MSS; more than this is a client feeding bytes one by one.
MAX_HELLO_READS = 256

#: The most SO_RCVLOWAT asks for: a whole TLS record with its header. The kernel grows the
#: receive buffer to hold it where needed.
MAX_LOW_WATER = RECORD_HEADER + MAX_RECORD

#: Names whose routing a context remembers (``Context.routing``) before starting afresh.
MAX_ROUTED = 1024

#: The clock of every connection time and deadline: high resolution (the event loop's own
#: clock moves in 1 ms steps, too coarse for connect times on a LAN).
clock = time.monotonic
_readv = os.readv
_socket = _csocket.socket
_AF_INET, _AF_INET6 = socket.AF_INET, socket.AF_INET6
_STREAM = socket.SOCK_STREAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
_IPPROTO_TCP, _TCP_NODELAY = socket.IPPROTO_TCP, socket.TCP_NODELAY
#: What a non-blocking connect returns when it has not failed (yet).
_CONNECT_STARTED = (0, errno.EINPROGRESS)


class State(enum.IntEnum):
    """An IntEnum: its members hash as ints, and the transition table is looked up on every
    transition (a plain Enum hashes through a Python method)."""

    PROXY_HEADER = 1
    HELLO = 2
    RESOLVING = 3
    CONNECTING = 4
    FORWARDING = 5
    CLOSED = 6


#: The only transitions there are; ``_enter`` refuses any other.
_NEXT: dict[State, frozenset[State]] = {
    State.PROXY_HEADER: frozenset({State.HELLO, State.CLOSED}),
    State.HELLO: frozenset({State.RESOLVING, State.CONNECTING, State.CLOSED}),
    State.RESOLVING: frozenset({State.CONNECTING, State.CLOSED}),
    State.CONNECTING: frozenset({State.FORWARDING, State.CLOSED}),
    State.FORWARDING: frozenset({State.CLOSED}),
    State.CLOSED: frozenset(),
}
#: Members the hot path compares with, as module globals: on 3.11 an attribute of an Enum
#: class is looked up through EnumType.__getattr__ (about 1,100 instructions, against about
#: 25 for a global), and a connection does so a few dozen times.
_PROXY_HEADER, _HELLO, _RESOLVING = State.PROXY_HEADER, State.HELLO, State.RESOLVING
_CONNECTING, _FORWARDING, _CLOSED = State.CONNECTING, State.FORWARDING, State.CLOSED
_WAIT, _MORE, _EOF, _SRC_FAILED = Result.WAIT, Result.MORE, Result.EOF, Result.SRC_FAILED
_DONE = Close.DONE
#: States whose deadline is the handshake timeout (a tuple: membership by identity).
_HANDSHAKE = (State.PROXY_HEADER, State.HELLO)


class Connection:
    # Set once the hello is routed (the route facts), the upstream is tried (the attempt), or
    # it connected (the flows and the idle clock), and read only from then on: the state says
    # which exist, so they are never None-markers, and an accept writes none of them.
    route_stats: RouteStats
    upstream_host: str
    upstream_port: int
    addresses: tuple[str, ...]
    attempt: int
    loops: int
    failures: list[str]
    upstream_ip: str  # the address connected to; named host:port only for a log line
    connect_started: float
    task: asyncio.Task  # while RESOLVING: a DNS cache miss
    up: Flow  # client -> upstream
    down: Flow  # upstream -> client
    idle_mark: int
    idle_since: float

    __slots__ = (
        "ctx", "listener", "on_closed", "state", "client_fd", "upstream_fd", "client_ip",
        "client_port", "holds_slot", "received", "reader", "client_readable", "client_eof", "hello_bytes",
        "hello_reads", "hello_records", "hello_seconds", "hello", "route", "route_stats", "upstream_host",
        "upstream_port", "addresses",
        "attempt", "loops", "failures", "upstream_ip", "up", "down", "started", "connect_started",
        "deadline", "task", "close_reason", "idle_mark", "idle_since", "waiting", "low_water",
    )

    def __init__(self, ctx: Context, listener: ListenerInfo, fd: int, peer: tuple,
                 on_closed: Callable[[Connection], None]):
        self.ctx = ctx
        self.listener = listener
        self.on_closed = on_closed
        self.state = _PROXY_HEADER if listener.proxy_protocol else _HELLO
        self.client_fd = fd
        self.upstream_fd = -1
        self.client_ip = client_key(peer[0]) if peer else ""
        self.client_port: int | None = peer[1] if peer else None
        self.holds_slot = False  # counted in ctx.limits, to be released on close
        self.received = b""  # every client byte before FORWARDING, forwarded as received
        self.reader: HelloReader | None = None  # only when the hello is not one record in one read
        self.client_readable = True  # the client's readiness before its Flow exists
        self.client_eof = False  # and whether its FIN has been seen (EPOLLRDHUP)
        self.hello_bytes = 0  # the ClientHello's records, as received
        self.hello_reads = 0
        self.hello_records = 0
        self.hello_seconds = 0.0
        self.hello: ClientHello | None = None  # for the access log, which shows null without one
        self.route: Route | None = None  # likewise
        self.started = clock()
        self.deadline = self.started + ctx.handshake_timeout
        self.close_reason: Close | Refusal = Close.CLIENT_CLOSED
        self.waiting = False  # in ctx.handshakes: its hello did not come whole with the first read
        self.low_water = 1  # the client socket's SO_RCVLOWAT: raised while a partial hello waits

    # Live byte counters, read by the stats snapshot while the connection is forwarding.
    @property
    def to_upstream(self) -> int:
        return self.up.nbytes

    @property
    def to_client(self) -> int:
        return self.down.nbytes

    def on_error(self, exc: Exception) -> None:
        """A bug in this connection's handling: it alone is closed, as internal_error."""
        if self.state is _FORWARDING:
            self._close(Close.INTERNAL_ERROR, reset_client=True, reset_upstream=True)
        elif self.state is not _CLOSED:
            self.refuse(Refusal.INTERNAL_ERROR, detail=repr(exc))

    def _enter(self, state: State) -> None:
        if state not in _NEXT[self.state]:
            raise RuntimeError(f"connection state {self.state.name.lower()} -> {state.name.lower()}")
        self.state = state

    # -- accept ----------------------------------------------------------------------------

    def start(self) -> None:
        """Just accepted: admit the client (unless a PROXY header will name it, and then only
        from a peer trusted to), watch the socket, and read at once: the hello has usually
        arrived with the handshake's ACK."""
        if self.state is _HELLO:
            if not self._admit():
                return
        elif not self.listener.proxy_from.allows(self.client_ip):
            _throttle.warning(Refusal.UNTRUSTED_PROXY, "%s: refused: not in proxy_from of %s, so its PROXY header "
                              "would not be believed", self._client(), self.listener.name)
            self.refuse(Refusal.UNTRUSTED_PROXY, detail=f"{self.client_ip} is not in proxy_from of {self.listener.name}")
            return
        try:
            self.ctx.events.add(self.client_fd, self)
        except OSError:
            self._close(Close.INTERNAL_ERROR, reset_client=True)
            return
        self._read_client()

    def _admit(self) -> bool:
        """Allowlist and per-client limit, on the real client address."""
        if not self.listener.allow.allows(self.client_ip):
            self.refuse(Refusal.DENIED, detail=f"{self.client_ip} is not in the allowlist of {self.listener.name}")
            return False
        if not self.ctx.limits.try_acquire(self.client_ip):
            self.refuse(Refusal.CLIENT_LIMIT, detail=f"{self.client_ip} holds {self.ctx.limits.max_per_client} connections")
            return False
        self.holds_slot = True
        return True

    # -- events ----------------------------------------------------------------------------

    def on_event(self, fd: int, events: int) -> None:
        state = self.state
        if state is _FORWARDING:
            # Input on a socket is for the Flow reading it; output, for the Flow writing to it.
            # (Here, not in a method of its own: most events of a connection come this way.)
            if fd == self.client_fd:
                reads, writes = self.up, self.down
            else:
                reads, writes = self.down, self.up
            if events & ERR:
                self._reset("client" if fd == self.client_fd else "upstream", reads)
                return
            if not writes.writable and events & OUT:  # it was waiting for room (edge-triggered,
                writes.writable = True                # every other event carries OUT as well)
                self._run(writes)
            if events & IN and self.state is _FORWARDING:
                reads.readable = True
                if events & RDHUP:
                    reads.eof_pending = True
                self._run(reads)
        elif fd == self.client_fd:
            if events & ERR:  # reset before forwarding: the client left
                self._close(Close.CLIENT_CLOSED)
                return
            if not events & IN:
                return  # writable: the first event of every registration; nothing to read
            if events & RDHUP:
                self.client_eof = True
            if state in _HANDSHAKE:
                self._read_client()
            else:  # resolving or connecting: remember; the client Flow reads it later
                self.client_readable = True
        elif state is _CONNECTING:
            if events & ERR:
                self._connect_failed(errno_name(socket_error(fd)))
            elif events & OUT:
                self._connected(events)

    # -- hello -----------------------------------------------------------------------------

    def _read_client(self) -> None:
        scratch = self.ctx.events.scratch
        try:
            n = _readv(self.client_fd, scratch.views)
        except BlockingIOError:
            self._wait()
            return
        except OSError:
            self._close(Close.CLIENT_CLOSED)
            return
        if n == 0:
            log.debug("%s: closed before a complete ClientHello", self._client())
            self._close(Close.CLIENT_CLOSED)
            return
        self.hello_reads += 1
        # A short read drained the socket: the client Flow need not try again until an edge
        # says there is more (or the FIN, seen as EPOLLRDHUP, is still to be read).
        self.client_readable = n == len(scratch.buffer) or self.client_eof
        data = scratch.view[:n].tobytes()  # one copy (bytes(buffer[:n]) makes two)
        if self.state is _PROXY_HEADER:
            data = self._proxy_header(data)
            if not data:
                return
        try:
            if self.hello_reads > MAX_HELLO_READS:
                raise OverLimit(HelloLimit.READS, f"ClientHello not complete after {MAX_HELLO_READS} reads")
            reader = self.reader
            if reader is None:
                if not self.received:
                    single = parse_single_record(data)
                    if single is not None:
                        self.received = data
                        self.hello_bytes = first_record_size(data)
                        self.hello_records = 1
                        self._routed(single)
                        return
                reader = self.reader = HelloReader()
            hello = reader.feed(data)
        except HelloError as exc:
            if isinstance(exc, OverLimit):
                self.ctx.stats.hello_limit(exc.limit)
                _throttle.warning(exc.limit, "%s: refused a ClientHello over a bound: %s", self._client(), exc)
            self.refuse(exc.reason, detail=str(exc))
            return
        if isinstance(hello, NeedData):
            self._wait()
            self.ctx.handshakes.hold(self, len(reader.received))
            if self.state is not _CLOSED:  # (the memory budget may have evicted it)
                self._wake_at(reader.missing)
            return
        self.received = bytes(reader.received)
        self.hello_bytes = reader.consumed
        self.hello_records = reader.records
        self.reader = None
        self._routed(hello)

    def _wake_at(self, nbytes: int) -> None:
        """Have the kernel wake this connection only once the ``nbytes`` the hello needs next
        have arrived (SO_RCVLOWAT; a FIN or an error still wakes it at once): a hello fed in
        tiny segments then costs a read per record, not one per segment."""
        nbytes = min(nbytes, MAX_LOW_WATER)
        if nbytes != self.low_water and set_receive_low_water(self.client_fd, nbytes):
            self.low_water = nbytes

    def _proxy_header(self, data: bytes) -> bytes:
        """A PROXY v1/v2 header from a load balancer precedes the hello: returns the bytes
        after it, or b"" when it is incomplete or refused."""
        buf = self.received + data
        try:
            header = parse_proxy_header(buf)
        except ProxyProtocolError as exc:
            self.refuse(Refusal.BAD_PROXY_HEADER, detail=str(exc))
            return b""
        if isinstance(header, NeedData):
            self.received = buf
            self._wait()
            self.ctx.handshakes.hold(self, len(buf))
            return b""
        self.received = b""
        if header.source is not None:
            self.client_ip = client_key(header.source[0])
            self.client_port = header.source[1]
        self._enter(_HELLO)
        if not self._admit():
            return b""
        if self.waiting:  # the header's bytes are no longer held (the hello's will be)
            self.ctx.handshakes.hold(self, 0)
        return buf[header.length_consumed:]

    # -- waiting for the hello ---------------------------------------------------------------

    def _wait(self) -> None:
        """The hello is not complete after a read: this connection waits in ``ctx.handshakes``
        (and counts for its client once it has waited CLIENT_GRACE: see ``expire``)."""
        if not self.waiting:
            self.waiting = True
            self.ctx.handshakes.enter(self)

    def _refuse_client_handshakes(self) -> None:
        limit = self.ctx.handshakes.max_per_client
        _throttle.warning(Refusal.CLIENT_HANDSHAKES, "%s has %d connections waiting for a ClientHello "
                          "(max_handshakes_per_client): refusing more", self.client_ip, limit)
        self.refuse(Refusal.CLIENT_HANDSHAKES, detail=f"{self.client_ip} has {limit} connections waiting for a hello")

    def evict(self, reason: Refusal) -> None:
        """Dropped while waiting for its hello, to protect everyone else (``evicted`` or
        ``hello_memory``); one line says so, at most every ten seconds."""
        handshakes = self.ctx.handshakes
        if reason is Refusal.EVICTED:
            _throttle.warning(reason, "connection table full (max_connections): dropped the oldest connection "
                              "waiting for a ClientHello (%s) to admit a new one", self._client())
        else:
            _throttle.warning(reason, "partial ClientHellos hold more than max_hello_memory (%d bytes): dropped the "
                              "oldest (%s)", handshakes.max_memory, self._client())
        self.refuse(reason)

    def _routed(self, hello: ClientHello) -> None:
        """A complete hello: route it, then resolve (or use the cache) and connect."""
        if self.waiting:
            self.waiting = False
            self.ctx.handshakes.leave(self)
            if self.low_water != 1:  # what follows the hello is forwarded as it comes
                self._wake_at(1)
        self.hello = hello
        if self.hello_reads != 1 or self.hello_records != 1:  # a whole one came with the connection: 0 s
            self.hello_seconds = clock() - self.started
        sni = hello.sni
        if sni is None:
            self.refuse(Refusal.NO_SNI, alert=True, detail="the ClientHello names no host (absent, or an IP literal)")
            return
        routed = self.ctx.routing.get(sni)
        if routed is None:
            route = self.ctx.routes.match(sni)
            if route is None:
                self.refuse(Refusal.NO_ROUTE, alert=True, detail=f"no route for {sni}")
                return
            routed = (route, self.ctx.stats.route(route.name), route.upstream_for(sni))
            if len(self.ctx.routing) >= MAX_ROUTED:  # a wildcard route takes the client's names
                self.ctx.routing.clear()
            self.ctx.routing[sni] = routed
        self.route, rs, host = routed
        self.route_stats = rs
        self.upstream_host = host
        self.upstream_port = routed[0].port
        rs.observe_hello(self.hello_bytes, self.hello_records, self.hello_reads, self.hello_seconds,
                         hello.pq_group, hello.ech)
        addresses = self.ctx.resolver.cached(host)
        if addresses is not None:
            self._enter(_CONNECTING)
            self._connect_to(addresses)
            return
        self._enter(_RESOLVING)
        self.task = self.ctx.spawn(self._resolve(host))

    async def _resolve(self, host: str) -> None:
        try:
            addresses = await self.ctx.resolver.resolve(host)
            if self.state is _RESOLVING:
                self._enter(_CONNECTING)
                self._connect_to(addresses)
        except ResolveError as exc:
            if self.state is _RESOLVING:
                log.warning("route %s: cannot resolve %s: %s", self.route_stats.name, host, exc)
                self.refuse(Refusal.RESOLVE_FAILED, detail=str(exc))
        except Exception as exc:  # a bug costs this connection, logged, never a hung one
            log.error("internal error while resolving %s", host, exc_info=exc)
            self.on_error(exc)

    # -- upstream --------------------------------------------------------------------------

    def _connect_to(self, addresses: tuple[str, ...]) -> None:
        self.addresses = addresses
        self.attempt = 0
        self.loops = 0
        self.failures = []
        self._try_next()

    def _try_next(self) -> None:
        """Connect to the next address that is not our own listener; refuse when none is left."""
        port = self.upstream_port
        while self.attempt < len(self.addresses):
            ip = self.addresses[self.attempt]
            self.attempt += 1
            if self.ctx.is_loop(ip, port):
                self.loops += 1
                continue
            try:
                # The C socket type: no Python-level wrapper for a descriptor kept as a number.
                sock = _socket(_AF_INET6 if ":" in ip else _AF_INET, _STREAM)
            except OSError as exc:  # out of descriptors: the next address would fare no better
                self.failures.append(f"{ip}: {exc.strerror or exc}")
                break
            try:
                sock.setsockopt(_IPPROTO_TCP, _TCP_NODELAY, 1)
                code = sock.connect_ex((ip, port))
            except OSError as exc:
                sock.close()
                self.failures.append(f"{ip}: {exc.strerror or exc}")
                continue
            if code not in _CONNECT_STARTED:
                sock.close()
                self.failures.append(f"{ip}: {os.strerror(code)}")
                continue
            fd = self.upstream_fd = sock.detach()
            self.upstream_ip = ip
            self.connect_started = clock()
            self.deadline = self.connect_started + self.ctx.connect_timeout
            try:
                self.ctx.events.add(fd, self)  # a finished connect reports OUT at once
            except OSError:
                self._drop_upstream()
                self.failures.append(f"{ip}: cannot watch the socket")
                continue
            return
        if self.loops and self.loops == len(self.addresses):
            log.error("route %s: %s resolves to this proxy's own listener; refusing a loop",
                      self.route_stats.name, self.upstream_host)
            self.refuse(Refusal.LOOP, detail="every address is one of our own listeners")
        else:
            log.warning("route %s: cannot connect to %s port %d: %s", self.route_stats.name,
                        self.upstream_host, port, "; ".join(self.failures))
            self.refuse(Refusal.CONNECT_FAILED, detail="; ".join(self.failures))

    def _connect_failed(self, why: str) -> None:
        self.failures.append(f"{self.addresses[self.attempt - 1]}: {why}")
        self._drop_upstream()
        self._try_next()

    def _drop_upstream(self) -> None:
        self.ctx.events.close(self.upstream_fd)
        self.upstream_fd = -1

    def _connected(self, events: int) -> None:
        """The upstream accepted: forward the hello as received, then both ways."""
        ctx = self.ctx
        now = clock()
        self.route_stats.connected(now - self.connect_started)
        self._enter(_FORWARDING)
        # (Positional arguments: keywords would cost a dict per call to a class.)
        self.up = Flow(self.client_fd, self.upstream_fd, ctx.splice_after, self.received, self.client_readable,
                       self.client_eof)
        # The upstream is read once it has sent something: this event says whether it has.
        self.down = Flow(self.upstream_fd, self.client_fd, ctx.splice_after, b"", bool(events & IN),
                         bool(events & RDHUP))
        self.received = b""
        self.idle_mark = -1
        self.idle_since = now
        self._run(self.up)
        if self.down.readable and self.state is _FORWARDING:
            self._run(self.down)

    # -- forwarding ------------------------------------------------------------------------

    def _run(self, flow: Flow) -> None:
        result = flow.run(self.ctx.events.scratch)
        if result is _WAIT:
            return
        if result is _EOF:
            if self.up.done and self.down.done:
                self._close(_DONE)
            else:  # the other direction's FIN will end the pair: its close sends the FIN
                (self.down if flow is self.up else self.up).last = True
        elif result is _MORE:
            self.ctx.events.post(self._resume_up if flow is self.up else self._resume_down)
        elif result is _SRC_FAILED:
            self._reset("client" if flow is self.up else "upstream", flow)
        elif flow is self.up:  # DST_FAILED
            self._reset("upstream", self.down)
        else:
            self._reset("client", self.up)

    def _resume_up(self) -> None:
        if self.state is _FORWARDING:
            self._run(self.up)

    def _resume_down(self) -> None:
        if self.state is _FORWARDING:
            self._run(self.down)

    def _reset(self, side: str, sent_by: Flow) -> None:
        """A reset (or a failed write) on ``side``, whose bytes ``sent_by`` carries: pass it on
        to the other side as a reset. Once that side's FIN has been passed on, though, it had
        finished: a reset then only refuses late bytes (a TLS close_notify after the server
        closed), and the pair ends as done, without a reset."""
        if sent_by.done:
            self._close(_DONE)
            return
        if log.isEnabledFor(logging.DEBUG):
            why = self.up.error or self.down.error
            log.debug("%s: %s reset (%s)", self._client(), side, why or "EPOLLERR")
        self._close(Close.CLIENT_RESET if side == "client" else Close.UPSTREAM_RESET, reset_client=side == "upstream",
                    reset_upstream=side == "client")

    # -- close -----------------------------------------------------------------------------

    def refuse(self, reason: Refusal, alert: bool = False, detail: str = "") -> None:
        """Close a connection that never reaches FORWARDING, counting why (and, at debug
        level, saying why in one line)."""
        self.ctx.stats.reject(reason)
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s: refused (%s)%s", self._client(), reason, f": {detail}" if detail else "")
        if alert and self.ctx.refuse_alert:
            try:
                os.write(self.client_fd, UNRECOGNIZED_NAME_ALERT)
            except OSError:
                pass
        self._close(reason)

    def force_close(self) -> None:
        """The drain is over: close now, counted as ``drain``."""
        if self.state is _FORWARDING:
            self._close(Close.DRAIN)
        elif self.state is not _CLOSED:
            self.refuse(Refusal.DRAIN)

    def expire(self, now: float) -> None:
        """Called by the sweep: act on a deadline that has passed."""
        state = self.state
        if state in _HANDSHAKE:
            if now >= self.deadline:
                self.refuse(Refusal.HANDSHAKE_TIMEOUT, detail=f"no complete ClientHello in {self.ctx.handshake_timeout:g}s")
            elif (self.waiting and state is _HELLO and now - self.started >= CLIENT_GRACE
                  and not self.ctx.handshakes.count_client(self)):
                self._refuse_client_handshakes()
        elif state is _CONNECTING:
            if now >= self.deadline:
                self._connect_failed("timeout")
        elif state is _FORWARDING:
            total = self.up.nbytes + self.down.nbytes
            if total != self.idle_mark:
                self.idle_mark = total
                self.idle_since = now
            elif now - self.idle_since >= self.ctx.idle_timeout:
                self._close(Close.IDLE)

    def _close(self, reason: Close | Refusal, reset_client: bool = False, reset_upstream: bool = False) -> None:
        if self.state is _CLOSED:
            return
        state = self.state
        forwarding = state is _FORWARDING
        self.state = _CLOSED
        self.close_reason = reason
        ctx = self.ctx
        if state is _RESOLVING:
            self.task.cancel()
        if reset_client:
            close_with_reset(self.client_fd)
        ctx.events.close(self.client_fd)
        if self.upstream_fd >= 0:
            if reset_upstream:
                close_with_reset(self.upstream_fd)
            ctx.events.close(self.upstream_fd)
        if self.holds_slot:
            ctx.limits.release(self.client_ip)
            self.holds_slot = False
        if self.waiting:
            self.waiting = False
            ctx.handshakes.leave(self)
        duration = clock() - self.started
        if forwarding:
            up, down = self.up, self.down
            if up.pipe is not None or down.pipe is not None:  # splicing: give the pipes back
                up.release()
                down.release()
            self.route_stats.closed(duration, up.nbytes, down.nbytes)
        if ctx.access_log is not None:
            ctx.access_log.write(self._log_line(duration, forwarding))
        self.on_closed(self)

    def _log_line(self, duration: float, forwarded: bool) -> str:
        route = self.route
        return format_line(
            time.time(), self._client(), self.listener.name, self.hello, route.name if route else None,
            format_address(self.upstream_ip, self.upstream_port) if forwarded else None, self.up.nbytes if forwarded else 0,
            self.down.nbytes if forwarded else 0, duration, self.close_reason, self.hello_bytes,
            self.hello_records, self.hello_reads, self.hello_seconds,
        )

    def _client(self) -> str | None:
        return format_address(self.client_ip, self.client_port) if self.client_ip else None
