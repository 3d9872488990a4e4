"""Catalog group F beyond F01/F04/F06 (test_catalog_authz.py, test_catalog_fg.py): internal
control headers sent from outside the mesh (F02) and trace-context abuse (F05)."""

from __future__ import annotations

from tests.integration import test_tracing as src_tracing
from tests.integration.conftest import MeshFactory
from tests.integration.test_tracing import (
    PARENT_SPAN,
    PARENT_TRACE,
    call,
    traceparent,
    tracing_spec,
)
from tests.robustness import test_catalog_authz as catalog_authz
from tests.robustness.test_catalog_authz import Inbound
from tests.support.otlp import HttpCollector

http_collector = src_tracing.http_collector  # the fixture, shared with test_tracing.py


def test_F05_malformed_trace_headers_start_a_new_trace(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=0))
    for bad in (
        traceparent("0" * 32, PARENT_SPAN, "01"),  # all-zero trace id
        traceparent(PARENT_TRACE, "0" * 16, "01"),
        "00-" + "g" * 32 + f"-{PARENT_SPAN}-01",
        "ff-" + PARENT_TRACE + f"-{PARENT_SPAN}-01",
        traceparent(PARENT_TRACE, PARENT_SPAN, "01") + "-extra",
        "x" * 4000,
    ):
        seen = call(mesh, {"traceparent": bad})
        _, trace_id, _, flags = seen["traceparent"].split("-")
        assert trace_id != PARENT_TRACE and flags == "00", bad  # 0 %: a new, unsampled trace


inbound = catalog_authz.inbound  # the fixture: an inbound listener before a recording app

CONTROL_HEADERS = (
    b"X-Envoy-Retry-On: 5xx",
    b"X-Envoy-Upstream-Rq-Timeout-Ms: 999999",
    b"X-Envoy-Internal: true",
    b"X-Envoy-Original-Path: /admin",
    b"X-Envoy-Force-Trace: 1",
    b"X-Envoy-Max-Retries: 100",
)


def test_F02_control_headers_from_outside_never_reach_the_app(inbound: Inbound) -> None:
    """A client outside the mesh cannot steer the proxy or the app with x-envoy-* headers:
    no address range is trusted as internal, so every one is dropped inbound."""
    assert inbound.send(b"/open/f02", *CONTROL_HEADERS) == 200
    head = inbound.app.heads[-1].lower()
    assert b"x-envoy-" not in head, head
    assert inbound.app.header(b"x-envoy-original-path") == []


def test_F05_tracestate_is_cut_to_whole_members(
    make_mesh: MeshFactory, http_collector: HttpCollector
) -> None:
    """A 10 KiB tracestate and one of 50 members: at most 32 members and 512 characters go
    on, each one whole and as sent; an oversized member is the first to go."""
    provider = f"{{service: 127.0.0.1, port: {http_collector.port}, http: {{}}}}"
    mesh = make_mesh(extra_spec=tracing_spec(provider, percent=0))
    parent = traceparent(PARENT_TRACE, PARENT_SPAN, "00")
    many = [f"k{i}=v{i}" for i in range(50)]
    seen = call(mesh, {"traceparent": parent, "tracestate": ",".join(many)})
    forwarded = seen["tracestate"].split(",")
    assert forwarded == many[:32]
    huge = "big=" + "x" * 10_000
    seen = call(mesh, {"traceparent": parent, "tracestate": f"{huge},a=1,b=2"})
    assert seen["tracestate"] == "a=1,b=2"
    assert seen["traceparent"].split("-")[1] == PARENT_TRACE  # the parent itself still holds
