"""`sniproxy run` after its arguments: set up this process, then the coroutine to run.

Everything that can fail at start fails here, before the event loop exists, as one line
(``SniproxyError``): logging, the listeners (bound, adopted from systemd, or inherited from
the supervisor), the access log. What is returned is the lifecycle of one of three roles: a
single process, a supervisor of workers, or one worker. The CLI picks the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Callable, Coroutine
from typing import Any

from ..config import Config
from ..engine.listener import bind
from ..errors import SniproxyError
from ..observe.accesslog import AccessLog
from ..observe.logs import setup_logging
from . import preflight
from .channel import WorkerChannel
from .lifecycle import Flag, Lifecycle
from .privdrop import drop_privileges
from .reload import Loader
from .server import Server
from .supervisor import Supervisor
from .systemd import Notifier, inherited_sockets, match_listeners

log = logging.getLogger("sniproxy.run")

Run = Coroutine[Any, Any, None]


def proxy(config: Config, text: bytes, load: Loader, *, log_level: str | None, access_log: bool,
          worker_argv: list[str]) -> Run:
    """A single process, or with ``[server] workers`` > 1 a supervisor that starts workers
    with ``worker_argv`` (this command line) plus their channel."""
    handlers = setup_logging(config.log, log_level)
    preflight.raise_descriptor_limit()  # workers inherit it
    for warning in preflight.config_warnings(config):  # what `check` warns about, said at start too
        log.warning("%s", warning)
    # Every listener is bound (or adopted) before the event loop starts and before any
    # privilege drop.
    sockets = inherited_sockets(config)
    socket_activated = bool(sockets)  # then [[listen]] is fixed by the socket unit
    for listen in config.listen:
        if listen.key not in sockets:
            sockets[listen.key] = bind(listen)
    reopen = _reopener(handlers)
    if config.server.workers > 1:
        # Like nginx's master, the supervisor keeps its privileges (to start workers and
        # reopen logs); it never touches a connection. Each worker drops them once started.
        async def supervise() -> None:
            sup = Supervisor(config, text, sockets, worker_argv, load, reopen)
            sup.fixed_listeners = socket_activated
            await Lifecycle(sup, Notifier()).main()

        return supervise()
    access = _access_log(config.log.access if access_log else "off")

    async def serve() -> None:
        server = Server(config, asyncio.get_running_loop(), access, load, reopen)
        server.sockets = sockets
        server.fixed_listeners = socket_activated
        await Lifecycle(server, Notifier()).main(after_start=lambda: _drop_root(config))

    return serve()


def worker(config: Config, channel: socket.socket, fds: list[int], index: int, load: Loader, *,
           log_level: str | None, access_log: bool) -> Run:
    """One worker of a supervisor: its listeners are the supervisor's sockets ``fds``, its
    config came over ``channel``, and it answers there. Workers write the access log."""
    handlers = setup_logging(config.log, log_level, f" worker={index}")
    match = match_listeners([socket.socket(fileno=fd) for fd in fds], [entry.key for entry in config.listen])
    for sock in match.extra:
        sock.close()
    access = _access_log(config.log.access if access_log else "off")

    async def work() -> None:
        server = Server(config, asyncio.get_running_loop(), access, load, _reopener(handlers))
        server.sockets = match.matched
        lifecycle = Lifecycle(server, WorkerChannel(channel, server.snapshot, lambda: lifecycle.signal(Flag.STOP)),
                              serves_metrics=False, takes_reloads=False, delays_drain=False)
        await lifecycle.main(after_start=lambda: _drop_root(config))

    return work()


def _reopener(handlers: list) -> Callable[[], None]:
    def reopen() -> None:
        for handler in handlers:
            handler.reopen()
    return reopen


def _access_log(target: str) -> AccessLog | None:
    if target == "off":
        return None
    try:
        return AccessLog(target)
    except OSError as exc:
        raise SniproxyError(f"cannot open access log {target}: {exc.strerror}") from None


def _drop_root(config: Config) -> None:
    """Once listening: listeners and log files are open, so root is no longer needed."""
    user = config.server.user
    if user and os.geteuid() == 0:
        drop_privileges(user, config.server.group)
        log.info("running as user %s", user)
    elif os.geteuid() == 0 and not os.environ.get("INVOCATION_ID"):
        log.warning("running as root: set [server] user to drop privileges after binding")
