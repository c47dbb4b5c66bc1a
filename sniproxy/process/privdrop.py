"""Give up root once the listening sockets are bound.

Under systemd this is not needed (the unit runs as a DynamicUser with the sockets passed
in); it is for running sniproxy by hand or under another supervisor as root.
"""

import grp
import os
import pwd

from ..errors import SniproxyError


class PrivilegeError(SniproxyError):
    """Privileges could not be dropped as asked."""


class UnknownAccount(PrivilegeError):
    """A [server] user or group that does not exist (``key`` says which)."""

    def __init__(self, key: str, message: str):
        super().__init__(message)
        self.key = key


def lookup(user: str, group: str | None = None) -> tuple[int, int]:
    """(uid, gid) of ``user`` and ``group`` (default: the user's primary group), by name or
    number. Raises UnknownAccount if either does not exist, PrivilegeError if the user is root."""
    try:
        pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
    except KeyError:
        raise UnknownAccount("user", f"user {user!r} does not exist") from None
    if group is None:
        gid = pw.pw_gid
    else:
        try:
            gid = grp.getgrgid(int(group)).gr_gid if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UnknownAccount("group", f"group {group!r} does not exist") from None
    if pw.pw_uid == 0:
        raise PrivilegeError(f"user {user!r} is root: that would drop nothing")
    return pw.pw_uid, gid


def drop_privileges(user: str, group: str | None = None) -> bool:
    """Switch the process to ``user`` and ``group`` (default: the user's primary group).

    Sockets already bound stay usable. Supplementary groups are cleared, real, effective
    and saved ids all change, so root cannot be regained. Returns True once dropped;
    False, changing nothing, when not running as root. Raises PrivilegeError with a
    one-line reason if the user or group does not exist (checked even when not root, so a
    typo shows up on the first run) or the switch did not hold.
    """
    uid, gid = lookup(user, group)
    if os.geteuid() != 0:
        return False

    # Groups first: once the uid changes we may no longer change them.
    os.setgroups([])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)

    if os.getresuid() != (uid,) * 3 or os.getresgid() != (gid,) * 3 or os.getgroups():
        raise PrivilegeError("privileges were not fully dropped")
    try:
        os.setuid(0)
    except PermissionError:
        return True
    raise PrivilegeError("root could be regained after dropping privileges")
