"""The splice(2) path on real pipes and loopback sockets: the pipe pool, and the Splice pump
itself between two socket pairs (the integration suite runs the whole proxy on it too)."""

from __future__ import annotations

import array
import asyncio
import fcntl
import json
import os
import resource
import shutil
import socket
import struct
import subprocess
import sys
import termios
import threading

import pytest
import uvloop

from sniproxy import splice
from sniproxy.connection import Connection
from sniproxy.errors import ConfigError
from sniproxy.pump import Side
from sniproxy.splice import FALLBACK_PIPE_SIZE, PipePool, Splice
from tests.helpers import clean_env
from tests.test_tls import padding_ext, sni_ext, tls

pytestmark = pytest.mark.skipif(splice.probe() is not None, reason=f"no splice(2): {splice.probe()}")


def unread(fd: int) -> int:
    """Bytes waiting in a pipe or socket (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the pool ------------------------------------------------------------------------------------


def test_pipes_get_the_size_asked_for():
    pool = PipePool(size=256 * 1024)
    pipe = pool.acquire()
    try:
        assert pipe.size == 256 * 1024 == fcntl.fcntl(pipe.w, fcntl.F_GETPIPE_SZ)
        assert os.get_blocking(pipe.r) is False and os.get_blocking(pipe.w) is False
        assert os.get_inheritable(pipe.r) is False and os.get_inheritable(pipe.w) is False
    finally:
        pipe.close()


_FALLBACK_CHILD = """
import fcntl, json, os
from sniproxy.splice import PipePool
big = int(open("/proc/sys/fs/pipe-max-size").read()) * 2
r, w = os.pipe()
try:
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, big)
    refused = False
except PermissionError:
    refused = True
default = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
fallback = PipePool(size=big, fallback=128 * 1024).acquire()
neither = PipePool(size=big, fallback=big).acquire()
print(json.dumps({
    "refused": refused,
    "default": default,
    "fallback": [fallback.size, fcntl.fcntl(fallback.w, fcntl.F_GETPIPE_SZ)],
    "neither": [neither.size, fcntl.fcntl(neither.w, fcntl.F_GETPIPE_SZ)],
}))
"""


def test_a_refused_size_falls_back_then_keeps_the_default():
    """Past /proc/sys/fs/pipe-max-size an unprivileged process gets EPERM. The child runs
    without CAP_SYS_RESOURCE (setpriv), so the refusal is real even when tests run as root.
    (The fallback is 128 KiB here, so it cannot pass for the 64 KiB default.)"""
    assert FALLBACK_PIPE_SIZE == 64 * 1024
    cmd = [sys.executable, "-c", _FALLBACK_CHILD]
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=clean_env())
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["refused"], "the child could grow a pipe past pipe-max-size: the fallback was not exercised"
    assert got["fallback"] == [128 * 1024, 128 * 1024]
    assert got["neither"] == [got["default"], got["default"]]


def test_only_empty_pipes_come_back_from_the_pool():
    pool = PipePool(size=64 * 1024)
    full = pool.acquire()
    os.write(full.w, b"left over")
    pool.release(full, pending=9)
    assert not is_open(full.r) and not is_open(full.w)  # closed, not pooled
    assert pool.idle == []
    empty = pool.acquire()
    pool.release(empty, pending=0)
    again = pool.acquire()
    assert again is empty and unread(again.r) == 0
    pool.release(again, pending=0)
    pool.close()
    assert not is_open(again.r)


def test_the_pool_keeps_at_most_its_limit():
    pool = PipePool(size=64 * 1024, limit=2)
    pipes = [pool.acquire() for _ in range(4)]
    for pipe in pipes:
        pool.release(pipe, pending=0)
    assert pool.idle == pipes[:2]
    assert [is_open(p.r) for p in pipes] == [True, True, False, False]
    pool.close()
    assert pool.idle == [] and not any(is_open(p.r) for p in pipes)


def test_eagain_from_socket_to_pipe_is_ambiguous_unless_the_pipe_is_empty():
    """Why a direction only reads while its pipe is empty: into a full pipe, a socket with
    data waiting gives the same EAGAIN as an empty socket into an empty pipe."""
    a, b = socket.socketpair()
    pool = PipePool(size=64 * 1024)
    pipe = pool.acquire()
    b.setblocking(False)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        with pytest.raises(BlockingIOError):  # empty pipe: EAGAIN means "no data"
            os.splice(b.fileno(), pipe.w, pipe.size, flags=flags)
        os.write(pipe.w, bytes(pipe.size))
        a.send(b"data")
        with pytest.raises(BlockingIOError):  # full pipe, data waiting: the same EAGAIN
            os.splice(b.fileno(), pipe.w, pipe.size, flags=flags)
        assert unread(b.fileno()) == 4
    finally:
        pipe.close()
        a.close()
        b.close()


# -- availability --------------------------------------------------------------------------------


def test_modes():
    assert splice.splice_enabled("off") is False
    assert splice.splice_enabled("on") is True
    assert splice.splice_enabled("auto") is True


def test_on_without_os_splice_is_a_clear_config_error(monkeypatch):
    monkeypatch.setattr(splice, "_splice", None)
    splice.probe.cache_clear()
    try:
        expected = r'^config error: server\.splice: is "on" but this Python has no os\.splice'
        with pytest.raises(ConfigError, match=expected):
            splice.splice_enabled("on")
        assert splice.splice_enabled("auto") is False
        assert splice.splice_enabled("off") is False
    finally:
        splice.probe.cache_clear()


# -- the pump ------------------------------------------------------------------------------------


class Conn:
    """Stands in for a Connection around one Splice: the real ``side_lost`` (so the close
    reasons are Connection's own), with ``finish`` counted."""

    side_lost = Connection.side_lost

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.server = type("S", (), {"loop": loop})()
        self.close_reason: str | None = None
        self.state = "pumping"
        self.finishes = 0
        self.finished = asyncio.Event()

    def finish(self) -> None:
        self.finishes += 1
        self.finished.set()


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection; ``rcvbuf`` shrinks the second end's buffer."""
    with socket.socket() as listener:
        if rcvbuf is not None:
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        a = socket.create_connection(listener.getsockname())
        b, _ = listener.accept()
    return a, b


class Rig:
    """client app <-> [proxy fd | Splice | proxy fd] <-> upstream app, all on loopback."""

    def __init__(self, loop: asyncio.AbstractEventLoop, upstream_rcvbuf: int | None = None,
                 proxy_sndbuf: int | None = None):
        self.app_client, proxy_c = tcp_pair()
        proxy_u, self.app_upstream = tcp_pair(upstream_rcvbuf)
        if proxy_sndbuf is not None:
            proxy_u.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, proxy_sndbuf)
        for s in (proxy_c, proxy_u):
            s.setblocking(False)
        for s in (self.app_client, self.app_upstream):
            s.settimeout(10)  # a broken pump fails the test, never hangs it
        self.conn = Conn(loop)
        self.client = Side(self.conn, "client")
        self.upstream = Side(self.conn, "upstream")
        self.client.peer, self.upstream.peer = self.upstream, self.client
        self.cfd, self.ufd = proxy_c.detach(), proxy_u.detach()
        self.pair = Splice(self.conn, self.client, self.upstream, self.cfd, self.ufd)

    def close(self) -> None:
        self.app_client.close()
        self.app_upstream.close()


def run(coro):
    return uvloop.run(asyncio.wait_for(coro, 20))


async def until(predicate, what: str = "") -> None:
    """Let the loop run until a condition on the pump's own state holds (bounded)."""
    for _ in range(2000):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError(f"condition not met: {what}")


def recv_until_eof(sock: socket.socket) -> bytes:
    out = bytearray()
    while chunk := sock.recv(1 << 20):
        out += chunk
    return bytes(out)


def test_hello_goes_first_even_when_its_write_is_partial():
    """A 60 KB hello into a small send buffer and an upstream that is not reading: the rest
    waits for writability, and the client is not read until the hello is all out."""
    hello = tls(sni_ext("api.ecr.us-east-1.amazonaws.com"), padding_ext(60000))

    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop, upstream_rcvbuf=4096, proxy_sndbuf=4096)
        rig.client.nbytes = len(hello)
        rig.pair.begin(hello)
        assert rig.pair.up.head and rig.pair.up.writing and not rig.pair.up.reading
        rig.app_client.sendall(b"after the hello")
        rig.app_client.shutdown(socket.SHUT_WR)
        got = await loop.run_in_executor(None, recv_until_eof, rig.app_upstream)
        assert got == hello + b"after the hello"
        assert rig.client.nbytes == len(got)
        rig.app_upstream.shutdown(socket.SHUT_WR)
        await rig.conn.finished.wait()
        assert rig.conn.close_reason == "done" and rig.conn.finishes == 1
        rig.close()

    run(main())


def test_backpressure_then_every_byte_in_order_and_counted():
    """An upstream that does not read stops the pump reading the client (no unbounded
    buffering); once it reads, 32 MiB arrive exact, each way, and are counted."""
    size = 32 << 20
    block = os.urandom(1 << 20)
    data = b"".join(block[i:] + block[:i] for i in range(size >> 20))

    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        rig.pair.begin(b"hello")
        rig.client.nbytes = 5
        def send() -> None:
            rig.app_client.sendall(data)
            rig.app_client.shutdown(socket.SHUT_WR)

        sender = threading.Thread(target=send)
        sender.start()
        up = rig.pair.up
        await until(lambda: up.writing and not up.reading, "the client is no longer read")
        stalled = rig.client.nbytes
        assert stalled < size
        for _ in range(10):  # the loop keeps turning; the client stays unread
            await asyncio.sleep(0)
        assert rig.client.nbytes == stalled and up.pending > 0

        def echo_back() -> bytes:
            got = recv_until_eof(rig.app_upstream)
            rig.app_upstream.sendall(got)
            rig.app_upstream.shutdown(socket.SHUT_WR)
            return got

        reader = loop.run_in_executor(None, echo_back)
        back = await loop.run_in_executor(None, recv_until_eof, rig.app_client)
        assert await reader == b"hello" + data
        assert back == b"hello" + data
        await rig.conn.finished.wait()
        sender.join(10)
        assert rig.client.nbytes == rig.upstream.nbytes == size + 5
        assert rig.conn.close_reason == "done"
        rig.close()

    run(main())


def test_half_close_keeps_the_other_direction_flowing():
    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        rig.pair.begin(b"request")
        rig.app_client.shutdown(socket.SHUT_WR)
        assert await loop.run_in_executor(None, recv_until_eof, rig.app_upstream) == b"request"
        assert rig.pair.up.done and not rig.pair.down.done and rig.conn.finishes == 0
        rig.app_upstream.sendall(b"x" * 300000)
        rig.app_upstream.shutdown(socket.SHUT_WR)
        assert await loop.run_in_executor(None, recv_until_eof, rig.app_client) == b"x" * 300000
        await rig.conn.finished.wait()
        assert rig.conn.close_reason == "done" and rig.conn.finishes == 1
        rig.close()

    run(main())


@pytest.mark.parametrize("who", ["client", "upstream"])
def test_a_reset_reaches_the_other_side_as_a_reset(who):
    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        rig.pair.begin(b"hello")
        assert await loop.run_in_executor(None, rig.app_upstream.recv, 5) == b"hello"
        resetting, other = rig.app_client, rig.app_upstream
        if who == "upstream":
            resetting, other = other, resetting
        resetting.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        resetting.close()
        await rig.conn.finished.wait()
        assert rig.conn.close_reason == f"{who}_reset" and rig.conn.finishes == 1
        with pytest.raises(ConnectionResetError):
            other.recv(10)
        rig.close()

    run(main())


def test_abort_closes_both_sockets_at_once_and_ends_the_connection():
    """What the idle sweeper and the drain call, through each Side's transport."""

    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        rig.pair.begin(b"hello")
        assert rig.client.transport is rig.pair and rig.upstream.transport is rig.pair
        rig.conn.close_reason = "idle"  # as Connection.abort sets it
        rig.client.transport.abort()
        assert rig.conn.finishes == 1 and rig.client.lost and rig.upstream.lost
        rig.upstream.transport.abort()  # a second abort is a no-op
        assert rig.conn.finishes == 1 and rig.conn.close_reason == "idle"
        assert not is_open(rig.cfd) and not is_open(rig.ufd)
        assert await loop.run_in_executor(None, recv_until_eof, rig.app_upstream) == b"hello"
        assert await loop.run_in_executor(None, recv_until_eof, rig.app_client) == b""
        rig.close()

    run(main())


def test_no_descriptor_outlives_its_connection():
    """Every fd a Splice owns is closed once, and every pipe goes back to the pool empty."""

    async def main():
        loop = asyncio.get_running_loop()
        Rig(loop).close()  # warm up: the executor threads, lazy imports
        before = open_fds()
        for i in range(30):
            rig = Rig(loop)
            rig.pair.begin(b"hello")
            rig.app_client.sendall(b"y" * 10000)
            await loop.run_in_executor(None, rig.app_upstream.recv, 1)
            if i % 2:
                rig.app_client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                rig.app_client.close()
            else:
                rig.app_client.shutdown(socket.SHUT_WR)
                rig.app_upstream.shutdown(socket.SHUT_WR)
            await rig.conn.finished.wait()
            rig.close()
        assert all(unread(p.r) == 0 for p in splice._pool.idle)
        assert len(splice._pool.idle) <= splice._pool.limit
        assert open_fds() <= before + 2 * len(splice._pool.idle)

    run(main())


# -- the takeover from uvloop --------------------------------------------------------------------


async def uvloop_pair(loop: asyncio.AbstractEventLoop, upstream: Side):
    """A paused accepted transport (as HelloProtocol leaves it) and a connected one with
    ``upstream`` as its protocol, plus the app socket at the far end of each."""
    accepted: asyncio.Future = loop.create_future()

    class Paused(asyncio.Protocol):
        def connection_made(self, transport):
            transport.pause_reading()
            accepted.set_result(transport)

    server = await loop.create_server(Paused, "127.0.0.1", 0)
    app_client = socket.create_connection(server.sockets[0].getsockname())
    ct = await accepted
    server.close()
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(1)
        await loop.create_connection(lambda: upstream, *listener.getsockname())
        app_upstream, _ = listener.accept()
    for s in (app_client, app_upstream):
        s.setblocking(False)
    return ct, app_client, app_upstream


def quiet(sock: socket.socket) -> bool:
    """Nothing arrived: no data, no FIN, no RST."""
    try:
        sock.recv(1, socket.MSG_PEEK)
    except BlockingIOError:
        return True
    return False


def test_takeover_sends_nothing_and_the_hello_arrives_first():
    """uvloop's abort closes only its own fd: neither peer sees a FIN or RST at takeover."""

    async def main():
        loop = asyncio.get_running_loop()
        conn = Conn(loop)
        client, upstream = Side(conn, "client"), Side(conn, "upstream")
        client.peer, upstream.peer = upstream, client
        ct, app_client, app_upstream = await uvloop_pair(loop, upstream)
        conn.client_transport = client.transport = ct
        app_client.send(b"early")  # sent before takeover, still in the kernel
        before = open_fds()
        assert splice.start(conn, client, upstream, b"hello|")
        assert isinstance(client.transport, Splice) and client.transport is upstream.transport
        for _ in range(5):  # let uvloop's connection_lost run and close its fds
            await asyncio.sleep(0)
        assert conn.finishes == 0 and open_fds() == before  # two fds closed, two dups open
        assert quiet(app_client)
        for s in (app_client, app_upstream):
            s.settimeout(10)
        assert await loop.run_in_executor(None, recv_n, app_upstream, 11) == b"hello|early"
        app_upstream.sendall(b"answer")
        assert await loop.run_in_executor(None, recv_n, app_client, 6) == b"answer"
        assert (client.nbytes, upstream.nbytes) == (5, 6)  # the hello was counted by the caller
        client.transport.abort()
        assert conn.finishes == 1 and open_fds() == before - 2
        app_client.close()
        app_upstream.close()

    run(main())


def recv_n(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            break
        out += chunk
    return bytes(out)


def test_an_upstream_that_closed_first_stays_with_the_pump():
    """Its FIN already went through uvloop (write_eof on the client transport): the pump,
    which owns that state, keeps the connection, and start() touches nothing."""

    async def main():
        loop = asyncio.get_running_loop()
        conn = Conn(loop)
        client, upstream = Side(conn, "client"), Side(conn, "upstream")
        client.peer, upstream.peer = upstream, client
        ct, app_client, app_upstream = await uvloop_pair(loop, upstream)
        conn.client_transport = client.transport = ct
        app_upstream.send(b"banner")
        app_upstream.shutdown(socket.SHUT_WR)
        await until(lambda: upstream.eof, "the upstream's FIN reached the pump")
        before = open_fds()
        assert splice.start(conn, client, upstream, b"hello") is False
        assert client.transport is ct and not ct.is_closing() and open_fds() == before
        app_client.settimeout(10)
        assert await loop.run_in_executor(None, recv_until_eof, app_client) == b"banner"
        ct.abort()
        upstream.transport.abort()
        app_client.close()
        app_upstream.close()

    run(main())


def test_out_of_descriptors_the_pump_waits_for_a_pipe_then_carries_on():
    """pipe2() failing with EMFILE stops reading that direction and retries; nothing is lost."""
    async def main():
        loop = asyncio.get_running_loop()
        rig = Rig(loop)
        rig.pair.begin(b"hello")
        assert await loop.run_in_executor(None, recv_n, rig.app_upstream, 5) == b"hello"
        splice._pool.close()  # the next chunk needs a new pipe
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        fillers = []
        try:
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, hard))
            while True:  # take every free descriptor number below the limit
                try:
                    fillers.append(os.open("/dev/null", os.O_RDONLY))
                except OSError:
                    break
            rig.app_client.sendall(b"while out of fds")
            await until(lambda: rig.pair.up.retry is not None, "a retry is scheduled")
            assert not rig.pair.up.reading and rig.client.nbytes == 0
        finally:
            for fd in fillers:
                os.close(fd)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert await loop.run_in_executor(None, recv_n, rig.app_upstream, 16) == b"while out of fds"
        assert rig.client.nbytes == 16
        rig.pair.abort()
        rig.close()

    run(main())
