"""Listening sockets: bind them, and serve each with HelloProtocol."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING

from .allow import Allowlist
from .config import Listen
from .connection import HelloProtocol
from .errors import SniproxyError

if TYPE_CHECKING:
    from .server import Server

BACKLOG = 4096


class BindError(SniproxyError):
    pass


class ListenerInfo:
    """What a connection needs to know about the listener that accepted it. Mutable: a
    reload updates the allowlist and PROXY option in place, without re-binding."""

    __slots__ = ("name", "allow", "proxy_protocol")

    def __init__(self, listen: Listen, server_allow: tuple[str, ...]):
        self.name = listen_name(listen)
        self.update(listen, server_allow)

    def update(self, listen: Listen, server_allow: tuple[str, ...]) -> None:
        self.allow = Allowlist(listen.allow if listen.allow is not None else server_allow)
        self.proxy_protocol = listen.proxy_protocol


def listen_name(listen: Listen) -> str:
    return f"[{listen.address}]:{listen.port}" if ":" in listen.address else f"{listen.address}:{listen.port}"


def is_wildcard(address: str) -> bool:
    return ipaddress.ip_address(address).is_unspecified


def bind(listen: Listen, reuse_port: bool = False) -> socket.socket:
    family = socket.AF_INET6 if ":" in listen.address else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            # [::]:443 next to 0.0.0.0:443 must not claim the IPv4 side too.
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((listen.address, listen.port))
        sock.listen(BACKLOG)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        raise BindError(f"cannot listen on {listen_name(listen)}: {exc.strerror or exc}") from None
    return sock


async def serve(server: Server, info: ListenerInfo, sock: socket.socket) -> asyncio.AbstractServer:
    return await server.loop.create_server(lambda: HelloProtocol(server, info), sock=sock, backlog=BACKLOG)
