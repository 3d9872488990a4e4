"""What /memory reports: where the process's memory is, for finding a leak in a running proxy.

Envoy's /memory gives its allocator's figures; a Python proxy's equivalents are the resident
and anonymous set sizes, the garbage collector's tracked objects counted by type, and, when the
process was started with PYTHONTRACEMALLOC=N (tracemalloc, N frames per allocation), the source
lines holding the most memory. Counting objects walks every tracked one: admin-only, on demand.
"""

from __future__ import annotations

import gc
import tracemalloc
from collections import Counter
from typing import Any


def _status_kib(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def memory_report(top: int = 25) -> dict[str, Any]:
    objects = gc.get_objects()
    by_type = Counter(type(o).__qualname__ for o in objects)
    del objects
    report: dict[str, Any] = {
        "rss_bytes": _status_kib("VmRSS") * 1024,
        "anon_rss_bytes": _status_kib("RssAnon") * 1024,
        "gc_tracked_objects": sum(by_type.values()),
        "gc_counts": list(gc.get_count()),
        "types": [{"type": name, "count": n} for name, n in by_type.most_common(top)],
    }
    if tracemalloc.is_tracing():
        stats = tracemalloc.take_snapshot().statistics("lineno")
        traced, peak = tracemalloc.get_traced_memory()
        report["tracemalloc"] = {
            "traced_bytes": traced,
            "peak_bytes": peak,
            "top": [
                {"where": str(s.traceback[0]), "bytes": s.size, "blocks": s.count}
                for s in stats[:top]
            ],
        }
    else:
        report["tracemalloc"] = "off (start the proxy with PYTHONTRACEMALLOC=1 to see lines)"
    return report
