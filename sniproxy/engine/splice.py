"""splice(2) and its pipes: socket -> pipe -> socket, so bulk bytes never enter user space.

This module knows the kernel facility only: whether splice works here, and a pool of empty
pipes sized for it. ``forward.Flow`` moves a direction onto it once the direction has
carried enough bytes, on the same descriptors.

Pipes are borrowed from the pool for a burst and returned once drained, so an idle
connection holds no pipe at all.
"""

from __future__ import annotations

import fcntl
import functools
import os
import socket

from ..errors import ConfigError

#: Asked for with F_SETPIPE_SZ: one splice moves up to this much, and a direction whose
#: reader is slow holds up to this much (in the kernel; a copying direction's bound is 256 KiB in user
#: space). 1 MiB is Linux's default /proc/sys/fs/pipe-max-size, past which an unprivileged
#: process gets EPERM; it costs about a quarter less CPU per GiB than 256 KiB pipes.
PIPE_SIZE = 1 << 20
#: Used when PIPE_SIZE is refused: Linux's default pipe size.
FALLBACK_PIPE_SIZE = 64 << 10
#: Descriptors one connection may hold: its two sockets, and while both directions splice,
#: a pipe (two descriptors) each.
SOCKETS_PER_CONNECTION = 2
PIPE_DESCRIPTORS_PER_CONNECTION = 4
#: Empty pipes kept for reuse, per process. Pipes in use are not bounded by this: each
#: direction holds one only while bytes wait in it for a slow reader.
POOL_LIMIT = 64

_splice = getattr(os, "splice", None)
FLAGS = getattr(os, "SPLICE_F_MOVE", 0) | getattr(os, "SPLICE_F_NONBLOCK", 0)


# -- availability ----------------------------------------------------------------------------

def splice_enabled(mode: str) -> bool:
    """``[server] splice``: "off", "on" (an error where splice(2) does not work), "auto"."""
    if mode == "off":
        return False
    problem = probe()
    if problem is None:
        return True
    if mode == "on":
        raise ConfigError("server.splice", f'is "on" but {problem}')
    return False


@functools.cache
def probe() -> str | None:
    """None if splice(2) moves bytes socket -> pipe -> socket here, else what is wrong."""
    if _splice is None:
        return "this Python has no os.splice (needs Linux and Python 3.10+)"
    a, b = socket.socketpair()
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        a.send(b"x")
        if _splice(b.fileno(), w, 1, flags=FLAGS) != 1 or _splice(r, b.fileno(), 1, flags=FLAGS) != 1:
            return "splice(2) moved no bytes in a self-test"
        if a.recv(1) != b"x":
            return "splice(2) corrupted bytes in a self-test"
    except OSError as exc:
        return f"splice(2) fails here: {exc.strerror or exc}"
    finally:
        for fd in (r, w):
            os.close(fd)
        a.close()
        b.close()
    return None


# -- pipes -----------------------------------------------------------------------------------

class Pipe:
    __slots__ = ("r", "w", "size")

    def __init__(self, r: int, w: int, size: int):
        self.r = r
        self.w = w
        self.size = size  # capacity, as the kernel granted it

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


def _set_size(fd: int, size: int, fallback: int) -> int:
    """Grow a pipe to ``size``, or ``fallback`` when refused; returns the capacity it has."""
    for want in (size, fallback):
        try:
            return fcntl.fcntl(fd, fcntl.F_SETPIPE_SZ, want)
        except OSError:  # EPERM past pipe-max-size or the user's pipe-user-pages-hard
            continue
    return fcntl.fcntl(fd, fcntl.F_GETPIPE_SZ)


class PipePool:
    """Empty pipes for reuse. Only empty pipes come back in: ``release`` closes a pipe that
    still holds bytes, so every pipe ``acquire`` hands out is empty."""

    def __init__(self, size: int = PIPE_SIZE, fallback: int = FALLBACK_PIPE_SIZE, limit: int = POOL_LIMIT):
        self.size = size
        self.fallback = fallback
        self.limit = limit
        self.idle: list[Pipe] = []

    def acquire(self) -> Pipe:
        """An empty pipe; raises OSError (EMFILE...) when no new one can be made."""
        if self.idle:
            return self.idle.pop()
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            size = _set_size(w, self.size, self.fallback)
        except OSError:
            os.close(r)
            os.close(w)
            raise
        return Pipe(r, w, size)

    def release(self, pipe: Pipe, pending: int) -> None:
        """Take a pipe back; ``pending`` is how many bytes are still in it."""
        if pending or len(self.idle) >= self.limit:
            pipe.close()
        else:
            self.idle.append(pipe)

    def close(self) -> None:
        while self.idle:
            self.idle.pop().close()


#: The process's pool. Workers are exec'd, never forked, so no two processes share a pipe.
pool = PipePool()


#: With splice = "auto", a direction moves from copying to splice(2) once it has carried
#: this much: layer transfers go zero-copy, short API calls never pay for a pipe.
SPLICE_AFTER = 1 << 20
NEVER = float("inf")


def splice_after(mode: str) -> float:
    """Bytes a direction carries by copying before it splices: 0 for "on", SPLICE_AFTER for
    "auto", NEVER for "off" or where splice(2) does not work ("on" there is a ConfigError)."""
    if not splice_enabled(mode):
        return NEVER
    return 0 if mode == "on" else SPLICE_AFTER
