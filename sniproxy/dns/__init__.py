"""Upstream name resolution: dnspython against the configured servers, and a TTL cache that serves stale answers."""
