"""WebSocket through `meshproxy run`: HTTP/1.1 Upgrade with a real client and server on both
codecs, a refused upgrade that must not smuggle, and RFC 8441 extended CONNECT over HTTP/2."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from websockets.sync.client import connect

from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import ProxyProcess, free_port, running_proxy, wait_for
from tests.support.ws_echo import WsEchoServer

HOST = "ws.test"


@dataclass
class WsMesh:
    proxy: ProxyProcess
    port: int
    server: WsEchoServer

    def client(self, path: str = "/chat", **kw: object):  # type: ignore[no-untyped-def]
        sock = socket.create_connection(("127.0.0.1", self.port), timeout=5)
        return connect(f"ws://{HOST}:{self.port}{path}", sock=sock, max_size=None, **kw)


@pytest.fixture(params=["httptools", "h11"])
def wsmesh(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[WsMesh]:
    server = WsEchoServer().start()
    admin, port = free_port(), free_port()
    resources = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: ws}}
spec:
  hosts: [{HOST}]
  ports: [{{number: {port}, name: http, protocol: HTTP}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{http: {server.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: ws}}
spec:
  hosts: [{HOST}]
  http:
  - timeout: 500ms  # bounds the handshake, never an open tunnel
    route: [{{destination: {{host: {HOST}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {port}, protocol: HTTP, name: http}}, bind: 127.0.0.1, hosts: [./*]}}
"""
    try:
        with running_proxy(tmp_path, admin, resources, http1Codec=request.param) as proxy:
            yield WsMesh(proxy, port, server)
    finally:
        server.stop()


def test_echo_through_the_proxy(wsmesh: WsMesh) -> None:
    with wsmesh.client() as ws:
        for msg in ("hello", "wörld", b"\x00\x01binary"):
            ws.send(msg)
            assert ws.recv(timeout=5) == msg
    assert wsmesh.server.paths == ["/chat"]


def test_large_messages_both_ways(wsmesh: WsMesh) -> None:
    payload = os.urandom(3 * 1024 * 1024)
    with wsmesh.client() as ws:
        ws.send(payload)
        assert ws.recv(timeout=20) == payload


def test_an_open_tunnel_outlives_the_route_timeout(wsmesh: WsMesh) -> None:
    with wsmesh.client() as ws:
        time.sleep(1.0)  # twice the route timeout
        ws.send("still there?")
        assert ws.recv(timeout=5) == "still there?"


def test_tunnel_counts_as_one_request_with_status_101(wsmesh: WsMesh) -> None:
    with wsmesh.client() as ws:
        ws.send("x")
        ws.recv(timeout=5)

    def tunnels() -> float | None:
        return value(
            scrape(wsmesh.proxy.admin),
            "istio_requests_total",
            reporter="source",
            response_code="101",
        )

    # Counted once the tunnel closes: exactly one request, whatever crossed it.
    assert wait_for(lambda: tunnels() == 1), tunnels()


def test_refused_upgrade_never_parses_what_followed(wsmesh: WsMesh) -> None:
    # The classic: an upgrade the upstream refuses, with a second request in the same write.
    s = socket.create_connection(("127.0.0.1", wsmesh.port), timeout=5)
    s.sendall(
        f"GET /forbidden HTTP/1.1\r\nHost: {HOST}\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
        "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        f"GET /blockedz HTTP/1.1\r\nHost: {HOST}\r\n\r\n".encode()
    )
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    assert data.startswith(b"HTTP/1.1 403")
    assert data.count(b"HTTP/1.1") == 1  # closed after the 403: no second response
    assert "/blockedz" not in wsmesh.server.paths


def _ws_frame(payload: bytes) -> bytes:
    """A masked client text frame (RFC 6455 §5.2), payload < 126 bytes."""
    mask = os.urandom(4)
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return struct.pack(">BB", 0x81, 0x80 | len(payload)) + mask + masked


def test_http2_extended_connect_to_an_http1_websocket_server(wsmesh: WsMesh) -> None:
    c = H2Client(wsmesh.port, authority=HOST)
    sid = c.request(
        "/chat",
        method="CONNECT",
        headers=[(":protocol", "websocket"), ("sec-websocket-version", "13")],
        end=False,
    )
    deadline = time.monotonic() + 5
    while c.responses[sid].status == 0 and time.monotonic() < deadline:
        c.pump(deadline)
    assert c.responses[sid].status == 200
    c.send_body(sid, _ws_frame(b"over h2"), end=False)
    while c.responses[sid].body[:2] != b"\x81\x07" and time.monotonic() < deadline + 5:
        c.pump(time.monotonic() + 1)
    assert c.responses[sid].body[:9] == b"\x81\x07over h2"
    c.close()
