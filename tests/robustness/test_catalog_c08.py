"""Catalog C08: gRPC semantics through the proxy with real grpcio clients and servers: odd
grpc-timeout values, an upstream that refuses, status and trailers passed through."""

from __future__ import annotations

import grpc
import pytest

from tests.integration import test_grpc as src_grpc
from tests.integration.test_grpc import AUTHORITY, GrpcMesh, _grpc_message, _raw
from tests.support.h2client import H2Client
from tests.support.metrics import scrape, value

gmesh = src_grpc.gmesh  # the fixture, shared with test_grpc.py


@pytest.mark.parametrize("value", ["99999999H", "123456789S", "1x", "-5S", ""])
def test_C08_odd_grpc_timeouts_are_ignored_not_fatal(gmesh: GrpcMesh, value: str) -> None:
    c = H2Client(gmesh.port, authority=AUTHORITY)
    headers = [("content-type", "application/grpc"), ("te", "trailers"), ("grpc-timeout", value)]
    sid = c.request("/test.Echo/Unary", method="POST", headers=headers, body=_grpc_message(b"q"))
    (r,) = c.wait(sid, timeout=5)
    assert r.status == 200 and r.trailers.get("grpc-status") == "0"
    c.close()


def test_C08_unreachable_upstream_is_grpc_unavailable(gmesh: GrpcMesh) -> None:
    with gmesh.channel(gmesh.dead_port, "dead.grpc") as ch, pytest.raises(grpc.RpcError) as err:
        _raw("/test.Echo/Unary", ch)(b"hi", timeout=5)
    assert err.value.code() is grpc.StatusCode.UNAVAILABLE
    assert "upstream connect error" in (err.value.details() or "")


def test_C08_error_status_and_message_pass_through(gmesh: GrpcMesh) -> None:
    with gmesh.channel() as ch, pytest.raises(grpc.RpcError) as err:
        _raw("/test.Echo/Fail", ch)(b"", timeout=5)
    assert err.value.code() is grpc.StatusCode.PERMISSION_DENIED
    assert err.value.details() == "not you: ünïcode"
    samples = scrape(gmesh.proxy.admin)
    failed = value(
        samples,
        "istio_requests_total",
        reporter="source",
        grpc_response_status="7",
        request_protocol="grpc",
        response_code="200",
    )
    assert failed == 1
