"""The common case of a ClientHello, fast: one record holding one whole hello, read at once.

``parse_single_record`` returns the ``ClientHello`` that ``tls.HelloReader`` would return for
the same bytes, or None wherever anything is unusual, valid or not (the caller then feeds a
``HelloReader``, which makes every check and gives every error). tests/protocol/ holds the
two to agreement on every input.

It is the largest part of a connection's user-space work, and the part that grows with the
hello: a hello has 10 to 20 extensions, and walking them in Python costs about 1,700 machine
instructions each. Two ways down:

* **The walk** does per extension only what it must: one ``struct`` call for the type and
  length, and the type's offset kept in a dict (whose size also finds a duplicate). Lengths
  are checked once, at the end: every step moves forward, so a length that overruns anywhere
  leaves the walk past the end of its block, and a read past the data raises, which declines.
* **Layouts.** A client stack sends the same layout on every connection: the same extensions
  in the same order with the same lengths; only the random, the keys and the name's bytes
  differ. Once a walk has seen a layout twice (so a client that shuffles its extensions, as
  Chrome does, never costs a compile), it is compiled into one ``struct.Struct`` whose fields
  are the version and every length and type of the hello body (the key shares' groups and
  sizes too), with the opaque bytes skipped. A later hello whose record has that length is
  unpacked with it in one C call, and if every field equals the learned one, the hello has
  exactly the learned layout, which the walk validated: only the name and the ALPN list are
  read. Anything else walks, as if there were no layouts.
"""

from __future__ import annotations

import struct

from .tls import (
    EXT_ALPN,
    EXT_ECH,
    EXT_KEY_SHARE,
    EXT_SERVER_NAME,
    MAX_ALPN,
    MAX_EXTENSIONS,
    MAX_KEY_SHARES,
    MAX_RECORD,
    MSG_CLIENT_HELLO,
    NAME_HOST,
    RECORD_HANDSHAKE,
    RECORD_HEADER,
    ClientHello,
    like,
    make_hello,
    normalized_sni,
)

#: Big-endian fields at an offset, each group in one C call: the record and handshake headers
#: (type, version major and minor, length; type, 24-bit length as 8 + 16 bits); two 16-bit
#: fields (an extension's type and length, a key share's group and length); a server_name
#: extension's length, list length, name type and name length.
_HEADERS = struct.Struct(">BBBHBBH").unpack_from
_U16_PAIR = struct.Struct(">HH").unpack_from
_U16 = struct.Struct(">H").unpack_from
_SNI_HEADER = struct.Struct(">HHBH").unpack_from
#: Where the ClientHello body starts in a record: after the record and handshake headers.
_BODY = RECORD_HEADER + 4
#: Loops bounded by count (an else after the last round means one more than allowed).
_EXTENSION_ROUNDS = range(MAX_EXTENSIONS + 1)
_ALPN_ROUNDS = range(MAX_ALPN + 1)
_KEY_SHARE_ROUNDS = range(MAX_KEY_SHARES + 1)

#: ALPN lists already parsed, by their bytes: a client sends the same list every time.
_ALPN_CACHE: dict[bytes, tuple[str, ...]] = {}
_ALPN_CACHE_SIZE = 256
#: Layouts compiled, and the last layout walked, each by the length of its record: keys and
#: contents are client-chosen, so both are bounded (and cleared when full).
LAYOUTS_MAX = 32
#: A compile costs about a walk and a half (94k instructions against 65k for an 18-extension
#: hello): at most one per this many walks, so a client sending every new layout twice (to
#: have each compiled) still costs about one walk per hello (bench/abuse.py: 1.2x a normal one).
WALKS_PER_COMPILE = 16


class Layout:
    """A hello's layout (its body from the version on), learned from one the walk accepted."""

    __slots__ = ("unpack", "fields", "sni", "alpn", "hello")

    def __init__(self, fmt: str, fields: tuple[int, ...], sni: tuple[int, int] | None,
                 alpn: tuple[int, int] | None, hello: ClientHello):
        self.unpack = struct.Struct(fmt).unpack_from
        self.fields = fields
        """What ``unpack`` gives for a hello of this layout."""
        self.sni = sni
        """Where the host name's bytes are in the record (start, end), if it has one."""
        self.alpn = alpn
        """Where the ALPN list's bytes are (the extension's body), if it has one."""
        self.hello = hello
        """The hello it was learned from: its extensions, key share groups and facts."""


class Layouts:
    """The layouts learned, by record length."""

    __slots__ = ("compiled", "walked", "walks")

    def __init__(self) -> None:
        self.compiled: dict[int, Layout] = {}
        self.walked: dict[int, tuple[object, ...]] = {}
        """The last layout walked for each length: a compile needs the same one twice in a row."""
        self.walks = WALKS_PER_COMPILE
        """Walks since the last compile."""

    def learn(self, d: bytes, start: int, end: int, at: dict[int, int], hello: ClientHello) -> None:
        """A hello walked: compile its layout if it was the last one walked at its length, and
        the compile budget allows."""
        self.walks += 1
        length = end - RECORD_HEADER
        walked = (start, *at.items())
        if self.walked.get(length) != walked:
            if len(self.walked) >= LAYOUTS_MAX:
                self.walked.clear()
            self.walked[length] = walked
        elif self.walks >= WALKS_PER_COMPILE:
            self.walks = 0
            if len(self.compiled) >= LAYOUTS_MAX:
                self.compiled.clear()
            self.compiled[length] = compile_layout(d, start, end, at, hello)

    def forget(self) -> None:
        self.compiled.clear()
        self.walked.clear()
        self.walks = WALKS_PER_COMPILE


layouts = Layouts()
_compiled = layouts.compiled


def parse_single_record(d: bytes) -> ClientHello | None:
    """The ClientHello in ``d``'s first record, if it is a whole one alone there (bytes after
    that record are the client's next data, forwarded as they are, as ``HelloReader`` does);
    None to have the caller feed a ``HelloReader``."""
    try:
        content_type, major, minor, length, hs_type, hs_hi, hs_lo = _HEADERS(d)
        if (content_type != RECORD_HANDSHAKE or major != 3 or minor > 4 or length > MAX_RECORD
                or RECORD_HEADER + length > len(d) or hs_type != MSG_CLIENT_HELLO or ((hs_hi << 16) | hs_lo) + 4 != length):
            return None  # not a handshake record, or the message spans records, or shares one
        layout = _compiled.get(length)
        if layout is None or layout.unpack(d, _BODY) != layout.fields:
            return _walk(d, RECORD_HEADER + length)
        # A hello proven to have ``layout``: only its name and ALPN list are its own.
        sni = None
        if layout.sni is not None:
            a, b = layout.sni
            sni = normalized_sni(d[a:b])
        alpn: tuple[str, ...] = ()
        if layout.alpn is not None:
            a, b = layout.alpn
            raw = d[a:b]
            names = _ALPN_CACHE.get(raw) or _alpn(raw)
            if names is None:
                return None
            alpn = names
        return like(layout.hello, sni, alpn)
    except (IndexError, struct.error):
        return None  # a length pointed past the data


def _walk(d: bytes, end: int) -> ClientHello | None:
    (legacy_version,) = _U16(d, _BODY)
    n = d[_BODY + 34]  # after version and random: the session id
    if legacy_version >> 8 != 3 or n > 32:
        return None
    pos = _BODY + 35 + n
    (n,) = _U16(d, pos)  # cipher suites
    if n == 0 or n & 1:
        return None
    pos += 2 + n
    n = d[pos]  # compression methods
    if n == 0:
        return None
    pos += 1 + n
    if pos >= end:  # no extensions (allowed before TLS 1.3), or an overrun
        return make_hello(None, (), (), legacy_version, (), False) if pos == end else None
    (n,) = _U16(d, pos)
    pos += 2
    if pos + n != end:
        return None  # the extensions block must end the message exactly
    start = pos
    at: dict[int, int] = {}  # extension type -> offset of its header
    for count in _EXTENSION_ROUNDS:  # noqa: B007 (read after the loop: the extensions walked)
        if pos >= end:
            break
        ext_type, n = _U16_PAIR(d, pos)
        at[ext_type] = pos
        pos += 4 + n
    else:
        return None  # more than MAX_EXTENSIONS
    if pos != end or len(at) != count:
        return None  # an extension overran the block, or one came twice
    sni = None
    p = at.get(EXT_SERVER_NAME)
    if p is not None:
        # ServerNameList with exactly one host_name entry, and nothing else.
        n, listed, name_type, size = _SNI_HEADER(d, p + 2)
        if listed + 2 != n or name_type != NAME_HOST or size == 0 or size + 5 != n:
            return None
        sni = normalized_sni(d[p + 9 : p + 4 + n])
    alpn: tuple[str, ...] = ()
    p = at.get(EXT_ALPN)
    if p is not None:
        (n,) = _U16(d, p + 2)
        raw = d[p + 4 : p + 4 + n]
        names = _ALPN_CACHE.get(raw) or _alpn(raw)
        if names is None:
            return None
        alpn = names
    key_shares: tuple[int, ...] = ()
    p = at.get(EXT_KEY_SHARE)
    if p is not None:
        n, listed = _U16_PAIR(d, p + 2)
        if listed + 2 != n:
            return None
        stop = p + 4 + n
        pos = p + 6
        groups: list[int] = []
        for _ in _KEY_SHARE_ROUNDS:
            if pos >= stop:
                break
            group, size = _U16_PAIR(d, pos)
            pos += 4 + size
            if size == 0 or pos > stop:
                return None
            groups.append(group)
        else:
            return None  # more than MAX_KEY_SHARES
        key_shares = tuple(groups)
    hello = make_hello(sni, alpn, tuple(at), legacy_version, key_shares, EXT_ECH in at)
    layouts.learn(d, start, end, at, hello)
    return hello


def compile_layout(d: bytes, start: int, end: int, at: dict[int, int], hello: ClientHello) -> Layout:
    """The layout of the hello in ``d`` (whole in one record ending at ``end``), which the
    walk accepted: its extensions block starts at ``start``, and ``at`` has each extension's
    type and header offset, in order. Every version, type and length from the hello's body on
    is a field and every other byte is skipped, except that the server_name's list and entry
    headers and the key shares' groups and sizes are fields too: a hello with these fields
    has exactly this structure."""
    session_id, ciphers = d[_BODY + 34], _U16(d, _BODY + 35 + d[_BODY + 34])[0]
    compression = d[_BODY + 37 + session_id + ciphers]
    fmt = [f">H32xB{session_id}xH{ciphers}xB{compression}xH"]
    fields = [hello.legacy_version, session_id, ciphers, compression, end - start]
    sni = alpn = None
    offsets = list(at.values()) + [end]
    for i, (ext_type, offset) in enumerate(at.items()):
        n = offsets[i + 1] - offset - 4
        fields += (ext_type, n)
        if ext_type == EXT_SERVER_NAME:  # list length, name type, name length, then the name
            fmt.append(f"HHHBH{n - 5}x")
            fields += (n - 2, NAME_HOST, n - 5)
            sni = (offset + 9, offset + 4 + n)
        elif ext_type == EXT_KEY_SHARE:  # list length, then each share's group, size and key
            fmt.append("HHH")
            fields.append(n - 2)
            pos, stop = offset + 6, offset + 4 + n
            while pos < stop:
                group, k = _U16_PAIR(d, pos)
                fmt.append(f"HH{k}x")
                fields += (group, k)
                pos += 4 + k
        else:
            fmt.append(f"HH{n}x")
            if ext_type == EXT_ALPN:
                alpn = (offset + 4, offset + 4 + n)
    return Layout("".join(fmt), tuple(fields), sni, alpn, hello)


def _alpn(raw: bytes) -> tuple[str, ...] | None:
    """A ProtocolNameList (the ALPN extension's body) as names, None where pull_alpn would
    raise; remembered (the caller looks there first), bounded."""
    n = len(raw)
    if n <= 2 or _U16(raw, 0)[0] + 2 != n:
        return None
    found: list[str] = []
    pos = 2
    for _ in _ALPN_ROUNDS:
        if pos >= n:
            break
        size = raw[pos]
        if size == 0 or pos + 1 + size > n:
            return None
        found.append(raw[pos + 1 : pos + 1 + size].decode("latin-1"))
        pos += 1 + size
    else:
        return None  # more than MAX_ALPN
    names = tuple(found)
    if len(_ALPN_CACHE) >= _ALPN_CACHE_SIZE:  # keys are client-chosen: bounded
        _ALPN_CACHE.clear()
    _ALPN_CACHE[raw] = names
    return names


def first_record_size(data: bytes) -> int:
    """Bytes of the first record, header included (a hello ``parse_single_record`` took)."""
    return RECORD_HEADER + ((data[3] << 8) | data[4])
