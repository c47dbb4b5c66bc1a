"""Generate the two ClientHello byte strings the benchmark sends (run once; output is committed).

hello-normal.bin: what Python's ssl (OpenSSL 3) sends for SNI bench.example.com, 517 bytes.
hello-pq.bin:     the same hello grown into the shape of a post-quantum browser hello: an
                  X25519MLKEM768 (group 0x11ec) key share of 1216 bytes in front of the x25519
                  one and 0x11ec first in supported_groups; everything else (padding extension
                  included) kept as captured. About 1.74 KB, so it needs 2 TCP segments on a
                  1500-byte MTU path (MSS 1448); the load generator sends it in 2 writes.

hello-chrome.bin: a Chrome-shaped 517-byte hello, made from tests/fixtures/chromium_pq.bin (a
                  real Chromium 156 capture): SNI set to bench.example.com, the X25519MLKEM768
                  share and group, the ECH GREASE (0xfe0d) and trust_anchors (0xca34) dropped,
                  so it looks like a Chrome hello before post-quantum key shares and ECH GREASE
                  (GREASE values, ALPS, compress_certificate, 16 cipher suites, 32-byte session
                  id), then padded as BoringSSL pads (extension 21) to a 512-byte handshake
                  message: 517 bytes in one record, like Python's but with Chrome's extensions.

Usage: python bench/gen_hellos.py [OUTDIR]          (default: bench/hellos; all three)
       python bench/gen_hellos.py --chrome [OUTDIR]  (hello-chrome.bin only: deterministic)
"""

import random
import ssl
import struct
import sys
from pathlib import Path

SNI = "bench.example.com"
X25519MLKEM768 = 0x11EC
MLKEM_SHARE_LEN = 1216  # 1184-byte ML-KEM-768 encapsulation key + 32-byte X25519 share
EXT_SUPPORTED_GROUPS = 10
EXT_KEY_SHARE = 51
EXT_SERVER_NAME = 0
EXT_PADDING = 21
EXT_ECH = 0xFE0D
EXT_TRUST_ANCHORS = 0xCA34
CHROME_FIXTURE = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "chromium_pq.bin"


def capture_python_hello(sni: str) -> bytes:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        tls.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


def split_hello(record: bytes):
    """Return (head, extensions) where head is the ClientHello body up to the extensions block."""
    if record[0] != 22 or record[5] != 1:
        raise ValueError("not a handshake record carrying a ClientHello")
    rec_len = struct.unpack(">H", record[3:5])[0]
    if rec_len != len(record) - 5:
        raise ValueError("expected exactly one TLS record")
    body = record[9:]
    pos = 2 + 32  # legacy_version, random
    pos += 1 + body[pos]  # session id
    pos += 2 + struct.unpack(">H", body[pos:pos + 2])[0]  # cipher suites
    pos += 1 + body[pos]  # compression methods
    ext_len = struct.unpack(">H", body[pos:pos + 2])[0]
    head, ext_block = body[:pos], body[pos + 2:pos + 2 + ext_len]
    exts, i = [], 0
    while i < len(ext_block):
        etype, elen = struct.unpack(">HH", ext_block[i:i + 4])
        exts.append((etype, ext_block[i + 4:i + 4 + elen]))
        i += 4 + elen
    return head, exts


def join_hello(head: bytes, exts) -> bytes:
    ext_block = b"".join(struct.pack(">HH", t, len(d)) + d for t, d in exts)
    body = head + struct.pack(">H", len(ext_block)) + ext_block
    handshake = b"\x01" + struct.pack(">I", len(body))[1:] + body
    return b"\x16\x03\x01" + struct.pack(">H", len(handshake)) + handshake


def make_pq(record: bytes, rng: random.Random) -> bytes:
    head, exts = split_hello(record)
    out = []
    for etype, data in exts:
        if etype == EXT_SUPPORTED_GROUPS:
            groups = data[2:]
            groups = struct.pack(">H", X25519MLKEM768) + groups
            data = struct.pack(">H", len(groups)) + groups
        elif etype == EXT_KEY_SHARE:
            shares = data[2:]
            share = bytes(rng.getrandbits(8) for _ in range(MLKEM_SHARE_LEN))
            shares = struct.pack(">HH", X25519MLKEM768, len(share)) + share + shares
            data = struct.pack(">H", len(shares)) + shares
        out.append((etype, data))
    return join_hello(head, out)


def make_chrome(record: bytes, sni: str = SNI) -> bytes:
    """A Chromium capture turned into a classic (pre-PQ, pre-ECH) Chrome hello of 517 bytes."""
    head, exts = split_hello(record)
    out = []
    for etype, data in exts:
        if etype in (EXT_ECH, EXT_TRUST_ANCHORS):
            continue
        if etype == EXT_KEY_SHARE:
            shares, i, keep = data[2:], 0, b""
            while i < len(shares):
                group, n = struct.unpack(">HH", shares[i:i + 4])
                if group != X25519MLKEM768:
                    keep += shares[i:i + 4 + n]
                i += 4 + n
            data = struct.pack(">H", len(keep)) + keep
        elif etype == EXT_SUPPORTED_GROUPS:
            groups = [data[i:i + 2] for i in range(2, len(data), 2)]
            groups = [g for g in groups if g != struct.pack(">H", X25519MLKEM768)]
            data = struct.pack(">H", 2 * len(groups)) + b"".join(groups)
        elif etype == EXT_SERVER_NAME:
            name = sni.encode()
            data = struct.pack(">HBH", len(name) + 3, 0, len(name)) + name
        out.append((etype, data))
    # BoringSSL pads a handshake message of 256-511 bytes to 512 (after the last GREASE)
    unpadded = len(join_hello(head, out)) - 5
    if not 0xFF < unpadded + 4 <= 0x200:
        raise ValueError(f"unpadded hello of {unpadded} bytes cannot be padded to 512")
    out.append((EXT_PADDING, bytes(0x200 - unpadded - 4)))
    return join_hello(head, out)


def main() -> int:
    args = sys.argv[1:]
    chrome_only = "--chrome" in args
    args = [a for a in args if a != "--chrome"]
    outdir = Path(args[0] if args else Path(__file__).parent / "hellos")
    outdir.mkdir(parents=True, exist_ok=True)
    chrome = make_chrome(CHROME_FIXTURE.read_bytes())
    split_hello(chrome)
    (outdir / "hello-chrome.bin").write_bytes(chrome)
    print(f"hello-chrome.bin {len(chrome)} B, SNI {SNI}")
    if chrome_only:
        return 0
    normal = capture_python_hello(SNI)
    head, exts = split_hello(normal)  # validates the capture
    pq = make_pq(normal, random.Random(0x11EC))
    split_hello(pq)  # validates our lengths
    (outdir / "hello-normal.bin").write_bytes(normal)
    (outdir / "hello-pq.bin").write_bytes(pq)
    print(f"hello-normal.bin {len(normal)} B, hello-pq.bin {len(pq)} B, SNI {SNI}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
