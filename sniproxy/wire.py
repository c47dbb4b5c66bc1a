"""A tiny read cursor over bytes, after aioquic's Buffer."""

from contextlib import contextmanager
from typing import Iterator

from .errors import WireError


class Buffer:
    __slots__ = ("data", "pos", "end")

    def __init__(self, data: bytes | memoryview, start: int = 0, end: int | None = None):
        self.data = data
        self.pos = start
        self.end = len(data) if end is None else end

    def eof(self) -> bool:
        return self.pos >= self.end

    def remaining(self) -> int:
        return self.end - self.pos

    def _take(self, n: int) -> int:
        pos = self.pos
        if n < 0 or pos + n > self.end:
            raise WireError(f"need {n} bytes at offset {pos}, have {self.end - pos}")
        self.pos = pos + n
        return pos

    def pull_uint8(self) -> int:
        return self.data[self._take(1)]

    def pull_uint16(self) -> int:
        p = self._take(2)
        d = self.data
        return (d[p] << 8) | d[p + 1]

    def pull_uint24(self) -> int:
        p = self._take(3)
        d = self.data
        return (d[p] << 16) | (d[p + 1] << 8) | d[p + 2]

    def pull_bytes(self, n: int) -> bytes:
        p = self._take(n)
        return bytes(self.data[p : p + n])

    def skip(self, n: int) -> None:
        self._take(n)

    @contextmanager
    def pull_block(self, length_size: int) -> Iterator[int]:
        """Enter a block prefixed by a ``length_size``-byte length.

        Reads are confined to the block, which must be consumed exactly.
        """
        if length_size == 1:
            n = self.pull_uint8()
        elif length_size == 2:
            n = self.pull_uint16()
        else:
            n = self.pull_uint24()
        start = self._take(n)
        outer_end, self.end, self.pos = self.end, start + n, start
        yield n
        if self.pos != self.end:
            raise WireError(f"block of {n} bytes not consumed exactly ({self.end - self.pos} left)")
        self.end = outer_end
