"""The byte cursor: exact reads, and length-prefixed blocks that must be consumed exactly."""

import pytest

from sniproxy.errors import WireError
from sniproxy.protocol.wire import Buffer


def test_pull_integers_big_endian():
    buf = Buffer(bytes.fromhex("01 0203 040506 0708"))
    assert buf.pull_uint8() == 0x01
    assert buf.pull_uint16() == 0x0203
    assert buf.pull_uint24() == 0x040506
    assert buf.pull_bytes(2) == b"\x07\x08"
    assert buf.eof() and buf.remaining() == 0


def test_memoryview_and_window():
    data = memoryview(b"xxABCDyy")
    buf = Buffer(data, start=2, end=6)
    assert buf.remaining() == 4
    assert buf.pull_bytes(4) == b"ABCD"
    assert type(buf.pull_bytes(0)) is bytes
    with pytest.raises(WireError):
        buf.pull_uint8()  # the window ends before "yy"


@pytest.mark.parametrize(
    "data, read",
    [
        (b"", Buffer.pull_uint8),
        (b"\x01", Buffer.pull_uint16),
        (b"\x01\x02", Buffer.pull_uint24),
        (b"\x01\x02", lambda b: b.pull_bytes(3)),
        (b"\x01\x02", lambda b: b.skip(3)),
        (b"\x01\x02", lambda b: b.pull_bytes(-1)),
    ],
)
def test_short_reads_raise_wire_error(data, read):
    buf = Buffer(data)
    with pytest.raises(WireError):
        read(buf)
    assert buf.pos == 0  # a failed read consumes nothing


@pytest.mark.parametrize("size, prefix", [(1, b"\x03"), (2, b"\x00\x03"), (3, b"\x00\x00\x03")])
def test_block_confines_reads_and_restores_end(size, prefix):
    buf = Buffer(prefix + b"abc" + b"Z")
    with buf.pull_block(size) as n:
        assert n == 3
        assert buf.remaining() == 3
        assert buf.pull_bytes(3) == b"abc"
        with pytest.raises(WireError):
            buf.pull_uint8()  # "Z" lies outside the block
    assert buf.pull_bytes(1) == b"Z"
    assert buf.eof()


def test_block_not_consumed_exactly_raises():
    buf = Buffer(b"\x02ab")
    with pytest.raises(WireError, match="not consumed exactly"):
        with buf.pull_block(1):
            buf.pull_uint8()


def test_block_longer_than_data_raises():
    buf = Buffer(b"\x05ab")
    with pytest.raises(WireError):
        with buf.pull_block(1):
            pass


def test_nested_blocks():
    buf = Buffer(b"\x00\x04\x02xy\x00")
    with buf.pull_block(2):
        with buf.pull_block(1) as inner:
            assert buf.pull_bytes(inner) == b"xy"
        assert buf.pull_uint8() == 0
    assert buf.eof()


def test_error_inside_block_propagates():
    buf = Buffer(b"\x01a")
    with pytest.raises(KeyError):
        with buf.pull_block(1):
            raise KeyError("mine")
