from __future__ import annotations

import os
import ssl

import pytest
import trustme

from tests.helpers import DnsServer, Proxy, Server, free_port

NAME = "api.ecr.us-east-1.amazonaws.com"
OTHER = "123456789012.dkr.ecr.us-east-1.amazonaws.com"


def echo(conn) -> None:
    """Upstream behaviour for most scenarios: echo everything, then pass the FIN back."""
    import socket

    while True:
        data = conn.recv(65536)
        if not data:
            conn.shutdown(socket.SHUT_WR)
            return
        conn.sendall(data)


@pytest.fixture(scope="session")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def dns_server():
    server = DnsServer("127.0.0.1")
    yield server
    server.close()


def make_hello(sni: str | None, alpn: list[str] | None = None) -> bytes:
    """A real ClientHello from Python's ssl module, taken from a memory BIO."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if alpn:
        ctx.set_alpn_protocols(alpn)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname=sni)
    try:
        obj.do_handshake()
    except ssl.SSLWantReadError:
        pass
    return outgoing.read()


#: The whole integration suite runs once per data path and worker count: CI sets these.
TEST_SPLICE = os.environ.get("SNIPROXY_TEST_SPLICE", "auto")
TEST_WORKERS = os.environ.get("SNIPROXY_TEST_WORKERS", "1")


def proxy_config(listen_port: int, dns: DnsServer, routes: str, server: str = "", listen_address: str = "127.0.0.1") -> str:
    if "splice" not in server:
        server += f'\nsplice = "{TEST_SPLICE}"'
    if "workers" not in server:
        server += f"\nworkers = {TEST_WORKERS}"
    return f"""
[[listen]]
address = "{listen_address}"
port = {listen_port}

[resolver]
nameservers = ["{dns.host}"]
port = {dns.port}
timeout = 1.0

[server]
{server}

[metrics]
address = "127.0.0.1"
port = {free_port()}

{routes}
"""


@pytest.fixture
def upstream(dns_server):
    """An echo server on 127.0.0.2 that NAME and OTHER resolve to."""
    server = Server(echo, host="127.0.0.2")
    dns_server.add(NAME, "127.0.0.2")
    dns_server.add(OTHER, "127.0.0.2")
    yield server
    server.close()


@pytest.fixture
def start_proxy(tmp_path):
    started: list[Proxy] = []

    def start(config: str, *args: str) -> Proxy:
        proxy = Proxy(tmp_path, config, args)
        started.append(proxy)
        return proxy

    yield start
    for proxy in started:
        if proxy.proc.poll() is None:
            proxy.proc.kill()
            proxy.proc.wait(5)
        print("proxy log:\n" + "\n".join(proxy.log.lines))  # shown by pytest on failure
        assert not [line for line in proxy.log.lines if "Traceback" in line], "the proxy logged a traceback"
