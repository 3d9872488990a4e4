"""VirtualService fault injection: delays (DI) and aborts (FI), by percentage, HTTP and gRPC."""

from __future__ import annotations

import http.client
import time
from pathlib import Path

import grpc

from tests.support.grpc_echo import GrpcEchoServer
from tests.support.metrics import scrape, value
from tests.support.proxy import egress_sidecar, free_port, running_proxy, service_entry
from tests.support.upstream import UpstreamServer


def test_delay_and_abort(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = (
        service_entry("svc.test", port, [app.port])
        + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.test]
  http:
  - match: [{uri: {prefix: /delay}}]
    timeout: 300ms  # starts after the injected delay
    fault: {delay: {fixedDelay: 500ms, percentage: {value: 100}}}
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /abort}}]
    fault: {abort: {httpStatus: 418, percentage: {value: 100}}}
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /unset}}]
    fault: {abort: {httpStatus: 418}}  # no percentage: Istio aborts no request
    route: [{destination: {host: svc.test}}]
  - match: [{uri: {prefix: /half}}]
    fault: {abort: {httpStatus: 503, percentage: {value: 50}}}
    route: [{destination: {host: svc.test}}]
  - route: [{destination: {host: svc.test}}]
---
"""
        + egress_sidecar(port)
    )

    def get(path: str) -> tuple[int, bytes, float]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start = time.monotonic()
        conn.request("GET", path, headers={"Host": "svc.test"})
        resp = conn.getresponse()
        body = resp.read()
        conn.close()
        return resp.status, body, time.monotonic() - start

    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            status, _, elapsed = get("/delay")
            assert status == 200 and 0.45 < elapsed < 2.0
            before = len(app.state.requests)
            status, body, _ = get("/abort")
            assert (status, body) == (418, b"fault filter abort")
            assert len(app.state.requests) == before  # an abort never reaches the upstream
            assert all(get("/unset")[0] == 200 for _ in range(20))
            assert "has no percentage, so (as in Istio) no request gets it" in proxy.log()
            statuses = [get("/half")[0] for _ in range(200)]
            assert 60 < statuses.count(503) < 140  # 50 % ± generous
            samples = scrape(proxy.admin)

            def count(flags: str, code: str) -> float | None:
                return value(
                    samples,
                    "istio_requests_total",
                    reporter="source",
                    response_flags=flags,
                    response_code=code,
                )

            assert count("DI", "200") == 1  # /delay
            assert count("FI", "418") == 1  # /abort
            assert count("FI", "503") == statuses.count(503)  # /half's aborts
    finally:
        app.stop()


def test_grpc_abort_status(tmp_path: Path) -> None:
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
  - fault: {abort: {grpcStatus: RESOURCE_EXHAUSTED, percentage: {value: 100}}}
    route: [{destination: {host: echo.grpc}}]
---
"""
        + egress_sidecar(port, protocol="GRPC")
    )
    try:
        with running_proxy(tmp_path, admin, resources):
            options = [("grpc.default_authority", "echo.grpc"), ("grpc.enable_http_proxy", 0)]
            with grpc.insecure_channel(f"127.0.0.1:{port}", options=options) as ch:
                call = ch.unary_unary("/test.Echo/Unary")
                try:
                    call(b"x", timeout=5)
                    raise AssertionError("the fault did not abort")
                except grpc.RpcError as err:
                    assert err.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    finally:
        server.stop()


def test_direct_response_and_redirect(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = (
        service_entry("svc.test", port, [app.port])
        + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.test]
  http:
  - match: [{uri: {exact: /health}}]
    directResponse: {status: 200, body: {string: "all good"}}
  - match: [{uri: {prefix: /old}}]
    redirect: {uri: /new, authority: new.test, redirectCode: 308}
  - route: [{destination: {host: svc.test}}]
---
"""
        + egress_sidecar(port)
    )
    try:
        with running_proxy(tmp_path, admin, resources):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
            conn.request("GET", "/health", headers={"Host": "svc.test"})
            resp = conn.getresponse()
            assert (resp.status, resp.read()) == (200, b"all good")
            conn.request("GET", "/old/x?q=1", headers={"Host": "svc.test"})
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 308
            assert resp.getheader("location") == "http://new.test/new?q=1"
            assert not app.state.requests  # neither reached the upstream
    finally:
        app.stop()
