"""The route table: SNI name -> route. Exact names beat one-label wildcards."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Route:
    name: str
    """Label used in logs and metrics."""
    patterns: tuple[str, ...]
    """Exact host names, or ``*.suffix`` where ``*`` is exactly one DNS label."""
    upstream: str | None = None
    """Host to connect to; None means the SNI name itself."""
    port: int = 443
    """Upstream TCP port."""

    def upstream_for(self, sni: str) -> str:
        return self.upstream or sni


def is_wildcard(pattern: str) -> bool:
    return pattern.startswith("*.")


class RouteTable:
    """Two dict lookups per connection: the exact name, then the name minus its first label."""

    __slots__ = ("routes", "_exact", "_suffix")

    def __init__(self, routes: tuple[Route, ...] | list[Route]):
        self.routes = tuple(routes)
        self._exact: dict[str, Route] = {}
        self._suffix: dict[str, Route] = {}
        for route in self.routes:
            for pattern in route.patterns:
                if is_wildcard(pattern):
                    self._suffix[pattern[2:]] = route
                else:
                    self._exact[pattern] = route

    def match(self, sni: str | None) -> Route | None:
        """The route for a normalised SNI name; None means refuse."""
        if sni is None:
            return None
        route = self._exact.get(sni)
        if route is not None:
            return route
        dot = sni.find(".")
        if dot <= 0:
            return None
        return self._suffix.get(sni[dot + 1 :])
