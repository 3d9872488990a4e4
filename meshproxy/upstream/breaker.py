"""Circuit breaking (DestinationRule connectionPool): limits that fail fast, never queue forever.

Envoy's thresholds, with Istio's defaults (unset = 2^32-1, i.e. off): tcp.maxConnections,
http.http1MaxPendingRequests (requests waiting for a connection when maxConnections is
reached), http.http2MaxRequests (requests in flight to the cluster, any protocol) and
http.maxRetries (retries in flight), or instead a retry budget (retryBudget: retries in flight
up to a percentage of the requests active and pending, never fewer than a minimum). A request
over a limit gets 503 with flag UO and `x-envoy-overloaded: true`, and is counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

UNLIMITED = 2**32 - 1


@dataclass(slots=True)
class CircuitBreaker:
    max_connections: int = UNLIMITED
    max_pending: int = UNLIMITED
    max_requests: int = UNLIMITED
    max_retries: int = UNLIMITED
    budget_percent: float | None = None  # retryBudget: replaces max_retries when set
    min_retry_concurrency: int = 3
    connections: int = 0
    pending: int = 0
    requests: int = 0
    retries: int = 0
    overflows: dict[str, int] = field(
        default_factory=lambda: {"cx": 0, "pending": 0, "rq": 0, "retry": 0}
    )

    @property
    def limited(self) -> bool:
        return (
            self.max_connections != UNLIMITED
            or self.max_pending != UNLIMITED
            or self.max_requests != UNLIMITED
            or self.max_retries != UNLIMITED
            or self.budget_percent is not None
        )

    def admit_request(self) -> bool:
        if self.requests >= self.max_requests:
            self.overflows["rq"] += 1
            return False
        self.requests += 1
        return True

    def admit_retry(self) -> bool:
        limit = self.max_retries
        if self.budget_percent is not None:
            active = self.requests + self.pending
            limit = max(self.min_retry_concurrency, int(self.budget_percent * active / 100))
        if self.retries >= limit:
            self.overflows["retry"] += 1
            return False
        self.retries += 1
        return True

    def may_connect(self) -> bool:
        return self.connections < self.max_connections

    def as_dict(self) -> dict[str, object]:
        def show(n: int) -> object:
            return "unlimited" if n == UNLIMITED else n

        return {
            "max_connections": show(self.max_connections),
            "max_pending_requests": show(self.max_pending),
            "max_requests": show(self.max_requests),
            "max_retries": show(self.max_retries),
            "retry_budget": (
                None
                if self.budget_percent is None
                else {"percent": self.budget_percent, "min": self.min_retry_concurrency}
            ),
            "cx_active": self.connections,
            "rq_pending": self.pending,
            "rq_active": self.requests,
            "rq_retry_active": self.retries,
            "overflow": dict(self.overflows),
        }
