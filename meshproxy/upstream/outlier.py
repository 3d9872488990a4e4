"""Outlier detection (DestinationRule outlierDetection) with Envoy's consecutive-error rules.

Every attempt's outcome is reported per endpoint: a 5xx response or a locally originated
failure (connect failure, reset, timeout) counts toward consecutive5xxErrors; 502/503/504 and
local failures toward consecutiveGatewayErrors; anything else resets both counts, as Envoy's
default (non-split) mode does. At the threshold the endpoint is ejected for baseEjectionTime times
the number of times it was ejected (at most 300 s), unless that would eject more than
maxEjectionPercent of the endpoints or leave fewer than minHealthPercent healthy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Protocol

from meshproxy.config.snapshot import OutlierSpec

MAX_EJECTION_TIME = 300.0  # Envoy's max_ejection_time default


class Ejectable(Protocol):
    ejected: bool
    ejections: int
    consecutive_5xx: int
    consecutive_gateway: int


class OutlierDetector:
    def __init__(
        self,
        spec: OutlierSpec,
        hosts: Callable[[], Sequence[Ejectable]],
        on_ejection: Callable[[], None] | None = None,
    ) -> None:
        self.spec = spec
        self._hosts = hosts
        self._on_ejection = on_ejection
        self.ejections_total = 0

    def report(self, host: Ejectable, status: int | None) -> None:
        """One attempt's outcome: an HTTP status, or None for a local-origin failure."""
        spec = self.spec
        failed_5xx = status is None or status >= 500
        failed_gateway = status is None or status in (502, 503, 504)
        if not failed_5xx:
            host.consecutive_5xx = 0
            host.consecutive_gateway = 0
            return
        host.consecutive_5xx += 1
        host.consecutive_gateway = host.consecutive_gateway + 1 if failed_gateway else 0
        if (spec.consecutive_5xx and host.consecutive_5xx >= spec.consecutive_5xx) or (
            spec.consecutive_gateway and host.consecutive_gateway >= spec.consecutive_gateway
        ):
            self._eject(host)

    def _eject(self, host: Ejectable) -> None:
        if host.ejected:
            return
        hosts = self._hosts()
        total = len(hosts)
        ejected = sum(1 for h in hosts if h.ejected)
        if total == 0 or ejected * 100 / total >= self.spec.max_ejection_percent:
            return  # already at maxEjectionPercent
        if (total - ejected - 1) * 100 / total < self.spec.min_health_percent:
            return  # below minHealthPercent outlier detection stands aside
        host.ejected = True
        host.ejections += 1
        host.consecutive_5xx = host.consecutive_gateway = 0
        self.ejections_total += 1
        if self._on_ejection is not None:
            self._on_ejection()
        duration = min(self.spec.base_ejection_time * host.ejections, MAX_EJECTION_TIME)
        asyncio.get_running_loop().call_later(duration, self._return, host)

    @staticmethod
    def _return(host: Ejectable) -> None:
        host.ejected = False  # back after its ejection time (Envoy checks at each interval)
