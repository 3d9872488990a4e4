"""Catalog groups H, I and J over plain HTTP/1.1 and TCP: slow and greedy clients, upstream
faults mapped to Envoy's codes and flags, clients that leave."""

from __future__ import annotations

import http.client
import shutil
import socket
import subprocess
import time

import pytest

from tests.integration.conftest import MeshFactory
from tests.integration.test_http_proxy import (
    _answer,
    _cpu_seconds,
    request,
    status_of_new_connection,
)
from tests.integration.test_streaming import GIB, PeakRss
from tests.support.metrics import scrape, value
from tests.support.proxy import env_without_proxy, wait_for


def test_H01_slow_request_headers_get_408(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(extra_spec="  requestHeadersTimeout: 500ms")
    with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=5) as s:
        s.sendall(b"GET / HTTP/1.1\r\nHost: hel")
        started = time.monotonic()
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408")
        assert 0.3 < time.monotonic() - started < 3


def test_H04_connection_limit(make_mesh: MeshFactory) -> None:
    mesh = make_mesh(extra_spec="  maxConnections: 2")
    held = [socket.create_connection(("127.0.0.1", mesh.http_port)) for _ in range(2)]
    try:
        time.sleep(0.2)
        with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=3) as third:
            third.sendall(b"GET / HTTP/1.1\r\nHost: hello.test\r\n\r\n")
            try:
                assert third.recv(100) == b""
            except ConnectionResetError:
                pass  # refused by an abortive close: also fine
        rejected = value(
            scrape(mesh.proxy.admin), "meshproxy_downstream_rq_rejected_total", reason="overflow"
        )
        assert rejected == 1
    finally:
        for s in held:
            s.close()


def test_H04_out_of_file_descriptors_no_busy_loop_and_service_resumes(
    make_mesh: MeshFactory, codec: str
) -> None:
    """Catalog H04: 300 connections against a proxy allowed 64 open files. At EMFILE the
    proxy sheds what it cannot accept without spinning, a connection it holds still gets an
    HTTP answer (its first request, whose codec must not need a file then), and once clients
    leave, new connections are served again. Nothing is logged as a crash."""
    mesh = make_mesh(codec, max_open_files=64)
    pid = mesh.proxy.proc.pid
    flood: list[socket.socket] = []
    try:
        for _ in range(300):
            try:
                flood.append(socket.create_connection(("127.0.0.1", mesh.http_port), timeout=5))
            except OSError:
                break  # the backlog is full: as refused as it gets
        time.sleep(0.5)
        cpu = _cpu_seconds(pid)
        time.sleep(2)
        assert _cpu_seconds(pid) - cpu < 0.5, "the proxy spins at the file-descriptor limit"
        # the first connection was accepted: it is answered (200, or 503 if no file is left
        # for the upstream connection), not dropped
        assert _answer(flood[0]).split(b" ")[1] in (b"200", b"503"), mesh.proxy.log()
    finally:
        for s in flood:
            s.close()
    assert wait_for(lambda: status_of_new_connection(mesh.http_port) == b"200"), mesh.proxy.log()
    assert "Traceback" not in mesh.proxy.log()


@pytest.mark.parametrize(
    ("path", "status", "flag"),
    [
        ("/dead", 503, "UF,URX"),  # connect-failure retried twice (Istio default), then URX
        ("/empty", 503, "UH"),
        ("/malformed", 502, "UPE"),
        ("/hang", 504, "UT"),
        ("/reset", 503, "UC"),
    ],
)
def test_I01_I02_I03_I10_I11_upstream_failures_map_to_envoy_codes(
    make_mesh: MeshFactory, codec: str, path: str, status: int, flag: str
) -> None:
    mesh = make_mesh(codec, vs_timeout="500ms")
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    # /malformed and /reset live on the default split route (v1); /hang has a 500ms timeout.
    conn.request("GET", path, headers={"Host": "hello.test"})
    started = time.monotonic()
    resp = conn.getresponse()
    body = resp.read()
    assert resp.status == status, body
    if flag == "UT":
        assert time.monotonic() - started < 3 and body == b"upstream request timeout"
    if flag == "UF,URX":  # Envoy's words after retries ran out
        assert body.endswith(b"retried and the latest reset reason: connection failure")
    # The downstream connection stays usable after an upstream failure.
    conn.request("GET", "/ok", headers={"Host": "hello.test"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.read()
    # One series with both labels, counting exactly this one request.
    samples = scrape(mesh.proxy.admin)
    assert (
        value(samples, "istio_requests_total", response_code=str(status), response_flags=flag) == 1
    )


def test_I06_keep_alive_race_is_retried_on_a_fresh_connection(
    make_mesh: MeshFactory, codec: str
) -> None:
    """The upstream closes idle connections after 100 ms; the proxy keeps them for 10 s."""
    mesh = make_mesh(codec, extra_spec="  upstreamIdleTimeout: 10s")
    mesh.v1.state.idle_close_after = 0.1
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=10)
    for i in range(10):
        conn.request("GET", f"/r{i}", headers={"Host": "hello.test"})
        resp = conn.getresponse()
        assert resp.status == 200, resp.read()
        resp.read()
        time.sleep(0.15)  # let the upstream close the pooled connection
    assert len(mesh.v1.state.requests) == 10


def test_I10_no_route_is_404_nr(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    status, _, _ = request(mesh.http_port, "GET", "/", {"Host": "unknown.test"})
    assert status == 404
    samples = scrape(mesh.proxy.admin)
    assert value(samples, "istio_requests_total", response_code="404", response_flags="NR") == 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_H02_one_gib_download_streams_with_bounded_memory(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    baseline = mesh.proxy.rss_kib()
    with PeakRss(mesh.proxy.rss_kib) as rss:
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "--max-time",
                "120",
                "-o",
                "/dev/null",
                "-w",
                "%{size_download}",
                "-H",
                "Host: hello.test",
                f"{mesh.url}/big?n={GIB}",
            ],
            capture_output=True,
            text=True,
            env=env_without_proxy(),
            timeout=150,
            check=False,
        )
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) == GIB
    assert rss.peak - baseline < 30 * 1024, f"proxy RSS grew by {rss.peak - baseline} KiB"


def test_J03_tcp_echo_with_half_close(make_mesh: MeshFactory) -> None:
    mesh = make_mesh()
    payload = bytes(range(256)) * 4096  # 1 MiB
    with socket.create_connection(("127.0.0.1", mesh.tcp_port), timeout=10) as s:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)  # half-close: the echo server must still answer
        got = b""
        while True:
            data = s.recv(65536)
            if not data:
                break
            got += data
    assert got == payload + b"bye"

    def tcp(name: str) -> float | None:
        return value(
            scrape(mesh.proxy.admin), name, reporter="source", destination_service="echo.test"
        )

    assert wait_for(lambda: tcp("istio_tcp_connections_closed_total") == 1, 5)
    assert tcp("istio_tcp_sent_bytes_total") == len(payload) + 3


def test_J02_a_client_leaving_mid_body_aborts_the_upstream_request(
    make_mesh: MeshFactory, codec: str
) -> None:
    """Catalog J02: a POST declaring 1,000,000 bytes, 10 KiB sent, then the client closes.
    The upstream request is aborted: its connection is closed (never pooled again with half
    a message on it) and the application never sees a complete message."""
    mesh = make_mesh(codec=codec)
    state = mesh.v1.state
    with socket.create_connection(("127.0.0.1", mesh.http_port), timeout=5) as s:
        s.sendall(
            b"POST /upload HTTP/1.1\r\nHost: hello.test\r\nContent-Length: 1000000\r\n\r\n"
            + b"x" * 10240
        )
        assert wait_for(lambda: any(r.path == "/upload" for r in state.requests))
    (upload,) = [r for r in state.requests if r.path == "/upload"]
    assert wait_for(lambda: upload.connection in state.closed_ids), "upstream request not aborted"
    conn = http.client.HTTPConnection("127.0.0.1", mesh.http_port, timeout=5)
    conn.request("GET", "/after", headers={"Host": "hello.test"})
    assert conn.getresponse().status == 200
    conn.close()
    (after,) = [r for r in state.requests if r.path == "/after"]
    assert after.connection != upload.connection
    assert "/upload" not in state.completed
