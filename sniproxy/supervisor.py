"""Several worker processes sharing the listeners, behind one supervisor.

The supervisor binds (or adopts from systemd) the listening sockets, drops privileges, and
starts ``workers`` copies of ``sniproxy run`` that inherit those sockets and a private
channel each. It never touches a connection. It owns the one metrics endpoint: at scrape
time it asks every worker for its stats snapshot over its channel and sums the answers, so
the per-chunk path in the workers stays lock-free and no scrape sees a partial worker.

Signals: SIGTERM/SIGINT/SIGHUP/SIGUSR1 are passed on to every worker, which drain, reload or
reopen exactly as a single process does. A worker that dies is logged and restarted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable

from .config import Config, Listen
from .errors import ConfigError
from .listener import listen_name
from .metrics import make_registry, start_http
from .splice import splice_enabled
from .stats import merge
from .systemd import Notifier, watchdog_interval

log = logging.getLogger("sniproxy.supervisor")

#: How long a scrape waits for every worker's snapshot.
SNAPSHOT_TIMEOUT = 2.0
#: Restart back-off for a worker that keeps dying: doubles from 0.5 s, at most this.
MAX_BACKOFF = 30.0


def _empty_snapshot() -> dict:
    return {"routes": {}, "rejected": {}, "dns": {}, "dns_cache_hits": 0}


class Worker:
    def __init__(self, index: int):
        self.index = index
        self.proc: subprocess.Popen | None = None
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.snapshot: dict = _empty_snapshot()
        self.started = 0.0
        self.backoff = 0.5
        self.lock = asyncio.Lock()
        self.updated = asyncio.Event()
        self.reloaded = asyncio.Event()
        self.reload_ok = True
        self.watcher: asyncio.Task | None = None


class Supervisor:
    def __init__(self, config: Config, sockets: dict[tuple[str, int], socket.socket],
                 worker_argv: list[str], load_config: Callable[[], tuple[Config, bytes]], config_text: bytes):
        self.config = config
        self.config_text = config_text
        """The last config that passed validation, as the workers get it: a worker started
        later never reads a file that may have been edited since."""
        self.sockets = sockets
        self.worker_argv = worker_argv
        self.load_config = load_config
        self.loop = asyncio.get_running_loop()
        self.notifier = Notifier()
        self.workers = [Worker(i) for i in range(config.server.workers)]
        self.retired = _empty_snapshot()  # counters of workers that have exited
        self.stopping = False
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task] = set()
        self.on_usr1: Callable[[], None] | None = None

    # -- workers ---------------------------------------------------------------------------

    async def spawn(self, w: Worker) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in self.sockets.values()]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        argv = [sys.executable, "-m", "sniproxy", *self.worker_argv,
                "--worker-channel", str(child.fileno()), "--worker-fds", ",".join(map(str, fds)),
                "--worker-index", str(w.index)]
        w.proc = subprocess.Popen(argv, pass_fds=[child.fileno(), *fds], env=env)
        child.close()
        w.started = time.monotonic()
        w.snapshot = _empty_snapshot()
        w.reader, w.writer = await asyncio.open_connection(sock=parent, limit=16 << 20)
        w.writer.write(b"config %d\n" % len(self.config_text) + self.config_text)
        log.info("worker %d started (pid %d)", w.index, w.proc.pid)
        w.watcher = self._keep(self.watch(w))

    def _keep(self, coro) -> asyncio.Task:
        task = self.loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def watch(self, w: Worker) -> None:
        """Read the worker's channel until it closes; then account for it and restart it."""
        proc = w.proc
        try:
            while line := await w.reader.readline():
                message = json.loads(line)
                if "reloaded" in message:
                    w.reload_ok = bool(message["reloaded"])
                    w.reloaded.set()
                else:
                    w.snapshot = message
                    w.updated.set()
        except (ConnectionError, ValueError):
            pass
        code = await self.loop.run_in_executor(None, proc.wait)
        self.retire(w)
        if self.stopping:
            log.info("worker %d (pid %d) exited with %s", w.index, proc.pid, _describe(code))
            return
        lived = time.monotonic() - w.started
        w.backoff = 0.5 if lived > 60 else min(w.backoff * 2, MAX_BACKOFF)
        log.error("worker %d (pid %d) died (%s); restarting in %.1fs", w.index, proc.pid, _describe(code), w.backoff)
        try:  # a stop during the back-off ends it at once
            async with asyncio.timeout(w.backoff):
                await self._stop.wait()
        except TimeoutError:
            pass
        if not self.stopping:
            await self.spawn(w)

    def retire(self, w: Worker) -> None:
        """Keep a gone worker's counters so totals never go backwards; its gauges go to 0."""
        snap = w.snapshot
        for r in snap["routes"].values():
            r["active"] = 0
        self.retired = merge([self.retired, snap])
        w.snapshot = _empty_snapshot()
        if w.writer is not None:
            w.writer.close()
            w.writer = None

    async def refresh(self) -> bool:
        """Ask every live worker for a fresh snapshot; True if all answered in time."""
        async def ask(w: Worker) -> bool:
            if w.writer is None or w.proc is None or w.proc.poll() is not None:
                return False
            async with w.lock:  # one request in flight per worker: answers arrive in order
                try:
                    w.updated.clear()
                    w.writer.write(b"snapshot\n")
                    async with asyncio.timeout(SNAPSHOT_TIMEOUT):
                        await w.writer.drain()
                        await w.updated.wait()
                    return True
                except (ConnectionError, TimeoutError):
                    return False

        results = await asyncio.gather(*(ask(w) for w in self.workers))
        return all(results)

    def snapshot(self) -> dict:
        return merge([self.retired, *(w.snapshot for w in self.workers)])

    def signal_workers(self, sig: int) -> None:
        for w in self.workers:
            if w.proc is not None and w.proc.poll() is None:
                w.proc.send_signal(sig)

    # -- lifecycle -------------------------------------------------------------------------

    async def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self._stop.set)
        self.loop.add_signal_handler(signal.SIGHUP, lambda: self._keep(self.reload()))
        self.loop.add_signal_handler(signal.SIGUSR1, self.usr1)
        metrics_server = None
        m = self.config.metrics
        if m.enabled:
            registry = make_registry(self.snapshot)
            metrics_server = await start_http(registry, m.address, m.port, before_scrape=self.refresh)
            log.info("metrics on http://%s/metrics (sum of %d workers)", listen_name(Listen(m.address, m.port)),
                     len(self.workers))
        for w in self.workers:
            await self.spawn(w)
        async with asyncio.timeout(30):
            while not await self.refresh():
                await asyncio.sleep(0.05)
        log.info("ready: %d workers serving", len(self.workers))
        self.notifier.ready(status=self.status())
        interval = watchdog_interval()
        if interval is not None:
            self._keep(self.watchdog(interval))
        await self._stop.wait()

        self.stopping = True
        self.notifier.stopping()
        log.info("stopping: asking %d workers to drain", len(self.workers))
        for sock in self.sockets.values():
            sock.close()  # the workers hold their own copies until they stop listening
        self.signal_workers(signal.SIGTERM)
        # Each watcher returns once its worker has exited and been retired.
        await asyncio.gather(*(w.watcher for w in self.workers if w.watcher is not None), return_exceptions=True)
        if metrics_server is not None:
            metrics_server.close()
        log.info("stopped")

    async def reload(self) -> None:
        try:
            new, text = self.load_config()
            splice_enabled(new.server.splice)  # checked here, before any worker sees it
        except ConfigError as exc:
            log.error("reload failed, keeping the running config: %s", exc)
            return
        self.notifier.reloading()
        if new.server.workers != len(self.workers):
            log.warning("[server] workers changed to %d: takes effect on restart", new.server.workers)
        if new.metrics != self.config.metrics:
            log.warning("[metrics] changed: takes effect on restart")
        wanted = {entry.key for entry in new.listen}
        for key in [k for k in self.sockets if k not in wanted]:
            # Workers stop listening themselves; our copy must go too, or the kernel would
            # keep queueing connections that nobody accepts.
            self.sockets.pop(key).close()
        self.config, self.config_text = new, text
        live = [w for w in self.workers if w.writer is not None]
        for w in live:
            w.reloaded.clear()
            w.writer.write(b"reload %d\n" % len(text) + text)
        try:
            async with asyncio.timeout(30):
                await asyncio.gather(*(w.reloaded.wait() for w in live))
            refused = [w.index for w in live if not w.reload_ok]
            if refused:
                log.error("reload: workers %s kept their running config (see their log lines)", refused)
            else:
                log.info("reloaded %s in %d workers", new.source, len(live))
        except TimeoutError:
            log.error("reload: not every worker confirmed within 30s")
        self.notifier.ready(status=self.status())

    def usr1(self) -> None:
        if self.on_usr1 is not None:
            self.on_usr1()
        self.signal_workers(signal.SIGUSR1)

    async def watchdog(self, interval: float) -> None:
        """Ping systemd only while every worker answers: a wedged worker stops the pings."""
        while not self.stopping:
            if await self.refresh():
                self.notifier.watchdog()
                self.notifier.status(self.status())
            await asyncio.sleep(interval)

    def status(self) -> str:
        routes = self.snapshot()["routes"].values()
        active = sum(r["active"] for r in routes)
        return f"{len(self.workers)} workers, {active} connections"


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"


def read_initial_config(sock: socket.socket) -> bytes:
    """Worker side, before the event loop starts: the config the supervisor validated."""
    header = b""
    while not header.endswith(b"\n"):
        byte = sock.recv(1)  # one at a time: nothing past the header may be consumed here
        if not byte:
            raise ConnectionError("supervisor closed the channel")
        header += byte
    size = int(header.split()[1])
    text = b""
    while len(text) < size:
        chunk = sock.recv(size - len(text))
        if not chunk:
            raise ConnectionError("supervisor closed the channel")
        text += chunk
    return text


class WorkerChannel:
    """Worker side: answer snapshot requests, take reloads; the channel's end means stop."""

    def __init__(self, sock: socket.socket, snapshot: Callable[[], dict], on_reload: Callable[[bytes], None],
                 on_close: Callable[[], None]):
        self.sock = sock
        self.snapshot = snapshot
        self.on_reload = on_reload
        self.on_close = on_close
        self.writer: asyncio.StreamWriter | None = None
        self.task: asyncio.Task | None = None

    async def start(self) -> None:
        reader, self.writer = await asyncio.open_connection(sock=self.sock)
        self.task = asyncio.get_running_loop().create_task(self._serve(reader))

    def _send(self) -> None:
        self.writer.write(json.dumps(self.snapshot(), separators=(",", ":")).encode() + b"\n")

    def reloaded(self, ok: bool) -> None:
        self.writer.write(json.dumps({"reloaded": ok}).encode() + b"\n")

    async def _serve(self, reader: asyncio.StreamReader) -> None:
        try:
            while line := await reader.readline():
                command, _, arg = line.strip().partition(b" ")
                if command == b"snapshot":
                    self._send()
                elif command == b"reload":
                    self.on_reload(await reader.readexactly(int(arg)))
        except (ConnectionError, asyncio.IncompleteReadError, ValueError):
            pass
        self.on_close()  # the supervisor is gone: drain and exit rather than run orphaned

    async def final(self) -> None:
        """Send the last counters before exiting, so the supervisor's totals include them."""
        try:
            self._send()
            async with asyncio.timeout(2):
                await self.writer.drain()
        except (ConnectionError, TimeoutError, RuntimeError):
            pass
