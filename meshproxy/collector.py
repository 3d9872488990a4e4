"""When CPython's cycle collector may run, for a proxy whose config can be large.

A full collection walks every tracked object while holding the GIL, so with a config of
thousands of services it stalls the event loop for hundreds of milliseconds, and a reload
allocating a second snapshot triggers several of them (catalog L08). The config's objects
are acyclic (a dropped snapshot is freed by reference counting alone), so the collector
has nothing to find in them: loading runs with it paused, and what exists at start-up (the
modules and the first snapshot) is frozen out of its reach. Only start-up is frozen: later,
live connections (which do form cycles) would be frozen with the heap and never reclaimed.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


@contextmanager
def collector_paused() -> Iterator[None]:
    """No cycle collection inside the block (reference counting still frees as usual)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def without_collection(fn: Callable[[], T]) -> T:
    """fn() with the collector paused: a config load, in a thread off the event loop.

    What fn() allocated is then moved to the oldest generation by one full collection: left
    in the youngest, each generation's next collection would walk all of it in turn."""
    with collector_paused():
        result = fn()
        gc.collect()
        return result


def freeze_startup_heap() -> None:
    """Move everything alive now out of the collector's reach for good (gc.freeze). Called
    once before serving (and before forking workers, so their pages stay shared)."""
    gc.freeze()
