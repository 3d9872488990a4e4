"""The bare relay baseline must really relay: a baseline that skipped work would flatter the
CPU ratios benchmarks.load prints against it."""

from __future__ import annotations

import hashlib
import http.client
import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.proxy import free_port, request, wait_for
from tests.support.upstream import UpstreamServer

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def relay() -> Iterator[tuple[int, UpstreamServer]]:
    upstream = UpstreamServer("app").start()
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "meshproxy.bench.relay", str(port), str(upstream.port)],
        cwd=ROOT,
        stdin=subprocess.DEVNULL,
    )
    try:
        assert wait_for(lambda: _listening(port)), "relay did not start"
        yield port, upstream
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        upstream.stop()


def _listening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def test_requests_and_bodies_pass_with_hop_by_hop_headers_stripped(
    relay: tuple[int, UpstreamServer],
) -> None:
    port, _ = relay
    reply = request(port, "/items?id=1", headers={"X-Keep": "yes", "Keep-Alive": "timeout=5"})
    assert reply.status == 200
    seen = json.loads(reply.body)
    assert seen["path"] == "/items?id=1"
    assert seen["headers"]["x-keep"] == "yes"
    assert "keep-alive" not in seen["headers"]

    body = bytes(range(256)) * 4096  # 1 MiB: several reads, so reads resume mid-body
    reply = request(port, "/upload", method="POST", body=body)
    assert reply.status == 200
    assert hashlib.sha256(body).hexdigest() in reply.body.decode()

    chunked = request(port, "/big?n=300000")  # a chunked response is re-framed downstream
    assert chunked.status == 200 and len(chunked.body) == 300000


def test_requests_on_one_connection_reuse_one_upstream_connection(
    relay: tuple[int, UpstreamServer],
) -> None:
    port, upstream = relay
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        for i in range(5):
            conn.request("GET", f"/n{i}")
            resp = conn.getresponse()
            assert resp.status == 200 and json.loads(resp.read())["path"] == f"/n{i}"
    finally:
        conn.close()
    assert upstream.state.connections == 1
