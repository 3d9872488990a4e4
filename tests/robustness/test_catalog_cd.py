"""Catalog groups C and D (and the h2 halves of I07 and L01): HTTP/2 validation, the h2 → h1
downgrade and HTTP/2 resource abuse, against a real proxy with h1 and h2 upstreams."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import h2.settings
import pytest

from tests.integration import test_http2 as src_http2
from tests.integration.test_http2 import H2Mesh, _curl, _raw
from tests.support.h2client import PREFACE, H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import (
    egress_sidecar,
    free_port,
    running_proxy,
    service_entry,
    wait_for,
)
from tests.support.upstream import UpstreamServer

mesh = src_http2.mesh  # the fixture, shared with test_http2.py


def test_C01_C02_C03_C05_malformed_h2_requests_never_reach_the_upstream(mesh: H2Mesh) -> None:
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


@pytest.mark.parametrize(
    "authority",
    ["hello.test bad", "user@hello.test", "", "hello.test:notaport", "hello.test\x00x", "[::1"],
)
def test_C04_a_malformed_authority_is_refused_before_any_upstream_request(
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


# -- upstream HTTP/2 and conversion ---------------------------------------------------------
def test_C07_http1_client_to_http2_upstream_maps_headers(mesh: H2Mesh) -> None:
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


def test_D01_rapid_reset_is_cut_off(mesh: H2Mesh) -> None:
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


def test_D03_continuation_flood_is_cut_off(mesh: H2Mesh) -> None:
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


def test_D04_hpack_bomb_is_refused(mesh: H2Mesh) -> None:
    # One 4,000-byte value indexed once, then referenced: tiny on the wire, far over 60 KiB
    # decoded. The decoder's header-list limit must end the connection, not the memory.
    c = H2Client(mesh.h1_port)
    sid = c.request("/bomb", headers=[("x-bomb", "b" * 4000)] * 40)
    c.wait(sid, timeout=5)
    r = c.responses[sid]
    assert r.status != 200
    assert c.closed or c.goaway is not None or r.reset is not None or r.status == 431
    assert H2Client(mesh.h1_port).get("/ok").status == 200


def test_D05_ping_flood_is_cut_off_and_counted(mesh: H2Mesh) -> None:
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


def test_D05_settings_flood_is_cut_off(mesh: H2Mesh) -> None:
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


def test_D05_empty_data_frame_flood_is_cut_off(mesh: H2Mesh) -> None:
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


def test_D08_slow_reader_stream_does_not_stall_a_sibling(mesh: H2Mesh) -> None:
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


def test_D08_streams_that_never_open_their_window_are_reset_at_the_stream_idle_timeout(
    tmp_path: Path,
) -> None:
    """Catalog D08 with streamIdleTimeout 1s: 20 streams each asking for 1 MiB on a
    connection that opens no window (SETTINGS_INITIAL_WINDOW_SIZE 0, no WINDOW_UPDATE): each
    stream is reset (flag SI, counted), its upstream request released, the connection kept.
    A stream whose upstream says nothing is answered 408 `stream timeout` instead. The
    default is off, as in Istio's sidecars (long-lived gRPC streams)."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("big.test", port, [app.port]) + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources, streamIdleTimeout="1s") as proxy:
            c = H2Client(port, authority="big.test", stream_window=0)
            sids = [c.request("/big?n=1048576") for _ in range(20)]
            stalled = c.request("/slow?ms=30000")
            done = c.wait(*sids, stalled, timeout=15)
            assert all(r.reset is not None and r.status == 200 for r in done[:-1]), done[:3]
            assert done[-1].status == 408 and done[-1].headers.get("content-length") == "14"
            assert not c.closed and c.goaway is None  # the connection itself serves on
            samples = scrape(proxy.admin)
            flagged = value(
                samples,
                "istio_requests_total",
                response_flags="SI",
                response_code="200",
                reporter="source",
            )
            assert flagged == 20
            assert value(samples, "istio_requests_total", response_code="408") == 1
            assert wait_for(lambda: app.state.closed >= 21), app.state.closed
            c.close()
    finally:
        app.stop()


def test_D08_http1_requests_idle_for_the_stream_idle_timeout_end(tmp_path: Path) -> None:
    """The same timeout over HTTP/1.1: a download the client stops reading is cut (the
    connection aborted, flag SI), a request whose upstream says nothing gets 408."""
    app = UpstreamServer("app").start()
    admin, port = free_port(), free_port()
    resources = service_entry("big.test", port, [app.port]) + egress_sidecar(port)
    try:
        with running_proxy(tmp_path, admin, resources, streamIdleTimeout="1s") as proxy:
            reader = socket.create_connection(("127.0.0.1", port), timeout=15)
            reader.sendall(b"GET /big?n=100000000 HTTP/1.1\r\nHost: big.test\r\n\r\n")
            slow = http.client.HTTPConnection("127.0.0.1", port, timeout=15)
            slow.request("GET", "/slow?ms=30000", headers={"Host": "big.test"})
            reply = slow.getresponse()
            assert (reply.status, reply.read()) == (408, b"stream timeout")
            samples = scrape(proxy.admin)
            assert wait_for(
                lambda: (
                    value(
                        scrape(proxy.admin),
                        "istio_requests_total",
                        response_flags="SI",
                        response_code="200",
                    )
                    == 1
                )
            ), samples
            received = 0
            reader.settimeout(5)
            try:
                while chunk := reader.recv(1 << 20):  # what the proxy had buffered, then the end
                    received += len(chunk)
            except (ConnectionResetError, TimeoutError):
                pass
            assert received < 100_000_000
            assert wait_for(lambda: app.state.closed >= 2), app.state.closed
            reader.close()
    finally:
        app.stop()


def test_D09_streams_beyond_the_advertised_limit_end_the_connection(mesh: H2Mesh) -> None:
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


def test_D10_upstream_reset_before_headers_is_503_ur(mesh: H2Mesh) -> None:
    r = _curl(
        "-H", "Host: h2.test", "-w", "\n%{http_code}", f"http://127.0.0.1:{mesh.h2_port}/reset"
    )
    body, _, code = r.stdout.rpartition("\n")
    assert code == "503"
    assert "reset before headers" in body


def test_I07_upstream_goaway_and_refused_stream_are_retried(mesh: H2Mesh) -> None:
    c = H2Client(mesh.h2_port, authority="h2.test")
    r = c.get("/goaway", method="POST", body=b"payload")
    assert r.status == 200, r.body
    assert mesh.h2.connections >= 2  # the retry went on a new connection
    r = c.get("/refuse", method="POST", body=b"payload")
    assert r.status == 200, r.body
    c.close()


def test_L01_sigterm_sends_goaway_and_lets_open_streams_finish(mesh: H2Mesh) -> None:
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
