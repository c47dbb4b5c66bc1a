"""Host name checks shared by the ClientHello parser and the route table."""

import re

_LABEL = re.compile(r"(?!-)[a-z0-9_-]{1,63}(?<!-)\Z")


def normalize_host(name: str) -> str | None:
    """Return ``name`` lower-cased without a trailing dot, or None if it is not a DNS host name.

    IP literals and bare numbers are not host names: they must never reach routing.
    """
    if not name.isascii():  # before lower(): the Kelvin sign lower-cases to "k"
        return None
    name = name.lower()
    if name.endswith("."):
        name = name[:-1]
    if not name or len(name) > 253:
        return None
    labels = name.split(".")
    if not all(_LABEL.match(label) for label in labels):
        return None
    if labels[-1].isdigit():  # IPv4 literals and bare numbers; IPv6 fails the label check
        return None
    return name

