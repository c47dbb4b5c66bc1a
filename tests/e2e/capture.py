"""What a client's ClientHello looked like on the wire, seen from the proxy's side of a veth.

A packet socket (AF_PACKET) is opened inside the server namespace and bound to the veth end
facing one client namespace; a thread reads it, with the kernel's receive time of each frame
(SO_TIMESTAMPNS), while the client runs. Afterwards `client_hello` finds the client's first
connection to a port, puts its bytes back in sequence order, and reads the TLS records of
the ClientHello from them: how many bytes, records and TCP segments it took, how far apart
the segments arrived, and which key-share groups and extensions it offered.

This is the suite's own evidence, independent of what the proxy logs about the same hello.
No tcpdump: one socket and a small parser, stopped with the `with` block.
"""

from __future__ import annotations

import socket
import struct
import threading
from dataclasses import dataclass, field

from .netns import Namespace

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
SO_TIMESTAMPNS = 35  # also the SCM_ type of its control message
TCP_SYN = 0x02
HANDSHAKE = 22
CLIENT_HELLO = 1
EXT_SERVER_NAME = 0x0000
EXT_KEY_SHARE = 0x0033
EXT_ECH = 0xFE0D
X25519MLKEM768 = 0x11EC


def is_grease(value: int) -> bool:
    """RFC 8701: 0x0A0A, 0x1A1A, ... 0xFAFA."""
    return value & 0x0F0F == 0x0A0A and value >> 8 == value & 0xFF


@dataclass(frozen=True)
class Frame:
    time: float
    src: tuple[str, int]
    dst: tuple[str, int]
    seq: int
    flags: int
    payload: bytes


@dataclass(frozen=True)
class Hello:
    size: int  # bytes of the TLS records that carried the ClientHello, headers included
    records: int
    segments: int  # TCP segments (frames as the receiver saw them) holding hello bytes
    arrivals: tuple[float, ...]  # receive times of those segments, from the first, in order
    groups: tuple[int, ...]  # key-share groups offered, in order
    extensions: tuple[int, ...]
    sni: str | None

    @property
    def spread_ms(self) -> float:
        return 1000 * self.arrivals[-1] if self.arrivals else 0.0


def _parse_frame(data: bytes, stamp: float) -> Frame | None:
    if len(data) < 14 + 20 or struct.unpack_from("!H", data, 12)[0] != ETH_P_IP:
        return None
    ip = data[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    if ip[9] != socket.IPPROTO_TCP or len(ip) < ihl + 20:
        return None
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    sport, dport, seq = struct.unpack_from("!HHI", ip, ihl)
    offset = (ip[ihl + 12] >> 4) * 4
    flags = ip[ihl + 13]
    # a GSO frame can carry a zero total length; then the frame's end is the packet's
    end = total if total else len(ip)
    return Frame(stamp, (src, sport), (dst, dport), seq, flags, bytes(ip[ihl + offset:end]))


@dataclass
class Capture:
    """Frames seen on `ifname` in `ns` while the `with` block runs."""

    ns: Namespace
    ifname: str
    frames: list[Frame] = field(default_factory=list)
    _sock: socket.socket | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> Capture:
        def open_socket() -> socket.socket:
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
            sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
            sock.bind((self.ifname, ETH_P_ALL))
            sock.settimeout(0.1)
            return sock
        # A socket belongs to the namespace it was made in, whichever thread reads it.
        self._sock = self.ns.call(open_socket)
        self._thread = threading.Thread(target=self._read, name=f"capture-{self.ifname}",
                                        daemon=True)
        self._thread.start()
        return self

    def _read(self) -> None:
        assert self._sock is not None
        while not self._stop.is_set():
            try:
                data, ancillary, _, _ = self._sock.recvmsg(65536, 64)
            except TimeoutError:
                continue
            stamp = 0.0
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    seconds, nanos = struct.unpack("qq", value[:16])
                    stamp = seconds + nanos / 1e9
            frame = _parse_frame(data, stamp)
            if frame is not None:
                self.frames.append(frame)

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._sock is not None:
            self._sock.close()

    def client_hello(self, client: str, server: tuple[str, int]) -> Hello:
        """The ClientHello of `client`'s first connection to `server` in this capture."""
        syns = [f for f in self.frames
                if f.src[0] == client and f.dst == server and f.flags & TCP_SYN]
        assert syns, f"no SYN from {client} to {server} among {len(self.frames)} frames"
        port, isn = syns[0].src, syns[0].seq + 1
        stream = bytearray()
        carriers: list[tuple[int, float]] = []  # (stream offset, time) of new bytes
        def offset(frame: Frame) -> int:
            return (frame.seq - isn) & 0xFFFFFFFF
        for frame in sorted((f for f in self.frames if f.src == port and f.dst == server
                             and f.payload), key=lambda f: (offset(f), f.time)):
            start = offset(frame)
            if start > len(stream) or start + len(frame.payload) <= len(stream):
                continue  # a gap (never seen) or a retransmission of bytes we have
            carriers.append((len(stream), frame.time))
            stream += frame.payload[len(stream) - start:]
        size, records, message = _hello_records(bytes(stream))
        used = sorted(t for at, t in carriers if at < size)
        groups, extensions, sni = _hello_fields(message)
        return Hello(size, records, len(used), tuple(t - used[0] for t in used),
                     groups, extensions, sni)


def _hello_records(stream: bytes) -> tuple[int, int, bytes]:
    """(record bytes, record count, handshake message) of the ClientHello at the stream's start."""
    pos, records, message = 0, 0, b""
    while len(message) < 4 or len(message) < 4 + int.from_bytes(message[1:4], "big"):
        assert len(stream) >= pos + 5, f"the capture holds {len(stream)} bytes of a partial hello"
        kind, _, length = struct.unpack_from("!BHH", stream, pos)
        assert kind == HANDSHAKE, f"record {records} is of type {kind}, not handshake"
        message += stream[pos + 5:pos + 5 + length]
        pos += 5 + length
        records += 1
    assert message[0] == CLIENT_HELLO, f"first handshake message is of type {message[0]}"
    return pos, records, message[:4 + int.from_bytes(message[1:4], "big")]


def _hello_fields(message: bytes) -> tuple[tuple[int, ...], tuple[int, ...], str | None]:
    """Key-share groups, extension types and server name of a ClientHello message."""
    pos = 4 + 2 + 32  # header, legacy_version, random
    pos += 1 + message[pos]  # legacy_session_id
    pos += 2 + int.from_bytes(message[pos:pos + 2], "big")  # cipher_suites
    pos += 1 + message[pos]  # legacy_compression_methods
    end = pos + 2 + int.from_bytes(message[pos:pos + 2], "big")
    pos += 2
    groups, extensions, sni = [], [], None
    while pos < end:
        kind, length = struct.unpack_from("!HH", message, pos)
        body = message[pos + 4:pos + 4 + length]
        extensions.append(kind)
        if kind == EXT_KEY_SHARE:
            at = 2
            while at < len(body):
                group, size = struct.unpack_from("!HH", body, at)
                groups.append(group)
                at += 4 + size
        elif kind == EXT_SERVER_NAME and len(body) > 5:
            sni = body[5:5 + int.from_bytes(body[3:5], "big")].decode("ascii")
        pos += 4 + length
    return tuple(groups), tuple(extensions), sni
