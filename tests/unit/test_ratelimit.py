"""Token buckets as Envoy's local_ratelimit: full at start, refilled per whole interval."""

from __future__ import annotations

from meshproxy.proxy.ratelimit import RateLimiters, TokenBucket
from meshproxy.routing.table import RateLimit

LIMIT = RateLimit("l", max_tokens=3, tokens_per_fill=2, fill_interval=1.0)


def test_bucket_starts_full_refuses_when_empty_and_refills_per_interval() -> None:
    bucket = TokenBucket(LIMIT, now=100.0)
    assert [bucket.take(100.0) for _ in range(4)] == [True, True, True, False]
    assert not bucket.take(100.9)  # not a whole interval yet
    assert [bucket.take(101.0) for _ in range(3)] == [True, True, False]  # +2 tokens
    assert [bucket.take(105.5) for _ in range(4)] == [True, True, True, False]  # capped at 3


def test_registry_keeps_a_bucket_per_limit_and_forgets_removed_ones() -> None:
    limiters = RateLimiters()
    other = RateLimit("other", 1, 1, 1.0)
    assert all(limiters.take(LIMIT, 0.0) for _ in range(3))
    assert not limiters.take(LIMIT, 0.0)
    assert limiters.take(other, 0.0) and not limiters.take(other, 0.0)
    limiters.retain({LIMIT})
    assert limiters.take(other, 0.0)  # forgotten: a new, full bucket
    assert not limiters.take(LIMIT, 0.0)  # kept: still empty
