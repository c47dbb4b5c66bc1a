import os
import shutil
import socket
import struct
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sniproxy.errors import SniproxyError
from sniproxy.protocol.proxyproto import (
    NEED_DATA,
    V1_MAX_LENGTH,
    V2_MAX_LENGTH,
    V2_SIGNATURE,
    Command,
    ProxyHeader,
    ProxyProtocolError,
    looks_like_proxy,
    parse,
)

HELLO = b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03"  # the start of a TLS ClientHello


def v2(command: int, family: int, payload: bytes, version: int = 2) -> bytes:
    return V2_SIGNATURE + bytes([version << 4 | command, family]) + struct.pack("!H", len(payload)) + payload


V2_INET = v2(
    0x1,
    0x11,  # INET, STREAM
    bytes([192, 0, 2, 1]) + bytes([10, 0, 1, 10]) + struct.pack("!HH", 51234, 443),
)
# As an AWS NLB sends it: PP2_TYPE_AWS (0xEA), subtype 0x01, the VPC endpoint id.
VPCE = b"\x01vpce-08d2bf15fac5001c9"
V2_INET_TLV = v2(
    0x1,
    0x11,
    bytes([192, 0, 2, 1, 10, 0, 1, 10])
    + struct.pack("!HH", 51234, 443)
    + b"\xea"
    + struct.pack("!H", len(VPCE))
    + VPCE
    + b"\x04\x00\x00",  # PP2_TYPE_NOOP, empty
)
V2_INET6 = v2(
    0x1,
    0x21,  # INET6, STREAM
    bytes.fromhex("20010db8000000000000000000000001")
    + bytes.fromhex("20010db8000000000000000000000002")
    + struct.pack("!HH", 40000, 443),
)
V2_LOCAL = v2(0x0, 0x00, b"")
V2_LOCAL_WITH_BLOCK = v2(0x0, 0x11, bytes(12) + b"\xff\xff")  # discarded, however odd

VALID = {
    "v1-tcp4": (
        b"PROXY TCP4 192.0.2.1 10.0.1.10 51234 443\r\n",
        ProxyHeader(("192.0.2.1", 51234), ("10.0.1.10", 443), 42, 1, Command.PROXY),
    ),
    "v1-tcp6": (
        b"PROXY TCP6 2001:db8::1 2001:db8::2 40000 443\r\n",
        ProxyHeader(("2001:db8::1", 40000), ("2001:db8::2", 443), 46, 1, Command.PROXY),
    ),
    "v1-unknown": (b"PROXY UNKNOWN\r\n", ProxyHeader(None, None, 15, 1, Command.PROXY)),
    "v1-unknown-with-rest": (
        b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n",  # the rest is ignored
        ProxyHeader(None, None, 59, 1, Command.PROXY),
    ),
    "v2-inet": (
        V2_INET,
        ProxyHeader(("192.0.2.1", 51234), ("10.0.1.10", 443), 28, 2, Command.PROXY),
    ),
    "v2-inet-tlv": (
        V2_INET_TLV,
        ProxyHeader(
            ("192.0.2.1", 51234), ("10.0.1.10", 443), 28 + 3 + len(VPCE) + 3, 2, Command.PROXY,
            ((0xEA, VPCE), (0x04, b"")),
        ),
    ),
    "v2-inet6": (
        V2_INET6,
        ProxyHeader(("2001:db8::1", 40000), ("2001:db8::2", 443), 52, 2, Command.PROXY),
    ),
    "v2-local": (V2_LOCAL, ProxyHeader(None, None, 16, 2, Command.LOCAL)),
    "v2-local-with-block": (V2_LOCAL_WITH_BLOCK, ProxyHeader(None, None, 30, 2, Command.LOCAL)),
    "v2-unspec": (v2(0x1, 0x00, b""), ProxyHeader(None, None, 16, 2, Command.PROXY)),
    "v2-unix": (v2(0x1, 0x31, bytes(216)), ProxyHeader(None, None, 232, 2, Command.PROXY)),
}


@pytest.mark.parametrize("name", VALID)
def test_valid_whole(name):
    data, expected = VALID[name]
    assert parse(data) == expected
    assert expected.length_consumed == len(data)


@pytest.mark.parametrize("name", VALID)
def test_valid_byte_by_byte(name):
    data, expected = VALID[name]
    for n in range(len(data)):
        assert parse(data[:n]) is NEED_DATA, n
        assert looks_like_proxy(data[:n])
    assert parse(data) == expected


@pytest.mark.parametrize("name", VALID)
def test_valid_with_trailing_hello(name):
    data, expected = VALID[name]
    buf = bytearray(data + HELLO)
    header = parse(buf)
    assert header == expected
    assert bytes(buf[header.length_consumed :]) == HELLO
    assert parse(memoryview(buf)) == expected


def test_error_is_a_sniproxy_error():
    assert issubclass(ProxyProtocolError, SniproxyError)


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(HELLO, id="tls-without-header"),
        pytest.param(b"GET / HTTP/1.1\r\n\r\n", id="http"),
        pytest.param(b"SSH-2.0-OpenSSH_9.2\r\n", id="ssh"),
        pytest.param(b"proxy TCP4 192.0.2.1 10.0.1.10 1 2\r\n", id="v1-lowercase"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 1 2\n", id="v1-bare-lf"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 1 2\rx", id="v1-bare-cr"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 1\r\n", id="v1-missing-port"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 1 2 3\r\n", id="v1-extra-field"),
        pytest.param(b"PROXY TCP4  192.0.2.1 10.0.1.10 1 2\r\n", id="v1-double-space"),
        pytest.param(b"PROXY TCP5 192.0.2.1 10.0.1.10 1 2\r\n", id="v1-bad-proto"),
        pytest.param(b"PROXY TCP4 2001:db8::1 10.0.1.10 1 2\r\n", id="v1-v6-in-tcp4"),
        pytest.param(b"PROXY TCP6 192.0.2.1 2001:db8::2 1 2\r\n", id="v1-v4-in-tcp6"),
        pytest.param(b"PROXY TCP6 fe80::1%eth0 2001:db8::2 1 2\r\n", id="v1-scope-id"),
        pytest.param(b"PROXY TCP4 192.0.2.01 10.0.1.10 1 2\r\n", id="v1-octal-ish"),
        pytest.param(b"PROXY TCP4 192.0.2.256 10.0.1.10 1 2\r\n", id="v1-octet-256"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 65536 2\r\n", id="v1-port-high"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 0443 2\r\n", id="v1-port-leading-0"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 -1 2\r\n", id="v1-port-negative"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 \xd9\xa1 2\r\n", id="v1-port-arabic"),
        pytest.param(b"PROXY TCP4 192.0.2.1 10.0.1.10 1 2 \r\n", id="v1-trailing-space"),
        pytest.param(b"PROXY " + b"X" * 200, id="v1-oversized"),
        pytest.param(b"PROXY " + b"X" * (V1_MAX_LENGTH - 6), id="v1-exactly-max-no-crlf"),
        pytest.param(v2(0x1, 0x11, bytes(12), version=1), id="v2-version-1"),
        pytest.param(v2(0x1, 0x11, bytes(12), version=3), id="v2-version-3"),
        pytest.param(v2(0x2, 0x11, bytes(12)), id="v2-command-2"),
        pytest.param(v2(0x1, 0x12, bytes(12)), id="v2-inet-dgram"),
        pytest.param(v2(0x1, 0x10, bytes(12)), id="v2-inet-transport-unspec"),
        pytest.param(v2(0x1, 0x41, bytes(12)), id="v2-family-4"),
        pytest.param(v2(0x1, 0x11, bytes(11)), id="v2-inet-short"),
        pytest.param(v2(0x1, 0x21, bytes(12)), id="v2-inet6-short"),
        pytest.param(v2(0x1, 0x11, bytes(12) + b"\x01\x00"), id="v2-tlv-header-truncated"),
        pytest.param(v2(0x1, 0x11, bytes(12) + b"\x01\x00\x05abc"), id="v2-tlv-overruns"),
        pytest.param(V2_SIGNATURE + b"\x21\x11\x08\x01", id="v2-oversized-length"),
    ],
)
def test_invalid(data):
    with pytest.raises(ProxyProtocolError):
        parse(data)


def test_v2_length_cap_is_checked_before_the_payload_arrives():
    # A peer claiming 65535 bytes must be refused at once, not buffered for.
    header = V2_SIGNATURE + b"\x21\x11\xff\xff"
    with pytest.raises(ProxyProtocolError, match=str(V2_MAX_LENGTH)):
        parse(header)


def test_v2_largest_accepted():
    payload = bytes(12) + b"\x04" + struct.pack("!H", V2_MAX_LENGTH - 16 - 12 - 3)
    payload += bytes(V2_MAX_LENGTH - 16 - len(payload))
    data = v2(0x1, 0x11, payload)
    assert len(data) == V2_MAX_LENGTH
    assert parse(data).length_consumed == V2_MAX_LENGTH


def test_v1_longest_accepted():
    line = b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n"
    assert len(line) == V1_MAX_LENGTH - 3  # the spec's 107 counts UNKNOWN, longer than TCP6
    assert parse(line).source == ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)
    unknown = b"PROXY UNKNOWN " + b"f" * (V1_MAX_LENGTH - 16) + b"\r\n"
    assert len(unknown) == V1_MAX_LENGTH
    assert parse(unknown).source is None


def test_looks_like_proxy():
    assert looks_like_proxy(b"")
    assert looks_like_proxy(b"PRO")
    assert looks_like_proxy(b"PROXY TCP4")
    assert looks_like_proxy(V2_SIGNATURE[:5])
    assert looks_like_proxy(V2_INET)
    assert not looks_like_proxy(HELLO)
    assert not looks_like_proxy(b"\x16")
    assert not looks_like_proxy(b"PROXX")
    assert not looks_like_proxy(b"GET / HTTP/1.1\r\n")


headers = st.sampled_from([data for data, _ in VALID.values()])


@settings(max_examples=400, deadline=None)
@given(
    st.one_of(
        st.binary(max_size=300),
        st.builds(lambda h, n, tail: h[:n] + tail, headers, st.integers(0, 300), st.binary(max_size=64)),
        st.builds(lambda tail: V2_SIGNATURE + tail, st.binary(max_size=300)),
        st.builds(lambda tail: b"PROXY " + tail, st.binary(max_size=120)),
    )
)
def test_fuzz_result_need_data_or_our_error(data):
    try:
        result = parse(data)
    except ProxyProtocolError:
        return
    assert result is NEED_DATA or isinstance(result, ProxyHeader)
    if isinstance(result, ProxyHeader):
        assert 0 < result.length_consumed <= max(V1_MAX_LENGTH, V2_MAX_LENGTH)
        assert result.length_consumed <= len(data)


# --- headers from a real HAProxy ----------------------------------------------------------

HAPROXY = shutil.which("haproxy") or (os.path.exists("/usr/sbin/haproxy") and "/usr/sbin/haproxy") or None

HAPROXY_CONFIG = """
global
    maxconn 16
defaults
    mode tcp
    timeout connect 5s
    timeout client 10s
    timeout server 10s
frontend fe
    bind 127.0.6.50:{front}
    unique-id-format %{{+X}}o\\ %ci:%cp_%Ts
    default_backend be
backend be
    server s1 127.0.6.51:{back} {send}
"""


@pytest.mark.skipif(not HAPROXY, reason="haproxy not installed (Debian: haproxy)")
@pytest.mark.parametrize(
    "send, version, with_tlvs",
    [
        ("send-proxy", 1, False),
        ("send-proxy-v2", 2, False),
        ("send-proxy-v2 proxy-v2-options unique-id,crc32c", 2, True),
    ],
)
def test_real_haproxy_headers(tmp_path, send, version, with_tlvs):
    backend = socket.create_server(("127.0.6.51", 0))
    backend.settimeout(10)
    front = _free_port("127.0.6.50")
    config = tmp_path / "haproxy.cfg"
    config.write_text(HAPROXY_CONFIG.format(front=front, back=backend.getsockname()[1], send=send))
    # -Ws: haproxy says READY=1 over NOTIFY_SOCKET once it listens, so nothing polls.
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(10)
    env = {"PATH": "/usr/bin:/bin", "NOTIFY_SOCKET": str(tmp_path / "notify")}
    log = open(tmp_path / "haproxy.log", "wb")
    with log, backend, notify, subprocess.Popen(
        [HAPROXY, "-Ws", "-db", "-f", str(config)], env=env, stderr=log, stdout=log
    ) as haproxy:
        try:
            while b"READY=1" not in notify.recv(4096):  # RELOADING=1 comes first
                pass
            with socket.socket() as client:
                client.bind(("127.0.6.52", 0))
                client.settimeout(10)
                client.connect(("127.0.6.50", front))
                client.sendall(HELLO)
                conn, _ = backend.accept()
                with conn:
                    conn.settimeout(10)
                    buf = b""
                    header = NEED_DATA
                    while header is NEED_DATA:
                        chunk = conn.recv(4096)
                        assert chunk, (tmp_path / "haproxy.log").read_text()
                        buf += chunk
                        header = parse(buf)
                    while len(buf) < header.length_consumed + len(HELLO):
                        buf += conn.recv(4096)
                assert header.version == version
                assert header.command is Command.PROXY
                assert header.source == client.getsockname()
                assert header.dest == ("127.0.6.50", front)
                assert buf[header.length_consumed :] == HELLO  # the client's bytes, untouched
                kinds = {kind for kind, _ in header.tlvs}
                assert kinds == ({0x03, 0x05} if with_tlvs else set()), header.tlvs  # CRC32C, UNIQUE_ID
        finally:
            haproxy.terminate()
            haproxy.wait(timeout=10)


def _free_port(address: str) -> int:
    with socket.socket() as probe:
        probe.bind((address, 0))
        return probe.getsockname()[1]
