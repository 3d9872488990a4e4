"""Slow start: Envoy's weight formula, and a young endpoint's share under round robin."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from meshproxy.config.resources import Warmup
from meshproxy.upstream.lb import RoundRobin
from meshproxy.upstream.warmup import WarmedView, factor, warmed


@dataclass
class H:
    name: str
    joined_at: float
    weight: int = 1
    active_requests: int = 0
    available: bool = True


def test_factor_follows_envoys_formula() -> None:
    w = Warmup(duration=100.0, minimum_percent=10.0, aggression=1.0)
    assert factor(w, 0.0) == 0.1  # max(age, 1 s)/window = 0.01, floored at 10 %
    assert factor(w, 50.0) == 0.5
    assert factor(w, 100.0) == 1.0
    assert abs(factor(Warmup(100.0, 0.0, 2.0), 25.0) - 0.5) < 1e-9  # (0.25)^(1/2)


def test_a_young_endpoint_gets_its_scaled_share() -> None:
    old, young = H("old", joined_at=0.0), H("young", joined_at=995.0)
    w = Warmup(duration=10.0)
    assert warmed([old], w, now=1000.0) is None  # nobody young: the plain path
    views = warmed([old, young], w, now=1000.0)
    assert views is not None
    rr = RoundRobin()
    picks = Counter()
    for _ in range(300):
        view = rr.pick(views)
        assert isinstance(view, WarmedView)
        picks[view.host.name] += 1  # type: ignore[attr-defined]
    assert picks["young"] == 100  # weight 0.5 against 1: a third of the picks
