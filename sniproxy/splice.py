"""Zero-copy forwarding with splice(2) (placeholder: the Protocol pump is used until it lands)."""

from __future__ import annotations

from typing import Any


def splice_enabled(mode: str) -> bool:
    return False


def start(conn: Any, client: Any, upstream: Any, hello: bytes) -> None:
    raise NotImplementedError
