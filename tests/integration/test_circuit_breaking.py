"""Circuit breaking: beyond maxConnections + http1MaxPendingRequests, or http2MaxRequests,
requests fail fast with 503 UO and x-envoy-overloaded, while admitted ones succeed."""

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


def test_max_connections_and_pending_requests(tmp_path: Path) -> None:
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


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_a_flood_gets_fast_503s_and_memory_stays_flat(tmp_path: Path) -> None:
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
