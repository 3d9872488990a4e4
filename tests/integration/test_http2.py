"""HTTP/2 through `meshproxy run`: h2c downstream, h2 upstream, conversion both ways, limits."""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import h2.exceptions
import h2.settings
import pytest

from tests.support.h2client import PREFACE, H2Client
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


@pytest.mark.parametrize(
    "authority",
    ["hello.test bad", "user@hello.test", "", "hello.test:notaport", "hello.test\x00x", "[::1"],
)
def test_a_malformed_authority_is_refused_before_any_upstream_request(
    mesh: H2Mesh, authority: str
) -> None:
    c = H2Client(mesh.h1_port, authority=authority)
    try:
        r = c.get("/bad-authority")
        # Refused: a stream reset (PROTOCOL_ERROR), a 400, or the connection closed.
        assert r.reset is not None or r.status == 400 or c.closed, (r.status, r.reset)
    finally:
        c.close()
    assert not [q for q in mesh.h1.state.requests if q.path == "/bad-authority"]
    # The listener is fine for the next client.
    ok = H2Client(mesh.h1_port, authority="hello.test")
    assert ok.get("/after").status == 200
    ok.close()


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


def test_slow_reader_stream_does_not_stall_a_sibling(mesh: H2Mesh) -> None:
    # Stream 1 downloads 8 MB and its reader never gives window back; stream 3 must still
    # be served on the same connection, and the proxy must not buffer the 8 MB.
    c = H2Client(mesh.h2_port, authority="h2.test")
    big = c.request("/big?n=8000000")
    c.no_ack.add(big)
    time.sleep(0.5)
    r = c.get("/small")
    assert r.status == 200
    assert len(c.responses[big].body) < 1_000_000
    rss = mesh.proxy.rss_kib()
    c.no_ack.discard(big)
    c.h2.acknowledge_received_data(len(c.responses[big].body), big)
    c.flush()
    (done,) = c.wait(big, timeout=20)
    assert done.ended and len(done.body) == 8_000_000
    assert rss < 200_000
    c.close()


# -- upstream HTTP/2 and conversion ---------------------------------------------------------
def test_http1_client_to_http2_upstream_maps_headers(mesh: H2Mesh) -> None:
    r = _curl(
        "-H",
        "Host: h2.test",
        "-H",
        "Connection: keep-alive, x-a",
        "-H",
        "X-A: 1",
        "-H",
        "Keep-Alive: 5",
        "-H",
        "TE: gzip",
        "-H",
        "X-Keep: yes",
        f"http://127.0.0.1:{mesh.h2_port}/conv",
    )
    import json

    seen = json.loads(r.stdout)
    headers = seen["headers"]
    assert headers[":authority"] == "h2.test"
    assert headers[":path"] == "/conv" and headers[":scheme"] == "http"
    for gone in ("host", "connection", "x-a", "keep-alive", "te"):
        assert gone not in headers
    assert headers["x-keep"] == "yes"


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


def test_upstream_goaway_and_refused_stream_are_retried(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    r = c.get("/goaway", method="POST", body=b"payload")
    assert r.status == 200, r.body
    assert mesh.h2.connections >= 2  # the retry went on a new connection
    r = c.get("/refuse", method="POST", body=b"payload")
    assert r.status == 200, r.body
    c.close()


def test_upstream_reset_before_headers_is_503_ur(mesh: H2Mesh) -> None:
    r = _curl(
        "-H", "Host: h2.test", "-w", "\n%{http_code}", f"http://127.0.0.1:{mesh.h2_port}/reset"
    )
    body, _, code = r.stdout.rpartition("\n")
    assert code == "503"
    assert "reset before headers" in body


# -- abuse ----------------------------------------------------------------------------------
def _raw(port: int) -> H2Client:
    return H2Client(port)


def test_ping_flood_is_cut_off_and_counted(mesh: H2Mesh) -> None:
    bystander = H2Client(mesh.h1_port)
    c = _raw(mesh.h1_port)
    for i in range(500):
        c.h2.ping(b"%08d" % i)
    try:
        c.flush()
    except OSError:
        pass
    assert c.wait_closed()
    assert bystander.get("/still-fine").status == 200
    assert value(scrape(mesh.proxy.admin), "meshproxy_http2_flood_total", kind="ping_flood") == 1
    bystander.close()


def test_rapid_reset_is_cut_off(mesh: H2Mesh) -> None:
    c = _raw(mesh.h1_port)
    try:
        for _ in range(400):
            sid = c.request("/hang")
            c.reset(sid)
    except OSError:
        pass
    assert c.wait_closed()
    assert (
        value(scrape(mesh.proxy.admin), "meshproxy_http2_flood_total", kind="premature_reset") == 1
    )
    assert H2Client(mesh.h1_port).get("/ok").status == 200


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


def test_empty_data_frame_flood_is_cut_off(mesh: H2Mesh) -> None:
    c = _raw(mesh.h1_port)
    sid = c.request("/upload", method="POST", end=False)
    try:
        for _ in range(50):
            c.h2.send_data(sid, b"")
        c.flush()
    except OSError:
        pass
    assert c.wait_closed()
    assert (
        value(scrape(mesh.proxy.admin), "meshproxy_http2_flood_total", kind="empty_frame_flood")
        == 1
    )


def test_continuation_flood_is_cut_off(mesh: H2Mesh) -> None:
    import socket
    import struct

    s = socket.create_connection(("127.0.0.1", mesh.h1_port), timeout=5)
    settings = struct.pack(">I", 0)[1:] + b"\x04\x00" + struct.pack(">I", 0)
    s.sendall(PREFACE + settings)
    # HEADERS (type 1) on stream 1 without END_HEADERS, then endless CONTINUATION (type 9).
    block = b"\x82\x86\x84"  # :method GET, :scheme http, :path /
    s.sendall(struct.pack(">I", len(block))[1:] + b"\x01\x00" + struct.pack(">I", 1) + block)
    start = time.monotonic()
    cut = False
    try:
        for _ in range(20000):
            s.sendall(struct.pack(">I", 0)[1:] + b"\x09\x00" + struct.pack(">I", 1))
    except OSError:
        cut = True  # reset while we were still flooding
    if not cut:
        s.settimeout(5)
        try:
            while s.recv(65536):
                pass
            cut = True  # end of stream: the proxy closed the connection
        except ConnectionResetError:
            cut = True
        except TimeoutError:
            pass  # still open five seconds later: not cut off
    assert cut, "the CONTINUATION flood was not cut off"
    assert time.monotonic() - start < 10
    s.close()
    # ...and by the proxy's own flood rules, counted, not by an accident.
    samples = scrape(mesh.proxy.admin)
    floods = {
        dict(labels).get("kind"): v
        for (name, labels), v in samples.items()
        if name == "meshproxy_http2_flood_total"
    }
    rejected = {
        dict(labels).get("reason"): v
        for (name, labels), v in samples.items()
        if name == "meshproxy_downstream_rq_rejected_total"
    }
    assert floods == {"continuation_flood": 1.0}, (floods, rejected)
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def test_malformed_h2_requests_never_reach_the_upstream(mesh: H2Mesh) -> None:
    before = len(mesh.h1.state.requests)
    for headers in (
        [("connection", "keep-alive")],
        [("transfer-encoding", "chunked")],
        [("te", "gzip")],
        [("host", "other.test")],  # disagrees with :authority
    ):
        c = H2Client(mesh.h1_port)
        sid = c.request("/smuggle", headers=headers)
        c.wait(sid, timeout=3)
        r = c.responses[sid]
        assert r.status in (0, 400) and (
            r.reset is not None or c.goaway or r.status == 400 or c.closed
        )
        c.close()
    assert len(mesh.h1.state.requests) == before  # malformed heads: nothing went upstream
    # A body longer than its content-length: the head may already be upstream (requests
    # stream), but the request is aborted there, never completed, and the client is reset.
    c = H2Client(mesh.h1_port)
    sid = c.request("/upload", method="POST", headers=[("content-length", "5")], body=b"x" * 10)
    c.wait(sid, timeout=3)
    assert c.responses[sid].status != 200
    c.close()
    time.sleep(0.2)
    assert "/upload" not in mesh.h1.state.completed


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


def test_hpack_bomb_is_refused(mesh: H2Mesh) -> None:
    # One 4,000-byte value indexed once, then referenced: tiny on the wire, far over 60 KiB
    # decoded. The decoder's header-list limit must end the connection, not the memory.
    c = H2Client(mesh.h1_port)
    sid = c.request("/bomb", headers=[("x-bomb", "b" * 4000)] * 40)
    c.wait(sid, timeout=5)
    r = c.responses[sid]
    assert r.status != 200
    assert c.closed or c.goaway is not None or r.reset is not None or r.status == 431
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def test_sigterm_sends_goaway_and_lets_open_streams_finish(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    slow = c.request("/slow?ms=800")
    time.sleep(0.2)
    mesh.proxy.proc.send_signal(15)
    (r,) = c.wait(slow, timeout=10)
    assert r.status == 200  # in flight when the drain began: completed
    deadline = time.monotonic() + 5
    while c.goaway is None and time.monotonic() < deadline and c.pump(deadline):
        pass
    assert c.goaway is not None
    assert mesh.proxy.proc.wait(timeout=10) == 0


def test_settings_flood_is_cut_off(mesh: H2Mesh) -> None:
    c = _raw(mesh.h1_port)
    try:
        for _ in range(500):
            c.h2.update_settings({h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 100})
        c.flush()
    except (OSError, h2.exceptions.ProtocolError):
        pass
    assert c.wait_closed()
    assert (
        value(scrape(mesh.proxy.admin), "meshproxy_http2_flood_total", kind="settings_flood") == 1
    )


def test_streams_beyond_the_advertised_limit_end_the_connection(mesh: H2Mesh) -> None:
    # The client ignores our MAX_CONCURRENT_STREAMS (100): the connection is closed with a
    # GOAWAY and no more than 100 requests ever reach the upstream.
    c = _raw(mesh.h1_port)
    c.h2.remote_settings.max_concurrent_streams = 1000  # pretend we never said 100
    before = len(mesh.h1.state.requests)
    try:
        for _ in range(150):
            c.request("/hang")
    except OSError:
        pass
    assert c.wait_closed()
    assert len(mesh.h1.state.requests) - before <= 100
    assert H2Client(mesh.h1_port).get("/ok").status == 200
