"""The supervisor's end of a worker's channel, on a real socketpair and uvloop: every line a
worker wrote reaches the supervisor, however the worker's exit and the supervisor's next
request cross."""

from __future__ import annotations

import asyncio
import socket

import uvloop

from sniproxy.process.channel import CMD_SNAPSHOT, Event, SupervisorEnd, encode


async def _open() -> tuple[SupervisorEnd, socket.socket, list]:
    parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    events: list = []
    _, end = await asyncio.get_running_loop().connect_accepted_socket(
        lambda: SupervisorEnd(lambda event, value: events.append((event, value)),
                              lambda why: events.append(("broken", why))), parent)
    return end, child, events


def test_a_request_written_after_the_worker_exited_does_not_drop_its_last_snapshot():
    """A worker sends its last counters and exits with a request unread; a scrape then asks it
    again before the supervisor's loop has read. The write fails (the peer is gone), and that
    must not close the channel with the last snapshot still unread: the supervisor's totals
    would lose what the worker counted since the scrape before (seen under load in CI, as
    connections that never appeared in sniproxy_connections_total)."""

    async def main() -> tuple[bool, list]:
        end, worker, events = await _open()
        assert end.send(CMD_SNAPSHOT + b"\n")
        worker.sendall(encode(Event.SNAPSHOT, {"connections": 5}))
        worker.close()  # with the request unread: the supervisor's next write gets EPIPE
        sent = end.send(CMD_SNAPSHOT + b"\n")
        await asyncio.wait_for(end.ended, 5)
        return sent, events

    sent, events = uvloop.run(main())
    assert events == [(Event.SNAPSHOT, {"connections": 5})]
    assert sent is False  # and the caller hears that this request went nowhere


def test_requests_reach_a_live_worker_and_its_answers_come_back_in_order():
    async def main() -> tuple[bytes, list]:
        end, worker, events = await _open()
        worker.setblocking(False)
        assert end.send(CMD_SNAPSHOT + b"\n") and end.send(CMD_SNAPSHOT + b"\n")
        got = b""
        while got.count(b"\n") < 2:
            got += await asyncio.get_running_loop().sock_recv(worker, 64)
        for n in range(3):
            worker.sendall(encode(Event.SNAPSHOT, {"n": n}))
        worker.close()
        await asyncio.wait_for(end.ended, 5)
        return got, events

    got, events = uvloop.run(main())
    assert got == (CMD_SNAPSHOT + b"\n") * 2
    assert events == [(Event.SNAPSHOT, {"n": n}) for n in range(3)]
