"""Several worker processes sharing the listeners, behind one supervisor (nginx's model).

The supervisor binds (or adopts from systemd) the listening sockets and starts ``workers``
copies of ``sniproxy run`` that inherit them, each with a private channel. It never
touches a connection.

- **Reload and upgrade.** SIGHUP starts a new generation of workers on the new, validated
  config (and on whatever code is installed now), waits until every one is ready, then tells
  the old generation to stop accepting and drain. The old and new workers accept from the
  same sockets, so no connection is refused while they change over. A generation that does
  not become ready in ``READY_TIMEOUT`` is stopped, and the old one keeps serving.
- **Metrics.** The supervisor serves the one metrics endpoint. A scrape asks every worker
  for its counters; concurrent scrapes share one collection, and a worker that did not
  answer in ``SNAPSHOT_TIMEOUT`` is not waited for again until it answers (its last
  counters stand in, and ``sniproxy_workers_unresponsive`` says so).
- **Failures.** A worker that dies is logged and restarted with back-off.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from ..config import Config
from ..engine.listener import bind
from ..errors import SniproxyError
from ..observe.metrics import ProcessTreeCollector
from ..observe.stats import GAUGES, empty_snapshot, merge
from ..tasks import TaskSet
from .channel import CMD_SNAPSHOT, Event, SupervisorEnd, config_command
from .reload import SUPERVISOR, Loader, load_new, warn_restart_only

log = logging.getLogger("sniproxy.supervisor")

#: How long a collection waits for a worker's counters.
SNAPSHOT_TIMEOUT = 2.0
#: How long a new worker may take to start listening.
READY_TIMEOUT = 30.0
#: How long old workers may take to close their listeners once told to.
CLOSE_TIMEOUT = 5.0
#: After drain_timeout, how long workers get to exit before they are killed.
EXIT_GRACE = 5.0
#: Restart back-off for a worker that keeps dying: doubles from 0.5 s, at most this.
MAX_BACKOFF = 30.0


class WorkerState(enum.Enum):
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"  # an old generation's, or every one's after SIGTERM
    EXITED = "exited"


class Worker:
    def __init__(self, index: int, generation: int):
        self.index = index
        self.generation = generation
        self.state = WorkerState.STARTING
        self.proc: subprocess.Popen | None = None
        self.channel: SupervisorEnd | None = None
        self.snapshot: dict = empty_snapshot()
        self.started = 0.0
        self.backoff = 0.5
        self.ready = asyncio.Event()
        self.closed = asyncio.Event()  # its listeners are closed
        self.exited = asyncio.Event()
        self.answered = asyncio.Event()
        self.asked = False  # a snapshot request is outstanding
        self.lagging = False  # did not answer in time; not waited for until it does
        self.watcher: asyncio.Task | None = None

    @property
    def name(self) -> str:
        return f"worker {self.index} (pid {self.proc.pid if self.proc else '-'})"

    def send(self, message: bytes) -> bool:
        return self.channel is not None and self.channel.send(message)

    def kill(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)


class Supervisor:
    def __init__(self, config: Config, config_text: bytes, sockets: dict[tuple[str, int], socket.socket],
                 worker_argv: list[str], load_config: Loader,
                 reopen: Callable[[], None] | None = None):
        self.config = config
        self.config_text = config_text
        """The last config that passed validation, as the workers get it: a worker started
        later never reads a file that may have been edited since."""
        self.sockets = sockets
        self.worker_argv = worker_argv
        self.load_config = load_config
        self._reopen = reopen
        self.loop = asyncio.get_running_loop()
        self.generation = 0
        self.workers: list[Worker] = []  # the current generation
        self.old: list[Worker] = []  # earlier generations, draining
        self.retired = empty_snapshot()  # counters of workers that have exited
        self.restarts = 0
        self.stopping = False
        self.fixed_listeners = False  # from systemd: a reload may not add or remove one
        self._stop = asyncio.Event()
        self._collecting: asyncio.Task | None = None
        self.tasks = TaskSet()

    # -- workers ---------------------------------------------------------------------------

    def _start_worker(self, w: Worker, config_text: bytes, sockets: dict) -> None:
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [s.fileno() for s in sockets.values()]
        env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
        argv = [sys.executable, "-m", "sniproxy", *self.worker_argv,
                "--worker-channel", str(child.fileno()), "--worker-fds", ",".join(map(str, fds)),
                "--worker-index", str(w.index)]
        w.proc = proc = subprocess.Popen(argv, pass_fds=[child.fileno(), *fds], env=env)
        child.close()
        w.started = time.monotonic()
        parent.sendall(config_command(config_text))
        w.watcher = self.tasks.spawn(self._watch(w, proc, parent, config_text, sockets))
        log.info("worker %d started (pid %d, generation %d)", w.index, proc.pid, w.generation)

    async def _watch(self, w: Worker, proc: subprocess.Popen, sock: socket.socket, config_text: bytes,
                     sockets: dict) -> None:
        """Read a worker's channel until it closes; then account for it, and restart it if
        it died while serving."""
        def on_event(event: Event, value: Any) -> None:
            if event is Event.SNAPSHOT:
                w.snapshot = value
                w.asked = False
                if w.lagging:
                    w.lagging = False
                    log.info("%s answers again", w.name)
                w.answered.set()
            elif event is Event.CLOSED:
                w.closed.set()
            elif event is Event.READY:
                if w.state is WorkerState.STARTING:
                    w.state = WorkerState.READY
                w.ready.set()

        def on_broken(why: str) -> None:
            log.error("%s: channel broken: %s", w.name, why)

        try:
            _, w.channel = await self.loop.connect_accepted_socket(lambda: SupervisorEnd(on_event, on_broken), sock)
            await w.channel.ended
        except OSError:
            pass
        code = await self.loop.run_in_executor(None, proc.wait)
        was = w.state
        self._retire(w)
        if self.stopping or was is not WorkerState.READY or w not in self.workers:
            log.info("%s exited with %s", w.name, _describe(code))
            return
        lived = time.monotonic() - w.started
        w.backoff = 0.5 if lived > 60 else min(w.backoff * 2, MAX_BACKOFF)
        log.error("%s died (%s); restarting in %.1fs", w.name, _describe(code), w.backoff)
        try:  # a stop during the back-off ends it at once
            async with asyncio.timeout(w.backoff):
                await self._stop.wait()
        except TimeoutError:
            pass
        if self.stopping or w not in self.workers:
            return
        fresh = Worker(w.index, w.generation)
        fresh.backoff = w.backoff
        self.workers[self.workers.index(w)] = fresh
        self.restarts += 1
        self._start_worker(fresh, config_text, sockets)

    def _retire(self, w: Worker) -> None:
        """Keep a gone worker's counters so totals never go backwards; its gauges go to 0."""
        for r in w.snapshot["routes"].values():
            r["active"] = 0
        for gauge in GAUGES:
            w.snapshot[gauge] = 0
        self.retired = merge([self.retired, w.snapshot])
        w.snapshot = empty_snapshot()
        w.state = WorkerState.EXITED
        w.answered.set()
        w.ready.set()
        w.closed.set()
        w.exited.set()
        if w.channel is not None:
            w.channel.close()
            w.channel = None
        if w in self.old:
            self.old.remove(w)

    async def _start_generation(self, config_text: bytes, sockets: dict, count: int) -> list[Worker] | None:
        """Start ``count`` workers and wait until all are ready; None (and none left) if not.
        The generation counts only once it is ready. Cancelled (a SIGTERM during a reload),
        it stops what it started."""
        generation = self.generation + 1
        fresh = [Worker(i, generation) for i in range(count)]
        for w in fresh:
            self._start_worker(w, config_text, sockets)
        try:
            async with asyncio.timeout(READY_TIMEOUT):
                await asyncio.gather(*(w.ready.wait() for w in fresh))
        except TimeoutError:
            pass
        except asyncio.CancelledError:
            log.info("generation %d: stopping its workers, which were not needed after all", generation)
            await self._stop_workers(fresh)
            raise
        failed = [w for w in fresh if w.state is not WorkerState.READY]
        if not failed:
            self.generation = generation
            return fresh
        for w in failed:
            why = "exited" if w.state is WorkerState.EXITED else f"was not ready within {READY_TIMEOUT:g}s"
            log.error("generation %d: %s %s", generation, w.name, why)
        await self._stop_workers(fresh)
        return None

    async def _stop_workers(self, workers: list[Worker]) -> None:
        """SIGTERM, then after EXIT_GRACE SIGKILL: a worker of a failed generation never
        outlives it, even one whose loop is wedged."""
        for w in workers:
            w.state = WorkerState.DRAINING
            w.kill(signal.SIGTERM)
        await _wait_exits(workers, EXIT_GRACE)
        for w in workers:
            if not w.exited.is_set():
                log.error("%s did not exit; killing it", w.name)
                w.kill(signal.SIGKILL)
        await _wait_exits(workers, EXIT_GRACE)

    # -- the Service the lifecycle drives ----------------------------------------------------

    async def start(self) -> None:
        workers = await self._start_generation(self.config_text, self.sockets, self.config.server.workers)
        if workers is None:
            raise SniproxyError("workers did not start (see the lines above)")
        self.workers = workers

    async def reload(self) -> bool:
        loaded = load_new(self.load_config, self.config, self.fixed_listeners, log)  # before any worker sees it
        if loaded is None:
            return False
        new, text = loaded
        warn_restart_only(self.config, new, SUPERVISOR, log)
        sockets = {}
        try:
            for listen in new.listen:
                sockets[listen.key] = self.sockets.get(listen.key) or bind(listen)
        except SniproxyError as exc:
            self._close_new(sockets)
            log.error("reload failed, keeping the running config: %s", exc)
            return False
        started = time.monotonic()
        try:
            workers = await self._start_generation(text, sockets, new.server.workers)
        except asyncio.CancelledError:
            self._close_new(sockets)
            raise
        if workers is None:
            self._close_new(sockets)
            log.error("reload failed: the new workers did not become ready; the running ones keep serving")
            return False
        old, self.workers = self.workers, workers
        for w in old:
            if w.state is not WorkerState.EXITED:
                w.state = WorkerState.DRAINING
                self.old.append(w)
                w.kill(signal.SIGTERM)
        # Done when no old worker accepts any more: from then on every new connection gets
        # the new config (systemd's reload returns at the READY=1 that follows).
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                await asyncio.gather(*(w.closed.wait() for w in old))
        except TimeoutError:
            log.error("reload: old workers %s did not close their listeners within %gs",
                      [w.name for w in old if not w.closed.is_set()], CLOSE_TIMEOUT)
        for key, sock in self.sockets.items():
            if key not in sockets:
                sock.close()  # old workers hold their own copies until they stop listening
        self.sockets = sockets
        self.config, self.config_text = new, text
        log.info("reloaded %s: generation %d (%d workers) ready in %.2fs; %d old workers draining",
                 new.source, self.generation, len(workers), time.monotonic() - started, len(self.old))
        return True

    def _close_new(self, sockets: dict) -> None:
        """A reload that did not happen: close the listeners it bound."""
        for key, sock in sockets.items():
            if key not in self.sockets:
                sock.close()

    def stop_accepting(self) -> None:
        self.stopping = True
        self._stop.set()
        for sock in self.sockets.values():
            sock.close()
        log.info("stopping: asking %d workers to drain", len(self.workers))
        for w in self.workers:
            w.state = WorkerState.DRAINING
            w.kill(signal.SIGTERM)

    async def drain(self, timeout: float, hurry: asyncio.Event) -> None:
        everyone = [*self.workers, *self.old]
        hurried = self.loop.create_task(hurry.wait())
        exits = self.loop.create_task(_wait_exits(everyone, timeout + EXIT_GRACE))
        await asyncio.wait({hurried, exits}, return_when=asyncio.FIRST_COMPLETED)
        if hurried.done() and not exits.done():
            for w in everyone:
                w.kill(signal.SIGTERM)  # a second SIGTERM: workers stop at once
            await asyncio.wait({exits})
        hurried.cancel()
        for w in everyone:
            if w.proc is not None and w.proc.poll() is None:
                log.error("%s did not exit; killing it", w.name)
                w.kill(signal.SIGKILL)
        await _wait_exits(everyone, EXIT_GRACE)

    async def collect(self) -> bool:
        """Fresh counters from every worker; True if all answered. Concurrent callers (scrapes,
        health checks, the watchdog) share one collection."""
        if self._collecting is None:
            self._collecting = self.loop.create_task(self._collect())
            self._collecting.add_done_callback(self._collected)
        return await asyncio.shield(self._collecting)

    def _collected(self, task: asyncio.Task) -> None:
        self._collecting = None
        if not task.cancelled():
            task.exception()

    async def _collect(self) -> bool:
        waiting = []
        for w in (*self.workers, *self.old):
            if w.state is WorkerState.EXITED or w.state is WorkerState.STARTING:
                continue
            if not w.asked:
                w.answered.clear()
                if not w.send(CMD_SNAPSHOT + b"\n"):
                    continue
                w.asked = True
            if not w.lagging:
                waiting.append(w)
        if waiting:
            await asyncio.wait([self.loop.create_task(w.answered.wait()) for w in waiting], timeout=SNAPSHOT_TIMEOUT)
        for w in waiting:
            if w.asked and w.state is not WorkerState.EXITED:
                w.lagging = True
                log.error("%s did not answer within %gs: its counters are from its last answer, and it "
                          "is not waited for until it answers again", w.name, SNAPSHOT_TIMEOUT)
        return not any(w.lagging for w in (*self.workers, *self.old) if w.state is not WorkerState.EXITED)

    def snapshot(self) -> dict:
        return merge([self.retired, *(w.snapshot for w in (*self.workers, *self.old))])

    def status(self) -> str:
        active = sum(r["active"] for r in self.snapshot()["routes"].values())
        return f"{len(self.workers)} workers, {active} connections"

    def reopen_logs(self) -> None:
        try:
            if self._reopen is not None:
                self._reopen()
        except OSError as exc:
            log.error("cannot reopen log files (still writing to the old ones): %s", exc)
        for w in (*self.workers, *self.old):
            w.kill(signal.SIGUSR1)

    def collectors(self) -> Iterable[Collector]:
        return (SupervisorCollector(self), ProcessTreeCollector(self.pids))

    def pids(self) -> list[int]:
        """This process first, then its live workers."""
        return [os.getpid(), *(w.proc.pid for w in (*self.workers, *self.old)
                               if w.proc is not None and w.state is not WorkerState.EXITED)]


class SupervisorCollector:
    def __init__(self, supervisor: Supervisor):
        self.supervisor = supervisor

    def collect(self) -> Iterable:
        sup = self.supervisor
        states = GaugeMetricFamily("sniproxy_workers", "Worker processes, by state.", labels=["state"])
        everyone = [*sup.workers, *sup.old]
        for state in (WorkerState.STARTING, WorkerState.READY, WorkerState.DRAINING):
            states.add_metric([state.value], sum(1 for w in everyone if w.state is state))
        lagging = GaugeMetricFamily("sniproxy_workers_unresponsive", "Workers that did not answer the last "
                                    "collection in time: their counters are from their last answer.")
        lagging.add_metric([], sum(1 for w in everyone if w.lagging and w.state is not WorkerState.EXITED))
        restarts = CounterMetricFamily("sniproxy_worker_restarts", "Workers restarted after dying.")
        restarts.add_metric([], sup.restarts)
        generation = GaugeMetricFamily("sniproxy_worker_generation", "Generation of the serving workers "
                                       "(1 at start, one more per successful reload).")
        generation.add_metric([], sup.generation)
        return [states, lagging, restarts, generation]


async def _wait_exits(workers: Iterable[Worker], timeout: float) -> None:
    waits = [w.exited.wait() for w in workers if not w.exited.is_set()]
    if waits:
        try:
            async with asyncio.timeout(timeout):
                await asyncio.gather(*waits)
        except TimeoutError:
            pass


def _describe(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"exit status {code}"
