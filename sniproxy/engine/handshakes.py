"""The connections still waiting for their ClientHello, and what they may take.

A connection whose hello arrives with its first read never enters this table: only one that
has to wait does. While it waits it counts towards:

- the table's order: when the connection table is full, the oldest waiting connection is
  dropped to admit a new one (``evicted``), so silent connections cannot starve new clients;
- its client's waiting connections, at most ``max_per_client`` (``client_handshakes``), once
  it has waited ``CLIENT_GRACE``: builders behind one NAT share an address, and a busy one
  opens connections faster than it sends their hellos, so a connection still waiting a
  moment after accept is in flight, not silent; the bound is generous, and established
  connections never count;
- the bytes its partial hello holds: past ``max_memory`` in all, the oldest connection holding
  bytes is dropped (``hello_memory``) until the total is under it again.

One table per process, for its whole life: a reload changes its bounds, never its contents.
"""

from __future__ import annotations

from typing import Protocol

from ..reasons import Refusal

#: Seconds a connection waits for its hello before it counts for its client (checked by the
#: server's once-a-second sweep, so counting starts between 1 and 2 s): a hello sent right
#: after connect arrives well within it, even from a loaded builder, and a silent connection
#: is counted long before the handshake timeout (5 s) would close it.
CLIENT_GRACE = 1.0


class Waiting(Protocol):
    """What the table needs of a connection."""

    client_ip: str

    def evict(self, reason: Refusal) -> None:
        """Refuse it now, to protect everyone else; it leaves the table as it closes."""


class Handshakes:
    __slots__ = ("max_per_client", "max_memory", "_waiting", "_holding", "_per_client", "held")

    def __init__(self, max_per_client: int, max_memory: int):
        self.max_per_client = max_per_client
        self.max_memory = max_memory
        self._waiting: dict[Waiting, str | None] = {}  # arrival order -> the client it counts for
        self._holding: dict[Waiting, int] = {}  # order of their first byte -> bytes held
        self._per_client: dict[str, int] = {}
        self.held = 0
        """Bytes held by all partial hellos."""

    def __len__(self) -> int:
        return len(self._waiting)

    def __contains__(self, conn: Waiting) -> bool:
        return conn in self._waiting

    def enter(self, conn: Waiting) -> None:
        """``conn`` waits for its hello (from a balancer, its client is not known yet)."""
        self._waiting.setdefault(conn, None)

    def count_client(self, conn: Waiting) -> bool:
        """Count a waiting ``conn`` for its client (once: again, it is True at no cost); False
        (nothing counted) if the client already has ``max_per_client`` waiting."""
        key = conn.client_ip
        if self._waiting.get(conn) == key:
            return True
        n = self._per_client.get(key, 0)
        if n >= self.max_per_client:
            return False
        self._per_client[key] = n + 1
        self._waiting[conn] = key
        return True

    def hold(self, conn: Waiting, nbytes: int) -> None:
        """``conn``'s partial hello now holds ``nbytes``. Past ``max_memory`` in all, the
        oldest connections holding bytes are evicted (``conn`` too, if it is the oldest)
        until the total is under it again."""
        self.held += nbytes - self._holding.get(conn, 0)
        self._holding[conn] = nbytes
        while self.held > self.max_memory and self._holding:
            victim = next(iter(self._holding))
            victim.evict(Refusal.HELLO_MEMORY)
            self.leave(victim)  # its close has done so already; this makes sure the loop ends

    def oldest(self) -> Waiting | None:
        return next(iter(self._waiting), None)

    def leave(self, conn: Waiting) -> None:
        """``conn`` has its hello, or is closed."""
        key = self._waiting.pop(conn, None)
        if key is not None:
            n = self._per_client[key]
            if n == 1:
                del self._per_client[key]
            else:
                self._per_client[key] = n - 1
        held = self._holding.pop(conn, None)
        if held is not None:
            self.held -= held

    def waiting_for(self, ip: str) -> int:
        return self._per_client.get(ip, 0)
