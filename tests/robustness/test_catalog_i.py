"""Catalog group I: retries, retry limits, circuit breaking and their Envoy flags, against
upstreams that fail on purpose."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.integration import test_retries as src_retries
from tests.integration.test_circuit_breaking import _resources
from tests.integration.test_retries import RetryMesh
from tests.support.metrics import scrape, value
from tests.support.proxy import free_port, http_get, running_proxy
from tests.support.upstream import UpstreamServer

mesh = src_retries.mesh  # the fixture, shared with test_retries.py


def test_H05_a_body_beyond_the_replay_buffer_is_not_retried(mesh: RetryMesh) -> None:
    status, _, _ = mesh.request("/r5xx?code=503&times=1&key=g", "POST", b"z" * 200_000)
    assert status == 503
    assert mesh.app.state.failures["g"] == 1


def test_I01_connect_failure_retried_on_another_endpoint(mesh: RetryMesh) -> None:
    # pair.test has a dead endpoint: the default policy retries elsewhere, every time.
    for _ in range(20):
        status, body, _ = mesh.request("/p", port=mesh.pair_port, host="pair.test")
        assert status == 200, body
        assert json.loads(body)["headers"].get("x-envoy-attempt-count") in ("1", "2")
    samples = scrape(mesh.proxy.admin)
    assert (
        value(samples, "istio_requests_total", destination_service="pair.test", response_code="200")
        == 20
    )


@pytest.mark.parametrize("warm", [False, True])
def test_I02_per_try_timeout_retries_then_504(mesh: RetryMesh, warm: bool) -> None:
    if warm:  # an idle pooled connection: the first try takes the synchronous fast path
        assert mesh.request("/pertry?ms=0")[0] == 200
    before = len([r for r in mesh.app.state.requests if r.path.startswith("/slow?ms=1000")])
    status, body, elapsed = mesh.request("/pertry?ms=1000")
    assert status == 504 and body == b"upstream request timeout"
    assert 0.55 < elapsed < 2.5  # three tries of 200 ms plus backoff, not the 3 s route timeout
    tries = len([r for r in mesh.app.state.requests if r.path.startswith("/slow?ms=1000")])
    assert tries - before == 3


def test_I04_5xx_retried_with_attempt_count_until_success(mesh: RetryMesh) -> None:
    status, body, _ = mesh.request("/r5xx?code=503&times=2&key=a")
    assert status == 200 and b"failed" not in body
    assert mesh.attempts("/fail?code=503&times=2&key=a") == ["1", "2", "3"]
    retries = scrape(mesh.proxy.admin)
    assert sum(v for (n, _), v in retries.items() if n == "meshproxy_upstream_rq_retry_total") == 2


def test_I04_a_post_reset_after_its_body_is_replayed_only_when_retry_on_allows(
    mesh: RetryMesh,
) -> None:
    # Istio's default outbound policy has no `reset`: the app may have acted on the POST.
    status, body, _ = mesh.request("/fail?code=reset&times=1&key=j", "POST", b"order=1")
    assert status == 503 and b"reset reason: connection termination" in body
    assert mesh.app.state.failures["j"] == 1
    # retryOn: reset says replaying is fine: the second try succeeds.
    status, _, _ = mesh.request("/rreset?code=reset&times=1&key=k", "POST", b"order=2")
    assert status == 200 and mesh.app.state.failures["k"] == 2


def test_I09_max_connections_and_pending_requests(tmp_path: Path) -> None:
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    pool = "{tcp: {maxConnections: 1}, http: {http1MaxPendingRequests: 1}}"
    results: list[tuple[int, float, str | None]] = []
    lock = threading.Lock()

    def one() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        start = time.monotonic()
        conn.request("GET", "/slow?ms=400", headers={"Host": "svc.test"})
        resp = conn.getresponse()
        resp.read()
        with lock:
            results.append(
                (resp.status, time.monotonic() - start, resp.getheader("x-envoy-overloaded"))
            )
        conn.close()

    try:
        with running_proxy(tmp_path, admin, _resources(port, app.port, pool)) as proxy:
            threads = [threading.Thread(target=one) for _ in range(6)]
            for t in threads:
                t.start()
                time.sleep(0.02)
            for t in threads:
                t.join(timeout=15)
            ok = [r for r in results if r[0] == 200]
            over = [r for r in results if r[0] == 503]
            assert len(ok) == 2 and len(over) == 4, results  # 1 on the connection + 1 waiting
            assert all(r[2] == "true" for r in over)
            # Failed fast: each refusal came before the admitted requests' slow answers (no
            # absolute bound on a shared machine, only the order).
            assert max(r[1] for r in over) < min(r[1] for r in ok), results
            assert app.state.connections == 1  # never more than maxConnections
            samples = scrape(proxy.admin)
            uo = value(samples, "istio_requests_total", reporter="source", response_flags="UO")
            assert uo == 4  # every refusal is one request in Istio's series
            clusters = json.loads(http_get(f"http://127.0.0.1:{admin}/clusters?format=json")[1])
            cb = next(c for c in clusters["cluster_statuses"] if c["name"].startswith("outbound|"))
            assert cb["circuit_breakers"]["overflow"]["pending"] == 4
            pending = "envoy_cluster_upstream_rq_pending_overflow"
            assert value(scrape(proxy.admin), pending, cluster_name=cb["name"]) == 4
    finally:
        app.stop()


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_I09_a_flood_gets_fast_503s_and_memory_stays_flat(tmp_path: Path) -> None:
    """100 clients against maxConnections 2 + 2 pending: the overflow is answered at once,
    admitted requests succeed, nothing times out, and the proxy's memory does not grow with
    a second flood (no queue grows without bound)."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    pool = "{tcp: {maxConnections: 2}, http: {http1MaxPendingRequests: 2}}"

    def flood() -> dict[str, int]:
        out = subprocess.run(
            [
                "h2load",
                "--h1",
                "-n",
                "3000",
                "-c",
                "100",
                "-T",
                "10",
                "-H",
                ":authority: svc.test",
                f"http://127.0.0.1:{port}/slow?ms=20",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        ).stdout
        m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
        done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded", out)
        assert m and done, out
        return {"2xx": int(m[1]), "5xx": int(m[4]), "done": int(done[1])}

    try:
        with running_proxy(tmp_path, admin, _resources(port, app.port, pool)) as proxy:
            first = flood()
            after_first = proxy.rss_kib()
            second = flood()
            after_second = proxy.rss_kib()
            for result in (first, second):
                assert result["done"] == 3000, result  # every request answered, none hung
                # How many get in depends on how fast the overflow is refused (the compiled
                # build refuses faster); at least the first two connections' requests must.
                assert result["2xx"] >= 2 and result["5xx"] >= 1500, result
                assert result["2xx"] + result["5xx"] == 3000, result  # no 4xx, nothing else
            assert app.state.connections <= 2 * 2  # two floods, two connections at a time
            assert after_second - after_first < 10_000, (after_first, after_second)  # KiB
    finally:
        app.stop()


@pytest.mark.parametrize(
    "limit",
    [
        "connectionPool: {http: {maxRetries: 2}}",
        "retryBudget: {percent: 5, minRetryConcurrency: 2}",
    ],
    ids=["maxRetries", "retryBudget"],
)
def test_I05_a_retry_storm_is_held_to_the_retry_limit(tmp_path: Path, limit: str) -> None:
    """Catalog I05: an upstream that answers every request 503 (after 0.3 s), 20 requests at
    once on a route that retries 5xx three times, and at most 2 retries in flight: the rest
    are refused a retry (upstream_rq_retry_overflow) and answered with the 503 they got. The
    upstream sees exactly one attempt per request plus three per request allowed to retry:
    no amplification beyond the limit."""
    app = UpstreamServer("app").start()
    app.state.always, app.state.delay = 503, 0.3
    admin, port = free_port(), free_port()
    resources = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: storm}}
spec:
  hosts: [storm.test]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {app.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: storm}}
spec:
  hosts: [storm.test]
  http: [{{retries: {{attempts: 3, retryOn: 5xx}}, route: [{{destination: {{host: storm.test}}}}]}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: storm}}
spec:
  host: storm.test
  trafficPolicy: {{{limit}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress: [{{port: {{number: {port}, protocol: HTTP, name: a}}, bind: 127.0.0.1, hosts: [./*]}}]
"""
    statuses: list[int] = []

    def call() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        conn.request("GET", "/storm", headers={"Host": "storm.test"})
        statuses.append(conn.getresponse().status)
        conn.close()

    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            threads = [threading.Thread(target=call) for _ in range(20)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=30)
            overflow = value(
                scrape(proxy.admin),
                "envoy_cluster_upstream_rq_retry_overflow",
                cluster_name=f"outbound|{port}||storm.test",
            )
    finally:
        app.stop()
    assert statuses == [503] * 20
    assert overflow is not None and overflow >= 10, overflow
    allowed = 20 - overflow
    assert len(app.state.requests) == 20 + 3 * allowed
