"""Load balancers: weights honoured, least-request prefers idle hosts, dead hosts skipped."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

from meshproxy.upstream.lb import LeastRequest, Random, RoundRobin


@dataclass
class H:
    name: str
    weight: int = 1
    active_requests: int = 0
    alive: bool = True

    @property
    def available(self) -> bool:
        return self.alive


def test_round_robin_is_smooth_and_weighted() -> None:
    hosts = [H("a", 5), H("b", 1), H("c", 1)]
    rr = RoundRobin()
    seq = [rr.pick(hosts).name for _ in range(7)]  # type: ignore[union-attr]
    assert Counter(seq) == {"a": 5, "b": 1, "c": 1}
    assert seq[:3] != ["a", "a", "a"]  # smooth: not bursty


def test_round_robin_skips_unavailable_and_empty() -> None:
    hosts = [H("a", alive=False), H("b")]
    rr = RoundRobin()
    assert {rr.pick(hosts).name for _ in range(4)} == {"b"}  # type: ignore[union-attr]
    assert rr.pick([H("x", alive=False)]) is None


def test_least_request_prefers_fewer_active() -> None:
    busy, idle = H("busy", active_requests=10), H("idle")
    lb = LeastRequest(random.Random(1))
    assert all(lb.pick([busy, idle]) is idle for _ in range(50))


def test_least_request_with_weights_spreads_by_weight() -> None:
    hosts = [H("a", 3), H("b", 1)]
    lb = LeastRequest(random.Random(7))
    counts = Counter(lb.pick(hosts).name for _ in range(4000))  # type: ignore[union-attr]
    assert 0.6 < counts["a"] / 4000 < 0.95


def test_random_is_weighted() -> None:
    hosts = [H("a", 9), H("b", 1)]
    lb = Random(random.Random(3))
    counts = Counter(lb.pick(hosts).name for _ in range(5000))  # type: ignore[union-attr]
    assert 0.87 < counts["a"] / 5000 < 0.93
