"""normalize_host: what may reach routing, and what must not."""

import pytest

from sniproxy.hostnames import normalize_host

LABEL63 = "a" * 63
NAME253 = ".".join(["a" * 63] * 3 + ["b" * 61])  # 63*3 + 61 + 3 dots = 253
NAME254 = NAME253 + "c"

assert len(NAME253) == 253 and len(NAME254) == 254


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("api.ecr.us-east-1.amazonaws.com", "api.ecr.us-east-1.amazonaws.com"),
        ("API.ECR.US-EAST-1.AMAZONAWS.COM", "api.ecr.us-east-1.amazonaws.com"),
        ("Registry.Example.COM.", "registry.example.com"),
        ("localhost", "localhost"),
        ("_acme-challenge.example.com", "_acme-challenge.example.com"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("1e100.net", "1e100.net"),
        ("123456789012.dkr.ecr.us-east-1.amazonaws.com", "123456789012.dkr.ecr.us-east-1.amazonaws.com"),
        (f"{LABEL63}.com", f"{LABEL63}.com"),
        (NAME253, NAME253),
        (NAME253 + ".", NAME253),  # the trailing dot does not count
    ],
)
def test_valid_names_are_normalised(raw, expected):
    assert normalize_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        ".",
        "..",
        "a..b.com",
        ".example.com",
        "example.com..",
        "-a.example.com",
        "a-.example.com",
        "exa mple.com",
        "exa/mple.com",
        "exa\x00mple.com",
        "exa:mple.com",
        "*.example.com",
        f"{LABEL63}a.com",  # label of 64
        NAME254,
        "bücher.de",
        "例え.jp",
        "\u0130.example.com",  # I with dot: lower() stays non-ASCII
        # IP literals and numbers never reach routing
        "10.0.0.1",
        "10.0.0.1.",
        "127.1",
        "2130706433",
        "example.123",
        "::1",
        "[::1]",
        "2001:db8::1",
        "::ffff:10.0.0.1",
        "fe80::1%eth0",
    ],
)
def test_invalid_names_are_none(raw):
    assert normalize_host(raw) is None


@pytest.mark.parametrize("raw", ["\u212aube.example.com", "\u212a.example.com"])
def test_non_ascii_that_lowercases_to_ascii_is_none(raw):
    assert normalize_host(raw) is None
