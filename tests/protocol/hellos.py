"""ClientHellos for the parser tests: real ones captured from clients (tests/fixtures), a
builder for made-up ones, the reader's outcome on any input, and input strategies."""

from __future__ import annotations

import json
import random

from hypothesis import strategies as st

from sniproxy.errors import BadHello, HelloError, NotTLS
from sniproxy.protocol.tls import MAX_RECORD, NEED_DATA, ClientHello, HelloReader
from tests.helpers import FIXTURES

EXPECTED = json.loads((FIXTURES / "expected.json").read_text())
NAMES = sorted(EXPECTED)


def fixture(name: str) -> bytes:
    return (FIXTURES / f"{name}.bin").read_bytes()


# -- a minimal ClientHello builder (RFC 8446 4.1.2, RFC 6066 3, RFC 7301 3.1) -------------------


def u8(n: int) -> bytes:
    return n.to_bytes(1, "big")


def u16(n: int) -> bytes:
    return n.to_bytes(2, "big")


def u24(n: int) -> bytes:
    return n.to_bytes(3, "big")


def vec8(b: bytes) -> bytes:
    return u8(len(b)) + b


def vec16(b: bytes) -> bytes:
    return u16(len(b)) + b


def ext(ext_type: int, body: bytes) -> bytes:
    return u16(ext_type) + vec16(body)


def host_name(name: bytes | str, name_type: int = 0) -> bytes:
    return u8(name_type) + vec16(name.encode() if isinstance(name, str) else name)


def sni_ext(*names: bytes | str) -> bytes:
    return ext(0, vec16(b"".join(host_name(n) for n in names)))


def alpn_ext(*protocols: bytes) -> bytes:
    return ext(16, vec16(b"".join(vec8(p) for p in protocols)))


def padding_ext(n: int) -> bytes:
    return ext(21, bytes(n))


CIPHERS = bytes.fromhex("1301 1302 1303 c02f c030")
RANDOM = bytes(range(32))
SUPPORTED_VERSIONS = ext(43, vec8(bytes.fromhex("0304 0303")))


def hello_body(
    *extensions: bytes,
    version: int = 0x0303,
    session_id: bytes = b"\x5a" * 32,
    ciphers: bytes = CIPHERS,
    compression: bytes = b"\x00",
    raw_session_id: bytes | None = None,
    raw_ciphers: bytes | None = None,
    raw_compression: bytes | None = None,
    raw_extensions: bytes | None = None,
    no_extensions: bool = False,
    trailer: bytes = b"",
) -> bytes:
    """A ClientHello body; the raw_* arguments replace a whole length-prefixed vector."""
    sid = vec8(session_id) if raw_session_id is None else raw_session_id
    cs = vec16(ciphers) if raw_ciphers is None else raw_ciphers
    comp = vec8(compression) if raw_compression is None else raw_compression
    if no_extensions:
        exts = b""
    elif raw_extensions is not None:
        exts = raw_extensions
    else:
        exts = vec16(b"".join(extensions))
    return u16(version) + RANDOM + sid + cs + comp + exts + trailer


def handshake(body: bytes, msg_type: int = 1, length: int | None = None) -> bytes:
    return u8(msg_type) + u24(len(body) if length is None else length) + body


def record(payload: bytes, content_type: int = 22, version: int = 0x0301) -> bytes:
    return u8(content_type) + u16(version) + vec16(payload)


def records(message: bytes, size: int | list[int] = MAX_RECORD, version: int = 0x0301) -> bytes:
    """Cut a handshake message into handshake records of ``size`` bytes (or the listed sizes)."""
    sizes = iter(size) if isinstance(size, list) else None
    out, pos = [], 0
    while pos < len(message):
        n = next(sizes) if sizes is not None else size
        out.append(record(message[pos : pos + n], version=version))
        pos += n
    return b"".join(out)


def tls(*extensions: bytes, **kw) -> bytes:
    """A complete one-record ClientHello."""
    return records(handshake(hello_body(*extensions, **kw)))


# -- reading fixtures and feeding ---------------------------------------------------------------


def split_records(data: bytes) -> list[tuple[int, int, bytes]]:
    out, pos = [], 0
    while pos < len(data):
        ctype, version, length = data[pos], int.from_bytes(data[pos + 1 : pos + 3], "big"), int.from_bytes(data[pos + 3 : pos + 5], "big")
        out.append((ctype, version, data[pos + 5 : pos + 5 + length]))
        pos += 5 + length
    assert pos == len(data), "fixture is not whole records"
    return out


def handshake_message(data: bytes) -> bytes:
    return b"".join(payload for _, _, payload in split_records(data))


def cut(data: bytes, points) -> list[bytes]:
    points = sorted(set(p for p in points if 0 < p < len(data)))
    return [data[a:b] for a, b in zip([0] + points, points + [len(data)])]


def random_chunks(data: bytes, rng: random.Random, max_cuts: int = 40) -> list[bytes]:
    k = rng.randint(0, min(max_cuts, max(len(data) - 1, 0)))
    return cut(data, rng.sample(range(1, len(data)), k) if len(data) > 1 else [])


def feed(chunks, reader: HelloReader | None = None):
    """Feed chunks in order until a result: (result, chunks used). NEED_DATA if none came."""
    reader = reader or HelloReader()
    for i, chunk in enumerate(chunks, 1):
        result = reader.feed(chunk)
        if result is not NEED_DATA:
            assert isinstance(result, ClientHello)
            return result, i
    return NEED_DATA, len(chunks)


def bytewise(data: bytes) -> list[bytes]:
    return [data[i : i + 1] for i in range(len(data))]


def is_grease(v: int) -> bool:
    return v & 0x0F0F == 0x0A0A and v >> 8 == v & 0xFF


def check_expected(hello: ClientHello, name: str) -> None:
    want = EXPECTED[name]
    assert hello.sni == want["sni"]
    assert list(hello.alpn) == want["alpn"]
    assert (0xFE0D in hello.extensions) == want["has_ech"]
    assert any(map(is_grease, hello.extensions)) == want["has_grease"]
    assert hello.legacy_version == 0x0303


# -- property: a result, NEED_DATA, or a HelloError; nothing else ------------------------------------


def outcome(data: bytes, chunk_sizes: list[int]):
    """Feed ``data`` in chunks of the given sizes (the rest in one), checking the invariant."""
    reader = HelloReader()
    chunks, pos = [], 0
    for n in chunk_sizes:
        if pos >= len(data):
            break
        chunks.append(data[pos : pos + n])
        pos += n
    if pos < len(data):
        chunks.append(data[pos:])
    for chunk in chunks:
        try:
            result = reader.feed(chunk)
        except HelloError as exc:
            assert isinstance(exc, (NotTLS, BadHello))
            return type(exc)
        if result is NEED_DATA:
            continue
        assert isinstance(result, ClientHello)
        assert result.sni is None or isinstance(result.sni, str)
        assert all(isinstance(p, str) for p in result.alpn)
        assert all(isinstance(t, int) and 0 <= t <= 0xFFFF for t in result.extensions)
        assert len(reader.received) <= len(data)
        return result
    return NEED_DATA


@st.composite
def mutated_fixture(draw) -> bytes:
    data = bytearray(fixture(draw(st.sampled_from(NAMES))))
    for _ in range(draw(st.integers(1, 4))):
        # mostly hit the framing and the first extensions, where the parser works hardest
        hi = draw(st.sampled_from([min(len(data), 160), len(data)]))
        if hi == 0:
            break
        at = draw(st.integers(0, hi - 1))
        kind = draw(st.sampled_from(["flip", "set", "truncate", "insert", "delete"]))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[at] = draw(st.sampled_from([0, 1, 0x7F, 0x80, 0xFF, data[at] + 1 & 0xFF, data[at] - 1 & 0xFF]))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
        else:
            del data[at : at + draw(st.integers(1, 8))]
    return bytes(data)


CHUNKS = st.lists(st.integers(1, 700), max_size=12)
TLS_PREFIXED = st.binary(max_size=300).map(lambda b: b"\x16\x03\x01" + b)
ANY_INPUT = st.one_of(st.binary(max_size=200), TLS_PREFIXED, mutated_fixture())
