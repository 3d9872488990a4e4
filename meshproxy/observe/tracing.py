"""Distributed tracing: OpenTelemetry spans for the sampled requests.

Every request through a tracing sidecar continues (or starts) a trace (observe/
trace_context.py: propagation and the sampling decision, parent-based, else
`randomSamplingPercentage`). Only a sampled request builds an OpenTelemetry SDK span (CLIENT
outbound, SERVER inbound), ended with its attributes when the stream ends (a retried one
also gets a numbered child span per attempt), and exported by the SDK's batch processor in
its own thread over OTLP (HTTP or gRPC). An unsampled request builds no SDK objects.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Final

from opentelemetry import trace as otel
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import NonRecordingSpan, SpanContext, SpanKind, TraceFlags, TraceState

from meshproxy.config.telemetry import OtelProvider, TracingConfig
from meshproxy.observe.trace_context import Incoming, RequestTrace, Sampling

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
for _name in ("opentelemetry.sdk", "opentelemetry.exporter", "opentelemetry.sdk._shared_internal"):
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


class Tracing:
    """A TracingConfig at work: the SDK pipeline to its provider, and per-request spans."""

    def __init__(
        self,
        config: TracingConfig,
        service_name: str,
        namespace: str,
        counts: SpanCounts | None = None,
    ) -> None:
        self.service_name = service_name
        self.with_config(config)
        resource = Resource.create({"service.name": service_name, "service.namespace": namespace})
        self.provider = TracerProvider(resource=resource)
        # The SDK's own settings apply (OTEL_BSP_MAX_QUEUE_SIZE, default 2,048 spans, ...).
        self.processor = CountingBatchSpanProcessor(
            make_exporter(config.provider), counts if counts is not None else SpanCounts()
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meshproxy")

    def same_as(self, config: TracingConfig, service_name: str) -> bool:
        return self.config.provider == config.provider and self.service_name == service_name

    def with_config(self, config: TracingConfig) -> None:
        """Sampling, tags and reporting change in place; a new provider needs a new pipeline."""
        self.config = config
        self.sampling = Sampling(config.sampling_percent, not config.disable_span_reporting)

    def begin(
        self, incoming: Incoming | None, name: str, kind: SpanKind, start_ns: int
    ) -> RequestTrace:
        """A sampled request's SDK span (trace_context.decide() said it is one)."""
        parent = None
        if incoming is not None:
            state = TraceState.from_header([incoming.tracestate]) if incoming.tracestate else None
            remote = SpanContext(
                int(incoming.trace_id, 16),
                int(incoming.span_id, 16),
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=state,
            )
            parent = otel.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=parent, kind=kind, start_time=start_ns)
        sc = span.get_span_context()
        return RequestTrace(b"%032x" % sc.trace_id, b"%016x" % sc.span_id, True, incoming, span)

    def next_attempt(
        self, trace: RequestTrace, number: int, failed_upstream: str, outcome: str
    ) -> RequestTrace:
        """A sampled request is retried: end the failed attempt's child span (the first
        retry makes attempt 1 one, from the request's start) and begin attempt `number`'s.
        Returns the context the retried upstream request carries (its parent: the attempt)."""
        span = trace.span
        assert span is not None
        now = time.time_ns()
        name = getattr(span, "name", "request")
        parent = otel.set_span_in_context(span)
        previous = trace.attempt
        if previous is None:
            start = getattr(span, "start_time", None) or now
            previous = self.tracer.start_span(
                f"{name} attempt 1", context=parent, kind=CLIENT, start_time=start
            )
            previous.set_attribute("attempt", 1)
        previous.set_attributes({"upstream_address": failed_upstream, "outcome": outcome})
        previous.set_status(otel.Status(otel.StatusCode.ERROR, f"retried after {outcome}"))
        previous.end(end_time=now)
        child = self.tracer.start_span(
            f"{name} attempt {number}", context=parent, kind=CLIENT, start_time=now
        )
        child.set_attributes({"attempt": number, "http.request.resend_count": number - 1})
        trace.attempt = child
        span_id = b"%016x" % child.get_span_context().span_id
        return RequestTrace(trace.trace_id, span_id, True, trace.incoming)

    def shutdown(self) -> None:
        """Flush and stop the export thread (blocking: call it off the event loop)."""
        self.provider.shutdown()


SERVER: Final = SpanKind.SERVER
CLIENT: Final = SpanKind.CLIENT
_ERROR: Final = otel.Status(otel.StatusCode.ERROR)
_ATTEMPT_ATTRIBUTES: Final = ("http.response.status_code", "response_flags", "upstream_address")


def finish(
    trace: RequestTrace,
    attributes: dict[str, str | int],
    error: bool,
    end_ns: int,
) -> None:
    """End a sampled request's span with its attributes (the SDK exports it later)."""
    span = trace.span
    if span is None:
        return
    span.set_attributes(attributes)
    if error:
        span.set_status(_ERROR)
    attempt = trace.attempt
    if attempt is not None:  # the last attempt's outcome is the request's
        for key in _ATTEMPT_ATTRIBUTES:
            if key in attributes:
                attempt.set_attribute(key, attributes[key])
        if error:
            attempt.set_status(_ERROR)
        attempt.end(end_time=end_ns)
    span.end(end_time=end_ns)
