"""PROXY protocol v1 and v2 header parsing, sans I/O.

A load balancer in front of sniproxy (an AWS NLB, HAProxy) may prepend a PROXY header
naming the real client. ``parse`` takes the bytes received so far and returns a
``ProxyHeader``, or ``NEED_DATA`` when the header is not complete yet; bad input raises
``ProxyProtocolError``. The bytes after ``length_consumed`` are the TLS ClientHello and
belong to the caller, untouched.

Spec: https://www.haproxy.org/download/2.9/doc/proxy-protocol.txt
"""

import enum
import ipaddress
import struct
from dataclasses import dataclass

from ..errors import SniproxyError
from ..reasons import Refusal
from .wire import NEED_DATA, NeedData


class ProxyProtocolError(SniproxyError):
    """The connection's first bytes are not a valid PROXY protocol header."""

    reason = Refusal.BAD_PROXY_HEADER




class Command(enum.IntEnum):
    LOCAL = 0x0  # a health check by the balancer itself: use the real peer address
    PROXY = 0x1


class Family(enum.IntEnum):
    UNSPEC = 0x0
    INET = 0x1
    INET6 = 0x2
    UNIX = 0x3


class Transport(enum.IntEnum):
    UNSPEC = 0x0
    STREAM = 0x1
    DGRAM = 0x2


V1_PREFIX = b"PROXY "
V1_MAX_LENGTH = 107  # the spec's worst case, "PROXY UNKNOWN ffff:...:ffff ... 65535 65535\r\n"
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_HEADER = struct.Struct("!12sBBH")  # signature, version|command, family|transport, length
# The address block is at most 216 bytes (AF_UNIX); the rest is TLVs. AWS NLB adds a
# VPC endpoint id (~30 bytes) and HAProxy at most a few hundred (unique id, SSL info),
# so 2048 bytes of payload is generous while bounding what we buffer before TLS starts.
V2_MAX_PAYLOAD = 2048
V2_MAX_LENGTH = V2_HEADER.size + V2_MAX_PAYLOAD

# (family, transport) -> (address block size, ip address class) for the pairs we accept
# with the PROXY command. UNSPEC and UNIX carry no usable TCP endpoint: source is None.
_V2_ADDRESSES = {
    (Family.INET, Transport.STREAM): (12, ipaddress.IPv4Address),
    (Family.INET6, Transport.STREAM): (36, ipaddress.IPv6Address),
    (Family.UNIX, Transport.STREAM): (216, None),
    (Family.UNSPEC, Transport.UNSPEC): (0, None),
}
_V1_ADDRESSES = {b"TCP4": ipaddress.IPv4Address, b"TCP6": ipaddress.IPv6Address}

Endpoint = tuple[str, int]


@dataclass(frozen=True, slots=True)
class ProxyHeader:
    source: Endpoint | None
    """The real client (ip, port); None means use the connection's own peer address."""
    dest: Endpoint | None
    """The address the client connected to, as the balancer saw it; None if unknown."""
    length_consumed: int
    """Bytes of the buffer taken by the header; what follows is the client's stream."""
    version: int
    """1 (text) or 2 (binary)."""
    command: Command
    """LOCAL (balancer health check) or PROXY."""
    tlvs: tuple[tuple[int, bytes], ...] = ()
    """v2 type-length-value extensions, as (type, value), unparsed."""


def looks_like_proxy(buf: bytes) -> bool:
    """Cheap first check: could ``buf`` be the start of a PROXY header?

    False means certainly not (a TLS record starts with 0x16, matching neither signature).
    An empty buffer returns True: nothing rules it out yet.
    """
    head = bytes(buf[: len(V2_SIGNATURE)])
    return head.startswith(V1_PREFIX) or V1_PREFIX.startswith(head) or V2_SIGNATURE.startswith(head)


def parse(buf: bytes) -> ProxyHeader | NeedData:
    """Parse a PROXY v1 or v2 header at the start of ``buf``."""
    head = bytes(buf[: len(V2_SIGNATURE)])
    if head.startswith(V1_PREFIX):
        return _parse_v1(buf)
    if head == V2_SIGNATURE:
        return _parse_v2(buf)
    if V1_PREFIX.startswith(head) or V2_SIGNATURE.startswith(head):
        return NEED_DATA
    raise ProxyProtocolError("no PROXY protocol signature")


def _parse_v1(buf: bytes) -> ProxyHeader | NeedData:
    window = bytes(buf[:V1_MAX_LENGTH])
    end = window.find(b"\r\n")
    if end < 0:
        if b"\n" in window or b"\r" in window[:-1]:
            raise ProxyProtocolError("PROXY v1 line has a stray CR or LF")
        if len(window) >= V1_MAX_LENGTH:
            raise ProxyProtocolError(f"PROXY v1 line longer than {V1_MAX_LENGTH} bytes")
        return NEED_DATA
    line = window[:end]
    consumed = end + 2
    fields = line.split(b" ")
    if fields[1:2] == [b"UNKNOWN"]:
        # The spec says to ignore the rest of an UNKNOWN line and use the real peer.
        return ProxyHeader(None, None, consumed, 1, Command.PROXY)
    if len(fields) != 6:
        raise ProxyProtocolError("PROXY v1 line must have 6 space-separated fields")
    _, proto, src, dst, sport, dport = fields
    address_class = _V1_ADDRESSES.get(proto)
    if address_class is None:
        raise ProxyProtocolError("PROXY v1 protocol must be TCP4, TCP6 or UNKNOWN")
    source = (_v1_address(src, address_class), _v1_port(sport))
    dest = (_v1_address(dst, address_class), _v1_port(dport))
    return ProxyHeader(source, dest, consumed, 1, Command.PROXY)


def _v1_address(field: bytes, address_class) -> str:
    # ipaddress accepts IPv6 scope ids ("fe80::1%eth0"); the spec's grammar does not.
    try:
        if not field.isascii() or b"%" in field:
            raise ValueError
        return str(address_class(field.decode("ascii")))
    except ValueError:
        raise ProxyProtocolError("PROXY v1 address is not a valid IP address") from None


def _v1_port(field: bytes) -> int:
    if not (field.isdigit() and len(field) <= 5):
        raise ProxyProtocolError("PROXY v1 port is not a decimal number")
    if len(field) > 1 and field.startswith(b"0"):
        raise ProxyProtocolError("PROXY v1 port has a leading zero")
    port = int(field)
    if port > 65535:
        raise ProxyProtocolError("PROXY v1 port is above 65535")
    return port


def _parse_v2(buf: bytes) -> ProxyHeader | NeedData:
    if len(buf) < V2_HEADER.size:
        return NEED_DATA
    _, version_command, family_transport, length = V2_HEADER.unpack_from(buf)
    if version_command >> 4 != 2:
        raise ProxyProtocolError("PROXY v2 header has an unknown version")
    try:
        command = Command(version_command & 0x0F)
    except ValueError:
        raise ProxyProtocolError("PROXY v2 header has an unknown command") from None
    if length > V2_MAX_PAYLOAD:
        raise ProxyProtocolError(f"PROXY v2 header longer than {V2_MAX_LENGTH} bytes")
    consumed = V2_HEADER.size + length
    if len(buf) < consumed:
        return NEED_DATA
    payload = bytes(buf[V2_HEADER.size : consumed])
    if command is Command.LOCAL:
        # The balancer speaks for itself (a health check): the spec says to discard the
        # whole block, whatever family it claims, and use the real connection endpoints.
        return ProxyHeader(None, None, consumed, 2, command)
    known = _V2_ADDRESSES.get((family_transport >> 4, family_transport & 0x0F))
    if known is None:
        raise ProxyProtocolError("PROXY v2 address family/transport is not TCP")
    address_size, address_class = known
    if length < address_size:
        raise ProxyProtocolError("PROXY v2 header too short for its address family")
    tlvs = _v2_tlvs(payload, address_size)
    if address_class is None:
        return ProxyHeader(None, None, consumed, 2, command, tlvs)
    n = address_size // 2 - 2
    src = str(address_class(payload[:n]))
    dst = str(address_class(payload[n : 2 * n]))
    sport, dport = struct.unpack_from("!HH", payload, 2 * n)
    return ProxyHeader((src, sport), (dst, dport), consumed, 2, command, tlvs)


def _v2_tlvs(payload: bytes, start: int) -> tuple[tuple[int, bytes], ...]:
    tlvs = []
    pos = start
    while pos < len(payload):
        if pos + 3 > len(payload):
            raise ProxyProtocolError("PROXY v2 TLV header is truncated")
        kind, size = struct.unpack_from("!BH", payload, pos)
        pos += 3
        if pos + size > len(payload):
            raise ProxyProtocolError("PROXY v2 TLV runs past the header")
        tlvs.append((kind, payload[pos : pos + size]))
        pos += size
    return tuple(tlvs)
