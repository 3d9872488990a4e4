"""Local rate limiting: Envoy's token bucket (local_ratelimit), refilled lazily on use.

A bucket starts full. Every whole fill_interval since the last fill adds tokens_per_fill, up to
max_tokens; each request takes one token or is refused. Buckets are kept per limit spec, so a
reload that leaves a limit unchanged keeps its bucket; one whose limit changed starts full.
Buckets are per worker process (Envoy shares one across its threads): with `concurrency` N
the proxy admits up to N times the configured rate.
"""

from __future__ import annotations

from meshproxy.routing.table import RateLimit


class TokenBucket:
    __slots__ = ("_last_fill", "interval", "max_tokens", "per_fill", "tokens")

    def __init__(self, limit: RateLimit, now: float) -> None:
        self.max_tokens = limit.max_tokens
        self.per_fill = limit.tokens_per_fill
        self.interval = limit.fill_interval
        self.tokens = limit.max_tokens
        self._last_fill = now

    def take(self, now: float) -> bool:
        if self.tokens < self.max_tokens:
            fills = int((now - self._last_fill) / self.interval)
            if fills > 0:
                self.tokens = min(self.max_tokens, self.tokens + fills * self.per_fill)
                self._last_fill += fills * self.interval
        else:
            self._last_fill = now  # full: the next interval starts from here
        if self.tokens <= 0:
            return False
        self.tokens -= 1
        return True


class RateLimiters:
    """The live bucket of each configured limit."""

    def __init__(self) -> None:
        self._buckets: dict[RateLimit, TokenBucket] = {}

    def take(self, limit: RateLimit, now: float) -> bool:
        bucket = self._buckets.get(limit)
        if bucket is None:
            bucket = self._buckets[limit] = TokenBucket(limit, now)
        return bucket.take(now)

    def retain(self, limits: set[RateLimit]) -> None:
        """After a reload: forget buckets of limits the new config no longer has."""
        for limit in list(self._buckets):
            if limit not in limits:
                del self._buckets[limit]
