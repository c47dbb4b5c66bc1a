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
        """Send the last counters before exiting, so the supervisor's totals include them."""
        try:
            self._send(Event.SNAPSHOT, self.snapshot())
            if self.writer is not None:
                async with asyncio.timeout(2):
                    await self.writer.drain()
        except (ConnectionError, TimeoutError, RuntimeError):
            pass
