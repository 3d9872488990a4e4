"""Event-loop lag: how late a timer due every 100 ms actually runs.

One proxy process serves every connection on one loop, so anything that holds the loop (a
blocking call, a huge config walked at once, a garbage collection) delays every request at
once. Measured here and exported (`meshproxy_event_loop_lag_seconds_max`, and a count of
stalls over 100 ms) so a soak test and a dashboard can see it; ten timer callbacks a second
cost nothing measurable.
"""

from __future__ import annotations

import asyncio

INTERVAL = 0.1
STALL = 0.1  # a lag beyond this is counted as a stall


class LoopLag:
    def __init__(self) -> None:
        self.worst = 0.0  # seconds, since start
        self.stalls = 0
        self._expected = 0.0
        self._handle: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._expected = loop.time() + INTERVAL
        self._handle = loop.call_at(self._expected, self._tick)

    def _tick(self) -> None:
        loop = self._loop
        if loop is None:
            return
        now = loop.time()
        lag = now - self._expected
        if lag > self.worst:
            self.worst = lag
        if lag > STALL:
            self.stalls += 1
        self._expected = now + INTERVAL
        self._handle = loop.call_at(self._expected, self._tick)

    def stop(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._loop = None
