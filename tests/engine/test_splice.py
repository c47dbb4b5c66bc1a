"""splice(2) on real pipes and loopback sockets: availability, the modes, and the pipe pool.
(tests/test_forward.py moves bytes through it; the integration suite runs the whole proxy
on every mode.)"""

from __future__ import annotations

import array
import fcntl
import json
import os
import shutil
import socket
import subprocess
import sys
import termios

import pytest

from sniproxy.engine import splice
from sniproxy.engine.splice import FALLBACK_PIPE_SIZE, PipePool
from sniproxy.errors import ConfigError
from tests.helpers import clean_env

pytestmark = pytest.mark.skipif(splice.probe() is not None, reason=f"no splice(2): {splice.probe()}")


def unread(fd: int) -> int:
    """Bytes waiting in a pipe or socket (FIONREAD)."""
    buf = array.array("i", [0])
    fcntl.ioctl(fd, termios.FIONREAD, buf)
    return buf[0]


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


# -- the pool ------------------------------------------------------------------------------------


def test_pipes_get_the_size_asked_for():
    pool = PipePool(size=256 * 1024)
    pipe = pool.acquire()
    try:
        assert pipe.size == 256 * 1024 == fcntl.fcntl(pipe.w, fcntl.F_GETPIPE_SZ)
        assert os.get_blocking(pipe.r) is False and os.get_blocking(pipe.w) is False
        assert os.get_inheritable(pipe.r) is False and os.get_inheritable(pipe.w) is False
    finally:
        pipe.close()


_FALLBACK_CHILD = """
import fcntl, json, os
from sniproxy.engine.splice import PipePool
big = int(open("/proc/sys/fs/pipe-max-size").read()) * 2
r, w = os.pipe()
try:
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, big)
    refused = False
except PermissionError:
    refused = True
default = fcntl.fcntl(w, fcntl.F_GETPIPE_SZ)
fallback = PipePool(size=big, fallback=128 * 1024).acquire()
neither = PipePool(size=big, fallback=big).acquire()
print(json.dumps({
    "refused": refused,
    "default": default,
    "fallback": [fallback.size, fcntl.fcntl(fallback.w, fcntl.F_GETPIPE_SZ)],
    "neither": [neither.size, fcntl.fcntl(neither.w, fcntl.F_GETPIPE_SZ)],
}))
"""


def test_a_refused_size_falls_back_then_keeps_the_default():
    """Past /proc/sys/fs/pipe-max-size an unprivileged process gets EPERM. The child runs
    without CAP_SYS_RESOURCE (setpriv), so the refusal is real even when tests run as root.
    (The fallback is 128 KiB here, so it cannot pass for the 64 KiB default.)"""
    assert FALLBACK_PIPE_SIZE == 64 * 1024
    cmd = [sys.executable, "-c", _FALLBACK_CHILD]
    if shutil.which("setpriv"):
        cmd = ["setpriv", "--bounding-set", "-sys_resource", "--inh-caps", "-sys_resource", "--", *cmd]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=20, env=clean_env())
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout)
    assert got["refused"], "the child could grow a pipe past pipe-max-size: the fallback was not exercised"
    assert got["fallback"] == [128 * 1024, 128 * 1024]
    assert got["neither"] == [got["default"], got["default"]]


def test_only_empty_pipes_come_back_from_the_pool():
    pool = PipePool(size=64 * 1024)
    full = pool.acquire()
    os.write(full.w, b"left over")
    pool.release(full, pending=9)
    assert not is_open(full.r) and not is_open(full.w)  # closed, not pooled
    assert pool.idle == []
    empty = pool.acquire()
    pool.release(empty, pending=0)
    again = pool.acquire()
    assert again is empty and unread(again.r) == 0
    pool.release(again, pending=0)
    pool.close()
    assert not is_open(again.r)


def test_the_pool_keeps_at_most_its_limit():
    pool = PipePool(size=64 * 1024, limit=2)
    pipes = [pool.acquire() for _ in range(4)]
    for pipe in pipes:
        pool.release(pipe, pending=0)
    assert pool.idle == pipes[:2]
    assert [is_open(p.r) for p in pipes] == [True, True, False, False]
    pool.close()
    assert pool.idle == [] and not any(is_open(p.r) for p in pipes)


def test_eagain_from_socket_to_pipe_is_ambiguous_unless_the_pipe_is_empty():
    """Why a direction only reads while its pipe is empty: into a full pipe, a socket with
    data waiting gives the same EAGAIN as an empty socket into an empty pipe."""
    a, b = socket.socketpair()
    pool = PipePool(size=64 * 1024)
    pipe = pool.acquire()
    b.setblocking(False)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        with pytest.raises(BlockingIOError):  # empty pipe: EAGAIN means "no data"
            os.splice(b.fileno(), pipe.w, pipe.size, flags=flags)
        os.write(pipe.w, bytes(pipe.size))
        a.send(b"data")
        with pytest.raises(BlockingIOError):  # full pipe, data waiting: the same EAGAIN
            os.splice(b.fileno(), pipe.w, pipe.size, flags=flags)
        assert unread(b.fileno()) == 4
    finally:
        pipe.close()
        a.close()
        b.close()


# -- availability --------------------------------------------------------------------------------


def test_modes():
    assert splice.splice_enabled("off") is False
    assert splice.splice_enabled("on") is True
    assert splice.splice_enabled("auto") is True


def test_on_without_os_splice_is_a_clear_config_error(monkeypatch):
    monkeypatch.setattr(splice, "_splice", None)
    splice.probe.cache_clear()
    try:
        expected = r'^config error: server\.splice: is "on" but this Python has no os\.splice'
        with pytest.raises(ConfigError, match=expected):
            splice.splice_enabled("on")
        assert splice.splice_enabled("auto") is False
        assert splice.splice_enabled("off") is False
    finally:
        splice.probe.cache_clear()


def test_splice_after_each_mode():
    assert splice.splice_after("on") == 0
    assert splice.splice_after("auto") == splice.SPLICE_AFTER == 1 << 20
    assert splice.splice_after("off") == splice.NEVER

