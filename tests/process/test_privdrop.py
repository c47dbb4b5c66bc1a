import os
import pwd
import socket
import subprocess
import sys
import textwrap

import pytest

from sniproxy.process.privdrop import PrivilegeError, drop_privileges
from tests.helpers import clean_env

as_root = pytest.mark.skipif(os.geteuid() != 0, reason="dropping privileges needs root")

# Binds a privileged port, drops to nobody, then proves what it can and cannot still do.
CHILD = textwrap.dedent(
    """
    import os, socket, sys
    from sniproxy.process.privdrop import drop_privileges

    server = socket.socket()
    for port in range(1023, 899, -1):
        try:
            server.bind(("127.0.6.1", port))
            break
        except OSError:
            continue
    else:
        sys.exit("no free port below 1024 on 127.0.6.1")
    server.listen()
    assert drop_privileges("nobody", "nogroup") is True
    try:
        os.setuid(0)
        sys.exit("setuid(0) worked after the drop")
    except PermissionError:
        pass
    try:
        socket.socket().bind(("127.0.6.1", port - 1))
        sys.exit("could still bind a port below 1024")
    except PermissionError:
        pass
    print(port, os.getuid(), os.getgid(), os.getgroups(), flush=True)
    server.settimeout(10)
    conn, _ = server.accept()
    conn.sendall(b"accepted by uid %d" % os.getuid())
    conn.close()
    # A second call as nobody is a no-op.
    assert drop_privileges("nobody", "nogroup") is False
    """
)


@as_root
def test_drop_to_nobody_keeps_the_bound_socket():
    nobody = pwd.getpwnam("nobody")
    with subprocess.Popen(
        [sys.executable, "-c", CHILD],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=clean_env(),
        text=True,
    ) as child:
        try:
            line = child.stdout.readline()
            assert line, child.stderr.read()
            port, uid, gid, groups = line.split(maxsplit=3)
            assert int(uid) == nobody.pw_uid
            assert int(gid) == nobody.pw_gid
            assert groups.strip() == "[]"
            with socket.create_connection(("127.0.6.1", int(port)), timeout=10) as client:
                client.settimeout(10)
                reply = client.recv(100)
            assert reply == b"accepted by uid %d" % nobody.pw_uid
            assert child.wait(timeout=10) == 0, child.stderr.read()
        finally:
            child.kill()


def test_unknown_user_is_a_clear_error():
    with pytest.raises(PrivilegeError, match="user 'no-such-user-sniproxy' does not exist"):
        drop_privileges("no-such-user-sniproxy")


def test_unknown_group_is_a_clear_error():
    with pytest.raises(PrivilegeError, match="group 'no-such-group-sniproxy' does not exist"):
        drop_privileges("nobody", "no-such-group-sniproxy")


def test_root_as_target_is_refused():
    with pytest.raises(PrivilegeError, match="is root"):
        drop_privileges("root")
    with pytest.raises(PrivilegeError, match="is root"):
        drop_privileges("0")


@pytest.mark.skipif(os.geteuid() == 0, reason="checks the no-op path, which needs a non-root user")
def test_not_root_is_a_no_op():
    uid = os.getuid()
    assert drop_privileges("nobody") is False
    assert os.getuid() == uid
