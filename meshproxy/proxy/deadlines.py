"""Coarse deadlines for the request hot path: one ticking timer for all streams.

A TimerHandle created and cancelled per request (route timeout, per-try timeout) costs a few
microseconds each; most requests finish long before either fires. Streams with a deadline
join a set that one timer scans every TICK seconds instead, so a deadline fires up to TICK
late (Envoy's timers are exact; 50 ms on timeouts of hundreds of ms is the trade).
"""

from __future__ import annotations

import asyncio
from typing import Protocol

TICK = 0.05


class HasDeadline(Protocol):
    def check_deadline(self, now: float) -> None: ...


class DeadlineWheel:
    def __init__(self) -> None:
        self._streams: set[HasDeadline] = set()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, stream: HasDeadline, loop: asyncio.AbstractEventLoop) -> None:
        self._streams.add(stream)
        if self._timer is None:
            self._timer = loop.call_later(TICK, self._tick, loop)

    def discard(self, stream: HasDeadline) -> None:
        self._streams.discard(stream)

    def _tick(self, loop: asyncio.AbstractEventLoop) -> None:
        self._timer = None
        now = loop.time()
        for stream in list(self._streams):
            stream.check_deadline(now)
        if self._streams:
            self._timer = loop.call_later(TICK, self._tick, loop)


def stream_idle_check_interval(timeout: float) -> float:
    """How often a connection looks for streams idle for `timeout` seconds (ProxyConfig
    streamIdleTimeout): a quarter of it, from 50 ms to 5 s; an expiry is up to that late."""
    return min(max(timeout / 4, TICK), 5.0)
