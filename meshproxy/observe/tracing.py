"""Distributed tracing: W3C and B3 context propagation, sampling, and OpenTelemetry spans.

Every request through a tracing sidecar continues (or starts) a trace: upstream it carries a
`traceparent` naming this proxy's span as parent, plus B3 headers in the form they came in.
Sampling is parent-based, else `randomSamplingPercentage`. Only a sampled request builds an
OpenTelemetry SDK span (CLIENT outbound, SERVER inbound), ended with its attributes when the
stream ends (a retried one also gets a numbered child span per attempt), and exported by the
SDK's batch processor in its own thread over OTLP (HTTP or gRPC). An unsampled request costs
a header parse and a random number: no SDK objects.
"""

from __future__ import annotations

import logging
import random
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

logger = logging.getLogger(__name__)

TRACE_HEADERS: Final = frozenset(
    {
        b"traceparent",
        b"tracestate",  # bounded, and kept only beside a valid traceparent
        b"b3",
        b"x-b3-traceid",
        b"x-b3-spanid",
        b"x-b3-parentspanid",
        b"x-b3-sampled",
        b"x-b3-flags",
    }
)
_HEX: Final = frozenset(b"0123456789abcdef")
_MAX_TRACE_ID: Final = (1 << 128) - 1


@dataclass(frozen=True, slots=True)
class Incoming:
    """The trace context a request arrived with."""

    trace_id: int
    span_id: int
    sampled: bool | None  # None: the caller left the decision to us
    form: str  # "w3c", "b3" (multi), "b3-single"
    tracestate: str = ""


def _hex_id(value: bytes, lengths: tuple[int, ...]) -> int | None:
    if len(value) not in lengths or not set(value) <= _HEX:
        return None
    n = int(value, 16)
    return n or None  # all zeros is invalid in both formats


def parse_traceparent(value: bytes) -> Incoming | None:
    """W3C traceparent (version 00 layout; later versions read the same prefix)."""
    value = value.strip().lower()
    parts = value.split(b"-")
    if len(parts) < 4 or len(parts[0]) != 2 or parts[0] == b"ff" or not set(parts[0]) <= _HEX:
        return None
    if parts[0] == b"00" and len(parts) != 4:
        return None
    trace_id = _hex_id(parts[1], (32,))
    span_id = _hex_id(parts[2], (16,))
    if trace_id is None or span_id is None or len(parts[3]) != 2 or not set(parts[3]) <= _HEX:
        return None
    return Incoming(trace_id, span_id, bool(int(parts[3], 16) & 1), "w3c")


def parse_b3_single(value: bytes) -> Incoming | None:
    """`b3: {traceid}-{spanid}[-{sampled}[-{parentspanid}]]` (a bare decision is no parent)."""
    parts = value.strip().lower().split(b"-")
    if len(parts) < 2:
        return None
    trace_id = _hex_id(parts[0], (16, 32))
    span_id = _hex_id(parts[1], (16,))
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(parts[2]) if len(parts) > 2 else None
    return Incoming(trace_id, span_id, sampled, "b3-single")


def _b3_sampled(value: bytes) -> bool | None:
    value = value.strip().lower()
    if value in (b"1", b"true", b"d"):
        return True
    if value in (b"0", b"false"):
        return False
    return None


def parse_b3_multi(fields: dict[bytes, bytes]) -> Incoming | None:
    trace_id = _hex_id(fields.get(b"x-b3-traceid", b"").strip().lower(), (16, 32))
    span_id = _hex_id(fields.get(b"x-b3-spanid", b"").strip().lower(), (16,))
    if trace_id is None or span_id is None:
        return None
    sampled = _b3_sampled(fields.get(b"x-b3-sampled", b""))
    if fields.get(b"x-b3-flags", b"").strip() == b"1":
        sampled = True  # debug
    return Incoming(trace_id, span_id, sampled, "b3")


def parse_incoming(fields: dict[bytes, bytes], tracestate: bytes) -> Incoming | None:
    """The context from a request's trace headers: W3C first, then B3 single, then multi."""
    found = None
    if b"traceparent" in fields:
        found = parse_traceparent(fields[b"traceparent"])
    if found is None and b"b3" in fields:
        found = parse_b3_single(fields[b"b3"])
    if found is None and b"x-b3-traceid" in fields:
        found = parse_b3_multi(fields)
    if found is not None and tracestate and found.form == "w3c":
        state = bounded_tracestate(tracestate.decode("latin-1"))
        found = Incoming(found.trace_id, found.span_id, found.sampled, found.form, state)
    return found


MAX_TRACESTATE_MEMBERS: Final = 32
MAX_TRACESTATE_CHARS: Final = 512


def bounded_tracestate(value: str) -> str:
    """At most 32 whole list members in at most 512 characters (W3C Trace Context §3.3.1.1):
    past that, members over 128 characters go first, then members from the end; a member
    is never cut, which would forward a corrupt one."""
    members = [m.strip(" \t") for m in value.split(",")]
    members = [m for m in members if m][:MAX_TRACESTATE_MEMBERS]
    if len(",".join(members)) > MAX_TRACESTATE_CHARS:
        members = [m for m in members if len(m) <= 128]
        while len(",".join(members)) > MAX_TRACESTATE_CHARS:
            members.pop()
    return ",".join(members)


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


@dataclass(slots=True)
class RequestTrace:
    """One request's place in its trace."""

    trace_id: int
    span_id: int  # this proxy's span: the upstream's parent
    sampled: bool
    incoming: Incoming | None
    span: otel.Span | None = None  # the SDK span, for sampled requests only
    attempt: otel.Span | None = None  # a retried request's current attempt (a child span)


class Tracing:
    """A TracingConfig at work: the SDK pipeline to its provider, and per-request spans."""

    def __init__(
        self,
        config: TracingConfig,
        service_name: str,
        namespace: str,
        counts: SpanCounts | None = None,
    ) -> None:
        self.config = config
        self.service_name = service_name
        self._threshold = config.sampling_percent / 100.0
        resource = Resource.create({"service.name": service_name, "service.namespace": namespace})
        self.provider = TracerProvider(resource=resource)
        # The SDK's own settings apply (OTEL_BSP_MAX_QUEUE_SIZE, default 2,048 spans, ...).
        self.processor = CountingBatchSpanProcessor(
            make_exporter(config.provider), counts if counts is not None else SpanCounts()
        )
        self.provider.add_span_processor(self.processor)
        self.tracer = self.provider.get_tracer("meshproxy")
        self._random = random.Random()

    def same_as(self, config: TracingConfig, service_name: str) -> bool:
        return self.config.provider == config.provider and self.service_name == service_name

    def with_config(self, config: TracingConfig) -> None:
        """Sampling, tags and reporting change in place; a new provider needs a new pipeline."""
        self.config = config
        self._threshold = config.sampling_percent / 100.0

    def decide(self, incoming: Incoming | None) -> RequestTrace | None:
        """The trace of an unsampled request (or one whose spans are not reported), else
        None: a sampled one gets its span from begin(), with the name that costs building."""
        sampled = incoming.sampled if incoming is not None else None
        if sampled is None:
            sampled = self._random.random() < self._threshold
        if sampled and not self.config.disable_span_reporting:
            return None
        trace_id = incoming.trace_id if incoming is not None else self._new_trace_id()
        span_id = self._random.getrandbits(64) or 1
        return RequestTrace(trace_id, span_id, sampled, incoming)

    def begin(
        self, incoming: Incoming | None, name: str, kind: SpanKind, start_ns: int
    ) -> RequestTrace:
        """A sampled request's SDK span (decide() said it is one)."""
        parent = None
        if incoming is not None:
            state = TraceState.from_header([incoming.tracestate]) if incoming.tracestate else None
            remote = SpanContext(
                incoming.trace_id,
                incoming.span_id,
                is_remote=True,
                trace_flags=TraceFlags(TraceFlags.SAMPLED),
                trace_state=state,
            )
            parent = otel.set_span_in_context(NonRecordingSpan(remote))
        span = self.tracer.start_span(name, context=parent, kind=kind, start_time=start_ns)
        sc = span.get_span_context()
        return RequestTrace(sc.trace_id, sc.span_id, True, incoming, span)

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
        return RequestTrace(trace.trace_id, child.get_span_context().span_id, True, trace.incoming)

    def _new_trace_id(self) -> int:
        return self._random.getrandbits(128) or 1

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


def upstream_headers(trace: RequestTrace) -> list[tuple[bytes, bytes]]:
    """The trace headers for the upstream: traceparent always, B3 as it came in."""
    flag = b"01" if trace.sampled else b"00"
    out = [(b"traceparent", b"00-%032x-%016x-%b" % (trace.trace_id, trace.span_id, flag))]
    incoming = trace.incoming
    if incoming is None or incoming.form == "w3c":
        if incoming is not None and incoming.tracestate:
            out.append((b"tracestate", incoming.tracestate.encode("latin-1")))
        return out
    wide = trace.trace_id > 0xFFFFFFFFFFFFFFFF
    trace_id = b"%032x" % trace.trace_id if wide else b"%016x" % trace.trace_id
    span_id = b"%016x" % trace.span_id
    parent = b"%016x" % incoming.span_id
    sampled = b"1" if trace.sampled else b"0"
    if incoming.form == "b3-single":
        out.append((b"b3", b"-".join((trace_id, span_id, sampled, parent))))
    else:
        out += [
            (b"x-b3-traceid", trace_id),
            (b"x-b3-spanid", span_id),
            (b"x-b3-parentspanid", parent),
            (b"x-b3-sampled", sampled),
        ]
    return out
