"""Slow start (DestinationRule loadBalancer.warmup), Envoy's formula.

An endpoint younger than the window takes traffic in proportion to
weight · max(minimumPercent/100, timeFactor^(1/aggression)), timeFactor =
max(age, 1 s) / window, for ROUND_ROBIN and LEAST_REQUEST (as Istio documents). An endpoint's
age counts from when this proxy first saw it; a config reload that keeps the endpoint keeps
its age.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

from meshproxy.config.resources import Warmup


def factor(warmup: Warmup, age: float) -> float:
    if age >= warmup.duration:
        return 1.0
    time_factor = max(age, 1.0) / warmup.duration
    return max(warmup.minimum_percent / 100, float(time_factor ** (1 / warmup.aggression)))


class WarmingHost(Protocol):
    weight: int
    active_requests: int
    joined_at: float

    @property
    def available(self) -> bool: ...


class WarmedView:
    """A host as the balancer sees it during slow start: same counters, scaled weight."""

    __slots__ = ("active_requests", "available", "host", "weight")

    def __init__(self, host: WarmingHost, weight: float) -> None:
        self.host = host
        self.weight = weight
        self.active_requests = host.active_requests
        self.available = host.available


def warmed(hosts: Sequence[WarmingHost], warmup: Warmup, now: float) -> list[WarmedView] | None:
    """Views with slow-start weights, or None when no host is young (the common case)."""
    if all(now - h.joined_at >= warmup.duration for h in hosts):
        return None
    return [WarmedView(h, h.weight * factor(warmup, now - h.joined_at)) for h in hosts]
