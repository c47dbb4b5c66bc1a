"""The one-record fast path, held to agreement with HelloReader, by its walk and by layouts.

Declining (None) is always safe: the connection then feeds a HelloReader. So every test of
agreement comes with one that the fast path really fires, walked and laid out.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sniproxy.errors import HelloError
from sniproxy.protocol import fasthello
from sniproxy.protocol.fasthello import LAYOUTS_MAX, WALKS_PER_COMPILE, layouts, parse_single_record
from sniproxy.protocol.tls import ClientHello
from tests.protocol.hellos import (
    ANY_INPUT,
    EXPECTED,
    NAMES,
    SUPPORTED_VERSIONS,
    alpn_ext,
    ext,
    fixture,
    outcome,
    sni_ext,
    tls,
    u16,
    vec16,
)


@pytest.fixture(autouse=True)
def no_layouts():
    layouts.forget()
    yield
    layouts.forget()


def single_record_outcome(data: bytes):
    """What the fast path says about ``data`` read in one go: a hello, its error class, or
    None for "not the one-record case" (the connection then feeds a HelloReader)."""
    try:
        return parse_single_record(data)
    except HelloError as exc:
        return type(exc)


def one_record_fixtures() -> list[str]:
    return [name for name in NAMES if EXPECTED[name]["record_count"] == 1
            and isinstance(outcome(fixture(name), []), ClientHello) and len(fixture(name)) == EXPECTED[name]["total_length"]]


def learn_all() -> None:
    """Every one-record fixture walked until its layout is compiled."""
    for name in one_record_fixtures():
        learn(fixture(name))


def learn(data: bytes) -> None:
    """Walk ``data`` twice, with the compile budget full: its layout is compiled."""
    layouts.walks = WALKS_PER_COMPILE
    parse_single_record(data)
    parse_single_record(data)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(ANY_INPUT, st.sampled_from(NAMES).map(fixture)))
def test_property_the_walk_agrees_with_the_reader(data):
    """Differential: on every input the fast path either declines, or returns exactly what
    HelloReader returns for the same bytes in one feed (the same hello, or an error of the
    same class)."""
    layouts.forget()
    fast = single_record_outcome(data)
    if fast is not None:
        assert fast == outcome(data, [])


@st.composite
def fixture_with_bytes_set(draw) -> bytes:
    """A one-record fixture with a few bytes changed in place: the same length, so the same
    layout is tried, and anything in it may differ."""
    data = bytearray(fixture(draw(st.sampled_from(one_record_fixtures()))))
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data) - 1))
        data[at] = draw(st.sampled_from([0, 1, 0x7F, 0xFF, data[at] ^ 1, data[at] + 1 & 0xFF]))
    return bytes(data)


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(fixture_with_bytes_set(), ANY_INPUT))
def test_property_a_layout_agrees_with_the_reader(data):
    """The same with every fixture's layout learned: a hello that matches a layout in length
    but differs anywhere else gives what the reader gives, or declines."""
    learn_all()
    fast = single_record_outcome(data)
    if fast is not None:
        assert fast == outcome(data, [])


@pytest.mark.parametrize("name", one_record_fixtures())
def test_every_one_record_fixture_is_walked_then_laid_out(name, monkeypatch):
    data = fixture(name)
    expected = outcome(data, [])
    assert parse_single_record(data) == expected  # walked, remembered
    assert not layouts.compiled
    assert parse_single_record(data) == expected  # walked again: compiled
    assert layouts.compiled
    monkeypatch.setattr(fasthello, "_walk", lambda *a: pytest.fail("walked a hello with a learned layout"))
    assert parse_single_record(data) == expected


def test_three_records_are_declined():
    assert parse_single_record(fixture("chromium_pq_3records")) is None


def test_a_layout_gives_each_hello_its_own_name_and_alpn():
    """The name and the ALPN list are read from each hello, not from the one learned."""
    first = tls(sni_ext("aaaa.example.com"), alpn_ext(b"h2"), SUPPORTED_VERSIONS)
    second = tls(sni_ext("bbbb.example.com"), alpn_ext(b"h3"), SUPPORTED_VERSIONS)
    learn(first)
    assert layouts.compiled
    hello = parse_single_record(second)
    assert (hello.sni, hello.alpn) == ("bbbb.example.com", ("h3",))
    assert hello == outcome(second, [])


def key_share_ext(*shares: tuple[int, int]) -> bytes:
    return ext(51, vec16(b"".join(u16(group) + vec16(b"\x01" * size) for group, size in shares)))


def test_key_share_groups_are_part_of_the_layout():
    """Two hellos alike but for a key share's group: the pq_group is each one's own."""
    classic = tls(sni_ext("ecr.example.com"), key_share_ext((0x001D, 32), (0x0017, 65)))
    pq = tls(sni_ext("ecr.example.com"), key_share_ext((0x001D, 32), (0x11EC, 65)))
    assert len(classic) == len(pq)
    learn(classic)
    assert parse_single_record(pq).pq_group == "X25519MLKEM768" == outcome(pq, []).pq_group


def test_a_shuffling_client_never_compiles_a_layout():
    """Chrome shuffles its extensions on every connection: each hello is walked, and a layout
    is compiled only for one walked twice in a row."""
    rng = random.Random(7)
    extensions = [sni_ext("shuffle.example.com"), alpn_ext(b"h2", b"http/1.1"), SUPPORTED_VERSIONS] + \
        [ext(0x1000 + i, b"x" * i) for i in range(12)]
    for _ in range(50):
        rng.shuffle(extensions)
        data = tls(*extensions)
        assert parse_single_record(data) == outcome(data, [])
    assert not layouts.compiled


def test_layouts_are_bounded():
    """Layouts are keyed by client-chosen lengths: a client sending many cannot grow them."""
    for i in range(3 * LAYOUTS_MAX):
        learn(tls(sni_ext("bound.example.com"), ext(0x1000, b"x" * i)))
        assert len(layouts.compiled) <= LAYOUTS_MAX and len(layouts.walked) <= LAYOUTS_MAX


def test_compiles_are_spaced_by_walks():
    """A compile costs several walks: a client sending each new layout twice gets at most one
    compiled per WALKS_PER_COMPILE walks."""
    compiled = 0
    for i in range(4 * WALKS_PER_COMPILE):
        data = tls(sni_ext("budget.example.com"), ext(0x1000, b"x" * (i % LAYOUTS_MAX)), ext(0x2000 + i, b""))
        before = dict(layouts.compiled)
        parse_single_record(data)
        parse_single_record(data)
        compiled += layouts.compiled != before
    assert compiled <= 4 * 2 * WALKS_PER_COMPILE // WALKS_PER_COMPILE
    assert compiled >= 2  # and it does compile
