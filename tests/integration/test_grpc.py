"""gRPC through `meshproxy run` with a real grpcio client and server: every call kind,
trailers, deadlines (route timeout and grpc-timeout), failures as gRPC statuses, metrics."""

from __future__ import annotations

import json
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support.grpc_echo import GrpcEchoServer
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value
from tests.support.proxy import ProxyProcess, free_port, http_get, running_proxy

AUTHORITY = "echo.grpc"


@dataclass
class GrpcMesh:
    proxy: ProxyProcess
    port: int  # GRPC listener for echo.grpc
    dead_port: int  # GRPC listener for dead.grpc (nothing listens behind it)
    server: GrpcEchoServer

    def channel(self, port: int | None = None, authority: str = AUTHORITY) -> grpc.Channel:
        return grpc.insecure_channel(
            f"127.0.0.1:{port or self.port}",
            options=[("grpc.default_authority", authority), ("grpc.enable_http_proxy", 0)],
        )


@pytest.fixture
def gmesh(tmp_path: Path) -> Iterator[GrpcMesh]:
    server = GrpcEchoServer().start()
    admin, port, dead_port, dead = free_port(), free_port(), free_port(), free_port()
    resources = f"""
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: echo}}
spec:
  hosts: [{AUTHORITY}]
  ports: [{{number: {port}, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {server.port}}}}}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: dead}}
spec:
  hosts: [dead.grpc]
  ports: [{{number: {dead_port}, name: grpc, protocol: GRPC}}]
  resolution: STATIC
  endpoints: [{{address: 127.0.0.1, ports: {{grpc: {dead}}}}}]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: echo}}
spec:
  hosts: [{AUTHORITY}]
  http:
  - match: [{{uri: {{exact: /test.Echo/Slow}}, headers: {{x-route: {{exact: timed}}}}}}]
    timeout: 300ms
    route: [{{destination: {{host: {AUTHORITY}}}}}]
  - route: [{{destination: {{host: {AUTHORITY}}}}}]
---
apiVersion: networking.istio.io/v1
kind: Sidecar
metadata: {{name: default}}
spec:
  egress:
  - {{port: {{number: {port}, protocol: GRPC, name: grpc}}, bind: 127.0.0.1, hosts: [./*]}}
  - {{port: {{number: {dead_port}, protocol: GRPC, name: dead}}, bind: 127.0.0.1, hosts: [./*]}}
"""
    try:
        with running_proxy(tmp_path, admin, resources) as proxy:
            yield GrpcMesh(proxy, port, dead_port, server)
    finally:
        server.stop()


def _raw(stub_path: str, channel: grpc.Channel, kind: str = "unary_unary"):  # type: ignore[no-untyped-def]
    return getattr(channel, kind)(stub_path)  # bytes in, bytes out (no serializers)


def test_unary(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch:
        assert _raw("/test.Echo/Unary", ch)(b"hi", timeout=5) == b"echo:hi"
    seen = gmesh.server.service.seen_metadata[-1]
    assert seen.get("x-forwarded-proto") == "http" and "x-request-id" in seen


def test_server_streaming(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch:
        got = list(_raw("/test.Echo/ServerStream", ch, "unary_stream")(b"abc", timeout=5))
    assert got == [b"0:abc", b"1:abc", b"2:abc"]


def test_client_streaming(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch:
        call = _raw("/test.Echo/ClientStream", ch, "stream_unary")
        assert call(iter([b"a", b"bb", b"c" * 100_000]), timeout=5) == b"a|bb|" + b"c" * 100_000


def test_bidi_streaming(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch:
        call = _raw("/test.Echo/Bidi", ch, "stream_stream")
        assert list(call(iter([b"x", b"yy", b"zzz"]), timeout=5)) == [b"X", b"YY", b"ZZZ"]


def test_route_timeout_ends_the_call_with_deadline_exceeded(gmesh: GrpcMesh) -> None:
    start = time.monotonic()
    with gmesh.channel() as ch, pytest.raises(grpc.RpcError) as err:
        _raw("/test.Echo/Slow", ch)(b"", timeout=10, metadata=[("x-route", "timed")])
    assert err.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
    assert time.monotonic() - start < 3
    assert gmesh.server.service.cancelled.wait(5)  # the upstream call was cancelled
    timed_out = value(
        scrape(gmesh.proxy.admin),
        "istio_requests_total",
        reporter="source",
        response_flags="UT",
        grpc_response_status="4",
        response_code="200",
    )
    assert timed_out == 1


def _grpc_message(payload: bytes) -> bytes:
    return struct.pack(">?I", False, len(payload)) + payload


def test_grpc_timeout_header_is_honoured_by_the_proxy(gmesh: GrpcMesh) -> None:
    # A raw client that never cancels by itself: the deadline can only be the proxy's.
    c = H2Client(gmesh.port, authority=AUTHORITY)
    headers = [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", "300m")]
    start = time.monotonic()
    sid = c.request("/test.Echo/Slow", method="POST", headers=headers, body=_grpc_message(b""))
    (r,) = c.wait(sid, timeout=5)
    assert 0.25 < time.monotonic() - start < 3
    assert r.status == 200 and r.headers["grpc-status"] == "4"  # trailers-only response
    c.close()


def test_many_concurrent_calls_share_the_connections(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch:
        call = _raw("/test.Echo/Unary", ch)
        futures = [call.future(b"%d" % i, timeout=10) for i in range(100)]
        assert [f.result() for f in futures] == [b"echo:%d" % i for i in range(100)]
    # 100 calls in flight at once rode one or a few multiplexed upstream connections (the
    # server allows 100 concurrent streams), not one each.
    clusters = json.loads(http_get(gmesh.proxy.admin + "/clusters?format=json")[1])
    hosts = [
        h
        for c in clusters["cluster_statuses"]
        if "echo.grpc" in c["name"]
        for h in c["host_statuses"]
    ]
    assert sum(h["rq_total"] for h in hosts) >= 100
    assert 1 <= sum(h["cx_total"] for h in hosts) <= 4, hosts
