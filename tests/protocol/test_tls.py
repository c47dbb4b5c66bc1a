"""The sans-I/O ClientHello reader, fed real captured hellos and hand-built bad ones.

Every input is fed whole, one byte at a time and in seeded random chunkings; the reader must
answer NEED_DATA until the last byte of the hello, then the ClientHello, and refuse bad input
with NotTLS/BadHello (both HelloError) and nothing else.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings

from sniproxy.errors import BadHello, HelloError, NotTLS, OverLimit
from sniproxy.protocol.fasthello import parse_single_record
from sniproxy.protocol.tls import (
    MAX_ALPN,
    MAX_EXTENSIONS,
    MAX_HELLO,
    MAX_KEY_SHARES,
    MAX_RECORD,
    MAX_RECORDS,
    NEED_DATA,
    UNRECOGNIZED_NAME_ALERT,
    ClientHello,
    HelloReader,
    parse_client_hello,
)
from sniproxy.reasons import HelloLimit
from tests.helpers import FIXTURES
from tests.protocol.hellos import (
    ANY_INPUT,
    CHUNKS,
    CIPHERS,
    EXPECTED,
    NAMES,
    RANDOM,
    SUPPORTED_VERSIONS,
    alpn_ext,
    bytewise,
    check_expected,
    ext,
    feed,
    fixture,
    handshake,
    handshake_message,
    hello_body,
    host_name,
    outcome,
    padding_ext,
    random_chunks,
    record,
    records,
    sni_ext,
    split_records,
    tls,
    u8,
    u16,
    u24,
    vec16,
)

# -- real hellos ---------------------------------------------------------------------------------


def test_every_fixture_has_expectations():
    assert {p.stem for p in FIXTURES.glob("*.bin")} == set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_fixture_shape_matches_expected(name):
    data = fixture(name)
    want = EXPECTED[name]
    recs = split_records(data)
    assert len(data) == want["total_length"]
    assert len(recs) == want["record_count"]
    assert all(ctype == 22 for ctype, _, _ in recs)
    message = handshake_message(data)
    assert int.from_bytes(message[1:4], "big") == want["handshake_length"] == len(message) - 4


@pytest.mark.parametrize("name", NAMES)
def test_fixture_whole(name):
    data = fixture(name)
    reader = HelloReader()
    hello = reader.feed(data)
    check_expected(hello, name)
    assert bytes(reader.received) == data


@pytest.mark.parametrize("name", NAMES)
def test_fixture_one_byte_at_a_time(name):
    data = fixture(name)
    reader = HelloReader()
    for i, b in enumerate(data[:-1]):
        assert reader.feed(bytes([b])) is NEED_DATA, f"answered early at byte {i}"
    check_expected(reader.feed(data[-1:]), name)
    assert bytes(reader.received) == data


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("name", NAMES)
def test_fixture_random_chunks(name, seed):
    data = fixture(name)
    chunks = random_chunks(data, random.Random(f"{name}/{seed}"))
    hello, used = feed(chunks)
    assert used == len(chunks)
    check_expected(hello, name)


@pytest.mark.parametrize("size", [1, 5, 300, MAX_RECORD])
@pytest.mark.parametrize("name", NAMES)
def test_missing_is_what_the_reader_needs_next_and_never_more(name, size):
    """A reader that waits for ``missing`` bytes each time (SO_RCVLOWAT does) gets the hello
    in one feed per record header and one per record body, and never waits for a byte past
    the hello's end, so a client that sends the hello and then waits is never stranded."""
    data = records(handshake_message(fixture(name)), size)
    if -(-len(handshake_message(fixture(name))) // size) > MAX_RECORDS:
        data = records(handshake_message(fixture(name)), MAX_RECORD)
    reader, pos, feeds = HelloReader(), 0, 0
    result = NEED_DATA
    while result is NEED_DATA:
        want = reader.missing
        assert 0 < want <= len(data) - pos
        result = reader.feed(data[pos : pos + want])
        pos, feeds = pos + want, feeds + 1
    assert pos == len(data) and feeds == 2 * reader.records
    check_expected(result, name)


TRAILERS = {
    "application_data": record(b"hello", content_type=23, version=0x0303),
    "change_cipher_spec": record(b"\x01", content_type=20, version=0x0303),
    "handshake_record": record(b"\x01\x00\x00\x00"),
    "garbage": b"GET / HTTP/1.1\r\n\r\n",
    "partial_header": b"\x17\x03",
}


@pytest.mark.parametrize("trailer", TRAILERS.values(), ids=TRAILERS.keys())
@pytest.mark.parametrize("name", NAMES)
def test_fixture_with_trailing_bytes(name, trailer):
    data = fixture(name)
    # whole, in one chunk with the trailer: the hello, and every byte kept for forwarding
    reader = HelloReader()
    check_expected(reader.feed(data + trailer), name)
    assert bytes(reader.received) == data + trailer
    # byte by byte: the answer comes at the hello's last byte, the trailer is never needed
    hello, used = feed(bytewise(data + trailer))
    assert used == len(data)
    check_expected(hello, name)
    # the last chunk straddles the end of the hello
    hello, used = feed([data[:-3], data[-3:] + trailer])
    check_expected(hello, name)


REFRAGMENT_SIZES = [1, 2, 3, 4, 5, 7, 64, 255, 1000, MAX_RECORD]


@pytest.mark.parametrize("size", REFRAGMENT_SIZES)
@pytest.mark.parametrize("name", NAMES)
def test_fixture_refragmented(name, size):
    """Reassembled into the same hello, up to MAX_RECORDS records; past that, refused as a
    records limit at the record after the last one allowed."""
    whole = HelloReader().feed(fixture(name))
    message = handshake_message(fixture(name))
    data = records(message, size)
    if -(-len(message) // size) > MAX_RECORDS:
        with pytest.raises(OverLimit) as raised:
            feed([data])
        assert raised.value.limit is HelloLimit.RECORDS
        return
    hello, used = feed([data])
    assert hello == whole
    check_expected(hello, name)


@pytest.mark.parametrize("name", ["curl", "chromium_pq"])
def test_one_byte_records_are_refused_after_max_records_fed_one_byte_at_a_time(name):
    """1-byte records cost a parse loop each: the reader stops at the record past the bound,
    having held no more than that many records' bytes."""
    data = records(handshake_message(fixture(name)), 1)
    reader = HelloReader()
    with pytest.raises(OverLimit) as raised:
        for byte in bytewise(data):
            assert reader.feed(byte) is NEED_DATA
    assert raised.value.limit is HelloLimit.RECORDS and reader.records == MAX_RECORDS
    assert len(reader.received) == 6 * MAX_RECORDS + 5


@pytest.mark.parametrize("name", NAMES)
def test_a_hello_in_exactly_max_records_is_accepted(name):
    message = handshake_message(fixture(name))
    sizes = [len(message) // MAX_RECORDS] * (MAX_RECORDS - 1)
    sizes.append(len(message) - sum(sizes))
    data = b"".join(_records_list(message, sizes))
    assert len(split_records(data)) == MAX_RECORDS
    hello, used = feed(bytewise(data))
    assert used == len(data)
    check_expected(hello, name)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("name", NAMES)
def test_fixture_random_records_random_chunks(name, seed):
    rng = random.Random(f"records/{name}/{seed}")
    message = handshake_message(fixture(name))
    least = -(-len(message) // MAX_RECORDS)  # as small as they come within MAX_RECORDS records
    sizes = [rng.choice([least, least + 1, rng.randint(least, 300 + least), rng.randint(least, MAX_RECORD)])
             for _ in range(len(message))]
    data = b"".join(
        record(part, version=rng.choice([0x0301, 0x0303]))
        for part in (r[5:] for r in _records_list(message, sizes))
    )
    hello, used = feed(random_chunks(data, rng))
    check_expected(hello, name)


def _records_list(message: bytes, sizes: list[int]) -> list[bytes]:
    out, pos, it = [], 0, iter(sizes)
    while pos < len(message):
        n = next(it)
        out.append(record(message[pos : pos + n]))
        pos += n
    return out


def test_large_multi_record_hello_with_padding():
    body = hello_body(sni_ext("big.example.com"), alpn_ext(b"h2"), padding_ext(40_000), SUPPORTED_VERSIONS)
    data = records(handshake(body))
    assert 40_000 < len(data) and len(split_records(data)) == 3
    hello, _ = feed([data])
    assert (hello.sni, hello.alpn) == ("big.example.com", ("h2",))
    assert hello.extensions == (0, 16, 21, 43)
    hello, used = feed(random_chunks(data, random.Random(40)))
    assert hello.sni == "big.example.com"


def test_hello_of_exactly_max_size_is_accepted():
    base = hello_body(sni_ext("max.example.com"), padding_ext(0))
    body = hello_body(sni_ext("max.example.com"), padding_ext(MAX_HELLO - len(base)))
    assert len(body) == MAX_HELLO
    hello, _ = feed([records(handshake(body))])
    assert hello.sni == "max.example.com"


def test_no_extensions_block_tls12_style():
    hello, _ = feed([tls(no_extensions=True)])
    assert (hello.sni, hello.alpn, hello.extensions) == (None, (), ())


def test_unknown_extensions_are_listed_not_parsed():
    # a nonsense body inside an unknown extension is not our business
    hello, _ = feed([tls(ext(0x2A2A, b""), ext(0x1234, b"\xff\x00\x01"), sni_ext("x.example.com"), alpn_ext(b"h2", b"http/1.1"))])
    assert hello.extensions == (0x2A2A, 0x1234, 0, 16)
    assert (hello.sni, hello.alpn) == ("x.example.com", ("h2", "http/1.1"))


@pytest.mark.parametrize("version", [0x0300, 0x0301, 0x0302, 0x0303, 0x0304])
def test_legacy_versions_accepted(version):
    hello, _ = feed([tls(sni_ext("v.example.com"), version=version)])
    assert hello.legacy_version == version


def test_parse_client_hello_directly():
    hello = parse_client_hello(hello_body(sni_ext("Direct.Example.com"), alpn_ext(b"h2")))
    assert (hello.sni, hello.alpn) == ("direct.example.com", ("h2",))


def test_unrecognized_name_alert_is_fatal_112():
    assert UNRECOGNIZED_NAME_ALERT == bytes([21, 3, 3, 0, 2, 2, 112])


# -- SNI normalisation: a bad name is no name, not a bad hello -------------------------------------

SNI_CASES = [
    (b"API.ECR.US-EAST-1.AMAZONAWS.COM", "api.ecr.us-east-1.amazonaws.com"),
    (b"registry.example.com.", "registry.example.com"),
    (b"Registry.Example.Com.", "registry.example.com"),
    (b"10.0.0.1", None),
    (b"127.0.0.1.", None),
    (b"::1", None),
    (b"[2001:db8::1]", None),
    (b"2001:db8::1", None),
    (b"exa mple.com", None),
    (b"exa_mple.com", "exa_mple.com"),
    (b"exa\x00mple.com", None),
    (b"example.com/evil", None),
    (b"-lead.example.com", None),
    (b"a..b.example.com", None),
    (b".", None),
    (b"a" * 63 + b".example.com", "a" * 63 + ".example.com"),
    (b"a" * 64 + b".example.com", None),
    (b".".join([b"a" * 63] * 3 + [b"b" * 61]), ".".join(["a" * 63] * 3 + ["b" * 61])),
    (b".".join([b"a" * 63] * 3 + [b"b" * 62]), None),  # 254
    ("bücher.example.com".encode(), None),
    (b"\xff\xfe.example.com", None),
    (b"\x80", None),
]


@pytest.mark.parametrize("raw, expected", SNI_CASES, ids=[repr(r[:24]) for r, _ in SNI_CASES])
def test_sni_normalisation(raw, expected):
    data = tls(sni_ext(raw), alpn_ext(b"h2"))
    hello, _ = feed([data])
    assert hello.sni == expected
    assert hello.alpn == ("h2",)  # the rest of the hello still parses
    hello, _ = feed(bytewise(data))
    assert hello.sni == expected


# -- not TLS: refused on the first bytes -------------------------------------------------------------

NOT_TLS = {
    "http_get": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    "http_connect": b"CONNECT api.ecr.us-east-1.amazonaws.com:443 HTTP/1.1\r\n",
    "ssh": b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u3\r\n",
    "proxy_v1": b"PROXY TCP4 192.0.2.1 10.0.1.10 51234 443\r\n",
    "proxy_v2": b"\r\n\r\n\x00\r\nQUIT\n\x21\x11\x00\x0c",
    "sslv2_hello": bytes.fromhex("80 2e 01 0301 0015 0000 0010") + bytes(37),
    "alert_record": bytes.fromhex("15 0303 0002 0228"),
    "application_data": bytes.fromhex("17 0303 0005") + b"hello",
    "change_cipher_spec": bytes.fromhex("14 0303 0001 01"),
    "zero": bytes(8),
    "tls_ff": b"\xff" * 8,
}


@pytest.mark.parametrize("n", [1, 2, 3])
@pytest.mark.parametrize("data", NOT_TLS.values(), ids=NOT_TLS.keys())
def test_not_tls_refused_on_first_bytes(data, n):
    with pytest.raises(NotTLS) as exc:
        HelloReader().feed(data[:n])
    assert exc.value.reason == "not_tls"


@pytest.mark.parametrize("data", NOT_TLS.values(), ids=NOT_TLS.keys())
def test_not_tls_refused_on_first_byte_fed_alone(data):
    reader = HelloReader()
    with pytest.raises(NotTLS):
        reader.feed(data[:1])


@pytest.mark.parametrize("major", [0, 2, 4, 0x16])
def test_bad_record_major_version_refused_on_second_byte(major):
    with pytest.raises(NotTLS):
        HelloReader().feed(bytes([22, major]))


def test_bad_record_major_version_refused_on_second_byte_fed_separately():
    reader = HelloReader()
    assert reader.feed(b"\x16") is NEED_DATA
    with pytest.raises(NotTLS):
        reader.feed(b"\x02")


@pytest.mark.parametrize("minor", [5, 0xFF])
def test_bad_record_minor_version_refused_at_header(minor):
    reader = HelloReader()
    assert reader.feed(bytes([22, 3, minor, 0])) is NEED_DATA
    with pytest.raises(NotTLS):
        reader.feed(b"\x10")


@pytest.mark.parametrize("name", NAMES)
def test_empty_feed_is_need_data(name):
    reader = HelloReader()
    assert reader.feed(b"") is NEED_DATA
    check_expected(reader.feed(fixture(name)), name)


# -- TLS records that frame a ClientHello badly -----------------------------------------------------


@pytest.mark.parametrize("length", [0, MAX_RECORD + 1, 0xFFFF])
def test_bad_record_length_refused_at_header(length):
    reader = HelloReader()
    assert reader.feed(b"\x16\x03\x01") is NEED_DATA
    with pytest.raises(BadHello):
        reader.feed(u16(length))  # the header is complete; no payload has come


def test_max_record_length_waits_for_payload():
    assert HelloReader().feed(b"\x16\x03\x01" + u16(MAX_RECORD)) is NEED_DATA


@pytest.mark.parametrize("content_type", [20, 21, 23, 24, 0])
def test_non_handshake_record_after_the_first(content_type):
    message = handshake(hello_body(sni_ext("a.example.com")))
    data = record(message[:10]) + record(message[10:], content_type=content_type)
    with pytest.raises(BadHello):
        feed([data])
    with pytest.raises(BadHello):
        feed(bytewise(data))


def test_bad_version_on_a_later_record():
    message = handshake(hello_body(sni_ext("a.example.com")))
    data = record(message[:10]) + record(message[10:], version=0x0305)
    with pytest.raises(HelloError):
        feed([data])


@pytest.mark.parametrize("msg_type", [0, 2, 4, 11, 20, 0xFF])
def test_handshake_type_not_client_hello(msg_type):
    message = handshake(hello_body(sni_ext("a.example.com")), msg_type=msg_type)
    with pytest.raises(BadHello):
        feed([records(message)])
    # in 1-byte records it is refused once the 4-byte header is in, before the body
    reader = HelloReader()
    for i in range(3):
        assert reader.feed(record(message[i : i + 1])) is NEED_DATA
    with pytest.raises(BadHello):
        reader.feed(record(message[3:4]))


@pytest.mark.parametrize("length", [MAX_HELLO + 1, 1 << 20, 0xFFFFFF])
def test_oversized_hello_refused_at_handshake_header(length):
    header = u8(1) + u24(length)
    reader = HelloReader()
    # the header alone in its own record: refused as soon as it is in, before any of the body
    with pytest.raises(BadHello, match="exceeds"):
        reader.feed(record(header))
    # the header split over 1-byte records
    reader = HelloReader()
    for b in header[:3]:
        assert reader.feed(record(bytes([b]))) is NEED_DATA
    with pytest.raises(BadHello):
        reader.feed(record(header[3:]))


def test_max_size_header_is_not_refused():
    assert HelloReader().feed(record(u8(1) + u24(MAX_HELLO))) is NEED_DATA


def test_oversized_hello_refused_before_its_first_record_completes():
    reader = HelloReader()
    with pytest.raises(BadHello):
        reader.feed(b"\x16\x03\x01" + u16(MAX_RECORD) + u8(1) + u24(0xFFFFFF))


def test_handshake_shorter_than_its_records():
    body = hello_body(sni_ext("a.example.com"))
    with pytest.raises(BadHello):
        feed([records(handshake(body, length=len(body) - 1))])


def test_handshake_longer_than_its_records_waits():
    body = hello_body(sni_ext("a.example.com"))
    data = records(handshake(body, length=len(body) + 1))
    assert feed([data]) == (NEED_DATA, 1)
    # and a later record that runs past the end is refused
    with pytest.raises(BadHello):
        feed([data, record(b"\x00\x00")])


def test_second_handshake_message_in_the_same_record():
    message = handshake(hello_body(sni_ext("a.example.com")))
    with pytest.raises(BadHello):
        feed([record(message + handshake(b"", msg_type=20))])


# -- ClientHello bodies with one field wrong ---------------------------------------------------------

GOOD_EXTS = (sni_ext("a.example.com"), alpn_ext(b"h2", b"http/1.1"), SUPPORTED_VERSIONS)
EXT_BLOCK = b"".join(GOOD_EXTS)


def _sni_variant(list_delta=0, name_delta=0, ext_delta=0) -> bytes:
    name = b"a.example.com"
    entry = u8(0) + u16(len(name) + name_delta) + name
    lst = u16(len(entry) + list_delta) + entry
    return u16(0) + u16(len(lst) + ext_delta) + lst


def _alpn_variant(list_delta=0, name_delta=0) -> bytes:
    entry = u8(2 + name_delta) + b"h2"
    lst = u16(len(entry) + list_delta) + entry
    return ext(16, lst)


def _with(*exts: bytes) -> bytes:
    return vec16(b"".join(exts))


BAD_BODIES = {
    "session_id_33": hello_body(*GOOD_EXTS, session_id=bytes(33)),
    "session_id_len_plus1": hello_body(*GOOD_EXTS, raw_session_id=u8(33) + bytes(32)),
    "session_id_len_minus1": hello_body(*GOOD_EXTS, raw_session_id=u8(31) + bytes(32)),
    "session_id_overruns_body": u16(0x0303) + RANDOM + u8(32) + bytes(5),
    "cipher_suites_odd": hello_body(*GOOD_EXTS, ciphers=b"\x13\x01\x13"),
    "cipher_suites_empty": hello_body(*GOOD_EXTS, ciphers=b""),
    "cipher_suites_len_plus1": hello_body(*GOOD_EXTS, raw_ciphers=u16(len(CIPHERS) + 1) + CIPHERS),
    "cipher_suites_len_minus1": hello_body(*GOOD_EXTS, raw_ciphers=u16(len(CIPHERS) - 1) + CIPHERS),
    "cipher_suites_len_plus2": hello_body(*GOOD_EXTS, raw_ciphers=u16(len(CIPHERS) + 2) + CIPHERS),
    "compression_empty": hello_body(*GOOD_EXTS, compression=b""),
    "compression_len_plus1": hello_body(*GOOD_EXTS, raw_compression=u8(2) + b"\x00"),
    "compression_len_minus1": hello_body(*GOOD_EXTS, raw_compression=u8(0) + b"\x00"),
    "extensions_overrun": hello_body(raw_extensions=u16(len(EXT_BLOCK) + 1) + EXT_BLOCK),
    "extensions_underrun": hello_body(raw_extensions=u16(len(EXT_BLOCK) - 1) + EXT_BLOCK),
    "extensions_truncated_header": hello_body(raw_extensions=u16(1) + b"\x00"),
    "extensions_length_only_one_byte": hello_body(raw_extensions=b"\x00"),
    "unknown_extension_len_plus1": hello_body(raw_extensions=_with(u16(0x15) + u16(3) + b"\x00\x00")),
    "unknown_extension_len_minus1_at_end": hello_body(raw_extensions=_with(u16(0x15) + u16(1) + b"\x00\x00")),
    "sni_extension_len_plus1": hello_body(raw_extensions=_with(_sni_variant(ext_delta=1), b"\x00")),
    "sni_extension_len_minus1": hello_body(raw_extensions=_with(_sni_variant(ext_delta=-1))),
    "sni_list_overrun": hello_body(raw_extensions=_with(_sni_variant(list_delta=1, ext_delta=1), b"\x00")),
    "sni_list_len_plus1": hello_body(raw_extensions=_with(_sni_variant(list_delta=1))),
    "sni_list_len_minus1": hello_body(raw_extensions=_with(_sni_variant(list_delta=-1))),
    "sni_name_len_plus1": hello_body(raw_extensions=_with(_sni_variant(name_delta=1))),
    "sni_name_len_minus1": hello_body(raw_extensions=_with(_sni_variant(name_delta=-1))),
    "sni_list_empty": hello_body(ext(0, u16(0))),
    "sni_extension_empty": hello_body(ext(0, b"")),
    "sni_host_name_empty": hello_body(sni_ext(b"")),
    "sni_two_host_names": hello_body(sni_ext("a.example.com", "b.example.com")),
    "sni_same_host_name_twice": hello_body(sni_ext("a.example.com", "a.example.com")),
    "sni_unknown_name_type": hello_body(ext(0, vec16(host_name("a.example.com", name_type=1)))),
    "duplicate_sni_extension": hello_body(sni_ext("a.example.com"), sni_ext("a.example.com")),
    "duplicate_alpn_extension": hello_body(alpn_ext(b"h2"), alpn_ext(b"h2")),
    "duplicate_unknown_extension": hello_body(padding_ext(1), SUPPORTED_VERSIONS, padding_ext(1)),
    "alpn_list_empty": hello_body(ext(16, u16(0))),
    "alpn_extension_empty": hello_body(ext(16, b"")),
    "alpn_empty_name": hello_body(alpn_ext(b"h2", b"")),
    "alpn_list_len_plus1": hello_body(raw_extensions=_with(_alpn_variant(list_delta=1))),
    "alpn_list_len_minus1": hello_body(raw_extensions=_with(_alpn_variant(list_delta=-1))),
    "alpn_name_len_plus1": hello_body(raw_extensions=_with(_alpn_variant(name_delta=1))),
    "alpn_name_len_minus1": hello_body(raw_extensions=_with(_alpn_variant(name_delta=-1))),
    "legacy_version_2_3": hello_body(*GOOD_EXTS, version=0x0203),
    "legacy_version_0x0a0a": hello_body(*GOOD_EXTS, version=0x0A0A),
    "trailing_byte_after_extensions": hello_body(*GOOD_EXTS, trailer=b"\x00"),
    "truncated_random": u16(0x0303) + RANDOM[:10],
    "only_version": u16(0x0303),
    "empty_body": b"",
}


@pytest.mark.parametrize("body", BAD_BODIES.values(), ids=BAD_BODIES.keys())
def test_bad_client_hello_body(body):
    data = records(handshake(body))
    with pytest.raises(BadHello) as exc:
        feed([data])
    assert exc.value.reason == "bad_hello"
    with pytest.raises(BadHello):
        feed(bytewise(data))
    with pytest.raises(BadHello):
        parse_client_hello(body)


def test_builder_makes_good_hellos():
    """The bad bodies above differ from this good one in one field only."""
    hello, _ = feed([records(handshake(hello_body(*GOOD_EXTS)))])
    assert (hello.sni, hello.alpn, hello.extensions) == ("a.example.com", ("h2", "http/1.1"), (0, 16, 43))
    assert parse_client_hello(hello_body(raw_extensions=_with(_sni_variant()))).sni == "a.example.com"
    assert parse_client_hello(hello_body(raw_extensions=_with(_alpn_variant()))).alpn == ("h2",)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ANY_INPUT, sizes=CHUNKS)
def test_property_result_need_data_or_hello_error(data, sizes):
    outcome(data, sizes)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=ANY_INPUT, sizes=CHUNKS)
def test_property_chunking_does_not_change_the_outcome(data, sizes):
    assert outcome(data, sizes) == outcome(data, [])


@pytest.mark.parametrize("name", NAMES)
def test_post_quantum_key_shares_and_ech_as_captured(name):
    """The hello diagnostics report what the captures hold: an X25519MLKEM768 key share
    (Chromium's post-quantum hello) and an encrypted_client_hello extension (its GREASE)."""
    hello = outcome(fixture(name), [])
    if not isinstance(hello, ClientHello):
        pytest.skip(f"{name} is not a complete hello")
    assert (hello.pq_group == "X25519MLKEM768") == EXPECTED[name]["has_mlkem"]
    assert hello.ech == EXPECTED[name]["has_ech"]
    assert all(isinstance(g, int) for g in hello.key_shares)


# -- the bounds that keep a hello's cost close to a normal one's --------------------------------

def key_share_ext(*groups: int) -> bytes:
    return ext(51, vec16(b"".join(u16(g) + vec16(b"\x01" * 32) for g in groups)))


def many_extensions(n: int) -> list[bytes]:
    return [sni_ext("many.example.com")] + [ext(0x1000 + i, b"") for i in range(n - 1)]


COUNTED = {
    HelloLimit.EXTENSIONS: lambda n: many_extensions(n),
    HelloLimit.ALPN: lambda n: [sni_ext("many.example.com"), alpn_ext(*(b"p%d" % i for i in range(n)))],
    HelloLimit.KEY_SHARES: lambda n: [sni_ext("many.example.com"), key_share_ext(*range(0x2000, 0x2000 + n))],
}
BOUNDS = {HelloLimit.EXTENSIONS: MAX_EXTENSIONS, HelloLimit.ALPN: MAX_ALPN, HelloLimit.KEY_SHARES: MAX_KEY_SHARES}


@pytest.mark.parametrize("limit", list(COUNTED))
def test_a_count_at_its_bound_passes_and_one_more_is_refused_by_both_parsers(limit):
    at = tls(*COUNTED[limit](BOUNDS[limit]))
    assert parse_single_record(at) == HelloReader().feed(at) != NEED_DATA
    over = tls(*COUNTED[limit](BOUNDS[limit] + 1))
    assert parse_single_record(over) is None  # the fast path declines; the reader says why
    with pytest.raises(OverLimit) as raised:
        HelloReader().feed(over)
    assert raised.value.limit is limit and raised.value.reason == "bad_hello"


HUGE = {  # as many as fit in MAX_HELLO: what made a hello cost 45-80 ms of CPU
    HelloLimit.EXTENSIONS: [ext(0x1000 + i, b"") for i in range(15000)],
    HelloLimit.ALPN: [alpn_ext(*[b"p"] * 30000)],
    HelloLimit.KEY_SHARES: [ext(51, vec16(b"".join(u16(0x2000 + i) + vec16(b"\x01") for i in range(12000))))],
}


@pytest.mark.parametrize("limit", list(HUGE))
def test_tens_of_thousands_of_a_counted_part_stop_at_the_bound(limit):
    body = hello_body(sni_ext("huge.example.com"), *HUGE[limit])
    assert len(body) <= MAX_HELLO
    data = records(handshake(body))
    assert parse_single_record(data) is None
    with pytest.raises(OverLimit) as raised:
        HelloReader().feed(data)
    assert raised.value.limit is limit


def test_the_size_bound_is_a_limit_too():
    with pytest.raises(OverLimit) as raised:
        HelloReader().feed(b"\x16\x03\x01\x00\x04" + handshake(b"", length=MAX_HELLO + 1))
    assert raised.value.limit is HelloLimit.SIZE
