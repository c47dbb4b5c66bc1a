"""Why a connection ended: the labels of the metrics and the access log's ``close`` field.

Written once, here; docs/operations.md lists the same (tests/test_docs.py holds them equal).
"""

from __future__ import annotations

import enum


class Refusal(enum.StrEnum):
    """Why a connection was refused before it was forwarded: the ``reason`` label of
    ``sniproxy_connections_rejected_total``, and the access log's ``close``."""

    NOT_TLS = "not_tls"
    """The first bytes are not a TLS handshake record (HTTP, SSH, a PROXY header on a plain listener)."""
    BAD_HELLO = "bad_hello"
    """A TLS record whose ClientHello is malformed or over a limit."""
    NO_SNI = "no_sni"
    """The hello names no host (absent, or an IP literal)."""
    NO_ROUTE = "no_route"
    """No route for the name."""
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    """No complete hello within [server] handshake_timeout."""
    RESOLVE_FAILED = "resolve_failed"
    """The upstream name did not resolve."""
    CONNECT_FAILED = "connect_failed"
    """No upstream address accepted the connection."""
    LOOP = "loop"
    """Every upstream address is one of the proxy's own listeners."""
    LIMIT = "limit"
    """[server] max_connections reached."""
    CLIENT_LIMIT = "client_limit"
    """[server] max_connections_per_client reached for this client."""
    DENIED = "denied"
    """The client is not in the listener's allowlist."""
    BAD_PROXY_HEADER = "bad_proxy_header"
    """A proxy_protocol listener got no valid PROXY header."""
    INTERNAL_ERROR = "internal_error"
    """A bug in the proxy's handling of this connection; it alone is closed."""
    DRAIN = "drain"
    """Still in its handshake when the drain ended."""
    EVICTED = "evicted"
    """Still in its handshake, the oldest, when the connection table was full and a new
    connection came: dropped to admit the new one."""
    CLIENT_HANDSHAKES = "client_handshakes"
    """Its client already had [server] max_handshakes_per_client connections waiting for a hello."""
    HELLO_MEMORY = "hello_memory"
    """The oldest partial hello holding bytes, when unfinished hellos held more than
    [server] max_hello_memory."""
    UNTRUSTED_PROXY = "untrusted_proxy"
    """A proxy_protocol listener's peer is not in its proxy_from networks."""


class Close(enum.StrEnum):
    """How a forwarded connection (or one whose client left first) ended: the access log's
    ``close``, beside the refusals."""

    DONE = "done"
    """Both sides closed (a reset from a side that had already sent its FIN counts as done)."""
    CLIENT_RESET = "client_reset"
    """The client reset, and the reset was passed on to the upstream."""
    UPSTREAM_RESET = "upstream_reset"
    """The upstream reset, and the reset was passed on to the client."""
    IDLE = "idle"
    """No bytes either way for [server] idle_timeout."""
    DRAIN = "drain"
    """Still open when the drain ended."""
    CLIENT_CLOSED = "client_closed"
    """The client left before its hello was complete, or before the upstream connected."""
    INTERNAL_ERROR = "internal_error"
    """A bug in the proxy's handling of this connection; it alone is closed (with resets)."""


class HelloLimit(enum.StrEnum):
    """Which bound a ClientHello broke: the ``limit`` label of ``sniproxy_hello_limit_total``
    (every one is also a ``bad_hello`` refusal). A hello of any real stack stays far inside."""

    SIZE = "size"
    """The handshake message is over 64 KiB."""
    RECORDS = "records"
    """It came in more TLS records than a real stack splits one into."""
    READS = "reads"
    """It took more reads (TCP segments arriving apart) than a real path needs."""
    EXTENSIONS = "extensions"
    """More extensions than any stack sends."""
    ALPN = "alpn"
    """More ALPN protocol names than any stack offers."""
    KEY_SHARES = "key_shares"
    """More key shares than any stack offers."""
