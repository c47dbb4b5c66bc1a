"""What the sans-I/O parsers share: the NEED_DATA sentinel, and a tiny read cursor over
bytes, after aioquic's Buffer."""

from ..errors import WireError


class NeedData:
    """"Not enough bytes yet": a return value, never an exception (as in h11)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "NEED_DATA"


#: Returned by a parser while its input is incomplete: read more and call again.
NEED_DATA = NeedData()


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

    def pull_block(self, length_size: int) -> "_Block":
        """Enter a block prefixed by a ``length_size``-byte length.

        Reads are confined to the block, which must be consumed exactly. A small class
        rather than @contextmanager: this runs for every extension of every ClientHello.
        """
        if length_size == 1:
            n = self.pull_uint8()
        elif length_size == 2:
            n = self.pull_uint16()
        else:
            n = self.pull_uint24()
        start = self._take(n)
        block = _Block(self, n, self.end)
        self.end, self.pos = start + n, start
        return block


class _Block:
    __slots__ = ("buf", "length", "outer_end")

    def __init__(self, buf: Buffer, length: int, outer_end: int):
        self.buf = buf
        self.length = length
        self.outer_end = outer_end

    def __enter__(self) -> int:
        return self.length

    def __exit__(self, exc_type, exc, tb) -> None:
        buf = self.buf
        if exc_type is None and buf.pos != buf.end:
            raise WireError(f"block of {self.length} bytes not consumed exactly ({buf.end - buf.pos} left)")
        buf.end = self.outer_end
