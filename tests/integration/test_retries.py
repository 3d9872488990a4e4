"""VirtualService retries and Istio's default retry policy, against real misbehaving upstreams."""

from __future__ import annotations

import http.client
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.proxy import ProxyProcess, free_port, running_proxy
from tests.support.upstream import UpstreamServer


@dataclass
class RetryMesh:
    proxy: ProxyProcess
    port: int  # flaky.test: one live endpoint
    pair_port: int  # pair.test: a dead endpoint and a live one
    app: UpstreamServer

    def request(
        self,
        path: str,
        method: str = "GET",
        body: bytes | None = None,
        port: int | None = None,
        host: str = "flaky.test",
        headers: dict[str, str] | None = None,
    ) -> tuple[int, bytes, float]:
        conn = http.client.HTTPConnection("127.0.0.1", port or self.port, timeout=10)
        start = time.monotonic()
        conn.request(method, path, body=body, headers={"Host": host, **(headers or {})})
        resp = conn.getresponse()
        data = resp.read()
        conn.close()
        return resp.status, data, time.monotonic() - start

    def attempts(self, path: str) -> list[str]:
        return [
            r.headers.get("x-envoy-attempt-count", "-")
            for r in self.app.state.requests
            if r.path.startswith(path)
        ]


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[RetryMesh]:
    app = UpstreamServer("app").start()
    admin, port, pair_port, dead = free_port(), free_port(), free_port(), free_port()
    resources = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: flaky}}
spec:
  hosts: [flaky.test]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: pair}}
spec:
  hosts: [pair.test]
  ports: [{{number: {pair_port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {dead}}}}}
  - {{address: 127.0.0.1, ports: {{http: {app.port}}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: flaky}}
spec:
  hosts: [flaky.test]
  http:
  - match: [{{uri: {{prefix: /r5xx}}}}]
    retries: {{attempts: 3, retryOn: 5xx}}
    rewrite: {{uri: /fail}}
    route: [{{destination: {{host: flaky.test}}}}]
  - match: [{{uri: {{prefix: /rcode}}}}]
    retries: {{attempts: 2, retryOn: "409,retriable-4xx"}}
    rewrite: {{uri: /fail}}
    route: [{{destination: {{host: flaky.test}}}}]
  - match: [{{uri: {{prefix: /pertry}}}}]
    timeout: 3s
    retries: {{attempts: 2, perTryTimeout: 200ms, retryOn: "5xx"}}
    rewrite: {{uri: /slow}}
    route: [{{destination: {{host: flaky.test}}}}]
  - match: [{{uri: {{prefix: /bounded}}}}]
    timeout: 400ms
    retries: {{attempts: 50, perTryTimeout: 100ms, retryOn: "5xx"}}
    rewrite: {{uri: /slow}}
    route: [{{destination: {{host: flaky.test}}}}]
  - match: [{{uri: {{prefix: /rreset}}}}]
    retries: {{attempts: 2, retryOn: reset}}
    rewrite: {{uri: /fail}}
    route: [{{destination: {{host: flaky.test}}}}]
  - match: [{{uri: {{prefix: /none}}}}]
    retries: {{attempts: 0}}
    rewrite: {{uri: /fail}}
    route: [{{destination: {{host: flaky.test}}}}]
  - route: [{{destination: {{host: flaky.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {port}, protocol: HTTP, name: a}}, bind: 127.0.0.1, hosts: [./*]}}
  - {{port: {{number: {pair_port}, protocol: HTTP, name: b}}, bind: 127.0.0.1, hosts: [./*]}}
"""
    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            yield RetryMesh(proxy, port, pair_port, app)
    finally:
        app.stop()


def test_retries_run_out_and_the_last_answer_is_returned(mesh: RetryMesh) -> None:
    status, body, _ = mesh.request("/r5xx?code=500&times=9&key=b")
    assert status == 500 and b"failed" in body
    # attempts: 3 means four tries; the last try's 500 goes to the client as it came.
    assert mesh.attempts("/fail?code=500&times=9&key=b") == ["1", "2", "3", "4"]


def test_status_codes_and_retriable_4xx(mesh: RetryMesh) -> None:
    assert mesh.request("/rcode?code=409&times=1&key=c")[0] == 200
    assert mesh.request("/rcode?code=404&times=1&key=d")[0] == 404  # not listed: no retry


def test_istio_default_policy_does_not_replay_a_503(mesh: RetryMesh) -> None:
    # No `retries` on the route: Istio's default retries connect failures, refused streams
    # and gRPC unavailable/cancelled, but not a 503 the app itself answered (istio#50506).
    status, _, _ = mesh.request("/fail?code=503&times=1&key=e", method="POST", body=b"x")
    assert status == 503
    assert mesh.app.state.failures["e"] == 1


def test_attempts_zero_disables_retries(mesh: RetryMesh) -> None:
    assert mesh.request("/none?code=503&times=1&key=f")[0] == 503
    assert mesh.app.state.failures["f"] == 1


def test_route_timeout_bounds_all_retries(mesh: RetryMesh) -> None:
    status, _, elapsed = mesh.request("/bounded?ms=1000")
    assert status == 504 and elapsed < 1.0


def test_the_apps_envoy_retry_headers_are_honoured_and_removed(mesh: RetryMesh) -> None:
    """Outbound, as Envoy honours them from an internal client: retriable-headers with
    x-envoy-retriable-header-names, x-envoy-max-retries, x-envoy-upstream-rq-timeout-ms."""
    headers = {
        "x-envoy-retry-on": "retriable-headers",
        "x-envoy-retriable-header-names": "x-retry-me",
    }
    status, body, _ = mesh.request(
        "/fail?code=200&times=1&key=h&header=x-retry-me", headers=headers
    )
    assert status == 200 and b"failed" not in body  # the marked 200 was retried
    assert mesh.attempts("/fail?code=200&times=1&key=h") == ["1", "2"]
    seen = mesh.app.state.requests[-1].headers
    assert not {k for k in seen if k.startswith("x-envoy-retr")}  # never forwarded
    # The default route retries no 503 (Istio's policy); the header adds 5xx with one retry.
    headers = {"x-envoy-retry-on": "5xx", "x-envoy-max-retries": "1"}
    status, _, _ = mesh.request("/fail?code=503&times=5&key=i", headers=headers)
    assert status == 503 and mesh.app.state.failures["i"] == 2
    status, _, elapsed = mesh.request(
        "/slow?ms=1500", headers={"x-envoy-upstream-rq-timeout-ms": "200"}
    )
    assert status == 504 and elapsed < 1.2


def test_grpc_unavailable_is_retried_by_istios_default_policy(tmp_path: Path) -> None:
    import grpc

    from tests.support.grpc_echo import GrpcEchoServer
    from tests.support.proxy import egress_sidecar, service_entry

    server = GrpcEchoServer().start()
    admin, port = free_port(), free_port()
    resources = (
        service_entry("echo.grpc", port, [server.port], "GRPC")
        + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: echo}
spec:
  hosts: [echo.grpc]
  http:
  - match: [{headers: {x-policy: {exact: none}}}]
    retries: {attempts: 0}
    route: [{destination: {host: echo.grpc}}]
  - route: [{destination: {host: echo.grpc}}]
---
"""
        + egress_sidecar(port, protocol="GRPC")
    )
    try:
        with running_proxy(tmp_path, admin, resources):
            options = [("grpc.default_authority", "echo.grpc"), ("grpc.enable_http_proxy", 0)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
                flaky = ch.unary_unary("/test.Echo/Flaky")
                assert flaky(b"2", timeout=10) == b"ok:2"  # two UNAVAILABLE, then served
                assert server.service.flaky_calls == 3
                server.service.flaky_calls = 0
                with pytest.raises(grpc.RpcError) as info:
                    flaky(b"1", timeout=10, metadata=(("x-policy", "none"),))
                assert info.value.code() is grpc.StatusCode.UNAVAILABLE
                assert server.service.flaky_calls == 1  # attempts: 0 — not retried
    finally:
        server.stop()
