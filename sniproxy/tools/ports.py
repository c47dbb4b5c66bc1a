"""Who holds a TCP port on this host: a bind probe, and the listening sockets of /proc.

`doctor` names the process behind an address in use; `check` (process/preflight) passes
when that process is a running sniproxy, so it works as ExecReload= while the service serves.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct

from sniproxy.addresses import is_unspecified


def proc_address(text: str) -> tuple[str, int]:
    """An address:port from /proc/net/tcp{,6} (hex, host byte order per 32-bit word)."""
    host, port = text.split(":")
    raw = bytes.fromhex(host)
    words = b"".join(struct.pack("<I", struct.unpack(">I", raw[i:i + 4])[0])
                     for i in range(0, len(raw), 4))
    return str(ipaddress.ip_address(words)), int(port, 16)


def listening_sockets() -> dict[str, tuple[str, int]]:
    """Listening TCP sockets of the host, by inode: inode -> (address, port)."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as handle:
                rows = handle.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) >= 10 and fields[3] == "0A":  # 0A: LISTEN
                found[fields[9]] = proc_address(fields[1])
    return found


def listener_owner(address: str, port: int) -> tuple[int, list[str]] | None:
    """(pid, argv) of the process listening on address:port, when /proc tells."""
    wanted = ipaddress.ip_address(address)
    inodes = {inode for inode, (local, local_port) in listening_sockets().items()
              if local_port == port and (ipaddress.ip_address(local) == wanted or is_unspecified(local)
                                         or is_unspecified(address))}
    holders = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            fds = os.listdir(f"/proc/{pid}/fd")
            for fd in fds:
                link = os.readlink(f"/proc/{pid}/fd/{fd}")
                if link.startswith("socket:[") and link[8:-1] in inodes:
                    with open(f"/proc/{pid}/cmdline", "rb") as handle:
                        argv = handle.read().decode(errors="replace").split("\0")
                    holders.append((int(pid), [a for a in argv if a]))
                    break
        except OSError:
            continue
    # Beside a socket-activated service, pid 1 holds the same socket: the sniproxy is the owner.
    return next((h for h in holders if is_sniproxy(h[1])), holders[0] if holders else None)


def is_sniproxy(argv: list[str]) -> bool:
    if any(os.path.basename(arg) == "sniproxy" for arg in argv[:2]):
        return True
    return any(a == "-m" and b == "sniproxy" for a, b in zip(argv, argv[1:]))


def try_bind(address: str, port: int) -> None:
    """Bind as the proxy would (without SO_REUSEPORT, so a running listener is noticed)."""
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind((address, port))
        sock.listen(1)
