"""gRPC wire rules: grpc-timeout parsing and rewriting, status mapping, trailers-only replies."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from meshproxy.codec.events import RequestHead
from meshproxy.codec.grpc import (
    format_grpc_timeout,
    grpc_deadline,
    grpc_reply_headers,
    grpc_status_for_http,
    is_grpc,
    parse_grpc_timeout,
    with_grpc_timeout,
)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (b"1S", 1.0),
        (b"250m", 0.25),
        (b"2M", 120.0),
        (b"1H", 3600.0),
        (b"10u", 1e-5),
        (b"99999999n", 0.099999999),
        (b"99999999H", 99999999 * 3600.0),
    ],
)
def test_valid_timeouts(value: bytes, seconds: float) -> None:
    assert parse_grpc_timeout(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [b"", b"1", b"S", b"123456789S", b"1x", b"-5S", b"1.5S", b"5 S"])
def test_invalid_timeouts_are_none(value: bytes) -> None:
    assert parse_grpc_timeout(value) is None


@given(st.floats(min_value=0, max_value=1e12, allow_nan=False))
def test_formatted_timeout_is_valid_and_never_shorter(seconds: float) -> None:
    text = format_grpc_timeout(seconds)
    parsed = parse_grpc_timeout(text)
    assert parsed is not None
    assert parsed >= min(seconds, 99999999 * 3600.0) - 1e-9


def _head(*headers: tuple[bytes, bytes]) -> RequestHead:
    return RequestHead(b"POST", b"/s/M", list(headers))


def test_deadline_is_the_smaller_of_route_timeout_and_grpc_timeout() -> None:
    head = _head((b"grpc-timeout", b"2S"))
    assert grpc_deadline(head, None) == 2.0
    assert grpc_deadline(head, 0.5) == 0.5
    assert grpc_deadline(_head((b"grpc-timeout", b"junk")), 3.0) == 3.0
    assert grpc_deadline(_head(), None) is None


def test_grpc_timeout_rewritten_or_dropped() -> None:
    headers = [(b"a", b"1"), (b"grpc-timeout", b"123456789S")]
    assert with_grpc_timeout(headers, None) == [(b"a", b"1")]
    assert with_grpc_timeout(headers, 0.3) == [(b"a", b"1"), (b"grpc-timeout", b"300m")]


def test_is_grpc() -> None:
    assert is_grpc(_head((b"content-type", b"application/grpc+proto")))
    assert not is_grpc(_head((b"content-type", b"application/json")))
    assert not is_grpc(_head())


def test_http_status_mapping_as_envoy() -> None:
    assert [grpc_status_for_http(s) for s in (400, 401, 403, 404, 429, 502, 503, 504, 500)] == [
        13,
        16,
        7,
        12,
        14,
        14,
        14,
        14,
        2,
    ]


def test_reply_headers_percent_encode_the_message() -> None:
    headers = dict(grpc_reply_headers(14, "no upstream: ünï 100%"))
    assert headers[b"grpc-status"] == b"14"
    assert headers[b"grpc-message"] == b"no upstream: %C3%BCn%C3%AF 100%25"
