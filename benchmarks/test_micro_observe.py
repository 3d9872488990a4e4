"""Hot-path micro benchmarks of what each request adds besides forwarding: header rewriting,
the standard metrics, an access-log line (Istio's text format and a JSON one), and a sampled
span from start to end. Run with the others (`python -m pytest benchmarks --benchmark-enable`);
benchmarks/compare.py compares a run with the saved baseline."""

from __future__ import annotations

import time
from collections.abc import Sequence

from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

import meshproxy.observe.tracing as tracing_module
from meshproxy.codec.headers import strip_hop_by_hop
from meshproxy.config.logformat import ISTIO_TEXT_FORMAT, compile_labels, compile_text
from meshproxy.config.telemetry import OtelProvider, TracingConfig
from meshproxy.observe.logrender import render
from meshproxy.observe.metrics import MeshMetrics
from meshproxy.observe.recorder import StreamRecord
from meshproxy.observe.trace_context import Sampling, decide, parse_incoming, upstream_headers
from meshproxy.observe.tracing import SERVER, Tracing
from meshproxy.routing.table import HeaderOps

HEADERS = [
    (b"host", b"reviews.default.svc.cluster.local"),
    (b"user-agent", b"bench/1.0"),
    (b"accept", b"*/*"),
    (b"connection", b"keep-alive"),
    (b"x-request-id", b"0f8e7d6c-1234-5678-9abc-def012345678"),
    (b"traceparent", b"00-80f198ee56343ba864fe8b2a57d3eff7-e457b5a2e4d86bd1-01"),
    (b"x-debug", b"1"),
]


def test_header_rewrite(benchmark) -> None:  # type: ignore[no-untyped-def]
    """Hop-by-hop headers out, then a VirtualService's set / add / remove."""
    ops = HeaderOps(
        set=((b"x-env", b"prod"),), add=((b"x-via", b"mesh"),), remove=frozenset({b"x-debug"})
    )

    def rewrite() -> list[tuple[bytes, bytes]]:
        return ops.apply(strip_hop_by_hop(HEADERS)[0])

    out = benchmark(rewrite)
    names = [name for name, _ in out]
    assert b"connection" not in names and b"x-debug" not in names and b"x-via" in names


def test_metrics_record(benchmark) -> None:  # type: ignore[no-untyped-def]
    """istio_requests_total and the three histograms for one request, series already known."""
    metrics = MeshMetrics()

    def record() -> None:
        metrics.record_http(
            "destination", "reviews.default.svc.cluster.local", 200, "-", 1.7, 0, 512
        )

    benchmark(record)
    assert b'response_code="200"' in metrics.render()


def _record() -> StreamRecord:
    rec = StreamRecord("destination", "reviews.default.svc.cluster.local", 200, "-", 1.7, 0, 512)
    rec.method, rec.path, rec.authority = "GET", "/api/v1/items?id=42", "reviews"
    rec.route_name, rec.cluster = "default", "inbound|9080||"
    rec.upstream_host, rec.start_time = "127.0.0.1:9080", time.time()
    rec.request_headers = HEADERS
    rec.response_headers = [(b"content-type", b"application/json")]
    rec.response_code_details = "via_upstream"
    rec.downstream_remote_address = "10.1.0.7:43122"
    rec.downstream_local_address = "10.1.0.9:9080"
    return rec


def test_access_log_istio_text(benchmark) -> None:  # type: ignore[no-untyped-def]
    fmt = compile_text(ISTIO_TEXT_FORMAT)
    rec = _record()
    line = benchmark(render, fmt, rec)
    assert '"GET /api/v1/items?id=42 HTTP/1.1" 200' in line


def test_access_log_json(benchmark) -> None:  # type: ignore[no-untyped-def]
    fmt = compile_labels(
        (
            ("start_time", "%START_TIME%"),
            ("method", "%REQ(:METHOD)%"),
            ("path", "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"),
            ("code", "%RESPONSE_CODE%"),
            ("flags", "%RESPONSE_FLAGS%"),
            ("duration", "%DURATION%"),
            ("upstream", "%UPSTREAM_HOST%"),
            ("request_id", "%REQ(X-REQUEST-ID)%"),
        )
    )
    rec = _record()
    line = benchmark(render, fmt, rec)
    assert '"code":200' in line


class _Discard(SpanExporter):
    """Takes every batch at once (the export itself runs in the SDK's thread, not per request)."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


def test_span_start_and_end(benchmark, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    """A sampled request's span: the incoming traceparent read, the span begun as its child,
    its attributes set and ended into the batch queue."""
    monkeypatch.setattr(tracing_module, "make_exporter", lambda provider: _Discard())
    tracing = Tracing(
        TracingConfig("otel", OtelProvider("127.0.0.1", 4317), sampling_percent=100.0),
        "reviews.default",
        "default",
    )
    fields = {b"traceparent": HEADERS[5][1]}
    attributes: dict[str, str | int] = {
        "http.response.status_code": 200,
        "upstream_cluster": "inbound|9080||",
        "response_flags": "-",
    }

    def span() -> None:
        incoming = parse_incoming(fields)
        assert decide(incoming, tracing.sampling) is None  # sampled: a real span
        trace = tracing.begin(incoming, "reviews:9080/*", SERVER, time.time_ns())
        tracing.finish(trace, attributes, False, time.time_ns())

    try:
        benchmark(span)
    finally:
        tracing.shutdown()
    assert tracing.processor.counts.queued > 0


def test_unsampled_trace_context(benchmark) -> None:  # type: ignore[no-untyped-def]
    """What every unsampled request of a tracing sidecar pays: the decision, a new trace and
    span id, and the traceparent sent upstream (no SDK objects)."""
    sampling = Sampling(0.0, True)

    def unsampled() -> list[tuple[bytes, bytes]]:
        trace = decide(None, sampling)
        assert trace is not None
        return upstream_headers(trace)

    headers = benchmark(unsampled)
    assert headers[0][1].endswith(b"-00") and len(headers[0][1]) == 55
