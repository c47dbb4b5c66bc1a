"""The access-log line: valid JSON whatever a client sent, and a bounded cost for hostile ALPN lists."""

from __future__ import annotations

import json

from sniproxy.observe import accesslog
from sniproxy.observe.accesslog import MAX_FIELD, format_line
from sniproxy.protocol.tls import MAX_ALPN, ClientHello


def line_for(alpn: tuple[str, ...]) -> dict:
    hello = ClientHello("api.ecr.us-east-1.amazonaws.com", alpn, (0, 16), 0x0303)
    text = format_line(1_765_000_000.25, "10.8.0.5:40000", "10.0.1.10:443", hello, "ecr-api", "10.0.2.31:443",
                       517, 2000, 0.5, "done", 517, 1, 1, 0.0002)
    assert text.endswith("\n") and "\n" not in text[:-1]
    return json.loads(text)


def test_an_ordinary_line():
    line = line_for(("h2", "http/1.1"))
    assert line["time"] == "2025-12-06T05:46:40.250Z"
    assert line["alpn"] == ["h2", "http/1.1"] and "alpn_omitted" not in line
    assert (line["route"], line["close"], line["hello_bytes"]) == ("ecr-api", "done", 517)


def test_a_huge_alpn_list_is_cut_to_one_field_and_the_line_says_so():
    """Before: every name, 5x what the client sent, in one line."""
    names = tuple(f"{i:03d}" + "x" * 250 for i in range(MAX_ALPN))
    line = line_for(names)
    field = json.dumps(line["alpn"], separators=(",", ":"))
    assert len(field) <= MAX_FIELD and line["alpn"] == list(names[: len(line["alpn"])])
    assert line["alpn_omitted"] == MAX_ALPN - len(line["alpn"]) > 0


def test_client_chosen_alpn_lists_pin_no_more_than_a_few_kilobytes(monkeypatch):
    monkeypatch.setattr(accesslog, "_ALPN", {})
    for i in range(2000):  # long lists: never cached
        line_for((f"h{i}" + "y" * 200, "http/1.1"))
    assert accesslog._ALPN == {}
    for i in range(2000):  # short ones: cached, up to the cache's size
        line_for((f"p{i}",))
    assert 0 < len(accesslog._ALPN) <= 256
    assert sum(len(v) + sum(map(len, k)) for k, v in accesslog._ALPN.items()) < 64 * 1024
