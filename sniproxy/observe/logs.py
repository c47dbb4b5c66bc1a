"""The error log's set-up: where lines go, their stamp, and reopening files for logrotate."""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Mapping

from ..config import LogConfig
from ..errors import SniproxyError

#: UTC, ISO 8601 to the second: every timestamp sniproxy writes (error log and access log)
#: starts with this, then ".mmmZ".
TIME_FORMAT = "%Y-%m-%dT%H:%M:%S"


class ReopeningFileHandler(logging.FileHandler):
    """A log file that logrotate can move away: SIGUSR1 reopens it under its name."""

    def reopen(self) -> None:
        stream = self._open()  # first: if this fails, the old file keeps working
        self.acquire()
        try:
            old, self.stream = self.stream, stream
        finally:
            self.release()
        if old is not None:
            old.close()


class _Stamped(logging.Formatter):
    """UTC with milliseconds, as the access log stamps its lines."""

    default_time_format = TIME_FORMAT
    default_msec_format = "%s.%03dZ"

    def __init__(self, fmt: str):
        super().__init__(fmt)
        self.converter = time.gmtime


def journal_stderr(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether stderr is journald's stream, which stamps every line itself: JOURNAL_STREAM
    names its device and inode (systemd.exec(5)), and a redirected stderr no longer matches."""
    try:
        device, inode = (int(n) for n in environ.get("JOURNAL_STREAM", "").split(":"))
        st = os.fstat(sys.stderr.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


def _handler(target: str, fmt: str) -> logging.Handler:
    if target == "stderr":
        handler: logging.Handler = logging.StreamHandler(sys.stderr)
    else:
        try:
            handler = ReopeningFileHandler(target, encoding="utf-8")
        except OSError as exc:
            raise SniproxyError(f"cannot open log file {target}: {exc.strerror}") from None
    handler.setFormatter(_Stamped(fmt))
    return handler


def setup_logging(log: LogConfig, level: str | None = None, tag: str = "",
                  environ: Mapping[str, str] = os.environ) -> list[ReopeningFileHandler]:
    """Route the error log; returns the handlers to reopen on SIGUSR1. ``tag`` names a worker.
    Lines carry a timestamp, except on journald's stream, which has its own."""
    root = logging.getLogger()
    root.handlers.clear()
    fmt = f"%(levelname)s %(name)s{tag}: %(message)s"
    stamped = log.error != "stderr" or not journal_stderr(environ)
    root.addHandler(_handler(log.error, "%(asctime)s " + fmt if stamped else fmt))
    root.setLevel((level or log.level).upper())
    return [h for h in root.handlers if isinstance(h, ReopeningFileHandler)]
