"""ProxyConfig localRateLimits through a real proxy: a port's bucket and a route's bucket
(which replaces the port's), 429 + x-envoy-ratelimited + flag RL, refilled with time."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.proxy import (
    egress_sidecar,
    free_port,
    request,
    running_proxy,
    service_entry,
)
from tests.support.upstream import UpstreamServer


def get(port: int, path: str) -> tuple[int, str | None, bytes]:
    reply = request(port, path)
    return reply.status, reply.headers.get("x-envoy-ratelimited"), reply.body


def test_port_and_route_buckets(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    limits = (
        f"[{{name: egress, port: {port}, direction: OUTBOUND,"
        " tokenBucket: {maxTokens: 5, tokensPerFill: 5, fillInterval: 1s}},"
        " {name: tight, route: {virtualService: svc, name: tight},"
        " tokenBucket: {maxTokens: 2, fillInterval: 1h}}]"
    )
    resources = (
        service_entry("svc.test", port, [app.port])
        + """
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: svc}
spec:
  hosts: [svc.test]
  http:
  - name: tight
    match: [{uri: {prefix: /tight}}]
    route: [{destination: {host: svc.test}}]
  - route: [{destination: {host: svc.test}}]
---
"""
        + egress_sidecar(port)
    )
    try:
        with running_proxy(tmp_path, admin, resources, localRateLimits=limits) as proxy:
            results = [get(port, "/a") for _ in range(12)]
            assert [s for s, _, _ in results] == [200] * 5 + [429] * 7
            assert all(h == "true" and b == b"local_rate_limited" for _, h, b in results[5:])
            assert len(app.state.requests) == 5  # refused requests never reach the app
            # The route's own bucket replaces the port's: 2 more, although the port's is empty.
            assert [get(port, "/tight")[0] for _ in range(3)] == [200, 200, 429]
            time.sleep(1.1)  # one fill interval: the port's bucket has 5 again
            assert [get(port, "/b")[0] for _ in range(6)] == [200] * 5 + [429]
            assert get(port, "/tight")[0] == 429  # an hour-long interval: still empty
            metrics = proxy.metrics()
            assert 'meshproxy_local_rate_limited_total{name="egress"} 8.0' in metrics
            assert 'meshproxy_local_rate_limited_total{name="tight"} 2.0' in metrics
            assert 'response_code="429"' in metrics and 'response_flags="RL"' in metrics
    finally:
        app.stop()
