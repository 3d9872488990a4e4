"""Tracing through a real proxy: W3C and B3 propagation, sampling, and spans received by real
OTLP collectors (HTTP and gRPC) that decode the official protobuf messages."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import pytest

from tests.integration.conftest import Mesh, MeshFactory
from tests.support.metrics import scrape, value
from tests.support.otlp import GrpcCollector, HttpCollector, attributes
from tests.support.proxy import free_port, wait_for

PARENT_TRACE = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_SPAN = "00f067aa0ba902b7"
SPAN_KIND_CLIENT = 3  # opentelemetry.proto.trace.v1.Span.SpanKind


def tracing_spec(provider: str, percent: float | None = None) -> str:
    sampling = f"\n  - randomSamplingPercentage: {percent}" if percent is not None else "\n  - {}"
    return f"""  labels: {{app: frontend, version: v1}}
  workloadName: frontend-v1
  extensionProviders:
  - name: otel
    opentelemetry: {provider}
  - name: logs
    envoyFileAccessLog: {{path: /dev/null}}
  defaultProviders: {{tracing: [otel]}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: mesh-default, namespace: istio-system}}
spec:
  tracing:{sampling}
    customTags:
      team: {{literal: {{value: storefront}}}}
      user: {{header: {{name: x-user, defaultValue: nobody}}}}
"""


@pytest.fixture(autouse=True)
def prompt_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's batch processor exports every 5 s; the proxies these tests start, every
    100 ms (OTEL_BSP_SCHEDULE_DELAY, the SDK's own setting), so spans arrive promptly."""
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "100")


@pytest.fixture
def http_collector() -> Iterator[HttpCollector]:
    c = HttpCollector()
    yield c
    c.stop()


def call(mesh: Mesh, headers: dict[str, str] | None = None, path: str = "/x") -> dict[str, str]:
    """One request through the egress listener; the headers the upstream received."""
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    conn.request("GET", path, headers={"Host": "hello.test", **(headers or {})})
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == 200, body
    assert "traceparent" not in {k.lower() for k, _ in resp.getheaders()}
    return json.loads(body)["headers"]  # type: ignore[no-any-return]


def traceparent(trace_id: str, span_id: str, flags: str) -> str:
    return f"00-{trace_id}-{span_id}-{flags}"


def test_a_sampled_parent_gives_a_client_span_over_otlp_http(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = (
        f"{{service: 127.0.0.1, port: {http_collector.port}, "
        "http: {path: /otlp/v1/traces, timeout: 5s, headers: [{name: x-token, value: s3cret}]}}"
    )
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=0))
    seen = call(
        mesh,
        {
            "traceparent": traceparent(PARENT_TRACE, PARENT_SPAN, "01"),
            "x-request-id": "req-1",
            "x-user": "alice",
            "user-agent": "probe/1",
        },
        "/cart?item=1",
    )
    version, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (version, trace_id, flags) == ("00", PARENT_TRACE, "01")
    assert span_id != PARENT_SPAN  # the proxy's own span is the upstream's parent
    assert seen["x-request-id"] == "req-1"

    ((resource, span),) = http_collector.collected.wait(1)
    assert span.trace_id.hex() == PARENT_TRACE
    assert span.span_id.hex() == span_id
    assert span.parent_span_id.hex() == PARENT_SPAN
    assert span.kind == SPAN_KIND_CLIENT
    assert span.name == f"hello.test:{mesh.http_port}/*"
    assert span.end_time_unix_nano >= span.start_time_unix_nano > 0
    assert resource["service.name"] == "frontend.default"
    attrs = attributes(span)
    assert attrs["http.request.method"] == "GET"
    assert attrs["url.path"] == "/cart"
    assert attrs["http.response.status_code"] == 200
    assert attrs["server.address"] == "hello.test"
    assert attrs["network.peer.address"] == "127.0.0.1"
    assert attrs["user_agent.original"] == "probe/1"
    assert attrs["guid:x-request-id"] == "req-1"
    assert attrs["istio.canonical_service"] == "frontend"
    assert attrs["istio.namespace"] == "default"
    assert attrs["upstream_cluster"].startswith(f"outbound|{mesh.http_port}|")
    assert attrs["response_flags"] == "-"
    assert (attrs["team"], attrs["user"]) == ("storefront", "alice")
    assert span.status.code == 0  # unset: a 200
    ((path, headers),) = http_collector.collected.requests
    assert path == "/otlp/v1/traces"
    assert headers["x-token"] == "s3cret"
    assert headers["content-type"] == "application/x-protobuf"


def test_an_unsampled_parent_propagates_and_exports_nothing(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=100))
    seen = call(mesh, {"traceparent": traceparent(PARENT_TRACE, PARENT_SPAN, "00")})
    _, trace_id, span_id, flags = seen["traceparent"].split("-")
    assert (trace_id, flags) == (PARENT_TRACE, "00") and span_id != PARENT_SPAN
    # A request without a parent at 100 %: sampled, and the only span that arrives.
    seen = call(mesh)
    _, fresh_trace, fresh_span, fresh_flags = seen["traceparent"].split("-")
    assert fresh_flags == "01" and fresh_trace != PARENT_TRACE
    ((_, span),) = http_collector.collected.wait(1)
    assert (span.trace_id.hex(), span.span_id.hex()) == (fresh_trace, fresh_span)
    assert span.parent_span_id == b""  # a root span
    time.sleep(1.0)  # the batch processor exports within 5 s; nothing else may come
    assert len(http_collector.collected.spans) == 1
    samples = scrape(mesh.proxy.admin)
    assert value(samples, "meshproxy_tracing_spans_total", result="queued") == 1


def test_b3_comes_back_in_its_own_form_beside_traceparent(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=0))
    multi = call(
        mesh,
        {
            "x-b3-traceid": "80f198ee56343ba864fe8b2a57d3eff7",
            "x-b3-spanid": "e457b5a2e4d86bd1",
            "x-b3-sampled": "1",
        },
    )
    assert multi["x-b3-traceid"] == "80f198ee56343ba864fe8b2a57d3eff7"
    assert multi["x-b3-parentspanid"] == "e457b5a2e4d86bd1"
    assert multi["x-b3-sampled"] == "1"
    assert multi["x-b3-spanid"] != "e457b5a2e4d86bd1"
    assert multi["traceparent"] == traceparent(
        "80f198ee56343ba864fe8b2a57d3eff7", multi["x-b3-spanid"], "01"
    )
    single = call(mesh, {"b3": "a3ce929d0e0e4736-00f067aa0ba902b7-1"})
    trace_id, span_id, sampled, parent = single["b3"].split("-")
    assert (trace_id, sampled, parent) == ("a3ce929d0e0e4736", "1", "00f067aa0ba902b7")
    assert single["traceparent"] == traceparent(f"{0:016x}a3ce929d0e0e4736", span_id, "01")
    spans = http_collector.collected.wait(2)
    parents = sorted(s.parent_span_id.hex() for _, s in spans)
    assert parents == ["00f067aa0ba902b7", "e457b5a2e4d86bd1"]


def test_otlp_grpc_export_and_a_server_span_inbound(make_mesh: MeshFactory) -> None:
    collector = GrpcCollector()
    try:
        provider = f"{{service: 127.0.0.1, port: {collector.port}}}"
        mesh = make_mesh(extra_spec=tracing_spec(provider, percent=100))
        call(mesh, {"traceparent": traceparent(PARENT_TRACE, PARENT_SPAN, "01")})
        ((resource, span),) = collector.collected.wait(1)
        assert span.trace_id.hex() == PARENT_TRACE and span.kind == SPAN_KIND_CLIENT
        assert resource["service.name"] == "frontend.default"
    finally:
        collector.stop()


def test_a_collector_that_is_down_costs_the_requests_nothing(
    make_mesh: MeshFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_BSP_MAX_QUEUE_SIZE", "4")  # the SDK's own settings
    monkeypatch.setenv("OTEL_BSP_MAX_EXPORT_BATCH_SIZE", "2")
    dead = free_port()
    provider = f"{{service: 127.0.0.1, port: {dead}, http: {{timeout: 1s}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=100))
    started = time.monotonic()
    for _ in range(40):
        call(mesh)
    assert time.monotonic() - started < 20  # no request waited on the export

    def dropped() -> float:
        return (
            value(scrape(mesh.proxy.admin), "meshproxy_tracing_spans_total", result="dropped") or 0
        )

    assert wait_for(lambda: dropped() > 0)
    queued = value(scrape(mesh.proxy.admin), "meshproxy_tracing_spans_total", result="queued")
    assert queued is not None and queued + dropped() == 40


def test_each_retry_attempt_is_a_numbered_child_span_and_the_upstreams_parent(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=0))
    # The first answer is a 503, which the app's retry policy retries: a 200 arrives.
    call(
        mesh,
        {"traceparent": traceparent(PARENT_TRACE, PARENT_SPAN, "01"), "x-envoy-retry-on": "5xx"},
        "/fail?code=503&times=1&key=traced",
    )
    spans = [span for _, span in http_collector.collected.wait(3)]
    (request,) = [s for s in spans if s.parent_span_id.hex() == PARENT_SPAN]
    attempts = sorted(
        (s for s in spans if s.parent_span_id == request.span_id),
        key=lambda s: attributes(s)["attempt"],
    )
    assert [attributes(s)["attempt"] for s in attempts] == [1, 2]
    first, second = attempts
    assert first.name == f"{request.name} attempt 1" and first.status.code == 2  # ERROR
    assert attributes(first)["outcome"] == "503"
    assert attributes(first)["upstream_address"] == f"127.0.0.1:{mesh.v1.port}"
    assert first.start_time_unix_nano == request.start_time_unix_nano
    assert first.end_time_unix_nano <= second.start_time_unix_nano
    assert attributes(second)["http.request.resend_count"] == 1
    assert attributes(second)["http.response.status_code"] == 200
    assert second.status.code == 0 and second.end_time_unix_nano == request.end_time_unix_nano
    # What the upstream saw: attempt 1 named the request's span as parent (it was not known
    # to be a retry yet), attempt 2 its own span.
    received = [r for r in mesh.v1.state.requests if r.path.startswith("/fail")]
    parents = [r.headers["traceparent"].split("-")[2] for r in received]
    assert parents == [request.span_id.hex(), second.span_id.hex()]
    assert [r.headers["x-envoy-attempt-count"] for r in received] == ["1", "2"]
    assert len(http_collector.collected.spans) == 3


def test_a_request_that_is_not_retried_has_no_attempt_spans(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=100))
    call(mesh)
    call(mesh, {"x-envoy-retry-on": "5xx"}, "/fail?code=503&times=1&key=second")  # retried
    spans = [span for _, span in http_collector.collected.wait(4)]
    roots = [s for s in spans if s.parent_span_id == b""]
    assert len(roots) == 2
    children = {s.parent_span_id for s in spans if s.parent_span_id != b""}
    assert len(children) == 1  # both attempts belong to the retried request only
    time.sleep(0.5)
    assert len(http_collector.collected.spans) == 4
