"""Command line: parse arguments, load config, hand over. Only this module picks the event loop.

`check` is `run` up to the point where it would serve, as `nginx -t` is: the config, the
region, the accounts, the log files and every address it would bind, each problem one line.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
from pathlib import Path

from . import config as config_mod
from . import regions
from .addresses import format_address, is_ip, is_unspecified
from .engine.listener import listen_name
from .errors import BindError, ConfigError, SniproxyError
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
        config = config_mod.embedded(args.region, args.account, ipv6=_has_ipv6(), port=getattr(args, "port", None))
        text = b""
    elif getattr(args, "port", None) is not None:
        raise ConfigError("", "--port goes with --region/--account; a config file sets [[listen]] port")
    else:
        path = args.config or config_mod.DEFAULT_PATH
        text = config_mod.read(path)
        config = config_mod.loads(text, path)
    if config.region is not None:
        verdict = regions.judge(config.region)
        if verdict.level == "error":
            raise ConfigError("ecr.region", verdict.message)
    return config, text


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from .process import run

    def load() -> tuple[config_mod.Config, bytes]:
        return _load_text(args)

    access_log = not args.no_access_log
    if args.worker_channel is None:
        config, text = load()
        main = run.proxy(config, text, load, log_level=args.log_level, access_log=access_log,
                         worker_argv=sys.argv[1:])
    else:
        from .process.channel import read_initial_config

        channel = socket.socket(fileno=args.worker_channel)
        text = read_initial_config(channel)  # the config the supervisor validated
        config = config_mod.loads(text, args.config or config_mod.DEFAULT_PATH) if text else load()[0]
        fds = [int(fd) for fd in args.worker_fds.split(",") if fd]
        main = run.worker(config, channel, fds, args.worker_index, load, log_level=args.log_level,
                          access_log=access_log)
    uvloop.run(main)
    return 0


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
        specific = [entry.address for entry in config.listen if not is_unspecified(entry.address)]
        if not specific:
            raise ConfigError("", "the listeners are wildcards: give --address with the IP builders should use")
        address = specific[0]
    if not is_ip(address):
        raise ConfigError("", f"--address {address!r} is not an IP address")
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
        if SHARE in text and "/" not in text.split(SHARE, 1)[1]:  # the files, not docs/
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

    def with_port(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--port", type=int, help="with --region: the port to listen on, e.g. 8443 for a user "
                        "that may not bind 443 (default: [[listen]] port's)")

    run = sub.add_parser("run", help="run the proxy in the foreground")
    with_config(run)
    with_port(run)
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
    with_port(check)
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

    from .tools import bundle, discover, doctor, policy

    d = sub.add_parser("discover", help="find the ECR/S3 VPC endpoints and write a config (read-only AWS calls)")
    discover.add_arguments(d)
    d.set_defaults(func=discover.main)
    dr = sub.add_parser("doctor", help="check DNS, TCP and TLS to every route's upstream, the listeners and metrics")
    doctor.add_arguments(dr)
    dr.set_defaults(func=doctor.main)
    pol = sub.add_parser("policy", help="write the minimal VPC endpoint policies for the registries the config routes")
    policy.add_arguments(pol)
    pol.set_defaults(func=policy.main)
    b = sub.add_parser("bundle", help="make an offline install tarball: the sniproxy wheel and every dependency's "
                       "wheel for a CPython and architectures, pinned with hashes")
    bundle.add_arguments(b)
    b.set_defaults(func=bundle.main)
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
