"""Log lines that a flood cannot turn into a flood of lines: at most one per key every
``every`` seconds, saying how many times it happened since the last one."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

EVERY = 10.0


class Throttled:
    __slots__ = ("log", "every", "clock", "_last", "_count")

    def __init__(self, log: logging.Logger, every: float = EVERY, clock: Callable[[], float] = time.monotonic):
        self.log = log
        self.every = every
        self.clock = clock
        self._last: dict[str, float] = {}
        self._count: dict[str, int] = {}

    def due(self, key: str) -> int:
        """Count one happening of ``key``; the number since its last line when a line is due
        now, else 0."""
        now = self.clock()
        count = self._count.get(key, 0) + 1
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._count[key] = count
            return 0
        self._last[key] = now
        self._count[key] = 0
        return count

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message % args`` unless ``key`` was logged less than ``every`` seconds ago;
        the line then says how many times it happened in the meantime."""
        self._emit(logging.WARNING, key, message, args)

    def error(self, key: str, message: str, *args: object) -> None:
        self._emit(logging.ERROR, key, message, args)

    def _emit(self, level: int, key: str, message: str, args: tuple) -> None:
        count = self.due(key)
        if count:
            self.log.log(level, message + (f" ({count} times in the last {self.every:g}s)" if count > 1 else ""),
                         *args)
