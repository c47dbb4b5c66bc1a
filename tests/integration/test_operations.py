"""Running it like infrastructure: socket activation, sd_notify, privilege drop, allowlists,
per-client limits, PROXY protocol and log reopening, all on a real ``sniproxy run``."""

from __future__ import annotations

import ipaddress
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys

import pytest

from tests.helpers import REPO, LineLog, clean_env, connect_from, free_port, recv_all, recv_exactly, refused, socket_activated
from tests.integration.conftest import NAME, make_hello, proxy_config
from tests.integration.test_lifecycle import open_forwarding
from tests.integration.test_proxy import route

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")

#: Connection limits count per worker process, like nginx's worker_connections.
single_worker = pytest.mark.skipif(os.environ.get("SNIPROXY_TEST_WORKERS", "1") != "1",
                                   reason="limits are per worker; with several workers they add up")



class NotifySocket:
    """A real NOTIFY_SOCKET: a datagram socket collecting what the service tells systemd."""

    def __init__(self, path: str):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(15)
        self.messages: list[str] = []

    def wait_for(self, key: str) -> str:
        for message in self.messages:
            if key in message.split("\n"):
                return message
        while True:
            message = self.sock.recv(4096).decode()
            self.messages.append(message)
            if key in message.split("\n"):
                return message


def test_socket_activation_with_notify_reload_watchdog_and_stop(tmp_path, dns_server, upstream):
    """systemd-socket-activate binds three addresses and passes them in; the proxy adopts
    them, says READY, pings the watchdog from its loop, and reports RELOADING/STOPPING."""
    addresses = ["127.0.6.1", "127.0.6.2", "127.0.6.3"]
    port = free_port(*addresses)
    listens = "".join(f'[[listen]]\naddress = "{a}"\nport = {port}\n' for a in addresses)
    config = proxy_config(port, dns_server, route(port=upstream.port)).split("[resolver]", 1)
    text = listens + "[resolver]" + config[1]
    path = tmp_path / "sniproxy.toml"
    path.write_text(text)
    notify = NotifySocket(str(tmp_path / "notify"))
    environ = (f"NOTIFY_SOCKET={notify.path}", "WATCHDOG_USEC=200000")
    with socket_activated(path, [f"{a}:{port}" for a in addresses], *environ) as (proc, log):
        for a in addresses:
            s = open_forwarding_at(a, port)
            s.close()
        ready = notify.wait_for("READY=1")
        assert "STATUS=" in ready
        notify.wait_for("WATCHDOG=1")
        log.wait_for("socket activation: 3 listeners from systemd")
        assert not [line for line in log.lines if "binding it here" in line]
        os.kill(proc.pid, signal.SIGHUP)
        reloading = notify.wait_for("RELOADING=1")
        assert any(line.startswith("MONOTONIC_USEC=") for line in reloading.split("\n"))
        notify.messages.clear()
        notify.wait_for("READY=1")
        os.kill(proc.pid, signal.SIGTERM)
        notify.wait_for("STOPPING=1")
        assert proc.wait(10) == 0


def open_forwarding_at(address: str, port: int) -> socket.socket:
    s = socket.create_connection((address, port), timeout=10)
    hello = make_hello(NAME)
    s.sendall(hello)
    assert recv_exactly(s, len(hello)) == hello
    return s


def sniproxy_lines(log: LineLog) -> list[str]:
    """What sniproxy wrote, after systemd-socket-activate's own lines."""
    lines = [line for line in log.lines if line != "<EOF>"]
    execing = [i for i, line in enumerate(lines) if line.startswith("Execing ")]
    return lines[execing[0] + 1:] if execing else lines


def test_socket_activation_refuses_missing_and_extra_sockets(tmp_path, dns_server, upstream):
    """A socket with no [[listen]] would be a black hole under systemd (it keeps the socket
    open); a [[listen]] with no socket would lose FreeBind= and the queue across restarts.
    Either is a deployment mistake: refused in one line naming both sides and the fix."""
    port = free_port("127.0.6.4")
    text = proxy_config(port, dns_server, route(port=upstream.port), listen_address="127.0.6.4")
    path = tmp_path / "sniproxy.toml"
    path.write_text(text)
    with socket_activated(path, [f"127.0.6.5:{port}"]) as (proc, log):
        socket.create_connection(("127.0.6.5", port), timeout=10).close()  # systemd-socket-activate execs now
        assert proc.wait(20) == 2
        log.wait_for("<EOF>")
        assert sniproxy_lines(log) == [
            f"sniproxy: socket activation: the socket unit passes 127.0.6.5:{port}, which no [[listen]] names; "
            f"[[listen]] 127.0.6.4:{port} is not passed by the socket unit: make ListenStream= match [[listen]] "
            "(systemctl edit sniproxy.socket), then systemctl restart sniproxy"]


def check(path, **environ: str) -> subprocess.CompletedProcess:
    """`sniproxy check --quiet`, as ExecReload= runs it (systemd sets MAINPID)."""
    return subprocess.run([sys.executable, "-m", "sniproxy", "check", "--quiet", "--config", str(path)],
                          capture_output=True, text=True, env=clean_env(**environ), timeout=60)


def test_check_as_exec_reload_under_socket_activation(tmp_path, dns_server, upstream):
    """The addresses the running service holds pass; a [[listen]] added or dropped does not,
    since systemd's sockets change only on restart: the error says which ListenStream= to
    add or remove. Whether systemd passes MAINPID or not (an operator's own check)."""
    addresses = ["127.0.6.7", "127.0.6.8"]
    port = free_port(*addresses)
    listens = "".join(f'[[listen]]\naddress = "{a}"\nport = {port}\n' for a in addresses)
    text = listens + "[resolver]" + proxy_config(port, dns_server, route(port=upstream.port)).split("[resolver]", 1)[1]
    path = tmp_path / "sniproxy.toml"
    path.write_text(text)
    with socket_activated(path, [f"{a}:{port}" for a in addresses]) as (proc, log):
        open_forwarding_at("127.0.6.7", port).close()
        log.wait_for("socket activation: 2 listeners from systemd")
        log.wait_for(r"sniproxy\.lifecycle: ready")
        for environ in ({"MAINPID": str(proc.pid)}, {}):
            path.write_text(text)
            out = check(path, **environ)
            assert (out.returncode, out.stdout, out.stderr) == (0, "", ""), out.stderr  # what it holds passes

            path.write_text(f'[[listen]]\naddress = "127.0.6.9"\nport = {port}\n' + text)
            out = check(path, **environ)
            assert out.returncode == 2 and out.stdout == ""
            assert out.stderr == (
                f"sniproxy: listen[0] 127.0.6.9:{port} is not passed by the socket unit to the running sniproxy "
                f"(pid {proc.pid}), and a reload cannot add a socket: add ListenStream=127.0.6.9:{port} "
                "(systemctl edit sniproxy.socket), then systemctl restart sniproxy\n")

            path.write_text(text.split("[[listen]]", 2)[0] + "[[listen]]" + text.split("[[listen]]", 2)[2])
            out = check(path, **environ)
            assert out.returncode == 2 and out.stdout == ""
            assert out.stderr == (
                f"sniproxy: the socket unit passes 127.0.6.7:{port} to the running sniproxy (pid {proc.pid}), and no "
                f"[[listen]] names it any more: remove ListenStream=127.0.6.7:{port} (systemctl edit "
                "sniproxy.socket), then systemctl restart sniproxy\n")


def test_check_as_exec_reload_of_a_service_that_binds(tmp_path, dns_server, upstream, start_proxy):
    """Without socket activation, the running proxy's listeners and metrics port pass, and a
    new listener only has to be free: the reload binds it."""
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port)))
    out = check(proxy.path, MAINPID=str(proxy.proc.pid))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    proxy.path.write_text(proxy.path.read_text().replace(
        "[resolver]", f'[[listen]]\naddress = "127.0.0.1"\nport = {free_port()}\n[resolver]'))
    out = check(proxy.path, MAINPID=str(proxy.proc.pid))
    assert (out.returncode, out.stdout, out.stderr) == (0, "", "")
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    try:
        proxy.path.write_text(proxy.path.read_text().replace(
            "[resolver]", f'[[listen]]\naddress = "127.0.0.1"\nport = {held.getsockname()[1]}\n[resolver]'))
        out = check(proxy.path, MAINPID=str(proxy.proc.pid))
        assert out.returncode == 2
        assert out.stderr.startswith(f"sniproxy: cannot listen on 127.0.0.1:{held.getsockname()[1]} (listen[2]): "
                                     f"in use by pid {os.getpid()} ("), out.stderr
    finally:
        held.close()


@root_only
def test_root_binds_then_drops_to_the_configured_user(dns_server, upstream, start_proxy, tmp_path):
    os.chmod(tmp_path, 0o755)  # the dropped user must still read the config on reload
    nobody = pwd.getpwnam("nobody")
    proxy = start_proxy(proxy_config(443, dns_server, route(port=upstream.port), listen_address="127.0.6.6",
                                     server='user = "nobody"'))
    proxy.log.wait_for("running as user nobody")
    if os.environ.get("SNIPROXY_TEST_WORKERS", "1") != "1":
        proxy.log.wait_for("worker=1: running as user nobody")
    pids = proxy.pids()
    # One process, or a supervisor (which keeps root, like nginx's master) and its workers.
    serving = pids if len(pids) == 1 else pids[1:]
    for pid in serving:
        status = open(f"/proc/{pid}/status").read()
        uids = next(line for line in status.splitlines() if line.startswith("Uid:")).split()[1:]
        assert uids == [str(nobody.pw_uid)] * 4
    s = open_forwarding_at("127.0.6.6", 443)  # the port-443 listener still serves
    s.close()
    assert proxy.sample("sniproxy_connections_total", route="echo") == 1  # and metrics


def test_allowlist_per_server_and_per_listener(dns_server, upstream, start_proxy):
    port, port2 = free_port(), free_port("127.0.0.1")
    config = proxy_config(port, dns_server, route(port=upstream.port), server='allow = ["127.0.0.0/30"]')
    config = config.replace("[resolver]", f'[[listen]]\naddress = "127.0.0.1"\nport = {port2}\nallow = ["127.0.0.8/32"]\n\n[resolver]')
    proxy = start_proxy(config)
    hello = make_hello(NAME)
    for source, listen_port, ok in [("127.0.0.2", port, True), ("127.0.0.9", port, False),
                                    ("127.0.0.8", port2, True), ("127.0.0.2", port2, False)]:
        s = connect_from(source, listen_port)
        if ok:
            s.sendall(hello)
            s.shutdown(socket.SHUT_WR)
            assert recv_all(s) == hello
        else:
            assert refused(s)  # closed at accept, before it could send anything
    assert proxy.sample("sniproxy_connections_rejected_total", reason="denied") == 2
    assert upstream.accepted == 2


@single_worker
def test_per_client_limit_counts_each_address(dns_server, upstream, start_proxy):
    port = free_port()
    proxy = start_proxy(proxy_config(port, dns_server, route(port=upstream.port), server="max_connections_per_client = 2"))
    hello = make_hello(NAME)
    held = []
    for _ in range(2):
        s = connect_from("127.0.0.21", port)
        s.sendall(hello)
        recv_exactly(s, len(hello))
        held.append(s)
    third = connect_from("127.0.0.21", port)
    third.sendall(hello)
    assert refused(third)
    other = connect_from("127.0.0.22", port)  # another client is not affected
    other.sendall(hello)
    assert recv_exactly(other, len(hello)) == hello
    held[0].close()
    proxy.log.wait_for(r'"client":"127\.0\.0\.21:\d+".*"close":"(done|client_reset)"')
    again = connect_from("127.0.0.21", port)  # a slot freed up
    again.sendall(hello)
    assert recv_exactly(again, len(hello)) == hello
    assert proxy.sample("sniproxy_connections_rejected_total", reason="client_limit") == 1


def proxy_v2(src: str, sport: int, dst: str = "127.0.0.1", dport: int = 443) -> bytes:
    sig = b"\r\n\r\n\x00\r\nQUIT\n"
    addr = ipaddress.ip_address(src).packed + ipaddress.ip_address(dst).packed + struct.pack("!HH", sport, dport)
    return sig + bytes([0x21, 0x11]) + struct.pack("!H", len(addr)) + addr


@pytest.fixture
def pp_proxy(dns_server, upstream, start_proxy):
    """One listener expecting PROXY headers (allowing 10.8.0.0/16 only), one that does not."""
    pp_port, plain_port = free_port(), free_port()
    config = proxy_config(plain_port, dns_server, route(port=upstream.port), server="handshake_timeout = 1.0")
    config = config.replace("[resolver]", f'[[listen]]\naddress = "127.0.0.1"\nport = {pp_port}\nproxy_protocol = true\n'
                                          'allow = ["10.8.0.0/16"]\n\n[resolver]')
    return start_proxy(config), pp_port, plain_port


@pytest.mark.parametrize("header", [
    b"PROXY TCP4 10.8.3.7 10.0.1.10 50412 443\r\n",
    proxy_v2("10.8.3.7", 50412),
], ids=["v1", "v2"])
def test_proxy_protocol_gives_the_real_client(pp_proxy, header):
    proxy, pp_port, _ = pp_proxy
    hello = make_hello(NAME)
    s = socket.create_connection(("127.0.0.1", pp_port), timeout=10)
    s.sendall(header + hello)  # the upstream gets the hello, never the header
    s.shutdown(socket.SHUT_WR)
    assert recv_all(s) == hello
    proxy.log.wait_for(r'"client":"10\.8\.3\.7:50412"')


@pytest.mark.parametrize("header, reason", [
    (b"PROXY TCP4 192.0.2.1 10.0.1.10 50412 443\r\n", "denied"),  # real client outside the allowlist
    (b"PROXY TCP4 10.8.3.7 10.0.1.10 50412\r\n", "bad_proxy_header"),  # malformed
    (b"PROXY TCP4 10.8.3.7 10.0.1.10 50412 443" + b" " * 120 + b"\r\n", "bad_proxy_header"),  # oversized
    (b"PROXY TCP4 10.8.3.7 10.0.1.1", "handshake_timeout"),  # truncated
    (make_hello(NAME), "bad_proxy_header"),  # no header on a PROXY listener
])
def test_proxy_protocol_refusals(pp_proxy, upstream, header, reason):
    proxy, pp_port, _ = pp_proxy
    s = socket.create_connection(("127.0.0.1", pp_port), timeout=10)
    s.sendall(header)
    assert refused(s)
    proxy.log.wait_for(rf'"close":"{reason}"')
    assert upstream.accepted == 0


def test_proxy_header_on_a_plain_listener_is_not_tls(pp_proxy, upstream):
    """A spoofed client address cannot be injected where no balancer is expected."""
    proxy, _, plain_port = pp_proxy
    for header in (b"PROXY TCP4 10.8.3.7 10.0.1.10 50412 443\r\n", proxy_v2("10.8.3.7", 50412)):
        s = socket.create_connection(("127.0.0.1", plain_port), timeout=10)
        s.sendall(header + make_hello(NAME))
        assert refused(s)
    assert proxy.sample("sniproxy_connections_rejected_total", reason="not_tls") == 2
    assert upstream.accepted == 0


def test_log_files_are_reopened_on_sigusr1(tmp_path, dns_server, upstream, start_proxy):
    access, errors = tmp_path / "access.log", tmp_path / "error.log"
    port = free_port()
    config = proxy_config(port, dns_server, route(port=upstream.port))
    config += f'\n[log]\naccess = "{access}"\nerror = "{errors}"\n'
    proxy_path = tmp_path / "sniproxy.toml"
    proxy_path.write_text(config)
    proc = subprocess.Popen([sys.executable, "-m", "sniproxy", "run", "--config", str(proxy_path)],
                            env=clean_env(), cwd=str(REPO), stderr=subprocess.PIPE, text=True)
    try:
        _wait_file(errors, "metrics on")
        open_forwarding(port).close()
        _wait_file(access, '"close"')
        os.rename(access, tmp_path / "access.log.1")  # what logrotate does
        proc.send_signal(signal.SIGUSR1)
        _wait_file(errors, "log files reopened")
        open_forwarding(port).close()
        _wait_file(access, '"close"')
        assert len((tmp_path / "access.log.1").read_text().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    assert proc.stderr.read() == ""  # everything went to the files


def _wait_file(path, text: str, timeout: float = 10.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not (path.exists() and text in path.read_text()):
        if time.monotonic() > deadline:
            raise AssertionError(f"{text!r} not in {path}: {path.read_text() if path.exists() else 'missing'}")
        time.sleep(0.02)


def test_check_warns_about_an_open_wildcard_listener(tmp_path, dns_server):
    path = tmp_path / "c.toml"
    path.write_text(proxy_config(free_port(), dns_server, route(), listen_address="0.0.0.0"))
    out = subprocess.run([sys.executable, "-m", "sniproxy", "check", "--config", str(path)],
                         capture_output=True, text=True, env=clean_env(), timeout=30)
    assert out.returncode == 0
    assert out.stderr.startswith("warning: listener 0.0.0.0:") and "no allowlist" in out.stderr  # warnings: stderr
    assert "warning" not in out.stdout
    assert check(path).stderr == ""  # --quiet: errors only
    path.write_text(proxy_config(free_port(), dns_server, route(), listen_address="0.0.0.0",
                                 server='allow = ["10.8.0.0/16"]'))
    out = subprocess.run([sys.executable, "-m", "sniproxy", "check", "--config", str(path)],
                         capture_output=True, text=True, env=clean_env(), timeout=30)
    assert "warning" not in out.stdout + out.stderr


def test_under_socket_activation_a_reload_cannot_change_the_listeners(tmp_path, dns_server, upstream):
    """systemd passed the sockets, so a SIGHUP that adds a [[listen]] (sent by hand, past the
    check that ExecReload= runs) keeps the running config and says what to do."""
    port = free_port("127.0.6.8")
    text = proxy_config(port, dns_server, route(port=upstream.port), listen_address="127.0.6.8")
    path = tmp_path / "sniproxy.toml"
    path.write_text(text)
    with socket_activated(path, [f"127.0.6.8:{port}"]) as (proc, log):
        open_forwarding_at("127.0.6.8", port).close()
        log.wait_for("sniproxy.lifecycle: ready")
        extra = free_port("127.0.6.9")
        path.write_text(text.replace("[resolver]", f'[[listen]]\naddress = "127.0.6.9"\nport = {extra}\n\n[resolver]', 1))
        mark = len(log.lines)
        os.kill(proc.pid, signal.SIGHUP)
        line = log.wait_for("reload failed", start=mark)
        assert "ListenStream=" in line and "restart" in line
        with pytest.raises(OSError):
            socket.create_connection(("127.0.6.9", extra), timeout=2)
        open_forwarding_at("127.0.6.8", port).close()  # the running config still serves
