"""The table of connections waiting for their ClientHello: order, per-client counts, bytes held."""

from __future__ import annotations

from sniproxy.engine.handshakes import Handshakes
from sniproxy.reasons import Refusal


class Conn:
    def __init__(self, ip: str):
        self.client_ip = ip
        self.evicted: Refusal | None = None

    def evict(self, reason: Refusal) -> None:
        self.evicted = reason


def test_the_oldest_waiting_connection_comes_first():
    table = Handshakes(max_per_client=10, max_memory=1000)
    a, b, c = Conn("10.0.0.1"), Conn("10.0.0.2"), Conn("10.0.0.1")
    for conn in (a, b, c):
        table.enter(conn)
    assert table.oldest() is a and len(table) == 3
    table.leave(a)
    assert table.oldest() is b and a not in table
    table.leave(a)  # leaving twice changes nothing
    assert len(table) == 2


def test_a_client_is_counted_once_known_and_refused_past_its_bound():
    table = Handshakes(max_per_client=2, max_memory=1000)
    conns = [Conn("10.0.0.1") for _ in range(3)]
    for conn in conns:
        table.enter(conn)
    assert [table.count_client(conn) for conn in conns] == [True, True, False]
    assert table.waiting_for("10.0.0.1") == 2
    table.leave(conns[0])
    assert table.waiting_for("10.0.0.1") == 1
    table.leave(conns[2])  # entered, never counted: nothing to uncount
    assert table.waiting_for("10.0.0.1") == 1
    table.leave(conns[1])
    assert table.waiting_for("10.0.0.1") == 0 and len(table) == 0


def test_bytes_held_past_the_budget_name_the_oldest_holder():
    table = Handshakes(max_per_client=10, max_memory=100)
    silent, a, b = Conn("10.0.0.9"), Conn("10.0.0.1"), Conn("10.0.0.2")
    for conn in (silent, a, b):
        table.enter(conn)
    table.hold(a, 60)
    table.hold(b, 30)
    assert table.held == 90 and table.over_memory() is None
    table.hold(b, 50)  # grows: held is the latest size, not a sum of reads
    assert table.held == 110 and table.over_memory() is a  # the oldest holding bytes, not the silent one
    table.leave(a)
    assert table.held == 50 and table.over_memory() is None
