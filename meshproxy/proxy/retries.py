"""One request's retries: the route's retry policy, what is left of it and what was tried
(Envoy's router retry state).

The stream asks it whether a failed attempt or a response is retried; what a retry then
does (abort the attempt, renumber x-envoy-attempt-count, a child span, pick again) is the
stream's. Compiled with the hot path: every stream owns one.
"""

from __future__ import annotations

from meshproxy.codec.events import ResponseHead
from meshproxy.codec.grpc import grpc_status_of
from meshproxy.errors import CONNECT_FAILURES, FailureKind, UpstreamError
from meshproxy.routing.table import NO_RETRY, RetryPolicy
from meshproxy.upstream.breaker import CircuitBreaker
from meshproxy.upstream.cluster import EndpointState


class RetryState:
    def __init__(self) -> None:
        self.policy: RetryPolicy = NO_RETRY
        self.left = 0  # retries the policy still allows
        self.attempts = 1  # the current try's number (x-envoy-attempt-count)
        self.tried: list[EndpointState] = []  # hosts that failed, avoided when the policy says
        self.exhausted = False  # a failure the policy retries found none left (flag URX)
        self.admitted = False  # holds one of the cluster's maxRetries slots (one per stream)

    def use(self, policy: RetryPolicy) -> None:
        self.policy = policy
        self.left = policy.attempts

    def retries_failure(
        self, err: UpstreamError, replayable: bool, breaker: CircuitBreaker | None
    ) -> bool:
        """Whether the policy retries this failed attempt (Envoy's retryOn conditions) and
        the cluster's maxRetries lets it; `replayable`: the request body is still held."""
        policy = self.policy
        if not policy.on or err.response_started or not replayable:
            return False
        kind = err.kind
        if kind is FailureKind.NO_HEALTHY or kind is FailureKind.OVERFLOW:
            return False
        connect = kind in CONNECT_FAILURES
        if not policy.retries_failure(connect, err.unprocessed, err.request_bytes_sent):
            return False
        if self.left <= 0:
            self.exhausted = True
            return False
        return self.admit(breaker)

    def retries_response(
        self, head: ResponseHead, grpc: bool, breaker: CircuitBreaker | None
    ) -> bool:
        """Whether the policy retries this response (5xx, 503, retriable headers, gRPC
        codes, ...) and the cluster's maxRetries lets it."""
        if self.left <= 0:
            return False
        policy = self.policy
        retry = policy.retries_response(head.status, head.headers)
        if not retry and grpc and policy.grpc_codes:
            code = grpc_status_of(head.headers, "")  # a trailers-only answer carries it here
            retry = code.isdigit() and int(code) in policy.grpc_codes
        return retry and self.admit(breaker)

    def admit(self, breaker: CircuitBreaker | None) -> bool:
        """The cluster's maxRetries: retries in flight at once (a stream takes one slot for
        all its retries and gives it back when it ends)."""
        if self.admitted or breaker is None or not breaker.limited:
            return True
        if breaker.admit_retry():
            self.admitted = True
            return True
        return False

    def count(self, failed: EndpointState | None) -> None:
        """A retry is decided: one fewer left, the next attempt's number, the host to avoid."""
        self.left -= 1
        self.attempts += 1
        if failed is not None and failed not in self.tried:
            self.tried.append(failed)
