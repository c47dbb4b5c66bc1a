import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid

import pytest

from sniproxy.process.systemd import (
    ListenFd,
    Notifier,
    SystemdError,
    bound_address,
    listen_fds,
    match_listeners,
    watchdog_interval,
)
from tests.helpers import clean_env, free_port

SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


# --- sd_notify ---------------------------------------------------------------------------


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    """A real datagram socket standing in for systemd's notification socket."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if request.param == "path":
        address = str(tmp_path / "notify")
        sock.bind(address)
        env_value = address
    else:
        name = f"sniproxy-test-{uuid.uuid4().hex}"
        sock.bind("\0" + name)
        env_value = "@" + name
    sock.settimeout(5)
    with sock:
        yield env_value, sock


def received(sock) -> dict[str, str]:
    data = sock.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n"))


def test_notifier_sends_the_lifecycle(notify_socket):
    env_value, sock = notify_socket
    notifier = Notifier({"NOTIFY_SOCKET": env_value})
    assert notifier.enabled

    assert notifier.ready(status="listening on 3 addresses")
    assert received(sock) == {"READY": "1", "STATUS": "listening on 3 addresses"}

    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    msg = received(sock)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg.keys() == {"RELOADING", "MONOTONIC_USEC"} and msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after

    assert notifier.ready()
    assert received(sock) == {"READY": "1"}
    assert notifier.watchdog()
    assert received(sock) == {"WATCHDOG": "1"}
    assert notifier.status("draining\n12 connections")
    assert received(sock) == {"STATUS": "draining 12 connections"}
    assert notifier.stopping()
    assert received(sock) == {"STOPPING": "1"}
    notifier.close()
    assert not notifier.watchdog()


def test_notifier_without_notify_socket_is_a_no_op():
    notifier = Notifier({})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog() is False


def test_notifier_ignores_an_unsupported_address(caplog):
    notifier = Notifier({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert "not a unix socket path" in caplog.text


def test_notifier_send_error_is_logged_once_and_never_raised(tmp_path, caplog):
    notifier = Notifier({"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")})
    with caplog.at_level(logging.WARNING, logger="sniproxy.systemd"):
        assert notifier.ready() is False
        assert notifier.watchdog() is False
        assert notifier.stopping() is False
    notifier.close()
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1


def test_watchdog_interval():
    pid = str(os.getpid())
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "30000000"}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": pid}) == 15.0
    assert watchdog_interval({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


# --- socket activation -------------------------------------------------------------------


def test_listen_fds_ignores_another_process_and_cleans_up():
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b", "OTHER": "x"}
    assert listen_fds(env) == []
    assert env == {"OTHER": "x"}
    assert listen_fds({}) == []


def test_listen_fds_rejects_malformed_variables():
    with pytest.raises(SystemdError, match="not numbers"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "two"})
    with pytest.raises(SystemdError, match="negative"):
        listen_fds({"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "-1"})


def test_listen_fds_refuses_an_fd_that_is_not_a_socket():
    # In a child, so that fd 3 is ours to replace with a pipe.
    child = textwrap.dedent(
        """
        import os
        from sniproxy.process.systemd import listen_fds, SystemdError
        r, w = os.pipe()
        os.dup2(r, 3)
        os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="1")
        try:
            listen_fds()
        except SystemdError as e:
            print(e)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", child], env=clean_env(), capture_output=True, text=True, timeout=30
    )
    assert out.stdout.strip() == "inherited fd 3 (unknown) is not a usable socket: Socket operation on non-socket", out.stderr


ACTIVATED_CHILD = textwrap.dedent(
    """
    import json, os, select, sys
    from sniproxy.process.systemd import listen_fds, match_listeners
    fds = listen_fds()
    wanted = [tuple(a) for a in json.loads(sys.argv[1])]
    match = match_listeners([f.sock for f in fds], wanted)
    # Prove the sockets work: answer the connection that woke us, on whichever it came.
    ready, _, _ = select.select([f.sock for f in fds], [], [], 10)
    for sock in ready:
        conn, _ = sock.accept()
        conn.sendall(repr(sock.getsockname()).encode())
        conn.close()
    print(json.dumps({
        "fds": [[f.name, f.sock.fileno(), list(f.sock.getsockname()), os.get_inheritable(f.sock.fileno())]
                for f in fds],
        "env": sorted(k for k in os.environ if k.startswith("LISTEN_")),
        "matched": sorted(list(a) for a in match.matched),
        "missing": sorted(list(a) for a in match.missing),
        "extra": len(match.extra),
    }), flush=True)
    """
)


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate not installed (Debian: systemd)")
@pytest.mark.parametrize("fdnames", [None, "tls-a:tls-b:tls-c"])
def test_socket_activation_passes_every_listener(fdnames):
    addresses = ["127.0.6.2", "127.0.6.3", "127.0.6.4"]
    port = free_port(*addresses)
    wanted = [[a, port] for a in addresses] + [["127.0.6.9", port]]
    cmd = [SOCKET_ACTIVATE]
    for address in addresses:
        cmd += ["-l", f"{address}:{port}"]
    if fdnames:
        cmd += [f"--fdname={fdnames}"]
    cmd += [sys.executable, "-c", ACTIVATED_CHILD, json.dumps(wanted)]
    with subprocess.Popen(
        cmd, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        try:
            # systemd-socket-activate binds, says so on stderr, then waits for a connection.
            for address in addresses:
                line = proc.stderr.readline()
                assert line.startswith(f"Listening on {address}:{port}"), line
            with socket.create_connection(("127.0.6.3", port), timeout=10) as client:
                client.settimeout(10)
                assert client.recv(100) == repr(("127.0.6.3", port)).encode()
            result = json.loads(proc.stdout.readline())
            assert proc.wait(timeout=10) == 0, proc.stderr.read()
        finally:
            proc.kill()

    names = fdnames.split(":") if fdnames else ["unknown"] * 3
    assert result["fds"] == [[name, 3 + i, [a, port], False] for i, (name, a) in enumerate(zip(names, addresses))]
    assert result["env"] == []  # unset, so our children do not claim the sockets
    assert result["matched"] == [[a, port] for a in addresses]
    assert result["missing"] == [["127.0.6.9", port]]
    assert result["extra"] == 0


# --- matching inherited sockets to the config --------------------------------------------


def listener(address, port=0, kind=socket.SOCK_STREAM, listen=True):
    sock = socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, kind)
    sock.bind((address, port))
    if listen and kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


def test_match_listeners_reports_matched_missing_and_extra():
    a = listener("127.0.6.20")
    port = a.getsockname()[1]
    b = listener("127.0.6.21", port)
    stray = listener("127.0.6.22", port)
    udp = listener("127.0.6.21", port, socket.SOCK_DGRAM)  # right address, wrong type
    idle = listener("127.0.6.23", port, listen=False)  # bound, never listening
    unix = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    socks = [a, b, stray, udp, idle, unix]
    try:
        wanted = [("127.0.6.20", port), ("127.0.6.21", port), ("127.0.6.23", port), ("127.0.6.24", port)]
        match = match_listeners(socks, wanted)
        assert match.matched == {("127.0.6.20", port): a, ("127.0.6.21", port): b}
        assert match.missing == [("127.0.6.23", port), ("127.0.6.24", port)]
        assert match.extra == [stray, udp, idle, unix]
    finally:
        for sock in socks:
            sock.close()


def test_match_listeners_compares_addresses_not_spellings():
    with listener("::1") as v6:
        port = v6.getsockname()[1]
        match = match_listeners([v6], [("0:0:0:0:0:0:0:1", port)])
        assert match.matched == {("0:0:0:0:0:0:0:1", port): v6}
        assert bound_address(v6) == ("::1", port)


def test_listen_fd_is_a_named_tuple():
    with listener("127.0.6.26") as sock:
        name, s = ListenFd("tls", sock)
        assert (name, s) == ("tls", sock)


# -- when the socket unit and [[listen]] disagree ------------------------------------------------


def test_unit_name_is_systemds_name_for_the_sockets():
    from sniproxy.process.systemd import unit_name

    assert unit_name(["sniproxy.socket", "sniproxy.socket"]) == "sniproxy.socket"  # FileDescriptorName= unset
    assert unit_name(["unknown"]) == "the socket unit"  # systemd-socket-activate, or no names given
    assert unit_name(["a", "b"]) == "the socket unit"
    assert unit_name([""]) == "the socket unit"


def test_activation_mismatch_is_one_line_with_the_fix():
    from sniproxy.process.systemd import activation_mismatch

    assert activation_mismatch("sniproxy.socket", ["10.0.1.11:443", "10.0.1.12:443"], ["[::1]:443"]) == (
        "socket activation: sniproxy.socket passes 10.0.1.11:443, 10.0.1.12:443, which no [[listen]] names; "
        "[[listen]] [::1]:443 is not passed by sniproxy.socket: make ListenStream= match [[listen]] "
        "(systemctl edit sniproxy.socket), then systemctl restart sniproxy")
    assert activation_mismatch("sniproxy.socket", [], ["10.0.1.10:443", "10.0.1.11:443"]).startswith(
        "socket activation: [[listen]] 10.0.1.10:443, 10.0.1.11:443 are not passed by sniproxy.socket: ")
