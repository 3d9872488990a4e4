"""HTTP/2 through `meshproxy run`: h2c downstream, h2 upstream, conversion both ways, limits."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.h2client import H2Client
from tests.support.h2server import H2Server
from tests.support.metrics import scrape, value
from tests.support.proxy import ProxyProcess, free_port, proxy_config_yaml, wait_for
from tests.support.upstream import UpstreamServer


@dataclass
class H2Mesh:
    proxy: ProxyProcess
    h1_port: int  # hello.test: HTTP port, HTTP/1.1 upstream
    h2_port: int  # h2.test: HTTP2 port, HTTP/2 upstream
    upgrade_port: int  # up.test: HTTP port, DestinationRule h2UpgradePolicy UPGRADE
    limited_port: int  # limited.test: HTTP2 port whose server allows 4 streams per connection
    h1: UpstreamServer
    h2: H2Server
    h2_limited: H2Server  # advertises MAX_CONCURRENT_STREAMS 4

    def metrics(self) -> str:
        return self.proxy.metrics()


def _yaml(
    admin: int,
    h1_port: int,
    h2_port: int,
    up_port: int,
    lim_port: int,
    h1: int,
    h2: int,
    h2_limited: int,
) -> str:
    return (
        proxy_config_yaml(admin, drainDuration="3s")
        + f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  ports: [{{number: {h1_port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {h1}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: hello}}
spec:
  hosts: [hello.test]
  http:
  - match: [{{uri: {{prefix: /hang}}}}]
    timeout: 500ms
    route: [{{destination: {{host: hello.test}}}}]
  - route: [{{destination: {{host: hello.test}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: h2}}
spec:
  hosts: [h2.test]
  ports: [{{number: {h2_port}, name: http2, protocol: HTTP2}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http2: {h2}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: limited}}
spec:
  hosts: [limited.test]
  ports: [{{number: {lim_port}, name: http2, protocol: HTTP2}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http2: {h2_limited}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: up}}
spec:
  hosts: [up.test]
  ports: [{{number: {up_port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {h2}}}}}]
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: up}}
spec:
  host: up.test
  trafficPolicy: {{connectionPool: {{http: {{h2UpgradePolicy: UPGRADE}}}}}}
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {h1_port}, protocol: HTTP, name: a}}, bind: 127.0.0.1, hosts: [./hello.test]}}
  - {{port: {{number: {h2_port}, protocol: HTTP2, name: b}}, bind: 127.0.0.1, hosts: [./h2.test]}}
  - {{port: {{number: {up_port}, protocol: HTTP, name: c}}, bind: 127.0.0.1, hosts: [./up.test]}}
  - {{port: {{number: {lim_port}, protocol: HTTP2, name: d}}, bind: 127.0.0.1, hosts: [./*]}}
"""
    )


@contextlib.contextmanager
def running_h2_mesh(directory: Path) -> Iterator[H2Mesh]:
    """A proxy in `directory` with its HTTP/1.1, HTTP/2 and limited HTTP/2 upstreams."""
    h1 = UpstreamServer("h1").start()
    h2s = H2Server("h2").start()
    limited = H2Server("limited", max_streams=4).start()
    admin, h1_port, h2_port, up_port, lim_port = (free_port() for _ in range(5))
    (directory / "mesh.yaml").write_text(
        _yaml(admin, h1_port, h2_port, up_port, lim_port, h1.port, h2s.port, limited.port)
    )
    proxy = ProxyProcess(directory, admin, directory / "proxy.log")
    try:
        proxy.wait_ready()
        yield H2Mesh(proxy, h1_port, h2_port, up_port, lim_port, h1, h2s, limited)
    finally:
        proxy.terminate()
        h1.stop()
        h2s.stop()
        limited.stop()


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[H2Mesh]:
    with running_h2_mesh(tmp_path) as m:
        yield m


def _curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["curl", "-s", "-S", "--max-time", "10", *args], capture_output=True, text=True, timeout=20
    )


# -- downstream HTTP/2 -----------------------------------------------------------------------
def test_curl_h2c_prior_knowledge_to_http1_upstream(mesh: H2Mesh) -> None:
    r = _curl(
        "--http2-prior-knowledge",
        "-H",
        "Host: hello.test",
        "-H",
        "te: trailers",
        "-w",
        "\n%{http_version} %{http_code}",
        f"http://127.0.0.1:{mesh.h1_port}/a?b=1",
    )
    body, _, tail = r.stdout.rpartition("\n")
    assert tail == "2 200", r.stderr
    import json

    seen = json.loads(body)
    assert seen["path"] == "/a?b=1"
    assert seen["headers"]["host"] == "hello.test"  # :authority became Host
    assert "te" not in seen["headers"]  # never forwarded over HTTP/1.1
    assert seen["headers"]["x-forwarded-proto"] == "http"


def test_h2c_post_body_reaches_http1_upstream_chunked(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h1_port)
    body = b"z" * 200_000  # several DATA frames and window updates
    r = c.get("/upload", method="POST", body=body)
    assert r.status == 200
    assert r.json()["size"] == len(body)
    c.close()


def test_many_concurrent_streams_on_one_connection(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h1_port)
    sids = [c.request(f"/s{i}") for i in range(60)]
    responses = c.wait(*sids)
    assert [r.status for r in responses] == [200] * 60
    assert sorted(r.json()["path"] for r in responses) == sorted(f"/s{i}" for i in range(60))
    c.close()


def test_route_timeout_on_one_stream_leaves_siblings(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h1_port)
    slow = c.request("/hang")
    fast = [c.request(f"/f{i}") for i in range(5)]
    res = c.wait(slow, *fast)
    assert res[0].status == 504 and res[0].body == b"upstream request timeout"
    assert all(r.status == 200 for r in res[1:])
    c.close()


def test_an_unknown_authority_has_no_route_on_h2(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h1_port, authority="nowhere.test")
    assert c.get("/").status == 404
    c.close()


def test_rst_stream_cancels_only_that_streams_upstream_request(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    slow = c.request("/slow?ms=3000")
    time.sleep(0.3)
    other = c.request("/x")
    c.reset(slow)
    (r,) = c.wait(other)
    assert r.status == 200
    deadline = time.monotonic() + 3
    while mesh.h2.resets_received == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mesh.h2.resets_received >= 1  # the upstream stream was cancelled, not left running
    assert c.get("/y").status == 200  # the connection is fine
    c.close()


def test_http2_upstream_is_multiplexed(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    sids = [c.request(f"/m{i}") for i in range(40)]
    res = c.wait(*sids)
    assert all(r.status == 200 for r in res)
    assert mesh.h2.connections == 1
    assert len({r.json()["stream"] for r in res}) == 40
    c.close()


def test_more_upstream_connections_when_max_concurrent_streams_is_reached(mesh: H2Mesh) -> None:
    # limited.test's server allows 4 streams per connection: 12 slow requests need 3.
    c = H2Client(mesh.limited_port, authority="limited.test")
    sids = [c.request("/slow?ms=400") for _ in range(12)]
    res = c.wait(*sids)
    assert [r.status for r in res] == [200] * 12, mesh.h2_limited.errors
    assert 3 <= mesh.h2_limited.connections <= 6
    c.close()


def test_h2_upgrade_policy_speaks_http2_to_an_http_port(mesh: H2Mesh) -> None:
    r = _curl("-H", "Host: up.test", f"http://127.0.0.1:{mesh.upgrade_port}/upg")
    import json

    assert json.loads(r.stdout)["headers"][":authority"] == "up.test"


def test_trailers_pass_through_h2_to_h2(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    r = c.get("/trailers")
    assert r.status == 200 and r.trailers == {"x-trailer": "done"}
    c.close()


# -- abuse ----------------------------------------------------------------------------------
def _raw(port: int) -> H2Client:
    return H2Client(port)


def test_a_flood_from_many_connections_writes_few_log_lines(mesh: H2Mesh) -> None:
    """Catalog L07: every flooding connection is counted, but the log gets one line and then
    at most one per 10 s saying how many it held back, not one per connection."""
    for _ in range(20):
        c = _raw(mesh.h1_port)
        try:
            for _ in range(400):
                c.reset(c.request("/hang"))
        except OSError:
            pass
        assert c.wait_closed()
    flood = "meshproxy_http2_flood_total"
    assert wait_for(lambda: value(scrape(mesh.proxy.admin), flood, kind="premature_reset") == 20), (
        mesh.metrics()
    )
    assert mesh.proxy.log().count("closing HTTP/2 connection from") == 1


@pytest.mark.skipif(shutil.which("h2load") is None, reason="h2load (nghttp2-client) not installed")
def test_h2load_through_the_proxy(mesh: H2Mesh) -> None:
    r = subprocess.run(
        [
            "h2load",
            "-n",
            "2000",
            "-c",
            "4",
            "-m",
            "10",
            "-H",
            ":authority: hello.test",
            f"http://127.0.0.1:{mesh.h1_port}/load",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "2000 succeeded" in r.stdout and "2000 2xx" in r.stdout, r.stdout


def test_ping_is_answered(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h1_port)
    c.h2.ping(b"12345678")
    c.flush()
    acked = False
    deadline = time.monotonic() + 5
    import h2.events

    while not acked and time.monotonic() < deadline:
        data = c.sock.recv(65536)
        acked = any(
            isinstance(ev, h2.events.PingAckReceived) and ev.ping_data == b"12345678"
            for ev in c.h2.receive_data(data)
        )
    assert acked
    c.close()
