"""The private channel between the supervisor and each worker: both ends, and the messages.

A socketpair per worker. The supervisor writes commands, one line each (as nginx's
``NGX_CMD_*``): first ``config <size>`` with the config bytes after it, then ``snapshot``
whenever it collects counters. The worker writes events, one JSON object per line with one
key: ``ready`` (listening), ``closed`` (its listeners are closed: a reload may report done),
``snapshot`` (its counters). The channel's end tells each side that the other is gone.
"""

from __future__ import annotations

import asyncio
import enum
import json
import os
import socket
from collections.abc import Callable
from typing import Any

#: Supervisor -> worker.
CMD_CONFIG = b"config"
CMD_SNAPSHOT = b"snapshot"


class Event(enum.Enum):
    """Worker -> supervisor."""

    READY = "ready"
    CLOSED = "closed"
    SNAPSHOT = "snapshot"


def encode(event: Event, value: Any = True) -> bytes:
    return json.dumps({event.value: value}, separators=(",", ":")).encode() + b"\n"


def decode(line: bytes) -> tuple[Event, Any]:
    """One worker line; raises ValueError for anything but a known event."""
    message = json.loads(line)
    if not isinstance(message, dict) or len(message) != 1:
        raise ValueError(f"not a channel event: {line[:80]!r}")
    (key, value), = message.items()
    return Event(key), value


#: The longest line a worker may send (a snapshot grows with the routes): past it, the
#: channel is closed as broken.
MAX_LINE = 16 << 20


class SupervisorEnd(asyncio.Protocol):
    """The supervisor's end of one worker's channel. Every line the worker wrote is handled,
    in order, before the end is noticed: a worker that exits right after its last snapshot
    may reset the channel (it closes with a request unread), and a stream reader would then
    raise before handing over the lines it already holds, dropping the counters in them.

    For the same reason requests are written to the socket itself, not through the
    transport: a transport whose write fails (EPIPE, the worker just exited) closes at once,
    and the lines still unread in the socket, the worker's last counters among them, are
    never read."""

    def __init__(self, on_event: Callable[[Event, Any], None], on_broken: Callable[[str], None]):
        self.on_event = on_event
        self.on_broken = on_broken
        self.transport: Any = None  # uvloop's transports are not asyncio.Transport subclasses
        self.fd = -1
        self.buffer = bytearray()
        self.ended = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.fd = transport.get_extra_info("socket").fileno()

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\n")) >= 0:
            line = bytes(self.buffer[:end])
            del self.buffer[: end + 1]
            try:
                event, value = decode(line)
            except ValueError as exc:
                self.on_broken(f"not a channel event ({exc})")
                self.close()
                return
            self.on_event(event, value)
        if len(self.buffer) > MAX_LINE:
            self.on_broken(f"a line longer than {MAX_LINE} bytes")
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)

    def send(self, message: bytes) -> bool:
        """Write a request (a short line, taken whole by a socket that is being read); False
        if the worker is gone or not reading, which leaves the channel open for its lines."""
        if self.transport is None or self.transport.is_closing():
            return False
        try:
            return os.write(self.fd, message) == len(message)
        except OSError:  # EPIPE: it exited; EAGAIN: it has not read for a while
            return False

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


def config_command(text: bytes) -> bytes:
    return CMD_CONFIG + b" %d\n" % len(text) + text


def read_initial_config(sock: socket.socket) -> bytes:
    """Worker side, before the event loop starts: the config the supervisor validated."""
    header = b""
    while not header.endswith(b"\n"):
        byte = sock.recv(1)  # one at a time: nothing past the header may be consumed here
        if not byte:
            raise ConnectionError("supervisor closed the channel")
        header += byte
    command, size = header.split()
    if command != CMD_CONFIG:
        raise ConnectionError(f"expected {CMD_CONFIG.decode()} from the supervisor, got {command[:20]!r}")
    text = b""
    while len(text) < int(size):
        chunk = sock.recv(int(size) - len(text))
        if not chunk:
            raise ConnectionError("supervisor closed the channel")
        text += chunk
    return text


class WorkerChannel:
    """Worker side: answers snapshot requests and says when it is ready; the channel's end
    means the supervisor is gone. It is the worker lifecycle's notifier."""

    def __init__(self, sock: socket.socket, snapshot: Callable[[], dict], on_close: Callable[[], None]):
        self.sock = sock
        self.snapshot = snapshot
        self.on_close = on_close
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_connection(sock=self.sock)
        self.task = asyncio.get_running_loop().create_task(self._serve(reader))

    def _send(self, event: Event, value: Any = True) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(encode(event, value))

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                if line.strip() == CMD_SNAPSHOT:
                    self._send(Event.SNAPSHOT, self.snapshot())
        except (ConnectionError, ValueError):
            pass
        self.on_close()  # the supervisor is gone: drain and exit rather than run orphaned

    # Notifier: what the lifecycle tells systemd, a worker tells its supervisor (readiness).
    def ready(self, status: str | None = None) -> None:
        self._send(Event.READY)

    def reloading(self, status: str | None = None) -> None:
        pass

    def stopping(self, status: str | None = None) -> None:
        pass

    def draining(self, status: str) -> None:
        self._send(Event.CLOSED)  # listeners closed: a reload may report done

    def watchdog(self) -> None:
        pass

    def status(self, text: str) -> None:
        pass

    async def final(self) -> None:
        """Send the last counters before exiting, so the supervisor's totals include them.
        The channel is closed and waited for: the event loop writes at the end of an
        iteration, and one that closes right after a write would drop the line (a drain()
        waits only when the buffer is full), and with it what the worker counted since the
        last scrape."""
        try:
            self._send(Event.SNAPSHOT, self.snapshot())
            if self.writer is not None:
                async with asyncio.timeout(2):
                    self.writer.close()
                    await self.writer.wait_closed()
        except (ConnectionError, TimeoutError, RuntimeError):
            pass
