"""Typed errors. Every error sniproxy raises on purpose is one of these."""

from .reasons import HelloLimit, Refusal


class SniproxyError(Exception):
    """Base of all sniproxy errors."""


class ConfigError(SniproxyError):
    """A configuration problem, tied to the key path that caused it."""

    def __init__(self, path: str, message: str):
        self.path = path
        self.message = message
        super().__init__(f"config error: {path}: {message}" if path else f"config error: {message}")


class HelloError(SniproxyError):
    """The client's first bytes are not an acceptable TLS ClientHello.

    ``reason`` is the metrics label for the refusal.
    """

    reason = Refusal.BAD_HELLO


class NotTLS(HelloError):
    """The bytes do not start like a TLS handshake record (HTTP, SSH, PROXY...)."""

    reason = Refusal.NOT_TLS


class BadHello(HelloError):
    """A TLS handshake record whose ClientHello is malformed or too large."""

    reason = Refusal.BAD_HELLO


class UsageError(SniproxyError):
    """A bad command-line value, or a fact no flag gave and nothing else could tell: one line."""


class OverLimit(BadHello):
    """A ClientHello past one of the bounds that keep a hello's cost close to a normal one's."""

    def __init__(self, limit: HelloLimit, message: str):
        super().__init__(message)
        self.limit = limit


class WireError(SniproxyError):
    """A read ran past the end of a buffer or a length-prefixed block."""


class BindError(SniproxyError):
    """A listening socket could not be bound; ``errno`` says why (EACCES, EADDRINUSE...)."""

    def __init__(self, message: str, errno: int = 0):
        super().__init__(message)
        self.errno = errno
