"""One lifecycle for a single process, a supervisor and its workers, read top to bottom:

    startup -> serve (reload, reopen logs) -> drain -> exit

Signal handlers only set flags; ``run`` reacts to them in order, one at a time, so a reload
that arrives during another is queued, never lost and never run twice at once. The
differences between the three roles are a ``Service`` (what is started, reloaded and
drained) and three switches: whether this process serves metrics and health checks,
whether it takes reloads, and whether it waits ``drain_delay`` before closing listeners
(a supervisor's workers are told to stop only after that wait).
"""

from __future__ import annotations

import asyncio
import enum
import logging
import platform
import signal
import time
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from ..addresses import format_address
from ..config import Config
from ..observe.http import MetricsServer, bind_metrics
from ..observe.metrics import make_registry
from ..tasks import TaskSet
from .systemd import watchdog_interval

log = logging.getLogger("sniproxy.lifecycle")


class Flag(enum.Enum):
    STOP = "stop"
    RELOAD = "reload"
    REOPEN = "reopen"


_SIGNALS = {signal.SIGTERM: Flag.STOP, signal.SIGINT: Flag.STOP, signal.SIGHUP: Flag.RELOAD,
            signal.SIGUSR1: Flag.REOPEN}


class Notifier(Protocol):
    """systemd's sd_notify, or a worker's channel to its supervisor."""

    async def start(self) -> None: ...
    async def final(self) -> None: ...
    def ready(self, status: str | None = None) -> object: ...
    def reloading(self, status: str | None = None) -> object: ...
    def stopping(self, status: str | None = None) -> object: ...
    def draining(self, status: str) -> object: ...
    def watchdog(self) -> object: ...
    def status(self, text: str) -> object: ...


class Service(Protocol):
    config: Config

    async def start(self) -> None: ...
    async def reload(self) -> bool: ...
    def stop_accepting(self) -> None: ...
    async def drain(self, timeout: float, hurry: asyncio.Event) -> None: ...
    async def collect(self) -> bool: ...
    def snapshot(self) -> dict: ...
    def status(self) -> str: ...
    def reopen_logs(self) -> None: ...
    def collectors(self) -> Iterable[Collector]: ...


def version() -> str:
    try:
        return metadata.version("sniproxy")
    except metadata.PackageNotFoundError:
        return "unknown"


class Lifecycle:
    def __init__(self, service: Service, notifier: Notifier, *, serves_metrics: bool = True,
                 takes_reloads: bool = True, delays_drain: bool = True):
        self.service = service
        self.notifier = notifier
        self.serves_metrics = serves_metrics
        self.takes_reloads = takes_reloads
        self.delays_drain = delays_drain
        self.pending: set[Flag] = set()
        self.wake = asyncio.Event()
        self.hurry = asyncio.Event()  # a second SIGTERM during the drain: stop now
        self.ready = False
        self.draining = False
        self._reloading: asyncio.Task | None = None
        self.reload_ok = True
        self.reload_time = time.time()  # as Prometheus reports it: the start counts as a load
        self.tasks = TaskSet()

    # -- signals: flags only -------------------------------------------------------------------

    def install_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        for sig, flag in _SIGNALS.items():
            loop.add_signal_handler(sig, self.signal, flag)

    def signal(self, flag: Flag) -> None:
        if flag is Flag.STOP:
            self.ready = False  # /readyz says 503 from this moment, even mid-reload
            if self.draining:
                self.hurry.set()
            if self._reloading is not None:
                self._reloading.cancel()  # a stop beats a reload under way
        self.pending.add(flag)
        self.wake.set()

    # -- the lifecycle ---------------------------------------------------------------------------

    async def main(self, after_start: Callable[[], None] | None = None) -> None:
        """The whole life of this process on the running loop: signal handlers first (an early
        signal must not kill it), the notifier, ``run``, and the notifier's last word."""
        self.install_signal_handlers(asyncio.get_running_loop())
        await self.notifier.start()
        await self.run(after_start)
        await self.notifier.final()

    async def run(self, after_start: Callable[[], None] | None = None) -> None:
        """``after_start`` runs once listening, before READY: a privilege drop goes there, so a
        startup failure is reported before anything else."""
        service = self.service
        # startup: the metrics port first, so a port in use fails before any listener binds
        metrics_sock = None
        m = service.config.metrics
        if self.serves_metrics and m.enabled:
            metrics_sock = bind_metrics(m.address, m.port)
        await service.start()
        metrics = None
        if metrics_sock is not None:
            registry = make_registry(service.snapshot, LifecycleCollector(self), *service.collectors())
            metrics = MetricsServer(metrics_sock, registry, service.collect, service.collect, self.is_ready)
            log.info("metrics on http://%s/metrics (and /healthz, /readyz)", format_address(m.address, m.port))
        if after_start is not None:
            after_start()
        self.ready = True
        self.notifier.ready(status=service.status())
        if self.takes_reloads:  # a worker's readiness goes to its supervisor instead
            log.info("ready: %s", service.status())
        interval = watchdog_interval()
        if interval is not None and self.serves_metrics:
            self.tasks.spawn(self._watchdog(interval))

        # serve
        while True:
            await self.wake.wait()
            self.wake.clear()
            if Flag.STOP in self.pending:
                break
            if Flag.REOPEN in self.pending:
                self.pending.discard(Flag.REOPEN)
                service.reopen_logs()
            if Flag.RELOAD in self.pending:
                self.pending.discard(Flag.RELOAD)
                await self._reload()

        # drain
        self.draining = True
        self.ready = False
        self.notifier.stopping()
        delay = service.config.server.drain_delay if self.delays_drain else 0.0
        if delay > 0:
            log.info("stopping: /readyz now answers 503; still accepting for drain_delay %gs", delay)
            try:
                async with asyncio.timeout(delay):
                    await self.hurry.wait()
            except TimeoutError:
                pass
        service.stop_accepting()
        self.notifier.draining(service.status())
        await service.drain(service.config.server.drain_timeout, self.hurry)

        # exit
        self.tasks.cancel_all()
        if metrics is not None:
            metrics.close()
        log.info("stopped")

    async def _reload(self) -> None:
        if not self.takes_reloads:
            log.info("SIGHUP ignored: a worker takes new config by being replaced")
            return
        self.notifier.reloading()
        task = self._reloading = asyncio.get_running_loop().create_task(self.service.reload())
        await asyncio.wait({task})
        self._reloading = None
        if task.cancelled():
            log.info("reload cancelled: stopping instead")
            ok = False
        elif task.exception() is not None:  # whatever went wrong, the running config keeps serving
            log.error("reload failed, keeping the running config", exc_info=task.exception())
            ok = False
        else:
            ok = task.result()
        self.reload_ok = ok
        if ok:
            self.reload_time = time.time()
        self.notifier.ready(status=self.service.status())

    def is_ready(self) -> bool:
        return self.ready

    async def _watchdog(self, interval: float) -> None:
        """Ping systemd only while every event loop answers: a wedged one stops the pings."""
        while True:
            if await self.service.collect():
                self.notifier.watchdog()
                self.notifier.status(self.service.status())
            await asyncio.sleep(interval)


class LifecycleCollector:
    """Build info and the outcome of the last reload, named as Prometheus names its own."""

    def __init__(self, lifecycle: Lifecycle):
        self.lifecycle = lifecycle
        try:
            uvloop_version = metadata.version("uvloop")
        except metadata.PackageNotFoundError:
            uvloop_version = "none"
        self.build = (version(), platform.python_version(), uvloop_version)

    def collect(self) -> Iterable:
        info = GaugeMetricFamily("sniproxy_build_info", "Versions sniproxy runs with (always 1).",
                                 labels=["version", "python", "uvloop"])
        info.add_metric(list(self.build), 1)
        ok = GaugeMetricFamily("sniproxy_config_last_reload_successful",
                               "Whether the last configuration reload succeeded (1) or failed (0).")
        ok.add_metric([], 1 if self.lifecycle.reload_ok else 0)
        when = GaugeMetricFamily("sniproxy_config_last_reload_success_timestamp_seconds",
                                 "Time of the last successful configuration load (start or reload).")
        when.add_metric([], self.lifecycle.reload_time)
        ready = GaugeMetricFamily("sniproxy_ready", "1 while /readyz answers 200: listening and not draining.")
        ready.add_metric([], 1 if self.lifecycle.ready else 0)
        limit = GaugeMetricFamily("sniproxy_max_connections", "[server] max_connections: the most connections "
                                  "each process (each worker, with workers) holds before refusing with 'limit'.")
        limit.add_metric([], self.lifecycle.service.config.server.max_connections)
        return [info, ok, when, ready, limit]
