"""ProxyConfig localRateLimits through a real proxy: a port's bucket and a route's bucket
(which replaces the port's), 429 + x-envoy-ratelimited + flag RL, refilled with time."""

from __future__ import annotations

import time
from pathlib import Path

from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    request,
    running_proxy,
    service_entry,
    wait_for,
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
            started = time.monotonic()
            statuses = [get(port, "/a") for _ in range(12)]
            # A shared machine may be slow enough for the 1s bucket to refill mid-burst:
            # count the fills that could have happened instead of assuming none did.
            fills = int((time.monotonic() - started) / 1.0)
            codes = [s for s, _, _ in statuses]
            assert codes[:5] == [200] * 5
            assert 5 <= codes.count(200) <= 5 + 5 * fills
            refused = [r for r in statuses if r[0] == 429]
            assert refused and all(
                h == "true" and b == b"local_rate_limited" for _, h, b in refused
            )
            assert len(app.state.requests) == codes.count(200)  # refused never reach the app
            # The route's own bucket replaces the port's: 2 more, although the port's is empty.
            assert [get(port, "/tight")[0] for _ in range(3)] == [200, 200, 429]
            # Refilled with time: wait (generously) for the port's bucket to serve again.
            assert wait_for(lambda: get(port, "/b")[0] == 200, timeout=10)
            assert get(port, "/tight")[0] == 429  # an hour-long interval: still empty
            samples = scrape(proxy.admin)
            assert value(samples, "meshproxy_local_rate_limited_total", name="tight") == 2
            limited = value(samples, "meshproxy_local_rate_limited_total", name="egress")
            assert limited is not None and limited >= codes.count(429)  # + the refill polls
            rl = value(
                samples,
                "istio_requests_total",
                reporter="source",
                response_code="429",
                response_flags="RL",
            )
            assert rl == limited + 2  # every refusal is one request in Istio's series
    finally:
        app.stop()
