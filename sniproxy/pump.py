"""The byte pump: two asyncio Protocols, one per socket, each writing into the other.

Backpressure in one rule: when a side's write buffer passes the high-water mark, stop reading
from its peer; resume below the low-water mark. So each direction holds at most
``HIGH_WATER`` plus one read (uvloop reads up to 256 KiB) in user space.
"""

from __future__ import annotations

import asyncio
import socket
import struct
from typing import Any

#: Per direction. uvloop's own default low-water mark is 16 bytes, which would resume a
#: paused reader after every small write; explicit limits keep the pump in big strides.
HIGH_WATER = 256 * 1024
LOW_WATER = 64 * 1024

_LINGER_RST = struct.pack("ii", 1, 0)
NEVER = float("inf")
#: With splice = "auto", a pair moves to splice(2) once one direction has carried this
#: much: bulk layer transfers go zero-copy, short API calls keep the pump's cheaper set-up.
SPLICE_AFTER = 1 << 20
#: A move waits for a moment with nothing buffered; until then, ask again this often.
SPLICE_RETRY = 256 * 1024


def set_limits(transport: asyncio.Transport) -> None:
    transport.set_write_buffer_limits(high=HIGH_WATER, low=LOW_WATER)


def abort_with_reset(transport: asyncio.BaseTransport) -> None:
    """Close so the peer sees a TCP RST, passing on a reset from the other side."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
        except OSError:
            pass
    transport.abort()


class Side(asyncio.Protocol):
    """One socket of a proxied pair. ``nbytes`` counts bytes read here and written to the peer."""

    __slots__ = ("conn", "name", "transport", "peer", "nbytes", "eof", "lost", "splice_at")

    def __init__(self, conn: Any, name: str):
        self.conn = conn
        self.name = name  # "client" or "upstream"
        self.transport: asyncio.Transport | None = None
        self.peer: Side | None = None
        self.nbytes = 0
        self.eof = False
        self.lost = False
        self.splice_at = NEVER
        """Byte count at which this pair asks to move to splice(2) ([server] splice = "auto")."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        set_limits(self.transport)

    def data_received(self, data: bytes) -> None:
        n = self.nbytes = self.nbytes + len(data)
        self.peer.transport.write(data)
        if n >= self.splice_at:  # one comparison per chunk; true once per busy pair
            self.splice_at = self.peer.splice_at = NEVER
            self.conn.server.loop.call_soon(self.conn.move_to_splice)

    def eof_received(self) -> bool:
        # Half-close: pass the FIN on once the peer's buffer is flushed (write_eof waits for
        # that), and keep the other direction flowing.
        self.eof = True
        peer = self.peer
        if not peer.lost and peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            self.transport.close()
            peer.transport.close()
        return True

    def pause_writing(self) -> None:
        if not self.peer.lost:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if not self.peer.lost:
            self.peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.conn.state != "pumping":
            return  # an upstream attempt that closed before attach: the next address is tried
        peer = self.peer
        if peer is not None and not peer.lost:
            if exc is not None:
                abort_with_reset(peer.transport)
            else:
                peer.transport.close()
        self.conn.side_lost(self, exc)
