"""Addresses as the proxy names and judges them."""

from __future__ import annotations

import pytest

from sniproxy.addresses import client_key, connect_target, format_address, is_ip, is_unspecified


@pytest.mark.parametrize("answer, reached", [
    ("10.0.2.31", "10.0.2.31"),
    ("::ffff:127.0.0.1", "127.0.0.1"),  # a mapped AAAA answer reaches the IPv4 listener
    ("::ffff:a00:7", "10.0.0.7"),
    ("0.0.0.0", "127.0.0.1"),  # connect(2) to INADDR_ANY is this host
    ("::", "::1"),
    ("fe80::1%eth0", "fe80::1"),
    ("2001:db8::1", "2001:db8::1"),
])
def test_connect_target_is_what_connect_reaches(answer, reached):
    assert connect_target(answer) == reached


def test_the_other_helpers():
    assert format_address("10.0.0.1", 443) == "10.0.0.1:443" and format_address("::1", 443) == "[::1]:443"
    assert is_ip("::1") and is_ip("10.0.0.1") and not is_ip("api.ecr.us-east-1.amazonaws.com")
    assert is_unspecified("0.0.0.0") and is_unspecified("::") and not is_unspecified("127.0.0.1")
    assert client_key("::ffff:10.0.0.7") == "10.0.0.7" and client_key("10.0.0.7") == "10.0.0.7"
