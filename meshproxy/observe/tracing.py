"""Distributed tracing: OpenTelemetry spans for the sampled requests.

Every request through a tracing sidecar continues (or starts) a trace (observe/
trace_context.py: propagation and the sampling decision, parent-based, else
`randomSamplingPercentage`). Only a sampled request gets a span (CLIENT outbound, SERVER
inbound; a retried one also a numbered child span per attempt): a PendingSpan while it is in
flight, the OpenTelemetry SDK's ReadableSpan when it ends, exported by the SDK's batch
processor in its own thread over OTLP (HTTP or gRPC). An unsampled request builds no span.

The SDK's Tracer is not used: its spans are built for code that sets attributes one at a
time while other threads may read them (a lock, a validation and a copy per call), and
cost the event loop ~80 µs per sampled request. Ending a span here builds the same
ReadableSpan the SDK's would end as, with the SDK's SpanLimits (OTEL_SPAN_ATTRIBUTE_*
variables) applied, so the batch processor and the OTLP exporters see what they always do.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Final

from opentelemetry.attributes import BoundedAttributes
from opentelemetry.sdk.resources import Attributes, Resource
from opentelemetry.sdk.trace import ReadableSpan, SpanLimits
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.sdk.util.instrumentation import InstrumentationScope
from opentelemetry.trace import SpanContext, SpanKind, Status, StatusCode, TraceFlags, TraceState

from meshproxy.config.telemetry import OtelProvider, TracingConfig
from meshproxy.observe.ids import random_hex
from meshproxy.observe.trace_context import Incoming, PendingSpan, RequestTrace, Sampling

logger = logging.getLogger(__name__)


@dataclass
class SpanCounts:
    """Spans handed to the export queue, and those it dropped (process-wide, for metrics)."""

    queued: int = 0
    dropped: int = 0


class CountingBatchSpanProcessor(BatchSpanProcessor):
    """The SDK's batch processor (bounded queue, export in its own thread), counting the
    spans it drops when the queue is full (a collector down or slow)."""

    def __init__(self, exporter: SpanExporter, counts: SpanCounts) -> None:
        super().__init__(exporter)
        self.counts = counts

    def on_end(self, span: ReadableSpan) -> None:
        batch = getattr(self, "_batch_processor", None)
        queue = getattr(batch, "_queue", None)
        limit = getattr(batch, "_max_queue_size", None)
        if queue is not None and limit is not None and len(queue) >= limit:
            self.counts.dropped += 1  # the SDK drops the oldest queued span to take this one
        else:
            self.counts.queued += 1
        super().on_end(span)


class _OncePerInterval(logging.Filter):
    """The SDK and exporters log every failed export and full queue: once per 10 s each."""

    def __init__(self) -> None:
        super().__init__()
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        key = f"{record.name}:{record.msg}"
        with self._lock:
            if now - self._last.get(key, -1e9) < 10.0:
                return False
            self._last[key] = now
        return True


_FILTER = _OncePerInterval()
for _name in (
    "opentelemetry.sdk",
    "opentelemetry.exporter",
    "opentelemetry.sdk._shared_internal",
    "opentelemetry.attributes",  # a value cut to OTEL_SPAN_ATTRIBUTE_VALUE_LENGTH_LIMIT
    "opentelemetry.trace.span",  # a caller's malformed tracestate, once per sampled request
):
    logging.getLogger(_name).addFilter(_FILTER)


def make_exporter(provider: OtelProvider) -> SpanExporter:
    """OTLP/HTTP (protobuf) when the provider has `http`, else OTLP/gRPC (plaintext)."""
    if provider.http_path is not None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(
            endpoint=provider.endpoint,
            headers=dict(provider.http_headers),
            timeout=provider.http_timeout,
        )
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    return GrpcExporter(endpoint=provider.endpoint, insecure=True)


class HashedResource(Resource):
    """A Resource that hashes once. The OTLP encoder groups every span of a batch by its
    resource, and the SDK's Resource hashes by serializing its attributes to JSON each time:
    that cost the exporter's thread about 10 µs a span, a sixth of its encoding."""

    def __init__(self, attributes: Attributes, schema_url: str | None = None) -> None:
        super().__init__(attributes, schema_url)
        self._hash = super().__hash__()

    def __hash__(self) -> int:
        return self._hash


class Tracing:
    """A TracingConfig at work: the SDK's export pipeline to its provider, and the spans of
    sampled requests."""

    def __init__(
        self,
        config: TracingConfig,
        service_name: str,
        namespace: str,
        counts: SpanCounts | None = None,
    ) -> None:
        self.service_name = service_name
        self.with_config(config)
        created = Resource.create({"service.name": service_name, "service.namespace": namespace})
        self.resource = HashedResource(created.attributes, created.schema_url)
        self.limits = SpanLimits()  # the SDK's defaults and OTEL_SPAN_* overrides
        # The SDK's own settings apply (OTEL_BSP_MAX_QUEUE_SIZE, default 2,048 spans, ...).
        self.processor = CountingBatchSpanProcessor(
            make_exporter(config.provider), counts if counts is not None else SpanCounts()
        )

    def same_as(self, config: TracingConfig, service_name: str) -> bool:
        return self.config.provider == config.provider and self.service_name == service_name

    def with_config(self, config: TracingConfig) -> None:
        """Sampling, tags and reporting change in place; a new provider needs a new pipeline."""
        self.config = config
        self.sampling = Sampling(config.sampling_percent, not config.disable_span_reporting)

    def begin(
        self, incoming: Incoming | None, name: str, kind: SpanKind, start_ns: int
    ) -> RequestTrace:
        """A sampled request's span (trace_context.decide() said it is one)."""
        span_id = random_hex(16)
        client = kind is SpanKind.CLIENT
        if incoming is None:  # a root span
            trace_id, parent_id, state = random_hex(32), b"", ""
        else:
            trace_id, parent_id, state = incoming.trace_id, incoming.span_id, incoming.tracestate
        remote = incoming is not None
        span = PendingSpan(name, client, trace_id, span_id, parent_id, remote, state, start_ns)
        return RequestTrace(trace_id, span_id, True, incoming, span)

    def next_attempt(
        self, trace: RequestTrace, number: int, failed_upstream: str, outcome: str
    ) -> RequestTrace:
        """A sampled request is retried: end the failed attempt's child span (the first
        retry makes attempt 1 one, from the request's start) and begin attempt `number`'s.
        Returns the context the retried upstream request carries (its parent: the attempt)."""
        span = trace.span
        assert span is not None
        now = time.time_ns()
        previous = trace.attempt
        if previous is None:
            previous = _attempt(span, 1, span.start_ns)
        previous.attributes.update({"upstream_address": failed_upstream, "outcome": outcome})
        previous.error = True
        previous.error_message = f"retried after {outcome}"
        self._end(previous, now)
        child = _attempt(span, number, now)
        child.attributes["http.request.resend_count"] = number - 1
        trace.attempt = child
        return RequestTrace(trace.trace_id, child.span_id, True, trace.incoming)

    def finish(
        self, trace: RequestTrace, attributes: dict[str, str | int], error: bool, end_ns: int
    ) -> None:
        """End a sampled request's span with its attributes (the SDK exports it later)."""
        span = trace.span
        if span is None:
            return
        span.attributes = attributes
        span.error = error
        attempt = trace.attempt
        if attempt is not None:  # the last attempt's outcome is the request's
            for key in _ATTEMPT_ATTRIBUTES:
                if key in attributes:
                    attempt.attributes[key] = attributes[key]
            attempt.error = error
            self._end(attempt, end_ns)
        self._end(span, end_ns)

    def _end(self, span: PendingSpan, end_ns: int) -> None:
        """Hand the span to the batch processor as the SDK's ReadableSpan."""
        self.processor.on_end(self.readable(span, end_ns))

    def readable(self, span: PendingSpan, end_ns: int) -> ReadableSpan:
        """The ReadableSpan the SDK's Tracer would have ended `span` as."""
        trace_id = int(span.trace_id, 16)
        state = TraceState.from_header([span.tracestate]) if span.tracestate else None
        context = SpanContext(trace_id, int(span.span_id, 16), False, _SAMPLED, state)
        parent = None
        if span.parent_id:
            parent = SpanContext(trace_id, int(span.parent_id, 16), span.remote_parent, _SAMPLED)
        limits = self.limits
        attributes: dict[str, str | int] | BoundedAttributes = span.attributes
        most = limits.max_span_attributes  # None: no limit
        if limits.max_span_attribute_length is not None or (
            most is not None and len(attributes) > most
        ):  # what the SDK's span would cut
            attributes = BoundedAttributes(
                limits.max_span_attributes,
                attributes,
                immutable=False,
                max_value_len=limits.max_span_attribute_length,
            )
        status = Status(StatusCode.ERROR, span.error_message or None) if span.error else _UNSET
        return ReadableSpan(
            name=span.name,
            context=context,
            parent=parent,
            resource=self.resource,
            attributes=attributes,
            kind=SpanKind.CLIENT if span.client else SpanKind.SERVER,
            status=status,
            start_time=span.start_ns,
            end_time=end_ns,
            instrumentation_scope=SCOPE,
        )

    def shutdown(self) -> None:
        """Flush and stop the export thread (blocking: call it off the event loop)."""
        self.processor.shutdown()  # type: ignore[no-untyped-call]


SERVER: Final = SpanKind.SERVER
CLIENT: Final = SpanKind.CLIENT
SCOPE: Final = InstrumentationScope("meshproxy")  # what get_tracer("meshproxy") would name
_SAMPLED: Final = TraceFlags(TraceFlags.SAMPLED)
_UNSET: Final = Status(StatusCode.UNSET)
_ATTEMPT_ATTRIBUTES: Final = ("http.response.status_code", "response_flags", "upstream_address")


def _attempt(request: PendingSpan, number: int, start_ns: int) -> PendingSpan:
    """Attempt `number`'s child span of a retried request's span."""
    child = PendingSpan(
        f"{request.name} attempt {number}", True, request.trace_id, random_hex(16),
        request.span_id, False, request.tracestate, start_ns,
    )  # fmt: skip
    child.attributes["attempt"] = number
    return child
