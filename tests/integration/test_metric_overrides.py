"""Telemetry `metrics` through a real proxy: metrics disabled per metric and direction, labels
removed (series merged) and added from CEL, levels overriding each other, Telemetry's TCP
reportingInterval, and every mistake refused with its place. Series are read with
prometheus-client's parser, one at a time, with their exact values."""

from __future__ import annotations

import http.client
import socket
from pathlib import Path

from tests.integration.conftest import Mesh, MeshFactory
from tests.integration.test_access_logs import validate
from tests.support.metrics import scrape, value
from tests.support.proxy import wait_for

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def telemetry(spec: str, name: str = "mesh-default", namespace: str = "istio-system") -> str:
    return f"""---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
{spec}"""


def get(mesh: Mesh, *paths: str, headers: dict[str, str] | None = None) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    for path in paths:
        conn.request("GET", path, headers={"Host": "hello.test", **(headers or {})})
        conn.getresponse().read()
    conn.close()


def tcp_exchange(mesh: Mesh, payload: bytes) -> None:
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=5) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        while s.recv(4096):
            pass


def samples_named(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels), _ in samples.items() if n == name]


def settled(mesh: Mesh, name: str, expected: float, **labels: str) -> Samples:
    """The scrape once `name{labels}` reached `expected` (reports land after the response)."""
    seen: list[Samples] = []

    def reached() -> bool:
        seen[:] = [scrape(mesh.proxy.admin)]
        return value(seen[0], name, **labels) == expected

    assert wait_for(reached), value(seen[0], name, **labels) if seen else None
    return seen[0]


def test_labels_removed_merge_series_and_upserts_come_from_cel(make_mesh: MeshFactory) -> None:
    overrides = """  metrics:
  - providers: [{name: prometheus}]
    overrides:
    - match: {metric: REQUEST_COUNT, mode: CLIENT}
      tagOverrides:
        response_code: {operation: REMOVE}
        response_flags: {operation: REMOVE}
        request_host: {value: request.host}
        debug: {operation: UPSERT, value: "request.headers['x-debug']"}
        destination_service: {value: "'rewritten'"}
"""
    mesh = make_mesh(extra_spec=telemetry(overrides))
    get(mesh, "/ok", "/ok2", "/dead/x")  # two 200s and a 503 (flags UF,URX)
    get(mesh, "/ok", headers={"x-debug": "on"})
    samples = settled(mesh, "istio_requests_total", 3, request_host="hello.test", debug="unknown")
    (merged,) = [
        s for s in samples_named(samples, "istio_requests_total") if s["debug"] == "unknown"
    ]
    assert "response_code" not in merged and "response_flags" not in merged
    # An UPSERT of a standard label replaces its value, in its place.
    assert merged["destination_service"] == "rewritten" and merged["reporter"] == "source"
    assert value(samples, "istio_requests_total", debug="on", request_host="hello.test") == 1
    # The other metrics keep Istio's standard labels, bucket by bucket.
    name = "istio_request_duration_milliseconds_count"
    assert value(samples, name, response_code="200", destination_service="hello.test") == 3
    assert value(samples, name, response_code="503", response_flags="UF,URX") == 1
    bucket = "istio_request_duration_milliseconds_bucket"
    assert value(samples, bucket, response_code="503", le="+Inf") == 1
    assert "request_host" not in samples_named(samples, name)[0]


def test_disabled_metrics_per_kind_and_tcp_labels(make_mesh: MeshFactory) -> None:
    overrides = """  metrics:
  - overrides:
    - match: {metric: REQUEST_DURATION}
      disabled: true
    - match: {metric: TCP_SENT_BYTES, mode: CLIENT_AND_SERVER}
      disabled: true
    - match: {metric: TCP_OPENED_CONNECTIONS}
      tagOverrides:
        upstream_address: {value: upstream.address}
        mtls: {value: connection.mtls}
"""
    mesh = make_mesh(extra_spec=telemetry(overrides))
    get(mesh, "/ok")
    tcp_exchange(mesh, b"12345")
    samples = settled(mesh, "istio_tcp_connections_closed_total", 1)
    assert value(samples, "istio_requests_total", response_code="200") == 1
    assert value(samples, "istio_request_bytes_count", response_code="200") == 1
    assert samples_named(samples, "istio_request_duration_milliseconds_count") == []
    assert samples_named(samples, "istio_tcp_sent_bytes_total") == []
    assert value(samples, "istio_tcp_received_bytes_total") == 5
    echo = mesh.params["echo"]  # type: ignore[attr-defined]
    opened = value(
        samples,
        "istio_tcp_connections_opened_total",
        upstream_address=f"127.0.0.1:{echo}",
        mtls="false",
        destination_service="echo.test",
    )
    assert opened == 1
    assert "upstream_address" not in samples_named(samples, "istio_tcp_connections_closed_total")[0]


def test_a_narrower_level_overrides_the_mesh_wide_one(make_mesh: MeshFactory) -> None:
    """Mesh-wide: every metric off (telemetry "off"); the workload's namespace turns the
    request count back on, and only it."""
    mesh_wide = telemetry("  metrics:\n  - overrides: [{disabled: true}]\n")
    local = telemetry(
        "  metrics:\n  - overrides:\n    - {match: {metric: REQUEST_COUNT}, disabled: false}\n",
        name="requests-only",
        namespace="default",
    )
    mesh = make_mesh(extra_spec=mesh_wide + local)
    get(mesh, "/ok", "/ok")
    tcp_exchange(mesh, b"x")
    samples = settled(mesh, "istio_requests_total", 2, response_code="200")
    istio = {n for (n, _labels) in samples if n.startswith("istio_")}
    assert istio == {"istio_requests_total"}


def test_without_a_prometheus_provider_no_istio_series(
    make_mesh: MeshFactory, tmp_path: Path
) -> None:
    log = tmp_path / "access.log"
    mesh = make_mesh(extra_spec=f"  defaultProviders: {{metrics: []}}\n  accessLogFile: {log}")
    get(mesh, "/ok")
    tcp_exchange(mesh, b"x")
    # Each is logged right after it would have been counted: both reports are done.
    assert wait_for(lambda: log.exists() and len(log.read_text().splitlines()) == 2)
    samples = scrape(mesh.proxy.admin)
    assert {n for (n, _labels) in samples if n.startswith("istio_")} == set()


def test_reporting_interval_reports_tcp_bytes_while_the_connection_lives(
    make_mesh: MeshFactory,
) -> None:
    mesh = make_mesh(extra_spec=telemetry("  metrics:\n  - reportingInterval: 0.5s\n"))
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=5) as s:
        s.sendall(b"123")
        assert s.recv(16) == b"123"
        # Still open: only the interval can have reported these bytes.
        settled(mesh, "istio_tcp_received_bytes_total", 3, destination_service="echo.test")
        assert value(scrape(mesh.proxy.admin), "istio_tcp_connections_closed_total") == 0


def test_mistakes_are_config_errors_with_their_place(tmp_path: Path) -> None:
    config = tmp_path / "mesh.yaml"
    config.write_text(
        """apiVersion: meshproxy.io/v1alpha1
kind: ProxyConfig
metadata: {name: p}
spec:
  extensionProviders:
  - {name: otel, opentelemetry: {service: collector, port: 4317}}
---
apiVersion: telemetry.istio.io/v1
kind: Telemetry
metadata: {name: t, namespace: istio-system}
spec:
  metrics:
  - providers: [{name: otel}]
    reportingInterval: 0s
    overrides:
    - match: {metric: REQUEST_CONT, mode: CLIENT}
    - match: {customMetric: nosuch_total}
    - tagOverrides:
        host: {operation: UPSERT}
        code: {operation: REMOVE, value: response.code}
        bad-name: {value: request.host}
        path: {value: "request.path +"}
        other: {operation: DELETE}
"""
    )
    out = validate(config)
    assert out.returncode == 1
    where = f"{config}:{{}} document 2: Telemetry t: spec.metrics[0]"
    expected = [
        (14, ".reportingInterval: must be more than 0s"),
        (16, ".overrides[0].match.metric: must be one of ALL_METRICS, REQUEST_COUNT"),
        (17, ".overrides[1].match.customMetric: no metric 'nosuch_total' here"),
        (19, ".overrides[2].tagOverrides.host: an UPSERT needs a value"),
        (20, ".overrides[2].tagOverrides.code.value: a REMOVE takes no value"),
        (21, ".overrides[2].tagOverrides.bad-name: 'bad-name' is not a Prometheus label name"),
        (22, ".overrides[2].tagOverrides.path.value: invalid CEL: at column"),
        (23, ".overrides[2].tagOverrides.other.operation: must be one of UPSERT, REMOVE"),
    ]
    for line, message in expected:
        assert where.format(line) + message in out.stdout, (line, message, out.stdout)
    assert '(did you mean "REQUEST_COUNT"?)' in out.stdout
    assert "8 problem(s) found" in out.stdout  # one each, nothing more
    # With those fixed, the provider: metrics need a Prometheus one.
    text = config.read_text()
    config.write_text(text[: text.index("    reportingInterval")])
    out = validate(config)
    assert out.returncode == 1
    assert (
        where.format(13) + ".providers[0].name: provider 'otel' is opentelemetry, not prometheus"
    ) in out.stdout
