"""Listening sockets: bind them, and serve each with HelloProtocol."""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import TYPE_CHECKING

from .config import Listen
from .connection import HelloProtocol
from .errors import SniproxyError

if TYPE_CHECKING:
    from .server import Server

BACKLOG = 4096


class BindError(SniproxyError):
    pass


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


async def serve(server: "Server", listen: Listen, sock: socket.socket) -> asyncio.AbstractServer:
    name = listen_name(listen)
    return await server.loop.create_server(lambda: HelloProtocol(server, name), sock=sock, backlog=BACKLOG)
