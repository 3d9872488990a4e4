"""Circuit breaking: beyond maxConnections + http1MaxPendingRequests, or http2MaxRequests,
requests fail fast with 503 UO and x-envoy-overloaded, while admitted ones succeed."""

from __future__ import annotations

import json
import time
from pathlib import Path

from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    http_get,
    running_proxy,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer


def _resources(port: int, app: int, pool: str) -> str:
    return (
        service_entry("svc.test", port, [app])
        + f"""
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: svc}}
spec:
  host: svc.test
  trafficPolicy: {{connectionPool: {pool}}}
---
"""
        + egress_sidecar(port)
    )


def test_max_requests_over_http2(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    try:
        with running_proxy(
            tmp_path, admin, _resources(port, app.port, "{http: {http2MaxRequests: 2}}")
        ):
            c = H2Client(port, authority="svc.test")
            sids = [c.request("/slow?ms=300") for _ in range(5)]
            res = c.wait(*sids)
            statuses = sorted(r.status for r in res)
            assert statuses == [200, 200, 503, 503, 503], statuses
            assert all(
                r.headers.get("x-envoy-overloaded") == "true" for r in res if r.status == 503
            )
            assert c.get("/after").status == 200  # the slots came back
            c.close()
    finally:
        app.stop()


def test_max_connections_on_a_tcp_port(tmp_path: Path, echo_server: int) -> None:
    """tcp_proxy: a connection beyond maxConnections is closed at once (upstream_cx_overflow,
    flag UO); once one closes, a new one gets through."""
    import socket

    admin, port = free_port(), free_port()
    resources = (
        service_entry("echo.test", port, [echo_server], "TCP")
        + """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: echo}
spec:
  host: echo.test
  trafficPolicy: {connectionPool: {tcp: {maxConnections: 2}}}
---
"""
        + egress_sidecar(port, protocol="TCP")
    )

    def roundtrip(s: socket.socket) -> bytes:
        s.sendall(b"ping")
        return s.recv(16)

    with running_proxy(tmp_path, admin, resources) as proxy:
        first = socket.create_connection(("127.0.0.1", port), timeout=5)
        second = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert roundtrip(first) == b"ping" and roundtrip(second) == b"ping"
        third = socket.create_connection(("127.0.0.1", port), timeout=5)
        assert third.recv(16) == b""  # closed without reaching the upstream
        third.close()
        first.close()
        deadline = time.monotonic() + 5
        while True:  # the slot frees when the proxy sees the close
            fourth = socket.create_connection(("127.0.0.1", port), timeout=5)
            try:
                if roundtrip(fourth) == b"ping":
                    break
            except OSError:
                pass
            fourth.close()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        fourth.close()
        second.close()
        clusters = json.loads(http_get(proxy.admin + "/clusters?format=json")[1])
        echo = next(c for c in clusters["cluster_statuses"] if "echo.test" in c["name"])
        assert echo["circuit_breakers"]["overflow"]["cx"] >= 1
        cx = "envoy_cluster_upstream_cx_overflow"
        overflowed = value(scrape(proxy.admin), cx, cluster_name=echo["name"])
        assert overflowed is not None and overflowed >= 1
        assert wait_for(
            lambda: (
                value(
                    scrape(proxy.admin), "istio_tcp_connections_closed_total", response_flags="UO"
                )
                == overflowed
            )
        ), proxy.metrics()
