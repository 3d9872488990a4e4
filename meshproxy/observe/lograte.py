"""Log lines that a remote party can cause, at most one per kind per interval.

A line per flooding HTTP/2 connection, per refused TLS handshake or per failed upstream
connect lets whoever can open connections write the proxy's log as fast as it can connect
(a thousand lines a second, measured, under a rapid-reset flood) and burn CPU and disk on it.
The first line of a kind is logged at once, then at most one per interval, saying how many
were held back; the counters in /stats/prometheus keep the exact numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable


class RateLimitedLog:
    def __init__(
        self,
        logger: logging.Logger,
        interval: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._interval = interval
        self._clock = clock
        self._next: dict[str, float] = {}  # kind -> when its next line may be written
        self._held: dict[str, int] = {}  # kind -> lines held back since its last line

    def log(self, level: int, kind: str, msg: str, *args: object) -> None:
        """Log `msg % args` unless a line of `kind` was written less than an interval ago."""
        now = self._clock()
        if now < self._next.get(kind, 0.0):
            self._held[kind] = self._held.get(kind, 0) + 1
            return
        self._next[kind] = now + self._interval
        held = self._held.pop(kind, 0)
        if held:
            msg += " (and %d more like it in the last %.0f s)"
            args = (*args, held, self._interval)
        self._logger.log(level, msg, *args)

    def warning(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.WARNING, kind, msg, *args)

    def info(self, kind: str, msg: str, *args: object) -> None:
        self.log(logging.INFO, kind, msg, *args)
