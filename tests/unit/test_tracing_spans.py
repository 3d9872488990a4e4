"""The spans the proxy ends are the ones the OpenTelemetry SDK's Tracer would have ended:
the same OTLP bytes for the same ids, times, attributes and status (root, remote parent,
retry attempt), with the SDK's attribute limits applied the same way."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import opentelemetry.sdk.resources
import pytest
from opentelemetry import trace as otel
from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState

from meshproxy.config.telemetry import OtelProvider, TracingConfig
from meshproxy.observe.trace_context import Incoming, RequestTrace
from meshproxy.observe.tracing import CLIENT, SERVER, Tracing

PARENT_TRACE = b"4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = b"00f067aa0ba902b7"
START, END = 1_700_000_000_000_000_000, 1_700_000_000_250_000_000
ATTRIBUTES: dict[str, str | int] = {
    "http.request.method": "GET",
    "url.path": "/cart",
    "http.response.status_code": 503,
    "user_agent.original": "curl/8.5.0",
    "istio.namespace": "shop",
    "guid:x-request-id": "7b0c9a4e-8c1b-4f4e-9f1a-5d1e2c3b4a59",
}


class FixedIds(IdGenerator):
    """The SDK's ids set to the ones the proxy drew, so that both spans can be compared."""

    def __init__(self) -> None:
        self.span_ids: list[int] = []
        self.trace_id = 0

    def generate_span_id(self) -> int:
        return self.span_ids.pop(0)

    def generate_trace_id(self) -> int:
        return self.trace_id


class Sdk:
    """The SDK's own pipeline: a Tracer with the proxy's resource and scope name."""

    def __init__(self, tracing: Tracing) -> None:
        self.ids = FixedIds()
        self.exported = InMemorySpanExporter()
        # A plain Resource with the proxy's attributes: the bytes compared show the proxy's
        # HashedResource encodes as the SDK's own.
        resource = Resource(dict(tracing.resource.attributes), tracing.resource.schema_url)
        self.provider = TracerProvider(resource=resource, id_generator=self.ids)
        self.provider.add_span_processor(SimpleSpanProcessor(self.exported))
        self.tracer = self.provider.get_tracer("meshproxy")


@pytest.fixture
def tracing() -> Iterator[Tracing]:
    config = TracingConfig("otel", OtelProvider("127.0.0.1", 9, "/v1/traces"), 100.0)
    t = Tracing(config, "frontend.shop", "shop")
    yield t
    t.shutdown()


def ours(tracing: Tracing, trace: RequestTrace) -> list[ReadableSpan]:
    """What the proxy hands the batch processor when the request ends."""
    ended: list[ReadableSpan] = []
    tracing.processor.on_end = ended.append  # type: ignore[method-assign]
    tracing.finish(trace, dict(ATTRIBUTES), True, END)
    return ended


def wire(spans: list[ReadableSpan]) -> bytes:
    return encode_spans(spans).SerializeToString()


def test_a_root_span_encodes_as_the_sdks(tracing: Tracing) -> None:
    name = "cart.shop.svc.cluster.local:80/*"
    trace = tracing.begin(None, name, CLIENT, START)
    sdk = Sdk(tracing)
    sdk.ids.trace_id = int(trace.trace_id, 16)
    sdk.ids.span_ids = [int(trace.span_id, 16)]
    span = sdk.tracer.start_span(name, kind=CLIENT, start_time=START)
    span.set_attributes(ATTRIBUTES)
    span.set_status(otel.Status(otel.StatusCode.ERROR))
    span.end(end_time=END)
    mine = ours(tracing, trace)
    assert len(mine) == 1 and mine[0].parent is None
    assert wire(mine) == wire(list(sdk.exported.get_finished_spans()))


def test_a_span_with_a_remote_parent_and_tracestate_encodes_as_the_sdks(tracing: Tracing) -> None:
    incoming = Incoming(PARENT_TRACE, PARENT_SPAN, True, "w3c", "vendor=abc,other=1")
    trace = tracing.begin(incoming, "inbound|8080||", SERVER, START)
    assert trace.trace_id == PARENT_TRACE and trace.span_id != PARENT_SPAN
    sdk = Sdk(tracing)
    sdk.ids.span_ids = [int(trace.span_id, 16)]
    remote = SpanContext(
        int(PARENT_TRACE, 16),
        int(PARENT_SPAN, 16),
        is_remote=True,
        trace_flags=TraceFlags(TraceFlags.SAMPLED),
        trace_state=TraceState.from_header(["vendor=abc,other=1"]),
    )
    parent = otel.set_span_in_context(NonRecordingSpan(remote))
    span = sdk.tracer.start_span("inbound|8080||", context=parent, kind=SERVER, start_time=START)
    span.set_attributes(ATTRIBUTES)
    span.set_status(otel.Status(otel.StatusCode.ERROR))
    span.end(end_time=END)
    expected = wire(list(sdk.exported.get_finished_spans()))
    assert b"vendor=abc" in expected  # the comparison covers the trace state
    assert wire(ours(tracing, trace)) == expected


def test_retry_attempts_encode_as_the_sdks_child_spans(
    tracing: Tracing, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tracing.begin(None, "cart:80/*", CLIENT, START)
    clock = iter([START + 100_000_000])
    monkeypatch.setattr("meshproxy.observe.tracing.time.time_ns", lambda: next(clock))
    ended: list[ReadableSpan] = []
    tracing.processor.on_end = ended.append  # type: ignore[method-assign]
    second = tracing.next_attempt(trace, 2, "10.0.0.7:8080", "503")
    assert trace.attempt is not None and second.span_id == trace.attempt.span_id
    first_id = int(ended[0].context.span_id) if ended[0].context else 0
    tracing.finish(trace, dict(ATTRIBUTES), True, END)
    assert [s.name for s in ended] == ["cart:80/* attempt 1", "cart:80/* attempt 2", "cart:80/*"]

    sdk = Sdk(tracing)
    sdk.ids.trace_id = int(trace.trace_id, 16)
    sdk.ids.span_ids = [int(trace.span_id, 16), first_id, int(second.span_id, 16)]
    request = sdk.tracer.start_span("cart:80/*", kind=CLIENT, start_time=START)
    in_request = otel.set_span_in_context(request)
    one = sdk.tracer.start_span("cart:80/* attempt 1", in_request, CLIENT, start_time=START)
    one.set_attribute("attempt", 1)
    one.set_attributes({"upstream_address": "10.0.0.7:8080", "outcome": "503"})
    one.set_status(otel.Status(otel.StatusCode.ERROR, "retried after 503"))
    one.end(end_time=START + 100_000_000)
    two = sdk.tracer.start_span(
        "cart:80/* attempt 2", in_request, CLIENT, start_time=START + 100_000_000
    )
    two.set_attributes({"attempt": 2, "http.request.resend_count": 1})
    two.set_attribute("http.response.status_code", 503)
    two.set_status(otel.Status(otel.StatusCode.ERROR))
    two.end(end_time=END)
    request.set_attributes(ATTRIBUTES)
    request.set_status(otel.Status(otel.StatusCode.ERROR))
    request.end(end_time=END)
    assert wire(ended) == wire(list(sdk.exported.get_finished_spans()))


def test_the_sdks_attribute_limits_apply(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "3")
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT", "4")
    config = TracingConfig("otel", OtelProvider("127.0.0.1", 9, "/v1/traces"), 100.0)
    tracing = Tracing(config, "frontend.shop", "shop")
    try:
        trace = tracing.begin(None, "cart:80/*", CLIENT, START)
        (span,) = ours(tracing, trace)
        assert dict(span.attributes or {}) == {  # the SDK keeps the last ones set
            "user_agent.original": "curl",
            "istio.namespace": "shop",
            "guid:x-request-id": "7b0c",
        }
        assert span.dropped_attributes == len(ATTRIBUTES) - 3
        sdk = Sdk(tracing)
        sdk.ids.trace_id = int(trace.trace_id, 16)
        sdk.ids.span_ids = [int(trace.span_id, 16)]
        theirs = sdk.tracer.start_span("cart:80/*", kind=CLIENT, start_time=START)
        theirs.set_attributes(ATTRIBUTES)
        theirs.set_status(otel.Status(otel.StatusCode.ERROR))
        theirs.end(end_time=END)
        assert wire([span]) == wire(list(sdk.exported.get_finished_spans()))
    finally:
        tracing.shutdown()


def test_a_callers_malformed_tracestate_is_logged_once_not_per_request(
    tracing: Tracing, caplog: pytest.LogCaptureFixture
) -> None:
    incoming = Incoming(PARENT_TRACE, PARENT_SPAN, True, "w3c", "a=1,bad member=2")
    with caplog.at_level(logging.WARNING):
        for _ in range(50):  # 50 sampled requests from a client that sends it
            trace = tracing.begin(incoming, "inbound|8080||", SERVER, START)
            (span,) = ours(tracing, trace)
            assert span.context is not None and len(span.context.trace_state) == 0  # as the SDK
    warned = [r for r in caplog.records if r.name == "opentelemetry.trace.span"]
    assert len(warned) == 1


def test_an_attribute_count_limit_of_zero_keeps_none(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OTEL_SPAN_ATTRIBUTE_COUNT_LIMIT", "0")
    config = TracingConfig("otel", OtelProvider("127.0.0.1", 9, "/v1/traces"), 100.0)
    tracing = Tracing(config, "frontend.shop", "shop")
    try:
        (span,) = ours(tracing, tracing.begin(None, "cart:80/*", CLIENT, START))
        assert dict(span.attributes or {}) == {} and span.dropped_attributes == len(ATTRIBUTES)
    finally:
        tracing.shutdown()


def test_the_resource_hashes_as_the_sdks_but_only_once(
    tracing: Tracing, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encoder hashes a span's resource to group the batch: the SDK's Resource
    serializes its attributes to JSON for each hash, the proxy's did so once."""
    plain = Resource(dict(tracing.resource.attributes), tracing.resource.schema_url)
    assert tracing.resource == plain and hash(tracing.resource) == hash(plain)

    def no_json(*args: object, **kwargs: object) -> str:
        raise AssertionError("serialized again")

    monkeypatch.setattr(opentelemetry.sdk.resources, "dumps", no_json)
    with pytest.raises(AssertionError):
        hash(plain)
    assert hash(tracing.resource) == hash(tracing.resource)
