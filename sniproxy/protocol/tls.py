"""Sans-I/O TLS ClientHello reader: bytes in, ``ClientHello`` or ``NEED_DATA`` out.

Two layers, kept apart as in mitmproxy: ``HelloReader`` reassembles the handshake
message from TLS records (any number of records, any TCP segmentation); ``parse_client_hello``
parses that message (RFC 8446 section 4.1.2). Nothing here touches a socket, and the
reader never rebuilds bytes: the caller forwards exactly what it fed in.
"""

from __future__ import annotations

from enum import IntEnum
from typing import NamedTuple

from ..errors import BadHello, NotTLS, OverLimit, WireError
from ..hostnames import normalize_host
from ..reasons import HelloLimit
from .wire import NEED_DATA, Buffer, NeedData


class ContentType(IntEnum):
    ALERT = 21
    HANDSHAKE = 22


class HandshakeType(IntEnum):
    CLIENT_HELLO = 1


class ExtensionType(IntEnum):
    SERVER_NAME = 0
    APPLICATION_LAYER_PROTOCOL_NEGOTIATION = 16
    KEY_SHARE = 51
    ENCRYPTED_CLIENT_HELLO = 0xFE0D


#: Post-quantum hybrid key-exchange groups a hello may offer a key share for (IANA TLS
#: Supported Groups), named as the hello-diagnostics metrics label them.
PQ_GROUPS = {
    0x11EB: "SecP256r1MLKEM768",
    0x11EC: "X25519MLKEM768",
    0x11ED: "SecP384r1MLKEM1024",
    0x6399: "X25519Kyber768Draft00",
    0x639A: "SecP256r1Kyber768Draft00",
}


class NameType(IntEnum):
    HOST_NAME = 0



#: Largest ClientHello message body accepted. Post-quantum key shares make today's hellos
#: ~1.8 KB; 64 KiB leaves room for years of growth while bounding what a client can make us hold.
MAX_HELLO = 64 * 1024
#: Bounds on the parts of a hello whose number sets its parsing cost, so the worst hello of
#: any shape costs a few times a normal one. Real stacks: 1 record (up to 5 for the largest
#: hellos; 45 from a stack that splits on purpose), about 20 extensions, 2 or 3 ALPN names,
#: 1 to 4 key shares.
MAX_RECORDS = 64
MAX_EXTENSIONS = 64
MAX_ALPN = 32
MAX_KEY_SHARES = 16
#: RFC 8446 section 5.1: TLSPlaintext.length must not exceed 2^14.
MAX_RECORD = 1 << 14
RECORD_HEADER = 5

#: A fatal unrecognized_name alert (RFC 6066 section 3), sent before refusing an unknown SNI.
UNRECOGNIZED_NAME_ALERT = bytes((ContentType.ALERT, 3, 3, 0, 2, 2, 112))

class ClientHello(NamedTuple):
    """A read-only view of the parts of a ClientHello the proxy cares about. A NamedTuple, not
    a frozen dataclass: one is made per connection, and a frozen dataclass's __init__ sets
    each field through object.__setattr__ (about four times the cost)."""

    sni: str | None
    """Normalised host name (lower case, no trailing dot); None when absent, an IP literal or invalid."""
    alpn: tuple[str, ...]
    """Offered ALPN protocols, in order."""
    extensions: tuple[int, ...]
    """Extension types in the order sent (GREASE values included)."""
    legacy_version: int
    key_shares: tuple[int, ...] = ()
    """Groups of the key shares offered, in order (GREASE values included)."""
    pq_group: str | None = None
    """The first post-quantum hybrid group with a key share offered, by name."""
    ech: bool = False
    """An encrypted_client_hello extension is present (real ECH or its GREASE)."""


def make_hello(sni: str | None, alpn: tuple[str, ...], types: tuple[int, ...], legacy_version: int,
               key_shares: tuple[int, ...], ech: bool) -> ClientHello:
    """A ClientHello with the facts derived from what was parsed: the one place the parsers
    build one (with tuple.__new__: the NamedTuple's own __new__ is a Python function that
    costs several times as much)."""
    pq_group = None
    for group in key_shares:
        if group in PQ_GROUPS:
            pq_group = PQ_GROUPS[group]
            break
    return _new_tuple(ClientHello, (sni, alpn, types, legacy_version, key_shares, pq_group, ech))


def like(hello: ClientHello, sni: str | None, alpn: tuple[str, ...]) -> ClientHello:
    """A hello laid out as ``hello`` (the same version, extensions, lengths and key share
    groups) with its own name and ALPN list."""
    return _new_tuple(ClientHello, (sni, alpn, hello[2], hello[3], hello[4], hello[5], hello[6]))


_new_tuple = tuple.__new__


#: A proxy sees the same few names all day: remember how each raw SNI normalises.
_SNI_CACHE: dict[bytes, str | None] = {}
_SNI_CACHE_SIZE = 1024


def pull_server_name(buf: Buffer) -> str | None:
    """ServerNameList (RFC 6066 section 3): exactly one host_name entry."""
    sni = None
    seen = False
    with buf.pull_block(2) as length:
        if length == 0:
            raise BadHello("empty server_name list")
        while not buf.eof():
            name_type = buf.pull_uint8()
            with buf.pull_block(2) as n:
                if name_type != NameType.HOST_NAME:
                    raise BadHello(f"unknown server name type {name_type}")
                if n == 0 or seen:
                    raise BadHello("empty or repeated host_name")
                seen = True
                sni = normalized_sni(buf.pull_bytes(n))
    return sni


def normalized_sni(raw: bytes) -> str | None:
    """A raw host_name as routed on (``normalize_host``), None if invalid; remembered, bounded."""
    if raw in _SNI_CACHE:
        return _SNI_CACHE[raw]
    try:
        sni = normalize_host(raw.decode("ascii"))
    except UnicodeDecodeError:
        sni = None
    if len(_SNI_CACHE) >= _SNI_CACHE_SIZE:  # keys are client-chosen: bounded
        _SNI_CACHE.clear()
    _SNI_CACHE[raw] = sni
    return sni


def pull_alpn(buf: Buffer) -> tuple[str, ...]:
    """ProtocolNameList (RFC 7301 section 3.1)."""
    protocols: list[str] = []
    with buf.pull_block(2) as length:
        if length == 0:
            raise BadHello("empty ALPN list")
        while not buf.eof():
            if len(protocols) == MAX_ALPN:
                raise OverLimit(HelloLimit.ALPN, f"more than {MAX_ALPN} ALPN protocol names")
            with buf.pull_block(1) as n:
                if n == 0:
                    raise BadHello("empty ALPN protocol name")
                protocols.append(buf.pull_bytes(n).decode("latin-1"))
    return tuple(protocols)


def pull_key_share(buf: Buffer) -> tuple[int, ...]:
    """KeyShareClientHello (RFC 8446 section 4.2.8): the groups, keys skipped."""
    groups: list[int] = []
    with buf.pull_block(2):
        while not buf.eof():
            if len(groups) == MAX_KEY_SHARES:
                raise OverLimit(HelloLimit.KEY_SHARES, f"more than {MAX_KEY_SHARES} key shares")
            groups.append(buf.pull_uint16())
            with buf.pull_block(2) as n:
                if n == 0:
                    raise BadHello("empty key_exchange in key_share")
                buf.skip(n)
    return tuple(groups)


def pull_client_hello(buf: Buffer) -> ClientHello:
    legacy_version = buf.pull_uint16()
    if legacy_version >> 8 != 3:
        raise BadHello(f"legacy_version {legacy_version:#06x}")
    buf.skip(32)  # random
    with buf.pull_block(1) as n:
        if n > 32:
            raise BadHello("legacy_session_id longer than 32 bytes")
        buf.skip(n)
    with buf.pull_block(2) as n:
        if n == 0 or n % 2:
            raise BadHello("bad cipher_suites length")
        buf.skip(n)
    with buf.pull_block(1) as n:
        if n == 0:
            raise BadHello("no compression methods")
        buf.skip(n)
    sni: str | None = None
    alpn: tuple[str, ...] = ()
    key_shares: tuple[int, ...] = ()
    types: list[int] = []
    if not buf.eof():  # extensions may be absent before TLS 1.3
        with buf.pull_block(2):
            # The hot loop of the proxy's per-connection work (a hello has ~15-20
            # extensions): plain offsets here, a Buffer only for the two we parse.
            data, pos, end = buf.data, buf.pos, buf.end
            while pos < end:
                if end - pos < 4:
                    raise BadHello("truncated extension header")
                ext_type = (data[pos] << 8) | data[pos + 1]
                n = (data[pos + 2] << 8) | data[pos + 3]
                pos += 4
                if n > end - pos:
                    raise BadHello(f"extension {ext_type} overruns the extensions block")
                if len(types) == MAX_EXTENSIONS:
                    raise OverLimit(HelloLimit.EXTENSIONS, f"more than {MAX_EXTENSIONS} extensions")
                types.append(ext_type)
                if ext_type in _PARSED:
                    sub = Buffer(data, pos, pos + n)
                    if ext_type == EXT_SERVER_NAME:
                        sni = pull_server_name(sub)
                    elif ext_type == EXT_ALPN:
                        alpn = pull_alpn(sub)
                    else:
                        key_shares = pull_key_share(sub)
                    if not sub.eof():
                        raise BadHello(f"extension {ext_type} not consumed exactly")
                pos += n
            buf.pos = pos
        if len(set(types)) != len(types):
            raise BadHello("duplicate extension")
    return make_hello(sni, alpn, tuple(types), legacy_version, key_shares, EXT_ECH in types)


def parse_client_hello(message: bytes | memoryview) -> ClientHello:
    """Parse a ClientHello handshake body (without its 4-byte handshake header)."""
    return _parse_body(Buffer(bytes(message)))


def _parse_body(buf: Buffer) -> ClientHello:
    try:
        hello = pull_client_hello(buf)
    except WireError as exc:
        raise BadHello(str(exc)) from None
    if not buf.eof():
        raise BadHello("trailing bytes after extensions")
    return hello


#: The members the parsers compare with, as plain ints (here and in fasthello): an IntEnum
#: member costs an attribute lookup through the enum machinery at every comparison.
RECORD_HANDSHAKE = int(ContentType.HANDSHAKE)
MSG_CLIENT_HELLO = int(HandshakeType.CLIENT_HELLO)
EXT_ECH = int(ExtensionType.ENCRYPTED_CLIENT_HELLO)
EXT_SERVER_NAME = int(ExtensionType.SERVER_NAME)
EXT_ALPN = int(ExtensionType.APPLICATION_LAYER_PROTOCOL_NEGOTIATION)
EXT_KEY_SHARE = int(ExtensionType.KEY_SHARE)
NAME_HOST = int(NameType.HOST_NAME)
_PARSED = frozenset({EXT_SERVER_NAME, EXT_ALPN, EXT_KEY_SHARE})




class HelloReader:
    """Reassembles a ClientHello from TLS records fed in arbitrary chunks.

    ``feed`` returns the ``ClientHello``, ``NEED_DATA``, or raises ``NotTLS``/``BadHello``.
    Buffering is bounded: the message is capped at ``MAX_HELLO`` and ``MAX_RECORDS``, and
    records are checked as their headers arrive, so a hostile length is refused before its
    bytes are. What it holds is the bytes received and nothing more: the message is joined
    from the records' payloads once, when it is complete.
    """

    __slots__ = ("received", "records", "_pos", "_spans", "_payload", "_length")

    @property
    def consumed(self) -> int:
        """Bytes of the complete records read so far: the hello's size once it is complete."""
        return self._pos

    @property
    def missing(self) -> int:
        """Bytes that must still arrive before ``feed`` can get any further: the rest of the
        next record's header, or of the record it announces (a lower bound on what the hello
        still needs, so a reader may wait for this many without risk of waiting forever)."""
        received, pos = self.received, self._pos
        have = len(received) - pos
        if have < RECORD_HEADER:
            return RECORD_HEADER - have
        return RECORD_HEADER + ((received[pos + 3] << 8) | received[pos + 4]) - have

    def __init__(self) -> None:
        self.received = bytearray()
        """Every byte fed so far, to be forwarded unchanged."""
        self.records = 0
        """Complete TLS records the hello has taken so far."""
        self._pos = 0  # offset of the next record header in ``received``
        self._spans: list[tuple[int, int]] = []  # (start, end) of each complete record's payload
        self._payload = 0  # bytes in those payloads
        self._length = -1  # handshake body length, once known

    def feed(self, data: bytes) -> ClientHello | NeedData:
        received = self.received
        received += data
        if len(received) < RECORD_HEADER:
            # Refuse HTTP, SSH and the like on their first bytes, not after the timeout.
            if received[:1] and received[0] != ContentType.HANDSHAKE:
                raise NotTLS(f"first byte {received[0]:#04x} is not a TLS handshake record")
            if len(received) > 1 and received[1] != 3:
                raise NotTLS("record version major is not 3")
        while True:
            pos = self._pos
            if len(received) - pos < RECORD_HEADER:
                return NEED_DATA
            content_type, major, minor, hi, lo = received[pos : pos + RECORD_HEADER]
            if content_type != ContentType.HANDSHAKE:
                if pos == 0:
                    raise NotTLS(f"first byte {content_type:#04x} is not a TLS handshake record")
                raise BadHello(f"record type {content_type} inside the ClientHello")
            if major != 3 or minor > 4:
                raise NotTLS(f"record version {major}.{minor}")
            length = (hi << 8) | lo
            if length == 0 or length > MAX_RECORD:
                raise BadHello(f"record length {length}")
            if self.records == MAX_RECORDS:
                raise OverLimit(HelloLimit.RECORDS, f"ClientHello in more than {MAX_RECORDS} records")
            start, end = pos + RECORD_HEADER, pos + RECORD_HEADER + length
            if len(received) < end:
                if self._length < 0 and not self._spans:
                    self._check_header(received[start : start + 4])
                return NEED_DATA
            self._pos = end
            self.records += 1
            self._spans.append((start, end))
            self._payload += length
            if self._length < 0 and self._payload >= 4:
                self._length = self._check_header(self._joined(4))
            if self._length >= 0 and self._payload >= 4 + self._length:
                if self._payload > 4 + self._length:
                    raise BadHello("handshake data after the ClientHello")
                return parse_client_hello(memoryview(self._joined(self._payload))[4:])

    def _joined(self, n: int) -> bytes:
        """The first ``n`` bytes of the records' payloads, joined."""
        received = self.received
        parts = []
        for start, end in self._spans:
            parts.append(received[start : min(end, start + n)])
            n -= end - start
            if n <= 0:
                break
        return b"".join(parts)

    @staticmethod
    def _check_header(head: bytes | bytearray) -> int:
        """Check the handshake header as soon as its bytes arrive; -1 if not all here yet."""
        if head[:1] and head[0] != HandshakeType.CLIENT_HELLO:
            raise BadHello(f"handshake type {head[0]} is not ClientHello")
        if len(head) < 4:
            return -1
        length = (head[1] << 16) | (head[2] << 8) | head[3]
        if length > MAX_HELLO:
            raise OverLimit(HelloLimit.SIZE, f"ClientHello of {length} bytes exceeds {MAX_HELLO}")
        return length
