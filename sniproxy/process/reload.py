"""What every reload does first, whoever reloads (a single process, or a supervisor): read
the new config, refuse it in one line when it cannot apply, and name the settings it changes
that only a restart applies."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from ..config import FIXED_LISTENERS, Config, listeners_differ
from ..engine.splice import splice_enabled
from ..errors import ConfigError

#: Reads the config again: the config, and its bytes (which a supervisor hands its workers).
Loader = Callable[[], tuple[Config, bytes]]
#: (section, key or None for the whole table) -> what happens to a change of it on reload.
Effects = Mapping[tuple[str, str | None], str]

AT_RESTART = "that takes effect on restart"
#: A single process cannot apply these.
SINGLE_PROCESS: Effects = {
    ("server", "workers"): AT_RESTART + " (one process does not become a supervisor)",
    ("server", "user"): AT_RESTART,
    ("server", "group"): AT_RESTART,
    ("metrics", None): AT_RESTART,
    ("log", None): AT_RESTART,
}
#: A supervisor starts new workers, which take the rest.
SUPERVISOR: Effects = {
    ("metrics", None): AT_RESTART,
    ("log", None): "the new workers use it; this supervisor's own error log keeps its target until a restart",
}


def load_new(load: Loader, running: Config, fixed_listeners: bool, log: logging.Logger) -> tuple[Config, bytes] | None:
    """The new config and its bytes, or None when the reload must be refused (said in one
    line, and the running config keeps serving)."""
    try:
        new, text = load()
        splice_enabled(new.server.splice)  # "on" where splice(2) does not work is a config error
    except ConfigError as exc:
        log.error("reload failed, keeping the running config: %s", exc)
        return None
    if fixed_listeners and listeners_differ(running, new):
        log.error("reload failed, keeping the running config: %s", FIXED_LISTENERS)
        return None
    return new, text


def restart_only_changes(old: Config, new: Config, effects: Effects) -> list[tuple[str, str]]:
    """(setting, effect) for each setting of ``effects`` that ``new`` changes: ("[server] workers", ...)."""
    changed = []
    for (section, key), effect in effects.items():
        a, b = getattr(old, section), getattr(new, section)
        if key is not None:
            a, b = getattr(a, key), getattr(b, key)
        if a != b:
            changed.append((f"[{section}] {key}" if key else f"[{section}]", effect))
    return changed


def warn_restart_only(old: Config, new: Config, effects: Effects, log: logging.Logger) -> None:
    for setting, effect in restart_only_changes(old, new, effects):
        log.warning("reload: %s changed; %s", setting, effect)
