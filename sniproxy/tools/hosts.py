"""The /etc/hosts lines builders need to send the routed names to this proxy."""

from __future__ import annotations

from ..config import Config
from ..routes import is_wildcard


def hosts_lines(config: Config, address: str) -> list[str]:
    lines = [f"# sniproxy: routed names -> {address} ({config.source})"]
    seen = set()
    for route in config.routes:
        for pattern in route.patterns:
            if pattern in seen:
                continue
            seen.add(pattern)
            if is_wildcard(pattern):
                lines.append(f"# {pattern} (route {route.name}): a wildcard cannot go into /etc/hosts; add each name you use")
            else:
                lines.append(f"{address}\t{pattern}")
    return lines
