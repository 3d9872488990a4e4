"""ProxyConfig `overload`: the memory limit and thresholds of the overload actions."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from meshproxy.config.reader import Reader
from meshproxy.config.resources import OverloadSettings
from meshproxy.config.source import Path_

_QUANTITY = re.compile(r"([0-9]+(?:\.[0-9]+)?)(Ki|Mi|Gi|Ti|k|K|M|G|T)?")
_FACTORS = {
    None: 1,
    "k": 10**3,
    "K": 10**3,
    "M": 10**6,
    "G": 10**9,
    "T": 10**12,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
}


def parse_quantity(value: object) -> int | None:
    """A Kubernetes memory quantity ("512Mi", "1G", 268435456) in bytes; None if it is not
    one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value if value >= 0 else None
    if not isinstance(value, str):
        return None
    m = _QUANTITY.fullmatch(value.strip())
    if m is None:
        return None
    return int(float(m.group(1)) * _FACTORS[m.group(2)])


def _threshold(r: Reader, m: Mapping[str, Any], key: str, path: Path_, default: float) -> float:
    value = m.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
        r.error((*path, key), f"expected a fraction of the limit in (0, 1], got {value!r}")
        return default
    return float(value)


def parse_overload(r: Reader, value: Any, path: Path_) -> OverloadSettings | None:
    m = r.mapping(
        value, path, ("memoryLimit", "shrinkHeapThreshold", "stopAcceptingRequestsThreshold")
    )
    if m is None:
        return None
    defaults = OverloadSettings()
    limit = defaults.memory_limit
    if m.get("memoryLimit") is not None:
        parsed = parse_quantity(m["memoryLimit"])
        if parsed is None:
            r.error(
                (*path, "memoryLimit"),
                f'expected a memory quantity such as "512Mi" or "1G" (0: off), '
                f"got {m['memoryLimit']!r}",
            )
        else:
            limit = parsed
    shrink = _threshold(r, m, "shrinkHeapThreshold", path, defaults.shrink_heap)
    stop = _threshold(r, m, "stopAcceptingRequestsThreshold", path, defaults.stop_requests)
    return OverloadSettings(limit, shrink, stop)
