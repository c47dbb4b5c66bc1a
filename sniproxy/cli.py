"""Command line: parse arguments, load config, hand over. Only this module picks the event loop."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import sys

from . import config as config_mod
from .errors import ConfigError, SniproxyError
from .hosts import hosts_lines
from .listener import listen_name


def _load(args: argparse.Namespace) -> config_mod.Config:
    if getattr(args, "region", None) or getattr(args, "account", None):
        if args.config:
            raise ConfigError("", "give either --config or --region/--account, not both")
        if not (args.region and args.account):
            raise ConfigError("", "--region and --account go together")
        return config_mod.embedded(args.region, args.account)
    return config_mod.load(args.config or config_mod.DEFAULT_PATH)


def setup_logging(level: str) -> None:
    root = logging.getLogger()
    root.handlers.clear()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    root.setLevel(level.upper())
    access = logging.getLogger("sniproxy.access")
    access.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(h)
    access.propagate = False
    access.setLevel(logging.INFO)


def cmd_run(args: argparse.Namespace) -> int:
    import uvloop

    from .server import Server

    config = _load(args)
    setup_logging(args.log_level)

    async def main() -> None:
        import asyncio

        server = Server(config, asyncio.get_running_loop(), access_log=not args.no_access_log)
        server.install_signal_handlers()  # before listening: an early signal must not kill us
        await server.start()
        await server.run(lambda: _load(args))

    uvloop.run(main())
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    config = _load(args)
    print(f"config {config.source}: ok")
    print("listeners:")
    for listen in config.listen:
        print(f"  {listen_name(listen)}")
    r = config.resolver
    print(f"resolver: {', '.join(r.nameservers)} port {r.port} timeout {r.timeout:g}s")
    if config.metrics.enabled:
        print(f"metrics: http://{listen_name(config_mod.Listen(config.metrics.address, config.metrics.port))}/metrics")
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


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sniproxy", description="TLS SNI pass-through proxy for Amazon ECR.")
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--config", "-c", help=f"TOML config (default {config_mod.DEFAULT_PATH})")
        sp.add_argument("--region", help="serve the built-in ECR routes of this region (no config file)")
        sp.add_argument("--account", action="append", help="ECR registry id allowed on the dkr name (repeatable)")

    run = sub.add_parser("run", help="run the proxy in the foreground")
    with_config(run)
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--no-access-log", action="store_true", help="do not log one JSON line per connection")
    run.set_defaults(func=cmd_run)

    check = sub.add_parser("check", help="validate a config and print the listeners and routes")
    with_config(check)
    check.set_defaults(func=cmd_check)

    hosts = sub.add_parser("hosts", help="print the /etc/hosts lines builders need")
    with_config(hosts)
    hosts.add_argument("--address", help="the proxy address builders connect to")
    hosts.set_defaults(func=cmd_hosts)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SniproxyError) as exc:
        print(exc if isinstance(exc, ConfigError) else f"sniproxy: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
