"""Memory overload actions: Envoy's overload manager, for the process's resident memory.

A sidecar that grows past its container's memory limit is OOM-killed, and every connection of
the pod goes with it. So every INTERVAL this process's RSS is compared with its share of the
memory limit (ProxyConfig `overload.memoryLimit`, else the container's cgroup limit, else no
limit: off), and Envoy's two actions are taken:
- past `shrinkHeapThreshold` (0.90): garbage is collected and free heap handed back to the
  kernel (malloc_trim), at most once every SHRINK_EVERY seconds (Envoy's shrink_heap);
- past `stopAcceptingRequestsThreshold` (0.95): new requests get 503 `envoy overloaded` with
  `x-envoy-overloaded: true` and flag OM, and their connections close after the answer
  (Envoy's stop_accepting_requests); on entering that state idle connections are shed
  (closed, or an h2 GOAWAY; one with a request in flight closes after it); and while in it,
  streams holding SHED_STREAM_BYTES or more for a client that does not read are reset, flag
  OM (Envoy's reset_high_memory_stream): what was admitted before must not keep growing.
The memory compared is the anonymous RSS (the heap), what the kernel charges and can kill for.
Below the shrink threshold again, requests are served as before. With several workers each process
watches its own RSS against limit / workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

from meshproxy.config.resources import OverloadSettings
from meshproxy.proxy.context import ProxyContext

logger = logging.getLogger(__name__)

INTERVAL = 0.1  # seconds between two looks at the RSS (a /proc read: microseconds)
IDLE_INTERVAL = 5.0  # the same, while there is no limit
SHRINK_EVERY = 5.0  # seconds, at least, between two heap shrinks
LIMIT_REFRESH = 30.0  # seconds between two reads of the container's limit (resizable)
SHED_STREAM_BYTES = 64 * 1024  # a stream holding this much for a client that does not read
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
_UNLIMITED = 2**60  # cgroup v1 writes "no limit" as a number near 2**63


def rss_bytes() -> int:
    """This process's anonymous resident memory (its heap: what a memory cgroup charges it
    for and what it can free; the mapped code and libraries are left out), from
    /proc/self/statm: resident minus shared pages. 0 where there is no /proc."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * _PAGE
    except (OSError, ValueError, IndexError):
        return 0


def container_memory_limit(root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """The memory limit of this process's cgroup (v2 memory.max, v1 memory.limit_in_bytes),
    None when there is none. Inside a container the cgroup path /proc/self/cgroup names may
    not exist in its mount namespace: the mount's root is then the container's own cgroup."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    candidates: list[Path] = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            for base in (root, root / "unified"):
                candidates += [base / rel / "memory.max", base / "memory.max"]
        elif "memory" in controllers.split(","):
            base = root / "memory"
            candidates += [base / rel / "memory.limit_in_bytes", base / "memory.limit_in_bytes"]
    for file in candidates:
        try:
            text = file.read_text().strip()
        except OSError:
            continue
        if text == "max":
            return None
        with contextlib.suppress(ValueError):
            value = int(text)
            return value if 0 < value < _UNLIMITED else None
    return None


def _malloc_trim() -> Callable[[], object] | None:
    """glibc's malloc_trim(0): free heap pages back to the kernel (None elsewhere)."""
    try:
        import ctypes

        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    return lambda: trim(0)


class OverloadMonitor:
    def __init__(self, ctx: ProxyContext, processes: int = 1) -> None:
        self.ctx = ctx
        self.processes = max(processes, 1)
        self._container_limit: int | None = None
        self._limit_read_at = -LIMIT_REFRESH
        self._last_shrink = -SHRINK_EVERY
        self._trim = _malloc_trim()
        self._announced: int | None = None

    def _announce(self, limit: int | None) -> None:
        if limit is None:
            return
        o = self.ctx.snapshot.settings.overload
        logger.info(
            "overload actions on: %.1f MiB of memory for this process (%s); heap shrunk at "
            "%.0f%%, new requests refused at %.0f%%",
            limit / 2**20,
            "the container's limit" if o.memory_limit < 0 else "overload.memoryLimit",
            o.shrink_heap * 100,
            o.stop_requests * 100,
        )

    def limit(self) -> int | None:
        """This process's share of the memory limit, in bytes; None: no limit, no actions."""
        configured = self.ctx.snapshot.settings.overload.memory_limit
        if configured == 0:
            return None
        if configured < 0:
            now = time.monotonic()
            if now - self._limit_read_at >= LIMIT_REFRESH:
                self._container_limit = container_memory_limit()
                self._limit_read_at = now
            if self._container_limit is None:
                return None
            configured = self._container_limit
        return configured // self.processes

    def check(self) -> None:
        """One look: shrink, and enter or leave the overloaded state, as the RSS says."""
        limit = self.limit()
        ctx = self.ctx
        if limit != self._announced:
            self._announced = limit
            self._announce(limit)
        if limit is None:
            if ctx.overloaded:
                self._leave(0, 0)
            return
        thresholds = ctx.snapshot.settings.overload
        rss = rss_bytes()
        if rss >= thresholds.shrink_heap * limit:
            now = time.monotonic()
            if now - self._last_shrink >= SHRINK_EVERY:
                self._last_shrink = now
                self.shrink()
                rss = rss_bytes()
        over = rss >= thresholds.stop_requests * limit
        if over:
            # Streams admitted before keep filling their buffers for clients that do not
            # read (D08): reset the heavy ones, each check, and give their memory back.
            reset = self.shed_buffered()
            if reset:
                ctx.metrics.overload_streams_reset += reset
                now = time.monotonic()
                if now - self._last_shrink >= 1.0:
                    self._last_shrink = now
                    self.shrink()
        if over and not ctx.overloaded:
            ctx.overloaded = True
            ctx.metrics.overload_active = 1
            shed = self.shed()
            logger.warning(
                "overloaded: RSS %.1f MiB is past %.0f%% of the %.1f MiB limit; new requests "
                "get 503 until it falls back, %d idle connections shed",
                rss / 2**20,
                thresholds.stop_requests * 100,
                limit / 2**20,
                shed,
            )
        elif ctx.overloaded and rss < self._resume_fraction(thresholds) * limit:
            self._leave(rss, limit)

    @staticmethod
    def _resume_fraction(thresholds: OverloadSettings) -> float:
        """Where requests are served again: below the shrink threshold (or 5 % under the
        stop one), so freeing a few streams' buffers does not flip the state every check."""
        stop = thresholds.stop_requests
        return thresholds.shrink_heap if thresholds.shrink_heap < stop else stop * 0.95

    def _leave(self, rss: int, limit: int) -> None:
        self.ctx.overloaded = False
        self.ctx.metrics.overload_active = 0
        if limit:
            logger.warning(
                "no longer overloaded: RSS %.1f MiB of the %.1f MiB limit; serving requests",
                rss / 2**20,
                limit / 2**20,
            )

    def shrink(self) -> None:
        gc.collect()
        if self._trim is not None:
            self._trim()
        self.ctx.metrics.overload_shrinks += 1

    def shed_buffered(self) -> int:
        """Reset what holds SHED_STREAM_BYTES or more for a client that does not read."""
        reset = 0
        for conn in list(self.ctx.connections):
            reset += conn.shed_buffered(SHED_STREAM_BYTES)
        return reset

    def shed(self) -> int:
        """Close idle connections (those with a request in flight close after it)."""
        connections = list(self.ctx.connections)
        for conn in connections:
            conn.close_idle()
        self.ctx.metrics.overload_shed += len(connections)
        return len(connections)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                self.check()
                # Without a limit only a reload or a container resize can bring one.
                pause = INTERVAL if self.limit() is not None else IDLE_INTERVAL
            except Exception:  # the monitor must never take the proxy down
                logger.exception("overload check failed")
                pause = IDLE_INTERVAL
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), pause)
