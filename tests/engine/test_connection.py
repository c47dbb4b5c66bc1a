"""The connection engine in-process, on real loopback sockets: a Connection per accepted
socket on a real EventSet under uvloop (in a thread), real upstream servers and a real
dnspython-served resolver. Named for what each proves; every wait has a deadline."""

from __future__ import annotations

import asyncio
import hashlib
import os
import random
import socket
import threading
import time

import pytest
import uvloop

from sniproxy.allow import Allowlist, ClientLimits
from sniproxy.config import ResolverConfig
from sniproxy.dns.resolver import Resolver
from sniproxy.engine import splice
from sniproxy.engine.connection import _NEXT, Connection, State, clock
from sniproxy.engine.context import Context, ListenerInfo
from sniproxy.engine.events import EventSet
from sniproxy.engine.handshakes import Handshakes
from sniproxy.engine.listener import Listener
from sniproxy.observe.stats import Stats
from sniproxy.routes import Route, RouteTable
from tests.helpers import LINGER_RST, DnsServer, Server, flood_then_reset, read_hello, recv_all, recv_exactly, stall_after_hello
from tests.integration.conftest import make_hello

NAME = "echo.example.com"


def echo(conn: socket.socket) -> None:
    while data := conn.recv(65536):
        conn.sendall(data)
    conn.shutdown(socket.SHUT_WR)


class Engine:
    """A listener, an event set and the connections, on a uvloop loop in its own thread."""

    def __init__(self, dns: DnsServer, splice_after: float = splice.NEVER, connect_timeout: float = 5.0,
                 upstream_port: int = 443):
        self.loop = uvloop.new_event_loop()
        self.closed: list[Connection] = []
        self.live: set[Connection] = set()
        self.changed = threading.Condition()
        self.ready = threading.Event()
        self.dns = dns
        self.splice_after = splice_after
        self.connect_timeout = connect_timeout
        self.upstream_port = upstream_port
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.events = EventSet(self.loop)
        self.stats = Stats()
        self.handshakes = Handshakes(max_per_client=128, max_memory=32 << 20)
        resolver = Resolver(ResolverConfig((self.dns.host,), port=self.dns.port, timeout=1.0), self.stats)
        self.ctx = Context(
            events=self.events, routes=RouteTable([Route("echo", (NAME,), None, self.upstream_port)]),
            resolver=resolver, limits=ClientLimits(None), handshakes=self.handshakes, stats=self.stats, access_log=None,
            handshake_timeout=5.0, connect_timeout=self.connect_timeout, idle_timeout=60.0,
            splice_after=self.splice_after, refuse_alert=True, is_loop=lambda ip, port: False,
            spawn=self.loop.create_task,
        )
        self.info = ListenerInfo("test", Allowlist(()), False, Allowlist(()))
        sock = socket.create_server(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.listener = Listener(sock, "test", self.events, self._accepted, self.stats.accept_error)
        self.ready.set()
        self.loop.run_forever()

    def _accepted(self, fd: int, peer: tuple) -> None:
        conn = Connection(self.ctx, self.info, fd, peer, self._closed)
        self.live.add(conn)
        conn.start()

    def _closed(self, conn: Connection) -> None:
        self.live.discard(conn)
        with self.changed:
            self.closed.append(conn)
            self.changed.notify_all()

    def call(self, fn, timeout: float = 10.0):
        """Run ``fn()`` on the engine's loop and return its result."""
        done = threading.Event()
        box: list = []

        def run():
            try:
                box.append(fn())
            finally:
                done.set()

        self.loop.call_soon_threadsafe(run)
        assert done.wait(timeout)
        return box[0] if box else None

    def wait_closed(self, n: int, timeout: float = 10.0) -> list[Connection]:
        deadline = time.monotonic() + timeout
        with self.changed:
            while len(self.closed) < n:
                left = deadline - time.monotonic()
                assert left > 0, f"{len(self.closed)} of {n} connections closed in time"
                self.changed.wait(left)
            return list(self.closed)

    def wait(self, predicate, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while not self.call(predicate):
            assert time.monotonic() < deadline, "condition not met in time"
            time.sleep(0.01)

    def connect(self) -> socket.socket:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def stop(self) -> None:
        def shutdown():
            for conn in list(self.live):
                conn.force_close()
            self.listener.close()
            self.loop.stop()

        self.loop.call_soon_threadsafe(shutdown)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def dns():
    server = DnsServer("127.0.0.1")
    yield server
    server.close()


@pytest.fixture
def upstream(dns):
    server = Server(echo, host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def engine(dns, upstream):
    e = Engine(dns, upstream_port=upstream.port)
    yield e
    e.stop()


# -- states ------------------------------------------------------------------------------------


def test_every_state_can_close_and_closed_is_final():
    assert all(State.CLOSED in _NEXT[s] for s in State if s is not State.CLOSED)
    assert _NEXT[State.CLOSED] == frozenset()
    assert _NEXT[State.FORWARDING] == {State.CLOSED}


def test_a_transition_outside_the_table_is_an_error(engine):
    s = engine.connect()
    s.sendall(make_hello(NAME))
    s.shutdown(socket.SHUT_WR)
    recv_all(s)
    conn = engine.wait_closed(1)[0]
    with pytest.raises(RuntimeError, match="closed -> forwarding"):
        conn._enter(State.FORWARDING)


# -- hello -------------------------------------------------------------------------------------


def test_a_hello_in_many_pieces_is_reassembled_and_forwarded_as_received(engine):
    hello = make_hello(NAME)
    s = engine.connect()
    for i in range(0, len(hello), 7):
        s.sendall(hello[i : i + 7])
        time.sleep(0.002)  # separate segments
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello
    conn = engine.wait_closed(1)[0]
    assert conn.close_reason == "done"
    assert conn.hello_bytes == len(hello) and conn.hello_records == 1
    assert conn.hello.sni == NAME


def test_a_hello_fed_byte_by_byte_wakes_the_proxy_once_per_piece_it_needs(engine):
    """Each segment used to cost a wake-up, a read and a parse step, so a hello fed one byte
    per segment was refused at MAX_HELLO_READS and cost some 80 normal hellos' CPU. With
    SO_RCVLOWAT at what the reader needs next, the kernel wakes the proxy for the record's
    header and then for its body; what follows the hello is forwarded as it comes."""
    hello = make_hello(NAME)
    s = engine.connect()
    engine.wait(lambda: len(engine.live) == 1)
    conn = next(iter(engine.call(lambda: list(engine.live))))
    for i in range(len(hello)):
        s.sendall(hello[i : i + 1])
        if i < 5 or i % 64 == 0:
            time.sleep(0.001)  # apart, as separate segments
    assert recv_exactly(s, len(hello)) == hello
    assert conn.hello_reads <= 3  # the first byte, the rest of the header, the record
    s.sendall(b"x")  # one byte after the hello is not held back for more
    assert recv_exactly(s, 1) == b"x"
    s.close()
    assert engine.wait_closed(1)[0].close_reason == "done"


def test_a_single_record_hello_in_one_read_takes_the_fast_path(engine, monkeypatch):
    """Also when the client's next bytes came in the same read: they are forwarded after it."""
    from sniproxy.engine import connection

    taken = []
    real = connection.parse_single_record
    monkeypatch.setattr(connection, "parse_single_record", lambda data: taken.append(real(data)) or taken[-1])
    s = engine.connect()
    hello = make_hello(NAME)
    after = b"GET /v2/ HTTP/1.1\r\n"
    s.sendall(hello + after)  # one write, one read
    assert recv_exactly(s, len(hello) + len(after)) == hello + after
    s.close()
    conn = engine.wait_closed(1)[0]
    assert (conn.hello_reads, conn.hello_records, conn.hello_bytes) == (1, 1, len(hello))
    assert len(taken) == 1 and taken[0] is not None and taken[0].sni == NAME


def test_a_hello_fed_one_read_at_a_time_is_refused_after_max_hello_reads(engine, monkeypatch):
    """Each read costs a dispatch and a parse step: a client that feeds its hello a record at
    a time, each as the proxy has asked for, is refused at the read past the bound, counted
    by bound."""
    from sniproxy.engine import connection

    monkeypatch.setattr(connection, "MAX_HELLO_READS", 5)
    message = make_hello(NAME)[5:]
    pieces = [b"\x16\x03\x01\x00\x01" + message[i : i + 1] for i in range(6)]  # 1-byte records
    s = engine.connect()
    engine.wait(lambda: len(engine.live) == 1)
    conn = next(iter(engine.call(lambda: list(engine.live))))
    for i in range(5):
        s.sendall(pieces[i])
        engine.wait(lambda i=i: conn.hello_reads == i + 1)  # read before the next record: one read each
    assert conn.waiting and engine.handshakes.held == 30
    s.sendall(pieces[5])
    assert engine.wait_closed(1)[0] is conn
    assert conn.close_reason == "bad_hello" and engine.stats.hello_limits == {"reads": 1}
    assert engine.call(lambda: (len(engine.handshakes), engine.handshakes.held)) == (0, 0)


# -- upstream ----------------------------------------------------------------------------------


def test_a_refused_address_fails_over_to_the_next(dns, upstream):
    dns.records.clear()
    dns.add(NAME, "127.0.0.4")  # nothing listens on 127.0.0.4:<port>
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=upstream.port)
    try:
        s = engine.connect()
        hello = make_hello(NAME)
        s.sendall(hello)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == hello
        conn = engine.wait_closed(1)[0]
        assert (conn.upstream_ip, conn.upstream_port) == ("127.0.0.2", upstream.port)
        assert engine.stats.routes["echo"].connect.counts[-1] == 0  # one connect observed, in a finite bucket
    finally:
        engine.stop()


def test_a_connect_that_times_out_fails_over_at_the_sweep(dns, upstream):
    """127.0.0.5's accept queue is full, so its SYNs are dropped and the connect hangs until
    the sweep finds its deadline passed; then the next address serves."""
    full = socket.socket()
    full.bind(("127.0.0.5", upstream.port))
    full.listen(0)
    fillers = []
    for _ in range(3):  # listen(0) queues one; the rest time out on the client side
        f = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        f.connect_ex(("127.0.0.5", upstream.port))
        fillers.append(f)
    time.sleep(0.1)
    dns.records.clear()
    dns.add(NAME, "127.0.0.5")
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=upstream.port, connect_timeout=1.0)
    try:
        s = engine.connect()
        hello = make_hello(NAME)
        s.sendall(hello)
        engine.wait(lambda: any(c.state is State.CONNECTING for c in engine.live))
        assert not engine.closed
        engine.call(lambda: [c.expire(clock() + 2.0) for c in list(engine.live)])  # the sweep, 2 s on
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == hello
        conn = engine.wait_closed(1)[0]
        assert (conn.upstream_ip, conn.upstream_port) == ("127.0.0.2", upstream.port)
        assert conn.close_reason == "done"
    finally:
        engine.stop()
        for f in fillers:
            f.close()
        full.close()


def test_every_address_refused_is_connect_failed(dns):
    dns.add(NAME, "127.0.0.4")
    engine = Engine(dns, upstream_port=1)
    try:
        s = engine.connect()
        s.sendall(make_hello(NAME))
        assert recv_all(s) == b""
        conn = engine.wait_closed(1)[0]
        assert conn.close_reason == "connect_failed"
        assert engine.stats.rejected == {"connect_failed": 1}
    finally:
        engine.stop()


# -- resets while paused ------------------------------------------------------------------------


def test_a_client_reset_while_its_direction_is_paused_closes_both_at_once(dns):
    """The upstream stops reading, so the proxy stops reading the client: the client's RST
    must still be seen at once (not at idle_timeout), and reach the upstream as a reset."""
    release, seen = threading.Event(), []
    up = Server(stall_after_hello(release, seen), host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=up.port)
    try:
        s = engine.connect()
        s.sendall(make_hello(NAME))
        s.setblocking(False)
        engine.wait(lambda: any(c.state is State.FORWARDING for c in engine.live))
        deadline = time.monotonic() + 10
        while not engine.call(lambda: any(c.up is not None and not c.up.writable for c in engine.live)):
            try:
                s.send(b"x" * 65536)
            except BlockingIOError:
                time.sleep(0.01)
            assert time.monotonic() < deadline, "the upstream never pushed back"
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
        started = time.monotonic()
        s.close()
        conn = engine.wait_closed(1, timeout=2.0)[0]
        assert time.monotonic() - started < 1.0
        assert conn.close_reason == "client_reset"
        release.set()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
        assert seen == ["reset"]
    finally:
        release.set()
        engine.stop()
        up.close()


def test_an_upstream_reset_while_its_direction_is_paused_closes_both_at_once(dns):
    """The client stops reading, so the proxy stops reading the upstream: its RST must be
    seen at once and reach the client as a reset."""
    reset_now = threading.Event()
    up = Server(flood_then_reset(reset_now), host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=up.port)
    try:
        s = engine.connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(make_hello(NAME))
        engine.wait(lambda: any(c.down is not None and not c.down.writable for c in engine.live))
        started = time.monotonic()
        reset_now.set()
        conn = engine.wait_closed(1, timeout=2.0)[0]
        assert time.monotonic() - started < 1.0
        assert conn.close_reason == "upstream_reset"
        with pytest.raises(ConnectionResetError):
            while s.recv(1 << 20):
                pass
    finally:
        reset_now.set()
        engine.stop()
        up.close()


# -- half-close and backpressure ----------------------------------------------------------------


def test_client_fin_first_the_upstream_still_answers(dns):
    def answer_after_eof(conn):
        data = recv_all(conn)
        conn.sendall(b"got %d; " % len(data) + b"z" * 300_000)

    up = Server(answer_after_eof, host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=up.port)
    try:
        s = engine.connect()
        hello = make_hello(NAME)
        s.sendall(hello + b"request")
        s.shutdown(socket.SHUT_WR)
        reply = recv_all(s)
        assert reply == b"got %d; " % (len(hello) + 7) + b"z" * 300_000
        assert engine.wait_closed(1)[0].close_reason == "done"
    finally:
        engine.stop()
        up.close()


def test_upstream_fin_first_the_client_still_sends(dns):
    got = []

    def fin_first(conn):
        read_hello(conn)
        conn.sendall(b"banner")
        conn.shutdown(socket.SHUT_WR)
        got.append(recv_all(conn))

    up = Server(fin_first, host="127.0.0.2")
    dns.add(NAME, "127.0.0.2")
    engine = Engine(dns, upstream_port=up.port)
    try:
        s = engine.connect()
        s.sendall(make_hello(NAME))
        assert recv_all(s) == b"banner"  # the upstream's FIN arrived
        s.sendall(b"after your FIN" * 1000)
        s.shutdown(socket.SHUT_WR)
        assert engine.wait_closed(1)[0].close_reason == "done"
        deadline = time.monotonic() + 5
        while not got and time.monotonic() < deadline:
            time.sleep(0.01)
        assert got == [b"after your FIN" * 1000]
    finally:
        engine.stop()
        up.close()


@pytest.mark.parametrize("splice_after", [splice.NEVER, 0, 64 * 1024])
def test_slow_readers_on_both_sides_get_every_byte(dns, upstream, splice_after):
    if splice_after != splice.NEVER and splice.probe() is not None:
        pytest.skip("no splice(2)")
    engine = Engine(dns, splice_after=splice_after, upstream_port=upstream.port)
    try:
        s = engine.connect()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32768)
        data = make_hello(NAME) + os.urandom(2 << 20)

        def send():
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=send)
        t.start()
        received = hashlib.sha256()
        n = 0
        while chunk := s.recv(16384):  # a slow reader: small bites, a small window
            received.update(chunk)
            n += len(chunk)
        t.join(10)
        assert n == len(data) and received.digest() == hashlib.sha256(data).digest()
        conn = engine.wait_closed(1)[0]
        assert conn.close_reason == "done" and conn.to_upstream == conn.to_client == len(data)
    finally:
        engine.stop()


# -- soak ----------------------------------------------------------------------------------------


def test_randomized_soak_every_byte_checked(dns, upstream):
    """Many connections at once, random sizes, random half-close orders and resets, on every
    data path: each completed stream is sha256-checked, and a lost wake-up is a deadline
    failure, not a hang."""
    rng = random.Random(1234)
    engines = [Engine(dns, splice_after=after, upstream_port=upstream.port)
               for after in (splice.NEVER, 0, 32 * 1024)]
    results: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()

    def one(engine: Engine, size: int, kind: str) -> None:
        try:
            s = engine.connect()
            s.settimeout(20)
            data = make_hello(NAME) + os.urandom(size)
            if kind == "reset":
                s.sendall(data[: len(data) // 2])
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
                s.close()
                with lock:
                    results.append("reset")
                return
            digest = hashlib.sha256()
            n = 0

            def send():
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)

            t = threading.Thread(target=send)
            t.start()
            while chunk := s.recv(1 << 16):
                digest.update(chunk)
                n += len(chunk)
            t.join(20)
            s.close()
            ok = n == len(data) and digest.digest() == hashlib.sha256(data).digest()
            with lock:
                (results if ok else failures).append(f"{kind} {size} {n}")
        except Exception as exc:  # noqa: BLE001 - every failure is reported, none hangs
            with lock:
                failures.append(f"{kind} {size}: {exc!r}")

    jobs = []
    for i in range(450):
        size = rng.choice([0, 1, 100, 5000, 70_000, 300_000, 1 << 20])
        kind = "reset" if rng.random() < 0.1 else "echo"
        jobs.append(threading.Thread(target=one, args=(engines[i % 3], size, kind)))
    try:
        started = time.monotonic()
        for batch in range(0, len(jobs), 30):
            for t in jobs[batch : batch + 30]:
                t.start()
            for t in jobs[batch : batch + 30]:
                t.join(60)
                assert not t.is_alive(), "a connection hung"
        assert not failures, failures[:5]
        assert len(results) == len(jobs)
        for e in engines:
            e.wait(lambda e=e: not e.live, timeout=10)
        assert time.monotonic() - started < 90
        reasons = [c.close_reason for e in engines for c in e.closed]
        assert set(reasons) <= {"done", "client_reset", "client_closed"}, set(reasons)
    finally:
        for e in engines:
            e.stop()


def test_a_bug_costs_one_connection_and_the_batch_goes_on(engine, monkeypatch):
    """An exception in one connection's handling (here: forwarding for a marked client) closes
    that connection as internal_error; the event set keeps dispatching the others."""
    from sniproxy.engine import forward

    real_run = forward.Flow.run
    doomed: set[int] = set()

    def run(self, scratch):
        if self.src in doomed or self.dst in doomed:
            raise RuntimeError("injected bug")
        return real_run(self, scratch)

    monkeypatch.setattr(forward.Flow, "run", run)
    bad = engine.connect()
    hello = make_hello(NAME)
    bad.sendall(hello)
    engine.wait(lambda: any(c.state is State.FORWARDING for c in engine.live))
    engine.call(lambda: doomed.update(c.client_fd for c in engine.live))
    bad.sendall(b"trigger")
    closed = engine.wait_closed(1)[0]
    assert closed.close_reason == "internal_error"
    doomed.clear()  # its descriptor numbers may be reused now
    good = engine.connect()
    good.sendall(hello)
    good.shutdown(socket.SHUT_WR)
    assert recv_all(good) == hello
    assert engine.wait_closed(2)[1].close_reason == "done"


# -- timing --------------------------------------------------------------------------------------


def connect_bucket(engine: Engine) -> tuple[list[int], float]:
    h = engine.stats.routes["echo"].connect
    return list(h.counts), h.total


def test_connect_times_have_sub_millisecond_resolution(engine):
    """The event loop's clock moves in 1 ms steps: a loopback connect (~0.1 ms) measured with
    it is 0.0, and any sum of such times a whole number of milliseconds. Measured with a
    high-resolution clock, the sum is above zero and not a multiple of 1 ms."""
    for _ in range(5):
        s = engine.connect()
        hello = make_hello(NAME)
        s.sendall(hello)
        s.shutdown(socket.SHUT_WR)
        assert recv_all(s) == hello
    engine.wait_closed(5)
    counts, total = engine.call(lambda: connect_bucket(engine))
    assert sum(counts) == 5
    assert total > 0 and abs(total * 1000 - round(total * 1000)) > 1e-6, total
    # each hello came whole with the first read: it arrived with the connection, 0 s
    assert all(c.hello_seconds == 0 for c in engine.closed)


def test_a_hello_in_two_reads_is_timed_from_accept(engine):
    """A hello that needed a second read is timed from accept to its last byte: the
    diagnostic for hellos split across segments (large post-quantum ones, a small MTU)."""
    s = engine.connect()
    hello = make_hello(NAME)
    s.sendall(hello[:100])
    engine.wait(lambda: any(c.hello_reads == 1 for c in engine.live))
    s.sendall(hello[100:])
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello
    conn = engine.wait_closed(1)[0]
    assert conn.hello_reads == 2 and conn.hello_seconds > 0


def test_a_connect_of_known_delay_lands_in_its_bucket(dns):
    """A SYN dropped by a full accept queue is sent again after TCP's initial retransmission
    timeout, 1 s: that connect takes just over 1 s, so it lands in the (1.0, 2.5] bucket."""
    from sniproxy.observe.stats import CONNECT_BUCKETS

    full = socket.socket()
    full.bind(("127.0.0.6", 0))
    full.listen(0)
    port = full.getsockname()[1]
    filler = socket.create_connection(("127.0.0.6", port), timeout=5)  # fills the queue of one
    dns.add(NAME, "127.0.0.6")
    engine = Engine(dns, upstream_port=port)
    served = threading.Event()

    def serve_later():
        time.sleep(0.3)
        full.accept()[0].close()  # room again, before the SYN is sent again at 1 s
        conn, _ = full.accept()
        read_hello(conn)
        conn.sendall(b"ok")
        conn.close()
        served.set()

    t = threading.Thread(target=serve_later, daemon=True)
    try:
        s = engine.connect()
        t.start()
        s.sendall(make_hello(NAME))
        assert recv_all(s) == b"ok"
        s.close()
        assert served.wait(10)
        engine.wait_closed(1)
        counts, total = engine.call(lambda: connect_bucket(engine))
        bucket = CONNECT_BUCKETS.index(2.5)
        assert counts[bucket] == 1 and sum(counts) == 1, counts
        assert 1.0 < total < 1.5
    finally:
        engine.stop()
        filler.close()
        full.close()
