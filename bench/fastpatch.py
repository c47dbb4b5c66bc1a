"""Candidate speed-ups for the engine, tried in a copy (never in sniproxy/ itself) to measure them.

    python bench/fastpatch.py [REF] [DEST] [--only A,B,...]   (default: HEAD, bench/work/sniproxy-src-fast)
    python bench/run.py --sniproxy-ref HEAD --also fast=bench/work/sniproxy-src-fast \\
        --only sniproxy-w1-issue-a,sniproxy-fast-w1-issue-a,nginx-issue-a-w1 \\
        --workloads short-issue,short-normal --runs 5

Each change comes from the profile of issue 14's workload (bench/results/profile.md):

A  ip-literal: `Resolver.cached` asks `ipaddress.ip_address(name)` on every connection to
   tell an IP literal from a name (2 µs for an IP, 4 µs for a name, which raises three
   exceptions); remember the answer per name.
B  last-fin: when a direction reads its EOF and the other direction is already done, the pair
   closes at once: skip the shutdown(2) (a ctypes call and a syscall); close(2) sends the same FIN.
C  readiness: a direction starts "readable" and pays a readv that raises BlockingIOError:
   the upstream side on connect (unless the connect event says IN), the client side after a
   short hello read (unless its FIN was seen).
D  trailing: the single-record fast path refuses a read that holds more than the hello (the
   client's next bytes came in the same read, as under load), and the HelloReader runs;
   parse the first record when it is complete and keep the rest as received.
E  lean-hello: `pull_client_hello` with plain offsets, no Buffer or context manager per
   length-prefixed block, and the ALPN tuple remembered per raw list (bench/fastpatch_hello.py).

F  splice-drain (a correctness fix, not a speed-up): a splice(2) from a socket into a pipe
   may move less than the pipe holds while the socket still has bytes (the pipe has as many
   slots as pages, and a TCP socket fills one slot per fragment), yet `_splice_in` takes a
   short splice for "drained" and waits for an edge; with the socket's receive window full,
   the sender sends nothing, no edge comes, and the direction stalls (seen on 1-connection
   bulk: the proxy idle for seconds with 31 MB in its upstream socket's Recv-Q). Clear
   `readable` only on EAGAIN in splice mode.

B and C are in main since 4308ec9 (the same two changes); on main, apply A, D and E.

The copy must pass the engine tests: PYTHONPATH=DEST python -m pytest tests/test_forward.py ...
Each edit must apply exactly once, or this script stops.
"""

import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

PATCHES = {
    "A": {"resolver.py": [(
        """def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True""",
        """_IS_IP: dict[str, bool] = {}


def _is_ip(name: str) -> bool:
    known = _IS_IP.get(name)
    if known is None:
        try:
            ipaddress.ip_address(name)
            known = True
        except ValueError:
            known = False
        if len(_IS_IP) < 4096:
            _IS_IP[name] = known
    return known""")]},
    "B": {
        "forward.py": [
            ('''    __slots__ = ("src", "dst", "readable", "eof_pending", "writable", "mode", "nbytes", "splice_after",
                 "pending", "pipe", "in_pipe", "done", "error")''',
             '''    __slots__ = ("src", "dst", "readable", "eof_pending", "writable", "mode", "nbytes", "splice_after",
                 "pending", "pipe", "in_pipe", "done", "error", "last")'''),
            ('''        self.done = False
        self.error: OSError | None = None
''', '''        self.done = False
        self.error: OSError | None = None
        self.last = False  # the other direction is done: at EOF the pair closes, no shutdown
'''),
            ('''        self.done = True
        self.readable = False
        try:
            shutdown_write(self.dst)''', '''        self.done = True
        self.readable = False
        if self.last:
            return Result.EOF
        try:
            shutdown_write(self.dst)'''),
        ],
        "connection.py": [(
            '''        if result is Result.EOF:
            if self.up.done and self.down.done:
                self._close("done")''',
            '''        if result is Result.EOF:
            if self.up.done and self.down.done:
                self._close("done")
            else:
                (self.down if flow is self.up else self.up).last = True''')],
    },
    "C": {"connection.py": [
        ('''        self.hello_reads += 1
        data = bytes(scratch.buffer[:n])''', '''        self.hello_reads += 1
        if n < len(scratch.buffer) and not self.client_eof:
            self.client_readable = False  # drained: the next edge says when there is more
        data = bytes(scratch.buffer[:n])'''),
        ('''        self.down = Flow(self.upstream_fd, self.client_fd, ctx.splice_after, eof_pending=bool(events & RDHUP))''',
         '''        self.down = Flow(self.upstream_fd, self.client_fd, ctx.splice_after, readable=bool(events & (IN | RDHUP)),
                         eof_pending=bool(events & RDHUP))'''),
    ]},
    "D": {
        "tls.py": [(
            '''    length = (data[3] << 8) | data[4]
    if length + RECORD_HEADER != len(data) or length > MAX_RECORD or data[5] != HandshakeType.CLIENT_HELLO:
        return None''', '''    length = (data[3] << 8) | data[4]
    if length + RECORD_HEADER > len(data) or length > MAX_RECORD or data[5] != HandshakeType.CLIENT_HELLO:
        return None
    if length + RECORD_HEADER < len(data):  # the client's next bytes came in the same read
        data = data[:length + RECORD_HEADER]''')],
        "connection.py": [(
            '''                if hello is not None:
                    self.received = data
                    self.hello_bytes = len(data)''', '''                if hello is not None:
                    self.received = data
                    self.hello_bytes = 5 + ((data[3] << 8) | data[4])''')],
    },
    "E": {"tls.py": "LEAN"},
    "F": {"forward.py": [(
        """        if n < pipe.size and not self.eof_pending:
            self.readable = False
        self.nbytes += n
        self.in_pipe = n""",
        """        self.nbytes += n  # a short splice is not "drained": the pipe may have run out of slots
        self.in_pipe = n""")]},
}


def _lean_hello() -> str:
    text = (BENCH / "fastpatch_hello.py").read_text()
    return text[text.index("# A lean pull_client_hello"):]


def main() -> int:
    args = sys.argv[1:]
    only = None
    if "--only" in args:
        i = args.index("--only")
        only = set(args[i + 1].split(","))
        del args[i:i + 2]
    ref = args[0] if args else "HEAD"
    dest = Path(args[1]) if len(args) > 1 else BENCH / "work" / "sniproxy-src-fast"
    import run
    commit = run.archive_ref(ref, dest)
    applied = []
    for letter, files in PATCHES.items():
        if only and letter not in only:
            continue
        for name, edits in files.items():
            path = dest / "sniproxy" / name
            text = path.read_text()
            if edits == "LEAN":  # replace pull_client_hello, up to parse_client_hello
                i, j = text.index("def pull_client_hello(buf: Buffer)"), text.index("def parse_client_hello(")
                path.write_text(text[:i] + _lean_hello() + "\n\n" + text[j:])
                continue
            for old, new in edits:
                if text.count(old) != 1:
                    raise SystemExit(f"{letter} {path}: the edit does not apply (found {text.count(old)} times):\n{old}")
                text = text.replace(old, new)
            path.write_text(text)
        applied.append(letter)
    print(f"{dest}: sniproxy at {ref} ({commit}) with {', '.join(applied)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
