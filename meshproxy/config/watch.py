"""Watch a config path with inotify (watchfiles) and call back after changes settle.

A file is watched through its directory, so editors that replace files and Kubernetes
ConfigMap updates (an atomic rename of the `..data` symlink) are both seen. While nothing
changes, only watchfiles' thread wakes, every STEP_MS, to see whether it was told to stop and
whether pending changes have settled. The whole idle proxy measured 0.03 % of a CPU with 4
wake-ups a second, 0.17 % with watchfiles' default of 20; the step also bounds how long a
settled change waits before its reload starts.

Every RESCAN_MS the files are also looked at directly (a stat of each, no reading): an
inotify event can be missed (a change made while a watch is being set up, a recursive watch
on a ConfigMap directory that is swapped a hundred times a second), and a missed event must
delay a reload, never lose it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from pathlib import Path

from watchfiles import awatch

from meshproxy.config.source import stat_signature

logger = logging.getLogger(__name__)
# watchfiles logs every batch of file events at INFO ("1 change detected"): a line per
# ConfigMap swap or log write in a watched directory, saying nothing the reload log does not.
logging.getLogger("watchfiles.main").setLevel(logging.WARNING)

STEP_MS = 250
RESCAN_MS = 2000


async def watch_config(
    path: Path,
    on_change: Callable[[], Awaitable[object]],
    debounce_ms: int = 200,
    stop: asyncio.Event | None = None,
) -> None:
    # Synchronous on purpose: the watch must be registered at this task's first step, so a
    # caller that spawned it and yielded once knows later edits are seen.
    target = path if path.is_dir() else path.parent  # noqa: ASYNC240
    seen = stat_signature(path)
    async for changes in awatch(
        target,
        debounce=debounce_ms,
        step=STEP_MS,
        stop_event=stop,
        recursive=True,
        rust_timeout=RESCAN_MS,
        yield_on_timeout=True,
    ):
        now = stat_signature(path)
        if not changes and now == seen:
            continue  # the periodic look: nothing changed
        if not changes:
            logger.info("config files changed without an inotify event; reloading")
        seen = now
        try:
            await on_change()
        except Exception:
            logger.exception("config reload failed unexpectedly")
