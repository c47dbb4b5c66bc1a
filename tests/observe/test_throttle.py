"""A flood of the same event makes one log line per interval, which says how many it stood for."""

from __future__ import annotations

import logging

from sniproxy.observe.throttle import Throttled


def test_one_line_per_key_per_interval_counting_the_rest(caplog):
    now = [100.0]
    throttle = Throttled(logging.getLogger("sniproxy.test"), every=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="sniproxy.test"):
        for _ in range(5):
            throttle.warning("a", "client %s refused", "10.0.0.1")
        throttle.warning("b", "another kind")
        now[0] += 10.0
        throttle.warning("a", "client %s refused", "10.0.0.2")
    assert [r.getMessage() for r in caplog.records] == [
        "client 10.0.0.1 refused", "another kind", "client 10.0.0.2 refused (5 times in the last 10s)"]


def test_due_says_when_to_log_and_how_many_happened():
    now = [0.0]
    throttle = Throttled(logging.getLogger("sniproxy.test"), every=1.0, clock=lambda: now[0])
    assert [throttle.due("x") for _ in range(3)] == [1, 0, 0]
    now[0] = 1.0
    assert throttle.due("x") == 3
