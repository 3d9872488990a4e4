"""A request's retry state: Envoy's conditions for retrying a failure, the limit that turns
a retriable failure into URX, and the cluster's maxRetries slot a stream takes once."""

from __future__ import annotations

from meshproxy.codec.events import ResponseHead
from meshproxy.codec.h1_limits import Limits
from meshproxy.errors import FailureKind, UpstreamError
from meshproxy.proxy.retries import RetryState
from meshproxy.routing.table import RetryPolicy
from meshproxy.upstream.breaker import CircuitBreaker
from meshproxy.upstream.cluster import EndpointState
from meshproxy.upstream.pool import Pool


def state(on: str, attempts: int = 2) -> RetryState:
    s = RetryState()
    s.use(RetryPolicy(attempts, on=frozenset(on.split(","))))
    return s


def refused() -> UpstreamError:
    return UpstreamError(FailureKind.CONNECT_REFUSED, "refused", flag="UF")


def test_a_connect_failure_is_retried_until_the_attempts_run_out_then_marked_exhausted() -> None:
    s = state("connect-failure", attempts=2)
    for number in (2, 3):
        assert s.retries_failure(refused(), True, None)
        s.count(None)
        assert s.attempts == number
    assert not s.retries_failure(refused(), True, None)
    assert s.exhausted  # the stream's 503 then carries UF,URX


def test_what_the_policy_does_not_name_or_cannot_replay_is_not_retried() -> None:
    reset = UpstreamError(FailureKind.RESET, "reset", flag="UC")
    assert not state("connect-failure").retries_failure(reset, True, None)
    assert state("reset").retries_failure(reset, True, None)
    assert not state("reset").retries_failure(reset, False, None)  # body no longer held
    started = UpstreamError(FailureKind.RESET, "reset", flag="UC", response_started=True)
    assert not state("reset").retries_failure(started, True, None)
    overflow = UpstreamError(FailureKind.OVERFLOW, "full", flag="UO")
    assert not state("5xx").retries_failure(overflow, True, None)
    assert not state("5xx").exhausted


def test_responses_retried_by_status_and_by_grpc_code() -> None:
    assert state("5xx").retries_response(ResponseHead(503, []), False, None)
    assert not state("5xx").retries_response(ResponseHead(404, []), False, None)
    grpc = RetryState()
    grpc.use(RetryPolicy(1, on=frozenset({"unavailable"}), grpc_codes=frozenset({14})))
    unavailable = ResponseHead(200, [(b"grpc-status", b"14")])
    assert grpc.retries_response(unavailable, True, None)
    grpc.count(None)
    assert not grpc.retries_response(unavailable, True, None)  # none left


def test_a_stream_holds_one_max_retries_slot_for_all_its_retries() -> None:
    breaker = CircuitBreaker(max_retries=1)
    first, second = state("connect-failure", 3), state("connect-failure", 3)
    assert first.retries_failure(refused(), True, breaker)
    first.count(None)
    assert first.retries_failure(refused(), True, breaker)  # its own slot, not another
    assert breaker.retries == 1
    assert not second.retries_failure(refused(), True, breaker)
    assert breaker.overflows["retry"] == 1


def test_failed_hosts_are_remembered_once() -> None:
    s = state("connect-failure", 3)
    pool = Pool("10.0.0.7", 8080, codec="httptools", limits=Limits(), connect_timeout=1.0,
                idle_timeout=1.0, max_requests=0, bind_source=None)  # fmt: skip
    host = EndpointState("10.0.0.7", 8080, 1, pool)  # nothing connects
    s.count(host)
    s.count(host)
    assert s.tried == [host] and s.left == 1
