"""The table of connections waiting for their ClientHello: order, per-client counts, bytes held."""

from __future__ import annotations

from sniproxy.engine.handshakes import Handshakes
from sniproxy.reasons import Refusal


class Conn:
    def __init__(self, ip: str, table: Handshakes | None = None):
        self.client_ip = ip
        self.table = table
        self.evicted: Refusal | None = None

    def evict(self, reason: Refusal) -> None:
        """As a connection does: refused, it leaves the table as it closes."""
        self.evicted = reason
        if self.table is not None:
            self.table.leave(self)


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


def test_counting_a_connection_again_counts_nothing():
    """The sweep counts a waiting connection every second it is still waiting."""
    table = Handshakes(max_per_client=2, max_memory=1000)
    a, b = Conn("10.0.0.1"), Conn("10.0.0.1")
    for conn in (a, b):
        table.enter(conn)
    assert all(table.count_client(a) for _ in range(5))
    assert table.waiting_for("10.0.0.1") == 1
    assert table.count_client(b) and table.count_client(b)
    assert table.waiting_for("10.0.0.1") == 2


def test_bytes_held_past_the_budget_evict_the_oldest_holders_until_under_it():
    table = Handshakes(max_per_client=10, max_memory=100)
    silent, a, b, c = (Conn(f"10.0.0.{i}", table) for i in range(4))
    for conn in (silent, a, b, c):
        table.enter(conn)
    table.hold(a, 60)
    table.hold(b, 30)
    assert table.held == 90 and not any(conn.evicted for conn in (silent, a, b))
    table.hold(b, 50)  # grows: held is the latest size, not a sum of reads
    # the oldest holding bytes goes, not the silent one that holds none
    assert (a.evicted, b.evicted, silent.evicted) == (Refusal.HELLO_MEMORY, None, None)
    assert table.held == 50 and a not in table and silent in table
    table.hold(c, 120)  # alone over the budget: b goes first, then c itself
    assert (b.evicted, c.evicted) == (Refusal.HELLO_MEMORY, Refusal.HELLO_MEMORY)
    assert table.held == 0 and len(table) == 1


def test_an_eviction_that_does_not_leave_the_table_still_ends():
    table = Handshakes(max_per_client=10, max_memory=100)
    stuck = Conn("10.0.0.1")  # its evict never calls leave
    table.enter(stuck)
    table.hold(stuck, 200)
    assert stuck.evicted is Refusal.HELLO_MEMORY and table.held == 0
