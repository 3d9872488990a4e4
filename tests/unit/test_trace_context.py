"""Trace context kept as hex: what comes in is what goes out, ids are validated as both
formats require, and 64-bit B3 trace ids stay 64-bit upstream."""

from __future__ import annotations

import pytest

from meshproxy.observe.trace_context import (
    Sampling,
    decide,
    parse_b3_single,
    parse_incoming,
    parse_traceparent,
    upstream_headers,
)

TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
SPAN = b"00f067aa0ba902b7"


def test_w3c_parent_is_continued_with_a_new_span_and_its_tracestate() -> None:
    incoming = parse_incoming(
        {b"traceparent": b"00-" + TRACE.upper() + b"-" + SPAN + b"-00", b"tracestate": b"a=1, b=2"}
    )
    assert incoming is not None and incoming.trace_id == TRACE and incoming.sampled is False
    trace = decide(incoming, Sampling(100.0, True))
    assert trace is not None  # the caller's "not sampled" wins over 100 %
    headers = dict(upstream_headers(trace))
    version, trace_id, span_id, flags = headers[b"traceparent"].split(b"-")
    assert (version, trace_id, flags) == (b"00", TRACE, b"00")
    assert len(span_id) == 16 and span_id != SPAN and int(span_id, 16) != 0
    assert headers[b"tracestate"] == b"a=1,b=2"


@pytest.mark.parametrize(
    "value",
    [
        b"00-" + b"0" * 32 + b"-" + SPAN + b"-01",  # all-zero trace id
        b"00-" + TRACE + b"-" + b"0" * 16 + b"-01",  # all-zero span id
        b"00-" + TRACE[:-1] + b"g-" + SPAN + b"-01",  # not hex
        b"ff-" + TRACE + b"-" + SPAN + b"-01",  # version ff is invalid
        b"00-" + TRACE + b"-" + SPAN + b"-01-extra",  # version 00 has four fields
        b"00-" + TRACE + b"-" + SPAN,
    ],
)
def test_malformed_traceparents_are_no_parent(value: bytes) -> None:
    assert parse_traceparent(value) is None


def test_a_64_bit_b3_trace_id_stays_64_bit_upstream() -> None:
    incoming = parse_b3_single(b"a3ce929d0e0e4736-" + SPAN + b"-1")
    assert incoming is not None and incoming.trace_id == b"0" * 16 + b"a3ce929d0e0e4736"
    trace = decide(incoming, Sampling(0.0, False))  # sampled, but spans not reported
    assert trace is not None and trace.sampled
    headers = dict(upstream_headers(trace))
    trace_id, span_id, sampled, parent = headers[b"b3"].split(b"-")
    assert (trace_id, span_id, sampled, parent) == (b"a3ce929d0e0e4736", trace.span_id, b"1", SPAN)
    assert headers[b"traceparent"].split(b"-")[1] == incoming.trace_id  # W3C: 32 digits


def test_b3_multi_is_answered_in_b3_multi() -> None:
    incoming = parse_incoming({b"x-b3-traceid": TRACE, b"x-b3-spanid": SPAN})
    assert incoming is not None and incoming.sampled is None
    trace = decide(incoming, Sampling(0.0, True))
    assert trace is not None and not trace.sampled
    headers = dict(upstream_headers(trace))
    assert headers[b"x-b3-traceid"] == TRACE and headers[b"x-b3-parentspanid"] == SPAN
    assert headers[b"x-b3-sampled"] == b"0" and headers[b"x-b3-spanid"] == trace.span_id


def test_new_traces_get_random_ids_and_sampled_ones_go_to_the_sdk() -> None:
    ids = set()
    for _ in range(50):
        trace = decide(None, Sampling(0.0, True))
        assert trace is not None and len(trace.trace_id) == 32 and len(trace.span_id) == 16
        ids.add(trace.trace_id)
    assert len(ids) == 50
    assert decide(None, Sampling(100.0, True)) is None  # the SDK span is begun instead
