"""The engine's event set on real sockets: batches, closes deferred past a batch so a
reused descriptor number never gets its previous owner's event, posted work, and the
plain-descriptor socket calls."""

from __future__ import annotations

import asyncio
import errno
import os
import socket

import pytest
import uvloop

from sniproxy.engine import events
from sniproxy.engine.events import ERR, IN, EventSet


def run(coro, timeout: float = 10.0):
    async def bounded():
        async with asyncio.timeout(timeout):
            return await coro

    return uvloop.run(bounded())


class Recorder:
    def __init__(self, name: str, log: list, on_event=None):
        self.name = name
        self.log = log
        self.hook = on_event

    def on_event(self, fd: int, ev: int) -> None:
        self.log.append((self.name, fd, ev))
        if self.hook is not None:
            self.hook(fd, ev)


def test_a_close_during_a_batch_waits_for_its_end_so_no_number_is_reused_in_it():
    """Both sockets are ready in one batch. Whichever handler runs first closes the other's
    descriptor and opens a new socket: the number must not be reused within the batch, and
    the closed descriptor's own event, still in the batch, must reach nobody."""

    async def main():
        loop = asyncio.get_running_loop()
        es = EventSet(loop)
        pairs = [socket.socketpair() for _ in range(2)]
        fds = [a.detach() for a, _ in pairs]
        seen: list = []
        opened: list[socket.socket] = []
        done = asyncio.Event()

        def closer(me: int):
            def hook(fd: int, ev: int) -> None:
                other = fds[1 - me]
                if any(name == f"h{1 - me}" for name, _, _ in seen[:-1]):
                    return  # the other ran first and closed us: (cannot happen; asserted below)
                es.close(other)
                assert os.fstat(other)  # still open: the close waits for the batch's end
                fresh = socket.socket()  # would take `other`'s number if it were free
                opened.append(fresh)
                assert fresh.fileno() != other
                loop.call_soon(done.set)
            return hook

        for i, fd in enumerate(fds):
            es.add(fd, Recorder(f"h{i}", seen, closer(i)))
        for _, b in pairs:
            b.send(b"x")  # both ready before the loop polls: one batch
        await done.wait()
        await asyncio.sleep(0)
        assert len(seen) == 1, seen  # the closed one's pending event was dropped
        closed = fds[1 - int(seen[0][0][1])]
        with pytest.raises(OSError):
            os.fstat(closed)  # closed once the batch ended
        for s in opened:
            s.close()
        for _, b in pairs:
            b.close()
        es.close_all()

    run(main())


def test_errors_are_reported_while_a_side_is_not_read():
    """A peer's reset reaches the handler as EPOLLERR although nothing reads the socket."""

    async def main():
        es = EventSet(asyncio.get_running_loop())
        with socket.create_server(("127.0.0.1", 0)) as server:
            client = socket.create_connection(server.getsockname())
            peer, _ = server.accept()
        fd = client.detach()
        got = asyncio.get_running_loop().create_future()
        es.add(fd, Recorder("c", [], lambda _, ev: ev & ERR and not got.done() and got.set_result(ev)))
        peer.send(b"unread data")  # readable, and never read
        await asyncio.sleep(0.05)
        events.close_with_reset(peer.fileno())
        peer.close()
        ev = await got
        assert ev & ERR and ev & IN
        es.close(fd)
        es.close_all()

    run(main())


def test_posted_work_runs_after_the_batch_and_may_post_again():
    async def main():
        es = EventSet(asyncio.get_running_loop())
        order: list[str] = []
        finished = asyncio.Event()

        def second():
            order.append("second")
            finished.set()

        def first():
            order.append("first")
            es.post(second)

        es.post(first)
        order.append("posted")
        await finished.wait()
        assert order == ["posted", "first", "second"]
        es.close_all()

    run(main())


def test_remove_forgets_a_shared_descriptor_that_stays_open():
    """A listener is shared with other processes: epoll keeps a registration until every
    copy is closed, so the owner must remove it first."""

    async def main():
        es = EventSet(asyncio.get_running_loop())
        listener = socket.create_server(("127.0.0.1", 0))
        listener.setblocking(False)
        copy = listener.dup()  # another process's copy
        seen: list = []
        es.add(listener.fileno(), Recorder("l", seen), events.LISTENER_EVENTS)
        es.remove(listener.fileno())
        listener.close()
        c = socket.create_connection(copy.getsockname())
        await asyncio.sleep(0.05)
        es.poll()
        assert seen == []  # no event for a number we no longer own
        c.close()
        copy.close()
        es.close_all()

    run(main())


def test_shutdown_write_passes_a_fin_and_close_with_reset_an_rst():
    with socket.create_server(("127.0.0.1", 0)) as server:
        a = socket.create_connection(server.getsockname())
        b, _ = server.accept()
        events.shutdown_write(a.fileno())
        assert b.recv(10) == b""  # FIN
        b.send(b"still open the other way")
        assert a.recv(100) == b"still open the other way"
        events.close_with_reset(b.fileno())
        b.close()
        with pytest.raises(ConnectionResetError):
            a.recv(10)
        a.close()


def test_shutdown_write_error_and_socket_error():
    r, w = os.pipe()
    try:
        with pytest.raises(OSError) as info:
            events.shutdown_write(r)  # not a socket
        assert info.value.errno == errno.ENOTSOCK
    finally:
        os.close(r)
        os.close(w)
    port = socket.create_server(("127.0.0.1", 0))
    address = port.getsockname()
    port.close()  # nothing listens there now
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
    assert s.connect_ex(address) in (errno.EINPROGRESS, errno.ECONNREFUSED)
    import select

    p = select.poll()
    p.register(s, select.POLLOUT)
    assert p.poll(5000)
    assert events.socket_error(s.fileno()) == errno.ECONNREFUSED
    assert events.errno_name(errno.ECONNREFUSED) == "ECONNREFUSED"
    s.close()
