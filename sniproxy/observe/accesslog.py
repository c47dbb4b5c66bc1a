"""The access log: one JSON line per connection, written in batches.

Lines produced in one event-loop iteration go out in one write(2), so a burst of short
connections costs one system call, not one each. Every field is either a number or a
string the proxy validated (host names, route names, IP addresses, fixed close reasons,
group names from a table), so the line is formatted directly instead of through json.dumps
and the logging module. ALPN names are the client's own bytes: they go through json.dumps,
once per distinct list.
"""

from __future__ import annotations

import asyncio
import json
import os
import time

from ..protocol.tls import ClientHello
from .logs import TIME_FORMAT

_second = [-1, ""]  # strftime once per second, not once per line


def _timestamp(t: float) -> str:
    second = int(t)
    if second != _second[0]:
        _second[0], _second[1] = second, time.strftime(TIME_FORMAT, time.gmtime(second))
    return f"{_second[1]}.{int(t * 1000) % 1000:03d}Z"


Q = '"'
#: The most one access-log field of the client's own bytes takes: past it, the line keeps the
#: names that fit and says how many it left out ("alpn_omitted").
MAX_FIELD = 256
#: Lists worth remembering: the few that real clients send ("h2", "http/1.1"...). Keys are
#: client-chosen, so the cache holds only short lists, and at most this many of them.
_CACHED_LIST = 64
_CACHE_SIZE = 256
_ALPN: dict[tuple[str, ...], str] = {}


def _alpn(protocols: tuple[str, ...]) -> str:
    """The "alpn" field, and an "alpn_omitted" count after it when the list was cut short."""
    text = _ALPN.get(protocols)
    if text is not None:
        return text
    text = json.dumps(list(protocols), separators=(",", ":"))
    if len(text) <= _CACHED_LIST:
        if len(_ALPN) >= _CACHE_SIZE:
            _ALPN.clear()
        _ALPN[protocols] = text
    elif len(text) > MAX_FIELD:
        kept: list[str] = []
        for name in protocols:
            if len(json.dumps([*kept, name], separators=(",", ":"))) > MAX_FIELD:
                break
            kept.append(name)
        text = json.dumps(kept, separators=(",", ":")) + f',"alpn_omitted":{len(protocols) - len(kept)}'
    return text


def format_line(t: float, client: str | None, listener: str, hello: ClientHello | None, route: str | None,
                upstream: str | None, to_upstream: int, to_client: int, duration: float, close: str,
                hello_bytes: int = 0, hello_records: int = 0, hello_reads: int = 0,
                hello_seconds: float = 0.0) -> str:
    # Formatted once per connection: conditionals inline, no helper calls, no round().
    if hello is None:
        facts = '"sni":null,"alpn":null,"pq":null,"ech":false'
    else:
        sni, pq = hello.sni, hello.pq_group
        facts = (f'"sni":{"null" if sni is None else Q + sni + Q},"alpn":{_alpn(hello.alpn)},'
                 f'"pq":{"null" if pq is None else Q + pq + Q},"ech":{"true" if hello.ech else "false"}')
    return (
        f'{{"time":"{_timestamp(t)}","client":{"null" if client is None else Q + client + Q},'
        f'"listener":"{listener}",{facts},"route":{"null" if route is None else Q + route + Q},'
        f'"upstream":{"null" if upstream is None else Q + upstream + Q},'
        f'"bytes_to_upstream":{to_upstream},"bytes_to_client":{to_client},"duration":{duration:.6f},'
        f'"close":"{close}","hello_bytes":{hello_bytes},"hello_records":{hello_records},'
        f'"hello_reads":{hello_reads},"hello_ms":{hello_seconds * 1000:.3f}}}\n'
    )


class AccessLog:
    """Writes to stderr or to a file that SIGUSR1 can reopen (for logrotate)."""

    def __init__(self, target: str, loop: asyncio.AbstractEventLoop | None = None):
        self.target = target
        self.loop = loop
        self.fd = 2 if target == "stderr" else self._open()
        self._pending: list[str] = []

    def _open(self) -> int:
        return os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)

    def write(self, line: str) -> None:
        if not self._pending and self.loop is not None:
            self.loop.call_soon(self.flush)
        self._pending.append(line)
        if self.loop is None:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        data = "".join(self._pending).encode()
        self._pending.clear()
        try:
            while data:
                n = os.write(self.fd, data)
                data = data[n:]
        except OSError:
            pass  # a full disk must not take the proxy down; the error log says the rest

    def reopen(self) -> None:
        if self.target != "stderr":
            self.flush()
            fd = self._open()  # first: if this fails, the old file keeps working
            old, self.fd = self.fd, fd
            os.close(old)

    def close(self) -> None:
        self.flush()
        if self.fd != 2:
            os.close(self.fd)
            self.fd = 2
