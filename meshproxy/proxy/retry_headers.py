"""Envoy's per-request retry and timeout headers, honoured from the app (outbound only:
inbound, every x-envoy-* header from outside the mesh is dropped before this).

x-envoy-retry-on and x-envoy-retry-grpc-on add conditions to the route's; x-envoy-max-retries
replaces the retry count; x-envoy-retriable-status-codes and x-envoy-retriable-header-names
add codes and header names; x-envoy-upstream-rq-timeout-ms and
x-envoy-upstream-rq-per-try-timeout-ms replace the route's timeouts (0 disables). Envoy
removes them all before forwarding, and so do we. Unknown names and bad numbers are ignored,
as Envoy ignores them.
"""

from __future__ import annotations

from dataclasses import replace

from meshproxy.codec.grpc import GRPC_RETRY_ON
from meshproxy.routing.table import RetryPolicy

RETRY_ON_NAMES = frozenset(
    {
        "5xx",
        "gateway-error",
        "reset",
        "reset-before-request",
        "connect-failure",
        "envoy-ratelimited",
        "refused-stream",
        "retriable-4xx",
        "retriable-status-codes",
        "retriable-headers",
    }
)
OVERRIDE_HEADERS = frozenset(
    {
        b"x-envoy-retry-on",
        b"x-envoy-retry-grpc-on",
        b"x-envoy-max-retries",
        b"x-envoy-retriable-status-codes",
        b"x-envoy-retriable-header-names",
        b"x-envoy-upstream-rq-timeout-ms",
        b"x-envoy-upstream-rq-per-try-timeout-ms",
    }
)
MAX_RETRIES_FROM_HEADER = 10  # a client cannot ask for an unbounded number of tries


def _names(value: bytes) -> list[str]:
    return [n.strip().lower() for n in value.decode("latin-1").split(",") if n.strip()]


def _millis(value: bytes) -> float | None:
    text = value.strip()
    return int(text) / 1000 if text.isdigit() and len(text) <= 10 else None


def apply_overrides(
    policy: RetryPolicy,
    timeout: float | None,
    headers: list[tuple[bytes, bytes]],
) -> tuple[RetryPolicy, float | None]:
    """The request's retry policy and route timeout after its override headers."""
    on, grpc, codes = set(policy.on), set(policy.grpc_codes), set(policy.status_codes)
    names = set(policy.retriable_headers)
    attempts, per_try = policy.attempts, policy.per_try_timeout
    for key, value in headers:
        if key == b"x-envoy-retry-on":
            on.update(n for n in _names(value) if n in RETRY_ON_NAMES)
        elif key == b"x-envoy-retry-grpc-on":
            for n in _names(value):
                if n in GRPC_RETRY_ON:
                    on.add(n)
                    grpc.add(GRPC_RETRY_ON[n])
        elif key == b"x-envoy-max-retries":
            text = value.strip()
            if text.isdigit() and len(text) <= 4:
                attempts = min(int(text), MAX_RETRIES_FROM_HEADER)
        elif key == b"x-envoy-retriable-status-codes":
            codes.update(int(n) for n in _names(value) if n.isdigit() and 100 <= int(n) <= 599)
        elif key == b"x-envoy-retriable-header-names":
            names.update(n.encode() for n in _names(value))
        elif key == b"x-envoy-upstream-rq-timeout-ms":
            ms = _millis(value)
            if ms is not None:
                timeout = ms or None
        elif key == b"x-envoy-upstream-rq-per-try-timeout-ms":
            ms = _millis(value)
            if ms is not None:
                per_try = ms or None
    if on and policy.attempts == 0 and attempts == 0:
        attempts = 1  # Envoy's num_retries default when only the header asks for retries
    updated = replace(
        policy,
        attempts=attempts,
        per_try_timeout=per_try,
        on=frozenset(on),
        status_codes=frozenset(codes),
        grpc_codes=frozenset(grpc),
        retriable_headers=frozenset(names),
    )
    return updated, timeout
