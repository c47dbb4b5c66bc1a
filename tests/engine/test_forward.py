"""One direction of a pair (forward.Flow) on real loopback TCP sockets, with its readiness
flags set by hand as the event set would: copying, the hello first, backpressure, the move
to splice(2) on the same descriptors, half-close, resets, and the bounded rounds."""

from __future__ import annotations

import array
import errno
import fcntl
import hashlib
import os
import socket
import struct
import termios

import pytest

from sniproxy.engine import forward, splice
from sniproxy.engine.events import Scratch
from sniproxy.engine.forward import CHUNK, Flow, Mode, Result

NEVER = splice.NEVER
SCRATCH = Scratch()
needs_splice = pytest.mark.skipif(splice.probe() is not None, reason=f"no splice(2): {splice.probe()}")


def tcp_pair(rcvbuf: int | None = None) -> tuple[socket.socket, socket.socket]:
    """Two ends of a loopback TCP connection (the second non-blocking, as the engine's are);
    ``rcvbuf`` shrinks the first end's receive buffer, to make a slow reader."""
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.socket()
        if rcvbuf is not None:
            a.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        a.connect(server.getsockname())
        b, _ = server.accept()
    b.setblocking(False)
    a.settimeout(10)
    return a, b


def unread(fd: int) -> int:
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, f"EOF after {len(out)} of {n}"
        out += chunk
    return bytes(out)


class Pair:
    """client -> [proxy side A | Flow | proxy side B] -> upstream."""

    def __init__(self, rcvbuf: int | None = None):
        self.client, self.src = tcp_pair()
        self.upstream, self.dst = tcp_pair(rcvbuf)

    def flow(self, splice_after: float = NEVER, head: bytes = b"") -> Flow:
        return Flow(self.src.fileno(), self.dst.fileno(), splice_after, head=head)

    def close(self) -> None:
        for s in (self.client, self.src, self.upstream, self.dst):
            s.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def test_copies_counts_and_a_short_read_clears_readable(pair):
    flow = pair.flow()
    pair.client.sendall(b"hello world")
    assert flow.run(SCRATCH) is Result.WAIT
    assert recv_exactly(pair.upstream, 11) == b"hello world"
    assert flow.nbytes == 11 and flow.readable is False and flow.mode is Mode.COPY
    assert flow.run(SCRATCH) is Result.WAIT  # not readable: no read at all
    pair.client.sendall(b"more")
    flow.readable = True  # the next edge
    assert flow.run(SCRATCH) is Result.WAIT and recv_exactly(pair.upstream, 4) == b"more"


def test_the_head_goes_first_even_when_its_write_is_partial():
    p = Pair(rcvbuf=4096)
    try:
        head = os.urandom(3 << 20)  # far more than the upstream's buffers take at once
        flow = p.flow(head=head)
        p.client.sendall(b"after the head")
        assert flow.run(SCRATCH) is Result.WAIT
        assert flow.pending is not None and flow.writable is False
        assert unread(p.src.fileno()) == 14  # src is not read while the head is held
        got = bytearray()
        while len(got) < len(head) + 14:
            got += p.upstream.recv(1 << 20)
            flow.writable = True
            flow.run(SCRATCH)
        assert bytes(got) == head + b"after the head"
        assert flow.nbytes == len(head) + 14
    finally:
        p.close()


def test_backpressure_holds_at_most_one_read_and_stops_reading_src():
    p = Pair(rcvbuf=4096)
    try:
        flow = p.flow()
        data = os.urandom(8 << 20)
        sent = 0
        stalled = False
        for _ in range(400):
            try:
                sent += p.client.send(data[sent : sent + (1 << 20)])
            except BlockingIOError:
                pass
            flow.readable = True
            if flow.run(SCRATCH) is Result.WAIT and not flow.writable:
                stalled = True
                break
        assert stalled, "the upstream never pushed back"
        assert flow.pending is not None and len(flow.pending) <= CHUNK
        read_before = flow.nbytes
        flow.readable = True
        assert flow.run(SCRATCH) is Result.WAIT and flow.nbytes == read_before  # nothing read while held
        digest, got = hashlib.sha256(), 0
        p.client.setblocking(False)
        while got < flow.nbytes or flow.pending is not None:
            chunk = p.upstream.recv(1 << 20)
            digest.update(chunk)
            got += len(chunk)
            flow.writable = True
            flow.run(SCRATCH)
        assert got == flow.nbytes
    finally:
        p.close()


@needs_splice
def test_moves_to_splice_after_splice_at_bytes_on_the_same_descriptors(pair):
    flow = pair.flow(splice_after=100_000)
    first = os.urandom(50_000)
    pair.client.sendall(first)
    flow.run(SCRATCH)
    assert flow.mode is Mode.COPY and recv_exactly(pair.upstream, len(first)) == first
    data = os.urandom(1 << 20)
    pair.client.sendall(data)
    received = bytearray()
    while len(received) < len(data):
        flow.readable = flow.writable = True
        flow.run(SCRATCH)
        received += pair.upstream.recv(1 << 20)
    assert bytes(received) == data and flow.nbytes == len(first) + len(data)
    assert flow.mode is Mode.SPLICE
    flow.readable = True
    flow.run(SCRATCH)  # drained: EAGAIN
    assert flow.pipe is None, "an idle direction holds no pipe"


@needs_splice
def test_splice_on_sends_the_head_by_copy_then_splices(pair):
    flow = pair.flow(splice_after=0, head=b"HELLO")
    pair.client.sendall(b"body")
    flow.run(SCRATCH)
    assert recv_exactly(pair.upstream, 9) == b"HELLObody"
    assert flow.mode is Mode.SPLICE


def test_out_of_pipes_a_direction_copies_instead(pair, monkeypatch):
    def no_pipe():
        raise OSError(errno.EMFILE, "Too many open files")

    monkeypatch.setattr(splice.pool, "acquire", no_pipe)
    flow = pair.flow(splice_after=0)
    pair.client.sendall(b"z" * 5000)
    assert flow.run(SCRATCH) is Result.WAIT
    assert recv_exactly(pair.upstream, 5000) == b"z" * 5000
    assert flow.mode is Mode.SPLICE and flow.pipe is None  # wants splice, copied meanwhile


@pytest.mark.parametrize("splice_after", [NEVER, 0])
def test_a_fin_is_passed_on_once_and_later_events_read_nothing(pair, splice_after):
    if splice_after == 0 and splice.probe() is not None:
        pytest.skip("no splice(2)")
    flow = pair.flow(splice_after=splice_after)
    pair.client.sendall(b"last words")
    pair.client.shutdown(socket.SHUT_WR)
    flow.eof_pending = True  # the event carried EPOLLRDHUP
    assert flow.run(SCRATCH) is Result.EOF
    assert flow.done
    assert recv_exactly(pair.upstream, 10) == b"last words"
    assert pair.upstream.recv(10) == b""  # the FIN
    flow.readable = True  # EPOLLIN keeps coming for a socket at EOF
    assert flow.run(SCRATCH) is Result.WAIT


def test_without_the_rdhup_flag_a_fin_that_came_with_the_data_waits_for_an_edge(pair):
    """Why eof_pending exists: data and FIN arrive together, one short read takes the data,
    and edge-triggered epoll reports nothing more. Only the flag keeps reading to the EOF."""
    pair.client.sendall(b"data")
    pair.client.shutdown(socket.SHUT_WR)
    plain = pair.flow()
    assert plain.run(SCRATCH) is Result.WAIT and not plain.readable  # the FIN is left behind
    again = Flow(pair.src.fileno(), pair.dst.fileno(), NEVER, eof_pending=True)
    assert again.run(SCRATCH) is Result.EOF


def test_a_reset_from_src_is_src_failed(pair):
    flow = pair.flow()
    pair.client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.client.close()
    import time

    time.sleep(0.05)
    assert flow.run(SCRATCH) is Result.SRC_FAILED
    assert flow.error.errno == errno.ECONNRESET


def test_a_write_to_a_reset_dst_is_dst_failed(pair):
    flow = pair.flow()
    pair.upstream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    pair.upstream.close()
    import time

    time.sleep(0.05)
    pair.client.sendall(b"to nowhere")
    assert flow.run(SCRATCH) is Result.DST_FAILED
    assert flow.error.errno in (errno.ECONNRESET, errno.EPIPE)


def test_a_busy_direction_yields_after_rounds(pair):
    flow = pair.flow()
    pair.upstream.setblocking(False)
    total = 0
    pair.client.setblocking(False)
    # Keep src full: more than ROUNDS reads' worth waiting, while the upstream drains.
    data = b"r" * (4 << 20)
    try:
        pair.client.send(data)
    except BlockingIOError:
        pass
    result = None
    for _ in range(200):
        try:
            pair.client.send(data)
        except BlockingIOError:
            pass
        try:
            while True:
                total += len(pair.upstream.recv(1 << 22))
        except BlockingIOError:
            pass
        flow.readable = flow.writable = True
        result = flow.run(SCRATCH)
        if result is Result.MORE:
            break
    assert result is Result.MORE, "never more than ROUNDS reads in one run"
    assert flow.readable  # still ready: the owner posts it for after the batch


def test_release_returns_an_empty_pipe_and_closes_a_full_one(monkeypatch):
    if splice.probe() is not None:
        pytest.skip("no splice(2)")
    pool = splice.PipePool(size=64 * 1024)
    monkeypatch.setattr(forward, "pool", pool)
    flow = Flow(0, 1, 0)
    flow.pipe = pool.acquire()
    flow.release()
    assert len(pool.idle) == 1
    flow.pipe, flow.in_pipe = pool.acquire(), 5
    os.write(flow.pipe.w, b"12345")
    kept = flow.pipe
    flow.release()
    assert pool.idle == [] and flow.pipe is None
    with pytest.raises(OSError):
        os.fstat(kept.r)
    pool.close()


@needs_splice
def test_a_splice_that_runs_out_of_pipe_slots_does_not_take_the_socket_for_drained(pair, monkeypatch):
    """A pipe has one slot per page, and a TCP socket's small segments take one slot each: a
    splice into an empty pipe can move less than the pipe holds while the socket still has
    bytes. Taking that for "drained" waits for an edge that never comes once the sender is
    blocked on a full window: the direction stalls. Edge-triggered readiness must end only
    on EAGAIN here."""
    small = splice.PipePool(size=64 * 1024, fallback=64 * 1024)  # 16 slots
    monkeypatch.setattr(forward, "pool", small)
    pair.client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    import time

    for _ in range(64):  # 64 segments of 100 bytes, each its own skb on the receiving side
        pair.client.send(b"s" * 100)
        time.sleep(0.001)
    time.sleep(0.05)
    assert unread(pair.src.fileno()) == 6400
    flow = pair.flow(splice_after=0)
    result = flow.run(SCRATCH)
    # Whatever the run did, it may only stop reading with nothing left in the socket.
    assert flow.readable or unread(pair.src.fileno()) == 0, (result, unread(pair.src.fileno()))
    got = b""
    while len(got) < 6400:
        got += pair.upstream.recv(65536)
        if flow.readable:
            flow.run(SCRATCH)
    assert got == b"s" * 6400
    small.close()
