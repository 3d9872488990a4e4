"""RateLimitedLog: the first line of a kind at once, then one per interval with a count."""

from __future__ import annotations

import logging

import pytest

from meshproxy.observe.lograte import RateLimitedLog


def test_one_line_per_kind_per_interval_with_the_held_back_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = RateLimitedLog(logging.getLogger("lograte-test"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.INFO, logger="lograte-test"):
        for i in range(50):
            log.warning("flood", "closing connection %d", i)
        log.info("other", "a different kind is not held back")
        now[0] += 9.9
        log.warning("flood", "closing connection %d", 50)  # still inside the interval
        now[0] += 0.2
        log.warning("flood", "closing connection %d", 51)
        now[0] += 30
        log.warning("flood", "closing connection %d", 52)
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "closing connection 0"),
        (logging.INFO, "a different kind is not held back"),
        (logging.WARNING, "closing connection 51 (and 50 more like it in the last 10 s)"),
        (logging.WARNING, "closing connection 52"),
    ]
