"""Ring hash and Maglev: stable, weighted, minimal movement, ejected hosts skipped."""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass

import pytest

from meshproxy.upstream.hash_lb import HashBalancer, Maglev, RingHash, hash64


@dataclass
class H:
    address: str
    port: int = 80
    weight: int = 1
    alive: bool = True

    @property
    def available(self) -> bool:
        return self.alive


def keys(n: int) -> list[int]:
    return [hash64(b"user-%d" % i) for i in range(n)]


@pytest.mark.parametrize("kind", [RingHash, Maglev])
def test_same_key_same_host_and_even_spread(kind: type[RingHash] | type[Maglev]) -> None:
    hosts = [H(f"10.0.0.{i}") for i in range(4)]
    table = kind(hosts)
    again = kind(list(hosts))  # built again from the same set: the same answers
    picks = [table.pick(k) for k in keys(4000)]
    assert picks == [again.pick(k) for k in keys(4000)]
    counts = Counter(h.address for h in picks if h is not None)
    assert len(counts) == 4
    assert all(700 < c < 1300 for c in counts.values()), counts  # 1000 each, ±30 %


@pytest.mark.parametrize("kind", [RingHash, Maglev])
def test_weights_are_honoured(kind: type[RingHash] | type[Maglev]) -> None:
    heavy, light = H("10.0.0.1", weight=3), H("10.0.0.2", weight=1)
    table = kind([heavy, light])
    counts = Counter(table.pick(k) is heavy for k in keys(4000))
    assert 2700 < counts[True] < 3300, counts  # 75 % ± 7.5 points


@pytest.mark.parametrize("kind", [RingHash, Maglev])
def test_removing_a_host_moves_only_its_keys(kind: type[RingHash] | type[Maglev]) -> None:
    hosts = [H(f"10.0.0.{i}") for i in range(5)]
    before = kind(hosts)
    after = kind(hosts[:4])
    ks = keys(3000)
    moved = sum(1 for k in ks if (b := before.pick(k)) is not hosts[4] and after.pick(k) is not b)
    # A rebuilt table moves some keys of the hosts that stay (the ring rescales to its
    # minimum size, Maglev refills); hashing modulo the host count would move about 80 %.
    assert moved < 0.15 * len(ks), moved


@pytest.mark.parametrize("kind", [RingHash, Maglev])
def test_unavailable_host_is_skipped_and_others_keep_their_keys(
    kind: type[RingHash] | type[Maglev],
) -> None:
    hosts = [H(f"10.0.0.{i}") for i in range(3)]
    table = kind(hosts)
    ks = keys(900)
    before = [table.pick(k) for k in ks]
    hosts[0].alive = False
    after = [table.pick(k) for k in ks]
    assert hosts[0] not in after
    assert all(b is a for a, b in zip(before, after, strict=True) if a is not hosts[0])
    moved_to = Counter(a.address for a, b in zip(after, before, strict=True) if b is hosts[0])
    assert set(moved_to) == {"10.0.0.1", "10.0.0.2"}  # spread, not all onto one neighbour
    for h in hosts:
        h.alive = False
    assert table.pick(ks[0]) is None


def test_ring_size_follows_envoy_scaling() -> None:
    assert RingHash([H("a"), H("b")], 1024).size == 1024
    assert RingHash([H("a", weight=1), H("b", weight=3)], 1024).size == 1024
    assert RingHash([H("a", weight=1), H("b", weight=1000)], 1024).size > 1024  # lightest ≥ 1
    assert Maglev([H("a")], 251).size == 251
    assert RingHash([], 1024).pick(1) is None and Maglev([], 7).pick(1) is None


def test_balancer_rebuilds_when_the_host_list_changes_and_randomises_without_key() -> None:
    hosts = [H("10.0.0.1"), H("10.0.0.2")]
    lb = HashBalancer(maglev=False, size=1024, rng=random.Random(7))
    k = hash64(b"x")
    first = lb.pick(hosts, k)
    assert all(lb.pick(hosts, k) is first for _ in range(10))
    grown = [*hosts, H("10.0.0.3")]
    assert lb.pick(grown, k) in grown  # a new list: a new ring
    spread = Counter(lb.pick(hosts, None).address for _ in range(400))  # type: ignore[union-attr]
    assert len(spread) == 2 and min(spread.values()) > 100
