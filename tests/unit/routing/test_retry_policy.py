"""Istio's translation of VirtualService retries, and Envoy's backoff bounds."""

from __future__ import annotations

import pytest

from meshproxy.config.compile import retry_policy
from meshproxy.config.resources import HTTPRetry
from meshproxy.routing.table import NO_RETRY, OUTBOUND_DEFAULT_RETRY, retry_backoff


def test_absent_retries_are_istios_default() -> None:
    p = retry_policy(None, None)
    assert p is OUTBOUND_DEFAULT_RETRY and p.attempts == 2
    assert "connect-failure" in p.on and "5xx" not in p.on
    assert not p.retries_response(503)  # istio#50506: a 503 from the app is not replayed
    assert p.grpc_codes == {1, 14}


def test_attempts_zero_disables() -> None:
    assert retry_policy(HTTPRetry(attempts=0), None) is NO_RETRY


def test_retry_on_names_and_codes() -> None:
    p = retry_policy(HTTPRetry(3, 0.5, ("5xx", "409", "unavailable")), 2.0)
    assert (p.attempts, p.per_try_timeout) == (3, 0.5)
    assert p.status_codes == {409} and p.grpc_codes == {14}
    assert p.retries_response(500) and p.retries_response(409) and not p.retries_response(404)


def test_per_try_timeout_not_below_the_route_timeout_is_ignored() -> None:
    assert retry_policy(HTTPRetry(2, 3.0), 2.0).per_try_timeout is None


def test_no_retry_on_keeps_the_default_conditions() -> None:
    p = retry_policy(HTTPRetry(attempts=5), None)
    assert p.attempts == 5 and p.on == OUTBOUND_DEFAULT_RETRY.on


@pytest.mark.parametrize(("retry", "ceiling"), [(1, 0.025), (2, 0.075), (3, 0.175), (9, 0.25)])
def test_backoff_is_jittered_under_envoys_ceiling(retry: int, ceiling: float) -> None:
    samples = [retry_backoff(retry) for _ in range(300)]
    assert all(0 <= s <= ceiling for s in samples)
    assert max(samples) > ceiling * 0.5  # full jitter, not a constant


def test_request_override_headers_extend_the_route_policy() -> None:
    from meshproxy.proxy.retry_headers import apply_overrides

    policy, timeout = apply_overrides(
        OUTBOUND_DEFAULT_RETRY,
        5.0,
        [
            (b"x-envoy-retry-on", b"5xx, bogus ,retriable-headers"),
            (b"x-envoy-retry-grpc-on", b"internal"),
            (b"x-envoy-max-retries", b"99"),
            (b"x-envoy-retriable-status-codes", b"418,abc"),
            (b"x-envoy-retriable-header-names", b"X-Again"),
            (b"x-envoy-upstream-rq-timeout-ms", b"250"),
            (b"x-envoy-upstream-rq-per-try-timeout-ms", b"nope"),
        ],
    )
    assert {"5xx", "retriable-headers", "connect-failure"} <= policy.on
    assert "bogus" not in policy.on
    assert policy.grpc_codes == {1, 13, 14} and policy.status_codes == {418}
    assert policy.attempts == 10  # capped
    assert policy.retriable_headers == {b"x-again"}
    assert timeout == 0.25 and policy.per_try_timeout is None
    assert policy.retries_response(200, [(b"x-again", b"1")])
    assert not policy.retries_response(200, [(b"x-other", b"1")])
    # A rate-limited answer is retried only on envoy-ratelimited (Envoy's rule).
    assert not policy.retries_response(503, [(b"x-envoy-ratelimited", b"true")])
    limited, _ = apply_overrides(policy, None, [(b"x-envoy-retry-on", b"envoy-ratelimited")])
    assert limited.retries_response(429, [(b"x-envoy-ratelimited", b"true")])
    _, off = apply_overrides(policy, 5.0, [(b"x-envoy-upstream-rq-timeout-ms", b"0")])
    assert off is None  # 0 disables the route timeout
