"""Command line: parse arguments, load config, hand over. Only this module picks the event loop.

`check` is `run` up to the point where it would serve, as `nginx -t` is: the config, the
region, the accounts, the log files and every address it would bind, each problem one line.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from . import config as config_mod
from . import regions
from .engine.listener import listen_name
from .errors import BindError, ConfigError, SniproxyError
from .hostnames import format_address
from .process import preflight
from .tools.hosts import hosts_lines


def _has_ipv6() -> bool:
    try:
        socket.socket(socket.AF_INET6, socket.SOCK_STREAM).close()
    except OSError:
        return False
    return True


def _load(args: argparse.Namespace) -> config_mod.Config:
    return _load_text(args)[0]


def _load_text(args: argparse.Namespace) -> tuple[config_mod.Config, bytes]:
    """The config, and the file bytes it came from (empty for --region/--account). Used at
    start and on every reload, so it checks only what the config says, never this host."""
    if getattr(args, "region", None) or getattr(args, "account", None):
        if args.config:
            raise ConfigError("", "give either --config or --region/--account, not both")
        if not (args.region and args.account):
            raise ConfigError("", "--region and --account go together")
        config, text = config_mod.embedded(args.region, args.account, ipv6=_has_ipv6()), b""
    else:
        path = args.config or config_mod.DEFAULT_PATH
        text = config_mod.read(path)
        config = config_mod.loads(text, path)
    if config.region is not None:
        verdict = regions.judge(config.region)
        if verdict.level == "error":
            raise ConfigError("ecr.region", verdict.message)
    return config, text


# -- logging --------------------------------------------------------------------------------------

class ReopeningFileHandler(logging.FileHandler):
    """A log file that logrotate can move away: SIGUSR1 reopens it under its name."""

    def reopen(self) -> None:
        stream = self._open()  # first: if this fails, the old file keeps working
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        if old is not None:
            old.close()


class _Stamped(logging.Formatter):
    """UTC, ISO 8601 with milliseconds: the access log's time format."""

    converter = time.gmtime
    default_time_format = "%Y-%m-%dT%H:%M:%S"
    default_msec_format = "%s.%03dZ"


def journal_stderr(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether stderr is journald's stream, which stamps every line itself: JOURNAL_STREAM
    names its device and inode (systemd.exec(5)), and a redirected stderr no longer matches."""
    try:
        device, inode = (int(n) for n in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _handler(target: str, fmt: str) -> logging.Handler:
    if target == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = ReopeningFileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise SniproxyError(f"cannot open log file {target}: {exc.strerror}") from None
    handler.setFormatter(_Stamped(fmt))
    return handler


def setup_logging(log: config_mod.LogConfig, level: str | None = None, tag: str = "",
                  environ: Mapping[str, str] = os.environ) -> list[logging.Handler]:
    """Route the error log; returns the handlers to reopen on SIGUSR1. ``tag`` names a worker.
    Lines carry a timestamp, except on journald's stream, which has its own."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = f"%(levelname)s %(name)s{tag}: %(message)s"
    stamped = log.error != "stderr" or not journal_stderr(environ)
    root.addHandler(_handler(log.error, "%(asctime)s " + fmt if stamped else fmt))
    root.setLevel((level or log.level).upper())
    return [h for h in root.handlers if isinstance(h, ReopeningFileHandler)]


# -- socket activation ----------------------------------------------------------------------------

def _inherited_sockets(config: config_mod.Config) -> dict:
    """Sockets passed by systemd socket activation, matched to [[listen]] by bound address.

    They must match exactly: a socket with no [[listen]] entry would be a black hole (systemd
    keeps it open and the kernel keeps queueing connections nobody accepts), and a [[listen]]
    entry with no socket loses what the socket unit gives (FreeBind=, connections queued
    across restarts). Either is a deployment mistake, refused in one line that says the fix."""
    from .process.systemd import activation_mismatch, listen_fds, match_listeners, unit_name

    fds = listen_fds()
    if not fds:
        return {}
    match = match_listeners([f.sock for f in fds], [entry.key for entry in config.listen])
    unit = unit_name([f.name for f in fds])
    if match.extra or match.missing:
        message = activation_mismatch(unit, [_sockname(s) for s in match.extra],
                                      [format_address(*key) for key in match.missing])
        for f in fds:
            f.sock.close()
        raise SniproxyError(message)
    logging.getLogger("sniproxy").info("socket activation: %d listeners from systemd", len(match.matched))
    return match.matched


def _sockname(sock) -> str:
    try:
        host, port = sock.getsockname()[:2]
        return format_address(host, port)
    except (OSError, ValueError):
        return f"fd {sock.fileno()}"


def cmd_run(args: argparse.Namespace) -> int:
    import asyncio
    import os

    import uvloop

    from .engine.listener import bind
    from .observe.accesslog import AccessLog
    from .process.lifecycle import Flag, Lifecycle
    from .process.privdrop import drop_privileges

    worker = args.worker_channel is not None
    if worker:
        from .process.supervisor import read_initial_config

        channel = socket.socket(fileno=args.worker_channel)
        text = read_initial_config(channel)
        config = config_mod.loads(text, args.config or config_mod.DEFAULT_PATH) if text else _load(args)
    else:
        config, text = _load_text(args)
    handlers = setup_logging(config.log, args.log_level, f" worker={args.worker_index}" if worker else "")
    log = logging.getLogger("sniproxy")
    if not worker:
        for warning in preflight.config_warnings(config):  # what `check` warns about, said at start too
            log.warning("%s", warning)

    def reopen() -> None:
        for handler in handlers:
            handler.reopen()

    # Every listener is bound (or adopted) before the event loop starts and before any
    # privilege drop: a worker gets the supervisor's sockets, the others bind what systemd
    # did not pass.
    sockets = _worker_sockets(config, args.worker_fds) if worker else _inherited_sockets(config)
    socket_activated = bool(sockets) and not worker  # then [[listen]] is fixed by the socket unit
    if not worker:
        for listen in config.listen:
            if listen.key not in sockets:
                sockets[listen.key] = bind(listen)
    supervisor = config.server.workers > 1 and not worker
    access_target = "off" if args.no_access_log or supervisor else config.log.access  # workers write it
    try:
        access = AccessLog(access_target) if access_target != "off" else None
    except OSError as exc:
        raise SniproxyError(f"cannot open access log {access_target}: {exc.strerror}") from None

    def drop_root() -> None:
        user = config.server.user
        if user and os.geteuid() == 0:
            # Listeners and log files are open: root is no longer needed.
            drop_privileges(user, config.server.group)
            log.info("running as user %s", user)
        elif os.geteuid() == 0 and not os.environ.get("INVOCATION_ID"):
            log.warning("running as root: set [server] user to drop privileges after binding")

    async def supervise() -> None:
        from .process.supervisor import Supervisor
        from .process.systemd import Notifier

        # Like nginx's master, the supervisor keeps its privileges (to start workers and
        # reopen logs); it never touches a connection. Each worker drops them once started.
        sup = Supervisor(config, text, sockets, sys.argv[1:], lambda: _load_text(args), reopen)
        sup.fixed_listeners = socket_activated
        lifecycle = Lifecycle(sup, Notifier())
        lifecycle.install_signal_handlers(asyncio.get_running_loop())
        await lifecycle.run()  # no privilege drop: the supervisor keeps root

    async def serve() -> None:
        from .process.server import Server
        from .process.systemd import Notifier

        loop = asyncio.get_running_loop()
        if access is not None:
            access.loop = loop
        server = Server(config, loop, access, lambda: _load(args), reopen)
        server.sockets = sockets
        server.fixed_listeners = socket_activated
        if worker:
            from .process.supervisor import WorkerChannel

            notifier = WorkerChannel(channel, server.snapshot, lambda: lifecycle.signal(Flag.STOP))
            lifecycle = Lifecycle(server, notifier, serves_metrics=False, takes_reloads=False, delays_drain=False)
        else:
            lifecycle = Lifecycle(server, Notifier())
        lifecycle.install_signal_handlers(loop)  # before anything else: an early signal must not kill us
        if worker:
            await notifier.start()
        await lifecycle.run(after_start=drop_root)
        if worker:
            await notifier.final()

    uvloop.run(supervise() if supervisor else serve())
    return 0


def _worker_sockets(config: config_mod.Config, fds: str) -> dict:
    """A worker's listeners: the supervisor's sockets, matched to [[listen]] by address."""
    from .process.systemd import match_listeners

    socks = [socket.socket(fileno=int(fd)) for fd in fds.split(",") if fd]
    match = match_listeners(socks, [entry.key for entry in config.listen])
    for sock in match.extra:
        sock.close()
    return match.matched


def cmd_check(args: argparse.Namespace) -> int:
    from .engine.splice import splice_enabled

    config = _load(args)
    splice_enabled(config.server.splice)  # "on" where splice(2) does not work is an error
    problems = [] if args.config_only else preflight.problems(config)
    for problem in problems:
        print(problem, file=sys.stderr)
    if problems:
        return 2
    if args.quiet:
        return 0
    for warning in preflight.config_warnings(config):
        print(f"warning: {warning}", file=sys.stderr)
    print(f"config {config.source}: ok")
    print("listeners:")
    for listen in config.listen:
        print(f"  {listen_name(listen)}")
    r = config.resolver
    print(f"resolver: {', '.join(r.nameservers)} port {r.port} timeout {r.timeout:g}s")
    if config.metrics.enabled:
        print(f"metrics: http://{format_address(config.metrics.address, config.metrics.port)}/metrics")
    print("routes:")
    for route in config.routes:
        target = route.upstream or "<sni>"
        print(f"  {route.name} -> {target}:{route.port}")
        for pattern in route.patterns:
            print(f"    {pattern}")
    return 0


def cmd_hosts(args: argparse.Namespace) -> int:
    config = _load(args)
    address = args.address
    if address is None:
        specific = [entry.address for entry in config.listen if not ipaddress.ip_address(entry.address).is_unspecified]
        if not specific:
            raise ConfigError("", "the listeners are wildcards: give --address with the IP builders should use")
        address = specific[0]
    try:
        ipaddress.ip_address(address)
    except ValueError:
        raise ConfigError("", f"--address {address!r} is not an IP address") from None
    print("\n".join(hosts_lines(config, address)))
    return 0


# -- files: the units, the example config, alerts and dashboard -----------------------------------

#: Where the files live in a checkout; a wheel installs the same files as data, under
#: <prefix>/share/sniproxy (see pyproject.toml).
CHECKOUT_FILES = Path(__file__).resolve().parent.parent / "systemd"
SHARE = "share/sniproxy/"


def share_files() -> dict[str, Path]:
    """name -> path of the shipped files: from this checkout when run from one, else as installed."""
    if (CHECKOUT_FILES / "sniproxy.service").is_file():
        return {p.name: p for p in sorted(CHECKOUT_FILES.iterdir()) if p.is_file()}
    from importlib import metadata

    try:
        dist = metadata.distribution("sniproxy")
    except metadata.PackageNotFoundError:
        return {}
    found = {}
    for f in dist.files or ():
        text = str(f).replace("\\", "/")
        if SHARE in text:
            path = Path(str(dist.locate_file(f))).resolve()
            found[path.name] = path
    return dict(sorted(found.items()))


def cmd_files(args: argparse.Namespace) -> int:
    files = share_files()
    if not files:
        raise SniproxyError("no shipped files found: reinstall sniproxy from its wheel")
    if args.name is None:
        for path in files.values():
            print(path)
        return 0
    if args.name not in files:
        raise SniproxyError(f"no file {args.name!r}; there are: {', '.join(files)}")
    sys.stdout.write(files[args.name].read_text())
    return 0


class _Version(argparse.Action):
    """--version, read from the installed metadata only when asked."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, help=None):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser, namespace, values, option_string=None):
        from .process.lifecycle import version

        print(f"sniproxy {version()}")
        parser.exit()


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sniproxy", description="TLS SNI pass-through proxy for Amazon ECR.")
    p.add_argument("--version", action=_Version, help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help=f"TOML config (default {config_mod.DEFAULT_PATH})")
        sp.add_argument("--region", help="serve the built-in ECR routes of this region (no config file)")
        sp.add_argument("--account", action="append", help="ECR registry id allowed on the dkr name (repeatable)")

    run = sub.add_parser("run", help="run the proxy in the foreground")
    with_config(run)
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides [log] level")
    run.add_argument("--no-access-log", action="store_true", help="do not log one JSON line per connection")
    # Internal: how the supervisor starts its workers.
    run.add_argument("--worker-channel", type=int, help=argparse.SUPPRESS)
    run.add_argument("--worker-fds", default="", help=argparse.SUPPRESS)
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config, and that this host can run it (accounts, log files, "
                           "addresses); print the listeners and routes")
    with_config(check)
    check.add_argument("--quiet", "-q", action="store_true", help="print errors only (for ExecReload=)")
    check.add_argument("--config-only", action="store_true", help="check the config alone, not this host: for a "
                       "config meant for another machine")
    check.set_defaults(func=cmd_check)

    hosts = sub.add_parser("hosts", help="print the /etc/hosts lines builders need")
    with_config(hosts)
    hosts.add_argument("--address", help="the proxy address builders connect to")
    hosts.set_defaults(func=cmd_hosts)

    files = sub.add_parser("files", help="list the shipped systemd units, example config, logrotate file, alerts "
                           "and dashboard, or print one")
    files.add_argument("name", nargs="?", help="the file to print, e.g. sniproxy.service")
    files.set_defaults(func=cmd_files)

    from .tools import discover, doctor, policy

    d = sub.add_parser("discover", help="find the ECR/S3 VPC endpoints and write a config (read-only AWS calls)")
    discover.add_arguments(d)
    d.set_defaults(func=discover.main)
    dr = sub.add_parser("doctor", help="check DNS, TCP and TLS to every route's upstream, the listeners and metrics")
    doctor.add_arguments(dr)
    dr.set_defaults(func=doctor.main)
    pol = sub.add_parser("policy", help="write the minimal VPC endpoint policies for the registries the config routes")
    policy.add_arguments(pol)
    pol.set_defaults(func=policy.main)
    return p


def _hint(exc: BaseException) -> str:
    """A failed bind says what to do."""
    hint = preflight.BIND_HINTS.get(exc.errno) if isinstance(exc, BindError) else None
    return f" ({hint})" if hint else ""


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        code = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught below, not at exit
        return code
    except (ConfigError, SniproxyError) as exc:
        print(exc if isinstance(exc, ConfigError) else f"sniproxy: {exc}{_hint(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `sniproxy check | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":
    sys.exit(main())
