"""sniproxy: a TLS SNI pass-through proxy for Amazon ECR over a VPN or Direct Connect.

The packages name the layers; each imports only from those below it (CI checks it with
import-linter, see pyproject.toml):

- ``cli``, ``__main__``: arguments in, hand over; the only place that picks the event loop.
- ``process/``: one process's lifecycle, the single-process server, the supervisor and its
  worker channel, systemd, privilege drop, and ``check``'s preflight.
- ``engine/``: the data path: the event set, listeners, connections and the context they are
  given, the table of hellos in progress, the two directions of a pair, splice(2). Hot code:
  ``__slots__``, local aliases, no per-connection tasks.
- ``tools/``: setup-time AWS tools (discover, doctor, policy); never the data path.
- ``dns/``: the upstream resolver (dnspython) and its TTL cache.
- ``observe/``: plain counters, the Prometheus collectors, the metrics HTTP listener, the
  access log and the error log's set-up.
- ``protocol/``: sans-I/O parsers: the TLS ClientHello and the PROXY header, on one cursor.
- leaves with no I/O: ``config``, ``ecr``, ``allow``, ``regions``, ``routes``, ``hostnames``,
  ``errors``.
"""
