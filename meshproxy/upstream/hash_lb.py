"""Consistent-hash load balancers: Envoy's ring hash and Maglev.

Both are built from the cluster's host set (addresses and weights) the way Envoy builds them,
with BLAKE2b-64 where Envoy uses xxHash64 (the hash only has to be stable and well spread;
no other proxy shares our ring). A host that is unavailable (ejected) is skipped by walking
forward from the hashed position: on a ring that is exactly where Envoy's rebuilt ring sends
its keys; for Maglev, Envoy rebuilds the table without it, which moves a few more keys than
the walk does — we keep the walk so an ejection never costs a table build (tens of ms in
Python) on the request path. Keys of the hosts that stay keep their host either way.
"""

from __future__ import annotations

import bisect
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Protocol


class HashedHost(Protocol):
    address: str
    port: int
    weight: int

    @property
    def available(self) -> bool: ...


def hash64(data: bytes, seed: int = 0) -> int:
    salt = seed.to_bytes(8, "little") if seed else b""
    return int.from_bytes(hashlib.blake2b(data, digest_size=8, salt=salt).digest(), "little")


def _host_key(host: HashedHost) -> bytes:
    return f"{host.address}:{host.port}".encode()


def _normalized(hosts: Sequence[HashedHost]) -> list[float]:
    total = sum(max(h.weight, 0) for h in hosts) or 1
    return [max(h.weight, 0) / total for h in hosts]


def _first_available(
    hosts: Sequence[HashedHost], owners: list[int], start: int
) -> HashedHost | None:
    """The owner at `start`, or the next available one going forward (wrapping): usually one
    step, since the owner is available."""
    size = len(owners)
    for step in range(size):
        host = hosts[owners[(start + step) % size]]
        if host.available:
            return host
    return None


MAX_RING_SIZE = 8 * 1024 * 1024  # Envoy's default maximum_ring_size


class RingHash:
    """Envoy's RingHashLoadBalancer: each host gets hashes of "address_i", in proportion to
    its weight, with the lightest host getting at least one whole share of the minimum size."""

    def __init__(self, hosts: Sequence[HashedHost], minimum_ring_size: int = 1024) -> None:
        self.hosts = list(hosts)
        weights = _normalized(self.hosts)
        positive = [w for w in weights if w > 0]
        entries: list[tuple[int, int]] = []
        if positive:
            lightest = min(positive)
            scale = min(math.ceil(lightest * minimum_ring_size) / lightest, MAX_RING_SIZE)
            current = target = 0.0
            for index, (host, weight) in enumerate(zip(self.hosts, weights, strict=True)):
                key = _host_key(host)
                target += scale * weight
                i = 0
                while current < target:
                    entries.append((hash64(key + b"_%d" % i), index))
                    i += 1
                    current += 1
        entries.sort()
        self._hashes = [h for h, _ in entries]
        self._owners = [i for _, i in entries]

    def pick(self, key: int) -> HashedHost | None:
        return _first_available(self.hosts, self._owners, bisect.bisect_left(self._hashes, key))

    @property
    def size(self) -> int:
        return len(self._hashes)


class Maglev:
    """Envoy's MaglevTable with weights: hosts take turns filling their next preferred free
    slot (offset + skip·n mod M), a host's turn coming in proportion to its weight."""

    def __init__(self, hosts: Sequence[HashedHost], table_size: int = 65537) -> None:
        self.hosts = list(hosts)
        weights = _normalized(self.hosts)
        m = table_size
        live = [i for i, w in enumerate(weights) if w > 0]
        table = [-1] * m
        if live:
            heaviest = max(weights)
            offsets = {i: hash64(_host_key(self.hosts[i])) % m for i in live}
            skips = {i: hash64(_host_key(self.hosts[i]), 1) % (m - 1) + 1 for i in live}
            nexts = dict.fromkeys(live, 0)
            targets = dict.fromkeys(live, 0.0)
            filled = iteration = 0
            while filled < m:
                iteration += 1
                for i in live:
                    if filled >= m:
                        break
                    if iteration * weights[i] < targets[i]:
                        continue
                    targets[i] += heaviest
                    offset, skip, n = offsets[i], skips[i], nexts[i]
                    slot = (offset + skip * n) % m
                    while table[slot] >= 0:
                        n += 1
                        slot = (offset + skip * n) % m
                    table[slot] = i
                    nexts[i] = n + 1
                    filled += 1
        self._table = table if live else []

    def pick(self, key: int) -> HashedHost | None:
        table = self._table
        return _first_available(self.hosts, table, key % len(table)) if table else None

    @property
    def size(self) -> int:
        return len(self._table)


class HashBalancer:
    """The table for the cluster's current host list, rebuilt when that list changes."""

    def __init__(self, maglev: bool, size: int, rng: random.Random | None = None) -> None:
        self._maglev = maglev
        self._size = size
        self._rng = rng or random.Random()
        self._built_for: Sequence[HashedHost] | None = None
        self._weights: tuple[int, ...] = ()
        self._table: RingHash | Maglev | None = None

    def pick(self, hosts: Sequence[HashedHost], key: int | None) -> HashedHost | None:
        """No key (the header, cookie or parameter was missing): a random point, as Envoy."""
        table = self._table
        weights = tuple(h.weight for h in hosts)
        if table is None or self._built_for is not hosts or self._weights != weights:
            table = Maglev(hosts, self._size) if self._maglev else RingHash(hosts, self._size)
            self._table, self._built_for, self._weights = table, hosts, weights
        return table.pick(key if key is not None else self._rng.getrandbits(64))
